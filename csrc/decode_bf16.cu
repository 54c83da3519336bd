// bf16 instantiations of the decode kernels (one file per dtype: the two compile in parallel).
#include "launch.cuh"

namespace prefixattn {
namespace detail {
void launch_bf16(const DecodeParams& p, void* stream) { kern::launch_dtype<__nv_bfloat16>(p, stream); }
void preload_bf16() { kern::preload_dtype<__nv_bfloat16>(); }
}  // namespace detail
}  // namespace prefixattn

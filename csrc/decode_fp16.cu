// fp16 instantiations of the decode kernels (one file per dtype: the two compile in parallel).
#include "launch.cuh"

namespace prefixattn {
namespace detail {
void launch_fp16(const DecodeParams& p, void* stream) { kern::launch_dtype<__half>(p, stream); }
void preload_fp16() { kern::preload_dtype<__half>(); }
}  // namespace detail
}  // namespace prefixattn

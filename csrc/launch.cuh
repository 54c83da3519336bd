// Launch of the decode kernel and the split merge for one dtype; included by decode_fp16.cu and
// decode_bf16.cu so the two dtypes compile in parallel. Parameters are checked in runtime.cu.
#pragma once

#include <stdexcept>
#include <string>

#include "decode_kernel.cuh"

namespace prefixattn {
namespace kern {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("prefixattn._C: launching ") + what + " failed: " + cudaGetErrorString(err));
}

template <typename T, int D, bool PAGED>
void launch_shape(const DecodeParams& p, cudaStream_t stream) {
  const int rows = (p.heads_q / p.heads_kv) * p.seqlen_q;
  const int row_groups = (rows + kTileRows - 1) / kTileRows;
  const long long blocks = static_cast<long long>(row_groups) * p.num_splits * p.heads_kv * p.batch;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("prefixattn._C: the problem needs more than 2^31 - 1 blocks");
  decode_kernel<T, D, PAGED><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, row_groups);
  check_launch("the decode kernel");
  if (p.num_splits > 1) {
    const long long threads = static_cast<long long>(p.batch) * p.heads_q * p.seqlen_q * (D / 8);
    const long long merge_blocks = (threads + 255) / 256;
    merge_kernel<T><<<static_cast<unsigned>(merge_blocks), 256, 0, stream>>>(p);
    check_launch("the split merge kernel");
  }
}

// Loads every kernel of this dtype into the current context (cudaFuncGetAttributes forces the lazy
// loader), so a first call made inside CUDA-graph capture does not have to load modules.
template <typename T>
void preload_dtype() {
  cudaFuncAttributes attr;
  const void* kernels[] = {
      reinterpret_cast<const void*>(decode_kernel<T, 64, false>), reinterpret_cast<const void*>(decode_kernel<T, 64, true>),
      reinterpret_cast<const void*>(decode_kernel<T, 128, false>), reinterpret_cast<const void*>(decode_kernel<T, 128, true>),
      reinterpret_cast<const void*>(merge_kernel<T>)};
  for (const void* k : kernels) {
    const cudaError_t err = cudaFuncGetAttributes(&attr, k);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("prefixattn._C: loading the kernels failed: ") + cudaGetErrorString(err));
  }
}

template <typename T>
void launch_dtype(const DecodeParams& p, void* stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.head_dim == 64) {
    p.paged ? launch_shape<T, 64, true>(p, s) : launch_shape<T, 64, false>(p, s);
  } else if (p.head_dim == 128) {
    p.paged ? launch_shape<T, 128, true>(p, s) : launch_shape<T, 128, false>(p, s);
  } else {
    throw std::invalid_argument("head_dim: expected 64 or 128, got " + std::to_string(p.head_dim));
  }
}

}  // namespace kern
}  // namespace prefixattn

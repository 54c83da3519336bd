// Decode attention over [prefix; sequence] keys: the parameters the Python side fills in, and the
// launchers. Plain C++ (no CUDA, no torch headers), so the pybind11 binding compiles with the host
// compiler and the module never couples to torch's ABI.
#pragma once

#include <cstdint>

namespace prefixattn {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// All device pointers are addresses (tensor.data_ptr()); all strides are in elements.
struct DecodeParams {
  // Sizes. The G = heads_q / heads_kv query heads of one KV head times the seqlen_q query rows form
  // the rows of one block, so each K/V row is read once per KV head.
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, head_dim = 0;
  int dtype = kBFloat16;
  float scale = 1.0f;
  // Query i (0-based among seqlen_q) sees sequence keys j <= seqlen - seqlen_q + i when causal.
  bool causal = true;

  // q [B, Hq, Sq, D].
  uintptr_t q = 0;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;

  // Sequence keys, contiguous form: k, v [B, Hkv, Sk, D] with any strides.
  bool paged = false;
  int seqlen_k = 0;
  uintptr_t k = 0, v = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0, v_sb = 0, v_sh = 0, v_ss = 0;
  uintptr_t key_padding_mask = 0;  // bool [B, Sk] (True = real token) or 0
  int64_t kpm_sb = 0, kpm_ss = 0;

  // Sequence keys, paged form (paged = true): k, v are caches [num_pages, page_size, Hkv, D];
  // block_table int32 [B, max_pages]; seq_lens int32 [B] (including the seqlen_q new tokens).
  // Out-of-range data never leads to an out-of-bounds access: seq_lens are clamped to
  // [0, max_pages * page_size] and keys on a page id outside [0, num_pages) are masked.
  int64_t kc_sp = 0, kc_st = 0, kc_sh = 0, vc_sp = 0, vc_st = 0, vc_sh = 0;
  uintptr_t block_table = 0;
  int64_t bt_sb = 0, bt_sp = 0;
  int max_pages = 0, num_pages = 0, page_size = 0;
  int page_shift = -1;  // log2(page_size) when it is a power of two, else -1
  uintptr_t seq_lens = 0;
  int64_t sl_s = 0;

  // Prefix: shared [Hkv, P, D] (pool_size = 0) or pool [N, Hkv, P, D] with prefix_index [B]
  // (int32 or int64; -1 or any value outside [0, N) = no prefix) and optional prefix_lengths
  // (int32 or int64, [N], or [1] for the shared form; clamped to [0, P]).
  uintptr_t prefix_k = 0, prefix_v = 0;
  int prefix_len = 0, pool_size = 0;
  int64_t pk_sn = 0, pk_sh = 0, pk_sp = 0, pv_sn = 0, pv_sh = 0, pv_sp = 0;
  uintptr_t prefix_index = 0;
  bool prefix_index_i64 = false;
  int64_t pi_s = 0;
  uintptr_t prefix_lengths = 0;
  bool prefix_lengths_i64 = false;
  int64_t pl_s = 0;

  // Outputs: out is [B, Sq, Hq, D] memory (strides given per b, s, h); lse float32 [B, Hq, Sq],
  // natural log. A row with nothing to attend gets zeros and lse = -inf.
  uintptr_t out = 0;
  int64_t o_sb = 0, o_ss = 0, o_sh = 0;
  uintptr_t lse = 0;
  int64_t l_sb = 0, l_sh = 0, l_ss = 0;

  // Split-K: with num_splits > 1 each split writes a normalised fp32 partial and its base-2 lse
  // into the workspace (float32, num_splits * B * Hq * Sq * (D + 1) elements), merged afterwards.
  int num_splits = 1;
  uintptr_t workspace = 0;
  int64_t workspace_elems = 0;
};

// Number of float32 workspace elements a call with these sizes needs (0 when num_splits == 1).
int64_t workspace_elements(const DecodeParams& p);

// Checks the parameters (throws std::invalid_argument naming the field) and launches the decode
// kernel (and the split merge) on `stream` (a cudaStream_t as an integer) of device `device`.
// Throws std::runtime_error on any CUDA error. Never synchronises.
void decode(const DecodeParams& p, uintptr_t stream, int device);

// Number of CUDA devices, 0 when there is no device or no driver (never throws).
int device_count();
// Throws std::runtime_error with the CUDA error text when no device can be used.
void require_device();
// CUDA runtime version the module was built against (e.g. 13000).
int runtime_version();

namespace detail {
// Per-dtype launchers (decode_fp16.cu, decode_bf16.cu); `stream` is a cudaStream_t.
void launch_fp16(const DecodeParams& p, void* stream);
void launch_bf16(const DecodeParams& p, void* stream);
void preload_fp16();
void preload_bf16();
}  // namespace detail

}  // namespace prefixattn

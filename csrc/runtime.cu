// Host side of prefixattn._C: parameter checks, device selection and dispatch by dtype.
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>

#include "decode.h"

namespace prefixattn {
namespace {

constexpr int kMaxSeqlenQ = 16;
constexpr int kMaxSplits = 1024;
constexpr int64_t kMaxKeys = (int64_t{1} << 31) - 64;  // keys are indexed with int inside the kernel

[[noreturn]] void bad(const std::string& field, const std::string& msg) {
  throw std::invalid_argument(field + ": " + msg);
}

void check_aligned(const char* field, uintptr_t ptr) {
  if (ptr % 16 != 0) bad(field, "expected a 16-byte aligned address (the kernels use 16-byte loads), got " + std::to_string(ptr));
}

void check_strides(const char* field, std::initializer_list<int64_t> strides) {
  for (int64_t s : strides)
    if (s % 8 != 0)
      bad(field, "expected strides that are multiples of 8 elements (16 bytes) apart from the last dim, got " +
                     std::to_string(s));
}

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("prefixattn._C: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = prev_;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// The first call on a device loads all kernels (usually the warm-up before any graph capture).
void preload_once(int device) {
  static std::mutex mutex;
  static std::set<int> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  if (loaded.count(device)) return;
  detail::preload_fp16();
  detail::preload_bf16();
  loaded.insert(device);
}

void check_params(const DecodeParams& p) {
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) bad("dtype", "expected float16 (0) or bfloat16 (1), got " + std::to_string(p.dtype));
  if (p.head_dim != 64 && p.head_dim != 128) bad("head_dim", "expected 64 or 128, got " + std::to_string(p.head_dim));
  if (p.batch < 0) bad("batch", "expected >= 0, got " + std::to_string(p.batch));
  if (p.heads_kv < 1 || p.heads_q < 1 || p.heads_q % p.heads_kv != 0)
    bad("heads_q", "expected a positive multiple of heads_kv, got heads_q=" + std::to_string(p.heads_q) +
                       ", heads_kv=" + std::to_string(p.heads_kv));
  if (p.seqlen_q < 1 || p.seqlen_q > kMaxSeqlenQ)
    bad("seqlen_q", "expected 1.." + std::to_string(kMaxSeqlenQ) + " (decode), got " + std::to_string(p.seqlen_q));
  if (p.num_splits < 1 || p.num_splits > kMaxSplits)
    bad("num_splits", "expected 1.." + std::to_string(kMaxSplits) + ", got " + std::to_string(p.num_splits));
  if (!(p.scale == p.scale)) bad("scale", "expected a finite number, got NaN");

  check_aligned("q", p.q);
  check_strides("q", {p.q_sb, p.q_sh, p.q_ss});
  check_aligned("out", p.out);
  check_strides("out", {p.o_sb, p.o_ss, p.o_sh});
  if (p.q == 0 || p.out == 0 || p.lse == 0) bad("q", "q, out and lse must be device addresses, got 0");
  check_aligned("k", p.k);
  check_aligned("v", p.v);

  int64_t max_seq;
  if (p.paged) {
    if (p.k == 0 || p.v == 0) bad("k", "the paged caches must be device addresses, got 0");
    if (p.block_table == 0 || p.seq_lens == 0) bad("block_table", "block_table and seq_lens are required in the paged form");
    if (p.page_size < 1) bad("page_size", "expected >= 1, got " + std::to_string(p.page_size));
    if (p.max_pages < 0 || p.num_pages < 0) bad("max_pages", "expected max_pages >= 0 and num_pages >= 0");
    if (p.key_padding_mask != 0) bad("key_padding_mask", "not supported in the paged form (seq_lens give the lengths)");
    check_strides("k", {p.kc_sp, p.kc_st, p.kc_sh});
    check_strides("v", {p.vc_sp, p.vc_st, p.vc_sh});
    max_seq = static_cast<int64_t>(p.max_pages) * p.page_size;
  } else {
    if (p.seqlen_k < 0) bad("seqlen_k", "expected >= 0, got " + std::to_string(p.seqlen_k));
    if (p.seqlen_k > 0 && (p.k == 0 || p.v == 0)) bad("k", "k and v must be device addresses, got 0");
    check_strides("k", {p.k_sb, p.k_sh, p.k_ss});
    check_strides("v", {p.v_sb, p.v_sh, p.v_ss});
    max_seq = p.seqlen_k;
  }
  if (p.prefix_k != 0) {
    if (p.prefix_v == 0) bad("prefix_v", "expected a device address because prefix_k was given, got 0");
    if (p.prefix_len < 0 || p.pool_size < 0) bad("prefix_len", "expected prefix_len >= 0 and pool_size >= 0");
    if (p.pool_size > 0 && p.prefix_index == 0) bad("prefix_index", "required with a pool-form prefix");
    check_aligned("prefix_k", p.prefix_k);
    check_aligned("prefix_v", p.prefix_v);
    check_strides("prefix_k", {p.pk_sn, p.pk_sh, p.pk_sp});
    check_strides("prefix_v", {p.pv_sn, p.pv_sh, p.pv_sp});
  }
  if (max_seq + (p.prefix_k != 0 ? p.prefix_len : 0) > kMaxKeys) bad("seqlen_k", "more than 2^31 - 64 keys per sequence");
  if (p.num_splits > 1) {
    if (p.workspace == 0) bad("workspace", "required when num_splits > 1");
    check_aligned("workspace", p.workspace);
    if (p.workspace_elems < workspace_elements(p))
      bad("workspace", "expected at least " + std::to_string(workspace_elements(p)) + " float32 elements, got " +
                           std::to_string(p.workspace_elems));
  }
}

}  // namespace

int64_t workspace_elements(const DecodeParams& p) {
  if (p.num_splits <= 1) return 0;
  return static_cast<int64_t>(p.num_splits) * p.batch * p.heads_q * p.seqlen_q * (p.head_dim + 1);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls report their own
    return 0;
  }
  return n;
}

void require_device() {
  static std::atomic<bool> ok{false};  // once a device was seen, later calls skip the query
  if (ok.load(std::memory_order_relaxed)) return;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("prefixattn._C: no usable CUDA device (") + cudaGetErrorString(err) + ")");
  }
  if (n == 0) throw std::runtime_error("prefixattn._C: no CUDA device found");
  ok.store(true, std::memory_order_relaxed);
}

int runtime_version() { return CUDART_VERSION; }

void decode(const DecodeParams& params, uintptr_t stream, int device) {
  check_params(params);
  require_device();
  if (params.batch == 0) return;
  DecodeParams p = params;
  p.page_shift = -1;
  if (p.paged && (p.page_size & (p.page_size - 1)) == 0) {
    p.page_shift = 0;
    while ((1 << p.page_shift) < p.page_size) ++p.page_shift;
  }
  DeviceGuard guard(device);
  preload_once(device);
  void* s = reinterpret_cast<void*>(stream);
  if (p.dtype == kBFloat16)
    detail::launch_bf16(p, s);
  else
    detail::launch_fp16(p, s);
}

}  // namespace prefixattn

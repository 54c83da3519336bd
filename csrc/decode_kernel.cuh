// The decode kernel (split-K flash decoding with GQA packing) and the split merge.
//
// One block = (sequence b, KV head, split of the key range, group of 16 query rows). Its rows are the
// G query heads of the KV head times the Sq query rows, so each K/V row is read from memory once per
// KV head. The block's key range is [prefix; sequence] in one index space: keys [0, plen) come from
// the prefix buffer (small, L2 resident, shared by the batch), the rest from the sequence (strided or
// paged). Four warps take 16-key tiles of the range in turn, each with its own online softmax, and are
// merged through shared memory at the end.
//
// Per 16-key tile a warp does S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulate):
//  - QK^T: A = Q (16 rows x 16 of D), B = K^T. The order in which D is summed is free, so each lane
//    takes whole 16-byte chunks of its key row (chunks 4i + t of key g) and Q is loaded with the same
//    permutation: K comes straight from global memory in coalesced 16-byte loads, no shared memory.
//  - PV: A = P, straight from the S accumulators (the usual FlashAttention-2 register reuse); B = V
//    with output column n of n-tile nt standing for d = 64 (nt / 8) + 8 n + nt % 8, so each lane
//    loads 16-byte chunks of its four V rows and pairs them up with byte permutes. Lane (g, t) ends
//    up holding O[row g (and g + 8)][64 h + 16 t + 0..15] for each 64-column half h.
// K loads of the next tile are issued right after the QK^T product, V loads right after PV, so a
// warp always has one tile's K or V in flight while it computes; the tile after that is prefetched
// into L2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "decode.h"

namespace prefixattn {
namespace kern {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 16;  // keys per warp iteration: two 8-key n-tiles of the QK^T product
constexpr int kTileRows = 16;  // query rows per block: the M of the MMA
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2.approx(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct Ops;

template <>
struct Ops<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Ops<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ void load16(uint32_t (&r)[4], const void* ptr) {
  // ptr == nullptr: the key is out of range (or on a bad page): zeros, so P = 0 never meets garbage.
  uint4 x = make_uint4(0u, 0u, 0u, 0u);
  if (ptr != nullptr) x = __ldg(reinterpret_cast<const uint4*>(ptr));
  r[0] = x.x;
  r[1] = x.y;
  r[2] = x.z;
  r[3] = x.w;
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&x)[8]) {
  uint4 v;
  v.x = Ops<T>::pack(x[0], x[1]);
  v.y = Ops<T>::pack(x[2], x[3]);
  v.z = Ops<T>::pack(x[4], x[5]);
  v.w = Ops<T>::pack(x[6], x[7]);
  *reinterpret_cast<uint4*>(dst) = v;
}

__device__ __forceinline__ int64_t load_index(uintptr_t base, bool i64, int64_t offset) {
  return i64 ? __ldg(reinterpret_cast<const long long*>(base) + offset)
             : static_cast<int64_t>(__ldg(reinterpret_cast<const int*>(base) + offset));
}

// Where key kk of this block's [prefix; sequence] range lives; nullptr when it is out of range or on
// a page id outside the cache (such keys are masked).
template <typename T, bool PAGED>
struct KeySource {
  const T* pk;
  const T* pv;
  int64_t pk_sp, pv_sp;
  int plen, end;
  const T* kseq;  // contiguous: k + b*sb + h*sh; paged: cache + h*sh
  const T* vseq;
  int64_t k_st, v_st;  // token strides (contiguous: along Sk; paged: within a page)
  const int* bt;       // paged: block table row of this sequence
  int64_t bt_sp, k_spage, v_spage;
  int page_size, page_shift, num_pages;

  template <bool V>
  __device__ __forceinline__ const T* row(int kk) const {
    if (kk >= end) return nullptr;
    if (kk < plen) return V ? pv + kk * pv_sp : pk + kk * pk_sp;
    const int pos = kk - plen;
    if (!PAGED) return V ? vseq + pos * v_st : kseq + pos * k_st;
    int slot, tok;
    if (page_shift >= 0) {
      slot = pos >> page_shift;
      tok = pos & (page_size - 1);
    } else {
      slot = pos / page_size;
      tok = pos - slot * page_size;
    }
    const int page = __ldg(bt + slot * bt_sp);
    if (page < 0 || page >= num_pages) return nullptr;
    return V ? vseq + page * v_spage + tok * v_st : kseq + page * k_spage + tok * k_st;
  }
};

template <typename T, int D, bool PAGED>
__global__ void __launch_bounds__(kThreads, 2) decode_kernel(const DecodeParams p, int row_groups) {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64");
  constexpr int KC = D / 32;  // 16-byte chunks of a K (or Q) row per lane: chunks 4i + t
  constexpr int KSTEPS = D / 16;
  constexpr int VH = D / 64;  // 16-byte chunks of a V row per lane: chunk 8g + 64h
  constexpr int NT = D / 8;   // n-tiles of the PV product
  constexpr int SROW = D + 4;  // padded shared-memory row (floats)

  __shared__ float sm_o[kWarps][kTileRows][SROW];
  __shared__ float sm_m[kWarps][kTileRows];
  __shared__ float sm_l[kWarps][kTileRows];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  int bid = blockIdx.x;
  const int rg = bid % row_groups;
  bid /= row_groups;
  const int split = bid % p.num_splits;
  bid /= p.num_splits;
  const int hkv = bid % p.heads_kv;
  const int b = bid / p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const int rows = group * p.seqlen_q;

  // ---- the prefix entry of this sequence and its valid length
  KeySource<T, PAGED> src;
  src.pk = src.pv = nullptr;
  src.pk_sp = p.pk_sp;
  src.pv_sp = p.pv_sp;
  src.plen = 0;
  if (p.prefix_k != 0 && p.prefix_len > 0) {
    int64_t entry = 0;
    bool has = true;
    if (p.pool_size > 0) {
      entry = load_index(p.prefix_index, p.prefix_index_i64, b * p.pi_s);
      has = entry >= 0 && entry < p.pool_size;
    }
    if (has) {
      int64_t n = p.prefix_len;
      if (p.prefix_lengths != 0) {
        n = load_index(p.prefix_lengths, p.prefix_lengths_i64, entry * p.pl_s);
        n = n < 0 ? 0 : (n > p.prefix_len ? p.prefix_len : n);
      }
      src.plen = static_cast<int>(n);
      src.pk = reinterpret_cast<const T*>(p.prefix_k) + entry * p.pk_sn + hkv * p.pk_sh;
      src.pv = reinterpret_cast<const T*>(p.prefix_v) + entry * p.pv_sn + hkv * p.pv_sh;
    }
  }

  // ---- the sequence keys
  int seqlen;
  if (PAGED) {
    const int64_t n = __ldg(reinterpret_cast<const int*>(p.seq_lens) + b * p.sl_s);
    const int64_t cap = static_cast<int64_t>(p.max_pages) * p.page_size;
    seqlen = static_cast<int>(n < 0 ? 0 : (n > cap ? cap : n));
    src.kseq = reinterpret_cast<const T*>(p.k) + hkv * p.kc_sh;
    src.vseq = reinterpret_cast<const T*>(p.v) + hkv * p.vc_sh;
    src.k_st = p.kc_st;
    src.v_st = p.vc_st;
    src.bt = reinterpret_cast<const int*>(p.block_table) + b * p.bt_sb;
    src.bt_sp = p.bt_sp;
    src.k_spage = p.kc_sp;
    src.v_spage = p.vc_sp;
    src.page_size = p.page_size;
    src.page_shift = p.page_shift;
    src.num_pages = p.num_pages;
  } else {
    seqlen = p.seqlen_k;
    src.kseq = reinterpret_cast<const T*>(p.k) + b * p.k_sb + hkv * p.k_sh;
    src.vseq = reinterpret_cast<const T*>(p.v) + b * p.v_sb + hkv * p.v_sh;
    src.k_st = p.k_ss;
    src.v_st = p.v_ss;
    src.bt = nullptr;
    src.bt_sp = src.k_spage = src.v_spage = 0;
    src.page_size = 1;
    src.page_shift = 0;
    src.num_pages = 0;
  }
  const uint8_t* kpm = (!PAGED && p.key_padding_mask != 0)
                           ? reinterpret_cast<const uint8_t*>(p.key_padding_mask) + b * p.kpm_sb
                           : nullptr;

  // ---- this split's share of the key range, in whole tiles
  const int total = src.plen + seqlen;
  const int tiles_total = (total + kTileKeys - 1) / kTileKeys;
  const int tiles_per_split = (tiles_total + p.num_splits - 1) / p.num_splits;
  const int first_tile = split * tiles_per_split;
  const int n_tiles = max(0, min(tiles_total, first_tile + tiles_per_split) - first_tile);
  const int kbeg = first_tile * kTileKeys;
  src.end = total;

  // ---- this lane's two query rows (g, g + 8) and their causal limits on sequence positions
  uint32_t qf[2][KC][4];
  int limit[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = rg * kTileRows + g + 8 * r;
    const bool ok = row < rows;
    const int hh = ok ? row / p.seqlen_q : 0;
    const int qi = ok ? row - hh * p.seqlen_q : 0;
    const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (hkv * group + hh) * p.q_sh + qi * p.q_ss;
#pragma unroll
    for (int i = 0; i < KC; ++i) load16(qf[r][i], ok ? qp + (4 * i + t) * 8 : nullptr);
    limit[r] = (PAGED || p.causal) ? seqlen - p.seqlen_q + qi : INT_MAX;  // paged is always causal
  }

  const float scale_log2 = p.scale * kLog2e;
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  // K of tile keys g and 8 + g; V of tile keys 2t, 2t + 1, 2t + 8, 2t + 9 (this lane's S columns).
  uint32_t kf[2][KC][4];
  uint32_t vf[4][VH][4];
  auto load_k = [&](int k0) {
#pragma unroll
    for (int n2 = 0; n2 < 2; ++n2) {
      const T* r = src.template row<false>(k0 + 8 * n2 + g);
#pragma unroll
      for (int i = 0; i < KC; ++i) load16(kf[n2][i], r ? r + (4 * i + t) * 8 : nullptr);
    }
  };
  auto v_key = [&](int u) { return 2 * t + (u & 1) + 8 * (u >> 1); };
  auto load_v = [&](int k0) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const T* r = src.template row<true>(k0 + v_key(u));
#pragma unroll
      for (int h = 0; h < VH; ++h) load16(vf[u][h], r ? r + 64 * h + 8 * g : nullptr);
    }
  };

  // L2 prefetch of a later tile: the register budget allows one tile of K/V loads in flight per warp,
  // so tiles further ahead are requested from DRAM into L2 without registers (one 128-byte line of K
  // and one of V per lane and call).
  auto prefetch = [&](int tile) {
    if (tile >= n_tiles) return;
    constexpr int LINES = D / 64;  // 128-byte lines per key row
    for (int x = lane; x < kTileKeys * LINES; x += 32) {
      const int kk = kbeg + tile * kTileKeys + x / LINES;
      const T* kr = src.template row<false>(kk);
      const T* vr = src.template row<true>(kk);
      if (kr != nullptr) prefetch_l2(kr + (x % LINES) * 64);
      if (vr != nullptr) prefetch_l2(vr + (x % LINES) * 64);
    }
  };

  int it = warp;
  if (it < n_tiles) {
    load_k(kbeg + it * kTileKeys);
    load_v(kbeg + it * kTileKeys);
    prefetch(it + kWarps);
  }
  for (; it < n_tiles; it += kWarps) {
    const int k0 = kbeg + it * kTileKeys;
    const int next = it + kWarps;
    prefetch(next + kWarps);

    // S = Q K^T: s[n2][c], c = 0, 1 -> row g, keys 8 n2 + 2t + c; c = 2, 3 -> row g + 8.
    float s[2][4];
#pragma unroll
    for (int n2 = 0; n2 < 2; ++n2) {
      s[n2][0] = s[n2][1] = s[n2][2] = s[n2][3] = 0.f;
#pragma unroll
      for (int j = 0; j < KSTEPS; ++j) {
        const int i = j >> 1, w = 2 * (j & 1);
        Ops<T>::mma(s[n2], qf[0][i][w], qf[1][i][w], qf[0][i][w + 1], qf[1][i][w + 1], kf[n2][i][w],
                    kf[n2][i][w + 1]);
      }
    }
    if (next < n_tiles) load_k(kbeg + next * kTileKeys);

    // Mask: keys past the range or on bad pages, padding, and the causal limit of each row.
    bool key_ok[4];
    int key_pos[4];  // sequence position, or INT_MIN for prefix keys (always visible)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int kk = k0 + v_key(u);
      bool ok = kk < total;
      if (PAGED && ok && kk >= src.plen) ok = src.template row<true>(kk) != nullptr;
      const int pos = kk - src.plen;
      if (kpm != nullptr && ok && pos >= 0) ok = kpm[pos * p.kpm_ss] != 0;
      key_ok[u] = ok;
      key_pos[u] = pos >= 0 ? pos : INT_MIN;
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n2 = 0; n2 < 2; ++n2) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int u = 2 * n2 + (c & 1), r = c >> 1;
        const bool vis = key_ok[u] && key_pos[u] <= limit[r];
        s[n2][c] = vis ? s[n2][c] * scale_log2 : -INFINITY;
        mx[r] = fmaxf(mx[r], s[n2][c]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      // A row with nothing visible so far keeps m = -inf; shift by 0 then so exp2 gives 0, not NaN.
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = ex2(m_run[r] - m_use[r]);
      m_run[r] = m_new;
    }
    float pr[2][4];
#pragma unroll
    for (int n2 = 0; n2 < 2; ++n2)
#pragma unroll
      for (int c = 0; c < 4; ++c) pr[n2][c] = ex2(s[n2][c] - m_use[c >> 1]);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      l_run[r] = l_run[r] * alpha[r] + pr[0][2 * r] + pr[0][2 * r + 1] + pr[1][2 * r] + pr[1][2 * r + 1];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] *= alpha[0];
      acc[n][1] *= alpha[0];
      acc[n][2] *= alpha[1];
      acc[n][3] *= alpha[1];
    }

    // O += P V. A = P (rows g, g + 8; keys 2t, 2t + 1 and 8 + 2t, 9 + 2t) from the S layout.
    const uint32_t a0 = Ops<T>::pack(pr[0][0], pr[0][1]);
    const uint32_t a1 = Ops<T>::pack(pr[0][2], pr[0][3]);
    const uint32_t a2 = Ops<T>::pack(pr[1][0], pr[1][1]);
    const uint32_t a3 = Ops<T>::pack(pr[1][2], pr[1][3]);
#pragma unroll
    for (int h = 0; h < VH; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        // B = V[keys 2t, 2t + 1 | 2t + 8, 2t + 9][d = 64h + 8g + e], paired along the key.
        const uint32_t sel = (e & 1) ? 0x7632u : 0x5410u;
        const uint32_t b0 = __byte_perm(vf[0][h][e >> 1], vf[1][h][e >> 1], sel);
        const uint32_t b1 = __byte_perm(vf[2][h][e >> 1], vf[3][h][e >> 1], sel);
        Ops<T>::mma(acc[8 * h + e], a0, a1, a2, a3, b0, b1);
      }
    }
    if (next < n_tiles) load_v(kbeg + next * kTileKeys);
  }

  // ---- merge the warps: each holds (m, l, unnormalised O) for the block's 16 rows
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  if (t == 0) {
    sm_m[warp][g] = m_run[0];
    sm_m[warp][g + 8] = m_run[1];
    sm_l[warp][g] = l_run[0];
    sm_l[warp][g + 8] = l_run[1];
  }
#pragma unroll
  for (int h = 0; h < VH; ++h) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = 64 * h + 16 * t + e;
      sm_o[warp][g][d] = acc[8 * h + e][0];
      sm_o[warp][g][d + 8] = acc[8 * h + e][1];
      sm_o[warp][g + 8][d] = acc[8 * h + e][2];
      sm_o[warp][g + 8][d + 8] = acc[8 * h + e][3];
    }
  }
  __syncthreads();

  constexpr int CHUNKS = D / 8;
  for (int idx = threadIdx.x; idx < kTileRows * CHUNKS; idx += kThreads) {
    const int r = idx / CHUNKS, c = idx - r * CHUNKS;
    const int row = rg * kTileRows + r;
    if (row >= rows) continue;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm_m[w][r]);
    const float m_use = m == -INFINITY ? 0.f : m;
    float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = ex2(sm_m[w][r] - m_use);
      l += wt * sm_l[w][r];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += wt * sm_o[w][r][8 * c + e];
    }
    const bool empty = !(l > 0.f);
    const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const float lse2 = empty ? -INFINITY : m + __log2f(l);
    const int hh = row / p.seqlen_q, qi = row - hh * p.seqlen_q, h = hkv * group + hh;
    if (p.num_splits == 1) {
      T* dst = reinterpret_cast<T*>(p.out) + b * p.o_sb + qi * p.o_ss + h * p.o_sh + 8 * c;
      store8<T>(dst, o);
      if (c == 0) reinterpret_cast<float*>(p.lse)[b * p.l_sb + h * p.l_sh + qi * p.l_ss] = lse2 * kLn2;
    } else {
      const int64_t rows_all = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
      const int64_t cell = split * rows_all + (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + qi;
      float* wo = reinterpret_cast<float*>(p.workspace) + cell * D + 8 * c;
      *reinterpret_cast<float4*>(wo) = make_float4(o[0], o[1], o[2], o[3]);
      *reinterpret_cast<float4*>(wo + 4) = make_float4(o[4], o[5], o[6], o[7]);
      if (c == 0) reinterpret_cast<float*>(p.workspace)[p.num_splits * rows_all * D + cell] = lse2;
    }
  }
}

// Log-sum-exp merge of the split partials: one thread per (row, 8 columns of D).
template <typename T>
__global__ void __launch_bounds__(256) merge_kernel(const DecodeParams p) {
  const int chunks = p.head_dim / 8;
  const int64_t rows_all = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows_all * chunks) return;
  const int64_t cell = idx / chunks;
  const int c = static_cast<int>(idx - cell * chunks);
  const float* ws_o = reinterpret_cast<const float*>(p.workspace);
  const float* ws_l = ws_o + p.num_splits * rows_all * p.head_dim;

  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, ws_l[s * rows_all + cell]);
  const float m_use = m == -INFINITY ? 0.f : m;
  float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < p.num_splits; ++s) {
    const float wt = ex2(ws_l[s * rows_all + cell] - m_use);
    if (wt > 0.f) {  // an empty split contributes nothing (its partial is zeros anyway)
      const float4* src = reinterpret_cast<const float4*>(ws_o + (s * rows_all + cell) * p.head_dim + 8 * c);
      const float4 x = src[0], y = src[1];
      o[0] += wt * x.x; o[1] += wt * x.y; o[2] += wt * x.z; o[3] += wt * x.w;
      o[4] += wt * y.x; o[5] += wt * y.y; o[6] += wt * y.z; o[7] += wt * y.w;
      l += wt;
    }
  }
  const bool empty = !(l > 0.f);
  const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] *= inv;
  const int qi = static_cast<int>(cell % p.seqlen_q);
  const int64_t bh = cell / p.seqlen_q;
  const int h = static_cast<int>(bh % p.heads_q);
  const int64_t b = bh / p.heads_q;
  store8<T>(reinterpret_cast<T*>(p.out) + b * p.o_sb + qi * p.o_ss + h * p.o_sh + 8 * c, o);
  if (c == 0)
    reinterpret_cast<float*>(p.lse)[b * p.l_sb + h * p.l_sh + qi * p.l_ss] =
        empty ? -INFINITY : (m + __log2f(l)) * kLn2;
}

}  // namespace kern
}  // namespace prefixattn

// Causal multi-head self-attention, flash style: forward (own keys, or a KV cache that the
// kernel appends to), and the flash-attention-2 backward without float atomics.
//
// Layout (moekit-model's): qkv [B * S, 3 H hd] f32 or BF16 (widened exactly when loaded: all
// arithmetic is f32), each row query | key | value columns,
// head h at column h * hd of each third; out [B * S, H hd]; lse, delta [B, H, S]; caches
// [B, H, max_len, hd]. Query i of a sequence is at position start + i and sees keys
// 0 ..= start + i. Scores s = (q . k) * scale, scale = 1 / sqrt(hd) (passed by the host).
//
// Every kernel computes the same bits as moekit-attention's reference (crates/moekit-attention
// src/reference.rs), which spells out the same operation order: explicitly rounded operations
// (moekit/fmath.cuh: never contracted), moekit's exp, the reproducible log of
// moekit/attention/lse.cuh, and these fixed orders:
//  - dot(a, b) over hd: one sequential fma chain from +0, c = 0, 1, ..., hd - 1;
//  - keys in tiles of 32 at absolute positions 32 t .. 32 t + 31 (the same tiles for the own
//    keys and the cache, so a decode step equals the forward's row bit for bit); per tile and
//    query: tile max (exact), m' = max(m, tile max), p_j = exp(s_j - m'), the tile sum of the
//    32 p_j (invalid keys +0) by the butterfly warp sum (moekit-fmath `warp_sum`),
//    l = l * exp(m - m') + tile sum, acc = acc * exp(m - m') then acc = fma(p_j, v_j, acc) for
//    the tile's visible keys in order; finally out = acc / l, lse = m + log(l);
//  - backward: delta = warp sum of 32 lane partials (lane l: fma chain over c = l, l + 32, ...)
//    of dout * out; p = exp(s - lse), dp = dot(dout, v), ds = p * (dp - delta);
//    dv_j = fma chain over the queries i = j, j + 1, ..., S - 1 of p_ij dout_i;
//    dk_j = (same chain of ds_ij q_i) * scale; dq_i = (fma chain over j = 0 ..= i of
//    ds_ij k_j) * scale. Each dqkv element is written by exactly one thread: no atomics, the
//    same bits on every run and every block order.
//
// Mapping (SIMT v1, 4 warps per block, one block per (tile, sequence * head)):
//  - forward: 16 queries per block (warp w owns rows w, w + 4, w + 8, w + 12), K/V tiles of 32
//    keys in shared memory; lane j scores key j of the tile (q broadcast from shared memory,
//    K rows padded by one float), lane l accumulates output columns l, l + 32, ...;
//  - dkdv: one block per 32 keys; query tiles of BQ = 32 / 32 / 16 / 8 rows (hd chunks 1..4,
//    to stay in 48 KiB of static shared memory); phase A scores (key = lane, rows by warp) into
//    shared P and dS, phase B: warp w owns keys 8w .. 8w + 7, lane l columns l, l + 32, ...;
//  - dq: one block per BQ queries; per key tile, warp w scores its own rows (key = lane) into
//    shared dS (a __syncwarp suffices) and accumulates dq of those rows, lane = column.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// No hardware exp2/log2 approximation (moekit's exp and log are polynomials).
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_attn_fwd_c2 require SHFL
// Occupancy floors (static shared memory per block: at most 41600 B forward, 43392 B backward).
// moekit-budget: moekit_attn_fwd_* threads=128 blocks_per_sm>=3
// moekit-budget: moekit_attn_bwd_dkdv_* threads=128 blocks_per_sm>=3
// moekit-budget: moekit_attn_bwd_dq_* threads=128 blocks_per_sm>=3
// moekit-budget: moekit_attn_bwd_prep threads=128 blocks_per_sm>=8

#include "moekit/abi.h"
#include "moekit/attention/lse.cuh"
#include "moekit/convert.cuh"
#include "moekit/fmath.cuh"

namespace {

namespace fm = ::moekit::fm;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeyTile = 32;  // keys per tile (one per lane when scoring)
constexpr int kFwdRows = 16;  // queries per forward block
constexpr int kRowsPerWarp = kFwdRows / kWarps;
constexpr unsigned kFull = 0xffffffffu;

// Queries per backward tile for `NC` column chunks (hd <= 32 NC): what keeps the backward's
// shared memory within 48 KiB. moekit-attention `raw::bwd_rows` spells the same table.
template <int NC>
struct BwdRows {
  static constexpr int value = NC <= 2 ? 32 : (NC == 3 ? 16 : 8);
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

// Butterfly warp sum, partner 16 lanes apart first (moekit-fmath `warp_sum`).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fm::add(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Warp max; exact in any order (inputs are numbers or -inf).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Element `i` of qkv, f32 or bf16 (widened exactly): everything after the load is f32.
__device__ __forceinline__ float ld_qkv(uint64_t base, int32_t dtype, size_t i) {
  if (dtype == MOEKIT_ATTN_BF16) return ::moekit::bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
  return reinterpret_cast<const float*>(base)[i];
}

// sum_c a[c] b[c], one fma chain from +0 in c order.
__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int c = 0; c < n; ++c) acc = fm::fma(a[c], b[c], acc);
  return acc;
}

// ---- forward ---------------------------------------------------------------------------------

template <int NC>
__device__ __forceinline__ void attn_forward(const MoekitAttnParams& p) {
  constexpr int HP = 32 * NC;
  __shared__ float q_s[kFwdRows][HP];
  __shared__ float k_s[kKeyTile][HP + 1];  // padded: lane j reads row j, conflict-free
  __shared__ float v_s[kKeyTile][HP];
  __shared__ float p_s[kWarps][kKeyTile];

  const int hd = p.head_dim, heads = p.heads, seq = p.seq, start = p.start;
  const size_t d = static_cast<size_t>(heads) * hd;
  const size_t stride = 3 * d;
  const int bh = blockIdx.y;
  const int b = bh / heads, h = bh % heads;
  const int q0 = blockIdx.x * kFwdRows;
  const int rows = imin(kFwdRows, seq - q0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool cached = p.k_cache != 0;

  const size_t qoff = static_cast<size_t>(b) * seq * stride + h * hd;  // element offset in qkv
  float* kc = reinterpret_cast<float*>(p.k_cache);
  float* vc = reinterpret_cast<float*>(p.v_cache);
  const size_t cache_head = static_cast<size_t>(bh) * p.max_len;

  // Queries of the block; with a cache, this block's own keys and values are appended (the
  // tiles below read positions >= start from qkv, so no block waits for another's writes).
  for (int idx = tid; idx < rows * hd; idx += kThreads) {
    const int r = idx / hd, c = idx % hd;
    const size_t src = qoff + static_cast<size_t>(q0 + r) * stride + c;
    q_s[r][c] = ld_qkv(p.qkv, p.qkv_dtype, src);
    if (cached) {
      const size_t dst = (cache_head + start + q0 + r) * hd + c;
      kc[dst] = ld_qkv(p.qkv, p.qkv_dtype, src + d);
      vc[dst] = ld_qkv(p.qkv, p.qkv_dtype, src + 2 * d);
    }
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
#pragma unroll
    for (int n = 0; n < NC; ++n) acc[r][n] = 0.0f;
  }

  const int last_pos = start + q0 + rows - 1;
  const int tiles = last_pos / kKeyTile + 1;
  for (int kt = 0; kt < tiles; ++kt) {
    __syncthreads();  // the previous tile is consumed (and, first, the queries are loaded)
    for (int idx = tid; idx < kKeyTile * hd; idx += kThreads) {
      const int j = idx / hd, c = idx % hd;
      const int pos = kt * kKeyTile + j;
      float kv = 0.0f, vv = 0.0f;
      if (pos <= last_pos) {
        if (pos < start) {
          const size_t src = (cache_head + pos) * hd + c;
          kv = kc[src];
          vv = vc[src];
        } else {
          const size_t src = qoff + static_cast<size_t>(pos - start) * stride + c;
          kv = ld_qkv(p.qkv, p.qkv_dtype, src + d);
          vv = ld_qkv(p.qkv, p.qkv_dtype, src + 2 * d);
        }
      }
      k_s[j][c] = kv;
      v_s[j][c] = vv;
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp + kWarps * r;
      if (row >= rows) continue;  // warp-uniform
      const int nvalid = imin(kKeyTile, start + q0 + row + 1 - kt * kKeyTile);
      if (nvalid <= 0) continue;  // warp-uniform: the tile is after this query
      float s = neg_inf();
      if (lane < nvalid) s = fm::mul(dot(q_s[row], k_s[lane], hd), p.scale);
      const float mnew = fmaxf(m[r], warp_max(s));
      const float pj = fm::exp(fm::sub(s, mnew));  // invalid keys: exp(-inf) = +0
      const float tsum = warp_sum(pj);
      const float alpha = fm::exp(fm::sub(m[r], mnew));  // first tile: exp(-inf) = 0
      l[r] = fm::add(fm::mul(l[r], alpha), tsum);
      m[r] = mnew;
      p_s[warp][lane] = pj;
      __syncwarp();
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = lane + 32 * n;
        if (c < hd) {
          float a = fm::mul(acc[r][n], alpha);
          for (int j = 0; j < nvalid; ++j) a = fm::fma(p_s[warp][j], v_s[j][c], a);
          acc[r][n] = a;
        }
      }
      __syncwarp();
    }
  }

  float* out = reinterpret_cast<float*>(p.out) + static_cast<size_t>(b) * seq * d + h * hd;
  float* lse = reinterpret_cast<float*>(p.lse) + static_cast<size_t>(bh) * seq;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp + kWarps * r;
    if (row >= rows) continue;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + 32 * n;
      if (c < hd) out[static_cast<size_t>(q0 + row) * d + c] = fm::div(acc[r][n], l[r]);
    }
    if (lane == 0) lse[q0 + row] = fm::add(m[r], ::moekit::attn::log_pos(l[r]));
  }
}

// ---- backward ----------------------------------------------------------------------------------

// delta[b, h, t] = sum_c dout * out: one warp per (row, head).
__device__ __forceinline__ void attn_bwd_prep(const MoekitAttnBwdParams& p) {
  const int heads = p.heads, hd = p.head_dim, seq = p.seq;
  const size_t d = static_cast<size_t>(heads) * hd;
  const size_t pairs = static_cast<size_t>(p.batch) * seq * heads;
  const size_t idx = static_cast<size_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (idx >= pairs) return;  // the whole warp
  const size_t row = idx / heads;  // b * seq + t
  const int h = static_cast<int>(idx % heads);
  const float* go = reinterpret_cast<const float*>(p.dout) + row * d + h * hd;
  const float* o = reinterpret_cast<const float*>(p.out) + row * d + h * hd;
  float part = 0.0f;
  for (int c = lane; c < hd; c += 32) part = fm::fma(go[c], o[c], part);
  const float sum = warp_sum(part);
  if (lane == 0) {
    const size_t b = row / seq, t = row % seq;
    reinterpret_cast<float*>(p.delta)[(b * heads + h) * seq + t] = sum;
  }
}

// Loads rows [i0, i0 + n) of hd columns from `base` (f32 or bf16 by `dtype`; element
// `off + row * stride + c`: a third of a head's qkv columns, or dout) into `dst` (row length
// `ld`); rows n .. cap are zero.
__device__ __forceinline__ void load_rows(float* dst, int ld, int cap, uint64_t base, int32_t dtype, size_t off,
                                          size_t stride, int i0, int n, int hd) {
  for (int idx = threadIdx.x; idx < cap * hd; idx += kThreads) {
    const int r = idx / hd, c = idx % hd;
    dst[r * ld + c] = r < n ? ld_qkv(base, dtype, off + static_cast<size_t>(i0 + r) * stride + c) : 0.0f;
  }
}

// ds (and p) of query `i` (shared row r) and key `j` (shared row lane): the formula both
// backward passes share, so that they agree bit for bit.
struct ScoreGrad {
  float p, ds;
};
__device__ __forceinline__ ScoreGrad score_grad(const float* q, const float* go, const float* k, const float* v,
                                                float lse, float delta, float scale, int hd) {
  const float s = fm::mul(dot(q, k, hd), scale);
  const float pr = fm::exp(fm::sub(s, lse));
  const float dp = dot(go, v, hd);
  return {pr, fm::mul(pr, fm::sub(dp, delta))};
}

// dk, dv of one tile of 32 keys, iterating over the query tiles from the key tile's diagonal.
template <int NC>
__device__ __forceinline__ void attn_bwd_dkdv(const MoekitAttnBwdParams& p) {
  constexpr int HP = 32 * NC;
  constexpr int BQ = BwdRows<NC>::value;
  constexpr int KPW = kKeyTile / kWarps;  // keys per warp in phase B
  __shared__ float k_s[kKeyTile][HP + 1];
  __shared__ float v_s[kKeyTile][HP + 1];
  __shared__ float q_s[BQ][HP];
  __shared__ float do_s[BQ][HP];
  __shared__ float p_s[BQ][kKeyTile + 1];
  __shared__ float ds_s[BQ][kKeyTile + 1];
  __shared__ float lse_s[BQ];
  __shared__ float delta_s[BQ];

  const int hd = p.head_dim, heads = p.heads, seq = p.seq;
  const size_t d = static_cast<size_t>(heads) * hd;
  const size_t stride = 3 * d;
  const int bh = blockIdx.y;
  const int b = bh / heads, h = bh % heads;
  const int j0 = blockIdx.x * kKeyTile;
  const int nkeys = imin(kKeyTile, seq - j0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const size_t qoff = static_cast<size_t>(b) * seq * stride + h * hd;  // element offsets
  const size_t doff = static_cast<size_t>(b) * seq * d + h * hd;
  const float* lse = reinterpret_cast<const float*>(p.lse) + static_cast<size_t>(bh) * seq;
  const float* delta = reinterpret_cast<const float*>(p.delta) + static_cast<size_t>(bh) * seq;

  load_rows(&k_s[0][0], HP + 1, kKeyTile, p.qkv, p.qkv_dtype, qoff + d, stride, j0, nkeys, hd);
  load_rows(&v_s[0][0], HP + 1, kKeyTile, p.qkv, p.qkv_dtype, qoff + 2 * d, stride, j0, nkeys, hd);

  float dk[KPW][NC], dv[KPW][NC];
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
#pragma unroll
    for (int n = 0; n < NC; ++n) dk[kk][n] = dv[kk][n] = 0.0f;
  }

  for (int i0 = (j0 / BQ) * BQ; i0 < seq; i0 += BQ) {
    const int nrows = imin(BQ, seq - i0);
    __syncthreads();  // the previous query tile is consumed
    load_rows(&q_s[0][0], HP, BQ, p.qkv, p.qkv_dtype, qoff, stride, i0, nrows, hd);
    load_rows(&do_s[0][0], HP, BQ, p.dout, MOEKIT_ATTN_F32, doff, d, i0, nrows, hd);
    if (tid < nrows) {
      lse_s[tid] = lse[i0 + tid];
      delta_s[tid] = delta[i0 + tid];
    }
    __syncthreads();
    // Phase A: key = lane, rows warp, warp + 4, ...
    for (int r = warp; r < BQ; r += kWarps) {
      ScoreGrad g = {0.0f, 0.0f};
      if (r < nrows && lane < nkeys && j0 + lane <= i0 + r) {
        g = score_grad(q_s[r], do_s[r], k_s[lane], v_s[lane], lse_s[r], delta_s[r], p.scale, hd);
      }
      p_s[r][lane] = g.p;
      ds_s[r][lane] = g.ds;
    }
    __syncthreads();
    // Phase B: keys 8 warp .. 8 warp + 7, columns lane, lane + 32, ...; queries in order.
    for (int r = 0; r < nrows; ++r) {
      const int i = i0 + r;
      float gq[NC], gd[NC];
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = lane + 32 * n;
        gq[n] = c < hd ? q_s[r][c] : 0.0f;
        gd[n] = c < hd ? do_s[r][c] : 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < KPW; ++kk) {
        const int jl = warp * KPW + kk;
        if (jl >= nkeys || j0 + jl > i) continue;  // warp-uniform
        const float pr = p_s[r][jl], ds = ds_s[r][jl];
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          dv[kk][n] = fm::fma(pr, gd[n], dv[kk][n]);
          dk[kk][n] = fm::fma(ds, gq[n], dk[kk][n]);
        }
      }
    }
  }

  float* g = reinterpret_cast<float*>(p.dqkv) + static_cast<size_t>(b) * seq * stride + h * hd;
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int jl = warp * KPW + kk;
    if (jl >= nkeys) continue;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + 32 * n;
      if (c < hd) {
        float* row = g + static_cast<size_t>(j0 + jl) * stride + c;
        row[d] = fm::mul(dk[kk][n], p.scale);
        row[2 * d] = dv[kk][n];
      }
    }
  }
}

// dq of one tile of BQ queries, iterating over the key tiles up to the diagonal.
template <int NC>
__device__ __forceinline__ void attn_bwd_dq(const MoekitAttnBwdParams& p) {
  constexpr int HP = 32 * NC;
  constexpr int BQ = BwdRows<NC>::value;
  constexpr int RPW = BQ / kWarps;  // rows per warp
  __shared__ float k_s[kKeyTile][HP + 1];
  __shared__ float v_s[kKeyTile][HP + 1];
  __shared__ float q_s[BQ][HP];
  __shared__ float do_s[BQ][HP];
  __shared__ float ds_s[BQ][kKeyTile + 1];
  __shared__ float lse_s[BQ];
  __shared__ float delta_s[BQ];

  const int hd = p.head_dim, heads = p.heads, seq = p.seq;
  const size_t d = static_cast<size_t>(heads) * hd;
  const size_t stride = 3 * d;
  const int bh = blockIdx.y;
  const int b = bh / heads, h = bh % heads;
  const int i0 = blockIdx.x * BQ;
  const int nrows = imin(BQ, seq - i0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const size_t qoff = static_cast<size_t>(b) * seq * stride + h * hd;  // element offsets
  const size_t doff = static_cast<size_t>(b) * seq * d + h * hd;
  const float* lse = reinterpret_cast<const float*>(p.lse) + static_cast<size_t>(bh) * seq;
  const float* delta = reinterpret_cast<const float*>(p.delta) + static_cast<size_t>(bh) * seq;

  load_rows(&q_s[0][0], HP, BQ, p.qkv, p.qkv_dtype, qoff, stride, i0, nrows, hd);
  load_rows(&do_s[0][0], HP, BQ, p.dout, MOEKIT_ATTN_F32, doff, d, i0, nrows, hd);
  if (tid < nrows) {
    lse_s[tid] = lse[i0 + tid];
    delta_s[tid] = delta[i0 + tid];
  }
  float dq[RPW][NC];
#pragma unroll
  for (int t = 0; t < RPW; ++t) {
#pragma unroll
    for (int n = 0; n < NC; ++n) dq[t][n] = 0.0f;
  }

  const int tiles = (i0 + nrows - 1) / kKeyTile + 1;
  for (int kt = 0; kt < tiles; ++kt) {
    const int j0 = kt * kKeyTile;
    const int nkeys = imin(kKeyTile, seq - j0);
    __syncthreads();  // the previous key tile is consumed (and, first, the queries are loaded)
    load_rows(&k_s[0][0], HP + 1, kKeyTile, p.qkv, p.qkv_dtype, qoff + d, stride, j0, nkeys, hd);
    load_rows(&v_s[0][0], HP + 1, kKeyTile, p.qkv, p.qkv_dtype, qoff + 2 * d, stride, j0, nkeys, hd);
    __syncthreads();
    // Phase A: this warp's rows (key = lane) into ds_s; invisible pairs are +0 (never read).
    for (int r = warp; r < nrows; r += kWarps) {
      float ds = 0.0f;
      if (j0 + lane <= i0 + r && lane < nkeys) {
        ds = score_grad(q_s[r], do_s[r], k_s[lane], v_s[lane], lse_s[r], delta_s[r], p.scale, hd).ds;
      }
      ds_s[r][lane] = ds;
    }
    __syncwarp();
    // Phase B: the same rows, keys of the tile up to the diagonal in order.
#pragma unroll
    for (int t = 0; t < RPW; ++t) {
      const int r = warp + kWarps * t;
      const int nvalid = imin(nkeys, i0 + r + 1 - j0);
      if (r >= nrows || nvalid <= 0) continue;  // warp-uniform
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = lane + 32 * n;
        if (c < hd) {
          float a = dq[t][n];
          for (int j = 0; j < nvalid; ++j) a = fm::fma(ds_s[r][j], k_s[j][c], a);
          dq[t][n] = a;
        }
      }
    }
  }

  float* g = reinterpret_cast<float*>(p.dqkv) + static_cast<size_t>(b) * seq * stride + h * hd;
#pragma unroll
  for (int t = 0; t < RPW; ++t) {
    const int r = warp + kWarps * t;
    if (r >= nrows) continue;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + 32 * n;
      if (c < hd) g[static_cast<size_t>(i0 + r) * stride + c] = fm::mul(dq[t][n], p.scale);
    }
  }
}

}  // namespace

// One variant per column chunk count NC = ceil(hd / 32).
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_fwd_c1(const MoekitAttnParams p) { attn_forward<1>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dkdv_c1(const MoekitAttnBwdParams p) { attn_bwd_dkdv<1>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dq_c1(const MoekitAttnBwdParams p) { attn_bwd_dq<1>(p); }

extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_fwd_c2(const MoekitAttnParams p) { attn_forward<2>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dkdv_c2(const MoekitAttnBwdParams p) { attn_bwd_dkdv<2>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dq_c2(const MoekitAttnBwdParams p) { attn_bwd_dq<2>(p); }

extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_fwd_c3(const MoekitAttnParams p) { attn_forward<3>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dkdv_c3(const MoekitAttnBwdParams p) { attn_bwd_dkdv<3>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dq_c3(const MoekitAttnBwdParams p) { attn_bwd_dq<3>(p); }

extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_fwd_c4(const MoekitAttnParams p) { attn_forward<4>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dkdv_c4(const MoekitAttnBwdParams p) { attn_bwd_dkdv<4>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_dq_c4(const MoekitAttnBwdParams p) { attn_bwd_dq<4>(p); }
extern "C" __global__ void __launch_bounds__(kThreads) moekit_attn_bwd_prep(const MoekitAttnBwdParams p) {
  attn_bwd_prep(p);
}

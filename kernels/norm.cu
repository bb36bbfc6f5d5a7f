// The transformer's elementwise and row-wise layers: token embedding (gather and its
// deterministic gradient), RMSNorm (optionally fused with the residual add) forward and
// backward, residual add, RoPE forward and backward, and the id range check they share.
//
// Every kernel computes the same bits as moekit-norm's CPU reference: only correctly rounded
// IEEE operations spelled out through moekit/fmath.cuh (no contraction), and each sum has one
// fixed order that the reference spells out:
//  - RMSNorm statistics (one warp per row): element c belongs to lane (c / 4) % 32, each lane
//    sums its elements in increasing c with an fma, then the warp butterfly (partner 16 first).
//    The same order whether the row is read with 16-byte loads or with scalar loads.
//  - RMSNorm dg: fixed blocks of 64 rows, each summed in row order, then the blocks in order
//    (the model's CPU order, moekit-model `layers::rmsnorm_backward`).
//  - Embedding gradient: a stable counting sort of the token positions by id (chunk counts,
//    a column scan, an offset scan, a scatter by rank inside the chunk), then one block per
//    id sums its rows in increasing position. No float atomics: the same bits on every run,
//    equal to the sequential reference.
// Ids outside their range are never dereferenced: the embedding writes a zero row, its
// gradient skips them, RoPE leaves the row unrotated; `moekit_norm_check_ids` writes the
// status (count, first position) that the host reads when it wants a typed error.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_rmsnorm_fwd require LDG.E.128 SHFL
// moekit-sass: moekit_embed_fwd require LDG.E.128
// moekit-sass: moekit_rope require LDG.E.128
// Memory-bound kernels: occupancy floors (threads resident per SM) the design assumes.
// moekit-budget: moekit_rmsnorm_fwd threads=256 blocks_per_sm>=4
// moekit-budget: moekit_rmsnorm_bwd threads=256 blocks_per_sm>=4
// moekit-budget: moekit_rmsnorm_bwd_dg threads=256 blocks_per_sm>=8
// moekit-budget: moekit_embed_fwd threads=256 blocks_per_sm>=8
// moekit-budget: moekit_embed_bwd_sum threads=128 blocks_per_sm>=8
// moekit-budget: moekit_rope threads=256 blocks_per_sm>=8
// moekit-budget: moekit_add threads=256 blocks_per_sm>=8
// moekit-budget: moekit_embed_bwd_scatter regs<=40
// moekit-budget: moekit_embed_bwd_count regs<=40

#include "moekit/abi.h"
#include "moekit/fmath.cuh"

#ifdef MOEKIT_EMULATION
#include <cmath>
#endif

namespace {

namespace fm = moekit::fm;

constexpr unsigned kFull = 0xffffffffu;
// Tokens per chunk of the embedding gradient's counting sort (= threads of its blocks).
constexpr int kChunk = 256;
// Rows per block of the RMSNorm backward (its dg partial sums).
constexpr int kNormBwdRows = 64;

// Correctly rounded square root (IEEE): the same bits on every device and in Rust's f32::sqrt.
#ifdef MOEKIT_EMULATION
inline float sqrt_rn(float x) { return std::sqrt(x); }
#else
__device__ __forceinline__ float sqrt_rn(float x) { return __fsqrt_rn(x); }
#endif

// f32 -> BF16 bits, round to nearest even; every NaN -> 0x7fc0 (moekit-norm's `to_bf16`).
__device__ __forceinline__ uint16_t to_bf16(float x) {
  const uint32_t b = __float_as_uint(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fm::add(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ bool aligned16(uint64_t a) { return (a & 15u) == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Id range check: status[0] = ids outside [0, bound), status[1] = the first such position or -1.
// One block; integer counts and a min, so the result does not depend on the schedule.

extern "C" __global__ void __launch_bounds__(256) moekit_norm_check_ids(const MoekitIdsCheckParams p) {
  __shared__ int s_bad[256];
  __shared__ long long s_first[256];
  const auto* ids = reinterpret_cast<const int32_t*>(p.ids);
  int bad = 0;
  long long first = -1;
  for (uint64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
    const int32_t v = __ldg(&ids[i]);
    if (v < 0 || v >= p.bound) {
      ++bad;
      if (first < 0) first = static_cast<long long>(i);
    }
  }
  s_bad[threadIdx.x] = bad;
  s_first[threadIdx.x] = first;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s_bad[threadIdx.x] += s_bad[threadIdx.x + s];
      const long long o = s_first[threadIdx.x + s];
      const long long m = s_first[threadIdx.x];
      if (o >= 0 && (m < 0 || o < m)) s_first[threadIdx.x] = o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    auto* status = reinterpret_cast<int32_t*>(p.status);
    status[0] = s_bad[0];
    status[1] = static_cast<int32_t>(s_first[0]);
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding forward: out[t, :] = table[ids[t], :] (a zero row for an id outside [0, vocab)).
// One warp per token row (grid-stride over rows); 16-byte loads and stores when the row
// starts of table and out are 16-byte aligned (dim % 4 == 0 and aligned bases).

extern "C" __global__ void __launch_bounds__(256) moekit_embed_fwd(const MoekitEmbedParams p) {
  const auto* table = reinterpret_cast<const float*>(p.table);
  const auto* ids = reinterpret_cast<const int32_t*>(p.ids);
  const int lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t dim = static_cast<uint64_t>(p.dim);
  const bool bf16 = p.out_dtype == MOEKIT_NORM_BF16;
  const bool vec = (dim & 3u) == 0 && aligned16(p.table) && aligned16(p.out) && (bf16 ? (dim & 7u) == 0 : true);
  for (uint64_t t = warp; t < p.tokens; t += warps) {
    const int32_t id = __ldg(&ids[t]);
    const bool ok = id >= 0 && id < p.vocab;
    const float* src = table + static_cast<uint64_t>(ok ? id : 0) * dim;
    if (vec) {
      const auto* src4 = reinterpret_cast<const float4*>(src);
      for (uint64_t q = lane; q < dim / 4; q += 32) {
        const float4 v = ok ? __ldg(&src4[q]) : make_float4(0.f, 0.f, 0.f, 0.f);
        if (bf16) {
          auto* o = reinterpret_cast<uint2*>(reinterpret_cast<uint16_t*>(p.out) + t * dim);
          o[q] = make_uint2(static_cast<uint32_t>(to_bf16(v.x)) | (static_cast<uint32_t>(to_bf16(v.y)) << 16),
                            static_cast<uint32_t>(to_bf16(v.z)) | (static_cast<uint32_t>(to_bf16(v.w)) << 16));
        } else {
          reinterpret_cast<float4*>(reinterpret_cast<float*>(p.out) + t * dim)[q] = v;
        }
      }
    } else {
      for (uint64_t c = lane; c < dim; c += 32) {
        const float v = ok ? __ldg(&src[c]) : 0.0f;
        if (bf16) {
          reinterpret_cast<uint16_t*>(p.out)[t * dim + c] = to_bf16(v);
        } else {
          reinterpret_cast<float*>(p.out)[t * dim + c] = v;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding backward, five launches over the same params (the host runs them in order):
//  count   (grid = chunks): chunk_counts[c, v] = tokens of chunk c with id v;
//  columns (grid over v):   chunk_counts[c, v] = exclusive prefix over chunks; offsets[v] = total;
//  offsets (one block):     offsets = exclusive scan of the totals, offsets[vocab] = valid tokens;
//  scatter (grid = chunks): order[offsets[v] + chunk_counts[c, v] + rank of t in its chunk] = t,
//                           so each id's positions are in increasing order (a stable sort);
//  sum     (grid over v):   grad_table[v, :] = (accumulate ? grad_table[v, :] : 0) + the rows of
//                           grad_out at order[offsets[v] .. offsets[v + 1]], in that order.

extern "C" __global__ void __launch_bounds__(kChunk) moekit_embed_bwd_count(const MoekitEmbedBackwardParams p) {
  auto* counts = reinterpret_cast<int32_t*>(p.chunk_counts) + static_cast<uint64_t>(blockIdx.x) * p.vocab;
  for (int v = threadIdx.x; v < p.vocab; v += blockDim.x) counts[v] = 0;
  __syncthreads();
  const uint64_t t = static_cast<uint64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (t < p.tokens) {
    const int32_t id = __ldg(&reinterpret_cast<const int32_t*>(p.ids)[t]);
    // Integer atomics into this block's own row: the final counts do not depend on their order.
    if (id >= 0 && id < p.vocab) atomicAdd(&counts[id], 1);
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_embed_bwd_columns(const MoekitEmbedBackwardParams p) {
  auto* counts = reinterpret_cast<int32_t*>(p.chunk_counts);
  auto* offsets = reinterpret_cast<int32_t*>(p.offsets);
  for (uint64_t v = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < static_cast<uint64_t>(p.vocab);
       v += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    int32_t running = 0;
    for (int c = 0; c < p.chunks; ++c) {
      int32_t* slot = &counts[static_cast<uint64_t>(c) * p.vocab + v];
      const int32_t n = *slot;
      *slot = running;
      running += n;
    }
    offsets[v] = running;
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_embed_bwd_offsets(const MoekitEmbedBackwardParams p) {
  __shared__ int32_t s[256];
  auto* offsets = reinterpret_cast<int32_t*>(p.offsets);
  int32_t carry = 0;
  for (int base = 0; base < p.vocab; base += 256) {
    const int v = base + static_cast<int>(threadIdx.x);
    const int32_t own = v < p.vocab ? offsets[v] : 0;
    s[threadIdx.x] = own;
    __syncthreads();
    // Inclusive Hillis-Steele scan in shared memory (integers: any order gives the same sums).
    for (int off = 1; off < 256; off <<= 1) {
      const int32_t add = threadIdx.x >= static_cast<unsigned>(off) ? s[threadIdx.x - off] : 0;
      __syncthreads();
      s[threadIdx.x] += add;
      __syncthreads();
    }
    if (v < p.vocab) offsets[v] = carry + s[threadIdx.x] - own;
    carry += s[255];
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[p.vocab] = carry;
}

extern "C" __global__ void __launch_bounds__(kChunk) moekit_embed_bwd_scatter(const MoekitEmbedBackwardParams p) {
  __shared__ int32_t s_ids[kChunk];
  const uint64_t base = static_cast<uint64_t>(blockIdx.x) * kChunk;
  const uint64_t t = base + threadIdx.x;
  const int32_t id = t < p.tokens ? __ldg(&reinterpret_cast<const int32_t*>(p.ids)[t]) : -1;
  s_ids[threadIdx.x] = id;
  __syncthreads();
  if (id < 0 || id >= p.vocab) return;
  int32_t rank = 0;
  for (unsigned j = 0; j < threadIdx.x; ++j) rank += s_ids[j] == id;
  const int32_t before = reinterpret_cast<const int32_t*>(p.chunk_counts)[static_cast<uint64_t>(blockIdx.x) * p.vocab + id];
  const int32_t start = reinterpret_cast<const int32_t*>(p.offsets)[id];
  reinterpret_cast<int32_t*>(p.order)[start + before + rank] = static_cast<int32_t>(t);
}

extern "C" __global__ void __launch_bounds__(128) moekit_embed_bwd_sum(const MoekitEmbedBackwardParams p) {
  const auto* offsets = reinterpret_cast<const int32_t*>(p.offsets);
  const auto* order = reinterpret_cast<const int32_t*>(p.order);
  const auto* dout = reinterpret_cast<const float*>(p.grad_out);
  auto* grad = reinterpret_cast<float*>(p.grad_table);
  const uint64_t dim = static_cast<uint64_t>(p.dim);
  const bool vec = (dim & 3u) == 0 && aligned16(p.grad_out) && aligned16(p.grad_table);
  // 32-bit loop counters (vocab and blocks are int32): a 64-bit one was spilled to the stack.
  for (int v = blockIdx.x; v < p.vocab; v += gridDim.x) {
    const int32_t start = offsets[v];
    const int32_t end = offsets[v + 1];
    float* row = grad + static_cast<uint64_t>(v) * dim;
    if (vec) {
      for (uint64_t q = threadIdx.x; q < dim / 4; q += blockDim.x) {
        float4 acc = p.accumulate ? reinterpret_cast<const float4*>(row)[q] : make_float4(0.f, 0.f, 0.f, 0.f);
        for (int32_t i = start; i < end; ++i) {
          const float4 d = __ldg(&reinterpret_cast<const float4*>(dout + static_cast<uint64_t>(order[i]) * dim)[q]);
          acc = make_float4(fm::add(acc.x, d.x), fm::add(acc.y, d.y), fm::add(acc.z, d.z), fm::add(acc.w, d.w));
        }
        reinterpret_cast<float4*>(row)[q] = acc;
      }
    } else {
      for (uint64_t c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = p.accumulate ? row[c] : 0.0f;
        for (int32_t i = start; i < end; ++i) acc = fm::add(acc, __ldg(&dout[static_cast<uint64_t>(order[i]) * dim + c]));
        row[c] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm forward, one warp per row (grid-stride): x' = x (+ residual, written to sum_out),
// s = the lane-order sum of x'^2, inv = 1 / sqrt(s / dim + eps), y = (x' * inv) * g.

namespace {

// The row's x' at element c (x, or x + residual).
struct NormRow {
  const float* x;
  const float* r;  // or nullptr
  __device__ __forceinline__ float at(uint64_t c) const {
    return r ? fm::add(__ldg(&x[c]), __ldg(&r[c])) : __ldg(&x[c]);
  }
  __device__ __forceinline__ float4 at4(uint64_t q) const {
    float4 v = __ldg(&reinterpret_cast<const float4*>(x)[q]);
    if (r) {
      const float4 w = __ldg(&reinterpret_cast<const float4*>(r)[q]);
      v = make_float4(fm::add(v.x, w.x), fm::add(v.y, w.y), fm::add(v.z, w.z), fm::add(v.w, w.w));
    }
    return v;
  }
};

}  // namespace

extern "C" __global__ void __launch_bounds__(256) moekit_rmsnorm_fwd(const MoekitRmsNormParams p) {
  const int lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t dim = static_cast<uint64_t>(p.dim);
  const uint64_t quads = (dim + 3) / 4;
  const auto* g = reinterpret_cast<const float*>(p.weight);
  const bool bf16 = p.y_dtype == MOEKIT_NORM_BF16;
  const bool vec = (dim & 3u) == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.y) &&
                   (p.residual == 0 || (aligned16(p.residual) && aligned16(p.sum_out))) && (!bf16 || (dim & 7u) == 0);
  const float fdim = static_cast<float>(p.dim);
  for (uint64_t row = warp; row < p.rows; row += warps) {
    const NormRow xr{reinterpret_cast<const float*>(p.x) + row * dim,
                     p.residual ? reinterpret_cast<const float*>(p.residual) + row * dim : nullptr};
    float* sum_out = p.sum_out ? reinterpret_cast<float*>(p.sum_out) + row * dim : nullptr;
    float acc = 0.0f;
    if (vec) {
      for (uint64_t q = lane; q < quads; q += 32) {
        const float4 v = xr.at4(q);
        acc = fm::fma(v.x, v.x, acc);
        acc = fm::fma(v.y, v.y, acc);
        acc = fm::fma(v.z, v.z, acc);
        acc = fm::fma(v.w, v.w, acc);
        if (sum_out) reinterpret_cast<float4*>(sum_out)[q] = v;
      }
    } else {
      for (uint64_t q = lane; q < quads; q += 32) {
        for (uint64_t c = 4 * q; c < 4 * q + 4 && c < dim; ++c) {
          const float v = xr.at(c);
          acc = fm::fma(v, v, acc);
          if (sum_out) sum_out[c] = v;
        }
      }
    }
    const float inv = fm::rcp(sqrt_rn(fm::add(fm::div(warp_sum(acc), fdim), p.eps)));
    if (lane == 0) reinterpret_cast<float*>(p.inv_rms)[row] = inv;
    if (vec) {
      for (uint64_t q = lane; q < quads; q += 32) {
        const float4 v = xr.at4(q);
        const float4 w = __ldg(&reinterpret_cast<const float4*>(g)[q]);
        const float4 y = make_float4(fm::mul(fm::mul(v.x, inv), w.x), fm::mul(fm::mul(v.y, inv), w.y),
                                     fm::mul(fm::mul(v.z, inv), w.z), fm::mul(fm::mul(v.w, inv), w.w));
        if (bf16) {
          reinterpret_cast<uint2*>(reinterpret_cast<uint16_t*>(p.y) + row * dim)[q] =
              make_uint2(static_cast<uint32_t>(to_bf16(y.x)) | (static_cast<uint32_t>(to_bf16(y.y)) << 16),
                         static_cast<uint32_t>(to_bf16(y.z)) | (static_cast<uint32_t>(to_bf16(y.w)) << 16));
        } else {
          reinterpret_cast<float4*>(reinterpret_cast<float*>(p.y) + row * dim)[q] = y;
        }
      }
    } else {
      for (uint64_t c = lane; c < dim; c += 32) {
        const float y = fm::mul(fm::mul(xr.at(c), inv), __ldg(&g[c]));
        if (bf16) {
          reinterpret_cast<uint16_t*>(p.y)[row * dim + c] = to_bf16(y);
        } else {
          reinterpret_cast<float*>(p.y)[row * dim + c] = y;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm backward. One block per 64 rows (8 warps).
//  Phase A (warp per row): dot = lane-order sum of (dy * g) * x (fma), k = ((dot / dim) * inv)
//  * inv * inv.
//  Phase B (thread per column, rows in order): dx = (dy * g) * inv - x * k (+ grad_residual,
//  added first), and the block's dg partial = sum over its rows of (dy * x) * inv.
// Then moekit_rmsnorm_bwd_dg: dg[j] = (accumulate ? dg[j] : 0) + the partials in block order.

extern "C" __global__ void __launch_bounds__(256) moekit_rmsnorm_bwd(const MoekitRmsNormBackwardParams p) {
  __shared__ float s_k[kNormBwdRows];
  __shared__ float s_inv[kNormBwdRows];
  const uint64_t dim = static_cast<uint64_t>(p.dim);
  const uint64_t quads = (dim + 3) / 4;
  const auto* x = reinterpret_cast<const float*>(p.x);
  const auto* g = reinterpret_cast<const float*>(p.weight);
  const auto* dy = reinterpret_cast<const float*>(p.grad_y);
  const auto* ga = reinterpret_cast<const float*>(p.grad_residual);
  auto* dx = reinterpret_cast<float*>(p.grad_x);
  const bool vec = (dim & 3u) == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.grad_y) &&
                   aligned16(p.grad_x) && aligned16(p.partial) && (p.grad_residual == 0 || aligned16(p.grad_residual));
  const float fdim = static_cast<float>(p.dim);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  for (int blk = blockIdx.x; blk < p.blocks; blk += gridDim.x) {
    const uint64_t row0 = static_cast<uint64_t>(blk) * kNormBwdRows;
    const int nrows = static_cast<int>(p.rows - row0 < kNormBwdRows ? p.rows - row0 : kNormBwdRows);
    for (int r = warp; r < nrows; r += nwarps) {
      const uint64_t off = (row0 + r) * dim;
      float acc = 0.0f;
      if (vec) {
        for (uint64_t q = lane; q < quads; q += 32) {
          const float4 xv = __ldg(&reinterpret_cast<const float4*>(x + off)[q]);
          const float4 dv = __ldg(&reinterpret_cast<const float4*>(dy + off)[q]);
          const float4 gv = __ldg(&reinterpret_cast<const float4*>(g)[q]);
          acc = fm::fma(fm::mul(dv.x, gv.x), xv.x, acc);
          acc = fm::fma(fm::mul(dv.y, gv.y), xv.y, acc);
          acc = fm::fma(fm::mul(dv.z, gv.z), xv.z, acc);
          acc = fm::fma(fm::mul(dv.w, gv.w), xv.w, acc);
        }
      } else {
        for (uint64_t q = lane; q < quads; q += 32) {
          for (uint64_t c = 4 * q; c < 4 * q + 4 && c < dim; ++c) {
            acc = fm::fma(fm::mul(__ldg(&dy[off + c]), __ldg(&g[c])), __ldg(&x[off + c]), acc);
          }
        }
      }
      const float dot = warp_sum(acc);
      if (lane == 0) {
        const float inv = __ldg(&reinterpret_cast<const float*>(p.inv_rms)[row0 + r]);
        s_inv[r] = inv;
        s_k[r] = fm::mul(fm::mul(fm::mul(fm::div(dot, fdim), inv), inv), inv);
      }
    }
    __syncthreads();
    float* partial = reinterpret_cast<float*>(p.partial) + static_cast<uint64_t>(blk) * dim;
    if (vec) {
      for (uint64_t q = threadIdx.x; q < quads; q += blockDim.x) {
        const float4 gv = __ldg(&reinterpret_cast<const float4*>(g)[q]);
        float4 dg = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int r = 0; r < nrows; ++r) {
          const uint64_t off = (row0 + r) * dim;
          const float inv = s_inv[r], k = s_k[r];
          const float4 xv = __ldg(&reinterpret_cast<const float4*>(x + off)[q]);
          const float4 dv = __ldg(&reinterpret_cast<const float4*>(dy + off)[q]);
          float4 o = make_float4(fm::sub(fm::mul(fm::mul(dv.x, gv.x), inv), fm::mul(xv.x, k)),
                                 fm::sub(fm::mul(fm::mul(dv.y, gv.y), inv), fm::mul(xv.y, k)),
                                 fm::sub(fm::mul(fm::mul(dv.z, gv.z), inv), fm::mul(xv.z, k)),
                                 fm::sub(fm::mul(fm::mul(dv.w, gv.w), inv), fm::mul(xv.w, k)));
          if (ga) {
            const float4 a = __ldg(&reinterpret_cast<const float4*>(ga + off)[q]);
            o = make_float4(fm::add(a.x, o.x), fm::add(a.y, o.y), fm::add(a.z, o.z), fm::add(a.w, o.w));
          }
          reinterpret_cast<float4*>(dx + off)[q] = o;
          dg = make_float4(fm::add(dg.x, fm::mul(fm::mul(dv.x, xv.x), inv)),
                           fm::add(dg.y, fm::mul(fm::mul(dv.y, xv.y), inv)),
                           fm::add(dg.z, fm::mul(fm::mul(dv.z, xv.z), inv)),
                           fm::add(dg.w, fm::mul(fm::mul(dv.w, xv.w), inv)));
        }
        reinterpret_cast<float4*>(partial)[q] = dg;
      }
    } else {
      for (uint64_t c = threadIdx.x; c < dim; c += blockDim.x) {
        const float gv = __ldg(&g[c]);
        float dg = 0.0f;
        for (int r = 0; r < nrows; ++r) {
          const uint64_t off = (row0 + r) * dim;
          const float inv = s_inv[r];
          const float xv = __ldg(&x[off + c]);
          const float dv = __ldg(&dy[off + c]);
          float o = fm::sub(fm::mul(fm::mul(dv, gv), inv), fm::mul(xv, s_k[r]));
          if (ga) o = fm::add(__ldg(&ga[off + c]), o);
          dx[off + c] = o;
          dg = fm::add(dg, fm::mul(fm::mul(dv, xv), inv));
        }
        partial[c] = dg;
      }
    }
    __syncthreads();
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_rmsnorm_bwd_dg(const MoekitRmsNormBackwardParams p) {
  const auto* partial = reinterpret_cast<const float*>(p.partial);
  auto* dg = reinterpret_cast<float*>(p.grad_weight);
  const uint64_t dim = static_cast<uint64_t>(p.dim);
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < dim;
       c += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    float acc = p.accumulate ? dg[c] : 0.0f;
    for (int b = 0; b < p.blocks; ++b) acc = fm::add(acc, partial[static_cast<uint64_t>(b) * dim + c]);
    dg[c] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add: out = a + b (n f32; 16-byte accesses when all three are aligned).

extern "C" __global__ void __launch_bounds__(256) moekit_add(const MoekitAddParams p) {
  const auto* a = reinterpret_cast<const float*>(p.a);
  const auto* b = reinterpret_cast<const float*>(p.b);
  auto* out = reinterpret_cast<float*>(p.out);
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint64_t done = 0;
  if (aligned16(p.a) && aligned16(p.b) && aligned16(p.out)) {
    for (uint64_t q = tid; q < p.n / 4; q += stride) {
      const float4 u = __ldg(&reinterpret_cast<const float4*>(a)[q]);
      const float4 v = __ldg(&reinterpret_cast<const float4*>(b)[q]);
      reinterpret_cast<float4*>(out)[q] =
          make_float4(fm::add(u.x, v.x), fm::add(u.y, v.y), fm::add(u.z, v.z), fm::add(u.w, v.w));
    }
    done = p.n / 4 * 4;
  }
  for (uint64_t i = done + tid; i < p.n; i += stride) out[i] = fm::add(__ldg(&a[i]), __ldg(&b[i]));
}

// ---------------------------------------------------------------------------------------------
// RoPE (rotate-half pairs (i, i + half) of each head), in place on the first `heads` heads of
// every row: a' = a cos - b sin, b' = b cos + a sin (sin negated for the inverse). Row r uses
// position positions[r] (rows whose position is outside [0, max_pos) are left as they are).
// One thread per pair, or per 4 consecutive pairs (16-byte accesses) when half % 4 == 0 and
// x, the row stride and the tables allow it.

extern "C" __global__ void __launch_bounds__(256) moekit_rope(const MoekitRopeParams p) {
  auto* x = reinterpret_cast<float*>(p.x);
  const auto* pos = reinterpret_cast<const int32_t*>(p.positions);
  const auto* cs = reinterpret_cast<const float*>(p.cos);
  const auto* sn = reinterpret_cast<const float*>(p.sin);
  const uint64_t half = static_cast<uint64_t>(p.head_dim / 2);
  const uint64_t stride_row = static_cast<uint64_t>(p.row_stride);
  const uint64_t heads = static_cast<uint64_t>(p.heads);
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const bool vec = (half & 3u) == 0 && (stride_row & 3u) == 0 && aligned16(p.x) && aligned16(p.cos) && aligned16(p.sin);
  const uint64_t per = vec ? 4 : 1;
  const uint64_t units_per_head = half / per;
  const uint64_t units = p.rows * heads * units_per_head;
  for (uint64_t u = tid; u < units; u += stride) {
    const uint64_t row = u / (heads * units_per_head);
    const uint64_t rem = u - row * heads * units_per_head;
    const uint64_t h = rem / units_per_head;
    const uint64_t i = (rem - h * units_per_head) * per;
    const int32_t ps = __ldg(&pos[row]);
    if (ps < 0 || ps >= p.max_pos) continue;
    float* a = x + row * stride_row + h * 2 * half + i;
    float* b = a + half;
    const uint64_t t = static_cast<uint64_t>(ps) * half + i;
    if (vec) {
      const float4 av = *reinterpret_cast<const float4*>(a);
      const float4 bv = *reinterpret_cast<const float4*>(b);
      const float4 c = __ldg(reinterpret_cast<const float4*>(cs + t));
      float4 s = __ldg(reinterpret_cast<const float4*>(sn + t));
      if (p.inverse) s = make_float4(-s.x, -s.y, -s.z, -s.w);
      *reinterpret_cast<float4*>(a) = make_float4(fm::sub(fm::mul(av.x, c.x), fm::mul(bv.x, s.x)),
                                                  fm::sub(fm::mul(av.y, c.y), fm::mul(bv.y, s.y)),
                                                  fm::sub(fm::mul(av.z, c.z), fm::mul(bv.z, s.z)),
                                                  fm::sub(fm::mul(av.w, c.w), fm::mul(bv.w, s.w)));
      *reinterpret_cast<float4*>(b) = make_float4(fm::add(fm::mul(bv.x, c.x), fm::mul(av.x, s.x)),
                                                  fm::add(fm::mul(bv.y, c.y), fm::mul(av.y, s.y)),
                                                  fm::add(fm::mul(bv.z, c.z), fm::mul(av.z, s.z)),
                                                  fm::add(fm::mul(bv.w, c.w), fm::mul(av.w, s.w)));
    } else {
      const float av = *a, bv = *b;
      const float c = __ldg(&cs[t]);
      const float s = p.inverse ? -__ldg(&sn[t]) : __ldg(&sn[t]);
      *a = fm::sub(fm::mul(av, c), fm::mul(bv, s));
      *b = fm::add(fm::mul(bv, c), fm::mul(av, s));
    }
  }
}

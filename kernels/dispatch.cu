// Expert dispatch and combine: the stable dispatch layout (counts, aligned offsets, row map,
// m_indices), permutation with fused 1x128 FP8 quantization, the activation kernels used
// between the two expert GEMMs (FP8 quantization, SwiGLU (+ FP8), SwiGLU backward), and the
// deterministic weighted combine with its backward.
//
// Everything here is deterministic and matches moekit-dispatch's CPU reference bit for bit:
// rows inside an expert follow (token, slot) order (no atomics decide a position), sums run in
// a fixed order, and the arithmetic is explicitly rounded (moekit/fmath.cuh).
//
// Memory-bound kernels use one warp per token (or row), 16-byte accesses, and read each
// token once however many experts it goes to. Vector accesses need 16-byte aligned buffers
// (checked by moekit-dispatch's raw layer before every launch).
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_dispatch_permute@sm_90a require F2FP
// moekit-sass: moekit_act_swiglu@sm_90a require F2FP
// moekit-sass: moekit_dispatch_rows require MATCH
// Register budgets = the occupancy NOTES.md assumes (256-thread blocks: <= 64 registers for 4
// blocks per SM, <= 80 for 3, <= 128 for 2).
// moekit-budget: moekit_dispatch_permute regs<=64
// moekit-budget: moekit_combine_k1 regs<=64
// moekit-budget: moekit_combine_k2 regs<=64
// moekit-budget: moekit_combine_k4 regs<=64
// moekit-budget: moekit_combine_k6 regs<=64
// moekit-budget: moekit_combine_k8 regs<=80
// moekit-budget: moekit_combine_k16 regs<=128

#include "moekit/abi.h"
#include "moekit/convert.cuh"
#include "moekit/fmath.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kBlock = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxExperts = 1024;  // dispatch layout limit (host-checked)
constexpr int kMaxTopK = 16;       // host-checked
constexpr int kScanWarps = 32;     // dispatch_offsets: one warp per range of chunks
constexpr int kScanBlock = 32 * kScanWarps;

// ---- layout --------------------------------------------------------------------------------

__device__ __forceinline__ bool valid_id(int id, int experts) { return id >= 0 && id < experts; }

// Pair range of chunk c.
__device__ __forceinline__ void chunk_range(const MoekitDispatchLayoutParams& p, uint64_t c, uint64_t& begin,
                                            uint64_t& end) {
  const uint64_t pairs = p.tokens * static_cast<uint64_t>(p.top_k);
  begin = c * static_cast<uint64_t>(p.chunk_pairs);
  end = begin + p.chunk_pairs < pairs ? begin + p.chunk_pairs : pairs;
}

// Segment of row r: whether it holds a routed pair (not padding). `offsets` has E + 1 entries.
__device__ __forceinline__ bool is_routed_row(const int* offsets, const int* counts, int experts, int r) {
  if (r >= offsets[experts]) return false;
  int lo = 0, hi = experts;  // last e with offsets[e] <= r
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid;
  }
  return r - offsets[lo] < counts[lo];
}

// Copies offsets [E + 1] and counts [E] to shared memory (padding checks then search there).
__device__ __forceinline__ void load_segments(const int* offsets, const int* counts, int experts, int* seg, int* cnt) {
  for (int e = threadIdx.x; e <= experts; e += kBlock) {
    seg[e] = offsets[e];
    if (e < experts) cnt[e] = counts[e];
  }
  __syncthreads();
}

// Rows [32 g, 32 g + 32) of a layout (segments in shared memory): bit i is set when row 32 g + i
// is padding inside a segment (below offsets[E] and max_rows, not among its segment's first
// counts[e] rows); with `tail`, also when it lies at or past offsets[E] (below max_rows).
// Warp-wide (a ballot): each lane searches its own row.
__device__ __forceinline__ unsigned padding_mask(const int* seg, const int* cnt, int experts, int max_rows, uint64_t g,
                                                 bool tail) {
  const uint64_t r = g * 32u + (threadIdx.x & 31);
  const bool in_range = r < static_cast<uint64_t>(max_rows) && (tail || r < static_cast<uint64_t>(seg[experts]));
  return __ballot_sync(kFull, in_range && !is_routed_row(seg, cnt, experts, static_cast<int>(r)));
}

// ---- FP8 tiles -----------------------------------------------------------------------------

struct TileScale {
  float scale;  // stored scale: x ~= q * scale
  float inv;    // multiplier applied before rounding to E4M3
};

// amax clamped to >= 1e-4; f32: scale = amax / 448, inv = 448 / amax; UE8M0: scale =
// 2^ceil(log2(amax / 448)) (from the bits of the f32 quotient), inv = 1 / scale exactly.
__device__ __forceinline__ TileScale tile_scale(float amax, int32_t quant) {
  const float a = amax > 1e-4f ? amax : 1e-4f;
  if (quant == MOEKIT_QUANT_FP8_UE8M0) {
    const uint32_t b = __float_as_uint(moekit::fm::div(a, 448.0f));
    const int e = static_cast<int>((b >> 23) & 0xffu) - 127 + ((b & 0x7fffffu) != 0u ? 1 : 0);
    return {moekit::fm::exp2i(e), moekit::fm::exp2i(-e)};
  }
  return {moekit::fm::div(a, 448.0f), moekit::fm::div(448.0f, a)};
}

__device__ __forceinline__ uint64_t scale_index(int32_t layout, int32_t stride, int groups, int row, int g) {
  return layout == MOEKIT_SCALES_MN_MAJOR ? static_cast<uint64_t>(g) * stride + row
                                          : static_cast<uint64_t>(row) * groups + g;
}

__device__ __forceinline__ void unpack_bf16x8(const uint4 w, float (&v)[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = moekit::bf16_bits_to_f32(static_cast<uint16_t>(words[i] & 0xffffu));
    v[2 * i + 1] = moekit::bf16_bits_to_f32(static_cast<uint16_t>(words[i] >> 16));
  }
}

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = static_cast<uint32_t>(f32_to_bf16_bits(v[2 * i])) | (static_cast<uint32_t>(f32_to_bf16_bits(v[2 * i + 1])) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint2 quantize8(const float (&v)[8], float inv) {
  uint32_t w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint16_t lo = moekit::f32x2_to_fp8x2(moekit::fm::mul(v[4 * i], inv), moekit::fm::mul(v[4 * i + 1], inv),
                                               MOEKIT_FP8_E4M3);
    const uint16_t hi = moekit::f32x2_to_fp8x2(moekit::fm::mul(v[4 * i + 2], inv),
                                               moekit::fm::mul(v[4 * i + 3], inv), MOEKIT_FP8_E4M3);
    w[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return make_uint2(w[0], w[1]);
}

// Where a row goes: lane j (< n_dst) holds destination row j, -1 for none.
struct Destinations {
  int my_row;
  int n_dst;
  __device__ __forceinline__ int row(int j) const { return __shfl_sync(kFull, my_row, j); }
};

// Writes one logical row of `cols` f32 values (produced 8 at a time by `load(chunk, v)`) to
// every destination row, as BF16 (RNE) or FP8 E4M3 with one scale per 128 columns. Warp-wide.
template <typename Load>
__device__ __forceinline__ void emit_row(const Load& load, int cols, const Destinations& dst, int32_t quant,
                                         uint64_t out, uint64_t scales, int32_t layout, int32_t stride) {
  const int lane = threadIdx.x & 31;
  const int chunks = cols / 8;
  if (quant == MOEKIT_QUANT_BF16) {
    auto* o = reinterpret_cast<uint4*>(out);
    for (int c = lane; c - lane < chunks; c += 32) {
      float v[8];
      if (c < chunks) load(c, v);
      const uint4 packed = c < chunks ? pack_bf16x8(v) : make_uint4(0, 0, 0, 0);
      for (int j = 0; j < dst.n_dst; ++j) {
        const int r = dst.row(j);
        if (r >= 0 && c < chunks) o[static_cast<uint64_t>(r) * chunks + c] = packed;
      }
    }
    return;
  }
  // FP8: a half-warp per 128-column group, two groups per step.
  const int groups = cols / 128;
  auto* o = reinterpret_cast<uint2*>(out);
  float* sc = reinterpret_cast<float*>(scales);
  for (int g0 = 0; g0 < groups; g0 += 2) {
    const int g = g0 + (lane >> 4);
    const bool live = g < groups;
    const int c = g * 16 + (lane & 15);
    float v[8];
    float amax = 0.0f;
    if (live) {
      load(c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
      }
    }
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float o2 = __shfl_xor_sync(kFull, amax, off);
      amax = o2 > amax ? o2 : amax;
    }
    const TileScale s = tile_scale(amax, quant);
    const uint2 q = live ? quantize8(v, s.inv) : make_uint2(0, 0);
    for (int j = 0; j < dst.n_dst; ++j) {
      const int r = dst.row(j);
      if (r < 0 || !live) continue;
      o[static_cast<uint64_t>(r) * chunks + c] = q;
      if ((lane & 15) == 0) sc[scale_index(layout, stride, groups, r, g)] = s.scale;
    }
  }
}

// Writes a padding row: `words` zero 16-byte words (BF16 zeros; FP8 E4M3 zeros) and, for FP8,
// `zero_scale` (the scale of an all-zero tile) for each of its `groups` tiles. Warp-wide.
__device__ __forceinline__ void zero_row(uint64_t out, int words, uint64_t row, float* scales, float zero_scale,
                                         int groups, int32_t layout, int32_t stride) {
  const int lane = threadIdx.x & 31;
  uint4* o = reinterpret_cast<uint4*>(out) + row * words;
  for (int c = lane; c < words; c += 32) o[c] = make_uint4(0u, 0u, 0u, 0u);
  if (scales != nullptr) {
    for (int g = lane; g < groups; g += 32) {
      scales[scale_index(layout, stride, groups, static_cast<int>(row), g)] = zero_scale;
    }
  }
}

}  // namespace

// ---- layout kernels ------------------------------------------------------------------------

// Per chunk: pairs per expert, and (column E) ids outside [-1, E).
extern "C" __global__ void __launch_bounds__(kBlock) moekit_dispatch_count(const MoekitDispatchLayoutParams p) {
  __shared__ int hist[kMaxExperts + 1];
  const int experts = p.experts;
  for (int e = threadIdx.x; e <= experts; e += kBlock) hist[e] = 0;
  __syncthreads();
  uint64_t begin, end;
  chunk_range(p, blockIdx.x, begin, end);
  const int* ids = reinterpret_cast<const int*>(p.topk_ids);
  for (uint64_t i = begin + threadIdx.x; i < end; i += kBlock) {
    const int id = __ldg(&ids[i]);
    if (valid_id(id, experts)) atomicAdd(&hist[id], 1);
    else if (id != -1) atomicAdd(&hist[experts], 1);
  }
  __syncthreads();
  int* out = reinterpret_cast<int*>(p.chunk_counts) + static_cast<uint64_t>(blockIdx.x) * (experts + 1);
  for (int e = threadIdx.x; e <= experts; e += kBlock) out[e] = hist[e];
}

// Block b owns columns e = 32 b + lane (e <= E; column E counts invalid ids) of chunk_counts
// [chunks, E + 1]; warp w owns the chunks [w per, (w + 1) per). Each warp sums its range per
// column, an exclusive scan over the 32 warps (shared memory) gives the range's start, and the
// warp rewrites its range in place with the running starts within the expert. Totals: counts[e],
// status[0] (invalid ids). Grid: ceil((E + 1) / 32) blocks of kScanBlock threads.
extern "C" __global__ void __launch_bounds__(kScanBlock) moekit_dispatch_offsets(const MoekitDispatchLayoutParams p) {
  __shared__ int part[kScanWarps][32];
  constexpr int kBatch = 8;  // loads in flight per lane
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int experts = p.experts;
  const int e = static_cast<int>(blockIdx.x) * 32 + lane;
  const bool column = e <= experts;
  const uint64_t stride = static_cast<uint64_t>(experts) + 1;
  const int per = (p.chunks + kScanWarps - 1) / kScanWarps;
  const int c0 = warp * per < p.chunks ? warp * per : p.chunks;
  const int c1 = c0 + per < p.chunks ? c0 + per : p.chunks;
  int* cc = reinterpret_cast<int*>(p.chunk_counts);
  int sum = 0;
  if (column) {
    for (int c = c0; c < c1; c += kBatch) {
      int v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) v[u] = c + u < c1 ? cc[static_cast<uint64_t>(c + u) * stride + e] : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) sum += v[u];
    }
  }
  part[warp][lane] = sum;
  __syncthreads();
  int run = 0;
  for (int w = 0; w < warp; ++w) run += part[w][lane];
  if (!column) return;
  for (int c = c0; c < c1; c += kBatch) {
    int v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) v[u] = c + u < c1 ? cc[static_cast<uint64_t>(c + u) * stride + e] : 0;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (c + u < c1) cc[static_cast<uint64_t>(c + u) * stride + e] = run;
      run += v[u];
    }
  }
  if (warp == kScanWarps - 1) {  // the last range ends at the column's total
    if (e < experts) reinterpret_cast<int*>(p.counts)[e] = run;
    else reinterpret_cast<int*>(p.status)[0] = run;  // invalid ids
  }
}

// Block-wide: seg[e] = sum over e' < e of cnt[e'] rounded up to `align` (an exclusive scan: each
// thread a contiguous run of experts, then a Hillis-Steele scan of the run totals), seg[E] = the
// total. `cnt` in shared memory; ends with a barrier.
__device__ __forceinline__ void aligned_starts(const int* cnt, int experts, int align, int* seg, int* partial) {
  const int per = (experts + kBlock - 1) / kBlock;
  const int first = static_cast<int>(threadIdx.x) * per;
  const auto size = [&](int e) { return (cnt[e] + align - 1) / align * align; };
  int local = 0;
  for (int e = first; e < first + per && e < experts; ++e) local += size(e);
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int off = 1; off < kBlock; off <<= 1) {
    const int add = threadIdx.x >= static_cast<unsigned>(off) ? partial[threadIdx.x - off] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  int run = partial[threadIdx.x] - local;
  for (int e = first; e < first + per && e < experts; ++e) {
    seg[e] = run;
    run += size(e);
  }
  if (threadIdx.x == kBlock - 1) seg[experts] = partial[kBlock - 1];
  __syncthreads();
}

// Per chunk, in pair order: row = offsets[e] + (pairs of e in earlier chunks) + (pairs of e
// earlier in this chunk). Every block first derives the aligned offsets from the counts (block 0
// writes them and status[1]). Tiles of 256 pairs; within a warp the rank comes from
// __match_any_sync, across warps the warps take turns on the per-expert running counters.
// Then every row below max_rows that is padding gets m_indices = -1.
extern "C" __global__ void __launch_bounds__(kBlock) moekit_dispatch_rows(const MoekitDispatchLayoutParams p) {
  __shared__ int running[kMaxExperts];
  __shared__ int seg[kMaxExperts + 1];
  __shared__ int cnt[kMaxExperts];
  __shared__ int partial[kBlock];
  const int experts = p.experts;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int* cc = reinterpret_cast<const int*>(p.chunk_counts) + static_cast<uint64_t>(blockIdx.x) * (experts + 1);
  const int* counts = reinterpret_cast<const int*>(p.counts);
  for (int e = threadIdx.x; e < experts; e += kBlock) cnt[e] = counts[e];
  __syncthreads();
  aligned_starts(cnt, experts, p.align, seg, partial);
  if (blockIdx.x == 0) {
    int* offsets = reinterpret_cast<int*>(p.offsets);
    for (int e = threadIdx.x; e <= experts; e += kBlock) offsets[e] = seg[e];
    if (threadIdx.x == 0) reinterpret_cast<int*>(p.status)[1] = seg[experts];
  }
  for (int e = threadIdx.x; e < experts; e += kBlock) running[e] = seg[e] + cc[e];
  __syncthreads();
  uint64_t begin, end;
  chunk_range(p, blockIdx.x, begin, end);
  const int* ids = reinterpret_cast<const int*>(p.topk_ids);
  int* row_map = reinterpret_cast<int*>(p.row_map);
  int* m_indices = reinterpret_cast<int*>(p.m_indices);
  const unsigned below = (1u << lane) - 1u;
  for (uint64_t tile = begin; tile < end; tile += kBlock) {
    const uint64_t i = tile + threadIdx.x;
    const int id = i < end ? __ldg(&ids[i]) : -1;
    const bool ok = valid_id(id, experts);
    const unsigned same = __match_any_sync(kFull, ok ? id : -1);
    const int rank = __popc(same & below);
    const bool leader = (same & below) == 0u;
    int base = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w) {
        if (ok) base = running[id];
        __syncwarp();
        if (ok && leader) running[id] = base + __popc(same);
      }
      __syncthreads();
    }
    if (i < end) {
      const int row = base + rank;
      const bool kept = ok && row < p.max_rows;
      row_map[i] = kept ? row : -1;
      if (kept) m_indices[row] = id;
    }
  }
  for (int r = blockIdx.x * kBlock + threadIdx.x; r < p.max_rows; r += gridDim.x * kBlock) {
    if (!is_routed_row(seg, cnt, experts, r)) m_indices[r] = -1;
  }
}

// ---- permute -------------------------------------------------------------------------------

// Items [0, tokens): token t to its rows (read once, written top_k times). With zero_padding,
// items [tokens, tokens + ceil(max_rows / 32)): a group of 32 rows, whose padding rows inside a
// segment (found by one ballot) become zero rows: plain 16-byte stores of zeros, plus the scale of
// a zero tile for FP8. Rows at or past offsets[E] are never written.
extern "C" __global__ void __launch_bounds__(kBlock) moekit_dispatch_permute(const MoekitPermuteParams p) {
  __shared__ int seg[kMaxExperts + 1];
  __shared__ int cnt[kMaxExperts];
  if (p.zero_padding) {
    load_segments(reinterpret_cast<const int*>(p.offsets), reinterpret_cast<const int*>(p.counts), p.experts, seg, cnt);
  }
  const int lane = threadIdx.x & 31;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  const uint64_t groups32 = (static_cast<uint64_t>(p.max_rows) + 31u) / 32u;
  const uint64_t items = p.tokens + (p.zero_padding ? groups32 : 0u);
  const int* row_map = reinterpret_cast<const int*>(p.row_map);
  const int chunks = p.hidden / 8;
  const bool fp8 = p.quant != MOEKIT_QUANT_BF16;
  for (uint64_t item = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); item < items; item += warps) {
    if (item >= p.tokens) {
      unsigned pad = padding_mask(seg, cnt, p.experts, p.max_rows, item - p.tokens, false);
      const float zero_scale = tile_scale(0.0f, p.quant).scale;
      while (pad != 0u) {
        const int i = __ffs(static_cast<int>(pad)) - 1;
        pad &= pad - 1u;
        zero_row(p.out, fp8 ? p.hidden / 16 : chunks, (item - p.tokens) * 32u + i,
                 fp8 ? reinterpret_cast<float*>(p.scales) : nullptr, zero_scale, p.hidden / 128, p.scale_layout,
                 p.scale_stride);
      }
      continue;
    }
    const uint64_t t = item;
    int r = lane < p.top_k ? __ldg(&row_map[t * p.top_k + lane]) : -1;
    if (r >= p.max_rows) r = -1;  // never write past the output, whatever the map says
    const Destinations dst{r, p.top_k};
    const uint4* src = reinterpret_cast<const uint4*>(p.x) + t * static_cast<uint64_t>(chunks);
    if (p.quant == MOEKIT_QUANT_BF16) {
      // A pure copy: move the 16-byte words untouched (NaN payloads included).
      auto* o = reinterpret_cast<uint4*>(p.out);
      for (int c0 = 0; c0 < chunks; c0 += 4 * 32) {
        uint4 w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = c0 + u * 32 + lane;
          if (c < chunks) w[u] = __ldg(&src[c]);
        }
        for (int j = 0; j < p.top_k; ++j) {
          const int row = dst.row(j);
          if (row < 0) continue;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < chunks) o[static_cast<uint64_t>(row) * chunks + c] = w[u];
          }
        }
      }
    } else {
      emit_row([src](int c, float (&v)[8]) { unpack_bf16x8(__ldg(&src[c]), v); }, p.hidden, dst, p.quant, p.out,
               p.scales, p.scale_layout, p.scale_stride);
    }
  }
}

// ---- activations between the GEMMs ---------------------------------------------------------

namespace {

// MN-major scales have their rows rounded up to 4: the warp of the last row sets the scales of
// the (at most 3) rows past it to zero, so that every element of the output is defined.
__device__ __forceinline__ void zero_scale_tail(const MoekitActParams& p, uint64_t r) {
  if (p.quant == MOEKIT_QUANT_BF16 || p.scale_layout != MOEKIT_SCALES_MN_MAJOR || r + 1 != p.rows) return;
  const int extra = p.scale_stride - static_cast<int>(p.rows);
  const int groups = p.cols / 128;
  float* sc = reinterpret_cast<float*>(p.scales);
  for (int i = threadIdx.x & 31; i < extra * groups; i += 32) {
    sc[static_cast<uint64_t>(i / extra) * p.scale_stride + p.rows + i % extra] = 0.0f;
  }
}

}  // namespace

// One warp per row: x [rows, cols] -> BF16/FP8 (quantization), or SwiGLU of x [rows, 2 cols].
extern "C" __global__ void __launch_bounds__(kBlock) moekit_act_quant(const MoekitActParams p) {
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  for (uint64_t r = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < p.rows; r += warps) {
    zero_scale_tail(p, r);
    const uint4* src = reinterpret_cast<const uint4*>(p.x) + r * static_cast<uint64_t>(p.cols / 8);
    const Destinations dst{(threadIdx.x & 31) == 0 ? static_cast<int>(r) : -1, 1};
    emit_row([src](int c, float (&v)[8]) { unpack_bf16x8(__ldg(&src[c]), v); }, p.cols, dst, p.quant, p.out, p.scales,
             p.scale_layout, p.scale_stride);
  }
}

// h = silu(gate) * up = (g * sigmoid(g)) * u, in f32, then BF16 or FP8.
extern "C" __global__ void __launch_bounds__(kBlock) moekit_act_swiglu(const MoekitActParams p) {
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  const int chunks = p.cols / 8;
  for (uint64_t r = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < p.rows; r += warps) {
    zero_scale_tail(p, r);
    const uint4* gate = reinterpret_cast<const uint4*>(p.x) + r * static_cast<uint64_t>(2 * chunks);
    const uint4* up = gate + chunks;
    const Destinations dst{(threadIdx.x & 31) == 0 ? static_cast<int>(r) : -1, 1};
    emit_row(
        [gate, up](int c, float (&v)[8]) {
          float g[8], u[8];
          unpack_bf16x8(__ldg(&gate[c]), g);
          unpack_bf16x8(__ldg(&up[c]), u);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = moekit::fm::mul(moekit::fm::mul(g[i], moekit::fm::sigmoid(g[i])), u[i]);
        },
        p.cols, dst, p.quant, p.out, p.scales, p.scale_layout, p.scale_stride);
  }
}

// d gate = dh * u * silu'(g), d up = dh * silu(g); silu'(g) = s * (1 + g * (1 - s)).
extern "C" __global__ void __launch_bounds__(kBlock) moekit_act_swiglu_backward(const MoekitActParams p) {
  const int lane = threadIdx.x & 31;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  const int chunks = p.cols / 8;
  for (uint64_t r = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < p.rows; r += warps) {
    const uint4* gate = reinterpret_cast<const uint4*>(p.x) + r * static_cast<uint64_t>(2 * chunks);
    const uint4* up = gate + chunks;
    const uint4* dh = reinterpret_cast<const uint4*>(p.grad_out) + r * static_cast<uint64_t>(chunks);
    uint4* dgate = reinterpret_cast<uint4*>(p.grad_x) + r * static_cast<uint64_t>(2 * chunks);
    uint4* dup = dgate + chunks;
    for (int c = lane; c < chunks; c += 32) {
      float g[8], u[8], d[8], og[8], ou[8];
      unpack_bf16x8(__ldg(&gate[c]), g);
      unpack_bf16x8(__ldg(&up[c]), u);
      unpack_bf16x8(__ldg(&dh[c]), d);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        namespace fm = moekit::fm;
        const float s = fm::sigmoid(g[i]);
        const float silu = fm::mul(g[i], s);
        const float dsilu = fm::mul(s, fm::add(1.0f, fm::mul(g[i], fm::sub(1.0f, s))));
        og[i] = fm::mul(fm::mul(d[i], u[i]), dsilu);
        ou[i] = fm::mul(d[i], silu);
      }
      dgate[c] = pack_bf16x8(og);
      dup[c] = pack_bf16x8(ou);
    }
  }
}

// ---- combine -------------------------------------------------------------------------------

namespace {

// out[t] = sum_j w[t, j] * y[row(t, j)] for up to K slots (slots j >= top_k and rows outside
// [0, rows) are skipped): f32 in slot order, BF16 out. One warp per token; the row ids and weights
// are shuffled into registers once per token. Per step a lane takes U 8-column chunks and issues
// all U * K 16-byte row loads before the in-order accumulation (U * K <= 8 except K = 16), so
// the loads of a lane are in flight together instead of each waiting for the previous FMA.
template <int K>
__device__ __forceinline__ void combine_tokens(const MoekitCombineParams& p) {
  constexpr int U = K >= 8 ? 1 : 8 / K;
  const int lane = threadIdx.x & 31;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  const int chunks = p.hidden / 8;
  const uint4* y = reinterpret_cast<const uint4*>(p.y);
  const float* weights = reinterpret_cast<const float*>(p.weights);
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < p.tokens; t += warps) {
    int my_row = lane < p.top_k ? __ldg(reinterpret_cast<const int*>(p.row_map) + t * p.top_k + lane) : -1;
    if (my_row >= p.rows) my_row = -1;
    const float my_w = (lane < p.top_k && weights != nullptr) ? __ldg(&weights[t * p.top_k + lane]) : 1.0f;
    int rows[K];
    float ws[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      rows[j] = __shfl_sync(kFull, my_row, j);
      ws[j] = __shfl_sync(kFull, my_w, j);
    }
    uint4* out = reinterpret_cast<uint4*>(p.out) + t * static_cast<uint64_t>(chunks);
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      uint4 v[U][K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          v[u][j] = rows[j] >= 0 && c < chunks ? __ldg(&y[static_cast<uint64_t>(rows[j]) * chunks + c])
                                               : make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        float acc[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if (rows[j] < 0) continue;
          float f[8];
          unpack_bf16x8(v[u][j], f);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = moekit::fm::add(acc[i], moekit::fm::mul(ws[j], f[i]));
        }
        if (c < chunks) out[c] = pack_bf16x8(acc);
      }
    }
  }
}

}  // namespace

// Combine with compile-time slot counts: the host picks the smallest K >= top_k (1, 2, 4, 6, 8,
// 16); the slots past top_k are masked (row -1). One entry point per variant.
using CombineP = MoekitCombineParams;
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k1(const CombineP p) { combine_tokens<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k2(const CombineP p) { combine_tokens<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k4(const CombineP p) { combine_tokens<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k6(const CombineP p) { combine_tokens<6>(p); }
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k8(const CombineP p) { combine_tokens<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_k16(const CombineP p) { combine_tokens<16>(p); }

// grad_y[row(t, j)] = w * grad_out[t] (BF16), grad_w[t, j] = <grad_out[t], y[row(t, j)]> (f32:
// per lane over its chunks in order, then the warp butterfly); padding rows of grad_y zeroed.
extern "C" __global__ void __launch_bounds__(kBlock) moekit_combine_backward(const MoekitCombineParams p) {
  __shared__ int seg[kMaxExperts + 1];
  __shared__ int cnt[kMaxExperts];
  load_segments(reinterpret_cast<const int*>(p.offsets), reinterpret_cast<const int*>(p.counts), p.experts, seg, cnt);
  const int lane = threadIdx.x & 31;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * kWarps;
  const int chunks = p.hidden / 8;
  const uint4* y = reinterpret_cast<const uint4*>(p.y);
  const float* weights = reinterpret_cast<const float*>(p.weights);
  uint4* grad_y = reinterpret_cast<uint4*>(p.grad_y);
  const uint64_t items = p.tokens + static_cast<uint64_t>(p.rows);
  for (uint64_t item = static_cast<uint64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); item < items; item += warps) {
    if (item >= p.tokens) {
      const int row = static_cast<int>(item - p.tokens);
      if (!is_routed_row(seg, cnt, p.experts, row)) {
        for (int c = lane; c < chunks; c += 32) grad_y[static_cast<uint64_t>(row) * chunks + c] = make_uint4(0, 0, 0, 0);
      }
      continue;
    }
    const uint64_t t = item;
    int my_row = lane < p.top_k ? __ldg(reinterpret_cast<const int*>(p.row_map) + t * p.top_k + lane) : -1;
    if (my_row >= p.rows) my_row = -1;
    const float my_w = (lane < p.top_k && weights != nullptr) ? __ldg(&weights[t * p.top_k + lane]) : 1.0f;
    const uint4* dout = reinterpret_cast<const uint4*>(p.grad_out) + t * static_cast<uint64_t>(chunks);
    float part[kMaxTopK];
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) part[j] = 0.0f;
    for (int c = lane; c - lane < chunks; c += 32) {  // uniform trip count: shuffles need every lane
      const bool live = c < chunks;
      float d[8];
      if (live) unpack_bf16x8(__ldg(&dout[c]), d);
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        if (j >= p.top_k) break;
        const int r = __shfl_sync(kFull, my_row, j);
        const float w = __shfl_sync(kFull, my_w, j);
        if (r < 0 || !live) continue;
        float scaled[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) scaled[i] = moekit::fm::mul(w, d[i]);
        grad_y[static_cast<uint64_t>(r) * chunks + c] = pack_bf16x8(scaled);
        if (weights != nullptr) {
          float v[8];
          unpack_bf16x8(__ldg(&y[static_cast<uint64_t>(r) * chunks + c]), v);
#pragma unroll
          for (int i = 0; i < 8; ++i) part[j] = moekit::fm::add(part[j], moekit::fm::mul(d[i], v[i]));
        }
      }
    }
    if (weights != nullptr) {
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        if (j >= p.top_k) break;
        float s = part[j];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s = moekit::fm::add(s, __shfl_xor_sync(kFull, s, off));
        const int r = __shfl_sync(kFull, my_row, j);
        if (lane == 0) reinterpret_cast<float*>(p.grad_weights)[t * p.top_k + j] = r >= 0 ? s : 0.0f;
      }
    }
  }
}

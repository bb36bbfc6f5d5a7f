// Portable grouped GEMM (sm_80 and newer): m-grouped contiguous and masked, k-grouped weight
// gradient, activation gradient; BF16, and FP8 E4M3 with per-128 scales promoted to f32.
//
// One kernel, one tile shape: 64 x 64 output tiles, 4 warps (2 x 2, 32 x 32 each), reduction
// steps of 32 through a 3-stage cp.async pipeline. Operands whose reduction dimension is
// contiguous and that are BF16 go straight from cp.async into the ldmatrix layout; every other
// operand (FP8, or BF16 stored the other way round: the weights in the activation gradient,
// both operands of the k-grouped weight gradient) is copied raw by cp.async and converted
// (E4M3 -> BF16 is exact, and transposed where needed) into the ldmatrix layout by all threads.
// Then ldmatrix.x4 + mma.sync m16n8k16 (f32 accumulate). FP8: each 128-long reduction block is
// accumulated separately and added to the f32 result times scale_a(row) * scale_b(col).
//
// Tiles are scheduled by a grid-stride loop over every group's tiles (no host round trip).
// Contiguous layout: a tile runs one pass per distinct group among its rows (m_indices), so
// any segment alignment works; rows of other groups and padding rows (-1) are never stored.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * require HMMA LDSM LDGSTS
// moekit-budget: moekit_gemm_portable_bf16 regs<=168 smem<=512
// moekit-budget: moekit_gemm_portable_fp8 smem<=512

#include "moekit/abi.h"
#include "moekit/gemm/scheduler.cuh"
#include "moekit/convert.cuh"
#include "moekit/portable.cuh"
#include "moekit/ptx.cuh"

namespace {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kStages = 3;
constexpr int kThreads = 128;
constexpr int kPitch = kBK + 8;                      // ldmatrix layout row pitch (bf16): 80 B
constexpr int kStageBytes = kBM * kPitch * 2;        // 5120 B: fits every raw tile format
constexpr int kPitchK8 = kBK + 16;                   // raw K-major FP8 row pitch (bytes)
constexpr int kPitchMn16 = kBM + 8;                  // raw MN-major BF16 row pitch (elements)
constexpr int kPitchMn8 = kBM + 16;                  // raw MN-major FP8 row pitch (bytes)

// Dynamic shared memory: 2 operands x (kStages raw stages + 1 converted tile) x kStageBytes =
// 40960 bytes (raw::SMEM_BYTES on the host).
static_assert(2 * (kStages + 1) * kStageBytes == 40960, "keep raw::SMEM_BYTES in step");
static_assert(kBM == kBN, "one raw staging size serves both operands");
static_assert(kBK * kPitchMn16 * 2 <= kStageBytes && kBM * kPitchK8 <= kStageBytes, "staging fits");

// One operand of a tile: element (row, l) at base + (row * row_stride + l * red_stride) * elem.
struct Operand {
  const unsigned char* base;
  int64_t row_stride;
  int64_t red_stride;
  int rows;     // rows [0, rows) exist; others read as zero
  int red_len;  // reduction indices [0, red_len) exist
  bool kmajor;  // red_stride == 1
  bool fp8;
};

// FP8 scale of (row, 128-block kb): base[(row >> row_shift) * row_stride + kb * kb_stride].
struct Scales {
  const float* base;
  int64_t row_stride;
  int64_t kb_stride;
  int row_shift;
  int rows;
  __device__ __forceinline__ float at(int row, int kb) const {
    return row < rows ? base[static_cast<int64_t>(row >> row_shift) * row_stride + kb * kb_stride] : 0.0f;
  }
};

// E4M3 code -> BF16 bits (exact: every E4M3 value is a BF16 value). NaN -> 0x7fc0.
__device__ __forceinline__ uint16_t e4m3_to_bf16_bits(unsigned char q) {
  const uint32_t s = (q & 0x80u) << 24, e = (q >> 3) & 0xfu, m = q & 0x7u;
  if (e == 0xfu && m == 0x7u) return 0x7fc0;
  uint32_t f;
  if (e != 0) {
    f = s | ((e + 120u) << 23) | (m << 20);  // (1 + m/8) 2^(e - 7)
  } else if (m != 0) {  // m 2^-9 = 2^(top - 9) (1 + rest / 2^top)
    const uint32_t top = m >= 4u ? 2u : (m >= 2u ? 1u : 0u);
    f = s | ((top + 118u) << 23) | ((m & ~(1u << top)) << (23u - top));
  } else {
    f = s;
  }
  return static_cast<uint16_t>(f >> 16);
}

// Issues the cp.async copies of one raw tile (rows row0.., reduction l..) into `stage`.
__device__ __forceinline__ void load_stage(const Operand& op, int row0, int l, unsigned char* stage) {
  const int elem = op.fp8 ? 1 : 2;
  const int per = 16 / elem;  // elements per 16-byte chunk
  if (op.kmajor) {
    const int cpr = kBK / per;
    const int pitch = op.fp8 ? kPitchK8 : kPitch * 2;
    for (int i = threadIdx.x; i < kBM * cpr; i += kThreads) {
      const int r = i / cpr, c = i % cpr;
      const int gr = row0 + r, gl = l + c * per;
      const bool ok = gr < op.rows && gl >= 0 && gl + per <= op.red_len;
      const unsigned char* src = ok ? op.base + (gr * op.row_stride + gl) * elem : op.base;
      moekit::ptx::cp_async_16_zfill(stage + r * pitch + c * 16, src, ok);
    }
  } else {
    const int cpr = kBM / per;
    const int pitch = op.fp8 ? kPitchMn8 : kPitchMn16 * 2;
    for (int i = threadIdx.x; i < kBK * cpr; i += kThreads) {
      const int kk = i / cpr, c = i % cpr;
      const int gl = l + kk, gr = row0 + c * per;
      const bool ok = gl >= 0 && gl < op.red_len && gr + per <= op.rows;
      const unsigned char* src = ok ? op.base + (static_cast<int64_t>(gl) * op.red_stride + gr) * elem : op.base;
      moekit::ptx::cp_async_16_zfill(stage + kk * pitch + c * 16, src, ok);
    }
  }
}

// Raw tile -> ldmatrix layout [kBM][kPitch] BF16, zeroing reduction indices outside [lo, hi).
__device__ __forceinline__ void convert_stage(const Operand& op, const unsigned char* stage, uint16_t* canon, int l,
                                              int lo, int hi) {
  for (int i = threadIdx.x; i < kBM * (kBK / 8); i += kThreads) {
    const int r = i / (kBK / 8), k8 = (i % (kBK / 8)) * 8;
    uint16_t v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int kk = k8 + e, gl = l + kk;
      uint16_t bits = 0;
      if (gl >= lo && gl < hi) {
        if (op.fp8) {
          bits = e4m3_to_bf16_bits(op.kmajor ? stage[r * kPitchK8 + kk] : stage[kk * kPitchMn8 + r]);
        } else {
          const auto* s16 = reinterpret_cast<const uint16_t*>(stage);
          bits = op.kmajor ? s16[r * kPitch + kk] : s16[kk * kPitchMn16 + r];
        }
      }
      v[e] = bits;
    }
    uint4 w;
    w.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
    w.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
    w.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
    w.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
    *reinterpret_cast<uint4*>(canon + r * kPitch + k8) = w;
  }
}

// acc += A_tile . B_tile^T over one reduction step, each warp its 32 x 32.
__device__ __forceinline__ void mma_stage(const uint16_t* sa, const uint16_t* sb, float (&acc)[2][4][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t a[2][4], b[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int row = wm * 32 + mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
      moekit::ptx::ldmatrix_x4(a[mt], sa + row * kPitch + kk + (lane / 16) * 8);
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      const int n = wn * 32 + np * 16 + (lane % 8) + (lane / 16) * 8;
      moekit::ptx::ldmatrix_x4(b[np], sb + n * kPitch + kk + ((lane / 8) % 2) * 8);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint32_t bf[2] = {b[nt / 2][(nt % 2) * 2], b[nt / 2][(nt % 2) * 2 + 1]};
        moekit::ptx::mma_m16n8k16_bf16(acc[mt][nt], a[mt], bf, acc[mt][nt]);
      }
    }
  }
}

// Local row / column of accumulator element (mt, nt, i) of this thread.
__device__ __forceinline__ int acc_row(int mt, int i) {
  return ((threadIdx.x >> 5) >> 1) * 32 + mt * 16 + ((threadIdx.x & 31) >> 2) + (i >> 1) * 8;
}
__device__ __forceinline__ int acc_col(int nt, int i) {
  return ((threadIdx.x >> 5) & 1) * 32 + nt * 8 + ((threadIdx.x & 31) & 3) * 2 + (i & 1);
}

__device__ __forceinline__ void zero_tile(float (&t)[2][4][4]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) t[mt][nt][i] = 0.0f;
}

// One output tile: acc = sum over reduction [lo, hi) of A(row0 + r, l) B(col0 + c, l).
__device__ void run_tile(const Operand& A, const Operand& B, int row0, int col0, int lo, int hi, bool fp8,
                         const Scales& sa, const Scales& sb, float (&acc)[2][4][4], unsigned char* smem) {
  zero_tile(acc);
  float part[2][4][4];
  zero_tile(part);

  unsigned char* stage_a = smem;
  unsigned char* stage_b = smem + kStages * kStageBytes;
  auto* canon_a = reinterpret_cast<uint16_t*>(smem + 2 * kStages * kStageBytes);
  auto* canon_b = reinterpret_cast<uint16_t*>(smem + (2 * kStages + 1) * kStageBytes);
  // Straight into the ldmatrix layout only when nothing needs converting or masking.
  const bool direct_a = A.kmajor && !A.fp8 && lo == 0 && hi == A.red_len;
  const bool direct_b = B.kmajor && !B.fp8 && lo == 0 && hi == B.red_len;
  const int l0 = hi > lo ? (lo / kBK) * kBK : 0;
  const int steps = hi > lo ? (hi - l0 + kBK - 1) / kBK : 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      load_stage(A, row0, l0 + s * kBK, stage_a + s * kStageBytes);
      load_stage(B, col0, l0 + s * kBK, stage_b + s * kStageBytes);
    }
    moekit::ptx::cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    moekit::ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = step + kStages - 1;
    if (next < steps) {
      load_stage(A, row0, l0 + next * kBK, stage_a + (next % kStages) * kStageBytes);
      load_stage(B, col0, l0 + next * kBK, stage_b + (next % kStages) * kStageBytes);
    }
    moekit::ptx::cp_async_commit();
    const int st = step % kStages;
    const int l = l0 + step * kBK;
    if (!direct_a) convert_stage(A, stage_a + st * kStageBytes, canon_a, l, lo, hi);
    if (!direct_b) convert_stage(B, stage_b + st * kStageBytes, canon_b, l, lo, hi);
    if (!direct_a || !direct_b) __syncthreads();
    const auto* ta = direct_a ? reinterpret_cast<const uint16_t*>(stage_a + st * kStageBytes) : canon_a;
    const auto* tb = direct_b ? reinterpret_cast<const uint16_t*>(stage_b + st * kStageBytes) : canon_b;
    if (!fp8) {
      mma_stage(ta, tb, acc);
      continue;
    }
    mma_stage(ta, tb, part);
    if ((l + kBK) % 128 == 0 || step == steps - 1) {
      const int kb = l / 128;
      float srow[2][2], scol[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) srow[mt][h] = sa.at(row0 + acc_row(mt, 2 * h), kb);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) scol[nt][j] = sb.at(col0 + acc_col(nt, j), kb);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc[mt][nt][i] += part[mt][nt][i] * (srow[mt][i >> 1] * scol[nt][i & 1]);
            part[mt][nt][i] = 0.0f;
          }
    }
  }
  moekit::ptx::cp_async_wait<0>();
  __syncthreads();  // the next tile reuses the buffers
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

template <bool kFp8>
__device__ __forceinline__ void gemm_portable(const MoekitGemmParams& p) {
  MOEKIT_DYNAMIC_SMEM(unsigned char, smem);
  __shared__ int tile_groups[kBM];
  __shared__ int tile_group_count;
  constexpr bool fp8 = kFp8;
  const int elem = fp8 ? 1 : 2;
  const auto* a = reinterpret_cast<const unsigned char*>(p.a);
  const auto* b = reinterpret_cast<const unsigned char*>(p.b);
  const auto* a_scales = reinterpret_cast<const float*>(p.a_scales);
  const auto* b_scales = reinterpret_cast<const float*>(p.b_scales);
  const int* m_indices = reinterpret_cast<const int*>(p.m_indices);
  const bool row_grouped = p.op == MOEKIT_GEMM_CONTIGUOUS || p.op == MOEKIT_GEMM_DGRAD;
  const bool kgrouped = p.op == MOEKIT_GEMM_KGROUPED;
  // Output rows x columns of a tile's matrix; the reduction length (k-grouped: per group).
  const int out_rows = kgrouped ? p.n : p.m;
  const int out_cols = (p.op == MOEKIT_GEMM_DGRAD || kgrouped) ? p.k : p.n;
  const int red = p.op == MOEKIT_GEMM_DGRAD ? p.n : p.k;
  const int tiles_r = (out_rows + kBM - 1) / kBM, tiles_c = (out_cols + kBN - 1) / kBN;
  const int64_t per_group_tiles = static_cast<int64_t>(tiles_r) * tiles_c;
  const int64_t total = (row_grouped ? 1 : p.groups) * per_group_tiles;
  const int64_t wgroup = static_cast<int64_t>(p.n / 128) * (p.k / 128);  // weight block scales per group

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int g_sched = static_cast<int>(tile / per_group_tiles);
    const int rem = static_cast<int>(tile % per_group_tiles);
    const int row0 = (rem / tiles_c) * kBM, col0 = (rem % tiles_c) * kBN;
    int passes = 1;
    if (row_grouped) {
      // The distinct valid groups among this tile's rows, in order of first appearance.
      if (threadIdx.x == 0) {
        tile_group_count = moekit::gemm::distinct_groups(m_indices, row0, kBM, p.m, p.groups, tile_groups);
      }
      __syncthreads();
      passes = tile_group_count;
    }
    for (int pass = 0; pass < passes; ++pass) {
      const int g = row_grouped ? tile_groups[pass] : g_sched;
      const int64_t wbase = static_cast<int64_t>(g) * p.n * p.k;  // element offset of W_g
      Operand A{a, red, 1, p.m, red, true, fp8};
      Operand B{b + wbase * elem, p.k, 1, p.n, p.k, true, fp8};
      Scales sa{a_scales, red / 128, 1, 0, p.m};
      if (p.a_scale_layout == MOEKIT_SCALES_MN_MAJOR) sa = Scales{a_scales, 1, p.a_scale_stride, 0, p.m};
      Scales sb{b_scales + g * wgroup, p.k / 128, 1, 7, p.n};
      int lo = 0, hi = red, valid = p.m;
      uint64_t d = p.d;
      if (p.op == MOEKIT_GEMM_DGRAD) {
        B = Operand{b + wbase * elem, 1, p.k, p.k, p.n, false, fp8};  // W_g read along n
        sb = Scales{b_scales + g * wgroup, 1, p.k / 128, 7, p.k};
      } else if (p.op == MOEKIT_GEMM_MASKED) {
        valid = p.masked_m != 0 ? reinterpret_cast<const int*>(p.masked_m)[g] : p.m;
        valid = valid < 0 ? 0 : (valid > p.m ? p.m : valid);
        const int64_t grow = static_cast<int64_t>(g) * p.m;  // global row of the group's row 0
        A = Operand{a + grow * p.k * elem, p.k, 1, valid, p.k, true, fp8};
        if (fp8) {
          sa = p.a_scale_layout == MOEKIT_SCALES_MN_MAJOR ? Scales{a_scales + grow, 1, p.a_scale_stride, 0, valid}
                                                          : Scales{a_scales + grow * (p.k / 128), p.k / 128, 1, 0, valid};
        }
        d = p.d + static_cast<uint64_t>(grow) * p.n * 2;
      } else if (kgrouped) {
        const int* offs = reinterpret_cast<const int*>(p.group_offsets);
        lo = offs[g];
        hi = offs[g + 1];
        lo = lo < 0 ? 0 : (lo > p.m ? p.m : lo);
        hi = hi < lo ? lo : (hi > p.m ? p.m : hi);
        valid = p.n;
        if (fp8) {  // dY^T [n, m] and X^T [k, m], 1x128 scales along the tokens
          A = Operand{a, p.m, 1, p.n, p.m, true, true};
          B = Operand{b, p.m, 1, p.k, p.m, true, true};
          sa = Scales{a_scales, p.m / 128, 1, 0, p.n};
          sb = Scales{b_scales, p.m / 128, 1, 0, p.k};
        } else {  // dY [m, n] and X [m, k], read along the tokens
          A = Operand{a, 1, p.n, p.n, p.m, false, false};
          B = Operand{b, 1, p.k, p.k, p.m, false, false};
        }
      }
      float acc[2][4][4];
      // Masked rows past masked_m: no work; they stay untouched.
      const bool work = row0 < valid;
      if (work) run_tile(A, B, row0, col0, lo, hi, fp8, sa, sb, acc, smem);
      if (work && !kgrouped) {
        const int ld = out_cols;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = row0 + acc_row(mt, 2 * h), c = col0 + acc_col(nt, 2 * h);
              const bool keep = r < valid && c < out_cols && (!row_grouped || m_indices[r] == g);
              if (keep) {
                reinterpret_cast<uint32_t*>(d)[(static_cast<int64_t>(r) * ld + c) / 2] =
                    pack_bf16x2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
              }
            }
      } else if (kgrouped) {
        float* o = reinterpret_cast<float*>(p.d) + static_cast<int64_t>(g) * p.n * p.k;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int r = row0 + acc_row(mt, i), c = col0 + acc_col(nt, i);
              if (r < p.n && c < p.k) {
                float* x = o + static_cast<int64_t>(r) * p.k + c;
                *x = p.accumulate ? *x + acc[mt][nt][i] : acc[mt][nt][i];
              }
            }
      }
    }
    if (row_grouped) __syncthreads();  // tile_groups is rewritten by the next tile
  }
}

}  // namespace

// BF16 operands (MoekitGemmParams.fp8 == 0) and FP8 operands with scales (fp8 == 1).
extern "C" __global__ void __launch_bounds__(kThreads) moekit_gemm_portable_bf16(const MoekitGemmParams p) {
  gemm_portable<false>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads) moekit_gemm_portable_fp8(const MoekitGemmParams p) {
  gemm_portable<true>(p);
}

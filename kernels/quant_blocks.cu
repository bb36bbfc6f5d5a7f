// FP8 E4M3 quantization of grouped weights per 128 x 128 block (MoekitQuantBlocksParams), the
// device twin of moekit-gemm's `reference::quantize_blocks`: amax over the block (NaN
// ignored, as f32::max), clamped to >= 1e-4; scale = amax / 448, inv = 448 / amax (IEEE
// division); code = E4M3(w * inv) with saturation and round-to-nearest-even. With codes_t the
// same codes transposed ([g, k, n]) and the scale at the transposed block: what the Hopper
// kernels need for an FP8 dgrad (FP8 wgmma reads K-major operands only) and what DeepSeek-V3
// keeps beside the forward weights.
//
// One block of 256 threads per 128 x 128 block: thread t loads rows t / 16 + 16 i (i < 8),
// columns 8 (t % 16) .. + 7 as two float4 (the block's 64 KiB read once, coalesced), the
// block's amax by warp shuffles and 8 shared slots, codes staged in a 16 KiB shared tile, then
// written as 16-byte rows (and, transposed, as 16-byte rows of the transposed tile gathered
// from 16 shared rows). Memory-bound: 4 bytes read and 1 (2 with the transpose) written per
// weight.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: moekit_quant_blocks_e4m3@sm_90a require F2FP
// moekit-budget: * smem<=16448

#include "moekit/abi.h"
#include "moekit/convert.cuh"
#include "moekit/fmath.cuh"
#include "moekit/portable.cuh"

extern "C" __global__ void __launch_bounds__(256) moekit_quant_blocks_e4m3(const MoekitQuantBlocksParams p) {
  __shared__ __align__(16) uint8_t tile[128][128];
  __shared__ float warp_amax[8];
  const int nb = p.n / 128, kb = p.k / 128;
  const int64_t block = blockIdx.x;  // (g, bi, bj) row-major
  const int g = static_cast<int>(block / (static_cast<int64_t>(nb) * kb));
  const int bi = static_cast<int>(block / kb % nb), bj = static_cast<int>(block % kb);
  const int t = threadIdx.x;
  const float* w = reinterpret_cast<const float*>(p.w) + (static_cast<int64_t>(g) * p.n + bi * 128) * p.k + bj * 128;
  float v[8][8];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4* row = reinterpret_cast<const float4*>(w + static_cast<int64_t>(t / 16 + 16 * i) * p.k + 8 * (t % 16));
    const float4 a = row[0], b = row[1];
    const float r[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[i][j] = r[j];
      const float m = fabsf(r[j]);
      amax = m > amax ? m : amax;  // a NaN never wins (f32::max)
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, amax, off);
    amax = o > amax ? o : amax;
  }
  if (t % 32 == 0) warp_amax[t / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = warp_amax[i] > amax ? warp_amax[i] : amax;
  const float a = amax > 1e-4f ? amax : 1e-4f;
  const float inv = moekit::fm::div(448.0f, a);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t packed[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint16_t lo = moekit::f32x2_to_fp8x2(moekit::fm::mul(v[i][4 * h], inv), moekit::fm::mul(v[i][4 * h + 1], inv),
                                                 MOEKIT_FP8_E4M3);
      const uint16_t hi = moekit::f32x2_to_fp8x2(moekit::fm::mul(v[i][4 * h + 2], inv),
                                                 moekit::fm::mul(v[i][4 * h + 3], inv), MOEKIT_FP8_E4M3);
      packed[h] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint2*>(&tile[t / 16 + 16 * i][8 * (t % 16)]) = make_uint2(packed[0], packed[1]);
  }
  const float scale = moekit::fm::div(a, 448.0f);
  if (t == 0) reinterpret_cast<float*>(p.scales)[(static_cast<int64_t>(g) * nb + bi) * kb + bj] = scale;
  __syncthreads();
  uint8_t* codes = reinterpret_cast<uint8_t*>(p.codes) + (static_cast<int64_t>(g) * p.n + bi * 128) * p.k + bj * 128;
  for (int idx = t; idx < 128 * 8; idx += 256) {  // (row, 16-byte chunk)
    const int r = idx / 8, c = idx % 8;
    *reinterpret_cast<uint4*>(codes + static_cast<int64_t>(r) * p.k + 16 * c) = *reinterpret_cast<const uint4*>(&tile[r][16 * c]);
  }
  if (p.codes_t == 0) return;
  if (t == 0) reinterpret_cast<float*>(p.scales_t)[(static_cast<int64_t>(g) * kb + bj) * nb + bi] = scale;
  uint8_t* codes_t = reinterpret_cast<uint8_t*>(p.codes_t) + (static_cast<int64_t>(g) * p.k + bj * 128) * p.n + bi * 128;
  for (int idx = t; idx < 128 * 8; idx += 256) {  // transposed row (a column of the tile), chunk of 16 rows
    const int col = idx / 8, c = idx % 8;
    uint32_t word[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      word[q] = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) word[q] |= static_cast<uint32_t>(tile[16 * c + 4 * q + b][col]) << (8 * b);
    }
    *reinterpret_cast<uint4*>(codes_t + static_cast<int64_t>(col) * p.n + 16 * c) = make_uint4(word[0], word[1], word[2], word[3]);
  }
}

// Elementwise casts: BF16 -> FP8 with an f32 scale (the first kernel through moekit's
// pipeline), F32 -> BF16 (round to nearest even, NaN -> 0x7fc0) and BF16 -> F32 (exact).
// All three take MoekitCastParams; the BF16 <-> F32 pair ignores `scale` and `format`.
//
// Memory-bound: 2 bytes read + 1 byte written per element. Each thread converts 8 elements
// per step (one 16-byte load, one 8-byte store) in a grid-stride loop; a scalar tail and a
// scalar path for unaligned buffers keep every access in bounds.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: moekit_cast_bf16_to_fp8@sm_90 require F2FP
// moekit-sass: moekit_cast_bf16_to_fp8@sm_90a require F2FP
// moekit-sass: moekit_cast_f32_to_bf16@sm_90a require STG.E.64
// moekit-sass: moekit_cast_bf16_to_f32@sm_90a require STG.E.128

#include "moekit/abi.h"
#include "moekit/convert.cuh"

extern "C" __global__ void __launch_bounds__(256)
moekit_cast_bf16_to_fp8(const MoekitCastParams p) {
  const auto* src = reinterpret_cast<const uint16_t*>(p.src);
  auto* dst = reinterpret_cast<uint8_t*>(p.dst);
  const uint64_t n = p.n;
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;

  const bool aligned = ((p.src | p.dst) & 15u) == 0;
  uint64_t done = 0;
  if (aligned) {
    const uint64_t vecs = n / 8;
    const auto* src8 = reinterpret_cast<const uint4*>(src);
    auto* dst8 = reinterpret_cast<uint2*>(dst);
    for (uint64_t v = tid; v < vecs; v += stride) {
      const uint4 in = __ldg(&src8[v]);
      const uint32_t words[4] = {in.x, in.y, in.z, in.w};
      uint32_t packed[2];
#pragma unroll
      for (int w = 0; w < 4; w += 2) {
        const uint16_t a = moekit::f32x2_to_fp8x2(moekit::bf16_bits_to_f32(words[w] & 0xffffu) * p.scale,
                                                  moekit::bf16_bits_to_f32(words[w] >> 16) * p.scale, p.format);
        const uint16_t b = moekit::f32x2_to_fp8x2(moekit::bf16_bits_to_f32(words[w + 1] & 0xffffu) * p.scale,
                                                  moekit::bf16_bits_to_f32(words[w + 1] >> 16) * p.scale, p.format);
        packed[w / 2] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
      }
      dst8[v] = make_uint2(packed[0], packed[1]);
    }
    done = vecs * 8;
  }
  for (uint64_t i = done + tid; i < n; i += stride) {
    const float x = moekit::bf16_bits_to_f32(__ldg(&src[i])) * p.scale;
    dst[i] = static_cast<uint8_t>(moekit::f32x2_to_fp8x2(x, 0.0f, p.format) & 0xffu);
  }
}

// Grid-stride map of MoekitCastParams' n elements `In` -> `Out`: groups of 4 (one `In4` load,
// one `Out4` store, `four`) when both pointers are 16-byte aligned, then a scalar tail (`one`);
// scalar throughout otherwise. Every access stays in [0, n).
template <typename In, typename Out, typename In4, typename Out4, typename Four, typename One>
__device__ __forceinline__ void map_by_four(const MoekitCastParams& p, Four four, One one) {
  const auto* src = reinterpret_cast<const In*>(p.src);
  auto* dst = reinterpret_cast<Out*>(p.dst);
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint64_t done = 0;
  if (((p.src | p.dst) & 15u) == 0) {
    const uint64_t vecs = p.n / 4;
    const auto* src4 = reinterpret_cast<const In4*>(src);
    auto* dst4 = reinterpret_cast<Out4*>(dst);
    for (uint64_t v = tid; v < vecs; v += stride) dst4[v] = four(__ldg(&src4[v]));
    done = vecs * 4;
  }
  for (uint64_t i = done + tid; i < p.n; i += stride) dst[i] = one(__ldg(&src[i]));
}

// F32 -> BF16, RNE (moekit::f32_to_bf16_bits_rne). 6 bytes moved per element; vector path: one
// 16-byte load and one 8-byte store per 4 elements.
extern "C" __global__ void __launch_bounds__(256)
moekit_cast_f32_to_bf16(const MoekitCastParams p) {
  map_by_four<float, uint16_t, float4, uint2>(
      p,
      [](float4 in) {
        return make_uint2(static_cast<uint32_t>(moekit::f32_to_bf16_bits_rne(in.x)) |
                              (static_cast<uint32_t>(moekit::f32_to_bf16_bits_rne(in.y)) << 16),
                          static_cast<uint32_t>(moekit::f32_to_bf16_bits_rne(in.z)) |
                              (static_cast<uint32_t>(moekit::f32_to_bf16_bits_rne(in.w)) << 16));
      },
      [](float x) { return moekit::f32_to_bf16_bits_rne(x); });
}

// BF16 -> F32, exact (the BF16 bits in the high half); vector path: one 8-byte load and one
// 16-byte store per 4 elements.
extern "C" __global__ void __launch_bounds__(256)
moekit_cast_bf16_to_f32(const MoekitCastParams p) {
  map_by_four<uint16_t, float, uint2, float4>(
      p,
      [](uint2 in) {
        return make_float4(moekit::bf16_bits_to_f32(in.x & 0xffffu), moekit::bf16_bits_to_f32(in.x >> 16),
                           moekit::bf16_bits_to_f32(in.y & 0xffffu), moekit::bf16_bits_to_f32(in.y >> 16));
      },
      [](uint16_t b) { return moekit::bf16_bits_to_f32(b); });
}

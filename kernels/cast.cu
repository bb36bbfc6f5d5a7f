// BF16 -> FP8 elementwise cast with an f32 scale: the first kernel through moekit's pipeline.
//
// Memory-bound: 2 bytes read + 1 byte written per element. Each thread converts 8 elements
// per step (one 16-byte load, one 8-byte store) in a grid-stride loop; a scalar tail and a
// scalar path for unaligned buffers keep every access in bounds.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: moekit_cast_bf16_to_fp8@sm_90 require F2FP
// moekit-sass: moekit_cast_bf16_to_fp8@sm_90a require F2FP

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

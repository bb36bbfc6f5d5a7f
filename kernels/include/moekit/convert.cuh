// Element conversions shared by kernels. Each one is bit-identical to the CPU reference in
// crates/moekit-dtype (FP8: CUDA's __nv_cvt_* with __NV_SATFINITE and round-to-nearest-even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "moekit/abi.h"

namespace moekit {

// Two f32 -> two FP8 codes packed in 16 bits (low byte = `lo`). One F2FP instruction on
// sm_89+; an exact software path on older GPUs.
__device__ __forceinline__ uint16_t f32x2_to_fp8x2(float lo, float hi, int32_t format) {
  const float2 v = make_float2(lo, hi);
  return format == MOEKIT_FP8_E5M2 ? __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E5M2)
                                   : __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
}

// BF16 bits -> f32 (exact).
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// f32 -> BF16 bits, round to nearest even (overflow to +-inf as IEEE rounding gives, f32
// subnormals rounded like any other value); every NaN -> 0x7fc0 (a quiet NaN: NaN stays NaN).
// Integer arithmetic only, so the emulation and every GPU give the same bits; the CPU
// reference is moekit-cast's `reference::f32_to_bf16`.
__device__ __forceinline__ uint16_t f32_to_bf16_bits_rne(float x) {
  const uint32_t b = __float_as_uint(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

}  // namespace moekit

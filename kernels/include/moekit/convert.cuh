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

}  // namespace moekit

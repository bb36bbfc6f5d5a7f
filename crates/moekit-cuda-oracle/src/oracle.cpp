// CUDA conversion oracle for moekit tests.
//
// This file is compiled by the *host* C++ compiler (not nvcc). Without
// __CUDA_ARCH__ defined, the functions in cuda_fp8.hpp / cuda_bf16.hpp take
// their portable software paths, which NVIDIA documents as bit-identical to
// the hardware conversions. Every function here is a thin extern "C" shim
// around exactly one CUDA header function, so the Rust side can compare its
// own conversions against CUDA's bit for bit.
//
// The FP8 encoders always use __NV_SATFINITE (the mode moekit's kernels use):
// finite values beyond the format's range and +-inf clamp to +-MAX; NaN maps
// to CUDA's canonical NaN code.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstddef>
#include <cstdint>

namespace {

inline std::uint8_t f32_to_fp8(float x, __nv_fp8_interpretation_t fmt) {
    return static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, fmt));
}

inline std::uint8_t bf16bits_to_fp8(std::uint16_t bits, __nv_fp8_interpretation_t fmt) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return static_cast<std::uint8_t>(__nv_cvt_bfloat16raw_to_fp8(raw, __NV_SATFINITE, fmt));
}

inline float fp8_to_f32(std::uint8_t code, __nv_fp8_interpretation_t fmt) {
    // CUDA has no direct fp8 -> float conversion; its own __nv_fp8_e4m3 /
    // __nv_fp8_e5m2 `operator float()` goes fp8 -> half -> float, which is
    // exact (every FP8 value is representable in binary16). Do the same.
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), fmt);
    return __half2float(__half(h));
}

inline std::uint16_t f32_to_bf16_rn(float x) {
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(x);
    return raw.x;
}

}  // namespace

extern "C" {

// ---- scalar ---------------------------------------------------------------

std::uint8_t moekit_oracle_f32_to_e4m3(float x) { return f32_to_fp8(x, __NV_E4M3); }
std::uint8_t moekit_oracle_f32_to_e5m2(float x) { return f32_to_fp8(x, __NV_E5M2); }

std::uint8_t moekit_oracle_bf16bits_to_e4m3(std::uint16_t bits) {
    return bf16bits_to_fp8(bits, __NV_E4M3);
}
std::uint8_t moekit_oracle_bf16bits_to_e5m2(std::uint16_t bits) {
    return bf16bits_to_fp8(bits, __NV_E5M2);
}

float moekit_oracle_e4m3_to_f32(std::uint8_t code) { return fp8_to_f32(code, __NV_E4M3); }
float moekit_oracle_e5m2_to_f32(std::uint8_t code) { return fp8_to_f32(code, __NV_E5M2); }

std::uint16_t moekit_oracle_f32_to_bf16_rn(float x) { return f32_to_bf16_rn(x); }

// ---- batched: dst[i] = f(src[i]) for i in [0, n) ----------------------------
// The caller guarantees `src` is valid for `n` reads and `dst` for `n` writes
// (either may be dangling when n == 0). The ranges must not overlap.

void moekit_oracle_f32_to_e4m3_n(const float* src, std::uint8_t* dst, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_fp8(src[i], __NV_E4M3);
}
void moekit_oracle_f32_to_e5m2_n(const float* src, std::uint8_t* dst, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_fp8(src[i], __NV_E5M2);
}
void moekit_oracle_bf16bits_to_e4m3_n(const std::uint16_t* src, std::uint8_t* dst,
                                      std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = bf16bits_to_fp8(src[i], __NV_E4M3);
}
void moekit_oracle_bf16bits_to_e5m2_n(const std::uint16_t* src, std::uint8_t* dst,
                                      std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = bf16bits_to_fp8(src[i], __NV_E5M2);
}
void moekit_oracle_e4m3_to_f32_n(const std::uint8_t* src, float* dst, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = fp8_to_f32(src[i], __NV_E4M3);
}
void moekit_oracle_e5m2_to_f32_n(const std::uint8_t* src, float* dst, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = fp8_to_f32(src[i], __NV_E5M2);
}
void moekit_oracle_f32_to_bf16_rn_n(const float* src, std::uint16_t* dst, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16_rn(src[i]);
}

}  // extern "C"

// Reproducible f32 arithmetic: the same bits on the GPU, in the host emulation and in Rust.
//
// Only IEEE-754 operations that are correctly rounded everywhere are used (add, sub, mul,
// div, fma, each rounded to nearest even, subnormals kept), and each is spelled out so
// that no compiler may fuse a multiply and an add behind our back: on the device through
// the `__f*_rn` intrinsics (never contracted into FFMA), on the host with plain operators
// and `fmaf` (the emulation is built with -ffp-contract=off). The Rust mirror of every
// function here is in crates/moekit-gating/src/fmath.rs; a change here must change it too.
//
// `exp` is moekit's own (not CUDA's expf, whose last bits differ from any host libm), so
// that a router makes the same choices on every device; its error is below 2 ulp over the
// whole f32 range (measured by moekit-gating's tests against f64).
#pragma once

#include <stdint.h>

#ifdef MOEKIT_EMULATION
#include <cmath>
#endif

namespace moekit {
namespace fm {

#ifdef MOEKIT_EMULATION
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline float div(float a, float b) { return a / b; }
inline float fma(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float bits_to_f32(uint32_t b) { return __uint_as_float(b); }
#else
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ float bits_to_f32(uint32_t b) { return __uint_as_float(b); }
#endif

// 2^n for n in [-126, 127] (a normal number, built from its bits).
__device__ __forceinline__ float exp2i(int n) { return bits_to_f32(static_cast<uint32_t>(n + 127) << 23); }

// e^x. Range reduction x = n ln2 + r with n = rint(x log2 e) (the 1.5 * 2^23 trick inside
// one fma), r by a two-constant Cody-Waite step, e^r by its degree-7 Taylor polynomial in
// Horner form (|r| <= 0.35: truncation below 0.1 ulp), then two exact scalings by powers of
// two so that subnormal results are rounded once. NaN -> NaN; x > 88.72283935546875 -> +inf;
// x < -104 -> +0.
__device__ __forceinline__ float exp(float x) {
  if (!(x == x)) return x;
  if (x > 0x1.62e43p+6f) return __uint_as_float(0x7f800000u);
  if (x < -104.0f) return 0.0f;
  const float magic = 12582912.0f;                     // 1.5 * 2^23
  const float t = fma(x, 0x1.715476p+0f, magic);       // log2(e) rounded to f32
  const float n = sub(t, magic);                       // rint(x * log2 e), exact
  float r = fma(n, -0x1.62e4p-1f, x);                 // ln2 high part (15 significant bits)
  r = fma(n, -0x1.7f7d1cp-20f, r);                   // ln2 - high part
  float p = 0x1.a01a02p-13f;                           // 1/7! (each coefficient rounded to f32)
  p = fma(p, r, 0x1.6c16c2p-10f);                      // 1/6!
  p = fma(p, r, 0x1.111112p-7f);                       // 1/5!
  p = fma(p, r, 0x1.555556p-5f);                       // 1/4!
  p = fma(p, r, 0x1.555556p-3f);                       // 1/3!
  p = fma(p, r, 0.5f);
  p = fma(p, r, 1.0f);
  p = fma(p, r, 1.0f);
  const int ni = static_cast<int>(n);                  // in [-150, 128]
  const int n1 = ni >> 1;                              // floor(ni / 2), in [-75, 64]
  const int n2 = ni - n1;
  return mul(mul(p, exp2i(n1)), exp2i(n2));
}

// 1 / (1 + e^-x), correctly rounded division of moekit's exp.
__device__ __forceinline__ float sigmoid(float x) { return div(1.0f, add(1.0f, exp(-x))); }

}  // namespace fm
}  // namespace moekit

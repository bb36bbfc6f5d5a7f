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
inline float rcp(float a) { return 1.0f / a; }
inline float bits_to_f32(uint32_t b) { return __uint_as_float(b); }
#else
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
// 1 / a correctly rounded: the same bits as div(1, a), with a shorter instruction sequence.
__device__ __forceinline__ float rcp(float a) { return __frcp_rn(a); }
__device__ __forceinline__ float bits_to_f32(uint32_t b) { return __uint_as_float(b); }
#endif

// Every NaN as the one canonical quiet NaN 0x7fc00000: IEEE leaves a NaN result's sign and
// payload to the hardware (x86 makes 0xffc00000, NVIDIA GPUs 0x7fffffff), so outputs that
// promise the same bits on every device pass through this.
__device__ __forceinline__ float canon(float x) { return x == x ? x : bits_to_f32(0x7fc00000u); }

// 2^n for n in [-126, 127] (a normal number, built from its bits).
__device__ __forceinline__ float exp2i(int n) { return bits_to_f32(static_cast<uint32_t>(n + 127) << 23); }

// e^x. Range reduction x = n ln2 + r with n = rint(x log2 e) (the 1.5 * 2^23 trick inside
// one fma), r by a two-constant Cody-Waite step, e^r by its degree-7 Taylor polynomial in
// Horner form (|r| <= 0.35: truncation below 0.1 ulp), then two exact scalings by powers of
// two so that subnormal results are rounded once. NaN -> NaN; x > 88.72283935546875 -> +inf;
// x < -104 -> +0.
__device__ __forceinline__ float exp(float x) {
  // Branch-free: the polynomial runs on x clamped to [-104, 89] and the result is the same
  // bits as the early-return form (which the Rust mirror spells): above 88.72283935546875 the
  // scaled polynomial overflows to +inf by itself (e^x exceeds FLT_MAX by over 60 ulp there),
  // at -104 it rounds to +0 by itself (below half the smallest subnormal), and a NaN input is
  // selected back. Checked over every f32 by kernels/tests/exp_branch_free.cpp.
  const float xin = x;
  x = fminf(fmaxf(x, -104.0f), 89.0f);
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
  const float y = mul(mul(p, exp2i(n1)), exp2i(n2));
  return xin == xin ? y : xin;
}

// 1 / (1 + e^-x), correctly rounded division of moekit's exp (as a reciprocal: same bits).
__device__ __forceinline__ float sigmoid(float x) { return rcp(add(1.0f, exp(-x))); }

}  // namespace fm
}  // namespace moekit

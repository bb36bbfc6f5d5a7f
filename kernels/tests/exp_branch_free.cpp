// One-off exhaustive check that moekit::fm::exp (kernels/include/moekit/fmath.cuh, branch-free)
// gives the same bits as the early-return form the Rust mirror (crates/moekit-fmath) spells,
// for every f32 input. Not part of CI (it takes about a minute); run after changing `exp`:
//   g++ -O2 -ffp-contract=off -std=c++17 -DMOEKIT_EMULATION -include cstring \
//       -Ikernels/include kernels/tests/exp_branch_free.cpp -o /tmp/exp_check && /tmp/exp_check
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>

#define __device__
#define __forceinline__ inline
inline float __uint_as_float(uint32_t x) { float f; std::memcpy(&f, &x, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t x; std::memcpy(&x, &f, 4); return x; }
#include "moekit/fmath.cuh"

// The early-return form, operation for operation as crates/moekit-fmath/src/lib.rs.
static float exp_reference(float x) {
  if (x != x) return x;
  if (x > __uint_as_float(0x42b17218u)) return __uint_as_float(0x7f800000u);
  if (x < -104.0f) return 0.0f;
  const float magic = 12582912.0f;
  const float t = std::fmaf(x, __uint_as_float(0x3fb8aa3bu), magic);
  const float n = t - magic;
  float r = std::fmaf(n, -__uint_as_float(0x3f317200u), x);
  r = std::fmaf(n, -__uint_as_float(0x35bfbe8eu), r);
  float p = __uint_as_float(0x39500d01u);
  p = std::fmaf(p, r, __uint_as_float(0x3ab60b61u));
  p = std::fmaf(p, r, __uint_as_float(0x3c088889u));
  p = std::fmaf(p, r, __uint_as_float(0x3d2aaaabu));
  p = std::fmaf(p, r, __uint_as_float(0x3e2aaaabu));
  p = std::fmaf(p, r, 0.5f);
  p = std::fmaf(p, r, 1.0f);
  p = std::fmaf(p, r, 1.0f);
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1, n2 = ni - n1;
  return p * moekit::fm::exp2i(n1) * moekit::fm::exp2i(n2);
}

int main() {
  uint64_t bad = 0;
  for (uint64_t b = 0; b <= 0xffffffffull; ++b) {
    const float x = __uint_as_float(static_cast<uint32_t>(b));
    const uint32_t got = __float_as_uint(moekit::fm::exp(x)), want = __float_as_uint(exp_reference(x));
    if (got != want && !(got != got && want != want)) {
      if (bad++ < 10) std::printf("x = %a (0x%08x): %08x, reference %08x\n", x, unsigned(b), got, want);
    }
  }
  std::printf("%llu mismatches over every f32\n", static_cast<unsigned long long>(bad));
  return bad != 0;
}

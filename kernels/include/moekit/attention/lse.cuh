// The natural logarithm of attention's log-sum-exp, reproducible: the same bits on the GPU,
// in the host emulation and in Rust (moekit-attention `reference::log`, its mirror; a change
// here must change it too). Built only from moekit/fmath.cuh's correctly rounded operations.
//
// Domain: positive normal floats (the softmax sum l is in [1, keys]); other inputs give an
// unspecified finite value or NaN. Method: x = 2^e m with m in [sqrt(1/2), sqrt(2)) (bit
// operations, exact), f = m - 1 (exact by Sterbenz), s = f / (2 + f), and
// log(1 + f) = 2 atanh(s) = 2 s (1 + z/3 + z^2/5 + z^3/7 + z^4/9), z = s^2 <= 0.0295: the
// truncated series is below 1e-9 relative; rounding of s and the Horner steps gives a few ulp.
// Then e ln2 is added in two parts (e * ln2_hi is exact: 15 + 8 significant bits).
#pragma once

#include <stdint.h>

#include "moekit/fmath.cuh"

namespace moekit {
namespace attn {

__device__ __forceinline__ float log_pos(float x) {
  namespace fm = ::moekit::fm;
  const uint32_t b = __float_as_uint(x);
  int e = static_cast<int>(b >> 23) - 127;
  uint32_t mb = (b & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  if (mb > 0x3fb504f3u) {                          // m > sqrt(2) (rounded to f32): halve it
    mb -= 0x00800000u;
    e += 1;
  }
  const float f = fm::sub(fm::bits_to_f32(mb), 1.0f);
  const float s = fm::div(f, fm::add(2.0f, f));
  const float z = fm::mul(s, s);
  float p = fm::fma(z, fm::bits_to_f32(0x3de38e39u), fm::bits_to_f32(0x3e124925u));  // 1/9, 1/7
  p = fm::fma(p, z, fm::bits_to_f32(0x3e4ccccdu));                                     // 1/5
  p = fm::fma(p, z, fm::bits_to_f32(0x3eaaaaabu));                                     // 1/3
  p = fm::mul(p, z);
  const float t = fm::add(s, s);
  const float lm = fm::fma(t, p, t);  // 2s + 2s (z/3 + ...)
  const float ef = static_cast<float>(e);
  // ln2 = 0x1.62e4p-1 (hi, bits 0x3f317200) + 0x1.7f7d1cp-20 (lo, bits 0x35bfbe8e)
  return fm::fma(ef, fm::bits_to_f32(0x3f317200u), fm::fma(ef, fm::bits_to_f32(0x35bfbe8eu), lm));
}

}  // namespace attn
}  // namespace moekit

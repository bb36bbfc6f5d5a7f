//! FP8 E4M3 and E5M2, bit-exact with CUDA's `cuda_fp8.h` (`__NV_SATFINITE`).
//!
//! # Encoding (f32 / bf16 → FP8)
//!
//! CUDA's host implementation widens the input to `double` and rounds that to
//! FP8. Widening f32 (and bf16, which is a truncated f32) is exact, so this
//! module works on the f32 bit pattern directly and gets identical results:
//!
//! 1. **NaN** (any sign, any payload) → the canonical NaN code `0x7F` for both
//!    formats. The sign is discarded: CUDA first replaces every NaN input with
//!    the positive NaN `0x7FFF_FFFF`.
//! 2. **±0 and tiny values**: `|x| <= MIN_POSITIVE_SUBNORMAL / 2` → ±0 (the sign
//!    is kept). The exact half is a tie between 0 (even) and the smallest
//!    subnormal (odd code), so it goes to 0.
//! 3. **Round to nearest, ties to even** at the FP8 mantissa cut. For values in
//!    the FP8 normal range the cut is after the top 3 (E4M3) or 2 (E5M2) f32
//!    mantissa bits; in the FP8 subnormal range it moves left by one bit per
//!    binade below the smallest normal. A round-up that carries out of the
//!    mantissa bumps the exponent field, which is exactly the next FP8 value
//!    (e.g. the largest subnormal rounds up into the smallest normal).
//! 4. **Saturation** (`__NV_SATFINITE`): anything that rounds beyond the
//!    largest finite value — including **±inf** — becomes **±MAX** (E4M3
//!    ±448, E5M2 ±57344). So encoding never produces E5M2's infinities, and
//!    never produces a NaN from a non-NaN input. The saturation threshold is
//!    `MAX + ulp(MAX)/2`: for E4M3 that is 464, which ties to 448 (even code);
//!    for E5M2 it is 61440, which would tie up to 65536 and therefore also
//!    saturates to MAX.
//!
//! # Decoding (FP8 → f32)
//!
//! Exact for every non-NaN code (every FP8 value is an f32 value), keeping
//! the sign of zero and of E5M2's infinities. Every NaN code decodes to the
//! f32 with bits `0x7FFF_FFFF`, which is what CUDA's fp8 → half → float path
//! produces (it, too, discards the NaN's sign).

use crate::{Bf16, LengthMismatch};

/// Parameters of one FP8 format.
struct Format {
    /// Number of stored mantissa bits (E4M3: 3, E5M2: 2).
    mant_bits: u32,
    /// Exponent bias (E4M3: 7, E5M2: 15).
    bias: i32,
    /// Unbiased exponent of the largest finite value (E4M3: 8, E5M2: 15).
    emax: i32,
    /// Magnitude code of the largest finite value (E4M3: 0x7E, E5M2: 0x7B).
    max_code: u8,
    /// Whether the all-ones exponent field encodes inf/NaN (E5M2, IEEE-like)
    /// or only `S.1111.111` is NaN (E4M3, no infinities).
    ieee_specials: bool,
}

const E4M3: Format = Format { mant_bits: 3, bias: 7, emax: 8, max_code: 0x7E, ieee_specials: false };

const E5M2: Format = Format { mant_bits: 2, bias: 15, emax: 15, max_code: 0x7B, ieee_specials: true };

/// The NaN code CUDA produces when encoding any NaN, for both formats.
const CANONICAL_NAN_CODE: u8 = 0x7F;

/// The f32 CUDA produces when decoding any FP8 NaN (fp8 → half `0x7FFF` →
/// float): positive, all payload bits set.
const DECODED_NAN_BITS: u32 = 0x7FFF_FFFF;

const F32_SIGN: u32 = 0x8000_0000;
const F32_ABS: u32 = 0x7FFF_FFFF;
const F32_INF: u32 = 0x7F80_0000;
const F32_MANT_BITS: u32 = 23;
const F32_MANT_MASK: u32 = (1 << F32_MANT_BITS) - 1;
const F32_BIAS: i32 = 127;

impl Format {
    /// Unbiased exponent of the smallest positive subnormal: `1 - bias - mant_bits`.
    const fn min_subnormal_exp(&self) -> i32 {
        1 - self.bias - self.mant_bits as i32
    }

    /// f32 bits of half the smallest positive subnormal (a power of two).
    const fn half_min_subnormal_f32_bits(&self) -> u32 {
        ((self.min_subnormal_exp() - 1 + F32_BIAS) as u32) << F32_MANT_BITS
    }

    /// Encodes the f32 with bit pattern `x` (saturating, RNE). See the module
    /// docs for the rules. Total: defined for all 2^32 inputs.
    const fn encode(&self, x: u32) -> u8 {
        let sign = ((x & F32_SIGN) >> 24) as u8;
        let abs = x & F32_ABS;

        // 1. NaN → canonical NaN, sign dropped (as CUDA does).
        if abs > F32_INF {
            return CANONICAL_NAN_CODE;
        }
        // 2. At or below half the smallest subnormal → signed zero. This also
        //    covers all f32 zeros and subnormals, so from here on `abs` is a
        //    normal f32 (or inf) with an implicit leading 1.
        if abs <= self.half_min_subnormal_f32_bits() {
            return sign;
        }
        // Unbiased exponent.
        let e = (abs >> F32_MANT_BITS) as i32 - F32_BIAS;
        // 4a. Exponent above the format's largest binade (this includes inf):
        //     saturate. (Values inside the top binade that *round* past MAX
        //     are handled by the clamp at the end.)
        if e > self.emax {
            return sign | self.max_code;
        }

        // 3. Round to nearest even.
        // 24-bit significand 1.mmm…m, as an integer.
        let sig = (abs & F32_MANT_MASK) | (1 << F32_MANT_BITS);
        // FP8 exponent field, if the result is normal.
        let e_biased = e + self.bias;
        // `shift` = number of low significand bits that do not fit; `base` =
        // code bits contributed by the exponent. For a normal result,
        // `(sig >> shift)` is `1mmm` (implicit bit included), and adding it to
        // `(e_biased - 1) << mant_bits` yields `e_biased << mant_bits | mmm`.
        // For a subnormal result (`e_biased <= 0`) the exponent field is 0 and
        // the cut moves `1 - e_biased` bits further left, so the implicit bit
        // lands in the mantissa field. Thanks to step 2, e_biased >=
        // -mant_bits, so 20 <= shift <= 24: the shifts below never overflow.
        let (base, shift) = if e_biased >= 1 {
            (((e_biased - 1) as u32) << self.mant_bits, F32_MANT_BITS - self.mant_bits)
        } else {
            (0, F32_MANT_BITS - self.mant_bits + (1 - e_biased) as u32)
        };
        let kept = sig >> shift;
        let rest = sig & ((1 << shift) - 1); // the bits cut off
        let half = 1 << (shift - 1); // exactly half an FP8 ulp
        let mut code = base + kept;
        // Round up if above half, or exactly half and the kept code is odd.
        // (`base` has its low `mant_bits` bits clear, so the parity of `kept`
        // is the parity of the code.) A carry out of the mantissa field
        // correctly increments the exponent field.
        if rest > half || (rest == half && (kept & 1) == 1) {
            code += 1;
        }

        // 4b. Rounded past MAX (onto the NaN code for E4M3, the inf code for
        //     E5M2, or beyond): saturate.
        if code > self.max_code as u32 {
            code = self.max_code as u32;
        }
        sign | code as u8
    }

    /// Whether `code` is a NaN in this format.
    const fn is_nan(&self, code: u8) -> bool {
        let mag = code & 0x7F;
        if self.ieee_specials {
            // S.11111.mm with mm != 0
            mag > 0x7C
        } else {
            // S.1111.111 only
            mag == 0x7F
        }
    }

    /// Whether `code` is ±inf (E5M2 `S.11111.00` only).
    const fn is_infinite(&self, code: u8) -> bool {
        self.ieee_specials && (code & 0x7F) == 0x7C
    }

    /// Exact decode to f32 bits. NaN → `DECODED_NAN_BITS`.
    fn decode(&self, code: u8) -> f32 {
        if self.is_nan(code) {
            return f32::from_bits(DECODED_NAN_BITS);
        }
        let sign = ((code & 0x80) as u32) << 24;
        if self.is_infinite(code) {
            return f32::from_bits(sign | F32_INF);
        }
        let mag = (code & 0x7F) as u32;
        let exp_field = mag >> self.mant_bits;
        let mant = mag & ((1 << self.mant_bits) - 1);
        let abs_bits = if exp_field == 0 {
            // Zero or subnormal: mant * 2^min_subnormal_exp. A small integer
            // times a power of two that f32 can represent: exact.
            let unit = f32::from_bits(((self.min_subnormal_exp() + F32_BIAS) as u32) << F32_MANT_BITS);
            (mant as f32 * unit).to_bits()
        } else {
            // Normal: re-bias the exponent and left-align the mantissa.
            let f32_exp = (exp_field as i32 - self.bias + F32_BIAS) as u32;
            (f32_exp << F32_MANT_BITS) | (mant << (F32_MANT_BITS - self.mant_bits))
        };
        f32::from_bits(sign | abs_bits)
    }
}

/// bf16 → f32 is exact: bf16 is the top half of an f32.
#[inline]
const fn bf16_bits_to_f32_bits(b: u16) -> u32 {
    (b as u32) << 16
}

fn check_len(src: usize, dst: usize) -> Result<(), LengthMismatch> {
    if src == dst {
        Ok(())
    } else {
        Err(LengthMismatch { src, dst })
    }
}

/// Methods shared by both formats; `$fmt` is the `Format` constant.
macro_rules! fp8_common {
    ($ty:ident, $fmt:ident, $name:literal) => {
        impl $ty {
            /// Positive zero.
            pub const ZERO: Self = Self(0x00);
            /// Negative zero.
            pub const NEG_ZERO: Self = Self(0x80);
            /// The canonical NaN, `0x7F`: the code CUDA produces when encoding
            /// any NaN (the input's sign and payload are discarded).
            pub const NAN: Self = Self(CANONICAL_NAN_CODE);
            /// Largest finite value; see the type docs for its value.
            pub const MAX: Self = Self($fmt.max_code);
            /// Most negative finite value (`-MAX`).
            pub const MIN: Self = Self($fmt.max_code | 0x80);
            /// Smallest positive subnormal value (code `0x01`).
            pub const MIN_POSITIVE_SUBNORMAL: Self = Self(0x01);
            /// Smallest positive normal value (exponent field 1, mantissa 0).
            pub const MIN_POSITIVE: Self = Self(1 << $fmt.mant_bits);

            /// Wraps a raw bit pattern. Every `u8` is a valid value.
            #[inline]
            pub const fn from_bits(bits: u8) -> Self {
                Self(bits)
            }

            /// The raw bit pattern.
            #[inline]
            pub const fn to_bits(self) -> u8 {
                self.0
            }

            /// Encodes a bf16, matching CUDA's
            #[doc = concat!("`__nv_cvt_bfloat16raw_to_fp8(x, __NV_SATFINITE, __NV_", $name, ")`")]
            /// bit for bit for all 65536 inputs.
            ///
            /// bf16 → f32 is exact and CUDA's bf16 path is defined as exactly
            /// that followed by the f32 path, so this is always
            /// `Self::from_f32(x.to_f32())` (single rounding, no double
            /// rounding issue).
            #[inline]
            pub fn from_bf16(x: Bf16) -> Self {
                Self($fmt.encode(bf16_bits_to_f32_bits(x.to_bits())))
            }

            /// Decodes exactly to f32.
            ///
            /// Every non-NaN value is exact, including the sign of zero. Every
            /// NaN code decodes to the positive quiet NaN with bits
            /// `0x7FFF_FFFF`, as CUDA's fp8 → half → float conversion does.
            #[inline]
            pub fn to_f32(self) -> f32 {
                $fmt.decode(self.0)
            }

            /// Decodes exactly to bf16 (every FP8 value is a bf16 value; NaN
            /// codes give the bf16 NaN `0x7FFF`).
            #[inline]
            pub fn to_bf16(self) -> Bf16 {
                // Exact truncation: FP8 values have at most 3 mantissa bits.
                Bf16::from_bits((self.to_f32().to_bits() >> 16) as u16)
            }

            /// Whether this is a NaN code.
            #[inline]
            pub const fn is_nan(self) -> bool {
                $fmt.is_nan(self.0)
            }

            /// Whether this is ±infinity (always `false` for E4M3).
            #[inline]
            pub const fn is_infinite(self) -> bool {
                $fmt.is_infinite(self.0)
            }

            /// Whether this is neither NaN nor infinite.
            #[inline]
            pub const fn is_finite(self) -> bool {
                !self.is_nan() && !self.is_infinite()
            }

            /// Whether the sign bit is set (also for `-0` and NaN codes).
            #[inline]
            pub const fn is_sign_negative(self) -> bool {
                self.0 & 0x80 != 0
            }

            /// Encodes `src[i]` into `dst[i]` with [`Self::from_f32`].
            ///
            /// Returns [`LengthMismatch`] (writing nothing) if the lengths
            /// differ.
            pub fn encode_f32_slice(src: &[f32], dst: &mut [Self]) -> Result<(), LengthMismatch> {
                check_len(src.len(), dst.len())?;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = Self::from_f32(*s);
                }
                Ok(())
            }

            /// Encodes `src[i]` into `dst[i]` with [`Self::from_bf16`].
            ///
            /// Returns [`LengthMismatch`] (writing nothing) if the lengths
            /// differ.
            pub fn encode_bf16_slice(src: &[Bf16], dst: &mut [Self]) -> Result<(), LengthMismatch> {
                check_len(src.len(), dst.len())?;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = Self::from_bf16(*s);
                }
                Ok(())
            }

            /// Decodes `src[i]` into `dst[i]` with [`Self::to_f32`].
            ///
            /// Returns [`LengthMismatch`] (writing nothing) if the lengths
            /// differ.
            pub fn decode_f32_slice(src: &[Self], dst: &mut [f32]) -> Result<(), LengthMismatch> {
                check_len(src.len(), dst.len())?;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s.to_f32();
                }
                Ok(())
            }
        }

        impl From<$ty> for f32 {
            #[doc = concat!("Exact; see [`", stringify!($ty), "::to_f32`].")]
            #[inline]
            fn from(x: $ty) -> f32 {
                x.to_f32()
            }
        }

        impl From<$ty> for Bf16 {
            #[doc = concat!("Exact; see [`", stringify!($ty), "::to_bf16`].")]
            #[inline]
            fn from(x: $ty) -> Bf16 {
                x.to_bf16()
            }
        }

        impl core::fmt::Display for $ty {
            /// Formats the decoded f32 value.
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Display::fmt(&self.to_f32(), f)
            }
        }
    };
}

/// FP8 E4M3 (1 sign, 4 exponent, 3 mantissa bits, bias 7), NVIDIA/OCP
/// "fn" variant.
///
/// - Finite range: ±448 ([`F8E4M3::MAX`], code `0x7E`); smallest normal
///   2^-6 ([`F8E4M3::MIN_POSITIVE`]); smallest subnormal 2^-9
///   ([`F8E4M3::MIN_POSITIVE_SUBNORMAL`], code `0x01`).
/// - **No infinities.** The only NaNs are `S.1111.111`, i.e. codes `0x7F` and
///   `0xFF`; every other code with exponent field `1111` is finite (256..448).
///   Encoding ±inf gives ±MAX (CUDA's `__NV_SATFINITE` behaviour).
/// - Encoding NaN gives [`F8E4M3::NAN`] (`0x7F`), never `0xFF`.
///
/// Conversions match CUDA bit for bit; see [`F8E4M3::from_f32`].
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct F8E4M3(pub u8);

/// FP8 E5M2 (1 sign, 5 exponent, 2 mantissa bits, bias 15): IEEE-style, the
/// top 8 bits of a binary16.
///
/// - Finite range: ±57344 ([`F8E5M2::MAX`], code `0x7B`); smallest normal
///   2^-14; smallest subnormal 2^-16 (code `0x01`).
/// - ±inf: codes `0x7C` / `0xFC` ([`F8E5M2::INFINITY`],
///   [`F8E5M2::NEG_INFINITY`]). NaNs: `S.11111.mm` with `mm != 0`
///   (`0x7D..=0x7F`, `0xFD..=0xFF`).
/// - Encoding is saturating (`__NV_SATFINITE`): ±inf and out-of-range values
///   give ±MAX, so infinities only arise from [`F8E5M2::from_bits`]. Encoding
///   NaN gives [`F8E5M2::NAN`] (`0x7F`).
///
/// Conversions match CUDA bit for bit; see [`F8E5M2::from_f32`].
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct F8E5M2(pub u8);

fp8_common!(F8E4M3, E4M3, "E4M3");
fp8_common!(F8E5M2, E5M2, "E5M2");

impl F8E4M3 {
    /// The value 1.0 (code `0x38`).
    pub const ONE: Self = Self(0x38);

    /// Encodes an f32 the way CUDA's
    /// `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` does, bit for bit,
    /// for every f32 (and `cvt.rn.satfinite.e4m3x2.f32` on sm_89+):
    ///
    /// - round to nearest, ties to even (including in the subnormal range);
    /// - `|x| <= 2^-10` (half the smallest subnormal) → ±0, sign kept;
    /// - `|x| > 464` (448 plus half an ulp) and ±inf → ±448 (`MAX`); exactly
    ///   ±464 ties to ±448 as well;
    /// - NaN (any sign/payload) → `0x7F` ([`Self::NAN`]).
    ///
    /// Never panics.
    ///
    /// # Example
    ///
    /// ```
    /// use moekit_dtype::F8E4M3;
    ///
    /// assert_eq!(F8E4M3::from_f32(1.0).to_bits(), 0x38);
    /// assert_eq!(F8E4M3::from_f32(1.0).to_f32(), 1.0);
    /// // 1.0625 is exactly between 1.0 (even code 0x38) and 1.125 (0x39): ties to even.
    /// assert_eq!(F8E4M3::from_f32(1.0625), F8E4M3::from_f32(1.0));
    /// // Out of range and infinities saturate to ±448.
    /// assert_eq!(F8E4M3::from_f32(1.0e6), F8E4M3::MAX);
    /// assert_eq!(F8E4M3::from_f32(f32::NEG_INFINITY), F8E4M3::MIN);
    /// assert_eq!(F8E4M3::MAX.to_f32(), 448.0);
    /// // NaN has one canonical code; the sign is dropped.
    /// assert_eq!(F8E4M3::from_f32(-f32::NAN), F8E4M3::NAN);
    /// assert_eq!(F8E4M3::NAN.to_bits(), 0x7F);
    /// // Below half the smallest subnormal (2^-10) flushes to a signed zero.
    /// assert_eq!(F8E4M3::from_f32(-1.0e-4), F8E4M3::NEG_ZERO);
    /// ```
    #[inline]
    pub fn from_f32(x: f32) -> Self {
        Self(E4M3.encode(x.to_bits()))
    }
}

impl F8E5M2 {
    /// The value 1.0 (code `0x3C`).
    pub const ONE: Self = Self(0x3C);
    /// Positive infinity (code `0x7C`). Never produced by encoding.
    pub const INFINITY: Self = Self(0x7C);
    /// Negative infinity (code `0xFC`). Never produced by encoding.
    pub const NEG_INFINITY: Self = Self(0xFC);

    /// Encodes an f32 the way CUDA's
    /// `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2)` does, bit for bit,
    /// for every f32:
    ///
    /// - round to nearest, ties to even (including in the subnormal range);
    /// - `|x| <= 2^-17` (half the smallest subnormal) → ±0, sign kept;
    /// - `|x| >= 61440` (57344 plus half an ulp; the tie rounds up) and ±inf →
    ///   ±57344 (`MAX`), never ±inf;
    /// - NaN (any sign/payload) → `0x7F` ([`Self::NAN`]).
    ///
    /// Never panics.
    ///
    /// ```
    /// use moekit_dtype::F8E5M2;
    ///
    /// assert_eq!(F8E5M2::from_f32(1.0), F8E5M2::ONE);
    /// assert_eq!(F8E5M2::from_f32(f32::INFINITY), F8E5M2::MAX);
    /// assert_eq!(F8E5M2::MAX.to_f32(), 57344.0);
    /// ```
    #[inline]
    pub fn from_f32(x: f32) -> Self {
        Self(E5M2.encode(x.to_bits()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_codes() -> impl Iterator<Item = u8> {
        0..=u8::MAX
    }

    #[test]
    fn constants() {
        assert_eq!(F8E4M3::MAX.to_f32(), 448.0);
        assert_eq!(F8E4M3::MIN.to_f32(), -448.0);
        assert_eq!(F8E4M3::MIN_POSITIVE.to_f32(), 2f32.powi(-6));
        assert_eq!(F8E4M3::MIN_POSITIVE_SUBNORMAL.to_f32(), 2f32.powi(-9));
        assert_eq!(F8E4M3::ONE.to_f32(), 1.0);
        assert!(F8E4M3::NAN.is_nan());
        assert_eq!(F8E4M3::NAN.to_bits(), 0x7F);
        assert_eq!(F8E4M3::ZERO.to_f32().to_bits(), 0.0f32.to_bits());
        assert_eq!(F8E4M3::NEG_ZERO.to_f32().to_bits(), (-0.0f32).to_bits());

        assert_eq!(F8E5M2::MAX.to_f32(), 57344.0);
        assert_eq!(F8E5M2::MIN.to_f32(), -57344.0);
        assert_eq!(F8E5M2::MIN_POSITIVE.to_f32(), 2f32.powi(-14));
        assert_eq!(F8E5M2::MIN_POSITIVE_SUBNORMAL.to_f32(), 2f32.powi(-16));
        assert_eq!(F8E5M2::ONE.to_f32(), 1.0);
        assert_eq!(F8E5M2::INFINITY.to_f32(), f32::INFINITY);
        assert_eq!(F8E5M2::NEG_INFINITY.to_f32(), f32::NEG_INFINITY);
        assert!(F8E5M2::NAN.is_nan());
        assert_eq!(F8E5M2::NAN.to_bits(), 0x7F);
        assert_eq!(F8E4M3::default(), F8E4M3::ZERO);
    }

    #[test]
    fn classification() {
        let e4_nans: Vec<u8> = all_codes().filter(|&c| F8E4M3(c).is_nan()).collect();
        assert_eq!(e4_nans, [0x7F, 0xFF]);
        assert!(all_codes().all(|c| !F8E4M3(c).is_infinite()));
        let e5_nans: Vec<u8> = all_codes().filter(|&c| F8E5M2(c).is_nan()).collect();
        assert_eq!(e5_nans, [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]);
        let e5_infs: Vec<u8> = all_codes().filter(|&c| F8E5M2(c).is_infinite()).collect();
        assert_eq!(e5_infs, [0x7C, 0xFC]);
        for c in all_codes() {
            assert_eq!(F8E4M3(c).is_nan(), F8E4M3(c).to_f32().is_nan());
            assert_eq!(F8E5M2(c).is_nan(), F8E5M2(c).to_f32().is_nan());
            assert_eq!(F8E5M2(c).is_finite(), F8E5M2(c).to_f32().is_finite());
            assert_eq!(F8E4M3(c).is_sign_negative(), c >= 0x80);
        }
    }

    /// E5M2 is the top byte of an IEEE binary16: decoding must agree with
    /// `half::f16` (an independent implementation).
    #[test]
    fn e5m2_decode_matches_f16_top_byte() {
        for c in all_codes() {
            let via_f16 = half::f16::from_bits((c as u16) << 8).to_f32();
            let ours = F8E5M2(c).to_f32();
            if via_f16.is_nan() {
                assert!(ours.is_nan());
            } else {
                assert_eq!(ours.to_bits(), via_f16.to_bits(), "code {c:#04x}");
            }
        }
    }

    /// Decoding is strictly increasing over the finite non-negative codes,
    /// and negative codes mirror them.
    #[test]
    fn decode_is_ordered_and_symmetric() {
        fn check(dec: impl Fn(u8) -> f32, finite_max: u8) {
            for c in 0..finite_max {
                assert!(dec(c) < dec(c + 1), "code {c:#04x}");
            }
            for c in 0..=finite_max {
                assert_eq!((-dec(c)).to_bits(), dec(c | 0x80).to_bits());
            }
        }
        check(|c| F8E4M3(c).to_f32(), 0x7E);
        check(|c| F8E5M2(c).to_f32(), 0x7C);
    }

    /// Every non-NaN code survives decode → encode, for both input types.
    #[test]
    fn roundtrip_all_codes() {
        for c in all_codes() {
            let a = F8E4M3(c);
            if !a.is_nan() {
                assert_eq!(F8E4M3::from_f32(a.to_f32()), a);
                assert_eq!(F8E4M3::from_bf16(a.to_bf16()), a);
            }
            let b = F8E5M2(c);
            if b.is_finite() {
                assert_eq!(F8E5M2::from_f32(b.to_f32()), b);
                assert_eq!(F8E5M2::from_bf16(b.to_bf16()), b);
            } else if b.is_infinite() {
                // Saturating: inf encodes to MAX.
                assert_eq!(F8E5M2::from_f32(b.to_f32()).0, c - 1);
            }
        }
    }

    #[test]
    fn specials() {
        for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001), f32::from_bits(0xFFFF_FFFF)] {
            assert_eq!(F8E4M3::from_f32(nan), F8E4M3::NAN);
            assert_eq!(F8E5M2::from_f32(nan), F8E5M2::NAN);
        }
        assert_eq!(F8E4M3::from_f32(f32::INFINITY), F8E4M3::MAX);
        assert_eq!(F8E4M3::from_f32(f32::NEG_INFINITY), F8E4M3::MIN);
        assert_eq!(F8E5M2::from_f32(f32::INFINITY), F8E5M2::MAX);
        assert_eq!(F8E5M2::from_f32(f32::NEG_INFINITY), F8E5M2::MIN);
        assert_eq!(F8E4M3::from_f32(f32::MAX), F8E4M3::MAX);
        assert_eq!(F8E4M3::from_f32(-0.0), F8E4M3::NEG_ZERO);
        assert_eq!(F8E5M2::from_f32(-f32::from_bits(1)), F8E5M2::NEG_ZERO);
        // Saturation thresholds.
        assert_eq!(F8E4M3::from_f32(464.0), F8E4M3::MAX);
        assert_eq!(F8E4M3::from_f32(479.0), F8E4M3::MAX);
        assert_eq!(F8E4M3::from_f32(511.9), F8E4M3::MAX);
        assert_eq!(F8E5M2::from_f32(61439.996), F8E5M2::MAX);
        assert_eq!(F8E5M2::from_f32(61440.0), F8E5M2::MAX);
        assert_eq!(F8E5M2::from_f32(65535.0), F8E5M2::MAX);
        // Subnormal ties: 2^-10 is half the E4M3 min subnormal → 0 (even);
        // 1.5 * 2^-9 ties between codes 1 and 2 → 2 (even).
        assert_eq!(F8E4M3::from_f32(2f32.powi(-10)), F8E4M3::ZERO);
        assert_eq!(F8E4M3::from_f32(f32::from_bits(2f32.powi(-10).to_bits() + 1)).0, 1);
        assert_eq!(F8E4M3::from_f32(1.5 * 2f32.powi(-9)).0, 2);
        assert_eq!(F8E4M3::from_f32(2.5 * 2f32.powi(-9)).0, 2);
        // Largest subnormal + rounding carries into the smallest normal.
        assert_eq!(F8E4M3::from_f32(7.5 * 2f32.powi(-9)), F8E4M3::MIN_POSITIVE);
    }

    #[test]
    fn bf16_path_equals_f32_path_for_all_bf16() {
        for b in 0..=u16::MAX {
            let x = Bf16::from_bits(b);
            let f = f32::from_bits(bf16_bits_to_f32_bits(b));
            assert_eq!(F8E4M3::from_bf16(x), F8E4M3::from_f32(f));
            assert_eq!(F8E5M2::from_bf16(x), F8E5M2::from_f32(f));
        }
    }

    #[test]
    fn to_bf16_is_exact() {
        for c in all_codes() {
            let a = F8E4M3(c);
            let b = F8E5M2(c);
            for (f, h) in [(a.to_f32(), a.to_bf16()), (b.to_f32(), b.to_bf16())] {
                if f.is_nan() {
                    assert!(h.is_nan());
                } else {
                    assert_eq!(h.to_f32().to_bits(), f.to_bits());
                }
            }
        }
    }

    #[test]
    fn slices() {
        let src = [1.0f32, -2.0, 1e9, f32::NAN];
        let mut dst = [F8E4M3::ZERO; 4];
        F8E4M3::encode_f32_slice(&src, &mut dst).unwrap();
        assert_eq!(dst, [F8E4M3::ONE, F8E4M3(0xC0), F8E4M3::MAX, F8E4M3::NAN]);

        let mut back = [0.0f32; 4];
        F8E4M3::decode_f32_slice(&dst, &mut back).unwrap();
        assert_eq!(&back[..3], &[1.0, -2.0, 448.0]);
        assert!(back[3].is_nan());

        let bsrc: Vec<Bf16> = src.iter().map(|&x| Bf16::from_f32(x)).collect();
        let mut e5 = [F8E5M2::ZERO; 4];
        F8E5M2::encode_bf16_slice(&bsrc, &mut e5).unwrap();
        assert_eq!(e5, [F8E5M2::ONE, F8E5M2(0xC0), F8E5M2::MAX, F8E5M2::NAN]);

        // Mismatched lengths: an error, and nothing written.
        let mut short = [F8E5M2(0x11); 3];
        let err = F8E5M2::encode_f32_slice(&src, &mut short).unwrap_err();
        assert_eq!(err, LengthMismatch { src: 4, dst: 3 });
        assert_eq!(short, [F8E5M2(0x11); 3]);
        assert!(err.to_string().contains("4") && err.to_string().contains("3"));
        assert!(F8E4M3::encode_bf16_slice(&bsrc, &mut []).is_err());
        assert!(F8E5M2::decode_f32_slice(&[], &mut back).is_err());
        assert!(F8E4M3::encode_f32_slice(&[], &mut []).is_ok());
    }

    #[test]
    fn pod_and_display() {
        let xs = [F8E4M3::ONE, F8E4M3::MAX];
        let bytes: &[u8] = bytemuck::cast_slice(&xs);
        assert_eq!(bytes, &[0x38, 0x7E]);
        assert_eq!(F8E4M3::MAX.to_string(), "448");
        assert_eq!(F8E5M2::NEG_INFINITY.to_string(), "-inf");
        assert_eq!(f32::from(F8E5M2::ONE), 1.0);
        assert_eq!(Bf16::from(F8E4M3::ONE), Bf16::ONE);
    }
}

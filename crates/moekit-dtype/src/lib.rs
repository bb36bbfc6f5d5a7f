//! Element types used across moekit.
//!
//! - [`Bf16`]: a re-export of [`half::bf16`].
//! - [`F8E4M3`] and [`F8E5M2`]: the two OCP/NVIDIA FP8 formats, stored as raw
//!   bytes, with conversions that match CUDA's `cuda_fp8.h`
//!   (`__nv_cvt_float_to_fp8` / `__nv_cvt_bfloat16raw_to_fp8` with
//!   `__NV_SATFINITE`, and `__nv_cvt_fp8_to_halfraw` for decoding) bit for bit,
//!   for every input. The tests check this exhaustively against CUDA's own
//!   host code through the `moekit-cuda-oracle` crate.
//!
//! No function in this crate panics, for any input.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod fp8;

pub use fp8::{F8E4M3, F8E5M2};
pub use half;
pub use half::bf16;

/// f32 -> BF16 as moekit's kernels round (`moekit::f32_to_bf16_bits_rne`): round to nearest
/// even on the bit pattern (overflow -> +-inf), every NaN -> the quiet NaN `0x7fc0` (sign and
/// payload dropped).
pub fn bf16_rne(x: f32) -> bf16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return bf16::from_bits(0x7fc0);
    }
    bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
}

/// Brain floating point (1 sign, 8 exponent, 7 mantissa bits); a re-export of
/// [`half::bf16`].
pub type Bf16 = half::bf16;

/// A slice conversion was given source and destination slices of different
/// lengths. Nothing was written to the destination.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LengthMismatch {
    /// Length of the source slice.
    pub src: usize,
    /// Length of the destination slice.
    pub dst: usize,
}

impl core::fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "slice length mismatch: source has {} elements, destination has {}", self.src, self.dst)
    }
}

impl std::error::Error for LengthMismatch {}

//! Property tests for FP8 encoding that need no CUDA: correct rounding against
//! a brute-force nearest search, monotonicity, totality.

use moekit_dtype::{Bf16, F8E4M3, F8E5M2};
use proptest::prelude::*;

/// Decoded value of the code `encode(x)`.
fn rt4(x: f32) -> f32 {
    F8E4M3::from_f32(x).to_f32()
}
fn rt5(x: f32) -> f32 {
    F8E5M2::from_f32(x).to_f32()
}

/// Brute force: the finite FP8 value nearest to `x` (same sign as `x`, so ±0
/// keep their sign), ties going to the even code. Values beyond MAX therefore
/// give MAX, which is also what saturating encoding does.
fn nearest(x: f32, decode: impl Fn(u8) -> f32, max_code: u8) -> f32 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let xd = x as f64;
    let mut best: Option<(u8, f64)> = None;
    for m in 0..=max_code {
        // Distances near a tie are between x and its two FP8 neighbours, which
        // are within a couple of binades of x, so they are exact in f64.
        let d = (decode(sign | m) as f64 - xd).abs();
        best = match best {
            Some((bm, bd)) if bd < d || (bd == d && bm % 2 == 0) => Some((bm, bd)),
            _ => Some((m, d)),
        };
    }
    let (m, _) = best.expect("max_code >= 0");
    decode(sign | m)
}

fn nearest4(x: f32) -> f32 {
    nearest(x, |c| F8E4M3::from_bits(c).to_f32(), F8E4M3::MAX.to_bits())
}
fn nearest5(x: f32) -> f32 {
    nearest(x, |c| F8E5M2::from_bits(c).to_f32(), F8E5M2::MAX.to_bits())
}

/// Finite f32s spread over the interesting range: log-uniform magnitudes from
/// 2^-20 (below both formats' subnormals) to 2^18 (above both MAXes), plus
/// uniform values, plus exact FP8 midpoints (ties) for both formats.
fn finite_f32() -> impl Strategy<Value = f32> {
    let log_uniform = (any::<bool>(), -20i32..=17, 0u32..(1 << 23)).prop_map(|(neg, e, m)| {
        let bits = (((e + 127) as u32) << 23) | m;
        let x = f32::from_bits(bits);
        if neg {
            -x
        } else {
            x
        }
    });
    let midpoint4 = (any::<bool>(), 0u8..0x7E).prop_map(|(neg, c)| {
        let x = (F8E4M3(c).to_f32() + F8E4M3(c + 1).to_f32()) / 2.0;
        if neg {
            -x
        } else {
            x
        }
    });
    let midpoint5 = (any::<bool>(), 0u8..0x7B).prop_map(|(neg, c)| {
        let x = (F8E5M2(c).to_f32() + F8E5M2(c + 1).to_f32()) / 2.0;
        if neg {
            -x
        } else {
            x
        }
    });
    prop_oneof![
        4 => log_uniform,
        2 => -70000.0f32..70000.0f32,
        1 => -1.0f32..1.0f32,
        1 => midpoint4,
        1 => midpoint5,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn encode_is_nearest_rne(x in finite_f32()) {
        prop_assert_eq!(rt4(x).to_bits(), nearest4(x).to_bits(), "E4M3 x = {:e}", x);
        prop_assert_eq!(rt5(x).to_bits(), nearest5(x).to_bits(), "E5M2 x = {:e}", x);
    }

    #[test]
    fn encode_is_monotonic(a in finite_f32(), b in finite_f32()) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(rt4(lo) <= rt4(hi), "E4M3 {:e} <= {:e}", lo, hi);
        prop_assert!(rt5(lo) <= rt5(hi), "E5M2 {:e} <= {:e}", lo, hi);
    }

    /// Total: any bit pattern encodes without panicking, NaN iff NaN input,
    /// and encoding never yields an infinity (saturating).
    #[test]
    fn encode_is_total(bits in any::<u32>()) {
        let x = f32::from_bits(bits);
        let a = F8E4M3::from_f32(x);
        let b = F8E5M2::from_f32(x);
        prop_assert_eq!(a.is_nan(), x.is_nan());
        prop_assert_eq!(b.is_nan(), x.is_nan());
        prop_assert!(!b.is_infinite());
        if x.is_nan() {
            prop_assert_eq!(a, F8E4M3::NAN);
            prop_assert_eq!(b, F8E5M2::NAN);
        } else {
            prop_assert_eq!(a.is_sign_negative(), x.is_sign_negative());
            prop_assert_eq!(b.is_sign_negative(), x.is_sign_negative());
        }
    }
}

/// Monotonicity, exhaustively over all non-NaN bf16 values in increasing
/// order (65536 inputs, every binade).
#[test]
fn encode_is_monotonic_over_all_bf16() {
    let mut xs: Vec<Bf16> = (0..=u16::MAX).map(Bf16::from_bits).filter(|x| !x.is_nan()).collect();
    xs.sort_by(|a, b| a.to_f32().total_cmp(&b.to_f32()));
    for w in xs.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(F8E4M3::from_bf16(a).to_f32() <= F8E4M3::from_bf16(b).to_f32(), "E4M3 {a} {b}");
        assert!(F8E5M2::from_bf16(a).to_f32() <= F8E5M2::from_bf16(b).to_f32(), "E5M2 {a} {b}");
    }
}

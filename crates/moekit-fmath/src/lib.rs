//! Reproducible f32 arithmetic: the Rust twin of `kernels/include/moekit/fmath.cuh`, and the
//! summation order of the kernels' warp reductions.
//!
//! Only correctly rounded IEEE-754 operations are used (Rust never fuses `a * b + c`;
//! [`f32::mul_add`] is a true fma), in the same order as the device code, so these functions
//! return the same bits as the kernels. A change here must change the header too (the
//! kernels' bitwise tests fail otherwise).

/// 2^n for n in [-126, 127], built from its bits.
#[inline(always)]
fn exp2i(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `e^x`, within 2 ulp of the exact value over the whole f32 range (NaN -> NaN,
/// `x > 88.72283935546875` -> +inf, `x < -104` -> +0).
///
/// Range reduction `x = n ln2 + r` (n = rint(x log2 e) through the 1.5 * 2^23 trick inside
/// one fma; r by a two-constant Cody-Waite step), `e^r` by the degree-7 Taylor polynomial in
/// Horner form, then two exact scalings by powers of two so a subnormal result is rounded once.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Branch-free, so that loops over it vectorise: the polynomial runs on x clamped into
    // [-104, 88.72283935546875] (NaN on 0), and the special cases are selected at the end.
    let hi = f32::from_bits(0x42b1_7218);
    let xc = if x.is_nan() { 0.0 } else { x.clamp(-104.0, hi) };
    let magic = 12_582_912.0f32; // 1.5 * 2^23
    let t = xc.mul_add(f32::from_bits(0x3fb8_aa3b), magic); // log2(e)
    let n = t - magic;
    let r = n.mul_add(-f32::from_bits(0x3f31_7200), xc); // ln2, high 15 bits
    let r = n.mul_add(-f32::from_bits(0x35bf_be8e), r); // ln2, the rest
    let mut p = f32::from_bits(0x3950_0d01); // 1/7!
    p = p.mul_add(r, f32::from_bits(0x3ab6_0b61)); // 1/6!
    p = p.mul_add(r, f32::from_bits(0x3c08_8889)); // 1/5!
    p = p.mul_add(r, f32::from_bits(0x3d2a_aaab)); // 1/4!
    p = p.mul_add(r, f32::from_bits(0x3e2a_aaab)); // 1/3!
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // n in [-150, 128] is an integer, and t = 1.5 * 2^23 + n lies where f32 spacing is 1, so
    // n is t's low mantissa bits: the same value as `n as i32`, without a saturating
    // conversion (which does not vectorise).
    let ni = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let y = p * exp2i(n1) * exp2i(n2);
    if x.is_nan() {
        x
    } else if x > hi {
        f32::INFINITY
    } else if x < -104.0 {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + e^-x)` with [`exp`] and a correctly rounded division.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn map_portable<F: Fn(f32) -> f32>(xs: &[f32], f: F) -> Vec<f32> {
    // A plain loop (not `collect`, which would not be inlined into `map_fma`).
    #[allow(clippy::needless_range_loop)]
    let mut out = vec![0.0f32; xs.len()];
    for i in 0..xs.len() {
        out[i] = f(xs[i]);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn map_fma<F: Fn(f32) -> f32>(xs: &[f32], f: F) -> Vec<f32> {
    map_portable(xs, f)
}

/// `xs.map(f)` for `f` built from this module's functions, compiled with the CPU's FMA
/// instruction when it has one (a software `fmaf` call otherwise). Same bits either way:
/// an fma is correctly rounded however it is computed.
pub fn map<F: Fn(f32) -> f32>(xs: &[f32], f: F) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA, the only target feature map_fma enables.
        return unsafe { map_fma(xs, f) };
    }
    map_portable(xs, f)
}

/// The kernels' warp sum of one value per lane, in its fixed order: a butterfly over 32 lanes
/// (partner lane 16 apart first, then 8, 4, 2, 1). `values[l]` is lane `l`'s partial; missing
/// lanes count as `+0`. Every lane of the device ends with these bits.
pub fn warp_sum(values: &[f32]) -> f32 {
    let mut p = [0.0f32; 32];
    p[..values.len()].copy_from_slice(values);
    butterfly_sum(&mut p)
}

/// The butterfly sum over a team of `p.len()` lanes (a power of two, at most 32): partner
/// `len / 2` apart first, then halving; what every lane of the team ends with. Consumes `p`.
pub fn butterfly_sum(p: &mut [f32]) -> f32 {
    debug_assert!(p.len().is_power_of_two() && p.len() <= 32);
    let mut off = p.len() / 2;
    while off > 0 {
        let mut prev = [0.0f32; 32];
        prev[..p.len()].copy_from_slice(p);
        for (l, v) in p.iter_mut().enumerate() {
            *v = prev[l] + prev[l ^ off];
        }
        off >>= 1;
    }
    p[0]
}

/// Every NaN as the canonical quiet NaN `0x7fc00000` (IEEE leaves a NaN result's sign and
/// payload to the hardware: x86 makes `0xffc00000`, NVIDIA GPUs `0x7fffffff`); kernels that
/// promise the same bits on every device pass their float outputs through it.
pub fn canon(x: f32) -> f32 {
    if x.is_nan() {
        f32::from_bits(0x7fc0_0000)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w).abs().max(f32::from_bits(1)) as f64;
        ((got as f64) - want).abs() / ulp
    }

    #[test]
    fn exp_within_two_ulp_over_the_whole_range() {
        let mut worst = 0.0f64;
        // Every 97th f32 in [-104, 88.73] (about 20 million values).
        let (lo, hi) = (-104.0f32, 88.72283f32);
        for bits in (0u32..0x8000_0000).step_by(97) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if !(lo..=hi).contains(&x) {
                    continue;
                }
                let want = (x as f64).exp();
                if want < f32::MIN_POSITIVE as f64 {
                    // Subnormal result: within one subnormal step.
                    assert!(((exp(x) as f64) - want).abs() <= f32::from_bits(1) as f64, "exp({x})");
                    continue;
                }
                let u = ulps(exp(x), want);
                worst = worst.max(u);
                assert!(u < 2.0, "exp({x:e}) = {:e}, want {want:e}: {u} ulp", exp(x));
            }
        }
        assert!(worst > 0.0);
    }

    #[test]
    fn exp_edges() {
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(88.72283).is_finite());
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(-103.0) > 0.0 && exp(-103.0) < f32::MIN_POSITIVE);
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(200.0), 1.0);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert!(sigmoid(f32::NAN).is_nan());
    }
}

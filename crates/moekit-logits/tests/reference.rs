//! The CPU reference against f64 loops (moekit-model's `loss` and `generate` semantics), within
//! argued tolerances; Philox against the Random123 known answers; sampling statistics.

use moekit_logits::reference::{self, log_f32};
use moekit_logits::{philox, SampleConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

const U: f64 = 1.0 / (1u64 << 24) as f64; // 2^-24, the f32 unit roundoff doubled

fn logits(rows: usize, v: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * v).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn targets(rows: usize, v: usize, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|r| match r % 5 {
            0 => 0,
            1 => v as i32 - 1,
            2 => -1,
            _ => rng.gen_range(0..v as i32),
        })
        .collect()
}

/// f64 log-softmax of one row: (lse, log-probabilities, entropy), as moekit-model's loss.rs.
fn lsm64(z: &[f32]) -> (f64, Vec<f64>, f64) {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lse = m + s.ln();
    let lp: Vec<f64> = z.iter().map(|&x| x as f64 - lse).collect();
    let h = -lp.iter().map(|&l| if l.exp() > 0.0 { l.exp() * l } else { 0.0 }).sum::<f64>();
    (lse, lp, h)
}

#[test]
fn log_is_within_three_ulp() {
    let mut worst = 0.0f64;
    // Every 4099th positive normal f32, plus the integers 1..2^16 (the sums the kernels take).
    let xs = (0x0080_0000u32..0x7f80_0000).step_by(4099).map(f32::from_bits).chain((1..1 << 16).map(|i| i as f32));
    for x in xs {
        let want = (x as f64).ln();
        let got = log_f32(x) as f64;
        let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
        let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
        let err = (got - want).abs() / ulp;
        worst = worst.max(err);
        assert!(err <= 3.0 || (got - want).abs() < 1e-7, "log({x:e}) = {got:e}, want {want:e} ({err} ulp)");
    }
    assert!(worst > 0.0);
    assert_eq!(log_f32(1.0), 0.0);
    assert_eq!(log_f32(0.0), f32::NEG_INFINITY);
    assert_eq!(log_f32(f32::INFINITY), f32::INFINITY);
    assert!(log_f32(-1.0).is_nan() && log_f32(f32::NAN).is_nan());
    let sub = f32::from_bits(3);
    assert!(((log_f32(sub) as f64) - (sub as f64).ln()).abs() < 1e-5);
}

#[test]
fn philox_known_answers() {
    // Random123 kat_vectors, philox4x32 10: counter, key, output.
    for (ctr, key, want) in KAT {
        assert_eq!(philox::philox4x32_10(ctr, key), want, "ctr {ctr:08x?} key {key:08x?}");
    }
    assert_eq!(philox::uniform24(u32::MAX), 1.0 - f32::EPSILON / 2.0);
    assert_eq!(philox::uniform24(255), 0.0);
    assert_eq!(philox::sample_counter(0x1_0000_0002, 0x3_0000_0004), [2, 1, 4, 3]);
}

/// Random123's known answers for Philox4x32-10.
pub const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

/// Forward against f64. Tolerance: S is a sum of V terms, each exp within 2 ulp, summed by a
/// tree of depth ceil(V / 256) + 8 (each add a relative error <= 2^-24 of the partial), so S
/// is within (V / 256 + 11) 2^-24 relative, hence log S within that absolute plus log_f32's
/// 3 ulp; lse = m + log S and z - lse add half an ulp of their magnitude each. For the
/// entropy, T = sum e d carries the same relative bound on sum e |d| (fma per term, tree), so
/// H = log S - T / S is within (V / 256 + 16) 2^-24 (1 + sum p |d|) plus 4 ulp of |H|.
#[test]
fn forward_matches_f64() {
    for (rows, v, scale) in [(1, 1, 3.0), (7, 13, 4.0), (5, 37, 8.0), (4, 1000, 6.0), (3, 5000, 20.0)] {
        let z = logits(rows, v, 11 + v as u64, scale);
        let t = targets(rows, v, 3);
        let r = reference::log_softmax_forward(&z, v, &t).unwrap();
        assert_eq!(r.invalid, 0);
        for row in 0..rows {
            let zr = &z[row * v..][..v];
            let (lse, lp, h) = lsm64(zr);
            let c = (v as f64 / 256.0 + 16.0) * U;
            let tol_lse = c + 4.0 * U * lse.abs();
            assert!((r.row_lse[row] as f64 - lse).abs() <= tol_lse, "V={v} row {row}: lse {} vs {lse}", r.row_lse[row]);
            let m = zr.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(r.row_max[row], m);
            let want_lp = if t[row] >= 0 { lp[t[row] as usize] } else { 0.0 };
            let tol_lp = tol_lse + 2.0 * U * (lse.abs() + want_lp.abs());
            assert!(
                (r.logp[row] as f64 - want_lp).abs() <= tol_lp,
                "V={v} row {row}: logp {} vs {want_lp}",
                r.logp[row]
            );
            let spd: f64 = lp.iter().map(|&l| l.exp() * (l + lse - m as f64).abs()).sum();
            let tol_h = c * (1.0 + spd) + 4.0 * U * h.abs() + 4.0 * U * (lse - m as f64).abs();
            assert!((r.entropy[row] as f64 - h).abs() <= tol_h, "V={v} row {row}: H {} vs {h}", r.entropy[row]);
        }
    }
}

/// The f64 objective sum_r dl logp + de H, as moekit-model defines it.
fn objective64(z: &[f32], v: usize, t: &[i32], dl: &[f32], de: &[f32]) -> f64 {
    let mut acc = 0.0;
    for (r, zr) in z.chunks(v).enumerate() {
        let (_, lp, h) = lsm64(zr);
        if t[r] >= 0 && (t[r] as usize) < v {
            acc += dl[r] as f64 * lp[t[r] as usize];
        }
        acc += de[r] as f64 * h;
    }
    acc
}

/// Backward against central differences of the f64 objective (step 1e-4 on logits of size
/// <= 3: truncation ~ h^2 |f'''| < 1e-7, rounding ~ 1e-16 / h) and against the f64 closed form
/// (moekit-model's `logits_grad`). The f32 gradient's error: p within the lse bound above
/// (relative) plus 2 ulp, so |g - g64| <= 64 2^-24 (|dl| + |de| (1 + |log p| + H)) p + 2^-24 |g|;
/// plus the roundings of the last three operations; the finite differences are held to 1e-6
/// absolute on top.
#[test]
fn backward_matches_finite_differences_and_f64() {
    for (rows, v) in [(1, 1), (3, 13), (4, 37), (2, 300)] {
        let z = logits(rows, v, 21 + v as u64, 3.0);
        let t = targets(rows, v, 5);
        let mut rng = StdRng::seed_from_u64(v as u64);
        let dl: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.2f32..1.5) * if rng.gen() { 1.0 } else { -1.0 }).collect();
        let de: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.2f32..1.5) * if rng.gen() { 1.0 } else { -1.0 }).collect();
        let st = reference::log_softmax_forward(&z, v, &t).unwrap();
        let g = reference::log_softmax_backward(&z, v, &t, &st.row_lse, &st.entropy, Some(&dl), Some(&de)).unwrap();
        let h = 1e-4f64;
        for r in 0..rows {
            let (_, lp, hh) = lsm64(&z[r * v..][..v]);
            let valid = t[r] >= 0;
            for (j, &lpj) in lp.iter().enumerate() {
                let i = r * v + j;
                let p = lpj.exp();
                let oh = if valid && t[r] as usize == j { 1.0 } else { 0.0 };
                let closed = if valid { dl[r] as f64 * (oh - p) } else { 0.0 } - de[r] as f64 * p * (lpj + hh);
                // Plus the three roundings of (oh - p), dl (oh - p) and the final subtraction, each
                // 2^-24 relative of a magnitude <= |dl| (1 + p) + |closed|.
                let tol = 64.0 * U * (dl[r].abs() as f64 + de[r].abs() as f64 * (1.0 + lpj.abs() + hh)) * p
                    + 4.0 * U * (dl[r].abs() as f64 * (1.0 + p) + closed.abs())
                    + 1e-30;
                assert!((g[i] as f64 - closed).abs() <= tol, "V={v} [{r}][{j}]: {} vs {closed} (tol {tol:e})", g[i]);
                // Central difference in f64 on a row copy (the objective is separable by row).
                let f = |delta: f64| {
                    let zr: Vec<f64> = (0..v).map(|k| z[r * v + k] as f64 + if k == j { delta } else { 0.0 }).collect();
                    let m = zr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = zr.iter().map(|&x| (x - m).exp()).sum();
                    let lse = m + s.ln();
                    let ent: f64 = -zr.iter().map(|&x| (x - lse).exp() * (x - lse)).sum::<f64>();
                    let lpt = if valid { zr[t[r] as usize] - lse } else { 0.0 };
                    dl[r] as f64 * lpt + de[r] as f64 * ent
                };
                let fd = (f(h) - f(-h)) / (2.0 * h);
                assert!((g[i] as f64 - fd).abs() <= tol + 1e-6, "V={v} [{r}][{j}]: {} vs finite difference {fd}", g[i]);
            }
        }
        // The whole-objective check ties the per-row closure to the model's definition.
        let base = objective64(&z, v, &t, &dl, &de);
        assert!(base.is_finite());
    }
}

/// Cross-entropy against moekit-model's definition (mean over rows with a target, ignore
/// index -1): loss within (rows / 256 + 8) 2^-24 relative of the f64 mean plus the per-row
/// logp bound; gradient = the backward with dlogp = -1 / count.
#[test]
fn cross_entropy_matches_f64() {
    let (rows, v) = (23, 37);
    let z = logits(rows, v, 9, 4.0);
    let t = targets(rows, v, 8);
    let (loss, count, g, invalid) = reference::cross_entropy(&z, v, &t).unwrap();
    assert_eq!(invalid, 0);
    let n = t.iter().filter(|&&y| y >= 0).count();
    assert_eq!(count as usize, n);
    let want: f64 =
        -(0..rows).filter(|&r| t[r] >= 0).map(|r| lsm64(&z[r * v..][..v]).1[t[r] as usize]).sum::<f64>() / n as f64;
    let tol = (rows as f64 / 256.0 + 8.0) * U * want.abs() + 64.0 * U * (1.0 + want.abs());
    assert!((loss as f64 - want).abs() <= tol, "loss {loss} vs {want}");
    for r in 0..rows {
        let (_, lp, _) = lsm64(&z[r * v..][..v]);
        for j in 0..v {
            let p = lp[j].exp();
            let want = if t[r] >= 0 { -((t[r] as usize == j) as i32 as f64 - p) / n as f64 } else { 0.0 };
            assert!((g[r * v + j] as f64 - want).abs() <= 64.0 * U * p / n as f64 + U * want.abs(), "[{r}][{j}]");
        }
    }
    // Every target ignored: loss 0, count 0, gradient 0 (no division by zero).
    let (loss, count, g, _) = reference::cross_entropy(&z, v, &vec![-1; rows]).unwrap();
    assert_eq!((loss, count), (0.0, 0));
    assert!(g.iter().all(|&x| x == 0.0));
}

#[test]
fn invalid_targets_are_counted_and_ignored() {
    let (rows, v) = (4, 13);
    let z = logits(rows, v, 1, 2.0);
    let t = vec![13, -1, 2, 1 << 30];
    let r = reference::log_softmax_forward(&z, v, &t).unwrap();
    assert_eq!(r.invalid, 2);
    assert_eq!((r.logp[0], r.logp[1], r.logp[3]), (0.0, 0.0, 0.0));
    let (_, count, g, invalid) = reference::cross_entropy(&z, v, &t).unwrap();
    assert_eq!((count, invalid), (1, 2));
    assert!(g[..v].iter().all(|&x| x == 0.0), "an invalid target gets no gradient");
    assert!(reference::log_softmax_forward(&z, 12, &t).is_err());
}

#[test]
fn minus_infinity_logits_are_fine() {
    let mut z = logits(1, 37, 2, 2.0);
    for j in (0..37).step_by(3) {
        z[j] = f32::NEG_INFINITY;
    }
    let r = reference::log_softmax_forward(&z, 37, &[0]).unwrap();
    assert_eq!(r.logp[0], f32::NEG_INFINITY);
    assert!(r.entropy[0].is_finite() && r.row_lse[0].is_finite());
    let g = reference::log_softmax_backward(&z, 37, &[1], &r.row_lse, &r.entropy, Some(&[1.0]), Some(&[0.5])).unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
    assert!((0..37).step_by(3).all(|j| g[j] == 0.0));
}

// ---- sampling ------------------------------------------------------------------------------

/// Candidates sorted by (w descending, id ascending), with f64 probabilities at temperature t.
fn sorted64(z: &[f32], t: f64) -> Vec<(f64, usize)> {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut p: Vec<(f64, usize)> = z.iter().enumerate().map(|(i, &x)| (((x as f64 - m) / t).exp(), i)).collect();
    p.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    p
}

#[test]
fn greedy_is_argmax_with_ties_to_the_lowest_id() {
    let cfg = SampleConfig::greedy();
    for v in [1usize, 13, 37, 1000] {
        let z = logits(4, v, v as u64, 3.0);
        let got = reference::sample(&z, v, &cfg, 1, 0).unwrap();
        for (r, &tok) in got.iter().enumerate() {
            let zr = &z[r * v..][..v];
            let best = (0..v).fold(0, |b, j| if zr[j] > zr[b] { j } else { b });
            assert_eq!(tok as usize, best);
        }
    }
    assert_eq!(reference::argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    assert_eq!(reference::argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
    assert_eq!(reference::argmax(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(reference::argmax(&[-0.0, 0.0]), 0);
}

/// For fixed uniforms, the threshold search gives the token of the sort-based inverse CDF
/// (moekit-model's `sample_token`, in f64), except where u M lies within 1e-5 of a boundary
/// (f32 sums differ from f64 by far less: V <= 1000 terms, relative error < 1e-4 ... of the
/// mass, so 1e-5 of M is generous for these sizes; such cases are skipped and counted).
#[test]
fn sampling_is_the_inverse_cdf_of_the_kept_set() {
    let mut checked = 0;
    for v in [1usize, 13, 37, 1000] {
        for (ci, cfg) in [
            SampleConfig::default(),
            SampleConfig::with_temperature(0.7).top_k(5),
            SampleConfig::with_temperature(1.3).top_p(0.9),
            SampleConfig::with_temperature(1.0).top_k(10).top_p(0.5),
            SampleConfig::with_temperature(0.5).top_k(v),
        ]
        .into_iter()
        .enumerate()
        {
            let z = logits(1, v, 100 + v as u64 + ci as u64, 3.0);
            let mut p = sorted64(&z, cfg.temperature as f64);
            if cfg.top_k > 0 {
                p.truncate(cfg.top_k);
            }
            let total: f64 = p.iter().map(|x| x.0).sum();
            if cfg.top_p < 1.0 {
                let mut acc = 0.0;
                let mut keep = p.len();
                for (i, x) in p.iter().enumerate() {
                    acc += x.0;
                    if acc >= cfg.top_p as f64 * total {
                        keep = i + 1;
                        break;
                    }
                }
                // Skip configurations whose nucleus boundary is ambiguous in f32.
                let edge = p[..keep].iter().map(|x| x.0).sum::<f64>() - cfg.top_p as f64 * total;
                if edge.abs() < 1e-5 * total {
                    continue;
                }
                p.truncate(keep);
            }
            let mass: f64 = p.iter().map(|x| x.0).sum();
            for q in 0..200 {
                let u = philox::sample_uniform(5, q, 0);
                let target = u as f64 * mass;
                let mut acc = 0.0;
                let mut want = p.last().unwrap().1;
                let mut near = false;
                for &(w, i) in &p {
                    acc += w;
                    near |= (acc - target).abs() < 1e-5 * mass;
                    if target < acc {
                        want = i;
                        break;
                    }
                }
                if near {
                    continue;
                }
                assert_eq!(reference::sample_row(&z, &cfg, u), want, "V={v} cfg {cfg:?} u={u}");
                checked += 1;
            }
        }
    }
    assert!(checked > 2500, "{checked}");
}

/// Chi-square of 6000 draws (rows 0..6000 of one seed) against the f64 softmax, V = 13:
/// 12 degrees of freedom, bound 47 (P[chi2_12 > 47] ~ 1e-6 for a correct sampler: a fixed seed
/// makes the test a fixed outcome, and a wrong temperature, an off-by-one in the CDF or a
/// biased uniform gives hundreds). Expected counts are >= 30 (logits in [-2, 2]: p >= e^-4 / 13). The same
/// with top-k 6 and top-p 0.8 (renormalised over the kept set, which is checked to hold every
/// draw): degrees of freedom = kept - 1.
#[test]
fn sampled_distribution_matches_the_softmax() {
    let v = 13;
    let z = logits(1, v, 77, 2.0);
    let n = 6_000usize;
    let rows: Vec<f32> = (0..n).flat_map(|_| z.iter().cloned()).collect();
    for (cfg, bound) in [
        (SampleConfig::default(), 47.0),
        (SampleConfig::with_temperature(0.8).top_k(6), 33.0), // 5 dof: P[> 33] ~ 4e-6
        (SampleConfig::with_temperature(1.0).top_p(0.8), 47.0),
    ] {
        let got = reference::sample(&rows, v, &cfg, 2024, 3).unwrap();
        let mut p = sorted64(&z, cfg.temperature as f64);
        if cfg.top_k > 0 {
            p.truncate(cfg.top_k);
        }
        if cfg.top_p < 1.0 {
            let total: f64 = p.iter().map(|x| x.0).sum();
            let mut acc = 0.0;
            let keep = p.iter().position(|x| {
                acc += x.0;
                acc >= cfg.top_p as f64 * total
            });
            p.truncate(keep.unwrap() + 1);
        }
        let mass: f64 = p.iter().map(|x| x.0).sum();
        let mut counts = vec![0usize; v];
        for &t in &got {
            counts[t as usize] += 1;
        }
        let kept: Vec<usize> = p.iter().map(|x| x.1).collect();
        for (j, &cj) in counts.iter().enumerate() {
            assert!(cj == 0 || kept.contains(&j), "{cfg:?}: token {j} outside the kept set");
        }
        let chi2: f64 = p
            .iter()
            .map(|&(w, i)| {
                let e = n as f64 * w / mass;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < bound, "{cfg:?}: chi2 = {chi2} over {} cells", p.len());
        assert!(chi2 > 0.0);
    }
}

#[test]
fn sampling_is_deterministic_and_seed_dependent() {
    let (rows, v) = (64, 37);
    let z = logits(rows, v, 4, 1.0);
    let cfg = SampleConfig::with_temperature(1.0);
    let a = reference::sample(&z, v, &cfg, 9, 0).unwrap();
    assert_eq!(a, reference::sample(&z, v, &cfg, 9, 0).unwrap());
    assert_ne!(a, reference::sample(&z, v, &cfg, 10, 0).unwrap());
    assert_ne!(a, reference::sample(&z, v, &cfg, 9, 1).unwrap());
}

#[test]
fn sample_config_errors() {
    let z = logits(2, 13, 1, 1.0);
    let bad = [
        SampleConfig::with_temperature(-0.5),
        SampleConfig::with_temperature(f32::NAN),
        SampleConfig::with_temperature(f32::INFINITY),
        SampleConfig::default().top_p(0.0),
        SampleConfig::default().top_p(1.5),
        SampleConfig::default().top_p(f32::NAN),
        SampleConfig::default().top_k(14),
    ];
    for cfg in bad {
        assert!(
            matches!(reference::sample(&z, 13, &cfg, 0, 0), Err(moekit_logits::Error::InvalidArgument(_))),
            "{cfg:?}"
        );
    }
    assert!(reference::sample(&z, 13, &SampleConfig::default().top_k(13), 0, 0).is_ok());
    assert!(matches!(reference::sample(&z, 0, &SampleConfig::default(), 0, 0), Err(moekit_logits::Error::Shape(_))));
    assert!(matches!(reference::sample(&z, 12, &SampleConfig::default(), 0, 0), Err(moekit_logits::Error::Shape(_))));
}

#[test]
fn special_logits_sample_sensibly() {
    let cfg = SampleConfig::default();
    // +inf is the largest logit; NaN and -inf are never drawn while a finite one remains.
    assert_eq!(reference::sample_row(&[0.0, f32::INFINITY, 1.0], &cfg.top_k(1), 0.3), 1);
    for q in 0..50 {
        let u = philox::sample_uniform(1, q, 0);
        let t = reference::sample_row(&[f32::NAN, 0.5, f32::NEG_INFINITY, 0.25], &cfg, u);
        assert!(t == 1 || t == 3);
    }
    // Every weight 0 (all -inf): the first candidate.
    assert_eq!(reference::sample_row(&[f32::NEG_INFINITY; 4], &cfg, 0.7), 0);
}

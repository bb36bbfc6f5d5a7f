//! The CPU reference against a plain f64 softmax attention (forward, lse, backward) within
//! bounds argued from f32 rounding (tests/common), the f64 backward against finite
//! differences, the reproducible log against f64, and the cached path against the forward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use moekit_attention::{reference, AttnShape, Error};

fn shapes() -> Vec<AttnShape> {
    let s = |batch, heads, head_dim, seq| AttnShape { batch, heads, head_dim, seq };
    vec![
        s(1, 1, 16, 1),
        s(1, 1, 32, 7),
        s(2, 3, 16, 33),
        s(1, 2, 64, 40),
        s(1, 1, 128, 9),
        s(2, 1, 48, 20),
        s(1, 1, 8, 100),
        s(1, 2, 32, 130),
    ]
}

#[test]
fn log_is_within_4_ulp_of_f64() {
    // The softmax sum lies in [1, keys]; also check well beyond, down to the smallest normal.
    let mut xs: Vec<f32> = (0..200_000).map(|i| 1.0 + i as f32 * 0.01).collect();
    xs.extend(random(100_000, 1.0, 9).iter().map(|x| f32::from_bits(x.to_bits() & 0x7fff_ffff).max(f32::MIN_POSITIVE)));
    xs.extend([f32::MIN_POSITIVE, 0.5, 1.0, std::f32::consts::SQRT_2, 2.0, 2048.0, 65535.0, f32::MAX]);
    for &x in &xs {
        let got = reference::log(x) as f64;
        let want = (x as f64).ln();
        let w = (want as f32).abs();
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        assert!((got - want).abs() <= 4.0 * ulp, "log({x:e}) = {got:e}, f64 {want:e}");
    }
    assert_eq!(reference::log(1.0), 0.0);
}

#[test]
fn forward_matches_f64_within_argued_bounds() {
    for (k, shape) in shapes().into_iter().enumerate() {
        let qkv = if k % 2 == 0 { rising_qkv(&shape, 10 + k as u64) } else { random_qkv(&shape, 10 + k as u64) };
        let (out, lse) = reference::forward(&qkv, &shape).unwrap();
        let (o64, l64, _, oabs) = forward64(&qkv, &shape);
        let (ds, smax) = score_error(&qkv, &shape);
        let lmax = l64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let (eps_out, lse_err) = forward_bounds(&shape, ds, smax, lmax);
        for i in 0..out.len() {
            let err = (out[i] as f64 - o64[i]).abs();
            assert!(
                err <= 2.0 * eps_out * oabs[i],
                "{shape:?} out[{i}] = {:e}, f64 {:e} (err {err:e})",
                out[i],
                o64[i]
            );
        }
        for i in 0..lse.len() {
            let err = (lse[i] as f64 - l64[i]).abs();
            assert!(err <= 2.0 * lse_err, "{shape:?} lse[{i}] = {:e}, f64 {:e}", lse[i], l64[i]);
        }
    }
}

#[test]
fn backward_matches_f64_within_argued_bounds() {
    for (k, shape) in shapes().into_iter().enumerate() {
        let qkv = if k % 2 == 0 { rising_qkv(&shape, 20 + k as u64) } else { random_qkv(&shape, 20 + k as u64) };
        let dout = random(shape.out_len(), 1.0, 30 + k as u64);
        let (out, lse) = reference::forward(&qkv, &shape).unwrap();
        let g = reference::backward(&qkv, &out, &lse, &dout, &shape).unwrap();
        let (g64, gabs) = backward64(&qkv, &dout, &shape);
        let (ds, smax) = score_error(&qkv, &shape);
        let (_, l64, _, _) = forward64(&qkv, &shape);
        let lmax = l64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let (eps_out, lse_err) = forward_bounds(&shape, ds, smax, lmax);
        let eps = backward_bound(&shape, ds, smax, 2.0 * eps_out, 2.0 * lse_err);
        for i in 0..g.len() {
            let err = (g[i] as f64 - g64[i]).abs();
            assert!(
                err <= 2.0 * eps * gabs[i],
                "{shape:?} dqkv[{i}] = {:e}, f64 {:e} (err {err:e}, bound {:e})",
                g[i],
                g64[i],
                2.0 * eps * gabs[i]
            );
        }
    }
}

/// The oracle itself: the f64 backward is the derivative of `sum(out * dout)` (central
/// differences in f64, step 1e-5: truncation ~1e-10 relative, far below the 1e-6 allowed).
#[test]
fn f64_backward_matches_finite_differences() {
    let shape = AttnShape { batch: 2, heads: 2, head_dim: 4, seq: 5 };
    let qkv = random_qkv(&shape, 5);
    let dout = random(shape.out_len(), 1.0, 6);
    let (g, _) = backward64(&qkv, &dout, &shape);
    // The f64 forward of an f64 perturbation: rebuild from f32 inputs plus a delta.
    let loss = |x: &[f64]| -> f64 {
        let (o, ..) = forward64_f64(x, &shape);
        o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum()
    };
    let base: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
    let h = 1e-5;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + g[i].abs()),
            "dqkv[{i}]: analytic {:e}, finite differences {fd:e}",
            g[i]
        );
    }
}

/// f64 forward on f64 inputs (for the finite differences): the same formulas as
/// `forward64`.
fn forward64_f64(x: &[f64], shape: &AttnShape) -> (Vec<f64>,) {
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0; shape.out_len()];
    for b in 0..shape.batch {
        for h in 0..heads {
            let row = |i: usize, part: usize| &x[(b * s + i) * 3 * d + part * d + h * hd..][..hd];
            for i in 0..s {
                let sc: Vec<f64> =
                    (0..=i).map(|j| row(i, 0).iter().zip(row(j, 1)).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                for j in 0..=i {
                    let p = (sc[j] - m).exp() / l;
                    for c in 0..hd {
                        out[(b * s + i) * d + h * hd + c] += p * row(j, 2)[c];
                    }
                }
            }
        }
    }
    (out,)
}

/// A prefill of 5 positions through the cache, then one position at a time up to 37 (past a
/// key tile): every step's output and lse equal the full forward's rows bit for bit, and the
/// caches hold the keys and values.
#[test]
fn cached_steps_equal_forward_rows_bitwise() {
    let full = AttnShape { batch: 2, heads: 3, head_dim: 16, seq: 37 };
    let qkv = random_qkv(&full, 77);
    let (out, lse) = reference::forward(&qkv, &full).unwrap();
    let (d, max_len) = (full.d(), 40);
    let mut kc = vec![0.0f32; full.cache_len(max_len)];
    let mut vc = vec![0.0f32; full.cache_len(max_len)];
    let mut pos = 0;
    while pos < full.seq {
        let s = if pos == 0 { 5 } else { 1 };
        let step = AttnShape { seq: s, ..full };
        let rows: Vec<f32> =
            (0..full.batch).flat_map(|b| qkv[(b * full.seq + pos) * 3 * d..][..s * 3 * d].to_vec()).collect();
        let (o, l) = reference::forward_cached(&rows, &mut kc, &mut vc, &step, pos, max_len).unwrap();
        for b in 0..full.batch {
            for i in 0..s {
                let t = pos + i;
                assert_bits(
                    &format!("out b={b} t={t}"),
                    &o[(b * s + i) * d..][..d],
                    &out[(b * full.seq + t) * d..][..d],
                );
                for h in 0..full.heads {
                    assert_eq!(
                        l[(b * full.heads + h) * s + i].to_bits(),
                        lse[(b * full.heads + h) * full.seq + t].to_bits(),
                        "lse b={b} h={h} t={t}"
                    );
                }
            }
        }
        pos += s;
    }
    for b in 0..full.batch {
        for h in 0..full.heads {
            for t in 0..full.seq {
                let at = ((b * full.heads + h) * max_len + t) * 16;
                let src = (b * full.seq + t) * 3 * d + h * 16;
                assert_bits("k cache", &kc[at..][..16], &qkv[src + d..][..16]);
                assert_bits("v cache", &vc[at..][..16], &qkv[src + 2 * d..][..16]);
            }
        }
    }
}

#[test]
fn reference_rejects_bad_shapes() {
    let ok = AttnShape { batch: 1, heads: 2, head_dim: 8, seq: 3 };
    let qkv = random_qkv(&ok, 1);
    assert!(matches!(reference::forward(&qkv[1..], &ok), Err(Error::Shape(_))));
    let big = AttnShape { head_dim: 129, ..ok };
    assert!(matches!(reference::forward(&vec![1.0; big.qkv_len()], &big), Err(Error::InvalidArgument(_))));
    let zero = AttnShape { head_dim: 0, ..ok };
    assert!(matches!(reference::forward(&[], &zero), Err(Error::InvalidArgument(_))));
    let empty = AttnShape { seq: 0, ..ok };
    assert!(matches!(reference::forward(&[], &empty), Err(Error::Shape(_))));
    let (mut kc, mut vc) = (vec![0.0; ok.cache_len(4)], vec![0.0; ok.cache_len(4)]);
    let full = reference::forward_cached(&qkv, &mut kc, &mut vc, &ok, 2, 4);
    assert!(matches!(full, Err(Error::Shape(ref m)) if m.contains("KV cache full")), "{full:?}");
    let long = AttnShape { seq: moekit_attention::MAX_SEQ_LEN + 1, heads: 1, head_dim: 1, batch: 1 };
    assert!(matches!(reference::forward(&vec![1.0; long.qkv_len()], &long), Err(Error::InvalidArgument(_))));
}

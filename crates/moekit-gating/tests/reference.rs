//! Properties of the CPU reference, independent of its implementation: brute force, the
//! contract's rules, finite differences in f64.

use moekit_gating::{fmath, reference, route, RouterConfig, ScoreFunc, MAX_EXPERTS};
use moekit_tensor::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// A valid random config with E <= max_e.
fn config(max_e: usize) -> impl Strategy<Value = RouterConfig> {
    (1usize..=max_e, any::<bool>(), any::<bool>(), 0.5f32..4.0, any::<u32>()).prop_map(|(e, sig, renorm, rs, r)| {
        let divisors: Vec<usize> = (1..=e).filter(|d| e % d == 0).collect();
        let n_groups = divisors[r as usize % divisors.len()];
        let topk_groups = 1 + (r as usize / 7) % n_groups;
        let allowed = topk_groups * (e / n_groups);
        let k = 1 + (r as usize / 131) % allowed.min(16);
        let score = if sig { ScoreFunc::Sigmoid } else { ScoreFunc::Softmax };
        RouterConfig::new(e, k, score).with_groups(n_groups, topk_groups).with_renormalize(renorm).with_route_scale(rs)
    })
}

fn case(max_e: usize) -> impl Strategy<Value = (RouterConfig, Vec<f32>, Option<Vec<f32>>)> {
    config(max_e).prop_flat_map(|cfg| {
        let e = cfg.experts;
        // Logits drawn from a small set make exact ties common.
        let value = prop_oneof![-6.0f32..6.0, (-4i32..=4).prop_map(|q| q as f32 * 0.5)];
        (Just(cfg), prop::collection::vec(value, e), prop::option::of(prop::collection::vec(-0.5f32..0.5, e)))
    })
}

/// Brute force: the kept groups are the topk_groups-subset whose members all outrank every
/// other group (by group score, then lower index); the ids are the k-subset of the kept
/// groups' experts whose members all outrank every other allowed expert, sorted.
fn brute_force(u: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Vec<i32> {
    let s = reference::scores(u, cfg.score);
    // Selection scores compared as the f32 values the router sees.
    let sel32: Vec<f32> = (0..cfg.experts).map(|e| bias.map_or(s[e], |b| s[e] + b[e])).collect();
    let outranks = |a: (f32, usize), b: (f32, usize)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    let g = cfg.group_size();
    let gscore: Vec<f32> = (0..cfg.n_groups)
        .map(|gi| {
            let mut v: Vec<f32> = sel32[gi * g..(gi + 1) * g].to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            if bias.is_some() && g >= 2 {
                v[0] + v[1]
            } else {
                v[0]
            }
        })
        .collect();
    let subsets = |n: usize, k: usize| -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|&i| m >> i & 1 == 1).collect())
            .collect()
    };
    let kept: Vec<usize> = if cfg.n_groups == 1 {
        vec![0]
    } else {
        let found: Vec<Vec<usize>> = subsets(cfg.n_groups, cfg.topk_groups)
            .into_iter()
            .filter(|sub| {
                sub.iter().all(|&a| {
                    (0..cfg.n_groups).filter(|h| !sub.contains(h)).all(|h| outranks((gscore[a], a), (gscore[h], h)))
                })
            })
            .collect();
        assert_eq!(found.len(), 1);
        found[0].clone()
    };
    let allowed: Vec<usize> = (0..cfg.experts).filter(|e| kept.contains(&(e / g))).collect();
    let found: Vec<Vec<usize>> = subsets(allowed.len(), cfg.top_k)
        .into_iter()
        .map(|sub| sub.iter().map(|&i| allowed[i]).collect::<Vec<_>>())
        .filter(|sub: &Vec<usize>| {
            sub.iter()
                .all(|&a| allowed.iter().filter(|x| !sub.contains(x)).all(|&b| outranks((sel32[a], a), (sel32[b], b))))
        })
        .collect();
    assert_eq!(found.len(), 1);
    let mut ids = found[0].clone();
    ids.sort_by(|&a, &b| {
        if outranks((sel32[a], a), (sel32[b], b)) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    ids.into_iter().map(|e| e as i32).collect()
}

/// sum_e f_e P_e per sequence (without alpha), straight from the formula, in f64.
fn balance_loss_f64(u: &[f64], ids: &[i32], cfg: &RouterConfig, seq_len: usize) -> Vec<f64> {
    let (e_n, k) = (cfg.experts, cfg.top_k);
    let n_seq = u.len() / e_n / seq_len;
    (0..n_seq)
        .map(|q| {
            let mut f = vec![0.0f64; e_n];
            for &id in &ids[q * seq_len * k..(q + 1) * seq_len * k] {
                f[id as usize] += e_n as f64 / (k * seq_len) as f64;
            }
            let mut p = vec![0.0f64; e_n];
            for t in 0..seq_len {
                let row = &u[(q * seq_len + t) * e_n..(q * seq_len + t + 1) * e_n];
                let s: Vec<f64> = match cfg.score {
                    ScoreFunc::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
                    ScoreFunc::Softmax => row.iter().map(|&x| x.exp()).collect(),
                };
                let z: f64 = s.iter().sum();
                for e in 0..e_n {
                    p[e] += s[e] / z / seq_len as f64;
                }
            }
            (0..e_n).map(|e| f[e] * p[e]).sum()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn ids_are_the_brute_force_choice((cfg, u, bias) in case(12)) {
        let (ids, _) = reference::route_token(&u, bias.as_deref(), &cfg);
        prop_assert_eq!(ids, brute_force(&u, bias.as_deref(), &cfg));
    }

    #[test]
    fn routing_invariants((cfg, u, bias) in case(96)) {
        let (ids, w) = reference::route_token(&u, bias.as_deref(), &cfg);
        prop_assert_eq!(ids.len(), cfg.top_k);
        // Distinct, in range, in kept groups (a kept group outranks every dropped one).
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), cfg.top_k);
        prop_assert!(ids.iter().all(|&e| (0..cfg.experts as i32).contains(&e)));
        let groups: std::collections::BTreeSet<usize> = ids.iter().map(|&e| e as usize / cfg.group_size()).collect();
        prop_assert!(groups.len() <= cfg.topk_groups);
        // The weight formula uses the unbiased score, whatever the bias.
        let s = reference::scores(&u, cfg.score);
        let raw: Vec<f32> = ids.iter().map(|&e| s[e as usize]).collect();
        let sum: f32 = raw.iter().sum();
        for (j, &e) in ids.iter().enumerate() {
            let want = if cfg.renormalize && sum > 0.0 { s[e as usize] / sum } else { s[e as usize] } * cfg.route_scale;
            prop_assert!((w[j] - want).abs() <= 4.0 * f32::EPSILON * want.abs(), "weight {j}: {} vs {}", w[j], want);
        }
        if cfg.renormalize {
            let total: f32 = w.iter().sum();
            prop_assert!((total - cfg.route_scale).abs() <= (cfg.top_k as f32 + 2.0) * f32::EPSILON * cfg.route_scale);
        }
    }

    #[test]
    fn a_bias_moves_the_choice_not_the_weights((cfg, u, _b) in case(64)) {
        prop_assume!(cfg.n_groups == 1 && cfg.top_k < cfg.experts);
        let (ids, _) = reference::route_token(&u, None, &cfg);
        // Push an expert that was not chosen above everything.
        let outsider = (0..cfg.experts as i32).find(|e| !ids.contains(e)).unwrap();
        let mut bias = vec![0.0f32; cfg.experts];
        bias[outsider as usize] = 10.0;
        let (ids_b, w_b) = reference::route_token(&u, Some(&bias), &cfg);
        prop_assert_eq!(ids_b[0], outsider);
        let s = reference::scores(&u, cfg.score);
        let raw: Vec<f32> = ids_b.iter().map(|&e| s[e as usize]).collect();
        let sum = raw.iter().fold(0.0f32, |a, &x| a + x);
        for j in 0..cfg.top_k {
            let want = if cfg.renormalize && sum > 0.0 { raw[j] / sum } else { raw[j] } * cfg.route_scale;
            prop_assert_eq!(w_b[j].to_bits(), want.to_bits());
        }
    }

    #[test]
    fn route_gradient_equals_finite_differences((cfg, u, bias) in case(40), seed in any::<u64>()) {
        let (ids, _) = reference::route_token(&u, bias.as_deref(), &cfg);
        let mut st = seed | 1;
        let mut next = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; (st % 2001) as f64 / 1000.0 - 1.0 };
        let g: Vec<f64> = (0..cfg.top_k).map(|_| next()).collect();
        let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        let grad = reference::route_backward(&u, &ids, &g32, &cfg).unwrap();
        // L(u) = sum_j g_j w_j(u) with the ids held fixed, in f64.
        let loss = |u: &[f64]| -> f64 {
            let s: Vec<f64> = match cfg.score {
                ScoreFunc::Sigmoid => u.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
                ScoreFunc::Softmax => {
                    let m = u.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = u.iter().map(|&x| (x - m).exp()).sum();
                    u.iter().map(|&x| (x - m).exp() / z).collect()
                }
            };
            let a: Vec<f64> = ids.iter().map(|&e| s[e as usize]).collect();
            let sum: f64 = a.iter().sum();
            a.iter().zip(&g).map(|(&x, &gj)| gj * cfg.route_scale as f64 * if cfg.renormalize { x / sum } else { x }).sum()
        };
        let base: Vec<f64> = u.iter().map(|&x| x as f64).collect();
        let h = 1e-5;
        // Relative to the largest gradient, floored at the size of the terms the f32
        // reference cancels (route_scale * |g|): a zero gradient comes out as rounding noise.
        let floor = cfg.route_scale as f64 * g.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        let scale = grad.iter().fold(floor, |m, &x| m.max(x.abs() as f64));
        for e in 0..cfg.experts {
            let (mut up, mut dn) = (base.clone(), base.clone());
            up[e] += h;
            dn[e] -= h;
            let fd = (loss(&up) - loss(&dn)) / (2.0 * h);
            prop_assert!((grad[e] as f64 - fd).abs() <= 1e-4 * scale, "d/du[{e}]: {} vs finite difference {fd}", grad[e]);
        }
    }

    #[test]
    fn balance_gradient_equals_finite_differences(
        (cfg, _u, _b) in case(24), seed in any::<u64>(), seq_len in 1usize..6, n_seq in 1usize..3,
    ) {
        let tokens = seq_len * n_seq;
        let mut st = seed | 1;
        let mut next = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; (st % 4001) as f32 / 1000.0 - 2.0 };
        let u: Vec<f32> = (0..tokens * cfg.experts).map(|_| next()).collect();
        let r = reference::route(&u, None, &cfg).unwrap();
        let gl: Vec<f32> = (0..n_seq).map(|q| 1.0 - q as f32 * 0.7).collect();
        let alpha = 0.3f32;
        let grad = reference::balance_loss_backward(&u, &r.ids, &gl, &cfg, seq_len, alpha).unwrap();
        // The loss is smooth in u for fixed ids: central differences of an independent f64
        // implementation.
        let base: Vec<f64> = u.iter().map(|&x| x as f64).collect();
        let h = 1e-5;
        let scale = grad.iter().fold(1e-2 * alpha as f64, |m, &x| m.max(x.abs() as f64));
        for i in 0..u.len() {
            let (mut up, mut dn) = (base.clone(), base.clone());
            up[i] += h;
            dn[i] -= h;
            let (lu, ld) = (balance_loss_f64(&up, &r.ids, &cfg, seq_len), balance_loss_f64(&dn, &r.ids, &cfg, seq_len));
            let fd: f64 = (0..n_seq).map(|q| gl[q] as f64 * alpha as f64 * (lu[q] - ld[q])).sum::<f64>() / (2.0 * h);
            prop_assert!((grad[i] as f64 - fd).abs() <= 1e-4 * scale, "grad[{i}] {} vs {fd}", grad[i]);
        }
    }
}

#[test]
fn balance_loss_of_a_perfectly_balanced_router_is_alpha() {
    // Uniform scores and every expert chosen equally often: f_e = 1, P_e = 1/E, L = alpha.
    let cfg = RouterConfig::new(8, 2, ScoreFunc::Softmax);
    let u = vec![0.0f32; 4 * 8];
    let ids: Vec<i32> = (0..8).collect();
    let l = reference::balance_loss(&u, &ids, &cfg, 4, 0.01).unwrap();
    assert!((l[0] - 0.01).abs() < 1e-9, "{l:?}");
}

#[test]
fn bias_update_pushes_overloaded_experts_down() {
    let mut b = vec![0.5f32, 0.5, 0.5, 0.5];
    reference::update_bias(&mut b, &[10, 2, 4, 0], 0.001).unwrap(); // mean 4
    assert_eq!(b, vec![0.5 - 0.001, 0.5 + 0.001, 0.5, 0.5 + 0.001]);
    assert!(matches!(reference::update_bias(&mut b, &[1, 2], 0.1), Err(Error::Shape(_))));
}

#[test]
fn warp_sum_is_the_documented_butterfly() {
    let v: Vec<f32> = (0..32).map(|i| 1.0 + (i as f32) * 1e-7).collect();
    let mut p = v.clone();
    for off in [16, 8, 4, 2, 1] {
        p = (0..32).map(|l| p[l] + p[l ^ off]).collect();
    }
    assert_eq!(reference::warp_sum(&v).to_bits(), p[0].to_bits());
    assert_eq!(reference::row_sum(&[1.0, 2.0, 3.0]), 6.0);
}

#[test]
fn sigmoid_and_softmax_scores() {
    let s = reference::scores(&[0.0, 1.0, -1.0], ScoreFunc::Sigmoid);
    assert_eq!(s[0], 0.5);
    assert!((s[1] + s[2] - 1.0).abs() < 1e-7);
    let p = reference::scores(&[1.0, 2.0, 3.0, f32::NEG_INFINITY], ScoreFunc::Softmax);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[3] == 0.0);
    assert!(reference::scores(&[1.0, f32::NAN], ScoreFunc::Softmax).iter().all(|x| x.is_nan()));
    assert_eq!(fmath::exp(1.0), std::f32::consts::E);
}

#[test]
fn nan_never_outranks_a_number() {
    let cfg = RouterConfig::new(6, 3, ScoreFunc::Sigmoid);
    let u = [f32::NAN, -50.0, f32::NAN, f32::NEG_INFINITY, 3.0, f32::NAN];
    let (ids, w) = reference::route_token(&u, None, &cfg);
    assert_eq!(ids, vec![4, 1, 3]); // then the NaNs, lowest index first
    assert_eq!(w[2], 0.0);
    let cfg = RouterConfig::new(6, 5, ScoreFunc::Sigmoid);
    assert_eq!(reference::route_token(&u, None, &cfg).0, vec![4, 1, 3, 0, 2]);
}

#[test]
fn invalid_configs_are_typed_errors() {
    let ok = RouterConfig::deepseek_v3();
    ok.validate().unwrap();
    for bad in [
        RouterConfig { experts: 0, ..ok },
        RouterConfig { experts: MAX_EXPERTS + 1, n_groups: 1, topk_groups: 1, ..ok },
        ok.with_groups(7, 4), // 7 does not divide 256
        ok.with_groups(8, 9), // more kept groups than groups
        ok.with_groups(8, 0),
        RouterConfig { top_k: 0, ..ok },
        RouterConfig { top_k: 17, ..ok },
        RouterConfig::new(4, 5, ScoreFunc::Softmax), // k > E
        ok.with_groups(64, 1),                       // k = 8 > the 4 experts of one kept group
        ok.with_route_scale(f32::NAN),
    ] {
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))), "{bad:?}");
    }
}

#[test]
fn tensor_op_errors_before_work() {
    let cfg = RouterConfig::deepseek_v3();
    let u = Tensor::from_slice(&vec![0.5f32; 2 * 256], &[2, 256], &Device::Cpu).unwrap();
    let short_bias = Tensor::from_slice(&[0.0f32; 255], &[255], &Device::Cpu).unwrap();
    assert!(matches!(route(&u, Some(&short_bias), &cfg), Err(Error::Shape(_))));
    let int_bias = Tensor::from_slice(&[0i32; 256], &[256], &Device::Cpu).unwrap();
    assert!(matches!(route(&u, Some(&int_bias), &cfg), Err(Error::Dtype { .. })));
    let wrong_e = Tensor::from_slice(&vec![0.5f32; 2 * 128], &[2, 128], &Device::Cpu).unwrap();
    assert!(matches!(route(&wrong_e, None, &cfg), Err(Error::Shape(_))));
    let ints = Tensor::zeros(&[2, 256], DType::I32, &Device::Cpu).unwrap();
    assert!(matches!(route(&ints, None, &cfg), Err(Error::Dtype { .. })));
    let out = route(&u, None, &cfg).unwrap();
    assert_eq!(out.topk_ids.dims(), &[2, 8]);
    assert_eq!(out.counts.to_vec::<i32>().unwrap().iter().sum::<i32>(), 16);
}

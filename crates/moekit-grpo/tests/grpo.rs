//! The GRPO core against the test values of shared/reference/grpo.md, hand-computed losses of
//! every aggregation, finite differences of the gradient, clipping, dynamic sampling.

use moekit_grpo::advantages::{advantages, AdvantageConfig, ScaleRewards};
use moekit_grpo::loss::{grpo_loss, k3, Batch, Importance, LossConfig, LossType};
use moekit_grpo::sampling::{fill_batch, informative_groups, mask_truncated};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn advantages_reproduce_the_reference_values() {
    // grpo.md, group std (Bessel). The values are quoted to 4 decimals with eps -> 0; eps =
    // 1e-6 (verl) keeps them to 1e-5, eps = 1e-4 (TRL, our default) shifts each by
    // |A| eps / s <= 2.5 * 1e-4 / 0.354 = 7.1e-4.
    let cfg = AdvantageConfig { eps: 1e-6, ..AdvantageConfig::default() };
    let cases: [(&[f64], &[f64]); 3] = [
        (&[1.0, 0.0, 1.0, 0.0], &[0.8660, -0.8660, 0.8660, -0.8660]),
        (&[1.0, 1.0, 1.0, 0.0], &[0.5, 0.5, 0.5, -1.5]),
        (
            &[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            &[-0.3536, -0.3536, 2.4749, -0.3536, -0.3536, -0.3536, -0.3536, -0.3536],
        ),
    ];
    for (r, want) in cases {
        let a = advantages(r, r.len(), &cfg).unwrap();
        for (g, w) in a.values.iter().zip(want) {
            assert!(close(*g, *w, 1e-4), "{r:?}: {g} vs {w}");
        }
        let trl = advantages(r, r.len(), &AdvantageConfig::default()).unwrap();
        for (g, w) in trl.values.iter().zip(want) {
            assert!(close(*g, *w, 8e-4), "{r:?} eps 1e-4: {g} vs {w}");
        }
    }
    // All equal: zero advantages and counted in frac_reward_zero_std, under every option.
    for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
        for rloo in [false, true] {
            let cfg = AdvantageConfig { scale, rloo, ..AdvantageConfig::default() };
            let a = advantages(&[0.1, 0.1, 0.1, 1.0, 0.0, 1.0], 3, &cfg).unwrap();
            assert!(a.values[..3].iter().all(|&v| v == 0.0), "{scale:?} rloo {rloo}: {:?}", a.values);
            assert_eq!(a.frac_reward_zero_std, 0.5);
        }
    }
}

#[test]
fn advantage_variants() {
    let r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0];
    // None (Dr. GRPO): r - mean.
    let a = advantages(&r, 4, &AdvantageConfig { scale: ScaleRewards::None, ..Default::default() }).unwrap();
    assert_eq!(a.values, vec![0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]);
    // Batch: group means, the batch's std (Bessel over all 8: mean 0.5, std sqrt(2/7)).
    let a = advantages(&r, 4, &AdvantageConfig { scale: ScaleRewards::Batch, eps: 0.0, ..Default::default() }).unwrap();
    let s = (2.0f64 / 7.0).sqrt();
    assert!(close(a.values[0], 0.75 / s, 1e-12) && close(a.values[7], -0.75 / s, 1e-12));
    // RLOO: baseline = mean of the others, r_0 = 1 vs (0 + 0 + 0) / 3.
    let a =
        advantages(&r, 4, &AdvantageConfig { scale: ScaleRewards::None, rloo: true, ..Default::default() }).unwrap();
    assert!(close(a.values[0], 1.0, 1e-12) && close(a.values[1], -1.0 / 3.0, 1e-12), "{:?}", a.values);
    // Bad input.
    assert!(advantages(&r, 3, &AdvantageConfig::default()).is_err());
    assert!(advantages(&[f64::NAN, 1.0], 2, &AdvantageConfig::default()).is_err());
    assert!(advantages(&[1.0], 1, &AdvantageConfig { rloo: true, ..Default::default() }).is_err());
}

#[test]
fn k3_reference_values() {
    // d = logp_ref - logp.
    for (d, want) in [(0.5, 0.14872), (-0.5, 0.10653), (2.0, 4.38906)] {
        assert!(close(k3(d), want, 1e-5), "k3({d}) = {}", k3(d));
    }
    assert_eq!(k3(0.0), 0.0);
}

/// Two sequences of 3 slots: sequence 0 has 2 completion tokens, sequence 1 has 3.
struct Fixture {
    logp: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    mask: Vec<f32>,
    adv: Vec<f64>,
}

fn fixture() -> Fixture {
    Fixture {
        logp: vec![-1.0, -0.5, -2.0, -0.7, -1.2, -0.3],
        old: vec![-1.1, -0.5, -2.0, -0.9, -1.0, -0.3],
        reference: vec![-1.3, -0.4, -2.0, -0.6, -1.1, -0.5],
        mask: vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        adv: vec![1.0, -0.5],
    }
}

fn batch(f: &Fixture) -> Batch<'_> {
    Batch {
        sequences: 2,
        len: 3,
        logp: &f.logp,
        logp_old: &f.old,
        logp_ref: Some(&f.reference),
        mask: &f.mask,
        advantages: &f.adv,
    }
}

/// The per-token loss spelled out: -min(r A, clip(r) A) + beta k3.
fn token_loss(lp: f64, old: f64, rf: f64, a: f64, cfg: &LossConfig) -> f64 {
    let r = (lp - old).exp();
    let c = r.clamp(1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high);
    -(r * a).min(c * a) + cfg.beta * k3(rf - lp)
}

#[test]
fn every_aggregation_matches_a_hand_computation() {
    let f = fixture();
    let base =
        LossConfig { epsilon: 0.1, epsilon_high: 0.15, beta: 0.05, max_completion_length: 4, ..LossConfig::default() };
    let l = |j: usize, s: usize| token_loss(f.logp[j] as f64, f.old[j] as f64, f.reference[j] as f64, f.adv[s], &base);
    let (s0, s1) = (l(0, 0) + l(1, 0), l(3, 1) + l(4, 1) + l(5, 1));
    let want = [
        (LossType::Grpo, None, (s0 / 2.0 + s1 / 3.0) / 2.0),
        (LossType::Bnpo, None, (s0 + s1) / 5.0),
        (LossType::DrGrpo, None, (s0 + s1) / (2.0 * 4.0)),
        (LossType::Dapo, None, (s0 + s1) / 5.0),
        (LossType::Dapo, Some(20), (s0 + s1) / 20.0),
    ];
    for (loss_type, dapo, value) in want {
        let cfg = LossConfig { loss_type, ..base };
        let out = grpo_loss(&cfg, &batch(&f), dapo).unwrap();
        assert!(close(out.loss, value, 1e-6), "{loss_type:?}: {} vs {value}", out.loss);
        assert_eq!(out.tokens, 5);
        assert_eq!(out.dlogp[2], 0.0, "masked token has no gradient");
    }
}

/// Central differences of the loss w.r.t. each counted token's logp, for every aggregation
/// and both importance levels. The clipped regions are flat; the fixture keeps every ratio
/// at least 0.02 away from a clip edge (except exact 1), so h = 1e-4 stays inside one piece.
#[test]
fn gradients_match_finite_differences() {
    let f = fixture();
    for importance in [Importance::Token, Importance::Sequence] {
        for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
            let cfg = LossConfig {
                epsilon: 0.1,
                epsilon_high: 0.15,
                beta: 0.05,
                loss_type,
                importance,
                max_completion_length: 4,
            };
            let out = grpo_loss(&cfg, &batch(&f), None).unwrap();
            for j in [0, 1, 3, 4, 5] {
                let h = 1e-4f32;
                let at = |x: f32| {
                    let mut g = Fixture { logp: f.logp.clone(), ..fixture() };
                    g.logp[j] = x;
                    grpo_loss(&cfg, &batch(&g), None).unwrap().loss
                };
                let fd = (at(f.logp[j] + h) - at(f.logp[j] - h)) / (2.0 * h as f64);
                // f32 logps: the perturbation itself is exact only to ~1e-8 relative.
                assert!(
                    close(out.dlogp[j] as f64, fd, 2e-4),
                    "{importance:?} {loss_type:?} token {j}: {} vs {fd}",
                    out.dlogp[j]
                );
            }
        }
    }
}

#[test]
fn clipping_happens_only_off_policy_and_is_counted() {
    let f = fixture();
    let cfg = LossConfig { epsilon: 0.1, epsilon_high: 0.1, ..LossConfig::default() };
    // num_iterations = 1: logp == logp_old, ratio exactly 1, nothing is ever clipped, and the
    // gradient is -A w on every token (the "loss 0 with non-zero gradients" of TRL users).
    let on_policy = Batch { logp_old: &f.logp, logp_ref: None, ..batch(&f) };
    let out = grpo_loss(&cfg, &on_policy, None).unwrap();
    assert_eq!((out.clip_ratio_low, out.clip_ratio_high, out.clip_ratio_region), (0.0, 0.0, 0.0));
    assert!(close(out.dlogp[0] as f64, -1.0 / 5.0, 1e-7) && close(out.dlogp[3] as f64, 0.5 / 5.0, 1e-7));
    // After an update (num_iterations > 1): token 0 has ratio e^0.1 = 1.105 > 1.1 with A > 0
    // (clipped high), token 3 ratio e^0.2 with A < 0 (not clipped: the min keeps r A), token 4
    // ratio e^-0.2 = 0.82 < 0.9 with A < 0 (clipped low).
    let out = grpo_loss(&cfg, &Batch { logp_ref: None, ..batch(&f) }, None).unwrap();
    assert!(close(out.clip_ratio_high, 1.0 / 5.0, 1e-12), "{out:?}");
    assert!(close(out.clip_ratio_low, 1.0 / 5.0, 1e-12), "{out:?}");
    assert!(close(out.clip_ratio_region, 2.0 / 5.0, 1e-12));
    assert_eq!(out.dlogp[0], 0.0, "clipped high: no gradient");
    assert_eq!(out.dlogp[4], 0.0, "clipped low: no gradient");
    assert!(out.dlogp[3] != 0.0);
}

#[test]
fn invalid_inputs_are_errors() {
    let f = fixture();
    let cfg = LossConfig::default();
    assert!(grpo_loss(&LossConfig { beta: 0.1, ..cfg }, &Batch { logp_ref: None, ..batch(&f) }, None).is_err());
    assert!(grpo_loss(&cfg, &Batch { sequences: 3, ..batch(&f) }, None).is_err());
    let bad_mask = vec![0.5; 6];
    assert!(grpo_loss(&cfg, &Batch { mask: &bad_mask, ..batch(&f) }, None).is_err());
    let e = grpo_loss(&LossConfig { epsilon: 1.5, ..cfg }, &batch(&f), None).unwrap_err().to_string();
    assert!(e.contains("epsilon") && e.contains("must be"), "{e}");
}

#[test]
fn dynamic_sampling_refills_to_a_full_batch() {
    assert_eq!(informative_groups(&[1.0, 1.0, 0.0, 1.0, 0.5, 0.5], 2).unwrap(), vec![false, true, false]);
    // Each round samples 3 groups; groups 0, 2, 4, ... are all-equal.
    let mut next = 0usize;
    let round = |_: usize| {
        let v: Vec<(usize, Vec<f64>)> = (0..3)
            .map(|_| {
                next += 1;
                let id = next - 1;
                (id, if id % 2 == 0 { vec![1.0, 1.0] } else { vec![1.0, 0.0] })
            })
            .collect();
        Ok(v)
    };
    let (kept, stats) = fill_batch(4, 10, round).unwrap();
    assert_eq!(kept, vec![1, 3, 5, 7]);
    assert_eq!((stats.rounds, stats.sampled, stats.dropped, stats.padded), (3, 9, 5, 0));
    // Not enough informative groups within max_rounds: padded with dropped ones, still full.
    let (kept, stats) =
        fill_batch(4, 1, |_| Ok(vec![(0, vec![1.0, 1.0]), (1, vec![0.0, 1.0]), (2, vec![0.0, 0.0])])).unwrap();
    assert_eq!(kept.len(), 3, "only 3 groups were sampled");
    assert_eq!(stats.padded, 2);
    let mut mask = vec![1.0f32; 6];
    mask_truncated(&mut mask, 3, &[false, true]).unwrap();
    assert_eq!(mask, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
}

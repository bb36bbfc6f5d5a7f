//! The training loop's mechanics on a tiny policy (debug builds are slow): clipping only with
//! num_iterations > 1, the same run from the same seed, dynamic sampling keeping a full
//! batch, a short run that raises the reward, config errors naming the field.

use moekit_grpo::task::TaskKind;
use moekit_grpo::trainer::Trainer;
mod common;
use common::tiny;

#[test]
fn clipping_needs_more_than_one_iteration() {
    let mut one = Trainer::new(tiny(TaskKind::Reverse { digits: 2 }, 10)).unwrap();
    for _ in 0..2 {
        let m = one.train_step().unwrap();
        assert_eq!(m.clip_ratio_region, 0.0, "num_iterations = 1: the ratio is exactly 1");
    }
    let mut cfg = tiny(TaskKind::Reverse { digits: 2 }, 10);
    cfg.num_iterations = 4;
    cfg.optim.lr = 2e-2;
    cfg.loss.epsilon = 0.02;
    cfg.loss.epsilon_high = 0.02;
    let mut many = Trainer::new(cfg).unwrap();
    let clipped: f64 = (0..2).map(|_| many.train_step().unwrap().clip_ratio_region).sum();
    assert!(clipped > 0.0, "4 updates per batch with a large step must clip");
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut t = Trainer::new(tiny(TaskKind::AddMod10, 10)).unwrap();
        let r: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().reward).collect();
        let bits: Vec<u32> = t.model.params.data.iter().flatten().map(|x| x.to_bits()).collect();
        (r, bits, t.rng.state())
    };
    assert_eq!(run(), run());
}

#[test]
fn kl_to_the_reference_is_zero_at_first_and_grows() {
    let mut cfg = tiny(TaskKind::Reverse { digits: 2 }, 10);
    cfg.loss.beta = 0.04;
    cfg.optim.lr = 1e-2;
    let mut t = Trainer::new(cfg).unwrap();
    assert_eq!(t.train_step().unwrap().kl, 0.0, "the policy starts as the reference");
    let later: f64 = (0..3).map(|_| t.train_step().unwrap().kl).sum();
    assert!(later > 0.0);
}

#[test]
fn dynamic_sampling_keeps_a_full_batch() {
    let mut cfg = tiny(TaskKind::AddMod10, 10);
    cfg.dynamic_sampling = true;
    let mut t = Trainer::new(cfg).unwrap();
    let m = t.train_step().unwrap();
    // The batch holds prompts_per_step groups whatever was dropped.
    assert!(m.frac_reward_zero_std <= 1.0);
    assert!(m.completion_mean_length > 0.0);
}

#[test]
fn a_short_run_raises_the_reward() {
    let mut cfg = tiny(TaskKind::Reverse { digits: 2 }, 10);
    cfg.prompts_per_step = 8;
    cfg.optim.lr = 5e-3;
    let mut t = Trainer::new(cfg).unwrap();
    let first = t.train_step().unwrap().reward;
    let mut best = first;
    for _ in 0..12 {
        best = best.max(t.train_step().unwrap().reward);
    }
    assert!(best > first + 0.1, "reward {first} -> best {best}");
}

#[test]
fn config_errors_name_the_field() {
    let mut cfg = tiny(TaskKind::Reverse { digits: 9 }, 10);
    let e = Trainer::new(cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("max_seq_len"), "{e}");
    cfg.task = TaskKind::Reverse { digits: 2 };
    cfg.num_generations = 1;
    let e = Trainer::new(cfg).err().unwrap().to_string();
    assert!(e.contains("num_generations") && e.contains("must be"), "{e}");
    let task = TaskKind::Sort { digits: 3 }.build();
    assert_eq!(task.name(), "sort-3");
    // Training never draws a held-out prompt; evaluation draws only those (about a tenth).
    use moekit_grpo::task::DigitTask;
    let mut rng = moekit_model::Rng::new(9);
    let digits = |p: &[u32]| p[1..p.len() - 1].to_vec();
    assert!((0..2000).all(|_| !DigitTask::is_heldout(&digits(&task.prompt(&mut rng)))));
    assert!((0..200).all(|_| DigitTask::is_heldout(&digits(&task.heldout_prompt(&mut rng)))));
    let share = (0..1000u32).filter(|i| DigitTask::is_heldout(&[i / 100, i / 10 % 10, i % 10])).count();
    assert!((60..=140).contains(&share), "{share} of 1000 prompts held out");
}

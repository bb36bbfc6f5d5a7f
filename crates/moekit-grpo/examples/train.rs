//! A GRPO run with the default configuration (reverse-3 on the default ~1M-parameter MoE
//! policy, CPU), one line of metrics per step. The command line with config files,
//! checkpoints and plots is still to come; this is the library's loop as it is.
//!
//! `cargo run --release -p moekit-grpo --example train -- [steps] [seed] [config.toml]`

use moekit_grpo::trainer::{TrainConfig, Trainer};

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    moekit_model::tune_host_allocator();
    let base = match args.next() {
        Some(path) => {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                eprintln!("error: {path}: {e}");
                std::process::exit(2)
            });
            toml::from_str::<TrainConfig>(&text).unwrap_or_else(|e| {
                eprintln!("error: {path}: {e}");
                std::process::exit(2)
            })
        }
        None => TrainConfig::default(),
    };
    let mut cfg = TrainConfig { steps, seed, ..base };
    cfg.optim.total_steps = steps;
    let mut trainer = match Trainer::new(cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let start = std::time::Instant::now();
    for _ in 0..steps {
        match trainer.train_step() {
            Ok(m) => {
                let pos = m.rewards.iter().find(|r| r.0 == "position").map_or(0.0, |r| r.1);
                let exact = m.rewards.iter().find(|r| r.0 == "exact").map_or(0.0, |r| r.1);
                println!(
                    "step {:4} {:6.1}s reward {:.3} exact {:.3} entropy {:.3} len {:.2} clip {:.3} gnorm {:.3} mismatch {:.4} load {:.2} {:.0} ms",
                    m.step,
                    start.elapsed().as_secs_f64(),
                    pos,
                    exact,
                    m.entropy,
                    m.completion_mean_length,
                    m.clip_ratio_region,
                    m.grad_norm,
                    m.routing_replay_mismatch,
                    m.expert_load_max_over_mean,
                    m.step_time * 1e3
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

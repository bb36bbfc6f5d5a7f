//! `moekit-grpo`: train, evaluate and sample a GRPO policy from the command line.
//!
//! ```text
//! moekit-grpo train [--config run.toml] [--task reverse-3] [--steps N] [--seed S] [--out DIR]
//!                   [--device cpu|cuda] [--resume DIR/checkpoint.safetensors] ...
//! moekit-grpo eval --checkpoint DIR/checkpoint.safetensors [--prompts N]
//! moekit-grpo sample --checkpoint DIR/checkpoint.safetensors [--n N] [--temperature T]
//! ```

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moekit_grpo::run::{load_checkpoint, save_checkpoint, write_plots, JsonlLog};
use moekit_grpo::task::{TaskKind, EOS};
use moekit_grpo::trainer::{StepMetrics, TrainConfig, Trainer};
use moekit_model::{Experts, Precision, Rng, SampleConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "moekit-grpo", version, about = "GRPO on moekit's MoE transformer (CPU by default)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a policy (defaults: reverse-3, the ~1M-parameter MoE model, 16 prompts x 16).
    Train(TrainArgs),
    /// Greedy and sampled accuracy of a checkpoint on held-out prompts (a tenth of the
    /// prompts, chosen by a hash of their digits, that training never samples).
    Eval {
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Held-out prompts.
        #[arg(long, default_value_t = 256)]
        prompts: usize,
        /// Seed of the held-out prompts (different from training's draws).
        #[arg(long, default_value_t = 12345)]
        seed: u64,
    },
    /// Print completions of a checkpoint.
    Sample {
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Prompts.
        #[arg(long, default_value_t = 8)]
        n: usize,
        /// Temperature (0 = greedy).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A TOML file of `TrainConfig` fields (flags below override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Task: reverse-K, sort-K or add-mod-10.
    #[arg(long)]
    task: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Updates per batch of rollouts.
    #[arg(long)]
    num_iterations: Option<usize>,
    /// Where the log, checkpoints and plots go (default runs/<task>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu (f32 host path) or cuda (routed experts on the GPU kernels, BF16).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A metrics line every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// A checkpoint every N steps (and at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Refresh the plots every N steps.
    #[arg(long, default_value_t = 25)]
    plot_every: usize,
    /// Continue a run from its checkpoint (its config wins; --steps may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop when the mean per-position reward reaches this (0: run all steps).
    #[arg(long, default_value_t = 0.0)]
    target_reward: f64,
}

fn parse_task(s: &str) -> Result<TaskKind, String> {
    let digits = |p: &str| p.parse::<usize>().map_err(|_| format!("task {s:?}: the digit count must be a number"));
    match s {
        "add-mod-10" => Ok(TaskKind::AddMod10),
        _ if s.starts_with("reverse-") => Ok(TaskKind::Reverse { digits: digits(&s[8..])? }),
        _ if s.starts_with("sort-") => Ok(TaskKind::Sort { digits: digits(&s[5..])? }),
        _ => Err(format!("task {s:?}: must be reverse-K, sort-K or add-mod-10")),
    }
}

/// A line above the progress bar, or on stderr when there is no terminal (logs, CI).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn position_reward(m: &StepMetrics) -> f64 {
    m.rewards.iter().find(|r| r.0 == "position").map_or(m.reward, |r| r.1)
}

fn set_device(trainer: &mut Trainer, device: &str) -> Result<(), String> {
    match device {
        "cpu" => Ok(()),
        "cuda" => {
            let dev = moekit_tensor::CudaDevice::new(0).map_err(|e| format!("--device cuda: no usable GPU: {e}"))?;
            let experts = Experts::Kernels { device: moekit_tensor::Device::Cuda(dev), precision: Precision::Bf16 };
            trainer.model.set_experts(experts).map_err(|e| format!("--device cuda: {e}"))
        }
        other => Err(format!("--device {other:?}: must be cpu or cuda")),
    }
}

fn train(a: TrainArgs) -> Result<(), String> {
    let mut trainer = match &a.resume {
        Some(path) => {
            let mut t = load_checkpoint(path).map_err(|e| e.to_string())?;
            if let Some(steps) = a.steps {
                t.cfg.steps = steps;
            }
            t
        }
        None => {
            let mut cfg = match &a.config {
                Some(p) => {
                    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    toml::from_str::<TrainConfig>(&text).map_err(|e| format!("{}: {e}", p.display()))?
                }
                None => TrainConfig::default(),
            };
            if let Some(t) = &a.task {
                cfg.task = parse_task(t)?;
            }
            if let Some(s) = a.steps {
                cfg.steps = s;
                cfg.optim.total_steps = s;
            }
            if let Some(s) = a.seed {
                cfg.seed = s;
            }
            if let Some(lr) = a.lr {
                cfg.optim.lr = lr;
                cfg.optim.min_lr = cfg.optim.min_lr.min(lr);
            }
            if let Some(n) = a.num_iterations {
                cfg.num_iterations = n;
            }
            Trainer::new(cfg).map_err(|e| e.to_string())?
        }
    };
    set_device(&mut trainer, &a.device)?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.resume
            .as_ref()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(format!("runs/{}-seed{}", trainer.task().name(), trainer.cfg.seed)))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let ckpt = out.join("checkpoint.safetensors");
    let mut log = JsonlLog::open(&out.join("metrics.jsonl")).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let total = trainer.cfg.steps;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step as u64);
    eprintln!(
        "moekit-grpo: {} on {}, {} parameters, {} prompts x {} completions, out {}",
        trainer.task().name(),
        a.device,
        trainer.cfg.model.num_params(),
        trainer.cfg.prompts_per_step,
        trainer.cfg.num_generations,
        out.display()
    );
    let start = std::time::Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    while trainer.step < total {
        if stop.load(Ordering::SeqCst) {
            bar.abandon_with_message("interrupted");
            save_checkpoint(&trainer, &ckpt).map_err(|e| e.to_string())?;
            eprintln!("moekit-grpo: interrupted at step {}; checkpoint {}", trainer.step, ckpt.display());
            std::process::exit(130);
        }
        let m = trainer.train_step().map_err(|e| e.to_string())?;
        log.write(&m).map_err(|e| e.to_string())?;
        let r = position_reward(&m);
        bar.set_position(m.step as u64);
        bar.set_message(format!("reward {r:.3}"));
        if m.step % a.log_every.max(1) == 0 || m.step == total {
            say(&bar, format!(
                "step {:5} {:7.1}s reward {r:.3} exact {:.3} entropy {:.3} len {:.2} kl {:.4} clip {:.3} grad_norm {:.3} lr {:.2e} load {:.2} replay_mismatch {:.4} {:.0} tok/s",
                m.step,
                start.elapsed().as_secs_f64(),
                m.rewards.iter().find(|x| x.0 == "exact").map_or(0.0, |x| x.1),
                m.entropy,
                m.completion_mean_length,
                m.kl,
                m.clip_ratio_region,
                m.grad_norm,
                m.learning_rate,
                m.expert_load_max_over_mean,
                m.routing_replay_mismatch,
                m.tokens_per_s
            ));
        }
        let done = a.target_reward > 0.0 && r >= a.target_reward;
        history.push(m);
        if trainer.step % a.checkpoint_every.max(1) == 0 {
            save_checkpoint(&trainer, &ckpt).map_err(|e| e.to_string())?;
        }
        if trainer.step % a.plot_every.max(1) == 0 {
            write_plots(&out, &history).map_err(|e| e.to_string())?;
        }
        if done {
            say(
                &bar,
                format!(
                    "reached reward {r:.3} >= {} at step {} ({:.1} s)",
                    a.target_reward,
                    trainer.step,
                    start.elapsed().as_secs_f64()
                ),
            );
            break;
        }
    }
    bar.finish();
    save_checkpoint(&trainer, &ckpt).map_err(|e| e.to_string())?;
    write_plots(&out, &history).map_err(|e| e.to_string())?;
    eprintln!(
        "moekit-grpo: {} steps in {:.1} s; checkpoint {}, log {}, plots {}",
        trainer.step,
        start.elapsed().as_secs_f64(),
        ckpt.display(),
        out.join("metrics.jsonl").display(),
        out.join("plot.png").display()
    );
    Ok(())
}

fn eval(checkpoint: &Path, prompts: usize, seed: u64) -> Result<(), String> {
    let t = load_checkpoint(checkpoint).map_err(|e| e.to_string())?;
    let task = t.task();
    let mut rng = Rng::new(seed);
    let ps: Vec<Vec<u32>> = (0..prompts.max(1)).map(|_| task.heldout_prompt(&mut rng)).collect();
    let flat: Vec<u32> = ps.concat();
    let p = task.prompt_len();
    for (label, temperature) in [("greedy", 0.0f32), ("sampled", 1.0)] {
        let scfg =
            SampleConfig { max_new_tokens: task.max_completion(), temperature, top_k: 0, top_p: 1.0, eos: Some(EOS) };
        let g = t.model.generate(&flat, ps.len(), &scfg, &mut rng).map_err(|e| e.to_string())?;
        let (mut pos, mut exact) = (0.0, 0.0);
        for (s, prompt) in ps.iter().enumerate() {
            let r = task.rewards(prompt, &g.tokens[s * g.seq_len + p..(s + 1) * g.seq_len]);
            pos += r.iter().find(|x| x.name == "position").map_or(0.0, |x| x.value);
            exact += r.iter().find(|x| x.name == "exact").map_or(0.0, |x| x.value);
        }
        let n = ps.len() as f64;
        println!(
            "{} {label}: per-position reward {:.3}, exact match {:.3} ({} held-out prompts)",
            task.name(),
            pos / n,
            exact / n,
            ps.len()
        );
    }
    Ok(())
}

fn sample(checkpoint: &Path, n: usize, temperature: f32, seed: u64) -> Result<(), String> {
    let t = load_checkpoint(checkpoint).map_err(|e| e.to_string())?;
    let task = t.task();
    let mut rng = Rng::new(seed);
    let ps: Vec<Vec<u32>> = (0..n.max(1)).map(|_| task.prompt(&mut rng)).collect();
    let scfg =
        SampleConfig { max_new_tokens: task.max_completion(), temperature, top_k: 0, top_p: 1.0, eos: Some(EOS) };
    let g = t.model.generate(&ps.concat(), ps.len(), &scfg, &mut rng).map_err(|e| e.to_string())?;
    let show = |toks: &[u32]| -> String {
        toks.iter()
            .map(|&x| match x {
                0..=9 => char::from(b'0' + x as u8).to_string(),
                10 => "<bos>".into(),
                11 => " | ".into(),
                12 => "<eos>".into(),
                _ => "?".into(),
            })
            .collect()
    };
    let p = task.prompt_len();
    for (s, prompt) in ps.iter().enumerate() {
        let comp = &g.tokens[s * g.seq_len + p..s * g.seq_len + p + g.lengths[s]];
        let r = task.rewards(prompt, comp);
        println!("{}{}   reward {:.2}", show(prompt), show(comp), r.iter().map(|x| x.weight * x.value).sum::<f64>());
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    moekit_model::tune_host_allocator();
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moekit-grpo: cannot start threads: {e}");
            std::process::exit(1);
        }
    };
    let result = pool.install(|| match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Eval { checkpoint, prompts, seed } => eval(&checkpoint, prompts, seed),
        Cmd::Sample { checkpoint, n, temperature, seed } => sample(&checkpoint, n, temperature, seed),
    });
    if let Err(e) = result {
        eprintln!("moekit-grpo: error: {e}");
        std::process::exit(2);
    }
}

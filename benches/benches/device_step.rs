//! Training-step throughput (tokens/s) of `moekit_model::device::DeviceTrainer` on the GPU:
//! the default model and a larger one (8 layers, d_model 1024, 64 experts; BF16 and FP8 routed
//! experts). Each iteration is
//! one full step (forward, loss, backward, clipping, AdamW, router bias) ending in its metrics
//! readback, so wall time is device time plus launch overhead. Skips without a GPU.

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::criterion;
use moekit_cuda::testing::skip_notice;
use moekit_model::device::DeviceTrainer;
use moekit_model::{generate::next_token_targets, AdamWConfig, Model, ModelConfig, MoeConfig};
use moekit_tensor::{CudaDevice, Device};
use std::time::{Duration, Instant};

fn large() -> ModelConfig {
    ModelConfig {
        vocab_size: 4096,
        d_model: 1024,
        n_layers: 8,
        n_heads: 8,
        max_seq_len: 256,
        first_dense_layers: 1,
        dense_ffn_dim: 2048,
        moe: MoeConfig {
            experts: 64,
            top_k: 4,
            shared_experts: 1,
            expert_dim: 256,
            n_groups: 8,
            topk_groups: 4,
            ..MoeConfig::default()
        },
        ..ModelConfig::default()
    }
}

fn bench(c: &mut Criterion) {
    let dev = match CudaDevice::new(0) {
        Ok(d) => Device::Cuda(d),
        Err(e) => return skip_notice("device training step benchmark", &e.to_string()),
    };
    let large_fp8 = {
        let l = large();
        ModelConfig { moe: MoeConfig { precision: moekit_model::Precision::Fp8, ..l.moe }, ..l }
    };
    for (name, cfg, batch, seq) in [
        ("default", ModelConfig::default(), 8, 32),
        ("large-8L-1024d-64e", large(), 4, 256),
        ("large-8L-1024d-64e-fp8", large_fp8, 4, 256),
    ] {
        let model = Model::new(cfg, 0).expect("model");
        let mut t = DeviceTrainer::new(&model, AdamWConfig::default(), &dev).expect("trainer");
        let tokens: Vec<u32> = (0..batch * seq).map(|i| ((i * 7 + i / 5) % model.cfg.vocab_size) as u32).collect();
        let targets = next_token_targets(&tokens, batch, seq);
        for _ in 0..2 {
            t.step(&tokens, &targets, batch, seq).expect("warm-up step");
        }
        let start = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            t.step(&tokens, &targets, batch, seq).expect("step");
        }
        let per = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "device-step {name}: {} tokens, {:.2} ms/step, {:.0} tokens/s",
            batch * seq,
            per * 1e3,
            (batch * seq) as f64 / per
        );
        let mut g = c.benchmark_group(format!("device-step-{name}"));
        g.throughput(Throughput::Elements((batch * seq) as u64));
        g.sample_size(10);
        g.bench_function("train-step", |b| {
            b.iter_custom(|iters| {
                let s = Instant::now();
                for _ in 0..iters {
                    t.step(&tokens, &targets, batch, seq).expect("step");
                }
                s.elapsed().max(Duration::from_nanos(1))
            })
        });
        g.finish();
    }
}

fn benches() {
    let mut c = criterion();
    bench(&mut c);
    c.final_summary();
}

criterion_main!(benches);

//! Decode throughput (generated tokens/s over the batch) of
//! `moekit_model::device::DeviceGenerator` on the GPU: the default model and a larger one
//! (8 layers, d_model 1024, 64 experts), with the decode step replayed as CUDA graphs (the
//! default) and eagerly. One iteration is one whole generation (prefill of the prompts, then
//! `NEW` tokens per sequence, sampling at temperature 1 with top-k 50, no EOS) ending in its
//! readbacks; the graphs are captured in the warm-up and replayed in the timed runs. Skips
//! without a GPU.

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::criterion;
use moekit_cuda::testing::skip_notice;
use moekit_model::device::{DeviceGenerator, DeviceTrainer};
use moekit_model::{AdamWConfig, Model, ModelConfig, MoeConfig, SampleConfig};
use moekit_tensor::{CudaDevice, Device};
use std::time::{Duration, Instant};

const PROMPT: usize = 16;
const NEW: usize = 112;

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
        Err(e) => return skip_notice("device decode benchmark", &e.to_string()),
    };
    let default = ModelConfig { max_seq_len: PROMPT + NEW, ..ModelConfig::default() };
    for (name, cfg, batch) in [("default", default, 64), ("large-8L-1024d-64e", large(), 32)] {
        let model = Model::new(cfg, 0).expect("model");
        let v = model.cfg.vocab_size;
        let t = DeviceTrainer::new(&model, AdamWConfig::default(), &dev).expect("upload");
        let prompts: Vec<u32> = (0..batch * PROMPT).map(|i| ((i * 7 + i / 5) % v) as u32).collect();
        let scfg = SampleConfig { max_new_tokens: NEW, top_k: 50.min(v), ..SampleConfig::default() };
        for graphs in [true, false] {
            let mode = if graphs { "graphs" } else { "eager" };
            let mut g = DeviceGenerator::new(&t, batch, PROMPT + NEW).expect("generator").with_graphs(graphs);
            for s in 0..2 {
                g.generate(&prompts, &scfg, s).expect("warm-up generation");
            }
            let reps = 3;
            let start = Instant::now();
            for s in 0..reps {
                g.generate(&prompts, &scfg, 10 + s).expect("generation");
            }
            let per = start.elapsed().as_secs_f64() / reps as f64;
            println!(
                "device-decode {name} {mode}: batch {batch}, {NEW} tokens each, {:.2} ms/token step, {:.0} tokens/s",
                per * 1e3 / NEW as f64,
                (batch * NEW) as f64 / per
            );
            let mut group = c.benchmark_group(format!("device-decode-{name}"));
            group.throughput(Throughput::Elements((batch * NEW) as u64));
            group.sample_size(10);
            group.bench_function(mode, |b| {
                b.iter_custom(|iters| {
                    let s = Instant::now();
                    for i in 0..iters {
                        g.generate(&prompts, &scfg, 100 + i).expect("generation");
                    }
                    s.elapsed().max(Duration::from_nanos(1))
                })
            });
            group.finish();
        }
    }
}

fn benches() {
    let mut c = criterion();
    bench(&mut c);
    c.final_summary();
}

criterion_main!(benches);

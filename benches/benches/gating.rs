//! Top-k gating: the CPU reference, and the routing kernel (CUDA events) when a GPU is present.
//! Shapes of `shared/reference/performance.md`: `gate-v3-4k`, `gate-v3-64k` (DeepSeek-V3
//! routing: E = 256, k = 8, 8 / 4 groups, sigmoid + bias, f32 logits), `gate-qwen3-4k`
//! (E = 128, k = 8, softmax, renormalised), plus `gate-v3-128` for the decode-size latency.
//! Bytes per call: logits T * E * 4 read, ids and weights T * k * 8 written (bias and counts
//! are negligible). Inputs rotate over enough buffers to exceed the 60 MB L2.

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::{criterion, median_gpu_us, report_bandwidth, time_gpu};
use moekit_cuda::{testing::skip_notice, DeviceBuffer, Gpu, Stream};
use moekit_gating::{raw, reference, RouterConfig};

struct Shape {
    name: &'static str,
    tokens: usize,
    cfg: RouterConfig,
    biased: bool,
}

fn shapes() -> Vec<Shape> {
    let v3 = RouterConfig::deepseek_v3();
    vec![
        Shape { name: "gate-v3-128", tokens: 128, cfg: v3, biased: true },
        Shape { name: "gate-v3-4k", tokens: 4096, cfg: v3, biased: true },
        Shape { name: "gate-v3-64k", tokens: 65536, cfg: v3, biased: true },
        Shape { name: "gate-qwen3-4k", tokens: 4096, cfg: RouterConfig::qwen3_moe(), biased: false },
    ]
}

fn logits(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 2097152.0 - 4.0).collect()
}

/// The minimum bytes of a routing: the f32 logits read once, the ids and weights written once
/// (the E counts are negligible).
fn bytes(s: &Shape) -> f64 {
    (s.tokens * s.cfg.experts * 4 + s.tokens * s.cfg.top_k * 8) as f64
}

fn cpu(c: &mut Criterion) {
    for s in shapes().into_iter().filter(|s| s.tokens <= 4096) {
        let u = logits(s.tokens * s.cfg.experts, 1);
        let b = vec![0.01f32; s.cfg.experts];
        let mut g = c.benchmark_group(format!("{}-cpu", s.name));
        g.throughput(Throughput::Bytes(bytes(&s) as u64));
        g.sample_size(10);
        g.bench_function("reference", |bch| {
            bch.iter(|| reference::route(&u, s.biased.then_some(&b[..]), &s.cfg).unwrap())
        });
        g.finish();
    }
}

fn gpu(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => return skip_notice("gating GPU benchmark", &e.to_string()),
    };
    let stream = Stream::new(&gpu).expect("stream");
    for s in shapes() {
        let n = s.tokens * s.cfg.experts;
        let nbuf = (120_000_000 / (n * 4)).clamp(2, 32);
        let inputs: Vec<_> = (0..nbuf).map(|i| DeviceBuffer::from_host(&gpu, &logits(n, i as u32)).unwrap()).collect();
        let bias = DeviceBuffer::from_host(&gpu, &vec![0.01f32; s.cfg.experts]).unwrap();
        let mut ids = DeviceBuffer::<i32>::zeros(&gpu, s.tokens * s.cfg.top_k).unwrap();
        let mut w = DeviceBuffer::<f32>::zeros(&gpu, s.tokens * s.cfg.top_k).unwrap();
        let mut counts = DeviceBuffer::<i32>::zeros(&gpu, s.cfg.experts).unwrap();
        let mut launch = |i: u64| {
            raw::route(
                &stream,
                &s.cfg,
                raw::Logits::F32(inputs[i as usize % nbuf].view()),
                s.biased.then(|| bias.view()),
                ids.view_mut(),
                w.view_mut(),
                Some(counts.view_mut()),
            )
        };
        let mut g = c.benchmark_group(s.name);
        g.throughput(Throughput::Bytes(bytes(&s) as u64));
        g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
        g.finish();
        let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
        let shape = format!(
            "T={} E={} k={} groups {}/{}",
            s.tokens, s.cfg.experts, s.cfg.top_k, s.cfg.n_groups, s.cfg.topk_groups
        );
        report_bandwidth(s.name, &shape, us, bytes(&s));
    }
}

fn benches() {
    let mut c = criterion();
    cpu(&mut c);
    gpu(&mut c);
}

criterion_main!(benches);

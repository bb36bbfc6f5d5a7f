//! The model: training-step tokens/s of the default (~1M-parameter) model on the CPU
//! (forward + cross-entropy + backward + AdamW + router bias update, batch 256 x 8 tokens,
//! the shape PyTorch eager is measured at by `benches/torch_moe_step.py`), forward-only, and
//! decode; and, on a GPU, one MoE layer at a DeepSeek-V3-like shape with the time split per op.
//!
//! Threads: rayon's pool (`RAYON_NUM_THREADS`, default: all cores). Each line
//! `MOEKIT-BENCH | model-... | tokens/s` is collected by the GPU bundle's run.sh.

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::criterion;
use moekit_model::generate::next_token_targets;
use moekit_model::{loss, AdamW, AdamWConfig, Model, ModelConfig, Rng, SampleConfig};
use std::time::Instant;

const BATCH: usize = 256;
const SEQ: usize = 8;

fn batch_tokens(seed: u64, v: usize) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..BATCH * SEQ).map(|_| r.below(v) as u32).collect()
}

fn train_step(model: &mut Model, opt: &mut AdamW, toks: &[u32]) {
    let fwd = model.forward(toks, BATCH, SEQ, None).expect("forward");
    let targets = next_token_targets(toks, BATCH, SEQ);
    let (_, dlogits) = loss::cross_entropy(&fwd.logits, model.cfg.vocab_size, &targets);
    let grads = model.backward(&fwd, &dlogits).expect("backward");
    opt.step(&mut model.params, &grads).expect("adamw");
    let counts: Vec<Vec<i32>> = fwd.routing().iter().map(|r| r.counts.clone()).collect();
    model.update_router_bias(&counts).expect("bias");
}

fn report(name: &str, tokens: usize, threads: usize, secs: f64) {
    println!(
        "MOEKIT-BENCH | {name} | default model, {BATCH} x {SEQ} tokens, {threads} threads | {:.2} ms | {:.0} tokens/s |",
        secs * 1e3,
        tokens as f64 / secs
    );
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cpu(c: &mut Criterion, pool: &rayon::ThreadPool) {
    let cfg = ModelConfig::default();
    let mut model = Model::new(cfg.clone(), 0).expect("model");
    let mut opt = AdamW::new(AdamWConfig::default(), &model.params).expect("adamw");
    let toks = batch_tokens(1, cfg.vocab_size);
    let tokens = BATCH * SEQ;
    let threads = pool.current_num_threads();
    report(
        "model-train-step-cpu",
        tokens,
        threads,
        median_secs(10, || pool.install(|| train_step(&mut model, &mut opt, &toks))),
    );
    report(
        "model-forward-cpu",
        tokens,
        threads,
        median_secs(10, || {
            pool.install(|| model.forward(&toks, BATCH, SEQ, None).expect("forward"));
        }),
    );
    // Decode: 256 prompts of 4 tokens, 8 new tokens each through the KV cache.
    let prompts: Vec<u32> = toks.chunks(SEQ).flat_map(|s| s[..4].to_vec()).collect();
    let scfg = SampleConfig { max_new_tokens: 8, ..SampleConfig::default() };
    report(
        "model-generate-cpu",
        BATCH * 8,
        threads,
        median_secs(5, || {
            pool.install(|| model.generate(&prompts, BATCH, &scfg, &mut Rng::new(2)).expect("generate"));
        }),
    );
    let mut g = c.benchmark_group("model-cpu");
    g.throughput(Throughput::Elements(tokens as u64));
    g.sample_size(10);
    g.bench_function("train-step-256x8", |b| b.iter(|| pool.install(|| train_step(&mut model, &mut opt, &toks))));
    g.finish();
}

/// One MoE layer, DeepSeek-V3-like (T = 4096 tokens, D = 7168, E = 256 experts top-8 in 8
/// groups keep 4, I = 2048, sigmoid + bias), forward and backward on the GPU in BF16, each
/// op timed with CUDA events.
mod gpu {
    use moekit_benches::median_gpu_us;
    use moekit_cuda::testing::skip_notice;
    use moekit_dispatch::{
        combine, combine_backward, dispatch_layout, permute, swiglu, swiglu_backward, ActFormat, DispatchConfig,
    };
    use moekit_dtype::bf16;
    use moekit_gating::{route, route_backward, RouterConfig};
    use moekit_gemm::{dgrad, k_grouped, m_grouped_contiguous, GemmInput};
    use moekit_tensor::{CudaDevice, DType, Device, Tensor};

    fn filled_bf16(n: usize, dims: &[usize], dev: &Device, scale: f32) -> moekit_cuda::Result<Tensor> {
        let v: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32((((i as u32).wrapping_mul(2654435761) >> 8) as f32 / 8388608.0 - 1.0) * scale))
            .collect();
        Tensor::from_slice(&v, dims, dev)
    }

    pub fn run() -> moekit_cuda::Result<()> {
        let Ok(cuda) = CudaDevice::new(0) else {
            skip_notice("model moe-layer-v3 bench", "no GPU");
            return Ok(());
        };
        let dev = Device::Cuda(cuda);
        let stream = match &dev {
            Device::Cuda(c) => c.stream(),
            _ => return Ok(()),
        };
        let (t, d, e, k, i) = (4096usize, 7168usize, 256usize, 8usize, 2048usize);
        let rcfg = RouterConfig::deepseek_v3();
        let logits: Vec<f32> =
            (0..t * e).map(|j| (((j as u32).wrapping_mul(2246822519) >> 8) as f32 / 4194304.0) - 2.0).collect();
        let logits = Tensor::from_slice(&logits, &[t, e], &dev)?;
        let bias = Tensor::zeros(&[e], DType::F32, &dev)?;
        let x = filled_bf16(t * d, &[t, d], &dev, 1.0)?;
        let w1 = filled_bf16(e * 2 * i * d, &[e, 2 * i, d], &dev, 0.02)?;
        let w2 = filled_bf16(e * d * i, &[e, d, i], &dev, 0.02)?;
        let dcfg = DispatchConfig::new(e, k).with_align(128);
        let r = route(&logits, Some(&bias), &rcfg)?;
        let layout = dispatch_layout(&r.topk_ids, &dcfg, None)?;
        let xp = permute(&x, &layout, ActFormat::Bf16)?;
        let h = m_grouped_contiguous((&xp).into(), GemmInput::Bf16(&w1), &layout.m_indices)?;
        let a = swiglu(&h, ActFormat::Bf16)?;
        let y = m_grouped_contiguous((&a).into(), GemmInput::Bf16(&w2), &layout.m_indices)?;
        let gout = filled_bf16(t * d, &[t, d], &dev, 1.0)?;
        let (gy, gw) = combine_backward(&y, &gout, &layout, Some(&r.topk_weights))?;
        let gw = gw.ok_or_else(|| moekit_cuda::Error::InvalidArgument("no dw".into()))?;
        let dact = dgrad(GemmInput::Bf16(&gy), GemmInput::Bf16(&w2), &layout.m_indices)?;
        let dh = swiglu_backward(&h, &dact)?;
        let rows = layout.rows_used()? as f64;
        let gemm_flops = |n: usize, kk: usize| 2.0 * rows * n as f64 * kk as f64;
        let mut lines: Vec<(&str, f64, f64)> = Vec::new();
        let mut time = |name: &'static str, flops: f64, f: &mut dyn FnMut() -> moekit_cuda::Result<()>| {
            let us = median_gpu_us(stream, 2, 5, |_| f())?;
            lines.push((name, us, flops));
            Ok::<(), moekit_cuda::Error>(())
        };
        time("route", 0.0, &mut || route(&logits, Some(&bias), &rcfg).map(drop))?;
        time("dispatch layout", 0.0, &mut || dispatch_layout(&r.topk_ids, &dcfg, None).map(drop))?;
        time("permute bf16", 0.0, &mut || permute(&x, &layout, ActFormat::Bf16).map(drop))?;
        time("gate/up GEMM", gemm_flops(2 * i, d), &mut || {
            m_grouped_contiguous((&xp).into(), GemmInput::Bf16(&w1), &layout.m_indices).map(drop)
        })?;
        time("swiglu", 0.0, &mut || swiglu(&h, ActFormat::Bf16).map(drop))?;
        time("down GEMM", gemm_flops(d, i), &mut || {
            m_grouped_contiguous((&a).into(), GemmInput::Bf16(&w2), &layout.m_indices).map(drop)
        })?;
        time("combine", 0.0, &mut || combine(&y, &layout, Some(&r.topk_weights)).map(drop))?;
        time("combine backward", 0.0, &mut || combine_backward(&y, &gout, &layout, Some(&r.topk_weights)).map(drop))?;
        time("down wgrad (k-grouped)", gemm_flops(d, i), &mut || {
            k_grouped(GemmInput::Bf16(&gy), GemmInput::Bf16(&a.data), &layout.offsets).map(drop)
        })?;
        time("down dgrad", gemm_flops(d, i), &mut || {
            dgrad(GemmInput::Bf16(&gy), GemmInput::Bf16(&w2), &layout.m_indices).map(drop)
        })?;
        time("swiglu backward", 0.0, &mut || swiglu_backward(&h, &dact).map(drop))?;
        time("gate/up wgrad (k-grouped)", gemm_flops(2 * i, d), &mut || {
            k_grouped(GemmInput::Bf16(&dh), GemmInput::Bf16(&xp.data), &layout.offsets).map(drop)
        })?;
        time("gate/up dgrad", gemm_flops(2 * i, d), &mut || {
            dgrad(GemmInput::Bf16(&dh), GemmInput::Bf16(&w1), &layout.m_indices).map(drop)
        })?;
        time("route backward", 0.0, &mut || route_backward(&logits, &r.topk_ids, &gw, &rcfg).map(drop))?;
        let total: f64 = lines.iter().map(|l| l.1).sum();
        for (name, us, flops) in &lines {
            let tf = if *flops > 0.0 { format!("{:.0} TFLOPS", flops / (us * 1e-6) / 1e12) } else { "-".into() };
            println!(
                "MOEKIT-BENCH | moe-layer-v3-bf16 {name} | T=4096 D=7168 E=256 k=8 I=2048 | {us:.1} us | {tf} | {:.0}% of layer |",
                100.0 * us / total
            );
        }
        println!(
            "MOEKIT-BENCH | moe-layer-v3-bf16 total fwd+bwd | T=4096 | {total:.1} us | {:.0} tokens/s |",
            4096.0 / (total * 1e-6)
        );
        Ok(())
    }
}

fn benches() {
    let mut c = criterion();
    // As the GRPO command line does; MOEKIT_DEFAULT_MALLOC=1 measures glibc's defaults.
    if std::env::var("MOEKIT_DEFAULT_MALLOC").is_err() {
        moekit_model::tune_host_allocator();
    }
    // Run inside the pool, as an application would (the CLI does): the calling thread is a
    // worker, so parallel sections never hand off to another thread just to wait for it.
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    cpu(&mut c, &pool);
    if let Err(e) = gpu::run() {
        eprintln!("moe-layer-v3 GPU bench failed: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}

criterion_main!(benches);

//! The model with its routed experts on moekit's kernels: the host emulation
//! (`Device::Emulated`) against the kernels' CPU references (`Device::Cpu`, same BF16/FP8
//! arithmetic) and against the f32 host path, forward and backward; and on a GPU when there
//! is one (`gpu_*`, ignored without).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::BlockOrder;
use moekit_model::generate::next_token_targets;
use moekit_model::moe::{self, Experts, MoeGrads, MoeWeights};
use moekit_model::{loss, Model, ModelConfig, MoeConfig, Params, Precision, Rng, Score};
use moekit_tensor::Device;

/// DeepGEMM's accuracy metric (`1 - 2 sum(xy) / sum(x^2 + y^2)`, f64).
use moekit_gemm::reference::diff;

fn tiny_bf16() -> ModelConfig {
    ModelConfig {
        vocab_size: 12,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        max_seq_len: 8,
        first_dense_layers: 1,
        dense_ffn_dim: 16,
        init_std: 0.2,
        moe: MoeConfig {
            experts: 4,
            top_k: 2,
            shared_experts: 1,
            expert_dim: 8,
            score: Score::Sigmoid,
            n_groups: 2,
            topk_groups: 2,
            precision: Precision::Bf16,
            align: 16,
            ..MoeConfig::default()
        },
        ..ModelConfig::default()
    }
}

fn images() -> [&'static moekit_cuda::KernelImage; 3] {
    [&moekit_gating::kernels::GATING, &moekit_dispatch::kernels::DISPATCH, &moekit_gemm::kernels::GEMM_PORTABLE]
}

/// Logits and gradients of a cross-entropy step on `experts`.
fn step(cfg: &ModelConfig, experts: Experts, toks: &[u32], b: usize, t: usize) -> (Vec<f32>, Params, Vec<Vec<i32>>) {
    let mut model = Model::new(cfg.clone(), 3).unwrap();
    model.router_bias = vec![vec![0.01, -0.02, 0.03, 0.0]];
    model.set_experts(experts).unwrap();
    let fwd = model.forward(toks, b, t, None).unwrap();
    let targets = next_token_targets(toks, b, t);
    let (_, dlogits) = loss::cross_entropy(&fwd.logits, cfg.vocab_size, &targets);
    let grads = model.backward(&fwd, &dlogits).unwrap();
    (fwd.logits.clone(), grads, fwd.routing_ids())
}

#[test]
fn emu_model_step_matches_the_cpu_paths() {
    let Some(emu) = emulator_or_skip("emu_model_step_matches_the_cpu_paths", &images(), BlockOrder::Reversed) else {
        return;
    };
    let cfg = tiny_bf16();
    let (b, t) = (3, 8);
    let mut r = Rng::new(4);
    let toks: Vec<u32> = (0..b * t).map(|_| r.below(12) as u32).collect();
    let bf16 = Precision::Bf16;
    let (le, ge, ie) = step(&cfg, Experts::Kernels { device: Device::Emulated(emu), precision: bf16 }, &toks, b, t);
    let (lc, gc, ic) = step(&cfg, Experts::Kernels { device: Device::Cpu, precision: bf16 }, &toks, b, t);
    let (lh, gh, ih) = step(&cfg, Experts::Host, &toks, b, t);
    // Routing is computed from f32 logits before any BF16 rounding of the experts: the first
    // MoE layer's logits are the same bits on every path, and its ids equal.
    assert_eq!(ie, ic);
    assert_eq!(ie, ih);
    // Emulated kernels vs their CPU references: same BF16 operands, f32 vs f64 accumulation,
    // then one BF16 rounding of each output; a rounding flip changes a value by 2^-8
    // relative, rarely. Bound 1e-6 (the kernels' own tests see 0 on this flow).
    let d_ec = diff(&le, &lc);
    // Kernels vs the f32 host: each of the ~6 BF16 roundings on the expert path (x, weights,
    // h, act, y, output; and the backward's) has relative error <= 2^-9, so the diff metric,
    // about half the mean squared relative error, is <= 6 * (2^-9)^2 / 2 ~ 1e-5 on the expert
    // outputs, and less on logits that the f32 attention and shared expert also feed.
    let d_eh = diff(&le, &lh);
    eprintln!("logits diff: emulated vs cpu-reference {d_ec:.2e}, emulated vs f32 host {d_eh:.2e}");
    assert!(d_ec < 1e-6, "emulated vs CPU reference logits: {d_ec}");
    assert!(d_eh < 2e-5, "emulated vs f32 logits: {d_eh}");
    for (i, name) in ge.names.iter().enumerate() {
        let (a, c, h) = (&ge.data[i], &gc.data[i], &gh.data[i]);
        let (dc, dh) = (diff(a, c), diff(a, h));
        // Gradients chain more BF16 roundings (the backward's dgrad and SwiGLU outputs): 4x.
        assert!(dc < 1e-5, "{name}: emulated vs CPU reference gradient diff {dc}");
        assert!(dh < 1e-4, "{name}: emulated vs f32 gradient diff {dh}");
    }
}

/// One MoE layer in FP8 (1x128 activations, 128x128 weights): emulated vs the CPU reference
/// ops vs the f32 host path.
#[test]
fn emu_fp8_moe_layer_matches_the_references() {
    let Some(emu) = emulator_or_skip("emu_fp8_moe_layer_matches_the_references", &images(), BlockOrder::Shuffled(7))
    else {
        return;
    };
    let cfg = ModelConfig {
        d_model: 128,
        moe: MoeConfig {
            experts: 4,
            top_k: 2,
            expert_dim: 128,
            n_groups: 1,
            topk_groups: 1,
            precision: Precision::Fp8,
            ..MoeConfig::default()
        },
        ..ModelConfig::default()
    };
    let (n, d, e, i) = (16, 128, 4, 128);
    let mut r = Rng::new(5);
    let mut v = |len: usize, s: f32| -> Vec<f32> { (0..len).map(|_| r.normal() * s).collect() };
    let (x, router, w1, w2, s1, s2) =
        (v(n * d, 1.0), v(e * d, 0.3), v(e * 2 * i * d, 0.05), v(e * d * i, 0.05), v(2 * i * d, 0.05), v(d * i, 0.05));
    let dy = v(n * d, 1.0);
    let w = MoeWeights { router: &router, w1: &w1, w2: &w2, shared: Some((&s1, &s2)), bias: None };
    let run = |experts: Experts| {
        let (y, c) = moe::forward(&experts, &cfg, &w, &x, n, None).unwrap();
        let (mut gr, mut g1, mut g2) = (vec![0.0; router.len()], vec![0.0; w1.len()], vec![0.0; w2.len()]);
        let (mut h1, mut h2) = (vec![0.0; s1.len()], vec![0.0; s2.len()]);
        let grads = MoeGrads { router: &mut gr, w1: &mut g1, w2: &mut g2, shared: Some((&mut h1, &mut h2)) };
        let (dx, dl) = moe::backward(&experts, &cfg, &w, &x, &c, &dy, grads).unwrap();
        vec![y, dx, dl, g1, g2]
    };
    let fp8 = Precision::Fp8;
    let emu_out = run(Experts::Kernels { device: Device::Emulated(emu), precision: fp8 });
    let cpu_out = run(Experts::Kernels { device: Device::Cpu, precision: fp8 });
    let host = run(Experts::Host);
    for (k, name) in ["y", "dx", "dlogits", "dW1", "dW2"].into_iter().enumerate() {
        let (a, c, h) = (&emu_out[k], &cpu_out[k], &host[k]);
        let (dc, dh) = (diff(a, c), diff(a, h));
        eprintln!("fp8 {name}: emulated vs cpu-reference {dc:.2e}, vs f32 {dh:.2e}");
        // Same FP8 operands: only accumulation order and BF16 output rounding differ.
        assert!(dc < 1e-5, "{name}: emulated vs CPU reference {dc}");
        // FP8 E4M3 forward (3 mantissa bits, relative error <= 2^-4 per value, averaging over
        // K = 128): DeepGEMM's bound for an FP8 GEMM is diff < 1e-3, and y, dx and dlogits
        // (one FP8-derived factor each) share it. The weight gradients are sums over only the
        // ~8 tokens an expert gets of products of two FP8-derived factors (the gradient and the
        // activation silu(gate) * up of the FP8 GEMM's output): their squared relative errors
        // add, so the metric's bound doubles.
        let bound = if name.starts_with("dW") { 2e-3 } else { 1e-3 };
        assert!(dh < bound, "{name}: FP8 vs f32 {dh}");
    }
}

#[test]
#[ignore = "needs a GPU (run with --include-ignored)"]
fn gpu_model_step_matches_the_emulation() {
    let Some(gpu) = gpu_or_skip("gpu_model_step_matches_the_emulation", &images()) else {
        return;
    };
    let dev = Device::Cuda(moekit_tensor::CudaDevice::new(gpu.ordinal()).unwrap());
    let cfg = tiny_bf16();
    let (b, t) = (3, 8);
    let mut r = Rng::new(4);
    let toks: Vec<u32> = (0..b * t).map(|_| r.below(12) as u32).collect();
    let (lg, gg, _) = step(&cfg, Experts::Kernels { device: dev, precision: Precision::Bf16 }, &toks, b, t);
    let (lc, gc, _) = step(&cfg, Experts::Kernels { device: Device::Cpu, precision: Precision::Bf16 }, &toks, b, t);
    assert!(diff(&lg, &lc) < 1e-6);
    for i in 0..gg.data.len() {
        assert!(diff(&gg.data[i], &gc.data[i]) < 1e-5, "{}", gg.names[i]);
    }
}

//! The device-resident training step (`moekit_model::device::DeviceTrainer`): the emulated
//! kernels against the CPU references (every op's reference on `Device::Cpu`), the device
//! step against the host f32 model, the step's host synchronisation points, determinism.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, KernelImage, SyncCounter};
use moekit_model::device::{DeviceTrainer, StepMetrics};
use moekit_model::{generate::next_token_targets, loss, AdamW, AdamWConfig, Model, ModelConfig, MoeConfig};
use moekit_tensor::{CudaDevice, Device};

const BATCH: usize = 2;
const SEQ: usize = 8;

/// Two blocks (one dense, one MoE with a shared expert and a sigmoid router with bias),
/// every GEMM dimension a multiple of 8, head dimension 16.
fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        max_seq_len: SEQ,
        first_dense_layers: 1,
        dense_ffn_dim: 32,
        // Larger than the default so the BF16 matmuls see values of every magnitude.
        init_std: 0.2,
        moe: MoeConfig { experts: 8, top_k: 2, shared_experts: 1, expert_dim: 16, ..MoeConfig::default() },
        ..ModelConfig::default()
    }
}

fn opt() -> AdamWConfig {
    AdamWConfig { lr: 1e-2, warmup_steps: 0, total_steps: 10, clip_norm: 1.0, ..AdamWConfig::default() }
}

/// Pseudo-random token batches (never constant).
fn batch(seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let tokens: Vec<u32> = (0..BATCH * SEQ)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as u32 % 16
        })
        .collect();
    let targets = next_token_targets(&tokens, BATCH, SEQ);
    (tokens, targets)
}

fn images() -> Vec<&'static KernelImage> {
    vec![
        &moekit_cast::kernels::CAST,
        &moekit_norm::kernels::NORM,
        &moekit_attention::kernels::ATTENTION,
        &moekit_logits::kernels::LOGITS,
        &moekit_optim::kernels::OPTIM,
        &moekit_gating::kernels::GATING,
        &moekit_dispatch::kernels::DISPATCH,
        &moekit_gemm::kernels::GEMM_PORTABLE,
        &moekit_gemm::kernels::QUANT_BLOCKS,
    ]
}

fn emulated(test: &str, order: BlockOrder) -> Option<Device> {
    emulator_or_skip(test, &images(), order).map(Device::Emulated)
}

fn gpu(test: &str) -> Option<Device> {
    gpu_or_skip(test, &images()).map(|_| Device::Cuda(CudaDevice::new(0).expect("GPU present")))
}

/// The tiny model with FP8 routed experts: d_model and expert_dim 128 (the 128 x 128 weight
/// blocks), 2 heads of 64.
fn tiny_fp8() -> ModelConfig {
    let t = tiny();
    ModelConfig {
        d_model: 128,
        moe: MoeConfig { expert_dim: 128, precision: moekit_model::Precision::Fp8, ..t.moe },
        ..t
    }
}

/// `steps` steps from the same model on `dev`: the metrics and the trained model.
fn train(dev: &Device, steps: usize) -> (Vec<StepMetrics>, Model) {
    train_cfg(tiny(), dev, steps)
}

fn train_cfg(cfg: ModelConfig, dev: &Device, steps: usize) -> (Vec<StepMetrics>, Model) {
    let model = Model::new(cfg, 3).unwrap();
    let mut t = DeviceTrainer::new(&model, opt(), dev).unwrap();
    let metrics = (0..steps)
        .map(|s| {
            let (tokens, targets) = batch(10 + s as u64);
            t.step(&tokens, &targets, BATCH, SEQ).unwrap()
        })
        .collect();
    (metrics, t.download().unwrap())
}

/// Emulated kernels vs CPU references over `steps` steps.
///
/// Tolerances. Every op but the GEMMs claims bit-identity with its reference; the grouped
/// GEMM's kernel accumulates in f32, its reference in f64, and both round the result to BF16
/// (m-grouped, dgrad) or return f32 (k-grouped). So a BF16 output differs by at most one BF16
/// ulp (2^-8 relative), and only when the f32 sum lands within ~K 2^-24 of a rounding
/// boundary: a few outputs per step. Such a flip moves one activation by 2^-8 relative and
/// travels through the rest of the network, so downstream values differ by O(2^-8) relative
/// at the flipped positions and not at all elsewhere. Bounds:
/// - loss and grad norm: averages over many terms, each within (layers + 2) flips of 2^-8
///   relative: 4 * 2^-8 = 1.6% relative is a safe bound (in practice far smaller);
/// - parameters: one AdamW update moves a weight by at most `lr (|u| + wd |p|)` with
///   `|u| <= 1 / (1 - beta1) (...)`: at steps 1-2 `|u| <= 1.1`, so the two runs' weights
///   cannot differ by more than `2 * 1.1 * lr` per step (when a gradient sign flips near 0)
///   — a hard bound; and since most gradients are identical or within a BF16 ulp, the mean
///   absolute difference must be far below it: at most 1% of `lr` per step.
fn assert_runs_close(a: &(Vec<StepMetrics>, Model), b: &(Vec<StepMetrics>, Model), what: &str) {
    let steps = a.0.len() as f32;
    for (ma, mb) in a.0.iter().zip(&b.0) {
        assert_eq!((ma.step, ma.lr), (mb.step, mb.lr), "{what}: step and learning rate are exact");
        let rel = |x: f32, y: f32| (x - y).abs() / y.abs().max(1e-6);
        assert!(rel(ma.loss, mb.loss) <= 4.0 / 256.0, "{what}: loss {} vs {}", ma.loss, mb.loss);
        assert!(rel(ma.grad_norm, mb.grad_norm) <= 4.0 / 256.0, "{what}: norm {} vs {}", ma.grad_norm, mb.grad_norm);
    }
    let lr = opt().lr;
    let (mut sum, mut n, mut worst) = (0.0f64, 0usize, 0.0f32);
    for (i, (pa, pb)) in a.1.params.data.iter().zip(&b.1.params.data).enumerate() {
        for (x, y) in pa.iter().zip(pb) {
            let d = (x - y).abs();
            assert!(d <= 2.2 * lr * steps, "{what}: {}: {x} vs {y}", a.1.params.names[i]);
            worst = worst.max(d);
            sum += d as f64;
            n += 1;
        }
    }
    let mean = sum / n as f64;
    eprintln!("{what}: mean |dp| {mean:e}, worst {worst:e}, metrics {:?} vs {:?}", a.0, b.0);
    assert!(mean <= 0.01 * (lr * steps) as f64, "{what}: mean |dp| = {mean}");
    for (ba, bb) in a.1.router_bias.iter().zip(&b.1.router_bias) {
        // The bias moves by +-gamma per step from integer counts: equal unless a routing
        // choice flipped, then by 2 gamma per step at most.
        for (x, y) in ba.iter().zip(bb) {
            assert!((x - y).abs() <= 2.0 * tiny().moe.bias_update_rate * steps + 1e-7, "{what}: bias {x} vs {y}");
        }
    }
}

/// The balance loss on the device: emulated against the CPU references (the balance-loss
/// backward kernel is bit-identical to its reference, so the same bounds hold).
#[test]
fn emu_balance_loss_step_matches_cpu() {
    let Some(dev) = emulated("emu_balance_loss_step_matches_cpu", BlockOrder::Reversed) else { return };
    let cfg = || ModelConfig { moe: MoeConfig { balance_loss_alpha: 0.1, ..tiny().moe }, ..tiny() };
    let emu = train_cfg(cfg(), &dev, 2);
    let cpu = train_cfg(cfg(), &Device::Cpu, 2);
    assert_runs_close(&emu, &cpu, "balance loss, emulated vs cpu");
    // And it is used: the router's weights move differently than without it.
    let plain = train_cfg(tiny(), &Device::Cpu, 2);
    assert!(cpu.1.params.data != plain.1.params.data, "the balance loss changed nothing");
}

/// FP8 routed experts: the emulated step against the CPU references of the same ops. The FP8
/// pieces are bit-identical to their references (the device weight quantization, the fused
/// 1x128 quantization of the permuted tokens and of the SwiGLU output), the FP8 GEMM differs
/// from its reference by f32 against f64 summation on the same dequantized inputs, so the
/// BF16-ulp argument of [`assert_runs_close`] holds: a flipped GEMM output can move one 1x128
/// block's scale (when it is the block's amax) and with it that block's codes by one E4M3
/// rounding, a local change of the same kind that the loss and parameter bounds absorb.
#[test]
fn emu_fp8_training_step_matches_cpu() {
    let Some(dev) = emulated("emu_fp8_training_step_matches_cpu", BlockOrder::Reversed) else { return };
    let emu = train_cfg(tiny_fp8(), &dev, 2);
    let cpu = train_cfg(tiny_fp8(), &Device::Cpu, 2);
    assert_runs_close(&emu, &cpu, "fp8 emulated vs cpu");
}

/// FP8 routed experts train (CPU references): repeated steps on one batch drive the loss down,
/// and the step differs from the BF16 one (the FP8 path is taken).
#[test]
fn fp8_device_training_reduces_the_loss() {
    let model = Model::new(tiny_fp8(), 3).unwrap();
    let mut t = DeviceTrainer::new(&model, opt(), &Device::Cpu).unwrap();
    let (tokens, targets) = batch(10);
    let first = t.step(&tokens, &targets, BATCH, SEQ).unwrap();
    let mut last = first.loss;
    for _ in 0..9 {
        last = t.step(&tokens, &targets, BATCH, SEQ).unwrap().loss;
    }
    assert!(last < 0.5 * first.loss, "fp8 loss {} -> {last} after 10 steps", first.loss);
    let bf16 =
        ModelConfig { moe: MoeConfig { precision: moekit_model::Precision::Bf16, ..tiny_fp8().moe }, ..tiny_fp8() };
    let mut tb = DeviceTrainer::new(&Model::new(bf16, 3).unwrap(), opt(), &Device::Cpu).unwrap();
    let b = tb.step(&tokens, &targets, BATCH, SEQ).unwrap();
    assert_ne!(first.grad_norm, b.grad_norm, "the FP8 step equals the BF16 one: FP8 not used");
}

#[test]
fn emu_training_step_matches_cpu() {
    let Some(dev) = emulated("emu_training_step_matches_cpu", BlockOrder::Reversed) else { return };
    let emu = train(&dev, 2);
    let cpu = train(&Device::Cpu, 2);
    assert_runs_close(&emu, &cpu, "emulated vs cpu");
    assert!(emu.0[1].loss < emu.0[0].loss + 0.5, "the step trains: {:?}", emu.0);
}

/// The device step is the host model's step with BF16 matmuls: same initial weights, same
/// batch, the host f32 `Model` forward / cross-entropy / backward / `AdamW` step.
///
/// Tolerance: the loss's gradient w.r.t. a row's logits has L1 norm <= 2 (p - onehot), so
/// `|dloss| <= 2 max |dz|`; the logits differ by the BF16 roundings of the chain that makes
/// them (each matmul's two operands and its output: 3 roundings of 2^-9 relative per matmul,
/// 4 matmuls on the residual path per block plus the head: 3 (4 L + 1) 2^-9 relative of the
/// largest logit, over 2^-9 = half an ulp, plus the same again for the terms the
/// residual stream carries): `|dloss| <= 2 * 2 * 3 (4 L + 1) 2^-9 max |z|`. The gradient
/// norm: each gradient is a product along the same chain, same relative bound.
#[test]
fn device_step_matches_the_host_model() {
    // The tiny model, and an untied head with a softmax router and no shared expert (the
    // other branches of the step).
    let untied = ModelConfig {
        tie_embeddings: false,
        moe: MoeConfig {
            score: moekit_model::Score::Softmax,
            shared_experts: 0,
            bias_update_rate: 0.0,
            n_groups: 1,
            topk_groups: 1,
            ..tiny().moe
        },
        ..tiny()
    };
    // The sequence-wise balance loss (its gradient enters the router's).
    let balance = ModelConfig { moe: MoeConfig { balance_loss_alpha: 0.1, ..tiny().moe }, ..tiny() };
    for cfg in [tiny(), untied, balance] {
        step_matches_the_host_model(cfg);
    }
}

fn step_matches_the_host_model(cfg: ModelConfig) {
    let layers = cfg.n_layers;
    let model = Model::new(cfg, 3).unwrap();
    let (tokens, targets) = batch(10);
    // Host f32 step.
    let fwd = model.forward(&tokens, BATCH, SEQ, None).unwrap();
    let (host_loss, dlogits) = loss::cross_entropy(&fwd.logits, model.cfg.vocab_size, &targets);
    let grads = model.backward(&fwd, &dlogits).unwrap();
    let mut host_opt = AdamW::new(opt(), &model.params).unwrap();
    let mut host = model.clone();
    let info = host_opt.step(&mut host.params, &grads).unwrap();
    // Device step on the CPU references (the emulation equals them within the test above).
    let mut t = DeviceTrainer::new(&model, opt(), &Device::Cpu).unwrap();
    let m = t.step(&tokens, &targets, BATCH, SEQ).unwrap();
    let zmax = fwd.logits.iter().fold(0.0f32, |a, &z| a.max(z.abs()));
    let rel = 2.0 * 3.0 * (4.0 * layers as f32 + 1.0) / 512.0;
    eprintln!("host loss {host_loss} norm {} / device {m:?}, max |z| {zmax}", info.grad_norm);
    assert!((m.loss - host_loss).abs() <= 2.0 * rel * zmax, "loss {} vs host {host_loss}", m.loss);
    assert!((m.grad_norm - info.grad_norm).abs() <= rel * info.grad_norm, "norm {} vs {}", m.grad_norm, info.grad_norm);
    assert_eq!(m.lr, info.lr);
    // Every parameter's gradient, tensor by tensor: the relative L2 error of each tensor is
    // within the same chain-of-roundings bound (a wrong backward of one op breaks the tensors
    // upstream of it by O(1)).
    let mut t = DeviceTrainer::new(&model, opt(), &Device::Cpu).unwrap();
    let (dloss, dgrads) = t.gradients(&tokens, &targets, BATCH, SEQ).unwrap();
    assert_eq!(dloss, m.loss, "gradients() runs the step's forward");
    for (i, (gd, gh)) in dgrads.data.iter().zip(&grads.data).enumerate() {
        let err: f64 = gd.iter().zip(gh).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = gh.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
        let name = &grads.names[i];
        eprintln!("  {name}: relative gradient error {:.4}", err / norm.max(1e-30));
        assert!(err <= rel as f64 * norm + 1e-7, "{name}: |dg| = {err:e} vs |g| = {norm:e}");
    }
}

/// Training works: repeated steps on one batch drive the loss well down (CPU references).
#[test]
fn device_training_reduces_the_loss() {
    let model = Model::new(tiny(), 3).unwrap();
    let mut t = DeviceTrainer::new(&model, opt(), &Device::Cpu).unwrap();
    let (tokens, targets) = batch(10);
    let first = t.step(&tokens, &targets, BATCH, SEQ).unwrap().loss;
    let mut last = first;
    for _ in 0..9 {
        last = t.step(&tokens, &targets, BATCH, SEQ).unwrap().loss;
    }
    assert!(last < 0.5 * first, "loss {first} -> {last} after 10 steps");
    // download() gives the trained weights: the host model's loss on the batch agrees.
    let trained = t.download().unwrap();
    let fwd = trained.forward(&tokens, BATCH, SEQ, None).unwrap();
    let (host_loss, _) = loss::cross_entropy(&fwd.logits, trained.cfg.vocab_size, &targets);
    assert!(host_loss < 0.6 * first, "host loss of the downloaded model {host_loss}");
    // The optimizer state comes back too (resuming on the host).
    let state = t.download_optimizer(opt()).unwrap();
    assert_eq!(state.step, 10);
    assert_eq!(state.m.shapes, trained.params.shapes);
    assert!(state.v.data.iter().flatten().any(|&v| v > 0.0) && state.v.data.iter().flatten().all(|&v| v >= 0.0));
}

/// Asserts one full step on `dev` synchronises only at the one metrics readback.
fn assert_step_sync_free(dev: &Device) {
    let model = Model::new(tiny(), 3).unwrap();
    let mut t = DeviceTrainer::new(&model, opt(), dev).unwrap();
    let (tokens, targets) = batch(10);
    let region = SyncCounter::start();
    let m = t.step(&tokens, &targets, BATCH, SEQ).unwrap();
    // The loss and the optimizer's scalars, packed on the device: one readback.
    assert_eq!(region.count(), 1, "host synchronisation inside the step on {}: {:?}", dev.name(), region.calls());
    assert!(m.loss.is_finite() && m.grad_norm > 0.0);
}

#[test]
fn emu_training_step_has_no_host_synchronisation() {
    let Some(dev) = emulated("emu_training_step_has_no_host_synchronisation", BlockOrder::InOrder) else { return };
    assert_step_sync_free(&dev);
}

#[test]
fn emu_training_step_is_deterministic() {
    let Some(a) = emulated("emu_training_step_is_deterministic", BlockOrder::InOrder) else { return };
    let Some(b) = emulated("emu_training_step_is_deterministic", BlockOrder::Shuffled(5)) else { return };
    let (ra, rb) = (train(&a, 1), train(&b, 1));
    assert_eq!(ra.0, rb.0, "metrics");
    assert!(ra.1.params == rb.1.params, "parameters, bit for bit");
    assert_eq!(ra.1.router_bias, rb.1.router_bias);
}

/// Any token count: 2 sequences of 5 (10 tokens, no multiple of 8), emulated against the CPU
/// references and the CPU step against the host model (the tolerances above).
#[test]
fn emu_training_step_takes_any_token_count() {
    let Some(dev) = emulated("emu_training_step_takes_any_token_count", BlockOrder::InOrder) else { return };
    let run = |d: &Device| {
        let model = Model::new(tiny(), 3).unwrap();
        let mut t = DeviceTrainer::new(&model, opt(), d).unwrap();
        let tokens = &batch(7).0[..10];
        let targets = next_token_targets(tokens, 2, 5);
        let m = (0..2).map(|_| t.step(tokens, &targets, 2, 5).unwrap()).collect::<Vec<_>>();
        (m, t.download().unwrap())
    };
    assert_runs_close(&run(&dev), &run(&Device::Cpu), "10 tokens, emulated vs cpu");
}

#[test]
fn device_trainer_rejects_bad_input() {
    let model = Model::new(tiny(), 3).unwrap();
    let mut t = DeviceTrainer::new(&model, opt(), &Device::Cpu).unwrap();
    let (tokens, targets) = batch(1);
    assert!(t.step(&tokens[..12], &targets[..11], 2, 6).is_err(), "11 targets for 12 tokens");
    let mut bad = tokens.clone();
    bad[3] = 16;
    assert!(t.step(&bad, &targets, BATCH, SEQ).is_err(), "token outside the vocabulary");
    let odd = ModelConfig { d_model: 36, n_heads: 2, ..tiny() };
    let m = Model::new(odd, 0).unwrap();
    assert!(matches!(DeviceTrainer::new(&m, opt(), &Device::Cpu), Err(moekit_model::Error::Config { .. })));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_training_step_matches_cpu() {
    let Some(dev) = gpu("gpu_training_step_matches_cpu") else { return };
    let g = train(&dev, 2);
    let cpu = train(&Device::Cpu, 2);
    assert_runs_close(&g, &cpu, "gpu vs cpu");
    // The GPU runs the emulated kernels' code: same bits as the emulation where available.
    if let Some(emu) = emulated("gpu_training_step_matches_cpu", BlockOrder::InOrder) {
        let e = train(&emu, 2);
        assert_runs_close(&g, &e, "gpu vs emulated");
    }
    // FP8 routed experts.
    let g = train_cfg(tiny_fp8(), &dev, 2);
    assert_runs_close(&g, &train_cfg(tiny_fp8(), &Device::Cpu, 2), "fp8 gpu vs cpu");
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_training_step_has_no_host_synchronisation() {
    let Some(dev) = gpu("gpu_training_step_has_no_host_synchronisation") else { return };
    // A first step loads every module (a module load synchronises).
    let model = Model::new(tiny(), 3).unwrap();
    let mut warm = DeviceTrainer::new(&model, opt(), &dev).unwrap();
    let (tokens, targets) = batch(10);
    warm.step(&tokens, &targets, BATCH, SEQ).unwrap();
    assert_step_sync_free(&dev);
}

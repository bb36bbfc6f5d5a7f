//! Device-resident generation (`moekit_model::device::DeviceGenerator`): the same generation
//! code on the emulated kernels and on the CPU references, the KV-cache decode against full
//! forwards, the decode step's host synchronisation points, determinism, EOS handling, and on
//! a GPU the graph-captured decode against the eager one.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, KernelImage, SyncCounter};
use moekit_model::device::{DeviceGeneration, DeviceGenerator, DeviceTrainer};
use moekit_model::{AdamWConfig, Model, ModelConfig, MoeConfig, SampleConfig};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

const BATCH: usize = 3; // padded to 8 rows on the device: the padding is exercised
const PROMPT: usize = 3;
const NEW: usize = 4;
const MAX_LEN: usize = 8;

/// Two blocks (one dense, one MoE with a shared expert and a sigmoid router with bias), every
/// GEMM dimension a multiple of 8, head dimension 16 (the training-step tests' model).
fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        max_seq_len: MAX_LEN,
        first_dense_layers: 1,
        dense_ffn_dim: 32,
        // Large enough that the logits spread (sampling is not near-uniform, greedy has no ties).
        init_std: 0.2,
        moe: MoeConfig { experts: 8, top_k: 2, shared_experts: 1, expert_dim: 16, ..MoeConfig::default() },
        ..ModelConfig::default()
    }
}

fn prompts(seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BATCH * PROMPT)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as u32 % 16
        })
        .collect()
}

fn images() -> Vec<&'static KernelImage> {
    vec![
        &moekit_norm::kernels::NORM,
        &moekit_attention::kernels::ATTENTION,
        &moekit_logits::kernels::LOGITS,
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

fn trainer(dev: &Device) -> DeviceTrainer {
    DeviceTrainer::new(&Model::new(tiny(), 5).unwrap(), AdamWConfig::default(), dev).unwrap()
}

/// The sampling configurations every comparison covers.
fn configs() -> Vec<(&'static str, SampleConfig, u64)> {
    let base = SampleConfig { max_new_tokens: NEW, ..SampleConfig::default() };
    vec![
        ("greedy", SampleConfig { temperature: 0.0, ..base.clone() }, 0),
        ("t=1", base.clone(), 11),
        ("t=1 top-k 4", SampleConfig { top_k: 4, ..base.clone() }, 12),
        ("t=0.8 top-p 0.9", SampleConfig { temperature: 0.8, top_p: 0.9, ..base.clone() }, 13),
    ]
}

fn generate(t: &DeviceTrainer, cfg: &SampleConfig, seed: u64) -> DeviceGeneration {
    let mut g = DeviceGenerator::new(t, BATCH, MAX_LEN).unwrap().with_logits(true);
    g.generate(&prompts(1), cfg, seed).unwrap()
}

/// Largest `|a - b|` relative to the largest `|b|` of the row set.
fn rel_max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Logit tolerance between the kernels and the CPU references. Every logit is a BF16 value
/// (the head's GEMM output, widened exactly); the grouped GEMM kernels sum the BF16 products
/// in f32 in another order than their references, so a GEMM output can land on the other side
/// of a BF16 rounding boundary: one BF16 ulp, `2^-8` relative. Such a flip upstream moves a
/// logit by at most a few ulps through the two blocks (norms renormalise, residuals add); we
/// allow 4 ulps of the largest logit, `4 * 2^-8`. Observed on the emulation: identical bits
/// (difference 0 for every configuration; printed).
const LOGIT_TOL: f32 = 4.0 / 256.0;

#[test]
fn emu_device_generation_matches_cpu() {
    let Some(dev) = emulated("emu_device_generation_matches_cpu", BlockOrder::Reversed) else { return };
    let (emu, cpu) = (trainer(&dev), trainer(&Device::Cpu));
    for (name, cfg, seed) in configs() {
        let a = generate(&emu, &cfg, seed);
        let b = generate(&cpu, &cfg, seed);
        let d = rel_max_diff(&a.logits, &b.logits);
        eprintln!("{name}: max |dlogit| / max |logit| = {d:e}, tokens {:?}", a.generation.tokens);
        assert_eq!(a.generation.tokens, b.generation.tokens, "{name}: tokens, emulation vs CPU");
        assert_eq!(a.generation.lengths, b.generation.lengths, "{name}");
        assert_eq!(a.decoded, NEW);
        assert_eq!(a.logits.len(), NEW * BATCH * 16);
        assert!(d <= LOGIT_TOL, "{name}: logits differ by {d}");
        // log p = z - lse: a logit within LOGIT_TOL * max|z| moves log p by twice that at most.
        let scale = b.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.generation.logprobs.iter().zip(&b.generation.logprobs) {
            assert!((x - y).abs() <= 2.0 * LOGIT_TOL * scale + 1e-6, "{name}: log-prob {x} vs {y}");
        }
        assert!(a.generation.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
    }
}

/// FP8 routed experts when sampling (the forward without the BF16 copies the backward would
/// read): the emulation against the CPU references, as above.
#[test]
fn emu_fp8_device_generation_matches_cpu() {
    let Some(dev) = emulated("emu_fp8_device_generation_matches_cpu", BlockOrder::Reversed) else { return };
    let t = tiny();
    let cfg = ModelConfig {
        d_model: 128,
        moe: MoeConfig { expert_dim: 128, precision: moekit_model::Precision::Fp8, ..t.moe },
        ..t
    };
    let trainer =
        |d: &Device| DeviceTrainer::new(&Model::new(cfg.clone(), 5).unwrap(), AdamWConfig::default(), d).unwrap();
    let (emu, cpu) = (trainer(&dev), trainer(&Device::Cpu));
    let (name, sc, seed) = configs().remove(0);
    let (a, b) = (generate(&emu, &sc, seed), generate(&cpu, &sc, seed));
    let d = rel_max_diff(&a.logits, &b.logits);
    eprintln!("fp8 {name}: max |dlogit| / max |logit| = {d:e}");
    assert_eq!(a.generation.tokens, b.generation.tokens, "fp8 {name}: tokens, emulation vs CPU");
    assert!(d <= LOGIT_TOL, "fp8 {name}: logits differ by {d}");
}

/// Greedy decode with the KV cache equals greedy decode by full forwards (no cache) of the
/// growing sequences: the same tokens, and bit-identical logits (the cached attention of a
/// query equals that row of the full attention bit for bit, and every other op is row-wise).
fn assert_cache_equals_full_forwards(dev: &Device) {
    let t = trainer(dev);
    let cfg = SampleConfig { max_new_tokens: NEW, temperature: 0.0, ..SampleConfig::default() };
    let g = generate(&t, &cfg, 0);
    let seq = &g.generation;
    let v = t.config().vocab_size;
    for step in 0..NEW {
        let len = PROMPT + step;
        let toks: Vec<u32> = (0..BATCH).flat_map(|b| seq.tokens[b * seq.seq_len..][..len].to_vec()).collect();
        let full = t.last_logits(&toks, BATCH, len).unwrap();
        let cached = &g.logits[step * BATCH * v..][..BATCH * v];
        assert_eq!(full, cached, "{}: logits at step {step}, full forward vs KV cache", dev.name());
        for b in 0..BATCH {
            let row = &full[b * v..][..v];
            let best = (0..v).fold(0, |m, i| if row[i] > row[m] { i } else { m });
            assert_eq!(seq.tokens[b * seq.seq_len + len], best as u32, "{}: greedy token {b}, {step}", dev.name());
        }
    }
}

#[test]
fn emu_greedy_kv_cache_decode_equals_full_forwards() {
    let Some(dev) = emulated("emu_greedy_kv_cache_decode_equals_full_forwards", BlockOrder::InOrder) else { return };
    assert_cache_equals_full_forwards(&dev);
}

#[test]
fn cpu_greedy_kv_cache_decode_equals_full_forwards() {
    assert_cache_equals_full_forwards(&Device::Cpu);
}

/// A decode step (and the sampling after it) has no host synchronisation point; a whole
/// generation has exactly one: the final readback of every step's tokens and log-probabilities.
fn assert_decode_sync_free(dev: &Device) {
    let t = trainer(dev);
    let mut g = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap();
    let cfg = SampleConfig { max_new_tokens: NEW, ..SampleConfig::default() };
    if g.uses_graphs() {
        g.generate(&prompts(2), &cfg, 3).unwrap(); // captures the positions' graphs
    }
    let tokens = Tensor::from_slice(&[1i32; 8], &[g.rows()], dev).unwrap();
    let region = SyncCounter::start();
    for pos in PROMPT..PROMPT + 2 {
        let logits = g.decode_step(&tokens, pos).unwrap();
        let next = moekit_logits::sample(logits, &moekit_logits::SampleConfig::default(), 9, pos as u64).unwrap();
        drop(moekit_logits::log_softmax(logits, &next).unwrap());
    }
    assert_eq!(region.count(), 0, "host synchronisation in a decode step on {}: {:?}", dev.name(), region.calls());
    let whole = SyncCounter::start();
    g.generate(&prompts(2), &cfg, 3).unwrap();
    assert_eq!(whole.count(), 1, "only the final (packed) readback on {}: {:?}", dev.name(), whole.calls());
}

#[test]
fn emu_decode_step_has_no_host_synchronisation() {
    let Some(dev) = emulated("emu_decode_step_has_no_host_synchronisation", BlockOrder::InOrder) else { return };
    assert_decode_sync_free(&dev);
}

#[test]
fn emu_device_generation_is_deterministic() {
    let Some(a) = emulated("emu_device_generation_is_deterministic", BlockOrder::InOrder) else { return };
    let Some(b) = emulated("emu_device_generation_is_deterministic", BlockOrder::Reversed) else { return };
    let cfg = SampleConfig { max_new_tokens: NEW, top_k: 8, ..SampleConfig::default() };
    let ga = generate(&trainer(&a), &cfg, 77);
    let gb = generate(&trainer(&b), &cfg, 77);
    let bits = |g: &DeviceGeneration| {
        (
            g.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            g.generation.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(ga.generation.tokens, gb.generation.tokens, "same seed, same tokens in any block order");
    assert_eq!(bits(&ga), bits(&gb), "same bits in any block order");
    // Another seed gives other tokens (the seed is used; the CPU runs the same code).
    let cpu = trainer(&Device::Cpu);
    assert_eq!(generate(&cpu, &cfg, 77).generation.tokens, ga.generation.tokens);
    assert_ne!(generate(&cpu, &cfg, 78).generation.tokens, ga.generation.tokens);
}

/// EOS: the cut follows `Model::generate`'s semantics, and checking for EOS every N tokens
/// (stopping early once every sequence is done) gives the same result as never checking.
#[test]
fn device_generation_eos_cut_and_early_stop() {
    let t = trainer(&Device::Cpu);
    let plain = SampleConfig { max_new_tokens: NEW, ..SampleConfig::default() };
    let free = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().generate(&prompts(1), &plain, 21).unwrap();
    // EOS = the first sampled token of sequence 0: that sequence stops after one token.
    let eos = free.generation.tokens[PROMPT];
    let cfg = SampleConfig { eos: Some(eos), ..plain.clone() };
    let once = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().generate(&prompts(1), &cfg, 21).unwrap();
    let g = &once.generation;
    assert_eq!((g.lengths[0], g.truncated[0]), (1, false));
    for b in 0..BATCH {
        let row = &g.tokens[b * g.seq_len..][..g.seq_len];
        let free_row = &free.generation.tokens[b * g.seq_len..][..g.seq_len];
        let len = g.lengths[b];
        assert_eq!(row[..PROMPT + len], free_row[..PROMPT + len], "the completion up to EOS is unchanged");
        assert!(row[PROMPT + len..].iter().all(|&x| x == eos), "EOS padding after the end");
        assert!(g.logprobs[b * NEW + len..(b + 1) * NEW].iter().all(|&l| l == 0.0));
        assert_eq!(g.truncated[b], !row[PROMPT..PROMPT + len].contains(&eos));
    }
    for every in [1, 2, 3] {
        let mut gen = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().with_eos_check(every);
        let checked = gen.generate(&prompts(1), &cfg, 21).unwrap();
        assert_eq!(checked.generation, once.generation, "EOS check every {every}");
        assert!(checked.decoded <= NEW);
    }
    // Greedy decoding of this model reaches token 14 within two tokens in every sequence:
    // with EOS = 14 a check every token stops decoding early, with the same result.
    let greedy = SampleConfig { temperature: 0.0, eos: Some(14), ..plain };
    let full = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().generate(&prompts(1), &greedy, 0).unwrap();
    let mut gen = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().with_eos_check(1);
    let early = gen.generate(&prompts(1), &greedy, 0).unwrap();
    assert!(full.generation.truncated.iter().all(|&x| !x), "every sequence emitted EOS: {:?}", full.generation);
    assert!(early.decoded < NEW, "stopped early: decoded {}", early.decoded);
    assert_eq!(early.generation, full.generation);
}

#[test]
fn device_generator_rejects_bad_input() {
    let t = trainer(&Device::Cpu);
    assert!(DeviceGenerator::new(&t, 0, MAX_LEN).is_err());
    assert!(DeviceGenerator::new(&t, BATCH, MAX_LEN + 1).is_err());
    let mut g = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap();
    let ok = SampleConfig { max_new_tokens: NEW, ..SampleConfig::default() };
    let p = prompts(1);
    assert!(g.generate(&p[..4], &ok, 0).is_err(), "not equal prompts");
    assert!(g.generate(&[], &ok, 0).is_err());
    assert!(
        g.generate(&p, &SampleConfig { max_new_tokens: MAX_LEN - PROMPT + 1, ..ok.clone() }, 0).is_err(),
        "too long"
    );
    assert!(g.generate(&p, &SampleConfig { max_new_tokens: 0, ..ok.clone() }, 0).is_err());
    assert!(g.generate(&p, &SampleConfig { temperature: -1.0, ..ok.clone() }, 0).is_err());
    assert!(g.generate(&p, &SampleConfig { top_p: 0.0, ..ok.clone() }, 0).is_err());
    assert!(g.generate(&p, &SampleConfig { top_k: 17, ..ok.clone() }, 0).is_err());
    assert!(g.generate(&p, &SampleConfig { eos: Some(16), ..ok.clone() }, 0).is_err());
    let mut bad = p.clone();
    bad[2] = 16;
    assert!(g.generate(&bad, &ok, 0).is_err(), "token outside the vocabulary");
    let wrong = Tensor::zeros(&[3], DType::I32, &Device::Cpu).unwrap();
    assert!(g.decode_step(&wrong, 0).is_err());
    let right = Tensor::zeros(&[8], DType::I32, &Device::Cpu).unwrap();
    assert!(g.decode_step(&right, MAX_LEN).is_err());
    // Still usable after the errors.
    assert_eq!(g.generate(&p, &ok, 0).unwrap().decoded, NEW);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_device_generation_matches_cpu() {
    let Some(dev) = gpu("gpu_device_generation_matches_cpu") else { return };
    let (gpu_t, cpu) = (trainer(&dev), trainer(&Device::Cpu));
    for (name, cfg, seed) in configs() {
        let a = generate(&gpu_t, &cfg, seed);
        let b = generate(&cpu, &cfg, seed);
        let d = rel_max_diff(&a.logits, &b.logits);
        eprintln!("gpu {name}: max |dlogit| / max |logit| = {d:e}");
        assert_eq!(a.generation.tokens, b.generation.tokens, "{name}: tokens, GPU vs CPU");
        assert!(d <= LOGIT_TOL, "{name}: logits differ by {d}");
    }
    assert_cache_equals_full_forwards(&dev);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_graph_decode_equals_eager_decode() {
    let Some(dev) = gpu("gpu_graph_decode_equals_eager_decode") else { return };
    let t = trainer(&dev);
    let mut eager = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().with_graphs(false).with_logits(true);
    let mut graphs = DeviceGenerator::new(&t, BATCH, MAX_LEN).unwrap().with_logits(true);
    assert!(graphs.uses_graphs() && !eager.uses_graphs());
    for (round, (name, cfg, seed)) in configs().into_iter().enumerate() {
        let e = eager.generate(&prompts(round as u64), &cfg, seed).unwrap();
        let g = graphs.generate(&prompts(round as u64), &cfg, seed).unwrap();
        assert_eq!(g.generation, e.generation, "{name}: graph replay = eager, token for token");
        assert_eq!(
            g.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            e.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{name}: logits bit for bit"
        );
        // One graph per decode position, captured in the first round and replayed after.
        assert_eq!(graphs.captured_graphs(), NEW - 1, "{name}");
    }
    assert_eq!(eager.captured_graphs(), 0);
    assert_decode_sync_free(&dev);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_decode_step_has_no_host_synchronisation() {
    let Some(dev) = gpu("gpu_decode_step_has_no_host_synchronisation") else { return };
    assert_decode_sync_free(&dev);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_device_generation_is_deterministic() {
    let Some(dev) = gpu("gpu_device_generation_is_deterministic") else { return };
    let cfg = SampleConfig { max_new_tokens: NEW, top_k: 8, top_p: 0.95, ..SampleConfig::default() };
    let t = trainer(&dev);
    let (a, b) = (generate(&t, &cfg, 77), generate(&t, &cfg, 77));
    assert_eq!(a, b, "same seed, same tokens and bits on every run");
    let bits = |g: &DeviceGeneration| g.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
}

//! The model on the CPU: gradients against finite differences, the MoE layer against a plain
//! per-token loop, KV-cache decoding against the full forward, router replay, determinism
//! across runs and thread counts, checkpoints, configuration errors, sampling.

use moekit_model::generate::next_token_targets;
use moekit_model::moe::{self, Experts, MoeGrads, MoeWeights};
use moekit_model::{checkpoint, loss, AdamW, AdamWConfig, Model, ModelConfig, MoeConfig, Rng, SampleConfig, Score};
use std::collections::BTreeMap;

/// A tiny config exercising everything: 1 dense + 2 MoE blocks, sigmoid router with bias in
/// 2 groups, shared expert, balance loss, untied head.
fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 12,
        d_model: 16,
        n_layers: 3,
        n_heads: 2,
        max_seq_len: 12,
        first_dense_layers: 1,
        dense_ffn_dim: 24,
        tie_embeddings: false,
        init_std: 0.15,
        moe: MoeConfig {
            experts: 4,
            top_k: 2,
            shared_experts: 1,
            expert_dim: 8,
            score: Score::Sigmoid,
            n_groups: 2,
            topk_groups: 2,
            balance_loss_alpha: 0.05,
            ..MoeConfig::default()
        },
        ..ModelConfig::default()
    }
}

fn tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(v) as u32).collect()
}

fn randn(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() * std).collect()
}

/// `L = sum(c * logits) + aux` in f64, with the routing replayed (the choice is piecewise
/// constant; the gradient is that of the fixed-choice function).
fn objective(m: &Model, toks: &[u32], b: usize, t: usize, c: &[f32], replay: &[Vec<i32>]) -> f64 {
    let f = m.forward(toks, b, t, Some(replay)).unwrap();
    f.logits.iter().zip(c).map(|(&z, &w)| z as f64 * w as f64).sum::<f64>() + f.aux_loss() as f64
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let mut model = Model::new(tiny(), 1).unwrap();
    // A non-zero router bias, so routing differs from the unbiased choice.
    model.router_bias = vec![vec![0.05, -0.02, 0.0, 0.03]; 2];
    let (b, t) = (2, 6);
    let toks = tokens(b * t, 12, 2);
    let c = randn(b * t * 12, 3, 1.0);
    let fwd = model.forward(&toks, b, t, None).unwrap();
    let replay = fwd.routing_ids();
    let grads = model.backward(&fwd, &c).unwrap();
    // Central differences of an f32 model. Two errors: f32 rounding of L (|L| ~ 10, relative
    // ~1e-7 per operation over ~100 chained ones: ~1e-5 absolute, / 2h = 5e-4) and truncation,
    // h^2 f'''/6, about 1e-3 |g| at h = 1e-2 for weights of std 0.15 (it reached 50% at std 0.3,
    // where attention softmaxes are sharp; at h = 1e-3 rounding dominates instead). So
    // |fd - g| <= 2e-3 + 2e-2 |g| holds for a right gradient (measured worst excess 5.5e-4),
    // while a wrong term (a missing factor, a dropped branch) is off by O(|g|): a planted
    // RMSNorm-backward bug and a dropped shared-expert gradient both fail here.
    let h = 1e-2f32;
    let mut worst = (0.0f64, String::new());
    for i in 0..model.params.names.len() {
        for j in 0..model.params.data[i].len() {
            let orig = model.params.data[i][j];
            model.params.data[i][j] = orig + h;
            let lp = objective(&model, &toks, b, t, &c, &replay);
            model.params.data[i][j] = orig - h;
            let lm = objective(&model, &toks, b, t, &c, &replay);
            model.params.data[i][j] = orig;
            let fd = (lp - lm) / (2.0 * h as f64);
            let g = grads.data[i][j] as f64;
            let err = (fd - g).abs() - 2e-2 * g.abs();
            assert!(err <= 2e-3, "{}[{j}]: backward {g}, finite difference {fd}", model.params.names[i]);
            if err > worst.0 {
                worst = (err, format!("{}[{j}]", model.params.names[i]));
            }
        }
    }
    eprintln!(
        "finite differences: {} values checked, worst excess {:.2e} at {}",
        model.params.numel(),
        worst.0,
        worst.1
    );
}

fn moe_only_config() -> ModelConfig {
    let mut cfg = tiny();
    cfg.moe.balance_loss_alpha = 0.0;
    cfg
}

#[test]
fn router_logits_gradient_matches_finite_differences() {
    let cfg = ModelConfig { moe: MoeConfig { balance_loss_alpha: 0.05, ..tiny().moe }, ..tiny() };
    let (n, d, e) = (8, cfg.d_model, cfg.moe.experts);
    let i = cfg.moe.expert_dim;
    let x = randn(n * d, 10, 1.0);
    let (w1, w2) = (randn(e * 2 * i * d, 11, 0.3), randn(e * d * i, 12, 0.3));
    let (s1, s2) = (randn(2 * i * d, 13, 0.3), randn(d * i, 14, 0.3));
    let w = MoeWeights { router: &[], w1: &w1, w2: &w2, shared: Some((&s1, &s2)), bias: None };
    let logits = randn(n * e, 15, 1.0);
    let c = randn(n * d, 16, 1.0);
    let (_, cache) = moe::forward_from_logits(&Experts::Host, &cfg, &w, &x, logits.clone(), 4, None).unwrap();
    let ids = cache.routing.ids.clone();
    let f = |lg: &[f32]| -> f64 {
        let (y, c2) = moe::forward_from_logits(&Experts::Host, &cfg, &w, &x, lg.to_vec(), 4, Some(&ids)).unwrap();
        y.iter().zip(&c).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + c2.aux_loss as f64
    };
    let router = vec![0.0; e * d];
    let w_r = MoeWeights { router: &router, ..w };
    let (mut g1, mut g2, mut gr) = (vec![0.0; w1.len()], vec![0.0; w2.len()], vec![0.0; e * d]);
    let (mut gs1, mut gs2) = (vec![0.0; s1.len()], vec![0.0; s2.len()]);
    let grads = MoeGrads { router: &mut gr, w1: &mut g1, w2: &mut g2, shared: Some((&mut gs1, &mut gs2)) };
    let (_, dlogits) = moe::backward(&Experts::Host, &cfg, &w_r, &x, &cache, &c, grads).unwrap();
    let h = 1e-2;
    for j in 0..logits.len() {
        let (mut p, mut m) = (logits.clone(), logits.clone());
        p[j] += h;
        m[j] -= h;
        let fd = (f(&p) - f(&m)) / (2.0 * h as f64);
        let g = dlogits[j] as f64;
        assert!((fd - g).abs() <= 1e-3 + 1e-2 * g.abs(), "dlogits[{j}]: backward {g}, finite difference {fd}");
    }
}

/// Plain per-token loop in f64: out[t] = shared(x_t) + sum_j w_j * expert_{id_j}(x_t).
#[test]
fn moe_layer_equals_a_per_token_loop_over_experts() {
    let cfg = moe_only_config();
    let (n, d, e, i, k) = (10, cfg.d_model, cfg.moe.experts, cfg.moe.expert_dim, cfg.moe.top_k);
    let x = randn(n * d, 20, 1.0);
    let router = randn(e * d, 21, 0.5);
    let (w1, w2) = (randn(e * 2 * i * d, 22, 0.3), randn(e * d * i, 23, 0.3));
    let (s1, s2) = (randn(2 * i * d, 24, 0.3), randn(d * i, 25, 0.3));
    let bias = vec![0.1, 0.0, -0.1, 0.05];
    let w = MoeWeights { router: &router, w1: &w1, w2: &w2, shared: Some((&s1, &s2)), bias: Some(&bias) };
    let (y, cache) = moe::forward(&Experts::Host, &cfg, &w, &x, n, None).unwrap();
    let silu = |g: f64| g / (1.0 + (-g).exp());
    let swiglu_ffn = |xt: &[f32], a: &[f32], b: &[f32], f: usize| -> Vec<f64> {
        let h: Vec<f64> = (0..2 * f).map(|r| (0..d).map(|c| a[r * d + c] as f64 * xt[c] as f64).sum()).collect();
        let act: Vec<f64> = (0..f).map(|r| silu(h[r]) * h[f + r]).collect();
        (0..d).map(|r| (0..f).map(|c| b[r * f + c] as f64 * act[c]).sum()).collect()
    };
    let mut max_err = 0.0f64;
    for t in 0..n {
        let xt = &x[t * d..][..d];
        let mut want = swiglu_ffn(xt, &s1, &s2, i);
        // Routing from the gating reference (checked against the kernels elsewhere).
        let ids = &cache.routing.ids[t * k..][..k];
        let ws = &cache.routing.weights[t * k..][..k];
        for (&id, &wt) in ids.iter().zip(ws) {
            let id = id as usize;
            let out = swiglu_ffn(xt, &w1[id * 2 * i * d..][..2 * i * d], &w2[id * d * i..][..d * i], i);
            for (a, b) in want.iter_mut().zip(out) {
                *a += wt as f64 * b;
            }
        }
        for (a, &b) in want.iter().zip(&y[t * d..][..d]) {
            max_err = max_err.max((a - b as f64).abs() / (1.0 + a.abs()));
        }
    }
    // f32 products of length <= 2I: relative error ~1e-6.
    assert!(max_err < 1e-5, "MoE layer vs per-token loop: {max_err}");
    // The expert counts are the ids' histogram.
    let mut counts = vec![0; e];
    for &id in &cache.routing.ids {
        counts[id as usize] += 1;
    }
    assert_eq!(counts, cache.routing.counts);
}

#[test]
fn kv_cache_decoding_gives_the_full_forward_logits() {
    let model = Model::new(tiny(), 5).unwrap();
    let (b, t, p) = (3, 10, 4);
    let toks = tokens(b * t, 12, 6);
    let full = model.forward(&toks, b, t, None).unwrap();
    let mut kv = model.kv_cache(b, t).unwrap();
    let prompt: Vec<u32> = (0..b).flat_map(|s| toks[s * t..][..p].to_vec()).collect();
    let (pre, _) = model.forward_step(&prompt, &mut kv).unwrap();
    let v = 12;
    // The same arithmetic per position; only the GEMM kernels' blocking differs with the row
    // count (a decode step has B rows, the full forward B * T), which reorders f32 sums of at
    // most 2 * dense_ffn_dim = 48 terms: relative error ~48 * 2^-24 ~ 3e-6 per product,
    // compounding over 3 blocks and the head. Bound 1e-4 (1 + |z|); a wrong cache position or
    // RoPE offset changes logits by O(0.1).
    let mut worst = 0.0f32;
    let mut check = |got: &[f32], want: &[f32], what: &str| {
        for (a, b) in got.iter().zip(want) {
            let e = (a - b).abs() / (1.0 + b.abs());
            assert!(e <= 1e-4, "{what}: {a} vs {b}");
            worst = worst.max(e);
        }
    };
    for s in 0..b {
        check(&pre[s * p * v..][..p * v], &full.logits[s * t * v..][..p * v], "prefill");
    }
    for pos in p..t {
        let step: Vec<u32> = (0..b).map(|s| toks[s * t + pos]).collect();
        let (lg, _) = model.forward_step(&step, &mut kv).unwrap();
        for s in 0..b {
            check(&lg[s * v..][..v], &full.logits[(s * t + pos) * v..][..v], "decode");
        }
    }
    eprintln!("KV-cache decode vs full forward: worst relative difference {worst:.1e}");
    assert_eq!(kv.len(), t);
    assert!(model.forward_step(&[1, 2, 3], &mut kv).is_err(), "a full cache is an error");
}

#[test]
fn router_replay_of_the_chosen_ids_is_bit_identical() {
    let mut model = Model::new(tiny(), 7).unwrap();
    model.router_bias = vec![vec![0.02, -0.01, 0.04, 0.0]; 2];
    let (b, t) = (2, 8);
    let toks = tokens(b * t, 12, 8);
    let a = model.forward(&toks, b, t, None).unwrap();
    let ids = a.routing_ids();
    let r = model.forward(&toks, b, t, Some(&ids)).unwrap();
    assert_eq!(
        a.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        r.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let c = randn(a.logits.len(), 9, 1.0);
    assert_eq!(model.backward(&a, &c).unwrap(), model.backward(&r, &c).unwrap());
    // Other ids change the output, and bad ids are typed errors.
    let mut other = ids.clone();
    other[0][0] = (other[0][0] + 1) % 4;
    if other[0][0] == other[0][1] {
        other[0][0] = (other[0][0] + 1) % 4;
    }
    assert_ne!(model.forward(&toks, b, t, Some(&other)).unwrap().logits, a.logits);
    let mut bad = ids.clone();
    bad[1][3] = 4;
    assert!(model.forward(&toks, b, t, Some(&bad)).is_err());
    assert!(model.forward(&toks, b, t, Some(&ids[..1])).is_err());
}

/// One training step: forward, cross-entropy, backward, AdamW, router bias update.
fn train_step(model: &mut Model, opt: &mut AdamW, toks: &[u32], b: usize, t: usize) -> f32 {
    let fwd = model.forward(toks, b, t, None).unwrap();
    let targets = next_token_targets(toks, b, t);
    let (l, dlogits) = loss::cross_entropy(&fwd.logits, model.cfg.vocab_size, &targets);
    let grads = model.backward(&fwd, &dlogits).unwrap();
    opt.step(&mut model.params, &grads).unwrap();
    let counts: Vec<Vec<i32>> = fwd.routing().iter().map(|r| r.counts.clone()).collect();
    model.update_router_bias(&counts).unwrap();
    l
}

fn bits(m: &Model) -> Vec<u32> {
    m.params.data.iter().flatten().chain(m.router_bias.iter().flatten()).map(|x| x.to_bits()).collect()
}

#[test]
fn training_is_deterministic_across_runs_and_thread_counts() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            // The default model: large enough that the products split across threads.
            let mut model = Model::new(ModelConfig::default(), 11).unwrap();
            let mut opt = AdamW::new(AdamWConfig::default(), &model.params).unwrap();
            let toks = tokens(64 * 8, 16, 12);
            for _ in 0..2 {
                train_step(&mut model, &mut opt, &toks, 64, 8);
            }
            bits(&model)
        })
    };
    let one = run(1);
    assert_eq!(one, run(1), "same seed, same bits");
    assert_eq!(one, run(2), "1 thread vs 2 threads");
    assert_eq!(one, run(3), "1 thread vs 3 threads");
}

#[test]
fn training_reduces_the_loss() {
    let cfg = ModelConfig { max_seq_len: 8, ..tiny() };
    let mut model = Model::new(cfg, 13).unwrap();
    let ocfg = AdamWConfig { lr: 1e-2, warmup_steps: 2, total_steps: 60, ..AdamWConfig::default() };
    let mut opt = AdamW::new(ocfg, &model.params).unwrap();
    // Sequences that count up mod 10: next token = current + 1.
    let toks: Vec<u32> = (0..16 * 8).map(|i| ((i / 8) + (i % 8)) as u32 % 10).collect();
    let first = train_step(&mut model, &mut opt, &toks, 16, 8);
    let mut last = first;
    for _ in 0..60 {
        last = train_step(&mut model, &mut opt, &toks, 16, 8);
    }
    assert!(last < 0.3 * first, "loss {first} -> {last}");
}

#[test]
fn checkpoint_resume_continues_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("moekit-model-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let mut model = Model::new(tiny(), 14).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default(), &model.params).unwrap();
    let mut rng = Rng::new(15);
    let (b, t) = (4, 6);
    let batch = |rng: &mut Rng| -> Vec<u32> { (0..b * t).map(|_| rng.below(12) as u32).collect() };
    for _ in 0..2 {
        let toks = batch(&mut rng);
        train_step(&mut model, &mut opt, &toks, b, t);
    }
    let mut extra = BTreeMap::new();
    extra.insert("note".to_string(), "after two steps".to_string());
    checkpoint::save(&path, &model, Some(&opt), Some(&rng), &extra).unwrap();
    for _ in 0..3 {
        let toks = batch(&mut rng);
        train_step(&mut model, &mut opt, &toks, b, t);
    }
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.extra, extra);
    let (mut m2, mut o2, mut r2) = (ck.model, ck.optimizer.unwrap(), ck.rng.unwrap());
    assert_eq!(o2.step, 2);
    for _ in 0..3 {
        let toks = batch(&mut r2);
        train_step(&mut m2, &mut o2, &toks, b, t);
    }
    assert_eq!(bits(&model), bits(&m2), "resumed run differs");
    assert_eq!(opt, o2);

    // Damaged or foreign files are errors, never panics; a failed write keeps the old file.
    let good = std::fs::read(&path).unwrap();
    for (name, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header only", good[..64.min(good.len())].to_vec()),
        ("garbage", vec![0xAB; 1000]),
        ("empty", Vec::new()),
    ] {
        let p = dir.join(format!("{}.safetensors", name.replace(' ', "_")));
        std::fs::write(&p, bytes).unwrap();
        let e = checkpoint::load(&p).expect_err(name);
        assert!(e.to_string().contains("checkpoint"), "{name}: {e}");
    }
    assert!(checkpoint::load(&dir.join("missing.safetensors")).is_err());
    // A destination that cannot be replaced (a directory): error, nothing left behind.
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("inside")).unwrap();
    assert!(checkpoint::save(&blocked, &model, None, None, &BTreeMap::new()).is_err());
    assert!(blocked.join("inside").is_dir());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_configs_name_the_field_and_the_allowed_values() {
    let cases: Vec<(ModelConfig, &str)> = vec![
        (ModelConfig { n_heads: 3, ..ModelConfig::default() }, "n_heads"),
        (ModelConfig { moe: MoeConfig { top_k: 9, ..MoeConfig::default() }, ..ModelConfig::default() }, "moe.top_k"),
        (
            ModelConfig { moe: MoeConfig { n_groups: 3, ..MoeConfig::default() }, ..ModelConfig::default() },
            "moe.n_groups",
        ),
        (
            ModelConfig {
                moe: MoeConfig { topk_groups: 1, top_k: 5, ..MoeConfig::default() },
                ..ModelConfig::default()
            },
            "moe.top_k",
        ),
        (
            ModelConfig {
                d_model: 96,
                moe: MoeConfig { precision: moekit_model::Precision::Fp8, ..MoeConfig::default() },
                ..ModelConfig::default()
            },
            "d_model",
        ),
        (ModelConfig { first_dense_layers: 5, ..ModelConfig::default() }, "first_dense_layers"),
        (ModelConfig { moe: MoeConfig { align: 3, ..MoeConfig::default() }, ..ModelConfig::default() }, "moe.align"),
    ];
    for (cfg, field) in cases {
        let e = cfg.validate().expect_err(field).to_string();
        assert!(e.contains(field) && e.contains("must be"), "{field}: {e}");
    }
    let e = ModelConfig::from_toml("d_model = 64\n[moe]\nexperts = 8\ntopk = 2\n").unwrap_err().to_string();
    assert!(e.contains("topk"), "{e}");
    let cfg = ModelConfig::from_toml("n_layers = 2\n[moe]\nscore = \"softmax\"\n").unwrap();
    assert_eq!((cfg.n_layers, cfg.moe.score), (2, Score::Softmax));
    assert_eq!(ModelConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    for name in moekit_model::config::PRESETS {
        let p = ModelConfig::preset(name).unwrap();
        Model::new(p, 0).unwrap();
    }
    assert!(ModelConfig::preset("gpt-5").unwrap_err().to_string().contains("deepseek-v3-mini"));
    let n = ModelConfig::default().num_params();
    assert!((900_000..1_200_000).contains(&n), "default model has {n} parameters");
}

#[test]
fn sampling_is_seeded_and_stops_at_eos() {
    let model = Model::new(tiny(), 16).unwrap();
    let (b, p) = (5, 3);
    let prompts = tokens(b * p, 10, 17);
    let cfg = SampleConfig { max_new_tokens: 6, temperature: 1.0, top_k: 0, top_p: 0.9, eos: Some(11) };
    let g1 = model.generate(&prompts, b, &cfg, &mut Rng::new(1)).unwrap();
    let g2 = model.generate(&prompts, b, &cfg, &mut Rng::new(1)).unwrap();
    assert_eq!(g1, g2, "same seed, same tokens");
    assert_ne!(g1.tokens, model.generate(&prompts, b, &cfg, &mut Rng::new(2)).unwrap().tokens);
    let total = p + 6;
    for s in 0..b {
        let row = &g1.tokens[s * total..][..total];
        assert_eq!(&row[..p], &prompts[s * p..][..p]);
        let comp = &row[p..];
        match comp.iter().position(|&x| x == 11) {
            Some(e) => {
                assert_eq!(g1.lengths[s], e + 1);
                assert!(comp[e..].iter().all(|&x| x == 11), "EOS padding");
                assert!(!g1.truncated[s]);
            }
            None => assert!(g1.truncated[s] && g1.lengths[s] == 6),
        }
    }
    // Sampled log-probs agree with a forward over the sampled sequences, and the recorded
    // routing is the training forward's: replaying it changes nothing.
    let (lp, ent) = model.sequence_logprobs(&g1.tokens, b, total).unwrap();
    for s in 0..b {
        for j in 0..g1.lengths[s] {
            let a = g1.logprobs[s * 6 + j];
            let f = lp[s * (total - 1) + p - 1 + j];
            assert!((a - f).abs() < 1e-5, "logprob {a} vs {f}");
        }
    }
    assert!(ent.iter().all(|&h| h >= 0.0 && h <= (12f32).ln() + 1e-4));
    // Logits of decode and full forward agree to ~1e-6 (see the KV-cache test), so a routing
    // choice can differ only at a near-tie: allow 2% of the decisions.
    let fwd = model.forward(&g1.tokens, b, total, None).unwrap();
    let (same, all) = fwd
        .routing_ids()
        .iter()
        .zip(&g1.routing)
        .fold((0, 0), |(s, a), (x, y)| (s + x.iter().zip(y).filter(|(p, q)| p == q).count(), a + x.len()));
    assert!(same as f64 >= 0.98 * all as f64, "recorded routing differs in {} of {all} decisions", all - same);
    // Greedy = top-k 1; temperature 0 is deterministic without the RNG.
    let greedy = SampleConfig { temperature: 0.0, ..cfg.clone() };
    let top1 = SampleConfig { top_k: 1, ..cfg.clone() };
    let a = model.generate(&prompts, b, &greedy, &mut Rng::new(3)).unwrap();
    assert_eq!(a.tokens, model.generate(&prompts, b, &top1, &mut Rng::new(4)).unwrap().tokens);
    // Bad requests are errors.
    assert!(model
        .generate(&prompts, b, &SampleConfig { max_new_tokens: 20, ..cfg.clone() }, &mut Rng::new(1))
        .is_err());
    assert!(model.generate(&prompts, b, &SampleConfig { top_p: 0.0, ..cfg.clone() }, &mut Rng::new(1)).is_err());
    assert!(model.generate(&prompts[..4], b, &cfg, &mut Rng::new(1)).is_err());
    assert!(model.forward(&[99; 6], 1, 6, None).is_err(), "token outside the vocabulary");
}

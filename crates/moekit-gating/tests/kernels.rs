//! The gating kernels against the CPU reference: ids, weights, counts and routing gradients
//! bit for bit; the balance loss within an argued tolerance. One body per kernel device: the
//! host emulation (in CI) and the GPU (`gpu_*`, run by the GPU bundle).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer, Error};
use moekit_dtype::bf16;
use moekit_gating::kernels::GATING;
use moekit_gating::{
    balance_loss, balance_loss_backward, raw, reference, route, route_backward, route_replay, update_bias,
    RouterConfig, ScoreFunc,
};
use moekit_tensor::{CudaDevice, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The configurations the issue names, plus the kernel variants' edges (E = 1, 33, 512).
fn cases() -> Vec<(&'static str, RouterConfig, bool)> {
    use ScoreFunc::*;
    vec![
        ("v3 E=256 8/4 groups sigmoid+bias", RouterConfig::deepseek_v3(), true),
        ("v3 without bias (group max)", RouterConfig::deepseek_v3(), false),
        ("v2 E=160 top-6 8/3 softmax", RouterConfig::deepseek_v2(), false),
        ("qwen3 E=128 softmax renorm", RouterConfig::qwen3_moe(), false),
        ("mixtral E=8 top-2", RouterConfig::mixtral(), false),
        (
            "E=96 top-4 sigmoid+bias 4/2",
            RouterConfig::new(96, 4, Sigmoid).with_groups(4, 2).with_renormalize(true),
            true,
        ),
        ("E=72 top-3 softmax 6/2", RouterConfig::new(72, 3, Softmax).with_groups(6, 2).with_route_scale(2.0), false),
        ("E=512 top-16 sigmoid+bias 16/8", RouterConfig::new(512, 16, Sigmoid).with_groups(16, 8), true),
        ("E=33 top-5 softmax", RouterConfig::new(33, 5, Softmax).with_renormalize(true), false),
        ("E=1 top-1 sigmoid", RouterConfig::new(1, 1, Sigmoid), false),
        ("E=64 groups of 1, 64/16", RouterConfig::new(64, 6, Sigmoid).with_groups(64, 16), true),
        // Team layout with one group of C = 16 per lane, and a softmax with groups of C = 32.
        ("E=128 top-8 sigmoid+bias 8/3", RouterConfig::new(128, 8, Sigmoid).with_groups(8, 3), true),
        ("E=256 top-6 softmax 8/3", RouterConfig::new(256, 6, Softmax).with_groups(8, 3), false),
    ]
}

/// Logits: continuous random values, or (`ties`) multiples of 1/4 in [-2, 2] so that exact
/// ties between experts and between groups are everywhere.
fn logits(tokens: usize, experts: usize, ties: bool, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens * experts)
        .map(|_| if ties { rng.gen_range(-8i32..=8) as f32 * 0.25 } else { rng.gen_range(-4.0f32..4.0) })
        .collect()
}

fn bias(experts: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..experts).map(|_| rng.gen_range(-0.05f32..0.05)).collect()
}

/// Bit patterns, exactly: every NaN the kernels and the reference output is the canonical
/// 0x7fc00000 (IEEE leaves a NaN's sign and payload to the hardware: x86 makes 0xffc00000,
/// NVIDIA GPUs 0x7fffffff; both sides pass outputs through `canon`).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Routing (forward and backward) on `dev` equals the reference bit for bit, twice.
fn routing_matches_reference(dev: &Device, tokens: usize) {
    for (ci, (name, cfg, biased)) in cases().into_iter().enumerate() {
        for (variant, ties, as_bf16) in [("f32", false, false), ("ties", true, false), ("bf16", false, true)] {
            let seed = 100 * ci as u64 + ties as u64 + 2 * as_bf16 as u64;
            let mut u = logits(tokens, cfg.experts, ties, seed);
            if as_bf16 {
                u.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
            }
            let b = biased.then(|| bias(cfg.experts, seed + 7));
            let want = reference::route(&u, b.as_deref(), &cfg).unwrap();

            let lt = if as_bf16 {
                let h: Vec<bf16> = u.iter().map(|&x| bf16::from_f32(x)).collect();
                Tensor::from_slice(&h, &[tokens, cfg.experts], dev).unwrap()
            } else {
                Tensor::from_slice(&u, &[tokens, cfg.experts], dev).unwrap()
            };
            let bt = b.as_ref().map(|b| Tensor::from_slice(b, &[cfg.experts], dev).unwrap());
            let run = || route(&lt, bt.as_ref(), &cfg).unwrap();
            let got = run();
            let ids = got.topk_ids.to_vec::<i32>().unwrap();
            let w = got.topk_weights.to_vec::<f32>().unwrap();
            let ctx = format!("{} {name} {variant} T={tokens}", dev.name());
            let (wb, want_wb) = (bits(&w), bits(&want.weights));
            if let Some(i) = (0..ids.len()).find(|&i| ids[i] != want.ids[i] || wb[i] != want_wb[i]) {
                let t = i / cfg.top_k;
                panic!(
                    "{ctx}: token {t} slot {}: kernel ({}, {:e}), reference ({}, {:e})\nkernel ids {:?}\nref ids    {:?}",
                    i % cfg.top_k,
                    ids[i],
                    w[i],
                    want.ids[i],
                    want.weights[i],
                    &ids[t * cfg.top_k..(t + 1) * cfg.top_k],
                    &want.ids[t * cfg.top_k..(t + 1) * cfg.top_k]
                );
            }
            assert_eq!(got.counts.to_vec::<i32>().unwrap(), want.counts, "{ctx}: counts");
            let again = run();
            assert_eq!(again.topk_ids.to_vec::<i32>().unwrap(), ids, "{ctx}: ids not deterministic");
            assert_eq!(
                bits(&again.topk_weights.to_vec::<f32>().unwrap()),
                bits(&w),
                "{ctx}: weights not deterministic"
            );

            // Replay of the chosen ids gives the forward's weights and counts bit for bit;
            // replay of random ids (repeats included) the reference's.
            let replayed = route_replay(&lt, &got.topk_ids, &cfg).unwrap();
            assert_eq!(bits(&replayed.topk_weights.to_vec::<f32>().unwrap()), wb, "{ctx}: replay of the chosen ids");
            assert_eq!(replayed.counts.to_vec::<i32>().unwrap(), want.counts, "{ctx}: replay counts");
            let mut rng = StdRng::seed_from_u64(seed + 13);
            let rid: Vec<i32> = (0..tokens * cfg.top_k).map(|_| rng.gen_range(0..cfg.experts as i32)).collect();
            let want_r = reference::route_replay(&u, &rid, &cfg).unwrap();
            let ridt = Tensor::from_slice(&rid, &[tokens, cfg.top_k], dev).unwrap();
            let got_r = route_replay(&lt, &ridt, &cfg).unwrap();
            assert_eq!(bits(&got_r.topk_weights.to_vec::<f32>().unwrap()), bits(&want_r.weights), "{ctx}: replay");
            assert_eq!(got_r.counts.to_vec::<i32>().unwrap(), want_r.counts, "{ctx}: replay counts");

            // Backward from a random upstream gradient.
            let mut rng = StdRng::seed_from_u64(seed + 11);
            let gw: Vec<f32> = (0..tokens * cfg.top_k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let want_g = reference::route_backward(&u, &want.ids, &gw, &cfg).unwrap();
            let gwt = Tensor::from_slice(&gw, &[tokens, cfg.top_k], dev).unwrap();
            let got_g = route_backward(&lt, &got.topk_ids, &gwt, &cfg).unwrap().to_vec::<f32>().unwrap();
            let (gb, want_gb) = (bits(&got_g), bits(&want_g));
            if let Some(i) = (0..got_g.len()).find(|&i| gb[i] != want_gb[i]) {
                panic!(
                    "{ctx}: grad_logits[{}][{}] = {:e}, reference {:e}",
                    i / cfg.experts,
                    i % cfg.experts,
                    got_g[i],
                    want_g[i]
                );
            }
        }
    }
}

/// NaN, infinities and saturated scores follow the contract on the kernels too.
fn special_values_match_reference(dev: &Device) {
    let cfg = RouterConfig::deepseek_v3();
    let mut u = logits(6, 256, false, 5);
    u[3] = f32::NAN; // token 0: one NaN logit (sigmoid: that expert's score is NaN, ranked last)
    for e in 0..256 {
        u[256 + e] = f32::NAN; // token 1: all NaN
        u[2 * 256 + e] = if e % 3 == 0 { 200.0 } else { -200.0 }; // token 2: saturated ties
    }
    u[3 * 256 + 10] = f32::INFINITY; // token 3
    u[4 * 256 + 20] = f32::NEG_INFINITY; // token 4
    let b = bias(256, 9);
    for c in [cfg, RouterConfig::qwen3_moe().with_groups(1, 1)] {
        let e_n = c.experts;
        let uu: Vec<f32> = u.iter().take(6 * e_n).cloned().collect();
        let bb = (c.score == ScoreFunc::Sigmoid).then(|| b[..e_n].to_vec());
        let want = reference::route(&uu, bb.as_deref(), &c).unwrap();
        let lt = Tensor::from_slice(&uu, &[6, e_n], dev).unwrap();
        let bt = bb.as_ref().map(|b| Tensor::from_slice(b, &[e_n], dev).unwrap());
        let got = route(&lt, bt.as_ref(), &c).unwrap();
        assert_eq!(got.topk_ids.to_vec::<i32>().unwrap(), want.ids, "{:?}", c.score);
        assert_eq!(bits(&got.topk_weights.to_vec::<f32>().unwrap()), bits(&want.weights), "{:?}", c.score);
        assert_eq!(got.counts.to_vec::<i32>().unwrap(), want.counts);
    }
}

/// Bias update bit for bit; balance loss and its gradient within tolerance of the f64
/// reference. The kernels sum in f32: each P_e is a sum of seq_len / 8 + 8 terms in [0, 1]
/// and the loss a sum of E non-negative products, so to first order the relative error is
/// below `bound = (seq_len / 8 + 8 + E + 4) 2^-24`. A gradient entry is a difference
/// (c_e - <c, s'>) of such sums times s (1 - s) / Z, so it is held to 4 bound max |grad|.
fn balancing_matches_reference(dev: &Device, seq_len: usize, n_seq: usize) {
    for (name, cfg) in [
        ("v3", RouterConfig::deepseek_v3()),
        ("qwen3", RouterConfig::qwen3_moe()),
        ("E=72", RouterConfig::new(72, 3, ScoreFunc::Softmax).with_groups(6, 2)),
    ] {
        let tokens = seq_len * n_seq;
        let u = logits(tokens, cfg.experts, false, 77);
        let r = reference::route(&u, None, &cfg).unwrap();
        let lt = Tensor::from_slice(&u, &[tokens, cfg.experts], dev).unwrap();
        let ids = Tensor::from_slice(&r.ids, &[tokens, cfg.top_k], dev).unwrap();
        let alpha = 1e-4f32;
        let bound = (seq_len / 8 + 8 + cfg.experts + 4) as f64 * f64::powi(2.0, -24);

        let want = reference::balance_loss(&u, &r.ids, &cfg, seq_len, alpha).unwrap();
        let got = balance_loss(&lt, &ids, &cfg, seq_len, alpha).unwrap().to_vec::<f32>().unwrap();
        for (q, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let rel = ((g - w) as f64).abs() / (w as f64).abs();
            assert!(
                rel <= bound,
                "{} {name}: loss[{q}] = {g:e}, reference {w:e} (rel {rel:e} > {bound:e})",
                dev.name()
            );
        }
        assert_eq!(bits(&balance_loss(&lt, &ids, &cfg, seq_len, alpha).unwrap().to_vec::<f32>().unwrap()), bits(&got));

        let gl: Vec<f32> = (0..n_seq).map(|q| 1.0 + q as f32 * 0.5).collect();
        let glt = Tensor::from_slice(&gl, &[n_seq], dev).unwrap();
        let want_g = reference::balance_loss_backward(&u, &r.ids, &gl, &cfg, seq_len, alpha).unwrap();
        let got_g = balance_loss_backward(&lt, &ids, &glt, &cfg, seq_len, alpha).unwrap().to_vec::<f32>().unwrap();
        let scale = want_g.iter().fold(0.0f32, |m, &x| m.max(x.abs())) as f64;
        for (i, (&g, &w)) in got_g.iter().zip(&want_g).enumerate() {
            let err = ((g - w) as f64).abs();
            assert!(err <= 4.0 * bound * scale, "{} {name}: grad[{i}] = {g:e}, reference {w:e}", dev.name());
        }

        // Bias update from the counts, bit for bit.
        let mut b = bias(cfg.experts, 3);
        let mut bt = Tensor::from_slice(&b, &[cfg.experts], dev).unwrap();
        let ct = Tensor::from_slice(&r.counts, &[cfg.experts], dev).unwrap();
        update_bias(&mut bt, &ct, 1e-3).unwrap();
        reference::update_bias(&mut b, &r.counts, 1e-3).unwrap();
        assert_eq!(bits(&bt.to_vec::<f32>().unwrap()), bits(&b), "{} {name}: bias update", dev.name());
    }
}

#[test]
fn emu_routing_matches_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Shuffled(3)] {
        let Some(emu) = emulator_or_skip("emu_routing_matches_reference_bitwise", &[&GATING], order) else { return };
        routing_matches_reference(&Device::Emulated(emu), 37);
    }
}

/// Which forward kernel each configuration gets: the team layout unless the groups do not
/// match one group per lane.
#[test]
fn forward_kernel_follows_the_team_layout() {
    let name = |cfg: RouterConfig| raw::forward_kernel(&cfg).name;
    assert_eq!(name(RouterConfig::deepseek_v3()), "moekit_route_fwd_team_e256");
    assert_eq!(name(RouterConfig::qwen3_moe()), "moekit_route_fwd_team_e128");
    assert_eq!(name(RouterConfig::mixtral()), "moekit_route_fwd_team_e8");
    assert_eq!(name(RouterConfig::new(512, 16, ScoreFunc::Sigmoid).with_groups(16, 8)), "moekit_route_fwd_team_e512");
    assert_eq!(name(RouterConfig::deepseek_v2()), "moekit_route_fwd_e8", "groups of 20 do not fit C = 32");
    assert_eq!(moekit_gating::team_layout(33), (8, 8));
    assert_eq!(moekit_gating::team_layout(300), (32, 16));
}

/// A grid-stride pass of the team kernel (300 tokens > 8 emulated blocks x 32 tokens), logits
/// at an odd address (a view one element into a buffer: the kernel takes its element path),
/// and an all-NaN row whose weights are the canonical NaN on both sides.
#[test]
fn emu_team_kernel_strides_and_takes_unaligned_logits() {
    let Some(emu) =
        emulator_or_skip("emu_team_kernel_strides_and_takes_unaligned_logits", &[&GATING], BlockOrder::Reversed)
    else {
        return;
    };
    let dev = Device::Emulated(emu);
    let cfg = RouterConfig::deepseek_v3();
    let tokens = 300;
    let mut u = logits(tokens, 256, false, 77);
    u[5 * 256..6 * 256].iter_mut().for_each(|x| *x = f32::from_bits(0xffc0_0001));
    let b = bias(256, 78);
    let want = reference::route(&u, Some(&b), &cfg).unwrap();
    assert_eq!(want.weights[5 * 8].to_bits(), 0x7fc0_0000, "the reference's NaN is canonical");
    let mut padded = vec![0.5f32];
    padded.extend(&u);
    let whole = Tensor::from_slice(&padded, &[padded.len()], &dev).unwrap();
    let lt = whole.narrow(0, 1, u.len()).unwrap().reshape(&[tokens, 256]).unwrap();
    let bt = Tensor::from_slice(&b, &[256], &dev).unwrap();
    let got = route(&lt, Some(&bt), &cfg).unwrap();
    assert_eq!(got.topk_ids.to_vec::<i32>().unwrap(), want.ids);
    assert_eq!(bits(&got.topk_weights.to_vec::<f32>().unwrap()), bits(&want.weights));
    assert_eq!(got.counts.to_vec::<i32>().unwrap(), want.counts);
}

/// Replayed ids outside `[0, E)` are the same error on the CPU and the emulator; the raw
/// launch gives them weight 0 and does not count them.
#[test]
fn emu_replay_rejects_ids_out_of_range_on_every_device() {
    let Some(emu) =
        emulator_or_skip("emu_replay_rejects_ids_out_of_range_on_every_device", &[&GATING], BlockOrder::InOrder)
    else {
        return;
    };
    let cfg = RouterConfig::mixtral();
    let u = logits(3, 8, false, 4);
    let ids = [0, 1, 2, 8, 3, 4];
    let mut outcomes = Vec::new();
    for dev in [Device::Cpu, Device::Emulated(emu.clone())] {
        let lt = Tensor::from_slice(&u, &[3, 8], &dev).unwrap();
        let it = Tensor::from_slice(&ids, &[3, 2], &dev).unwrap();
        outcomes.push(route_replay(&lt, &it, &cfg).unwrap_err().to_string());
        let short = Tensor::from_slice(&ids[..4], &[2, 2], &dev).unwrap();
        assert!(matches!(route_replay(&lt, &short, &cfg), Err(Error::Shape(_))), "{}", dev.name());
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert!(outcomes[0].contains("replayed expert id 8"), "{}", outcomes[0]);

    let lb = EmuBuffer::from_host(&emu, &u).unwrap();
    let ib = EmuBuffer::from_host(&emu, &ids).unwrap();
    let mut wb = EmuBuffer::<f32>::zeros(&emu, 6).unwrap();
    let mut cb = EmuBuffer::<i32>::zeros(&emu, 8).unwrap();
    raw::route_replay(&emu, &cfg, raw::Logits::F32(lb.view()), ib.view(), wb.view_mut(), Some(cb.view_mut())).unwrap();
    assert_eq!(wb.as_slice()[3], 0.0, "an id out of range has weight 0");
    assert!(wb.as_slice()[2] > 0.0, "its token's valid id keeps its score");
    assert_eq!(cb.as_slice().iter().sum::<i32>(), 5, "and is not counted");
}

#[test]
fn emu_special_values_match_reference() {
    let Some(emu) = emulator_or_skip("emu_special_values_match_reference", &[&GATING], BlockOrder::InOrder) else {
        return;
    };
    special_values_match_reference(&Device::Emulated(emu));
}

#[test]
fn emu_balancing_matches_reference() {
    let Some(emu) = emulator_or_skip("emu_balancing_matches_reference", &[&GATING], BlockOrder::Reversed) else {
        return;
    };
    balancing_matches_reference(&Device::Emulated(emu), 40, 3);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_routing_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_routing_matches_reference_bitwise", &[&GATING]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    routing_matches_reference(&dev, 4099);
    special_values_match_reference(&dev);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_balancing_matches_reference() {
    let Some(_) = gpu_or_skip("gpu_balancing_matches_reference", &[&GATING]) else { return };
    balancing_matches_reference(&Device::Cuda(CudaDevice::new(0).unwrap()), 1000, 4);
}

/// The raw layer refuses bad input before any launch and writes nothing.
#[test]
fn emu_raw_rejects_bad_input_before_launch() {
    let Some(emu) = emulator_or_skip("emu_raw_rejects_bad_input_before_launch", &[&GATING], BlockOrder::InOrder) else {
        return;
    };
    let cfg = RouterConfig::deepseek_v3();
    let u = EmuBuffer::from_host(&emu, &logits(4, 256, false, 1)).unwrap();
    let short_bias = EmuBuffer::from_host(&emu, &bias(255, 1)).unwrap();
    let mut ids = EmuBuffer::<i32>::zeros(&emu, 32).unwrap();
    let mut w = EmuBuffer::<f32>::zeros(&emu, 32).unwrap();
    let mut short_ids = EmuBuffer::<i32>::zeros(&emu, 31).unwrap();
    let l = raw::Logits::F32(u.view());
    let r = raw::route(&emu, &cfg, l, Some(short_bias.view()), ids.view_mut(), w.view_mut(), None);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let r = raw::route(&emu, &cfg, l, None, short_ids.view_mut(), w.view_mut(), None);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let bad = cfg.with_groups(7, 4);
    let r = raw::route(&emu, &bad, l, None, ids.view_mut(), w.view_mut(), None);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert!(ids.as_slice().iter().all(|&x| x == 0) && w.as_slice().iter().all(|&x| x == 0.0), "nothing was written");
    // Ids outside [0, E) given to the backward are ignored, never used as indices. (Without
    // renormalisation: with it, the gradient to a duplicated expert cancels exactly.)
    let plain = cfg.with_renormalize(false);
    let bad_ids: Vec<i32> = (0..32).map(|i| [-1, 256, 1 << 30, 3][i % 4]).collect();
    let bad_ids = EmuBuffer::from_host(&emu, &bad_ids).unwrap();
    let gw = EmuBuffer::from_host(&emu, &[1.0f32; 32]).unwrap();
    let mut g = EmuBuffer::<f32>::zeros(&emu, 4 * 256).unwrap();
    raw::route_backward(&emu, &plain, l, bad_ids.view(), gw.view(), g.view_mut()).unwrap();
    let nonzero: Vec<usize> = (0..4 * 256).filter(|&i| g.as_slice()[i] != 0.0).map(|i| i % 256).collect();
    assert_eq!(nonzero, vec![3, 3, 3, 3], "only the valid id 3 gets a gradient");
    // Counts accumulate over calls.
    let mut counts = EmuBuffer::<i32>::zeros(&emu, 256).unwrap();
    for _ in 0..2 {
        raw::route(&emu, &cfg, l, None, ids.view_mut(), w.view_mut(), Some(counts.view_mut())).unwrap();
    }
    assert_eq!(counts.as_slice().iter().sum::<i32>(), 2 * 32);
}

/// What a routing call gave: ids, weight bits, counts, gradient bits; or the error's variant.
type Outcome = Result<(Vec<i32>, Vec<u32>, Vec<i32>, Vec<u32>), std::mem::Discriminant<Error>>;

/// One routing call on `dev`: forward, then the backward from its ids (when it succeeded).
fn route_outcome(
    dev: &Device,
    cfg: &RouterConfig,
    u: &[f32],
    dims: &[usize],
    dtype: u8,
    shift: usize,
    bias_len: Option<usize>,
) -> Outcome {
    let d = |e: Error| std::mem::discriminant(&e);
    let view = |t: Tensor, n: usize| t.narrow(0, shift, n).and_then(|t| t.reshape(dims));
    let mut padded = vec![0.25f32; shift];
    padded.extend_from_slice(u);
    let lt = match dtype {
        0 => view(Tensor::from_slice(&padded, &[padded.len()], dev).map_err(d)?, u.len()),
        1 => {
            let h: Vec<bf16> = padded.iter().map(|&x| bf16::from_f32(x)).collect();
            view(Tensor::from_slice(&h, &[h.len()], dev).map_err(d)?, u.len())
        }
        _ => {
            let h: Vec<i32> = padded.iter().map(|&x| x as i32).collect();
            view(Tensor::from_slice(&h, &[h.len()], dev).map_err(d)?, u.len())
        }
    }
    .map_err(d)?;
    let bt = bias_len.map(|n| Tensor::from_slice(&bias(n, 3), &[n], dev).unwrap());
    let r = route(&lt, bt.as_ref(), cfg).map_err(d)?;
    let ids = r.topk_ids.to_vec::<i32>().unwrap();
    let gw: Vec<f32> = (0..ids.len()).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
    let gwt = Tensor::from_slice(&gw, r.topk_ids.dims(), dev).unwrap();
    let g = route_backward(&lt, &r.topk_ids, &gwt, cfg).map_err(d)?.to_vec::<f32>().unwrap();
    Ok((ids, bits(&r.topk_weights.to_vec::<f32>().unwrap()), r.counts.to_vec::<i32>().unwrap(), bits(&g)))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Random configurations and inputs, good and bad (experts past 512, top_k 0 or past the
    /// kept groups, groups that do not divide E, logits of the wrong width, rank or dtype,
    /// views at odd addresses, a bias of the wrong length): the CPU and the emulator give the
    /// same `Result` variant, and the same bits when both succeed.
    #[test]
    fn emu_routing_same_outcome_on_cpu_and_emulator(
        experts in proptest::sample::select(vec![1usize, 6, 8, 33, 64, 96, 128, 160, 256, 300, 512, 513]),
        top_k in 0usize..18,
        n_groups in proptest::sample::select(vec![1usize, 2, 4, 5, 8, 16]),
        topk_groups in 0usize..9,
        softmax in proptest::bool::ANY,
        tokens in 0usize..6,
        wrong_width in proptest::bool::weighted(0.15),
        flat in proptest::bool::weighted(0.1),
        dtype in proptest::sample::select(vec![0u8, 0, 1, 2]),
        shift in 0usize..3,
        bias_len in proptest::option::of(proptest::sample::select(vec![0usize, 1, 2])),
        seed in 0u64..1000,
    ) {
        let Some(emu) = emulator_or_skip("emu_routing_same_outcome_on_cpu_and_emulator", &[&GATING], BlockOrder::InOrder)
        else { return Ok(()) };
        let score = if softmax { ScoreFunc::Softmax } else { ScoreFunc::Sigmoid };
        let cfg = RouterConfig::new(experts, top_k, score).with_groups(n_groups, topk_groups);
        let width = if wrong_width { experts + 1 } else { experts };
        let u = logits(tokens, width, seed % 2 == 0, seed);
        let dims = if flat { vec![u.len()] } else { vec![tokens, width] };
        // bias_len: the right length, one short, or none at all.
        let bias_len = bias_len.map(|k| [experts, experts.saturating_sub(1), experts + 1][k]);
        let cpu = route_outcome(&Device::Cpu, &cfg, &u, &dims, dtype, shift, bias_len);
        let emulated = route_outcome(&Device::Emulated(emu), &cfg, &u, &dims, dtype, shift, bias_len);
        proptest::prop_assert_eq!(cpu, emulated, "{:?} dims {:?} dtype {} shift {}", cfg, dims, dtype, shift);
    }
}

//! Every op against a plain candle composition of the same math (forward and gradient), and
//! against moekit's own CPU path bit for bit.
//!
//! Inputs are random (never zeros) and BF16-representable where the op takes BF16, so that
//! the composition (f32) sees exactly the values moekit sees. Tolerances are worst-case
//! bounds, per element:
//! - a sum of `n` f32 products in another order differs by at most `n eps sum |terms|`
//!   (`eps = 2^-24` unit roundoff doubled: we use `f32::EPSILON`, `2^-23`), `sum |terms|`
//!   computed by the same composition on absolute values;
//! - moekit rounds a BF16 output once (RNE, relative `2^-9`; its GEMM rounds f64 -> f32 ->
//!   BF16, at most `2^-9 + 2^-24`): we allow `2^-8 |want|` for each BF16 output;
//! - routing: moekit's exp/sigmoid are within 2 ulp of the correctly rounded value and its
//!   softmax sum is a fixed order over `E` terms: `1e-5` absolute on weights `<= 1` (about
//!   `E eps` for `E <= 64`, plus a few ulp), the same relative on the gradients.

use candle_core::{DType, Device, Tensor, Var};
use moekit_candle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R = candle_core::Result<()>;
const CPU: Device = Device::Cpu;

/// Uniform values in `±[lo, hi]` (never zero), rounded to BF16 and back.
fn rand_vals(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.gen_range(lo..hi) * if rng.gen::<bool>() { 1.0 } else { -1.0 };
            moekit_dtype::bf16::from_f32(v).to_f32()
        })
        .collect()
}

fn rand_t(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32) -> candle_core::Result<Tensor> {
    Tensor::from_vec(rand_vals(rng, dims.iter().product(), lo, hi), dims, &CPU)
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Elementwise `|got - want| <= rel |want| + abs_tol[i]`.
fn close(what: &str, got: &Tensor, want: &Tensor, rel: f32, abs_tol: &[f32]) -> R {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let (g, w) = (flat(got)?, flat(want)?);
    assert!(g.iter().any(|v| *v != 0.0), "{what}: all zeros");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = rel * b.abs() + abs_tol[i.min(abs_tol.len() - 1)];
        assert!((a - b).abs() <= tol, "{what}[{i}]: got {a}, want {b}, tolerance {tol}");
    }
    Ok(())
}

/// `n eps * bound` elementwise, `bound` the composition on absolute values.
fn order_tol(n: usize, bound: &Tensor) -> candle_core::Result<Vec<f32>> {
    Ok(flat(bound)?.iter().map(|b| n as f32 * f32::EPSILON * b + f32::MIN_POSITIVE).collect())
}

fn bits(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(flat(t)?.iter().map(|v| v.to_bits()).collect())
}

/// Random distinct ids per token (`-1`, i.e. `u32::MAX`, in a few slots when `holes`).
fn rand_ids(rng: &mut StdRng, tokens: usize, k: usize, e: usize, holes: bool) -> Vec<u32> {
    let mut ids = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<u32> = Vec::new();
        while row.len() < k {
            let v = rng.gen_range(0..e as u32);
            if !row.contains(&v) {
                row.push(v);
            }
        }
        if holes && rng.gen_range(0..4) == 0 {
            row[k - 1] = u32::MAX;
        }
        ids.extend(row);
    }
    ids
}

// ---------------------------------------------------------------- routing

/// `softmax(l)` or `sigmoid(l)` in candle, f32.
fn scores(l: &Tensor, score: ScoreFunc) -> candle_core::Result<Tensor> {
    match score {
        ScoreFunc::Softmax => {
            let m = l.max_keepdim(1)?.detach();
            let e = l.broadcast_sub(&m)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(1)?)
        }
        ScoreFunc::Sigmoid => (l.neg()?.exp()? + 1.0)?.recip(),
    }
}

/// The routing weights of `ids` in candle: gather, renormalise, scale.
fn weights_composed(l: &Tensor, ids: &Tensor, cfg: &RouterConfig) -> candle_core::Result<Tensor> {
    let mut w = scores(l, cfg.score)?.gather(ids, 1)?;
    if cfg.renormalize {
        w = w.broadcast_div(&w.sum_keepdim(1)?)?;
    }
    w * cfg.route_scale as f64
}

fn check_routing(cfg: RouterConfig, with_bias: bool, seed: u64) -> R {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = 24;
    let logits = Var::from_tensor(&rand_t(&mut rng, &[t, cfg.experts], 0.05, 3.0)?)?;
    let bias = Var::from_tensor(&rand_t(&mut rng, &[cfg.experts], 0.01, 0.5)?)?;
    let bias_t = with_bias.then(|| bias.as_tensor());
    let r = route(logits.as_tensor(), bias_t, &cfg)?;

    // moekit's reference, bit for bit.
    let lv = flat(logits.as_tensor())?;
    let bv = flat(bias.as_tensor())?;
    let want = moekit_gating::reference::route(&lv, with_bias.then_some(&bv[..]), &cfg).unwrap();
    let ids: Vec<i32> = r.topk_ids.flatten_all()?.to_vec1::<u32>()?.iter().map(|&e| e as i32).collect();
    assert_eq!(ids, want.ids);
    assert_eq!(bits(&r.topk_weights)?, want.weights.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert_eq!(r.counts.to_vec1::<i32>()?, want.counts);

    // The composition, forward and gradient of sum(w * c).
    let c = rand_t(&mut rng, &[t, cfg.top_k], 0.1, 1.0)?;
    let wc = weights_composed(logits.as_tensor(), &r.topk_ids, &cfg)?;
    let scale = cfg.route_scale.abs().max(1.0);
    close("routing weights", &r.topk_weights, &wc, 1e-5, &[1e-5 * scale])?;
    let g = (&r.topk_weights * &c)?.sum_all()?.backward()?;
    let gc = (&wc * &c)?.sum_all()?.backward()?;
    let (gl, glc) = (g.get(logits.as_tensor()).unwrap(), gc.get(logits.as_tensor()).unwrap());
    close("routing grad", gl, glc, 1e-4, &[1e-5 * scale])?;
    assert!(g.get(bias.as_tensor()).is_none(), "the bias got a gradient");
    // And moekit's backward bit for bit.
    let cv = flat(&c)?;
    let gm = moekit_gating::reference::route_backward(&lv, &want.ids, &cv, &cfg).unwrap();
    assert_eq!(bits(gl)?, gm.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn route_softmax_matches_candle_softmax_topk() -> R {
    check_routing(RouterConfig::new(16, 4, ScoreFunc::Softmax), false, 1)?;
    check_routing(RouterConfig::new(16, 4, ScoreFunc::Softmax).with_renormalize(true), false, 2)
}

#[test]
fn route_sigmoid_bias_groups_matches_candle() -> R {
    let cfg =
        RouterConfig::new(32, 4, ScoreFunc::Sigmoid).with_groups(4, 2).with_renormalize(true).with_route_scale(2.5);
    check_routing(cfg, true, 3)?;
    check_routing(cfg, false, 4)
}

#[test]
fn route_bf16_logits() -> R {
    let cfg = RouterConfig::mixtral();
    let mut rng = StdRng::seed_from_u64(5);
    let l = rand_t(&mut rng, &[8, 8], 0.1, 2.0)?;
    let r16 = route(&l.to_dtype(DType::BF16)?, None, &cfg)?;
    let r32 = route(&l, None, &cfg)?;
    // BF16-representable values widen exactly: the same routing.
    assert_eq!(bits(&r16.topk_weights)?, bits(&r32.topk_weights)?);
    Ok(())
}

#[test]
fn route_replay_matches_candle_gather() -> R {
    let cfg = RouterConfig::qwen3_moe();
    let mut rng = StdRng::seed_from_u64(6);
    let logits = Var::from_tensor(&rand_t(&mut rng, &[10, cfg.experts], 0.05, 3.0)?)?;
    let ids = Tensor::from_vec(rand_ids(&mut rng, 10, cfg.top_k, cfg.experts, false), (10, cfg.top_k), &CPU)?;
    let w = route_replay(logits.as_tensor(), &ids, &cfg)?;
    let wc = weights_composed(logits.as_tensor(), &ids, &cfg)?;
    close("replayed weights", &w, &wc, 1e-5, &[1e-5])?;
    let c = rand_t(&mut rng, &[10, cfg.top_k], 0.1, 1.0)?;
    let g = (&w * &c)?.sum_all()?.backward()?;
    let gc = (&wc * &c)?.sum_all()?.backward()?;
    close("replay grad", g.get(logits.as_tensor()).unwrap(), gc.get(logits.as_tensor()).unwrap(), 1e-4, &[1e-5])?;
    // Replaying route's own ids gives its weights bit for bit.
    let r = route(logits.as_tensor(), None, &cfg)?;
    assert_eq!(bits(&route_replay(logits.as_tensor(), &r.topk_ids, &cfg)?)?, bits(&r.topk_weights)?);
    Ok(())
}

//! Every op against a plain candle composition of the same math (forward and gradient), and
//! against moekit's own CPU path bit for bit.
//!
//! Inputs are random (never zeros) and BF16-representable where the op takes BF16, so that
//! the composition (f32) sees exactly the values moekit sees. Tolerances are worst-case
//! bounds, per element:
//! - a sum of `n` f32 products in another order differs by at most `n eps sum |terms|`
//!   (`eps = 2^-24` unit roundoff doubled: we use `f32::EPSILON`, `2^-23`), `sum |terms|`
//!   computed by the same composition on absolute values;
//! - BF16 has 8 significant bits: one rounding (RNE) is at most `2^-8` relative. A BF16
//!   result of moekit against an f32 composition: [`ONE_ROUNDING`] (`2^-8`, plus 2% for the
//!   f64 -> f32 -> BF16 double rounding of moekit's GEMM and for measuring against the rounded
//!   value); a BF16 gradient against a composition's BF16 gradient (candle rounds the gradient
//!   of a BF16 leaf too): [`TWO_ROUNDINGS`];
//! - routing: moekit's exp/sigmoid are within 2 ulp of the correctly rounded value and its
//!   softmax sum is a fixed order over `E` terms: `1e-5` absolute on weights `<= 1` (about
//!   `E eps` for `E <= 64`, plus a few ulp), the same relative on the gradients.

use candle_core::{DType, Device, Tensor, Var};
use moekit_candle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R = candle_core::Result<()>;
/// One BF16 rounding (see the module docs).
const ONE_ROUNDING: f32 = 1.02 / 256.0;
/// Two independent BF16 roundings.
const TWO_ROUNDINGS: f32 = 2.04 / 256.0;
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

// ---------------------------------------------------------------- dispatch and combine

const T: usize = 20;
const K: usize = 3;
const E: usize = 6;

fn layout_of(rng: &mut StdRng, holes: bool) -> candle_core::Result<(DispatchLayout, Vec<i32>)> {
    let ids = Tensor::from_vec(rand_ids(rng, T, K, E, holes), (T, K), &CPU)?;
    let layout = dispatch_layout(&ids, &DispatchConfig::new(E, K).with_align(16))?;
    let rm = layout.row_map.flatten_all()?.to_vec1::<i32>()?;
    Ok((layout, rm))
}

fn u32s(v: Vec<u32>) -> candle_core::Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, &CPU)
}

#[test]
fn combine_matches_candle_index_select() -> R {
    let mut rng = StdRng::seed_from_u64(10);
    let (layout, rm) = layout_of(&mut rng, true)?;
    let h = 40;
    let y = Var::from_tensor(&rand_t(&mut rng, &[layout.max_rows(), h], 0.05, 2.0)?.to_dtype(DType::BF16)?)?;
    let w = Var::from_tensor(&rand_t(&mut rng, &[T, K], 0.05, 1.0)?)?;
    let out = combine(y.as_tensor(), w.as_tensor(), &layout)?;

    // out[t] = sum_j w[t, j] mask[t, j] y[row(t, j)].
    let idx = u32s(rm.iter().map(|&r| r.max(0) as u32).collect())?;
    let mask = Tensor::from_vec(rm.iter().map(|&r| (r >= 0) as u8 as f32).collect::<Vec<_>>(), (T, K), &CPU)?;
    let composed = |y: &Tensor, w: &Tensor| -> candle_core::Result<Tensor> {
        let rows = y.to_dtype(DType::F32)?.index_select(&idx, 0)?.reshape((T, K, h))?;
        rows.broadcast_mul(&(w * &mask)?.unsqueeze(2)?)?.sum(1)
    };
    let want = composed(y.as_tensor(), w.as_tensor())?;
    let bound = composed(&y.as_tensor().abs()?, &w.as_tensor().abs()?)?;
    close("combine", &out, &want, ONE_ROUNDING, &order_tol(K, &bound)?)?;

    let c = rand_t(&mut rng, &[T, h], 0.1, 1.0)?;
    let g = (out.to_dtype(DType::F32)? * &c)?.sum_all()?.backward()?;
    let gc = (&want * &c)?.sum_all()?.backward()?;
    // grad_y[row(t, j)] = bf16(w c) on both sides (one term per routed row; padding rows 0).
    close("combine grad y", g.get(y.as_tensor()).unwrap(), gc.get(y.as_tensor()).unwrap(), TWO_ROUNDINGS, &[0.0])?;
    // grad_w = <c[t], y[row]>: H products in moekit's lane order vs candle's.
    let gw_bound = (c
        .abs()?
        .unsqueeze(1)?
        .broadcast_mul(&y.as_tensor().to_dtype(DType::F32)?.abs()?.index_select(&idx, 0)?.reshape((T, K, h))?)?
        .sum(2)?
        * &mask)?;
    close(
        "combine grad w",
        g.get(w.as_tensor()).unwrap(),
        gc.get(w.as_tensor()).unwrap(),
        0.0,
        &order_tol(h, &gw_bound)?,
    )?;

    // Bit for bit moekit's tensor ops on the CPU.
    let l = moekit_dispatch::dispatch_layout(&to_mt_ids(&layout)?, &layout.config, None).unwrap();
    let ym = moekit_tensor::Tensor::from_slice(
        &y.as_tensor().flatten_all()?.to_vec1::<moekit_dtype::bf16>()?,
        &[layout.max_rows(), h],
        &moekit_tensor::Device::Cpu,
    )
    .unwrap();
    let wm = moekit_tensor::Tensor::from_slice(&flat(w.as_tensor())?, &[T, K], &moekit_tensor::Device::Cpu).unwrap();
    let om = moekit_dispatch::combine(&ym, &l, Some(&wm)).unwrap();
    assert_eq!(
        bits(&out)?,
        om.to_vec::<moekit_dtype::bf16>().unwrap().iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

/// The layout's ids as moekit's I32 pairs, recovered from the row map and m_indices.
fn to_mt_ids(layout: &DispatchLayout) -> candle_core::Result<moekit_tensor::Tensor> {
    let rm = layout.row_map.flatten_all()?.to_vec1::<i32>()?;
    let mi = layout.m_indices.to_vec1::<i32>()?;
    let ids: Vec<i32> = rm.iter().map(|&r| if r < 0 { -1 } else { mi[r as usize] }).collect();
    Ok(moekit_tensor::Tensor::from_slice(&ids, &[T, K], &moekit_tensor::Device::Cpu).unwrap())
}

/// Source token of every row (0 for padding) and the routed-row mask `[rows, 1]`.
fn row_sources(layout: &DispatchLayout, rm: &[i32]) -> candle_core::Result<(Tensor, Tensor)> {
    let rows = layout.max_rows();
    let (mut src, mut mask) = (vec![0u32; rows], vec![0f32; rows]);
    for (p, &r) in rm.iter().enumerate() {
        if r >= 0 {
            src[r as usize] = (p / K) as u32;
            mask[r as usize] = 1.0;
        }
    }
    Ok((u32s(src)?, Tensor::from_vec(mask, (rows, 1), &CPU)?))
}

#[test]
fn permute_matches_candle_index_select() -> R {
    let mut rng = StdRng::seed_from_u64(11);
    let (layout, rm) = layout_of(&mut rng, true)?;
    let h = 24;
    let x = Var::from_tensor(&rand_t(&mut rng, &[T, h], 0.05, 2.0)?.to_dtype(DType::BF16)?)?;
    let p = permute(x.as_tensor(), &layout)?;
    let (src, mask) = row_sources(&layout, &rm)?;
    let want = x.as_tensor().to_dtype(DType::F32)?.index_select(&src, 0)?.broadcast_mul(&mask)?;
    close("permute", &p, &want, 0.0, &[0.0])?;

    let c = rand_t(&mut rng, &[layout.max_rows(), h], 0.1, 1.0)?;
    let g = (p.to_dtype(DType::F32)? * &c)?.sum_all()?.backward()?;
    let gc = (&want * &c)?.sum_all()?.backward()?;
    let bound = c.abs()?.broadcast_mul(&mask)?.sum_all()?.to_scalar::<f32>()?;
    close(
        "permute grad",
        g.get(x.as_tensor()).unwrap(),
        gc.get(x.as_tensor()).unwrap(),
        TWO_ROUNDINGS,
        &[K as f32 * f32::EPSILON * bound],
    )
}

#[test]
fn permute_fp8_dequantizes_to_the_rows() -> R {
    let mut rng = StdRng::seed_from_u64(12);
    let (layout, rm) = layout_of(&mut rng, false)?;
    let h = 256;
    let x = Var::from_tensor(&rand_t(&mut rng, &[T, h], 0.05, 4.0)?.to_dtype(DType::BF16)?)?;
    let q = permute_fp8(x.as_tensor(), &layout, ScaleKind::F32, ScaleLayout::RowMajor)?;
    assert!(!q.data.track_op() && !q.scales.track_op(), "FP8 permute is forward only");
    assert_eq!(q.scales.dims(), &[layout.max_rows(), h / 128]);
    let deq = dequant_rows(&q)?;
    let (src, mask) = row_sources(&layout, &rm)?;
    let want = x.as_tensor().to_dtype(DType::F32)?.index_select(&src, 0)?.broadcast_mul(&mask)?;
    // E4M3: 4 significant bits (relative 2^-4), subnormal spacing 2^-9 (times the scale).
    let smax = q.scales.max_all()?.to_scalar::<f32>()?;
    close("fp8 permute", &deq, &want, 1.0 / 16.0, &[smax / 1024.0])?;
    // Bit for bit moekit's op.
    let xm = moekit_tensor::Tensor::from_slice(
        &x.as_tensor().flatten_all()?.to_vec1::<moekit_dtype::bf16>()?,
        &[T, h],
        &moekit_tensor::Device::Cpu,
    )
    .unwrap();
    let l = moekit_dispatch::dispatch_layout(&to_mt_ids(&layout)?, &layout.config, None).unwrap();
    let pm = moekit_dispatch::permute(&xm, &l, moekit_dispatch::ActFormat::FP8).unwrap();
    assert_eq!(
        bits(&q.scales)?,
        pm.scales.unwrap().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        bits(&q.data)?,
        pm.data.to_vec::<moekit_dtype::F8E4M3>().unwrap().iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

/// Row-major 1x128-scaled FP8 rows as f32.
fn dequant_rows(q: &Fp8Activation) -> candle_core::Result<Tensor> {
    let (rows, cols) = q.data.dims2()?;
    let s = q.scales.unsqueeze(2)?.broadcast_as((rows, cols / 128, 128))?.reshape((rows, cols))?;
    q.data.to_dtype(DType::F32)? * s
}

// ---------------------------------------------------------------- grouped GEMM

const G: usize = 4;

/// `sum_g mask_g(a) b_g^T`, in f32: the grouped GEMM as plain matmuls.
fn grouped_composed(a: &Tensor, b: &Tensor, groups: &[i32]) -> candle_core::Result<Tensor> {
    let m = groups.len();
    let mut out: Option<Tensor> = None;
    for g in 0..G {
        let mask: Vec<f32> = groups.iter().map(|&v| (v == g as i32) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (m, 1), &CPU)?;
        let part = a.broadcast_mul(&mask)?.matmul(&b.get(g)?.t()?)?;
        out = Some(match out {
            None => part,
            Some(o) => (o + part)?,
        });
    }
    out.ok_or_else(|| candle_core::Error::Msg("no groups".into()))
}

fn check_gemm_grads(out: &Tensor, a: &Var, b: &Var, groups: &[i32], c: &Tensor, dims: (usize, usize, usize)) -> R {
    let (m, n, k) = dims;
    let (af, bf) = (a.as_tensor().to_dtype(DType::F32)?.reshape((m, k))?, b.as_tensor().to_dtype(DType::F32)?);
    let want = grouped_composed(&af, &bf, groups)?;
    let bound = grouped_composed(&af.abs()?, &bf.abs()?, groups)?;
    close("grouped GEMM", &out.reshape((m, n))?, &want, ONE_ROUNDING, &order_tol(k, &bound)?)?;
    let g = (out.reshape((m, n))?.to_dtype(DType::F32)? * c)?.sum_all()?.backward()?;
    let gc = (&want * c)?.sum_all()?.backward()?;
    // grad_a = sum_g mask_g c b_g: N products; grad_b[g] = (mask_g c)^T a: M products.
    let ca = c.abs()?;
    let ga_bound = grouped_composed(&ca, &bf.abs()?.transpose(1, 2)?, groups)?;
    let ga = g.get(a.as_tensor()).unwrap().reshape((m, k))?;
    close(
        "grouped GEMM grad a",
        &ga,
        &gc.get(a.as_tensor()).unwrap().reshape((m, k))?,
        TWO_ROUNDINGS,
        &order_tol(n, &ga_bound)?,
    )?;
    let mut gb_bound = Vec::new();
    for gi in 0..G {
        let mask: Vec<f32> = groups.iter().map(|&v| (v == gi as i32) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (m, 1), &CPU)?;
        gb_bound.push(ca.broadcast_mul(&mask)?.t()?.matmul(&af.abs()?)?);
    }
    let gb_bound = Tensor::stack(&gb_bound, 0)?;
    close(
        "grouped GEMM grad b",
        g.get(b.as_tensor()).unwrap(),
        gc.get(b.as_tensor()).unwrap(),
        TWO_ROUNDINGS,
        &order_tol(m, &gb_bound)?,
    )
}

#[test]
fn grouped_gemm_contiguous_matches_per_expert_matmul() -> R {
    let mut rng = StdRng::seed_from_u64(20);
    let (m, n, k) = (40, 24, 32);
    let groups: Vec<i32> = (0..m).map(|_| rng.gen_range(-1..G as i32)).collect();
    let a = Var::from_tensor(&rand_t(&mut rng, &[m, k], 0.05, 1.0)?.to_dtype(DType::BF16)?)?;
    let b = Var::from_tensor(&rand_t(&mut rng, &[G, n, k], 0.05, 1.0)?.to_dtype(DType::BF16)?)?;
    let ids = Tensor::from_vec(groups.clone(), m, &CPU)?;
    let out = grouped_gemm_contiguous(a.as_tensor(), b.as_tensor(), &ids)?;
    let c = rand_t(&mut rng, &[m, n], 0.1, 1.0)?;
    check_gemm_grads(&out, &a, &b, &groups, &c, (m, n, k))?;
    // U32 ids (u32::MAX = padding) give the same bits.
    let ids_u: Vec<u32> = groups.iter().map(|&g| g as u32).collect();
    let out_u = grouped_gemm_contiguous(a.as_tensor(), b.as_tensor(), &u32s(ids_u)?)?;
    assert_eq!(bits(&out)?, bits(&out_u)?);
    Ok(())
}

#[test]
fn grouped_gemm_masked_matches_per_expert_matmul() -> R {
    let mut rng = StdRng::seed_from_u64(21);
    let (mmax, n, k) = (10, 16, 24);
    let masked: Vec<i32> = (0..G).map(|g| if g == 1 { 0 } else { rng.gen_range(1..=mmax as i32) }).collect();
    let a = Var::from_tensor(&rand_t(&mut rng, &[G, mmax, k], 0.05, 1.0)?.to_dtype(DType::BF16)?)?;
    let b = Var::from_tensor(&rand_t(&mut rng, &[G, n, k], 0.05, 1.0)?.to_dtype(DType::BF16)?)?;
    let mm = Tensor::from_vec(masked.clone(), G, &CPU)?;
    let out = grouped_gemm_masked(a.as_tensor(), b.as_tensor(), Some(&mm))?;
    assert_eq!(out.dims(), &[G, mmax, n]);
    let groups: Vec<i32> =
        (0..G * mmax).map(|r| if ((r % mmax) as i32) < masked[r / mmax] { (r / mmax) as i32 } else { -1 }).collect();
    let c = rand_t(&mut rng, &[G * mmax, n], 0.1, 1.0)?;
    check_gemm_grads(&out, &a, &b, &groups, &c, (G * mmax, n, k))
}

#[test]
fn grouped_gemm_fp8_matches_dequantized_matmul() -> R {
    let mut rng = StdRng::seed_from_u64(22);
    let (layout, _) = layout_of(&mut rng, true)?;
    let (n, k) = (128, 256);
    let x = rand_t(&mut rng, &[T, k], 0.05, 2.0)?.to_dtype(DType::BF16)?;
    let wt = rand_t(&mut rng, &[E, n, k], 0.01, 0.5)?;
    let qa = permute_fp8(&x, &layout, ScaleKind::F32, ScaleLayout::RowMajor)?;
    let qb = Fp8Weights::quantize(&wt)?;
    let out = grouped_gemm_contiguous_fp8(&qa, &qb, &layout.m_indices)?;
    let da = dequant_rows(&qa)?;
    let sb = qb.scales.unsqueeze(2)?.unsqueeze(4)?.broadcast_as((E, n / 128, 128, k / 128, 128))?.reshape((E, n, k))?;
    let db = (qb.data.to_dtype(DType::F32)? * sb)?;
    let groups = layout.m_indices.to_vec1::<i32>()?;
    let mut want = Vec::new();
    let mut bound = Vec::new();
    for (r, &g) in groups.iter().enumerate() {
        if g < 0 {
            want.push(Tensor::zeros((1, n), DType::F32, &CPU)?);
            bound.push(Tensor::zeros((1, n), DType::F32, &CPU)?);
        } else {
            want.push(da.narrow(0, r, 1)?.matmul(&db.get(g as usize)?.t()?)?);
            bound.push(da.narrow(0, r, 1)?.abs()?.matmul(&db.get(g as usize)?.abs()?.t()?)?);
        }
    }
    let (want, bound) = (Tensor::cat(&want, 0)?, Tensor::cat(&bound, 0)?);
    close("fp8 grouped GEMM", &out, &want, ONE_ROUNDING, &order_tol(k, &bound)?)
}

// ---------------------------------------------------------------- SwiGLU and the module

#[test]
fn swiglu_matches_candle_silu() -> R {
    let mut rng = StdRng::seed_from_u64(30);
    let (rows, i) = (12, 16);
    let x = Var::from_tensor(&rand_t(&mut rng, &[rows, 2 * i], 0.05, 3.0)?.to_dtype(DType::BF16)?)?;
    let y = swiglu(x.as_tensor())?;
    let xf = x.as_tensor().to_dtype(DType::F32)?;
    let want = (xf.narrow(1, 0, i)?.silu()? * xf.narrow(1, i, i)?)?;
    // moekit's sigmoid/exp within a few ulp of candle's: dominated by the one BF16 rounding.
    close("swiglu", &y, &want, ONE_ROUNDING, &[1e-6])?;
    let c = rand_t(&mut rng, &[rows, i], 0.1, 1.0)?;
    let g = (y.to_dtype(DType::F32)? * &c)?.sum_all()?.backward()?;
    let gc = (&want * &c)?.sum_all()?.backward()?;
    // moekit's backward takes the BF16 upstream gradient (c is BF16-representable: exact) and
    // rounds its result once; candle rounds its f32 gradient once.
    close("swiglu grad", g.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap(), TWO_ROUNDINGS, &[1e-5])
}

/// `||got - want|| / ||want||`.
fn rel_err(got: &Tensor, want: &Tensor) -> candle_core::Result<f32> {
    let (g, w) = (flat(got)?, flat(want)?);
    let num: f32 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
    let den: f32 = w.iter().map(|b| b * b).sum::<f32>().sqrt();
    Ok(num / den)
}

#[test]
fn moe_experts_match_a_loop_over_experts() -> R {
    let mut rng = StdRng::seed_from_u64(40);
    let (h, i) = (32, 16);
    let xs = Var::from_tensor(&rand_t(&mut rng, &[2, T / 2, h], 0.05, 1.0)?.to_dtype(DType::BF16)?)?;
    let gate_up = Var::from_tensor(&rand_t(&mut rng, &[E, 2 * i, h], 0.02, 0.3)?.to_dtype(DType::BF16)?)?;
    let down = Var::from_tensor(&rand_t(&mut rng, &[E, h, i], 0.02, 0.3)?.to_dtype(DType::BF16)?)?;
    let ids_v = rand_ids(&mut rng, T, K, E, true);
    let ids = Tensor::from_vec(ids_v.clone(), (T, K), &CPU)?;
    let w = Var::from_tensor(&rand_t(&mut rng, &[T, K], 0.05, 1.0)?)?;
    let experts = MoeExperts::new(gate_up.as_tensor().clone(), down.as_tensor().clone(), K)?.with_align(16)?;
    let ys = experts.forward(xs.as_tensor(), w.as_tensor(), &ids)?;
    assert_eq!(ys.dims(), xs.as_tensor().dims());
    assert_eq!(ys.dtype(), DType::BF16);

    // The loop: every expert on its tokens, in f32, weighted, added back.
    let x = xs.as_tensor().to_dtype(DType::F32)?.reshape((T, h))?;
    let (gu, dn) = (gate_up.as_tensor().to_dtype(DType::F32)?, down.as_tensor().to_dtype(DType::F32)?);
    let mut want = Tensor::zeros((T, h), DType::F32, &CPU)?;
    for e in 0..E {
        let pairs: Vec<usize> = (0..T * K).filter(|&p| ids_v[p] == e as u32).collect();
        if pairs.is_empty() {
            continue;
        }
        let tok = u32s(pairs.iter().map(|&p| (p / K) as u32).collect())?;
        let slot = u32s(pairs.iter().map(|&p| p as u32).collect())?;
        let hid = x.index_select(&tok, 0)?.matmul(&gu.get(e)?.t()?)?;
        let act = (hid.narrow(1, 0, i)?.silu()? * hid.narrow(1, i, i)?)?;
        let y = act.matmul(&dn.get(e)?.t()?)?;
        let we = w.as_tensor().flatten_all()?.index_select(&slot, 0)?.unsqueeze(1)?;
        want = want.index_add(&tok, &y.broadcast_mul(&we)?, 0)?;
    }
    let want = want.reshape((2, T / 2, h))?;
    // Five BF16 roundings on the way (two GEMM outputs, SwiGLU, combine; the backward adds
    // the GEMMs' and SwiGLU's), each at most 2^-8 relative per element: 3% normwise leaves
    // room for the amplification by the sums that follow; measured values are printed.
    let fwd = rel_err(&ys, &want)?;
    let c = rand_t(&mut rng, &[2, T / 2, h], 0.1, 1.0)?;
    let g = (ys.to_dtype(DType::F32)? * &c)?.sum_all()?.backward()?;
    let gc = (&want * &c)?.sum_all()?.backward()?;
    let mut errs = vec![("forward", fwd)];
    for (name, v) in [("xs", &xs), ("gate_up", &gate_up), ("down", &down), ("weights", &w)] {
        errs.push((name, rel_err(g.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap())?));
    }
    println!("MoeExperts vs loop, normwise relative error: {errs:?}");
    for (name, err) in errs {
        assert!(err < 0.03, "{name}: relative error {err}");
    }
    Ok(())
}

// ---------------------------------------------------------------- errors, not panics

#[test]
fn bad_inputs_are_errors() -> R {
    let mut rng = StdRng::seed_from_u64(50);
    let cfg = RouterConfig::mixtral();
    let msg = |r: candle_core::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let l9 = rand_t(&mut rng, &[4, 9], 0.1, 1.0)?;
    assert!(route(&l9, None, &cfg).is_err());
    assert!(route(&l9.to_dtype(DType::F64)?.narrow(1, 0, 8)?, None, &cfg).is_err());
    let l8 = rand_t(&mut rng, &[4, 8], 0.1, 1.0)?;
    assert!(route(&l8, Some(&Tensor::zeros(7, DType::F32, &CPU)?), &cfg).is_err());
    assert!(route(&l8, None, &RouterConfig::new(8, 9, ScoreFunc::Softmax)).is_err());
    let bad_ids = Tensor::from_vec(vec![0u32, 8, 1, 2, 3, 4, 5, 6], (4, 2), &CPU)?;
    assert!(msg(route_replay(&l8, &bad_ids, &cfg)).contains("outside"));
    assert!(route_replay(&l8, &bad_ids.to_dtype(DType::I64)?, &cfg).is_err());

    assert!(dispatch_layout(&Tensor::from_vec(vec![0u32, 7], (1, 2), &CPU)?, &DispatchConfig::new(6, 2)).is_err());
    let ids = Tensor::from_vec(rand_ids(&mut rng, T, K, E, false), (T, K), &CPU)?;
    let layout = dispatch_layout(&ids, &DispatchConfig::new(E, K).with_align(16))?;
    let x = rand_t(&mut rng, &[T, 16], 0.1, 1.0)?;
    assert!(msg(permute(&x, &layout)).contains("dtype"));
    assert!(permute(&x.narrow(0, 0, T - 1)?.to_dtype(DType::BF16)?, &layout).is_err());
    assert!(permute(&rand_t(&mut rng, &[T, 12], 0.1, 1.0)?.to_dtype(DType::BF16)?, &layout).is_err());
    assert!(permute_fp8(&x.to_dtype(DType::BF16)?, &layout, ScaleKind::F32, ScaleLayout::RowMajor).is_err());
    let y = rand_t(&mut rng, &[layout.max_rows() - 1, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let w = rand_t(&mut rng, &[T, K], 0.1, 1.0)?;
    assert!(combine(&y, &w, &layout).is_err());
    let y = rand_t(&mut rng, &[layout.max_rows(), 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    assert!(combine(&y, &w.to_dtype(DType::BF16)?, &layout).is_err());
    assert!(combine(&y, &w.narrow(1, 0, 2)?, &layout).is_err());
    assert!(swiglu(&rand_t(&mut rng, &[4, 7], 0.1, 1.0)?.to_dtype(DType::BF16)?).is_err());

    let a = rand_t(&mut rng, &[8, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let b = rand_t(&mut rng, &[2, 8, 24], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let mi = Tensor::from_vec(vec![0i32; 8], 8, &CPU)?;
    assert!(grouped_gemm_contiguous(&a, &b, &mi).is_err(), "K differs");
    let b = rand_t(&mut rng, &[2, 12, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    assert!(grouped_gemm_contiguous(&a, &b, &mi).is_err(), "N not a multiple of 8");
    let b = rand_t(&mut rng, &[2, 8, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    assert!(grouped_gemm_contiguous(&a, &b, &mi.narrow(0, 0, 7)?).is_err(), "m_indices length");
    assert!(grouped_gemm_contiguous(&a.to_dtype(DType::F32)?, &b, &mi).is_err());
    let a3 = rand_t(&mut rng, &[2, 4, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    assert!(grouped_gemm_masked(&a3, &b, Some(&Tensor::from_vec(vec![5i32, 1], 2, &CPU)?)).is_err());
    assert!(grouped_gemm_masked(&a3, &b, Some(&Tensor::from_vec(vec![1i32, 1, 1], 3, &CPU)?)).is_err());
    assert!(Fp8Weights::quantize(&rand_t(&mut rng, &[1, 64, 128], 0.1, 1.0)?).is_err());

    let gu = rand_t(&mut rng, &[E, 16, 16], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let dn = rand_t(&mut rng, &[E, 16, 7], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    assert!(MoeExperts::new(gu.clone(), dn, K).is_err());
    let dn = rand_t(&mut rng, &[E, 16, 8], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let ex = MoeExperts::new(gu, dn, K)?;
    assert!(ex.clone().with_align(3).is_err());
    assert!(ex.forward(&rand_t(&mut rng, &[T, 8], 0.1, 1.0)?, &w, &ids).is_err());
    assert!(ex.forward(&rand_t(&mut rng, &[T, 16], 0.1, 1.0)?, &w, &ids.narrow(0, 0, 3)?).is_err());
    Ok(())
}

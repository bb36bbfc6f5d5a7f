//! Every op on candle CUDA tensors against the same op on CPU tensors (moekit's CPU path),
//! forward and backward. Needs a GPU (and libcuda at link time: candle's `cuda` feature links
//! it); `cargo test -p moekit-candle --features cuda -- --ignored gpu_`.
//!
//! What is compared how, from what each kernel crate promises:
//! - routing (moekit-gating: kernels and reference compute the same bits, backward included),
//!   dispatch layout, permute (BF16 and FP8), SwiGLU and combine (moekit-dispatch: the kernels
//!   match the reference bit for bit), and every backward composed of them: **bit for bit**;
//! - grouped GEMMs (moekit-gemm: the kernels accumulate in f32 in their own order, the CPU
//!   reference in f64, both round to BF16 once): a sum of `n` products in f32 is within
//!   `n eps sum |terms|` of the exact sum (`eps = f32::EPSILON`, doubled unit roundoff), and
//!   each side's one BF16 rounding is within `2^-8` relative, so
//!   `|gpu - cpu| <= 2.04 * 2^-8 |cpu| + n eps bound`, `bound` the same op on absolute values
//!   (computed on the CPU, itself rounded to BF16: scaled by 1.01). The weight gradient is
//!   rounded once more on the CPU (f64 to f32 to BF16): covered by the 2% of `2.04`. The FP8
//!   GEMM scales each 128-long partial sum in f32 (two roundings per block, `2 K / 128 <= K`
//!   more): `n = 2 K`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use moekit_candle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R = candle_core::Result<()>;
const TWO_ROUNDINGS: f32 = 2.04 / 256.0;
const CPU: Device = Device::Cpu;
const T: usize = 37;
const E: usize = 8;
const K: usize = 2;

/// candle's CUDA device 0 when there is a GPU and moekit's kernels are built; None (the test
/// skips, visibly) otherwise.
fn cuda(test: &str) -> Option<Device> {
    let images =
        [&moekit_gating::kernels::GATING, &moekit_dispatch::kernels::DISPATCH, &moekit_gemm::kernels::GEMM_PORTABLE];
    moekit_cuda::testing::gpu_or_skip(test, &images)?;
    Some(Device::new_cuda(0).expect("candle's CUDA device 0"))
}

fn rand_t(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| rng.gen_range(lo..hi) * if rng.gen::<bool>() { 1.0 } else { -1.0 })
        .collect();
    Tensor::from_vec(v, dims, &CPU)
}

fn rand_ids(rng: &mut StdRng, tokens: usize, k: usize, e: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<u32> = Vec::new();
        while row.len() < k {
            let v = rng.gen_range(0..e as u32);
            if !row.contains(&v) {
                row.push(v);
            }
        }
        if rng.gen_range(0..4) == 0 {
            row[k - 1] = u32::MAX;
        }
        ids.extend(row);
    }
    ids
}

/// The bits of any tensor (floats widened to f32 exactly; integers as they are).
fn bits(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    let t = t.to_device(&CPU)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::U32 => t.to_vec1::<u32>()?,
        DType::I32 => t.to_vec1::<i32>()?.iter().map(|&v| v as u32).collect(),
        DType::F8E4M3 => t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect(),
        _ => t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect(),
    })
}

fn same(what: &str, gpu: &Tensor, cpu: &Tensor) -> R {
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shapes");
    assert!(gpu.device().is_cuda(), "{what}: not a CUDA tensor");
    let (g, c) = (bits(gpu)?, bits(cpu)?);
    if let Some(i) = (0..g.len()).find(|&i| g[i] != c[i]) {
        panic!("{what}[{i}]: GPU bits {:#x}, CPU bits {:#x}", g[i], c[i]);
    }
    Ok(())
}

/// `|gpu - cpu| <= TWO_ROUNDINGS |cpu| + n eps 1.01 bound` elementwise (see the module docs).
fn close(what: &str, gpu: &Tensor, cpu: &Tensor, n: usize, bound: &Tensor) -> R {
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shapes");
    let f = |t: &Tensor| t.to_device(&CPU)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    let (g, c, b) = (f(gpu)?, f(cpu)?, f(bound)?);
    assert!(c.iter().any(|v| *v != 0.0), "{what}: all zeros");
    for i in 0..g.len() {
        let tol = TWO_ROUNDINGS * c[i].abs() + n as f32 * f32::EPSILON * 1.01 * b[i] + f32::MIN_POSITIVE;
        assert!((g[i] - c[i]).abs() <= tol, "{what}[{i}]: GPU {}, CPU {}, tolerance {tol}", g[i], c[i]);
    }
    Ok(())
}

fn var_on(t: &Tensor, dev: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&t.to_device(dev)?)
}

#[test]
#[ignore = "needs a GPU (and libcuda at link time)"]
fn gpu_route_matches_cpu_bit_for_bit() -> R {
    let Some(dev) = cuda("gpu_route_matches_cpu_bit_for_bit") else { return Ok(()) };
    let mut rng = StdRng::seed_from_u64(1);
    let cfgs = [
        (RouterConfig::new(8, 2, ScoreFunc::Softmax), false),
        (RouterConfig::new(16, 4, ScoreFunc::Sigmoid).with_groups(4, 2).with_route_scale(2.5), true),
    ];
    for (cfg, with_bias) in cfgs {
        for dtype in [DType::F32, DType::BF16] {
            let l = rand_t(&mut rng, &[T, cfg.experts], 0.0, 3.0)?.to_dtype(dtype)?;
            let bias = rand_t(&mut rng, &[cfg.experts], 0.0, 0.5)?;
            let coef = rand_t(&mut rng, &[T, cfg.top_k], 0.1, 1.0)?;
            let (lc, lg) = (var_on(&l, &CPU)?, var_on(&l, &dev)?);
            let (bc, bg) = (bias.clone(), bias.to_device(&dev)?);
            let rc = route(lc.as_tensor(), with_bias.then_some(&bc), &cfg)?;
            let rg = route(lg.as_tensor(), with_bias.then_some(&bg), &cfg)?;
            same("topk_ids", &rg.topk_ids, &rc.topk_ids)?;
            same("topk_weights", &rg.topk_weights, &rc.topk_weights)?;
            same("counts", &rg.counts, &rc.counts)?;
            let gc = (&rc.topk_weights * &coef)?.sum_all()?.backward()?;
            let gg = (&rg.topk_weights * coef.to_device(&dev)?)?.sum_all()?.backward()?;
            let (gc, gg) = (gc.get(lc.as_tensor()).expect("grad"), gg.get(lg.as_tensor()).expect("grad"));
            same("grad of the logits", gg, gc)?;
        }
    }
    // Replay on CUDA (moekit's replay kernel): the chosen ids give the routing's weights bit
    // for bit, the gradient is the CPU path's, and an id out of range is an error.
    let l = rand_t(&mut rng, &[T, E], 0.0, 3.0)?;
    let (lc, lg) = (var_on(&l, &CPU)?, var_on(&l, &dev)?);
    let cfg = RouterConfig::new(E, K, ScoreFunc::Softmax).with_renormalize(true);
    let rg = route(lg.as_tensor(), None, &cfg)?;
    same("replayed weights", &route_replay(lg.as_tensor(), &rg.topk_ids, &cfg)?, &rg.topk_weights)?;
    let ids_c = rg.topk_ids.to_device(&CPU)?;
    let wc = route_replay(lc.as_tensor(), &ids_c, &cfg)?;
    let wg = route_replay(lg.as_tensor(), &rg.topk_ids, &cfg)?;
    same("replay on CUDA and CPU", &wg, &wc)?;
    let coef = rand_t(&mut rng, &[T, K], 0.1, 1.0)?;
    let gc = (&wc * &coef)?.sum_all()?.backward()?;
    let gg = (&wg * coef.to_device(&dev)?)?.sum_all()?.backward()?;
    same("replay grad", gg.get(lg.as_tensor()).expect("grad"), gc.get(lc.as_tensor()).expect("grad"))?;
    let bad_ids = Tensor::full(E as u32, (T, K), &dev)?;
    assert!(route_replay(lg.as_tensor(), &bad_ids, &cfg).is_err());
    Ok(())
}

#[test]
#[ignore = "needs a GPU (and libcuda at link time)"]
fn gpu_dispatch_swiglu_combine_match_cpu_bit_for_bit() -> R {
    let Some(dev) = cuda("gpu_dispatch_swiglu_combine_match_cpu_bit_for_bit") else { return Ok(()) };
    let mut rng = StdRng::seed_from_u64(2);
    let (h, inter) = (256, 64);
    let ids = Tensor::from_vec(rand_ids(&mut rng, T, K, E), (T, K), &CPU)?;
    let cfg = DispatchConfig::new(E, K).with_align(16);
    let (lc, lg) = (dispatch_layout(&ids, &cfg)?, dispatch_layout(&ids.to_device(&dev)?, &cfg)?);
    lg.check()?;
    same("offsets", &lg.offsets, &lc.offsets)?;
    same("counts", &lg.counts, &lc.counts)?;
    same("row_map", &lg.row_map, &lc.row_map)?;
    same("m_indices", &lg.m_indices, &lc.m_indices)?;
    assert_eq!(lg.rows_used()?, lc.rows_used()?);

    let x = rand_t(&mut rng, &[T, h], 0.05, 2.0)?.to_dtype(DType::BF16)?;
    for kind in [ScaleKind::F32, ScaleKind::Ue8m0] {
        for sl in [ScaleLayout::RowMajor, ScaleLayout::MnMajor] {
            let (qc, qg) = (permute_fp8(&x, &lc, kind, sl)?, permute_fp8(&x.to_device(&dev)?, &lg, kind, sl)?);
            same("FP8 codes", &qg.data, &qc.data)?;
            same("FP8 scales", &qg.scales, &qc.scales)?;
        }
    }

    // permute -> (first 2 I columns) SwiGLU -> combine, and back.
    let w = rand_t(&mut rng, &[T, K], 0.1, 1.0)?;
    let coef = rand_t(&mut rng, &[T, inter], 0.1, 1.0)?;
    let run = |dev: &Device, layout: &DispatchLayout| -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let (xv, wv) = (var_on(&x, dev)?, var_on(&w, dev)?);
        let rows = permute(xv.as_tensor(), layout)?;
        let act = swiglu(&rows.narrow(1, 0, 2 * inter)?)?;
        let out = combine(&act, wv.as_tensor(), layout)?;
        let g = (out.to_dtype(DType::F32)? * coef.to_device(dev)?)?.sum_all()?.backward()?;
        let grads = vec![
            rows,
            act,
            g.get(xv.as_tensor()).expect("grad x").clone(),
            g.get(wv.as_tensor()).expect("grad w").clone(),
        ];
        Ok((out, grads))
    };
    let (oc, gc) = run(&CPU, &lc)?;
    let (og, gg) = run(&dev, &lg)?;
    same("combine", &og, &oc)?;
    for (what, (g, c)) in ["permute", "swiglu", "grad x", "grad weights"].iter().zip(gg.iter().zip(&gc)) {
        same(what, g, c)?;
    }
    Ok(())
}

/// `(out, grad a, grad b)` of `f(a, b)` with upstream gradient `coef`.
fn gemm_grads(
    f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    a: &Tensor,
    b: &Tensor,
    coef: &Tensor,
    dev: &Device,
) -> candle_core::Result<[Tensor; 3]> {
    let (av, bv) = (var_on(a, dev)?, var_on(b, dev)?);
    let out = f(av.as_tensor(), bv.as_tensor())?;
    let g = (out.to_dtype(DType::F32)? * coef.to_device(dev)?)?.sum_all()?.backward()?;
    Ok([out, g.get(av.as_tensor()).expect("grad a").clone(), g.get(bv.as_tensor()).expect("grad b").clone()])
}

/// GPU against CPU, and the CPU on absolute values as the bound.
fn check_gemm(
    what: &str,
    f: &dyn Fn(&Tensor, &Tensor, &Device) -> candle_core::Result<Tensor>,
    a: &Tensor,
    b: &Tensor,
    coef: &Tensor,
    dev: &Device,
) -> R {
    let (m, k) = (a.elem_count() / b.dims()[2], b.dims()[2]);
    let n = b.dims()[1];
    let g = gemm_grads(&|a, b| f(a, b, dev), a, b, coef, dev)?;
    let c = gemm_grads(&|a, b| f(a, b, &CPU), a, b, coef, &CPU)?;
    let bound = gemm_grads(&|a, b| f(a, b, &CPU), &a.abs()?, &b.abs()?, &coef.abs()?, &CPU)?;
    close(&format!("{what}: out"), &g[0], &c[0], k, &bound[0])?;
    close(&format!("{what}: grad a"), &g[1], &c[1], n, &bound[1])?;
    close(&format!("{what}: grad b"), &g[2], &c[2], m, &bound[2])
}

#[test]
#[ignore = "needs a GPU (and libcuda at link time)"]
fn gpu_grouped_gemms_match_cpu_within_argued_tolerances() -> R {
    let Some(dev) = cuda("gpu_grouped_gemms_match_cpu_within_argued_tolerances") else { return Ok(()) };
    let mut rng = StdRng::seed_from_u64(3);
    let ids = Tensor::from_vec(rand_ids(&mut rng, T, K, E), (T, K), &CPU)?;
    let layout = dispatch_layout(&ids, &DispatchConfig::new(E, K).with_align(16))?;
    let (rows, n, k) = (layout.max_rows(), 48, 64);
    let a = rand_t(&mut rng, &[rows, k], 0.05, 1.0)?.to_dtype(DType::BF16)?;
    let b = rand_t(&mut rng, &[E, n, k], 0.05, 1.0)?.to_dtype(DType::BF16)?;
    let coef = rand_t(&mut rng, &[rows, n], 0.1, 1.0)?;
    let mi = layout.m_indices.clone();
    let contiguous = |a: &Tensor, b: &Tensor, d: &Device| grouped_gemm_contiguous(a, b, &mi.to_device(d)?);
    check_gemm("contiguous", &contiguous, &a, &b, &coef, &dev)?;

    let (g, mmax) = (4, 24);
    let a = rand_t(&mut rng, &[g, mmax, k], 0.05, 1.0)?.to_dtype(DType::BF16)?;
    let b = rand_t(&mut rng, &[g, n, k], 0.05, 1.0)?.to_dtype(DType::BF16)?;
    let coef = rand_t(&mut rng, &[g, mmax, n], 0.1, 1.0)?;
    for mm in [Tensor::from_vec(vec![3u32, 0, 24, 11], g, &CPU)?, Tensor::from_vec(vec![5i32, 24, 0, 1], g, &CPU)?] {
        let masked = |a: &Tensor, b: &Tensor, d: &Device| grouped_gemm_masked(a, b, Some(&mm.to_device(d)?));
        check_gemm("masked", &masked, &a, &b, &coef, &dev)?;
    }
    let unmasked = |a: &Tensor, b: &Tensor, _: &Device| grouped_gemm_masked(a, b, None);
    check_gemm("masked, no masked_m", &unmasked, &a, &b, &coef, &dev)?;

    // FP8: the same quantized operands on both devices.
    let (n, k) = (128, 256);
    let x = rand_t(&mut rng, &[T, k], 0.05, 2.0)?.to_dtype(DType::BF16)?;
    let qa = permute_fp8(&x, &layout, ScaleKind::F32, ScaleLayout::RowMajor)?;
    let qb = Fp8Weights::quantize(&rand_t(&mut rng, &[E, n, k], 0.01, 0.5)?)?;
    let out_c = grouped_gemm_contiguous_fp8(&qa, &qb, &layout.m_indices)?;
    let on = |t: &Tensor| t.to_device(&dev);
    let qa_g = Fp8Activation { data: on(&qa.data)?, scales: on(&qa.scales)?, layout: qa.layout };
    let qb_g = Fp8Weights { data: on(&qb.data)?, scales: on(&qb.scales)? };
    let out_g = grouped_gemm_contiguous_fp8(&qa_g, &qb_g, &on(&layout.m_indices)?)?;
    // The bound: dequantized |A| |B|^T per row's expert (BF16 inputs of moekit's CPU path).
    let deq = |q: &Fp8Activation| -> candle_core::Result<Tensor> {
        let (r, c) = q.data.dims2()?;
        let s = q.scales.unsqueeze(2)?.broadcast_as((r, c / 128, 128))?.reshape((r, c))?;
        (q.data.to_dtype(DType::F32)? * s)?.abs()
    };
    let sb = qb.scales.unsqueeze(2)?.unsqueeze(4)?.broadcast_as((E, n / 128, 128, k / 128, 128))?.reshape((E, n, k))?;
    let db = (qb.data.to_dtype(DType::F32)? * sb)?.abs()?.to_dtype(DType::BF16)?;
    let bound = grouped_gemm_contiguous(&deq(&qa)?.to_dtype(DType::BF16)?, &db, &layout.m_indices)?;
    close("fp8", &out_g, &out_c, 2 * k, &bound)
}

#[test]
#[ignore = "needs a GPU (and libcuda at link time)"]
fn gpu_moe_experts_forward_and_backward() -> R {
    let Some(dev) = cuda("gpu_moe_experts_forward_and_backward") else { return Ok(()) };
    let mut rng = StdRng::seed_from_u64(4);
    let (h, inter) = (64, 32);
    let gate_up = rand_t(&mut rng, &[E, 2 * inter, h], 0.01, 0.2)?.to_dtype(DType::BF16)?;
    let down = rand_t(&mut rng, &[E, h, inter], 0.01, 0.2)?.to_dtype(DType::BF16)?;
    let xs = rand_t(&mut rng, &[T, h], 0.1, 1.0)?.to_dtype(DType::BF16)?;
    let w = rand_t(&mut rng, &[T, K], 0.1, 1.0)?.abs()?;
    let ids = Tensor::from_vec(rand_ids(&mut rng, T, K, E), (T, K), &CPU)?;
    let run = |dev: &Device| -> candle_core::Result<Vec<Tensor>> {
        let (gu, dn) = (var_on(&gate_up, dev)?, var_on(&down, dev)?);
        let moe = MoeExperts::new(gu.as_tensor().clone(), dn.as_tensor().clone(), K)?;
        let ys = moe.forward(&xs.to_device(dev)?, &w.to_device(dev)?, &ids.to_device(dev)?)?;
        let g = ys.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
        Ok(vec![ys, g.get(gu.as_tensor()).expect("grad").clone(), g.get(dn.as_tensor()).expect("grad").clone()])
    };
    let (c, g) = (run(&CPU)?, run(&dev)?);
    // Two GEMM stages whose f32 sums differ from the CPU's f64 ones in the last bits, each
    // rounded to BF16: a relative error of a few BF16 roundings overall.
    for (what, (g, c)) in ["ys", "grad gate_up", "grad down"].iter().zip(g.iter().zip(&c)) {
        assert!(g.device().is_cuda());
        let d = (g.to_device(&CPU)?.to_dtype(DType::F32)? - c.to_dtype(DType::F32)?)?;
        let err =
            (d.sqr()?.sum_all()?.sqrt()? / c.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
        assert!(err < 0.03, "{what}: relative error {err}");
    }
    Ok(())
}

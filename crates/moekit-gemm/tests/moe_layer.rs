//! One DeepSeek-style MoE layer forward through all three kernel crates: route -> dispatch ->
//! grouped GEMM (gate | up) -> SwiGLU -> grouped GEMM (down) -> weighted combine. Checks the
//! contracts between them (ids, m_indices, row maps, scale layouts) on the CPU reference path,
//! the emulated kernels, and against a naive per-token computation in f64.

use moekit_cuda::testing::emulator_or_skip;
use moekit_cuda::BlockOrder;
use moekit_dispatch::{combine, dispatch, swiglu, ActFormat, DispatchConfig, ScaleKind};
use moekit_dtype::{bf16, F8E4M3};
use moekit_gating::{route, RouterConfig, ScoreFunc};
use moekit_gemm::{m_grouped_contiguous, reference, GemmInput, ScaleLayout};
use moekit_tensor::{DType, Device, Tensor};

const T: usize = 48;
const H: usize = 128;
const I: usize = 128;
const E: usize = 8;
const K: usize = 2;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s % 20001) as f32 / 10000.0 - 1.0) * scale).to_f32()
        })
        .collect()
}

fn bf16_tensor(v: &[f32], dims: &[usize], dev: &Device) -> Tensor {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    Tensor::from_slice(&b, dims, dev).unwrap()
}

struct Weights {
    router: Vec<f32>, // [E, H]
    w1: Vec<f32>,     // [E, 2I, H]: gate rows then up rows
    w2: Vec<f32>,     // [E, H, I]
}

/// The layer on `dev`: returns (topk ids, output [T, H] as f32).
fn layer(dev: &Device, x: &[f32], w: &Weights, fp8: bool) -> (Vec<i32>, Vec<f32>) {
    // Router logits on the host (a dense GEMM the model does elsewhere).
    let logits = reference::gemm_nt(x, &w.router, T, E, H);
    let cfg = RouterConfig::new(E, K, ScoreFunc::Softmax).with_renormalize(true);
    let r = route(&Tensor::from_slice(&logits, &[T, E], dev).unwrap(), None, &cfg).unwrap();
    let dcfg = DispatchConfig::new(E, K).with_align(32);
    let format = if fp8 { ActFormat::Fp8(ScaleKind::F32, ScaleLayout::MnMajor) } else { ActFormat::Bf16 };
    let (layout, xp) = dispatch(&bf16_tensor(x, &[T, H], dev), &r.topk_ids, &dcfg, format).unwrap();
    layout.check().unwrap();
    let weight = |v: &[f32], n: usize, k: usize| -> (Tensor, Option<Tensor>) {
        if fp8 {
            let (codes, scales) = reference::quantize_blocks(v, E, n, k);
            let codes: Vec<F8E4M3> = codes.into_iter().map(F8E4M3::from_bits).collect();
            (
                Tensor::from_slice(&codes, &[E, n, k], dev).unwrap(),
                Some(Tensor::from_slice(&scales, &[E, n / 128, k / 128], dev).unwrap()),
            )
        } else {
            (bf16_tensor(v, &[E, n, k], dev), None)
        }
    };
    let input = |t: &(Tensor, Option<Tensor>)| -> (Tensor, Option<Tensor>) { (t.0.clone(), t.1.clone()) };
    let (w1, w1s) = input(&weight(&w.w1, 2 * I, H));
    let (w2, w2s) = input(&weight(&w.w2, H, I));
    let h = m_grouped_contiguous((&xp).into(), as_input(&w1, &w1s), &layout.m_indices).unwrap();
    let act = swiglu(&h, format).unwrap();
    let y = m_grouped_contiguous((&act).into(), as_input(&w2, &w2s), &layout.m_indices).unwrap();
    let out = combine(&y, &layout, Some(&r.topk_weights)).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    (r.topk_ids.to_vec().unwrap(), out.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect())
}

fn as_input<'a>(d: &'a Tensor, s: &'a Option<Tensor>) -> GemmInput<'a> {
    match s {
        Some(s) => GemmInput::Fp8 { data: d, scales: s, layout: ScaleLayout::MnMajor },
        None => GemmInput::Bf16(d),
    }
}

/// The same layer per token, in f64, on the unquantized values.
fn naive(x: &[f32], w: &Weights, ids: &[i32]) -> Vec<f32> {
    let logits = reference::gemm_nt(x, &w.router, T, E, H);
    let mut out = vec![0.0f32; T * H];
    for t in 0..T {
        let row = &logits[t * E..(t + 1) * E];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let p: Vec<f64> = row.iter().map(|&u| (u as f64 - m).exp()).collect();
        let chosen: Vec<usize> = ids[t * K..(t + 1) * K].iter().map(|&e| e as usize).collect();
        let norm: f64 = chosen.iter().map(|&e| p[e]).sum();
        for &e in &chosen {
            let xt = &x[t * H..(t + 1) * H];
            let dot = |wrow: &[f32], v: &[f64]| -> f64 { wrow.iter().zip(v).map(|(&a, &b)| a as f64 * b).sum() };
            let xv: Vec<f64> = xt.iter().map(|&v| v as f64).collect();
            let hidden: Vec<f64> = (0..I)
                .map(|i| {
                    let g = dot(&w.w1[(e * 2 * I + i) * H..(e * 2 * I + i + 1) * H], &xv);
                    let u = dot(&w.w1[(e * 2 * I + I + i) * H..(e * 2 * I + I + i + 1) * H], &xv);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for j in 0..H {
                out[t * H + j] += (p[e] / norm * dot(&w.w2[(e * H + j) * I..(e * H + j + 1) * I], &hidden)) as f32;
            }
        }
    }
    out
}

#[test]
fn emu_moe_layer_matches_cpu_and_naive() {
    let Some(emu) = emulator_or_skip(
        "emu_moe_layer_matches_cpu_and_naive",
        &[&moekit_gemm::kernels::GEMM_PORTABLE],
        BlockOrder::Shuffled(2),
    ) else {
        return;
    };
    let x = values(T * H, 1, 1.0);
    let w =
        Weights { router: values(E * H, 2, 0.3), w1: values(E * 2 * I * H, 3, 0.15), w2: values(E * H * I, 4, 0.15) };
    for fp8 in [false, true] {
        let (ids_cpu, out_cpu) = layer(&Device::Cpu, &x, &w, fp8);
        let (ids_emu, out_emu) = layer(&Device::Emulated(emu.clone()), &x, &w, fp8);
        assert_eq!(ids_emu, ids_cpu, "routing is the same on both devices");
        let d = reference::diff(&out_emu, &out_cpu);
        assert!(d < 1e-5, "fp8={fp8}: emulated vs CPU layer diff {d:e}");
        let want = naive(&x, &w, &ids_cpu);
        let d = reference::diff(&out_cpu, &want);
        // FP8: three quantized stages (x, the SwiGLU output, both weights), each within the
        // 1e-3 single-GEMM bound of moe.md; BF16: roundings of h, the SwiGLU output and y.
        let tol = if fp8 { 3e-3 } else { 1e-4 };
        eprintln!(
            "moe layer fp8={fp8}: emulated vs CPU diff {:e}, CPU vs naive f64 diff {d:e}",
            reference::diff(&out_emu, &out_cpu)
        );
        assert!(d < tol, "fp8={fp8}: layer vs naive f64 diff {d:e} (tolerance {tol:e})");
    }
}

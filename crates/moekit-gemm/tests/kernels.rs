//! Every grouped GEMM the dispatcher can pick, against the CPU reference, for every layout and
//! dtype. One body per device: the host emulation in CI (small shapes), the GPU (`gpu_*`).
//!
//! Tolerances (DeepGEMM's metric `diff`, moe.md): the kernel against the reference on the
//! *same* (dequantized) inputs differs only by f32 summation order and the final BF16
//! rounding: `diff < 1e-5`. FP8 against the reference on the unquantized inputs also carries
//! E4M3's rounding of both operands: `diff < 1e-3`.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::BlockOrder;
use moekit_dispatch::{quantize_fp8, Activation, ScaleKind};
use moekit_dtype::{bf16, F8E4M3};
use moekit_gemm::kernels::GEMM_PORTABLE;
use moekit_gemm::{
    dgrad, k_grouped, k_grouped_accumulate, m_grouped_contiguous, m_grouped_masked, reference, GemmInput, ScaleLayout,
};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

/// Values in [-1, 1] times a magnitude that changes every 128 elements (1/4, 1, 4, 16), so
/// neighbouring FP8 scale blocks differ and a wrong scale index cannot hide.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mag = [0.25f32, 1.0, 4.0, 16.0][(i / 128 + i / 7919) % 4];
            bf16::from_f32(((s % 20001) as f32 / 10000.0 - 1.0) * mag).to_f32()
        })
        .collect()
}

fn bf16_tensor(v: &[f32], dims: &[usize], dev: &Device) -> Tensor {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    Tensor::from_slice(&b, dims, dev).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        DType::BF16 => t.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect(),
        _ => t.to_vec::<f32>().unwrap(),
    }
}

/// Token-side FP8 of `v [rows, cols]` (quantized on the CPU, moved to `dev`).
fn fp8_tokens(v: &[f32], rows: usize, cols: usize, layout: ScaleLayout, dev: &Device) -> Activation {
    let a = quantize_fp8(&bf16_tensor(v, &[rows, cols], &Device::Cpu), ScaleKind::F32, layout).unwrap();
    Activation {
        data: a.data.to_device(dev).unwrap(),
        scales: Some(a.scales.unwrap().to_device(dev).unwrap()),
        format: a.format,
    }
}

/// Weight-side FP8 of `w [g, n, k]`: codes and 128x128 scales on `dev`.
fn fp8_weights(w: &[f32], g: usize, n: usize, k: usize, dev: &Device) -> (Tensor, Tensor) {
    let (codes, scales) = reference::quantize_blocks(w, g, n, k);
    let codes: Vec<F8E4M3> = codes.into_iter().map(F8E4M3::from_bits).collect();
    (
        Tensor::from_slice(&codes, &[g, n, k], dev).unwrap(),
        Tensor::from_slice(&scales, &[g, n / 128, k / 128], dev).unwrap(),
    )
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let d = reference::diff(got, want);
    assert!(d < tol, "{what}: diff {d:e} >= {tol:e}");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
}

/// m_indices for segments of the given sizes, each padded with -1 to `align` rows.
fn contiguous_ids(sizes: &[(i32, usize)], align: usize) -> Vec<i32> {
    let mut ids = vec![];
    for &(g, s) in sizes {
        ids.extend(std::iter::repeat_n(g, s));
        ids.extend(std::iter::repeat_n(-1, s.div_ceil(align) * align - s));
    }
    ids
}

/// Contiguous BF16 `a [m, k]` by `b [groups, n, k]` with `ids`: device vs CPU.
#[allow(clippy::too_many_arguments)]
fn check_contiguous_bf16(
    dev: &Device,
    what: &str,
    a: &[f32],
    b: &[f32],
    ids: &[i32],
    groups: usize,
    n: usize,
    k: usize,
) {
    let m = ids.len();
    check(
        dev,
        what,
        |d| {
            m_grouped_contiguous(
                GemmInput::Bf16(&bf16_tensor(a, &[m, k], d)),
                GemmInput::Bf16(&bf16_tensor(b, &[groups, n, k], d)),
                &Tensor::from_slice(ids, &[m], d).unwrap(),
            )
            .unwrap()
        },
        None,
    );
}

/// k-grouped offsets `[G + 1]` of consecutive groups of `sizes` tokens.
fn group_offsets(sizes: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(sizes.iter().scan(0i32, |end, &s| {
            *end += s as i32;
            Some(*end)
        }))
        .collect()
}

/// BF16 dgrad `dy [m, n]` by the forward weights `w [groups, n, k]` with `ids`: device vs CPU.
#[allow(clippy::too_many_arguments)]
fn check_dgrad_bf16(dev: &Device, what: &str, dy: &[f32], w: &[f32], ids: &[i32], groups: usize, n: usize, k: usize) {
    let m = ids.len();
    check(
        dev,
        what,
        |d| {
            dgrad(
                GemmInput::Bf16(&bf16_tensor(dy, &[m, n], d)),
                GemmInput::Bf16(&bf16_tensor(w, &[groups, n, k], d)),
                &Tensor::from_slice(ids, &[m], d).unwrap(),
            )
            .unwrap()
        },
        None,
    );
}

/// BF16 k-grouped over groups of `sizes` tokens, dW [groups, n, k]: device vs CPU.
fn check_k_grouped_bf16(dev: &Device, what: &str, sizes: &[usize], n: usize, k: usize) {
    let offsets = group_offsets(sizes);
    let m = *offsets.last().unwrap() as usize;
    let (dy, x) = (values(m * n, 45), values(m * k, 46));
    check(
        dev,
        what,
        |d| {
            k_grouped(
                GemmInput::Bf16(&bf16_tensor(&dy, &[m, n], d)),
                GemmInput::Bf16(&bf16_tensor(&x, &[m, k], d)),
                &Tensor::from_slice(&offsets, &[sizes.len() + 1], d).unwrap(),
            )
            .unwrap()
        },
        None,
    );
}

/// FP8 k-grouped over groups of `sizes` tokens (their sum a multiple of 128), dW [groups, n, k]:
/// device vs CPU on the same quantized inputs. `nan_token`: that token of X^T is an E4M3 NaN
/// code in every row; then only the groups without it are compared (they must be finite).
fn check_k_grouped_fp8(dev: &Device, sizes: &[usize], n: usize, k: usize, nan_token: Option<usize>) {
    let offsets = group_offsets(sizes);
    let m = *offsets.last().unwrap() as usize;
    let (dyt, xt) = (values(n * m, 49), values(k * m, 50));
    let run = |d: &Device| {
        let qa = fp8_tokens(&dyt, n, m, ScaleLayout::RowMajor, d);
        let mut qb = fp8_tokens(&xt, k, m, ScaleLayout::RowMajor, d);
        if let Some(t) = nan_token {
            let mut codes = qb.data.to_vec::<F8E4M3>().unwrap();
            (0..k).for_each(|r| codes[r * m + t] = F8E4M3(0x7f));
            qb.data = Tensor::from_slice(&codes, &[k, m], d).unwrap();
        }
        let off = Tensor::from_slice(&offsets, &[sizes.len() + 1], d).unwrap();
        f32s(&k_grouped((&qa).into(), (&qb).into(), &off).unwrap())
    };
    let (want, got) = (run(&Device::Cpu), run(dev));
    for g in 0..sizes.len() {
        let (lo, hi) = (offsets[g] as usize, offsets[g + 1] as usize);
        if nan_token.is_some_and(|t| (lo..hi).contains(&t)) {
            continue;
        }
        let r = g * n * k..(g + 1) * n * k;
        assert_close(&format!("k-grouped fp8 {sizes:?} group {g}"), &got[r.clone()], &want[r], 1e-5);
    }
}

/// The same in FP8 (both token scale layouts), also against the unquantized reference.
#[allow(clippy::too_many_arguments)]
fn check_contiguous_fp8(
    dev: &Device,
    what: &str,
    a: &[f32],
    b: &[f32],
    ids: &[i32],
    groups: usize,
    n: usize,
    k: usize,
) {
    let m = ids.len();
    let mut exact = vec![0.0f32; m * n];
    reference::m_grouped_contiguous(a, b, ids, groups, n, k, &mut exact).unwrap();
    for layout in [ScaleLayout::RowMajor, ScaleLayout::MnMajor] {
        check(
            dev,
            &format!("{what} {layout:?}"),
            |d| {
                let qa = fp8_tokens(a, m, k, layout, d);
                let (qb, sb) = fp8_weights(b, groups, n, k, d);
                let mi = Tensor::from_slice(ids, &[m], d).unwrap();
                m_grouped_contiguous((&qa).into(), GemmInput::Fp8 { data: &qb, scales: &sb, layout }, &mi).unwrap()
            },
            Some(&exact),
        );
    }
}

/// Compares the device result of `run` with the CPU result of the same call, and the FP8
/// result with the unquantized reference `exact`.
fn check(dev: &Device, what: &str, run: impl Fn(&Device) -> Tensor, exact: Option<&[f32]>) {
    let want = f32s(&run(&Device::Cpu));
    let got = f32s(&run(dev));
    assert_close(&format!("{} {what} vs reference on the same inputs", dev.name()), &got, &want, 1e-5);
    if let Some(e) = exact {
        assert_close(&format!("{} {what} vs unquantized reference", dev.name()), &got, e, 1e-3);
    }
    assert_eq!(f32s(&run(dev)), got, "{what}: not deterministic");
}

fn m_grouped(dev: &Device, scale: usize) {
    // Groups of 0 rows, 1 row, exactly the alignment, uneven, and padding rows; then all rows
    // in one group. BF16 with tails (n, k not multiples of the tile); FP8 with both layouts.
    // Uneven groups from a real routing: 4 experts' counts of a top-2 softmax router.
    let logits: Vec<f32> = (0..40 * scale * 4).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
    let routed = moekit_gating::reference::route(
        &logits,
        None,
        &moekit_gating::RouterConfig::new(4, 2, moekit_gating::ScoreFunc::Softmax),
    )
    .unwrap();
    let real: Vec<(i32, usize)> = routed.counts.iter().enumerate().map(|(g, &c)| (g as i32, c as usize)).collect();
    for (align, sizes) in [
        (32usize, vec![(0, 0usize), (1, 1), (2, 32), (0, 45 * scale), (3, 3)]),
        (64, vec![(1, 64 * scale + 5)]),
        (128, vec![(2, 7), (0, 130)]),
        (32, real),
    ] {
        let ids = contiguous_ids(&sizes, align);
        let m = ids.len();
        let groups = 4;
        let mi = |d: &Device| Tensor::from_slice(&ids, &[m], d).unwrap();
        // BF16
        let (n, k) = (72, 40);
        let (a, b) = (values(m * k, 1), values(groups * n * k, 2));
        check_contiguous_bf16(dev, &format!("contiguous bf16 align {align}"), &a, &b, &ids, groups, n, k);
        let (w, dy) = (values(groups * n * k, 3), values(m * n, 4));
        check_dgrad_bf16(dev, &format!("dgrad bf16 align {align}"), &dy, &w, &ids, groups, n, k);
        // FP8
        let (n, k) = (128, 256);
        let (a, b) = (values(m * k, 5), values(groups * n * k, 6));
        check_contiguous_fp8(dev, &format!("contiguous fp8 align {align}"), &a, &b, &ids, groups, n, k);
        let dy = values(m * n, 7);
        let mut exact = vec![0.0f32; m * k];
        reference::dgrad(&dy, &b, &ids, groups, n, k, &mut exact).unwrap();
        check(
            dev,
            &format!("dgrad fp8 align {align}"),
            |d| {
                let qa = fp8_tokens(&dy, m, n, ScaleLayout::RowMajor, d);
                let (qb, sb) = fp8_weights(&b, groups, n, k, d);
                dgrad((&qa).into(), GemmInput::Fp8 { data: &qb, scales: &sb, layout: ScaleLayout::RowMajor }, &mi(d))
                    .unwrap()
            },
            Some(&exact),
        );
    }
}

fn masked(dev: &Device, scale: usize) {
    let (groups, m) = (3, 70 * scale);
    let mm = vec![0i32, m as i32, 33];
    let mmt = |d: &Device| Tensor::from_slice(&mm, &[groups], d).unwrap();
    let (n, k) = (8, 8); // the smallest BF16 shape
    let (a, b) = (values(groups * m * k, 8), values(groups * n * k, 9));
    check(
        dev,
        "masked bf16 n=k=8",
        |d| {
            m_grouped_masked(
                GemmInput::Bf16(&bf16_tensor(&a, &[groups, m, k], d)),
                GemmInput::Bf16(&bf16_tensor(&b, &[groups, n, k], d)),
                Some(&mmt(d)),
            )
            .unwrap()
        },
        None,
    );
    let (n, k) = (128, 128); // the smallest FP8 shape
    let (a, b) = (values(groups * m * k, 10), values(groups * n * k, 11));
    let mut exact = vec![0.0f32; groups * m * n];
    reference::m_grouped_masked(&a, &b, &mm, m, n, k, &mut exact).unwrap();
    for layout in [ScaleLayout::RowMajor, ScaleLayout::MnMajor] {
        check(
            dev,
            &format!("masked fp8 {layout:?}"),
            |d| {
                let qa = fp8_tokens(&a, groups * m, k, layout, d);
                let qa = Activation { data: qa.data.reshape(&[groups, m, k]).unwrap(), ..qa };
                let (qb, sb) = fp8_weights(&b, groups, n, k, d);
                m_grouped_masked((&qa).into(), GemmInput::Fp8 { data: &qb, scales: &sb, layout }, Some(&mmt(d)))
                    .unwrap()
            },
            Some(&exact),
        );
    }
    // Dense = one group, no mask.
    let (m1, n1, k1) = (37, 16, 24);
    let (a, b) = (values(m1 * k1, 12), values(n1 * k1, 13));
    let exact = reference::gemm_nt(&a, &b, m1, n1, k1);
    let got = f32s(
        &m_grouped_masked(
            GemmInput::Bf16(&bf16_tensor(&a, &[1, m1, k1], dev)),
            GemmInput::Bf16(&bf16_tensor(&b, &[1, n1, k1], dev)),
            None,
        )
        .unwrap(),
    );
    assert_close("dense", &got, &exact, 1e-5);
}

fn kgrouped(dev: &Device, scale: usize) {
    // Groups of 0, 1, uneven sizes; FP8 boundaries not on 128 (scales follow the global blocks).
    let sizes = [0usize, 1, 130 * scale, 125];
    let offsets = group_offsets(&sizes);
    let m = *offsets.last().unwrap() as usize;
    let groups = sizes.len();
    let off = |d: &Device| Tensor::from_slice(&offsets, &[groups + 1], d).unwrap();
    let (n, k) = (24, 40);
    let (dy, x) = (values(m * n, 14), values(m * k, 15));
    check(
        dev,
        "k-grouped bf16",
        |d| {
            k_grouped(
                GemmInput::Bf16(&bf16_tensor(&dy, &[m, n], d)),
                GemmInput::Bf16(&bf16_tensor(&x, &[m, k], d)),
                &off(d),
            )
            .unwrap()
        },
        None,
    );
    // Accumulation adds to what is there.
    let first = f32s(
        &k_grouped(
            GemmInput::Bf16(&bf16_tensor(&dy, &[m, n], dev)),
            GemmInput::Bf16(&bf16_tensor(&x, &[m, k], dev)),
            &off(dev),
        )
        .unwrap(),
    );
    let mut acc = Tensor::from_slice(&first, &[groups, n, k], dev).unwrap();
    k_grouped_accumulate(
        &mut acc,
        GemmInput::Bf16(&bf16_tensor(&dy, &[m, n], dev)),
        GemmInput::Bf16(&bf16_tensor(&x, &[m, k], dev)),
        &off(dev),
    )
    .unwrap();
    let doubled: Vec<f32> = first.iter().map(|v| 2.0 * v).collect();
    assert_close("k-grouped accumulate", &f32s(&acc), &doubled, 1e-10);
    // FP8: transposed operands quantized along the tokens.
    let (n, k) = (16, 24);
    let (dy, x) = (values(m * n, 16), values(m * k, 17));
    let t = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
    };
    let (dyt, xt) = (t(&dy, m, n), t(&x, m, k));
    let mut exact = vec![0.0f32; groups * n * k];
    reference::k_grouped(&dy, &x, &offsets, n, k, false, &mut exact).unwrap();
    check(
        dev,
        "k-grouped fp8",
        |d| {
            let qa = fp8_tokens(&dyt, n, m, ScaleLayout::RowMajor, d);
            let qb = fp8_tokens(&xt, k, m, ScaleLayout::RowMajor, d);
            k_grouped((&qa).into(), (&qb).into(), &off(d)).unwrap()
        },
        Some(&exact),
    );
}

fn emu(name: &str) -> Option<Device> {
    emulator_or_skip(name, &[&GEMM_PORTABLE], BlockOrder::Shuffled(11)).map(Device::Emulated)
}

#[test]
fn emu_m_grouped_contiguous_and_dgrad() {
    if let Some(d) = emu("emu_m_grouped_contiguous_and_dgrad") {
        m_grouped(&d, 1);
    }
}

#[test]
fn emu_m_grouped_masked_and_dense() {
    if let Some(d) = emu("emu_m_grouped_masked_and_dense") {
        masked(&d, 1);
    }
}

#[test]
fn emu_k_grouped() {
    if let Some(d) = emu("emu_k_grouped") {
        kgrouped(&d, 1);
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_grouped_gemm_all_layouts() {
    let Some(_) = gpu_or_skip("gpu_grouped_gemm_all_layouts", &[&GEMM_PORTABLE]) else { return };
    let d = Device::Cuda(CudaDevice::new(0).unwrap());
    m_grouped(&d, 8);
    masked(&d, 8);
    kgrouped(&d, 8);
}

/// Shapes the Hopper kernel takes (K a multiple of 64 / 128), with edge tiles in M and N.
fn sm90_shapes(dev: &Device) {
    let ids = contiguous_ids(&[(0, 0), (1, 1), (2, 128), (0, 300), (3, 77)], 128);
    let m = ids.len();
    let groups = 4;
    let (n, k) = (200, 192);
    let (a, b) = (values(m * k, 21), values(groups * n * k, 22));
    check_contiguous_bf16(dev, "sm90 contiguous bf16", &a, &b, &ids, groups, n, k);
    let (dy, w) = (values(m * k, 29), values(groups * k * n, 30));
    check_dgrad_bf16(dev, "sm90 dgrad bf16", &dy, &w, &ids, groups, k, n);
    check_k_grouped_bf16(dev, "sm90 k-grouped bf16", &[0, 1, 300, 77, 128], n, k);
    // 256-column tiles need a tile per SM: 66 row tiles x 2 column tiles >= 132 SMs.
    let ids_w = contiguous_ids(&[(0, 4000), (1, 4400)], 128);
    let (aw, bw) = (values(ids_w.len() * k, 57), values(2 * 512 * k, 58));
    check_contiguous_bf16(dev, "sm90 contiguous bf16, 256-column tiles", &aw, &bw, &ids_w, 2, 512, k);
    // FP8 with several weight scale blocks along N and K (n = 256, k = 384).
    let (n8, k8) = (256, 384);
    let (a8, b8) = (values(m * k8, 25), values(groups * n8 * k8, 26));
    check_contiguous_fp8(dev, "sm90 contiguous fp8", &a8, &b8, &ids, groups, n8, k8);
    let (gm, mm) = (3, vec![0i32, 130, 257]);
    let mmt = |d: &Device| Tensor::from_slice(&mm, &[gm], d).unwrap();
    let (a9, b9) = (values(gm * 257 * k8, 27), values(gm * n8 * k8, 28));
    let mut exact = vec![0.0f32; gm * 257 * n8];
    reference::m_grouped_masked(&a9, &b9, &mm, 257, n8, k8, &mut exact).unwrap();
    check(
        dev,
        "sm90 masked fp8 MN-major",
        |d| {
            let qa = fp8_tokens(&a9, gm * 257, k8, ScaleLayout::MnMajor, d);
            let qa = Activation { data: qa.data.reshape(&[gm, 257, k8]).unwrap(), ..qa };
            let (qb, sb) = fp8_weights(&b9, gm, n8, k8, d);
            m_grouped_masked(
                (&qa).into(),
                GemmInput::Fp8 { data: &qb, scales: &sb, layout: ScaleLayout::MnMajor },
                Some(&mmt(d)),
            )
            .unwrap()
        },
        Some(&exact),
    );
    let a2 = values(gm * 257 * k, 23);
    let b2 = values(gm * n * k, 24);
    check(
        dev,
        "sm90 masked bf16",
        |d| {
            m_grouped_masked(
                GemmInput::Bf16(&bf16_tensor(&a2, &[gm, 257, k], d)),
                GemmInput::Bf16(&bf16_tensor(&b2, &[gm, n, k], d)),
                Some(&mmt(d)),
            )
            .unwrap()
        },
        None,
    );
}

/// The Hopper kernel on every layout it takes (ops and shapes it does not take fall back to the
/// portable kernel inside the same calls).
#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_grouped_gemm_sm90() {
    let Some(gpu) = gpu_or_skip("gpu_grouped_gemm_sm90", &[&moekit_gemm::kernels::GEMM_SM90]) else { return };
    if gpu.compute_capability() != (9, 0) {
        moekit_cuda::testing::skip_notice("gpu_grouped_gemm_sm90", "not a compute capability 9.0 GPU");
        return;
    }
    moekit_gemm::raw::set_kernel_override(Some(moekit_gemm::raw::Kernel::Sm90));
    let d = Device::Cuda(CudaDevice::new(0).unwrap());
    sm90_shapes(&d);
    sm90_multicast(&d);
    m_grouped(&d, 8);
    masked(&d, 8);
    kgrouped(&d, 8);
    moekit_gemm::raw::set_kernel_override(None);
}

/// The Hopper kernel in the host emulation (its TMA, mbarrier and wgmma model: see
/// `kernels/include/moekit/emu/sm90.h`), on the smallest shapes that reach every code path:
/// several row and column tiles (a partial last one of each), tiles holding two groups and
/// padding rows (one pass per group run; consumer halves with no row of the run: the second
/// half of rows 384.. and of the masked tile with 2 live rows skip their wgmmas), a group of
/// one row, 18 column tiles (two bands of the grouped tile order), masked groups with `masked_m` 0
/// (between others: only live row tiles are scheduled), full,
/// below `m` and a partial tile, FP8 with several weight scale blocks along N and K (both
/// token scale layouts), and K of 7 stages (BF16: 64 of K per stage) so the 5-stage ring (6 for k-grouped) wraps
/// inside one pass and the phases flip. Same tolerances as every other kernel (module docs):
/// the emulation's in-instruction summation order is a model, so the kernel is held to f32
/// summation-order differences (`diff < 1e-5`) like the portable kernel, not to bits.
fn sm90_emulated(dev: &Device) {
    use moekit_gemm::raw::{kernel_for_op, Kernel};
    use moekit_gemm::{Op, Shape};
    let on = dev.launcher().unwrap();
    // Group 1 in two runs of the first tile (one pass per run: a repeated pass must not hurt).
    let ids = contiguous_ids(&[(1, 1), (2, 30), (1, 3), (2, 100), (0, 150), (3, 20)], 32);
    let m = ids.len();
    let groups = 4;
    let (n, k) = (136, 448);
    let shape = Shape { groups, m, n, k };
    assert_eq!(kernel_for_op(on, Op::Contiguous, &shape, false), Kernel::Sm90, "the Hopper kernel must run");
    let (a, b) = (values(m * k, 31), values(groups * n * k, 32));
    check_contiguous_bf16(dev, "sm90 contiguous bf16", &a, &b, &ids, groups, n, k);
    // 256-column tiles (BF16 forward, N a multiple of 256 with a tile per SM): N = 512, K of 7
    // stages over the 3-stage ring, contiguous with group runs and padding, and masked.
    let ids3 = contiguous_ids(&[(0, 70), (1, 100), (2, 60)], 32);
    let (m3, n3) = (ids3.len(), 512);
    let (a4, b4) = (values(m3 * k, 53), values(3 * n3 * k, 54));
    check_contiguous_bf16(dev, "sm90 contiguous bf16, 256-column tiles", &a4, &b4, &ids3, 3, n3, k);
    let mm3 = vec![0i32, 130, 160];
    let (a5, b5) = (values(3 * 160 * k, 55), values(3 * n3 * k, 56));
    check(
        dev,
        "sm90 masked bf16, 256-column tiles",
        |d| {
            m_grouped_masked(
                GemmInput::Bf16(&bf16_tensor(&a5, &[3, 160, k], d)),
                GemmInput::Bf16(&bf16_tensor(&b5, &[3, n3, k], d)),
                Some(&Tensor::from_slice(&mm3, &[3], d).unwrap()),
            )
            .unwrap()
        },
        None,
    );
    // Dgrad (BF16): the same rows; reduction N of 7 stages (the ring wraps), K = 136 output
    // columns (a partial second column tile: the second 64-column box of B is all zero fill).
    let (nd, kd) = (448, 136);
    assert_eq!(kernel_for_op(on, Op::Dgrad, &Shape { groups, m, n: nd, k: kd }, false), Kernel::Sm90);
    let (dy, w) = (values(m * nd, 43), values(groups * nd * kd, 44));
    check_dgrad_bf16(dev, "sm90 dgrad bf16", &dy, &w, &ids, groups, nd, kd);
    // FP8 dgrad on Hopper: FP8 wgmma reads K-major operands only, so it runs as the m-grouped
    // contiguous GEMM against the transposed weights' quantization (`quantize_weights(w,
    // true)`: the same codes and block scales, transposed), and equals the portable FP8 dgrad
    // on the forward weights up to summation order.
    {
        let (nd, kd) = (256, 384);
        let ids8 = contiguous_ids(&[(1, 1), (2, 100), (0, 30)], 32);
        let m8 = ids8.len();
        let (dy, w) = (values(m8 * nd, 51), values(groups * nd * kd, 52));
        let run = |d: &Device, hopper: bool| {
            let qa = fp8_tokens(&dy, m8, nd, ScaleLayout::RowMajor, d);
            let wt = Tensor::from_slice(&w, &[groups, nd, kd], d).unwrap();
            let (q, qt) = moekit_gemm::quantize_weights(&wt, true).unwrap();
            let mi = Tensor::from_slice(&ids8, &[m8], d).unwrap();
            if hopper {
                let qt = qt.unwrap();
                let b = GemmInput::Fp8 { data: &qt.codes, scales: &qt.scales, layout: ScaleLayout::RowMajor };
                f32s(&m_grouped_contiguous((&qa).into(), b, &mi).unwrap())
            } else {
                let b = GemmInput::Fp8 { data: &q.codes, scales: &q.scales, layout: ScaleLayout::RowMajor };
                f32s(&dgrad((&qa).into(), b, &mi).unwrap())
            }
        };
        assert_eq!(kernel_for_op(on, Op::Contiguous, &Shape { groups, m: m8, n: kd, k: nd }, true), Kernel::Sm90);
        assert_close(
            "fp8 dgrad as contiguous on W^T (Hopper) vs dgrad (CPU)",
            &run(dev, true),
            &run(&Device::Cpu, false),
            1e-5,
        );
    }
    // k-grouped (BF16): the part-1 body (groups of 0, 1, 130 and 125 tokens: stages that end
    // inside a group and hold the next group's tokens, accumulation), then 2 x 2 tiles of dW
    // (partial in N and K) over groups that start and end off the 64-token stages.
    assert_eq!(kernel_for_op(on, Op::KGrouped, &Shape { groups, m, n: 24, k: 40 }, false), Kernel::Sm90);
    assert_eq!(kernel_for_op(on, Op::KGrouped, &Shape { groups, m: 256, n: 16, k: 24 }, true), Kernel::Sm90);
    kgrouped(dev, 1);
    check_k_grouped_bf16(dev, "sm90 k-grouped bf16", &[70, 0, 200, 3], 136, 200);
    // A non-finite token stays in its group: X row 72 (group 1) is infinite, and group 0's last
    // stage (tokens 64..127) holds it; groups 0 and 2 must be finite and equal the CPU's.
    let (offsets, n, k) = ([0i32, 70, 75, 135], 16, 24);
    let (dy, mut x) = (values(135 * n, 47), values(135 * k, 48));
    x[72 * k..73 * k].fill(f32::INFINITY);
    let run = |d: &Device| {
        f32s(
            &k_grouped(
                GemmInput::Bf16(&bf16_tensor(&dy, &[135, n], d)),
                GemmInput::Bf16(&bf16_tensor(&x, &[135, k], d)),
                &Tensor::from_slice(&offsets, &[4], d).unwrap(),
            )
            .unwrap(),
        )
    };
    let (want, got) = (run(&Device::Cpu), run(dev));
    for g in [0, 2] {
        let r = g * n * k..(g + 1) * n * k;
        assert_close(&format!("k-grouped, infinity in group 1: group {g}"), &got[r.clone()], &want[r], 1e-5);
    }
    // FP8: 2 x 2 partial dW tiles over groups off the 128-token blocks, then an E4M3 NaN code
    // at X^T column 72 (group 1), inside the first block of groups 0 and 2.
    check_k_grouped_fp8(dev, &[0, 100, 1, 200, 83], 136, 200, None);
    check_k_grouped_fp8(dev, &[70, 5, 181], 16, 24, Some(72));
    let ids8 = contiguous_ids(&[(1, 1), (2, 100), (0, 30)], 32);
    let (m8, n8, k8) = (ids8.len(), 256, 384);
    assert_eq!(kernel_for_op(on, Op::Contiguous, &Shape { groups, m: m8, n: n8, k: k8 }, true), Kernel::Sm90);
    let (a8, b8) = (values(m8 * k8, 33), values(groups * n8 * k8, 34));
    check_contiguous_fp8(dev, "sm90 contiguous fp8", &a8, &b8, &ids8, groups, n8, k8);
    // Two column bands of the tile order (18 column tiles; bands of 16) over 2 row tiles.
    let ids2 = contiguous_ids(&[(0, 70), (1, 100)], 32);
    let (m2, n2, k2) = (ids2.len(), 17 * 128 + 8, 64);
    let (a3, b3) = (values(m2 * k2, 39), values(2 * n2 * k2, 40));
    check_contiguous_bf16(dev, "sm90 contiguous bf16, two column bands", &a3, &b3, &ids2, 2, n2, k2);
    // Masked: only live row tiles are scheduled; empty groups between partial and full ones.
    let (rows, mm) = (160, [0i32, 130, 0, 160, 77]);
    check_masked_bf16(dev, "sm90 masked bf16", &mm, rows, n, k, (35, 36));
    check_masked_fp8_mn(dev, "sm90 masked fp8 MN-major", &mm, rows, 128, 256, (37, 38));
}

/// Masked BF16 `a [groups, rows, k]` (values of seed `seeds.0`) by `b [groups, n, k]` (seed
/// `seeds.1`) with `masked_m`: device vs CPU.
fn check_masked_bf16(dev: &Device, what: &str, mm: &[i32], rows: usize, n: usize, k: usize, seeds: (u64, u64)) {
    let gm = mm.len();
    let (a, b) = (values(gm * rows * k, seeds.0), values(gm * n * k, seeds.1));
    let mmt = |d: &Device| Tensor::from_slice(mm, &[gm], d).unwrap();
    let run = |d: &Device| {
        m_grouped_masked(
            GemmInput::Bf16(&bf16_tensor(&a, &[gm, rows, k], d)),
            GemmInput::Bf16(&bf16_tensor(&b, &[gm, n, k], d)),
            Some(&mmt(d)),
        )
        .unwrap()
    };
    check(dev, what, run, None);
}

/// As [`check_masked_bf16`] in FP8 with MN-major scales, also against the unquantized reference.
fn check_masked_fp8_mn(dev: &Device, what: &str, mm: &[i32], rows: usize, n: usize, k: usize, seeds: (u64, u64)) {
    let gm = mm.len();
    let (a, b) = (values(gm * rows * k, seeds.0), values(gm * n * k, seeds.1));
    let mmt = |d: &Device| Tensor::from_slice(mm, &[gm], d).unwrap();
    let mut exact = vec![0.0f32; gm * rows * n];
    reference::m_grouped_masked(&a, &b, mm, rows, n, k, &mut exact).unwrap();
    let run = |d: &Device| {
        let qa = fp8_tokens(&a, gm * rows, k, ScaleLayout::MnMajor, d);
        let qa = Activation { data: qa.data.reshape(&[gm, rows, k]).unwrap(), ..qa };
        let (qb, sb) = fp8_weights(&b, gm, n, k, d);
        m_grouped_masked(
            (&qa).into(),
            GemmInput::Fp8 { data: &qb, scales: &sb, layout: ScaleLayout::MnMajor },
            Some(&mmt(d)),
        )
        .unwrap()
    };
    check(dev, what, run, Some(&exact));
}

/// The 2-CTA cluster kernels (`moekit_gemm_sm90_mc2_*`, forced by
/// `raw::set_multicast_override`): 256-row tiles whose halves go to the two CTAs of a
/// cluster. Contiguous rows where a pair shares one group (the weight tile multicast), where
/// the halves hold different groups and different pass counts (each CTA loads its own, the
/// one with fewer passes walks empty stages in lockstep), and an odd row tile count (the last
/// pair's second CTA has no rows at all); 2 column tiles (a partial one) and K of 7 stages
/// (the ring wraps). Masked groups with an odd number of live row tiles (a pair with one live
/// half). BF16 and FP8 (both token scale layouts), same tolerances as the other kernels.
fn sm90_multicast(dev: &Device) {
    moekit_gemm::raw::set_multicast_override(Some(true));
    let ids = contiguous_ids(&[(1, 300), (0, 5), (2, 200)], 32);
    let (m, groups) = (ids.len(), 3);
    assert_eq!(m.div_ceil(128), 5, "an odd number of row tiles");
    let (n, k) = (136, 448);
    let (a, b) = (values(m * k, 61), values(groups * n * k, 62));
    check_contiguous_bf16(dev, "sm90 2-CTA clusters, contiguous bf16", &a, &b, &ids, groups, n, k);
    let (n8, k8) = (256, 384);
    let (a8, b8) = (values(m * k8, 63), values(groups * n8 * k8, 64));
    check_contiguous_fp8(dev, "sm90 2-CTA clusters, contiguous fp8", &a8, &b8, &ids, groups, n8, k8);
    // Live row tiles per group 0, 2, 0, 2, 1: the last group's pair has one live half.
    let (rows, mm) = (160, [0i32, 130, 0, 160, 77]);
    check_masked_bf16(dev, "sm90 2-CTA clusters, masked bf16", &mm, rows, n, k, (65, 66));
    check_masked_fp8_mn(dev, "sm90 2-CTA clusters, masked fp8 MN-major", &mm, rows, n8, k8, (67, 68));
    moekit_gemm::raw::set_multicast_override(None);
}

fn emu_sm90(name: &str) -> Option<Device> {
    emulator_or_skip(name, &[&GEMM_PORTABLE, &moekit_gemm::kernels::GEMM_SM90], BlockOrder::Shuffled(5))
        .map(Device::Emulated)
}

#[test]
fn emu_grouped_gemm_sm90() {
    let Some(d) = emu_sm90("emu_grouped_gemm_sm90") else { return };
    moekit_gemm::raw::set_kernel_override(Some(moekit_gemm::raw::Kernel::Sm90));
    // The one-CTA kernels here (the rule would pick clusters for some of these shapes).
    moekit_gemm::raw::set_multicast_override(Some(false));
    sm90_emulated(&d);
    moekit_gemm::raw::set_multicast_override(None);
    moekit_gemm::raw::set_kernel_override(None);
}

#[test]
fn emu_grouped_gemm_sm90_clusters() {
    let Some(d) = emu_sm90("emu_grouped_gemm_sm90_clusters") else { return };
    moekit_gemm::raw::set_kernel_override(Some(moekit_gemm::raw::Kernel::Sm90));
    sm90_multicast(&d);
    moekit_gemm::raw::set_kernel_override(None);
}

/// The dispatcher: portable unless opted in on a compute capability 9.0 GPU with the image
/// built; with the Hopper kernel chosen, the ops and shapes it does not take still run on the
/// portable kernel (and pass: the same calls as the part-1 tests).
#[test]
fn emu_dispatcher_choice() {
    use moekit_gemm::raw::{choose, kernel_for, kernel_for_op, set_kernel_override, Kernel};
    use moekit_gemm::{Op, Shape};
    assert_eq!(choose(Some((9, 0)), true, true), Kernel::Sm90);
    assert_eq!(choose(Some((9, 0)), false, true), Kernel::Portable, "opt-in until a GPU run passes");
    assert_eq!(choose(Some((9, 0)), true, false), Kernel::Portable, "not built");
    assert_eq!(choose(Some((8, 0)), true, true), Kernel::Portable);
    assert_eq!(choose(Some((10, 0)), true, true), Kernel::Portable, "sm_90a code runs on 9.0 only");
    assert_eq!(choose(None, true, true), Kernel::Portable, "the emulation only by override");
    let Some(d) = emu_sm90("emu_dispatcher_choice") else { return };
    let on = d.launcher().unwrap();
    assert_eq!(kernel_for(on), Kernel::Portable);
    let s = |k| Shape { groups: 2, m: 64, n: 16, k };
    set_kernel_override(Some(Kernel::Sm90));
    assert_eq!(kernel_for_op(on, Op::Contiguous, &s(64), false), Kernel::Sm90);
    assert_eq!(kernel_for_op(on, Op::Masked, &s(128), true), Kernel::Sm90);
    assert_eq!(kernel_for_op(on, Op::Contiguous, &s(40), false), Kernel::Portable, "K not a 128-byte row");
    assert_eq!(kernel_for_op(on, Op::Contiguous, &s(64), true), Kernel::Portable, "FP8 K = 64");
    assert_eq!(kernel_for_op(on, Op::KGrouped, &s(40), false), Kernel::Sm90, "BF16 k-grouped: any shape");
    assert_eq!(kernel_for_op(on, Op::KGrouped, &Shape { m: 128, ..s(128) }, true), Kernel::Sm90, "FP8 k-grouped");
    assert_eq!(kernel_for_op(on, Op::Dgrad, &Shape { n: 64, ..s(16) }, false), Kernel::Sm90);
    assert_eq!(
        kernel_for_op(on, Op::Dgrad, &Shape { n: 40, ..s(16) }, false),
        Kernel::Portable,
        "N not a 128-byte row"
    );
    assert_eq!(kernel_for_op(on, Op::Dgrad, &Shape { n: 128, ..s(128) }, true), Kernel::Portable, "FP8 dgrad");
    // Calls that mix both kernels under the override: the part-1 BF16 contiguous.
    let ids = contiguous_ids(&[(0, 3), (1, 40)], 32);
    let (m, n, k) = (ids.len(), 24, 40);
    let (a, b) = (values(m * k, 41), values(2 * n * k, 42));
    check_contiguous_bf16(&d, "override, K = 40 (portable)", &a, &b, &ids, 2, n, k);
    set_kernel_override(None);
}

#[test]
fn typed_errors_before_launch() {
    use moekit_tensor::Error;
    let dev = Device::Cpu;
    let a = bf16_tensor(&values(4 * 12, 1), &[4, 12], &dev);
    let b = bf16_tensor(&values(2 * 8 * 12, 2), &[2, 8, 12], &dev);
    let ids = Tensor::from_slice(&[0i32, 1, -1, 0], &[4], &dev).unwrap();
    let r = m_grouped_contiguous(GemmInput::Bf16(&a), GemmInput::Bf16(&b), &ids);
    assert!(matches!(r, Err(Error::Alignment { .. })), "k = 12 is not a multiple of 8: {r:?}");
    let a = bf16_tensor(&values(4 * 16, 1), &[4, 16], &dev);
    let b = bf16_tensor(&values(2 * 8 * 8, 2), &[2, 8, 8], &dev);
    assert!(matches!(m_grouped_contiguous(GemmInput::Bf16(&a), GemmInput::Bf16(&b), &ids), Err(Error::Shape(_))));
    let short = Tensor::from_slice(&[0i32, 1], &[2], &dev).unwrap();
    let b = bf16_tensor(&values(2 * 8 * 16, 2), &[2, 8, 16], &dev);
    assert!(matches!(m_grouped_contiguous(GemmInput::Bf16(&a), GemmInput::Bf16(&b), &short), Err(Error::Shape(_))));
    let qa = fp8_tokens(&values(4 * 128, 3), 4, 128, ScaleLayout::RowMajor, &dev);
    let r = m_grouped_contiguous((&qa).into(), GemmInput::Bf16(&b), &ids);
    assert!(matches!(r, Err(Error::Dtype { .. })), "mixed BF16 and FP8 operands: {r:?}");
}

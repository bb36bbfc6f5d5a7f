//! The dispatch kernels against the CPU reference, bit for bit: layout, permuted BF16 and FP8
//! bytes and scales, quantization, SwiGLU (+ FP8) and its backward, combine and its backward.
//! One body per kernel device: the host emulation (CI) and the GPU (`gpu_*`, GPU bundle).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer, Error};
use moekit_dispatch::kernels::DISPATCH;
use moekit_dispatch::raw::{self, LayoutOut};
use moekit_dispatch::{
    combine, combine_backward, dispatch, quantize_fp8, swiglu, swiglu_backward, ActFormat, Activation, DispatchConfig,
    DispatchLayout, Padding, ScaleKind, ScaleLayout,
};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{CudaDevice, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mag = 2f32.powf(rng.gen_range(-12.0..8.0));
            bf16::from_f32(if rng.gen() { mag } else { -mag })
        })
        .collect()
}

/// Ids with -1s, a hot expert and some experts left empty (seed 77: every pair on expert 3).
fn random_ids(tokens: usize, k: usize, experts: usize, seed: u64) -> Vec<i32> {
    if seed == 77 {
        return vec![3; tokens * k];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens * k)
        .map(|_| match rng.gen_range(0..10) {
            0 => -1,
            1..=3 => 0,
            _ => rng.gen_range(0..experts as i32 / 2 + 1),
        })
        .collect()
}

/// Raw bytes of an activation and its scales (bit patterns), for exact comparison.
fn bytes(a: &Activation) -> (Vec<u8>, Vec<u32>) {
    let data: Vec<u8> = match a.format {
        ActFormat::Bf16 => a.data.to_vec::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ActFormat::Fp8(..) => a.data.to_vec::<F8E4M3>().unwrap().iter().map(|v| v.to_bits()).collect(),
    };
    let scales = a.scales.as_ref().map_or(vec![], |s| s.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect());
    (data, scales)
}

fn out<'a>(
    o: &'a mut EmuBuffer<i32>,
    c: &'a mut EmuBuffer<i32>,
    r: &'a mut EmuBuffer<i32>,
    m: &'a mut EmuBuffer<i32>,
    s: &'a mut EmuBuffer<i32>,
) -> LayoutOut<'a> {
    LayoutOut {
        offsets: o.view_mut(),
        counts: c.view_mut(),
        row_map: r.view_mut(),
        m_indices: m.view_mut(),
        status: s.view_mut(),
    }
}

fn bf16_bits(t: &Tensor) -> Vec<u16> {
    t.to_vec::<bf16>().unwrap().iter().map(|v| if v.is_nan() { 0x7fc0 } else { v.to_bits() }).collect()
}

fn layout_parts(l: &DispatchLayout) -> Vec<Vec<i32>> {
    [&l.offsets, &l.counts, &l.row_map, &l.m_indices, &l.status].iter().map(|t| t.to_vec::<i32>().unwrap()).collect()
}

/// Rows whose content the permute contract defines: routed rows, and with zeroed padding the
/// padding rows inside segments (below `offsets[E]`).
fn defined_rows(l: &DispatchLayout, padding: Padding) -> Vec<bool> {
    let m = l.m_indices.to_vec::<i32>().unwrap();
    let used = l.rows_used().unwrap();
    (0..m.len()).map(|r| m[r] >= 0 || (padding == Padding::Zero && r < used)).collect()
}

/// Index of the scale of (row r, group g) in a `rows`-row activation of `format` (None: BF16).
fn format_scale_index(format: ActFormat, rows: usize, hidden: usize, r: usize, g: usize) -> Option<usize> {
    match format {
        ActFormat::Bf16 => None,
        ActFormat::Fp8(_, l) => Some(l.index(rows, hidden, r, g)),
    }
}

/// Dispatch, combine and their backwards on `dev` equal the CPU reference bit for bit on every
/// row the contract defines; on the emulator, rows it leaves unwritten keep the fill byte.
fn dispatch_matches_reference(dev: &Device, big: bool) {
    let emulated = matches!(dev, Device::Emulated(_));
    let formats = [
        ActFormat::Bf16,
        ActFormat::Fp8(ScaleKind::F32, ScaleLayout::RowMajor),
        ActFormat::Fp8(ScaleKind::Ue8m0, ScaleLayout::MnMajor),
    ];
    // (tokens, k, experts, align, hidden): multi-chunk layouts, E = 256, k = 1 and 8, T = 0, 1.
    let mut shapes = vec![
        (37, 8, 16, 16, 384),
        (150, 8, 256, 16, 128),
        (1, 1, 4, 128, 256),
        (0, 8, 256, 32, 128),
        (20, 2, 8, 1, 384),
        (70, 4, 8, 64, 128), // all pairs on one expert
    ];
    if big {
        shapes.insert(0, (4096, 8, 256, 128, 7168));
    }
    for (si, &(tokens, k, experts, align, hidden)) in shapes.iter().enumerate() {
        for (fi, &format) in formats.iter().enumerate() {
            for padding in [Padding::Zero, Padding::Skip] {
                let cfg = DispatchConfig::new(experts, k).with_align(align).with_padding(padding);
                let ctx = format!(
                    "{} T={tokens} k={k} E={experts} align={align} H={hidden} {format:?} {padding:?}",
                    dev.name()
                );
                let x = random_bf16(tokens * hidden, 10 * si as u64 + fi as u64);
                let all_on_one = (tokens, k, experts) == (70, 4, 8);
                let ids = random_ids(tokens, k, experts, if all_on_one { 77 } else { si as u64 });
                let on = |d: &Device| {
                    let xt = Tensor::from_slice(&x, &[tokens, hidden], d).unwrap();
                    let it = Tensor::from_slice(&ids, &[tokens, k], d).unwrap();
                    dispatch(&xt, &it, &cfg, format).unwrap()
                };
                let (want_l, want_p) = on(&Device::Cpu);
                let (got_l, got_p) = on(dev);
                assert_eq!(layout_parts(&got_l), layout_parts(&want_l), "{ctx}: layout");
                got_l.check().unwrap();
                let (gd, gs) = bytes(&got_p);
                let (wd, ws) = bytes(&want_p);
                let defined = defined_rows(&want_l, padding);
                let (row_bytes, groups) = (hidden * format.elem_bytes(), hidden / 128);
                let rows = want_l.max_rows();
                let scale_of = |r: usize, g: usize| format_scale_index(format, rows, hidden, r, g);
                for r in 0..rows {
                    let (got, want) =
                        (&gd[r * row_bytes..(r + 1) * row_bytes], &wd[r * row_bytes..(r + 1) * row_bytes]);
                    let got_s: Vec<u32> = (0..groups).filter_map(|g| scale_of(r, g).map(|i| gs[i])).collect();
                    if defined[r] {
                        if let Some(i) = (0..row_bytes).find(|&i| got[i] != want[i]) {
                            panic!("{ctx}: permuted row {r} byte {i}: {} vs {}", got[i], want[i]);
                        }
                        let want_s: Vec<u32> = (0..groups).filter_map(|g| scale_of(r, g).map(|i| ws[i])).collect();
                        assert_eq!(got_s, want_s, "{ctx}: scales of row {r}");
                    } else if emulated {
                        // Not written: the emulator's fill byte survives.
                        assert!(got.iter().all(|&b| b == 0xA5), "{ctx}: row {r} (not defined) was written");
                        assert!(got_s.iter().all(|&b| b == 0xA5A5_A5A5), "{ctx}: scales of row {r} were written");
                    }
                }
                let (gd2, gs2) = bytes(&on(dev).1);
                for r in (0..rows).filter(|&r| defined[r] || emulated) {
                    assert_eq!(
                        &gd2[r * row_bytes..(r + 1) * row_bytes],
                        &gd[r * row_bytes..(r + 1) * row_bytes],
                        "{ctx}: not deterministic"
                    );
                }
                assert!(!emulated || gs2 == gs, "{ctx}: scales not deterministic");

                if fi != 0 || padding != Padding::Skip {
                    continue;
                }
                // Combine (weighted and not) and its backward, with y = the permuted rows.
                let mut rng = StdRng::seed_from_u64(si as u64);
                let w: Vec<f32> = (0..tokens * k).map(|_| rng.gen_range(0.0f32..1.0)).collect();
                let dout = random_bf16(tokens * hidden, 99 + si as u64);
                for weighted in [false, true] {
                    let run = |d: &Device, l: &DispatchLayout, y: &Tensor| {
                        let wt = weighted.then(|| Tensor::from_slice(&w, &[tokens, k], d).unwrap());
                        let dt = Tensor::from_slice(&dout, &[tokens, hidden], d).unwrap();
                        let out = combine(y, l, wt.as_ref()).unwrap();
                        let (gy, gw) = combine_backward(y, &dt, l, wt.as_ref()).unwrap();
                        (bf16_bits(&out), bf16_bits(&gy), gw.map(|g| g.to_vec::<f32>().unwrap()))
                    };
                    let want = run(&Device::Cpu, &want_l, &want_p.data);
                    let got = run(dev, &got_l, &got_p.data);
                    assert_eq!(got.0, want.0, "{ctx}: combine (weighted {weighted})");
                    assert_eq!(got.1, want.1, "{ctx}: combine backward grad_y (weighted {weighted})");
                    let bits =
                        |v: &Option<Vec<f32>>| v.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                    assert_eq!(bits(&got.2), bits(&want.2), "{ctx}: combine backward grad_weights");
                }
            }
        }
    }
}

/// Quantization, SwiGLU (BF16 and FP8) and SwiGLU backward equal the reference bit for bit.
fn activations_match_reference(dev: &Device, rows: usize) {
    for cols in [128usize, 384, 1024] {
        let x = random_bf16(rows * 2 * cols, cols as u64);
        let dh = random_bf16(rows * cols, 7 + cols as u64);
        let on = |d: &Device| {
            let xt = Tensor::from_slice(&x, &[rows, 2 * cols], d).unwrap();
            let half = Tensor::from_slice(&x[..rows * cols], &[rows, cols], d).unwrap();
            let dt = Tensor::from_slice(&dh, &[rows, cols], d).unwrap();
            let mut outs = vec![];
            for kind in [ScaleKind::F32, ScaleKind::Ue8m0] {
                for layout in [ScaleLayout::RowMajor, ScaleLayout::MnMajor] {
                    outs.push(bytes(&quantize_fp8(&half, kind, layout).unwrap()));
                    outs.push(bytes(&swiglu(&xt, ActFormat::Fp8(kind, layout)).unwrap()));
                }
            }
            outs.push(bytes(&swiglu(&xt, ActFormat::Bf16).unwrap()));
            (outs, bf16_bits(&swiglu_backward(&xt, &dt).unwrap()))
        };
        let (want, want_g) = on(&Device::Cpu);
        let (got, got_g) = on(dev);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{} cols={cols}: output {i}", dev.name());
        }
        assert_eq!(got_g, want_g, "{} cols={cols}: SwiGLU backward", dev.name());
    }
}

#[test]
fn emu_dispatch_matches_reference_bitwise() {
    let Some(emu) = emulator_or_skip("emu_dispatch_matches_reference_bitwise", &[&DISPATCH], BlockOrder::Shuffled(5))
    else {
        return;
    };
    dispatch_matches_reference(&Device::Emulated(emu), false);
}

#[test]
fn emu_activations_match_reference_bitwise() {
    let Some(emu) = emulator_or_skip("emu_activations_match_reference_bitwise", &[&DISPATCH], BlockOrder::Reversed)
    else {
        return;
    };
    activations_match_reference(&Device::Emulated(emu), 19);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_dispatch_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_dispatch_matches_reference_bitwise", &[&DISPATCH]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    dispatch_matches_reference(&dev, true);
    activations_match_reference(&dev, 1000);
}

/// The raw layer refuses bad input before launching, and ids or rows outside their ranges
/// never become addresses.
#[test]
fn emu_raw_rejects_bad_input_and_never_writes_out_of_bounds() {
    let Some(emu) = emulator_or_skip("emu_raw_rejects_bad_input", &[&DISPATCH], BlockOrder::InOrder) else { return };
    let cfg = DispatchConfig::new(4, 2).with_align(16);
    // Ids far outside [-1, E): skipped and counted; every write stays in its buffer (guarded).
    let ids = EmuBuffer::from_host(&emu, &[0i32, 7, -5, 1 << 30, 3, -1]).unwrap();
    let mut scratch = EmuBuffer::<i32>::zeros(&emu, raw::layout_scratch_len(6, 4)).unwrap();
    let mut offsets = EmuBuffer::<i32>::zeros(&emu, 5).unwrap();
    let mut counts = EmuBuffer::<i32>::zeros(&emu, 4).unwrap();
    let mut row_map = EmuBuffer::<i32>::zeros(&emu, 6).unwrap();
    let mut m_indices = EmuBuffer::<i32>::zeros(&emu, 20).unwrap();
    let mut status = EmuBuffer::<i32>::zeros(&emu, 2).unwrap();
    raw::layout(
        &emu,
        &cfg,
        ids.view(),
        scratch.view_mut(),
        out(&mut offsets, &mut counts, &mut row_map, &mut m_indices, &mut status),
    )
    .unwrap();
    assert_eq!(status.as_slice(), &[3, 32], "3 invalid ids; 32 rows needed (2 segments of 16)");
    assert_eq!(row_map.as_slice(), &[0, -1, -1, -1, 16, -1], "the second segment's row 16 fits in 20 rows");
    // Wrong lengths: typed errors, nothing written.
    let mut short = EmuBuffer::<i32>::zeros(&emu, 4).unwrap();
    let r = raw::layout(
        &emu,
        &cfg,
        ids.view(),
        scratch.view_mut(),
        out(&mut short, &mut counts, &mut row_map, &mut m_indices, &mut status),
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    assert_eq!(short.as_slice(), &[0; 4]);
    // A corrupt row map: rows past the output are skipped by permute and combine.
    let x = EmuBuffer::from_host(&emu, &random_bf16(3 * 128, 1)).unwrap();
    let bad_map = EmuBuffer::from_host(&emu, &[0i32, 1 << 20, -7, 19, 2, 1 << 30]).unwrap();
    let mut out8 = EmuBuffer::<u8>::zeros(&emu, 20 * 128).unwrap();
    let mut sc = EmuBuffer::<f32>::zeros(&emu, 20).unwrap();
    let act = raw::ActOut { data: out8.view_mut(), scales: Some(sc.view_mut()), format: ActFormat::FP8 };
    raw::permute(
        &emu,
        &cfg.with_padding(Padding::Skip),
        x.view(),
        128,
        bad_map.view(),
        offsets.view(),
        counts.view(),
        20,
        act,
    )
    .unwrap();
    let y = EmuBuffer::from_host(&emu, &random_bf16(20 * 128, 2)).unwrap();
    let mut o = EmuBuffer::<bf16>::zeros(&emu, 3 * 128).unwrap();
    raw::combine(&emu, y.view(), 128, bad_map.view(), 2, None, o.view_mut()).unwrap();
    // Mismatched FP8 arguments are typed errors.
    let mut q = EmuBuffer::<u8>::zeros(&emu, 3 * 128).unwrap();
    let mut qs = EmuBuffer::<f32>::zeros(&emu, 3).unwrap();
    let act = raw::ActOut { data: q.view_mut(), scales: None, format: ActFormat::FP8 };
    let r = raw::quantize(&emu, x.view(), 128, act);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    let act = raw::ActOut { data: q.view_mut(), scales: Some(qs.view_mut()), format: ActFormat::FP8 };
    let r = raw::quantize(&emu, x.view(), 100, act);
    assert!(matches!(r, Err(Error::Alignment { .. })), "{r:?}");
    let act = raw::ActOut { data: q.view_mut(), scales: Some(qs.view_mut()), format: ActFormat::FP8 };
    raw::quantize(&emu, x.view(), 128, act).unwrap();
    assert!(qs.as_slice().iter().all(|&s| s > 0.0));
}

/// Every compile-time combine variant (k = 1, 2, 4, 6, 8, 16) and every top_k that runs on the
/// next larger one with masked slots (3, 5, 7, 9..15), weighted and not, equals the reference
/// bit for bit. The values span 2^-12..2^20 with both signs, so a different summation order
/// shows in the BF16 result; rows -1 and past the end are skipped, and a NaN weight on a skipped
/// slot must not reach the sum.
#[test]
fn emu_combine_variants_match_reference_for_every_top_k() {
    let Some(emu) = emulator_or_skip("emu_combine_variants", &[&DISPATCH], BlockOrder::Shuffled(3)) else { return };
    let (tokens, rows) = (13usize, 40usize);
    let mut rng = StdRng::seed_from_u64(16);
    for k in 1..=16usize {
        // 300 chunks of 8 columns: a partial batch of U chunks per lane for every variant.
        let hidden = if matches!(k, 1 | 3 | 16) { 2400 } else { 8 };
        let y: Vec<bf16> = (0..rows * hidden)
            .map(|_| {
                let mag = 2f32.powf(rng.gen_range(-12.0..20.0));
                bf16::from_f32(if rng.gen() { mag } else { -mag })
            })
            .collect();
        let map: Vec<i32> = (0..tokens * k)
            .map(|_| if rng.gen_range(0..6) == 0 { -1 } else { rng.gen_range(0..rows as i32 + 5) })
            .collect();
        let w: Vec<f32> = map
            .iter()
            .map(|&r| if r < 0 || r as usize >= rows { f32::NAN } else { rng.gen_range(-4.0f32..4.0) })
            .collect();
        let yb = EmuBuffer::from_host(&emu, &y).unwrap();
        let mb = EmuBuffer::from_host(&emu, &map).unwrap();
        let wb = EmuBuffer::from_host(&emu, &w).unwrap();
        for weighted in [false, true] {
            let want = moekit_dispatch::reference::combine(&y, hidden, &map, k, weighted.then_some(&w[..])).unwrap();
            let mut out = EmuBuffer::<bf16>::zeros(&emu, tokens * hidden).unwrap();
            let wv = weighted.then(|| wb.view());
            raw::combine(&emu, yb.view(), hidden, mb.view(), k, wv, out.view_mut()).unwrap();
            if let Some(i) = (0..want.len()).find(|&i| out.as_slice()[i].to_bits() != want[i].to_bits()) {
                panic!(
                    "k = {k} ({}), weighted {weighted}: token {} column {}: {:#06x} vs {:#06x}",
                    raw::combine_kernel(k),
                    i / hidden,
                    i % hidden,
                    out.as_slice()[i].to_bits(),
                    want[i].to_bits()
                );
            }
        }
    }
    let names: Vec<&str> = (1..=16).map(raw::combine_kernel).collect();
    assert_eq!(names[2], "moekit_combine_k4", "k = 3 runs on the k = 4 variant, one slot masked");
    assert_eq!(names[8], "moekit_combine_k16");
}

/// Layouts of a single decode token and of T = 65536 (512 chunks: 16 per warp of the chunk
/// scan) equal the reference: counts, offsets, row map, m_indices, status.
#[test]
fn emu_layout_single_token_and_65536_tokens_match_reference() {
    let Some(emu) = emulator_or_skip("emu_layout_t1_t65536", &[&DISPATCH], BlockOrder::Reversed) else { return };
    let dev = Device::Emulated(emu);
    for (tokens, k, experts, align, seed) in [(1usize, 8usize, 256usize, 128usize, 3u64), (65536, 8, 256, 128, 4)] {
        let ids = random_ids(tokens, k, experts, seed);
        let cfg = DispatchConfig::new(experts, k).with_align(align);
        let run = |d: &Device| {
            let it = Tensor::from_slice(&ids, &[tokens, k], d).unwrap();
            layout_parts(&moekit_dispatch::dispatch_layout(&it, &cfg, None).unwrap())
        };
        let (want, got) = (run(&Device::Cpu), run(&dev));
        for (i, name) in ["offsets", "counts", "row_map", "m_indices", "status"].iter().enumerate() {
            assert!(got[i] == want[i], "T = {tokens}: {name} differs");
        }
        assert_eq!(want[1].iter().sum::<i32>() as usize, ids.iter().filter(|&&i| i >= 0).count());
    }
}

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

/// Dispatch, combine and their backwards on `dev` equal the CPU reference bit for bit.
fn dispatch_matches_reference(dev: &Device, big: bool) {
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
                if padding == Padding::Skip && fi != 1 {
                    continue;
                }
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
                if padding == Padding::Zero {
                    if let Some(i) = (0..gd.len()).find(|&i| gd[i] != wd[i]) {
                        panic!(
                            "{ctx}: permuted byte {i} (row {}): {} vs {}",
                            i / (hidden * format.elem_bytes()),
                            gd[i],
                            wd[i]
                        );
                    }
                    assert_eq!(gs, ws, "{ctx}: scales");
                } else {
                    // Skipped padding: compare routed rows only.
                    let m = want_l.m_indices.to_vec::<i32>().unwrap();
                    for r in (0..m.len()).filter(|&r| m[r] >= 0) {
                        assert_eq!(
                            &gd[r * hidden..(r + 1) * hidden],
                            &wd[r * hidden..(r + 1) * hidden],
                            "{ctx}: row {r}"
                        );
                    }
                }
                let (gd2, _) = bytes(&on(dev).1);
                assert!(padding == Padding::Skip || gd2 == gd, "{ctx}: not deterministic");

                if fi != 0 {
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

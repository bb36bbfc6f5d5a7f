//! The same outcome on every device: every tensor op, given misaligned views or random bad
//! input (bad shapes and dtypes, ids out of range, bad bounds, bad configurations), returns the
//! same `Result` variant (Ok, or the same `Error` variant) on the CPU and on the emulator, and
//! never panics or faults. Misaligned raw pointers are typed errors before any launch.

use moekit_cuda::testing::emulator_or_skip;
use moekit_cuda::{BlockOrder, EmuBuffer, Error};
use moekit_dispatch::kernels::DISPATCH;
use moekit_dispatch::raw::{self, ActOut};
use moekit_dispatch::{
    combine, combine_backward, dispatch, dispatch_layout, permute, quantize_fp8, swiglu, swiglu_backward, ActFormat,
    DispatchConfig, DispatchLayout, Padding, ScaleKind, ScaleLayout,
};
use moekit_dtype::bf16;
use moekit_tensor::{DType, Device, Tensor};
use proptest::prelude::*;
use std::mem::{discriminant, Discriminant};

/// Ok, or which error.
type Outcome = std::result::Result<(), Discriminant<Error>>;

fn outcome<T>(r: &moekit_cuda::Result<T>) -> Outcome {
    r.as_ref().map(|_| ()).map_err(discriminant)
}

fn values(n: usize, seed: u32) -> Vec<bf16> {
    (0..n).map(|i| bf16::from_f32((((i as u32 ^ seed).wrapping_mul(2654435761) >> 22) as f32 - 512.0) / 64.0)).collect()
}

/// A BF16 tensor `dims` holding `v`, whose first element lies `shift` elements past the start
/// of its storage (a 1-D view narrowed and reshaped: `2 shift` bytes past a 16-byte boundary).
fn view(v: &[bf16], dims: &[usize], shift: usize, dev: &Device) -> Tensor {
    let mut padded = vec![bf16::ZERO; shift];
    padded.extend_from_slice(v);
    let t = Tensor::from_slice(&padded, &[padded.len()], dev).unwrap();
    t.narrow(0, shift, v.len()).unwrap().reshape(dims).unwrap()
}

fn is_alignment<T: std::fmt::Debug>(r: moekit_cuda::Result<T>) -> bool {
    matches!(r, Err(Error::Alignment { .. }))
}

/// Every op with a misaligned BF16 input (1 or 4 elements: 2 or 8 bytes past 16) is an
/// `Error::Alignment` on the CPU and on the emulator; 8 elements (16 bytes) is aligned and gives
/// the aligned result.
#[test]
fn emu_misaligned_views_are_alignment_errors_on_every_device() {
    let Some(emu) = emulator_or_skip("emu_misaligned_views", &[&DISPATCH], BlockOrder::InOrder) else { return };
    let (t, h, k, e) = (5usize, 128usize, 2usize, 4usize);
    let ids: Vec<i32> = vec![0, 1, 2, -1, 3, 3, 1, 0, 2, 2];
    let (x, dout) = (values(t * h, 1), values(t * h, 2));
    let cfg = DispatchConfig::new(e, k).with_align(16);
    let weights: Vec<f32> = (0..t * k).map(|i| i as f32 / 8.0).collect();
    for dev in [Device::Cpu, Device::Emulated(emu.clone())] {
        let it = Tensor::from_slice(&ids, &[t, k], &dev).unwrap();
        let l = dispatch_layout(&it, &cfg, None).unwrap();
        let rows = l.max_rows();
        let y = values(rows * h, 3);
        let w = Tensor::from_slice(&weights, &[t, k], &dev).unwrap();
        let name = dev.name();
        for shift in [1usize, 4] {
            let xs = view(&x, &[t, h], shift, &dev);
            let ys = view(&y, &[rows, h], shift, &dev);
            let gs = view(&dout, &[t, h], shift, &dev);
            let half = view(&x[..t * h / 2], &[t, h / 2], shift, &dev);
            let (ya, ga) = (view(&y, &[rows, h], 0, &dev), view(&dout, &[t, h], 0, &dev));
            let ctx = format!("{name}, {shift} elements off");
            assert!(is_alignment(dispatch(&xs, &it, &cfg, ActFormat::FP8)), "{ctx}: dispatch");
            assert!(is_alignment(permute(&xs, &l, ActFormat::Bf16)), "{ctx}: permute");
            assert!(is_alignment(quantize_fp8(&xs, ScaleKind::F32, ScaleLayout::MnMajor)), "{ctx}: quantize");
            assert!(
                is_alignment(swiglu(&view(&x[..t / 2 * 2 * h], &[t / 2, 2 * h], shift, &dev), ActFormat::Bf16)),
                "{ctx}: swiglu"
            );
            let x2 = view(&x, &[t, h], 0, &dev);
            assert!(
                is_alignment(swiglu_backward(&xs, &view(&x[..t * h / 2], &[t, h / 2], 0, &dev))),
                "{ctx}: swiglu bwd x"
            );
            assert!(is_alignment(swiglu_backward(&x2, &half)), "{ctx}: swiglu bwd grad");
            assert!(is_alignment(combine(&ys, &l, Some(&w))), "{ctx}: combine");
            assert!(is_alignment(combine_backward(&ys, &ga, &l, Some(&w))), "{ctx}: combine bwd y");
            assert!(is_alignment(combine_backward(&ya, &gs, &l, None)), "{ctx}: combine bwd grad");
        }
        // 8 elements = 16 bytes: aligned, and the same result as a fresh tensor.
        let shifted = permute(&view(&x, &[t, h], 8, &dev), &l, ActFormat::Bf16).unwrap().data.to_vec::<bf16>().unwrap();
        let fresh = permute(&view(&x, &[t, h], 0, &dev), &l, ActFormat::Bf16).unwrap().data.to_vec::<bf16>().unwrap();
        let m = l.m_indices.to_vec::<i32>().unwrap();
        for r in (0..rows).filter(|&r| m[r] >= 0) {
            assert_eq!(shifted[r * h..(r + 1) * h], fresh[r * h..(r + 1) * h], "{name}: row {r}");
        }
        let ys = view(&y, &[rows, h], 8, &dev);
        let (a, b) =
            (combine(&ys, &l, Some(&w)).unwrap(), combine(&view(&y, &[rows, h], 0, &dev), &l, Some(&w)).unwrap());
        assert_eq!(a.to_vec::<bf16>().unwrap(), b.to_vec::<bf16>().unwrap(), "{name}: combine of a 16-byte view");
    }
}

/// The raw launchers check the alignment of every vector-accessed pointer before launching:
/// a typed error, and the output untouched.
#[test]
fn emu_raw_launchers_reject_misaligned_pointers() {
    let Some(emu) = emulator_or_skip("emu_raw_misaligned", &[&DISPATCH], BlockOrder::InOrder) else { return };
    let (t, h, k) = (3usize, 128usize, 2usize);
    let cfg = DispatchConfig::new(4, k).with_align(16).with_padding(Padding::Zero);
    let x = EmuBuffer::from_host(&emu, &values(t * h + 8, 4)).unwrap();
    let map = EmuBuffer::from_host(&emu, &[0i32, 16, 1, -1, 32, 2]).unwrap();
    let offsets = EmuBuffer::from_host(&emu, &[0i32, 16, 32, 48, 48]).unwrap();
    let counts = EmuBuffer::from_host(&emu, &[3i32, 1, 1, 0]).unwrap();
    let rows = 48usize;
    let mut out = EmuBuffer::<u8>::zeros(&emu, rows * h * 2 + 16).unwrap();
    let mut scales = EmuBuffer::<f32>::zeros(&emu, rows).unwrap();
    let fp8 = ActFormat::FP8;
    let xa = || x.slice(0, t * h).unwrap();
    let xm = || x.slice(1, t * h).unwrap();
    // x 2 bytes off, then out 8 bytes off (FP8).
    let act = ActOut { data: out.slice_mut(0, rows * h).unwrap(), scales: Some(scales.view_mut()), format: fp8 };
    let r = raw::permute(&emu, &cfg, xm(), h, map.view(), offsets.view(), counts.view(), rows, act);
    assert!(is_alignment(r), "permute x");
    let act = ActOut { data: out.slice_mut(8, rows * h).unwrap(), scales: Some(scales.view_mut()), format: fp8 };
    let r = raw::permute(&emu, &cfg, xa(), h, map.view(), offsets.view(), counts.view(), rows, act);
    assert!(is_alignment(r), "permute out");
    let act =
        ActOut { data: out.slice_mut(8, t * h).unwrap(), scales: Some(scales.slice_mut(0, t).unwrap()), format: fp8 };
    assert!(is_alignment(raw::quantize(&emu, xa(), h, act)), "quantize out");
    let act =
        ActOut { data: out.slice_mut(0, t * h).unwrap(), scales: Some(scales.slice_mut(0, t).unwrap()), format: fp8 };
    assert!(is_alignment(raw::quantize(&emu, xm(), h, act)), "quantize x");
    let act = ActOut { data: out.slice_mut(2, t * h).unwrap(), scales: None, format: ActFormat::Bf16 };
    assert!(is_alignment(raw::swiglu(&emu, x.slice(0, t * h).unwrap(), h / 2, act)), "swiglu out");
    let y = EmuBuffer::from_host(&emu, &values(rows * h + 8, 5)).unwrap();
    let mut o = EmuBuffer::<bf16>::zeros(&emu, t * h + 8).unwrap();
    let r = raw::combine(&emu, y.slice(1, rows * h).unwrap(), h, map.view(), k, None, o.slice_mut(0, t * h).unwrap());
    assert!(is_alignment(r), "combine y");
    let r = raw::combine(&emu, y.slice(0, rows * h).unwrap(), h, map.view(), k, None, o.slice_mut(4, t * h).unwrap());
    assert!(is_alignment(r), "combine out");
    let mut gy = EmuBuffer::<bf16>::zeros(&emu, rows * h + 8).unwrap();
    let g = x.slice(0, t * h).unwrap();
    let r = raw::combine_backward(
        &emu,
        y.slice(0, rows * h).unwrap(),
        h,
        map.view(),
        k,
        None,
        offsets.view(),
        counts.view(),
        g,
        gy.slice_mut(1, rows * h).unwrap(),
        None,
    );
    assert!(is_alignment(r), "combine backward grad_y");
    let mut gx = EmuBuffer::<bf16>::zeros(&emu, t * h + 8).unwrap();
    let r = raw::swiglu_backward(&emu, xa(), x.slice(3, t * h / 2).unwrap(), gx.slice_mut(0, t * h).unwrap(), h / 2);
    assert!(is_alignment(r), "swiglu backward grad_out");
    assert!(out.as_slice().iter().all(|&b| b == 0) && scales.as_slice().iter().all(|&s| s == 0.0), "untouched");
    assert!(o.as_slice().iter().chain(gy.as_slice()).chain(gx.as_slice()).all(|v| v.to_bits() == 0), "untouched");
}

/// A random, often invalid, use of every op.
#[derive(Debug, Clone)]
struct Case {
    tokens: usize,
    top_k: usize,
    experts: usize,
    align: usize,
    hidden: usize,
    /// Columns of the ids tensor (top_k, or a wrong count).
    id_cols: usize,
    ids: Vec<i32>,
    ids_f32: bool,
    x_f32: bool,
    /// Elements past a 16-byte boundary of x, y, grad_out.
    shifts: [usize; 3],
    /// Rows of y past (or short of) the layout's rows.
    y_extra: i64,
    /// 0: weights [T, k] F32; 1: none; 2: [T, k + 1]; 3: I32.
    weights: u8,
    format: u8,
    zero_padding: bool,
    rows: Option<usize>,
}

fn case() -> impl Strategy<Value = Case> {
    // Each kind of bad input in a few percent of the cases, so most cases reach every op.
    let dims = (
        0usize..5,
        prop_oneof![12 => 1usize..=4, 1 => Just(0usize), 1 => Just(17usize), 1 => Just(16usize)],
        prop_oneof![12 => 1usize..=6, 1 => Just(0usize), 1 => Just(1025usize)],
        prop_oneof![12 => prop::sample::select(vec![1usize, 16, 128]), 1 => Just(8usize)],
        prop_oneof![6 => Just(128usize), 3 => Just(256usize), 1 => prop::sample::select(vec![8usize, 0, 100, 136])],
        prop_oneof![14 => Just(0i64), 1 => Just(1i64), 1 => Just(-1i64)],
    );
    let flags = (
        prop::collection::vec(
            prop_oneof![24 => Just(0usize), 1 => Just(1usize), 1 => Just(4usize), 1 => Just(8usize)],
            3,
        ),
        prop_oneof![15 => Just(false), 1 => Just(true)],
        prop_oneof![15 => Just(false), 1 => Just(true)],
        prop_oneof![5 => Just(0u8), 1 => 1u8..4],
        0u8..3,
        any::<bool>(),
        prop_oneof![6 => Just(None), 1 => (0usize..40).prop_map(Some)],
    );
    (dims, flags, any::<u64>()).prop_map(
        |(
            (tokens, top_k, experts, align, hidden, id_delta),
            (shifts, ids_f32, x_f32, weights, format, zero, rows),
            seed,
        )| {
            let id_cols = if id_delta != 0 && top_k > 0 { (top_k as i64 + id_delta) as usize } else { top_k };
            // Mostly valid ids, some -1, some outside [-1, E).
            let mut s = seed;
            let ids = (0..tokens * id_cols)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let v = (s >> 33) as i64;
                    match v % 10 {
                        0 => -1,
                        1 => -3 - (v % 5) as i32,
                        2 => experts as i32 + (v % 3) as i32,
                        _ => (v % experts.max(1) as i64) as i32,
                    }
                })
                .collect();
            Case {
                tokens,
                top_k,
                experts,
                align,
                hidden,
                id_cols,
                ids,
                ids_f32,
                x_f32,
                shifts: [shifts[0], shifts[1], shifts[2]],
                y_extra: if rows.is_some() { 0 } else { id_delta },
                weights,
                format,
                zero_padding: zero,
                rows,
            }
        },
    )
}

fn format_of(c: &Case) -> ActFormat {
    match c.format {
        0 => ActFormat::Bf16,
        1 => ActFormat::FP8,
        _ => ActFormat::Fp8(ScaleKind::Ue8m0, ScaleLayout::MnMajor),
    }
}

/// Runs every op of `c` on `dev`: the outcome of each, and the bits of the results whose
/// content is defined on every device (layout, combine, quantization).
fn run(c: &Case, dev: &Device) -> (Vec<Outcome>, Vec<Vec<u32>>) {
    let (t, h) = (c.tokens, c.hidden);
    let cfg = DispatchConfig {
        experts: c.experts,
        top_k: c.top_k,
        align: c.align,
        padding: if c.zero_padding { Padding::Zero } else { Padding::Skip },
    };
    let format = format_of(c);
    let ids = if c.ids_f32 {
        let f: Vec<f32> = c.ids.iter().map(|&i| i as f32).collect();
        Tensor::from_slice(&f, &[t, c.id_cols], dev).unwrap()
    } else {
        Tensor::from_slice(&c.ids, &[t, c.id_cols], dev).unwrap()
    };
    let x = if c.x_f32 {
        Tensor::zeros(&[t, h], DType::F32, dev).unwrap()
    } else {
        view(&values(t * h, 7), &[t, h], c.shifts[0], dev)
    };
    let grad = view(&values(t * h, 8), &[t, h], c.shifts[2], dev);
    let mut outcomes = vec![];
    let mut bits: Vec<Vec<u32>> = vec![];
    let mut bits_of = |t: &Tensor| match t.dtype() {
        DType::BF16 => bits.push(t.to_vec::<bf16>().unwrap().iter().map(|v| u32::from(v.to_bits())).collect()),
        DType::F32 => bits.push(t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()),
        DType::I32 => bits.push(t.to_vec::<i32>().unwrap().iter().map(|&v| v as u32).collect()),
        _ => bits.push(vec![t.size_in_bytes() as u32]),
    };

    let layout = dispatch_layout(&ids, &cfg, c.rows);
    outcomes.push(outcome(&layout));
    outcomes.push(outcome(&dispatch(&x, &ids, &cfg, format)));
    let q = quantize_fp8(&x, ScaleKind::F32, ScaleLayout::MnMajor);
    outcomes.push(outcome(&q));
    if let Ok(q) = &q {
        bits_of(&q.data);
        bits_of(q.scales.as_ref().unwrap());
    }
    let s = swiglu(&x, format);
    outcomes.push(outcome(&s));
    if let Ok(s) = &s {
        bits_of(&s.data);
    }
    let half = view(&values(t * (h / 2), 9), &[t, h / 2], c.shifts[2], dev);
    outcomes.push(outcome(&swiglu_backward(&x, &half)));
    if let Ok(l) = &layout {
        for p in [&l.offsets, &l.counts, &l.row_map, &l.m_indices, &l.status] {
            bits_of(p);
        }
        outcomes.push(outcome(&l.check()));
        outcomes.push(outcome(&permute(&x, l, format)));
        let rows = (l.max_rows() as i64 + c.y_extra).max(0) as usize;
        let y = view(&values(rows * h, 10), &[rows, h], c.shifts[1], dev);
        let k = c.top_k;
        let w = match c.weights {
            0 => Some(Tensor::from_slice(&vec![0.5f32; t * k], &[t, k], dev).unwrap()),
            1 => None,
            2 => Some(Tensor::from_slice(&vec![0.5f32; t * (k + 1)], &[t, k + 1], dev).unwrap()),
            _ => Some(Tensor::from_slice(&vec![1i32; t * k], &[t, k], dev).unwrap()),
        };
        let out = combine(&y, l, w.as_ref());
        outcomes.push(outcome(&out));
        if let Ok(o) = &out {
            bits_of(o);
        }
        let back = combine_backward(&y, &grad, l, w.as_ref());
        outcomes.push(outcome(&back));
        if let Ok((gy, gw)) = &back {
            bits_of(gy);
            if let Some(gw) = gw {
                bits_of(gw);
            }
        }
    }
    (outcomes, bits)
}

fn emulated() -> Option<Device> {
    emulator_or_skip("emu_bad_inputs_same_outcome", &[&DISPATCH], BlockOrder::Shuffled(9)).map(Device::Emulated)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random bad inputs: the same outcome per op on the CPU and the emulator, and the same
    /// bits where both succeed (layouts, combine and its backward, quantization, SwiGLU).
    #[test]
    fn emu_bad_inputs_give_the_same_outcome_on_cpu_and_emulator(c in case()) {
        let Some(dev) = emulated() else { return Ok(()) };
        let (want, want_bits) = run(&c, &Device::Cpu);
        let (got, got_bits) = run(&c, &dev);
        prop_assert_eq!(&got, &want, "outcomes per op (CPU second)");
        prop_assert!(got_bits == want_bits, "results differ");
    }
}

/// The layout returned for a bad id or too small a bound is Ok on every device, and its check
/// reports the same error (the device cannot see the ids without a synchronisation).
#[test]
fn emu_layout_errors_are_reported_by_check_on_every_device() {
    let Some(dev) = emulated() else { return };
    let cfg = DispatchConfig::new(4, 2).with_align(16);
    for (ids, rows, want) in [
        (vec![0i32, 4, 1, -1], None, "InvalidArgument"),
        (vec![0i32, -9, 1, 2], None, "InvalidArgument"),
        (vec![0i32, 1, 2, 3], Some(40), "Shape"),
        (vec![0i32, 1, 2, 3], Some(64), "ok"),
    ] {
        for d in [&Device::Cpu, &dev] {
            let l: DispatchLayout =
                dispatch_layout(&Tensor::from_slice(&ids, &[2, 2], d).unwrap(), &cfg, rows).unwrap();
            let got = match l.check() {
                Ok(()) => "ok",
                Err(Error::InvalidArgument(_)) => "InvalidArgument",
                Err(Error::Shape(_)) => "Shape",
                Err(e) => panic!("{e}"),
            };
            assert_eq!(got, want, "{} {ids:?} rows {rows:?}", d.name());
        }
    }
}

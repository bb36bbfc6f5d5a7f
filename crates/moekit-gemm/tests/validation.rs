//! The same outcome on every device: each grouped GEMM op validates its inputs once, before it
//! chooses the device, so the CPU reference and the emulated kernel give the same `Result`
//! variant for every input (and, when both succeed, the same numbers). Inputs a new user may
//! get wrong: mixed operand dtypes, `masked_m` past `M_max`, overlapping or out-of-range
//! k-grouped offsets, `m_indices` ids out of range, misaligned views (`narrow` by one
//! element), wrong scale lengths; then the same through random bad inputs (proptest).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer};
use moekit_dtype::{bf16, F8E4M3};
use moekit_gemm::kernels::GEMM_PORTABLE;
use moekit_gemm::raw::{self, Operand};
use moekit_gemm::{
    dgrad, k_grouped, k_grouped_accumulate, m_grouped_contiguous, m_grouped_masked, reference, Error, GemmInput,
    Result, ScaleLayout, Shape,
};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};
use proptest::prelude::*;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s % 2001) as f32 / 1000.0 - 1.0).to_f32()
        })
        .collect()
}

/// `data` as a `dims` tensor on `dev`, starting `shift` elements into its storage (a view made
/// with `narrow`, misaligned for any `shift` that is not a multiple of 16 bytes).
fn tensor<T: moekit_tensor::Element>(data: &[T], dims: &[usize], shift: usize, dev: &Device) -> Tensor {
    let mut all = data[..shift.min(data.len())].to_vec();
    all.resize(shift, data.first().copied().unwrap_or(T::zeroed()));
    all.extend_from_slice(data);
    Tensor::from_slice(&all, &[all.len()], dev).unwrap().narrow(0, shift, data.len()).unwrap().reshape(dims).unwrap()
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// E4M3 codes of small values (scales of 1/8..1 keep products well inside f32).
fn codes(n: usize, seed: u64) -> Vec<F8E4M3> {
    values(n, seed).into_iter().map(|v| F8E4M3::from_f32(v * 4.0)).collect()
}

fn scales(n: usize, seed: u64) -> Vec<f32> {
    values(n, seed).into_iter().map(|v| 0.125 + v.abs() / 2.0).collect()
}

/// The variant of a result: `Ok` or the error's variant name.
fn kind<T>(r: &Result<T>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("{e:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string(),
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        DType::BF16 => t.to_vec::<bf16>().unwrap().iter().map(|v| v.to_f32()).collect(),
        _ => t.to_vec::<f32>().unwrap(),
    }
}

/// CPU and device give the same variant; equal dims and `diff < 1e-5` (kernels.rs's tolerance
/// for the same inputs) when both succeed. Returns the variant.
fn agree(what: &str, cpu: Result<Tensor>, dev: Result<Tensor>) -> String {
    assert_eq!(kind(&cpu), kind(&dev), "{what}: CPU {cpu:?} but device {dev:?}");
    if let (Ok(c), Ok(d)) = (&cpu, &dev) {
        assert_eq!(c.dims(), d.dims(), "{what}");
        let (c, d) = (f32s(c), f32s(d));
        let diff = reference::diff(&c, &d);
        assert!(diff < 1e-5, "{what}: diff {diff:e}");
    }
    kind(&cpu)
}

fn emu(test: &str) -> Option<Device> {
    emulator_or_skip(test, &[&GEMM_PORTABLE], BlockOrder::Shuffled(5)).map(Device::Emulated)
}

/// An operand as host data, built on any device: BF16 or FP8 (with scales in `layout`).
#[derive(Debug, Clone)]
struct Input {
    dims: Vec<usize>,
    fp8: bool,
    scales: usize,
    layout: ScaleLayout,
    seed: u64,
    /// Elements the data view starts into its storage.
    shift: usize,
}

impl Input {
    fn bf16(dims: &[usize], seed: u64) -> Input {
        Input { dims: dims.to_vec(), fp8: false, scales: 0, layout: ScaleLayout::RowMajor, seed, shift: 0 }
    }
    fn fp8(dims: &[usize], scales: usize, seed: u64) -> Input {
        Input { dims: dims.to_vec(), fp8: true, scales, layout: ScaleLayout::RowMajor, seed, shift: 0 }
    }
    fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    /// (data, scales) tensors on `dev`.
    fn build(&self, dev: &Device) -> (Tensor, Option<Tensor>) {
        let n = self.numel();
        if self.fp8 {
            let s = scales(self.scales, self.seed ^ 9);
            (tensor(&codes(n, self.seed), &self.dims, self.shift, dev), Some(tensor(&s, &[s.len()], 0, dev)))
        } else {
            (tensor(&bf16s(&values(n, self.seed)), &self.dims, self.shift, dev), None)
        }
    }
}

fn gemm_input<'a>(t: &'a (Tensor, Option<Tensor>), layout: ScaleLayout) -> GemmInput<'a> {
    match &t.1 {
        Some(scales) => GemmInput::Fp8 { data: &t.0, scales, layout },
        None => GemmInput::Bf16(&t.0),
    }
}

/// One call of a tensor op, as host data.
#[derive(Debug, Clone)]
enum Call {
    Contiguous { a: Input, b: Input, ids: Vec<i32> },
    Masked { a: Input, b: Input, masked_m: Option<Vec<i32>> },
    KGrouped { a: Input, b: Input, offsets: Vec<i32>, accumulate: Option<Vec<usize>> },
    Dgrad { dy: Input, w: Input, ids: Vec<i32> },
}

impl Call {
    fn run(&self, dev: &Device) -> Result<Tensor> {
        self.run_with(dev, false)
    }
    /// Runs on `dev`; `ids_f32`: the ids tensor has the wrong dtype (F32).
    fn run_with(&self, dev: &Device, ids_f32: bool) -> Result<Tensor> {
        let ids = |v: &[i32]| {
            if ids_f32 {
                tensor(&v.iter().map(|&x| x as f32).collect::<Vec<_>>(), &[v.len()], 0, dev)
            } else {
                tensor(v, &[v.len()], 0, dev)
            }
        };
        match self {
            Call::Contiguous { a, b, ids: mi } => {
                let (ta, tb) = (a.build(dev), b.build(dev));
                m_grouped_contiguous(gemm_input(&ta, a.layout), gemm_input(&tb, b.layout), &ids(mi))
            }
            Call::Masked { a, b, masked_m } => {
                let (ta, tb) = (a.build(dev), b.build(dev));
                let mm = masked_m.as_deref().map(ids);
                m_grouped_masked(gemm_input(&ta, a.layout), gemm_input(&tb, b.layout), mm.as_ref())
            }
            Call::KGrouped { a, b, offsets, accumulate } => {
                let (ta, tb) = (a.build(dev), b.build(dev));
                let (ga, gb) = (gemm_input(&ta, a.layout), gemm_input(&tb, b.layout));
                match accumulate {
                    None => k_grouped(ga, gb, &ids(offsets)),
                    Some(dims) => {
                        let n = dims.iter().product();
                        let mut out = tensor(&values(n, 77), dims, 0, dev);
                        k_grouped_accumulate(&mut out, ga, gb, &ids(offsets)).map(|()| out)
                    }
                }
            }
            Call::Dgrad { dy, w, ids: mi } => {
                let (ta, tb) = (dy.build(dev), w.build(dev));
                dgrad(gemm_input(&ta, dy.layout), gemm_input(&tb, w.layout), &ids(mi))
            }
        }
    }
    /// Runs on the CPU and on `dev`; both must agree (see [`agree`]). Returns the variant.
    fn agree(&self, dev: &Device) -> String {
        agree(&format!("{self:?}"), self.run(&Device::Cpu), self.run(dev))
    }
}

/// The report: A FP8 `[4, 136]` with 1x128 scales, B BF16 `[1, 8, 136]`: the CPU path
/// panicked (K = 136) or computed (K = 128) where the emulator gave a `Dtype` error.
#[test]
fn emu_mixed_operand_dtypes_are_a_dtype_error_on_every_device() {
    if let Some(dev) = emu("emu_mixed_operand_dtypes_are_a_dtype_error_on_every_device") {
        mixed_operand_dtypes_are_a_dtype_error_on_every_device(&dev);
    }
}

fn mixed_operand_dtypes_are_a_dtype_error_on_every_device(dev: &Device) {
    for k in [136, 128, 256] {
        let fp8_a = Input::fp8(&[4, k], 4 * (k / 128), 1);
        let calls = [
            Call::Contiguous { a: fp8_a.clone(), b: Input::bf16(&[1, 8, k], 2), ids: vec![0; 4] },
            Call::Contiguous { a: Input::bf16(&[4, k], 1), b: Input::fp8(&[1, 128, k], k / 128, 2), ids: vec![0; 4] },
            Call::Masked { a: Input::fp8(&[1, 4, k], 4 * (k / 128), 1), b: Input::bf16(&[1, 8, k], 2), masked_m: None },
            Call::Dgrad { dy: Input::bf16(&[4, 128], 1), w: Input::fp8(&[1, 128, k], k / 128, 2), ids: vec![0; 4] },
            Call::KGrouped {
                a: Input::fp8(&[8, 128], 8, 1),
                b: Input::bf16(&[128, k], 2),
                offsets: vec![0, 128],
                accumulate: None,
            },
        ];
        for c in calls {
            assert_eq!(c.agree(dev), "Dtype", "{c:?}");
        }
    }
}

/// `masked_m[g]` outside `[0, M_max]` is rejected (it was clamped); `M_max` itself is fine.
#[test]
fn emu_masked_m_out_of_range_is_rejected_on_every_device() {
    if let Some(dev) = emu("emu_masked_m_out_of_range_is_rejected_on_every_device") {
        masked_m_out_of_range_is_rejected_on_every_device(&dev);
    }
}

fn masked_m_out_of_range_is_rejected_on_every_device(dev: &Device) {
    let (a, b) = (Input::bf16(&[2, 5, 8], 1), Input::bf16(&[2, 8, 8], 2));
    for (mm, want) in [
        (vec![5, 0], "Ok"),
        (vec![3, 1], "Ok"),
        (vec![6, 0], "InvalidArgument"),
        (vec![0, -1], "InvalidArgument"),
        (vec![i32::MAX, i32::MIN], "InvalidArgument"),
    ] {
        let c = Call::Masked { a: a.clone(), b: b.clone(), masked_m: Some(mm) };
        assert_eq!(c.agree(dev), want, "{c:?}");
    }
}

/// k-grouped offsets must be non-decreasing within `[0, M]` (they were clamped, so overlapping
/// groups were silently summed twice).
#[test]
fn emu_k_grouped_offsets_out_of_order_or_range_are_rejected_on_every_device() {
    if let Some(dev) = emu("emu_k_grouped_offsets_out_of_order_or_range_are_rejected_on_every_device") {
        k_grouped_offsets_out_of_order_or_range_are_rejected_on_every_device(&dev);
    }
}

fn k_grouped_offsets_out_of_order_or_range_are_rejected_on_every_device(dev: &Device) {
    let (a, b) = (Input::bf16(&[10, 8], 1), Input::bf16(&[10, 16], 2));
    for (offsets, want) in [
        (vec![0, 3, 3, 10], "Ok"),
        (vec![2, 5, 7], "Ok"), // tokens outside every group are not summed
        (vec![0, 6, 4, 10], "InvalidArgument"),
        (vec![0, 11], "InvalidArgument"),
        (vec![-1, 4], "InvalidArgument"),
        (vec![0, 4, i32::MIN], "InvalidArgument"),
    ] {
        let groups = offsets.len() - 1;
        for accumulate in [None, Some(vec![groups, 8, 16])] {
            let c = Call::KGrouped { a: a.clone(), b: b.clone(), offsets: offsets.clone(), accumulate };
            assert_eq!(c.agree(dev), want, "{c:?}");
        }
    }
}

/// Ids outside `[0, G)` in `m_indices` are padding on every device: those rows stay zero.
#[test]
fn emu_m_indices_out_of_range_are_skipped_on_every_device() {
    if let Some(dev) = emu("emu_m_indices_out_of_range_are_skipped_on_every_device") {
        m_indices_out_of_range_are_skipped_on_every_device(&dev);
    }
}

fn m_indices_out_of_range_are_skipped_on_every_device(dev: &Device) {
    let ids = vec![0, 2, -5, 1, i32::MAX, -1, i32::MIN];
    let c = Call::Contiguous { a: Input::bf16(&[7, 16], 1), b: Input::bf16(&[2, 8, 16], 2), ids: ids.clone() };
    assert_eq!(c.agree(dev), "Ok");
    let d = f32s(&c.run(dev).unwrap());
    for (r, &g) in ids.iter().enumerate() {
        let zero = d[r * 8..(r + 1) * 8].iter().all(|&x| x == 0.0);
        assert_eq!(zero, !(0..2).contains(&g), "row {r} (id {g})");
    }
    let c = Call::Dgrad { dy: Input::bf16(&[7, 8], 3), w: Input::bf16(&[2, 8, 16], 4), ids };
    assert_eq!(c.agree(dev), "Ok");
}

/// A view that starts off a 16-byte boundary (`narrow` by one element) is an `Alignment` error
/// for every operand of every op, on every device; the same views at a 16-byte offset work.
#[test]
fn emu_misaligned_views_are_alignment_errors_on_every_device() {
    if let Some(dev) = emu("emu_misaligned_views_are_alignment_errors_on_every_device") {
        misaligned_views_are_alignment_errors_on_every_device(&dev);
    }
}

fn misaligned_views_are_alignment_errors_on_every_device(dev: &Device) {
    let shifted = |i: &Input, shift: usize| Input { shift, ..i.clone() };
    let (bf_a, bf_b) = (Input::bf16(&[6, 16], 1), Input::bf16(&[2, 8, 16], 2));
    let (f8_a, f8_b) = (Input::fp8(&[6, 128], 6, 1), Input::fp8(&[2, 128, 128], 2, 2));
    let ids = vec![0, 1, 1, -1, 0, 1];
    for (shift, want) in [(1, "Alignment"), (3, "Alignment"), (8, "Alignment"), (16, "Ok")] {
        for (a, b) in [(&bf_a, &bf_b), (&f8_a, &f8_b)] {
            // An FP8 element is one byte: 8 elements are misaligned too; BF16 8 are 16 bytes.
            let want = if !a.fp8 && shift == 8 { "Ok" } else { want };
            for (sa, sb) in [(shift, 0), (0, shift)] {
                let (a, b) = (shifted(a, sa), shifted(b, sb));
                let c = Call::Contiguous { a: a.clone(), b: b.clone(), ids: ids.clone() };
                assert_eq!(c.agree(dev), want, "{c:?}");
                let ma = Input { dims: vec![1, 6, a.dims[1]], ..a.clone() };
                let mb = Input { dims: vec![1, b.dims[1], b.dims[2]], scales: b.scales / 2, ..b.clone() };
                let mb = Input { seed: 3, ..mb };
                let c = Call::Masked { a: ma, b: mb, masked_m: Some(vec![4]) };
                assert_eq!(c.agree(dev), want, "{c:?}");
                let dy = Input { dims: vec![6, b.dims[1]], scales: if a.fp8 { 6 } else { 0 }, ..a.clone() };
                let c = Call::Dgrad { dy, w: b.clone(), ids: ids.clone() };
                assert_eq!(c.agree(dev), want, "{c:?}");
            }
        }
        // k-grouped: BF16 dY [m, n], X [m, k]; FP8 dY^T [n, m], X^T [k, m].
        let kg = [
            (Input::bf16(&[10, 8], 1), Input::bf16(&[10, 16], 2), vec![0, 4, 10], false),
            (Input::fp8(&[8, 128], 8, 1), Input::fp8(&[16, 128], 16, 2), vec![0, 100, 128], true),
        ];
        for (a, b, offsets, fp8) in kg {
            let want = if !fp8 && shift == 8 { "Ok" } else { want };
            for (sa, sb) in [(shift, 0), (0, shift)] {
                let groups = offsets.len() - 1;
                let (n, k) = if fp8 { (a.dims[0], b.dims[0]) } else { (a.dims[1], b.dims[1]) };
                for accumulate in [None, Some(vec![groups, n, k])] {
                    let (a, b) = (shifted(&a, sa), shifted(&b, sb));
                    let c = Call::KGrouped { a, b, offsets: offsets.clone(), accumulate };
                    assert_eq!(c.agree(dev), want, "{c:?}");
                }
            }
        }
    }
}

/// The same bodies on a GPU, where a misaligned access would kill the context: every outcome
/// is the CPU's.
#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_same_outcome_as_the_cpu() {
    let Some(_) = gpu_or_skip("gpu_same_outcome_as_the_cpu", &[&GEMM_PORTABLE]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    mixed_operand_dtypes_are_a_dtype_error_on_every_device(&dev);
    masked_m_out_of_range_is_rejected_on_every_device(&dev);
    k_grouped_offsets_out_of_order_or_range_are_rejected_on_every_device(&dev);
    m_indices_out_of_range_are_skipped_on_every_device(&dev);
    misaligned_views_are_alignment_errors_on_every_device(&dev);
    // The context is still usable.
    let c = Call::Contiguous { a: Input::bf16(&[4, 16], 1), b: Input::bf16(&[1, 8, 16], 2), ids: vec![0; 4] };
    assert_eq!(c.agree(&dev), "Ok");
}

/// The raw layer checks the alignment of every pointer before it launches (a misaligned
/// 16-byte `cp.async` or a misaligned 4-byte store is a sticky error that kills the caller's
/// context on a GPU); nothing is written.
#[test]
fn emu_raw_rejects_misaligned_pointers_before_launch() {
    let Some(Device::Emulated(emu)) = emu("emu_raw_rejects_misaligned_pointers_before_launch") else { return };
    let (m, n, k, g) = (4, 8, 16, 1);
    let a = EmuBuffer::from_host(&emu, &bf16s(&values(m * k + 8, 1))).unwrap();
    let b = EmuBuffer::from_host(&emu, &bf16s(&values(g * n * k + 8, 2))).unwrap();
    let ids = EmuBuffer::from_host(&emu, &[0i32; 4]).unwrap();
    let mut d = EmuBuffer::<bf16>::zeros(&emu, m * n + 8).unwrap();
    let shape = Shape { groups: g, m, n, k };
    // Views `off` elements in: the safe slicing API gives element-aligned pointers only.
    for (what, a_off, b_off, d_off) in [("A", 1, 0, 0), ("B", 0, 3, 0), ("D", 0, 0, 1)] {
        let dv = d.slice_mut(d_off, m * n).unwrap();
        let r = raw::m_grouped_contiguous(
            &emu,
            shape,
            Operand::Bf16(a.slice(a_off, m * k).unwrap()),
            ScaleLayout::RowMajor,
            Operand::Bf16(b.slice(b_off, g * n * k).unwrap()),
            ids.view(),
            dv,
        );
        assert!(matches!(r, Err(Error::Alignment { .. })), "{what}: {r:?}");
    }
    assert!(d.as_slice().iter().all(|v| v.to_f32() == 0.0), "nothing was written");
    // Aligned views of the same buffers work.
    let r = raw::m_grouped_contiguous(
        &emu,
        shape,
        Operand::Bf16(a.slice(8, m * k).unwrap()),
        ScaleLayout::RowMajor,
        Operand::Bf16(b.slice(8, g * n * k).unwrap()),
        ids.view(),
        d.slice_mut(8, m * n).unwrap(),
    );
    assert!(r.is_ok(), "{r:?}");
}

/// Tensors on two devices are an `InvalidArgument` error whichever device A is on.
#[test]
fn emu_operands_on_different_devices_are_rejected() {
    let Some(dev) = emu("emu_operands_on_different_devices_are_rejected") else { return };
    let (a, b) = (Input::bf16(&[4, 16], 1), Input::bf16(&[1, 8, 16], 2));
    for (da, db) in [(&Device::Cpu, &dev), (&dev, &Device::Cpu)] {
        let (ta, tb) = (a.build(da), b.build(db));
        let ids = tensor(&[0i32; 4], &[4], 0, da);
        let r = m_grouped_contiguous(GemmInput::Bf16(&ta.0), GemmInput::Bf16(&tb.0), &ids);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let ids = tensor(&[0i32; 4], &[4], 0, db);
        let tb = b.build(da);
        let r = m_grouped_contiguous(GemmInput::Bf16(&ta.0), GemmInput::Bf16(&tb.0), &ids);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
}

/// What a random case perturbs (each mostly off, so that about half the cases are valid).
#[derive(Debug, Clone)]
struct Knobs {
    op: u8,
    fp8: bool,
    mixed: bool,
    groups: usize,
    m: usize,
    n: usize,
    k: usize,
    mn_major: bool,
    /// 0: A's last dimension + 8, 1: A's rank + 1, 2: B's first dimension + 1, else none.
    bad_dim: u8,
    /// Added to A's scale count (FP8).
    scale_delta: i8,
    shift_a: usize,
    shift_b: usize,
    /// 0: valid ids, 1..: a kind of bad ids (per op).
    ids_mode: u8,
    ids_len_delta: i8,
    ids_f32: bool,
    accumulate: bool,
    seed: u64,
}

fn knobs() -> impl Strategy<Value = Knobs> {
    let pick = |v: Vec<usize>| prop::sample::select(v);
    // Indices into the size tables below: 3 and 4 are sizes the kernels do not take.
    let size = || pick(vec![0, 0, 0, 1, 1, 2, 2, 3, 4]);
    (
        (0u8..4, any::<bool>(), prop::bool::weighted(0.07), 1usize..4, pick(vec![0, 1, 5, 33, 64, 70, 128])),
        (
            size(),
            size(),
            prop::bool::weighted(0.2),
            0u8..24,
            prop::sample::select(vec![0i8, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 1]),
        ),
        (pick(vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 16]), pick(vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 16])),
        (0u8..8, prop::sample::select(vec![0i8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 1]), prop::bool::weighted(0.03)),
        (any::<bool>(), any::<u64>()),
    )
        .prop_map(
            |((op, fp8, mixed, groups, m), (ni, ki, mn_major, bad_dim, scale_delta), (sa, sb), ids, (acc, seed))| {
                // Mostly sizes the kernels take, some they do not.
                let (n, k) = if fp8 {
                    let s = [128, 128, 256, 64, 136];
                    (s[ni], s[ki])
                } else {
                    let s = [8, 16, 24, 12, 0];
                    (s[ni], s[ki])
                };
                let (ids_mode, ids_len_delta, ids_f32) = ids;
                Knobs {
                    op,
                    fp8,
                    mixed,
                    groups,
                    m,
                    n,
                    k,
                    mn_major,
                    bad_dim,
                    scale_delta,
                    shift_a: sa,
                    shift_b: sb,
                    ids_mode,
                    ids_len_delta,
                    ids_f32,
                    accumulate: acc,
                    seed,
                }
            },
        )
}

/// Values in `[lo, hi]` from `seed`.
fn ints(len: usize, lo: i64, hi: i64, seed: u64) -> Vec<i32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (lo + (s % (hi - lo + 1) as u64) as i64) as i32
        })
        .collect()
}

fn resize(mut v: Vec<i32>, delta: i8) -> Vec<i32> {
    match delta {
        1 => v.push(0),
        -1 => {
            v.pop();
        }
        _ => {}
    }
    v
}

impl Knobs {
    fn call(&self) -> Call {
        let Knobs { groups: g, n, k, .. } = *self;
        let layout = if self.mn_major { ScaleLayout::MnMajor } else { ScaleLayout::RowMajor };
        let kgrouped_fp8 = self.op == 2 && self.fp8;
        // k-grouped FP8 needs a token count that is a multiple of 128.
        let m = if kgrouped_fp8 && self.m % 128 != 0 && self.seed % 4 != 0 { 128 } else { self.m };
        let a_fp8 = self.fp8;
        let b_fp8 = self.fp8 ^ self.mixed;
        let operand = |dims: Vec<usize>, fp8: bool, scales: usize, seed: u64, shift: usize| Input {
            dims,
            fp8,
            scales: if fp8 { scales } else { 0 },
            layout,
            seed,
            shift,
        };
        let weights = g * (n / 128) * (k / 128);
        let (mut a, mut b) = match self.op {
            0 => (
                operand(vec![m, k], a_fp8, layout.len(m, k), 1, self.shift_a),
                operand(vec![g, n, k], b_fp8, weights, 2, self.shift_b),
            ),
            1 => (
                operand(vec![g, m, k], a_fp8, layout.len(g * m, k), 1, self.shift_a),
                operand(vec![g, n, k], b_fp8, weights, 2, self.shift_b),
            ),
            2 if self.fp8 => (
                operand(vec![n, m], a_fp8, n * (m / 128), 1, self.shift_a),
                operand(vec![k, m], b_fp8, k * (m / 128), 2, self.shift_b),
            ),
            2 => (operand(vec![m, n], a_fp8, 0, 1, self.shift_a), operand(vec![m, k], b_fp8, 0, 2, self.shift_b)),
            _ => (
                operand(vec![m, n], a_fp8, layout.len(m, n), 1, self.shift_a),
                operand(vec![g, n, k], b_fp8, weights, 2, self.shift_b),
            ),
        };
        if a.fp8 {
            a.scales = a.scales.saturating_add_signed(self.scale_delta as isize);
        }
        match self.bad_dim {
            0 => *a.dims.last_mut().unwrap() += 8,
            1 => a.dims.insert(0, 1),
            2 => b.dims[0] += 1,
            _ => {}
        }
        let (mode, seed, delta) = (self.ids_mode, self.seed, self.ids_len_delta);
        let (mi, gi) = (m as i64, g as i64);
        match self.op {
            0 | 3 => {
                // Ids in [-1, G) or, for bad modes, anywhere in [-3, G + 2].
                let ids = if mode < 5 { ints(m, -1, gi - 1, seed) } else { ints(m, -3, gi + 2, seed) };
                let ids = resize(ids, delta);
                if self.op == 0 {
                    Call::Contiguous { a, b, ids }
                } else {
                    Call::Dgrad { dy: a, w: b, ids }
                }
            }
            1 => {
                let masked_m = match mode {
                    0 => None,
                    1..=4 => Some(ints(g, 0, mi, seed)),
                    5 => Some(ints(g, mi + 1, mi + 3, seed)),
                    _ => Some(ints(g, -2, mi + 1, seed)),
                };
                Call::Masked { a, b, masked_m: masked_m.map(|v| resize(v, delta)) }
            }
            _ => {
                let mut offsets = ints(g + 1, 0, mi, seed);
                offsets.sort();
                match mode {
                    5 => offsets.reverse(), // overlapping (unless all equal)
                    6 => offsets[g] = m as i32 + 1,
                    7 => offsets[0] = -1,
                    _ => {}
                }
                let offsets = resize(offsets, delta);
                let (n_out, k_out) = if self.fp8 { (a.dims[0], b.dims[0]) } else { (a.dims[1], b.dims[1]) };
                let accumulate = self.accumulate.then(|| vec![offsets.len().saturating_sub(1), n_out, k_out]);
                Call::KGrouped { a, b, offsets, accumulate }
            }
        }
    }
}

proptest! {
    // 160 cases: about a quarter succeed (their numbers compared), the rest spread over every
    // error variant; ~5 s in a debug build.
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// Random inputs, good and bad (wrong shapes, dtypes, scale counts, misaligned views,
    /// `masked_m` past `M_max`, overlapping or out-of-range offsets, ids out of range), through
    /// every op on the CPU and the emulator: the same `Result` variant, the same numbers when
    /// both succeed, never a panic or a fault.
    #[test]
    fn emu_every_op_same_outcome_on_cpu_and_emulator(knobs in knobs()) {
        let Some(dev) = emu("emu_every_op_same_outcome_on_cpu_and_emulator") else { return Ok(()) };
        let call = knobs.call();
        let what = format!("{call:?}");
        agree(&what, call.run_with(&Device::Cpu, knobs.ids_f32), call.run_with(&dev, knobs.ids_f32));
    }
}

//! A step of tensor ops (routing, dispatch layout, permutation, grouped GEMMs forward and
//! weight gradient, combine) enqueues its work without a single host synchronisation point:
//! no synchronous allocation, memset, copy or stream synchronisation, no readback; the only
//! points are the final readbacks (`to_vec`). Counted with `moekit_cuda::SyncCounter` on the
//! emulation (CI: it counts the emulated readbacks, which is where a hidden readback in an op
//! shows) and on a GPU (every synchronising driver call); on a GPU the step is also captured
//! into a CUDA graph and replayed, bit for bit the eager result.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, SyncCounter};
use moekit_dispatch::{ActFormat, DispatchConfig, Padding};
use moekit_dtype::bf16;
use moekit_gating::{RouterConfig, ScoreFunc};
use moekit_gemm::GemmInput;
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

const TOKENS: usize = 24;
const EXPERTS: usize = 4;
const TOP_K: usize = 2;
const HIDDEN: usize = 32;
const OUT: usize = 16;

/// Deterministic pseudo-random values in [-1, 1) (never all zeros).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

struct Inputs {
    logits: Tensor,
    x: Tensor,
    w: Tensor,
}

fn inputs(dev: &Device, seed: u64) -> Inputs {
    Inputs {
        logits: Tensor::from_slice(&random(TOKENS * EXPERTS, seed), &[TOKENS, EXPERTS], dev).unwrap(),
        x: Tensor::from_slice(&bf16s(&random(TOKENS * HIDDEN, seed + 1)), &[TOKENS, HIDDEN], dev).unwrap(),
        w: Tensor::from_slice(&bf16s(&random(EXPERTS * OUT * HIDDEN, seed + 2)), &[EXPERTS, OUT, HIDDEN], dev).unwrap(),
    }
}

/// What the step produces: the combined output `[T, OUT]` BF16, the expert weight gradient
/// `[E, OUT, HIDDEN]` F32 (k-grouped over the dispatch offsets) and the routing counts `[E]`.
struct Outputs {
    out: Tensor,
    grad_w: Tensor,
    counts: Tensor,
    /// The k-grouped GEMM's operands and groups (for its error bound).
    y: Tensor,
    xs: Tensor,
    offsets: Tensor,
}

/// The step: enqueues everything, reads nothing back.
fn step(i: &Inputs) -> moekit_tensor::Result<Outputs> {
    let rcfg = RouterConfig::new(EXPERTS, TOP_K, ScoreFunc::Softmax).with_renormalize(true);
    let r = moekit_gating::route(&i.logits, None, &rcfg)?;
    let dcfg = DispatchConfig::new(EXPERTS, TOP_K).with_align(16).with_padding(Padding::Zero);
    let layout = moekit_dispatch::dispatch_layout(&r.topk_ids, &dcfg, None)?;
    let act = moekit_dispatch::permute(&i.x, &layout, ActFormat::Bf16)?;
    let y = moekit_gemm::m_grouped_contiguous(GemmInput::Bf16(&act.data), GemmInput::Bf16(&i.w), &layout.m_indices)?;
    let out = moekit_dispatch::combine(&y, &layout, Some(&r.topk_weights))?;
    // dW[e] = sum over expert e's rows of y^T x (a stand-in for dY^T X: same op, same offsets).
    let grad_w = moekit_gemm::k_grouped(GemmInput::Bf16(&y), GemmInput::Bf16(&act.data), &layout.offsets)?;
    Ok(Outputs { out, grad_w, counts: r.counts, y, xs: act.data, offsets: layout.offsets })
}

/// Runs the step between a counter's start and the readbacks; returns the read values.
fn step_is_sync_free(dev: &Device) -> (Vec<bf16>, Vec<f32>, Vec<i32>) {
    let i = inputs(dev, 7);
    // The k-grouped op's strict validation reads `offsets` back (a synchronisation per call);
    // a step whose offsets come from the dispatch layout turns it off.
    moekit_gemm::raw::set_readback_validation(false);
    let region = SyncCounter::start();
    let o = step(&i).unwrap();
    drop(i); // frees are stream-ordered too
    assert_eq!(region.count(), 0, "host synchronisation inside the step on {}: {:?}", dev.name(), region.calls());
    let read = (o.out.to_vec::<bf16>().unwrap(), o.grad_w.to_vec::<f32>().unwrap(), o.counts.to_vec::<i32>().unwrap());
    assert_eq!(region.count(), 3, "one point per readback on {}: {:?}", dev.name(), region.calls());
    moekit_gemm::raw::set_readback_validation(true);
    // With validation on, the k-grouped op reads its offsets back: one more point, on every
    // kernel device (the counter sees it on the emulation as on a GPU).
    let i = inputs(dev, 7);
    let before = SyncCounter::start();
    let again = step(&i).unwrap();
    assert_eq!(before.count(), 1, "the validating readback on {}: {:?}", dev.name(), before.calls());
    assert_eq!(again.grad_w.to_vec::<f32>().unwrap(), read.1, "validation changes nothing for valid offsets");
    read
}

#[test]
fn emu_step_has_no_host_synchronisation_until_the_readback() {
    let images =
        [&moekit_gating::kernels::GATING, &moekit_dispatch::kernels::DISPATCH, &moekit_gemm::kernels::GEMM_PORTABLE];
    let Some(emu) =
        emulator_or_skip("emu_step_has_no_host_synchronisation_until_the_readback", &images, BlockOrder::Reversed)
    else {
        return;
    };
    let (out, grad_w, counts) = step_is_sync_free(&Device::Emulated(emu));
    // The same step on the CPU reference: the emulation ran the real kernels, not nothing.
    let cpu = step(&inputs(&Device::Cpu, 7)).unwrap();
    assert_eq!(counts, cpu.counts.to_vec::<i32>().unwrap());
    assert_eq!(counts.iter().sum::<i32>() as usize, TOKENS * TOP_K);
    assert_eq!(out, cpu.out.to_vec::<bf16>().unwrap(), "combine of the GEMM output (bit-identical kernels)");
    assert_grad_close(&grad_w, &cpu);
}

/// The k-grouped kernel and the reference sum the same BF16 products in f32 in different
/// orders: each result is within `2 * gamma(L) * sum |y[t, n] x[t, h]|` of the other, with
/// `L` the group's length and `gamma(L) = L u / (1 - L u)`, `u = 2^-24` (the classic bound of
/// a recursive f32 sum, once per side; the products of BF16 values are exact in f32).
fn assert_grad_close(got: &[f32], cpu: &Outputs) {
    let (y, x, o) =
        (cpu.y.to_vec::<bf16>().unwrap(), cpu.xs.to_vec::<bf16>().unwrap(), cpu.offsets.to_vec::<i32>().unwrap());
    let want = cpu.grad_w.to_vec::<f32>().unwrap();
    let u = 2f64.powi(-24);
    for e in 0..EXPERTS {
        let rows = o[e] as usize..o[e + 1] as usize;
        let l = rows.len() as f64;
        let gamma = l * u / (1.0 - l * u);
        for n in 0..OUT {
            for h in 0..HIDDEN {
                let abs: f64 = rows.clone().map(|t| (y[t * OUT + n].to_f64() * x[t * HIDDEN + h].to_f64()).abs()).sum();
                let i = (e * OUT + n) * HIDDEN + h;
                let err = (got[i] as f64 - want[i] as f64).abs();
                assert!(
                    err <= 2.0 * gamma * abs,
                    "dW[{e}, {n}, {h}]: {} vs {} (bound {})",
                    got[i],
                    want[i],
                    2.0 * gamma * abs
                );
            }
        }
    }
}

#[test]
fn emu_graph_capture_is_unsupported_on_the_emulation() {
    let Some(emu) = emulator_or_skip("emu_graph_capture_is_unsupported_on_the_emulation", &[], BlockOrder::InOrder)
    else {
        return;
    };
    for dev in [Device::Emulated(emu), Device::Cpu] {
        assert!(matches!(dev.begin_capture(), Err(moekit_tensor::Error::Unsupported(_))));
        assert!(matches!(dev.end_capture(), Err(moekit_tensor::Error::Unsupported(_))));
    }
}

#[test]
fn emu_copy_from_and_copy_from_slice() {
    let Some(emu) = emulator_or_skip("emu_copy_from_and_copy_from_slice", &[], BlockOrder::InOrder) else { return };
    for dev in [Device::Emulated(emu), Device::Cpu] {
        copy_helpers(&dev);
    }
}

/// `copy_from` / `copy_from_slice`: whole tensors and views, typed errors.
fn copy_helpers(dev: &Device) {
    let src = Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], &[3, 2], dev).unwrap();
    let mut dst = Tensor::zeros(&[3, 2], DType::I32, dev).unwrap();
    dst.copy_from(&src).unwrap();
    assert_eq!(dst.to_vec::<i32>().unwrap(), vec![1, 2, 3, 4, 5, 6]);
    let mut row = dst.narrow(0, 1, 1).unwrap();
    drop(dst);
    row.copy_from_slice(&[9i32, 8]).unwrap();
    row.copy_from(&src.narrow(0, 2, 1).unwrap()).unwrap();
    assert_eq!(row.to_vec::<i32>().unwrap(), vec![5, 6]);
    assert!(matches!(row.copy_from_slice(&[1i32]), Err(moekit_tensor::Error::Shape(_))));
    assert!(matches!(row.copy_from_slice(&[1.0f32, 2.0]), Err(moekit_tensor::Error::Dtype { .. })));
    let shared = src.clone();
    let mut same = src.clone();
    assert!(matches!(same.copy_from(&shared), Err(moekit_tensor::Error::InvalidArgument(_))));
    let other = Tensor::zeros(&[2], DType::I32, &Device::Cpu).unwrap();
    if !dev.is_cpu() {
        let mut t = Tensor::zeros(&[2], DType::I32, dev).unwrap();
        assert!(matches!(t.copy_from(&other), Err(moekit_tensor::Error::InvalidArgument(_))));
        assert!(matches!(Tensor::concat_bytes(&[&other], dev), Err(moekit_tensor::Error::InvalidArgument(_))));
    }
    // concat_bytes: the bytes of every part (views included), in order, in one U8 tensor.
    let f = Tensor::from_slice(&[1.5f32, -2.0], &[2], dev).unwrap();
    let view = src.narrow(0, 1, 1).unwrap();
    let packed = Tensor::concat_bytes(&[&f.narrow(0, 1, 1).unwrap(), &view], dev).unwrap();
    let mut want = (-2.0f32).to_le_bytes().to_vec();
    want.extend([3i32, 4].iter().flat_map(|x| x.to_le_bytes()));
    assert_eq!((packed.dims(), packed.dtype()), (&[12usize][..], DType::U8));
    assert_eq!(packed.to_vec::<u8>().unwrap(), want);
}

fn gpu_device(test: &str) -> Option<Device> {
    let images =
        [&moekit_gating::kernels::GATING, &moekit_dispatch::kernels::DISPATCH, &moekit_gemm::kernels::GEMM_PORTABLE];
    gpu_or_skip(test, &images).map(|_| Device::Cuda(CudaDevice::new(0).expect("GPU present")))
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_step_has_no_host_synchronisation_until_the_readback() {
    let Some(dev) = gpu_device("gpu_step_has_no_host_synchronisation_until_the_readback") else { return };
    let (out, grad_w, counts) = step_is_sync_free(&dev);
    let cpu = step(&inputs(&Device::Cpu, 7)).unwrap();
    assert_eq!(counts, cpu.counts.to_vec::<i32>().unwrap());
    assert_eq!(out, cpu.out.to_vec::<bf16>().unwrap());
    assert_grad_close(&grad_w, &cpu);
    copy_helpers(&dev);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_captured_step_replays_the_eager_bits() {
    let Some(dev) = gpu_device("gpu_captured_step_replays_the_eager_bits") else { return };
    moekit_gemm::raw::set_readback_validation(false);
    let eager = |seed| {
        let o = step(&inputs(&dev, seed)).unwrap();
        (o.out.to_vec::<bf16>().unwrap(), o.grad_w.to_vec::<f32>().unwrap(), o.counts.to_vec::<i32>().unwrap())
    };
    let (e7, e8) = (eager(7), eager(8)); // also loads every module before the capture
                                         // Graph inputs and outputs live outside the capture.
    let mut i = inputs(&dev, 7);
    let mut out = Tensor::zeros(&[TOKENS, OUT], DType::BF16, &dev).unwrap();
    let mut grad_w = Tensor::zeros(&[EXPERTS, OUT, HIDDEN], DType::F32, &dev).unwrap();
    let mut counts = Tensor::zeros(&[EXPERTS], DType::I32, &dev).unwrap();
    let region = SyncCounter::start();
    dev.begin_capture().unwrap();
    let captured = (|| {
        let o = step(&i)?;
        out.copy_from(&o.out)?;
        grad_w.copy_from(&o.grad_w)?;
        counts.copy_from(&o.counts)
    })(); // every tensor allocated in the step is dropped here, inside the capture
    let graph = dev.end_capture();
    captured.unwrap();
    let graph = graph.unwrap();
    assert_eq!(region.count(), 0, "{:?}", region.calls());
    assert!(graph.node_count().unwrap() > 6, "kernels, memsets, copies and memory nodes");
    let exec = graph.instantiate().unwrap();
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let read = |out: &Tensor, grad_w: &Tensor, counts: &Tensor| {
        (out.to_vec::<bf16>().unwrap(), grad_w.to_vec::<f32>().unwrap(), counts.to_vec::<i32>().unwrap())
    };
    exec.launch(cuda.stream()).unwrap();
    assert!(read(&out, &grad_w, &counts) == e7, "replay = eager");
    // New inputs (uploaded outside the graph), replayed twice: the second input's bits.
    let next = inputs(&Device::Cpu, 8);
    i.logits.copy_from_slice(next.logits.cpu_slice::<f32>().unwrap()).unwrap();
    i.x.copy_from_slice(next.x.cpu_slice::<bf16>().unwrap()).unwrap();
    i.w.copy_from_slice(next.w.cpu_slice::<bf16>().unwrap()).unwrap();
    let replays = SyncCounter::start();
    exec.launch(cuda.stream()).unwrap();
    exec.launch(cuda.stream()).unwrap();
    assert_eq!(replays.count(), 0);
    assert!(read(&out, &grad_w, &counts) == e8, "replay on new inputs = eager");
    moekit_gemm::raw::set_readback_validation(true);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_validating_readback_inside_a_capture_is_a_capture_error() {
    let Some(dev) = gpu_device("gpu_validating_readback_inside_a_capture_is_a_capture_error") else { return };
    moekit_gemm::raw::set_readback_validation(true);
    let i = inputs(&dev, 7);
    drop(step(&i).unwrap()); // modules loaded
    dev.begin_capture().unwrap();
    let r = step(&i).map(|_| ());
    let end = dev.end_capture();
    assert!(matches!(r, Err(moekit_tensor::Error::Capture { .. })), "{r:?}");
    drop(end); // a graph of the step's first ops (the readback was refused), or an error
               // The stream works eagerly again.
    assert_eq!(step(&i).unwrap().counts.to_vec::<i32>().unwrap().iter().sum::<i32>() as usize, TOKENS * TOP_K);
}

/// With readback validation off, the grouped GEMM reads nothing back on a kernel device and
/// its kernels clamp invalid `masked_m` / `offsets` (the emulator's guard zones prove nothing
/// is accessed out of bounds): the result equals the op on the clamped values. The CPU still
/// rejects them (host memory: no synchronisation to save).
#[test]
fn emu_gemm_without_readback_validation_clamps_and_never_reads_back() {
    let Some(emu) = emulator_or_skip(
        "emu_gemm_without_readback_validation_clamps_and_never_reads_back",
        &[&moekit_gemm::kernels::GEMM_PORTABLE],
        BlockOrder::Shuffled(3),
    ) else {
        return;
    };
    let dev = Device::Emulated(emu);
    let t = |v: Vec<f32>, dims: &[usize], dev: &Device| Tensor::from_slice(&bf16s(&v), dims, dev).unwrap();
    let ids = |v: &[i32], dev: &Device| Tensor::from_slice(v, &[v.len()], dev).unwrap();
    let (a, b) = (t(random(2 * 8 * 16, 1), &[2, 8, 16], &dev), t(random(2 * 8 * 16, 2), &[2, 8, 16], &dev));
    let (dy, x) = (t(random(16 * 8, 3), &[16, 8], &dev), t(random(16 * 8, 4), &[16, 8], &dev));
    let masked =
        |mm: &[i32]| moekit_gemm::m_grouped_masked(GemmInput::Bf16(&a), GemmInput::Bf16(&b), Some(&ids(mm, &dev)));
    let kgrouped = |o: &[i32]| moekit_gemm::k_grouped(GemmInput::Bf16(&dy), GemmInput::Bf16(&x), &ids(o, &dev));
    let clamped_masked = masked(&[3, 8]).unwrap().to_vec::<bf16>().unwrap();
    let clamped_k = kgrouped(&[0, 5, 16]).unwrap().to_vec::<f32>().unwrap();
    assert!(matches!(masked(&[3, 99]), Err(moekit_tensor::Error::InvalidArgument(_))), "validated by default");
    assert!(matches!(kgrouped(&[0, 5, 40]), Err(moekit_tensor::Error::InvalidArgument(_))));

    moekit_gemm::raw::set_readback_validation(false);
    let region = SyncCounter::start();
    let d = masked(&[3, 99]).unwrap();
    let g = kgrouped(&[0, 5, 40]).unwrap();
    assert_eq!(region.count(), 0, "{:?}", region.calls());
    assert_eq!(d.to_vec::<bf16>().unwrap(), clamped_masked);
    assert_eq!(g.to_vec::<f32>().unwrap(), clamped_k);
    let cpu = Device::Cpu;
    let (ca, cb) = (t(random(2 * 8 * 16, 1), &[2, 8, 16], &cpu), t(random(2 * 8 * 16, 2), &[2, 8, 16], &cpu));
    let r = moekit_gemm::m_grouped_masked(GemmInput::Bf16(&ca), GemmInput::Bf16(&cb), Some(&ids(&[3, 99], &cpu)));
    assert!(matches!(r, Err(moekit_tensor::Error::InvalidArgument(_))), "the CPU still validates");
    moekit_gemm::raw::set_readback_validation(true);
}

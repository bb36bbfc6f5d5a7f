//! The optimizer kernels against the CPU reference (bit for bit), the reference against
//! moekit-model's AdamW, errors and the NaN policy on every device. Emulated tests (`emu_*`)
//! run in CI; `gpu_*` in the GPU bundle.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer, Emulator, Error};
use moekit_dtype::bf16;
use moekit_optim::kernels::OPTIM;
use moekit_optim::{ops, raw, reference, OptimConfig, StepInfo, DEFAULT_CHUNK};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Lengths of the issue: not multiples of the chunk or the vector width, one empty tensor.
const LENS: &[usize] = &[1, 3, 1000, 0, 4097, 5, 130, 64];

/// Random, never zero: magnitudes in [0.01, 1) times `scale`, random signs.
fn values(n: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = rng.gen_range(0.01f32..1.0) * scale;
            if rng.gen_bool(0.5) {
                -x
            } else {
                x
            }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn emu(test: &str, order: BlockOrder) -> Option<Device> {
    emulator_or_skip(test, &[&OPTIM], order).map(Device::Emulated)
}

/// Parameters, gradients (gradient scale `gscale`) and decay flags for `lens`.
struct Problem {
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<Vec<f32>>>, // per step
    decays: Vec<bool>,
}

fn problem(lens: &[usize], steps: usize, gscale: f32, seed: u64) -> Problem {
    let mut rng = StdRng::seed_from_u64(seed);
    Problem {
        params: lens.iter().map(|&n| values(n, 0.5, &mut rng)).collect(),
        grads: (0..steps).map(|_| lens.iter().map(|&n| values(n, gscale, &mut rng)).collect()).collect(),
        decays: (0..lens.len()).map(|i| i % 2 == 0).collect(),
    }
}

fn tensors(data: &[Vec<f32>], dev: &Device) -> Vec<Tensor> {
    data.iter().map(|d| Tensor::from_slice(d, &[d.len()], dev).unwrap()).collect()
}

/// After each step: params, m, v and bf16 copies as bits, and the step's info.
type Trace = Vec<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u16>>, StepInfo)>;

fn run(pb: &Problem, cfg: &OptimConfig, chunk: usize, lr: &[Option<f32>], dev: &Device) -> Trace {
    let mut params = tensors(&pb.params, dev);
    let mut outs: Vec<Tensor> =
        pb.params.iter().map(|p| Tensor::empty(&[p.len()], DType::BF16, dev).unwrap()).collect();
    let mut opt = ops::AdamW::with_chunk(cfg.clone(), &params, &pb.decays, chunk).unwrap();
    let mut trace = Vec::new();
    for (s, g) in pb.grads.iter().enumerate() {
        let grads = tensors(g, dev);
        opt.step(&mut params, &grads, Some(&mut outs), lr[s % lr.len()]).unwrap();
        let (m, v) = opt.moments();
        let f = |ts: &[Tensor]| ts.iter().map(|t| bits(&t.to_vec::<f32>().unwrap())).collect::<Vec<_>>();
        let b = outs.iter().map(|t| t.to_vec::<bf16>().unwrap().iter().map(|x| x.to_bits()).collect()).collect();
        trace.push((f(&params), f(m), f(v), b, opt.info().unwrap()));
    }
    trace
}

fn cfg(clip_norm: f32) -> OptimConfig {
    OptimConfig { warmup_steps: 2, total_steps: 5, clip_norm, ..Default::default() }
}

#[test]
fn emu_grad_norm_bit_identical_to_reference() {
    let Some(dev) = emu("emu_grad_norm_bit_identical_to_reference", BlockOrder::Shuffled(7)) else { return };
    let mut rng = StdRng::seed_from_u64(1);
    let lists: Vec<Vec<usize>> = vec![LENS.to_vec(), vec![4097], vec![1], vec![0, 0], vec![], vec![3000, 17, 2048]];
    for lens in &lists {
        let gs: Vec<Vec<f32>> = lens.iter().map(|&n| values(n, 3.0, &mut rng)).collect();
        let refs: Vec<&[f32]> = gs.iter().map(|g| g.as_slice()).collect();
        for chunk in [4, 64, 1024, DEFAULT_CHUNK] {
            if chunk == 4 && lens.iter().sum::<usize>() > 2000 {
                continue; // thousands of 1-vector blocks: slow in the emulation, nothing new
            }
            let want = reference::grad_norm(&refs, chunk).unwrap();
            let cpu = ops::grad_norm(&tensors(&gs, &Device::Cpu), chunk).unwrap();
            let got = ops::grad_norm(&tensors(&gs, &dev), chunk).unwrap();
            assert_eq!(want.to_bits(), cpu.to_bits(), "{lens:?} chunk {chunk}");
            assert_eq!(want.to_bits(), got.to_bits(), "{lens:?} chunk {chunk}: {want} vs {got}");
            // A wrong order would still be close: make sure the value itself is right.
            let exact: f64 = gs.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            assert!((want as f64 - exact).abs() <= exact * 1e-7, "{want} vs {exact}");
        }
    }
}

/// The reference's norm against the model's (sequential f64 sum): both f64 sums are within
/// n * 2^-53 relative of the exact sum (~1e-12 here), so the f32 norms can differ only when
/// the exact value lies that close to an f32 rounding boundary; for these seeded inputs they are
/// equal, which the test asserts (a 1-ulp difference would be legitimate for other inputs, a
/// larger one never).
#[test]
fn reference_norm_matches_model() {
    for seed in 0..20 {
        let pb = problem(LENS, 1, 2.0, 100 + seed);
        let params = moekit_model::Params {
            names: (0..LENS.len()).map(|i| format!("t{i}")).collect(),
            shapes: LENS.iter().map(|&n| vec![n]).collect(),
            data: pb.grads[0].clone(),
        };
        let model = moekit_model::optim::grad_norm(&params);
        let refs: Vec<&[f32]> = pb.grads[0].iter().map(|g| g.as_slice()).collect();
        for chunk in [64, DEFAULT_CHUNK] {
            let ours = reference::grad_norm(&refs, chunk).unwrap();
            assert!(model.to_bits().abs_diff(ours.to_bits()) <= 1, "seed {seed}: {model} vs {ours}");
            assert_eq!(model.to_bits(), ours.to_bits(), "seed {seed} chunk {chunk}");
        }
    }
}

/// Per step: the model's params, m, v (bits), norm and lr.
type ModelTrace = Vec<(Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u32>>, f32, f32)>;

/// Runs moekit-model's AdamW on the same problem; its trace of params, m, v.
fn model_run(pb: &Problem, cfg: &OptimConfig, shapes: &[Vec<usize>]) -> ModelTrace {
    let mcfg = moekit_model::AdamWConfig {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.total_steps,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        clip_norm: cfg.clip_norm,
    };
    let mk = |data: Vec<Vec<f32>>| moekit_model::Params {
        names: (0..shapes.len()).map(|i| format!("t{i}")).collect(),
        shapes: shapes.to_vec(),
        data,
    };
    let mut params = mk(pb.params.clone());
    let mut opt = moekit_model::AdamW::new(mcfg, &params).unwrap();
    let mut out = Vec::new();
    for g in &pb.grads {
        let info = opt.step(&mut params, &mk(g.clone())).unwrap();
        let f = |p: &moekit_model::Params| p.data.iter().map(|d| bits(d)).collect::<Vec<_>>();
        out.push((f(&params), f(&opt.m), f(&opt.v), info.grad_norm, info.lr));
    }
    out
}

/// The reference (ops on `Device::Cpu`) against moekit-model's AdamW, bit for bit: params, m,
/// v, norm and lr over 7 steps (warmup, cosine, past the end of the schedule), with clipping
/// active (gradient norm ~20 > 1) and inactive (clip_norm 0, and clip_norm above the norm).
/// The model decays rank >= 2 tensors: the shapes here make the even ones matrices.
#[test]
fn reference_matches_model_adamw_bit_for_bit() {
    let lens = [6usize, 3, 1000, 0, 4098, 5, 130, 64];
    let shapes: Vec<Vec<usize>> =
        lens.iter().enumerate().map(|(i, &n)| if i % 2 == 0 { vec![2, n / 2] } else { vec![n] }).collect();
    for (clip, gscale) in [(1.0f32, 0.5f32), (0.0, 0.5), (1e4, 0.5), (1.0, 1e-3)] {
        let pb = problem(&lens, 7, gscale, 5);
        let model = model_run(&pb, &cfg(clip), &shapes);
        let ours = run(&pb, &cfg(clip), DEFAULT_CHUNK, &[None], &Device::Cpu);
        for (s, (m, o)) in model.iter().zip(&ours).enumerate() {
            assert_eq!(m.3.to_bits(), o.4.grad_norm.to_bits(), "clip {clip} step {s}: norm");
            assert_eq!(m.4.to_bits(), o.4.lr.to_bits(), "clip {clip} step {s}: lr");
            assert_eq!(m.0, o.0, "clip {clip} step {s}: params");
            assert_eq!(m.1, o.1, "clip {clip} step {s}: m");
            assert_eq!(m.2, o.2, "clip {clip} step {s}: v");
            assert_eq!(o.4.step, s as u64 + 1);
            if clip == 1.0 && gscale == 0.5 {
                assert!(o.4.clip < 1.0, "clipping must be active here");
            } else {
                assert_eq!(o.4.clip, 1.0, "clipping must be inactive here");
            }
        }
    }
}

/// Emulated steps against the CPU reference, bit for bit (weights, moments, BF16 copies, every
/// scalar), for chunk sizes that split tensors into many chunks and none, clipping on and off,
/// lr from the device table and as an argument, and three block orders.
#[test]
fn emu_adamw_bit_identical_to_reference() {
    let pb = problem(LENS, 3, 0.5, 9);
    for (order, chunk, clip, lr) in [
        (BlockOrder::InOrder, 64, 1.0f32, vec![None]),
        (BlockOrder::Reversed, 1024, 0.0, vec![Some(3e-3), None]),
        (BlockOrder::Shuffled(3), DEFAULT_CHUNK, 100.0, vec![None, Some(1e-2)]),
    ] {
        let Some(dev) = emu("emu_adamw_bit_identical_to_reference", order) else { return };
        let want = run(&pb, &cfg(clip), chunk, &lr, &Device::Cpu);
        let got = run(&pb, &cfg(clip), chunk, &lr, &dev);
        for (s, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.4, g.4, "chunk {chunk} step {s}: scalars");
            assert_eq!(w.0, g.0, "chunk {chunk} step {s}: params");
            assert_eq!(w.1, g.1, "chunk {chunk} step {s}: m");
            assert_eq!(w.2, g.2, "chunk {chunk} step {s}: v");
            assert_eq!(w.3, g.3, "chunk {chunk} step {s}: bf16");
        }
        assert_eq!(want.last().unwrap().4.step, 3);
    }
}

/// The same inputs twice on differently scheduled emulators: the same bits.
#[test]
fn emu_deterministic_across_runs_and_block_orders() {
    let pb = problem(&[4097, 1, 2000], 2, 1.0, 21);
    let Some(a) = emu("emu_deterministic_across_runs_and_block_orders", BlockOrder::Shuffled(1)) else { return };
    let b = Device::Emulated(Emulator::new().with_block_order(BlockOrder::Shuffled(99)).with_workers(3));
    let first = run(&pb, &cfg(1.0), 256, &[None], &a);
    assert_eq!(first, run(&pb, &cfg(1.0), 256, &[None], &a));
    assert_eq!(first, run(&pb, &cfg(1.0), 256, &[None], &b));
}

/// NaN policy (the model's): a non-finite gradient norm skips the whole update, leaves the
/// step count, weights and moments alone, and is reported; `step_checked` makes it an error.
#[test]
fn emu_nan_gradient_skips_the_update_like_the_model() {
    let Some(emu_dev) = emu("emu_nan_gradient_skips_the_update_like_the_model", BlockOrder::InOrder) else { return };
    let mut pb = problem(&[5, 1000], 3, 0.5, 13);
    pb.grads[1][1][617] = f32::NAN;
    let mut outcomes = Vec::new();
    for dev in [Device::Cpu, emu_dev] {
        let mut params = tensors(&pb.params, &dev);
        let mut opt = ops::AdamW::with_chunk(cfg(1.0), &params, &pb.decays, 64).unwrap();
        opt.step_checked(&mut params, &tensors(&pb.grads[0], &dev), None, None).unwrap();
        let before: Vec<Vec<f32>> = params.iter().map(|t| t.to_vec().unwrap()).collect();
        let err = opt.step_checked(&mut params, &tensors(&pb.grads[1], &dev), None, None).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let info = opt.info().unwrap();
        assert!(info.skipped && info.grad_norm.is_nan() && info.step == 1, "{info:?}");
        let after: Vec<Vec<f32>> = params.iter().map(|t| t.to_vec().unwrap()).collect();
        assert_eq!(
            before.iter().map(|v| bits(v)).collect::<Vec<_>>(),
            after.iter().map(|v| bits(v)).collect::<Vec<_>>()
        );
        // The next good step proceeds as step 2.
        let info = opt.step_checked(&mut params, &tensors(&pb.grads[2], &dev), None, None).unwrap();
        assert_eq!(info.step, 2);
        outcomes.push(params.iter().map(|t| bits(&t.to_vec::<f32>().unwrap())).collect::<Vec<_>>());
    }
    assert_eq!(outcomes[0], outcomes[1]);
    // The model errs on the same input and then takes its second step on the third gradient.
    let shapes: Vec<Vec<usize>> = vec![vec![5], vec![1000]];
    let mk = |data: Vec<Vec<f32>>| moekit_model::Params {
        names: vec!["a".into(), "b".into()],
        shapes: shapes.clone(),
        data,
    };
    let c = cfg(1.0);
    let mcfg = moekit_model::AdamWConfig {
        warmup_steps: c.warmup_steps,
        total_steps: c.total_steps,
        clip_norm: c.clip_norm,
        ..Default::default()
    };
    let mut mp = mk(pb.params.clone());
    let mut mo = moekit_model::AdamW::new(mcfg, &mp).unwrap();
    mo.step(&mut mp, &mk(pb.grads[0].clone())).unwrap();
    assert!(mo.step(&mut mp, &mk(pb.grads[1].clone())).is_err());
    assert_eq!(mo.step, 1);
    // Decay flags differ from the model's rule here (rank 1 tensors, flags [true, false]), so
    // only the outcome shape is compared, not the bits.
}

/// An infinite norm (finite gradients whose squares overflow f32 after the root: norm > f32::MAX)
/// is skipped too, like the model's `norm.is_finite()` on the f32 norm.
#[test]
fn emu_overflowing_norm_is_skipped() {
    let Some(dev) = emu("emu_overflowing_norm_is_skipped", BlockOrder::InOrder) else { return };
    let g = vec![vec![3e38f32, 3e38, -3e38]];
    for d in [Device::Cpu, dev] {
        let mut params = tensors(&[vec![1.0, 2.0, 3.0]], &d);
        let mut opt = ops::AdamW::new(cfg(1.0), &params, &[true]).unwrap();
        opt.step(&mut params, &tensors(&g, &d), None, None).unwrap();
        let info = opt.info().unwrap();
        assert!(info.skipped && info.grad_norm == f32::INFINITY && info.step == 0, "{info:?}");
        assert_eq!(params[0].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
    }
}

fn kind(e: &Error) -> std::mem::Discriminant<Error> {
    std::mem::discriminant(e)
}

/// Bad inputs give the same error variant on the CPU and in the emulation.
#[test]
fn emu_typed_errors_agree_across_devices() {
    let Some(emu_dev) = emu("emu_typed_errors_agree_across_devices", BlockOrder::InOrder) else { return };
    let mut per_device = Vec::new();
    for dev in [Device::Cpu, emu_dev] {
        let mut errs = Vec::new();
        let p = tensors(&[vec![0.5; 8], vec![0.25; 3]], &dev);
        let mut opt = ops::AdamW::new(cfg(1.0), &p, &[true, false]).unwrap();
        let mut params = p.clone();
        drop(p); // unshared storage
                 // Gradient of the wrong length.
        errs.push(opt.step(&mut params, &tensors(&[vec![0.1; 8], vec![0.1; 4]], &dev), None, None).unwrap_err());
        // Too few gradients.
        errs.push(opt.step(&mut params, &tensors(&[vec![0.1; 8]], &dev), None, None).unwrap_err());
        // Wrong dtype.
        let gi = vec![
            Tensor::from_slice(&[1i32; 8], &[8], &dev).unwrap(),
            Tensor::from_slice(&[1i32; 3], &[3], &dev).unwrap(),
        ];
        errs.push(opt.step(&mut params, &gi, None, None).unwrap_err());
        // A misaligned view (offset 4 bytes) as a gradient.
        let big = Tensor::from_slice(&[0.1f32; 9], &[9], &dev).unwrap();
        let g = vec![big.narrow(0, 1, 8).unwrap(), Tensor::from_slice(&[0.1f32; 3], &[3], &dev).unwrap()];
        errs.push(opt.step(&mut params, &g, None, None).unwrap_err());
        // Bad learning rate, bad chunk, bad config, no tensors, decay flag count.
        let good = tensors(&[vec![0.1; 8], vec![0.1; 3]], &dev);
        errs.push(opt.step(&mut params, &good, None, Some(f32::NAN)).unwrap_err());
        errs.push(ops::AdamW::with_chunk(cfg(1.0), &params, &[true, true], 6).unwrap_err());
        errs.push(ops::AdamW::new(OptimConfig { beta1: 1.0, ..cfg(1.0) }, &params, &[true, true]).unwrap_err());
        errs.push(ops::AdamW::new(cfg(1.0), &[], &[]).unwrap_err());
        errs.push(ops::AdamW::new(cfg(1.0), &params, &[true]).unwrap_err());
        // A shared parameter storage cannot be written.
        let alias = params[0].clone();
        errs.push(opt.step(&mut params, &good, None, None).unwrap_err());
        drop(alias);
        // Nothing was changed by any of them.
        opt.step(&mut params, &good, None, None).unwrap();
        assert_eq!(opt.info().unwrap().step, 1);
        per_device.push(errs);
    }
    let (cpu, emu) = (&per_device[0], &per_device[1]);
    for (i, (c, e)) in cpu.iter().zip(emu).enumerate() {
        assert_eq!(kind(c), kind(e), "case {i}: {c} vs {e}");
    }
    let want = ["Shape", "Shape", "Dtype", "Alignment", "InvalidArgument", "InvalidArgument"];
    for (i, w) in want.iter().enumerate() {
        assert!(format!("{:?}", cpu[i]).starts_with(w), "case {i}: {:?}", cpu[i]);
    }
}

/// The raw layer's own checks: buffer sizes, overlapping tensors, a norm-only table for AdamW.
#[test]
fn emu_raw_checks_buffers() {
    let Some(Device::Emulated(e)) = emu("emu_raw_checks_buffers", BlockOrder::InOrder) else { return };
    let mut p = EmuBuffer::from_host(&e, &[0.5f32; 40]).unwrap();
    let g = EmuBuffer::from_host(&e, &[0.1f32; 40]).unwrap();
    let mut m = EmuBuffer::<f32>::zeros(&e, 40).unwrap();
    let mut v = EmuBuffer::<f32>::zeros(&e, 40).unwrap();
    let cfg = cfg(1.0);
    // Overlap: the same moment buffer for m and v.
    let overlap = {
        // SAFETY: the two views alias on purpose; Table::for_update must refuse them before any launch.
        let (mm, vv) = unsafe {
            (
                moekit_cuda::DevPtrMut::<f32>::from_raw_in(m.view_mut().addr(), 40, moekit_cuda::MemSpace::Host),
                moekit_cuda::DevPtrMut::<f32>::from_raw_in(m.view_mut().addr(), 40, moekit_cuda::MemSpace::Host),
            )
        };
        let slots = [raw::Slot { p: p.view_mut(), g: g.view(), m: mm, v: vv, p_bf16: None, decay: true }];
        raw::Table::for_update(&slots, 64).unwrap_err()
    };
    assert!(matches!(overlap, Error::InvalidArgument(_)), "{overlap}");
    let slots =
        [raw::Slot { p: p.view_mut(), g: g.view(), m: m.view_mut(), v: v.view_mut(), p_bf16: None, decay: true }];
    let t = raw::Table::for_update(&slots, 16).unwrap();
    assert_eq!((t.len(), t.n_chunks()), (1, 3));
    let desc = EmuBuffer::from_host(&e, &t.to_bytes()).unwrap();
    let mut partials = EmuBuffer::<u8>::zeros(&e, 16).unwrap(); // 2 chunks' worth: too small
    let mut scalars = EmuBuffer::from_host(&e, &StepInfo::initial(0).to_bytes()).unwrap();
    let mut bufs = raw::Buffers { table: desc.view(), partials: partials.view_mut(), scalars: scalars.view_mut() };
    // SAFETY: the table's buffers are alive and unused elsewhere.
    let err = unsafe { raw::step(&e, &t, &mut bufs, &cfg, raw::Lr::Value(1e-3)) }.unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let norm_only = raw::Table::for_norm(&[g.view()], 16).unwrap();
    let mut partials = EmuBuffer::<u8>::zeros(&e, 24).unwrap();
    let mut bufs = raw::Buffers { table: desc.view(), partials: partials.view_mut(), scalars: scalars.view_mut() };
    // SAFETY: as above.
    let err = unsafe { raw::adamw(&e, &norm_only, &mut bufs, &cfg) }.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // SAFETY: as above; the right sizes now.
    unsafe { raw::step(&e, &t, &mut bufs, &cfg, raw::Lr::Value(1e-3)) }.unwrap();
    let info = StepInfo::from_bytes(scalars.as_slice()).unwrap();
    assert_eq!(info.step, 1);
    assert_eq!(info.grad_norm.to_bits(), reference::grad_norm(&[g.as_slice()], 16).unwrap().to_bits());
    assert!(p.as_slice().iter().all(|&x| x != 0.5), "every weight moved");
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_adamw_bit_identical_to_reference() {
    let Some(_gpu) = gpu_or_skip("gpu_adamw_bit_identical_to_reference", &[&OPTIM]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    let pb = problem(LENS, 3, 0.5, 9);
    for (chunk, clip, lr) in [(64, 1.0f32, vec![None]), (DEFAULT_CHUNK, 0.0, vec![Some(3e-3), None])] {
        let want = run(&pb, &cfg(clip), chunk, &lr, &Device::Cpu);
        let got = run(&pb, &cfg(clip), chunk, &lr, &dev);
        assert_eq!(want, got, "chunk {chunk}");
    }
    // A larger problem: 3 M parameters in 40 tensors.
    let mut rng = StdRng::seed_from_u64(4);
    let lens: Vec<usize> = (0..40).map(|_| rng.gen_range(1..150_000)).collect();
    let pb = problem(&lens, 2, 0.01, 10);
    assert_eq!(
        run(&pb, &cfg(1.0), DEFAULT_CHUNK, &[None], &Device::Cpu),
        run(&pb, &cfg(1.0), DEFAULT_CHUNK, &[None], &dev)
    );
}

/// The per-chunk f64 partial sums, bit for bit: the f32 norm alone could hide a wrong
/// summation order (f64 differences rarely survive the rounding to f32).
#[test]
fn emu_partials_bit_identical_to_reference() {
    let Some(Device::Emulated(e)) = emu("emu_partials_bit_identical_to_reference", BlockOrder::Reversed) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(77);
    // Partial last vectors owned by threads other than 0 (1027 = 256 vectors + 3 in a chunk
    // of 1024...), besides the lengths.
    let lens: Vec<usize> = LENS.iter().copied().chain([1027, 2045, 771, 4094, 1029 + 4096]).collect();
    let gs: Vec<Vec<f32>> = lens.iter().map(|&n| values(n, 3.0, &mut rng)).collect();
    let bufs: Vec<EmuBuffer<f32>> = gs.iter().map(|g| EmuBuffer::from_host(&e, g).unwrap()).collect();
    let refs: Vec<&[f32]> = gs.iter().map(|g| g.as_slice()).collect();
    for chunk in [64, 1028, 4096, DEFAULT_CHUNK] {
        let t = raw::Table::for_norm(&bufs.iter().map(|b| b.view()).collect::<Vec<_>>(), chunk).unwrap();
        let desc = EmuBuffer::from_host(&e, &t.to_bytes()).unwrap();
        let mut partials = EmuBuffer::<u8>::zeros(&e, t.partials_bytes()).unwrap();
        let mut scalars = EmuBuffer::from_host(&e, &StepInfo::initial(5).to_bytes()).unwrap();
        let mut b = raw::Buffers { table: desc.view(), partials: partials.view_mut(), scalars: scalars.view_mut() };
        // SAFETY: the gradient buffers are alive and only read.
        unsafe { raw::grad_norm(&e, &t, &mut b, &cfg(1.0), None) }.unwrap();
        let got: Vec<u64> = partials.as_slice().chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let want: Vec<u64> = reference::partials(&refs, chunk).unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "chunk {chunk}");
        let info = StepInfo::from_bytes(scalars.as_slice()).unwrap();
        assert_eq!(info.step, 5, "a norm without `advance` leaves the step alone");
        assert_eq!(info.grad_norm.to_bits(), reference::grad_norm(&refs, chunk).unwrap().to_bits());
    }
}

/// Outcome of one step on `dev`: the error variant, or the weights' bits and the scalars.
fn outcome(
    lens: &[usize],
    glens: &[usize],
    lr: Option<f32>,
    chunk: usize,
    dev: &Device,
) -> Result<(Vec<Vec<u32>>, StepInfo), std::mem::Discriminant<Error>> {
    let mut rng = StdRng::seed_from_u64(lens.len() as u64 * 31 + glens.iter().sum::<usize>() as u64);
    let p: Vec<Vec<f32>> = lens.iter().map(|&n| values(n, 0.5, &mut rng)).collect();
    let g: Vec<Vec<f32>> = glens.iter().map(|&n| values(n, 0.5, &mut rng)).collect();
    let mut params = tensors(&p, dev);
    let decays: Vec<bool> = (0..lens.len()).map(|i| i % 2 == 1).collect();
    let mut opt = ops::AdamW::with_chunk(cfg(1.0), &params, &decays, chunk).map_err(|e| kind(&e))?;
    opt.step(&mut params, &tensors(&g, dev), None, lr).map_err(|e| kind(&e))?;
    Ok((params.iter().map(|t| bits(&t.to_vec::<f32>().unwrap())).collect(), opt.info().unwrap()))
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Random (often bad) inputs: the CPU and the emulation give the same outcome, and the
    /// same bits when they succeed.
    #[test]
    fn emu_random_inputs_same_outcome_on_cpu_and_emulation(
        lens in proptest::collection::vec(0usize..40, 0..4),
        bump in proptest::option::of((0usize..4, 1usize..3)),
        drop_last in proptest::bool::ANY,
        lr in proptest::option::of(-1.0f32..1.0),
        chunk in proptest::sample::select(vec![4usize, 6, 8, 64, 0]),
    ) {
        let Some(dev) = emu("emu_random_inputs_same_outcome_on_cpu_and_emulation", BlockOrder::InOrder) else {
            return Ok(());
        };
        let mut glens = lens.clone();
        if let Some((i, d)) = bump {
            if let Some(l) = glens.get_mut(i) {
                *l += d;
            }
        }
        if drop_last && glens.len() > 1 {
            glens.pop();
        }
        let cpu = outcome(&lens, &glens, lr, chunk, &Device::Cpu);
        let emu = outcome(&lens, &glens, lr, chunk, &dev);
        proptest::prop_assert_eq!(cpu, emu);
    }
}

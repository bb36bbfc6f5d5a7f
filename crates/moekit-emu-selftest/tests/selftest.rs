//! The host emulation's semantics (barriers, warp intrinsics with full and partial masks,
//! atomics under contention, shared memory per block, block order) and proof that it catches
//! planted bugs. Correct kernels run on the GPU too (`gpu_*`, ignored without one).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, Emulator, Error};
use moekit_dtype::bf16;
use moekit_emu_selftest::kernels::EMU_SELFTEST;
use moekit_emu_selftest::run;
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

fn emu(test: &str, order: BlockOrder) -> Option<Emulator> {
    emulator_or_skip(test, &[&EMU_SELFTEST], order)
}

fn gpu(test: &str) -> Option<Device> {
    gpu_or_skip(test, &[&EMU_SELFTEST]).map(|_| Device::Cuda(CudaDevice::new(0).expect("GPU present")))
}

/// Deterministic pseudo-random values (never all zeros).
fn values(n: usize, seed: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        })
        .collect()
}

// ---- barriers -----------------------------------------------------------------------------------

fn block_sums(dev: &Device, kernel: &str, blocks: usize) -> (Vec<f32>, Vec<f32>) {
    let n = blocks * 256 - 17; // a partial last block
                               // Small integers: every partial sum is exact in f32, so any order gives the same bits.
    let x: Vec<f32> = values(n, 1).iter().map(|v| (v % 64) as f32).collect();
    let want: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
    let xt = Tensor::from_slice(&x, &[n], dev).unwrap();
    let mut out = Tensor::zeros(&[blocks], DType::F32, dev).unwrap();
    // SAFETY: (x: n floats, out: one float per block, n) as the kernel expects.
    unsafe {
        run(
            dev,
            kernel,
            blocks as u32,
            256,
            0,
            (xt.dev_ptr::<f32>().unwrap(), out.dev_ptr_mut::<f32>().unwrap(), n as i32),
        )
    }
    .unwrap();
    (out.to_vec::<f32>().unwrap(), want)
}

#[test]
fn emu_block_reduction_with_barriers() {
    let Some(e) = emu("emu_block_reduction_with_barriers", BlockOrder::Shuffled(3)) else { return };
    let (got, want) = block_sums(&Device::Emulated(e), "selftest_block_reduce", 64);
    assert_eq!(got, want);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_block_reduction_with_barriers() {
    let Some(d) = gpu("gpu_block_reduction_with_barriers") else { return };
    let (got, want) = block_sums(&d, "selftest_block_reduce", 64);
    assert_eq!(got, want);
}

#[test]
fn emu_catches_planted_missing_syncthreads() {
    let Some(e) = emu("emu_catches_planted_missing_syncthreads", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    // The correct kernel passes; the one without the barrier gives wrong sums, on every run.
    let (got, want) = block_sums(&dev, "selftest_block_reduce", 8);
    assert_eq!(got, want);
    for _ in 0..3 {
        let (got, want) = block_sums(&dev, "planted_reduce_missing_sync", 8);
        assert_ne!(got, want, "the emulation did not expose the missing __syncthreads");
    }
}

// ---- warp intrinsics ----------------------------------------------------------------------------

fn intrinsics_inputs(threads: usize) -> Vec<i32> {
    let mut v: Vec<i32> = values(threads, 9).iter().map(|x| (x >> 1) as i32).collect();
    v[5] = 0; // ffs/clz of zero
    v[40] = 12345; // __any_sync true in warp 1
    v[70] = -3; // __all_sync false in warp 2
    v
}

const ROW: usize = 19;

/// What each thread's outputs must be (CUDA Programming Guide and PTX `shfl.sync` semantics).
fn intrinsics_expected(input: &[i32]) -> Vec<i32> {
    let mut out = vec![0i32; input.len() * ROW];
    for (t, &v) in input.iter().enumerate() {
        let lane = t % 32;
        let base = t - lane;
        let w = &input[base..base + 32];
        let o = &mut out[t * ROW..t * ROW + ROW];
        o[0] = w[(lane * 7) % 32];
        o[1] = w[lane ^ 5];
        o[2] = if lane >= 3 { w[lane - 3] } else { v };
        o[3] = if lane + 3 < 32 { w[lane + 3] } else { v };
        o[4] = w[(lane & !7) + 2];
        o[5] = if lane % 4 + 1 < 4 { w[lane + 1] } else { v };
        o[6] = (0..32).filter(|&l| w[l] & 1 != 0).fold(0u32, |b, l| b | 1 << l) as i32;
        o[7] = w.contains(&12345) as i32;
        o[8] = w.iter().all(|&x| x >= 0) as i32;
        o[9] = (v as u32).count_ones() as i32;
        o[10] = if v == 0 { 0 } else { v.trailing_zeros() as i32 + 1 };
        o[11] = (v as u32).leading_zeros() as i32;
        if lane < 16 {
            o[12] = w[lane ^ 1];
            o[13] = (0..16).filter(|l| l % 3 == 0).fold(0u32, |b, l| b | 1 << l) as i32;
        } else {
            o[12] = w[31];
            o[13] = (16..32).filter(|l| l % 5 == 0).fold(0u32, |b, l| b | 1 << l) as i32;
        }
        o[14] = -1; // all 32 lanes active after __syncwarp
        o[15] = if lane % 2 == 0 { w[lane ^ 2] } else { -1 };
        o[16] = if lane >= 16 { w[lane - 16] } else { v };
        o[17] = if lane % 8 >= 2 { w[lane - 2] } else { v };
        o[18] = (0..32).filter(|&l| w[l] & 3 == v & 3).fold(0u32, |b, l| b | 1 << l) as i32;
    }
    out
}

fn check_intrinsics(dev: &Device) {
    let (blocks, threads) = (2usize, 128usize);
    let input = intrinsics_inputs(blocks * threads);
    let it = Tensor::from_slice(&input, &[input.len()], dev).unwrap();
    let mut out = Tensor::zeros(&[input.len() * ROW], DType::I32, dev).unwrap();
    // SAFETY: (in: one int per thread, out: ROW ints per thread).
    unsafe {
        run(
            dev,
            "selftest_warp_intrinsics",
            blocks as u32,
            threads as u32,
            0,
            (it.dev_ptr::<i32>().unwrap(), out.dev_ptr_mut::<i32>().unwrap()),
        )
    }
    .unwrap();
    let got = out.to_vec::<i32>().unwrap();
    let want = intrinsics_expected(&input);
    const NAMES: [&str; ROW] = [
        "shfl",
        "shfl_xor",
        "shfl_up",
        "shfl_down",
        "shfl w8",
        "shfl_down w4",
        "ballot",
        "any",
        "all",
        "popc",
        "ffs",
        "clz",
        "partial shfl",
        "partial ballot",
        "activemask",
        "inactive lanes",
        "shfl_xor w16",
        "shfl_up w8",
        "match_any",
    ];
    for i in 0..got.len() {
        assert_eq!(got[i], want[i], "thread {} {}: input {}", i / ROW, NAMES[i % ROW], input[i / ROW]);
    }
}

#[test]
fn emu_warp_intrinsics() {
    let Some(e) = emu("emu_warp_intrinsics", BlockOrder::InOrder) else { return };
    check_intrinsics(&Device::Emulated(e));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_warp_intrinsics() {
    let Some(d) = gpu("gpu_warp_intrinsics") else { return };
    check_intrinsics(&d);
}

fn check_exited_lane_in_mask(dev: &Device) {
    let mut out = Tensor::zeros(&[64], DType::I32, dev).unwrap();
    // SAFETY: out has one int per thread.
    unsafe { run(dev, "selftest_exited_lane_in_mask", 1, 64, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) }.unwrap();
    let got = out.to_vec::<i32>().unwrap();
    for (t, &g) in got.iter().enumerate() {
        match t % 32 {
            0..=13 => assert_eq!(g, ((t ^ 1) * 10) as i32, "thread {t}"),
            14 => {} // its partner exited: the value is unspecified
            15 => assert_eq!(g, -1),
            _ => assert_eq!(g, (t * 10) as i32, "thread {t}"),
        }
    }
}

#[test]
fn emu_exited_lane_in_a_partial_mask() {
    let Some(e) = emu("emu_exited_lane_in_a_partial_mask", BlockOrder::InOrder) else { return };
    check_exited_lane_in_mask(&Device::Emulated(e));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_exited_lane_in_a_partial_mask() {
    let Some(d) = gpu("gpu_exited_lane_in_a_partial_mask") else { return };
    check_exited_lane_in_mask(&d);
}

// ---- PTX wrappers: cp.async, ldmatrix, mma.sync ---------------------------------------------

/// Runs `selftest_mma_bf16`; returns (d, reference d in f64, sum of |terms| per element).
fn mma(dev: &Device, small_ints: bool, seed: u32) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let gen = |n: usize, s: u32| -> Vec<f32> {
        values(n, s)
            .iter()
            .map(|v| if small_ints { (v % 17) as f32 - 8.0 } else { (v % 20001) as f32 / 1000.0 - 10.0 })
            .collect()
    };
    let to_bf16 = |x: &[f32]| -> Vec<bf16> { x.iter().map(|v| bf16::from_bits((v.to_bits() >> 16) as u16)).collect() };
    let (a, bt, c) = (to_bf16(&gen(256, seed)), to_bf16(&gen(128, seed + 1)), gen(128, seed + 2));
    let f = |b: bf16| b.to_f32() as f64;
    let (mut want, mut mag) = (vec![0f64; 128], vec![0f64; 128]);
    for r in 0..16 {
        for n in 0..8 {
            want[r * 8 + n] = c[r * 8 + n] as f64;
            mag[r * 8 + n] = (c[r * 8 + n] as f64).abs();
            for k in 0..16 {
                want[r * 8 + n] += f(a[r * 16 + k]) * f(bt[n * 16 + k]);
                mag[r * 8 + n] += (f(a[r * 16 + k]) * f(bt[n * 16 + k])).abs();
            }
        }
    }
    let at = Tensor::from_slice(&a, &[256], dev).unwrap();
    let btt = Tensor::from_slice(&bt, &[128], dev).unwrap();
    let ct = Tensor::from_slice(&c, &[128], dev).unwrap();
    let mut d = Tensor::zeros(&[128], DType::F32, dev).unwrap();
    let args = (
        at.dev_ptr::<bf16>().unwrap(),
        btt.dev_ptr::<bf16>().unwrap(),
        ct.dev_ptr::<f32>().unwrap(),
        d.dev_ptr_mut::<f32>().unwrap(),
    );
    // SAFETY: a 256, bt 128, c 128, d 128 elements, 256-byte aligned (cp.async needs 16).
    unsafe { run(dev, "selftest_mma_bf16", 1, 32, 0, args) }.unwrap();
    (d.to_vec::<f32>().unwrap(), want, mag)
}

fn check_mma(dev: &Device) {
    // Small integers: every partial sum is exact, so any summation order gives the same bits.
    let (got, want, _) = mma(dev, true, 21);
    for i in 0..128 {
        assert_eq!(got[i] as f64, want[i], "d[{}][{}]", i / 8, i % 8);
    }
    // Reals: within f32 rounding of a 17-term sum (tensor cores may sum in any order).
    let (got, want, mag) = mma(dev, false, 33);
    for i in 0..128 {
        let tol = 17.0 * f32::EPSILON as f64 * mag[i];
        assert!((got[i] as f64 - want[i]).abs() <= tol, "d[{}][{}] = {} vs {}", i / 8, i % 8, got[i], want[i]);
    }
}

#[test]
fn emu_ptx_wrappers_mma_ldmatrix_cp_async() {
    let Some(e) = emu("emu_ptx_wrappers_mma_ldmatrix_cp_async", BlockOrder::InOrder) else { return };
    check_mma(&Device::Emulated(e));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_ptx_wrappers_mma_ldmatrix_cp_async() {
    let Some(d) = gpu("gpu_ptx_wrappers_mma_ldmatrix_cp_async") else { return };
    check_mma(&d);
}

// ---- spin-waits -------------------------------------------------------------------------------------

fn check_spin_wait(dev: &Device) {
    let mut out = Tensor::zeros(&[1], DType::I32, dev).unwrap();
    // SAFETY: out has one int.
    unsafe { run(dev, "selftest_spin_wait", 1, 64, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) }.unwrap();
    assert_eq!(out.to_vec::<i32>().unwrap(), vec![7]);
}

#[test]
fn emu_spin_wait_with_pause() {
    let Some(e) = emu("emu_spin_wait_with_pause", BlockOrder::InOrder) else { return };
    check_spin_wait(&Device::Emulated(e));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_spin_wait_with_pause() {
    let Some(d) = gpu("gpu_spin_wait_with_pause") else { return };
    check_spin_wait(&d);
}

#[test]
fn emu_reports_planted_endless_spin() {
    let Some(e) = emu("emu_reports_planted_endless_spin", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let mut flag = Tensor::zeros(&[1], DType::I32, &dev).unwrap();
    // SAFETY: flag has one int.
    let r = unsafe { run(&dev, "planted_endless_spin", 1, 32, 0, (flag.dev_ptr_mut::<i32>().unwrap(),)) };
    match r {
        Err(Error::KernelFault(m)) => assert!(m.contains("spin-waited"), "{m}"),
        other => panic!("endless spin not reported: {other:?}"),
    }
}

// ---- atomics --------------------------------------------------------------------------------------

fn check_atomics(dev: &Device) {
    let (blocks, threads) = (48u32, 256u32);
    let total = (blocks * threads) as i32;
    let mut counter = Tensor::from_slice(&[0i32, -1], &[2], dev).unwrap();
    let mut max_id = Tensor::from_slice(&[-1i32], &[1], dev).unwrap();
    let mut min_id = Tensor::from_slice(&[i32::MAX], &[1], dev).unwrap();
    let mut fsum = Tensor::from_slice(&[0f32], &[1], dev).unwrap();
    let mut cas = Tensor::from_slice(&[0i32], &[1], dev).unwrap();
    let mut wide = Tensor::from_slice(&[0i32, 0], &[2], dev).unwrap();
    // SAFETY: one or two elements per argument, as the kernel uses them.
    unsafe {
        run(
            dev,
            "selftest_atomics",
            blocks,
            threads,
            0,
            (
                counter.dev_ptr_mut::<i32>().unwrap(),
                max_id.dev_ptr_mut::<i32>().unwrap(),
                min_id.dev_ptr_mut::<i32>().unwrap(),
                fsum.dev_ptr_mut::<f32>().unwrap(),
                cas.dev_ptr_mut::<i32>().unwrap(),
                wide.dev_ptr_mut::<i32>().unwrap(),
            ),
        )
    }
    .unwrap();
    let c = counter.to_vec::<i32>().unwrap();
    assert_eq!(c[0], total, "atomicAdd");
    assert!((0..total).contains(&c[1]), "atomicExch left {}", c[1]);
    assert_eq!(max_id.to_vec::<i32>().unwrap(), vec![total - 1], "atomicMax");
    assert_eq!(min_id.to_vec::<i32>().unwrap(), vec![0], "atomicMin");
    assert_eq!(fsum.to_vec::<f32>().unwrap(), vec![total as f32], "atomicAdd(float)");
    assert_eq!(cas.to_vec::<i32>().unwrap(), vec![total], "atomicCAS loop");
    let w = wide.to_vec::<i32>().unwrap();
    assert_eq!((w[0] as u32 as u64) | ((w[1] as u32 as u64) << 32), (total as u64) << 33, "64-bit atomicAdd");
}

#[test]
fn emu_atomics_under_contention() {
    for workers in [2, 4] {
        let Some(e) = emu("emu_atomics_under_contention", BlockOrder::Shuffled(11)) else { return };
        check_atomics(&Device::Emulated(e.with_workers(workers)));
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_atomics_under_contention() {
    let Some(d) = gpu("gpu_atomics_under_contention") else { return };
    check_atomics(&d);
}

// ---- shared memory per block ---------------------------------------------------------------------

fn check_smem_isolation(dev: &Device) {
    let (blocks, threads) = (16u32, 64u32);
    let mut out = Tensor::zeros(&[(blocks * threads) as usize], DType::I32, dev).unwrap();
    // SAFETY: (out: one int per thread, rounds).
    unsafe { run(dev, "selftest_smem_isolation", blocks, threads, 0, (out.dev_ptr_mut::<i32>().unwrap(), 40i32)) }
        .unwrap();
    assert!(out.to_vec::<i32>().unwrap().iter().all(|&ok| ok == 1), "a block saw another block's shared memory");
}

#[test]
fn emu_shared_memory_is_per_block() {
    let Some(e) = emu("emu_shared_memory_is_per_block", BlockOrder::InOrder) else { return };
    check_smem_isolation(&Device::Emulated(e.with_workers(4)));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_shared_memory_is_per_block() {
    let Some(d) = gpu("gpu_shared_memory_is_per_block") else { return };
    check_smem_isolation(&d);
}

// ---- block order ----------------------------------------------------------------------------------

fn start_order(e: Emulator, blocks: u32) -> Vec<i32> {
    let dev = Device::Emulated(e.with_workers(1));
    let mut ticket = Tensor::zeros(&[1], DType::I32, &dev).unwrap();
    let mut order = Tensor::zeros(&[blocks as usize], DType::I32, &dev).unwrap();
    // SAFETY: (ticket: one int, order: one int per block).
    unsafe {
        run(
            &dev,
            "selftest_block_order",
            blocks,
            32,
            0,
            (ticket.dev_ptr_mut::<i32>().unwrap(), order.dev_ptr_mut::<i32>().unwrap()),
        )
    }
    .unwrap();
    order.to_vec::<i32>().unwrap()
}

#[test]
fn emu_block_orders() {
    let n = 20;
    let Some(e) = emu("emu_block_orders", BlockOrder::InOrder) else { return };
    assert_eq!(start_order(e.clone(), n), (0..n as i32).collect::<Vec<_>>());
    let rev = start_order(e.clone().with_block_order(BlockOrder::Reversed), n);
    assert_eq!(rev, (0..n as i32).rev().collect::<Vec<_>>());
    let a = start_order(e.clone().with_block_order(BlockOrder::Shuffled(5)), n);
    let b = start_order(e.clone().with_block_order(BlockOrder::Shuffled(5)), n);
    let c = start_order(e.with_block_order(BlockOrder::Shuffled(6)), n);
    assert_eq!(a, b, "a seed fixes the order");
    assert_ne!(a, c, "another seed, another order");
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n as i32).collect::<Vec<_>>(), "a permutation");
    assert_ne!(a, (0..n as i32).collect::<Vec<_>>());
}

#[test]
fn emu_catches_planted_block_order_dependence() {
    let Some(e) = emu("emu_catches_planted_block_order_dependence", BlockOrder::InOrder) else { return };
    let blocks = 32usize;
    let x: Vec<i32> = (1..=blocks as i32).collect();
    let prefix: Vec<i32> = x
        .iter()
        .scan(0, |s, v| {
            *s += v;
            Some(*s)
        })
        .collect();
    let run_with = |order| {
        let dev = Device::Emulated(e.clone().with_workers(1).with_block_order(order));
        let xt = Tensor::from_slice(&x, &[blocks], &dev).unwrap();
        let mut out = Tensor::zeros(&[blocks], DType::I32, &dev).unwrap();
        // SAFETY: (x: one int per block, out: one int per block).
        unsafe {
            run(
                &dev,
                "planted_block_order_dependence",
                blocks as u32,
                32,
                0,
                (xt.dev_ptr::<i32>().unwrap(), out.dev_ptr_mut::<i32>().unwrap()),
            )
        }
        .unwrap();
        out.to_vec::<i32>().unwrap()
    };
    assert_eq!(run_with(BlockOrder::InOrder), prefix, "in order the bug hides");
    assert_ne!(run_with(BlockOrder::Reversed), prefix, "reversed order must expose it");
    assert_ne!(run_with(BlockOrder::Shuffled(1)), prefix, "shuffled order must expose it");
}

// ---- out-of-bounds writes and deadlocks ------------------------------------------------------------

#[test]
fn emu_catches_planted_shared_memory_overrun() {
    let Some(e) = emu("emu_catches_planted_shared_memory_overrun", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let mut out = Tensor::zeros(&[4 * 64], DType::F32, &dev).unwrap();
    // SAFETY: out has one float per thread; the tile is blockDim floats (the bug writes one more).
    let r = unsafe { run(&dev, "planted_smem_tile_overrun", 4, 64, 64 * 4, (out.dev_ptr_mut::<f32>().unwrap(),)) };
    match r {
        Err(Error::KernelFault(m)) => assert!(m.contains("dynamic shared memory"), "{m}"),
        other => panic!("overrun not caught: {other:?}"),
    }
    // With one more float of shared memory the same kernel is in bounds.
    let r = unsafe { run(&dev, "planted_smem_tile_overrun", 4, 64, 65 * 4, (out.dev_ptr_mut::<f32>().unwrap(),)) };
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn emu_catches_planted_global_overrun() {
    let Some(e) = emu("emu_catches_planted_global_overrun", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let n = 1000;
    let mut out = Tensor::zeros(&[n], DType::F32, &dev).unwrap();
    // SAFETY: deliberately one element short: the guard zone must report the write.
    let r = unsafe { run(&dev, "planted_global_overrun", 4, 256, 0, (out.dev_ptr_mut::<f32>().unwrap(), n as i32)) };
    match r {
        Err(Error::KernelFault(m)) => assert!(m.contains("out of bounds") && m.contains("4000"), "{m}"),
        other => panic!("overrun not caught: {other:?}"),
    }
    // The guard is repaired and the next correct launch passes.
    let r =
        unsafe { run(&dev, "planted_global_overrun", 4, 256, 0, (out.dev_ptr_mut::<f32>().unwrap(), n as i32 - 1)) };
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn emu_reports_planted_deadlock() {
    let Some(e) = emu("emu_reports_planted_deadlock", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let mut out = Tensor::zeros(&[64], DType::I32, &dev).unwrap();
    // SAFETY: out has one int per thread.
    let r = unsafe { run(&dev, "planted_deadlock", 1, 64, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) };
    match r {
        Err(Error::KernelFault(m)) => assert!(m.contains("deadlock"), "{m}"),
        other => panic!("deadlock not reported: {other:?}"),
    }
}

#[test]
fn emu_rejects_bad_launch_configs() {
    let Some(e) = emu("emu_rejects_bad_launch_configs", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let mut out = Tensor::zeros(&[2048], DType::I32, &dev).unwrap();
    // SAFETY: rejected before any thread runs.
    let r = unsafe { run(&dev, "planted_deadlock", 1, 2048, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) };
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

/// Under AddressSanitizer (`MOEKIT_EMU_SANITIZE=address`, as CI runs it) an out-of-bounds
/// *read* is caught too: the child test below reads past its input and must die with an ASan
/// report. Without ASan this is skipped visibly (guard zones catch writes only).
#[test]
fn emu_asan_flags_read_past_buffer() {
    if !moekit_cuda::emu::asan_active() {
        moekit_cuda::testing::skip_notice(
            "emu_asan_flags_read_past_buffer",
            "not an AddressSanitizer build (MOEKIT_EMU_SANITIZE=address)",
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "planted_read_child", "--include-ignored", "--nocapture"])
        .env("MOEKIT_PLANTED_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the out-of-bounds read went unnoticed:\n{stderr}");
    assert!(stderr.contains("AddressSanitizer") && stderr.contains("planted_global_overread"), "{stderr}");
}

#[test]
#[ignore = "child process of emu_asan_flags_read_past_buffer"]
fn planted_read_child() {
    if std::env::var("MOEKIT_PLANTED_CHILD").is_err() {
        return;
    }
    let Some(e) = emu("planted_read_child", BlockOrder::InOrder) else { return };
    let dev = Device::Emulated(e);
    let n = 1000;
    let x = Tensor::from_slice(&vec![1f32; n], &[n], &dev).unwrap();
    let mut out = Tensor::zeros(&[n], DType::F32, &dev).unwrap();
    // SAFETY: deliberately reads x[n]: the point of this test.
    let _ = unsafe {
        run(
            &dev,
            "planted_global_overread",
            4,
            256,
            0,
            (x.dev_ptr::<f32>().unwrap(), out.dev_ptr_mut::<f32>().unwrap(), n as i32),
        )
    };
}

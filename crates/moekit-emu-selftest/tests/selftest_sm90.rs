//! The host emulation of Hopper's instructions (`kernels/include/moekit/emu/sm90.h`): TMA
//! boxes with every swizzle and zero fill, wgmma BF16 and E4M3 through 128-byte swizzled
//! descriptors with its accumulator fragment, mbarrier phases, named barriers, setmaxnreg and
//! elect.sync; and proof that it catches planted bugs (a wrong swizzle, a wrong descriptor
//! offset, a wrong expect-tx count, a phase-parity mistake, a stage reloaded before the wgmma
//! reading it completed, a missing wgmma.fence, a non-uniform setmaxnreg); thread block clusters
//! (multicast TMA, remote mbarrier arrivals, barrier.cluster) and their planted bugs (a peer's
//! barrier used before a cluster barrier, a multicast mask missing a CTA, a CTA exiting while
//! its peer still arrives on its barrier). The expectations are
//! independent statements in Rust of what the PTX ISA and the CUDA driver documentation fix;
//! correct kernels also run on a compute capability 9.0 GPU (`gpu_*`, ignored without one).

use moekit_cuda::emu::{TensorMapSpec, TmaElem, TmaSwizzle};
use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip, skip_notice};
use moekit_cuda::{BlockOrder, Error};
use moekit_dtype::{bf16, F8E4M3};
use moekit_emu_selftest::kernels::EMU_SELFTEST_SM90;
use moekit_emu_selftest::run_sm90;
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

fn emu(test: &str) -> Option<Device> {
    emulator_or_skip(test, &[&EMU_SELFTEST_SM90], BlockOrder::InOrder).map(Device::Emulated)
}

fn gpu(test: &str) -> Option<Device> {
    let g = gpu_or_skip(test, &[&EMU_SELFTEST_SM90])?;
    if g.compute_capability() != (9, 0) {
        skip_notice(test, "not a compute capability 9.0 GPU");
        return None;
    }
    Some(Device::Cuda(CudaDevice::new(0).expect("GPU present")))
}

fn lcg(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s >> 33
        })
        .collect()
}

fn bytes_tensor(bytes: &[u8], dev: &Device) -> Tensor {
    Tensor::from_slice(bytes, &[bytes.len()], dev).unwrap()
}

// ---- TMA: boxes, swizzles, zero fill ---------------------------------------------------------------

const ROWS: usize = 40;
const COLS: usize = 160; // bytes per row (a multiple of 16)
const BOX_ROWS: u32 = 24;

/// Where byte `off` of a box lands under a swizzle of `span` bytes (CUDA's TMA swizzle: the
/// 16-byte chunk index within the span XOR shared-address bits 7.. (`row % 8` for 128B)).
fn swizzled(off: usize, span: usize) -> usize {
    let mask = match span {
        128 => 7,
        64 => 3,
        32 => 1,
        _ => 0,
    };
    off ^ (((off >> 7) & mask) << 4)
}

fn tma_box(dev: &Device, swizzle: TmaSwizzle, c0: i32, c1: i32) -> (Vec<u8>, Vec<u8>) {
    let global: Vec<u8> = (0..ROWS * COLS).map(|i| ((i * 7 + 3) % 251 + 1) as u8).collect();
    let inner = if swizzle == TmaSwizzle::None { 64 } else { swizzle.bytes() as usize };
    let bytes = inner * BOX_ROWS as usize;
    let g = bytes_tensor(&global, dev);
    let mut out = Tensor::zeros(&[bytes], DType::U8, dev).unwrap();
    let gp = g.dev_ptr::<u8>().unwrap();
    let map = TensorMapSpec {
        addr: gp.addr(),
        elem: TmaElem::U8,
        dims: &[COLS as u64, ROWS as u64],
        strides_bytes: &[COLS as u64],
        boxes: &[inner as u32, BOX_ROWS],
        swizzle,
    }
    .encode(dev.launcher().unwrap())
    .unwrap();
    // SAFETY: (tensor map over `g`, out: `bytes` bytes, coordinates, bytes); 16 KiB + barrier
    // + 1 KiB alignment slack of dynamic shared memory.
    unsafe {
        run_sm90(
            dev,
            "selftest_sm90_tma_box",
            1,
            128,
            16384 + 8 + 1024,
            (map, out.dev_ptr_mut::<u8>().unwrap(), c0, c1, bytes as i32),
        )
    }
    .unwrap();
    let mut want = vec![0u8; bytes];
    for r in 0..BOX_ROWS as usize {
        for c in 0..inner {
            let (gr, gc) = (c1 as i64 + r as i64, c0 as i64 + c as i64);
            let inside = (0..ROWS as i64).contains(&gr) && (0..COLS as i64).contains(&gc);
            want[swizzled(r * inner + c, swizzle.bytes() as usize)] =
                if inside { global[gr as usize * COLS + gc as usize] } else { 0 };
        }
    }
    (out.to_vec::<u8>().unwrap(), want)
}

fn check_tma(dev: &Device) {
    for swizzle in [TmaSwizzle::None, TmaSwizzle::B32, TmaSwizzle::B64, TmaSwizzle::B128] {
        // Inside; past the last rows and columns; before the first column (negative).
        for (c0, c1) in [(16, 8), (112, 20), (-16, 0)] {
            let (got, want) = tma_box(dev, swizzle, c0, c1);
            assert_eq!(got, want, "{swizzle:?} box at ({c0}, {c1})");
        }
    }
}

#[test]
fn emu_tma_boxes_swizzles_and_zero_fill() {
    let Some(d) = emu("emu_tma_boxes_swizzles_and_zero_fill") else { return };
    check_tma(&d);
    // The model is not trivially consistent with itself: the 128B pattern moves bytes.
    assert_ne!(swizzled(128 + 16, 128), 128 + 16);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_tma_boxes_swizzles_and_zero_fill() {
    let Some(d) = gpu("gpu_tma_boxes_swizzles_and_zero_fill") else { return };
    check_tma(&d);
}

/// A box loaded at (c0, c1) and stored at (d0, d1) through maps of the same box and swizzle:
/// the destination tensor after the store, and what it must be.
fn tma_store(dev: &Device, swizzle: TmaSwizzle, (c0, c1): (i32, i32), (d0, d1): (i32, i32)) -> (Vec<u8>, Vec<u8>) {
    let x: Vec<u8> = (0..ROWS * COLS).map(|i| ((i * 7 + 3) % 251 + 1) as u8).collect();
    let y0: Vec<u8> = (0..ROWS * COLS).map(|i| ((i * 5 + 11) % 241 + 3) as u8).collect();
    let inner = if swizzle == TmaSwizzle::None { 64 } else { swizzle.bytes() as usize };
    let xt = bytes_tensor(&x, dev);
    let mut yt = bytes_tensor(&y0, dev);
    let on = dev.launcher().unwrap();
    let map = |addr: u64| {
        TensorMapSpec {
            addr,
            elem: TmaElem::U8,
            dims: &[COLS as u64, ROWS as u64],
            strides_bytes: &[COLS as u64],
            boxes: &[inner as u32, BOX_ROWS],
            swizzle,
        }
        .encode(on)
        .unwrap()
    };
    let (mx, my) = (map(xt.dev_ptr::<u8>().unwrap().addr()), map(yt.dev_ptr_mut::<u8>().unwrap().addr()));
    let bytes = (inner * BOX_ROWS as usize) as i32;
    // SAFETY: maps over x and y (ROWS x COLS bytes each, alive), coordinates, box bytes; 16 KiB +
    // barrier + 1 KiB slack of dynamic shared memory.
    unsafe { run_sm90(dev, "selftest_sm90_tma_store", 1, 128, 16384 + 8 + 1024, (mx, my, c0, c1, d0, d1, bytes)) }
        .unwrap();
    let mut want = y0.clone();
    for r in 0..BOX_ROWS as i64 {
        for c in 0..inner as i64 {
            let (sr, sc, dr, dc) = (c1 as i64 + r, c0 as i64 + c, d1 as i64 + r, d0 as i64 + c);
            let inside = |r: i64, c: i64| (0..ROWS as i64).contains(&r) && (0..COLS as i64).contains(&c);
            if inside(dr, dc) {
                want[(dr * COLS as i64 + dc) as usize] =
                    if inside(sr, sc) { x[(sr * COLS as i64 + sc) as usize] } else { 0 };
            }
        }
    }
    (yt.to_vec::<u8>().unwrap(), want)
}

fn check_tma_store(dev: &Device) {
    for swizzle in [TmaSwizzle::None, TmaSwizzle::B128] {
        for (src, dst) in [((16, 8), (0, 0)), ((112, 20), (-32, 24))] {
            let (got, want) = tma_store(dev, swizzle, src, dst);
            assert_eq!(got, want, "{swizzle:?} {src:?} -> {dst:?}");
        }
    }
}

#[test]
fn emu_tma_store_round_trip() {
    let Some(d) = emu("emu_tma_store_round_trip") else { return };
    check_tma_store(&d);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_tma_store_round_trip() {
    let Some(d) = gpu("gpu_tma_store_round_trip") else { return };
    check_tma_store(&d);
}

// ---- wgmma: descriptors, fragment layout, mbarrier phases -------------------------------------------

const WG_M: usize = 64;
const WG_N: usize = 128;

/// Inputs of a `wgmma_tile` kernel: A [64, k], B [128, k] as values and as bytes.
struct Tile {
    k: usize,
    fp8: bool,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Tile {
    /// Small integers (every partial sum exact: any summation order gives the same bits), or
    /// reals in [-2, 2] (BF16 only).
    fn new(fp8: bool, small_ints: bool, seed: u64) -> Tile {
        let k = if fp8 { 256 } else { 128 }; // two TMA steps: the mbarrier phase flips
        let gen = |n: usize, s: u64| -> Vec<f32> {
            lcg(n, s)
                .iter()
                .map(|&v| {
                    let x = if small_ints { (v % 9) as f32 - 4.0 } else { (v % 40001) as f32 / 10000.0 - 2.0 };
                    bf16::from_f32(x).to_f32()
                })
                .collect()
        };
        Tile { k, fp8, a: gen(WG_M * k, seed), b: gen(WG_N * k, seed + 1) }
    }
    fn bytes(&self, v: &[f32]) -> Vec<u8> {
        if self.fp8 {
            v.iter().map(|&x| F8E4M3::from_f32(x).0).collect()
        } else {
            v.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect()
        }
    }
    /// d = A . B^T in f64, and the sum of |terms| per element.
    fn want(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut d, mut mag) = (vec![0f64; WG_M * WG_N], vec![0f64; WG_M * WG_N]);
        for r in 0..WG_M {
            for c in 0..WG_N {
                for kk in 0..self.k {
                    let p = self.a[r * self.k + kk] as f64 * self.b[c * self.k + kk] as f64;
                    d[r * WG_N + c] += p;
                    mag[r * WG_N + c] += p.abs();
                }
            }
        }
        (d, mag)
    }
}

/// Runs `kernel` (a `wgmma_tile` instance with K-major B) on `tile`: d [64, 128] f32, or the
/// launch's error.
fn wgmma(dev: &Device, kernel: &str, tile: &Tile) -> Result<Vec<f32>, Error> {
    wgmma_b(dev, kernel, tile, false)
}

/// As [`wgmma`]; `mn_b`: B goes in MN-major, as B^T [k, 128] with 64 x 64 boxes (BF16).
fn wgmma_b(dev: &Device, kernel: &str, tile: &Tile, mn_b: bool) -> Result<Vec<f32>, Error> {
    let on = dev.launcher().unwrap();
    let (elem, e) = if tile.fp8 { (TmaElem::U8, 1) } else { (TmaElem::Bf16, 2) };
    let b = if mn_b {
        (0..tile.k * WG_N).map(|i| tile.b[(i % WG_N) * tile.k + i / WG_N]).collect()
    } else {
        tile.b.clone()
    };
    let (ab, bb) = (bytes_tensor(&tile.bytes(&tile.a), dev), bytes_tensor(&tile.bytes(&b), dev));
    let k = tile.k as u64;
    // K-major: rows of k elements, boxes of 128 bytes of K by all rows; MN-major B^T: rows of
    // 128 columns, boxes of 64 columns (128 bytes) by 64 of K.
    let map = |t: &Tensor, inner: u64, outer: u64, boxes: [u32; 2]| {
        TensorMapSpec {
            addr: t.dev_ptr::<u8>().unwrap().addr(),
            elem,
            dims: &[inner, outer],
            strides_bytes: &[inner * e],
            boxes: &boxes,
            swizzle: TmaSwizzle::B128,
        }
        .encode(on)
        .unwrap()
    };
    let ta = map(&ab, k, WG_M as u64, [128 / e as u32, WG_M as u32]);
    let tb =
        if mn_b { map(&bb, WG_N as u64, k, [64, 64]) } else { map(&bb, k, WG_N as u64, [128 / e as u32, WG_N as u32]) };
    let mut d = Tensor::zeros(&[WG_M * WG_N], DType::F32, dev).unwrap();
    // SAFETY: (maps over A [64, k] and B [128, k], d: 64 x 128 f32, k); 24 KiB of tiles + the
    // barrier + 1 KiB alignment slack of dynamic shared memory.
    unsafe {
        run_sm90(dev, kernel, 1, 128, 8192 + 16384 + 8 + 1024, (ta, tb, d.dev_ptr_mut::<f32>().unwrap(), k as i32))
    }?;
    d.to_vec::<f32>()
}

fn check_wgmma(dev: &Device) {
    for fp8 in [false, true] {
        let kernel = if fp8 { "selftest_sm90_wgmma_fp8" } else { "selftest_sm90_wgmma_bf16" };
        // Exact: small integers.
        let tile = Tile::new(fp8, true, 5);
        let got = wgmma(dev, kernel, &tile).unwrap();
        let (want, _) = tile.want();
        for i in 0..got.len() {
            assert_eq!(got[i] as f64, want[i], "{kernel} d[{}][{}]", i / WG_N, i % WG_N);
        }
    }
    // Reals (BF16): within f32 rounding of a k-term sum (the tensor cores' order is unspecified).
    let tile = Tile::new(false, false, 9);
    let got = wgmma(dev, "selftest_sm90_wgmma_bf16", &tile).unwrap();
    let (want, mag) = tile.want();
    for i in 0..got.len() {
        let tol = (tile.k + 1) as f64 * f32::EPSILON as f64 * mag[i];
        assert!((got[i] as f64 - want[i]).abs() <= tol, "d[{}][{}] = {} vs {}", i / WG_N, i % WG_N, got[i], want[i]);
    }
}

/// B MN-major (imm-trans-b 1): exact on small integers, within f32 rounding on reals; the
/// planted descriptor with the K-major meaning of the two offsets gives other results.
fn check_wgmma_mn_b(dev: &Device, planted: bool) {
    let kernel = "selftest_sm90_wgmma_bf16_mn_b";
    let tile = Tile::new(false, true, 21);
    let got = wgmma_b(dev, kernel, &tile, true).unwrap();
    let (want, _) = tile.want();
    for i in 0..got.len() {
        assert_eq!(got[i] as f64, want[i], "{kernel} d[{}][{}]", i / WG_N, i % WG_N);
    }
    if planted {
        let bad = wgmma_b(dev, "planted_sm90_mn_swapped_offsets", &tile, true).unwrap();
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_ne!(bad, want, "planted_sm90_mn_swapped_offsets: right product with the planted bug");
    }
    let tile = Tile::new(false, false, 23);
    let got = wgmma_b(dev, kernel, &tile, true).unwrap();
    let (want, mag) = tile.want();
    for i in 0..got.len() {
        let tol = (tile.k + 1) as f64 * f32::EPSILON as f64 * mag[i];
        assert!((got[i] as f64 - want[i]).abs() <= tol, "d[{}][{}] = {} vs {}", i / WG_N, i % WG_N, got[i], want[i]);
    }
}

#[test]
fn emu_wgmma_mn_major_b() {
    let Some(d) = emu("emu_wgmma_mn_major_b") else { return };
    check_wgmma_mn_b(&d, true);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_wgmma_mn_major_b() {
    let Some(d) = gpu("gpu_wgmma_mn_major_b") else { return };
    check_wgmma_mn_b(&d, false);
}

#[test]
fn emu_wgmma_tma_mbarrier() {
    let Some(d) = emu("emu_wgmma_tma_mbarrier") else { return };
    check_wgmma(&d);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_wgmma_tma_mbarrier() {
    let Some(d) = gpu("gpu_wgmma_tma_mbarrier") else { return };
    check_wgmma(&d);
}

/// The correct kernel passes on `tile`; the planted one gives other results.
fn wrong_results(dev: &Device, planted: &str) {
    let tile = Tile::new(false, true, 13);
    let (want, _) = tile.want();
    let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    assert_eq!(wgmma(dev, "selftest_sm90_wgmma_bf16", &tile).unwrap(), want);
    let got = wgmma(dev, planted, &tile).unwrap();
    assert_ne!(got, want, "{planted}: the emulation computed the right product with the planted bug");
}

/// The correct kernel passes; the planted one fails the launch with a message containing
/// every one of `needles`.
fn reported(dev: &Device, planted: &str, needles: &[&str]) {
    let tile = Tile::new(false, true, 17);
    assert!(wgmma(dev, "selftest_sm90_wgmma_bf16", &tile).is_ok());
    match wgmma(dev, planted, &tile) {
        Err(Error::KernelFault(m)) => {
            for n in needles {
                assert!(m.contains(n), "{planted}: {n:?} not in {m}");
            }
        }
        other => panic!("{planted} not reported: {other:?}"),
    }
}

#[test]
fn emu_catches_planted_wrong_swizzle() {
    let Some(d) = emu("emu_catches_planted_wrong_swizzle") else { return };
    wrong_results(&d, "planted_sm90_wrong_swizzle");
}

#[test]
fn emu_catches_planted_wrong_descriptor_offset() {
    let Some(d) = emu("emu_catches_planted_wrong_descriptor_offset") else { return };
    wrong_results(&d, "planted_sm90_wrong_desc_offset");
}

#[test]
fn emu_reports_planted_wrong_expect_tx_as_deadlock() {
    let Some(d) = emu("emu_reports_planted_wrong_expect_tx_as_deadlock") else { return };
    reported(&d, "planted_sm90_wrong_expect_tx", &["deadlock", "mbarrier", "tx-count 16 bytes"]);
}

#[test]
fn emu_catches_planted_phase_parity_mistake() {
    let Some(d) = emu("emu_catches_planted_phase_parity_mistake") else { return };
    reported(&d, "planted_sm90_wrong_parity", &["TMA load has not written", "phase parity"]);
}

#[test]
fn emu_catches_planted_stage_reuse_before_wgmma_wait() {
    let Some(d) = emu("emu_catches_planted_stage_reuse_before_wgmma_wait") else { return };
    reported(&d, "planted_sm90_early_release", &["uncompleted wgmma", "before wgmma.wait_group"]);
}

#[test]
fn emu_catches_planted_missing_wgmma_fence() {
    let Some(d) = emu("emu_catches_planted_missing_wgmma_fence") else { return };
    reported(&d, "planted_sm90_missing_fence", &["without wgmma.fence"]);
}

// ---- named barriers, setmaxnreg, elect.sync --------------------------------------------------------

fn roles(dev: &Device) -> Vec<i32> {
    let mut out = Tensor::zeros(&[256 + 8], DType::I32, dev).unwrap();
    // SAFETY: out has 256 + 8 ints.
    unsafe { run_sm90(dev, "selftest_sm90_warpgroup_roles", 1, 256, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) }.unwrap();
    let got = out.to_vec::<i32>().unwrap();
    for wg in 0..2 {
        for t in 0..128 {
            assert_eq!(got[wg * 128 + t], ((t + 37) % 128 * 3 + wg) as i32, "warpgroup {wg} thread {t}");
        }
    }
    got[256..].to_vec()
}

#[test]
fn emu_named_barriers_setmaxnreg_elect() {
    let Some(d) = emu("emu_named_barriers_setmaxnreg_elect") else { return };
    // One lane elected per warp: the emulation elects the lowest (lane 0).
    assert_eq!(roles(&d), vec![100; 8]);
    let mut out = Tensor::zeros(&[128], DType::I32, &d).unwrap();
    // SAFETY: out has one int per thread.
    let r =
        unsafe { run_sm90(&d, "planted_sm90_setmaxnreg_not_uniform", 1, 128, 0, (out.dev_ptr_mut::<i32>().unwrap(),)) };
    match r {
        Err(Error::KernelFault(m)) => assert!(m.contains("setmaxnreg") && m.contains("not uniform"), "{m}"),
        other => panic!("non-uniform setmaxnreg not reported: {other:?}"),
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_named_barriers_setmaxnreg_elect() {
    let Some(d) = gpu("gpu_named_barriers_setmaxnreg_elect") else { return };
    // Exactly one lane per warp (which one the ISA leaves to the hardware).
    assert!(roles(&d).iter().all(|&v| v / 100 == 1), "one elected lane per warp");
}

/// Planted bug: a TMA store's shared source rewritten before `cp.async.bulk.wait_group` is
/// reported (the round trip above is the same store without the rewrite, and passes).
#[test]
fn emu_tma_store_source_reused_before_wait_is_reported() {
    let Some(d) = emu("emu_tma_store_source_reused_before_wait_is_reported") else { return };
    let on = d.launcher().unwrap();
    let (_y, map) = store_target(&d, on);
    // SAFETY: a map over y (ROWS x COLS bytes, alive); 16 KiB + 1 KiB slack of dynamic shared
    // memory, which the kernel's box (128 x BOX_ROWS bytes) fits.
    match unsafe { run_sm90(&d, "selftest_sm90_tma_store_reuse", 1, 128, 16384 + 1024, (map,)) } {
        Err(Error::KernelFault(m)) => assert!(m.contains("rewritten before the cp.async.bulk.wait_group"), "{m}"),
        other => panic!("expected a fault, got {other:?}"),
    }
}

/// y (ROWS x COLS zero bytes on `d`) and a 128 x BOX_ROWS-box, 128B-swizzled store map over it.
fn store_target(d: &Device, on: &dyn moekit_cuda::Launcher) -> (Tensor, moekit_abi::MoekitTensorMap) {
    let mut yt = bytes_tensor(&vec![0u8; ROWS * COLS], d);
    let map = TensorMapSpec {
        addr: yt.dev_ptr_mut::<u8>().unwrap().addr(),
        elem: TmaElem::U8,
        dims: &[COLS as u64, ROWS as u64],
        strides_bytes: &[COLS as u64],
        boxes: &[128, BOX_ROWS],
        swizzle: TmaSwizzle::B128,
    }
    .encode(on)
    .unwrap();
    (yt, map)
}

/// Planted bug: st.shared then a TMA store without fence.proxy.async is reported; the same
/// kernel with the fence stores the bytes.
#[test]
fn emu_catches_planted_store_without_proxy_fence() {
    let Some(d) = emu("emu_catches_planted_store_without_proxy_fence") else { return };
    let on = d.launcher().unwrap();
    let (yt, map) = store_target(&d, on);
    // SAFETY: as above (a map over y, alive; 16 KiB + 1 KiB slack of dynamic shared memory).
    match unsafe { run_sm90(&d, "planted_sm90_store_without_fence", 1, 128, 16384 + 1024, (map, 0i32)) } {
        Err(Error::KernelFault(m)) => assert!(m.contains("after the last fence.proxy.async"), "{m}"),
        other => panic!("expected a fault, got {other:?}"),
    }
    // SAFETY: the same launch with the fence.
    unsafe { run_sm90(&d, "planted_sm90_store_without_fence", 1, 128, 16384 + 1024, (map, 1i32)) }.unwrap();
    let y = yt.to_vec::<u8>().unwrap();
    assert!(y.iter().any(|&b| b != 0), "the fenced store wrote nothing");
}

// ---- thread block clusters: multicast TMA, remote arrivals, barrier.cluster -------------------------

const MC_COLS: usize = 128;
const MC_ROWS: usize = 64; // 32 rows per cluster, two clusters

/// `selftest_sm90_cluster_multicast` on `blocks` blocks (clusters of 2) with `planted`: the
/// launch's result, then (what each block copied out, what it must be, each block's
/// %cluster_ctarank). Rank r of cluster c multicasts rows 32 c + 16 r .. + 15 to shared offset
/// 2048 r of both CTAs, 128-byte swizzled: byte e of that box lands at swizzled(2048 r + e).
fn cluster_multicast(dev: &Device, blocks: usize, planted: i32) -> (Result<(), Error>, Vec<u8>, Vec<u8>, Vec<i32>) {
    let global: Vec<u8> = (0..MC_ROWS * MC_COLS).map(|i| ((i * 13 + 5) % 251 + 1) as u8).collect();
    let g = bytes_tensor(&global, dev);
    let mut out = Tensor::zeros(&[blocks * 4096], DType::U8, dev).unwrap();
    let mut ranks = Tensor::from_slice(&vec![-1i32; blocks], &[blocks], dev).unwrap();
    let map = TensorMapSpec {
        addr: g.dev_ptr::<u8>().unwrap().addr(),
        elem: TmaElem::U8,
        dims: &[MC_COLS as u64, MC_ROWS as u64],
        strides_bytes: &[MC_COLS as u64],
        boxes: &[128, 16],
        swizzle: TmaSwizzle::B128,
    }
    .encode(dev.launcher().unwrap())
    .unwrap();
    // SAFETY: (tensor map over `g`, alive; out: 4096 bytes per block; out_rank: one int per
    // block; planted); 4 KiB of boxes + two barriers + 1 KiB slack of dynamic shared memory.
    let r = unsafe {
        run_sm90(
            dev,
            "selftest_sm90_cluster_multicast",
            blocks as u32,
            128,
            4096 + 16 + 1024,
            (map, out.dev_ptr_mut::<u8>().unwrap(), ranks.dev_ptr_mut::<i32>().unwrap(), planted),
        )
    };
    let mut want = vec![0u8; blocks * 4096];
    for b in 0..blocks {
        for rank in 0..2 {
            for e in 0..2048 {
                let row = 32 * (b / 2) + 16 * rank + e / 128;
                want[4096 * b + swizzled(2048 * rank + e, 128)] = global[row * MC_COLS + e % 128];
            }
        }
    }
    (r, out.to_vec::<u8>().unwrap(), want, ranks.to_vec::<i32>().unwrap())
}

fn check_cluster_multicast(dev: &Device) {
    let (r, got, want, ranks) = cluster_multicast(dev, 4, 0);
    r.unwrap();
    assert_eq!(ranks, vec![0, 1, 0, 1], "%cluster_ctarank of blocks 0..3");
    for b in 0..4 {
        assert!(got[4096 * b..4096 * (b + 1)] == want[4096 * b..4096 * (b + 1)], "block {b}: both multicast boxes");
    }
}

/// Both CTAs of each cluster receive both boxes (each rank multicasts one), in the swizzled
/// layout; %cluster_ctarank is blockIdx.x % 2; remote arrivals complete the peers' barriers;
/// barrier.cluster completes with exited threads. A grid that is not a multiple of the
/// kernel's cluster size is refused, as the driver refuses it.
#[test]
fn emu_cluster_multicast_remote_arrive_and_barrier() {
    let Some(d) = emu("emu_cluster_multicast_remote_arrive_and_barrier") else { return };
    check_cluster_multicast(&d);
    match cluster_multicast(&d, 3, 0).0 {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("cluster size 2"), "{m}"),
        other => panic!("a grid of 3 blocks in clusters of 2 was not refused: {other:?}"),
    }
    // Shuffled clusters on several workers: the same bytes.
    let Some(Device::Emulated(e)) = emu("emu_cluster_multicast_remote_arrive_and_barrier") else { return };
    let shuffled = Device::Emulated(e.with_block_order(BlockOrder::Shuffled(3)).with_workers(2));
    check_cluster_multicast(&shuffled);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_cluster_multicast_remote_arrive_and_barrier() {
    let Some(d) = gpu("gpu_cluster_multicast_remote_arrive_and_barrier") else { return };
    check_cluster_multicast(&d);
}

/// Planted cluster bugs, each caught: a peer's barrier used before a barrier.cluster follows
/// its initialisation (the emulation starts rank 1 only once rank 0 cannot go on, so rank 0's
/// multicast meets rank 1's barrier uninitialised); a multicast mask that leaves out the peer
/// (its expected bytes never come: a deadlock report, not a hang); a CTA that exits with no
/// barrier.cluster after its peer's last arrival on its barrier (an arrival after the exit is
/// a fault too; which of the two a schedule meets depends on the order).
#[test]
fn emu_catches_planted_cluster_bugs() {
    let Some(d) = emu("emu_catches_planted_cluster_bugs") else { return };
    let fault = |planted: i32| match cluster_multicast(&d, 2, planted).0 {
        Err(Error::KernelFault(m)) => m,
        other => panic!("planted bug {planted} not caught: {other:?}"),
    };
    let m = fault(1);
    assert!(m.contains("before mbarrier.init") && m.contains("CTA rank 1"), "{m}");
    let m = fault(2);
    assert!(m.contains("cannot go on") && m.contains("tx-count"), "{m}");
    let m = fault(3);
    assert!(m.contains("CTA rank 0") && m.contains("exited without a barrier.cluster"), "{m}");
}

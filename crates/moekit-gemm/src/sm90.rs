//! Host side of the Hopper kernel (`kernels/gemm_sm90.cu`): TMA descriptors and the launch,
//! on a GPU or in the host emulation (which runs the same kernel source with its TMA, mbarrier
//! and wgmma model, `kernels/include/moekit/emu/sm90.h`). Not yet run on a GPU: the dispatcher
//! picks it only with `MOEKIT_GEMM_SM90=1` on a compute capability 9.0 GPU (or an explicit
//! [`crate::raw::set_kernel_override`], which the emulated tests use).

use crate::kernels::GEMM_SM90;
use crate::{Op, Result, Shape};
use moekit_cuda::emu::{TensorMapSpec, TmaElem, TmaSwizzle};
use moekit_cuda::{LaunchConfig, Launcher};

/// Threads per block: a producer and two consumer warpgroups.
pub const BLOCK: u32 = 384;
/// Output tile (rows x columns).
pub const TILE_M: usize = 128;
/// Output tile columns.
pub const TILE_N: usize = 128;
/// Dynamic shared memory: 6 stages x ((A, B) x 16 KiB + a 528-byte FP8 scale slot), barriers,
/// 1 KiB alignment slack (the kernel's `static_assert` keeps the two in step).
pub const SMEM_BYTES: u32 = 6 * 2 * 16384 + 6 * 132 * 4 + 1024 + 2 * 6 * 8;

/// Whether the Hopper kernel handles `op` on `shape` where `on` runs: m-grouped contiguous or
/// masked, K a multiple of one 128-byte TMA row (64 BF16, 128 FP8), and the kernel built for
/// `on` (its sm_90a fatbin on a GPU, its host build in the emulation).
/// k-grouped (BF16 and FP8) and dgrad are not supported yet: they run on the portable kernel
/// (the planned k-grouped design is in `kernels/NOTES.md`, gemm_sm90 k-grouped).
pub fn supports(on: &dyn Launcher, op: Op, shape: &Shape, fp8: bool) -> bool {
    let built =
        if on.compute_capability().is_none() { !GEMM_SM90.emulation().is_empty() } else { GEMM_SM90.is_built() };
    matches!(op, Op::Contiguous | Op::Masked) && shape.k % if fp8 { 128 } else { 64 } == 0 && built
}

/// A K-major tensor map over `dims` (innermost first, elements) with a box of 128 bytes of K
/// by 128 rows (by 1 group), 128-byte swizzle, zero fill outside: one description, encoded
/// for the GPU's driver or the emulator ([`TensorMapSpec::encode`]).
fn tensor_map(
    on: &dyn Launcher,
    addr: u64,
    fp8: bool,
    dims: &[u64],
    strides_bytes: &[u64],
) -> Result<moekit_abi::MoekitTensorMap> {
    let elem = if fp8 { TmaElem::U8 } else { TmaElem::Bf16 };
    let boxes = &[128 / elem.bytes() as u32, 128, 1][..dims.len()];
    TensorMapSpec { addr, elem, dims, strides_bytes, boxes, swizzle: TmaSwizzle::B128 }.encode(on)
}

/// Launches the Hopper kernel for `params` (already checked by the caller).
pub fn launch(on: &dyn Launcher, params: moekit_abi::MoekitGemmParams) -> Result<()> {
    let fp8 = params.fp8 != 0;
    let elem = if fp8 { 1u64 } else { 2 };
    let (g, m, n, k) = (params.groups as u64, params.m as u64, params.n as u64, params.k as u64);
    let masked = params.op == moekit_abi::MOEKIT_GEMM_MASKED as i32;
    let tmap_a = if masked {
        tensor_map(on, params.a, fp8, &[k, m, g], &[k * elem, m * k * elem])?
    } else {
        tensor_map(on, params.a, fp8, &[k, m], &[k * elem])?
    };
    let tmap_b = tensor_map(on, params.b, fp8, &[k, n, g], &[k * elem, n * k * elem])?;
    let tiles = (if masked { g } else { 1 }) as usize * (m as usize).div_ceil(TILE_M) * (n as usize).div_ceil(TILE_N);
    if tiles == 0 {
        return Ok(());
    }
    let blocks = tiles.min(on.multiprocessors().max(1) as usize);
    let cfg = LaunchConfig { grid: (blocks as u32, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: SMEM_BYTES };
    let p = moekit_abi::MoekitGemmSm90Params { tmap_a, tmap_b, gemm: params, _pad: [0; 88] };
    let name = if fp8 { "moekit_gemm_sm90_fp8" } else { "moekit_gemm_sm90_bf16" };
    // SAFETY: one MoekitGemmSm90Params by value (layout checked by moekit-abi's tests); the
    // tensor maps describe exactly the operand buffers the caller checked (A [m, k] or
    // [g, m, k], B [g, n, k]); the other pointers and sizes are the portable kernel's, checked
    // by the caller; the kernel reads ids and scales with the same range checks.
    unsafe { moekit_cuda::launch(on, &GEMM_SM90, name, cfg, (p,)) }
}

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
/// Dynamic shared memory of the m-grouped and dgrad kernels: 5 stages x (A, B) x 16 KiB, two
/// 16 KiB output buffers (the TMA-store epilogue), 5 x 528-byte FP8 scale slots, barriers,
/// 1 KiB alignment slack (the kernel's `static_assert` keeps the two in step).
pub const SMEM_BYTES: u32 = 5 * 2 * 16384 + 2 * 16384 + 5 * 132 * 4 + 1024 + 2 * 5 * 8;
/// Dynamic shared memory of the 256-column BF16 forward kernel: 3 stages x (16 + 32) KiB, two
/// 32 KiB output buffers, 3 scale slots (unused), barriers, 1 KiB slack.
pub const SMEM_BYTES_N256: u32 = 3 * (16384 + 32768) + 2 * 32768 + 3 * 132 * 4 + 1024 + 2 * 3 * 8;
/// Dynamic shared memory of the k-grouped kernels: 6 stages x (A, B) x 16 KiB, 6 scale slots of
/// 256 floats (FP8: 128 row scales of each operand's tile), barriers, 1 KiB slack.
pub const SMEM_BYTES_KGROUPED: u32 = 6 * 2 * 16384 + 6 * 256 * 4 + 1024 + 2 * 6 * 8;

thread_local! {
    static MULTICAST: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Forces the 2-CTA cluster kernels (weight tile multicast) on (`Some(true)`) or off
/// (`Some(false)`) for the m-grouped forward with 128-column tiles on this thread, or restores
/// [`multicast_rule`] (`None`), so tests reach both schedules on the same shapes.
pub fn set_multicast_override(on: Option<bool>) {
    MULTICAST.with(|m| m.set(on));
}

/// Whether the m-grouped forward runs in 2-CTA clusters (`moekit_gemm_sm90_mc2_*`: the two
/// CTAs take the 128-row halves of a 256-row tile, and rank 0 multicasts their shared weight
/// tile into both): when pairs of row tiles exist, cost little and every SM has a tile. A
/// cluster schedules `pair_row_tiles` 256-row tiles where there are `row_tiles` 128-row ones;
/// each added half (a group with an odd count: that CTA walks empty stages) may be at most
/// 1/8 of the real ones; and `row_tiles x col_tiles` must cover the `sms` (the multicast saves
/// L2 bandwidth, the bound when all SMs load).
pub fn multicast_rule(row_tiles: usize, pair_row_tiles: usize, col_tiles: usize, sms: usize) -> bool {
    row_tiles >= 2 && (2 * pair_row_tiles).saturating_sub(row_tiles) * 8 <= row_tiles && row_tiles * col_tiles >= sms
}

/// Whether the Hopper kernel handles `op` on `shape` where `on` runs, with the kernel built for
/// `on` (its sm_90a fatbin on a GPU, its host build in the emulation): m-grouped contiguous or
/// masked with K a multiple of one 128-byte TMA row (64 BF16, 128 FP8), BF16 dgrad with its
/// reduction N a multiple of 64, and k-grouped (BF16 and FP8: every shape the API takes). FP8
/// [`Op::Dgrad`] runs on the portable kernel: FP8 wgmma reads K-major operands only, and the
/// forward weights are K-major along the other dimension. On Hopper an FP8 dgrad is the
/// m-grouped contiguous GEMM against the transposed weights' quantization
/// ([`crate::quantize_weights`] with `transposed`), which this kernel takes.
pub fn supports(on: &dyn Launcher, op: Op, shape: &Shape, fp8: bool) -> bool {
    let built =
        if on.compute_capability().is_none() { !GEMM_SM90.emulation().is_empty() } else { GEMM_SM90.is_built() };
    let takes = match op {
        Op::Contiguous | Op::Masked => shape.k % if fp8 { 128 } else { 64 } == 0,
        Op::Dgrad => !fp8 && shape.n % 64 == 0,
        Op::KGrouped => true,
    };
    takes && built
}

/// A tensor map over `dims` (innermost first, elements) with a box of 128 bytes of the
/// innermost dimension by `rows` (by 1 group), 128-byte swizzle, zero fill outside: one
/// description, encoded for the GPU's driver or the emulator ([`TensorMapSpec::encode`]).
/// K-major operands take 128-row boxes; dgrad's MN-major weights 64 rows (of N).
fn tensor_map(
    on: &dyn Launcher,
    addr: u64,
    fp8: bool,
    dims: &[u64],
    strides_bytes: &[u64],
    rows: u32,
) -> Result<moekit_abi::MoekitTensorMap> {
    let elem = if fp8 { TmaElem::U8 } else { TmaElem::Bf16 };
    let boxes = &[128 / elem.bytes() as u32, rows, 1][..dims.len()];
    TensorMapSpec { addr, elem, dims, strides_bytes, boxes, swizzle: TmaSwizzle::B128 }.encode(on)
}

/// Launches the Hopper kernel for `params` (already checked by the caller).
pub fn launch(on: &dyn Launcher, params: moekit_abi::MoekitGemmParams) -> Result<()> {
    let fp8 = params.fp8 != 0;
    let elem = if fp8 { 1u64 } else { 2 };
    let (g, m, n, k) = (params.groups as u64, params.m as u64, params.n as u64, params.k as u64);
    if params.op == moekit_abi::MOEKIT_GEMM_KGROUPED as i32 {
        return launch_k_grouped(on, params);
    }
    let masked = params.op == moekit_abi::MOEKIT_GEMM_MASKED as i32;
    let dgrad = params.op == moekit_abi::MOEKIT_GEMM_DGRAD as i32;
    // Reduction length and output columns: (K, N), or dgrad's (N, K).
    let (red, cols) = if dgrad { (n, k) } else { (k, n) };
    let tmap_a = if masked {
        tensor_map(on, params.a, fp8, &[k, m, g], &[k * elem, m * k * elem], 128)?
    } else {
        tensor_map(on, params.a, fp8, &[red, m], &[red * elem], 128)?
    };
    // BF16 forward tiles of 256 columns when N is a multiple of 256 and they still give every
    // SM a tile: half the A tile loads per output, wgmma m64n256 (twice the work per issue).
    let row_tiles = (if masked { g } else { 1 }) as usize * (m as usize).div_ceil(TILE_M);
    let wide = !fp8 && !dgrad && n % 256 == 0 && row_tiles * (n as usize / 256) >= on.multiprocessors().max(1) as usize;
    let tile_n = if wide { 256 } else { TILE_N };
    // B is [g, n, k] with k innermost either way: K-major for the forward (tile_n rows of N per
    // box), MN-major for dgrad (64 of K by 64 rows of N per box, two boxes per stage).
    let b_rows = if dgrad { 64 } else { tile_n as u32 };
    let tmap_b = tensor_map(on, params.b, fp8, &[k, n, g], &[k * elem, n * k * elem], b_rows)?;
    let col_tiles = (cols as usize).div_ceil(tile_n);
    let tiles = row_tiles * col_tiles;
    // 2-CTA clusters: masked groups counted at their full m (masked_m is on the device).
    let pair_row_tiles = (if masked { g } else { 1 }) as usize * (m as usize).div_ceil(2 * TILE_M);
    let sms = on.multiprocessors().max(1) as usize;
    let multicast = !wide
        && !dgrad
        && MULTICAST.with(|o| o.get()).unwrap_or_else(|| multicast_rule(row_tiles, pair_row_tiles, col_tiles, sms));
    // D, BF16 [m, cols] or masked [g, m, n]: boxes of 64 columns (128 bytes) x 64 rows.
    let tmap_d = if masked {
        tensor_map(on, params.d, false, &[n, m, g], &[n * 2, m * n * 2], 64)?
    } else {
        tensor_map(on, params.d, false, &[cols, m], &[cols * 2], 64)?
    };
    let (name, smem) = match (fp8, dgrad, wide, multicast) {
        (true, _, _, true) => ("moekit_gemm_sm90_mc2_fp8", SMEM_BYTES),
        (true, _, _, false) => ("moekit_gemm_sm90_fp8", SMEM_BYTES),
        (false, true, _, _) => ("moekit_gemm_sm90_bf16_dgrad", SMEM_BYTES),
        (false, false, true, _) => ("moekit_gemm_sm90_bf16_n256", SMEM_BYTES_N256),
        (false, false, false, true) => ("moekit_gemm_sm90_mc2_bf16", SMEM_BYTES),
        (false, false, false, false) => ("moekit_gemm_sm90_bf16", SMEM_BYTES),
    };
    if multicast {
        return launch_kernel(on, (tmap_a, tmap_b, tmap_d), params, pair_row_tiles * col_tiles, 2, name, smem);
    }
    launch_kernel(on, (tmap_a, tmap_b, tmap_d), params, tiles, 1, name, smem)
}

/// k-grouped, tiles of dW [g, n, k]. BF16: dY [m, n] and X [m, k] as MN-major operands along
/// the tokens, 64 columns by 64 tokens per box. FP8: dY^T [n, m] and X^T [k, m], K-major along
/// the tokens, 128 tokens (bytes) by 128 rows per box.
fn launch_k_grouped(on: &dyn Launcher, params: moekit_abi::MoekitGemmParams) -> Result<()> {
    let (g, m, n, k) = (params.groups as u64, params.m as u64, params.n as u64, params.k as u64);
    let tiles = g as usize * (n as usize).div_ceil(TILE_M) * (k as usize).div_ceil(TILE_N);
    if params.fp8 != 0 {
        let tmap_a = tensor_map(on, params.a, true, &[m, n], &[m], 128)?;
        let tmap_b = tensor_map(on, params.b, true, &[m, k], &[m], 128)?;
        let name = "moekit_gemm_sm90_fp8_kgrouped";
        let maps = (tmap_a, tmap_b, Default::default());
        return launch_kernel(on, maps, params, tiles, 1, name, SMEM_BYTES_KGROUPED);
    }
    let tmap_a = tensor_map(on, params.a, false, &[n, m], &[n * 2], 64)?;
    let tmap_b = tensor_map(on, params.b, false, &[k, m], &[k * 2], 64)?;
    let maps = (tmap_a, tmap_b, Default::default());
    launch_kernel(on, maps, params, tiles, 1, "moekit_gemm_sm90_bf16_kgrouped", SMEM_BYTES_KGROUPED)
}

/// The persistent launch of `name` over `tiles` scheduled tiles (none: nothing to do) with the
/// tensor maps of A, B and D and `smem` bytes of dynamic shared memory; `cluster` CTAs per
/// tile and per cluster (the kernel's `__cluster_dims__`): the grid is a multiple of it.
fn launch_kernel(
    on: &dyn Launcher,
    (tmap_a, tmap_b, tmap_d): (moekit_abi::MoekitTensorMap, moekit_abi::MoekitTensorMap, moekit_abi::MoekitTensorMap),
    params: moekit_abi::MoekitGemmParams,
    tiles: usize,
    cluster: usize,
    name: &str,
    smem: u32,
) -> Result<()> {
    if tiles == 0 {
        return Ok(());
    }
    let sms = on.multiprocessors().max(1) as usize;
    let blocks = (tiles * cluster).min((sms / cluster * cluster).max(cluster));
    let cfg = LaunchConfig { grid: (blocks as u32, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: smem };
    let p = moekit_abi::MoekitGemmSm90Params { tmap_a, tmap_b, tmap_d, gemm: params, _pad: [0; 24] };
    // SAFETY: one MoekitGemmSm90Params by value (layout checked by moekit-abi's tests); the
    // tensor maps describe exactly the buffers the caller checked: D [m, cols] or [g, m, n]
    // BF16, 16-byte aligned (unused by k-grouped); A [m, k], [g, m, k], dgrad's dY [m, n] or
    // k-grouped's dY [m, n] / dY^T [n, m]; B [g, n, k] or k-grouped's X [m, k] / X^T [k, m].
    // The other pointers and sizes are the portable kernel's, checked by the caller; the kernel
    // reads ids, offsets and scales with the same range checks (offsets clamped to [0, m]).
    unsafe { moekit_cuda::launch(on, &GEMM_SM90, name, cfg, (p,)) }
}

#[cfg(test)]
mod tests {
    use super::multicast_rule;

    #[test]
    fn multicast_rule_needs_pairs_little_waste_and_every_sm_busy() {
        // 64 row tiles in 32 pairs, 4 column tiles: 256 tiles on 132 SMs.
        assert!(multicast_rule(64, 32, 4, 132));
        assert!(!multicast_rule(1, 1, 200, 132), "no pair");
        assert!(!multicast_rule(64, 32, 1, 132), "SMs left idle");
        // 8 groups of one live row tile each: 8 pairs with an empty half (waste 8 of 8).
        assert!(!multicast_rule(8, 8, 40, 132));
        // 9 row tiles in 5 pairs: one empty half of 9 (<= 1/8 rounds to 9 * 8 >= 8).
        assert!(multicast_rule(9, 5, 20, 132));
        assert!(!multicast_rule(7, 5, 20, 132), "3 empty halves of 7");
    }
}

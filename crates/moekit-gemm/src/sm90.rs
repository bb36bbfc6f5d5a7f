//! Host side of the Hopper kernel (`kernels/gemm_sm90.cu`): TMA descriptors and the launch.
//! Verified by compilation and SASS inspection only until a GPU run: the dispatcher picks it
//! only with `MOEKIT_GEMM_SM90=1` (or an explicit [`crate::raw::set_kernel_override`]).

use crate::kernels::GEMM_SM90;
use crate::{Error, Op, Result, Shape};
use moekit_cuda::{sys, LaunchConfig, Launcher};

/// Threads per block: a producer and two consumer warpgroups.
pub const BLOCK: u32 = 384;
/// Output tile (rows x columns).
pub const TILE_M: usize = 128;
/// Output tile columns.
pub const TILE_N: usize = 128;
/// Dynamic shared memory: 4 stages x (A, B) x 16 KiB, barriers, 1 KiB alignment slack.
pub const SMEM_BYTES: u32 = 4 * 2 * 16384 + 1024 + 2 * 4 * 8;

/// Whether the Hopper kernel handles `op` on `shape`: m-grouped contiguous or masked, K a
/// multiple of one 128-byte TMA row (64 BF16, 128 FP8), rows of 16-byte-aligned length.
pub fn supports(op: Op, shape: &Shape, fp8: bool) -> bool {
    matches!(op, Op::Contiguous | Op::Masked) && shape.k % if fp8 { 128 } else { 64 } == 0 && GEMM_SM90.is_built()
}

/// A K-major tensor map over `dims` (innermost first, elements) with a box of 128 bytes of K
/// by 128 rows (by 1 group), 128-byte swizzle, zero fill outside.
fn tensor_map(addr: u64, fp8: bool, dims: &[u64], strides_bytes: &[u64]) -> Result<moekit_abi::MoekitTensorMap> {
    let elem = if fp8 { 1 } else { 2 };
    let boxes: Vec<u32> = [128 / elem, 128, 1][..dims.len()].to_vec();
    let ones = vec![1u32; dims.len()];
    let dtype = if fp8 {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8
    } else {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    };
    let mut map = moekit_abi::MoekitTensorMap::default();
    // SAFETY: MoekitTensorMap is 128 bytes, 64-byte aligned: the layout of CUtensorMap (checked
    // by moekit-abi's layout test against the C header, and by the size assertion below).
    // The pointers reference live local arrays of `dims.len()` (and - 1) elements; the
    // function only encodes, it does not touch `addr`.
    const _: () =
        assert!(std::mem::size_of::<moekit_abi::MoekitTensorMap>() == std::mem::size_of::<sys::CUtensorMap>());
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut moekit_abi::MoekitTensorMap).cast::<sys::CUtensorMap>(),
            dtype,
            dims.len() as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides_bytes.as_ptr(),
            boxes.as_ptr(),
            ones.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::InvalidArgument(format!("cuTensorMapEncodeTiled failed ({r:?}) for dims {dims:?}")));
    }
    Ok(map)
}

/// Launches the Hopper kernel for `params` (already checked by the caller).
pub fn launch(on: &dyn Launcher, params: moekit_abi::MoekitGemmParams) -> Result<()> {
    let fp8 = params.fp8 != 0;
    let elem = if fp8 { 1u64 } else { 2 };
    let (g, m, n, k) = (params.groups as u64, params.m as u64, params.n as u64, params.k as u64);
    let masked = params.op == moekit_abi::MOEKIT_GEMM_MASKED as i32;
    let tmap_a = if masked {
        tensor_map(params.a, fp8, &[k, m, g], &[k * elem, m * k * elem])?
    } else {
        tensor_map(params.a, fp8, &[k, m], &[k * elem])?
    };
    let tmap_b = tensor_map(params.b, fp8, &[k, n, g], &[k * elem, n * k * elem])?;
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

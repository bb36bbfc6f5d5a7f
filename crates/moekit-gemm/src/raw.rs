//! Launches on device buffers + a stream (or the host emulator). Every function checks the
//! shape constraints ([`Shape::check`]), every buffer length, matching operand dtypes and
//! where each buffer lives before it launches; ids read from device memory (`m_indices`,
//! `masked_m`, `offsets`) are clamped or skipped by the kernel, never used unchecked.

use crate::kernels::GEMM_PORTABLE;
use crate::{Error, Op, Result, ScaleLayout, Shape, SCALE_BLOCK};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// Threads per block of the portable kernel (4 warps, 64 x 64 output tile).
pub const BLOCK: u32 = 128;
/// Output tile side.
pub const TILE: usize = 64;
/// Dynamic shared memory of the portable kernel (3 cp.async stages + a converted tile, per operand).
pub const SMEM_BYTES: u32 = 40960;
/// Resident blocks per multiprocessor the persistent grid is sized for.
pub const BLOCKS_PER_SM: usize = 4;

/// The kernel the dispatcher picks for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `mma.sync` + `ldmatrix` + `cp.async` (sm_80 and newer), every op.
    Portable,
    /// Hopper: TMA + wgmma, warp-specialised, persistent (sm_90a), m-grouped contiguous and
    /// masked; other ops and shapes it does not take run on the portable kernel. Not yet
    /// verified on a GPU: picked only with `MOEKIT_GEMM_SM90=1` or an override.
    Sm90,
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Kernel>> = const { std::cell::Cell::new(None) };
}

/// Forces the dispatcher's choice on this thread (None: automatic); for tests and benchmarks
/// that must run every kernel.
pub fn set_kernel_override(kernel: Option<Kernel>) {
    OVERRIDE.with(|o| o.set(kernel));
}

/// The kernel for `on`: an override if set on this thread; else the Hopper kernel on a
/// compute capability 9.0 GPU when it is built and `MOEKIT_GEMM_SM90=1`; else portable.
pub fn kernel_for(on: &dyn Launcher) -> Kernel {
    if let Some(k) = OVERRIDE.with(|o| o.get()) {
        return k;
    }
    let opted_in = std::env::var("MOEKIT_GEMM_SM90").is_ok_and(|v| v == "1");
    if opted_in && on.compute_capability() == Some((9, 0)) && crate::kernels::GEMM_SM90.is_built() {
        Kernel::Sm90
    } else {
        Kernel::Portable
    }
}

/// A GEMM operand: BF16, or FP8 E4M3 codes with their f32 scales.
#[derive(Debug, Clone, Copy)]
pub enum Operand<'a> {
    /// BF16 values.
    Bf16(DevPtr<'a, bf16>),
    /// E4M3 codes and scales (layout per operand: see the crate docs).
    Fp8 {
        /// Codes.
        data: DevPtr<'a, u8>,
        /// f32 scales.
        scales: DevPtr<'a, f32>,
    },
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Operand::Bf16(p) => p.len(),
            Operand::Fp8 { data, .. } => data.len(),
        }
    }
    fn fp8(&self) -> bool {
        matches!(self, Operand::Fp8 { .. })
    }
    fn addr(&self) -> u64 {
        match self {
            Operand::Bf16(p) => p.addr(),
            Operand::Fp8 { data, .. } => data.addr(),
        }
    }
    fn scales(&self) -> Option<&DevPtr<'_, f32>> {
        match self {
            Operand::Bf16(_) => None,
            Operand::Fp8 { scales, .. } => Some(scales),
        }
    }
    fn spaces(&self) -> Vec<MemSpace> {
        match self {
            Operand::Bf16(p) => vec![p.space()],
            Operand::Fp8 { data, scales } => vec![data.space(), scales.space()],
        }
    }
    fn check(&self, what: &str, elems: usize, scales: usize) -> Result<()> {
        expect(what, self.len(), elems)?;
        if let Some(s) = self.scales() {
            expect(&format!("{what} scales"), s.len(), scales)?;
        }
        Ok(())
    }
}

fn expect(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("{what}: {got} elements, expected {want}")))
    }
}

fn same_dtype(a: &Operand<'_>, b: &Operand<'_>) -> Result<bool> {
    if a.fp8() != b.fp8() {
        return Err(Error::Dtype {
            what: "grouped GEMM operands".into(),
            expected: "both BF16 or both FP8".into(),
            got: format!("A {}, B {}", if a.fp8() { "FP8" } else { "BF16" }, if b.fp8() { "FP8" } else { "BF16" }),
        });
    }
    Ok(a.fp8())
}

fn weight_scales(s: &Shape) -> usize {
    s.groups * (s.n / SCALE_BLOCK) * (s.k / SCALE_BLOCK)
}

struct Launch<'a> {
    op: Op,
    shape: Shape,
    a: Operand<'a>,
    a_layout: ScaleLayout,
    b: Operand<'a>,
    d: u64,
    /// The op's row/group ids: `m_indices` (contiguous, dgrad), `masked_m` or 0 (masked),
    /// group offsets (k-grouped).
    ids: u64,
    /// k-grouped: add to `d`.
    accumulate: bool,
    spaces: Vec<MemSpace>,
}

fn launch(on: &dyn Launcher, l: Launch<'_>) -> Result<()> {
    let mut spaces = l.spaces;
    spaces.extend(l.a.spaces());
    spaces.extend(l.b.spaces());
    moekit_cuda::ensure_addressable(on, &spaces)?;
    let s = l.shape;
    let (rows, cols, per_group) = match l.op {
        Op::Contiguous => (s.m, s.n, 1),
        Op::Dgrad => (s.m, s.k, 1),
        Op::Masked => (s.m, s.n, s.groups),
        Op::KGrouped => (s.n, s.k, s.groups),
    };
    let tiles = per_group * rows.div_ceil(TILE) * cols.div_ceil(TILE);
    if tiles == 0 {
        return Ok(());
    }
    let blocks = tiles.min((on.multiprocessors() as usize * BLOCKS_PER_SM).max(1));
    let cfg = LaunchConfig { grid: (blocks as u32, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: SMEM_BYTES };
    let fp8 = l.a.fp8();
    // Rows of A's 1x128 scales (the MN-major stride follows from them).
    let a_scale_rows = match l.op {
        Op::Contiguous | Op::Dgrad => s.m,
        Op::Masked => s.groups * s.m,
        Op::KGrouped => s.n,
    };
    let id = |op: Op| if l.op == op { l.ids } else { 0 };
    let params = moekit_abi::MoekitGemmParams {
        a: l.a.addr(),
        b: l.b.addr(),
        d: l.d,
        a_scales: l.a.scales().map_or(0, |p| p.addr()),
        b_scales: l.b.scales().map_or(0, |p| p.addr()),
        m_indices: if matches!(l.op, Op::Contiguous | Op::Dgrad) { l.ids } else { 0 },
        masked_m: id(Op::Masked),
        group_offsets: id(Op::KGrouped),
        op: l.op.abi(),
        fp8: fp8 as i32,
        groups: s.groups as i32,
        accumulate: l.accumulate as i32,
        m: s.m as i32,
        n: s.n as i32,
        k: s.k as i32,
        a_scale_layout: l.a_layout.abi(),
        a_scale_stride: ScaleLayout::mn_stride(a_scale_rows) as i32,
        _pad: 0,
    };
    if kernel_for(on) == Kernel::Sm90 && crate::sm90::supports(l.op, &s, fp8) {
        return crate::sm90::launch(on, params);
    }
    let name = if fp8 { "moekit_gemm_portable_fp8" } else { "moekit_gemm_portable_bf16" };
    // SAFETY: one MoekitGemmParams by value (layout checked by moekit-abi's tests). The callers
    // checked the shape constraints and every buffer length against the sizes the kernel
    // indexes (operands, scales, ids, output); ids read on the device are range-checked there;
    // every buffer lives where `on` runs (checked above).
    unsafe { moekit_cuda::launch(on, &GEMM_PORTABLE, name, cfg, (params,)) }
}

/// m-grouped contiguous: `d [m, n]` BF16 rows `r` with a valid `m_indices[r]` get
/// `a[r] . b[m_indices[r]]^T`; `a [m, k]` (FP8: 1x128 scales in `a_layout`), `b [G, n, k]`
/// (FP8: 128x128 block scales).
pub fn m_grouped_contiguous(
    on: &dyn Launcher,
    shape: Shape,
    a: Operand<'_>,
    a_layout: ScaleLayout,
    b: Operand<'_>,
    m_indices: DevPtr<'_, i32>,
    d: DevPtrMut<'_, bf16>,
) -> Result<()> {
    row_grouped(on, Op::Contiguous, shape, a, a_layout, b, m_indices, d)
}

/// Contiguous and dgrad: rows grouped by `m_indices`; A `[m, red]`, output `[m, cols]`.
#[allow(clippy::too_many_arguments)]
fn row_grouped(
    on: &dyn Launcher,
    op: Op,
    shape: Shape,
    a: Operand<'_>,
    a_layout: ScaleLayout,
    b: Operand<'_>,
    m_indices: DevPtr<'_, i32>,
    d: DevPtrMut<'_, bf16>,
) -> Result<()> {
    let fp8 = same_dtype(&a, &b)?;
    shape.check(op, fp8)?;
    let Shape { groups, m, n, k } = shape;
    let (red, cols) = if op == Op::Dgrad { (n, k) } else { (k, n) };
    a.check("A", m * red, a_layout.len(m, red))?;
    b.check("B", groups * n * k, weight_scales(&shape))?;
    expect("m_indices", m_indices.len(), m)?;
    expect("D", d.len(), m * cols)?;
    let spaces = vec![m_indices.space(), d.space()];
    let l = Launch { op, shape, a, a_layout, b, d: d.addr(), ids: m_indices.addr(), accumulate: false, spaces };
    launch(on, l)
}

/// m-grouped masked: `d [G, m, n]` BF16 rows `r < masked_m[g]` (all `m` rows when None) get
/// `a[g, r] . b[g]^T`; `a [G, m, k]` (FP8: scales of its `G m` rows in `a_layout`).
#[allow(clippy::too_many_arguments)]
pub fn m_grouped_masked(
    on: &dyn Launcher,
    shape: Shape,
    a: Operand<'_>,
    a_layout: ScaleLayout,
    b: Operand<'_>,
    masked_m: Option<DevPtr<'_, i32>>,
    d: DevPtrMut<'_, bf16>,
) -> Result<()> {
    let fp8 = same_dtype(&a, &b)?;
    shape.check(Op::Masked, fp8)?;
    let Shape { groups, m, n, k } = shape;
    a.check("A", groups * m * k, a_layout.len(groups * m, k))?;
    b.check("B", groups * n * k, weight_scales(&shape))?;
    expect("D", d.len(), groups * m * n)?;
    let mut spaces = vec![d.space()];
    if let Some(mm) = &masked_m {
        expect("masked_m", mm.len(), groups)?;
        spaces.push(mm.space());
    }
    let l = Launch {
        op: Op::Masked,
        shape,
        a,
        a_layout,
        b,
        d: d.addr(),
        ids: masked_m.map_or(0, |p| p.addr()),
        accumulate: false,
        spaces,
    };
    launch(on, l)
}

/// A dense `d [m, n] = a [m, k] . b [n, k]^T` (the masked op with one group, no mask).
#[allow(clippy::too_many_arguments)]
pub fn dense(
    on: &dyn Launcher,
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    a_layout: ScaleLayout,
    b: Operand<'_>,
    d: DevPtrMut<'_, bf16>,
) -> Result<()> {
    m_grouped_masked(on, Shape { groups: 1, m, n, k }, a, a_layout, b, None, d)
}

/// k-grouped weight gradient: `d [G, n, k]` f32 (`+=` when `accumulate`) with `d[g] = sum over
/// tokens t in [offsets[g], offsets[g+1]) of dy[t]^T x[t]`. BF16: `a = dY [m, n]`, `b = X [m, k]`;
/// FP8: `a = dY^T [n, m]`, `b = X^T [k, m]` with 1x128 scales along the tokens
/// (`[n, m/128]`, `[k, m/128]`).
pub fn k_grouped(
    on: &dyn Launcher,
    shape: Shape,
    a: Operand<'_>,
    b: Operand<'_>,
    offsets: DevPtr<'_, i32>,
    accumulate: bool,
    d: DevPtrMut<'_, f32>,
) -> Result<()> {
    let fp8 = same_dtype(&a, &b)?;
    shape.check(Op::KGrouped, fp8)?;
    let Shape { groups, m, n, k } = shape;
    let blocks = m / SCALE_BLOCK;
    a.check("A", m * n, n * blocks)?;
    b.check("B", m * k, k * blocks)?;
    expect("offsets", offsets.len(), groups + 1)?;
    expect("D", d.len(), groups * n * k)?;
    let spaces = vec![offsets.space(), d.space()];
    let l = Launch {
        op: Op::KGrouped,
        shape,
        a,
        a_layout: ScaleLayout::RowMajor,
        b,
        d: d.addr(),
        ids: offsets.addr(),
        accumulate,
        spaces,
    };
    launch(on, l)
}

/// Activation gradient: `dx [m, k]` BF16 rows with a valid `m_indices[r]` get
/// `dy[r] . w[m_indices[r]]` from `dy [m, n]` (FP8: 1x128 scales along n in `a_layout`) and the
/// forward weights `w [G, n, k]` (FP8: the forward's 128x128 block scales), read along n.
pub fn dgrad(
    on: &dyn Launcher,
    shape: Shape,
    dy: Operand<'_>,
    a_layout: ScaleLayout,
    w: Operand<'_>,
    m_indices: DevPtr<'_, i32>,
    dx: DevPtrMut<'_, bf16>,
) -> Result<()> {
    row_grouped(on, Op::Dgrad, shape, dy, a_layout, w, m_indices, dx)
}

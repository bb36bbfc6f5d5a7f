//! Launches on device buffers + a stream (or the host emulator). Every function checks, before
//! it launches and in this order: matching operand dtypes (`Dtype`), the shape constraints
//! ([`Shape::check`]), every buffer's length (`Shape`), every pointer's alignment
//! ([`OPERAND_ALIGN`] for A and B, [`OUTPUT_ALIGN`] for the output, 4 for scales and ids:
//! `Alignment`) and where each buffer lives (`InvalidArgument`).
//!
//! Values in device memory (`m_indices`, `masked_m`, `offsets`) cannot be seen here without a
//! host round trip, so the kernels defend themselves: an `m_indices` id outside `[0, G)` marks
//! a padding row (skipped: never read, never written), `masked_m[g]` is clamped to `[0, m]`,
//! each k-grouped range to `[0, m]` (and empty when `offsets[g+1] < offsets[g]`); no value
//! makes a kernel access memory out of bounds. The tensor ops validate `masked_m` and
//! `offsets` strictly (a readback) and give the same outcome on every device, unless
//! [`set_readback_validation`]`(false)` turned that readback off on the calling thread.

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

pub use crate::sm90::{multicast_rule, set_multicast_override};

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Kernel>> = const { std::cell::Cell::new(None) };
}

/// Forces the dispatcher's choice on this thread (None: automatic); for tests and benchmarks
/// that must run every kernel.
pub fn set_kernel_override(kernel: Option<Kernel>) {
    OVERRIDE.with(|o| o.set(kernel));
}

thread_local! {
    static READBACK_VALIDATION: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether the tensor ops [`crate::m_grouped_masked`] and [`crate::k_grouped`] (and
/// [`crate::k_grouped_accumulate`]) read `masked_m` / `offsets` back to the host to reject
/// invalid values (`InvalidArgument`) on this thread. On (the default): the same outcome on
/// every device, at the price of one host synchronisation per call on a GPU (and one counted
/// `emulated readback` in the emulation). Off: on a GPU and in the emulation nothing is read
/// back and the kernels clamp invalid values (see the module docs: never out of bounds), so a
/// step can run without host synchronisation and be captured into a graph; the CPU (host
/// memory, no synchronisation) still validates. For callers whose ids come from
/// moekit-dispatch's layout (valid by construction, its status checked once per step).
pub fn set_readback_validation(on: bool) {
    READBACK_VALIDATION.with(|v| v.set(on));
}

/// Whether [`set_readback_validation`] is on for this thread.
pub fn readback_validation() -> bool {
    READBACK_VALIDATION.with(|v| v.get())
}

/// The kernel for `on`: an override if set on this thread; else [`choose`] from the
/// launcher's compute capability, `MOEKIT_GEMM_SM90` and whether the Hopper image is built.
pub fn kernel_for(on: &dyn Launcher) -> Kernel {
    if let Some(k) = OVERRIDE.with(|o| o.get()) {
        return k;
    }
    let opted_in = std::env::var("MOEKIT_GEMM_SM90").is_ok_and(|v| v == "1");
    choose(on.compute_capability(), opted_in, crate::kernels::GEMM_SM90.is_built())
}

/// The dispatcher's rule without an override: the Hopper kernel on a compute capability 9.0
/// GPU (`cc`; None is the host emulation) when its sm_90a image is `built` and the user
/// `opted_in` (`MOEKIT_GEMM_SM90=1`) until a GPU run has verified it; else portable.
pub fn choose(cc: Option<(u32, u32)>, opted_in: bool, built: bool) -> Kernel {
    if opted_in && cc == Some((9, 0)) && built {
        Kernel::Sm90
    } else {
        Kernel::Portable
    }
}

/// The kernel that runs `op` on `shape` where `on` runs: [`kernel_for`]'s choice, except that
/// ops and shapes the Hopper kernel does not take ([`Op::KGrouped`], FP8 [`Op::Dgrad`], a
/// reduction not a multiple of one 128-byte row, an image not built for `on`: see
/// [`crate::sm90::supports`]) run on the portable kernel.
pub fn kernel_for_op(on: &dyn Launcher, op: Op, shape: &Shape, fp8: bool) -> Kernel {
    if kernel_for(on) == Kernel::Sm90 && crate::sm90::supports(on, op, shape, fp8) {
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
    /// Lengths, then alignment (data [`OPERAND_ALIGN`], scales their element size).
    fn check(&self, what: &str, elems: usize, scales: usize) -> Result<()> {
        expect(what, self.len(), elems)?;
        if let Some(s) = self.scales() {
            expect(&format!("{what} scales"), s.len(), scales)?;
        }
        check_aligned(what, self.addr(), self.len(), OPERAND_ALIGN)?;
        if let Some(s) = self.scales() {
            check_aligned(&format!("{what} scales"), s.addr(), s.len(), 4)?;
        }
        Ok(())
    }
}

/// Byte alignment the kernels need of the data of every non-empty operand (A and B, BF16 or
/// FP8): the portable kernel copies 16-byte chunks with `cp.async`, the Hopper kernel's TMA
/// needs 16-byte-aligned global addresses. Row pitches are multiples of 16 bytes by
/// [`Shape::check`]; so every chunk is aligned when the operand's first element is.
pub const OPERAND_ALIGN: usize = 16;
/// Byte alignment of a BF16 output (the kernels store pairs of columns as one 32-bit word);
/// f32 outputs, scales and ids need their element alignment (4).
pub const OUTPUT_ALIGN: usize = 4;

pub(crate) use moekit_cuda::check_aligned;

/// A `Shape` error unless a buffer of `what` has `want` elements.
pub(crate) fn expect(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("{what}: {got} elements, expected {want}")))
    }
}

/// Whether the operands are FP8 (`Dtype` error unless both are BF16 or both FP8).
pub fn same_dtype(a_fp8: bool, b_fp8: bool) -> Result<bool> {
    let name = |fp8: bool| if fp8 { "FP8" } else { "BF16" };
    if a_fp8 != b_fp8 {
        return Err(Error::Dtype {
            what: "grouped GEMM operands".into(),
            expected: "both BF16 or both FP8".into(),
            got: format!("A {}, B {}", name(a_fp8), name(b_fp8)),
        });
    }
    Ok(a_fp8)
}

/// Element counts of an op's buffers: the one definition the raw layer, the tensor layer and
/// embedders (moekit-capi) check against (the scale counts matter for FP8 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lens {
    /// A's elements.
    pub a: usize,
    /// A's f32 scales (FP8).
    pub a_scales: usize,
    /// B's elements.
    pub b: usize,
    /// B's f32 scales (FP8).
    pub b_scales: usize,
    /// `m_indices` (contiguous, dgrad), `masked_m` (masked, when given), offsets (k-grouped).
    pub ids: usize,
    /// The output's elements.
    pub d: usize,
}

impl Lens {
    /// For `op` on `shape` with A's 1x128 scales in `a_layout`. `shape` must pass
    /// [`Shape::check`] first (the products below may overflow otherwise).
    pub fn of(op: Op, s: &Shape, a_layout: ScaleLayout) -> Lens {
        let Shape { groups, m, n, k } = *s;
        let weights = groups * (n / SCALE_BLOCK) * (k / SCALE_BLOCK);
        match op {
            Op::Contiguous => {
                Lens { a: m * k, a_scales: a_layout.len(m, k), b: groups * n * k, b_scales: weights, ids: m, d: m * n }
            }
            Op::Dgrad => {
                Lens { a: m * n, a_scales: a_layout.len(m, n), b: groups * n * k, b_scales: weights, ids: m, d: m * k }
            }
            Op::Masked => Lens {
                a: groups * m * k,
                a_scales: a_layout.len(groups * m, k),
                b: groups * n * k,
                b_scales: weights,
                ids: groups,
                d: groups * m * n,
            },
            Op::KGrouped => {
                let blocks = m / SCALE_BLOCK;
                Lens {
                    a: m * n,
                    a_scales: n * blocks,
                    b: m * k,
                    b_scales: k * blocks,
                    ids: groups + 1,
                    d: groups * n * k,
                }
            }
        }
    }
}

/// The output of a launch: address, elements, where it lives.
struct Out {
    addr: u64,
    len: usize,
    space: MemSpace,
}

struct Launch<'a> {
    op: Op,
    shape: Shape,
    a: Operand<'a>,
    a_layout: ScaleLayout,
    b: Operand<'a>,
    d: Out,
    /// The op's row/group ids: `m_indices` (contiguous, dgrad), `masked_m` (masked; None: all
    /// rows), group offsets (k-grouped).
    ids: Option<DevPtr<'a, i32>>,
    /// k-grouped: add to `d`.
    accumulate: bool,
}

/// Every check of every op, then the launch: operand dtypes, [`Shape::check`], each buffer's
/// length, each pointer's alignment, where each buffer lives.
fn launch(on: &dyn Launcher, l: Launch<'_>) -> Result<()> {
    let fp8 = same_dtype(l.a.fp8(), l.b.fp8())?;
    let s = l.shape;
    s.check(l.op, fp8)?;
    let lens = Lens::of(l.op, &s, l.a_layout);
    l.a.check("A", lens.a, lens.a_scales)?;
    l.b.check("B", lens.b, lens.b_scales)?;
    let ids_name = match l.op {
        Op::Contiguous | Op::Dgrad => "m_indices",
        Op::Masked => "masked_m",
        Op::KGrouped => "offsets",
    };
    if let Some(ids) = &l.ids {
        expect(ids_name, ids.len(), lens.ids)?;
        check_aligned(ids_name, ids.addr(), ids.len(), 4)?;
    }
    expect("D", l.d.len, lens.d)?;
    check_aligned("D", l.d.addr, l.d.len, OUTPUT_ALIGN)?;
    let mut spaces = vec![l.d.space];
    spaces.extend(l.ids.map(|p| p.space()));
    spaces.extend(l.a.spaces());
    spaces.extend(l.b.spaces());
    moekit_cuda::ensure_addressable(on, &spaces)?;
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
    let name = if fp8 { "moekit_gemm_portable_fp8" } else { "moekit_gemm_portable_bf16" };
    // The Hopper m-grouped and dgrad kernels store D by TMA, which needs a 16-byte aligned
    // address (the API requires 4): a less aligned output runs on the portable kernel.
    let sm90 = kernel_for_op(on, l.op, &s, fp8) == Kernel::Sm90 && (l.op == Op::KGrouped || l.d.addr % 16 == 0);
    // The persistent grid: every tile, at most what the device keeps resident (the driver's
    // occupancy for this kernel and shared memory, cached per function).
    let blocks =
        if sm90 { 1 } else { moekit_cuda::persistent_grid(on, &GEMM_PORTABLE, name, BLOCK, SMEM_BYTES, tiles)? };
    let cfg = LaunchConfig { grid: (blocks, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: SMEM_BYTES };
    // Rows of A's 1x128 scales (the MN-major stride follows from them).
    let a_scale_rows = match l.op {
        Op::Contiguous | Op::Dgrad => s.m,
        Op::Masked => s.groups * s.m,
        Op::KGrouped => s.n,
    };
    let ids = l.ids.map_or(0, |p| p.addr());
    let id = |op: Op| if l.op == op { ids } else { 0 };
    let params = moekit_abi::MoekitGemmParams {
        a: l.a.addr(),
        b: l.b.addr(),
        d: l.d.addr,
        a_scales: l.a.scales().map_or(0, |p| p.addr()),
        b_scales: l.b.scales().map_or(0, |p| p.addr()),
        m_indices: if matches!(l.op, Op::Contiguous | Op::Dgrad) { ids } else { 0 },
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
    if sm90 {
        return crate::sm90::launch(on, params);
    }
    // SAFETY: one MoekitGemmParams by value (layout checked by moekit-abi's tests). Checked
    // above: the shape constraints, every buffer length against the sizes the kernel indexes
    // (operands, scales, ids, output), the alignment of every pointer the kernel accesses with
    // vector or 32-bit-pair instructions, and that every buffer lives where `on` runs. Ids read
    // on the device are range-checked there (see the module docs).
    unsafe { moekit_cuda::launch(on, &GEMM_PORTABLE, name, cfg, (params,)) }
}

fn out<T>(d: &DevPtrMut<'_, T>) -> Out {
    Out { addr: d.addr(), len: d.len(), space: d.space() }
}

/// m-grouped contiguous: `d [m, n]` BF16 rows `r` with `0 <= m_indices[r] < G` get
/// `a[r] . b[m_indices[r]]^T`; other rows are not written. `a [m, k]` (FP8: 1x128 scales in
/// `a_layout`), `b [G, n, k]` (FP8: 128x128 block scales).
pub fn m_grouped_contiguous(
    on: &dyn Launcher,
    shape: Shape,
    a: Operand<'_>,
    a_layout: ScaleLayout,
    b: Operand<'_>,
    m_indices: DevPtr<'_, i32>,
    d: DevPtrMut<'_, bf16>,
) -> Result<()> {
    let (ids, d) = (Some(m_indices), out(&d));
    launch(on, Launch { op: Op::Contiguous, shape, a, a_layout, b, d, ids, accumulate: false })
}

/// m-grouped masked: `d [G, m, n]` BF16 rows `r < masked_m[g]` (all `m` rows when None) get
/// `a[g, r] . b[g]^T`; `a [G, m, k]` (FP8: scales of its `G m` rows in `a_layout`). The kernel
/// clamps `masked_m[g]` to `[0, m]` (it lives in device memory; the tensor op
/// [`crate::m_grouped_masked`] rejects values outside that range).
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
    let d = out(&d);
    launch(on, Launch { op: Op::Masked, shape, a, a_layout, b, d, ids: masked_m, accumulate: false })
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
/// FP8: `a = dY^T [n, m]`, `b = X^T [k, m]` with row-major 1x128 scales along the tokens
/// (`[n, m/128]`, `[k, m/128]`). The kernel clamps each group to `offsets[g] <= t <
/// offsets[g+1]` within `[0, m]` (offsets live in device memory; the tensor ops
/// [`crate::k_grouped`] reject offsets that are not non-decreasing within `[0, m]`).
pub fn k_grouped(
    on: &dyn Launcher,
    shape: Shape,
    a: Operand<'_>,
    b: Operand<'_>,
    offsets: DevPtr<'_, i32>,
    accumulate: bool,
    d: DevPtrMut<'_, f32>,
) -> Result<()> {
    let (a_layout, ids, d) = (ScaleLayout::RowMajor, Some(offsets), out(&d));
    launch(on, Launch { op: Op::KGrouped, shape, a, a_layout, b, d, ids, accumulate })
}

/// Activation gradient: `dx [m, k]` BF16 rows with `0 <= m_indices[r] < G` get
/// `dy[r] . w[m_indices[r]]` from `dy [m, n]` (FP8: 1x128 scales along n in `a_layout`) and the
/// forward weights `w [G, n, k]` (FP8: the forward's 128x128 block scales), read along n; other
/// rows are not written.
pub fn dgrad(
    on: &dyn Launcher,
    shape: Shape,
    dy: Operand<'_>,
    a_layout: ScaleLayout,
    w: Operand<'_>,
    m_indices: DevPtr<'_, i32>,
    dx: DevPtrMut<'_, bf16>,
) -> Result<()> {
    let (ids, d) = (Some(m_indices), out(&dx));
    launch(on, Launch { op: Op::Dgrad, shape, a: dy, a_layout, b: w, d, ids, accumulate: false })
}

//! Grouped GEMM in DeepGEMM's layouts, BF16 or FP8 (`moekit-gemm`). Every op is NT: A
//! `[rows, K]`, B `[G, N, K]`, both K-major (see each function for its shapes).

use crate::*;
use moekit_dispatch::ScaleLayout;
use moekit_dtype::bf16;
use moekit_gemm::raw::{self, Lens, Operand};
use moekit_gemm::{reference, Op, Shape};

/// Problem sizes: `m` rows (contiguous, dgrad), rows per group (masked) or tokens
/// (k-grouped); `n`, `k` as in each function; `groups` G.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitGemmShape {
    /// G.
    pub groups: u64,
    /// M.
    pub m: u64,
    /// N.
    pub n: u64,
    /// K.
    pub k: u64,
}

/// A GEMM operand: BF16 values, or FP8 E4M3 codes with f32 scales (token side: one per 1x128
/// tile along the reduction, in `scale_layout`; weights: one per 128x128 block `[G, N/128,
/// K/128]`). Data 16-byte aligned.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitGemmOperand {
    /// `MOEKIT_DTYPE_BF16` or `MOEKIT_DTYPE_FP8_E4M3`.
    pub dtype: i32,
    /// FP8 token-side operands: `MOEKIT_LAYOUT_ROW_MAJOR` or `MOEKIT_LAYOUT_MN_MAJOR`
    /// (weights and BF16: ignored; k-grouped FP8: row-major only).
    pub scale_layout: i32,
    /// `uint16_t` BF16 bits or `uint8_t` E4M3 codes.
    pub data: *const c_void,
    /// FP8: the f32 scales; BF16: ignored (NULL).
    pub scales: *const f32,
}

/// One checked operand.
enum Opnd {
    Bf16(Buf<bf16>),
    Fp8 { data: Buf<u8>, scales: Buf<f32> },
}

impl Opnd {
    fn dev<'a>(&self, x: &Exec) -> Operand<'a> {
        match self {
            Opnd::Bf16(b) => Operand::Bf16(b.dev(x)),
            Opnd::Fp8 { data, scales } => Operand::Fp8 { data: data.dev(x), scales: scales.dev(x) },
        }
    }
    fn spans(&self) -> Vec<Span> {
        match self {
            Opnd::Bf16(b) => vec![b.span()],
            Opnd::Fp8 { data, scales } => vec![data.span(), scales.span()],
        }
    }
    /// f32 values on the host, dequantized as the tensor ops' CPU path does: the token side
    /// (`rows x cols`, 1x128 scales in `layout`) or weight blocks (`Some(groups)`).
    fn host(&self, rows: usize, cols: usize, layout: ScaleLayout, weights: Option<usize>) -> R<Vec<f32>> {
        Ok(match self {
            Opnd::Bf16(b) => b.host().iter().map(|v| v.to_f32()).collect(),
            Opnd::Fp8 { data, scales } => match weights {
                Some(g) => reference::dequantize_blocks(data.host(), scales.host(), g, rows, cols)?,
                None => reference::dequantize_tokens(data.host(), scales.host(), rows, cols, layout)?,
            },
        })
    }
}

/// A checked GEMM call: shape, A's scale layout, operands, buffer lengths.
struct Gemm {
    shape: Shape,
    a_layout: ScaleLayout,
    a: Opnd,
    b: Opnd,
    lens: Lens,
}

fn fp8_of(what: &str, o: &MoekitGemmOperand) -> R<bool> {
    match o.dtype {
        MOEKIT_DTYPE_BF16 => Ok(false),
        MOEKIT_DTYPE_FP8_E4M3 => Ok(true),
        d => Err(Error::Dtype {
            what: format!("GEMM operand {what}"),
            expected: "MOEKIT_DTYPE_BF16 or MOEKIT_DTYPE_FP8_E4M3".into(),
            got: format!("dtype {d}"),
        }
        .into()),
    }
}

fn operand(what: &'static str, scales_what: &'static str, o: &MoekitGemmOperand, len: usize, scales: usize) -> R<Opnd> {
    Ok(if fp8_of(what, o)? {
        Opnd::Fp8 { data: input(what, o.data.cast(), len)?, scales: input(scales_what, o.scales, scales)? }
    } else {
        Opnd::Bf16(input(what, o.data.cast(), len)?)
    })
}

impl Gemm {
    /// The raw layer's first checks (dtypes, then the shape), then the buffers.
    fn new(op: Op, s: &MoekitGemmShape, a: *const MoekitGemmOperand, b: *const MoekitGemmOperand) -> R<Gemm> {
        let (a, b) = (by_ref("a", a)?, by_ref("b", b)?);
        let fp8 = raw::same_dtype(fp8_of("A", a)?, fp8_of("B", b)?)?;
        let dim = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let shape = Shape { groups: dim(s.groups), m: dim(s.m), n: dim(s.n), k: dim(s.k) };
        shape.check(op, fp8)?;
        let a_layout = if fp8 { scale_layout(a.scale_layout)? } else { ScaleLayout::RowMajor };
        if op == Op::KGrouped && a_layout != ScaleLayout::RowMajor {
            return invalid("k-grouped FP8 operands take row-major 1x128 scales along the tokens");
        }
        let lens = Lens::of(op, &shape, a_layout);
        let a = operand("A", "A scales", a, lens.a, lens.a_scales)?;
        let b = operand("B", "B scales", b, lens.b, lens.b_scales)?;
        Ok(Gemm { shape, a_layout, a, b, lens })
    }
    fn check_disjoint(&self, others: Vec<Span>) -> R<()> {
        let mut spans = self.a.spans();
        spans.extend(self.b.spans());
        spans.extend(others);
        disjoint(&spans)
    }
}

/// Writes the BF16 rounding of `v`'s rows `r` with `written(r)` into `d` (`cols` per row):
/// the rows the kernels write; the others keep what `d` held.
fn store_rows(v: &[f32], cols: usize, d: &mut [bf16], written: impl Fn(usize) -> bool) {
    for (r, (src, dst)) in v.chunks(cols).zip(d.chunks_mut(cols)).enumerate() {
        if written(r) {
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = bf16::from_f32(x);
            }
        }
    }
}

fn valid_group(ids: &[i32], groups: usize) -> impl Fn(usize) -> bool + '_ {
    move |r| (0..groups as i64).contains(&(ids[r] as i64))
}

/// m-grouped contiguous: `d [m, n]` (BF16) rows `r` with `0 <= m_indices[r] < G` get
/// `a[r] . b[m_indices[r]]^T`; other rows are not written. `a [m, k]` (FP8: 1x128 scales),
/// `b [G, n, k]` (FP8: 128x128 block scales), `m_indices [m]` int32 (-1: padding). BF16 `n`, `k`
/// multiples of 8; FP8 `n`, `k` multiples of 128.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_gemm_contiguous(
    device: MoekitDevice,
    shape: MoekitGemmShape,
    a: *const MoekitGemmOperand,
    b: *const MoekitGemmOperand,
    m_indices: *const i32,
    d: *mut u16,
) -> i32 {
    run(device, |x| {
        let g = Gemm::new(Op::Contiguous, &shape, a, b)?;
        let ids = input("m_indices", m_indices, g.lens.ids)?;
        let d = output("d", d.cast::<bf16>(), g.lens.d)?;
        g.check_disjoint(vec![ids.span(), d.span()])?;
        let s = g.shape;
        raw::m_grouped_contiguous(x.launcher(), s, g.a.dev(x), g.a_layout, g.b.dev(x), ids.dev(x), d.dev_mut(x))?;
        if x.is_cpu() {
            let (av, bv) = (g.a.host(s.m, s.k, g.a_layout, None)?, g.b.host(s.n, s.k, g.a_layout, Some(s.groups))?);
            let mut out = vec![0.0f32; s.m * s.n];
            reference::m_grouped_contiguous(&av, &bv, ids.host(), s.groups, s.n, s.k, &mut out)?;
            store_rows(&out, s.n, d.host_mut(), valid_group(ids.host(), s.groups));
        }
        Ok(())
    })
}

/// m-grouped masked: `d [G, m, n]` (BF16) rows `r < masked_m[g]` get `a[g, r] . b[g]^T`; other
/// rows are not written. `a [G, m, k]` (FP8: the scales of its `G m` rows), `b [G, n, k]`,
/// `masked_m [G]` int32 (NULL: all `m` rows; values are clamped to `[0, m]`).
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_gemm_masked(
    device: MoekitDevice,
    shape: MoekitGemmShape,
    a: *const MoekitGemmOperand,
    b: *const MoekitGemmOperand,
    masked_m: *const i32,
    d: *mut u16,
) -> i32 {
    run(device, |x| {
        let g = Gemm::new(Op::Masked, &shape, a, b)?;
        let mm = opt_input("masked_m", masked_m, g.lens.ids)?;
        let d = output("d", d.cast::<bf16>(), g.lens.d)?;
        let mut spans = vec![d.span()];
        spans.extend(mm.iter().map(Buf::span));
        g.check_disjoint(spans)?;
        let s = g.shape;
        raw::m_grouped_masked(
            x.launcher(),
            s,
            g.a.dev(x),
            g.a_layout,
            g.b.dev(x),
            mm.as_ref().map(|m| m.dev(x)),
            d.dev_mut(x),
        )?;
        if x.is_cpu() {
            let valid: Vec<i32> = mm.as_ref().map_or_else(|| vec![s.m as i32; s.groups], |m| m.host().to_vec());
            let av = g.a.host(s.groups * s.m, s.k, g.a_layout, None)?;
            let bv = g.b.host(s.n, s.k, g.a_layout, Some(s.groups))?;
            let mut out = vec![0.0f32; s.groups * s.m * s.n];
            reference::m_grouped_masked(&av, &bv, &valid, s.m, s.n, s.k, &mut out)?;
            let rows = |r: usize| (r % s.m) < (valid[r / s.m].max(0) as usize).min(s.m);
            store_rows(&out, s.n, d.host_mut(), rows);
        }
        Ok(())
    })
}

/// k-grouped weight gradient: `d [G, n, k]` (f32; added to when `accumulate` is 1) with `d[g] =
/// sum over tokens t in [offsets[g], offsets[g+1]) of dy[t]^T x[t]` (each range clamped to `[0,
/// m]`). BF16: `a = dY [m, n]`, `b = X [m, k]`; FP8: `a = dY^T [n, m]`, `b = X^T [k, m]` with
/// row-major 1x128 scales along the tokens (`m` a multiple of 128). `offsets [G + 1]` int32.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_gemm_k_grouped(
    device: MoekitDevice,
    shape: MoekitGemmShape,
    a: *const MoekitGemmOperand,
    b: *const MoekitGemmOperand,
    offsets: *const i32,
    accumulate: i32,
    d: *mut f32,
) -> i32 {
    run(device, |x| {
        let acc = flag("accumulate", accumulate)?;
        let g = Gemm::new(Op::KGrouped, &shape, a, b)?;
        let offsets = input("offsets", offsets, g.lens.ids)?;
        let d = output("d", d, g.lens.d)?;
        g.check_disjoint(vec![offsets.span(), d.span()])?;
        let s = g.shape;
        raw::k_grouped(x.launcher(), s, g.a.dev(x), g.b.dev(x), offsets.dev(x), acc, d.dev_mut(x))?;
        if x.is_cpu() {
            let fp8 = matches!(g.a, Opnd::Fp8 { .. });
            let rm = ScaleLayout::RowMajor;
            // The reference takes the natural layouts dY [m, n], X [m, k].
            let (dy, xv) = if fp8 {
                (
                    transpose(&g.a.host(s.n, s.m, rm, None)?, s.n, s.m),
                    transpose(&g.b.host(s.k, s.m, rm, None)?, s.k, s.m),
                )
            } else {
                (g.a.host(s.m, s.n, rm, None)?, g.b.host(s.m, s.k, rm, None)?)
            };
            reference::k_grouped(&dy, &xv, offsets.host(), s.n, s.k, acc, d.host_mut())?;
        }
        Ok(())
    })
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
}

/// Activation gradient: `dx [m, k]` (BF16) rows with `0 <= m_indices[r] < G` get `dy[r] .
/// w[m_indices[r]]` from `dy [m, n]` (FP8: 1x128 scales along n) and the forward weights `w [G,
/// n, k]` (FP8: their 128x128 block scales), read along n; other rows are not written.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_gemm_dgrad(
    device: MoekitDevice,
    shape: MoekitGemmShape,
    dy: *const MoekitGemmOperand,
    w: *const MoekitGemmOperand,
    m_indices: *const i32,
    dx: *mut u16,
) -> i32 {
    run(device, |x| {
        let g = Gemm::new(Op::Dgrad, &shape, dy, w)?;
        let ids = input("m_indices", m_indices, g.lens.ids)?;
        let dx = output("dx", dx.cast::<bf16>(), g.lens.d)?;
        g.check_disjoint(vec![ids.span(), dx.span()])?;
        let s = g.shape;
        raw::dgrad(x.launcher(), s, g.a.dev(x), g.a_layout, g.b.dev(x), ids.dev(x), dx.dev_mut(x))?;
        if x.is_cpu() {
            let (a, b) = (g.a.host(s.m, s.n, g.a_layout, None)?, g.b.host(s.n, s.k, g.a_layout, Some(s.groups))?);
            let mut out = vec![0.0f32; s.m * s.k];
            reference::dgrad(&a, &b, ids.host(), s.groups, s.n, s.k, &mut out)?;
            store_rows(&out, s.k, dx.host_mut(), valid_group(ids.host(), s.groups));
        }
        Ok(())
    })
}

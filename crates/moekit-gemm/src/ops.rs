//! Tensor ops: the reference on the CPU (dequantize, f64 accumulation, BF16 out), the kernel
//! the dispatcher picks on a GPU or the emulator.
//!
//! Every op validates its inputs once, here, before it chooses the device (dtypes, shapes,
//! element counts, devices, the alignment of every view, and the values of `masked_m` and
//! `offsets`), so the CPU, the emulator and a GPU return the same `Result` variant for every
//! input; the CPU reference then runs only on inputs the kernels take.

use crate::raw::{self, Operand};
use crate::{reference, Error, Op, Result, ScaleLayout, Shape};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{DType, Device, Tensor};

/// A GEMM operand tensor: BF16, or FP8 E4M3 with its F32 scales.
#[derive(Debug, Clone, Copy)]
pub enum GemmInput<'a> {
    /// BF16 values.
    Bf16(&'a Tensor),
    /// E4M3 values and scales (token side: 1x128 in `layout`; weights: 128x128 blocks
    /// `[G, N/128, K/128]`, `layout` ignored).
    Fp8 {
        /// Codes.
        data: &'a Tensor,
        /// Scales.
        scales: &'a Tensor,
        /// Layout of 1x128 scales.
        layout: ScaleLayout,
    },
}

impl<'a> From<&'a moekit_dispatch::Activation> for GemmInput<'a> {
    fn from(a: &'a moekit_dispatch::Activation) -> Self {
        match (a.format, &a.scales) {
            (moekit_dispatch::ActFormat::Fp8(_, layout), Some(scales)) => {
                GemmInput::Fp8 { data: &a.data, scales, layout }
            }
            _ => GemmInput::Bf16(&a.data),
        }
    }
}

impl<'a> GemmInput<'a> {
    fn data(&self) -> &'a Tensor {
        match self {
            GemmInput::Bf16(t) => t,
            GemmInput::Fp8 { data, .. } => data,
        }
    }
    fn fp8(&self) -> bool {
        matches!(self, GemmInput::Fp8 { .. })
    }
    fn layout(&self) -> ScaleLayout {
        match self {
            GemmInput::Bf16(_) => ScaleLayout::RowMajor,
            GemmInput::Fp8 { layout, .. } => *layout,
        }
    }
    /// Checks the dtypes (data, scales), that the scales live with the data and the rank.
    fn dims(&self, what: &str, rank: usize) -> Result<&'a [usize]> {
        let t = self.data();
        let want = if self.fp8() { DType::F8E4M3 } else { DType::BF16 };
        t.expect_dtype(what, want)?;
        if let GemmInput::Fp8 { scales, .. } = self {
            scales.expect_dtype(&format!("{what} scales"), DType::F32)?;
            same_device(t, scales, &format!("{what}'s scales"))?;
        }
        if t.rank() != rank {
            return Err(Error::Shape(format!("{what} {:?}: expected rank {rank}", t.dims())));
        }
        Ok(t.dims())
    }
    /// Element counts (the data's follows from the dims checked by the op; the scales' is
    /// checked here), then alignment: the data [`raw::OPERAND_ALIGN`], the scales 4 bytes.
    fn check(&self, what: &str, elems: usize, scales: usize) -> Result<()> {
        let t = self.data();
        raw::expect(what, t.numel(), elems)?;
        if let GemmInput::Fp8 { scales: s, .. } = self {
            raw::expect(&format!("{what} scales"), s.numel(), scales)?;
        }
        let addr = if self.fp8() { addr_of::<F8E4M3>(t)? } else { addr_of::<bf16>(t)? };
        raw::check_aligned(what, addr, t.numel(), raw::OPERAND_ALIGN)?;
        if let GemmInput::Fp8 { scales: s, .. } = self {
            raw::check_aligned(&format!("{what} scales"), addr_of::<f32>(s)?, s.numel(), 4)?;
        }
        Ok(())
    }
    fn operand(&self) -> Result<Operand<'a>> {
        Ok(match self {
            GemmInput::Bf16(t) => Operand::Bf16(t.dev_ptr::<bf16>()?),
            GemmInput::Fp8 { data, scales, .. } => {
                Operand::Fp8 { data: data.dev_ptr::<F8E4M3>()?.cast::<u8>()?, scales: scales.dev_ptr::<f32>()? }
            }
        })
    }
    /// f32 values on the CPU, dequantized: token side (1x128, `rows x cols`) or weight blocks.
    fn cpu_values(&self, rows: usize, cols: usize, weights: Option<usize>) -> Result<Vec<f32>> {
        match self {
            GemmInput::Bf16(t) => Ok(t.cpu_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect()),
            GemmInput::Fp8 { data, scales, layout } => {
                let codes: Vec<u8> = data.cpu_slice::<F8E4M3>()?.iter().map(|v| v.to_bits()).collect();
                let s = scales.cpu_slice::<f32>()?;
                match weights {
                    Some(groups) => reference::dequantize_blocks(&codes, s, groups, rows, cols),
                    None => reference::dequantize_tokens(&codes, s, rows, cols, *layout),
                }
            }
        }
    }
}

/// The address a kernel would get for `t`'s first element: its device address, or on the CPU
/// its host address. Every storage starts at least 16-byte aligned in practice (devices and
/// the emulation: 256 bytes; CPU tensors: a heap allocation, 16 bytes with glibc's malloc and
/// Rust's system allocator), so the address modulo 16 is the view's byte offset modulo 16 on
/// every device.
fn addr_of<T: moekit_tensor::Element>(t: &Tensor) -> Result<u64> {
    if t.device().is_cpu() {
        Ok(t.cpu_slice::<T>()?.as_ptr() as u64)
    } else {
        Ok(t.dev_ptr::<T>()?.addr())
    }
}

fn same_device(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.device().same_as(b.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, A on {}", b.device().name(), a.device().name())))
    }
}

/// The dims of both operands (see [`GemmInput::dims`]) and whether they are FP8 (a `Dtype`
/// error unless both are BF16 or both FP8).
fn operands<'a>(
    a: &GemmInput<'a>,
    b: &GemmInput<'a>,
    names: [&str; 2],
    ranks: [usize; 2],
) -> Result<(&'a [usize], &'a [usize], bool)> {
    let (ad, bd) = (a.dims(names[0], ranks[0])?, b.dims(names[1], ranks[1])?);
    Ok((ad, bd, raw::same_dtype(a.fp8(), b.fp8())?))
}

/// Everything of an op that does not depend on values in memory, in one order on every
/// device: [`Shape::check`], the k-grouped scale layout, element counts of the scales and
/// `ids` (`what`), where every tensor lives, the alignment of every operand.
fn validate(op: Op, shape: &Shape, a: &GemmInput<'_>, b: &GemmInput<'_>, ids: Option<(&Tensor, &str)>) -> Result<()> {
    let fp8 = a.fp8() && b.fp8();
    shape.check(op, fp8)?;
    if op == Op::KGrouped && fp8 && (a.layout(), b.layout()) != (ScaleLayout::RowMajor, ScaleLayout::RowMajor) {
        return Err(Error::InvalidArgument(
            "k-grouped FP8 operands take row-major 1x128 scales along the tokens".to_string(),
        ));
    }
    let lens = raw::Lens::of(op, shape, a.layout());
    if let Some((t, what)) = ids {
        t.expect_dtype(what, DType::I32)?;
        raw::expect(what, t.numel(), lens.ids)?;
    }
    same_device(a.data(), b.data(), "B")?;
    if let Some((t, what)) = ids {
        same_device(a.data(), t, what)?;
    }
    a.check("A", lens.a, lens.a_scales)?;
    b.check("B", lens.b, lens.b_scales)
}

fn to_bf16_into(v: &[f32], out: &mut Tensor) -> Result<()> {
    for (o, &x) in out.cpu_slice_mut::<bf16>()?.iter_mut().zip(v) {
        *o = bf16::from_f32(x);
    }
    Ok(())
}

fn dev(t: &Tensor) -> &Device {
    t.device()
}

/// m-grouped contiguous: `[m, n]` BF16 from `a [m, k]`, `b [G, n, k]`, `m_indices [m]` I32.
/// Rows whose id is outside `[0, G)` (padding: -1) are zero on every device.
///
/// Errors (the same on every device; see the crate docs): mixed operand dtypes (`Dtype`), a
/// shape the kernels do not take (`Shape`, `Alignment`), a misaligned view (`Alignment`),
/// tensors on different devices (`InvalidArgument`).
pub fn m_grouped_contiguous(a: GemmInput<'_>, b: GemmInput<'_>, m_indices: &Tensor) -> Result<Tensor> {
    let (ad, bd, _) = operands(&a, &b, ["A", "B"], [2, 3])?;
    let shape = Shape { groups: bd[0], m: ad[0], n: bd[1], k: ad[1] };
    if bd[2] != ad[1] {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: K differs")));
    }
    validate(Op::Contiguous, &shape, &a, &b, Some((m_indices, "m_indices")))?;
    let mut d = Tensor::zeros(&[shape.m, shape.n], DType::BF16, dev(a.data()))?;
    match dev(a.data()).launcher() {
        None => {
            let (av, bv) = (a.cpu_values(shape.m, shape.k, None)?, b.cpu_values(shape.n, shape.k, Some(shape.groups))?);
            let mut out = vec![0.0f32; shape.m * shape.n];
            reference::m_grouped_contiguous(
                &av,
                &bv,
                m_indices.cpu_slice()?,
                shape.groups,
                shape.n,
                shape.k,
                &mut out,
            )?;
            to_bf16_into(&out, &mut d)?;
        }
        Some(on) => raw::m_grouped_contiguous(
            on,
            shape,
            a.operand()?,
            a.layout(),
            b.operand()?,
            m_indices.dev_ptr()?,
            d.dev_ptr_mut()?,
        )?,
    }
    Ok(d)
}

/// m-grouped masked: `[G, m, n]` BF16 from `a [G, m, k]`, `b [G, n, k]` and `masked_m [G]` I32
/// (None: all rows); rows past `masked_m[g]` stay zero.
///
/// Errors as [`m_grouped_contiguous`], and `InvalidArgument` when a `masked_m` value is
/// outside `[0, m]`. `masked_m` is read back to the host for that check (on a GPU: a copy and
/// a stream synchronisation; [`raw::m_grouped_masked`] has none and clamps instead), unless
/// [`raw::set_readback_validation`]`(false)`: then kernel devices clamp too.
pub fn m_grouped_masked(a: GemmInput<'_>, b: GemmInput<'_>, masked_m: Option<&Tensor>) -> Result<Tensor> {
    let (ad, bd, _) = operands(&a, &b, ["A", "B"], [3, 3])?;
    let shape = Shape { groups: ad[0], m: ad[1], n: bd[1], k: ad[2] };
    if bd[0] != ad[0] || bd[2] != ad[2] {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: groups or K differ")));
    }
    validate(Op::Masked, &shape, &a, &b, masked_m.map(|t| (t, "masked_m")))?;
    let all = vec![shape.m as i32; shape.groups];
    // The CPU always reads (host memory); kernel devices only with readback validation on.
    let read_back = raw::readback_validation() || dev(a.data()).launcher().is_none();
    let mm = match masked_m {
        Some(t) if read_back => t.to_vec::<i32>()?,
        _ => all,
    };
    if let Some((g, v)) = mm.iter().enumerate().find(|(_, &v)| v < 0 || v as usize > shape.m) {
        return Err(Error::InvalidArgument(format!("masked_m[{g}] = {v} is outside [0, M_max = {}]", shape.m)));
    }
    let mut d = Tensor::zeros(&[shape.groups, shape.m, shape.n], DType::BF16, dev(a.data()))?;
    match dev(a.data()).launcher() {
        None => {
            let av = a.cpu_values(shape.groups * shape.m, shape.k, None)?;
            let bv = b.cpu_values(shape.n, shape.k, Some(shape.groups))?;
            let mut out = vec![0.0f32; shape.groups * shape.m * shape.n];
            reference::m_grouped_masked(&av, &bv, &mm, shape.m, shape.n, shape.k, &mut out)?;
            to_bf16_into(&out, &mut d)?;
        }
        Some(on) => {
            let mm = masked_m.map(|t| t.dev_ptr::<i32>()).transpose()?;
            raw::m_grouped_masked(on, shape, a.operand()?, a.layout(), b.operand()?, mm, d.dev_ptr_mut()?)?
        }
    }
    Ok(d)
}

/// k-grouped weight gradient `[G, n, k]` F32 over the token groups `offsets [G + 1]` I32:
/// group `g` sums the tokens `offsets[g] <= t < offsets[g + 1]`. BF16: `a = dY [m, n]`,
/// `b = X [m, k]`; FP8: `a = dY^T [n, m]`, `b = X^T [k, m]` with row-major 1x128 scales along
/// the tokens. An empty group gives zeros.
///
/// Errors as [`m_grouped_contiguous`], an MN-major FP8 scale layout (`InvalidArgument`), and
/// `InvalidArgument` unless `0 <= offsets[0] <= offsets[1] <= ... <= offsets[G] <= m`
/// (groups may not overlap). `offsets` is read back to the host for that check (on a GPU: a
/// copy and a stream synchronisation; [`raw::k_grouped`] has none and clamps instead), unless
/// [`raw::set_readback_validation`]`(false)`: then kernel devices clamp too.
pub fn k_grouped(a: GemmInput<'_>, b: GemmInput<'_>, offsets: &Tensor) -> Result<Tensor> {
    let shape = k_grouped_shape(&a, &b, offsets)?;
    // Written in full (an empty group gives zeros).
    let mut d = Tensor::empty(&[shape.groups, shape.n, shape.k], DType::F32, dev(a.data()))?;
    k_grouped_into(&mut d, false, a, b, offsets, shape)?;
    Ok(d)
}

/// As [`k_grouped`], adding the result to `out [G, n, k]` F32 (gradient accumulation); `out`
/// must be on A's device and not shared with another view (`InvalidArgument`).
pub fn k_grouped_accumulate(out: &mut Tensor, a: GemmInput<'_>, b: GemmInput<'_>, offsets: &Tensor) -> Result<()> {
    let shape = k_grouped_shape(&a, &b, offsets)?;
    out.expect_dtype("k-grouped accumulator", DType::F32)?;
    if out.dims() != [shape.groups, shape.n, shape.k] {
        return Err(Error::Shape(format!(
            "accumulator {:?}, expected [{}, {}, {}]",
            out.dims(),
            shape.groups,
            shape.n,
            shape.k
        )));
    }
    same_device(a.data(), out, "the accumulator")?;
    raw::check_aligned("the accumulator", addr_of::<f32>(out)?, out.numel(), raw::OUTPUT_ALIGN)?;
    k_grouped_into(out, true, a, b, offsets, shape)
}

/// The k-grouped shape, after every check of [`k_grouped`] (offsets included).
fn k_grouped_shape(a: &GemmInput<'_>, b: &GemmInput<'_>, offsets: &Tensor) -> Result<Shape> {
    let (ad, bd, fp8) = operands(a, b, ["A", "B"], [2, 2])?;
    let (m, n, k) = if fp8 { (ad[1], ad[0], bd[0]) } else { (ad[0], ad[1], bd[1]) };
    if (fp8 && bd[1] != m) || (!fp8 && bd[0] != m) {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: token counts differ")));
    }
    let groups = offsets.numel().saturating_sub(1);
    let shape = Shape { groups, m, n, k };
    validate(Op::KGrouped, &shape, a, b, Some((offsets, "group offsets")))?;
    if !raw::readback_validation() && dev(a.data()).launcher().is_some() {
        return Ok(shape); // the kernel clamps each group to [0, m]
    }
    let o = offsets.to_vec::<i32>()?;
    let bad = |what: String| Err(Error::InvalidArgument(format!("k-grouped offsets {o:?}: {what}")));
    if o[0] < 0 || o[groups] as i64 > m as i64 {
        return bad(format!("not within [0, {m}]"));
    }
    if let Some(g) = (0..groups).find(|&g| o[g] > o[g + 1]) {
        return bad(format!("offsets[{g}] > offsets[{}] (groups must not overlap)", g + 1));
    }
    Ok(shape)
}

fn k_grouped_into(
    d: &mut Tensor,
    acc: bool,
    a: GemmInput<'_>,
    b: GemmInput<'_>,
    offsets: &Tensor,
    shape: Shape,
) -> Result<()> {
    let Shape { m, n, k, .. } = shape;
    match dev(a.data()).launcher() {
        None => {
            // The reference takes the natural layouts dY [m, n], X [m, k].
            let fp8 = a.fp8();
            let (ar, ac) = if fp8 { (n, m) } else { (m, n) };
            let (br, bc) = if fp8 { (k, m) } else { (m, k) };
            let (mut dy, mut x) = (a.cpu_values(ar, ac, None)?, b.cpu_values(br, bc, None)?);
            if fp8 {
                dy = transpose(&dy, n, m);
                x = transpose(&x, k, m);
            }
            reference::k_grouped(&dy, &x, offsets.cpu_slice()?, n, k, acc, d.cpu_slice_mut()?)
        }
        Some(on) => raw::k_grouped(on, shape, a.operand()?, b.operand()?, offsets.dev_ptr()?, acc, d.dev_ptr_mut()?),
    }
}

/// `v [rows, cols]` row-major -> `[cols, rows]`.
pub(crate) fn transpose<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
}

/// Activation gradient `[m, k]` BF16 from `dy [m, n]`, the forward weights `w [G, n, k]` and
/// `m_indices [m]`; rows whose id is outside `[0, G)` are zero. Errors as
/// [`m_grouped_contiguous`].
pub fn dgrad(dy: GemmInput<'_>, w: GemmInput<'_>, m_indices: &Tensor) -> Result<Tensor> {
    let (ad, bd, _) = operands(&dy, &w, ["dY", "W"], [2, 3])?;
    let shape = Shape { groups: bd[0], m: ad[0], n: ad[1], k: bd[2] };
    if bd[1] != ad[1] {
        return Err(Error::Shape(format!("dY {ad:?} and W {bd:?}: N differs")));
    }
    validate(Op::Dgrad, &shape, &dy, &w, Some((m_indices, "m_indices")))?;
    let mut d = Tensor::zeros(&[shape.m, shape.k], DType::BF16, dev(dy.data()))?;
    match dev(dy.data()).launcher() {
        None => {
            let (a, b) = (dy.cpu_values(shape.m, shape.n, None)?, w.cpu_values(shape.n, shape.k, Some(shape.groups))?);
            let mut out = vec![0.0f32; shape.m * shape.k];
            reference::dgrad(&a, &b, m_indices.cpu_slice()?, shape.groups, shape.n, shape.k, &mut out)?;
            to_bf16_into(&out, &mut d)?;
        }
        Some(on) => {
            raw::dgrad(on, shape, dy.operand()?, dy.layout(), w.operand()?, m_indices.dev_ptr()?, d.dev_ptr_mut()?)?
        }
    }
    Ok(d)
}

//! Tensor ops: the reference on the CPU (dequantize, f64 accumulation, BF16 out), the kernel
//! the dispatcher picks on a GPU or the emulator.

use crate::raw::{self, Operand};
use crate::{reference, Error, Op, Result, ScaleLayout, Shape, SCALE_BLOCK};
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
    fn dims(&self, what: &str, rank: usize) -> Result<&'a [usize]> {
        let t = self.data();
        let want = if self.fp8() { DType::F8E4M3 } else { DType::BF16 };
        t.expect_dtype(what, want)?;
        if let GemmInput::Fp8 { scales, .. } = self {
            scales.expect_dtype(&format!("{what} scales"), DType::F32)?;
        }
        if t.rank() != rank {
            return Err(Error::Shape(format!("{what} {:?}: expected rank {rank}", t.dims())));
        }
        Ok(t.dims())
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
                    Some(groups) => {
                        let want = groups * (rows / SCALE_BLOCK) * (cols / SCALE_BLOCK);
                        if s.len() != want {
                            return Err(Error::Shape(format!("weight scales: {} values, expected {want}", s.len())));
                        }
                        Ok(reference::dequantize_blocks(&codes, s, groups, rows, cols))
                    }
                    None => {
                        if s.len() != layout.len(rows, cols) {
                            return Err(Error::Shape(format!(
                                "scales: {} values, expected {}",
                                s.len(),
                                layout.len(rows, cols)
                            )));
                        }
                        Ok(reference::dequantize_tokens(&codes, s, rows, cols, *layout))
                    }
                }
            }
        }
    }
}

fn same_device(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.device().same_as(b.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, A on {}", b.device().name(), a.device().name())))
    }
}

fn ids(t: &Tensor, what: &str, len: usize) -> Result<()> {
    t.expect_dtype(what, DType::I32)?;
    if t.numel() != len {
        return Err(Error::Shape(format!("{what} {:?}: expected {len} values", t.dims())));
    }
    Ok(())
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

/// m-grouped contiguous: `[m, n]` BF16 from `a [m, k]`, `b [G, n, k]`, `m_indices [m]` I32;
/// padding rows (and rows with an id outside `[0, G)`) stay zero.
pub fn m_grouped_contiguous(a: GemmInput<'_>, b: GemmInput<'_>, m_indices: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims("A", 2)?, b.dims("B", 3)?);
    let shape = Shape { groups: bd[0], m: ad[0], n: bd[1], k: ad[1] };
    if bd[2] != ad[1] {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: K differs")));
    }
    shape.check(Op::Contiguous, a.fp8() && b.fp8())?;
    ids(m_indices, "m_indices", shape.m)?;
    same_device(a.data(), b.data(), "B")?;
    same_device(a.data(), m_indices, "m_indices")?;
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
pub fn m_grouped_masked(a: GemmInput<'_>, b: GemmInput<'_>, masked_m: Option<&Tensor>) -> Result<Tensor> {
    let (ad, bd) = (a.dims("A", 3)?, b.dims("B", 3)?);
    let shape = Shape { groups: ad[0], m: ad[1], n: bd[1], k: ad[2] };
    if bd[0] != ad[0] || bd[2] != ad[2] {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: groups or K differ")));
    }
    shape.check(Op::Masked, a.fp8() && b.fp8())?;
    same_device(a.data(), b.data(), "B")?;
    if let Some(mm) = masked_m {
        ids(mm, "masked_m", shape.groups)?;
        same_device(a.data(), mm, "masked_m")?;
    }
    let mut d = Tensor::zeros(&[shape.groups, shape.m, shape.n], DType::BF16, dev(a.data()))?;
    match dev(a.data()).launcher() {
        None => {
            let av = a.cpu_values(shape.groups * shape.m, shape.k, None)?;
            let bv = b.cpu_values(shape.n, shape.k, Some(shape.groups))?;
            let all = vec![shape.m as i32; shape.groups];
            let mm = masked_m.map(|t| t.cpu_slice::<i32>()).transpose()?.unwrap_or(&all);
            let mut out = vec![0.0f32; shape.groups * shape.m * shape.n];
            reference::m_grouped_masked(&av, &bv, mm, shape.m, shape.n, shape.k, &mut out)?;
            to_bf16_into(&out, &mut d)?;
        }
        Some(on) => {
            let mm = masked_m.map(|t| t.dev_ptr::<i32>()).transpose()?;
            raw::m_grouped_masked(on, shape, a.operand()?, a.layout(), b.operand()?, mm, d.dev_ptr_mut()?)?
        }
    }
    Ok(d)
}

/// k-grouped weight gradient `[G, n, k]` F32 over the token groups `offsets [G + 1]` I32.
/// BF16: `a = dY [m, n]`, `b = X [m, k]`; FP8: `a = dY^T [n, m]`, `b = X^T [k, m]` with 1x128
/// scales along the tokens. An empty group gives zeros.
pub fn k_grouped(a: GemmInput<'_>, b: GemmInput<'_>, offsets: &Tensor) -> Result<Tensor> {
    let shape = k_grouped_shape(&a, &b, offsets)?;
    // Written in full (an empty group gives zeros).
    let mut d = Tensor::empty(&[shape.groups, shape.n, shape.k], DType::F32, dev(a.data()))?;
    k_grouped_into(&mut d, false, a, b, offsets, shape)?;
    Ok(d)
}

/// As [`k_grouped`], adding the result to `out [G, n, k]` F32 (gradient accumulation).
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
    k_grouped_into(out, true, a, b, offsets, shape)
}

fn k_grouped_shape(a: &GemmInput<'_>, b: &GemmInput<'_>, offsets: &Tensor) -> Result<Shape> {
    let (ad, bd) = (a.dims("A", 2)?, b.dims("B", 2)?);
    let fp8 = a.fp8() && b.fp8();
    let (m, n, k) = if fp8 { (ad[1], ad[0], bd[0]) } else { (ad[0], ad[1], bd[1]) };
    if (fp8 && bd[1] != m) || (!fp8 && bd[0] != m) {
        return Err(Error::Shape(format!("A {ad:?} and B {bd:?}: token counts differ")));
    }
    let groups = offsets.numel().saturating_sub(1);
    let shape = Shape { groups, m, n, k };
    shape.check(Op::KGrouped, fp8)?;
    ids(offsets, "group offsets", groups + 1)?;
    same_device(a.data(), b.data(), "B")?;
    same_device(a.data(), offsets, "group offsets")?;
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

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
}

/// Activation gradient `[m, k]` BF16 from `dy [m, n]`, the forward weights `w [G, n, k]` and
/// `m_indices [m]`; padding rows stay zero.
pub fn dgrad(dy: GemmInput<'_>, w: GemmInput<'_>, m_indices: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (dy.dims("dY", 2)?, w.dims("W", 3)?);
    let shape = Shape { groups: bd[0], m: ad[0], n: ad[1], k: bd[2] };
    if bd[1] != ad[1] {
        return Err(Error::Shape(format!("dY {ad:?} and W {bd:?}: N differs")));
    }
    shape.check(Op::Dgrad, dy.fp8() && w.fp8())?;
    ids(m_indices, "m_indices", shape.m)?;
    same_device(dy.data(), w.data(), "W")?;
    same_device(dy.data(), m_indices, "m_indices")?;
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

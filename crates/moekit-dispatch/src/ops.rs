//! Tensor ops: the reference on `Device::Cpu`, the kernels on a GPU or the emulator.

use crate::raw::{self, ActOut, LayoutOut};
use crate::{max_rows, reference, ActFormat, DispatchConfig, Error, Result, ScaleKind, ScaleLayout, QUANT_GROUP};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{DType, Device, Tensor};

/// A dispatch layout on a device (see the crate docs).
#[derive(Debug, Clone)]
pub struct DispatchLayout {
    /// The configuration it was made with.
    pub config: DispatchConfig,
    /// `[E + 1]` I32 aligned segment starts; `offsets[E]` = rows used.
    pub offsets: Tensor,
    /// `[E]` I32 pairs per expert.
    pub counts: Tensor,
    /// `[T, k]` I32 row of each (token, slot), -1 when not routed.
    pub row_map: Tensor,
    /// `[max_rows]` I32 expert of each row, -1 for padding (the grouped GEMM's `m_indices`).
    pub m_indices: Tensor,
    /// `[2]` I32: ids outside `[-1, E)` (skipped), rows needed.
    pub status: Tensor,
}

impl DispatchLayout {
    /// Rows of every row-indexed output (the bound the layout was made with).
    pub fn max_rows(&self) -> usize {
        self.m_indices.numel()
    }
    /// Tokens.
    pub fn tokens(&self) -> usize {
        self.row_map.dims()[0]
    }
    /// Rows used, `offsets[E]` (reads one value back: a synchronisation on a GPU).
    pub fn rows_used(&self) -> Result<usize> {
        Ok(self.offsets.narrow(0, self.config.experts, 1)?.to_vec::<i32>()?[0] as usize)
    }
    /// Errors when an id was outside `[-1, E)` or the rows needed exceeded [`Self::max_rows`]
    /// (reads the status back: a synchronisation on a GPU).
    pub fn check(&self) -> Result<()> {
        let s = self.status.to_vec::<i32>()?;
        if s[0] > 0 {
            return Err(Error::InvalidArgument(format!("{} expert ids outside [-1, {})", s[0], self.config.experts)));
        }
        if s[1] as usize > self.max_rows() {
            return Err(Error::Shape(format!(
                "the dispatch needs {} rows, the outputs have {}",
                s[1],
                self.max_rows()
            )));
        }
        Ok(())
    }
}

/// An activation in BF16 or FP8 with its scales.
#[derive(Debug, Clone)]
pub struct Activation {
    /// `[rows, cols]` BF16 or F8E4M3.
    pub data: Tensor,
    /// FP8: F32 scales, `[rows, cols / 128]` (row-major) or `[cols / 128, stride]` (MN-major).
    pub scales: Option<Tensor>,
    /// The format.
    pub format: ActFormat,
}

/// The permuted activations of [`dispatch`].
pub type Permuted = Activation;

fn expect(what: &str, t: &Tensor, dtype: DType, rank: usize) -> Result<()> {
    t.expect_dtype(what, dtype)?;
    if t.rank() != rank {
        return Err(Error::Shape(format!("{what} {:?}: expected rank {rank}", t.dims())));
    }
    Ok(())
}

fn same_device(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.device().same_as(b.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, expected {}", b.device().name(), a.device().name())))
    }
}

/// Checks that a BF16 input's first element is 16-byte aligned where the kernels would read it
/// (the vector loads; see the crate docs), on every device before the device is chosen, so that
/// a misaligned view is the same `Error::Alignment` on the CPU as on a GPU or the emulator. On
/// the CPU that is the host address: tensor storage there comes from the system allocator
/// (malloc, 16-byte aligned), as device and emulator storage is 256-byte aligned, so the
/// address's residue is the view's offset's on every device. Empty tensors pass.
fn expect_aligned(what: &str, t: &Tensor) -> Result<()> {
    let addr = match t.device().launcher() {
        None => t.cpu_slice::<bf16>()?.as_ptr() as u64,
        Some(_) => t.dev_ptr::<bf16>()?.addr(),
    };
    raw::expect_aligned(what, addr, t.numel())
}

/// An output activation `[rows, cols]` (and its scales), allocated without a fill: the kernels
/// and the reference write every element the contract defines (rows the padding policy skips,
/// the rows at and past `offsets[E]`, and the MN-major scale rows past `rows` of a permute are
/// unspecified; the row-wise activation kernels write all of theirs).
fn new_activation(rows: usize, cols: usize, format: ActFormat, dev: &Device) -> Result<Activation> {
    format.check_cols(cols)?;
    let (dtype, scales) = match format {
        ActFormat::Bf16 => (DType::BF16, None),
        ActFormat::Fp8(_, l) => {
            let dims = match l {
                ScaleLayout::RowMajor => vec![rows, cols / QUANT_GROUP],
                ScaleLayout::MnMajor => vec![cols / QUANT_GROUP, ScaleLayout::mn_stride(rows)],
            };
            (DType::F8E4M3, Some(Tensor::empty(&dims, DType::F32, dev)?))
        }
    };
    Ok(Activation { data: Tensor::empty(&[rows, cols], dtype, dev)?, scales, format })
}

impl Activation {
    fn cpu_parts(&mut self) -> Result<(&mut [u8], &mut [f32])> {
        let data: &mut [u8] = match self.format {
            ActFormat::Bf16 => bytemuck_bytes(self.data.cpu_slice_mut::<bf16>()?),
            ActFormat::Fp8(..) => bytemuck_bytes(self.data.cpu_slice_mut::<F8E4M3>()?),
        };
        let scales: &mut [f32] = match self.scales.as_mut() {
            Some(s) => s.cpu_slice_mut::<f32>()?,
            None => &mut [],
        };
        Ok((data, scales))
    }
    fn dev_out(&mut self) -> Result<ActOut<'_>> {
        let data = match self.format {
            ActFormat::Bf16 => self.data.dev_ptr_mut::<bf16>()?.cast::<u8>()?,
            ActFormat::Fp8(..) => self.data.dev_ptr_mut::<F8E4M3>()?.cast::<u8>()?,
        };
        let scales = self.scales.as_mut().map(|s| s.dev_ptr_mut::<f32>()).transpose()?;
        Ok(ActOut { data, scales, format: self.format })
    }
}

fn bytemuck_bytes<T: bytemuck::Pod>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

/// Computes the dispatch layout of `topk_ids [T, k]` I32. Outputs have `rows` rows (None: the
/// bound [`max_rows`]; a caller that knows a tighter bound passes it, and rows needed past it
/// are dropped and reported by [`DispatchLayout::check`]). An id outside `[-1, E)` is skipped
/// (not routed) and reported by [`DispatchLayout::check`], on every device (a device cannot
/// see the ids without a synchronisation).
pub fn dispatch_layout(topk_ids: &Tensor, cfg: &DispatchConfig, rows: Option<usize>) -> Result<DispatchLayout> {
    cfg.validate()?;
    expect("topk_ids", topk_ids, DType::I32, 2)?;
    if topk_ids.dims()[1] != cfg.top_k {
        return Err(Error::Shape(format!("topk_ids {:?}, expected [T, {}]", topk_ids.dims(), cfg.top_k)));
    }
    let tokens = topk_ids.dims()[0];
    let max_rows = rows.unwrap_or_else(|| max_rows(tokens, cfg.top_k, cfg.experts, cfg.align));
    if tokens * cfg.top_k > i32::MAX as usize / 2 || max_rows > i32::MAX as usize / 2 {
        return Err(Error::Shape(format!("{} pairs / {max_rows} rows exceed the i32 row index", tokens * cfg.top_k)));
    }
    let dev = topk_ids.device();
    // Every element of every layout output (and of the scratch) is written by the kernels.
    let zeros = |dims: &[usize]| Tensor::empty(dims, DType::I32, dev);
    let mut l = DispatchLayout {
        config: *cfg,
        offsets: zeros(&[cfg.experts + 1])?,
        counts: zeros(&[cfg.experts])?,
        row_map: zeros(&[tokens, cfg.top_k])?,
        m_indices: zeros(&[max_rows])?,
        status: zeros(&[2])?,
    };
    match dev.launcher() {
        None => {
            let r = reference::layout(topk_ids.cpu_slice::<i32>()?, cfg, max_rows)?;
            let needed = r.offsets[cfg.experts];
            l.offsets.cpu_slice_mut::<i32>()?.copy_from_slice(&r.offsets);
            l.counts.cpu_slice_mut::<i32>()?.copy_from_slice(&r.counts);
            l.row_map.cpu_slice_mut::<i32>()?.copy_from_slice(&r.row_map);
            l.m_indices.cpu_slice_mut::<i32>()?.copy_from_slice(&r.m_indices);
            l.status.cpu_slice_mut::<i32>()?.copy_from_slice(&[r.invalid_ids as i32, needed]);
        }
        Some(on) => {
            let mut scratch = zeros(&[raw::layout_scratch_len(tokens * cfg.top_k, cfg.experts)])?;
            let out = LayoutOut {
                offsets: l.offsets.dev_ptr_mut()?,
                counts: l.counts.dev_ptr_mut()?,
                row_map: l.row_map.dev_ptr_mut()?,
                m_indices: l.m_indices.dev_ptr_mut()?,
                status: l.status.dev_ptr_mut()?,
            };
            raw::layout(on, cfg, topk_ids.dev_ptr()?, scratch.dev_ptr_mut()?, out)?;
        }
    }
    Ok(l)
}

/// Permutes `x [T, H]` BF16 to the rows of `layout` in `format`.
pub fn permute(x: &Tensor, layout: &DispatchLayout, format: ActFormat) -> Result<Activation> {
    expect("dispatch input", x, DType::BF16, 2)?;
    same_device(x, &layout.row_map, "the layout")?;
    expect_aligned("the dispatch input", x)?;
    let (tokens, hidden) = (x.dims()[0], x.dims()[1]);
    if tokens != layout.tokens() {
        return Err(Error::Shape(format!("{tokens} tokens, the layout has {}", layout.tokens())));
    }
    let cfg = &layout.config;
    let mut out = new_activation(layout.max_rows(), hidden, format, x.device())?;
    match x.device().launcher() {
        None => {
            let l = reference::Layout {
                offsets: layout.offsets.to_vec()?,
                counts: layout.counts.to_vec()?,
                row_map: layout.row_map.to_vec()?,
                m_indices: layout.m_indices.to_vec()?,
                invalid_ids: 0,
            };
            let (data, scales) = out.cpu_parts()?;
            reference::permute(x.cpu_slice()?, hidden, &l, cfg.top_k, format, cfg.padding, data, scales)?;
        }
        Some(on) => {
            let max_rows = layout.max_rows();
            let o = out.dev_out()?;
            raw::permute(
                on,
                cfg,
                x.dev_ptr()?,
                hidden,
                layout.row_map.dev_ptr()?,
                layout.offsets.dev_ptr()?,
                layout.counts.dev_ptr()?,
                max_rows,
                o,
            )?;
        }
    }
    Ok(out)
}

/// Layout and permutation in one call: `x [T, H]` BF16, `topk_ids [T, k]` I32.
pub fn dispatch(
    x: &Tensor,
    topk_ids: &Tensor,
    cfg: &DispatchConfig,
    format: ActFormat,
) -> Result<(DispatchLayout, Activation)> {
    expect("dispatch input", x, DType::BF16, 2)?;
    format.check_cols(x.dims()[1])?;
    same_device(x, topk_ids, "topk_ids")?;
    expect_aligned("the dispatch input", x)?;
    let layout = dispatch_layout(topk_ids, cfg, None)?;
    let out = permute(x, &layout, format)?;
    Ok((layout, out))
}

/// 1x128 FP8 quantization of `x [rows, cols]` BF16 (`cols` a multiple of 128).
pub fn quantize_fp8(x: &Tensor, kind: ScaleKind, layout: ScaleLayout) -> Result<Activation> {
    expect("quantization input", x, DType::BF16, 2)?;
    expect_aligned("the quantization input", x)?;
    let (rows, cols) = (x.dims()[0], x.dims()[1]);
    let format = ActFormat::Fp8(kind, layout);
    let mut out = new_activation(rows, cols, format, x.device())?;
    match x.device().launcher() {
        None => {
            let (data, scales) = out.cpu_parts()?;
            reference::quantize(x.cpu_slice()?, cols, format, data, scales)?;
        }
        Some(on) => {
            let o = out.dev_out()?;
            raw::quantize(on, x.dev_ptr()?, cols, o)?;
        }
    }
    Ok(out)
}

/// SwiGLU of `x [rows, 2 I]` BF16 (gate columns first) to `[rows, I]` in `format`.
pub fn swiglu(x: &Tensor, format: ActFormat) -> Result<Activation> {
    expect("SwiGLU input", x, DType::BF16, 2)?;
    expect_aligned("the SwiGLU input", x)?;
    let (rows, two_i) = (x.dims()[0], x.dims()[1]);
    if two_i % 2 != 0 {
        return Err(Error::Shape(format!("SwiGLU input {:?}: odd column count", x.dims())));
    }
    let cols = two_i / 2;
    let mut out = new_activation(rows, cols, format, x.device())?;
    match x.device().launcher() {
        None => {
            let (data, scales) = out.cpu_parts()?;
            reference::swiglu(x.cpu_slice()?, cols, format, data, scales)?;
        }
        Some(on) => {
            let o = out.dev_out()?;
            raw::swiglu(on, x.dev_ptr()?, cols, o)?;
        }
    }
    Ok(out)
}

/// Gradient of SwiGLU w.r.t. `x [rows, 2 I]` from `grad_out [rows, I]` (both BF16).
pub fn swiglu_backward(x: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    expect("SwiGLU input", x, DType::BF16, 2)?;
    expect("SwiGLU grad", grad_out, DType::BF16, 2)?;
    same_device(x, grad_out, "SwiGLU grad")?;
    if x.dims()[1] != 2 * grad_out.dims()[1] || x.dims()[0] != grad_out.dims()[0] {
        return Err(Error::Shape(format!("SwiGLU x {:?} vs grad {:?}", x.dims(), grad_out.dims())));
    }
    expect_aligned("the SwiGLU input", x)?;
    expect_aligned("the SwiGLU grad", grad_out)?;
    let cols = grad_out.dims()[1];
    let mut g = Tensor::empty(x.dims(), DType::BF16, x.device())?;
    match x.device().launcher() {
        None => {
            let r = reference::swiglu_backward(x.cpu_slice()?, grad_out.cpu_slice()?, cols)?;
            g.cpu_slice_mut::<bf16>()?.copy_from_slice(&r);
        }
        Some(on) => raw::swiglu_backward(on, x.dev_ptr()?, grad_out.dev_ptr()?, g.dev_ptr_mut()?, cols)?,
    }
    Ok(g)
}

fn check_y(y: &Tensor, layout: &DispatchLayout, weights: Option<&Tensor>) -> Result<()> {
    expect("expert outputs", y, DType::BF16, 2)?;
    same_device(y, &layout.row_map, "the layout")?;
    if y.dims()[0] != layout.max_rows() {
        return Err(Error::Shape(format!("expert outputs {:?}: expected {} rows", y.dims(), layout.max_rows())));
    }
    expect_aligned("the expert outputs", y)?;
    if let Some(w) = weights {
        expect("combine weights", w, DType::F32, 2)?;
        same_device(y, w, "combine weights")?;
        if w.dims() != layout.row_map.dims() {
            return Err(Error::Shape(format!("combine weights {:?}, expected {:?}", w.dims(), layout.row_map.dims())));
        }
    }
    Ok(())
}

/// `out [T, H] = sum_j w[t, j] * y[row(t, j)]` from expert outputs `y [max_rows, H]` BF16 and
/// optional weights `[T, k]` F32 (None: unweighted, the backward of dispatch).
pub fn combine(y: &Tensor, layout: &DispatchLayout, weights: Option<&Tensor>) -> Result<Tensor> {
    check_y(y, layout, weights)?;
    let hidden = y.dims()[1];
    let k = layout.config.top_k;
    let mut out = Tensor::empty(&[layout.tokens(), hidden], DType::BF16, y.device())?;
    match y.device().launcher() {
        None => {
            let w = weights.map(|w| w.cpu_slice::<f32>()).transpose()?;
            let r = reference::combine(y.cpu_slice()?, hidden, layout.row_map.cpu_slice()?, k, w)?;
            out.cpu_slice_mut::<bf16>()?.copy_from_slice(&r);
        }
        Some(on) => {
            let w = weights.map(|w| w.dev_ptr::<f32>()).transpose()?;
            raw::combine(on, y.dev_ptr()?, hidden, layout.row_map.dev_ptr()?, k, w, out.dev_ptr_mut()?)?;
        }
    }
    Ok(out)
}

/// Gradients of [`combine`] from `grad_out [T, H]` BF16: `grad_y [max_rows, H]` BF16 (padding
/// rows zero) and, with weights, `grad_weights [T, k]` F32.
pub fn combine_backward(
    y: &Tensor,
    grad_out: &Tensor,
    layout: &DispatchLayout,
    weights: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    check_y(y, layout, weights)?;
    expect("combine grad", grad_out, DType::BF16, 2)?;
    same_device(y, grad_out, "combine grad")?;
    expect_aligned("the combine grad", grad_out)?;
    let hidden = y.dims()[1];
    if grad_out.dims() != [layout.tokens(), hidden] {
        return Err(Error::Shape(format!(
            "combine grad {:?}, expected [{}, {hidden}]",
            grad_out.dims(),
            layout.tokens()
        )));
    }
    let k = layout.config.top_k;
    let dev = y.device();
    // Written in full: the pairs' rows, the padding rows (zeroed) and every slot's dw.
    let mut gy = Tensor::empty(y.dims(), DType::BF16, dev)?;
    let mut gw = weights.map(|_| Tensor::empty(layout.row_map.dims(), DType::F32, dev)).transpose()?;
    match dev.launcher() {
        None => {
            let w = weights.map(|w| w.cpu_slice::<f32>()).transpose()?;
            let r = reference::combine_backward(
                y.cpu_slice()?,
                grad_out.cpu_slice()?,
                hidden,
                layout.row_map.cpu_slice()?,
                k,
                w,
                layout.offsets.cpu_slice()?,
                layout.counts.cpu_slice()?,
                gy.cpu_slice_mut()?,
            )?;
            if let (Some(t), Some(v)) = (gw.as_mut(), r) {
                t.cpu_slice_mut::<f32>()?.copy_from_slice(&v);
            }
        }
        Some(on) => {
            let w = weights.map(|w| w.dev_ptr::<f32>()).transpose()?;
            let gwp = gw.as_mut().map(|t| t.dev_ptr_mut::<f32>()).transpose()?;
            raw::combine_backward(
                on,
                y.dev_ptr()?,
                hidden,
                layout.row_map.dev_ptr()?,
                k,
                w,
                layout.offsets.dev_ptr()?,
                layout.counts.dev_ptr()?,
                grad_out.dev_ptr()?,
                gy.dev_ptr_mut()?,
                gwp,
            )?;
        }
    }
    Ok((gy, gw))
}

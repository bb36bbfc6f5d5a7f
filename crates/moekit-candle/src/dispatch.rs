//! Dispatch (layout + permute, BF16 with a gradient, FP8 1x128 forward only), SwiGLU between
//! the expert GEMMs, and the weighted combine with gradients w.r.t. the expert outputs and the
//! weights. All on moekit-dispatch's CPU path, bit for bit.

use crate::convert::{
    bad, expect_cpu, expect_dtype, expect_rank, ids_to_mt, mt_to_storage, mt_to_tensor, storage_to_mt, tensor_to_mt,
    wrap,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use moekit_dispatch::{ActFormat, DispatchConfig, ScaleKind, ScaleLayout};
use std::sync::Arc;

/// A dispatch layout (see [`moekit_dispatch`]'s crate docs): where each (token, slot) pair's
/// row is in the permuted activations, as candle tensors (the fields of
/// [`moekit_dispatch::DispatchLayout`], same dims, I32). Not differentiable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DispatchLayout {
    /// The configuration.
    pub config: DispatchConfig,
    /// `[E + 1]` segment starts.
    pub offsets: Tensor,
    /// `[E]` pairs per expert.
    pub counts: Tensor,
    /// `[T, k]` row of each pair (-1: not routed).
    pub row_map: Tensor,
    /// `[max_rows]` expert of each row (-1: padding); the grouped GEMMs' `m_indices`.
    pub m_indices: Tensor,
    /// moekit's layout on the CPU, which the ops run on.
    pub(crate) inner: Arc<moekit_dispatch::DispatchLayout>,
}

impl DispatchLayout {
    /// Rows of every row-indexed tensor (the bound [`moekit_dispatch::max_rows`]).
    pub fn max_rows(&self) -> usize {
        self.inner.max_rows()
    }
    /// Tokens.
    pub fn tokens(&self) -> usize {
        self.inner.tokens()
    }
    /// Rows used, `offsets[E]`.
    pub fn rows_used(&self) -> Result<usize> {
        self.inner.rows_used().map_err(wrap)
    }
}

/// The dispatch layout of `topk_ids [T, k]` (U32 or I32; `u32::MAX` / `-1` = not routed).
/// Errors on an id outside `[-1, E)` (moekit skips it and reports it; here the report is
/// the error).
pub fn dispatch_layout(topk_ids: &Tensor, cfg: &DispatchConfig) -> Result<DispatchLayout> {
    expect_cpu("topk_ids", topk_ids)?;
    let ids = ids_to_mt(topk_ids, "topk_ids")?;
    let l = moekit_dispatch::dispatch_layout(&ids, cfg, None).map_err(wrap)?;
    l.check().map_err(wrap)?;
    Ok(DispatchLayout {
        config: *cfg,
        offsets: mt_to_tensor(&l.offsets)?,
        counts: mt_to_tensor(&l.counts)?,
        row_map: mt_to_tensor(&l.row_map)?,
        m_indices: mt_to_tensor(&l.m_indices)?,
        inner: Arc::new(l),
    })
}

fn check_x(what: &str, x: &Tensor, layout: &DispatchLayout) -> Result<()> {
    expect_cpu(what, x)?;
    expect_dtype(what, x, &[DType::BF16])?;
    let d = expect_rank(what, x, 2)?;
    if d[0] != layout.tokens() {
        return bad(format!("{what} {d:?}: {} tokens, the layout has {}", d[0], layout.tokens()));
    }
    Ok(())
}

/// Permutes `x [T, H]` BF16 (`H` a multiple of 8) to the layout's rows: `[max_rows, H]` BF16,
/// row `row_map[t, j]` = `x[t]`; padding rows are zero (moekit's CPU buffers start zeroed;
/// [`moekit_dispatch::Padding::Skip`] leaves them unwritten). Differentiable w.r.t. `x`: the
/// backward is moekit's unweighted combine (`grad_x[t] = sum_j grad[row(t, j)]` in f32, slot
/// order, rounded to BF16 once).
pub fn permute(x: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
    check_x("dispatch input", x, layout)?;
    x.contiguous()?.apply_op1(Permute { layout: layout.inner.clone() })
}

struct Permute {
    layout: Arc<moekit_dispatch::DispatchLayout>,
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "moekit-permute"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_to_mt(s, l, "dispatch input")?;
        let p = moekit_dispatch::permute(&x, &self.layout, ActFormat::Bf16).map_err(wrap)?;
        mt_to_storage(&p.data)
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = tensor_to_mt(&grad.to_dtype(DType::BF16)?, "grad of the permuted rows")?;
        let gx = moekit_dispatch::combine(&g, &self.layout, None).map_err(wrap)?;
        Ok(Some(mt_to_tensor(&gx)?))
    }
}

/// FP8 activations with their 1x128 scales (what [`permute_fp8`] returns and the FP8 grouped
/// GEMM takes).
#[derive(Debug, Clone)]
pub struct Fp8Activation {
    /// `[rows, cols]` F8E4M3 codes.
    pub data: Tensor,
    /// F32 scales: `[rows, cols / 128]` (row-major) or `[cols / 128, round_up(rows, 4)]`
    /// (MN-major, DeepGEMM's TMA-aligned layout).
    pub scales: Tensor,
    /// Scale layout.
    pub layout: ScaleLayout,
}

/// Permute with fused 1x128 FP8 E4M3 quantization: `x [T, H]` BF16 (`H` a multiple of 128)
/// to `[max_rows, H]` F8E4M3 and its F32 scales (`scale = amax / 448`, or a power of two
/// with [`ScaleKind::Ue8m0`]). Forward only (no gradient flows to `x`: quantization has none
/// worth the name; train through [`permute`]). Padding rows are zero codes with zero scales.
pub fn permute_fp8(x: &Tensor, layout: &DispatchLayout, kind: ScaleKind, scales: ScaleLayout) -> Result<Fp8Activation> {
    check_x("dispatch input", x, layout)?;
    let xm = tensor_to_mt(&x.detach(), "dispatch input")?;
    let p = moekit_dispatch::permute(&xm, &layout.inner, ActFormat::Fp8(kind, scales)).map_err(wrap)?;
    let s = match &p.scales {
        Some(s) => mt_to_tensor(s)?,
        None => return bad("FP8 permute returned no scales".into()),
    };
    Ok(Fp8Activation { data: mt_to_tensor(&p.data)?, scales: s, layout: scales })
}

/// SwiGLU of `x [rows, 2 I]` BF16 (gate columns first, then up; `I` a multiple of 8):
/// `silu(g) * u`, `[rows, I]` BF16, moekit's arithmetic. Differentiable (moekit's
/// `swiglu_backward`, BF16 gradient).
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    expect_cpu("SwiGLU input", x)?;
    expect_dtype("SwiGLU input", x, &[DType::BF16])?;
    expect_rank("SwiGLU input", x, 2)?;
    x.contiguous()?.apply_op1(Swiglu)
}

struct Swiglu;

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "moekit-swiglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_to_mt(s, l, "SwiGLU input")?;
        let y = moekit_dispatch::swiglu(&x, ActFormat::Bf16).map_err(wrap)?;
        mt_to_storage(&y.data)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = moekit_dispatch::swiglu_backward(
            &tensor_to_mt(x, "SwiGLU input")?,
            &tensor_to_mt(&grad.to_dtype(DType::BF16)?, "SwiGLU grad")?,
        )
        .map_err(wrap)?;
        Ok(Some(mt_to_tensor(&g)?))
    }
}

/// Weighted combine: `out [T, H] = sum_j w[t, j] * y[row(t, j)]` from expert outputs
/// `y [max_rows, H]` BF16 and `weights [T, k]` F32, in f32 in slot order, rounded to BF16 once.
/// Differentiable w.r.t. `y` (`grad_y[row(t, j)] = w[t, j] grad[t]` in BF16, padding rows
/// zero) and `weights` (`<grad[t], y[row(t, j)]>` in f32, moekit's fixed summation order).
pub fn combine(y: &Tensor, weights: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
    expect_cpu("expert outputs", y)?;
    expect_cpu("combine weights", weights)?;
    expect_dtype("expert outputs", y, &[DType::BF16])?;
    expect_dtype("combine weights", weights, &[DType::F32])?;
    let d = expect_rank("expert outputs", y, 2)?;
    if d[0] != layout.max_rows() {
        return bad(format!("expert outputs {d:?}: expected {} rows", layout.max_rows()));
    }
    crate::convert::expect_dims("combine weights", weights, layout.row_map.dims())?;
    y.contiguous()?.apply_op2(&weights.contiguous()?, Combine { layout: layout.inner.clone() })
}

struct Combine {
    layout: Arc<moekit_dispatch::DispatchLayout>,
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "moekit-combine"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = storage_to_mt(s1, l1, "expert outputs")?;
        let w = storage_to_mt(s2, l2, "combine weights")?;
        let out = moekit_dispatch::combine(&y, &self.layout, Some(&w)).map_err(wrap)?;
        mt_to_storage(&out)
    }
    fn bwd(&self, y: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let wm = tensor_to_mt(w, "combine weights")?;
        let (gy, gw) = moekit_dispatch::combine_backward(
            &tensor_to_mt(y, "expert outputs")?,
            &tensor_to_mt(&grad.to_dtype(DType::BF16)?, "combine grad")?,
            &self.layout,
            Some(&wm),
        )
        .map_err(wrap)?;
        let gw = match gw {
            Some(g) => mt_to_tensor(&g)?,
            None => return bad("combine backward returned no weight gradient".into()),
        };
        Ok((Some(mt_to_tensor(&gy)?), Some(gw)))
    }
}

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
    /// moekit's layout on the CPU, which the CPU ops run on (None for CUDA tensors: the
    /// CUDA ops read the tensors above).
    pub(crate) inner: Option<Arc<moekit_dispatch::DispatchLayout>>,
    /// CUDA: moekit's `[2]` I32 status (ids outside `[-1, E)`, rows needed), read by
    /// [`DispatchLayout::check`]. CPU layouts were checked when made.
    pub(crate) status: Option<Tensor>,
}

impl DispatchLayout {
    /// Rows of every row-indexed tensor (the bound [`moekit_dispatch::max_rows`]).
    pub fn max_rows(&self) -> usize {
        self.m_indices.dims()[0]
    }
    /// Tokens.
    pub fn tokens(&self) -> usize {
        self.row_map.dims()[0]
    }
    /// Rows used, `offsets[E]` (on CUDA it reads one value back: a synchronisation).
    pub fn rows_used(&self) -> Result<usize> {
        match &self.inner {
            Some(l) => l.rows_used().map_err(wrap),
            None => Ok(self.offsets.narrow(0, self.config.experts, 1)?.to_vec1::<i32>()?[0] as usize),
        }
    }
    /// Errors when an id was outside `[-1, E)` (moekit's kernels skip it) or more rows were
    /// needed than [`DispatchLayout::max_rows`]. A CPU layout was checked by
    /// [`dispatch_layout`] already (Ok here); a CUDA layout is checked here, reading moekit's
    /// status back (a synchronisation, which [`dispatch_layout`] does not make).
    pub fn check(&self) -> Result<()> {
        let Some(status) = &self.status else { return Ok(()) };
        let s = status.to_vec1::<i32>()?;
        if s[0] != 0 {
            return bad(format!("{} expert ids outside [-1, {}) were skipped", s[0], self.config.experts));
        }
        if s[1] as usize > self.max_rows() {
            return bad(format!("the layout needs {} rows, more than max_rows = {}", s[1], self.max_rows()));
        }
        Ok(())
    }

    /// moekit's CPU layout (CPU tensors only).
    fn cpu(&self) -> Result<&Arc<moekit_dispatch::DispatchLayout>> {
        match &self.inner {
            Some(l) => Ok(l),
            None => bad("internal: a CUDA dispatch layout reached a CPU op".into()),
        }
    }
}

/// The dispatch layout of `topk_ids [T, k]` (U32 or I32; `u32::MAX` / `-1` = not routed).
/// On the CPU, errors on an id outside `[-1, E)` (moekit skips it and reports it; here the
/// report is the error). On CUDA the layout is computed without a synchronisation: such ids
/// are skipped, and [`DispatchLayout::check`] reads the report back when asked.
pub fn dispatch_layout(topk_ids: &Tensor, cfg: &DispatchConfig) -> Result<DispatchLayout> {
    expect_cpu("topk_ids", topk_ids)?;
    #[cfg(feature = "cuda")]
    if topk_ids.device().is_cuda() {
        return cuda::dispatch_layout(topk_ids, cfg);
    }
    let ids = ids_to_mt(topk_ids, "topk_ids")?;
    let l = moekit_dispatch::dispatch_layout(&ids, cfg, None).map_err(wrap)?;
    l.check().map_err(wrap)?;
    Ok(DispatchLayout {
        config: *cfg,
        offsets: mt_to_tensor(&l.offsets)?,
        counts: mt_to_tensor(&l.counts)?,
        row_map: mt_to_tensor(&l.row_map)?,
        m_indices: mt_to_tensor(&l.m_indices)?,
        inner: Some(Arc::new(l)),
        status: None,
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
    #[cfg(feature = "cuda")]
    crate::cuda::same_device("the dispatch layout", &layout.row_map, x)?;
    x.contiguous()?.apply_op1(Permute { layout: layout.clone() })
}

pub(crate) struct Permute {
    pub(crate) layout: DispatchLayout,
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "moekit-permute"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_to_mt(s, l, "dispatch input")?;
        let p = moekit_dispatch::permute(&x, self.layout.cpu()?, ActFormat::Bf16).map_err(wrap)?;
        mt_to_storage(&p.data)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        cuda::permute(&self.layout, s, l)
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let g = grad.to_dtype(DType::BF16)?.contiguous()?;
            return Ok(Some(g.apply_op1_no_bwd(&cuda::Unpermute { layout: self.layout.clone() })?));
        }
        let g = tensor_to_mt(&grad.to_dtype(DType::BF16)?, "grad of the permuted rows")?;
        let gx = moekit_dispatch::combine(&g, self.layout.cpu()?, None).map_err(wrap)?;
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
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        crate::cuda::same_device("the dispatch layout", &layout.row_map, x)?;
        return cuda::permute_fp8(&x.detach().contiguous()?, layout, kind, scales);
    }
    let xm = tensor_to_mt(&x.detach(), "dispatch input")?;
    let p = moekit_dispatch::permute(&xm, layout.cpu()?, ActFormat::Fp8(kind, scales)).map_err(wrap)?;
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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        cuda::swiglu(s, l)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let g = grad.to_dtype(DType::BF16)?.contiguous()?;
            return Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g, &cuda::SwigluBwd)?));
        }
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
    #[cfg(feature = "cuda")]
    crate::cuda::same_device("the dispatch layout", &layout.row_map, y)?;
    y.contiguous()?.apply_op2(&weights.contiguous()?, Combine { layout: layout.clone() })
}

struct Combine {
    layout: DispatchLayout,
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "moekit-combine"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = storage_to_mt(s1, l1, "expert outputs")?;
        let w = storage_to_mt(s2, l2, "combine weights")?;
        let out = moekit_dispatch::combine(&y, self.layout.cpu()?, Some(&w)).map_err(wrap)?;
        mt_to_storage(&out)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::cuda_backend::CudaStorage,
        l1: &Layout,
        s2: &candle_core::cuda_backend::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        cuda::combine(&self.layout, s1, l1, s2, l2)
    }
    fn bwd(&self, y: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if y.device().is_cuda() {
            let (gy, gw) = cuda::combine_backward(&self.layout, y, w, grad)?;
            return Ok((Some(gy), Some(gw)));
        }
        let wm = tensor_to_mt(w, "combine weights")?;
        let (gy, gw) = moekit_dispatch::combine_backward(
            &tensor_to_mt(y, "expert outputs")?,
            &tensor_to_mt(&grad.to_dtype(DType::BF16)?, "combine grad")?,
            self.layout.cpu()?,
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

/// The CUDA paths: moekit-dispatch's raw launchers on candle's stream.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{DispatchLayout, Fp8Activation};
    use crate::convert::{bad, expect_dtype, expect_rank, wrap};
    use crate::cuda::{cuda_of, take_side, to_tensor, Exec, Side};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
    use moekit_dispatch::raw::{self, ActOut, LayoutOut};
    use moekit_dispatch::{ActFormat, DispatchConfig, ScaleKind, ScaleLayout};
    use moekit_dtype::bf16;

    /// The layout on the device: moekit's three layout launches, no synchronisation.
    pub(super) fn dispatch_layout(topk_ids: &Tensor, cfg: &DispatchConfig) -> Result<DispatchLayout> {
        cfg.validate().map_err(wrap)?;
        expect_dtype("topk_ids", topk_ids, &[DType::U32, DType::I32])?;
        let d = expect_rank("topk_ids", topk_ids, 2)?;
        if d[1] != cfg.top_k {
            return bad(format!("topk_ids {d:?}, expected [T, {}]", cfg.top_k));
        }
        let tokens = d[0];
        let max_rows = moekit_dispatch::max_rows(tokens, cfg.top_k, cfg.experts, cfg.align);
        let ids = topk_ids.detach().contiguous()?;
        let (st, l) = ids.storage_and_layout();
        let s = cuda_of(&st, "topk_ids")?;
        let x = Exec::new(&s.device)?;
        let (idp, _gi) = x.input::<i32>(s, l, "topk_ids")?;
        // The kernels write every element of every output and of the scratch (moekit's own
        // tensor op allocates them uninitialised); zeroed here all the same: they are small.
        let mut scratch = x.zeros::<i32>(raw::layout_scratch_len(tokens * cfg.top_k, cfg.experts))?;
        let mut offsets = x.zeros::<i32>(cfg.experts + 1)?;
        let mut counts = x.zeros::<i32>(cfg.experts)?;
        let mut row_map = x.zeros::<i32>(tokens * cfg.top_k)?;
        let mut m_indices = x.zeros::<i32>(max_rows)?;
        let mut status = x.zeros::<i32>(2)?;
        {
            let (sp, _g0) = x.output::<i32, i32>(&mut scratch)?;
            let (op, _g1) = x.output::<i32, i32>(&mut offsets)?;
            let (cp, _g2) = x.output::<i32, i32>(&mut counts)?;
            let (rp, _g3) = x.output::<i32, i32>(&mut row_map)?;
            let (mp, _g4) = x.output::<i32, i32>(&mut m_indices)?;
            let (tp, _g5) = x.output::<i32, i32>(&mut status)?;
            let out = LayoutOut { offsets: op, counts: cp, row_map: rp, m_indices: mp, status: tp };
            raw::layout(x.on(), cfg, idp, sp, out).map_err(wrap)?;
        }
        Ok(DispatchLayout {
            config: *cfg,
            offsets: to_tensor(x.storage(offsets), &[cfg.experts + 1]),
            counts: to_tensor(x.storage(counts), &[cfg.experts]),
            row_map: to_tensor(x.storage(row_map), &[tokens, cfg.top_k]),
            m_indices: to_tensor(x.storage(m_indices), &[max_rows]),
            inner: None,
            status: Some(to_tensor(x.storage(status), &[2])),
        })
    }

    /// Storage guards of a layout's row map, offsets and counts.
    type Guard<'a> = (candle_core::StorageRef<'a>, &'a Layout);

    fn guards(layout: &DispatchLayout) -> [Guard<'_>; 3] {
        [layout.row_map.storage_and_layout(), layout.offsets.storage_and_layout(), layout.counts.storage_and_layout()]
    }

    pub(super) fn permute(layout: &DispatchLayout, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let hidden = l.dims()[1];
        let max_rows = layout.max_rows();
        let x = Exec::new(&s.device)?;
        let (xp, _gx) = x.input::<bf16>(s, l, "dispatch input")?;
        let g = guards(layout);
        let (rm, _g0) = x.input::<i32>(cuda_of(&g[0].0, "row_map")?, g[0].1, "row_map")?;
        let (of, _g1) = x.input::<i32>(cuda_of(&g[1].0, "offsets")?, g[1].1, "offsets")?;
        let (ct, _g2) = x.input::<i32>(cuda_of(&g[2].0, "counts")?, g[2].1, "counts")?;
        let mut out = x.zeros::<bf16>(max_rows * hidden)?;
        {
            let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
            let act = ActOut { data: op.cast::<u8>().map_err(wrap)?, scales: None, format: ActFormat::Bf16 };
            raw::permute(x.on(), &layout.config, xp, hidden, rm, of, ct, max_rows, act).map_err(wrap)?;
        }
        Ok((x.storage(out), Shape::from_dims(&[max_rows, hidden])))
    }

    pub(super) fn permute_fp8(
        xt: &Tensor,
        layout: &DispatchLayout,
        kind: ScaleKind,
        scales: ScaleLayout,
    ) -> Result<Fp8Activation> {
        let (st, l) = xt.storage_and_layout();
        let s = cuda_of(&st, "dispatch input")?;
        let hidden = l.dims()[1];
        let max_rows = layout.max_rows();
        let x = Exec::new(&s.device)?;
        let (xp, _gx) = x.input::<bf16>(s, l, "dispatch input")?;
        let g = guards(layout);
        let (rm, _g0) = x.input::<i32>(cuda_of(&g[0].0, "row_map")?, g[0].1, "row_map")?;
        let (of, _g1) = x.input::<i32>(cuda_of(&g[1].0, "offsets")?, g[1].1, "offsets")?;
        let (ct, _g2) = x.input::<i32>(cuda_of(&g[2].0, "counts")?, g[2].1, "counts")?;
        if hidden % 128 != 0 {
            return bad(format!("FP8 permute: hidden size {hidden} is not a multiple of 128"));
        }
        let scale_dims = match scales {
            ScaleLayout::RowMajor => vec![max_rows, hidden / 128],
            ScaleLayout::MnMajor => vec![hidden / 128, ScaleLayout::mn_stride(max_rows)],
        };
        // Zeroed: padding rows are zero codes with zero scales, as on the CPU.
        let mut data = x.zeros::<float8::F8E4M3>(max_rows * hidden)?;
        let mut sc = x.zeros::<f32>(scales.len(max_rows, hidden))?;
        {
            let (dp, _gd) = x.output::<float8::F8E4M3, u8>(&mut data)?;
            let (sp, _gs) = x.output::<f32, f32>(&mut sc)?;
            let act = ActOut { data: dp, scales: Some(sp), format: ActFormat::Fp8(kind, scales) };
            raw::permute(x.on(), &layout.config, xp, hidden, rm, of, ct, max_rows, act).map_err(wrap)?;
        }
        Ok(Fp8Activation {
            data: to_tensor(x.storage(data), &[max_rows, hidden]),
            scales: to_tensor(x.storage(sc), &scale_dims),
            layout: scales,
        })
    }

    /// The unweighted combine `[max_rows, H] -> [T, H]`: the permute's backward.
    pub(crate) struct Unpermute {
        pub(crate) layout: DispatchLayout,
    }

    impl CustomOp1 for Unpermute {
        fn name(&self) -> &'static str {
            "moekit-unpermute"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            crate::cuda::cpu_only(self.name())
        }
        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let (hidden, tokens, k) = (l.dims()[1], self.layout.tokens(), self.layout.config.top_k);
            let x = Exec::new(&s.device)?;
            let (yp, _gy) = x.input::<bf16>(s, l, "grad of the permuted rows")?;
            let g = guards(&self.layout);
            let (rm, _g0) = x.input::<i32>(cuda_of(&g[0].0, "row_map")?, g[0].1, "row_map")?;
            // raw::combine writes every element of its [T, H] output; zeroed all the same.
            let mut out = x.zeros::<bf16>(tokens * hidden)?;
            {
                let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
                raw::combine(x.on(), yp, hidden, rm, k, None, op).map_err(wrap)?;
            }
            Ok((x.storage(out), Shape::from_dims(&[tokens, hidden])))
        }
    }

    pub(super) fn swiglu(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, two_i) = (l.dims()[0], l.dims()[1]);
        if two_i % 2 != 0 {
            return bad(format!("SwiGLU input {:?}: an odd number of columns", l.dims()));
        }
        let cols = two_i / 2;
        let x = Exec::new(&s.device)?;
        let (xp, _gx) = x.input::<bf16>(s, l, "SwiGLU input")?;
        let mut out = x.zeros::<bf16>(rows * cols)?;
        {
            let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
            let act = ActOut { data: op.cast::<u8>().map_err(wrap)?, scales: None, format: ActFormat::Bf16 };
            raw::swiglu(x.on(), xp, cols, act).map_err(wrap)?;
        }
        Ok((x.storage(out), Shape::from_dims(&[rows, cols])))
    }

    /// `(x [rows, 2 I], grad [rows, I]) -> grad_x [rows, 2 I]` BF16.
    pub(super) struct SwigluBwd;

    impl CustomOp2 for SwigluBwd {
        fn name(&self) -> &'static str {
            "moekit-swiglu-backward"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            crate::cuda::cpu_only(self.name())
        }
        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let cols = l1.dims()[1] / 2;
            let x = Exec::new(&s1.device)?;
            let (xp, _gx) = x.input::<bf16>(s1, l1, "SwiGLU input")?;
            let (gp, _gg) = x.input::<bf16>(s2, l2, "SwiGLU grad")?;
            let mut out = x.zeros::<bf16>(l1.shape().elem_count())?;
            {
                let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
                raw::swiglu_backward(x.on(), xp, gp, op, cols).map_err(wrap)?;
            }
            Ok((x.storage(out), l1.shape().clone()))
        }
    }

    pub(super) fn combine(
        layout: &DispatchLayout,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (hidden, tokens, k) = (l1.dims()[1], layout.tokens(), layout.config.top_k);
        let x = Exec::new(&s1.device)?;
        let (yp, _gy) = x.input::<bf16>(s1, l1, "expert outputs")?;
        let (wp, _gw) = x.input::<f32>(s2, l2, "combine weights")?;
        let g = guards(layout);
        let (rm, _g0) = x.input::<i32>(cuda_of(&g[0].0, "row_map")?, g[0].1, "row_map")?;
        let mut out = x.zeros::<bf16>(tokens * hidden)?;
        {
            let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
            raw::combine(x.on(), yp, hidden, rm, k, Some(wp), op).map_err(wrap)?;
        }
        Ok((x.storage(out), Shape::from_dims(&[tokens, hidden])))
    }

    /// Both gradients of the weighted combine from one launch (`raw::combine_backward`).
    pub(super) fn combine_backward(
        layout: &DispatchLayout,
        y: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let side = Side::default();
        let op = CombineBwd { layout: layout.clone(), side: side.clone() };
        let g = grad.to_dtype(DType::BF16)?.contiguous()?;
        let gy = y.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &g, &op)?;
        let gw = match take_side(&side, 1)?.pop() {
            Some(s) => to_tensor(s, layout.row_map.dims()),
            None => return bad("internal: combine backward side output".into()),
        };
        Ok((gy, gw))
    }

    /// `(y, w, grad) -> grad_y`, with `grad_w [T, k]` F32 as a side output.
    struct CombineBwd {
        layout: DispatchLayout,
        side: Side,
    }

    impl CustomOp3 for CombineBwd {
        fn name(&self) -> &'static str {
            "moekit-combine-backward"
        }
        crate::cuda::cuda_only_cpu_fwd3!();
        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (hidden, k) = (l1.dims()[1], self.layout.config.top_k);
            let x = Exec::new(&s1.device)?;
            let (yp, _gy) = x.input::<bf16>(s1, l1, "expert outputs")?;
            let (wp, _gw) = x.input::<f32>(s2, l2, "combine weights")?;
            let (gp, _gg) = x.input::<bf16>(s3, l3, "combine grad")?;
            let g = guards(&self.layout);
            let (rm, _g0) = x.input::<i32>(cuda_of(&g[0].0, "row_map")?, g[0].1, "row_map")?;
            let (of, _g1) = x.input::<i32>(cuda_of(&g[1].0, "offsets")?, g[1].1, "offsets")?;
            let (ct, _g2) = x.input::<i32>(cuda_of(&g[2].0, "counts")?, g[2].1, "counts")?;
            let mut gy = x.zeros::<bf16>(l1.shape().elem_count())?;
            let mut gw = x.zeros::<f32>(l2.shape().elem_count())?;
            {
                let (gyp, _g3) = x.output::<bf16, bf16>(&mut gy)?;
                let (gwp, _g4) = x.output::<f32, f32>(&mut gw)?;
                raw::combine_backward(x.on(), yp, hidden, rm, k, Some(wp), of, ct, gp, gyp, Some(gwp)).map_err(wrap)?;
            }
            *self.side.lock().unwrap_or_else(|p| p.into_inner()) = vec![x.storage(gw)];
            Ok((x.storage(gy), l1.shape().clone()))
        }
    }
}

//! Grouped GEMM (all NT, weights `[G, N, K]` = `[experts, out, in]`): BF16 m-grouped
//! contiguous and masked with gradients w.r.t. both operands, block-scaled FP8 contiguous
//! forward. On moekit-gemm's CPU path (f64 accumulation of the BF16/dequantized values,
//! rounded to BF16 once), bit for bit.

use crate::convert::{
    bad, expect_cpu, expect_dtype, expect_rank, ids_to_mt, mt_to_storage, mt_to_tensor, storage_to_mt, tensor_to_mt,
    wrap,
};
use crate::dispatch::Fp8Activation;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use moekit_dtype::bf16;
use moekit_gemm::GemmInput;
use moekit_tensor as mt;

fn check_bf16(what: &str, t: &Tensor, rank: usize) -> Result<()> {
    expect_cpu(what, t)?;
    expect_dtype(what, t, &[DType::BF16])?;
    expect_rank(what, t, rank).map(|_| ())
}

/// m-grouped contiguous GEMM: `out [M, N]` BF16, `out[r] = a[r] @ b[m_indices[r]]^T` from
/// `a [M, K]` BF16, `b [G, N, K]` BF16 and `m_indices [M]` (I32 or U32; an id outside
/// `[0, G)`, such as the dispatch layout's `-1`, is a padding row: zero, and no gradient).
/// `N` and `K` multiples of 8.
///
/// Differentiable w.r.t. `a` (moekit's `dgrad`: `grad_a[r] = grad[r] @ b[g]`, BF16) and `b`
/// (moekit's k-grouped GEMM over each group's rows: `grad_b[g] = sum_{r in g} grad[r]^T a[r]`,
/// f64 accumulation, rounded to BF16).
pub fn grouped_gemm_contiguous(a: &Tensor, b: &Tensor, m_indices: &Tensor) -> Result<Tensor> {
    check_bf16("A", a, 2)?;
    check_bf16("B", b, 3)?;
    expect_cpu("m_indices", m_indices)?;
    expect_rank("m_indices", m_indices, 1)?;
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        return cuda::contiguous(a, b, m_indices);
    }
    let ids = ids_to_mt(m_indices, "m_indices")?.to_vec::<i32>().map_err(wrap)?;
    a.contiguous()?.apply_op2(&b.contiguous()?, GroupedGemm { row_groups: ids, masked: None })
}

/// m-grouped masked GEMM: `out [G, M, N]` BF16, `out[g, r] = a[g, r] @ b[g]^T` for
/// `r < masked_m[g]`, zero past it, from `a [G, M, K]` BF16, `b [G, N, K]` BF16 and
/// `masked_m [G]` I32/U32 in `[0, M]` (None: every row). Differentiable w.r.t. `a` and `b`
/// (rows past `masked_m` get no gradient and give none).
pub fn grouped_gemm_masked(a: &Tensor, b: &Tensor, masked_m: Option<&Tensor>) -> Result<Tensor> {
    check_bf16("A", a, 3)?;
    check_bf16("B", b, 3)?;
    let (g, m) = (a.dims()[0], a.dims()[1]);
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        return cuda::masked(a, b, masked_m);
    }
    let mm = match masked_m {
        Some(t) => {
            expect_cpu("masked_m", t)?;
            crate::convert::expect_dims("masked_m", t, &[g])?;
            ids_to_mt(t, "masked_m")?.to_vec::<i32>().map_err(wrap)?
        }
        None => vec![m as i32; g],
    };
    if let Some((i, v)) = mm.iter().enumerate().find(|(_, &v)| v < 0 || v as usize > m) {
        return bad(format!("masked_m[{i}] = {v} is outside [0, {m}]"));
    }
    // The rows of group g are g M .. g M + masked_m[g]: the flattened rows' groups.
    let row_groups = (0..g * m).map(|r| if (r % m) < mm[r / m] as usize { (r / m) as i32 } else { -1 }).collect();
    a.contiguous()?.apply_op2(&b.contiguous()?, GroupedGemm { row_groups, masked: Some(mm) })
}

/// Both BF16 grouped GEMMs: `row_groups` is the group of each (flattened) row of A, `-1` for
/// rows without one; `masked` the masked op's `masked_m`.
struct GroupedGemm {
    row_groups: Vec<i32>,
    masked: Option<Vec<i32>>,
}

impl CustomOp2 for GroupedGemm {
    fn name(&self) -> &'static str {
        "moekit-grouped-gemm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = storage_to_mt(s1, l1, "A")?;
        let b = storage_to_mt(s2, l2, "B")?;
        let out = match &self.masked {
            None => {
                let ids = mt::Tensor::from_slice(&self.row_groups, &[self.row_groups.len()], &mt::Device::Cpu)
                    .map_err(wrap)?;
                moekit_gemm::m_grouped_contiguous(GemmInput::Bf16(&a), GemmInput::Bf16(&b), &ids)
            }
            Some(mm) => {
                let mm = mt::Tensor::from_slice(mm, &[mm.len()], &mt::Device::Cpu).map_err(wrap)?;
                moekit_gemm::m_grouped_masked(GemmInput::Bf16(&a), GemmInput::Bf16(&b), Some(&mm))
            }
        }
        .map_err(wrap)?;
        mt_to_storage(&out)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (groups, n, k) = (b.dims()[0], b.dims()[1], b.dims()[2]);
        let rows = self.row_groups.len();
        let cpu = &mt::Device::Cpu;
        let dy = tensor_to_mt(&grad.to_dtype(DType::BF16)?.reshape((rows, n))?, "grad of the GEMM output")?;
        let x = tensor_to_mt(&a.reshape((rows, k))?, "A")?;
        let w = tensor_to_mt(b, "B")?;
        let ids = mt::Tensor::from_slice(&self.row_groups, &[rows], cpu).map_err(wrap)?;
        let da = moekit_gemm::dgrad(GemmInput::Bf16(&dy), GemmInput::Bf16(&w), &ids).map_err(wrap)?;
        let da = mt_to_tensor(&da)?.reshape(a.dims())?;

        // Weight gradient: the k-grouped GEMM sums whole segments, so gather each group's rows
        // (stable, by group) into one segment per group; rows without a group are left out.
        let mut order: Vec<usize> = (0..rows).filter(|&r| (0..groups as i32).contains(&self.row_groups[r])).collect();
        order.sort_by_key(|&r| self.row_groups[r]);
        let mut offsets = vec![0i32; groups + 1];
        for &r in &order {
            offsets[self.row_groups[r] as usize + 1] += 1;
        }
        for g in 0..groups {
            offsets[g + 1] += offsets[g];
        }
        let gather = |t: &mt::Tensor, cols: usize| -> Result<mt::Tensor> {
            let v = t.to_vec::<bf16>().map_err(wrap)?;
            let mut out = Vec::with_capacity(order.len() * cols);
            for &r in &order {
                out.extend_from_slice(&v[r * cols..(r + 1) * cols]);
            }
            mt::Tensor::from_slice(&out, &[order.len(), cols], cpu).map_err(wrap)
        };
        let (dy_g, x_g) = (gather(&dy, n)?, gather(&x, k)?);
        let off = mt::Tensor::from_slice(&offsets, &[groups + 1], cpu).map_err(wrap)?;
        let dw = moekit_gemm::k_grouped(GemmInput::Bf16(&dy_g), GemmInput::Bf16(&x_g), &off).map_err(wrap)?;
        let dw = mt_to_tensor(&dw)?.to_dtype(b.dtype())?;
        Ok((Some(da), Some(dw)))
    }
}

/// Block-scaled FP8 expert weights: `[G, N, K]` F8E4M3 codes with one F32 scale per 128x128
/// block, `[G, N / 128, K / 128]` (DeepSeek-V3's weight format).
#[derive(Debug, Clone)]
pub struct Fp8Weights {
    /// `[G, N, K]` F8E4M3.
    pub data: Tensor,
    /// `[G, N / 128, K / 128]` F32.
    pub scales: Tensor,
}

impl Fp8Weights {
    /// Quantizes `w [G, N, K]` (F32 or BF16, `N` and `K` multiples of 128) per 128x128 block
    /// (moekit-gemm's `reference::quantize_blocks`: `scale = amax / 448`), on the host: a CUDA
    /// tensor is copied to the host and the result back (a synchronisation; weights are
    /// quantized once, when loaded).
    pub fn quantize(w: &Tensor) -> Result<Fp8Weights> {
        expect_cpu("weights", w)?;
        expect_dtype("weights", w, &[DType::F32, DType::BF16])?;
        let d = expect_rank("weights", w, 3)?;
        let (g, n, k) = (d[0], d[1], d[2]);
        if n % 128 != 0 || k % 128 != 0 {
            return bad(format!("FP8 block weights {d:?}: N and K must be multiples of 128"));
        }
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (codes, scales) = moekit_gemm::reference::quantize_blocks(&v, g, n, k);
        let data = Tensor::from_raw_buffer(&codes, DType::F8E4M3, d, w.device())?;
        let scales = Tensor::from_vec(scales, (g, n / 128, k / 128), w.device())?;
        Ok(Fp8Weights { data, scales })
    }
}

/// Block-scaled FP8 m-grouped contiguous GEMM, forward only: `out [M, N]` BF16 from FP8 token
/// rows `a` (`[M, K]` with 1x128 scales, e.g. from [`crate::permute_fp8`]), FP8 weights `b`
/// and `m_indices [M]` (I32/U32, out-of-range = padding: zero rows). `N`, `K` multiples of 128.
/// Partial sums are scaled per 128 of K in f32 by the kernels; the CPU path dequantizes and
/// accumulates in f64.
pub fn grouped_gemm_contiguous_fp8(a: &Fp8Activation, b: &Fp8Weights, m_indices: &Tensor) -> Result<Tensor> {
    for (what, t, dt) in [
        ("A", &a.data, DType::F8E4M3),
        ("A scales", &a.scales, DType::F32),
        ("B", &b.data, DType::F8E4M3),
        ("B scales", &b.scales, DType::F32),
    ] {
        expect_cpu(what, t)?;
        expect_dtype(what, t, &[dt])?;
    }
    expect_cpu("m_indices", m_indices)?;
    expect_rank("m_indices", m_indices, 1)?;
    #[cfg(feature = "cuda")]
    if a.data.device().is_cuda() {
        return cuda::contiguous_fp8(a, b, m_indices);
    }
    let (ad, as_, bd, bs) = (
        tensor_to_mt(&a.data, "A")?,
        tensor_to_mt(&a.scales, "A scales")?,
        tensor_to_mt(&b.data, "B")?,
        tensor_to_mt(&b.scales, "B scales")?,
    );
    let ids = ids_to_mt(m_indices, "m_indices")?;
    let out = moekit_gemm::m_grouped_contiguous(
        GemmInput::Fp8 { data: &ad, scales: &as_, layout: a.layout },
        GemmInput::Fp8 { data: &bd, scales: &bs, layout: a.layout },
        &ids,
    )
    .map_err(wrap)?;
    mt_to_tensor(&out)
}

/// The CUDA paths: moekit-gemm's raw launchers on candle's stream. The ids (`m_indices`,
/// `masked_m`) stay on the device: nothing is read back.
#[cfg(feature = "cuda")]
mod cuda {
    use super::Fp8Weights;
    use crate::convert::{bad, expect_dtype, wrap};
    use crate::cuda::{cuda_of, ids_as_u32, same_device, to_tensor, Exec};
    use crate::dispatch::{dispatch_layout, Fp8Activation, Permute};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
    use moekit_dispatch::DispatchConfig;
    use moekit_dispatch::ScaleLayout;
    use moekit_dtype::bf16;
    use moekit_gemm::raw::{self, Operand};
    use moekit_gemm::Shape as GemmShape;

    fn check_ids(what: &str, ids: &Tensor, like: &Tensor, len: usize) -> Result<Tensor> {
        expect_dtype(what, ids, &[DType::U32, DType::I32])?;
        same_device(what, ids, like)?;
        crate::convert::expect_dims(what, ids, &[len])?;
        ids.detach().contiguous()
    }

    pub(super) fn contiguous(a: &Tensor, b: &Tensor, m_indices: &Tensor) -> Result<Tensor> {
        let ids = check_ids("m_indices", m_indices, a, a.dims()[0])?;
        a.contiguous()?.apply_op2(&b.contiguous()?, GroupedGemm { ids: Some(ids), masked: false })
    }

    pub(super) fn masked(a: &Tensor, b: &Tensor, masked_m: Option<&Tensor>) -> Result<Tensor> {
        let ids = match masked_m {
            Some(t) => Some(check_ids("masked_m", t, a, a.dims()[0])?),
            None => None,
        };
        a.contiguous()?.apply_op2(&b.contiguous()?, GroupedGemm { ids, masked: true })
    }

    /// Both BF16 grouped GEMMs on the device: `ids` are the contiguous op's `m_indices` or the
    /// masked op's optional `masked_m`.
    struct GroupedGemm {
        ids: Option<Tensor>,
        masked: bool,
    }

    impl GroupedGemm {
        /// The group of every (flattened) row of A, U32 (`u32::MAX`: none), on the device.
        fn row_groups(&self, a: &Tensor, groups: usize) -> Result<Tensor> {
            let Some(ids) = &self.ids else {
                // Masked without masked_m: every row of group g is in g.
                let m = a.dims()[1];
                let g = Tensor::arange(0u32, groups as u32, a.device())?.reshape((groups, 1))?;
                return g.broadcast_as((groups, m))?.flatten_all()?.contiguous();
            };
            if !self.masked {
                return Ok(ids.clone());
            }
            // Row r of group g has a group when r < masked_m[g] (values past M: every row, as
            // the kernel clamps them).
            let m = a.dims()[1];
            let mm = ids_as_u32(ids)?.reshape((groups, 1))?;
            let r = Tensor::arange(0u32, m as u32, a.device())?.reshape((1, m))?;
            let mask = r.broadcast_lt(&mm)?;
            let g = Tensor::arange(0u32, groups as u32, a.device())?.reshape((groups, 1))?.broadcast_as((groups, m))?;
            let none = Tensor::full(u32::MAX, (groups, m), a.device())?;
            mask.where_cond(&g.contiguous()?, &none)?.flatten_all()?.contiguous()
        }
    }

    impl CustomOp2 for GroupedGemm {
        fn name(&self) -> &'static str {
            "moekit-grouped-gemm-cuda"
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
            let (groups, n, k) = (l2.dims()[0], l2.dims()[1], l2.dims()[2]);
            if l1.dims()[l1.dims().len() - 1] != k {
                return bad(format!("A {:?} and B {:?}: the reductions differ", l1.dims(), l2.dims()));
            }
            let x = Exec::new(&s1.device)?;
            let (ap, _ga) = x.input::<bf16>(s1, l1, "A")?;
            let (bp, _gb) = x.input::<bf16>(s2, l2, "B")?;
            let ids_sl = self.ids.as_ref().map(|t| t.storage_and_layout());
            let ids = match &ids_sl {
                Some((st, il)) => Some(x.input::<i32>(cuda_of(st, "ids")?, il, "ids")?),
                None => None,
            };
            let (a, b) = (Operand::Bf16(ap), Operand::Bf16(bp));
            let rl = ScaleLayout::RowMajor;
            // Rows without a group (padding, past masked_m) are not written: zeroed here, as
            // on the CPU.
            if self.masked {
                let m = l1.dims()[1];
                let mut out = x.zeros::<bf16>(groups * m * n)?;
                {
                    let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
                    let shape = GemmShape { groups, m, n, k };
                    raw::m_grouped_masked(x.on(), shape, a, rl, b, ids.as_ref().map(|i| i.0), op).map_err(wrap)?;
                }
                Ok((x.storage(out), Shape::from_dims(&[groups, m, n])))
            } else {
                let m = l1.dims()[0];
                let Some((idp, _)) = &ids else { return bad("internal: contiguous GEMM without m_indices".into()) };
                let mut out = x.zeros::<bf16>(m * n)?;
                {
                    let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
                    let shape = GemmShape { groups, m, n, k };
                    raw::m_grouped_contiguous(x.on(), shape, a, rl, b, *idp, op).map_err(wrap)?;
                }
                Ok((x.storage(out), Shape::from_dims(&[m, n])))
            }
        }

        /// `grad_a`: moekit's dgrad on each row's group (rows without one: zero). `grad_b`:
        /// the rows are laid out by group with moekit's own dispatch layout (`top_k = 1`,
        /// alignment 1: one segment per group, rows without a group left out) and permuted,
        /// then moekit's k-grouped GEMM sums each segment (f32, rounded to BF16 by candle).
        fn bwd(
            &self,
            a: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (groups, n, k) = b.dims3()?;
            let rows = a.elem_count() / k;
            let row_groups = self.row_groups(a, groups)?;
            let dy = grad.to_dtype(DType::BF16)?.reshape((rows, n))?.contiguous()?;
            let x2 = a.reshape((rows, k))?.contiguous()?;
            let da = dy.apply_op3_no_bwd(&b.contiguous()?, &row_groups, &Dgrad)?.reshape(a.dims())?;
            let cfg = DispatchConfig::new(groups, 1).with_align(1);
            let layout = dispatch_layout(&row_groups.reshape((rows, 1))?, &cfg)?;
            let dy_g = dy.apply_op1_no_bwd(&Permute { layout: layout.clone() })?;
            let x_g = x2.apply_op1_no_bwd(&Permute { layout: layout.clone() })?;
            let dw = dy_g.apply_op3_no_bwd(&x_g, &layout.offsets, &KGrouped)?.to_dtype(b.dtype())?;
            Ok((Some(da), Some(dw)))
        }
    }

    /// `(dy [rows, N], w [G, N, K], row groups [rows]) -> dx [rows, K]` BF16.
    struct Dgrad;

    impl CustomOp3 for Dgrad {
        fn name(&self) -> &'static str {
            "moekit-gemm-dgrad"
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
            let (rows, n) = (l1.dims()[0], l1.dims()[1]);
            let (groups, k) = (l2.dims()[0], l2.dims()[2]);
            let x = Exec::new(&s1.device)?;
            let (dy, _g1) = x.input::<bf16>(s1, l1, "grad of the GEMM output")?;
            let (w, _g2) = x.input::<bf16>(s2, l2, "B")?;
            let (ids, _g3) = x.input::<i32>(s3, l3, "row groups")?;
            // Rows without a group are not written: zeroed (no gradient).
            let mut out = x.zeros::<bf16>(rows * k)?;
            {
                let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
                let shape = GemmShape { groups, m: rows, n, k };
                raw::dgrad(x.on(), shape, Operand::Bf16(dy), ScaleLayout::RowMajor, Operand::Bf16(w), ids, op)
                    .map_err(wrap)?;
            }
            Ok((x.storage(out), Shape::from_dims(&[rows, k])))
        }
    }

    /// `(dy [rows, N], x [rows, K], offsets [G + 1]) -> dw [G, N, K]` F32, segment by segment.
    struct KGrouped;

    impl CustomOp3 for KGrouped {
        fn name(&self) -> &'static str {
            "moekit-gemm-k-grouped"
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
            let (rows, n, k) = (l1.dims()[0], l1.dims()[1], l2.dims()[1]);
            let groups = l3.dims()[0] - 1;
            let x = Exec::new(&s1.device)?;
            let (dy, _g1) = x.input::<bf16>(s1, l1, "grad rows by group")?;
            let (xs, _g2) = x.input::<bf16>(s2, l2, "A rows by group")?;
            let (off, _g3) = x.input::<i32>(s3, l3, "group offsets")?;
            // Written in full by the kernel (an empty group gives zeros); zeroed all the same.
            let mut out = x.zeros::<f32>(groups * n * k)?;
            {
                let (op, _go) = x.output::<f32, f32>(&mut out)?;
                let shape = GemmShape { groups, m: rows, n, k };
                raw::k_grouped(x.on(), shape, Operand::Bf16(dy), Operand::Bf16(xs), off, false, op).map_err(wrap)?;
            }
            Ok((x.storage(out), Shape::from_dims(&[groups, n, k])))
        }
    }

    pub(super) fn contiguous_fp8(a: &Fp8Activation, b: &Fp8Weights, m_indices: &Tensor) -> Result<Tensor> {
        for (what, t) in [("A scales", &a.scales), ("B", &b.data), ("B scales", &b.scales)] {
            same_device(what, t, &a.data)?;
        }
        let (m, k) = a.data.dims2()?;
        let (groups, n, k2) = b.data.dims3()?;
        if k != k2 {
            return bad(format!("A {:?} and B {:?}: the reductions differ", a.data.dims(), b.data.dims()));
        }
        let ids = check_ids("m_indices", m_indices, &a.data, m)?;
        let ts = [a.data.contiguous()?, a.scales.contiguous()?, b.data.contiguous()?, b.scales.contiguous()?, ids];
        let g = [
            ts[0].storage_and_layout(),
            ts[1].storage_and_layout(),
            ts[2].storage_and_layout(),
            ts[3].storage_and_layout(),
            ts[4].storage_and_layout(),
        ];
        let s0 = cuda_of(&g[0].0, "A")?;
        let x = Exec::new(&s0.device)?;
        let (ad, _g0) = x.input::<u8>(s0, g[0].1, "A")?;
        let (asc, _g1) = x.input::<f32>(cuda_of(&g[1].0, "A scales")?, g[1].1, "A scales")?;
        let (bd, _g2) = x.input::<u8>(cuda_of(&g[2].0, "B")?, g[2].1, "B")?;
        let (bsc, _g3) = x.input::<f32>(cuda_of(&g[3].0, "B scales")?, g[3].1, "B scales")?;
        let (idp, _g4) = x.input::<i32>(cuda_of(&g[4].0, "m_indices")?, g[4].1, "m_indices")?;
        // Padding rows are not written: zeroed, as on the CPU.
        let mut out = x.zeros::<bf16>(m * n)?;
        {
            let (op, _go) = x.output::<bf16, bf16>(&mut out)?;
            let shape = GemmShape { groups, m, n, k };
            let (a_op, b_op) = (Operand::Fp8 { data: ad, scales: asc }, Operand::Fp8 { data: bd, scales: bsc });
            raw::m_grouped_contiguous(x.on(), shape, a_op, a.layout, b_op, idp, op).map_err(wrap)?;
        }
        Ok(to_tensor(x.storage(out), &[m, n]))
    }
}

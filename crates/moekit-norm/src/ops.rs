//! Tensor ops: the reference on `Device::Cpu`, the kernels on a GPU or the emulator. Every op
//! validates dtypes, shapes and devices first, so every device returns the same `Result`.

use crate::raw::{self, Out, Residual};
use crate::reference::{self, RopeTable};
use crate::{to_bf16, Error, IdStatus, Result};
use moekit_dtype::bf16;
use moekit_tensor::{DType, Device, Tensor};

fn expect_rank(what: &str, t: &Tensor, dtype: DType, rank: usize) -> Result<()> {
    t.expect_dtype(what, dtype)?;
    if t.rank() != rank {
        return Err(Error::Shape(format!("{what} {:?}: expected rank {rank}", t.dims())));
    }
    Ok(())
}

fn expect_dims(what: &str, t: &Tensor, dims: &[usize], dtype: DType) -> Result<()> {
    t.expect_dtype(what, dtype)?;
    if t.dims() != dims {
        return Err(Error::Shape(format!("{what} {:?}, expected {dims:?}", t.dims())));
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

fn out_dtype(what: &str, d: DType) -> Result<()> {
    match d {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(Error::Dtype { what: what.into(), expected: "f32 or bf16".into(), got: other.to_string() }),
    }
}

/// Writes f32 results into a CPU tensor of F32 or BF16.
fn store_cpu(t: &mut Tensor, v: &[f32]) -> Result<()> {
    match t.dtype() {
        DType::BF16 => {
            for (o, &x) in t.cpu_slice_mut::<bf16>()?.iter_mut().zip(v) {
                *o = to_bf16(x);
            }
            Ok(())
        }
        _ => {
            t.cpu_slice_mut::<f32>()?.copy_from_slice(v);
            Ok(())
        }
    }
}

fn dev_out(t: &mut Tensor) -> Result<Out<'_>> {
    match t.dtype() {
        DType::BF16 => Ok(Out::BF16(t.dev_ptr_mut()?)),
        _ => Ok(Out::F32(t.dev_ptr_mut()?)),
    }
}

/// The outcome of an id range check on the ids' device: a `[2]` I32 tensor `[bad, first or
/// -1]`, written by the device without a host round trip.
#[derive(Debug, Clone)]
pub struct IdCheck {
    /// `[2]` I32.
    pub status: Tensor,
    what: &'static str,
    bound: usize,
}

impl IdCheck {
    fn run(ids: &Tensor, bound: usize, what: &'static str) -> Result<IdCheck> {
        let mut status = Tensor::empty(&[2], DType::I32, ids.device())?;
        match ids.device().launcher() {
            None => {
                let s = reference::check_ids(ids.cpu_slice()?, bound);
                status.cpu_slice_mut::<i32>()?.copy_from_slice(&s.to_raw());
            }
            Some(on) => raw::check_ids(on, ids.dev_ptr()?, bound, status.dev_ptr_mut()?)?,
        }
        Ok(IdCheck { status, what, bound })
    }

    /// Reads the status back (a synchronisation on a GPU).
    pub fn status(&self) -> Result<IdStatus> {
        let s = self.status.to_vec::<i32>()?;
        Ok(IdStatus::from_raw([s[0], s[1]]))
    }

    /// `Error::InvalidArgument` when an id was out of range (reads the status back).
    pub fn check(&self) -> Result<()> {
        self.status()?.check(self.what, self.bound)
    }
}

fn embed_shapes(table: &Tensor, ids: &Tensor) -> Result<(usize, usize)> {
    expect_rank("embedding table", table, DType::F32, 2)?;
    expect_rank("token ids", ids, DType::I32, 1)?;
    same_device(table, ids, "token ids")?;
    let (vocab, dim) = (table.dims()[0], table.dims()[1]);
    if vocab == 0 || vocab > i32::MAX as usize || ids.numel() > i32::MAX as usize {
        return Err(Error::Shape(format!("embedding of {} ids from a vocab of {vocab}", ids.numel())));
    }
    Ok((vocab, dim))
}

/// Embedding gather `out [T, d]` (`dtype` F32 or BF16) of `ids [T]` I32 from `table [vocab, d]`
/// F32. Ids outside `[0, vocab)` are `Error::InvalidArgument` on every device (on a GPU the
/// check reads one status back: use [`embedding_deferred`] inside a step).
pub fn embedding(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let (out, check) = embedding_deferred(table, ids, dtype)?;
    check.check()?;
    Ok(out)
}

/// [`embedding`] without the read-back: rows of out-of-range ids are zeros and the returned
/// [`IdCheck`] says so when checked.
pub fn embedding_deferred(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<(Tensor, IdCheck)> {
    let (vocab, dim) = embed_shapes(table, ids)?;
    out_dtype("embedding output", dtype)?;
    let tokens = ids.numel();
    let dev = table.device();
    let mut out = Tensor::empty(&[tokens, dim], dtype, dev)?;
    match dev.launcher() {
        None => {
            let mut v = vec![0.0f32; tokens * dim];
            reference::embedding(table.cpu_slice()?, vocab, ids.cpu_slice()?, &mut v)?;
            store_cpu(&mut out, &v)?;
        }
        Some(on) => raw::embedding(on, table.dev_ptr()?, vocab, ids.dev_ptr()?, dev_out(&mut out)?)?,
    }
    Ok((out, IdCheck::run(ids, vocab, "token ids")?))
}

/// Gradient of the embedding: `dtable [vocab, d]` F32 from `ids [T]` and `grad_out [T, d]`
/// F32, rows added in increasing `t` (deterministic, no float atomics). Ids out of range are
/// `Error::InvalidArgument` (read back; see [`embedding_backward_into`]).
pub fn embedding_backward(ids: &Tensor, grad_out: &Tensor, vocab: usize) -> Result<Tensor> {
    expect_rank("embedding output gradient", grad_out, DType::F32, 2)?;
    let mut g = Tensor::empty(&[vocab, grad_out.dims()[1]], DType::F32, grad_out.device())?;
    embedding_backward_impl(ids, grad_out, &mut g, false)?.check()?;
    Ok(g)
}

/// Adds the embedding gradient into `grad_table [vocab, d]` F32 (gradient accumulation, the
/// model's `+=` in token order); out-of-range ids are skipped and reported by the returned
/// [`IdCheck`] (not read back).
pub fn embedding_backward_into(ids: &Tensor, grad_out: &Tensor, grad_table: &mut Tensor) -> Result<IdCheck> {
    embedding_backward_impl(ids, grad_out, grad_table, true)
}

fn embedding_backward_impl(ids: &Tensor, grad_out: &Tensor, grad: &mut Tensor, accumulate: bool) -> Result<IdCheck> {
    let (vocab, dim) = embed_shapes(grad, ids)?;
    expect_dims("embedding output gradient", grad_out, &[ids.numel(), dim], DType::F32)?;
    same_device(grad, grad_out, "embedding output gradient")?;
    let dev = grad.device().clone();
    match dev.launcher() {
        None => {
            let (i, d) = (ids.cpu_slice::<i32>()?.to_vec(), grad_out.cpu_slice::<f32>()?.to_vec());
            reference::embedding_backward(&i, &d, grad.cpu_slice_mut()?, vocab, accumulate)?;
        }
        Some(on) => {
            let n = raw::embedding_backward_scratch_len(ids.numel(), vocab);
            let mut scratch = Tensor::empty(&[n], DType::I32, &dev)?;
            raw::embedding_backward(
                on,
                ids.dev_ptr()?,
                grad_out.dev_ptr()?,
                grad.dev_ptr_mut()?,
                vocab,
                scratch.dev_ptr_mut()?,
                accumulate,
            )?;
        }
    }
    IdCheck::run(ids, vocab, "token ids")
}

/// Outputs of [`rmsnorm`] and [`add_rmsnorm`].
#[derive(Debug, Clone)]
pub struct RmsNormOutput {
    /// `[rows, d]` F32 or BF16.
    pub y: Tensor,
    /// `[rows]` F32: `1 / sqrt(mean(x'^2) + eps)` (what the backward reads).
    pub inv_rms: Tensor,
    /// [`add_rmsnorm`]: `[rows, d]` F32 `x + residual` (the new residual stream).
    pub sum: Option<Tensor>,
}

fn norm_shapes(x: &Tensor, weight: &Tensor) -> Result<usize> {
    expect_rank("rmsnorm input", x, DType::F32, 2)?;
    expect_rank("rmsnorm weight", weight, DType::F32, 1)?;
    same_device(x, weight, "rmsnorm weight")?;
    if weight.numel() != x.dims()[1] || weight.numel() == 0 || weight.numel() > i32::MAX as usize {
        return Err(Error::Shape(format!("rmsnorm weight {:?} for input {:?}", weight.dims(), x.dims())));
    }
    Ok(x.dims()[0])
}

/// RMSNorm of `x [rows, d]` F32 with `weight [d]` F32: `y` (`dtype` F32 or BF16) and the f32
/// `inv_rms` per row (see the crate docs for the order of the statistics).
pub fn rmsnorm(x: &Tensor, weight: &Tensor, eps: f32, dtype: DType) -> Result<RmsNormOutput> {
    rmsnorm_impl(x, None, weight, eps, dtype)
}

/// Fused residual add and RMSNorm: `sum = x + residual` (the residual stream) and
/// `y = rmsnorm(sum)`, in one pass.
pub fn add_rmsnorm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32, dtype: DType) -> Result<RmsNormOutput> {
    rmsnorm_impl(x, Some(residual), weight, eps, dtype)
}

fn rmsnorm_impl(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
    dtype: DType,
) -> Result<RmsNormOutput> {
    let rows = norm_shapes(x, weight)?;
    out_dtype("rmsnorm output", dtype)?;
    if let Some(r) = residual {
        expect_dims("rmsnorm residual", r, x.dims(), DType::F32)?;
        same_device(x, r, "rmsnorm residual")?;
    }
    let dev = x.device();
    let mut y = Tensor::empty(x.dims(), dtype, dev)?;
    let mut inv = Tensor::empty(&[rows], DType::F32, dev)?;
    let mut sum = residual.map(|_| Tensor::empty(x.dims(), DType::F32, dev)).transpose()?;
    match dev.launcher() {
        None => {
            let mut yv = vec![0.0f32; x.numel()];
            let mut s = vec![0.0f32; if residual.is_some() { x.numel() } else { 0 }];
            let res = match residual {
                Some(r) => Some((r.cpu_slice::<f32>()?, s.as_mut_slice())),
                None => None,
            };
            reference::rmsnorm(x.cpu_slice()?, res, weight.cpu_slice()?, eps, &mut yv, inv.cpu_slice_mut()?)?;
            store_cpu(&mut y, &yv)?;
            if let Some(st) = &mut sum {
                st.cpu_slice_mut::<f32>()?.copy_from_slice(&s);
            }
        }
        Some(on) => {
            let res = match (residual, &mut sum) {
                (Some(r), Some(s)) => Some(Residual { residual: r.dev_ptr()?, sum: s.dev_ptr_mut()? }),
                _ => None,
            };
            raw::rmsnorm(on, x.dev_ptr()?, res, weight.dev_ptr()?, eps, dev_out(&mut y)?, inv.dev_ptr_mut()?)?;
        }
    }
    Ok(RmsNormOutput { y, inv_rms: inv, sum })
}

/// Gradients of [`rmsnorm_backward`].
#[derive(Debug, Clone)]
pub struct RmsNormGrads {
    /// `[rows, d]` F32 (plus the residual branch's gradient when one was given).
    pub grad_x: Tensor,
    /// `[d]` F32.
    pub grad_weight: Tensor,
}

/// RMSNorm backward from the forward's input `x [rows, d]` (for [`add_rmsnorm`]: its `sum`),
/// `weight`, `inv_rms` and `grad_y [rows, d]` F32. With `grad_residual` (the gradient that
/// reaches `x` through the residual connection) `grad_x` is their sum, fused.
pub fn rmsnorm_backward(
    x: &Tensor,
    weight: &Tensor,
    inv_rms: &Tensor,
    grad_y: &Tensor,
    grad_residual: Option<&Tensor>,
) -> Result<RmsNormGrads> {
    let mut dg = Tensor::empty(weight.dims(), DType::F32, weight.device())?;
    let dx = rmsnorm_backward_impl(x, weight, inv_rms, grad_y, grad_residual, &mut dg, false)?;
    Ok(RmsNormGrads { grad_x: dx, grad_weight: dg })
}

/// As [`rmsnorm_backward`], adding the weight gradient into `grad_weight [d]` (gradient
/// accumulation); returns `grad_x`.
pub fn rmsnorm_backward_into(
    x: &Tensor,
    weight: &Tensor,
    inv_rms: &Tensor,
    grad_y: &Tensor,
    grad_residual: Option<&Tensor>,
    grad_weight: &mut Tensor,
) -> Result<Tensor> {
    rmsnorm_backward_impl(x, weight, inv_rms, grad_y, grad_residual, grad_weight, true)
}

fn rmsnorm_backward_impl(
    x: &Tensor,
    weight: &Tensor,
    inv_rms: &Tensor,
    grad_y: &Tensor,
    grad_residual: Option<&Tensor>,
    grad_weight: &mut Tensor,
    accumulate: bool,
) -> Result<Tensor> {
    let rows = norm_shapes(x, weight)?;
    expect_dims("rmsnorm inv_rms", inv_rms, &[rows], DType::F32)?;
    expect_dims("rmsnorm grad_y", grad_y, x.dims(), DType::F32)?;
    expect_dims("rmsnorm grad_weight", grad_weight, weight.dims(), DType::F32)?;
    for (what, t) in [("rmsnorm inv_rms", inv_rms), ("rmsnorm grad_y", grad_y), ("rmsnorm grad_weight", &*grad_weight)]
    {
        same_device(x, t, what)?;
    }
    if let Some(r) = grad_residual {
        expect_dims("rmsnorm grad_residual", r, x.dims(), DType::F32)?;
        same_device(x, r, "rmsnorm grad_residual")?;
    }
    let dev = x.device();
    let mut dx = Tensor::empty(x.dims(), DType::F32, dev)?;
    match dev.launcher() {
        None => {
            let res = match grad_residual {
                Some(r) => Some(r.cpu_slice::<f32>()?),
                None => None,
            };
            reference::rmsnorm_backward(
                x.cpu_slice()?,
                weight.cpu_slice()?,
                inv_rms.cpu_slice()?,
                grad_y.cpu_slice()?,
                res,
                dx.cpu_slice_mut()?,
                grad_weight.cpu_slice_mut()?,
                accumulate,
            )?;
        }
        Some(on) => {
            let n = raw::rmsnorm_backward_scratch_len(rows, weight.numel());
            let mut scratch = Tensor::empty(&[n], DType::F32, dev)?;
            let res = match grad_residual {
                Some(r) => Some(r.dev_ptr()?),
                None => None,
            };
            raw::rmsnorm_backward(
                on,
                x.dev_ptr()?,
                weight.dev_ptr()?,
                inv_rms.dev_ptr()?,
                grad_y.dev_ptr()?,
                res,
                dx.dev_ptr_mut()?,
                grad_weight.dev_ptr_mut()?,
                scratch.dev_ptr_mut()?,
                accumulate,
            )?;
        }
    }
    Ok(dx)
}

/// Residual add `a + b` of two F32 tensors of the same shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.expect_dtype("add operand", DType::F32)?;
    expect_dims("add operand", b, a.dims(), DType::F32)?;
    same_device(a, b, "add operand")?;
    let mut out = Tensor::empty(a.dims(), DType::F32, a.device())?;
    match a.device().launcher() {
        None => reference::add(a.cpu_slice()?, b.cpu_slice()?, out.cpu_slice_mut()?)?,
        Some(on) => raw::add(on, a.dev_ptr()?, b.dev_ptr()?, out.dev_ptr_mut()?)?,
    }
    Ok(out)
}

/// RoPE with its `cos`/`sin` tables on a device, built by [`RopeTable::new`] on the host (the
/// model's formula), so the CPU reference and the kernels read the same bits.
#[derive(Debug, Clone)]
pub struct Rope {
    table: RopeTable,
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `head_dim` (even), positions `0..max_pos`, base `theta`, on `device`.
    pub fn new(head_dim: usize, max_pos: usize, theta: f32, device: &Device) -> Result<Rope> {
        let table = RopeTable::new(head_dim, max_pos, theta)?;
        let dims = [max_pos, head_dim / 2];
        let cos = Tensor::from_slice(&table.cos, &dims, device)?;
        let sin = Tensor::from_slice(&table.sin, &dims, device)?;
        Ok(Rope { table, cos, sin })
    }

    /// The host tables.
    pub fn table(&self) -> &RopeTable {
        &self.table
    }

    /// Rotates, in place, the first `heads` heads of every row of `x [rows, width]` F32 (for a
    /// packed `qkv [rows, 3 d]`: `heads = 2 n_heads`, the q and k heads), row `r` at
    /// `positions[r]` (`[rows]` I32; decode passes the cache offset plus the row's index).
    /// `inverse`: the backward (rotation by minus the angle). Positions outside `[0, max_pos)`
    /// are `Error::InvalidArgument` on every device (read back on a GPU: see
    /// [`Rope::apply_deferred`]); those rows are left as they were.
    pub fn apply(&self, x: &mut Tensor, heads: usize, positions: &Tensor, inverse: bool) -> Result<()> {
        self.apply_deferred(x, heads, positions, inverse)?.check()
    }

    /// [`Rope::apply`] without the read-back: returns the position check.
    pub fn apply_deferred(&self, x: &mut Tensor, heads: usize, positions: &Tensor, inverse: bool) -> Result<IdCheck> {
        expect_rank("RoPE input", x, DType::F32, 2)?;
        expect_rank("RoPE positions", positions, DType::I32, 1)?;
        same_device(x, positions, "RoPE positions")?;
        same_device(x, &self.cos, "RoPE tables")?;
        let width = x.dims()[1];
        reference::check_rope(x.numel(), width.max(1), heads, self.table.head_dim, positions.numel())?;
        if width == 0 {
            return Err(Error::Shape(format!("RoPE input {:?}: rows of 0", x.dims())));
        }
        let dev = x.device().clone();
        match dev.launcher() {
            None => {
                reference::rope(x.cpu_slice_mut()?, width, heads, &self.table, positions.cpu_slice()?, inverse)?;
            }
            Some(on) => {
                let tables = raw::RopeTables {
                    head_dim: self.table.head_dim,
                    cos: self.cos.dev_ptr()?,
                    sin: self.sin.dev_ptr()?,
                };
                raw::rope(on, x.dev_ptr_mut()?, width, heads, positions.dev_ptr()?, tables, inverse)?;
            }
        }
        IdCheck::run(positions, self.table.max_pos, "RoPE positions")
    }
}

//! Tensor ops: the reference on `Device::Cpu`, the kernels on a GPU or the emulator. Every
//! check (dtype, shape, device) happens here before dispatch, so every device gives the same
//! outcome.

use crate::raw::{self, Qkv};
use crate::{reference, AttnShape, Error, Result};
use moekit_dtype::bf16;
use moekit_tensor::{DType, Tensor};
use std::borrow::Cow;

/// Outputs of [`attention`] and [`attention_cached`].
#[derive(Debug, Clone)]
pub struct AttnOutput {
    /// `[B * S, H hd]` F32.
    pub out: Tensor,
    /// `[B, H, S]` F32 log-sum-exp of each query's scaled scores (for the backward).
    pub lse: Tensor,
}

fn expect(what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    t.expect_dtype(what, DType::F32)?;
    if t.dims() != dims {
        return Err(Error::Shape(format!("{what} {:?}, expected {dims:?}", t.dims())));
    }
    Ok(())
}

/// `qkv [B * S, 3 H hd]` of dtype F32 or BF16.
fn expect_qkv(qkv: &Tensor, shape: &AttnShape) -> Result<()> {
    if !matches!(qkv.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::Dtype { what: "qkv".into(), expected: "f32 or bf16".into(), got: qkv.dtype().to_string() });
    }
    let dims = [shape.batch * shape.seq, 3 * shape.d()];
    if qkv.dims() != dims {
        return Err(Error::Shape(format!("qkv {:?}, expected {dims:?}", qkv.dims())));
    }
    Ok(())
}

/// A CPU qkv as f32 (BF16 widened exactly, as the kernels load it).
fn cpu_qkv(qkv: &Tensor) -> Result<Cow<'_, [f32]>> {
    match qkv.dtype() {
        DType::BF16 => Ok(Cow::Owned(qkv.cpu_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect())),
        _ => Ok(Cow::Borrowed(qkv.cpu_slice::<f32>()?)),
    }
}

fn dev_qkv(qkv: &Tensor) -> Result<Qkv<'_>> {
    match qkv.dtype() {
        DType::BF16 => Ok(Qkv::BF16(qkv.dev_ptr::<bf16>()?)),
        _ => Ok(Qkv::F32(qkv.dev_ptr::<f32>()?)),
    }
}

fn same_device(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.device().same_as(b.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, qkv on {}", b.device().name(), a.device().name())))
    }
}

fn outputs(shape: &AttnShape, qkv: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = qkv.device();
    Ok((
        Tensor::empty(&[shape.batch * shape.seq, shape.d()], DType::F32, dev)?,
        Tensor::empty(&[shape.batch, shape.heads, shape.seq], DType::F32, dev)?,
    ))
}

/// Causal attention of `qkv [B * S, 3 H hd]` (F32, or BF16 widened exactly) over its own keys (training, positions from
/// 0), on the tensor's device. See [`crate::reference::forward`].
pub fn attention(qkv: &Tensor, shape: &AttnShape) -> Result<AttnOutput> {
    shape.validate(0)?;
    expect_qkv(qkv, shape)?;
    let (mut out, mut lse) = outputs(shape, qkv)?;
    match qkv.device().launcher() {
        None => {
            let (o, l) = reference::forward(&cpu_qkv(qkv)?, shape)?;
            out.cpu_slice_mut::<f32>()?.copy_from_slice(&o);
            lse.cpu_slice_mut::<f32>()?.copy_from_slice(&l);
        }
        Some(on) => raw::forward(on, shape, dev_qkv(qkv)?, out.dev_ptr_mut()?, lse.dev_ptr_mut()?)?,
    }
    Ok(AttnOutput { out, lse })
}

/// Causal attention through the KV caches `k_cache`, `v_cache [B, H, max_len, hd]` F32
/// (updated in place): the queries of `qkv [B * S, 3 H hd]` are at positions
/// `start .. start + S`, their keys and values are appended at those positions, and query `i`
/// attends to positions `0 ..= start + i`. With `S = 1` this is the decode step; its output
/// equals row `start` of [`attention`] over the whole sequence, bit for bit.
pub fn attention_cached(
    qkv: &Tensor,
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    shape: &AttnShape,
    start: usize,
) -> Result<AttnOutput> {
    shape.validate(0)?;
    if k_cache.rank() != 4 {
        return Err(Error::Shape(format!("k_cache {:?}, expected [B, H, max_len, hd]", k_cache.dims())));
    }
    let max_len = k_cache.dims()[2];
    shape.validate_cache(start, max_len)?;
    expect_qkv(qkv, shape)?;
    let cache_dims = [shape.batch, shape.heads, max_len, shape.head_dim];
    expect("k_cache", k_cache, &cache_dims)?;
    expect("v_cache", v_cache, &cache_dims)?;
    same_device(qkv, k_cache, "k_cache")?;
    same_device(qkv, v_cache, "v_cache")?;
    let (mut out, mut lse) = outputs(shape, qkv)?;
    match qkv.device().launcher() {
        None => {
            let (o, l) = reference::forward_cached(
                &cpu_qkv(qkv)?,
                k_cache.cpu_slice_mut()?,
                v_cache.cpu_slice_mut()?,
                shape,
                start,
                max_len,
            )?;
            out.cpu_slice_mut::<f32>()?.copy_from_slice(&o);
            lse.cpu_slice_mut::<f32>()?.copy_from_slice(&l);
        }
        Some(on) => raw::forward_cached(
            on,
            shape,
            start,
            max_len,
            dev_qkv(qkv)?,
            k_cache.dev_ptr_mut()?,
            v_cache.dev_ptr_mut()?,
            out.dev_ptr_mut()?,
            lse.dev_ptr_mut()?,
        )?,
    }
    Ok(AttnOutput { out, lse })
}

/// Backward of [`attention`]: the gradient w.r.t. `qkv` (`[B * S, 3 H hd]`, F32 for either qkv dtype) from the
/// forward's `qkv`, `out`, `lse` and the upstream gradient `dout [B * S, H hd]` F32.
pub fn attention_backward(
    qkv: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    shape: &AttnShape,
) -> Result<Tensor> {
    shape.validate(0)?;
    let rows = shape.batch * shape.seq;
    expect_qkv(qkv, shape)?;
    expect("out", out, &[rows, shape.d()])?;
    expect("lse", lse, &[shape.batch, shape.heads, shape.seq])?;
    expect("dout", dout, &[rows, shape.d()])?;
    same_device(qkv, out, "out")?;
    same_device(qkv, lse, "lse")?;
    same_device(qkv, dout, "dout")?;
    let dev = qkv.device();
    let mut dqkv = Tensor::empty(qkv.dims(), DType::F32, dev)?; // f32 whatever qkv's dtype
    match dev.launcher() {
        None => {
            let g = reference::backward(&cpu_qkv(qkv)?, out.cpu_slice()?, lse.cpu_slice()?, dout.cpu_slice()?, shape)?;
            dqkv.cpu_slice_mut::<f32>()?.copy_from_slice(&g);
        }
        Some(on) => {
            let mut delta = Tensor::empty(&[shape.lse_len()], DType::F32, dev)?;
            raw::backward(
                on,
                shape,
                dev_qkv(qkv)?,
                out.dev_ptr()?,
                lse.dev_ptr()?,
                dout.dev_ptr()?,
                delta.dev_ptr_mut()?,
                dqkv.dev_ptr_mut()?,
            )?
        }
    }
    Ok(dqkv)
}

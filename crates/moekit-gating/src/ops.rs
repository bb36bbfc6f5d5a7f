//! Tensor ops: the reference on `Device::Cpu`, the kernels on a GPU or the emulator.

use crate::raw::{self, Logits};
use crate::{reference, Error, Result, RouterConfig};
use moekit_dtype::bf16;
use moekit_tensor::{DType, Tensor};

/// Outputs of [`route`].
#[derive(Debug, Clone)]
pub struct RouteOutput {
    /// `[T, k]` I32 expert ids, by descending selection score.
    pub topk_ids: Tensor,
    /// `[T, k]` F32 weights.
    pub topk_weights: Tensor,
    /// `[E]` I32 tokens routed to each expert.
    pub counts: Tensor,
}

/// `[T, E]` logits of dtype F32 or BF16: the token count.
fn logits_tokens(logits: &Tensor, cfg: &RouterConfig) -> Result<usize> {
    cfg.validate()?;
    if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::Dtype {
            what: "router logits".into(),
            expected: "f32 or bf16".into(),
            got: logits.dtype().to_string(),
        });
    }
    if logits.rank() != 2 || logits.dims()[1] != cfg.experts {
        return Err(Error::Shape(format!("router logits {:?}, expected [T, {}]", logits.dims(), cfg.experts)));
    }
    Ok(logits.dims()[0])
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
        Err(Error::InvalidArgument(format!("{what} is on {}, the logits on {}", b.device().name(), a.device().name())))
    }
}

/// Logits of a CPU tensor as f32 (BF16 widened exactly).
fn cpu_logits(logits: &Tensor) -> Result<Vec<f32>> {
    match logits.dtype() {
        DType::BF16 => Ok(logits.cpu_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect()),
        _ => Ok(logits.cpu_slice::<f32>()?.to_vec()),
    }
}

fn dev_logits(logits: &Tensor) -> Result<Logits<'_>> {
    match logits.dtype() {
        DType::BF16 => Ok(Logits::BF16(logits.dev_ptr::<bf16>()?)),
        _ => Ok(Logits::F32(logits.dev_ptr::<f32>()?)),
    }
}

/// Routes the tokens of `logits [T, E]` (F32 or BF16) with an optional F32 selection
/// `bias [E]`, on the logits' device.
pub fn route(logits: &Tensor, bias: Option<&Tensor>, cfg: &RouterConfig) -> Result<RouteOutput> {
    let tokens = logits_tokens(logits, cfg)?;
    if let Some(b) = bias {
        expect_dims("router bias", b, &[cfg.experts], DType::F32)?;
        same_device(logits, b, "router bias")?;
    }
    let dev = logits.device();
    // ids and weights are written in full; counts are added to, so they start at zero.
    let mut ids = Tensor::empty(&[tokens, cfg.top_k], DType::I32, dev)?;
    let mut weights = Tensor::empty(&[tokens, cfg.top_k], DType::F32, dev)?;
    let mut counts = Tensor::zeros(&[cfg.experts], DType::I32, dev)?;
    match dev.launcher() {
        None => {
            let bias = bias.map(|b| b.cpu_slice::<f32>()).transpose()?;
            let r = reference::route(&cpu_logits(logits)?, bias, cfg)?;
            ids.cpu_slice_mut::<i32>()?.copy_from_slice(&r.ids);
            weights.cpu_slice_mut::<f32>()?.copy_from_slice(&r.weights);
            counts.cpu_slice_mut::<i32>()?.copy_from_slice(&r.counts);
        }
        Some(on) => {
            let bias = bias.map(|b| b.dev_ptr::<f32>()).transpose()?;
            raw::route(
                on,
                cfg,
                dev_logits(logits)?,
                bias,
                ids.dev_ptr_mut()?,
                weights.dev_ptr_mut()?,
                Some(counts.dev_ptr_mut()?),
            )?;
        }
    }
    Ok(RouteOutput { topk_ids: ids, topk_weights: weights, counts })
}

/// Router replay: the weights (and counts) of given `topk_ids [T, k]` I32 (recorded while
/// sampling) for `logits [T, E]` (F32 or BF16), instead of choosing them; with the ids
/// [`route`] chose, the output equals [`route`]'s bit for bit on every device. Ids outside
/// `[0, E)` are an error on every device (on a GPU the ids are read back once to check them;
/// [`raw::route_replay`] reads nothing back).
pub fn route_replay(logits: &Tensor, topk_ids: &Tensor, cfg: &RouterConfig) -> Result<RouteOutput> {
    let tokens = logits_tokens(logits, cfg)?;
    expect_dims("replayed topk_ids", topk_ids, &[tokens, cfg.top_k], DType::I32)?;
    same_device(logits, topk_ids, "replayed topk_ids")?;
    let dev = logits.device();
    let mut weights = Tensor::empty(&[tokens, cfg.top_k], DType::F32, dev)?;
    let mut counts = Tensor::zeros(&[cfg.experts], DType::I32, dev)?;
    match dev.launcher() {
        None => {
            let r = reference::route_replay(&cpu_logits(logits)?, topk_ids.cpu_slice()?, cfg)?;
            weights.cpu_slice_mut::<f32>()?.copy_from_slice(&r.weights);
            counts.cpu_slice_mut::<i32>()?.copy_from_slice(&r.counts);
        }
        Some(on) => {
            if let Some(bad) = topk_ids.to_vec::<i32>()?.into_iter().find(|&e| e < 0 || e as usize >= cfg.experts) {
                return Err(Error::InvalidArgument(format!("replayed expert id {bad} outside [0, {})", cfg.experts)));
            }
            raw::route_replay(
                on,
                cfg,
                dev_logits(logits)?,
                topk_ids.dev_ptr()?,
                weights.dev_ptr_mut()?,
                Some(counts.dev_ptr_mut()?),
            )?;
        }
    }
    Ok(RouteOutput { topk_ids: topk_ids.clone(), topk_weights: weights, counts })
}

/// Gradient w.r.t. `logits [T, E]` (F32 result) from `grad_weights [T, k]` F32 and the
/// forward pass's `topk_ids [T, k]` I32.
pub fn route_backward(logits: &Tensor, topk_ids: &Tensor, grad_weights: &Tensor, cfg: &RouterConfig) -> Result<Tensor> {
    let tokens = logits_tokens(logits, cfg)?;
    expect_dims("topk_ids", topk_ids, &[tokens, cfg.top_k], DType::I32)?;
    expect_dims("grad_weights", grad_weights, &[tokens, cfg.top_k], DType::F32)?;
    same_device(logits, topk_ids, "topk_ids")?;
    same_device(logits, grad_weights, "grad_weights")?;
    let mut grad = Tensor::empty(&[tokens, cfg.experts], DType::F32, logits.device())?;
    match logits.device().launcher() {
        None => {
            let g =
                reference::route_backward(&cpu_logits(logits)?, topk_ids.cpu_slice()?, grad_weights.cpu_slice()?, cfg)?;
            grad.cpu_slice_mut::<f32>()?.copy_from_slice(&g);
        }
        Some(on) => raw::route_backward(
            on,
            cfg,
            dev_logits(logits)?,
            topk_ids.dev_ptr()?,
            grad_weights.dev_ptr()?,
            grad.dev_ptr_mut()?,
        )?,
    }
    Ok(grad)
}

/// Auxiliary-loss-free bias update of `bias [E]` F32 in place from `counts [E]` I32.
pub fn update_bias(bias: &mut Tensor, counts: &Tensor, gamma: f32) -> Result<()> {
    let experts = bias.numel();
    expect_dims("router bias", bias, &[experts], DType::F32)?;
    expect_dims("expert counts", counts, &[experts], DType::I32)?;
    same_device(bias, counts, "expert counts")?;
    match counts.device().launcher() {
        None => reference::update_bias(bias.cpu_slice_mut()?, counts.cpu_slice()?, gamma),
        Some(on) => raw::update_bias(on, counts.dev_ptr()?, bias.dev_ptr_mut()?, gamma),
    }
}

fn balance_checks(logits: &Tensor, topk_ids: &Tensor, cfg: &RouterConfig, seq_len: usize) -> Result<usize> {
    let tokens = logits_tokens(logits, cfg)?;
    expect_dims("topk_ids", topk_ids, &[tokens, cfg.top_k], DType::I32)?;
    same_device(logits, topk_ids, "topk_ids")?;
    if seq_len == 0 || tokens % seq_len != 0 {
        return Err(Error::Shape(format!("{tokens} tokens are not whole sequences of {seq_len}")));
    }
    Ok(tokens / seq_len)
}

/// Sequence-wise balance loss, `[T / seq_len]` F32, one value per sequence (see
/// [`reference::balance_loss`]); `topk_ids [T, k]` are the ids counted into `f`.
pub fn balance_loss(
    logits: &Tensor,
    topk_ids: &Tensor,
    cfg: &RouterConfig,
    seq_len: usize,
    alpha: f32,
) -> Result<Tensor> {
    let n_seq = balance_checks(logits, topk_ids, cfg, seq_len)?;
    let mut loss = Tensor::empty(&[n_seq], DType::F32, logits.device())?;
    match logits.device().launcher() {
        None => {
            let l = reference::balance_loss(&cpu_logits(logits)?, topk_ids.cpu_slice()?, cfg, seq_len, alpha)?;
            loss.cpu_slice_mut::<f32>()?.copy_from_slice(&l);
        }
        Some(on) => {
            raw::balance_loss(on, cfg, seq_len, alpha, dev_logits(logits)?, topk_ids.dev_ptr()?, loss.dev_ptr_mut()?)?
        }
    }
    Ok(loss)
}

/// Gradient of `sum_q grad_loss[q] * loss[q]` w.r.t. `logits [T, E]` (F32 result).
pub fn balance_loss_backward(
    logits: &Tensor,
    topk_ids: &Tensor,
    grad_loss: &Tensor,
    cfg: &RouterConfig,
    seq_len: usize,
    alpha: f32,
) -> Result<Tensor> {
    let n_seq = balance_checks(logits, topk_ids, cfg, seq_len)?;
    expect_dims("grad_loss", grad_loss, &[n_seq], DType::F32)?;
    same_device(logits, grad_loss, "grad_loss")?;
    let mut grad = Tensor::empty(logits.dims(), DType::F32, logits.device())?;
    match logits.device().launcher() {
        None => {
            let g = reference::balance_loss_backward(
                &cpu_logits(logits)?,
                topk_ids.cpu_slice()?,
                grad_loss.cpu_slice()?,
                cfg,
                seq_len,
                alpha,
            )?;
            grad.cpu_slice_mut::<f32>()?.copy_from_slice(&g);
        }
        Some(on) => raw::balance_loss_backward(
            on,
            cfg,
            seq_len,
            alpha,
            dev_logits(logits)?,
            topk_ids.dev_ptr()?,
            grad_loss.dev_ptr()?,
            grad.dev_ptr_mut()?,
        )?,
    }
    Ok(grad)
}

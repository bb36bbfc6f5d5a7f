//! Tensor ops: the reference on `Device::Cpu`, the kernels on a GPU or the emulator. Every
//! argument is checked before the device is chosen, so a bad call fails the same way
//! everywhere.

use crate::raw::{self, BackwardIn, StatsOut};
use crate::{reference, Error, Result, SampleConfig};
use moekit_tensor::{DType, Tensor};

/// Outputs of [`log_softmax`], `[N]` F32 each, and the invalid-target status.
#[derive(Debug, Clone)]
pub struct LogSoftmax {
    /// `z[y] - lse` per row (0 without a valid target).
    pub logp: Tensor,
    /// `-sum p log p` per row.
    pub entropy: Tensor,
    /// Row maximum.
    pub row_max: Tensor,
    /// Row logsumexp (the backward's input).
    pub row_lse: Tensor,
    /// `[1]` I32: targets `>= V` (read by [`LogSoftmax::check`]).
    pub status: Tensor,
}

fn check_status(status: &Tensor) -> Result<()> {
    let bad = status.to_vec::<i32>()?[0];
    if bad != 0 {
        return Err(Error::InvalidArgument(format!("{bad} target id(s) outside the vocabulary")));
    }
    Ok(())
}

impl LogSoftmax {
    /// `Err(InvalidArgument)` when a target was `>= V`. Reads the status back (on a GPU: a
    /// synchronisation), so call it where a read-back happens anyway.
    pub fn check(&self) -> Result<()> {
        check_status(&self.status)
    }
}

/// Outputs of [`cross_entropy`].
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// `[1]` F32: `-(sum of logp over rows with a valid target) / max(count, 1)`.
    pub loss: Tensor,
    /// `[1]` I32: rows with a target in `[0, V)`.
    pub count: Tensor,
    /// `[N, V]` F32: the loss gradient w.r.t. the logits.
    pub grad: Tensor,
    /// `[1]` I32: targets `>= V` (read by [`CrossEntropy::check`]).
    pub status: Tensor,
}

impl CrossEntropy {
    /// `Err(InvalidArgument)` when a target was `>= V` (a read-back, as [`LogSoftmax::check`]).
    pub fn check(&self) -> Result<()> {
        check_status(&self.status)
    }
}

fn same_device(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.device().same_as(b.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, the logits on {}", b.device().name(), a.device().name())))
    }
}

/// `(N, V)` of `logits [N, V]` F32 with `targets [N]` I32 on its device.
fn logits_shape(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    logits.expect_dtype("logits", DType::F32)?;
    targets.expect_dtype("targets", DType::I32)?;
    if logits.rank() != 2 {
        return Err(Error::Shape(format!("logits {:?}, expected [N, V]", logits.dims())));
    }
    let (n, v) = (logits.dims()[0], logits.dims()[1]);
    if targets.dims() != [n] {
        return Err(Error::Shape(format!("targets {:?}, expected [{n}]", targets.dims())));
    }
    crate::check_rows(n * v, v, n)?;
    same_device(logits, targets, "targets")?;
    Ok((n, v))
}

fn expect_rows(what: &str, t: &Tensor, n: usize, logits: &Tensor) -> Result<()> {
    t.expect_dtype(what, DType::F32)?;
    if t.dims() != [n] {
        return Err(Error::Shape(format!("{what} {:?}, expected [{n}]", t.dims())));
    }
    same_device(logits, t, what)
}

/// Log-softmax statistics of `logits [N, V]` F32 with `targets [N]` I32 (`< 0`: no target).
pub fn log_softmax(logits: &Tensor, targets: &Tensor) -> Result<LogSoftmax> {
    let (n, v) = logits_shape(logits, targets)?;
    let dev = logits.device();
    let row = || Tensor::empty(&[n], DType::F32, dev);
    let mut out = LogSoftmax {
        logp: row()?,
        entropy: row()?,
        row_max: row()?,
        row_lse: row()?,
        status: Tensor::zeros(&[1], DType::I32, dev)?,
    };
    match dev.launcher() {
        None => {
            let r = reference::log_softmax_forward(logits.cpu_slice()?, v, targets.cpu_slice()?)?;
            out.logp.cpu_slice_mut::<f32>()?.copy_from_slice(&r.logp);
            out.entropy.cpu_slice_mut::<f32>()?.copy_from_slice(&r.entropy);
            out.row_max.cpu_slice_mut::<f32>()?.copy_from_slice(&r.row_max);
            out.row_lse.cpu_slice_mut::<f32>()?.copy_from_slice(&r.row_lse);
            out.status.cpu_slice_mut::<i32>()?[0] = r.invalid as i32;
        }
        Some(on) => {
            let o = StatsOut {
                logp: out.logp.dev_ptr_mut()?,
                entropy: out.entropy.dev_ptr_mut()?,
                row_max: out.row_max.dev_ptr_mut()?,
                row_lse: out.row_lse.dev_ptr_mut()?,
                status: out.status.dev_ptr_mut()?,
            };
            raw::log_softmax_forward(on, logits.dev_ptr()?, v, targets.dev_ptr()?, o)?;
        }
    }
    Ok(out)
}

fn check_backward(
    logits: &Tensor,
    targets: &Tensor,
    stats: &LogSoftmax,
    dlogp: Option<&Tensor>,
    dentropy: Option<&Tensor>,
) -> Result<(usize, usize)> {
    let (n, v) = logits_shape(logits, targets)?;
    expect_rows("row_lse", &stats.row_lse, n, logits)?;
    expect_rows("entropy", &stats.entropy, n, logits)?;
    if let Some(d) = dlogp {
        expect_rows("dlogp", d, n, logits)?;
    }
    if let Some(d) = dentropy {
        expect_rows("dentropy", d, n, logits)?;
    }
    Ok((n, v))
}

fn cpu_backward(
    logits: &Tensor,
    v: usize,
    targets: &Tensor,
    stats: &LogSoftmax,
    dlogp: Option<&Tensor>,
    dentropy: Option<&Tensor>,
) -> Result<Vec<f32>> {
    reference::log_softmax_backward(
        logits.cpu_slice()?,
        v,
        targets.cpu_slice()?,
        stats.row_lse.cpu_slice()?,
        stats.entropy.cpu_slice()?,
        dlogp.map(|d| d.cpu_slice()).transpose()?,
        dentropy.map(|d| d.cpu_slice()).transpose()?,
    )
}

fn dev_inputs<'a>(
    targets: &'a Tensor,
    stats: &'a LogSoftmax,
    dlogp: Option<&'a Tensor>,
    dentropy: Option<&'a Tensor>,
) -> Result<BackwardIn<'a>> {
    Ok(BackwardIn {
        targets: targets.dev_ptr()?,
        row_lse: stats.row_lse.dev_ptr()?,
        entropy: stats.entropy.dev_ptr()?,
        dlogp: dlogp.map(|d| d.dev_ptr()).transpose()?,
        dentropy: dentropy.map(|d| d.dev_ptr()).transpose()?,
    })
}

/// Gradient `[N, V]` F32 w.r.t. `logits` of `sum_r dlogp[r] logp[r] + dentropy[r] H[r]`
/// (`dlogp`, `dentropy`: `[N]` F32 or None for 0), from the forward's `stats`.
pub fn log_softmax_backward(
    logits: &Tensor,
    targets: &Tensor,
    stats: &LogSoftmax,
    dlogp: Option<&Tensor>,
    dentropy: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, v) = check_backward(logits, targets, stats, dlogp, dentropy)?;
    let mut grad = Tensor::empty(&[n, v], DType::F32, logits.device())?;
    match logits.device().launcher() {
        None => {
            let g = cpu_backward(logits, v, targets, stats, dlogp, dentropy)?;
            grad.cpu_slice_mut::<f32>()?.copy_from_slice(&g);
        }
        Some(on) => {
            let i = dev_inputs(targets, stats, dlogp, dentropy)?;
            raw::log_softmax_backward(on, logits.dev_ptr()?, v, &i, grad.dev_ptr_mut()?)?;
        }
    }
    Ok(grad)
}

/// [`log_softmax_backward`] writing the gradient over `logits` (whose storage must not be
/// shared with another tensor: `InvalidArgument` otherwise).
pub fn log_softmax_backward_in_place(
    logits: &mut Tensor,
    targets: &Tensor,
    stats: &LogSoftmax,
    dlogp: Option<&Tensor>,
    dentropy: Option<&Tensor>,
) -> Result<()> {
    let (_, v) = check_backward(logits, targets, stats, dlogp, dentropy)?;
    let dev = logits.device().clone();
    match dev.launcher() {
        None => {
            let g = cpu_backward(logits, v, targets, stats, dlogp, dentropy)?;
            logits.cpu_slice_mut::<f32>()?.copy_from_slice(&g);
        }
        Some(on) => {
            let i = dev_inputs(targets, stats, dlogp, dentropy)?;
            raw::log_softmax_backward_in_place(on, logits.dev_ptr_mut()?, v, &i)?;
        }
    }
    Ok(())
}

/// Mean cross-entropy of `logits [N, V]` F32 against `targets [N]` I32 (`< 0`: ignored) and
/// its gradient w.r.t. the logits (scaled by `1 / count`), without a host synchronisation:
/// three launches (statistics, the one-block reduction, the backward).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<CrossEntropy> {
    let (n, v) = logits_shape(logits, targets)?;
    let dev = logits.device();
    let stats = log_softmax(logits, targets)?;
    let mut loss = Tensor::empty(&[1], DType::F32, dev)?;
    let mut count = Tensor::empty(&[1], DType::I32, dev)?;
    let mut dlogp = Tensor::empty(&[n], DType::F32, dev)?;
    match dev.launcher() {
        None => {
            let (l, c, d) = reference::cross_entropy_reduce(stats.logp.cpu_slice()?, targets.cpu_slice()?, v)?;
            loss.cpu_slice_mut::<f32>()?[0] = l;
            count.cpu_slice_mut::<i32>()?[0] = c;
            dlogp.cpu_slice_mut::<f32>()?.copy_from_slice(&d);
        }
        Some(on) => raw::cross_entropy_reduce(
            on,
            stats.logp.dev_ptr()?,
            targets.dev_ptr()?,
            v,
            loss.dev_ptr_mut()?,
            count.dev_ptr_mut()?,
            dlogp.dev_ptr_mut()?,
        )?,
    }
    let grad = log_softmax_backward(logits, targets, &stats, Some(&dlogp), None)?;
    Ok(CrossEntropy { loss, count, grad, status: stats.status })
}

/// Samples one token per row of `logits [B, V]` F32: `[B]` I32 ids. Row `b` draws its uniform
/// from Philox4x32-10 with key `seed` and counter `(b, step)` ([`crate::philox`]), so the same
/// `(seed, step)` gives the same tokens on every run and every device.
pub fn sample(logits: &Tensor, cfg: &SampleConfig, seed: u64, step: u64) -> Result<Tensor> {
    logits.expect_dtype("logits", DType::F32)?;
    if logits.rank() != 2 {
        return Err(Error::Shape(format!("logits {:?}, expected [B, V]", logits.dims())));
    }
    let (b, v) = (logits.dims()[0], logits.dims()[1]);
    crate::check_rows(b * v, v, b)?;
    cfg.validate(v)?;
    let dev = logits.device();
    let mut tokens = Tensor::empty(&[b], DType::I32, dev)?;
    match dev.launcher() {
        None => {
            let t = reference::sample(logits.cpu_slice()?, v, cfg, seed, step)?;
            tokens.cpu_slice_mut::<i32>()?.copy_from_slice(&t);
        }
        Some(on) => {
            // At temperature 0 the kernel never touches the scratch: one element will do.
            let scratch = if cfg.temperature == 0.0 { 1 } else { b * v };
            let mut weights = Tensor::empty(&[scratch], DType::F32, dev)?;
            raw::sample(on, cfg, logits.dev_ptr()?, v, seed, step, weights.dev_ptr_mut()?, tokens.dev_ptr_mut()?)?;
        }
    }
    Ok(tokens)
}

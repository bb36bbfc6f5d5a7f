//! Launches on device buffers: what other runtimes embed.
//!
//! Every function checks lengths and where each buffer lives before it launches (a typed
//! error, nothing written, otherwise), enqueues on `on` (a GPU stream or the host emulator)
//! and returns without synchronising. One block of [`BLOCK`] threads per row, grid-stride
//! over rows.

use crate::kernels::{LOGITS, SAMPLING};
use crate::{check_rows, Error, Result, SampleConfig, BLOCK};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};

/// Most blocks of a row-per-block launch (rows past it are grid-strided).
const MAX_GRID: usize = 1 << 16;

fn row_grid(rows: usize) -> LaunchConfig {
    LaunchConfig { grid: (rows.clamp(1, MAX_GRID) as u32, 1, 1), block: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 }
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{what}: {got} values, expected {want}")));
    }
    Ok(())
}

/// Outputs of [`log_softmax_forward`], `[rows]` f32 each, and the status counter.
#[derive(Debug)]
pub struct StatsOut<'a> {
    /// Log-probability of each row's target (0 without a valid target).
    pub logp: DevPtrMut<'a, f32>,
    /// Entropy of each row.
    pub entropy: DevPtrMut<'a, f32>,
    /// Row maximum.
    pub row_max: DevPtrMut<'a, f32>,
    /// Row logsumexp.
    pub row_lse: DevPtrMut<'a, f32>,
    /// `[1]` i32: the kernel **adds** the number of targets `>= vocab` (start it at 0).
    pub status: DevPtrMut<'a, i32>,
}

/// Log-softmax statistics of `logits [rows, vocab]` with `targets [rows]` (`< 0`: none).
pub fn log_softmax_forward(
    on: &dyn Launcher,
    logits: DevPtr<'_, f32>,
    vocab: usize,
    targets: DevPtr<'_, i32>,
    out: StatsOut<'_>,
) -> Result<()> {
    let rows = check_rows(logits.len(), vocab, targets.len())?;
    for (what, p) in
        [("logp", &out.logp), ("entropy", &out.entropy), ("row_max", &out.row_max), ("row_lse", &out.row_lse)]
    {
        expect_len(what, p.len(), rows)?;
    }
    expect_len("status", out.status.len(), 1)?;
    let spaces = [
        logits.space(),
        targets.space(),
        out.logp.space(),
        out.entropy.space(),
        out.row_max.space(),
        out.row_lse.space(),
        out.status.space(),
    ];
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if rows == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitLogsoftmaxFwdParams {
        logits: logits.addr(),
        targets: targets.addr(),
        logp: out.logp.addr(),
        entropy: out.entropy.addr(),
        row_max: out.row_max.addr(),
        row_lse: out.row_lse.addr(),
        status: out.status.addr(),
        rows: rows as u64,
        vocab: vocab as i32,
        _pad: 0,
    };
    // SAFETY: the kernel takes one MoekitLogsoftmaxFwdParams by value (layout checked by
    // moekit-abi's tests); it reads rows * vocab logits and rows targets (z[y] only for
    // 0 <= y < vocab), writes rows values of each output and adds to status[0]. Every length
    // was checked above and every pointer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &LOGITS, "moekit_logsoftmax_fwd", row_grid(rows), (params,)) }
}

/// Inputs of the backward besides the logits: the forward's statistics and the upstream
/// gradients, `[rows]` each.
#[derive(Debug, Clone, Copy)]
pub struct BackwardIn<'a> {
    /// Targets (`< 0`: none; `>= vocab`: treated as none).
    pub targets: DevPtr<'a, i32>,
    /// Forward's row logsumexp.
    pub row_lse: DevPtr<'a, f32>,
    /// Forward's entropy.
    pub entropy: DevPtr<'a, f32>,
    /// Gradient w.r.t. each row's log-probability (None: 0).
    pub dlogp: Option<DevPtr<'a, f32>>,
    /// Gradient w.r.t. each row's entropy (None: 0).
    pub dentropy: Option<DevPtr<'a, f32>>,
}

fn backward_params(
    on: &dyn Launcher,
    logits: (u64, usize, MemSpace),
    grad: (u64, usize, MemSpace),
    vocab: usize,
    i: &BackwardIn<'_>,
) -> Result<Option<moekit_abi::MoekitLogsoftmaxBwdParams>> {
    let rows = check_rows(logits.1, vocab, i.targets.len())?;
    expect_len("grad", grad.1, logits.1)?;
    expect_len("row_lse", i.row_lse.len(), rows)?;
    expect_len("entropy", i.entropy.len(), rows)?;
    let mut spaces = vec![logits.2, grad.2, i.targets.space(), i.row_lse.space(), i.entropy.space()];
    for (what, p) in [("dlogp", &i.dlogp), ("dentropy", &i.dentropy)] {
        if let Some(p) = p {
            expect_len(what, p.len(), rows)?;
            spaces.push(p.space());
        }
    }
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if rows == 0 {
        return Ok(None);
    }
    Ok(Some(moekit_abi::MoekitLogsoftmaxBwdParams {
        logits: logits.0,
        grad: grad.0,
        targets: i.targets.addr(),
        row_lse: i.row_lse.addr(),
        entropy: i.entropy.addr(),
        dlogp: i.dlogp.map_or(0, |p| p.addr()),
        dentropy: i.dentropy.map_or(0, |p| p.addr()),
        rows: rows as u64,
        vocab: vocab as i32,
        _pad: 0,
    }))
}

fn launch_backward(on: &dyn Launcher, p: moekit_abi::MoekitLogsoftmaxBwdParams, rows: u64) -> Result<()> {
    // SAFETY: the kernel takes one MoekitLogsoftmaxBwdParams by value; it reads rows * vocab
    // logits and rows values of each given per-row input, and writes rows * vocab gradients,
    // each element by the thread that read the same logit (so grad == logits is fine). The
    // callers checked every length and where every pointer lives.
    unsafe { moekit_cuda::launch(on, &LOGITS, "moekit_logsoftmax_bwd", row_grid(rows as usize), (p,)) }
}

/// Gradient w.r.t. `logits [rows, vocab]`, written to `grad [rows, vocab]` (every element).
pub fn log_softmax_backward(
    on: &dyn Launcher,
    logits: DevPtr<'_, f32>,
    vocab: usize,
    inputs: &BackwardIn<'_>,
    grad: DevPtrMut<'_, f32>,
) -> Result<()> {
    let l = (logits.addr(), logits.len(), logits.space());
    let g = (grad.addr(), grad.len(), grad.space());
    match backward_params(on, l, g, vocab, inputs)? {
        Some(p) => launch_backward(on, p, p.rows),
        None => Ok(()),
    }
}

/// [`log_softmax_backward`] writing the gradient over the logits.
pub fn log_softmax_backward_in_place(
    on: &dyn Launcher,
    logits: DevPtrMut<'_, f32>,
    vocab: usize,
    inputs: &BackwardIn<'_>,
) -> Result<()> {
    let l = (logits.addr(), logits.len(), logits.space());
    match backward_params(on, l, l, vocab, inputs)? {
        Some(p) => launch_backward(on, p, p.rows),
        None => Ok(()),
    }
}

/// Mean cross-entropy from the forward's `logp [rows]`: writes `loss [1]`, `count [1]` (rows
/// with a target in `[0, vocab)`) and the backward's `dlogp [rows]`, all on the device.
pub fn cross_entropy_reduce(
    on: &dyn Launcher,
    logp: DevPtr<'_, f32>,
    targets: DevPtr<'_, i32>,
    vocab: usize,
    loss: DevPtrMut<'_, f32>,
    count: DevPtrMut<'_, i32>,
    dlogp: DevPtrMut<'_, f32>,
) -> Result<()> {
    let rows = targets.len();
    if vocab == 0 || vocab > crate::MAX_VOCAB {
        return Err(Error::Shape(format!("vocab = {vocab} (must be 1..={})", crate::MAX_VOCAB)));
    }
    expect_len("logp", logp.len(), rows)?;
    expect_len("dlogp", dlogp.len(), rows)?;
    expect_len("loss", loss.len(), 1)?;
    expect_len("count", count.len(), 1)?;
    moekit_cuda::ensure_addressable(on, &[logp.space(), targets.space(), loss.space(), count.space(), dlogp.space()])?;
    let params = moekit_abi::MoekitCrossEntropyParams {
        logp: logp.addr(),
        targets: targets.addr(),
        loss: loss.addr(),
        count: count.addr(),
        dlogp: dlogp.addr(),
        rows: rows as u64,
        vocab: vocab as i32,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one block; reads rows logp and targets, writes loss[0], count[0] and rows dlogp,
    // all lengths checked above, every pointer where `on` runs.
    unsafe { moekit_cuda::launch(on, &LOGITS, "moekit_cross_entropy_reduce", cfg, (params,)) }
}

/// Samples one token per row of `logits [rows, vocab]` into `tokens [rows]`; `weights
/// [rows, vocab]` is scratch (untouched at temperature 0, where any length will do). Row `r` draws Philox4x32-10 with
/// key `seed` and counter `(r, step)`.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    on: &dyn Launcher,
    cfg: &SampleConfig,
    logits: DevPtr<'_, f32>,
    vocab: usize,
    seed: u64,
    step: u64,
    weights: DevPtrMut<'_, f32>,
    tokens: DevPtrMut<'_, i32>,
) -> Result<()> {
    cfg.validate(vocab)?;
    let rows = check_rows(logits.len(), vocab, tokens.len())?;
    if cfg.temperature != 0.0 {
        expect_len("weights", weights.len(), logits.len())?;
    }
    moekit_cuda::ensure_addressable(on, &[logits.space(), weights.space(), tokens.space()])?;
    if rows == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitSampleParams {
        logits: logits.addr(),
        weights: weights.addr(),
        tokens: tokens.addr(),
        seed,
        step,
        rows: rows as u64,
        vocab: vocab as i32,
        top_k: cfg.top_k as i32,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
    };
    // SAFETY: the kernel takes one MoekitSampleParams by value; it reads rows * vocab logits,
    // writes and reads back rows * vocab weights (each element by one thread) and writes rows
    // tokens. Lengths and the config were checked above, every pointer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &SAMPLING, "moekit_sample", row_grid(rows), (params,)) }
}

/// Philox4x32-10 on the device (known-answer checks): `out [n, 4]` = the blocks of
/// `ctr [n, 4]` under `key [n, 2]`.
pub fn philox_probe(
    on: &dyn Launcher,
    ctr: DevPtr<'_, u32>,
    key: DevPtr<'_, u32>,
    out: DevPtrMut<'_, u32>,
) -> Result<()> {
    let n = ctr.len() / 4;
    expect_len("ctr", ctr.len(), 4 * n)?;
    expect_len("key", key.len(), 2 * n)?;
    expect_len("out", out.len(), 4 * n)?;
    moekit_cuda::ensure_addressable(on, &[ctr.space(), key.space(), out.space()])?;
    if n == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitPhiloxProbeParams { ctr: ctr.addr(), key: key.addr(), out: out.addr(), n: n as u64 };
    // SAFETY: one thread per block of 4 words; reads 4 n + 2 n words, writes 4 n, lengths
    // checked above.
    unsafe { moekit_cuda::launch(on, &SAMPLING, "moekit_philox_probe", LaunchConfig::for_elements(n, 256)?, (params,)) }
}

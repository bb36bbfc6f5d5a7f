//! Launches on device memory: a [`Table`] of tensor descriptors built (and checked) on the
//! host, uploaded once by the caller into device memory, and three launches that read it:
//! `moekit_optim_sumsq` (per-chunk partial sums), `moekit_optim_norm_finalize` (one block: norm,
//! clip, skip flag, lr, bias corrections, step increment, into `MoekitOptimScalars` in device
//! memory) and `moekit_optim_adamw` (reads those scalars). No host round trip between them, and
//! every argument of a step (table, partials, scalars, lr table) can stay at fixed addresses,
//! so a step can be captured in a CUDA graph and replayed.

use crate::{check_chunk, chunks_of, kernels, Error, OptimConfig, Result, BLOCK, DESC_BYTES, SCALARS_BYTES};
use moekit_abi::{MoekitOptimAdamWParams, MoekitOptimNormParams, MoekitOptimTensor};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// Byte alignment of every f32 and BF16 buffer in a table (float4 / 4 x BF16 accesses).
pub const ALIGN: usize = 16;

/// One parameter tensor for an update: weights, gradient, moments (equal lengths) and an
/// optional BF16 copy of the updated weights.
#[derive(Debug)]
pub struct Slot<'a> {
    /// f32 master weights (updated).
    pub p: DevPtrMut<'a, f32>,
    /// Gradient.
    pub g: DevPtr<'a, f32>,
    /// First moment (updated).
    pub m: DevPtrMut<'a, f32>,
    /// Second moment (updated).
    pub v: DevPtrMut<'a, f32>,
    /// BF16 copy of the updated weights, or none.
    pub p_bf16: Option<DevPtrMut<'a, bf16>>,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// Descriptors of the tensors of one optimizer, checked: equal lengths per slot
/// (`Shape`), [`ALIGN`]-aligned buffers (`Alignment`), no overlap between any two written
/// ranges or between a written range and a gradient (`InvalidArgument`), a valid chunk size.
/// It records addresses only (no borrow), hence the `unsafe` launches below.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    descs: Vec<MoekitOptimTensor>,
    spaces: Vec<MemSpace>,
    n_chunks: u64,
    chunk: usize,
    update: bool,
}

#[allow(clippy::too_many_arguments)] // one per descriptor field
fn desc(p: u64, g: u64, m: u64, v: u64, b: u64, len: usize, start: u64, decay: bool) -> MoekitOptimTensor {
    MoekitOptimTensor { p, g, m, v, p_bf16: b, len: len as u64, chunk_start: start, decay: decay as u32, pad: 0 }
}

fn check_no_overlap(ranges: &mut Vec<(u64, u64, &'static str, usize)>) -> Result<()> {
    ranges.retain(|r| r.1 > r.0);
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::InvalidArgument(format!(
                "optimizer buffers overlap: {} of tensor {} and {} of tensor {}",
                w[0].2, w[0].3, w[1].2, w[1].3
            )));
        }
    }
    Ok(())
}

impl Table {
    /// A table for [`step`] (norm + update) of `slots`, chunks of `chunk` elements.
    pub fn for_update(slots: &[Slot<'_>], chunk: usize) -> Result<Table> {
        check_chunk(chunk)?;
        let (mut descs, mut spaces, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0u64;
        for (i, s) in slots.iter().enumerate() {
            let n = s.p.len();
            crate::reference::check_slot(i, n, s.g.len(), s.m.len(), s.v.len(), s.p_bf16.as_ref().map(|b| b.len()))?;
            let b = s.p_bf16.as_ref().map_or(0, |b| b.addr());
            for (what, addr) in
                [("weights", s.p.addr()), ("gradient", s.g.addr()), ("m", s.m.addr()), ("v", s.v.addr())]
            {
                moekit_cuda::check_aligned(&format!("optimizer {what} of tensor {i}"), addr, n, ALIGN)?;
            }
            moekit_cuda::check_aligned(&format!("optimizer bf16 weights of tensor {i}"), b, n, ALIGN)?;
            let bytes = 4 * n as u64;
            ranges.push((s.p.addr(), s.p.addr() + bytes, "weights", i));
            ranges.push((s.g.addr(), s.g.addr() + bytes, "gradient", i));
            ranges.push((s.m.addr(), s.m.addr() + bytes, "m", i));
            ranges.push((s.v.addr(), s.v.addr() + bytes, "v", i));
            if let Some(pb) = &s.p_bf16 {
                ranges.push((b, b + 2 * n as u64, "bf16 weights", i));
                spaces.push(pb.space());
            }
            spaces.extend([s.p.space(), s.g.space(), s.m.space(), s.v.space()]);
            descs.push(desc(s.p.addr(), s.g.addr(), s.m.addr(), s.v.addr(), b, n, start, s.decay));
            start += chunks_of(n, chunk) as u64;
        }
        // Gradients may not overlap anything written either (they are read while others write).
        check_no_overlap(&mut ranges)?;
        Self::finish(descs, spaces, start, chunk, true)
    }

    /// A table for [`grad_norm`] only (no weights or moments).
    pub fn for_norm(grads: &[DevPtr<'_, f32>], chunk: usize) -> Result<Table> {
        check_chunk(chunk)?;
        let (mut descs, mut spaces) = (Vec::new(), Vec::new());
        let mut start = 0u64;
        for (i, g) in grads.iter().enumerate() {
            moekit_cuda::check_aligned(&format!("gradient of tensor {i}"), g.addr(), g.len(), ALIGN)?;
            spaces.push(g.space());
            descs.push(desc(0, g.addr(), 0, 0, 0, g.len(), start, false));
            start += chunks_of(g.len(), chunk) as u64;
        }
        Self::finish(descs, spaces, start, chunk, false)
    }

    fn finish(
        descs: Vec<MoekitOptimTensor>,
        spaces: Vec<MemSpace>,
        n_chunks: u64,
        chunk: usize,
        update: bool,
    ) -> Result<Table> {
        if descs.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!("{} optimizer tensors (at most 2^32 - 1)", descs.len())));
        }
        Ok(Table { descs, spaces, n_chunks, chunk, update })
    }

    /// The descriptors as the device reads them (`MoekitOptimTensor[n]`, little-endian): what
    /// the caller uploads (16-byte aligned) and passes to the launches.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.descs.len() * DESC_BYTES);
        for d in &self.descs {
            for w in [d.p, d.g, d.m, d.v, d.p_bf16, d.len, d.chunk_start] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&d.decay.to_le_bytes());
            out.extend_from_slice(&d.pad.to_le_bytes());
        }
        out
    }

    /// Tensors described.
    pub fn len(&self) -> usize {
        self.descs.len()
    }
    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
    /// Chunks of all tensors: the length (in f64) of the partials buffer.
    pub fn n_chunks(&self) -> usize {
        self.n_chunks as usize
    }
    /// Elements per chunk.
    pub fn chunk(&self) -> usize {
        self.chunk
    }
    /// Bytes of the partials buffer (`8 * n_chunks`).
    pub fn partials_bytes(&self) -> usize {
        8 * self.n_chunks()
    }
}

/// Where the learning rate of an update comes from.
#[derive(Debug, Clone, Copy)]
pub enum Lr<'a> {
    /// This value (a kernel argument: eager use).
    Value(f32),
    /// `table[min(step, len - 1)]` at the device's step counter ([`OptimConfig::lr_table`]):
    /// what a CUDA-graph replay needs.
    Table(DevPtr<'a, f32>),
}

/// Device buffers of one optimizer besides the tensors: the uploaded [`Table::to_bytes`], the
/// partials (`Table::partials_bytes`, 8-byte aligned) and the scalars (`MoekitOptimScalars`,
/// 32 bytes, 8-byte aligned; `step` initialised by the caller, e.g. `StepInfo::to_bytes`).
#[derive(Debug)]
pub struct Buffers<'a> {
    /// Uploaded descriptors.
    pub table: DevPtr<'a, u8>,
    /// Per-chunk partial sums.
    pub partials: DevPtrMut<'a, u8>,
    /// Step scalars.
    pub scalars: DevPtrMut<'a, u8>,
}

fn check_buffers(on: &dyn Launcher, t: &Table, b: &Buffers<'_>, lr: Option<&Lr<'_>>) -> Result<()> {
    if b.table.len() != t.len() * DESC_BYTES {
        return Err(Error::Shape(format!(
            "optimizer table of {} bytes for {} tensors (expected {})",
            b.table.len(),
            t.len(),
            t.len() * DESC_BYTES
        )));
    }
    if b.partials.len() < t.partials_bytes() {
        return Err(Error::Shape(format!(
            "optimizer partials of {} bytes, need {} ({} chunks)",
            b.partials.len(),
            t.partials_bytes(),
            t.n_chunks()
        )));
    }
    if b.scalars.len() != SCALARS_BYTES {
        return Err(Error::Shape(format!("optimizer scalars of {} bytes, expected {SCALARS_BYTES}", b.scalars.len())));
    }
    moekit_cuda::check_aligned("optimizer table", b.table.addr(), b.table.len(), 8)?;
    moekit_cuda::check_aligned("optimizer partials", b.partials.addr(), b.partials.len(), 8)?;
    moekit_cuda::check_aligned("optimizer scalars", b.scalars.addr(), b.scalars.len(), 8)?;
    let mut spaces = t.spaces.clone();
    spaces.extend([b.table.space(), b.partials.space(), b.scalars.space()]);
    if let Some(Lr::Table(l)) = lr {
        if l.is_empty() || l.len() > u32::MAX as usize {
            return Err(Error::Shape(format!("learning-rate table of {} entries (need 1 ..= 2^32 - 1)", l.len())));
        }
        spaces.push(l.space());
    }
    moekit_cuda::ensure_addressable(on, &spaces)
}

fn cfg_for(blocks: u32) -> LaunchConfig {
    LaunchConfig { grid: (blocks, 1, 1), block: (BLOCK as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Launches the norm: fills `partials` and the scalars' `grad_norm`, `clip`, `skipped`; with
/// `advance = Some(lr)` also `lr`, `bc1`, `bc2` and the step increment (when the norm is
/// finite), exactly as [`crate::reference::finalize`].
///
/// # Safety
/// `bufs.table` holds `table.to_bytes()`, and every buffer the table was built from is still
/// allocated where `on` runs, and not accessed by anyone else until the launches complete.
pub unsafe fn grad_norm(
    on: &dyn Launcher,
    table: &Table,
    bufs: &mut Buffers<'_>,
    cfg: &OptimConfig,
    advance: Option<Lr<'_>>,
) -> Result<()> {
    cfg.validate()?;
    check_buffers(on, table, bufs, advance.as_ref())?;
    let (lr, lr_table, lr_len) = match advance {
        None | Some(Lr::Value(_)) => (if let Some(Lr::Value(v)) = advance { v } else { 0.0 }, 0, 0),
        Some(Lr::Table(t)) => (0.0, t.addr(), t.len() as u32),
    };
    let params = MoekitOptimNormParams {
        tensors: bufs.table.addr(),
        partials: bufs.partials.addr(),
        scalars: bufs.scalars.addr(),
        lr_table,
        n_chunks: table.n_chunks,
        n_tensors: table.len() as u32,
        chunk: table.chunk as u32,
        lr_table_len: lr_len,
        lr,
        clip_norm: cfg.clip_norm,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        advance: advance.is_some() as u32,
    };
    if table.n_chunks > 0 {
        let blocks =
            moekit_cuda::persistent_grid(on, &kernels::OPTIM, "moekit_optim_sumsq", BLOCK as u32, 0, table.n_chunks())?;
        // SAFETY: the kernel takes one MoekitOptimNormParams by value; it reads `len` floats of
        // each descriptor's gradient (aligned, addressable: checked by Table and above; valid by
        // the caller's contract) and writes partials[0 .. n_chunks] (length checked).
        unsafe { moekit_cuda::launch(on, &kernels::OPTIM, "moekit_optim_sumsq", cfg_for(blocks), (params,))? };
    }
    // SAFETY: one block reads partials[0 .. n_chunks], lr_table[0 .. lr_table_len] and writes
    // the 32-byte scalars (all checked above).
    unsafe { moekit_cuda::launch(on, &kernels::OPTIM, "moekit_optim_norm_finalize", cfg_for(1), (params,)) }
}

/// Launches the AdamW update of every tensor of `table` from the scalars (as left by
/// [`grad_norm`] with `advance`); nothing is written when they say `skipped`.
///
/// # Safety
/// As for [`grad_norm`]; `table` was built by [`Table::for_update`].
pub unsafe fn adamw(on: &dyn Launcher, table: &Table, bufs: &mut Buffers<'_>, cfg: &OptimConfig) -> Result<()> {
    cfg.validate()?;
    if !table.update {
        return Err(Error::InvalidArgument("AdamW on a norm-only optimizer table".into()));
    }
    check_buffers(on, table, bufs, None)?;
    if table.n_chunks == 0 {
        return Ok(());
    }
    let params = MoekitOptimAdamWParams {
        tensors: bufs.table.addr(),
        scalars: bufs.scalars.addr(),
        n_chunks: table.n_chunks,
        n_tensors: table.len() as u32,
        chunk: table.chunk as u32,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let blocks =
        moekit_cuda::persistent_grid(on, &kernels::OPTIM, "moekit_optim_adamw", BLOCK as u32, 0, table.n_chunks())?;
    // SAFETY: the kernel takes one MoekitOptimAdamWParams by value; per descriptor it reads and
    // writes `len` elements of p, m, v (and the BF16 copy), reads `len` of g: aligned,
    // addressable and non-overlapping (checked by Table::for_update), valid by the caller's
    // contract; it reads the 32-byte scalars.
    unsafe { moekit_cuda::launch(on, &kernels::OPTIM, "moekit_optim_adamw", cfg_for(blocks), (params,)) }
}

/// One whole step: [`grad_norm`] with `advance`, then [`adamw`] (three launches, no host
/// synchronisation).
///
/// # Safety
/// As for [`adamw`].
pub unsafe fn step(
    on: &dyn Launcher,
    table: &Table,
    bufs: &mut Buffers<'_>,
    cfg: &OptimConfig,
    lr: Lr<'_>,
) -> Result<()> {
    if !table.update {
        return Err(Error::InvalidArgument("an optimizer step on a norm-only table".into()));
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        grad_norm(on, table, bufs, cfg, Some(lr))?;
        adamw(on, table, bufs, cfg)
    }
}

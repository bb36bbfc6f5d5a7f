//! Tensor ops: the optimizer over `Tensor`s on `Device::Cpu` (the reference), `Emulated` or
//! `Cuda` (the kernels), with the same outcome (`Result` variant and bits) on every device.

use crate::raw::{self, Buffers, Lr};
use crate::{check_chunk, chunks_of, reference, Error, OptimConfig, Result, StepInfo, DEFAULT_CHUNK, SCALARS_BYTES};
use moekit_dtype::bf16;
use moekit_tensor::{DType, Device, Tensor};

/// AdamW with global-norm clipping over a fixed list of F32 parameter tensors: the moments
/// (F32, same shapes), the step count and the step's scalars live on the parameters' device.
///
/// [`step`](Self::step) launches three kernels and never reads back; [`info`](Self::info) is
/// the one host read of the metrics. With `lr = None` the learning rate comes from the schedule
/// table on the device at the device's step counter, so a captured step replays correctly.
/// The descriptor table is uploaded on the first step and again only when a tensor's address
/// changes.
#[derive(Debug)]
pub struct AdamW {
    cfg: OptimConfig,
    chunk: usize,
    device: Device,
    dims: Vec<Vec<usize>>,
    decays: Vec<bool>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    scalars: Tensor,
    partials: Tensor,
    lr_table: Option<Tensor>,
    table: Option<(Vec<u8>, Tensor)>,
}

fn same_device(dev: &Device, t: &Tensor, what: &str) -> Result<()> {
    if dev.same_as(t.device()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} is on {}, the optimizer on {}", t.device().name(), dev.name())))
    }
}

fn check_like(what: &str, i: usize, t: &Tensor, dims: &[usize], dtype: DType, dev: &Device) -> Result<()> {
    t.expect_dtype(&format!("{what} {i}"), dtype)?;
    same_device(dev, t, &format!("{what} {i}"))?;
    expect_aligned(&format!("{what} {i}"), t)?;
    if t.dims() != dims {
        return Err(Error::Shape(format!("{what} {i} has shape {:?}, expected {dims:?}", t.dims())));
    }
    Ok(())
}

/// The kernels' 16-byte alignment, checked on every device before the device is chosen, so a
/// misaligned view is the same `Alignment` error on the CPU (host storage is 16-byte aligned, so
/// the residue is the view's offset's on every device). Empty tensors pass.
fn expect_aligned(what: &str, t: &Tensor) -> Result<()> {
    let addr = match (t.device().launcher(), t.dtype()) {
        (None, DType::BF16) => t.cpu_slice::<bf16>()?.as_ptr() as u64,
        (None, _) => t.cpu_slice::<f32>()?.as_ptr() as u64,
        (Some(_), DType::BF16) => t.dev_ptr::<bf16>()?.addr(),
        (Some(_), _) => t.dev_ptr::<f32>()?.addr(),
    };
    moekit_cuda::check_aligned(what, addr, t.numel(), raw::ALIGN)
}

impl AdamW {
    /// Zero moments for `params` (F32 tensors, all on one device; at least one tensor, which
    /// fixes the device), chunks of [`DEFAULT_CHUNK`]; `decays[i]`: whether tensor `i` gets
    /// weight decay (the model: `Params::decays`, rank >= 2).
    pub fn new(cfg: OptimConfig, params: &[Tensor], decays: &[bool]) -> Result<Self> {
        Self::with_chunk(cfg, params, decays, DEFAULT_CHUNK)
    }

    /// As [`new`](Self::new) with `chunk` elements per chunk (a multiple of 4).
    pub fn with_chunk(cfg: OptimConfig, params: &[Tensor], decays: &[bool], chunk: usize) -> Result<Self> {
        cfg.validate()?;
        check_chunk(chunk)?;
        let device = params
            .first()
            .ok_or_else(|| Error::InvalidArgument("an optimizer needs at least one tensor (its device)".into()))?
            .device()
            .clone();
        if decays.len() != params.len() {
            return Err(Error::Shape(format!("{} decay flags for {} tensors", decays.len(), params.len())));
        }
        let mut n_chunks = 0;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, p) in params.iter().enumerate() {
            check_like("parameter", i, p, p.dims(), DType::F32, &device)?;
            m.push(Tensor::zeros(p.dims(), DType::F32, &device)?);
            v.push(Tensor::zeros(p.dims(), DType::F32, &device)?);
            n_chunks += chunks_of(p.numel(), chunk);
        }
        let mut scalars = Tensor::zeros(&[SCALARS_BYTES], DType::U8, &device)?;
        scalars.copy_from_slice(&StepInfo::initial(0).to_bytes())?;
        let partials = Tensor::zeros(&[8 * n_chunks.max(1)], DType::U8, &device)?;
        let lr_table = match cfg.lr_table() {
            Ok(t) => Some(Tensor::from_slice(&t, &[t.len()], &device)?),
            Err(_) => None,
        };
        Ok(AdamW {
            cfg,
            chunk,
            device,
            dims: params.iter().map(|p| p.dims().to_vec()).collect(),
            decays: decays.to_vec(),
            m,
            v,
            scalars,
            partials,
            lr_table,
            table: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// First and second moments, in parameter order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// The step's scalars on the device (`SCALARS_BYTES` U8, [`StepInfo::from_bytes`]'s
    /// layout), e.g. to pack them with other metrics into one readback
    /// (`Tensor::concat_bytes`).
    pub fn scalars(&self) -> &Tensor {
        &self.scalars
    }

    /// Reads the step's scalars back (synchronises a GPU stream: the one metrics read).
    pub fn info(&self) -> Result<StepInfo> {
        StepInfo::from_bytes(&self.scalars.to_vec::<u8>()?)
    }

    /// Sets the step count (resuming a run); the other scalars start over.
    pub fn set_step(&mut self, step: u64) -> Result<()> {
        self.scalars.copy_from_slice(&StepInfo::initial(step).to_bytes())
    }

    /// Replaces the moments with copies of `m` and `v` (resuming a run; same shapes, F32).
    pub fn set_moments(&mut self, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(Error::Shape(format!("{} / {} moments for {} tensors", m.len(), v.len(), self.m.len())));
        }
        for (t, d) in self.m.iter_mut().zip(m).chain(self.v.iter_mut().zip(v)) {
            t.copy_from_slice(d)?;
        }
        Ok(())
    }

    /// One update of `params` from `grads` (clipped to the global norm first), optionally
    /// writing BF16 copies of the new weights into `bf16_out` (BF16, same shapes). `lr`: `Some`
    /// = this learning rate, `None` = the schedule at the device's step count. A non-finite
    /// gradient norm skips the update (nothing changes, the step count neither) and is
    /// reported by [`info`](Self::info); see [`step_checked`](Self::step_checked). Errors:
    /// `Shape`, `Dtype`, `InvalidArgument` (device, shared storage, a schedule too long for a
    /// table with `lr = None`), `Alignment` (views not 16-byte aligned); identical on every
    /// device. Never synchronises.
    pub fn step(
        &mut self,
        params: &mut [Tensor],
        grads: &[Tensor],
        mut bf16_out: Option<&mut [Tensor]>,
        lr: Option<f32>,
    ) -> Result<()> {
        let n = self.dims.len();
        if params.len() != n || grads.len() != n {
            return Err(Error::Shape(format!(
                "{} parameters and {} gradients for an optimizer of {n} tensors",
                params.len(),
                grads.len()
            )));
        }
        for i in 0..n {
            check_like("parameter", i, &params[i], &self.dims[i], DType::F32, &self.device)?;
            check_like("gradient", i, &grads[i], &self.dims[i], DType::F32, &self.device)?;
        }
        if let Some(b) = bf16_out.as_deref() {
            if b.len() != n {
                return Err(Error::Shape(format!("{} bf16 outputs for {n} tensors", b.len())));
            }
            for (i, t) in b.iter().enumerate() {
                check_like("bf16 weights", i, t, &self.dims[i], DType::BF16, &self.device)?;
            }
        }
        if let Some(v) = lr {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::InvalidArgument(format!("learning rate {v}: must be finite and >= 0")));
            }
        } else if self.lr_table.is_none() {
            return Err(Error::InvalidArgument(
                "the schedule is too long for a device table: pass the learning rate per step".into(),
            ));
        }
        let AdamW { cfg, chunk, device, decays, m, v, scalars, partials, lr_table, table, .. } = self;
        match device.launcher() {
            None => {
                let mut state = StepInfo::from_bytes(scalars.cpu_slice::<u8>()?)?;
                let mut outs: Vec<Option<&mut [bf16]>> = match bf16_out.as_deref_mut() {
                    Some(b) => b.iter_mut().map(|t| t.cpu_slice_mut::<bf16>().map(Some)).collect::<Result<_>>()?,
                    None => (0..n).map(|_| None).collect(),
                };
                let mut slots = Vec::with_capacity(n);
                for ((((p, g), (m, v)), &decay), b) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .zip(decays.iter())
                    .zip(outs.iter_mut())
                {
                    slots.push(reference::Slot {
                        p: p.cpu_slice_mut::<f32>()?,
                        g: g.cpu_slice::<f32>()?,
                        m: m.cpu_slice_mut::<f32>()?,
                        v: v.cpu_slice_mut::<f32>()?,
                        p_bf16: b.take(),
                        decay,
                    });
                }
                reference::step(&mut slots, cfg, *chunk, lr, &mut state)?;
                drop(slots);
                scalars.copy_from_slice(&state.to_bytes())?;
            }
            Some(on) => {
                let mut outs: Vec<Option<moekit_cuda::DevPtrMut<'_, bf16>>> = match bf16_out {
                    Some(b) => b.iter_mut().map(|t| t.dev_ptr_mut::<bf16>().map(Some)).collect::<Result<_>>()?,
                    None => (0..n).map(|_| None).collect(),
                };
                let mut slots = Vec::with_capacity(n);
                for ((((p, g), (m, v)), &decay), b) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .zip(decays.iter())
                    .zip(outs.iter_mut())
                {
                    slots.push(raw::Slot {
                        p: p.dev_ptr_mut::<f32>()?,
                        g: g.dev_ptr::<f32>()?,
                        m: m.dev_ptr_mut::<f32>()?,
                        v: v.dev_ptr_mut::<f32>()?,
                        p_bf16: b.take(),
                        decay,
                    });
                }
                let t = raw::Table::for_update(&slots, *chunk)?;
                let bytes = t.to_bytes();
                if table.as_ref().is_none_or(|(b, _)| *b != bytes) {
                    let dev = Tensor::from_slice(&bytes, &[bytes.len()], device)?;
                    *table = Some((bytes, dev));
                }
                let table_dev = &table.as_ref().expect("set above").1;
                let mut bufs = Buffers {
                    table: table_dev.dev_ptr::<u8>()?,
                    partials: partials.dev_ptr_mut::<u8>()?,
                    scalars: scalars.dev_ptr_mut::<u8>()?,
                };
                let lr = match lr {
                    Some(v) => Lr::Value(v),
                    None => Lr::Table(lr_table.as_ref().expect("checked above").dev_ptr::<f32>()?),
                };
                // SAFETY: `bufs.table` holds `t.to_bytes()` (uploaded above whenever it changed);
                // every pointer of `t` comes from a tensor borrowed by this call (`params`,
                // `grads`, `bf16_out`, the moments), whose storage is unshared where written
                // (dev_ptr_mut) and outlives the launches in stream order, like every tensor op.
                unsafe { raw::step(on, &t, &mut bufs, cfg, lr)? };
                drop(slots);
            }
        }
        Ok(())
    }

    /// [`step`](Self::step), then [`info`](Self::info): a skipped update is an
    /// `InvalidArgument` error, as `moekit_model::AdamW::step` (reads back: eager use only).
    pub fn step_checked(
        &mut self,
        params: &mut [Tensor],
        grads: &[Tensor],
        bf16_out: Option<&mut [Tensor]>,
        lr: Option<f32>,
    ) -> Result<StepInfo> {
        self.step(params, grads, bf16_out, lr)?;
        let info = self.info()?;
        if info.skipped {
            return Err(Error::InvalidArgument(format!("gradient norm is {}; update skipped", info.grad_norm)));
        }
        Ok(info)
    }
}

/// The global L2 norm of F32 `grads` (all on one device; any shapes; an empty list is 0), in
/// the kernels' order on every device, chunks of `chunk` elements. Reads the result back.
pub fn grad_norm(grads: &[Tensor], chunk: usize) -> Result<f32> {
    check_chunk(chunk)?;
    let Some(first) = grads.first() else { return Ok(0.0) };
    let dev = first.device().clone();
    for (i, g) in grads.iter().enumerate() {
        check_like("gradient", i, g, g.dims(), DType::F32, &dev)?;
    }
    match dev.launcher() {
        None => {
            let gs = grads.iter().map(|g| g.cpu_slice::<f32>()).collect::<Result<Vec<_>>>()?;
            reference::grad_norm(&gs, chunk)
        }
        Some(on) => {
            let ptrs = grads.iter().map(|g| g.dev_ptr::<f32>()).collect::<Result<Vec<_>>>()?;
            let t = raw::Table::for_norm(&ptrs, chunk)?;
            let bytes = t.to_bytes();
            let table = Tensor::from_slice(&bytes, &[bytes.len()], &dev)?;
            let mut partials = Tensor::empty(&[t.partials_bytes().max(8)], DType::U8, &dev)?;
            let mut scalars = Tensor::zeros(&[SCALARS_BYTES], DType::U8, &dev)?;
            {
                let mut bufs = Buffers {
                    table: table.dev_ptr::<u8>()?,
                    partials: partials.dev_ptr_mut::<u8>()?,
                    scalars: scalars.dev_ptr_mut::<u8>()?,
                };
                // Only clip_norm matters for a norm (and it does not change the norm).
                let cfg = OptimConfig::default();
                // SAFETY: `bufs.table` holds `t.to_bytes()`; the gradients are borrowed by this
                // call and only read.
                unsafe { raw::grad_norm(on, &t, &mut bufs, &cfg, None)? };
            }
            Ok(StepInfo::from_bytes(&scalars.to_vec::<u8>()?)?.grad_norm)
        }
    }
}

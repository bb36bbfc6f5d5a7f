//! The CUDA path (feature `cuda`): candle's CUDA tensors handed to moekit's raw launchers.
//!
//! An [`Exec`] borrows candle's stream and context for one launch: the context through
//! [`Gpu::borrow_context`] (moekit's modules are loaded into it once and stay loaded; moekit
//! never releases or destroys it), the stream through [`Stream::borrowed`] (never destroyed),
//! and the calling thread's current context is saved and restored ([`CurrentContext`]).
//! Buffers are the `CudaSlice`s of candle's storages, read and written through cudarc's
//! `DevicePtr`/`DevicePtrMut` on candle's stream (so cudarc's event tracking, when on, orders
//! them like candle's own kernels); outputs are allocated by candle's device on its stream.
//! Nothing here synchronises.

use crate::convert::{bad, wrap};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CustomOp1, Layout, Result, Shape, Storage, Tensor};
use moekit_cuda::{sys, CurrentContext, DevPtr, DevPtrMut, Gpu, Launcher, MemSpace, Stream};
use std::sync::{Arc, Mutex};

/// The moekit handle of every context candle has run moekit in (modules stay loaded).
static GPUS: Mutex<Vec<(usize, Gpu)>> = Mutex::new(Vec::new());

fn gpu_for(ctx: sys::CUcontext) -> Result<Gpu> {
    let mut gpus = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, g)) = gpus.iter().find(|(c, _)| *c == ctx as usize) {
        return Ok(g.clone());
    }
    // SAFETY: `ctx` is the context of a live candle `CudaDevice` (cudarc's primary context of
    // its ordinal, retained by cudarc for as long as any candle device or tensor of it lives).
    // moekit's handle never releases it; the modules it loads stay in the context until the
    // process ends (the handle is kept here), which is how long a primary context lives.
    let gpu = unsafe { Gpu::borrow_context(ctx) }.map_err(wrap)?;
    gpus.push((ctx as usize, gpu.clone()));
    Ok(gpu)
}

/// One launch (or a few) on candle's stream of one device.
///
/// Fields drop in order: the borrowed stream (nothing destroyed), then the guard that makes
/// the thread's previous context current again.
pub(crate) struct Exec {
    stream: Stream,
    cs: Arc<CudaStream>,
    dev: CudaDevice,
    _restore: CurrentContext,
}

impl Exec {
    /// Borrows `dev`'s stream and context.
    pub(crate) fn new(dev: &CudaDevice) -> Result<Exec> {
        let restore = CurrentContext::save().map_err(wrap)?;
        let cs = dev.cuda_stream();
        let gpu = gpu_for(cs.context().cu_ctx())?;
        gpu.bind().map_err(wrap)?;
        // SAFETY: `cs` is a stream of `gpu`'s context (both are candle's: cudarc makes its
        // streams in its context), or the null legacy stream; `self.cs` keeps it alive for
        // as long as the borrowed handle, and work enqueued on it keeps running after that
        // under cudarc's own ownership.
        let stream = unsafe { Stream::borrowed(&gpu, cs.cu_stream()) };
        Ok(Exec { stream, cs, dev: dev.clone(), _restore: restore })
    }

    /// The launcher (candle's stream).
    pub(crate) fn on(&self) -> &dyn Launcher {
        &self.stream
    }

    fn space(&self) -> MemSpace {
        MemSpace::Device(self.stream.gpu().raw_context() as usize)
    }

    fn view<'a, T, U>(
        &'a self,
        v: &'a CudaSlice<T>,
        r: std::ops::Range<usize>,
        what: &str,
    ) -> Result<(DevPtr<'a, U>, SyncOnDrop<'a>)> {
        if std::mem::size_of::<T>() != std::mem::size_of::<U>() {
            return bad(format!(
                "{what}: element size {} where {} was expected",
                std::mem::size_of::<T>(),
                std::mem::size_of::<U>()
            ));
        }
        if r.end > v.len() || r.start > r.end {
            return bad(format!("{what}: elements {r:?} of a buffer of {}", v.len()));
        }
        let (base, sync) = v.device_ptr(&self.cs);
        let addr = base + (r.start * std::mem::size_of::<T>()) as u64;
        // SAFETY: `addr` is element `r.start` of a live candle allocation of `v.len()`
        // elements in this context (`r` checked against it), and `U` has `T`'s size; `v` is
        // borrowed for 'a, so the memory stays allocated; candle never writes an input
        // storage while a custom op reads it (the op holds its read lock), and `sync`
        // records the read on candle's stream when dropped (after the launch).
        let p = unsafe { DevPtr::from_raw_in(addr, r.len(), self.space()) };
        Ok((p, sync))
    }

    /// The device view of a contiguous storage region (`layout`'s start offset respected),
    /// as elements of `U` (of the storage's element size: U32 ids are read as I32, F8E4M3
    /// codes as bytes).
    pub(crate) fn input<'a, U>(
        &'a self,
        s: &'a CudaStorage,
        layout: &Layout,
        what: &str,
    ) -> Result<(DevPtr<'a, U>, SyncOnDrop<'a>)> {
        let r = match layout.contiguous_offsets() {
            Some((a, b)) => a..b,
            None => return bad(format!("{what}: non-contiguous layout reached a custom op")),
        };
        match &s.slice {
            CudaStorageSlice::F32(v) => self.view(v, r, what),
            CudaStorageSlice::BF16(v) => self.view(v, r, what),
            CudaStorageSlice::I32(v) => self.view(v, r, what),
            CudaStorageSlice::U32(v) => self.view(v, r, what),
            CudaStorageSlice::F8E4M3(v) => self.view(v, r, what),
            CudaStorageSlice::U8(v) => self.view(v, r, what),
            _ => bad(format!("{what}: dtype {:?} is not taken by moekit", s.dtype())),
        }
    }

    /// The writable device view of a whole output allocation, as elements of `U`.
    pub(crate) fn output<'a, T, U>(&'a self, v: &'a mut CudaSlice<T>) -> Result<(DevPtrMut<'a, U>, SyncOnDrop<'a>)> {
        if std::mem::size_of::<T>() != std::mem::size_of::<U>() {
            return bad("internal: output element sizes differ".into());
        }
        let len = v.len();
        let (addr, sync) = v.device_ptr_mut(&self.cs);
        // SAFETY: `addr` is a live allocation of `len` elements of `T` (size of `U`) in this
        // context, borrowed mutably for 'a (no other access to it); `sync` records the write
        // on candle's stream when dropped (after the launch).
        let p = unsafe { DevPtrMut::from_raw_in(addr, len, self.space()) };
        Ok((p, sync))
    }

    /// `len` zeroed elements on candle's stream (outputs a kernel does not write in full).
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.dev.alloc_zeros::<T>(len)
    }

    /// `len` elements of unspecified contents (outputs a kernel writes in full, as moekit's
    /// raw layer documents).
    pub(crate) fn uninit<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller launches a kernel that writes all `len` elements before the
        // storage is read (the raw function's contract, cited at each call).
        unsafe { self.dev.alloc::<T>(len) }
    }

    /// A slice as candle storage.
    pub(crate) fn storage<T: CudaDType>(&self, v: CudaSlice<T>) -> CudaStorage {
        CudaStorage::wrap_cuda_slice(v, self.dev.clone())
    }
}

/// The CUDA storage of a tensor's storage guard.
pub(crate) fn cuda_of<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bad(format!("{what} is not on the CUDA device of the op's inputs")),
    }
}

/// Errors unless `t` is on the same device as `like`.
pub(crate) fn same_device(what: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.device().same_device(like.device()) {
        Ok(())
    } else {
        bad(format!("{what} is on {:?}, expected {:?}", t.device().location(), like.device().location()))
    }
}

/// Side outputs of a custom op (candle's ops return one storage): filled by `cuda_fwd`, taken
/// by the function that applied the op.
pub(crate) type Side = Arc<Mutex<Vec<CudaStorage>>>;

/// Takes the side outputs of an op that has run.
pub(crate) fn take_side(side: &Side, n: usize) -> Result<Vec<CudaStorage>> {
    let v = std::mem::take(&mut *side.lock().unwrap_or_else(|p| p.into_inner()));
    if v.len() != n {
        return bad(format!("internal: {} side outputs, expected {n}", v.len()));
    }
    Ok(v)
}

/// A CUDA storage as a tensor of `dims` (no gradient).
pub(crate) fn to_tensor(s: CudaStorage, dims: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), Shape::from_dims(dims), BackpropOp::none(), false)
}

/// Expert ids (U32 or I32, contiguous) as U32 with the same bits (`-1` is `u32::MAX`), for
/// candle's integer ops, which take U32 and not I32 on CUDA. U32 ids are returned as they are.
pub(crate) fn ids_as_u32(ids: &Tensor) -> Result<Tensor> {
    match ids.dtype() {
        candle_core::DType::U32 => Ok(ids.clone()),
        _ => ids.contiguous()?.apply_op1_no_bwd(&AsU32),
    }
}

/// I32 ids reinterpreted as U32 (a device copy of the bits).
struct AsU32;

impl CustomOp1 for AsU32 {
    fn name(&self) -> &'static str {
        "moekit-ids-as-u32"
    }
    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::I32(v), Some((a, b))) => {
                Ok((candle_core::CpuStorage::U32(v[a..b].iter().map(|&e| e as u32).collect()), l.shape().clone()))
            }
            _ => bad("internal: ids-as-u32 takes contiguous I32".into()),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let x = Exec::new(&s.device)?;
        let (src, _g_src) = x.input::<i32>(s, l, "ids")?;
        let mut out = x.uninit::<u32>(src.len())?;
        {
            let (dst, _g_dst) = x.output::<u32, u32>(&mut out)?;
            if !src.is_empty() {
                // SAFETY: both ranges are live device allocations of `src.len()` 4-byte
                // elements in candle's context (the views checked them), they do not overlap
                // (`out` is fresh), and the copy is enqueued on candle's stream, ordered after
                // the writes of `src` and before any use of `out`; it writes all of `out`.
                unsafe {
                    candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
                        dst.addr(),
                        src.addr(),
                        src.len() * 4,
                        x.stream.raw(),
                    )
                }
                .map_err(|e| candle_core::Error::Msg(format!("moekit-candle: cuMemcpyDtoDAsync: {e:?}")))?;
            }
        }
        Ok((x.storage(out), l.shape().clone()))
    }
}

/// The CPU side of an op that only the CUDA path applies (an internal error if reached).
pub(crate) fn cpu_only<T>(op: &str) -> Result<T> {
    bad(format!("internal: {op} (an op of the CUDA path) got CPU tensors"))
}

/// `CustomOp3::cpu_fwd` of an op that only the CUDA path applies.
macro_rules! cuda_only_cpu_fwd3 {
    () => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::cuda::cpu_only(self.name())
        }
    };
}
pub(crate) use cuda_only_cpu_fwd3;

//! Device memory: owned buffers (stream-ordered or context-allocated) and borrowed pointers.

use crate::error::{CudaContext, Error, Result};
use crate::gpu::Gpu;
use crate::stream::{CaptureState, DeferredFree, Stream};
use crate::sync::{synchronizing, synchronizing_point};
use bytemuck::Pod;
use cudarc::driver::{result, sys};
use std::marker::PhantomData;
use std::sync::Arc;

/// Where the memory behind a [`DevPtr`] lives. Launches check it against their target, so
/// safe code cannot hand device memory to the host emulation or host memory to a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemSpace {
    /// Device memory of the context with this handle (`CUcontext` as an integer).
    Device(usize),
    /// Host memory (the emulation target).
    Host,
    /// Wrapped with `from_raw`: the caller vouched for it (unsafe contract).
    Foreign,
}

/// Where a [`DeviceBuffer`] is allocated and freed: a stream (`&Arc<Stream>`:
/// stream-ordered, never synchronises) or a context (`&Gpu`: synchronous `cuMemAlloc` /
/// `cuMemFree`, each a counted host synchronisation point). Sealed.
pub trait Placement: sealed::Sealed {}

mod sealed {
    /// The owner a placement gives a new buffer.
    pub trait Sealed {
        fn owner(&self) -> super::Owner;
    }
}

impl Placement for Gpu {}
impl sealed::Sealed for Gpu {
    fn owner(&self) -> Owner {
        Owner::Context(self.clone())
    }
}

impl Placement for Arc<Stream> {}
impl sealed::Sealed for Arc<Stream> {
    fn owner(&self) -> Owner {
        Owner::Stream { stream: self.clone(), pooled: false, capture: None }
    }
}

/// Who allocated a [`DeviceBuffer`] (see [`Placement`]); not nameable outside the crate.
pub enum Owner {
    /// Stream-ordered on `stream`.
    Stream {
        /// The stream it is allocated, zeroed, copied and freed on.
        stream: Arc<Stream>,
        /// `cuMemAllocAsync` memory (false: the device has no memory pools, `cuMemAlloc`).
        pooled: bool,
        /// The capture open on `stream` when it was allocated.
        capture: Option<Arc<CaptureState>>,
    },
    /// Synchronous, in the context.
    Context(Gpu),
}

/// An owned device allocation of `len` elements of `T`, freed on drop.
///
/// # Stream-ordered buffers (the default of the tensor layer)
///
/// Made with a stream (`DeviceBuffer::uninit(&stream, n)`, `stream: Arc<Stream>`), a buffer is
/// allocated with `cuMemAllocFromPoolAsync`-style stream-ordered allocation (`cuMemAllocAsync`
/// from the device's pool, configured by [`Gpu::stream_pool`] to cache freed memory), zeroed
/// with `cuMemsetD8Async` and filled with `cuMemcpyHtoDAsync` on that stream, and freed on drop
/// with `cuMemFreeAsync` on that stream: none of it waits for the device, so a whole step can
/// run (and be captured into a graph) without a host synchronisation. The contract:
/// - the memory is valid for work enqueued on the owning stream after the allocation; work on
///   another stream must be ordered after it by an event ([`Stream::record`] +
///   [`Stream::wait`]);
/// - a buffer freed (dropped) on stream S may be reused by later allocations of work on S, or
///   of other streams once the free is known to have completed: work on another stream that
///   still uses the buffer must be ordered before the drop (wait for it with an event on S)
///   — dropping a buffer while another stream's unordered kernels read it is a use after free;
/// - the stream must stay valid for the buffer's lifetime (the buffer holds an `Arc` of it).
///
/// Without memory pools (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED` = 0) the buffer falls
/// back to `cuMemAlloc` / `cuMemFree` (counted synchronisation points); memsets and copies stay
/// on the stream.
///
/// # Context-allocated buffers
///
/// Made with a [`Gpu`] (`DeviceBuffer::uninit(&gpu, n)`), a buffer is allocated with the
/// synchronous `cuMemAlloc` and freed with `cuMemFree`, zeroed with `cuMemsetD8` + a context
/// synchronisation, copied synchronously: each is a counted synchronisation point. For simple
/// programs and tests; borrowed-stream users (moekit-candle, moekit-capi) allocate nothing.
pub struct DeviceBuffer<T: Pod> {
    owner: Owner,
    ptr: sys::CUdeviceptr,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: the buffer is plain device memory; the handle has no thread affinity.
unsafe impl<T: Pod> Send for DeviceBuffer<T> {}
// SAFETY: `&DeviceBuffer` gives only reads (or kernel launches that the caller orders).
unsafe impl<T: Pod> Sync for DeviceBuffer<T> {}

impl<T: Pod> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer<{}>(0x{:x}, len {})", std::any::type_name::<T>(), self.ptr, self.len)
    }
}

impl<T: Pod> DeviceBuffer<T> {
    /// Allocates `len` elements with unspecified contents, for outputs a kernel writes in
    /// full: no memset. On a stream: stream-ordered, no synchronisation; on a [`Gpu`]:
    /// `cuMemAlloc` (a synchronisation point). (Any bit pattern is a valid `T`: `T: Pod`.)
    pub fn uninit(on: &(impl Placement + ?Sized), len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("{len} elements overflow")))?;
        // cuMemAlloc rejects 0 bytes: allocate one byte so every buffer has a valid address.
        let bytes = bytes.max(1);
        let mut owner = sealed::Sealed::owner(on);
        let ptr = match &mut owner {
            Owner::Context(gpu) => {
                gpu.bind()?;
                // SAFETY: plain allocation in the bound context.
                synchronizing("cuMemAlloc", || unsafe { result::malloc_sync(bytes) })?
            }
            Owner::Stream { stream, pooled, capture } => {
                let gpu = stream.gpu();
                *pooled = gpu.stream_pool()?.is_some();
                gpu.bind()?;
                if *pooled {
                    // SAFETY: a valid stream of the bound context; the memory is used only in
                    // stream order (the type's contract, documented above).
                    let ptr = unsafe { result::malloc_async(stream.raw(), bytes) }.during("cuMemAllocAsync")?;
                    *capture = stream.open_capture();
                    if let Some(c) = capture {
                        c.allocated();
                    }
                    ptr
                } else {
                    // SAFETY: plain allocation in the bound context.
                    synchronizing("cuMemAlloc", || unsafe { result::malloc_sync(bytes) })?
                }
            }
        };
        Ok(DeviceBuffer { owner, ptr, len, _t: PhantomData })
    }

    /// Allocates `len` zeroed elements: on a stream, `cuMemsetD8Async` on it (no
    /// synchronisation); on a [`Gpu`], `cuMemsetD8` and a context synchronisation (one point).
    pub fn zeros(on: &(impl Placement + ?Sized), len: usize) -> Result<Self> {
        let buf = Self::uninit(on, len)?;
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let ptr = buf.ptr;
        match &buf.owner {
            Owner::Stream { stream, .. } => {
                // SAFETY: `ptr` addresses `bytes` bytes just allocated in stream order on this
                // stream (bound by `uninit`).
                unsafe { result::memset_d8_async(ptr, 0, bytes, stream.raw()) }.during("cuMemsetD8Async")?;
            }
            Owner::Context(_) => synchronizing_point("cuMemsetD8 + cuCtxSynchronize", || {
                // SAFETY: `ptr` addresses at least `bytes` bytes just allocated.
                unsafe { result::memset_d8_sync(ptr, 0, bytes) }.during("cuMemsetD8")?;
                // cuMemsetD8 on device memory may still run when it returns, on the legacy
                // stream, which non-blocking streams do not wait for: finish it first.
                result::ctx::synchronize().during("cuCtxSynchronize")
            })?,
        }
        Ok(buf)
    }

    /// Allocates and copies `data` in: on a stream, `cuMemcpyHtoDAsync` on it (see
    /// [`DeviceBuffer::copy_from_host`]); on a [`Gpu`], synchronously.
    pub fn from_host(on: &(impl Placement + ?Sized), data: &[T]) -> Result<Self> {
        let mut buf = Self::uninit(on, data.len())?; // every byte is copied in below
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    /// Overwrites the whole buffer with `data`; `data.len()` must equal `len`.
    ///
    /// Stream-ordered buffer: `cuMemcpyHtoDAsync` on the owning stream, after the work already
    /// enqueued there (work of other streams that still reads the buffer must be ordered
    /// before it by the caller). `data` is pageable memory, so the driver stages it: the call
    /// returns once `data` has been consumed (it may be reused right away), possibly after
    /// waiting for a staging buffer; it does not wait for the stream's kernels and is not
    /// counted. A pageable copy cannot be captured into a graph: upload a graph's inputs
    /// before launching it. Context buffer: a context synchronisation, a synchronous copy
    /// and another synchronisation (one counted point).
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::Shape(format!("copy of {} elements into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.gpu().bind()?;
        let ptr = self.ptr;
        match &self.owner {
            Owner::Stream { stream, .. } => {
                // SAFETY: destination holds exactly `data.len()` elements of T, in stream order
                // on this stream; a pageable source is staged before the call returns.
                unsafe { result::memcpy_htod_async(ptr, data, stream.raw()) }.during("cuMemcpyHtoDAsync")
            }
            Owner::Context(_) => synchronizing_point("cuMemcpyHtoD", || {
                // Earlier kernels on any stream may still read this buffer.
                result::ctx::synchronize().during("cuCtxSynchronize")?;
                // SAFETY: destination holds exactly `data.len()` elements of T.
                unsafe { result::memcpy_htod_sync(ptr, data) }.during("cuMemcpyHtoD")?;
                // A pageable host-to-device copy may return before the DMA lands: wait for it.
                result::ctx::synchronize().during("cuCtxSynchronize")
            }),
        }
    }

    /// Copies `src` (same length) into this buffer: see [`DeviceBuffer::copy_from_device_at`].
    pub fn copy_from_device(&mut self, src: DevPtr<'_, T>) -> Result<()> {
        if src.len() != self.len {
            return Err(Error::Shape(format!("copy of {} elements into a buffer of {}", src.len(), self.len)));
        }
        self.copy_from_device_at(0, src)
    }

    /// Copies `src` into elements `start..start + src.len()` of this buffer, on this buffer's
    /// stream (`cuMemcpyDtoDAsync`, capturable); the writes of `src` must be ordered before it
    /// (same stream, or an event). Context buffers copy synchronously between two context
    /// synchronisations (one counted point). `src` must not overlap the destination range.
    pub fn copy_from_device_at(&mut self, start: usize, src: DevPtr<'_, T>) -> Result<()> {
        self.check_range(start, src.len())?;
        if !matches!(src.space(), MemSpace::Foreign) && src.space() != self.space() {
            return Err(Error::InvalidArgument(format!("a copy from {:?} memory into {self:?}", src.space())));
        }
        if src.is_empty() {
            return Ok(());
        }
        let size = std::mem::size_of::<T>();
        let (dst, from, bytes) = (self.ptr + (start * size) as u64, src.addr(), src.len() * size);
        if dst < from + bytes as u64 && from < dst + bytes as u64 {
            return Err(Error::InvalidArgument("overlapping device copy".into()));
        }
        self.gpu().bind()?;
        match &self.owner {
            Owner::Stream { stream, .. } => {
                // SAFETY: both ranges hold `bytes` bytes of device memory of this context
                // (checked range and spaces; a foreign source is the caller's `from_raw`
                // contract) and do not overlap; the copy is ordered on the owning stream.
                unsafe { result::memcpy_dtod_async(dst, from, bytes, stream.raw()) }.during("cuMemcpyDtoDAsync")
            }
            Owner::Context(_) => synchronizing_point("cuMemcpyDtoD + cuCtxSynchronize", || {
                result::ctx::synchronize().during("cuCtxSynchronize")?;
                // SAFETY: as above; the context is idle, and we wait for the copy below.
                unsafe { result::memcpy_dtod_sync(dst, from, bytes) }.during("cuMemcpyDtoD")?;
                result::ctx::synchronize().during("cuCtxSynchronize")
            }),
        }
    }

    /// Copies the buffer to a new host vector, on `stream` (one counted synchronisation
    /// point: the copy, and a wait on `stream` until it has landed). `stream` must be ordered
    /// after every write of the buffer (the owning stream, or the stream its writers ran on).
    pub fn to_host(&self, stream: &Stream) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        self.copy_range_to_host(stream, 0, &mut out)?;
        Ok(out)
    }

    /// Copies elements `start..start + out.len()` into `out`, on `stream` (as
    /// [`DeviceBuffer::to_host`]: one counted synchronisation point). [`Error::Capture`] while
    /// `stream` is capturing (a readback cannot be part of a graph).
    pub fn copy_range_to_host(&self, stream: &Stream, start: usize, out: &mut [T]) -> Result<()> {
        self.check_range(start, out.len())?;
        if !stream.gpu().same_as(self.gpu()) {
            return Err(Error::InvalidArgument(format!("{self:?} read on {stream:?}")));
        }
        self.gpu().bind()?;
        let src = self.ptr + (start * std::mem::size_of::<T>()) as u64;
        synchronizing_point("cuMemcpyDtoHAsync + cuStreamSynchronize", || {
            if stream.is_capturing() {
                // The host would read before the graph ever ran: refused before the driver is
                // asked (whose answer for a pageable copy in a capture varies).
                return Err(Error::Capture {
                    call: "cuMemcpyDtoHAsync",
                    name: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED".into(),
                    code: sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED as u32,
                });
            }
            if !out.is_empty() {
                // SAFETY: the range is inside the allocation (checked); `out` stays borrowed
                // until the stream synchronisation below, after which the copy has landed.
                unsafe { result::memcpy_dtoh_async(out, src, stream.raw()) }.during("cuMemcpyDtoHAsync")?;
            }
            // SAFETY: valid stream handle; waits for the copy (and everything before it).
            unsafe { result::stream::synchronize(stream.raw()) }.during("cuStreamSynchronize")
        })
    }

    /// The stream of a stream-ordered buffer (None for a context buffer).
    pub fn stream(&self) -> Option<&Arc<Stream>> {
        match &self.owner {
            Owner::Stream { stream, .. } => Some(stream),
            Owner::Context(_) => None,
        }
    }

    /// Device address of the first element.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Read-only view of elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Result<DevPtr<'_, T>> {
        self.check_range(start, len)?;
        Ok(DevPtr {
            addr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            space: self.space(),
            _t: PhantomData,
        })
    }

    /// Writable view of elements `start..start + len`.
    pub fn slice_mut(&mut self, start: usize, len: usize) -> Result<DevPtrMut<'_, T>> {
        self.check_range(start, len)?;
        Ok(DevPtrMut {
            addr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            space: self.space(),
            _t: PhantomData,
        })
    }

    fn check_range(&self, start: usize, len: usize) -> Result<()> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Shape(format!("range {start}..{start}+{len} outside a buffer of {}", self.len))),
        }
    }

    fn space(&self) -> MemSpace {
        MemSpace::Device(self.gpu().raw_context() as usize)
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device.
    pub fn gpu(&self) -> &Gpu {
        match &self.owner {
            Owner::Stream { stream, .. } => stream.gpu(),
            Owner::Context(gpu) => gpu,
        }
    }
    /// Read-only view for kernel arguments.
    pub fn view(&self) -> DevPtr<'_, T> {
        DevPtr { addr: self.ptr, len: self.len, space: self.space(), _t: PhantomData }
    }
    /// Writable view for kernel arguments.
    pub fn view_mut(&mut self) -> DevPtrMut<'_, T> {
        DevPtrMut { addr: self.ptr, len: self.len, space: self.space(), _t: PhantomData }
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        let ptr = self.ptr;
        match &self.owner {
            Owner::Context(gpu) => {
                if gpu.bind().is_ok() {
                    // SAFETY: allocated by us in this context, freed once.
                    let _ = synchronizing("cuMemFree", || unsafe { result::free_sync(ptr) });
                }
            }
            Owner::Stream { stream, pooled, capture } => {
                match capture {
                    // Allocated in a capture that has ended with this buffer alive: the memory
                    // was the graph's (end_capture reported it); never free it here.
                    Some(mine) if !mine.is_open() => {}
                    // Allocated and dropped in the open capture: a captured free node.
                    Some(mine) => {
                        if stream.gpu().bind().is_ok() {
                            // SAFETY: allocated with cuMemAllocAsync on this capturing stream,
                            // freed once.
                            let _ = unsafe { result::free_async(ptr, stream.raw()) };
                        }
                        mine.freed();
                    }
                    // Allocated outside any capture: freed now, or kept alive by the graph of
                    // a capture open now (see `DeferredFree::free`).
                    None => DeferredFree { ptr, pooled: *pooled, stream: stream.clone() }.free(),
                }
            }
        }
    }
}

/// A borrowed, read-only range of `len` elements of `T` in device memory: what the raw kernel
/// layers take, so callers can pass memory owned by any runtime.
#[derive(Debug, Clone, Copy)]
pub struct DevPtr<'a, T> {
    addr: sys::CUdeviceptr,
    len: usize,
    space: MemSpace,
    _t: PhantomData<&'a T>,
}

/// A borrowed, writable range of `len` elements of `T` in device memory.
#[derive(Debug)]
pub struct DevPtrMut<'a, T> {
    addr: sys::CUdeviceptr,
    len: usize,
    space: MemSpace,
    _t: PhantomData<&'a mut T>,
}

/// Methods shared by [`DevPtr`] and [`DevPtrMut`].
macro_rules! dev_ptr_methods {
    ($ptr:ident, $safety:literal) => {
        impl<'a, T> $ptr<'a, T> {
            /// Reinterprets the bytes as `U` elements (the byte length must divide evenly and
            /// the address be aligned for `U`).
            pub fn cast<U: Pod>(self) -> Result<$ptr<'a, U>>
            where
                T: Pod,
            {
                let (addr, len) = cast_range::<T, U>(self.addr, self.len)?;
                Ok($ptr { addr, len, space: self.space, _t: PhantomData })
            }

            /// Wraps memory owned elsewhere ([`MemSpace::Foreign`]: launches accept it on any
            /// target, so the address must be valid on the one it is launched on).
            ///
            /// # Safety
            #[doc = $safety]
            pub unsafe fn from_raw(addr: u64, len: usize) -> Self {
                $ptr { addr, len, space: MemSpace::Foreign, _t: PhantomData }
            }

            /// Like `from_raw` with a known memory space (checked at launch).
            ///
            /// # Safety
            /// As for `from_raw`, and the memory must be in `space`.
            pub unsafe fn from_raw_in(addr: u64, len: usize, space: MemSpace) -> Self {
                $ptr { addr, len, space, _t: PhantomData }
            }
            /// Where the memory lives.
            pub fn space(&self) -> MemSpace {
                self.space
            }
            /// Device address.
            pub fn addr(&self) -> u64 {
                self.addr
            }
            /// Elements.
            pub fn len(&self) -> usize {
                self.len
            }
            /// Whether the range is empty.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }
        }
    };
}
dev_ptr_methods!(
    DevPtr,
    "`addr` must point to `len` initialised elements of `T` in the context the kernels run in, valid and not written by anyone else for the chosen lifetime."
);
dev_ptr_methods!(
    DevPtrMut,
    "`addr` must point to `len` elements of `T` in the context the kernels run in, valid and not accessed by anyone else for the chosen lifetime."
);

fn cast_range<T, U>(addr: u64, len: usize) -> Result<(u64, usize)> {
    let bytes = len * std::mem::size_of::<T>();
    let u = std::mem::size_of::<U>().max(1);
    if bytes % u != 0 {
        return Err(Error::Shape(format!("{bytes} bytes is not a whole number of {u}-byte elements")));
    }
    let align = std::mem::align_of::<U>();
    if addr % align as u64 != 0 {
        return Err(Error::Alignment {
            what: "device pointer".into(),
            required: align,
            got: (addr % align as u64) as usize,
        });
    }
    Ok((addr, bytes / u))
}

//! Device memory: owned buffers and borrowed pointers.

use crate::error::{CudaContext, Error, Result};
use crate::gpu::Gpu;
use crate::stream::Stream;
use bytemuck::Pod;
use cudarc::driver::{result, sys};
use std::marker::PhantomData;

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

/// An owned device allocation of `len` elements of `T`, freed on drop.
pub struct DeviceBuffer<T: Pod> {
    gpu: Gpu,
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
    /// full: no memset, no synchronisation. (Any bit pattern is a valid `T`: `T: Pod`.)
    pub fn uninit(gpu: &Gpu, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("{len} elements overflow")))?;
        gpu.bind()?;
        // cuMemAlloc rejects 0 bytes: allocate one byte so every buffer has a valid address.
        // SAFETY: plain allocation in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.during("cuMemAlloc")?;
        Ok(DeviceBuffer { gpu: gpu.clone(), ptr, len, _t: PhantomData })
    }

    /// Allocates `len` zeroed elements (synchronous allocation and memset).
    pub fn zeros(gpu: &Gpu, len: usize) -> Result<Self> {
        let buf = Self::uninit(gpu, len)?;
        let bytes = len * std::mem::size_of::<T>();
        let ptr = buf.ptr;
        // SAFETY: `ptr` addresses at least `bytes.max(1)` bytes just allocated.
        unsafe { result::memset_d8_sync(ptr, 0, bytes.max(1)) }.during("cuMemsetD8")?;
        // cuMemsetD8 on device memory may still run when it returns, on the legacy stream,
        // which non-blocking streams do not wait for: finish it before anyone uses the buffer.
        result::ctx::synchronize().during("cuCtxSynchronize")?;
        Ok(buf)
    }

    /// Allocates and copies `data` in (synchronous).
    pub fn from_host(gpu: &Gpu, data: &[T]) -> Result<Self> {
        let mut buf = Self::uninit(gpu, data.len())?; // every byte is copied in below
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    /// Overwrites the whole buffer with `data` (synchronous); `data.len()` must equal `len`.
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::Shape(format!("copy of {} elements into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // Earlier kernels on any stream may still read this buffer.
        result::ctx::synchronize().during("cuCtxSynchronize")?;
        // SAFETY: destination holds exactly `data.len()` elements of T.
        unsafe { result::memcpy_htod_sync(self.ptr, data) }.during("cuMemcpyHtoD")?;
        // A pageable host-to-device copy may return before the DMA lands: wait for it.
        result::ctx::synchronize().during("cuCtxSynchronize")
    }

    /// Copies the buffer to a new host vector after waiting for `stream`.
    pub fn to_host(&self, stream: &Stream) -> Result<Vec<T>> {
        stream.synchronize()?;
        let mut out = vec![T::zeroed(); self.len];
        if !out.is_empty() {
            self.gpu.bind()?;
            // SAFETY: source holds `len` elements of T; the copy is synchronous.
            unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }.during("cuMemcpyDtoH")?;
        }
        Ok(out)
    }

    /// Copies elements `start..start + out.len()` into `out` after waiting for `stream`.
    pub fn copy_range_to_host(&self, stream: &Stream, start: usize, out: &mut [T]) -> Result<()> {
        self.check_range(start, out.len())?;
        stream.synchronize()?;
        if out.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        let src = self.ptr + (start * std::mem::size_of::<T>()) as u64;
        // SAFETY: the range is inside the allocation (checked); the copy is synchronous.
        unsafe { result::memcpy_dtoh_sync(out, src) }.during("cuMemcpyDtoH")
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
        MemSpace::Device(self.gpu.raw_context() as usize)
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
        &self.gpu
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
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by us in this context, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
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

//! The tensor: a contiguous, row-major view of shared storage.

use crate::device::Device;
use crate::dtype::{DType, Element};
use moekit_cuda::{DevPtr, DevPtrMut, DeviceBuffer, EmuBuffer, Error, Result};
use std::sync::Arc;

/// Bytes of a tensor's memory, on the host or on a GPU.
enum Storage {
    /// Host bytes, 16-byte aligned (backed by `u128`s; views never reach the padding), so a
    /// view's host address modulo 16 is its byte offset modulo 16, as on the devices: the
    /// kernel crates' 16-byte alignment checks give the same answer on every device.
    Cpu { words: Vec<u128> },
    /// Device bytes, stream-ordered on the device's stream (pool memory is 256-byte aligned).
    Cuda(DeviceBuffer<u8>),
    /// Guarded host bytes of the emulation target (256-byte aligned).
    Emu(EmuBuffer<u8>),
}

/// An n-dimensional, contiguous, row-major array of one [`DType`] on one [`Device`].
///
/// Cloning and views ([`Tensor::narrow`], [`Tensor::reshape`]) share storage; writes
/// ([`Tensor::cpu_slice_mut`], [`Tensor::dev_ptr_mut`]) require the storage to be unshared,
/// so a view can never be changed behind another's back.
///
/// ```
/// use moekit_tensor::{Device, Tensor};
/// let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2], &Device::Cpu)?;
/// let rows = t.narrow(0, 1, 2)?; // rows 1 and 2
/// assert_eq!(rows.dims(), &[2, 2]);
/// assert_eq!(rows.to_vec::<f32>()?, vec![3.0, 4.0, 5.0, 6.0]);
/// assert!(t.to_vec::<i32>().is_err()); // wrong dtype is a typed error
/// # Ok::<(), moekit_cuda::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    device: Device,
    dtype: DType,
    dims: Vec<usize>,
    /// First element of this view in the storage.
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.dims, self.dtype, self.device.name())
    }
}

/// Number of elements of `dims`, or a shape error on overflow.
pub fn numel_of(dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| Error::Shape(format!("{dims:?} overflows")))
}

impl Tensor {
    /// A zero-filled tensor (on a GPU: a stream-ordered allocation and `cuMemsetD8Async` on
    /// the device's stream, no synchronisation).
    pub fn zeros(dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let bytes = Self::bytes_of(dims, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu { words: vec![0u128; bytes.div_ceil(16)] },
            Device::Cuda(d) => Storage::Cuda(DeviceBuffer::zeros(d.shared_stream(), bytes)?),
            Device::Emulated(e) => Storage::Emu(EmuBuffer::zeros(e, bytes)?),
        };
        Ok(Tensor { storage: Arc::new(storage), device: device.clone(), dtype, dims: dims.to_vec(), offset: 0 })
    }

    /// A tensor whose contents are unspecified, for outputs a kernel writes in full: on a GPU
    /// it skips the memset (a stream-ordered allocation only); in the emulation it is filled with the
    /// byte 0xA5, so a kernel that leaves elements unwritten fails its emulated tests instead
    /// of passing on zeros; on the CPU it is zeros.
    pub fn empty(dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let storage = match device {
            Device::Cpu => return Tensor::zeros(dims, dtype, device),
            Device::Cuda(d) => Storage::Cuda(DeviceBuffer::uninit(d.shared_stream(), Self::bytes_of(dims, dtype)?)?),
            Device::Emulated(e) => {
                let mut buf = EmuBuffer::<u8>::zeros(e, Self::bytes_of(dims, dtype)?)?;
                buf.as_mut_slice().fill(0xA5);
                Storage::Emu(buf)
            }
        };
        Ok(Tensor { storage: Arc::new(storage), device: device.clone(), dtype, dims: dims.to_vec(), offset: 0 })
    }

    fn bytes_of(dims: &[usize], dtype: DType) -> Result<usize> {
        numel_of(dims)?
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::Shape(format!("{dims:?} of {dtype} overflows")))
    }

    /// A tensor holding a copy of `data` with shape `dims` (on a GPU: `cuMemcpyHtoDAsync` on
    /// the device's stream from pageable memory, which the driver stages before returning; not
    /// a counted synchronisation, but not capturable into a graph either: see
    /// [`moekit_cuda::DeviceBuffer::copy_from_host`]).
    pub fn from_slice<T: Element>(data: &[T], dims: &[usize], device: &Device) -> Result<Tensor> {
        let numel = numel_of(dims)?;
        if numel != data.len() {
            return Err(Error::Shape(format!("{} elements do not fill shape {dims:?}", data.len())));
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let storage = match device {
            Device::Cpu => {
                let mut words = vec![0u128; bytes.len().div_ceil(16)];
                bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
                Storage::Cpu { words }
            }
            Device::Cuda(d) => Storage::Cuda(DeviceBuffer::from_host(d.shared_stream(), bytes)?),
            Device::Emulated(e) => Storage::Emu(EmuBuffer::from_host(e, bytes)?),
        };
        Ok(Tensor {
            storage: Arc::new(storage),
            device: device.clone(),
            dtype: T::DTYPE,
            dims: dims.to_vec(),
            offset: 0,
        })
    }

    /// Shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.dims.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Where the storage lives.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Bytes of this view.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// Size of dimension `d`, or a shape error.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.dims.get(d).copied().ok_or_else(|| Error::Shape(format!("dimension {d} of a rank-{} tensor", self.rank())))
    }

    /// Errors unless the dtype is `dtype` (`what` names the argument in the message).
    pub fn expect_dtype(&self, what: &str, dtype: DType) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(Error::Dtype { what: what.into(), expected: dtype.name().into(), got: self.dtype.name().into() })
        }
    }

    /// A view of `len` entries of dimension `dim` starting at `start`. Because tensors are
    /// contiguous, `dim` must be 0 or every dimension before it must have size 1.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let size = self.dim(dim)?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::Shape(format!("narrow {start}..{start}+{len} of dimension {dim} (size {size})")));
        }
        if self.dims[..dim].iter().any(|&d| d != 1) {
            return Err(Error::Shape(format!("narrow of dimension {dim} of {:?} is not contiguous", self.dims)));
        }
        let inner: usize = self.dims[dim + 1..].iter().product();
        let mut dims = self.dims.clone();
        dims[dim] = len;
        Ok(Tensor { dims, offset: self.offset + start * inner, ..self.clone() })
    }

    /// The same elements with another shape of equal element count.
    pub fn reshape(&self, dims: &[usize]) -> Result<Tensor> {
        if numel_of(dims)? != self.numel() {
            return Err(Error::Shape(format!("reshape {:?} to {dims:?}", self.dims)));
        }
        Ok(Tensor { dims: dims.to_vec(), ..self.clone() })
    }

    /// Copies the elements to a host vector. On a GPU it waits for the device's stream: one
    /// host synchronisation point, counted by [`moekit_cuda::SyncCounter`]; a readback of an
    /// emulated tensor counts one point too (`emulated readback`), so a test asserts the same
    /// count on both; a CPU tensor counts none.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.expect_dtype("to_vec", T::DTYPE)?;
        let mut out = vec![T::zeroed(); self.numel()];
        self.read_bytes_into(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Copies this view's bytes into `out` (exactly [`Tensor::size_in_bytes`] long).
    fn read_bytes_into(&self, out: &mut [u8]) -> Result<()> {
        match self.storage.as_ref() {
            Storage::Cpu { .. } => out.copy_from_slice(self.host_bytes()?),
            Storage::Emu(_) => {
                moekit_cuda::record_sync_point("emulated readback");
                out.copy_from_slice(self.host_bytes()?)
            }
            Storage::Cuda(buf) => {
                let stream = match (buf.stream(), &self.device) {
                    (Some(s), _) => s.as_ref(),
                    (None, Device::Cuda(d)) => d.stream(),
                    _ => unreachable!("CUDA storage on a CUDA device"),
                };
                buf.copy_range_to_host(stream, self.byte_offset(), out)?;
            }
        }
        Ok(())
    }

    /// Overwrites the elements with `data` (same dtype and element count); errors when the
    /// storage is shared. On a GPU: `cuMemcpyHtoDAsync` on the device's stream, after the work
    /// already enqueued there (no synchronisation, not capturable); for updating the inputs of
    /// a captured graph between launches.
    pub fn copy_from_slice<T: Element>(&mut self, data: &[T]) -> Result<()> {
        self.check_element::<T>()?;
        if data.len() != self.numel() {
            return Err(Error::Shape(format!("{} elements into {self:?}", data.len())));
        }
        let (start, len, name) = (self.byte_offset(), self.size_in_bytes(), format!("{self:?}"));
        let bytes: &[u8] = bytemuck::cast_slice(data);
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu { words }) => {
                bytemuck::cast_slice_mut::<u128, u8>(words)[start..start + len].copy_from_slice(bytes)
            }
            Some(Storage::Emu(buf)) => buf.as_mut_slice()[start..start + len].copy_from_slice(bytes),
            Some(Storage::Cuda(buf)) => {
                if start == 0 && len == buf.len() {
                    buf.copy_from_host(bytes)?
                } else {
                    // A view of part of the storage: stage through a buffer of its own.
                    let stream = buf.stream().cloned().ok_or_else(|| Error::InvalidArgument(name.clone()))?;
                    let staged = DeviceBuffer::from_host(&stream, bytes)?;
                    buf.copy_from_device_at(start, staged.view())?; // staged is freed after it, in order
                }
            }
            None => return Err(Error::InvalidArgument(format!("{name}: storage is shared with another view"))),
        }
        Ok(())
    }

    /// Copies the elements of `src` (same dtype, element count and device) into this tensor;
    /// errors when this tensor's storage is shared. On a GPU: `cuMemcpyDtoDAsync` on the
    /// device's stream (capturable: how a captured step writes its results into tensors
    /// allocated before the capture).
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        if src.dtype != self.dtype {
            return Err(Error::Dtype {
                what: "copy source".into(),
                expected: self.dtype.name().into(),
                got: src.dtype.name().into(),
            });
        }
        if src.numel() != self.numel() {
            return Err(Error::Shape(format!("copy of {src:?} into {self:?}")));
        }
        if !src.device.same_as(&self.device) {
            return Err(Error::InvalidArgument(format!("copy of {src:?} into {self:?}: different devices")));
        }
        let (start, len, name) = (self.byte_offset(), self.size_in_bytes(), format!("{self:?}"));
        if Arc::ptr_eq(&self.storage, &src.storage) {
            return Err(Error::InvalidArgument(format!("{name}: storage is shared with another view")));
        }
        let src_bytes = src.byte_offset();
        match (Arc::get_mut(&mut self.storage), src.storage.as_ref()) {
            (Some(Storage::Cpu { words }), _) => {
                bytemuck::cast_slice_mut::<u128, u8>(words)[start..start + len].copy_from_slice(src.host_bytes()?)
            }
            (Some(Storage::Emu(buf)), _) => buf.as_mut_slice()[start..start + len].copy_from_slice(src.host_bytes()?),
            (Some(Storage::Cuda(dst)), Storage::Cuda(from)) => {
                dst.copy_from_device_at(start, from.slice(src_bytes, len)?)?
            }
            (Some(Storage::Cuda(_)), _) => unreachable!("same device, CUDA storage"),
            (None, _) => return Err(Error::InvalidArgument(format!("{name}: storage is shared with another view"))),
        }
        Ok(())
    }

    /// The bytes of `parts` (any dtypes, all on `device`) one after another in a new 1-D U8
    /// tensor: several small results packed on the device so that one readback returns them
    /// all. On a GPU: `cuMemcpyDtoDAsync`s on the device's stream (no host synchronisation).
    pub fn concat_bytes(parts: &[&Tensor], device: &Device) -> Result<Tensor> {
        let total = parts.iter().map(|p| p.size_in_bytes()).sum();
        let mut out = Tensor::empty(&[total], DType::U8, device)?;
        let mut at = 0;
        for p in parts {
            if !p.device.same_as(device) {
                return Err(Error::InvalidArgument(format!("concat_bytes: {p:?} is not on {}", device.name())));
            }
            let len = p.size_in_bytes();
            match (Arc::get_mut(&mut out.storage), p.storage.as_ref()) {
                (Some(Storage::Cpu { words }), _) => {
                    bytemuck::cast_slice_mut::<u128, u8>(words)[at..at + len].copy_from_slice(p.host_bytes()?)
                }
                (Some(Storage::Emu(buf)), _) => buf.as_mut_slice()[at..at + len].copy_from_slice(p.host_bytes()?),
                (Some(Storage::Cuda(dst)), Storage::Cuda(from)) => {
                    dst.copy_from_device_at(at, from.slice(p.byte_offset(), len)?)?
                }
                _ => unreachable!("a fresh tensor's storage is unshared and on the parts' device"),
            }
            at += len;
        }
        Ok(out)
    }

    /// A copy on `device` (shares storage when already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device.same_as(device) {
            return Ok(self.clone());
        }
        let bytes = self.bytes_to_host()?;
        let mut t = Tensor::from_slice(&bytes, &[bytes.len()], device)?;
        t.dtype = self.dtype;
        t.dims = self.dims.clone();
        Ok(t)
    }

    fn bytes_to_host(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.size_in_bytes()];
        self.read_bytes_into(&mut bytes)?;
        Ok(bytes)
    }

    /// This view's bytes when they live in host memory (CPU or emulated).
    fn host_bytes(&self) -> Result<&[u8]> {
        let all: &[u8] = match self.storage.as_ref() {
            Storage::Cpu { words } => bytemuck::cast_slice(words),
            Storage::Emu(buf) => buf.as_slice(),
            Storage::Cuda(_) => return Err(Error::InvalidArgument(format!("{self:?} is not in host memory"))),
        };
        Ok(&all[self.byte_offset()..self.byte_offset() + self.size_in_bytes()])
    }

    fn byte_offset(&self) -> usize {
        self.offset * self.dtype.size_in_bytes()
    }

    fn check_element<T: Element>(&self) -> Result<()> {
        self.expect_dtype(std::any::type_name::<T>(), T::DTYPE)
    }

    /// The elements of a CPU tensor.
    pub fn cpu_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_element::<T>()?;
        match self.storage.as_ref() {
            Storage::Cpu { words } => {
                let all: &[u8] = bytemuck::cast_slice(words);
                Ok(bytemuck::cast_slice(&all[self.byte_offset()..self.byte_offset() + self.size_in_bytes()]))
            }
            Storage::Cuda(_) | Storage::Emu(_) => Err(Error::InvalidArgument(format!("{self:?} is not on the CPU"))),
        }
    }

    /// The elements of a CPU tensor, writable; errors when the storage is shared.
    pub fn cpu_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_element::<T>()?;
        let (start, len, name) = (self.byte_offset(), self.size_in_bytes(), format!("{self:?}"));
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu { words }) => {
                let all: &mut [u8] = bytemuck::cast_slice_mut(words);
                Ok(bytemuck::cast_slice_mut(&mut all[start..start + len]))
            }
            Some(Storage::Cuda(_) | Storage::Emu(_)) => {
                Err(Error::InvalidArgument(format!("{name} is not on the CPU")))
            }
            None => Err(Error::InvalidArgument(format!("{name}: storage is shared with another view"))),
        }
    }

    /// The elements of a CUDA or emulated tensor as a kernel argument.
    pub fn dev_ptr<T: Element>(&self) -> Result<DevPtr<'_, T>> {
        self.check_element::<T>()?;
        match self.storage.as_ref() {
            Storage::Cuda(buf) => buf.slice(self.byte_offset(), self.size_in_bytes())?.cast::<T>(),
            Storage::Emu(buf) => buf.slice(self.byte_offset(), self.size_in_bytes())?.cast::<T>(),
            Storage::Cpu { .. } => Err(Error::InvalidArgument(format!("{self:?} is not on a kernel device"))),
        }
    }

    /// The elements of a CUDA or emulated tensor as a writable kernel argument; errors when the
    /// storage is shared.
    pub fn dev_ptr_mut<T: Element>(&mut self) -> Result<DevPtrMut<'_, T>> {
        self.check_element::<T>()?;
        let (start, len, name) = (self.byte_offset(), self.size_in_bytes(), format!("{self:?}"));
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cuda(buf)) => buf.slice_mut(start, len)?.cast::<T>(),
            Some(Storage::Emu(buf)) => buf.slice_mut(start, len)?.cast::<T>(),
            Some(Storage::Cpu { .. }) => Err(Error::InvalidArgument(format!("{name} is not on a kernel device"))),
            None => Err(Error::InvalidArgument(format!("{name}: storage is shared with another view"))),
        }
    }
}

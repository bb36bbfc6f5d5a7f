//! Where a tensor lives.

use moekit_cuda::{Emulator, Error, Gpu, Graph, Launcher, Result, Stream};
use std::sync::Arc;

/// A CUDA device with the stream tensor operations run on. Cheap to clone.
///
/// Every op on tensors of this device is enqueued on [`CudaDevice::stream`], and tensor memory
/// is stream-ordered on it (allocated, zeroed and freed with `cuMemAllocAsync`,
/// `cuMemsetD8Async`, `cuMemFreeAsync`: see [`moekit_cuda::DeviceBuffer`]), so ops never wait
/// for the device; reading a tensor back to the host ([`crate::Tensor::to_vec`]) waits for
/// the stream, so tensor code never needs explicit synchronisation. Two `CudaDevice`s of one
/// GPU with different streams share a context ([`Device::same_as`]) but not an order: order
/// them with events ([`Stream::record`], [`Stream::wait`]) before one uses the other's tensors,
/// and before dropping a tensor the other stream may still read.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    gpu: Gpu,
    stream: Arc<Stream>,
}

impl CudaDevice {
    /// Device `ordinal` with a new stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        let gpu = Gpu::new(ordinal)?;
        let stream = Arc::new(Stream::new(&gpu)?);
        Ok(CudaDevice { gpu, stream })
    }

    /// Uses an existing device handle and stream (e.g. borrowed from another runtime).
    pub fn from_parts(gpu: Gpu, stream: Arc<Stream>) -> Self {
        CudaDevice { gpu, stream }
    }

    /// The device handle.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// The stream ops run on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
    /// The stream ops run on, shared (what buffers hold to free themselves on it).
    pub fn shared_stream(&self) -> &Arc<Stream> {
        &self.stream
    }
}

/// Where a tensor's storage lives.
#[derive(Clone, Debug)]
pub enum Device {
    /// Host memory; ops run the CPU reference implementations.
    Cpu,
    /// Device memory on a CUDA GPU; ops run the kernels.
    Cuda(CudaDevice),
    /// Host memory (guarded); ops run the same kernels compiled for the CPU, in the host
    /// emulation of the CUDA execution model. For testing kernels without a GPU.
    Emulated(Emulator),
}

impl Device {
    /// CUDA device `ordinal` if one is usable, else [`Device::Cpu`].
    pub fn cuda_if_available(ordinal: usize) -> Device {
        CudaDevice::new(ordinal).map(Device::Cuda).unwrap_or(Device::Cpu)
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Whether two devices are the same place (same CUDA context, same emulator, or both CPU).
    pub fn same_as(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.gpu.same_as(&b.gpu),
            (Device::Emulated(a), Device::Emulated(b)) => a.same_as(b),
            _ => false,
        }
    }

    /// Where kernels for tensors of this device run: the CUDA stream or the emulator;
    /// `None` for the CPU (ops run their references there).
    pub fn launcher(&self) -> Option<&dyn Launcher> {
        match self {
            Device::Cpu => None,
            Device::Cuda(d) => Some(d.stream()),
            Device::Emulated(e) => Some(e),
        }
    }

    /// Starts capturing the work of this device's stream into a CUDA graph (see
    /// [`moekit_cuda::Stream::begin_capture`]: tensors allocated during the capture must be
    /// dropped before it ends; copy results into tensors allocated before it with
    /// [`crate::Tensor::copy_from`]). [`Error::Unsupported`] on the CPU and on the host
    /// emulation, which run every op to completion when it is called and record nothing.
    pub fn begin_capture(&self) -> Result<()> {
        match self {
            Device::Cuda(d) => d.stream().begin_capture(),
            _ => Err(Error::Unsupported(format!("graph capture on {}", self.name()))),
        }
    }

    /// Ends the capture started by [`Device::begin_capture`] and returns its graph; launch an
    /// instance with `graph.instantiate()?.launch(device.stream())`.
    pub fn end_capture(&self) -> Result<Graph> {
        match self {
            Device::Cuda(d) => d.stream().end_capture(),
            _ => Err(Error::Unsupported(format!("graph capture on {}", self.name()))),
        }
    }

    /// Short name: `cpu` or `cuda:N`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(d) => format!("cuda:{}", d.gpu.ordinal()),
            Device::Emulated(_) => "emulated".into(),
        }
    }
}

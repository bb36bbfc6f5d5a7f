//! moekit's safe tensor: shape, dtype, CPU or CUDA storage, host/device copies, views.
//!
//! Kernel crates add ops on [`Tensor`] that run their CPU reference for [`Device::Cpu`] and
//! their kernel for [`Device::Cuda`]; errors are [`moekit_cuda::Error`] (bad shape, dtype,
//! device, ...), returned before any launch.

mod device;
mod dtype;
mod tensor;

pub use device::{CudaDevice, Device};
pub use dtype::{DType, Element};
pub use moekit_cuda::{Error, Result};
pub use tensor::{numel_of, Tensor};

//! moekit's CUDA runtime layer, shared by every kernel crate.
//!
//! - Discovery that never panics: [`driver_available`], [`device_count`], [`Gpu::new`] return
//!   [`Error::NoDriver`] / [`Error::NoDevice`] on machines without a GPU.
//! - [`Gpu`] (device + context) and [`Stream`]; both can wrap handles owned by another runtime
//!   ([`Gpu::from_raw_context`], [`Stream::borrowed`]), and [`DevPtr`] / [`DevPtrMut`] wrap
//!   device memory owned elsewhere, so other runtimes can embed moekit's kernels.
//! - [`KernelImage`]: a fatbin embedded by `moekit-build`, loaded into a context on first use.
//! - [`launch`] on a [`Launcher`]: a typed launch of a tuple of [`KernelParam`]s on a GPU
//!   [`Stream`] or on the host [`Emulator`] (the same kernel compiled for the CPU).
//!
//! Built on cudarc's `driver::result` layer with dynamic loading of `libcuda`.
//!
//! ```no_run
//! use moekit_cuda::{Gpu, Stream, DeviceBuffer};
//! # fn main() -> moekit_cuda::Result<()> {
//! let gpu = Gpu::new(0)?;                       // Err(NoDriver) on a machine without CUDA
//! let stream = Stream::new(&gpu)?;
//! let buf = DeviceBuffer::from_host(&gpu, &[1.0f32, 2.0, 3.0])?;
//! assert_eq!(buf.to_host(&stream)?, vec![1.0, 2.0, 3.0]);
//! # Ok(()) }
//! ```

pub mod emu;
mod error;
mod gpu;
mod image;
mod launch;
mod memory;
mod stream;
pub mod testing;

pub use cudarc::driver::sys;
pub use emu::{BlockOrder, EmuBuffer, Emulator};
pub use error::{Error, Result};
pub use gpu::{device_count, driver_available, stream_context, CurrentContext, Gpu};
pub use image::{Function, KernelImage};
pub use launch::{
    check_aligned, ensure_addressable, launch, persistent_grid, KernelParam, LaunchArgs, LaunchConfig, Launcher,
};
pub use memory::{DevPtr, DevPtrMut, DeviceBuffer, MemSpace};
pub use stream::{Event, Stream};

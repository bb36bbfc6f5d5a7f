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
//! - [`DeviceBuffer`]: stream-ordered device memory (`cuMemAllocAsync` / `cuMemsetD8Async` /
//!   `cuMemFreeAsync` on its stream, from the device's caching pool), so a step enqueues work
//!   without ever waiting for the device; [`SyncCounter`] counts every host synchronisation
//!   point, so tests can assert there is none in a region.
//! - CUDA graphs: [`Stream::begin_capture`] / [`Stream::end_capture`] → [`Graph`] →
//!   [`GraphExec::launch`].
//!
//! Built on cudarc's `driver::result` layer with dynamic loading of `libcuda`.
//!
//! ```no_run
//! use moekit_cuda::{Gpu, Stream, DeviceBuffer};
//! # fn main() -> moekit_cuda::Result<()> {
//! let gpu = Gpu::new(0)?;                       // Err(NoDriver) on a machine without CUDA
//! let stream = std::sync::Arc::new(Stream::new(&gpu)?);
//! let buf = DeviceBuffer::from_host(&stream, &[1.0f32, 2.0, 3.0])?; // stream-ordered
//! assert_eq!(buf.to_host(&stream)?, vec![1.0, 2.0, 3.0]);          // one synchronisation
//! # Ok(()) }
//! ```

pub mod emu;
mod error;
mod gpu;
mod image;
mod launch;
mod memory;
mod stream;
mod sync;
pub mod testing;

pub use cudarc::driver::sys;
pub use emu::{BlockOrder, EmuBuffer, Emulator};
pub use error::{Error, Result};
pub use gpu::{device_count, driver_available, stream_context, CurrentContext, Gpu};
pub use image::{Function, KernelImage};
pub use launch::{
    check_aligned, ensure_addressable, launch, persistent_grid, KernelParam, LaunchArgs, LaunchConfig, Launcher,
};
pub use memory::{DevPtr, DevPtrMut, DeviceBuffer, MemSpace, Placement};
pub use stream::{Event, Graph, GraphExec, Stream};
pub use sync::{record_sync_point, sync_calls, sync_calls_total, SyncCounter};

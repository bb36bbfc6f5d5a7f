//! Streams (owned or borrowed from another runtime) and timing events.

use crate::error::{CudaContext, Result};
use crate::gpu::Gpu;
use cudarc::driver::{result, sys};

/// A CUDA stream on one [`Gpu`]. Work on it runs in issue order.
///
/// [`Stream::new`] creates and owns a stream; [`Stream::borrowed`] wraps one owned by another
/// runtime (PyTorch, cudarc, your own) and never destroys it.
pub struct Stream {
    gpu: Gpu,
    raw: sys::CUstream,
    owned: bool,
}

// SAFETY: a CUstream handle may be used from any thread; the driver serialises work on it.
unsafe impl Send for Stream {}
// SAFETY: as above; `&Stream` only enqueues work or synchronises.
unsafe impl Sync for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:p}, owned: {}, {:?})", self.raw, self.owned, self.gpu)
    }
}

impl Stream {
    /// Creates a non-blocking stream owned by the returned handle.
    pub fn new(gpu: &Gpu) -> Result<Stream> {
        gpu.bind()?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).during("cuStreamCreate")?;
        Ok(Stream { gpu: gpu.clone(), raw, owned: true })
    }

    /// Wraps a stream owned elsewhere; dropping the handle leaves it alive.
    ///
    /// # Safety
    /// `raw` must be a valid stream of `gpu`'s context (or null for the legacy default stream)
    /// and stay valid while the returned handle and any work enqueued through it live.
    pub unsafe fn borrowed(gpu: &Gpu, raw: sys::CUstream) -> Stream {
        Stream { gpu: gpu.clone(), raw, owned: false }
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// Raw handle.
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Blocks until all work on the stream is done; returns the first asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: valid stream handle (constructor contracts).
        unsafe { result::stream::synchronize(self.raw) }.during("cuStreamSynchronize")
    }

    /// Records a timing event at the current point of the stream.
    pub fn record(&self) -> Result<Event> {
        self.gpu.bind()?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).during("cuEventCreate")?;
        let ev = Event { gpu: self.gpu.clone(), raw };
        // SAFETY: both handles are valid and belong to the bound context.
        unsafe { result::event::record(ev.raw, self.raw) }.during("cuEventRecord")?;
        Ok(ev)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned && self.gpu.bind().is_ok() {
            // SAFETY: we created this stream and destroy it once; pending work still completes.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// A recorded CUDA event, for timing with [`Event::elapsed_ms`].
pub struct Event {
    gpu: Gpu,
    raw: sys::CUevent,
}

impl Event {
    /// Milliseconds between `self` and a later event `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.gpu.bind()?;
        // SAFETY: valid events of the bound context; synchronize before reading the time.
        unsafe {
            result::event::synchronize(end.raw).during("cuEventSynchronize")?;
            result::event::elapsed(self.raw, end.raw).during("cuEventElapsedTime")
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: created by us, destroyed once.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}

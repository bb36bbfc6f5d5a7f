//! Streams (owned or borrowed from another runtime), events, and CUDA graph capture.
//!
//! # Graph capture
//!
//! [`Stream::begin_capture`] starts recording the work enqueued on a stream (in the driver's
//! thread-local mode: a synchronising call made by the capturing thread while it captures is
//! an error, [`Error::Capture`], and invalidates the capture); [`Stream::end_capture`] returns
//! the [`Graph`]; [`Graph::instantiate`] makes a [`GraphExec`] that [`GraphExec::launch`]
//! replays on any stream of the context, with no host work per kernel.
//!
//! Memory in a capture is stream-ordered (see [`crate::DeviceBuffer`]):
//! - a buffer allocated *and* dropped inside the capture becomes a pair of graph memory nodes
//!   (allocated and freed by every launch);
//! - a buffer allocated inside the capture that is still alive at `end_capture` would be
//!   memory of the graph, valid only between launches: `end_capture` refuses it
//!   ([`Error::InvalidArgument`]) — allocate a graph's inputs and outputs before
//!   `begin_capture` and copy results into them inside the capture;
//! - a buffer allocated before the capture and dropped inside it is not freed by the graph
//!   (that would free it again on every launch): the graph keeps it alive and frees it when the
//!   [`Graph`] and every [`GraphExec`] made from it are gone.
//!
//! A graph holds raw device addresses: every buffer its kernels use must stay alive (and keep
//! its address) for as long as the graph is launched; moekit keeps alive only the buffers
//! dropped inside the capture, as said above.

use crate::error::{CudaContext, Error, Result};
use crate::gpu::Gpu;
use crate::sync::synchronizing;
use cudarc::driver::{result, sys};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A CUDA stream on one [`Gpu`]. Work on it runs in issue order.
///
/// [`Stream::new`] creates and owns a stream; [`Stream::borrowed`] wraps one owned by another
/// runtime (PyTorch, cudarc, your own) and never destroys it.
pub struct Stream {
    gpu: Gpu,
    raw: sys::CUstream,
    owned: bool,
    /// The open capture, if any.
    capture: Mutex<Option<Arc<CaptureState>>>,
}

// SAFETY: a CUstream handle may be used from any thread; the driver serialises work on it; the
// capture state is behind a Mutex.
unsafe impl Send for Stream {}
// SAFETY: as above; `&Stream` only enqueues work, synchronises or locks the capture state.
unsafe impl Sync for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:p}, owned: {}, {:?})", self.raw, self.owned, self.gpu)
    }
}

/// A buffer whose free was deferred (see the module docs).
pub struct DeferredFree {
    pub(crate) ptr: sys::CUdeviceptr,
    /// Allocated with `cuMemAllocAsync` (else `cuMemAlloc`).
    pub(crate) pooled: bool,
    pub(crate) stream: Arc<Stream>,
}

impl DeferredFree {
    /// Frees the buffer now (stream-ordered when pooled), or, while its stream is capturing,
    /// hands it to that capture (a free enqueued now would become a node of the new graph and
    /// free the buffer again on every launch).
    pub(crate) fn free(self) {
        if let Some(open) = self.stream.open_capture() {
            open.defer(self);
            return;
        }
        if self.stream.gpu.bind().is_err() {
            return;
        }
        if self.pooled {
            // SAFETY: allocated with cuMemAllocAsync in this context and freed once, here;
            // later work on the stream may reuse it (the graph that kept it is gone).
            let _ = unsafe { result::free_async(self.ptr, self.stream.raw) };
        } else {
            // SAFETY: allocated with cuMemAlloc, freed once; cuMemFree waits for the device.
            let _ = synchronizing("cuMemFree", || unsafe { result::free_sync(self.ptr) });
        }
    }
}

/// What a [`Stream`] records about its open capture.
pub struct CaptureState {
    /// Buffers allocated during the capture and not yet dropped.
    live: AtomicUsize,
    /// False once the capture ended: buffers allocated in it then belong to the graph.
    open: AtomicBool,
    /// Buffers allocated before the capture and dropped during it.
    deferred: Mutex<Vec<DeferredFree>>,
}

impl CaptureState {
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
    pub(crate) fn allocated(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn freed(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
    pub(crate) fn defer(&self, f: DeferredFree) {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).push(f);
    }
}

impl Stream {
    /// Creates a non-blocking stream owned by the returned handle.
    pub fn new(gpu: &Gpu) -> Result<Stream> {
        gpu.bind()?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).during("cuStreamCreate")?;
        Ok(Stream { gpu: gpu.clone(), raw, owned: true, capture: Mutex::new(None) })
    }

    /// Wraps a stream owned elsewhere; dropping the handle leaves it alive.
    ///
    /// # Safety
    /// `raw` must be a valid stream of `gpu`'s context (or null for the legacy default stream)
    /// and stay valid while the returned handle and any work enqueued through it live.
    pub unsafe fn borrowed(gpu: &Gpu, raw: sys::CUstream) -> Stream {
        Stream { gpu: gpu.clone(), raw, owned: false, capture: Mutex::new(None) }
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
    /// A host synchronisation point (counted, see [`crate::SyncCounter`]).
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: valid stream handle (constructor contracts).
        synchronizing("cuStreamSynchronize", || unsafe { result::stream::synchronize(self.raw) })
    }

    /// Records an event at the current point of the stream (for timing, or for another stream
    /// to [`Stream::wait`] on). Does not synchronise.
    pub fn record(&self) -> Result<Event> {
        self.gpu.bind()?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).during("cuEventCreate")?;
        let ev = Event { gpu: self.gpu.clone(), raw };
        // SAFETY: both handles are valid and belong to the bound context.
        unsafe { result::event::record(ev.raw, self.raw) }.during("cuEventRecord")?;
        Ok(ev)
    }

    /// Makes later work on this stream wait for `event` (recorded on any stream of the
    /// context), on the device: the host does not wait. This is how work on two streams is
    /// ordered, e.g. before a buffer of one stream is used on another.
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: both handles are valid; the event belongs to this stream's context.
        unsafe { result::stream::wait_event(self.raw, event.raw, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .during("cuStreamWaitEvent")
    }

    /// Starts capturing the work enqueued on this stream into a graph (thread-local capture
    /// mode: a synchronising call of the capturing thread is an error, [`Error::Capture`]).
    /// Errors when the stream is already capturing, or when the driver refuses (the legacy
    /// default stream cannot be captured). End it with [`Stream::end_capture`].
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if cap.is_some() {
            return Err(Error::InvalidArgument(format!("{self:?} is already capturing")));
        }
        self.gpu.bind()?;
        // SAFETY: valid stream handle (constructor contracts).
        unsafe {
            result::stream::begin_capture(self.raw, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        }
        .during("cuStreamBeginCapture")?;
        *cap = Some(Arc::new(CaptureState {
            live: AtomicUsize::new(0),
            open: AtomicBool::new(true),
            deferred: Mutex::new(Vec::new()),
        }));
        Ok(())
    }

    /// Whether [`Stream::begin_capture`] started a capture that has not ended.
    pub fn is_capturing(&self) -> bool {
        self.capture.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The open capture, if any (for buffers allocated or dropped now).
    pub(crate) fn open_capture(&self) -> Option<Arc<CaptureState>> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the capture and returns its graph. Errors (the capture is ended all the same, and
    /// the stream can be used eagerly again): not capturing (`InvalidArgument`); the capture
    /// was invalidated, e.g. by a synchronising call ([`Error::Capture`]); a buffer allocated
    /// during the capture is still alive (`InvalidArgument`, see the module docs: that buffer
    /// is then never freed by its handle, its memory was the discarded graph's).
    pub fn end_capture(&self) -> Result<Graph> {
        let state = self
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::InvalidArgument(format!("{self:?} is not capturing")))?;
        state.open.store(false, Ordering::Release);
        let keep = Arc::new(KeepAlive(std::mem::take(&mut *state.deferred.lock().unwrap_or_else(|p| p.into_inner()))));
        self.gpu.bind()?;
        // SAFETY: valid stream handle, capturing (begin_capture succeeded).
        let raw = unsafe { result::stream::end_capture(self.raw) }.during("cuStreamEndCapture")?;
        let graph = Graph { gpu: self.gpu.clone(), raw, keep };
        let live = state.live.load(Ordering::Acquire);
        if live > 0 {
            return Err(Error::InvalidArgument(format!(
                "{live} buffer(s) allocated during the capture outlive it; allocate a graph's inputs and outputs before begin_capture"
            )));
        }
        Ok(graph)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let open = self.capture.get_mut().unwrap_or_else(|p| p.into_inner()).is_some();
        if open {
            // Ends (and discards) a capture left open, so the stream can be destroyed.
            let _ = self.end_capture();
        }
        if self.owned && self.gpu.bind().is_ok() {
            // SAFETY: we created this stream and destroy it once; pending work still completes.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// Buffers a graph keeps alive (dropped during its capture, allocated before it); freed when
/// the graph and every executable made from it are gone.
struct KeepAlive(Vec<DeferredFree>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        for f in self.0.drain(..) {
            f.free();
        }
    }
}

/// A captured CUDA graph ([`Stream::end_capture`]).
pub struct Graph {
    gpu: Gpu,
    raw: sys::CUgraph,
    keep: Arc<KeepAlive>,
}

// SAFETY: graph handles may be used from any thread; moekit only instantiates and destroys it.
unsafe impl Send for Graph {}
// SAFETY: as above (`&Graph` only instantiates, which the driver allows concurrently).
unsafe impl Sync for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph({:p}, {:?})", self.raw, self.gpu)
    }
}

impl Graph {
    /// Raw handle.
    pub fn raw(&self) -> sys::CUgraph {
        self.raw
    }

    /// Number of nodes (kernels, memsets, copies, memory nodes, ...).
    pub fn node_count(&self) -> Result<usize> {
        self.gpu.bind()?;
        let mut n: usize = 0;
        // SAFETY: a valid graph; a null node array asks only for the count.
        unsafe { sys::cuGraphGetNodes(self.raw, std::ptr::null_mut(), &mut n) }.result().during("cuGraphGetNodes")?;
        Ok(n)
    }

    /// An executable graph to launch. A graph with memory nodes (allocations in the capture)
    /// has one executable at a time: the driver refuses a second while the first lives.
    pub fn instantiate(&self) -> Result<GraphExec> {
        self.gpu.bind()?;
        // SAFETY: a valid graph of the bound context.
        let raw = unsafe { result::graph::instantiate(self.raw, sys::CUgraphInstantiate_flags(0)) }
            .during("cuGraphInstantiateWithFlags")?;
        Ok(GraphExec { gpu: self.gpu.clone(), raw, _keep: self.keep.clone() })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: created by cuStreamEndCapture, destroyed once (executables are separate).
            let _ = unsafe { result::graph::destroy(self.raw) };
        }
    }
}

/// An instantiated graph ([`Graph::instantiate`]).
pub struct GraphExec {
    gpu: Gpu,
    raw: sys::CUgraphExec,
    _keep: Arc<KeepAlive>,
}

// SAFETY: executable graph handles may be used from any thread; launches are stream-ordered.
unsafe impl Send for GraphExec {}
// SAFETY: as above.
unsafe impl Sync for GraphExec {}

impl std::fmt::Debug for GraphExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GraphExec({:p}, {:?})", self.raw, self.gpu)
    }
}

impl GraphExec {
    /// Enqueues one replay of the graph on `stream` (of the graph's context); does not
    /// synchronise. Launches of one executable run one after another.
    pub fn launch(&self, stream: &Stream) -> Result<()> {
        if !stream.gpu.same_as(&self.gpu) {
            return Err(Error::InvalidArgument(format!("{self:?} launched on {stream:?}")));
        }
        self.gpu.bind()?;
        // SAFETY: a valid executable graph and stream of the bound context.
        unsafe { result::graph::launch(self.raw, stream.raw) }.during("cuGraphLaunch")
    }
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: instantiated by us, destroyed once; the driver finishes pending launches.
            let _ = unsafe { result::graph::exec_destroy(self.raw) };
        }
    }
}

/// A recorded CUDA event, for timing with [`Event::elapsed_ms`] or ordering with
/// [`Stream::wait`].
pub struct Event {
    gpu: Gpu,
    raw: sys::CUevent,
}

// SAFETY: an event handle may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above; `&Event` only waits on or queries it.
unsafe impl Sync for Event {}

impl Event {
    /// Blocks until the work before the event is done (a counted host synchronisation point).
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: a valid event of the bound context.
        synchronizing("cuEventSynchronize", || unsafe { result::event::synchronize(self.raw) })
    }

    /// Milliseconds between `self` and a later event `end` (waits for `end`: a counted host
    /// synchronisation point).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        end.synchronize()?;
        self.gpu.bind()?;
        // SAFETY: valid events of the bound context, both complete.
        unsafe { result::event::elapsed(self.raw, end.raw) }.during("cuEventElapsedTime")
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

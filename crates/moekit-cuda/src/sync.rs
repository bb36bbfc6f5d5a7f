//! Counting host synchronisation points: every place where the host waits for the device.
//!
//! Every driver call of moekit that makes the calling thread wait for device work
//! (`cuCtxSynchronize`, `cuStreamSynchronize`, `cuEventSynchronize`, a device-to-host copy,
//! the synchronous `cuMemAlloc` / `cuMemFree` / `cuMemsetD8` of the context-owned buffers, a
//! synchronous host-to-device copy) goes through one wrapper that counts it; layers above
//! count their equivalent operations with [`record_sync_point`] (moekit-tensor counts a
//! readback of an emulated tensor, so a test body asserts the same count on the emulation as
//! on a GPU). One *point* may be several driver calls that together make one wait (a
//! device-to-host copy followed by the stream synchronisation that guarantees it landed).
//!
//! Counts are kept per thread (exact for a region of code on one thread, even while other
//! tests run in parallel) and in a process-wide total.
//!
//! ```
//! let region = moekit_cuda::SyncCounter::start();
//! // ... enqueue work: allocations, memsets and launches are stream-ordered ...
//! assert_eq!(region.count(), 0, "synchronised at {:?}", region.calls());
//! ```

use crate::error::{CudaContext, Result};
use cudarc::driver::DriverError;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

static TOTAL: AtomicU64 = AtomicU64::new(0);
/// How many of the most recent points keep their name (for messages).
const KEEP: usize = 256;

thread_local! {
    static ON_THREAD: Cell<u64> = const { Cell::new(0) };
    /// (sequence number on this thread, call name) of the last `KEEP` points.
    static RECENT: RefCell<VecDeque<(u64, &'static str)>> = const { RefCell::new(VecDeque::new()) };
}

/// Records one host synchronisation point named `what` (a driver call name such as
/// `cuStreamSynchronize`, or e.g. `emulated readback`). moekit-cuda calls it for each of its
/// synchronising driver calls; other layers call it for their equivalent operations.
pub fn record_sync_point(what: &'static str) {
    TOTAL.fetch_add(1, Ordering::Relaxed);
    let seq = ON_THREAD.with(|c| {
        let n = c.get() + 1;
        c.set(n);
        n
    });
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() == KEEP {
            r.pop_front();
        }
        r.push_back((seq, what));
    });
}

/// Host synchronisation points recorded on the calling thread so far.
pub fn sync_calls() -> u64 {
    ON_THREAD.with(Cell::get)
}

/// Host synchronisation points recorded by every thread of the process so far.
pub fn sync_calls_total() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// Counts the host synchronisation points of the calling thread from [`SyncCounter::start`]
/// on. Not `Send`: the count is the creating thread's.
#[derive(Debug)]
pub struct SyncCounter {
    start: u64,
    _not_send: PhantomData<*const ()>,
}

impl SyncCounter {
    /// Starts counting at the current point.
    pub fn start() -> SyncCounter {
        SyncCounter { start: sync_calls(), _not_send: PhantomData }
    }
    /// Points recorded on this thread since the start.
    pub fn count(&self) -> u64 {
        sync_calls() - self.start
    }
    /// The names of the points since the start, oldest first (only the last 256 points of
    /// the thread keep a name).
    pub fn calls(&self) -> Vec<&'static str> {
        RECENT.with(|r| r.borrow().iter().filter(|(seq, _)| *seq > self.start).map(|(_, w)| *w).collect())
    }
}

/// The one wrapper of synchronising driver calls: counts one point named `call` (also when
/// the call fails) and names the call in the error.
pub(crate) fn synchronizing<T>(call: &'static str, f: impl FnOnce() -> Result<T, DriverError>) -> Result<T> {
    record_sync_point(call);
    f().during(call)
}

/// As [`synchronizing`], for a point made of several driver calls (each names itself in its
/// error).
pub(crate) fn synchronizing_point<T>(what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    record_sync_point(what);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_counts_this_threads_points_only() {
        let c = SyncCounter::start();
        let total = sync_calls_total();
        assert_eq!(c.count(), 0);
        record_sync_point("test point");
        std::thread::spawn(|| record_sync_point("other thread")).join().unwrap();
        assert_eq!(c.count(), 1);
        assert_eq!(c.calls(), vec!["test point"]);
        assert!(sync_calls_total() >= total + 2);
        // (A failing call would need the driver to name its error: counted before the call.)
        assert_eq!(synchronizing("cuStreamSynchronize", || Ok(7)), Ok(7));
        assert_eq!(synchronizing_point("readback", || Ok(())), Ok(()));
        assert_eq!(c.count(), 3);
        assert_eq!(c.calls(), vec!["test point", "cuStreamSynchronize", "readback"]);
    }
}

//! The C ABI of moekit's kernels: `crates/moekit-capi/include/moekit.h` (generated from this
//! crate by `cargo xtask codegen`, committed, checked in CI).
//!
//! Every entry point takes a [`MoekitDevice`] first:
//! - [`MOEKIT_DEVICE_CPU`]: the kernel crate's CPU reference on host memory (no CUDA needed);
//! - [`MOEKIT_DEVICE_EMULATED`]: the same `.cu` kernels compiled for the host (the emulator),
//!   on host memory; completes before returning;
//! - [`MOEKIT_DEVICE_CUDA`]: the GPU kernel on device pointers, enqueued on the caller's
//!   `CUstream` (`stream`; NULL: the legacy default stream of the current context).
//!
//! The same arguments are checked in the same order on every device (the raw layer of each
//! kernel crate does the checking; on the CPU it runs with a launcher that launches nothing,
//! then the reference runs), so a bad argument gives the same status everywhere, and the
//! CPU results are those of the crate references bit for bit.
//!
//! # Contract (borrowing, never owning)
//! - Every pointer is borrowed for the duration of the call (CPU, emulator) or until the work
//!   enqueued on the stream has run (CUDA). moekit never frees, retains or keeps a pointer.
//! - A CUDA call allocates nothing, never synchronises, and leaves the calling thread's current
//!   context as it found it. It runs in the stream's context (the current one for a NULL
//!   stream); the first call in a context loads moekit's kernel modules into it, which stay
//!   loaded until [`moekit_cuda_forget_context`].
//! - Output buffers must not overlap any other buffer of the call (checked on host addresses).
//! - Lengths follow from the dimensions given; each pointer must address at least that many
//!   elements, aligned to its element size (an `ALIGNMENT` status otherwise); a NULL pointer
//!   is an error (`NULL_POINTER`) unless the buffer is optional or empty.
//! - Every call returns a `MOEKIT_STATUS_*` code; [`moekit_last_error`] gives this thread's
//!   message for the last call. No Rust panic crosses the boundary (`MOEKIT_STATUS_PANIC`).
//! - Values read from device memory (ids, row maps, counts) follow each kernel's contract:
//!   ids outside their range are skipped or clamped, never used as addresses.

#![warn(missing_docs)]

mod dispatch;
mod gating;
mod gemm;

pub use dispatch::*;
pub use gating::*;
pub use gemm::*;

use moekit_cuda::{DevPtr, DevPtrMut, Emulator, Error, Gpu, KernelImage, LaunchConfig, Launcher, MemSpace, Stream};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::sync::{Mutex, OnceLock};

/// Success.
pub const MOEKIT_STATUS_OK: i32 = 0;
/// A buffer length or dimension is wrong.
pub const MOEKIT_STATUS_SHAPE: i32 = 1;
/// A dtype is wrong or operands mix dtypes.
pub const MOEKIT_STATUS_DTYPE: i32 = 2;
/// A pointer, size or stride is not aligned as the kernel needs.
pub const MOEKIT_STATUS_ALIGNMENT: i32 = 3;
/// Any other bad argument (a config or enum value out of range, overlapping buffers, ...).
pub const MOEKIT_STATUS_INVALID_ARGUMENT: i32 = 4;
/// A required pointer is NULL.
pub const MOEKIT_STATUS_NULL_POINTER: i32 = 5;
/// A CUDA driver call failed.
pub const MOEKIT_STATUS_CUDA: i32 = 6;
/// No CUDA driver or no such device.
pub const MOEKIT_STATUS_NO_DEVICE: i32 = 7;
/// The kernels (or their host emulation) were not built into this library.
pub const MOEKIT_STATUS_NOT_BUILT: i32 = 8;
/// The kernels cannot run on this GPU's architecture.
pub const MOEKIT_STATUS_UNSUPPORTED_ARCH: i32 = 9;
/// An emulated kernel faulted (deadlock, out-of-bounds write).
pub const MOEKIT_STATUS_KERNEL_FAULT: i32 = 10;
/// A bug in moekit: a Rust panic, caught at the boundary.
pub const MOEKIT_STATUS_PANIC: i32 = 11;

/// The CPU reference on host memory.
pub const MOEKIT_DEVICE_CPU: i32 = 0;
/// The host emulation of the CUDA kernels, on host memory.
pub const MOEKIT_DEVICE_EMULATED: i32 = 1;
/// A CUDA GPU: device pointers and a caller-owned stream.
pub const MOEKIT_DEVICE_CUDA: i32 = 2;

/// f32.
pub const MOEKIT_DTYPE_F32: i32 = 0;
/// BF16 (16-bit values, passed as `uint16_t` bit patterns).
pub const MOEKIT_DTYPE_BF16: i32 = 1;
/// FP8 E4M3 (one byte per value, with f32 scales).
pub const MOEKIT_DTYPE_FP8_E4M3: i32 = 2;

/// Row-major scales `[rows, cols / 128]`.
pub const MOEKIT_LAYOUT_ROW_MAJOR: i32 = 0;
/// DeepGEMM's MN-major scales `[cols / 128, round_up(rows, 4)]`.
pub const MOEKIT_LAYOUT_MN_MAJOR: i32 = 1;

/// Where a call runs.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitDevice {
    /// `MOEKIT_DEVICE_CPU`, `MOEKIT_DEVICE_EMULATED` or `MOEKIT_DEVICE_CUDA`.
    pub kind: i32,
    /// Must be 0.
    pub reserved: i32,
    /// CUDA only: the caller's `CUstream` (NULL: the legacy default stream of the current
    /// context). Ignored (should be NULL) on the host devices.
    pub stream: *mut c_void,
}

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Failure {
    status: i32,
    msg: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::Shape(_) => MOEKIT_STATUS_SHAPE,
            Error::Dtype { .. } => MOEKIT_STATUS_DTYPE,
            Error::Alignment { .. } => MOEKIT_STATUS_ALIGNMENT,
            Error::Cuda { .. } => MOEKIT_STATUS_CUDA,
            Error::NoDriver | Error::NoDevice { .. } => MOEKIT_STATUS_NO_DEVICE,
            Error::KernelsNotBuilt { .. } | Error::EmulationNotBuilt { .. } => MOEKIT_STATUS_NOT_BUILT,
            Error::UnsupportedArchitecture { .. } => MOEKIT_STATUS_UNSUPPORTED_ARCH,
            Error::KernelFault(_) => MOEKIT_STATUS_KERNEL_FAULT,
            _ => MOEKIT_STATUS_INVALID_ARGUMENT,
        };
        Failure { status, msg: e.to_string() }
    }
}

pub(crate) type R<T> = Result<T, Failure>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> R<T> {
    Err(Failure { status: MOEKIT_STATUS_INVALID_ARGUMENT, msg: format!("invalid argument: {}", msg.into()) })
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one entry point: catches panics, records the message, returns the status.
pub(crate) fn entry(f: impl FnOnce() -> R<()>) -> i32 {
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let (status, msg) = match out {
        Ok(Ok(())) => (MOEKIT_STATUS_OK, String::new()),
        Ok(Err(f)) => (f.status, f.msg),
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            (MOEKIT_STATUS_PANIC, format!("internal error (panic): {}", what.unwrap_or_default()))
        }
    };
    set_last_error(&msg);
    status
}

/// The message of this thread's last moekit call: empty after a success. The pointer stays
/// valid until the thread's next moekit call; never NULL.
#[no_mangle]
pub extern "C" fn moekit_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version, e.g. `"0.1.0"` (a static string).
#[no_mangle]
pub extern "C" fn moekit_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Unloads moekit's kernel modules from the CUDA context `ctx` (a `CUcontext`) and forgets it;
/// call before destroying a context moekit has run in. A context moekit never saw is fine.
/// Returns a status.
///
/// # Safety
/// `ctx` must still be valid, with no moekit work pending on it.
#[no_mangle]
pub unsafe extern "C" fn moekit_cuda_forget_context(ctx: *mut c_void) -> i32 {
    entry(|| {
        let gone = {
            let mut gpus = GPUS.lock().unwrap_or_else(|p| p.into_inner());
            let at = gpus.iter().position(|(c, _)| *c == ctx as usize);
            at.map(|i| gpus.swap_remove(i).1)
        };
        if gone.is_some() {
            let _restore = moekit_cuda::CurrentContext::save()?;
            drop(gone); // unloads with the context bound; the guard restores the caller's
        }
        Ok(())
    })
}

/// Every `Gpu` moekit has run in, by context: keeps the loaded modules (never reloaded per call).
static GPUS: Mutex<Vec<(usize, Gpu)>> = Mutex::new(Vec::new());

fn gpu_for(ctx: moekit_cuda::sys::CUcontext) -> R<Gpu> {
    let mut gpus = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, g)) = gpus.iter().find(|(c, _)| *c == ctx as usize) {
        return Ok(g.clone());
    }
    // SAFETY: the caller's contract: a stream's context (or the current one) is valid and
    // outlives moekit's use of it (until moekit_cuda_forget_context).
    let gpu = unsafe { Gpu::borrow_context(ctx) }?;
    gpus.push((ctx as usize, gpu.clone()));
    Ok(gpu)
}

/// A launcher that launches nothing: the raw layers' checks, then the CPU reference.
struct CheckOnly;

impl Launcher for CheckOnly {
    unsafe fn launch_params(
        &self,
        _: &'static KernelImage,
        _: &str,
        _: LaunchConfig,
        _: &mut [*mut c_void],
    ) -> moekit_cuda::Result<()> {
        Ok(())
    }
    fn multiprocessors(&self) -> u32 {
        1
    }
    fn describe(&self) -> String {
        "the CPU reference".into()
    }
    fn can_address(&self, space: MemSpace) -> bool {
        !matches!(space, MemSpace::Device(_))
    }
    fn max_active_blocks_per_sm(&self, _: &'static KernelImage, _: &str, _: u32, _: u32) -> moekit_cuda::Result<u32> {
        Ok(1)
    }
}

/// Where one call runs.
pub(crate) enum Exec {
    Cpu,
    Emulated(&'static Emulator),
    /// Fields drop in order: the borrowed stream (nothing destroyed), then the guard that
    /// makes the caller's context current again.
    Cuda {
        stream: Stream,
        _restore: moekit_cuda::CurrentContext,
    },
}

impl Exec {
    pub(crate) fn new(dev: &MoekitDevice) -> R<Exec> {
        if dev.reserved != 0 {
            return invalid(format!("MoekitDevice.reserved = {} (must be 0)", dev.reserved));
        }
        match dev.kind {
            MOEKIT_DEVICE_CPU => Ok(Exec::Cpu),
            MOEKIT_DEVICE_EMULATED => {
                static EMU: OnceLock<Emulator> = OnceLock::new();
                Ok(Exec::Emulated(EMU.get_or_init(Emulator::new)))
            }
            MOEKIT_DEVICE_CUDA => {
                let restore = moekit_cuda::CurrentContext::save()?;
                let raw = dev.stream as moekit_cuda::sys::CUstream;
                let ctx = if raw.is_null() {
                    match restore.get() {
                        Some(c) => c,
                        None => return invalid("no current CUDA context on this thread and no stream"),
                    }
                } else {
                    // SAFETY: the caller's contract: `stream` is a valid CUstream.
                    unsafe { moekit_cuda::stream_context(raw) }?
                };
                let gpu = gpu_for(ctx)?;
                gpu.bind()?;
                // SAFETY: `raw` is a stream of `gpu`'s context (asked of the driver above) or
                // the legacy stream; the caller keeps it alive while the work runs.
                let stream = unsafe { Stream::borrowed(&gpu, raw) };
                Ok(Exec::Cuda { stream, _restore: restore })
            }
            k => invalid(format!("device kind {k} (0 = CPU, 1 = emulated, 2 = CUDA)")),
        }
    }
    pub(crate) fn launcher(&self) -> &dyn Launcher {
        match self {
            Exec::Cpu => &CheckOnly,
            Exec::Emulated(e) => *e,
            Exec::Cuda { stream, .. } => stream,
        }
    }
    pub(crate) fn is_cpu(&self) -> bool {
        matches!(self, Exec::Cpu)
    }
    fn space(&self) -> MemSpace {
        match self {
            Exec::Cpu | Exec::Emulated(_) => MemSpace::Host,
            Exec::Cuda { .. } => MemSpace::Foreign,
        }
    }
}

/// Runs `f` on the device `dev` names.
pub(crate) fn run(dev: MoekitDevice, f: impl FnOnce(&Exec) -> R<()>) -> i32 {
    entry(|| f(&Exec::new(&dev)?))
}

/// `dims` multiplied, a `SHAPE` status on overflow.
pub(crate) fn elems(what: &str, dims: &[u64]) -> R<usize> {
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= (isize::MAX as u64) / 16);
    n.map(|n| n as usize).ok_or_else(|| Error::Shape(format!("{what}: dimensions {dims:?} overflow")).into())
}

/// A caller's buffer, checked: non-null unless empty, aligned to `T`, in the address space.
pub(crate) struct Buf<T> {
    what: &'static str,
    addr: u64,
    len: usize,
    out: bool,
    _t: PhantomData<*const T>,
}

impl<T> Clone for Buf<T> {
    fn clone(&self) -> Self {
        Buf { what: self.what, addr: self.addr, len: self.len, out: self.out, _t: PhantomData }
    }
}

impl<T> Buf<T> {
    fn new(what: &'static str, p: *const T, len: usize, out: bool) -> R<Buf<T>> {
        let addr = p as u64;
        if p.is_null() && len > 0 {
            return Err(Failure { status: MOEKIT_STATUS_NULL_POINTER, msg: format!("null pointer: `{what}`") });
        }
        moekit_cuda::check_aligned(&format!("`{what}`"), addr, len, std::mem::align_of::<T>())?;
        if addr.checked_add((len * std::mem::size_of::<T>()) as u64).is_none() {
            return Err(Error::Shape(format!("`{what}`: {len} elements from 0x{addr:x} wrap around")).into());
        }
        Ok(Buf { what, addr, len, out, _t: PhantomData })
    }
    fn bytes(&self) -> u64 {
        (self.len * std::mem::size_of::<T>()) as u64
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// The raw layer's view.
    pub(crate) fn dev<'a>(&self, x: &Exec) -> DevPtr<'a, T> {
        // SAFETY: the C contract: the caller's pointer addresses `len` valid elements where
        // the call runs, for the call (and, on CUDA, until the stream has run the work).
        unsafe { DevPtr::from_raw_in(self.addr, self.len, x.space()) }
    }
    /// The raw layer's writable view.
    pub(crate) fn dev_mut<'a>(&self, x: &Exec) -> DevPtrMut<'a, T> {
        // SAFETY: as in `dev`; outputs overlap no other buffer of the call (checked).
        unsafe { DevPtrMut::from_raw_in(self.addr, self.len, x.space()) }
    }
    /// The host slice (CPU device only).
    pub(crate) fn host<'a>(&self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: CPU device: host memory of `len` initialised elements (the C contract),
        // non-null and aligned (checked in `new`), not written during the call (outputs do
        // not overlap it: checked by `disjoint`).
        unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) }
    }
    /// The writable host slice (CPU device only).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn host_mut<'a>(&self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `host`, and an output overlaps no other buffer (`disjoint`), so this
        // is the only reference to its memory during the call.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut T, self.len) }
    }
    pub(crate) fn span(&self) -> Span {
        Span { what: self.what, addr: self.addr, bytes: self.bytes(), out: self.out }
    }
}

/// An input buffer of `len` elements.
pub(crate) fn input<T>(what: &'static str, p: *const T, len: usize) -> R<Buf<T>> {
    Buf::new(what, p, len, false)
}
/// An output buffer of `len` elements.
pub(crate) fn output<T>(what: &'static str, p: *mut T, len: usize) -> R<Buf<T>> {
    Buf::new(what, p, len, true)
}
/// An optional input (NULL: absent).
pub(crate) fn opt_input<T>(what: &'static str, p: *const T, len: usize) -> R<Option<Buf<T>>> {
    if p.is_null() {
        Ok(None)
    } else {
        input(what, p, len).map(Some)
    }
}
/// An optional output (NULL: absent).
pub(crate) fn opt_output<T>(what: &'static str, p: *mut T, len: usize) -> R<Option<Buf<T>>> {
    if p.is_null() {
        Ok(None)
    } else {
        output(what, p, len).map(Some)
    }
}

/// A buffer's byte range, for the overlap check.
pub(crate) struct Span {
    what: &'static str,
    addr: u64,
    bytes: u64,
    out: bool,
}

/// `INVALID_ARGUMENT` when an output overlaps another buffer (empty buffers overlap nothing).
pub(crate) fn disjoint(spans: &[Span]) -> R<()> {
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let overlap = a.bytes > 0 && b.bytes > 0 && a.addr < b.addr + b.bytes && b.addr < a.addr + a.bytes;
            if overlap && (a.out || b.out) {
                return invalid(format!("`{}` overlaps `{}` (outputs must not alias other buffers)", a.what, b.what));
            }
        }
    }
    Ok(())
}

/// A C boolean (0 or 1); anything else is `INVALID_ARGUMENT`.
pub(crate) fn flag(what: &str, v: i32) -> R<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => invalid(format!("{what} = {v} (must be 0 or 1)")),
    }
}

/// The scale layout of a `MOEKIT_LAYOUT_*` value.
pub(crate) fn scale_layout(v: i32) -> R<moekit_dispatch::ScaleLayout> {
    match v {
        MOEKIT_LAYOUT_ROW_MAJOR => Ok(moekit_dispatch::ScaleLayout::RowMajor),
        MOEKIT_LAYOUT_MN_MAJOR => Ok(moekit_dispatch::ScaleLayout::MnMajor),
        _ => invalid(format!("scale layout {v} (0 = row-major, 1 = MN-major)")),
    }
}

/// A pointer that the caller's header declares `const MoekitX*`: NULL is `NULL_POINTER`.
pub(crate) fn by_ref<'a, T>(what: &str, p: *const T) -> R<&'a T> {
    if p.is_null() {
        return Err(Failure { status: MOEKIT_STATUS_NULL_POINTER, msg: format!("null pointer: `{what}`") });
    }
    moekit_cuda::check_aligned(&format!("`{what}`"), p as u64, 1, std::mem::align_of::<T>())?;
    // SAFETY: non-null and aligned; the caller's contract: it points to a valid struct.
    Ok(unsafe { &*p })
}

//! Driver discovery and the device/context handle.

use crate::error::{CudaContext, Error, Result};
use crate::image::{Function, KernelImage, LoadedModule};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Whether the CUDA driver library can be loaded. Never panics, never touches a device.
///
/// With the `linked-driver` feature (cudarc linked against libcuda at build time, as candle's
/// `cuda` feature does) the program could not have started without the library: always true.
pub fn driver_available() -> bool {
    #[cfg(not(feature = "linked-driver"))]
    {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        // SAFETY: `is_culib_present` only tries `dlopen` on candidate names and drops the handles.
        *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
    }
    #[cfg(feature = "linked-driver")]
    true
}

/// Initialises the driver once; `NoDriver` when libcuda is absent.
fn init_driver() -> Result<()> {
    static INIT: OnceLock<Result<()>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_available() {
            return Err(Error::NoDriver);
        }
        // cudarc panics when a driver symbol is missing (a driver older than the API we bind):
        // turn that into an error instead of aborting the caller.
        match std::panic::catch_unwind(result::init) {
            Ok(r) => r.during("cuInit"),
            Err(_) => Err(Error::NoDriver),
        }
    })
    .clone()
}

/// Number of CUDA devices; `Ok(0)` when the driver is present but sees none (or has no
/// usable GPU), `Err(NoDriver)` when the driver library is absent.
pub fn device_count() -> Result<usize> {
    match init_driver() {
        Ok(()) => {}
        Err(Error::Cuda { code, .. }) if code == sys::CUresult::CUDA_ERROR_NO_DEVICE as u32 => return Ok(0),
        Err(e) => return Err(e),
    }
    Ok(result::device::get_count().during("cuDeviceGetCount")?.max(0) as usize)
}

/// A CUDA device with its context. Cheap to clone (shared handle).
///
/// [`Gpu::new`] uses the device's *primary* context, the one the CUDA runtime, PyTorch and
/// cudarc use too, so buffers and streams are interchangeable with theirs.
/// [`Gpu::from_raw_context`] wraps a context owned by another runtime without taking ownership.
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<GpuInner>,
}

struct GpuInner {
    ordinal: usize,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    owns_primary: bool,
    name: String,
    major: u32,
    minor: u32,
    sm_count: u32,
    /// Loaded modules, keyed by the address of their (static) `KernelImage`.
    modules: Mutex<HashMap<usize, Arc<LoadedModule>>>,
    /// The memory pool of stream-ordered allocations once configured (`Some(None)`: the
    /// device has no memory pools), as an integer handle.
    pool: OnceLock<Option<usize>>,
}

// SAFETY: a CUcontext and CUdevice are process-wide handles usable from any thread once made
// current; all mutable state (the module cache) is behind a Mutex.
unsafe impl Send for GpuInner {}
// SAFETY: see above; `&GpuInner` only reads immutable handles or locks the Mutex.
unsafe impl Sync for GpuInner {}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}: {}, sm_{}{})", self.inner.ordinal, self.inner.name, self.inner.major, self.inner.minor)
    }
}

impl Gpu {
    /// Opens device `ordinal` with its primary context.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let device = result::device::get(ordinal as i32).during("cuDeviceGet")?;
        // SAFETY: `device` is a valid device handle from cuDeviceGet; retain is balanced by the
        // release in Drop (owns_primary = true).
        let ctx = unsafe { result::primary_ctx::retain(device) }.during("cuDevicePrimaryCtxRetain")?;
        Self::wrap(ordinal, device, ctx, true).inspect_err(|_| {
            // SAFETY: balances the retain above; nothing was made from the context.
            let _ = unsafe { result::primary_ctx::release(device) };
        })
    }

    /// Wraps a context owned by another runtime. moekit never destroys or releases it.
    ///
    /// # Safety
    /// `ctx` must be a valid context of device `ordinal` and outlive every object made from
    /// the returned handle (buffers, streams, loaded modules).
    pub unsafe fn from_raw_context(ordinal: usize, ctx: sys::CUcontext) -> Result<Gpu> {
        init_driver()?;
        let device = result::device::get(ordinal as i32).during("cuDeviceGet")?;
        Self::wrap(ordinal, device, ctx, false)
    }

    /// Wraps `ctx` without owning it, finding its device (what an embedding C ABI needs: the
    /// caller names a stream, and the stream knows its context). Leaves `ctx` current on the
    /// calling thread; save and restore the previous one with [`CurrentContext`].
    ///
    /// # Safety
    /// As for [`Gpu::from_raw_context`]: `ctx` must be a valid context and outlive every object
    /// made from the returned handle.
    pub unsafe fn borrow_context(ctx: sys::CUcontext) -> Result<Gpu> {
        init_driver()?;
        if ctx.is_null() {
            return Err(Error::InvalidArgument("null CUDA context".into()));
        }
        // SAFETY: `ctx` is valid (caller's contract); cuCtxGetDevice then asks about it.
        unsafe { result::ctx::set_current(ctx) }.during("cuCtxSetCurrent")?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: writes one CUdevice for the context made current above.
        unsafe { sys::cuCtxGetDevice(&mut device) }.result().during("cuCtxGetDevice")?;
        let count = result::device::get_count().during("cuDeviceGetCount")?.max(0);
        let ordinal = (0..count)
            .find(|&i| result::device::get(i).is_ok_and(|d| d == device))
            .ok_or_else(|| Error::InvalidArgument(format!("the context's device {device} has no ordinal")))?;
        Self::wrap(ordinal as usize, device, ctx, false)
    }

    fn wrap(ordinal: usize, device: sys::CUdevice, ctx: sys::CUcontext, owns_primary: bool) -> Result<Gpu> {
        // SAFETY: `ctx` is valid per the constructors' contracts.
        unsafe { result::ctx::set_current(ctx) }.during("cuCtxSetCurrent")?;
        let attr = |a| {
            // SAFETY: `device` is a valid device handle; the attribute enum is a valid query.
            unsafe { result::device::get_attribute(device, a) }.during("cuDeviceGetAttribute")
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32;
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let name = result::device::get_name(device).during("cuDeviceGetName")?;
        Ok(Gpu {
            inner: Arc::new(GpuInner {
                ordinal,
                device,
                ctx,
                owns_primary,
                name,
                major,
                minor,
                sm_count,
                modules: Mutex::new(HashMap::new()),
                pool: OnceLock::new(),
            }),
        })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }
    /// Device name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// Compute capability `(major, minor)`, e.g. `(9, 0)`.
    pub fn compute_capability(&self) -> (u32, u32) {
        (self.inner.major, self.inner.minor)
    }
    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }
    /// The raw context handle.
    pub fn raw_context(&self) -> sys::CUcontext {
        self.inner.ctx
    }

    /// Makes this device's context current on the calling thread (every driver call that
    /// allocates, copies, loads or launches does this first).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is valid for the lifetime of `self` (see constructors).
        unsafe { result::ctx::set_current(self.inner.ctx) }.during("cuCtxSetCurrent")
    }

    /// Whether two handles refer to the same context.
    pub fn same_as(&self, other: &Gpu) -> bool {
        self.inner.ctx == other.inner.ctx
    }

    /// The memory pool that stream-ordered allocations (`cuMemAllocAsync`) of this device come
    /// from: the device's current pool (its default pool unless another runtime set another),
    /// configured on first use to keep freed memory cached for reuse (release threshold
    /// `u64::MAX`: the pool never returns memory to the OS on its own, so an allocation in a
    /// steady-state step is served from the cache without a driver round trip). The pool is
    /// the device's, shared with every runtime in the process that allocates from it. `None`
    /// when the device has no memory pools (buffers then fall back to `cuMemAlloc`).
    pub fn stream_pool(&self) -> Result<Option<sys::CUmemoryPool>> {
        if let Some(p) = self.inner.pool.get() {
            return Ok(p.map(|h| h as sys::CUmemoryPool));
        }
        self.bind()?;
        // SAFETY: a valid device handle and a valid attribute query.
        let supported = unsafe {
            result::device::get_attribute(
                self.inner.device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
            )
        }
        .during("cuDeviceGetAttribute")?;
        let pool = if supported == 1 {
            // SAFETY: a valid device handle.
            let pool = unsafe { result::device::get_mem_pool(self.inner.device) }.during("cuDeviceGetMemPool")?;
            let mut threshold: u64 = u64::MAX;
            // SAFETY: the release threshold attribute is a cuuint64_t, which `threshold` is.
            unsafe {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
            }
            .during("cuMemPoolSetAttribute")?;
            Some(pool as usize)
        } else {
            None
        };
        // A racing thread configured the same pool the same way: either value is right.
        let _ = self.inner.pool.set(pool);
        Ok(pool.map(|h| h as sys::CUmemoryPool))
    }

    /// Bytes the stream-ordered pool holds from the OS (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`:
    /// in use plus cached); `None` without memory pools. For tests that check reuse.
    pub fn pool_reserved_bytes(&self) -> Result<Option<u64>> {
        let Some(pool) = self.stream_pool()? else { return Ok(None) };
        let mut bytes: u64 = 0;
        // SAFETY: a valid pool (configured above); the attribute is a cuuint64_t.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                (&mut bytes as *mut u64).cast(),
            )
        }
        .during("cuMemPoolGetAttribute")?;
        Ok(Some(bytes))
    }

    /// Looks up kernel `name` in `image`, loading the image into this context the first time.
    pub fn function(&self, image: &'static KernelImage, name: &str) -> Result<Function> {
        let module = self.module(image)?;
        Function::lookup(self.clone(), module, name)
    }

    fn module(&self, image: &'static KernelImage) -> Result<Arc<LoadedModule>> {
        let mut cache = self.inner.modules.lock().unwrap_or_else(|p| p.into_inner());
        let key = image as *const KernelImage as usize;
        if let Some(m) = cache.get(&key) {
            return Ok(m.clone());
        }
        let (major, minor) = self.compute_capability();
        let unsupported = || Error::UnsupportedArchitecture {
            module: image.name(),
            major,
            minor,
            built_for: image.archs().join(", "),
        };
        let bytes = image.fatbin().ok_or(Error::KernelsNotBuilt { module: image.name() })?;
        if image.hopper_only() && (major, minor) != (9, 0) {
            return Err(unsupported());
        }
        self.bind()?;
        let m = LoadedModule::load(bytes).map_err(|e| {
            if Error::is_no_binary(&e) {
                unsupported()
            } else {
                Error::cuda("cuModuleLoadData", e)
            }
        })?;
        let m = Arc::new(m);
        cache.insert(key, m.clone());
        Ok(m)
    }
}

impl Drop for GpuInner {
    fn drop(&mut self) {
        // Unload every module (with the context current) before the context is released.
        let modules = std::mem::take(&mut *self.modules.lock().unwrap_or_else(|p| p.into_inner()));
        // SAFETY: the context is still valid here (we hold it).
        let _ = unsafe { result::ctx::set_current(self.ctx) };
        drop(modules);
        if self.owns_primary {
            // SAFETY: balances the retain in `Gpu::new`; done once, after the modules.
            let _ = unsafe { result::primary_ctx::release(self.device) };
        }
    }
}

/// The calling thread's current context, saved by [`CurrentContext::save`] and made current
/// again when the guard drops: code that must bind another context (every moekit driver call
/// binds its [`Gpu`]'s) leaves the caller's thread as it found it.
pub struct CurrentContext {
    saved: sys::CUcontext,
}

impl CurrentContext {
    /// Saves the current context (null when there is none).
    pub fn save() -> Result<CurrentContext> {
        init_driver()?;
        let saved = result::ctx::get_current().during("cuCtxGetCurrent")?.unwrap_or(std::ptr::null_mut());
        Ok(CurrentContext { saved })
    }
    /// The saved context; None when no context was current.
    pub fn get(&self) -> Option<sys::CUcontext> {
        (!self.saved.is_null()).then_some(self.saved)
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        // SAFETY: `saved` was current on this thread when saved (or null, which unbinds); the
        // caller that made it current keeps it alive across the guarded call.
        let _ = unsafe { result::ctx::set_current(self.saved) };
    }
}

/// The context a stream belongs to.
///
/// # Safety
/// `stream` must be a valid, non-null stream handle.
pub unsafe fn stream_context(stream: sys::CUstream) -> Result<sys::CUcontext> {
    init_driver()?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `stream` is valid (caller's contract); writes one CUcontext.
    unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }.result().during("cuStreamGetCtx")?;
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_helpers_never_panic_without_a_driver() {
        if driver_available() {
            return; // covered by gpu_borrowed_context_is_the_primary_one
        }
        assert_eq!(CurrentContext::save().err(), Some(Error::NoDriver));
        // SAFETY: never reaches the driver (no driver: an error first).
        assert_eq!(unsafe { Gpu::borrow_context(std::ptr::null_mut()) }.err(), Some(Error::NoDriver));
    }

    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_borrowed_context_is_the_primary_one() {
        let Some(gpu) = crate::testing::gpu_or_skip("gpu_borrowed_context_is_the_primary_one", &[]) else { return };
        let stream = crate::Stream::new(&gpu).unwrap();
        // SAFETY: a live stream of `gpu`'s context.
        let ctx = unsafe { stream_context(stream.raw()) }.unwrap();
        assert_eq!(ctx, gpu.raw_context());
        {
            // SAFETY: unbinding is always valid; the guard restores gpu's context.
            let _g = CurrentContext::save().unwrap();
            unsafe { result::ctx::set_current(std::ptr::null_mut()) }.unwrap();
            // SAFETY: the primary context, retained by `gpu` for the whole test.
            let borrowed = unsafe { Gpu::borrow_context(ctx) }.unwrap();
            assert!(borrowed.same_as(&gpu));
            assert_eq!(borrowed.ordinal(), gpu.ordinal());
        }
        assert_eq!(result::ctx::get_current().unwrap(), Some(gpu.raw_context()));
    }
}

//! Embedded kernel images (fatbins) and the functions looked up in them.

use crate::emu::EmuKernel;
use crate::error::{CudaContext, Error, Result};
use crate::gpu::Gpu;
use cudarc::driver::{result, sys, DriverError};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex};

/// A kernel module embedded in a kernel crate by `moekit-build`: one fatbin, loaded lazily
/// into each context on first use (see [`Gpu::function`]).
#[derive(Debug)]
pub struct KernelImage {
    name: &'static str,
    fatbin: Option<&'static [u8]>,
    archs: &'static [&'static str],
    hopper_only: bool,
    emulation: &'static [EmuKernel],
}

impl KernelImage {
    /// An image compiled at build time.
    pub const fn built(
        name: &'static str,
        fatbin: &'static [u8],
        archs: &'static [&'static str],
        hopper_only: bool,
    ) -> Self {
        KernelImage { name, fatbin: Some(fatbin), archs, hopper_only, emulation: &[] }
    }

    /// An image that could not be compiled (no nvcc at build time).
    pub const fn not_built(name: &'static str, hopper_only: bool) -> Self {
        KernelImage { name, fatbin: None, archs: &[], hopper_only, emulation: &[] }
    }

    /// Adds the host-compiled entry points of the image's kernels (see [`crate::emu`]).
    pub const fn with_emulation(mut self, kernels: &'static [EmuKernel]) -> Self {
        self.emulation = kernels;
        self
    }

    /// The host-compiled kernels (empty when the CUDA headers were missing at build time).
    pub fn emulation(&self) -> &'static [EmuKernel] {
        self.emulation
    }

    /// Module name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// The fatbin, if built.
    pub fn fatbin(&self) -> Option<&'static [u8]> {
        self.fatbin
    }
    /// Whether the image was built.
    pub fn is_built(&self) -> bool {
        self.fatbin.is_some()
    }
    /// Targets in the fatbin (`sm_90a`, `compute_80`, ...).
    pub fn archs(&self) -> &'static [&'static str] {
        self.archs
    }
    /// Whether the module only runs on compute capability 9.0 (`sm_90a`).
    pub fn hopper_only(&self) -> bool {
        self.hopper_only
    }
}

/// A module loaded into a context. Unloaded on drop (the owning [`Gpu`] keeps the context
/// alive and current at that point).
pub(crate) struct LoadedModule {
    raw: sys::CUmodule,
    /// Functions looked up so far: a launch finds its kernel without a driver call.
    functions: Mutex<HashMap<String, sys::CUfunction>>,
    /// Dynamic shared memory each function has been allowed (above the default 48 KiB).
    smem_allowed: Mutex<HashMap<String, u32>>,
    /// Resident blocks per multiprocessor by (function, threads per block, dynamic shared
    /// memory): grids are sized from it without a driver call per launch.
    occupancy: Mutex<HashMap<(String, u32, u32), u32>>,
}

// SAFETY: a CUmodule handle is valid from any thread of the process while its context lives.
unsafe impl Send for LoadedModule {}
// SAFETY: LoadedModule exposes no interior mutability; the driver's module calls are thread-safe.
unsafe impl Sync for LoadedModule {}

impl LoadedModule {
    /// Loads a fatbin into the current context.
    pub(crate) fn load(bytes: &[u8]) -> std::result::Result<Self, DriverError> {
        // The driver reads the fatbin header with 8-byte loads: copy into u64-aligned storage.
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `aligned` holds a complete fatbin (embedded by moekit-build) and outlives the
        // call; cuModuleLoadData copies what it needs.
        let raw = unsafe { result::module::load_data(aligned.as_ptr().cast()) }?;
        Ok(LoadedModule {
            raw,
            functions: Mutex::new(HashMap::new()),
            smem_allowed: Mutex::new(HashMap::new()),
            occupancy: Mutex::new(HashMap::new()),
        })
    }
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // SAFETY: `raw` came from cuModuleLoadData and is unloaded exactly once.
        let _ = unsafe { result::module::unload(self.raw) };
    }
}

/// A kernel entry point in a loaded module. Keeps its module and context alive.
#[derive(Clone)]
pub struct Function {
    // Field order is drop order: the module is unloaded while `gpu` still holds the context.
    _module: Arc<LoadedModule>,
    gpu: Gpu,
    raw: sys::CUfunction,
    name: String,
}

// SAFETY: CUfunction is an immutable handle valid while its module is loaded (we hold it).
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Function({} on {:?})", self.name, self.gpu)
    }
}

impl Function {
    pub(crate) fn lookup(gpu: Gpu, module: Arc<LoadedModule>, name: &str) -> Result<Function> {
        let mut functions = module.functions.lock().unwrap_or_else(|p| p.into_inner());
        let raw = match functions.get(name) {
            Some(&raw) => raw,
            None => {
                let cname = CString::new(name).map_err(|_| Error::InvalidArgument(format!("kernel name {name:?}")))?;
                gpu.bind()?;
                // SAFETY: the module is loaded in the bound context and `cname` is NUL-terminated.
                let raw = unsafe { result::module::get_function(module.raw, cname) }.during("cuModuleGetFunction")?;
                functions.insert(name.to_string(), raw);
                raw
            }
        };
        drop(functions);
        Ok(Function { _module: module, gpu, raw, name: name.to_string() })
    }

    /// The device this function is loaded on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// Kernel name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Raw handle.
    pub fn raw(&self) -> sys::CUfunction {
        self.raw
    }

    /// Registers per thread of the compiled kernel, as the driver reports.
    pub fn num_registers(&self) -> Result<i32> {
        self.attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)
    }

    /// Allows up to `bytes` of dynamic shared memory per block (needed above 48 KiB).
    pub fn set_max_dynamic_shared_memory(&self, bytes: u32) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: valid function handle; the attribute takes an int byte count.
        unsafe {
            result::function::set_function_attribute(
                self.raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .during("cuFuncSetAttribute")
    }

    /// Makes sure a launch with `bytes` of dynamic shared memory is allowed: above 48 KiB the
    /// kernel must opt in, once (remembered per loaded module, so launches make no driver call).
    pub fn ensure_dynamic_shared_memory(&self, bytes: u32) -> Result<()> {
        if bytes <= 48 << 10 {
            return Ok(());
        }
        let mut allowed = self._module.smem_allowed.lock().unwrap_or_else(|p| p.into_inner());
        if allowed.get(&self.name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        self.set_max_dynamic_shared_memory(bytes)?;
        allowed.insert(self.name.clone(), bytes);
        Ok(())
    }

    /// Blocks of `block_threads` threads with `dynamic_smem` bytes of dynamic shared memory
    /// that fit on one multiprocessor at once (`cuOccupancyMaxActiveBlocksPerMultiprocessor`,
    /// asked once per function and configuration, then cached with the module). At least 1
    /// for any launchable configuration; 0 means the configuration cannot launch at all.
    pub fn max_active_blocks_per_sm(&self, block_threads: u32, dynamic_smem: u32) -> Result<u32> {
        let key = (self.name.clone(), block_threads, dynamic_smem);
        let mut cache = self._module.occupancy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&n) = cache.get(&key) {
            return Ok(n);
        }
        self.ensure_dynamic_shared_memory(dynamic_smem)?;
        self.gpu.bind()?;
        let threads = i32::try_from(block_threads)
            .map_err(|_| Error::InvalidArgument(format!("{block_threads} threads per block")))?;
        // SAFETY: valid function handle of a loaded module; plain value arguments.
        let n =
            unsafe { result::occupancy::max_active_block_per_multiprocessor(self.raw, threads, dynamic_smem as usize) }
                .during("cuOccupancyMaxActiveBlocksPerMultiprocessor")?;
        let n = n.max(0) as u32;
        cache.insert(key, n);
        Ok(n)
    }

    fn attribute(&self, a: sys::CUfunction_attribute) -> Result<i32> {
        self.gpu.bind()?;
        // SAFETY: valid function handle and attribute.
        unsafe { result::function::get_function_attribute(self.raw, a) }.during("cuFuncGetAttribute")
    }
}

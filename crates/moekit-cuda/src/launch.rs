//! Typed kernel launches.

use crate::error::{CudaContext, Error, Result};
use crate::image::KernelImage;
use crate::memory::{DevPtr, DevPtrMut, MemSpace};
use crate::stream::Stream;
use cudarc::driver::result;
use std::ffi::c_void;

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes.
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `ceil(n / block)` blocks of `block` threads (at least one block).
    pub fn for_elements(n: usize, block: u32) -> Result<Self> {
        let blocks = n.div_ceil(block.max(1) as usize).max(1);
        let grid =
            u32::try_from(blocks).map_err(|_| Error::Shape(format!("{n} elements need more than 2^32 blocks")))?;
        Ok(LaunchConfig { grid: (grid, 1, 1), block: (block, 1, 1), shared_mem_bytes: 0 })
    }
}

/// A value that can be passed to a kernel by value.
///
/// # Safety
/// `Raw` must have exactly the size, alignment and meaning of the kernel parameter it is
/// passed as (e.g. `u64` for a device pointer, a `#[repr(C)]` struct mirroring the C struct).
pub unsafe trait KernelParam {
    /// The bytes the kernel receives.
    type Raw: Copy;
    /// Converts to the kernel's representation.
    fn to_raw(&self) -> Self::Raw;
    /// Where the memory a pointer argument addresses lives (`None` for plain values).
    fn space(&self) -> Option<MemSpace> {
        None
    }
}

macro_rules! by_value {
    ($($t:ty),*) => {$(
        // SAFETY: plain scalars are passed to kernels as themselves.
        unsafe impl KernelParam for $t {
            type Raw = $t;
            fn to_raw(&self) -> $t { *self }
        }
    )*};
}
by_value!(i8, u8, i16, u16, i32, u32, i64, u64, f32, f64);

// SAFETY: a device pointer parameter is a 64-bit address.
unsafe impl<T> KernelParam for DevPtr<'_, T> {
    type Raw = u64;
    fn to_raw(&self) -> u64 {
        self.addr()
    }
    fn space(&self) -> Option<MemSpace> {
        Some(DevPtr::space(self))
    }
}

// SAFETY: a device pointer parameter is a 64-bit address.
unsafe impl<T> KernelParam for DevPtrMut<'_, T> {
    type Raw = u64;
    fn to_raw(&self) -> u64 {
        self.addr()
    }
    fn space(&self) -> Option<MemSpace> {
        Some(DevPtrMut::space(self))
    }
}

macro_rules! abi_struct_param {
    ($t:ty) => {
        // SAFETY: bindgen mirrors the C struct (`#[repr(C)]`); moekit-abi's layout test checks
        // every size and offset against the C compiler, so the kernel receives the same bytes.
        unsafe impl KernelParam for $t {
            type Raw = $t;
            fn to_raw(&self) -> $t {
                *self
            }
        }
    };
}
moekit_abi::for_each_abi_struct!(abi_struct_param);

/// A tuple of kernel parameters.
pub trait LaunchArgs {
    /// Calls `f` with the driver's parameter array (pointers to each raw value).
    fn with_params<R>(&self, f: impl FnOnce(&mut [*mut c_void]) -> R) -> R;
    /// The memory spaces of the pointer arguments.
    fn spaces(&self) -> Vec<MemSpace>;
}

macro_rules! tuple_args {
    ($($name:ident),+) => {
        impl<$($name: KernelParam),+> LaunchArgs for ($($name,)+) {
            #[allow(non_snake_case)]
            fn with_params<R>(&self, f: impl FnOnce(&mut [*mut c_void]) -> R) -> R {
                let ($($name,)+) = self;
                $(let mut $name = $name.to_raw();)+
                let mut params = [$(&mut $name as *mut _ as *mut c_void),+];
                f(&mut params)
            }
            #[allow(non_snake_case)]
            fn spaces(&self) -> Vec<MemSpace> {
                let ($($name,)+) = self;
                [$($name.space()),+].into_iter().flatten().collect()
            }
        }
    };
}
tuple_args!(A);
tuple_args!(A, B);
tuple_args!(A, B, C);
tuple_args!(A, B, C, D);
tuple_args!(A, B, C, D, E);
tuple_args!(A, B, C, D, E, F);
tuple_args!(A, B, C, D, E, F, G);
tuple_args!(A, B, C, D, E, F, G, H);
tuple_args!(A, B, C, D, E, F, G, H, I);
tuple_args!(A, B, C, D, E, F, G, H, I, J);
tuple_args!(A, B, C, D, E, F, G, H, I, J, K);
tuple_args!(A, B, C, D, E, F, G, H, I, J, K, L);

/// Where kernels run: a GPU [`Stream`] or the host [`Emulator`](crate::Emulator). Kernel
/// crates' raw launch functions take `&dyn Launcher`, so one function serves both.
pub trait Launcher {
    /// Launches `kernel` of `image` with cuLaunchKernel-style `params` (one pointer per
    /// kernel argument).
    ///
    /// # Safety
    /// `params` must match the kernel's parameter list in number, order and type, and the
    /// memory they address must be valid for this target (device memory of the stream's
    /// context, or host memory for the emulator) and within what the kernel touches.
    unsafe fn launch_params(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()>;

    /// Streaming multiprocessors to size grids for (the emulator reports a few).
    fn multiprocessors(&self) -> u32;

    /// Short description for messages.
    fn describe(&self) -> String;

    /// Compute capability of the GPU behind this launcher (None for the host emulation), for
    /// kernel dispatchers that pick an architecture-specific kernel.
    fn compute_capability(&self) -> Option<(u32, u32)> {
        None
    }

    /// Whether kernels launched here may address memory in `space`.
    fn can_address(&self, space: MemSpace) -> bool;

    /// Blocks of `kernel` (launched with `block_threads` threads and `dynamic_smem` bytes of
    /// dynamic shared memory) resident on one multiprocessor at once: the driver's occupancy
    /// answer on a GPU (cached per function), a fixed small number in the emulation. Persistent
    /// grids are sized from it with [`persistent_grid`], never from a constant.
    fn max_active_blocks_per_sm(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        block_threads: u32,
        dynamic_smem: u32,
    ) -> Result<u32>;
}

/// Blocks of a persistent (grid-stride) launch of `kernel`: as many as fit on the device at
/// once ([`Launcher::max_active_blocks_per_sm`] x multiprocessors), but no more than
/// `work_blocks` (the blocks that would have work) and at least 1. Errors when the
/// configuration cannot be resident at all (too many registers or too much shared memory).
pub fn persistent_grid(
    on: &dyn Launcher,
    image: &'static KernelImage,
    kernel: &str,
    block_threads: u32,
    dynamic_smem: u32,
    work_blocks: usize,
) -> Result<u32> {
    let per_sm = on.max_active_blocks_per_sm(image, kernel, block_threads, dynamic_smem)?;
    if per_sm == 0 {
        return Err(Error::InvalidArgument(format!(
            "`{kernel}` cannot run {block_threads} threads per block with {dynamic_smem} bytes of dynamic shared memory on {}",
            on.describe()
        )));
    }
    let resident = per_sm as usize * on.multiprocessors().max(1) as usize;
    Ok(work_blocks.clamp(1, resident).min(u32::MAX as usize) as u32)
}

/// An [`Error::Alignment`] unless `addr` is a multiple of `required` bytes (`len == 0`:
/// nothing is accessed, so any address is fine). On a GPU a misaligned vector access is a
/// sticky error that kills the caller's whole context, so raw launchers run this on every
/// pointer a kernel accesses with vector instructions, before launching.
pub fn check_aligned(what: &str, addr: u64, len: usize, required: usize) -> Result<()> {
    let got = (addr % required.max(1) as u64) as usize;
    if len == 0 || got == 0 {
        Ok(())
    } else {
        Err(Error::Alignment { what: format!("{what} (address modulo {required} bytes)"), required, got })
    }
}

/// Errors unless kernels on `on` may address memory in every one of `spaces`. Raw layers that
/// pack pointers into a parameter struct (where [`launch`] cannot see them) call this with the
/// spaces of those pointers before launching.
pub fn ensure_addressable(on: &dyn Launcher, spaces: &[MemSpace]) -> Result<()> {
    match spaces.iter().find(|s| !on.can_address(**s)) {
        Some(bad) => {
            Err(Error::InvalidArgument(format!("a pointer to {bad:?} memory cannot be used on {}", on.describe())))
        }
        None => Ok(()),
    }
}

/// Launches `kernel` of `image` with the typed `args` on `on`.
///
/// # Safety
/// As for [`Launcher::launch_params`]: `args` must match the kernel's parameter list and
/// address only memory the kernel may touch on this target.
pub unsafe fn launch<A: LaunchArgs>(
    on: &dyn Launcher,
    image: &'static KernelImage,
    kernel: &str,
    cfg: LaunchConfig,
    args: A,
) -> Result<()> {
    let (g, b) = (cfg.grid, cfg.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || b.0 == 0 || b.1 == 0 || b.2 == 0 {
        return Err(Error::InvalidArgument(format!("empty launch {cfg:?}")));
    }
    ensure_addressable(on, &args.spaces())?;
    // SAFETY: forwarded from the caller.
    args.with_params(|params| unsafe { on.launch_params(image, kernel, cfg, params) })
}

impl Launcher for Stream {
    unsafe fn launch_params(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.gpu().function(image, kernel)?;
        f.ensure_dynamic_shared_memory(cfg.shared_mem_bytes)?;
        self.gpu().bind()?;
        // SAFETY: the caller guarantees the parameter list; the driver copies `params`.
        unsafe { result::launch_kernel(f.raw(), cfg.grid, cfg.block, cfg.shared_mem_bytes, self.raw(), params) }
            .during("cuLaunchKernel")
    }

    fn multiprocessors(&self) -> u32 {
        self.gpu().sm_count()
    }

    fn describe(&self) -> String {
        format!("{:?}", self.gpu())
    }

    fn compute_capability(&self) -> Option<(u32, u32)> {
        Some(self.gpu().compute_capability())
    }

    fn max_active_blocks_per_sm(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        block_threads: u32,
        dynamic_smem: u32,
    ) -> Result<u32> {
        self.gpu().function(image, kernel)?.max_active_blocks_per_sm(block_threads, dynamic_smem)
    }

    fn can_address(&self, space: MemSpace) -> bool {
        match space {
            MemSpace::Device(ctx) => ctx == self.gpu().raw_context() as usize,
            MemSpace::Host => false,
            MemSpace::Foreign => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_elements_rounds_up_and_never_empty() {
        assert_eq!(LaunchConfig::for_elements(0, 256).unwrap().grid.0, 1);
        assert_eq!(LaunchConfig::for_elements(257, 256).unwrap().grid.0, 2);
        assert!(LaunchConfig::for_elements(usize::MAX, 1).is_err());
    }

    #[test]
    fn params_point_at_raw_values() {
        // SAFETY: test-only fabricated address, never dereferenced.
        let p = unsafe { DevPtr::<f32>::from_raw(0xdead_beef, 4) };
        (7u32, p, 2.5f32).with_params(|params| {
            assert_eq!(params.len(), 3);
            // SAFETY: each entry points at the raw value of the matching tuple field.
            unsafe {
                assert_eq!(*(params[0] as *const u32), 7);
                assert_eq!(*(params[1] as *const u64), 0xdead_beef);
                assert_eq!(*(params[2] as *const f32), 2.5);
            }
        });
    }
}

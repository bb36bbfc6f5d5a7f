//! The host emulation target: the same kernels, compiled for the CPU, run by
//! `kernels/include/moekit/emu/` (one fiber per CUDA thread, blocks on worker threads).
//!
//! [`Emulator`] is a [`Launcher`] like a GPU [`Stream`](crate::Stream), so a
//! kernel crate's raw launch function runs unchanged on either. Memory is host memory:
//! [`EmuBuffer`] allocations carry guard zones, and every emulated launch checks the guards of
//! every live buffer of its emulator, so a kernel writing out of bounds fails with
//! [`Error::KernelFault`] instead of corrupting the heap silently.

use crate::error::{Error, Result};
use crate::image::KernelImage;
use crate::launch::{LaunchConfig, Launcher};
use crate::memory::{DevPtr, DevPtrMut, MemSpace};
use bytemuck::Pod;
pub use moekit_abi::MoekitEmuLaunch;
use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};

/// Entry point generated for each emulated kernel (see `kernels/include/moekit/abi.h`).
pub type EmuEntry = unsafe extern "C" fn(*const MoekitEmuLaunch, *mut *mut c_void, *mut c_char, u64) -> i32;

/// One kernel of an image, compiled for the host.
#[derive(Debug, Clone, Copy)]
pub struct EmuKernel {
    /// Kernel name, as in the `.cu` source.
    pub name: &'static str,
    /// Launch entry point.
    pub entry: EmuEntry,
}

/// In which order the emulator hands blocks to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOrder {
    /// 0, 1, 2, ...
    InOrder,
    /// Last block first.
    Reversed,
    /// A permutation fixed by the seed.
    Shuffled(u64),
}

struct Registry {
    buffers: Mutex<Vec<Weak<Guarded>>>,
}

/// Runs emulated kernels. Cheap to clone; clones share the buffer registry.
#[derive(Clone)]
pub struct Emulator {
    order: BlockOrder,
    workers: u32,
    stack_bytes: u64,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Emulator({:?}, {} workers)", self.order, self.workers)
    }
}

impl Default for Emulator {
    fn default() -> Self {
        Self::new()
    }
}

impl Emulator {
    /// Blocks in order on two workers (blocks run concurrently), 64 KiB stack per thread.
    pub fn new() -> Self {
        Emulator {
            order: BlockOrder::InOrder,
            workers: 2,
            stack_bytes: 64 << 10,
            registry: Arc::new(Registry { buffers: Mutex::new(Vec::new()) }),
        }
    }
    /// Sets the block order.
    pub fn with_block_order(mut self, order: BlockOrder) -> Self {
        self.order = order;
        self
    }
    /// Sets how many OS threads run blocks concurrently (clamped to 1..=64).
    pub fn with_workers(mut self, workers: u32) -> Self {
        self.workers = workers.clamp(1, 64);
        self
    }
    /// Sets the stack size of each emulated thread (clamped to 16 KiB..=8 MiB; each stack
    /// also gets a guard page, so an overflow faults instead of corrupting memory).
    pub fn with_stack_bytes(mut self, bytes: u64) -> Self {
        self.stack_bytes = bytes.clamp(16 << 10, 8 << 20);
        self
    }
    /// Whether two handles are clones of one emulator (same buffer registry).
    pub fn same_as(&self, other: &Emulator) -> bool {
        Arc::ptr_eq(&self.registry, &other.registry)
    }
    /// The block order.
    pub fn block_order(&self) -> BlockOrder {
        self.order
    }

    /// Checks the guard zones of every live buffer.
    fn check_guards(&self, kernel: &str) -> Result<()> {
        let mut buffers = self.registry.buffers.lock().unwrap_or_else(|p| p.into_inner());
        buffers.retain(|w| w.strong_count() > 0);
        // Check and repair every buffer, so no damage is blamed on a later launch.
        let damage: Vec<String> = buffers
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|g| {
                let at = g.damaged_at()?;
                g.repair();
                Some(format!("a buffer of {} bytes (guard byte at offset {at})", g.len))
            })
            .collect();
        if damage.is_empty() {
            Ok(())
        } else {
            Err(Error::KernelFault(format!("{kernel}: wrote out of bounds of {}", damage.join("; "))))
        }
    }
}

impl Launcher for Emulator {
    /// Runs the kernel's host build to completion, then checks the guard zones of every live
    /// buffer of this emulator.
    unsafe fn launch_params(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let threads = cfg.block.0 as u64 * cfg.block.1 as u64 * cfg.block.2 as u64;
        if threads > 1024 || cfg.shared_mem_bytes > 228 << 10 {
            return Err(Error::InvalidArgument(format!(
                "{kernel}: {threads} threads and {} bytes of shared memory per block (limits 1024, 228 KiB)",
                cfg.shared_mem_bytes
            )));
        }
        let entry = emulated_kernel(image, kernel)?.entry;
        let (order, seed) = match self.order {
            BlockOrder::InOrder => (moekit_abi::MOEKIT_EMU_ORDER_IN_ORDER, 0),
            BlockOrder::Reversed => (moekit_abi::MOEKIT_EMU_ORDER_REVERSED, 0),
            BlockOrder::Shuffled(s) => (moekit_abi::MOEKIT_EMU_ORDER_SHUFFLED, s),
        };
        let launch = MoekitEmuLaunch {
            grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
            block: [cfg.block.0, cfg.block.1, cfg.block.2],
            shared_mem_bytes: cfg.shared_mem_bytes,
            block_order: order as i32,
            seed,
            workers: self.workers,
            _pad: 0,
            stack_bytes: self.stack_bytes,
        };
        let mut err = vec![0u8; 512];
        // SAFETY: `entry` was generated for this kernel and reads `params` as the kernel's
        // argument list (caller's contract); `launch` and `err` outlive the synchronous call.
        let rc = unsafe { entry(&launch, params.as_mut_ptr(), err.as_mut_ptr().cast(), err.len() as u64) };
        let msg = || {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            format!("{kernel}: {}", String::from_utf8_lossy(&err[..end]))
        };
        match rc as u32 {
            x if x == moekit_abi::MOEKIT_EMU_OK => {}
            x if x == moekit_abi::MOEKIT_EMU_BAD_CONFIG => return Err(Error::InvalidArgument(msg())),
            _ => return Err(Error::KernelFault(msg())),
        }
        self.check_guards(kernel)
    }

    fn multiprocessors(&self) -> u32 {
        4
    }

    fn describe(&self) -> String {
        format!("{self:?}")
    }

    fn can_address(&self, space: MemSpace) -> bool {
        !matches!(space, MemSpace::Device(_))
    }

    /// The emulation has no occupancy limit to report: it answers [`EMULATED_BLOCKS_PER_SM`],
    /// so persistent grids are small (4 x 2 blocks) and their grid-stride loops run several
    /// rounds at test sizes. It still checks that `kernel` exists.
    fn max_active_blocks_per_sm(
        &self,
        image: &'static KernelImage,
        kernel: &str,
        _block_threads: u32,
        _dynamic_smem: u32,
    ) -> Result<u32> {
        emulated_kernel(image, kernel)?;
        Ok(EMULATED_BLOCKS_PER_SM)
    }
}

/// The host build of `kernel` in `image`.
fn emulated_kernel(image: &'static KernelImage, kernel: &str) -> Result<&'static EmuKernel> {
    image.emulation().iter().find(|k| k.name == kernel).ok_or_else(|| {
        if image.emulation().is_empty() {
            Error::EmulationNotBuilt { module: image.name() }
        } else {
            Error::InvalidArgument(format!("no kernel `{kernel}` in image `{}`", image.name()))
        }
    })
}

/// What [`Emulator`] reports as resident blocks per multiprocessor.
pub const EMULATED_BLOCKS_PER_SM: u32 = 2;

/// AddressSanitizer's (un)poisoning entry points, when the process has the ASan runtime
/// (kernels built with `MOEKIT_EMU_SANITIZE=address`): guard zones are then poisoned, so an
/// instrumented kernel that *reads* them is reported too, not only one that writes them.
fn asan() -> Option<(PoisonFn, PoisonFn)> {
    static FNS: std::sync::OnceLock<Option<(PoisonFn, PoisonFn)>> = std::sync::OnceLock::new();
    *FNS.get_or_init(|| {
        // SAFETY: dlsym on the global namespace with NUL-terminated names; a non-null result is
        // ASan's `void (void const volatile *addr, size_t size)` function.
        unsafe {
            let poison = libc::dlsym(libc::RTLD_DEFAULT, c"__asan_poison_memory_region".as_ptr());
            let unpoison = libc::dlsym(libc::RTLD_DEFAULT, c"__asan_unpoison_memory_region".as_ptr());
            (!poison.is_null() && !unpoison.is_null()).then(|| {
                (
                    std::mem::transmute::<*mut c_void, PoisonFn>(poison),
                    std::mem::transmute::<*mut c_void, PoisonFn>(unpoison),
                )
            })
        }
    })
}
type PoisonFn = unsafe extern "C" fn(*const c_void, usize);

/// Whether this process runs with AddressSanitizer (emulated kernels built with
/// `MOEKIT_EMU_SANITIZE=address`); buffer guard zones are then poisoned.
pub fn asan_active() -> bool {
    asan().is_some()
}

const GUARD: usize = 4096;
const GUARD_BYTE: u8 = 0xA5;

/// A guarded host allocation, 256-byte aligned like `cuMemAlloc`:
/// `GUARD` bytes | `len` data bytes | `GUARD` bytes.
struct Guarded {
    base: *mut u8,
    layout: std::alloc::Layout,
    len: usize,
}

// SAFETY: `base` is an allocation owned by this value; access to the bytes is ordered by the
// caller (kernels run synchronously inside `launch_params`).
unsafe impl Send for Guarded {}
// SAFETY: as above.
unsafe impl Sync for Guarded {}

impl Guarded {
    fn new(len: usize) -> Result<Arc<Guarded>> {
        let too_big = || Error::Shape(format!("{len} bytes overflow"));
        let total = len.checked_add(2 * GUARD).ok_or_else(too_big)?;
        let layout = std::alloc::Layout::from_size_align(total, 256).map_err(|_| too_big())?;
        // SAFETY: `layout` has a non-zero size (at least 2 * GUARD).
        let base = unsafe { std::alloc::alloc(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: all three ranges lie inside the fresh allocation of `total` bytes.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(base.add(GUARD), 0, len);
            std::ptr::write_bytes(base.add(GUARD + len), GUARD_BYTE, GUARD);
        }
        let g = Guarded { base, layout, len };
        g.set_poison(true);
        Ok(Arc::new(g))
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: GUARD < allocation size.
        unsafe { self.base.add(GUARD) }
    }
    /// Poisons (or unpoisons) both guards for ASan, when it is present.
    fn set_poison(&self, poisoned: bool) {
        if let Some((poison, unpoison)) = asan() {
            let f = if poisoned { poison } else { unpoison };
            // SAFETY: both ranges lie inside our allocation; the functions only mark shadow bytes.
            unsafe {
                f(self.base.cast(), GUARD);
                f(self.base.add(GUARD + self.len).cast(), GUARD);
            }
        }
    }

    fn guard(&self, before: bool) -> &[u8] {
        let start = if before { 0 } else { GUARD + self.len };
        // SAFETY: each guard is GUARD initialised bytes inside the allocation.
        unsafe { std::slice::from_raw_parts(self.base.add(start), GUARD) }
    }
    /// Offset (relative to the data start) of the first damaged guard byte, if any.
    fn damaged_at(&self) -> Option<isize> {
        self.set_poison(false);
        let damaged = self.find_damage();
        self.set_poison(true);
        damaged
    }
    fn find_damage(&self) -> Option<isize> {
        let before = self.guard(true).iter().position(|&b| b != GUARD_BYTE).map(|i| i as isize - GUARD as isize);
        before.or_else(|| self.guard(false).iter().position(|&b| b != GUARD_BYTE).map(|i| (self.len + i) as isize))
    }
    fn repair(&self) {
        self.set_poison(false);
        // SAFETY: both guard ranges lie inside the allocation.
        unsafe {
            std::ptr::write_bytes(self.base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(self.base.add(GUARD + self.len), GUARD_BYTE, GUARD);
        }
        self.set_poison(true);
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.set_poison(false);
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.base, self.layout) };
    }
}

/// Host memory for emulated kernels, zero-initialised, 256-byte aligned, with guard zones
/// checked after every launch of the emulator that allocated it.
pub struct EmuBuffer<T: Pod> {
    mem: Arc<Guarded>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for EmuBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmuBuffer<{}>(len {})", std::any::type_name::<T>(), self.len)
    }
}

impl<T: Pod> EmuBuffer<T> {
    /// `len` zeroed elements, registered with `emu` for guard checks.
    pub fn zeros(emu: &Emulator, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Shape(format!("{len} elements overflow")))?;
        let mem = Guarded::new(bytes)?;
        emu.registry.buffers.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&mem));
        Ok(EmuBuffer { mem, len, _t: PhantomData })
    }
    /// A copy of `data`.
    pub fn from_host(emu: &Emulator, data: &[T]) -> Result<Self> {
        let mut b = Self::zeros(emu, data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the data range holds `len` initialised, suitably aligned (256) elements.
        unsafe { std::slice::from_raw_parts(self.mem.data().cast::<T>(), self.len) }
    }
    /// The elements, writable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.mem.data().cast::<T>(), self.len) }
    }
    /// Read-only kernel argument for elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Result<DevPtr<'_, T>> {
        self.check_range(start, len)?;
        // SAFETY: the range is inside the buffer, which outlives the returned borrow.
        Ok(unsafe { DevPtr::from_raw_in(self.mem.data().cast::<T>().add(start) as u64, len, MemSpace::Host) })
    }
    /// Writable kernel argument for elements `start..start + len`.
    pub fn slice_mut(&mut self, start: usize, len: usize) -> Result<DevPtrMut<'_, T>> {
        self.check_range(start, len)?;
        // SAFETY: the range is inside the buffer, exclusively borrowed for the result's life.
        Ok(unsafe { DevPtrMut::from_raw_in(self.mem.data().cast::<T>().add(start) as u64, len, MemSpace::Host) })
    }
    /// Whole-buffer read-only argument.
    pub fn view(&self) -> DevPtr<'_, T> {
        // SAFETY: covers exactly the buffer.
        unsafe { DevPtr::from_raw_in(self.mem.data() as u64, self.len, MemSpace::Host) }
    }
    /// Whole-buffer writable argument.
    pub fn view_mut(&mut self) -> DevPtrMut<'_, T> {
        // SAFETY: covers exactly the buffer, exclusively borrowed.
        unsafe { DevPtrMut::from_raw_in(self.mem.data() as u64, self.len, MemSpace::Host) }
    }
    fn check_range(&self, start: usize, len: usize) -> Result<()> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Shape(format!("range {start}..{start}+{len} outside a buffer of {}", self.len))),
        }
    }
}

// ---- TMA tensor maps -------------------------------------------------------------------------

/// Element type of a tiled tensor map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmaElem {
    /// 1-byte elements (FP8 codes).
    U8,
    /// 2-byte BF16.
    Bf16,
    /// 4-byte f32.
    F32,
}

impl TmaElem {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            TmaElem::U8 => 1,
            TmaElem::Bf16 => 2,
            TmaElem::F32 => 4,
        }
    }
}

/// Shared-memory swizzle of a TMA box (the 16-byte chunk index within each 32/64/128-byte
/// span XOR shared-address bits 7-7/7-8/7-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmaSwizzle {
    /// Row-major box, no swizzle.
    None,
    /// 32-byte swizzle.
    B32,
    /// 64-byte swizzle.
    B64,
    /// 128-byte swizzle.
    B128,
}

impl TmaSwizzle {
    /// The swizzle span in bytes (0 for none).
    pub fn bytes(self) -> u64 {
        match self {
            TmaSwizzle::None => 0,
            TmaSwizzle::B32 => 32,
            TmaSwizzle::B64 => 64,
            TmaSwizzle::B128 => 128,
        }
    }
}

/// Magic word 0 of an emulator tensor map ("MOEKTMAP"; `kTmapMagic` in
/// `kernels/include/moekit/emu/sm90.h`).
pub const EMU_TMAP_MAGIC: u64 = 0x4d4f_454b_544d_4150;

/// A tiled TMA tensor map, described once by the parameters `cuTensorMapEncodeTiled` takes
/// (element strides 1, no interleave, out-of-bounds elements read as zeros, 256-byte L2
/// promotion), and encoded by [`TensorMapSpec::encode`] for the launcher at hand: the
/// driver's opaque `CUtensorMap` on a GPU, the emulator's documented layout in the host
/// emulation, so both run the same Rust code path with the same parameters.
///
/// Emulator layout (128 bytes as 16 little-endian u64 words; read by
/// `kernels/include/moekit/emu/sm90.h`): word 0 [`EMU_TMAP_MAGIC`]; 1 global address; 2 rank
/// (bits 0-7), element bytes (8-15), swizzle bytes (16-23), interleave (24-31, 0), out-of-bounds
/// fill (32-39, 0 = zeros); 3-7 dims 0..4 (elements); 8-11 byte strides of dims 1..4; 12 box
/// dims 0..3 (16 bits each); 13 box dim 4 (bits 0-15) and element strides 0..4 (8 bits each
/// from bit 16).
#[derive(Debug, Clone, Copy)]
pub struct TensorMapSpec<'a> {
    /// Global address of element 0 (16-byte aligned).
    pub addr: u64,
    /// Element type.
    pub elem: TmaElem,
    /// Global dims, innermost first (1 to 5 of them, each 1..=2^32).
    pub dims: &'a [u64],
    /// Byte strides of dims 1.. (`dims.len() - 1` of them, multiples of 16 below 2^40).
    pub strides_bytes: &'a [u64],
    /// Box dims in elements, innermost first (each 1..=256; the innermost a multiple of 16
    /// bytes and, when swizzled, at most the swizzle span).
    pub boxes: &'a [u32],
    /// Shared-memory swizzle.
    pub swizzle: TmaSwizzle,
}

impl TensorMapSpec<'_> {
    /// The driver's documented constraints (the same outcome on every device), plus, for the
    /// emulator only, what its TMA model covers (`emulated`): a swizzled box's inner dim spans
    /// exactly the swizzle width.
    pub fn check(&self, emulated: bool) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("tensor map {self:?}: {why}")));
        let rank = self.dims.len();
        if !(1..=5).contains(&rank) || self.boxes.len() != rank || self.strides_bytes.len() + 1 != rank {
            return bad("rank 1..=5 with one box dim per dim and a stride per dim above the first".into());
        }
        if self.addr % 16 != 0 {
            return bad("global address not 16-byte aligned".into());
        }
        if self.dims.iter().any(|&d| d == 0 || d > 1 << 32) {
            return bad("dims must be in 1..=2^32".into());
        }
        if self.strides_bytes.iter().any(|&s| s % 16 != 0 || s >= 1 << 40) {
            return bad("strides must be multiples of 16 below 2^40".into());
        }
        if self.boxes.iter().any(|&b| b == 0 || b > 256) {
            return bad("box dims must be in 1..=256".into());
        }
        let inner = self.boxes[0] as u64 * self.elem.bytes();
        if inner % 16 != 0 {
            return bad("the inner box dim must span a multiple of 16 bytes".into());
        }
        let sw = self.swizzle.bytes();
        if sw != 0 && inner > sw {
            return bad(format!("the inner box dim spans {inner} bytes, more than the {sw}-byte swizzle"));
        }
        if emulated && sw != 0 && inner != sw {
            return bad(format!("the emulation models swizzled boxes whose inner dim spans the swizzle ({sw} bytes)"));
        }
        Ok(())
    }

    /// The tensor map for kernels launched on `on` (the host emulation when it reports no
    /// compute capability).
    pub fn encode(&self, on: &dyn Launcher) -> Result<moekit_abi::MoekitTensorMap> {
        let emulated = on.compute_capability().is_none();
        self.check(emulated)?;
        if emulated {
            Ok(self.encode_emulated())
        } else {
            self.encode_driver()
        }
    }

    /// The emulator's layout (see the type docs); `check(true)` must have passed.
    pub fn encode_emulated(&self) -> moekit_abi::MoekitTensorMap {
        let mut w = [0u64; 16];
        w[0] = EMU_TMAP_MAGIC;
        w[1] = self.addr;
        w[2] = self.dims.len() as u64 | (self.elem.bytes() << 8) | (self.swizzle.bytes() << 16);
        for (i, &d) in self.dims.iter().enumerate() {
            w[3 + i] = d;
        }
        for (i, &s) in self.strides_bytes.iter().enumerate() {
            w[8 + i] = s;
        }
        for (i, &b) in self.boxes.iter().enumerate() {
            if i < 4 {
                w[12] |= (b as u64) << (16 * i);
            } else {
                w[13] |= b as u64;
            }
        }
        for i in 0..self.dims.len() {
            w[13] |= 1 << (16 + 8 * i); // element strides: 1
        }
        moekit_abi::MoekitTensorMap { opaque: w }
    }

    fn encode_driver(&self) -> Result<moekit_abi::MoekitTensorMap> {
        use crate::sys;
        let dtype = match self.elem {
            TmaElem::U8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            TmaElem::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            TmaElem::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        };
        let swizzle = match self.swizzle {
            TmaSwizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            TmaSwizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            TmaSwizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            TmaSwizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        };
        let ones = vec![1u32; self.dims.len()];
        let mut map = moekit_abi::MoekitTensorMap::default();
        const _: () =
            assert!(std::mem::size_of::<moekit_abi::MoekitTensorMap>() == std::mem::size_of::<sys::CUtensorMap>());
        // SAFETY: MoekitTensorMap is 128 bytes, 64-byte aligned: the layout of CUtensorMap
        // (asserted above; moekit-abi's layout test checks the C header). The pointers
        // reference live slices of rank (dims, boxes, ones) and rank - 1 (strides) elements
        // (checked); the call only encodes, it does not touch `addr`.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                (&mut map as *mut moekit_abi::MoekitTensorMap).cast::<sys::CUtensorMap>(),
                dtype,
                self.dims.len() as u32,
                self.addr as *mut c_void,
                self.dims.as_ptr(),
                self.strides_bytes.as_ptr(),
                self.boxes.as_ptr(),
                ones.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::InvalidArgument(format!("cuTensorMapEncodeTiled failed ({r:?}) for {self:?}")));
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tensor_map_tests {
    use super::*;

    #[test]
    fn emulator_layout_and_checks() {
        let dims = [256u64, 300, 3];
        let strides = [512u64, 512 * 300];
        let s = TensorMapSpec {
            addr: 0x1000,
            elem: TmaElem::Bf16,
            dims: &dims,
            strides_bytes: &strides,
            boxes: &[64, 128, 1],
            swizzle: TmaSwizzle::B128,
        };
        s.check(true).unwrap();
        let w = s.encode_emulated().opaque;
        assert_eq!(w[0], EMU_TMAP_MAGIC);
        assert_eq!(w[1], 0x1000);
        assert_eq!(w[2], 3 | (2 << 8) | (128 << 16));
        assert_eq!(&w[3..6], &dims);
        assert_eq!(&w[8..10], &strides);
        assert_eq!(w[12], 64 | (128 << 16) | (1 << 32));
        assert_eq!(w[13], (1 << 16) | (1 << 24) | (1 << 32));
        let e = Emulator::new();
        assert_eq!(s.encode(&e).unwrap().opaque, w);
        // The driver's constraints, on every target.
        assert!(TensorMapSpec { addr: 0x1008, ..s }.check(false).is_err());
        assert!(TensorMapSpec { strides_bytes: &[520, 520 * 300], ..s }.check(false).is_err());
        assert!(TensorMapSpec { boxes: &[128, 128, 1], ..s }.check(false).is_err(), "256 bytes > 128B swizzle");
        assert!(TensorMapSpec { boxes: &[4, 128, 1], ..s }.check(false).is_err(), "8 bytes inner");
        assert!(TensorMapSpec { boxes: &[64, 257, 1], ..s }.check(false).is_err());
        // What only the emulation's model restricts.
        let narrow = TensorMapSpec { boxes: &[32, 128, 1], ..s };
        assert!(narrow.check(false).is_ok() && narrow.check(true).is_err());
    }
}

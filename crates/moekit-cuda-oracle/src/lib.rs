//! CUDA's own host-side FP8/BF16 conversions, for bit-exact comparison in
//! tests.
//!
//! At build time this crate looks for CUDA's headers (`cuda_fp8.h`; see
//! `build.rs` for the search order) and compiles a tiny C++ shim with the host
//! compiler. Without `__CUDA_ARCH__`, the header functions take their portable
//! software paths, which NVIDIA specifies to match the hardware conversions.
//! No GPU, driver or CUDA library is needed at run time.
//!
//! When the headers are not found the crate still builds: [`available`]
//! returns `false` and every conversion returns `None`. Tests should start
//! with [`require_or_skip`], which prints a visible `SKIPPED` line in that
//! case, and fails instead when `MOEKIT_REQUIRE_KERNELS=1`.
//!
//! All FP8 encoders use CUDA's `__NV_SATFINITE` mode. FP8 decoders go
//! fp8 → half → float, like CUDA's own `operator float()` on
//! `__nv_fp8_e4m3` / `__nv_fp8_e5m2`.
//!
//! It also exposes [`abi_c_layout`]: the C compiler's layout of the kernel ABI structs.
//!
//! This crate is test-only (`publish = false`).

use std::io::Write;

#[cfg(moekit_cuda_oracle)]
mod ffi {
    extern "C" {
        pub fn moekit_oracle_f32_to_e4m3(x: f32) -> u8;
        pub fn moekit_oracle_f32_to_e5m2(x: f32) -> u8;
        pub fn moekit_oracle_bf16bits_to_e4m3(bits: u16) -> u8;
        pub fn moekit_oracle_bf16bits_to_e5m2(bits: u16) -> u8;
        pub fn moekit_oracle_e4m3_to_f32(code: u8) -> f32;
        pub fn moekit_oracle_e5m2_to_f32(code: u8) -> f32;
        pub fn moekit_oracle_f32_to_bf16_rn(x: f32) -> u16;

        pub fn moekit_oracle_f32_to_e4m3_n(src: *const f32, dst: *mut u8, n: usize);
        pub fn moekit_oracle_f32_to_e5m2_n(src: *const f32, dst: *mut u8, n: usize);
        pub fn moekit_oracle_bf16bits_to_e4m3_n(src: *const u16, dst: *mut u8, n: usize);
        pub fn moekit_oracle_bf16bits_to_e5m2_n(src: *const u16, dst: *mut u8, n: usize);
        pub fn moekit_oracle_e4m3_to_f32_n(src: *const u8, dst: *mut f32, n: usize);
        pub fn moekit_oracle_e5m2_to_f32_n(src: *const u8, dst: *mut f32, n: usize);
        pub fn moekit_oracle_f32_to_bf16_rn_n(src: *const f32, dst: *mut u16, n: usize);
    }
}

extern "C" {
    static moekit_abi_c_layout: [usize; 0];
    static moekit_abi_c_layout_len: usize;
}

/// Sizes, alignments and field offsets of the ABI structs (`kernels/include/moekit/abi.h`) as
/// the C compiler lays them out, in the order of `moekit_abi::layout::RUST_LAYOUT`. Always
/// available (needs only a C compiler, not CUDA).
pub fn abi_c_layout() -> &'static [usize] {
    // SAFETY: `layout_probe.c` defines `moekit_abi_c_layout` as an immutable array of
    // `moekit_abi_c_layout_len` size_t values (usize on every target Rust and C share) that
    // lives for the whole program.
    unsafe {
        std::slice::from_raw_parts(std::ptr::addr_of!(moekit_abi_c_layout).cast::<usize>(), moekit_abi_c_layout_len)
    }
}

/// Whether the oracle was compiled in (CUDA headers were found at build time).
pub const fn available() -> bool {
    cfg!(moekit_cuda_oracle)
}

/// The CUDA include directory the oracle was compiled against, if any.
pub const fn include_dir() -> Option<&'static str> {
    option_env!("MOEKIT_CUDA_ORACLE_INCLUDE")
}

/// Whether the environment demands real CUDA checks (`MOEKIT_REQUIRE_KERNELS=1`).
pub fn kernels_required() -> bool {
    std::env::var("MOEKIT_REQUIRE_KERNELS").is_ok_and(|v| v.trim() == "1")
}

/// Gate for a test that needs the oracle.
///
/// Returns `true` if the oracle is available. Otherwise:
/// - panics (failing the test) if `MOEKIT_REQUIRE_KERNELS=1`;
/// - else writes `SKIPPED: CUDA headers not found (<test_name>) ...` to stderr
///   and returns `false`; the caller should then return early (pass).
///
/// The message is written straight to the process's stderr rather than via
/// `eprintln!`, so the test harness does not capture it and it is visible in
/// a normal `cargo test` run.
pub fn require_or_skip(test_name: &str) -> bool {
    if available() {
        return true;
    }
    if kernels_required() {
        panic!(
            "{test_name}: MOEKIT_REQUIRE_KERNELS=1 but moekit-cuda-oracle was built without CUDA \
             headers; run `cargo xtask setup` or set MOEKIT_CUDA_INCLUDE / CUDA_HOME"
        );
    }
    // One write call, so parallel tests do not interleave inside the line.
    let line = format!(
        "SKIPPED: CUDA headers not found ({test_name}); run `cargo xtask setup` or set \
         MOEKIT_CUDA_INCLUDE / CUDA_HOME to compare against CUDA\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// Defines a scalar wrapper `pub fn $name($arg: $in) -> Option<$out>`.
macro_rules! scalar {
    ($(#[$doc:meta])* $name:ident, $ffi:ident, $arg:ident: $in:ty => $out:ty) => {
        $(#[$doc])*
        pub fn $name($arg: $in) -> Option<$out> {
            #[cfg(moekit_cuda_oracle)]
            {
                // SAFETY: the C function takes its argument by value, touches
                // no memory besides its locals, and is defined for every bit
                // pattern of the argument.
                Some(unsafe { ffi::$ffi($arg) })
            }
            #[cfg(not(moekit_cuda_oracle))]
            {
                let _ = $arg;
                None
            }
        }
    };
}

/// Defines a batched wrapper `pub fn $name(src: &[$in]) -> Option<Vec<$out>>`.
macro_rules! batch {
    ($(#[$doc:meta])* $name:ident, $ffi:ident, $in:ty => $out:ty) => {
        $(#[$doc])*
        pub fn $name(src: &[$in]) -> Option<Vec<$out>> {
            #[cfg(moekit_cuda_oracle)]
            {
                let mut dst: Vec<$out> = vec![<$out>::default(); src.len()];
                // SAFETY: `src` is valid for `src.len()` reads and `dst` (a
                // fresh allocation of the same length) for `src.len()` writes;
                // they cannot overlap. The C loop reads/writes exactly
                // `n` elements and keeps no pointer after returning.
                unsafe { ffi::$ffi(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
                Some(dst)
            }
            #[cfg(not(moekit_cuda_oracle))]
            {
                let _ = src;
                None
            }
        }
    };
}

scalar!(
    /// CUDA `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`.
    f32_to_e4m3, moekit_oracle_f32_to_e4m3, x: f32 => u8
);
scalar!(
    /// CUDA `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2)`.
    f32_to_e5m2, moekit_oracle_f32_to_e5m2, x: f32 => u8
);
scalar!(
    /// CUDA `__nv_cvt_bfloat16raw_to_fp8(bits, __NV_SATFINITE, __NV_E4M3)`.
    bf16bits_to_e4m3, moekit_oracle_bf16bits_to_e4m3, bits: u16 => u8
);
scalar!(
    /// CUDA `__nv_cvt_bfloat16raw_to_fp8(bits, __NV_SATFINITE, __NV_E5M2)`.
    bf16bits_to_e5m2, moekit_oracle_bf16bits_to_e5m2, bits: u16 => u8
);
scalar!(
    /// CUDA `__half2float(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3))`.
    e4m3_to_f32, moekit_oracle_e4m3_to_f32, code: u8 => f32
);
scalar!(
    /// CUDA `__half2float(__nv_cvt_fp8_to_halfraw(code, __NV_E5M2))`.
    e5m2_to_f32, moekit_oracle_e5m2_to_f32, code: u8 => f32
);
scalar!(
    /// CUDA `__float2bfloat16_rn(x)`, as raw bf16 bits.
    f32_to_bf16_rn, moekit_oracle_f32_to_bf16_rn, x: f32 => u16
);

batch!(
    /// Batched [`f32_to_e4m3`].
    f32_to_e4m3_batch, moekit_oracle_f32_to_e4m3_n, f32 => u8
);
batch!(
    /// Batched [`f32_to_e5m2`].
    f32_to_e5m2_batch, moekit_oracle_f32_to_e5m2_n, f32 => u8
);
batch!(
    /// Batched [`bf16bits_to_e4m3`].
    bf16bits_to_e4m3_batch, moekit_oracle_bf16bits_to_e4m3_n, u16 => u8
);
batch!(
    /// Batched [`bf16bits_to_e5m2`].
    bf16bits_to_e5m2_batch, moekit_oracle_bf16bits_to_e5m2_n, u16 => u8
);
batch!(
    /// Batched [`e4m3_to_f32`].
    e4m3_to_f32_batch, moekit_oracle_e4m3_to_f32_n, u8 => f32
);
batch!(
    /// Batched [`e5m2_to_f32`].
    e5m2_to_f32_batch, moekit_oracle_e5m2_to_f32_n, u8 => f32
);
batch!(
    /// Batched [`f32_to_bf16_rn`].
    f32_to_bf16_rn_batch, moekit_oracle_f32_to_bf16_rn_n, f32 => u16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_means_none() {
        if available() {
            assert!(include_dir().is_some());
            return;
        }
        assert_eq!(f32_to_e4m3(1.0), None);
        assert_eq!(f32_to_e4m3_batch(&[1.0]), None);
        assert_eq!(e5m2_to_f32(0x3C), None);
        assert_eq!(f32_to_bf16_rn(1.0), None);
    }

    #[test]
    fn smoke() {
        if !require_or_skip("moekit-cuda-oracle::smoke") {
            return;
        }
        assert_eq!(f32_to_e4m3(1.0), Some(0x38));
        assert_eq!(f32_to_e5m2(1.0), Some(0x3C));
        assert_eq!(bf16bits_to_e4m3(0x3F80), Some(0x38));
        assert_eq!(bf16bits_to_e5m2(0x3F80), Some(0x3C));
        assert_eq!(e4m3_to_f32(0x7E), Some(448.0));
        assert_eq!(e5m2_to_f32(0x7B), Some(57344.0));
        assert_eq!(f32_to_bf16_rn(1.0), Some(0x3F80));
        // Batched forms agree with the scalar forms, including empty input.
        let xs = [0.0f32, -1.5, 300.0, f32::INFINITY, f32::NAN, 1e-3];
        let b = f32_to_e4m3_batch(&xs).unwrap();
        for (x, c) in xs.iter().zip(&b) {
            assert_eq!(f32_to_e4m3(*x), Some(*c));
        }
        assert_eq!(f32_to_e5m2_batch(&[]), Some(vec![]));
        assert_eq!(f32_to_bf16_rn_batch(&[1.0, 2.0]), Some(vec![0x3F80, 0x4000]));
        assert_eq!(bf16bits_to_e4m3_batch(&[0x3F80]), Some(vec![0x38]));
        assert_eq!(bf16bits_to_e5m2_batch(&[0x3F80]), Some(vec![0x3C]));
        assert_eq!(e4m3_to_f32_batch(&[0x38]), Some(vec![1.0]));
        assert_eq!(e5m2_to_f32_batch(&[0x3C]), Some(vec![1.0]));
    }
}

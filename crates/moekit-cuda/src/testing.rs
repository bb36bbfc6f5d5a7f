//! Helpers for GPU tests: skip visibly without a GPU, fail when one is required.
//!
//! `MOEKIT_REQUIRE_GPU=1` turns every skip into a failure (the GPU bundle sets it), so a GPU
//! run can never pass by skipping.

use crate::{Error, Gpu, KernelImage};

/// Whether `MOEKIT_REQUIRE_GPU=1`.
pub fn gpu_required() -> bool {
    std::env::var("MOEKIT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Returns device 0 if there is one and `images` are built. Otherwise prints
/// `SKIPPED <test>: <why>` to stderr and returns `None`, or panics when `MOEKIT_REQUIRE_GPU=1`.
/// A GPU that is present while the kernels are not built is always a failure.
pub fn gpu_or_skip(test: &str, images: &[&KernelImage]) -> Option<Gpu> {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        // No driver, no device, a stub driver library, a driver too old, no device nodes in a
        // container: all mean "no usable GPU here".
        Err(e @ (Error::NoDriver | Error::NoDevice { .. } | Error::Cuda { .. })) => {
            assert!(!gpu_required(), "{test}: MOEKIT_REQUIRE_GPU=1 but no usable GPU: {e}");
            skip_notice(test, &e.to_string());
            return None;
        }
        Err(e) => panic!("{test}: GPU present but unusable: {e}"),
    };
    if let Some(missing) = images.iter().find(|i| !i.is_built()) {
        panic!("{test}: a GPU is present but kernel image `{}` was not built (no nvcc at build time)", missing.name());
    }
    Some(gpu)
}

/// Prints `SKIPPED <test>: <why>` to the real stderr. The test harness captures `eprintln!`
/// of passing tests, so this writes to the stream directly: a skip is always visible.
pub fn skip_notice(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Returns an emulator (blocks in `order`) if `images` have host builds. Otherwise prints
/// `SKIPPED <test>: ...` and returns `None`, or panics when `MOEKIT_REQUIRE_KERNELS=1` (CI),
/// where a missing host build means the pipeline is broken.
pub fn emulator_or_skip(test: &str, images: &[&KernelImage], order: crate::BlockOrder) -> Option<crate::Emulator> {
    if let Some(missing) = images.iter().find(|i| i.emulation().is_empty()) {
        let why =
            format!("kernel image `{}` has no host emulation build (no CUDA headers at build time)", missing.name());
        assert!(
            !std::env::var("MOEKIT_REQUIRE_KERNELS").is_ok_and(|v| v == "1"),
            "{test}: MOEKIT_REQUIRE_KERNELS=1 but {why}"
        );
        skip_notice(test, &why);
        return None;
    }
    Some(crate::Emulator::new().with_block_order(order))
}

//! Shared by the integration tests that drive the built library from outside Rust.
#![allow(dead_code)] // each test binary uses a part of it

use std::path::PathBuf;

/// The directory of this build's `libmoekit_capi.so`: `target/<profile>/deps`, beside the test
/// binary, where cargo builds the cdylib before any test target. (The copy one level up is
/// refreshed only by a build of the library itself, so it can be stale during `cargo test`.)
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("target/<profile>/deps").to_path_buf();
    let so = dir.join("libmoekit_capi.so");
    assert!(so.is_file(), "{} is missing: cargo builds the cdylib with the test", so.display());
    dir
}

/// Whether this run is CI (`CI=true`), where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A skip: `SKIPPED <test>: <why>` on the real stderr, or a failure in CI.
pub fn skip(test: &str, why: &str) {
    assert!(!in_ci(), "{test}: CI=true but {why}");
    moekit_cuda::testing::skip_notice(test, why);
}

/// A fresh scratch directory for one test process.
pub fn scratch(name: &str) -> PathBuf {
    let d = lib_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

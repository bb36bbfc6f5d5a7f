//! Shared by the integration tests that drive the built library from outside Rust.

use std::path::PathBuf;

/// The directory cargo put this build's `libmoekit_capi.so` in (the test binary lives in its
/// `deps/`): the library built from the same sources, before any test target.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").to_path_buf();
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

//! Runs the Python module's tests (`python/tests`, plain `python3 -m unittest`) against the
//! library this build made. numpy comes from the project's venv (`cargo xtask setup` installs
//! it, pinned) or the system's python3; without numpy the test is skipped visibly, and fails
//! under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A python3 that imports numpy: the project venv's first, then `python3` on PATH.
fn python_with_numpy(root: &Path) -> Option<PathBuf> {
    let venv = root.join(".cuda-toolchain/bin/python3");
    [venv, PathBuf::from("python3")]
        .into_iter()
        .find(|py| Command::new(py).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn python_module_tests_pass_on_numpy() {
    let test = "python_module_tests_pass_on_numpy";
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Some(python) = python_with_numpy(&root) else {
        return common::skip(test, "no python3 with numpy (run `cargo xtask setup`)");
    };
    let lib = common::lib_dir().join("libmoekit_capi.so");
    let run = Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(root.join("python/tests"))
        .env("MOEKIT_LIB", &lib)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3");
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    // unittest reports on stderr: show every test and skip.
    eprint!("{err}");
    assert!(run.status.success(), "python tests failed ({}):\n{out}{err}", run.status);
    assert!(err.contains("test_route_matches_the_documented_example") && err.contains("\nOK"), "{err}");
    if common::in_ci() && std::env::var("MOEKIT_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(!err.contains("the emulation is not built"), "emulated Python tests skipped in CI:\n{err}");
    }
}

/// `benches/torch_side_by_side.py --cpu-smoke` (tiny shapes on CPU tensors, every check, no
/// timing) against this build's library, with `$MOEKIT_TORCH_PYTHON` or a python3 that imports
/// torch; skipped visibly without one (CI has no torch, so this never fails there for lack of it).
#[test]
fn torch_side_by_side_cpu_smoke() {
    let test = "torch_side_by_side_cpu_smoke";
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = std::env::var_os("MOEKIT_TORCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join(".cuda-toolchain/bin/python3"), PathBuf::from("python3")]);
    let imports =
        |py: &PathBuf| Command::new(py).args(["-c", "import numpy, torch"]).output().is_ok_and(|o| o.status.success());
    let Some(python) = candidates.into_iter().find(imports) else {
        return moekit_cuda::testing::skip_notice(test, "no python3 with torch and numpy (set MOEKIT_TORCH_PYTHON)");
    };
    let run = Command::new(&python)
        .arg(root.join("benches/torch_side_by_side.py"))
        .arg("--cpu-smoke")
        .env("MOEKIT_LIB", common::lib_dir().join("libmoekit_capi.so"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3");
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    eprint!("{out}{err}");
    assert!(run.status.success() && out.contains("all checks passed"), "side-by-side smoke failed ({})", run.status);
}

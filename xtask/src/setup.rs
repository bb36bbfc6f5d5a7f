//! `setup`: every tool the project's build and tests need beyond Rust and python3, from pinned
//! PyPI wheels into the project-local venv `.cuda-toolchain/`. No system package manager.
//!
//! Two pinned sets, each with its own stamp so that changing one does not reinstall the other:
//! - the CUDA 13.0 compiler (nvcc, ptxas, cuobjdump and headers) for the kernels;
//! - libclang, for bindgen in `cargo xtask codegen`;
//! - numpy, for the tests of the Python module (`python/`, run by moekit-capi's tests).

use crate::{root, run};
use moekit_build::{find_nvcc, local_cuda_root, Toolchain, LOCAL_TOOLCHAIN_DIR};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned CUDA wheels. CUDA 13.0 matches the driver of the GPU machine we test on; the
/// nvvm pin matters (a newer nvvm emits PTX that the 13.0 ptxas rejects); cuobjdump needs
/// nvdisasm beside it.
pub const CUDA_PINS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvdisasm==13.2.86",
    "nvidia-cuda-cuobjdump",
];

/// The pinned libclang wheel: a self-contained `libclang.so` (it links only libc, libm,
/// libdl, librt and libpthread) at `site-packages/clang/native/libclang.so`.
pub const LIBCLANG_PINS: &[&str] = &["libclang==18.1.1"];

/// The pinned numpy the Python module's tests run on (ctypes over moekit-capi; no torch).
pub const PYTHON_TEST_PINS: &[&str] = &["numpy==2.2.6"];

const CUDA_STAMP: &str = "moekit-pins.txt";
const PYTHON_TEST_STAMP: &str = "moekit-python-test-pins.txt";
const LIBCLANG_STAMP: &str = "moekit-libclang-pins.txt";

/// The project-local venv.
pub fn venv() -> PathBuf {
    root().join(LOCAL_TOOLCHAIN_DIR)
}

/// `cargo xtask setup`: installs (or confirms) both pinned sets. Idempotent and quick when
/// everything is already installed.
pub fn setup() -> Result<(), String> {
    setup_cuda()?;
    let libclang = setup_libclang()?;
    eprintln!("xtask: libclang ready: {}", libclang.display());
    setup_python_tests()
}

/// Installs the pinned numpy into the venv unless it is already there: `cargo test` runs the
/// Python module's tests with the venv's python3 (and fails without numpy under `CI=true`).
pub fn setup_python_tests() -> Result<(), String> {
    let venv = venv();
    let python = venv.join("bin").join("python3");
    let present = Command::new(&python).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    install_pins(&venv, PYTHON_TEST_PINS, PYTHON_TEST_STAMP, present)?;
    eprintln!("xtask: numpy ready for the Python tests ({})", python.display());
    Ok(())
}

/// Installs the pinned CUDA toolchain unless the same pins are already installed. Returns it.
pub fn setup_cuda() -> Result<Toolchain, String> {
    let venv = venv();
    if install_pins(&venv, CUDA_PINS, CUDA_STAMP, local_cuda_root(&venv).is_some())? {
        // Tell build scripts that ran without a toolchain to look again.
        let build_stamp = moekit_build::toolchain_stamp(&root().join("target").join("moekit-kernel-cache"));
        std::fs::create_dir_all(build_stamp.parent().unwrap_or(&venv)).map_err(|e| e.to_string())?;
        std::fs::write(&build_stamp, CUDA_PINS.join("\n")).map_err(|e| e.to_string())?;
    }
    let cuda = local_cuda_root(&venv)
        .ok_or("the CUDA wheels installed but nvcc is not where expected (nvidia/cu13/bin/nvcc)")?;
    let tc = Toolchain { nvcc: cuda.join("bin").join("nvcc"), found_via: LOCAL_TOOLCHAIN_DIR.into() };
    eprintln!("xtask: CUDA toolchain ready: {} ({})", tc.nvcc.display(), tc.version()?);
    Ok(tc)
}

/// Installs the pinned libclang unless it is already installed. Returns the path of
/// `libclang.so`, the one `codegen` loads (never a system copy).
pub fn setup_libclang() -> Result<PathBuf, String> {
    let venv = venv();
    install_pins(&venv, LIBCLANG_PINS, LIBCLANG_STAMP, local_libclang(&venv).is_some())?;
    local_libclang(&venv).ok_or_else(|| {
        format!(
            "the {} wheel installed but {} is missing (expected lib/python3.*/site-packages/clang/native/libclang.so)",
            LIBCLANG_PINS.join(" "),
            venv.display()
        )
    })
}

/// The configured nvcc (see `moekit_build::find_nvcc`), installing the local one when none is.
pub fn ensure_toolchain() -> Result<Toolchain, String> {
    match find_nvcc(Some(&root())) {
        Some(tc) => {
            eprintln!("xtask: using nvcc {} (via {})", tc.nvcc.display(), tc.found_via);
            Ok(tc)
        }
        None => {
            eprintln!("xtask: no nvcc found; installing the pinned CUDA toolchain into {LOCAL_TOOLCHAIN_DIR}/");
            setup_cuda()
        }
    }
}

/// `libclang.so` of the project-local venv, if installed.
pub fn local_libclang(venv: &Path) -> Option<PathBuf> {
    site_packages(venv).into_iter().map(|sp| sp.join("clang").join("native").join("libclang.so")).find(|p| p.is_file())
}

/// `<venv>/lib/python3.*/site-packages`, sorted.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")));
    dirs.sort();
    dirs.into_iter().map(|p| p.join("site-packages")).collect()
}

/// Installs `pins` into `venv` unless `stamp` records the same pins and `present` says the
/// result is there. Returns whether it installed.
fn install_pins(venv: &Path, pins: &[&str], stamp: &str, present: bool) -> Result<bool, String> {
    let stamp = venv.join(stamp);
    let want = pins.join("\n");
    if present && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(false);
    }
    let pip = ensure_venv(venv)?;
    eprintln!("xtask: installing {} into {}", pins.join(" "), venv.display());
    run(Command::new(&pip).args(["install", "--quiet", "--disable-pip-version-check"]).args(pins)).map_err(|e| {
        format!("{e}\n(pip could not install the pinned wheels: PyPI must be reachable; retry `cargo xtask setup`)")
    })?;
    std::fs::write(&stamp, &want).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(true)
}

/// Creates the venv when it has no pip yet; returns its pip. A missing python3 or venv module
/// is one clear error saying what to install.
fn ensure_venv(venv: &Path) -> Result<PathBuf, String> {
    let pip = venv.join("bin").join("pip");
    if pip.is_file() {
        return Ok(pip);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => {
            return Err(format!(
                "`{python}` not found: moekit installs its tools into a Python venv and needs python3 \
                 with the venv module (Debian/Ubuntu: apt-get install python3 python3-venv; or set PYTHON)"
            ))
        }
    }
    run(Command::new(&python).args(["-m", "venv"]).arg(venv)).map_err(|e| {
        format!(
            "{e}\n`{python} -m venv` failed: the venv module (with ensurepip) is missing \
             (Debian/Ubuntu: apt-get install python3-venv)"
        )
    })?;
    if !pip.is_file() {
        return Err(format!("`{python} -m venv` made no {}: install python3-venv", pip.display()));
    }
    Ok(pip)
}

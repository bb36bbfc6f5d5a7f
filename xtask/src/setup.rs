//! `setup-cuda`: the pinned CUDA toolchain from PyPI wheels in a project-local venv.

use crate::{root, run};
use moekit_build::{find_nvcc, local_cuda_root, Toolchain, LOCAL_TOOLCHAIN_DIR};
use std::process::Command;

/// The pinned wheels. CUDA 13.0 matches the driver of the GPU machine we test on; the nvvm
/// pin matters (a newer nvvm emits PTX that the 13.0 ptxas rejects); cuobjdump needs
/// nvdisasm beside it.
pub const PINNED: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvdisasm==13.2.86",
    "nvidia-cuda-cuobjdump",
];

const STAMP: &str = "moekit-pins.txt";

/// Installs the pinned toolchain into `.cuda-toolchain/` unless the same pins are already
/// installed there. Returns the installed toolchain.
pub fn setup_cuda() -> Result<Toolchain, String> {
    let venv = root().join(LOCAL_TOOLCHAIN_DIR);
    let stamp = venv.join(STAMP);
    let want = PINNED.join("\n");
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    if current != want || local_cuda_root(&venv).is_none() {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(&python).args(["-m", "venv"]).arg(&venv))
            .map_err(|e| format!("{e}\n(setup-cuda needs python3 with the venv module)"))?;
        run(Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PINNED))?;
        std::fs::write(&stamp, &want).map_err(|e| e.to_string())?;
        // Tell build scripts that ran without a toolchain to look again.
        let build_stamp = moekit_build::toolchain_stamp(&root().join("target").join("moekit-kernel-cache"));
        std::fs::create_dir_all(build_stamp.parent().unwrap_or(&venv)).map_err(|e| e.to_string())?;
        std::fs::write(&build_stamp, &want).map_err(|e| e.to_string())?;
    }
    let cuda =
        local_cuda_root(&venv).ok_or("the wheels installed but nvcc is not where expected (nvidia/cu13/bin/nvcc)")?;
    let tc = Toolchain { nvcc: cuda.join("bin").join("nvcc"), found_via: LOCAL_TOOLCHAIN_DIR.into() };
    eprintln!("xtask: CUDA toolchain ready: {} ({})", tc.nvcc.display(), tc.version()?);
    Ok(tc)
}

/// The configured nvcc (see `moekit_build::find_nvcc`), installing the local one when none is.
pub fn ensure_toolchain() -> Result<Toolchain, String> {
    match find_nvcc(Some(&root())) {
        Some(tc) => {
            eprintln!("xtask: using nvcc {} (via {})", tc.nvcc.display(), tc.found_via);
            Ok(tc)
        }
        None => setup_cuda(),
    }
}

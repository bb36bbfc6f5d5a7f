//! Finding the CUDA toolchain (nvcc, cuobjdump, headers) without running any GPU tool.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variables that steer toolchain discovery, in the order they are consulted.
/// Build scripts emit `rerun-if-env-changed` for each of them.
pub const DISCOVERY_ENV_VARS: &[&str] =
    &["MOEKIT_NVCC", "NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "MOEKIT_CUDA_INCLUDE", "MOEKIT_REQUIRE_KERNELS"];

/// Name of the project-local toolchain folder (a Python venv made by `cargo xtask setup`).
pub const LOCAL_TOOLCHAIN_DIR: &str = ".cuda-toolchain";

/// A located CUDA toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    /// Path of the `nvcc` executable.
    pub nvcc: PathBuf,
    /// Where it was found (for messages): `MOEKIT_NVCC`, `PATH`, ...
    pub found_via: String,
}

impl Toolchain {
    /// Directory holding `nvcc` (and, in every layout we support, `ptxas` and `cuobjdump`).
    pub fn bin_dir(&self) -> PathBuf {
        self.nvcc.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// The CUDA include directory (`<bin>/../include`, following a symlinked nvcc such as
    /// `/usr/bin/nvcc -> /usr/local/cuda/bin/nvcc`).
    pub fn include_dir(&self) -> PathBuf {
        let real = std::fs::canonicalize(&self.nvcc).unwrap_or_else(|_| self.nvcc.clone());
        real.parent().map(Path::to_path_buf).unwrap_or_default().join("..").join("include")
    }

    /// Path of `cuobjdump` beside nvcc, if present.
    pub fn cuobjdump(&self) -> Option<PathBuf> {
        let p = self.bin_dir().join("cuobjdump");
        p.is_file().then_some(p)
    }

    /// First line of `nvcc --version` that names the release, e.g.
    /// `Cuda compilation tools, release 13.0, V13.0.88`. Part of every cache key.
    pub fn version(&self) -> Result<String, String> {
        let out = Command::new(&self.nvcc)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.nvcc.display()))?;
        if !out.status.success() {
            return Err(format!("{} --version failed", self.nvcc.display()));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().find(|l| l.contains("release")).unwrap_or(text.trim()).trim().to_string())
    }
}

/// Searches for nvcc in this order: `MOEKIT_NVCC`, `NVCC` (paths to the executable),
/// `CUDA_HOME`, `CUDA_PATH` (`<dir>/bin/nvcc`), `PATH`, the project-local toolchain made by
/// `cargo xtask setup` (searched upward from `start_dir`), `/usr/local/cuda/bin/nvcc`.
/// Never runs `nvidia-smi` or touches a GPU.
pub fn find_nvcc(start_dir: Option<&Path>) -> Option<Toolchain> {
    for var in ["MOEKIT_NVCC", "NVCC"] {
        if let Some(p) = env::var_os(var).map(PathBuf::from) {
            if p.is_file() {
                return Some(Toolchain { nvcc: p, found_via: var.to_string() });
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(var).map(PathBuf::from) {
            let p = dir.join("bin").join("nvcc");
            if p.is_file() {
                return Some(Toolchain { nvcc: p, found_via: var.to_string() });
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(Toolchain { nvcc: p, found_via: "PATH".to_string() });
            }
        }
    }
    if let Some(p) = start_dir.and_then(find_local_nvcc) {
        return Some(Toolchain { nvcc: p, found_via: LOCAL_TOOLCHAIN_DIR.to_string() });
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    if p.is_file() {
        return Some(Toolchain { nvcc: p, found_via: "/usr/local/cuda".to_string() });
    }
    None
}

/// The CUDA include directory for host builds that need only the headers (the emulation and
/// the test oracle): `MOEKIT_CUDA_INCLUDE` if set (authoritative), else the include directory
/// of the nvcc [`find_nvcc`] finds, else `/usr/local/cuda/include`. Returns a directory
/// holding `cuda_fp8.h`, or `None`.
pub fn find_cuda_include(start_dir: Option<&Path>) -> Option<PathBuf> {
    let has = |d: &Path| d.join("cuda_fp8.h").is_file();
    if let Some(dir) = env::var_os("MOEKIT_CUDA_INCLUDE").filter(|v| !v.is_empty()).map(PathBuf::from) {
        return has(&dir).then_some(dir);
    }
    if let Some(dir) = find_nvcc(start_dir).map(|tc| tc.include_dir()).filter(|d| has(d)) {
        return Some(dir);
    }
    let dir = PathBuf::from("/usr/local/cuda/include");
    has(&dir).then_some(dir)
}

/// The workspace root: the nearest ancestor of `start` that holds a `kernels/` folder.
pub fn workspace_root(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|d| d.join("kernels").is_dir()).map(Path::to_path_buf)
}

/// The CUDA tree inside the project-local venv: `<venv>/lib/python3.*/site-packages/nvidia/cu13`.
pub fn local_cuda_root(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|p| p.join("site-packages").join("nvidia").join("cu13"))
        .find(|p| p.join("bin").join("nvcc").is_file())
}

fn find_local_nvcc(start: &Path) -> Option<PathBuf> {
    let root = workspace_root(start)?;
    local_cuda_root(&root.join(LOCAL_TOOLCHAIN_DIR)).map(|r| r.join("bin").join("nvcc"))
}

//! Compiling a kernel module to a fatbin, cached by content.

use crate::deps::scan_includes;
use crate::module::{Arch, KernelModule};
use crate::toolchain::Toolchain;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags every module is compiled with (part of the cache key).
pub const BASE_FLAGS: &[&str] = &["-std=c++17", "-O3", "--resource-usage", "-lineinfo"];

/// A compiled module.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The fatbin in the cache.
    pub fatbin: PathBuf,
    /// ptxas' resource report (the `--resource-usage` output).
    pub ptxas_report: String,
    /// Every project header the module includes.
    pub headers: Vec<PathBuf>,
    /// The architectures in the fatbin.
    pub archs: Vec<Arch>,
    /// Whether the result came from the cache.
    pub cached: bool,
    /// The cache key (hex SHA-256).
    pub key: String,
}

/// Compiles `module` for `archs` into `cache_dir`, or reuses the cached fatbin whose key
/// (a hash of the source, every included project header, the flags, the architectures and
/// the nvcc version) matches.
pub fn compile_module(
    tc: &Toolchain,
    module: &KernelModule,
    archs: &[Arch],
    include_dirs: &[PathBuf],
    cache_dir: &Path,
) -> Result<Compiled, String> {
    let headers =
        scan_includes(&module.source, include_dirs).map_err(|e| format!("reading {}: {e}", module.source.display()))?;
    let version = tc.version()?;
    let mut args: Vec<String> = BASE_FLAGS.iter().map(|s| s.to_string()).collect();
    args.extend(module.extra_flags.iter().cloned());
    for dir in include_dirs {
        args.push(format!("-I{}", dir.display()));
    }
    for arch in archs {
        args.push("-gencode".into());
        args.push(arch.gencode());
    }

    let mut h = Sha256::new();
    h.update(version.as_bytes());
    for a in &args {
        h.update(a.as_bytes());
        h.update([0]);
    }
    for file in std::iter::once(&module.source).chain(headers.iter()) {
        let bytes = fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        h.update(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();

    fs::create_dir_all(cache_dir).map_err(|e| format!("creating {}: {e}", cache_dir.display()))?;
    let stem = format!("{}-{}", module.name, &key[..16]);
    let fatbin = cache_dir.join(format!("{stem}.fatbin"));
    let report_path = cache_dir.join(format!("{stem}.ptxas.txt"));
    if fatbin.is_file() && report_path.is_file() {
        let ptxas_report = fs::read_to_string(&report_path).unwrap_or_default();
        return Ok(Compiled { fatbin, ptxas_report, headers, archs: archs.to_vec(), cached: true, key });
    }

    // Write to unique temporaries, then rename: concurrent builds never see a partial file.
    let tmp = cache_dir.join(format!("{stem}.{}.tmp", std::process::id()));
    let out = Command::new(&tc.nvcc)
        .arg("-fatbin")
        .args(&args)
        .arg("-o")
        .arg(&tmp)
        .arg(&module.source)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tc.nvcc.display()))?;
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        fs::remove_file(&tmp).ok();
        return Err(format!("nvcc failed on {}:\n{report}", module.source.display()));
    }
    let tmp_report = cache_dir.join(format!("{stem}.{}.txt.tmp", std::process::id()));
    fs::write(&tmp_report, &report).map_err(|e| e.to_string())?;
    fs::rename(&tmp, &fatbin).map_err(|e| e.to_string())?;
    fs::rename(&tmp_report, &report_path).map_err(|e| e.to_string())?;
    Ok(Compiled { fatbin, ptxas_report: report, headers, archs: archs.to_vec(), cached: false, key })
}

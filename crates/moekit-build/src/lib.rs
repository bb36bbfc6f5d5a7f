//! Build-time support for moekit kernel crates and `cargo xtask`.
//!
//! A kernel crate's `build.rs` calls [`embed_kernels`] with its [`KernelModule`]s. Each module
//! (one `.cu` file) is compiled by nvcc into one fatbin, cached by content (see
//! [`compile_module`]), copied into `OUT_DIR`, and described in a generated Rust file that the
//! crate includes:
//!
//! ```ignore
//! // build.rs
//! fn main() {
//!     moekit_build::embed_kernel_sources(&["../../kernels/cast.cu"]);
//! }
//! // src/lib.rs
//! include!(concat!(env!("OUT_DIR"), "/moekit_kernels.rs")); // defines `pub static CAST: KernelImage`
//! ```
//!
//! Without nvcc the build still succeeds: a cargo warning is printed and each image is
//! generated as "not built", which the runtime reports as `KernelsNotBuilt`. With
//! `MOEKIT_REQUIRE_KERNELS=1` a missing nvcc fails the build instead.

mod compile;
mod deps;
mod emulation;
mod module;
mod report;
mod toolchain;

pub use compile::{compile_module, Compiled, BASE_FLAGS};
pub use deps::scan_includes;
pub use emulation::{
    compile_host_library, entry_symbol, kernel_decls, kernel_names, sanitize_address, wrapper_source, KernelDecl,
    EMU_HEADER,
};
pub use module::{archs_for, default_archs, Arch, ArchClass, KernelModule};
pub use report::{
    budget_failures, failed_checks, parse_budgets, parse_cuobjdump_sass, parse_ptxas, parse_sass_checks,
    wgmma_serialized, Budget, KernelResources, SassCheck,
};
pub use toolchain::{
    find_cuda_include, find_nvcc, local_cuda_root, workspace_root, Toolchain, DISCOVERY_ENV_VARS, LOCAL_TOOLCHAIN_DIR,
};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Name of the file [`embed_kernels`] writes into `OUT_DIR`.
pub const GENERATED_FILE: &str = "moekit_kernels.rs";

/// Whether `MOEKIT_REQUIRE_KERNELS=1` is set (a missing toolchain is then an error).
pub fn kernels_required() -> bool {
    std::env::var("MOEKIT_REQUIRE_KERNELS").is_ok_and(|v| v == "1")
}

/// The `MOEKIT_CUDA_ARCHS` override, if set.
pub fn arch_override() -> Option<String> {
    std::env::var("MOEKIT_CUDA_ARCHS").ok()
}

/// The shared fatbin cache: `MOEKIT_KERNEL_CACHE`, else `<target dir>/moekit-kernel-cache`,
/// where the target dir is derived from `out_dir` (`<target>/<profile>/build/<pkg>/out`), so
/// debug and release builds and `cargo xtask build-kernels` share one cache.
pub fn cache_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("MOEKIT_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    out_dir.ancestors().nth(4).unwrap_or(out_dir).join("moekit-kernel-cache")
}

/// File whose change tells build scripts that a toolchain was installed or removed:
/// `<cache dir>/toolchain.stamp`, rewritten by `cargo xtask setup`.
pub fn toolchain_stamp(cache_dir: &Path) -> PathBuf {
    cache_dir.join("toolchain.stamp")
}

/// For build scripts: emits `rerun-if-env-changed` for every variable that steers toolchain
/// discovery and `rerun-if-changed` for the toolchain stamp (created empty if missing, since
/// cargo reruns a script on every build while a watched path does not exist).
pub fn watch_toolchain() {
    for var in DISCOVERY_ENV_VARS.iter().chain(&["MOEKIT_CUDA_ARCHS", "MOEKIT_KERNEL_CACHE", "MOEKIT_EMU_SANITIZE"]) {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let stamp = toolchain_stamp(&cache_dir(&out_dir));
    if !stamp.exists() {
        let _ = std::fs::create_dir_all(stamp.parent().unwrap_or(&out_dir));
        let _ = std::fs::write(&stamp, "");
    }
    if stamp.exists() {
        println!("cargo:rerun-if-changed={}", stamp.display());
    }
}

/// The project include directory (`<workspace>/kernels/include`) seen from `start`.
pub fn project_include_dirs(start: &Path) -> Vec<PathBuf> {
    workspace_root(start).map(|r| vec![r.join("kernels").join("include")]).unwrap_or_default()
}

/// The Rust constant naming a module's image: its name upper-cased.
pub fn const_name(module: &KernelModule) -> String {
    module.name.to_ascii_uppercase()
}

/// Like [`embed_kernels`] for sources that declare their class with `// moekit-arch:` (see
/// [`KernelModule::from_source`]); paths are relative to the crate's manifest directory.
pub fn embed_kernel_sources(sources: &[&str]) {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let modules: Vec<KernelModule> = sources
        .iter()
        .map(|s| KernelModule::from_source(manifest_dir.join(s)).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    embed_kernels(&modules);
}

/// Entry point for kernel crates' build scripts: compiles `modules`, embeds them, and writes
/// `OUT_DIR/moekit_kernels.rs` with one `pub static NAME: moekit_cuda::KernelImage` each.
///
/// # Panics
/// Panics (failing the build) when a module does not compile, or when nvcc is missing and
/// `MOEKIT_REQUIRE_KERNELS=1`.
pub fn embed_kernels(modules: &[KernelModule]) {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    watch_toolchain();
    let include_dirs = project_include_dirs(&manifest_dir);
    let toolchain = find_nvcc(Some(&manifest_dir));
    if toolchain.is_none() {
        let msg = "nvcc not found (MOEKIT_NVCC, NVCC, CUDA_HOME, CUDA_PATH, PATH, .cuda-toolchain, /usr/local/cuda): \
                   CUDA kernels are not built; GPU calls will return KernelsNotBuilt. Run `cargo xtask setup`.";
        if kernels_required() {
            panic!("MOEKIT_REQUIRE_KERNELS=1 but {msg}");
        }
        println!("cargo:warning={msg}");
    }

    // The host build for the emulation target needs only CUDA's headers.
    let cuda_include = find_cuda_include(Some(&manifest_dir));
    if cuda_include.is_none() {
        println!("cargo:warning=CUDA headers not found: the kernels get no host emulation build (emulated tests report EmulationNotBuilt).");
    }
    for emu_header in include_dirs.iter().map(|d| d.join(EMU_HEADER)).filter(|p| p.is_file()) {
        println!("cargo:rerun-if-changed={}", emu_header.display());
        for h in scan_includes(&emu_header, &include_dirs).unwrap_or_default() {
            println!("cargo:rerun-if-changed={}", h.display());
        }
    }
    let mut wrappers = Vec::new();

    let mut code = String::from("// @generated by moekit-build. Do not edit.\n");
    for module in modules {
        let source = manifest_dir.join(&module.source);
        let module = KernelModule { source: source.clone(), ..module.clone() };
        println!("cargo:rerun-if-changed={}", source.display());
        // Track headers even without nvcc so that a later build with nvcc is not stale.
        for h in scan_includes(&source, &include_dirs).unwrap_or_default() {
            println!("cargo:rerun-if-changed={}", h.display());
        }
        let name = &module.name;
        let konst = const_name(&module);
        let hopper = module.class == ArchClass::Hopper;
        let doc = format!("/// Kernel image `{name}` from `{}` ({}).\n", short_path(&source), module.class.as_str());
        code.push_str(&doc);
        let image = match &toolchain {
            Some(tc) => {
                let archs = archs_for(module.class, arch_override().as_deref())
                    .unwrap_or_else(|e| panic!("MOEKIT_CUDA_ARCHS: {e}"));
                let compiled = compile_module(tc, &module, &archs, &include_dirs, &cache_dir(&out_dir))
                    .unwrap_or_else(|e| panic!("{e}"));
                let embedded = out_dir.join(format!("{name}.fatbin"));
                std::fs::copy(&compiled.fatbin, &embedded).unwrap_or_else(|e| panic!("copy fatbin: {e}"));
                let archs: Vec<String> = archs.iter().map(|a| format!("{:?}", a.to_string())).collect();
                format!(
                    "::moekit_cuda::KernelImage::built({name:?}, include_bytes!({:?}), &[{}], {hopper})",
                    embedded.display().to_string(),
                    archs.join(", ")
                )
            }
            None => format!("::moekit_cuda::KernelImage::not_built({name:?}, {hopper})"),
        };
        let text = std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        let emulate = !text.lines().any(|l| l.trim() == "// moekit-emulate: no");
        let decls = kernel_decls(&text);
        let kernels: Vec<String> = decls.iter().map(|d| d.name.clone()).collect();
        let image = match (&cuda_include, emulate && !kernels.is_empty()) {
            (Some(_), true) => {
                let wrapper = out_dir.join(format!("emu_{name}.cpp"));
                std::fs::write(&wrapper, wrapper_source(&source, &decls)).unwrap_or_else(|e| panic!("{e}"));
                wrappers.push(wrapper);
                let _ = writeln!(code, "mod emu_{name} {{\n    extern \"C\" {{");
                for k in &kernels {
                    let _ = writeln!(
                        code,
                        "        pub fn {}(cfg: *const ::moekit_cuda::emu::MoekitEmuLaunch, params: *mut *mut ::core::ffi::c_void, \
                         err: *mut ::core::ffi::c_char, err_len: u64) -> i32;",
                        entry_symbol(k)
                    );
                }
                code.push_str("    }\n}\n");
                let entries: Vec<String> = kernels
                    .iter()
                    .map(|k| {
                        format!(
                            "::moekit_cuda::emu::EmuKernel {{ name: {k:?}, entry: emu_{name}::{} }}",
                            entry_symbol(k)
                        )
                    })
                    .collect();
                format!("{image}.with_emulation(&[{}])", entries.join(", "))
            }
            _ => image,
        };
        let _ = writeln!(code, "pub static {konst}: ::moekit_cuda::KernelImage = {image};");
    }
    if let (Some(cuda_include), false) = (&cuda_include, wrappers.is_empty()) {
        let pkg = std::env::var("CARGO_PKG_NAME").unwrap_or_default().replace('-', "_");
        compile_host_library(&format!("moekit_emu_{pkg}"), &wrappers, &include_dirs, cuda_include)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(out_dir.join(GENERATED_FILE), code).unwrap_or_else(|e| panic!("writing generated kernels: {e}"));
}

fn short_path(p: &Path) -> String {
    let s = p.display().to_string();
    match s.find("kernels/") {
        Some(i) => s[i..].to_string(),
        None => s,
    }
}

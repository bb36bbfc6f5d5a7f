//! `cargo xtask <command>`: moekit's developer commands.

mod bundle;
mod codegen;
mod kernels;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup             install the pinned tools from PyPI into .cuda-toolchain/: the CUDA 13.0
                    compiler, libclang (for codegen) and numpy
                    (for the Python module's tests); `setup-cuda` is the older name
  build-kernels [MODULE ...]
                    compile every kernel (or the named modules, e.g. `norm`) for every configured
                    arch; print resources and SASS checks
  codegen [--check] regenerate (or check) the Rust bindings of kernels/include/moekit/abi.h
  ci                the full test pipeline (setup, build-kernels, codegen --check, fmt, clippy,
                    test, emulated tests under AddressSanitizer)
  gpu-bundle        build GPU test and benchmark binaries into target/gpu-bundle with a run.sh";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup" | "setup-cuda") => setup::setup(),
        Some("build-kernels") => kernels::build_kernels(&args[1..]),
        Some("codegen") => codegen::codegen(args.iter().any(|a| a == "--check")),
        Some("ci") => ci(),
        Some("gpu-bundle") => bundle::gpu_bundle(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Runs `cmd` with inherited output; error when it fails.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

/// A `cargo` command in the workspace root, with `MOEKIT_NVCC` pointing at the toolchain
/// xtask resolved so that build scripts use the same nvcc.
pub fn cargo(nvcc: Option<&Path>) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    if let Some(nvcc) = nvcc {
        cmd.env("MOEKIT_NVCC", nvcc);
    }
    cmd
}

/// The emulated kernel tests (`emu_*`) again, with the kernels' host builds under
/// AddressSanitizer and buffer guard zones poisoned, so out-of-bounds reads fail too. The
/// planted-bug tests that expect a reported fault are skipped here (ASan aborts the process
/// first); `emu_asan_flags_read_past_buffer` checks ASan's report in a child process.
fn emulated_tests_under_asan(nvcc: &Path) -> Result<(), String> {
    run(cargo(Some(nvcc))
        .env("MOEKIT_EMU_SANITIZE", "address")
        .env("CARGO_TARGET_DIR", root().join("target").join("asan"))
        .env("MOEKIT_KERNEL_CACHE", root().join("target").join("moekit-kernel-cache"))
        .env("ASAN_OPTIONS", "verify_asan_link_order=0:detect_leaks=0")
        // moekit-candle has no emulated kernel test of its own (its ops call the kernel crates,
        // whose `emu_` tests run here) and would only add a candle-core build under ASan.
        .args([
            "test",
            "--workspace",
            "--exclude",
            "xtask",
            "--exclude",
            "moekit-benches",
            "--exclude",
            "moekit-candle",
        ])
        .args(["--tests", "--", "emu_"])
        .args(["--skip", "catches_planted", "--skip", "reports_planted"]))
}

fn ci() -> Result<(), String> {
    let start = std::time::Instant::now();
    let tc = setup::ensure_toolchain()?;
    // codegen loads the project's own libclang (installed here if missing), never a system one.
    setup::setup_libclang()?;
    // numpy for the Python module's tests, which `cargo test` runs (they fail without it in CI).
    setup::setup_python_tests()?;
    // From here on a missing toolchain is an error, never a silent skip.
    std::env::set_var("MOEKIT_REQUIRE_KERNELS", "1");
    std::env::set_var("MOEKIT_NVCC", &tc.nvcc);
    kernels::build_kernels(&[])?;
    codegen::codegen(true)?;
    run(cargo(Some(&tc.nvcc)).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(Some(&tc.nvcc)).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo(Some(&tc.nvcc)).args(["test", "--workspace"]))?;
    emulated_tests_under_asan(&tc.nvcc)?;
    eprintln!("xtask ci: all steps passed in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

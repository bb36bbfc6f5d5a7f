//! `gpu-bundle`: everything a GPU machine without Rust or CUDA toolkit needs, in one folder.

use crate::setup::ensure_toolchain;
use crate::{cargo, root, run};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MAX_BYTES: u64 = 60 << 20;

pub fn gpu_bundle() -> Result<(), String> {
    let tc = ensure_toolchain()?;
    std::env::set_var("MOEKIT_REQUIRE_KERNELS", "1");
    let dir = root().join("target").join("gpu-bundle");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for sub in ["tests", "benches", "examples", "lib", "python/moekit", "torch"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let built = executables(cargo(Some(&tc.nvcc)).args(["test", "--workspace", "--release", "--no-run"]))?;
    let (tests, examples): (Vec<_>, Vec<_>) = built.into_iter().partition(|(_, test)| *test);
    // Only test binaries with GPU tests travel: the others ran in CI already.
    let tests: Vec<_> = tests.into_iter().filter(|(exe, _)| has_gpu_tests(exe)).collect();
    // Of the other executables, the one run.sh calls with `--device cuda`: the FP8 cast
    // example. (The GRPO command line embeds every kernel image, 11 MiB, and would push the
    // bundle over its limit; its GPU path is the model's, which `gpu_model_step_*` tests.)
    let examples: Vec<_> = examples
        .into_iter()
        .filter(|(exe, _)| exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("fp8_cast")))
        .collect();
    // The benches that time a GPU: `emulation` (the host emulator only) stays here. (`model`
    // travels: besides the CPU step it times the DeepSeek-V3-like MoE layer on the GPU.)
    let benches: Vec<_> = executables(cargo(Some(&tc.nvcc)).args(["bench", "-p", "moekit-benches", "--no-run"]))?
        .into_iter()
        .filter(|(exe, _)| {
            let stem = exe.file_name().and_then(|n| n.to_str()).and_then(|n| n.rsplit_once('-')).map(|(s, _)| s);
            stem != Some("emulation")
        })
        .collect();
    let mut total = 0;
    // Every binary travels stripped and gzipped (run.sh unpacks them into a scratch folder):
    // each embeds the kernel images and the emulation's host objects of the crates it links.
    let mut table = String::from("| binary | stripped MiB | gzipped MiB |\n|---|---|---|\n");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (sub, exes) in [("tests", &tests), ("benches", &benches), ("examples", &examples)] {
        for (exe, _) in exes {
            let name = exe.file_name().ok_or("executable without a name")?;
            let dest = dir.join(sub).join(name);
            std::fs::copy(exe, &dest).map_err(|e| format!("copy {}: {e}", exe.display()))?;
            // Best effort: symbols are not needed on the GPU machine.
            let _ = Command::new("strip").arg(&dest).stderr(Stdio::null()).status();
            let stripped = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
            run(Command::new("gzip").arg("-9").arg(&dest))?;
            let gz = dest.with_file_name(format!("{}.gz", name.to_string_lossy()));
            let packed = std::fs::metadata(&gz).map_err(|e| format!("{}: {e}", gz.display()))?.len();
            let _ = writeln!(table, "| {sub}/{} | {:.1} | {:.1} |", name.to_string_lossy(), mib(stripped), mib(packed));
            total += packed;
        }
    }
    eprint!("{table}");
    total += python_side_by_side(&tc.nvcc, &dir)?;
    let run_sh = dir.join("run.sh");
    std::fs::write(&run_sh, RUN_SH).map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(&run_sh))?;
    eprintln!(
        "xtask: gpu bundle at {} ({} test and {} bench binaries, {:.1} MiB gzipped)\n       on the GPU machine: bash run.sh",
        dir.display(),
        tests.len(),
        benches.len(),
        mib(total)
    );
    if total > MAX_BYTES {
        return Err(format!("bundle is {total} bytes, over the 60 MiB limit"));
    }
    Ok(())
}

/// The side-by-side benchmark against eager PyTorch: the Python module, its script and the
/// C ABI library (release, stripped, gzipped: the kernel images make it ~10 MiB, ~3 MiB
/// compressed; run.sh unpacks it). Returns the bytes added.
fn python_side_by_side(nvcc: &Path, dir: &Path) -> Result<u64, String> {
    let mut cmd = cargo(Some(nvcc));
    cmd.args(["build", "--release", "-p", "moekit-capi", "--lib", "--message-format=json"]).stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed"));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let so =
        json.split('"').find(|f| f.ends_with("/libmoekit_capi.so")).ok_or("cargo reported no libmoekit_capi.so")?;
    let stripped = dir.join("lib/libmoekit_capi.so");
    std::fs::copy(so, &stripped).map_err(|e| format!("copy {so}: {e}"))?;
    let _ = Command::new("strip").arg(&stripped).stderr(Stdio::null()).status();
    run(Command::new("gzip").arg("-9").arg(&stripped))?;
    for (from, to) in [
        ("python/moekit/__init__.py", "python/moekit/__init__.py"),
        ("benches/torch_side_by_side.py", "torch/torch_side_by_side.py"),
    ] {
        std::fs::copy(root().join(from), dir.join(to)).map_err(|e| format!("copy {from}: {e}"))?;
    }
    ["lib/libmoekit_capi.so.gz", "python/moekit/__init__.py", "torch/torch_side_by_side.py"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).map_err(|e| format!("{f}: {e}")))
        .sum()
}

/// Whether a libtest binary lists a test named `gpu_*` (ignored ones included).
fn has_gpu_tests(exe: &Path) -> bool {
    Command::new(exe)
        .args(["--list", "--include-ignored", "--format", "terse"])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.split("::").last().is_some_and(|n| n.starts_with("gpu_")))
        })
        .unwrap_or(true)
}

/// Builds with `--message-format=json` and returns the executables cargo reports, each with
/// whether it is a test harness (`profile.test`) rather than an example.
fn executables(cmd: &mut Command) -> Result<Vec<(PathBuf, bool)>, String> {
    cmd.arg("--message-format=json").stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed"));
    }
    let mut v: Vec<(PathBuf, bool)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')?;
            // `profile.test` (the target object before it has a `test` field of its own).
            let test = l.split("\"profile\":").nth(1).is_some_and(|p| p.contains("\"test\":true"));
            Some((PathBuf::from(&l[start..start + end]), test))
        })
        .filter(|(p, _)| p.is_file() && !is_build_script(p))
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

fn is_build_script(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("build_script"))
}

/// The bundle's entry point. Needs bash, coreutils and an NVIDIA driver; nothing else.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# moekit GPU bundle: runs every GPU test (MOEKIT_REQUIRE_GPU=1: a skip is a failure), then the
# benchmarks in quick mode and the side-by-side with PyTorch, and prints a summary table last.
# Made by `cargo xtask gpu-bundle`.
set -u
cd "$(dirname "$0")"
have_driver() {
  ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && return 0
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64 /usr/lib/wsl/lib ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do
    [ -e "$d/libcuda.so.1" ] && return 0
  done
  return 1
}
if ! have_driver; then
  echo "run.sh: no NVIDIA driver on this machine (libcuda.so.1 not found)." >&2
  echo "run.sh: this bundle runs moekit's GPU tests and benchmarks; run it on a machine with an NVIDIA GPU." >&2
  exit 2
fi
# The binaries travel gzipped: unpack them into a scratch folder (removed at exit).
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
for sub in tests benches examples; do
  mkdir -p "$bin/$sub"
  for z in "$sub"/*.gz; do
    [ -e "$z" ] || continue
    out="$bin/$sub/$(basename "$z" .gz)"
    gzip -dc "$z" > "$out" && chmod +x "$out" || { echo "run.sh: cannot unpack $z" >&2; exit 2; }
  done
done
export MOEKIT_REQUIRE_GPU=1
summary=()
failed=0
passed_total=0
failed_total=0
for t in "$bin"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  out=$("$t" --include-ignored gpu_ --test-threads=1 2>&1)
  rc=$?
  echo "$out" | grep -E '^(test |SKIPPED|thread .* panicked|---- )' | sed "s|^|[$name] |"
  p=$(echo "$out" | sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' | awk '{s+=$1} END {print s+0}')
  f=$(echo "$out" | sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' | awk '{s+=$1} END {print s+0}')
  passed_total=$((passed_total + p)); failed_total=$((failed_total + f))
  if [ "$p" -gt 0 ] || [ "$f" -gt 0 ] || [ $rc -ne 0 ]; then
    status=ok; [ $rc -ne 0 ] && { status=FAILED; failed=1; }
    summary+=("| test | $name | $p passed, $f failed | $status |")
  fi
done
# The FP8 cast example on the GPU: kernel output must equal the CPU reference bit for bit.
for e in "$bin"/examples/*; do
  [ -x "$e" ] || continue
  name=$(basename "$e")
  out=$("$e" --device cuda 2>&1)
  rc=$?
  echo "$out" | sed "s|^|[$name] |"
  status=ok; [ $rc -ne 0 ] && { status=FAILED; failed=1; }
  summary+=("| example | $name --device cuda | exit $rc | $status |")
done
bench_lines=()
for b in "$bin"/benches/*; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  out=$(MOEKIT_BENCH_QUICK=1 "$b" --bench 2>&1)
  rc=$?
  echo "$out" | sed "s|^|[$name] |"
  while IFS= read -r l; do bench_lines+=("$l"); done < <(echo "$out" | grep '^MOEKIT-BENCH |' | sed 's/^MOEKIT-BENCH //')
  [ $rc -ne 0 ] && { failed=1; summary+=("| bench | $name | exit $rc | FAILED |"); }
done
# moekit through its Python module next to eager PyTorch on the same GPU (needs a python3 with
# torch built for CUDA, and numpy); the table is saved as $OUT/torch_side_by_side.md.
py=${PYTHON:-python3}
torch_table=""
if "$py" -c 'import numpy, torch; assert torch.cuda.is_available()' 2>/dev/null; then
  lib_dir=$(mktemp -d)
  gzip -dc lib/libmoekit_capi.so.gz > "$lib_dir/libmoekit_capi.so"
  torch_table="${OUT:-$PWD}/torch_side_by_side.md"
  MOEKIT_LIB="$lib_dir/libmoekit_capi.so" "$py" torch/torch_side_by_side.py --out "$torch_table" 2>&1 | sed 's|^|[torch_side_by_side] |'
  rc=${PIPESTATUS[0]}
  status=ok; [ $rc -ne 0 ] && { status=FAILED; failed=1; }
  summary+=("| torch | torch_side_by_side.py | exit $rc, table in $torch_table | $status |")
else
  echo "SKIPPED torch_side_by_side: no $py with numpy and torch for CUDA"
  summary+=("| torch | torch_side_by_side.py | no $py with numpy and torch for CUDA | SKIPPED |")
fi
echo
echo "== moekit GPU bundle summary =="
echo "| kind | binary | result | status |"
echo "|---|---|---|---|"
for l in "${summary[@]}"; do echo "$l"; done
echo
echo "| benchmark | shape | median | achieved | fraction of ceiling |"
echo "|---|---|---|---|---|"
for l in "${bench_lines[@]}"; do echo "$l"; done
if [ -n "$torch_table" ] && [ -f "$torch_table" ]; then echo; cat "$torch_table"; fi
echo
echo "gpu tests: $passed_total passed, $failed_total failed"
exit $failed
"#;

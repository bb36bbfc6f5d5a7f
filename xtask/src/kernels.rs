//! `build-kernels`: compile every kernel, print its resources, run its SASS checks.

use crate::root;
use crate::setup::ensure_toolchain;
use moekit_build::{
    arch_override, archs_for, budget_failures, compile_module, failed_checks, parse_budgets, parse_cuobjdump_sass,
    parse_ptxas, parse_sass_checks, wgmma_serialized, KernelModule,
};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

/// Every `kernels/*.cu` and `kernels/tests/*.cu` (emulation self-test kernels), sorted.
pub fn kernel_sources() -> Result<Vec<PathBuf>, String> {
    let mut v = Vec::new();
    for dir in [root().join("kernels"), root().join("kernels").join("tests")] {
        v.extend(
            std::fs::read_dir(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu")),
        );
    }
    v.sort();
    Ok(v)
}

/// Builds and checks every kernel module, or only those named in `only` (file stems).
pub fn build_kernels(only: &[String]) -> Result<(), String> {
    let tc = ensure_toolchain()?;
    let cuobjdump = tc
        .cuobjdump()
        .ok_or_else(|| format!("cuobjdump not found beside {} (run `cargo xtask setup`)", tc.nvcc.display()))?;
    let include = vec![root().join("kernels").join("include")];
    let cache = root().join("target").join("moekit-kernel-cache");
    let mut table = String::from(
        "| module | kernel | arch | regs | smem B | stack B | spill st/ld B | SASS checks |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    let sources = kernel_sources()?;
    if let Some(missing) = only.iter().find(|m| !sources.iter().any(|s| s.file_stem().is_some_and(|f| f == m.as_str())))
    {
        return Err(format!("no kernel module `{missing}` in kernels/ or kernels/tests/"));
    }
    for src in sources {
        if !only.is_empty() && !only.iter().any(|m| src.file_stem().is_some_and(|f| f == m.as_str())) {
            continue;
        }
        let module = KernelModule::from_source(&src)?;
        // The embedded targets, plus sm_90a (our reference GPU's own ISA) so that every kernel's
        // Hopper SASS is compiled and checked here even where the embedded image uses sm_90.
        let mut archs = archs_for(module.class, arch_override().as_deref())?;
        if arch_override().is_none() && !archs.iter().any(|a| a.to_string() == "sm_90a") {
            archs.push(moekit_build::Arch::Sass("sm_90a".into()));
        }
        let text = std::fs::read_to_string(&src).map_err(|e| e.to_string())?;
        let checks = parse_sass_checks(&text).map_err(|e| format!("{}: {e}", src.display()))?;
        let budgets = parse_budgets(&text).map_err(|e| format!("{}: {e}", src.display()))?;
        let compiled = compile_module(&tc, &module, &archs, &include, &cache)?;
        let out = Command::new(&cuobjdump)
            .arg("-sass")
            .arg(&compiled.fatbin)
            .output()
            .map_err(|e| format!("cannot run cuobjdump: {e}"))?;
        if !out.status.success() {
            return Err(format!("cuobjdump failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let sass = parse_cuobjdump_sass(&String::from_utf8_lossy(&out.stdout));
        let resources = parse_ptxas(&compiled.ptxas_report);
        let serialized = wgmma_serialized(&compiled.ptxas_report);
        if resources.is_empty() {
            failures.push(format!("{}: ptxas reported no kernels", module.name));
        }
        for r in &resources {
            let mut verdicts = Vec::new();
            if r.spill_stores + r.spill_loads > 0 {
                verdicts.push("SPILLS".to_string());
            }
            verdicts.extend(budget_failures(r, &budgets).into_iter().map(|b| format!("OVER BUDGET {b}")));
            if serialized.contains(&r.kernel) {
                verdicts.push("WGMMA SERIALIZED (ptxas C7518)".to_string());
            }
            match sass.get(&(r.arch.clone(), r.kernel.clone())) {
                Some(ins) => verdicts
                    .extend(failed_checks(&r.kernel, &r.arch, ins, &checks).into_iter().map(|c| format!("FAILED {c}"))),
                None => verdicts.push("FAILED no SASS found".into()),
            }
            for v in &verdicts {
                failures.push(format!("{} {} {}: {v}", module.name, r.kernel, r.arch));
            }
            let applicable = checks
                .iter()
                .filter(|c| (c.kernel == "*" || c.kernel == r.kernel) && c.arch.as_deref().is_none_or(|a| a == r.arch))
                .map(|c| c.describe())
                .collect::<Vec<_>>()
                .join(", ");
            let verdict = if verdicts.is_empty() {
                format!("ok ({})", if applicable.is_empty() { "no spills" } else { &applicable })
            } else {
                verdicts.join("; ")
            };
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | {} | {}/{} | {} |",
                module.name,
                r.kernel,
                r.arch,
                r.registers,
                r.smem_bytes,
                r.stack_bytes,
                r.spill_stores,
                r.spill_loads,
                verdict
            );
        }
        let ptx: Vec<String> =
            compiled.archs.iter().filter(|a| matches!(a, moekit_build::Arch::Ptx(_))).map(|a| a.to_string()).collect();
        if !ptx.is_empty() {
            let _ = writeln!(
                table,
                "| {} | (all) | {} | PTX, JIT-compiled by the driver | | | | |",
                module.name,
                ptx.join(",")
            );
        }
        eprintln!(
            "xtask: {} {} ({})",
            if compiled.cached { "cached " } else { "compiled" },
            module.name,
            &compiled.key[..12]
        );
    }
    println!("{table}");
    let report = root().join("target").join("kernel-report.md");
    let header = format!("# Kernel build report\n\nnvcc: {}\n\n", tc.version()?);
    std::fs::write(&report, header + &table).map_err(|e| e.to_string())?;
    eprintln!("xtask: wrote {}", report.display());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("kernel checks failed:\n  {}", failures.join("\n  ")))
    }
}

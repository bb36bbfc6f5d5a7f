//! Reading ptxas resource reports and SASS listings, and checking what kernels declare.
//!
//! A kernel source declares SASS checks in comments, one per line:
//!
//! ```text
//! // moekit-sass: <kernel name or *> forbid LDL STL
//! // moekit-sass: gemm_bf16_sm90 require HGMMA
//! // moekit-sass: cast@sm_90a require F2FP
//! ```
//!
//! A `@arch` suffix limits a check to one architecture. Resource budgets use
//! `// moekit-budget: <kernel, prefix* or *>[@arch] regs<=N smem<=BYTES threads=N blocks_per_sm>=N`
//! ([`parse_budgets`]); `blocks_per_sm` is the occupancy the host sizes grids for, checked
//! against what the ptxas report allows ([`resident_blocks`]).
//!
//! `forbid X` fails when any SASS instruction of the kernel starts with mnemonic `X`
//! (so `LDL` matches `LDL.64`; a dotted `MUFU.EX2` matches that variant but not
//! `MUFU.RCP`); `require X` fails when none does. Every kernel of every
//! module must also report zero spill bytes.

use std::collections::BTreeMap;

/// Resource usage of one kernel on one architecture, from ptxas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel (entry function) name as in the binary.
    pub kernel: String,
    /// Architecture, e.g. `sm_90a`.
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub smem_bytes: u32,
    /// Stack frame per thread, bytes.
    pub stack_bytes: u32,
    /// Spill stores, bytes.
    pub spill_stores: u32,
    /// Spill loads, bytes.
    pub spill_loads: u32,
    /// Named barriers used.
    pub barriers: u32,
}

/// Parses `nvcc --resource-usage` (ptxas `-v`) output into one entry per kernel and arch.
pub fn parse_ptxas(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut current: Option<KernelResources> = None;
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            if let Some(k) = current.take() {
                out.push(k);
            }
            // `<name>' for '<arch>'`
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some(KernelResources { kernel, arch, ..Default::default() });
        } else if let Some(k) = current.as_mut() {
            if line.contains("bytes stack frame") {
                for (n, what) in numbers_with_units(line) {
                    match what.as_str() {
                        "bytes stack frame" => k.stack_bytes = n,
                        "bytes spill stores" => k.spill_stores = n,
                        "bytes spill loads" => k.spill_loads = n,
                        _ => {}
                    }
                }
            } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
                for (n, what) in numbers_with_units(&format!("{rest},")) {
                    if what == "registers" {
                        k.registers = n;
                    } else if what == "bytes smem" {
                        k.smem_bytes = n;
                    } else if what == "barriers" {
                        k.barriers = n;
                    }
                }
                out.push(current.take().unwrap_or_default());
            }
        }
    }
    if let Some(k) = current.take() {
        out.push(k);
    }
    out
}

/// Splits `"0 bytes stack frame, 4 bytes spill stores"` into `(0, "bytes stack frame")`, ...
/// Also handles `used 2 barriers`.
fn numbers_with_units(line: &str) -> Vec<(u32, String)> {
    line.split(',')
        .filter_map(|item| {
            let item = item.trim().trim_start_matches("used ").trim_start_matches("Used ");
            let (num, unit) = item.split_once(' ')?;
            Some((num.parse().ok()?, unit.trim().to_string()))
        })
        .collect()
}

/// A SASS check declared in a kernel source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SassCheck {
    /// Kernel name the check applies to, or `*` for all.
    pub kernel: String,
    /// Architecture the check applies to (`sm_90a`), or `None` for all.
    pub arch: Option<String>,
    /// `true` for `require`, `false` for `forbid`.
    pub require: bool,
    /// Instruction mnemonic prefix, e.g. `HGMMA`, `LDL`.
    pub mnemonic: String,
}

impl SassCheck {
    /// Short description, e.g. `forbid LDL`.
    pub fn describe(&self) -> String {
        format!("{} {}", if self.require { "require" } else { "forbid" }, self.mnemonic)
    }
}

/// Kernels whose wgmma instructions ptxas serialised (its advisory `(C7518) Potential
/// Performance Loss: wgmma.mma_async instructions are serialized ... in the function 'NAME'`):
/// each wgmma then waits for the one before, so the pipeline the source describes is gone.
pub fn wgmma_serialized(report: &str) -> Vec<String> {
    let mut v: Vec<String> = report
        .lines()
        .filter(|l| l.contains("(C7518)"))
        .filter_map(|l| l.split("in the function '").nth(1)?.split('\'').next().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Reads `// moekit-sass:` directives from a kernel source.
pub fn parse_sass_checks(source: &str) -> Result<Vec<SassCheck>, String> {
    let mut checks = Vec::new();
    for (i, line) in source.lines().enumerate() {
        let Some(rest) = line.trim().strip_prefix("// moekit-sass:") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(kernel), Some(verb)) = (words.next(), words.next()) else {
            return Err(format!("line {}: expected `// moekit-sass: <kernel|*> forbid|require MNEMONIC...`", i + 1));
        };
        let require = match verb {
            "require" => true,
            "forbid" => false,
            other => return Err(format!("line {}: unknown verb {other:?}", i + 1)),
        };
        let mnemonics: Vec<&str> = words.collect();
        if mnemonics.is_empty() {
            return Err(format!("line {}: no mnemonic", i + 1));
        }
        let (kernel, arch) = match kernel.split_once('@') {
            Some((k, a)) => (k, Some(a.to_string())),
            None => (kernel, None),
        };
        for m in mnemonics {
            checks.push(SassCheck { kernel: kernel.to_string(), arch: arch.clone(), require, mnemonic: m.to_string() });
        }
    }
    Ok(checks)
}

/// A resource budget declared in a kernel source:
/// `// moekit-budget: <kernel, prefix* or *>[@arch] regs<=N smem<=BYTES threads=N blocks_per_sm>=N`
/// (any bound may be left out; `smem` is the static shared memory ptxas reports: dynamic shared
/// memory is the host's launch constant). `blocks_per_sm>=N` needs `threads=N` (the block size
/// the host launches) and fails when the kernel's registers and shared memory let fewer than N
/// such blocks be resident on one multiprocessor, so a register increase that silently halves
/// occupancy fails the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Kernel name, or `*`.
    pub kernel: String,
    /// Architecture, or `None` for all.
    pub arch: Option<String>,
    /// Largest register count allowed.
    pub max_regs: Option<u32>,
    /// Largest static shared memory allowed, bytes.
    pub max_smem: Option<u32>,
    /// Threads per block the host launches the kernel with.
    pub threads: Option<u32>,
    /// Fewest resident blocks per multiprocessor the host's grid sizing assumes.
    pub min_blocks_per_sm: Option<u32>,
}

impl Budget {
    fn applies_to(&self, r: &KernelResources) -> bool {
        let name = match self.kernel.strip_suffix('*') {
            Some(prefix) => r.kernel.starts_with(prefix),
            None => self.kernel == r.kernel,
        };
        name && self.arch.as_deref().is_none_or(|a| a == r.arch)
    }
}

/// Blocks of `threads` threads that fit on one multiprocessor of `arch` at once with the
/// kernel's registers and static shared memory (plus `dynamic_smem`), by the occupancy rules
/// of the CUDA occupancy calculator: registers are allocated per warp in units of 256 (each
/// thread's count rounded up to 8), from four 16K-register sub-partitions; 1 KiB of shared
/// memory is reserved per block; at most 64 warps and 32 blocks per SM. Shared memory per SM:
/// 228 KiB on sm_90, 164 KiB on sm_80. `None` for an architecture without a table here.
pub fn resident_blocks(r: &KernelResources, threads: u32, dynamic_smem: u32) -> Option<u32> {
    let cc: u32 = r.arch.trim_start_matches("sm_").trim_end_matches('a').parse().ok()?;
    let smem_per_sm: u32 = match cc {
        90 => 228 << 10,
        80 => 164 << 10,
        _ => return None,
    };
    let warps = threads.div_ceil(32).max(1);
    let by_warps = 64 / warps;
    let per_warp_regs = (r.registers.max(1).div_ceil(8) * 8 * 32).div_ceil(256) * 256;
    let warps_by_regs = 4 * ((64 << 10) / 4 / per_warp_regs);
    let by_regs = warps_by_regs / warps;
    let smem = r.smem_bytes + dynamic_smem + 1024;
    let by_smem = smem_per_sm / smem;
    Some(by_warps.min(by_regs).min(by_smem).min(32))
}

/// Reads `// moekit-budget:` directives from a kernel source.
pub fn parse_budgets(source: &str) -> Result<Vec<Budget>, String> {
    let mut out = Vec::new();
    for (i, line) in source.lines().enumerate() {
        let Some(rest) = line.trim().strip_prefix("// moekit-budget:") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let target = words
            .next()
            .ok_or_else(|| format!("line {}: expected `// moekit-budget: <kernel|*> regs<=N smem<=N`", i + 1))?;
        let (kernel, arch) = match target.split_once('@') {
            Some((k, a)) => (k.to_string(), Some(a.to_string())),
            None => (target.to_string(), None),
        };
        let mut b = Budget { kernel, arch, max_regs: None, max_smem: None, threads: None, min_blocks_per_sm: None };
        for w in words {
            let (key, op, value) =
                ["<=", ">=", "="]
                    .iter()
                    .find_map(|op| w.split_once(op).map(|(k, v)| (k, *op, v)))
                    .ok_or_else(|| format!("line {}: expected KEY<=N, KEY>=N or KEY=N, got {w:?}", i + 1))?;
            let v: u32 = value.parse().map_err(|_| format!("line {}: bad number in {w:?}", i + 1))?;
            match (key, op) {
                ("regs", "<=") => b.max_regs = Some(v),
                ("smem", "<=") => b.max_smem = Some(v),
                ("threads", "=") => b.threads = Some(v),
                ("blocks_per_sm", ">=") => b.min_blocks_per_sm = Some(v),
                _ => return Err(format!("line {}: unknown budget {w:?}", i + 1)),
            }
        }
        if b.max_regs.is_none() && b.max_smem.is_none() && b.min_blocks_per_sm.is_none() {
            return Err(format!("line {}: a budget needs regs<=N, smem<=N or blocks_per_sm>=N", i + 1));
        }
        if b.min_blocks_per_sm.is_some() != b.threads.is_some() {
            return Err(format!("line {}: blocks_per_sm>=N and threads=N go together", i + 1));
        }
        out.push(b);
    }
    Ok(out)
}

/// The budgets `r` exceeds, described (`regs 170 > 168`).
pub fn budget_failures(r: &KernelResources, budgets: &[Budget]) -> Vec<String> {
    let mut out = Vec::new();
    for b in budgets.iter().filter(|b| b.applies_to(r)) {
        if let Some(m) = b.max_regs.filter(|&m| r.registers > m) {
            out.push(format!("regs {} > {m}", r.registers));
        }
        if let Some(m) = b.max_smem.filter(|&m| r.smem_bytes > m) {
            out.push(format!("smem {} > {m}", r.smem_bytes));
        }
        if let (Some(want), Some(threads)) = (b.min_blocks_per_sm, b.threads) {
            match resident_blocks(r, threads, 0) {
                Some(got) if got < want => out.push(format!(
                    "blocks_per_sm {got} < {want} ({} regs x {threads} threads, {} B smem)",
                    r.registers, r.smem_bytes
                )),
                _ => {}
            }
        }
    }
    out
}

/// SASS listing of one fatbin, split by (arch, kernel) into lists of instruction mnemonics
/// (with their modifiers, e.g. `LDG.E.128`).
pub fn parse_cuobjdump_sass(listing: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut arch = String::new();
    let mut func: Option<(String, String)> = None;
    for line in listing.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("code for ") {
            arch = a.trim().to_string();
            func = None;
        } else if let Some(f) = t.strip_prefix("Function : ") {
            let key = (arch.clone(), f.trim().to_string());
            out.entry(key.clone()).or_default();
            func = Some(key);
        } else if let (Some(key), Some(rest)) = (func.as_ref(), t.strip_prefix("/*")) {
            // `/*0040*/  @P0 IMAD R5, R5, UR4, R0 ;  /* 0x... */`
            let Some((_, code)) = rest.split_once("*/") else {
                continue;
            };
            let code = code.split("/*").next().unwrap_or("").trim();
            let mut words = code.split_whitespace();
            let Some(mut first) = words.next() else { continue };
            if first.starts_with('@') {
                first = words.next().unwrap_or("");
            }
            if !first.is_empty() {
                if let Some(v) = out.get_mut(key) {
                    v.push(first.to_string());
                }
            }
        }
    }
    out
}

/// Applies `checks` to one kernel's instruction list on `arch`; returns the failed checks'
/// descriptions.
pub fn failed_checks(kernel: &str, arch: &str, instructions: &[String], checks: &[SassCheck]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c.kernel == "*" || c.kernel == kernel)
        .filter(|c| c.arch.as_deref().is_none_or(|a| a == arch))
        .filter(|c| {
            // `MUFU` matches every MUFU.*; a dotted `MUFU.EX2` matches that variant (and its
            // own suffixes) only.
            let m = c.mnemonic.as_str();
            let present = instructions.iter().any(|ins| {
                ins.split('.').next() == Some(m) || (m.contains('.') && (ins == m || ins.starts_with(&format!("{m}."))))
            });
            present != c.require
        })
        .map(SassCheck::describe)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTXAS: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compile time = 2.733 ms
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 372 bytes cmem[0]
";

    #[test]
    fn finds_serialised_wgmma() {
        let r = "ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized \
                 due to program dependence on compiler-inserted WG.DP in divergent path in the function 'k_bf16'\n\
                 ptxas info    : Compiling entry function 'k_fp8' for 'sm_90a'";
        assert_eq!(wgmma_serialized(r), vec!["k_bf16".to_string()]);
        assert!(wgmma_serialized(PTXAS).is_empty());
    }

    #[test]
    fn ptxas_report() {
        let r = parse_ptxas(PTXAS);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                kernel: "k".into(),
                arch: "sm_90a".into(),
                registers: 10,
                smem_bytes: 4096,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12,
                barriers: 1
            }
        );
        assert_eq!((r[1].arch.as_str(), r[1].registers, r[1].smem_bytes), ("sm_80", 12, 0));
    }

    #[test]
    fn sass_checks() {
        let src = "// moekit-sass: * forbid LDL STL\n// moekit-sass: gemm require HGMMA\n// moekit-sass: other@sm_80 require F2FP\nint x;";
        let checks = parse_sass_checks(src).unwrap();
        assert_eq!(checks.len(), 4);
        assert_eq!(checks[3].arch.as_deref(), Some("sm_80"));
        assert!(parse_sass_checks("// moekit-sass: * ban LDL").is_err());
        let listing = "
	code for sm_90a
		Function : gemm
        /*0000*/                   LDC R1, c[0x0][0x28] ;  /* 0x00000a00ff017b82 */
        /*0010*/               @P0 LDL.64 R2, [R1] ;      /* 0x0 */
        /*0020*/                   EXIT ;                  /* 0x0 */
		Function : other
        /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;  /* 0x0 */
";
        let sass = parse_cuobjdump_sass(listing);
        let gemm = &sass[&("sm_90a".to_string(), "gemm".to_string())];
        assert_eq!(gemm, &vec!["LDC".to_string(), "LDL.64".into(), "EXIT".into()]);
        assert_eq!(
            failed_checks("gemm", "sm_90a", gemm, &checks),
            vec!["forbid LDL".to_string(), "require HGMMA".into()]
        );
        let other = &sass[&("sm_90a".to_string(), "other".to_string())];
        assert!(failed_checks("other", "sm_90a", other, &checks).is_empty());
        assert_eq!(failed_checks("other", "sm_80", other, &checks), vec!["require F2FP".to_string()]);
        let budgets = parse_budgets("// moekit-budget: k@sm_90 regs<=64 smem<=1024\n").unwrap();
        let mut r = KernelResources {
            kernel: "k".into(),
            arch: "sm_90".into(),
            registers: 65,
            smem_bytes: 2048,
            ..Default::default()
        };
        assert_eq!(budget_failures(&r, &budgets), vec!["regs 65 > 64".to_string(), "smem 2048 > 1024".into()]);
        r.arch = "sm_80".into();
        assert!(budget_failures(&r, &budgets).is_empty());
        assert!(parse_budgets("// moekit-budget: k regs=3").is_err());
        assert!(parse_budgets("// moekit-budget: k blocks_per_sm>=3").is_err(), "needs threads=N");
    }

    #[test]
    fn occupancy_follows_the_register_and_shared_memory_rules() {
        let k = |regs, smem, arch: &str| KernelResources {
            kernel: "moekit_route_fwd_e8".into(),
            arch: arch.into(),
            registers: regs,
            smem_bytes: smem,
            ..Default::default()
        };
        // 76 registers round to 80: 2560 per warp, 6 warps per sub-partition, 24 per SM: 3 blocks
        // of 8 warps (the gating review's finding); 64 registers allow 4.
        assert_eq!(resident_blocks(&k(76, 0, "sm_90a"), 256, 0), Some(3));
        assert_eq!(resident_blocks(&k(64, 0, "sm_90a"), 256, 0), Some(4));
        assert_eq!(resident_blocks(&k(32, 0, "sm_90"), 256, 0), Some(8), "the 64-warp limit");
        assert_eq!(resident_blocks(&k(16, 0, "sm_90"), 32, 0), Some(32), "the 32-block limit");
        // Shared memory: (100 KiB + 1 KiB reserved) per block, 228 KiB per SM (164 on sm_80).
        assert_eq!(resident_blocks(&k(32, 100 << 10, "sm_90a"), 128, 0), Some(2));
        assert_eq!(resident_blocks(&k(32, 100 << 10, "sm_80"), 128, 0), Some(1));
        assert_eq!(resident_blocks(&k(32, 0, "sm_75"), 128, 0), None);
        let budgets = parse_budgets("// moekit-budget: moekit_route_fwd_* threads=256 blocks_per_sm>=4\n").unwrap();
        assert_eq!(budget_failures(&k(64, 0, "sm_90a"), &budgets), Vec::<String>::new());
        assert_eq!(
            budget_failures(&k(76, 0, "sm_90a"), &budgets),
            vec!["blocks_per_sm 3 < 4 (76 regs x 256 threads, 0 B smem)".to_string()]
        );
        let other = KernelResources { kernel: "moekit_route_bwd_e8".into(), ..k(76, 0, "sm_90a") };
        assert!(budget_failures(&other, &budgets).is_empty(), "the prefix selects kernels");
        let dotted = parse_sass_checks("// moekit-sass: * forbid MUFU.EX2").unwrap();
        let rcp = vec!["MUFU.RCP".to_string(), "FFMA".into()];
        assert!(failed_checks("k", "sm_90", &rcp, &dotted).is_empty());
        let ex2 = vec!["MUFU.EX2".to_string()];
        assert_eq!(failed_checks("k", "sm_90", &ex2, &dotted), vec!["forbid MUFU.EX2".to_string()]);
    }
}

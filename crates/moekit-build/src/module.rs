//! Kernel modules and the GPU architectures they are compiled for.

use std::fmt;
use std::path::PathBuf;

/// Which GPUs a module targets; picks the default architecture list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchClass {
    /// Hopper-only code (wgmma, TMA, setmaxnreg): `sm_90a` SASS only.
    Hopper,
    /// Code for any GPU from Ampere on: `sm_80` and `sm_90` SASS plus `compute_80` PTX.
    Portable,
}

impl ArchClass {
    /// Stable lower-case name used in generated code and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchClass::Hopper => "hopper",
            ArchClass::Portable => "portable",
        }
    }
}

/// One compilation target: SASS for a real architecture (`sm_90a`) or PTX for a virtual one
/// (`compute_80`), which the driver JIT-compiles for newer GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Machine code (`sm_XX` or `sm_XXa`).
    Sass(String),
    /// Portable PTX (`compute_XX`).
    Ptx(String),
}

impl Arch {
    /// Parses `sm_90a`, `sm_80`, `compute_80`.
    pub fn parse(s: &str) -> Result<Arch, String> {
        let s = s.trim();
        let valid = |digits: &str| {
            let d = digits.trim_end_matches('a');
            d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit())
        };
        if let Some(rest) = s.strip_prefix("sm_") {
            if valid(rest) {
                return Ok(Arch::Sass(s.to_string()));
            }
        } else if let Some(rest) = s.strip_prefix("compute_") {
            if valid(rest) {
                return Ok(Arch::Ptx(s.to_string()));
            }
        }
        Err(format!("not a CUDA architecture: {s:?} (expected e.g. sm_90a, sm_80, compute_80)"))
    }

    /// The nvcc `-gencode` value for this target.
    pub fn gencode(&self) -> String {
        match self {
            Arch::Sass(sm) => format!("arch=compute_{},code={sm}", &sm[3..]),
            Arch::Ptx(c) => format!("arch={c},code={c}"),
        }
    }

    /// Numeric compute capability times ten (90 for `sm_90a`).
    pub fn number(&self) -> u32 {
        let s = match self {
            Arch::Sass(s) => &s[3..],
            Arch::Ptx(s) => &s[8..],
        };
        s.trim_end_matches('a').parse().unwrap_or(0)
    }

    /// Whether this is an arch-specific (`a`) target that runs only on that exact major.minor.
    pub fn is_arch_specific(&self) -> bool {
        matches!(self, Arch::Sass(s) if s.ends_with('a'))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Sass(s) | Arch::Ptx(s) => f.write_str(s),
        }
    }
}

/// The default architecture list of a class.
pub fn default_archs(class: ArchClass) -> Vec<Arch> {
    match class {
        ArchClass::Hopper => vec![Arch::Sass("sm_90a".into())],
        ArchClass::Portable => {
            vec![Arch::Sass("sm_80".into()), Arch::Sass("sm_90".into()), Arch::Ptx("compute_80".into())]
        }
    }
}

/// Architectures for a module: `MOEKIT_CUDA_ARCHS` (comma-separated, e.g. `sm_90a` or
/// `sm_80,sm_90,compute_80`) overrides the class default. Hopper modules keep only targets of
/// compute capability 9.0 or higher from an override, since their code cannot compile lower.
pub fn archs_for(class: ArchClass, override_list: Option<&str>) -> Result<Vec<Arch>, String> {
    let Some(list) = override_list.filter(|s| !s.trim().is_empty()) else {
        return Ok(default_archs(class));
    };
    let mut archs = Vec::new();
    for item in list.split(',').filter(|s| !s.trim().is_empty()) {
        archs.push(Arch::parse(item)?);
    }
    if class == ArchClass::Hopper {
        archs.retain(|a| a.number() >= 90);
        if archs.is_empty() {
            archs = default_archs(ArchClass::Hopper);
        }
    }
    archs.sort();
    archs.dedup();
    Ok(archs)
}

/// One `.cu` file compiled to one fatbin and embedded in a kernel crate.
#[derive(Debug, Clone)]
pub struct KernelModule {
    /// Identifier: lower-case, `[a-z0-9_]`; names the Rust constant (upper-cased) and the
    /// cache files.
    pub name: String,
    /// The `.cu` source.
    pub source: PathBuf,
    /// Target class.
    pub class: ArchClass,
    /// Extra nvcc flags (part of the cache key).
    pub extra_flags: Vec<String>,
}

impl KernelModule {
    /// A module for every GPU from sm_80 on.
    pub fn portable(name: &str, source: impl Into<PathBuf>) -> Self {
        Self::new(name, source, ArchClass::Portable)
    }

    /// A Hopper-only module (`sm_90a`).
    pub fn hopper(name: &str, source: impl Into<PathBuf>) -> Self {
        Self::new(name, source, ArchClass::Hopper)
    }

    fn new(name: &str, source: impl Into<PathBuf>, class: ArchClass) -> Self {
        KernelModule { name: name.to_string(), source: source.into(), class, extra_flags: Vec::new() }
    }

    /// A module whose class is declared in its source by a `// moekit-arch: portable` or
    /// `// moekit-arch: hopper` line, named after the file stem. The single source of truth
    /// that both kernel crates' build scripts and `cargo xtask build-kernels` read.
    pub fn from_source(source: impl Into<PathBuf>) -> Result<Self, String> {
        let source = source.into();
        let text = std::fs::read_to_string(&source).map_err(|e| format!("reading {}: {e}", source.display()))?;
        let class = match text.lines().find_map(|l| l.trim().strip_prefix("// moekit-arch:")).map(str::trim) {
            Some("portable") => ArchClass::Portable,
            Some("hopper") => ArchClass::Hopper,
            Some(other) => return Err(format!("{}: unknown moekit-arch {other:?}", source.display())),
            None => return Err(format!("{}: missing `// moekit-arch: portable|hopper` line", source.display())),
        };
        let name = source
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .ok_or_else(|| format!("{}: file stem must be [a-z0-9_]", source.display()))?
            .to_string();
        Ok(Self::new(&name, source, class))
    }

    /// Adds an nvcc flag.
    pub fn flag(mut self, flag: &str) -> Self {
        self.extra_flags.push(flag.to_string());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_gencode() {
        assert_eq!(Arch::parse("sm_90a").unwrap().gencode(), "arch=compute_90a,code=sm_90a");
        assert_eq!(Arch::parse("compute_80").unwrap().gencode(), "arch=compute_80,code=compute_80");
        assert_eq!(Arch::parse("sm_80").unwrap().number(), 80);
        assert!(Arch::parse("sm_90a").unwrap().is_arch_specific());
        assert!(Arch::parse("sm_9").is_err());
        assert!(Arch::parse("gfx90a").is_err());
        assert!(Arch::parse("sm_").is_err());
    }

    #[test]
    fn override_list() {
        let p = archs_for(ArchClass::Portable, Some("sm_90a, sm_80")).unwrap();
        assert_eq!(p, vec![Arch::Sass("sm_80".into()), Arch::Sass("sm_90a".into())]);
        // A Hopper module drops targets it cannot compile for.
        let h = archs_for(ArchClass::Hopper, Some("sm_80,sm_90a")).unwrap();
        assert_eq!(h, vec![Arch::Sass("sm_90a".into())]);
        assert_eq!(archs_for(ArchClass::Hopper, None).unwrap(), default_archs(ArchClass::Hopper));
        assert!(archs_for(ArchClass::Portable, Some("bogus")).is_err());
    }
}

//! Project header dependencies of a `.cu` file, found by scanning `#include "..."` lines.
//!
//! Only quoted includes are followed (angle-bracket includes are toolkit headers, covered by
//! the nvcc version in the cache key). A quoted include is resolved against the including
//! file's directory first, then each include directory, as nvcc does.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Returns every project header `source` includes, directly or not, sorted and canonical.
/// A quoted include that resolves nowhere is ignored here (nvcc reports it).
pub fn scan_includes(source: &Path, include_dirs: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![source.to_path_buf()];
    while let Some(file) = stack.pop() {
        let text = fs::read_to_string(&file)?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        for name in quoted_includes(&text) {
            let candidates = std::iter::once(dir.join(&name)).chain(include_dirs.iter().map(|d| d.join(&name)));
            if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
                let found = found.canonicalize()?;
                if seen.insert(found.clone()) {
                    stack.push(found);
                }
            }
        }
    }
    Ok(seen.into_iter().collect())
}

/// The file names of `#include "name"` directives in `text`.
fn quoted_includes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('#')?.trim_start().strip_prefix("include")?;
            let rest = rest.trim_start().strip_prefix('"')?;
            rest.find('"').map(|end| rest[..end].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_headers_once() {
        let dir = std::env::temp_dir().join(format!("moekit-deps-{}", std::process::id()));
        let inc = dir.join("include");
        fs::create_dir_all(inc.join("moekit")).unwrap();
        fs::write(dir.join("k.cu"), "#include <cuda_bf16.h>\n#include \"moekit/a.cuh\"\n  #  include \"local.cuh\"\n")
            .unwrap();
        fs::write(dir.join("local.cuh"), "#include \"moekit/a.cuh\"\n").unwrap();
        fs::write(inc.join("moekit/a.cuh"), "#include \"b.cuh\"\n").unwrap();
        fs::write(inc.join("moekit/b.cuh"), "// leaf\n").unwrap();
        let deps = scan_includes(&dir.join("k.cu"), std::slice::from_ref(&inc)).unwrap();
        let names: Vec<_> = deps.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(deps.len(), 3, "{names:?}");
        for n in ["local.cuh", "a.cuh", "b.cuh"] {
            assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
        }
        fs::remove_dir_all(&dir).ok();
    }
}

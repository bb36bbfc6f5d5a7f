//! The README's "Use from candle / mistral.rs" snippet is the crate's doc test (which
//! `cargo test` runs): the two copies must stay the same text.

/// The first ```rust block after `heading` in `text`, with `prefix` stripped from each line.
fn block(text: &str, heading: &str, prefix: &str) -> String {
    let start = text.find(heading).unwrap_or_else(|| panic!("no {heading:?}"));
    let mut lines =
        text[start..].lines().map(|l| l.strip_prefix(prefix).unwrap_or(l.trim_end_matches(prefix.trim_end())));
    lines.by_ref().find(|l| l.starts_with("```")).expect("no code block");
    lines.take_while(|l| !l.starts_with("```")).map(|l| format!("{l}\n")).collect()
}

#[test]
fn readme_snippet_is_the_doc_test() {
    let readme = block(include_str!("../../../README.md"), "## Use from candle / mistral.rs", "");
    let docs = block(include_str!("../src/lib.rs"), "//! # Use from candle / mistral.rs", "//! ");
    assert!(readme.contains("MoeExperts::new") && readme.contains(".backward()"), "{readme}");
    assert_eq!(readme, docs, "README snippet and the crate's doc test differ");
}

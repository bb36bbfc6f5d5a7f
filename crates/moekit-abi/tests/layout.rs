//! Every ABI struct laid out by rustc (the committed bindings) equals the C compiler's layout
//! of `kernels/include/moekit/abi.h`: size, alignment and each field's offset.

use moekit_abi::layout::RUST_LAYOUT;

#[test]
fn rust_layout_equals_c_layout() {
    let c = moekit_cuda_oracle::abi_c_layout();
    assert_eq!(
        c.len(),
        RUST_LAYOUT.len(),
        "the C probe and the Rust table list different fields: run `cargo xtask codegen`"
    );
    for (&(strukt, field, rust), &c) in RUST_LAYOUT.iter().zip(c) {
        let what = if field.is_empty() { "size".to_string() } else { format!("field {field}") };
        assert_eq!(rust, c, "{strukt} {what}: rustc says {rust}, the C compiler says {c}");
    }
}

#[test]
fn param_structs_are_multiples_of_8_bytes() {
    for &(strukt, field, size) in RUST_LAYOUT {
        if field.is_empty() {
            assert_eq!(size % 8, 0, "{strukt} is {size} bytes: abi.h requires explicit padding to 8");
        }
    }
}

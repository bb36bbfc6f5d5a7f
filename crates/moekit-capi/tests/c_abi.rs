//! Compiles `tests/c/abi_test.c` with the host C compiler against the built cdylib and the
//! committed header, and runs it: the C ABI as a C program sees it.

mod common;

use std::process::Command;

#[test]
fn c_program_gets_known_values_and_error_statuses() {
    let test = "c_program_gets_known_values_and_error_statuses";
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if !Command::new(&cc).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return common::skip(test, &format!("no C compiler (`{cc}`)"));
    }
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = common::lib_dir();
    let exe = common::scratch("capi-c-test").join("abi_test");
    let build = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(format!("-DMOEKIT_EXPECTED_VERSION=\"{}\"", env!("CARGO_PKG_VERSION")))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/abi_test.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lmoekit_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .expect("run the C compiler");
    assert!(build.status.success(), "C build failed:\n{}", String::from_utf8_lossy(&build.stderr));
    // cargo puts target/<profile> (whose copy of the library may be stale) on LD_LIBRARY_PATH,
    // which takes precedence over the rpath: name the fresh one.
    let run = Command::new(&exe).env("LD_LIBRARY_PATH", &lib).output().expect("run abi_test");
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    eprint!("{err}");
    assert!(run.status.success(), "abi_test failed ({}):\n{out}{err}", run.status);
    assert!(out.contains("abi_test: all checks passed"), "{out}");
    let _ = std::fs::remove_dir_all(exe.parent().expect("scratch dir"));
}

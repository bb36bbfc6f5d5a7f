fn main() {
    moekit_build::embed_kernel_sources(&[
        "../../kernels/tests/emu_selftest.cu",
        "../../kernels/tests/emu_selftest_sm90.cu",
    ]);
}

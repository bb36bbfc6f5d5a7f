fn main() {
    moekit_build::embed_kernel_sources(&["../../kernels/tests/emu_selftest.cu"]);
}

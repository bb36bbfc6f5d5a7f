fn main() {
    moekit_build::embed_kernel_sources(&["../../kernels/optim.cu"]);
}

fn main() {
    moekit_build::embed_kernel_sources(&["../../kernels/logits.cu", "../../kernels/sampling.cu"]);
}

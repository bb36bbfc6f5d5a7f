fn main() {
    moekit_build::embed_kernel_sources(&[
        "../../kernels/gemm_portable.cu",
        "../../kernels/gemm_sm90.cu",
        "../../kernels/quant_blocks.cu",
    ]);
}

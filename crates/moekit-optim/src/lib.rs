//! AdamW over many tensors in few launches, deterministic global gradient norm and clipping: CPU reference and CUDA kernels.
//!
//! Skeleton: being built (issue 13).

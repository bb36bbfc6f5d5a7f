//! Causal multi-head attention (flash-style, online softmax), forward, backward and KV-cache decode: CPU reference and CUDA kernels.
//!
//! Skeleton: being built (issue 13).

//! Token embedding (gather, deterministic gradient), RMSNorm, residual add, RoPE: CPU reference and CUDA kernels, forward and backward.
//!
//! Skeleton: being built (issue 13).

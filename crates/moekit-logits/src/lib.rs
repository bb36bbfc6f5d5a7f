//! Log-softmax over the LM head logits (per-token log-probabilities, entropy, cross-entropy gradient) and device sampling (temperature, top-k, top-p, Philox): CPU reference and CUDA kernels.
//!
//! Skeleton: being built (issue 13).

//! moekit's MoE ops as candle [`CustomOp1`](candle_core::CustomOp1)s and
//! [`CustomOp2`](candle_core::CustomOp2)s with backward passes, so that candle's autograd
//! trains through them, and [`MoeExperts`], the routed experts with mistral.rs's call shape.
//!
//! | op | inputs | output | gradient to |
//! |---|---|---|---|
//! | [`route`] | logits `[T, E]` F32/BF16, bias `[E]` F32 | ids `[T, k]` U32, weights `[T, k]` F32, counts `[E]` I32 | logits (weights only; the bias gets none) |
//! | [`route_replay`] | logits, given ids `[T, k]` U32/I32 | weights `[T, k]` F32 | logits |
//! | [`dispatch_layout`] | ids `[T, k]` U32/I32 | [`DispatchLayout`] (I32 tensors) | - |
//! | [`permute`] | x `[T, H]` BF16 | `[max_rows, H]` BF16 | x |
//! | [`permute_fp8`] | x `[T, H]` BF16 | [`Fp8Activation`]: `[max_rows, H]` F8E4M3 + 1x128 F32 scales | - (forward only) |
//! | [`grouped_gemm_contiguous`] | a `[M, K]`, b `[G, N, K]` BF16, m_indices `[M]` | `[M, N]` BF16 | a, b |
//! | [`grouped_gemm_masked`] | a `[G, M, K]`, b `[G, N, K]` BF16, masked_m `[G]` | `[G, M, N]` BF16 | a, b |
//! | [`grouped_gemm_contiguous_fp8`] | [`Fp8Activation`], [`Fp8Weights`], m_indices | `[M, N]` BF16 | - (forward only) |
//! | [`swiglu`] | `[rows, 2 I]` BF16 (gate, then up) | `[rows, I]` BF16 | input |
//! | [`combine`] | y `[max_rows, H]` BF16, weights `[T, k]` F32 | `[T, H]` BF16 | y, weights |
//!
//! Weights are `[experts, out, in]` (candle's and mistral.rs's layout, and moekit's NT GEMM).
//! Inputs may have any layout (they are made contiguous first); ids may be U32 (candle's
//! `arg_sort` output; `u32::MAX` means "not routed") or I32 (moekit's; `-1`).
//!
//! # What runs
//! On a CPU tensor every op runs moekit's CPU path: the tensor ops of moekit-gating,
//! moekit-dispatch and moekit-gemm on `moekit_tensor::Device::Cpu` (their references), so the
//! results are **bit-identical** to moekit's, forward and backward (the tests check it). That
//! path is a reference: the grouped GEMM accumulates in f64 element by element, fine for tests
//! and small models, not for speed. Bad shapes, dtypes and devices are
//! `candle_core::Error::Msg`, moekit's own errors are wrapped (`Error::Wrapped`, moekit's
//! message); nothing panics on bad input.
//!
//! # CUDA
//! With the `cuda` feature (off by default; the default build pulls in no CUDA crate of
//! candle) the same ops take candle's CUDA tensors and run moekit's kernels through the raw
//! launchers of moekit-gating, moekit-dispatch and moekit-gemm. **This path type-checks
//! (`cargo check --features cuda --tests`) but has not run on a GPU yet**; the `gpu_*` tests
//! (`tests/gpu.rs`, ignored: `--ignored gpu_`) compare every op with the CPU path on a GPU.
//! - **Buffers**: each input's `CudaStorage` slice is read at its device address on
//!   candle's stream (cudarc's `DevicePtr`, the layout's start offset respected; inputs are
//!   made contiguous first), as a `moekit_cuda::DevPtr` in candle's context. Outputs are
//!   allocated by candle's device on its stream (zeroed where a kernel leaves rows unwritten,
//!   so that padding is zero as on the CPU); the only other allocations are moekit's layout
//!   scratch and the intermediates of the backward passes below.
//! - **Stream and context**: candle's `CUstream` is wrapped by
//!   `moekit_cuda::Stream::borrowed` and its context by `moekit_cuda::Gpu::borrow_context`
//!   (kept per context, so moekit's modules load once); moekit never destroys or releases
//!   either, and the calling thread's current context is restored after each op.
//! - **No synchronisation**: nothing is read back, except where asked:
//!   [`DispatchLayout::rows_used`] and [`DispatchLayout::check`] (on CUDA, [`dispatch_layout`]
//!   skips ids outside `[-1, E)` as moekit's kernels do; `check` reads moekit's report), and
//!   [`Fp8Weights::quantize`] (a host-side weight preparation).
//! - **Results**: routing, the dispatch layout, permute (BF16 and FP8), SwiGLU and combine,
//!   forward and backward, are the CPU path's bits (the kernel crates promise it). The grouped
//!   GEMMs accumulate in f32 (the CPU path in f64): within the tolerances `tests/gpu.rs`
//!   argues. Their weight gradient lays each group's rows out with moekit's dispatch layout
//!   (`top_k = 1`, alignment 1), permutes them and runs moekit's k-grouped GEMM (f32, rounded
//!   to BF16); so on CUDA the number of groups is at most moekit-dispatch's 1024 experts.
//! - **Differences from the CPU path**: [`route_replay`] reads the ids back once on CUDA to
//!   reject ids out of range (its kernel would give them weight 0); `masked_m` values past `M`
//!   are clamped by the kernel instead of rejected (they are in device memory).
//! - Errors are `candle_core::Error::Msg` or moekit's wrapped, never panics.
//!
//! Linking a test binary with the feature needs libcuda at build time (candle's cudarc is
//! `dynamic-linking`), so the GPU bundle (`cargo xtask gpu-bundle`) does not carry these tests.

//! # Use from candle / mistral.rs
//! The snippet of the workspace README (a test checks that the two are the same text):
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var, D};
//! use moekit_candle::MoeExperts;
//!
//! fn main() -> candle_core::Result<()> {
//!     let dev = Device::Cpu;
//!     let (tokens, hidden, inter, experts, top_k) = (6, 32, 16, 8, 2);
//!     // Expert weights as mistral.rs loads them: [E, out, in], BF16.
//!     let gate_up = Var::from_tensor(&(Tensor::randn(0f32, 0.1, (experts, 2 * inter, hidden), &dev)?.to_dtype(DType::BF16)?))?;
//!     let down = Var::from_tensor(&(Tensor::randn(0f32, 0.1, (experts, hidden, inter), &dev)?.to_dtype(DType::BF16)?))?;
//!     let moe = MoeExperts::new(gate_up.as_tensor().clone(), down.as_tensor().clone(), top_k)?;
//!
//!     // The model's own router (here: softmax, top-k by arg_sort, renormalised), as in mistral.rs.
//!     let xs = Tensor::randn(0f32, 1.0, (tokens, hidden), &dev)?.to_dtype(DType::BF16)?;
//!     let router = Tensor::randn(0f32, 0.5, (hidden, experts), &dev)?;
//!     let logits = xs.to_dtype(DType::F32)?.matmul(&router)?;
//!     let probs = (logits.exp()?.broadcast_div(&logits.exp()?.sum_keepdim(D::Minus1)?))?;
//!     let topk_ids = probs.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, top_k)?.contiguous()?;
//!     let topk_weights = probs.gather(&topk_ids, D::Minus1)?;
//!     let topk_weights = topk_weights.broadcast_div(&topk_weights.sum_keepdim(D::Minus1)?)?;
//!
//!     let ys = moe.forward(&xs, &topk_weights, &topk_ids)?; // [tokens, hidden] BF16
//!     assert_eq!(ys.dims(), &[tokens, hidden]);
//!
//!     // candle's autograd runs through moekit's backward passes.
//!     let grads = ys.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
//!     assert_eq!(grads.get(gate_up.as_tensor()).expect("gate_up grad").dims(), gate_up.dims());
//!     assert!(grads.get(&router).is_none()); // a constant here; a Var would get its gradient too
//!     Ok(())
//! }
//! ```

mod convert;
#[cfg(feature = "cuda")]
mod cuda;
mod dispatch;
mod experts;
mod gemm;
mod routing;

pub use dispatch::{combine, dispatch_layout, permute, permute_fp8, swiglu, DispatchLayout, Fp8Activation};
pub use experts::MoeExperts;
pub use gemm::{grouped_gemm_contiguous, grouped_gemm_contiguous_fp8, grouped_gemm_masked, Fp8Weights};
pub use moekit_dispatch::{DispatchConfig, Padding, ScaleKind, ScaleLayout};
pub use moekit_gating::{RouterConfig, ScoreFunc};
pub use routing::{route, route_replay, Routing};

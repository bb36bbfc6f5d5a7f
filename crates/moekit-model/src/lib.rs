//! A small DeepSeek-style MoE transformer with an explicit forward and backward (no autograd
//! framework), in the manner of llm.c: each layer's forward beside its backward, a fast f32
//! CPU path, and the routed experts on moekit's kernels on any device.
//!
//! - [`config`]: [`ModelConfig`] (TOML, presets, validation naming the field);
//! - [`params`]: the parameters' names, shapes and order;
//! - [`layers`]: RMSNorm, RoPE, causal attention, SwiGLU;
//! - [`moe`]: the MoE layer (router, shared experts, routed experts on an [`Experts`]
//!   backend, router replay, balance loss);
//! - [`model`]: [`Model`] forward/backward, KV-cache decoding;
//! - [`loss`]: log-probabilities, entropies, cross-entropy and their gradients;
//! - [`generate`]: batched sampling (temperature, top-k, top-p, EOS);
//! - [`optim`]: AdamW, clipping, warmup + cosine;
//! - [`checkpoint`]: safetensors checkpoints, written atomically;
//! - [`device`]: the whole training step on moekit's kernels, device-resident
//!   ([`device::DeviceTrainer`]).
//!
//! ```
//! use moekit_model::{loss, Model, ModelConfig, AdamW, AdamWConfig};
//! let cfg = ModelConfig { n_layers: 2, max_seq_len: 8, ..ModelConfig::default() };
//! let mut model = Model::new(cfg, 0).unwrap();
//! let mut opt = AdamW::new(AdamWConfig::default(), &model.params).unwrap();
//! let tokens: Vec<u32> = (0..16).map(|i| i % 10).collect(); // 2 sequences of 8
//! let fwd = model.forward(&tokens, 2, 8, None).unwrap();
//! let targets = moekit_model::generate::next_token_targets(&tokens, 2, 8);
//! let (loss, dlogits) = loss::cross_entropy(&fwd.logits, model.cfg.vocab_size, &targets);
//! let grads = model.backward(&fwd, &dlogits).unwrap();
//! opt.step(&mut model.params, &grads).unwrap();
//! assert!(loss.is_finite());
//! ```

/// Compiles `$name` twice, for AVX2 + FMA and portable, and picks one at run time: the
/// elementwise loops (and moekit's polynomial `exp`) then vectorise. The bits are the same on
/// both paths: `mul_add` is fused either way and nothing else differs.
macro_rules! simd_fn {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the two features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod generate;
pub mod layers;
pub mod linalg;
pub mod loss;
pub mod model;
pub mod moe;
pub mod optim;
pub mod params;
pub mod rng;

pub use config::{ModelConfig, MoeConfig, Precision, Score};
pub use generate::{Generation, SampleConfig};
pub use model::{Forward, KvCache, Model};
pub use moe::Experts;
pub use optim::{AdamW, AdamWConfig, StepInfo};
pub use params::Params;
pub use rng::Rng;

/// Asks glibc's malloc to keep freed memory for reuse instead of returning it to the system
/// (`M_TRIM_THRESHOLD` and `M_MMAP_THRESHOLD` at 1 GiB) and to serve every thread from one
/// arena (`M_ARENA_MAX` 1: the per-thread arenas' heaps are unmapped when a step frees them,
/// whatever the trim threshold). A training step allocates and frees tens of MB of
/// activations; by default glibc gives that memory back after each step and the next step
/// page-faults it in again, which costs a quarter of the step on this model (measured 126 ->
/// 86 ms per step on one thread; on two threads runs alternated between 55 and 80-100 ms until
/// the single arena; see kernels/NOTES.md). Process-wide, so only applications call it (the
/// GRPO command line and the benchmarks do); a no-op on other platforms. Returns whether the
/// settings were applied.
pub fn tune_host_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes malloc's tuning parameters; it is thread-safe and takes
        // plain integers.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, GIB) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, GIB) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value outside what is allowed.
    #[error("config: {field} = {value}: must be {allowed}")]
    Config {
        /// The field (dotted path).
        field: String,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// A configuration file that does not parse.
    #[error("config: {0}")]
    ConfigParse(String),
    /// Bad input to a model call (shapes, token ids, lengths).
    #[error("{0}")]
    InvalidInput(String),
    /// A checkpoint that cannot be read or written.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// An error of a kernel crate (shapes, devices, CUDA).
    #[error(transparent)]
    Kernel(#[from] moekit_tensor::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

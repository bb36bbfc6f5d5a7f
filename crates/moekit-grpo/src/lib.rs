//! Group Relative Policy Optimization (DeepSeekMath's GRPO and its variants) for any policy
//! that gives per-token log-probabilities: the objective's value and its gradient with respect
//! to those log-probabilities, which the policy's backward takes (`moekit-model`:
//! `loss::logits_grad`).
//!
//! - [`advantages`]: group-relative advantages (scaled by the group's or the batch's
//!   Bessel-corrected std, or not at all; RLOO baseline as an option);
//! - [`loss`]: the clipped surrogate with separate low/high epsilon, k3 KL to a reference,
//!   the aggregations grpo / bnpo / dr_grpo / dapo, token- or sequence-level (GSPO) ratios;
//! - [`sampling`]: dynamic sampling (keep only groups whose rewards differ) and truncation
//!   masking.
//!
//! All arithmetic is f64, in a fixed order: the same inputs give the same bits.
//!
//! ```
//! use moekit_grpo::advantages::{advantages, AdvantageConfig};
//! let a = advantages(&[1.0, 0.0, 1.0, 0.0], 4, &AdvantageConfig::default()).unwrap();
//! assert!((a.values[0] - 0.8660).abs() < 1e-3 && (a.values[1] + 0.8660).abs() < 1e-3);
//! ```

pub mod advantages;
pub mod loss;
pub mod run;
pub mod sampling;
pub mod task;
pub mod trainer;

/// Errors of the GRPO core.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// A configuration value outside what is allowed.
    #[error("config: {field} = {value}: must be {allowed}")]
    Config {
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// Inputs whose lengths or values do not fit together.
    #[error("{0}")]
    InvalidInput(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn bad(field: &str, value: impl std::fmt::Display, allowed: &str) -> Error {
    Error::Config { field: field.into(), value: value.to_string(), allowed: allowed.into() }
}

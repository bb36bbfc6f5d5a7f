//! A tiny policy and run for the trainer's tests (debug builds are slow).

use moekit_grpo::task::TaskKind;
use moekit_grpo::trainer::TrainConfig;
use moekit_model::{ModelConfig, MoeConfig};

/// 4 prompts x 4 completions on a 2-block, 32-wide MoE model.
pub fn tiny(task: TaskKind, steps: usize) -> TrainConfig {
    let mut cfg = TrainConfig {
        task,
        prompts_per_step: 4,
        num_generations: 4,
        steps,
        model: ModelConfig {
            d_model: 32,
            n_layers: 2,
            n_heads: 2,
            dense_ffn_dim: 32,
            max_seq_len: 12,
            moe: MoeConfig {
                experts: 4,
                top_k: 2,
                expert_dim: 16,
                n_groups: 2,
                topk_groups: 2,
                ..MoeConfig::default()
            },
            ..ModelConfig::default()
        },
        ..TrainConfig::default()
    };
    cfg.optim.total_steps = steps;
    cfg
}

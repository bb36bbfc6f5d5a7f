//! Verifiable toy tasks that a ~1M-parameter policy learns from scratch, and the trait for
//! users' own.
//!
//! Vocabulary (the model's default 16 tokens): digits `0..=9` are tokens 0-9, then [`BOS`],
//! [`SEP`], [`EOS`], [`PAD`]. A prompt is `BOS digits SEP`; the completion is scored against a
//! target that ends with `EOS`.

use moekit_model::Rng;
use serde::{Deserialize, Serialize};

/// Beginning of a prompt.
pub const BOS: u32 = 10;
/// End of the prompt's digits.
pub const SEP: u32 = 11;
/// End of a completion.
pub const EOS: u32 = 12;
/// Padding (never sampled by the tasks).
pub const PAD: u32 = 13;

/// One reward function's value for a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Reward {
    /// Its name (logged as `rewards/<name>/mean`).
    pub name: &'static str,
    /// The value.
    pub value: f64,
    /// Its weight in the total reward (0: logged only).
    pub weight: f64,
}

/// A task: prompts and weighted reward functions.
pub trait Task: Send + Sync {
    /// Short name (`reverse-3`).
    fn name(&self) -> String;
    /// Prompt length in tokens (all prompts of a task have it).
    fn prompt_len(&self) -> usize;
    /// Completion tokens to sample at most (the target's length, EOS included, or more).
    fn max_completion(&self) -> usize;
    /// A random training prompt (never a held-out one).
    fn prompt(&self, rng: &mut Rng) -> Vec<u32>;
    /// A random held-out prompt, for evaluation (default: a training prompt, for tasks that
    /// keep no held-out set).
    fn heldout_prompt(&self, rng: &mut Rng) -> Vec<u32> {
        self.prompt(rng)
    }
    /// The reward functions' values for `completion` (sampled tokens, EOS and after included).
    fn rewards(&self, prompt: &[u32], completion: &[u32]) -> Vec<Reward>;
}

/// The built-in tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TaskKind {
    /// Reverse `digits` digits.
    Reverse {
        /// Digits in the prompt.
        digits: usize,
    },
    /// `(a + b) mod 10` of two digits.
    AddMod10,
    /// Sort `digits` digits ascending (a longer completion).
    Sort {
        /// Digits in the prompt.
        digits: usize,
    },
}

impl TaskKind {
    /// The task object.
    pub fn build(self) -> Box<dyn Task> {
        Box::new(DigitTask { kind: self })
    }
}

/// The built-in tasks: a target sequence computed from the prompt's digits, scored per
/// position (EOS included, so stopping is learnt), with exact match logged separately.
#[derive(Debug, Clone, Copy)]
pub struct DigitTask {
    /// Which one.
    pub kind: TaskKind,
}

impl DigitTask {
    fn digits(&self) -> usize {
        match self.kind {
            TaskKind::Reverse { digits } | TaskKind::Sort { digits } => digits,
            TaskKind::AddMod10 => 2,
        }
    }

    /// Whether a prompt's digits belong to the held-out tenth (a hash of the digits), which
    /// training never samples.
    pub fn is_heldout(digits: &[u32]) -> bool {
        let h = digits.iter().fold(17u32, |h, &d| (h * 31 + d) % 1009);
        h % 10 == 3
    }

    /// A random prompt from the held-out or the training part.
    fn draw(&self, rng: &mut Rng, heldout: bool) -> Vec<u32> {
        loop {
            let d: Vec<u32> = (0..self.digits()).map(|_| rng.below(10) as u32).collect();
            if Self::is_heldout(&d) == heldout {
                let mut p = vec![BOS];
                p.extend(d);
                p.push(SEP);
                return p;
            }
        }
    }

    /// The target completion for `prompt` (`BOS digits SEP`), EOS included.
    pub fn target(&self, prompt: &[u32]) -> Vec<u32> {
        let d: Vec<u32> = prompt.iter().copied().filter(|&t| t < 10).collect();
        let mut t = match self.kind {
            TaskKind::Reverse { .. } => d.iter().rev().copied().collect(),
            TaskKind::Sort { .. } => {
                let mut s = d.clone();
                s.sort_unstable();
                s
            }
            TaskKind::AddMod10 => vec![(d.iter().sum::<u32>()) % 10],
        };
        t.push(EOS);
        t
    }
}

impl Task for DigitTask {
    fn name(&self) -> String {
        match self.kind {
            TaskKind::Reverse { digits } => format!("reverse-{digits}"),
            TaskKind::Sort { digits } => format!("sort-{digits}"),
            TaskKind::AddMod10 => "add-mod-10".into(),
        }
    }
    fn prompt_len(&self) -> usize {
        self.digits() + 2
    }
    fn max_completion(&self) -> usize {
        self.target(&vec![0; self.prompt_len()]).len() + 1
    }
    fn prompt(&self, rng: &mut Rng) -> Vec<u32> {
        self.draw(rng, false)
    }
    fn heldout_prompt(&self, rng: &mut Rng) -> Vec<u32> {
        self.draw(rng, true)
    }
    fn rewards(&self, prompt: &[u32], completion: &[u32]) -> Vec<Reward> {
        let target = self.target(prompt);
        let hits = target.iter().enumerate().filter(|(i, &t)| completion.get(*i) == Some(&t)).count();
        let exact = completion.len() >= target.len() && completion[..target.len()] == target[..];
        vec![
            Reward { name: "position", value: hits as f64 / target.len() as f64, weight: 1.0 },
            Reward { name: "exact", value: exact as u32 as f64, weight: 0.0 },
        ]
    }
}

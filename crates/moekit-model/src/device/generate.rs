//! Device-resident batched generation: [`DeviceGenerator`].
//!
//! ```text
//! prefill (eager, once):  prompts [B, P] -> the blocks with cached attention (start 0, S = P)
//!                         -> row gather of each prompt's last position -> head -> logits [B, V]
//! token 0:                sample(logits, seed, step = P) -> tok[0]; log_softmax -> logp[0]
//! token t >= 1:           ids_in <- tok[t-1] (device copy)
//!                         decode step at position pos = P + t - 1: embedding(ids_in) -> blocks
//!                         (RoPE at pos from a device table, attention_cached(start = pos)
//!                         appending k, v) -> head -> logits buffer [B, V]    (graph or eager)
//!                         sample(logits, seed, step = P + t) -> tok[t]; log_softmax -> logp[t]
//! end (or every N tokens): read tok / logp back; EOS cut on the host
//! ```
//!
//! Every tensor lives on the [`DeviceTrainer`]'s device: the weights (its BF16 copies), the KV
//! caches `[B, H, max_len, hd]` F32 per layer, the token and log-probability of every step.
//! Nothing is read back inside a decode step (`moekit_cuda::SyncCounter` counts 0): the tokens
//! and log-probabilities of every step are packed on the device and read back once at the end
//! and, when [`DeviceGenerator::with_eos_check`] asks for it, the new tokens once every N tokens
//! to stop early once every sequence has emitted EOS.
//!
//! **What changes per step, and the graphs.** Per step only three things change: the input
//! token (a device buffer, `ids_in`, overwritten by a device copy), the RoPE position (read by
//! the kernel from a device table row, `[max_len, B]` I32, uploaded once) and the attention's
//! cache offset `start`, which moekit-attention takes as a launch parameter. So on a GPU the
//! decode forward (embedding .. logits) is captured as a CUDA graph **once per position** and
//! kept by the generator: the first generation at a shape captures and instantiates each
//! position's graph as it reaches it, every later generation (any prompts, seed and sampling
//! configuration) replays them — one `cuGraphLaunch` per token instead of some 20 launches per
//! layer. Sampling and the log-probability stay eager after the graph (two launches): the
//! sampler's Philox key and counter (`seed`, `step`) are launch parameters too, and keeping them
//! out of the graph lets one set of graphs serve every seed. A graph holds the addresses of the
//! weights, caches and buffers: they are owned or borrowed by the generator for its lifetime
//! (the trainer's in-place AdamW updates keep addresses, so graphs see updated weights, but
//! the borrow forbids a training step while the generator lives).
//! On the CPU and the emulation (which cannot capture) the same step runs eagerly.
//!
//! Rows: the device GEMMs take row counts that are multiples of 8, so the batch is padded to
//! `rows = ceil8(B)` with sequences of token 0 whose outputs are dropped (every op is row-wise,
//! so padding changes no real row's bits).
//!
//! Randomness: row `b`'s token at row position `s` (prompt length `P` + `t`) draws from
//! Philox4x32-10 with key `seed` and counter `(b, s)` (moekit-logits' `sample`): the same seed
//! gives the same tokens on every run and on the CPU, the emulation and a GPU, wherever their
//! logits agree (they are the same kernels; the CPU runs the references).
//!
//! EOS semantics are [`crate::Model::generate`]'s: a sequence's completion ends with its first
//! EOS (counted in its length), later positions hold EOS and have log-probability 0. The
//! device keeps decoding a finished sequence (cheaper than masking; positions after its EOS
//! cannot influence earlier ones) and the cut is made on the host from the read tokens, so
//! the result is the same whether or not (and how often) early stopping is checked.
//! `Generation::routing` is left empty here (not recorded on the device yet).

use super::linear::Consts;
use super::{ffn, DeviceTrainer, NoReadbackValidation};
use crate::generate::{Generation, SampleConfig};
use crate::params::FfnKind;
use crate::{Error, Result};
use moekit_attention::AttnShape;
use moekit_tensor::{DType, Device, Tensor};

/// Device generation over the weights of a [`DeviceTrainer`] (borrowed: what it trains is
/// what is sampled, without a copy).
///
/// ```no_run
/// use moekit_model::device::{DeviceGenerator, DeviceTrainer};
/// use moekit_model::{AdamWConfig, Model, ModelConfig, SampleConfig};
/// use moekit_tensor::Device;
/// let model = Model::new(ModelConfig::default(), 0)?;
/// let t = DeviceTrainer::new(&model, AdamWConfig::default(), &Device::cuda_if_available(0))?;
/// let mut g = DeviceGenerator::new(&t, 16, 32)?.with_eos_check(8);
/// let prompts = vec![1u32; 16 * 4]; // 16 prompts of 4 tokens
/// let cfg = SampleConfig { max_new_tokens: 20, eos: Some(15), ..SampleConfig::default() };
/// let out = g.generate(&prompts, &cfg, 1234)?;
/// assert_eq!(out.generation.tokens.len(), 16 * 24);
/// # Ok::<(), moekit_model::Error>(())
/// ```
pub struct DeviceGenerator<'a> {
    t: &'a DeviceTrainer,
    /// Real sequences.
    batch: usize,
    /// `batch` rounded up to a multiple of 8.
    rows: usize,
    /// KV cache length (prompt + completion at most).
    max_len: usize,
    /// Per layer `(k, v)` caches `[rows, H, max_len, hd]` F32.
    kv: Vec<(Tensor, Tensor)>,
    /// Decode-step input ids `[rows]` I32 (a graph input).
    ids_in: Tensor,
    /// Decode-step logits `[rows, V]` F32 (a graph output).
    logits: Tensor,
    /// RoPE positions `[max_len, rows]` I32: row `p` is `p` everywhere.
    positions: Tensor,
    /// Constants of a decode step (`rows` tokens).
    consts: Consts,
    /// Captured decode forwards, by position (GPU only): each launches its instantiated
    /// graph (`moekit_cuda::GraphExec`, kept inside) on the device's stream.
    graphs: Vec<Option<Replay>>,
    use_graphs: bool,
    eos_check_every: usize,
    keep_logits: bool,
    /// Graphs captured so far (for tests and benchmarks).
    captures: usize,
}

impl std::fmt::Debug for DeviceGenerator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceGenerator(batch {}, rows {}, max_len {}, graphs {}, {})",
            self.batch,
            self.rows,
            self.max_len,
            self.use_graphs,
            self.t.device.name()
        )
    }
}

/// A captured decode step: launches its graph on the device's stream.
type Replay = Box<dyn Fn(&Device) -> Result<()>>;

/// What [`DeviceGenerator::generate`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceGeneration {
    /// Tokens, lengths, log-probabilities as [`crate::Model::generate`] (`routing` empty).
    pub generation: Generation,
    /// With [`DeviceGenerator::with_logits`]: the logits each token was sampled from,
    /// `[tokens decoded, batch, V]` F32 (decoding may stop early at EOS); else empty.
    pub logits: Vec<f32>,
    /// Completion tokens decoded on the device per sequence (`<= max_new_tokens`: fewer when
    /// an EOS check stopped early).
    pub decoded: usize,
}

/// `cfg` as moekit-logits' sampling configuration (validated by the caller).
fn logits_config(cfg: &SampleConfig) -> moekit_logits::SampleConfig {
    moekit_logits::SampleConfig { temperature: cfg.temperature, top_k: cfg.top_k, top_p: cfg.top_p }
}

impl<'a> DeviceGenerator<'a> {
    /// A generator of `batch` sequences of at most `max_len` tokens (prompt + completion,
    /// `<= max_seq_len`) over `t`'s weights: allocates the KV caches and the step buffers on
    /// `t`'s device. Graph capture is on where the device can capture (a GPU).
    pub fn new(t: &'a DeviceTrainer, batch: usize, max_len: usize) -> Result<Self> {
        let cfg = &t.cfg;
        if batch == 0 || max_len == 0 || max_len > cfg.max_seq_len {
            return Err(Error::InvalidInput(format!(
                "generator of {batch} x {max_len}: both positive, length at most max_seq_len = {}",
                cfg.max_seq_len
            )));
        }
        let dev = &t.device;
        let rows = batch.div_ceil(8) * 8;
        let cache = [rows, cfg.n_heads, max_len, cfg.head_dim()];
        let kv = (0..cfg.n_layers)
            .map(|_| Ok((Tensor::zeros(&cache, DType::F32, dev)?, Tensor::zeros(&cache, DType::F32, dev)?)))
            .collect::<Result<Vec<_>>>()?;
        let pos: Vec<i32> = (0..max_len * rows).map(|i| (i / rows) as i32).collect();
        Ok(DeviceGenerator {
            t,
            batch,
            rows,
            max_len,
            kv,
            ids_in: Tensor::zeros(&[rows], DType::I32, dev)?,
            logits: Tensor::zeros(&[rows, cfg.vocab_size], DType::F32, dev)?,
            positions: Tensor::from_slice(&pos, &[max_len, rows], dev)?,
            consts: Consts::new(rows, 1, dev)?,
            graphs: (0..max_len).map(|_| None).collect(),
            use_graphs: matches!(dev, Device::Cuda(_)),
            eos_check_every: 0,
            keep_logits: false,
            captures: 0,
        })
    }

    /// Capture the decode step as CUDA graphs (default on a GPU) or run it eagerly (`false`;
    /// always eager on the CPU and the emulation, where capture is unsupported).
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.use_graphs = on && matches!(self.t.device, Device::Cuda(_));
        self
    }

    /// Every `n` tokens (0: never, the default) read the new tokens back and stop once every
    /// sequence has emitted EOS (needs `eos`). The only readbacks before the final ones; none
    /// inside a decode step. Results are the same for every `n`.
    pub fn with_eos_check(mut self, n: usize) -> Self {
        self.eos_check_every = n;
        self
    }

    /// Keep each step's logits and return them in [`DeviceGeneration::logits`] (one device
    /// copy per step; for tests).
    pub fn with_logits(mut self, on: bool) -> Self {
        self.keep_logits = on;
        self
    }

    /// Whether decode steps replay CUDA graphs.
    pub fn uses_graphs(&self) -> bool {
        self.use_graphs
    }

    /// CUDA graphs captured so far (one per decode position, then replayed).
    pub fn captured_graphs(&self) -> usize {
        self.captures
    }

    /// One decode step, the building block of [`DeviceGenerator::generate`]: `tokens [rows]`
    /// I32 (`rows` = the batch rounded up to a multiple of 8, see [`DeviceGenerator::rows`])
    /// at position `pos` of every sequence, whose caches must hold positions `0..pos` (from
    /// earlier steps or a generation); appends their keys and values at `pos` and returns the
    /// logits `[rows, V]` F32 (the generator's buffer, overwritten by the next step). Enqueues
    /// only: no host synchronisation (a graph replay on a GPU).
    pub fn decode_step(&mut self, tokens: &Tensor, pos: usize) -> Result<&Tensor> {
        if pos >= self.max_len {
            return Err(Error::InvalidInput(format!("position {pos} outside the cache of {}", self.max_len)));
        }
        tokens.expect_dtype("decode tokens", DType::I32)?;
        if tokens.dims() != [self.rows] || !tokens.device().same_as(&self.t.device) {
            return Err(Error::InvalidInput(format!(
                "decode tokens {:?} on {}: expected [{}] I32 on {}",
                tokens.dims(),
                tokens.device().name(),
                self.rows,
                self.t.device.name()
            )));
        }
        let _guard = NoReadbackValidation::new();
        self.ids_in.copy_from(tokens)?;
        self.decode(pos)?;
        Ok(&self.logits)
    }

    /// Rows of a decode step: the batch rounded up to a multiple of 8.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The sequences per generation.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Samples `cfg.max_new_tokens` tokens after each of the `batch` prompts (`prompts
    /// [batch, P]`, all of one length `P >= 1`, `P + max_new_tokens <= max_len`, ids in the
    /// vocabulary) with Philox key `seed`. Temperature 0 is greedy (ties to the lower id).
    /// The per-token log-probabilities are at temperature 1 without filtering (as
    /// [`crate::Model::generate`]). Validates on the host, enqueues the prefill and every
    /// decode step without a host synchronisation, reads the tokens and log-probabilities
    /// back at the end (and every N tokens with [`DeviceGenerator::with_eos_check`]).
    pub fn generate(&mut self, prompts: &[u32], cfg: &SampleConfig, seed: u64) -> Result<DeviceGeneration> {
        let (batch, v) = (self.batch, self.t.cfg.vocab_size);
        let bad = |field: &str, value: String, allowed: &str| {
            Err(Error::Config { field: field.into(), value, allowed: allowed.into() })
        };
        if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
            return bad("temperature", cfg.temperature.to_string(), "a finite number >= 0 (0 = greedy)");
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return bad("top_p", cfg.top_p.to_string(), "in (0, 1]");
        }
        if cfg.max_new_tokens == 0 {
            return bad("max_new_tokens", "0".into(), "at least 1");
        }
        if cfg.top_k > v {
            return bad("top_k", cfg.top_k.to_string(), "at most the vocabulary (0 = all)");
        }
        if prompts.is_empty() || prompts.len() % batch != 0 {
            return Err(Error::InvalidInput(format!("{} prompt tokens are not {batch} equal prompts", prompts.len())));
        }
        let p = prompts.len() / batch;
        let total = p + cfg.max_new_tokens;
        if total > self.max_len {
            return Err(Error::InvalidInput(format!(
                "prompt {p} + max_new_tokens {} exceeds the generator's max_len = {}",
                cfg.max_new_tokens, self.max_len
            )));
        }
        if let Some(t) = prompts.iter().find(|&&t| t as usize >= v) {
            return Err(Error::InvalidInput(format!("prompt token {t} outside the vocabulary of {v}")));
        }
        if let Some(eos) = cfg.eos.filter(|&e| e as usize >= v) {
            return Err(Error::InvalidInput(format!("eos {eos} outside the vocabulary")));
        }
        let _guard = NoReadbackValidation::new();
        let scfg = logits_config(cfg);
        let mut toks: Vec<Tensor> = Vec::with_capacity(cfg.max_new_tokens);
        let mut logps: Vec<Tensor> = Vec::with_capacity(cfg.max_new_tokens);
        let mut kept: Vec<Tensor> = Vec::new();
        // ---- prefill: every prompt position through the caches, logits of the last one.
        let first = self.prefill(prompts, p)?;
        let keep = self.keep_logits;
        sample_into(&first, &scfg, seed, p, keep, (&mut toks, &mut logps, &mut kept))?;
        drop(first);
        let mut read: Vec<Vec<i32>> = Vec::new();
        for t in 1..cfg.max_new_tokens {
            if self.eos_check_every > 0 && t % self.eos_check_every == 0 {
                if let Some(eos) = cfg.eos {
                    let fresh = read_back(&toks[read.len()..], &[], self.rows)?.0;
                    read.extend(fresh);
                    if (0..batch).all(|b| read.iter().any(|r| r[b] == eos as i32)) {
                        break;
                    }
                }
            }
            let pos = p + t - 1;
            self.ids_in.copy_from(&toks[t - 1])?;
            self.decode(pos)?;
            sample_into(&self.logits, &scfg, seed, p + t, keep, (&mut toks, &mut logps, &mut kept))?;
        }
        // ---- readback and the EOS cut.
        let (fresh, lps) = read_back(&toks[read.len()..], &logps, self.rows)?;
        read.extend(fresh);
        let decoded = read.len();
        let n = cfg.max_new_tokens;
        let mut tokens = vec![0u32; batch * total];
        let mut lengths = vec![0usize; batch];
        let mut truncated = vec![true; batch];
        let mut logprobs = vec![0.0f32; batch * n];
        let fill = cfg.eos.unwrap_or(0);
        for b in 0..batch {
            tokens[b * total..][..p].copy_from_slice(&prompts[b * p..][..p]);
            for t in 0..n {
                let slot = &mut tokens[b * total + p + t];
                if !truncated[b] || t >= decoded {
                    *slot = fill;
                    continue;
                }
                let tok = read[t][b] as u32;
                *slot = tok;
                logprobs[b * n + t] = lps[t][b];
                lengths[b] += 1;
                if Some(tok) == cfg.eos {
                    truncated[b] = false;
                }
            }
        }
        let mut logits = Vec::new();
        for l in &kept {
            let all = l.to_vec::<f32>()?;
            logits.extend_from_slice(&all[..batch * v]);
        }
        Ok(DeviceGeneration {
            generation: Generation {
                tokens,
                batch,
                prompt_len: p,
                seq_len: total,
                lengths,
                truncated,
                logprobs,
                routing: Vec::new(),
            },
            logits,
            decoded,
        })
    }

    /// The prefill: `prompts [batch, p]` through every block at positions `0..p` (appending to
    /// the caches), then the head on each prompt's last position: logits `[rows, V]` F32.
    fn prefill(&mut self, prompts: &[u32], p: usize) -> Result<Tensor> {
        let (rows, dev) = (self.rows, self.t.device.clone());
        let mut ids = vec![0i32; rows * p];
        for (i, &t) in prompts.iter().enumerate() {
            ids[i] = t as i32;
        }
        let ids = Tensor::from_slice(&ids, &[rows * p], &dev)?;
        let c = Consts::new(rows, p, &dev)?;
        let x = blocks(self.t, &c, &ids, &c.pos, Attn::Cached { kv: &mut self.kv, start: 0, seq: p, batch: rows })?;
        let last: Vec<i32> = (0..rows).map(|b| (b * p + p - 1) as i32).collect();
        let last = Tensor::from_slice(&last, &[rows], &dev)?;
        let x = moekit_norm::embedding_deferred(&x, &last, DType::F32)?.0;
        head(self.t, &self.consts, &x)
    }

    /// One decode step at position `pos`: `ids_in` through the blocks (appending to the
    /// caches at `pos`), logits into `self.logits`. Replays (capturing first) the position's
    /// graph when graphs are on, else runs eagerly.
    fn decode(&mut self, pos: usize) -> Result<()> {
        if !self.use_graphs {
            let lg = self.decode_forward(pos)?;
            self.logits.copy_from(&lg)?;
            return Ok(());
        }
        if self.graphs[pos].is_none() {
            if self.captures == 0 {
                // Before the first capture, the step once eagerly: every module and function
                // it uses is loaded outside the capture (a load is no stream work). Harmless:
                // the graph's launch below recomputes the same keys, values and logits.
                let lg = self.decode_forward(pos)?;
                self.logits.copy_from(&lg)?;
            }
            let dev = self.t.device.clone();
            dev.begin_capture()?;
            let captured = (|| -> Result<()> {
                let lg = self.decode_forward(pos)?;
                self.logits.copy_from(&lg)?;
                Ok(())
            })(); // every tensor the step allocated is dropped here, inside the capture
            let graph = dev.end_capture();
            captured?;
            let exec = graph?.instantiate()?;
            self.graphs[pos] = Some(Box::new(move |dev: &Device| match dev {
                Device::Cuda(d) => Ok(exec.launch(d.stream())?),
                _ => Err(Error::InvalidInput("decode graph without a CUDA device".into())),
            }));
            self.captures += 1;
        }
        match &self.graphs[pos] {
            Some(replay) => replay(&self.t.device),
            None => Err(Error::InvalidInput("no decode graph".into())),
        }
    }

    /// The decode forward of `ids_in` at `pos`: logits `[rows, V]` F32 (a new tensor).
    fn decode_forward(&mut self, pos: usize) -> Result<Tensor> {
        let positions = self.positions.narrow(0, pos, 1)?.reshape(&[self.rows])?;
        let x = blocks(
            self.t,
            &self.consts,
            &self.ids_in,
            &positions,
            Attn::Cached { kv: &mut self.kv, start: pos, seq: 1, batch: self.rows },
        )?;
        head(self.t, &self.consts, &x)
    }
}

/// Per step: the tokens and the log-probabilities read back.
type Read = (Vec<Vec<i32>>, Vec<Vec<f32>>);

/// Reads `toks` (`[rows]` I32 each) and `logps` (`[rows]` F32 each) back in one readback
/// (packed on the device by `Tensor::concat_bytes`): one host synchronisation point.
fn read_back(toks: &[Tensor], logps: &[Tensor], rows: usize) -> Result<Read> {
    let parts: Vec<&Tensor> = toks.iter().chain(logps).collect();
    let Some(first) = parts.first() else { return Ok((Vec::new(), Vec::new())) };
    let bytes = Tensor::concat_bytes(&parts, first.device())?.to_vec::<u8>()?;
    let mut words = bytes.chunks_exact(4).map(|w| [w[0], w[1], w[2], w[3]]);
    let mut take = |n: usize| -> Vec<[u8; 4]> { words.by_ref().take(n).collect() };
    let t = toks.iter().map(|_| take(rows).into_iter().map(i32::from_le_bytes).collect()).collect();
    let l = logps.iter().map(|_| take(rows).into_iter().map(f32::from_le_bytes).collect()).collect();
    Ok((t, l))
}

/// Samples from `logits [rows, V]` at row position `step`: pushes the tokens `[rows]` I32,
/// their log-probabilities `[rows]` F32 and (when `keep`) a copy of the logits. Enqueues only.
fn sample_into(
    logits: &Tensor,
    scfg: &moekit_logits::SampleConfig,
    seed: u64,
    step: usize,
    keep: bool,
    (toks, logps, kept): (&mut Vec<Tensor>, &mut Vec<Tensor>, &mut Vec<Tensor>),
) -> Result<()> {
    let tok = moekit_logits::sample(logits, scfg, seed, step as u64)?;
    let lp = moekit_logits::log_softmax(logits, &tok)?.logp;
    if keep {
        let mut copy = Tensor::empty(logits.dims(), DType::F32, logits.device())?;
        copy.copy_from(logits)?;
        kept.push(copy);
    }
    toks.push(tok);
    logps.push(lp);
    Ok(())
}

/// How the blocks attend.
enum Attn<'k> {
    /// Through the caches: `batch` sequences of `seq` new tokens at `start`.
    Cached { kv: &'k mut [(Tensor, Tensor)], start: usize, seq: usize, batch: usize },
    /// Over the tokens themselves (a full forward from position 0).
    Full { batch: usize, seq: usize },
}

/// The embedding and every block on `ids [N]` (the trainer's forward, without the caches of
/// the backward): the residual stream after the last block, `[N, D]` F32. `positions [N]` I32
/// are the RoPE positions. (A forward-only copy of `DeviceTrainer::forward_backward`'s block
/// loop, with the cached attention; to be merged with it.)
fn blocks(t: &DeviceTrainer, c: &Consts, ids: &Tensor, positions: &Tensor, mut attn: Attn<'_>) -> Result<Tensor> {
    let cfg = &t.cfg;
    let eps = cfg.norm_eps;
    let (p, b) = (&t.params, &t.bf16);
    let rcfg = cfg.router();
    let dcfg = ffn::dispatch_config(cfg);
    let mut x = moekit_norm::embedding_deferred(&p[t.idx.embed], ids, DType::F32)?.0;
    for (li, l) in t.idx.layers.iter().enumerate() {
        let ln1 = moekit_norm::rmsnorm(&x, &p[l.attn_norm], eps, DType::BF16)?;
        let mut qkv = c.widen(&c.linear(&ln1.y, &b[l.wqkv])?)?;
        drop(ln1);
        drop(t.rope.apply_deferred(&mut qkv, 2 * cfg.n_heads, positions, false)?);
        let att = match &mut attn {
            Attn::Cached { kv, start, seq, batch } => {
                let shape = AttnShape { batch: *batch, heads: cfg.n_heads, head_dim: cfg.head_dim(), seq: *seq };
                let (k, v) = &mut kv[li];
                moekit_attention::attention_cached(&qkv, k, v, &shape, *start)?
            }
            Attn::Full { batch, seq } => {
                let shape = AttnShape { batch: *batch, heads: cfg.n_heads, head_dim: cfg.head_dim(), seq: *seq };
                moekit_attention::attention(&qkv, &shape)?
            }
        };
        drop(qkv);
        let o = c.widen(&c.linear(&c.narrow(&att.out)?, &b[l.wo])?)?;
        drop(att);
        let x2 = moekit_norm::add(&x, &o)?;
        drop(o);
        let ln2 = moekit_norm::rmsnorm(&x2, &p[l.ffn_norm], eps, DType::BF16)?;
        x = match l.ffn {
            FfnKind::Dense(fi) => {
                let (y, _) = ffn::dense_forward(c, &ln2.y, &b[fi.w1], &b[fi.w2])?;
                moekit_norm::add(&x2, &c.widen(&y)?)?
            }
            FfnKind::Moe { idx, moe_index } => {
                let w = ffn::MoeWeights {
                    router: &b[idx.router],
                    w1: &b[idx.w1],
                    w2: &b[idx.w2],
                    fp8: t.fp8_experts(moe_index),
                    shared: idx.shared.map(|s| (&b[s.w1], &b[s.w2])),
                    bias: cfg.uses_router_bias().then(|| &t.router_bias[moe_index]),
                };
                let (routed, shared, _) = ffn::moe_forward(c, &rcfg, &dcfg, &w, &ln2.y, false)?;
                let mut out = moekit_norm::add(&x2, &c.widen(&routed)?)?;
                if let Some(s) = shared {
                    out = moekit_norm::add(&out, &c.widen(&s)?)?;
                }
                out
            }
        };
    }
    Ok(x)
}

/// Final norm and LM head of `x [rows, D]` F32 (`c.n == rows`): logits `[rows, V]` F32 (BF16
/// products widened exactly, as in training).
fn head(t: &DeviceTrainer, c: &Consts, x: &Tensor) -> Result<Tensor> {
    let w = t.idx.lm_head.unwrap_or(t.idx.embed);
    let fin = moekit_norm::rmsnorm(x, &t.params[t.idx.final_norm], t.cfg.norm_eps, DType::BF16)?;
    c.widen(&c.linear(&fin.y, &t.bf16[w])?)
}

impl DeviceTrainer {
    /// Logits `[batch, V]` F32 of the last position of each of `tokens [batch, seq]` by one
    /// full device forward (uncached attention from position 0; a reference for the KV-cache
    /// decode). `batch * seq` need not be a multiple of 8 (rows are padded). Reads back.
    pub fn last_logits(&self, tokens: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>> {
        let v = self.cfg.vocab_size;
        if batch == 0 || seq == 0 || tokens.len() != batch * seq || seq > self.cfg.max_seq_len {
            return Err(Error::InvalidInput(format!("{} tokens are not {batch} sequences of {seq}", tokens.len())));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::InvalidInput(format!("token {t} outside the vocabulary of {v}")));
        }
        let _guard = NoReadbackValidation::new();
        let rows = batch.div_ceil(8) * 8;
        let dev = &self.device;
        let mut ids = vec![0i32; rows * seq];
        for (i, &t) in tokens.iter().enumerate() {
            ids[i] = t as i32;
        }
        let ids = Tensor::from_slice(&ids, &[rows * seq], dev)?;
        let c = Consts::new(rows, seq, dev)?;
        let x = blocks(self, &c, &ids, &c.pos, Attn::Full { batch: rows, seq })?;
        let last: Vec<i32> = (0..rows).map(|b| (b * seq + seq - 1) as i32).collect();
        let last = Tensor::from_slice(&last, &[rows], dev)?;
        let x = moekit_norm::embedding_deferred(&x, &last, DType::F32)?.0;
        let lg = head(self, &Consts::new(rows, 1, dev)?, &x)?.to_vec::<f32>()?;
        Ok(lg[..batch * v].to_vec())
    }
}

/*
 * moekit kernel ABI: every parameter struct that crosses the Rust/CUDA boundary.
 *
 * Plain C (no C++ features) so that bindgen, nvcc and a host C compiler all read it.
 * Rules: fixed-width integer types only, device pointers as uint64_t addresses (so the
 * Rust side needs no pointer provenance), explicit padding fields, every struct's size a
 * multiple of 8. Rust bindings: crates/moekit-abi/src/generated.rs (`cargo xtask codegen`),
 * checked against this header's real layout by crates/moekit-abi/tests/layout.rs.
 */
#ifndef MOEKIT_ABI_H
#define MOEKIT_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* FP8 formats, as the `format` field of FP8 kernels. */
typedef enum MoekitFp8Format {
  MOEKIT_FP8_E4M3 = 0,
  MOEKIT_FP8_E5M2 = 1
} MoekitFp8Format;

/*
 * Elementwise cast BF16 -> FP8: dst[i] = fp8_satfinite_rne((float)src[i] * scale).
 * src: n BF16 values; dst: n bytes. Both 16-byte aligned when vectorised access is wanted
 * (the kernel checks and falls back to scalar access otherwise).
 */
typedef struct MoekitCastParams {
  uint64_t src;   /* const __nv_bfloat16*, n elements */
  uint64_t dst;   /* __nv_fp8_storage_t*, n elements */
  uint64_t n;     /* element count */
  float scale;    /* multiplier applied in f32 before rounding */
  int32_t format; /* MoekitFp8Format */
} MoekitCastParams;

/* Router scoring function (MoekitRouteParams.score_func). */
typedef enum MoekitScoreFunc {
  MOEKIT_SCORE_SOFTMAX = 0,
  MOEKIT_SCORE_SIGMOID = 1
} MoekitScoreFunc;

/* Element type of router logits (MoekitRouteParams.logits_dtype). */
typedef enum MoekitLogitsDtype {
  MOEKIT_LOGITS_F32 = 0,
  MOEKIT_LOGITS_BF16 = 1
} MoekitLogitsDtype;

/*
 * Top-k routing, forward (kernels/gating.cu) and backward. Semantics: moekit-gating's
 * reference module, which the kernels match bit for bit.
 * Forward reads logits and bias, writes topk_ids and topk_weights, and ADDS each token's
 * choices to counts (zero it first for a fresh count). Backward reads logits, topk_ids and
 * grad_weights and writes grad_logits. Unused pointers are 0.
 */
typedef struct MoekitRouteParams {
  uint64_t logits;       /* [tokens, experts] f32 or bf16 (logits_dtype), row-major */
  uint64_t bias;         /* [experts] f32 selection bias, or 0 for none */
  uint64_t topk_ids;     /* [tokens, top_k] int32 (forward: out; backward: in) */
  uint64_t topk_weights; /* [tokens, top_k] f32 (forward: out) */
  uint64_t counts;       /* [experts] int32, accumulated (forward), or 0 */
  uint64_t grad_weights; /* [tokens, top_k] f32 (backward: in) */
  uint64_t grad_logits;  /* [tokens, experts] f32 (backward: out) */
  uint64_t tokens;       /* T */
  int32_t experts;       /* E, 1..512 */
  int32_t top_k;         /* 1..16, <= topk_groups * experts / n_groups */
  int32_t n_groups;      /* divides experts; 1 = no group limit */
  int32_t topk_groups;   /* groups kept, 1..n_groups */
  int32_t score_func;    /* MoekitScoreFunc */
  int32_t logits_dtype;  /* MoekitLogitsDtype */
  int32_t renormalize;   /* 0 or 1 */
  float route_scale;     /* multiplies the final weights */
} MoekitRouteParams;

/*
 * Auxiliary-loss-free balancing (DeepSeek-V3): bias[e] += gamma * sign(mean - counts[e]),
 * mean = sum(counts) / experts, the comparison done exactly in integers.
 */
typedef struct MoekitBiasUpdateParams {
  uint64_t counts; /* [experts] int32 tokens routed to each expert */
  uint64_t bias;   /* [experts] f32, updated in place */
  int32_t experts;
  float gamma;
} MoekitBiasUpdateParams;

/*
 * Sequence-wise balance loss (DeepSeek-V3) over n_seq sequences of seq_len tokens each:
 * loss[s] = alpha * sum_e f_e * P_e (see moekit-gating's reference). Forward writes loss;
 * backward reads grad_loss and writes grad_logits.
 */
typedef struct MoekitBalanceLossParams {
  uint64_t logits;      /* [n_seq * seq_len, experts] f32 or bf16 */
  uint64_t topk_ids;    /* [n_seq * seq_len, top_k] int32: the ids f counts */
  uint64_t loss;        /* [n_seq] f32 (forward: out) */
  uint64_t grad_loss;   /* [n_seq] f32 (backward: in) */
  uint64_t grad_logits; /* [n_seq * seq_len, experts] f32 (backward: out) */
  uint64_t n_seq;
  uint64_t seq_len;
  int32_t experts;
  int32_t top_k;
  int32_t score_func;   /* MoekitScoreFunc */
  int32_t logits_dtype; /* MoekitLogitsDtype */
  float alpha;
  int32_t _pad;
} MoekitBalanceLossParams;

/* How activations leave a quantizing kernel (MoekitPermuteParams.quant, MoekitActParams.quant). */
typedef enum MoekitQuantMode {
  MOEKIT_QUANT_BF16 = 0,      /* no quantization: BF16 out */
  MOEKIT_QUANT_FP8_F32 = 1,   /* E4M3 + one f32 scale per 1x128 tile: amax / 448 */
  MOEKIT_QUANT_FP8_UE8M0 = 2  /* E4M3 + power-of-two scale 2^ceil(log2(amax / 448)), stored as f32 */
} MoekitQuantMode;

/* Layout of 1x128 scales of a [rows, cols] activation (cols / 128 scales per row). */
typedef enum MoekitScaleLayout {
  MOEKIT_SCALES_ROW_MAJOR = 0, /* scales[r * (cols / 128) + g] */
  MOEKIT_SCALES_MN_MAJOR = 1   /* scales[g * scale_stride + r], scale_stride = rows rounded up to 4
                                  (DeepGEMM's TMA-aligned, transposed layout) */
} MoekitScaleLayout;

/*
 * Dispatch layout (kernels/dispatch.cu), three launches over the same params: count (grid =
 * chunks), offsets (a parallel scan over the chunks, one block per 32 experts), rows (grid =
 * chunks). Pairs (t, j) are numbered i = t * top_k + j
 * and split into chunks of chunk_pairs; rows inside an expert follow i (stable).
 */
typedef struct MoekitDispatchLayoutParams {
  uint64_t topk_ids;     /* [tokens, top_k] int32; -1 = not routed here */
  uint64_t chunk_counts; /* scratch [chunks, experts] int32 */
  uint64_t offsets;      /* [experts + 1] int32 out: aligned segment starts, offsets[E] = rows used */
  uint64_t counts;       /* [experts] int32 out: pairs routed to each expert */
  uint64_t row_map;      /* [tokens, top_k] int32 out: row of pair i, -1 if not routed or dropped */
  uint64_t m_indices;    /* [max_rows] int32 out: expert of each row, -1 for padding */
  uint64_t status;       /* [2] int32 out (zeroed by the count launch): ids outside [-1, E), rows needed */
  uint64_t tokens;
  int32_t top_k;
  int32_t experts;
  int32_t align;         /* segment alignment in rows: 1, 16, 32, 64 or 128 */
  int32_t max_rows;      /* rows of the outputs; rows needed beyond it are dropped (status[1] says) */
  int32_t chunk_pairs;   /* pairs per chunk (multiple of 256) */
  int32_t chunks;        /* ceil(tokens * top_k / chunk_pairs) */
} MoekitDispatchLayoutParams;

/*
 * Permute (and quantize) tokens to their expert rows: out[row_map[t, j]] = q(x[t]); the padding
 * rows inside segments (below offsets[E], not in any segment's first counts[e] rows) become zeros
 * with a zero tile's scale when zero_padding, else are left untouched; rows at or past offsets[E]
 * are never written.
 */
typedef struct MoekitPermuteParams {
  uint64_t x;            /* [tokens, hidden] bf16 */
  uint64_t row_map;      /* [tokens, top_k] int32 */
  uint64_t offsets;      /* [experts + 1] int32 */
  uint64_t counts;       /* [experts] int32 */
  uint64_t out;          /* [max_rows, hidden] bf16 or fp8 e4m3 */
  uint64_t scales;       /* f32 scales (fp8 modes), layout scale_layout; else 0 */
  uint64_t tokens;
  int32_t hidden;
  int32_t top_k;
  int32_t experts;
  int32_t max_rows;
  int32_t quant;         /* MoekitQuantMode */
  int32_t scale_layout;  /* MoekitScaleLayout */
  int32_t scale_stride;  /* MN-major: rows rounded up to 4 */
  int32_t zero_padding;  /* 0 or 1 */
} MoekitPermuteParams;

/*
 * Row-wise activation kernels on a [rows, cols] result: 1x128 FP8 quantization of x [rows, cols],
 * or SwiGLU of x [rows, 2 * cols] (gate = columns [0, cols), up = [cols, 2 cols)) to BF16 or FP8.
 */
typedef struct MoekitActParams {
  uint64_t x;            /* bf16 input */
  uint64_t out;          /* [rows, cols] bf16 or fp8 */
  uint64_t scales;       /* f32 scales (fp8 modes) */
  uint64_t grad_out;     /* SwiGLU backward: [rows, cols] bf16 in */
  uint64_t grad_x;       /* SwiGLU backward: [rows, 2 * cols] bf16 out */
  uint64_t rows;
  int32_t cols;
  int32_t quant;         /* MoekitQuantMode */
  int32_t scale_layout;  /* MoekitScaleLayout */
  int32_t scale_stride;  /* MN-major: rows rounded up to 4 */
} MoekitActParams;

/*
 * Combine: out[t] = sum_j w[t, j] * y[row_map[t, j]] (f32, j order; w = 1 when weights is 0).
 * Backward: grad_y[row_map[t, j]] = w[t, j] * grad_out[t], grad_weights[t, j] =
 * <grad_out[t], y[row_map[t, j]]>, and padding rows of grad_y zeroed.
 */
typedef struct MoekitCombineParams {
  uint64_t y;            /* [rows, hidden] bf16 */
  uint64_t row_map;      /* [tokens, top_k] int32 */
  uint64_t weights;      /* [tokens, top_k] f32, or 0 */
  uint64_t out;          /* forward: [tokens, hidden] bf16 */
  uint64_t grad_out;     /* backward: [tokens, hidden] bf16 */
  uint64_t grad_y;       /* backward: [rows, hidden] bf16 */
  uint64_t grad_weights; /* backward: [tokens, top_k] f32 (when weights is given) */
  uint64_t offsets;      /* backward: [experts + 1] int32 (to find padding rows) */
  uint64_t counts;       /* backward: [experts] int32 */
  uint64_t tokens;
  int32_t hidden;
  int32_t top_k;
  int32_t rows;
  int32_t experts;
} MoekitCombineParams;

/* Grouped GEMM operation (MoekitGemmParams.op). All compute D = A . B^T per group (NT). */
typedef enum MoekitGemmOp {
  MOEKIT_GEMM_CONTIGUOUS = 0, /* A [m, k], B [groups, n, k], D [m, n] bf16; group of row r = m_indices[r] */
  MOEKIT_GEMM_MASKED = 1,     /* A [groups, m, k], B [groups, n, k], D [groups, m, n] bf16; rows < masked_m[g] */
  MOEKIT_GEMM_KGROUPED = 2,   /* dW [groups, n, k] f32 = sum over group g's tokens of dY[t, n] X[t, k];
                                 bf16: A = dY [m, n], B = X [m, k]; fp8: A = dY^T [n, m], B = X^T [k, m] */
  MOEKIT_GEMM_DGRAD = 3       /* dX [m, k] bf16 = dY [m, n] . W_g [n, k], group of row r = m_indices[r] */
} MoekitGemmOp;

/*
 * Portable grouped GEMM (kernels/gemm_portable.cu). FP8 operands are E4M3 with f32 scales: the
 * token-side operand (A; for k-grouped also B) one per 1x128 along the reduction dimension, the
 * weights (B of contiguous, masked, dgrad) one per 128x128 block [groups, n / 128, k / 128].
 * Partial sums are promoted to f32 and scaled every 128 of the reduction.
 */
typedef struct MoekitGemmParams {
  uint64_t a;             /* see MoekitGemmOp */
  uint64_t b;
  uint64_t d;
  uint64_t a_scales;      /* fp8: A's 1x128 scales (layout a_scale_layout) */
  uint64_t b_scales;      /* fp8: B's block scales (or 1x128 for k-grouped) */
  uint64_t m_indices;     /* contiguous, dgrad: [m] int32, -1 = padding row (skipped) */
  uint64_t masked_m;      /* masked: [groups] int32, or 0 for all m rows */
  uint64_t group_offsets; /* k-grouped: [groups + 1] int32 token offsets */
  int32_t op;             /* MoekitGemmOp */
  int32_t fp8;            /* 0: bf16 operands, 1: fp8 e4m3 operands with scales */
  int32_t groups;
  int32_t accumulate;     /* k-grouped: D += result (else D = result) */
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t a_scale_layout; /* MoekitScaleLayout of a_scales (contiguous, masked, dgrad) */
  int32_t a_scale_stride; /* MN-major: rows rounded up to 4 */
  int32_t _pad;
} MoekitGemmParams;

/* An opaque CUtensorMap (cuTensorMapEncodeTiled fills it on the host): 128 bytes, 64-aligned. */
typedef struct MoekitTensorMap {
  uint64_t opaque[16];
} __attribute__((aligned(64))) MoekitTensorMap;

/*
 * Hopper grouped GEMM (kernels/gemm_sm90.cu): the portable kernel's parameters plus TMA
 * descriptors of A and B (per op: crates/moekit-gemm/src/sm90.rs; m-grouped A 2D [m, k] or
 * masked 3D [groups, m, k], B 3D [groups, n, k], box 128 rows x 128 bytes, 128-byte swizzle)
 * and of the BF16 output D of the m-grouped ops and dgrad (2D [m, cols] or masked 3D
 * [groups, m, n], box 64 rows x 64 columns, 128-byte swizzle; unused by k-grouped).
 * Passed as a __grid_constant__ kernel parameter.
 */
typedef struct MoekitGemmSm90Params {
  MoekitTensorMap tmap_a;
  MoekitTensorMap tmap_b;
  MoekitTensorMap tmap_d;
  MoekitGemmParams gemm;
  uint8_t _pad[24]; /* 3 x 128 + 104 + 24 = 512, a multiple of 64 */
} MoekitGemmSm90Params;

/*
 * FP8 E4M3 quantization of grouped weights per 128 x 128 block (kernels/quant_blocks.cu):
 * w [groups, n, k] f32 -> codes [groups, n, k] and scales [groups, n / 128, k / 128] f32
 * (scale = max(amax, 1e-4) / 448, code = e4m3(w * (448 / max(amax, 1e-4))), saturating,
 * round to nearest even), and when codes_t is not 0 the transpose's quantization too: codes_t
 * [groups, k, n] and scales_t [groups, k / 128, n / 128] (the same blocks, transposed). n and
 * k multiples of 128; one block of 256 threads per 128 x 128 block.
 */
typedef struct MoekitQuantBlocksParams {
  uint64_t w;        /* const float* */
  uint64_t codes;    /* uint8_t* */
  uint64_t scales;   /* float* */
  uint64_t codes_t;  /* uint8_t* or 0 */
  uint64_t scales_t; /* float* (with codes_t) */
  int32_t groups;
  int32_t n;
  int32_t k;
  int32_t _pad;
} MoekitQuantBlocksParams;

/* ---- moekit-norm (kernels/norm.cu: embedding, RMSNorm, residual, RoPE) ---- */

/* Element type of a norm-crate output (MoekitEmbedParams.out_dtype, MoekitRmsNormParams.y_dtype). */
typedef enum MoekitNormDtype {
  MOEKIT_NORM_F32 = 0,
  MOEKIT_NORM_BF16 = 1 /* round to nearest even, every NaN -> 0x7fc0 */
} MoekitNormDtype;

/*
 * Id range check (one block): status[0] = ids outside [0, bound), status[1] = the first such
 * position, or -1. Token ids of the embedding, positions of RoPE.
 */
typedef struct MoekitIdsCheckParams {
  uint64_t ids;    /* [n] int32 */
  uint64_t status; /* [2] int32 out */
  uint64_t n;
  int32_t bound;
  int32_t _pad;
} MoekitIdsCheckParams;

/* Embedding forward: out[t, :] = table[ids[t], :]; a zero row for an id outside [0, vocab). */
typedef struct MoekitEmbedParams {
  uint64_t table; /* [vocab, dim] f32 */
  uint64_t ids;   /* [tokens] int32 */
  uint64_t out;   /* [tokens, dim] f32 or bf16 (out_dtype) */
  uint64_t tokens;
  int32_t vocab;
  int32_t dim;
  int32_t out_dtype; /* MoekitNormDtype */
  int32_t _pad;
} MoekitEmbedParams;

/*
 * Embedding backward (five launches: count, columns, offsets, scatter, sum; see norm.cu):
 * grad_table[v, :] = (accumulate ? grad_table[v, :] : 0) + sum over t with ids[t] == v of
 * grad_out[t, :], added in increasing t. Ids outside [0, vocab) are skipped.
 */
typedef struct MoekitEmbedBackwardParams {
  uint64_t ids;          /* [tokens] int32 */
  uint64_t grad_out;     /* [tokens, dim] f32 */
  uint64_t grad_table;   /* [vocab, dim] f32 out (in/out with accumulate) */
  uint64_t chunk_counts; /* scratch [chunks, vocab] int32 */
  uint64_t offsets;      /* scratch [vocab + 1] int32 */
  uint64_t order;        /* scratch [tokens] int32 */
  uint64_t tokens;
  int32_t vocab;
  int32_t dim;
  int32_t chunks;        /* ceil(tokens / 256) */
  int32_t accumulate;    /* 0 or 1 */
} MoekitEmbedBackwardParams;

/*
 * RMSNorm forward over rows of dim: x' = x (+ residual, then written to sum_out),
 * inv_rms = 1 / sqrt(mean(x'^2) + eps) in f32 (fixed lane order, see norm.cu), y = x' inv g.
 */
typedef struct MoekitRmsNormParams {
  uint64_t x;        /* [rows, dim] f32 */
  uint64_t residual; /* [rows, dim] f32 added to x first, or 0 */
  uint64_t sum_out;  /* [rows, dim] f32 out: x + residual (when residual), else 0 */
  uint64_t weight;   /* [dim] f32 */
  uint64_t y;        /* [rows, dim] f32 or bf16 (y_dtype) out */
  uint64_t inv_rms;  /* [rows] f32 out */
  uint64_t rows;
  int32_t dim;
  float eps;
  int32_t y_dtype;   /* MoekitNormDtype */
  int32_t _pad;
} MoekitRmsNormParams;

/*
 * RMSNorm backward (two launches: rows, then dg): grad_x = (grad_residual +) dy g inv - x k,
 * k = (sum(dy g x) / dim) inv^3; grad_weight = (accumulate ? grad_weight : 0) + the per-64-row
 * partial sums of dy x inv, in block order.
 */
typedef struct MoekitRmsNormBackwardParams {
  uint64_t x;             /* [rows, dim] f32: the forward's x' */
  uint64_t weight;        /* [dim] f32 */
  uint64_t inv_rms;       /* [rows] f32 (from the forward) */
  uint64_t grad_y;        /* [rows, dim] f32 */
  uint64_t grad_residual; /* [rows, dim] f32 added to grad_x, or 0 */
  uint64_t grad_x;        /* [rows, dim] f32 out */
  uint64_t grad_weight;   /* [dim] f32 out (in/out with accumulate) */
  uint64_t partial;       /* scratch [blocks, dim] f32 */
  uint64_t rows;
  int32_t dim;
  int32_t blocks;         /* ceil(rows / 64) */
  int32_t accumulate;     /* 0 or 1 */
  int32_t _pad;
} MoekitRmsNormBackwardParams;

/* Residual add: out[i] = a[i] + b[i], n f32. */
typedef struct MoekitAddParams {
  uint64_t a;
  uint64_t b;
  uint64_t out;
  uint64_t n;
} MoekitAddParams;

/*
 * RoPE in place, rotate-half pairs (i, i + head_dim / 2) of the first `heads` heads of each row
 * (the q and k heads of a packed qkv row): a' = a cos - b sin, b' = b cos + a sin, with -sin when
 * inverse (the backward). Row r at positions[r]; rows at positions outside [0, max_pos) untouched.
 */
typedef struct MoekitRopeParams {
  uint64_t x;         /* [rows, row_stride] f32, in place */
  uint64_t positions; /* [rows] int32 */
  uint64_t cos;       /* [max_pos, head_dim / 2] f32 */
  uint64_t sin;       /* [max_pos, head_dim / 2] f32 */
  uint64_t rows;
  int32_t row_stride; /* floats per row, >= heads * head_dim */
  int32_t heads;      /* heads rotated per row */
  int32_t head_dim;   /* even */
  int32_t max_pos;
  int32_t inverse;    /* 0 or 1 */
  int32_t _pad;
} MoekitRopeParams;
/* end moekit-norm */

/* ---- moekit-attention (kernels/attention.cu: causal flash attention, KV-cache decode) ---- */
/* Element type of attention's qkv input (f32 or bf16, widened exactly; everything else f32). */
typedef enum MoekitAttnDtype {
  MOEKIT_ATTN_F32 = 0,
  MOEKIT_ATTN_BF16 = 1
} MoekitAttnDtype;

/*
 * Causal multi-head attention, forward and KV-cache forward (kernels/attention.cu).
 * Semantics: moekit-attention's reference module, which the kernels match bit for bit.
 * Layout of the model (moekit-model `attention`): `qkv [batch * seq, 3 * heads * head_dim]`
 * f32, each row the query | key | value columns, head h at column h * head_dim of each third.
 * Query i of a sequence is at position start + i and sees the keys 0 ..= start + i.
 * Own keys (k_cache = 0, start = 0): keys and values come from qkv. KV cache (k_cache != 0):
 * keys and values of positions < start come from k_cache / v_cache `[batch, heads, max_len,
 * head_dim]`, those of positions start .. start + seq from qkv, and the kernel writes the
 * latter into the caches (position start + i of every sequence and head).
 */
typedef struct MoekitAttnParams {
  uint64_t qkv;     /* [batch * seq, 3 * heads * head_dim] f32 or bf16 (qkv_dtype) */
  uint64_t out;     /* [batch * seq, heads * head_dim] f32 (written) */
  uint64_t lse;     /* [batch, heads, seq] f32 log-sum-exp of the scaled scores (written) */
  uint64_t k_cache; /* [batch, heads, max_len, head_dim] f32, or 0 for own keys */
  uint64_t v_cache; /* same shape as k_cache, or 0 */
  int32_t batch;
  int32_t heads;
  int32_t head_dim; /* 1 ..= the kernel variant's 32 * chunks */
  int32_t seq;      /* queries per sequence */
  int32_t start;    /* position of query 0 (0 without a cache) */
  int32_t max_len;  /* positions per (sequence, head) of the caches; start + seq <= max_len */
  float scale;      /* score scale, 1 / sqrt(head_dim) */
  int32_t qkv_dtype; /* MoekitAttnDtype of qkv (and of nothing else) */
} MoekitAttnParams;

/*
 * Backward of the own-keys forward (kernels/attention.cu), flash-attention-2 style, no float
 * atomics: `moekit_attn_bwd_prep` writes delta = rowsum(dout * out), `moekit_attn_bwd_dkdv_*`
 * (one block per key tile) the key and value columns of dqkv, `moekit_attn_bwd_dq_*` (one
 * block per query tile) the query columns. Every element of dqkv is written exactly once.
 */
typedef struct MoekitAttnBwdParams {
  uint64_t qkv;   /* [batch * seq, 3 * heads * head_dim] f32 or bf16 (forward input) */
  uint64_t out;   /* [batch * seq, heads * head_dim] f32 (forward output) */
  uint64_t lse;   /* [batch, heads, seq] f32 (forward output) */
  uint64_t dout;  /* [batch * seq, heads * head_dim] f32 upstream gradient */
  uint64_t delta; /* [batch, heads, seq] f32 (prep: written; dkdv, dq: read) */
  uint64_t dqkv;  /* [batch * seq, 3 * heads * head_dim] f32 (written) */
  int32_t batch;
  int32_t heads;
  int32_t head_dim;
  int32_t seq;
  float scale;
  int32_t qkv_dtype; /* MoekitAttnDtype of qkv (and of nothing else) */
} MoekitAttnBwdParams;
/* end moekit-attention */

/* ---- moekit-logits (kernels/logits.cu, kernels/sampling.cu: log-softmax, entropy, CE gradient, sampling) ---- */
/*
 * Log-softmax statistics of LM-head logits (kernels/logits.cu, `moekit_logsoftmax_fwd`), one
 * block of 256 threads per row (grid-stride over rows). Semantics: moekit-logits' reference
 * module, which the kernel matches bit for bit. For row r with target y = targets[r]:
 * row_max = max_j z (NaN ignored), row_lse = max + log(sum_j e^(z_j - max)),
 * entropy = -sum_j p_j log p_j, logp = z_y - row_lse when 0 <= y < vocab, else 0.
 * A target < 0 is ignored; a target >= vocab is invalid: logp 0, and *status is increased
 * by one (integer atomic: start it at 0).
 */
typedef struct MoekitLogsoftmaxFwdParams {
  uint64_t logits;  /* [rows, vocab] f32 */
  uint64_t targets; /* [rows] int32 */
  uint64_t logp;    /* [rows] f32 out */
  uint64_t entropy; /* [rows] f32 out */
  uint64_t row_max; /* [rows] f32 out */
  uint64_t row_lse; /* [rows] f32 out */
  uint64_t status;  /* [1] int32, += invalid targets */
  uint64_t rows;
  int32_t vocab;    /* >= 1 */
  int32_t _pad;
} MoekitLogsoftmaxFwdParams;

/*
 * Gradient w.r.t. the logits of sum_r dlogp[r] logp[r] + dentropy[r] entropy[r]
 * (`moekit_logsoftmax_bwd`), from the logits and the forward's row_lse and entropy, one row
 * block at a time (no probabilities tensor): with lp = z_j - lse, p = e^lp,
 * grad_j = dl (1[j == y] - p) - (p > 0 ? de p (lp + H) : 0), dl = dlogp[r] for a valid
 * target (else 0), de = dentropy[r]. A row with de == 0 and dl == 0 gets zeros. `grad` may
 * be `logits` (in place: each element is read and then written by the same thread).
 */
typedef struct MoekitLogsoftmaxBwdParams {
  uint64_t logits;   /* [rows, vocab] f32 */
  uint64_t grad;     /* [rows, vocab] f32 out (may equal logits) */
  uint64_t targets;  /* [rows] int32 */
  uint64_t row_lse;  /* [rows] f32 (forward) */
  uint64_t entropy;  /* [rows] f32 (forward) */
  uint64_t dlogp;    /* [rows] f32, or 0: no log-prob term */
  uint64_t dentropy; /* [rows] f32, or 0: no entropy term */
  uint64_t rows;
  int32_t vocab;
  int32_t _pad;
} MoekitLogsoftmaxBwdParams;

/*
 * Mean cross-entropy from the forward's logp (`moekit_cross_entropy_reduce`, one block):
 * count = rows with 0 <= target < vocab, loss = -(sum of logp) / max(count, 1), and the
 * backward's per-row dlogp = -1 / count at counted rows, 0 elsewhere. All on the device:
 * no host synchronisation.
 */
typedef struct MoekitCrossEntropyParams {
  uint64_t logp;    /* [rows] f32 (forward; 0 at rows without a valid target) */
  uint64_t targets; /* [rows] int32 */
  uint64_t loss;    /* [1] f32 out */
  uint64_t count;   /* [1] int32 out */
  uint64_t dlogp;   /* [rows] f32 out */
  uint64_t rows;
  int32_t vocab;
  int32_t _pad;
} MoekitCrossEntropyParams;

/*
 * Sampling one token per row of logits (kernels/sampling.cu, `moekit_sample`), one block of
 * 256 threads per row. temperature 0: argmax (ties to the lowest id). Otherwise weights
 * w_j = e^((z_j - max) / T) (scratch `weights`), candidates sorted by w descending then id
 * ascending, the first top_k kept (0 = all), then the shortest prefix whose mass reaches
 * top_p of theirs (1 = all), and the token drawn with u = (x0 >> 8) 2^-24 from
 * Philox4x32-10 (moekit/philox.cuh), key = seed, counter = (row, step). Semantics and the
 * exact arithmetic: moekit-logits' reference module.
 */
typedef struct MoekitSampleParams {
  uint64_t logits;   /* [rows, vocab] f32 */
  uint64_t weights;  /* [rows, vocab] f32 scratch (not touched when temperature == 0) */
  uint64_t tokens;   /* [rows] int32 out */
  uint64_t seed;     /* Philox key (low word k0, high word k1) */
  uint64_t step;     /* counter words 2 (low) and 3 (high); words 0, 1 = row */
  uint64_t rows;
  int32_t vocab;     /* >= 1 */
  int32_t top_k;     /* 0 (off) .. vocab */
  float temperature; /* finite, >= 0 */
  float top_p;       /* in (0, 1] */
} MoekitSampleParams;

/* Philox4x32-10 known-answer probe (`moekit_philox_probe`): out[4 i .. 4 i + 3] = the block of
 * counter ctr[4 i ..] under key key[2 i ..], for i < n (one thread each). */
typedef struct MoekitPhiloxProbeParams {
  uint64_t ctr; /* [n, 4] uint32 */
  uint64_t key; /* [n, 2] uint32 */
  uint64_t out; /* [n, 4] uint32 out */
  uint64_t n;
} MoekitPhiloxProbeParams;
/* end moekit-logits */

/* ---- moekit-optim (kernels/optim.cu: AdamW, global grad norm, clipping) ---- */
/*
 * Multi-tensor optimizer (kernels/optim.cu). Semantics: moekit-optim's reference module, which
 * the kernels match bit for bit. Every tensor is cut into chunks of `chunk` elements (its last
 * chunk shorter); chunks are numbered globally in tensor order (MoekitOptimTensor.chunk_start).
 * f32 pointers 16-byte aligned; tensors of length 0 have no chunks.
 */
typedef struct MoekitOptimTensor {
  uint64_t p;           /* float[len] master weights (in/out; 0 in a norm-only table) */
  uint64_t g;           /* const float[len] gradient */
  uint64_t m;           /* float[len] first moment (in/out; 0 in a norm-only table) */
  uint64_t v;           /* float[len] second moment (in/out; 0 in a norm-only table) */
  uint64_t p_bf16;      /* __nv_bfloat16[len] copy of the updated p (RNE), or 0 for none */
  uint64_t len;         /* elements */
  uint64_t chunk_start; /* global index of this tensor's first chunk */
  uint32_t decay;       /* 1: decoupled weight decay applies, 0: not */
  uint32_t pad;
} MoekitOptimTensor;

/*
 * What one norm + update computed, in device memory (written by moekit_optim_norm_finalize,
 * read by moekit_optim_adamw; the host reads it only when it wants the metrics).
 */
typedef struct MoekitOptimScalars {
  uint64_t step;     /* updates taken; +1 by a finalize with `advance` whose norm is finite */
  float grad_norm;   /* global L2 norm of the gradients (before clipping) */
  float clip;        /* factor applied to every gradient: 1 or clip_norm / grad_norm */
  float lr;          /* learning rate of the update (of step `step` before the increment) */
  float bc1;         /* 1 - beta1^t, t = step after the increment */
  float bc2;         /* 1 - beta2^t */
  uint32_t skipped;  /* 1: the norm was not finite, the update is skipped (step unchanged) */
} MoekitOptimScalars;

/*
 * Global gradient norm: moekit_optim_sumsq writes partials[c] = sum of g^2 over chunk c (f64),
 * moekit_optim_norm_finalize (one block) reduces them in index order and fills `scalars`.
 */
typedef struct MoekitOptimNormParams {
  uint64_t tensors;      /* const MoekitOptimTensor[n_tensors] */
  uint64_t partials;     /* double[n_chunks] */
  uint64_t scalars;      /* MoekitOptimScalars* */
  uint64_t lr_table;     /* const float[lr_table_len]: lr of step s = lr_table[min(s, len - 1)]; 0: use `lr` */
  uint64_t n_chunks;     /* total chunks of all tensors */
  uint32_t n_tensors;
  uint32_t chunk;        /* elements per chunk, a multiple of 1024 */
  uint32_t lr_table_len;
  float lr;              /* learning rate when lr_table == 0 */
  float clip_norm;       /* clip to this global norm; 0 = no clipping */
  float beta1;
  float beta2;
  uint32_t advance;      /* 1: this norm belongs to an update (increment step, fill lr, bc1, bc2) */
} MoekitOptimNormParams;

/* AdamW over every tensor of the table, reading MoekitOptimScalars (skips all when skipped). */
typedef struct MoekitOptimAdamWParams {
  uint64_t tensors;   /* const MoekitOptimTensor[n_tensors] */
  uint64_t scalars;   /* const MoekitOptimScalars* */
  uint64_t n_chunks;
  uint32_t n_tensors;
  uint32_t chunk;
  float beta1;
  float beta2;
  float eps;
  float weight_decay; /* applied to tensors with decay = 1 */
} MoekitOptimAdamWParams;
/* end moekit-optim */

/* Block visiting order of the host emulation (MoekitEmuLaunch.block_order). */
typedef enum MoekitEmuBlockOrder {
  MOEKIT_EMU_ORDER_IN_ORDER = 0,
  MOEKIT_EMU_ORDER_REVERSED = 1,
  MOEKIT_EMU_ORDER_SHUFFLED = 2
} MoekitEmuBlockOrder;

/* Return codes of the host emulation's launch entry points. */
typedef enum MoekitEmuStatus {
  MOEKIT_EMU_OK = 0,
  MOEKIT_EMU_BAD_CONFIG = 1,  /* grid or block size out of range */
  MOEKIT_EMU_KERNEL_FAULT = 2 /* deadlock or shared-memory overrun; message in the error buffer */
} MoekitEmuStatus;

/*
 * A launch of the host emulation (kernels/include/moekit/emu/), the counterpart of
 * cuLaunchKernel's configuration. Every kernel `k` compiled for the host gets an entry point
 *   int moekit_emu__k(const MoekitEmuLaunch* cfg, void** params, char* err, uint64_t err_len);
 * with `params` laid out as for cuLaunchKernel (one pointer per kernel argument).
 */
typedef struct MoekitEmuLaunch {
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t shared_mem_bytes; /* dynamic shared memory per block */
  int32_t block_order;       /* MoekitEmuBlockOrder */
  uint64_t seed;             /* for MOEKIT_EMU_ORDER_SHUFFLED */
  uint32_t workers;          /* OS threads running blocks concurrently (0 = 1) */
  uint32_t _pad;
  uint64_t stack_bytes;      /* per emulated thread (0 = 64 KiB) */
} MoekitEmuLaunch;

#ifdef __cplusplus
}
#endif

#endif /* MOEKIT_ABI_H */

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

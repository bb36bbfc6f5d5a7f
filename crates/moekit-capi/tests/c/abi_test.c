/* The C ABI from C: known values on the CPU reference and the host emulation, and every
 * kind of bad argument giving its status and a message. Built and run by tests/c_abi.rs.
 * Exit status 0: all checks passed; the first failure prints `FAIL <line>: <what>`. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moekit.h"

static int failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      fprintf(stderr, "FAIL %d: %s (last error: %s)\n", __LINE__, #cond,           \
              moekit_last_error());                                                 \
      failures++;                                                                   \
    }                                                                               \
  } while (0)

/* A bad call: the expected status and a non-empty message. */
#define EXPECT_STATUS(call, status)                                                 \
  do {                                                                              \
    int32_t rc_ = (call);                                                           \
    if (rc_ != (status) || moekit_last_error()[0] == '\0') {                       \
      fprintf(stderr, "FAIL %d: %s gave %d (want %d), message \"%s\"\n", __LINE__, \
              #call, rc_, (status), moekit_last_error());                           \
      failures++;                                                                   \
    }                                                                               \
  } while (0)

static uint16_t bf16(float f) { /* exact for the small integers used here */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static MoekitDevice device(int32_t kind) {
  MoekitDevice d = {kind, 0, NULL};
  return d;
}

/* 16-byte aligned buffers (the kernels' vector accesses). */
static _Alignas(16) uint16_t x[3 * 8];
static _Alignas(16) uint16_t permuted[66 * 8];
static _Alignas(16) uint16_t back[3 * 8];

/* Routing, layout, permute, combine and GEMM on `kind`; fills `ids`, `weights` for the
 * cross-device comparison. Returns 0, or 1 when the device's kernels are not built. */
static int known_values(int32_t kind, int32_t ids[4], float weights[4]) {
  MoekitDevice dev = device(kind);
  /* Routing: the example of moekit-gating's docs (Mixtral: 8 experts, top-2, renormalised). */
  float logits[16];
  for (int i = 0; i < 16; i++) logits[i] = (float)((i * 7) % 11) * 0.1f;
  MoekitRouterConfig mixtral = {8, 2, MOEKIT_ROUTE_SOFTMAX, 1, 1, 1, 1.0f};
  int32_t counts[8] = {1, 1, 1, 1, 1, 1, 1, 1}; /* added to */
  int32_t rc = moekit_route(dev, &mixtral, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, counts);
  if (rc == MOEKIT_STATUS_NOT_BUILT) return 1;
  CHECK(rc == MOEKIT_STATUS_OK);
  CHECK(moekit_last_error()[0] == '\0');
  CHECK(ids[0] == 3 && ids[1] == 6 && ids[2] == 6 && ids[3] == 1);
  CHECK(weights[0] + weights[1] > 0.999f && weights[0] + weights[1] < 1.001f);
  CHECK(weights[0] >= weights[1]);
  CHECK(counts[3] == 2 && counts[6] == 3 && counts[1] == 2 && counts[0] == 1);

  /* Layout and permute: the example of moekit-dispatch's docs. */
  int32_t topk[6] = {2, 0, 2, 1, 3, -1};
  MoekitDispatchConfig dc = {4, 2, 16, 0};
  uint64_t max_rows = moekit_dispatch_max_rows(3, 2, 4, 16);
  CHECK(max_rows == 66);
  uint64_t scratch_len = moekit_dispatch_layout_scratch_len(3, 2, 4);
  int32_t *scratch = calloc(scratch_len, sizeof(int32_t));
  int32_t offsets[5], ecounts[4], row_map[6], m_indices[66], status[2];
  rc = moekit_dispatch_layout(dev, &dc, topk, 3, max_rows, scratch, offsets, ecounts, row_map,
                              m_indices, status);
  CHECK(rc == MOEKIT_STATUS_OK);
  int32_t want_offsets[5] = {0, 16, 32, 48, 64}, want_map[6] = {32, 0, 33, 16, 48, -1};
  CHECK(memcmp(offsets, want_offsets, sizeof offsets) == 0);
  CHECK(memcmp(row_map, want_map, sizeof row_map) == 0);
  CHECK(m_indices[0] == 0 && m_indices[1] == -1 && m_indices[32] == 2 && m_indices[33] == 2);
  CHECK(status[0] == 0 && status[1] == 64);

  for (int i = 0; i < 24; i++) x[i] = bf16((float)i);
  MoekitActFormat as_bf16 = {MOEKIT_DTYPE_BF16, 0, 0};
  rc = moekit_permute(dev, &dc, x, 3, 8, row_map, offsets, ecounts, max_rows, &as_bf16, permuted, NULL);
  CHECK(rc == MOEKIT_STATUS_OK);
  CHECK(memcmp(&permuted[32 * 8], &x[0], 16) == 0 && memcmp(&permuted[0], &x[0], 16) == 0);
  CHECK(memcmp(&permuted[16 * 8], &x[8], 16) == 0 && memcmp(&permuted[48 * 8], &x[16], 16) == 0);

  /* Identity experts, unweighted combine: each token comes back once per routed slot. */
  rc = moekit_combine(dev, permuted, max_rows, 8, row_map, 3, 2, NULL, back);
  CHECK(rc == MOEKIT_STATUS_OK);
  CHECK(from_bf16(back[8]) == 16.0f && from_bf16(back[16]) == 16.0f && from_bf16(back[0]) == 0.0f);

  /* FP8 1x128 quantization: amax 448 gives scale 1, 448 -> 0x7e, 1 -> 0x38, -2 -> 0xc0. */
  static _Alignas(16) uint16_t row[128];
  static _Alignas(16) uint8_t codes[128];
  float scale = 0.0f;
  for (int i = 0; i < 128; i++) row[i] = 0;
  row[0] = bf16(448.0f), row[1] = bf16(1.0f), row[2] = bf16(-2.0f);
  MoekitActFormat fp8 = {MOEKIT_DTYPE_FP8_E4M3, MOEKIT_SCALE_F32, MOEKIT_LAYOUT_ROW_MAJOR};
  rc = moekit_quantize(dev, row, 1, 128, &fp8, codes, &scale);
  CHECK(rc == MOEKIT_STATUS_OK);
  CHECK(scale == 1.0f && codes[0] == 0x7e && codes[1] == 0x38 && codes[2] == 0xc0 && codes[3] == 0);

  /* Grouped GEMM, contiguous BF16: b[g] = (g + 1) I, so d[r] = (g + 1) a[r]; row 2 is padding
   * (m_indices -1) and keeps its sentinel. */
  static _Alignas(16) uint16_t a[4 * 8], b[2 * 8 * 8], d[4 * 8];
  for (int r = 0; r < 4; r++)
    for (int j = 0; j < 8; j++) a[r * 8 + j] = bf16((float)(r + j));
  for (int g = 0; g < 2; g++)
    for (int j = 0; j < 8; j++)
      for (int l = 0; l < 8; l++) b[(g * 8 + j) * 8 + l] = bf16(j == l ? (float)(g + 1) : 0.0f);
  for (int i = 0; i < 32; i++) d[i] = 0xffff;
  int32_t groups_of_rows[4] = {0, 1, -1, 1};
  MoekitGemmShape shape = {2, 4, 8, 8};
  MoekitGemmOperand opa = {MOEKIT_DTYPE_BF16, 0, a, NULL}, opb = {MOEKIT_DTYPE_BF16, 0, b, NULL};
  rc = moekit_gemm_contiguous(dev, shape, &opa, &opb, groups_of_rows, d);
  CHECK(rc == MOEKIT_STATUS_OK);
  CHECK(from_bf16(d[0 * 8 + 5]) == 5.0f && from_bf16(d[1 * 8 + 5]) == 12.0f);
  CHECK(from_bf16(d[3 * 8 + 7]) == 20.0f && d[2 * 8 + 3] == 0xffff);
  free(scratch);
  return 0;
}

static void bad_arguments(int32_t kind) {
  MoekitDevice dev = device(kind);
  float logits[16] = {0};
  int32_t ids[4];
  float weights[4];
  MoekitRouterConfig mixtral = {8, 2, MOEKIT_ROUTE_SOFTMAX, 1, 1, 1, 1.0f};

  /* Null pointers: a required buffer, a config. */
  EXPECT_STATUS(moekit_route(dev, &mixtral, MOEKIT_DTYPE_F32, NULL, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_NULL_POINTER);
  EXPECT_STATUS(moekit_route(dev, NULL, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_NULL_POINTER);
  /* Ids out of range: device kind, score function, dtype, a config value, a flag. */
  EXPECT_STATUS(moekit_route(device(7), &mixtral, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_INVALID_ARGUMENT);
  MoekitRouterConfig bad = mixtral;
  bad.score_func = 5;
  EXPECT_STATUS(moekit_route(dev, &bad, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_INVALID_ARGUMENT);
  bad = mixtral;
  bad.top_k = 9;
  EXPECT_STATUS(moekit_route(dev, &bad, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_INVALID_ARGUMENT);
  bad = mixtral;
  bad.renormalize = 2;
  EXPECT_STATUS(moekit_route(dev, &bad, MOEKIT_DTYPE_F32, logits, 2, NULL, ids, weights, NULL),
                MOEKIT_STATUS_INVALID_ARGUMENT);
  EXPECT_STATUS(moekit_route(dev, &mixtral, 9, logits, 2, NULL, ids, weights, NULL), MOEKIT_STATUS_DTYPE);
  /* Misaligned pointers: an f32 buffer off its element alignment; a vector-loaded buffer off
   * 16 bytes. */
  EXPECT_STATUS(moekit_route(dev, &mixtral, MOEKIT_DTYPE_F32, (const char *)logits + 1, 1, NULL, ids,
                             weights, NULL),
                MOEKIT_STATUS_ALIGNMENT);
  static _Alignas(16) uint16_t y[4 * 8 + 1], out[2 * 8];
  int32_t row_map[2] = {0, 1};
  EXPECT_STATUS(moekit_combine(dev, y + 1, 4, 8, row_map, 2, 1, NULL, out), MOEKIT_STATUS_ALIGNMENT);
  /* Bad shapes: hidden not a multiple of 8; a GEMM with n = 0; overflowing dimensions. */
  EXPECT_STATUS(moekit_combine(dev, y, 4, 6, row_map, 2, 1, NULL, out), MOEKIT_STATUS_ALIGNMENT);
  static _Alignas(16) uint16_t a[64], b[64], d[64];
  int32_t m_idx[8] = {0};
  MoekitGemmOperand opa = {MOEKIT_DTYPE_BF16, 0, a, NULL}, opb = {MOEKIT_DTYPE_BF16, 0, b, NULL};
  MoekitGemmShape zero_n = {1, 8, 0, 8};
  EXPECT_STATUS(moekit_gemm_contiguous(dev, zero_n, &opa, &opb, m_idx, d), MOEKIT_STATUS_SHAPE);
  EXPECT_STATUS(moekit_combine(dev, y, UINT64_MAX, 8, row_map, 2, 1, NULL, out), MOEKIT_STATUS_SHAPE);
  /* Mixed GEMM dtypes. */
  static float scales[4];
  MoekitGemmOperand fp8b = {MOEKIT_DTYPE_FP8_E4M3, 0, b, scales};
  MoekitGemmShape s = {1, 8, 8, 8};
  EXPECT_STATUS(moekit_gemm_contiguous(dev, s, &opa, &fp8b, m_idx, d), MOEKIT_STATUS_DTYPE);
  /* An output aliasing an input. */
  EXPECT_STATUS(moekit_combine(dev, y, 4, 8, row_map, 2, 1, NULL, y), MOEKIT_STATUS_INVALID_ARGUMENT);
  /* A reserved field set. */
  MoekitDevice reserved = dev;
  reserved.reserved = 1;
  EXPECT_STATUS(moekit_combine(reserved, y, 4, 8, row_map, 2, 1, NULL, out), MOEKIT_STATUS_INVALID_ARGUMENT);
  /* A success clears the message. */
  CHECK(moekit_combine(dev, y, 4, 8, row_map, 2, 1, NULL, out) == MOEKIT_STATUS_OK);
  CHECK(moekit_last_error()[0] == '\0');
}

int main(void) {
  const char *require = getenv("MOEKIT_REQUIRE_KERNELS");
  CHECK(strcmp(moekit_version(), MOEKIT_EXPECTED_VERSION) == 0);

  int32_t cpu_ids[4], emu_ids[4];
  float cpu_w[4], emu_w[4];
  CHECK(known_values(MOEKIT_DEVICE_CPU, cpu_ids, cpu_w) == 0);
  bad_arguments(MOEKIT_DEVICE_CPU);
  if (known_values(MOEKIT_DEVICE_EMULATED, emu_ids, emu_w) == 0) {
    CHECK(memcmp(cpu_ids, emu_ids, sizeof cpu_ids) == 0);
    CHECK(memcmp(cpu_w, emu_w, sizeof cpu_w) == 0); /* bit-identical routing */
    bad_arguments(MOEKIT_DEVICE_EMULATED);
  } else if (require && strcmp(require, "1") == 0) {
    fprintf(stderr, "FAIL: MOEKIT_REQUIRE_KERNELS=1 but the emulation is not built: %s\n", moekit_last_error());
    failures++;
  } else {
    fprintf(stderr, "SKIPPED emulated checks: %s\n", moekit_last_error());
  }
  /* CUDA without a usable GPU is an error status, never a crash. */
  float logits[16] = {0};
  int32_t ids[4];
  float w[4];
  MoekitRouterConfig mixtral = {8, 2, MOEKIT_ROUTE_SOFTMAX, 1, 1, 1, 1.0f};
  int32_t rc = moekit_route(device(MOEKIT_DEVICE_CUDA), &mixtral, MOEKIT_DTYPE_F32, logits, 0, NULL, ids, w, NULL);
  CHECK(rc == MOEKIT_STATUS_OK || rc == MOEKIT_STATUS_NO_DEVICE || rc == MOEKIT_STATUS_INVALID_ARGUMENT ||
        rc == MOEKIT_STATUS_CUDA);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("abi_test: all checks passed\n");
  return 0;
}

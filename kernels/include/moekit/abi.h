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

// PTX wrappers: every inline-PTX instruction moekit's portable kernels use, in one place.
//
// On the device each wrapper is one inline `asm`. In the host emulation
// (moekit/emu/cuda_emu.h) each has a reference implementation where the PTX ISA fixes the
// result: the fragment layouts of ldmatrix and mma.sync are exact; cp.async is a plain copy
// whose wait does nothing (the copy is already complete). The one thing not reproduced
// bit for bit is the tensor core's internal f32 summation order in mma.sync: the emulation
// accumulates k = 0..15 in order with fused multiply-adds, so results agree exactly when all
// partial sums are exact (e.g. small integers) and to f32 rounding otherwise.
//
// Requires sm_80 or newer. Hopper-only instructions (wgmma, TMA, mbarrier, setmaxnreg) do not
// belong here: they live in moekit/sm90/ptx_sm90.cuh (emulated by moekit/emu/sm90.h).
#pragma once

#include <stdint.h>

namespace moekit {
namespace ptx {

#ifndef MOEKIT_EMULATION

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared (cp.async.cg: cached in L2 only).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// As cp_async_16, but when `valid` is false nothing is read and the 16 bytes become zeros
// (src-size 0); `gmem` must still be a valid address (pass the buffer's base).
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses (16 bytes
// each) of matrix i; lane l receives in r[i] the two b16 at row l/4, columns 2(l%4), 2(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = a * b + c for a 16x16 (row) by
// 16x8 (col) tile, fragments as in the PTX ISA (groupID g = lane/4, t = lane%4):
//   a: {a0a1: (g, 2t..2t+1), a2a3: (g+8, 2t..), a4a5: (g, 2t+8..), a6a7: (g+8, 2t+8..)}
//   b: {b0b1: (k 2t..2t+1, n g), b2b3: (k 2t+8.., n g)}
//   c, d: {c0c1: (g, 2t..2t+1), c2c3: (g+8, 2t..)}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

#else  // host emulation: reference implementations

inline void cp_async_16(void* smem, const void* gmem) { std::memcpy(smem, gmem, 16); }
inline void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned lane = ::moekit::emu::fiber().lane;
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  ::moekit::emu::warp_exchange(0xffffffffu, mine, [&](const uint64_t* rows, unsigned) {
    for (unsigned i = 0; i < 4; ++i) {
      const auto* p = reinterpret_cast<const unsigned char*>(rows[8 * i + lane / 4]);
      std::memcpy(&r[i], p + 4 * (lane % 4), 4);
    }
    return 0;
  });
}

inline float bf16_lo(uint32_t x) { return __uint_as_float(x << 16); }
inline float bf16_hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  namespace emu = ::moekit::emu;
  const unsigned lane = emu::fiber().lane;
  // Gather every lane's fragments: A as 4 words, B as 2 words (three 64-bit exchanges).
  uint32_t A[32][4], B[32][2];
  for (int part = 0; part < 3; ++part) {
    const uint32_t lo = part < 2 ? a[2 * part] : b[0];
    const uint32_t hi = part < 2 ? a[2 * part + 1] : b[1];
    emu::warp_exchange(0xffffffffu, uint64_t(lo) | (uint64_t(hi) << 32), [&](const uint64_t* s, unsigned) {
      for (int l = 0; l < 32; ++l) {
        if (part < 2) {
          A[l][2 * part] = uint32_t(s[l]);
          A[l][2 * part + 1] = uint32_t(s[l] >> 32);
        } else {
          B[l][0] = uint32_t(s[l]);
          B[l][1] = uint32_t(s[l] >> 32);
        }
      }
      return 0;
    });
  }
  // Element (row, k) of A and (k, n) of B from the fragment layout.
  auto a_at = [&](int row, int k) {
    const int g = row % 8, t = (k % 8) / 2, l = 4 * g + t;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return k % 2 ? bf16_hi(A[l][reg]) : bf16_lo(A[l][reg]);
  };
  auto b_at = [&](int k, int n) {
    const int t = (k % 8) / 2, l = 4 * n + t, reg = k >= 8 ? 1 : 0;
    return k % 2 ? bf16_hi(B[l][reg]) : bf16_lo(B[l][reg]);
  };
  const int g = int(lane / 4), t = int(lane % 4);
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(a_at(row, k), b_at(k, col), acc);
    d[i] = acc;
  }
}

#endif

}  // namespace ptx
}  // namespace moekit

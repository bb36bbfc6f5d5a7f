// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): a counter-based generator, so every (key, counter) pair names one block of four
// 32-bit words and any thread can compute its own draw with no state. Integer arithmetic
// only: the same bits on the GPU, in the host emulation and in the Rust twin
// (crates/moekit-logits/src/philox.rs; a change here must change it too). Checked against the
// Random123 known-answer vectors by moekit-logits' tests, on the emulation too.
#pragma once

#include <stdint.h>

namespace moekit {
namespace philox {

// Round multipliers and the Weyl key increments (golden ratio, sqrt(3) - 1) of Philox4x32.
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

struct Block {
  uint32_t x[4];
};

__device__ __forceinline__ void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds; the key is bumped by (kW0, kW1) between rounds (the first round uses the key
// as given). One round: (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2),
// hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)).
__device__ __forceinline__ Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                               uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Block b;
  b.x[0] = c0;
  b.x[1] = c1;
  b.x[2] = c2;
  b.x[3] = c3;
  return b;
}

// A uniform in [0, 1) from one output word: its top 24 bits times 2^-24 (exact in f32; the
// largest value is 1 - 2^-24).
__device__ __forceinline__ float uniform24(uint32_t x) { return static_cast<float>(x >> 8) * 0x1p-24f; }

}  // namespace philox
}  // namespace moekit

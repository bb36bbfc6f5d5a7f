// Sampling one token per row of logits [rows, vocab] on the device: temperature (0 = greedy
// argmax, ties to the lowest id), top-k, top-p (nucleus), the uniform from Philox4x32-10
// (moekit/philox.cuh; key = seed, counter = (row, step)), so a seed gives the same tokens on
// every run and every device, and the emulation checks the kernel bit for bit against
// moekit-logits' reference (which spells out the same arithmetic and summation order).
//
// One block of 256 threads per row; thread t owns the elements t, t + 256, ... (any vocab).
// Weights w_j = e^((z_j - max) / T) (in (0, 1], +0 for NaN or -inf logits; +inf logits count as
// FLT_MAX) go to the scratch row once. Candidates are ordered by (w descending, id ascending):
// a total order, so "the first n candidates" is a threshold set
// A(a, c) = { j : bits(w_j) > a, or bits(w_j) == a and j <= c } (w >= 0, so its bits order
// like the value). Instead of sorting, every selection is a search for the largest threshold
// whose set still satisfies a monotone predicate of (sum of w, count) over the set: 31 steps
// fixing the bits of `a` from the top, then a binary search over `c` (ceil(log2 vocab) steps);
// each step is one pass over the scratch row with one block reduction. The sum over a set is
// the kernel's fixed tree (thread partials in index order, warp butterflies, butterfly of the
// 8 warp partials), monotone in the set because rounding is monotone, so the search is exact:
//   top-k:  the largest set with count >= k;
//   top-p:  S = mass of the top-k set, target = p S: the smallest prefix with count >= 1 and
//           mass >= target (skipped when p == 1);
//   draw:   M = mass of the kept set, r = u M: the smallest prefix with mass > r; its last
//           element is the token (if M > r fails, i.e. every weight is 0, the first candidate).
// Cost: about 2 + 45 passes per search over 4 V bytes of scratch (L2-resident for decode
// batches), ~50 V exps once; a radix select would be the next step for large vocabularies.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_sample require SHFL
// moekit-budget: moekit_sample threads=256 blocks_per_sm>=4
// moekit-budget: moekit_sample regs<=64
// moekit-budget: moekit_philox_probe regs<=64

#include "moekit/abi.h"
#include "moekit/fmath.cuh"
#include "moekit/philox.cuh"

namespace {

namespace fm = moekit::fm;

constexpr int kWarps = 8;
constexpr int kBlock = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kFltMax = 0x1.fffffep+127f;

struct SumCount {
  float sum;
  int count;
};

struct Shared {
  float sum[2][kWarps];  // double-buffered warp partials: one barrier per reduction
  int count[2][kWarps];
  float val[kWarps];
  int idx[kWarps];
};

// Block (sum, count) in the fixed order (see logits.cu `block_sum`); every thread gets it.
// After the warp butterflies, lane 0 of each warp writes its partial to one of two slot sets
// (alternating per call) and every thread then sums the 8 partials itself in the order lane 0
// of a 32-lane butterfly over them would (lanes 8..31 holding +0: each partial gets + 0 twice,
// then ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7))), so the bits equal the reference's
// `warp_sum` of the 8 partials. One barrier: a warp can only rewrite a slot set after the next
// call's barrier, which every reader of the previous use has passed. `parity` is each thread's
// own register; every thread flips it in lockstep (reductions are block-uniform calls).
__device__ __forceinline__ SumCount block_sum_count(float s, int n, Shared& sh, int& parity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s = fm::add(s, __shfl_xor_sync(kFull, s, off));
    n += __shfl_xor_sync(kFull, n, off);
  }
  if (lane == 0) {
    sh.sum[parity][warp] = s;
    sh.count[parity][warp] = n;
  }
  __syncthreads();
  float x[kWarps];
  int c = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    x[w] = fm::add(fm::add(sh.sum[parity][w], 0.0f), 0.0f);
    c += sh.count[parity][w];
  }
  parity ^= 1;
  const float t = fm::add(fm::add(fm::add(x[0], x[4]), fm::add(x[2], x[6])),
                          fm::add(fm::add(x[1], x[5]), fm::add(x[3], x[7])));
  return SumCount{t, c};
}

__device__ __forceinline__ float block_max(float v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  if (lane == 0) sh.val[warp] = v;
  __syncthreads();
  float m = sh.val[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sh.val[w]);
  __syncthreads();  // sh.val is reused by the next row's argmax / max
  return m;
}

// (v, i) before (bv, bi) in the greedy order: larger value, then lower id; NaN never.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// Greedy: the largest logit, ties to the lowest id, NaN ignored; 0 when every logit is NaN.
__device__ int block_argmax(const float* z, int v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float bv = -__int_as_float(0x7f800000);
  int bi = v;  // "none yet": any real candidate (also -inf) beats it by its lower id
  for (int j = threadIdx.x; j < v; j += kBlock) {
    const float x = __ldg(&z[j]);
    if (better(x, j, bv, bi)) {
      bv = x;
      bi = j;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, off);
    const int oi = __shfl_xor_sync(kFull, bi, off);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    sh.val[warp] = bv;
    sh.idx[warp] = bi;
  }
  __syncthreads();
  int best = v;
  if (threadIdx.x == 0) {
    float b = -__int_as_float(0x7f800000);
    for (int w = 0; w < kWarps; ++w)
      if (better(sh.val[w], sh.idx[w], b, best)) {
        b = sh.val[w];
        best = sh.idx[w];
      }
  }
  __syncthreads();  // the caller's next use of `sh` follows
  return best < v ? best : 0;
}

// Membership in the threshold set A(a, c).
__device__ __forceinline__ bool in_set(uint32_t wb, int j, uint32_t a, int c) { return wb > a || (wb == a && j <= c); }

struct Threshold {
  uint32_t a;
  int c;
};

// (sum, count) of the weights in A(a, c) and in the kept set A(f.a, f.c).
__device__ __forceinline__ SumCount reduce_set(const float* w, int v, uint32_t a, int c, Threshold f, Shared& sh,
                                            int& parity) {
  float s = 0.0f;
  int n = 0;
  for (int j = threadIdx.x; j < v; j += kBlock) {
    const float x = w[j];
    const uint32_t wb = __float_as_uint(x);
    if (in_set(wb, j, a, c) && in_set(wb, j, f.a, f.c)) {
      s = fm::add(s, x);
      n += 1;
    }
  }
  return block_sum_count(s, n, sh, parity);
}

enum Pred { kCountAtLeastK, kMassAtLeast, kMassAbove };

__device__ __forceinline__ bool holds(Pred pred, SumCount r, int k, float target, bool positive) {
  switch (pred) {
    case kCountAtLeastK:
      return r.count >= k;
    case kMassAtLeast:
      return r.count >= 1 && r.sum >= target;
    default:
      return r.count >= 1 && (r.sum > target || !positive);
  }
}

// The largest threshold (a, then the smallest c) whose set within `f` satisfies `pred`
// (which holds for the whole of `f`).
__device__ Threshold search(const float* w, int v, Threshold f, Pred pred, int k, float target, bool positive,
                            Shared& sh, int& parity) {
  uint32_t a = 0;
  for (int b = 30; b >= 0; --b) {
    const uint32_t cand = a | (1u << b);
    if (holds(pred, reduce_set(w, v, cand, v - 1, f, sh, parity), k, target, positive)) a = cand;
  }
  int lo = 0, hi = v - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (holds(pred, reduce_set(w, v, a, mid, f, sh, parity), k, target, positive))
      hi = mid;
    else
      lo = mid + 1;
  }
  return Threshold{a, lo};
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock) moekit_sample(const MoekitSampleParams p) {
  __shared__ Shared sh;
  int parity = 0;
  const int v = p.vocab;
  for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float* z = reinterpret_cast<const float*>(p.logits) + row * static_cast<uint64_t>(v);
    int token;
    if (p.temperature == 0.0f) {
      token = block_argmax(z, v, sh);
    } else {
      float* w = reinterpret_cast<float*>(p.weights) + row * static_cast<uint64_t>(v);
      float m = -kFltMax;
      for (int j = threadIdx.x; j < v; j += kBlock) {
        const float x = __ldg(&z[j]);
        m = fmaxf(m, x > kFltMax ? kFltMax : x);
      }
      m = block_max(m, sh);
      const float inv_t = fm::rcp(p.temperature);
      for (int j = threadIdx.x; j < v; j += kBlock) {
        float x = __ldg(&z[j]);
        x = x > kFltMax ? kFltMax : x;
        float wj = 0.0f;
        if (x == x) {
          const float d = fm::sub(x, m);
          wj = d == 0.0f ? 1.0f : fm::exp(fm::mul(d, inv_t));
          if (!(wj == wj)) wj = 0.0f;
        }
        w[j] = wj;  // read back only by this thread
      }
      Threshold f{0u, v - 1};  // every candidate
      if (p.top_k > 0 && p.top_k < v) f = search(w, v, f, kCountAtLeastK, p.top_k, 0.0f, false, sh, parity);
      if (p.top_p < 1.0f) {
        const float s = reduce_set(w, v, 0u, v - 1, f, sh, parity).sum;
        f = search(w, v, f, kMassAtLeast, 0, fm::mul(p.top_p, s), false, sh, parity);
      }
      const float mass = reduce_set(w, v, 0u, v - 1, f, sh, parity).sum;
      const moekit::philox::Block rnd = moekit::philox::philox4x32_10(
          static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), static_cast<uint32_t>(p.step),
          static_cast<uint32_t>(p.step >> 32), static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
      const float r = fm::mul(moekit::philox::uniform24(rnd.x[0]), mass);
      token = search(w, v, f, kMassAbove, 0, r, mass > r, sh, parity).c;
    }
    if (threadIdx.x == 0) reinterpret_cast<int32_t*>(p.tokens)[row] = token;
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_philox_probe(const MoekitPhiloxProbeParams p) {
  const uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const auto* c = reinterpret_cast<const uint32_t*>(p.ctr) + 4 * i;
  const auto* k = reinterpret_cast<const uint32_t*>(p.key) + 2 * i;
  const moekit::philox::Block b = moekit::philox::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
  auto* o = reinterpret_cast<uint32_t*>(p.out) + 4 * i;
  for (int q = 0; q < 4; ++q) o[q] = b.x[q];
}

// Log-softmax over LM-head logits rows: per-token log-probabilities of given targets, entropy,
// the saved row statistics (max, logsumexp), the gradient of
// sum_r dlogp[r] logp[r] + dentropy[r] H[r] w.r.t. the logits (in place or beside them), and
// the device-side mean cross-entropy reduction (count of valid targets on the device).
//
// One block of 256 threads per row (grid-stride over rows); thread t owns the elements
// t, t + 256, t + 512, ... of the row, so every load of a warp is coalesced and every row
// length works (no multiple of 32 needed). Sums are one fixed tree: each thread's elements in
// index order, then the warp butterfly (moekit-fmath `warp_sum`), then a second butterfly
// over the 8 warp partials; moekit-logits' reference spells out the same order, so the
// results are bit-identical on the CPU, in the emulation and on any GPU. exp is moekit's
// (fmath.cuh), log is this file's `log_f32` (twin: moekit-logits `reference::log_f32`).
//
// The backward needs no probabilities tensor: p_j = exp(z_j - lse) is recomputed from the
// logits and the forward's lse while the gradient row is written.
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_logsoftmax_fwd require SHFL
// moekit-budget: moekit_logsoftmax_fwd threads=256 blocks_per_sm>=4
// moekit-budget: moekit_logsoftmax_bwd threads=256 blocks_per_sm>=4
// moekit-budget: moekit_cross_entropy_reduce threads=256 blocks_per_sm>=4
// moekit-budget: moekit_logsoftmax_* regs<=64

#include "moekit/abi.h"
#include "moekit/fmath.cuh"

namespace {

namespace fm = moekit::fm;

constexpr int kWarps = 8;
constexpr int kBlock = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fm::add(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Block sum in the fixed order: warp butterflies, then a butterfly over the 8 warp partials
// (lanes 8..31 contribute +0). Every thread gets the result. `red` holds kWarps + 1 floats;
// two barriers (the result slot is separate, so back-to-back calls do not race).
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < kWarps ? red[lane] : 0.0f;
    x = warp_sum(x);
    if (lane == 0) red[kWarps] = x;
  }
  __syncthreads();
  return red[kWarps];
}

// Block max (NaN ignored; exact in any order).
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < kWarps ? red[lane] : -__int_as_float(0x7f800000);
    x = warp_max(x);
    if (lane == 0) red[kWarps] = x;
  }
  __syncthreads();
  return red[kWarps];
}

// Natural log, reproducible (explicitly rounded operations only; within 3 ulp for positive
// finite x): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with s = f / (2 + f),
// f = m - 1 (exact), by its odd series to s^11 (|s| <= 0.1716: truncation below 2^-29
// relative), then e ln2 in two parts. 0 -> -inf, +inf -> +inf, negative or NaN -> NaN.
__device__ __forceinline__ float log_f32(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -__int_as_float(0x7f800000) : fm::bits_to_f32(0x7fc00000u);
  if (x == __int_as_float(0x7f800000)) return x;
  uint32_t bits = __float_as_uint(x);
  int e = 0;
  if (bits < 0x00800000u) {  // subnormal: scale by 2^23 (exact)
    bits = __float_as_uint(fm::mul(x, 8388608.0f));
    e = -23;
  }
  e += static_cast<int>(bits >> 23) - 127;
  uint32_t mb = (bits & 0x007fffffu) | 0x3f800000u;
  if (mb > 0x3fb504f3u) {  // m > sqrt(2): halve it (exact)
    mb -= 0x00800000u;
    e += 1;
  }
  const float f = fm::sub(fm::bits_to_f32(mb), 1.0f);
  const float s = fm::div(f, fm::add(2.0f, f));
  const float z = fm::mul(s, s);
  float p = 0x1.745d18p-4f;            // 1/11
  p = fm::fma(p, z, 0x1.c71c72p-4f);   // 1/9
  p = fm::fma(p, z, 0x1.24924ap-3f);   // 1/7
  p = fm::fma(p, z, 0x1.99999ap-3f);   // 1/5
  p = fm::fma(p, z, 0x1.555556p-2f);   // 1/3
  const float logm = fm::mul(2.0f, fm::fma(fm::mul(s, z), p, s));
  const float ef = static_cast<float>(e);
  return fm::add(fm::fma(ef, 0x1.7f7d1cp-20f, logm), fm::mul(ef, 0x1.62e4p-1f));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kBlock) moekit_logsoftmax_fwd(const MoekitLogsoftmaxFwdParams p) {
  __shared__ float red[kWarps + 1];
  const auto* logits = reinterpret_cast<const float*>(p.logits);
  const auto* targets = reinterpret_cast<const int32_t*>(p.targets);
  const int v = p.vocab;
  for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float* z = logits + row * static_cast<uint64_t>(v);
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < v; j += kBlock) m = fmaxf(m, __ldg(&z[j]));
    m = block_max(m, red);
    // S = sum e^(z - m), T = sum e^(z - m) (z - m) (a zero weight adds nothing: -inf logits
    // are allowed and must not make 0 * -inf).
    float s = 0.0f, t = 0.0f;
    for (int j = threadIdx.x; j < v; j += kBlock) {
      const float d = fm::sub(__ldg(&z[j]), m);
      const float e = fm::exp(d);
      s = fm::add(s, e);
      if (e > 0.0f) t = fm::fma(e, d, t);
    }
    s = block_sum(s, red);
    t = block_sum(t, red);
    if (threadIdx.x == 0) {
      const float log_s = log_f32(s);
      const float lse = fm::add(m, log_s);
      const float h = fm::sub(log_s, fm::div(t, s));
      const int y = targets[row];
      float lp = 0.0f;
      if (y >= v) {
        atomicAdd(reinterpret_cast<int*>(p.status), 1);
      } else if (y >= 0) {
        lp = fm::sub(z[y], lse);
      }
      reinterpret_cast<float*>(p.row_max)[row] = fm::canon(fm::add(m, 0.0f));
      reinterpret_cast<float*>(p.row_lse)[row] = fm::canon(lse);
      reinterpret_cast<float*>(p.entropy)[row] = fm::canon(h);
      reinterpret_cast<float*>(p.logp)[row] = fm::canon(lp);
    }
  }
}

extern "C" __global__ void __launch_bounds__(kBlock) moekit_logsoftmax_bwd(const MoekitLogsoftmaxBwdParams p) {
  const auto* logits = reinterpret_cast<const float*>(p.logits);
  auto* grad = reinterpret_cast<float*>(p.grad);
  const int v = p.vocab;
  for (uint64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const uint64_t base = row * static_cast<uint64_t>(v);
    const int y = reinterpret_cast<const int32_t*>(p.targets)[row];
    const bool valid = y >= 0 && y < v;
    const float dl = (p.dlogp != 0 && valid) ? reinterpret_cast<const float*>(p.dlogp)[row] : 0.0f;
    const float de = p.dentropy != 0 ? reinterpret_cast<const float*>(p.dentropy)[row] : 0.0f;
    if (dl == 0.0f && de == 0.0f) {
      for (int j = threadIdx.x; j < v; j += kBlock) grad[base + j] = 0.0f;
      continue;
    }
    const float lse = reinterpret_cast<const float*>(p.row_lse)[row];
    const float h = de != 0.0f ? reinterpret_cast<const float*>(p.entropy)[row] : 0.0f;
    // Not __ldg: in place, `logits` is written by this kernel (each element by its reader).
    for (int j = threadIdx.x; j < v; j += kBlock) {
      const float lp = fm::sub(logits[base + j], lse);
      const float pj = fm::exp(lp);
      const float ent = pj > 0.0f ? fm::mul(fm::mul(de, pj), fm::add(lp, h)) : 0.0f;
      const float g = fm::sub(fm::mul(dl, fm::sub(j == y ? 1.0f : 0.0f, pj)), ent);
      grad[base + j] = fm::canon(g);
    }
  }
}

extern "C" __global__ void __launch_bounds__(kBlock) moekit_cross_entropy_reduce(const MoekitCrossEntropyParams p) {
  __shared__ float red[kWarps + 1];
  __shared__ int red_n[kWarps + 1];
  const auto* logp = reinterpret_cast<const float*>(p.logp);
  const auto* targets = reinterpret_cast<const int32_t*>(p.targets);
  const int v = p.vocab;
  float s = 0.0f;
  int n = 0;
  for (uint64_t r = threadIdx.x; r < p.rows; r += kBlock) {
    const int y = targets[r];
    if (y >= 0 && y < v) {
      s = fm::add(s, logp[r]);
      n += 1;
    }
  }
  s = block_sum(s, red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  n = warp_sum_int(n);
  if (lane == 0) red_n[warp] = n;
  __syncthreads();
  if (warp == 0) {
    int x = lane < kWarps ? red_n[lane] : 0;
    x = warp_sum_int(x);
    if (lane == 0) red_n[kWarps] = x;
  }
  __syncthreads();
  n = red_n[kWarps];
  const float count = static_cast<float>(n > 0 ? n : 1);
  if (threadIdx.x == 0) {
    *reinterpret_cast<float*>(p.loss) = fm::canon(fm::div(-s, count));
    *reinterpret_cast<int32_t*>(p.count) = n;
  }
  const float g = fm::div(-1.0f, count);
  for (uint64_t r = threadIdx.x; r < p.rows; r += kBlock) {
    const int y = targets[r];
    reinterpret_cast<float*>(p.dlogp)[r] = (y >= 0 && y < v) ? g : 0.0f;
  }
}

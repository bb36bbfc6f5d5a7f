// Multi-tensor optimizer: global gradient norm (deterministic), clipping factor and AdamW with
// decoupled weight decay, over every parameter tensor in three launches, with no host round trip
// between them (the norm, the clip factor, the step, the learning rate and the bias corrections
// stay in device memory: MoekitOptimScalars). Semantics and the exact order of every operation:
// crates/moekit-optim/src/reference.rs, which reproduces the kernels bit for bit.
//
// Work unit: a chunk of `chunk` elements of one tensor (a tensor's last chunk is shorter),
// numbered globally in tensor order; a block finds its chunk's tensor by binary search over the
// descriptors' chunk_start. Persistent grids stride over chunks.
//
// 1. moekit_optim_sumsq: per chunk, thread t sums g^2 in f64 over the 4-element vectors
//    v = t, t + 256, ... (v < ceil(n / 4); each vector's elements in order; the last, partial
//    vector element by element), then a fixed butterfly over the warp (xor 16, 8, 4, 2, 1) and
//    over the 8 warp sums (xor 4, 2, 1); partials[chunk] = the block's sum. No atomics.
// 2. moekit_optim_norm_finalize (one block): thread t sums partials t, t + 256, ... in order,
//    the same block butterfly; norm = f32(sqrt(sum)); clip, skip flag, lr, bias corrections,
//    step increment.
// 3. moekit_optim_adamw: elementwise AdamW, every operation explicitly rounded (no FMA
//    contraction), IEEE division and square root, optional BF16 copy (RNE) of the new weights.
//
// f64 accumulation: each g^2 is exact in f64 (24-bit significands), so only the additions round,
// with a relative error bound of (n chunks + chunk) * 2^-53, far below the f32 result's half ulp:
// the model's own norm (moekit-model, sequential f64) agrees to the last f32 bit except within
// ~1e-10 relative of a rounding boundary. H200 f64 throughput is half of f32, irrelevant for a
// memory-bound pass (one DADD per 4 bytes read).
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-budget: moekit_optim_sumsq threads=256 blocks_per_sm>=4
// moekit-budget: moekit_optim_adamw threads=256 blocks_per_sm>=4
// moekit-budget: moekit_optim_* regs<=64

#include "moekit/abi.h"
#include "moekit/fmath.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

#ifdef MOEKIT_EMULATION
// The emulation is compiled with -ffp-contract=off: plain operators are single IEEE operations.
inline double d_add(double a, double b) { return a + b; }
inline double d_sq(float x) { return static_cast<double>(x) * static_cast<double>(x); }
inline double d_sqrt(double x) { return std::sqrt(x); }
inline float d_to_f(double x) { return static_cast<float>(x); }
inline float f_sqrt(float x) { return std::sqrt(x); }
#else
__device__ __forceinline__ double d_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double d_sq(float x) {
  const double d = static_cast<double>(x);
  return __dmul_rn(d, d);  // exact: 48 significant bits
}
__device__ __forceinline__ double d_sqrt(double x) { return __dsqrt_rn(x); }
__device__ __forceinline__ float d_to_f(double x) { return __double2float_rn(x); }
__device__ __forceinline__ float f_sqrt(float x) { return __fsqrt_rn(x); }
#endif

// The global chunk `c`'s tensor: the last descriptor whose chunk_start <= c (empty tensors
// share their chunk_start with the next one and are never chosen).
__device__ __forceinline__ uint32_t find_tensor(const MoekitOptimTensor* ts, uint32_t n, uint64_t c) {
  uint32_t lo = 0, hi = n;  // ts[lo].chunk_start <= c < ts[hi].chunk_start (hi = n: +inf)
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (ts[mid].chunk_start <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Sum over the block in a fixed order (see the file comment); the result is valid in thread 0.
// `smem` holds kWarps doubles; safe to call repeatedly (a barrier precedes its reuse).
__device__ __forceinline__ double block_sum(double x, double* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = d_add(x, __shfl_xor_sync(0xffffffffu, x, off));
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  double y = 0.0;
  if (warp == 0) {
    y = lane < kWarps ? smem[lane] : 0.0;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) y = d_add(y, __shfl_xor_sync(0xffffffffu, y, off));
  }
  return y;
}

// a^b by square-and-multiply: the algorithm of Rust's f32::powi (compiler-builtins'
// __powisf2; libgcc's gives the same roundings), so bias corrections match the model.
__device__ __forceinline__ float powi(float a, int32_t b) {
  const bool recip = b < 0;
  uint32_t n = recip ? 0u - static_cast<uint32_t>(b) : static_cast<uint32_t>(b);
  float r = 1.0f;
  for (;;) {
    if (n & 1u) r = moekit::fm::mul(r, a);
    n >>= 1;
    if (n == 0) break;
    a = moekit::fm::mul(a, a);
  }
  return recip ? moekit::fm::div(1.0f, r) : r;
}

// f32 -> BF16 bits, round to nearest even; every NaN -> 0x7fc0.
__device__ __forceinline__ uint16_t bf16_rne(float x) {
  const uint32_t b = __float_as_uint(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

struct AdamWConsts {
  float clip, lr, bc1, bc2, b1, b2, omb1, omb2, eps, decay;
};

// One element: the operation order of moekit-model's adamw_chunk, each op rounded once.
__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, const AdamWConsts& k) {
  using namespace moekit::fm;
  const float gj = mul(g, k.clip);
  m = add(mul(k.b1, m), mul(k.omb1, gj));
  v = add(mul(k.b2, v), mul(mul(k.omb2, gj), gj));
  const float update = div(div(m, k.bc1), add(f_sqrt(div(v, k.bc2)), k.eps));
  p = sub(p, mul(k.lr, add(update, mul(k.decay, p))));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) moekit_optim_sumsq(const MoekitOptimNormParams prm) {
  const auto* ts = reinterpret_cast<const MoekitOptimTensor*>(prm.tensors);
  auto* partials = reinterpret_cast<double*>(prm.partials);
  __shared__ double warp_sums[kWarps];
  for (uint64_t c = blockIdx.x; c < prm.n_chunks; c += gridDim.x) {
    const MoekitOptimTensor& t = ts[find_tensor(ts, prm.n_tensors, c)];
    const uint64_t begin = (c - t.chunk_start) * prm.chunk;
    const uint64_t left = t.len - begin;
    const uint32_t n = left < prm.chunk ? static_cast<uint32_t>(left) : prm.chunk;
    const float* g = reinterpret_cast<const float*>(t.g) + begin;
    const auto* g4 = reinterpret_cast<const float4*>(g);
    const uint32_t full = n / 4;
    double acc = 0.0;
#pragma unroll 4
    for (uint32_t v = threadIdx.x; v < full; v += kThreads) {
      const float4 x = __ldg(&g4[v]);
      acc = d_add(acc, d_sq(x.x));
      acc = d_add(acc, d_sq(x.y));
      acc = d_add(acc, d_sq(x.z));
      acc = d_add(acc, d_sq(x.w));
    }
    if (threadIdx.x == full % kThreads) {
      for (uint32_t e = full * 4; e < n; ++e) acc = d_add(acc, d_sq(__ldg(&g[e])));
    }
    const double s = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) partials[c] = s;
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_optim_norm_finalize(const MoekitOptimNormParams prm) {
  const auto* partials = reinterpret_cast<const double*>(prm.partials);
  __shared__ double warp_sums[kWarps];
  double acc = 0.0;
  for (uint64_t c = threadIdx.x; c < prm.n_chunks; c += kThreads) acc = d_add(acc, partials[c]);
  const double total = block_sum(acc, warp_sums);
  if (threadIdx.x != 0) return;
  auto* s = reinterpret_cast<MoekitOptimScalars*>(prm.scalars);
  const float norm = d_to_f(d_sqrt(total));
  const bool finite = (__float_as_uint(norm) & 0x7f800000u) != 0x7f800000u;
  s->grad_norm = norm;
  s->skipped = finite ? 0u : 1u;
  s->clip = (prm.clip_norm > 0.0f && norm > prm.clip_norm) ? moekit::fm::div(prm.clip_norm, norm) : 1.0f;
  if (prm.advance != 0 && finite) {
    const uint64_t step = s->step;
    float lr = prm.lr;
    if (prm.lr_table != 0) {
      const uint64_t last = static_cast<uint64_t>(prm.lr_table_len) - 1;
      lr = reinterpret_cast<const float*>(prm.lr_table)[step < last ? step : last];
    }
    // The model's `self.step as i32` after the increment: the low 32 bits, two's complement.
    const int32_t t = static_cast<int32_t>(static_cast<uint32_t>(step + 1));
    s->lr = lr;
    s->bc1 = moekit::fm::sub(1.0f, powi(prm.beta1, t));
    s->bc2 = moekit::fm::sub(1.0f, powi(prm.beta2, t));
    s->step = step + 1;
  }
}

extern "C" __global__ void __launch_bounds__(256) moekit_optim_adamw(const MoekitOptimAdamWParams prm) {
  const auto* s = reinterpret_cast<const MoekitOptimScalars*>(prm.scalars);
  if (s->skipped != 0) return;
  const auto* ts = reinterpret_cast<const MoekitOptimTensor*>(prm.tensors);
  AdamWConsts k;
  k.clip = s->clip;
  k.lr = s->lr;
  k.bc1 = s->bc1;
  k.bc2 = s->bc2;
  k.b1 = prm.beta1;
  k.b2 = prm.beta2;
  k.omb1 = moekit::fm::sub(1.0f, prm.beta1);
  k.omb2 = moekit::fm::sub(1.0f, prm.beta2);
  k.eps = prm.eps;
  for (uint64_t c = blockIdx.x; c < prm.n_chunks; c += gridDim.x) {
    const MoekitOptimTensor& t = ts[find_tensor(ts, prm.n_tensors, c)];
    const uint64_t begin = (c - t.chunk_start) * prm.chunk;
    const uint64_t left = t.len - begin;
    const uint32_t n = left < prm.chunk ? static_cast<uint32_t>(left) : prm.chunk;
    k.decay = t.decay != 0 ? prm.weight_decay : 0.0f;
    float* p = reinterpret_cast<float*>(t.p) + begin;
    const float* g = reinterpret_cast<const float*>(t.g) + begin;
    float* m = reinterpret_cast<float*>(t.m) + begin;
    float* v = reinterpret_cast<float*>(t.v) + begin;
    uint16_t* pb = t.p_bf16 != 0 ? reinterpret_cast<uint16_t*>(t.p_bf16) + begin : nullptr;
    const uint32_t full = n / 4;
#pragma unroll 2
    for (uint32_t i = threadIdx.x; i < full; i += kThreads) {
      float4 p4 = reinterpret_cast<const float4*>(p)[i];
      const float4 g4 = __ldg(&reinterpret_cast<const float4*>(g)[i]);
      float4 m4 = reinterpret_cast<const float4*>(m)[i];
      float4 v4 = reinterpret_cast<const float4*>(v)[i];
      adamw_one(p4.x, g4.x, m4.x, v4.x, k);
      adamw_one(p4.y, g4.y, m4.y, v4.y, k);
      adamw_one(p4.z, g4.z, m4.z, v4.z, k);
      adamw_one(p4.w, g4.w, m4.w, v4.w, k);
      reinterpret_cast<float4*>(p)[i] = p4;
      reinterpret_cast<float4*>(m)[i] = m4;
      reinterpret_cast<float4*>(v)[i] = v4;
      if (pb != nullptr) {
        const uint32_t lo = static_cast<uint32_t>(bf16_rne(p4.x)) | (static_cast<uint32_t>(bf16_rne(p4.y)) << 16);
        const uint32_t hi = static_cast<uint32_t>(bf16_rne(p4.z)) | (static_cast<uint32_t>(bf16_rne(p4.w)) << 16);
        reinterpret_cast<uint2*>(pb)[i] = make_uint2(lo, hi);
      }
    }
    for (uint32_t e = full * 4 + threadIdx.x; e < n; e += kThreads) {
      float pe = p[e], me = m[e], ve = v[e];
      adamw_one(pe, __ldg(&g[e]), me, ve, k);
      p[e] = pe;
      m[e] = me;
      v[e] = ve;
      if (pb != nullptr) pb[e] = bf16_rne(pe);
    }
  }
}

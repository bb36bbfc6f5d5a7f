// Top-k gating (router) kernels: softmax and DeepSeek-V3 sigmoid + bias routing with
// group limits, its backward, the auxiliary-loss-free bias update, and the sequence-wise
// balance loss with its backward.
//
// Every kernel computes the same bits as moekit-gating's CPU reference: scores use moekit's
// exp (moekit/fmath.cuh) and explicitly rounded operations, and every sum has one fixed
// order that the reference spells out (see `warp_sum`). So the same logits give the same
// expert ids and weights on the CPU, in the emulation and on any GPU.
//
// Thread mapping (routing, both directions): one warp per token, lane l owning experts
// l, l + 32, ..., l + 32 (EPL - 1): logit loads are coalesced and E needs no power of two.
// EPL = 1, 2, 4, 8, 16 are separate kernels (E up to 32, 64, 128, 256, 512).
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// Static proof of the "same bits" design: no hardware exp2/log2 approximation anywhere
// (IEEE division brings MUFU.RCP with its correction steps, which is fine).
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_route_fwd_e8 require SHFL

#include "moekit/abi.h"
#include "moekit/convert.cuh"
#include "moekit/fmath.cuh"

namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kBlock = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;

// ---- ordering ------------------------------------------------------------------------------

// Order-preserving map of a selection score to u32: larger score -> larger key, -0 == +0,
// NaN -> 1 (below every number, -inf included), 0 reserved for "not a candidate".
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t b = __float_as_uint(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 1u;
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Total order on candidates: by key, then the lower index first. Distinct for distinct
// indices; 0 for "no candidate".
__device__ __forceinline__ uint64_t rank_key(uint32_t key, int index) {
  return key == 0u ? 0ull : ((static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index)));
}

// Warp-wide max (every lane gets it). For floats, NaN is ignored; the result is exact in any
// order (a max does not round).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(kFull, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The warp sum every kernel (and the reference) uses: butterfly over lanes, partner 16 first.
// Every lane ends with the same bits (f32 addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = moekit::fm::add(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ float load_logit(uint64_t base, int32_t dtype, uint64_t index) {
  if (dtype == MOEKIT_LOGITS_BF16) {
    return moekit::bf16_bits_to_f32(__ldg(reinterpret_cast<const uint16_t*>(base) + index));
  }
  return __ldg(reinterpret_cast<const float*>(base) + index);
}

// Scores of token t for this lane's experts (0 in slots past E). Softmax: max, then
// exp(u - max) summed per lane in slot order then by `warp_sum`, then divided by the sum.
template <int EPL>
__device__ __forceinline__ void token_scores(uint64_t logits, int32_t dtype, int32_t score_func, int experts,
                                             uint64_t t, int lane, float (&s)[EPL]) {
  float u[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    u[i] = e < experts ? load_logit(logits, dtype, t * static_cast<uint64_t>(experts) + e) : 0.0f;
  }
  if (score_func == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
    for (int i = 0; i < EPL; ++i) s[i] = lane + 32 * i < experts ? moekit::fm::sigmoid(u[i]) : 0.0f;
    return;
  }
  float m = -__uint_as_float(0x7f800000u);
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    if (lane + 32 * i < experts && u[i] > m) m = u[i];
  }
  m = warp_max(m);
  float part = 0.0f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    s[i] = 0.0f;
    if (lane + 32 * i < experts) {
      s[i] = moekit::fm::exp(moekit::fm::sub(u[i], m));
      part = moekit::fm::add(part, s[i]);
    }
  }
  const float total = warp_sum(part);
#pragma unroll
  for (int i = 0; i < EPL; ++i) s[i] = moekit::fm::div(s[i], total);
}

// ---- forward -------------------------------------------------------------------------------

template <int EPL>
__device__ __forceinline__ void route_forward(const MoekitRouteParams& p) {
  constexpr int kMaxExperts = 32 * EPL;
  __shared__ float sel_smem[kWarps][kMaxExperts];
  __shared__ uint32_t group_smem[kWarps][kMaxExperts];
  __shared__ unsigned char keep_smem[kWarps][kMaxExperts];
  __shared__ int count_smem[kMaxExperts];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int experts = p.experts;
  const int k = p.top_k;
  const bool grouped = p.n_groups > 1;
  const int group_size = experts / p.n_groups;
  const bool has_bias = p.bias != 0;
  const float* bias = reinterpret_cast<const float*>(p.bias);
  int* counts = reinterpret_cast<int*>(p.counts);

  if (counts != nullptr) {
    for (int e = threadIdx.x; e < experts; e += kBlock) count_smem[e] = 0;
    __syncthreads();
  }

  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kWarps;
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * kWarps + warp; t < p.tokens; t += stride) {
    float s[EPL];
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, experts, t, lane, s);

    // Selection keys (the bias moves the choice, never the weights).
    uint32_t key[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      float sel = s[i];
      if (has_bias && e < experts) sel = moekit::fm::add(sel, __ldg(&bias[e]));
      key[i] = e < experts ? order_key(sel) : 0u;
      if (grouped && e < experts) sel_smem[warp][e] = sel;
    }

    if (grouped) {
      __syncwarp();
      // Group score: the top two selection scores summed (with a bias), else the top one.
      for (int g = lane; g < p.n_groups; g += 32) {
        uint32_t k1 = 0, k2 = 0;
        float v1 = 0.0f, v2 = 0.0f;
        for (int j = 0; j < group_size; ++j) {
          const float v = sel_smem[warp][g * group_size + j];
          const uint32_t kv = order_key(v);
          if (kv > k1) {
            k2 = k1, v2 = v1, k1 = kv, v1 = v;
          } else if (kv > k2) {
            k2 = kv, v2 = v;
          }
        }
        group_smem[warp][g] = order_key(has_bias && group_size >= 2 ? moekit::fm::add(v1, v2) : v1);
      }
      __syncwarp();
      // Keep the topk_groups best groups (ties to the lower group).
      for (int g = lane; g < p.n_groups; g += 32) {
        const uint64_t mine = rank_key(group_smem[warp][g], g);
        int better = 0;
        for (int h = 0; h < p.n_groups; ++h) better += rank_key(group_smem[warp][h], h) > mine;
        keep_smem[warp][g] = better < p.topk_groups;
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = lane + 32 * i;
        if (e < experts && !keep_smem[warp][e / group_size]) key[i] = 0u;
      }
      __syncwarp();  // the next token reuses this warp's shared rows
    }

    // Top-k: k rounds of a warp-wide max over each lane's best remaining candidate.
    uint64_t best = 0;
    float best_s = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const uint64_t r = rank_key(key[i], lane + 32 * i);
      if (r > best) best = r, best_s = s[i];
    }
    float sum = 0.0f;
    int my_id = -1;
    float my_w = 0.0f;
    for (int j = 0; j < k; ++j) {
      const uint64_t win = warp_max(best);
      const int e = static_cast<int>(~static_cast<uint32_t>(win));  // -1 when nothing is left
      const bool valid = win != 0ull && e >= 0 && e < experts;
      const int owner = e & 31;
      const float w = valid ? __shfl_sync(kFull, best_s, owner) : 0.0f;  // `valid` is warp-uniform
      if (valid && lane == owner) {
        best = 0;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          if (lane + 32 * i == e) key[i] = 0u;
          const uint64_t r = rank_key(key[i], lane + 32 * i);
          if (r > best) best = r, best_s = s[i];
        }
      }
      sum = moekit::fm::add(sum, w);
      if (lane == j) my_id = valid ? e : -1, my_w = w;
    }
    if (p.renormalize && sum > 0.0f) my_w = moekit::fm::div(my_w, sum);
    my_w = moekit::fm::mul(my_w, p.route_scale);
    if (lane < k) {
      const uint64_t o = t * static_cast<uint64_t>(k) + lane;
      reinterpret_cast<int*>(p.topk_ids)[o] = my_id;
      reinterpret_cast<float*>(p.topk_weights)[o] = my_w;
      if (counts != nullptr && my_id >= 0) atomicAdd(&count_smem[my_id], 1);
    }
  }

  if (counts != nullptr) {
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += kBlock) {
      if (count_smem[e] != 0) atomicAdd(&counts[e], count_smem[e]);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

template <int EPL>
__device__ __forceinline__ void route_backward(const MoekitRouteParams& p) {
  constexpr int kMaxExperts = 32 * EPL;
  __shared__ float s_smem[kWarps][kMaxExperts];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int experts = p.experts;
  const int k = p.top_k;
  const int* ids = reinterpret_cast<const int*>(p.topk_ids);
  const float* grad_w = reinterpret_cast<const float*>(p.grad_weights);
  float* grad_u = reinterpret_cast<float*>(p.grad_logits);

  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kWarps;
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * kWarps + warp; t < p.tokens; t += stride) {
    float s[EPL];
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, experts, t, lane, s);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      if (lane + 32 * i < experts) s_smem[warp][lane + 32 * i] = s[i];
    }
    __syncwarp();
    // a_j = s[id_j]; S = sum a_j; dot = sum g_j a_j (ids outside [0, E) contribute nothing).
    const uint64_t row = t * static_cast<uint64_t>(k);
    float total = 0.0f, dot = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int id = __ldg(&ids[row + j]);
      if (id >= 0 && id < experts) {
        const float a = s_smem[warp][id];
        total = moekit::fm::add(total, a);
        dot = moekit::fm::add(dot, moekit::fm::mul(__ldg(&grad_w[row + j]), a));
      }
    }
    const bool renorm = p.renormalize && total > 0.0f;
    const float scale_over_total = renorm ? moekit::fm::div(p.route_scale, total) : 0.0f;
    const float dot_over_total = renorm ? moekit::fm::div(dot, total) : 0.0f;
    // dL/ds_e = sum over j with id_j == e of dA_j; D = sum_j dA_j a_j (softmax only).
    float gs[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) gs[i] = 0.0f;
    float big_d = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int id = __ldg(&ids[row + j]);
      if (id < 0 || id >= experts) continue;
      const float g = __ldg(&grad_w[row + j]);
      const float da = renorm ? moekit::fm::mul(scale_over_total, moekit::fm::sub(g, dot_over_total))
                              : moekit::fm::mul(p.route_scale, g);
      big_d = moekit::fm::add(big_d, moekit::fm::mul(da, s_smem[warp][id]));
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        if (lane + 32 * i == id) gs[i] = moekit::fm::add(gs[i], da);
      }
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e >= experts) continue;
      float du;
      if (p.score_func == MOEKIT_SCORE_SIGMOID) {
        du = moekit::fm::mul(gs[i], moekit::fm::mul(s[i], moekit::fm::sub(1.0f, s[i])));
      } else {
        du = moekit::fm::mul(s[i], moekit::fm::sub(gs[i], big_d));
      }
      grad_u[t * static_cast<uint64_t>(experts) + e] = du;
    }
    __syncwarp();
  }
}

// ---- balance loss --------------------------------------------------------------------------

// Per-sequence counts c_e of valid ids into `hist` (block-wide; ends with a barrier).
__device__ __forceinline__ void sequence_counts(const MoekitBalanceLossParams& p, uint64_t seq, int* hist) {
  for (int e = threadIdx.x; e < p.experts; e += kBlock) hist[e] = 0;
  __syncthreads();
  const int* ids = reinterpret_cast<const int*>(p.topk_ids);
  const uint64_t n = p.seq_len * static_cast<uint64_t>(p.top_k);
  const uint64_t base = seq * n;
  for (uint64_t i = threadIdx.x; i < n; i += kBlock) {
    const int id = __ldg(&ids[base + i]);
    if (id >= 0 && id < p.experts) atomicAdd(&hist[id], 1);
  }
  __syncthreads();
}

// Sum of a token's scores (slot order per lane, then the warp butterfly); slots past E hold 0.
template <int EPL>
__device__ __forceinline__ float score_sum(const float (&s)[EPL]) {
  float part = 0.0f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) part = moekit::fm::add(part, s[i]);
  return warp_sum(part);
}

// s'[t, e] for this lane's experts: s / sum(s) (sigmoid) or s (softmax, already normalised).
template <int EPL>
__device__ __forceinline__ void normalized_scores(const MoekitBalanceLossParams& p, uint64_t t, int lane,
                                                  float (&s)[EPL]) {
  token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, p.experts, t, lane, s);
  if (p.score_func != MOEKIT_SCORE_SIGMOID) return;
  const float z = score_sum(s);
#pragma unroll
  for (int i = 0; i < EPL; ++i) s[i] = moekit::fm::div(s[i], z);
}

// One block per sequence: warp w sums s' over tokens w, w + 8, ... in order, warps are summed
// in warp order, then loss = alpha * sum_e f_e P_e summed in expert order by thread 0.
template <int EPL>
__device__ __forceinline__ void balance_loss_forward(const MoekitBalanceLossParams& p) {
  constexpr int kMaxExperts = 32 * EPL;
  __shared__ int hist[kMaxExperts];
  __shared__ float psum[kWarps][kMaxExperts];
  const uint64_t seq = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  sequence_counts(p, seq, hist);
  float acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] = 0.0f;
  for (uint64_t r = warp; r < p.seq_len; r += kWarps) {
    float s[EPL];
    normalized_scores<EPL>(p, seq * p.seq_len + r, lane, s);
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] = moekit::fm::add(acc[i], s[i]);
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) psum[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    const float tokens = static_cast<float>(p.seq_len);
    const float f_scale = moekit::fm::div(static_cast<float>(p.experts), moekit::fm::mul(static_cast<float>(p.top_k), tokens));
    float loss = 0.0f;
    for (int e = 0; e < p.experts; ++e) {
      float pe = 0.0f;
      for (int w = 0; w < kWarps; ++w) pe = moekit::fm::add(pe, psum[w][e]);
      const float f = moekit::fm::mul(f_scale, static_cast<float>(hist[e]));
      loss = moekit::fm::add(loss, moekit::fm::mul(f, moekit::fm::div(pe, tokens)));
    }
    reinterpret_cast<float*>(p.loss)[seq] = moekit::fm::mul(p.alpha, loss);
  }
}

// Grid (token chunks, sequences): dL/ds'[t, e] = c_e = grad * alpha * f_e / T for the whole
// sequence; sigmoid: du = (c - <c, s'>) / Z * s (1 - s); softmax: du = s (c - <c, s>).
template <int EPL>
__device__ __forceinline__ void balance_loss_backward(const MoekitBalanceLossParams& p) {
  constexpr int kMaxExperts = 32 * EPL;
  __shared__ int hist[kMaxExperts];
  const uint64_t seq = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  sequence_counts(p, seq, hist);
  const float tokens = static_cast<float>(p.seq_len);
  const float f_scale = moekit::fm::div(static_cast<float>(p.experts), moekit::fm::mul(static_cast<float>(p.top_k), tokens));
  const float g = moekit::fm::div(moekit::fm::mul(__ldg(reinterpret_cast<const float*>(p.grad_loss) + seq), p.alpha), tokens);
  float c[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    c[i] = e < p.experts ? moekit::fm::mul(g, moekit::fm::mul(f_scale, static_cast<float>(hist[e]))) : 0.0f;
  }
  float* grad_u = reinterpret_cast<float*>(p.grad_logits);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kWarps;
  for (uint64_t r = static_cast<uint64_t>(blockIdx.x) * kWarps + warp; r < p.seq_len; r += stride) {
    const uint64_t t = seq * p.seq_len + r;
    float s[EPL];
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, p.experts, t, lane, s);
    const bool sigmoid = p.score_func == MOEKIT_SCORE_SIGMOID;
    const float z = sigmoid ? score_sum(s) : 1.0f;
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const float sn = sigmoid ? moekit::fm::div(s[i], z) : s[i];
      part = moekit::fm::add(part, moekit::fm::mul(c[i], sn));
    }
    const float dot = warp_sum(part);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      if (e >= p.experts) continue;
      const float d = moekit::fm::sub(c[i], dot);
      const float du = sigmoid ? moekit::fm::mul(moekit::fm::div(d, z), moekit::fm::mul(s[i], moekit::fm::sub(1.0f, s[i])))
                               : moekit::fm::mul(s[i], d);
      grad_u[t * static_cast<uint64_t>(p.experts) + e] = du;
    }
  }
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(256) moekit_bias_update(const MoekitBiasUpdateParams p) {
  __shared__ long long part[256];
  const int* counts = reinterpret_cast<const int*>(p.counts);
  float* bias = reinterpret_cast<float*>(p.bias);
  long long local = 0;
  for (int e = threadIdx.x; e < p.experts; e += 256) local += __ldg(&counts[e]);
  part[threadIdx.x] = local;
  __syncthreads();
  for (int half = 128; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  const long long total = part[0];  // integers: exact in any order
  for (int e = threadIdx.x; e < p.experts; e += 256) {
    // sign(mean - load) with mean = total / E, compared exactly as total vs E * load.
    const long long diff = total - static_cast<long long>(p.experts) * __ldg(&counts[e]);
    if (diff > 0) bias[e] = moekit::fm::add(bias[e], p.gamma);
    if (diff < 0) bias[e] = moekit::fm::sub(bias[e], p.gamma);
  }
}

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e1(const MoekitRouteParams p) { route_forward<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e1(const MoekitRouteParams p) { route_backward<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e1(const MoekitBalanceLossParams p) { balance_loss_forward<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e1(const MoekitBalanceLossParams p) { balance_loss_backward<1>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e2(const MoekitRouteParams p) { route_forward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e2(const MoekitRouteParams p) { route_backward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e2(const MoekitBalanceLossParams p) { balance_loss_forward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e2(const MoekitBalanceLossParams p) { balance_loss_backward<2>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e4(const MoekitRouteParams p) { route_forward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e4(const MoekitRouteParams p) { route_backward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e4(const MoekitBalanceLossParams p) { balance_loss_forward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e4(const MoekitBalanceLossParams p) { balance_loss_backward<4>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e8(const MoekitRouteParams p) { route_forward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e8(const MoekitRouteParams p) { route_backward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e8(const MoekitBalanceLossParams p) { balance_loss_forward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e8(const MoekitBalanceLossParams p) { balance_loss_backward<8>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e16(const MoekitRouteParams p) { route_forward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e16(const MoekitRouteParams p) { route_backward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e16(const MoekitBalanceLossParams p) { balance_loss_forward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e16(const MoekitBalanceLossParams p) { balance_loss_backward<16>(p); }

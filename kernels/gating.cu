// Top-k gating (router) kernels: softmax and DeepSeek-V3 sigmoid + bias routing with
// group limits, its backward, the auxiliary-loss-free bias update, and the sequence-wise
// balance loss with its backward.
//
// Every kernel computes the same bits as moekit-gating's CPU reference: scores use moekit's
// exp (moekit/fmath.cuh) and explicitly rounded operations, and every sum has one fixed
// order that the reference spells out (see `warp_sum`). So the same logits give the same
// expert ids and weights on the CPU, in the emulation and on any GPU.
//
// Team layout (the routing forward, `moekit_route_fwd_team_e*`): a team of L lanes routes one
// token, lane r of the team owning the C consecutive experts r C .. r C + C - 1 (slots past E
// are empty), so a warp routes 32 / L tokens at once: L = 8 and C = 1, 2, 4, ..., 32 for
// E <= 8 C (variants e8 .. e256), L = 16 and C = 32 for E <= 512 (e512). Each lane loads its
// chunk with 16-byte loads, keeps its scores in registers, and for DeepSeek-V3's group limit
// (group size = C: one group per lane) computes its group's top two with integer max/min;
// team reductions are log2(L) shuffles. The softmax sum of every routing kernel follows this
// layout (chunk in order, then the team butterfly; `team_order_sum`), so the reference has one
// order (moekit-gating `reference::row_sum`).
//
// Warp layout (the routing backward, and the forward when the groups do not match the team
// layout: `moekit_route_fwd_e*`, `moekit_route_bwd_e*`): one warp per token, lane l owning
// experts l, l + 32, ..., l + 32 (EPL - 1); EPL = 1, 2, 4, 8, 16 (E up to 32 ... 512).
//
// moekit-arch: portable
// moekit-sass: * forbid LDL STL
// Static proof of the "same bits" design: no hardware exp2/log2 approximation anywhere
// (IEEE division brings MUFU.RCP with its correction steps, which is fine).
// moekit-sass: * forbid MUFU.EX2 MUFU.LG2
// moekit-sass: moekit_route_fwd_e8 require SHFL
// moekit-sass: moekit_route_fwd_team_e256 require LDG.E.128
// moekit-sass: moekit_route_fwd_team_e256@sm_90a require VIMNMX
// The host sizes routing grids from the driver's occupancy; these are the floors it may assume.
// (Hopper's 228 KiB of shared memory per SM; sm_80's 164 KiB keep 4 blocks of the e256 kernel.)
// moekit-budget: moekit_route_fwd_team_e256@sm_90a threads=128 blocks_per_sm>=6
// moekit-budget: moekit_route_fwd_team_e256@sm_90 threads=128 blocks_per_sm>=6
// moekit-budget: moekit_route_fwd_team_e512@sm_90a threads=128 blocks_per_sm>=6
// moekit-budget: moekit_route_fwd_team_e256@sm_80 threads=128 blocks_per_sm>=4
// moekit-budget: moekit_route_fwd_team_e128 threads=128 blocks_per_sm>=8

#include "moekit/abi.h"
#include "moekit/convert.cuh"
#include "moekit/fmath.cuh"

namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kBlock = 32 * kWarps;
// The team-layout forward's block: 4 warps, so its two shared rows per team stay within the
// 48 KiB of static shared memory at E = 256 and 512 (32 KiB).
constexpr int kTeamWarps = 4;
constexpr int kTeamBlock = 32 * kTeamWarps;
constexpr unsigned kFull = 0xffffffffu;

// ---- ordering ------------------------------------------------------------------------------

// Order-preserving map of a selection score to u32: larger score -> larger key, -0 == +0,
// NaN -> 1 (below every number, -inf included), 0 reserved for "not a candidate".
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t b = __float_as_uint(v);
  const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
  b = b == 0x80000000u ? 0u : b;
  // Negative: all bits flipped; positive: the sign bit set (one shift and one LOP3).
  const uint32_t key = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  return nan ? 1u : key;
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

// ---- team layout -----------------------------------------------------------------------------

// Lanes per token (L) and experts per lane (C) of the team layout for `experts` experts: the
// host's `moekit_gating::team_layout` (and the reference's `row_sum`) spell the same rule.
__device__ __forceinline__ int team_lanes(int experts) { return experts > 256 ? 16 : 8; }
__device__ __forceinline__ int team_chunk(int experts) {
  const int per_lane = (experts + team_lanes(experts) - 1) / team_lanes(experts);
  int c = 1;
  while (c < per_lane) c <<= 1;
  return c;
}

// Max over the L lanes of a team (aligned groups of L lanes; every lane gets it). NaN ignored.
template <int L, typename T>
__device__ __forceinline__ T team_max(T v) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(kFull, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The team butterfly sum: partner L / 2 apart first, then halving (reference: butterfly_sum).
template <int L>
__device__ __forceinline__ float team_sum(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v = moekit::fm::add(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// The team-layout sum of one row of E values held in this warp's shared `row` (any lane
// layout wrote it): lanes r < L sum their chunk in order, then the team butterfly; every lane
// gets the total. Ends with a warp barrier, so the caller may overwrite `row` afterwards.
__device__ __forceinline__ float team_order_sum(const float* row, int experts, int lane) {
  __syncwarp();
  const int lanes = team_lanes(experts), chunk = team_chunk(experts);
  float part = 0.0f;
  if (lane < lanes) {
    for (int i = 0; i < chunk && lane * chunk + i < experts; ++i) part = moekit::fm::add(part, row[lane * chunk + i]);
  }
  for (int off = lanes / 2; off > 0; off >>= 1) part = moekit::fm::add(part, __shfl_xor_sync(kFull, part, off));
  const float total = __shfl_sync(kFull, part, 0);
  __syncwarp();
  return total;
}

// The float an order key came from (+0 for the key of -0; NaN for key 1). Exact: the group
// score of two selection scores is the same from their keys (a NaN stays NaN, and -0 + x and
// +0 + x have the same key).
__device__ __forceinline__ float from_order_key(uint32_t k) {
  if (k == 1u) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float load_logit(uint64_t base, int32_t dtype, uint64_t index) {
  if (dtype == MOEKIT_LOGITS_BF16) {
    return moekit::bf16_bits_to_f32(__ldg(reinterpret_cast<const uint16_t*>(base) + index));
  }
  return __ldg(reinterpret_cast<const float*>(base) + index);
}

// Scores of token t for this lane's experts (warp layout; 0 in slots past E). Softmax: max,
// then exp(u - max) summed in the team-layout order through the warp's shared `row` (routing:
// the reference's order), or per lane in slot order then by `warp_sum` when `row` is null
// (the balance loss, which is held to an f64 reference), then divided by the sum.
template <int EPL>
__device__ __forceinline__ void token_scores(uint64_t logits, int32_t dtype, int32_t score_func, int experts,
                                             uint64_t t, int lane, float (&s)[EPL], float* row = nullptr) {
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
      if (row != nullptr) row[lane + 32 * i] = s[i];
    }
  }
  const float total = row != nullptr ? team_order_sum(row, experts, lane) : warp_sum(part);
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
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, experts, t, lane, s, sel_smem[warp]);

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
    my_w = moekit::fm::canon(moekit::fm::mul(my_w, p.route_scale));
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

// ---- forward, team layout ----------------------------------------------------------------------

// This lane's C logits of row `row` (experts e0 .. e0 + C - 1; 0 past E), as f32. Whole chunks
// at a 16-byte-aligned address are read with 16-byte loads, anything else element by element.
template <int C>
__device__ __forceinline__ void load_chunk(uint64_t base, int32_t dtype, uint64_t row, int e0, int experts,
                                           float (&u)[C]) {
  const uint64_t first = row + static_cast<uint64_t>(e0);
  const bool whole = e0 + C <= experts;
  if (dtype == MOEKIT_LOGITS_BF16) {
    const uint64_t addr = base + 2 * first;
    if (C % 8 == 0 && whole && (addr & 15u) == 0) {
      const uint4* v = reinterpret_cast<const uint4*>(addr);
#pragma unroll
      for (int q = 0; q < C / 8; ++q) {
        const uint4 w = __ldg(&v[q]);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          u[8 * q + 2 * h] = __uint_as_float(words[h] << 16);
          u[8 * q + 2 * h + 1] = __uint_as_float(words[h] & 0xffff0000u);
        }
      }
      return;
    }
  } else {
    const uint64_t addr = base + 4 * first;
    if (C % 4 == 0 && whole && (addr & 15u) == 0) {
      const float4* v = reinterpret_cast<const float4*>(addr);
#pragma unroll
      for (int q = 0; q < C / 4; ++q) {
        const float4 w = __ldg(&v[q]);
        u[4 * q] = w.x, u[4 * q + 1] = w.y, u[4 * q + 2] = w.z, u[4 * q + 3] = w.w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < C; ++i) u[i] = e0 + i < experts ? load_logit(base, dtype, first + i) : 0.0f;
}

// Two-level top-k state of one lane: the maxima of its sub-chunks of kSub = min(C, 4) slots,
// in registers; the keys themselves in the team's shared row, so that a pop reloads only the
// sub-chunk it touched (one 16-byte shared load) instead of rescanning all C slots.
template <int C>
struct LaneBest {
  static constexpr int kSub = C < 4 ? C : 4;
  static constexpr int kSubs = C / kSub;
  uint32_t sub[kSubs];  // max key of each sub-chunk
  uint32_t bk;          // the lane's largest remaining key (0: none)
  int bi;               // the lowest slot holding it

  // The keys of sub-chunk q, read from the row (this lane's chunk starts at `row`).
  __device__ __forceinline__ static void load_sub(const uint32_t* row, int q, uint32_t (&k)[kSub]) {
    if (kSub == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + 4 * q);
      k[0] = v.x, k[kSub > 1 ? 1 : 0] = v.y, k[kSub > 2 ? 2 : 0] = v.z, k[kSub > 3 ? 3 : 0] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < kSub; ++j) k[j] = row[kSub * q + j];
    }
  }

  // bk and bi from the sub-chunk maxima (ties to the lowest slot).
  __device__ __forceinline__ void settle(const uint32_t* row) {
    bk = 0u;
#pragma unroll
    for (int q = 0; q < kSubs; ++q) bk = sub[q] > bk ? sub[q] : bk;
    int bq = 0;
#pragma unroll
    for (int q = kSubs - 1; q >= 0; --q) bq = sub[q] == bk ? q : bq;
    uint32_t k[kSub];
    load_sub(row, bq, k);
    int j = 0;
#pragma unroll
    for (int i = kSub - 1; i >= 0; --i) j = k[i] == bk ? i : j;
    bi = kSub * bq + j;
  }

  // Drops slot bi (the lane's winner) and finds the next best.
  __device__ __forceinline__ void pop(uint32_t* row) {
    row[bi] = 0u;
    const int q = bi / kSub;
    uint32_t k[kSub];
    load_sub(row, q, k);
    uint32_t m = 0u;
#pragma unroll
    for (int j = 0; j < kSub; ++j) m = k[j] > m ? k[j] : m;
#pragma unroll
    for (int g = 0; g < kSubs; ++g) sub[g] = g == q ? m : sub[g];
    settle(row);
  }
};

// Routes 32 / L tokens per warp at a time (see "Team layout" at the top). Grouped routing
// needs group size == C (one group per lane); the host sends other group sizes to the warp
// layout's `route_forward`.
template <int C, int L>
__device__ __forceinline__ void route_forward_team(const MoekitRouteParams& p) {
  constexpr int kTeams = 32 / L;
  constexpr int kMaxExperts = C * L;
  constexpr int kWarps = kTeamWarps;
  constexpr int kBlock = kTeamBlock;
  // Each token's scores (for the weights of the winners) and selection keys (for the top-k
  // rounds), one row of each per team.
  __shared__ __align__(16) float s_smem[kWarps][kTeams][kMaxExperts];
  __shared__ __align__(16) uint32_t k_smem[kWarps][kTeams][kMaxExperts];
  __shared__ int count_smem[kMaxExperts];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int team = lane / L;
  const int r = lane % L;
  const int e0 = r * C;
  const int experts = p.experts;
  const int k = p.top_k;
  const bool grouped = p.n_groups > 1;
  const bool has_bias = p.bias != 0;
  const float* bias = reinterpret_cast<const float*>(p.bias);
  int* counts = reinterpret_cast<int*>(p.counts);
  float* s_row = s_smem[warp][team];
  uint32_t* k_row = k_smem[warp][team] + e0;  // this lane's chunk of the key row

  if (counts != nullptr) {
    for (int e = threadIdx.x; e < experts; e += kBlock) count_smem[e] = 0;
    __syncthreads();
  }

  const uint64_t step = static_cast<uint64_t>(gridDim.x) * kWarps * kTeams;
  for (uint64_t t0 = (static_cast<uint64_t>(blockIdx.x) * kWarps + warp) * kTeams; t0 < p.tokens; t0 += step) {
    const uint64_t t = t0 + team;
    const bool active = t < p.tokens;  // team-uniform; every lane still takes part in the shuffles
    float s[C];
    load_chunk<C>(p.logits, p.logits_dtype, active ? t * static_cast<uint64_t>(experts) : 0, e0, experts, s);
    // Every slot is computed (slots past E hold logit 0 and are masked afterwards): no branch.
    if (p.score_func == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
      for (int i = 0; i < C; ++i) s[i] = moekit::fm::sigmoid(s[i]);
    } else {
      float m = -__uint_as_float(0x7f800000u);
#pragma unroll
      for (int i = 0; i < C; ++i) m = e0 + i < experts && s[i] > m ? s[i] : m;
      m = team_max<L>(m);
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        s[i] = moekit::fm::exp(moekit::fm::sub(s[i], m));
        part = moekit::fm::add(part, e0 + i < experts ? s[i] : 0.0f);  // + 0 leaves a sum >= +0 exact
      }
      const float total = team_sum<L>(part);
#pragma unroll
      for (int i = 0; i < C; ++i) s[i] = moekit::fm::div(s[i], total);
    }

    // Selection keys (the bias moves the choice, never the weights); scores to this team's row.
    // A whole chunk takes 16-byte bias loads and shared stores (the row is 16-byte aligned and
    // e0 is a multiple of C); a partial one goes element by element.
    uint32_t key[C];
    if (C % 4 == 0 && e0 + C <= experts && (!has_bias || (p.bias & 15u) == 0)) {
#pragma unroll
      for (int q = 0; q < C / 4; ++q) {
        float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (has_bias) b = __ldg(reinterpret_cast<const float4*>(bias + e0) + q);
        const float bq[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const int i = 4 * q + h;
          key[i] = order_key(has_bias ? moekit::fm::add(s[i], bq[h]) : s[i]);
        }
        *reinterpret_cast<float4*>(&s_row[e0 + 4 * q]) = make_float4(s[4 * q], s[4 * q + 1], s[4 * q + 2], s[4 * q + 3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int e = e0 + i;
        const float sel = has_bias && e < experts ? moekit::fm::add(s[i], __ldg(&bias[e])) : s[i];
        key[i] = e < experts ? order_key(sel) : 0u;
        if (e < experts) s_row[e] = s[i];
      }
    }
    __syncwarp();

    // The keys to this lane's chunk of the key row (slots past E hold 0), and the sub-chunk
    // maxima; only this lane reads its chunk, so no barrier is needed for it.
    LaneBest<C> best;
#pragma unroll
    for (int q = 0; q < LaneBest<C>::kSubs; ++q) {
      constexpr int S = LaneBest<C>::kSub;
      uint32_t m = 0u;
#pragma unroll
      for (int j = 0; j < S; ++j) m = key[S * q + j] > m ? key[S * q + j] : m;
      best.sub[q] = m;
      if (S == 4) {
        *reinterpret_cast<uint4*>(k_row + 4 * q) =
            make_uint4(key[4 * q], key[4 * q + (S > 1)], key[4 * q + 2 * (S > 2)], key[4 * q + 3 * (S > 3)]);
      } else {
#pragma unroll
        for (int j = 0; j < S; ++j) k_row[S * q + j] = key[S * q + j];
      }
    }
    best.settle(k_row);
    if (grouped) {
      // This lane's group: its top two keys as a multiset (integer max/min), then its score.
      uint32_t k1 = 0u, k2 = 0u;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const uint32_t lo = key[i] < k1 ? key[i] : k1;
        k2 = lo > k2 ? lo : k2;
        k1 = key[i] > k1 ? key[i] : k1;
      }
      const float v1 = from_order_key(k1);
      const uint32_t gk = r < p.n_groups
                              ? order_key(has_bias && C >= 2 ? moekit::fm::add(v1, from_order_key(k2)) : v1)
                              : 0u;
      // Keep the topk_groups best groups of the team (ties to the lower group).
      const uint64_t mine = rank_key(gk, r);
      int better = 0;
#pragma unroll
      for (int h = 0; h < L; ++h) better += rank_key(__shfl_sync(kFull, gk, team * L + h), h) > mine;
      if (better >= p.topk_groups) best.bk = 0u;  // a dropped group never wins, so never pops
    }

    // Top-k: k rounds of a team max over each lane's best remaining candidate; the owner of
    // the winner drops it and finds its next best (one sub-chunk reloaded, see LaneBest).
    float sum = 0.0f;
    int id_lo = -1, id_hi = -1;
    float w_lo = 0.0f, w_hi = 0.0f;
    for (int j = 0; j < k; ++j) {
      const uint64_t win = team_max<L>(rank_key(best.bk, e0 + best.bi));
      const bool valid = win != 0ull;
      const int e = static_cast<int>(~static_cast<uint32_t>(win));
      const float w = valid ? s_row[e] : 0.0f;
      if (valid && e >= e0 && e < e0 + C) best.pop(k_row);
      sum = moekit::fm::add(sum, w);
      if (j % L == r) {
        if (j < L) {
          id_lo = valid ? e : -1, w_lo = w;
        } else {
          id_hi = valid ? e : -1, w_hi = w;
        }
      }
    }
    const bool renorm = p.renormalize && sum > 0.0f;
    if (active) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int slot = r + half * L;
        if (slot >= k) continue;
        const int id = half == 0 ? id_lo : id_hi;
        float w = half == 0 ? w_lo : w_hi;
        if (renorm) w = moekit::fm::div(w, sum);
        w = moekit::fm::canon(moekit::fm::mul(w, p.route_scale));
        const uint64_t o = t * static_cast<uint64_t>(k) + slot;
        reinterpret_cast<int*>(p.topk_ids)[o] = id;
        reinterpret_cast<float*>(p.topk_weights)[o] = w;
        if (counts != nullptr && id >= 0) atomicAdd(&count_smem[id], 1);
      }
    }
    __syncwarp();  // the next tokens reuse this team's row
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
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, experts, t, lane, s, s_smem[warp]);
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
      grad_u[t * static_cast<uint64_t>(experts) + e] = moekit::fm::canon(du);
    }
    __syncwarp();
  }
}

// ---- replay ----------------------------------------------------------------------------------

// Router replay: the weights of given ids (recorded while sampling) instead of choosing them,
// with the forward's arithmetic (scores in the team-layout sum order, the sum over the k
// slots in slot order, then divide, scale, canonical NaN), so the forward's own ids give its
// weights bit for bit (reference: `route_replay` / `weights_for_ids`). Ids outside [0, E) get
// weight 0 and are not counted; `counts` (if given) is added to.
template <int EPL>
__device__ __forceinline__ void route_replay(const MoekitRouteParams& p) {
  constexpr int kMaxExperts = 32 * EPL;
  __shared__ float s_smem[kWarps][kMaxExperts];
  __shared__ int count_smem[kMaxExperts];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int experts = p.experts;
  const int k = p.top_k;
  const int* ids = reinterpret_cast<const int*>(p.topk_ids);
  int* counts = reinterpret_cast<int*>(p.counts);

  if (counts != nullptr) {
    for (int e = threadIdx.x; e < experts; e += kBlock) count_smem[e] = 0;
    __syncthreads();
  }
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kWarps;
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * kWarps + warp; t < p.tokens; t += stride) {
    float s[EPL];
    token_scores<EPL>(p.logits, p.logits_dtype, p.score_func, experts, t, lane, s, s_smem[warp]);
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      if (lane + 32 * i < experts) s_smem[warp][lane + 32 * i] = s[i];
    }
    __syncwarp();
    const uint64_t row = t * static_cast<uint64_t>(k);
    // Every lane sums the k slots in slot order (k <= 32: cheaper than a shuffle chain).
    float total = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int id = __ldg(&ids[row + j]);
      total = moekit::fm::add(total, id >= 0 && id < experts ? s_smem[warp][id] : 0.0f);
    }
    if (lane < k) {
      const int id = __ldg(&ids[row + lane]);
      const bool valid = id >= 0 && id < experts;
      float w = valid ? s_smem[warp][id] : 0.0f;
      if (p.renormalize && total > 0.0f) w = moekit::fm::div(w, total);
      reinterpret_cast<float*>(p.topk_weights)[row + lane] = moekit::fm::canon(moekit::fm::mul(w, p.route_scale));
      if (counts != nullptr && valid) atomicAdd(&count_smem[id], 1);
    }
    __syncwarp();  // the next token reuses this warp's shared row
  }
  if (counts != nullptr) {
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += kBlock) {
      if (count_smem[e] != 0) atomicAdd(&counts[e], count_smem[e]);
    }
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
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_replay_e1(const MoekitRouteParams p) { route_replay<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e1(const MoekitBalanceLossParams p) { balance_loss_forward<1>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e1(const MoekitBalanceLossParams p) { balance_loss_backward<1>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e2(const MoekitRouteParams p) { route_forward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e2(const MoekitRouteParams p) { route_backward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_replay_e2(const MoekitRouteParams p) { route_replay<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e2(const MoekitBalanceLossParams p) { balance_loss_forward<2>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e2(const MoekitBalanceLossParams p) { balance_loss_backward<2>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e4(const MoekitRouteParams p) { route_forward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e4(const MoekitRouteParams p) { route_backward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_replay_e4(const MoekitRouteParams p) { route_replay<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e4(const MoekitBalanceLossParams p) { balance_loss_forward<4>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e4(const MoekitBalanceLossParams p) { balance_loss_backward<4>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e8(const MoekitRouteParams p) { route_forward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e8(const MoekitRouteParams p) { route_backward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_replay_e8(const MoekitRouteParams p) { route_replay<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e8(const MoekitBalanceLossParams p) { balance_loss_forward<8>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e8(const MoekitBalanceLossParams p) { balance_loss_backward<8>(p); }

extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_fwd_e16(const MoekitRouteParams p) { route_forward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_bwd_e16(const MoekitRouteParams p) { route_backward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_route_replay_e16(const MoekitRouteParams p) { route_replay<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_fwd_e16(const MoekitBalanceLossParams p) { balance_loss_forward<16>(p); }
extern "C" __global__ void __launch_bounds__(kBlock, 2) moekit_balance_bwd_e16(const MoekitBalanceLossParams p) { balance_loss_backward<16>(p); }

// Team-layout forward: e{C L} routes up to C L experts (written out: moekit-build finds entry
// points by reading the source). The second launch bound is the occupancy its register budget
// keeps: 3 x 8 warps for C = 32, each warp with 4 tokens' loads in flight (96 KiB per SM, three
// times what 4.3 TB/s at ~1 us latency needs).
extern "C" __global__ void __launch_bounds__(kTeamBlock, 8) moekit_route_fwd_team_e8(const MoekitRouteParams p) { route_forward_team<1, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 8) moekit_route_fwd_team_e16(const MoekitRouteParams p) { route_forward_team<2, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 8) moekit_route_fwd_team_e32(const MoekitRouteParams p) { route_forward_team<4, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 8) moekit_route_fwd_team_e64(const MoekitRouteParams p) { route_forward_team<8, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 8) moekit_route_fwd_team_e128(const MoekitRouteParams p) { route_forward_team<16, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 6) moekit_route_fwd_team_e256(const MoekitRouteParams p) { route_forward_team<32, 8>(p); }
extern "C" __global__ void __launch_bounds__(kTeamBlock, 6) moekit_route_fwd_team_e512(const MoekitRouteParams p) { route_forward_team<32, 16>(p); }

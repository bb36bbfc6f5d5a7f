// Hopper grouped GEMM, version 2 (sm_90a): m-grouped contiguous and masked (dense = one masked
// group), BF16 and FP8 E4M3 with 1x128 / 128x128 scales promoted to f32 every 128 of K (BF16
// also with 128 x 256 tiles: moekit_gemm_sm90_bf16_n256, a 3-stage ring); and
// the BF16 activation gradient (dgrad: dX [M, K] = dY [M, N] . W[m_indices] [N, K], the
// forward weights read along N as an MN-major B: two 64-column TMA boxes per stage and
// wgmma with imm-trans-b 1; the contiguous schedule and epilogue with K output columns);
// and the k-grouped weight gradient (dW[g] [N, K] f32 over each group's tokens; BF16 with both
// operands MN-major along the tokens, FP8 K-major with rank-1 scales: gemm_sm90_kgrouped below).
//
// Block = 3 warpgroups: warpgroup 0 produces (one thread issues TMA loads of 128 x 128-byte
// tiles of A and B, 128-byte swizzled, into a 5-stage ring, 6 for k-grouped; completion on
// "full" mbarriers),
// warpgroups 1 and 2 consume (each a 64 x 128 half of the 128 x 128 output tile with
// wgmma.m64n128, accumulators in registers), then release the stage on its "empty" mbarrier
// (one arrival per consumer warp).
// Registers move from the producer (40; FP8: 56, its warp also stages the scales) to the
// consumers (232; FP8: 224) with setmaxnreg. Tiles are scheduled persistently (bands of 16
// column tiles; masked: live row tiles only); a contiguous tile runs one pass per run of
// equal group ids among its 128 rows (one per group in the contiguous layout; found by one
// warp with shuffles and ballots, moekit::gemm::group_runs_warp), and a consumer half with
// no row of the pass's run skips its wgmmas and stores (it still releases every stage), so
// padding rows cost no MMA unless they share a 64-row half with real rows. The epilogue
// converts to BF16; a half whose 64 rows all belong to the pass's run stages them in its own
// shared buffer (128-byte swizzle) and stores two 64 x 64 boxes by TMA, any other half stores
// its run's rows from registers.
//
// NOT YET RUN ON A GPU: verified by compilation, SASS inspection and the host emulation of
// TMA, mbarrier and wgmma (moekit/emu/sm90.h; see NOTES.md). The dispatcher picks it only
// with MOEKIT_GEMM_SM90=1 until the GPU tests pass.
//
// moekit-arch: hopper
// moekit-sass: * forbid LDL STL
// moekit-sass: moekit_gemm_sm90_bf16 require HGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_fp8 require QGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_bf16_dgrad require HGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_bf16_n256 require HGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_bf16_kgrouped require HGMMA UTMALDG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_fp8_kgrouped require QGMMA UTMALDG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_mc2_bf16 require HGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// moekit-sass: moekit_gemm_sm90_mc2_fp8 require QGMMA UTMALDG UTMASTG SYNCS USETMAXREG
// Budgets: 384 threads at one block per SM leave 168 registers before setmaxnreg (and
// setmaxnreg needs exactly that: 128 x 40 + 256 x 232 = 384 x 168); static shared memory is
// the three warpgroups' run lists (3 x 128 x (group, span) ints + counts: 3084 B; a cluster's
// producer also keeps its peer's list: 4224 B).
// moekit-budget: * regs<=168
// moekit-budget: moekit_gemm_sm90_b* smem<=3200
// moekit-budget: moekit_gemm_sm90_f* smem<=3200
// moekit-budget: moekit_gemm_sm90_mc2_* smem<=4300

#include "moekit/abi.h"
#include "moekit/gemm/scheduler.cuh"
#include "moekit/portable.cuh"
#include "moekit/sm90/ptx_sm90.cuh"

#include <cuda_bf16.h>

namespace {

constexpr int kBM = 128;           // output rows per tile (two consumer warpgroups of 64)
constexpr int kBN = 128;           // output columns per tile
constexpr int kTileBytes = 16384;  // 128 rows x 128 bytes (BF16: 64 of K; FP8: 128 of K)
constexpr int kStages = 6;    // k-grouped ring
constexpr int kStagesMg = 5;  // m-grouped and dgrad ring (their output buffers take the sixth)
constexpr int kThreads = 384;
constexpr int kConsumerWarps = 8;  // two consumer warpgroups
// FP8 scales of a stage, written by the producer warp: 128 token scales (the tile's rows, 0
// past the valid rows) and the weight block's scale, padded to 8-byte multiples.
constexpr int kScaleSlot = 132;  // floats
// Dynamic shared memory: stages of (A tile, B tile), the two output buffers, the stages'
// scale slots, then the barriers; +1024 for alignment.
// kN: the tile's columns, 128, or 256 for the wide BF16 forward kernel (3 stages of 48 KiB,
// 32 KiB output buffers).
template <int kN>
__host__ __device__ constexpr int ring_stages() {
  return kN == 256 ? 3 : kStagesMg;
}
template <int kN>
__host__ __device__ constexpr int stage_bytes() {
  return kTileBytes + kN * 128;  // A: 128 rows x 128 bytes; B: kN rows x 128 bytes
}
template <int kN>
__host__ __device__ constexpr int out_bytes() {
  return 64 * kN * 2;  // per consumer warpgroup: 64 rows x kN BF16 columns
}
template <int kN>
__host__ __device__ constexpr int smem_bytes() {
  return ring_stages<kN>() * stage_bytes<kN>() + 2 * out_bytes<kN>() + ring_stages<kN>() * kScaleSlot * 4 + 1024 +
         2 * ring_stages<kN>() * 8;
}
static_assert(smem_bytes<128>() == 200352, "keep sm90::SMEM_BYTES in step");
static_assert(smem_bytes<256>() == 215648, "keep sm90::SMEM_BYTES_N256 in step");
// Within the 227 KiB a block may use, with the static run lists (3200 B).
static_assert(smem_bytes<128>() + 4300 <= 232448 && smem_bytes<256>() + 3200 <= 232448, "shared memory per block");

// Tile order: within a group, bands of kRasterCols column tiles, row-major inside a band, so
// the tiles in flight at once (one per SM) share a few A row blocks and at most kRasterCols
// B column blocks (an L2-sized working set; row-major over all columns streams all of B
// between two uses of an A block). Masked: only the live row tiles of each group
// (ceil(masked_m / 128)) are enumerated, groups one after the other.
constexpr int kRasterCols = 16;

// Output columns: N, or K for dgrad (whose reduction runs over N). Read from the parameters
// where used (a register held across the K loop makes the FP8 consumers spill).
template <bool kDgrad>
__device__ __forceinline__ int cols_of(const MoekitGemmParams& p) {
  return kDgrad ? p.k : p.n;
}

// Rows of group g that count: masked_m[g] clamped to [0, m] (m without masked_m).
__device__ __forceinline__ int masked_rows(const MoekitGemmParams& p, int g) {
  if (p.masked_m == 0) return p.m;
  const int v = reinterpret_cast<const int*>(p.masked_m)[g];
  return v < 0 ? 0 : (v > p.m ? p.m : v);
}

struct Schedule {
  int tiles_r, tiles_c;  // contiguous: row tiles of m; masked: of the cursor's group
  int64_t total;
  // Masked: the cursor (tiles are visited in increasing order by each role): group g_cur,
  // its first tile g_base and its live rows g_valid.
  int g_cur, g_valid;
  int64_t g_base;
};

// kRows: rows per scheduled tile, kBM; or 2 kBM for a 2-CTA cluster, whose ranks take its two
// 128-row halves (the same columns, so the same weight tile).
template <int kN, bool kDgrad, int kRows = kBM>
__device__ __forceinline__ Schedule schedule(const MoekitGemmParams& p) {
  Schedule s;
  s.tiles_c = (cols_of<kDgrad>(p) + kN - 1) / kN;
  s.g_cur = 0;
  s.g_base = 0;
  s.g_valid = p.m;
  s.tiles_r = (p.m + kRows - 1) / kRows;
  s.total = static_cast<int64_t>(s.tiles_r) * s.tiles_c;
  if (p.op == MOEKIT_GEMM_MASKED) {
    int64_t live = 0;  // live row tiles over all groups
    for (int g = 0; g < p.groups; ++g) live += (masked_rows(p, g) + kRows - 1) / kRows;
    s.total = live * s.tiles_c;
    s.g_valid = p.groups > 0 ? masked_rows(p, 0) : 0;
    s.tiles_r = (s.g_valid + kRows - 1) / kRows;
  }
  return s;
}

// The tile's position and, for masked tiles, its group and valid rows. Contiguous tiles get
// their passes from moekit::gemm::group_runs_warp.
struct TileInfo {
  int row0, col0;
  int g;      // masked: the group
  int valid;  // masked: rows of the group that count (clamped masked_m); contiguous: m
};

// `tile` must not decrease between calls on the same `s` (the masked cursor moves forward).
template <int kN = kBN, int kRows = kBM>
__device__ __forceinline__ TileInfo tile_info(const MoekitGemmParams& p, Schedule& s, int64_t tile) {
  TileInfo ti;
  ti.g = 0;
  ti.valid = p.m;
  int64_t rem = tile;
  if (p.op == MOEKIT_GEMM_MASKED) {
    while (tile >= s.g_base + static_cast<int64_t>(s.tiles_r) * s.tiles_c) {  // tile < total: ends
      s.g_base += static_cast<int64_t>(s.tiles_r) * s.tiles_c;
      s.g_valid = masked_rows(p, ++s.g_cur);
      s.tiles_r = (s.g_valid + kRows - 1) / kRows;
    }
    ti.g = s.g_cur;
    ti.valid = s.g_valid;
    rem = tile - s.g_base;
  }
  const int64_t band_tiles = static_cast<int64_t>(s.tiles_r) * kRasterCols;  // tiles of a full band
  const int band = static_cast<int>(rem / band_tiles);
  const int within = static_cast<int>(rem % band_tiles);
  const int width = s.tiles_c - band * kRasterCols < kRasterCols ? s.tiles_c - band * kRasterCols : kRasterCols;
  ti.row0 = (within / width) * kRows;
  ti.col0 = (band * kRasterCols + within % width) * kN;
  return ti;
}

// A masked tile's one pass as a run: rows [0, min(valid - row0, kBM) - 1] of group g.
__device__ __forceinline__ int masked_span(const TileInfo& ti) {
  const int rows = ti.valid - ti.row0 < kBM ? ti.valid - ti.row0 : kBM;
  return (rows - 1) << 8;
}

// Named barrier over one consumer warpgroup (ids 1 and 2; 0 is __syncthreads). Immediate ids,
// so that ptxas reserves only the barriers used.
__device__ __forceinline__ void warpgroup_sync(int wg) {
  if (wg == 1) {
    moekit::sm90::named_barrier_sync<1, 128>();
  } else {
    moekit::sm90::named_barrier_sync<2, 128>();
  }
}

// Thread 0 initialises the ring's barriers ("full": one arrival plus the TMA bytes; "empty":
// one arrival per consumer warp of each CTA of the cluster) and prefetches both tensor maps;
// then the block's last block-wide barrier (the roles never meet again), a cluster barrier in
// a cluster (a peer's barriers are initialised before anyone arrives on them or multicasts).
template <int kRing, int kCluster = 1>
__device__ __forceinline__ void ring_init(const MoekitGemmSm90Params& P, uint64_t* full, uint64_t* empty) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < kRing; ++i) {
      moekit::sm90::mbar_init(&full[i], 1);
      moekit::sm90::mbar_init(&empty[i], kConsumerWarps * kCluster);
    }
    moekit::sm90::fence_barrier_init();
    moekit::sm90::prefetch_tmap(&P.tmap_a);
    moekit::sm90::prefetch_tmap(&P.tmap_b);
  }
  if constexpr (kCluster > 1) {
    moekit::sm90::cluster_sync();
  } else {
    __syncthreads();
  }
}

// A consumer warp's release of a stage it has finished reading (`pred`: it releases at all):
// one elected lane's arrival on `empty`; in a 2-CTA cluster also lane 1's on the peer's
// (`rank`: this CTA's), relaxed (predicated instructions, no branch).
template <int kCluster>
__device__ __forceinline__ void release_stage(uint64_t* empty, int lane, int rank, bool elected, bool pred) {
  if constexpr (kCluster > 1) {
    moekit::sm90::mbar_arrive_if(empty, pred & (lane == 0));
    moekit::sm90::mbar_arrive_peer_if(empty, static_cast<uint32_t>(1 - rank), pred & (lane == 1));
  } else {
    moekit::sm90::mbar_arrive_if(empty, pred & elected);
  }
}

// kDgrad (BF16 only): B is W [G, N, K] read along N (MN-major), the reduction is N and the
// output has K columns; otherwise the forward (reduction K, N output columns).
// kN: tile columns, 128 or 256 (BF16 forward only: 128 accumulators per thread).
// kCluster 2: a 2-CTA cluster takes 256-row tiles, rank r their rows 128 r .. (see
// moekit_gemm_sm90_mc2_bf16 below); both ranks walk the same stages in lockstep.
template <bool kFp8, bool kDgrad = false, int kN = kBN, int kCluster = 1>
__device__ __forceinline__ void gemm_sm90(const MoekitGemmSm90Params& P) {
  static_assert(!(kFp8 && kDgrad), "FP8 wgmma takes K-major operands only: FP8 dgrad stays portable");
  static_assert(kN == 128 || (kN == 256 && !kFp8 && !kDgrad), "BLOCK_N 256: the BF16 forward only");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  constexpr int kRows = kBM * kCluster;  // rows per scheduled tile
  const MoekitGemmParams& p = P.gemm;
  MOEKIT_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  constexpr int kRing = ring_stages<kN>();
  constexpr int kStage = stage_bytes<kN>();
  constexpr int kOut = out_bytes<kN>();
  unsigned char* tiles = smem;
  unsigned char* out_bufs = smem + kRing * kStage;  // 1024-aligned: 128-byte swizzle atoms
  float* scales = reinterpret_cast<float*>(out_bufs + 2 * kOut);  // kRing slots
  uint64_t* full = reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(scales) + kRing * kScaleSlot * 4);
  uint64_t* empty = full + kRing;
  // One run list per warpgroup (a cluster's producer also keeps its peer's, list 3): group,
  // first | last row << 8 (relative to the tile), and the run counts (a cluster's consumers
  // also keep the peer's count).
  __shared__ int tile_groups[kCluster > 1 ? 4 : 3][kBM];
  __shared__ int tile_spans[kCluster > 1 ? 4 : 3][kBM];
  __shared__ int tile_runs[3];
  __shared__ int peer_runs[3];

  // Register split (128 P + 256 C = 384 x 168): FP8's producer warp also loads the scales.
  constexpr int kProducerRegs = kFp8 ? 56 : 40, kConsumerRegs = kFp8 ? 224 : 232;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs == 384 * 168, "setmaxnreg pool");
  const int wg = threadIdx.x / 128;
  const int t = threadIdx.x % 128;
  const bool masked = p.op == MOEKIT_GEMM_MASKED;
  const int k_block = kFp8 ? 128 : 64;  // K per stage (128 bytes per row)
  const int k_steps = ((kDgrad ? p.n : p.k) + k_block - 1) / k_block;

  ring_init<kRing, kCluster>(P, full, empty);
  // This CTA's rank and its rows within a scheduled tile.
  const int rank = kCluster > 1 ? static_cast<int>(moekit::sm90::cluster_ctarank()) : 0;

  uint32_t stage = 0, phase = 0;  // ring position, the same sequence in every role (and CTA)
  auto advance = [&]() {
    if (++stage == kRing) stage = 0, phase ^= 1;
  };

  if (wg == 0) {
    // Producer: 40 registers; warp 0 finds a contiguous tile's runs, its lane 0 streams the K
    // steps of A and B through the ring.
    moekit::sm90::regs_dec<kProducerRegs>();
    if (t >= 32) return;
    Schedule s = schedule<kN, kDgrad, kRows>(p);  // per thread, after setmaxnreg (nothing live across it)
    for (int64_t tile = blockIdx.x / kCluster; tile < s.total; tile += gridDim.x / kCluster) {
      TileInfo ti = tile_info<kN, kRows>(p, s, tile);
      ti.row0 += kBM * rank;
      const int* m_indices = reinterpret_cast<const int*>(p.m_indices);
      const int own = masked ? (ti.row0 < ti.valid ? 1 : 0)
                             : moekit::gemm::group_runs_warp<kBM / 32>(m_indices, ti.row0, p.m, p.groups, t,
                                                                       tile_groups[0], tile_spans[0]);
      // A cluster walks max(own, peer) passes in both CTAs (the stages stay in lockstep); a
      // pass of the peer's only is an empty stage here. The peer's run list says which passes
      // share their group (then rank 0 multicasts the weight tile to both).
      int passes = own, peer = 0;
      if constexpr (kCluster > 1) {
        const int peer_row0 = ti.row0 + kBM * (1 - 2 * rank);
        peer = masked ? (peer_row0 < ti.valid ? 1 : 0)
                      : moekit::gemm::group_runs_warp<kBM / 32>(m_indices, peer_row0, p.m, p.groups, t, tile_groups[3],
                                                                tile_spans[3]);
        passes = own > peer ? own : peer;
      }
      // BF16: lane 0 alone. FP8: the warp also writes each stage's scales (lane l: rows 4l..).
      if (!kFp8 && t != 0) continue;
      for (int pass = 0; pass < passes; ++pass) {
        const bool mine = pass < own;
        const int g = masked ? ti.g : (mine ? tile_groups[0][pass] : 0);
        // Multicast: both CTAs have this pass, for the same group (the same weight tile).
        const bool shared_b = kCluster > 1 && mine && pass < peer && (masked || tile_groups[3][pass] == g);
        for (int ks = 0; ks < k_steps; ++ks) {
          if (t == 0) moekit::sm90::mbar_wait(&empty[stage], phase ^ 1);
          if (!mine) {  // the peer's pass: an empty stage (no bytes), consumed and released here
            if (t == 0) moekit::sm90::mbar_arrive(&full[stage]);
            advance();
            continue;
          }
          if constexpr (kFp8) {
            // Plain loads and st.shared, published by lane 0's mbarrier.arrive below: arrive
            // has release and try_wait acquire semantics (CTA scope), so a consumer whose wait
            // sees the phase complete sees the slot; __syncwarp orders the other lanes'
            // stores before lane 0's arrive (and after its wait: the consumers read the slot
            // before their empty arrivals). (Not TMA: the row-major token scales have no box
            // along rows - innermost box extent 1 x 4 B < 16 B - and MN-major ones need a
            // 16-byte aligned stride the API does not require.)
            __syncwarp();
            float* slot = scales + stage * kScaleSlot;
            // Lane t's rows r0 .. r0 + 3: one base pointer and stride (few registers: the
            // producer has 40).
            const int r0 = ti.row0 + (kBM / 32) * t;
            const int64_t grow0 = masked ? static_cast<int64_t>(g) * p.m + r0 : r0;
            const bool mn = p.a_scale_layout == MOEKIT_SCALES_MN_MAJOR;
            const float* src = reinterpret_cast<const float*>(p.a_scales) +
                               (mn ? static_cast<int64_t>(ks) * p.a_scale_stride + grow0 : grow0 * (p.k / 128) + ks);
            const int step = mn ? 1 : p.k / 128;
            const int rows = (masked ? ti.valid : p.m) - r0;  // valid rows from r0 on
#pragma unroll
            for (int j = 0; j < kBM / 32; ++j) slot[(kBM / 32) * t + j] = j < rows ? src[j * step] : 0.0f;
            if (t == 0) {
              const float* bs = reinterpret_cast<const float*>(p.b_scales);
              slot[kBM] = bs[(static_cast<int64_t>(g) * (p.n / 128) + ti.col0 / 128) * (p.k / 128) + ks];
            }
            __syncwarp();
            if (t != 0) {
              advance();
              continue;
            }
          }
          moekit::sm90::mbar_arrive_expect_tx(&full[stage], kStage);
          unsigned char* a_dst = tiles + stage * kStage;
          const int kc = ks * k_block;
          if (masked) {
            moekit::sm90::tma_load_3d(a_dst, &P.tmap_a, &full[stage], kc, ti.row0, g);
          } else {
            moekit::sm90::tma_load_2d(a_dst, &P.tmap_a, &full[stage], kc, ti.row0);
          }
          if (shared_b) {
            // The weight tile both CTAs need: rank 0 multicasts it into both (each counts the
            // full tile on its own barrier); the stage is free in both, since this CTA's empty
            // barrier counts the peer's consumer warps too.
            if (rank == 0) {
              moekit::sm90::tma_load_3d_multicast(a_dst + kTileBytes, &P.tmap_b, &full[stage], kc, ti.col0, g, 3);
            }
          } else if constexpr (kDgrad) {
            // W[g] rows kc .. kc + 63 (N), columns col0 .. col0 + 127 (K) as two 64-column boxes.
            moekit::sm90::tma_load_3d(a_dst + kTileBytes, &P.tmap_b, &full[stage], ti.col0, kc, g);
            moekit::sm90::tma_load_3d(a_dst + kTileBytes + kTileBytes / 2, &P.tmap_b, &full[stage], ti.col0 + 64, kc, g);
          } else {
            moekit::sm90::tma_load_3d(a_dst + kTileBytes, &P.tmap_b, &full[stage], kc, ti.col0, g);
          }
          advance();
        }
      }
    }
    return;
  }

  // Consumers: 232 registers; warpgroup `wg` computes rows 64 (wg - 1) .. of each tile.
  moekit::sm90::regs_inc<kConsumerRegs>();
  Schedule s = schedule<kN, kDgrad, kRows>(p);  // per thread: the masked cursor moves
  const int half = wg - 1;
  const int warp = t / 32, lane = t % 32;
  const int* m_indices = reinterpret_cast<const int*>(p.m_indices);
  for (int64_t tile = blockIdx.x / kCluster; tile < s.total; tile += gridDim.x / kCluster) {
    TileInfo ti = tile_info<kN, kRows>(p, s, tile);
    ti.row0 += kBM * rank;
    const int row0 = ti.row0, col0 = ti.col0, valid = ti.valid;
    const int peer_row0 = row0 + kBM * (1 - 2 * rank);  // a cluster's other CTA
    int own, passes;
    if (masked) {
      own = row0 < valid ? 1 : 0;
      passes = kCluster > 1 && peer_row0 < valid ? 1 : own;
    } else {
      // Warp 0 finds the runs (a few loads, shuffles and ballots), the warpgroup waits once.
      if (warp == 0) {
        const int runs = moekit::gemm::group_runs_warp<kBM / 32>(m_indices, row0, p.m, p.groups, lane, tile_groups[wg],
                                                                 tile_spans[wg]);
        if (lane == 0) tile_runs[wg] = runs;
        if constexpr (kCluster > 1) {
          const int peer = moekit::gemm::group_run_count_warp<kBM / 32>(m_indices, peer_row0, p.m, p.groups, lane);
          if (lane == 0) peer_runs[wg] = peer;
        }
      }
      warpgroup_sync(wg);
      own = tile_runs[wg];
      passes = kCluster > 1 && peer_runs[wg] > own ? peer_runs[wg] : own;
    }
    for (int pass = 0; pass < passes; ++pass) {
      const bool mine = pass < own;  // else a pass of the cluster peer's only: empty stages
      const int g = masked ? ti.g : (mine ? tile_groups[wg][pass] : 0);
      const int span = masked ? masked_span(ti) : (mine ? tile_spans[wg][pass] : 0);
      const int lo = span & 0xff, hi = span >> 8;  // the run's rows, relative to row0
      // A half with no row of the run skips its wgmmas and its stores, but still waits on
      // and releases every stage (the empty barriers count both halves).
      const bool live = mine && lo < 64 * half + 64 && hi >= 64 * half;
      float acc[kN / 2];
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) acc[i] = 0.0f;
      float part[kFp8 ? 64 : 1];
      uint32_t prev = 0;  // BF16: the stage whose wgmmas are still in flight
      if (!live) {
        // One lane per warp keeps the ring in step: it waits for each stage to fill, then
        // releases it. (Every lane waiting here and one lane arriving would be a race:
        // nothing orders the others' waits before the arrival, so the producer could refill
        // the stage and complete the next phase of the same parity before a slow lane's
        // wait, which then waits for a phase that never comes - the emulation's deadlock
        // report found it. The live path is ordered by the collective wgmma.wait_group.)
        // A loop of its own: no divergent code in the live loop, where a wgmma group stays
        // in flight across iterations (ptxas would serialise the wgmmas, C7518).
        for (int ks = 0; ks < k_steps; ++ks) {
          if constexpr (kCluster > 1) {
            // Lane 0 waits; after __syncwarp lanes 0 and 1 release the stage here and in the peer.
            if (lane == 0) moekit::sm90::mbar_wait(&full[stage], phase);
            __syncwarp();
            release_stage<kCluster>(&empty[stage], lane, rank, true, true);
          } else if (lane == 0) {
            moekit::sm90::mbar_wait(&full[stage], phase);
            moekit::sm90::mbar_arrive(&empty[stage]);
          }
          advance();
        }
        continue;
      }
      for (int ks = 0; ks < k_steps; ++ks) {
        moekit::sm90::mbar_wait(&full[stage], phase);
        const unsigned char* a_tile = tiles + stage * kStage + half * (kTileBytes / 2);
        const unsigned char* b_tile = tiles + stage * kStage + kTileBytes;
        moekit::sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {  // 4 x 32 bytes of K per 128-byte row
          const uint64_t da = moekit::sm90::smem_desc_k128(a_tile, kk * 32);
          if constexpr (kDgrad) {  // 16 of N per wgmma: K rows kk * 16 .. of the MN-major tile
            moekit::sm90::wgmma_m64n128k16_bf16<1>(acc, da, moekit::sm90::smem_desc_mn128(b_tile, kk * 16, kTileBytes / 2),
                                                   true);
            continue;
          }
          const uint64_t db = moekit::sm90::smem_desc_k128(b_tile, kk * 32);
          if constexpr (kFp8) {
            moekit::sm90::wgmma_m64n128k32_e4m3(part, da, db, kk > 0);
          } else {
            if constexpr (kN == 256) {
              moekit::sm90::wgmma_m64n256k16_bf16(acc, da, db, true);
            } else {
              moekit::sm90::wgmma_m64n128k16_bf16(acc, da, db, true);
            }
          }
        }
        moekit::sm90::wgmma_commit();
        // FP8: this step's scales, from the stage's slot (the producer wrote them before the
        // stage filled), read before the wait and before this warp releases the stage.
        float sa[2] = {0.0f, 0.0f}, sb = 0.0f;
        if constexpr (kFp8) {
          const float* slot = scales + stage * kScaleSlot;
          sb = slot[kBM];
#pragma unroll
          for (int h = 0; h < 2; ++h) sa[h] = slot[half * 64 + warp * 16 + lane / 4 + 8 * h];
        }
        if constexpr (kFp8) {
          moekit::sm90::wgmma_wait<0>();
          // This warp is done with the stage (wait_group 0: its wgmmas have read it): one
          // elected lane per warp arrives, as soon as its warp gets there.
          if constexpr (kCluster > 1) {
            release_stage<kCluster>(&empty[stage], lane, rank, true, true);
          } else if (moekit::sm90::elect_one_sync()) {
            moekit::sm90::mbar_arrive(&empty[stage]);
          }
          advance();
          moekit::sm90::fence_regs(part);
          // Promote: acc += part * scale_a(row) * scale_b(block of (g, col0, ks)).
#pragma unroll
          for (int i = 0; i < 64; ++i) acc[i] += part[i] * (sa[(i >> 1) & 1] * sb);
        } else {
          // BF16 keeps one group in flight: wait_group 1 completes the previous stage's
          // wgmmas (they chain on the same accumulators, which the hardware orders), so that
          // stage is released while this one's run; the last is released after the loop.
          moekit::sm90::wgmma_wait<1>();
          const bool elected = kCluster > 1 || moekit::sm90::elect_one_sync();
          release_stage<kCluster>(&empty[prev], lane, rank, elected, ks > 0);
          prev = stage;
          advance();
        }
      }
      if constexpr (!kFp8) {
        moekit::sm90::wgmma_wait<0>();
        const bool elected = kCluster > 1 || moekit::sm90::elect_one_sync();
        release_stage<kCluster>(&empty[prev], lane, rank, elected, k_steps > 0);
        moekit::sm90::fence_regs(acc);
      }
      // Epilogue: acc[4 j + 2 h + e] is row (warp * 16 + lane / 4 + 8 h), column 8 j + 2 (lane % 4) + e.
      // A pass writes exactly its run's rows [lo, hi] (all of group g, all below m or masked_m):
      // no m_indices load here. A half whose 64 rows all belong to the run goes through its
      // shared output buffer and kN / 64 TMA stores of 64 x 64 (columns past the output's end
      // are clipped by the map); any other half stores its run's rows from registers.
      if (lo <= 64 * half && hi >= 64 * half + 63) {
        constexpr int kBox = 64 * 128;  // 64 rows x 64 BF16 columns
        unsigned char* out = out_bufs + half * kOut;
        if (t == 0) moekit::sm90::bulk_wait<0>();  // the previous tile's stores have read it
        warpgroup_sync(wg);
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // Box j / 8, row r (128 bytes), 16-byte chunk j % 8 at its 128-byte-swizzled place.
            const int r = warp * 16 + lane / 4 + 8 * h;
            const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            *reinterpret_cast<uint32_t*>(out + (j / 8) * kBox + r * 128 + (((j % 8) ^ (r % 8)) * 16) + 4 * (lane % 4)) =
                *reinterpret_cast<const uint32_t*>(&v);
          }
        }
        moekit::sm90::fence_proxy_async();  // the st.shared before the async proxy's reads
        warpgroup_sync(wg);
        if (t == 0) {
          const int r0 = row0 + 64 * half;
#pragma unroll
          for (int b = 0; b < kN / 64; ++b) {
            if (masked) {
              moekit::sm90::tma_store_3d(&P.tmap_d, out + b * kBox, col0 + 64 * b, r0, g);
            } else {
              moekit::sm90::tma_store_2d(&P.tmap_d, out + b * kBox, col0 + 64 * b, r0);
            }
          }
          moekit::sm90::bulk_commit();
        }
        continue;
      }
      uint32_t* d = reinterpret_cast<uint32_t*>(p.d) + (masked ? static_cast<int64_t>(g) * p.m * cols_of<kDgrad>(p) / 2 : 0);
      bool row_ok[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rel = half * 64 + warp * 16 + lane / 4 + 8 * h;
        row_ok[h] = rel >= lo && rel <= hi;
      }
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + half * 64 + warp * 16 + lane / 4 + 8 * h;
          const int c = col0 + 8 * j + 2 * (lane % 4);
          if (!row_ok[h] || c >= cols_of<kDgrad>(p)) continue;
          const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          d[(static_cast<int64_t>(r) * cols_of<kDgrad>(p) + c) / 2] = *reinterpret_cast<const uint32_t*>(&v);
        }
      }
    }
    if (!masked) warpgroup_sync(wg);  // the run list is rewritten for the next tile
  }
  if (t == 0) moekit::sm90::bulk_wait<0>();  // the output buffers stay valid until stored
  // The peer may still arrive on this CTA's empty barriers until its consumers are done: the
  // CTA exits only after both CTAs' consumers met here (the producer warps need not: their
  // exit does not end the CTA, and exited threads do not hold barrier.cluster back).
  if constexpr (kCluster > 1) moekit::sm90::cluster_sync();
}


// ---- k-grouped weight gradient ---------------------------------------------------------------
// dW[g] [N, K] f32 = (accumulate: +=) the sum over group g's tokens [lo, hi) of dY[t]^T X[t]
// (offsets clamped as the portable kernel: lo to [0, M], hi to [lo, M]). Tiles: 128 x 128 of
// dW[g], groups in order, row-major over (N, K) tiles inside a group; the two consumer
// warpgroups own its rows 0-63 and 64-127; f32 epilogue from the fragment; a group without
// tokens writes zeros (accumulate: leaves dW). Stages that hold other groups' tokens have
// them zeroed in shared memory in both operands (a NaN or infinity of another group must not
// leak in: 0 x inf is NaN), each warpgroup its half of each tile, then fence.proxy.async
// (generic stores before the async proxy's wgmma reads) and a barrier of both warpgroups.
//
// BF16: dY [M, N] and X [M, K] as given, both MN-major along the tokens (the reduction). A
// stage holds 64 tokens from t0 = lo + 64 s (box starts need no alignment): A as two boxes of
// 64 dY columns x 64 tokens, B as two boxes of 64 X columns x 64 tokens, 8 KiB each; wgmma
// with imm-trans-a 1 and imm-trans-b 1. Only a group's last stage can hold foreign tokens
// (rows hi - t0 .. 63; a token is one 128-byte row of a box under any swizzle).
// FP8: dY^T [N, M] and X^T [K, M] (K-major along the tokens), 1x128 scales along the tokens
// (sa [N, M / 128], sb [K, M / 128]). A stage is one global 128-token block b (the scales'
// block), 128 rows x 128 tokens per operand; per stage 4 wgmma m64n128k32 into a fresh tile,
// promoted as acc[n][k] += part[n][k] sa[n][b] sb[k][b] (a rank-1 scale: each thread reads its
// 2 row scales and 32 column scales from the stage's slot, which the producer warp writes).
// A group's first and last blocks can hold foreign tokens: byte columns outside [lo - 128 b,
// hi - 128 b) of every row, at their 128-byte-swizzled positions.
constexpr int kKgTokens = 64;          // BF16 tokens per stage
constexpr int kKgScaleSlot = 2 * kBM;  // FP8: 128 token-block scales of dY^T rows, then of X^T rows
constexpr int kKgSmemBytes = kStages * 2 * kTileBytes + kStages * kKgScaleSlot * 4 + 1024 + 2 * kStages * 8;
static_assert(kKgSmemBytes == 203872, "keep sm90::SMEM_BYTES_KGROUPED in step");
static_assert(kKgSmemBytes <= 232448, "shared memory per block");

struct KgTile {
  int g, n0, k0;  // group, first row (N) and column (K) of the dW tile
  int lo, hi;     // the group's tokens, clamped
};

__device__ __forceinline__ KgTile kg_tile(const MoekitGemmParams& p, int64_t tile) {
  const int tiles_n = (p.n + kBM - 1) / kBM, tiles_k = (p.k + kBN - 1) / kBN;
  const int64_t per_group = static_cast<int64_t>(tiles_n) * tiles_k;
  KgTile ti;
  ti.g = static_cast<int>(tile / per_group);
  const int rem = static_cast<int>(tile % per_group);
  ti.n0 = (rem / tiles_k) * kBM;
  ti.k0 = (rem % tiles_k) * kBN;
  const int* offs = reinterpret_cast<const int*>(p.group_offsets);
  const int lo = offs[ti.g], hi = offs[ti.g + 1];
  ti.lo = lo < 0 ? 0 : (lo > p.m ? p.m : lo);
  ti.hi = hi < ti.lo ? ti.lo : (hi > p.m ? p.m : hi);
  return ti;
}

// The tile's stages: BF16 from t0 = lo by 64 tokens; FP8 the 128-token blocks lo / 128 ..
// (hi - 1) / 128 (t0 = 128 b). None when the group is empty.
template <bool kFp8>
__device__ __forceinline__ int kg_first(const KgTile& ti) {
  return kFp8 ? ti.lo / 128 * 128 : ti.lo;
}
template <bool kFp8>
__device__ __forceinline__ int kg_step() {
  return kFp8 ? 128 : kKgTokens;
}

// FP8: zero the byte columns outside [c_lo, c_hi) of rows r0 .. r0 + 63 of a 128 x 128-byte
// tile written by TMA with 128-byte swizzle (column c of row r at ((c / 16) ^ (r % 8)) 16 + c % 16).
__device__ __forceinline__ void kg_zero_columns(unsigned char* tile, int r0, int c_lo, int c_hi, int t) {
  for (int i = t; i < 64 * 8; i += 128) {  // (row, 16-byte chunk) pairs
    const int r = r0 + i / 8, q = i % 8;
    unsigned char* chunk = tile + r * 128 + ((q ^ (r % 8)) * 16);
    if (16 * q >= c_lo && 16 * q + 16 <= c_hi) continue;  // all 16 columns are the group's
    if (16 * q + 16 <= c_lo || 16 * q >= c_hi) {
      *reinterpret_cast<uint4*>(chunk) = make_uint4(0, 0, 0, 0);
      continue;
    }
    for (int b = 0; b < 16; ++b) {
      if (16 * q + b < c_lo || 16 * q + b >= c_hi) chunk[b] = 0;
    }
  }
}

template <bool kFp8>
__device__ __forceinline__ void gemm_sm90_kgrouped(const MoekitGemmSm90Params& P) {
  const MoekitGemmParams& p = P.gemm;
  MOEKIT_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* tiles = smem;
  // Slots of kKgScaleSlot floats (kKgSmemBytes; BF16 leaves them unused).
  constexpr int kSlot = kKgScaleSlot;
  float* scales = reinterpret_cast<float*>(smem + kStages * 2 * kTileBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * 2 * kTileBytes + kStages * kSlot * 4);
  uint64_t* empty = full + kStages;
  const int wg = threadIdx.x / 128;
  const int t = threadIdx.x % 128;
  ring_init<kStages>(P, full, empty);
  const int64_t total = static_cast<int64_t>(p.groups) * ((p.n + kBM - 1) / kBM) * ((p.k + kBN - 1) / kBN);
  uint32_t stage = 0, phase = 0;
  auto advance = [&]() {
    if (++stage == kStages) stage = 0, phase ^= 1;
  };
  constexpr int kBox = kTileBytes / 2;  // BF16: 64 columns x 64 tokens
  constexpr int kProducerRegs = kFp8 ? 56 : 40, kConsumerRegs = kFp8 ? 224 : 232;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs == 384 * 168, "setmaxnreg pool");

  if (wg == 0) {
    moekit::sm90::regs_dec<kProducerRegs>();
    if (t >= (kFp8 ? 32 : 1)) return;
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const KgTile ti = kg_tile(p, tile);
      for (int t0 = kg_first<kFp8>(ti); t0 < ti.hi; t0 += kg_step<kFp8>()) {
        if (t == 0) moekit::sm90::mbar_wait(&empty[stage], phase ^ 1);
        if constexpr (kFp8) {
          // Lane t: the block's scales of dY^T rows n0 + 4t .. and X^T rows k0 + 4t .. (0 past
          // N, K); published by lane 0's arrive (as the m-grouped FP8 producer's slot).
          __syncwarp();
          float* slot = scales + stage * kSlot;
          const int blocks = p.m / 128, b = t0 / 128;
          const float* sa = reinterpret_cast<const float*>(p.a_scales);
          const float* sb = reinterpret_cast<const float*>(p.b_scales);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = 4 * t + j;
            slot[r] = ti.n0 + r < p.n ? sa[static_cast<int64_t>(ti.n0 + r) * blocks + b] : 0.0f;
            slot[kBM + r] = ti.k0 + r < p.k ? sb[static_cast<int64_t>(ti.k0 + r) * blocks + b] : 0.0f;
          }
          __syncwarp();
          if (t != 0) {
            advance();
            continue;
          }
        }
        moekit::sm90::mbar_arrive_expect_tx(&full[stage], 2 * kTileBytes);
        unsigned char* dst = tiles + stage * 2 * kTileBytes;
        if constexpr (kFp8) {
          moekit::sm90::tma_load_2d(dst, &P.tmap_a, &full[stage], t0, ti.n0);
          moekit::sm90::tma_load_2d(dst + kTileBytes, &P.tmap_b, &full[stage], t0, ti.k0);
        } else {
          moekit::sm90::tma_load_2d(dst, &P.tmap_a, &full[stage], ti.n0, t0);
          moekit::sm90::tma_load_2d(dst + kBox, &P.tmap_a, &full[stage], ti.n0 + 64, t0);
          moekit::sm90::tma_load_2d(dst + 2 * kBox, &P.tmap_b, &full[stage], ti.k0, t0);
          moekit::sm90::tma_load_2d(dst + 3 * kBox, &P.tmap_b, &full[stage], ti.k0 + 64, t0);
        }
        advance();
      }
    }
    return;
  }

  moekit::sm90::regs_inc<kConsumerRegs>();
  const int half = wg - 1;
  const int warp = t / 32, lane = t % 32;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const KgTile ti = kg_tile(p, tile);
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    float part[kFp8 ? 64 : 1];
    for (int t0 = kg_first<kFp8>(ti); t0 < ti.hi; t0 += kg_step<kFp8>()) {
      moekit::sm90::mbar_wait(&full[stage], phase);
      unsigned char* a_tile = tiles + stage * 2 * kTileBytes;
      unsigned char* b_tile = a_tile + kTileBytes;
      // The group's tokens in this stage, relative to t0: [c_lo, c_hi).
      const int c_lo = ti.lo > t0 ? ti.lo - t0 : 0;
      const int c_hi = ti.hi - t0 < kg_step<kFp8>() ? ti.hi - t0 : kg_step<kFp8>();
      if (c_lo > 0 || c_hi < kg_step<kFp8>()) {
        if constexpr (kFp8) {
          kg_zero_columns(a_tile, 64 * half, c_lo, c_hi, t);
          kg_zero_columns(b_tile, 64 * half, c_lo, c_hi, t);
        } else {  // c_lo is 0 (stages start at lo): rows c_hi .. 63 of A box `half` and B box `half`
          uint4* a4 = reinterpret_cast<uint4*>(a_tile + half * kBox) + c_hi * 8;
          uint4* b4 = reinterpret_cast<uint4*>(b_tile + half * kBox) + c_hi * 8;
          for (int i = t; i < (kKgTokens - c_hi) * 8; i += 128) {
            a4[i] = make_uint4(0, 0, 0, 0);
            b4[i] = make_uint4(0, 0, 0, 0);
          }
        }
        moekit::sm90::fence_proxy_async();
        moekit::sm90::named_barrier_sync<3, 256>();
      }
      moekit::sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if constexpr (kFp8) {  // 32 tokens (bytes) per wgmma, K-major
          moekit::sm90::wgmma_m64n128k32_e4m3(part, moekit::sm90::smem_desc_k128(a_tile + half * kBox, kk * 32),
                                              moekit::sm90::smem_desc_k128(b_tile, kk * 32), kk > 0);
        } else {  // 16 tokens (rows) per wgmma, MN-major
          moekit::sm90::wgmma_m64n128k16_bf16<1, 1>(acc, moekit::sm90::smem_desc_mn128(a_tile + half * kBox, kk * 16, kBox),
                                                    moekit::sm90::smem_desc_mn128(b_tile, kk * 16, kBox), true);
        }
      }
      moekit::sm90::wgmma_commit();
      moekit::sm90::wgmma_wait<0>();
      if constexpr (kFp8) {
        // Promote with this block's scales, read from the slot before the stage is released.
        moekit::sm90::fence_regs(part);
        const float* slot = scales + stage * kSlot;
        float sa[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) sa[h] = slot[half * 64 + warp * 16 + lane / 4 + 8 * h];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float sb = slot[kBM + 8 * j + 2 * (lane % 4) + e];
#pragma unroll
            for (int h = 0; h < 2; ++h) acc[4 * j + 2 * h + e] += part[4 * j + 2 * h + e] * (sa[h] * sb);
          }
        }
      }
      if (moekit::sm90::elect_one_sync()) moekit::sm90::mbar_arrive(&empty[stage]);
      advance();
      moekit::sm90::fence_regs(acc);
    }
    // acc[4 j + 2 h + e]: dW row n0 + 64 half + 16 warp + lane / 4 + 8 h, column k0 + 8 j + 2 (lane % 4) + e.
    float* d = reinterpret_cast<float*>(p.d) + static_cast<int64_t>(ti.g) * p.n * p.k;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = ti.n0 + half * 64 + warp * 16 + lane / 4 + 8 * h;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = ti.k0 + 8 * j + 2 * (lane % 4) + e;
          if (r >= p.n || c >= p.k) continue;
          float* x = d + static_cast<int64_t>(r) * p.k + c;
          *x = p.accumulate ? *x + acc[4 * j + 2 * h + e] : acc[4 * j + 2 * h + e];
        }
      }
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, 1) moekit_gemm_sm90_bf16(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<false>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1) moekit_gemm_sm90_fp8(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<true>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_bf16_dgrad(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<false, true>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_bf16_kgrouped(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90_kgrouped<false>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_fp8_kgrouped(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90_kgrouped<true>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_bf16_n256(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<false, false, 256>(p);
}
// 2-CTA clusters (m-grouped forward): the two CTAs of a cluster take the 128-row halves of a
// 256-row tile with the same columns; where both halves' pass is of one group, rank 0
// multicasts the weight tile into both CTAs (half the weight loads from L2).
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_mc2_bf16(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<false, false, kBN, 2>(p);
}
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(kThreads, 1)
    moekit_gemm_sm90_mc2_fp8(const __grid_constant__ MoekitGemmSm90Params p) {
  gemm_sm90<true, false, kBN, 2>(p);
}

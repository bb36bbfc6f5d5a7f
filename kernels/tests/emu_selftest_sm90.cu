// Kernels that test the host emulation of Hopper's instructions (moekit/emu/sm90.h) through
// the wrappers of moekit/sm90/ptx_sm90.cuh (crates/moekit-emu-selftest, tests/selftest_sm90.rs).
// The correct ones run on an H100/H200 too, against the same Rust expectations, so a GPU run
// checks that the emulation's TMA swizzle, descriptor decoding and fragment layout are the
// hardware's. The `planted_*` kernels carry deliberate bugs that the emulation must catch
// (wrong results, a fault or a deadlock report); they are never run on a GPU.
//
// moekit-arch: hopper
// moekit-sass: * forbid LDL STL
// moekit-sass: selftest_sm90_tma_box require UTMALDG SYNCS
// moekit-sass: selftest_sm90_tma_store require UTMALDG UTMASTG
// moekit-sass: selftest_sm90_wgmma_bf16 require HGMMA UTMALDG
// moekit-sass: selftest_sm90_wgmma_fp8 require QGMMA UTMALDG
// moekit-sass: selftest_sm90_wgmma_bf16_mn_b require HGMMA UTMALDG
// moekit-sass: selftest_sm90_warpgroup_roles require USETMAXREG
// moekit-sass: selftest_sm90_cluster_multicast require UTMALDG SYNCS UCGABAR_ARV UCGABAR_WAIT
// moekit-budget: * smem<=1024

#include "moekit/abi.h"
#include "moekit/portable.cuh"
#include "moekit/sm90/ptx_sm90.cuh"

namespace {

namespace sm90 = moekit::sm90;

// The block's dynamic shared memory rounded up to 1024 bytes (launch with 1024 bytes of slack).
__device__ __forceinline__ unsigned char* smem_1024() {
  MOEKIT_DYNAMIC_SMEM(unsigned char, raw);
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

}  // namespace

// One TMA box of a 2D tensor map at (c0, c1) into shared memory, copied out byte for byte
// (`bytes` of box, then the mbarrier's completion): the swizzle and zero fill as they land.
extern "C" __global__ void selftest_sm90_tma_box(const __grid_constant__ MoekitTensorMap tmap, unsigned char* out,
                                                 int c0, int c1, int bytes) {
  unsigned char* smem = smem_1024();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 16384);
  if (threadIdx.x == 0) {
    sm90::mbar_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbar_arrive_expect_tx(bar, bytes);
    sm90::tma_load_2d(smem, &tmap, bar, c0, c1);
  }
  sm90::mbar_wait(bar, 0);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) out[i] = smem[i];
}

// One box loaded through map `src` at (c0, c1) and stored through map `dst` at (d0, d1) from
// the same shared memory (both maps with the same box and swizzle): out-of-bounds source
// elements arrive as zeros and are stored; out-of-bounds destination elements are not written.
extern "C" __global__ void selftest_sm90_tma_store(const __grid_constant__ MoekitTensorMap src,
                                                   const __grid_constant__ MoekitTensorMap dst, int c0, int c1, int d0,
                                                   int d1, int bytes) {
  unsigned char* smem = smem_1024();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 16384);
  if (threadIdx.x == 0) {
    sm90::mbar_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbar_arrive_expect_tx(bar, bytes);
    sm90::tma_load_2d(smem, &src, bar, c0, c1);
  }
  sm90::mbar_wait(bar, 0);
  if (threadIdx.x == 0) {
    sm90::fence_proxy_async();
    sm90::tma_store_2d(&dst, smem, d0, d1);
    sm90::bulk_commit();
    sm90::bulk_wait<0>();
  }
}

// Planted bug: the store's shared source is rewritten before cp.async.bulk.wait_group (smem
// reused too early); the emulation must fail the launch.
extern "C" __global__ void selftest_sm90_tma_store_reuse(const __grid_constant__ MoekitTensorMap dst) {
  unsigned char* smem = smem_1024();
  if (threadIdx.x == 0) {
    for (int i = 0; i < 16384; ++i) smem[i] = static_cast<unsigned char>(i * 7 + 1);
    sm90::fence_proxy_async();
    sm90::tma_store_2d(&dst, smem, 0, 0);
    sm90::bulk_commit();
    smem[5] ^= 0x5a;  // the bug: before the wait
    sm90::bulk_wait<0>();
  }
}

// PLANTED BUG: the store's shared source is written by st.shared without fence.proxy.async
// before the TMA store (the async proxy may not see the writes); the emulation must fail the
// launch. With `fence` set the same kernel is correct.
extern "C" __global__ void planted_sm90_store_without_fence(const __grid_constant__ MoekitTensorMap dst, int fence) {
  unsigned char* smem = smem_1024();
  if (threadIdx.x == 0) {
    for (int i = 0; i < 16384; ++i) smem[i] = static_cast<unsigned char>(i * 5 + 3);
    if (fence) sm90::fence_proxy_async();
    sm90::tma_store_2d(&dst, smem, 0, 0);
    sm90::bulk_commit();
    sm90::bulk_wait<0>();
  }
}

namespace {

// What a planted kernel gets wrong (0: nothing).
enum Bug {
  kNone = 0,
  kWrongSwizzle,     // descriptors say no swizzle for a 128-byte-swizzled tile
  kWrongDescOffset,  // stride byte offset 512 instead of 1024 (8 rows of 128 bytes)
  kWrongExpectTx,    // expects 16 bytes more than the two boxes bring
  kWrongParity,      // waits for the parity of the phase before
  kEarlyRelease,     // reloads the stage before wgmma.wait_group
  kMissingFence,     // no wgmma.fence before the first wgmma
  kMnSwappedOffsets, // MN-major B described with the K-major roles (LBO 1024, SBO 8192)
};

// One warpgroup: d [64 x 128] f32 = A [64, K] . B [128, K]^T through a one-stage TMA ring of
// 128 bytes of K per step (the mbarrier's phase flips every step), wgmma m64n128 with 128-byte
// swizzled K-major descriptors, the accumulator fragment stored as documented in
// moekit/emu/sm90.h (thread t: rows 16 (t / 32) + (t % 32) / 4 + 8 h, columns 8 j + 2 (t % 4) + e).
// kMnB (BF16): B arrives MN-major, as B^T [K, 128] through a map with 64 x 64 boxes (two per
// step, 8 KiB apart: columns 0-63, 64-127), and the wgmma takes it with imm-trans-b 1
// (leading byte offset 8192 to the next 64 columns, stride byte offset 1024 to the next 8 K rows).
template <bool kFp8, int kBug, bool kMnB = false>
__device__ __forceinline__ void wgmma_tile(const MoekitTensorMap& ta, const MoekitTensorMap& tb, float* d, int k) {
  unsigned char* smem = smem_1024();
  unsigned char* a_tile = smem;           // 64 rows x 128 bytes
  unsigned char* b_tile = smem + 8192;    // 128 rows x 128 bytes
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 8192 + 16384);
  const int t = threadIdx.x;
  if (t == 0) {
    sm90::mbar_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  const int k_block = kFp8 ? 128 : 64;
  const uint32_t sbo = kBug == kWrongDescOffset ? 512 : 1024;
  const uint32_t mode = kBug == kWrongSwizzle ? 0 : 1;
  const uint32_t tx = 8192 + 16384 + (kBug == kWrongExpectTx ? 16 : 0);
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  uint32_t phase = 0;
  for (int ks = 0; ks * k_block < k; ++ks) {
    if (t == 0) {
      sm90::mbar_arrive_expect_tx(bar, tx);
      sm90::tma_load_2d(a_tile, &ta, bar, ks * k_block, 0);
      if constexpr (kMnB) {
        sm90::tma_load_2d(b_tile, &tb, bar, 0, ks * k_block);
        sm90::tma_load_2d(b_tile + 8192, &tb, bar, 64, ks * k_block);
      } else {
        sm90::tma_load_2d(b_tile, &tb, bar, ks * k_block, 0);
      }
    }
    sm90::mbar_wait(bar, kBug == kWrongParity ? phase ^ 1 : phase);
    phase ^= 1;
    if (kBug != kMissingFence) sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t da = sm90::smem_desc(a_tile, kk * 32, 16, sbo, mode);
      if constexpr (kMnB) {
        const uint64_t db = kBug == kMnSwappedOffsets ? sm90::smem_desc(b_tile, kk * 16 * 128, 1024, 8192, 1)
                                                      : sm90::smem_desc_mn128(b_tile, kk * 16, 8192);
        sm90::wgmma_m64n128k16_bf16<1>(acc, da, db, true);
        continue;
      }
      const uint64_t db = sm90::smem_desc(b_tile, kk * 32, 16, sbo, mode);
      if constexpr (kFp8) {
        sm90::wgmma_m64n128k32_e4m3(acc, da, db, true);
      } else {
        sm90::wgmma_m64n128k16_bf16(acc, da, db, true);
      }
    }
    sm90::wgmma_commit();
    if (kBug != kEarlyRelease) sm90::wgmma_wait<0>();
    sm90::fence_regs(acc);
    // The stage is reused by the next step's loads: every thread must be done with it.
    __syncthreads();
  }
  sm90::wgmma_wait<0>();
  sm90::fence_regs(acc);
  const int w = t / 32, l = t % 32;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int j = i / 4, h = (i / 2) % 2, e = i % 2;
    d[(16 * w + l / 4 + 8 * h) * 128 + 8 * j + 2 * (l % 4) + e] = acc[i];
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_sm90_wgmma_bf16(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                             float* d, int k) {
  wgmma_tile<false, kNone>(ta, tb, d, k);
}
extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_sm90_wgmma_fp8(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                            float* d, int k) {
  wgmma_tile<true, kNone>(ta, tb, d, k);
}
extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_sm90_wgmma_bf16_mn_b(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                                  float* d, int k) {
  wgmma_tile<false, kNone, true>(ta, tb, d, k);
}
// PLANTED BUG: the MN-major B descriptor with the K-major meaning of the two offsets.
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_mn_swapped_offsets(const __grid_constant__ MoekitTensorMap ta,
                                    const __grid_constant__ MoekitTensorMap tb, float* d, int k) {
  wgmma_tile<false, kMnSwappedOffsets, true>(ta, tb, d, k);
}
// PLANTED BUG: the descriptors' swizzle mode (none) is not the tile's (128B, from TMA).
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_wrong_swizzle(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                               float* d, int k) {
  wgmma_tile<false, kWrongSwizzle>(ta, tb, d, k);
}
// PLANTED BUG: stride byte offset of 512 for 8-row groups 1024 bytes apart.
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_wrong_desc_offset(const __grid_constant__ MoekitTensorMap ta,
                                   const __grid_constant__ MoekitTensorMap tb, float* d, int k) {
  wgmma_tile<false, kWrongDescOffset>(ta, tb, d, k);
}
// PLANTED BUG: expect_tx counts 16 bytes that never arrive: the phase never completes.
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_wrong_expect_tx(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                                 float* d, int k) {
  wgmma_tile<false, kWrongExpectTx>(ta, tb, d, k);
}
// PLANTED BUG: waits for the other phase parity (on a fresh barrier: returns at once).
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_wrong_parity(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                              float* d, int k) {
  wgmma_tile<false, kWrongParity>(ta, tb, d, k);
}
// PLANTED BUG: the stage is reloaded while the wgmma reading it is still in flight (no
// wgmma.wait_group before the next step's TMA).
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_early_release(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                               float* d, int k) {
  wgmma_tile<false, kEarlyRelease>(ta, tb, d, k);
}
// PLANTED BUG: no wgmma.fence before the first wgmma.
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_sm90_missing_fence(const __grid_constant__ MoekitTensorMap ta, const __grid_constant__ MoekitTensorMap tb,
                               float* d, int k) {
  wgmma_tile<false, kMissingFence>(ta, tb, d, k);
}

// Two warpgroups with different register budgets (setmaxnreg), each meeting on its own named
// barrier (ids 1, 2; 128 threads): thread t writes t * 3 + wg, then after the barrier reads the
// value of thread (t + 37) % 128 of its warpgroup into out[wg * 128 + t]. Lane 0 of each warp
// records elect.sync's choice in out[256 + warp] (the emulation elects the lowest lane).
extern "C" __global__ void __launch_bounds__(256, 1) selftest_sm90_warpgroup_roles(int* out) {
  __shared__ int vals[256];
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  // Both decrease (safe for any allocation ptxas chose at or above 40); inc is exercised by
  // the planted kernel below, in the emulation only.
  if (wg == 0) {
    sm90::regs_dec<40>();
  } else {
    sm90::regs_dec<48>();
  }
  vals[threadIdx.x] = t * 3 + wg;
  if (wg == 0) {
    sm90::named_barrier_sync<1, 128>();
  } else {
    sm90::named_barrier_sync<2, 128>();
  }
  out[threadIdx.x] = vals[wg * 128 + (t + 37) % 128];
  const bool elected = sm90::elect_one_sync();
  const unsigned ballot = __ballot_sync(0xffffffffu, elected);
  if (threadIdx.x % 32 == 0) out[256 + threadIdx.x / 32] = __ffs(static_cast<int>(ballot)) - 1 + 100 * __popc(ballot);
}

// PLANTED BUG: half a warpgroup asks setmaxnreg for another register count.
extern "C" __global__ void planted_sm90_setmaxnreg_not_uniform(int* out) {
  if (threadIdx.x < 64) {
    sm90::regs_inc<232>();
  } else {
    sm90::regs_inc<240>();
  }
  out[threadIdx.x] = 1;
}

// ---- thread block clusters -------------------------------------------------------------------------
// A cluster of 2 CTAs (128 threads each). Rank r multicasts one 2 KiB box (128 bytes x 16 rows,
// 128-byte swizzle) of the map at rows 32 c + 16 r (c: the cluster's index, blockIdx.x / 2) to
// shared offset 2048 r of both CTAs; each CTA expects both boxes on its own barrier and copies
// its 4 KiB out to out[4096 blockIdx.x ..]; out_rank[blockIdx.x] = %cluster_ctarank. Then
// thread 0 arrives on the "done" barrier (count 2) of both CTAs (the peer's through mapa) and waits for its
// own; threads 64.. exit, the rest meet at barrier.cluster before exit (exited threads must
// not hold it back).
// `planted`: 0 correct; 1 __syncthreads instead of barrier.cluster after the initialisation (a
// peer's barriers may still be uninitialised); 2 each rank multicasts to itself only (the
// peer's bytes never arrive); 3 rank 0 neither waits for "done" nor meets its peer at
// barrier.cluster before exiting (its peer's arrival on it is not ordered before the exit).
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128, 1)
    selftest_sm90_cluster_multicast(const __grid_constant__ MoekitTensorMap tmap, unsigned char* out, int* out_rank,
                                    int planted) {
  unsigned char* smem = smem_1024();
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + 4096);
  uint64_t* done = full + 1;
  const uint32_t rank = sm90::cluster_ctarank();
  if (threadIdx.x == 0) {
    sm90::mbar_init(full, 1);
    sm90::mbar_init(done, 2);
    sm90::fence_barrier_init();
  }
  if (planted == 1) {
    __syncthreads();
  } else {
    sm90::cluster_sync();
  }
  if (threadIdx.x == 0) {
    sm90::mbar_arrive_expect_tx(full, 2 * 2048);
    const uint16_t mask = planted == 2 ? static_cast<uint16_t>(1u << rank) : uint16_t(3);
    sm90::tma_load_2d_multicast(smem + 2048 * rank, &tmap, full, 0, 32 * static_cast<int>(blockIdx.x / 2) + 16 * rank,
                                mask);
  }
  sm90::mbar_wait(full, 0);
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) out[4096 * blockIdx.x + i] = smem[i];
  if (threadIdx.x == 0) {
    out_rank[blockIdx.x] = static_cast<int>(rank);
    sm90::mbar_arrive(done);
    sm90::mbar_arrive_peer_if(done, rank ^ 1u, true);
    if (!(planted == 3 && rank == 0)) sm90::mbar_wait(done, 0);
  }
  if (threadIdx.x >= 64 || (planted == 3 && rank == 0)) return;
  sm90::cluster_sync();
}

// Hopper (sm_90a) PTX wrappers: mbarrier, TMA (multicast too), wgmma, register reallocation,
// named barriers, elect.sync, thread block clusters. One wrapper per instruction: on the device one inline `asm`; in the host
// emulation (MOEKIT_EMULATION) the reference implementation of moekit/emu/sm90.h, exact to
// the PTX ISA where it fixes the result (what is exact and what is a model is listed there).
// Shared addresses in the emulation are offsets into the block's dynamic shared memory, so
// barriers, TMA destinations and wgmma operands must live there (checked).
#pragma once

#include <stdint.h>

#ifdef MOEKIT_EMULATION
#include "moekit/emu/sm90.h"
#endif

namespace moekit {
namespace sm90 {

#ifndef MOEKIT_EMULATION

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier --------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes the initialisation visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// One arrival when `pred` holds, as a predicated instruction (no branch: a divergent path
// while a wgmma group is in flight makes ptxas serialise the wgmmas, C7518).
__device__ __forceinline__ void mbar_arrive_if(uint64_t* bar, bool pred) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   smem_addr(bar)),
               "r"(static_cast<int>(pred))
               : "memory");
}
// Waits until the phase with parity `phase` of the barrier has completed (on a fresh
// barrier, parity 1 counts as completed).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(phase)
      : "memory");
}

// ---- TMA -------------------------------------------------------------------------------------
// Tile loads through a tensor map (a __grid_constant__ kernel parameter); completion is
// counted in bytes on `bar`. Out-of-bounds elements arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tmap, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(smem_addr(dst)),
      "l"(tmap), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const void* tmap, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::
          "r"(smem_addr(dst)),
      "l"(tmap), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t phase) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(phase)
      : "memory");
  return done != 0;
}
// Tile store through a tensor map from shared memory (out-of-bounds elements are not
// written), in the calling thread's bulk async-group; fence_proxy_async() first makes the
// threads' shared-memory writes visible to TMA, bulk_wait<N>() before the source is reused.
__device__ __forceinline__ void tma_store_2d(const void* tmap, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(tmap),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_store_3d(const void* tmap, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(tmap),
               "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void prefetch_tmap(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tmap) : "memory");
}

// ---- thread block clusters (kernels declared with __cluster_dims__) -----------------------------
// %cluster_ctarank: this CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// barrier.cluster.arrive (release) then barrier.cluster.wait (acquire): every non-exited thread
// of the cluster, e.g. after the barriers are initialised (before a peer uses them) and
// before exit (while peers may still arrive on this CTA's barriers).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// One arrival on the barrier at `bar`'s shared address in CTA `cta` of the cluster (mapa, then
// mbarrier.arrive.relaxed.cluster on the shared::cluster address), when `pred` holds: a
// predicated instruction, no branch. Relaxed: it orders none of the caller's memory accesses
// (the default .release costs a MEMBAR.ALL.GPU before every arrival in SASS). For a consumer's
// release of a stage in a peer CTA: all it read there is the peer's multicast tile, through
// wgmmas that wgmma.wait_group has completed; its own CTA's stage is released with
// mbar_arrive_if (release at CTA scope: the plain loads of the producer's scale slot).
__device__ __forceinline__ void mbar_arrive_peer_if(uint64_t* bar, uint32_t cta, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b32 remote;\nsetp.ne.b32 p, %2, 0;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "@p mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(cta), "r"(static_cast<int>(pred))
      : "memory");
}
// TMA tile loads multicast to the CTAs of `mask` (bit r: rank r): each receives the box at
// `dst`'s shared address and completes its bytes on its own barrier at `bar`'s address.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const void* tmap, uint64_t* bar, int c0, int c1,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(dst)),
      "l"(tmap), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d_multicast(void* dst, const void* tmap, uint64_t* bar, int c0, int c1,
                                                      int c2, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(smem_addr(dst)),
      "l"(tmap), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "h"(mask)
      : "memory");
}

// ---- named barriers (ids 1..15; 0 is __syncthreads), elect.sync ---------------------------------
// Immediate ids and counts, so that ptxas reserves only the barriers used.
template <int Id, int Threads>
__device__ __forceinline__ void named_barrier_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(Id), "n"(Threads) : "memory");
}
template <int Id, int Threads>
__device__ __forceinline__ void named_barrier_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(Id), "n"(Threads) : "memory");
}
// True in one lane of the (fully active) warp.
__device__ __forceinline__ bool elect_one_sync() {
  uint32_t pred;
  asm volatile("{\n.reg .b32 r;\n.reg .pred p;\nelect.sync r|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(pred));
  return pred != 0;
}

// ---- register reallocation between warpgroup roles -------------------------------------------
template <int N>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

// ---- wgmma -----------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator accesses across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// wgmma_m64n128k16_bf16: d (64 f32 per thread, accumulator of a 64 x 128 tile) += A(desc) . B(desc)^T,
// or d = A . B^T when `accumulate` is false. kTransB (imm-trans-b): 0, B K-major [128 of N,
// 16 of K]; 1, B MN-major (the descriptor describes B^T [16 of K, 128 of N], N contiguous:
// smem_desc_mn128). kTransA (imm-trans-a) likewise for A [64 of M, 16 of K].
template <int kTransB = 0, int kTransA = 0>
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert((kTransB == 0 || kTransB == 1) && (kTransA == 0 || kTransA == 1), "imm-trans-a/b");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %68, %67;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(kTransB), "n"(kTransA));
}

// wgmma_m64n256k16_bf16: as wgmma_m64n128k16_bf16 over 256 columns of B (128 f32 per thread:
// d[4 j + 2 h + e] is row 16 w + l / 4 + 8 h, column 8 j + 2 (l % 4) + e, j < 32), K-major B.
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

// wgmma_m64n128k32_e4m3: d (64 f32 per thread, accumulator of a 64 x 128 tile) += A(desc) . B(desc)^T,
// or d = A . B^T when `accumulate` is false.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

#else

// ---- host emulation ---------------------------------------------------------------------------
namespace emu90 = ::moekit::emu::sm90;
inline uint32_t smem_addr(const void* p) {
  const int64_t o = ::moekit::emu::smem_offset(p);
  if (o < 0) ::moekit::emu::fault("a shared address of memory outside the block's dynamic shared memory");
  return static_cast<uint32_t>(o);
}
inline void mbar_init(uint64_t* bar, uint32_t count) { emu90::mbar_init(bar, count); }
inline void fence_barrier_init() {}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { emu90::mbar_arrive_expect_tx(bar, bytes); }
inline void mbar_arrive(uint64_t* bar) { emu90::mbar_arrive(bar); }
inline void mbar_arrive_if(uint64_t* bar, bool pred) {
  if (pred) emu90::mbar_arrive(bar);
}
inline void mbar_wait(uint64_t* bar, uint32_t phase) { emu90::mbar_wait(bar, phase); }
inline bool mbar_try_wait(uint64_t* bar, uint32_t phase) { return emu90::mbar_try_wait(bar, phase); }
inline void tma_load_2d(void* dst, const void* tmap, uint64_t* bar, int c0, int c1) {
  const int c[2] = {c0, c1};
  emu90::tma_load(dst, tmap, bar, c, 2);
}
inline void tma_load_3d(void* dst, const void* tmap, uint64_t* bar, int c0, int c1, int c2) {
  const int c[3] = {c0, c1, c2};
  emu90::tma_load(dst, tmap, bar, c, 3);
}
inline void tma_store_2d(const void* tmap, const void* src, int c0, int c1) {
  const int c[2] = {c0, c1};
  emu90::tma_store(tmap, src, c, 2);
}
inline void tma_store_3d(const void* tmap, const void* src, int c0, int c1, int c2) {
  const int c[3] = {c0, c1, c2};
  emu90::tma_store(tmap, src, c, 3);
}
inline uint32_t cluster_ctarank() { return emu90::cluster_rank(); }
inline void cluster_sync() {
  emu90::cluster_arrive();
  emu90::cluster_wait();
}
inline void mbar_arrive_peer_if(uint64_t* bar, uint32_t cta, bool pred) {
  if (pred) emu90::mbar_arrive_cluster(bar, cta);
}
inline void tma_load_2d_multicast(void* dst, const void* tmap, uint64_t* bar, int c0, int c1, uint16_t mask) {
  const int c[2] = {c0, c1};
  if (mask == 0) ::moekit::emu::fault("cp.async.bulk.tensor (multicast::cluster): empty ctaMask");
  emu90::tma_load(dst, tmap, bar, c, 2, mask);
}
inline void tma_load_3d_multicast(void* dst, const void* tmap, uint64_t* bar, int c0, int c1, int c2, uint16_t mask) {
  const int c[3] = {c0, c1, c2};
  if (mask == 0) ::moekit::emu::fault("cp.async.bulk.tensor (multicast::cluster): empty ctaMask");
  emu90::tma_load(dst, tmap, bar, c, 3, mask);
}
inline void fence_proxy_async() { emu90::fence_proxy_async(); }
inline void bulk_commit() { emu90::bulk_commit(); }
template <int N>
inline void bulk_wait() { emu90::bulk_wait(N); }
inline void prefetch_tmap(const void* tmap) { (void)emu90::tmap_decode(tmap, "prefetch.tensormap"); }
template <int Id, int Threads>
inline void named_barrier_sync() { emu90::named_barrier(Id, Threads, true); }
template <int Id, int Threads>
inline void named_barrier_arrive() { emu90::named_barrier(Id, Threads, false); }
inline bool elect_one_sync() { return emu90::elect_one(0xffffffffu); }
template <int N>
inline void regs_inc() { emu90::setmaxnreg(true, N); }
template <int N>
inline void regs_dec() { emu90::setmaxnreg(false, N); }
inline void wgmma_fence() { emu90::wgmma_fence(); }
inline void wgmma_commit() { emu90::wgmma_commit(); }
template <int N>
inline void wgmma_wait() { emu90::wgmma_wait(N); }
template <int N>
inline void fence_regs(float (&)[N]) {}
template <int kTransB = 0, int kTransA = 0>
inline void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  emu90::wgmma<128>(d, desc_a, desc_b, accumulate, emu90::Kind::Bf16, kTransA != 0, kTransB != 0);
}
inline void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  emu90::wgmma<128>(d, desc_a, desc_b, accumulate, emu90::Kind::E4m3);
}
inline void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  emu90::wgmma<256>(d, desc_a, desc_b, accumulate, emu90::Kind::Bf16);
}

#endif

// ---- wgmma descriptors (both targets) ------------------------------------------------------------
// Shared-memory matrix descriptor of a K-major operand: start address (the tile's shared
// address plus a K byte offset) >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride
// byte offset >> 4 in 32-45, base offset 0 in 49-51, swizzle `mode` in 62-63 (0 none, 1 128B,
// 2 64B, 3 32B).
__device__ __forceinline__ uint64_t smem_desc(const void* tile, uint32_t k_byte_offset, uint32_t lbo, uint32_t sbo,
                                              uint32_t mode) {
  const uint64_t addr = (smem_addr(tile) + k_byte_offset) & 0x3ffffu;
  return (addr >> 4) | (uint64_t((lbo >> 4) & 0x3fff) << 16) | (uint64_t((sbo >> 4) & 0x3fff) << 32) |
         (uint64_t(mode & 3) << 62);
}
// The descriptor of a K-major tile written by TMA with 128-byte swizzling: rows of 128 bytes,
// 8-row (1024-byte) swizzle atoms; the tile must be 1024-byte aligned. Leading byte offset
// unused (1: 16 bytes), stride byte offset 1024. Advancing along K inside the atom adds the
// byte offset to the start address (the swizzle is a function of the address bits).
__device__ __forceinline__ uint64_t smem_desc_k128(const void* tile, uint32_t k_byte_offset) {
  return smem_desc(tile, k_byte_offset, 16, 1024, 1);
}
// The descriptor of an MN-major BF16 tile written by TMA with 128-byte swizzling, as boxes of
// 64 MN elements (one 128-byte row) by K rows: a K row is 128 bytes, 8 K rows make a
// 1024-byte atom (stride byte offset 1024, the next 8 of K), and the next 64 of MN are in the
// next box, `box_bytes` on (leading byte offset). `k_row` (a multiple of 8) selects the first
// K row: 128 bytes per row on the start address.
__device__ __forceinline__ uint64_t smem_desc_mn128(const void* tile, uint32_t k_row, uint32_t box_bytes) {
  return smem_desc(tile, k_row * 128, box_bytes, 1024, 1);
}
}  // namespace sm90
}  // namespace moekit

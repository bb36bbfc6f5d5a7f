// moekit host emulation: makes a kernel `.cu` file compile with a host C++ compiler and run
// on the CPU. Force-included (`-include moekit/emu/cuda_emu.h`) before the kernel source by
// moekit-build, with CUDA's headers on the include path (their host paths compute the same
// BF16/FP8 conversion bits as the device).
//
// What it provides: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp, warp
// shuffles, votes and __match_any_sync (full and partial masks), __activemask, bit intrinsics, atomics on any
// memory, __ldg, per-block shared memory. What it cannot provide: inline PTX (kernels keep it
// behind the wrappers of moekit/ptx.cuh and, for Hopper's mbarrier, TMA, wgmma, named
// barriers and setmaxnreg, moekit/sm90/ptx_sm90.cuh, whose reference implementations follow
// the PTX ISA where it fixes the result: moekit/emu/sm90.h), the memory model's weak
// orderings, and timing.
#pragma once

#ifndef MOEKIT_EMULATION
#define MOEKIT_EMULATION 1
#endif

// Shared memory: per worker OS thread, so blocks running at the same time never share it. It
// persists from one block to the next on the same worker (dynamic shared memory is poisoned
// before every block; static shared memory is not).
#define __shared__ static thread_local

#include <cuda_runtime_api.h>
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "moekit/emu/runtime.h"

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif
// The cluster size is read from the kernel's declaration by moekit-build (its launch entry
// point passes it to the emulated launch).
#ifndef __cluster_dims__
#define __cluster_dims__(...)
#endif

#define threadIdx (::moekit::emu::fiber().tid)
#define blockIdx (::moekit::emu::block().idx)
#define blockDim (::moekit::emu::worker().block_dim)
#define gridDim (::moekit::emu::worker().grid)
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads() { ::moekit::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::moekit::emu::warp_rendezvous(mask, &::moekit::emu::Warp::arrived);
}
// The lanes that were live when the warp last met at a warp-wide operation (the emulation
// runs lanes one after another, so "currently converged" is approximated by that).
inline unsigned __activemask() { return ::moekit::emu::block().warps[::moekit::emu::fiber().warp].converged; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- bit reinterpretation and bit intrinsics ------------------------------------------------
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- warp shuffles and votes ------------------------------------------------------------------
namespace moekit {
namespace emu {
template <typename T>
inline uint64_t to_slot(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bits");
  uint64_t s = 0;
  std::memcpy(&s, &v, sizeof(T));
  return s;
}
template <typename T>
inline T from_slot(uint64_t s) {
  T v;
  std::memcpy(&v, &s, sizeof(T));
  return v;
}
// Shuffle: `src(lane, base, max_lane)` names the absolute source lane (PTX `shfl.sync`:
// `base`/`max_lane` bound the caller's `width`-sized segment), or -1 for "keep my own value";
// a source lane that is not taking part also leaves the caller's own value.
template <typename T, typename Src>
inline T shuffle(unsigned mask, T v, int width, Src src) {
  const int lane = int(fiber().lane);
  const int w = (width <= 0 || width > 32) ? 32 : width;
  const uint64_t own = to_slot(v);
  return from_slot<T>(warp_exchange(mask, own, [&](const uint64_t* slots, unsigned live) {
    const int base = lane & ~(w - 1);
    const int from = src(lane, base, base + w - 1);
    if (from < 0 || from > 31) return own;
    return (live >> from & 1u) ? slots[from] : own;
  }));
}
}  // namespace emu
}  // namespace moekit

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::moekit::emu::shuffle(mask, v, width, [src](int, int base, int max) { return base + (src & (max - base)); });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  // May read an earlier segment; a partner past the caller's segment keeps the own value.
  return ::moekit::emu::shuffle(mask, v, width, [lane_mask](int l, int, int max) {
    const int j = l ^ (lane_mask & 31);
    return j <= max ? j : -1;
  });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::moekit::emu::shuffle(mask, v, width, [delta](int l, int base, int) {
    return l - int(delta) >= base ? l - int(delta) : -1;
  });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::moekit::emu::shuffle(mask, v, width, [delta](int l, int, int max) {
    return l + int(delta) <= max ? l + int(delta) : -1;
  });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::moekit::emu::warp_exchange(mask, pred ? 1u : 0u, [](const uint64_t* slots, unsigned live) {
    unsigned b = 0;
    for (unsigned l = 0; l < 32; ++l) b |= ((live >> l & 1u) && slots[l]) ? (1u << l) : 0u;
    return b;
  }) & mask;
}
// Lanes of `mask` holding the same value as the caller (32- or 64-bit values).
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t own = ::moekit::emu::to_slot(v);
  return ::moekit::emu::warp_exchange(mask, own, [own](const uint64_t* slots, unsigned live) {
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m |= ((live >> l & 1u) && slots[l] == own) ? (1u << l) : 0u;
    return m;
  });
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return __ballot_sync(mask, pred) == (mask & __activemask());
}

// ---- atomics: real atomics (blocks run concurrently on worker threads) ----------------------
namespace moekit {
namespace emu {
template <typename T, typename F>
inline T atomic_update(T* addr, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte types");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  for (;;) {
    T old;
    std::memcpy(&old, &old_bits, sizeof(T));
    T upd = f(old);
    U new_bits;
    std::memcpy(&new_bits, &upd, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
}  // namespace emu
}  // namespace moekit

template <typename T>
inline T atomicAdd(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return T(o + v); }); }
template <typename T>
inline T atomicSub(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return T(o - v); }); }
template <typename T>
inline T atomicMax(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return o < v ? v : o; }); }
template <typename T>
inline T atomicMin(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicExch(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T) { return v; }); }
template <typename T>
inline T atomicAnd(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return T(o & v); }); }
template <typename T>
inline T atomicOr(T* a, T v) { return ::moekit::emu::atomic_update(a, [v](T o) { return T(o | v); }); }
template <typename T>
inline T atomicCAS(T* a, T compare, T v) {
  return ::moekit::emu::atomic_update(a, [compare, v](T o) { return o == compare ? v : o; });
}

// ---- dynamic shared memory -----------------------------------------------------------------
namespace moekit {
namespace emu {
inline unsigned char* dynamic_smem() { return block().smem + kSmemGuard; }
}  // namespace emu
}  // namespace moekit

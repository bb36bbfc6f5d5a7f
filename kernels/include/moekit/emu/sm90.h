// moekit host emulation of the Hopper (sm_90a) instructions that moekit/sm90/ptx_sm90.cuh
// wraps: mbarrier, TMA tiled loads (multicast too) through tensor maps, wgmma.mma_async with
// shared-memory descriptors, named barriers, elect.sync, setmaxnreg and thread block clusters.
// Included by that header's emulation branch only.
//
// Exact to the PTX ISA (what a test may rely on):
// - mbarrier: the phase, pending-arrival and tx-count bookkeeping of init, arrive,
//   arrive.expect_tx, complete_tx and try_wait.parity (a wait for parity P returns once the
//   phase with parity P has completed: on a fresh barrier, parity 1 at once). State lives in
//   the barrier's own 8 bytes (layout below); an uninitialised barrier is a fault.
// - TMA: loads (and stores: bulk async-groups per thread, out-of-bounds elements not
//   written) of the box of a tiled tensor map (emulator layout: moekit_cuda::emu::TensorMapSpec),
//   coordinates innermost first, out-of-bounds elements as zeros, the full box counted in
//   bytes on the mbarrier, and the 32/64/128-byte swizzles as functions of the shared address:
//   the 16-byte chunk index (address bits 4-6, 4-5, 4) XOR address bits 7-9, 7-8, 7, i.e.
//   for 128B the chunk within a 128-byte row XOR (row % 8).
// - wgmma m64nNk16 BF16 / m64nNk32 E4M3 (A and B from descriptors, f32 accumulators):
//   descriptor decoding (start address bits 0-13, leading byte offset 16-29, stride byte
//   offset 32-45, base offset 49-51, swizzle mode 62-63), the canonical K-major layouts (8-row
//   core matrices; swizzled: rows at the swizzle width, 8-row groups at the stride offset),
//   the canonical MN-major layouts of BF16 operands with imm-trans 1 (the PTX ISA's table
//   "Canonical Layouts": 16 bytes of MN contiguous, 8 K rows of them 16 bytes apart, MN
//   chunks at the stride offset and K groups of 8 at the leading offset; swizzled: a K row is
//   the swizzle width of MN, 8 K rows per atom, the next swizzle width of MN at the leading
//   offset, the next 8 K rows at the stride offset; E4M3 has no transpose: a fault),
//   and the accumulator fragment: thread t of the warpgroup (warp w = t / 32, lane l) holds
//   in d[4 j + 2 h + e] the element (row 16 w + l / 4 + 8 h, column 8 j + 2 (l % 4) + e).
// - named barriers (bar.sync / bar.arrive id, count: thread counts, multiples of 32),
//   elect.sync (the lowest live lane of the mask), setmaxnreg (a no-op, checked uniform over
//   the warpgroup and in range);
// - clusters (scheduling: moekit/emu/runtime.h): %cluster_ctarank, mapa + mbarrier.arrive on a
//   peer CTA's barrier, TMA multicast (.multicast::cluster with a ctaMask: the box lands at the
//   same shared address of every CTA in the mask, each completing bytes on its own barrier at
//   the same address), barrier.cluster.arrive / wait (all non-exited threads of the cluster).
//   A fault: a peer's barrier used before mbarrier.init, a ctaMask naming a CTA outside the
//   cluster, an access to a CTA that has exited, a CTA exiting with no barrier.cluster wait
//   after a peer's last access to its shared memory (a model of "a CTA must not exit while its
//   peers may still access its shared memory").
//
// A model (stated, not the hardware's bits):
// - the f32 summation inside one wgmma: the PTX ISA does not specify it. The emulation adds
//   the products of one instruction to the accumulator in k order with fused multiply-adds
//   (products of BF16 or E4M3 values are exact in f32, so only the additions round). Results
//   agree bit for bit with the hardware when every partial sum is exact (small integers: the
//   self-tests) and to f32 rounding of a K-term sum otherwise. The hardware's FP8 wgmma is
//   known to keep fewer accumulator bits than f32; kernels promote to f32 every 128 of K.
// - timing, as adversarial as the ISA allows and deterministic: a TMA transfer is performed
//   as late as possible (when a thread waits on its mbarrier, or when no thread can run); a
//   wgmma reads shared memory and writes its accumulators at the wait_group that completes
//   it. Hazards are checked, not left to chance: a wgmma issued over shared memory that a
//   TMA load has not yet written, a TMA load into shared memory that an uncompleted wgmma
//   still reads (a stage released before wgmma.wait_group), and a wgmma.mma_async without a
//   wgmma.fence since the warpgroup last waited each fail the launch; so does an async-proxy
//   read (wgmma operand, TMA store source) of bytes that st.shared wrote after the last
//   fence.proxy.async (the block keeps the async proxy's view: refreshed by the fence, written
//   by TMA loads; a fence by any thread publishes every thread's writes, a model).
// - the schedule after an mbarrier arrival that completes a phase: the released threads run
//   before the arriving one continues (so a stage released too early is refilled at once).
// - a wait that can never complete (e.g. an expect_tx count larger than the bytes that
//   arrive) is a deadlock report naming the mbarrier and its state, never a hang.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <cstring>
#include <string>
#include <vector>

#include "moekit/emu/runtime.h"

namespace moekit {
namespace emu {
namespace sm90 {

// ---- mbarrier ----------------------------------------------------------------------------------
// The 8 bytes of an emulated mbarrier: bits 0-19 pending arrivals of the current phase,
// 20-39 the expected arrival count, 40-60 the tx-count (21-bit two's complement), 61 the
// current phase's parity, 62-63 the tag 0b01 (fresh shared memory, 0xFF.., is not a barrier).
constexpr uint64_t kMbarTag = uint64_t(1) << 62;
constexpr uint32_t kMaxCount = (1u << 20) - 1;

struct Mbar {
  uint32_t pending, expected, phase;
  int32_t tx;
};
// The shared address of `p` (and `bytes` after it) in block `b`'s dynamic shared memory, or -1.
inline int64_t smem_offset_in(const Block& b, const void* p, size_t bytes = 1) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = b.smem + kSmemGuard;
  if (c < base || c + bytes > base + b.smem_bytes) return -1;
  return int64_t(c - base);
}
// `bar` lives in block `b` (the caller's, or a peer's of its cluster).
inline Mbar mbar_load(Block& b, const uint64_t* bar, const char* op) {
  if (smem_offset_in(b, bar, 8) < 0) fault(std::string(op) + ": the mbarrier is not in the block's dynamic shared memory");
  if ((reinterpret_cast<uintptr_t>(bar) & 7) != 0) fault(std::string(op) + ": mbarrier not 8-byte aligned");
  const uint64_t v = *bar;
  if ((v >> 62) != 1) {
    fault(std::string(op) + ": mbarrier used before mbarrier.init" +
          (&b == &block() ? std::string()
                          : " (in CTA rank " + std::to_string(b.rank) +
                                " of the cluster: a peer's barriers are ready only after a barrier.cluster that "
                                "follows their initialisation)"));
  }
  Mbar m;
  m.pending = uint32_t(v & kMaxCount);
  m.expected = uint32_t((v >> 20) & kMaxCount);
  const uint32_t raw_tx = uint32_t((v >> 40) & 0x1fffffu);
  m.tx = (raw_tx & 0x100000u) ? int32_t(raw_tx) - int32_t(0x200000) : int32_t(raw_tx);
  m.phase = uint32_t((v >> 61) & 1);
  return m;
}
inline Mbar mbar_load(const uint64_t* bar, const char* op) { return mbar_load(block(), bar, op); }
inline void mbar_store(uint64_t* bar, const Mbar& m) {
  *bar = uint64_t(m.pending) | (uint64_t(m.expected) << 20) | (uint64_t(uint32_t(m.tx) & 0x1fffffu) << 40) |
         (uint64_t(m.phase) << 61) | kMbarTag;
}
inline std::string mbar_describe(const uint64_t* bar) {
  const uint64_t v = *bar;
  if ((v >> 62) != 1) return "uninitialised";
  const uint32_t raw_tx = uint32_t((v >> 40) & 0x1fffffu);
  const int32_t tx = (raw_tx & 0x100000u) ? int32_t(raw_tx) - int32_t(0x200000) : int32_t(raw_tx);
  return "current phase parity " + std::to_string((v >> 61) & 1) + ", " + std::to_string(v & kMaxCount) + " of " +
         std::to_string((v >> 20) & kMaxCount) + " arrivals pending, tx-count " + std::to_string(tx) + " bytes";
}
// The phase completes when no arrival and no transaction byte is pending: the parity flips
// and the arrival count is re-armed (tx-count is 0 by then). `b` holds the barrier (its
// waiters wake). Returns whether a phase completed.
inline bool mbar_maybe_complete(Block& b, uint64_t* bar, Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1u;
    m.pending = m.expected;
    mbar_store(bar, m);
    wake_waiters(b, bar);
    return true;
  }
  mbar_store(bar, m);
  return false;
}

inline void mbar_init(uint64_t* bar, uint32_t count) {
  if (smem_offset(bar, 8) < 0) fault("mbarrier.init: the mbarrier is not in the block's dynamic shared memory");
  if (count == 0 || count > kMaxCount) fault("mbarrier.init: count " + std::to_string(count) + " outside [1, 2^20 - 1]");
  Mbar m{count, count, 0, 0};
  mbar_store(bar, m);
}
inline void mbar_expect_tx(uint64_t* bar, uint32_t bytes, const char* op) {
  Mbar m = mbar_load(bar, op);
  const int64_t tx = int64_t(m.tx) + bytes;
  if (tx > int64_t(kMaxCount)) fault(std::string(op) + ": tx-count above 2^20 - 1");
  m.tx = int32_t(tx);
  mbar_store(bar, m);
}
// One arrival on `bar` of block `b` (the caller's or a peer's).
inline void mbar_arrive_in(Block& b, uint64_t* bar, const char* op) {
  Mbar m = mbar_load(b, bar, op);
  if (m.pending == 0) fault(std::string(op) + ": more arrivals than the barrier's count in one phase");
  m.pending--;
  if (mbar_maybe_complete(b, bar, m)) {
    // The threads this arrival releases run at once, before the arriving thread goes on
    // (the scheduler's next round starts at thread 0; released threads of a peer CTA run in
    // the peer's turn, which comes next): a consumer that releases a stage before its wgmma
    // completed meets the producer's refill while the wgmma still reads.
    if (&b == &block()) {
      block().restart = true;
    } else {
      block().end_turn = true;
    }
    yield_to_scheduler();
  }
}
inline void mbar_arrive(uint64_t* bar, const char* op = "mbarrier.arrive") { mbar_arrive_in(block(), bar, op); }
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  mbar_expect_tx(bar, bytes, "mbarrier.arrive.expect_tx");
  mbar_arrive(bar, "mbarrier.arrive.expect_tx");
}
// complete-tx: what a TMA transfer does on its mbarrier (in block `b`) when its bytes landed.
inline void mbar_complete_tx(Block& b, uint64_t* bar, uint32_t bytes) {
  Mbar m = mbar_load(b, bar, "complete_tx");
  const int64_t tx = int64_t(m.tx) - bytes;
  if (tx < -int64_t(kMaxCount)) fault("complete_tx: tx-count below -(2^20 - 1)");
  m.tx = int32_t(tx);
  mbar_maybe_complete(b, bar, m);
}
// Whether the phase with parity `parity` has completed (the current phase has the other one).
inline bool mbar_phase_done(const uint64_t* bar, uint32_t parity) {
  return mbar_load(bar, "mbarrier.try_wait.parity").phase != (parity & 1u);
}
// Performs the pending TMA transfers that complete on `bar`, in issue order.
inline void perform_tma_for(const uint64_t* bar) {
  Block& b = block();
  for (size_t i = 0; i < b.tma.size();) {
    if (b.tma[i].bar == bar) {
      AsyncOp op = std::move(b.tma[i]);
      b.tma.erase(b.tma.begin() + std::ptrdiff_t(i));
      op.perform();
    } else {
      ++i;
    }
  }
}
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  if (mbar_phase_done(bar, parity)) return true;
  perform_tma_for(bar);
  if (mbar_phase_done(bar, parity)) return true;
  spin_pause();  // callers loop: let the others run, report a loop that never ends
  return false;
}
// The blocking wait (try_wait.parity in a loop): sleeps until the phase completes.
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  if (mbar_phase_done(bar, parity)) return;
  perform_tma_for(bar);
  wait_on(bar, [&] { return mbar_phase_done(bar, parity); }, parity);
}

// Deadlock details: who waits on which mbarrier, named barrier or warpgroup collective.
inline std::string describe_waits(const Block& b) {
  std::string s;
  unsigned shown = 0;
  for (const auto& f : b.fibers) {
    if (f.state != Fiber::Waiting || f.wait_obj == nullptr || shown >= 4) continue;
    const auto* p = static_cast<const unsigned char*>(f.wait_obj);
    const unsigned char* base = b.smem + kSmemGuard;
    std::string what;
    if (p >= base && p + 8 <= base + b.smem_bytes) {
      what = "waits for phase parity " + std::to_string(f.wait_parity) + " of the mbarrier at shared address " +
             std::to_string(p - base) + " (" + mbar_describe(reinterpret_cast<const uint64_t*>(p)) + ")";
    } else if (p >= reinterpret_cast<const unsigned char*>(&b.named[0]) &&
               p < reinterpret_cast<const unsigned char*>(&b.named[16])) {
      const auto* nb = static_cast<const NamedBarrier*>(f.wait_obj);
      what = "waits at named barrier " + std::to_string(nb - &b.named[0]) + " (" + std::to_string(nb->arrived) + " of " +
             std::to_string(nb->expected) + " threads arrived)";
    } else if (b.cluster && f.wait_obj == b.cluster) {
      what = "waits at barrier.cluster (" + std::to_string(b.cluster->arrived) + " of " +
             std::to_string(b.cluster->live) + " live threads of the cluster arrived)";
    } else {
      for (size_t g = 0; g < b.warpgroups.size(); ++g) {
        if (f.wait_obj == &b.warpgroups[g]) {
          what = "waits in a collective of warpgroup " + std::to_string(g) + " (" +
                 std::to_string(b.warpgroups[g].arrived) + " of 128 threads arrived)";
        }
      }
    }
    if (what.empty()) continue;
    s += "; thread " + std::to_string(f.linear) + " " + what;
    ++shown;
  }
  return s;
}
inline void install_describe() { block().describe_wait = &describe_waits; }

// ---- named barriers, elect.sync ------------------------------------------------------------------
inline void named_barrier(unsigned id, unsigned count, bool wait) {
  Block& b = block();
  const char* op = wait ? "bar.sync" : "bar.arrive";
  const unsigned threads = worker().block_dim.x * worker().block_dim.y * worker().block_dim.z;
  if (id >= 16) fault(std::string(op) + ": barrier id " + std::to_string(id) + " outside 0..15");
  if (count == 0 || count % 32 != 0 || count > threads) {
    fault(std::string(op) + ": thread count " + std::to_string(count) + " is not a multiple of 32 within the block");
  }
  if (id == 0) fault(std::string(op) + " 0 with a count: barrier 0 is __syncthreads in this code base");
  install_describe();
  NamedBarrier& nb = b.named[id];
  if (nb.arrived > 0 && nb.expected != count) {
    fault(std::string(op) + " " + std::to_string(id) + ": count " + std::to_string(count) + " while " +
          std::to_string(nb.arrived) + " threads wait with count " + std::to_string(nb.expected));
  }
  nb.expected = count;
  if (++nb.arrived == count) {
    nb.arrived = 0;
    nb.generation++;
    wake_waiters(b, &nb);
    return;
  }
  if (!wait) return;
  const uint64_t gen = nb.generation;
  wait_on(&nb, [&] { return nb.generation != gen; });
}

// elect.sync: the lowest live lane of `mask` is elected (the same one for the same mask).
inline bool elect_one(unsigned mask) {
  const unsigned lane = fiber().lane;
  const unsigned leader = warp_exchange(mask, 0, [&](const uint64_t*, unsigned live) {
    const unsigned m = mask & live;
    return m ? unsigned(__builtin_ctz(m)) : 32u;
  });
  return leader == lane;
}

// ---- clusters ------------------------------------------------------------------------------------
// %cluster_ctarank and %cluster_nctarank (a launch without __cluster_dims__ is a cluster of one).
inline unsigned cluster_rank() { return block().rank; }
inline unsigned cluster_size() { return block().cluster ? block().cluster->size() : 1u; }
// The block of CTA rank `r` of the caller's cluster, for an access by `op` (a fault when out of
// range or gone: a CTA must not exit while peers may still access its shared memory).
inline Block& cluster_block(unsigned r, const char* op) {
  Block& b = block();
  if (!b.cluster || r >= b.cluster->size()) {
    fault(std::string(op) + ": CTA rank " + std::to_string(r) + " outside the cluster of " +
          std::to_string(cluster_size()));
  }
  Block& peer = *b.cluster->blocks[r];
  if (peer.exited) {
    fault(std::string(op) + ": CTA rank " + std::to_string(r) +
          " of the cluster has exited (a CTA must not exit while its peers may still access its shared memory: "
          "barrier.cluster before exit)");
  }
  return peer;
}
// The address in CTA `r`'s shared memory of the caller's shared `p` (mapa.shared::cluster).
template <typename T>
inline T* map_shared(T* p, unsigned r, const char* op) {
  const int64_t off = smem_offset(p);
  if (off < 0) fault(std::string(op) + ": not an address in the block's dynamic shared memory");
  Block& peer = cluster_block(r, op);
  return reinterpret_cast<T*>(peer.smem + kSmemGuard + off);
}
// mapa + mbarrier.arrive.release.cluster.shared::cluster: one arrival on the barrier at the
// caller's shared address `bar` in CTA `r` of the cluster (the caller's own CTA included).
inline void mbar_arrive_cluster(uint64_t* bar, unsigned r) {
  const char* op = "mbarrier.arrive.shared::cluster";
  uint64_t* remote = map_shared(bar, r, op);
  Block& peer = *block().cluster->blocks[r];
  if (&peer != &block()) peer.peer_access_gen = int64_t(block().cluster->generation);
  mbar_arrive_in(peer, remote, op);
}
// barrier.cluster.arrive / barrier.cluster.wait: every live thread of the cluster arrives
// before any waiting thread resumes (a thread arrives once per phase, then waits).
inline void cluster_arrive() {
  Block& b = block();
  Fiber& f = fiber();
  Cluster& c = *b.cluster;
  if (f.cluster_arrived) fault("barrier.cluster.arrive twice without barrier.cluster.wait in between");
  install_describe();
  f.cluster_arrived = true;
  f.cluster_gen = c.generation;
  if (++c.arrived == c.live) cluster_complete(c);
}
inline void cluster_wait() {
  Block& b = block();
  Fiber& f = fiber();
  Cluster& c = *b.cluster;
  if (!f.cluster_arrived) fault("barrier.cluster.wait without a barrier.cluster.arrive before it");
  const uint64_t gen = f.cluster_gen;
  wait_on(&c, [&] { return c.generation != gen; });
  f.cluster_arrived = false;
  b.cluster_waited = std::max(b.cluster_waited, c.generation);
}

// ---- warpgroup collectives ------------------------------------------------------------------------
// All 128 threads of the caller's warpgroup meet here with the same `key` (operation and
// operands, checked uniform); the last to arrive runs `last(ptrs)` for all of them, with
// each thread's `mine` in ptrs[t].
template <typename Last>
inline void warpgroup_collective(const char* op, uint64_t key, void* mine, Last last) {
  Block& b = block();
  Fiber& f = fiber();
  const unsigned threads = unsigned(b.fibers.size());
  const unsigned wg = f.linear / 128, t = f.linear % 128;
  if (threads < 128 * (wg + 1)) {
    fault(std::string(op) + ": warpgroup " + std::to_string(wg) + " is incomplete (" + std::to_string(threads) +
          " threads per block); .sync.aligned needs all 128 of its threads");
  }
  install_describe();
  Warpgroup& g = b.warpgroups[wg];
  g.key[t] = key;
  g.ptr[t] = mine;
  if (++g.arrived == 128) {
    for (unsigned i = 0; i < 128; ++i) {
      if (g.key[i] != key) {
        char buf[160];
        std::snprintf(buf, sizeof buf, ": not uniform over warpgroup %u (thread %u passed %#llx, thread %u %#llx)", wg,
                      wg * 128 + i, (unsigned long long)g.key[i], f.linear, (unsigned long long)key);
        fault(std::string(op) + buf);
      }
    }
    g.arrived = 0;
    g.generation++;
    last(g.ptr);
    wake_waiters(b, &g);
    return;
  }
  const uint64_t gen = g.generation;
  wait_on(&g, [&] { return g.generation != gen; });
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 N: no register file to resize; checked uniform and in
// range (24..256, a multiple of 8).
inline void setmaxnreg(bool inc, unsigned n) {
  if (n < 24 || n > 256 || n % 8 != 0) fault("setmaxnreg: " + std::to_string(n) + " registers (24..256, multiple of 8)");
  warpgroup_collective("setmaxnreg", (uint64_t(inc) << 32) | n | (uint64_t(0x5e7) << 40), nullptr, [](void**) {});
}

// ---- TMA ----------------------------------------------------------------------------------------
// The emulator's tensor map (the 128 bytes of a CUtensorMap kernel parameter), written by
// moekit_cuda::emu::TensorMapSpec::encode on the host (keep both in step):
//   word 0: kTmapMagic;  word 1: global address;
//   word 2: rank (bits 0-7), element bytes (8-15), swizzle bytes 0/32/64/128 (16-23),
//           interleave (24-31, 0 = none), oob fill (32-39, 0 = zeros);
//   words 3-7: global dims 0..4 (elements);  words 8-11: byte strides of dims 1..4;
//   word 12: box dims 0..3 (16 bits each);  word 13: box dim 4 (bits 0-15), element strides
//   0..4 (8 bits each from bit 16).
constexpr uint64_t kTmapMagic = 0x4d4f454b544d4150ull;  // "MOEKTMAP"

struct Tmap {
  uint64_t addr;
  unsigned rank, elem, swizzle;
  uint64_t dims[5], strides[5];
  unsigned box[5];
};
inline Tmap tmap_decode(const void* p, const char* op) {
  uint64_t w[16];
  std::memcpy(w, p, sizeof w);
  if (w[0] != kTmapMagic) {
    fault(std::string(op) + ": not an emulator tensor map (encode it with moekit_cuda::emu::TensorMapSpec for the "
                            "emulator, not with cuTensorMapEncodeTiled)");
  }
  Tmap m{};
  m.addr = w[1];
  m.rank = unsigned(w[2] & 0xff);
  m.elem = unsigned((w[2] >> 8) & 0xff);
  m.swizzle = unsigned((w[2] >> 16) & 0xff);
  if (m.rank < 1 || m.rank > 5 || ((w[2] >> 24) & 0xffff) != 0) fault(std::string(op) + ": malformed tensor map");
  for (unsigned i = 0; i < 5; ++i) {
    m.dims[i] = w[3 + i];
    m.strides[i] = i == 0 ? m.elem : w[7 + i];
    m.box[i] = unsigned(i < 4 ? (w[12] >> (16 * i)) & 0xffff : w[13] & 0xffff);
  }
  return m;
}
// The swizzled position of shared address `a` under a swizzle of `bytes` (0: none).
inline size_t swizzle(size_t a, unsigned bytes) {
  const size_t mask = bytes == 128 ? 7 : bytes == 64 ? 3 : bytes == 32 ? 1 : 0;
  return a ^ (((a >> 7) & mask) << 4);
}

// Checks a new TMA write of [lo, hi) of block `b`'s shared memory against the uncompleted
// wgmma reads of its warpgroups.
inline void check_tma_write(Block& b, size_t lo, size_t hi, const char* op) {
  auto overlaps = [&](const AsyncOp& o) { return (lo < o.hi && o.lo < hi) || (lo < o.hi2 && o.lo2 < hi); };
  for (size_t g = 0; g < b.warpgroups.size(); ++g) {
    bool hit = false;
    for (const auto& o : b.warpgroups[g].uncommitted) hit = hit || overlaps(o);
    for (const auto& grp : b.warpgroups[g].groups) {
      for (const auto& o : grp) hit = hit || overlaps(o);
    }
    if (hit) {
      fault(std::string(op) + " into shared addresses [" + std::to_string(lo) + ", " + std::to_string(hi) +
            ") that an uncompleted wgmma of warpgroup " + std::to_string(g) +
            (&b == &block() ? std::string() : " of CTA rank " + std::to_string(b.rank)) +
            " still reads: the stage was released before wgmma.wait_group");
    }
  }
}

// fence.proxy.async.shared::cta: the generic proxy's shared-memory writes so far become visible
// to the async proxy (a model: every thread's writes, not only the fencing thread's).
inline void fence_proxy_async() {
  Block& b = block();
  if (b.smem_bytes) std::memcpy(b.async_view.data(), b.smem + kSmemGuard, b.smem_bytes);
}
// An async-proxy read of shared [lo, hi) by `op`: bytes the generic proxy wrote after the last
// fence.proxy.async (so the async view differs) are a fault: the hardware may read either.
inline void check_async_view(size_t lo, size_t hi, const char* op) {
  Block& b = block();
  if (hi > b.smem_bytes || lo >= hi) return;
  if (std::memcmp(b.async_view.data() + lo, b.smem + kSmemGuard + lo, hi - lo) != 0) {
    fault(std::string(op) + " reads shared addresses [" + std::to_string(lo) + ", " + std::to_string(hi) +
          ") written by st.shared after the last fence.proxy.async: fence the writes (and synchronise the "
          "writing threads) before an async-proxy read");
  }
}

// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes[.multicast::cluster]
// [dst], [map, {c0, ..}], [bar](, mask): issues the transfer of one box into the caller's CTA
// (`mask` 0) or, multicast, into every CTA of the cluster whose rank bit is set in `mask`, each
// at the same shared address and completing bytes on its own barrier at `bar`'s shared
// address; performed later (see the header), queued in each destination CTA.
inline void tma_load(void* dst, const void* map, uint64_t* bar, const int* coords, unsigned rank, unsigned mask = 0) {
  const char* op = mask ? "cp.async.bulk.tensor (multicast::cluster)" : "cp.async.bulk.tensor";
  const Tmap m = tmap_decode(map, op);
  if (m.rank != rank) {
    fault(std::string(op) + "." + std::to_string(rank) + "d with a rank-" + std::to_string(m.rank) + " tensor map");
  }
  size_t box_elems = 1;
  for (unsigned i = 0; i < rank; ++i) box_elems *= m.box[i];
  const size_t bytes = box_elems * m.elem;
  const int64_t lo = smem_offset(dst, bytes);
  if (lo < 0) fault(std::string(op) + ": the box does not fit in the block's dynamic shared memory at dst");
  const size_t align = m.swizzle ? 8 * size_t(m.swizzle) : 128;
  if (size_t(lo) % align != 0) {
    fault(std::string(op) + ": dst (shared address " + std::to_string(lo) + ") not " + std::to_string(align) +
          "-byte aligned (" + (m.swizzle ? "the swizzle atom" : "128 bytes") + ")");
  }
  const int64_t bar_off = smem_offset(bar, 8);
  if (bar_off < 0) fault(std::string(op) + ": the mbarrier is not in the block's dynamic shared memory");
  if (mask >> cluster_size()) {
    fault(std::string(op) + ": ctaMask " + std::to_string(mask) + " names CTAs outside the cluster of " +
          std::to_string(cluster_size()));
  }
  install_describe();
  int c[5] = {0, 0, 0, 0, 0};
  for (unsigned i = 0; i < rank; ++i) c[i] = coords[i];
  const unsigned targets = mask ? mask : 1u << block().rank;
  for (unsigned r = 0; r < cluster_size(); ++r) {
    if (!(targets >> r & 1u)) continue;
    Block* to = &cluster_block(r, op);
    if (to != &block()) to->peer_access_gen = int64_t(block().cluster->generation);
    uint64_t* to_bar = reinterpret_cast<uint64_t*>(to->smem + kSmemGuard + bar_off);
    mbar_load(*to, to_bar, op);  // initialised
    check_tma_write(*to, size_t(lo), size_t(lo) + bytes, op);
    unsigned char* base = to->smem + kSmemGuard;  // shared address 0 of the destination
    AsyncOp a;
    a.bar = to_bar;
    a.lo = size_t(lo);
    a.hi = size_t(lo) + bytes;
    a.perform = [m, c, base, lo, bytes, to_bar, to]() {
      unsigned j[5] = {0, 0, 0, 0, 0};
      for (size_t e = 0; e < bytes / m.elem; ++e) {
        // Element e of the box: j[0] fastest.
        size_t rest = e;
        bool in = true;
        int64_t off = 0;
        for (unsigned i = 0; i < m.rank; ++i) {
          j[i] = unsigned(rest % m.box[i]);
          rest /= m.box[i];
          const int64_t g = int64_t(c[i]) + j[i];
          in = in && g >= 0 && uint64_t(g) < m.dims[i];
          off += g * int64_t(m.strides[i]);
        }
        const size_t s = swizzle(size_t(lo) + e * m.elem, m.swizzle);
        if (in) {
          std::memcpy(base + s, reinterpret_cast<const unsigned char*>(m.addr) + off, m.elem);
        } else {
          std::memset(base + s, 0, m.elem);
        }
      }
      // The async proxy wrote it: both views hold the box (the swizzle stays inside it).
      std::memcpy(to->async_view.data() + lo, base + lo, bytes);
      mbar_complete_tx(*to, to_bar, uint32_t(bytes));
    };
    to->tma.push_back(std::move(a));
  }
}

// cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group [map, {c0, ..}], [src]: queues the
// store of one box in the calling thread's open bulk async-group. The emulation reads the
// shared source (through the map's swizzle) and writes global memory at the
// cp.async.bulk.wait_group that completes the group (or when the thread exits); a source
// rewritten between the issue and that wait is a fault (smem reused before wait_group).
// Out-of-bounds elements are not written.
inline void tma_store(const void* map, const void* src, const int* coords, unsigned rank) {
  const char* op = "cp.async.bulk.tensor (store)";
  const Tmap m = tmap_decode(map, op);
  if (m.rank != rank) {
    fault(std::string(op) + "." + std::to_string(rank) + "d with a rank-" + std::to_string(m.rank) + " tensor map");
  }
  size_t box_elems = 1;
  for (unsigned i = 0; i < rank; ++i) box_elems *= m.box[i];
  const size_t bytes = box_elems * m.elem;
  const int64_t lo = smem_offset(src, bytes);
  if (lo < 0) fault(std::string(op) + ": the box does not fit in the block's dynamic shared memory at src");
  const size_t align = m.swizzle ? 8 * size_t(m.swizzle) : 128;
  if (size_t(lo) % align != 0) fault(std::string(op) + ": src not " + std::to_string(align) + "-byte aligned");
  int c[5] = {0, 0, 0, 0, 0};
  for (unsigned i = 0; i < rank; ++i) c[i] = coords[i];
  const unsigned char* base = static_cast<const unsigned char*>(src) - lo;
  AsyncOp a;
  a.lo = size_t(lo);
  a.hi = size_t(lo) + bytes;
  // The source as it is at the issue (the threads' writes fenced and synchronised before it):
  // compared with shared memory when the group completes, so a source rewritten before
  // cp.async.bulk.wait_group (a race on the hardware: the TMA unit may read either) fails the
  // launch instead of storing whichever bytes the emulated schedule happened to leave.
  check_async_view(size_t(lo), size_t(lo) + bytes, op);
  std::vector<unsigned char> issued(base + lo, base + lo + bytes);
  a.perform = [m, c, base, lo, bytes, issued, op]() {
    if (std::memcmp(issued.data(), base + lo, bytes) != 0) {
      fault(std::string(op) + ": its shared source [" + std::to_string(lo) + ", " + std::to_string(lo + int64_t(bytes)) +
            ") was rewritten before the cp.async.bulk.wait_group that completes the store");
    }
    for (size_t e = 0; e < bytes / m.elem; ++e) {
      size_t rest = e;
      bool in = true;
      int64_t off = 0;
      for (unsigned i = 0; i < m.rank; ++i) {
        const int64_t g = int64_t(c[i]) + int64_t(rest % m.box[i]);
        rest /= m.box[i];
        in = in && g >= 0 && uint64_t(g) < m.dims[i];
        off += g * int64_t(m.strides[i]);
      }
      if (in) {
        std::memcpy(reinterpret_cast<unsigned char*>(m.addr) + off, base + swizzle(size_t(lo) + e * m.elem, m.swizzle),
                    m.elem);
      }
    }
  };
  fiber().bulk_open.push_back(std::move(a));
}
inline void bulk_commit() {
  Fiber& f = fiber();
  f.bulk_groups.push_back(std::move(f.bulk_open));
  f.bulk_open.clear();
}
// cp.async.bulk.wait_group[.read] N: the calling thread's oldest groups complete until at
// most N are pending (.read only promises the sources are read; the emulation completes both).
inline void bulk_wait(int n) {
  Fiber& f = fiber();
  while (f.bulk_groups.size() > size_t(n)) {
    for (auto& o : f.bulk_groups.front()) o.perform();
    f.bulk_groups.pop_front();
  }
}

// ---- wgmma ------------------------------------------------------------------------------------------
struct Desc {
  size_t start, lbo, sbo;
  unsigned base_offset, swizzle;  // swizzle in bytes (0, 32, 64, 128)
};
inline Desc desc_decode(uint64_t d, const char* op) {
  Desc r;
  r.start = size_t(d & 0x3fff) << 4;
  r.lbo = size_t((d >> 16) & 0x3fff) << 4;
  r.sbo = size_t((d >> 32) & 0x3fff) << 4;
  r.base_offset = unsigned((d >> 49) & 7);
  const unsigned mode = unsigned(d >> 62);
  r.swizzle = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  if (r.base_offset != 0) fault(std::string(op) + ": descriptor base offset != 0 is not modelled");
  if (r.swizzle && (r.start % (8 * r.swizzle)) >= r.swizzle) {
    fault(std::string(op) + ": descriptor start address " + std::to_string(r.start) +
          " not in the first row of a swizzle atom (not modelled)");
  }
  return r;
}
// Shared address of byte `kb` (< 32) of row `r` of a K-major operand.
inline size_t desc_addr(const Desc& d, unsigned r, unsigned kb) {
  if (d.swizzle == 0) return d.start + (r / 8) * d.sbo + (r % 8) * 16 + (kb / 16) * d.lbo + kb % 16;
  return swizzle(d.start + (r / 8) * d.sbo + (r % 8) * d.swizzle + kb, d.swizzle);
}
// Shared address of element (row `r` along M or N, `k`) of an MN-major operand whose elements
// are `esz` bytes: PTX ISA canonical MN-major layouts, T = 16 / esz elements,
//   none: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO));  swizzle W bytes: ((T,W/16,m),(8,k)):((1,T,LBO),(W/16 T,SBO)).
inline size_t desc_addr_mn(const Desc& d, unsigned r, unsigned k, unsigned esz) {
  const size_t mb = size_t(r) * esz;  // byte offset along MN
  if (d.swizzle == 0) return d.start + mb % 16 + (mb / 16) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
  const size_t w = d.swizzle;
  return swizzle(d.start + mb % w + (mb / w) * d.lbo + (k % 8) * w + (k / 8) * d.sbo, d.swizzle);
}
// Element (r, k) of an operand, K-major or MN-major (`mn`).
inline size_t desc_elem(const Desc& d, bool mn, unsigned r, unsigned k, unsigned esz) {
  return mn ? desc_addr_mn(d, r, k, esz) : desc_addr(d, r, k * esz);
}
inline float bf16_value(const unsigned char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t x = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
// E4M3 (OCP FP8): bias 7, subnormals, S.1111.111 is NaN, no infinities.
inline float e4m3_value(unsigned char v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  float f;
  if (e == 15 && m == 7) {
    f = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    f = std::ldexp(float(m), -9);
  } else {
    f = std::ldexp(float(8 + m), e - 10);
  }
  return s ? -f : f;
}

enum class Kind : unsigned { Bf16 = 1, E4m3 = 2 };

// wgmma.mma_async.sync.aligned.m64nNk{16,32}.f32.{bf16,e4m3} d, desc_a, desc_b, scale_d (imm
// scales 1; imm-trans-a / imm-trans-b `trans_a` / `trans_b`: 0 K-major, 1 MN-major, BF16
// only). Collective; queued in the warpgroup's open group.
template <int N>
inline void wgmma(float* d, uint64_t desc_a, uint64_t desc_b, bool scale_d, Kind kind, bool trans_a = false,
                  bool trans_b = false) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  const char* op = "wgmma.mma_async";
  if (kind == Kind::E4m3 && (trans_a || trans_b)) {
    fault(std::string(op) + ": imm-trans-a/b must be 0 for .e4m3 (K-major operands only)");
  }
  const uint64_t key = desc_a * 0x9E3779B97F4A7C15ull ^ desc_b ^ (uint64_t(scale_d) << 63) ^ (uint64_t(kind) << 60) ^
                       (uint64_t(N) << 48) ^ (uint64_t(trans_a) << 58) ^ (uint64_t(trans_b) << 57);
  warpgroup_collective(op, key, d, [&](void** ptrs) {
    Block& b = block();
    Warpgroup& g = b.warpgroups[fiber().linear / 128];
    if (!g.fenced) {
      fault(std::string(op) + " without wgmma.fence since the warpgroup's accumulators were last accessible "
                              "(the first wgmma, or the first after wgmma.wait_group)");
    }
    const Desc da = desc_decode(desc_a, op), db = desc_decode(desc_b, op);
    const unsigned kbytes = 32;  // k16 BF16, k32 E4M3: 32 bytes of K per row
    const unsigned esz = kind == Kind::Bf16 ? 2 : 1;
    // Shared ranges read: validated here, checked against TMA loads in flight. Both layouts
    // are made of 16-byte chunks: along K (K-major) or along MN (MN-major, BF16: 8 rows).
    auto range = [&](const Desc& ds, bool mn, unsigned rows, size_t& lo, size_t& hi) {
      lo = SIZE_MAX;
      hi = 0;
      for (unsigned r = 0; r < rows; r += mn ? 16 / esz : 1) {
        for (unsigned k = 0; k < kbytes / esz; k += mn ? 1 : 16 / esz) {
          const size_t a = desc_elem(ds, mn, r, k, esz);
          lo = std::min(lo, a);
          hi = std::max(hi, a + 16);
        }
      }
      if (hi > b.smem_bytes) fault(std::string(op) + ": descriptor reaches past the block's dynamic shared memory");
    };
    AsyncOp o;
    range(da, trans_a, 64, o.lo, o.hi);
    range(db, trans_b, N, o.lo2, o.hi2);
    check_async_view(o.lo, o.hi, op);
    check_async_view(o.lo2, o.hi2, op);
    for (const auto& t : b.tma) {
      if ((o.lo < t.hi && t.lo < o.hi) || (o.lo2 < t.hi && t.lo < o.hi2)) {
        fault(std::string(op) + " reads shared addresses [" + std::to_string(t.lo) + ", " + std::to_string(t.hi) +
              ") that a TMA load has not written yet: wait on the load's mbarrier (phase parity) first");
      }
    }
    float* dst[128];
    for (int t = 0; t < 128; ++t) dst[t] = static_cast<float*>(ptrs[t]);
    const unsigned char* base = b.smem + kSmemGuard;
    o.perform = [da, db, kind, scale_d, base, trans_a, trans_b, dst_copy = std::vector<float*>(dst, dst + 128)]() {
      const unsigned kk = kind == Kind::Bf16 ? 16 : 32;
      const unsigned esz = kind == Kind::Bf16 ? 2 : 1;
      std::vector<float> A(64 * kk), B(kk * unsigned(N));
      auto load = [&](const Desc& ds, bool mn, unsigned rows, std::vector<float>& out) {
        for (unsigned r = 0; r < rows; ++r) {
          for (unsigned k = 0; k < kk; ++k) {
            const unsigned char* p = base + desc_elem(ds, mn, r, k, esz);
            out[r * kk + k] = kind == Kind::Bf16 ? bf16_value(p) : e4m3_value(*p);
          }
        }
      };
      load(da, trans_a, 64, A);
      load(db, trans_b, N, B);
      for (unsigned t = 0; t < 128; ++t) {
        const unsigned w = t / 32, l = t % 32;
        float* d = dst_copy[t];
        for (unsigned i = 0; i < unsigned(N) / 2; ++i) {
          const unsigned j = i / 4, h = (i / 2) % 2, e = i % 2;
          const unsigned row = 16 * w + l / 4 + 8 * h, col = 8 * j + 2 * (l % 4) + e;
          float acc = scale_d ? d[i] : 0.0f;
          for (unsigned k = 0; k < kk; ++k) acc = std::fma(A[row * kk + k], B[col * kk + k], acc);
          d[i] = acc;
        }
      }
    };
    g.uncommitted.push_back(std::move(o));
  });
}

inline void wgmma_fence() {
  warpgroup_collective("wgmma.fence", 0xfe0ull << 40, nullptr, [](void**) {
    block().warpgroups[fiber().linear / 128].fenced = true;
  });
}
inline void wgmma_commit() {
  warpgroup_collective("wgmma.commit_group", 0xc0ull << 40, nullptr, [](void**) {
    Warpgroup& g = block().warpgroups[fiber().linear / 128];
    g.groups.push_back(std::move(g.uncommitted));
    g.uncommitted.clear();
  });
}
// wgmma.wait_group N: completes the oldest groups until at most N are pending (their reads of
// shared memory and their accumulator writes happen here).
inline void wgmma_wait(int n) {
  warpgroup_collective("wgmma.wait_group", (0xa17ull << 40) | unsigned(n), nullptr, [n](void**) {
    Warpgroup& g = block().warpgroups[fiber().linear / 128];
    while (g.groups.size() > size_t(n)) {
      for (auto& o : g.groups.front()) o.perform();
      g.groups.pop_front();
    }
    g.fenced = false;
  });
}

}  // namespace sm90
}  // namespace emu
}  // namespace moekit

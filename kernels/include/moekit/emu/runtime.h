// moekit host emulation of the CUDA execution model: the scheduler.
//
// Each CUDA thread of a block is a fiber (ucontext) with its own stack; the fibers of one
// block run on one OS thread, cooperatively, in a fixed round-robin order: a fiber runs until
// it waits (barrier, warp exchange) or exits. Blocks are handed to a pool of worker OS
// threads in a chosen order (in order, reversed, shuffled by seed), so blocks run
// concurrently with each other and atomics are real atomics.
//
// Why fibers: the schedule is deterministic, so a missing __syncthreads makes the reading
// thread see the other thread's *old* data on every run (a test fails every time, not once
// in a while), and 256-thread blocks cost context switches of a few hundred nanoseconds,
// not OS thread wake-ups.
//
// Checks made here: a barrier that some live threads never reach (deadlock) and writes
// outside the dynamic shared memory of a block (guard zones) fail the launch with a message;
// so does any misuse an emulated instruction detects (`fault`, e.g. a non-uniform
// warpgroup collective).
//
// Hopper's asynchronous units (moekit/emu/sm90.h) keep their state here: mbarrier waiters
// (a fiber blocked on a phase sleeps until the phase completes), named barriers, warpgroup
// collectives, TMA transfers not yet performed and each warpgroup's wgmma groups.
//
// Thread block clusters (a kernel declared with __cluster_dims__(C, 1, 1)): the C blocks of a
// cluster run at the same time, each on its own worker OS thread (so static __shared__,
// thread_local per OS thread, stays per block), and take turns: one turn is one round of a
// block's fibers, ranks in order, exactly one OS thread running at any time (a baton under a
// mutex), so the schedule stays deterministic. A block of rank r > 0 starts only once every
// lower rank has run until none of its threads could go on (the hardware co-schedules a
// cluster's CTAs but may start them skewed: a CTA that touches a peer's barriers before the
// peer initialised them - no barrier.cluster in between - meets them uninitialised here).
// A block whose threads have all exited is gone: a peer that still arrives on its barriers or
// multicasts into its shared memory fails the launch. A cluster deadlocks when a whole cycle
// of turns makes no progress and no TMA transfer is pending in any of its blocks.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "moekit/abi.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define MOEKIT_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define MOEKIT_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define MOEKIT_EMU_POISON(p, n) ((void)(p), (void)(n))
#define MOEKIT_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace moekit {
namespace emu {

// Bytes of guard before and after each block's dynamic shared memory.
constexpr size_t kSmemGuard = 256;
// Alignment of each block's dynamic shared memory in host memory: the swizzle patterns of
// TMA and wgmma are functions of shared-memory address bits 4-9, so the host address bits of
// a 1024-aligned base agree with the shared-memory offsets (what the emulation calls the
// shared address of a byte: its offset from the dynamic shared memory).
constexpr size_t kSmemAlign = 1024;
// The guard and fresh-shared-memory fill byte (uninitialised shared memory reads as NaN).
constexpr unsigned char kPoison = 0xFF;

struct Block;

// A fiber stack from mmap with an inaccessible page below it: an overflow faults (the test
// process dies with SIGSEGV) instead of overwriting other memory.
class Stack {
 public:
  Stack() = default;
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  Stack(Stack&& o) noexcept : base_(o.base_), size_(o.size_) { o.base_ = nullptr; o.size_ = 0; }
  Stack& operator=(Stack&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~Stack() { release(); }
  // Makes a stack of at least `bytes` usable bytes; false when the memory is not available.
  bool reserve(size_t bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t usable = (bytes + page - 1) / page * page;
    if (base_ && size_ == usable + page) return true;
    release();
    void* m = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, page, PROT_NONE);  // stacks grow down: the guard is the lowest page
    base_ = static_cast<unsigned char*>(m);
    size_ = usable + page;
    return true;
  }
  unsigned char* usable() const { return base_ + size_t(sysconf(_SC_PAGESIZE)); }
  size_t usable_size() const { return size_ - size_t(sysconf(_SC_PAGESIZE)); }

 private:
  void release() {
    if (base_) munmap(base_, size_);
    base_ = nullptr;
    size_ = 0;
  }
  unsigned char* base_ = nullptr;
  size_t size_ = 0;
};

// An asynchronous operation not yet performed: a TMA transfer (writes `[lo, hi)` of shared
// memory, then completes bytes on `bar`) or a wgmma (reads `[lo, hi)` and `[lo2, hi2)`).
struct AsyncOp {
  uint64_t* bar = nullptr;
  size_t lo = 0, hi = 0, lo2 = 0, hi2 = 0;  // shared addresses (offsets into dynamic smem)
  std::function<void()> perform;
};

struct Fiber {
  ucontext_t ctx{};
  Stack stack;
  unsigned lane = 0, warp = 0, linear = 0;
  uint3 tid{0, 0, 0};
  enum State { Ready, Waiting, Done } state = Ready;
  // What a Waiting fiber waits on when it is not a __syncthreads or a warp exchange: an
  // mbarrier, a named barrier or a warpgroup collective (woken only when that completes).
  const void* wait_obj = nullptr;
  uint32_t wait_parity = 0;  // mbarrier waits: the phase parity waited for
  // This thread's bulk async-groups (TMA stores): uncommitted, then committed and not waited.
  std::vector<AsyncOp> bulk_open;
  std::deque<std::vector<AsyncOp>> bulk_groups;
  // barrier.cluster: arrived in the phase `cluster_gen` and not yet waited.
  bool cluster_arrived = false;
  uint64_t cluster_gen = 0;
};

// A named barrier (bar.sync / bar.arrive with a thread count); id 0 is __syncthreads.
struct NamedBarrier {
  unsigned arrived = 0, expected = 0;
  uint64_t generation = 0;
};

// One warpgroup (4 consecutive warps, 128 threads): its collectives and wgmma state.
struct Warpgroup {
  unsigned arrived = 0;
  uint64_t generation = 0;
  uint64_t key[128] = {};  // what each thread passed to the current collective
  void* ptr[128] = {};     // each thread's operand (e.g. its accumulator registers)
  bool fenced = false;     // wgmma.fence since the accumulators were last accessible
  std::vector<AsyncOp> uncommitted;          // wgmma.mma_async since the last commit_group
  std::deque<std::vector<AsyncOp>> groups;   // committed, not yet waited for
};

// Per-warp exchange state for shuffles, votes and __syncwarp.
struct Warp {
  unsigned arrived = 0;  // lanes that reached the current exchange
  unsigned departed = 0;  // lanes that finished reading it
  unsigned live = 0;      // lanes that have not exited
  unsigned converged = 0; // lanes live at the last completed warp-wide rendezvous (__activemask)
  unsigned wait_mask[32] = {};  // the mask each waiting lane passed
  uint64_t slot[32] = {};
};

struct Cluster;

struct Block {
  uint3 idx{0, 0, 0};
  Cluster* cluster = nullptr;  // the block's cluster (a cluster of one without __cluster_dims__)
  unsigned rank = 0;           // %cluster_ctarank
  bool exited = false;         // every thread has exited: peers may no longer touch it
  // The cluster barrier's generation at the last access to this block's shared memory by a
  // peer (-1: none), and the highest generation a thread of this block saw complete in a
  // barrier.cluster wait: a peer's access must be ordered before the exit by such a phase.
  int64_t peer_access_gen = -1;
  uint64_t cluster_waited = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned live = 0;          // threads that have not exited
  unsigned at_barrier = 0;    // threads waiting in __syncthreads
  std::vector<unsigned char> smem_storage;  // kSmemAlign bytes of slack for alignment
  unsigned char* smem = nullptr;            // guard | dynamic shared memory (kSmemAlign-aligned) | guard
  size_t smem_bytes = 0;
  size_t smem_span() const { return 2 * kSmemGuard + smem_bytes; }
  uint64_t spin_pauses = 0;  // spin_pause() calls in this block
  std::string fault;         // set by an emulated instruction that detected misuse
  NamedBarrier named[16];
  std::vector<Warpgroup> warpgroups;
  std::deque<AsyncOp> tma;   // TMA transfers issued, not yet performed
  // Dynamic shared memory as the async proxy (wgmma, TMA stores) sees it: refreshed by
  // fence.proxy.async and written by TMA loads (see sm90.h: a read that differs from the
  // generic view is a write without the fence).
  std::vector<unsigned char> async_view;
  bool restart = false;      // start the next round at thread 0 (see sm90.h: mbar_arrive)
  bool end_turn = false;     // end this block's turn: a peer's threads were released (clusters)
  bool again = false;        // the last round ended on `restart`: run another in this turn
  bool spun = false;         // the running fiber's last yield was a spin_pause
  bool real_progress = false;  // the last round ran a fiber that did more than spin
  // Describes the mbarrier / named barrier / warpgroup waits of a deadlock (set by sm90.h).
  std::string (*describe_wait)(const Block&) = nullptr;
};

// A thread block cluster: its blocks by rank and the state of barrier.cluster (all live
// threads of the cluster arrive; a thread that exits no longer holds the barrier back).
struct Cluster {
  std::vector<Block*> blocks;
  unsigned live = 0;      // threads of the cluster that have not exited
  unsigned arrived = 0;   // live threads arrived in the current phase
  uint64_t generation = 0;
  unsigned size() const { return unsigned(blocks.size()); }
};

// What one worker OS thread is running now.
struct Worker {
  ucontext_t sched{};
  Block* block = nullptr;
  Fiber* current = nullptr;
  void (*run)(void*) = nullptr;  // calls the kernel with its arguments
  void* run_arg = nullptr;
  uint3 grid{1, 1, 1};
  uint3 block_dim{1, 1, 1};
};

inline thread_local Worker* tl_worker = nullptr;

inline Worker& worker() { return *tl_worker; }
inline Fiber& fiber() { return *tl_worker->current; }
inline Block& block() { return *tl_worker->block; }

// Switches from the running fiber back to the scheduler.
inline void yield_to_scheduler() {
  Worker& w = worker();
  swapcontext(&w.current->ctx, &w.sched);
}

// Marks the fibers of `lanes` in warp `warp` that are waiting as ready.
inline void wake_lanes(Block& b, unsigned warp, unsigned lanes) {
  for (unsigned l = 0; l < 32; ++l) {
    unsigned i = warp * 32 + l;
    if ((lanes >> l & 1u) && i < b.fibers.size() && b.fibers[i].state == Fiber::Waiting) {
      b.fibers[i].state = Fiber::Ready;
    }
  }
}

// One phase of a warp-level rendezvous among the live lanes of `mask`: returns once all of
// them have called it with the same `phase` bit set (`Warp::arrived` or `Warp::departed`).
inline void warp_rendezvous(unsigned mask, unsigned Warp::*phase) {
  Block& b = block();
  Fiber& f = fiber();
  Warp& w = b.warps[f.warp];
  const unsigned need = mask & w.live;
  const unsigned me = 1u << f.lane;
  w.*phase |= me;
  w.wait_mask[f.lane] = mask;
  if ((w.*phase & need) == need) {
    w.*phase &= ~need;
    w.converged = w.live;
    wake_lanes(b, f.warp, need & ~me);
    return;
  }
  f.state = Fiber::Waiting;
  yield_to_scheduler();
}

// Exchanges one 64-bit value among the lanes of `mask`; `read(slots)` runs between the two
// phases, when every participant's value is in place and none has moved on.
template <typename Read>
inline auto warp_exchange(unsigned mask, uint64_t value, Read read) {
  Block& b = block();
  Fiber& f = fiber();
  Warp& w = b.warps[f.warp];
  w.slot[f.lane] = value;
  warp_rendezvous(mask, &Warp::arrived);
  auto result = read(w.slot, mask & w.live);
  warp_rendezvous(mask, &Warp::departed);
  return result;
}

// Performs every bulk async-group of `f` (committed or not), oldest first.
inline void perform_bulk_groups(Fiber& f) {
  while (!f.bulk_groups.empty()) {
    for (auto& op : f.bulk_groups.front()) op.perform();
    f.bulk_groups.pop_front();
  }
  for (auto& op : f.bulk_open) op.perform();
  f.bulk_open.clear();
}

// Spin-wait pause: lets the other threads of the block run. A block whose threads pause this
// often is waiting for something that never comes (e.g. a later block while every worker is
// busy): its spinning threads are parked, and the launch reports it instead of hanging.
constexpr uint64_t kMaxSpinPauses = 4'000'000;
inline void spin_pause() {
  Block& b = block();
  if (++b.spin_pauses > kMaxSpinPauses) fiber().state = Fiber::Waiting;
  b.spun = true;
  yield_to_scheduler();
}

// Fails the launch with `msg` (the first fault of a block wins); the calling thread never
// resumes (its block is abandoned, like every failed block).
inline void fault(const std::string& msg) {
  Block& b = block();
  if (worker().current == nullptr) {
    // Raised while the scheduler itself completes an asynchronous operation.
    throw std::runtime_error("block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) + "," +
                             std::to_string(b.idx.z) + "): " + msg);
  }
  Fiber& f = fiber();
  if (b.fault.empty()) {
    b.fault = "thread " + std::to_string(f.linear) + ": " + msg;
  }
  for (;;) {
    f.state = Fiber::Waiting;
    f.wait_obj = &b.fault;
    yield_to_scheduler();
  }
}

// Wakes every fiber waiting on `obj` (an mbarrier, named barrier or warpgroup).
inline void wake_waiters(Block& b, const void* obj) {
  for (auto& f : b.fibers) {
    if (f.state == Fiber::Waiting && f.wait_obj == obj) {
      f.state = Fiber::Ready;
      f.wait_obj = nullptr;
    }
  }
}

// Blocks the calling fiber until `done()` holds; it is woken when `obj` completes something.
template <typename Done>
inline void wait_on(const void* obj, Done done, uint32_t parity = 0) {
  Fiber& f = fiber();
  while (!done()) {
    f.state = Fiber::Waiting;
    f.wait_obj = obj;
    f.wait_parity = parity;
    yield_to_scheduler();
  }
}

// The shared address of `p` (its offset in the block's dynamic shared memory), or -1 when
// `p` (and `bytes` after it) is not inside it.
inline int64_t smem_offset(const void* p, size_t bytes = 1) {
  Block& b = block();
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = b.smem + kSmemGuard;
  if (c < base || c + bytes > base + b.smem_bytes) return -1;
  return int64_t(c - base);
}

inline void syncthreads() {
  Block& b = block();
  b.at_barrier++;
  if (b.at_barrier == b.live) {
    b.at_barrier = 0;
    for (auto& other : b.fibers) {
      if (other.state == Fiber::Waiting) other.state = Fiber::Ready;
    }
    return;
  }
  fiber().state = Fiber::Waiting;
  yield_to_scheduler();
}

inline void perform_bulk_groups(Fiber& f);

// Completes the current phase of barrier.cluster: every waiting thread of the cluster resumes.
inline void cluster_complete(Cluster& c) {
  c.arrived = 0;
  c.generation++;
  for (Block* b : c.blocks) {
    if (b) wake_waiters(*b, &c);
  }
}

inline void fiber_main() {
  Worker& w = worker();
  w.run(w.run_arg);
  perform_bulk_groups(*w.current);  // TMA stores in flight land before the thread is gone
  Block& b = *w.block;
  Fiber& f = *w.current;
  f.state = Fiber::Done;
  b.live--;
  b.warps[f.warp].live &= ~(1u << f.lane);
  // barrier.cluster: an exiting thread's arrival is withdrawn with the thread; the phase
  // completes if the exiting thread was the only one holding it back.
  if (Cluster* c = b.cluster) {
    c->live--;
    if (f.cluster_arrived && f.cluster_gen == c->generation) c->arrived--;
    if (c->arrived > 0 && c->arrived == c->live) cluster_complete(*c);
  }
  // An exiting thread no longer holds back a barrier or a warp exchange.
  if (b.at_barrier > 0 && b.at_barrier == b.live) {
    b.at_barrier = 0;
    for (auto& other : b.fibers) {
      if (other.state == Fiber::Waiting) other.state = Fiber::Ready;
    }
  }
  // Each group of lanes waiting in a warp exchange is complete once its remaining live
  // lanes have all arrived (an exited lane named in the mask is not waited for).
  Warp& wp = b.warps[f.warp];
  for (unsigned Warp::*phase : {&Warp::arrived, &Warp::departed}) {
    for (unsigned l = 0; l < 32; ++l) {
      if (!(wp.*phase >> l & 1u)) continue;
      const unsigned need = wp.wait_mask[l] & wp.live;
      if ((wp.*phase & need) == need) {
        wp.*phase &= ~need;
        wp.converged = wp.live;
        wake_lanes(b, f.warp, need);
      }
    }
  }
  // Returning resumes uc_link, the scheduler.
}

inline std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) + "," + std::to_string(b.idx.z) + ")";
}

// Prepares `b` (its index set) to run on the calling worker: fibers, poisoned shared memory.
// Returns "" or an error message.
inline std::string init_block(Worker& w, Block& b, size_t stack_bytes) {
  const unsigned nthreads = w.block_dim.x * w.block_dim.y * w.block_dim.z;
  b.fibers.resize(nthreads);
  b.warps.assign((nthreads + 31) / 32, Warp{});
  b.live = nthreads;
  b.at_barrier = 0;
  b.spin_pauses = 0;
  b.fault.clear();
  for (auto& nb : b.named) nb = NamedBarrier{};
  b.warpgroups.assign((nthreads + 127) / 128, Warpgroup{});
  b.tma.clear();
  b.restart = false;
  b.end_turn = false;
  b.exited = false;
  b.peer_access_gen = -1;
  b.cluster_waited = 0;
  MOEKIT_EMU_UNPOISON(b.smem, b.smem_span());
  std::memset(b.smem, kPoison, b.smem_span());
  // Under AddressSanitizer the guards are poisoned too: a read past the tile is reported.
  MOEKIT_EMU_POISON(b.smem, kSmemGuard);
  MOEKIT_EMU_POISON(b.smem + kSmemGuard + b.smem_bytes, kSmemGuard);
  b.async_view.assign(b.smem + kSmemGuard, b.smem + kSmemGuard + b.smem_bytes);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.tid = uint3{i % w.block_dim.x, (i / w.block_dim.x) % w.block_dim.y, i / (w.block_dim.x * w.block_dim.y)};
    f.state = Fiber::Ready;
    f.wait_obj = nullptr;
    f.bulk_open.clear();
    f.bulk_groups.clear();
    f.cluster_arrived = false;
    f.cluster_gen = 0;
    if (!f.stack.reserve(stack_bytes)) return "cannot map a " + std::to_string(stack_bytes) + "-byte fiber stack";
    b.warps[f.warp].live |= 1u << f.lane;
    b.warps[f.warp].converged |= 1u << f.lane;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.usable();
    f.ctx.uc_stack.ss_size = f.stack.usable_size();
    f.ctx.uc_link = &w.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  return "";
}

// One round: every ready fiber of `b` runs in thread order until it waits or exits. A fiber
// that completes an mbarrier phase of its own block ends the round (the next starts at thread
// 0); one that releases a peer's threads ends it with `b.end_turn` set. Returns whether any
// fiber ran; a detected misuse is left in `b.fault`.
inline bool run_round(Worker& w, Block& b) {
  w.block = &b;
  bool progressed = false;
  b.again = false;
  b.real_progress = false;
  for (auto& f : b.fibers) {
    if (f.state != Fiber::Ready) continue;
    progressed = true;
    w.current = &f;
    b.spun = false;
    swapcontext(&w.sched, &f.ctx);
    b.real_progress = b.real_progress || !b.spun;
    if (!b.fault.empty()) break;
    if (b.restart) {
      b.restart = false;
      b.again = true;
      break;
    }
    if (b.end_turn) break;
  }
  w.current = nullptr;
  return progressed;
}

// Performs the TMA transfers pending in `b` (as the scheduler: no thread is running).
// Returns whether there were any.
inline bool perform_pending_tma(Worker& w, Block& b) {
  if (b.tma.empty()) return false;
  Block* own = w.block;
  w.block = &b;
  w.current = nullptr;
  while (!b.tma.empty()) {
    AsyncOp op = std::move(b.tma.front());
    b.tma.pop_front();
    op.perform();
  }
  w.block = own;
  return true;
}

// The message for a block none of whose live threads can go on.
inline std::string stuck_message(const Block& b) {
  if (b.spin_pauses > kMaxSpinPauses) {
    return block_name(b) + " spin-waited " + std::to_string(kMaxSpinPauses) +
           " times for something that never happened";
  }
  unsigned waiting = 0;
  for (auto& f : b.fibers) waiting += f.state == Fiber::Waiting;
  std::string msg = "deadlock in " + block_name(b) + ": " + std::to_string(waiting) + " of " + std::to_string(b.live) +
                    " live threads wait at a barrier or warp exchange that the others never reach";
  if (b.describe_wait) msg += b.describe_wait(b);
  return msg;
}

// After the last thread of `b` exited: transfers in flight land, then the block's wgmma groups
// and shared-memory guards are checked. Returns "" or an error message.
inline std::string finish_block(Worker& w, Block& b) {
  perform_pending_tma(w, b);
  for (size_t g = 0; g < b.warpgroups.size(); ++g) {
    if (!b.warpgroups[g].groups.empty() || !b.warpgroups[g].uncommitted.empty()) {
      return block_name(b) + ": warpgroup " + std::to_string(g) +
             " exited with wgmma operations it never waited for (wgmma.wait_group)";
    }
  }
  if (!b.fault.empty()) return block_name(b) + " " + b.fault;
  if (b.peer_access_gen >= 0 && uint64_t(b.peer_access_gen) >= b.cluster_waited) {
    return block_name(b) + " (CTA rank " + std::to_string(b.rank) +
           " of its cluster) exited without a barrier.cluster wait after a peer's last access to its shared memory "
           "(an mbarrier arrival or a multicast): a peer may still access it after the exit";
  }
  MOEKIT_EMU_UNPOISON(b.smem, b.smem_span());
  for (size_t i = 0; i < kSmemGuard; ++i) {
    if (b.smem[i] != kPoison || b.smem[kSmemGuard + b.smem_bytes + i] != kPoison) {
      return block_name(b) + " wrote outside its " + std::to_string(b.smem_bytes) + " bytes of dynamic shared memory";
    }
  }
  return "";
}

// Runs one block (a cluster of one) to completion on the calling worker. Returns "" or an
// error message.
inline std::string run_block(Worker& w, Block& b, size_t stack_bytes) {
  Cluster one;
  one.blocks = {&b};
  b.cluster = &one;
  b.rank = 0;
  struct Detach {
    Block& b;
    ~Detach() { b.cluster = nullptr; }
  } detach{b};
  std::string err = init_block(w, b, stack_bytes);
  if (!err.empty()) return err;
  one.live = b.live;
  for (;;) {
    const bool progressed = run_round(w, b);
    if (!b.fault.empty()) return block_name(b) + " " + b.fault;
    if (b.live == 0) break;
    // Nothing can run: TMA transfers still in flight may complete now (the emulation
    // performs them as late as possible: when waited for, or when nothing else can run).
    if (!progressed && perform_pending_tma(w, b)) {
      if (!b.fault.empty()) return block_name(b) + " " + b.fault;
      continue;
    }
    if (!progressed) return stuck_message(b);
  }
  b.exited = true;
  return finish_block(w, b);
}

// The C worker OS threads that run clusters of C blocks together, one cluster after another,
// taking turns (see the header). Rank 0's thread takes the next cluster of the launch.
struct ClusterGroup {
  std::mutex m;
  std::condition_variable cv;
  uint64_t epoch = 0;   // one per cluster run (and one for the stop)
  int64_t cluster = -1; // the linear cluster id of this epoch; -1: no more
  unsigned ready = 0;   // threads whose block is initialised
  unsigned out = 0;     // threads done with this epoch's cluster
  unsigned turn = 0;    // the rank whose thread runs
  bool over = false;    // the cluster finished or failed
  std::string error;    // the cluster's first failure
  Cluster cl;
  std::vector<char> started, progressed, finished;
  unsigned idle = 0;    // consecutive turns without progress
};

// One turn of rank `r` (its thread holds the baton; no other thread of the cluster runs).
inline void cluster_turn(ClusterGroup& g, Worker& w, Block& b, unsigned r) {
  const unsigned C = g.cl.size();
  auto fail = [&](const std::string& msg) {
    if (g.error.empty()) g.error = msg;
    g.over = true;
  };
  bool progressed = false;
  if (!g.started[r]) {
    // Starts once every lower rank has run and none of its threads could go on.
    bool lower_idle = true;
    for (unsigned q = 0; q < r; ++q) lower_idle = lower_idle && g.started[q] && (g.finished[q] || !g.progressed[q]);
    if (lower_idle) g.started[r] = 1;
    progressed = lower_idle;
  }
  if (g.started[r] && !g.finished[r]) {
    bool ran = false, real = false;
    b.end_turn = false;
    do {
      ran = run_round(w, b) || ran;
      real = real || b.real_progress;
      if (!b.fault.empty()) return fail(block_name(b) + " " + b.fault);
    } while (b.again && !b.end_turn);
    b.end_turn = false;
    g.progressed[r] = real;
    progressed = progressed || ran;
    if (b.live == 0) {
      b.exited = true;
      g.finished[r] = 1;
      const std::string err = finish_block(w, b);
      if (!err.empty()) return fail(err);
    }
  }
  bool all_done = true;
  for (unsigned q = 0; q < C; ++q) all_done = all_done && g.finished[q];
  if (all_done) {
    g.over = true;
    return;
  }
  // A block not started yet starts once the lower ranks are idle: not a deadlock.
  bool all_started = true;
  for (unsigned q = 0; q < C; ++q) all_started = all_started && g.started[q];
  g.idle = progressed || !all_started ? 0 : g.idle + 1;
  if (g.idle < C) return;
  // A whole cycle without progress: pending transfers complete now, else the cluster is stuck.
  bool any = false;
  for (Block* q : g.cl.blocks) {
    if (q->exited) continue;
    any = perform_pending_tma(w, *q) || any;
    if (!q->fault.empty()) return fail(block_name(*q) + " " + q->fault);
  }
  if (any) {
    g.idle = 0;
    return;
  }
  std::string msg = "cluster of blocks";
  for (Block* q : g.cl.blocks) msg += " " + block_name(*q).substr(6);
  msg += " cannot go on";
  for (Block* q : g.cl.blocks) {
    if (!q->exited) msg += "; " + stuck_message(*q);
  }
  fail(msg);
}

// Rank `r`'s worker thread of a cluster group: runs the launch's clusters until none is left
// or one fails. `next_cluster()` returns the next linear cluster id or -1.
template <typename Next, typename Fail>
inline void cluster_worker(ClusterGroup& g, unsigned r, unsigned C, Worker& w, Block& b, size_t stack_bytes,
                           Next next_cluster, Fail fail_launch) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(g.m);
      if (r == 0) {
        g.cv.wait(lk, [&] { return g.epoch == 0 || g.out == C; });
        g.cluster = next_cluster();
        g.epoch++;
        g.ready = g.out = g.turn = g.idle = 0;
        g.over = false;
        g.error.clear();
        g.cl = Cluster{};
        g.cl.blocks.assign(C, nullptr);
        g.started.assign(C, 0);
        g.progressed.assign(C, 0);
        g.finished.assign(C, 0);
        g.started[0] = 1;
        g.cv.notify_all();
      } else {
        g.cv.wait(lk, [&] { return g.epoch != seen; });
      }
      seen = g.epoch;
      if (g.cluster < 0) return;
    }
    // Block r of cluster `id`: clusters are C x 1 x 1 blocks, numbered x fastest.
    const uint64_t id = uint64_t(g.cluster);
    const unsigned cx = w.grid.x / C;
    b.idx = uint3{unsigned(id % cx) * C + r, unsigned((id / cx) % w.grid.y), unsigned(id / (uint64_t(cx) * w.grid.y))};
    b.cluster = &g.cl;
    b.rank = r;
    const std::string init_err = init_block(w, b, stack_bytes);
    bool failed = false;
    {
      std::unique_lock<std::mutex> lk(g.m);
      g.cl.blocks[r] = &b;
      g.cl.live += b.live;
      if (!init_err.empty() && g.error.empty()) g.error = init_err, g.over = true;
      g.ready++;
      g.cv.notify_all();
      g.cv.wait(lk, [&] { return g.ready == C; });
    }
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(g.m);
        g.cv.wait(lk, [&] { return g.turn == r || g.over; });
        if (g.over) break;
      }
      try {
        cluster_turn(g, w, b, r);
      } catch (const std::exception& e) {
        if (g.error.empty()) g.error = std::string("emulation failed: ") + e.what();
        g.over = true;
      }
      std::lock_guard<std::mutex> lk(g.m);
      g.turn = (r + 1) % C;
      g.cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> lk(g.m);
      failed = !g.error.empty();
      if (failed && r == 0) fail_launch(g.error);
    }
    // A failed cluster's fibers are abandoned mid-kernel; their stacks must not be reused.
    if (failed) b.fibers = std::vector<Fiber>();
    b.cluster = nullptr;
    std::lock_guard<std::mutex> lk(g.m);
    g.out++;
    g.cv.notify_all();
  }
}

// Block visiting order for a launch (linear block ids).
inline std::vector<unsigned> block_order(unsigned n, int order, uint64_t seed) {
  std::vector<unsigned> ids(n);
  for (unsigned i = 0; i < n; ++i) ids[i] = i;
  if (order == MOEKIT_EMU_ORDER_REVERSED) {
    std::reverse(ids.begin(), ids.end());
  } else if (order == MOEKIT_EMU_ORDER_SHUFFLED) {
    // Fisher-Yates with splitmix64: the same permutation for a seed on every platform.
    uint64_t s = seed;
    auto next = [&s]() {
      uint64_t z = (s += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return z ^ (z >> 31);
    };
    for (unsigned i = n; i > 1; --i) std::swap(ids[i - 1], ids[next() % i]);
  }
  return ids;
}

// Runs a whole grid. `run(arg)` is called on every emulated thread and invokes the kernel;
// `cluster_x` > 1 runs clusters of that many blocks along x (__cluster_dims__). A failure's
// message goes to `*error` (one launch's own string: concurrent launches from several host
// threads do not mix their messages). Never throws.
inline int launch(const MoekitEmuLaunch& cfg, void (*run)(void*), void* arg, std::string* error,
                  unsigned cluster_x = 1) noexcept {
  std::mutex error_mutex;
  auto fail = [&](int code, const std::string& msg) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error->empty()) *error = msg;
    return code;
  };
  try {
    const uint64_t threads = uint64_t(cfg.block[0]) * cfg.block[1] * cfg.block[2];
    const uint64_t blocks = uint64_t(cfg.grid[0]) * cfg.grid[1] * cfg.grid[2];
    if (threads == 0 || threads > 1024 || blocks == 0 || blocks > (1ull << 31)) {
      return fail(MOEKIT_EMU_BAD_CONFIG, "invalid launch: grid " + std::to_string(blocks) + " blocks of " +
                                             std::to_string(threads) + " threads (1..1024 threads per block)");
    }
    const unsigned C = cluster_x == 0 ? 1 : cluster_x;
    if (C > 8 || cfg.grid[0] % C != 0) {
      return fail(MOEKIT_EMU_BAD_CONFIG, "invalid launch: grid x " + std::to_string(cfg.grid[0]) +
                                             " is not a multiple of the kernel's cluster size " + std::to_string(C) +
                                             " (at most 8)");
    }
    const std::vector<unsigned> order = block_order(unsigned(blocks / C), cfg.block_order, cfg.seed);
    std::atomic<size_t> next{0};
    std::atomic<int> status{MOEKIT_EMU_OK};
    const size_t stack_bytes = cfg.stack_bytes ? size_t(cfg.stack_bytes) : (64u << 10);
    auto setup = [&](Worker& w, Block& b) {
      w.run = run;
      w.run_arg = arg;
      w.grid = uint3{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
      w.block_dim = uint3{cfg.block[0], cfg.block[1], cfg.block[2]};
      tl_worker = &w;
      b.smem_bytes = cfg.shared_mem_bytes;
      b.smem_storage.assign(b.smem_span() + kSmemAlign, kPoison);
      // The dynamic shared memory (after the guard) starts on a kSmemAlign boundary.
      const uintptr_t raw = reinterpret_cast<uintptr_t>(b.smem_storage.data()) + kSmemGuard;
      b.smem = b.smem_storage.data() + (kSmemAlign - raw % kSmemAlign) % kSmemAlign;
    };
    auto work = [&]() {
      try {
        Worker w;
        Block b;
        setup(w, b);
        for (size_t i; (i = next.fetch_add(1)) < order.size() && status.load() == MOEKIT_EMU_OK;) {
          const unsigned id = order[i];
          b.idx = uint3{id % cfg.grid[0], (id / cfg.grid[0]) % cfg.grid[1], id / (cfg.grid[0] * cfg.grid[1])};
          std::string err = run_block(w, b, stack_bytes);
          if (!err.empty()) {
            status.store(fail(MOEKIT_EMU_KERNEL_FAULT, err));
            // The block's fibers are abandoned mid-kernel; their stacks must not be reused.
            b.fibers = std::vector<Fiber>();
          }
        }
        MOEKIT_EMU_UNPOISON(b.smem, b.smem_span());
        tl_worker = nullptr;
      } catch (const std::exception& e) {
        tl_worker = nullptr;
        status.store(fail(MOEKIT_EMU_KERNEL_FAULT, std::string("emulation failed: ") + e.what()));
      }
    };
    const unsigned workers = std::max(1u, std::min<unsigned>(cfg.workers ? cfg.workers : 1, unsigned(blocks / C)));
    if (C > 1) {
      // Groups of C OS threads, one cluster at a time each (`workers` clusters at once).
      std::deque<ClusterGroup> groups(workers);
      std::vector<std::thread> pool;
      for (auto& g : groups) {
        for (unsigned r = 0; r < C; ++r) {
          pool.emplace_back([&, r, gp = &g]() {
            Worker w;
            Block b;
            try {
              setup(w, b);
              auto next_cluster = [&]() -> int64_t {
                const size_t i = next.fetch_add(1);
                return i < order.size() && status.load() == MOEKIT_EMU_OK ? int64_t(order[i]) : -1;
              };
              auto fail_launch = [&](const std::string& msg) { status.store(fail(MOEKIT_EMU_KERNEL_FAULT, msg)); };
              cluster_worker(*gp, r, C, w, b, stack_bytes, next_cluster, fail_launch);
            } catch (const std::exception& e) {
              status.store(fail(MOEKIT_EMU_KERNEL_FAULT, std::string("emulation failed: ") + e.what()));
              std::abort();  // a group thread lost mid-cluster would leave its peers waiting
            }
            MOEKIT_EMU_UNPOISON(b.smem, b.smem_span());
            tl_worker = nullptr;
          });
        }
      }
      for (auto& t : pool) t.join();
    } else if (workers == 1) {
      work();
    } else {
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < workers; ++t) pool.emplace_back(work);
      for (auto& t : pool) t.join();
    }
    return status.load();
  } catch (const std::exception& e) {
    return fail(MOEKIT_EMU_BAD_CONFIG, std::string("emulation failed: ") + e.what());
  }
}

// Calls `kernel(args...)` with each argument read from `params[i]`, like cuLaunchKernel.
template <typename... Args, size_t... I>
void invoke(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(params[I])...);
}

template <typename... Args>
struct Thunk {
  void (*kernel)(Args...);
  void** params;
  static void run(void* self) {
    auto* t = static_cast<Thunk*>(self);
    invoke(t->kernel, t->params, std::index_sequence_for<Args...>{});
  }
};

// The entry point generated for every kernel: launch `kernel` with cuLaunchKernel-style
// params (`cluster_x`: the kernel's __cluster_dims__ x, 1 without); a failure's message is
// copied into `err` (NUL-terminated, truncated to `err_len`).
template <typename... Args>
int launch_kernel(void (*kernel)(Args...), const MoekitEmuLaunch* cfg, void** params, char* err,
                  unsigned long long err_len, unsigned cluster_x = 1) noexcept {
  Thunk<Args...> t{kernel, params};
  std::string error;
  const int rc = launch(*cfg, &Thunk<Args...>::run, &t, &error, cluster_x);
  if (err && err_len > 0) std::snprintf(err, size_t(err_len), "%s", error.c_str());
  return rc;
}

}  // namespace emu
}  // namespace moekit

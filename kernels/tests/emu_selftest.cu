// Kernels that test the host emulation itself (crates/moekit-emu-selftest). The correct ones
// run on the GPU too, against the same Rust expectations, so a GPU run checks that the
// emulation's semantics are the hardware's. The `planted_*` kernels carry deliberate bugs
// that the emulation must catch; they are never run on a GPU.
//
// moekit-arch: portable
// moekit-sass: * forbid STL
// moekit-sass: selftest_mma_bf16 require HMMA LDSM LDGSTS

#include "moekit/portable.cuh"
#include "moekit/ptx.cuh"

// Tree reduction of each block's slice through shared memory: out[block] = sum of x.
extern "C" __global__ void selftest_block_reduce(const float* x, float* out, int n) {
  __shared__ float tile[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) tile[threadIdx.x] += tile[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = tile[0];
}

// PLANTED BUG: the barrier between the loads and the first reduction step is missing.
extern "C" __global__ void planted_reduce_missing_sync(const float* x, float* out, int n) {
  __shared__ float tile[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.0f;
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) tile[threadIdx.x] += tile[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = tile[0];
}

// Every warp intrinsic, one output row of 18 ints per thread (see the Rust expectation).
extern "C" __global__ void selftest_warp_intrinsics(const int* in, int* out) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const int v = in[t];
  int* o = out + t * 19;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7) % 32);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3);
  o[4] = __shfl_sync(0xffffffffu, v, 2, 8);        // lane 2 of each 8-lane segment
  o[5] = __shfl_down_sync(0xffffffffu, v, 1, 4);   // within 4-lane segments
  o[16] = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // upper segment reads the lower one
  o[17] = __shfl_up_sync(0xffffffffu, v, 2, 8);
  o[18] = static_cast<int>(__match_any_sync(0xffffffffu, v & 3));  // lanes with the same v & 3
  o[6] = static_cast<int>(__ballot_sync(0xffffffffu, v & 1));
  o[7] = __any_sync(0xffffffffu, v == 12345);
  o[8] = __all_sync(0xffffffffu, v >= 0);
  o[9] = __popc(static_cast<unsigned>(v));
  o[10] = __ffs(v);
  o[11] = __clz(v);
  // Partial masks: the low half-warp and the high half-warp exchange separately.
  if (lane < 16) {
    o[12] = __shfl_xor_sync(0x0000ffffu, v, 1);
    o[13] = static_cast<int>(__ballot_sync(0x0000ffffu, lane % 3 == 0));
  } else {
    o[12] = __shfl_sync(0xffff0000u, v, 31);
    o[13] = static_cast<int>(__ballot_sync(0xffff0000u, lane % 5 == 0));
  }
  __syncwarp();
  o[14] = static_cast<int>(__activemask());
  // Inactive lanes: only even lanes take part.
  if (lane % 2 == 0) {
    o[15] = __shfl_xor_sync(0x55555555u, v, 2);
  } else {
    o[15] = -1;
  }
}

// A lane named in a partial mask exits early: the other lanes of the mask still exchange.
extern "C" __global__ void selftest_exited_lane_in_mask(int* out) {
  const unsigned lane = threadIdx.x % 32;
  out[threadIdx.x] = -1;
  if (lane == 15) return;
  int v = static_cast<int>(threadIdx.x) * 10;
  if (lane < 16) {
    v = __shfl_xor_sync(0x0000ffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// One warp computes d = c + a * bt^T through the PTX wrappers: cp.async global -> shared,
// ldmatrix.x4 fragments, mma.sync m16n8k16 (a: 16x16 bf16 row-major; bt: 8x16 bf16 row-major,
// i.e. b column-major; c, d: 16x8 f32 row-major).
extern "C" __global__ void selftest_mma_bf16(const uint16_t* a, const uint16_t* bt, const float* c, float* d) {
  __shared__ __align__(128) uint16_t sa[16 * 16];
  __shared__ __align__(128) uint16_t sb[8 * 16];
  const unsigned lane = threadIdx.x;
  moekit::ptx::cp_async_16(sa + lane * 8, a + lane * 8);  // 32 x 16 bytes
  if (lane < 16) moekit::ptx::cp_async_16(sb + lane * 8, bt + lane * 8);  // 16 x 16 bytes
  moekit::ptx::cp_async_commit();
  moekit::ptx::cp_async_wait<0>();
  __syncwarp();
  uint32_t af[4], bf[4];
  // A: lanes 0-15 rows 0-15 at k = 0, lanes 16-31 rows 0-15 at k = 8.
  moekit::ptx::ldmatrix_x4(af, sa + (lane % 16) * 16 + (lane / 16) * 8);
  // B: lanes 0-7 rows n at k = 0, lanes 8-15 at k = 8 (lanes 16-31 repeat; r[2], r[3] unused).
  moekit::ptx::ldmatrix_x4(bf, sb + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  const unsigned g = lane / 4, t = lane % 4;
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  const uint32_t b2[2] = {bf[0], bf[1]};
  float df[4];
  moekit::ptx::mma_m16n8k16_bf16(df, af, b2, cf);
  d[g * 8 + 2 * t] = df[0];
  d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2];
  d[(g + 8) * 8 + 2 * t + 1] = df[3];
}

// Thread 0 spin-waits for a flag that the last thread of the block sets: in the emulation the
// waiting thread runs first, so this needs moekit_spin_pause() to make progress.
extern "C" __global__ void selftest_spin_wait(int* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    while (atomicAdd(&flag, 0) == 0) moekit_spin_pause();
    out[0] = atomicAdd(&flag, 0);
  }
  if (threadIdx.x == blockDim.x - 1) atomicExch(&flag, 7);
}

// PLANTED BUG: waits for a flag nobody sets.
extern "C" __global__ void planted_endless_spin(int* flag) {
  if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) moekit_spin_pause();
  }
}

// Atomics under contention from every thread of every block.
extern "C" __global__ void selftest_atomics(int* counter, int* max_id, int* min_id, float* fsum, unsigned* cas_counter,
                                            unsigned long long* wide) {
  const int id = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(counter, 1);
  atomicMax(max_id, id);
  atomicMin(min_id, id);
  atomicAdd(fsum, 1.0f);
  // Increment through a compare-and-swap loop.
  unsigned old = *reinterpret_cast<volatile unsigned*>(cas_counter), seen;
  do {
    seen = old;
    old = atomicCAS(cas_counter, seen, seen + 1u);
  } while (old != seen);
  atomicAdd(wide, 1ull << 33);
  atomicExch(counter + 1, id);
}

// Static shared memory belongs to one block: every thread sees its own block's value, across
// many barriers, while other blocks do the same at the same time.
extern "C" __global__ void selftest_smem_isolation(int* out, int rounds) {
  __shared__ int owner;
  int ok = 1;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) owner = blockIdx.x * 1000 + r;
    __syncthreads();
    ok &= owner == static_cast<int>(blockIdx.x) * 1000 + r;
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = ok;
}

// Records the order in which blocks start.
extern "C" __global__ void selftest_block_order(int* ticket, int* order) {
  if (threadIdx.x == 0) order[atomicAdd(ticket, 1)] = blockIdx.x;
}

// PLANTED BUG: assumes block b runs after block b-1 (a running sum across blocks).
extern "C" __global__ void planted_block_order_dependence(const int* x, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x == 0 ? 0 : out[blockIdx.x - 1]) + x[blockIdx.x];
}

// PLANTED BUG: an off-by-one write past a dynamic shared memory tile of blockDim floats.
extern "C" __global__ void planted_smem_tile_overrun(float* out) {
  MOEKIT_DYNAMIC_SMEM(float, tile);
  tile[threadIdx.x + 1] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x];
}

// PLANTED BUG: `<=` instead of `<` writes one element past the output.
extern "C" __global__ void planted_global_overrun(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;
}

// PLANTED BUG: reads one element past the input (caught by AddressSanitizer builds).
extern "C" __global__ void planted_global_overread(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i + 1];
}

// PLANTED BUG: half a warp waits in a warp shuffle for lanes that wait at a block barrier.
extern "C" __global__ void planted_deadlock(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

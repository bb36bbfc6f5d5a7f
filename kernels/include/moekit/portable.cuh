// Constructs whose spelling differs between nvcc and the host emulation
// (moekit/emu/cuda_emu.h). Kernels use these instead of the raw CUDA syntax.
#pragma once

// `MOEKIT_DYNAMIC_SMEM(T, name);` declares `T* name` pointing at the block's dynamic shared
// memory (the launch's `shared_mem_bytes`), aligned to 128 bytes.
#ifdef MOEKIT_EMULATION
#define MOEKIT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::moekit::emu::dynamic_smem())
#else
#define MOEKIT_DYNAMIC_SMEM(T, name)                          \
  extern __shared__ __align__(128) unsigned char moekit_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(moekit_dynamic_smem_)
#endif

// `moekit_spin_pause();` in the body of every spin-wait loop. On the GPU a short sleep; in the
// emulation it lets the other threads run (fibers are cooperative: a loop without it would
// never see the value it waits for) and reports a wait that never ends.
#ifdef MOEKIT_EMULATION
#define moekit_spin_pause() ::moekit::emu::spin_pause()
#else
#define moekit_spin_pause() __nanosleep(32)
#endif

// Tile scheduling shared by the grouped GEMM kernels (portable and Hopper).
#pragma once

namespace moekit {
namespace gemm {

// The distinct valid groups (0 <= id < groups) among rows [row0, row0 + tile_rows) of the
// m-grouped contiguous layout (rows past m ignored), in order of first appearance, into `out`
// (at least tile_rows entries); returns their count. Run by one thread; padding rows (-1) and
// ids out of range are skipped, so a tile of padding only has no pass at all.
__device__ __forceinline__ int distinct_groups(const int* m_indices, int row0, int tile_rows, int m, int groups,
                                               int* out) {
  int count = 0;
  for (int r = row0; r < row0 + tile_rows && r < m; ++r) {
    const int g = m_indices[r];
    if (g < 0 || g >= groups) continue;
    bool seen = false;
    for (int j = 0; j < count; ++j) seen = seen || out[j] == g;
    if (!seen) out[count++] = g;
  }
  return count;
}

}  // namespace gemm
}  // namespace moekit

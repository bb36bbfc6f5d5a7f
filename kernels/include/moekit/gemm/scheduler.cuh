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

// The group runs among rows [row0, row0 + tile_rows) of the m-grouped contiguous layout (rows
// past m ignored): the group of every valid row (0 <= id < groups) whose id differs from the
// previous row's, in row order, into `out` (at least tile_rows entries); returns their count.
// One pass over the rows and no search of the list (distinct_groups compares each row with
// every group found so far). In the contiguous layout each group's rows are one run, so this
// equals distinct_groups; on other inputs a group split into runs gets one pass per run: the
// same values written again, never a wrong row (a pass writes only its group's rows).
__device__ __forceinline__ int group_runs(const int* m_indices, int row0, int tile_rows, int m, int groups, int* out) {
  int count = 0, prev = -1;
  const int end = row0 + tile_rows < m ? row0 + tile_rows : m;
  for (int r = row0; r < end; ++r) {
    const int g = m_indices[r];
    const int id = (g < 0 || g >= groups) ? -1 : g;
    if (id >= 0 && id != prev) out[count++] = id;
    prev = id;
  }
  return count;
}

}  // namespace gemm
}  // namespace moekit

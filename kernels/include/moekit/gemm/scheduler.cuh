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

// group_runs by one warp over rows [row0, row0 + 32 kRowsPerLane) (rows past m ignored): lane
// l reads rows row0 + kRowsPerLane l + j (j < kRowsPerLane), its neighbours' ids come by
// shuffles; a run starts at a valid row whose predecessor in the tile has another id and ends
// at a valid row whose successor has another id, and ballots + popc give each start (end) its
// index. Run i's group goes to group[i], its first and last row (relative to row0) to
// span[i] = first | last << 8 (kRowsPerLane <= 8); returns the count in every lane. The same
// list as group_runs (a single-group tile: one run, found by the same few instructions as any
// other tile; no thread scans the rows). All 32 lanes must call it; the list is complete in
// every lane on return (__syncwarp), and the call waits (__syncwarp) until every lane is done
// with the previous list before rewriting it.
// Lane `lane`'s kRowsPerLane group ids of rows row0 + kRowsPerLane lane + j (-1: padding, an
// id out of range or a row past m), and the ids just before and after them in the tile (-1
// outside it). All 32 lanes must call it.
template <int kRowsPerLane>
__device__ __forceinline__ void tile_row_ids(const int* m_indices, int row0, int m, int groups, int lane,
                                             int (&id)[kRowsPerLane], int& prev_lane, int& next_lane) {
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    const int r = row0 + kRowsPerLane * lane + j;
    const int g = r < m ? m_indices[r] : -1;
    id[j] = (g < 0 || g >= groups) ? -1 : g;
  }
  prev_lane = __shfl_up_sync(0xffffffffu, id[kRowsPerLane - 1], 1);
  next_lane = __shfl_down_sync(0xffffffffu, id[0], 1);
  if (lane == 0) prev_lane = -1;
  if (lane == 31) next_lane = -1;
}

// The number of group runs group_runs_warp finds among rows [row0, row0 + 32 kRowsPerLane),
// without the list (a cluster peer's pass count). All 32 lanes must call it.
template <int kRowsPerLane>
__device__ __forceinline__ int group_run_count_warp(const int* m_indices, int row0, int m, int groups, int lane) {
  int id[kRowsPerLane], prev_lane, next_lane;
  tile_row_ids<kRowsPerLane>(m_indices, row0, m, groups, lane, id, prev_lane, next_lane);
  int total = 0;
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    const int before = j > 0 ? id[j - 1] : prev_lane;
    total += __popc(__ballot_sync(0xffffffffu, id[j] >= 0 && id[j] != before));
  }
  return total;
}

template <int kRowsPerLane>
__device__ __forceinline__ int group_runs_warp(const int* m_indices, int row0, int m, int groups, int lane, int* group,
                                               int* span) {
  static_assert(kRowsPerLane >= 1 && kRowsPerLane <= 8, "32 kRowsPerLane rows must fit in 8 bits");
  constexpr unsigned kAll = 0xffffffffu;
  int id[kRowsPerLane], prev_lane, next_lane;
  tile_row_ids<kRowsPerLane>(m_indices, row0, m, groups, lane, id, prev_lane, next_lane);
  const unsigned below = (1u << lane) - 1u;
  unsigned starts = 0, ends = 0;  // this lane's flags, bit j
  int first = 0, last = 0, total = 0;  // starts / ends in lower lanes, starts in the warp
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    const int before = j > 0 ? id[j - 1] : prev_lane;
    const int after = j + 1 < kRowsPerLane ? id[j + 1] : next_lane;
    const bool s = id[j] >= 0 && id[j] != before, e = id[j] >= 0 && id[j] != after;
    const unsigned sb = __ballot_sync(kAll, s), eb = __ballot_sync(kAll, e);
    starts |= static_cast<unsigned>(s) << j;
    ends |= static_cast<unsigned>(e) << j;
    first += __popc(sb & below);
    last += __popc(eb & below);
    total += __popc(sb);
  }
  __syncwarp();  // every lane is done reading the previous list
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    if (starts >> j & 1u) {
      group[first] = id[j];
      span[first] = kRowsPerLane * lane + j;
      ++first;
    }
  }
  __syncwarp();  // run i's first row is in place (written by the lane of its start)
#pragma unroll
  for (int j = 0; j < kRowsPerLane; ++j) {
    if (ends >> j & 1u) {
      span[last] |= (kRowsPerLane * lane + j) << 8;
      ++last;
    }
  }
  __syncwarp();  // the list is complete in every lane
  return total;
}

}  // namespace gemm
}  // namespace moekit

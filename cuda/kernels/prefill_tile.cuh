// Prefill query rows: a row is a (token, query head of the GQA group) pair,
// and PlaceQueryRow says where one lives in qkv and out (every prefill
// kernel). PrefillTile is the share of a prefill that one thread block of
// the tensor-core prefill kernels owns (prefill_attention_tc.cu,
// prefill_attention_wgmma.cu): grid z is the sequence, grid y the tile of
// query rows, counted from the end of the chunk (the tiles nearest the end
// see the most keys, and starting them first keeps the tail of the grid
// short). Device code only: include from .cu files.
#ifndef STRATA_CUDA_KERNELS_PREFILL_TILE_CUH_
#define STRATA_CUDA_KERNELS_PREFILL_TILE_CUH_

#include "cuda/kernels/attention.h"

namespace strata::cuda::kernels {

struct PrefillTile {
  int q_begin;     // first query row of the sequence in qkv / out
  int group;       // query heads per KV head (G)
  int rows_total;  // q_len * G
  int row0;        // first row of this block
  int first_pos;   // position of the chunk's token 0
  int pos_first;   // positions of this block's first and last rows
  int pos_last;
  int key_lo;  // keys [key_lo, key_hi) are visible to some row
  int key_hi;
};

// Fills `tile` for this block, `rows` query rows a block. False when the
// block has nothing to do: a decode sequence (those belong to the decode
// kernel) or a row tile past the chunk.
__device__ __forceinline__ bool GetPrefillTile(const PagedAttentionParams& p, int rows,
                                               PrefillTile& tile) {
  const int seq = blockIdx.z;
  tile.q_begin = p.query_start[seq];
  const int q_len = p.query_start[seq + 1] - tile.q_begin;
  if (q_len <= 1) return false;
  tile.group = p.num_q_heads / p.num_kv_heads;
  tile.rows_total = q_len * tile.group;
  const int row_tiles = (tile.rows_total + rows - 1) / rows;
  const int index = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);
  if (index >= row_tiles) return false;
  tile.row0 = index * rows;
  tile.first_pos = p.context_len[seq] - q_len;
  const int last_row = min(tile.rows_total - 1, tile.row0 + rows - 1);
  tile.pos_first = tile.first_pos + tile.row0 / tile.group;
  tile.pos_last = tile.first_pos + last_row / tile.group;
  tile.key_lo = p.sliding_window > 0 ? max(0, tile.pos_first - p.sliding_window + 1) : 0;
  tile.key_hi = tile.pos_last + 1;
  return true;
}

// Where query row `row` of a sequence's chunk lives: rows are (token, query
// head of the group) pairs, G = `group` rows a token, so row r is token
// q_begin + r / G (its row in qkv and in out) and head kv_head * G + r % G.
struct QueryRowPlace {
  int64_t token;
  int head;
};
__device__ __forceinline__ QueryRowPlace PlaceQueryRow(int q_begin, int group, int kv_head,
                                                       int row) {
  const int j = row / group;
  return {static_cast<int64_t>(q_begin) + j, kv_head * group + (row - j * group)};
}

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_PREFILL_TILE_CUH_

// KvLayout: where a worker's KV bytes are, checked against the model.
//
// The GPU tier is the model's paged caches: per layer a K and a V tensor of
// [pages + 1, page_size, num_kv_heads, head_dim] (the last page is the
// decode graphs' spare), where pages is the layer's page group's count
// (engine/kv_memory.h: the lower layers' num_pages, the upper layers'
// num_upper_pages). A page of one layer's K (or V) is one contiguous run of
// page_bytes(); the host tier stores a token page of every layer as one
// record of record_bytes(): layer 0's K page, layer 0's V page, layer 1's K
// page, and so on, so that a record moves as 2 x layers row copies, merged
// into fewer where pages are adjacent. A record's upper layers come from
// the sequence's upper page, and are left out when that is off the GPU.
//
// With tensor parallelism each rank's caches hold its own KV heads
// (engine/tensor_parallel.h), and a record holds every rank's part of the
// page: rank 0's 2 x layers rows, then rank 1's, and so on; caches() lists
// the ranks' caches in that order, so the copy calls (kvtier::KvDevice)
// send each rank its rows.
//
// Create() derives the shapes from the model's config and options and
// checks every cache tensor against them (dtype, shape, one allocation per
// tensor), so a mismatch fails at start, not as a stray copy.
//
// Thread-safety: immutable after Create().
#ifndef STRATA_KVTIER_KV_LAYOUT_H_
#define STRATA_KVTIER_KV_LAYOUT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"

namespace strata::kvtier {

class KvLayout {
 public:
  static absl::StatusOr<KvLayout> Create(engine::Model& model);

  int num_layers() const { return num_layers_; }
  // A rank's KV heads (all of them with one rank).
  int num_kv_heads() const { return num_kv_heads_; }
  int num_ranks() const { return num_ranks_; }
  int head_dim() const { return head_dim_; }
  int page_size() const { return page_size_; }
  // Pages sequences may use in each group (the spare pages excluded); the
  // upper group has none with one group.
  int num_pages(engine::PageGroup group) const {
    return group == engine::PageGroup::kLower ? num_pages_ : num_upper_pages_;
  }
  // The first layer of the upper group (num_layers with one group).
  int upper_first_layer() const { return upper_first_layer_; }
  engine::DType dtype() const { return dtype_; }
  // Bytes of one page of one layer's K (or V).
  int64_t page_bytes() const { return page_bytes_; }
  // Bytes of one page of every layer, K and V, of every rank: one host
  // record.
  int64_t record_bytes() const { return int64_t{num_ranks_} * 2 * num_layers_ * page_bytes_; }
  // The caches as the copy calls take them: rank r's K of layer l at
  // r * 2 * layers + 2l, its V at the index after.
  const std::vector<engine::Tensor>& caches() const { return caches_; }
  // Appends the row copies that move one token page (`lower` in the lower
  // layers, `upper` in the upper ones; upper is ignored with one group and
  // skipped when kPageOffGpu) to or from the host record at `record_offset`.
  void AppendRecordCopies(int32_t lower, int32_t upper, int64_t record_offset,
                          std::vector<engine::RowCopy>& copies) const;

  // The same page coded with a block codec, for the wire: one block per
  // (rank, layer, KV head), rank-major then layer-major, of the page's
  // first `tokens` tokens, packed from `record_offset` on
  // (KvDevice::EncodeBlocksToHost / DecodeBlocksFromHost over k_caches()
  // and v_caches(); a block's `layer` indexes those, rank r's layer l at
  // r * layers + l). Returns the page's coded bytes (at most
  // record_bytes() for every codec).
  int64_t AppendRecordBlocks(int32_t lower, int32_t upper, int tokens, const engine::KvCodec& codec,
                             int64_t record_offset, std::vector<engine::KvBlockCopy>& blocks) const;

  // Layers [layer_begin, layer_end) of one page alone, where the whole
  // record has them (one rank only: a rank's layers are contiguous in the
  // record), raw (codec null: the row copies) or coded. Returns those
  // layers' bytes, and sets *offset to where they start in the record.
  int64_t AppendRecordLayers(int32_t lower, int32_t upper, int tokens, const engine::KvCodec* codec,
                             int64_t record_offset, int layer_begin, int layer_end,
                             std::vector<engine::RowCopy>& copies,
                             std::vector<engine::KvBlockCopy>& blocks, int64_t* offset) const;
  // The coded bytes of a page of `tokens` tokens (0 when the codec refuses
  // the shape).
  int64_t CodedRecordBytes(const engine::KvCodec& codec, int tokens) const;
  // Every rank's caches by layer, K and V apart (the block codec calls
  // take them so): rank r's layer l at r * layers + l.
  const std::vector<engine::Tensor>& k_caches() const { return k_caches_; }
  const std::vector<engine::Tensor>& v_caches() const { return v_caches_; }

 private:
  KvLayout() = default;
  int num_layers_ = 0, num_kv_heads_ = 0, head_dim_ = 0, page_size_ = 0, num_pages_ = 0;
  int num_upper_pages_ = 0, upper_first_layer_ = 0, num_ranks_ = 1;
  engine::DType dtype_ = engine::DType::kF32;
  int64_t page_bytes_ = 0;
  std::vector<engine::Tensor> caches_, k_caches_, v_caches_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_LAYOUT_H_

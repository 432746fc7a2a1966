// KvLayout: where a worker's KV bytes are, checked against the model.
//
// The GPU tier is the model's paged caches: per layer a K and a V tensor of
// [num_pages + 1, page_size, num_kv_heads, head_dim] (the last page is the
// decode graphs' spare). A page of one layer's K (or V) is one contiguous
// run of page_bytes(); the host tier stores a page of every layer as one
// record of record_bytes(): layer 0's K page, layer 0's V page, layer 1's K
// page, and so on, so that a record moves as 2 x layers row copies, merged
// into fewer where pages are adjacent.
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
  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int page_size() const { return page_size_; }
  // Pages sequences may use (the spare page excluded).
  int num_pages() const { return num_pages_; }
  engine::DType dtype() const { return dtype_; }
  // Bytes of one page of one layer's K (or V).
  int64_t page_bytes() const { return page_bytes_; }
  // Bytes of one page of every layer, K and V: one host record.
  int64_t record_bytes() const { return 2 * num_layers_ * page_bytes_; }
  // The caches as the copy calls take them: K of layer l at 2l, V at 2l + 1.
  const std::vector<engine::Tensor>& caches() const { return caches_; }
  // Appends the row copies that move `page` to or from the host record at
  // `record_offset`.
  void AppendRecordCopies(int32_t page, int64_t record_offset,
                          std::vector<engine::RowCopy>& copies) const;

 private:
  KvLayout() = default;
  int num_layers_ = 0, num_kv_heads_ = 0, head_dim_ = 0, page_size_ = 0, num_pages_ = 0;
  engine::DType dtype_ = engine::DType::kF32;
  int64_t page_bytes_ = 0;
  std::vector<engine::Tensor> caches_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_LAYOUT_H_

#include "kvtier/kv_layout.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata::kvtier {

absl::StatusOr<KvLayout> KvLayout::Create(engine::Model& model) {
  KvLayout layout;
  const engine::ModelConfig& config = model.config();
  const engine::ModelOptions& options = model.options();
  layout.num_layers_ = config.num_layers;
  layout.num_kv_heads_ = model.shard().kv_heads;  // this rank's (all with one rank)
  layout.head_dim_ = config.head_dim;
  layout.page_size_ = options.page_size;
  layout.num_pages_ = options.num_pages;
  layout.num_upper_pages_ = options.num_upper_pages;
  layout.upper_first_layer_ =
      model.two_page_groups() ? options.upper_first_layer : config.num_layers;
  layout.dtype_ = model.kv_cache_dtype();
  if (layout.num_layers_ < 1 || layout.num_kv_heads_ < 1 || layout.head_dim_ < 1 ||
      layout.page_size_ < 1 || layout.num_pages_ < 1) {
    return absl::InvalidArgumentError("KV layout: the model has no KV cache to lay out");
  }
  layout.page_bytes_ = int64_t{layout.page_size_} * layout.num_kv_heads_ * layout.head_dim_ *
                       static_cast<int64_t>(engine::DTypeSize(layout.dtype_));
  layout.num_ranks_ = static_cast<int>(model.ranks().size());
  for (int r = 0; r < layout.num_ranks_; ++r) {
    engine::Model& rank = *model.ranks()[r];
    if (rank.shard().kv_heads != layout.num_kv_heads_) {
      return absl::FailedPreconditionError(absl::StrCat("KV layout: rank ", r, " holds ",
                                                        rank.shard().kv_heads, " KV heads, rank 0 ",
                                                        layout.num_kv_heads_));
    }
    for (int l = 0; l < layout.num_layers_; ++l) {
      const int pages =
          l >= layout.upper_first_layer_ ? layout.num_upper_pages_ : layout.num_pages_;
      const std::vector<int64_t> expected = {pages + 1, layout.page_size_, layout.num_kv_heads_,
                                             layout.head_dim_};
      for (int kv = 0; kv < 2; ++kv) {
        const engine::Tensor& cache = kv == 0 ? rank.k_cache(l) : rank.v_cache(l);
        if (!cache.defined() || cache.dtype() != layout.dtype_ || cache.shape() != expected ||
            static_cast<int64_t>(cache.nbytes()) != (pages + 1) * layout.page_bytes_) {
          return absl::FailedPreconditionError(absl::StrCat(
              "KV layout: ", layout.num_ranks_ > 1 ? absl::StrCat("rank ", r, "'s ") : "", "layer ",
              l, kv == 0 ? " K" : " V", " cache is ",
              cache.defined() ? cache.DebugString() : "undefined", ", expected ",
              engine::DTypeName(layout.dtype_), "[", absl::StrJoin(expected, ", "), "]"));
        }
        layout.caches_.push_back(cache);
        (kv == 0 ? layout.k_caches_ : layout.v_caches_).push_back(cache);
      }
    }
  }
  return layout;
}

void KvLayout::AppendRecordCopies(int32_t lower, int32_t upper, int64_t record_offset,
                                  std::vector<engine::RowCopy>& copies) const {
  for (int t = 0; t < num_ranks_ * 2 * num_layers_; ++t) {
    const bool in_upper = t % (2 * num_layers_) / 2 >= upper_first_layer_;
    if (in_upper && upper == engine::kPageOffGpu) continue;
    copies.push_back({t, in_upper ? upper : lower, record_offset + t * page_bytes_});
  }
}

int64_t KvLayout::AppendRecordLayers(int32_t lower, int32_t upper, int tokens,
                                     const engine::KvCodec* codec, int64_t record_offset,
                                     int layer_begin, int layer_end,
                                     std::vector<engine::RowCopy>& copies,
                                     std::vector<engine::KvBlockCopy>& blocks,
                                     int64_t* offset) const {
  if (codec == nullptr) {
    *offset = int64_t{layer_begin} * 2 * page_bytes_;
    for (int t = 2 * layer_begin; t < 2 * layer_end; ++t) {
      const bool in_upper = t / 2 >= upper_first_layer_;
      copies.push_back({t, in_upper ? upper : lower, record_offset + t * page_bytes_});
    }
    return int64_t{layer_end - layer_begin} * 2 * page_bytes_;
  }
  const auto block_bytes = static_cast<int64_t>(codec->EncodedBytes(tokens, head_dim_, dtype_));
  *offset = int64_t{layer_begin} * num_kv_heads_ * block_bytes;
  int64_t at = record_offset + *offset;
  for (int l = layer_begin; l < layer_end; ++l) {
    const int32_t page = l >= upper_first_layer_ ? upper : lower;
    for (int h = 0; h < num_kv_heads_; ++h) {
      blocks.push_back({l, page, h, tokens, at, block_bytes});
      at += block_bytes;
    }
  }
  return at - record_offset - *offset;
}

int64_t KvLayout::CodedRecordBytes(const engine::KvCodec& codec, int tokens) const {
  return int64_t{num_ranks_} * num_layers_ * num_kv_heads_ *
         static_cast<int64_t>(codec.EncodedBytes(tokens, head_dim_, dtype_));
}

int64_t KvLayout::AppendRecordBlocks(int32_t lower, int32_t upper, int tokens,
                                     const engine::KvCodec& codec, int64_t record_offset,
                                     std::vector<engine::KvBlockCopy>& blocks) const {
  const auto block_bytes = static_cast<int64_t>(codec.EncodedBytes(tokens, head_dim_, dtype_));
  int64_t at = record_offset;
  for (int r = 0; r < num_ranks_; ++r) {
    for (int l = 0; l < num_layers_; ++l) {
      const int32_t page = l >= upper_first_layer_ ? upper : lower;
      for (int h = 0; h < num_kv_heads_; ++h) {
        blocks.push_back({r * num_layers_ + l, page, h, tokens, at, block_bytes});
        at += block_bytes;
      }
    }
  }
  return at - record_offset;
}

}  // namespace strata::kvtier

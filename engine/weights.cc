#include "engine/weights.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"

namespace strata::engine {
namespace {

// A block of a checkpoint tensor: rows [row_begin, row_begin + rows) and
// columns [col_begin, col_begin + cols) of `name`, which must be
// [full_rows, full_cols] (full_cols = 0 for 1-D tensors).
struct Part {
  std::string name;
  int64_t full_rows = 0, full_cols = 0;
  int64_t row_begin = 0, rows = 0;
  int64_t col_begin = 0, cols = 0;
};
Part Whole(std::string name, int64_t rows, int64_t cols) {
  return {std::move(name), rows, cols, 0, rows, 0, cols};
}
Part RowBlock(std::string name, int64_t full_rows, int64_t cols, int64_t begin, int64_t rows) {
  return {std::move(name), full_rows, cols, begin, rows, 0, cols};
}
Part ColumnBlock(std::string name, int64_t rows, int64_t full_cols, int64_t begin, int64_t cols) {
  return {std::move(name), rows, full_cols, 0, rows, begin, cols};
}

// Copies (blocks of) named checkpoint tensors into backend tensors.
class Loader {
 public:
  Loader(const SafetensorsModel& files, Backend& backend) : files_(files), backend_(backend) {}

  // Allocates [rows + extra_rows, cols] and fills its first rows from the
  // parts stacked by rows (each must have `cols` columns; cols = 0 for
  // 1-D tensors); the extra rows are zero.
  absl::StatusOr<Tensor> Stacked(const std::vector<Part>& parts, int64_t extra_rows = 0) {
    int64_t rows = 0;
    const int64_t cols = parts.front().cols;
    for (const Part& p : parts) rows += p.rows;
    std::vector<int64_t> shape = cols > 0 ? std::vector<int64_t>{rows + extra_rows, cols}
                                          : std::vector<int64_t>{rows + extra_rows};
    STRATA_ASSIGN_OR_RETURN(Tensor t, backend_.Allocate(backend_.activation_dtype(), shape));
    int64_t offset = 0;
    for (const Part& part : parts) {
      STRATA_ASSIGN_OR_RETURN(TensorView view, files_.Get(part.name));
      std::vector<int64_t> want = part.full_cols > 0
                                      ? std::vector<int64_t>{part.full_rows, part.full_cols}
                                      : std::vector<int64_t>{part.full_rows};
      if (view.shape != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            view.file, ": tensor \"", part.name, "\" has shape [", absl::StrJoin(view.shape, ", "),
            "], expected [", absl::StrJoin(want, ", "), "] from config.json"));
      }
      if (view.dtype == DType::kI32) {
        return absl::InvalidArgumentError(absl::StrCat(view.file, ": tensor \"", part.name,
                                                       "\" has dtype I32; weights must be F32, "
                                                       "F16 or BF16"));
      }
      const size_t es = DTypeSize(view.dtype);
      const int64_t full_cols = std::max<int64_t>(part.full_cols, 1);
      const int64_t cols_here = std::max<int64_t>(part.cols, 1);
      const auto* src = static_cast<const uint8_t*>(view.data) +
                        (part.row_begin * full_cols + part.col_begin) * es;
      const int64_t count = part.rows * cols_here;
      if (cols_here == full_cols) {
        // Whole rows: one run of the memory map.
        STRATA_RETURN_IF_ERROR(backend_.CopyFromHost(src, view.dtype, count, t, offset));
      } else {
        // A column block (a row-parallel shard): its rows gathered on the
        // host first, so the backend sees one copy, not one per row.
        staging_.resize(static_cast<size_t>(count) * es);
        for (int64_t r = 0; r < part.rows; ++r) {
          std::memcpy(staging_.data() + r * cols_here * es, src + r * full_cols * es,
                      cols_here * es);
        }
        STRATA_RETURN_IF_ERROR(
            backend_.CopyFromHost(staging_.data(), view.dtype, count, t, offset));
      }
      offset += count;
      used_.push_back(part.name);
    }
    if (extra_rows > 0) {
      Tensor extra = t.Rows(rows, rows + extra_rows);
      STRATA_RETURN_IF_ERROR(backend_.Fill(extra, 0.0f));
    }
    bytes_ += static_cast<int64_t>(t.nbytes());
    return t;
  }
  absl::StatusOr<Tensor> One(const std::string& name, int64_t rows, int64_t cols) {
    return Stacked({Whole(name, rows, cols)});
  }
  int64_t bytes() const { return bytes_; }
  const std::vector<std::string>& used() const { return used_; }

 private:
  const SafetensorsModel& files_;
  Backend& backend_;
  int64_t bytes_ = 0;
  std::vector<std::string> used_;
  std::vector<uint8_t> staging_;
};

}  // namespace

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& c, const std::string& model_dir,
                                         Backend& backend) {
  STRATA_ASSIGN_OR_RETURN(const TensorParallelShard whole, ShardModel(c, 0, 1));
  return LoadWeights(c, model_dir, backend, whole);
}

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& c, const std::string& model_dir,
                                         Backend& backend, const TensorParallelShard& shard) {
  STRATA_ASSIGN_OR_RETURN(auto files, SafetensorsModel::Open(model_dir));
  Loader load(*files, backend);
  const int64_t h = c.hidden_size, d = c.head_dim, inter = c.intermediate_size;
  const int64_t q_rows = int64_t{c.num_q_heads} * d, kv_rows = int64_t{c.num_kv_heads} * d;
  // The rank's blocks (all of it with one rank).
  const int64_t q_begin = shard.first_q_head * d, q_count = shard.q_heads * d;
  const int64_t kv_begin = shard.first_kv_head * d, kv_count = shard.kv_heads * d;
  const int64_t i_begin = shard.first_intermediate, i_count = shard.intermediate;
  const int64_t v_begin = shard.first_vocab, v_count = shard.vocab;
  // With several ranks, ids of other ranks read a zero row past the rank's.
  const int64_t zero_rows = shard.size > 1 ? 1 : 0;
  ModelWeights w;
  STRATA_ASSIGN_OR_RETURN(
      w.embed,
      load.Stacked({RowBlock("model.embed_tokens.weight", c.vocab_size, h, v_begin, v_count)},
                   zero_rows));
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights l;
    STRATA_ASSIGN_OR_RETURN(l.input_norm, load.One(p + "input_layernorm.weight", h, 0));
    STRATA_ASSIGN_OR_RETURN(
        l.qkv,
        load.Stacked({RowBlock(p + "self_attn.q_proj.weight", q_rows, h, q_begin, q_count),
                      RowBlock(p + "self_attn.k_proj.weight", kv_rows, h, kv_begin, kv_count),
                      RowBlock(p + "self_attn.v_proj.weight", kv_rows, h, kv_begin, kv_count)}));
    if (c.qkv_bias) {
      STRATA_ASSIGN_OR_RETURN(
          l.qkv_bias,
          load.Stacked({RowBlock(p + "self_attn.q_proj.bias", q_rows, 0, q_begin, q_count),
                        RowBlock(p + "self_attn.k_proj.bias", kv_rows, 0, kv_begin, kv_count),
                        RowBlock(p + "self_attn.v_proj.bias", kv_rows, 0, kv_begin, kv_count)}));
    }
    STRATA_ASSIGN_OR_RETURN(
        l.o_proj,
        load.Stacked({ColumnBlock(p + "self_attn.o_proj.weight", h, q_rows, q_begin, q_count)}));
    STRATA_ASSIGN_OR_RETURN(l.post_norm, load.One(p + "post_attention_layernorm.weight", h, 0));
    STRATA_ASSIGN_OR_RETURN(
        l.gate_up, load.Stacked({RowBlock(p + "mlp.gate_proj.weight", inter, h, i_begin, i_count),
                                 RowBlock(p + "mlp.up_proj.weight", inter, h, i_begin, i_count)}));
    STRATA_ASSIGN_OR_RETURN(
        l.down,
        load.Stacked({ColumnBlock(p + "mlp.down_proj.weight", h, inter, i_begin, i_count)}));
    w.layers.push_back(std::move(l));
  }
  STRATA_ASSIGN_OR_RETURN(w.final_norm, load.One("model.norm.weight", h, 0));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed.Rows(0, v_count);
  } else {
    STRATA_ASSIGN_OR_RETURN(
        w.lm_head, load.Stacked({RowBlock("lm_head.weight", c.vocab_size, h, v_begin, v_count)}));
  }
  // Tensors the checkpoint has but the architecture does not use usually mean
  // a config/checkpoint mismatch; rotary caches are the known harmless ones.
  std::set<std::string> used(load.used().begin(), load.used().end());
  for (const auto& [name, view] : files->tensors()) {
    if (used.count(name) == 0 && name.find("rotary_emb.inv_freq") == std::string::npos &&
        !(c.tie_word_embeddings && name == "lm_head.weight")) {
      STRATA_LOG_WARN("{}: tensor \"{}\" is not used by {}", view.file, name, c.architecture);
    }
  }
  STRATA_RETURN_IF_ERROR(backend.Synchronize());
  w.bytes = load.bytes();
  return w;
}

absl::StatusOr<ModelWeights> DummyWeights(const ModelConfig& c, Backend& backend, uint64_t seed) {
  STRATA_ASSIGN_OR_RETURN(const TensorParallelShard whole, ShardModel(c, 0, 1));
  return DummyWeights(c, backend, seed, whole);
}

absl::StatusOr<ModelWeights> DummyWeights(const ModelConfig& c, Backend& backend, uint64_t seed,
                                          const TensorParallelShard& shard) {
  const DType dt = backend.activation_dtype();
  const int64_t h = c.hidden_size, inter = shard.intermediate, vocab = shard.vocab;
  const int64_t qkv_rows = int64_t{shard.q_heads + 2 * shard.kv_heads} * c.head_dim;
  ModelWeights w;
  // Each rank draws its own numbers (the shards of no one model: what is
  // measured is speed).
  uint64_t next_seed = seed + static_cast<uint64_t>(shard.rank) * 1000003u;
  // Uniform in [-a, a] has std a / sqrt(3): a = 0.035 gives the usual 0.02.
  auto random = [&](std::vector<int64_t> shape, float scale = 0.035f) -> absl::StatusOr<Tensor> {
    STRATA_ASSIGN_OR_RETURN(Tensor t, backend.Allocate(dt, std::move(shape)));
    STRATA_RETURN_IF_ERROR(backend.FillRandom(t, next_seed++, scale));
    w.bytes += static_cast<int64_t>(t.nbytes());
    return t;
  };
  auto ones = [&](int64_t n) -> absl::StatusOr<Tensor> {
    STRATA_ASSIGN_OR_RETURN(Tensor t, backend.Allocate(dt, {n}));
    STRATA_RETURN_IF_ERROR(backend.Fill(t, 1.0f));
    w.bytes += static_cast<int64_t>(t.nbytes());
    return t;
  };
  STRATA_ASSIGN_OR_RETURN(w.embed, random({vocab + (shard.size > 1 ? 1 : 0), h}));
  if (shard.size > 1) {
    Tensor zero = w.embed.Rows(vocab, vocab + 1);  // other ranks' ids
    STRATA_RETURN_IF_ERROR(backend.Fill(zero, 0.0f));
  }
  for (int i = 0; i < c.num_layers; ++i) {
    LayerWeights l;
    STRATA_ASSIGN_OR_RETURN(l.input_norm, ones(h));
    STRATA_ASSIGN_OR_RETURN(l.qkv, random({qkv_rows, h}));
    if (c.qkv_bias) {
      STRATA_ASSIGN_OR_RETURN(l.qkv_bias, random({qkv_rows}));
    }
    STRATA_ASSIGN_OR_RETURN(l.o_proj, random({h, int64_t{shard.q_heads} * c.head_dim}));
    STRATA_ASSIGN_OR_RETURN(l.post_norm, ones(h));
    STRATA_ASSIGN_OR_RETURN(l.gate_up, random({2 * inter, h}));
    STRATA_ASSIGN_OR_RETURN(l.down, random({h, inter}));
    w.layers.push_back(std::move(l));
  }
  STRATA_ASSIGN_OR_RETURN(w.final_norm, ones(h));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed.Rows(0, vocab);
  } else {
    STRATA_ASSIGN_OR_RETURN(w.lm_head, random({vocab, h}));
  }
  STRATA_RETURN_IF_ERROR(backend.Synchronize());
  return w;
}

}  // namespace strata::engine

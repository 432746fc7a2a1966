#include "engine/weights.h"

#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"

namespace strata::engine {
namespace {

// Copies named checkpoint tensors into (row ranges of) backend tensors.
class Loader {
 public:
  Loader(const SafetensorsModel& files, Backend& backend) : files_(files), backend_(backend) {}

  // Allocates [rows, cols] and fills it from the named tensors stacked by
  // rows (each must be [its_rows, cols]; pass cols = 0 for 1-D tensors).
  absl::StatusOr<Tensor> Stacked(const std::vector<std::pair<std::string, int64_t>>& parts,
                                 int64_t cols) {
    int64_t rows = 0;
    for (const auto& p : parts) rows += p.second;
    std::vector<int64_t> shape =
        cols > 0 ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{rows};
    STRATA_ASSIGN_OR_RETURN(Tensor t, backend_.Allocate(backend_.activation_dtype(), shape));
    int64_t offset = 0;
    for (const auto& [name, part_rows] : parts) {
      STRATA_ASSIGN_OR_RETURN(TensorView view, files_.Get(name));
      std::vector<int64_t> want =
          cols > 0 ? std::vector<int64_t>{part_rows, cols} : std::vector<int64_t>{part_rows};
      if (view.shape != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            view.file, ": tensor \"", name, "\" has shape [", absl::StrJoin(view.shape, ", "),
            "], expected [", absl::StrJoin(want, ", "), "] from config.json"));
      }
      if (view.dtype == DType::kI32) {
        return absl::InvalidArgumentError(absl::StrCat(
            view.file, ": tensor \"", name, "\" has dtype I32; weights must be F32, F16 or BF16"));
      }
      STRATA_RETURN_IF_ERROR(backend_.CopyFromHost(view.data, view.dtype, view.numel(), t, offset));
      offset += view.numel();
      used_.push_back(name);
    }
    bytes_ += static_cast<int64_t>(t.nbytes());
    return t;
  }
  absl::StatusOr<Tensor> One(const std::string& name, int64_t rows, int64_t cols) {
    return Stacked({{name, rows}}, cols);
  }
  int64_t bytes() const { return bytes_; }
  const std::vector<std::string>& used() const { return used_; }

 private:
  const SafetensorsModel& files_;
  Backend& backend_;
  int64_t bytes_ = 0;
  std::vector<std::string> used_;
};

}  // namespace

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& c, const std::string& model_dir,
                                         Backend& backend) {
  STRATA_ASSIGN_OR_RETURN(auto files, SafetensorsModel::Open(model_dir));
  Loader load(*files, backend);
  const int64_t h = c.hidden_size, d = c.head_dim, inter = c.intermediate_size;
  const int64_t q_rows = int64_t{c.num_q_heads} * d, kv_rows = int64_t{c.num_kv_heads} * d;
  ModelWeights w;
  STRATA_ASSIGN_OR_RETURN(w.embed, load.One("model.embed_tokens.weight", c.vocab_size, h));
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights l;
    STRATA_ASSIGN_OR_RETURN(l.input_norm, load.One(p + "input_layernorm.weight", h, 0));
    STRATA_ASSIGN_OR_RETURN(l.qkv, load.Stacked({{p + "self_attn.q_proj.weight", q_rows},
                                                 {p + "self_attn.k_proj.weight", kv_rows},
                                                 {p + "self_attn.v_proj.weight", kv_rows}},
                                                h));
    if (c.qkv_bias) {
      STRATA_ASSIGN_OR_RETURN(l.qkv_bias, load.Stacked({{p + "self_attn.q_proj.bias", q_rows},
                                                        {p + "self_attn.k_proj.bias", kv_rows},
                                                        {p + "self_attn.v_proj.bias", kv_rows}},
                                                       0));
    }
    STRATA_ASSIGN_OR_RETURN(l.o_proj, load.One(p + "self_attn.o_proj.weight", h, q_rows));
    STRATA_ASSIGN_OR_RETURN(l.post_norm, load.One(p + "post_attention_layernorm.weight", h, 0));
    STRATA_ASSIGN_OR_RETURN(
        l.gate_up,
        load.Stacked({{p + "mlp.gate_proj.weight", inter}, {p + "mlp.up_proj.weight", inter}}, h));
    STRATA_ASSIGN_OR_RETURN(l.down, load.One(p + "mlp.down_proj.weight", h, inter));
    w.layers.push_back(std::move(l));
  }
  STRATA_ASSIGN_OR_RETURN(w.final_norm, load.One("model.norm.weight", h, 0));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    STRATA_ASSIGN_OR_RETURN(w.lm_head, load.One("lm_head.weight", c.vocab_size, h));
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
  const DType dt = backend.activation_dtype();
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  const int64_t qkv_rows = int64_t{c.num_q_heads + 2 * c.num_kv_heads} * c.head_dim;
  ModelWeights w;
  uint64_t next_seed = seed;
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
  STRATA_ASSIGN_OR_RETURN(w.embed, random({c.vocab_size, h}));
  for (int i = 0; i < c.num_layers; ++i) {
    LayerWeights l;
    STRATA_ASSIGN_OR_RETURN(l.input_norm, ones(h));
    STRATA_ASSIGN_OR_RETURN(l.qkv, random({qkv_rows, h}));
    if (c.qkv_bias) {
      STRATA_ASSIGN_OR_RETURN(l.qkv_bias, random({qkv_rows}));
    }
    STRATA_ASSIGN_OR_RETURN(l.o_proj, random({h, int64_t{c.num_q_heads} * c.head_dim}));
    STRATA_ASSIGN_OR_RETURN(l.post_norm, ones(h));
    STRATA_ASSIGN_OR_RETURN(l.gate_up, random({2 * inter, h}));
    STRATA_ASSIGN_OR_RETURN(l.down, random({h, inter}));
    w.layers.push_back(std::move(l));
  }
  STRATA_ASSIGN_OR_RETURN(w.final_norm, ones(h));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    STRATA_ASSIGN_OR_RETURN(w.lm_head, random({c.vocab_size, h}));
  }
  STRATA_RETURN_IF_ERROR(backend.Synchronize());
  return w;
}

}  // namespace strata::engine

// ModelConfig: the architecture of a Llama-family decoder, read from a
// Hugging Face config.json or built from a named preset.
//
// Supported: LlamaForCausalLM (incl. Llama-3.x "llama3" rope scaling),
// MistralForCausalLM (incl. sliding-window attention) and Qwen2ForCausalLM
// (q/k/v biases), with grouped-query attention, tied embeddings and any
// head_dim. Anything else is rejected with an error naming the field.
//
// Thread-safety: a plain value.
#ifndef STRATA_ENGINE_MODEL_CONFIG_H_
#define STRATA_ENGINE_MODEL_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::engine {

struct RopeConfig {
  std::string type = "default";  // "default", "linear" or "llama3"
  double theta = 10000.0;
  double factor = 1.0;
  // llama3 only:
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;
  int sliding_window = 0;  // 0: unlimited
  std::vector<int> bos_token_ids;
  std::vector<int> eos_token_ids;

  // The rotary inverse frequencies, one per pair of head dimensions, with
  // the configured scaling applied (matches Hugging Face's computation).
  std::vector<float> RopeInvFreq() const;

  // Total parameter count (for logs and roofline figures).
  int64_t NumParameters() const;

  // Checks internal consistency (positive sizes, heads divide, ...).
  absl::Status Validate() const;
};

// Parses a config.json. `source` names it in errors (usually its path).
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source);
// Reads `model_dir`/config.json and generation_config.json (eos ids).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);
// Named shapes for --dummy-weights: "llama-3-8b", "llama-3-1b",
// "qwen2-0.5b", "tiny".
absl::StatusOr<ModelConfig> PresetModelConfig(const std::string& name);
std::vector<std::string> PresetNames();

}  // namespace strata::engine

#endif  // STRATA_ENGINE_MODEL_CONFIG_H_

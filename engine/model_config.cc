#include "engine/model_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/mapped_file.h"
#include "nlohmann/json.hpp"

namespace strata::engine {
namespace {

using nlohmann::json;

// Typed field access with errors that name the file and the field.
class Fields {
 public:
  Fields(const json& j, const std::string& source) : j_(j), source_(source) {}

  absl::Status Error(const std::string& field, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field \"", field, "\" ", what));
  }
  bool Has(const std::string& field) const {
    const auto it = j_.find(field);
    return it != j_.end() && !it->is_null();
  }
  absl::StatusOr<int> Int(const std::string& field,
                          std::optional<int> fallback = std::nullopt) const {
    const auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) {
      if (fallback) return *fallback;
      return Error(field, "is missing");
    }
    if (!it->is_number_integer()) return Error(field, "must be an integer");
    const int64_t v = it->get<int64_t>();
    if (v < 0 || v > (int64_t{1} << 30)) return Error(field, absl::StrCat("is out of range: ", v));
    return static_cast<int>(v);
  }
  absl::StatusOr<double> Double(const std::string& field,
                                std::optional<double> fallback = std::nullopt) const {
    const auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) {
      if (fallback) return *fallback;
      return Error(field, "is missing");
    }
    if (!it->is_number()) return Error(field, "must be a number");
    return it->get<double>();
  }
  absl::StatusOr<bool> Bool(const std::string& field, bool fallback) const {
    const auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) return Error(field, "must be true or false");
    return it->get<bool>();
  }
  absl::StatusOr<std::string> String(const std::string& field, std::string fallback) const {
    const auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) return fallback;
    if (!it->is_string()) return Error(field, "must be a string");
    return it->get<std::string>();
  }
  // A token id or a list of them (bos/eos ids). Every id must be an integer
  // in [0, 2^31): nothing is truncated to int, and the error names the
  // field and the value. Validate() then checks them against vocab_size.
  absl::StatusOr<std::vector<int>> TokenIds(const std::string& field) const {
    std::vector<int> out;
    const auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) return out;
    if (!it->is_number_integer() && !it->is_array()) {
      return Error(field, "must be an integer token id or a list of them");
    }
    const bool list = it->is_array();
    std::vector<const json*> values;
    if (list) {
      for (const json& v : *it) values.push_back(&v);
    } else {
      values.push_back(&*it);
    }
    for (const json* value : values) {
      const json& v = *value;
      if (!v.is_number_integer()) {
        return Error(field,
                     list ? "must hold only integer token ids" : "must be an integer token id");
      }
      const bool in_range = v.is_number_unsigned()
                                ? v.get<uint64_t>() <= uint64_t{INT32_MAX}
                                : v.get<int64_t>() >= 0 && v.get<int64_t>() <= int64_t{INT32_MAX};
      if (!in_range) {
        return Error(field, absl::StrCat("holds token id ",
                                         v.is_number_unsigned() ? absl::StrCat(v.get<uint64_t>())
                                                                : absl::StrCat(v.get<int64_t>()),
                                         ", outside [0, 2147483647]"));
      }
      out.push_back(static_cast<int>(v.get<int64_t>()));
    }
    return out;
  }

 private:
  const json& j_;
  const std::string& source_;
};

absl::StatusOr<RopeConfig> ParseRope(const json& root, const std::string& source) {
  RopeConfig rope;
  Fields top(root, source);
  STRATA_ASSIGN_OR_RETURN(rope.theta, top.Double("rope_theta", 10000.0));
  // transformers < 5 writes "rope_scaling" (+ top-level rope_theta);
  // transformers 5 writes "rope_parameters" holding rope_theta too.
  const json* params = nullptr;
  std::string params_name;
  for (const char* name : {"rope_parameters", "rope_scaling"}) {
    const auto it = root.find(name);
    if (it != root.end() && !it->is_null()) {
      if (!it->is_object()) return top.Error(name, "must be an object");
      params = &*it;
      params_name = name;
      break;
    }
  }
  if (params == nullptr) return rope;
  const std::string prefix = source + " " + params_name;
  Fields p(*params, prefix);
  STRATA_ASSIGN_OR_RETURN(rope.theta, p.Double("rope_theta", rope.theta));
  STRATA_ASSIGN_OR_RETURN(std::string type, p.String("rope_type", ""));
  if (type.empty()) {
    STRATA_ASSIGN_OR_RETURN(type, p.String("type", "default"));
  }
  rope.type = type;
  if (type == "default") return rope;
  if (type == "linear") {
    STRATA_ASSIGN_OR_RETURN(rope.factor, p.Double("factor"));
  } else if (type == "llama3") {
    STRATA_ASSIGN_OR_RETURN(rope.factor, p.Double("factor"));
    STRATA_ASSIGN_OR_RETURN(rope.low_freq_factor, p.Double("low_freq_factor"));
    STRATA_ASSIGN_OR_RETURN(rope.high_freq_factor, p.Double("high_freq_factor"));
    STRATA_ASSIGN_OR_RETURN(rope.original_max_position_embeddings,
                            p.Double("original_max_position_embeddings"));
    if (!(rope.high_freq_factor > rope.low_freq_factor)) {
      return p.Error("high_freq_factor", "must exceed low_freq_factor");
    }
  } else {
    return absl::UnimplementedError(absl::StrCat(prefix, ": rope type \"", type,
                                                 "\" is not supported (default, linear, llama3)"));
  }
  if (!(rope.factor > 0)) return p.Error("factor", "must be positive");
  return rope;
}

// The largest model Validate accepts: 2^45 (35 trillion) parameters, far
// beyond any real checkpoint. The bound keeps every tensor's element count,
// and the sums of them, exact in int64 (and in double).
constexpr double kMaxParameters = static_cast<double>(int64_t{1} << 45);

// The parameter count in floating point, which cannot overflow whatever the
// sizes; exact for any count up to 2^53.
double ParameterCount(const ModelConfig& c) {
  const double h = c.hidden_size;
  const double qkv = (static_cast<double>(c.num_q_heads) + 2.0 * c.num_kv_heads) * c.head_dim;
  const double per_layer = h * qkv + (c.qkv_bias ? qkv : 0.0) +
                           static_cast<double>(c.num_q_heads) * c.head_dim * h +
                           3.0 * h * c.intermediate_size + 2.0 * h;
  return static_cast<double>(c.vocab_size) * h * (c.tie_word_embeddings ? 1.0 : 2.0) +
         c.num_layers * per_layer + h;
}

}  // namespace

std::vector<float> ModelConfig::RopeInvFreq() const {
  const int half = head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    // Hugging Face computes the exponent in fp32; so do we.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(rope.theta), exponent);
  }
  if (rope.type == "linear") {
    for (float& f : inv) f = static_cast<float>(f / rope.factor);
  } else if (rope.type == "llama3") {
    const double old_len = rope.original_max_position_embeddings;
    const double low_wavelen = old_len / rope.low_freq_factor;
    const double high_wavelen = old_len / rope.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rope.factor);  // low frequencies: scaled
      } else if (wavelen >= high_wavelen) {       // medium: interpolate
        const double smooth = (old_len / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }  // high frequencies: unchanged
    }
  }
  return inv;
}

int64_t ModelConfig::NumParameters() const {
  const double n = ParameterCount(*this);
  // Saturates for sizes Validate refuses.
  if (n >= static_cast<double>(int64_t{1} << 62)) return int64_t{1} << 62;
  return static_cast<int64_t>(n);
}

absl::Status ModelConfig::Validate() const {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("model config (", architecture, "): ", what));
  };
  if (vocab_size <= 0) return bad("vocab_size must be positive");
  if (hidden_size <= 0) return bad("hidden_size must be positive");
  if (intermediate_size <= 0) return bad("intermediate_size must be positive");
  if (num_layers <= 0) return bad("num_hidden_layers must be positive");
  if (num_q_heads <= 0) return bad("num_attention_heads must be positive");
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) {
    return bad(absl::StrCat("num_key_value_heads (", num_kv_heads,
                            ") must divide num_attention_heads (", num_q_heads, ")"));
  }
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 512) {
    return bad(absl::StrCat("head_dim must be even and at most 512, got ", head_dim));
  }
  if (max_position_embeddings <= 0) return bad("max_position_embeddings must be positive");
  if (!(rms_norm_eps > 0)) return bad("rms_norm_eps must be positive");
  if (!(rope.theta > 0)) return bad("rope_theta must be positive");
  // Sizes the runtime multiplies out: the fused q/k/v row width must fit an
  // int, and the whole model int64 element counts with room to spare.
  const int64_t qkv_width = (int64_t{num_q_heads} + 2 * int64_t{num_kv_heads}) * int64_t{head_dim};
  if (qkv_width > INT32_MAX) {
    return bad(absl::StrCat("num_attention_heads and num_key_value_heads are implausibly large (",
                            num_q_heads, ", ", num_kv_heads, ")"));
  }
  if (ParameterCount(*this) > kMaxParameters) {
    return bad(absl::StrFormat("the sizes are implausibly large (%.3g parameters)",
                               ParameterCount(*this)));
  }
  for (int id : bos_token_ids) {
    if (id < 0 || id >= vocab_size)
      return bad(absl::StrCat("bos_token_id ", id, " outside the vocabulary"));
  }
  for (int id : eos_token_ids) {
    if (id < 0 || id >= vocab_size)
      return bad(absl::StrCat("eos_token_id ", id, " outside the vocabulary"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& source) {
  const json root = json::parse(json_text, nullptr, false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a valid JSON object"));
  }
  Fields f(root, source);
  ModelConfig c;
  const auto arch_it = root.find("architectures");
  if (arch_it == root.end() || !arch_it->is_array() || arch_it->empty() ||
      !(*arch_it)[0].is_string()) {
    return f.Error("architectures", "must be a non-empty list of names");
  }
  c.architecture = (*arch_it)[0].get<std::string>();
  const bool llama = c.architecture == "LlamaForCausalLM";
  const bool mistral = c.architecture == "MistralForCausalLM";
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  if (!llama && !mistral && !qwen2) {
    return absl::UnimplementedError(absl::StrCat(
        source, ": architecture \"", c.architecture,
        "\" is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"));
  }
  STRATA_ASSIGN_OR_RETURN(std::string act, f.String("hidden_act", "silu"));
  if (act != "silu")
    return f.Error("hidden_act", absl::StrCat("\"", act, "\" is not supported (silu)"));
  STRATA_ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size"));
  STRATA_ASSIGN_OR_RETURN(c.hidden_size, f.Int("hidden_size"));
  STRATA_ASSIGN_OR_RETURN(c.intermediate_size, f.Int("intermediate_size"));
  STRATA_ASSIGN_OR_RETURN(c.num_layers, f.Int("num_hidden_layers"));
  STRATA_ASSIGN_OR_RETURN(c.num_q_heads, f.Int("num_attention_heads"));
  STRATA_ASSIGN_OR_RETURN(c.num_kv_heads, f.Int("num_key_value_heads", c.num_q_heads));
  if (c.num_q_heads == 0) return f.Error("num_attention_heads", "must be positive");
  STRATA_ASSIGN_OR_RETURN(c.head_dim, f.Int("head_dim", c.hidden_size / c.num_q_heads));
  STRATA_ASSIGN_OR_RETURN(c.max_position_embeddings, f.Int("max_position_embeddings", 4096));
  STRATA_ASSIGN_OR_RETURN(c.rms_norm_eps, f.Double("rms_norm_eps", 1e-6));
  STRATA_ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", false));
  STRATA_ASSIGN_OR_RETURN(c.rope, ParseRope(root, source));
  STRATA_ASSIGN_OR_RETURN(c.bos_token_ids, f.TokenIds("bos_token_id"));
  STRATA_ASSIGN_OR_RETURN(c.eos_token_ids, f.TokenIds("eos_token_id"));
  if (qwen2) {
    c.qkv_bias = true;
    STRATA_ASSIGN_OR_RETURN(bool use_sliding, f.Bool("use_sliding_window", false));
    if (use_sliding) {
      return absl::UnimplementedError(
          absl::StrCat(source, ": Qwen2 use_sliding_window=true is not supported"));
    }
  } else {
    STRATA_ASSIGN_OR_RETURN(c.qkv_bias, f.Bool("attention_bias", false));
    STRATA_ASSIGN_OR_RETURN(bool mlp_bias, f.Bool("mlp_bias", false));
    if (mlp_bias) return f.Error("mlp_bias", "true is not supported");
  }
  if (mistral) {
    STRATA_ASSIGN_OR_RETURN(c.sliding_window, f.Int("sliding_window", 0));
  }
  if (absl::Status valid = c.Validate(); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", valid.message()));
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const std::string path = (fs::path(model_dir) / "config.json").string();
  if (!fs::exists(path)) return absl::NotFoundError(absl::StrCat(path, ": missing model config"));
  STRATA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  STRATA_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, path));
  // generation_config.json may declare more stop tokens (e.g. Llama-3's <|eot_id|>).
  const std::string gen_path = (fs::path(model_dir) / "generation_config.json").string();
  if (fs::exists(gen_path)) {
    STRATA_ASSIGN_OR_RETURN(std::string gen_text, ReadFileToString(gen_path));
    const json gen = json::parse(gen_text, nullptr, false);
    if (gen.is_discarded() || !gen.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(gen_path, ": not a valid JSON object"));
    }
    STRATA_ASSIGN_OR_RETURN(std::vector<int> eos, Fields(gen, gen_path).TokenIds("eos_token_id"));
    for (int id : eos) {
      if (id >= config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(gen_path, ": eos_token_id ", id,
                                                       " outside the vocabulary (vocab_size ",
                                                       config.vocab_size, ")"));
      }
      if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) ==
          config.eos_token_ids.end()) {
        config.eos_token_ids.push_back(id);
      }
    }
  }
  return config;
}

std::vector<std::string> PresetNames() {
  return {"llama-3-8b", "llama-3-70b", "llama-3-1b", "qwen2-0.5b", "tiny"};
}

absl::StatusOr<ModelConfig> PresetModelConfig(const std::string& name) {
  ModelConfig c;
  if (name == "llama-3-8b") {  // Llama-3.1-8B shapes
    c.architecture = "LlamaForCausalLM";
    c.vocab_size = 128256, c.hidden_size = 4096, c.intermediate_size = 14336;
    c.num_layers = 32, c.num_q_heads = 32, c.num_kv_heads = 8, c.head_dim = 128;
    c.max_position_embeddings = 131072;
    c.rope = {"llama3", 500000.0, 8.0, 1.0, 4.0, 8192.0};
    c.bos_token_ids = {128000}, c.eos_token_ids = {128001, 128009};
  } else if (name == "llama-3-70b") {  // Llama-3.1-70B shapes: 141 GB in bf16, two H100s at least
    c.architecture = "LlamaForCausalLM";
    c.vocab_size = 128256, c.hidden_size = 8192, c.intermediate_size = 28672;
    c.num_layers = 80, c.num_q_heads = 64, c.num_kv_heads = 8, c.head_dim = 128;
    c.max_position_embeddings = 131072;
    c.rope = {"llama3", 500000.0, 8.0, 1.0, 4.0, 8192.0};
    c.bos_token_ids = {128000}, c.eos_token_ids = {128001, 128009};
  } else if (name == "llama-3-1b") {  // Llama-3.2-1B shapes
    c.architecture = "LlamaForCausalLM";
    c.vocab_size = 128256, c.hidden_size = 2048, c.intermediate_size = 8192;
    c.num_layers = 16, c.num_q_heads = 32, c.num_kv_heads = 8, c.head_dim = 64;
    c.max_position_embeddings = 131072, c.tie_word_embeddings = true;
    c.rope = {"llama3", 500000.0, 32.0, 1.0, 4.0, 8192.0};
    c.bos_token_ids = {128000}, c.eos_token_ids = {128001, 128009};
  } else if (name == "qwen2-0.5b") {  // Qwen2-0.5B shapes
    c.architecture = "Qwen2ForCausalLM";
    c.vocab_size = 151936, c.hidden_size = 896, c.intermediate_size = 4864;
    c.num_layers = 24, c.num_q_heads = 14, c.num_kv_heads = 2, c.head_dim = 64;
    c.max_position_embeddings = 32768, c.tie_word_embeddings = true, c.qkv_bias = true;
    c.rms_norm_eps = 1e-6;
    c.rope.theta = 1000000.0;
    c.eos_token_ids = {151643};
  } else if (name == "tiny") {
    c.architecture = "LlamaForCausalLM";
    c.vocab_size = 512, c.hidden_size = 64, c.intermediate_size = 160;
    c.num_layers = 2, c.num_q_heads = 4, c.num_kv_heads = 2, c.head_dim = 16;
    c.max_position_embeddings = 2048;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown model preset \"", name, "\" (known: ", absl::StrJoin(PresetNames(), ", "), ")"));
  }
  STRATA_RETURN_IF_ERROR(c.Validate());
  return c;
}

}  // namespace strata::engine

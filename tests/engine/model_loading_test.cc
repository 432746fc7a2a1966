// Every loader error names the file and what is wrong, and never crashes:
// missing files, bad JSON, unsupported architectures and rope types,
// truncated safetensors, missing tensors, wrong shapes and dtypes.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "engine/cpu_backend.h"
#include "engine/model_config.h"
#include "engine/model_loader.h"
#include "engine/safetensors.h"
#include "engine/weights.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

using ::testing::HasSubstr;
using testing_util::FixturePath;
using testing_util::TempDir;

// Builds a safetensors file from (name, dtype, shape) with zeroed data.
std::string MakeSafetensors(
    const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& specs) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, dtype, shape] : specs) {
    uint64_t n = dtype == "F32" || dtype == "I32" ? 4 : 2;
    for (int64_t d : shape) n *= d;
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  const std::string h = header.dump();
  std::string out(8, '\0');
  const uint64_t len = h.size();
  std::memcpy(out.data(), &len, 8);
  return out + h + std::string(offset, '\x01');
}

TEST(ModelConfigTest, ParsesEveryGoldenConfig) {
  for (const char* name : {"llama_gqa", "qwen2_tied", "llama3_rope", "mistral_window"}) {
    auto c = LoadModelConfig(FixturePath(std::string("models/") + name));
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
  }
  auto llama3 = LoadModelConfig(FixturePath("models/llama3_rope"));
  EXPECT_EQ(llama3->head_dim, 48);
  EXPECT_EQ(llama3->rope.type, "llama3");
  EXPECT_DOUBLE_EQ(llama3->rope.theta, 500000.0);
  auto qwen = LoadModelConfig(FixturePath("models/qwen2_tied"));
  EXPECT_TRUE(qwen->qkv_bias);
  EXPECT_TRUE(qwen->tie_word_embeddings);
  EXPECT_EQ(qwen->num_kv_heads, 1);
  auto mistral = LoadModelConfig(FixturePath("models/mistral_window"));
  EXPECT_EQ(mistral->sliding_window, 16);
}

TEST(ModelConfigTest, AcceptsLegacyRopeScalingField) {
  auto c =
      ParseModelConfig(R"({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":256,
    "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
    "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
    "high_freq_factor":4.0,"original_max_position_embeddings":8192}})",
                       "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  // Llama-3 scaling divides the lowest frequencies by the factor and leaves
  // the highest alone.
  const std::vector<float> inv = c->RopeInvFreq();
  EXPECT_FLOAT_EQ(inv[0], 1.0f);
  ModelConfig unscaled = *c;
  unscaled.rope.type = "default";
  EXPECT_FLOAT_EQ(inv.back(), unscaled.RopeInvFreq().back() / 8.0f);
}

TEST(ModelConfigTest, RejectsBadConfigsWithClearErrors) {
  const std::string base = R"("vocab_size":10,"hidden_size":8,"intermediate_size":16,
    "num_hidden_layers":1,"num_attention_heads":2)";
  struct Case {
    std::string json, message;
  } cases[] = {
      {"{not json", "not a valid JSON"},
      {R"({"architectures":["GPT2LMHeadModel"],)" + base + "}",
       "GPT2LMHeadModel\" is not supported"},
      {R"({"architectures":[],)" + base + "}", "architectures"},
      {R"({"architectures":["LlamaForCausalLM"],"vocab_size":10})", "hidden_size\" is missing"},
      {R"({"architectures":["LlamaForCausalLM"],)" + base + R"(,"num_key_value_heads":3})",
       "must divide"},
      {R"({"architectures":["LlamaForCausalLM"],)" + base + R"(,"hidden_size":"big"})",
       "must be an integer"},
      {R"({"architectures":["LlamaForCausalLM"],)" + base +
           R"(,"rope_scaling":{"type":"yarn","factor":2}})",
       "rope type \"yarn\""},
      {R"({"architectures":["LlamaForCausalLM"],)" + base + R"(,"hidden_act":"gelu"})",
       "hidden_act"},
      {R"({"architectures":["LlamaForCausalLM"],)" + base + R"(,"eos_token_id":99})",
       "eos_token_id 99"},
  };
  for (const auto& c : cases) {
    auto parsed = ParseModelConfig(c.json, "dir/config.json");
    ASSERT_FALSE(parsed.ok()) << c.json;
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(c.message)) << c.json;
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("dir/config.json")) << c.json;
  }
}

TEST(ModelConfigTest, PresetsAreValid) {
  for (const auto& name : PresetNames()) EXPECT_TRUE(PresetModelConfig(name).ok()) << name;
  auto p = PresetModelConfig("llama-3-8b");
  EXPECT_NEAR(p->NumParameters() / 1e9, 8.03, 0.01);
  EXPECT_FALSE(PresetModelConfig("gpt-5").ok());
}

TEST(SafetensorsTest, RejectsCorruptFiles) {
  TempDir dir;
  const std::string good = MakeSafetensors({{"a", "F32", {2, 3}}});
  struct Case {
    std::string bytes, message;
  } cases[] = {
      {"abc", "shorter than its 8-byte header"},
      {good.substr(0, 20), "exceeds the file size"},
      {good.substr(0, good.size() - 4), "outside the data section"},
      {std::string("\x05\0\0\0\0\0\0\0{oops", 13), "not a JSON object"},
      {MakeSafetensors({{"a", "F64", {2}}}), "unsupported dtype \"F64\""},
  };
  for (const auto& c : cases) {
    const std::string path = dir.Write("x.safetensors", c.bytes);
    auto f = SafetensorsFile::Open(path);
    ASSERT_FALSE(f.ok()) << c.message;
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(c.message));
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(path));
  }
  // Size that does not match the shape.
  {
    nlohmann::json h = {{"a", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 20}}}}};
    const std::string hs = h.dump();
    std::string bytes(8, '\0');
    const uint64_t len = hs.size();
    std::memcpy(bytes.data(), &len, 8);
    bytes += hs + std::string(24, '\0');
    auto f = SafetensorsFile::Open(dir.Write("y.safetensors", bytes));
    ASSERT_FALSE(f.ok());
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("tensor \"a\": holds 20 bytes"));
  }
}

TEST(ModelLoadingTest, MissingDirectoryAndFiles) {
  EXPECT_THAT(std::string(testing_util::LoadModelStatus("/nonexistent/model").message()),
              HasSubstr("not a directory"));
  TempDir dir;
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("config.json"));
  dir.CopyFrom(FixturePath("models/llama_gqa"));
  std::filesystem::remove(dir.path() + "/model.safetensors");
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("no model.safetensors"));
}

TEST(ModelLoadingTest, MissingTensorWrongShapeWrongDtype) {
  TempDir dir;
  dir.CopyFrom(FixturePath("models/llama_gqa"));
  const std::string weights = dir.path() + "/model.safetensors";
  // Missing tensor: a checkpoint without the final norm.
  std::string head = R"({"architectures":["LlamaForCausalLM"],"vocab_size":4,"hidden_size":8,
    "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1})";
  dir.Write("config.json", head);
  auto layer = [](const std::string& qdtype, std::vector<int64_t> qshape) {
    return std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>{
        {"model.embed_tokens.weight", "BF16", {4, 8}},
        {"model.layers.0.input_layernorm.weight", "F32", {8}},
        {"model.layers.0.self_attn.q_proj.weight", qdtype, qshape},
        {"model.layers.0.self_attn.k_proj.weight", "F16", {4, 8}},
        {"model.layers.0.self_attn.v_proj.weight", "F16", {4, 8}},
        {"model.layers.0.self_attn.o_proj.weight", "F32", {8, 8}},
        {"model.layers.0.post_attention_layernorm.weight", "F32", {8}},
        {"model.layers.0.mlp.gate_proj.weight", "BF16", {16, 8}},
        {"model.layers.0.mlp.up_proj.weight", "BF16", {16, 8}},
        {"model.layers.0.mlp.down_proj.weight", "BF16", {8, 16}},
        {"lm_head.weight", "F32", {4, 8}}};
  };
  dir.Write("model.safetensors", MakeSafetensors(layer("F32", {8, 8})));
  absl::Status s = testing_util::LoadModelStatus(dir.path());
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing tensor \"model.norm.weight\""));

  auto with_norm = [&](auto specs) {
    specs.push_back({"model.norm.weight", "F32", {8}});
    return specs;
  };
  dir.Write("model.safetensors", MakeSafetensors(with_norm(layer("F32", {8, 8}))));
  EXPECT_TRUE(testing_util::LoadModelStatus(dir.path()).ok())
      << testing_util::LoadModelStatus(dir.path());

  dir.Write("model.safetensors", MakeSafetensors(with_norm(layer("F32", {8, 6}))));
  s = testing_util::LoadModelStatus(dir.path());
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr("\"model.layers.0.self_attn.q_proj.weight\" has shape [8, 6], expected [8, 8]"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(weights));

  dir.Write("model.safetensors", MakeSafetensors(with_norm(layer("I32", {8, 8}))));
  s = testing_util::LoadModelStatus(dir.path());
  EXPECT_THAT(std::string(s.message()), HasSubstr("has dtype I32"));
}

TEST(ModelLoadingTest, ShardIndexErrors) {
  TempDir dir;
  dir.CopyFrom(FixturePath("models/llama3_rope"));
  const std::string index = dir.path() + "/model.safetensors.index.json";
  // A shard that the index names but that is gone.
  std::filesystem::remove(dir.path() + "/model-00003-of-00007.safetensors");
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("model-00003-of-00007.safetensors"));
  dir.Write("model.safetensors.index.json", "{\"weight_map\": 7}");
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("weight_map"));
  dir.Write("model.safetensors.index.json", "not json");
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("not valid JSON"));
  dir.Write("model.safetensors.index.json", R"({"weight_map":{"a":"../../etc/passwd"}})");
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("not a plain file name"));
}

TEST(ModelLoadingTest, TruncatedShard) {
  TempDir dir;
  dir.CopyFrom(FixturePath("models/qwen2_tied"));
  const std::string path = dir.path() + "/model.safetensors";
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  EXPECT_THAT(std::string(testing_util::LoadModelStatus(dir.path()).message()),
              HasSubstr("truncated file?"));
}

TEST(ModelLoadingTest, DummyWeightsFillTheTinyPresetWithRandomValues) {
  auto backend = CreateCpuBackend(1);
  auto config = PresetModelConfig("tiny");
  ASSERT_TRUE(config.ok());
  auto w = DummyWeights(*config, *backend, 7);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->layers.size(), 2u);
  EXPECT_EQ(w->bytes, config->NumParameters() * 4);
  // Values are random, in range and not all equal.
  std::vector<float> embed(w->embed.numel());
  ASSERT_TRUE(backend->CopyToHost(w->embed, embed.data()).ok());
  float lo = 1, hi = -1;
  for (float v : embed) lo = std::min(lo, v), hi = std::max(hi, v);
  EXPECT_LT(lo, -0.03f);
  EXPECT_GT(hi, 0.03f);
  EXPECT_LE(hi, 0.035f);
}

}  // namespace
}  // namespace strata::engine

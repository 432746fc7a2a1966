// The CPU backend against Hugging Face transformers: logits for fixed
// prompts and 32-step greedy continuations, for every golden model made by
// tools/make_golden.py (Llama GQA fp32, Qwen2 biases + tied bf16, Llama-3
// rope scaling + head_dim 48 fp16 sharded, Mistral sliding window).
#include <cmath>
#include <string>
#include <vector>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

using testing_util::FixturePath;

struct Golden {
  std::vector<int32_t> prompt;
  std::vector<float> logits;  // [len, vocab]
  std::vector<int32_t> greedy;
};

std::vector<Golden> ReadGolden(const std::string& model_dir) {
  auto file = SafetensorsFile::Open(model_dir + "/golden.safetensors");
  EXPECT_TRUE(file.ok()) << file.status();
  std::vector<Golden> out;
  for (int i = 0;; ++i) {
    const auto& t = (*file)->tensors();
    auto p = t.find("prompt_" + std::to_string(i));
    if (p == t.end()) break;
    const auto& l = t.at("logits_" + std::to_string(i));
    const auto& g = t.at("greedy_" + std::to_string(i));
    Golden gold;
    gold.prompt.assign(reinterpret_cast<const int32_t*>(p->second.data),
                       reinterpret_cast<const int32_t*>(p->second.data) + p->second.numel());
    gold.logits.assign(reinterpret_cast<const float*>(l.data),
                       reinterpret_cast<const float*>(l.data) + l.numel());
    gold.greedy.assign(reinterpret_cast<const int32_t*>(g.data),
                       reinterpret_cast<const int32_t*>(g.data) + g.numel());
    out.push_back(std::move(gold));
  }
  return out;
}

// Max over rows of ||a_row - b_row|| / ||b_row||.
double MaxRowRelError(const float* a, const float* b, int rows, int cols) {
  double worst = 0;
  for (int r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (int c = 0; c < cols; ++c) {
      const double d = double{a[r * cols + c]} - b[r * cols + c];
      num += d * d;
      den += double{b[r * cols + c]} * b[r * cols + c];
    }
    worst = std::max(worst, std::sqrt(num / den));
  }
  return worst;
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, CpuLogitsMatchTransformers) {
  const std::string dir = FixturePath("models/" + GetParam());
  auto backend = CreateCpuBackend(2);
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 128;
  options.max_batch_tokens = 64;
  options.max_logit_rows = 64;
  auto loaded = LoadModel({dir, ""}, backend.get(), options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  Model& model = *loaded->model;
  const int vocab = model.config().vocab_size;
  for (const Golden& gold : ReadGolden(dir)) {
    const int n = static_cast<int>(gold.prompt.size());
    StepInput in;
    in.token_ids = gold.prompt;
    for (int i = 0; i < n; ++i) in.positions.push_back(i);
    in.query_start = {0, n};
    in.context_len = {n};
    in.block_tables = {{}};
    for (int p = 0; p * options.page_size < n; ++p) in.block_tables[0].push_back(p);
    for (int i = 0; i < n; ++i) in.logit_rows.push_back(i);
    auto logits = model.Forward(in);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_EQ(logits->size(), gold.logits.size());
    const double err = MaxRowRelError(logits->data(), gold.logits.data(), n, vocab);
    EXPECT_LT(err, 1e-3) << GetParam() << " prompt of " << n << " tokens";
  }
}

TEST_P(GoldenTest, CpuGreedyMatchesTransformers) {
  const std::string dir = FixturePath("models/" + GetParam());
  auto backend = CreateCpuBackend(2);
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 128;
  options.max_batch_tokens = 64;
  options.page_size = 8;  // several pages per sequence
  auto loaded = LoadModel({dir, ""}, backend.get(), options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const std::vector<Golden> golds = ReadGolden(dir);
  for (size_t i = 0; i < golds.size(); ++i) {
    Batcher batcher(loaded->model.get(), nullptr);
    GenerationRequest req;
    req.id = i;
    req.prompt = golds[i].prompt;
    req.max_tokens = static_cast<int>(golds[i].greedy.size());
    req.ignore_eos = true;
    ASSERT_TRUE(batcher.Add(req).ok());
    std::vector<int32_t> tokens;
    while (batcher.HasWork()) {
      auto events = batcher.Step();
      ASSERT_TRUE(events.ok()) << events.status();
      for (const auto& e : *events) tokens.push_back(e.token_id);
    }
    EXPECT_EQ(tokens, golds[i].greedy) << GetParam() << " prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenTest,
                         ::testing::Values("llama_gqa", "qwen2_tied", "llama3_rope",
                                           "mistral_window"));

}  // namespace
}  // namespace strata::engine

// The whole model on the CUDA backend against Hugging Face transformers
// (the golden fixtures of tools/make_golden.py): logits within bf16
// tolerance (twice the error of transformers' own bf16 forward), the same
// 32 greedy tokens (the fixture prompts have wide greedy margins), and a
// mixed continuous batch giving the same greedy tokens as each sequence
// alone. Skips without a GPU.
#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/nccl_communicator.h"
#include "engine/batcher.h"
#include "engine/model_loader.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"
#include "kvtier/kv_policy.h"
#include "tests/engine/test_util.h"

namespace strata::cuda {
namespace {

using engine::Batcher;
using engine::GenerationRequest;
using engine::ModelOptions;
using testing_util::FixturePath;

std::unique_ptr<engine::Backend> MakeBackendOrSkip() {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) return nullptr;
  return *std::move(backend);
}

struct Golden {
  std::vector<int32_t> prompt, greedy;
  std::vector<float> logits;
  float transformers_bf16_error = 0;  // HF's own bf16 forward vs its fp32 logits
};

std::vector<Golden> ReadGolden(const std::string& dir) {
  auto file = engine::SafetensorsFile::Open(dir + "/golden.safetensors");
  EXPECT_TRUE(file.ok()) << file.status();
  std::vector<Golden> out;
  const auto& t = (*file)->tensors();
  for (int i = 0; t.count("prompt_" + std::to_string(i)); ++i) {
    auto ints = [&](const std::string& n) {
      const auto& v = t.at(n);
      const auto* p = reinterpret_cast<const int32_t*>(v.data);
      return std::vector<int32_t>(p, p + v.numel());
    };
    const auto& l = t.at("logits_" + std::to_string(i));
    const auto* lp = reinterpret_cast<const float*>(l.data);
    const auto& e = t.at("bf16_error_" + std::to_string(i));
    out.push_back({ints("prompt_" + std::to_string(i)), ints("greedy_" + std::to_string(i)),
                   std::vector<float>(lp, lp + l.numel()),
                   *reinterpret_cast<const float*>(e.data)});
  }
  return out;
}

std::vector<int32_t> Generate(engine::Model* model, const GenerationRequest& r) {
  Batcher batcher(model, nullptr);
  EXPECT_TRUE(batcher.Add(r).ok());
  std::vector<int32_t> tokens;
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) tokens.push_back(e.token_id);
  }
  return tokens;
}

// The golden checks on `model` (loaded with GoldenOptions).
void ExpectGolden(engine::Model& model, const std::string& name, const ModelOptions& options) {
  const int vocab = model.config().vocab_size;
  for (const Golden& gold : ReadGolden(FixturePath("models/" + name))) {
    const int n = static_cast<int>(gold.prompt.size());
    engine::StepInput in;
    in.token_ids = gold.prompt;
    for (int i = 0; i < n; ++i) in.positions.push_back(i), in.logit_rows.push_back(i);
    in.query_start = {0, n};
    in.context_len = {n};
    in.block_tables = {{}};
    for (int p = 0; p * options.page_size < n; ++p) in.block_tables[0].push_back(p);
    auto logits = model.Forward(in);
    ASSERT_TRUE(logits.ok()) << logits.status();
    double worst = 0;
    for (int r = 0; r < n; ++r) {
      double num = 0, den = 0;
      for (int c = 0; c < vocab; ++c) {
        const double a = (*logits)[r * vocab + c], b = gold.logits[r * vocab + c];
        ASSERT_TRUE(std::isfinite(a));
        num += (a - b) * (a - b);
        den += b * b;
      }
      worst = std::max(worst, std::sqrt(num / den));
    }
    // bf16 tolerance: no worse than twice transformers' own bf16 forward on
    // the same weights and prompt (both measured against the fp32 logits).
    const double limit = std::max(2.0 * gold.transformers_bf16_error, 5e-3);
    std::printf("%s prompt of %d tokens: max row relative error %.2e (transformers bf16: %.2e)\n",
                name.c_str(), n, worst, gold.transformers_bf16_error);
    EXPECT_LT(worst, limit) << name;

    GenerationRequest r;
    r.prompt = gold.prompt;
    r.max_tokens = static_cast<int>(gold.greedy.size());
    r.ignore_eos = true;
    EXPECT_EQ(Generate(&model, r), gold.greedy) << name << " prompt of " << n;
  }
}

ModelOptions GoldenOptions() {
  ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 128;
  options.max_batch_tokens = 64;
  options.max_logit_rows = 64;
  return options;
}

class CudaGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaGoldenTest, LogitsWithinBf16ToleranceAndSameGreedyTokens) {
  auto backend = MakeBackendOrSkip();
  if (!backend) GTEST_SKIP() << "no usable GPU";
  const ModelOptions options = GoldenOptions();
  auto loaded =
      engine::LoadModel({FixturePath("models/" + GetParam()), ""}, backend.get(), options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectGolden(*loaded->model, GetParam(), options);
}

// The same through the tensor-parallel path with one rank: its all-reduces
// go through NCCL (on the backend's stream, and into decode graphs).
TEST_P(CudaGoldenTest, OneNcclRankGivesTheSameResults) {
  // Declared first, destroyed last: NCCL keeps a communicator until the
  // graphs that recorded its collectives are gone with the backend.
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  auto backend = MakeBackendOrSkip();
  if (!backend) GTEST_SKIP() << "no usable GPU";
  if (auto version = NcclVersion(); !version.ok()) GTEST_SKIP() << version.status();
  std::vector<engine::Backend*> backends = {backend.get()};
  auto group = CreateNcclGroup(backends, std::chrono::seconds(60));
  ASSERT_TRUE(group.ok()) << group.status();
  comms = *std::move(group);
  std::vector<engine::Communicator*> ranks = {comms[0].get()};
  const ModelOptions options = GoldenOptions();
  auto loaded =
      engine::LoadModel({FixturePath("models/" + GetParam()), ""}, backends, ranks, options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectGolden(*loaded->model, GetParam(), options);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGoldenTest,
                         ::testing::Values("llama_gqa", "qwen2_tied", "llama3_rope",
                                           "mistral_window"));

TEST(CudaBatchingTest, MixedBatchEqualsEachSequenceAlone) {
  auto backend = MakeBackendOrSkip();
  if (!backend) GTEST_SKIP() << "no usable GPU";
  ModelOptions options;
  options.max_seqs = 8;
  options.max_context = 160;
  options.max_batch_tokens = 48;
  options.page_size = 8;
  auto loaded = engine::LoadModel({FixturePath("models/qwen2_tied"), ""}, backend.get(), options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::vector<GenerationRequest> reqs;
  const int lens[] = {3, 17, 40, 61, 1, 90};
  for (int i = 0; i < 6; ++i) {
    std::mt19937 rng(200 + i);
    GenerationRequest r;
    r.id = i;
    r.max_tokens = 12 + 3 * i;
    r.ignore_eos = true;
    // Counting runs: the pattern the golden models learned, so greedy
    // margins are wide and bf16 rounding cannot flip a token.
    const int start = static_cast<int>(rng() % 400) + 3;
    for (int j = 0; j < lens[i]; ++j) r.prompt.push_back((start + j) % 512);
    reqs.push_back(r);
  }
  std::map<uint64_t, std::vector<int32_t>> alone, batched;
  for (const auto& r : reqs) alone[r.id] = Generate(loaded->model.get(), r);
  Batcher batcher(loaded->model.get(), nullptr);
  const int arrivals[] = {0, 0, 2, 5, 6, 9};
  size_t next = 0;
  for (int step = 0; next < reqs.size() || batcher.HasWork(); ++step) {
    while (next < reqs.size() && arrivals[next] <= step)
      ASSERT_TRUE(batcher.Add(reqs[next++]).ok());
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    for (const auto& e : *events) batched[e.request_id].push_back(e.token_id);
  }
  for (const auto& r : reqs) EXPECT_EQ(batched[r.id], alone[r.id]) << "request " << r.id;
}

// Decode steps replayed from CUDA graphs (padded to a batch bucket, one
// graph per bucket and context bound) give the tokens of steps run
// directly, for a continuous batch whose size and contexts keep changing.
// Param: the KV cache is fp8 e4m3 (else bf16).
class CudaDecodeGraphTest : public ::testing::TestWithParam<bool> {};

TEST_P(CudaDecodeGraphTest, ReplayedStepsEqualDirectSteps) {
  auto backend = MakeBackendOrSkip();
  if (!backend) GTEST_SKIP() << "no usable GPU";
  std::map<uint64_t, std::vector<int32_t>> tokens[2];
  std::map<uint64_t, std::vector<float>> logprobs[2];
  int graphs[2] = {0, 0};
  for (int graphed = 0; graphed < 2; ++graphed) {
    ModelOptions options;
    options.max_seqs = 16;
    options.max_context = 300;
    options.max_batch_tokens = 64;
    options.page_size = 8;
    options.decode_graphs = graphed == 1;
    if (GetParam()) options.kv_cache = engine::KvCacheType::kFp8E4M3;
    auto loaded = engine::LoadModel({FixturePath("models/llama_gqa"), ""}, backend.get(), options);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    Batcher batcher(loaded->model.get(), nullptr);
    // 11 requests arriving over time: batch sizes 1..11 (padded to 1, 2, 4,
    // 8 and 16) and contexts crossing 64, 128 and 256.
    for (int step = 0; step < 400 && (step < 40 || batcher.HasWork()); ++step) {
      if (step % 4 == 0 && step / 4 < 11) {
        const int i = step / 4;
        GenerationRequest r;
        r.id = i;
        r.max_tokens = 30 + 17 * i;
        r.ignore_eos = true;
        for (int j = 0; j < 5 + 9 * i; ++j) r.prompt.push_back((37 * i + j) % 512);
        ASSERT_TRUE(batcher.Add(r).ok());
      }
      auto events = batcher.Step();
      ASSERT_TRUE(events.ok()) << events.status();
      for (const auto& e : *events) {
        tokens[graphed][e.request_id].push_back(e.token_id);
        logprobs[graphed][e.request_id].push_back(e.logprob);
      }
    }
    graphs[graphed] = loaded->model->num_decode_graphs();
  }
  EXPECT_EQ(graphs[0], 0);
  EXPECT_GE(graphs[1], 5);  // buckets 1..16 and several context bounds
  ASSERT_EQ(tokens[0].size(), 11u);
  for (const auto& [id, direct] : tokens[0]) {
    EXPECT_EQ(tokens[1][id], direct) << "request " << id;
    ASSERT_EQ(logprobs[1][id].size(), logprobs[0][id].size());
    for (size_t k = 0; k < direct.size(); ++k) {
      EXPECT_NEAR(logprobs[1][id][k], logprobs[0][id][k], 0.05)
          << "request " << id << " token " << k;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(KvCache, CudaDecodeGraphTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "fp8_e4m3" : "bf16";
                         });

// Sparse decode steps (a KV policy's plans) replayed from CUDA graphs give
// the tokens and the policy statistics of steps run directly: steps that
// cluster or bound new keys run directly, the others replay, and the
// recordings follow the batch as it grows and shrinks. Unsetting a runner
// releases its recordings, and a second runner on the same model (same
// settings, new buffers) records its own rather than replaying the first
// one's. Param: the policy.
class CudaSparseDecodeGraphTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaSparseDecodeGraphTest, ReplayedStepsEqualDirectSteps) {
  auto backend = MakeBackendOrSkip();
  if (!backend) GTEST_SKIP() << "no usable GPU";
  std::map<uint64_t, std::vector<int32_t>> tokens[3];  // direct, graphed, graphed again
  kvtier::KvPolicyRunner::Stats stats[3];
  int graphs[3] = {0, 0, 0};
  // Run 0 on its own model; runs 1 and 2 share one, each with a new runner.
  std::unique_ptr<engine::LoadedModel> direct_model, graphed_model;
  for (int run = 0; run < 3; ++run) {
    const int graphed = run > 0 ? 1 : 0;
    ModelOptions options;
    options.max_seqs = 8;
    options.max_context = 400;
    options.max_batch_tokens = 128;
    options.page_size = 8;
    options.decode_graphs = graphed == 1;
    if (run < 2) {
      auto loaded =
          engine::LoadModel({FixturePath("models/llama_gqa"), ""}, backend.get(), options);
      ASSERT_TRUE(loaded.ok()) << loaded.status();
      (run == 0 ? direct_model : graphed_model) =
          std::make_unique<engine::LoadedModel>(std::move(*loaded));
    }
    engine::LoadedModel* loaded = run == 0 ? direct_model.get() : graphed_model.get();
    kvtier::KvPolicyConfig config;
    config.type = GetParam();
    config.budget_tokens = 48;  // well below the contexts: the selection matters
    config.sink_tokens = 4;
    config.window_tokens = 24;
    config.tokens_per_cluster = 8;
    config.kmeans_iterations = 5;
    config.quest_page_tokens = 8;
    config.full_layers = 1;
    auto runner = kvtier::KvPolicyRunner::Create(loaded->model.get(), {config});
    ASSERT_TRUE(runner.ok()) << runner.status();
    ASSERT_TRUE(loaded->model->set_attention_planner(runner->get()).ok());
    Batcher batcher(loaded->model.get(), nullptr);
    // 6 requests arriving over time: batches of 1 to 6, those of 3, 5 and 6
    // padded (to 4, 8, 8) with rows the runner plans as well.
    for (int step = 0; step < 400 && (step < 30 || batcher.HasWork()); ++step) {
      if (step % 5 == 0 && step / 5 < 6) {
        const int i = step / 5;
        GenerationRequest r;
        r.id = i;
        r.max_tokens = 60 + 13 * i;
        r.ignore_eos = true;
        for (int j = 0; j < 90 + 31 * i; ++j) r.prompt.push_back((41 * i + 3 * j) % 512);
        ASSERT_TRUE(batcher.Add(r).ok());
      }
      auto events = batcher.Step();
      ASSERT_TRUE(events.ok()) << events.status();
      for (const auto& e : *events) tokens[run][e.request_id].push_back(e.token_id);
    }
    graphs[run] = loaded->model->num_decode_graphs();
    stats[run] = (*runner)->stats();
    // Releases this runner's recordings (they hold its buffers).
    ASSERT_TRUE(loaded->model->set_attention_planner(nullptr).ok());
  }
  EXPECT_EQ(graphs[0], 0);
  EXPECT_GE(graphs[1], 2);
  EXPECT_EQ(graphs[2], graphs[1]);  // the second runner's own, the first's released
  EXPECT_GT(stats[0].sparse_queries, 0);
  ASSERT_EQ(tokens[0].size(), 6u);
  for (int run = 1; run < 3; ++run) {
    EXPECT_EQ(stats[run].sparse_queries, stats[0].sparse_queries) << "run " << run;
    EXPECT_EQ(stats[run].dense_queries, stats[0].dense_queries) << "run " << run;
    EXPECT_EQ(stats[run].clusterings, stats[0].clusterings) << "run " << run;
    for (const auto& [id, direct] : tokens[0]) {
      EXPECT_EQ(tokens[run][id], direct) << "run " << run << " request " << id;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaSparseDecodeGraphTest,
                         ::testing::Values("clusterkv", "quest"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace strata::cuda

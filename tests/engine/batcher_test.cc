// Continuous batching: sequences joining and leaving a running batch,
// chunked prefill and preemption all give exactly the tokens each sequence
// gets alone; stop conditions and cancellation behave as documented.
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

using testing_util::FixturePath;

std::unique_ptr<Backend> g_backend = CreateCpuBackend(2);

std::unique_ptr<Model> LoadGolden(const std::string& name, ModelOptions options) {
  auto loaded = LoadModel({FixturePath("models/" + name), ""}, g_backend.get(), options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return std::move(loaded->model);
}

std::vector<int32_t> RandomPrompt(int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 500) + 3;
  return p;
}

GenerationRequest Request(uint64_t id, std::vector<int32_t> prompt, int max_tokens) {
  GenerationRequest r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

// Runs requests, adding request i before step arrivals[i]; returns tokens
// per request id.
std::map<uint64_t, std::vector<int32_t>> RunRequests(Batcher& batcher, const std::vector<GenerationRequest>& reqs,
                                             const std::vector<int>& arrivals,
                                             int* max_running = nullptr) {
  std::map<uint64_t, std::vector<int32_t>> out;
  size_t next = 0;
  for (int step = 0; next < reqs.size() || batcher.HasWork(); ++step) {
    while (next < reqs.size() && arrivals[next] <= step) {
      const absl::Status added = batcher.Add(reqs[next]);
      EXPECT_TRUE(added.ok()) << added;
      ++next;
    }
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) out[e.request_id].push_back(e.token_id);
    if (max_running) *max_running = std::max(*max_running, batcher.num_running());
  }
  return out;
}

class BatchInvarianceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BatchInvarianceTest, MixedBatchEqualsEachSequenceAlone) {
  ModelOptions options;
  options.max_seqs = 8;
  options.max_context = 160;
  options.max_batch_tokens = 48;  // forces chunked prefill of the long prompts
  options.page_size = 8;
  auto model = LoadGolden(GetParam(), options);
  std::vector<GenerationRequest> reqs;
  const int lens[] = {3, 17, 40, 61, 1, 90};
  const int max_tokens[] = {30, 12, 25, 8, 20, 16};
  for (int i = 0; i < 6; ++i) {
    reqs.push_back(Request(i, RandomPrompt(lens[i], 100 + i), max_tokens[i]));
    // Half of them sample: a seed draws the same tokens whatever is batched.
    if (i % 2 == 1) reqs.back().sampling = {0.9f, i == 3 ? 0 : 20, i == 5 ? 1.0f : 0.9f, 1000u + i};
  }

  std::map<uint64_t, std::vector<int32_t>> alone;
  for (const auto& r : reqs) {
    Batcher batcher(model.get(), nullptr);
    alone[r.id] = RunRequests(batcher, {r}, {0})[r.id];
    EXPECT_EQ(alone[r.id].size(), static_cast<size_t>(r.max_tokens));
  }
  Batcher batcher(model.get(), nullptr);
  int max_running = 0;
  // Staggered arrivals: sequences join while others decode, and leave at
  // different steps.
  auto batched = RunRequests(batcher, reqs, {0, 0, 2, 5, 6, 9}, &max_running);
  EXPECT_GE(max_running, 4);
  for (const auto& r : reqs) EXPECT_EQ(batched[r.id], alone[r.id]) << "request " << r.id;
  EXPECT_EQ(batcher.free_pages(), model->options().num_pages);
}

INSTANTIATE_TEST_SUITE_P(Models, BatchInvarianceTest,
                         ::testing::Values("llama_gqa", "qwen2_tied", "mistral_window"));

TEST(BatcherTest, PreemptionUnderPagePressureKeepsOutputs) {
  ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 96;
  options.max_batch_tokens = 64;
  options.page_size = 4;
  options.num_pages = 30;  // 120 tokens for 4 sequences of up to 70
  auto model = LoadGolden("llama_gqa", options);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(Request(i, RandomPrompt(10 + 5 * i, 7 + i), 40));
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (const auto& r : reqs) {
    Batcher b(model.get(), nullptr);
    alone[r.id] = RunRequests(b, {r}, {0})[r.id];
  }
  Batcher batcher(model.get(), nullptr);
  auto batched = RunRequests(batcher, reqs, {0, 0, 0, 0});
  for (const auto& r : reqs) EXPECT_EQ(batched[r.id], alone[r.id]) << "request " << r.id;
  EXPECT_EQ(batcher.free_pages(), 30);
}

TEST(BatcherTest, ASequenceOutgrowingTheWholeCacheFailsAloneWithAnError) {
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 96;
  options.page_size = 4;
  options.num_pages = 6;  // 24 tokens in all
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  ASSERT_TRUE(batcher.Add(Request(1, RandomPrompt(10, 1), 40)).ok());  // needs 50 tokens
  ASSERT_TRUE(batcher.Add(Request(2, RandomPrompt(5, 2), 4)).ok());
  std::map<uint64_t, std::vector<TokenEvent>> events;
  for (int step = 0; batcher.HasWork() && step < 500; ++step) {
    auto out = batcher.Step();
    ASSERT_TRUE(out.ok()) << out.status();
    for (auto& e : *out) events[e.request_id].push_back(e);
  }
  EXPECT_FALSE(batcher.HasWork());
  ASSERT_FALSE(events[1].empty());
  EXPECT_EQ(events[1].back().finish, FinishReason::kError);
  EXPECT_THAT(events[1].back().error, ::testing::HasSubstr("the cache holds 24"));
  ASSERT_EQ(events[2].size(), 4u);
  EXPECT_EQ(events[2].back().finish, FinishReason::kLength);
  EXPECT_EQ(batcher.free_pages(), 6);
}

TEST(BatcherTest, CancelFreesPagesAndReportsCancelled) {
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 64;
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  ASSERT_TRUE(batcher.Add(Request(1, RandomPrompt(20, 1), 30)).ok());
  ASSERT_TRUE(batcher.Add(Request(2, RandomPrompt(20, 2), 30)).ok());
  const int total = batcher.free_pages();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(batcher.Step().ok());
  EXPECT_LT(batcher.free_pages(), total);
  batcher.Cancel(1);
  batcher.Cancel(99);  // unknown: ignored
  auto events = batcher.Step();
  ASSERT_TRUE(events.ok());
  ASSERT_FALSE(events->empty());
  EXPECT_EQ((*events)[0].request_id, 1u);
  EXPECT_EQ((*events)[0].finish, FinishReason::kCancelled);
  for (const auto& e : *events) EXPECT_TRUE(e.request_id != 1 || e.finish == FinishReason::kCancelled);
  batcher.Cancel(2);
  ASSERT_TRUE(batcher.Step().ok());
  EXPECT_FALSE(batcher.HasWork());
  EXPECT_EQ(batcher.free_pages(), total);
}

TEST(BatcherTest, StopTokenIdsAndMaxTokens) {
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  auto free_run = RunRequests(batcher, {Request(1, RandomPrompt(9, 3), 10)}, {0})[1];
  ASSERT_EQ(free_run.size(), 10u);
  // Stopping on the 4th token's id ends there (the first occurrence).
  GenerationRequest r = Request(2, RandomPrompt(9, 3), 10);
  r.stop_token_ids = {free_run[3]};
  auto stopped = RunRequests(batcher, {r}, {0})[2];
  const size_t first = std::find(free_run.begin(), free_run.end(), free_run[3]) - free_run.begin();
  EXPECT_EQ(stopped.size(), first + 1);
}

// Decode tokens continue the prompt one decode step each, emit nothing, and
// leave the sampled continuation exactly as if they had been prefilled.
TEST(BatcherTest, DecodeTokensContinueThePromptSilently) {
  ModelOptions options;
  options.max_seqs = 3;
  options.max_context = 64;
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  const std::vector<int32_t> prompt = RandomPrompt(14, 5);
  GenerationRequest split = Request(2, std::vector<int32_t>(prompt.begin(), prompt.end() - 3), 6);
  split.decode_tokens.assign(prompt.end() - 3, prompt.end());
  GenerationRequest all_fed = Request(3, {prompt[0]}, 6);
  all_fed.decode_tokens.assign(prompt.begin() + 1, prompt.end());
  auto out = RunRequests(batcher, {Request(1, prompt, 6), split, all_fed}, {0, 0, 1});
  ASSERT_EQ(out[1].size(), 6u);
  EXPECT_EQ(out[2], out[1]);
  EXPECT_EQ(out[3], out[1]);
}

TEST(BatcherTest, RejectsBadRequests) {
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 32;
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  auto expect_bad = [&](GenerationRequest r, const std::string& what) {
    auto s = batcher.Add(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr(what));
  };
  expect_bad(Request(1, {}, 4), "prompt is empty");
  expect_bad(Request(1, {1, 512}, 4), "token id 512 outside the vocabulary");
  expect_bad(Request(1, RandomPrompt(32, 1), 4), "leaves no room");
  expect_bad(Request(1, {1, 2}, 0), "max_tokens");
  GenerationRequest fed = Request(1, {1, 2}, 4);
  fed.decode_tokens = {3, 600};
  expect_bad(fed, "decode token id 600 outside the vocabulary");
  fed = Request(1, RandomPrompt(30, 1), 4);
  fed.decode_tokens = {3, 4};
  expect_bad(fed, "leave no room");
  GenerationRequest r = Request(1, {1, 2}, 4);
  r.sampling.top_p = 0;
  expect_bad(r, "top_p");
  r = Request(1, {1, 2}, 4);
  r.sampling.temperature = -1;
  expect_bad(r, "temperature");
  r = Request(1, {1, 2}, 4);
  r.stop_strings = {"x"};
  expect_bad(r, "stop strings need a tokenizer");
}

// A tokenizer double: token i is the character 'a' + i % 26 (so stop
// strings and text streaming can be checked without a real vocabulary).
class LetterTokenizer : public Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view, bool) const override { return std::vector<int32_t>{}; }
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids, bool) const override {
    std::string s;
    for (int32_t id : ids) s += TokenBytes(id);
    return s;
  }
  std::string TokenBytes(int32_t id) const override { return std::string(1, static_cast<char>('a' + id % 26)); }
  bool IsSpecial(int32_t) const override { return false; }
  int32_t vocab_size() const override { return 512; }
  std::optional<int32_t> bos_id() const override { return std::nullopt; }
  std::vector<int32_t> eos_ids() const override { return {}; }
  std::optional<int32_t> TokenToId(std::string_view) const override { return std::nullopt; }
};

TEST(BatcherTest, StopStringsCutTheTextAndHoldBackPrefixes) {
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  auto model = LoadGolden("llama_gqa", options);
  LetterTokenizer tokenizer;
  Batcher batcher(model.get(), &tokenizer);
  auto run_text = [&](GenerationRequest r, FinishReason* finish) {
    EXPECT_TRUE(batcher.Add(r).ok());
    std::string text;
    while (batcher.HasWork()) {
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok());
      for (const auto& e : *events) {
        text += e.text;
        if (e.finish != FinishReason::kNone) *finish = e.finish;
      }
    }
    return text;
  };
  FinishReason finish;
  const std::string full = run_text(Request(1, RandomPrompt(9, 5), 12), &finish);
  ASSERT_EQ(full.size(), 12u);
  EXPECT_EQ(finish, FinishReason::kLength);
  // A stop string in the middle: text ends right before it.
  GenerationRequest r = Request(2, RandomPrompt(9, 5), 12);
  r.stop_strings = {full.substr(5, 3)};
  const std::string cut = run_text(r, &finish);
  EXPECT_EQ(finish, FinishReason::kStop);
  EXPECT_EQ(cut, full.substr(0, full.find(full.substr(5, 3))));
  // A stop string that never completes: everything comes out in the end.
  r = Request(3, RandomPrompt(9, 5), 12);
  r.stop_strings = {full.substr(10, 2) + "#"};
  EXPECT_EQ(run_text(r, &finish), full);
  EXPECT_EQ(finish, FinishReason::kLength);
}

}  // namespace
}  // namespace strata::engine

// Continuous batching: sequences joining and leaving a running batch,
// chunked prefill and preemption all give exactly the tokens each sequence
// gets alone; stop conditions and cancellation behave as documented.
#include "engine/batcher.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "engine/async_engine.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
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
std::map<uint64_t, std::vector<int32_t>> RunRequests(Batcher& batcher,
                                                     const std::vector<GenerationRequest>& reqs,
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

TEST(AsyncEngineTest, ATokenGeneratedElsewhereIsStreamedBeforeTheStepThatContinuesIt) {
  // A decode worker's request carries the prefill worker's first token:
  // it reaches the client before any step runs (loading the prompt's KV
  // and decoding the next token may take a while), then the rest follow.
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 64;
  options.page_size = 4;
  options.num_pages = 32;
  auto model = LoadGolden("llama_gqa", options);
  AsyncEngine engine(model.get(), nullptr);
  GenerationRequest r = Request(1, RandomPrompt(12, 3), 4);
  r.generated = {{42, -0.5f}};
  std::mutex mu;
  std::vector<std::pair<int32_t, int64_t>> seen;  // token, steps run when it arrived
  std::promise<void> done;
  ASSERT_TRUE(engine
                  .Submit(r,
                          [&](const TokenEvent& e) {
                            std::lock_guard<std::mutex> lock(mu);
                            if (e.token_id >= 0)
                              seen.push_back({e.token_id, engine.GetStats().steps});
                            if (e.finish != FinishReason::kNone) done.set_value();
                          })
                  .ok());
  done.get_future().wait();
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[0], (std::pair<int32_t, int64_t>{42, 0}));
  EXPECT_GT(seen[1].second, 0);
}

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
  // The pressure was real: sequences were preempted and recomputed.
  EXPECT_GT(batcher.num_preemptions(), 0);
  for (const auto& r : reqs) EXPECT_EQ(batched[r.id], alone[r.id]) << "request " << r.id;
  EXPECT_EQ(batcher.free_pages(), 30);
}

TEST(BatcherTest, AWorkloadStaysWithinItsPageCapAndOthersKeepTheRest) {
  // Workload 1 may hold 24 pages (one full context); four of its requests
  // would take 60, and two of workload 0 run beside them in a cache that
  // holds everything. Workload 1 preempts only its own, never passes its
  // cap, and every stream is the one its request gives alone.
  ModelOptions options;
  options.max_seqs = 6;
  options.max_context = 96;
  options.max_batch_tokens = 64;
  options.page_size = 4;
  options.num_pages = 100;
  auto model = LoadGolden("llama_gqa", options);
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    reqs.push_back(Request(i, RandomPrompt(20, 3 + i), 40));
    reqs.back().kv_policy = i < 4 ? 1 : 0;
  }
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (const auto& r : reqs) {
    Batcher b(model.get(), nullptr);
    alone[r.id] = RunRequests(b, {r}, {0})[r.id];
  }
  Batcher batcher(model.get(), nullptr, {.max_pages_per_policy = {0, 10}});
  EXPECT_EQ(batcher.page_cap(1), 24) << "raised to one full context";
  EXPECT_EQ(batcher.page_cap(0), 0);
  for (const auto& r : reqs) ASSERT_TRUE(batcher.Add(r).ok());
  std::map<uint64_t, std::vector<int32_t>> batched;
  int most = 0, most_other = 0;
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    for (const auto& e : *events) batched[e.request_id].push_back(e.token_id);
    most = std::max(most, batcher.pages_of_policy(1));
    most_other = std::max(most_other, batcher.pages_of_policy(0));
  }
  EXPECT_EQ(most, 24) << "workload 1 filled its cap and never passed it";
  EXPECT_EQ(most_other, 30) << "workload 0 was never preempted for it";
  EXPECT_GT(batcher.num_preemptions(), 0);
  for (const auto& r : reqs) EXPECT_EQ(batched[r.id], alone[r.id]) << "request " << r.id;
  EXPECT_EQ(batcher.free_pages(), 100);
}

TEST(BatcherTest, PreemptedPromptsDoNotBlockEachOther) {
  // Preempted sequences restart their prefill together; the oldest must get
  // its pages even when younger restarted prompts hold some.
  ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 256;
  options.max_batch_tokens = 96;
  options.page_size = 8;
  options.num_pages = 40;  // 320 tokens for 4 sequences of up to 235
  auto model = LoadGolden("llama_gqa", options);
  Batcher batcher(model.get(), nullptr);
  for (int i = 0; i < 4; ++i)
    ASSERT_TRUE(batcher.Add(Request(i, RandomPrompt(60 + 25 * i, i), 60)).ok());
  std::map<uint64_t, std::vector<TokenEvent>> events;
  for (int step = 0; batcher.HasWork() && step < 2000; ++step) {
    auto out = batcher.Step();
    ASSERT_TRUE(out.ok()) << out.status();
    for (auto& e : *out) events[e.request_id].push_back(e);
  }
  EXPECT_GT(batcher.num_preemptions(), 0);
  for (uint64_t id = 0; id < 4; ++id) {
    ASSERT_EQ(events[id].size(), 60u) << "request " << id << ": " << events[id].back().error;
    EXPECT_EQ(events[id].back().finish, FinishReason::kLength);
  }
  EXPECT_EQ(batcher.free_pages(), 40);
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
  for (const auto& e : *events)
    EXPECT_TRUE(e.request_id != 1 || e.finish == FinishReason::kCancelled);
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
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view, bool) const override {
    return std::vector<int32_t>{};
  }
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids, bool) const override {
    std::string s;
    for (int32_t id : ids) s += TokenBytes(id);
    return s;
  }
  std::string TokenBytes(int32_t id) const override {
    return std::string(1, static_cast<char>('a' + id % 26));
  }
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

// A copy of the llama_gqa fixture whose embedding row of `token` is NaN:
// any sequence that reads the token gets non-finite logits from then on,
// and no other sequence does (every operator works row by row or within a
// sequence).
std::unique_ptr<Model> LoadWithPoisonedToken(const testing_util::TempDir& dir, int32_t token,
                                             ModelOptions options) {
  dir.CopyFrom(FixturePath("models/llama_gqa"));
  const std::string path = dir.path() + "/model.safetensors";
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  uint64_t header_len = 0;
  f.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  const auto entry = nlohmann::json::parse(header).at("model.embed_tokens.weight");
  EXPECT_EQ(entry.at("dtype"), "F32");
  const int64_t hidden = entry.at("shape")[1].get<int64_t>();
  const int64_t begin = entry.at("data_offsets")[0].get<int64_t>();
  f.seekp(static_cast<std::streamoff>(8 + header_len + begin + token * hidden * 4));
  const std::vector<float> nan_row(hidden, std::numeric_limits<float>::quiet_NaN());
  f.write(reinterpret_cast<const char*>(nan_row.data()), static_cast<std::streamsize>(hidden * 4));
  f.close();
  auto loaded = LoadModel({dir.path(), ""}, g_backend.get(), options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return std::move(loaded->model);
}

TEST(BatcherTest, NonFiniteLogitsFailTheirSequenceAloneWithAClearError) {
  ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 96;
  options.page_size = 4;
  constexpr int32_t kPoison = 499;
  testing_util::TempDir dir;
  auto model = LoadWithPoisonedToken(dir, kPoison, options);
  ASSERT_NE(model, nullptr);
  // Prompts of tokens 3..502 except the poisoned one.
  std::vector<GenerationRequest> healthy;
  for (int i = 0; i < 3; ++i) {
    std::vector<int32_t> prompt = RandomPrompt(8 + 3 * i, 40 + i);
    for (auto& t : prompt) t = t == kPoison ? kPoison + 1 : t;
    healthy.push_back(Request(10 + i, prompt, 12));
  }
  std::map<uint64_t, std::vector<int32_t>> alone;
  for (const auto& r : healthy) {
    Batcher b(model.get(), nullptr);
    alone[r.id] = RunRequests(b, {r}, {0})[r.id];
    ASSERT_EQ(alone[r.id].size(), 12u);
  }

  Batcher batcher(model.get(), nullptr);
  std::vector<int32_t> poisoned_prompt = RandomPrompt(9, 77);
  poisoned_prompt[4] = kPoison;
  ASSERT_TRUE(batcher.Add(Request(1, poisoned_prompt, 12)).ok());
  for (const auto& r : healthy) ASSERT_TRUE(batcher.Add(r).ok());
  std::map<uint64_t, std::vector<TokenEvent>> events;
  for (int step = 0; batcher.HasWork() && step < 200; ++step) {
    auto out = batcher.Step();
    ASSERT_TRUE(out.ok()) << out.status();  // the step itself succeeds
    for (auto& e : *out) events[e.request_id].push_back(e);
  }
  ASSERT_EQ(events[1].size(), 1u);  // no token came out of the NaN
  EXPECT_EQ(events[1].back().finish, FinishReason::kError);
  EXPECT_THAT(events[1].back().error, ::testing::HasSubstr("not finite"));
  EXPECT_EQ(batcher.num_failed(), 1);
  for (const auto& r : healthy) {
    std::vector<int32_t> tokens;
    for (const auto& e : events[r.id]) tokens.push_back(e.token_id);
    EXPECT_EQ(tokens, alone[r.id]) << "request " << r.id;
    EXPECT_EQ(events[r.id].back().finish, FinishReason::kLength);
  }
  EXPECT_EQ(batcher.free_pages(), model->options().num_pages);
}

TEST(BatcherTest, ManyStopTokenIdsAreHonoured) {
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 96;
  auto model = LoadGolden("llama_gqa", options);
  GenerationRequest free_run = Request(1, RandomPrompt(6, 3), 20);
  Batcher alone(model.get(), nullptr);
  const std::vector<int32_t> tokens = RunRequests(alone, {free_run}, {0})[1];
  ASSERT_GE(tokens.size(), 6u);
  // Five hundred stop ids, the fifth generated token among them (and none of
  // the first four).
  GenerationRequest stopped = Request(2, free_run.prompt, 20);
  for (int32_t id = 0; static_cast<int>(stopped.stop_token_ids.size()) < 500 && id < 512; ++id) {
    if (std::find(tokens.begin(), tokens.begin() + 4, id) == tokens.begin() + 4) {
      stopped.stop_token_ids.push_back(id);
    }
  }
  ASSERT_NE(std::find(stopped.stop_token_ids.begin(), stopped.stop_token_ids.end(), tokens[4]),
            stopped.stop_token_ids.end());
  Batcher batcher(model.get(), nullptr);
  const std::vector<int32_t> out = RunRequests(batcher, {stopped}, {0})[2];
  EXPECT_EQ(out, std::vector<int32_t>(tokens.begin(), tokens.begin() + 5));
}

}  // namespace
}  // namespace strata::engine

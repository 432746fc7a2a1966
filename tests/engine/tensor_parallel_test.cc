// Tensor parallelism on the CPU backend: the in-process communicator's
// collectives, the split of a model over ranks, and the golden models run
// over 2 and 4 ranks against one rank (logits and greedy tokens), including
// the fixtures whose KV heads are fewer than the ranks (replicated).
#include "engine/tensor_parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/async_engine.h"
#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/in_process_communicator.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

using std::chrono::milliseconds;
using testing_util::FixturePath;

// Runs fn(rank) on a thread per rank and joins them.
template <typename Fn>
void OnEveryRank(int ranks, Fn fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back([&fn, r] { fn(r); });
  for (std::thread& t : threads) t.join();
}

Tensor HostTensor(Backend& backend, DType dtype, std::vector<int64_t> shape) {
  auto t = backend.Allocate(dtype, std::move(shape));
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

TEST(InProcessCommunicatorTest, AllReduceSumsEveryRanksValuesInPlace) {
  constexpr int kRanks = 4;
  auto comms = CreateInProcessGroup(kRanks, milliseconds(5000));
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto backend = CreateCpuBackend(1);
  std::vector<std::vector<float>> results(kRanks);
  OnEveryRank(kRanks, [&](int r) {
    Tensor t = HostTensor(*backend, DType::kF32, {3, 2});
    for (int i = 0; i < 6; ++i) t.data_as<float>()[i] = static_cast<float>((r + 1) * (i + 1));
    for (int round = 0; round < 3; ++round) {  // the group is reused
      ASSERT_TRUE((*comms)[r]->AllReduceSum(t).ok());
    }
    results[r].assign(t.data_as<float>(), t.data_as<float>() + 6);
  });
  // (1 + 2 + 3 + 4) = 10 times the first values, then the four ranks' equal
  // values add up twice more: 160 times.
  for (int r = 0; r < kRanks; ++r) {
    for (int i = 0; i < 6; ++i) EXPECT_EQ(results[r][i], 160.0f * (i + 1)) << r << " " << i;
  }
}

TEST(InProcessCommunicatorTest, AllGatherJoinsTheRanksColumnsInRankOrder) {
  constexpr int kRanks = 3;
  auto comms = CreateInProcessGroup(kRanks, milliseconds(5000));
  ASSERT_TRUE(comms.ok());
  auto backend = CreateCpuBackend(1);
  std::vector<std::vector<float>> results(kRanks);
  OnEveryRank(kRanks, [&](int r) {
    Tensor in = HostTensor(*backend, DType::kF32, {2, 2});
    Tensor out = HostTensor(*backend, DType::kF32, {2, 6});
    for (int row = 0; row < 2; ++row) {
      for (int c = 0; c < 2; ++c) in.data_as<float>()[row * 2 + c] = 100 * row + 10 * r + c;
    }
    ASSERT_TRUE((*comms)[r]->AllGather(in, out).ok());
    results[r].assign(out.data_as<float>(), out.data_as<float>() + 12);
  });
  const std::vector<float> want = {0, 1, 10, 11, 20, 21, 100, 101, 110, 111, 120, 121};
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(results[r], want) << r;
}

TEST(InProcessCommunicatorTest, BroadcastCopiesTheRootsValues) {
  constexpr int kRanks = 3;
  auto comms = CreateInProcessGroup(kRanks, milliseconds(5000));
  ASSERT_TRUE(comms.ok());
  auto backend = CreateCpuBackend(1);
  std::vector<int32_t> results(kRanks);
  OnEveryRank(kRanks, [&](int r) {
    Tensor t = HostTensor(*backend, DType::kI32, {1});
    t.data_as<int32_t>()[0] = 7 + r;
    ASSERT_TRUE((*comms)[r]->Broadcast(t, 2).ok());
    results[r] = t.data_as<int32_t>()[0];
  });
  EXPECT_EQ(results, std::vector<int32_t>({9, 9, 9}));
}

TEST(InProcessCommunicatorTest, RanksThatDisagreeFailAlikeAndBreakTheGroup) {
  auto comms = CreateInProcessGroup(2, milliseconds(5000));
  ASSERT_TRUE(comms.ok());
  auto backend = CreateCpuBackend(1);
  std::vector<absl::Status> first(2), later(2);
  OnEveryRank(2, [&](int r) {
    Tensor t = HostTensor(*backend, DType::kF32, {r == 0 ? 4 : 5});
    first[r] = (*comms)[r]->AllReduceSum(t);
    later[r] = (*comms)[r]->AllReduceSum(t);
  });
  for (int r = 0; r < 2; ++r) {
    // The first to look finds the mismatch; the other may find the group
    // already broken by it. Both name it.
    EXPECT_TRUE(absl::IsInvalidArgument(first[r]) || absl::IsAborted(first[r])) << first[r];
    EXPECT_NE(first[r].message().find("rank 1 called all-reduce of F32 [5]"),
              std::string_view::npos)
        << first[r];
    EXPECT_TRUE(absl::IsAborted(later[r])) << later[r];
  }
}

TEST(InProcessCommunicatorTest, ARankThatNeverComesFailsTheCollectiveInTimeNotForEver) {
  auto comms = CreateInProcessGroup(3, milliseconds(200));
  ASSERT_TRUE(comms.ok());
  auto backend = CreateCpuBackend(1);
  std::vector<absl::Status> status(2);
  const auto start = std::chrono::steady_clock::now();
  OnEveryRank(2, [&](int r) {  // rank 2 never calls
    Tensor t = HostTensor(*backend, DType::kF32, {8});
    status[r] = (*comms)[r]->AllReduceSum(t);
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  // The first to time out names the missing rank; the other sees the group
  // broken (or times out itself).
  bool named = false;
  for (const absl::Status& s : status) {
    EXPECT_TRUE(absl::IsDeadlineExceeded(s) || absl::IsAborted(s)) << s;
    named |= s.message().find("rank(s) 2 did not join") != std::string_view::npos;
  }
  EXPECT_TRUE(named) << status[0] << " / " << status[1];
  // Rank 2 arriving late finds the group broken, at once.
  Tensor t = HostTensor(*backend, DType::kF32, {8});
  EXPECT_TRUE(absl::IsAborted((*comms)[2]->AllReduceSum(t)));
}

TEST(InProcessCommunicatorTest, AbortWakesARankWaitingInACollective) {
  auto comms = CreateInProcessGroup(2, milliseconds(60000));
  ASSERT_TRUE(comms.ok());
  auto backend = CreateCpuBackend(1);
  absl::Status waited;
  const auto start = std::chrono::steady_clock::now();
  std::thread rank0([&] {
    Tensor t = HostTensor(*backend, DType::kF32, {8});
    waited = (*comms)[0]->AllReduceSum(t);
  });
  std::this_thread::sleep_for(milliseconds(50));
  (*comms)[1]->Abort("rank 1 failed its step");
  rank0.join();
  EXPECT_TRUE(absl::IsAborted(waited)) << waited;
  EXPECT_NE(waited.message().find("rank 1 failed its step"), std::string_view::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

ModelConfig HeadsConfig(int q_heads, int kv_heads) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_layers = 2;
  c.num_q_heads = q_heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = 16;
  return c;
}

TEST(ShardModelTest, SplitsHeadsChannelsAndVocabularyAndReplicatesScarceKvHeads) {
  // 8 query heads, 4 KV heads over 2 ranks: two KV heads each.
  auto s = ShardModel(HeadsConfig(8, 4), 1, 2);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->q_heads, 4);
  EXPECT_EQ(s->first_q_head, 4);
  EXPECT_EQ(s->kv_heads, 2);
  EXPECT_EQ(s->first_kv_head, 2);
  EXPECT_EQ(s->intermediate, 80);
  EXPECT_EQ(s->first_intermediate, 80);
  EXPECT_EQ(s->vocab, 256);
  EXPECT_EQ(s->first_vocab, 256);
  // 8 query heads, 2 KV heads over 8 ranks: each KV head on 4 ranks, the
  // one its query head reads.
  for (int r = 0; r < 8; ++r) {
    auto rank = ShardModel(HeadsConfig(8, 2), r, 8);
    ASSERT_TRUE(rank.ok());
    EXPECT_EQ(rank->kv_heads, 1);
    EXPECT_EQ(rank->first_kv_head, r / 4) << r;
  }
}

TEST(ShardModelTest, ADimensionThatDoesNotSplitIsNamed) {
  auto heads = ShardModel(HeadsConfig(4, 2), 0, 3);
  EXPECT_TRUE(absl::IsInvalidArgument(heads.status()));
  EXPECT_NE(heads.status().message().find("4 query heads"), std::string_view::npos)
      << heads.status();
  auto kv = ShardModel(HeadsConfig(12, 3), 0, 4);
  EXPECT_NE(kv.status().message().find("3 KV heads"), std::string_view::npos) << kv.status();
  ModelConfig odd = HeadsConfig(4, 2);
  odd.intermediate_size = 150;
  auto inter = ShardModel(odd, 0, 4);
  EXPECT_NE(inter.status().message().find("150 intermediate"), std::string_view::npos)
      << inter.status();
  EXPECT_FALSE(ShardModel(HeadsConfig(4, 2), 2, 2).ok());  // no rank 2 of 2
}

// A golden fixture model split over `ranks` CPU backends.
struct RankGroup {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> comms;
  LoadedModel loaded;
};

std::unique_ptr<RankGroup> LoadGroup(const std::string& dir, int ranks,
                                     const ModelOptions& options) {
  auto group = std::make_unique<RankGroup>();
  auto comms = CreateInProcessGroup(ranks, milliseconds(30000));
  EXPECT_TRUE(comms.ok()) << comms.status();
  group->comms = *std::move(comms);
  std::vector<Backend*> backends;
  std::vector<Communicator*> comm_ptrs;
  for (int r = 0; r < ranks; ++r) {
    group->backends.push_back(CreateCpuBackend(1));
    backends.push_back(group->backends.back().get());
    comm_ptrs.push_back(group->comms[r].get());
  }
  auto loaded = LoadModel({dir, ""}, backends, comm_ptrs, options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return nullptr;
  group->loaded = *std::move(loaded);
  return group;
}

StepInput PromptStep(const std::vector<int32_t>& prompt, int page_size) {
  const int n = static_cast<int>(prompt.size());
  StepInput in;
  in.token_ids = prompt;
  for (int i = 0; i < n; ++i) in.positions.push_back(i);
  in.query_start = {0, n};
  in.context_len = {n};
  in.block_tables = {{}};
  for (int p = 0; p * page_size < n; ++p) in.block_tables[0].push_back(p);
  for (int i = 0; i < n; ++i) in.logit_rows.push_back(i);
  return in;
}

std::vector<std::vector<int32_t>> Prompts() {
  return {{5, 17, 300, 2, 2, 9, 41, 77, 120, 3, 500, 64, 8},
          {400, 1, 33, 33, 33, 250, 11, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 6}};
}

// Max over rows of ||a_row - b_row|| / ||b_row||.
double MaxRowRelError(const std::vector<float>& a, const std::vector<float>& b, int cols) {
  double worst = 0;
  for (size_t r = 0; r * cols < b.size(); ++r) {
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

std::vector<std::vector<int32_t>> GreedyTokens(Model* model, int max_tokens) {
  Batcher batcher(model, nullptr);
  const auto prompts = Prompts();
  std::vector<std::vector<int32_t>> tokens(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationRequest req;
    req.id = i;
    req.prompt = prompts[i];
    req.max_tokens = max_tokens;
    req.ignore_eos = true;
    EXPECT_TRUE(batcher.Add(req).ok());
  }
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) tokens[e.request_id].push_back(e.token_id);
  }
  return tokens;
}

class TensorParallelGoldenTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(TensorParallelGoldenTest, LogitsMatchOneRank) {
  const auto& [name, ranks] = GetParam();
  const std::string dir = FixturePath("models/" + name);
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  options.max_batch_tokens = 32;
  options.max_logit_rows = 32;
  options.page_size = 8;
  auto one_backend = CreateCpuBackend(1);
  auto one = LoadModel({dir, ""}, one_backend.get(), options);
  ASSERT_TRUE(one.ok()) << one.status();
  auto group = LoadGroup(dir, ranks, options);
  ASSERT_NE(group, nullptr);
  const int vocab = one->model->config().vocab_size;
  for (const auto& prompt : Prompts()) {
    const StepInput in = PromptStep(prompt, options.page_size);
    auto want = one->model->Forward(in);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = group->loaded.model->Forward(in);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), want->size());
    EXPECT_LT(MaxRowRelError(*got, *want, vocab), 1e-4) << name << " over " << ranks << " ranks";
  }
  // Each rank holds its share of the KV: 1 / N of the heads, or one
  // replicated head.
  const ModelConfig& c = one->model->config();
  EXPECT_EQ(
      group->loaded.model->kv_bytes_per_token(),
      one->model->kv_bytes_per_token() * std::max(1, c.num_kv_heads / ranks) / c.num_kv_heads);
}

TEST_P(TensorParallelGoldenTest, GreedyTokensMatchOneRankInABatch) {
  const auto& [name, ranks] = GetParam();
  const std::string dir = FixturePath("models/" + name);
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 64;
  options.max_batch_tokens = 16;  // prompts in chunks, beside decodes
  options.page_size = 8;
  auto one_backend = CreateCpuBackend(1);
  auto one = LoadModel({dir, ""}, one_backend.get(), options);
  ASSERT_TRUE(one.ok()) << one.status();
  auto group = LoadGroup(dir, ranks, options);
  ASSERT_NE(group, nullptr);
  const auto want = GreedyTokens(one->model.get(), 24);
  const auto got = GreedyTokens(group->loaded.model.get(), 24);
  ASSERT_EQ(want[0].size(), 24u);
  EXPECT_EQ(got, want) << name << " over " << ranks << " ranks";
}

INSTANTIATE_TEST_SUITE_P(Models, TensorParallelGoldenTest,
                         ::testing::Combine(::testing::Values("llama_gqa", "qwen2_tied",
                                                              "llama3_rope", "mistral_window"),
                                            ::testing::Values(2, 4)),
                         [](const ::testing::TestParamInfo<std::tuple<std::string, int>>& info) {
                           return std::get<0>(info.param) + "_tp" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(TensorParallelTest, ALeaderWhoseFollowersNeverComeFailsItsStepInTime) {
  const std::string dir = FixturePath("models/llama_gqa");
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  options.max_batch_tokens = 32;
  options.max_logit_rows = 32;
  auto comms = CreateInProcessGroup(2, milliseconds(300));
  ASSERT_TRUE(comms.ok());
  auto b0 = CreateCpuBackend(1), b1 = CreateCpuBackend(1);
  std::vector<Backend*> backends = {b0.get(), b1.get()};
  std::vector<Communicator*> ranks = {(*comms)[0].get(), (*comms)[1].get()};
  auto loaded = LoadModel({dir, ""}, backends, ranks, options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  // Rank 1 stops following (as if its thread had died).
  loaded->model->set_followers(nullptr);
  const auto start = std::chrono::steady_clock::now();
  auto out = loaded->model->Forward(PromptStep({1, 2, 3, 4}, options.page_size));
  EXPECT_TRUE(absl::IsDeadlineExceeded(out.status())) << out.status();
  EXPECT_NE(out.status().message().find("rank(s) 1 did not join"), std::string_view::npos)
      << out.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  // The group stays broken: later steps fail at once, not after a timeout.
  auto again = loaded->model->Forward(PromptStep({1, 2, 3, 4}, options.page_size));
  EXPECT_TRUE(absl::IsAborted(again.status())) << again.status();
}

// A planner that plans nothing (dense attention) and gives the steps'
// graph keys: the same one each step (`fixed`), or a new one each step.
class KeyingPlanner : public AttentionPlanner {
 public:
  explicit KeyingPlanner(bool fixed) : fixed_(fixed) {}
  absl::Status BeginStep(const StepInput&, const AttentionBatch&) override {
    ++steps_;
    return absl::OkStatus();
  }
  absl::StatusOr<const SparsePlan*> PlanLayer(int, const AttentionBatch&, const Tensor&, Tensor&,
                                              Tensor&) override {
    return nullptr;
  }
  void Release(int64_t) override {}
  bool Replayable() const override { return true; }
  absl::StatusOr<std::optional<std::vector<int32_t>>> GraphKey() override {
    return std::vector<int32_t>{fixed_ ? 0 : steps_};
  }
  int steps() const { return steps_; }

 private:
  const bool fixed_;
  int steps_ = 0;
};

// The ranks' planners key their steps apart (each rank's KV policy has its
// own state, e.g. which of its clusters are on the SSD yet): on a backend
// without graphs every rank still takes each decode step with the same
// rows. (Before, a rank that had seen its key twice stopped padding the
// step to its graph bucket while another still padded: 3 rows against 4
// in the step's first collective.)
TEST(TensorParallelTest, RanksWhosePlannersKeyStepsApartTakeTheSameRows) {
  ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 64;
  options.max_batch_tokens = 64;
  options.max_logit_rows = 64;
  options.num_pages = 32;
  auto group = LoadGroup(FixturePath("models/llama_gqa"), 2, options);
  ASSERT_NE(group, nullptr);
  KeyingPlanner leader(/*fixed=*/true), follower(/*fixed=*/false);
  ASSERT_TRUE(group->loaded.model->set_attention_planner(&leader).ok());
  ASSERT_TRUE(group->loaded.followers[0]->set_attention_planner(&follower).ok());
  Batcher batcher(group->loaded.model.get(), nullptr);
  for (int i = 0; i < 3; ++i) {  // three sequences: a graph bucket of 4
    GenerationRequest req;
    req.id = i;
    req.prompt = {5 + i, 17, 300, 2, 9};
    req.max_tokens = 6;
    req.ignore_eos = true;
    ASSERT_TRUE(batcher.Add(req).ok());
  }
  int tokens = 0;
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    tokens += static_cast<int>(events->size());
  }
  EXPECT_EQ(tokens, 18);
  EXPECT_GE(leader.steps(), 5);
  EXPECT_TRUE(group->loaded.model->set_attention_planner(nullptr).ok());
  EXPECT_TRUE(group->loaded.followers[0]->set_attention_planner(nullptr).ok());
}

TEST(TensorParallelTest, ARefusedStepIsRefusedByEveryRankAndTheGroupGoesOn) {
  const std::string dir = FixturePath("models/llama_gqa");
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  options.max_batch_tokens = 32;
  options.max_logit_rows = 32;
  auto group = LoadGroup(dir, 2, options);
  ASSERT_NE(group, nullptr);
  StepInput bad = PromptStep({1, 2, 3, 4}, 16);
  bad.token_ids[1] = 100000;  // outside the vocabulary
  auto refused = group->loaded.model->Forward(bad);
  EXPECT_TRUE(absl::IsInvalidArgument(refused.status())) << refused.status();
  auto good = group->loaded.model->Forward(PromptStep({1, 2, 3, 4}, 16));
  EXPECT_TRUE(good.ok()) << good.status();
}

TEST(TensorParallelTest, AnEngineWhoseGroupBrokeRefusesRequestsAndSaysWhy) {
  // A rank that fails breaks the group for good: the engine then refuses
  // every request at once, naming why, instead of failing each one after
  // a step (or a collective's timeout).
  const std::string dir = FixturePath("models/llama_gqa");
  ModelOptions options;
  options.max_seqs = 2;
  options.max_context = 64;
  options.max_batch_tokens = 32;
  auto group = LoadGroup(dir, 2, options);
  ASSERT_NE(group, nullptr);
  AsyncEngine engine(group->loaded.model.get(), nullptr);
  auto generate = [&](uint64_t id) {
    GenerationRequest r;
    r.id = id;
    r.prompt = {1, 2, 3, 4};
    r.max_tokens = 4;
    r.ignore_eos = true;
    auto done = std::make_shared<std::promise<FinishReason>>();
    absl::Status submitted = engine.Submit(r, [done](const TokenEvent& e) {
      if (e.finish != FinishReason::kNone) done->set_value(e.finish);
    });
    if (!submitted.ok()) return submitted;
    auto finished = done->get_future();
    if (finished.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
      return absl::DeadlineExceededError("no final event");
    }
    return finished.get() == FinishReason::kLength ? absl::OkStatus()
                                                   : absl::InternalError("not kLength");
  };
  ASSERT_TRUE(generate(1).ok());
  EXPECT_TRUE(engine.Health().ok());
  EXPECT_FALSE(engine.GetStats().broken);
  group->comms[1]->Abort("rank 1 lost its device");
  const absl::Status refused = generate(2);
  EXPECT_TRUE(absl::IsUnavailable(refused)) << refused;
  EXPECT_THAT(std::string(refused.message()),
              ::testing::AllOf(::testing::HasSubstr("tensor-parallel group is broken"),
                               ::testing::HasSubstr("rank 1 lost its device")));
  EXPECT_TRUE(absl::IsUnavailable(engine.Health()));
  EXPECT_TRUE(engine.GetStats().broken);
  engine.Stop();
}

}  // namespace
}  // namespace strata::engine

namespace strata::engine {
namespace {

// What one process with a thread per rank costs a step beyond the compute
// and the collectives: rank 0 handing the step to the others and waiting
// for them. A refused step (no collectives, no compute) is all handoff.
// Printed for the record (bench/RESULTS.md); bounded loosely, the machine
// may be busy.
TEST(TensorParallelTest, HandingAStepToTheOtherRanksCostsMicroseconds) {
  ModelOptions options;
  options.max_seqs = 1;
  options.max_context = 64;
  options.max_batch_tokens = 32;
  options.max_logit_rows = 32;
  auto group = LoadGroup(FixturePath("models/llama_gqa"), 4, options);
  ASSERT_NE(group, nullptr);
  StepInput refused = PromptStep({1, 2, 3, 4}, 16);
  refused.token_ids[0] = -1;
  std::vector<double> micros;
  for (int i = 0; i < 2000; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto out = group->loaded.model->Forward(refused);
    micros.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
            .count());
    ASSERT_TRUE(absl::IsInvalidArgument(out.status()));
  }
  std::sort(micros.begin(), micros.end());
  std::printf("step handoff to 3 follower ranks: median %.1f us, p99 %.1f us\n",
              micros[micros.size() / 2], micros[micros.size() * 99 / 100]);
  EXPECT_LT(micros[micros.size() / 2], 5000.0);
}

}  // namespace
}  // namespace strata::engine

// The block manager over a tensor-parallel group (CPU ranks): a host record
// holds every rank's part of a page, and the copies go to each rank's
// backend (kvtier/kv_device.h). Sequences preempted to the host tier and the
// SSD tier, and prompts loaded from the prefix store, give the tokens one
// rank gives; a corrupt byte in any rank's part is caught.
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/in_process_communicator.h"
#include "engine/model_loader.h"
#include "engine/tensor_parallel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/clustering_store.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/ssd_store.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

namespace fs = std::filesystem;
using Outputs = std::map<uint64_t, std::vector<int32_t>>;

engine::ModelOptions SmallCache(int num_pages) {
  engine::ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 256;
  options.max_batch_tokens = 96;
  options.page_size = 8;
  options.num_pages = num_pages;
  return options;
}

// A golden model over `ranks` CPU ranks (one: no group).
struct Ranks {
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  std::vector<std::unique_ptr<engine::Backend>> backends;
  engine::LoadedModel loaded;
  engine::Model* model() { return loaded.model.get(); }
};

std::unique_ptr<Ranks> Load(int ranks, const engine::ModelOptions& options) {
  auto r = std::make_unique<Ranks>();
  const engine::ModelSource source{testing_util::FixturePath("models/llama_gqa"), ""};
  std::vector<engine::Backend*> backends;
  for (int i = 0; i < ranks; ++i) {
    r->backends.push_back(engine::CreateCpuBackend(1));
    backends.push_back(r->backends.back().get());
  }
  absl::StatusOr<engine::LoadedModel> loaded = absl::UnknownError("");
  if (ranks == 1) {
    loaded = engine::LoadModel(source, backends[0], options);
  } else {
    auto comms = engine::CreateInProcessGroup(ranks, std::chrono::seconds(30));
    EXPECT_TRUE(comms.ok());
    r->comms = *std::move(comms);
    std::vector<engine::Communicator*> comm_ptrs;
    for (auto& c : r->comms) comm_ptrs.push_back(c.get());
    loaded = engine::LoadModel(source, backends, comm_ptrs, options);
  }
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return nullptr;
  r->loaded = *std::move(loaded);
  return r;
}

engine::GenerationRequest Request(uint64_t id, int prompt_len, int max_tokens) {
  engine::GenerationRequest r;
  r.id = id;
  r.prompt = testing_util::RandomPrompt(prompt_len, 7 + static_cast<uint32_t>(id));
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

// Four sequences that do not fit a 40-page cache together.
std::vector<engine::GenerationRequest> PressureRequests() {
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(Request(i, 60 + 25 * i, 60));
  return reqs;
}

// Runs every request to its end; steps that wait for a lower tier yield.
Outputs RunAll(engine::Batcher& batcher, const std::vector<engine::GenerationRequest>& reqs) {
  for (const auto& r : reqs) EXPECT_TRUE(batcher.Add(r).ok());
  Outputs out;
  for (int step = 0; batcher.HasWork() && step < 100000; ++step) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    if (events->empty()) std::this_thread::sleep_for(std::chrono::microseconds(100));
    for (const auto& e : *events) {
      out[e.request_id].push_back(e.token_id);
      EXPECT_NE(e.finish, engine::FinishReason::kError) << e.request_id << ": " << e.error;
    }
  }
  EXPECT_FALSE(batcher.HasWork());
  return out;
}

// Each request alone on one rank with room for it: the tokens to match.
Outputs OneRankAlone(const std::vector<engine::GenerationRequest>& reqs) {
  auto one = Load(1, SmallCache(200));
  Outputs alone;
  for (const auto& r : reqs) {
    engine::Batcher b(one->model(), nullptr);
    alone[r.id] = RunAll(b, {r})[r.id];
  }
  return alone;
}

class TensorParallelTiersTest : public ::testing::TestWithParam<int> {};

TEST_P(TensorParallelTiersTest, PreemptedSequencesResumeFromTheHostTierWithOneRanksTokens) {
  const auto reqs = PressureRequests();
  const Outputs alone = OneRankAlone(reqs);
  auto ranks = Load(GetParam(), SmallCache(40));
  ASSERT_NE(ranks, nullptr);
  auto manager = KvBlockManager::Create(ranks->model(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok()) << manager.status();
  EXPECT_EQ((*manager)->layout().num_ranks(), GetParam());
  engine::Batcher batcher(ranks->model(), nullptr, {}, manager->get());
  const Outputs batched = RunAll(batcher, reqs);
  EXPECT_GT(batcher.num_swapped_out(), 0);
  const KvBlockManager::Stats s = (*manager)->stats();
  EXPECT_EQ(s.swap_ins, s.swap_outs);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE((*manager)->Idle());
}

TEST_P(TensorParallelTiersTest, PausedSequencesGoDownToTheSsdAndBackWithOneRanksTokens) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("tp_ssd_" + std::to_string(getpid()) + "_" + std::to_string(GetParam()));
  fs::remove_all(dir);
  auto store = SsdStore::Open({dir.string(), "llama_gqa", int64_t{1} << 30});
  ASSERT_TRUE(store.ok()) << store.status();
  const auto reqs = PressureRequests();
  const Outputs alone = OneRankAlone(reqs);
  auto ranks = Load(GetParam(), SmallCache(40));
  ASSERT_NE(ranks, nullptr);
  auto layout = KvLayout::Create(*ranks->model());
  ASSERT_TRUE(layout.ok());
  auto manager = KvBlockManager::Create(
      ranks->model(),
      {.host_bytes = 64 * layout->record_bytes(), .ssd = store->get(), .ssd_high_water = 0.25});
  ASSERT_TRUE(manager.ok()) << manager.status();
  {
    engine::Batcher batcher(ranks->model(), nullptr, {}, manager->get());
    const Outputs batched = RunAll(batcher, reqs);
    const KvBlockManager::Stats s = (*manager)->stats();
    EXPECT_GT(s.ssd_swap_outs, 0);
    EXPECT_EQ(s.ssd_swap_ins, s.ssd_swap_outs);
    EXPECT_EQ(s.ssd_sequences_lost, 0);
    for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  }
  EXPECT_EQ((*store)->stats().bytes_used, 0) << "every swapped sequence's keys are gone";
  manager->reset();
  store->reset();
  fs::remove_all(dir);
}

using testing_util::Concat;
using testing_util::Serve;
using testing_util::Served;

TEST_P(TensorParallelTiersTest, AStoredPromptIsLoadedOnEveryRankWithOneRanksTokens) {
  const engine::GenerationRequest doc = Request(1, 100, 12);
  engine::GenerationRequest same_doc = doc;
  same_doc.id = 2;
  same_doc.prompt = Concat(doc.prompt, testing_util::RandomPrompt(30, 99));
  const Outputs alone = OneRankAlone({doc, same_doc});
  auto ranks = Load(GetParam(), SmallCache(60));
  ASSERT_NE(ranks, nullptr);
  auto manager = KvBlockManager::Create(
      ranks->model(),
      {.host_bytes = int64_t{64} << 20, .prefix_bytes = int64_t{32} << 20, .prefix_space = "t"});
  ASSERT_TRUE(manager.ok()) << manager.status();
  KvBlockManager& m = **manager;
  engine::Batcher batcher(ranks->model(), nullptr, {}, &m);
  EXPECT_EQ(Serve(batcher, doc).tokens, alone.at(1));
  // Another prompt overwrites the pages the document used, so what the
  // next one reads is what the load put there, on every rank.
  Serve(batcher, Request(5, 230, 2));
  ASSERT_TRUE(m.Poll().ok());
  const Served second = Serve(batcher, same_doc);
  EXPECT_EQ(second.cached, 96) << "the document's whole pages";
  EXPECT_EQ(second.tokens, alone.at(2));

  // A flipped byte in the last rank's part of every stored record: the
  // device check (each rank's rows, folded in order) finds the first bad
  // page and the prompt is computed instead.
  const int64_t last_rank_part = m.layout().record_bytes() / GetParam() * (GetParam() - 1);
  for (int32_t r = 0; r < m.host_pool().num_records(); ++r) {
    if (m.host_pool().state(r) == HostPool::State::kResident) {
      m.host_pool().data(r)[last_rank_part + 5] ^= 0x10;
    }
  }
  engine::GenerationRequest again = same_doc;
  again.id = 3;
  const Served third = Serve(batcher, again);
  EXPECT_EQ(third.cached, 0);
  EXPECT_EQ(third.tokens, alone.at(2));
  EXPECT_EQ(m.stats().prefix_records_lost, 1);
}

// ---- KV crossing between a prefill and a decode worker ------------------------

// A worker over `ranks` ranks with a host tier (and room to land
// `landing_records` pages), sending its exports' pages in `wire_codec`;
// with `policy`, its ranks run it, a prefill worker (no landing room)
// clustering the ClusterKV prompts it exports.
struct TransferWorker {
  TransferWorker(int ranks, int landing_records, engine::KvCodecKind wire_codec,
                 const KvPolicyConfig* policy = nullptr) {
    group = Load(ranks, SmallCache(80));
    if (group == nullptr) return;
    auto layout = KvLayout::Create(*group->model());
    EXPECT_TRUE(layout.ok()) << layout.status();
    const int64_t record = (layout->record_bytes() + 63) / 64 * 64;
    KvBlockManagerOptions options{.host_bytes = record * 64,
                                  .landing_bytes = record * landing_records};
    options.workload_wire_codec = {wire_codec};
    auto created = KvBlockManager::Create(group->model(), options);
    EXPECT_TRUE(created.ok()) << created.status();
    manager = *std::move(created);
    manager->set_export_sink([this](KvBlockManager::ExportedKv e) { exports.push_back(e); });
    if (policy != nullptr) {
      auto installed =
          RankedKvPolicies::Install(group->model(), {*policy},
                                    {.max_sparse_seqs = 4,
                                     .exports = landing_records == 0 ? manager.get() : nullptr,
                                     .imports = landing_records > 0});
      EXPECT_TRUE(installed.ok()) << installed.status();
      if (installed.ok()) policies = *std::move(installed);
    }
    batcher = std::make_unique<engine::Batcher>(group->model(), nullptr, engine::BatcherOptions{},
                                                manager.get());
  }
  std::unique_ptr<Ranks> group;
  std::unique_ptr<KvBlockManager> manager;
  std::unique_ptr<RankedKvPolicies> policies;  // outlives the batcher
  std::unique_ptr<engine::Batcher> batcher;
  std::vector<KvBlockManager::ExportedKv> exports;
};

// The prompt computed on `p` (its first token sampled there, its KV
// exported), delivered to `d` and decoded there: the decode worker's tokens,
// or empty with a failure recorded. `refused` gets the delivery's error
// when the blocks are refused.
std::vector<int32_t> PrefillThenDecode(TransferWorker& p, TransferWorker& d,
                                       const engine::GenerationRequest& r, uint64_t transfer,
                                       absl::Status* refused = nullptr) {
  const int page = d.manager->layout().page_size();
  EXPECT_TRUE(d.manager->landing_area()
                  ->Reserve(transfer, (static_cast<int>(r.prompt.size()) + page - 1) / page,
                            absl::Now() + absl::Hours(1))
                  .ok());
  engine::GenerationRequest pr = r;
  pr.max_tokens = 1;
  pr.export_kv = transfer;
  const Served first = Serve(*p.batcher, pr);
  EXPECT_EQ(first.tokens.size(), 1u);
  // What the engine does while it idles: the planner hands the export what
  // it computed on the prompt, which goes out with the export's end.
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(p.batcher->PollKv().ok());
  const absl::Status delivered =
      testing_util::Deliver(p.exports, p.manager->layout(), *d.manager, transfer);
  p.manager->ReleaseExport(transfer);
  p.exports.clear();
  EXPECT_TRUE(p.manager->Poll().ok());
  if (!delivered.ok()) {
    d.manager->DropImported(transfer);
    if (refused != nullptr) {
      *refused = delivered;
    } else {
      ADD_FAILURE() << delivered;
    }
    return {};
  }
  engine::GenerationRequest dr = r;
  dr.generated = {{first.tokens.empty() ? 0 : first.tokens[0], 0.0f}};
  dr.import_kv = transfer;
  std::vector<int32_t> tokens = Serve(*d.batcher, dr).tokens;
  EXPECT_TRUE(d.manager->Poll().ok());
  return tokens;
}

void ExpectNothingHeld(TransferWorker& w) {
  ASSERT_TRUE(w.manager->Poll().ok());
  EXPECT_TRUE(w.manager->Idle());
  EXPECT_EQ(w.manager->stats().exports_held, 0);
  if (w.manager->landing_area() != nullptr) {
    EXPECT_EQ(w.manager->landing_area()->num_transfers(), 0);
  }
}

class TensorParallelTransferTest
    : public ::testing::TestWithParam<std::tuple<int, engine::KvCodecKind>> {};

// Prefill and decode workers of the same tensor-parallel size: a page's
// record carries every rank's rows (coded per rank, per KV head, with a
// codec), and rank r's rows land on the decode worker's rank r. The tokens
// are those of one-rank workers exchanging the same prompt in the same
// codec, and, raw, those of one rank computing everything.
TEST_P(TensorParallelTransferTest, APromptsKvCrossesRankToRankWithOneRanksTokens) {
  const auto& [ranks, codec] = GetParam();
  TransferWorker one_p(1, 0, codec), one_d(1, 64, engine::KvCodecKind::kBf16);
  TransferWorker p(ranks, 0, codec), d(ranks, 64, engine::KvCodecKind::kBf16);
  ASSERT_NE(p.manager, nullptr);
  ASSERT_NE(d.manager, nullptr);
  EXPECT_EQ(KvWireFormat::Of(d.manager->layout()).ranks, ranks);
  uint64_t transfer = 100;
  for (int prompt_len : {5, 61, 120}) {
    SCOPED_TRACE(prompt_len);
    engine::GenerationRequest r = Request(prompt_len, prompt_len, 24);
    const std::vector<int32_t> one = PrefillThenDecode(one_p, one_d, r, ++transfer);
    ASSERT_EQ(one.size(), 24u);
    EXPECT_EQ(PrefillThenDecode(p, d, r, ++transfer), one);
    if (codec == engine::KvCodecKind::kBf16) {
      EXPECT_EQ(one, OneRankAlone({r}).at(r.id)) << "raw KV: the tokens of one worker";
    }
  }
  EXPECT_EQ(d.manager->stats().kv_imports, 3);
  EXPECT_EQ(d.manager->stats().kv_imports_failed, 0);
  for (TransferWorker* w : {&one_p, &one_d, &p, &d}) ExpectNothingHeld(*w);
}

INSTANTIATE_TEST_SUITE_P(
    RanksAndCodecs, TensorParallelTransferTest,
    ::testing::Combine(::testing::Values(2, 4),
                       ::testing::Values(engine::KvCodecKind::kBf16, engine::KvCodecKind::kInt8)),
    [](const ::testing::TestParamInfo<std::tuple<int, engine::KvCodecKind>>& info) {
      return absl::StrCat("tp", std::get<0>(info.param), "_",
                          std::string(engine::KvCodecKindName(std::get<1>(info.param))));
    });

// A tensor-parallel prefill worker running ClusterKV clusters an exported
// prompt on every rank, each its own KV heads, and the clusterings of all
// ranks go with the KV; each rank of a decode worker of the same size
// takes its own and redoes them (a reorder) instead of running the
// k-means. The tokens are those of one rank computing everything.
TEST_P(TensorParallelTiersTest, EveryRankClustersAnExportedPromptAndItsDecodeRankRedoesIt) {
  KvPolicyConfig policy = testing_util::SmallClusterKv();
  policy.cluster_chunk_tokens = 32;
  const int ranks = GetParam();
  TransferWorker p(ranks, 0, engine::KvCodecKind::kBf16, &policy);
  TransferWorker d(ranks, 64, engine::KvCodecKind::kBf16, &policy);
  ASSERT_NE(p.policies, nullptr);
  ASSERT_NE(d.policies, nullptr);
  auto one = Load(1, SmallCache(200));
  ASSERT_NE(one, nullptr);
  auto alone = RankedKvPolicies::Install(one->model(), {policy}, {.max_sparse_seqs = 4});
  ASSERT_TRUE(alone.ok()) << alone.status();
  uint64_t transfer = 500;
  for (int prompt_len : {61, 150}) {
    SCOPED_TRACE(prompt_len);
    const engine::GenerationRequest r = Request(prompt_len, prompt_len, 24);
    engine::Batcher b(one->model(), nullptr);
    const std::vector<int32_t> want = RunAll(b, {r})[r.id];
    ASSERT_EQ(want.size(), 24u);
    EXPECT_EQ(PrefillThenDecode(p, d, r, ++transfer), want);
  }
  const int sparse_layers = one->model()->config().num_layers - policy.full_layers;
  const int64_t chunks = p.policies->rank(0).stats().exported_clusterings;
  EXPECT_GE(chunks, 3) << "the long prompt clusters in several chunks";
  for (int rank = 0; rank < ranks; ++rank) {
    SCOPED_TRACE(rank);
    EXPECT_EQ(p.policies->rank(rank).stats().exported_clusterings, chunks);
    const KvPolicyRunner::Stats& s = d.policies->rank(rank).stats();
    EXPECT_EQ(s.imported_clusterings, chunks * sparse_layers) << "its own rank's";
    EXPECT_EQ(s.reused_clusterings, s.imported_clusterings);
  }
  for (TransferWorker* w : {&p, &d}) ExpectNothingHeld(*w);
}

TEST(TensorParallelTransferTest, AWorkerOfAnotherSizeRefusesTheBlocksNamingTheField) {
  TransferWorker p(2, 0, engine::KvCodecKind::kBf16), d(1, 64, engine::KvCodecKind::kBf16);
  absl::Status refused;
  EXPECT_TRUE(PrefillThenDecode(p, d, Request(1, 40, 8), 7, &refused).empty());
  EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
  EXPECT_THAT(
      std::string(refused.message()),
      ::testing::HasSubstr("tensor-parallel ranks differs: the sender's 2, this worker's 1"));
  ExpectNothingHeld(p);
  ExpectNothingHeld(d);
}

KvPolicyConfig Policy(const std::string& type) {
  KvPolicyConfig c;
  c.type = type;
  c.budget_tokens = 24;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.tokens_per_cluster = 8;
  c.quest_page_tokens = 8;
  c.full_layers = 0;
  return c;
}

class TensorParallelPoliciesTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

// Each rank selects over its own KV heads; a head's selection depends on
// that head alone, so the ranks together attend to what one rank does,
// and preempted sequences come back with their policy state intact.
TEST_P(TensorParallelPoliciesTest, EachRankPlansItsHeadsAndTheTokensAreOneRanks) {
  const auto& [type, ranks] = GetParam();
  const KvPolicyConfig policy = Policy(type);
  // Twice as many sequences as sparse slots: the later ones run sparse
  // only if every rank's planner was told the earlier ones ended.
  std::vector<engine::GenerationRequest> reqs = PressureRequests();
  for (int i = 0; i < 4; ++i) reqs.push_back(Request(10 + i, 50 + 10 * i, 40));
  auto one = Load(1, SmallCache(200));
  auto one_policy = RankedKvPolicies::Install(one->model(), {policy}, {.max_sparse_seqs = 4});
  ASSERT_TRUE(one_policy.ok()) << one_policy.status();
  engine::Batcher unpressured(one->model(), nullptr);
  const Outputs expected = RunAll(unpressured, reqs);

  std::vector<std::unique_ptr<KvPolicyRunner>> owned;  // outlives the group's use
  auto group = Load(ranks, SmallCache(40));
  ASSERT_NE(group, nullptr);
  // A KV policy per rank over its KV heads; the leader's model plans
  // through a RankedPlanner over them all.
  std::vector<KvPolicyRunner*> runners;
  for (engine::Model* rank : group->model()->ranks()) {
    auto runner = KvPolicyRunner::Create(rank, {policy}, {.max_sparse_seqs = 4});
    ASSERT_TRUE(runner.ok()) << runner.status();
    runners.push_back(runner->get());
    owned.push_back(*std::move(runner));
  }
  std::vector<engine::AttentionPlanner*> planners(runners.begin(), runners.end());
  engine::RankedPlanner ranked(planners);
  for (size_t r = 1; r < runners.size(); ++r) {
    ASSERT_TRUE(group->model()->ranks()[r]->set_attention_planner(runners[r]).ok());
  }
  ASSERT_TRUE(group->model()->set_attention_planner(&ranked).ok());
  auto manager = KvBlockManager::Create(group->model(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok()) << manager.status();
  engine::Batcher batcher(group->model(), nullptr, {}, manager->get());
  const Outputs batched = RunAll(batcher, reqs);
  EXPECT_GT(batcher.num_swapped_out(), 0);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), expected.at(r.id)) << "request " << r.id;
  for (KvPolicyRunner* runner : runners) {
    EXPECT_EQ(runner->stats().sparse_queries, runners[0]->stats().sparse_queries)
        << "every rank planned the same sparse queries";
    EXPECT_EQ(runner->stats().dense_no_slot, 0);
  }
  EXPECT_GT(runners[0]->stats().sparse_queries, 0);
  for (engine::Model* rank : group->model()->ranks()) {
    ASSERT_TRUE(rank->set_attention_planner(nullptr).ok());
  }
}

// ClusterKV with its clusters homed in the host tier, on every rank: each
// rank clusters and offloads its own KV heads into host regions of its own
// and recalls them into a ring that is the same GPU pages on every rank.
// The tokens are one rank's, and the group holds no more GPU pages than one
// rank does at any step (one ring per sequence, not one per rank).
struct TieredRun {
  Outputs tokens;
  int max_pages_used = 0;
  KvPolicyRunner::Stats leader;
  bool idle = false;
};

// With `ssd`, every rank's clusters also go down to it as soon as they are
// offloaded (admission always), and come back up inside the steps.
TieredRun ServeHostHomed(int ranks, const std::vector<engine::GenerationRequest>& reqs,
                         SsdStore* ssd = nullptr) {
  TieredRun run;
  auto group = Load(ranks, SmallCache(160));
  EXPECT_NE(group, nullptr);
  if (group == nullptr) return run;
  auto manager =
      KvBlockManager::Create(group->model(), {.host_bytes = int64_t{64} << 20, .ssd = ssd});
  EXPECT_TRUE(manager.ok()) << manager.status();
  KvBlockManager& m = **manager;
  {
    KvTierOptions tier{.manager = manager->get()};
    if (ssd != nullptr) tier.spill_admission = {KvBlockManagerOptions::SsdAdmission::kAlways};
    auto installed = RankedKvPolicies::Install(group->model(), {testing_util::SmallClusterKv()},
                                               {.max_sparse_seqs = 4, .tier = tier});
    EXPECT_TRUE(installed.ok()) << installed.status();
    if (!installed.ok()) return run;
    engine::Batcher batcher(group->model(), nullptr, {}, &m);
    for (const auto& r : reqs) EXPECT_TRUE(batcher.Add(r).ok());
    for (int step = 0; batcher.HasWork() && step < 10000; ++step) {
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) {
        run.tokens[e.request_id].push_back(e.token_id);
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      }
      run.max_pages_used = std::max(run.max_pages_used, m.stats().gpu_pages_used);
    }
    run.leader = (*installed)->leader().stats();
  }
  EXPECT_TRUE(m.Poll().ok());
  run.idle = m.Idle();
  return run;
}

TEST_P(TensorParallelTiersTest, HostHomedClustersOnEveryRankGiveOneRanksTokens) {
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 3; ++i) reqs.push_back(Request(i, 97 + 40 * i, 40));
  const TieredRun one = ServeHostHomed(1, reqs);
  const TieredRun group = ServeHostHomed(GetParam(), reqs);
  EXPECT_GT(group.leader.tiered_sequences, 0);
  EXPECT_EQ(group.leader.ring_refused, 0);
  EXPECT_GT(group.leader.offloads, 0);
  EXPECT_GT(group.leader.recall_tokens, 0);
  EXPECT_EQ(group.leader.recall_bad_pieces, 0);
  for (const auto& r : reqs) EXPECT_EQ(group.tokens.at(r.id), one.tokens.at(r.id)) << r.id;
  EXPECT_EQ(group.max_pages_used, one.max_pages_used) << "one ring per sequence, shared by ranks";
  EXPECT_TRUE(group.idle) << "ring pages and every rank's host regions returned";
}

// Stored clusterings (ClusteringStore) on every rank: the request that
// loads a stored document keeps each rank's clusterings of its own KV
// heads, the next one redoes them from the store; the tokens are those of
// one rank running the k-means.
TEST_P(TensorParallelTiersTest, EveryRankReusesItsStoredClusteringsWithOneRanksTokens) {
  KvPolicyConfig policy = testing_util::SmallClusterKv();
  policy.cluster_chunk_tokens = 32;
  const std::vector<int32_t> doc = testing_util::RandomPrompt(160, 3);
  auto ask = [&](uint64_t id, uint32_t question) {
    engine::GenerationRequest r;
    r.id = id;
    r.prompt = testing_util::Concat(doc, testing_util::RandomPrompt(9, question));
    r.max_tokens = 30;
    r.ignore_eos = true;
    return r;
  };
  const std::vector<engine::GenerationRequest> reqs = {ask(1, 4), ask(2, 5), ask(3, 5)};
  Outputs want;
  {
    auto one = Load(1, SmallCache(200));
    ASSERT_NE(one, nullptr);
    auto installed = RankedKvPolicies::Install(one->model(), {policy}, {.max_sparse_seqs = 4});
    ASSERT_TRUE(installed.ok()) << installed.status();
    for (const auto& r : reqs) {
      engine::Batcher b(one->model(), nullptr);
      want[r.id] = RunAll(b, {r})[r.id];
    }
  }
  auto group = Load(GetParam(), SmallCache(160));
  ASSERT_NE(group, nullptr);
  auto manager = KvBlockManager::Create(
      group->model(),
      {.host_bytes = int64_t{64} << 20, .prefix_bytes = int64_t{32} << 20, .prefix_space = "t"});
  ASSERT_TRUE(manager.ok()) << manager.status();
  ClusteringStore clusterings(int64_t{8} << 20);
  auto installed = RankedKvPolicies::Install(group->model(), {policy},
                                             {.max_sparse_seqs = 4, .clusterings = &clusterings});
  ASSERT_TRUE(installed.ok()) << installed.status();
  engine::Batcher batcher(group->model(), nullptr, {}, manager->get());
  for (const auto& r : reqs) {
    EXPECT_EQ(RunAll(batcher, {r})[r.id], want[r.id]) << r.id;
    ASSERT_TRUE((*manager)->Poll().ok());  // seals the stored pages
  }
  const KvPolicyRunner::Stats& s = (*installed)->leader().stats();
  const int sparse_layers = group->model()->config().num_layers - policy.full_layers;
  EXPECT_EQ(s.kept_clusterings, 5) << "request 1's five chunks, on the pages it stored";
  EXPECT_EQ(s.reused_clusterings, 10 * sparse_layers) << "requests 2 and 3";
  EXPECT_EQ(clusterings.stats().hits, 10 * GetParam()) << "each rank its own";
}

// A paused tiered sequence whose ring cannot be taken back (no pages free)
// stays paused on every rank, and each rank counts the attempt: when pages
// are free again, every rank resumes it in the same step and plans it, and
// the tokens are one rank's. (Asking the ranks only up to the first
// refusal left their ring counts apart; a later step then resumed the
// sequence on some ranks only, and the group broke on mismatched
// collectives.)
TEST_P(TensorParallelTiersTest, ARefusedResumeLeavesEveryRankInStep) {
  const std::vector<engine::GenerationRequest> reqs = {Request(1, 97, 30)};
  const TieredRun one = ServeHostHomed(1, reqs);
  auto group = Load(GetParam(), SmallCache(160));
  ASSERT_NE(group, nullptr);
  auto manager = KvBlockManager::Create(group->model(), {.host_bytes = int64_t{64} << 20});
  ASSERT_TRUE(manager.ok()) << manager.status();
  KvBlockManager& m = **manager;
  auto installed =
      RankedKvPolicies::Install(group->model(), {testing_util::SmallClusterKv()},
                                {.max_sparse_seqs = 4, .tier = {.manager = manager->get()}});
  ASSERT_TRUE(installed.ok()) << installed.status();
  engine::Batcher batcher(group->model(), nullptr, {}, &m);
  ASSERT_TRUE(batcher.Add(reqs[0]).ok());
  engine::AttentionPlanner* planner = group->model()->attention_planner();
  std::vector<int32_t> tokens;
  int refusals = 0;
  for (int step = 0; batcher.HasWork() && step < 1000; ++step) {
    if (step == 5 || step == 8) {
      // Between steps: paused, then not resumed for lack of pages, twice.
      planner->Pause(1);
      std::vector<int32_t> hog;
      const engine::PageGroup ring_group = engine::PageGroup::kLower;
      ASSERT_TRUE(m.AllocatePages(ring_group, m.num_free_pages(ring_group), hog));
      absl::StatusOr<bool> resumed = planner->Resume(1);
      ASSERT_TRUE(resumed.ok()) << resumed.status();
      refusals += !*resumed;
      ASSERT_TRUE(m.FreePages(ring_group, hog).ok());
    }
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    for (const auto& e : *events) {
      EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      tokens.push_back(e.token_id);
    }
  }
  EXPECT_EQ(refusals, 2);
  EXPECT_EQ(tokens, one.tokens.at(1));
  for (int r = 0; r < (*installed)->num_ranks(); ++r) {
    EXPECT_EQ((*installed)->rank(r).stats().ring_resumes,
              (*installed)->leader().stats().ring_resumes);
  }
  EXPECT_EQ((*installed)->leader().stats().ring_resumes, 2) << "each in its next step";
}

TEST_P(TensorParallelTiersTest, EveryRanksClustersGoDownToTheSsdAndComeBackWithOneRanksTokens) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("tp_spill_" + std::to_string(getpid()) + "_" + std::to_string(GetParam()));
  fs::remove_all(dir);
  auto store = SsdStore::Open({dir.string(), "llama_gqa", int64_t{1} << 30});
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 3; ++i) reqs.push_back(Request(i, 97 + 40 * i, 40));
  const TieredRun one = ServeHostHomed(1, reqs);
  const TieredRun group = ServeHostHomed(GetParam(), reqs, store->get());
  EXPECT_GT(group.leader.spills, 0);
  EXPECT_GT(group.leader.hard_misses, 0) << "clusters fetched back from the SSD";
  EXPECT_EQ(group.leader.hard_miss_failed, 0);
  for (const auto& r : reqs) EXPECT_EQ(group.tokens.at(r.id), one.tokens.at(r.id)) << r.id;
  EXPECT_TRUE(group.idle);
  EXPECT_EQ((*store)->stats().bytes_used, 0) << "every rank's values deleted";
  store->reset();
  fs::remove_all(dir);
}

TEST(TensorParallelPoliciesTest, InstallPutsAPolicyOnEveryRankAndTakesThemOff) {
  auto group = Load(2, SmallCache(40));
  ASSERT_NE(group, nullptr);
  {
    auto installed =
        RankedKvPolicies::Install(group->model(), {Policy("clusterkv")}, {.max_sparse_seqs = 4});
    ASSERT_TRUE(installed.ok()) << installed.status();
    for (engine::Model* rank : group->model()->ranks()) {
      EXPECT_NE(rank->attention_planner(), nullptr);
    }
    engine::Batcher batcher(group->model(), nullptr);
    RunAll(batcher, {Request(1, 60, 10)});
    EXPECT_GT((*installed)->leader().stats().sparse_queries, 0);
  }
  for (engine::Model* rank : group->model()->ranks()) {
    EXPECT_EQ(rank->attention_planner(), nullptr);
  }
}

// Over 2 ranks each holds one of llama_gqa's 2 KV heads; over 4 each head
// is on two ranks, each with one of its two query heads, and the block
// scores of the two are summed across them before selection.
INSTANTIATE_TEST_SUITE_P(Policies, TensorParallelPoliciesTest,
                         ::testing::Combine(::testing::Values("streaming", "quest", "clusterkv"),
                                            ::testing::Values(2, 4)),
                         [](const ::testing::TestParamInfo<std::tuple<std::string, int>>& info) {
                           return std::get<0>(info.param) + "_tp" +
                                  std::to_string(std::get<1>(info.param));
                         });

INSTANTIATE_TEST_SUITE_P(Ranks, TensorParallelTiersTest, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "tp" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace strata::kvtier

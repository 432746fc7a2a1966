// The block manager: the layout checked against the model, the host pool's
// reference counts, and swap preemption through the batcher on the CPU
// backend: outputs as if never preempted, corrupt host copies caught, and
// every page and record back when the sequences are gone.
#include "kvtier/kv_block_manager.h"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/kv_policy.h"
#include "kvtier/record_mover.h"
#include "kvtier/ssd_store.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

std::unique_ptr<engine::Model> LoadGolden(const std::string& name, engine::ModelOptions options) {
  auto loaded = engine::LoadModel({testing_util::FixturePath("models/" + name), ""},
                                  g_backend.get(), options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return std::move(loaded->model);
}

std::vector<int32_t> Prompt(int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 500) + 3;
  return p;
}

engine::GenerationRequest Request(uint64_t id, int prompt_len, int max_tokens, int policy = 0) {
  engine::GenerationRequest r;
  r.id = id;
  r.prompt = Prompt(prompt_len, 7 + static_cast<uint32_t>(id));
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  r.kv_policy = policy;
  return r;
}

using Outputs = std::map<uint64_t, std::vector<int32_t>>;

// Runs every request to its end; `on_step` runs before each step.
Outputs RunAll(engine::Batcher& batcher, const std::vector<engine::GenerationRequest>& reqs,
               const std::function<void(int step)>& on_step = nullptr) {
  for (const auto& r : reqs) EXPECT_TRUE(batcher.Add(r).ok());
  Outputs out;
  for (int step = 0; batcher.HasWork() && step < 5000; ++step) {
    if (on_step) on_step(step);
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) {
      out[e.request_id].push_back(e.token_id);
      if (e.finish != engine::FinishReason::kNone) {
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.request_id << ": " << e.error;
      }
    }
  }
  EXPECT_FALSE(batcher.HasWork());
  return out;
}

engine::ModelOptions SmallCache(int num_pages) {
  engine::ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 256;
  options.max_batch_tokens = 96;
  options.page_size = 8;
  options.num_pages = num_pages;
  return options;
}

TEST(KvLayoutTest, MatchesTheModelsCaches) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  auto layout = KvLayout::Create(*model);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const engine::ModelConfig& c = model->config();
  EXPECT_EQ(layout->num_layers(), c.num_layers);
  EXPECT_EQ(layout->num_pages(engine::PageGroup::kLower), 40);
  EXPECT_EQ(layout->num_pages(engine::PageGroup::kUpper), 0);
  EXPECT_EQ(layout->page_bytes(), int64_t{8} * c.num_kv_heads * c.head_dim * 4);  // fp32 on CPU
  EXPECT_EQ(layout->record_bytes(), 2 * c.num_layers * layout->page_bytes());
  ASSERT_EQ(layout->caches().size(), 2u * c.num_layers);
  EXPECT_EQ(layout->caches()[1].data(), model->v_cache(0).data());
  std::vector<engine::RowCopy> copies;
  layout->AppendRecordCopies(5, engine::kPageOffGpu, 1000, copies);  // one group: upper unused
  ASSERT_EQ(copies.size(), 2u * c.num_layers);
  EXPECT_EQ(copies[3].tensor, 3);
  EXPECT_EQ(copies[3].row, 5);
  EXPECT_EQ(copies[3].host_offset, 1000 + 3 * layout->page_bytes());
}

TEST(HostPoolTest, ARecordIsFreedOnlyWhenItsLastCopyIsDone) {
  auto pool = HostPool::Create(*g_backend, 4 * 64 + 10, 64);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ(pool->num_records(), 4);
  std::vector<int32_t> records;
  ASSERT_TRUE(pool->Allocate(3, records));
  EXPECT_FALSE(pool->Allocate(2, records));  // takes none
  EXPECT_EQ(records.size(), 3u);
  const int32_t r = records[0];
  EXPECT_EQ(pool->state(r), HostPool::State::kInFlight);
  std::memset(pool->data(r), 0x5a, 64);
  pool->Seal(r);
  pool->Unref(r);  // the filling copy is done
  EXPECT_EQ(pool->state(r), HostPool::State::kResident);
  EXPECT_TRUE(pool->Verify(r).ok());
  pool->Ref(r);  // a copy reads it
  pool->Release(r);
  EXPECT_EQ(pool->num_free(), 1) << "released while a copy reads it: not free yet";
  pool->Unref(r);
  EXPECT_EQ(pool->num_free(), 2);
  EXPECT_EQ(pool->state(r), HostPool::State::kFree);
}

TEST(HostPoolTest, VerifyCatchesAFlippedByte) {
  auto pool = HostPool::Create(*g_backend, 128, 128);
  ASSERT_TRUE(pool.ok());
  std::vector<int32_t> records;
  ASSERT_TRUE(pool->Allocate(1, records));
  for (int i = 0; i < 128; ++i) pool->data(0)[i] = static_cast<uint8_t>(i);
  pool->Seal(0);
  pool->data(0)[77] ^= 0x10;
  const absl::Status s = pool->Verify(0);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_THAT(s.message(), ::testing::HasSubstr("CRC32C"));
}

// Four sequences of up to 280 tokens in a cache of 320: preemption is certain.
std::vector<engine::GenerationRequest> PressureRequests(int policy = 0) {
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(Request(i, 60 + 25 * i, 60, policy));
  return reqs;
}

Outputs Alone(engine::Model* model, const std::vector<engine::GenerationRequest>& reqs) {
  Outputs alone;
  for (const auto& r : reqs) {
    engine::Batcher b(model, nullptr);
    alone[r.id] = RunAll(b, {r})[r.id];
  }
  return alone;
}

TEST(SwapTest, PreemptedSequencesResumeFromTheHostTierWithTheirOutputsUnchanged) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok()) << manager.status();
  engine::Batcher batcher(model.get(), nullptr, {}, manager->get());
  const Outputs batched = RunAll(batcher, reqs);
  const KvBlockManager::Stats stats = (*manager)->stats();
  EXPECT_GT(batcher.num_preemptions(), 0);
  EXPECT_EQ(batcher.num_swapped_out(), batcher.num_preemptions()) << "every preemption swapped";
  EXPECT_EQ(stats.swap_ins, stats.swap_outs);
  EXPECT_GT(stats.bytes_from_host, 0);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE((*manager)->Idle());
}

TEST(SwapTest, AFullHostTierFallsBackToRecomputing) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto layout = KvLayout::Create(*model);
  ASSERT_TRUE(layout.ok());
  // Room for 3 pages: no sequence fits.
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = 3 * layout->record_bytes()});
  ASSERT_TRUE(manager.ok()) << manager.status();
  engine::Batcher batcher(model.get(), nullptr, {}, manager->get());
  const Outputs batched = RunAll(batcher, reqs);
  EXPECT_GT(batcher.num_preemptions(), 0);
  EXPECT_EQ(batcher.num_swapped_out(), 0);
  EXPECT_GT((*manager)->stats().swap_outs_refused, 0);
  // Recomputed KV comes from a prefill instead of decode steps, whose fp32
  // sums round differently: the tokens may drift from the unpreempted run
  // after a while (which swapping avoids), but every request completes.
  for (const auto& r : reqs) {
    ASSERT_EQ(batched.at(r.id).size(), 60u) << "request " << r.id;
    EXPECT_EQ(batched.at(r.id)[0], alone.at(r.id)[0]) << "request " << r.id;
  }
  EXPECT_TRUE((*manager)->Idle());
}

TEST(SwapTest, ACorruptHostCopyIsCaughtAndTheSequenceRecomputed) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok()) << manager.status();
  KvBlockManager& m = **manager;
  engine::Batcher batcher(model.get(), nullptr, {}, &m);
  int corrupted = 0;
  const Outputs batched = RunAll(batcher, reqs, [&](int) {
    if (corrupted > 0) return;
    for (uint64_t id = 0; id < 4; ++id) {
      const std::vector<int32_t> records = m.HostRecordsOf(static_cast<int64_t>(id));
      if (records.empty()) continue;
      // A flipped byte in the middle of the sequence's last record (after
      // its CRC was taken: Poll seals before the batcher resumes anyone).
      ASSERT_TRUE(m.Poll().ok());
      m.host_pool().data(records.back())[m.layout().page_bytes() + 3] ^= 0x40;
      ++corrupted;
      return;
    }
  });
  ASSERT_EQ(corrupted, 1);
  EXPECT_EQ(batcher.num_kv_lost(), 1);
  EXPECT_EQ(m.stats().host_records_lost, 1);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE(m.Idle());
}

TEST(SwapTest, ClusterKvSequencesResumeWithTheirClustersIntact) {
  // The KV policy keeps a swapped sequence's clusters: the resumed sequence
  // decodes exactly as if it had never left the GPU.
  engine::ModelOptions options = SmallCache(40);
  auto model = LoadGolden("llama_gqa", options);
  KvPolicyConfig c;
  c.type = "clusterkv";
  c.budget_tokens = 24;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.tokens_per_cluster = 8;
  c.full_layers = 0;
  auto runner = KvPolicyRunner::Create(model.get(), {c}, {.max_sparse_seqs = 4});
  ASSERT_TRUE(runner.ok()) << runner.status();
  ASSERT_TRUE(model->set_attention_planner(runner->get()).ok());
  const auto reqs = PressureRequests();
  // Without pressure: a cache that holds everything.
  auto roomy = LoadGolden("llama_gqa", SmallCache(200));
  auto roomy_runner = KvPolicyRunner::Create(roomy.get(), {c}, {.max_sparse_seqs = 4});
  ASSERT_TRUE(roomy_runner.ok());
  ASSERT_TRUE(roomy->set_attention_planner(roomy_runner->get()).ok());
  engine::Batcher unpressured(roomy.get(), nullptr);
  const Outputs expected = RunAll(unpressured, reqs);
  EXPECT_EQ(unpressured.num_preemptions(), 0);

  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok());
  engine::Batcher batcher(model.get(), nullptr, {}, manager->get());
  const Outputs batched = RunAll(batcher, reqs);
  EXPECT_GT(batcher.num_swapped_out(), 0);
  EXPECT_GT((*runner)->stats().sparse_queries, 0);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), expected.at(r.id)) << "request " << r.id;
  EXPECT_TRUE((*manager)->Idle());
  EXPECT_EQ((*runner)->num_free_slots(), 4);
}

TEST(SwapTest, NothingLeaksAfterCancellationsAndPreemptions) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok());
  KvBlockManager& m = *manager->get();
  engine::Batcher batcher(model.get(), nullptr, {}, &m);
  std::mt19937 rng(11);
  uint64_t next_id = 0;
  int cancelled_swapped = 0;
  for (int step = 0; step < 600; ++step) {
    if (step < 400 && rng() % 3 == 0) {
      ASSERT_TRUE(batcher.Add(Request(next_id++, 20 + rng() % 120, 10 + rng() % 80)).ok());
    }
    if (rng() % 7 == 0 && next_id > 0) batcher.Cancel(rng() % next_id);
    if (rng() % 3 == 0) {
      // A sequence paused in the host tier, its copy perhaps still running.
      for (uint64_t id = 0; id < next_id; ++id) {
        if (m.HostRecordsOf(static_cast<int64_t>(id)).empty()) continue;
        batcher.Cancel(id);
        ++cancelled_swapped;
        break;
      }
    }
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
  }
  while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
  EXPECT_GT(batcher.num_swapped_out(), 10);
  EXPECT_GT(cancelled_swapped, 0) << "some cancellations hit swapped sequences";
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_TRUE(m.Idle());
  const KvBlockManager::Stats s = m.stats();
  EXPECT_EQ(s.gpu_pages_used, 0);
  EXPECT_EQ(s.host_bytes_used, 0);
  EXPECT_EQ(s.copies_in_flight, 0);
}

// The block manager with a swap-in that fails once with a device error
// (the copy stream broke), to see what the batcher does with the sequence.
class FailingSwapIn final : public engine::KvMemory {
 public:
  explicit FailingSwapIn(KvBlockManager* m) : m_(m) {}
  int page_size() const override { return m_->page_size(); }
  int num_pages(engine::PageGroup g) const override { return m_->num_pages(g); }
  int num_free_pages(engine::PageGroup g) const override { return m_->num_free_pages(g); }
  bool AllocatePages(engine::PageGroup g, int count, std::vector<int32_t>& pages) override {
    return m_->AllocatePages(g, count, pages);
  }
  absl::Status FreePages(engine::PageGroup g, std::vector<int32_t>& pages) override {
    return m_->FreePages(g, pages);
  }
  absl::StatusOr<bool> SwapOut(int64_t id, engine::SequencePages& pages, int tokens) override {
    return m_->SwapOut(id, pages, tokens);
  }
  int SwapInPages(int64_t id, engine::PageGroup g) const override { return m_->SwapInPages(id, g); }
  absl::StatusOr<bool> SwapIn(int64_t id, engine::SequencePages& pages) override {
    if (failures_left_ > 0) {
      --failures_left_;
      return absl::InternalError("copy stream failed");
    }
    return m_->SwapIn(id, pages);
  }
  void DropSwapped(int64_t id) override { m_->DropSwapped(id); }
  absl::Status Poll() override { return m_->Poll(); }

 private:
  KvBlockManager* m_;
  int failures_left_ = 1;
};

TEST(SwapTest, AFailedSwapInLeavesTheHostCopyToBeDroppedByACancel) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 30});
  ASSERT_TRUE(manager.ok());
  FailingSwapIn memory(manager->get());
  engine::Batcher batcher(model.get(), nullptr, {}, &memory);
  for (const auto& r : PressureRequests()) ASSERT_TRUE(batcher.Add(r).ok());
  absl::Status failed;
  for (int step = 0; step < 2000 && batcher.HasWork() && failed.ok(); ++step) {
    failed = batcher.Step().status();
  }
  ASSERT_TRUE(absl::IsInternal(failed)) << failed;  // the engine fails the step's requests
  for (uint64_t id = 0; id < 4; ++id) batcher.Cancel(id);
  while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
  ASSERT_TRUE((*manager)->Poll().ok());
  EXPECT_TRUE((*manager)->Idle()) << "the swapped sequence's host records were dropped";
}

TEST(KvBlockManagerTest, AWorkloadAtItsHostLinePausesNoMoreWhateverTheOthersLeave) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  // 16 MiB of host tier; workload 0 may hold two records, workload 1 has no
  // host tier of its own, workload 2 no line.
  auto created = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 24});
  ASSERT_TRUE(created.ok());
  const int64_t record = (*created)->layout().record_bytes();
  auto manager = KvBlockManager::Create(
      model.get(), {.host_bytes = int64_t{1} << 24, .workload_host_bytes = {2 * record, 0, -1}});
  ASSERT_TRUE(manager.ok());
  KvBlockManager& m = **manager;
  auto paused = [&](int64_t id, int workload, int tokens) {
    engine::SequencePages pages;
    pages.workload = workload;
    EXPECT_TRUE(m.Grow(pages, tokens));
    absl::StatusOr<bool> out = m.SwapOut(id, pages, tokens);
    EXPECT_TRUE(out.ok()) << out.status();
    if (!pages.empty()) EXPECT_TRUE(m.Free(pages).ok());
    return out.value_or(false);
  };
  EXPECT_TRUE(paused(1, 0, 16));  // two records: at its line
  EXPECT_FALSE(paused(2, 0, 1));  // one more is refused
  EXPECT_FALSE(paused(3, 1, 1));  // no host tier of its own
  EXPECT_TRUE(paused(4, 2, 24));  // the rest is free for the others
  EXPECT_EQ(m.WorkloadHostBytes(0), 2 * record);
  EXPECT_DOUBLE_EQ(m.WorkloadHostShare(0), 1.0);
  // Host regions count against the same line.
  EXPECT_FALSE(m.AllocateHostRegion(1, 0).has_value());
  std::optional<KvBlockManager::HostRegion> region = m.AllocateHostRegion(record, 2);
  ASSERT_TRUE(region.has_value());
  EXPECT_EQ(m.WorkloadHostBytes(2), 4 * record);
  m.DropSwapped(1);
  std::optional<KvBlockManager::HostRegion> mine = m.AllocateHostRegion(record, 0);
  ASSERT_TRUE(mine.has_value()) << "room again once its paused sequence went";
  m.FreeHostRegion(*mine);
  m.FreeHostRegion(*region);
  m.DropSwapped(4);
  EXPECT_EQ(m.WorkloadHostBytes(0), 0);
  EXPECT_EQ(m.WorkloadHostBytes(2), 0);
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_TRUE(m.Idle());
}

TEST(KvBlockManagerTest, EachProfileWithAHostTierGetsItsLine) {
  KvProfile with_host;
  with_host.tiers.host_bytes = int64_t{64} << 20;
  with_host.tiers.prefix_bytes = int64_t{16} << 20;
  auto options = ManagerOptionsForProfiles({DefaultProfile(), with_host}, nullptr, "m/bf16");
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->host_bytes, int64_t{64} << 20);
  EXPECT_EQ(options->workload_host_bytes, (std::vector<int64_t>{-1, int64_t{48} << 20}));
}

TEST(KvBlockManagerTest, RefusesBadSwapRequests) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{1} << 24});
  ASSERT_TRUE(manager.ok());
  KvBlockManager& m = **manager;
  engine::SequencePages pages;
  ASSERT_TRUE(m.Grow(pages, 16));                                          // two pages of 8
  EXPECT_TRUE(absl::IsInvalidArgument(m.SwapOut(1, pages, 17).status()));  // 3 pages of tokens
  engine::SequencePages none;
  EXPECT_TRUE(absl::IsNotFound(m.SwapIn(9, none).status()));
  ASSERT_TRUE(m.SwapOut(1, pages, 16).value());
  EXPECT_TRUE(pages.empty());
  engine::SequencePages other;
  ASSERT_TRUE(m.Grow(other, 1));
  EXPECT_TRUE(absl::IsFailedPrecondition(m.SwapOut(1, other, 1).status()));  // already swapped
  EXPECT_TRUE(absl::IsInvalidArgument(m.SwapIn(1, other).status()));         // holds pages
  ASSERT_TRUE(m.Free(other).ok());
  ASSERT_TRUE(m.SwapIn(1, pages).value());
  EXPECT_EQ(pages.lower.size(), 2u);
  ASSERT_TRUE(m.Free(pages).ok());
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_TRUE(m.Idle());
  EXPECT_FALSE(KvBlockManager::Create(model.get(), {.host_bytes = -1}).ok());
}

// ---- The SSD tier below the host tier --------------------------------------

namespace fs = std::filesystem;

// A RocksDB store in a fresh directory, removed with the fixture.
class SsdSwapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("ssd_swap_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    auto store = SsdStore::Open({dir_.string(), "llama_gqa", int64_t{1} << 30});
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  // A host tier of `records` records over the SSD store; the oldest
  // swapped sequence goes down as soon as a quarter of them are used.
  std::unique_ptr<KvBlockManager> Manager(engine::Model* model, int records) {
    auto layout = KvLayout::Create(*model);
    EXPECT_TRUE(layout.ok());
    auto m = KvBlockManager::Create(model, {.host_bytes = records * layout->record_bytes(),
                                            .ssd = store_.get(),
                                            .ssd_high_water = 0.25});
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }
  // Runs every request to its end; steps that wait for the SSD yield.
  static Outputs Run(engine::Batcher& batcher, const std::vector<engine::GenerationRequest>& reqs,
                     const std::function<void()>& on_step = nullptr) {
    for (const auto& r : reqs) EXPECT_TRUE(batcher.Add(r).ok());
    Outputs out;
    for (int step = 0; batcher.HasWork() && step < 100000; ++step) {
      if (on_step) on_step();
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

  // Makes the SSD's first read hang until Release (a disk that stops
  // answering one request); the others go through.
  std::function<void()> HangFirstRead() {
    return [this] {
      std::unique_lock<std::mutex> lock(hang_mu_);
      if (reads_++ > 0) return;
      hang_cv_.wait(lock, [this] { return released_; });
    };
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(hang_mu_);
      released_ = true;
    }
    hang_cv_.notify_all();
  }
  int reads() {
    std::lock_guard<std::mutex> lock(hang_mu_);
    return reads_;
  }
  // Polls until no copy or SSD move is in flight.
  static void Settle(KvBlockManager& m) {
    for (int i = 0; i < 20000; ++i) {
      ASSERT_TRUE(m.Poll().ok());
      if (m.Idle()) return;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    FAIL() << "the block manager did not settle";
  }

  fs::path dir_;
  std::unique_ptr<SsdStore> store_;
  std::mutex hang_mu_;
  std::condition_variable hang_cv_;
  int reads_ = 0;
  bool released_ = false;
};

TEST_F(SsdSwapTest, PausedSequencesGoDownToTheSsdAndResumeWithTheirOutputsUnchanged) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto m = Manager(model.get(), 64);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  const Outputs batched = Run(batcher, reqs);
  const KvBlockManager::Stats s = m->stats();
  EXPECT_GT(batcher.num_swapped_out(), 0);
  EXPECT_GT(s.ssd_swap_outs, 0) << "the host tier filled past its high-water mark";
  EXPECT_EQ(s.ssd_swap_ins, s.ssd_swap_outs);
  EXPECT_GT(s.ssd_bytes_read, 0);
  EXPECT_EQ(s.ssd_sequences_lost, 0);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE(m->Idle());
  EXPECT_EQ(store_->stats().bytes_used, 0) << "every swapped sequence's keys are gone";
}

TEST_F(SsdSwapTest, AValueChangedOnTheSsdIsCaughtAndTheSequenceRecomputed) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto m = Manager(model.get(), 64);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  int changed = 0;
  const Outputs batched = Run(batcher, reqs, [&] {
    if (changed > 0) return;
    for (int64_t id = 0; id < 4; ++id) {
      const std::optional<uint64_t> swap = m->SsdSwapIdOf(id);
      if (!swap.has_value()) continue;
      // Other bytes of the same size under the same key: the store's own
      // check passes (it wrote them), the end-to-end CRC must not.
      const SsdKey key = RecordMover::Key(*swap, 0);
      absl::StatusOr<std::vector<uint8_t>> value = store_->Get(key);
      ASSERT_TRUE(value.ok()) << value.status();
      (*value)[5] ^= 0x20;
      ASSERT_TRUE(store_->Delete(key).ok());
      ASSERT_TRUE(store_->Put(key, *value).ok());
      ++changed;
      return;
    }
  });
  ASSERT_EQ(changed, 1);
  EXPECT_EQ(m->stats().ssd_sequences_lost, 1);
  EXPECT_EQ(batcher.num_kv_lost(), 1);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE(m->Idle());
  EXPECT_EQ(store_->stats().bytes_used, 0);
}

TEST_F(SsdSwapTest, ASequenceWhoseReadTheSsdDoesNotReturnIsRecomputedInTime) {
  // One read hangs: the sequence waiting for it is recomputed after the
  // read timeout, with its tokens unchanged, instead of waiting forever;
  // when the read returns at last, its records and keys go.
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  auto layout = KvLayout::Create(*model);
  ASSERT_TRUE(layout.ok());
  KvBlockManagerOptions options{
      .host_bytes = 64 * layout->record_bytes(), .ssd = store_.get(), .ssd_high_water = 0.25};
  options.ssd_read_timeout = std::chrono::milliseconds(200);
  options.ssd_before_read = HangFirstRead();
  auto m = KvBlockManager::Create(model.get(), options);
  ASSERT_TRUE(m.ok()) << m.status();
  engine::Batcher batcher(model.get(), nullptr, {}, m->get());
  const Outputs batched = Run(batcher, reqs);
  ASSERT_GE(reads(), 1) << "a sequence came up from the SSD";
  // At least the hung one (a slow machine may time out others too; each is
  // recomputed alike).
  EXPECT_GE((*m)->stats().ssd_reads_timed_out, 1);
  EXPECT_EQ(batcher.num_kv_lost(), (*m)->stats().ssd_reads_timed_out);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_FALSE((*m)->Idle()) << "the hung read still holds its records";
  Release();
  Settle(**m);
  EXPECT_EQ((*m)->stats().host_bytes_used, 0);
  EXPECT_EQ(store_->stats().bytes_used, 0);
}

TEST_F(SsdSwapTest, NothingLeaksAfterCancellationsWhileOnOrMovingToTheSsd) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  auto m = Manager(model.get(), 64);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  std::mt19937 rng(5);
  uint64_t next_id = 0;
  int cancelled_on_ssd = 0;
  for (int step = 0; step < 800; ++step) {
    if (step < 500 && rng() % 3 == 0) {
      ASSERT_TRUE(batcher.Add(Request(next_id++, 20 + rng() % 120, 10 + rng() % 80)).ok());
    }
    if (rng() % 9 == 0 && next_id > 0) batcher.Cancel(rng() % next_id);
    // Half the time, a sequence on the SSD or moving there or back (how
    // long each state lasts depends on the I/O threads' speed).
    if (rng() % 2 == 0) {
      for (uint64_t id = 0; id < next_id; ++id) {
        const auto seq = static_cast<int64_t>(id);
        if (!m->SsdSwapIdOf(seq).has_value() && !m->SwapMoving(seq)) continue;
        batcher.Cancel(id);
        ++cancelled_on_ssd;
        break;
      }
    }
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
  }
  for (int i = 0; batcher.HasWork() && i < 100000; ++i) {
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    if (events->empty()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  EXPECT_GT(m->stats().ssd_swap_outs, 3);
  EXPECT_GT(cancelled_on_ssd, 0) << "some cancellations hit sequences on the SSD";
  // Moves still running finish; then nothing is held anywhere.
  for (int i = 0; i < 1000 && !m->Idle(); ++i) {
    ASSERT_TRUE(m->Poll().ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(m->Idle());
  EXPECT_EQ(m->stats().host_bytes_used, 0);
  EXPECT_EQ(store_->stats().bytes_used, 0);
}

TEST_F(SsdSwapTest, AFullSsdLeavesSequencesInTheHostTier) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  const auto reqs = PressureRequests();
  const Outputs alone = Alone(model.get(), reqs);
  store_.reset();
  fs::remove_all(dir_);
  auto small = SsdStore::Open({dir_.string(), "llama_gqa", 1024});  // below one record
  ASSERT_TRUE(small.ok()) << small.status();
  store_ = std::move(*small);
  auto m = Manager(model.get(), 64);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  const Outputs batched = Run(batcher, reqs);
  EXPECT_GT(m->stats().ssd_swap_outs_refused, 0);
  EXPECT_EQ(m->stats().ssd_swap_outs, 0);
  for (const auto& r : reqs) EXPECT_EQ(batched.at(r.id), alone.at(r.id)) << "request " << r.id;
  EXPECT_TRUE(m->Idle());
  EXPECT_EQ(store_->stats().bytes_used, 0);
}

TEST_F(SsdSwapTest, RefusesAnSsdTierWithoutAHostTier) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  EXPECT_FALSE(KvBlockManager::Create(model.get(), {.ssd = store_.get()}).ok());
  EXPECT_FALSE(KvBlockManager::Create(model.get(),
                                      {.host_bytes = 1 << 20, .ssd = store_.get(), .io_threads = 0})
                   .ok());
}

// ---- Prefix reuse -----------------------------------------------------------

using testing_util::Concat;
using testing_util::Serve;
using testing_util::Served;

TEST(PrefixReuseTest, PromptsThatStartWithStoredKvLoadItAndKeepTheirTokens) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  auto created = KvBlockManager::Create(
      model.get(),
      {.host_bytes = int64_t{64} << 20, .prefix_bytes = int64_t{32} << 20, .prefix_space = "t"});
  ASSERT_TRUE(created.ok()) << created.status();
  KvBlockManager& m = **created;
  const int page = m.layout().page_size();
  engine::GenerationRequest doc = Request(1, 100, 20);
  // A request, a longer one on the same document, and the next turn of the
  // first (its prompt, its answer, a new question).
  engine::GenerationRequest same_doc = doc;
  same_doc.id = 2;
  same_doc.prompt = Concat(doc.prompt, Prompt(30, 99));
  auto computed = [&](const engine::GenerationRequest& r) {
    engine::Batcher plain(model.get(), nullptr);
    return Serve(plain, r).tokens;
  };
  engine::Batcher batcher(model.get(), nullptr, {}, &m);
  const Served first = Serve(batcher, doc);
  EXPECT_EQ(first.cached, 0);
  EXPECT_EQ(first.tokens, computed(doc));
  ASSERT_TRUE(m.Poll().ok());
  // 100 prompt + 19 generated tokens have KV: 14 whole pages stored.
  EXPECT_EQ(m.stats().prefix_pages_stored, (100 + 19) / page);
  const Served second = Serve(batcher, same_doc);
  EXPECT_EQ(second.cached, 100 / page * page) << "the document's whole pages";
  EXPECT_EQ(second.tokens, computed(same_doc));
  engine::GenerationRequest next_turn = doc;
  next_turn.id = 3;
  next_turn.prompt = Concat(Concat(doc.prompt, first.tokens), Prompt(9, 5));
  const Served third = Serve(batcher, next_turn);
  EXPECT_EQ(third.cached, (100 + 19) / page * page) << "the whole first turn";
  EXPECT_EQ(third.tokens, computed(next_turn));
  const KvBlockManager::Stats s = m.stats();
  EXPECT_EQ(s.prefix_hits, 2);
  EXPECT_EQ(s.prefix_tokens_loaded, second.cached + third.cached);
  EXPECT_GT(s.prefix_bytes_used, 0);
  // Each loaded record was vouched for by the device's row CRCs, none
  // checked again in host memory (the records lie back to back there).
  EXPECT_EQ(s.records_checked_in_host_memory, 0);
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_TRUE(m.Idle()) << "only stored prefixes are left";
  m.ClearPrefixes();
  EXPECT_EQ(m.stats().prefix_bytes_used, 0);
}

TEST(PrefixReuseTest, AStoreNamesThePagesItStoredByTheCrcsALaterLoadSees) {
  // What a KV policy keys what it computed on a prompt by
  // (AttentionPlanner::NoteStoredPrompt): each page's CRC as the store that
  // stored it sealed it, 0 for the pages it did not store, and the same
  // CRCs a request that loads those pages is told (LoadedPrefixCrcs).
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  auto created = KvBlockManager::Create(
      model.get(),
      {.host_bytes = int64_t{64} << 20, .prefix_bytes = int64_t{32} << 20, .prefix_space = "t"});
  ASSERT_TRUE(created.ok()) << created.status();
  KvBlockManager& m = **created;
  const int page = m.layout().page_size();
  EXPECT_EQ(m.LastPrefixStore(), 0u);
  engine::GenerationRequest doc = Request(1, 100, 20);
  engine::Batcher batcher(model.get(), nullptr, {}, &m);
  Serve(batcher, doc);
  // The batcher stored twice: the prompt once computed, then the pages
  // that what it generated completed, when it ended.
  const uint64_t at_end = m.LastPrefixStore();
  ASSERT_GE(at_end, 2u);
  const std::optional<std::vector<uint32_t>> prompt = m.PrefixStoreCrcs(at_end - 1);
  const std::optional<std::vector<uint32_t>> ended = m.PrefixStoreCrcs(at_end);
  ASSERT_TRUE(prompt.has_value() && ended.has_value()) << "sealed once their copies are done";
  ASSERT_EQ(prompt->size(), static_cast<size_t>(100 / page));
  ASSERT_EQ(ended->size(), static_cast<size_t>((100 + 19) / page));
  for (size_t p = 0; p < ended->size(); ++p) {
    if (p < prompt->size()) {
      EXPECT_NE((*prompt)[p], 0u) << p;
      EXPECT_EQ((*ended)[p], 0u) << p << ": stored by the prompt's store";
    } else {
      EXPECT_NE((*ended)[p], 0u) << p;
    }
  }
  engine::GenerationRequest same_doc = doc;
  same_doc.id = 2;
  same_doc.prompt = Concat(doc.prompt, Prompt(30, 99));
  EXPECT_EQ(Serve(batcher, same_doc).cached, 100 / page * page);
  // Its last LoadPrefix: the document's pages, then none (its own store).
  std::vector<uint32_t> stored = *prompt;
  EXPECT_EQ(m.LoadedPrefixCrcs(), stored);
  EXPECT_TRUE(m.PrefixStoreCrcs(at_end + 1000)->empty()) << "no such store";
  for (int i = 0; i < 70; ++i) {
    Serve(batcher, Request(10 + i, 9, 1));  // a page of its own to store
  }
  EXPECT_TRUE(m.PrefixStoreCrcs(at_end)->empty()) << "only the latest stores are remembered";
}

TEST(PrefixReuseTest, ACorruptStoredPageIsComputedInsteadAndTheBudgetHolds) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  auto layout = KvLayout::Create(*model);
  ASSERT_TRUE(layout.ok());
  // Room for 4 stored pages.
  auto created = KvBlockManager::Create(model.get(), {.host_bytes = int64_t{64} << 20,
                                                      .prefix_bytes = 4 * layout->record_bytes(),
                                                      .prefix_space = "t"});
  ASSERT_TRUE(created.ok()) << created.status();
  KvBlockManager& m = **created;
  engine::Batcher batcher(model.get(), nullptr, {}, &m);
  // Another document first: its 4 pages are stored, then evicted (least
  // recently used) for the next one's.
  Serve(batcher, Request(9, 40, 4));
  ASSERT_TRUE(m.Poll().ok());
  engine::GenerationRequest doc = Request(1, 100, 8);
  Serve(batcher, doc);
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_EQ(m.stats().prefix_bytes_used, 4 * layout->record_bytes()) << "the budget holds";
  EXPECT_EQ(m.stats().prefix_pages_evicted, 4);
  // Flip a byte in every stored record: the next load finds the first one
  // bad, drops it and computes the whole prompt.
  for (int32_t r = 0; r < m.host_pool().num_records(); ++r) {
    if (m.host_pool().state(r) == HostPool::State::kResident) m.host_pool().data(r)[7] ^= 0x01;
  }
  engine::GenerationRequest again = doc;
  again.id = 7;
  const Served served = Serve(batcher, again);
  engine::Batcher plain(model.get(), nullptr);
  EXPECT_EQ(served.cached, 0);
  EXPECT_EQ(served.tokens, Serve(plain, again).tokens);
  EXPECT_EQ(m.stats().prefix_records_lost, 1);
  EXPECT_EQ(m.stats().prefix_hits, 0);
}

TEST(PrefixReuseTest, RefusesAPrefixBudgetLargerThanTheHostTier) {
  auto model = LoadGolden("llama_gqa", SmallCache(40));
  EXPECT_FALSE(
      KvBlockManager::Create(model.get(), {.host_bytes = 1 << 20, .prefix_bytes = 2 << 20}).ok());
}

// ---- Prefixes on the SSD tier ---------------------------------------------

class SsdPrefixTest : public SsdSwapTest {
 protected:
  // A host tier of 64 MiB with `host_pages` pages for prefixes, over the
  // SSD store with `ssd_pages` prefix values.
  std::unique_ptr<KvBlockManager> PrefixManager(engine::Model* model, int host_pages, int ssd_pages,
                                                KvBlockManagerOptions::SsdAdmission admission) {
    auto layout = KvLayout::Create(*model);
    EXPECT_TRUE(layout.ok());
    const int64_t value = layout->record_bytes() + 28 + 4 * layout->page_size() + 4;
    auto m = KvBlockManager::Create(model, {.host_bytes = int64_t{64} << 20,
                                            .ssd = store_.get(),
                                            .prefix_bytes = host_pages * layout->record_bytes(),
                                            .prefix_space = "t",
                                            .ssd_prefix_bytes = ssd_pages * value,
                                            .ssd_admission = admission});
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }
  // Serves one request to its end; steps that wait for the SSD yield.
  static Served ServeWaiting(engine::Batcher& batcher, const engine::GenerationRequest& r) {
    EXPECT_TRUE(batcher.Add(r).ok());
    Served out;
    for (int step = 0; batcher.HasWork() && step < 100000; ++step) {
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      if (batcher.last_step_idle()) std::this_thread::sleep_for(std::chrono::microseconds(200));
      for (const auto& e : *events) {
        out.tokens.push_back(e.token_id);
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
        if (e.finish != engine::FinishReason::kNone) out.cached = e.cached_tokens;
      }
    }
    return out;
  }
  std::vector<int32_t> Computed(engine::Model* model, const engine::GenerationRequest& r) {
    engine::Batcher plain(model, nullptr);
    return Serve(plain, r).tokens;
  }
};

TEST_F(SsdPrefixTest, PrefixesWrittenThroughOutliveTheManagerAndTheStore) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  engine::GenerationRequest doc = Request(1, 100, 8);
  const int page = KvLayout::Create(*model)->page_size();
  const int stored = (100 + 7) / page;
  {
    auto m = PrefixManager(model.get(), 32, 32, KvBlockManagerOptions::SsdAdmission::kAlways);
    engine::Batcher batcher(model.get(), nullptr, {}, m.get());
    EXPECT_EQ(ServeWaiting(batcher, doc).tokens, Computed(model.get(), doc));
    Settle(*m);
    EXPECT_EQ(m->stats().ssd_prefix_pages_written, stored) << "written through";
    EXPECT_EQ(m->stats().ssd_prefix_pages, stored);
  }
  // A new worker: the store opened again, a new manager indexes the pages.
  store_.reset();
  auto reopened = SsdStore::Open({dir_.string(), "llama_gqa", int64_t{1} << 30});
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  store_ = std::move(*reopened);
  auto m = PrefixManager(model.get(), 32, 32, KvBlockManagerOptions::SsdAdmission::kAlways);
  EXPECT_EQ(m->stats().ssd_prefix_pages_indexed, stored);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  engine::GenerationRequest again = doc;
  again.id = 2;
  again.prompt = Concat(doc.prompt, Prompt(20, 7));
  const Served served = ServeWaiting(batcher, again);
  EXPECT_EQ(served.cached, 100 / page * page) << "the document's pages, from the SSD";
  EXPECT_EQ(served.tokens, Computed(model.get(), again));
  EXPECT_EQ(m->stats().ssd_prefix_pages_read, 100 / page);
  EXPECT_EQ(m->stats().ssd_prefix_hits, 1);
  Settle(*m);
}

TEST_F(SsdPrefixTest, ColdAdmissionWritesEvictedPagesAndTheBudgetsHold) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  const int page = KvLayout::Create(*model)->page_size();
  // Room for 4 pages in the host store and 5 on the SSD.
  auto m = PrefixManager(model.get(), 4, 5, KvBlockManagerOptions::SsdAdmission::kCold);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  engine::GenerationRequest doc = Request(1, 100, 4);
  ServeWaiting(batcher, doc);
  Settle(*m);
  EXPECT_EQ(m->stats().prefix_bytes_used, 4 * m->layout().record_bytes()) << "its first 4 pages";
  EXPECT_EQ(m->stats().ssd_prefix_pages_written, 0) << "cold: nothing evicted yet";
  // Another document evicts them from the host store: down they go.
  ServeWaiting(batcher, Request(2, 100, 4));
  Settle(*m);
  EXPECT_EQ(m->stats().ssd_prefix_pages_written, 4);
  // The first document again: its pages come up from the SSD (pushing the
  // second's down, as far as the SSD budget goes), and the tokens are the
  // same.
  engine::GenerationRequest again = doc;
  again.id = 3;
  const Served served = ServeWaiting(batcher, again);
  EXPECT_EQ(served.cached, 4 * page);
  EXPECT_EQ(served.tokens, Computed(model.get(), again));
  Settle(*m);
  EXPECT_EQ(m->stats().ssd_prefix_pages_read, 4);
  EXPECT_EQ(m->stats().ssd_prefix_pages, 5) << "the SSD budget holds";
  EXPECT_GT(m->stats().ssd_prefix_pages_refused, 0);
  EXPECT_EQ(store_->stats().bytes_used, m->stats().ssd_prefix_bytes_used);
  EXPECT_TRUE(m->Idle());
}

TEST_F(SsdPrefixTest, ACorruptPageOnTheSsdIsComputedInstead) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  const int page = KvLayout::Create(*model)->page_size();
  auto m = PrefixManager(model.get(), 32, 32, KvBlockManagerOptions::SsdAdmission::kAlways);
  engine::Batcher batcher(model.get(), nullptr, {}, m.get());
  engine::GenerationRequest doc = Request(1, 100, 4);
  ServeWaiting(batcher, doc);
  Settle(*m);
  m->ClearPrefixes();  // only the SSD copies are left
  // Other bytes under one page's key, framed by the store (its own check
  // passes): the header's CRC of the record must catch them.
  auto owners = store_->ListOwners(SsdKey::Owner::kPrefix);
  ASSERT_TRUE(owners.ok());
  ASSERT_EQ(owners->size(), static_cast<size_t>((100 + 3) / page));
  const SsdKey key{SsdKey::Owner::kPrefix, (*owners)[2].first, 0, 0, 0};
  absl::StatusOr<std::vector<uint8_t>> value = store_->Get(key);
  ASSERT_TRUE(value.ok());
  value->back() ^= 0x10;
  ASSERT_TRUE(store_->Delete(key).ok());
  ASSERT_TRUE(store_->Put(key, *value).ok());
  engine::GenerationRequest again = doc;
  again.id = 2;
  const Served served = ServeWaiting(batcher, again);
  EXPECT_EQ(served.tokens, Computed(model.get(), again));
  EXPECT_EQ(m->stats().ssd_prefix_pages_lost, 1);
  EXPECT_LT(served.cached, 100 / page * page) << "not every page came back";
  Settle(*m);
  // The corrupt page was deleted, then stored again from the computed KV.
  EXPECT_EQ(m->stats().ssd_prefix_pages, static_cast<int>(owners->size()));
  EXPECT_EQ(store_->stats().bytes_used, m->stats().ssd_prefix_bytes_used);
}

TEST_F(SsdPrefixTest, APrefixPageTheSsdDoesNotReturnIsComputedInTime) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  auto layout = KvLayout::Create(*model);
  ASSERT_TRUE(layout.ok());
  const int64_t value = layout->record_bytes() + 28 + 4 * layout->page_size() + 4;
  KvBlockManagerOptions options{.host_bytes = int64_t{64} << 20,
                                .ssd = store_.get(),
                                .prefix_bytes = 32 * layout->record_bytes(),
                                .prefix_space = "t",
                                .ssd_prefix_bytes = 32 * value,
                                .ssd_admission = KvBlockManagerOptions::SsdAdmission::kAlways};
  options.ssd_read_timeout = std::chrono::milliseconds(200);
  options.ssd_before_read = HangFirstRead();
  auto m = KvBlockManager::Create(model.get(), options);
  ASSERT_TRUE(m.ok()) << m.status();
  engine::Batcher batcher(model.get(), nullptr, {}, m->get());
  engine::GenerationRequest doc = Request(1, 100, 4);
  ServeWaiting(batcher, doc);
  Settle(**m);
  (*m)->ClearPrefixes();  // only the SSD copies are left
  engine::GenerationRequest again = doc;
  again.id = 2;
  const auto start = std::chrono::steady_clock::now();
  const Served served = ServeWaiting(batcher, again);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_EQ(served.tokens, Computed(model.get(), again));
  // The pages before the hung one (whichever I/O thread read first) load.
  EXPECT_LT(served.cached, 96) << "a page of the document never came up";
  EXPECT_GE((*m)->stats().ssd_reads_timed_out, 1);
  Release();
  Settle(**m);
  EXPECT_EQ(store_->stats().bytes_used, (*m)->stats().ssd_prefix_bytes_used);
}

TEST_F(SsdPrefixTest, AStartWithASmallerBudgetDeletesWhatIsOverIt) {
  auto model = LoadGolden("llama_gqa", SmallCache(60));
  {
    auto m = PrefixManager(model.get(), 32, 32, KvBlockManagerOptions::SsdAdmission::kAlways);
    engine::Batcher batcher(model.get(), nullptr, {}, m.get());
    ServeWaiting(batcher, Request(1, 100, 4));
    Settle(*m);
  }
  auto m = PrefixManager(model.get(), 32, 2, KvBlockManagerOptions::SsdAdmission::kAlways);
  EXPECT_EQ(m->stats().ssd_prefix_pages, 2);
  auto owners = store_->ListOwners(SsdKey::Owner::kPrefix);
  ASSERT_TRUE(owners.ok());
  EXPECT_EQ(owners->size(), 2u);
  EXPECT_FALSE(
      KvBlockManager::Create(
          model.get(), {.host_bytes = 1 << 20, .ssd = store_.get(), .ssd_prefix_bytes = 1 << 20})
          .ok())
      << "SSD prefixes without a host prefix store";
}

}  // namespace
}  // namespace strata::kvtier

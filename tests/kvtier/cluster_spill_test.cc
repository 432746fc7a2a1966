// Host-homed ClusterKV clusters sent below the host tier to the SSD
// (kvtier/cluster_spill.h): greedy tokens are those of clusters on the GPU
// or in host memory, a value that fails its check loses its sequence (it is
// recomputed, the tokens unchanged), a full SSD leaves the clusters in host
// memory, and nothing is left behind in any pool or in RocksDB.
#include "kvtier/cluster_spill.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
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
#include "gtest/gtest.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/ssd_store.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

namespace fs = std::filesystem;
using Admission = KvBlockManagerOptions::SsdAdmission;

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

std::vector<int32_t> Prompt(int len, uint32_t seed) {
  return testing_util::RandomPrompt(len, seed);
}

KvPolicyConfig ClusterKv() { return testing_util::SmallClusterKv(); }

struct Setup {
  bool tiered = true;                        // clusters homed in host memory
  Admission admission = Admission::kAlways;  // ... and sent to the SSD
  double high_water = 0.75;
  int64_t ssd_budget = int64_t{1} << 30;
  int num_pages = 160;
  int64_t ssd_line = -1;                          // the workload's own SSD line (-1: none)
  std::chrono::milliseconds spill_timeout{2000};  // KvTierOptions::spill_fetch_timeout
  std::function<void()> before_write = nullptr;   // ... ::spill_before_write
  bool read_ahead = true;                         // ... ::spill_read_ahead
  double prefetch_share = 0;                      // ... ::prefetch_share
};

// llama_gqa, a block manager with a 64 MiB host tier over a RocksDB store
// in a fresh directory, and a ClusterKv() runner whose host-homed clusters
// go down to it.
class SpillModel {
 public:
  explicit SpillModel(const Setup& setup) {
    dir_ = fs::path(::testing::TempDir()) /
           ("cluster_spill_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    auto store = SsdStore::Open({dir_.string(), "llama_gqa", setup.ssd_budget});
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    engine::ModelOptions options;
    options.max_seqs = 4;
    options.max_context = 320;
    options.max_batch_tokens = 96;
    options.page_size = 8;
    options.num_pages = setup.num_pages;
    auto l = engine::LoadModel({testing_util::FixturePath("models/llama_gqa"), ""}, g_backend.get(),
                               options);
    EXPECT_TRUE(l.ok()) << l.status();
    loaded_ = std::move(*l);
    auto m = KvBlockManager::Create(model(), {.host_bytes = int64_t{64} << 20,
                                              .ssd = store_.get(),
                                              .workload_ssd_bytes = {setup.ssd_line}});
    EXPECT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
    KvTierOptions tier;
    if (setup.tiered) tier.manager = manager_.get();
    tier.spill_admission = {setup.admission};
    tier.spill_high_water = setup.high_water;
    tier.spill_fetch_timeout = setup.spill_timeout;
    tier.spill_before_write = setup.before_write;
    tier.spill_read_ahead = setup.read_ahead;
    tier.prefetch_share = setup.prefetch_share;
    auto r = KvPolicyRunner::Create(model(), {ClusterKv()}, {.max_sparse_seqs = 4, .tier = tier});
    EXPECT_TRUE(r.ok()) << r.status();
    runner_ = std::move(*r);
    EXPECT_TRUE(model()->set_attention_planner(runner_.get()).ok());
  }
  ~SpillModel() {
    EXPECT_TRUE(model()->set_attention_planner(nullptr).ok());
    runner_.reset();
    manager_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }
  engine::Model* model() { return loaded_.model.get(); }
  KvBlockManager& manager() { return *manager_; }
  KvPolicyRunner& runner() { return *runner_; }
  SsdStore& store() { return *store_; }
  // Every page, host record and pool slot back, and nothing in RocksDB.
  ::testing::AssertionResult Idle() {
    if (!manager_->Poll().ok()) return ::testing::AssertionFailure() << "poll";
    if (!manager_->Idle()) {
      return ::testing::AssertionFailure()
             << manager_->stats().host_bytes_used << " host bytes, "
             << manager_->stats().gpu_pages_used << " pages still held";
    }
    if (runner_->num_free_slots() != 4) return ::testing::AssertionFailure() << "slots held";
    if (store_->stats().bytes_used != 0) {
      return ::testing::AssertionFailure() << store_->stats().bytes_used << " bytes on the SSD";
    }
    return ::testing::AssertionSuccess();
  }

 private:
  fs::path dir_;
  std::unique_ptr<SsdStore> store_;
  engine::LoadedModel loaded_;
  std::unique_ptr<KvBlockManager> manager_;
  std::unique_ptr<KvPolicyRunner> runner_;
};

struct Served {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  KvPolicyRunner::Stats stats;
  ClusterSpill::Stats spill;
  int64_t lost = 0;
  bool idle = false;
};

using Tokens = std::map<uint64_t, std::vector<int32_t>>;

// Three concurrent greedy requests; `before_step` runs before each step
// with the tokens so far.
Served Serve(const Setup& setup,
             const std::function<void(SpillModel&, const Tokens&)>& before_step = nullptr) {
  SpillModel m(setup);
  Served out;
  {
    engine::Batcher batcher(m.model(), nullptr, {}, &m.manager());
    const int lens[] = {150, 97, 180};
    for (int i = 0; i < 3; ++i) {
      engine::GenerationRequest r;
      r.id = i;
      r.prompt = Prompt(lens[i], 7 + i);
      r.max_tokens = 60;
      r.ignore_eos = true;
      EXPECT_TRUE(batcher.Add(r).ok());
    }
    while (batcher.HasWork()) {
      // The batches started after the last step are written before the
      // next (how far the writer gets in a step depends on the machine).
      auto settled = m.runner().SettleSpills(std::chrono::seconds(30));
      EXPECT_TRUE(settled.ok() && *settled) << settled.status();
      if (before_step) before_step(m, out.tokens);
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) {
        out.tokens[e.request_id].push_back(e.token_id);
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      }
    }
    out.lost = batcher.num_kv_lost();
  }
  out.stats = m.runner().stats();
  if (m.runner().spill() != nullptr) out.spill = m.runner().spill()->stats();
  out.idle = m.Idle();
  EXPECT_TRUE(out.idle) << m.Idle();
  return out;
}

TEST(ClusterSpillTest, ClustersOnTheSsdGiveTheTokensOfClustersOnTheGpuOrInHostMemory) {
  const Served gpu = Serve({.tiered = false});
  const Served host = Serve({.admission = Admission::kNever});
  const Served ssd = Serve({.admission = Admission::kAlways});
  EXPECT_EQ(host.stats.spills, 0);
  EXPECT_GT(host.stats.offloads, 0);
  EXPECT_GT(ssd.stats.spills, 0);
  EXPECT_GT(ssd.spill.clusters_written, 0);
  EXPECT_GT(ssd.spill.hard_misses, 0) << "some selected cluster came from the SSD";
  EXPECT_GT(ssd.spill.bytes_read, 0);
  EXPECT_EQ(ssd.spill.fetches_failed, 0);
  EXPECT_EQ(ssd.stats.recall_bad_pieces, 0);
  EXPECT_EQ(ssd.lost, 0);
  for (uint64_t id = 0; id < 3; ++id) {
    ASSERT_EQ(gpu.tokens.at(id).size(), 60u);
    EXPECT_EQ(host.tokens.at(id), gpu.tokens.at(id)) << "request " << id;
    EXPECT_EQ(ssd.tokens.at(id), gpu.tokens.at(id)) << "request " << id;
  }
}

// Each layer of a step that may fetch from the SSD guesses the next
// layer's selection and starts its reads: the steps' hard misses find some
// of them read, with the same tokens as without.
TEST(ClusterSpillTest, ReadsAheadServeHardMissesWithTheSameTokens) {
  const Served without = Serve({.admission = Admission::kAlways, .read_ahead = false});
  const Served with = Serve({.admission = Admission::kAlways, .read_ahead = true});
  EXPECT_EQ(without.spill.read_ahead_clusters, 0);
  EXPECT_GT(without.spill.hard_misses, 0);
  EXPECT_GT(with.spill.read_ahead_clusters, 0);
  EXPECT_GT(with.spill.read_ahead_used, 0) << "no hard miss found its cluster read ahead";
  EXPECT_LE(with.spill.read_ahead_used, with.spill.hard_misses);
  EXPECT_EQ(with.stats.read_ahead_used, with.spill.read_ahead_used);
  EXPECT_EQ(with.spill.fetches_failed, 0);
  EXPECT_EQ(with.stats.recall_bad_pieces, 0);
  EXPECT_EQ(with.lost, 0);
  // Beside a prefetch from host memory too (two recalls of the guess: the
  // read ahead, then the prefetch).
  const Served prefetching =
      Serve({.admission = Admission::kAlways, .read_ahead = true, .prefetch_share = 0.5});
  EXPECT_GT(prefetching.spill.read_ahead_used, 0);
  EXPECT_GT(prefetching.stats.prefetch_tokens, 0);
  EXPECT_EQ(prefetching.stats.recall_bad_pieces, 0);
  for (uint64_t id = 0; id < 3; ++id) {
    ASSERT_EQ(without.tokens.at(id).size(), 60u);
    EXPECT_EQ(with.tokens.at(id), without.tokens.at(id)) << "request " << id;
    EXPECT_EQ(prefetching.tokens.at(id), without.tokens.at(id)) << "request " << id;
  }
}

TEST(ClusterSpillTest, ColdAdmissionWaitsForTheHighWaterMark) {
  const Served below = Serve({.admission = Admission::kCold, .high_water = 1.0});
  EXPECT_EQ(below.stats.spills, 0) << "64 MiB of host memory never fills here";
  const Served above = Serve({.admission = Admission::kCold, .high_water = 0.0});
  EXPECT_GT(above.stats.spills, 0);
  EXPECT_GT(above.spill.hard_misses, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(above.tokens.at(id), below.tokens.at(id));
}

TEST(ClusterSpillTest, AValueThatFailsItsCheckLosesItsSequenceNotItsTokens) {
  const Served clean = Serve({.admission = Admission::kNever});
  bool corrupted = false;
  std::map<uint64_t, size_t> tokens_at_corruption;
  const Served s =
      Serve({.admission = Admission::kAlways}, [&](SpillModel& m, const Tokens& so_far) {
        if (corrupted || m.runner().stats().spills == 0) return;
        for (uint64_t id = 0; id < 3; ++id) {
          auto it = so_far.find(id);
          tokens_at_corruption[id] = it == so_far.end() ? 0 : it->second.size();
        }
        // Rewrite every stored cluster with one byte of its first piece's
        // payload flipped and a valid store CRC: only the piece's own CRC can
        // tell.
        auto owners = m.store().ListOwners(SsdKey::Owner::kSequence);
        ASSERT_TRUE(owners.ok()) << owners.status();
        for (const auto& [owner, bytes] : *owners) {
          for (uint16_t layer = 0; layer < 2; ++layer) {
            for (uint16_t head = 0; head < 4; ++head) {
              for (uint32_t block = 0; block < 64; ++block) {
                const SsdKey key{SsdKey::Owner::kSequence, owner, layer, head, block};
                auto value = m.store().Get(key);
                if (!value.ok()) continue;
                ASSERT_GT(value->size(), 80u);
                (*value)[70] ^= 0x10;
                ASSERT_TRUE(m.store().Delete(key).ok());
                ASSERT_TRUE(m.store().Put(key, *value).ok());
                corrupted = true;
              }
            }
          }
        }
      });
  ASSERT_TRUE(corrupted);
  EXPECT_GT(s.stats.recall_bad_pieces, 0) << "the piece's CRC caught it";
  EXPECT_GT(s.lost, 0);
  EXPECT_EQ(s.stats.lost_sequences, s.lost);
  // A recomputed ClusterKV sequence clusters its prompt and the tokens it
  // generated together, so its later tokens may differ from a run that
  // clustered them as they came; every request still completes, and up
  // to the corruption the tokens are the clean run's.
  for (uint64_t id = 0; id < 3; ++id) {
    ASSERT_EQ(s.tokens.at(id).size(), 60u) << "request " << id;
    const size_t before = tokens_at_corruption[id];
    EXPECT_TRUE(std::equal(s.tokens.at(id).begin(), s.tokens.at(id).begin() + before,
                           clean.tokens.at(id).begin()))
        << "request " << id;
  }
}

TEST(ClusterSpillTest, SequencesOnTheSsdThatRunAgainComeBackUpWithTheirTokens) {
  // Cold admission with the host tier past its mark (0): clusters go down
  // and steps fetch them (hard misses). Once the host tier has room (mark
  // 1), each sequence that runs is promoted: its clusters are read back
  // into host memory on the I/O threads, later steps recall them from
  // there without a hard miss, and the tokens are those of clusters that
  // never left host memory.
  const Served host = Serve({.admission = Admission::kNever});
  int steps = 0;
  int64_t misses_once_up = -1;
  const Served s =
      Serve({.admission = Admission::kCold, .high_water = 0.0}, [&](SpillModel& m, const Tokens&) {
        if (++steps == 25) m.runner().set_spill_high_water(1.0);
        const ClusterSpill::Stats spill = m.runner().spill()->stats();
        if (steps > 25 && misses_once_up < 0 && spill.sequences == 0) {
          misses_once_up = spill.hard_misses;
        }
      });
  EXPECT_GT(s.stats.spills, 0);
  EXPECT_GT(s.stats.promotions, 0);
  EXPECT_GT(s.stats.promoted_clusters, 0);
  EXPECT_GT(s.stats.promoted_bytes, 0);
  EXPECT_EQ(s.spill.clusters_promoted, s.stats.promoted_clusters);
  EXPECT_GT(s.spill.hard_misses, 0) << "before the mark moved";
  ASSERT_GE(misses_once_up, 0) << "every sequence came back up";
  EXPECT_EQ(s.spill.hard_misses, misses_once_up) << "no step fetched from the SSD after";
  EXPECT_EQ(s.stats.recall_bad_pieces, 0);
  EXPECT_EQ(s.lost, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(s.tokens.at(id), host.tokens.at(id));
}

TEST(ClusterSpillTest, AFullSsdLeavesTheClustersInHostMemory) {
  const Served host = Serve({.admission = Admission::kNever});
  const Served full = Serve({.admission = Admission::kAlways, .ssd_budget = 4096});
  EXPECT_EQ(full.stats.spills, 0);
  EXPECT_GT(full.spill.batches_refused, 0);
  EXPECT_EQ(full.spill.hard_misses, 0);
  EXPECT_EQ(full.lost, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(full.tokens.at(id), host.tokens.at(id));
}

TEST(ClusterSpillTest, AWorkloadAtItsSsdLineKeepsItsClustersInHostMemory) {
  const Served host = Serve({.admission = Admission::kNever});
  const Served lined = Serve({.admission = Admission::kAlways, .ssd_line = 4096});
  EXPECT_EQ(lined.stats.spills, 0);
  EXPECT_GT(lined.stats.spills_refused, 0);
  EXPECT_EQ(lined.spill.clusters_written, 0) << "nothing was written past the line";
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(lined.tokens.at(id), host.tokens.at(id));
}

// Requests arriving and cancelled at random steps (some while a batch is
// being written or read back) in a cache small enough to preempt;
// `each_step` runs before each step.
void ServeWithCancellations(SpillModel& m,
                            const std::function<void(int step, std::mt19937& rng)>& each_step) {
  engine::Batcher batcher(m.model(), nullptr, {}, &m.manager());
  std::mt19937 rng(33);
  uint64_t next_id = 0;
  for (int step = 0; step < 500; ++step) {
    if (step < 300 && rng() % 4 == 0) {
      engine::GenerationRequest r;
      r.id = next_id++;
      r.prompt = Prompt(60 + static_cast<int>(rng() % 140), static_cast<uint32_t>(r.id));
      r.max_tokens = 20 + static_cast<int>(rng() % 60);
      r.ignore_eos = true;
      ASSERT_TRUE(batcher.Add(r).ok());
    }
    if (rng() % 9 == 0 && next_id > 0) batcher.Cancel(rng() % next_id);
    if (each_step) each_step(step, rng);
    if (step % 3 == 0) {
      // Now and then the writes catch up (between, cancellations meet
      // batches being written).
      auto settled = m.runner().SettleSpills(std::chrono::seconds(30));
      ASSERT_TRUE(settled.ok() && *settled) << settled.status();
    }
    auto events = batcher.Step();
    ASSERT_TRUE(events.ok()) << events.status();
    for (const auto& e : *events) ASSERT_NE(e.finish, engine::FinishReason::kError) << e.error;
  }
  while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
  EXPECT_GT(batcher.num_preemptions(), 0);
}

TEST(ClusterSpillTest, NothingLeaksAfterCancellationsPreemptionsAndSpills) {
  // Clusters sent down as soon as they are offloaded: at the end every
  // page, host record, pool slot and SSD value is gone.
  SpillModel m({.admission = Admission::kAlways, .num_pages = 90});
  ServeWithCancellations(m, nullptr);
  EXPECT_GT(m.runner().stats().spills, 0);
  EXPECT_GT(m.runner().spill()->stats().hard_misses, 0);
  EXPECT_EQ(m.runner().stats().lost_sequences, 0);
  EXPECT_EQ(m.runner().spill()->stats().sequences, 0);
  EXPECT_EQ(m.manager().WorkloadSsdBytes(0), 0) << "every charge refunded";
  EXPECT_TRUE(m.Idle());
}

TEST(ClusterSpillTest, NothingLeaksWhenSequencesGoDownAndComeBackUpAmidCancellations) {
  // Cold admission with the host tier's mark moving between 0 (clusters go
  // down) and 1 (sequences that run come back up) every few steps, so that
  // cancellations and preemptions meet promotions being read.
  SpillModel m({.admission = Admission::kCold, .num_pages = 90});
  ServeWithCancellations(m, [&](int step, std::mt19937& rng) {
    if (step % 7 == 0) m.runner().set_spill_high_water(rng() % 2 == 0 ? 0.0 : 1.0);
  });
  EXPECT_GT(m.runner().stats().spills, 0);
  EXPECT_GT(m.runner().stats().promotions, 0);
  EXPECT_EQ(m.runner().stats().lost_sequences, 0);
  EXPECT_EQ(m.runner().spill()->stats().sequences, 0);
  EXPECT_EQ(m.manager().WorkloadSsdBytes(0), 0) << "every charge refunded";
  EXPECT_TRUE(m.Idle());
}

TEST(ClusterSpillTest, ASequenceEndingWhileTheSsdHoldsItsWriteDoesNotHoldTheEngineUp) {
  // The disk stops answering writes. A cancelled sequence whose clusters
  // are being written ends within the timeout; its host memory stays
  // until the write returns, and then everything is given back.
  std::mutex mu;
  std::condition_variable cv;
  bool stall = true, writing = false;
  SpillModel m({.admission = Admission::kAlways,
                .spill_timeout = std::chrono::milliseconds(100),
                .before_write = [&] {
                  std::unique_lock<std::mutex> lock(mu);
                  writing = true;
                  cv.notify_all();
                  cv.wait(lock, [&] { return !stall; });
                }});
  {
    engine::Batcher batcher(m.model(), nullptr, {}, &m.manager());
    engine::GenerationRequest r;
    r.id = 1;
    r.prompt = Prompt(150, 3);
    r.max_tokens = 40;
    r.ignore_eos = true;
    ASSERT_TRUE(batcher.Add(r).ok());
    for (int step = 0; step < 200; ++step) {
      ASSERT_TRUE(batcher.Step().ok());
      // Once a batch is queued, its write starts before the next step (on a
      // loaded machine the writer may otherwise start only after the
      // sequence ended, and then writes nothing).
      std::unique_lock<std::mutex> lock(mu);
      if (m.runner().spill()->stats().batches_in_flight > 0) {
        cv.wait_for(lock, std::chrono::seconds(5), [&] { return writing; });
      }
      if (writing) break;
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      ASSERT_TRUE(writing) << "a batch of the sequence's clusters is being written";
    }
    batcher.Cancel(1);
    const auto start = std::chrono::steady_clock::now();
    while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2))
        << "the release waited for the stalled write";
  }
  EXPECT_EQ(m.runner().spill()->stats().forget_timeouts, 1);
  EXPECT_FALSE(m.Idle()) << "the write still reads the sequence's host memory";
  {
    std::lock_guard<std::mutex> lock(mu);
    stall = false;
  }
  cv.notify_all();
  // The runner frees the memory when it polls the spill after the write.
  for (int i = 0; i < 5000 && !m.Idle(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ASSERT_TRUE(m.runner().SettleSpills(std::chrono::seconds(1)).ok());
  }
  EXPECT_TRUE(m.Idle());
}

// ---- ClusterSpill alone, over a host buffer of its own -------------------

class ClusterSpillUnitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("cluster_spill_unit_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    auto store = SsdStore::Open({dir_.string(), "m", int64_t{1} << 26});
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    host_.assign(1 << 20, 0);
    for (size_t i = 0; i < 4096; ++i) host_[i] = static_cast<uint8_t>(i * 7 + 1);
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  // One cluster (layer 1, head 0, block 3) of two pieces, at host bytes
  // [128, 128 + 640): pieces 5 and 6 at 128 and 448.
  ClusterSpill::Batch OneCluster(int64_t seq_id, int slot) {
    ClusterSpill::Batch batch;
    batch.seq_id = seq_id;
    batch.slot = slot;
    batch.clusters.push_back({1, 0, 3, 5, 128, 640, {0, 320}});
    return batch;
  }
  // Polls until a batch is reported.
  std::vector<ClusterSpill::Done> WaitDone(ClusterSpill& spill) {
    for (int i = 0; i < 10000; ++i) {
      std::vector<ClusterSpill::Done> done = spill.Poll();
      if (!done.empty()) return done;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return {};
  }
  fs::path dir_;
  std::unique_ptr<SsdStore> store_;
  std::vector<uint8_t> host_;
};

TEST_F(ClusterSpillUnitTest, FetchedPiecesAreTheBytesWrittenAndUnknownOnesFail) {
  ClusterSpill spill(store_.get(), {.host_data = host_.data(), .io_threads = 2});
  spill.SetStaging(int64_t{512} << 10, 4096);
  spill.Write(77, OneCluster(9, 2));
  const std::vector<ClusterSpill::Done> done = WaitDone(spill);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(done[0].status.ok()) << done[0].status;
  EXPECT_TRUE(spill.HasClusters(9));
  // The host copy may change now: what comes back is what was written.
  const std::vector<uint8_t> written(host_.begin() + 128, host_.begin() + 768);
  std::fill(host_.begin(), host_.begin() + 4096, 0);
  const std::vector<engine::PieceFetcher::Piece> pieces = {
      {2, 0, 6}, {2, 0, 5}, {3, 0, 5}, {2, 1, 5}, {2, 0, 7}};
  std::vector<int64_t> offsets(pieces.size());
  spill.Fetch(1, pieces, offsets);
  ASSERT_GE(offsets[0], int64_t{512} << 10);
  EXPECT_EQ(offsets[0] - offsets[1], 320) << "one read, the piece at its place in it";
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + offsets[1]));
  EXPECT_EQ(offsets[2], -1) << "another slot";
  EXPECT_EQ(offsets[3], -1) << "another head";
  EXPECT_EQ(offsets[4], -1) << "past the cluster's pieces";
  std::vector<int64_t> other_layer(1);
  spill.Fetch(0, std::span(pieces).first(1), other_layer);
  EXPECT_EQ(other_layer[0], -1);
  const ClusterSpill::Stats s = spill.stats();
  EXPECT_EQ(s.hard_misses, 1);
  EXPECT_EQ(s.bytes_read, 640);
  EXPECT_EQ(s.fetches_failed, 4);
  EXPECT_EQ(s.bytes_resident, 640);
  spill.Forget(9);
  EXPECT_EQ(store_->stats().bytes_used, 0);
  EXPECT_FALSE(spill.HasClusters(9));
}

TEST_F(ClusterSpillUnitTest, AStalledSsdFailsFetchesInTimeAndLateReadsLandNowhere) {
  // The disk stops answering: reads block until the test lets them go.
  std::mutex mu;
  std::condition_variable cv;
  bool blocked = false, release = false;
  int reads_started = 0;
  ClusterSpill::Options options{.host_data = host_.data(), .io_threads = 2};
  options.fetch_timeout = std::chrono::milliseconds(100);
  options.before_read = [&] {
    std::unique_lock<std::mutex> lock(mu);
    ++reads_started;
    cv.wait(lock, [&] { return !blocked || release; });
  };
  ClusterSpill spill(store_.get(), options);
  spill.SetStaging(int64_t{512} << 10, 4096);
  spill.Write(77, OneCluster(9, 2));
  ASSERT_EQ(WaitDone(spill).size(), 1u);
  const std::vector<uint8_t> written(host_.begin() + 128, host_.begin() + 768);
  const std::vector<engine::PieceFetcher::Piece> pieces = {{2, 0, 5}, {2, 0, 6}};
  std::vector<int64_t> offsets(2);
  {
    std::lock_guard<std::mutex> lock(mu);
    blocked = true;
  }
  // The staging area holds what a later step would read: a late read must
  // not overwrite it.
  std::fill(host_.begin() + (512 << 10), host_.begin() + (512 << 10) + 4096, 0xAB);
  auto start = std::chrono::steady_clock::now();
  spill.Fetch(1, pieces, offsets);
  auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(offsets, (std::vector<int64_t>{-1, -1}));
  EXPECT_GE(waited, std::chrono::milliseconds(100));
  EXPECT_LT(waited, std::chrono::seconds(2)) << "the step gave up at the timeout";
  ClusterSpill::Stats st = spill.stats();
  EXPECT_EQ(st.fetch_timeouts, 1);
  EXPECT_TRUE(st.stalled);
  // While the read is out, fetches fail at once, without queuing more.
  start = std::chrono::steady_clock::now();
  spill.Fetch(1, pieces, offsets);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(500));
  EXPECT_EQ(offsets, (std::vector<int64_t>{-1, -1}));
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(reads_started, 1);
    release = true;
  }
  cv.notify_all();
  for (int i = 0; i < 2000 && spill.stats().stalled; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_FALSE(spill.stats().stalled) << "the late read returned";
  EXPECT_TRUE(std::all_of(host_.begin() + (512 << 10), host_.begin() + (512 << 10) + 4096,
                          [](uint8_t b) { return b == 0xAB; }))
      << "the read the step gave up on wrote into the staging area";
  // The disk answers again: fetches work.
  spill.Fetch(1, pieces, offsets);
  ASSERT_GE(offsets[0], 0);
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + offsets[0]));
  st = spill.stats();
  EXPECT_EQ(st.fetches_failed, 4);
  EXPECT_EQ(st.bytes_read, 640);
  spill.Forget(9);
}

// A read ahead answers at once and reads each cluster once: the Fetch of
// its layer copies what was read, or waits for the read still running; a
// read ahead of another layer, or the sequence's end, drops it.
TEST_F(ClusterSpillUnitTest, AReadAheadIsReadOnceAndTakenByTheFetchOfItsLayerOnly) {
  std::mutex mu;
  std::condition_variable cv;
  bool hold = false;
  int reads = 0;
  ClusterSpill::Options options{.host_data = host_.data(), .io_threads = 2};
  options.before_read = [&] {
    std::unique_lock<std::mutex> lock(mu);
    ++reads;
    cv.notify_all();
    cv.wait(lock, [&] { return !hold; });
  };
  ClusterSpill spill(store_.get(), options);
  spill.SetStaging(int64_t{512} << 10, 4096);
  spill.Write(77, OneCluster(9, 2));
  ASSERT_EQ(WaitDone(spill).size(), 1u);
  const std::vector<uint8_t> written(host_.begin() + 128, host_.begin() + 768);
  std::fill(host_.begin(), host_.begin() + 4096, 0);
  const std::vector<engine::PieceFetcher::Piece> pieces = {{2, 0, 5}, {2, 0, 6}};
  auto reads_now = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return reads;
  };
  auto wait_reads = [&](int n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return reads >= n; });
  };
  auto read_ahead = [&](int layer) {
    std::vector<int64_t> answers(pieces.size(), 0);
    spill.read_ahead()->Fetch(layer, pieces, answers);
    return answers;
  };
  // 1. Read ahead and done: the fetch copies it and reads nothing more.
  EXPECT_EQ(read_ahead(1), (std::vector<int64_t>{-1, -1})) << "a read ahead never answers";
  for (int i = 0; i < 10000 && spill.stats().read_ahead_bytes < 640; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(spill.stats().read_ahead_bytes, 640);
  std::vector<int64_t> offsets(pieces.size());
  spill.Fetch(1, pieces, offsets);
  ASSERT_GE(offsets[0], int64_t{512} << 10);
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + offsets[0]));
  EXPECT_EQ(offsets[1] - offsets[0], 320);
  EXPECT_EQ(reads_now(), 1) << "read once";
  EXPECT_EQ(spill.stats().read_ahead_used, 1);
  EXPECT_EQ(spill.stats().hard_misses, 1);
  EXPECT_EQ(spill.stats().bytes_read, 640);

  // 2. Still being read when the fetch comes: the fetch waits for that read.
  std::fill(host_.begin() + (512 << 10), host_.begin() + (512 << 10) + 4096, 0);
  {
    std::lock_guard<std::mutex> lock(mu);
    hold = true;
  }
  read_ahead(1);
  ASSERT_TRUE(wait_reads(2));
  std::atomic<bool> fetched{false};
  std::thread step([&] {
    spill.Fetch(1, pieces, offsets);
    fetched = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(fetched) << "the fetch did not wait for the read ahead";
  {
    std::lock_guard<std::mutex> lock(mu);
    hold = false;
  }
  cv.notify_all();
  step.join();
  ASSERT_GE(offsets[0], 0);
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + offsets[0]));
  EXPECT_EQ(reads_now(), 2) << "the fetch read nothing itself";
  EXPECT_EQ(spill.stats().read_ahead_used, 2);

  // 3. A read ahead of another layer drops it: the fetch reads again.
  read_ahead(1);
  ASSERT_TRUE(wait_reads(3));
  read_ahead(0);  // nothing of layer 0 is stored
  spill.Fetch(1, pieces, offsets);
  ASSERT_GE(offsets[0], 0);
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + offsets[0]));
  EXPECT_EQ(reads_now(), 4);
  EXPECT_EQ(spill.stats().read_ahead_used, 2);
  EXPECT_EQ(spill.stats().read_ahead_clusters, 3);

  // 4. The sequence ends while its read ahead is held: Forget does not wait
  // for it (it holds none of the sequence's host memory), and nothing is
  // left once it returns.
  {
    std::lock_guard<std::mutex> lock(mu);
    hold = true;
  }
  read_ahead(1);
  ASSERT_TRUE(wait_reads(5));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(spill.Forget(9));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(500));
  EXPECT_EQ(store_->stats().bytes_used, 0);
  {
    std::lock_guard<std::mutex> lock(mu);
    hold = false;
  }
  cv.notify_all();
  spill.Fetch(1, pieces, offsets);
  EXPECT_EQ(offsets, (std::vector<int64_t>{-1, -1}));
  EXPECT_EQ(reads_now(), 5);
}

TEST_F(ClusterSpillUnitTest, ForgettingASequenceWhoseWriteTheSsdHoldsReturnsInTime) {
  // The disk stops answering a write: Forget gives up waiting after its
  // timeout, and the batch is reported, forgotten, once the write returns,
  // with nothing of the sequence left on the SSD.
  std::mutex mu;
  std::condition_variable cv;
  bool writing = false, release = false;
  ClusterSpill::Options options{.host_data = host_.data(), .io_threads = 1};
  options.forget_timeout = std::chrono::milliseconds(100);
  options.before_write = [&] {
    std::unique_lock<std::mutex> lock(mu);
    writing = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });
  };
  ClusterSpill spill(store_.get(), options);
  ClusterSpill::Batch batch = OneCluster(9, 2);
  batch.tag = 5;
  spill.Write(77, batch);
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return writing; });
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(spill.Forget(9)) << "the write is still out";
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1000));
  EXPECT_EQ(spill.stats().forget_timeouts, 1);
  EXPECT_TRUE(spill.Poll().empty()) << "nothing to free yet: the write reads the host memory";
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  const std::vector<ClusterSpill::Done> done = WaitDone(spill);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(done[0].forgotten);
  EXPECT_EQ(done[0].seq_id, 9);
  EXPECT_EQ(done[0].tag, 5u);
  EXPECT_EQ(store_->stats().bytes_used, 0) << "what the late write stored is deleted";
  const ClusterSpill::Stats st = spill.stats();
  EXPECT_EQ(st.sequences, 0);
  EXPECT_EQ(st.batches_in_flight, 0);
  EXPECT_TRUE(spill.Forget(9)) << "already gone";
}

TEST_F(ClusterSpillUnitTest, APromotedClusterIsTheBytesWrittenAndLeavesTheSsdWhenAppliedOnly) {
  ClusterSpill spill(store_.get(), {.host_data = host_.data(), .io_threads = 2});
  spill.SetStaging(int64_t{512} << 10, 4096);
  spill.Write(77, OneCluster(9, 2));
  ASSERT_EQ(WaitDone(spill).size(), 1u);
  const std::vector<uint8_t> written(host_.begin() + 128, host_.begin() + 768);
  const int64_t unit = engine::kKvHostUnit;
  EXPECT_EQ(spill.PromotionBytes(9), (640 + unit - 1) / unit * unit);
  EXPECT_EQ(spill.PromotionBytes(10), 0) << "no such sequence";
  const int64_t to = int64_t{256} << 10;
  spill.Promote(9, to, 4);
  std::vector<ClusterSpill::Promotion> done;
  for (int i = 0; i < 10000 && done.empty(); ++i) {
    done = spill.PollPromotions();
    if (done.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].seq_id, 9);
  EXPECT_EQ(done[0].tag, 4u);
  ASSERT_EQ(done[0].clusters.size(), 1u);
  const ClusterSpill::PromotedCluster& c = done[0].clusters[0];
  EXPECT_EQ(c.layer, 1);
  EXPECT_EQ(c.head, 0);
  EXPECT_EQ(c.block, 3u);
  EXPECT_EQ(c.first_piece, 5);
  EXPECT_EQ(c.host_offset, to);
  EXPECT_EQ(c.bytes, 640);
  EXPECT_EQ(c.piece_offsets, (std::vector<int64_t>{0, 320}));
  EXPECT_TRUE(std::equal(written.begin(), written.end(), host_.begin() + to));
  // Until the caller's tables point at the copy, a step still fetches it
  // from the SSD.
  EXPECT_TRUE(spill.HasClusters(9));
  std::vector<int64_t> offsets(1);
  const std::vector<engine::PieceFetcher::Piece> piece = {{2, 0, 5}};
  spill.Fetch(1, piece, offsets);
  EXPECT_GE(offsets[0], 0);
  spill.Promoted(9, done[0].clusters);
  EXPECT_FALSE(spill.HasClusters(9));
  EXPECT_EQ(store_->stats().bytes_used, 0) << "its value is deleted";
  spill.Fetch(1, piece, offsets);
  EXPECT_EQ(offsets[0], -1) << "no longer on the SSD";
  const ClusterSpill::Stats st = spill.stats();
  EXPECT_EQ(st.promotions, 1);
  EXPECT_EQ(st.clusters_promoted, 1);
  EXPECT_EQ(st.bytes_promoted, 640);
  EXPECT_EQ(st.bytes_resident, 0);
  EXPECT_EQ(st.sequences, 0);
  EXPECT_TRUE(spill.Forget(9));
}

TEST_F(ClusterSpillUnitTest, ForgettingASequenceWhosePromotionTheSsdHoldsReturnsInTime) {
  // The disk stops answering a promotion's read: Forget gives up waiting
  // after its timeout (the read writes host memory the caller must keep),
  // and the sequence is reported forgotten once the read returns, with
  // nothing of it left on the SSD and no promotion reported.
  std::mutex mu;
  std::condition_variable cv;
  bool hold = false, reading = false, release = false;
  ClusterSpill::Options options{.host_data = host_.data(), .io_threads = 1};
  options.forget_timeout = std::chrono::milliseconds(100);
  options.before_read = [&] {
    std::unique_lock<std::mutex> lock(mu);
    if (!hold) return;
    reading = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });
  };
  ClusterSpill spill(store_.get(), options);
  spill.Write(77, OneCluster(9, 2));
  ASSERT_EQ(WaitDone(spill).size(), 1u);
  {
    std::lock_guard<std::mutex> lock(mu);
    hold = true;
  }
  spill.Promote(9, int64_t{256} << 10, 4);
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return reading; });
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(spill.Forget(9)) << "the read is still out";
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1000));
  EXPECT_EQ(spill.stats().forget_timeouts, 1);
  EXPECT_TRUE(spill.Poll().empty()) << "nothing to free yet: the read writes the host memory";
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  const std::vector<ClusterSpill::Done> done = WaitDone(spill);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(done[0].forgotten);
  EXPECT_EQ(done[0].seq_id, 9);
  EXPECT_TRUE(spill.PollPromotions().empty());
  EXPECT_EQ(store_->stats().bytes_used, 0);
  EXPECT_EQ(spill.stats().sequences, 0);
  EXPECT_TRUE(spill.Forget(9)) << "already gone";
}

TEST_F(ClusterSpillUnitTest, AClusterThatDoesNotFitTheStagingAreaFailsAlone) {
  ClusterSpill spill(store_.get(), {.host_data = host_.data(), .io_threads = 2});
  spill.SetStaging(int64_t{512} << 10, 700);  // one 640-byte cluster, not two
  ClusterSpill::Batch batch = OneCluster(9, 2);
  batch.clusters.push_back({1, 0, 4, 7, 1024, 640, {0, 320}});
  spill.Write(77, batch);
  ASSERT_EQ(WaitDone(spill).size(), 1u);
  const std::vector<engine::PieceFetcher::Piece> pieces = {{2, 0, 5}, {2, 0, 7}};
  std::vector<int64_t> offsets(2);
  spill.Fetch(1, pieces, offsets);
  EXPECT_GE(offsets[0], 0);
  EXPECT_EQ(offsets[1], -1);
  spill.SetStaging(0, 0);  // none: every fetch fails
  spill.Fetch(1, pieces, offsets);
  EXPECT_EQ(offsets[0], -1);
}

TEST_F(ClusterSpillUnitTest, ABatchPastTheBudgetIsRefusedAndLeavesNothing) {
  auto small = SsdStore::Open({(dir_ / "small").string(), "m", 1000});
  ASSERT_TRUE(small.ok()) << small.status();
  ClusterSpill spill(small->get(), {.host_data = host_.data(), .io_threads = 2});
  ClusterSpill::Batch batch = OneCluster(9, 2);
  batch.clusters.push_back({1, 0, 4, 7, 1024, 640, {0, 320}});  // 1280 bytes in all
  spill.Write(77, batch);
  const std::vector<ClusterSpill::Done> done = WaitDone(spill);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(absl::IsResourceExhausted(done[0].status)) << done[0].status;
  EXPECT_FALSE(spill.HasClusters(9));
  EXPECT_EQ((*small)->stats().bytes_used, 0) << "the value that fit was deleted again";
  EXPECT_EQ(spill.stats().batches_refused, 1);
}

// A sequence that finds no pages for its ring keeps its clusters in the
// paged cache, even in a pool slot whose tables a tiered sequence left
// behind, and while another sequence's ring makes the step recall: its
// tokens are those of a run without host-homed clusters.
TEST(SlotReuseTest, ARingRefusedInASlotATieredSequenceUsedKeepsItsTokens) {
  auto request = [](uint64_t id, int len) {
    engine::GenerationRequest r;
    r.id = id;
    r.prompt = Prompt(len, 40 + static_cast<uint32_t>(id));
    r.max_tokens = 40;
    r.ignore_eos = true;
    return r;
  };
  // Request 1 (150 tokens) alone until it decodes, then request 2 (60).
  // `hold` pages are taken while request 1 starts decoding.
  auto serve = [&](SpillModel& m, int hold) {
    std::map<uint64_t, std::vector<int32_t>> tokens;
    engine::Batcher batcher(m.model(), nullptr, {}, &m.manager());
    std::vector<int32_t> held;
    if (hold > 0) EXPECT_TRUE(m.manager().AllocatePages(engine::PageGroup::kLower, hold, held));
    EXPECT_TRUE(batcher.Add(request(1, 150)).ok());
    while (batcher.HasWork()) {
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) {
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
        tokens[e.request_id].push_back(e.token_id);
      }
      if (tokens[1].size() == 2) {
        if (!held.empty()) EXPECT_TRUE(m.manager().FreePages(engine::PageGroup::kLower, held).ok());
        EXPECT_TRUE(batcher.Add(request(2, 60)).ok());
      }
    }
    return tokens;
  };
  std::map<uint64_t, std::vector<int32_t>> want;
  {
    SpillModel plain({.tiered = false});
    want = serve(plain, 0);
  }
  SpillModel m({.admission = Admission::kNever});
  {
    engine::Batcher batcher(m.model(), nullptr, {}, &m.manager());
    ASSERT_TRUE(batcher.Add(request(0, 180)).ok());  // fills slot 0's tables
    while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
  }
  ASSERT_GT(m.runner().stats().offloads, 0);
  // Request 1 decodes in slot 0 again. 150 tokens take 19 pages of 8: with
  // 24 left it finds 5 free at its first decode step, and a ring takes 6.
  const auto got = serve(m, 160 - 24);
  EXPECT_EQ(m.runner().stats().ring_refused, 1);
  EXPECT_EQ(m.runner().stats().tiered_sequences, 2) << "requests 0 and 2";
  EXPECT_GT(m.runner().stats().recall_tokens, 0);
  for (uint64_t id : {1, 2}) {
    ASSERT_EQ(got.at(id).size(), 40u);
    EXPECT_EQ(got.at(id), want.at(id)) << "request " << id;
  }
}

}  // namespace
}  // namespace strata::kvtier

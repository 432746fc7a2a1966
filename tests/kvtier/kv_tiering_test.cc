// ClusterKV clusters homed in the host tier: encoded there when they are
// formed, recalled into a GPU ring by the decode steps that select them.
// With the raw codec the tokens are those of clusters kept in the paged
// cache; pieces below host memory come up through the ring's fetcher; a
// corrupt host block is caught and its sequence recomputed; and every ring
// page and host region is returned.
#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/kv_codec.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

using engine::DType;
using engine::Tensor;

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

// ---- The backend operators ------------------------------------------------------

struct OpFixture {
  static constexpr int kPages = 24, kPageSize = 4, kHkv = 2, kD = 16;
  Tensor k, v, table, extents;
  engine::TierTables tables;
  engine::TierRing ring;
  std::vector<float> k_orig, v_orig;
  std::vector<int32_t> ext;  // [Hkv, blocks, 2]
  int blocks = 0;

  // One sequence of 64 tokens in pages 0..15; blocks cover [4, 60) per head
  // in clusters of the given sizes; the ring is pages 16..23 (32 slots).
  explicit OpFixture(const std::vector<int>& sizes) {
    engine::Backend& b = *g_backend;
    k = b.Allocate(DType::kF32, {kPages, kPageSize, kHkv, kD}).value();
    v = b.Allocate(DType::kF32, {kPages, kPageSize, kHkv, kD}).value();
    EXPECT_TRUE(b.FillRandom(k, 1, 1.0f).ok());
    EXPECT_TRUE(b.FillRandom(v, 2, 1.0f).ok());
    k_orig.assign(k.data_as<float>(), k.data_as<float>() + k.numel());
    v_orig.assign(v.data_as<float>(), v.data_as<float>() + v.numel());
    table = b.Allocate(DType::kI32, {16}).value();
    for (int p = 0; p < 16; ++p) table.data_as<int32_t>()[p] = 15 - p;  // scrambled pages
    blocks = static_cast<int>(sizes.size());
    const int max_blocks = 16;
    extents = b.Allocate(DType::kI32, {1, kHkv, max_blocks, 2}).value();
    ext.assign(kHkv * max_blocks * 2, 0);
    for (int h = 0; h < kHkv; ++h) {
      int first = 4;
      for (int j = 0; j < blocks; ++j) {
        ext[(h * max_blocks + j) * 2] = first;
        ext[(h * max_blocks + j) * 2 + 1] = sizes[j];
        first += sizes[j];
      }
    }
    std::copy(ext.begin(), ext.end(), extents.data_as<int32_t>());
    auto i32 = [&](std::vector<int64_t> shape, int value) {
      Tensor t = b.Allocate(DType::kI32, std::move(shape)).value();
      EXPECT_TRUE(b.Fill(t, static_cast<float>(value)).ok());
      return t;
    };
    tables = {i32({1, kHkv, max_blocks}, -1), i32({1, kHkv, 64}, 0),         i32({1, kHkv}, 0),
              i32({1, kHkv, max_blocks}, 0),  i32({1, kHkv, max_blocks}, 0), i32({1, kHkv}, 0)};
    ring.ring_rows = 32;
    ring.ring_pages = i32({1, 8}, 0);
    for (int p = 0; p < 8; ++p) ring.ring_pages.data_as<int32_t>()[p] = 16 + p;
    ring.status = i32({1}, 0);
    ring.stats = i32({engine::kKvTierStats}, 0);
    ring.host = b.AllocateHost(1 << 20).value();
  }

  int64_t SlotOf(int index) const {
    return int64_t{table.data_as<int32_t>()[index / kPageSize]} * kPageSize + index % kPageSize;
  }
  engine::TierTables Slot0() {
    return {tables.piece_base.Row(0), tables.piece_host.Row(0), tables.piece_count.Row(0),
            tables.res_start.Row(0),  tables.res_count.Row(0),  tables.ring_head.Row(0)};
  }
  absl::Status Offload(engine::KvCodecKind codec, int stride = 1) {
    engine::SequenceRange range{table, kPageSize, 4, 56};
    const int64_t units = engine::KvPieceUnitsBound(codec, kD, DType::kF32, 56, blocks);
    engine::TierTables t = Slot0();
    return g_backend->OffloadBlocks(k, v, range, extents.Row(0), 0, blocks, stride, codec,
                                    ring.host, 0, units, t);
  }
  // A plan of one decode entry selecting `order`'s blocks up to `budget`.
  engine::SparsePlan Plan(const std::vector<int>& order, int budget) {
    engine::Backend& b = *g_backend;
    engine::SparsePlan plan;
    plan.num_entries = 1;
    plan.max_blocks = 16;
    plan.max_keys = 80;
    plan.host_entries = {0, 0, 0, blocks, budget, 4, 60, 64};
    plan.entries = b.Allocate(DType::kI32, {1, engine::kSparsePlanFields}).value();
    std::copy(plan.host_entries.begin(), plan.host_entries.end(), plan.entries.data_as<int32_t>());
    plan.key_index = b.Allocate(DType::kI32, {1, kHkv, 80}).value();
    plan.key_count = b.Allocate(DType::kI32, {1, kHkv}).value();
    for (int h = 0; h < kHkv; ++h) {
      int32_t* keys = plan.key_index.data_as<int32_t>() + h * 80;
      int n = 0;
      for (int t = 0; t < 4; ++t) keys[n++] = t;
      int left = budget;
      for (int j : order) {
        const int take = std::min(left, ext[(h * 16 + j) * 2 + 1]);
        for (int t = 0; t < take; ++t) keys[n++] = ext[(h * 16 + j) * 2] + t;
        left -= take;
        if (left == 0) break;
      }
      for (int t = 60; t < 64; ++t) keys[n++] = t;
      plan.key_count.data_as<int32_t>()[h] = n;
    }
    return plan;
  }
  absl::Status Recall(engine::SparsePlan& plan) {
    engine::AttentionBatch batch;
    return g_backend->RecallBlocks(k, v, batch, plan, extents, tables, ring);
  }
  // Every selected key reads the original K and V of its logical index.
  void ExpectKeysRead(const engine::SparsePlan& plan, const engine::SparsePlan& logical) {
    for (int h = 0; h < kHkv; ++h) {
      const int n = plan.key_count.data_as<int32_t>()[h];
      for (int j = 0; j < n; ++j) {
        const int32_t got = plan.key_index.data_as<int32_t>()[h * 80 + j];
        const int32_t want = logical.key_index.data_as<int32_t>()[h * 80 + j];
        const int64_t slot = got <= -2 ? -2 - got : SlotOf(got);
        for (int x = 0; x < kD; ++x) {
          const int64_t at = (slot * kHkv + h) * kD + x;
          const int64_t orig = (SlotOf(want) * kHkv + h) * kD + x;
          ASSERT_EQ(k.data_as<float>()[at], k_orig[orig]) << "head " << h << " key " << j;
          ASSERT_EQ(v.data_as<float>()[at], v_orig[orig]) << "head " << h << " key " << j;
        }
      }
    }
  }
  int32_t Stat(engine::KvTierStat s) const { return ring.stats.data_as<int32_t>()[s]; }
  // Poisons the clustered tokens' paged rows: only the ring may be read.
  void PoisonClusteredRows() {
    for (int i = 4; i < 60; ++i) {
      for (int h = 0; h < kHkv; ++h) {
        for (int x = 0; x < kD; ++x) {
          k.data_as<float>()[(SlotOf(i) * kHkv + h) * kD + x] = NAN;
          v.data_as<float>()[(SlotOf(i) * kHkv + h) * kD + x] = NAN;
        }
      }
    }
  }
};

TEST(TierOpsTest, RecalledBlocksAreReadFromTheRingAndStayThereWhileSelected) {
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kBf16).ok());
  EXPECT_EQ(f.tables.piece_count.data_as<int32_t>()[0], 6);  // one piece per block of <= 64
  f.PoisonClusteredRows();
  engine::SparsePlan plan = f.Plan({2, 0, 5}, 12);  // 12 tokens of block 2 (truncated)
  const engine::SparsePlan logical = f.Plan({2, 0, 5}, 12);
  ASSERT_TRUE(f.Recall(plan).ok());
  EXPECT_EQ(f.ring.status.data_as<int32_t>()[0], 0);
  f.ExpectKeysRead(plan, logical);
  EXPECT_EQ(f.Stat(engine::kStatRecalledTokens), 2 * 12);
  // The same selection again: all hits, nothing read from the host.
  engine::SparsePlan again = f.Plan({2, 0, 5}, 12);
  ASSERT_TRUE(f.Recall(again).ok());
  f.ExpectKeysRead(again, logical);
  EXPECT_EQ(f.Stat(engine::kStatHitTokens), 2 * 12);
  EXPECT_EQ(f.Stat(engine::kStatRecalledTokens), 2 * 12);
}

TEST(TierOpsTest, EverySelectionReadsTheRightRowsAsTheRingTurnsOver) {
  // Random selections over many steps: misses, hits and refreshes all
  // happen, and every step's keys read the original rows (the raw codec:
  // the others are checked against their error bounds in the codec tests).
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kBf16).ok());
  f.PoisonClusteredRows();
  std::mt19937 rng(5);
  for (int step = 0; step < 200; ++step) {
    std::vector<int> order = {0, 1, 2, 3, 4, 5};
    std::shuffle(order.begin(), order.end(), rng);
    const int budget = 1 + static_cast<int>(rng() % 16);  // ring 32 >= 2 x budget
    engine::SparsePlan plan = f.Plan(order, budget);
    const engine::SparsePlan logical = f.Plan(order, budget);
    ASSERT_TRUE(f.Recall(plan).ok());
    ASSERT_EQ(f.ring.status.data_as<int32_t>()[0], 0) << "step " << step;
    f.ExpectKeysRead(plan, logical);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_GT(f.Stat(engine::kStatHitTokens), 0);
  EXPECT_GT(f.Stat(engine::kStatRefreshedTokens), 0);
  EXPECT_GT(f.Stat(engine::kStatRecalledTokens), 0);
}

TEST(TierOpsTest, HalfTheBlocksOffloadedTheRestReadFromThePagedCache) {
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kBf16, /*stride=*/2).ok());
  const int32_t* base = f.tables.piece_base.data_as<int32_t>();
  EXPECT_GE(base[0], 0);
  EXPECT_EQ(base[1], -1);
  EXPECT_GE(base[2], 0);
  engine::SparsePlan plan = f.Plan({1, 2, 3}, 16);
  const engine::SparsePlan logical = f.Plan({1, 2, 3}, 16);
  ASSERT_TRUE(f.Recall(plan).ok());
  f.ExpectKeysRead(plan, logical);
  // Block 1 (paged) keeps its logical index; block 2 (host) reads the ring.
  EXPECT_EQ(plan.key_index.data_as<int32_t>()[4], logical.key_index.data_as<int32_t>()[4]);
  EXPECT_LE(plan.key_index.data_as<int32_t>()[5], -2);
}

TEST(TierOpsTest, ACorruptPieceIsReportedAndNotUsed) {
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kInt8).ok());
  // A flipped byte in the first piece of head 0 (block 0).
  const int32_t unit = f.tables.piece_host.data_as<int32_t>()[0];
  f.ring.host.data()[unit * engine::kKvHostUnit + 40] ^= 0x01;
  engine::SparsePlan plan = f.Plan({0, 2}, 12);
  ASSERT_TRUE(f.Recall(plan).ok());
  EXPECT_EQ(f.ring.status.data_as<int32_t>()[0], engine::kRecallBadBlock);
  EXPECT_EQ(f.Stat(engine::kStatBadPieces), 1);
}

// The tier below host memory, for tests: keeps the encoded blocks of the
// pieces moved below host memory, and on each Fetch copies those asked for
// into a staging area of the host buffer (8 bytes past 64-byte boundaries),
// wiping the previous call's first.
class StagingFetcher : public engine::PieceFetcher {
 public:
  using Key = std::tuple<int32_t, int32_t, int32_t>;  // (slot, head, piece)

  StagingFetcher(engine::HostBuffer host, int64_t staging) : host_(host), staging_(staging) {}

  void Keep(const Key& key, std::vector<uint8_t> block) { blocks_[key] = std::move(block); }
  // Fetch answers `offset` for this piece.
  void Answer(const Key& key, int64_t offset) { answers_[key] = offset; }

  void Fetch(int layer, std::span<const Piece> pieces, std::span<int64_t> offsets) override {
    layers_.insert(layer);
    calls_.emplace_back();
    std::memset(host_.data() + staging_, 0xA5, used_);
    int64_t at = staging_;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Key key{pieces[i].slot, pieces[i].head, pieces[i].piece};
      calls_.back().push_back(key);
      if (const auto it = answers_.find(key); it != answers_.end()) {
        offsets[i] = it->second;
        continue;
      }
      const auto it = blocks_.find(key);
      if (it == blocks_.end()) {
        offsets[i] = -1;
        continue;
      }
      std::memcpy(host_.data() + at + 8, it->second.data(), it->second.size());
      offsets[i] = at + 8;
      at += (8 + static_cast<int64_t>(it->second.size()) + 63) / 64 * 64;
    }
    used_ = at - staging_;
  }

  const std::vector<std::vector<Key>>& calls() const { return calls_; }
  const std::set<int>& layers() const { return layers_; }

 private:
  engine::HostBuffer host_;
  int64_t staging_;
  int64_t used_ = 0;
  std::map<Key, std::vector<uint8_t>> blocks_;
  std::map<Key, int64_t> answers_;
  std::vector<std::vector<Key>> calls_;
  std::set<int> layers_;
};

// Moves every head's pieces of blocks `which` below host memory: their
// encoded blocks go to `fetcher`, their host bytes are wiped and their
// piece_host entries become kPieceBelowHost. Returns the pieces moved.
std::set<StagingFetcher::Key> MoveBelowHost(OpFixture& f, const std::vector<int>& which,
                                            StagingFetcher& fetcher) {
  const int32_t* base = f.tables.piece_base.data_as<int32_t>();
  int32_t* where = f.tables.piece_host.data_as<int32_t>();
  const int64_t max_blocks = f.tables.piece_base.dim(2), max_pieces = f.tables.piece_host.dim(2);
  std::set<StagingFetcher::Key> moved;
  for (int h = 0; h < OpFixture::kHkv; ++h) {
    for (int j : which) {
      const int size = f.ext[(h * max_blocks + j) * 2 + 1];
      for (int i = 0; i * engine::kKvPieceTokens < size; ++i) {
        const int32_t piece = base[h * max_blocks + j] + i;
        int32_t& unit = where[h * max_pieces + piece];
        const int64_t at = int64_t{unit} * engine::kKvHostUnit;
        uint8_t* bytes = f.ring.host.data() + at;
        const size_t n =
            engine::KvCodec::DeclaredBytes(std::span<const uint8_t>(bytes, f.ring.host.bytes - at));
        EXPECT_GT(n, 0u);
        fetcher.Keep({0, h, piece}, {bytes, bytes + n});
        std::memset(bytes, 0, n);
        unit = engine::kPieceBelowHost;
        moved.insert({0, h, piece});
      }
    }
  }
  return moved;
}

TEST(TierOpsTest, PiecesBelowHostMemoryComeUpThroughTheFetcher) {
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kBf16).ok());
  StagingFetcher fetcher(f.ring.host, 512 << 10);
  const std::set<StagingFetcher::Key> moved = MoveBelowHost(f, {0, 2}, fetcher);
  ASSERT_EQ(moved.size(), 4u);  // one piece per block and head
  f.tables.layer = 7;
  f.ring.fetcher = &fetcher;
  f.PoisonClusteredRows();
  std::mt19937 rng(11);
  for (int step = 0; step < 200; ++step) {
    std::vector<int> order = {0, 1, 2, 3, 4, 5};
    std::shuffle(order.begin(), order.end(), rng);
    const int budget = 1 + static_cast<int>(rng() % 16);
    engine::SparsePlan plan = f.Plan(order, budget);
    const engine::SparsePlan logical = f.Plan(order, budget);
    ASSERT_TRUE(f.Recall(plan).ok());
    ASSERT_EQ(f.ring.status.data_as<int32_t>()[0], 0) << "step " << step;
    f.ExpectKeysRead(plan, logical);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(f.Stat(engine::kStatBadPieces), 0);
  EXPECT_GT(f.Stat(engine::kStatRecalledTokens), 0);
  EXPECT_GT(f.Stat(engine::kStatHitTokens), 0);
  // Every miss of a moved piece, and only those, asked for it: one call per
  // missed block (their pieces together), at the tables' layer.
  ASSERT_FALSE(fetcher.calls().empty());
  EXPECT_EQ(fetcher.layers(), std::set<int>{7});
  std::set<StagingFetcher::Key> asked;
  for (const auto& call : fetcher.calls()) {
    ASSERT_EQ(call.size(), 1u);
    EXPECT_TRUE(moved.contains(call[0]));
    asked.insert(call[0]);
  }
  EXPECT_EQ(asked, moved);
  EXPECT_LE(static_cast<int64_t>(fetcher.calls().size()), f.Stat(engine::kStatRecalledPieces));
}

TEST(TierOpsTest, APieceBelowHostMemoryThatDoesNotComeUpIsABadPiece) {
  OpFixture f({9, 1, 20, 6, 12, 8});
  ASSERT_TRUE(f.Offload(engine::KvCodecKind::kInt8).ok());
  StagingFetcher fetcher(f.ring.host, 512 << 10);
  MoveBelowHost(f, {0, 2}, fetcher);
  const int32_t* base = f.tables.piece_base.data_as<int32_t>();
  const int32_t* res_count = f.tables.res_count.data_as<int32_t>();
  const int max_blocks = 16;
  // Head 0's block 0 cannot be had; head 1's lies past the host buffer.
  fetcher.Answer({0, 0, base[0]}, -1);
  fetcher.Answer({0, 1, base[max_blocks]}, static_cast<int64_t>(f.ring.host.bytes));
  f.ring.fetcher = &fetcher;
  engine::SparsePlan plan = f.Plan({0, 2}, 12);
  ASSERT_TRUE(f.Recall(plan).ok());
  EXPECT_EQ(f.ring.status.data_as<int32_t>()[0], engine::kRecallBadBlock);
  EXPECT_EQ(f.Stat(engine::kStatBadPieces), 2);
  EXPECT_EQ(res_count[0], 0);
  EXPECT_EQ(res_count[max_blocks], 0);
  EXPECT_GT(res_count[2], 0);
  EXPECT_GT(res_count[max_blocks + 2], 0);
  EXPECT_EQ(fetcher.calls().size(), 4u);
  // Without a fetcher a piece below host memory is a bad piece too, and
  // nothing is asked for.
  f.ring.fetcher = nullptr;
  f.ring.status.data_as<int32_t>()[0] = 0;
  engine::SparsePlan again = f.Plan({0, 2}, 12);
  ASSERT_TRUE(f.Recall(again).ok());
  EXPECT_EQ(f.ring.status.data_as<int32_t>()[0], engine::kRecallBadBlock);
  EXPECT_EQ(f.Stat(engine::kStatBadPieces), 4);
  EXPECT_EQ(res_count[0], 0);
  EXPECT_EQ(fetcher.calls().size(), 4u);
}

TEST(TierOpsTest, UnitsBoundCoversEveryClusteringOfTheTokens) {
  std::mt19937 rng(9);
  for (auto codec : {engine::KvCodecKind::kBf16, engine::KvCodecKind::kFp8E4M3,
                     engine::KvCodecKind::kInt8, engine::KvCodecKind::kInt4}) {
    auto c = engine::KvCodec::Create(codec).value();
    for (int trial = 0; trial < 200; ++trial) {
      const int d = 16 + 8 * static_cast<int>(rng() % 15);
      const int clusters = 1 + static_cast<int>(rng() % 30);
      std::vector<int> sizes(clusters);
      int64_t count = 0;
      for (int& s : sizes) count += s = static_cast<int>(rng() % 200);
      int64_t units = 0;
      for (int s : sizes) {
        for (int off = 0; off < s; off += engine::kKvPieceTokens) {
          const size_t bytes = c->EncodedBytes(std::min(64, s - off), d, DType::kBF16);
          units += (static_cast<int64_t>(bytes) + engine::kKvHostUnit - 1) / engine::kKvHostUnit;
        }
      }
      EXPECT_LE(units, engine::KvPieceUnitsBound(codec, d, DType::kBF16, count, clusters));
    }
  }
}

// ---- Whole models ---------------------------------------------------------------

std::vector<int32_t> Prompt(int len, uint32_t seed) {
  return testing_util::RandomPrompt(len, seed);
}

KvPolicyConfig ClusterKv() { return testing_util::SmallClusterKv(); }

struct Served {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  KvPolicyRunner::Stats stats;
  int64_t lost = 0;
  int64_t preemptions = 0;
  int64_t swapped_out = 0;
  int64_t upper_released = 0;
};

// The caches of a Serve run: `num_pages` of every layer, or with
// upper_pages > 0 two page groups, the upper one from layer 1 (ClusterKv()'s
// sparse layers).
struct Cache {
  int num_pages = 160;
  int upper_pages = 0;
  int page_size = 8;
};

// llama_gqa with `cache`'s pages, a block manager with a 64 MiB host tier,
// and a ClusterKv() runner installed as its planner, its clusters
// host-homed when `tiered` (tier.manager is set here). Uninstalls the
// planner when it goes.
struct TieredModel {
  engine::LoadedModel loaded;
  std::unique_ptr<KvBlockManager> manager;
  std::unique_ptr<KvPolicyRunner> runner;

  TieredModel(const Cache& cache, bool tiered, KvTierOptions tier = {}) {
    engine::ModelOptions options;
    options.max_seqs = 4;
    options.max_context = 320;
    options.max_batch_tokens = 96;
    options.page_size = cache.page_size;
    options.num_pages = cache.num_pages;
    options.num_upper_pages = cache.upper_pages;
    options.upper_first_layer = 1;
    auto l = engine::LoadModel({testing_util::FixturePath("models/llama_gqa"), ""}, g_backend.get(),
                               options);
    EXPECT_TRUE(l.ok()) << l.status();
    loaded = std::move(*l);
    auto m = KvBlockManager::Create(model(), {.host_bytes = int64_t{64} << 20});
    EXPECT_TRUE(m.ok()) << m.status();
    manager = std::move(*m);
    if (tiered) tier.manager = manager.get();
    auto r = KvPolicyRunner::Create(model(), {ClusterKv()}, {.max_sparse_seqs = 4, .tier = tier});
    EXPECT_TRUE(r.ok()) << r.status();
    runner = std::move(*r);
    EXPECT_TRUE(model()->set_attention_planner(runner.get()).ok());
  }
  ~TieredModel() { EXPECT_TRUE(model()->set_attention_planner(nullptr).ok()); }
  engine::Model* model() { return loaded.model.get(); }
  // Every page, host record and pool slot back, no copy in flight.
  bool Idle() {
    EXPECT_TRUE(manager->Poll().ok());
    return manager->Idle() && runner->num_free_slots() == 4;
  }
};

// Three concurrent requests through a batcher with a ClusterKV runner,
// with host-homed clusters when `tiered` (tier.manager is set here);
// `corrupt` runs before each step.
Served Serve(bool tiered, KvTierOptions tier = {}, int max_tokens = 40,
             const std::function<void(KvBlockManager&, const KvPolicyRunner&)>& corrupt = nullptr,
             bool* idle = nullptr, Cache cache = {}) {
  TieredModel t(cache, tiered, tier);
  engine::Model* model = t.model();
  KvBlockManager* manager = t.manager.get();
  KvPolicyRunner* runner = t.runner.get();
  Served out;
  {
    engine::Batcher batcher(model, nullptr, {}, manager);
    const int lens[] = {150, 97, 180};
    for (int i = 0; i < 3; ++i) {
      engine::GenerationRequest r;
      r.id = i;
      r.prompt = Prompt(lens[i], 7 + i);
      r.max_tokens = max_tokens;
      r.ignore_eos = true;
      EXPECT_TRUE(batcher.Add(r).ok());
    }
    while (batcher.HasWork()) {
      if (corrupt) corrupt(*manager, *runner);
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) {
        out.tokens[e.request_id].push_back(e.token_id);
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      }
    }
    out.lost = batcher.num_kv_lost();
    out.preemptions = batcher.num_preemptions();
    out.swapped_out = batcher.num_swapped_out();
    out.upper_released = batcher.num_upper_pages_released();
  }
  out.stats = runner->stats();
  if (idle != nullptr) *idle = t.Idle();
  return out;
}

TEST(TieringTest, RawHostHomedClustersGiveTheTokensOfClustersOnTheGpu) {
  const Served gpu = Serve(false);
  bool idle = false;
  const Served host = Serve(true, {}, 40, nullptr, &idle);
  EXPECT_EQ(gpu.stats.offloads, 0);
  EXPECT_GT(host.stats.tiered_sequences, 0);
  EXPECT_GT(host.stats.offloads, 0);
  EXPECT_GT(host.stats.recall_tokens, 0);
  EXPECT_GT(host.stats.recall_hit_tokens + host.stats.recall_refreshed_tokens, 0);
  EXPECT_EQ(host.stats.recall_bad_pieces, 0);
  EXPECT_GT(host.stats.recall_steps, 0);
  EXPECT_GE(host.stats.recall_micros, host.stats.recall_steps) << "each recall takes >= 1 us";
  for (uint64_t id = 0; id < 3; ++id) {
    EXPECT_EQ(host.tokens.at(id), gpu.tokens.at(id)) << "request " << id;
  }
  EXPECT_TRUE(idle) << "ring pages, host regions and slots all returned";
}

TEST(TieringTest, PrefetchRecallsAheadOfTheLayerAndKeepsTheTokens) {
  const Served gpu = Serve(false);
  const Served off = Serve(true, {.prefetch_share = 0});
  bool idle = false;
  const Served on = Serve(true, {.prefetch_share = 1}, 40, nullptr, &idle);
  EXPECT_EQ(off.stats.prefetch_tokens, 0);
  EXPECT_GT(on.stats.prefetch_tokens, 0);
  EXPECT_GT(on.stats.prefetch_kib, 0);
  // This two-layer fixture's residual stream changes too much between its
  // layers for the guesses to help (bench kv-policies measures that on the
  // trained models); what matters here is that they change no token.
  EXPECT_EQ(on.stats.recall_bad_pieces, 0);
  EXPECT_EQ(on.lost, 0);
  for (uint64_t id = 0; id < 3; ++id) {
    EXPECT_EQ(on.tokens.at(id), gpu.tokens.at(id)) << "request " << id;
    EXPECT_EQ(off.tokens.at(id), gpu.tokens.at(id)) << "request " << id;
  }
  EXPECT_TRUE(idle) << "ring pages, host regions and slots all returned";
  // With the upper pages of host-homed clusters freed, too.
  const Served freed =
      Serve(true, {.prefetch_share = 1}, 40, nullptr, nullptr, {.upper_pages = 160});
  EXPECT_GT(freed.stats.prefetch_tokens, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(freed.tokens.at(id), gpu.tokens.at(id));
  // A share of the budget: the guesses select that much (their own
  // entries' budgets; the layers' own plans keep the whole budget, so the
  // tokens stay).
  for (double share : {0.5, 0.3}) {
    const Served part = Serve(true, {.prefetch_share = share});
    EXPECT_GT(part.stats.prefetch_tokens, 0);
    EXPECT_LT(part.stats.prefetch_tokens, on.stats.prefetch_tokens) << "share " << share;
    for (uint64_t id = 0; id < 3; ++id) {
      EXPECT_EQ(part.tokens.at(id), gpu.tokens.at(id)) << "share " << share << ", request " << id;
    }
  }
}

TEST(TieringTest, WindowClusteringsShareHostRecords) {
  // 120 generated tokens: several windows of 16 clustered after each
  // prompt, in each sparse layer. In int4 a window's pieces take a quarter
  // of a host record (every layer's K and V page of 32 tokens); they fill
  // the tail of the sequence's last region instead of taking a record
  // each, so the offloads reserve fewer records than there are offloads.
  const Served s = Serve(true, {.codec = engine::KvCodecKind::kInt4}, 120, nullptr, nullptr,
                         {.num_pages = 40, .page_size = 32});
  const int64_t record =
      2 * 2 * 32 * 2 * 16 * 4;  // 2 layers x K,V x 32 tokens x 2 heads x 16, fp32
  EXPECT_GT(s.stats.offloads, 6 * 3);
  EXPECT_LT(s.stats.offloaded_bytes, s.stats.offloads * record) << s.stats.offloads << " offloads";
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(s.tokens.at(id).size(), 120u);
}

TEST(TieringTest, HalfTheClustersOnTheHostGiveTheSameTokens) {
  const Served gpu = Serve(false);
  const Served half = Serve(true, {.block_stride = 2});
  EXPECT_GT(half.stats.recall_tokens, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(half.tokens.at(id), gpu.tokens.at(id));
}

TEST(TieringTest, UpperPagesOfHostHomedClustersAreFreedAndTheTokensStay) {
  const Served gpu = Serve(false);
  bool idle = false;
  const Served freed = Serve(true, {}, 40, nullptr, &idle, {.upper_pages = 160});
  EXPECT_GT(freed.stats.recall_tokens, 0);
  EXPECT_GT(freed.upper_released, 0) << "pages wholly inside offloaded clusterings go";
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(freed.tokens.at(id), gpu.tokens.at(id));
  EXPECT_TRUE(idle) << "both groups' pages, host regions and slots all returned";
  // Half the clusters stay in the paged cache: no upper page may go.
  const Served half = Serve(true, {.block_stride = 2}, 40, nullptr, nullptr, {.upper_pages = 160});
  EXPECT_EQ(half.upper_released, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(half.tokens.at(id), gpu.tokens.at(id));
}

TEST(TieringTest, FreedUpperPagesLetMoreSequencesRunAtOnce) {
  // An upper group too small for the three sequences' whole contexts (547
  // tokens, 70 pages, plus their rings): without tiering they preempt each
  // other; with host-homed clusters their upper pages shrink to sinks,
  // tail and ring, and they all run to the end together.
  const Cache small{.num_pages = 160, .upper_pages = 64};
  const Served gpu = Serve(false, {}, 40, nullptr, nullptr, small);
  bool idle = false;
  const Served host = Serve(true, {}, 40, nullptr, &idle, small);
  EXPECT_GT(gpu.preemptions, 0);
  EXPECT_EQ(host.preemptions, 0);
  EXPECT_GT(host.upper_released, 0);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(host.tokens.at(id), gpu.tokens.at(id));
  EXPECT_TRUE(idle);
}

TEST(TieringTest, SwapsKeepWhichUpperPagesAreOffTheGpu) {
  // A lower group small enough to preempt with the host tier on: the
  // swapped sequences come back with their upper pages off the GPU where
  // they were, and the tokens do not change.
  const Served gpu = Serve(false);
  bool idle = false;
  const Served swapped = Serve(true, {}, 40, nullptr, &idle, {.num_pages = 64, .upper_pages = 160});
  EXPECT_GT(swapped.swapped_out, 0);
  EXPECT_GT(swapped.upper_released, 0);
  // Paused sequences gave their rings back and took new ones to resume.
  EXPECT_GT(swapped.stats.ring_pauses, 0);
  EXPECT_EQ(swapped.stats.ring_resumes, swapped.stats.ring_pauses);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(swapped.tokens.at(id), gpu.tokens.at(id));
  EXPECT_TRUE(idle);
}

TEST(TieringTest, APausedSequenceThatFindsNoRingIsRecomputed) {
  // One tiered sequence whose ring is given back (Pause) after its
  // clusters went to the host tier, with no Resume, while every free upper
  // page is taken: its next step cannot take a ring again, so the sequence
  // is reported lost and recomputed from its tokens when pages come back.
  // (Its later tokens may differ from an uninterrupted run: the recomputed
  // prompt clusters a longer context.)
  const Served reference = Serve(false, {}, 40);
  TieredModel t({.num_pages = 160, .upper_pages = 160}, /*tiered=*/true);
  engine::Model* model = t.model();
  KvBlockManager& m = *t.manager;
  KvPolicyRunner* runner = t.runner.get();
  std::vector<int32_t> tokens;
  {
    engine::Batcher batcher(model, nullptr, {}, &m);
    engine::GenerationRequest r;
    r.id = 2;  // Serve's third request
    r.prompt = Prompt(180, 9);
    r.max_tokens = 40;
    r.ignore_eos = true;
    ASSERT_TRUE(batcher.Add(r).ok());
    std::vector<int32_t> hogged;
    bool paused = false;
    while (batcher.HasWork()) {
      if (!paused && runner->stats().offloads > 0) {
        runner->Pause(2);
        paused = true;
        ASSERT_TRUE(m.AllocatePages(engine::PageGroup::kUpper,
                                    m.num_free_pages(engine::PageGroup::kUpper), hogged));
      } else if (paused && batcher.num_kv_lost() > 0 && !hogged.empty()) {
        ASSERT_TRUE(m.FreePages(engine::PageGroup::kUpper, hogged).ok());
      }
      auto events = batcher.Step();
      ASSERT_TRUE(events.ok()) << events.status();
      for (const auto& e : *events) {
        ASSERT_NE(e.finish, engine::FinishReason::kError) << e.error;
        tokens.push_back(e.token_id);
      }
    }
    EXPECT_EQ(batcher.num_kv_lost(), 1);
  }
  EXPECT_EQ(runner->stats().ring_pauses, 1);
  EXPECT_EQ(runner->stats().lost_sequences, 1);
  ASSERT_EQ(tokens.size(), 40u);
  EXPECT_EQ(tokens[0], reference.tokens.at(2)[0]) << "the first token is the prefill's";
  EXPECT_TRUE(t.Idle());
}

TEST(TieringTest, QuantisedCodecsServeEveryRequest) {
  for (auto codec :
       {engine::KvCodecKind::kFp8E4M3, engine::KvCodecKind::kInt8, engine::KvCodecKind::kInt4}) {
    const Served s = Serve(true, {.codec = codec});
    EXPECT_GT(s.stats.recall_tokens, 0) << engine::KvCodecKindName(codec);
    for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(s.tokens.at(id).size(), 40u);
  }
}

TEST(TieringTest, ACorruptHostBlockIsCaughtAndItsSequenceRecomputed) {
  bool corrupted = false, idle = false;
  const Served s = Serve(
      true, {}, 40,
      [&](KvBlockManager& m, const KvPolicyRunner& runner) {
        if (corrupted || runner.stats().offloads == 0) return;
        // Every 97th byte of the host tier's used part: whatever is recalled
        // next fails its check.
        const engine::HostBuffer& host = m.host_buffer();
        const int64_t used = m.stats().host_bytes_used;
        for (int64_t i = 40; i < used; i += 97) host.data()[i] ^= 0x20;
        corrupted = true;
      },
      &idle);
  ASSERT_TRUE(corrupted);
  EXPECT_GT(s.stats.recall_bad_pieces, 0);
  EXPECT_GT(s.lost, 0);
  EXPECT_EQ(s.stats.lost_sequences, s.lost);
  for (uint64_t id = 0; id < 3; ++id) EXPECT_EQ(s.tokens.at(id).size(), 40u) << "request " << id;
  EXPECT_TRUE(idle);
}

TEST(TieringTest, NothingLeaksAfterCancellationsPreemptionsAndSwaps) {
  // Host-homed clusters, a cache small enough to preempt (and swap), and
  // cancellations at random steps: at the end every page (rings included),
  // host record and region, and pool slot is back.
  TieredModel t({.num_pages = 90}, /*tiered=*/true);  // the rings take 4 x 6 pages of it
  engine::Model* model = t.model();
  KvBlockManager& m = *t.manager;
  {
    engine::Batcher batcher(model, nullptr, {}, &m);
    std::mt19937 rng(21);
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
      auto events = batcher.Step();
      ASSERT_TRUE(events.ok()) << events.status();
      for (const auto& e : *events) ASSERT_NE(e.finish, engine::FinishReason::kError) << e.error;
    }
    while (batcher.HasWork()) ASSERT_TRUE(batcher.Step().ok());
    EXPECT_GT(batcher.num_preemptions(), 0);
    EXPECT_GT(batcher.num_swapped_out(), 0);
  }
  const KvPolicyRunner::Stats& s = t.runner->stats();
  EXPECT_GT(s.offloads, 0);
  EXPECT_GT(s.recall_tokens, 0);
  EXPECT_EQ(s.lost_sequences, 0);
  ASSERT_TRUE(m.Poll().ok());
  EXPECT_TRUE(m.Idle()) << m.stats().gpu_pages_used << " pages, " << m.stats().upper_pages_used
                        << " upper pages, " << m.stats().host_bytes_used
                        << " host bytes still held";
  EXPECT_EQ(t.runner->num_free_slots(), 4);
}

}  // namespace
}  // namespace strata::kvtier

// Host-homed ClusterKV clusters on the GPU: OffloadBlocks and RecallBlocks
// against the CPU reference (the same rings, the same rewritten key lists,
// the right rows read, pieces below host memory fetched on the way, also
// from replayed graphs), whole models whose tokens do not depend on where
// the clusters live (direct and graph-replayed steps, bf16 and fp8 caches),
// and the recall's host-to-GPU bandwidth against cudaMemcpyAsync.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <tuple>
#include <vector>

#include "engine/batcher.h"
#include "engine/kv_codec.h"
#include "engine/model_loader.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/ssd_store.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::Backend;
using engine::DType;
using engine::KvCodecKind;
using engine::Tensor;
using testing_util::CudaVsCpuTest;

std::string FixturePath(const std::string& relative) {
  return std::string(STRATA_FIXTURES_DIR) + "/" + relative;
}

// The tier below host memory, for tests: keeps the encoded blocks of the
// pieces moved below host memory (Keep), and on each Fetch copies those
// asked for into a staging area of the host buffer (8 bytes past 64-byte
// boundaries, so not 16-byte aligned), wiping the previous call's first.
class StagingFetcher : public engine::PieceFetcher {
 public:
  // (layer, slot, head, piece)
  using Request = std::tuple<int, int32_t, int32_t, int32_t>;

  StagingFetcher(engine::HostBuffer host, int64_t staging) : host_(host), staging_(staging) {}

  void Keep(int32_t slot, int32_t head, int32_t piece, std::vector<uint8_t> block) {
    blocks_[{slot, head, piece}] = std::move(block);
  }
  // Fetch answers -1 for this piece.
  void Fail(int32_t slot, int32_t head, int32_t piece) { fail_.insert({slot, head, piece}); }

  void Fetch(int layer, std::span<const Piece> pieces, std::span<int64_t> offsets) override {
    ++calls_;
    std::memset(host_.data() + staging_, 0xA5, used_);
    int64_t at = staging_;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& p = pieces[i];
      requests_.emplace_back(layer, p.slot, p.head, p.piece);
      const auto it = blocks_.find({p.slot, p.head, p.piece});
      if (it == blocks_.end() || fail_.contains({p.slot, p.head, p.piece}) ||
          at + 8 + static_cast<int64_t>(it->second.size()) > static_cast<int64_t>(host_.bytes)) {
        offsets[i] = -1;
        continue;
      }
      std::memcpy(host_.data() + at + 8, it->second.data(), it->second.size());
      offsets[i] = at + 8;
      at += (8 + static_cast<int64_t>(it->second.size()) + 63) / 64 * 64;
    }
    used_ = at - staging_;
  }

  int calls() const { return calls_; }
  std::vector<Request> sorted_requests() const {
    std::vector<Request> out = requests_;
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  using Key = std::tuple<int32_t, int32_t, int32_t>;
  engine::HostBuffer host_;
  int64_t staging_;
  int64_t used_ = 0;
  int calls_ = 0;
  std::map<Key, std::vector<uint8_t>> blocks_;
  std::set<Key> fail_;
  std::vector<Request> requests_;
};

// One sequence of 64 tokens (pages scrambled), clusters over [4, 60) of the
// given sizes per head, a ring of 32 slots in pages 16..23 (see
// tests/kvtier/kv_tiering_test.cc for the CPU-only version).
struct Fixture {
  static constexpr int kPages = 24, kPageSize = 4, kHkv = 2, kD = 16, kMaxBlocks = 16;
  static constexpr int kMaxKeys = 80;
  Backend* b;
  Tensor k, v, table, extents;
  engine::TierTables tables;
  engine::TierRing ring;
  std::vector<float> values_k, values_v;  // bf16-exact
  std::vector<int32_t> ext, pages;
  int blocks;

  Fixture(Backend& backend, const std::vector<int>& sizes, uint64_t seed) : b(&backend) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    const int64_t n = int64_t{kPages} * kPageSize * kHkv * kD;
    values_k.resize(n);
    values_v.resize(n);
    for (auto& x : values_k) x = testing_util::RoundBf16(normal(rng));
    for (auto& x : values_v) x = testing_util::RoundBf16(normal(rng));
    k = Upload({kPages, kPageSize, kHkv, kD}, values_k);
    v = Upload({kPages, kPageSize, kHkv, kD}, values_v);
    for (int p = 0; p < 16; ++p) pages.push_back(15 - p);
    table = UploadI32({16}, pages);
    blocks = static_cast<int>(sizes.size());
    ext.assign(kHkv * kMaxBlocks * 2, 0);
    for (int h = 0; h < kHkv; ++h) {
      int first = 4;
      for (int j = 0; j < blocks; ++j) {
        ext[(h * kMaxBlocks + j) * 2] = first;
        ext[(h * kMaxBlocks + j) * 2 + 1] = sizes[j];
        first += sizes[j];
      }
    }
    extents = UploadI32({1, kHkv, kMaxBlocks, 2}, ext);
    tables = {
        Filled({1, kHkv, kMaxBlocks}, -1), Filled({1, kHkv, 64}, 0),         Filled({1, kHkv}, 0),
        Filled({1, kHkv, kMaxBlocks}, 0),  Filled({1, kHkv, kMaxBlocks}, 0), Filled({1, kHkv}, 0)};
    ring.ring_rows = 32;
    std::vector<int32_t> ring_pages(8);
    std::iota(ring_pages.begin(), ring_pages.end(), 16);
    ring.ring_pages = UploadI32({1, 8}, ring_pages);
    ring.status = Filled({1}, 0);
    ring.stats = Filled({engine::kKvTierStats}, 0);
    ring.host = b->AllocateHost(1 << 20).value();
  }
  Tensor Upload(std::vector<int64_t> shape, const std::vector<float>& values) {
    Tensor t = b->Allocate(b->activation_dtype(), std::move(shape)).value();
    EXPECT_TRUE(b->CopyFromHost(values.data(), DType::kF32, t.numel(), t, 0).ok());
    return t;
  }
  Tensor UploadI32(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
    Tensor t = b->Allocate(DType::kI32, std::move(shape)).value();
    EXPECT_TRUE(b->CopyFromHost(values.data(), DType::kI32, t.numel(), t, 0).ok());
    return t;
  }
  Tensor Filled(std::vector<int64_t> shape, int value) {
    Tensor t = b->Allocate(DType::kI32, std::move(shape)).value();
    EXPECT_TRUE(b->Fill(t, static_cast<float>(value)).ok());
    return t;
  }
  std::vector<int32_t> I32(const Tensor& t) {
    std::vector<int32_t> out(t.numel());
    EXPECT_TRUE(b->CopyToHost(t, out.data()).ok());
    return out;
  }
  int64_t SlotOf(int index) const {
    return int64_t{pages[index / kPageSize]} * kPageSize + index % kPageSize;
  }
  absl::Status Offload(KvCodecKind codec, int stride = 1) {
    engine::SequenceRange range{table, kPageSize, 4, 56};
    const int64_t units = engine::KvPieceUnitsBound(codec, kD, k.dtype(), 56, blocks);
    engine::TierTables t{tables.piece_base.Row(0),  tables.piece_host.Row(0),
                         tables.piece_count.Row(0), tables.res_start.Row(0),
                         tables.res_count.Row(0),   tables.ring_head.Row(0)};
    return b->OffloadBlocks(k, v, range, extents.Row(0), 0, blocks, stride, codec, ring.host, 0,
                            units, t);
  }
  // The logical key list of one decode entry selecting `order` up to budget.
  std::vector<int32_t> Keys(const std::vector<int>& order, int budget,
                            std::vector<int32_t>& count) {
    std::vector<int32_t> keys(kHkv * kMaxKeys, 0);
    count.assign(kHkv, 0);
    for (int h = 0; h < kHkv; ++h) {
      int32_t* out = keys.data() + h * kMaxKeys;
      int n = 0;
      for (int t = 0; t < 4; ++t) out[n++] = t;
      int left = budget;
      for (int j : order) {
        const int take = std::min(left, ext[(h * kMaxBlocks + j) * 2 + 1]);
        for (int t = 0; t < take; ++t) out[n++] = ext[(h * kMaxBlocks + j) * 2] + t;
        left -= take;
        if (left == 0) break;
      }
      for (int t = 60; t < 64; ++t) out[n++] = t;
      count[h] = n;
    }
    return keys;
  }
  // The plan of one decode entry selecting `order` up to budget.
  engine::SparsePlan Plan(const std::vector<int>& order, int budget) {
    std::vector<int32_t> count;
    const std::vector<int32_t> keys = Keys(order, budget, count);
    engine::SparsePlan plan;
    plan.num_entries = 1;
    plan.max_blocks = kMaxBlocks;
    plan.max_keys = kMaxKeys;
    plan.host_entries = {0, 0, 0, blocks, budget, 4, 60, 64};
    plan.entries = UploadI32({1, engine::kSparsePlanFields}, plan.host_entries);
    plan.key_index = UploadI32({1, kHkv, kMaxKeys}, keys);
    plan.key_count = UploadI32({1, kHkv}, count);
    return plan;
  }
  absl::Status RecallPlan(engine::SparsePlan& plan) {
    engine::AttentionBatch batch;
    return b->RecallBlocks(k, v, batch, plan, extents, tables, ring);
  }
  // Runs a recall; returns the rewritten key list.
  std::vector<int32_t> Recall(const std::vector<int>& order, int budget) {
    engine::SparsePlan plan = Plan(order, budget);
    const absl::Status s = RecallPlan(plan);
    EXPECT_TRUE(s.ok()) << s;
    return I32(plan.key_index);
  }
  // Moves every head's pieces of blocks `which` below host memory: their
  // encoded blocks go to each of `fetchers`, their host bytes are wiped and
  // their piece_host entries become kPieceBelowHost. Returns the requests
  // they may see at `layer`.
  std::set<StagingFetcher::Request> MoveBelowHost(const std::vector<int>& which,
                                                  const std::vector<StagingFetcher*>& fetchers,
                                                  int layer) {
    EXPECT_TRUE(b->Synchronize().ok());  // the offload's bytes are written
    const std::vector<int32_t> base = I32(tables.piece_base);
    std::vector<int32_t> where = I32(tables.piece_host);
    const int64_t max_pieces = tables.piece_host.dim(2);
    std::set<StagingFetcher::Request> moved;
    for (int h = 0; h < kHkv; ++h) {
      for (int j : which) {
        const int size = ext[(h * kMaxBlocks + j) * 2 + 1];
        for (int i = 0; i * engine::kKvPieceTokens < size; ++i) {
          const int32_t piece = base[h * kMaxBlocks + j] + i;
          int32_t& unit = where[h * max_pieces + piece];
          uint8_t* bytes = ring.host.data() + int64_t{unit} * engine::kKvHostUnit;
          const size_t n = engine::KvCodec::DeclaredBytes(std::span<const uint8_t>(
              bytes, ring.host.bytes - int64_t{unit} * engine::kKvHostUnit));
          EXPECT_GT(n, 0u);
          for (StagingFetcher* f : fetchers) f->Keep(0, h, piece, {bytes, bytes + n});
          std::memset(bytes, 0, n);
          unit = engine::kPieceBelowHost;
          moved.emplace(layer, 0, h, piece);
        }
      }
    }
    EXPECT_TRUE(
        b->CopyFromHost(where.data(), DType::kI32, tables.piece_host.numel(), tables.piece_host, 0)
            .ok());
    tables.layer = layer;
    return moved;
  }
  // Every key of `got` reads the values of the logical key in `want`.
  ::testing::AssertionResult KeysRead(const std::vector<int32_t>& got,
                                      const std::vector<int32_t>& want, int n_per_head) {
    std::vector<float> kk(k.numel()), vv(v.numel());
    if (!b->CopyToHost(k, kk.data()).ok() || !b->CopyToHost(v, vv.data()).ok()) {
      return ::testing::AssertionFailure() << "download";
    }
    for (int h = 0; h < kHkv; ++h) {
      for (int j = 0; j < n_per_head; ++j) {
        const int32_t g = got[h * kMaxKeys + j], w = want[h * kMaxKeys + j];
        const int64_t slot = g <= -2 ? -2 - g : SlotOf(g);
        for (int x = 0; x < kD; ++x) {
          const int64_t at = (slot * kHkv + h) * kD + x, orig = (SlotOf(w) * kHkv + h) * kD + x;
          if (kk[at] != values_k[orig] || vv[at] != values_v[orig]) {
            return ::testing::AssertionFailure()
                   << "head " << h << " key " << j << " (logical " << w << ", read " << g << ")";
          }
        }
      }
    }
    return ::testing::AssertionSuccess();
  }
  void PoisonClusteredRows() {
    std::vector<float> nan_k = values_k, nan_v = values_v;
    for (int i = 4; i < 60; ++i) {
      for (int h = 0; h < kHkv; ++h) {
        for (int x = 0; x < kD; ++x) {
          nan_k[(SlotOf(i) * kHkv + h) * kD + x] = NAN;
          nan_v[(SlotOf(i) * kHkv + h) * kD + x] = NAN;
        }
      }
    }
    EXPECT_TRUE(b->CopyFromHost(nan_k.data(), DType::kF32, k.numel(), k, 0).ok());
    EXPECT_TRUE(b->CopyFromHost(nan_v.data(), DType::kF32, v.numel(), v, 0).ok());
  }
};

class CudaTierOpsTest : public CudaVsCpuTest {};

TEST_F(CudaTierOpsTest, RecallMatchesTheCpuReferenceStepByStep) {
  for (KvCodecKind codec : {KvCodecKind::kBf16, KvCodecKind::kInt8}) {
    const std::vector<int> sizes = {9, 1, 20, 6, 12, 8, 0};
    Fixture c(cpu(), sizes, seed_), g(cuda(), sizes, seed_);
    STRATA_ASSERT_OK(c.Offload(codec, codec == KvCodecKind::kBf16 ? 1 : 2));
    STRATA_ASSERT_OK(g.Offload(codec, codec == KvCodecKind::kBf16 ? 1 : 2));
    EXPECT_EQ(c.I32(c.tables.piece_base), g.I32(g.tables.piece_base));
    EXPECT_EQ(c.I32(c.tables.piece_count), g.I32(g.tables.piece_count));
    if (codec != KvCodecKind::kBf16) {  // raw pieces are fp32 on the CPU, bf16 here
      EXPECT_EQ(c.I32(c.tables.piece_host), g.I32(g.tables.piece_host));
    }
    g.PoisonClusteredRows();
    std::mt19937 rng(static_cast<uint32_t>(seed_));
    for (int step = 0; step < 60; ++step) {
      std::vector<int> order = {0, 1, 2, 3, 4, 5, 6};
      std::shuffle(order.begin(), order.end(), rng);
      const int budget = 1 + static_cast<int>(rng() % 16);
      const std::vector<int32_t> want_c = c.Recall(order, budget);
      const std::vector<int32_t> want_g = g.Recall(order, budget);
      ASSERT_EQ(want_g, want_c) << "step " << step << " " << Seed();
      std::vector<int32_t> count;
      const std::vector<int32_t> logical = g.Keys(order, budget, count);
      if (codec == KvCodecKind::kBf16) {
        ASSERT_TRUE(g.KeysRead(want_g, logical, count[0])) << "step " << step << " " << Seed();
      }
    }
    std::vector<int32_t> stats_c = c.I32(c.ring.stats), stats_g = g.I32(g.ring.stats);
    if (codec == KvCodecKind::kBf16) {
      // Raw pieces hold the cache's dtype: fp32 on the CPU, twice the bytes.
      stats_c[engine::kStatRecalledKiB] = stats_g[engine::kStatRecalledKiB] = 0;
    }
    // Each backend times its own recalls; both counted every one.
    EXPECT_GT(stats_c[engine::kStatRecallMicros], 0);
    EXPECT_GT(stats_g[engine::kStatRecallMicros], 0);
    stats_c[engine::kStatRecallMicros] = stats_g[engine::kStatRecallMicros] = 0;
    EXPECT_EQ(stats_c, stats_g) << engine::KvCodecKindName(codec);
    EXPECT_EQ(c.I32(c.tables.ring_head), g.I32(g.tables.ring_head));
    EXPECT_EQ(g.I32(g.ring.status)[0], 0);
  }
}

TEST_F(CudaTierOpsTest, ACorruptPieceIsReportedAndNotUsed) {
  Fixture g(cuda(), {9, 1, 20, 6, 12, 8}, seed_);
  STRATA_ASSERT_OK(g.Offload(KvCodecKind::kInt4));
  STRATA_ASSERT_OK(cuda().Synchronize());
  const int32_t unit = g.I32(g.tables.piece_host)[0];
  g.ring.host.data()[unit * engine::kKvHostUnit + 45] ^= 0x04;
  const std::vector<int32_t> keys = g.Recall({0, 2}, 12);
  EXPECT_EQ(g.I32(g.ring.status)[0], engine::kRecallBadBlock);
  EXPECT_EQ(g.I32(g.ring.stats)[engine::kStatBadPieces], 1);
  // Block 0 is not resident: a later step reads it from the host again.
  EXPECT_EQ(g.I32(g.tables.res_count)[0], 0);
  EXPECT_GT(g.I32(g.tables.res_count)[2], 0);
  EXPECT_LE(keys[4], -2);
}

// Pieces below host memory: blocks 0 and 2 of every head are fetched
// through each backend's fetcher whenever they miss (their host bytes are
// gone), with the rings, key lists and statistics of the CPU reference.
TEST_F(CudaTierOpsTest, PiecesBelowHostMemoryAreFetchedAsOnTheCpu) {
  constexpr int kLayer = 3;
  constexpr int64_t kStaging = 512 << 10;
  for (KvCodecKind codec : {KvCodecKind::kBf16, KvCodecKind::kInt8}) {
    SCOPED_TRACE(engine::KvCodecKindName(codec));
    const std::vector<int> sizes = {9, 1, 20, 6, 12, 8, 0};
    Fixture c(cpu(), sizes, seed_), g(cuda(), sizes, seed_);
    STRATA_ASSERT_OK(c.Offload(codec));
    STRATA_ASSERT_OK(g.Offload(codec));
    StagingFetcher c_fetch(c.ring.host, kStaging), g_fetch(g.ring.host, kStaging);
    const auto moved = c.MoveBelowHost({0, 2}, {&c_fetch}, kLayer);
    EXPECT_EQ(g.MoveBelowHost({0, 2}, {&g_fetch}, kLayer), moved);
    c.ring.fetcher = &c_fetch;
    g.ring.fetcher = &g_fetch;
    g.PoisonClusteredRows();
    std::mt19937 rng(static_cast<uint32_t>(seed_));
    for (int step = 0; step < 60; ++step) {
      std::vector<int> order = {0, 1, 2, 3, 4, 5, 6};
      std::shuffle(order.begin(), order.end(), rng);
      const int budget = 1 + static_cast<int>(rng() % 16);
      const std::vector<int32_t> want_c = c.Recall(order, budget);
      const std::vector<int32_t> want_g = g.Recall(order, budget);
      ASSERT_EQ(want_g, want_c) << "step " << step << " " << Seed();
      ASSERT_EQ(g.I32(g.ring.status)[0], 0) << "step " << step << " " << Seed();
      std::vector<int32_t> count;
      const std::vector<int32_t> logical = g.Keys(order, budget, count);
      if (codec == KvCodecKind::kBf16) {
        ASSERT_TRUE(g.KeysRead(want_g, logical, count[0])) << "step " << step << " " << Seed();
      }
    }
    EXPECT_EQ(c.I32(c.ring.status)[0], 0);
    std::vector<int32_t> stats_c = c.I32(c.ring.stats), stats_g = g.I32(g.ring.stats);
    EXPECT_EQ(stats_g[engine::kStatBadPieces], 0);
    if (codec == KvCodecKind::kBf16) {
      stats_c[engine::kStatRecalledKiB] = stats_g[engine::kStatRecalledKiB] = 0;
    }
    stats_c[engine::kStatRecallMicros] = stats_g[engine::kStatRecallMicros] = 0;
    EXPECT_EQ(stats_c, stats_g);
    EXPECT_EQ(c.I32(c.tables.ring_head), g.I32(g.tables.ring_head));
    EXPECT_EQ(c.I32(c.tables.res_start), g.I32(g.tables.res_start));
    EXPECT_EQ(c.I32(c.tables.res_count), g.I32(g.tables.res_count));
    EXPECT_EQ(c.I32(c.tables.piece_base), g.I32(g.tables.piece_base));
    if (codec != KvCodecKind::kBf16) {
      EXPECT_EQ(c.I32(c.tables.piece_host), g.I32(g.tables.piece_host));
    }
    // The same pieces asked for (the CPU asks per missed block, the GPU
    // once per recall), all of them moved ones.
    const std::vector<StagingFetcher::Request> asked = g_fetch.sorted_requests();
    EXPECT_FALSE(asked.empty());
    EXPECT_EQ(asked, c_fetch.sorted_requests());
    for (const StagingFetcher::Request& r : asked) EXPECT_TRUE(moved.contains(r));
    EXPECT_LE(g_fetch.calls(), 60);
  }
}

// A read ahead (TierRing::list_only) on the side stream hands its fetcher
// the pieces below host memory that the same plan's recall would fetch, as
// the CPU does, and changes no table, key, ring row, status or stat.
TEST_F(CudaTierOpsTest, AReadAheadListsWhatTheRecallWouldFetchAndChangesNothing) {
  constexpr int kLayer = 5;
  const std::vector<int> sizes = {9, 1, 20, 6, 12, 8, 0};
  Fixture c(cpu(), sizes, seed_), g(cuda(), sizes, seed_);
  STRATA_ASSERT_OK(c.Offload(KvCodecKind::kInt8));
  STRATA_ASSERT_OK(g.Offload(KvCodecKind::kInt8));
  StagingFetcher c_fetch(c.ring.host, 512 << 10), g_fetch(g.ring.host, 512 << 10);
  StagingFetcher c_ahead(c.ring.host, 768 << 10), g_ahead(g.ring.host, 768 << 10);
  const auto moved = c.MoveBelowHost({0, 2, 4}, {&c_fetch, &c_ahead}, kLayer);
  EXPECT_EQ(g.MoveBelowHost({0, 2, 4}, {&g_fetch, &g_ahead}, kLayer), moved);
  c.ring.fetcher = &c_fetch;
  g.ring.fetcher = &g_fetch;
  std::mt19937 rng(static_cast<uint32_t>(seed_));
  int listed = 0;
  for (int step = 0; step < 40; ++step) {
    std::vector<int> order = {0, 1, 2, 3, 4, 5, 6};
    std::shuffle(order.begin(), order.end(), rng);
    const int budget = 1 + static_cast<int>(rng() % 16);
    for (Fixture* f : {&c, &g}) {
      const bool gpu = f == &g;
      StagingFetcher& ahead = gpu ? g_ahead : c_ahead;
      StagingFetcher& fetch = gpu ? g_fetch : c_fetch;
      const std::vector<int32_t> tables_before[] = {
          f->I32(f->tables.ring_head), f->I32(f->tables.res_start), f->I32(f->tables.res_count),
          f->I32(f->ring.status), f->I32(f->ring.stats)};
      std::vector<float> k_before(f->k.numel());
      ASSERT_TRUE(f->b->CopyToHost(f->k, k_before.data()).ok());
      engine::SparsePlan plan = f->Plan(order, budget);
      const std::vector<int32_t> keys_before = f->I32(plan.key_index);
      engine::TierRing read_ahead = f->ring;
      read_ahead.fetcher = &ahead;
      read_ahead.list_only = true;
      const size_t ahead_before = ahead.sorted_requests().size();
      STRATA_ASSERT_OK(f->b->BeginSideWork());
      engine::AttentionBatch batch;
      const absl::Status side =
          f->b->RecallBlocks(f->k, f->v, batch, plan, f->extents, f->tables, read_ahead);
      STRATA_ASSERT_OK(f->b->EndSideWork());
      STRATA_ASSERT_OK(f->b->JoinSideWork());
      STRATA_ASSERT_OK(side);
      STRATA_ASSERT_OK(f->b->Synchronize());
      const std::vector<int32_t> tables_after[] = {
          f->I32(f->tables.ring_head), f->I32(f->tables.res_start), f->I32(f->tables.res_count),
          f->I32(f->ring.status), f->I32(f->ring.stats)};
      for (int t = 0; t < 5; ++t) ASSERT_EQ(tables_after[t], tables_before[t]) << "table " << t;
      ASSERT_EQ(f->I32(plan.key_index), keys_before) << "step " << step;
      std::vector<float> k_after(f->k.numel());
      ASSERT_TRUE(f->b->CopyToHost(f->k, k_after.data()).ok());
      ASSERT_EQ(std::memcmp(k_after.data(), k_before.data(), k_after.size() * sizeof(float)), 0);
      // The recall of the same plan fetches exactly what was read ahead.
      std::vector<StagingFetcher::Request> ahead_now = ahead.sorted_requests();
      const size_t fetch_before = fetch.sorted_requests().size();
      STRATA_ASSERT_OK(f->RecallPlan(plan));
      STRATA_ASSERT_OK(f->b->Synchronize());
      ASSERT_EQ(ahead_now.size() - ahead_before, fetch.sorted_requests().size() - fetch_before)
          << "step " << step << (gpu ? " gpu" : " cpu");
      if (gpu) listed += static_cast<int>(ahead_now.size() - ahead_before);
    }
  }
  EXPECT_GT(listed, 0);
  EXPECT_EQ(g_ahead.sorted_requests(), c_ahead.sorted_requests());
  EXPECT_EQ(g_fetch.sorted_requests(), c_fetch.sorted_requests());
  EXPECT_EQ(g_ahead.sorted_requests(), g_fetch.sorted_requests());
  // Without a fetcher a read ahead is refused.
  engine::SparsePlan plan = g.Plan({0, 2}, 12);
  engine::TierRing no_fetcher = g.ring;
  no_fetcher.fetcher = nullptr;
  no_fetcher.list_only = true;
  engine::AttentionBatch batch;
  EXPECT_TRUE(absl::IsInvalidArgument(
      g.b->RecallBlocks(g.k, g.v, batch, plan, g.extents, g.tables, no_fetcher)));
}

TEST_F(CudaTierOpsTest, APieceTheFetcherCannotHaveIsABadPiece) {
  constexpr int64_t kStaging = 512 << 10;
  const std::vector<int> sizes = {9, 1, 20, 6, 12, 8};
  Fixture c(cpu(), sizes, seed_), g(cuda(), sizes, seed_);
  STRATA_ASSERT_OK(c.Offload(KvCodecKind::kInt8));
  STRATA_ASSERT_OK(g.Offload(KvCodecKind::kInt8));
  StagingFetcher c_fetch(c.ring.host, kStaging), g_fetch(g.ring.host, kStaging);
  c.MoveBelowHost({0, 2}, {&c_fetch}, 1);
  g.MoveBelowHost({0, 2}, {&g_fetch}, 1);
  // Block 0's piece of head 0.
  const int32_t piece = g.I32(g.tables.piece_base)[0];
  c_fetch.Fail(0, 0, piece);
  g_fetch.Fail(0, 0, piece);
  c.ring.fetcher = &c_fetch;
  g.ring.fetcher = &g_fetch;
  const std::vector<int32_t> keys = g.Recall({0, 2}, 12);
  EXPECT_EQ(keys, c.Recall({0, 2}, 12));
  EXPECT_EQ(g.I32(g.ring.status)[0], engine::kRecallBadBlock);
  EXPECT_EQ(g.I32(g.ring.stats)[engine::kStatBadPieces], 1);
  std::vector<int32_t> res_count = g.I32(g.tables.res_count);
  EXPECT_EQ(res_count[0], 0) << "block 0 of head 0 is not resident";
  EXPECT_GT(res_count[2], 0);
  EXPECT_GT(res_count[Fixture::kMaxBlocks + 0], 0) << "head 1 fetched its block 0";
  EXPECT_EQ(res_count, c.I32(c.tables.res_count));
  EXPECT_EQ(g_fetch.sorted_requests(), c_fetch.sorted_requests());
  EXPECT_EQ(g_fetch.sorted_requests().size(), 4u);
  // Without a fetcher the piece below host memory is a bad piece too, and
  // nothing is asked for.
  for (Fixture* f : {&c, &g}) {
    f->ring.fetcher = nullptr;
    STRATA_ASSERT_OK(f->b->Fill(f->ring.status, 0));
  }
  const std::vector<int32_t> again = g.Recall({0, 2}, 12);
  EXPECT_EQ(again, c.Recall({0, 2}, 12));
  EXPECT_EQ(g.I32(g.ring.status)[0], engine::kRecallBadBlock);
  EXPECT_EQ(g.I32(g.ring.stats)[engine::kStatBadPieces], 2);
  EXPECT_EQ(g.I32(g.tables.res_count)[0], 0);
  EXPECT_EQ(g.I32(g.tables.res_count), c.I32(c.tables.res_count));
  EXPECT_EQ(g_fetch.sorted_requests().size(), 4u);
  std::vector<int32_t> stats_c = c.I32(c.ring.stats), stats_g = g.I32(g.ring.stats);
  stats_c[engine::kStatRecallMicros] = stats_g[engine::kStatRecallMicros] = 0;
  EXPECT_EQ(stats_c, stats_g);
}

// A recorded recall fetches at every replay, through the fetcher of the
// layer's latest RecallBlocks call.
TEST_F(CudaTierOpsTest, ReplayedRecallsFetchThroughTheLatestFetcher) {
  constexpr int kLayer = 5, kBudget = 14;
  constexpr int64_t kStaging = 512 << 10;
  const std::vector<int> sizes = {9, 1, 20, 6, 12, 8};
  Fixture c(cpu(), sizes, seed_), g(cuda(), sizes, seed_);
  STRATA_ASSERT_OK(c.Offload(KvCodecKind::kInt8));
  STRATA_ASSERT_OK(g.Offload(KvCodecKind::kInt8));
  StagingFetcher c_first(c.ring.host, kStaging), c_second(c.ring.host, kStaging);
  StagingFetcher g_first(g.ring.host, kStaging), g_second(g.ring.host, kStaging);
  c.MoveBelowHost({0, 2}, {&c_first, &c_second}, kLayer);
  g.MoveBelowHost({0, 2}, {&g_first, &g_second}, kLayer);
  std::mt19937 rng(static_cast<uint32_t>(seed_));
  auto next_order = [&] {
    std::vector<int> order = {0, 1, 2, 3, 4, 5};
    std::shuffle(order.begin(), order.end(), rng);
    return order;
  };
  // A direct step, then the recording (which runs nothing).
  c.ring.fetcher = &c_first;
  g.ring.fetcher = &g_first;
  std::vector<int> order = next_order();
  ASSERT_EQ(g.Recall(order, kBudget), c.Recall(order, kBudget));
  const int first_calls = g_first.calls();
  order = next_order();
  engine::SparsePlan plan = g.Plan(order, kBudget);
  STRATA_ASSERT_OK(g.b->BeginCapture());
  const absl::Status recorded = g.RecallPlan(plan);
  absl::StatusOr<int> graph = g.b->EndCapture();
  STRATA_ASSERT_OK(recorded);
  STRATA_ASSERT_OK(graph.status());
  EXPECT_EQ(g_first.calls(), first_calls);
  // A direct step with another fetcher: the replays fetch through it.
  c.ring.fetcher = &c_second;
  g.ring.fetcher = &g_second;
  ASSERT_EQ(g.Recall(order, kBudget), c.Recall(order, kBudget));
  const int direct_calls = g_second.calls();
  for (int step = 0; step < 40; ++step) {
    order = next_order();
    std::vector<int32_t> count;
    const std::vector<int32_t> keys = g.Keys(order, kBudget, count);
    STRATA_ASSERT_OK(g.b->CopyFromHost(keys.data(), DType::kI32, keys.size(), plan.key_index, 0));
    STRATA_ASSERT_OK(g.b->CopyFromHost(count.data(), DType::kI32, count.size(), plan.key_count, 0));
    STRATA_ASSERT_OK(g.b->ReplayGraph(*graph));
    ASSERT_EQ(g.I32(plan.key_index), c.Recall(order, kBudget)) << "step " << step << " " << Seed();
  }
  STRATA_ASSERT_OK(g.b->ReleaseGraph(*graph));
  EXPECT_EQ(g_first.calls(), first_calls);
  EXPECT_GT(g_second.calls(), direct_calls) << "the replays fetch";
  EXPECT_EQ(g_first.sorted_requests(), c_first.sorted_requests());
  EXPECT_EQ(g_second.sorted_requests(), c_second.sorted_requests());
  EXPECT_EQ(g.I32(g.ring.status)[0], 0);
  EXPECT_EQ(c.I32(c.ring.status)[0], 0);
  std::vector<int32_t> stats_c = c.I32(c.ring.stats), stats_g = g.I32(g.ring.stats);
  stats_c[engine::kStatRecallMicros] = stats_g[engine::kStatRecallMicros] = 0;
  EXPECT_EQ(stats_c, stats_g);
  EXPECT_EQ(c.I32(c.tables.res_start), g.I32(g.tables.res_start));
  EXPECT_EQ(c.I32(c.tables.res_count), g.I32(g.tables.res_count));
  EXPECT_EQ(c.I32(c.tables.ring_head), g.I32(g.tables.ring_head));
}

TEST_F(CudaTierOpsTest, FetchesOnlyOnTheMainStreamAndNotFirstInACapture) {
  Fixture g(cuda(), {9, 1, 20, 6, 12, 8}, seed_);
  STRATA_ASSERT_OK(g.Offload(KvCodecKind::kInt8));
  StagingFetcher fetch(g.ring.host, 512 << 10);
  g.MoveBelowHost({0}, {&fetch}, 2);
  g.ring.fetcher = &fetch;
  engine::SparsePlan plan = g.Plan({0, 2}, 12);
  STRATA_ASSERT_OK(g.b->BeginSideWork());
  const absl::Status side = g.RecallPlan(plan);
  STRATA_ASSERT_OK(g.b->EndSideWork());
  STRATA_ASSERT_OK(g.b->JoinSideWork());
  EXPECT_TRUE(absl::IsInvalidArgument(side)) << side;
  g.tables.layer = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(g.RecallPlan(plan)));
  // A layer's first fetch needs memory that a capture cannot allocate.
  g.tables.layer = 4077;
  STRATA_ASSERT_OK(g.b->BeginCapture());
  const absl::Status captured = g.RecallPlan(plan);
  absl::StatusOr<int> graph = g.b->EndCapture();
  if (graph.ok()) STRATA_ASSERT_OK(g.b->ReleaseGraph(*graph));
  EXPECT_TRUE(absl::IsFailedPrecondition(captured)) << captured;
  EXPECT_EQ(fetch.calls(), 0);
  g.tables.layer = 2;
  STRATA_ASSERT_OK(g.RecallPlan(plan));
  STRATA_ASSERT_OK(g.b->Synchronize());
  EXPECT_EQ(fetch.calls(), 1);
  EXPECT_EQ(fetch.sorted_requests().size(), 2u);
  EXPECT_EQ(g.I32(g.ring.status)[0], 0);
}

// ---- Whole models ------------------------------------------------------------------

struct ModelRun {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  kvtier::KvPolicyRunner::Stats stats;
  int graphs = 0;
  bool idle = false;
  int64_t upper_released = 0;
};

// ClusterKV over llama_gqa's second layer, with a budget that a few dozen
// decode steps outgrow.
kvtier::KvPolicyConfig SmallClusterKv() {
  kvtier::KvPolicyConfig config;
  config.type = "clusterkv";
  config.budget_tokens = 48;
  config.sink_tokens = 4;
  config.window_tokens = 24;
  config.tokens_per_cluster = 8;
  config.kmeans_iterations = 5;
  config.full_layers = 1;
  return config;
}

// upper_pages > 0: two page groups, the upper one from layer 1 (the
// policy's sparse layers), whose pages of offloaded clusterings are freed.
// `ssd`: the host-homed clusters also go down to it as soon as they are
// offloaded, and come back up inside the steps (read ahead or not).
ModelRun RunModel(Backend& backend, bool tiered, bool graphs, bool fp8, KvCodecKind codec,
                  int upper_pages = 0, double prefetch_share = 0, kvtier::SsdStore* ssd = nullptr,
                  bool read_ahead = true) {
  ModelRun out;
  engine::ModelOptions options;
  options.max_seqs = 8;
  options.max_context = 400;
  options.max_batch_tokens = 128;
  options.page_size = 8;
  options.num_pages = 600;
  options.num_upper_pages = upper_pages;
  options.upper_first_layer = 1;
  options.decode_graphs = graphs;
  options.kv_cache = fp8 ? engine::KvCacheType::kFp8E4M3 : engine::KvCacheType::kActivation;
  auto loaded = engine::LoadModel({FixturePath("models/llama_gqa"), ""}, &backend, options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return out;
  engine::Model* model = loaded->model.get();
  auto manager =
      kvtier::KvBlockManager::Create(model, {.host_bytes = int64_t{256} << 20, .ssd = ssd});
  EXPECT_TRUE(manager.ok()) << manager.status();
  const kvtier::KvPolicyConfig config = SmallClusterKv();
  kvtier::KvTierOptions tier;
  if (tiered) tier = {.manager = manager->get(), .codec = codec, .prefetch_share = prefetch_share};
  if (tiered && ssd != nullptr) {
    tier.spill_admission = {kvtier::KvBlockManagerOptions::SsdAdmission::kAlways};
    tier.spill_read_ahead = read_ahead;
  }
  auto runner =
      kvtier::KvPolicyRunner::Create(model, {config}, {.max_sparse_seqs = 8, .tier = tier});
  EXPECT_TRUE(runner.ok()) << runner.status();
  EXPECT_TRUE(model->set_attention_planner(runner->get()).ok());
  {
    engine::Batcher batcher(model, nullptr, {}, manager->get());
    for (int step = 0; step < 500 && (step < 30 || batcher.HasWork()); ++step) {
      if (step % 5 == 0 && step / 5 < 6) {
        const int i = step / 5;
        engine::GenerationRequest r;
        r.id = i;
        r.max_tokens = 60 + 13 * i;
        r.ignore_eos = true;
        for (int j = 0; j < 90 + 31 * i; ++j) r.prompt.push_back((41 * i + 3 * j) % 512);
        EXPECT_TRUE(batcher.Add(r).ok());
      }
      auto events = batcher.Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) out.tokens[e.request_id].push_back(e.token_id);
    }
    out.upper_released = batcher.num_upper_pages_released();
  }
  out.graphs = model->num_decode_graphs();
  out.stats = (*runner)->stats();
  EXPECT_TRUE((*manager)->Poll().ok());
  out.idle = (*manager)->Idle() && (*runner)->num_free_slots() == 8;
  EXPECT_TRUE(model->set_attention_planner(nullptr).ok());
  return out;
}

// (graphs, fp8 cache, two page groups with the upper pages freed)
class CudaTieringModelTest : public ::testing::TestWithParam<std::tuple<bool, bool, bool>> {};

TEST_P(CudaTieringModelTest, HostHomedClustersGiveTheTokensOfClustersOnTheGpu) {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
  const auto [graphs, fp8, freed] = GetParam();
  const ModelRun gpu = RunModel(**backend, false, graphs, fp8, KvCodecKind::kBf16);
  const ModelRun host = RunModel(**backend, true, graphs, fp8, KvCodecKind::kBf16, freed ? 300 : 0);
  if (freed) {
    EXPECT_GT(host.upper_released, 0);
  }
  EXPECT_GT(host.stats.recall_steps, 0);
  EXPECT_GT(host.stats.recall_micros, 0) << "the recalls' device time is measured";
  EXPECT_GT(host.stats.offloads, 0);
  EXPECT_GT(host.stats.recall_tokens, 0);
  EXPECT_GT(host.stats.recall_hit_tokens, 0);
  EXPECT_EQ(host.stats.recall_bad_pieces, 0);
  if (graphs) {
    EXPECT_GE(host.graphs, 2) << "tiered steps replay from graphs";
  }
  ASSERT_EQ(gpu.tokens.size(), 6u);
  for (const auto& [id, tokens] : gpu.tokens) EXPECT_EQ(host.tokens.at(id), tokens) << id;
  EXPECT_TRUE(host.idle);
}

// Prefetch (off by default): the next layer's guessed clusters recalled as
// side work change no token, at a share of the budget and at all of it.
TEST(CudaTieringPrefetchTest, PrefetchedClustersGiveTheTokensOfClustersOnTheGpu) {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
  const ModelRun gpu = RunModel(**backend, false, false, false, KvCodecKind::kBf16);
  for (double share : {0.5, 1.0}) {
    const ModelRun host = RunModel(**backend, true, false, false, KvCodecKind::kBf16, 0, share);
    EXPECT_GT(host.stats.prefetch_tokens, 0) << "the next layers' clusters are recalled";
    EXPECT_GT(host.stats.prefetch_micros, 0);
    ASSERT_EQ(gpu.tokens.size(), 6u);
    for (const auto& [id, tokens] : gpu.tokens) {
      EXPECT_EQ(host.tokens.at(id), tokens) << "share " << share << ", request " << id;
    }
  }
}

// Clusters on the SSD come up inside the steps, each layer reading the next
// one's guessed clusters ahead on the side stream (recorded in the decode
// graphs with its host function), with the tokens of clusters on the GPU;
// with a prefetch from host memory beside it too.
TEST(CudaTieringSsdTest, ClustersReadAheadFromTheSsdGiveTheTokensOfClustersOnTheGpu) {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
  const ModelRun gpu = RunModel(**backend, false, true, false, KvCodecKind::kBf16);
  ASSERT_EQ(gpu.tokens.size(), 6u);
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "cuda_tiering_ssd_read_ahead";
  for (const bool graphs : {false, true}) {
    for (const double share : {0.0, 0.5}) {
      for (const bool read_ahead : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "graphs " << graphs << ", prefetch share " << share
                                          << ", read ahead " << read_ahead);
        std::filesystem::remove_all(dir);
        auto store = kvtier::SsdStore::Open({dir.string(), "llama_gqa", int64_t{1} << 30});
        ASSERT_TRUE(store.ok()) << store.status();
        const ModelRun ssd = RunModel(**backend, true, graphs, false, KvCodecKind::kBf16, 0, share,
                                      store->get(), read_ahead);
        EXPECT_GT(ssd.stats.spills, 0);
        EXPECT_GT(ssd.stats.hard_misses, 0);
        EXPECT_EQ(ssd.stats.hard_miss_failed, 0);
        EXPECT_EQ(ssd.stats.recall_bad_pieces, 0);
        if (read_ahead) {
          EXPECT_GT(ssd.stats.read_ahead_used, 0) << "no hard miss was read ahead";
        } else {
          EXPECT_EQ(ssd.stats.read_ahead_clusters, 0);
        }
        for (const auto& [id, tokens] : gpu.tokens) EXPECT_EQ(ssd.tokens.at(id), tokens) << id;
        EXPECT_TRUE(ssd.idle);
      }
    }
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaTieringModelTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool(),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ? "graphs" : "direct") +
                                  (std::get<1>(info.param) ? "_fp8" : "_bf16") +
                                  (std::get<2>(info.param) ? "_freed" : "");
                         });

// Two ClusterKV policies, the second with its clusters in the host tier
// and their upper pages freed, on one model whose decode steps replay from
// graphs. The untiered policy's request runs first and records graphs; the
// tiered one's steps then have the same shape but recall from the host,
// so they must not replay those recordings (they would read the freed
// pages instead of the ring). Its tokens are those of the same request on
// the GPU alone.
std::vector<int32_t> RunTwoPolicies(Backend& backend, bool second_tiered) {
  engine::ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 400;
  options.max_batch_tokens = 128;
  options.page_size = 8;
  options.num_pages = 300;
  options.num_upper_pages = 300;
  options.upper_first_layer = 1;
  options.decode_graphs = true;
  auto loaded = engine::LoadModel({FixturePath("models/llama_gqa"), ""}, &backend, options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return {};
  engine::Model* model = loaded->model.get();
  auto manager = kvtier::KvBlockManager::Create(model, {.host_bytes = int64_t{64} << 20});
  EXPECT_TRUE(manager.ok()) << manager.status();
  const kvtier::KvPolicyConfig config = SmallClusterKv();
  kvtier::KvTierOptions tier{.manager = manager->get()};
  tier.per_policy = {std::nullopt, second_tiered ? std::optional(KvCodecKind::kBf16)
                                                 : std::optional<KvCodecKind>()};
  auto runner =
      kvtier::KvPolicyRunner::Create(model, {config, config}, {.max_sparse_seqs = 4, .tier = tier});
  EXPECT_TRUE(runner.ok()) << runner.status();
  EXPECT_TRUE(model->set_attention_planner(runner->get()).ok());
  std::vector<int32_t> tokens;
  {
    engine::Batcher batcher(model, nullptr, {}, manager->get());
    for (int policy = 0; policy < 2; ++policy) {
      engine::GenerationRequest r;
      r.id = policy;
      r.kv_policy = policy;
      r.max_tokens = 60;
      r.ignore_eos = true;
      for (int j = 0; j < 150; ++j) r.prompt.push_back((7 * j + 11 * policy) % 512);
      EXPECT_TRUE(batcher.Add(r).ok());
      while (batcher.HasWork()) {
        auto events = batcher.Step();
        EXPECT_TRUE(events.ok()) << events.status();
        if (!events.ok()) break;
        for (const auto& e : *events) {
          if (e.request_id == 1) tokens.push_back(e.token_id);
        }
      }
    }
    if (second_tiered) {
      EXPECT_GT(batcher.num_upper_pages_released(), 0);
    }
  }
  if (second_tiered) {
    EXPECT_GT((*runner)->stats().recall_tokens, 0);
  }
  // Two keys when the second policy recalls; one shared key otherwise.
  EXPECT_GE(model->num_decode_graphs(), second_tiered ? 2 : 1);
  EXPECT_TRUE(model->set_attention_planner(nullptr).ok());
  return tokens;
}

TEST(CudaTieringModelTest, RecallingStepsDoNotReplayRecordingsWithoutRecalls) {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
  const std::vector<int32_t> gpu = RunTwoPolicies(**backend, false);
  const std::vector<int32_t> host = RunTwoPolicies(**backend, true);
  ASSERT_EQ(gpu.size(), 60u);
  EXPECT_EQ(host, gpu);
}

TEST(CudaTieringModelCodecTest, QuantisedCodecsServeEveryRequest) {
  auto backend = CreateCudaBackend(0);
  if (!backend.ok()) GTEST_SKIP() << "no usable GPU: " << backend.status();
  for (KvCodecKind codec : {KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    const ModelRun run = RunModel(**backend, true, true, false, codec);
    EXPECT_GT(run.stats.recall_tokens, 0);
    EXPECT_EQ(run.stats.recall_bad_pieces, 0);
    EXPECT_EQ(run.tokens.size(), 6u);
    EXPECT_TRUE(run.idle);
  }
}

// The recall's host-to-GPU bandwidth against cudaMemcpyAsync of the same
// bytes from pinned memory, Llama-3-8B's KV shape (8 KV heads of 128):
// `seqs` sequences of 32k clustered tokens in 64-token clusters, each step
// selecting 16 clusters per head that no earlier step held (all misses),
// so every selected byte crosses the bus. Also timed: the copy engines
// moving the same pieces (cudaMemcpyBatchAsync through CopyRowsFromHost,
// which needs the list on the host: a round trip the recall avoids). Run
// explicitly: strata_cuda_tests --gtest_also_run_disabled_tests
// --gtest_filter='*RecallBandwidth*'
TEST(CudaTieringBench, DISABLED_RecallBandwidth) {
  auto created = CreateCudaBackend(0);
  if (!created.ok()) GTEST_SKIP() << "no usable GPU: " << created.status();
  Backend& b = **created;
  constexpr int kSeqs = 8, kHkv = 8, kD = 128, kPageSize = 16, kTokens = 32768;
  constexpr int kBlocks = kTokens / 64, kSelect = 16, kBudget = kSelect * 64;
  constexpr int kRing = 2 * kBudget, kSeqPages = kTokens / kPageSize + 1;
  constexpr int kRingPages = kRing / kPageSize;
  const int64_t pages = int64_t{kSeqs} * (kSeqPages + kRingPages);
  for (KvCodecKind codec : {KvCodecKind::kBf16, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    Tensor k = b.Allocate(DType::kBF16, {pages, kPageSize, kHkv, kD}).value();
    Tensor v = b.Allocate(DType::kBF16, {pages, kPageSize, kHkv, kD}).value();
    STRATA_ASSERT_OK(b.FillRandom(k, 1, 1.0f));
    STRATA_ASSERT_OK(b.FillRandom(v, 2, 1.0f));
    std::vector<int32_t> table(int64_t{kSeqs} * kSeqPages), ring_pages(kSeqs * kRingPages);
    std::iota(table.begin(), table.end(), 0);
    std::iota(ring_pages.begin(), ring_pages.end(), kSeqs * kSeqPages);
    Tensor tables_dev = b.Allocate(DType::kI32, {kSeqs, kSeqPages}).value();
    STRATA_ASSERT_OK(b.CopyFromHost(table.data(), DType::kI32, table.size(), tables_dev, 0));
    std::vector<int32_t> ext(int64_t{kSeqs} * kHkv * kBlocks * 2);
    for (int s = 0; s < kSeqs; ++s)
      for (int h = 0; h < kHkv; ++h)
        for (int j = 0; j < kBlocks; ++j) {
          ext[((int64_t{s} * kHkv + h) * kBlocks + j) * 2] = j * 64;
          ext[((int64_t{s} * kHkv + h) * kBlocks + j) * 2 + 1] = 64;
        }
    Tensor extents = b.Allocate(DType::kI32, {kSeqs, kHkv, kBlocks, 2}).value();
    STRATA_ASSERT_OK(b.CopyFromHost(ext.data(), DType::kI32, ext.size(), extents, 0));
    auto filled = [&](std::vector<int64_t> shape, int value) {
      Tensor t = b.Allocate(DType::kI32, std::move(shape)).value();
      EXPECT_TRUE(b.Fill(t, static_cast<float>(value)).ok());
      return t;
    };
    const int max_pieces = kBlocks;
    engine::TierTables tables{
        filled({kSeqs, kHkv, kBlocks}, -1), filled({kSeqs, kHkv, max_pieces}, 0),
        filled({kSeqs, kHkv}, 0),           filled({kSeqs, kHkv, kBlocks}, 0),
        filled({kSeqs, kHkv, kBlocks}, 0),  filled({kSeqs, kHkv}, 0)};
    engine::TierRing ring;
    ring.ring_rows = kRing;
    ring.ring_pages = b.Allocate(DType::kI32, {kSeqs, kRingPages}).value();
    STRATA_ASSERT_OK(
        b.CopyFromHost(ring_pages.data(), DType::kI32, ring_pages.size(), ring.ring_pages, 0));
    ring.status = filled({kSeqs}, 0);
    ring.stats = filled({engine::kKvTierStats}, 0);
    const int64_t units = engine::KvPieceUnitsBound(codec, kD, DType::kBF16, kTokens, kBlocks);
    ring.host = b.AllocateHost(kSeqs * kHkv * units * engine::kKvHostUnit).value();
    for (int s = 0; s < kSeqs; ++s) {
      engine::SequenceRange range{tables_dev.Row(s), kPageSize, 0, kTokens};
      engine::TierTables t{tables.piece_base.Row(s),  tables.piece_host.Row(s),
                           tables.piece_count.Row(s), tables.res_start.Row(s),
                           tables.res_count.Row(s),   tables.ring_head.Row(s)};
      STRATA_ASSERT_OK(b.OffloadBlocks(k, v, range, extents.Row(s), 0, kBlocks, 1, codec, ring.host,
                                       int64_t{s} * kHkv * units, units, t));
    }
    STRATA_ASSERT_OK(b.Synchronize());
    // Plans: entry s selects clusters [16 i, 16 i + 16) at step i.
    engine::SparsePlan plan;
    plan.num_entries = kSeqs;
    plan.max_blocks = kBlocks;
    plan.max_keys = kBudget + 1;
    for (int s = 0; s < kSeqs; ++s) {
      const std::vector<int32_t> e = {s, s, s, kBlocks, kBudget, 0, kTokens, kTokens + 1};
      plan.host_entries.insert(plan.host_entries.end(), e.begin(), e.end());
    }
    plan.entries = b.Allocate(DType::kI32, {kSeqs, engine::kSparsePlanFields}).value();
    STRATA_ASSERT_OK(b.CopyFromHost(plan.host_entries.data(), DType::kI32, plan.host_entries.size(),
                                    plan.entries, 0));
    plan.key_index = b.Allocate(DType::kI32, {kSeqs, kHkv, plan.max_keys}).value();
    plan.key_count = filled({kSeqs, kHkv}, kBudget + 1);
    engine::AttentionBatch batch;
    constexpr int kSteps = 12;
    double recall_ms = 0;
    int64_t bytes = 0;
    for (int step = 0; step < kSteps + 2; ++step) {
      std::vector<int32_t> keys(int64_t{kSeqs} * kHkv * plan.max_keys);
      for (int64_t list = 0; list < int64_t{kSeqs} * kHkv; ++list) {
        for (int j = 0; j < kBudget; ++j) {
          keys[list * plan.max_keys + j] = ((step * kSelect) % kBlocks) * 64 + j;
        }
        keys[list * plan.max_keys + kBudget] = kTokens;
      }
      STRATA_ASSERT_OK(b.CopyFromHost(keys.data(), DType::kI32, keys.size(), plan.key_index, 0));
      STRATA_ASSERT_OK(b.Fill(ring.stats, 0));
      STRATA_ASSERT_OK(b.Synchronize());
      const auto start = std::chrono::steady_clock::now();
      STRATA_ASSERT_OK(b.RecallBlocks(k, v, batch, plan, extents, tables, ring));
      STRATA_ASSERT_OK(b.Synchronize());
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      std::vector<int32_t> stats(engine::kKvTierStats);
      STRATA_ASSERT_OK(b.CopyToHost(ring.stats, stats.data()));
      ASSERT_EQ(stats[engine::kStatRecalledTokens], kSeqs * kHkv * kBudget) << "all misses";
      if (step >= 2) {  // the first steps warm up
        recall_ms += ms;
        bytes += int64_t{stats[engine::kStatRecalledKiB]} * 1024;
      }
    }
    // cudaMemcpyAsync of the same bytes per step from pinned memory.
    const int64_t step_bytes = bytes / kSteps;
    void* device = nullptr;
    ASSERT_EQ(cudaMalloc(&device, step_bytes), cudaSuccess);
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    double copy_ms = 0;
    for (int step = 0; step < kSteps + 2; ++step) {
      const auto start = std::chrono::steady_clock::now();
      ASSERT_EQ(
          cudaMemcpyAsync(device, ring.host.data(), step_bytes, cudaMemcpyHostToDevice, stream),
          cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      if (step >= 2) {
        copy_ms +=
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count();
      }
    }
    cudaFree(device);
    cudaStreamDestroy(stream);
    // The copy engines, host-driven: one row per recalled piece (the same
    // bytes in pieces of the same size).
    const int64_t pieces_per_step = int64_t{kSeqs} * kHkv * kSelect;
    const int64_t piece_bytes = step_bytes / pieces_per_step / 16 * 16;
    Tensor scratch = b.Allocate(DType::kI32, {pieces_per_step, piece_bytes / 4}).value();
    std::vector<engine::RowCopy> rows;
    for (int64_t i = 0; i < pieces_per_step; ++i) {
      rows.push_back({0, i, ((i * 7919) % pieces_per_step) * piece_bytes});  // scattered reads
    }
    double dma_ms = 0;
    for (int step = 0; step < kSteps + 2; ++step) {
      const auto start = std::chrono::steady_clock::now();
      STRATA_ASSERT_OK_AND_ASSIGN(engine::CopyFence fence,
                                  b.CopyRowsFromHost(ring.host, rows, {&scratch, 1}));
      STRATA_ASSERT_OK(b.WaitFence(fence));
      if (step >= 2) {
        dma_ms +=
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count();
      }
    }
    const double dma_gbs =
        static_cast<double>(piece_bytes * pieces_per_step * kSteps) / (dma_ms * 1e6);
    std::printf("copy_engine_pieces codec=%s pieces=%lld of %lld B: %.3f ms (%.1f GB/s)\n",
                std::string(engine::KvCodecKindName(codec)).c_str(),
                static_cast<long long>(pieces_per_step), static_cast<long long>(piece_bytes),
                dma_ms / kSteps, dma_gbs);
    const double recall_gbs = static_cast<double>(bytes) / (recall_ms * 1e6);
    const double copy_gbs = static_cast<double>(bytes) / (copy_ms * 1e6);
    std::printf(
        "recall_bandwidth codec=%s bytes_per_step=%.1fMiB recall=%.3fms (%.1f GB/s) "
        "memcpy=%.3fms (%.1f GB/s) ratio=%.3f\n",
        std::string(engine::KvCodecKindName(codec)).c_str(), step_bytes / 1048576.0,
        recall_ms / kSteps, recall_gbs, copy_ms / kSteps, copy_gbs, recall_gbs / copy_gbs);
  }
}

}  // namespace
}  // namespace strata::cuda

// KV policies: their bookkeeping rules, the CPU reference of the sparse
// operators, and whole models decoding through KvPolicyRunner (a budget that
// covers the context gives exactly the dense tokens; a small one attends to
// sinks + selection + tail only).
#include "kvtier/kv_policy.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace strata::kvtier {
namespace {

using engine::Tensor;
using ::testing::ElementsAre;

KvPolicyConfig Config(const std::string& type, int budget, int sinks, int window) {
  KvPolicyConfig c;
  c.type = type;
  c.budget_tokens = budget;
  c.sink_tokens = sinks;
  c.window_tokens = window;
  c.full_layers = 0;
  return c;
}

TEST(KvPolicyTest, ClusterKvClustersThePromptThenEachWindow) {
  KvPolicyConfig c = Config("clusterkv", 100, 4, 8);
  c.tokens_per_cluster = 10;
  auto policy = KvPolicy::Create(c);
  ASSERT_TRUE(policy.ok()) << policy.status();
  SequenceState s;
  std::vector<SummaryWork> work;
  (*policy)->Advance(60, s, work);  // 59 cached + the query
  ASSERT_EQ(work.size(), 1u);
  EXPECT_EQ(work[0].begin, 4);
  EXPECT_EQ(work[0].count, 48);    // up to the last window
  EXPECT_EQ(work[0].clusters, 5);  // ceil(48 / 10)
  EXPECT_EQ(s.num_blocks, 5);
  EXPECT_EQ(s.sink_end, 4);
  EXPECT_EQ(s.tail_begin, 52);
  work.clear();
  (*policy)->Advance(67, s, work);  // tail of 15 < 2 windows
  EXPECT_TRUE(work.empty());
  (*policy)->Advance(68, s, work);  // tail of 16: its oldest window becomes 8 clusters
  ASSERT_EQ(work.size(), 1u);
  EXPECT_EQ(work[0].begin, 52);
  EXPECT_EQ(work[0].count, 8);
  EXPECT_EQ(work[0].clusters, 8);
  EXPECT_EQ(work[0].first_block, 5);
  EXPECT_EQ(s.num_blocks, 13);
  EXPECT_EQ(s.tail_begin, 60);
  EXPECT_LE(13, (*policy)->MaxBlocks(68));
}

TEST(KvPolicyTest, ClusterKvClustersThePromptInChunksOfAlignedPositions) {
  KvPolicyConfig c = Config("clusterkv", 100, 4, 8);
  c.tokens_per_cluster = 10;
  c.cluster_chunk_tokens = 20;
  auto policy = KvPolicy::Create(c);
  ASSERT_TRUE(policy.ok()) << policy.status();
  // The span [4, 70): chunks [4, 20), [20, 40), [40, 60), [60, 70).
  SequenceState s;
  std::vector<SummaryWork> work;
  (*policy)->Advance(78, s, work);
  ASSERT_EQ(work.size(), 4u);
  const std::vector<std::array<int, 4>> want = {
      {4, 16, 2, 0}, {20, 20, 2, 2}, {40, 20, 2, 4}, {60, 10, 1, 6}};
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(work[i].begin, want[i][0]);
    EXPECT_EQ(work[i].count, want[i][1]);
    EXPECT_EQ(work[i].clusters, want[i][2]);
    EXPECT_EQ(work[i].first_block, want[i][3]);
  }
  EXPECT_EQ(s.num_blocks, 7);
  EXPECT_EQ(s.tail_begin, 70);
  EXPECT_LE(s.num_blocks, (*policy)->MaxBlocks(78));
  // A shorter prompt with the same start clusters its first chunks alike;
  // a last piece shorter than a cluster joins the chunk before it.
  SequenceState longer;
  std::vector<SummaryWork> more;
  (*policy)->Advance(71, longer, more);  // span [4, 63)
  ASSERT_EQ(more.size(), 3u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(more[i].begin, work[i].begin);
    EXPECT_EQ(more[i].count, work[i].count);
    EXPECT_EQ(more[i].first_block, work[i].first_block);
  }
  EXPECT_EQ(more[2].begin, 40);
  EXPECT_EQ(more[2].count, 23);
  // The chunk must hold whole clusters.
  c.cluster_chunk_tokens = 25;
  EXPECT_THAT(KvPolicy::Create(c).status().message(),
              ::testing::HasSubstr(
                  "cluster_chunk_tokens: 25 is not a multiple of tokens_per_cluster (10)"));
}

TEST(KvPolicyTest, ClusterKvWaitsForAFullCluster) {
  KvPolicyConfig c = Config("clusterkv", 100, 4, 8);
  c.tokens_per_cluster = 10;
  auto policy = KvPolicy::Create(c);
  ASSERT_TRUE(policy.ok());
  SequenceState s;
  std::vector<SummaryWork> work;
  (*policy)->Advance(19, s, work);  // 7 tokens between sinks and window
  EXPECT_TRUE(work.empty());
  EXPECT_EQ(s.num_blocks, 0);
  EXPECT_EQ(s.tail_begin, 4);  // everything after the sinks is attended
}

TEST(KvPolicyTest, QuestSummarisesWholePagesBeforeTheWindow) {
  KvPolicyConfig c = Config("quest", 100, 4, 8);
  c.quest_page_tokens = 4;
  auto policy = KvPolicy::Create(c);
  ASSERT_TRUE(policy.ok());
  SequenceState s;
  std::vector<SummaryWork> work;
  (*policy)->Advance(30, s, work);
  ASSERT_EQ(work.size(), 1u);
  EXPECT_EQ(work[0].kind, SummaryWork::kKeyBounds);
  EXPECT_EQ(work[0].begin, 4);
  EXPECT_EQ(work[0].count, 16);
  EXPECT_EQ(s.tail_begin, 20);
  work.clear();
  (*policy)->Advance(31, s, work);
  EXPECT_TRUE(work.empty());
  (*policy)->Advance(32, s, work);
  ASSERT_EQ(work.size(), 1u);
  EXPECT_EQ(work[0].begin, 20);
  EXPECT_EQ(work[0].first_block, 4);
  EXPECT_EQ(s.tail_begin, 24);
}

TEST(KvPolicyTest, StreamingSpendsTheBudgetOnTheWindow) {
  auto policy = KvPolicy::Create(Config("streaming", 10, 4, 8));
  ASSERT_TRUE(policy.ok());
  SequenceState s;
  std::vector<SummaryWork> work;
  (*policy)->Advance(100, s, work);
  EXPECT_EQ(s.sink_end, 4);
  EXPECT_EQ(s.tail_begin, 82);
  EXPECT_EQ((*policy)->Budget(), 0);
  (*policy)->Advance(3, s, work);  // shorter than sinks + window: everything
  EXPECT_EQ(s.sink_end, 2);
  EXPECT_EQ(s.tail_begin, 2);
}

TEST(KvPolicyTest, RejectsUnknownTypesAndBadParameters) {
  EXPECT_EQ(KvPolicy::Create(Config("h2o", 1, 1, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  KvPolicyConfig c = Config("clusterkv", 1, 1, 1);
  c.tokens_per_cluster = 0;
  EXPECT_EQ(KvPolicy::Create(c).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- The sparse operators of the CPU backend ---------------------------------

class SparseOpsTest : public ::testing::Test {
 protected:
  static constexpr int kPages = 12, kPageSize = 4, kHkv = 2, kD = 8;
  void SetUp() override {
    backend_ = engine::CreateCpuBackend(2);
    k_ = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
    v_ = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
    ASSERT_TRUE(backend_->FillRandom(k_, 1, 1.0f).ok());
    ASSERT_TRUE(backend_->FillRandom(v_, 2, 1.0f).ok());
    // A sequence over scattered pages.
    table_ = *backend_->Allocate(engine::DType::kI32, {8});
    const std::vector<int32_t> pages = {7, 2, 9, 0, 11, 4, 5, 1};
    ASSERT_TRUE(backend_->CopyFromHost(pages.data(), engine::DType::kI32, 8, table_, 0).ok());
  }
  float* Row(Tensor& cache, int index, int h) {
    const int32_t page = table_.data_as<int32_t>()[index / kPageSize];
    return cache.data_as<float>() +
           ((int64_t{page} * kPageSize + index % kPageSize) * kHkv + h) * kD;
  }
  std::unique_ptr<engine::Backend> backend_;
  Tensor k_, v_, table_;
};

TEST_F(SparseOpsTest, ClusterKeysReordersEachHeadClusterMajor) {
  // Head 0: two directions alternating; head 1 random.
  for (int i = 3; i < 29; ++i) {
    for (int x = 0; x < kD; ++x) Row(k_, i, 0)[x] = (x == (i % 2)) ? 1.0f + 0.01f * i : 0.0f;
  }
  std::map<std::vector<float>, std::vector<float>> before[kHkv];  // key row -> value row
  for (int h = 0; h < kHkv; ++h) {
    for (int i = 3; i < 29; ++i) {
      before[h][std::vector<float>(Row(k_, i, h), Row(k_, i, h) + kD)] =
          std::vector<float>(Row(v_, i, h), Row(v_, i, h) + kD);
    }
  }
  Tensor centroids = *backend_->Allocate(engine::DType::kF32, {kHkv, 6, kD});
  Tensor extents = *backend_->Allocate(engine::DType::kI32, {kHkv, 6, 2});
  engine::SequenceRange range{table_, kPageSize, 3, 26};
  ASSERT_TRUE(backend_
                  ->ClusterKeys(k_, v_, range, 2, 10, 1, centroids, extents, nullptr,
                                engine::ClusterRows::kReorder)
                  .ok());
  const int32_t* ext = extents.data_as<int32_t>();
  // Head 0: the even positions (direction 0, seed key 3 is odd -> cluster 0
  // is direction 1) form one run, the odd ones the other.
  EXPECT_EQ(ext[(0 * 6 + 1) * 2], 3);
  EXPECT_EQ(ext[(0 * 6 + 1) * 2 + 1], 13);
  EXPECT_EQ(ext[(0 * 6 + 2) * 2], 16);
  EXPECT_EQ(ext[(0 * 6 + 2) * 2 + 1], 13);
  for (int i = 3; i < 16; ++i) EXPECT_GT(Row(k_, i, 0)[1], 0.5f) << i;
  for (int i = 16; i < 29; ++i) EXPECT_GT(Row(k_, i, 0)[0], 0.5f) << i;
  // Within a cluster the original order is kept (the magnitudes grow).
  for (int i = 4; i < 16; ++i) EXPECT_GT(Row(k_, i, 0)[1], Row(k_, i - 1, 0)[1]);
  // Centroid = the raw mean: (1 + 0.01 * mean of 3, 5, ..., 27) on dim 1.
  EXPECT_NEAR(centroids.data_as<float>()[(0 * 6 + 1) * kD + 1], 1.15f, 1e-5);
  for (int h = 0; h < kHkv; ++h) {
    // Extents partition the range; K and V rows moved together.
    EXPECT_EQ(ext[(h * 6 + 1) * 2] + ext[(h * 6 + 1) * 2 + 1], ext[(h * 6 + 2) * 2]);
    EXPECT_EQ(ext[(h * 6 + 2) * 2] + ext[(h * 6 + 2) * 2 + 1], 29);
    for (int i = 3; i < 29; ++i) {
      auto it = before[h].find(std::vector<float>(Row(k_, i, h), Row(k_, i, h) + kD));
      ASSERT_NE(it, before[h].end()) << "head " << h << " index " << i;
      EXPECT_EQ(it->second, std::vector<float>(Row(v_, i, h), Row(v_, i, h) + kD));
    }
  }
}

TEST_F(SparseOpsTest, ReorderKeysRedoesAClusteringFromItsOrder) {
  // The same keys twice: one copy clustered (its order kept), the other
  // reordered from that order alone; both caches end alike, byte for byte.
  Tensor k2 = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
  Tensor v2 = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
  std::memcpy(k2.data(), k_.data(), k_.nbytes());
  std::memcpy(v2.data(), v_.data(), v_.nbytes());
  Tensor centroids = *backend_->Allocate(engine::DType::kF32, {kHkv, 4, kD});
  Tensor extents = *backend_->Allocate(engine::DType::kI32, {kHkv, 4, 2});
  Tensor order = *backend_->Allocate(engine::DType::kI32, {kHkv, 26});
  engine::SequenceRange range{table_, kPageSize, 3, 26};
  ASSERT_TRUE(backend_
                  ->ClusterKeys(k_, v_, range, 3, 10, 0, centroids, extents, &order,
                                engine::ClusterRows::kReorder)
                  .ok());
  bool moved = false;
  for (int i = 0; i < 26; ++i) moved |= order.data_as<int32_t>()[i] != i;
  EXPECT_TRUE(moved) << "random keys: the clustering moves some";
  ASSERT_TRUE(backend_->ReorderKeys(k2, v2, range, order).ok());
  EXPECT_EQ(std::memcmp(k2.data(), k_.data(), k_.nbytes()), 0);
  EXPECT_EQ(std::memcmp(v2.data(), v_.data(), v_.nbytes()), 0);
  // An order that is not a permutation is refused before any row moves.
  std::memcpy(k2.data(), k_.data(), k_.nbytes());
  order.data_as<int32_t>()[26 + 5] = order.data_as<int32_t>()[26 + 6];  // head 1: a repeat
  const absl::Status repeated = backend_->ReorderKeys(k2, v2, range, order);
  EXPECT_EQ(repeated.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(repeated.message().find("head 1"), std::string::npos) << repeated;
  EXPECT_EQ(std::memcmp(k2.data(), k_.data(), k_.nbytes()), 0);
  order.data_as<int32_t>()[26 + 5] = 26;  // out of range
  EXPECT_EQ(backend_->ReorderKeys(k2, v2, range, order).code(), absl::StatusCode::kInvalidArgument);
  Tensor short_order = *backend_->Allocate(engine::DType::kI32, {kHkv, 25});
  EXPECT_EQ(backend_->ReorderKeys(k2, v2, range, short_order).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SparseOpsTest, ClusteringThatLeavesTheRowsReturnsTheOrderItWouldApply) {
  // A prefill worker clusters its export's keys so: the cache keeps its
  // bytes, and the order, centroids and extents are those of the in-place
  // clustering of the same keys.
  Tensor k2 = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
  Tensor v2 = *backend_->Allocate(engine::DType::kF32, {kPages, kPageSize, kHkv, kD});
  std::memcpy(k2.data(), k_.data(), k_.nbytes());
  std::memcpy(v2.data(), v_.data(), v_.nbytes());
  Tensor centroids[2], extents[2], order[2];
  for (int i = 0; i < 2; ++i) {
    centroids[i] = *backend_->Allocate(engine::DType::kF32, {kHkv, 4, kD});
    extents[i] = *backend_->Allocate(engine::DType::kI32, {kHkv, 4, 2});
    order[i] = *backend_->Allocate(engine::DType::kI32, {kHkv, 26});
    ASSERT_TRUE(backend_->Fill(centroids[i], 0.0f).ok());  // the block past the clusters
    ASSERT_TRUE(backend_->Fill(extents[i], 0).ok());
  }
  engine::SequenceRange range{table_, kPageSize, 3, 26};
  ASSERT_TRUE(backend_
                  ->ClusterKeys(k2, v2, range, 3, 10, 0, centroids[0], extents[0], &order[0],
                                engine::ClusterRows::kLeave)
                  .ok());
  EXPECT_EQ(std::memcmp(k2.data(), k_.data(), k_.nbytes()), 0) << "the K rows moved";
  EXPECT_EQ(std::memcmp(v2.data(), v_.data(), v_.nbytes()), 0) << "the V rows moved";
  ASSERT_TRUE(backend_
                  ->ClusterKeys(k_, v_, range, 3, 10, 0, centroids[1], extents[1], &order[1],
                                engine::ClusterRows::kReorder)
                  .ok());
  EXPECT_NE(std::memcmp(k2.data(), k_.data(), k_.nbytes()), 0) << "random keys: some move";
  for (Tensor* t : {order, centroids, extents}) {
    EXPECT_EQ(std::memcmp(t[0].data(), t[1].data(), t[0].nbytes()), 0);
  }
  // Redoing the returned order gives the in-place clustering's cache.
  ASSERT_TRUE(backend_->ReorderKeys(k2, v2, range, order[0]).ok());
  EXPECT_EQ(std::memcmp(k2.data(), k_.data(), k_.nbytes()), 0);
  EXPECT_EQ(std::memcmp(v2.data(), v_.data(), v_.nbytes()), 0);
  // There is nothing to return the clustering in without an order.
  EXPECT_EQ(backend_
                ->ClusterKeys(k2, v2, range, 3, 10, 0, centroids[0], extents[0], nullptr,
                              engine::ClusterRows::kLeave)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SparseOpsTest, KeyBoundsAreChannelMinMax) {
  Tensor lo = *backend_->Allocate(engine::DType::kF32, {kHkv, 4, kD});
  Tensor hi = *backend_->Allocate(engine::DType::kF32, {kHkv, 4, kD});
  Tensor extents = *backend_->Allocate(engine::DType::kI32, {kHkv, 4, 2});
  engine::SequenceRange range{table_, kPageSize, 2, 10};
  ASSERT_TRUE(backend_->KeyBounds(k_, range, 5, 1, lo, hi, extents).ok());
  for (int h = 0; h < kHkv; ++h) {
    for (int b = 0; b < 2; ++b) {
      for (int x = 0; x < kD; ++x) {
        float mn = 1e9f, mx = -1e9f;
        for (int i = 2 + 5 * b; i < 7 + 5 * b; ++i) {
          mn = std::min(mn, Row(k_, i, h)[x]);
          mx = std::max(mx, Row(k_, i, h)[x]);
        }
        EXPECT_EQ(lo.data_as<float>()[(h * 4 + 1 + b) * kD + x], mn);
        EXPECT_EQ(hi.data_as<float>()[(h * 4 + 1 + b) * kD + x], mx);
      }
      EXPECT_EQ(extents.data_as<int32_t>()[(h * 4 + 1 + b) * 2], 2 + 5 * b);
    }
  }
  EXPECT_FALSE(backend_->KeyBounds(k_, {table_, kPageSize, 2, 9}, 5, 1, lo, hi, extents).ok());
}

TEST_F(SparseOpsTest, SelectTokensTakesBlocksByScoreUpToTheBudget) {
  engine::SparsePlan plan;
  plan.num_entries = 1;
  plan.max_blocks = 4;
  plan.max_keys = 32;
  plan.host_entries = {0, 0, 0, 3, 7, 2, 20, 23};  // budget 7, sinks [0,2), tail [20,23)
  plan.key_index = *backend_->Allocate(engine::DType::kI32, {1, kHkv, 32});
  plan.key_count = *backend_->Allocate(engine::DType::kI32, {1, kHkv});
  Tensor scores = *backend_->Allocate(engine::DType::kF32, {1, kHkv, 4});
  Tensor extents = *backend_->Allocate(engine::DType::kI32, {1, kHkv, 4, 2});
  const std::vector<float> sc = {0.5f, 2.0f, 1.0f, 9.0f, /*head 1*/ 3.0f, 3.0f, 1.0f, 9.0f};
  const std::vector<int32_t> ext = {2, 6, 8, 4, 12, 8, 0, 0, /*head 1*/ 2, 6, 8, 4, 12, 8, 0, 0};
  std::copy(sc.begin(), sc.end(), scores.data_as<float>());
  std::copy(ext.begin(), ext.end(), extents.data_as<int32_t>());
  ASSERT_TRUE(backend_->SelectTokens(scores, extents, plan).ok());
  const int32_t* idx = plan.key_index.data_as<int32_t>();
  // Head 0: block 1 (4 tokens), then block 2 truncated to 3 (block 3 is
  // beyond num_blocks).
  EXPECT_EQ(plan.key_count.data_as<int32_t>()[0], 2 + 7 + 3);
  EXPECT_THAT(std::vector<int32_t>(idx, idx + 12),
              ElementsAre(0, 1, 8, 9, 10, 11, 12, 13, 14, 20, 21, 22));
  // Head 1: the tie goes to the lower block (0, 6 tokens), then 1 token of block 1.
  EXPECT_THAT(std::vector<int32_t>(idx + 32, idx + 44),
              ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22));
}

TEST_F(SparseOpsTest, SparseAttentionOverEveryKeyEqualsDenseDecode) {
  const engine::QkvLayout layout{4, kHkv, kD};
  Tensor qkv = *backend_->Allocate(engine::DType::kF32, {1, layout.row_width()});
  ASSERT_TRUE(backend_->FillRandom(qkv, 3, 1.0f).ok());
  engine::AttentionBatch batch;
  batch.num_seqs = 1;
  batch.max_blocks_per_seq = 8;
  batch.page_size = kPageSize;
  batch.max_query_len = 1;
  batch.max_context_len = 30;
  batch.host_query_start = {0, 1};
  batch.host_context_len = {30};
  batch.block_table = table_;
  Tensor dense = *backend_->Allocate(engine::DType::kF32, {1, 4 * kD});
  Tensor sparse = *backend_->Allocate(engine::DType::kF32, {1, 4 * kD});
  ASSERT_TRUE(backend_->Attention(qkv, layout, k_, v_, batch, 0.35f, 0, dense).ok());
  engine::SparsePlan plan;
  plan.num_entries = 1;
  plan.max_keys = 30;
  plan.host_entries = {0, 0, 0, 0, 0, 0, 0, 30};
  plan.key_index = *backend_->Allocate(engine::DType::kI32, {1, kHkv, 30});
  plan.key_count = *backend_->Allocate(engine::DType::kI32, {1, kHkv});
  for (int h = 0; h < kHkv; ++h) {
    // Every key, in a scrambled order.
    std::vector<int32_t> keys(30);
    std::iota(keys.begin(), keys.end(), 0);
    std::shuffle(keys.begin(), keys.end(), std::mt19937(h));
    std::copy(keys.begin(), keys.end(), plan.key_index.data_as<int32_t>() + h * 30);
    plan.key_count.data_as<int32_t>()[h] = 30;
  }
  ASSERT_TRUE(backend_->SparseAttention(qkv, layout, k_, v_, batch, plan, 0.35f, sparse).ok());
  for (int i = 0; i < 4 * kD; ++i) {
    EXPECT_NEAR(sparse.data_as<float>()[i], dense.data_as<float>()[i], 1e-5) << i;
  }
}

// ---- Whole models ---------------------------------------------------------------

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

std::unique_ptr<engine::Model> LoadGolden(const std::string& name) {
  engine::ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 256;
  options.max_batch_tokens = 96;
  options.page_size = 8;
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

// Generates for three concurrent requests (policy `policy` each).
std::map<uint64_t, std::vector<int32_t>> Generate(engine::Model* model, int policy = 0) {
  engine::Batcher batcher(model, nullptr);
  const int lens[] = {150, 97, 180};
  for (int i = 0; i < 3; ++i) {
    engine::GenerationRequest r;
    r.id = i;
    r.prompt = Prompt(lens[i], 7 + i);
    r.max_tokens = 40;
    r.ignore_eos = true;
    r.kv_policy = policy;
    EXPECT_TRUE(batcher.Add(r).ok());
  }
  std::map<uint64_t, std::vector<int32_t>> out;
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) out[e.request_id].push_back(e.token_id);
  }
  return out;
}

// "clusterkv_chunked": ClusterKV clustering the prompt in 32-token chunks.
class PolicyModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  KvPolicyConfig ParamConfig(int budget) const {
    const bool chunked = GetParam() == "clusterkv_chunked";
    KvPolicyConfig c = Config(chunked ? "clusterkv" : GetParam(), budget, 4, 16);
    c.tokens_per_cluster = 8;
    c.quest_page_tokens = 8;
    if (chunked) c.cluster_chunk_tokens = 32;
    return c;
  }
};

TEST_P(PolicyModelTest, ABudgetCoveringTheContextGivesTheDenseTokens) {
  auto model = LoadGolden("llama_gqa");
  const auto dense = Generate(model.get());
  auto runner = KvPolicyRunner::Create(model.get(), {ParamConfig(4096)});
  ASSERT_TRUE(runner.ok()) << runner.status();
  ASSERT_TRUE(model->set_attention_planner(runner->get()).ok());
  const auto sparse = Generate(model.get());
  ASSERT_TRUE(model->set_attention_planner(nullptr).ok());
  EXPECT_EQ(sparse, dense);
  EXPECT_GT((*runner)->stats().sparse_queries, 0);
  EXPECT_EQ((*runner)->num_free_slots(), 8);  // every sequence released
  if (GetParam() == "clusterkv") EXPECT_GT((*runner)->stats().clusterings, 0);
  if (GetParam() == "clusterkv_chunked") {
    // The prompts' spans after the sinks and before the window, [4, 82),
    // [4, 135) and [4, 165), in 3, 4 and 5 chunks, in every layer.
    EXPECT_GE((*runner)->stats().clusterings, (3 + 4 + 5) * model->config().num_layers);
  }
}

TEST_P(PolicyModelTest, ASmallBudgetAttendsToSinksSelectionAndTail) {
  auto model = LoadGolden("llama_gqa");
  auto runner = KvPolicyRunner::Create(model.get(), {ParamConfig(24)},
                                       {.max_sparse_seqs = 4, .track_selection = true});
  ASSERT_TRUE(runner.ok()) << runner.status();
  int64_t checked = 0;
  (*runner)->set_observer([&](int, const Tensor&, const Tensor&, const Tensor&,
                              const engine::AttentionBatch&, const engine::SparsePlan& plan) {
    for (int i = 0; i < plan.num_entries; ++i) {
      const int ctx = plan.host(i, engine::kPlanContextLen);
      const int tail = ctx - plan.host(i, engine::kPlanTailBegin);
      for (int h = 0; h < 2; ++h) {
        const int n = plan.key_count.data_as<int32_t>()[i * 2 + h];
        // streaming spends the budget in its tail
        EXPECT_LE(n, 4 + 24 + tail);
        EXPECT_LT(n, ctx);
        const int32_t* keys = plan.key_index.data_as<int32_t>() + (i * 2 + h) * plan.max_keys;
        std::vector<int32_t> sorted(keys, keys + n);
        std::sort(sorted.begin(), sorted.end());
        EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "duplicates";
        EXPECT_EQ(sorted.back(), ctx - 1);  // the query's own key
        ++checked;
      }
    }
    return absl::OkStatus();
  });
  ASSERT_TRUE(model->set_attention_planner(runner->get()).ok());
  const auto out = Generate(model.get());
  ASSERT_TRUE(model->set_attention_planner(nullptr).ok());
  EXPECT_GT(checked, 0);
  for (const auto& [id, tokens] : out) EXPECT_EQ(tokens.size(), 40u) << id;
  if (GetParam() != "streaming") {
    const auto& s = (*runner)->stats();
    EXPECT_GT(s.selected_tokens, 0);
    EXPECT_LE(s.reselected_tokens, s.selected_tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, PolicyModelTest,
                         ::testing::Values("clusterkv", "clusterkv_chunked", "quest", "streaming"));

TEST(KvPolicyRunnerTest, SequencesBeyondTheSlotsDecodeDensely) {
  auto model = LoadGolden("llama_gqa");
  const auto dense = Generate(model.get());
  KvPolicyConfig c = Config("clusterkv", 4096, 4, 16);
  c.tokens_per_cluster = 8;
  auto runner = KvPolicyRunner::Create(model.get(), {c}, {.max_sparse_seqs = 1});
  ASSERT_TRUE(runner.ok());
  ASSERT_TRUE(model->set_attention_planner(runner->get()).ok());
  EXPECT_EQ(Generate(model.get()), dense);
  ASSERT_TRUE(model->set_attention_planner(nullptr).ok());
  EXPECT_GT((*runner)->stats().dense_no_slot, 0);
  EXPECT_EQ((*runner)->num_free_slots(), 1);
}

TEST(KvPolicyRunnerTest, PerRequestPoliciesAndErrors) {
  auto model = LoadGolden("llama_gqa");
  const auto dense = Generate(model.get());
  auto runner =
      KvPolicyRunner::Create(model.get(), {Config("full", 0, 0, 0), Config("quest", 4096, 4, 16)});
  ASSERT_TRUE(runner.ok());
  ASSERT_TRUE(model->set_attention_planner(runner->get()).ok());
  EXPECT_EQ(Generate(model.get(), 0), dense);
  EXPECT_EQ((*runner)->stats().sparse_queries, 0);
  EXPECT_EQ(Generate(model.get(), 1), dense);
  EXPECT_GT((*runner)->stats().sparse_queries, 0);
  // An unconfigured policy index fails the step with a clear error.
  engine::Batcher batcher(model.get(), nullptr);
  engine::GenerationRequest r;
  r.id = 1;
  r.prompt = Prompt(10, 1);
  r.kv_policy = 5;
  ASSERT_TRUE(batcher.Add(r).ok());
  absl::Status failed;
  while (batcher.HasWork() && failed.ok()) failed = batcher.Step().status();
  EXPECT_THAT(std::string(failed.message()), ::testing::HasSubstr("kv policy 5 is not configured"));
  ASSERT_TRUE(model->set_attention_planner(nullptr).ok());

  auto mistral = LoadGolden("mistral_window");
  EXPECT_EQ(KvPolicyRunner::Create(mistral.get(), {Config("clusterkv", 10, 1, 1)}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata::kvtier

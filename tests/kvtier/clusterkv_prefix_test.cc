// Prefix reuse under a KV policy that reorders the cache (ClusterKV
// clusters a sequence's keys in place at its first decode step): the
// prompt's KV is stored when its prefill completes, before the reorder, so
// a later request with the same document loads it and computes only its
// own tokens; its greedy tokens are those of a run that computed it all.
// Also with two page groups, the clusters homed in host memory and their
// upper pages freed. With a ClusteringStore and the prompt clustered in
// chunks, a chunk's clustering computed on pages the request loaded or
// stored is kept, and the next request that loads those pages redoes it
// from the store instead of running the k-means, with the same tokens.
#include <map>
#include <random>
#include <vector>

#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gtest/gtest.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

std::vector<int32_t> Tokens(int len, uint32_t seed) {
  return testing_util::RandomPrompt(len, seed);
}

KvPolicyConfig ClusterKv() { return testing_util::SmallClusterKv(); }

struct Completion {
  std::vector<int32_t> tokens;
  int cached = 0;
};

// llama_gqa with a ClusterKv() runner over a block manager whose host tier
// stores prefixes (when `store`); with `two_groups` the layers from 1 on
// have their own pages and the clusters are homed in host memory.
class Server {
 public:
  // `reuse`: a ClusteringStore, and the prompt clustered in chunks of 32.
  Server(bool store, bool two_groups, bool reuse = false) {
    engine::ModelOptions options;
    options.max_seqs = 4;
    options.max_context = 320;
    options.max_batch_tokens = 96;
    options.page_size = 8;
    options.num_pages = 120;
    options.num_upper_pages = two_groups ? 120 : 0;
    options.upper_first_layer = 1;
    auto l = engine::LoadModel({testing_util::FixturePath("models/llama_gqa"), ""}, g_backend.get(),
                               options);
    EXPECT_TRUE(l.ok()) << l.status();
    loaded_ = std::move(*l);
    auto m = KvBlockManager::Create(model(), {.host_bytes = int64_t{64} << 20,
                                              .prefix_bytes = store ? int64_t{16} << 20 : 0,
                                              .prefix_space = "llama_gqa/f32"});
    EXPECT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
    KvTierOptions tier;
    if (two_groups) tier.manager = manager_.get();
    KvPolicyConfig policy = ClusterKv();
    if (reuse) {
      policy.cluster_chunk_tokens = 32;
      clusterings_ = std::make_unique<ClusteringStore>(int64_t{8} << 20);
    }
    auto r = KvPolicyRunner::Create(
        model(), {policy}, {.max_sparse_seqs = 4, .tier = tier, .clusterings = clusterings_.get()});
    EXPECT_TRUE(r.ok()) << r.status();
    runner_ = std::move(*r);
    EXPECT_TRUE(model()->set_attention_planner(runner_.get()).ok());
    batcher_ = std::make_unique<engine::Batcher>(model(), nullptr, engine::BatcherOptions{},
                                                 manager_.get());
  }
  ~Server() {
    batcher_.reset();
    EXPECT_TRUE(model()->set_attention_planner(nullptr).ok());
  }
  engine::Model* model() { return loaded_.model.get(); }
  KvBlockManager& manager() { return *manager_; }
  const KvPolicyRunner& runner() const { return *runner_; }
  ClusteringStore& clusterings() { return *clusterings_; }

  Completion Generate(uint64_t id, std::vector<int32_t> prompt, int max_tokens = 30) {
    engine::GenerationRequest r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    EXPECT_TRUE(batcher_->Add(r).ok());
    Completion run;
    while (batcher_->HasWork()) {
      auto events = batcher_->Step();
      EXPECT_TRUE(events.ok()) << events.status();
      if (!events.ok()) break;
      for (const auto& e : *events) {
        EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
        run.tokens.push_back(e.token_id);
        if (e.finish != engine::FinishReason::kNone) run.cached = e.cached_tokens;
      }
    }
    // The stored pages are sealed (indexed) by the next poll.
    EXPECT_TRUE(manager_->Poll().ok());
    return run;
  }

 private:
  engine::LoadedModel loaded_;
  std::unique_ptr<ClusteringStore> clusterings_;
  std::unique_ptr<KvBlockManager> manager_;
  std::unique_ptr<KvPolicyRunner> runner_;
  std::unique_ptr<engine::Batcher> batcher_;
};

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

class ClusterKvPrefixTest : public ::testing::TestWithParam<bool> {};

TEST_P(ClusterKvPrefixTest, ASecondQuestionOnTheSameDocumentLoadsItAndKeepsItsTokens) {
  const bool two_groups = GetParam();
  const std::vector<int32_t> doc = Tokens(160, 3);
  const std::vector<int32_t> first = Concat(doc, Tokens(12, 4));
  const std::vector<int32_t> second = Concat(doc, Tokens(9, 5));
  Server plain(/*store=*/false, two_groups);
  const Completion want = plain.Generate(2, second);
  Server s(/*store=*/true, two_groups);
  const Completion asked = s.Generate(1, first);
  EXPECT_EQ(asked.cached, 0);
  EXPECT_GT(s.runner().stats().clusterings, 0) << "its keys were clustered (reordered)";
  const Completion again = s.Generate(2, second);
  EXPECT_EQ(again.cached, 160) << "the document's 20 whole pages";
  EXPECT_EQ(again.tokens, want.tokens);
  EXPECT_EQ(s.manager().stats().prefix_hits, 1);
  if (two_groups) {
    EXPECT_GT(s.runner().stats().offloads, 0);
  }
}

TEST_P(ClusterKvPrefixTest, AStoredClusteringIsRedoneFromTheStoreWithTheSameTokens) {
  const bool two_groups = GetParam();
  const std::vector<int32_t> doc = Tokens(160, 3);
  const std::vector<int32_t> first = Concat(doc, Tokens(12, 4));
  const std::vector<int32_t> second = Concat(doc, Tokens(9, 5));
  const std::vector<int32_t> third = Concat(doc, Tokens(9, 6));
  // What the k-means gives: a server that computes every prompt.
  Server plain(/*store=*/false, two_groups, /*reuse=*/true);
  const Completion want_second = plain.Generate(2, second);
  const int64_t kmeans_before_third = plain.runner().stats().clusterings;
  const Completion want_third = plain.Generate(3, third);
  const int64_t kmeans_third = plain.runner().stats().clusterings - kmeans_before_third;
  EXPECT_EQ(plain.runner().stats().kept_clusterings, 0) << "nothing stored, nothing kept";
  const int sparse_layers = plain.model()->config().num_layers - ClusterKv().full_layers;

  Server s(/*store=*/true, two_groups, /*reuse=*/true);
  s.Generate(1, first);  // computes the document: its pages are stored
  // Its span [4, 157) in chunks [4, 32), [32, 64), ..., [128, 157), all on
  // pages it stored: each chunk's clustering is kept, under the CRCs those
  // pages were stored with.
  EXPECT_EQ(s.runner().stats().kept_clusterings, 5);
  EXPECT_EQ(s.runner().stats().reused_clusterings, 0);
  const Completion loaded = s.Generate(2, second);
  EXPECT_EQ(loaded.cached, 160);
  EXPECT_EQ(loaded.tokens, want_second.tokens) << "the k-means' tokens";
  // Its span [4, 154): the first four chunks are the first request's,
  // redone from the store; the last, [128, 154), is its own, kept.
  EXPECT_EQ(s.runner().stats().reused_clusterings, 4 * sparse_layers);
  EXPECT_EQ(s.runner().stats().kept_clusterings, 6);
  const int64_t clusterings_before = s.runner().stats().clusterings;
  const Completion reused = s.Generate(3, third);
  EXPECT_EQ(reused.cached, 160);
  EXPECT_EQ(reused.tokens, want_third.tokens) << "the k-means' tokens";
  EXPECT_EQ(s.runner().stats().reused_clusterings, 9 * sparse_layers);
  // The prompt's chunks ran no k-means; the generated tokens' windows did.
  EXPECT_EQ(s.runner().stats().clusterings - clusterings_before, kmeans_third - 5 * sparse_layers);
  EXPECT_EQ(s.clusterings().stats().hits, 4 + 5);
  if (two_groups) {
    EXPECT_GT(s.runner().stats().offloads, 0);
  }

  // A stored clustering that no longer matches its CRC is dropped, and the
  // chunk clustered again: the same tokens.
  EXPECT_EQ(s.clusterings().FlipBitsForTesting(40), 6);
  const Completion recomputed = s.Generate(4, third);
  EXPECT_EQ(recomputed.tokens, want_third.tokens);
  EXPECT_EQ(s.clusterings().stats().lost, 5);
  EXPECT_EQ(s.runner().stats().reused_clusterings, 9 * sparse_layers) << "none more";
  EXPECT_EQ(s.runner().stats().kept_clusterings, 11) << "kept again";

  // One that passes its CRC but whose order is not a permutation is not
  // used either: byte 47 is the high byte of the first order entry (after
  // the 11-word header), which the flip puts out of range.
  EXPECT_EQ(s.clusterings().FlipBitsForTesting(47, /*keep_crc=*/true), 6);
  const Completion checked = s.Generate(5, third);
  EXPECT_EQ(checked.tokens, want_third.tokens);
  EXPECT_EQ(s.clusterings().stats().lost, 5) << "their CRCs matched";
  EXPECT_EQ(s.runner().stats().reused_clusterings, 9 * sparse_layers) << "none more";
}

TEST_P(ClusterKvPrefixTest, AClusteringKeptByARequestThatEndedAtOnceServesTheNext) {
  // The request that computes the document ends with the step that
  // clustered it (two tokens: the prompt's and one decode step), so no later
  // step of its own reads back what it kept, nor sees its pages' CRCs; the
  // steps that prefill the next request do both, before its first decode
  // step looks for them.
  const bool two_groups = GetParam();
  const std::vector<int32_t> doc = Tokens(160, 3);
  const std::vector<int32_t> question = Concat(doc, Tokens(9, 5));
  Server plain(/*store=*/false, two_groups, /*reuse=*/true);
  const Completion want = plain.Generate(3, question);
  Server s(/*store=*/true, two_groups, /*reuse=*/true);
  s.Generate(1, Concat(doc, Tokens(12, 4)), /*max_tokens=*/2);
  const Completion reused = s.Generate(3, question);
  EXPECT_EQ(reused.tokens, want.tokens);
  const int sparse_layers = s.model()->config().num_layers - ClusterKv().full_layers;
  EXPECT_EQ(s.runner().stats().reused_clusterings, 4 * sparse_layers)
      << "request 1's clusterings were there";
  EXPECT_EQ(s.runner().stats().kept_clusterings, 5 + 1) << "request 1's, and request 3's last";
}

INSTANTIATE_TEST_SUITE_P(Groups, ClusterKvPrefixTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "TwoGroupsHostHomed" : "OneGroup";
                         });

}  // namespace
}  // namespace strata::kvtier

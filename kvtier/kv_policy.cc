#include "kvtier/kv_policy.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/communicator.h"

namespace strata::kvtier {
namespace {

using engine::SparsePlan;
using engine::Tensor;

int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

class FullPolicy final : public KvPolicy {
 public:
  explicit FullPolicy(const KvPolicyConfig& c) : KvPolicy(c) {}
  PolicyKind kind() const override { return PolicyKind::kFull; }
  int MaxBlocks(int) const override { return 0; }
  int MaxKeys(int max_context) const override { return max_context; }
  void Advance(int, SequenceState&, std::vector<SummaryWork>&) const override {}
};

// Sinks + the last window + budget tokens: the budget extends the window.
class StreamingPolicy final : public KvPolicy {
 public:
  explicit StreamingPolicy(const KvPolicyConfig& c) : KvPolicy(c) {}
  PolicyKind kind() const override { return PolicyKind::kStreaming; }
  int MaxBlocks(int) const override { return 0; }
  int MaxKeys(int max_context) const override {
    return std::min(max_context,
                    config_.sink_tokens + config_.window_tokens + config_.budget_tokens);
  }
  int Budget() const override { return 0; }
  void Advance(int context_len, SequenceState& s, std::vector<SummaryWork>&) const override {
    s.sink_end = std::min(config_.sink_tokens, context_len - 1);
    s.tail_begin =
        std::max(s.sink_end, context_len - config_.window_tokens - config_.budget_tokens);
    s.tail_begin = std::min(s.tail_begin, context_len - 1);  // the query itself
  }
};

class QuestPolicy final : public KvPolicy {
 public:
  explicit QuestPolicy(const KvPolicyConfig& c) : KvPolicy(c) {}
  PolicyKind kind() const override { return PolicyKind::kQuest; }
  int MaxBlocks(int max_context) const override {
    return CeilDiv(max_context, config_.quest_page_tokens);
  }
  int MaxKeys(int max_context) const override {
    return std::min<int64_t>(max_context, int64_t{config_.sink_tokens} + config_.budget_tokens +
                                              config_.window_tokens + config_.quest_page_tokens);
  }
  void Advance(int context_len, SequenceState& s, std::vector<SummaryWork>& work) const override {
    const int page = config_.quest_page_tokens;
    if (s.num_blocks == 0) s.sink_end = std::min(config_.sink_tokens, context_len - 1);
    const int bounded_end = s.sink_end + page * s.num_blocks;
    // Pages end at least `window` tokens (and the query) before the context end.
    const int limit = context_len - std::max(config_.window_tokens, 1);
    const int new_pages = limit > bounded_end ? (limit - bounded_end) / page : 0;
    if (new_pages > 0) {
      work.push_back({SummaryWork::kKeyBounds, bounded_end, new_pages * page, 0, s.num_blocks});
      s.num_blocks += new_pages;
    }
    s.tail_begin = s.sink_end + page * s.num_blocks;
  }
};

class ClusterKvPolicy final : public KvPolicy {
 public:
  static constexpr int kClustersPerWindow = 8;
  explicit ClusterKvPolicy(const KvPolicyConfig& c) : KvPolicy(c) {}
  PolicyKind kind() const override { return PolicyKind::kClusterKv; }
  int Window() const { return std::max(config_.window_tokens, 1); }
  int MaxBlocks(int max_context) const override {
    // With chunks, each may end in a partial cluster.
    const int chunks =
        config_.cluster_chunk_tokens > 0 ? CeilDiv(max_context, config_.cluster_chunk_tokens) : 0;
    return CeilDiv(max_context, config_.tokens_per_cluster) + chunks +
           kClustersPerWindow * CeilDiv(max_context, Window());
  }
  int MaxKeys(int max_context) const override {
    return std::min<int64_t>(max_context,
                             int64_t{config_.sink_tokens} + config_.budget_tokens + 2 * Window());
  }
  void Advance(int context_len, SequenceState& s, std::vector<SummaryWork>& work) const override {
    const int window = Window();
    if (s.num_blocks == 0) {
      s.sink_end = std::min(config_.sink_tokens, context_len - 1);
      s.tail_begin = s.sink_end;
      // The prompt: everything between the sinks and the last window, once
      // it fills at least one cluster.
      const int count = context_len - window - s.sink_end;
      if (count >= config_.tokens_per_cluster) {
        for (const auto& [begin, end] : PromptChunks(s.sink_end, s.sink_end + count)) {
          const int clusters = CeilDiv(end - begin, config_.tokens_per_cluster);
          work.push_back({SummaryWork::kCluster, begin, end - begin, clusters, s.num_blocks});
          s.num_blocks += clusters;
        }
        s.tail_begin = s.sink_end + count;
      }
    }
    // Generated tokens: a full window beyond the last window becomes clusters.
    while (context_len - s.tail_begin >= 2 * window) {
      const int clusters = std::min(kClustersPerWindow, window);
      work.push_back({SummaryWork::kCluster, s.tail_begin, window, clusters, s.num_blocks});
      s.num_blocks += clusters;
      s.tail_begin += window;
    }
  }

 private:
  // The prompt's clustered span [begin, end) as it is clustered: whole, or
  // cut at the multiples of cluster_chunk_tokens. A piece shorter than a
  // cluster (the span's first, after the sinks, or its last) joins its
  // neighbour, so only the span's first and last pieces depend on where
  // the span starts and ends.
  std::vector<std::pair<int, int>> PromptChunks(int begin, int end) const {
    const int n = config_.cluster_chunk_tokens;
    if (n <= 0) return {{begin, end}};
    std::vector<std::pair<int, int>> chunks;
    for (int at = begin; at < end;) {
      const int next = std::min(end, (at / n + 1) * n);
      chunks.push_back({at, next});
      at = next;
    }
    if (chunks.size() > 1 &&
        chunks.front().second - chunks.front().first < config_.tokens_per_cluster) {
      chunks[1].first = chunks.front().first;
      chunks.erase(chunks.begin());
    }
    if (chunks.size() > 1 &&
        chunks.back().second - chunks.back().first < config_.tokens_per_cluster) {
      chunks[chunks.size() - 2].second = chunks.back().second;
      chunks.pop_back();
    }
    return chunks;
  }
};

// Entries are planned ClusterKV first, then Quest, then streaming, so each
// scoring runs over one contiguous range.
int KindOrder(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kClusterKv:
      return 0;
    case PolicyKind::kQuest:
      return 1;
    default:
      return 2;
  }
}

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view type) {
  if (type == "full") return PolicyKind::kFull;
  if (type == "streaming") return PolicyKind::kStreaming;
  if (type == "quest") return PolicyKind::kQuest;
  if (type == "clusterkv") return PolicyKind::kClusterKv;
  return absl::InvalidArgumentError(
      absl::StrCat("kv_policy.type \"", std::string(type),
                   "\" is not one of full, streaming, quest, clusterkv"));
}

std::string_view PolicyKindName(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kFull:
      return "full";
    case PolicyKind::kStreaming:
      return "streaming";
    case PolicyKind::kQuest:
      return "quest";
    case PolicyKind::kClusterKv:
      return "clusterkv";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<KvPolicy>> KvPolicy::Create(const KvPolicyConfig& c) {
  STRATA_ASSIGN_OR_RETURN(PolicyKind kind, ParsePolicyKind(c.type));
  if (c.budget_tokens < 0 || c.sink_tokens < 0 || c.window_tokens < 0 || c.full_layers < 0 ||
      c.tokens_per_cluster < 1 || c.kmeans_iterations < 1 || c.quest_page_tokens < 1 ||
      c.cluster_chunk_tokens < 0) {
    return absl::InvalidArgumentError(
        "kv_policy: budget, sinks, window, full_layers and cluster_chunk_tokens must be >= 0; "
        "tokens_per_cluster, kmeans_iterations and quest_page_tokens >= 1");
  }
  if (c.cluster_chunk_tokens % c.tokens_per_cluster != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_policy.cluster_chunk_tokens: ", c.cluster_chunk_tokens,
                     " is not a multiple of tokens_per_cluster (", c.tokens_per_cluster, ")"));
  }
  switch (kind) {
    case PolicyKind::kFull:
      return std::make_unique<FullPolicy>(c);
    case PolicyKind::kStreaming:
      return std::make_unique<StreamingPolicy>(c);
    case PolicyKind::kQuest:
      return std::make_unique<QuestPolicy>(c);
    case PolicyKind::kClusterKv:
      return std::make_unique<ClusterKvPolicy>(c);
  }
  return absl::InternalError("unreachable");
}

absl::StatusOr<std::unique_ptr<KvPolicyRunner>> KvPolicyRunner::Create(
    engine::Model* model, const std::vector<KvPolicyConfig>& policies,
    const KvPolicyRunnerOptions& options) {
  if (policies.empty()) return absl::InvalidArgumentError("kv policy runner: no policies");
  if (options.max_sparse_seqs < 1) {
    return absl::InvalidArgumentError("kv policy runner: max_sparse_seqs must be >= 1");
  }
  if (model->config().sliding_window > 0) {
    for (const KvPolicyConfig& c : policies) {
      if (c.type != "full") {
        return absl::InvalidArgumentError(absl::StrCat(
            "kv_policy.type ", c.type, " needs a model without sliding-window attention"));
      }
    }
  }
  if (!options.tier.per_policy.empty() && options.tier.per_policy.size() != policies.size()) {
    return absl::InvalidArgumentError(absl::StrCat("kv policy runner: tier per_policy has ",
                                                   options.tier.per_policy.size(), " entries for ",
                                                   policies.size(), " policies"));
  }
  if (options.tier.block_stride < 1 || options.tier.ring_tokens < 0) {
    return absl::InvalidArgumentError(
        "kv policy runner: tier block_stride must be >= 1 and ring_tokens >= 0");
  }
  std::unique_ptr<KvPolicyRunner> runner(new KvPolicyRunner(model, options));
  const int max_context = model->options().max_context;
  for (const KvPolicyConfig& c : policies) {
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<KvPolicy> p, KvPolicy::Create(c));
    runner->any_clusterkv_ |= p->kind() == PolicyKind::kClusterKv;
    runner->any_quest_ |= p->kind() == PolicyKind::kQuest;
    if (p->kind() != PolicyKind::kFull) {
      runner->max_blocks_ = std::max(runner->max_blocks_, p->MaxBlocks(max_context));
      runner->max_keys_ = std::max(runner->max_keys_, p->MaxKeys(max_context));
    }
    runner->policies_.push_back(std::move(p));
  }
  if (model->two_page_groups() && runner->Tiering()) {
    // The ring's pages come from the upper group, so every layer that reads
    // them must be an upper layer.
    const int first = model->options().upper_first_layer;
    for (int i = 0; i < runner->num_policies(); ++i) {
      if (runner->TierCodec(i).has_value() && policies[i].full_layers < first) {
        return absl::InvalidArgumentError(absl::StrCat(
            "kv policy ", i, " keeps clusters in the host tier from layer ",
            policies[i].full_layers, " but the model's upper page group starts at layer ", first));
      }
    }
  }
  STRATA_RETURN_IF_ERROR(runner->Allocate());
  return runner;
}

absl::Status KvPolicyRunner::Allocate() {
  if (max_keys_ == 0) return absl::OkStatus();           // only full policies
  if (!any_clusterkv_) options_.tier.manager = nullptr;  // only clusters are tiered
  engine::Backend& b = model_->backend();
  const engine::ModelConfig& config = model_->config();
  const int64_t slots = options_.max_sparse_seqs, hkv = model_->shard().kv_heads,
                d = config.head_dim, blocks = std::max(max_blocks_, 1);
  const engine::DType dt = b.activation_dtype();
  for (int l = 0; l < config.num_layers; ++l) {
    STRATA_ASSIGN_OR_RETURN(Tensor ext, b.Allocate(engine::DType::kI32, {slots, hkv, blocks, 2}));
    extents_.push_back(std::move(ext));
    if (any_clusterkv_) {
      STRATA_ASSIGN_OR_RETURN(Tensor c, b.Allocate(dt, {slots, hkv, blocks, d}));
      centroids_.push_back(std::move(c));
    }
    if (any_quest_) {
      STRATA_ASSIGN_OR_RETURN(Tensor lo, b.Allocate(dt, {slots, hkv, blocks, d}));
      STRATA_ASSIGN_OR_RETURN(Tensor hi, b.Allocate(dt, {slots, hkv, blocks, d}));
      lo_.push_back(std::move(lo));
      hi_.push_back(std::move(hi));
    }
  }
  // Per plan entry: the sequences of a step, and the padding rows of a
  // graphed step of that many (BeginStep).
  const int64_t entries = engine::DecodeGraphBucket(options_.max_sparse_seqs);
  if (model_->shard().size > config.num_kv_heads && model_->communicator() != nullptr) {
    // This rank's KV head is replicated: its query heads are some of the
    // head's group, and a block's score sums over the whole group. Each
    // rank scores into its head's row of a buffer with a row per KV head,
    // and an all-reduce adds the rows of the ranks that share each head
    // (the others' rows are zero).
    STRATA_ASSIGN_OR_RETURN(
        shared_scores_,
        b.Allocate(engine::DType::kF32, {config.num_kv_heads, entries, hkv, blocks}));
    scores_ = shared_scores_.Row(model_->shard().first_kv_head);
  } else {
    STRATA_ASSIGN_OR_RETURN(scores_, b.Allocate(engine::DType::kF32, {entries, hkv, blocks}));
  }
  plan_.max_blocks = static_cast<int>(blocks);
  plan_.max_keys = max_keys_;
  STRATA_ASSIGN_OR_RETURN(plan_.entries,
                          b.Allocate(engine::DType::kI32, {entries, engine::kSparsePlanFields}));
  STRATA_ASSIGN_OR_RETURN(plan_.key_index,
                          b.Allocate(engine::DType::kI32, {entries, hkv, max_keys_}));
  STRATA_ASSIGN_OR_RETURN(plan_.key_count, b.Allocate(engine::DType::kI32, {entries, hkv}));
  for (int s = options_.max_sparse_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  if (Tiering()) {
    // The ring holds at least two steps' selections (engine/backend.h).
    int budget = 0;
    for (const auto& p : policies_) {
      if (p->kind() == PolicyKind::kClusterKv) budget = std::max(budget, p->Budget());
    }
    const int page_size = model_->options().page_size;
    const int ring = std::max(options_.tier.ring_tokens, 2 * std::max(budget, 1));
    ring_.ring_rows = (ring + page_size - 1) / page_size * page_size;
    max_pieces_ =
        CeilDiv(model_->options().max_context, engine::kKvPieceTokens) + static_cast<int>(blocks);
    const int64_t pieces = max_pieces_;
    for (int l = 0; l < config.num_layers; ++l) {
      engine::TierTables t;
      STRATA_ASSIGN_OR_RETURN(t.piece_base, b.Allocate(engine::DType::kI32, {slots, hkv, blocks}));
      STRATA_ASSIGN_OR_RETURN(t.piece_host, b.Allocate(engine::DType::kI32, {slots, hkv, pieces}));
      STRATA_ASSIGN_OR_RETURN(t.piece_count, b.Allocate(engine::DType::kI32, {slots, hkv}));
      STRATA_ASSIGN_OR_RETURN(t.res_start, b.Allocate(engine::DType::kI32, {slots, hkv, blocks}));
      STRATA_ASSIGN_OR_RETURN(t.res_count, b.Allocate(engine::DType::kI32, {slots, hkv, blocks}));
      STRATA_ASSIGN_OR_RETURN(t.ring_head, b.Allocate(engine::DType::kI32, {slots, hkv}));
      STRATA_RETURN_IF_ERROR(b.Fill(t.piece_base, -1));
      STRATA_RETURN_IF_ERROR(b.Fill(t.piece_host, 0));
      STRATA_RETURN_IF_ERROR(b.Fill(t.piece_count, 0));
      STRATA_RETURN_IF_ERROR(b.Fill(t.res_start, 0));
      STRATA_RETURN_IF_ERROR(b.Fill(t.res_count, 0));
      STRATA_RETURN_IF_ERROR(b.Fill(t.ring_head, 0));
      t.layer = l;
      tier_.push_back(std::move(t));
    }
    STRATA_ASSIGN_OR_RETURN(ring_.ring_pages,
                            b.Allocate(engine::DType::kI32, {slots, ring_.ring_rows / page_size}));
    STRATA_ASSIGN_OR_RETURN(ring_.status, b.Allocate(engine::DType::kI32, {slots}));
    STRATA_ASSIGN_OR_RETURN(ring_.stats, b.Allocate(engine::DType::kI32, {engine::kKvTierStats}));
    STRATA_RETURN_IF_ERROR(b.Fill(ring_.ring_pages, 0));
    STRATA_RETURN_IF_ERROR(b.Fill(ring_.status, 0));
    STRATA_RETURN_IF_ERROR(b.Fill(ring_.stats, 0));
    ring_.host = options_.tier.manager->host_buffer();
    for (int p = 0; p < num_policies(); ++p) {
      if (options_.tier.manager->ssd() == nullptr || !TierCodec(p).has_value() ||
          p >= static_cast<int>(options_.tier.spill_admission.size()) ||
          options_.tier.spill_admission[p] == KvBlockManagerOptions::SsdAdmission::kNever) {
        continue;
      }
      ClusterSpill::Options spill;
      spill.host_data = const_cast<uint8_t*>(ring_.host.data());
      spill.io_threads = options_.tier.spill_io_threads;
      spill.fetch_timeout = options_.tier.spill_fetch_timeout;
      spill.forget_timeout = options_.tier.spill_fetch_timeout;
      spill.before_write = options_.tier.spill_before_write;
      spill_ = std::make_unique<ClusterSpill>(options_.tier.manager->ssd(), spill);
      break;
    }
    if ((options_.tier.prefetch_share > 0 ||
         (spill_ != nullptr && options_.tier.spill_read_ahead)) &&
        any_clusterkv_) {
      guess_plan_.max_blocks = plan_.max_blocks;
      STRATA_ASSIGN_OR_RETURN(
          guess_plan_.entries,
          b.Allocate(engine::DType::kI32, {entries, engine::kSparsePlanFields}));
      guess_plan_.max_keys = plan_.max_keys;
      STRATA_ASSIGN_OR_RETURN(guess_plan_.key_index,
                              b.Allocate(engine::DType::kI32, {entries, hkv, max_keys_}));
      STRATA_ASSIGN_OR_RETURN(guess_plan_.key_count,
                              b.Allocate(engine::DType::kI32, {entries, hkv}));
      STRATA_ASSIGN_OR_RETURN(guess_scores_,
                              b.Allocate(engine::DType::kF32, {entries, hkv, blocks}));
      STRATA_ASSIGN_OR_RETURN(guess_status_, b.Allocate(engine::DType::kI32, {slots}));
      STRATA_ASSIGN_OR_RETURN(guess_stats_,
                              b.Allocate(engine::DType::kI32, {engine::kKvTierStats}));
      STRATA_RETURN_IF_ERROR(b.Fill(guess_stats_, 0));
    }
  }
  if (any_clusterkv_) {
    // Pinned now rather than in the first request that reuses, keeps or
    // exports a prompt's clusterings (kv_policy_reuse.cc).
    const bool exports = options_.exports != nullptr;
    if (options_.clusterings != nullptr || options_.imports) {
      STRATA_RETURN_IF_ERROR(ReserveStaging(reuse_staging_, OneSequenceStagingBytes()));
    }
    if (options_.clusterings != nullptr || exports) {
      STRATA_RETURN_IF_ERROR(ReserveStaging(keep_staging_, OneSequenceStagingBytes()));
    }
  }
  return b.Synchronize();
}

absl::StatusOr<KvTierOptions> KvTierOptions::FromProfiles(const std::vector<KvProfile>& profiles,
                                                          KvBlockManager* manager) {
  KvTierOptions tier;
  bool any = false;
  for (const KvProfile& p : profiles) {
    KvBlockManagerOptions::SsdAdmission admission = KvBlockManagerOptions::SsdAdmission::kNever;
    if (p.policy.type == "clusterkv" && p.tiers.host_bytes > 0) {
      STRATA_ASSIGN_OR_RETURN(engine::KvCodecKind codec, engine::ParseKvCodecKind(p.codec));
      tier.per_policy.push_back(codec);
      any = true;
      if (!p.tiers.ssd_path.empty() && p.tiers.ssd_bytes > 0) {
        STRATA_ASSIGN_OR_RETURN(
            admission, KvBlockManagerOptions::ParseSsdAdmission(p.tiers.ssd_write_admission));
      }
    } else {
      tier.per_policy.push_back(std::nullopt);
    }
    tier.spill_admission.push_back(admission);
  }
  if (any) tier.manager = manager;
  return tier;
}

std::optional<engine::KvCodecKind> KvPolicyRunner::TierCodec(int policy) const {
  if (!Tiering()) return std::nullopt;
  if (options_.tier.per_policy.empty()) {
    if (policies_[policy]->kind() != PolicyKind::kClusterKv) return std::nullopt;
    return options_.tier.codec;
  }
  return policy < static_cast<int>(options_.tier.per_policy.size())
             ? options_.tier.per_policy[policy]
             : std::nullopt;
}

engine::TierTables KvPolicyRunner::SlotTables(int layer, int slot) {
  const engine::TierTables& t = tier_[layer];
  return {t.piece_base.Row(slot), t.piece_host.Row(slot), t.piece_count.Row(slot),
          t.res_start.Row(slot),  t.res_count.Row(slot),  t.ring_head.Row(slot)};
}

bool KvPolicyRunner::TakeRingPages(Sequence& seq) {
  const int pages = ring_.ring_rows / model_->options().page_size;
  const int64_t round = ++seq.ring_round;
  if (options_.tier.shared != nullptr) {
    return options_.tier.shared->TakeRing(seq.id, round, RingGroup(), pages, seq.ring_pages);
  }
  return options_.tier.manager->AllocatePages(RingGroup(), pages, seq.ring_pages);
}

void KvPolicyRunner::GiveRingPages(int64_t seq_id, Sequence& seq) {
  // Steps end synchronised: no kernel still reads the ring.
  const absl::Status s =
      options_.tier.shared != nullptr
          ? options_.tier.shared->GiveRing(seq_id, seq.ring_round, RingGroup(), seq.ring_pages)
          : options_.tier.manager->FreePages(RingGroup(), seq.ring_pages);
  if (!s.ok()) STRATA_LOG_ERROR("sequence {}: ring pages: {}", seq_id, s.ToString());
  seq.ring_pages.clear();
}

absl::StatusOr<bool> KvPolicyRunner::TakeRing(Sequence& seq) {
  if (!TakeRingPages(seq)) return false;
  Tensor pages = ring_.ring_pages.Row(seq.state.slot);
  STRATA_RETURN_IF_ERROR(model_->backend().CopyFromHost(seq.ring_pages.data(), engine::DType::kI32,
                                                        static_cast<int64_t>(seq.ring_pages.size()),
                                                        pages, 0));
  // Nothing is resident in a new ring: every selected piece is recalled.
  for (int l = 0; l < model_->config().num_layers; ++l) {
    engine::TierTables t = SlotTables(l, seq.state.slot);
    STRATA_RETURN_IF_ERROR(model_->backend().Fill(t.res_count, 0));
    STRATA_RETURN_IF_ERROR(model_->backend().Fill(t.ring_head, 0));
  }
  return true;
}

absl::Status KvPolicyRunner::StartTiering(Sequence& seq) {
  // No pieces yet, whatever the slot's last sequence left: a sequence
  // without a ring is still in the step's recall, which must find every one
  // of its blocks at home in the paged cache.
  for (int l = 0; l < model_->config().num_layers; ++l) {
    engine::TierTables t = SlotTables(l, seq.state.slot);
    STRATA_RETURN_IF_ERROR(model_->backend().Fill(t.piece_base, -1));
    STRATA_RETURN_IF_ERROR(model_->backend().Fill(t.piece_count, 0));
  }
  STRATA_ASSIGN_OR_RETURN(const bool taken, TakeRing(seq));
  if (!taken) {
    ++stats_.ring_refused;  // its clusters stay in the paged cache
    return absl::OkStatus();
  }
  ++stats_.tiered_sequences;
  return absl::OkStatus();
}

absl::StatusOr<bool> KvPolicyRunner::ResumeRing(Sequence& seq) {
  STRATA_ASSIGN_OR_RETURN(const bool taken, TakeRing(seq));
  if (!taken) return false;
  seq.ring_paused = false;
  ++stats_.ring_resumes;
  return true;
}

absl::StatusOr<bool> KvPolicyRunner::Offload(Sequence& seq, int layer,
                                             const engine::SequenceRange& range,
                                             const SummaryWork& work, Tensor& k_cache,
                                             Tensor& v_cache) {
  if (seq.ring_pages.empty()) return false;
  const engine::ModelConfig& config = model_->config();
  const engine::KvCodecKind codec = TierCodec(seq.policy).value_or(options_.tier.codec);
  const int64_t units = engine::KvPieceUnitsBound(codec, config.head_dim, model_->kv_cache_dtype(),
                                                  work.count, work.clusters);
  if (units <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "codec ", std::string(engine::KvCodecKindName(codec)), " cannot encode this model's KV"));
  }
  // The pieces of every head, packed: from the sequence's last region if
  // its tail holds them, else from a new one.
  const int64_t need = units * model_->shard().kv_heads;
  std::optional<KvBlockManager::HostRegion> region;
  if (seq.tail_units < need) {
    std::unique_lock<std::mutex> lock = LockManager();
    region = options_.tier.manager->AllocateHostRegion(need * engine::kKvHostUnit, seq.policy);
    if (!region.has_value()) {
      ++stats_.offload_refused;  // these clusters stay in the paged cache
      offload_refused_since_poll_ = true;
      return false;
    }
  }
  const int64_t first_unit =
      region.has_value() ? region->offset / engine::kKvHostUnit : seq.tail_unit;
  engine::TierTables t = SlotTables(layer, seq.state.slot);
  const absl::Status offloaded = model_->backend().OffloadBlocks(
      k_cache, v_cache, range, extents_[layer].Row(seq.state.slot), work.first_block, work.clusters,
      options_.tier.block_stride, codec, ring_.host, first_unit, units, t);
  if (!offloaded.ok()) {
    if (region.has_value()) {
      std::unique_lock<std::mutex> lock = LockManager();
      options_.tier.manager->FreeHostRegion(*region);
    }
    return offloaded;
  }
  if (region.has_value()) {
    seq.regions.push_back(*region);
    stats_.offloaded_bytes += region->bytes;
    seq.tail_units = region->bytes / engine::kKvHostUnit;
  }
  seq.tail_unit = first_unit + need;
  seq.tail_units -= need;
  ++stats_.offloads;
  // Every cluster of the range is in the host tier now (not every n-th).
  return options_.tier.block_stride == 1;
}

absl::Status KvPolicyRunner::BeginStep(const engine::StepInput& in,
                                       const engine::AttentionBatch& batch) {
  entries_.clear();
  // Left by a step that failed before EndStep: their slots come back.
  for (const ExportEntry& x : export_entries_) free_slots_.push_back(x.slot);
  export_entries_.clear();
  const int num_input = static_cast<int>(in.context_len.size());
  if (num_input > batch.num_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv policies: ", num_input, " sequences in a batch of ", batch.num_seqs));
  }
  plan_.num_blocks_bound = 0;  // GraphKey may round it up
  graph_step_ = false;
  step_tiered_ = false;
  step_fetch_ = false;
  ++step_count_;
  for (int s = 0; s < num_input; ++s) {
    const int policy = in.kv_policies.empty() ? 0 : in.kv_policies[s];
    if (policy < 0 || policy >= num_policies()) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv policy ", policy, " is not configured (", num_policies(), " are)"));
    }
    const KvPolicy& p = *policies_[policy];
    if (p.kind() == PolicyKind::kFull) continue;
    const int64_t id = in.seq_ids.empty() ? s : in.seq_ids[s];
    if (in.query_start[s + 1] - in.query_start[s] != 1) {  // a prefill chunk
      if (!pending_exports_.empty()) {
        STRATA_RETURN_IF_ERROR(PlanExport(s, id, policy, in.context_len[s]));
      }
      continue;
    }
    auto it = sequences_.find(id);
    if (it == sequences_.end()) {
      if (free_slots_.empty()) {
        ++stats_.dense_no_slot;
        continue;
      }
      Sequence fresh;
      fresh.id = id;
      fresh.policy = policy;
      it = sequences_.emplace(id, std::move(fresh)).first;
      it->second.state.slot = free_slots_.back();
      free_slots_.pop_back();
      if (p.kind() == PolicyKind::kClusterKv && TierCodec(policy).has_value()) {
        STRATA_RETURN_IF_ERROR(StartTiering(it->second));
      }
    }
    if (it->second.ring_paused) {
      STRATA_ASSIGN_OR_RETURN(const bool resumed, ResumeRing(it->second));
      if (!resumed) {
        // Its clusters cannot be recalled without a ring: this step's token
        // is dropped and the sequence recomputed (EndStep).
        ring_lost_.push_back({id, "no GPU pages were free for its recall ring when it resumed"});
        continue;
      }
    }
    step_tiered_ |= !it->second.ring_pages.empty();
    Sequence& seq = it->second;
    seq.last_step = step_count_;
    step_fetch_ |= seq.spilled;
    if (seq.policy != policy) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", id, " changed its kv policy"));
    }
    Entry e{&p, s, id, {}, {}};
    const int ctx = in.context_len[s];
    p.Advance(ctx, seq.state, e.work);
    if (seq.admission.has_value()) {
      // Its chunks' upper layers are in the host tier (Admit): this must be
      // the step they were admitted for, or the sequence cannot decode.
      Sequence::Admission admission = *std::move(seq.admission);
      seq.admission.reset();
      noted_prompts_.erase(id);
      if (!admission.encoded || ctx != admission.context_len || e.work != admission.work) {
        ring_lost_.push_back({id, absl::StrCat("its first step (context ", ctx,
                                               ") is not the decode step its imported KV was "
                                               "admitted for (context ",
                                               admission.context_len, ")")});
        continue;
      }
      e.reuse = std::move(admission.reuse);
      e.admitted = true;
      stats_.imported_clusterings += static_cast<int64_t>(e.work.size()) *
                                     (model_->config().num_layers - p.config().full_layers);
    } else if (!e.work.empty() && noted_prompts_.contains(id)) {
      STRATA_RETURN_IF_ERROR(FindClusterings(e));
    }
    e.fields[engine::kPlanRow] = in.query_start[s];
    e.fields[engine::kPlanSeq] = s;
    e.fields[engine::kPlanSlot] = seq.state.slot;
    e.fields[engine::kPlanNumBlocks] = seq.state.num_blocks;
    e.fields[engine::kPlanBudget] = p.Budget();
    e.fields[engine::kPlanSinkEnd] = seq.state.sink_end;
    e.fields[engine::kPlanTailBegin] = seq.state.tail_begin;
    e.fields[engine::kPlanContextLen] = ctx;
    entries_.push_back(std::move(e));
  }
  // Rows past the input pad a graphed step to its bucket (one-token
  // sequences the model adds). When every sequence of the step is planned,
  // so are they: each attends to its one key, and the plan still covers
  // every row (else the step attends densely anyway).
  if (!entries_.empty() && static_cast<int>(entries_.size()) == num_input) {
    for (int s = num_input; s < batch.num_seqs; ++s) {
      const int row = batch.host_query_start[s];
      if (batch.host_query_start[s + 1] - row != 1 || batch.host_context_len[s] != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("kv policies: padding row ", s, " is not a one-token sequence"));
      }
      Entry e{entries_.front().policy, s, -1, {}, {}, /*padding=*/true};
      e.fields[engine::kPlanRow] = row;
      e.fields[engine::kPlanSeq] = s;
      e.fields[engine::kPlanSlot] = 0;  // no blocks: its summaries are never read
      e.fields[engine::kPlanNumBlocks] = 0;
      e.fields[engine::kPlanBudget] = 0;
      e.fields[engine::kPlanSinkEnd] = 0;
      e.fields[engine::kPlanTailBegin] = 0;
      e.fields[engine::kPlanContextLen] = 1;
      entries_.push_back(std::move(e));
    }
  }
  std::stable_sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
    return KindOrder(a.policy->kind()) < KindOrder(b.policy->kind());
  });
  STRATA_RETURN_IF_ERROR(StageReuses());
  // Recall status bits are per step (EndStep reads them).
  if (step_tiered_) STRATA_RETURN_IF_ERROR(model_->backend().Fill(ring_.status, 0));
  // Clusters below host memory come up through the spill.
  step_fetch_ &= step_tiered_;
  ring_.fetcher = step_fetch_ ? spill_.get() : nullptr;
  // Prefetch guesses from the summaries as they stand, so not while a
  // layer's PlanLayer is about to add to them.
  step_prefetch_ = step_tiered_ && Prefetches() &&
                   (options_.tier.prefetch_share > 0 || (step_fetch_ && ReadsAhead())) &&
                   std::none_of(entries_.begin(), entries_.end(),
                                [](const Entry& e) { return !e.work.empty(); });
  prefetched_layer_ = -1;
  if (step_prefetch_) {
    // The first layer that may be prefetched (layer 0 has no layer before
    // it to prefetch in) needs its entries in plan_.entries before its own
    // PlanLayer would upload them; the layers after it plan the same ones
    // (or upload theirs, and are not prefetched).
    for (int layer = 1; layer < model_->config().num_layers; ++layer) {
      int num_clusterkv = 0;
      std::vector<int32_t> host = LayerFields(layer, &num_clusterkv);
      if (num_clusterkv == 0) continue;
      STRATA_RETURN_IF_ERROR(UploadEntries(std::move(host)));
      break;
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> KvPolicyRunner::LayerFields(int layer, int* num_clusterkv) const {
  std::vector<int32_t> host;
  int clusterkv = 0;
  for (const Entry& e : entries_) {
    if (!e.policy->SparseLayer(layer)) continue;
    host.insert(host.end(), e.fields.begin(), e.fields.end());
    clusterkv += e.policy->kind() == PolicyKind::kClusterKv;
  }
  if (num_clusterkv != nullptr) *num_clusterkv = clusterkv;
  return host;
}

bool KvPolicyRunner::PrefetchesLayer(int layer) const {
  if (!step_prefetch_) return false;
  // The guessed plan reads plan_.entries, which must already hold the
  // layer's entries: PlanLayer(layer) then uploads nothing over them.
  int num_clusterkv = 0;
  const std::vector<int32_t> host = LayerFields(layer, &num_clusterkv);
  return num_clusterkv > 0 && host == uploaded_;
}

absl::Status KvPolicyRunner::PrefetchLayer(int layer, const engine::AttentionBatch& batch,
                                           const Tensor& guessed_qkv, Tensor& k_cache,
                                           Tensor& v_cache) {
  if (!PrefetchesLayer(layer)) {
    return absl::FailedPreconditionError(
        absl::StrCat("kv policies: layer ", layer, " is not prefetched this step"));
  }
  engine::Backend& b = model_->backend();
  int num_clusterkv = 0;
  LayerFields(layer, &num_clusterkv);
  // ClusterKV entries come first: the guessed plan is their prefix, with
  // the budgets cut to the share (UploadEntries wrote them to its own
  // entries; the device reads those, the CPU backend the host copy).
  guess_plan_.host_entries.assign(
      guess_uploaded_.begin(), guess_uploaded_.begin() + num_clusterkv * engine::kSparsePlanFields);
  guess_plan_.num_entries = num_clusterkv;
  guess_plan_.num_blocks_bound = plan_.num_blocks_bound;
  STRATA_RETURN_IF_ERROR(engine::ValidateSparsePlan(
      guess_plan_, batch, guessed_qkv.dim(0), options_.max_sparse_seqs, model_->shard().kv_heads));
  engine::TierRing guess_ring = ring_;
  guess_ring.status = guess_status_;
  guess_ring.stats = guess_stats_;
  guess_ring.fetcher = nullptr;  // a guess never waits for the SSD
  // It may start reads from it (a read-ahead recall, which changes nothing
  // else), before its prefetch, if any, recalls from host memory.
  engine::TierRing read_ahead = guess_ring;
  read_ahead.fetcher = step_fetch_ && ReadsAhead() ? spill_->read_ahead() : nullptr;
  read_ahead.list_only = true;
  const bool prefetch = options_.tier.prefetch_share > 0;
  if (!prefetch && read_ahead.fetcher == nullptr) {
    return absl::InternalError("kv policies: a guess with neither prefetch nor read ahead");
  }
  const engine::QkvLayout layout{model_->shard().q_heads, model_->shard().kv_heads,
                                 model_->config().head_dim};
  STRATA_RETURN_IF_ERROR(b.BeginSideWork());
  prefetched_layer_ = layer;
  absl::Status side =
      b.ScoreBlocks(guessed_qkv, layout, guess_plan_, 0, num_clusterkv,
                    engine::BlockScoring::kCentroid, centroids_[layer], Tensor(), guess_scores_);
  if (side.ok()) side = b.SelectTokens(guess_scores_, extents_[layer], guess_plan_);
  if (side.ok() && read_ahead.fetcher != nullptr) {
    side = b.RecallBlocks(k_cache, v_cache, batch, guess_plan_, extents_[layer], tier_[layer],
                          read_ahead);
  }
  if (side.ok() && prefetch) {
    side = b.RecallBlocks(k_cache, v_cache, batch, guess_plan_, extents_[layer], tier_[layer],
                          guess_ring);
  }
  const absl::Status end = b.EndSideWork();
  return side.ok() ? end : side;
}

absl::Status KvPolicyRunner::UploadEntries(std::vector<int32_t> host) {
  engine::Backend& b = model_->backend();
  if (host == uploaded_) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(host.data(), engine::DType::kI32,
                                        static_cast<int64_t>(host.size()), plan_.entries, 0));
  if (Prefetches()) {
    std::vector<int32_t> guess = host;
    for (size_t i = engine::kPlanBudget; i < guess.size(); i += engine::kSparsePlanFields) {
      // Only reading ahead: the whole budget.
      if (guess[i] > 0 && options_.tier.prefetch_share > 0) {
        guess[i] =
            std::max(1, static_cast<int32_t>(std::lround(guess[i] * options_.tier.prefetch_share)));
      }
    }
    if (guess != guess_uploaded_) {
      STRATA_RETURN_IF_ERROR(b.CopyFromHost(guess.data(), engine::DType::kI32,
                                            static_cast<int64_t>(guess.size()), guess_plan_.entries,
                                            0));
      guess_uploaded_ = std::move(guess);
    }
  }
  uploaded_ = std::move(host);
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::JoinPrefetch() {
  if (prefetched_layer_ < 0) return absl::OkStatus();
  prefetched_layer_ = -1;
  return model_->backend().JoinSideWork();
}

KvPolicyRunner::KvPolicyRunner(engine::Model* model, const KvPolicyRunnerOptions& options)
    : model_(model), options_(options) {
  static std::atomic<int32_t> instances{0};
  instance_ = instances.fetch_add(1);
}

absl::StatusOr<std::optional<std::vector<int32_t>>> KvPolicyRunner::GraphKey() {
  if (!Replayable() || !export_entries_.empty()) return std::nullopt;
  int most_blocks = 0;
  for (const Entry& e : entries_) {
    if (!e.work.empty()) return std::nullopt;
    most_blocks = std::max(most_blocks, e.fields[engine::kPlanNumBlocks]);
  }
  std::vector<int32_t> key{instance_}, fields;
  int64_t dense = 0, sparse = 0;
  int num_clusterkv = 0, num_quest = 0;
  for (int layer = 0; layer < model_->config().num_layers; ++layer) {
    std::vector<int32_t> host;
    int clusterkv = 0, quest = 0;
    int real = 0;  // entries that are sequences (the stats count those)
    for (const Entry& e : entries_) {
      if (!e.policy->SparseLayer(layer)) {
        dense += !e.padding;
        continue;
      }
      host.insert(host.end(), e.fields.begin(), e.fields.end());
      clusterkv += e.policy->kind() == PolicyKind::kClusterKv;
      quest += e.policy->kind() == PolicyKind::kQuest;
      real += !e.padding;
    }
    const int n = static_cast<int>(host.size() / engine::kSparsePlanFields);
    key.push_back(n);
    if (n == 0) continue;
    if (fields.empty()) {
      fields = std::move(host);
      num_clusterkv = clusterkv;
      num_quest = quest;
    } else if (host != fields) {
      return std::nullopt;  // layers plan different entries: uploads mid-step
    }
    sparse += real;
  }
  plan_.num_blocks_bound = std::min(
      max_blocks_, (most_blocks + kBlocksBoundStep - 1) / kBlocksBoundStep * kBlocksBoundStep);
  if (!fields.empty()) STRATA_RETURN_IF_ERROR(UploadEntries(fields));
  key.push_back(num_clusterkv);
  key.push_back(num_quest);
  // Recordings with and without recalls, or prefetches, differ.
  key.push_back(int{step_tiered_} + 2 * int{step_prefetch_} + 4 * int{step_fetch_});
  key.push_back(plan_.num_blocks_bound);
  graph_dense_queries_ = dense;
  graph_sparse_queries_ = sparse;
  graph_step_ = true;
  return key;
}

void KvPolicyRunner::CountGraphStep() {
  stats_.dense_queries += graph_dense_queries_;
  stats_.sparse_queries += graph_sparse_queries_;
}

absl::StatusOr<const SparsePlan*> KvPolicyRunner::PlanLayer(int layer,
                                                            const engine::AttentionBatch& batch,
                                                            const Tensor& qkv, Tensor& k_cache,
                                                            Tensor& v_cache) {
  engine::Backend& b = model_->backend();
  // The prefetch of this layer reads and writes its tables and ring.
  STRATA_RETURN_IF_ERROR(JoinPrefetch());
  const int page_size = model_->options().page_size;
  // The entries of this layer (policies whose full layers are behind), their
  // summary work first.
  std::vector<int32_t> host;
  int num_clusterkv = 0, num_quest = 0;
  for (ExportEntry& x : export_entries_) {
    // Clustered after the step, once its token is out (ClusterExports):
    // here only the layer's block table is noted.
    if (x.policy->SparseLayer(layer)) x.block_tables[layer] = batch.block_table.Row(x.batch_seq);
  }
  for (Entry& e : entries_) {
    if (!e.policy->SparseLayer(layer)) {
      if (!graph_step_ && !e.padding) ++stats_.dense_queries;
      continue;
    }
    const int slot = e.fields[engine::kPlanSlot];
    engine::SequenceRange range;
    range.block_table = batch.block_table.Row(e.batch_seq);
    range.page_size = page_size;
    e.offloaded_layers.resize(e.work.size());
    // Stored or imported clusterings to redo: their centroids and extents
    // are in the slot's rows already (StageReuses).
    const std::vector<Tensor> reuse_orders = ReuseOrders(e, layer);
    for (size_t wi = 0; wi < e.work.size(); ++wi) {
      const SummaryWork& w = e.work[wi];
      range.begin = w.begin;
      range.count = w.count;
      Tensor extents = extents_[layer].Row(slot);
      if (w.kind == SummaryWork::kCluster) {
        if (e.admitted) {
          // An admitted import: its rows are not on the GPU, its clusters
          // are in the host tier already (Admit), its centroids and extents
          // staged (StageReuses).
          ++stats_.reused_clusterings;
          continue;
        }
        if (wi < reuse_orders.size() && reuse_orders[wi].defined()) {
          STRATA_RETURN_IF_ERROR(b.ReorderKeys(k_cache, v_cache, range, reuse_orders[wi]));
          ++stats_.reused_clusterings;
        } else {
          Tensor centroids = centroids_[layer].Row(slot);
          Tensor order_view;
          STRATA_RETURN_IF_ERROR(
              b.ClusterKeys(k_cache, v_cache, range, w.clusters,
                            e.policy->config().kmeans_iterations, w.first_block, centroids, extents,
                            KeptOrder(e, wi, layer, order_view), engine::ClusterRows::kReorder));
          ++stats_.clusterings;
        }
        if (Tiering()) {
          STRATA_ASSIGN_OR_RETURN(const bool offloaded, Offload(sequences_.at(e.seq_id), layer,
                                                                range, w, k_cache, v_cache));
          e.offloaded_layers[wi] +=
              offloaded && model_->page_group(layer) == engine::PageGroup::kUpper;
        }
      } else {
        Tensor lo = lo_[layer].Row(slot), hi = hi_[layer].Row(slot);
        STRATA_RETURN_IF_ERROR(b.KeyBounds(k_cache, range, e.policy->config().quest_page_tokens,
                                           w.first_block, lo, hi, extents));
      }
    }
    num_clusterkv += e.policy->kind() == PolicyKind::kClusterKv;
    num_quest += e.policy->kind() == PolicyKind::kQuest;
    host.insert(host.end(), e.fields.begin(), e.fields.end());
  }
  const int n = static_cast<int>(host.size() / engine::kSparsePlanFields);
  if (n == 0) return nullptr;
  if (!graph_step_) {
    for (const Entry& e : entries_)
      stats_.sparse_queries += !e.padding && e.policy->SparseLayer(layer);
  }
  plan_.num_entries = n;
  STRATA_RETURN_IF_ERROR(UploadEntries(host));
  plan_.host_entries = std::move(host);
  STRATA_RETURN_IF_ERROR(engine::ValidateSparsePlan(
      plan_, batch, qkv.dim(0), options_.max_sparse_seqs, model_->shard().kv_heads));
  const engine::QkvLayout layout{model_->shard().q_heads, model_->shard().kv_heads,
                                 model_->config().head_dim};
  if (shared_scores_.defined()) STRATA_RETURN_IF_ERROR(b.Fill(shared_scores_, 0.0f));
  if (num_clusterkv > 0) {
    STRATA_RETURN_IF_ERROR(b.ScoreBlocks(qkv, layout, plan_, 0, num_clusterkv,
                                         engine::BlockScoring::kCentroid, centroids_[layer],
                                         Tensor(), scores_));
  }
  if (num_quest > 0) {
    STRATA_RETURN_IF_ERROR(
        b.ScoreBlocks(qkv, layout, plan_, num_clusterkv, num_clusterkv + num_quest,
                      engine::BlockScoring::kKeyBounds, lo_[layer], hi_[layer], scores_));
  }
  if (shared_scores_.defined()) {
    // Every rank plans the same entries, so every rank joins here.
    STRATA_RETURN_IF_ERROR(model_->communicator()->AllReduceSum(shared_scores_));
  }
  STRATA_RETURN_IF_ERROR(b.SelectTokens(scores_, extents_[layer], plan_));
  if (step_tiered_) {
    STRATA_RETURN_IF_ERROR(
        b.RecallBlocks(k_cache, v_cache, batch, plan_, extents_[layer], tier_[layer], ring_));
  }
  if (options_.track_selection) STRATA_RETURN_IF_ERROR(TrackSelection(layer));
  if (observer_) STRATA_RETURN_IF_ERROR(observer_(layer, qkv, k_cache, v_cache, batch, plan_));
  return &plan_;
}

absl::Status KvPolicyRunner::TrackSelection(int layer) {
  engine::Backend& b = model_->backend();
  const int hkv = model_->shard().kv_heads;
  std::vector<int32_t> index(plan_.key_index.numel()), count(plan_.key_count.numel());
  STRATA_RETURN_IF_ERROR(b.CopyToHost(plan_.key_index, index.data()));
  STRATA_RETURN_IF_ERROR(b.CopyToHost(plan_.key_count, count.data()));
  int i = 0;
  for (const Entry& e : entries_) {
    if (!e.policy->SparseLayer(layer)) continue;
    if (e.padding) {  // not a sequence (never present while tracking: not Replayable)
      ++i;
      continue;
    }
    auto& per_layer = last_selection_[e.seq_id];
    per_layer.resize(static_cast<size_t>(model_->config().num_layers) * hkv);
    const int sink_end = e.fields[engine::kPlanSinkEnd];
    const int tail = e.fields[engine::kPlanContextLen] - e.fields[engine::kPlanTailBegin];
    for (int h = 0; h < hkv; ++h) {
      const int32_t* keys = &index[(static_cast<size_t>(i) * hkv + h) * plan_.max_keys];
      const int selected = count[static_cast<size_t>(i) * hkv + h] - sink_end - tail;
      std::vector<int32_t> now(keys + sink_end, keys + sink_end + std::max(selected, 0));
      std::sort(now.begin(), now.end());
      std::vector<int32_t>& last = per_layer[static_cast<size_t>(layer) * hkv + h];
      if (!last.empty()) {
        std::vector<int32_t> common;
        std::set_intersection(now.begin(), now.end(), last.begin(), last.end(),
                              std::back_inserter(common));
        stats_.selected_tokens += static_cast<int64_t>(now.size());
        stats_.reselected_tokens += static_cast<int64_t>(common.size());
      }
      last = std::move(now);
    }
    ++i;
  }
  return absl::OkStatus();
}

void KvPolicyRunner::Pause(int64_t seq_id) {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end() || it->second.ring_pages.empty()) return;
  GiveRingPages(seq_id, it->second);
  it->second.ring_paused = true;
  ++stats_.ring_pauses;
}

absl::StatusOr<bool> KvPolicyRunner::Resume(int64_t seq_id) {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end() || !it->second.ring_paused) return true;
  return ResumeRing(it->second);
}

bool KvPolicyRunner::Reordered(int64_t seq_id) const {
  auto it = sequences_.find(seq_id);
  return it != sequences_.end() && policies_[it->second.policy]->kind() == PolicyKind::kClusterKv &&
         it->second.state.num_blocks > 0;
}

void KvPolicyRunner::Release(int64_t seq_id) {
  JoinAdmitJob(seq_id);  // it writes the sequence's host regions
  last_selection_.erase(seq_id);
  noted_prompts_.erase(seq_id);
  pending_exports_.erase(seq_id);
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return;
  Sequence& seq = it->second;
  // Steps end synchronised: no kernel still reads the ring or the regions.
  if (!seq.ring_pages.empty()) GiveRingPages(seq_id, seq);
  // Stops a batch being written (it reads the regions) or a promotion
  // (it writes one) and deletes the sequence's values. A write the SSD holds past the spill's
  // timeout still reads the regions: they are freed when it returns (PollSpill).
  const bool settled = spill_ == nullptr || spill_->Forget(seq_id);
  std::vector<KvBlockManager::HostRegion> regions = std::move(seq.regions);
  if (seq.pending_spill.has_value()) {
    regions.insert(regions.end(), seq.pending_spill->regions.begin(),
                   seq.pending_spill->regions.end());
  }
  // A promotion's reads land in its region until Forget has them done.
  if (seq.pending_promotion.has_value()) regions.push_back(seq.pending_promotion->region);
  {
    std::unique_lock<std::mutex> lock = LockManager();
    if (spill_ != nullptr) options_.tier.manager->RefundSsd(seq.policy, seq.ssd_charged);
    if (settled) {
      for (const KvBlockManager::HostRegion& region : regions) {
        options_.tier.manager->FreeHostRegion(region);
      }
    }
  }
  if (!settled) orphaned_regions_[seq_id] = std::move(regions);
  free_slots_.push_back(seq.state.slot);
  sequences_.erase(it);
  if (spill_ != nullptr) MaybeFreeStaging();
}

std::vector<engine::AttentionPlanner::OffGpuRange> KvPolicyRunner::TakeOffGpuRanges() {
  std::vector<OffGpuRange> ranges;
  if (!model_->two_page_groups()) return ranges;
  const int upper_layers = model_->config().num_layers - model_->options().upper_first_layer;
  for (Entry& e : entries_) {
    for (size_t wi = 0; wi < e.offloaded_layers.size(); ++wi) {
      // Freed only when no upper layer reads the range from the paged cache
      // any more: every one of them has it in the host tier.
      if (e.offloaded_layers[wi] != upper_layers) continue;
      const SummaryWork& w = e.work[wi];
      ranges.push_back({e.seq_id, w.begin, w.begin + w.count});
    }
    e.offloaded_layers.clear();
  }
  return ranges;
}

absl::StatusOr<std::vector<engine::AttentionPlanner::LostSequence>> KvPolicyRunner::EndStep() {
  std::vector<LostSequence> lost;
  for (auto& [id, why] : ring_lost_) {
    ++stats_.lost_sequences;
    lost.push_back({id, std::move(why)});
  }
  ring_lost_.clear();
  STRATA_RETURN_IF_ERROR(JoinPrefetch());
  if (options_.clusterings != nullptr) STRATA_RETURN_IF_ERROR(KeepClusterings());
  if (!export_entries_.empty()) STRATA_RETURN_IF_ERROR(HandOverExports());
  if (!step_tiered_) {
    STRATA_RETURN_IF_ERROR(PollSpill());
    return lost;
  }
  step_tiered_ = false;
  engine::Backend& b = model_->backend();
  if (step_prefetch_) {
    std::vector<int32_t> guessed(engine::kKvTierStats);
    STRATA_RETURN_IF_ERROR(b.CopyToHost(guess_stats_, guessed.data()));
    STRATA_RETURN_IF_ERROR(b.Fill(guess_stats_, 0));
    stats_.prefetch_tokens += guessed[engine::kStatRecalledTokens];
    stats_.prefetch_kib += guessed[engine::kStatRecalledKiB];
    stats_.prefetch_micros += guessed[engine::kStatRecallMicros];
    // What the step's last layers read ahead is no step's to take (the
    // copy above waited for the step, its host functions included).
    if (step_fetch_ && ReadsAhead()) spill_->DropReadsAhead();
    step_prefetch_ = false;
  }
  std::vector<int32_t> status(ring_.status.numel()), counts(engine::kKvTierStats);
  STRATA_RETURN_IF_ERROR(b.CopyToHost(ring_.status, status.data()));
  STRATA_RETURN_IF_ERROR(b.CopyToHost(ring_.stats, counts.data()));
  STRATA_RETURN_IF_ERROR(b.Fill(ring_.stats, 0));
  stats_.recall_hit_tokens += counts[engine::kStatHitTokens];
  stats_.recall_refreshed_tokens += counts[engine::kStatRefreshedTokens];
  stats_.recall_tokens += counts[engine::kStatRecalledTokens];
  stats_.recall_pieces += counts[engine::kStatRecalledPieces];
  stats_.recall_kib += counts[engine::kStatRecalledKiB];
  stats_.recall_bad_pieces += counts[engine::kStatBadPieces];
  stats_.recall_micros += counts[engine::kStatRecallMicros];
  ++stats_.recall_steps;
  for (const auto& [id, seq] : sequences_) {
    const int32_t bits = status[seq.state.slot];
    if (bits == engine::kRecallOk || seq.ring_pages.empty()) continue;
    ++stats_.lost_sequences;
    lost.push_back({id, (bits & engine::kRecallBadBlock) != 0
                            ? "a host-homed KV block failed its check when recalled"
                            : "its selection did not fit its GPU ring"});
  }
  STRATA_RETURN_IF_ERROR(PollSpill());
  return lost;
}

absl::StatusOr<std::unique_ptr<RankedKvPolicies>> RankedKvPolicies::Install(
    engine::Model* model, const std::vector<KvPolicyConfig>& policies,
    const KvPolicyRunnerOptions& options) {
  const std::vector<engine::Model*>& ranks = model->ranks();
  std::unique_ptr<RankedKvPolicies> installed(new RankedKvPolicies(model));
  KvPolicyRunnerOptions rank_options = options;
  if (ranks.size() > 1 && options.tier.manager != nullptr) {
    installed->shared_ =
        std::make_unique<RankSharedTier>(options.tier.manager, static_cast<int>(ranks.size()));
    rank_options.tier.shared = installed->shared_.get();
  }
  std::vector<engine::AttentionPlanner*> planners;
  for (size_t r = 0; r < ranks.size(); ++r) {
    absl::StatusOr<std::unique_ptr<KvPolicyRunner>> runner =
        KvPolicyRunner::Create(ranks[r], policies, rank_options);
    if (!runner.ok()) {
      return absl::Status(runner.status().code(),
                          ranks.size() > 1
                              ? absl::StrCat("rank ", r, ": ", runner.status().message())
                              : std::string(runner.status().message()));
    }
    planners.push_back(runner->get());
    installed->runners_.push_back(*std::move(runner));
  }
  for (size_t r = 1; r < ranks.size(); ++r) {
    STRATA_RETURN_IF_ERROR(ranks[r]->set_attention_planner(planners[r]));
  }
  engine::AttentionPlanner* leader = planners.front();
  if (ranks.size() > 1) {
    installed->ranked_ = std::make_unique<engine::RankedPlanner>(planners);
    leader = installed->ranked_.get();
  }
  STRATA_RETURN_IF_ERROR(model->set_attention_planner(leader));
  return installed;
}

RankedKvPolicies::~RankedKvPolicies() {
  for (engine::Model* rank : model_->ranks()) (void)rank->set_attention_planner(nullptr);
}

}  // namespace strata::kvtier

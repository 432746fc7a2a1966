// KV policies: which cached tokens a decode step attends to.
//
// KvPolicy is one configured policy (a profile's kv_policy). It keeps no
// per-sequence state itself: KvPolicyRunner owns that and asks the policy,
// at each decode step, how a sequence's block summaries must grow and which
// ranges it always attends to. Every sparse policy attends to the first
// sink tokens, a recent tail and `budget` tokens chosen from summarised
// blocks in between, so policies compare at an equal token budget:
//   - full: every token (no plan; the dense kernels run).
//   - streaming (StreamingLLM): sinks + the last window + budget tokens; no
//     blocks.
//   - quest (Quest): blocks are pages of quest_page_tokens consecutive
//     tokens, summarised by their per-channel key min / max and scored by the
//     upper bound of q . k; the tail is the last window tokens plus the
//     unfinished page.
//   - clusterkv (ClusterKV): at the first decode step the keys between the
//     sinks and the last window are clustered (k-means, cosine, about one
//     cluster per tokens_per_cluster; whole, or with cluster_chunk_tokens
//     in chunks of that many positions, each on its own) and reordered
//     cluster-major; each time
//     the unclustered tail reaches 2 x window tokens its oldest window
//     becomes 8 more clusters. Blocks are clusters, scored by q . centroid.
// The first full_layers layers always attend densely.
//
// KvPolicyRunner implements engine::AttentionPlanner for a Model: it keeps
// each sequence's state, a pool slot per sparse sequence (summaries of
// every layer), and the per-step SparsePlan. A sequence that finds no free
// slot decodes densely (counted in Stats::dense_no_slot).
//
// With a KV block manager (KvTierOptions), ClusterKV clusters get their home
// in the host tier: right after a layer's keys are clustered, its clusters
// are encoded into a host region (Backend::OffloadBlocks), and each decode
// step recalls the clusters it selects into a ring of GPU cache slots, pages
// the manager lent the sequence (Backend::RecallBlocks, see TierTables in
// engine/backend.h). A sequence for which the manager has no ring pages, or
// a clustering for which the host tier has no room, keeps its clusters in
// the paged cache; both are counted. After each step, a sequence whose
// recall found a corrupt host block is reported lost (EndStep): the batcher
// recomputes it, so a bad block never becomes tokens.
//
// With the manager's SSD tier and a policy whose admission allows it
// (KvTierOptions::spill_admission), a sequence's host-homed clusters go
// further down (kvtier/cluster_spill.h; kv_policy_spill.cc): after a step,
// when the host tier fills, the clusters of the sequence that ran least
// recently are written to the SSD, then marked below host in its tables
// and their host memory freed. A step whose recall selects one of them
// fetches it from the SSD (the step waits: a hard miss, counted). With
// kCold admission, a sequence on the SSD that runs again while the host
// tier is below the high-water mark is promoted: its clusters are read back
// into host memory on the I/O threads, and once they are there its tables
// point at them, so later steps recall them from host memory.
//
// With a ClusteringStore (KvPolicyRunnerOptions::clusterings), a prompt
// chunk's clustering computed on keys loaded from stored prefix pages is
// kept under those pages' CRCs, and a later sequence that loads the same
// pages reorders its keys by it (Backend::ReorderKeys) and takes its
// centroids instead of running the k-means (kv_policy_reuse.cc; the
// batcher names the pages through NotePrompt).
//
// Disaggregated serving (kv_policy_reuse.cc): a prefill worker's runner
// (KvPolicyRunnerOptions::exports) clusters an exported ClusterKV prompt at
// the step that completes it, as the decode worker's first decode step
// would, leaving the cache as it is (engine::ClusterRows::kLeave: the
// pages go out and into the prefix store unchanged), and hands the
// clusterings, in the ClusteringStore's value format, to the export
// (KvMemory::AddExportPlannerState). The decode worker's runner is given
// them with the KV (NoteImportedState) and redoes them as it redoes stored
// ones: its first decode step reorders instead of running the k-means.
// With a ClusteringStore it keeps them too, under the pages the batcher
// stored the prompt in (an exact import), for a later prompt that loads
// them (not yet for an import admitted straight into the host tier).
//
// Imported prompts straight into the host tier (kv_policy_admit.cc): a
// decode worker's runner with host-homed clusters (one rank, the upper page
// group exactly the sparse layers) is the block manager's ImportAdmitter.
// When a transfer's clusterings cover every chunk its first decode step
// would cluster, the runner reserves the sequence's slot, ring and host
// regions, and encodes those chunks' upper-layer KV from the landing
// records into its host regions cluster-major (as Offload would after the
// reorder), filling its tier tables: the upper pages of those tokens are
// never allocated, copied up, reordered and offloaded again. Its first
// decode step then only stages the centroids and extents.
//
// Thread-safety: KvPolicy is immutable. KvPolicyRunner is driven by the
// model's thread (it is the model's planner); stats() may be read by that
// thread only.
#ifndef STRATA_KVTIER_KV_POLICY_H_
#define STRATA_KVTIER_KV_POLICY_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/thread_pool.h"
#include "engine/attention_planner.h"
#include "engine/backend.h"
#include "engine/kv_memory.h"
#include "engine/model.h"
#include "engine/tensor_parallel.h"
#include "kvtier/cluster_spill.h"
#include "kvtier/clustering_store.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/profile.h"
#include "kvtier/rank_shared_tier.h"

namespace strata::kvtier {

enum class PolicyKind { kFull, kStreaming, kQuest, kClusterKv };
absl::StatusOr<PolicyKind> ParsePolicyKind(std::string_view type);
std::string_view PolicyKindName(PolicyKind kind);

// A prompt chunk's clustering as ClusteringStore keeps it, checked
// (kv_policy_reuse.cc): per sparse layer of its policy, per KV head, the
// reorder (count int32, a permutation), the centroids (clusters x head_dim,
// in the policy pools' dtype) and the cluster sizes (clusters int32,
// summing to count), for the KV heads of one tensor-parallel rank. Read in
// place from the value that carried it (tens of megabytes for a long
// prompt: not copied); copy the bytes out.
struct StoredClustering {
  int begin = 0, count = 0, clusters = 0, layers = 0, heads = 0, head_dim = 0;
  int rank = 0, ranks = 1;
  engine::DType centroid_dtype = engine::DType::kF32;
  std::vector<uint8_t> value;

  const uint8_t* Order(int64_t layer, int64_t head) const;
  const uint8_t* Centroids(int64_t layer, int64_t head) const;
  const uint8_t* Sizes(int64_t layer, int64_t head) const;
};

// A ClusteringStore value (or one a prefill worker sent) as the clustering
// of `want`'s shape, checked: its header, its size, every head's order a
// permutation of [0, count), its sizes summing to count (the layers in
// parallel on `pool`: a 32k prompt's value holds 7.8 million order
// entries). DataLoss naming what is wrong.
absl::StatusOr<std::shared_ptr<const StoredClustering>> ParseClustering(
    std::vector<uint8_t> value, const StoredClustering& want, ThreadPool& pool);
// Whether a value's header names `want`'s shape (its first 44 bytes only).
bool ClusteringHeaderIs(std::span<const uint8_t> value, const StoredClustering& want);

// A sparse sequence's bookkeeping (the same for every layer).
struct SequenceState {
  int slot = -1;       // pool slot
  int num_blocks = 0;  // summarised blocks
  int sink_end = 0;    // [0, sink_end) always attended
  int tail_begin = 0;  // [tail_begin, context) always attended
};

// Summary work for one sequence, run on each sparse layer of the step.
struct SummaryWork {
  enum Kind { kCluster, kKeyBounds } kind = kCluster;
  int begin = 0;        // first logical index
  int count = 0;        // tokens
  int clusters = 0;     // kCluster: clusters to form
  int first_block = 0;  // pool block of the first new block
  bool operator==(const SummaryWork&) const = default;
};

class KvPolicy {
 public:
  // InvalidArgument for an unknown type or parameters the policy cannot use.
  static absl::StatusOr<std::unique_ptr<KvPolicy>> Create(const KvPolicyConfig& config);
  virtual ~KvPolicy() = default;

  const KvPolicyConfig& config() const { return config_; }
  virtual PolicyKind kind() const = 0;
  bool SparseLayer(int layer) const {
    return kind() != PolicyKind::kFull && layer >= config_.full_layers;
  }
  // Pool blocks a sequence of up to max_context tokens can need.
  virtual int MaxBlocks(int max_context) const = 0;
  // Keys a query can attend to at most (sinks + budget + tail).
  virtual int MaxKeys(int max_context) const = 0;
  // Tokens chosen from the blocks per step.
  virtual int Budget() const { return config_.budget_tokens; }
  // Brings `state` to a decode step whose context (the query included) is
  // context_len tokens, appending the summary work that needs.
  virtual void Advance(int context_len, SequenceState& state,
                       std::vector<SummaryWork>& work) const = 0;

 protected:
  explicit KvPolicy(const KvPolicyConfig& config) : config_(config) {}
  KvPolicyConfig config_;
};

// Host-homed ClusterKV clusters (see the file comment).
struct KvTierOptions {
  KvBlockManager* manager = nullptr;  // null: clusters stay in the paged cache
  engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
  // GPU cache slots a sequence's ring holds (each layer and KV head has its
  // own part of every slot); 0: twice the largest budget. Rounded up to
  // pages, and at least twice the budget.
  int ring_tokens = 0;
  // Offload only every n-th cluster of a clustering (benchmarks: 2 puts half
  // of them in the host tier); 1: all.
  int block_stride = 1;
  // Prefetch: during each layer, guess the next layer's selection (from
  // its weights and this layer's input) and recall the host-homed clusters
  // of its top-scored `prefetch_share` of the budget as side work, so that
  // the next layer finds them in the ring. 0: no prefetch. A guess costs
  // host reads where it is wrong, and the link is shared: a share below 1
  // keeps to the clusters the guess is surest of. Off by default: where
  // the recalls already fill the PCIe link (bench/RESULTS.md, 32k decode
  // at batch 8) the extra reads cost more than the overlap saves.
  double prefetch_share = 0;
  // Per policy index: the codec of its host-homed clusters, or nullopt to
  // keep its clusters in the paged cache. Empty: every ClusterKV policy's
  // clusters are host-homed with `codec`.
  std::vector<std::optional<engine::KvCodecKind>> per_policy = {};
  // Clusters below the host tier (kvtier/cluster_spill.h), with the
  // manager's SSD tier. Per policy index (missing: kNever), when its
  // host-homed clusters go down: kNever: they stay in host memory; kCold:
  // once the host tier is fuller than spill_high_water, the sequences that
  // ran least recently first (paused ones before them); kAlways: as soon as
  // they are offloaded. A sequence's clusters on the SSD come back inside
  // the decode step that selects them (a hard miss).
  std::vector<KvBlockManagerOptions::SsdAdmission> spill_admission = {};
  double spill_high_water = 0.75;
  // Benchmarks: send only every n-th cluster of a sequence down (its host
  // memory is then kept); 1: all, and their host memory is freed.
  int spill_stride = 1;
  int spill_io_threads = 4;
  // With clusters below host memory: in a step that may fetch them, each
  // layer guesses the next layer's selection (as prefetch does, with the
  // whole budget when prefetch_share is 0) and starts the SSD reads of the
  // clusters it would miss (ClusterSpill::read_ahead), so that the next
  // layer's hard misses find them read or reading. Costs each layer of
  // such a step a guess (the next layer's QKV projection of one token per
  // sequence, its centroid scores and selection) on the side stream.
  bool spill_read_ahead = true;
  // How long a decode step waits for clusters it fetches from the SSD
  // before it recomputes their sequences instead, and a released sequence
  // for the write of its clusters before it leaves their host memory to be
  // freed once the write returns (ClusterSpill).
  std::chrono::milliseconds spill_fetch_timeout{2000};
  // Tests only: ClusterSpill::Options::before_write.
  std::function<void()> spill_before_write = nullptr;
  // Tests only: called on an import admission's thread before it encodes.
  std::function<void()> admit_before_encode = nullptr;
  // With tensor parallelism, what the ranks' runners share (their calls
  // into `manager`, and their sequences' ring pages); set by
  // RankedKvPolicies. Null: one runner.
  RankSharedTier* shared = nullptr;

  // The tiering a server's profiles ask for (profiles[i] is policy i):
  // ClusterKV profiles with tiers.host_bytes > 0 get host-homed clusters in
  // their codec; none when no profile asks (manager then unused).
  static absl::StatusOr<KvTierOptions> FromProfiles(const std::vector<KvProfile>& profiles,
                                                    KvBlockManager* manager);
};

struct KvPolicyRunnerOptions {
  // Sequences that can decode sparsely at once (pool slots); more decode
  // densely. Pools take slots x layers x (summaries + extents).
  int max_sparse_seqs = 8;
  // Copies every layer's selection to the host to count how much of it the
  // previous step had selected too (Stats::reselected_tokens). Costs a
  // synchronisation per layer: for evaluation, not serving.
  bool track_selection = false;
  KvTierOptions tier = {};
  // Clusterings of prompt chunks kept and reused (see the file comment);
  // null: none. Shared by the ranks of a tensor-parallel group.
  ClusteringStore* clusterings = nullptr;
  // A prefill worker's KV memory (one rank): the clusterings of exported
  // prompts are computed here and handed to it (see the file comment);
  // null: none are.
  engine::KvMemory* exports = nullptr;
  // A decode worker: clusterings come with imported KV (NoteImportedState).
  // Like `clusterings` and `exports`, makes the runner allocate its pinned
  // staging for one sequence of the model's context at start, not in the
  // first request that needs it (pinning 100 MB takes tens of ms).
  bool imports = false;
};

// Called after a layer's plan is selected, before its attention (evaluation
// hooks read the plan and the caches through the backend).
using PlanObserver =
    std::function<absl::Status(int layer, const engine::Tensor& qkv, const engine::Tensor& k_cache,
                               const engine::Tensor& v_cache, const engine::AttentionBatch& batch,
                               const engine::SparsePlan& plan)>;

class KvPolicyRunner final : public engine::AttentionPlanner, public ImportAdmitter {
 public:
  struct Stats {
    int64_t sparse_queries = 0;  // (decode query, layer) pairs attended sparsely
    int64_t dense_queries = 0;   // decode queries of sparse policies on dense layers
    int64_t dense_no_slot = 0;   // decode steps of sequences that found no slot
    int64_t clusterings = 0;     // ClusterKeys calls
    // ClusteringStore: (chunk, layer) clusterings redone from a stored one
    // (ReorderKeys instead of ClusterKeys), and chunks' clusterings kept.
    int64_t reused_clusterings = 0;
    int64_t kept_clusterings = 0;
    // Disaggregated serving: prompt chunks' clusterings computed for an
    // export (prefill side), and (chunk, layer) clusterings redone from
    // those that came with imported KV (decode side; also counted in
    // reused_clusterings).
    int64_t exported_clusterings = 0;
    int64_t imported_clusterings = 0;
    int64_t selected_tokens = 0;    // with track_selection: tokens taken from blocks
    int64_t reselected_tokens = 0;  // ... of which the same (seq, layer, head) had last step
    // Host-homed clusters (KvTierOptions).
    int64_t tiered_sequences = 0;         // sequences that got a ring
    int64_t ring_refused = 0;             // ... that found no pages for one
    int64_t offloads = 0;                 // (sequence, layer) clusterings moved to the host tier
    int64_t offload_refused = 0;          // ... that found no room there (stayed on the GPU)
    int64_t offloaded_bytes = 0;          // host bytes reserved for them (whole records)
    int64_t recall_hit_tokens = 0;        // selected host-homed tokens found in the ring
    int64_t recall_refreshed_tokens = 0;  // ... found, then moved ahead of the writes
    int64_t recall_tokens = 0;            // ... read from host memory
    int64_t recall_pieces = 0;
    int64_t recall_kib = 0;         // host KiB read
    int64_t recall_bad_pieces = 0;  // pieces that failed their check
    // Device time of the recalls (planning to the last piece decoded), and
    // the steps that recalled: their ratio is the recall latency per step.
    int64_t recall_micros = 0;
    int64_t recall_steps = 0;
    // Prefetch (KvTierOptions::prefetch): host-homed tokens the guessed
    // selections recalled ahead of their layers, the host KiB they read,
    // and their device time (side work, beside the layers computing).
    int64_t prefetch_tokens = 0;
    int64_t prefetch_kib = 0;
    int64_t prefetch_micros = 0;
    // Clusters below the host tier: batches of a sequence's clusters sent
    // down and marked there (their host memory freed), batches the SSD
    // refused (kept in host memory), and the clusters a step had to fetch
    // from the SSD (hard misses: their bytes, the time steps waited, pieces
    // that could not be had), and the bytes stored there now.
    int64_t spills = 0;
    int64_t spilled_clusters = 0;
    int64_t spills_refused = 0;
    int64_t hard_misses = 0;
    int64_t hard_miss_bytes = 0;
    int64_t hard_miss_micros = 0;
    int64_t hard_miss_failed = 0;
    int64_t hard_miss_timeouts = 0;  // fetches that gave up on a stalled SSD
    // Reads ahead (KvTierOptions::spill_read_ahead): clusters whose SSD
    // reads a guess started, and the hard misses they served.
    int64_t read_ahead_clusters = 0;
    int64_t read_ahead_bytes = 0;
    int64_t read_ahead_used = 0;
    // Released sequences whose clusters' write (or read back) the SSD held
    // past the timeout (their host memory freed once it returned).
    int64_t spill_writes_abandoned = 0;
    // Sequences running again whose clusters on the SSD were read back into
    // host memory ahead of the steps that select them, and those clusters.
    int64_t promotions = 0;
    int64_t promoted_clusters = 0;
    int64_t promoted_bytes = 0;
    int64_t ssd_cluster_bytes = 0;
    // Imported prompts whose upper layers went straight into the host tier
    // (ImportAdmitter), their (chunk, layer) clusterings, and the time
    // their encoding took.
    int64_t admitted_sequences = 0;
    int64_t admitted_clusterings = 0;
    int64_t admit_micros = 0;
    int64_t lost_sequences = 0;  // sequences recomputed because of them
    int64_t ring_pauses = 0;     // rings given back by paused sequences
    int64_t ring_resumes = 0;    // ... and taken again when they ran
  };

  // policies[i] serves requests with kv_policy i (0 is the default). The
  // runner sizes its pools for `model` and installs nothing: the caller does
  // model->set_attention_planner(runner).
  // Waits for a read-back of kept clusterings still in flight (it writes
  // the runner's staging buffer).
  ~KvPolicyRunner() override;
  static absl::StatusOr<std::unique_ptr<KvPolicyRunner>> Create(
      engine::Model* model, const std::vector<KvPolicyConfig>& policies,
      const KvPolicyRunnerOptions& options = {});

  absl::Status BeginStep(const engine::StepInput& input,
                         const engine::AttentionBatch& batch) override;
  absl::StatusOr<const engine::SparsePlan*> PlanLayer(int layer,
                                                      const engine::AttentionBatch& batch,
                                                      const engine::Tensor& qkv,
                                                      engine::Tensor& k_cache,
                                                      engine::Tensor& v_cache) override;
  // Prefetches (KvTierOptions::prefetch) in steps with a ring and no
  // summary work, for the layers whose entries are already uploaded (all
  // but a step's first sparse layer, unless the step replays from a graph).
  // (Also to read clusters below host memory ahead: spill_read_ahead.)
  bool Prefetches() const override { return guess_scores_.defined(); }
  bool PrefetchesLayer(int layer) const override;
  absl::Status PrefetchLayer(int layer, const engine::AttentionBatch& batch,
                             const engine::Tensor& guessed_qkv, engine::Tensor& k_cache,
                             engine::Tensor& v_cache) override;
  void Release(int64_t seq_id) override;
  void NotePrompt(int64_t seq_id, int loaded_tokens, std::span<const uint32_t> page_crcs) override;
  // With a ClusteringStore; otherwise ignored.
  void NoteStoredPrompt(int64_t seq_id, int stored_tokens, StoredPageCrcs page_crcs) override;
  // ImportAdmitter (see the file comment); the manager calls them from
  // LoadImported, on the model's thread.
  // Whether this runner may admit imports at all (KvPolicyRunnerOptions::
  // imports, host-homed clusters, two page groups, one rank): then it is
  // meant to be its manager's set_import_admitter (the wiring's to set, as
  // it installs the planner).
  bool AdmitsImports() const {
    return Tiering() && options_.imports && model_->two_page_groups() && model_->shard().size == 1;
  }
  Range PlanAdmission(int64_t seq_id, int workload, int tokens,
                      std::span<const std::vector<uint8_t>> state_heads) override;
  bool ReserveAdmission(int64_t seq_id, int workload, int tokens) override;
  absl::StatusOr<Range> Admit(int64_t seq_id, int workload, int tokens,
                              std::span<const std::vector<uint8_t>> state,
                              std::span<const LandedPage> pages) override;
  absl::StatusOr<bool> AdmitDone(int64_t seq_id) override;
  void DropAdmitted(int64_t seq_id) override;
  // With KvPolicyRunnerOptions::exports; otherwise ignored.
  void NoteExport(int64_t seq_id, uint64_t export_key, int prompt_tokens) override;
  void NoteImportedState(int64_t seq_id, std::vector<std::vector<uint8_t>> state) override;
  int ImportedStateRank(std::span<const uint8_t> value) const override;
  // Launches the k-means of the prompts HandOverExports left (ClusterExports)
  // and hands exports the clusterings read back since; keeps those computed
  // on stored pages whose CRCs are known now (NoteStoredPrompt).
  absl::Status Poll() override;
  // ClusterKV sequences once clustered (ClusterKeys reorders in place).
  bool Reordered(int64_t seq_id) const override;
  // Gives a paused tiered sequence's ring pages back; its host-homed
  // clusters and their tables stay. Resume takes a ring again, empty (and
  // the sequence's next step does if Resume was not called, reporting it
  // lost when no pages are free).
  void Pause(int64_t seq_id) override;
  absl::StatusOr<bool> Resume(int64_t seq_id) override;
  // Replayable unless track_selection or an observer reads the plans back.
  // GraphKey then gives a key when no entry has summary work this step
  // (clustering, key bounds) and every sparse layer plans the same entries.
  // The key: this runner's instance number (recordings hold its buffers, so
  // no other runner, even one at the same address, may replay them), each
  // layer's entry count, the ClusterKV / Quest split, whether the step
  // recalls and prefetches, and num_blocks_bound
  // (the entries' largest block count rounded up to kBlocksBoundStep, so a
  // recording serves until that many more blocks are appended).
  bool Replayable() const override { return !options_.track_selection && !observer_; }
  absl::StatusOr<std::optional<std::vector<int32_t>>> GraphKey() override;
  void CountGraphStep() override;
  absl::StatusOr<std::vector<LostSequence>> EndStep() override;
  // The clusterings of this step that went to the host tier in every upper
  // layer (the model's two page groups; ClusterKV policies whose dense
  // layers are exactly the lower group).
  std::vector<OffGpuRange> TakeOffGpuRanges() override;
  static constexpr int kBlocksBoundStep = 64;

  int num_policies() const { return static_cast<int>(policies_.size()); }
  const KvPolicy& policy(int i) const { return *policies_[i]; }
  const Stats& stats() const { return stats_; }
  int num_free_slots() const { return static_cast<int>(free_slots_.size()); }
  // The host regions a sequence's clusters are homed in (tests that
  // inspect them).
  std::vector<KvBlockManager::HostRegion> HostRegionsOf(int64_t seq_id) const {
    auto it = sequences_.find(seq_id);
    return it == sequences_.end() ? std::vector<KvBlockManager::HostRegion>{} : it->second.regions;
  }
  // Clusters below the host tier; null when no policy sends them down.
  const ClusterSpill* spill() const { return spill_.get(); }
  // Moves KvTierOptions::spill_high_water between steps (a tier budget
  // changed at run time; tests).
  void set_spill_high_water(double share) { options_.tier.spill_high_water = share; }
  // Between steps (benchmarks, tests): polls the spill until no batch is
  // being written or promotion read and none would start; false when
  // `timeout` passed first.
  absl::StatusOr<bool> SettleSpills(std::chrono::milliseconds timeout);
  void set_observer(PlanObserver observer) { observer_ = std::move(observer); }

 private:
  struct Sequence {
    int64_t id = 0;
    int policy = 0;
    SequenceState state;
    // Host-homed clusters: the ring's pages (of RingGroup()), and the host
    // regions its offloads filled (freed with the sequence).
    std::vector<int32_t> ring_pages;
    std::vector<KvBlockManager::HostRegion> regions;
    // The unused tail of the last region, in kKvHostUnit units: a later
    // offload (a window's clusters, far less than a host record) takes it
    // before asking for a region of whole records.
    int64_t tail_unit = 0, tail_units = 0;
    bool ring_paused = false;  // Pause gave its ring back
    int64_t ring_round = 0;    // rings taken so far (RankSharedTier's rounds)
    // Clusters below the host tier: the sequence's SSD owner id (0: none
    // yet), the step it last ran in, whether some of its pieces are below
    // host memory, and a batch being written (its regions, freed once it is
    // stored; the pieces it marks below host, per layer and head).
    uint64_t spill_owner = 0;
    int64_t last_step = 0;
    bool spilled = false;
    bool strided_spill_done = false;  // spill_stride > 1: sent down once
    int64_t spill_retry_step = 0;     // refused by the SSD: not before this step
    int64_t ssd_charged = 0;          // SSD bytes charged to its workload (ChargeSsd)
    struct PendingSpill {
      uint64_t tag = 0;
      std::vector<KvBlockManager::HostRegion> regions;
      // Per (layer, head): piece_host[0, count) as they were, with those
      // the batch sends down set to kPieceBelowHost.
      std::vector<std::vector<std::vector<int32_t>>> piece_host;
      int64_t clusters = 0;
      int64_t bytes = 0;  // of its values
    };
    std::optional<PendingSpill> pending_spill;
    // Its clusters on the SSD being read back into host memory (kCold
    // admission: it runs again and the host tier has room): the region they
    // land in, the sequence's once PollSpill points its tables at them.
    struct PendingPromotion {
      uint64_t tag = 0;
      KvBlockManager::HostRegion region;
      std::chrono::steady_clock::time_point started;
    };
    std::optional<PendingPromotion> pending_promotion;
    int64_t promote_retry_step = 0;  // not promoted again before this step
    // Admitted from an import (ImportAdmitter) and not yet stepped: the
    // context of the decode step it was planned for, that step's work, and
    // each work item's clustering (set by Admit).
    struct Admission {
      int context_len = 0;
      std::vector<SummaryWork> work;
      std::vector<std::shared_ptr<const StoredClustering>> reuse;
      bool encoded = false;
    };
    std::optional<Admission> admission;
  };
  // One planned decode query of this step.
  // A kept clustering's key before its pages' CRCs are all known: the
  // words of the pages it was computed on (a page's CRC where it was
  // loaded, 0 where it was stored by this sequence), filled in from
  // `stored` (NoteStoredPrompt's) once that store is sealed.
  struct LaterKey {
    std::string space;
    size_t first_page = 0;
    std::vector<uint32_t> words;
    std::shared_ptr<const StoredPageCrcs> stored;
  };
  struct Entry {
    const KvPolicy* policy;
    int batch_seq;
    int64_t seq_id;
    std::vector<SummaryWork> work;
    std::array<int32_t, engine::kSparsePlanFields> fields;
    // A padding row of a graphed step (past the input's sequences): planned
    // like the step's first entry so that the step stays sparse, over its
    // one key; not a sequence, and not counted in the stats.
    bool padding = false;
    // Its work's clusters are in the host tier already (an admitted
    // import): the step neither reorders nor offloads them.
    bool admitted = false;
    // Per work item: upper layers whose clusters it offloaded whole.
    std::vector<int> offloaded_layers = {};
    // ClusteringStore (kv_policy_reuse.cc), per work item: a stored
    // clustering to redo (null: none), and the key to keep the one
    // computed under (nullopt: not kept), or what makes that key once the
    // pages' stored CRCs are known (null: none); the kept ones' orders,
    // every sparse layer's, in `kept_orders`.
    std::vector<std::shared_ptr<const StoredClustering>> reuse = {};
    std::vector<std::optional<PrefixKey>> keep = {};
    std::vector<std::shared_ptr<const LaterKey>> keep_later = {};
    engine::Tensor reuse_orders = {};         // StageReuses': [sparse layers, ...]
    std::vector<int64_t> reuse_offsets = {};  // per work item, in elements per layer
    engine::Tensor kept_orders = {};
    std::vector<int64_t> kept_offsets = {};  // per work item, in elements per sparse layer
  };

  // ClusteringStore (kv_policy_reuse.cc). After Advance in BeginStep: finds
  // the entry's stored clusterings and marks those to keep.
  absl::Status FindClusterings(Entry& e);
  // The shape a work item's clustering has under `policy` (what a stored
  // or imported value must hold).
  StoredClustering WantedClustering(const KvPolicy& policy, const SummaryWork& w) const;
  // At the end of BeginStep: the reused clusterings of every entry go up
  // in one copy, before the step's compute: their orders (every sparse
  // layer's, into Entry::reuse_orders) and their centroids and extents
  // (into the slot's pool rows; the clusterings computed in the step write
  // their own blocks after).
  absl::Status StageReuses();
  // In PlanLayer: the layer's reused orders per work item (undefined where
  // none).
  std::vector<engine::Tensor> ReuseOrders(const Entry& e, int layer) const;
  // The order tensor ClusterKeys fills for a kept work item in `layer`
  // (null when not kept).
  engine::Tensor* KeptOrder(Entry& e, size_t wi, int layer, engine::Tensor& view);
  // In EndStep: starts reading this step's kept clusterings back on the
  // copy stream (KeepingRead), and stores those whose read is done.
  absl::Status KeepClusterings();
  // Stores a finished read's clusterings (or hands them to the export it
  // is for); waits for it when `wait`.
  absl::StatusOr<bool> FinishKeeping(bool wait);
  // Starts reading `read`'s work items' clusterings back from pool slot
  // `slot` (its orders, the slot's centroid and extent rows of every sparse
  // layer after `full_layers`); one read at a time.
  struct KeepingRead;
  absl::Status StartReading(KeepingRead read, int slot, int full_layers);
  // In BeginStep, for a prefill chunk that completes an exported prompt
  // (NoteExport): plans its clustering as the decode worker's first step
  // would (an ExportEntry).
  absl::Status PlanExport(int batch_seq, int64_t seq_id, int policy, int context_len);
  // In EndStep: this step's exported prompts are clustered by the next
  // Poll, which comes after the step's events are out (so their first
  // token waits neither for the k-means nor for its launches), and before
  // the next step's compute, which may reuse their pages. The exports' end
  // waits for the clusterings meanwhile (KvMemory::ExpectExportPlannerState).
  absl::Status HandOverExports();
  // In Poll: enqueues those prompts' k-means and starts reading the
  // clusterings back; a later Poll hands them to their exports once read.
  absl::Status ClusterExports();
  int SparseLayerIndex(const KvPolicy& policy, int layer) const;

  KvPolicyRunner(engine::Model* model, const KvPolicyRunnerOptions& options);
  absl::Status Allocate();
  absl::Status TrackSelection(int layer);
  // Holds the calls into the manager of this runner's rank against the
  // other ranks' (a no-op lock with one rank).
  std::unique_lock<std::mutex> LockManager() const {
    return options_.tier.shared != nullptr ? options_.tier.shared->Lock()
                                           : std::unique_lock<std::mutex>();
  }
  // A sequence's ring pages from the manager, or the pages the other ranks
  // share (RankSharedTier); and back.
  bool TakeRingPages(Sequence& seq);
  void GiveRingPages(int64_t seq_id, Sequence& seq);
  bool Tiering() const { return options_.tier.manager != nullptr; }
  // The codec of policy `policy`'s host-homed clusters; nullopt when its
  // clusters stay in the paged cache.
  std::optional<engine::KvCodecKind> TierCodec(int policy) const;
  // Gives a new ClusterKV sequence its ring (if pages allow) and clears its
  // slot's tiering tables.
  absl::Status StartTiering(Sequence& seq);
  // Takes a paused sequence's ring again, empty (its pieces stay where they
  // are); false when too few pages are free.
  absl::StatusOr<bool> ResumeRing(Sequence& seq);
  // StartTiering's and ResumeRing's common part: the ring's pages, in the
  // slot's row of the ring table, with nothing resident; false (nothing
  // taken) when too few pages are free.
  absl::StatusOr<bool> TakeRing(Sequence& seq);
  // Moves the clusters `work` just formed in `layer` to the host tier; true
  // when all of them went.
  absl::StatusOr<bool> Offload(Sequence& seq, int layer, const engine::SequenceRange& range,
                               const SummaryWork& work, engine::Tensor& k_cache,
                               engine::Tensor& v_cache);
  // The page group the ring's pages come from: the sparse layers'.
  engine::PageGroup RingGroup() const {
    return model_->page_group(model_->config().num_layers - 1);
  }
  // The same layer's tables restricted to one pool slot.
  engine::TierTables SlotTables(int layer, int slot);
  // The host entries PlanLayer(layer) plans this step, and how many of them
  // (the first) are ClusterKV's.
  std::vector<int32_t> LayerFields(int layer, int* num_clusterkv = nullptr) const;
  // Whether guesses read clusters below host memory ahead.
  bool ReadsAhead() const { return spill_ != nullptr && options_.tier.spill_read_ahead; }
  // Orders what follows after the prefetch side work, if any is pending.
  absl::Status JoinPrefetch();
  // Makes plan_.entries hold `host` (and the guessed plan's entries the
  // same with the budgets cut to the prefetch share).
  absl::Status UploadEntries(std::vector<int32_t> host);

  // Clusters below the host tier (kv_policy_spill.cc). The policy of
  // `policy` sends clusters down (an SSD tier and its admission allow it).
  bool Spills(int policy) const;
  // After a step: applies the batches written and promotions read since,
  // and starts a batch when the host tier asks for it, or else a promotion
  // of a sequence that ran in the step when the host tier has room.
  absl::Status PollSpill();
  // Sends a sequence's clusters in host memory down (queues a batch).
  absl::Status StartSpill(int64_t id, Sequence& seq);
  // Applies a batch that is stored: its pieces are marked below host and
  // its regions freed; or, refused, its regions go back to the sequence.
  absl::Status FinishSpill(Sequence& seq, bool stored);
  // Promotion: starts one (false: none fit the host tier's room), and
  // points a sequence's tables at the clusters read back.
  absl::StatusOr<bool> StartPromotion(int64_t id, Sequence& seq);
  absl::Status FinishPromotion(int64_t id, Sequence& seq, ClusterSpill::Promotion& promotion);
  // Makes the staging area that fetched clusters land in exist (false
  // when host memory is short), or frees it when nothing is below host.
  bool EnsureStaging();
  void MaybeFreeStaging();

  engine::Model* model_;
  KvPolicyRunnerOptions options_;
  int32_t instance_;  // distinct for every runner of the process
  std::vector<std::unique_ptr<KvPolicy>> policies_;
  bool any_clusterkv_ = false, any_quest_ = false;
  int max_blocks_ = 0;
  int max_keys_ = 0;

  // Per layer: [slots, Hkv, max_blocks, D] summaries and [.., 2] extents.
  std::vector<engine::Tensor> centroids_, lo_, hi_, extents_;
  engine::Tensor scores_;  // F32 [slots, Hkv, max_blocks]
  // With a replicated KV head (tensor parallelism, more ranks than KV
  // heads): F32 [model's KV heads, slots, 1, max_blocks], scores_ being
  // this rank's head's row; summed over the ranks each step.
  engine::Tensor shared_scores_;
  // Tiering: per layer (empty when off), and the ring every layer shares.
  std::vector<engine::TierTables> tier_;
  engine::TierRing ring_;
  int max_pieces_ = 0;
  bool step_tiered_ = false;  // some entry of this step has a ring
  engine::SparsePlan plan_;
  std::vector<int32_t> uploaded_;  // host entries last copied to plan_.entries
  // Prefetch: the guessed selection's plan (plan_'s entries, its own key
  // lists) and scores, the status and stats its recalls write (the status
  // is never read: PlanLayer's own recall checks every piece it uses), the
  // step's decision, and the layer whose side work PlanLayer must join.
  engine::SparsePlan guess_plan_;
  std::vector<int32_t> guess_uploaded_;  // host entries last copied to guess_plan_.entries
  engine::Tensor guess_scores_, guess_status_, guess_stats_;
  bool step_prefetch_ = false;
  int prefetched_layer_ = -1;
  // This step has a GraphKey: PlanLayer leaves the stats to CountGraphStep,
  // which adds what PlanLayer would have.
  bool graph_step_ = false;
  int64_t graph_dense_queries_ = 0, graph_sparse_queries_ = 0;

  // Clusters below the host tier: the spill (null without an SSD tier or
  // a policy that spills), its staging area, a step counter, an offload
  // refused for room since the last poll, and whether this step's recalls
  // may fetch from below host (part of the graph key).
  std::unique_ptr<ClusterSpill> spill_;
  std::optional<KvBlockManager::HostRegion> staging_;
  int64_t step_count_ = 0;
  bool offload_refused_since_poll_ = false;
  uint64_t next_spill_tag_ = 1;
  bool step_fetch_ = false;
  int64_t spills_over_line_ = 0;  // batches past their workload's SSD line

  absl::flat_hash_map<int64_t, Sequence> sequences_;
  // NotePrompt's: per sequence not yet planned, its loaded tokens and their
  // pages' CRCs; NoteStoredPrompt's: its stored tokens, and what gives their
  // pages' CRCs once stored.
  struct NotedPrompt {
    int loaded_tokens = 0;
    std::vector<uint32_t> page_crcs;
    int stored_tokens = 0;
    std::shared_ptr<const StoredPageCrcs> stored;
    // NoteImportedState's: clusterings a prefill worker computed on the
    // prompt (ClusteringStore's value format).
    std::vector<std::vector<uint8_t>> imported;
  };
  absl::flat_hash_map<int64_t, NotedPrompt> noted_prompts_;
  // NoteExport's: per sequence whose prompt is not yet complete, its export
  // key and prompt length; and this step's clusterings for exports, each in
  // a pool slot of its own for the step.
  struct PendingExport {
    uint64_t key = 0;
    int prompt_tokens = 0;
  };
  absl::flat_hash_map<int64_t, PendingExport> pending_exports_;
  struct ExportEntry {
    const KvPolicy* policy = nullptr;
    int batch_seq = 0;
    uint64_t key = 0;
    int slot = -1;
    std::vector<SummaryWork> work;
    engine::Tensor orders;         // I32 [sparse layers, heads x the work's tokens]
    std::vector<int64_t> offsets;  // per work item, in elements per sparse layer
    // Per layer: the sequence's row of the step's block table (PlanLayer
    // notes it; defined for sparse layers).
    std::vector<engine::Tensor> block_tables;
  };
  std::vector<ExportEntry> export_entries_;
  std::vector<ExportEntry> exports_to_cluster_;  // HandOverExports' for Poll
  // StageReuses' pinned staging buffer and its copy in flight.
  engine::HostBuffer reuse_staging_;
  engine::CopyFence reuse_fence_ = engine::kFenceDone;
  // A read-back of kept clusterings in flight (one at a time): the rows of
  // the sequence's orders, centroids and extents copied into `staging`
  // (pinned, reused) once `fence` is done.
  // Clusterings read back and packed whose keys wait for the stored CRCs of
  // their pages (Poll keeps them then); dropped after kAwaitLimit.
  struct AwaitedKeep {
    std::shared_ptr<const LaterKey> key;
    std::vector<uint8_t> value;
    std::chrono::steady_clock::time_point since;
  };
  static constexpr std::chrono::seconds kAwaitLimit{30};
  std::vector<AwaitedKeep> awaited_keeps_;
  void KeepAwaited();
  struct KeepingRead {
    engine::CopyFence fence = engine::kFenceDone;
    std::vector<SummaryWork> work;
    std::vector<std::optional<PrefixKey>> keys;
    std::vector<std::shared_ptr<const LaterKey>> later;  // empty for an export
    std::vector<int64_t> offsets;
    // For an export (its key, not 0): every work item's clustering goes to
    // it, and the slot is freed once read.
    uint64_t export_key = 0;
    int export_slot = -1;
    engine::Tensor orders;  // the device orders, alive until the copy is done
    int layers = 0;
    int64_t per_layer = 0;  // order elements a layer
    int64_t centroid_row_bytes = 0, extent_row_bytes = 0;
    engine::DType centroid_dtype = engine::DType::kF32;
    std::chrono::steady_clock::time_point started;  // the copy enqueued
  };
  std::optional<KeepingRead> keeping_;
  engine::HostBuffer keep_staging_;
  // Packs read-back clusterings into values (FinishKeeping), checks those
  // received and stages them for reuse, made on first use.
  static constexpr int kPackThreads = 8;
  std::unique_ptr<ThreadPool> pack_pool_;
  ThreadPool& PackPool();
  // Makes `buffer` hold at least `bytes` (pinned), growing it at least
  // twofold so that a run of longer prompts pins rarely.
  absl::Status ReserveStaging(engine::HostBuffer& buffer, int64_t bytes);
  // The staging one sequence of the model's context needs: reading back
  // (keep_staging_) or reusing (reuse_staging_) its clusterings. Its
  // orders, and every sparse layer's centroid and extent rows of a slot.
  int64_t OneSequenceStagingBytes() const;
  // The host regions of released sequences whose clusters' write to the
  // SSD outlived ClusterSpill's forget_timeout: freed when it returns.
  absl::flat_hash_map<int64_t, std::vector<KvBlockManager::HostRegion>> orphaned_regions_;
  // Sequences this step cannot decode (EndStep reports them lost): paused
  // ones that found no pages for their ring, admitted ones whose first step
  // was not the one they were admitted for; and why.
  std::vector<std::pair<int64_t, std::string>> ring_lost_;
  // An admission's encoding, run on its own thread (over admit_pool_)
  // while the steps go on: everything it reads is its own copy (the
  // sequence's entry in sequences_ may move meanwhile) or stays put until
  // it is joined (the landing records, the host regions). AdmitDone joins
  // it and uploads the tables; DropAdmitted and Release join it first.
  struct AdmitJob {
    int policy = 0;
    Sequence::Admission admission;
    engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
    std::vector<int64_t> units;       // per work item, host units per head
    std::vector<int64_t> first_unit;  // per sparse layer, its region's
    std::vector<LandedPage> pages;
    // Per sparse layer: the slot's table rows, built by the encode.
    struct Rows {
      std::vector<int32_t> base, where, count;
    };
    std::vector<Rows> rows;
    std::vector<absl::Status> errors;  // per (layer, head)
    std::chrono::steady_clock::time_point started;
    std::chrono::steady_clock::time_point finished;  // written before `done`
    std::atomic<bool> done{false};
    std::thread thread;
  };
  absl::flat_hash_map<int64_t, std::unique_ptr<AdmitJob>> admit_jobs_;
  std::unique_ptr<ThreadPool> admit_pool_;
  // Waits for a sequence's admission job, if any, and forgets it.
  void JoinAdmitJob(int64_t seq_id);
  // The job's encoding of one sparse layer's (index li) chunks into the
  // host tier for KV head h: its pieces written, its rows of the slot's
  // tier tables filled (host copies of piece_base, piece_host and
  // piece_count).
  absl::Status EncodeAdmittedHead(const AdmitJob& job, int li, int h, int32_t* base, int32_t* where,
                                  int32_t* count) const;
  // The work of an admitted sequence's first decode step (every item a
  // chunk to cluster, contiguous), or nullopt when this runner would not
  // admit sequence seq_id of `workload` with a prompt of `tokens` tokens.
  std::optional<std::vector<SummaryWork>> AdmissionWork(int64_t seq_id, int workload,
                                                        int tokens) const;
  // The (layer, work item) host units per head Admit reserves.
  std::vector<int64_t> AdmittedUnits(const Sequence& seq) const;
  std::vector<int> free_slots_;
  std::vector<Entry> entries_;  // this step's, ClusterKV first, then Quest, then streaming
  PlanObserver observer_;
  Stats stats_;
  // track_selection: last step's selected indices per (seq, layer, kv head).
  absl::flat_hash_map<int64_t, std::vector<std::vector<int32_t>>> last_selection_;
};

// The KV policies of a model on every rank of its tensor-parallel group: a
// KvPolicyRunner per rank over that rank's KV heads, each its rank model's
// planner, and an engine::RankedPlanner over them as the leader's (with one
// rank, the runner itself). With host-homed clusters over several ranks,
// the runners share a RankSharedTier: each rank homes its own heads'
// clusters in host regions of its own, and a sequence's ring is the same
// pages on every rank.
//
// Thread-safety: as KvPolicyRunner.
class RankedKvPolicies {
 public:
  static absl::StatusOr<std::unique_ptr<RankedKvPolicies>> Install(
      engine::Model* model, const std::vector<KvPolicyConfig>& policies,
      const KvPolicyRunnerOptions& options);
  // Takes the planners off the ranks' models.
  ~RankedKvPolicies();

  // Rank 0's runner (its statistics stand for the ranks': they plan the
  // same sequences).
  KvPolicyRunner& leader() { return *runners_.front(); }
  const KvPolicyRunner& rank(int r) const { return *runners_[static_cast<size_t>(r)]; }
  int num_ranks() const { return static_cast<int>(runners_.size()); }

 private:
  explicit RankedKvPolicies(engine::Model* model) : model_(model) {}

  engine::Model* model_;
  std::unique_ptr<RankSharedTier> shared_;  // outlives the runners
  std::vector<std::unique_ptr<KvPolicyRunner>> runners_;
  std::unique_ptr<engine::RankedPlanner> ranked_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_POLICY_H_

// Tensor parallelism: how a model splits across the ranks of a group, the
// runner that makes every rank take each step the leader takes, and the
// planner that lets each rank run a KV policy over its own KV heads.
//
// One process, a thread per rank (per GPU): rank 0's thread runs the
// batcher and hands each step to the others by pointer, which costs about
// 1% of a decode step (bench/RESULTS.md); a process per rank would add the
// step's serialisation and a second owner of the KV per process.
//
// The split (Megatron-LM's, as vLLM and SGLang do it):
//  - attention: each rank owns Hq / N query heads and the KV heads they
//    read: Hkv / N of them, or, with fewer KV heads than ranks, one KV head
//    replicated on N / Hkv ranks. The qkv projection is split by those
//    heads (column-parallel), o_proj by the same columns (row-parallel),
//    followed by an all-reduce of its output.
//  - MLP: gate/up split by the intermediate dimension, down by the same
//    columns, then an all-reduce.
//  - embedding and LM head split by vocabulary: a rank's embedding rows
//    cover its ids (others read a zero row) and an all-reduce completes the
//    lookup; each rank's logits cover its ids and an all-gather joins them
//    before sampling, so every rank samples the same tokens.
//  - norms are replicated.
// Each rank's KV cache holds its own KV heads only: KV per token per GPU is
// 1 / N of the model's (times the replication when Hkv < N).
//
// Thread-safety: TensorParallelShard is a value. TensorParallelRunner and
// RankedPlanner: one thread (the leader's) calls them.
#ifndef STRATA_ENGINE_TENSOR_PARALLEL_H_
#define STRATA_ENGINE_TENSOR_PARALLEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/attention_planner.h"
#include "engine/model_config.h"
#include "engine/sampler.h"

namespace strata::engine {

class Communicator;
class Model;
struct StepInput;

// What rank `rank` of `size` holds of a model.
struct TensorParallelShard {
  int rank = 0;
  int size = 1;
  int q_heads = 0, first_q_head = 0;    // its query heads
  int kv_heads = 0, first_kv_head = 0;  // the KV heads they read
  int64_t intermediate = 0, first_intermediate = 0;
  int64_t vocab = 0, first_vocab = 0;  // its token ids
};

// The rank's share, or InvalidArgument saying which dimension does not
// split over `size` ranks (query heads, KV heads, intermediate size and
// vocabulary must divide by it; KV heads may instead divide it).
absl::StatusOr<TensorParallelShard> ShardModel(const ModelConfig& config, int rank, int size);

// One step of the leader's, for the other ranks to take too.
struct StepCall {
  const StepInput* input = nullptr;
  std::span<const SamplingRow> rows;  // ForwardSample's; empty for Forward
  bool sample = false;                // ForwardSample (else Forward)
};

// Makes the ranks other than the leader take the leader's steps: the
// leader's Model calls Start before it computes a step and Finish after,
// and each other rank's Model runs the same call on a thread of its own,
// meeting the leader in the step's collectives.
class RankFollowers {
 public:
  virtual ~RankFollowers() = default;
  // The call (and what it points to) stays valid until Finish returns OK
  // or with the ranks' own error.
  virtual void Start(const StepCall& call) = 0;
  // Waits at most `timeout` for every other rank's step: the first error
  // among them, or DeadlineExceeded naming the ranks still in it. Those
  // ranks still use the call: the caller may not let it go (Model exits
  // the process when they do not come back; see Model::EndStep).
  virtual absl::Status Finish(std::chrono::milliseconds timeout) = 0;
};

// The RankFollowers of a group: a thread per rank 1..N-1, each running its
// rank's Model. (A rank whose step fails, other than on a refused input,
// which every rank refuses alike before any collective, aborts the group's
// communicator itself: see Model.)
class TensorParallelRunner : public RankFollowers {
 public:
  // `followers` are ranks 1..N-1; not owned, they must outlive the runner.
  explicit TensorParallelRunner(std::vector<Model*> followers);
  ~TensorParallelRunner() override;

  void Start(const StepCall& call) override;
  absl::Status Finish(std::chrono::milliseconds timeout) override;

 private:
  struct Rank {
    Model* model = nullptr;
    std::thread thread;
    bool has_call = false;  // guarded by mu_
    bool done = false;      // guarded by mu_
    absl::Status status;    // guarded by mu_
    int64_t steps = 0;      // its thread's
  };
  void Loop(Rank& rank);
  // Chaos testing (STRATA_FAULT_STALL_RANK_AFTER_STEPS=n): the last rank
  // stops taking steps after n, stuck outside any collective, until the
  // runner stops; true then.
  bool Stalled(Rank& rank);

  absl::Mutex mu_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  StepCall call_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int64_t stall_after_ = -1;
};

// The attention planner of rank 0's model when every rank plans over its
// own KV heads (a KV policy per rank, engine/attention_planner.h). A step's
// calls (BeginStep, PlanLayer, GraphKey, ...) are each rank model's own, on
// its own planner: here they go to rank 0's. The calls that follow a
// sequence's life, which the batcher makes on rank 0's model between steps
// (Release, Pause, Resume, EndStep, ...), go to every rank's planner, and
// their answers combine: a sequence resumes only where every rank could
// take it back (the others give it up again), and one lost on any rank is
// lost.
//
// Thread-safety: as AttentionPlanner (the leader's thread; the other ranks
// are idle between steps).
class RankedPlanner : public AttentionPlanner {
 public:
  // Rank 0's planner first; not owned.
  explicit RankedPlanner(std::vector<AttentionPlanner*> ranks) : ranks_(std::move(ranks)) {}

  absl::Status BeginStep(const StepInput& input, const AttentionBatch& batch) override {
    return ranks_[0]->BeginStep(input, batch);
  }
  absl::StatusOr<const SparsePlan*> PlanLayer(int layer, const AttentionBatch& batch,
                                              const Tensor& qkv, Tensor& k_cache,
                                              Tensor& v_cache) override {
    return ranks_[0]->PlanLayer(layer, batch, qkv, k_cache, v_cache);
  }
  bool Prefetches() const override { return ranks_[0]->Prefetches(); }
  bool PrefetchesLayer(int layer) const override { return ranks_[0]->PrefetchesLayer(layer); }
  absl::Status PrefetchLayer(int layer, const AttentionBatch& batch, const Tensor& guessed_qkv,
                             Tensor& k_cache, Tensor& v_cache) override {
    return ranks_[0]->PrefetchLayer(layer, batch, guessed_qkv, k_cache, v_cache);
  }
  bool Replayable() const override { return ranks_[0]->Replayable(); }
  absl::StatusOr<std::optional<std::vector<int32_t>>> GraphKey() override {
    return ranks_[0]->GraphKey();
  }
  void CountGraphStep() override { ranks_[0]->CountGraphStep(); }

  void Release(int64_t seq_id) override;
  void NotePrompt(int64_t seq_id, int loaded_tokens, std::span<const uint32_t> page_crcs) override;
  void NoteStoredPrompt(int64_t seq_id, int stored_tokens, StoredPageCrcs page_crcs) override;
  void NoteExport(int64_t seq_id, uint64_t export_key, int prompt_tokens) override;
  // Each value to the rank rank 0's planner names (ImportedStateRank).
  void NoteImportedState(int64_t seq_id, std::vector<std::vector<uint8_t>> state) override;
  // Every rank's, in rank order (the first error is returned, after all ran).
  absl::Status Poll() override;
  bool Reordered(int64_t seq_id) const override;
  void Pause(int64_t seq_id) override;
  absl::StatusOr<bool> Resume(int64_t seq_id) override;
  absl::StatusOr<std::vector<LostSequence>> EndStep() override;
  std::vector<OffGpuRange> TakeOffGpuRanges() override;

 private:
  std::vector<AttentionPlanner*> ranks_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_TENSOR_PARALLEL_H_

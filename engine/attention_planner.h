// engine::AttentionPlanner: the hook through which a KV policy
// (kvtier/kv_policy.h) makes decode steps attend to chosen tokens instead of
// the whole cache.
//
// Model::Forward calls BeginStep once per step with the step's sequences,
// then PlanLayer once per layer after the layer's keys are in the cache and
// before its attention. PlanLayer may reorganise that layer's cache (e.g.
// cluster and reorder a sequence's keys) and returns the layer's plan: the
// decode queries that attend sparsely (Backend::SparseAttention), or null
// when every query of the layer attends densely. Sequences are identified
// across steps by StepInput::seq_ids; Release forgets one whose KV is gone
// (finished, cancelled or preempted).
//
// Decode steps may replay from recorded CUDA graphs: after BeginStep the
// model asks GraphKey, and a planner whose layer plans this step are only
// kernel launches (no cache reorganisation, no host reads) uploads what they
// read and returns a key naming every host value the launches depend on,
// the planner's identity among them (a recording holds its buffers). The
// model then records PlanLayer's launches once per key and replays them on
// later steps with that key, so PlanLayer may run for such a step once, not
// at all, or twice (a capture that failed, then the direct run); the model
// calls CountGraphStep once when the step has run.
//
// Thread-safety: driven by the thread that runs the model.
#ifndef STRATA_ENGINE_ATTENTION_PLANNER_H_
#define STRATA_ENGINE_ATTENTION_PLANNER_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace strata::engine {

struct StepInput;

class AttentionPlanner {
 public:
  virtual ~AttentionPlanner() = default;

  // `batch` holds the step's device tables; it stays valid until the step ends.
  virtual absl::Status BeginStep(const StepInput& input, const AttentionBatch& batch) = 0;
  // `batch` is the step's batch as `layer` sees it: its page group's block
  // table (AttentionBatch::UpperLayers for the upper layers).
  virtual absl::StatusOr<const SparsePlan*> PlanLayer(int layer, const AttentionBatch& batch,
                                                      const Tensor& qkv, Tensor& k_cache,
                                                      Tensor& v_cache) = 0;
  // Prefetch. A planner that Prefetches() may be asked, after PlanLayer of
  // layer - 1 in a pure decode step, whether it PrefetchesLayer(layer); if
  // so the model guesses that layer's queries from layer - 1's input (the
  // residual stream before layer - 1 adds to it) and `layer`'s own norm,
  // projection and rotary embedding, and calls PrefetchLayer with them. The
  // planner may then start fetching what it expects the layer to select as
  // side work (Backend::BeginSideWork), which PlanLayer(layer) joins; it
  // must not change what PlanLayer computes, only how fast. The answers
  // must be the same for the steps that share a GraphKey.
  virtual bool Prefetches() const { return false; }
  virtual bool PrefetchesLayer(int /*layer*/) const { return false; }
  virtual absl::Status PrefetchLayer(int /*layer*/, const AttentionBatch& /*batch*/,
                                     const Tensor& /*guessed_qkv*/, Tensor& /*k_cache*/,
                                     Tensor& /*v_cache*/) {
    return absl::OkStatus();
  }
  virtual void Release(int64_t seq_id) = 0;
  // Before a sequence's first step (again after it is recomputed): the
  // first `loaded_tokens` tokens of its prompt were loaded from stored
  // prefixes (KvMemory::LoadPrefix), pages whose bytes `page_crcs` name
  // (KvMemory::LoadedPrefixCrcs). A planner may reuse what it computed
  // before on those exact bytes (ClusterKV's clusterings,
  // kvtier/clustering_store.h) and keep what it computes on them now.
  virtual void NotePrompt(int64_t /*seq_id*/, int /*loaded_tokens*/,
                          std::span<const uint32_t> /*page_crcs*/) {}
  // After the sequence's prompt is computed (before its first decode step)
  // and its first `stored_tokens` tokens' whole pages were stored
  // (KvMemory::StorePrefix): `page_crcs` answers, from the thread that
  // drives the model, what KvMemory::PrefixStoreCrcs does for that store
  // (nullopt while its copies are in flight). The pages this sequence
  // computes on are the bytes stored, so a planner may keep what it
  // computes on them under their CRCs as for loaded pages (NotePrompt),
  // and the first sequence that loads them reuses it.
  using StoredPageCrcs = std::function<std::optional<std::vector<uint32_t>>()>;
  virtual void NoteStoredPrompt(int64_t /*seq_id*/, int /*stored_tokens*/,
                                StoredPageCrcs /*page_crcs*/) {}
  // Disaggregated serving, prefill side: the sequence's prompt
  // (prompt_tokens) is computed here and its KV exported under `export_key`
  // (KvMemory::ExportKv) to a worker that decodes it. At the step that
  // completes the prompt, a planner may compute from the prompt's KV what
  // that worker's first decode step would (ClusterKV's clustering), without
  // changing the cache, and hand it over with the export
  // (KvMemory::AddExportPlannerState), then or by a later Poll.
  virtual void NoteExport(int64_t /*seq_id*/, uint64_t /*export_key*/, int /*prompt_tokens*/) {}
  // Between steps, and while the engine idles with KV work in flight:
  // finishes what a step left running (e.g. hands an export the values it
  // read back after the step: KvMemory::ExpectExportPlannerState).
  virtual absl::Status Poll() { return absl::OkStatus(); }
  // Decode side: before the sequence's first step, what the prefill
  // worker's planner computed on the prompt KV it sent
  // (KvMemory::TakeImportedPlannerState), each value checked by the planner
  // before use and used instead of computing it where it fits.
  virtual void NoteImportedState(int64_t /*seq_id*/, std::vector<std::vector<uint8_t>> /*state*/) {}
  // Tensor parallelism: the rank whose planner a value of that state is
  // for (each rank's planner computed its own on the prefill worker); -1:
  // every rank's; any other: none (e.g. the prefill worker had another
  // number of ranks).
  virtual int ImportedStateRank(std::span<const uint8_t> /*value*/) const { return -1; }
  // Whether PlanLayer reorganised the sequence's paged KV (e.g. clustered
  // its keys in place), so that its pages no longer hold its tokens in
  // order: such KV is not stored for reuse by prefix.
  virtual bool Reordered(int64_t /*seq_id*/) const { return false; }
  // The sequence's KV went to a lower tier while it is paused (swapped
  // out): the planner may give back GPU memory it holds for the sequence
  // alone (e.g. a recall ring), keeping what it needs to resume it. If it
  // cannot take that memory back when the sequence next runs (Resume was
  // not called, or memory went since), EndStep reports the sequence lost.
  virtual void Pause(int64_t /*seq_id*/) {}
  // Before a paused sequence runs again: takes back what Pause gave up.
  // False (nothing taken) when that memory is not free now; the caller
  // keeps the sequence paused and tries later.
  virtual absl::StatusOr<bool> Resume(int64_t /*seq_id*/) { return true; }
  // Whether GraphKey may ever give a key. When it may, graphed steps are
  // padded to their batch bucket with one-token sequences past the input's
  // (BeginStep's batch holds them), which the planner must plan too for the
  // step to stay sparse; when not, every step runs directly and unpadded.
  virtual bool Replayable() const { return false; }
  // After BeginStep: the key of this step's layer plans when they can be
  // replayed from a recording, nullopt when PlanLayer must run.
  virtual absl::StatusOr<std::optional<std::vector<int32_t>>> GraphKey() { return std::nullopt; }
  // A step that GraphKey gave a key has run (replayed, recorded or direct):
  // the planner counts its statistics here, not in PlanLayer.
  virtual void CountGraphStep() {}
  // After each step (its tokens are back on the host): the sequences whose
  // KV could not be trusted in it, with why (e.g. a host block that failed
  // its check). Their tokens of this step must not be used; the caller
  // releases them (Release) and recomputes them. May wait for the device.
  struct LostSequence {
    int64_t seq_id;
    std::string why;
  };
  virtual absl::StatusOr<std::vector<LostSequence>> EndStep() {
    return std::vector<LostSequence>();
  }
  // After EndStep, with two page groups (ModelOptions::num_upper_pages): the
  // token ranges whose upper-layer KV this step moved to a lower tier and
  // the planner will never read from the paged cache again, so the caller
  // may free their upper pages (KvMemory::ReleaseUpper). Each is taken once.
  struct OffGpuRange {
    int64_t seq_id;
    int begin, end;  // tokens [begin, end)
  };
  virtual std::vector<OffGpuRange> TakeOffGpuRanges() { return {}; }
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_ATTENTION_PLANNER_H_

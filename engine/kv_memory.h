// engine::KvMemory: the batcher's view of whoever owns a worker's KV memory.
//
// The batcher decides which sequences run; the KV memory decides where their
// KV lives. It hands out pages of the model's paged caches (the GPU tier),
// and, when it has a host tier, can move a paused sequence's KV there
// (SwapOut) and back (SwapIn), so that a preempted sequence resumes without
// recomputing its tokens, as vLLM's swap preemption does.
// kvtier::KvBlockManager is the implementation with tiers; PagedKvMemory
// below is the GPU pages alone, for a batcher without one.
//
// Page groups. A model may split its layers into two groups with caches
// and block tables of their own (ModelOptions::upper_first_layer): the
// lower layers, which keep every token on the GPU, and the upper layers,
// where a KV policy may home a sequence's older tokens in a lower tier and
// free their pages (SequencePages::upper holds kPageOffGpu there). With one
// group every layer is "lower" and the upper group has no pages.
//
// Sequences are named by the batcher's ids. Every method is called between
// steps by the batcher's thread.
//
// Thread-safety: not thread-safe; driven by the batcher's thread.
#ifndef STRATA_ENGINE_KV_MEMORY_H_
#define STRATA_ENGINE_KV_MEMORY_H_

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/layer_kv_observer.h"
#include "engine/page_allocator.h"

namespace strata::engine {

enum class PageGroup { kLower = 0, kUpper = 1 };

// An upper block table entry whose page was freed: the tokens' KV of the
// upper layers lives only in a lower tier (never read from the paged cache).
inline constexpr int32_t kPageOffGpu = -1;

// One sequence's pages, in token order, per group.
struct SequencePages {
  std::vector<int32_t> lower;
  // Empty when the model has one group; else as long as `lower`.
  std::vector<int32_t> upper;
  // The workload the KV belongs to (its request's kv_policy: one per
  // profile), which a KV memory with per-workload budgets charges.
  int workload = 0;
  bool empty() const { return lower.empty() && upper.empty(); }
};

// As a LayerKvObserver (Model::set_layer_kv_observer), it may move a
// prompt's KV out layer by layer as a step is enqueued (ExportByLayer).
class KvMemory : public LayerKvObserver {
 public:
  ~KvMemory() override = default;

  // ---- The GPU tier: pages of the model's caches, per group --------------
  virtual int page_size() const = 0;
  virtual int num_pages(PageGroup group) const = 0;
  virtual int num_free_pages(PageGroup group) const = 0;
  bool has_upper_group() const { return num_pages(PageGroup::kUpper) > 0; }
  // Appends `count` free pages of `group` to `pages`; false (taking none)
  // when fewer are free.
  virtual bool AllocatePages(PageGroup group, int count, std::vector<int32_t>& pages) = 0;
  // Frees every page of `pages` (kPageOffGpu entries skipped) and clears it.
  // FailedPrecondition names a page that was not handed out (the others are
  // freed).
  virtual absl::Status FreePages(PageGroup group, std::vector<int32_t>& pages) = 0;

  // Extends `pages` to hold `tokens` tokens in every group; false (taking
  // nothing) when a group has too few free pages.
  bool Grow(SequencePages& pages, int tokens);
  // Pages `pages` lacks to hold `tokens` tokens (the same in each group).
  int PagesToGrow(const SequencePages& pages, int tokens) const;
  // Frees every page of both groups and clears them.
  absl::Status Free(SequencePages& pages);
  // Frees the upper pages that lie wholly inside tokens [begin, end), whose
  // upper-layer KV a KV policy no longer reads from the paged cache, and
  // marks them kPageOffGpu. Returns how many were freed.
  absl::StatusOr<int> ReleaseUpper(SequencePages& pages, int begin, int end);

  // ---- Swap (a host tier; the defaults have none) ----------------------
  // Moves the KV of the first `tokens` tokens held in `pages` to the host
  // tier and frees the pages (cleared); later compute that reuses them
  // starts after the copy. Upper entries that are kPageOffGpu stay so when
  // the sequence comes back. False (nothing moved) when the host tier cannot
  // hold it; the caller then recomputes the sequence later.
  virtual absl::StatusOr<bool> SwapOut(int64_t /*seq_id*/, SequencePages& /*pages*/,
                                       int /*tokens*/) {
    return false;
  }
  // Pages of `group` a swapped sequence needs to come back (0 when it is not
  // swapped).
  virtual int SwapInPages(int64_t /*seq_id*/, PageGroup /*group*/) const { return 0; }
  // Brings a swapped sequence's KV back into newly allocated pages, set in
  // `pages` (empty on entry); the next step's compute sees it. False
  // (nothing allocated) when too few pages are free. DataLoss when the host
  // copy is corrupt (its check failed): the host copy is dropped and the
  // caller recomputes the sequence. NotFound for a sequence not swapped.
  virtual absl::StatusOr<bool> SwapIn(int64_t /*seq_id*/, SequencePages& /*pages*/) {
    return absl::NotFoundError("no host tier");
  }
  // Whether a swapped sequence's KV is moving between lower tiers (e.g. up
  // from an SSD): SwapIn returns false until the move lands, whatever pages
  // are free, and the caller waits for it instead of giving the copy up.
  virtual bool SwapMoving(int64_t /*seq_id*/) const { return false; }
  // Forgets a swapped sequence's host copy (cancelled while swapped).
  virtual void DropSwapped(int64_t /*seq_id*/) {}
  // Called once per step before it is scheduled: finishes bookkeeping of
  // copies that completed.
  virtual absl::Status Poll() { return absl::OkStatus(); }
  // Whether copies or moves are in flight that only Poll finishes (e.g.
  // stored prefixes on their way to an SSD): an idle caller keeps polling
  // while this holds.
  virtual bool Settling() const { return false; }

  // ---- Prefix reuse (a store of prompt KV; the defaults have none) -------
  // For a sequence about to be computed from its first token (`pages`
  // empty): brings the KV of the longest stored prefix of `tokens`, whole
  // pages and at least one token short of all of them, into pages it
  // allocates and sets in `pages`; the next step's compute sees it. Returns
  // the tokens loaded (0: none, nothing allocated).
  virtual absl::StatusOr<int> LoadPrefix(std::span<const int32_t> /*tokens*/,
                                         SequencePages& /*pages*/) {
    return 0;
  }
  // The stored CRC32C of each page the last LoadPrefix loaded, in order:
  // what names those pages' bytes exactly (a KV policy keys what it
  // computes on them by it; AttentionPlanner::NotePrompt).
  virtual std::vector<uint32_t> LoadedPrefixCrcs() const { return {}; }
  // When a sequence's prompt is computed (before a KV policy reorders its
  // pages) and before a finished sequence's pages are freed: keeps the KV
  // of the whole pages of `tokens` (the tokens whose KV `pages` hold) for
  // later sequences that start with them, as far as the store has room.
  virtual absl::Status StorePrefix(std::span<const int32_t> /*tokens*/,
                                   const SequencePages& /*pages*/) {
    return absl::OkStatus();
  }
  // The last StorePrefix call, as an id for PrefixStoreCrcs (0: it stored
  // no page).
  virtual uint64_t LastPrefixStore() const { return 0; }
  // The stored CRC32C of each page that store `id` stored, by page index
  // from the first page of its tokens (0 for a page it did not store: one
  // stored before by another sequence, or one refused); what
  // LoadedPrefixCrcs will give a sequence that loads those pages, so a KV
  // policy may key what it computed on them by it, as for loaded pages
  // (AttentionPlanner::NoteStoredPrompt). nullopt while the store's copies
  // are in flight; empty for an id no longer remembered (only the latest
  // stores are).
  virtual std::optional<std::vector<uint32_t>> PrefixStoreCrcs(uint64_t /*id*/) {
    return std::vector<uint32_t>{};
  }

  // ---- KV from and for other workers (disaggregated serving) ------------
  // Prefill side: hands the KV of `tokens` (the tokens whose KV `pages`
  // hold) over under `key`, to be sent to the worker that decodes it, as
  // the prompt is computed: each call exports the whole pages not exported
  // yet, so a long prompt's KV leaves chunk by chunk while the rest is
  // computed; the `final` call (the prompt done, before its pages are
  // freed) exports the rest, the last page partial. Unimplemented without
  // a host tier; ResourceExhausted when it has no room now (a later call
  // tries again).
  virtual absl::Status ExportKv(uint64_t /*key*/, std::span<const int32_t> /*tokens*/,
                                const SequencePages& /*pages*/, bool /*final*/) {
    return absl::UnimplementedError("KV export needs a KV block manager with a host tier");
  }
  // Prefill side, before the step that computes the rest of export `key`'s
  // prompt (`tokens`, all of it, in `pages`): the KV of the pages not
  // exported yet may leave layer by layer as that step's forward writes it
  // (LayerKvWritten), beside the later layers' compute rather than after
  // the step; the final ExportKv then ends the export. Whether it will;
  // false leaves it all to the final ExportKv.
  virtual bool ExportByLayer(uint64_t /*key*/, std::span<const int32_t> /*tokens*/,
                             const SequencePages& /*pages*/) {
    return false;
  }
  absl::Status LayerKvWritten(int /*layer*/) override { return absl::OkStatus(); }
  // After the forward of a step that ExportByLayer armed (ended well or
  // not): compute enqueued from now on, which may write the pages once
  // their sequences free them, waits for the copies the step started; an
  // export whose layers were not all copied out (the forward ended early)
  // fails at its final ExportKv.
  virtual absl::Status FinishLayerExports() { return absl::OkStatus(); }
  // Forgets an export whose sequence ended before its final call.
  virtual void DropExport(uint64_t /*key*/) {}
  // Prefill side: what the KV policy computed on the export's prompt
  // (AttentionPlanner::NoteExport), sent after its KV. Called at most once
  // per export and planner (a tensor-parallel group has one per rank; the
  // values are sent together), before or after its final ExportKv; after
  // it, only when ExpectExportPlannerState said it would come (the export's
  // end waits).
  virtual void AddExportPlannerState(uint64_t /*key*/,
                                     std::vector<std::vector<uint8_t>> /*state*/) {}
  // The export does not end before AddExportPlannerState (its pages go
  // meanwhile): as many calls as this one has had. Called before its final
  // ExportKv.
  virtual void ExpectExportPlannerState(uint64_t /*key*/) {}
  // Decode side: for a sequence about to start (`pages` empty), brings the
  // KV another worker computed for `tokens` and sent under `transfer_id`
  // into pages it allocates and sets in `pages`. False (nothing allocated)
  // when too few pages are free now: ask again. With max_bytes > 0, a call
  // moves about that many bytes of the transfer at most (whole pages, one
  // at least) and answers Unavailable while pages remain: ask again (a
  // step's share, so that the steps of running sequences are not held up
  // by a long prompt's KV); the pages are held meanwhile. Unavailable too
  // while the sender has not said it is done (the request may start
  // before its KV has all landed: its first token streams meanwhile).
  // NotFound when no such transfer is held (never reserved, or its lease
  // expired); Aborted when its sender failed (the prompt can be computed
  // here instead); DataLoss when a block failed its check;
  // FailedPrecondition when blocks are missing or do not cover `tokens`.
  // Once loaded, or after an error, the transfer is gone; DropImported
  // drops one part-loaded too. The sequence (the batcher's id, and
  // pages.workload) is named so that a KV policy may take the upper layers
  // of some of its tokens straight into a lower tier (their upper entries
  // are then kPageOffGpu); its first step must then be a decode step
  // (seq_id < 0 when it is not: nothing is admitted).
  virtual absl::StatusOr<bool> LoadImported(int64_t /*seq_id*/, uint64_t /*transfer_id*/,
                                            std::span<const int32_t> /*tokens*/,
                                            SequencePages& /*pages*/, int64_t /*max_bytes*/) {
    return absl::NotFoundError("no KV transfers: this worker has no KV block manager");
  }
  // Forgets a transfer that will not be loaded (its request ended first).
  virtual void DropImported(uint64_t /*transfer_id*/) {}
  // After a LoadImported that loaded: the planner state that came with the
  // transfer (AddExportPlannerState on the sender), taken once.
  virtual std::vector<std::vector<uint8_t>> TakeImportedPlannerState() { return {}; }
  // After a LoadImported that loaded: whether every page came as the
  // caches' own bytes (not coded by a lossy codec), so that the KV is what
  // computing the prompt here gives and may be stored as a prefix.
  virtual bool ImportedKvExact() const { return false; }
};

// The GPU pages alone: a KvMemory over one PageAllocator per group, with no
// host tier.
class PagedKvMemory final : public KvMemory {
 public:
  // num_upper_pages 0: one group.
  PagedKvMemory(int page_size, int num_pages, int num_upper_pages = 0)
      : page_size_(page_size), lower_(num_pages), upper_(num_upper_pages) {}
  int page_size() const override { return page_size_; }
  int num_pages(PageGroup group) const override { return pool(group).num_pages(); }
  int num_free_pages(PageGroup group) const override { return pool(group).num_free(); }
  bool AllocatePages(PageGroup group, int count, std::vector<int32_t>& pages) override {
    return pool(group).Allocate(count, pages);
  }
  absl::Status FreePages(PageGroup group, std::vector<int32_t>& pages) override;

 private:
  PageAllocator& pool(PageGroup g) { return g == PageGroup::kLower ? lower_ : upper_; }
  const PageAllocator& pool(PageGroup g) const { return g == PageGroup::kLower ? lower_ : upper_; }
  int page_size_;
  PageAllocator lower_, upper_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_KV_MEMORY_H_

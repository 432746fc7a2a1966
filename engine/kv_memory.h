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
// Sequences are named by the batcher's ids. Every method is called between
// steps by the batcher's thread.
//
// Thread-safety: not thread-safe; driven by the batcher's thread.
#ifndef STRATA_ENGINE_KV_MEMORY_H_
#define STRATA_ENGINE_KV_MEMORY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/page_allocator.h"

namespace strata::engine {

class KvMemory {
 public:
  virtual ~KvMemory() = default;

  // The GPU tier: pages of the model's caches.
  virtual int num_pages() const = 0;
  virtual int num_free_pages() const = 0;
  // Appends `count` free pages to `pages`; false (taking none) when fewer
  // are free.
  virtual bool AllocatePages(int count, std::vector<int32_t>& pages) = 0;
  // Frees every page of `pages` and clears it. FailedPrecondition names a
  // page that was not handed out (the others are freed).
  virtual absl::Status FreePages(std::vector<int32_t>& pages) = 0;

  // ---- Swap (a host tier; the defaults have none) ----------------------
  // Moves the KV of the first `tokens` tokens held in `pages` to the host
  // tier and frees the pages (cleared); later compute that reuses them
  // starts after the copy. False (nothing moved) when the host tier cannot
  // hold it; the caller then recomputes the sequence later.
  virtual absl::StatusOr<bool> SwapOut(int64_t /*seq_id*/, std::vector<int32_t>& /*pages*/,
                                       int /*tokens*/) {
    return false;
  }
  // Pages a swapped sequence needs to come back (0 when it is not swapped).
  virtual int SwapInPages(int64_t /*seq_id*/) const { return 0; }
  // Brings a swapped sequence's KV back into newly allocated pages, appended
  // to `pages` (empty on entry); the next step's compute sees it. False
  // (nothing allocated) when too few pages are free. DataLoss when the host
  // copy is corrupt (its check failed): the host copy is dropped and the
  // caller recomputes the sequence. NotFound for a sequence not swapped.
  virtual absl::StatusOr<bool> SwapIn(int64_t /*seq_id*/, std::vector<int32_t>& /*pages*/) {
    return absl::NotFoundError("no host tier");
  }
  // Forgets a swapped sequence's host copy (cancelled while swapped).
  virtual void DropSwapped(int64_t /*seq_id*/) {}
  // Called once per step before it is scheduled: finishes bookkeeping of
  // copies that completed.
  virtual absl::Status Poll() { return absl::OkStatus(); }
};

// The GPU pages alone: a KvMemory over a PageAllocator, with no host tier.
class PagedKvMemory final : public KvMemory {
 public:
  explicit PagedKvMemory(int num_pages) : pages_(num_pages) {}
  int num_pages() const override { return pages_.num_pages(); }
  int num_free_pages() const override { return pages_.num_free(); }
  bool AllocatePages(int count, std::vector<int32_t>& pages) override {
    return pages_.Allocate(count, pages);
  }
  absl::Status FreePages(std::vector<int32_t>& pages) override { return pages_.Free(pages); }

 private:
  PageAllocator pages_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_KV_MEMORY_H_

// PageAllocator: hands out the KV cache's fixed-size pages.
//
// The cache is an array of num_pages pages of page_size tokens; a sequence
// owns a list of pages (its block table). Pages are recycled LIFO so a
// finished sequence's pages, still warm in cache, go to the next one.
// The allocator knows which pages are handed out, so a page freed twice or
// never handed out is refused rather than given to two sequences at once.
//
// Thread-safety: not thread-safe; owned by the batcher's thread.
#ifndef STRATA_ENGINE_PAGE_ALLOCATOR_H_
#define STRATA_ENGINE_PAGE_ALLOCATOR_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace strata::engine {

class PageAllocator {
 public:
  explicit PageAllocator(int num_pages);

  int num_pages() const { return num_pages_; }
  int num_free() const { return static_cast<int>(free_.size()); }

  // Appends `count` pages to `pages`; returns false (taking none) when fewer
  // than `count` are free or `count` is negative.
  bool Allocate(int count, std::vector<int32_t>& pages);
  // Returns all of `pages` to the pool and clears it. A page that is out of
  // range or not handed out (freed twice) is skipped, the others are freed,
  // and the result is FailedPrecondition naming it: a caller's bug, which
  // must not hand one page to two sequences.
  absl::Status Free(std::vector<int32_t>& pages);

 private:
  int num_pages_;
  std::vector<int32_t> free_;
  std::vector<bool> handed_out_;  // per page
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_PAGE_ALLOCATOR_H_

#include "engine/page_allocator.h"

#include "absl/strings/str_cat.h"

namespace strata::engine {

PageAllocator::PageAllocator(int num_pages)
    : num_pages_(num_pages > 0 ? num_pages : 0), handed_out_(num_pages_, false) {
  free_.reserve(num_pages_);
  for (int p = num_pages_ - 1; p >= 0; --p) free_.push_back(p);  // page 0 handed out first
}

bool PageAllocator::Allocate(int count, std::vector<int32_t>& pages) {
  if (count < 0 || count > num_free()) return false;
  for (int i = 0; i < count; ++i) {
    const int32_t page = free_.back();
    free_.pop_back();
    handed_out_[page] = true;
    pages.push_back(page);
  }
  return true;
}

absl::Status PageAllocator::Free(std::vector<int32_t>& pages) {
  absl::Status status;
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) {
    const int32_t page = *it;
    if (page < 0 || page >= num_pages_ || !handed_out_[page]) {
      if (status.ok()) {
        status = absl::FailedPreconditionError(absl::StrCat(
            "KV page ", page, " freed but not handed out (of ", num_pages_, " pages)"));
      }
      continue;
    }
    handed_out_[page] = false;
    free_.push_back(page);
  }
  pages.clear();
  return status;
}

}  // namespace strata::engine

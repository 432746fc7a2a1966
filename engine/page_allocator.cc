#include "engine/page_allocator.h"

namespace strata::engine {

PageAllocator::PageAllocator(int num_pages) : num_pages_(num_pages) {
  free_.reserve(num_pages);
  for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);  // page 0 handed out first
}

bool PageAllocator::Allocate(int count, std::vector<int32_t>& pages) {
  if (count > num_free()) return false;
  for (int i = 0; i < count; ++i) {
    pages.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void PageAllocator::Free(std::vector<int32_t>& pages) {
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free_.push_back(*it);
  pages.clear();
}

}  // namespace strata::engine

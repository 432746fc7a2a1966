#include "engine/kv_memory.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace strata::engine {

int KvMemory::PagesToGrow(const SequencePages& pages, int tokens) const {
  const int needed = (tokens + page_size() - 1) / page_size();
  return std::max(0, needed - static_cast<int>(pages.lower.size()));
}

bool KvMemory::Grow(SequencePages& pages, int tokens) {
  const int count = PagesToGrow(pages, tokens);
  if (count == 0) return true;
  if (!has_upper_group()) return AllocatePages(PageGroup::kLower, count, pages.lower);
  if (num_free_pages(PageGroup::kUpper) < count ||
      !AllocatePages(PageGroup::kLower, count, pages.lower)) {
    return false;
  }
  // Checked above: the upper pool has them.
  return AllocatePages(PageGroup::kUpper, count, pages.upper);
}

absl::Status KvMemory::Free(SequencePages& pages) {
  absl::Status lower = FreePages(PageGroup::kLower, pages.lower);
  absl::Status upper = FreePages(PageGroup::kUpper, pages.upper);
  return lower.ok() ? upper : lower;
}

absl::StatusOr<int> KvMemory::ReleaseUpper(SequencePages& pages, int begin, int end) {
  if (pages.upper.empty()) return 0;
  const int ps = page_size();
  // Pages whose every token is in [begin, end).
  const int first = (std::max(begin, 0) + ps - 1) / ps;
  const int last = std::min(end / ps, static_cast<int>(pages.upper.size()));
  std::vector<int32_t> freed;
  for (int p = first; p < last; ++p) {
    if (pages.upper[p] == kPageOffGpu) continue;
    freed.push_back(pages.upper[p]);
    pages.upper[p] = kPageOffGpu;
  }
  const int count = static_cast<int>(freed.size());
  if (absl::Status s = FreePages(PageGroup::kUpper, freed); !s.ok()) return s;
  return count;
}

absl::Status PagedKvMemory::FreePages(PageGroup group, std::vector<int32_t>& pages) {
  std::erase(pages, kPageOffGpu);
  return pool(group).Free(pages);
}

}  // namespace strata::engine

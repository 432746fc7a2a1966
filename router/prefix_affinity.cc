#include "router/prefix_affinity.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "absl/types/span.h"

namespace strata::router {

namespace {

PrefixAffinityOptions Checked(PrefixAffinityOptions options) {
  options.block_tokens = std::max(1, options.block_tokens);
  options.max_workers = std::max(1, options.max_workers);
  return options;
}

}  // namespace

PrefixAffinity::PrefixAffinity(PrefixAffinityOptions options) : options_(Checked(options)) {}

std::vector<uint64_t> PrefixAffinity::Keys(std::span<const int32_t> tokens) const {
  const size_t block = static_cast<size_t>(options_.block_tokens);
  std::vector<uint64_t> keys;
  keys.reserve(tokens.size() / block);
  uint64_t previous = 0;
  for (size_t begin = 0; begin + block <= tokens.size(); begin += block) {
    // A hash of this process's (absl's is seeded per process): the keys
    // never leave the router.
    previous = absl::HashOf(previous, absl::MakeConstSpan(tokens.data() + begin, block));
    keys.push_back(previous);
  }
  return keys;
}

void PrefixAffinity::Record(const std::string& worker_id, std::span<const uint64_t> keys,
                            int64_t capacity_tokens) {
  const int64_t capacity = capacity_tokens / options_.block_tokens;
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(worker_id);
  if (capacity < 1) {
    if (it != workers_.end()) {
      num_keys_ -= static_cast<int64_t>(it->second.keys.size());
      workers_.erase(it);
    }
    return;
  }
  if (it == workers_.end()) {
    while (!workers_.empty() && static_cast<int>(workers_.size()) >= options_.max_workers) {
      DropLeastRecentWorker();
    }
    it = workers_.try_emplace(worker_id).first;
  }
  Worker& w = it->second;
  w.last_use = ++clock_;
  // The prompt's later blocks are the first to go: a store that evicts by
  // use would keep the document's head, which the next request reuses.
  const size_t n = std::min(keys.size(), static_cast<size_t>(capacity));
  for (size_t i = n; i-- > 0;) {
    auto found = w.keys.find(keys[i]);
    if (found != w.keys.end()) {
      w.order.splice(w.order.end(), w.order, found->second);
    } else {
      w.order.push_back(keys[i]);
      w.keys.emplace(keys[i], std::prev(w.order.end()));
      ++num_keys_;
    }
  }
  while (static_cast<int64_t>(w.keys.size()) > capacity) {
    w.keys.erase(w.order.front());
    w.order.pop_front();
    --num_keys_;
  }
}

std::vector<std::pair<std::string, int64_t>> PrefixAffinity::Holders(
    std::span<const uint64_t> keys) const {
  std::vector<std::pair<std::string, int64_t>> holders;
  absl::MutexLock lock(&mu_);
  for (const auto& [id, w] : workers_) {
    size_t held = 0;
    while (held < keys.size() && w.keys.contains(keys[held])) ++held;
    if (held > 0) holders.emplace_back(id, static_cast<int64_t>(held) * options_.block_tokens);
  }
  std::sort(holders.begin(), holders.end(),
            [](const auto& a, const auto& b) { return a.second > b.second; });
  return holders;
}

int PrefixAffinity::num_workers() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(workers_.size());
}

int64_t PrefixAffinity::num_keys() const {
  absl::MutexLock lock(&mu_);
  return num_keys_;
}

void PrefixAffinity::DropLeastRecentWorker() {
  auto oldest = workers_.begin();
  for (auto it = workers_.begin(); it != workers_.end(); ++it) {
    if (it->second.last_use < oldest->second.last_use) oldest = it;
  }
  num_keys_ -= static_cast<int64_t>(oldest->second.keys.size());
  workers_.erase(oldest);
}

}  // namespace strata::router

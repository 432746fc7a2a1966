// PrefixAffinity: the router's memory of which decode worker holds the KV of
// which prompts, so that a prompt starting with one it sent a worker before
// (the next turn of a conversation, the same document with another
// question) goes back to that worker, whose prefix store
// (kvtier::PrefixIndex) keeps that KV, and is computed there instead of on a
// prefill worker: the stored part is loaded, and only the rest is prefilled.
//
// The router does not ask the workers what they store: it remembers what it
// sent them, as SGLang's cache-aware router does. A prompt is cut into
// blocks of block_tokens tokens; block i's key hashes block i's tokens with
// block i-1's key, so a key stands for the whole prompt up to its block.
// Each worker's keys are a set bounded by the prefix capacity the worker
// reports (WorkerLoad.prefix_capacity_tokens), least recently routed out
// first, which approximates its own store's eviction. The memory can be
// wrong (the worker evicted sooner, or restarted under a new worker_id, which
// starts with nothing remembered): a wrong guess only costs speed, the
// worker then computes what it does not have.
//
// Thread-safety: thread-safe; each method takes one mutex for a short,
// non-blocking section.
#ifndef STRATA_ROUTER_PREFIX_AFFINITY_H_
#define STRATA_ROUTER_PREFIX_AFFINITY_H_

#include <cstdint>
#include <list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace strata::router {

struct PrefixAffinityOptions {
  // Tokens per block (the unit of a match; the workers store whole pages).
  int block_tokens = 16;
  // Workers remembered at most; the one routed to least recently goes
  // first (a fleet that churns does not grow the router's memory).
  int max_workers = 1024;
};

class PrefixAffinity {
 public:
  explicit PrefixAffinity(PrefixAffinityOptions options);
  PrefixAffinity(const PrefixAffinity&) = delete;
  PrefixAffinity& operator=(const PrefixAffinity&) = delete;

  int block_tokens() const { return options_.block_tokens; }

  // The chain keys of the whole blocks of `tokens` (a partial last block
  // has none).
  std::vector<uint64_t> Keys(std::span<const int32_t> tokens) const;

  // `worker_id` now holds the KV of `keys`' blocks (a prompt it was sent).
  // It keeps at most capacity_tokens of them, most recently recorded last
  // out; capacity_tokens < block_tokens forgets the worker (it stores no
  // prefixes).
  void Record(const std::string& worker_id, std::span<const uint64_t> keys,
              int64_t capacity_tokens);

  // The workers holding leading blocks of `keys`, with the tokens those
  // blocks cover, most first (ties in no particular order); workers
  // holding none are left out.
  std::vector<std::pair<std::string, int64_t>> Holders(std::span<const uint64_t> keys) const;

  // Workers remembered now, and keys remembered over all of them.
  int num_workers() const;
  int64_t num_keys() const;

 private:
  struct Worker {
    std::list<uint64_t> order;  // least recently recorded first
    absl::flat_hash_map<uint64_t, std::list<uint64_t>::iterator> keys;
    uint64_t last_use = 0;  // of `clock_`, for dropping whole workers
  };
  void DropLeastRecentWorker() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PrefixAffinityOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Worker> workers_ ABSL_GUARDED_BY(mu_);
  uint64_t clock_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t num_keys_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_PREFIX_AFFINITY_H_

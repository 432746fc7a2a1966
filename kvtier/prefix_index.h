// PrefixIndex: which prompt prefixes have their KV stored for reuse, by
// content.
//
// A token sequence is cut into blocks of `block_tokens` (a KV page); block
// i's key is SHA-256 over (the namespace: model and KV format, block i-1's
// key, block i's tokens), so one key names one whole prefix, the way
// vLLM's prefix caching chains its block hashes. Keys are stable across
// processes (prefixes stored on an SSD outlive a worker). Each entry keeps
// its block's tokens too, and a lookup compares them, so even a hash
// collision cannot hand out another prefix's KV.
//
// An entry holds a caller's value (e.g. the host record with the block's
// KV of every layer) and a reference count: Lookup references the entries
// of the longest stored prefix of a prompt until the caller Releases them
// (while their KV is copied), and only unreferenced entries are evicted,
// least recently used first. The index does not own the values: Evict
// returns them to the caller.
//
// Thread-safety: not thread-safe; driven by the block manager's thread.
#ifndef STRATA_KVTIER_PREFIX_INDEX_H_
#define STRATA_KVTIER_PREFIX_INDEX_H_

#include <array>
#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"

namespace strata::kvtier {

// 128 bits of a block's SHA-256 chain key.
struct PrefixKey {
  std::array<uint64_t, 2> words{};
  bool operator==(const PrefixKey&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const PrefixKey& k) {
    return H::combine(std::move(h), k.words[0], k.words[1]);
  }
};

// The chain keys of `tokens`' whole blocks (a partial last block has none).
// `space` separates what must not share KV (the model, its KV dtype).
std::vector<PrefixKey> PrefixChain(std::string_view space, std::span<const int32_t> tokens,
                                   int block_tokens);

class PrefixIndex {
 public:
  explicit PrefixIndex(int block_tokens) : block_tokens_(block_tokens) {}

  int block_tokens() const { return block_tokens_; }
  int size() const { return static_cast<int>(entries_.size()); }

  // The values of the longest stored prefix of `tokens` whose chain is
  // `chain` (PrefixChain of the same tokens), one per block, each
  // referenced until Release; the entries become the most recently used.
  std::vector<int64_t> Lookup(std::span<const PrefixKey> chain, std::span<const int32_t> tokens);
  // Drops one reference Lookup took (by the same key).
  void Release(const PrefixKey& key);
  // Stores block `block` of `tokens` (its key chain[block]) with `value`;
  // false (nothing stored) when the key is there already.
  bool Insert(const PrefixKey& key, std::span<const int32_t> block_tokens, int64_t value);
  // Removes the least recently used unreferenced entry and returns it
  // (e.g. to keep it in a lower tier); nullopt when every entry is
  // referenced (or none is left).
  struct Evicted {
    PrefixKey key;
    std::vector<int32_t> tokens;
    int64_t value = 0;
  };
  std::optional<Evicted> Evict();
  // Removes `key` whatever its references (e.g. its KV failed a check) and
  // returns its value; nullopt when absent.
  std::optional<int64_t> Erase(const PrefixKey& key);
  // Whether `key` is stored (without touching its recency).
  bool Contains(const PrefixKey& key) const { return entries_.contains(key); }

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    int64_t value = 0;
    int refs = 0;
    std::list<PrefixKey>::iterator lru;  // in lru_, most recent at the back
  };

  int block_tokens_;
  absl::flat_hash_map<PrefixKey, Entry> entries_;
  std::list<PrefixKey> lru_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_PREFIX_INDEX_H_

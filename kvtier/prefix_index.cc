#include "kvtier/prefix_index.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace strata::kvtier {

std::vector<PrefixKey> PrefixChain(std::string_view space, std::span<const int32_t> tokens,
                                   int block_tokens) {
  std::vector<PrefixKey> chain;
  if (block_tokens < 1) return chain;
  const size_t blocks = tokens.size() / static_cast<size_t>(block_tokens);
  chain.reserve(blocks);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  PrefixKey parent;  // zero before the first block
  for (size_t b = 0; b < blocks; ++b) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    const uint64_t space_bytes = space.size();
    // Length-prefixed namespace, the parent key, then the block's tokens as
    // little-endian int32 (the x86 and Arm hosts strata runs on).
    if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx.get(), &space_bytes, sizeof(space_bytes)) != 1 ||
        EVP_DigestUpdate(ctx.get(), space.data(), space.size()) != 1 ||
        EVP_DigestUpdate(ctx.get(), parent.words.data(), sizeof(parent.words)) != 1 ||
        EVP_DigestUpdate(ctx.get(), tokens.data() + b * block_tokens,
                         sizeof(int32_t) * static_cast<size_t>(block_tokens)) != 1 ||
        EVP_DigestFinal_ex(ctx.get(), digest, &length) != 1 || length < sizeof(PrefixKey)) {
      // OpenSSL out of memory: no key, so nothing is reused past here.
      break;
    }
    PrefixKey key;
    std::memcpy(key.words.data(), digest, sizeof(key.words));
    chain.push_back(key);
    parent = key;
  }
  return chain;
}

std::vector<int64_t> PrefixIndex::Lookup(std::span<const PrefixKey> chain,
                                         std::span<const int32_t> tokens) {
  std::vector<int64_t> values;
  for (size_t b = 0; b < chain.size(); ++b) {
    auto it = entries_.find(chain[b]);
    if (it == entries_.end()) break;
    Entry& e = it->second;
    const size_t begin = b * static_cast<size_t>(block_tokens_);
    if (begin + block_tokens_ > tokens.size() ||
        !std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin() + begin)) {
      break;  // another prefix under the same key: not ours to reuse
    }
    ++e.refs;
    lru_.splice(lru_.end(), lru_, e.lru);
    values.push_back(e.value);
  }
  return values;
}

void PrefixIndex::Release(const PrefixKey& key) {
  auto it = entries_.find(key);
  if (it != entries_.end() && it->second.refs > 0) --it->second.refs;
}

bool PrefixIndex::Insert(const PrefixKey& key, std::span<const int32_t> block_tokens,
                         int64_t value) {
  if (entries_.contains(key) || static_cast<int>(block_tokens.size()) != block_tokens_) {
    return false;
  }
  Entry e;
  e.tokens.assign(block_tokens.begin(), block_tokens.end());
  e.value = value;
  e.lru = lru_.insert(lru_.end(), key);
  entries_.emplace(key, std::move(e));
  return true;
}

std::optional<int64_t> PrefixIndex::Erase(const PrefixKey& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return std::nullopt;
  const int64_t value = it->second.value;
  lru_.erase(it->second.lru);
  entries_.erase(it);
  return value;
}

std::optional<PrefixIndex::Evicted> PrefixIndex::Evict() {
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    auto entry = entries_.find(*it);
    if (entry->second.refs > 0) continue;
    Evicted evicted{*it, std::move(entry->second.tokens), entry->second.value};
    entries_.erase(entry);
    lru_.erase(it);
    return evicted;
  }
  return std::nullopt;
}

}  // namespace strata::kvtier

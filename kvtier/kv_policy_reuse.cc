// KvPolicyRunner's reuse of prompt chunks' ClusterKV clusterings through a
// ClusteringStore (see kv_policy.h and clustering_store.h).
//
// A chunk's clustering is kept only when the chunk's pages are stored
// prefix pages (loaded by the sequence, or stored by it when its prompt was
// computed, before it clustered them), and it is kept under those pages'
// stored CRCs: a later sequence finds it only by loading the very same
// bytes, so redoing the reorder and taking the centroids gives it exactly
// what the k-means would have (the k-means is deterministic on its keys).
//
// A stored value: a header (magic, version, begin, count, clusters, sparse
// layers, KV heads, head_dim, the centroids' dtype, the tensor-parallel
// rank and the ranks, as int32), then per sparse layer the reorder (int32
// [heads, count]), the centroids ([heads, clusters, head_dim] in the pools'
// dtype) and the cluster sizes (int32 [heads, clusters]).
//
// Keeping reads the clusterings back on the copy stream after the step that
// made them (the compute after it waits for the copy on the device, not
// the host), and stores them at a later step once the copy is done.
//
// Exports (disaggregated serving) use the same values: a prefill worker's
// runner clusters an exported prompt without moving its rows, after the
// step that completes it has delivered its first token (the next Poll),
// reads the clusterings back on the copy stream and hands them to the
// export once read (a later Poll; the export's end waits for them); the
// decode worker's runner takes them in place of stored ones, checked
// alike. Under tensor parallelism every rank's runner does so for its KV
// heads, and each rank of the decode worker takes its own rank's values
// (none when the two workers' rank counts differ: it clusters then).
#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvtier/kv_policy.h"
#include "kvtier/prefix_index.h"

namespace strata::kvtier {

using engine::Tensor;

namespace {

constexpr int32_t kMagic = 0x4c434b53;  // "SKCL"
constexpr int32_t kVersion = 2;
constexpr int kHeaderWords = 11;
constexpr int kRankWord = 9;  // then the ranks

// `element`: the bytes of a centroid element (the pools' dtype).
int64_t ValueBytes(int64_t count, int64_t clusters, int64_t layers, int64_t heads, int64_t d,
                   int64_t element) {
  return int64_t{kHeaderWords} * 4 +
         layers * heads * (count * 4 + clusters * d * element + clusters * 4);
}

// The bytes of a layer's block in a value of `s`'s shape.
int64_t LayerBytes(const StoredClustering& s) {
  const auto element = static_cast<int64_t>(engine::DTypeSize(s.centroid_dtype));
  return int64_t{s.heads} * (int64_t{s.count} * 4 + int64_t{s.clusters} * s.head_dim * element +
                             int64_t{s.clusters} * 4);
}

// The header a value of `want`'s shape has.
std::array<int32_t, kHeaderWords> ExpectedHeader(const StoredClustering& want) {
  return {kMagic,     kVersion,      want.begin,
          want.count, want.clusters, want.layers,
          want.heads, want.head_dim, static_cast<int32_t>(want.centroid_dtype),
          want.rank,  want.ranks};
}

}  // namespace

bool ClusteringHeaderIs(std::span<const uint8_t> value, const StoredClustering& want) {
  std::array<int32_t, kHeaderWords> header;
  if (value.size() < sizeof(header)) return false;
  std::memcpy(header.data(), value.data(), sizeof(header));
  return header == ExpectedHeader(want);
}

absl::StatusOr<std::shared_ptr<const StoredClustering>> ParseClustering(
    std::vector<uint8_t> value, const StoredClustering& want, ThreadPool& pool) {
  int32_t header[kHeaderWords];
  if (value.size() < sizeof(header)) return absl::DataLossError("shorter than its header");
  std::memcpy(header, value.data(), sizeof(header));
  const std::array<int32_t, kHeaderWords> expected = ExpectedHeader(want);
  for (int i = 0; i < kHeaderWords; ++i) {
    if (header[i] != expected[i]) {
      return absl::DataLossError(
          absl::StrCat("header word ", i, " is ", header[i], ", expected ", expected[i]));
    }
  }
  const int64_t n = want.count, c = want.clusters, layers = want.layers, heads = want.heads;
  const auto element = static_cast<int64_t>(engine::DTypeSize(want.centroid_dtype));
  const int64_t bytes = ValueBytes(n, c, layers, heads, want.head_dim, element);
  if (static_cast<int64_t>(value.size()) != bytes) {
    return absl::DataLossError(absl::StrCat(value.size(), " bytes, expected ", bytes));
  }
  auto parsed = std::make_shared<StoredClustering>(want);
  parsed->value = std::move(value);
  const StoredClustering& s = *parsed;
  std::vector<std::string> errors(static_cast<size_t>(layers));
  pool.ParallelFor(layers, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order(n), sizes(c);
    // seen[t] is the head that last took t, plus one: no clearing between
    // heads.
    std::vector<int32_t> seen(n, 0);
    for (int64_t l = begin; l < end; ++l) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t h = 0; h < heads && errors[l].empty(); ++h) {
        std::memcpy(order.data(), s.Order(l, h), n * 4);
        const auto mark = static_cast<int32_t>(h + 1);
        for (int64_t i = 0; i < n; ++i) {
          if (order[i] < 0 || order[i] >= n || std::exchange(seen[order[i]], mark) == mark) {
            errors[l] = absl::StrCat("layer ", l, " head ", h, ": the order is not a permutation");
            break;
          }
        }
        if (!errors[l].empty()) break;
        std::memcpy(sizes.data(), s.Sizes(l, h), c * 4);
        int64_t total = 0;
        for (int64_t j = 0; j < c; ++j) {
          if (sizes[j] < 0) {
            errors[l] = absl::StrCat("layer ", l, " head ", h, ": a negative cluster size");
            break;
          }
          total += sizes[j];
        }
        if (errors[l].empty() && total != n) {
          errors[l] = absl::StrCat("layer ", l, " head ", h, ": cluster sizes sum to ", total);
        }
      }
    }
  });
  for (const std::string& error : errors) {
    if (!error.empty()) return absl::DataLossError(error);
  }
  return std::shared_ptr<const StoredClustering>(std::move(parsed));
}

const uint8_t* StoredClustering::Order(int64_t layer, int64_t head) const {
  return value.data() + kHeaderWords * 4 + layer * LayerBytes(*this) + head * count * 4;
}

const uint8_t* StoredClustering::Centroids(int64_t layer, int64_t head) const {
  const auto element = static_cast<int64_t>(engine::DTypeSize(centroid_dtype));
  return value.data() + kHeaderWords * 4 + layer * LayerBytes(*this) + int64_t{heads} * count * 4 +
         head * clusters * head_dim * element;
}

const uint8_t* StoredClustering::Sizes(int64_t layer, int64_t head) const {
  const auto element = static_cast<int64_t>(engine::DTypeSize(centroid_dtype));
  return value.data() + kHeaderWords * 4 + layer * LayerBytes(*this) + int64_t{heads} * count * 4 +
         int64_t{heads} * clusters * head_dim * element + head * clusters * 4;
}

ThreadPool& KvPolicyRunner::PackPool() {
  if (pack_pool_ == nullptr) pack_pool_ = std::make_unique<ThreadPool>(kPackThreads);
  return *pack_pool_;
}

absl::Status KvPolicyRunner::ReserveStaging(engine::HostBuffer& buffer, int64_t bytes) {
  if (buffer.defined() && static_cast<int64_t>(buffer.bytes) >= bytes) return absl::OkStatus();
  const int64_t grown =
      std::max(bytes, buffer.defined() ? 2 * static_cast<int64_t>(buffer.bytes) : 0);
  buffer = engine::HostBuffer();
  STRATA_ASSIGN_OR_RETURN(buffer, model_->backend().AllocateHost(static_cast<size_t>(grown)));
  return absl::OkStatus();
}

int64_t KvPolicyRunner::OneSequenceStagingBytes() const {
  if (centroids_.empty()) return 0;
  int full = model_->config().num_layers;
  for (const auto& p : policies_) {
    if (p->kind() == PolicyKind::kClusterKv) full = std::min(full, p->config().full_layers);
  }
  const int64_t layers = model_->config().num_layers - full;
  const auto centroid_row = static_cast<int64_t>(centroids_[0].nbytes()) / centroids_[0].dim(0);
  const auto extent_row = static_cast<int64_t>(extents_[0].nbytes()) / extents_[0].dim(0);
  return layers * (int64_t{model_->shard().kv_heads} * model_->options().max_context * 4 +
                   centroid_row + extent_row);
}

int KvPolicyRunner::SparseLayerIndex(const KvPolicy& policy, int layer) const {
  return layer - policy.config().full_layers;
}

void KvPolicyRunner::NotePrompt(int64_t seq_id, int loaded_tokens,
                                std::span<const uint32_t> page_crcs) {
  if (options_.clusterings == nullptr || loaded_tokens <= 0) return;
  NotedPrompt& noted = noted_prompts_[seq_id];
  noted.loaded_tokens = loaded_tokens;
  noted.page_crcs.assign(page_crcs.begin(), page_crcs.end());
}

void KvPolicyRunner::NoteStoredPrompt(int64_t seq_id, int stored_tokens, StoredPageCrcs page_crcs) {
  if (options_.clusterings == nullptr || stored_tokens <= 0) return;
  NotedPrompt& noted = noted_prompts_[seq_id];
  noted.stored_tokens = stored_tokens;
  noted.stored = std::make_shared<const StoredPageCrcs>(std::move(page_crcs));
}

void KvPolicyRunner::NoteExport(int64_t seq_id, uint64_t export_key, int prompt_tokens) {
  if (options_.exports == nullptr || export_key == 0) return;
  pending_exports_[seq_id] = {export_key, prompt_tokens};
}

int KvPolicyRunner::ImportedStateRank(std::span<const uint8_t> value) const {
  int32_t header[kHeaderWords];
  if (value.size() < sizeof(header)) return -2;  // no rank's: each clusters
  std::memcpy(header, value.data(), sizeof(header));
  if (header[0] != kMagic || header[1] != kVersion ||
      header[kRankWord + 1] != model_->shard().size) {
    return -2;
  }
  return header[kRankWord];
}

void KvPolicyRunner::NoteImportedState(int64_t seq_id, std::vector<std::vector<uint8_t>> state) {
  if (state.empty()) return;
  // An admitted import took its clusterings already (Admit): the values
  // (tens of megabytes for a long prompt) are not held again.
  if (auto it = sequences_.find(seq_id); it != sequences_.end() && it->second.admission) return;
  noted_prompts_[seq_id].imported = std::move(state);
}

StoredClustering KvPolicyRunner::WantedClustering(const KvPolicy& policy,
                                                  const SummaryWork& w) const {
  StoredClustering want;
  want.begin = w.begin;
  want.count = w.count;
  want.clusters = w.clusters;
  want.layers = model_->config().num_layers - policy.config().full_layers;
  want.heads = model_->shard().kv_heads;
  want.head_dim = model_->config().head_dim;
  want.centroid_dtype = centroids_[policy.config().full_layers].dtype();
  want.rank = model_->shard().rank;
  want.ranks = model_->shard().size;
  return want;
}

absl::Status KvPolicyRunner::FindClusterings(Entry& e) {
  auto noted = noted_prompts_.find(e.seq_id);
  if (noted == noted_prompts_.end()) return absl::OkStatus();
  NotedPrompt prompt = std::move(noted->second);
  noted_prompts_.erase(noted);  // its prompt's clusterings are this step's
  const KvPolicyConfig& config = e.policy->config();
  const int layers = model_->config().num_layers - config.full_layers;
  // Only a first clustering (blocks from 0 on) writes whole pool rows.
  if (e.policy->kind() != PolicyKind::kClusterKv || layers <= 0 || e.work.empty() ||
      e.work.front().first_block != 0) {
    return absl::OkStatus();
  }
  const int page = model_->options().page_size;
  const int heads = model_->shard().kv_heads, d = model_->config().head_dim;
  e.reuse.assign(e.work.size(), nullptr);
  e.keep.assign(e.work.size(), std::nullopt);
  e.keep_later.assign(e.work.size(), nullptr);
  e.kept_offsets.assign(e.work.size(), -1);
  auto wanted = [&](const SummaryWork& w) { return WantedClustering(*e.policy, w); };
  // What a clustering of chunk `w` is kept under: the pages' bytes, and
  // everything the clustering depends on besides.
  auto space_of = [&](const SummaryWork& w) {
    return absl::StrCat("clusterkv/v1/rank ", model_->shard().rank, " of ", model_->shard().size,
                        "/layers ", config.full_layers, "+", layers, "/iterations ",
                        config.kmeans_iterations, "/", w.begin, "+", w.count, " in ", w.clusters,
                        "/heads ", heads, "/d ", d);
  };
  // The key of a chunk of pages this sequence stored, once their CRCs are
  // known.
  auto later_key = [&](const SummaryWork& w) {
    const size_t first_page = static_cast<size_t>(w.begin / page);
    const size_t last_page = static_cast<size_t>((w.begin + w.count - 1) / page);
    auto later = std::make_shared<LaterKey>();
    later->space = space_of(w);
    later->first_page = first_page;
    for (size_t p = first_page; p <= last_page; ++p) {
      later->words.push_back(p < prompt.page_crcs.size() ? prompt.page_crcs[p] : 0);
    }
    later->stored = prompt.stored;
    return later;
  };
  if (!prompt.imported.empty()) {
    // Computed by the prefill worker on the KV it sent: each work item
    // takes the value for its very chunk, if one came and it checks out.
    const auto started = std::chrono::steady_clock::now();
    for (size_t wi = 0; wi < e.work.size(); ++wi) {
      const SummaryWork& w = e.work[wi];
      if (w.kind != SummaryWork::kCluster) continue;
      const StoredClustering want = wanted(w);
      for (std::vector<uint8_t>& value : prompt.imported) {
        int32_t header[kHeaderWords];
        if (value.size() < sizeof(header)) continue;
        std::memcpy(header, value.data(), sizeof(header));
        // Its very chunk, of this rank's KV heads.
        if (header[2] != w.begin || header[3] != w.count || header[kRankWord] != want.rank ||
            header[kRankWord + 1] != want.ranks) {
          continue;
        }
        // The prompt was stored as a prefix (it came exact): its clustering
        // is kept with it, for a later prompt that loads those pages.
        const bool keep = options_.clusterings != nullptr && prompt.stored != nullptr &&
                          w.begin + w.count <= prompt.stored_tokens;
        std::vector<uint8_t> kept;
        if (keep) kept = value;
        absl::StatusOr<std::shared_ptr<const StoredClustering>> parsed =
            ParseClustering(std::move(value), want, PackPool());
        if (parsed.ok()) {
          e.reuse[wi] = *std::move(parsed);
          stats_.imported_clusterings += layers;
          if (keep) {
            awaited_keeps_.push_back(
                {later_key(w), std::move(kept), std::chrono::steady_clock::now()});
          }
        } else {
          STRATA_LOG_WARN(
              "sequence {}: the prefill worker's clustering of tokens [{}, {}) was not used (the "
              "k-means runs here): {}",
              e.seq_id, w.begin, w.begin + w.count, std::string(parsed.status().message()));
        }
        break;
      }
    }
    STRATA_LOG_DEBUG(
        "sequence {}: {} clusterings from the prefill worker checked in {:.1f} ms", e.seq_id,
        prompt.imported.size(),
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started)
            .count());
    return absl::OkStatus();
  }
  if (options_.clusterings == nullptr) return absl::OkStatus();
  int64_t kept_elems = 0;
  for (size_t wi = 0; wi < e.work.size(); ++wi) {
    const SummaryWork& w = e.work[wi];
    if (w.kind != SummaryWork::kCluster) continue;
    const size_t first_page = static_cast<size_t>(w.begin / page);
    const size_t last_page = static_cast<size_t>((w.begin + w.count - 1) / page);
    const bool loaded =
        w.begin + w.count <= prompt.loaded_tokens && last_page < prompt.page_crcs.size();
    // Computed here on pages this sequence stored (some may be loaded):
    // kept once their CRCs are known.
    const bool stored = prompt.stored != nullptr && w.begin + w.count <= prompt.stored_tokens;
    if (!loaded && !stored) continue;
    const std::string space = space_of(w);
    if (!loaded) {
      e.keep_later[wi] = later_key(w);
      e.kept_offsets[wi] = kept_elems;
      kept_elems += int64_t{heads} * w.count;
      continue;
    }
    std::vector<int32_t> words;
    for (size_t p = first_page; p <= last_page; ++p) {
      words.push_back(static_cast<int32_t>(prompt.page_crcs[p]));
    }
    const std::vector<PrefixKey> key = PrefixChain(space, words, static_cast<int>(words.size()));
    if (key.empty()) continue;  // OpenSSL could not hash: neither reused nor kept
    const StoredClustering want = wanted(w);
    if (std::optional<std::vector<uint8_t>> value = options_.clusterings->Take(key[0])) {
      absl::StatusOr<std::shared_ptr<const StoredClustering>> parsed =
          ParseClustering(*std::move(value), want, PackPool());
      if (parsed.ok()) {
        e.reuse[wi] = *std::move(parsed);
        continue;
      }
      STRATA_LOG_WARN("sequence {}: a stored clustering of tokens [{}, {}) was not used: {}",
                      e.seq_id, w.begin, w.begin + w.count, std::string(parsed.status().message()));
    }
    e.keep[wi] = key[0];
    e.kept_offsets[wi] = kept_elems;
    kept_elems += int64_t{heads} * w.count;
  }
  if (kept_elems > 0) {
    STRATA_ASSIGN_OR_RETURN(e.kept_orders,
                            model_->backend().Allocate(engine::DType::kI32, {layers, kept_elems}));
  }
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::StageReuses() {
  // The staging buffer's last copy must be done before it is written again
  // (long done: it was enqueued a step ago at least).
  engine::Backend& b = model_->backend();
  if (reuse_fence_ != engine::kFenceDone) {
    STRATA_RETURN_IF_ERROR(b.WaitFence(reuse_fence_));
    reuse_fence_ = engine::kFenceDone;
  }
  const auto started = std::chrono::steady_clock::now();
  const int64_t heads = model_->shard().kv_heads, d = model_->config().head_dim;
  const int64_t max_blocks = max_blocks_;
  // Per entry with a reuse: its orders' rows (one per sparse layer), then
  // each layer's centroid row of its slot, then each layer's extent row.
  struct Staged {
    Entry* e;
    int full, layers;
    int64_t per_layer, at;
  };
  std::vector<Staged> staged;
  int64_t bytes = 0;
  for (Entry& e : entries_) {
    if (std::all_of(e.reuse.begin(), e.reuse.end(), [](const auto& r) { return r == nullptr; })) {
      continue;
    }
    const int full = e.policy->config().full_layers;
    Staged st{&e, full, model_->config().num_layers - full, 0, bytes};
    e.reuse_offsets.assign(e.work.size(), -1);
    for (size_t wi = 0; wi < e.work.size(); ++wi) {
      // An admitted import's rows are never reordered on the GPU: no orders.
      if (e.reuse[wi] == nullptr || e.admitted) continue;
      e.reuse_offsets[wi] = st.per_layer;
      st.per_layer += heads * e.work[wi].count;
    }
    if (st.per_layer > 0) {
      STRATA_ASSIGN_OR_RETURN(e.reuse_orders,
                              b.Allocate(engine::DType::kI32, {st.layers, st.per_layer}));
    }
    const auto centroid_row =
        static_cast<int64_t>(centroids_[full].nbytes()) / centroids_[full].dim(0);
    const auto extent_row = static_cast<int64_t>(extents_[full].nbytes()) / extents_[full].dim(0);
    bytes += st.layers * (st.per_layer * 4 + centroid_row + extent_row);
    staged.push_back(st);
  }
  if (staged.empty()) return absl::OkStatus();
  STRATA_RETURN_IF_ERROR(ReserveStaging(reuse_staging_, bytes));
  const auto reserved = std::chrono::steady_clock::now();
  std::vector<Tensor> tensors;
  std::vector<engine::RowCopy> rows;
  uint8_t* base = reuse_staging_.data();
  // Where (entry, sparse layer) pairs are staged; filled in parallel below.
  struct Fill {
    const Staged* st;
    int li;
    int64_t orders_at, centroids_at, extents_at;
  };
  std::vector<Fill> fills;
  for (const Staged& st : staged) {
    const Entry& e = *st.e;
    const int slot = e.fields[engine::kPlanSlot];
    const auto element = static_cast<int64_t>(engine::DTypeSize(centroids_[st.full].dtype()));
    const int64_t centroid_row = heads * max_blocks * d * element;
    const int64_t extent_row = heads * max_blocks * 2 * 4;
    const int64_t orders_at = st.at;
    const int64_t centroids_at = orders_at + st.layers * st.per_layer * 4;
    const int64_t extents_at = centroids_at + st.layers * centroid_row;
    int32_t orders_tensor = -1;
    if (st.per_layer > 0) {
      tensors.push_back(e.reuse_orders);
      orders_tensor = static_cast<int32_t>(tensors.size() - 1);
    }
    for (int li = 0; li < st.layers; ++li) {
      fills.push_back({&st, li, orders_at + li * st.per_layer * 4, centroids_at + li * centroid_row,
                       extents_at + li * extent_row});
      if (orders_tensor >= 0) rows.push_back({orders_tensor, li, fills.back().orders_at});
      tensors.push_back(centroids_[st.full + li]);
      rows.push_back({static_cast<int32_t>(tensors.size() - 1), slot, fills.back().centroids_at});
      tensors.push_back(extents_[st.full + li]);
      rows.push_back({static_cast<int32_t>(tensors.size() - 1), slot, fills.back().extents_at});
    }
  }
  PackPool().ParallelFor(static_cast<int64_t>(fills.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sizes;
    for (int64_t f = begin; f < end; ++f) {
      const Fill& fill = fills[f];
      const Entry& e = *fill.st->e;
      const int li = fill.li;
      auto* orders = reinterpret_cast<int32_t*>(base + fill.orders_at);
      uint8_t* centroids = base + fill.centroids_at;
      auto* extents = reinterpret_cast<int32_t*>(base + fill.extents_at);
      // Only the reused clusters' blocks are written: the rest of the
      // row is never read before the step's own clusterings write it.
      for (size_t wi = 0; wi < e.work.size(); ++wi) {
        if (e.reuse[wi] == nullptr) continue;
        const StoredClustering& s = *e.reuse[wi];
        const SummaryWork& w = e.work[wi];
        const int64_t n = s.count, c = s.clusters;
        const auto element = static_cast<int64_t>(engine::DTypeSize(s.centroid_dtype));
        sizes.resize(static_cast<size_t>(c));
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(centroids + (h * max_blocks + w.first_block) * d * element,
                      s.Centroids(li, h), static_cast<size_t>(c * d * element));
          std::memcpy(sizes.data(), s.Sizes(li, h), static_cast<size_t>(c * 4));
          int32_t first = w.begin;
          for (int64_t j = 0; j < c; ++j) {
            extents[(h * max_blocks + w.first_block + j) * 2] = first;
            extents[(h * max_blocks + w.first_block + j) * 2 + 1] = sizes[j];
            first += sizes[j];
          }
          if (e.reuse_offsets[wi] >= 0) {
            std::memcpy(orders + e.reuse_offsets[wi] + h * n, s.Order(li, h),
                        static_cast<size_t>(n * 4));
          }
        }
      }
    }
  });
  STRATA_ASSIGN_OR_RETURN(reuse_fence_, b.CopyRowsFromHost(reuse_staging_, rows, tensors));
  // The step's compute (the reorders, the scoring) reads what landed.
  STRATA_RETURN_IF_ERROR(b.ComputeAfterFence(reuse_fence_));
  STRATA_LOG_DEBUG(
      "clusterings of {} sequences staged for reuse in {:.1f} ms ({:.1f} ms pinning staging; {} "
      "bytes up in one copy)",
      staged.size(),
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count(),
      std::chrono::duration<double, std::milli>(reserved - started).count(), bytes);
  return absl::OkStatus();
}

std::vector<Tensor> KvPolicyRunner::ReuseOrders(const Entry& e, int layer) const {
  std::vector<Tensor> orders(e.work.size());
  if (!e.reuse_orders.defined()) return orders;
  const int li = SparseLayerIndex(*e.policy, layer);
  const int64_t heads = model_->shard().kv_heads;
  for (size_t wi = 0; wi < e.work.size(); ++wi) {
    if (e.reuse_offsets[wi] < 0) continue;
    const int64_t n = e.work[wi].count;
    orders[wi] = e.reuse_orders.Row(li)
                     .Rows(e.reuse_offsets[wi], e.reuse_offsets[wi] + heads * n)
                     .View({heads, n});
  }
  return orders;
}

Tensor* KvPolicyRunner::KeptOrder(Entry& e, size_t wi, int layer, Tensor& view) {
  const bool kept = (wi < e.keep.size() && e.keep[wi].has_value()) ||
                    (wi < e.keep_later.size() && e.keep_later[wi] != nullptr);
  if (!kept) return nullptr;
  const int64_t heads = model_->shard().kv_heads, n = e.work[wi].count;
  view = e.kept_orders.Row(SparseLayerIndex(*e.policy, layer))
             .Rows(e.kept_offsets[wi], e.kept_offsets[wi] + heads * n)
             .View({heads, n});
  return &view;
}

KvPolicyRunner::~KvPolicyRunner() {
  for (auto& [id, job] : admit_jobs_) {
    if (job->thread.joinable()) job->thread.join();
  }
  if (reuse_fence_ != engine::kFenceDone) {
    if (absl::Status s = model_->backend().WaitFence(reuse_fence_); !s.ok()) {
      STRATA_LOG_WARN("reused clusterings: {}", std::string(s.message()));
    }
  }
  if (keeping_.has_value()) {
    if (absl::Status s = model_->backend().WaitFence(keeping_->fence); !s.ok()) {
      STRATA_LOG_WARN("kept clusterings: {}", std::string(s.message()));
    }
  }
}

absl::Status KvPolicyRunner::KeepClusterings() {
  STRATA_RETURN_IF_ERROR(FinishKeeping(/*wait=*/false).status());
  for (Entry& e : entries_) {
    if (!e.kept_orders.defined()) continue;
    auto it = sequences_.find(e.seq_id);
    if (it == sequences_.end()) continue;
    KeepingRead read;
    read.work = e.work;
    read.keys = e.keep;
    read.later = e.keep_later;
    read.offsets = e.kept_offsets;
    read.orders = std::move(e.kept_orders);
    e.kept_orders = Tensor();
    STRATA_RETURN_IF_ERROR(
        StartReading(std::move(read), it->second.state.slot, e.policy->config().full_layers));
  }
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::PlanExport(int batch_seq, int64_t seq_id, int policy,
                                        int context_len) {
  auto it = pending_exports_.find(seq_id);
  if (it == pending_exports_.end() || context_len != it->second.prompt_tokens) {
    return absl::OkStatus();
  }
  const PendingExport pending = it->second;
  pending_exports_.erase(it);
  const KvPolicy& p = *policies_[policy];
  const int layers = model_->config().num_layers - p.config().full_layers;
  if (p.kind() != PolicyKind::kClusterKv || layers <= 0 || free_slots_.empty()) {
    return absl::OkStatus();  // the decode worker clusters it itself
  }
  ExportEntry x;
  x.policy = &p;
  x.batch_seq = batch_seq;
  x.key = pending.key;
  x.block_tables.resize(static_cast<size_t>(model_->config().num_layers));
  // The decode worker's first step: the prompt and its first token.
  SequenceState state;
  p.Advance(context_len + 1, state, x.work);
  int64_t elems = 0;
  for (const SummaryWork& w : x.work) {
    if (w.kind != SummaryWork::kCluster || w.begin + w.count > context_len) {
      return absl::OkStatus();  // not what a ClusterKV prompt gives: nothing sent
    }
    x.offsets.push_back(elems);
    elems += int64_t{model_->shard().kv_heads} * w.count;
  }
  if (elems == 0) return absl::OkStatus();
  STRATA_ASSIGN_OR_RETURN(x.orders,
                          model_->backend().Allocate(engine::DType::kI32, {layers, elems}));
  x.slot = free_slots_.back();
  free_slots_.pop_back();
  export_entries_.push_back(std::move(x));
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::HandOverExports() {
  // The export's end waits for the clusterings (its pages may go first).
  {
    std::unique_lock<std::mutex> lock = LockManager();
    for (const ExportEntry& x : export_entries_) options_.exports->ExpectExportPlannerState(x.key);
  }
  exports_to_cluster_.insert(exports_to_cluster_.end(),
                             std::make_move_iterator(export_entries_.begin()),
                             std::make_move_iterator(export_entries_.end()));
  export_entries_.clear();
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::ClusterExports() {
  std::vector<ExportEntry> entries = std::move(exports_to_cluster_);
  exports_to_cluster_.clear();
  const auto started = std::chrono::steady_clock::now();
  engine::Backend& b = model_->backend();
  const int64_t heads = model_->shard().kv_heads;
  for (ExportEntry& x : entries) {
    // The k-means of every sparse layer. The rows stay: the export and the
    // prefix store take the prompt's KV as computed, and the decode worker
    // redoes the order.
    for (int layer = 0; layer < model_->config().num_layers; ++layer) {
      if (!x.block_tables[layer].defined()) continue;
      engine::SequenceRange range;
      range.block_table = x.block_tables[layer];
      range.page_size = model_->options().page_size;
      const int li = SparseLayerIndex(*x.policy, layer);
      for (size_t wi = 0; wi < x.work.size(); ++wi) {
        const SummaryWork& w = x.work[wi];
        range.begin = w.begin;
        range.count = w.count;
        Tensor order = x.orders.Row(li)
                           .Rows(x.offsets[wi], x.offsets[wi] + heads * w.count)
                           .View({heads, w.count});
        Tensor centroids = centroids_[layer].Row(x.slot), extents = extents_[layer].Row(x.slot);
        STRATA_RETURN_IF_ERROR(b.ClusterKeys(model_->k_cache(layer), model_->v_cache(layer), range,
                                             w.clusters, x.policy->config().kmeans_iterations,
                                             w.first_block, centroids, extents, &order,
                                             engine::ClusterRows::kLeave));
        ++stats_.clusterings;
      }
    }
    KeepingRead read;
    read.work = x.work;
    read.keys.assign(x.work.size(), std::nullopt);
    read.offsets = x.offsets;
    read.orders = std::move(x.orders);
    read.export_key = x.key;
    read.export_slot = x.slot;
    STRATA_RETURN_IF_ERROR(StartReading(std::move(read), x.slot, x.policy->config().full_layers));
  }
  STRATA_LOG_DEBUG(
      "clusterings of {} exported prompts enqueued in {:.1f} ms", entries.size(),
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started)
          .count());
  return absl::OkStatus();
}

absl::Status KvPolicyRunner::Poll() {
  if (!exports_to_cluster_.empty()) STRATA_RETURN_IF_ERROR(ClusterExports());
  // Handed over as soon as read (at once where copies are synchronous).
  STRATA_RETURN_IF_ERROR(FinishKeeping(/*wait=*/false).status());
  KeepAwaited();
  return absl::OkStatus();
}

void KvPolicyRunner::KeepAwaited() {
  const auto now = std::chrono::steady_clock::now();
  int kept = 0;
  for (auto it = awaited_keeps_.begin(); it != awaited_keeps_.end();) {
    const LaterKey& later = *it->key;
    const std::optional<std::vector<uint32_t>> crcs = (*later.stored)();
    if (!crcs.has_value() && now - it->since < kAwaitLimit) {
      ++it;  // the store's copies are still in flight
      continue;
    }
    // Every page's CRC, or it is not kept: a page not stored by this
    // sequence (stored before by another, whose bytes may differ from the
    // ones clustered here), or a store no longer remembered.
    std::vector<int32_t> words;
    for (size_t i = 0; i < later.words.size(); ++i) {
      uint32_t crc = later.words[i];
      const size_t page = later.first_page + i;
      if (crc == 0 && crcs.has_value() && page < crcs->size()) crc = (*crcs)[page];
      if (crc == 0) break;
      words.push_back(static_cast<int32_t>(crc));
    }
    if (words.size() == later.words.size()) {
      const std::vector<PrefixKey> key =
          PrefixChain(later.space, words, static_cast<int>(words.size()));
      if (!key.empty() && options_.clusterings->Put(key[0], std::move(it->value))) ++kept;
    }
    it = awaited_keeps_.erase(it);
  }
  stats_.kept_clusterings += kept;
}

absl::Status KvPolicyRunner::StartReading(KeepingRead read, int slot, int full) {
  engine::Backend& b = model_->backend();
  // One read at a time, through one staging buffer.
  STRATA_RETURN_IF_ERROR(FinishKeeping(/*wait=*/true).status());
  read.layers = model_->config().num_layers - full;
  read.per_layer = read.orders.dim(1);
  const Tensor& centroids = centroids_[full];
  read.centroid_dtype = centroids.dtype();
  read.centroid_row_bytes = static_cast<int64_t>(centroids.nbytes()) / centroids.dim(0);
  read.extent_row_bytes = static_cast<int64_t>(extents_[full].nbytes()) / extents_[full].dim(0);
  const auto order_bytes = static_cast<int64_t>(read.orders.nbytes());
  const int64_t bytes =
      order_bytes + read.layers * (read.centroid_row_bytes + read.extent_row_bytes);
  STRATA_RETURN_IF_ERROR(ReserveStaging(keep_staging_, bytes));
  // Rows: the orders' layers, then each layer's centroid row of the
  // slot, then each layer's extent row.
  std::vector<Tensor> tensors = {read.orders};
  std::vector<engine::RowCopy> rows;
  for (int li = 0; li < read.layers; ++li) {
    rows.push_back({0, li, li * read.per_layer * 4});
  }
  for (int li = 0; li < read.layers; ++li) {
    tensors.push_back(centroids_[full + li]);
    rows.push_back({static_cast<int32_t>(tensors.size() - 1), slot,
                    order_bytes + li * read.centroid_row_bytes});
  }
  for (int li = 0; li < read.layers; ++li) {
    tensors.push_back(extents_[full + li]);
    rows.push_back(
        {static_cast<int32_t>(tensors.size() - 1), slot,
         order_bytes + read.layers * read.centroid_row_bytes + li * read.extent_row_bytes});
  }
  STRATA_ASSIGN_OR_RETURN(read.fence, b.CopyRowsToHost(tensors, rows, keep_staging_));
  read.started = std::chrono::steady_clock::now();
  // The copy reads the slot's rows: later compute (another sequence
  // clustering into the slot) waits for it, on the device.
  STRATA_RETURN_IF_ERROR(b.ComputeAfterFence(read.fence));
  keeping_ = std::move(read);
  return absl::OkStatus();
}

absl::StatusOr<bool> KvPolicyRunner::FinishKeeping(bool wait) {
  if (!keeping_.has_value()) return true;
  engine::Backend& b = model_->backend();
  if (wait) {
    STRATA_RETURN_IF_ERROR(b.WaitFence(keeping_->fence));
  } else {
    STRATA_ASSIGN_OR_RETURN(const bool done, b.FenceDone(keeping_->fence));
    if (!done) return false;
  }
  const auto started = std::chrono::steady_clock::now();
  const KeepingRead read = std::move(*keeping_);
  keeping_.reset();
  const int64_t heads = model_->shard().kv_heads, d = model_->config().head_dim;
  const int64_t max_blocks = max_blocks_;
  const auto element = static_cast<int64_t>(engine::DTypeSize(read.centroid_dtype));
  const uint8_t* staged = keep_staging_.data();
  const auto* orders = reinterpret_cast<const int32_t*>(staged);
  const uint8_t* centroid_rows = staged + read.orders.nbytes();
  const uint8_t* extent_rows = centroid_rows + read.layers * read.centroid_row_bytes;
  // Each value: its header, then per sparse layer a block of fixed size;
  // the (value, layer) blocks are filled in parallel (a 32k prompt's are
  // tens of megabytes).
  std::vector<size_t> items;
  for (size_t wi = 0; wi < read.work.size(); ++wi) {
    if (read.keys[wi].has_value() || read.export_key != 0 ||
        (wi < read.later.size() && read.later[wi] != nullptr)) {
      items.push_back(wi);
    }
  }
  // Allocated on the pool too: a value's fresh pages are faulted in (and
  // zeroed) as it is sized, tens of milliseconds for a 32k prompt's on one
  // thread.
  std::vector<std::vector<uint8_t>> values(items.size());
  PackPool().ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const SummaryWork& w = read.work[items[static_cast<size_t>(k)]];
      values[static_cast<size_t>(k)].resize(
          static_cast<size_t>(ValueBytes(w.count, w.clusters, read.layers, heads, d, element)));
    }
  });
  for (size_t k = 0; k < items.size(); ++k) {
    const SummaryWork& w = read.work[items[k]];
    const int32_t header[kHeaderWords] = {kMagic,
                                          kVersion,
                                          w.begin,
                                          w.count,
                                          w.clusters,
                                          read.layers,
                                          static_cast<int32_t>(heads),
                                          static_cast<int32_t>(d),
                                          static_cast<int32_t>(read.centroid_dtype),
                                          model_->shard().rank,
                                          model_->shard().size};
    std::memcpy(values[k].data(), header, sizeof(header));
  }
  const auto layers = static_cast<int64_t>(read.layers);
  PackPool().ParallelFor(
      static_cast<int64_t>(items.size()) * layers, 1, [&](int64_t begin, int64_t end) {
        for (int64_t job = begin; job < end; ++job) {
          const size_t k = static_cast<size_t>(job / layers);
          const int64_t li = job % layers;
          const size_t wi = items[k];
          const SummaryWork& w = read.work[wi];
          const int64_t n = w.count, c = w.clusters;
          const int64_t layer_bytes = heads * (n * 4 + c * d * element + c * 4);
          uint8_t* at = values[k].data() + kHeaderWords * 4 + li * layer_bytes;
          std::memcpy(at, &orders[li * read.per_layer + read.offsets[wi]], heads * n * 4);
          at += heads * n * 4;
          const uint8_t* row = centroid_rows + li * read.centroid_row_bytes;
          for (int64_t h = 0; h < heads; ++h) {
            std::memcpy(at, row + (h * max_blocks + w.first_block) * d * element, c * d * element);
            at += c * d * element;
          }
          const auto* extents =
              reinterpret_cast<const int32_t*>(extent_rows + li * read.extent_row_bytes);
          for (int64_t h = 0; h < heads; ++h) {
            for (int64_t j = 0; j < c; ++j) {
              std::memcpy(at, &extents[(h * max_blocks + w.first_block + j) * 2 + 1], 4);
              at += 4;
            }
          }
        }
      });
  int kept = 0;
  std::vector<std::vector<uint8_t>> exported;
  for (size_t k = 0; k < items.size(); ++k) {
    const size_t wi = items[k];
    std::vector<uint8_t>& value = values[k];
    if (read.export_key != 0) {
      exported.push_back(std::move(value));
    } else if (!read.keys[wi].has_value()) {
      // Its key waits for the CRCs of the pages it was computed on.
      awaited_keeps_.push_back(
          {read.later[wi], std::move(value), std::chrono::steady_clock::now()});
    } else if (options_.clusterings->Put(*read.keys[wi], std::move(value))) {
      ++kept;
    }
  }
  stats_.kept_clusterings += kept;
  if (read.export_key != 0) {
    stats_.exported_clusterings += static_cast<int64_t>(exported.size());
    {
      std::unique_lock<std::mutex> lock = LockManager();
      options_.exports->AddExportPlannerState(read.export_key, std::move(exported));
    }
    free_slots_.push_back(read.export_slot);  // read: the next clustering may take it
    STRATA_LOG_DEBUG(
        "clusterings of export {} packed in {:.1f} ms, {:.1f} ms after the step that made them",
        read.export_key,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started)
            .count(),
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - read.started)
            .count());
    return true;
  }
  STRATA_LOG_DEBUG(
      "{} chunk clusterings of {} layers kept in {:.1f} ms, read back beside the steps", kept,
      read.layers,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started)
          .count());
  return true;
}

}  // namespace strata::kvtier

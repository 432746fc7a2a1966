// KvPolicyRunner as the block manager's ImportAdmitter: an imported ClusterKV
// prompt's upper layers go from the landing records straight into the host
// tier (see kv_policy.h).
//
// The prefill worker sent the prompt's pages in token order and, with them,
// the clusterings its runner computed on them (the values FindClusterings
// takes). The decode worker's first decode step would copy every page up,
// reorder each chunk's rows by those clusterings (ReorderKeys) and encode
// the clusters into the host tier (OffloadBlocks), then free the upper
// pages wholly inside the chunks. Admission does the same on the host, from
// the landing records: for each sparse layer, KV head and cluster, the
// cluster's rows are gathered in the clustering's order and encoded into
// pieces exactly as OffloadBlocks lays them out (per head, cluster by
// cluster, pieces of at most kKvPieceTokens tokens from the head's units),
// and the slot's tier tables are filled. The upper pages of those tokens
// are never allocated; the first decode step only stages the centroids and
// extents (StageReuses) and recalls as any later step does.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/kv_codec.h"
#include "kvtier/kv_policy.h"

namespace strata::kvtier {

using engine::Tensor;

std::vector<int64_t> KvPolicyRunner::AdmittedUnits(const Sequence& seq) const {
  const engine::KvCodecKind codec = TierCodec(seq.policy).value_or(options_.tier.codec);
  std::vector<int64_t> units;
  for (const SummaryWork& w : seq.admission->work) {
    units.push_back(engine::KvPieceUnitsBound(codec, model_->config().head_dim,
                                              model_->kv_cache_dtype(), w.count, w.clusters));
  }
  return units;
}

std::optional<std::vector<SummaryWork>> KvPolicyRunner::AdmissionWork(int64_t seq_id, int workload,
                                                                      int tokens) const {
  if (!AdmitsImports() || workload < 0 || workload >= num_policies() ||
      options_.tier.block_stride != 1 || sequences_.contains(seq_id) || free_slots_.empty()) {
    return std::nullopt;
  }
  // The caches' rows are decoded and encoded on the host: f32 or bf16.
  const engine::DType dtype = model_->kv_cache_dtype();
  if (dtype != engine::DType::kF32 && dtype != engine::DType::kBF16) return std::nullopt;
  const KvPolicy& p = *policies_[workload];
  if (p.kind() != PolicyKind::kClusterKv || !TierCodec(workload).has_value() ||
      p.config().full_layers != model_->options().upper_first_layer) {
    return std::nullopt;
  }
  // The work of the first decode step (the prompt and the first token):
  // chunks to cluster, one after another.
  SequenceState state;
  std::vector<SummaryWork> work;
  p.Advance(tokens + 1, state, work);
  if (work.empty()) return std::nullopt;
  int end = work.front().begin;
  for (const SummaryWork& w : work) {
    if (w.kind != SummaryWork::kCluster || w.begin != end || w.count <= 0) return std::nullopt;
    end = w.begin + w.count;
  }
  return work;
}

ImportAdmitter::Range KvPolicyRunner::PlanAdmission(
    int64_t seq_id, int workload, int tokens, std::span<const std::vector<uint8_t>> state_heads) {
  const std::optional<std::vector<SummaryWork>> work = AdmissionWork(seq_id, workload, tokens);
  if (!work.has_value()) return {};
  for (const SummaryWork& w : *work) {
    const StoredClustering want = WantedClustering(*policies_[workload], w);
    if (std::none_of(state_heads.begin(), state_heads.end(),
                     [&](const std::vector<uint8_t>& v) { return ClusteringHeaderIs(v, want); })) {
      return {};  // a chunk the prefill worker did not cluster: the k-means runs here
    }
  }
  return {work->front().begin, work->back().begin + work->back().count};
}

bool KvPolicyRunner::ReserveAdmission(int64_t seq_id, int workload, int tokens) {
  std::optional<std::vector<SummaryWork>> work = AdmissionWork(seq_id, workload, tokens);
  if (!work.has_value()) return false;
  Sequence seq;
  seq.id = seq_id;
  seq.policy = workload;
  Sequence::Admission admission;
  admission.context_len = tokens + 1;
  admission.work = *std::move(work);
  seq.admission = std::move(admission);
  const std::vector<int64_t> units = AdmittedUnits(seq);
  if (std::any_of(units.begin(), units.end(), [](int64_t u) { return u <= 0; })) return false;
  const int layers = model_->config().num_layers - policies_[workload]->config().full_layers;
  const int64_t heads = model_->shard().kv_heads;
  int64_t need = 0;
  for (int64_t u : units) need += u * heads;
  seq.state.slot = free_slots_.back();
  auto give_back = [&] {
    std::unique_lock<std::mutex> lock = LockManager();
    for (const KvBlockManager::HostRegion& region : seq.regions) {
      options_.tier.manager->FreeHostRegion(region);
    }
    seq.regions.clear();
  };
  // A region per sparse layer, its pieces addressed in int32 host units.
  for (int li = 0; li < layers; ++li) {
    std::optional<KvBlockManager::HostRegion> region;
    {
      std::unique_lock<std::mutex> lock = LockManager();
      region = options_.tier.manager->AllocateHostRegion(need * engine::kKvHostUnit, workload);
    }
    if (region.has_value()) seq.regions.push_back(*region);
    if (!region.has_value() ||
        region->offset / engine::kKvHostUnit + need > std::numeric_limits<int32_t>::max()) {
      give_back();
      return false;  // no room: the pages go to the GPU, offloaded as before
    }
  }
  absl::Status started = StartTiering(seq);
  if (!started.ok() || seq.ring_pages.empty()) {
    if (!started.ok()) STRATA_LOG_WARN("sequence {}: {}", seq_id, started.ToString());
    if (!seq.ring_pages.empty()) GiveRingPages(seq_id, seq);
    give_back();
    return false;
  }
  free_slots_.pop_back();
  sequences_.emplace(seq_id, std::move(seq));
  return true;
}

absl::Status KvPolicyRunner::EncodeAdmittedHead(const AdmitJob& job, int li, int h, int32_t* base,
                                                int32_t* where, int32_t* count) const {
  const Sequence::Admission& admission = job.admission;
  const std::span<const LandedPage> pages = job.pages;
  const std::span<const int64_t> units_per_head = job.units;
  const int64_t first_unit = job.first_unit[static_cast<size_t>(li)];
  const engine::KvCodecKind codec_kind = job.codec;
  const int layer = policies_[job.policy]->config().full_layers + li;
  const int page_size = model_->options().page_size;
  const int heads = model_->shard().kv_heads, d = model_->config().head_dim;
  const engine::DType dtype = model_->kv_cache_dtype();
  const auto elem = static_cast<int64_t>(engine::DTypeSize(dtype));
  const int64_t row = d * elem;  // one token's K (or V) of one head
  const int64_t page_bytes = int64_t{page_size} * heads * row;
  const int first_token = admission.work.front().begin;
  const int end_token = admission.work.back().begin + admission.work.back().count;
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCodec> codec,
                          engine::KvCodec::Create(codec_kind));
  // The head's K and V of tokens [first_token, end_token), in token order.
  const int64_t span_tokens = end_token - first_token;
  std::vector<uint8_t> k(static_cast<size_t>(span_tokens * row)), v(k.size());
  std::vector<uint8_t> k_page, v_page;
  for (int p = first_token / page_size; p * page_size < end_token; ++p) {
    const LandedPage& page = pages[static_cast<size_t>(p)];
    const int page_tokens = std::min(page_size, end_token - p * page_size);
    const int lo = std::max(first_token - p * page_size, 0);  // rows of the page taken
    const uint8_t *kp = nullptr, *vp = nullptr;
    int64_t stride = row;
    if (page.codec == engine::KvCodecKind::kBf16) {
      // The record: layer l's K page then its V page ([page, heads, d]).
      kp = page.bytes + int64_t{2} * layer * page_bytes + h * row;
      vp = kp + page_bytes;
      stride = heads * row;
    } else {
      // Coded: one block per (layer, head) of the page's tokens.
      STRATA_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCodec> wire,
                              engine::KvCodec::Create(page.codec));
      const auto block = static_cast<int64_t>(wire->EncodedBytes(page.tokens, d, dtype));
      const int prompt_tokens =
          std::min(page_size, static_cast<int>(admission.context_len - 1) - p * page_size);
      if (block <= 0 || page.tokens != prompt_tokens) {
        return absl::DataLossError(absl::StrCat("page ", p, " holds ", page.tokens,
                                                " tokens coded; the prompt has ", prompt_tokens,
                                                " there"));
      }
      k_page.resize(static_cast<size_t>(page.tokens * row));
      v_page.resize(k_page.size());
      const std::span<const uint8_t> bytes(page.bytes + (int64_t{layer} * heads + h) * block,
                                           static_cast<size_t>(block));
      // The block's own header says what Decode writes: it is checked
      // against the page before anything is decoded into the page's rows
      // (its CRC is the sender's, so it proves nothing about the shape).
      absl::StatusOr<engine::KvBlockInfo> info = engine::KvCodec::Inspect(bytes);
      if (!info.ok()) {
        return absl::DataLossError(
            absl::StrCat("page ", p, " layer ", layer, " head ", h, ": ", info.status().message()));
      }
      if (info->tokens != page.tokens || info->head_dim != d || info->codec != page.codec ||
          static_cast<int64_t>(info->bytes) != block) {
        return absl::DataLossError(absl::StrCat("page ", p, " layer ", layer, " head ", h, ": a ",
                                                std::string(engine::KvCodecKindName(info->codec)),
                                                " block of ", info->tokens, " x ", info->head_dim,
                                                " in ", info->bytes, " bytes, expected ",
                                                std::string(engine::KvCodecKindName(page.codec)),
                                                " ", page.tokens, " x ", d, " in ", block));
      }
      STRATA_RETURN_IF_ERROR(
          engine::KvCodec::Decode(bytes, dtype, k_page.data(), v_page.data(), nullptr));
      kp = k_page.data();
      vp = v_page.data();
    }
    for (int t = lo; t < page_tokens; ++t) {
      const int64_t to = (int64_t{p} * page_size + t - first_token) * row;
      std::memcpy(&k[to], kp + t * stride, row);
      std::memcpy(&v[to], vp + t * stride, row);
    }
  }
  // The pieces, as OffloadBlocks lays them out.
  const int64_t max_pieces = max_pieces_;
  std::vector<uint8_t> k_rows(engine::kKvPieceTokens * row), v_rows(k_rows.size());
  std::vector<int32_t> order, sizes;
  int64_t region_unit = first_unit;
  int32_t pieces = 0;
  for (size_t wi = 0; wi < admission.work.size(); ++wi) {
    const SummaryWork& w = admission.work[wi];
    const StoredClustering& s = *admission.reuse[wi];
    order.resize(static_cast<size_t>(w.count));
    sizes.resize(static_cast<size_t>(w.clusters));
    std::memcpy(order.data(), s.Order(li, h), order.size() * 4);
    std::memcpy(sizes.data(), s.Sizes(li, h), sizes.size() * 4);
    int64_t unit = region_unit + h * units_per_head[wi];
    const int64_t end = unit + units_per_head[wi];
    int32_t first = 0;  // the cluster's first position in the chunk's order
    for (int c = 0; c < w.clusters; ++c) {
      base[w.first_block + c] = pieces;
      for (int32_t off = 0; off < sizes[c]; off += engine::kKvPieceTokens) {
        const int n = std::min<int>(engine::kKvPieceTokens, sizes[c] - off);
        for (int j = 0; j < n; ++j) {
          const int64_t t = w.begin + order[first + off + j] - first_token;
          std::memcpy(&k_rows[j * row], &k[t * row], row);
          std::memcpy(&v_rows[j * row], &v[t * row], row);
        }
        const size_t bytes = codec->EncodedBytes(n, d, dtype);
        const int64_t units =
            (static_cast<int64_t>(bytes) + engine::kKvHostUnit - 1) / engine::kKvHostUnit;
        if (bytes == 0 || unit + units > end || pieces >= max_pieces) {
          return absl::InternalError(absl::StrCat("head ", h, ": the pieces outgrow the ",
                                                  units_per_head[wi], " host units or ", max_pieces,
                                                  " pieces reserved"));
        }
        STRATA_RETURN_IF_ERROR(codec->Encode(
            k_rows.data(), v_rows.data(), dtype, n, d,
            std::span<uint8_t>(ring_.host.data() + unit * engine::kKvHostUnit, bytes)));
        where[pieces++] = static_cast<int32_t>(unit);
        unit += units;
      }
      first += sizes[c];
    }
    region_unit += units_per_head[wi] * heads;
  }
  *count = pieces;
  return absl::OkStatus();
}

absl::StatusOr<ImportAdmitter::Range> KvPolicyRunner::Admit(
    int64_t seq_id, int workload, int tokens, std::span<const std::vector<uint8_t>> state,
    std::span<const LandedPage> pages) {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end() || !it->second.admission.has_value() ||
      it->second.admission->encoded || admit_jobs_.contains(seq_id) ||
      it->second.policy != workload || it->second.admission->context_len != tokens + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence ", seq_id, " was not planned for admission"));
  }
  Sequence& seq = it->second;
  Sequence::Admission& admission = *seq.admission;
  const KvPolicy& p = *policies_[seq.policy];
  const int page_size = model_->options().page_size;
  const int needed = (tokens + page_size - 1) / page_size;
  absl::Status status = absl::OkStatus();
  if (static_cast<int>(pages.size()) != needed) {
    status = absl::FailedPreconditionError(
        absl::StrCat(pages.size(), " pages landed for ", tokens, " tokens"));
  }
  // Each chunk's clustering, checked (a value that fails fails the import:
  // its pages' upper layers are nowhere else).
  admission.reuse.assign(admission.work.size(), nullptr);
  for (size_t wi = 0; wi < admission.work.size() && status.ok(); ++wi) {
    const StoredClustering want = WantedClustering(p, admission.work[wi]);
    auto value = std::find_if(state.begin(), state.end(), [&](const std::vector<uint8_t>& v) {
      return ClusteringHeaderIs(v, want);
    });
    if (value == state.end()) {
      status = absl::DataLossError(absl::StrCat("no clustering of tokens [", want.begin, ", ",
                                                want.begin + want.count, ") came"));
      break;
    }
    absl::StatusOr<std::shared_ptr<const StoredClustering>> parsed =
        ParseClustering(*value, want, PackPool());
    if (!parsed.ok()) {
      status = absl::DataLossError(absl::StrCat("the clustering of tokens [", want.begin, ", ",
                                                want.begin + want.count,
                                                ") is unusable: ", parsed.status().message()));
      break;
    }
    admission.reuse[wi] = *std::move(parsed);
  }
  if (!status.ok()) {
    DropAdmitted(seq_id);
    return status;
  }
  // The encoding goes on beside the steps; AdmitDone applies it.
  const int layers = model_->config().num_layers - p.config().full_layers;
  const int heads = model_->shard().kv_heads;
  auto job = std::make_unique<AdmitJob>();
  job->policy = seq.policy;
  job->admission = admission;
  job->codec = TierCodec(seq.policy).value_or(options_.tier.codec);
  job->units = AdmittedUnits(seq);
  for (const KvBlockManager::HostRegion& region : seq.regions) {
    job->first_unit.push_back(region.offset / engine::kKvHostUnit);
  }
  job->pages.assign(pages.begin(), pages.end());
  job->rows.resize(static_cast<size_t>(layers));
  for (AdmitJob::Rows& r : job->rows) {
    r.base.assign(static_cast<size_t>(heads) * max_blocks_, -1);
    r.where.assign(static_cast<size_t>(heads) * max_pieces_, 0);
    r.count.assign(static_cast<size_t>(heads), 0);
  }
  job->errors.resize(static_cast<size_t>(layers) * heads);
  job->started = std::chrono::steady_clock::now();
  if (admit_pool_ == nullptr) admit_pool_ = std::make_unique<ThreadPool>(kPackThreads);
  AdmitJob* raw = job.get();
  job->thread = std::thread([this, raw, layers, heads] {
    if (options_.tier.admit_before_encode) options_.tier.admit_before_encode();
    // One task per (layer, head): each writes its own units and table rows.
    admit_pool_->ParallelFor(int64_t{layers} * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int li = static_cast<int>(task / heads), h = static_cast<int>(task % heads);
        AdmitJob::Rows& r = raw->rows[static_cast<size_t>(li)];
        raw->errors[static_cast<size_t>(task)] =
            EncodeAdmittedHead(*raw, li, h, r.base.data() + int64_t{h} * max_blocks_,
                               r.where.data() + int64_t{h} * max_pieces_, r.count.data() + h);
      }
    });
    raw->finished = std::chrono::steady_clock::now();
    raw->done.store(true, std::memory_order_release);
  });
  admit_jobs_.emplace(seq_id, std::move(job));
  return Range{admission.work.front().begin,
               admission.work.back().begin + admission.work.back().count};
}

absl::StatusOr<bool> KvPolicyRunner::AdmitDone(int64_t seq_id) {
  auto job_it = admit_jobs_.find(seq_id);
  if (job_it == admit_jobs_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence ", seq_id, " has no admission under way"));
  }
  AdmitJob& job = *job_it->second;
  if (!job.done.load(std::memory_order_acquire)) return false;
  job.thread.join();
  absl::Status status = absl::OkStatus();
  for (const absl::Status& e : job.errors) {
    if (!e.ok()) {
      status = e;
      break;
    }
  }
  auto it = sequences_.find(seq_id);
  if (status.ok() && it == sequences_.end()) {
    status = absl::InternalError(absl::StrCat("sequence ", seq_id, " left during its admission"));
  }
  const int layers = static_cast<int>(job.rows.size());
  if (status.ok()) {
    Sequence& seq = it->second;
    const int full = policies_[seq.policy]->config().full_layers;
    engine::Backend& b = model_->backend();
    for (int li = 0; li < layers && status.ok(); ++li) {
      engine::TierTables t = SlotTables(full + li, seq.state.slot);
      const AdmitJob::Rows& r = job.rows[static_cast<size_t>(li)];
      status.Update(b.CopyFromHost(r.base.data(), engine::DType::kI32,
                                   static_cast<int64_t>(r.base.size()), t.piece_base, 0));
      status.Update(b.CopyFromHost(r.where.data(), engine::DType::kI32,
                                   static_cast<int64_t>(r.where.size()), t.piece_host, 0));
      status.Update(b.CopyFromHost(r.count.data(), engine::DType::kI32,
                                   static_cast<int64_t>(r.count.size()), t.piece_count, 0));
    }
  }
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - job.started)
                          .count();
  const int64_t chunks = static_cast<int64_t>(job.admission.work.size());
  if (status.ok()) {
    // What the encoding wrote and how fast: the host regions filled, from
    // the admission's start to its last task (not to this poll).
    int64_t bytes = 0;
    for (const KvBlockManager::HostRegion& region : it->second.regions) bytes += region.bytes;
    const double encode_ms =
        std::chrono::duration<double, std::milli>(job.finished - job.started).count();
    STRATA_LOG_DEBUG(
        "sequence {}: admitted {} chunks x {} sparse layers into the host tier, {:.1f} MB in "
        "{:.1f} ms ({:.2f} GB/s), applied {:.1f} ms after",
        seq_id, chunks, layers, bytes / 1e6, encode_ms,
        encode_ms > 0 ? bytes / encode_ms / 1e6 : 0.0, micros / 1e3 - encode_ms);
  }
  admit_jobs_.erase(job_it);
  if (!status.ok()) {
    DropAdmitted(seq_id);
    return status;
  }
  Sequence& seq = it->second;
  seq.admission->encoded = true;
  // Every region is full to its end: later offloads take regions of their own.
  seq.tail_units = 0;
  ++stats_.admitted_sequences;
  stats_.offloads += layers;
  for (const KvBlockManager::HostRegion& region : seq.regions) {
    stats_.offloaded_bytes += region.bytes;
  }
  stats_.admitted_clusterings += chunks * layers;
  stats_.admit_micros += micros;
  return true;
}

void KvPolicyRunner::JoinAdmitJob(int64_t seq_id) {
  auto job = admit_jobs_.find(seq_id);
  if (job == admit_jobs_.end()) return;
  // Its threads write the sequence's host regions and read the landing
  // records: neither may go before they stop.
  if (job->second->thread.joinable()) job->second->thread.join();
  admit_jobs_.erase(job);
}

void KvPolicyRunner::DropAdmitted(int64_t seq_id) {
  JoinAdmitJob(seq_id);
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end() || !it->second.admission.has_value()) return;
  Release(seq_id);
}

}  // namespace strata::kvtier

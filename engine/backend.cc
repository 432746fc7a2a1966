#include "engine/backend.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace strata::engine {

absl::Status ValidateSparsePlan(const SparsePlan& plan, const AttentionBatch& batch,
                                int64_t num_rows, int num_slots, int num_kv_heads) {
  auto bad = [](int entry, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("sparse plan entry ", entry, ": ", what));
  };
  const int p = plan.num_entries;
  if (p < 0 || static_cast<int64_t>(plan.host_entries.size()) != int64_t{p} * kSparsePlanFields) {
    return absl::InvalidArgumentError("sparse plan: host_entries does not hold num_entries rows");
  }
  if (p == 0) return absl::OkStatus();
  if (plan.max_keys < 1 || plan.max_blocks < 0) {
    return absl::InvalidArgumentError("sparse plan: max_keys must be >= 1 and max_blocks >= 0");
  }
  if (plan.num_blocks_bound < 0 || plan.num_blocks_bound > plan.max_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse plan: num_blocks_bound ", plan.num_blocks_bound,
                     " outside [0, max_blocks ", plan.max_blocks, "]"));
  }
  if (!plan.entries.defined() || plan.entries.dtype() != DType::kI32 ||
      plan.entries.numel() < int64_t{p} * kSparsePlanFields || !plan.key_index.defined() ||
      plan.key_index.dtype() != DType::kI32 ||
      plan.key_index.numel() < int64_t{p} * num_kv_heads * plan.max_keys ||
      !plan.key_count.defined() || plan.key_count.dtype() != DType::kI32 ||
      plan.key_count.numel() < int64_t{p} * num_kv_heads) {
    return absl::InvalidArgumentError("sparse plan: entries / key_index / key_count too small");
  }
  for (int i = 0; i < p; ++i) {
    const int32_t row = plan.host(i, kPlanRow), seq = plan.host(i, kPlanSeq);
    const int32_t slot = plan.host(i, kPlanSlot), blocks = plan.host(i, kPlanNumBlocks);
    const int32_t budget = plan.host(i, kPlanBudget), sink_end = plan.host(i, kPlanSinkEnd);
    const int32_t tail_begin = plan.host(i, kPlanTailBegin);
    const int32_t ctx = plan.host(i, kPlanContextLen);
    if (row < 0 || row >= num_rows) return bad(i, absl::StrCat("row ", row, " outside the step"));
    if (seq < 0 || seq >= batch.num_seqs)
      return bad(i, absl::StrCat("sequence ", seq, " outside the batch"));
    if (batch.host_query_start[seq + 1] - batch.host_query_start[seq] != 1 ||
        batch.host_query_start[seq] != row) {
      return bad(i, "row is not the single query row of a decode sequence");
    }
    if (slot < 0 || slot >= num_slots)
      return bad(i, absl::StrCat("slot ", slot, " outside the pools"));
    if (blocks < 0 || blocks > plan.max_blocks) return bad(i, "num_blocks outside [0, max_blocks]");
    if (plan.num_blocks_bound > 0 && blocks > plan.num_blocks_bound) {
      return bad(i, absl::StrCat("num_blocks ", blocks, " above num_blocks_bound ",
                                 plan.num_blocks_bound));
    }
    if (budget < 0) return bad(i, "negative budget");
    if (!(0 <= sink_end && sink_end <= tail_begin && tail_begin < ctx &&
          ctx == batch.host_context_len[seq])) {
      return bad(i, absl::StrCat("ranges sink_end ", sink_end, ", tail_begin ", tail_begin,
                                 ", context_len ", ctx, " are inconsistent with the sequence"));
    }
    // Blocks lie in [sink_end, tail_begin), so at most that many are selected.
    if (int64_t{sink_end} + std::min(budget, tail_begin - sink_end) + (ctx - tail_begin) >
        plan.max_keys) {
      return bad(i, absl::StrCat("sinks + budget + tail exceed max_keys ", plan.max_keys));
    }
  }
  return absl::OkStatus();
}

namespace {

int32_t FloatField(float v) {
  int32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
float FieldFloat(int32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

}  // namespace

SamplingRow SamplingTable::row(int r) const {
  const int32_t* f = host_params.data() + static_cast<size_t>(r) * kSamplingFields;
  SamplingRow out;
  out.params.temperature = FieldFloat(f[kSampleTemperature]);
  out.params.top_k = f[kSampleTopK];
  out.params.top_p = FieldFloat(f[kSampleTopP]);
  out.params.seed = uint64_t{static_cast<uint32_t>(f[kSampleSeedLo])} |
                    (uint64_t{static_cast<uint32_t>(f[kSampleSeedHi])} << 32);
  out.counter = static_cast<uint32_t>(f[kSampleCounter]);
  return out;
}

std::vector<int32_t> EncodeSamplingRows(std::span<const SamplingRow> rows) {
  std::vector<int32_t> out(rows.size() * kSamplingFields);
  for (size_t r = 0; r < rows.size(); ++r) {
    int32_t* f = out.data() + r * kSamplingFields;
    const SamplingParams& p = rows[r].params;
    f[kSampleTemperature] = FloatField(p.temperature);
    f[kSampleTopK] = p.top_k;
    f[kSampleTopP] = FloatField(p.top_p);
    f[kSampleSeedLo] = static_cast<int32_t>(static_cast<uint32_t>(p.seed));
    f[kSampleSeedHi] = static_cast<int32_t>(static_cast<uint32_t>(p.seed >> 32));
    f[kSampleCounter] = static_cast<int32_t>(rows[r].counter);
  }
  return out;
}

absl::Status ValidateSampleTokens(absl::string_view op, const Tensor& logits, DType logits_dtype,
                                  const SamplingTable& sampling, const Tensor& token_ids,
                                  const Tensor& logprobs) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
  };
  if (!logits.defined() || logits.rank() != 2 || logits.dtype() != logits_dtype ||
      logits.dim(1) < 1) {
    return bad(absl::StrCat("logits must be ", DTypeName(logits_dtype), " [R, V] with V >= 1, got ",
                            logits.defined() ? logits.DebugString() : "<undefined>"));
  }
  const int64_t r = logits.dim(0);
  if (sampling.host_params.size() % kSamplingFields != 0 || sampling.num_rows() != r) {
    return bad(absl::StrCat("the sampling table holds ",
                            sampling.host_params.size() / double{kSamplingFields}, " rows for ", r,
                            " rows of logits"));
  }
  if (logits.dim(1) > (int64_t{1} << 30)) return bad("vocabulary too large");
  if (r == 0) return absl::OkStatus();
  if (!sampling.params.defined() || sampling.params.dtype() != DType::kI32 ||
      sampling.params.rank() != 2 || sampling.params.dim(0) < r ||
      sampling.params.dim(1) != kSamplingFields) {
    return bad(absl::StrCat("sampling params must be i32 [>= ", r, ", ", kSamplingFields, "]"));
  }
  if (!token_ids.defined() || token_ids.dtype() != DType::kI32 || token_ids.numel() != r ||
      !logprobs.defined() || logprobs.dtype() != DType::kF32 || logprobs.numel() != r) {
    return bad(absl::StrCat("token_ids must be i32 [", r, "] and logprobs f32 [", r, "]"));
  }
  for (int i = 0; i < r; ++i) {
    if (absl::Status s = sampling.row(i).params.Validate(); !s.ok()) {
      return bad(absl::StrCat("row ", i, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata::engine

namespace strata::engine {

namespace {

// The row checks of ValidateRowCopies and ValidateChecksumRows; host ranges
// only where there is a host buffer.
absl::Status ValidateRows(absl::string_view op, std::span<const Tensor> tensors,
                          std::span<const RowCopy> rows, const HostBuffer* host) {
  auto bad = [&](size_t i, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": copy ", i, ": ", what));
  };
  if (host != nullptr && !rows.empty() && !host->defined()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": host buffer is undefined"));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const RowCopy& c = rows[i];
    if (c.tensor < 0 || static_cast<size_t>(c.tensor) >= tensors.size()) {
      return bad(i, absl::StrCat("tensor ", c.tensor, " of ", tensors.size()));
    }
    const Tensor& t = tensors[c.tensor];
    if (!t.defined() || t.rank() < 1 || t.dim(0) < 1) {
      return bad(i, absl::StrCat("tensor ", c.tensor, " is undefined or empty"));
    }
    if (c.row < 0 || c.row >= t.dim(0)) {
      return bad(
          i, absl::StrCat("row ", c.row, " outside tensor ", c.tensor, " of ", t.dim(0), " rows"));
    }
    if (host == nullptr) continue;
    const int64_t row_bytes = static_cast<int64_t>(t.nbytes()) / t.dim(0);
    if (c.host_offset < 0 || c.host_offset > static_cast<int64_t>(host->bytes) - row_bytes) {
      return bad(i, absl::StrCat("host range [", c.host_offset, ", +", row_bytes,
                                 ") outside the host buffer of ", host->bytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateRowCopies(absl::string_view op, std::span<const Tensor> tensors,
                               std::span<const RowCopy> rows, const HostBuffer& host) {
  return ValidateRows(op, tensors, rows, &host);
}

absl::Status ValidateKvBlockCopies(absl::string_view op, std::span<const Tensor> k_caches,
                                   std::span<const Tensor> v_caches,
                                   std::span<const KvBlockCopy> blocks, const HostBuffer& host) {
  if (k_caches.size() != v_caches.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", k_caches.size(), " K caches and ", v_caches.size(), " V caches"));
  }
  for (size_t l = 0; l < k_caches.size(); ++l) {
    const Tensor& k = k_caches[l];
    const Tensor& v = v_caches[l];
    if (!k.defined() || !v.defined() || k.rank() != 4 || k.shape() != v.shape() ||
        k.dtype() != v.dtype()) {
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": layer ", l, "'s caches are not a pair of [pages, page_size, kv_heads, head_dim]"));
    }
  }
  if (!blocks.empty() && !host.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": host buffer is undefined"));
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    const KvBlockCopy& b = blocks[i];
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": block ", i, ": ", what));
    };
    if (b.layer < 0 || static_cast<size_t>(b.layer) >= k_caches.size()) {
      return bad(absl::StrCat("layer ", b.layer, " of ", k_caches.size()));
    }
    const Tensor& k = k_caches[b.layer];
    if (b.page < 0 || b.page >= k.dim(0)) {
      return bad(absl::StrCat("page ", b.page, " of ", k.dim(0)));
    }
    if (b.head < 0 || b.head >= k.dim(2)) {
      return bad(absl::StrCat("head ", b.head, " of ", k.dim(2)));
    }
    if (b.tokens < 1 || b.tokens > k.dim(1)) {
      return bad(absl::StrCat(b.tokens, " tokens in a page of ", k.dim(1)));
    }
    if (b.bytes < 1 || b.host_offset < 0 || b.host_offset > static_cast<int64_t>(host.bytes) ||
        b.bytes > static_cast<int64_t>(host.bytes) - b.host_offset) {
      return bad(absl::StrCat("host range [", b.host_offset, ", +", b.bytes,
                              ") outside the host buffer of ", host.bytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateChecksumRows(absl::string_view op, std::span<const Tensor> tensors,
                                  std::span<const RowCopy> rows, std::span<const uint32_t> crcs) {
  if (crcs.size() != rows.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", crcs.size(), " CRC slots for ", rows.size(), " rows"));
  }
  return ValidateRows(op, tensors, rows, nullptr);
}

int64_t KvPieceUnitsBound(KvCodecKind codec, int head_dim, DType source, int64_t count,
                          int64_t clusters) {
  absl::StatusOr<std::unique_ptr<KvCodec>> c = KvCodec::Create(codec);
  if (!c.ok()) return 0;
  // Piece bytes are affine in the tokens, A + B n, give or take a padding
  // byte (int4 with an odd element count): B from two sizes.
  const int64_t one = static_cast<int64_t>((*c)->EncodedBytes(1, head_dim, source));
  const int64_t two = static_cast<int64_t>((*c)->EncodedBytes(2, head_dim, source));
  if (one == 0 || two == 0) return 0;
  const int64_t per_token = two - one, fixed = one - per_token;
  // Each piece wastes less than a unit to alignment; there are at most
  // ceil(count / kKvPieceTokens) full pieces plus one partial per cluster.
  const int64_t pieces = (count + kKvPieceTokens - 1) / kKvPieceTokens + clusters;
  return pieces * ((fixed + 2 + 2 * kKvHostUnit - 1) / kKvHostUnit) +
         (per_token * count + kKvHostUnit - 1) / kKvHostUnit;
}

namespace {

bool IsI32Shape(const Tensor& t, std::initializer_list<int64_t> dims) {
  return t.defined() && t.dtype() == DType::kI32 &&
         t.shape() == std::vector<int64_t>(dims.begin(), dims.end());
}

}  // namespace

absl::Status ValidateOffloadBlocks(absl::string_view op, const Tensor& k_cache,
                                   const Tensor& extents, int first_block, int num_blocks,
                                   int block_stride, const HostBuffer& host, int64_t region_unit,
                                   int64_t units_per_head, const TierTables& t) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
  };
  if (!k_cache.defined() || k_cache.rank() != 4)
    return bad("the cache is not [pages, page, Hkv, D]");
  const int64_t hkv = k_cache.dim(2);
  if (extents.dtype() != DType::kI32 || extents.rank() != 3 || extents.dim(0) != hkv ||
      extents.dim(2) != 2 || !IsI32Shape(t.piece_base, {hkv, extents.dim(1)}) ||
      !IsI32Shape(t.piece_count, {hkv}) || !t.piece_host.defined() ||
      t.piece_host.dtype() != DType::kI32 || t.piece_host.rank() != 2 ||
      t.piece_host.dim(0) != hkv) {
    return bad("extents / tables are not one slot's");
  }
  const int64_t max_blocks = extents.dim(1);
  if (first_block < 0 || num_blocks < 0 || block_stride < 1 ||
      first_block + num_blocks > max_blocks) {
    return bad(absl::StrCat("blocks [", first_block, ", +", num_blocks, ") outside ", max_blocks));
  }
  if (!host.defined() || region_unit < 0 || units_per_head < 0 ||
      (region_unit + hkv * units_per_head) * kKvHostUnit > static_cast<int64_t>(host.bytes) ||
      region_unit + hkv * units_per_head > INT32_MAX) {
    return bad("host region outside the host buffer");
  }
  return absl::OkStatus();
}

absl::Status ValidateRecallBlocks(absl::string_view op, const Tensor& k_cache,
                                  const SparsePlan& plan, const Tensor& extents,
                                  const TierTables& t, const TierRing& ring) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
  };
  if (!k_cache.defined() || k_cache.rank() != 4)
    return bad("the cache is not [pages, page, Hkv, D]");
  const int64_t hkv = k_cache.dim(2), page_size = k_cache.dim(1);
  if (extents.dtype() != DType::kI32 || extents.rank() != 4 || extents.dim(1) != hkv ||
      extents.dim(2) != plan.max_blocks || extents.dim(3) != 2) {
    return bad("extents must be I32 [slots, Hkv, max_blocks, 2]");
  }
  const int64_t slots = extents.dim(0), max_blocks = extents.dim(2);
  if (!IsI32Shape(t.piece_base, {slots, hkv, max_blocks}) || !t.piece_host.defined() ||
      t.piece_host.dtype() != DType::kI32 || t.piece_host.rank() != 3 ||
      t.piece_host.dim(0) != slots || t.piece_host.dim(1) != hkv ||
      !IsI32Shape(t.res_start, {slots, hkv, max_blocks}) ||
      !IsI32Shape(t.res_count, {slots, hkv, max_blocks}) ||
      !IsI32Shape(t.ring_head, {slots, hkv}) || ring.ring_rows <= 0 ||
      ring.ring_rows % page_size != 0 ||
      !IsI32Shape(ring.ring_pages, {slots, ring.ring_rows / page_size}) ||
      !IsI32Shape(ring.status, {slots}) || !ring.stats.defined() ||
      ring.stats.dtype() != DType::kI32 || ring.stats.numel() < kKvTierStats ||
      !ring.host.defined()) {
    return bad("tier tables do not match the extents and the ring");
  }
  if (ring.list_only && ring.fetcher == nullptr) {
    return bad("a read-ahead recall (list_only) has no fetcher to list pieces to");
  }
  for (int i = 0; i < plan.num_entries; ++i) {
    if (plan.host(i, kPlanSlot) < 0 || plan.host(i, kPlanSlot) >= slots) {
      return bad(absl::StrCat("plan entry ", i, ": slot outside the tables"));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata::engine

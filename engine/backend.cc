#include "engine/backend.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace strata::engine {

absl::Status ValidateSparsePlan(const SparsePlan& plan, const AttentionBatch& batch,
                                int64_t num_rows, int num_slots, int num_kv_heads) {
  auto bad = [](int entry, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("sparse plan entry ", entry, ": ", what));
  };
  const int p = plan.num_entries;
  if (p < 0 || static_cast<int64_t>(plan.host_entries.size()) !=
                   int64_t{p} * kSparsePlanFields) {
    return absl::InvalidArgumentError("sparse plan: host_entries does not hold num_entries rows");
  }
  if (p == 0) return absl::OkStatus();
  if (plan.max_keys < 1 || plan.max_blocks < 0) {
    return absl::InvalidArgumentError("sparse plan: max_keys must be >= 1 and max_blocks >= 0");
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
    if (seq < 0 || seq >= batch.num_seqs) return bad(i, absl::StrCat("sequence ", seq, " outside the batch"));
    if (batch.host_query_start[seq + 1] - batch.host_query_start[seq] != 1 ||
        batch.host_query_start[seq] != row) {
      return bad(i, "row is not the single query row of a decode sequence");
    }
    if (slot < 0 || slot >= num_slots) return bad(i, absl::StrCat("slot ", slot, " outside the pools"));
    if (blocks < 0 || blocks > plan.max_blocks) return bad(i, "num_blocks outside [0, max_blocks]");
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

}  // namespace strata::engine

#include "kvtier/kv_sizing.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/backend.h"

namespace strata::kvtier {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The ClusterKV runner's ring: twice the budget unless given, in pages.
int RingTokens(const KvSizingInput::Tiered& t, int page_size) {
  const int ring = std::max(t.ring_tokens, 2 * std::max(t.policy.budget_tokens, 1));
  return static_cast<int>(CeilDiv(ring, page_size) * page_size);
}

}  // namespace

int64_t HostBytesPerSequence(const engine::ModelConfig& config, engine::DType kv_dtype,
                             int page_size, const KvPolicyConfig& policy, engine::KvCodecKind codec,
                             int context) {
  const int64_t page_bytes = int64_t{page_size} * config.num_kv_heads * config.head_dim *
                             static_cast<int64_t>(engine::DTypeSize(kv_dtype));
  const int64_t record =
      CeilDiv(2 * config.num_layers * page_bytes, engine::kKvHostUnit) * engine::kKvHostUnit;
  const int window = std::max(policy.window_tokens, 1);
  const int prompt = std::max(context - window - policy.sink_tokens, 1);
  auto bytes = [&](int64_t tokens, int64_t clusters) {
    return engine::KvPieceUnitsBound(codec, config.head_dim, kv_dtype, tokens, clusters) *
           config.num_kv_heads * engine::kKvHostUnit;
  };
  // A layer's prompt clustering takes a region of whole records; the
  // windows clustered later fill its tail first (KvPolicyRunner).
  const int64_t per_layer =
      CeilDiv(bytes(prompt, CeilDiv(prompt, std::max(policy.tokens_per_cluster, 1))) +
                  bytes(window, std::min(8, window)),
              record) *
      record;
  const int sparse_layers = std::max(config.num_layers - policy.full_layers, 0);
  return per_layer * sparse_layers;
}

absl::StatusOr<KvSizing> SizeKvCache(const KvSizingInput& in) {
  const engine::ModelConfig& c = in.config;
  if (in.page_size < 1 || in.max_context < 1 || in.gpu_bytes < 1 || c.num_layers < 1) {
    return absl::InvalidArgumentError("KV sizing: page size, context and GPU budget must be >= 1");
  }
  const int64_t layer_page = int64_t{2} * in.page_size * c.num_kv_heads * c.head_dim *
                             static_cast<int64_t>(engine::DTypeSize(in.kv_dtype));
  const int64_t context_pages = CeilDiv(in.max_context, in.page_size);
  KvSizing out;
  if (!in.tiered.has_value()) {
    const int64_t pages = in.gpu_bytes / (layer_page * c.num_layers);
    if (pages < context_pages) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV sizing: ", in.gpu_bytes, " bytes of GPU KV cache hold ",
                       pages * in.page_size, " tokens, less than one context of ", in.max_context));
    }
    out.num_pages = static_cast<int>(std::min<int64_t>(pages, INT32_MAX / 2));
    out.gpu_sequences = out.sequences = static_cast<int>(pages / context_pages);
    return out;
  }
  const KvSizingInput::Tiered& t = *in.tiered;
  const int first = t.policy.full_layers;
  if (first < 0 || first >= c.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV sizing: full_layers ", first,
                                                   " leaves no sparse layer of ", c.num_layers,
                                                   " to keep in the host tier"));
  }
  const int upper_layers = c.num_layers - first;
  out.upper_first_layer = first;
  out.resident_tokens = t.policy.sink_tokens + 2 * std::max(t.policy.window_tokens, 1) +
                        RingTokens(t, in.page_size) + 3 * in.page_size;
  const int64_t resident_pages =
      std::min<int64_t>(CeilDiv(out.resident_tokens, in.page_size), context_pages);
  const int64_t per_sequence = layer_page * (context_pages * first + resident_pages * upper_layers);
  const int64_t transient = layer_page * context_pages * upper_layers;
  const int64_t n = (in.gpu_bytes - transient) / per_sequence;
  if (n < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV sizing: ", in.gpu_bytes, " bytes of GPU KV cache cannot hold one sequence of ",
        in.max_context, " tokens with its clusters in the host tier (it needs ",
        per_sequence + transient, ")"));
  }
  const int64_t lower_pages = n * context_pages;
  const int64_t upper_pages =
      (in.gpu_bytes - lower_pages * layer_page * std::max(first, 0)) / (layer_page * upper_layers);
  out.num_pages = static_cast<int>(std::min<int64_t>(lower_pages, INT32_MAX / 2));
  out.num_upper_pages = static_cast<int>(std::min<int64_t>(upper_pages, INT32_MAX / 2));
  out.gpu_sequences = static_cast<int>(std::min<int64_t>(n, INT32_MAX / 2));
  out.host_bytes_per_sequence =
      HostBytesPerSequence(c, in.kv_dtype, in.page_size, t.policy, t.codec, in.max_context);
  out.host_sequences = static_cast<int>(std::min<int64_t>(
      t.host_bytes / std::max<int64_t>(out.host_bytes_per_sequence, 1), INT32_MAX / 2));
  out.sequences = std::min(out.gpu_sequences, out.host_sequences);
  return out;
}

absl::StatusOr<KvSizing> SizeKvCacheForProfiles(const std::vector<KvProfile>& profiles,
                                                KvSizingInput input) {
  int64_t host_bytes = 0;
  const KvProfile* tiered = nullptr;
  for (const KvProfile& p : profiles) {
    host_bytes += p.tiers.host_bytes;
    if (p.policy.type != "clusterkv" || p.tiers.host_bytes <= 0) continue;
    if (tiered == nullptr || p.policy.full_layers < tiered->policy.full_layers) tiered = &p;
  }
  input.tiered.reset();
  if (tiered != nullptr) {
    STRATA_ASSIGN_OR_RETURN(const engine::KvCodecKind codec,
                            engine::ParseKvCodecKind(tiered->codec));
    input.tiered = KvSizingInput::Tiered{tiered->policy, codec, 0, host_bytes};
  }
  return SizeKvCache(input);
}

std::vector<std::string> BudgetProblems(const KvProfile& profile, const KvSizingInput& input) {
  std::vector<std::string> problems;
  const bool tiered = profile.policy.type == "clusterkv" && profile.tiers.host_bytes > 0;
  const int layers = input.config.num_layers;
  if (tiered && profile.policy.full_layers >= layers) {
    problems.push_back(absl::StrCat("kv_policy.full_layers: ", profile.policy.full_layers,
                                    " leaves none of the model's ", layers,
                                    " layers sparse, so tiers.host_bytes holds no cluster"));
    return problems;
  }
  const auto codec = engine::ParseKvCodecKind(profile.codec);
  if (!codec.ok()) {
    problems.push_back(absl::StrCat("codec: ", codec.status().message()));
    return problems;
  }
  if (tiered) {
    const int64_t per_sequence = HostBytesPerSequence(input.config, input.kv_dtype, input.page_size,
                                                      profile.policy, *codec, input.max_context);
    if (profile.tiers.host_bytes < per_sequence) {
      problems.push_back(absl::StrCat("tiers.host_bytes: ", profile.tiers.host_bytes,
                                      " bytes cannot hold the clusters of one ", input.max_context,
                                      "-token sequence, which take ", per_sequence, " bytes in ",
                                      profile.codec));
    }
  }
  if (profile.tiers.gpu_bytes > 0) {
    KvSizingInput in = input;
    in.gpu_bytes = profile.tiers.gpu_bytes;
    if (absl::StatusOr<KvSizing> s = SizeKvCacheForProfiles({profile}, in); !s.ok()) {
      problems.push_back(absl::StrCat("tiers.gpu_bytes: ", s.status().message()));
    }
  }
  return problems;
}

std::string KvSizing::Describe() const {
  if (num_upper_pages == 0) {
    return absl::StrCat(num_pages, " pages of every layer, ", sequences, " full-context sequences");
  }
  return absl::StrCat(num_pages, " pages below layer ", upper_first_layer, ", ", num_upper_pages,
                      " from it (", resident_tokens, " tokens of a tiered sequence stay there); ",
                      gpu_sequences, " full-context sequences on the GPU, ", host_sequences,
                      " in the host tier (", host_bytes_per_sequence, " bytes each): ", sequences,
                      " at once");
}

}  // namespace strata::kvtier

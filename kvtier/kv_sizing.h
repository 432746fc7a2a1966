// SizeKvCache: how a worker divides its GPU KV budget between the two page
// groups (engine/kv_memory.h), and how many full-context sequences its
// tiers hold at once.
//
// Without host-homed clusters every layer keeps every token: one group of
// budget / (bytes of a page of every layer) pages. With them, a sequence
// keeps every token only in the lower layers [0, F); in the upper layers
// it keeps its sinks, its unclustered tail (up to two windows), its ring
// and a page of slack at each boundary, the rest living in the host tier.
// So the budget is split as
//   lower pages = N x context pages
//   upper pages = the rest: N x resident pages, plus one whole context
//                 (a prompt is prefilled in full before it is clustered)
// for the largest N that fits, and the tiers hold min(N, host bytes /
// host bytes per sequence) sequences.
//
// Thread-safety: a pure function.
#ifndef STRATA_KVTIER_KV_SIZING_H_
#define STRATA_KVTIER_KV_SIZING_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/kv_codec.h"
#include "engine/model_config.h"
#include "engine/tensor.h"
#include "kvtier/profile.h"

namespace strata::kvtier {

struct KvSizingInput {
  engine::ModelConfig config;
  engine::DType kv_dtype = engine::DType::kBF16;  // the paged caches' dtype
  int page_size = 16;
  int max_context = 4096;
  int64_t gpu_bytes = 0;  // the KV caches' budget
  // Host-homed clusters; nullopt: every token stays on the GPU.
  struct Tiered {
    KvPolicyConfig policy;  // a clusterkv policy (its full_layers is F)
    engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
    int ring_tokens = 0;  // 0: twice the budget, as KvTierOptions
    int64_t host_bytes = 0;
  };
  std::optional<Tiered> tiered;
};

struct KvSizing {
  int num_pages = 0;          // ModelOptions::num_pages
  int num_upper_pages = 0;    // ModelOptions::num_upper_pages (0: one group)
  int upper_first_layer = 0;  // ModelOptions::upper_first_layer
  int gpu_sequences = 0;      // full-context sequences the GPU budget holds
  int host_sequences = 0;     // ... whose clusters the host tier holds (tiered)
  int sequences = 0;          // at once: the smaller of the two
  int64_t host_bytes_per_sequence = 0;
  int resident_tokens = 0;  // a tiered sequence's upper-layer tokens on the GPU
  std::string Describe() const;
};

// InvalidArgument naming the numbers when the budget holds not one
// full-context sequence.
absl::StatusOr<KvSizing> SizeKvCache(const KvSizingInput& input);

// The KV cache of a worker serving `profiles` (profile i is KV policy i):
// `gpu_bytes` split as SizeKvCache does, tiered by the ClusterKV profile
// with a host tier and the fewest dense layers (every tiered profile's
// sparse layers are then upper layers), with the profiles' host bytes
// together; one group when no profile keeps clusters in the host tier.
absl::StatusOr<KvSizing> SizeKvCacheForProfiles(const std::vector<KvProfile>& profiles,
                                                KvSizingInput input);

// What makes `profile`'s budgets impossible for a model (config, cache dtype,
// page size and context as in `input`; input.gpu_bytes is ignored), one
// line each naming the key: a GPU budget below one sequence's part that
// stays on the GPU, a host tier that cannot hold one sequence's clusters,
// a ClusterKV profile with a host tier but no sparse layer. Empty when the
// budgets can be met.
std::vector<std::string> BudgetProblems(const KvProfile& profile, const KvSizingInput& input);

// Host bytes one sequence of `context` tokens takes with clusters of
// `policy` in `codec`: its prompt clustering and one window's, in every
// sparse layer, rounded to the host tier's records.
int64_t HostBytesPerSequence(const engine::ModelConfig& config, engine::DType kv_dtype,
                             int page_size, const KvPolicyConfig& policy, engine::KvCodecKind codec,
                             int context);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_SIZING_H_

// KvProfile: a named KV policy and tier budget, as a workload tunes it.
//
// A profile file is YAML, validated when loaded: unknown keys, values of the
// wrong type or out of range are errors naming the file, the key and what
// is wrong. Example (every key but `name` is optional):
//
//   name: long-doc-qa
//   kv_policy:
//     type: full            # full | streaming | quest | clusterkv
//     budget_tokens: 1024   # selected tokens per step (quest, clusterkv)
//     sink_tokens: 16       # always-attended first tokens (streaming, clusterkv)
//     window_tokens: 320    # recent tokens always attended
//     tokens_per_cluster: 80
//     kmeans_iterations: 20
//     full_layers: 2        # first layers that always attend to everything
//     quest_page_tokens: 16
//   codec: bf16             # bf16 | fp8_e4m3 | int8 | int4
//   tiers:
//     gpu_bytes: 8GiB       # plain integers or KB/MB/GB/TB (1000) or KiB/MiB/GiB/TiB (1024)
//     host_bytes: 64GiB
//     prefix_bytes: 16GiB   # of host_bytes: prompt KV kept for reuse by prefix
//     ssd_path: /var/lib/strata/kv
//     ssd_bytes: 512GiB
//     ssd_prefix_bytes: 256GiB    # of ssd_bytes: stored prefixes (kept across restarts)
//     ssd_write_admission: cold   # never | cold | always
//
// Which policies and codecs a server can run is checked separately
// (CheckSupported), so a profile file stays valid as the system grows.
//
// Thread-safety: plain values and pure functions.
#ifndef STRATA_KVTIER_PROFILE_H_
#define STRATA_KVTIER_PROFILE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::kvtier {

struct KvPolicyConfig {
  std::string type = "full";
  int budget_tokens = 1024;
  int sink_tokens = 16;
  int window_tokens = 320;
  int tokens_per_cluster = 80;
  int kmeans_iterations = 20;
  // ClusterKV: 0 clusters the prompt in one k-means per layer and KV head;
  // N (a multiple of tokens_per_cluster) clusters it in chunks of
  // positions [kN, (k+1)N), each on its own, so that the clusters of a
  // prompt's first chunks depend on those chunks' tokens alone, whatever
  // follows them (and each k-means is over N keys, not the whole prompt).
  int cluster_chunk_tokens = 0;
  int full_layers = 2;
  int quest_page_tokens = 16;
};

struct TierConfig {
  int64_t gpu_bytes = 0;   // 0: no share of its own (the server's flags size the cache)
  int64_t host_bytes = 0;  // 0: no host tier
  // Of host_bytes: finished requests' KV kept for later requests that start
  // with the same tokens (prefix reuse); 0: none.
  int64_t prefix_bytes = 0;
  std::string ssd_path;  // empty: no SSD tier
  int64_t ssd_bytes = 0;
  // Of ssd_bytes: stored prefixes below the host tier's (needs
  // prefix_bytes); they outlive the server. 0: none.
  int64_t ssd_prefix_bytes = 0;
  // When stored prefix pages and host-homed ClusterKV clusters go down to
  // the SSD: never; cold (prefixes when the host tier's prefix store evicts
  // them, clusters when the host tier passes its high-water mark, least
  // recently run sequences first); or always (as soon as stored or
  // offloaded).
  std::string ssd_write_admission = "cold";
};

struct KvProfile {
  std::string name;
  KvPolicyConfig policy;
  std::string codec = "bf16";
  TierConfig tiers;
};

// The profile a server uses when none is given: exact attention, bf16, the
// GPU tier only.
KvProfile DefaultProfile();

// Parses profile YAML; `source` names it in errors.
absl::StatusOr<KvProfile> ParseProfile(const std::string& yaml_text, const std::string& source);
absl::StatusOr<KvProfile> LoadProfile(const std::string& path);

// Unimplemented naming the key when this build cannot run the profile yet
// (today: any kv_policy.type and codec, GPU, host and SSD budgets, the SSD
// tier only below a host tier). A server's GPU KV cache is its profiles'
// gpu_bytes together, its host tier their host_bytes (kvtier/kv_sizing.h
// divides them), and its SSD tier one database at their ssd_path with
// their ssd_bytes (OpenSsdForProfiles). Each workload keeps within its own
// gpu_bytes (the batcher's page caps) and host_bytes less prefix_bytes
// (the block manager's lines for its paused sequences and host-homed
// clusters), and ssd_bytes less ssd_prefix_bytes on the SSD tier; stored
// prefixes are shared. The codec applies to the clusters a
// ClusterKV profile with a host tier keeps there; preempted sequences swap raw, so a pause never
// changes their tokens. The SSD tier holds paused sequences whole, stored prefixes and host-homed
// clusters (ssd_write_admission applies to the last two).
absl::Status CheckSupported(const KvProfile& profile, const std::string& source);

// Parses "8GiB", "512 MB", "1024": InvalidArgument otherwise.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_PROFILE_H_

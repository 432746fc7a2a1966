// The capacity benchmark behind `strata bench kv-capacity`: how many long
// sequences one GPU decodes at once, and how fast, with every token on the
// GPU or with ClusterKV's clusters in the host tier (per codec).
//
// Each mode sizes the same GPU KV budget with kvtier::SizeKvCache (two page
// groups when clusters go to the host tier), loads the model, and drives the
// real serving path: an engine::Batcher over a kvtier::KvBlockManager and
// the KV policy runner. Sequences of `context` random tokens are added in
// steps of the `seqs` list; once all of them decode together, `steps`
// decode steps are timed (decode tokens/s = sequences x steps / time).
// A mode stops at the first count that cannot run at once (a sequence
// preempted, or not all running within the step limit).
//
// Thread-safety: a plain function; drives the backend it is given.
#ifndef STRATA_BENCH_KV_CAPACITY_BENCH_H_
#define STRATA_BENCH_KV_CAPACITY_BENCH_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/kv_codec.h"
#include "engine/model_loader.h"
#include "kvtier/kv_policy.h"
#include "kvtier/profile.h"

namespace strata::bench {

struct CapacityMode {
  std::string name;               // e.g. "clusterkv@host:int4"
  kvtier::KvPolicyConfig policy;  // full or clusterkv
  // The codec of clusters kept in the host tier; nullopt: all on the GPU.
  std::optional<engine::KvCodecKind> host_codec;
  double prefetch_share = kvtier::KvTierOptions().prefetch_share;
};

struct CapacityOptions {
  engine::ModelSource source;
  engine::KvCacheType kv_cache = engine::KvCacheType::kActivation;
  int context = 32768;
  int64_t gpu_kv_bytes = 0;
  int64_t host_bytes = 0;
  std::vector<int> seqs;  // ascending
  int steps = 16;
  int warmup = 2;
  int max_batch_tokens = 8192;
  std::vector<CapacityMode> modes;
};

struct CapacityPoint {
  std::string mode;
  int seqs = 0;
  bool fits = false;  // all ran at once, none preempted
  double decode_tokens_per_s = 0;
  double step_ms = 0;
  double ring_hit_rate = 0;  // host-homed selected tokens found in the ring
  double recall_mib_per_step = 0;
  double recall_ms_per_step = 0;     // the recalls' device time
  double prefetch_mib_per_step = 0;  // read by the prefetches (beside the layers)
  int64_t host_bytes_used = 0;
  int upper_pages_used = 0, upper_pages_total = 0;
  std::string why;  // when it does not fit
};

struct CapacityResult {
  std::vector<CapacityPoint> points;
  // Per mode: how SizeKvCache divided the budget.
  std::vector<std::pair<std::string, std::string>> sizing;
};

absl::StatusOr<CapacityResult> RunKvCapacity(engine::Backend* backend,
                                             const CapacityOptions& options);

}  // namespace strata::bench

#endif  // STRATA_BENCH_KV_CAPACITY_BENCH_H_

// Benchmarks of the KV policies (kvtier/kv_policy.h) behind
// `strata bench kv-policies` and `strata bench kv-speed`.
//
// Accuracy (EvalPolicy): a trained retrieval model (models/retrieval-llama)
// answers needle-in-a-haystack prompts from an eval set; per policy and
// budget it reports exact-match accuracy (overall, per context length and
// per needle depth) and, against the dense run of the same prompts:
//   - greedy agreement: the fraction of generated positions whose token
//     equals the dense run's token at that position;
//   - top-k recall: of each query head's k highest exact attention weights
//     (over the whole context), the fraction the policy attends to;
//   - attention output error: |o_sparse - o_full| / |o_full| per query head;
//   - reselection: of the tokens selected from blocks, the fraction the same
//     (sequence, layer, KV head) had selected at the previous step, i.e. the
//     hit rate of a GPU cache that keeps last step's selection.
// The attention metrics are computed on the host from copies of the caches
// on the first `fidelity_steps` decode steps.
//
// With EvalOptions::query_in_decode = N, each prompt's last N tokens (the
// question) are fed through decode steps after the rest has been prefilled
// (GenerationRequest::decode_tokens): the question then reads the context
// only through the policy's selection, as a later turn over a compressed
// context would. With N = 0 the question is prefilled densely with the
// context, and only the answer's tokens after the first see the policy.
//
// Speed (MeasureDecodeSpeed): a batch of sequences is prefilled to a given
// context once, then each policy decodes `steps` steps over it; reports the
// mean step time and the first step's summary work (ClusterKV's clustering,
// Quest's page bounds): its operators' device time where the backend times
// operators, else the first step minus a regular one.
//
// Thread-safety: functions drive the given model; one caller at a time.
#ifndef STRATA_BENCH_KV_POLICY_BENCH_H_
#define STRATA_BENCH_KV_POLICY_BENCH_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/profile.h"

namespace strata::bench {

// One eval prompt: {"length": L, "depth": d, "prompt": [...], "answer": [...]}.
struct RetrievalCase {
  int length = 0;
  double depth = 0.0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> answer;
};

// Reads JSON lines; InvalidArgument naming the line for a malformed case or
// ids outside [0, vocab_size).
absl::StatusOr<std::vector<RetrievalCase>> LoadRetrievalCases(const std::string& path,
                                                              int vocab_size);

struct AccuracyCount {
  int correct = 0;
  int total = 0;
  double rate() const { return total > 0 ? static_cast<double>(correct) / total : 0.0; }
};

struct PolicyEval {
  kvtier::KvPolicyConfig config;
  AccuracyCount overall;
  std::map<int, AccuracyCount> by_length;
  std::map<int, AccuracyCount> by_depth_percent;  // depth * 100, rounded
  double greedy_agreement = 1.0;
  double topk_recall = 1.0;
  double output_error = 0.0;
  double reselection = 0.0;
  double ring_hit_rate = -1.0;    // host tier: selected host tokens the GPU ring held
  int64_t recall_tokens = 0;      // ... that it did not (read from host memory)
  int64_t prefetch_tokens = 0;    // host tokens the prefetches read
  int64_t attention_samples = 0;  // (query head, layer, step) triples measured
  // The generated tokens per case (the dense run's are the reference).
  std::vector<std::vector<int32_t>> outputs;
};

struct EvalOptions {
  int generate_tokens = 0;  // per case; 0: the answer length
  int max_batch = 16;       // sequences decoding together
  int fidelity_steps = 2;   // decode steps with attention metrics (0: none)
  int topk = 32;
  int query_in_decode = 0;  // prompt tokens fed through decode steps (see above)
  // With a block manager: ClusterKV's clusters all live in its host tier,
  // encoded with `codec`, and are recalled by the steps that select them.
  // The attention metrics and reselection are not measured then (they
  // read the selection, which the recall rewrites to cache slots).
  kvtier::KvBlockManager* host_tier = nullptr;
  engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
  double prefetch_share = kvtier::KvTierOptions().prefetch_share;
};

// Runs every case under `config` (type "full" runs densely). `reference`
// (the dense run) may be null; then agreement is not computed.
absl::StatusOr<PolicyEval> EvalPolicy(engine::Model* model, const kvtier::KvPolicyConfig& config,
                                      const std::vector<RetrievalCase>& cases,
                                      const PolicyEval* reference, const EvalOptions& options);

struct SpeedResult {
  kvtier::KvPolicyConfig config;
  int batch = 0;
  int context = 0;
  double step_ms = 0.0;        // mean decode step
  double first_step_ms = 0.0;  // includes clustering / page summaries
  double prefill_s = 0.0;      // of the whole batch
  // Device time of the first step's summary work (ClusterKeys, KeyBounds),
  // timed per operator; -1 when the backend does not time operators.
  double summary_ms = -1.0;
  // With op timing: per-operator device time per step over `steps` more
  // steps run with timing on, and their wall time per step (the difference
  // is time the device waited for the host).
  std::vector<engine::OpTime> op_times;
  double timed_step_ms = 0.0;
  // Host-homed clusters (TierMode): the mode's name ("gpu" when none), and
  // over the steps after the warm-up the share of selected host-homed
  // tokens the GPU ring held (hits and refreshes) and the host MiB read per
  // step.
  std::string tier = "gpu";
  double ring_hit_rate = -1.0;
  double recall_mib_per_step = 0.0;
  double prefetch_mib_per_step = 0.0;  // read by the prefetches (beside it)
  // With clusters below the host tier (TierMode::spill_stride): per timed
  // step, the clusters fetched from the SSD, their MiB, and the time the
  // step waited for them.
  double hard_misses_per_step = 0.0;
  double ssd_mib_per_step = 0.0;
  double ssd_wait_ms_per_step = 0.0;
  // ... of those hard misses, the ones read ahead (spill_read_ahead).
  double read_ahead_used_per_step = 0.0;
};

// Where a ClusterKV config's clusters live in MeasureDecodeSpeed: every
// block_stride-th cluster in the host tier (0: all on the GPU), and of
// those every spill_stride-th on the manager's SSD tier (0: none), sent
// down before the timed steps.
struct TierMode {
  std::string name = "gpu";
  int block_stride = 0;
  engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
  double prefetch_share = kvtier::KvTierOptions().prefetch_share;
  int spill_stride = 0;
  int spill_io_threads = 8;
  bool spill_read_ahead = kvtier::KvTierOptions().spill_read_ahead;
};

// Prefills `batch` sequences of `context` tokens (random ids) once, then
// for each config decodes `steps` timed steps after `warmup` untimed ones
// (and, with `op_timing`, `steps` more with the backend's op timing on).
// With a block manager, the sequences' pages come from it and each
// ClusterKV config runs once per tier mode (the others once, on the GPU).
absl::StatusOr<std::vector<SpeedResult>> MeasureDecodeSpeed(
    engine::Model* model, const std::vector<kvtier::KvPolicyConfig>& configs, int batch,
    int context, int steps, int warmup, bool op_timing = false,
    kvtier::KvBlockManager* manager = nullptr, const std::vector<TierMode>& tiers = {});

}  // namespace strata::bench

#endif  // STRATA_BENCH_KV_POLICY_BENCH_H_

// Model: the Llama-family transformer forward pass, written once against
// engine::Backend, over a paged KV cache.
//
// One Forward call runs one batcher step: any mix of prefill chunks and
// decode tokens from different sequences (StepInput). Each layer:
//   h = norm(x); qkv = h Wqkv (+b); rope(q, k); write k, v to the cache;
//   a = paged causal attention; x += a Wo; h = norm(x);
//   x += down(silu(h Wgate) * h Wup)
// and the last hidden state of the requested rows goes through the final
// norm and lm_head. Activation buffers are allocated once, for the largest
// step the options allow, so a step allocates nothing.
//
// With a Communicator the model is one rank of a tensor-parallel group
// (engine/tensor_parallel.h): it holds its share of the weights and of the
// KV heads, and the step's collectives meet the other ranks'. The leader
// (rank 0) is the one the batcher drives; set_followers makes the others
// take each of its steps. The leader waits for them a collective's timeout
// after its own step, and as long again after aborting the group; a rank
// still not back is stuck outside any collective (a hung device), and
// since it may still use the step's input and the KV, the process exits
// with an error naming it, for the orchestrator to restart it.
//
// Thread-safety: one thread at a time (it drives a Backend).
#ifndef STRATA_ENGINE_MODEL_H_
#define STRATA_ENGINE_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention_planner.h"
#include "engine/backend.h"
#include "engine/kv_memory.h"
#include "engine/layer_kv_observer.h"
#include "engine/model_config.h"
#include "engine/sampler.h"
#include "engine/tensor_parallel.h"
#include "engine/weights.h"

namespace strata::engine {

// How the KV cache stores keys and values.
enum class KvCacheType {
  kActivation,  // the backend's activation dtype (bf16 on CUDA, fp32 on CPU)
  // fp8 e4m3: half the bytes of bf16, so twice the tokens per byte of cache
  // and half the bytes a decode step reads. Values are rounded (nearest
  // even) when written and saturate at +-448; there is no scale factor, the
  // same as vLLM's fp8 cache without calibrated scales.
  kFp8E4M3,
};

// Parses a --kv-cache-dtype value: "auto" (the activation dtype) or
// "fp8_e4m3" (also "fp8").
absl::StatusOr<KvCacheType> ParseKvCacheType(std::string_view name);
const char* KvCacheTypeName(KvCacheType type);

struct ModelOptions {
  int max_batch_tokens = 2048;  // tokens per step (prefill chunks + decodes)
  int max_seqs = 64;            // sequences per step
  int max_context = 4096;       // tokens per sequence (capped by the config)
  int page_size = 16;           // tokens per KV page
  int num_pages = 0;            // KV pages in the cache; 0: max_seqs full contexts
  int max_logit_rows = 0;       // rows of logits per step; 0: max_seqs
  // ForwardSample replays pure decode steps from backend graphs
  // (Backend::BeginCapture): the batch is padded to a bucket (1, 2, 4, 8,
  // then multiples of 16) with rows that write to a spare cache page, and
  // one graph is recorded per (bucket, power-of-two context bound), the
  // second time that pair is seen. With an attention planner, only steps
  // whose plans the planner can replay (AttentionPlanner::GraphKey, part of
  // the key) use graphs; it plans the padding rows too.
  bool decode_graphs = true;
  KvCacheType kv_cache = KvCacheType::kActivation;
  // Page groups (engine/kv_memory.h). With num_upper_pages > 0, the layers
  // from upper_first_layer on have caches of num_upper_pages pages and a
  // block table of their own (StepInput::upper_block_tables), so that a KV
  // policy that homes their older tokens in the host tier can free those
  // pages while the lower layers keep every token. 0: one group.
  int num_upper_pages = 0;
  int upper_first_layer = 0;
};

// The tokens of one step, grouped by sequence (see AttentionBatch).
struct StepInput {
  std::vector<int32_t> token_ids;    // [T]
  std::vector<int32_t> positions;    // [T]
  std::vector<int32_t> query_start;  // [S + 1]
  std::vector<int32_t> context_len;  // [S]: cache length after this step
  // Per sequence, its pages in order (at least ceil(context_len / page_size)).
  std::vector<std::vector<int32_t>> block_tables;
  // With two page groups (ModelOptions::num_upper_pages): per sequence, its
  // pages of the upper layers, as long as its block_tables entry; an entry
  // may be kPageOffGpu where no token of this step is written (a KV policy
  // reads those tokens from elsewhere). Empty with one group.
  std::vector<std::vector<int32_t>> upper_block_tables;
  // Rows whose next-token logits are wanted (e.g. each sequence's last row);
  // may be empty when no sequence samples in this step.
  std::vector<int32_t> logit_rows;
  // For an AttentionPlanner: each sequence's id (stable across steps) and
  // the KV policy its request chose (an index the planner defines; 0 is the
  // default). Empty means ids 0..S-1 and policy 0.
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> kv_policies;
};

// The batch size a graphed decode step of `seqs` sequences is padded to:
// 1, 2, 4 or 8, then a multiple of 16 (ModelOptions::decode_graphs; the
// model pads no further than its own limits).
int DecodeGraphBucket(int seqs);

class Communicator;

class Model {
 public:
  // `comm` (not owned; may be null: one rank) makes this model its rank of
  // a tensor-parallel group; `weights` must then be that rank's share.
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       ModelWeights weights, Backend* backend,
                                                       const ModelOptions& options,
                                                       Communicator* comm = nullptr);

  // Runs the step; returns logits [logit_rows.size(), vocab] in fp32.
  // Validates the input (ids in the vocabulary, positions in the context,
  // pages in the cache) and returns InvalidArgument instead of running.
  absl::StatusOr<std::vector<float>> Forward(const StepInput& input);
  // Runs the step and samples one token per logit row on the backend
  // (Backend::SampleTokens) with rows[i] for logit_rows[i]; only the ids and
  // logprobs come back to the host. InvalidArgument when rows does not
  // match logit_rows or a row's parameters are invalid.
  absl::StatusOr<std::vector<SampledToken>> ForwardSample(const StepInput& input,
                                                          std::span<const SamplingRow> rows);

  // The leader's steps run on the other ranks too (not owned; null: none).
  void set_followers(RankFollowers* followers) { followers_ = followers; }
  // Every rank's model, the leader's (this) first, for what holds KV on
  // all of them (kvtier::KvDevice); not owned. Just this one by default.
  void set_ranks(std::vector<Model*> ranks) { ranks_ = std::move(ranks); }
  const std::vector<Model*>& ranks() const { return ranks_; }
  const TensorParallelShard& shard() const { return shard_; }
  // This rank's communicator (null with one rank and no group).
  Communicator* communicator() const { return comm_; }

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  Backend& backend() { return *backend_; }
  // Decode steps ask `planner` (may be null: dense attention) which tokens to
  // attend to. Not owned; must outlive the model's use of it. Decode graphs
  // recorded with another planner (they hold its buffers) are released.
  // With tensor parallelism each rank's model has its own planner over its
  // KV heads, and the leader's is a RankedPlanner over all of them.
  absl::Status set_attention_planner(AttentionPlanner* planner);
  AttentionPlanner* attention_planner() const { return planner_; }
  // Told of each layer's KV writes as a step is enqueued (may be null). Not
  // owned; must outlive the model's use of it. Steps run from a recorded
  // graph (decode) do not tell it.
  void set_layer_kv_observer(LayerKvObserver* observer) { layer_kv_observer_ = observer; }
  // Whether the layers split into two page groups, and the group of a layer.
  bool two_page_groups() const { return options_.num_upper_pages > 0; }
  PageGroup page_group(int layer) const {
    return two_page_groups() && layer >= options_.upper_first_layer ? PageGroup::kUpper
                                                                    : PageGroup::kLower;
  }
  // The layer's paged caches [pages + 1, page_size, Hkv, D] (Hkv: this
  // rank's KV heads), where pages is
  // num_pages, or num_upper_pages in the upper group (the last page is the
  // spare that padding rows write to).
  Tensor& k_cache(int layer) { return k_cache_[layer]; }
  Tensor& v_cache(int layer) { return v_cache_[layer]; }
  int64_t weight_bytes() const { return weights_.bytes; }
  // Decode graphs recorded so far (ModelOptions::decode_graphs).
  int num_decode_graphs() const { return static_cast<int>(decode_graphs_.size()); }
  int64_t kv_bytes_per_token() const;
  // The dtype the KV caches are stored in (ModelOptions::kv_cache).
  DType kv_cache_dtype() const {
    return options_.kv_cache == KvCacheType::kFp8E4M3 ? DType::kF8E4M3
                                                      : backend_->activation_dtype();
  }

 private:
  Model(const ModelConfig& config, ModelWeights weights, Backend* backend,
        const ModelOptions& options, const TensorParallelShard& shard, Communicator* comm);
  // Forward / ForwardSample on this rank alone (the followers run these).
  absl::StatusOr<std::vector<float>> ForwardOnRank(const StepInput& input);
  absl::StatusOr<std::vector<SampledToken>> ForwardSampleOnRank(const StepInput& input,
                                                                std::span<const SamplingRow> rows);
  // After this rank's step: a failure that may strand the other ranks in a
  // collective aborts the group; waits for the followers. The first error.
  absl::Status EndStep(absl::Status own);
  absl::Status AllocateBuffers();
  absl::Status Validate(const StepInput& input) const;
  // The forward pass shared by Forward and ForwardSample: returns the
  // device logits [logit_rows.size(), vocab] (undefined when no rows).
  absl::StatusOr<Tensor> RunStep(const StepInput& input);
  // RunStep's parts: the step's inputs to the device (no validation), with
  // `padding` extra one-token sequences at position 0 that write to the
  // spare page and ask for logits; and the layers plus lm_head over the
  // uploaded step (`tokens` rows, the first `rows_out` logit rows).
  absl::StatusOr<AttentionBatch> Upload(const StepInput& input, int padding);
  // `batch` holds both groups' tables (AttentionBatch::upper_block_table).
  absl::StatusOr<Tensor> Compute(const AttentionBatch& batch, int64_t tokens, int rows_out);
  // Guesses `layer`'s queries from the residual stream at the previous
  // layer's input and hands them to the planner (AttentionPlanner::Prefetches).
  absl::Status PrefetchNextLayer(int layer, const AttentionBatch& batch, const Tensor& residual,
                                 const Tensor& positions);
  // Uploads the sampling rows (padded with greedy rows to `padded_rows`)
  // into sampling_table_; enqueues Backend::SampleTokens over logits with
  // it into sampled_ids_ / sampled_logprobs_; both.
  absl::Status UploadSamplingRows(std::span<const SamplingRow> rows, int padded_rows);
  absl::Status SampleUploaded(const Tensor& logits, int padded_rows);
  absl::Status Sample(const Tensor& logits, std::span<const SamplingRow> rows, int padded_rows);
  // ForwardSample's validation and compute for a step through a decode
  // graph, leaving the tokens in sampled_ids_ / sampled_logprobs_; false
  // (nothing done) when the step is not a pure decode step of one logit row
  // per sequence in order (or the planner is not Replayable), which the
  // caller then runs directly. With a planner whose GraphKey is nullopt the
  // step runs directly here.
  absl::StatusOr<bool> SampleDecodeGraph(const StepInput& input, std::span<const SamplingRow> rows);

  ModelConfig config_;
  ModelWeights weights_;
  Backend* backend_;
  AttentionPlanner* planner_ = nullptr;
  LayerKvObserver* layer_kv_observer_ = nullptr;
  bool capturing_ = false;  // a decode graph is being recorded
  ModelOptions options_;
  TensorParallelShard shard_;
  Communicator* comm_ = nullptr;
  RankFollowers* followers_ = nullptr;
  std::vector<Model*> ranks_;
  QkvLayout layout_;
  int max_blocks_per_seq_ = 0;

  std::vector<Tensor> k_cache_, v_cache_;  // per layer [pages, page, Hkv, D]
  Tensor inv_freq_;
  // Step buffers sized for max_batch_tokens / max_seqs.
  Tensor ids_, positions_, slots_, query_start_, context_len_, block_table_, logit_rows_;
  Tensor upper_slots_, upper_block_table_;  // with two page groups
  Tensor residual_, normed_, qkv_, attn_, proj_, gate_up_, act_, last_, logits_;
  Tensor rank_logits_;  // with several ranks: this rank's vocabulary's logits
  // A prefetching planner's guessed queries of the next layer (decode
  // steps: max_seqs rows), allocated when such a planner is installed.
  Tensor guess_normed_, guess_qkv_;
  Tensor sample_params_, sampled_ids_, sampled_logprobs_;  // [max_logit_rows, ...]
  SamplingTable sampling_table_;                           // the last uploaded rows
  std::vector<int32_t> host_slots_, host_table_, host_upper_slots_, host_upper_table_;
  // Host staging of a (padded) step's small arrays.
  std::vector<int32_t> host_ids_, host_positions_, host_logit_rows_;

  // Decode graphs: ids by (padded batch, context bound, the planner's
  // GraphKey); keys seen once (run directly, so workspaces and GEMM plans
  // exist before a capture).
  std::map<std::vector<int32_t>, int> decode_graphs_;
  std::set<std::vector<int32_t>> decode_graphs_seen_;
  bool graphs_unsupported_ = false;
  // A cache page no sequence owns, per group: padding rows write there, and
  // kPageOffGpu entries read it.
  int spare_page_ = 0, upper_spare_page_ = 0;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_MODEL_H_

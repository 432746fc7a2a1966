#include "engine/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/communicator.h"

namespace strata::engine {

Model::Model(const ModelConfig& config, ModelWeights weights, Backend* backend,
             const ModelOptions& options, const TensorParallelShard& shard, Communicator* comm)
    : config_(config),
      weights_(std::move(weights)),
      backend_(backend),
      options_(options),
      shard_(shard),
      comm_(comm),
      ranks_{this} {
  layout_ = {shard.q_heads, shard.kv_heads, config.head_dim};
}

absl::StatusOr<KvCacheType> ParseKvCacheType(std::string_view name) {
  if (name == "auto") return KvCacheType::kActivation;
  if (name == "fp8" || name == "fp8_e4m3") return KvCacheType::kFp8E4M3;
  return absl::InvalidArgumentError(absl::StrCat("unknown KV cache dtype \"", std::string(name),
                                                 "\": expected auto or fp8_e4m3"));
}

const char* KvCacheTypeName(KvCacheType type) {
  return type == KvCacheType::kFp8E4M3 ? "fp8_e4m3" : "auto";
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     ModelWeights weights, Backend* backend,
                                                     const ModelOptions& options,
                                                     Communicator* comm) {
  STRATA_ASSIGN_OR_RETURN(
      const TensorParallelShard shard,
      ShardModel(config, comm != nullptr ? comm->rank() : 0, comm != nullptr ? comm->size() : 1));
  // The weights must be this rank's share (LoadWeights with the shard).
  const int64_t qkv_rows = int64_t{shard.q_heads + 2 * shard.kv_heads} * config.head_dim;
  if (weights.layers.size() != static_cast<size_t>(config.num_layers) ||
      (config.num_layers > 0 && (weights.layers[0].qkv.dim(0) != qkv_rows ||
                                 weights.layers[0].gate_up.dim(0) != 2 * shard.intermediate)) ||
      weights.lm_head.dim(0) != shard.vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: the weights are not rank ", shard.rank, " of ", shard.size,
                     "'s share of the config (load them with its TensorParallelShard)"));
  }
  ModelOptions o = options;
  if (o.max_batch_tokens <= 0 || o.max_seqs <= 0 || o.max_context <= 0 || o.page_size <= 0) {
    return absl::InvalidArgumentError("model options: sizes must be positive");
  }
  o.max_context = std::min(o.max_context, config.max_position_embeddings);
  o.max_seqs = std::min(o.max_seqs, o.max_batch_tokens);
  const int blocks = (o.max_context + o.page_size - 1) / o.page_size;
  if (o.num_pages <= 0) o.num_pages = blocks * o.max_seqs;
  if (o.num_upper_pages < 0 ||
      (o.num_upper_pages > 0 &&
       (o.upper_first_layer < 0 || o.upper_first_layer >= config.num_layers))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model options: two page groups need num_upper_pages >= 0 and upper_first_layer in [0, ",
        config.num_layers, "), got ", o.num_upper_pages, " and ", o.upper_first_layer));
  }
  if (o.num_upper_pages == 0) o.upper_first_layer = 0;
  if (o.max_logit_rows <= 0) o.max_logit_rows = o.max_seqs;
  o.max_logit_rows = std::min(o.max_logit_rows, o.max_batch_tokens);
  std::unique_ptr<Model> model(new Model(config, std::move(weights), backend, o, shard, comm));
  model->max_blocks_per_seq_ = blocks;
  STRATA_RETURN_IF_ERROR(model->AllocateBuffers());
  return model;
}

int64_t Model::kv_bytes_per_token() const {
  return int64_t{2} * config_.num_layers * shard_.kv_heads * config_.head_dim *
         static_cast<int64_t>(DTypeSize(kv_cache_dtype()));
}

absl::Status Model::AllocateBuffers() {
  Backend& b = *backend_;
  const DType dt = b.activation_dtype();
  const int64_t t = options_.max_batch_tokens, s = options_.max_seqs;
  const int64_t h = config_.hidden_size, inter = shard_.intermediate;
  for (int i = 0; i < config_.num_layers; ++i) {
    // One page more than the sequences may use: padding rows of decode
    // graphs write their keys there.
    const int pages =
        page_group(i) == PageGroup::kUpper ? options_.num_upper_pages : options_.num_pages;
    const std::vector<int64_t> shape = {pages + 1, options_.page_size, shard_.kv_heads,
                                        config_.head_dim};
    STRATA_ASSIGN_OR_RETURN(Tensor k, b.Allocate(kv_cache_dtype(), shape));
    STRATA_ASSIGN_OR_RETURN(Tensor v, b.Allocate(kv_cache_dtype(), shape));
    k_cache_.push_back(std::move(k));
    v_cache_.push_back(std::move(v));
  }
  const std::vector<float> inv_freq = config_.RopeInvFreq();
  STRATA_ASSIGN_OR_RETURN(inv_freq_,
                          b.Allocate(DType::kF32, {static_cast<int64_t>(inv_freq.size())}));
  STRATA_RETURN_IF_ERROR(
      b.CopyFromHost(inv_freq.data(), DType::kF32, inv_freq.size(), inv_freq_, 0));
  STRATA_ASSIGN_OR_RETURN(ids_, b.Allocate(DType::kI32, {t}));
  STRATA_ASSIGN_OR_RETURN(positions_, b.Allocate(DType::kI32, {t}));
  STRATA_ASSIGN_OR_RETURN(slots_, b.Allocate(DType::kI32, {t}));
  STRATA_ASSIGN_OR_RETURN(query_start_, b.Allocate(DType::kI32, {s + 1}));
  STRATA_ASSIGN_OR_RETURN(context_len_, b.Allocate(DType::kI32, {s}));
  STRATA_ASSIGN_OR_RETURN(block_table_, b.Allocate(DType::kI32, {s, max_blocks_per_seq_}));
  if (two_page_groups()) {
    STRATA_ASSIGN_OR_RETURN(upper_slots_, b.Allocate(DType::kI32, {t}));
    STRATA_ASSIGN_OR_RETURN(upper_block_table_, b.Allocate(DType::kI32, {s, max_blocks_per_seq_}));
    host_upper_table_.assign(static_cast<size_t>(s) * max_blocks_per_seq_, 0);
  }
  const int64_t logit_rows = options_.max_logit_rows;
  STRATA_ASSIGN_OR_RETURN(logit_rows_, b.Allocate(DType::kI32, {logit_rows}));
  STRATA_ASSIGN_OR_RETURN(residual_, b.Allocate(dt, {t, h}));
  STRATA_ASSIGN_OR_RETURN(normed_, b.Allocate(dt, {t, h}));
  STRATA_ASSIGN_OR_RETURN(qkv_, b.Allocate(dt, {t, layout_.row_width()}));
  STRATA_ASSIGN_OR_RETURN(attn_, b.Allocate(dt, {t, int64_t{shard_.q_heads} * config_.head_dim}));
  STRATA_ASSIGN_OR_RETURN(proj_, b.Allocate(dt, {t, h}));
  STRATA_ASSIGN_OR_RETURN(gate_up_, b.Allocate(dt, {t, 2 * inter}));
  STRATA_ASSIGN_OR_RETURN(act_, b.Allocate(dt, {t, inter}));
  STRATA_ASSIGN_OR_RETURN(last_, b.Allocate(dt, {logit_rows, h}));
  STRATA_ASSIGN_OR_RETURN(logits_, b.Allocate(dt, {logit_rows, config_.vocab_size}));
  if (shard_.size > 1) {
    STRATA_ASSIGN_OR_RETURN(rank_logits_, b.Allocate(dt, {logit_rows, shard_.vocab}));
  }
  STRATA_ASSIGN_OR_RETURN(sample_params_, b.Allocate(DType::kI32, {logit_rows, kSamplingFields}));
  STRATA_ASSIGN_OR_RETURN(sampled_ids_, b.Allocate(DType::kI32, {logit_rows}));
  STRATA_ASSIGN_OR_RETURN(sampled_logprobs_, b.Allocate(DType::kF32, {logit_rows}));
  host_table_.assign(static_cast<size_t>(s) * max_blocks_per_seq_, 0);
  spare_page_ = options_.num_pages;
  upper_spare_page_ = options_.num_upper_pages;
  return b.Synchronize();
}

absl::Status Model::Validate(const StepInput& in) const {
  const int64_t t = static_cast<int64_t>(in.token_ids.size());
  const int num_seqs = static_cast<int>(in.context_len.size());
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError("forward step: " + what);
  };
  if (t == 0) return bad("no tokens");
  if (t > options_.max_batch_tokens) {
    return bad(absl::StrCat(t, " tokens exceed max_batch_tokens ", options_.max_batch_tokens));
  }
  if (num_seqs == 0 || num_seqs > options_.max_seqs) {
    return bad(absl::StrCat(num_seqs, " sequences (allowed 1..", options_.max_seqs, ")"));
  }
  if (in.positions.size() != in.token_ids.size())
    return bad("positions and token_ids differ in length");
  if (static_cast<int>(in.query_start.size()) != num_seqs + 1 || in.query_start[0] != 0 ||
      in.query_start.back() != t || static_cast<int>(in.block_tables.size()) != num_seqs) {
    return bad("query_start / block_tables do not match the sequences");
  }
  if (static_cast<int>(in.upper_block_tables.size()) != (two_page_groups() ? num_seqs : 0)) {
    return bad(two_page_groups() ? "upper_block_tables must name every sequence"
                                 : "upper_block_tables given to a model with one page group");
  }
  if ((!in.seq_ids.empty() && static_cast<int>(in.seq_ids.size()) != num_seqs) ||
      (!in.kv_policies.empty() && static_cast<int>(in.kv_policies.size()) != num_seqs)) {
    return bad("seq_ids / kv_policies must be empty or name every sequence");
  }
  if (static_cast<int>(in.logit_rows.size()) > options_.max_logit_rows) {
    return bad("logit_rows names more than max_logit_rows rows");
  }
  for (int32_t id : in.token_ids) {
    if (id < 0 || id >= config_.vocab_size) {
      return bad(absl::StrCat("token id ", id, " outside the vocabulary of ", config_.vocab_size));
    }
  }
  for (int32_t r : in.logit_rows) {
    if (r < 0 || r >= t) return bad(absl::StrCat("logit row ", r, " outside the step"));
  }
  for (int s = 0; s < num_seqs; ++s) {
    const int q_len = in.query_start[s + 1] - in.query_start[s];
    const int ctx = in.context_len[s];
    if (q_len <= 0 || ctx < q_len)
      return bad(absl::StrCat("sequence ", s, ": bad query/context length"));
    if (ctx > options_.max_context) {
      return bad(absl::StrCat("sequence ", s, ": context ", ctx, " exceeds max_context ",
                              options_.max_context));
    }
    const auto& table = in.block_tables[s];
    if (static_cast<int64_t>(table.size()) * options_.page_size < ctx ||
        static_cast<int>(table.size()) > max_blocks_per_seq_) {
      return bad(absl::StrCat("sequence ", s, ": block table of ", table.size(), " pages for ", ctx,
                              " tokens"));
    }
    for (int32_t page : table) {
      if (page < 0 || page >= options_.num_pages)
        return bad(absl::StrCat("page ", page, " outside the cache"));
    }
    if (two_page_groups()) {
      const auto& upper = in.upper_block_tables[s];
      if (upper.size() != table.size()) {
        return bad(absl::StrCat("sequence ", s, ": upper block table of ", upper.size(),
                                " pages, block table of ", table.size()));
      }
      for (int32_t page : upper) {
        if (page != kPageOffGpu && (page < 0 || page >= options_.num_upper_pages))
          return bad(absl::StrCat("upper page ", page, " outside the cache"));
      }
      // The step writes its tokens' keys: their pages must be on the GPU.
      for (int pos = ctx - q_len; pos < ctx; pos += options_.page_size - pos % options_.page_size) {
        if (upper[pos / options_.page_size] == kPageOffGpu) {
          return bad(absl::StrCat("sequence ", s, ": position ", pos,
                                  " is written but its upper page is off the GPU"));
        }
      }
    }
    for (int j = 0; j < q_len; ++j) {
      if (in.positions[in.query_start[s] + j] != ctx - q_len + j) {
        return bad(absl::StrCat("sequence ", s, ": positions must continue the cached context"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Model::EndStep(absl::Status own) {
  if (!own.ok() && comm_ != nullptr && !absl::IsInvalidArgument(own)) {
    // A refused input is refused alike by every rank, before any
    // collective; any other failure may leave the other ranks waiting in
    // one.
    comm_->Abort(absl::StrCat("rank ", shard_.rank, ": ", own.message()));
  }
  if (followers_ == nullptr) return own;
  // The other ranks end their step within a collective's timeout of this
  // one's: a rank waiting in a collective fails by then. One that does not
  // is stuck outside any (a hung device, a runaway loop): the group is
  // aborted, which releases ranks that were about to enter a collective,
  // and given that long again.
  const std::chrono::milliseconds timeout =
      comm_ != nullptr ? comm_->timeout() : std::chrono::milliseconds(60000);
  absl::Status others = followers_->Finish(timeout);
  if (absl::IsDeadlineExceeded(others)) {
    if (comm_ != nullptr) comm_->Abort(std::string(others.message()));
    if (absl::Status again = followers_->Finish(timeout); absl::IsDeadlineExceeded(again)) {
      // Their step's input and the KV they write must stay theirs while
      // they may still run: nothing here can go on safely. Exiting lets
      // the orchestrator restart the worker, as it would a broken group.
      STRATA_LOG_ERROR(
          "{}, even after the group was aborted: exiting so that the worker is "
          "restarted",
          std::string(again.message()));
      std::fflush(nullptr);
      std::_Exit(EXIT_FAILURE);
    }
  }
  return !own.ok() ? own : others;
}

absl::StatusOr<std::vector<float>> Model::Forward(const StepInput& in) {
  if (followers_ != nullptr) followers_->Start({&in, {}, /*sample=*/false});
  absl::StatusOr<std::vector<float>> out = ForwardOnRank(in);
  STRATA_RETURN_IF_ERROR(EndStep(out.status()));
  return out;
}

absl::StatusOr<std::vector<SampledToken>> Model::ForwardSample(const StepInput& in,
                                                               std::span<const SamplingRow> rows) {
  if (followers_ != nullptr) followers_->Start({&in, rows, /*sample=*/true});
  absl::StatusOr<std::vector<SampledToken>> out = ForwardSampleOnRank(in, rows);
  STRATA_RETURN_IF_ERROR(EndStep(out.status()));
  return out;
}

absl::StatusOr<std::vector<float>> Model::ForwardOnRank(const StepInput& in) {
  STRATA_ASSIGN_OR_RETURN(Tensor logits, RunStep(in));
  if (!logits.defined()) return std::vector<float>();
  std::vector<float> out(static_cast<size_t>(logits.numel()));
  STRATA_RETURN_IF_ERROR(backend_->CopyToHost(logits, out.data()));
  return out;
}

absl::StatusOr<std::vector<SampledToken>> Model::ForwardSampleOnRank(
    const StepInput& in, std::span<const SamplingRow> rows) {
  if (rows.size() != in.logit_rows.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "forward step: ", rows.size(), " sampling rows for ", in.logit_rows.size(), " logit rows"));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (absl::Status s = rows[i].params.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward step: sampling row ", i, ": ", s.message()));
    }
  }
  bool sampled = false;
  // A backend without graphs never pads a step to its graph bucket: under
  // tensor parallelism every rank must take a step with the same rows, and
  // whether a rank's key was seen before is its planner's own history.
  if (options_.decode_graphs && backend_->SupportsGraphs() && !graphs_unsupported_) {
    STRATA_ASSIGN_OR_RETURN(sampled, SampleDecodeGraph(in, rows));
  }
  const int n = static_cast<int>(rows.size());
  if (!sampled) {
    STRATA_ASSIGN_OR_RETURN(Tensor logits, RunStep(in));
    if (!logits.defined()) return std::vector<SampledToken>();
    STRATA_RETURN_IF_ERROR(Sample(logits, rows, n));
  }
  Backend& b = *backend_;
  std::vector<int32_t> host_ids(n);
  std::vector<float> host_logprobs(n);
  STRATA_RETURN_IF_ERROR(b.CopyToHost(sampled_ids_.Rows(0, n), host_ids.data()));
  STRATA_RETURN_IF_ERROR(b.CopyToHost(sampled_logprobs_.Rows(0, n), host_logprobs.data()));
  std::vector<SampledToken> out(n);
  for (int i = 0; i < n; ++i) out[i] = {host_ids[i], host_logprobs[i]};
  return out;
}

absl::Status Model::UploadSamplingRows(std::span<const SamplingRow> rows, int padded_rows) {
  std::vector<SamplingRow> padded(rows.begin(), rows.end());
  padded.resize(padded_rows);  // greedy rows for the padding
  sampling_table_.host_params = EncodeSamplingRows(padded);
  sampling_table_.params = sample_params_.Rows(0, padded_rows);
  return backend_->CopyFromHost(sampling_table_.host_params.data(), DType::kI32,
                                static_cast<int64_t>(sampling_table_.host_params.size()),
                                sampling_table_.params, 0);
}

absl::Status Model::SampleUploaded(const Tensor& logits, int padded_rows) {
  Tensor ids = sampled_ids_.Rows(0, padded_rows), logprobs = sampled_logprobs_.Rows(0, padded_rows);
  return backend_->SampleTokens(logits, sampling_table_, ids, logprobs);
}

absl::Status Model::Sample(const Tensor& logits, std::span<const SamplingRow> rows,
                           int padded_rows) {
  STRATA_RETURN_IF_ERROR(UploadSamplingRows(rows, padded_rows));
  return SampleUploaded(logits, padded_rows);
}

int DecodeGraphBucket(int seqs) {
  if (seqs > 8) return (seqs + 15) / 16 * 16;
  int bucket = 1;
  while (bucket < seqs) bucket <<= 1;
  return bucket;
}

absl::StatusOr<bool> Model::SampleDecodeGraph(const StepInput& in,
                                              std::span<const SamplingRow> rows) {
  const int seqs = static_cast<int>(in.context_len.size());
  if (static_cast<int>(in.token_ids.size()) != seqs ||
      static_cast<int>(in.logit_rows.size()) != seqs) {
    return false;
  }
  for (int i = 0; i < seqs; ++i) {
    if (in.logit_rows[i] != i) return false;
  }
  STRATA_RETURN_IF_ERROR(Validate(in));
  auto next_pow2 = [](int v) {
    int p = 1;
    while (p < v) p <<= 1;
    return p;
  };
  if (planner_ != nullptr && !planner_->Replayable()) return false;
  const int cap = std::min({options_.max_seqs, options_.max_batch_tokens, options_.max_logit_rows});
  int bucket = DecodeGraphBucket(seqs);
  if (bucket > cap) bucket = seqs;
  const int context_bound =
      next_pow2(*std::max_element(in.context_len.begin(), in.context_len.end()));
  std::vector<int32_t> key{bucket, context_bound};

  Backend& b = *backend_;
  const int padding = bucket - seqs;
  STRATA_ASSIGN_OR_RETURN(AttentionBatch batch, Upload(in, padding));
  auto compute_and_sample = [&]() -> absl::Status {
    STRATA_ASSIGN_OR_RETURN(Tensor logits, Compute(batch, bucket, bucket));
    return Sample(logits, rows, bucket);
  };
  if (planner_ != nullptr) {
    STRATA_RETURN_IF_ERROR(planner_->BeginStep(in, batch));
    STRATA_ASSIGN_OR_RETURN(std::optional<std::vector<int32_t>> planner_key, planner_->GraphKey());
    if (!planner_key.has_value()) {
      STRATA_RETURN_IF_ERROR(compute_and_sample());
      return true;
    }
    key.insert(key.end(), planner_key->begin(), planner_key->end());
  }
  // The step runs from its graph, recording it first when the key is seen
  // the second time, or directly.
  auto run_step = [&]() -> absl::Status {
    auto it = decode_graphs_.find(key);
    if (it == decode_graphs_.end()) {
      if (decode_graphs_seen_.insert(key).second) {
        // First sight: run directly, which sizes workspaces and GEMM plans.
        return compute_and_sample();
      }
      // The sampling table is uploaded before the capture (a host copy);
      // the recording holds the compute and the sampling kernel.
      STRATA_RETURN_IF_ERROR(UploadSamplingRows(rows, bucket));
      const absl::Status begin = b.BeginCapture();
      if (absl::IsUnimplemented(begin)) {
        graphs_unsupported_ = true;
        return compute_and_sample();
      }
      if (begin.ok()) {
        capturing_ = true;
        const absl::Status recorded = [&]() -> absl::Status {
          STRATA_ASSIGN_OR_RETURN(Tensor logits, Compute(batch, bucket, bucket));
          return SampleUploaded(logits, bucket);
        }();
        capturing_ = false;
        absl::StatusOr<int> graph = b.EndCapture();
        if (recorded.ok() && graph.ok()) it = decode_graphs_.emplace(key, *graph).first;
      }
      if (it == decode_graphs_.end()) {
        // Not capturable now (e.g. op timing is on, or a workspace had to
        // grow): this step runs directly, a later one captures.
        return compute_and_sample();
      }
    }
    STRATA_RETURN_IF_ERROR(UploadSamplingRows(rows, bucket));
    const absl::Status replay = b.ReplayGraph(it->second);
    // FailedPrecondition: the backend cannot replay now (e.g. its op timing
    // is on); the step runs directly.
    if (absl::IsFailedPrecondition(replay)) return compute_and_sample();
    return replay;
  };
  STRATA_RETURN_IF_ERROR(run_step());
  // Whichever way it ran (PlanLayer may have run twice, or not at all).
  if (planner_ != nullptr) planner_->CountGraphStep();
  return true;
}

absl::Status Model::set_attention_planner(AttentionPlanner* planner) {
  if (planner == planner_) return absl::OkStatus();
  planner_ = planner;
  // Keys longer than (bucket, context bound) carry a planner's GraphKey.
  for (auto it = decode_graphs_.begin(); it != decode_graphs_.end();) {
    if (it->first.size() > 2) {
      STRATA_RETURN_IF_ERROR(backend_->ReleaseGraph(it->second));
      decode_graphs_seen_.erase(it->first);
      it = decode_graphs_.erase(it);
    } else {
      ++it;
    }
  }
  if (planner_ != nullptr && planner_->Prefetches() && !guess_qkv_.defined()) {
    Backend& b = *backend_;
    const int64_t rows = std::min(options_.max_seqs, options_.max_batch_tokens);
    STRATA_ASSIGN_OR_RETURN(guess_normed_,
                            b.Allocate(b.activation_dtype(), {rows, config_.hidden_size}));
    STRATA_ASSIGN_OR_RETURN(guess_qkv_,
                            b.Allocate(b.activation_dtype(), {rows, layout_.row_width()}));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Model::RunStep(const StepInput& in) {
  STRATA_RETURN_IF_ERROR(Validate(in));
  STRATA_ASSIGN_OR_RETURN(AttentionBatch batch, Upload(in, 0));
  if (planner_ != nullptr) STRATA_RETURN_IF_ERROR(planner_->BeginStep(in, batch));
  STRATA_ASSIGN_OR_RETURN(Tensor logits, Compute(batch, static_cast<int64_t>(in.token_ids.size()),
                                                 static_cast<int>(in.logit_rows.size())));
  // A step of prefill chunks that end mid-prompt has no logits; still,
  // its errors surface here.
  if (!logits.defined()) STRATA_RETURN_IF_ERROR(backend_->Synchronize());
  return logits;
}

absl::StatusOr<AttentionBatch> Model::Upload(const StepInput& in, int padding) {
  Backend& b = *backend_;
  const int real_tokens = static_cast<int>(in.token_ids.size());
  const int real_seqs = static_cast<int>(in.context_len.size());
  const int64_t t = real_tokens + padding;
  const int num_seqs = real_seqs + padding;
  const int rows_out = static_cast<int>(in.logit_rows.size()) + padding;

  AttentionBatch batch;
  batch.num_seqs = num_seqs;
  batch.max_blocks_per_seq = max_blocks_per_seq_;
  batch.page_size = options_.page_size;
  batch.host_query_start = in.query_start;
  batch.host_context_len = in.context_len;
  host_ids_.assign(in.token_ids.begin(), in.token_ids.end());
  host_positions_.assign(in.positions.begin(), in.positions.end());
  host_logit_rows_.assign(in.logit_rows.begin(), in.logit_rows.end());
  const int ps = options_.page_size;
  const bool two_groups = two_page_groups();
  host_slots_.resize(t);
  if (two_groups) host_upper_slots_.resize(t);
  for (int s = 0; s < real_seqs; ++s) {
    const auto& table = in.block_tables[s];
    std::copy(table.begin(), table.end(), host_table_.begin() + int64_t{s} * max_blocks_per_seq_);
    for (int32_t r = in.query_start[s]; r < in.query_start[s + 1]; ++r) {
      const int32_t pos = in.positions[r];
      host_slots_[r] = table[pos / ps] * ps + pos % ps;
    }
    if (two_groups) {
      // Off-GPU pages read the spare page: only attention whose results a
      // sparse plan replaces reads them.
      const auto& upper = in.upper_block_tables[s];
      int32_t* row = host_upper_table_.data() + int64_t{s} * max_blocks_per_seq_;
      for (size_t p = 0; p < upper.size(); ++p) {
        row[p] = upper[p] == kPageOffGpu ? upper_spare_page_ : upper[p];
      }
      for (int32_t r = in.query_start[s]; r < in.query_start[s + 1]; ++r) {
        const int32_t pos = in.positions[r];
        host_upper_slots_[r] = upper[pos / ps] * ps + pos % ps;
      }
    }
    batch.max_query_len = std::max(batch.max_query_len, in.query_start[s + 1] - in.query_start[s]);
    batch.max_context_len = std::max(batch.max_context_len, in.context_len[s]);
  }
  for (int k = 0; k < padding; ++k) {
    const int row = real_tokens + k;
    host_ids_.push_back(0);
    host_positions_.push_back(0);
    host_slots_[row] = spare_page_ * ps;
    host_table_[int64_t{real_seqs + k} * max_blocks_per_seq_] = spare_page_;
    if (two_groups) {
      host_upper_slots_[row] = upper_spare_page_ * ps;
      host_upper_table_[int64_t{real_seqs + k} * max_blocks_per_seq_] = upper_spare_page_;
    }
    batch.host_query_start.push_back(row + 1);
    batch.host_context_len.push_back(1);
    host_logit_rows_.push_back(row);
    batch.max_query_len = std::max(batch.max_query_len, 1);
    batch.max_context_len = std::max(batch.max_context_len, 1);
  }
  if (shard_.size > 1) {
    // The rank's embedding rows hold its ids; the row past them is zero,
    // and the all-reduce after the lookup adds the owner's row.
    for (int32_t& id : host_ids_) {
      const int64_t local = id - shard_.first_vocab;
      id = static_cast<int32_t>(local >= 0 && local < shard_.vocab ? local : shard_.vocab);
    }
  }
  Tensor ids = ids_.Rows(0, t), positions = positions_.Rows(0, t), slots = slots_.Rows(0, t);
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_ids_.data(), DType::kI32, t, ids, 0));
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_positions_.data(), DType::kI32, t, positions, 0));
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_slots_.data(), DType::kI32, t, slots, 0));
  batch.query_start = query_start_.Rows(0, num_seqs + 1);
  batch.context_len = context_len_.Rows(0, num_seqs);
  batch.block_table = block_table_.Rows(0, num_seqs);
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(batch.host_query_start.data(), DType::kI32, num_seqs + 1,
                                        batch.query_start, 0));
  STRATA_RETURN_IF_ERROR(
      b.CopyFromHost(batch.host_context_len.data(), DType::kI32, num_seqs, batch.context_len, 0));
  STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_table_.data(), DType::kI32,
                                        int64_t{num_seqs} * max_blocks_per_seq_, batch.block_table,
                                        0));
  if (two_groups) {
    Tensor upper_slots = upper_slots_.Rows(0, t);
    STRATA_RETURN_IF_ERROR(
        b.CopyFromHost(host_upper_slots_.data(), DType::kI32, t, upper_slots, 0));
    batch.upper_block_table = upper_block_table_.Rows(0, num_seqs);
    STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_upper_table_.data(), DType::kI32,
                                          int64_t{num_seqs} * max_blocks_per_seq_,
                                          batch.upper_block_table, 0));
  }
  if (rows_out > 0) {
    Tensor rows = logit_rows_.Rows(0, rows_out);
    STRATA_RETURN_IF_ERROR(b.CopyFromHost(host_logit_rows_.data(), DType::kI32, rows_out, rows, 0));
  }
  return batch;
}

absl::Status Model::PrefetchNextLayer(int layer, const AttentionBatch& batch,
                                      const Tensor& residual, const Tensor& positions) {
  // The residual stream changes little from one layer's input to the next,
  // so the next layer's own norm and projection of this layer's input
  // guess its queries well enough to choose what to fetch (InfiniGen).
  Backend& b = *backend_;
  const LayerWeights& next = weights_.layers[layer];
  const int64_t t = residual.dim(0);
  Tensor normed = guess_normed_.Rows(0, t), qkv = guess_qkv_.Rows(0, t);
  STRATA_RETURN_IF_ERROR(
      b.RmsNorm(residual, next.input_norm, static_cast<float>(config_.rms_norm_eps), normed));
  STRATA_RETURN_IF_ERROR(b.Linear(normed, next.qkv, next.qkv_bias, qkv));
  STRATA_RETURN_IF_ERROR(b.Rope(qkv, layout_, positions, inv_freq_));
  const bool upper = page_group(layer) == PageGroup::kUpper;
  return planner_->PrefetchLayer(layer, upper ? batch.UpperLayers() : batch, qkv, k_cache_[layer],
                                 v_cache_[layer]);
}

absl::StatusOr<Tensor> Model::Compute(const AttentionBatch& batch, int64_t t, int rows_out) {
  Backend& b = *backend_;
  const int num_seqs = batch.num_seqs;
  Tensor ids = ids_.Rows(0, t), positions = positions_.Rows(0, t);
  Tensor lower_slots = slots_.Rows(0, t);
  Tensor upper_slots = two_page_groups() ? upper_slots_.Rows(0, t) : Tensor();
  const AttentionBatch upper_batch = batch.UpperLayers();

  Tensor residual = residual_.Rows(0, t), normed = normed_.Rows(0, t), qkv = qkv_.Rows(0, t);
  Tensor attn = attn_.Rows(0, t), proj = proj_.Rows(0, t), gate_up = gate_up_.Rows(0, t),
         act = act_.Rows(0, t);
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));

  STRATA_RETURN_IF_ERROR(b.Gather(weights_.embed, ids, residual));
  if (comm_ != nullptr) STRATA_RETURN_IF_ERROR(comm_->AllReduceSum(residual));
  for (int i = 0; i < config_.num_layers; ++i) {
    const LayerWeights& l = weights_.layers[i];
    if (i == 0) {
      STRATA_RETURN_IF_ERROR(b.RmsNorm(residual, l.input_norm, eps, normed));
    } else {  // adds the previous layer's MLP output
      STRATA_RETURN_IF_ERROR(b.AddRmsNorm(residual, proj, l.input_norm, eps, normed));
    }
    const bool upper = page_group(i) == PageGroup::kUpper;
    const AttentionBatch& layer_batch = upper ? upper_batch : batch;
    const Tensor& slots = upper ? upper_slots : lower_slots;
    STRATA_RETURN_IF_ERROR(b.Linear(normed, l.qkv, l.qkv_bias, qkv));
    STRATA_RETURN_IF_ERROR(
        b.RopeWriteKv(qkv, layout_, positions, inv_freq_, slots, k_cache_[i], v_cache_[i]));
    if (layer_kv_observer_ != nullptr && !capturing_) {
      STRATA_RETURN_IF_ERROR(layer_kv_observer_->LayerKvWritten(i));
    }
    const SparsePlan* plan = nullptr;
    if (planner_ != nullptr) {
      STRATA_ASSIGN_OR_RETURN(plan,
                              planner_->PlanLayer(i, layer_batch, qkv, k_cache_[i], v_cache_[i]));
    }
    if (planner_ != nullptr && i + 1 < config_.num_layers && batch.max_query_len == 1 &&
        guess_qkv_.defined() && t <= guess_qkv_.dim(0) && planner_->PrefetchesLayer(i + 1)) {
      STRATA_RETURN_IF_ERROR(PrefetchNextLayer(i + 1, batch, residual, positions));
    }
    // A plan that covers every sequence of a pure decode step replaces the
    // dense attention; otherwise its rows overwrite the dense result.
    const bool sparse_only =
        plan != nullptr && plan->num_entries == num_seqs && batch.max_query_len == 1;
    if (!sparse_only) {
      STRATA_RETURN_IF_ERROR(b.Attention(qkv, layout_, k_cache_[i], v_cache_[i], layer_batch, scale,
                                         config_.sliding_window, attn));
    }
    if (plan != nullptr && plan->num_entries > 0) {
      STRATA_RETURN_IF_ERROR(b.SparseAttention(qkv, layout_, k_cache_[i], v_cache_[i], layer_batch,
                                               *plan, scale, attn));
    }
    STRATA_RETURN_IF_ERROR(b.Linear(attn, l.o_proj, Tensor(), proj));
    // Row-parallel projections: each rank's is a partial sum.
    if (comm_ != nullptr) STRATA_RETURN_IF_ERROR(comm_->AllReduceSum(proj));
    STRATA_RETURN_IF_ERROR(b.AddRmsNorm(residual, proj, l.post_norm, eps, normed));
    STRATA_RETURN_IF_ERROR(b.Linear(normed, l.gate_up, Tensor(), gate_up));
    STRATA_RETURN_IF_ERROR(b.SiluMul(gate_up, act));
    STRATA_RETURN_IF_ERROR(b.Linear(act, l.down, Tensor(), proj));
    if (comm_ != nullptr) STRATA_RETURN_IF_ERROR(comm_->AllReduceSum(proj));
  }
  if (layer_kv_observer_ != nullptr && !capturing_) {
    STRATA_RETURN_IF_ERROR(layer_kv_observer_->LayersEnqueued());
  }
  // Only the requested rows go through the final norm and lm_head; a step
  // of prefill chunks that end mid-prompt needs none.
  if (rows_out == 0) return Tensor();
  Tensor rows = logit_rows_.Rows(0, rows_out), last = last_.Rows(0, rows_out);
  STRATA_RETURN_IF_ERROR(b.AddRmsNorm(residual, proj, weights_.final_norm, eps, normed));
  STRATA_RETURN_IF_ERROR(b.Gather(normed, rows, last));
  Tensor logits = logits_.Rows(0, rows_out);
  if (shard_.size == 1) {
    STRATA_RETURN_IF_ERROR(b.Linear(last, weights_.lm_head, Tensor(), logits));
    return logits;
  }
  // Each rank's logits cover its vocabulary; every rank gathers them all
  // and samples the same tokens.
  Tensor rank_logits = rank_logits_.Rows(0, rows_out);
  STRATA_RETURN_IF_ERROR(b.Linear(last, weights_.lm_head, Tensor(), rank_logits));
  STRATA_RETURN_IF_ERROR(comm_->AllGather(rank_logits, logits));
  return logits;
}

}  // namespace strata::engine

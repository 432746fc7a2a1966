#include "bench/kv_capacity_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/batcher.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/kv_sizing.h"

namespace strata::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Tokens a sequence may generate over the whole sweep: the prefill steps
// of every later sequence (it decodes in them), and each point's warm-up
// and timed steps.
int GrowthBound(const CapacityOptions& o) {
  const int most = o.seqs.back();
  const int chunk = std::max(o.max_batch_tokens - most, 1);
  const int ramp = most * ((o.context + chunk - 1) / chunk + 1);
  return ramp + static_cast<int>(o.seqs.size()) * (o.warmup + o.steps + 4) + 64;
}

struct ModeRun {
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<kvtier::KvBlockManager> manager;
  std::unique_ptr<kvtier::KvPolicyRunner> runner;
};

absl::Status RunMode(engine::Backend* backend, const CapacityOptions& o, const CapacityMode& mode,
                     const engine::ModelConfig& config, CapacityResult& result) {
  const int max_context = o.context + GrowthBound(o);
  kvtier::KvSizingInput in;
  in.config = config;
  in.kv_dtype = o.kv_cache == engine::KvCacheType::kFp8E4M3 ? engine::DType::kF8E4M3
                                                            : backend->activation_dtype();
  in.page_size = 16;
  in.max_context = max_context;
  in.gpu_bytes = o.gpu_kv_bytes;
  if (mode.host_codec.has_value()) {
    in.tiered = kvtier::KvSizingInput::Tiered{mode.policy, *mode.host_codec, 0, o.host_bytes};
  }
  STRATA_ASSIGN_OR_RETURN(const kvtier::KvSizing sizing, kvtier::SizeKvCache(in));
  result.sizing.push_back({mode.name, sizing.Describe()});
  std::fprintf(stderr, "kv-capacity %s: %s\n", mode.name.c_str(), sizing.Describe().c_str());

  const int most = o.seqs.back();
  engine::ModelOptions mo;
  mo.max_seqs = most;
  mo.max_logit_rows = most;
  mo.max_context = max_context;
  mo.max_batch_tokens = o.max_batch_tokens;
  mo.page_size = in.page_size;
  mo.num_pages = sizing.num_pages;
  mo.num_upper_pages = sizing.num_upper_pages;
  mo.upper_first_layer = sizing.upper_first_layer;
  mo.kv_cache = o.kv_cache;
  ModeRun run;
  STRATA_ASSIGN_OR_RETURN(engine::LoadedModel loaded, engine::LoadModel(o.source, backend, mo));
  run.model = std::move(loaded.model);
  engine::Model* model = run.model.get();
  STRATA_ASSIGN_OR_RETURN(
      run.manager, kvtier::KvBlockManager::Create(
                       model, {.host_bytes = mode.host_codec.has_value() ? o.host_bytes : 0}));
  if (mode.policy.type != "full") {
    kvtier::KvTierOptions tier;
    if (mode.host_codec.has_value()) {
      tier = {.manager = run.manager.get(),
              .codec = *mode.host_codec,
              .prefetch_share = mode.prefetch_share};
    }
    STRATA_ASSIGN_OR_RETURN(
        run.runner, kvtier::KvPolicyRunner::Create(model, {mode.policy},
                                                   {.max_sparse_seqs = most, .tier = tier}));
    STRATA_RETURN_IF_ERROR(model->set_attention_planner(run.runner.get()));
  }
  absl::Status status = [&]() -> absl::Status {
    engine::Batcher batcher(model, nullptr, {}, run.manager.get());
    std::mt19937 rng(7);
    int added = 0;
    for (const int n : o.seqs) {
      CapacityPoint point;
      point.mode = mode.name;
      point.seqs = n;
      const int before = added;
      for (; added < n; ++added) {
        engine::GenerationRequest r;
        r.id = static_cast<uint64_t>(added);
        r.prompt.resize(o.context);
        for (int32_t& t : r.prompt) t = static_cast<int32_t>(rng() % config.vocab_size);
        r.max_tokens = max_context - o.context - 1;
        r.ignore_eos = true;
        STRATA_RETURN_IF_ERROR(batcher.Add(std::move(r)));
      }
      auto step = [&]() -> absl::Status {
        STRATA_ASSIGN_OR_RETURN(std::vector<engine::TokenEvent> events, batcher.Step());
        for (const engine::TokenEvent& e : events) {
          if (e.finish != engine::FinishReason::kNone) {
            return absl::InternalError(absl::StrCat("kv-capacity: request ", e.request_id,
                                                    " ended (", e.error, ") before the sweep did"));
          }
        }
        return absl::OkStatus();
      };
      // Prefill the new ones (the others decode meanwhile).
      const int chunk = std::max(o.max_batch_tokens - n, 1);
      const int limit = (n - before) * ((o.context + chunk - 1) / chunk + 2) + 16;
      for (int s = 0; s < limit && batcher.num_running() < n && batcher.num_preemptions() == 0;
           ++s) {
        STRATA_RETURN_IF_ERROR(step());
      }
      if (batcher.num_preemptions() > 0 || batcher.num_running() < n) {
        point.why =
            batcher.num_preemptions() > 0
                ? "a sequence was preempted: the KV did not fit"
                : absl::StrCat("only ", batcher.num_running(), " running after ", limit, " steps");
        std::fprintf(stderr, "kv-capacity %s: %d sequences do not fit: %s\n", mode.name.c_str(), n,
                     point.why.c_str());
        result.points.push_back(point);
        break;
      }
      for (int s = 0; s < o.warmup; ++s) STRATA_RETURN_IF_ERROR(step());
      const kvtier::KvPolicyRunner::Stats s0 =
          run.runner ? run.runner->stats() : kvtier::KvPolicyRunner::Stats{};
      STRATA_RETURN_IF_ERROR(backend->Synchronize());
      const auto start = Clock::now();
      for (int s = 0; s < o.steps; ++s) STRATA_RETURN_IF_ERROR(step());
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      if (batcher.num_preemptions() > 0) {
        point.why = "a sequence was preempted while decoding";
        result.points.push_back(point);
        break;
      }
      point.fits = true;
      point.step_ms = seconds * 1e3 / o.steps;
      point.decode_tokens_per_s = static_cast<double>(n) * o.steps / seconds;
      if (run.runner) {
        const kvtier::KvPolicyRunner::Stats s1 = run.runner->stats();
        const double hit =
            static_cast<double>(s1.recall_hit_tokens - s0.recall_hit_tokens +
                                s1.recall_refreshed_tokens - s0.recall_refreshed_tokens);
        const double all = hit + static_cast<double>(s1.recall_tokens - s0.recall_tokens);
        point.ring_hit_rate = all > 0 ? hit / all : 0;
        point.recall_mib_per_step =
            static_cast<double>(s1.recall_kib - s0.recall_kib) / 1024.0 / o.steps;
        point.recall_ms_per_step =
            static_cast<double>(s1.recall_micros - s0.recall_micros) / 1e3 / o.steps;
        point.prefetch_mib_per_step =
            static_cast<double>(s1.prefetch_kib - s0.prefetch_kib) / 1024.0 / o.steps;
      }
      const kvtier::KvBlockManager::Stats ms = run.manager->stats();
      point.host_bytes_used = ms.host_bytes_used;
      point.upper_pages_used = ms.upper_pages_used;
      point.upper_pages_total = ms.upper_pages_total;
      std::fprintf(stderr, "kv-capacity %s: %d sequences, %.1f ms/step, %.1f tok/s\n",
                   mode.name.c_str(), n, point.step_ms, point.decode_tokens_per_s);
      result.points.push_back(point);
    }
    for (int id = 0; id < added; ++id) batcher.Cancel(static_cast<uint64_t>(id));
    while (batcher.HasWork()) STRATA_RETURN_IF_ERROR(batcher.Step().status());
    return absl::OkStatus();
  }();
  STRATA_RETURN_IF_ERROR(status);
  STRATA_RETURN_IF_ERROR(run.manager->Poll());
  if (!run.manager->Idle()) {
    return absl::InternalError(absl::StrCat("kv-capacity ", mode.name,
                                            ": KV memory still held after every request ended"));
  }
  if (run.runner) STRATA_RETURN_IF_ERROR(model->set_attention_planner(nullptr));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CapacityResult> RunKvCapacity(engine::Backend* backend, const CapacityOptions& o) {
  if (o.seqs.empty() || !std::is_sorted(o.seqs.begin(), o.seqs.end()) || o.seqs.front() < 1) {
    return absl::InvalidArgumentError("kv-capacity: --seqs must be ascending and >= 1");
  }
  if (o.context < 1 || o.steps < 1 || o.warmup < 0 || o.gpu_kv_bytes < 1 ||
      o.max_batch_tokens <= o.seqs.back()) {
    return absl::InvalidArgumentError(
        "kv-capacity: --context, --steps and the GPU budget must be positive, and the step's "
        "tokens more than the most sequences");
  }
  STRATA_ASSIGN_OR_RETURN(const engine::ModelConfig config, engine::LoadSourceConfig(o.source));
  CapacityResult result;
  for (const CapacityMode& mode : o.modes) {
    STRATA_RETURN_IF_ERROR(RunMode(backend, o, mode, config, result));
  }
  return result;
}

}  // namespace strata::bench

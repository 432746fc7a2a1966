#include "bench/kv_policy_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/batcher.h"
#include "engine/sampler.h"
#include "kvtier/kv_policy.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

using engine::Tensor;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// Host copies of one layer's tensors, for the attention metrics.
struct HostLayer {
  std::vector<float> qkv, k, v;
  std::vector<int32_t> table, key_index, key_count;
};

template <typename T>
absl::Status CopyOut(engine::Backend& b, const Tensor& t, std::vector<T>& out) {
  out.resize(static_cast<size_t>(t.numel()));
  return b.CopyToHost(t, out.data());
}

// Accumulates top-k recall and output error of every planned query head.
class AttentionFidelity {
 public:
  AttentionFidelity(const engine::ModelConfig& config, int page_size, int topk)
      : config_(config), page_size_(page_size), topk_(topk) {}

  absl::Status Measure(engine::Backend& b, const Tensor& qkv, const Tensor& k_cache,
                       const Tensor& v_cache, const engine::AttentionBatch& batch,
                       const engine::SparsePlan& plan) {
    HostLayer h;
    STRATA_RETURN_IF_ERROR(CopyOut(b, qkv, h.qkv));
    STRATA_RETURN_IF_ERROR(CopyOut(b, k_cache, h.k));
    STRATA_RETURN_IF_ERROR(CopyOut(b, v_cache, h.v));
    STRATA_RETURN_IF_ERROR(CopyOut(b, batch.block_table, h.table));
    STRATA_RETURN_IF_ERROR(CopyOut(b, plan.key_index, h.key_index));
    STRATA_RETURN_IF_ERROR(CopyOut(b, plan.key_count, h.key_count));
    const int hq = config_.num_q_heads, hkv = config_.num_kv_heads, d = config_.head_dim;
    const int group = hq / hkv;
    const int64_t row_width = int64_t{hq + 2 * hkv} * d;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int i = 0; i < plan.num_entries; ++i) {
      const int ctx = plan.host(i, engine::kPlanContextLen);
      const int seq = plan.host(i, engine::kPlanSeq);
      auto row_of = [&](const std::vector<float>& cache, int index, int kvh) {
        const int64_t page =
            h.table[static_cast<size_t>(seq) * batch.max_blocks_per_seq + index / page_size_];
        return &cache[((page * page_size_ + index % page_size_) * hkv + kvh) * d];
      };
      for (int head = 0; head < hq; ++head) {
        const int kvh = head / group;
        const float* q = &h.qkv[plan.host(i, engine::kPlanRow) * row_width + int64_t{head} * d];
        std::vector<double> p(ctx);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < ctx; ++j) {
          const float* k = row_of(h.k, j, kvh);
          double dot = 0;
          for (int x = 0; x < d; ++x) dot += double{q[x]} * k[x];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (double& x : p) sum += (x = std::exp(x - mx));
        const size_t list = static_cast<size_t>(i) * hkv + kvh;
        const int32_t* keys = &h.key_index[list * plan.max_keys];
        const int n = h.key_count[list];
        std::vector<char> chosen(ctx, 0);
        for (int j = 0; j < n; ++j) chosen[keys[j]] = 1;
        // Output over all keys and over the chosen ones.
        std::vector<double> full(d, 0.0), sparse(d, 0.0);
        double sparse_sum = 0;
        for (int j = 0; j < ctx; ++j) {
          const float* v = row_of(h.v, j, kvh);
          for (int x = 0; x < d; ++x) full[x] += p[j] / sum * v[x];
          if (chosen[j]) {
            sparse_sum += p[j];
            for (int x = 0; x < d; ++x) sparse[x] += p[j] * v[x];
          }
        }
        double err = 0, norm = 0;
        for (int x = 0; x < d; ++x) {
          err += std::pow(sparse[x] / sparse_sum - full[x], 2);
          norm += full[x] * full[x];
        }
        error_sum_ += std::sqrt(err / std::max(norm, 1e-30));
        // Top-k of the exact weights.
        const int k = std::min(topk_, ctx);
        std::vector<int> order(ctx);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [&](int a, int b2) { return p[a] > p[b2]; });
        int hit = 0;
        for (int j = 0; j < k; ++j) hit += chosen[order[j]];
        recall_sum_ += static_cast<double>(hit) / k;
        ++samples_;
      }
    }
    return absl::OkStatus();
  }

  double recall() const { return samples_ > 0 ? recall_sum_ / samples_ : 1.0; }
  double error() const { return samples_ > 0 ? error_sum_ / samples_ : 0.0; }
  int64_t samples() const { return samples_; }

 private:
  const engine::ModelConfig& config_;
  int page_size_;
  int topk_;
  double recall_sum_ = 0, error_sum_ = 0;
  int64_t samples_ = 0;
};

}  // namespace

absl::StatusOr<std::vector<RetrievalCase>> LoadRetrievalCases(const std::string& path,
                                                              int vocab_size) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open eval set ", path));
  std::vector<RetrievalCase> cases;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": ", what));
    };
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_array() ||
        !j.contains("answer") || !j["answer"].is_array() ||
        !j.value("depth", nlohmann::json()).is_number()) {
      return bad("expected {\"length\", \"depth\", \"prompt\": [ids], \"answer\": [ids]}");
    }
    RetrievalCase c;
    c.depth = j["depth"].get<double>();
    for (const auto* key : {"prompt", "answer"}) {
      for (const auto& id : j[key]) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab_size) {
          return bad(absl::StrCat(key, " has an id outside the vocabulary of ", vocab_size));
        }
        (std::string(key) == "prompt" ? c.prompt : c.answer).push_back(id.get<int32_t>());
      }
    }
    if (c.prompt.empty() || c.answer.empty()) return bad("empty prompt or answer");
    c.length = j.value("length", static_cast<int>(c.prompt.size()));
    cases.push_back(std::move(c));
  }
  if (cases.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no cases"));
  return cases;
}

absl::StatusOr<PolicyEval> EvalPolicy(engine::Model* model, const kvtier::KvPolicyConfig& config,
                                      const std::vector<RetrievalCase>& cases,
                                      const PolicyEval* reference, const EvalOptions& options) {
  PolicyEval result;
  result.config = config;
  std::unique_ptr<kvtier::KvPolicyRunner> runner;
  const bool tiered = options.host_tier != nullptr && config.type == "clusterkv";
  if (config.type != "full") {
    kvtier::KvPolicyRunnerOptions ro{.max_sparse_seqs = options.max_batch,
                                     .track_selection = !tiered};
    if (tiered) {
      ro.tier = {.manager = options.host_tier,
                 .codec = options.codec,
                 .prefetch_share = options.prefetch_share};
    }
    STRATA_ASSIGN_OR_RETURN(runner, kvtier::KvPolicyRunner::Create(model, {config}, ro));
  }
  AttentionFidelity fidelity(model->config(), model->options().page_size, options.topk);
  int fidelity_step = 0;
  if (runner != nullptr && options.fidelity_steps > 0 && !tiered) {
    runner->set_observer([&](int layer, const Tensor& qkv, const Tensor& k, const Tensor& v,
                             const engine::AttentionBatch& batch,
                             const engine::SparsePlan& plan) -> absl::Status {
      if (layer == config.full_layers) ++fidelity_step;
      if (fidelity_step > options.fidelity_steps) return absl::OkStatus();
      return fidelity.Measure(model->backend(), qkv, k, v, batch, plan);
    });
  }
  STRATA_RETURN_IF_ERROR(model->set_attention_planner(runner.get()));
  result.outputs.resize(cases.size());
  absl::Status status;
  for (size_t first = 0; first < cases.size() && status.ok(); first += options.max_batch) {
    const size_t last = std::min(cases.size(), first + options.max_batch);
    engine::Batcher batcher(model, nullptr, {}, tiered ? options.host_tier : nullptr);
    for (size_t i = first; i < last; ++i) {
      engine::GenerationRequest r;
      r.id = i;
      r.prompt = cases[i].prompt;
      // At least one prompt token stays in the prefill.
      const size_t fed =
          std::min(static_cast<size_t>(std::max(options.query_in_decode, 0)), r.prompt.size() - 1);
      r.decode_tokens.assign(r.prompt.end() - static_cast<std::ptrdiff_t>(fed), r.prompt.end());
      r.prompt.resize(r.prompt.size() - fed);
      r.max_tokens = options.generate_tokens > 0 ? options.generate_tokens
                                                 : static_cast<int>(cases[i].answer.size());
      r.ignore_eos = true;
      status = batcher.Add(std::move(r));
      if (!status.ok()) break;
    }
    fidelity_step = 0;
    while (status.ok() && batcher.HasWork()) {
      auto events = batcher.Step();
      if (!events.ok()) {
        status = events.status();
        break;
      }
      for (const auto& e : *events) {
        if (e.finish == engine::FinishReason::kError) status = absl::InternalError(e.error);
        if (e.token_id >= 0) result.outputs[e.request_id].push_back(e.token_id);
      }
    }
  }
  const absl::Status unset = model->set_attention_planner(nullptr);
  STRATA_RETURN_IF_ERROR(status);
  STRATA_RETURN_IF_ERROR(unset);

  int64_t agree = 0, compared = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& out = result.outputs[i];
    const bool ok = out.size() >= cases[i].answer.size() &&
                    std::equal(cases[i].answer.begin(), cases[i].answer.end(), out.begin());
    for (AccuracyCount* count :
         {&result.overall, &result.by_length[cases[i].length],
          &result.by_depth_percent[static_cast<int>(std::lround(cases[i].depth * 100))]}) {
      count->correct += ok;
      ++count->total;
    }
    if (reference != nullptr) {
      const auto& ref = reference->outputs[i];
      for (size_t j = 0; j < std::min(ref.size(), out.size()); ++j) {
        agree += ref[j] == out[j];
        ++compared;
      }
    }
  }
  if (compared > 0) result.greedy_agreement = static_cast<double>(agree) / compared;
  result.topk_recall = fidelity.recall();
  result.output_error = fidelity.error();
  result.attention_samples = fidelity.samples();
  if (runner != nullptr && runner->stats().selected_tokens > 0) {
    result.reselection =
        static_cast<double>(runner->stats().reselected_tokens) / runner->stats().selected_tokens;
  }
  if (tiered) {
    const kvtier::KvPolicyRunner::Stats& st = runner->stats();
    const double held = static_cast<double>(st.recall_hit_tokens + st.recall_refreshed_tokens);
    if (held + st.recall_tokens > 0) result.ring_hit_rate = held / (held + st.recall_tokens);
    result.recall_tokens = st.recall_tokens;
    result.prefetch_tokens = st.prefetch_tokens;
    if (st.lost_sequences > 0 || st.offload_refused > 0 || st.ring_refused > 0) {
      return absl::InternalError(absl::StrCat("host tier: ", st.lost_sequences, " sequences lost, ",
                                              st.offload_refused, " offloads and ", st.ring_refused,
                                              " rings refused"));
    }
  }
  return result;
}

absl::StatusOr<std::vector<SpeedResult>> MeasureDecodeSpeed(
    engine::Model* model, const std::vector<kvtier::KvPolicyConfig>& configs, int batch,
    int context, int steps, int warmup, bool op_timing, kvtier::KvBlockManager* manager,
    const std::vector<TierMode>& tiers) {
  const engine::ModelOptions& o = model->options();
  const int page = o.page_size;
  const int total = context + warmup + steps * (op_timing ? 2 : 1);
  const int pages_per_seq = (total + page - 1) / page;
  if (batch < 1 || batch > o.max_seqs || context < 1 || total > o.max_context ||
      int64_t{batch} * pages_per_seq > o.num_pages) {
    return absl::InvalidArgumentError(absl::StrCat("kv-speed: batch ", batch, " x ", total,
                                                   " tokens does not fit the model options"));
  }
  std::vector<std::vector<int32_t>> tables(batch);
  for (int s = 0; s < batch; ++s) {
    if (manager != nullptr) {
      if (!manager->AllocatePages(engine::PageGroup::kLower, pages_per_seq, tables[s])) {
        return absl::ResourceExhaustedError("kv-speed: the block manager has too few pages");
      }
      continue;
    }
    for (int p = 0; p < pages_per_seq; ++p) tables[s].push_back(s * pages_per_seq + p);
  }
  // The manager gets the pages back on every path.
  struct ReturnPages {
    kvtier::KvBlockManager* manager;
    std::vector<std::vector<int32_t>>* tables;
    ~ReturnPages() {
      if (manager == nullptr) return;
      for (auto& t : *tables) (void)manager->FreePages(engine::PageGroup::kLower, t);
    }
  } return_pages{manager, &tables};
  std::mt19937 rng(1);
  auto random_id = [&] { return static_cast<int32_t>(rng() % model->config().vocab_size); };

  // Prefill, one sequence chunk at a time.
  const auto prefill_start = Clock::now();
  for (int s = 0; s < batch; ++s) {
    for (int begin = 0; begin < context; begin += o.max_batch_tokens) {
      const int n = std::min(o.max_batch_tokens, context - begin);
      engine::StepInput in;
      for (int j = 0; j < n; ++j) {
        in.token_ids.push_back(random_id());
        in.positions.push_back(begin + j);
      }
      in.query_start = {0, n};
      in.context_len = {begin + n};
      in.block_tables = {tables[s]};
      STRATA_RETURN_IF_ERROR(model->Forward(in).status());
    }
  }
  const double prefill_s = Seconds(prefill_start);

  std::vector<SpeedResult> results;
  int64_t next_id = 0;
  std::vector<std::pair<kvtier::KvPolicyConfig, TierMode>> runs_of;
  for (const kvtier::KvPolicyConfig& config : configs) {
    runs_of.push_back({config, TierMode()});
    if (manager == nullptr || config.type != "clusterkv") continue;
    for (const TierMode& mode : tiers) {
      if (mode.block_stride > 0) runs_of.push_back({config, mode});
    }
  }
  for (const auto& [config, mode] : runs_of) {
    std::unique_ptr<kvtier::KvPolicyRunner> runner;
    if (config.type != "full") {
      kvtier::KvPolicyRunnerOptions ro{.max_sparse_seqs = batch};
      if (mode.block_stride > 0) {
        ro.tier = {.manager = manager,
                   .codec = mode.codec,
                   .block_stride = mode.block_stride,
                   .prefetch_share = mode.prefetch_share};
        if (mode.spill_stride > 0) {
          if (manager->ssd() == nullptr) {
            return absl::InvalidArgumentError("kv-speed: clusters on the SSD need an SSD tier");
          }
          ro.tier.spill_admission = {kvtier::KvBlockManagerOptions::SsdAdmission::kAlways};
          ro.tier.spill_stride = mode.spill_stride;
          ro.tier.spill_io_threads = mode.spill_io_threads;
          ro.tier.spill_read_ahead = mode.spill_read_ahead;
        }
      }
      STRATA_ASSIGN_OR_RETURN(runner, kvtier::KvPolicyRunner::Create(model, {config}, ro));
    }
    STRATA_RETURN_IF_ERROR(model->set_attention_planner(runner.get()));
    SpeedResult r;
    r.config = config;
    r.tier = mode.name;
    kvtier::KvPolicyRunner::Stats before;
    r.batch = batch;
    r.context = context;
    r.prefill_s = prefill_s;
    std::vector<int64_t> ids(batch);
    for (auto& id : ids) id = next_id++;
    double timed = 0;
    absl::Status status;
    const int runs = warmup + steps * (op_timing ? 2 : 1);
    double profiled = 0;
    for (int k = 0; k < runs && status.ok(); ++k) {
      const bool profile = k >= warmup + steps;
      if (profile && k == warmup + steps) {
        status = model->backend().TakeOpTimes().status();  // drops earlier records
        model->backend().SetOpTiming(true);
      }
      engine::StepInput in;
      in.query_start.push_back(0);
      for (int s = 0; s < batch; ++s) {
        in.token_ids.push_back(random_id());
        in.positions.push_back(context + k);
        in.query_start.push_back(s + 1);
        in.context_len.push_back(context + k + 1);
        in.block_tables.push_back(tables[s]);
        in.logit_rows.push_back(s);
        in.seq_ids.push_back(ids[s]);
      }
      // A serving step: greedy sampling on the device, token ids back.
      const std::vector<engine::SamplingRow> rows(batch);
      // The first step clusters (or bounds) the prompt: its summary
      // operators are timed on the device, apart from the first step's
      // other one-time costs (e.g. graph recording; the summary workspace's
      // first allocation stays in, well under a millisecond).
      if (k == 0) {
        if (status = model->backend().TakeOpTimes().status(); !status.ok()) break;
        model->backend().SetOpTiming(true);
      }
      if (k == warmup && runner != nullptr) {
        if (mode.spill_stride > 0) {
          // The clusters bound for the SSD are there before the timing.
          absl::StatusOr<bool> settled = runner->SettleSpills(std::chrono::minutes(10));
          if (!settled.ok()) {
            status = settled.status();
            break;
          }
          if (!*settled || runner->stats().spills < batch) {
            status = absl::DeadlineExceededError(absl::StrCat(
                "kv-speed: ", runner->stats().spills, " of ", batch,
                " sequences' clusters reached the SSD (refused: ", runner->stats().spills_refused,
                ")"));
            break;
          }
        }
        before = runner->stats();
      }
      const auto start = Clock::now();
      status = model->ForwardSample(in, rows).status();
      if (status.ok() && runner != nullptr) {
        // A serving step also collects the recall's status after its tokens.
        absl::StatusOr<std::vector<engine::AttentionPlanner::LostSequence>> lost =
            runner->EndStep();
        status = lost.status();
        if (lost.ok() && !lost->empty()) {
          status = absl::DataLossError(
              absl::StrCat("kv-speed: sequence ", (*lost)[0].seq_id, " lost: ", (*lost)[0].why));
        }
      }
      const double seconds = Seconds(start);
      if (k == 0) {
        r.first_step_ms = seconds * 1e3;
        model->backend().SetOpTiming(false);
        absl::StatusOr<std::vector<engine::OpTime>> first = model->backend().TakeOpTimes();
        if (status.ok()) status = first.status();
        if (first.ok() && !first->empty()) {
          r.summary_ms = 0.0;
          for (const engine::OpTime& t : *first) {
            if (t.op == "ClusterKeys" || t.op == "KeyBounds") r.summary_ms += t.ms;
          }
        }
      }
      if (k >= warmup && !profile) timed += seconds;
      if (profile) profiled += seconds;
    }
    if (op_timing) {
      model->backend().SetOpTiming(false);
      absl::StatusOr<std::vector<engine::OpTime>> times = model->backend().TakeOpTimes();
      if (status.ok()) status = times.status();
      if (times.ok()) {
        for (engine::OpTime& t : *times) {
          t.ms /= steps;
          r.op_times.push_back(std::move(t));
        }
      }
      r.timed_step_ms = profiled * 1e3 / steps;
    }
    if (runner != nullptr) {
      const kvtier::KvPolicyRunner::Stats& after = runner->stats();
      // Refreshed tokens were found in the ring too (then moved within it).
      const double hits =
          static_cast<double>(after.recall_hit_tokens - before.recall_hit_tokens +
                              after.recall_refreshed_tokens - before.recall_refreshed_tokens);
      const double selected =
          hits + static_cast<double>(after.recall_tokens - before.recall_tokens);
      if (selected > 0) r.ring_hit_rate = hits / selected;
      r.recall_mib_per_step =
          static_cast<double>(after.recall_kib - before.recall_kib) / 1024.0 / (runs - warmup);
      r.prefetch_mib_per_step =
          static_cast<double>(after.prefetch_kib - before.prefetch_kib) / 1024.0 / (runs - warmup);
      r.hard_misses_per_step =
          static_cast<double>(after.hard_misses - before.hard_misses) / (runs - warmup);
      r.ssd_mib_per_step = static_cast<double>(after.hard_miss_bytes - before.hard_miss_bytes) /
                           (1 << 20) / (runs - warmup);
      r.ssd_wait_ms_per_step =
          static_cast<double>(after.hard_miss_micros - before.hard_miss_micros) / 1e3 /
          (runs - warmup);
      r.read_ahead_used_per_step =
          static_cast<double>(after.read_ahead_used - before.read_ahead_used) / (runs - warmup);
      for (int64_t id : ids) runner->Release(id);
    }
    const absl::Status unset = model->set_attention_planner(nullptr);
    STRATA_RETURN_IF_ERROR(status);
    STRATA_RETURN_IF_ERROR(unset);
    r.step_ms = timed * 1e3 / steps;
    results.push_back(r);
  }
  return results;
}

}  // namespace strata::bench

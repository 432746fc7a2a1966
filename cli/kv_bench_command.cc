#include "cli/kv_bench_command.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/kv_capacity_bench.h"
#include "bench/kv_policy_bench.h"
#include "bench/kv_ssd_bench.h"
#include "bench/transfer_bench.h"
#include "cli/backend_factory.h"
#include "cli/exit_status.h"
#include "common/status_macros.h"
#include "engine/model_loader.h"
#include "kvtier/kv_policy.h"
#include "nlohmann/json.hpp"

namespace strata::cli {
namespace {

kvtier::KvPolicyConfig MakeConfig(const KvBenchFlags& f, const std::string& type, int budget) {
  kvtier::KvPolicyConfig c;
  c.type = type;
  c.budget_tokens = budget;
  c.sink_tokens = f.sink_tokens;
  c.window_tokens = f.window_tokens;
  c.tokens_per_cluster = f.tokens_per_cluster;
  c.cluster_chunk_tokens = f.cluster_chunk_tokens;
  c.kmeans_iterations = f.kmeans_iterations;
  c.full_layers = f.full_layers;
  return c;
}

// full once, the sparse policies once per budget.
absl::StatusOr<std::vector<kvtier::KvPolicyConfig>> Configs(const KvBenchFlags& f) {
  std::vector<kvtier::KvPolicyConfig> configs;
  for (const std::string& type : f.policies) {
    if (absl::Status s = kvtier::ParsePolicyKind(type).status(); !s.ok()) return s;
    if (type == "full") {
      configs.push_back(MakeConfig(f, type, 0));
      continue;
    }
    for (int budget : f.budgets) {
      if (budget < 0) return absl::InvalidArgumentError("--budgets must be >= 0");
      configs.push_back(MakeConfig(f, type, budget));
    }
  }
  // full first: it is the reference of the others.
  std::stable_partition(configs.begin(), configs.end(),
                        [](const kvtier::KvPolicyConfig& c) { return c.type == "full"; });
  return configs;
}

struct Loaded {
  std::unique_ptr<engine::Backend> backend;
  engine::LoadedModel model;
};

absl::StatusOr<Loaded> Load(const KvBenchFlags& f, engine::ModelOptions options) {
  Loaded l;
  STRATA_ASSIGN_OR_RETURN(options.kv_cache, engine::ParseKvCacheType(f.kv_cache_dtype));
  auto backend = CreateBackend(f.backend, f.threads);
  if (!backend.ok()) return backend.status();
  l.backend = std::move(*backend);
  engine::ModelSource source{f.model, f.dummy_weights};
  auto model = engine::LoadModel(source, l.backend.get(), options);
  if (!model.ok()) return model.status();
  l.model = std::move(*model);
  return l;
}

absl::Status WriteJson(const std::string& path, const nlohmann::json& j) {
  if (path.empty()) return absl::OkStatus();
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write --json ", path));
  return absl::OkStatus();
}

// The prefetch shares of the host-tier runs, and the suffix naming a run's
// (none when the flag was not given: one run, with the default).
std::vector<double> PrefetchShares(const KvBenchFlags& f) {
  if (f.prefetch_shares.empty()) return {kvtier::KvTierOptions().prefetch_share};
  return f.prefetch_shares;
}
std::string PrefetchSuffix(const KvBenchFlags& f, double share) {
  return f.prefetch_shares.empty() ? "" : absl::StrCat("/prefetch", share);
}

}  // namespace

void AddKvBenchCommands(CLI::App& bench, KvBenchFlags& f, int& exit_code) {
  auto common = [&f](CLI::App* cmd) {
    cmd->add_option("--model", f.model, "Hugging Face model directory");
    cmd->add_option("--dummy-weights", f.dummy_weights,
                    "Random weights: a preset (llama-3-8b, ...) or `config` (shapes from --model)");
    cmd->add_option("--backend", f.backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
    cmd->add_option("--threads", f.threads, "CPU backend threads (0: all cores)");
    cmd->add_option("--policies", f.policies, "Comma-separated: full, streaming, quest, clusterkv")
        ->delimiter(',');
    cmd->add_option("--budgets", f.budgets, "Token budgets of the sparse policies")->delimiter(',');
    cmd->add_option("--full-layers", f.full_layers, "First layers that stay dense");
    cmd->add_option("--sink-tokens", f.sink_tokens, "Always-attended first tokens");
    cmd->add_option("--window-tokens", f.window_tokens, "Always-attended recent tokens");
    cmd->add_option("--tokens-per-cluster", f.tokens_per_cluster, "ClusterKV: tokens per cluster");
    cmd->add_option("--cluster-chunk-tokens", f.cluster_chunk_tokens,
                    "ClusterKV: cluster the prompt in chunks of this many positions (0: whole)");
    cmd->add_option("--kmeans-iterations", f.kmeans_iterations, "ClusterKV: k-means iterations");
    cmd->add_option("--kv-cache-dtype", f.kv_cache_dtype,
                    "KV cache storage: auto (the activation dtype) or fp8_e4m3 (fp8)")
        ->check(CLI::IsMember({"auto", "fp8", "fp8_e4m3"}));
    cmd->add_option("--prefetch-shares", f.prefetch_shares,
                    "Runs with clusters in the host tier: once per share of the budget that the "
                    "next layer's guessed selection prefetches (0: none)")
        ->delimiter(',')
        ->check(CLI::Range(0.0, 1.0));
    cmd->add_option("--json", f.json, "Also write the results as JSON to FILE");
  };
  CLI::App* acc = bench.add_subcommand(
      "kv-policies", "Task accuracy and attention fidelity of the KV policies per budget");
  common(acc);
  acc->add_option("--eval", f.eval, "Eval set (JSON lines; default MODEL/eval.jsonl)");
  acc->add_option("--max-batch", f.max_batch, "Sequences decoded together");
  acc->add_option("--generate", f.generate, "Tokens generated per case (0: the answer length)");
  acc->add_option("--fidelity-steps", f.fidelity_steps,
                  "Decode steps per batch with attention metrics (0: none)");
  acc->add_option("--max-cases", f.max_cases, "Use only the first N cases (0: all)");
  acc->add_option("--tier-codecs", f.tier_codecs,
                  "Also run each clusterkv config with every cluster in pinned host memory, "
                  "once per codec listed (bf16, fp8_e4m3, int8, int4)")
      ->delimiter(',')
      ->check(CLI::IsMember({"bf16", "fp8_e4m3", "int8", "int4"}));
  acc->add_option("--query-in-decode", f.query_in_decode,
                  "Feed each prompt's last N tokens (the question) through decode steps, after "
                  "the context is prefilled and, by a sparse policy, summarised")
      ->check(CLI::NonNegativeNumber);
  acc->callback([&f, &exit_code] {
    if (f.policies.empty()) f.policies = {"full", "streaming", "quest", "clusterkv"};
    if (f.budgets.empty()) f.budgets = {256, 512, 1024, 2048};
    exit_code = RunKvPolicies(f);
  });
  CLI::App* speed = bench.add_subcommand(
      "kv-speed", "Decode step time of the KV policies at a long context, same run");
  common(speed);
  speed->add_option("--context", f.context, "Prefilled tokens per sequence");
  speed->add_option("--batch", f.batches, "Batch sizes")->delimiter(',');
  speed->add_option("--steps", f.steps, "Timed decode steps per policy");
  speed->add_option("--warmup", f.warmup, "Untimed decode steps first (the first clusters)");
  speed->add_flag("--op-timing", f.op_timing,
                  "Also print each operator's device time per step (from extra steps)");
  speed
      ->add_option("--host-tiers", f.host_tiers,
                   "Where ClusterKV's clusters live: gpu, half (every other one in pinned host "
                   "memory), host (all there), ssd2/ssd4/ssd10 (all there, and every N-th on "
                   "the SSD tier at --ssd-path); each is a run")
      ->delimiter(',')
      ->check(CLI::IsMember({"gpu", "half", "host", "ssd2", "ssd4", "ssd10"}));
  speed->add_option("--ssd-path", f.ssd_path,
                    "RocksDB directory of the SSD tier for the ssdN runs (created, and emptied "
                    "at the end)");
  speed->add_option("--ssd-io-threads", f.io_threads, "Threads reading clusters from the SSD")
      ->delimiter(',');
  speed
      ->add_option("--ssd-read-ahead", f.ssd_read_ahead,
                   "Whether each layer starts the SSD reads of the next layer's guessed "
                   "selection (KvTierOptions::spill_read_ahead); true,false makes each ssdN run "
                   "twice, named ssdN+ra and ssdN-ra")
      ->delimiter(',');
  speed->add_option("--codec", f.codec, "Codec of the clusters below the GPU")
      ->check(CLI::IsMember({"bf16", "fp8_e4m3", "int8", "int4"}));
  speed->callback([&f, &exit_code] {
    if (f.policies.empty()) f.policies = {"full", "quest", "clusterkv"};
    if (f.budgets.empty()) f.budgets = {1024, 2048};
    if (f.batches.empty()) f.batches = {1, 8};
    exit_code = RunKvSpeed(f);
  });
  CLI::App* capacity = bench.add_subcommand(
      "kv-capacity",
      "Long sequences decoded at once on one GPU, and their decode tokens/s, with every token "
      "on the GPU or ClusterKV's clusters in the host tier");
  common(capacity);
  capacity->add_option("--context", f.context, "Prompt tokens per sequence");
  capacity->add_option("--seqs", f.seqs, "Concurrent sequences to reach, ascending")
      ->delimiter(',');
  capacity->add_option("--steps", f.steps, "Timed decode steps per point");
  capacity->add_option("--warmup", f.warmup, "Untimed decode steps first");
  capacity->add_option("--gpu-kv-gib", f.gpu_kv_gib, "GPU KV cache budget of every mode (GiB)");
  capacity->add_option("--host-gib", f.host_gib, "Host tier of the host modes (GiB, pinned)");
  capacity->add_option("--max-batch-tokens", f.max_batch_tokens, "Tokens per step");
  capacity
      ->add_option("--modes", f.modes,
                   "full, clusterkv (all on the GPU), clusterkv@host:CODEC (clusters in the "
                   "host tier; bf16, fp8_e4m3, int8, int4)")
      ->delimiter(',');
  CLI::App* ssd = bench.add_subcommand(
      "kv-ssd",
      "SSD tier bandwidth: host records written to RocksDB and read back by 1, 2, 4... I/O "
      "threads, the page cache dropped before each read (as root)");
  ssd->add_option("--path", f.ssd_path,
                  "Directory on the disk to measure (a subdirectory is "
                  "made and removed)")
      ->required();
  ssd->add_option("--value-kib", f.value_kib, "Bytes of one value (a host record), KiB")
      ->check(CLI::Range(4, 1 << 20));
  ssd->add_option("--gib", f.ssd_gib, "GiB written, then read back per thread count")
      ->check(CLI::PositiveNumber);
  ssd->add_option("--io-threads", f.io_threads, "I/O thread counts to read with")
      ->delimiter(',')
      ->check(CLI::Range(1, 256));
  ssd->add_flag("--buffered", f.buffered,
                "Through the page cache (the store's default is O_DIRECT where the file system "
                "has it)");
  ssd->add_option("--json", f.json, "Also write the results as JSON");
  ssd->callback([&f, &exit_code] {
    if (f.io_threads.empty()) f.io_threads = {1, 2, 4, 8};
    exit_code = RunKvSsd(f);
  });
  CLI::App* transfer = bench.add_subcommand(
      "transfer",
      "KV blocks between two processes over the UCX transport: GB/s per block size (alone it "
      "starts its own receiver process)");
  CLI::Option* serve = transfer->add_flag("--serve", f.transfer_serve,
                                          "Be the receiver: wait for senders on --host/--port");
  CLI::Option* connect = transfer->add_option(
      "--connect", f.transfer_connect, "Be the sender, to the receiver (--serve) at HOST:PORT");
  serve->excludes(connect);
  transfer
      ->add_option("--host", f.transfer_host,
                   "--serve: numeric address to listen on (0.0.0.0: every interface)")
      ->needs(serve);
  transfer->add_option("--port", f.transfer_port, "--serve: TCP port (0: any; printed)")
      ->check(CLI::Range(0, 65535))
      ->needs(serve);
  transfer->add_flag("--once", f.transfer_once, "--serve: exit after one sender")->needs(serve);
  transfer
      ->add_option("--sizes", f.transfer_sizes,
                   "Payload bytes of one message, each a multiple of 4K (16K, 1M, ...)")
      ->delimiter(',');
  transfer->add_option("--gib", f.transfer_gib, "GiB of payload sent per size")
      ->check(CLI::PositiveNumber);
  transfer->add_option("--count", f.transfer_count, "Messages per size (instead of --gib)")
      ->check(CLI::PositiveNumber);
  transfer->add_option("--window", f.transfer_window, "Messages in flight")
      ->check(CLI::Range(1, 1024));
  transfer
      ->add_option("--warmup", f.transfer_warmup,
                   "Untimed messages per size first (default: twice the window)")
      ->check(CLI::NonNegativeNumber);
  transfer->add_option("--rndv-threshold", f.transfer_rndv_threshold,
                       "Payloads of at least this size go by rendezvous, smaller ones eagerly "
                       "(default: the transport's, 16K)");
  transfer->add_flag("--one-buffer", f.transfer_one_buffer,
                     "Send from one buffer and land every message in one, as ucx_perftest does "
                     "(cache-warm), instead of rings of distinct slots");
  transfer->add_flag("--json", f.transfer_json, "Print the results as JSON instead of a table");
  transfer->callback([&f, &exit_code] { exit_code = RunTransfer(f); });
  capacity->callback([&f, &exit_code] {
    if (f.budgets.empty()) f.budgets = {1024};
    if (f.seqs.empty()) f.seqs = {4, 8, 12};
    if (f.modes.empty()) f.modes = {"full", "clusterkv", "clusterkv@host:int4"};
    exit_code = RunKvCapacity(f);
  });
}

int RunKvPolicies(const KvBenchFlags& f) {
  constexpr char kCmd[] = "strata bench kv-policies";
  if (f.model.empty())
    return ExitWithError(kCmd, absl::InvalidArgumentError("--model is required"));
  auto configs = Configs(f);
  if (!configs.ok()) return ExitWithError(kCmd, configs.status());
  if (configs->empty() || (*configs)[0].type != "full") {
    return ExitWithError(
        kCmd, absl::InvalidArgumentError("--policies must include full (the reference)"));
  }
  // The eval set decides the context the model needs.
  engine::ModelOptions probe;
  probe.max_seqs = 1;
  probe.max_context = 64;
  probe.max_batch_tokens = 64;
  auto config_probe = Load(f, probe);
  if (!config_probe.ok()) return ExitWithError(kCmd, config_probe.status());
  const std::string eval = f.eval.empty() ? f.model + "/eval.jsonl" : f.eval;
  auto cases = bench::LoadRetrievalCases(eval, config_probe->model.model->config().vocab_size);
  if (!cases.ok()) return ExitWithError(kCmd, cases.status());
  if (f.max_cases > 0 && static_cast<int>(cases->size()) > f.max_cases) cases->resize(f.max_cases);
  config_probe = absl::InternalError("released");

  bench::EvalOptions eo;
  eo.generate_tokens = f.generate;
  eo.max_batch = f.max_batch;
  eo.fidelity_steps = f.fidelity_steps;
  eo.query_in_decode = f.query_in_decode;
  int longest = 0, answer = 0;
  for (const auto& c : *cases) {
    longest = std::max(longest, static_cast<int>(c.prompt.size()));
    answer = std::max(answer, static_cast<int>(c.answer.size()));
  }
  engine::ModelOptions options;
  options.max_seqs = f.max_batch;
  options.max_context = longest + std::max(f.generate, answer) + 1;
  options.max_batch_tokens = 4096;
  const int max_budget =
      f.budgets.empty() ? 0 : *std::max_element(f.budgets.begin(), f.budgets.end());
  if (!f.tier_codecs.empty()) {
    // Each sequence's context, and its ring of twice the budget.
    const int page = options.page_size;
    options.num_pages = f.max_batch * ((options.max_context + page - 1) / page +
                                       (2 * max_budget + page - 1) / page);
  }
  auto loaded = Load(f, options);
  if (!loaded.ok()) return ExitWithError(kCmd, loaded.status());
  engine::Model* model = loaded->model.model.get();
  std::unique_ptr<kvtier::KvBlockManager> host_tier;
  if (!f.tier_codecs.empty()) {
    const engine::ModelConfig& c = model->config();
    const int64_t clusters = options.max_context / std::max(f.tokens_per_cluster, 1) +
                             options.max_context / std::max(f.cluster_chunk_tokens, 1) +
                             8 * (options.max_context / std::max(f.window_tokens, 1) + 1);
    const int64_t per_head =
        engine::KvPieceUnitsBound(engine::KvCodecKind::kBf16, c.head_dim, model->kv_cache_dtype(),
                                  options.max_context, clusters) *
        engine::kKvHostUnit;
    auto created = kvtier::KvBlockManager::Create(
        model, {.host_bytes = int64_t{f.max_batch} * c.num_layers * c.num_kv_heads * per_head});
    if (!created.ok()) return ExitWithError(kCmd, created.status());
    host_tier = std::move(*created);
  }

  // Each config, then each clusterkv config once per host-tier codec.
  struct Run {
    kvtier::KvPolicyConfig config;
    std::string codec;  // empty: on the GPU
    double prefetch_share = 0;
  };
  std::vector<Run> runs;
  for (const auto& config : *configs) runs.push_back({config, ""});
  for (const std::string& codec : f.tier_codecs) {
    for (const double share : PrefetchShares(f)) {
      for (const auto& config : *configs) {
        if (config.type == "clusterkv") runs.push_back({config, codec, share});
      }
    }
  }
  std::vector<bench::PolicyEval> evals;
  std::vector<std::string> names;
  for (const Run& run : runs) {
    bench::EvalOptions run_options = eo;
    if (!run.codec.empty()) {
      run_options.host_tier = host_tier.get();
      run_options.codec = engine::ParseKvCodecKind(run.codec).value();
      run_options.prefetch_share = run.prefetch_share;
    }
    auto r = bench::EvalPolicy(model, run.config, *cases, evals.empty() ? nullptr : &evals[0],
                               run_options);
    if (!r.ok()) return ExitWithError(kCmd, r.status());
    names.push_back(run.codec.empty() ? run.config.type
                                      : absl::StrCat(run.config.type, "@host:", run.codec,
                                                     PrefetchSuffix(f, run.prefetch_share)));
    const kvtier::KvPolicyConfig& config = run.config;
    if (!run.codec.empty()) {
      std::fprintf(
          stderr, "%s budget %d: ring hit rate %.3f, %lld tokens recalled, %lld prefetched\n",
          names.back().c_str(), config.budget_tokens, r->ring_hit_rate,
          static_cast<long long>(r->recall_tokens), static_cast<long long>(r->prefetch_tokens));
    }
    std::fprintf(stderr, "%s budget %d: accuracy %.3f\n", names.back().c_str(),
                 config.budget_tokens, r->overall.rate());
    evals.push_back(std::move(*r));
  }
  // The table: one row per policy and budget.
  std::printf("%-24s %6s %9s %10s %11s %10s %12s %9s", "policy", "budget", "accuracy", "agreement",
              "top32-recall", "out-error", "reselection", "ring_hit");
  for (const auto& [len, _] : evals[0].by_length)
    std::printf(" %8s", absl::StrCat("acc@", len).c_str());
  std::printf("\n");
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < evals.size(); ++i) {
    const bench::PolicyEval& e = evals[i];
    std::printf("%-24s %6d %9.3f %10.3f %11.3f %10.4f %12.3f %9.3f", names[i].c_str(),
                e.config.type == "full" ? 0 : e.config.budget_tokens, e.overall.rate(),
                e.greedy_agreement, e.topk_recall, e.output_error, e.reselection, e.ring_hit_rate);
    nlohmann::json by_length, by_depth;
    for (const auto& [len, count] : e.by_length) {
      std::printf(" %8.3f", count.rate());
      by_length[std::to_string(len)] = count.rate();
    }
    for (const auto& [depth, count] : e.by_depth_percent)
      by_depth[std::to_string(depth)] = count.rate();
    std::printf("\n");
    rows.push_back({{"policy", names[i]},
                    {"ring_hit_rate", e.ring_hit_rate},
                    {"recall_tokens", e.recall_tokens},
                    {"prefetch_tokens", e.prefetch_tokens},
                    {"budget", e.config.budget_tokens},
                    {"accuracy", e.overall.rate()},
                    {"cases", e.overall.total},
                    {"greedy_agreement", e.greedy_agreement},
                    {"top32_recall", e.topk_recall},
                    {"output_error", e.output_error},
                    {"reselection", e.reselection},
                    {"attention_samples", e.attention_samples},
                    {"accuracy_by_length", by_length},
                    {"accuracy_by_depth_percent", by_depth}});
  }
  std::printf("\nAccuracy by eval-set depth (%%: needle depth, or spread of the marks):\n%-10s %6s",
              "policy", "budget");
  for (const auto& [depth, _] : evals[0].by_depth_percent) std::printf(" %5d", depth);
  std::printf("\n");
  for (size_t i = 0; i < evals.size(); ++i) {
    const bench::PolicyEval& e = evals[i];
    std::printf("%-24s %6d", names[i].c_str(),
                e.config.type == "full" ? 0 : e.config.budget_tokens);
    for (const auto& [depth, count] : e.by_depth_percent) std::printf(" %5.2f", count.rate());
    std::printf("\n");
  }
  nlohmann::json j = {{"model", f.model},
                      {"backend", f.backend},
                      {"eval", eval},
                      {"full_layers", f.full_layers},
                      {"query_in_decode", f.query_in_decode},
                      {"sink_tokens", f.sink_tokens},
                      {"window_tokens", f.window_tokens},
                      {"tokens_per_cluster", f.tokens_per_cluster},
                      {"cluster_chunk_tokens", f.cluster_chunk_tokens},
                      {"kmeans_iterations", f.kmeans_iterations},
                      {"results", rows}};
  if (absl::Status s = WriteJson(f.json, j); !s.ok()) return ExitWithError(kCmd, s);
  return 0;
}

int RunKvSpeed(const KvBenchFlags& f) {
  constexpr char kCmd[] = "strata bench kv-speed";
  auto configs = Configs(f);
  if (!configs.ok()) return ExitWithError(kCmd, configs.status());
  if (f.steps < 1 || f.warmup < 1 || f.context < 1) {
    return ExitWithError(
        kCmd, absl::InvalidArgumentError("--steps, --warmup and --context must be >= 1"));
  }
  const int max_batch = *std::max_element(f.batches.begin(), f.batches.end());
  auto codec = engine::ParseKvCodecKind(f.codec);
  if (!codec.ok()) return ExitWithError(kCmd, codec.status());
  std::vector<bench::TierMode> tiers;
  bool ssd_runs = false;
  for (const std::string& t : f.host_tiers) {
    const int stride = t == "half" ? 2 : t == "gpu" ? 0 : 1;
    if (stride == 0) {
      tiers.push_back({t, 0, *codec});
      continue;
    }
    const int spill_stride = t.starts_with("ssd") ? std::stoi(t.substr(3)) : 0;
    ssd_runs |= spill_stride > 0;
    std::vector<bool> read_ahead = f.ssd_read_ahead;
    if (spill_stride == 0 || read_ahead.empty()) {
      read_ahead = {kvtier::KvTierOptions().spill_read_ahead};
    }
    for (const double share : PrefetchShares(f)) {
      for (const bool ahead : read_ahead) {
        const std::string suffix =
            f.ssd_read_ahead.size() > 1 && spill_stride > 0 ? (ahead ? "+ra" : "-ra") : "";
        tiers.push_back({t + PrefetchSuffix(f, share) + suffix, stride, *codec, share, spill_stride,
                         f.io_threads.empty() ? 8 : f.io_threads[0], ahead});
      }
    }
  }
  if (ssd_runs && f.ssd_path.empty()) {
    return ExitWithError(kCmd, absl::InvalidArgumentError("the ssdN tiers need --ssd-path"));
  }
  const bool tiering = std::any_of(tiers.begin(), tiers.end(),
                                   [](const bench::TierMode& m) { return m.block_stride > 0; });
  engine::ModelOptions options;
  options.max_seqs = max_batch;
  options.max_context = f.context + f.warmup + f.steps * (f.op_timing ? 2 : 1);
  options.max_batch_tokens = 8192;
  options.max_logit_rows = max_batch;
  options.page_size = 16;
  const int max_budget =
      f.budgets.empty() ? 0 : *std::max_element(f.budgets.begin(), f.budgets.end());
  if (tiering) {
    // Each sequence's full context, and its ring of twice the budget.
    const int context_pages = (options.max_context + options.page_size - 1) / options.page_size;
    const int ring_pages = (2 * max_budget + options.page_size - 1) / options.page_size;
    options.num_pages = max_batch * (context_pages + ring_pages);
  }
  auto loaded = Load(f, options);
  if (!loaded.ok()) return ExitWithError(kCmd, loaded.status());
  engine::Model* model = loaded->model.model.get();
  // Declared before the manager, which must go first.
  std::unique_ptr<kvtier::SsdStore> ssd;
  std::unique_ptr<kvtier::KvBlockManager> manager;
  if (tiering) {
    // Room for every sequence's clusters, every layer and head.
    const engine::ModelConfig& c = model->config();
    const int64_t clusters = options.max_context / std::max(f.tokens_per_cluster, 1) +
                             options.max_context / std::max(f.cluster_chunk_tokens, 1) +
                             8 * (options.max_context / std::max(f.window_tokens, 1) + 1);
    const int64_t per_head = engine::KvPieceUnitsBound(*codec, c.head_dim, model->kv_cache_dtype(),
                                                       options.max_context, clusters) *
                             engine::kKvHostUnit;
    const int64_t host_bytes = int64_t{max_batch} * c.num_layers * c.num_kv_heads * per_head;
    std::fprintf(stderr, "kv-speed: host tier of %.1f GiB (pinned)\n",
                 static_cast<double>(host_bytes) / (1 << 30));
    if (ssd_runs) {
      // Room for every cluster (at most one run's are there at a time).
      auto store = kvtier::SsdStore::Open({f.ssd_path, "kv-speed", 2 * host_bytes});
      if (!store.ok()) return ExitWithError(kCmd, store.status());
      ssd = std::move(*store);
    }
    auto created =
        kvtier::KvBlockManager::Create(model, {.host_bytes = host_bytes, .ssd = ssd.get()});
    if (!created.ok()) return ExitWithError(kCmd, created.status());
    manager = std::move(*created);
  }
  std::printf("%-10s %6s %5s %8s %5s %12s %14s %10s %14s %9s %10s %12s %10s %8s %10s %9s\n",
              "policy", "budget", "batch", "context", "tier", "step_ms", "speedup_vs_full",
              "first_ms", "cluster_frac", "ring_hit", "recall_MiB", "prefetch_MiB", "ssd_misses",
              "ssd_MiB", "ssd_wait_ms", "ssd_ahead");
  nlohmann::json rows = nlohmann::json::array();
  for (int batch : f.batches) {
    auto results = bench::MeasureDecodeSpeed(model, *configs, batch, f.context, f.steps, f.warmup,
                                             f.op_timing, manager.get(), tiers);
    if (!results.ok()) return ExitWithError(kCmd, results.status());
    const double full_ms = (*results)[0].config.type == "full" ? (*results)[0].step_ms : 0.0;
    for (const auto& r : *results) {
      // Clustering (or page summaries) happen in the first step only: their
      // device time where the backend times operators, else the first
      // step's excess over a regular one.
      const double summary_ms =
          r.summary_ms >= 0 ? r.summary_ms : std::max(0.0, r.first_step_ms - r.step_ms);
      const double frac = summary_ms / 1e3 / r.prefill_s;
      const double speedup = full_ms > 0 ? full_ms / r.step_ms : 0.0;
      std::printf(
          "%-10s %6d %5d %8d %5s %12.3f %14.2f %10.2f %14.4f %9.3f %10.2f %12.2f %10.1f %8.2f "
          "%10.3f %9.1f\n",
          r.config.type.c_str(), r.config.type == "full" ? 0 : r.config.budget_tokens, batch,
          f.context, r.tier.c_str(), r.step_ms, speedup, r.first_step_ms, frac, r.ring_hit_rate,
          r.recall_mib_per_step, r.prefetch_mib_per_step, r.hard_misses_per_step,
          r.ssd_mib_per_step, r.ssd_wait_ms_per_step, r.read_ahead_used_per_step);
      nlohmann::json ops = nlohmann::json::array();
      if (f.op_timing) {
        double device_ms = 0;
        for (const engine::OpTime& t : r.op_times) device_ms += t.ms;
        std::printf("    %-16s %10s %10s %8s\n", "op", "calls/step", "ms/step", "share");
        for (const engine::OpTime& t : r.op_times) {
          std::printf("    %-16s %10.1f %10.3f %8.3f\n", t.op.c_str(),
                      static_cast<double>(t.calls) / f.steps, t.ms, t.ms / r.timed_step_ms);
          ops.push_back({{"op", t.op},
                         {"calls_per_step", static_cast<double>(t.calls) / f.steps},
                         {"ms_per_step", t.ms}});
        }
        std::printf("    %-16s %10s %10.3f %8.3f  (wall %.3f ms/step with timing on)\n",
                    "device idle", "", r.timed_step_ms - device_ms,
                    (r.timed_step_ms - device_ms) / r.timed_step_ms, r.timed_step_ms);
      }
      rows.push_back({{"policy", r.config.type},
                      {"op_times", ops},
                      {"budget", r.config.budget_tokens},
                      {"batch", batch},
                      {"context", f.context},
                      {"step_ms", r.step_ms},
                      {"speedup_vs_full", speedup},
                      {"first_step_ms", r.first_step_ms},
                      {"prefill_s", r.prefill_s},
                      {"summary_ms", summary_ms},
                      {"summary_over_prefill", frac},
                      {"tier", r.tier},
                      {"codec", f.codec},
                      {"ring_hit_rate", r.ring_hit_rate},
                      {"recall_mib_per_step", r.recall_mib_per_step},
                      {"prefetch_mib_per_step", r.prefetch_mib_per_step},
                      {"ssd_hard_misses_per_step", r.hard_misses_per_step},
                      {"ssd_mib_per_step", r.ssd_mib_per_step},
                      {"ssd_wait_ms_per_step", r.ssd_wait_ms_per_step},
                      {"ssd_hard_misses_read_ahead_per_step", r.read_ahead_used_per_step}});
    }
    std::fflush(stdout);
  }
  nlohmann::json j = {{"model", f.model.empty() ? f.dummy_weights : f.model},
                      {"backend", f.backend},
                      {"results", rows}};
  if (absl::Status s = WriteJson(f.json, j); !s.ok()) return ExitWithError(kCmd, s);
  return 0;
}

int RunKvCapacity(const KvBenchFlags& f) {
  constexpr char kCmd[] = "strata bench kv-capacity";
  bench::CapacityOptions o;
  o.source = {f.model, f.dummy_weights};
  auto kv_cache = engine::ParseKvCacheType(f.kv_cache_dtype);
  if (!kv_cache.ok()) return ExitWithError(kCmd, kv_cache.status());
  o.kv_cache = *kv_cache;
  o.context = f.context;
  o.gpu_kv_bytes = static_cast<int64_t>(f.gpu_kv_gib * (1 << 30));
  o.host_bytes = static_cast<int64_t>(f.host_gib * (1 << 30));
  o.seqs = f.seqs;
  o.steps = f.steps;
  o.warmup = f.warmup;
  o.max_batch_tokens = f.max_batch_tokens;
  for (const std::string& name : f.modes) {
    bench::CapacityMode mode;
    mode.name = name;
    const size_t at = name.find("@host:");
    const std::string type = name.substr(0, at);
    if (type != "full" && type != "clusterkv") {
      return ExitWithError(kCmd,
                           absl::InvalidArgumentError(absl::StrCat("--modes: \"", name,
                                                                   "\" is not full, clusterkv or "
                                                                   "clusterkv@host:CODEC")));
    }
    mode.policy = MakeConfig(f, type, f.budgets.front());
    if (at != std::string::npos) {
      auto codec = engine::ParseKvCodecKind(name.substr(at + 6));
      if (!codec.ok()) return ExitWithError(kCmd, codec.status());
      if (type != "clusterkv") {
        return ExitWithError(kCmd, absl::InvalidArgumentError(
                                       "--modes: only clusterkv keeps clusters in the host tier"));
      }
      if (o.host_bytes <= 0) {
        return ExitWithError(kCmd, absl::InvalidArgumentError(
                                       absl::StrCat("--modes ", name, " needs --host-gib > 0")));
      }
      mode.host_codec = *codec;
      for (const double share : PrefetchShares(f)) {
        bench::CapacityMode run = mode;
        run.prefetch_share = share;
        run.name += PrefetchSuffix(f, share);
        o.modes.push_back(std::move(run));
      }
      continue;
    }
    o.modes.push_back(std::move(mode));
  }
  auto backend = CreateBackend(f.backend, f.threads);
  if (!backend.ok()) return ExitWithError(kCmd, backend.status());
  auto result = bench::RunKvCapacity(backend->get(), o);
  if (!result.ok()) return ExitWithError(kCmd, result.status());
  std::printf("%-33s %5s %5s %10s %12s %9s %11s %10s %12s %9s %s\n", "mode", "seqs", "fits",
              "step_ms", "decode_tok/s", "ring_hit", "recall_MiB", "recall_ms", "prefetch_MiB",
              "host_GiB", "upper_pages");
  nlohmann::json points = nlohmann::json::array();
  for (const bench::CapacityPoint& p : result->points) {
    std::printf("%-33s %5d %5s %10.2f %12.1f %9.3f %11.1f %10.2f %12.1f %9.2f %d/%d %s\n",
                p.mode.c_str(), p.seqs, p.fits ? "yes" : "no", p.step_ms, p.decode_tokens_per_s,
                p.ring_hit_rate, p.recall_mib_per_step, p.recall_ms_per_step,
                p.prefetch_mib_per_step, static_cast<double>(p.host_bytes_used) / (1 << 30),
                p.upper_pages_used, p.upper_pages_total, p.why.c_str());
    points.push_back({{"mode", p.mode},
                      {"seqs", p.seqs},
                      {"fits", p.fits},
                      {"step_ms", p.step_ms},
                      {"decode_tokens_per_s", p.decode_tokens_per_s},
                      {"ring_hit_rate", p.ring_hit_rate},
                      {"recall_mib_per_step", p.recall_mib_per_step},
                      {"recall_ms_per_step", p.recall_ms_per_step},
                      {"prefetch_mib_per_step", p.prefetch_mib_per_step},
                      {"host_bytes_used", p.host_bytes_used},
                      {"upper_pages_used", p.upper_pages_used},
                      {"upper_pages_total", p.upper_pages_total},
                      {"why", p.why}});
  }
  nlohmann::json sizing = nlohmann::json::object();
  for (const auto& [mode, text] : result->sizing) sizing[mode] = text;
  nlohmann::json j = {{"model", f.model.empty() ? f.dummy_weights : f.model},
                      {"backend", f.backend},
                      {"context", f.context},
                      {"gpu_kv_gib", f.gpu_kv_gib},
                      {"host_gib", f.host_gib},
                      {"budget", f.budgets.front()},
                      {"steps", f.steps},
                      {"sizing", sizing},
                      {"points", points}};
  if (absl::Status s = WriteJson(f.json, j); !s.ok()) return ExitWithError(kCmd, s);
  return 0;
}

int RunKvSsd(const KvBenchFlags& f) {
  constexpr char kCmd[] = "strata bench kv-ssd";
  bench::KvSsdBenchOptions options;
  options.path = f.ssd_path;
  options.value_bytes = f.value_kib << 10;
  options.total_bytes = static_cast<int64_t>(f.ssd_gib * (int64_t{1} << 30));
  options.io_threads = f.io_threads;
  options.direct_io = !f.buffered;
  absl::StatusOr<bench::KvSsdBenchResult> result = bench::RunKvSsdBench(options);
  if (!result.ok()) return ExitWithError(kCmd, result.status());
  std::printf("kv-ssd: %lld values of %lld KiB; write %.2f GB/s (flushed)%s\n",
              static_cast<long long>(result->values), static_cast<long long>(f.value_kib),
              result->write_gbps,
              result->page_cache_dropped ? "" : "; page cache NOT dropped (not root)");
  nlohmann::json reads = nlohmann::json::array();
  for (const auto& r : result->reads) {
    std::printf("kv-ssd: read with %2d I/O threads: %.2f GB/s\n", r.io_threads, r.gbps);
    reads.push_back({{"io_threads", r.io_threads}, {"gbps", r.gbps}});
  }
  nlohmann::json j = {{"path", f.ssd_path},
                      {"value_bytes", options.value_bytes},
                      {"values", result->values},
                      {"write_gbps", result->write_gbps},
                      {"page_cache_dropped", result->page_cache_dropped},
                      {"direct_io", options.direct_io},
                      {"reads", reads}};
  if (absl::Status s = WriteJson(f.json, j); !s.ok()) return ExitWithError(kCmd, s);
  return 0;
}

int RunTransfer(const KvBenchFlags& f) {
  constexpr char kCmd[] = "strata bench transfer";
  if (f.transfer_serve) {
    bench::TransferServeOptions o;
    o.host = f.transfer_host;
    o.port = f.transfer_port;
    o.once = f.transfer_once;
    o.listening = [](const std::string& address) {
      // A parent that spawned this receiver reads this line for the port.
      std::printf("strata bench transfer: receiver listening on %s\n", address.c_str());
      std::fflush(stdout);
    };
    absl::Status s = bench::ServeTransferBench(o);
    return s.ok() ? 0 : ExitWithError(kCmd, s);
  }
  bench::TransferBenchOptions o;
  if (!f.transfer_sizes.empty()) {
    o.sizes.clear();
    for (const std::string& text : f.transfer_sizes) {
      absl::StatusOr<int64_t> size = bench::ParseTransferSize(text);
      if (!size.ok()) return ExitWithError(kCmd, size.status());
      o.sizes.push_back(*size);
    }
  }
  o.count = f.transfer_count;
  o.total_bytes = static_cast<int64_t>(f.transfer_gib * static_cast<double>(int64_t{1} << 30));
  o.window = f.transfer_window;
  o.warmup = f.transfer_warmup;
  o.one_buffer = f.transfer_one_buffer;
  if (!f.transfer_rndv_threshold.empty()) {
    absl::StatusOr<int64_t> threshold = bench::ParseTransferSize(f.transfer_rndv_threshold);
    if (!threshold.ok()) return ExitWithError(kCmd, threshold.status());
    o.rndv_threshold = static_cast<size_t>(*threshold);
  }
  if (absl::Status s = bench::ValidateTransferOptions(o); !s.ok()) return ExitWithError(kCmd, s);
  absl::StatusOr<bench::TransferBenchResult> result =
      f.transfer_connect.empty()
          ? bench::RunTransferBenchWithChild(
                {"bench", "transfer", "--serve", "--host", "127.0.0.1", "--port", "0", "--once"}, o)
          : bench::RunTransferBench(f.transfer_connect, o);
  if (!result.ok()) return ExitWithError(kCmd, result.status());
  nlohmann::json sizes = nlohmann::json::array();
  for (const auto& r : result->sizes) {
    sizes.push_back({{"bytes", r.bytes},
                     {"messages", r.messages},
                     {"seconds", r.seconds},
                     {"gbps", r.gbps},
                     {"p50_us", r.p50_us},
                     {"p99_us", r.p99_us}});
  }
  if (f.transfer_json) {
    nlohmann::json j = {{"transport", "ucx"},
                        {"resources", result->resources},
                        {"window", result->window},
                        {"rndv_threshold", o.rndv_threshold},
                        {"one_buffer", result->one_buffer},
                        {"receiver", f.transfer_connect.empty() ? "child" : f.transfer_connect},
                        // Warm-up messages included; the run fails unless it
                        // is every message sent.
                        {"receiver_landed", result->landed},
                        {"sizes", sizes}};
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("transfer: UCX transport, %d in flight, %s; UCX resources [%s]\n", result->window,
              result->one_buffer ? "one buffer each side" : "rings of distinct slots",
              result->resources.c_str());
  std::printf("%10s %10s %9s %12s %12s\n", "size", "messages", "GB/s", "p50 ms", "p99 ms");
  for (const auto& r : result->sizes) {
    const std::string size = r.bytes >= (1 << 20) && r.bytes % (1 << 20) == 0
                                 ? absl::StrCat(r.bytes >> 20, " MiB")
                                 : absl::StrCat(r.bytes >> 10, " KiB");
    std::printf("%10s %10lld %9.3f %12.3f %12.3f\n", size.c_str(),
                static_cast<long long>(r.messages), r.gbps, r.p50_us / 1000, r.p99_us / 1000);
  }
  return 0;
}

}  // namespace strata::cli

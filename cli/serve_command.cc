#include "cli/serve_command.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "cli/backend_factory.h"
#include "cli/exit_status.h"
#include "cli/shutdown.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/metrics_server.h"
#include "common/status_macros.h"
#include "decode/kv_receiver.h"
#include "decode/remote_prefill.h"
#include "engine/async_engine.h"
#include "engine/model_loader.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/kv_sizing.h"
#include "kvtier/kv_wire.h"
#include "kvtier/profile.h"
#include "kvtier/ssd_store.h"
#include "kvtier/ucx_transport.h"
#include "prefill/prefill_worker.h"
#include "router/generation_service.h"
#include "router/heartbeat_client.h"
#include "router/server_metrics.h"
#include "router/transport_options.h"
#include "router/worker_service.h"

namespace strata::cli {
namespace {

// What a worker's KV looks like; a prefill and a decode worker exchange KV
// only when theirs match.
std::string KvFormatName(const kvtier::KvLayout& layout) {
  // A rank's KV heads; with tensor parallelism the ranks too, since each
  // rank's rows cross to the same rank.
  return absl::StrCat(engine::DTypeName(layout.dtype()), "/layers", layout.num_layers(), "/heads",
                      layout.num_kv_heads(), "x", layout.head_dim(), "/page", layout.page_size(),
                      "/upper", layout.upper_first_layer(),
                      layout.num_ranks() > 1 ? absl::StrCat("/tp", layout.num_ranks()) : "");
}

const char* CommandName(ServeFlags::Role role) {
  switch (role) {
    case ServeFlags::Role::kPrefill:
      return "strata prefill";
    case ServeFlags::Role::kDecode:
      return "strata decode";
    case ServeFlags::Role::kServe:
      break;
  }
  return "strata serve";
}

// Sizes the KV cache from the profiles when they give a GPU budget or keep
// clusters in the host tier (kvtier::SizeKvCacheForProfiles): the page
// groups, and --max-seqs / --max-sparse-seqs grown to the sequences the
// tiers hold unless they were given. Otherwise `options` stay as the flags
// set them.
absl::Status SizeFromProfiles(const ServeFlags& f, const std::vector<kvtier::KvProfile>& profiles,
                              const engine::Backend& backend, engine::ModelOptions& options,
                              int& max_sparse_seqs) {
  int64_t gpu_bytes = 0;
  bool tiered = false;
  for (const kvtier::KvProfile& p : profiles) {
    gpu_bytes += p.tiers.gpu_bytes;
    tiered |= p.policy.type == "clusterkv" && p.tiers.host_bytes > 0;
  }
  if (gpu_bytes == 0 && !tiered) return absl::OkStatus();
  if (gpu_bytes > 0 && f.kv_pages > 0) {
    return absl::InvalidArgumentError(
        "--kv-pages and the profiles' tiers.gpu_bytes both size the KV cache: give one");
  }
  STRATA_ASSIGN_OR_RETURN(engine::ModelConfig config,
                          engine::LoadSourceConfig({f.model_dir, f.dummy_weights}));
  // Each GPU's cache holds its rank's KV heads only: the budget is per GPU.
  STRATA_ASSIGN_OR_RETURN(const engine::TensorParallelShard shard,
                          engine::ShardModel(config, 0, f.tensor_parallel));
  config.num_kv_heads = shard.kv_heads;
  kvtier::KvSizingInput in;
  in.config = config;
  in.kv_dtype = options.kv_cache == engine::KvCacheType::kFp8E4M3 ? engine::DType::kF8E4M3
                                                                  : backend.activation_dtype();
  in.page_size = options.page_size;
  in.max_context = std::min(options.max_context, config.max_position_embeddings);
  const int64_t token_bytes = int64_t{2} * config.num_layers * config.num_kv_heads *
                              config.head_dim *
                              static_cast<int64_t>(engine::DTypeSize(in.kv_dtype));
  const int64_t context_pages = (in.max_context + in.page_size - 1) / in.page_size;
  in.gpu_bytes = gpu_bytes > 0 ? gpu_bytes
                 : f.kv_pages > 0
                     ? int64_t{f.kv_pages} * in.page_size * token_bytes
                     : int64_t{options.max_seqs} * context_pages * in.page_size * token_bytes;
  STRATA_ASSIGN_OR_RETURN(const kvtier::KvSizing sizing,
                          kvtier::SizeKvCacheForProfiles(profiles, in));
  options.num_pages = sizing.num_pages;
  options.num_upper_pages = sizing.num_upper_pages;
  options.upper_first_layer = sizing.upper_first_layer;
  if (tiered) {
    if (!f.max_seqs_given) options.max_seqs = std::max(options.max_seqs, sizing.sequences);
    if (!f.max_sparse_seqs_given) max_sparse_seqs = std::max(max_sparse_seqs, sizing.sequences);
  }
  STRATA_LOG_INFO("KV cache of {} bytes: {}; up to {} sequences per step, {} sparse", in.gpu_bytes,
                  sizing.Describe(), options.max_seqs, max_sparse_seqs);
  return absl::OkStatus();
}

// The flags `serve`, `prefill` and `decode` share; sets the callback.
void AddEngineFlags(CLI::App* cmd, ServeFlags& f, int& exit_code) {
  cmd->add_option("--model", f.model_dir, "Hugging Face model directory");
  cmd->add_option("--dummy-weights", f.dummy_weights,
                  "Random weights: a preset, or \"config\" for --model's config");
  cmd->add_option("--host", f.host, "Address to listen on");
  cmd->add_option("--port", f.port, "gRPC port (0: pick a free one)")->check(CLI::Range(0, 65535));
  cmd->add_option("--metrics-port", f.metrics_port,
                  "HTTP port for /metrics (0: pick a free one; -1: off)")
      ->check(CLI::Range(-1, 65535));
  cmd->add_option("--backend", f.backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--threads", f.threads, "CPU backend threads (0: all cores)");
  cmd->add_option("--tensor-parallel", f.tensor_parallel,
                  "Split the model over N ranks (GPUs 0..N-1 on cuda, through NCCL)")
      ->check(CLI::Range(1, 64));
  cmd->add_option("--collective-timeout-seconds", f.collective_timeout_seconds,
                  "Seconds a tensor-parallel rank waits for the others in a collective before "
                  "the step fails")
      ->check(CLI::PositiveNumber);
  CLI::Option* max_seqs =
      cmd->add_option("--max-seqs", f.max_seqs,
                      "Sequences per decode batch (default 64, or what the KV tiers hold)")
          ->check(CLI::Range(1, 4096));
  cmd->add_option("--max-context", f.max_context, "Tokens per sequence (prompt + completion)")
      ->check(CLI::Range(2, 1 << 22));
  cmd->add_option("--max-batch-tokens", f.max_batch_tokens, "Tokens per step")
      ->check(CLI::Range(1, 1 << 20));
  CLI::Option* max_sparse_seqs =
      cmd->add_option("--max-sparse-seqs", f.max_sparse_seqs,
                      "Sequences of sparse-policy profiles decoding sparsely at once (more decode "
                      "densely; default 8, or what the KV tiers hold)")
          ->check(CLI::Range(1, 4096));
  cmd->add_option("--kv-cache-dtype", f.kv_cache_dtype,
                  "KV cache storage: auto (the activation dtype) or fp8_e4m3 (fp8)")
      ->check(CLI::IsMember({"auto", "fp8", "fp8_e4m3"}));
  cmd->add_option("--kv-pages", f.kv_pages,
                  "KV cache of this many 16-token pages of every layer (0: the profiles' "
                  "tiers.gpu_bytes, else max-seqs full contexts); with a host tier it is "
                  "divided as kvtier/kv_sizing.h says")
      ->check(CLI::Range(0, 1 << 24));
  cmd->add_option("--max-in-flight", f.max_in_flight,
                  "Requests admitted at once; more get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--default-max-tokens", f.default_max_tokens,
                  "max_tokens when a request sets none")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--grace-seconds", f.grace_seconds,
                  "On SIGTERM, how long in-flight requests may run on")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("--max-request-bytes", f.max_request_bytes,
                  "Largest serialized request accepted; larger ones get INVALID_ARGUMENT")
      ->check(CLI::Range(size_t{1} << 10, size_t{1} << 30));
  cmd->add_option(
         "--max-undelivered-tokens", f.max_undelivered_tokens,
         "Tokens a stream may have undelivered (its client not reading) before it is cancelled")
      ->check(CLI::Range(1, 1 << 24));
  cmd->add_option("--profile", f.profiles, "KV profile YAML file a request may name (repeatable)");
  cmd->callback([&f, &exit_code, max_seqs, max_sparse_seqs] {
    f.max_seqs_given = max_seqs->count() > 0;
    f.max_sparse_seqs_given = max_sparse_seqs->count() > 0;
    exit_code = RunServe(f);
  });
}

void AddWorkerFlags(CLI::App* cmd, ServeFlags& f) {
  cmd->add_option("--router", f.router,
                  "host:port of the router's control service to heartbeat to (empty: found by "
                  "the router's DNS discovery instead)");
  cmd->add_option("--advertise", f.advertise,
                  "host:port the router and other workers reach this worker at (default: "
                  "--host:--port, with this host's name for 0.0.0.0)");
  cmd->add_option("--heartbeat-seconds", f.heartbeat_seconds, "Heartbeat interval")
      ->check(CLI::Range(0.05, 60.0));
}

}  // namespace

void AddServeCommand(CLI::App& app, ServeFlags& f, int& exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "serve", "Serve the gRPC Generate API (router, prefill and decode in one process)");
  AddEngineFlags(cmd, f, exit_code);
}

void AddWorkerCommands(CLI::App& app, ServeFlags& p, ServeFlags& d, int& exit_code) {
  p.role = ServeFlags::Role::kPrefill;
  CLI::App* prefill = app.add_subcommand(
      "prefill", "A prefill worker: computes prompts and sends their KV to decode workers");
  AddEngineFlags(prefill, p, exit_code);
  AddWorkerFlags(prefill, p);
  prefill
      ->add_option("--kv-export-bytes", p.kv_export_bytes,
                   "Host bytes where computed KV waits until it has been sent")
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 42));
  prefill
      ->add_option("--kv-export-layer-parts", p.kv_export_layer_parts,
                   "A prompt's last pages leave in this many parts of consecutive layers, each "
                   "as soon as the last step has computed its layers (1: whole, after the step)")
      ->check(CLI::Range(1, 255));
  d.role = ServeFlags::Role::kDecode;
  CLI::App* decode = app.add_subcommand(
      "decode", "A decode worker: takes prompts' KV from prefill workers and decodes");
  AddEngineFlags(decode, d, exit_code);
  AddWorkerFlags(decode, d);
  decode
      ->add_option("--kv-landing-bytes", d.kv_landing_bytes,
                   "Host bytes KV sent by prefill workers lands in")
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 42));
  decode
      ->add_option("--kv-import-bytes-per-step", d.kv_import_bytes_per_step,
                   "Bytes of a prompt's KV from a prefill worker loaded into the cache a step "
                   "while other sequences decode, so their next token is not held up "
                   "(0: all at once)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 42));
  decode
      ->add_option("--kv-import-admission", d.kv_import_admission,
                   "Put the cold clusters of an imported ClusterKV prompt straight into the host "
                   "tier from the landed KV, where the prefill worker's clusterings allow "
                   "(false: through the GPU, as a prompt computed here)")
      ->capture_default_str();
  decode
      ->add_option("--prefill-timeout-seconds", d.prefill_timeout_seconds,
                   "Deadline of a prefill worker's call; past it the prompt is computed here")
      ->check(CLI::Range(0.1, 3600.0));
  decode
      ->add_option("--kv-lease-seconds", d.kv_lease_seconds,
                   "How long room reserved for a prompt's KV waits for it")
      ->check(CLI::Range(0.1, 3600.0));
}

int RunServe(const ServeFlags& f) {
  const char* command = CommandName(f.role);
  auto Fail = [command](const absl::Status& status) { return ExitWithError(command, status); };
  const bool prefill_worker = f.role == ServeFlags::Role::kPrefill;
  const bool decode_worker = f.role == ServeFlags::Role::kDecode;
  if (f.model_dir.empty() && f.dummy_weights.empty()) {
    return Fail(absl::InvalidArgumentError("give --model DIR or --dummy-weights PRESET"));
  }
  // Block the shutdown signals in every thread; the main thread waits for
  // them with sigwait once the server runs.
  const sigset_t signals = BlockShutdownSignals();

  // Profiles first: a bad file should fail before the model loads.
  std::vector<std::string> profile_names = {kvtier::DefaultProfile().name};
  std::vector<kvtier::KvPolicyConfig> policies = {kvtier::DefaultProfile().policy};
  std::vector<kvtier::KvProfile> profiles = {kvtier::DefaultProfile()};
  // The host tier holds what the profiles ask for together.
  int64_t host_bytes = 0, prefix_bytes = 0;
  for (const std::string& path : f.profiles) {
    auto profile = kvtier::LoadProfile(path);
    if (!profile.ok()) return Fail(profile.status());
    if (absl::Status s = kvtier::CheckSupported(*profile, path); !s.ok()) return Fail(s);
    if (std::find(profile_names.begin(), profile_names.end(), profile->name) !=
        profile_names.end()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat(path, ": profile \"", profile->name, "\" is defined twice")));
    }
    profile_names.push_back(profile->name);
    policies.push_back(profile->policy);
    host_bytes += profile->tiers.host_bytes;
    prefix_bytes += profile->tiers.prefix_bytes;
    profiles.push_back(*profile);
  }

  auto ranks = CreateRanks(
      f.backend, f.threads, f.tensor_parallel,
      std::chrono::milliseconds(static_cast<int64_t>(f.collective_timeout_seconds * 1000)));
  if (!ranks.ok()) return Fail(ranks.status());
  engine::ModelOptions options;
  options.max_seqs = f.max_seqs;
  options.max_context = f.max_context;
  options.max_batch_tokens = f.max_batch_tokens;
  options.num_pages = f.kv_pages;
  auto kv_cache = engine::ParseKvCacheType(f.kv_cache_dtype);
  if (!kv_cache.ok()) return Fail(kv_cache.status());
  options.kv_cache = *kv_cache;
  int max_sparse = f.max_sparse_seqs;
  if (absl::Status s = SizeFromProfiles(f, profiles, (*ranks)->leader(), options, max_sparse);
      !s.ok()) {
    return Fail(s);
  }
  if (absl::Status s = LoadRanks(**ranks, {f.model_dir, f.dummy_weights}, options); !s.ok()) {
    return Fail(s);
  }
  engine::LoadedModel* loaded = &(*ranks)->loaded;
  const engine::Model& model = *loaded->model;
  // A cache that cannot hold one full context would fail long requests
  // mid-stream: refuse it now, naming the numbers and the flags.
  const int64_t cache_tokens = int64_t{model.options().num_pages} * model.options().page_size;
  if (cache_tokens < model.options().max_context) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("the KV cache holds ", cache_tokens, " tokens (--kv-pages ",
                     model.options().num_pages, " of ", model.options().page_size,
                     "), less than one full context of ", model.options().max_context,
                     " tokens (--max-context): raise --kv-pages or lower "
                     "--max-context")));
  }
  STRATA_LOG_INFO("KV cache: {} pages of {} tokens, {} ({} bytes per token)",
                  model.options().num_pages, model.options().page_size,
                  engine::KvCacheTypeName(model.options().kv_cache), model.kv_bytes_per_token());
  const std::string model_name =
      !f.model_dir.empty()
          ? std::filesystem::path(f.model_dir).lexically_normal().filename().string()
          : f.dummy_weights;
  // The SSD tier below the host tier (one database; declared before the
  // block manager, which uses it until it goes).
  auto ssd = kvtier::OpenSsdForProfiles(profiles, model_name.empty() ? f.model_dir : model_name);
  if (!ssd.ok()) return Fail(ssd.status());
  // Stored prefixes are shared by every profile: the KV they name depends
  // only on the model, its KV format and how its records split over ranks.
  auto manager_options = kvtier::ManagerOptionsForProfiles(
      profiles, ssd->get(),
      absl::StrCat(model_name, "/", engine::KvCacheTypeName(options.kv_cache),
                   f.tensor_parallel > 1 ? absl::StrCat("/tp", f.tensor_parallel) : ""));
  if (!manager_options.ok()) return Fail(manager_options.status());
  // A prefill worker keeps computed KV in its host tier until it is sent;
  // a decode worker has KV sent to it land in its own.
  if (prefill_worker) {
    manager_options->host_bytes += f.kv_export_bytes;
    manager_options->export_layer_parts = f.kv_export_layer_parts;
  }
  if (decode_worker) {
    manager_options->host_bytes += f.kv_landing_bytes;
    manager_options->landing_bytes = f.kv_landing_bytes;
  }
  auto kv_manager = kvtier::KvBlockManager::Create(loaded->model.get(), *manager_options);
  if (!kv_manager.ok()) return Fail(kv_manager.status());
  if (host_bytes > 0) {
    STRATA_LOG_INFO("KV host tier: {} bytes pinned ({} pages of every layer)", host_bytes,
                    host_bytes / (*kv_manager)->layout().record_bytes());
  }
  if (prefix_bytes > 0) {
    STRATA_LOG_INFO("KV prefix store: {} bytes of the host tier", prefix_bytes);
  }
  if (*ssd != nullptr) {
    const kvtier::SsdStore::Stats s = (*ssd)->stats();
    STRATA_LOG_INFO(
        "KV SSD tier: {} of {} bytes in use; {} keys a previous worker left deleted; {} stored "
        "prefix pages kept ({} bytes of {} for prefixes)",
        s.bytes_used, s.budget_bytes, s.stale_keys_deleted, (*kv_manager)->stats().ssd_prefix_pages,
        (*kv_manager)->stats().ssd_prefix_bytes_used, manager_options->ssd_prefix_bytes);
  }

  // Requests name a profile; its index selects the KV policy.
  // With tensor parallelism, a runner per rank over its KV heads.
  std::unique_ptr<kvtier::ClusteringStore> clusterings;  // outlives the runners
  std::unique_ptr<kvtier::RankedKvPolicies> kv_policies;
  if (std::any_of(policies.begin(), policies.end(),
                  [](const kvtier::KvPolicyConfig& p) { return p.type != "full"; })) {
    // ClusterKV profiles with a host tier keep their clusters there.
    auto tier = kvtier::KvTierOptions::FromProfiles(profiles, kv_manager->get());
    if (!tier.ok()) return Fail(tier.status());
    // ClusterKV profiles that store prefixes keep their prompt chunks'
    // clusterings too.
    clusterings = kvtier::ClusteringStoreForProfiles(profiles);
    // A prefill worker clusters the ClusterKV prompts it exports, for the
    // decode worker (each rank its KV heads; the decode worker's ranks
    // take them when it has as many).
    auto installed =
        kvtier::RankedKvPolicies::Install(loaded->model.get(), policies,
                                          {.max_sparse_seqs = max_sparse,
                                           .tier = *tier,
                                           .clusterings = clusterings.get(),
                                           .exports = prefill_worker ? kv_manager->get() : nullptr,
                                           .imports = decode_worker});
    if (!installed.ok()) return Fail(installed.status());
    kv_policies = std::move(*installed);
    // A decode worker's imported ClusterKV prompts go straight into the
    // host tier where the clusterings that came with them allow.
    if (f.kv_import_admission && kv_policies->num_ranks() == 1 &&
        kv_policies->leader().AdmitsImports()) {
      (*kv_manager)->set_import_admitter(&kv_policies->leader());
    }
  }
  // Before the runners go (declared after them).
  absl::Cleanup no_admitter = [manager = kv_manager->get()] {
    manager->set_import_admitter(nullptr);
  };

  prometheus::Registry registry;
  auto server_metrics = router::ServerMetrics::Create(&registry);
  if (!server_metrics.ok()) return Fail(server_metrics.status());
  // The KV planner's and block manager's statistics may be read on the
  // engine thread only: publish them after each step.
  // A step that breaks the tensor-parallel group turns the health service
  // to NOT_SERVING, so that the orchestrator restarts the worker. The
  // server is known once it listens, and forgotten before it goes.
  struct HealthServer {
    std::mutex mu;
    grpc::Server* server = nullptr;
  } health;
  // Chaos testing: break the tensor-parallel group after n steps, as a
  // rank that failed would.
  int64_t break_group_after = -1;
  if (const char* n = std::getenv("STRATA_FAULT_BREAK_GROUP_AFTER_STEPS"); n != nullptr) {
    break_group_after = std::atoll(n) + 1;  // the call below is not a step
    STRATA_LOG_WARN(
        "STRATA_FAULT_BREAK_GROUP_AFTER_STEPS={}: breaking the tensor-parallel group "
        "on purpose",
        n);
  }
  std::function<void()> after_step =
      [runner = kv_policies ? &kv_policies->leader() : nullptr, manager = kv_manager->get(),
       store = ssd->get(), m = server_metrics->get(), comm = loaded->model->communicator(), &health,
       reported = false, break_group_after]() mutable {
        if (runner != nullptr) m->UpdateKvPolicyStats(runner->stats());
        m->UpdateKvTierStats(manager->stats());
        if (store != nullptr) m->UpdateSsdStats(store->stats());
        if (comm == nullptr || reported) return;
        if (break_group_after > 0 && --break_group_after == 0) comm->Abort("fault injection");
        if (absl::Status s = comm->Health(); !s.ok()) {
          std::lock_guard<std::mutex> lock(health.mu);
          if (health.server == nullptr) return;
          STRATA_LOG_ERROR("the tensor-parallel group is broken ({}): health is NOT_SERVING",
                           std::string(s.message()));
          health.server->GetHealthCheckService()->SetServingStatus(false);
          reported = true;
        }
      };
  after_step();  // the gauges have their values before the first step
  // Each profile with a GPU share may hold that part of the cache's pages
  // (its gpu_bytes over the profiles' together), so that one workload's
  // burst cannot take the pages of another.
  engine::BatcherOptions batcher_options;
  batcher_options.max_import_bytes_per_step = f.kv_import_bytes_per_step;
  int64_t gpu_shares = 0;
  for (const kvtier::KvProfile& p : profiles) gpu_shares += p.tiers.gpu_bytes;
  for (const kvtier::KvProfile& p : profiles) {
    const int64_t pages = model.options().num_pages;
    const int cap = gpu_shares > 0 ? static_cast<int>(pages * p.tiers.gpu_bytes / gpu_shares) : 0;
    batcher_options.max_pages_per_policy.push_back(cap);
    if (cap > 0 && cap < pages) {
      STRATA_LOG_INFO("profile {}: at most {} of the {} KV pages", p.name, cap, pages);
    }
  }
  engine::AsyncEngine engine(loaded->model.get(), loaded->tokenizer.get(), batcher_options,
                             std::move(after_step), kv_manager->get());

  router::ServiceOptions service_options;
  service_options.model_name = model_name.empty() ? f.model_dir : model_name;
  service_options.architecture = model.config().architecture;
  service_options.limits.context_length = model.options().max_context;
  service_options.limits.vocab_size = model.config().vocab_size;
  service_options.limits.default_max_tokens = f.default_max_tokens;
  service_options.limits.max_request_bytes = f.max_request_bytes;
  if (loaded->tokenizer != nullptr) {
    service_options.limits.max_token_bytes = router::MaxTokenBytes(*loaded->tokenizer);
  }
  service_options.limits.profiles = profile_names;
  service_options.max_requests_in_flight = f.max_in_flight;
  service_options.max_undelivered_tokens = f.max_undelivered_tokens;
  router::GenerationService service(&engine, loaded->tokenizer.get(), server_metrics->get(),
                                    service_options);

  // Disaggregated workers: the KV transport, the prefill or decode side of
  // the hand-over, and the internal Worker service.
  std::unique_ptr<prefill::NoKvReceiver> no_kv;
  std::unique_ptr<decode::KvReceiver> kv_receiver;
  std::unique_ptr<kvtier::UcxTransport> kv_transport;
  std::unique_ptr<prefill::PrefillWorker> prefiller;
  std::unique_ptr<decode::RemotePrefill> remote_prefill;
  std::unique_ptr<router::WorkerService> worker_service;
  kvtier::KvBlockManager* manager = kv_manager->get();
  if (prefill_worker || decode_worker) {
    kvtier::Transport::Receiver* receiver;
    if (prefill_worker) {
      no_kv = std::make_unique<prefill::NoKvReceiver>();
      receiver = no_kv.get();
    } else {
      kv_receiver = std::make_unique<decode::KvReceiver>(
          manager->landing_area(), kvtier::KvWireFormat::Of(manager->layout()));
      receiver = kv_receiver.get();
    }
    auto transport = kvtier::UcxTransport::Create({.name = command}, receiver);
    if (!transport.ok()) return Fail(transport.status());
    kv_transport = std::move(*transport);
    const engine::HostBuffer& host = manager->host_buffer();
    if (host.defined() && host.bytes > 0) {
      if (absl::Status s = kv_transport->RegisterMemory(host.data(), host.bytes); !s.ok()) {
        return Fail(s);
      }
    }
    STRATA_LOG_INFO("KV transport: UCX over {}", kv_transport->resources());
    if (prefill_worker) {
      prefiller = std::make_unique<prefill::PrefillWorker>(&engine, manager, kv_transport.get());
      // Chaos testing of decode workers: corrupt every n-th KV block sent.
      if (const char* n = std::getenv("STRATA_FAULT_CORRUPT_KV_BLOCKS"); n != nullptr) {
        prefiller->set_corrupt_every_nth_block(std::atoi(n));
        STRATA_LOG_WARN("STRATA_FAULT_CORRUPT_KV_BLOCKS={}: corrupting KV blocks on purpose", n);
      }
      if (const char* ms = std::getenv("STRATA_FAULT_DELAY_FINAL_KV_MS"); ms != nullptr) {
        prefiller->set_final_send_delay(std::chrono::milliseconds(std::atoi(ms)));
        STRATA_LOG_WARN("STRATA_FAULT_DELAY_FINAL_KV_MS={}: delaying each prompt's last KV blocks",
                        ms);
      }
    } else {
      remote_prefill = std::make_unique<decode::RemotePrefill>(
          manager->landing_area(), model.options().page_size, kv_transport->local_address(),
          decode::RemotePrefillOptions{.lease = absl::Seconds(f.kv_lease_seconds),
                                       .timeout = absl::Seconds(f.prefill_timeout_seconds),
                                       .kv_format = KvFormatName(manager->layout())});
      service.set_remote_prefill(remote_prefill.get());
    }
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::StrCat(f.host, ":", f.port), grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterService(&service);
  std::unique_ptr<router::HeartbeatClient> heartbeat;
  std::function<std::pair<internal::v1::WorkerInfo, internal::v1::WorkerLoad>()> describe;
  if (kv_transport != nullptr) {
    // The Worker service is registered before the port is known: its
    // description is completed once the server listens (below).
    // Every rank's rows: the unit of the host tier's records, which the
    // router adds to the GPU tier's.
    const int64_t page_bytes = manager->layout().record_bytes();
    auto load = [&engine, manager, page_bytes] {
      return router::WorkerLoadOf(engine.GetStats(), manager, page_bytes);
    };
    worker_service =
        std::make_unique<router::WorkerService>(load, prefiller.get(), service_options.limits);
    describe = [ws = worker_service.get()] { return ws->Snapshot(); };
    builder.RegisterService(worker_service.get());
  }
  router::TransportOptions transport;
  transport.max_request_bytes = f.max_request_bytes;
  router::ApplyTransportOptions(transport, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("cannot listen on ", f.host, ":", f.port)));
  }
  {
    std::lock_guard<std::mutex> lock(health.mu);
    health.server = server.get();
  }
  absl::Cleanup forget_server = [&health] {
    std::lock_guard<std::mutex> lock(health.mu);
    health.server = nullptr;
  };
  if (worker_service != nullptr) {
    std::string advertise = f.advertise;
    if (advertise.empty()) {
      char hostname[256] = {};
      gethostname(hostname, sizeof(hostname) - 1);
      advertise =
          absl::StrCat(f.host == "0.0.0.0" || f.host == "::" ? hostname : f.host, ":", port);
    }
    internal::v1::WorkerInfo info;
    info.set_worker_id(
        absl::StrCat(advertise, "/", getpid(), "/", absl::ToUnixMicros(absl::Now())));
    info.set_role(prefill_worker ? internal::v1::WORKER_ROLE_PREFILL
                                 : internal::v1::WORKER_ROLE_DECODE);
    info.set_grpc_address(advertise);
    info.set_kv_address(kv_transport->local_address());
    info.set_model(service_options.model_name);
    info.set_kv_format(KvFormatName(manager->layout()));
    // The unit of its load's KV bytes (WorkerLoadOf's page bytes).
    info.set_kv_bytes_per_token(manager->layout().record_bytes() / manager->layout().page_size());
    for (const std::string& name : profile_names) info.add_profiles(name);
    worker_service->set_info(info);
    if (!f.router.empty()) {
      heartbeat = std::make_unique<router::HeartbeatClient>(
          f.router, absl::Seconds(f.heartbeat_seconds), describe);
      if (absl::Status s = heartbeat->Start(); !s.ok()) {
        server->Shutdown();
        server->Wait();
        engine.Stop();
        return Fail(s);
      }
    }
  }

  // /metrics refreshes the gauges from the engine before each scrape.
  metrics::RefreshingCollectable scraped(&registry, [&] {
    (*server_metrics)->UpdateGauges(engine.GetStats(), service.requests_in_flight());
    if (const kvtier::LandingArea* landing = manager->landing_area(); landing != nullptr) {
      (*server_metrics)
          ->UpdateLandingArea(int64_t{landing->num_free()} * landing->record_bytes(),
                              int64_t{landing->num_records()} * landing->record_bytes());
    }
  });
  std::unique_ptr<MetricsServer> metrics_server;
  if (f.metrics_port >= 0) {
    metrics_server = std::make_unique<MetricsServer>(&scraped);
    if (absl::Status s = metrics_server->Start(f.host, f.metrics_port); !s.ok()) {
      // The service must outlive the calls and sequences it started.
      server->Shutdown();
      server->Wait();
      engine.Stop();
      return Fail(s);
    }
  }
  // One parseable line on stdout says where the server listens.
  std::printf("%s: listening on %s:%d", command, f.host.c_str(), port);
  if (metrics_server) std::printf(" metrics on %s:%d", f.host.c_str(), metrics_server->port());
  std::printf("\n");
  std::fflush(stdout);

  DrainOnSignal(command, signals, *server, f.grace_seconds, [&] {
    // The router stops sending new work here within one heartbeat.
    if (worker_service != nullptr) worker_service->set_draining(true);
  });
  engine.Stop();
  if (heartbeat != nullptr) heartbeat->Stop();
  // Sends in flight fail (and release their exports) before the worker
  // that started them goes.
  kv_transport.reset();
  prefiller.reset();
  // Stored prefixes still on their way to the SSD land before it closes,
  // so that the next start finds them.
  if (absl::StatusOr<bool> landed = (*kv_manager)->FinishPrefixWrites(std::chrono::seconds(30));
      !landed.ok() || !*landed) {
    STRATA_LOG_WARN("stored prefixes not all written to the SSD tier before exit: {}",
                    landed.ok() ? "timed out" : landed.status().ToString());
  }
  if (metrics_server) metrics_server->Stop();
  std::printf("%s: stopped\n", command);
  return 0;
}

}  // namespace strata::cli

#include "cli/router_command.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/exit_status.h"
#include "cli/shutdown.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/metrics_server.h"
#include "engine/model_loader.h"
#include "engine/tokenizer.h"
#include "kvtier/profile.h"
#include "router/control_service.h"
#include "router/router_service.h"
#include "router/server_metrics.h"
#include "router/transport_options.h"
#include "router/worker_discovery.h"
#include "router/worker_pool_metrics.h"
#include "router/worker_registry.h"

namespace strata::cli {
namespace {

int Fail(const absl::Status& status) { return ExitWithError("strata router", status); }

}  // namespace

void AddRouterCommand(CLI::App& app, RouterFlags& f, int& exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "router", "Serve the gRPC Generate API in front of prefill and decode workers");
  cmd->add_option("--model", f.model_dir, "Hugging Face model directory (tokenizer and config)");
  cmd->add_option("--dummy-weights", f.dummy_weights,
                  "The workers' dummy preset (its config; token-id requests only)");
  cmd->add_option("--host", f.host, "Address to listen on");
  cmd->add_option("--port", f.port, "gRPC port, public API and worker heartbeats (0: pick one)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--metrics-port", f.metrics_port,
                  "HTTP port for /metrics (0: pick a free one; -1: off)")
      ->check(CLI::Range(-1, 65535));
  cmd->add_option("--workers", f.workers,
                  "Workers to poll: host:port, or dns:///name:port for every address a name "
                  "resolves to, e.g. a headless Service (repeatable)");
  cmd->add_option("--prefill-threshold-tokens", f.prefill_threshold_tokens,
                  "Prompts shorter than this are prefilled on the decode worker")
      ->check(CLI::Range(0, 1 << 24));
  cmd->add_option("--prefix-routing", f.prefix_routing,
                  "Send a prompt to the decode worker that was sent its start before, and "
                  "compute it there when what that worker does not hold is shorter than "
                  "--prefill-threshold-tokens");
  cmd->add_option("--prefix-routing-max-extra-load", f.prefix_routing_max_extra_load,
                  "How much busier (about that many more running sequences) the worker holding "
                  "a prompt's start may be than the least loaded one, and still get it")
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_option("--max-context", f.max_context, "Tokens per sequence (prompt + completion)")
      ->check(CLI::Range(2, 1 << 22));
  cmd->add_option("--max-in-flight", f.max_in_flight,
                  "Requests relayed at once; more get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--queue-timeout-seconds", f.queue_timeout_seconds,
                  "How long a request may wait for a decode worker with room for its KV; then "
                  "UNAVAILABLE (0: at once)")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("--default-max-tokens", f.default_max_tokens,
                  "max_tokens when a request sets none")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-request-bytes", f.max_request_bytes,
                  "Largest serialized request accepted; larger ones get INVALID_ARGUMENT")
      ->check(CLI::Range(size_t{1} << 10, size_t{1} << 30));
  cmd->add_option("--grace-seconds", f.grace_seconds,
                  "On SIGTERM, how long in-flight requests may run on")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("--heartbeat-seconds", f.heartbeat_seconds,
                  "How often workers report (heartbeats asked for, and discovery polls)")
      ->check(CLI::Range(0.05, 60.0));
  cmd->add_option("--worker-expiry-seconds", f.worker_expiry_seconds,
                  "A worker not heard from for this long gets no new requests")
      ->check(CLI::Range(0.1, 600.0));
  cmd->add_option("--profile", f.profiles,
                  "KV profile YAML file the workers serve, that a request may name (repeatable)");
  cmd->callback([&f, &exit_code] { exit_code = RunRouter(f); });
}

int RunRouter(const RouterFlags& f) {
  if (f.model_dir.empty() && f.dummy_weights.empty()) {
    return Fail(absl::InvalidArgumentError("give --model DIR or --dummy-weights PRESET"));
  }
  const sigset_t signals = BlockShutdownSignals();

  std::vector<std::string> profile_names = {kvtier::DefaultProfile().name};
  for (const std::string& path : f.profiles) {
    auto profile = kvtier::LoadProfile(path);
    if (!profile.ok()) return Fail(profile.status());
    if (std::find(profile_names.begin(), profile_names.end(), profile->name) !=
        profile_names.end()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat(path, ": profile \"", profile->name, "\" is defined twice")));
    }
    profile_names.push_back(profile->name);
  }
  for (const std::string& target : f.workers) {
    if (absl::Status s = router::WorkerDiscovery::ValidateTarget(target); !s.ok()) return Fail(s);
  }
  auto config = engine::LoadSourceConfig({f.model_dir, f.dummy_weights});
  if (!config.ok()) return Fail(config.status());
  std::unique_ptr<engine::Tokenizer> tokenizer;
  if (!f.model_dir.empty()) {
    auto loaded = engine::LoadTokenizer(f.model_dir);
    if (!loaded.ok()) return Fail(loaded.status());
    tokenizer = std::move(*loaded);
  }
  // The workers name the model as `serve` does: its directory's name.
  const std::string model_name =
      !f.model_dir.empty()
          ? std::filesystem::path(f.model_dir).lexically_normal().filename().string()
          : f.dummy_weights;

  router::WorkerRegistryOptions registry_options;
  registry_options.model = model_name;
  registry_options.expiry = absl::Seconds(f.worker_expiry_seconds);
  // For workers that do not say what a token of their KV takes: 16-bit KV,
  // K and V, every layer.
  registry_options.default_kv_bytes_per_token =
      int64_t{2} * 2 * config->num_layers * config->num_kv_heads * config->head_dim;
  router::WorkerRegistry registry(registry_options);
  prometheus::Registry prometheus_registry;
  auto server_metrics = router::ServerMetrics::Create(&prometheus_registry);
  if (!server_metrics.ok()) return Fail(server_metrics.status());
  auto pool_metrics = router::WorkerPoolMetrics::Create(&prometheus_registry);
  if (!pool_metrics.ok()) return Fail(pool_metrics.status());

  router::RouterServiceOptions options;
  options.model_name = model_name;
  options.architecture = config->architecture;
  options.limits.context_length = std::min(f.max_context, config->max_position_embeddings);
  options.limits.vocab_size = config->vocab_size;
  options.limits.default_max_tokens = f.default_max_tokens;
  options.limits.max_request_bytes = f.max_request_bytes;
  if (tokenizer != nullptr) options.limits.max_token_bytes = router::MaxTokenBytes(*tokenizer);
  options.limits.profiles = profile_names;
  options.default_profile = profile_names.front();
  options.prefill_threshold_tokens = f.prefill_threshold_tokens;
  options.prefix_affinity = f.prefix_routing;
  options.prefix_affinity_max_extra_load = f.prefix_routing_max_extra_load;
  options.max_requests_in_flight = f.max_in_flight;
  options.queue_timeout = absl::Seconds(f.queue_timeout_seconds);
  options.admit_by_kv = true;
  auto service = std::make_unique<router::RouterService>(&registry, tokenizer.get(),
                                                         server_metrics->get(), options);
  router::ControlService control(&registry, absl::Seconds(f.heartbeat_seconds));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::StrCat(f.host, ":", f.port), grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterService(service.get());
  builder.RegisterService(&control);
  router::TransportOptions transport;
  transport.max_request_bytes = f.max_request_bytes;
  router::ApplyTransportOptions(transport, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("cannot listen on ", f.host, ":", f.port)));
  }
  std::unique_ptr<router::WorkerDiscovery> discovery;
  if (!f.workers.empty()) {
    discovery = std::make_unique<router::WorkerDiscovery>(
        &registry, router::WorkerDiscoveryOptions{.targets = f.workers,
                                                  .interval = absl::Seconds(f.heartbeat_seconds)});
    if (absl::Status s = discovery->Start(); !s.ok()) {
      server->Shutdown();
      server->Wait();
      return Fail(s);
    }
  }
  metrics::RefreshingCollectable scraped(&prometheus_registry, [&] {
    // strata_requests_waiting: those waiting for a decode worker with room.
    (*server_metrics)
        ->UpdateGauges(engine::AsyncEngine::Stats{.waiting = service->requests_queued()},
                       service->requests_in_flight());
    (*pool_metrics)->Update(registry);
  });
  std::unique_ptr<MetricsServer> metrics_server;
  if (f.metrics_port >= 0) {
    metrics_server = std::make_unique<MetricsServer>(&scraped);
    if (absl::Status s = metrics_server->Start(f.host, f.metrics_port); !s.ok()) {
      server->Shutdown();
      server->Wait();
      return Fail(s);
    }
  }
  std::printf("strata router: listening on %s:%d", f.host.c_str(), port);
  if (metrics_server) std::printf(" metrics on %s:%d", f.host.c_str(), metrics_server->port());
  std::printf("\n");
  std::fflush(stdout);

  DrainOnSignal("strata router", signals, *server, f.grace_seconds);
  if (discovery != nullptr) discovery->Stop();
  service.reset();  // waits for the worker calls still being cancelled
  if (metrics_server) metrics_server->Stop();
  std::printf("strata router: stopped\n");
  return 0;
}

}  // namespace strata::cli

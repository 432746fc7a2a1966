// `strata router`: the public strata.v1.Generation gRPC API (plus health,
// reflection and Prometheus metrics) in front of pools of `strata prefill`
// and `strata decode` workers. It loads the model's tokenizer and config
// only (no weights, no GPU), learns its workers from their heartbeats (the
// internal Control service, on the same port) and from DNS names it
// resolves (--workers, e.g. a Kubernetes headless Service), and forwards
// each request to a decode worker, naming a prefill worker for long
// prompts (router/router_service.h). SIGTERM or SIGINT drains as `strata
// serve` does.
#ifndef STRATA_CLI_ROUTER_COMMAND_H_
#define STRATA_CLI_ROUTER_COMMAND_H_

#include <cstddef>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "router/request_conversion.h"

namespace strata::cli {

struct RouterFlags {
  std::string model_dir;
  std::string dummy_weights;
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = -1;
  std::vector<std::string> workers;  // host:port or dns:///name:port, polled
  int prefill_threshold_tokens = 256;
  bool prefix_routing = true;
  double prefix_routing_max_extra_load = 4.0;
  int max_context = 4096;
  int max_in_flight = 1024;
  double queue_timeout_seconds = 30;
  int default_max_tokens = 256;
  size_t max_request_bytes = router::kDefaultMaxRequestBytes;
  double grace_seconds = 30;
  double heartbeat_seconds = 0.5;
  double worker_expiry_seconds = 2;
  std::vector<std::string> profiles;  // the profiles the workers serve
};

void AddRouterCommand(CLI::App& app, RouterFlags& flags, int& exit_code);
int RunRouter(const RouterFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_ROUTER_COMMAND_H_

// `strata serve`: router, prefill and decode in one process, serving the
// strata.v1.Generation gRPC API (plus health and reflection) and Prometheus
// metrics over HTTP. SIGTERM or SIGINT drains: new requests are refused,
// in-flight ones may finish within the grace period and are cancelled after
// it, and the process exits 0; a second signal during the drain exits at
// once (128 + the signal).
#ifndef STRATA_CLI_SERVE_COMMAND_H_
#define STRATA_CLI_SERVE_COMMAND_H_

#include <cstddef>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "router/request_conversion.h"

namespace strata::cli {

struct ServeFlags {
  std::string model_dir;
  std::string dummy_weights;
  std::string host = "0.0.0.0";
  int port = 50051;       // 0 picks a free port (printed on stdout)
  int metrics_port = -1;  // -1: no metrics endpoint; 0 picks a free port
  std::string backend = "cpu";
  int threads = 0;
  int max_seqs = 64;  // grown to what the KV tiers hold unless given
  int max_context = 4096;
  int max_batch_tokens = 2048;
  int kv_pages = 0;
  std::string kv_cache_dtype = "auto";
  int max_sparse_seqs = 8;  // grown likewise
  bool max_seqs_given = false, max_sparse_seqs_given = false;
  int max_in_flight = 256;
  size_t max_request_bytes = router::kDefaultMaxRequestBytes;
  int max_undelivered_tokens = 8192;
  int default_max_tokens = 256;
  double grace_seconds = 30;
  std::vector<std::string> profiles;  // KV profile YAML files
};

void AddServeCommand(CLI::App& app, ServeFlags& flags, int& exit_code);
int RunServe(const ServeFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_SERVE_COMMAND_H_

// `strata serve`: router, prefill and decode in one process, serving the
// strata.v1.Generation gRPC API (plus health and reflection) and Prometheus
// metrics over HTTP. SIGTERM or SIGINT drains: new requests are refused,
// in-flight ones may finish within the grace period and are cancelled after
// it, and the process exits 0; a second signal during the drain exits at
// once (128 + the signal).
//
// `strata prefill` and `strata decode`: the same process as one worker of a
// disaggregated deployment (proto/strata/internal/v1/worker.proto). Both
// serve the internal Worker service beside the public one, open a UCX KV
// transport, and heartbeat to the router given by --router (or are found
// by the router's DNS discovery). A prefill worker computes prompts and
// sends their KV to decode workers (prefill/prefill_worker.h); a decode
// worker lands it in its host tier (decode/) and decodes.
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
  int tensor_parallel = 1;  // ranks the model is split over
  double collective_timeout_seconds =
      60;             // a rank that does not join a collective by then fails the step
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
  // Disaggregated workers (`prefill`, `decode`).
  enum class Role { kServe, kPrefill, kDecode } role = Role::kServe;
  std::string router;     // host:port of the router's Control service ("": none)
  std::string advertise;  // host:port peers reach the Worker service at ("": host:port)
  double heartbeat_seconds = 0.5;
  int64_t kv_landing_bytes = int64_t{1} << 30;  // decode: host bytes KV lands in
  // decode: bytes of an imported prompt's KV loaded a step while others
  // decode (engine::BatcherOptions::max_import_bytes_per_step; 0: at once)
  int64_t kv_import_bytes_per_step = int64_t{256} << 20;
  // decode: imported ClusterKV prompts go straight into the host tier
  // where their clusterings allow (KvBlockManager::set_import_admitter)
  bool kv_import_admission = true;
  int64_t kv_export_bytes = int64_t{1} << 30;  // prefill: host bytes exports wait in
  // prefill: the parts of consecutive layers a prompt's last pages leave in
  // as its last step computes them (KvBlockManagerOptions::export_layer_parts)
  int kv_export_layer_parts = 4;
  double prefill_timeout_seconds = 60;  // decode: a prefill call's deadline
  double kv_lease_seconds = 30;         // decode: a reservation's lease
};

void AddServeCommand(CLI::App& app, ServeFlags& flags, int& exit_code);
// `prefill` and `decode`.
void AddWorkerCommands(CLI::App& app, ServeFlags& prefill_flags, ServeFlags& decode_flags,
                       int& exit_code);
int RunServe(const ServeFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_SERVE_COMMAND_H_

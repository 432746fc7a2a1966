// `strata bench kv-policies` and `strata bench kv-speed`: the accuracy and
// speed benchmarks of the KV policies (the work is in bench/kv_policy_bench.h;
// this file holds the flags and the tables).
//
//   strata bench kv-policies --model models/retrieval-llama [--backend cuda]
//       [--policies full,streaming,quest,clusterkv] [--budgets 256,512,1024,2048]
//       [--full-layers 2] [--json FILE]
//   strata bench kv-speed --dummy-weights llama-3-8b --backend cuda
//       [--context 32768] [--batch 1,8] [--budgets 1024,2048]
//       [--host-tiers gpu,half,host] [--codec bf16] [--json FILE]
//   strata bench kv-capacity --dummy-weights llama-3-8b --backend cuda
//       [--context 32768] [--gpu-kv-gib 50] [--host-gib 80] [--seqs 4,8,12,24,48]
//       [--modes full,clusterkv,clusterkv@host:int4] [--json FILE]
//   strata bench kv-ssd --path DIR [--value-kib 2048] [--gib 8] [--io-threads 1,2,4,8]
//       [--json FILE]
//   strata bench transfer [--sizes 16K,64K,256K,1M,2M,4M] [--gib 1 | --count N]
//       [--window 16] [--warmup N] [--rndv-threshold 16K] [--one-buffer] [--json]
//       (alone: spawns its own receiver)
//   strata bench transfer --serve [--host 127.0.0.1] [--port P] [--once]
//   strata bench transfer --connect HOST:PORT [the sender's flags above]
//
// Exit status: 0; 2 for invalid flags or inputs; 1 when a run fails.
#ifndef STRATA_CLI_KV_BENCH_COMMAND_H_
#define STRATA_CLI_KV_BENCH_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace strata::cli {

struct KvBenchFlags {
  std::string model;
  std::string dummy_weights;
  std::string backend = "cpu";
  int threads = 0;
  std::string eval;  // default: MODEL/eval.jsonl
  std::vector<std::string> policies;
  std::vector<int> budgets;
  int full_layers = 2;
  int sink_tokens = 16;
  int window_tokens = 320;
  int tokens_per_cluster = 80;
  int cluster_chunk_tokens = 0;  // kvtier::KvPolicyConfig's
  int kmeans_iterations = 20;
  int max_batch = 16;
  int generate = 0;
  int fidelity_steps = 2;
  int max_cases = 0;
  int query_in_decode = 0;
  std::string kv_cache_dtype = "auto";
  // kv-speed
  int context = 32768;
  std::vector<int> batches;
  int steps = 20;
  int warmup = 3;
  bool op_timing = false;
  // ClusterKV's clusters: gpu (all in the paged cache), half (every other
  // cluster in the host tier), host (all there), ssdN (all in the host
  // tier, and every N-th of them on an SSD tier at ssd_path, with
  // io_threads' first value reading); with codec below the GPU.
  std::vector<std::string> host_tiers;
  std::string codec = "bf16";
  // kv-policies: each clusterkv config also with every cluster in the host
  // tier, once per codec.
  std::vector<std::string> tier_codecs;
  // Runs with clusters in the host tier: once per value of
  // KvTierOptions::prefetch_share (its default when none is given).
  std::vector<double> prefetch_shares;
  // kv-capacity (with context, steps, warmup and the first budget above)
  std::vector<int> seqs;
  std::vector<std::string> modes;  // full, clusterkv, clusterkv@host:CODEC
  double gpu_kv_gib = 50;
  double host_gib = 0;
  int max_batch_tokens = 8192;
  // kv-ssd
  std::string ssd_path;
  int64_t value_kib = 2048;
  double ssd_gib = 8;
  std::vector<int> io_threads;
  // kv-speed: the ssdN runs with and/or without reads ahead.
  std::vector<bool> ssd_read_ahead;
  bool buffered = false;  // kv-ssd: page-cache I/O instead of O_DIRECT
  std::string json;
  // transfer (bench/transfer_bench.h)
  bool transfer_serve = false;
  std::string transfer_connect;
  std::string transfer_host = "127.0.0.1";
  int transfer_port = 0;
  bool transfer_once = false;
  std::vector<std::string> transfer_sizes;
  double transfer_gib = 1;
  int64_t transfer_count = 0;
  int transfer_window = 16;
  int64_t transfer_warmup = -1;
  std::string transfer_rndv_threshold;  // default: the transport's
  bool transfer_one_buffer = false;
  bool transfer_json = false;  // JSON on stdout instead of the table
};

// Registers kv-policies, kv-speed, kv-capacity, kv-ssd and transfer under
// `bench`.
void AddKvBenchCommands(CLI::App& bench, KvBenchFlags& flags, int& exit_code);

int RunKvPolicies(const KvBenchFlags& flags);
int RunKvSpeed(const KvBenchFlags& flags);
int RunKvCapacity(const KvBenchFlags& flags);
int RunKvSsd(const KvBenchFlags& flags);
int RunTransfer(const KvBenchFlags& flags);

}  // namespace strata::cli

#endif  // STRATA_CLI_KV_BENCH_COMMAND_H_

// strata_kernel_bench: the GPU runtime's figures against the hardware limits
// measured in the same run, printed as one table (and as JSON lines with
// --json). Runs on a machine with an NVIDIA GPU; see bench/run_kernels.sh,
// which also runs the PyTorch peer (bench/sdpa_peer.py) on the same shapes.
//
// Limits measured here: device-to-device copy bandwidth (bytes read + bytes
// written) and bf16 GEMM throughput through the backend's cuBLASLt path at a
// large shape. Figures: Linear at decode sizes (1 and 8 tokens at the
// Llama-3-8B projection shapes), decode and prefill attention kernels, whole-model
// decode steps and prefill at the Llama-3-8B shape with random weights.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cuda/cuda_backend.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "engine/sampler.h"
#include "engine/weights.h"

namespace strata::bench {
namespace {

using Clock = std::chrono::steady_clock;
using engine::Backend;
using engine::DType;
using engine::Tensor;

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}
template <typename T>
T Check(absl::StatusOr<T> s, const char* what) {
  Check(s.status(), what);
  return *std::move(s);
}

// Median seconds per call of `op` over `reps` timed groups of `inner` calls
// (after warm-up), synchronising the backend around each group.
double TimeIt(Backend& b, int reps, int inner, const std::function<void()>& op) {
  for (int i = 0; i < 2; ++i) op();
  Check(b.Synchronize(), "warm-up");
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < inner; ++i) op();
    Check(b.Synchronize(), "timed run");
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / inner);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Row {
  std::string figure;
  double value;
  std::string unit;
  double limit;
  std::string limit_name;
};
std::vector<Row> rows;

void Report(Row r) {
  std::printf(
      "{\"figure\": \"%s\", \"value\": %.6g, \"unit\": \"%s\", \"limit\": %.6g, \"limit_name\": "
      "\"%s\", \"ratio\": %.4f}\n",
      r.figure.c_str(), r.value, r.unit.c_str(), r.limit, r.limit_name.c_str(),
      r.limit > 0 ? r.value / r.limit : 0.0);
  std::fflush(stdout);
  rows.push_back(std::move(r));
}

Tensor Random(Backend& b, std::vector<int64_t> shape, uint64_t seed,
              std::optional<DType> dtype = std::nullopt) {
  Tensor t = Check(b.Allocate(dtype.value_or(b.activation_dtype()), std::move(shape)), "allocate");
  Check(b.FillRandom(t, seed, 1.0f), "fill");
  return t;
}

// Paged attention over `seqs` sequences with `q_len` new tokens each on a
// context of `ctx`, Llama-3-8B heads (32 q, 8 kv, d 128), pages of 16, the
// caches in `kv_dtype` (bf16 or fp8 e4m3). Pages are in order, as a fresh
// page allocator hands them out, or with `scattered` a fixed shuffle of
// them, as after many sequences have come and gone.
double TimeAttention(Backend& b, int seqs, int q_len, int ctx, int reps,
                     DType kv_dtype = DType::kBF16, bool scattered = false) {
  const engine::QkvLayout layout{32, 8, 128};
  const int page = 16, blocks = (ctx + page - 1) / page;
  Tensor qkv = Random(b, {int64_t{seqs} * q_len, layout.row_width()}, 1);
  Tensor kc = Random(b, {int64_t{seqs} * blocks, page, 8, 128}, 2, kv_dtype);
  Tensor vc = Random(b, {int64_t{seqs} * blocks, page, 8, 128}, 3, kv_dtype);
  Tensor out = Check(b.Allocate(b.activation_dtype(), {int64_t{seqs} * q_len, 32 * 128}), "out");
  engine::AttentionBatch batch;
  batch.num_seqs = seqs;
  batch.max_blocks_per_seq = blocks;
  batch.page_size = page;
  batch.max_query_len = q_len;
  batch.max_context_len = ctx;
  std::vector<int32_t> table(int64_t{seqs} * blocks);
  std::iota(table.begin(), table.end(), 0);
  if (scattered) std::shuffle(table.begin(), table.end(), std::mt19937(11));
  for (int s = 0; s <= seqs; ++s) batch.host_query_start.push_back(s * q_len);
  batch.host_context_len.assign(seqs, ctx);
  batch.query_start = Check(b.Allocate(DType::kI32, {seqs + 1}), "qs");
  batch.context_len = Check(b.Allocate(DType::kI32, {seqs}), "cl");
  batch.block_table = Check(b.Allocate(DType::kI32, {seqs, blocks}), "bt");
  Check(b.CopyFromHost(batch.host_query_start.data(), DType::kI32, seqs + 1, batch.query_start, 0),
        "copy");
  Check(b.CopyFromHost(batch.host_context_len.data(), DType::kI32, seqs, batch.context_len, 0),
        "copy");
  Check(b.CopyFromHost(table.data(), DType::kI32, table.size(), batch.block_table, 0), "copy");
  // Decode calls are short: 20 back to back per timed group keep the
  // host's synchronisation out of the figure (bench/sdpa_peer.py times its
  // decode the same way).
  return TimeIt(b, reps, q_len == 1 ? 20 : 3, [&] {
    Check(b.Attention(qkv, layout, kc, vc, batch, 1.0f / std::sqrt(128.0f), 0, out), "attention");
  });
}

void RunModel(Backend& b, double copy_bw, double gemm_peak,
              const std::function<bool(const char*)>& wanted);
void PrintTable();

// Sections a run can be limited to (all when none is named); the limits are
// always measured, since every ratio needs them.
constexpr const char* kSections[] = {"linear",  "decode-attention", "prefill-attention",
                                     "cluster", "decode",           "prefill"};

void Run(const std::vector<std::string>& sections) {
  auto wanted = [&](const char* section) {
    return sections.empty() ||
           std::find(sections.begin(), sections.end(), section) != sections.end();
  };
  auto backend = Check(cuda::CreateCudaBackend(0), "cuda backend");
  Backend& b = *backend;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("{\"device\": \"%s\", \"sms\": %d}\n", prop.name, prop.multiProcessorCount);

  // Limit 1: device-to-device copy, 2 GiB each way.
  const size_t bytes = size_t{2} << 30;
  void *src = nullptr, *dst = nullptr;
  if (cudaMalloc(&src, bytes) != cudaSuccess || cudaMalloc(&dst, bytes) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc failed\n");
    std::exit(1);
  }
  cudaMemset(src, 1, bytes);
  std::vector<double> copy_times;
  for (int i = 0; i < 12; ++i) {
    cudaDeviceSynchronize();
    const auto t0 = Clock::now();
    cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    if (i >= 2) copy_times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  cudaFree(src);
  cudaFree(dst);
  std::sort(copy_times.begin(), copy_times.end());
  const double copy_bw = 2.0 * bytes / copy_times[copy_times.size() / 2];
  Report({"device copy bandwidth (read + write)", copy_bw / 1e12, "TB/s", 0, "-"});

  // Limit 2: bf16 GEMM through the backend's cuBLASLt path, 8192 x 8192 x 8192.
  {
    const int64_t n = 8192;
    Tensor x = Random(b, {n, n}, 4), w = Random(b, {n, n}, 5);
    Tensor y = Check(b.Allocate(b.activation_dtype(), {n, n}), "y");
    const double t = TimeIt(b, 7, 5, [&] { Check(b.Linear(x, w, Tensor(), y), "linear"); });
    Report({"bf16 GEMM 8192^3 (cuBLASLt)", 2.0 * n * n * n / t / 1e12, "TFLOP/s", 0, "-"});
  }
  const double gemm_peak = rows.back().value;

  // Linear at decode sizes, the Llama-3-8B projections: reading W once is
  // the whole cost, so the rate is compared with the copy bandwidth. Several
  // copies of W are cycled so that none is still in L2 (50 MB on an H100)
  // from the previous call.
  if (wanted("linear")) {
    struct Shape {
      const char* name;
      int64_t n, k;
    };
    for (const Shape& s :
         {Shape{"qkv", 6144, 4096}, Shape{"o_proj", 4096, 4096}, Shape{"gate_up", 28672, 4096},
          Shape{"down", 4096, 14336}, Shape{"lm_head", 128256, 4096}}) {
      const double w_bytes = 2.0 * s.n * s.k;
      const int copies = std::max(2, static_cast<int>(std::ceil(256e6 / w_bytes)));
      std::vector<Tensor> ws;
      for (int i = 0; i < copies; ++i) ws.push_back(Random(b, {s.n, s.k}, 20 + i));
      const std::string shape = std::to_string(s.n) + "x" + std::to_string(s.k);
      for (int64_t tokens : {1, 8}) {
        Tensor x = Random(b, {tokens, s.k}, 30);
        Tensor y = Check(b.Allocate(b.activation_dtype(), {tokens, s.n}), "y");
        int next = 0;
        const double t = TimeIt(b, 7, copies * ((20 + copies - 1) / copies), [&] {
          Check(b.Linear(x, ws[next], Tensor(), y), "linear");
          next = (next + 1) % copies;
        });
        const std::string what = "linear T=" + std::to_string(tokens) + " " + s.name + " " + shape;
        if (tokens == 1) Report({what + ": time", t * 1e6, "us", 0, "-"});
        Report({what + ": W rate", w_bytes / t / 1e12, "TB/s", copy_bw / 1e12, "device copy"});
      }
    }
  }

  // Decode attention: batch 16, 32k context, bf16 KV. Bytes: K and V once.
  if (wanted("decode-attention")) {
    const double t = TimeAttention(b, 16, 1, 32768, 7);
    const double kv_bytes = 16.0 * 32768 * 8 * 128 * 2 * 2;
    Report({"decode attention b16 ctx32k: time", t * 1e3, "ms", 0, "-"});
    Report({"decode attention b16 ctx32k: KV bandwidth", kv_bytes / t / 1e12, "TB/s",
            copy_bw / 1e12, "device copy"});
    // The same with an fp8 e4m3 cache: half the bytes. Its peer figure is
    // SDPA on the bf16 cache (bench/sdpa_peer.py), the speed a user gives up
    // nothing but fp8 rounding to beat.
    const double t8 = TimeAttention(b, 16, 1, 32768, 7, DType::kF8E4M3);
    Report({"decode attention b16 ctx32k fp8 KV: time", t8 * 1e3, "ms", 0, "-"});
    Report({"decode attention b16 ctx32k fp8 KV: KV bandwidth", kv_bytes / 2 / t8 / 1e12, "TB/s",
            copy_bw / 1e12, "device copy"});
    Report({"decode attention b16 ctx32k fp8 KV: speedup over bf16 KV", t / t8, "x", 2.0,
            "bytes ratio"});
  }
  // Prefill attention, causal, one sequence: FLOPs 4 * S^2 / 2 * Hq * d.
  for (int s : {8192, 32768}) {
    if (!wanted("prefill-attention")) break;
    const double t = TimeAttention(b, 1, s, s, s > 8192 ? 3 : 5);
    const double flops = 4.0 * s * s / 2 * 32 * 128;
    Report({"prefill attention causal " + std::to_string(s / 1024) + "k: time", t * 1e3, "ms", 0,
            "-"});
    Report({"prefill attention causal " + std::to_string(s / 1024) + "k: throughput",
            flops / t / 1e12, "TFLOP/s", gemm_peak, "bf16 GEMM"});
    if (s == 8192) {
      const double ts = TimeAttention(b, 1, s, s, 5, DType::kBF16, /*scattered=*/true);
      Report({"prefill attention causal 8k pages scattered: throughput", flops / ts / 1e12,
              "TFLOP/s", gemm_peak, "bf16 GEMM"});
      const double t8 = TimeAttention(b, 1, s, s, 5, DType::kF8E4M3);
      Report({"prefill attention causal 8k fp8 KV: throughput", flops / t8 / 1e12, "TFLOP/s",
              gemm_peak, "bf16 GEMM"});
    }
  }

  // ClusterKV's k-means of one layer of one sequence after a 32k prefill:
  // 32k keys x 8 kv heads, one cluster per 80 tokens, 20 passes, then the
  // reorder. The caches are refilled with the same random values before
  // each call (a clustered cache would seed the next call differently), and
  // the refill, timed alone, is subtracted. Its rate is the assignment
  // passes' FLOPs (2 x keys x clusters x d per pass, counted for all 20,
  // though passes after convergence would be skipped) over the whole time,
  // gather, sorts, updates and reorder included, against the GEMM rate.
  if (wanted("cluster")) {
    const int n = 32768, heads = 8, d = 128, clusters = n / 80, passes = 20, page = 16;
    Tensor kc = Random(b, {n / page, page, heads, d}, 2);
    Tensor vc = Random(b, {n / page, page, heads, d}, 3);
    std::vector<int32_t> table(n / page);
    std::iota(table.begin(), table.end(), 0);
    engine::SequenceRange range;
    range.block_table = Check(b.Allocate(DType::kI32, {n / page}), "table");
    Check(b.CopyFromHost(table.data(), DType::kI32, n / page, range.block_table, 0), "copy");
    range.page_size = page;
    range.count = n;
    Tensor centroids = Check(b.Allocate(DType::kBF16, {heads, 512, d}), "centroids");
    Tensor extents = Check(b.Allocate(DType::kI32, {heads, 512, 2}), "extents");
    auto refill = [&] {
      Check(b.FillRandom(kc, 2, 1.0f), "fill");
      Check(b.FillRandom(vc, 3, 1.0f), "fill");
    };
    const double t_fill = TimeIt(b, 5, 3, refill);
    const double t = TimeIt(b, 5, 3,
                            [&] {
                              refill();
                              Check(b.ClusterKeys(kc, vc, range, clusters, passes, 0, centroids,
                                                  extents, nullptr, engine::ClusterRows::kReorder),
                                    "cluster");
                            }) -
                     t_fill;
    Report({"clustering 32k keys x 8 heads, 409 clusters, 20 passes: time", t * 1e3, "ms", 0, "-"});
    const double flops = 2.0 * passes * heads * n * clusters * d;
    Report({"clustering: assignment FLOPs over the whole clustering time", flops / t / 1e12,
            "TFLOP/s", gemm_peak, "bf16 GEMM"});
  }

  if (wanted("decode") || wanted("prefill")) RunModel(b, copy_bw, gemm_peak, wanted);
  PrintTable();
}

// Whole model at the Llama-3-8B shape, random weights.
void RunModel(Backend& b, double copy_bw, double gemm_peak,
              const std::function<bool(const char*)>& wanted) {
  const engine::ModelConfig config = Check(engine::PresetModelConfig("llama-3-8b"), "preset");
  engine::ModelOptions options;
  options.max_seqs = 64;
  options.max_context = 8192 + 64;
  options.max_batch_tokens = 8192;
  options.num_pages = 64 * ((1024 + 64) / 16 + 1) + (8192 + 64) / 16 + 8;
  auto weights = Check(engine::DummyWeights(config, b, 7), "weights");
  const double weight_bytes = static_cast<double>(weights.bytes);
  auto model = Check(engine::Model::Create(config, std::move(weights), &b, options), "model");
  const double kv_per_token = static_cast<double>(model->kv_bytes_per_token());

  // Decode steps at context 1k: `seqs` sequences, one token each.
  for (int seqs : {1, 8, 16, 32, 64}) {
    if (!wanted("decode")) break;
    engine::StepInput in;
    in.query_start.push_back(0);
    const int ctx = 1024, per_seq = ctx / 16 + 1;
    for (int s = 0; s < seqs; ++s) {
      in.token_ids.push_back(100 + s);
      in.positions.push_back(ctx - 1);
      in.query_start.push_back(s + 1);
      in.context_len.push_back(ctx);
      std::vector<int32_t> table(per_seq);
      std::iota(table.begin(), table.end(), s * per_seq);
      in.block_tables.push_back(table);
      in.logit_rows.push_back(s);
    }
    // A serving step: greedy sampling on the device, token ids back.
    const std::vector<engine::SamplingRow> rows(seqs);
    const double t =
        TimeIt(b, 7, 3, [&] { Check(model->ForwardSample(in, rows).status(), "decode step"); });
    // Bytes a step must read: every weight once and each sequence's KV.
    const double step_bytes = weight_bytes + seqs * ctx * kv_per_token;
    Report({"decode step b" + std::to_string(seqs) + " ctx1k: time", t * 1e3, "ms", 0, "-"});
    Report({"decode step b" + std::to_string(seqs) + " ctx1k: weights+KV read rate",
            step_bytes / t / 1e12, "TB/s", copy_bw / 1e12, "device copy"});
    Report({"decode b" + std::to_string(seqs) + " ctx1k: throughput", seqs / t, "tok/s", 0, "-"});
  }
  // Prefill of one 8k prompt: FLOPs = 2 * params * tokens + causal attention.
  if (wanted("prefill")) {
    const int s = 8192;
    engine::StepInput in;
    for (int i = 0; i < s; ++i) {
      in.token_ids.push_back(i % config.vocab_size);
      in.positions.push_back(i);
    }
    in.query_start = {0, s};
    in.context_len = {s};
    std::vector<int32_t> table(s / 16);
    std::iota(table.begin(), table.end(), 64 * ((1024 + 64) / 16 + 1));
    in.block_tables = {table};
    in.logit_rows = {s - 1};
    const double t = TimeIt(b, 3, 1, [&] { Check(model->Forward(in).status(), "prefill"); });
    // Every layer's matmuls for every token; the embedding is a gather and
    // the lm_head runs for the last row only.
    const double vocab_matrix = double(config.vocab_size) * config.hidden_size;
    const double matmul_flops =
        2.0 * (config.NumParameters() - 2 * vocab_matrix) * s + 2.0 * vocab_matrix;
    const double attn_flops = 4.0 * s * s / 2 * 32 * 128 * config.num_layers;
    Report({"prefill 8k prompt: time", t * 1e3, "ms", 0, "-"});
    Report({"prefill 8k prompt: throughput", (matmul_flops + attn_flops) / t / 1e12, "TFLOP/s",
            gemm_peak, "bf16 GEMM"});
  }
}

void PrintTable() {
  std::printf("\n%-48s %12s %-8s %12s  %-26s %7s\n", "figure", "value", "unit", "limit", "limit is",
              "ratio");
  for (const Row& r : rows) {
    if (r.limit > 0) {
      std::printf("%-48s %12.4g %-8s %12.4g  %-26s %7.3f\n", r.figure.c_str(), r.value,
                  r.unit.c_str(), r.limit, r.limit_name.c_str(), r.value / r.limit);
    } else {
      std::printf("%-48s %12.4g %-8s %12s  %-26s %7s\n", r.figure.c_str(), r.value, r.unit.c_str(),
                  "", "", "");
    }
  }
}

}  // namespace
}  // namespace strata::bench

int main(int argc, char** argv) {
  std::vector<std::string> sections;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (std::find(std::begin(strata::bench::kSections), std::end(strata::bench::kSections), arg) ==
        std::end(strata::bench::kSections)) {
      std::fprintf(stderr,
                   "usage: strata_kernel_bench [SECTION...]\nunknown section '%s'; sections: "
                   "linear decode-attention prefill-attention cluster decode prefill\n",
                   arg.c_str());
      return 2;
    }
    sections.push_back(arg);
  }
  strata::bench::Run(sections);
  return 0;
}

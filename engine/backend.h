// engine::Backend: the operator set the transformer forward pass needs.
//
// The forward pass (engine/model.h) is written once against this interface;
// the CPU reference backend (engine/cpu_backend.h, fp32) and the CUDA backend
// (cuda/cuda_backend.h, bf16 with fp32 accumulation) implement it.
//
// Conventions shared by every operator:
//  - Tensors are row-major and contiguous; shapes are checked and a mismatch
//    returns InvalidArgument naming the operator and the shapes.
//  - Activations and weights use activation_dtype(); token ids, positions,
//    slots and tables are kI32; rope inverse frequencies are kF32.
//  - Operators are enqueued in order on the backend's single stream and may
//    run asynchronously; CopyToHost and Synchronize wait for completion.
//  - Linear weights keep the Hugging Face layout [out_features, in_features].
//  - The fused projections keep their parts side by side in each row:
//      qkv row = [q heads (Hq*D) | k heads (Hkv*D) | v heads (Hkv*D)]
//      gate_up row = [gate (I) | up (I)]
//
// Thread-safety: a Backend instance is used by one thread at a time.
#ifndef STRATA_ENGINE_BACKEND_H_
#define STRATA_ENGINE_BACKEND_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tensor.h"

namespace strata::engine {

// Head geometry of a fused qkv activation.
struct QkvLayout {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int64_t row_width() const { return int64_t{num_q_heads + 2 * num_kv_heads} * head_dim; }
};

// Describes one forward step's tokens for paged attention.
//
// The step's T tokens are grouped by sequence: sequence s owns query rows
// [query_start[s], query_start[s+1]). Its KV cache holds context_len[s]
// tokens once this step's keys are written (so the query token at local index
// j has position context_len[s] - q_len + j and attends to cache positions
// [max(0, pos - sliding_window + 1), pos]). Position p of sequence s lives in
// page block_table[s * max_blocks_per_seq + p / page_size] at offset
// p % page_size.
//
// The device tensors are built by the caller (engine/batch.h); the host
// copies size the launches without a device round trip.
struct AttentionBatch {
  Tensor query_start;   // kI32 [S + 1] (device)
  Tensor context_len;   // kI32 [S] (device)
  Tensor block_table;   // kI32 [S, max_blocks_per_seq] (device)
  int num_seqs = 0;
  int max_blocks_per_seq = 0;
  int max_query_len = 0;    // host copy: largest q_len in this step
  int max_context_len = 0;  // host copy: largest context_len in this step
  int page_size = 0;
  std::vector<int32_t> host_query_start;  // host copy of query_start
  std::vector<int32_t> host_context_len;  // host copy of context_len
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view name() const = 0;
  // The dtype of weights, activations and the KV cache on this backend.
  virtual DType activation_dtype() const = 0;

  // ---- Memory -------------------------------------------------------------
  // Allocates an uninitialised tensor in this backend's memory.
  virtual absl::StatusOr<Tensor> Allocate(DType dtype, std::vector<int64_t> shape) = 0;
  // Copies `count` host elements of `src_dtype` into dst starting at element
  // `dst_offset`, converting to dst's dtype (F32/F16/BF16 -> F32/BF16; I32 ->
  // I32 only). The host buffer may be reused once this returns.
  virtual absl::Status CopyFromHost(const void* src, DType src_dtype, int64_t count, Tensor& dst,
                                    int64_t dst_offset) = 0;
  // Copies the whole tensor to host memory as fp32 (I32 tensors are copied
  // as int32). Waits for preceding work.
  virtual absl::Status CopyToHost(const Tensor& src, void* dst) = 0;
  // Fills with uniform values in [-scale, scale] from a counter-based hash of
  // (seed, element index), so a result does not depend on the backend's
  // thread or block layout: both backends produce the same values up to the
  // rounding of their dtype.
  virtual absl::Status FillRandom(Tensor& t, uint64_t seed, float scale) = 0;
  virtual absl::Status Fill(Tensor& t, float value) = 0;
  // Waits for all enqueued work; reports asynchronous errors.
  virtual absl::Status Synchronize() = 0;

  // ---- Operators ----------------------------------------------------------
  // out[i, :] = table[ids[i], :]. table [V, H], ids kI32 [T], out [T, H].
  // Ids outside [0, V) are an error (checked by the caller on the host).
  virtual absl::Status Gather(const Tensor& table, const Tensor& ids, Tensor& out) = 0;
  // out = x / rms(x) * weight, per row. x, out [T, H]; weight [H].
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // residual += x; out = RmsNorm(residual). All [T, H].
  virtual absl::Status AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps,
                                  Tensor& out) = 0;
  // out[T, N] = x[T, K] . weight[N, K]^T (+ bias[N] if bias is defined).
  virtual absl::Status Linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                              Tensor& out) = 0;
  // Rotates the q and k heads of qkv [T, row_width] in place, rotate-half
  // (GPT-NeoX / Hugging Face Llama) convention: for i < D/2 with
  // angle = positions[t] * inv_freq[i]:
  //   x[i]       = x[i] cos - x[i + D/2] sin
  //   x[i + D/2] = x[i + D/2] cos + x[i] sin
  // positions kI32 [T]; inv_freq kF32 [D/2].
  virtual absl::Status Rope(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                            const Tensor& inv_freq) = 0;
  // out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]. gate_up [T, 2I], out [T, I].
  virtual absl::Status SiluMul(const Tensor& gate_up, Tensor& out) = 0;
  // Writes the k and v heads of qkv [T, row_width] into the paged caches
  // k_cache, v_cache [num_pages, page_size, Hkv, D] at slots[t] =
  // page * page_size + offset. slots kI32 [T].
  virtual absl::Status WriteKv(const Tensor& qkv, const QkvLayout& layout, const Tensor& slots,
                               Tensor& k_cache, Tensor& v_cache) = 0;
  // Causal paged attention for a mixed batch of prefill chunks and decode
  // tokens (see AttentionBatch). Query head h reads KV head
  // h / (Hq / Hkv). out [T, Hq * D]. sliding_window <= 0 means unlimited.
  virtual absl::Status Attention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                                 const Tensor& v_cache, const AttentionBatch& batch, float scale,
                                 int sliding_window, Tensor& out) = 0;
};

#if defined(__CUDACC__)
#define STRATA_HOST_DEVICE __host__ __device__
#else
#define STRATA_HOST_DEVICE
#endif

// Hash used by FillRandom: maps (seed, index) to a uniform float in [-1, 1).
// Host and device code share this definition, so the CPU and CUDA backends
// agree bit for bit before rounding to their dtype.
STRATA_HOST_DEVICE inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
STRATA_HOST_DEVICE inline float HashUniform(uint64_t seed, uint64_t index) {
  const uint64_t h = SplitMix64(seed * 0x100000001b3ULL ^ SplitMix64(index));
  // 24 random bits -> [0, 1) -> [-1, 1)
  return static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace strata::engine

#endif  // STRATA_ENGINE_BACKEND_H_

#include "engine/cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/crc32c.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "engine/cpu_kv_tiering.h"
#include "engine/kmeans.h"
#include "engine/sample_math.h"

namespace strata::engine {
namespace {

absl::Status ShapeError(absl::string_view op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cpu ", op, ": ", what));
}

absl::Status Expect(absl::string_view op, const Tensor& t, DType dtype, int rank,
                    absl::string_view name) {
  if (!t.defined()) return ShapeError(op, absl::StrCat(name, " is undefined"));
  if (t.dtype() != dtype || t.rank() != rank) {
    return ShapeError(op, absl::StrCat(name, " must be ", DTypeName(dtype), " of rank ", rank,
                                       ", got ", t.DebugString()));
  }
  return absl::OkStatus();
}

// The operators other than the KV-cache ones compute on F32 tensors only
// (the backend also stores F8E4M3 caches, which they must not misread).
absl::Status ExpectF32(absl::string_view op, std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    if (t->defined() && t->dtype() != DType::kF32) {
      return ShapeError(op, absl::StrCat("expected F32 tensors, got ", t->DebugString()));
    }
  }
  return absl::OkStatus();
}

// The same summation order for every call, so results do not depend on
// which rows are batched together. Eight partial sums let the compiler
// vectorise without reassociating (no -ffast-math needed).
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[i & 7] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The reference of Backend::SampleTokens for one row: the definition
// written out with a sort (the CUDA kernel reaches the same set with radix
// selects).
SampledToken SampleRow(const float* logits, int64_t vocab, const SamplingRow& row,
                       std::vector<int32_t>& order) {
  namespace sm = sample_math;
  int32_t best = 0;
  uint32_t best_key = sm::Key(logits[0]);
  for (int64_t i = 1; i < vocab; ++i) {
    const uint32_t k = sm::Key(logits[i]);
    if (k > best_key) {
      best_key = k;
      best = static_cast<int32_t>(i);
    }
  }
  const float max_logit = logits[best];
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_z = max_logit + std::log(sum);
  auto result = [&](int32_t id) {
    return SampledToken{id, static_cast<float>(logits[id] - log_z)};
  };
  const SamplingParams& p = row.params;
  if (p.temperature == 0.0f) return result(best);

  // Descending logit, ties by lower id.
  auto before = [&](int32_t a, int32_t b) {
    const uint32_t ka = sm::Key(logits[a]), kb = sm::Key(logits[b]);
    return ka > kb || (ka == kb && a < b);
  };
  const int64_t k = p.top_k > 0 ? std::min<int64_t>(p.top_k, vocab) : vocab;
  order.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) order[i] = static_cast<int32_t>(i);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
  const float inv_t = std::min(1.0f / p.temperature, 3.0e38f);
  auto x_of = [&](int32_t id) { return (logits[id] - max_logit) * inv_t; };
  int64_t keep = k;
  if (p.top_p < 1.0f) {
    uint64_t total = 0;
    for (int64_t j = 0; j < k; ++j) total += sm::Weight(x_of(order[j]));
    const double target = sm::TopPTarget(p.top_p, total);
    // Walk groups of equal logits: the group where the mass crosses the
    // target keeps just enough of its (lowest-id) tokens.
    uint64_t above = 0;
    for (int64_t j = 0; j < k;) {
      const uint32_t key = sm::Key(logits[order[j]]);
      int64_t end = j + 1;
      while (end < k && sm::Key(logits[order[end]]) == key) ++end;
      const uint64_t w = sm::Weight(x_of(order[j]));
      const uint64_t group = w * static_cast<uint64_t>(end - j);
      if (static_cast<double>(above + group) >= target) {
        keep = j + sm::TopPTieCount(target, above, w, end - j);
        break;
      }
      above += group;
      j = end;
    }
  }
  const uint64_t row_key = sm::RowKey(p.seed, row.counter);
  int32_t chosen = -1;
  float chosen_score = 0.0f;
  for (int64_t j = 0; j < keep; ++j) {
    const int32_t id = order[j];
    if (!(x_of(id) >= sm::kRaceFloor)) continue;  // cannot win
    const float score = sm::Score(logits[id], max_logit, inv_t, row_key, static_cast<uint32_t>(id));
    if (chosen < 0 || score > chosen_score || (score == chosen_score && id < chosen)) {
      chosen = id;
      chosen_score = score;
    }
  }
  return result(chosen < 0 ? best : chosen);
}

// The first b.tokens rows of head b.head of page b.page of a paged cache
// ([pages, page_size, kv_heads, head_dim]), packed as [tokens, head_dim].
void GatherHeadRows(const Tensor& cache, const KvBlockCopy& b, std::vector<uint8_t>& rows) {
  const size_t row = static_cast<size_t>(cache.dim(3)) * DTypeSize(cache.dtype());
  const size_t token_stride = row * static_cast<size_t>(cache.dim(2));
  const auto* page = static_cast<const uint8_t*>(cache.data()) +
                     static_cast<size_t>(b.page) * token_stride * static_cast<size_t>(cache.dim(1));
  rows.resize(row * static_cast<size_t>(b.tokens));
  for (int t = 0; t < b.tokens; ++t) {
    std::memcpy(rows.data() + t * row, page + t * token_stride + b.head * row, row);
  }
}

// The inverse: rows packed as [tokens, head_dim] into the page's head.
void ScatterHeadRows(const std::vector<uint8_t>& rows, const KvBlockCopy& b, const Tensor& cache) {
  const size_t row = static_cast<size_t>(cache.dim(3)) * DTypeSize(cache.dtype());
  const size_t token_stride = row * static_cast<size_t>(cache.dim(2));
  auto* page = static_cast<uint8_t*>(cache.data()) +
               static_cast<size_t>(b.page) * token_stride * static_cast<size_t>(cache.dim(1));
  for (int t = 0; t < b.tokens; ++t) {
    std::memcpy(page + t * token_stride + b.head * row, rows.data() + t * row, row);
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) {}

  std::string_view name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::kF32; }

  absl::StatusOr<Tensor> Allocate(DType dtype, std::vector<int64_t> shape) override {
    if (dtype != DType::kF32 && dtype != DType::kI32 && dtype != DType::kF8E4M3) {
      return absl::InvalidArgumentError(
          absl::StrCat("cpu backend stores F32, I32 and F8_E4M3 (KV caches) only, asked for ",
                       DTypeName(dtype)));
    }
    int64_t n = 1;
    for (int64_t d : shape) {
      if (d < 0) return absl::InvalidArgumentError("cpu Allocate: negative dimension");
      n *= d;
    }
    const size_t bytes = std::max<size_t>(64, static_cast<size_t>(n) * DTypeSize(dtype));
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu Allocate: out of memory for ", bytes, " bytes"));
    }
    return Tensor(std::shared_ptr<void>(p, std::free), dtype, std::move(shape));
  }

  absl::Status CopyFromHost(const void* src, DType src_dtype, int64_t count, Tensor& dst,
                            int64_t dst_offset) override {
    if (dst_offset < 0 || count < 0 || dst_offset + count > dst.numel()) {
      return ShapeError("CopyFromHost",
                        absl::StrCat("range [", dst_offset, ", ", dst_offset + count, ") outside ",
                                     dst.DebugString()));
    }
    if (dst.dtype() == DType::kI32) {
      if (src_dtype != DType::kI32)
        return ShapeError("CopyFromHost", "I32 tensors take I32 data only");
      std::memcpy(dst.data_as<int32_t>() + dst_offset, src, count * 4);
      return absl::OkStatus();
    }
    if (dst.dtype() == DType::kF8E4M3) {
      // Widen to fp32 first, then round each value to fp8.
      std::vector<float> wide(static_cast<size_t>(count));
      Tensor staging(std::shared_ptr<void>(wide.data(), [](void*) {}), DType::kF32, {count});
      STRATA_RETURN_IF_ERROR(CopyFromHost(src, src_dtype, count, staging, 0));
      uint8_t* out = dst.data_as<uint8_t>() + dst_offset;
      for (int64_t i = 0; i < count; ++i) out[i] = FloatToFp8E4M3(wide[i]);
      return absl::OkStatus();
    }
    float* out = dst.data_as<float>() + dst_offset;
    switch (src_dtype) {
      case DType::kF32:
        std::memcpy(out, src, count * 4);
        break;
      case DType::kBF16: {
        // Bytes, not uint16_t: a safetensors header need not pad the data
        // that follows it, so a tensor may start at an odd address.
        const auto* in = static_cast<const uint8_t*>(src);
        pool_.ParallelFor(count, 1 << 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            uint16_t bits;
            std::memcpy(&bits, in + 2 * i, 2);
            out[i] = Bf16ToFloat(bits);
          }
        });
        break;
      }
      case DType::kF16: {
        // Bytes, not uint16_t: a safetensors header need not pad the data
        // that follows it, so a tensor may start at an odd address.
        const auto* in = static_cast<const uint8_t*>(src);
        pool_.ParallelFor(count, 1 << 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            uint16_t bits;
            std::memcpy(&bits, in + 2 * i, 2);
            out[i] = Fp16ToFloat(bits);
          }
        });
        break;
      }
      case DType::kF8E4M3: {
        const auto* in = static_cast<const uint8_t*>(src);
        for (int64_t i = 0; i < count; ++i) out[i] = Fp8E4M3ToFloat(in[i]);
        break;
      }
      case DType::kI32:
        return ShapeError("CopyFromHost", "I32 data into an F32 tensor");
    }
    return absl::OkStatus();
  }

  absl::Status CopyToHost(const Tensor& src, void* dst) override {
    if (src.dtype() == DType::kF8E4M3) {
      const uint8_t* in = src.data_as<uint8_t>();
      float* out = static_cast<float*>(dst);
      for (int64_t i = 0; i < src.numel(); ++i) out[i] = Fp8E4M3ToFloat(in[i]);
      return absl::OkStatus();
    }
    std::memcpy(dst, src.data(), src.numel() * 4);
    return absl::OkStatus();
  }

  absl::Status FillRandom(Tensor& t, uint64_t seed, float scale) override {
    if (t.dtype() == DType::kF8E4M3) {
      uint8_t* p = t.data_as<uint8_t>();
      for (int64_t i = 0; i < t.numel(); ++i) {
        p[i] = FloatToFp8E4M3(scale * HashUniform(seed, static_cast<uint64_t>(i)));
      }
      return absl::OkStatus();
    }
    if (t.dtype() != DType::kF32) return ShapeError("FillRandom", "needs an F32 tensor");
    float* p = t.data_as<float>();
    pool_.ParallelFor(t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] = scale * HashUniform(seed, static_cast<uint64_t>(i));
    });
    return absl::OkStatus();
  }

  absl::Status Fill(Tensor& t, float value) override {
    if (t.dtype() == DType::kI32) {
      std::fill_n(t.data_as<int32_t>(), t.numel(), static_cast<int32_t>(value));
    } else if (t.dtype() == DType::kF8E4M3) {
      std::fill_n(t.data_as<uint8_t>(), t.numel(), FloatToFp8E4M3(value));
    } else {
      std::fill_n(t.data_as<float>(), t.numel(), value);
    }
    return absl::OkStatus();
  }

  absl::Status Synchronize() override { return absl::OkStatus(); }

  // Host memory is ordinary memory here, and copies finish before they
  // return: every fence is done at once.
  absl::StatusOr<HostBuffer> AllocateHost(size_t bytes) override {
    const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu AllocateHost: out of memory for ", bytes, " bytes"));
    }
    return HostBuffer{std::shared_ptr<void>(p, std::free), bytes};
  }
  absl::StatusOr<CopyFence> CopyRowsToHost(std::span<const Tensor> tensors,
                                           std::span<const RowCopy> rows,
                                           const HostBuffer& host) override {
    STRATA_RETURN_IF_ERROR(ValidateRowCopies("CopyRowsToHost", tensors, rows, host));
    for (const RowCopy& c : rows) {
      const Tensor& t = tensors[c.tensor];
      const size_t row_bytes = t.nbytes() / t.dim(0);
      std::memcpy(host.data() + c.host_offset,
                  static_cast<const char*>(t.data()) + c.row * row_bytes, row_bytes);
    }
    return kFenceDone;
  }
  absl::StatusOr<CopyFence> CopyRowsFromHost(const HostBuffer& host, std::span<const RowCopy> rows,
                                             std::span<const Tensor> tensors) override {
    STRATA_RETURN_IF_ERROR(ValidateRowCopies("CopyRowsFromHost", tensors, rows, host));
    for (const RowCopy& c : rows) {
      const Tensor& t = tensors[c.tensor];
      const size_t row_bytes = t.nbytes() / t.dim(0);
      std::memcpy(static_cast<char*>(t.data()) + c.row * row_bytes, host.data() + c.host_offset,
                  row_bytes);
    }
    return kFenceDone;
  }
  absl::Status ChecksumRows(std::span<const Tensor> tensors, std::span<const RowCopy> rows,
                            std::span<uint32_t> crcs) override {
    STRATA_RETURN_IF_ERROR(ValidateChecksumRows("ChecksumRows", tensors, rows, crcs));
    for (size_t i = 0; i < rows.size(); ++i) {
      const Tensor& t = tensors[rows[i].tensor];
      const size_t row_bytes = t.nbytes() / t.dim(0);
      crcs[i] = Crc32c(static_cast<const char*>(t.data()) + rows[i].row * row_bytes, row_bytes);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<CopyFence> EncodeBlocksToHost(KvCodecKind codec, std::span<const Tensor> k_caches,
                                               std::span<const Tensor> v_caches,
                                               std::span<const KvBlockCopy> blocks,
                                               const HostBuffer& host) override {
    STRATA_RETURN_IF_ERROR(
        ValidateKvBlockCopies("EncodeBlocksToHost", k_caches, v_caches, blocks, host));
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<KvCodec> coder, KvCodec::Create(codec));
    std::vector<uint8_t> k_rows, v_rows;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const KvBlockCopy& b = blocks[i];
      const Tensor& k = k_caches[b.layer];
      const int head_dim = static_cast<int>(k.dim(3));
      const size_t want = coder->EncodedBytes(b.tokens, head_dim, k.dtype());
      if (want != static_cast<size_t>(b.bytes)) {
        return absl::InvalidArgumentError(absl::StrCat("EncodeBlocksToHost: block ", i,
                                                       " is given ", b.bytes,
                                                       " host bytes; it encodes to ", want));
      }
      GatherHeadRows(k, b, k_rows);
      GatherHeadRows(v_caches[b.layer], b, v_rows);
      STRATA_RETURN_IF_ERROR(coder->Encode(
          k_rows.data(), v_rows.data(), k.dtype(), b.tokens, head_dim,
          std::span<uint8_t>(host.data() + b.host_offset, static_cast<size_t>(b.bytes))));
    }
    return kFenceDone;
  }
  absl::Status DecodeBlocksFromHost(const HostBuffer& host, std::span<const KvBlockCopy> blocks,
                                    std::span<const Tensor> k_caches,
                                    std::span<const Tensor> v_caches) override {
    STRATA_RETURN_IF_ERROR(
        ValidateKvBlockCopies("DecodeBlocksFromHost", k_caches, v_caches, blocks, host));
    std::vector<uint8_t> k_rows, v_rows;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const KvBlockCopy& b = blocks[i];
      const Tensor& k = k_caches[b.layer];
      const std::span<const uint8_t> in(host.data() + b.host_offset, static_cast<size_t>(b.bytes));
      const size_t declared = KvCodec::DeclaredBytes(in);
      absl::StatusOr<KvBlockInfo> info = declared == 0 ? absl::DataLossError("KV block: truncated")
                                                       : KvCodec::Inspect(in.first(declared));
      if (info.ok() && (info->tokens != b.tokens || info->head_dim != k.dim(3))) {
        info = absl::DataLossError(absl::StrCat("KV block: ", info->tokens, " tokens of head_dim ",
                                                info->head_dim, ", expected ", b.tokens, " of ",
                                                k.dim(3)));
      }
      if (!info.ok()) {
        return absl::DataLossError(absl::StrCat("DecodeBlocksFromHost: block ", i, " (layer ",
                                                b.layer, ", page ", b.page, ", head ", b.head,
                                                "): ", info.status().message()));
      }
      const size_t row_bytes = static_cast<size_t>(k.dim(3)) * DTypeSize(k.dtype());
      k_rows.resize(row_bytes * static_cast<size_t>(b.tokens));
      v_rows.resize(k_rows.size());
      STRATA_RETURN_IF_ERROR(
          KvCodec::Decode(in.first(declared), k.dtype(), k_rows.data(), v_rows.data(), nullptr));
      ScatterHeadRows(k_rows, b, k_caches[b.layer]);
      ScatterHeadRows(v_rows, b, v_caches[b.layer]);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<bool> FenceDone(CopyFence) override { return true; }
  absl::Status WaitFence(CopyFence) override { return absl::OkStatus(); }
  absl::Status ComputeAfterFence(CopyFence) override { return absl::OkStatus(); }

  absl::Status Gather(const Tensor& table, const Tensor& ids, Tensor& out) override {
    if (auto s = Expect("Gather", table, DType::kF32, 2, "table"); !s.ok()) return s;
    if (auto s = Expect("Gather", ids, DType::kI32, 1, "ids"); !s.ok()) return s;
    STRATA_RETURN_IF_ERROR(ExpectF32("Gather", {&out}));
    const int64_t rows = ids.dim(0), width = table.dim(1);
    if (out.numel() != rows * width) return ShapeError("Gather", "out has the wrong size");
    const int32_t* id = ids.data_as<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      if (id[r] < 0 || id[r] >= table.dim(0)) {
        return ShapeError("Gather", absl::StrCat("id ", id[r], " outside [0, ", table.dim(0), ")"));
      }
      std::memcpy(out.data_as<float>() + r * width, table.data_as<float>() + id[r] * width,
                  width * 4);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    STRATA_RETURN_IF_ERROR(ExpectF32("RmsNorm", {&x, &weight, &out}));
    const int64_t width = weight.numel();
    if (x.numel() % width != 0 || out.numel() != x.numel())
      return ShapeError("RmsNorm", "shape mismatch");
    const int64_t rows = x.numel() / width;
    pool_.ParallelFor(rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        NormRow(x.data_as<float>() + r * width, weight.data_as<float>(), width, eps,
                out.data_as<float>() + r * width);
      }
    });
    return absl::OkStatus();
  }

  absl::Status AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps,
                          Tensor& out) override {
    STRATA_RETURN_IF_ERROR(ExpectF32("AddRmsNorm", {&residual, &x, &weight, &out}));
    const int64_t width = weight.numel();
    if (residual.numel() != x.numel() || out.numel() != x.numel() || x.numel() % width != 0) {
      return ShapeError("AddRmsNorm", "shape mismatch");
    }
    const int64_t rows = x.numel() / width;
    pool_.ParallelFor(rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        float* res = residual.data_as<float>() + r * width;
        const float* in = x.data_as<float>() + r * width;
        for (int64_t i = 0; i < width; ++i) res[i] += in[i];
        NormRow(res, weight.data_as<float>(), width, eps, out.data_as<float>() + r * width);
      }
    });
    return absl::OkStatus();
  }

  absl::Status Linear(const Tensor& x, const Tensor& weight, const Tensor& bias,
                      Tensor& out) override {
    if (auto s = Expect("Linear", weight, DType::kF32, 2, "weight"); !s.ok()) return s;
    STRATA_RETURN_IF_ERROR(ExpectF32("Linear", {&x, &bias, &out}));
    const int64_t n = weight.dim(0), k = weight.dim(1);
    if (x.numel() % k != 0) {
      return ShapeError("Linear",
                        absl::StrCat("x ", x.DebugString(), " vs weight ", weight.DebugString()));
    }
    const int64_t t = x.numel() / k;
    if (out.numel() != t * n) return ShapeError("Linear", "out has the wrong size");
    if (bias.defined() && bias.numel() != n) return ShapeError("Linear", "bias has the wrong size");
    const float* xp = x.data_as<float>();
    const float* wp = weight.data_as<float>();
    const float* bp = bias.defined() ? bias.data_as<float>() : nullptr;
    float* op = out.data_as<float>();
    // Columns in blocks so each weight row is read once per block of tokens.
    pool_.ParallelFor(n, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)),
                      [&](int64_t b, int64_t e) {
                        for (int64_t j = b; j < e; ++j) {
                          const float* w = wp + j * k;
                          const float add = bp ? bp[j] : 0.0f;
                          for (int64_t r = 0; r < t; ++r)
                            op[r * n + j] = Dot(xp + r * k, w, k) + add;
                        }
                      });
    return absl::OkStatus();
  }

  absl::Status Rope(Tensor& qkv, const QkvLayout& layout, const Tensor& positions,
                    const Tensor& inv_freq) override {
    STRATA_RETURN_IF_ERROR(ExpectF32("Rope", {&qkv, &inv_freq}));
    const int64_t width = layout.row_width();
    const int d = layout.head_dim, half = d / 2;
    if (qkv.numel() % width != 0) return ShapeError("Rope", "qkv width mismatch");
    const int64_t t = qkv.numel() / width;
    if (positions.numel() != t || inv_freq.numel() != half || inv_freq.dtype() != DType::kF32) {
      return ShapeError("Rope", "positions or inv_freq size mismatch");
    }
    const int heads = layout.num_q_heads + layout.num_kv_heads;
    pool_.ParallelFor(t, 4, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float pos = static_cast<float>(positions.data_as<int32_t>()[r]);
        for (int i = 0; i < half; ++i) {
          const float angle = pos * inv_freq.data_as<float>()[i];
          const float c = std::cos(angle), s = std::sin(angle);
          for (int h = 0; h < heads; ++h) {
            float* x = qkv.data_as<float>() + r * width + int64_t{h} * d;
            const float x0 = x[i], x1 = x[i + half];
            x[i] = x0 * c - x1 * s;
            x[i + half] = x1 * c + x0 * s;
          }
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status SiluMul(const Tensor& gate_up, Tensor& out) override {
    STRATA_RETURN_IF_ERROR(ExpectF32("SiluMul", {&gate_up, &out}));
    const int64_t inter = out.dim(-1);
    if (gate_up.numel() != 2 * out.numel()) return ShapeError("SiluMul", "shape mismatch");
    const int64_t t = out.numel() / inter;
    pool_.ParallelFor(t, 4, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* g = gate_up.data_as<float>() + r * 2 * inter;
        float* o = out.data_as<float>() + r * inter;
        for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * g[inter + i];
      }
    });
    return absl::OkStatus();
  }

  absl::Status WriteKv(const Tensor& qkv, const QkvLayout& layout, const Tensor& slots,
                       Tensor& k_cache, Tensor& v_cache) override {
    STRATA_RETURN_IF_ERROR(CheckCache("WriteKv", k_cache, v_cache, &layout));
    STRATA_RETURN_IF_ERROR(ExpectF32("WriteKv", {&qkv}));
    const int64_t width = layout.row_width();
    const int64_t kv_width = int64_t{layout.num_kv_heads} * layout.head_dim;
    const int64_t t = qkv.numel() / width;
    if (slots.numel() != t) return ShapeError("WriteKv", "slots size mismatch");
    const int64_t capacity = k_cache.numel() / kv_width;
    const int64_t q_width = int64_t{layout.num_q_heads} * layout.head_dim;
    for (int64_t r = 0; r < t; ++r) {
      const int32_t slot = slots.data_as<int32_t>()[r];
      if (slot < 0 || slot >= capacity) {
        return ShapeError("WriteKv",
                          absl::StrCat("slot ", slot, " outside the cache of ", capacity));
      }
      const float* row = qkv.data_as<float>() + r * width;
      StoreCacheValues(row + q_width, kv_width, k_cache, slot * kv_width);
      StoreCacheValues(row + q_width + kv_width, kv_width, v_cache, slot * kv_width);
    }
    return absl::OkStatus();
  }

  absl::Status Attention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                         const Tensor& v_cache, const AttentionBatch& batch, float scale,
                         int sliding_window, Tensor& out) override {
    STRATA_RETURN_IF_ERROR(CheckCache("Attention", k_cache, v_cache, &layout));
    STRATA_RETURN_IF_ERROR(ExpectF32("Attention", {&qkv, &out}));
    const int64_t width = layout.row_width();
    const int d = layout.head_dim;
    const int hq = layout.num_q_heads, hkv = layout.num_kv_heads, group = hq / hkv;
    const int64_t t = qkv.numel() / width;
    if (out.numel() != t * hq * d) return ShapeError("Attention", "out size mismatch");
    if (static_cast<int>(batch.host_query_start.size()) != batch.num_seqs + 1 ||
        batch.host_query_start.back() != t) {
      return ShapeError("Attention", "query_start does not cover the batch");
    }
    // Which sequence each row belongs to.
    std::vector<int32_t> row_seq(t);
    for (int s = 0; s < batch.num_seqs; ++s) {
      for (int32_t r = batch.host_query_start[s]; r < batch.host_query_start[s + 1]; ++r)
        row_seq[r] = s;
    }
    const int32_t* table = batch.block_table.data_as<int32_t>();
    pool_.ParallelFor(t * hq, 1, [&](int64_t b, int64_t e) {
      std::vector<float> scores;
      std::vector<float> row_buffer(d);
      for (int64_t item = b; item < e; ++item) {
        const int64_t r = item / hq;
        const int h = static_cast<int>(item % hq);
        const int s = row_seq[r];
        const int q_len = batch.host_query_start[s + 1] - batch.host_query_start[s];
        const int pos =
            batch.host_context_len[s] - q_len + static_cast<int>(r - batch.host_query_start[s]);
        const int first = sliding_window > 0 ? std::max(0, pos - sliding_window + 1) : 0;
        const float* q = qkv.data_as<float>() + r * width + int64_t{h} * d;
        const int kvh = h / group;
        scores.resize(pos - first + 1);
        float max_score = -std::numeric_limits<float>::infinity();
        for (int p = first; p <= pos; ++p) {
          const int64_t slot =
              int64_t{table[s * batch.max_blocks_per_seq + p / batch.page_size]} * batch.page_size +
              p % batch.page_size;
          const float sc = Dot(q, ReadCacheRow(k_cache, slot, kvh, row_buffer.data()), d) * scale;
          scores[p - first] = sc;
          max_score = std::max(max_score, sc);
        }
        float denom = 0;
        for (float& sc : scores) {
          sc = std::exp(sc - max_score);
          denom += sc;
        }
        float* o = out.data_as<float>() + r * hq * d + int64_t{h} * d;
        std::fill_n(o, d, 0.0f);
        for (int p = first; p <= pos; ++p) {
          const int64_t slot =
              int64_t{table[s * batch.max_blocks_per_seq + p / batch.page_size]} * batch.page_size +
              p % batch.page_size;
          const float* v = ReadCacheRow(v_cache, slot, kvh, row_buffer.data());
          const float w = scores[p - first] / denom;
          for (int i = 0; i < d; ++i) o[i] += w * v[i];
        }
      }
    });
    return absl::OkStatus();
  }

  // ---- Sparse decoding -----------------------------------------------------
  absl::Status ClusterKeys(Tensor& k_cache, Tensor& v_cache, const SequenceRange& range,
                           int num_clusters, int iterations, int first_block, Tensor& centroids,
                           Tensor& extents, Tensor* order_out, ClusterRows rows) override {
    constexpr char kOp[] = "ClusterKeys";
    STRATA_RETURN_IF_ERROR(CheckCache(kOp, k_cache, v_cache));
    const int hkv = static_cast<int>(k_cache.dim(2)), d = static_cast<int>(k_cache.dim(3));
    STRATA_RETURN_IF_ERROR(CheckRange(kOp, range, k_cache));
    if (num_clusters < 1 || num_clusters > range.count || iterations < 1) {
      return ShapeError(kOp, absl::StrCat("need 1 <= num_clusters (", num_clusters, ") <= count (",
                                          range.count, ") and iterations >= 1"));
    }
    STRATA_RETURN_IF_ERROR(
        CheckPool(kOp, centroids, DType::kF32, hkv, d, first_block + num_clusters, "centroids"));
    STRATA_RETURN_IF_ERROR(
        CheckPool(kOp, extents, DType::kI32, hkv, 2, first_block + num_clusters, "extents"));
    const int64_t max_blocks = centroids.dim(1);
    if (extents.dim(1) != max_blocks)
      return ShapeError(kOp, "centroids and extents differ in max_blocks");
    if (order_out != nullptr) STRATA_RETURN_IF_ERROR(CheckOrder(kOp, *order_out, hkv, range.count));
    if (rows == ClusterRows::kLeave && order_out == nullptr) {
      return ShapeError(kOp, "leaving the rows in place needs an order to return");
    }
    std::vector<int64_t> slots(range.count);
    for (int t = 0; t < range.count; ++t) slots[t] = Slot(range, range.begin + t);
    std::vector<float> keys(static_cast<size_t>(range.count) * d);
    // The reorder moves stored rows as bytes, so fp8 rows are not re-rounded.
    const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(k_cache.dtype());
    std::vector<uint8_t> k_rows(range.count * row_bytes), v_rows(range.count * row_bytes);
    std::vector<float> row(d);
    for (int h = 0; h < hkv; ++h) {
      for (int t = 0; t < range.count; ++t) {
        std::memcpy(&keys[int64_t{t} * d], ReadCacheRow(k_cache, slots[t], h, row.data()), d * 4);
      }
      auto result = KMeansCosine(keys, d, num_clusters, iterations, &pool_);
      if (!result.ok()) return result.status();
      // Reorder: cluster-major, ascending t within a cluster (a stable sort).
      std::vector<int32_t> order(range.count);
      for (int t = 0; t < range.count; ++t) order[t] = t;
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return result->assignment[a] < result->assignment[b];
      });
      if (rows == ClusterRows::kReorder) {
        ReorderHead(k_cache, v_cache, slots, h, order.data(), k_rows, v_rows);
      }
      if (order_out != nullptr) {
        std::copy(order.begin(), order.end(),
                  order_out->data_as<int32_t>() + int64_t{h} * range.count);
      }
      int32_t start = range.begin;
      for (int j = 0; j < num_clusters; ++j) {
        const int64_t block = int64_t{h} * max_blocks + first_block + j;
        std::memcpy(centroids.data_as<float>() + block * d, &result->centroids[int64_t{j} * d],
                    d * 4);
        extents.data_as<int32_t>()[block * 2] = start;
        extents.data_as<int32_t>()[block * 2 + 1] = result->sizes[j];
        start += result->sizes[j];
      }
    }
    return absl::OkStatus();
  }

  absl::Status ReorderKeys(Tensor& k_cache, Tensor& v_cache, const SequenceRange& range,
                           const Tensor& order) override {
    constexpr char kOp[] = "ReorderKeys";
    STRATA_RETURN_IF_ERROR(CheckCache(kOp, k_cache, v_cache));
    const int hkv = static_cast<int>(k_cache.dim(2)), d = static_cast<int>(k_cache.dim(3));
    STRATA_RETURN_IF_ERROR(CheckRange(kOp, range, k_cache));
    STRATA_RETURN_IF_ERROR(CheckOrder(kOp, order, hkv, range.count));
    // Every head's order is checked before any row moves.
    std::vector<uint8_t> seen(range.count);
    for (int h = 0; h < hkv; ++h) {
      std::fill(seen.begin(), seen.end(), 0);
      const int32_t* o = order.data_as<int32_t>() + int64_t{h} * range.count;
      for (int i = 0; i < range.count; ++i) {
        if (o[i] < 0 || o[i] >= range.count || seen[o[i]]++ != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(kOp, ": head ", h, "'s order is not a permutation of [0, ", range.count,
                           "): entry ", i, " is ", o[i]));
        }
      }
    }
    std::vector<int64_t> slots(range.count);
    for (int t = 0; t < range.count; ++t) slots[t] = Slot(range, range.begin + t);
    const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(k_cache.dtype());
    std::vector<uint8_t> k_rows(range.count * row_bytes), v_rows(range.count * row_bytes);
    for (int h = 0; h < hkv; ++h) {
      ReorderHead(k_cache, v_cache, slots, h, order.data_as<int32_t>() + int64_t{h} * range.count,
                  k_rows, v_rows);
    }
    return absl::OkStatus();
  }

  absl::Status KeyBounds(const Tensor& k_cache, const SequenceRange& range, int block_tokens,
                         int first_block, Tensor& lo, Tensor& hi, Tensor& extents) override {
    constexpr char kOp[] = "KeyBounds";
    STRATA_RETURN_IF_ERROR(CheckCache(kOp, k_cache, k_cache));
    const int hkv = static_cast<int>(k_cache.dim(2)), d = static_cast<int>(k_cache.dim(3));
    STRATA_RETURN_IF_ERROR(CheckRange(kOp, range, k_cache));
    if (block_tokens < 1 || range.count % block_tokens != 0) {
      return ShapeError(kOp, "count must be a positive multiple of block_tokens");
    }
    const int blocks = range.count / block_tokens;
    STRATA_RETURN_IF_ERROR(CheckPool(kOp, lo, DType::kF32, hkv, d, first_block + blocks, "lo"));
    STRATA_RETURN_IF_ERROR(CheckPool(kOp, hi, DType::kF32, hkv, d, first_block + blocks, "hi"));
    STRATA_RETURN_IF_ERROR(
        CheckPool(kOp, extents, DType::kI32, hkv, 2, first_block + blocks, "extents"));
    const int64_t max_blocks = lo.dim(1);
    if (hi.dim(1) != max_blocks || extents.dim(1) != max_blocks) {
      return ShapeError(kOp, "lo, hi and extents differ in max_blocks");
    }
    std::vector<float> row(d);
    for (int h = 0; h < hkv; ++h) {
      for (int j = 0; j < blocks; ++j) {
        const int64_t block = int64_t{h} * max_blocks + first_block + j;
        float* l = lo.data_as<float>() + block * d;
        float* u = hi.data_as<float>() + block * d;
        std::fill_n(l, d, std::numeric_limits<float>::infinity());
        std::fill_n(u, d, -std::numeric_limits<float>::infinity());
        const int first = range.begin + j * block_tokens;
        for (int t = first; t < first + block_tokens; ++t) {
          const float* k = ReadCacheRow(k_cache, Slot(range, t), h, row.data());
          for (int i = 0; i < d; ++i) {
            l[i] = std::min(l[i], k[i]);
            u[i] = std::max(u[i], k[i]);
          }
        }
        extents.data_as<int32_t>()[block * 2] = first;
        extents.data_as<int32_t>()[block * 2 + 1] = block_tokens;
      }
    }
    return absl::OkStatus();
  }

  absl::Status ScoreBlocks(const Tensor& qkv, const QkvLayout& layout, const SparsePlan& plan,
                           int entry_begin, int entry_end, BlockScoring scoring,
                           const Tensor& summary_a, const Tensor& summary_b,
                           Tensor& scores) override {
    constexpr char kOp[] = "ScoreBlocks";
    const int hkv = layout.num_kv_heads, d = layout.head_dim, group = layout.num_q_heads / hkv;
    if (entry_begin < 0 || entry_begin > entry_end || entry_end > plan.num_entries) {
      return ShapeError(kOp, "entry range outside the plan");
    }
    if (summary_a.dtype() != DType::kF32 || summary_a.rank() != 4 || summary_a.dim(1) != hkv ||
        summary_a.dim(2) != plan.max_blocks || summary_a.dim(3) != d ||
        (scoring == BlockScoring::kKeyBounds && summary_b.shape() != summary_a.shape())) {
      return ShapeError(kOp, "summaries must be F32 [slots, Hkv, max_blocks, D]");
    }
    if (scores.dtype() != DType::kF32 ||
        scores.numel() < int64_t{plan.num_entries} * hkv * plan.max_blocks) {
      return ShapeError(kOp, "scores must be F32 [P, Hkv, max_blocks]");
    }
    const int64_t width = layout.row_width();
    for (int i = entry_begin; i < entry_end; ++i) {
      const int64_t slot = plan.host(i, kPlanSlot);
      if (slot >= summary_a.dim(0)) return ShapeError(kOp, "slot outside the summaries");
      const float* q_row = qkv.data_as<float>() + int64_t{plan.host(i, kPlanRow)} * width;
      for (int h = 0; h < hkv; ++h) {
        for (int b = 0; b < plan.host(i, kPlanNumBlocks); ++b) {
          const int64_t block = (slot * hkv + h) * plan.max_blocks + b;
          const float* a = summary_a.data_as<float>() + block * d;
          float score = 0.0f;
          for (int g = 0; g < group; ++g) {
            const float* q = q_row + int64_t{h * group + g} * d;
            if (scoring == BlockScoring::kCentroid) {
              score += Dot(q, a, d);
            } else {
              const float* u = summary_b.data_as<float>() + block * d;
              float bound = 0.0f;
              for (int j = 0; j < d; ++j) bound += std::max(q[j] * a[j], q[j] * u[j]);
              score += bound;
            }
          }
          scores.data_as<float>()[(int64_t{i} * hkv + h) * plan.max_blocks + b] = score;
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status SelectTokens(const Tensor& scores, const Tensor& extents,
                            SparsePlan& plan) override {
    constexpr char kOp[] = "SelectTokens";
    if (extents.dtype() != DType::kI32 || extents.rank() != 4 ||
        extents.dim(2) != plan.max_blocks || extents.dim(3) != 2) {
      return ShapeError(kOp, "extents must be I32 [slots, Hkv, max_blocks, 2]");
    }
    const int hkv = static_cast<int>(extents.dim(1));
    if (scores.numel() < int64_t{plan.num_entries} * hkv * plan.max_blocks) {
      return ShapeError(kOp, "scores too small for the plan");
    }
    for (int i = 0; i < plan.num_entries; ++i) {
      const int64_t slot = plan.host(i, kPlanSlot);
      if (slot >= extents.dim(0)) return ShapeError(kOp, "slot outside the extents");
      const int blocks = plan.host(i, kPlanNumBlocks);
      for (int h = 0; h < hkv; ++h) {
        int32_t* out = plan.key_index.data_as<int32_t>() + (int64_t{i} * hkv + h) * plan.max_keys;
        int n = 0;
        for (int t = 0; t < plan.host(i, kPlanSinkEnd); ++t) out[n++] = t;
        const float* sc = scores.data_as<float>() + (int64_t{i} * hkv + h) * plan.max_blocks;
        const int32_t* ext = extents.data_as<int32_t>() + (slot * hkv + h) * plan.max_blocks * 2;
        std::vector<int32_t> order(blocks);
        for (int b = 0; b < blocks; ++b) order[b] = b;
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t a, int32_t b) { return sc[a] > sc[b]; });
        int left = plan.host(i, kPlanBudget);
        for (int32_t b : order) {
          if (left <= 0) break;
          const int take = std::min(left, ext[b * 2 + 1]);
          for (int t = 0; t < take; ++t) out[n++] = ext[b * 2] + t;
          left -= take;
        }
        for (int t = plan.host(i, kPlanTailBegin); t < plan.host(i, kPlanContextLen); ++t)
          out[n++] = t;
        plan.key_count.data_as<int32_t>()[int64_t{i} * hkv + h] = n;
      }
    }
    return absl::OkStatus();
  }

  absl::Status SparseAttention(const Tensor& qkv, const QkvLayout& layout, const Tensor& k_cache,
                               const Tensor& v_cache, const AttentionBatch& batch,
                               const SparsePlan& plan, float scale, Tensor& out) override {
    STRATA_RETURN_IF_ERROR(CheckCache("SparseAttention", k_cache, v_cache, &layout));
    STRATA_RETURN_IF_ERROR(ExpectF32("SparseAttention", {&qkv, &out}));
    const int d = layout.head_dim;
    const int hq = layout.num_q_heads, hkv = layout.num_kv_heads, group = hq / hkv;
    const int64_t width = layout.row_width();
    const int32_t* table = batch.block_table.data_as<int32_t>();
    pool_.ParallelFor(int64_t{plan.num_entries} * hq, 1, [&](int64_t b, int64_t e) {
      std::vector<float> scores;
      std::vector<float> row_buffer(d);
      for (int64_t item = b; item < e; ++item) {
        const int i = static_cast<int>(item / hq);
        const int h = static_cast<int>(item % hq), kvh = h / group;
        const int64_t row = plan.host(i, kPlanRow);
        const int32_t* seq_table =
            table + int64_t{plan.host(i, kPlanSeq)} * batch.max_blocks_per_seq;
        const int64_t list = int64_t{i} * hkv + kvh;
        const int32_t* keys = plan.key_index.data_as<int32_t>() + list * plan.max_keys;
        const int n = plan.key_count.data_as<int32_t>()[list];
        const float* q = qkv.data_as<float>() + row * width + int64_t{h} * d;
        auto slot_of = [&](int32_t index) {
          if (index <= -2) return int64_t{-2} - index;  // a recalled block's cache slot
          return int64_t{seq_table[index / batch.page_size]} * batch.page_size +
                 index % batch.page_size;
        };
        scores.resize(n);
        float max_score = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n; ++j) {
          scores[j] =
              Dot(q, ReadCacheRow(k_cache, slot_of(keys[j]), kvh, row_buffer.data()), d) * scale;
          max_score = std::max(max_score, scores[j]);
        }
        float denom = 0;
        for (float& sc : scores) {
          sc = std::exp(sc - max_score);
          denom += sc;
        }
        float* o = out.data_as<float>() + row * hq * d + int64_t{h} * d;
        std::fill_n(o, d, 0.0f);
        for (int j = 0; j < n; ++j) {
          const float* v = ReadCacheRow(v_cache, slot_of(keys[j]), kvh, row_buffer.data());
          const float w = scores[j] / denom;
          for (int x = 0; x < d; ++x) o[x] += w * v[x];
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache,
                             const SequenceRange& range, const Tensor& extents, int first_block,
                             int num_blocks, int block_stride, KvCodecKind codec,
                             const HostBuffer& host, int64_t region_unit, int64_t units_per_head,
                             TierTables& slot_tables) override {
    return cpu_tiering::OffloadBlocks(k_cache, v_cache, range, extents, first_block, num_blocks,
                                      block_stride, codec, host, region_unit, units_per_head,
                                      slot_tables);
  }
  absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, const AttentionBatch&,
                            SparsePlan& plan, const Tensor& extents, TierTables& tables,
                            TierRing& ring) override {
    const auto start = std::chrono::steady_clock::now();
    absl::Status recalled =
        cpu_tiering::RecallBlocks(k_cache, v_cache, plan, extents, tables, ring);
    if (recalled.ok()) {
      const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::steady_clock::now() - start)
                             .count();
      ring.stats.data_as<int32_t>()[kStatRecallMicros] += static_cast<int32_t>((ns + 999) / 1000);
    }
    return recalled;
  }

  absl::Status SampleTokens(const Tensor& logits, const SamplingTable& sampling, Tensor& token_ids,
                            Tensor& logprobs) override {
    STRATA_RETURN_IF_ERROR(ValidateSampleTokens("cpu SampleTokens", logits, DType::kF32, sampling,
                                                token_ids, logprobs));
    const int64_t rows = logits.dim(0), vocab = logits.dim(1);
    const float* l = logits.data_as<float>();
    int32_t* ids = token_ids.data_as<int32_t>();
    float* lp = logprobs.data_as<float>();
    pool_.ParallelFor(rows, 1, [&](int64_t b, int64_t e) {
      std::vector<int32_t> order;
      for (int64_t r = b; r < e; ++r) {
        const SampledToken t =
            SampleRow(l + r * vocab, vocab, sampling.row(static_cast<int>(r)), order);
        ids[r] = t.id;
        lp[r] = t.logprob;
      }
    });
    return absl::OkStatus();
  }

 private:
  // KV caches [pages, page_size, Hkv, D] are F32 or F8E4M3; fp8 rows are
  // widened on every read and rounded once on write, exactly as the CUDA
  // backend does, so both see the same values.
  //
  // The stored row of KV head h at `slot`.
  static uint8_t* CacheRowBytes(const Tensor& cache, int64_t slot, int h) {
    return cache.data_as<uint8_t>() +
           (slot * cache.dim(2) + h) * cache.dim(3) * DTypeSize(cache.dtype());
  }
  // The row as fp32: the cache itself (F32) or `scratch` (D floats) holding it.
  static const float* ReadCacheRow(const Tensor& cache, int64_t slot, int h, float* scratch) {
    if (cache.dtype() == DType::kF32) {
      return cache.data_as<float>() + (slot * cache.dim(2) + h) * cache.dim(3);
    }
    const uint8_t* in = CacheRowBytes(cache, slot, h);
    for (int64_t i = 0; i < cache.dim(3); ++i) scratch[i] = Fp8E4M3ToFloat(in[i]);
    return scratch;
  }
  // Stores n values at element `offset` of the cache.
  static void StoreCacheValues(const float* values, int64_t n, Tensor& cache, int64_t offset) {
    if (cache.dtype() == DType::kF32) {
      std::memcpy(cache.data_as<float>() + offset, values, n * 4);
      return;
    }
    uint8_t* out = cache.data_as<uint8_t>() + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = FloatToFp8E4M3(values[i]);
  }
  static int64_t Slot(const SequenceRange& range, int32_t index) {
    return int64_t{range.block_table.data_as<int32_t>()[index / range.page_size]} *
               range.page_size +
           index % range.page_size;
  }
  // The caches' dtype and shape, and with a layout their (Hkv, D).
  static absl::Status CheckCache(absl::string_view op, const Tensor& k, const Tensor& v,
                                 const QkvLayout* layout = nullptr) {
    if (!k.defined() || !v.defined() || (k.dtype() != DType::kF32 && k.dtype() != DType::kF8E4M3) ||
        k.rank() != 4 || v.shape() != k.shape() || v.dtype() != k.dtype()) {
      return ShapeError(op, absl::StrCat("caches must be F32 or F8_E4M3 [pages, page_size, Hkv, D] "
                                         "of one dtype, got ",
                                         k.DebugString(), " and ", v.DebugString()));
    }
    if (layout != nullptr && (k.dim(2) != layout->num_kv_heads || k.dim(3) != layout->head_dim)) {
      return ShapeError(op, absl::StrCat("caches ", k.DebugString(), " do not match Hkv ",
                                         layout->num_kv_heads, ", D ", layout->head_dim));
    }
    return absl::OkStatus();
  }
  static absl::Status CheckRange(absl::string_view op, const SequenceRange& range,
                                 const Tensor& cache) {
    if (range.page_size != cache.dim(1) || range.begin < 0 || range.count < 1 ||
        range.block_table.dtype() != DType::kI32 ||
        (int64_t{range.begin} + range.count + range.page_size - 1) / range.page_size >
            range.block_table.numel()) {
      return ShapeError(op, "token range outside the block table or page size mismatch");
    }
    const int32_t* table = range.block_table.data_as<int32_t>();
    for (int64_t p = range.begin / range.page_size;
         p < (int64_t{range.begin} + range.count + range.page_size - 1) / range.page_size; ++p) {
      if (table[p] < 0 || table[p] >= cache.dim(0)) return ShapeError(op, "page outside the cache");
    }
    return absl::OkStatus();
  }
  // A reorder's order: kI32 [hkv, count].
  static absl::Status CheckOrder(absl::string_view op, const Tensor& order, int hkv, int count) {
    if (!order.defined() || order.dtype() != DType::kI32 ||
        order.shape() != std::vector<int64_t>{hkv, count}) {
      return ShapeError(op, absl::StrCat("order must be I32 [", hkv, ", ", count, "], got ",
                                         order.DebugString()));
    }
    return absl::OkStatus();
  }
  // Head h's rows at slots[0..n) become the rows that were at
  // slots[order[i]] (moved as bytes: fp8 rows are not re-rounded); the row
  // buffers are scratch of n rows each.
  static void ReorderHead(Tensor& k_cache, Tensor& v_cache, const std::vector<int64_t>& slots,
                          int h, const int32_t* order, std::vector<uint8_t>& k_rows,
                          std::vector<uint8_t>& v_rows) {
    const size_t row_bytes = static_cast<size_t>(k_cache.dim(3)) * DTypeSize(k_cache.dtype());
    const size_t n = slots.size();
    for (size_t t = 0; t < n; ++t) {
      std::memcpy(&k_rows[t * row_bytes], CacheRowBytes(k_cache, slots[order[t]], h), row_bytes);
      std::memcpy(&v_rows[t * row_bytes], CacheRowBytes(v_cache, slots[order[t]], h), row_bytes);
    }
    for (size_t t = 0; t < n; ++t) {
      std::memcpy(CacheRowBytes(k_cache, slots[t], h), &k_rows[t * row_bytes], row_bytes);
      std::memcpy(CacheRowBytes(v_cache, slots[t], h), &v_rows[t * row_bytes], row_bytes);
    }
  }
  static absl::Status CheckPool(absl::string_view op, const Tensor& t, DType dtype, int hkv,
                                int64_t last_dim, int blocks_needed, absl::string_view name) {
    if (t.dtype() != dtype || t.rank() != 3 || t.dim(0) != hkv || t.dim(2) != last_dim ||
        t.dim(1) < blocks_needed) {
      return ShapeError(
          op, absl::StrCat(name, " must be ", DTypeName(dtype), " [Hkv, >= ", blocks_needed, ", ",
                           last_dim, "], got ", t.DebugString()));
    }
    return absl::OkStatus();
  }

  static void NormRow(const float* x, const float* w, int64_t n, float eps, float* out) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
  }

  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(int num_threads) {
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace strata::engine

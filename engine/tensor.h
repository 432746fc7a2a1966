// Tensor: a typed, shaped view of a buffer owned by a Backend.
//
// A Tensor is a cheap value: copies share the same storage (reference
// counted), and the storage is released through the owning backend's deleter
// when the last copy goes away. Data is row-major and contiguous. The buffer
// may live in host memory (CPU backend) or device memory (CUDA backend): only
// the owning backend dereferences data().
//
// Thread-safety: a Tensor value may be copied across threads; writes to the
// underlying data must be ordered by the backend that owns it.
#ifndef STRATA_ENGINE_TENSOR_H_
#define STRATA_ENGINE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace strata::engine {

// kF8E4M3 is the OCP FP8 E4M3 format (bias 7, no infinities, max 448, one
// NaN pattern per sign); it is a storage type only (the KV cache option), and
// operators widen it to fp32 before any arithmetic.
enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kF8E4M3 };

size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<void> storage, DType dtype, std::vector<int64_t> shape)
      : storage_(std::move(storage)), dtype_(dtype), shape_(std::move(shape)) {}

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

  void* data() const { return static_cast<char*>(storage_.get()) + offset_bytes_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data());
  }

  // A view of rows [begin, end) along the first dimension, sharing storage.
  Tensor Rows(int64_t begin, int64_t end) const;
  // Row i along the first dimension with that dimension dropped (e.g. one
  // pool slot of [slots, H, B, D] as [H, B, D]), sharing storage.
  Tensor Row(int64_t i) const;
  // The first numel(shape) elements as a tensor of `shape`, sharing storage
  // (a scratch buffer viewed at the size one call needs).
  Tensor View(std::vector<int64_t> shape) const;

  std::string DebugString() const;

 private:
  std::shared_ptr<void> storage_;
  size_t offset_bytes_ = 0;
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
};

// bf16/fp16 <-> fp32 conversions on the host (round to nearest even).
float Bf16ToFloat(uint16_t v);
uint16_t FloatToBf16(float f);
float Fp16ToFloat(uint16_t v);
uint16_t FloatToFp16(float f);
// fp8 e4m3 <-> fp32 on the host: round to nearest even, finite values beyond
// the range (and infinities) saturate to +-448, NaN becomes 0x7f. Matches
// the CUDA conversion with __NV_SATFINITE bit for bit.
float Fp8E4M3ToFloat(uint8_t v);
uint8_t FloatToFp8E4M3(float f);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_TENSOR_H_

// Fuzzes the KV block decoder (engine/kv_codec.h): KvCodec::Inspect and
// KvCodec::Decode on arbitrary bytes must refuse or decode, never crash or
// read outside the block. Random bytes essentially never pass the CRC, so
// each input is also tried with its CRC field rewritten to match its bytes:
// that reaches the header's field checks and the payload parsers. A block
// that passes is decoded to every dtype the decoder might accept, and
// re-encoded from the decoded values (which must succeed).
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/crc32c.h"
#include "engine/kv_codec.h"
#include "engine/tensor.h"

namespace {

using strata::engine::DType;
using strata::engine::KvBlockInfo;
using strata::engine::KvCodec;

// Decodes are bounded so that a header claiming a huge (valid) shape with a
// matching payload cannot make the fuzzer allocate gigabytes.
constexpr size_t kMaxFuzzElements = size_t{1} << 20;

void TryBlock(std::span<const uint8_t> block) {
  auto info = KvCodec::Inspect(block);
  if (!info.ok()) {
    std::vector<float> k(1), v(1);  // a refused block must not be written out
    (void)KvCodec::Decode(block, DType::kF32, k.data(), v.data(), nullptr);
    return;
  }
  const size_t elements = size_t{1} * info->tokens * info->head_dim;
  if (elements > kMaxFuzzElements) return;
  std::vector<float> k(elements), v(elements);
  for (DType out : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kI32}) {
    // Buffers of 4 bytes per element are large enough for every dtype.
    KvBlockInfo decoded;
    (void)KvCodec::Decode(block, out, k.data(), v.data(), &decoded);
  }
  if (!KvCodec::Decode(block, DType::kF32, k.data(), v.data(), nullptr).ok()) __builtin_trap();
  auto codec = KvCodec::Create(info->codec);
  if (!codec.ok()) __builtin_trap();
  std::vector<uint8_t> again((*codec)->EncodedBytes(info->tokens, info->head_dim, DType::kF32));
  if (!(*codec)
           ->Encode(k.data(), v.data(), DType::kF32, info->tokens, info->head_dim, again)
           .ok()) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  TryBlock(std::span<const uint8_t>(data, size));
  if (size < strata::engine::kBlockHeaderBytes) return 0;
  std::vector<uint8_t> fixed(data, data + size);
  uint32_t crc = strata::Crc32c(fixed.data(), 28);
  crc = strata::Crc32cExtend(crc, fixed.data() + 32, size - 32);
  const uint32_t masked = strata::MaskCrc(crc);
  for (int i = 0; i < 4; ++i) fixed[28 + i] = static_cast<uint8_t>(masked >> (8 * i));
  TryBlock(fixed);
  return 0;
}

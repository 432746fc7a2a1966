// Fuzzes the KV block wire header (kvtier/kv_wire.h), which a decode worker
// parses from whatever a peer sends: ParseKvBlockHeader on arbitrary bytes
// must refuse or parse, never crash. Random bytes essentially never pass
// the header's CRC, so each input is also tried with its CRC rewritten to
// match: that reaches the field checks. A header that parses is encoded
// again, and must parse to the same fields.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "common/crc32c.h"
#include "kvtier/kv_wire.h"

namespace {

using strata::kvtier::KvBlockHeader;
using strata::kvtier::KvWireFormat;

// A receiver's own format: the Llama-3-8B shape's.
const KvWireFormat kFormat = {.layers = 32,
                              .kv_heads = 8,
                              .head_dim = 128,
                              .page_size = 16,
                              .upper_first_layer = 32,
                              .dtype = strata::engine::DType::kBF16};

void Try(std::span<const std::byte> bytes) {
  auto parsed = strata::kvtier::ParseKvBlockHeader(bytes, kFormat);
  if (!parsed.ok()) return;
  const auto again = strata::kvtier::EncodeKvBlockHeader(*parsed);
  auto reparsed = strata::kvtier::ParseKvBlockHeader(again, kFormat);
  if (!reparsed.ok() || reparsed->transfer_id != parsed->transfer_id ||
      reparsed->index != parsed->index || reparsed->count != parsed->count ||
      reparsed->tokens != parsed->tokens || reparsed->payload_crc != parsed->payload_crc ||
      reparsed->payload_bytes != parsed->payload_bytes ||
      reparsed->first_layer != parsed->first_layer ||
      reparsed->part_layers != parsed->part_layers) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  Try(bytes);
  if (size == KvBlockHeader::kBytes) {
    std::vector<std::byte> fixed(bytes.begin(), bytes.end());
    const uint32_t crc = strata::MaskCrc(strata::Crc32c(fixed.data(), 56));
    std::memcpy(fixed.data() + 56, &crc, sizeof(crc));
    Try(fixed);
  }
  return 0;
}

#include "kvtier/kv_wire.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"

namespace strata::kvtier {
namespace {

constexpr uint32_t kMagic = 0x31564b53;  // "SKV1"
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderCrcAt = 56;

template <typename T>
void Put(std::array<std::byte, KvBlockHeader::kBytes>& out, size_t at, T value) {
  static_assert(std::endian::native == std::endian::little, "the wire is little-endian");
  std::memcpy(out.data() + at, &value, sizeof(T));
}

template <typename T>
T Get(std::span<const std::byte> in, size_t at) {
  T value;
  std::memcpy(&value, in.data() + at, sizeof(T));
  return value;
}

absl::Status Differs(absl::string_view field, int64_t sent, int64_t here) {
  return absl::FailedPreconditionError(
      absl::StrCat("KV block: ", field, " differs: the sender's ", sent, ", this worker's ", here));
}

}  // namespace

KvWireFormat KvWireFormat::Of(const KvLayout& layout) {
  return KvWireFormat{layout.num_layers(), layout.num_kv_heads(),      layout.head_dim(),
                      layout.page_size(),  layout.upper_first_layer(), layout.dtype(),
                      layout.num_ranks()};
}

std::array<std::byte, KvBlockHeader::kBytes> EncodeKvBlockHeader(const KvBlockHeader& h) {
  std::array<std::byte, KvBlockHeader::kBytes> out{};
  Put<uint32_t>(out, 0, kMagic);
  Put<uint16_t>(out, 4, kVersion);
  Put<uint16_t>(out, 6, static_cast<uint16_t>(h.kind));
  Put<uint64_t>(out, 8, h.transfer_id);
  Put<uint32_t>(out, 16, h.index);
  Put<uint32_t>(out, 20, h.count);
  Put<uint32_t>(out, 24, h.tokens);
  Put<uint8_t>(out, 28, static_cast<uint8_t>(h.codec));
  Put<uint8_t>(out, 29, static_cast<uint8_t>(h.format.dtype));
  Put<uint16_t>(out, 30, static_cast<uint16_t>(h.format.ranks));
  Put<uint16_t>(out, 32, static_cast<uint16_t>(h.format.layers));
  Put<uint16_t>(out, 34, static_cast<uint16_t>(h.format.kv_heads));
  Put<uint16_t>(out, 36, static_cast<uint16_t>(h.format.head_dim));
  Put<uint16_t>(out, 38, static_cast<uint16_t>(h.format.page_size));
  Put<uint16_t>(out, 40, static_cast<uint16_t>(h.format.upper_first_layer));
  Put<uint8_t>(out, 42, static_cast<uint8_t>(h.first_layer));
  Put<uint8_t>(out, 43, static_cast<uint8_t>(h.part_layers));
  Put<uint32_t>(out, 44, h.payload_crc);
  Put<uint64_t>(out, 48, h.payload_bytes);
  Put<uint32_t>(out, kHeaderCrcAt, MaskCrc(Crc32c(out.data(), kHeaderCrcAt)));
  return out;
}

absl::StatusOr<KvBlockHeader> ParseKvBlockHeader(std::span<const std::byte> in,
                                                 const KvWireFormat& expected) {
  if (in.size() != KvBlockHeader::kBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block header of ", in.size(), " bytes; expected ", KvBlockHeader::kBytes));
  }
  if (Get<uint32_t>(in, 0) != kMagic) {
    return absl::InvalidArgumentError("KV block header: bad magic (not a strata KV block)");
  }
  if (Get<uint16_t>(in, 4) != kVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV block header: version ", Get<uint16_t>(in, 4), "; this worker reads ", kVersion));
  }
  if (MaskCrc(Crc32c(in.data(), kHeaderCrcAt)) != Get<uint32_t>(in, kHeaderCrcAt)) {
    return absl::DataLossError("KV block header: its CRC32C does not match (corrupt on the way)");
  }
  KvBlockHeader h;
  const uint16_t kind = Get<uint16_t>(in, 6);
  if (kind != static_cast<uint16_t>(KvBlockHeader::Kind::kPageRecord) &&
      kind != static_cast<uint16_t>(KvBlockHeader::Kind::kPlannerState)) {
    return absl::InvalidArgumentError(absl::StrCat("KV block header: unknown kind ", kind));
  }
  h.kind = static_cast<KvBlockHeader::Kind>(kind);
  h.transfer_id = Get<uint64_t>(in, 8);
  h.index = Get<uint32_t>(in, 16);
  h.count = Get<uint32_t>(in, 20);
  h.tokens = Get<uint32_t>(in, 24);
  const uint8_t codec = Get<uint8_t>(in, 28);
  const uint8_t dtype = Get<uint8_t>(in, 29);
  h.format.ranks = std::max<int>(1, Get<uint16_t>(in, 30));
  h.format.layers = Get<uint16_t>(in, 32);
  h.format.kv_heads = Get<uint16_t>(in, 34);
  h.format.head_dim = Get<uint16_t>(in, 36);
  h.format.page_size = Get<uint16_t>(in, 38);
  h.format.upper_first_layer = Get<uint16_t>(in, 40);
  h.first_layer = Get<uint8_t>(in, 42);
  h.part_layers = Get<uint8_t>(in, 43);
  h.payload_crc = Get<uint32_t>(in, 44);
  h.payload_bytes = Get<uint64_t>(in, 48);
  if (h.count == 0 || h.index >= h.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block header: block ", h.index, " of ", h.count));
  }
  if (codec > static_cast<uint8_t>(engine::KvCodecKind::kInt4)) {
    return absl::InvalidArgumentError(absl::StrCat("KV block header: unknown codec ", codec));
  }
  h.codec = static_cast<engine::KvCodecKind>(codec);
  if (dtype != static_cast<uint8_t>(expected.dtype)) {
    return Differs("dtype", dtype, static_cast<int>(expected.dtype));
  }
  h.format.dtype = expected.dtype;
  if (h.format.ranks != expected.ranks) {
    // Each rank's rows go to the same rank here: another tensor-parallel
    // size would need the KV heads regrouped.
    return Differs("tensor-parallel ranks", h.format.ranks, expected.ranks);
  }
  if (h.format.layers != expected.layers)
    return Differs("layers", h.format.layers, expected.layers);
  if (h.format.kv_heads != expected.kv_heads) {
    return Differs("KV heads", h.format.kv_heads, expected.kv_heads);
  }
  if (h.format.head_dim != expected.head_dim) {
    return Differs("head dim", h.format.head_dim, expected.head_dim);
  }
  if (h.format.page_size != expected.page_size) {
    return Differs("page size", h.format.page_size, expected.page_size);
  }
  if (h.format.upper_first_layer != expected.upper_first_layer) {
    return Differs("upper first layer", h.format.upper_first_layer, expected.upper_first_layer);
  }
  if (h.kind == KvBlockHeader::Kind::kPlannerState && (h.first_layer != 0 || h.part_layers != 0)) {
    return absl::InvalidArgumentError("KV block header: a planner state value in layer parts");
  }
  if (h.kind == KvBlockHeader::Kind::kPlannerState) {
    if (h.tokens != 0 || h.codec != engine::KvCodecKind::kBf16 || h.payload_bytes == 0 ||
        h.payload_bytes > KvBlockHeader::kMaxPlannerStateBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV block header: planner state of ", h.tokens, " tokens, codec ",
                       std::string(engine::KvCodecKindName(h.codec)), ", ", h.payload_bytes,
                       " bytes (0 tokens, bf16, 1 byte to 1 GiB)"));
    }
    return h;
  }
  if (h.tokens < 1 || h.tokens > static_cast<uint32_t>(expected.page_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block header: ", h.tokens, " tokens in a page of ", expected.page_size));
  }
  if (h.is_part()) {
    if (expected.ranks != 1 || h.first_layer + h.part_layers > expected.layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV block header: layers ", h.first_layer, " to ",
                       h.first_layer + h.part_layers - 1, " of a page record of ", expected.layers,
                       " layers and ", expected.ranks, " ranks (parts need one rank)"));
    }
  } else if (h.first_layer != 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV block header: a whole record from layer ",
                                                   h.first_layer, " (0 layers in its part)"));
  }
  // Raw: the record as the caches hold it. Coded: a block per (rank,
  // layer, KV head) of the page's tokens (KvLayout::AppendRecordBlocks).
  // A part: its layers' share.
  const uint64_t want = static_cast<uint64_t>(
      h.is_part() ? h.part_layers * expected.layer_bytes(h.codec, static_cast<int>(h.tokens))
                  : expected.coded_record_bytes(h.codec, static_cast<int>(h.tokens)));
  if (h.payload_bytes != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV block header: payload of ", h.payload_bytes, " bytes; a page record",
        h.is_part() ? absl::StrCat("'s ", h.part_layers, " layers") : std::string(), " of ",
        h.tokens, " tokens in ", std::string(engine::KvCodecKindName(h.codec)), " has ", want));
  }
  return h;
}

int64_t KvWireFormat::coded_record_bytes(engine::KvCodecKind codec, int tokens) const {
  if (codec == engine::KvCodecKind::kBf16) return record_bytes();
  absl::StatusOr<std::unique_ptr<engine::KvCodec>> coder = engine::KvCodec::Create(codec);
  if (!coder.ok()) return 0;
  return int64_t{ranks} * layers * kv_heads *
         static_cast<int64_t>((*coder)->EncodedBytes(tokens, head_dim, dtype));
}

uint32_t KvPayloadCrc(std::span<const std::byte> payload) {
  return MaskCrc(Crc32c(payload.data(), payload.size()));
}

}  // namespace strata::kvtier

// The KV block wire format: what a prefill worker sends a decode worker.
//
// A prompt's KV travels as the block manager's host records (kv_layout.h:
// one token page of every layer, K and V), one message per page: raw (codec
// bf16: the caches' own bytes, record_bytes) or coded with the sender's
// profile codec (one engine::KvCodec block per layer and KV head of the
// page's tokens, each with its own CRC: KvLayout::AppendRecordBlocks), each
// with a fixed 64-byte header (little-endian). A page may also travel in
// parts of consecutive layers, one message each (the prompt's last chunk
// leaves layer by layer as it is computed): a part's payload is the
// record's bytes of those layers, which are contiguous with one rank.
//
//   0  magic "SKV1"          4  version u16, kind u16 (1: page record,
//                               2: planner state)
//   8  transfer id u64       16 index u32, count u32 (blocks in the transfer)
//   24 tokens u32 (tokens the page holds), codec u8, dtype u8, ranks u16
//   32 layers u16, KV heads u16 (a rank's), head dim u16, page size u16
//   40 upper first layer u16, part's first layer u8, part's layers u8
//      (0: the whole record), payload CRC u32 (masked CRC32C)
//   48 payload bytes u64     56 header CRC u32 (masked, of bytes 0..56), u32 0
//
// After a transfer's pages may come planner-state messages (kind 2): what
// the prefill worker's KV policy computed on the prompt (ClusterKV's
// clusterings, kvtier/kv_policy.h), value `index` of `count`, tokens 0,
// codec bf16, the payload opaque here (its CRC checked as it lands, its
// content by the decode worker's KV policy), at most kMaxPlannerStateBytes.
//
// With tensor parallelism a record holds every rank's part of the page,
// rank by rank (kv_layout.h), coded or not: rank r's rows land on the
// receiver's rank r, so both ends must have as many ranks (the field
// `ranks`; 0, as senders wrote before it existed, reads as 1).
//
// The receiver checks the header before it takes the payload (ParseKvBlock
// Header: a corrupt or foreign header, or a layout that differs from its
// own, is refused with an error naming the field and both values), and the
// payload's CRC once it has landed (KvBlockManager::LoadImported), so a
// block that went wrong on the way fails its request alone.
//
// Thread-safety: free functions over values.
#ifndef STRATA_KVTIER_KV_WIRE_H_
#define STRATA_KVTIER_KV_WIRE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "engine/kv_codec.h"
#include "engine/tensor.h"
#include "kvtier/kv_layout.h"

namespace strata::kvtier {

// The shape both ends must share for their KV to be interchangeable.
struct KvWireFormat {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int page_size = 0;
  int upper_first_layer = 0;
  engine::DType dtype = engine::DType::kBF16;
  // Tensor-parallel ranks; kv_heads is each rank's.
  int ranks = 1;
  int64_t record_bytes() const {
    return int64_t{ranks} * 2 * layers * page_size * kv_heads * head_dim *
           static_cast<int64_t>(engine::DTypeSize(dtype));
  }
  // A page record's payload: record_bytes() raw (kBf16), else one `codec`
  // block per (rank, layer, KV head) of the page's `tokens` tokens (0 for a
  // shape the codec refuses).
  int64_t coded_record_bytes(engine::KvCodecKind codec, int tokens) const;
  // One layer's share of it (with one rank, a part's payload is `layers`
  // times this, at `first_layer` times this into the record).
  int64_t layer_bytes(engine::KvCodecKind codec, int tokens) const {
    return layers > 0 ? coded_record_bytes(codec, tokens) / (int64_t{ranks} * layers) : 0;
  }
  static KvWireFormat Of(const KvLayout& layout);
};

struct KvBlockHeader {
  static constexpr size_t kBytes = 64;
  enum class Kind : uint16_t { kPageRecord = 1, kPlannerState = 2 };
  static constexpr uint64_t kMaxPlannerStateBytes = uint64_t{1} << 30;
  Kind kind = Kind::kPageRecord;
  uint64_t transfer_id = 0;
  uint32_t index = 0;
  uint32_t count = 0;
  uint32_t tokens = 0;
  // How the payload is coded: kBf16 is the caches' own bytes.
  engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
  KvWireFormat format;
  uint32_t payload_crc = 0;  // masked CRC32C
  uint64_t payload_bytes = 0;
  // A page record's layers [first_layer, first_layer + part_layers) alone;
  // part_layers 0: the whole record. Parts need one rank and at most
  // kMaxPartLayers layers.
  int first_layer = 0;
  int part_layers = 0;
  static constexpr int kMaxPartLayers = 255;
  bool is_part() const { return part_layers > 0; }
};

std::array<std::byte, KvBlockHeader::kBytes> EncodeKvBlockHeader(const KvBlockHeader& header);

// Parses and checks a header against the receiver's own format: DataLoss
// for a header whose CRC fails, InvalidArgument for one that is not a KV
// block header (size, magic, version, kind, index past count, a payload
// size that does not match the shape, an unknown codec), FailedPrecondition
// naming the field for a format that differs from `expected`.
absl::StatusOr<KvBlockHeader> ParseKvBlockHeader(std::span<const std::byte> bytes,
                                                 const KvWireFormat& expected);

// The masked CRC32C a page record's payload carries.
uint32_t KvPayloadCrc(std::span<const std::byte> payload);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_WIRE_H_

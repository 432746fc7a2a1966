#include "decode/kv_receiver.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata::decode {

absl::StatusOr<std::span<std::byte>> KvReceiver::Allocate(std::string_view /*peer*/,
                                                          std::span<const std::byte> header,
                                                          size_t payload_bytes) {
  absl::StatusOr<kvtier::KvBlockHeader> h = kvtier::ParseKvBlockHeader(header, format_);
  if (h.ok() && h->payload_bytes != payload_bytes) {
    h = absl::InvalidArgumentError(absl::StrCat("KV block: its header names ", h->payload_bytes,
                                                " bytes, the message carries ", payload_bytes));
  }
  absl::StatusOr<std::span<std::byte>> where =
      !h.ok() ? absl::StatusOr<std::span<std::byte>>(h.status())
      : h->kind == kvtier::KvBlockHeader::Kind::kPlannerState
          ? area_->PlaceState(h->transfer_id, h->index, h->count, payload_bytes)
      : h->is_part()
          // The header was checked against this worker's format: its
          // layers are the record's, in one rank.
          ? area_->PlacePart(h->transfer_id, h->index, h->count, h->first_layer, h->part_layers,
                             format_.layers,
                             format_.layer_bytes(h->codec, static_cast<int>(h->tokens)), h->codec,
                             static_cast<int>(h->tokens))
          : area_->Place(h->transfer_id, h->index, h->count, payload_bytes, h->codec,
                         static_cast<int>(h->tokens));
  if (!where.ok()) blocks_refused_.fetch_add(1);
  return where;
}

void KvReceiver::Landed(std::string_view /*peer*/, std::span<const std::byte> header,
                        std::span<std::byte> payload, absl::Status status) {
  // Allocate parsed it already: it parses.
  absl::StatusOr<kvtier::KvBlockHeader> h = kvtier::ParseKvBlockHeader(header, format_);
  if (!h.ok()) return;
  if (h->kind == kvtier::KvBlockHeader::Kind::kPlannerState) {
    area_->StateLanded(h->transfer_id, h->index, h->payload_crc, status);
    return;
  }
  if (h->is_part()) {
    area_->PartLanded(h->transfer_id, h->index, h->first_layer, h->part_layers, h->payload_crc,
                      status);
  } else {
    area_->Landed(h->transfer_id, h->index, h->payload_crc, status);
  }
  if (status.ok()) {
    blocks_landed_.fetch_add(1);
    bytes_landed_.fetch_add(static_cast<int64_t>(payload.size()));
  }
}

void KvReceiver::PeerFailed(std::string_view peer, const absl::Status& status) {
  // Its transfers fail with the prefill call that asked for them (or their
  // lease ends).
  STRATA_LOG_WARN("KV transport: a prefill worker went away ({} bytes of address): {}", peer.size(),
                  status.ToString());
}

}  // namespace strata::decode

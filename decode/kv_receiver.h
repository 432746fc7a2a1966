// KvReceiver: a decode worker's end of the KV transport.
//
// Every message a prefill worker sends is one KV block in the wire format
// (kvtier/kv_wire.h). The receiver checks its header against this worker's
// own KV format before taking the payload (a foreign, corrupt or
// mismatched header is refused, which fails that block's send, and so its
// request, alone), and lands the payload in the block manager's landing
// area at the place its transfer reserved (a planner-state message, in the
// transfer's own heap buffer: LandingArea::PlaceState); the payload's CRC
// is checked as it lands, and a mismatch fails the transfer when the KV is
// loaded (KvBlockManager::LoadImported).
//
// Thread-safety: thread-safe (called on the transport's thread).
#ifndef STRATA_DECODE_KV_RECEIVER_H_
#define STRATA_DECODE_KV_RECEIVER_H_

#include <atomic>
#include <cstdint>

#include "kvtier/kv_wire.h"
#include "kvtier/landing_area.h"
#include "kvtier/transport.h"

namespace strata::decode {

class KvReceiver final : public kvtier::Transport::Receiver {
 public:
  // `area` must outlive the receiver.
  KvReceiver(kvtier::LandingArea* area, kvtier::KvWireFormat format)
      : area_(area), format_(format) {}

  absl::StatusOr<std::span<std::byte>> Allocate(std::string_view peer,
                                                std::span<const std::byte> header,
                                                size_t payload_bytes) override;
  void Landed(std::string_view peer, std::span<const std::byte> header,
              std::span<std::byte> payload, absl::Status status) override;
  void PeerFailed(std::string_view peer, const absl::Status& status) override;

  int64_t blocks_landed() const { return blocks_landed_.load(); }
  int64_t bytes_landed() const { return bytes_landed_.load(); }
  int64_t blocks_refused() const { return blocks_refused_.load(); }

 private:
  kvtier::LandingArea* area_;
  kvtier::KvWireFormat format_;
  std::atomic<int64_t> blocks_landed_{0}, bytes_landed_{0}, blocks_refused_{0};
};

}  // namespace strata::decode

#endif  // STRATA_DECODE_KV_RECEIVER_H_

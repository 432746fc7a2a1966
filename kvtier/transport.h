// Transport: moves KV blocks between workers (prefill -> decode).
//
// A message is a small header (at most kMaxHeaderBytes; the caller's
// encoding, e.g. kvtier/kv_wire.h) and a large payload (a whole KV block,
// typically 0.5-2 MB). The sender names a peer by the address the peer's
// transport gave (local_address(), exchanged over the control plane) and
// keeps the payload valid until its completion runs. The receiver decides
// where each payload lands (Receiver::Allocate, e.g. pinned host pages of
// its block manager), so a block is written once, straight into the memory
// that keeps it, and is told when it has landed (Receiver::Landed). A
// completion runs only once the data is in the receiver's memory (or the
// send failed), never on mere submission.
//
// Failures are per message and per peer, never a hang:
//  - a send that does not complete within send_timeout fails with
//    DeadlineExceeded, and its request is cancelled (where the network
//    cannot cancel one request, e.g. UCX 1.13 once the payload is in its
//    hands, the peer's endpoint is closed instead: its other sends in
//    flight fail as for a peer that went away);
//  - a peer that goes away fails its sends in flight with Unavailable, its
//    receives in flight (Landed with an error), and is reported once to
//    Receiver::PeerFailed; a later Send to that address connects afresh;
//  - a receiver that refuses a payload (Allocate's error) fails that
//    message alone on both sides.
//
// Implementations: UcxTransport (kvtier/ucx_transport.h) between processes
// and nodes, LocalTransport (kvtier/local_transport.h) inside one process.
//
// Thread-safety: every method is thread-safe. Receiver callbacks and send
// completions run on the transport's own thread and must return quickly
// (queue work elsewhere); they may call Send.
#ifndef STRATA_KVTIER_TRANSPORT_H_
#define STRATA_KVTIER_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata::kvtier {

class Transport {
 public:
  static constexpr size_t kMaxHeaderBytes = 256;

  // What a transport does with messages that arrive. Set once, before any
  // peer can send (Start), and outliving the transport.
  class Receiver {
   public:
    virtual ~Receiver() = default;
    // A message from `peer` (the sender's local_address()) with this header
    // needs payload_bytes of memory: returns where it lands (exactly that
    // many bytes, valid until Landed), or an error that refuses it (the
    // sender's completion then fails; Landed is not called).
    virtual absl::StatusOr<std::span<std::byte>> Allocate(std::string_view peer,
                                                          std::span<const std::byte> header,
                                                          size_t payload_bytes) = 0;
    // The payload Allocate placed has landed (OK) or will not (an error:
    // the peer went away, or the transfer failed); either way the memory
    // is the receiver's again.
    virtual void Landed(std::string_view peer, std::span<const std::byte> header,
                        std::span<std::byte> payload, absl::Status status) = 0;
    // A peer that had sent or been sent to went away (its endpoint failed).
    virtual void PeerFailed(std::string_view peer, const absl::Status& status) = 0;
  };

  using SendDone = std::function<void(absl::Status status)>;

  virtual ~Transport() = default;

  // The opaque address peers pass to Send to reach this transport.
  virtual std::string local_address() const = 0;

  // Sends header + payload to the transport at `peer_address`. The
  // endpoint to a peer is made on first use and reused. `done` runs once,
  // on the transport's thread: OK when the payload has landed in the
  // receiver's memory; DeadlineExceeded, Unavailable (peer gone or
  // unreachable) or the receiver's refusal otherwise. An error returned
  // here (bad arguments, transport stopped) means `done` will not run.
  virtual absl::Status Send(std::string_view peer_address, std::span<const std::byte> header,
                            std::span<const std::byte> payload, SendDone done) = 0;

  // Makes [data, data + bytes) cheap to send from or land in (registers it
  // with the network where that helps, e.g. a pinned host pool). Optional.
  virtual absl::Status RegisterMemory(void* /*data*/, size_t /*bytes*/) { return absl::OkStatus(); }
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_TRANSPORT_H_

// UcxTransport: the Transport between processes and nodes, over UCX active
// messages (Debian's UCX 1.13: TCP, shared memory and CMA on this build,
// InfiniBand/RoCE where the host has it; UCX_TLS, UCX_NET_DEVICES and the
// other UCX_* variables of the environment choose among them).
//
// A message is one active message: its header is a small frame (the message
// id and the sender's address, so the receiver can name the peer and answer
// it) followed by the caller's header; its data is the payload. Payloads of
// at least rndv_threshold bytes go by rendezvous, so the receiver pulls them
// straight into the memory Receiver::Allocate gave; smaller ones go eagerly
// and are copied once on arrival. The receiver answers every message it can
// name with an ack carrying its verdict (landed, refused with the
// receiver's status, or failed), and a send completes on that ack, never on
// UCX's local completion.
//
// Peers: one UCX endpoint per peer address, made on first use (sending or
// acking) with peer-failure error handling. When UCX reports the endpoint
// failed (a closed connection: at once for a peer that exits or crashes; a
// silent host: after UCX's keepalive, see UCX_KEEPALIVE_INTERVAL and
// UCX_TCP_KEEPIDLE), the peer's sends in flight fail with Unavailable, its
// receives in flight land with an error, Receiver::PeerFailed runs once,
// and the endpoint is closed; the next Send to that address connects
// afresh. UCX 1.13 uses only transports that can detect a failed peer for
// such endpoints (TCP, InfiniBand; not shared memory or CMA), so two
// processes on one host talk over TCP loopback.
//
// A send that is not acked within send_timeout fails with
// DeadlineExceeded. UCX 1.13 cannot cancel a send request, so when that
// send's payload is still in UCX's hands the peer's endpoint is closed
// (the only way to make UCX let go of the payload): the peer's other sends
// in flight then fail with Unavailable and PeerFailed runs, as for a failed
// peer; a send whose payload UCX already delivered just fails. A completion
// runs once UCX no longer reads the payload (UCX fails the requests of a
// closed endpoint promptly; after a further second it runs regardless).
//
// Thread-safety: every method is thread-safe. One progress thread owns the
// UCX context, worker and endpoints and makes every UCX call; Send and
// RegisterMemory hand their work to it. Receiver callbacks and send
// completions run on that thread (they must not destroy the transport).
// The destructor stops it: sends in flight fail with Cancelled, receives
// in flight land with Cancelled.
#ifndef STRATA_KVTIER_UCX_TRANSPORT_H_
#define STRATA_KVTIER_UCX_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/transport.h"

namespace strata::kvtier {

struct UcxTransportOptions {
  // Names this transport in logs and in the errors its peers report.
  std::string name = "ucx";
  std::chrono::milliseconds send_timeout{10000};
  // Payloads of at least this many bytes go by rendezvous (zero-copy into
  // the receiver's memory); smaller ones eagerly. Over TCP a rendezvous
  // costs a request and a reply before the data: below ~32 KiB the eager
  // copy is cheaper (bench/RESULTS.md, the KV transfer between processes);
  // KV blocks (0.5-2 MiB) always go by rendezvous.
  size_t rndv_threshold = 32768;
};

class UcxTransport final : public Transport {
 public:
  // Starts UCX (the UCX_* environment applies) and the progress thread.
  // `receiver` outlives the transport.
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(const UcxTransportOptions& options,
                                                              Receiver* receiver);
  ~UcxTransport() override;
  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;

  // The UCX worker address, framed with a label (name, host, pid) and a
  // checksum, so that a damaged address is refused before UCX parses it.
  std::string local_address() const override;
  // InvalidArgument: a header over kMaxHeaderBytes, an address that is not
  // one local_address() gave; FailedPrecondition: the transport is stopping.
  absl::Status Send(std::string_view peer_address, std::span<const std::byte> header,
                    std::span<const std::byte> payload, SendDone done) override;
  // Maps [data, data + bytes) with ucp_mem_map (unmapped by the
  // destructor); sends from and receives into it then use that handle.
  absl::Status RegisterMemory(void* data, size_t bytes) override;

  // Whether UCX can move CUDA device memory here (Debian's UCX cannot:
  // callers stage through pinned host memory).
  bool supports_cuda_memory() const;
  // The UCX resources this transport may use, e.g. "tcp/lo posix/memory".
  const std::string& resources() const;
  // The printable label inside an address ("" if it is not an address).
  static std::string PeerLabel(std::string_view address);

 private:
  struct State;
  explicit UcxTransport(std::unique_ptr<State> state);

  std::unique_ptr<State> state_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_UCX_TRANSPORT_H_

// LocalTransport: the Transport between workers of one process (`strata
// serve` running prefill and decode side by side, and tests), with the
// semantics of UcxTransport and no network.
//
// Instances find each other through a process-wide registry: an instance's
// address is "local:<n>", unique for the life of the process. A message is
// copied once, straight from the sender's payload into the memory the
// receiver's Allocate gives, on the receiver's thread; the sender's
// completion then runs on the sender's thread. An address no live instance
// has fails the send with Unavailable; an instance that is destroyed fails
// the sends queued to it with Unavailable and is reported to every
// instance that had sent to it or received from it (Receiver::PeerFailed);
// a send not landed within send_timeout fails with DeadlineExceeded (one
// whose copy has begun finishes it first: the copy is short and bounded).
//
// Thread-safety: every method is thread-safe. Each instance runs one
// thread; its Receiver callbacks and its sends' completions run there (they
// must not destroy the transport). The destructor fails the sends it has in
// flight with Cancelled, after any copy out of their payloads has ended.
#ifndef STRATA_KVTIER_LOCAL_TRANSPORT_H_
#define STRATA_KVTIER_LOCAL_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvtier/transport.h"

namespace strata::kvtier {

struct LocalTransportOptions {
  std::chrono::milliseconds send_timeout{10000};
};

class LocalTransport final : public Transport {
 public:
  // `receiver` outlives the transport.
  explicit LocalTransport(Receiver* receiver, LocalTransportOptions options = {});
  ~LocalTransport() override;
  LocalTransport(const LocalTransport&) = delete;
  LocalTransport& operator=(const LocalTransport&) = delete;

  std::string local_address() const override { return address_; }
  // InvalidArgument: a header over kMaxHeaderBytes, an address that is not
  // "local:<n>", no completion.
  absl::Status Send(std::string_view peer_address, std::span<const std::byte> header,
                    std::span<const std::byte> payload, SendDone done) override;

 private:
  struct Flight;
  struct Pending {
    std::shared_ptr<Flight> flight;
    SendDone done;
    std::chrono::steady_clock::time_point deadline;
  };

  void Run();
  bool HasWork() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !tasks_.empty() || stopping_; }
  // Runs `task` on this transport's thread (dropped once it stopped).
  void Post(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_);
  // Runs `task` on the thread of the live transport at `address`; false if
  // there is none.
  static bool PostTo(const std::string& address, std::function<void(LocalTransport*)> task);
  void Deliver(const std::shared_ptr<Flight>& flight);
  void Finish(uint64_t id, absl::Status status);
  void OnPeerGone(const std::string& peer);
  void CheckDeadlines();

  Receiver* const receiver_;
  const LocalTransportOptions options_;
  std::string address_;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  // Peers sent to or received from, to report when they go away.
  absl::flat_hash_set<std::string> peers_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_LOCAL_TRANSPORT_H_

#include "kvtier/local_transport.h"

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace strata::kvtier {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kPrefix[] = "local:";
constexpr size_t kPrefixBytes = sizeof(kPrefix) - 1;

// The live instances by address. Lock order: the registry, then an
// instance's mu_.
struct Registry {
  absl::Mutex mu;
  uint64_t next ABSL_GUARDED_BY(mu) = 1;
  absl::flat_hash_map<std::string, LocalTransport*> live ABSL_GUARDED_BY(mu);
};

Registry& GetRegistry() {
  static Registry* registry = new Registry;  // never destroyed: instances may outlive main
  return *registry;
}

bool IsLocalAddress(std::string_view address) {
  if (!address.starts_with(kPrefix) || address.size() == kPrefixBytes) return false;
  for (char c : address.substr(kPrefixBytes)) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

// One send, shared by its sender (which completes it) and its receiver
// (which copies its payload). The phase says who may touch the payload.
struct LocalTransport::Flight {
  enum class Phase {
    kQueued,     // the receiver has not copied it; the sender may give up
    kCopying,    // the receiver is copying the payload: nobody gives up
    kLanded,     // the receiver is done with the payload (result: its verdict)
    kAbandoned,  // the sender gave up; the receiver must not touch it
  };
  uint64_t id = 0;
  std::string sender;
  std::string receiver;
  std::vector<std::byte> header;
  std::span<const std::byte> payload;
  absl::Mutex mu;
  Phase phase ABSL_GUARDED_BY(mu) = Phase::kQueued;
  absl::Status result ABSL_GUARDED_BY(mu);
};

LocalTransport::LocalTransport(Receiver* receiver, LocalTransportOptions options)
    : receiver_(receiver), options_(options) {
  Registry& registry = GetRegistry();
  absl::MutexLock lock(&registry.mu);
  address_ = absl::StrCat(kPrefix, registry.next++);
  thread_ = std::thread([this] { Run(); });
  registry.live.emplace(address_, this);
}

LocalTransport::~LocalTransport() {
  {
    // No new messages or tasks from other instances after this.
    Registry& registry = GetRegistry();
    absl::MutexLock lock(&registry.mu);
    registry.live.erase(address_);
  }
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
  Registry& registry = GetRegistry();
  absl::MutexLock lock(&registry.mu);
  for (auto& entry : registry.live) {
    LocalTransport* other = entry.second;
    other->Post([other, gone = address_] { other->OnPeerGone(gone); });
  }
}

void LocalTransport::Post(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  tasks_.push_back(std::move(task));
}

bool LocalTransport::PostTo(const std::string& address, std::function<void(LocalTransport*)> task) {
  Registry& registry = GetRegistry();
  absl::MutexLock lock(&registry.mu);
  auto it = registry.live.find(address);
  if (it == registry.live.end()) return false;
  LocalTransport* target = it->second;
  target->Post([target, task = std::move(task)] { task(target); });
  return true;
}

absl::Status LocalTransport::Send(std::string_view peer_address, std::span<const std::byte> header,
                                  std::span<const std::byte> payload, SendDone done) {
  if (header.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("message header of ", header.size(), " bytes; at most ", kMaxHeaderBytes));
  }
  if (!done) return absl::InvalidArgumentError("Send needs a completion");
  if (!IsLocalAddress(peer_address)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a local transport address: '",
        absl::CHexEscape(absl::string_view(peer_address.data(), peer_address.size())), "'"));
  }
  auto flight = std::make_shared<Flight>();
  flight->sender = address_;
  flight->receiver = std::string(peer_address);
  flight->header.assign(header.begin(), header.end());
  flight->payload = payload;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::FailedPreconditionError("local transport is stopping");
    flight->id = next_id_++;
    pending_.emplace(flight->id,
                     Pending{flight, std::move(done), Clock::now() + options_.send_timeout});
    peers_.insert(flight->receiver);
  }
  const bool queued =
      PostTo(flight->receiver, [flight](LocalTransport* to) { to->Deliver(flight); });
  if (!queued) {
    Post([this, id = flight->id, to = flight->receiver] {
      Finish(id, absl::UnavailableError(absl::StrCat("no local transport at ", to)));
    });
  }
  return absl::OkStatus();
}

void LocalTransport::Deliver(const std::shared_ptr<Flight>& flight) {
  bool stopping;
  {
    absl::MutexLock lock(&mu_);
    stopping = stopping_;
    if (!stopping) peers_.insert(flight->sender);
  }
  absl::Status result;
  if (stopping) {
    result = absl::UnavailableError(absl::StrCat("local transport ", address_, " shut down"));
  } else {
    {
      absl::MutexLock lock(&flight->mu);
      if (flight->phase != Flight::Phase::kQueued) return;  // the sender gave up
    }
    const size_t bytes = flight->payload.size();
    absl::StatusOr<std::span<std::byte>> buffer =
        receiver_->Allocate(flight->sender, flight->header, bytes);
    if (!buffer.ok()) {
      result = buffer.status();
    } else if (buffer->size() != bytes) {
      result = absl::InternalError(
          absl::StrCat("receiver gave ", buffer->size(), " bytes for a ", bytes, "-byte payload"));
      receiver_->Landed(flight->sender, flight->header, *buffer, result);
    } else {
      bool copy;
      {
        absl::MutexLock lock(&flight->mu);
        copy = flight->phase == Flight::Phase::kQueued;
        if (copy) flight->phase = Flight::Phase::kCopying;
      }
      if (!copy) {
        // The sender gave up while Allocate ran: its payload may be gone.
        receiver_->Landed(flight->sender, flight->header, *buffer,
                          absl::CancelledError("the sender gave up on the message"));
        return;
      }
      if (bytes > 0) std::memcpy(buffer->data(), flight->payload.data(), bytes);
      {
        absl::MutexLock lock(&flight->mu);
        flight->phase = Flight::Phase::kLanded;
      }
      receiver_->Landed(flight->sender, flight->header, *buffer, absl::OkStatus());
    }
  }
  {
    absl::MutexLock lock(&flight->mu);
    if (flight->phase == Flight::Phase::kAbandoned) return;
    flight->phase = Flight::Phase::kLanded;
    flight->result = result;
  }
  PostTo(flight->sender,
         [id = flight->id, result](LocalTransport* from) { from->Finish(id, result); });
}

void LocalTransport::Finish(uint64_t id, absl::Status status) {
  SendDone done;
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return;  // timed out or failed already
    done = std::move(it->second.done);
    pending_.erase(it);
  }
  done(std::move(status));
}

void LocalTransport::CheckDeadlines() {
  const auto now = Clock::now();
  std::vector<std::pair<SendDone, absl::Status>> expired;
  {
    absl::MutexLock lock(&mu_);
    std::vector<uint64_t> ids;
    for (auto& [id, pending] : pending_) {
      if (pending.deadline > now) continue;
      Flight& flight = *pending.flight;
      absl::MutexLock flight_lock(&flight.mu);
      // A copy under way ends soon, and a landed one has its verdict on
      // the way: only a queued send is given up.
      if (flight.phase != Flight::Phase::kQueued) continue;
      flight.phase = Flight::Phase::kAbandoned;
      expired.emplace_back(std::move(pending.done),
                           absl::DeadlineExceededError(absl::StrCat(
                               "peer ", flight.receiver, " did not take a ", flight.payload.size(),
                               "-byte message within ", options_.send_timeout.count(), " ms")));
      ids.push_back(id);
    }
    for (uint64_t id : ids) pending_.erase(id);
  }
  for (auto& [done, status] : expired) done(std::move(status));
}

void LocalTransport::OnPeerGone(const std::string& peer) {
  const absl::Status gone =
      absl::UnavailableError(absl::StrCat("local transport ", peer, " went away"));
  std::vector<SendDone> failed;
  bool known;
  {
    absl::MutexLock lock(&mu_);
    known = peers_.erase(peer) > 0;
    std::vector<uint64_t> ids;
    for (auto& [id, pending] : pending_) {
      Flight& flight = *pending.flight;
      if (flight.receiver != peer) continue;
      absl::MutexLock flight_lock(&flight.mu);
      if (flight.phase != Flight::Phase::kQueued) continue;
      flight.phase = Flight::Phase::kAbandoned;
      failed.push_back(std::move(pending.done));
      ids.push_back(id);
    }
    for (uint64_t id : ids) pending_.erase(id);
  }
  for (SendDone& done : failed) done(gone);
  if (known) receiver_->PeerFailed(peer, gone);
}

void LocalTransport::Run() {
  for (;;) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(this, &LocalTransport::HasWork),
                           absl::Milliseconds(pending_.empty() ? 100 : 5));
      if (!tasks_.empty()) {
        task = std::move(tasks_.front());
        tasks_.pop_front();
      } else if (stopping_) {
        break;
      }
    }
    if (task) task();
    CheckDeadlines();
  }
  // Stopped: the tasks were drained above (messages to this instance were
  // refused, verdicts on its sends delivered). What is still in flight
  // fails, once no copy reads its payload.
  absl::flat_hash_map<uint64_t, Pending> rest;
  {
    absl::MutexLock lock(&mu_);
    rest.swap(pending_);
  }
  for (auto& [id, pending] : rest) {
    absl::Status status;
    {
      Flight& flight = *pending.flight;
      absl::MutexLock lock(&flight.mu);
      flight.mu.Await(absl::Condition(
          +[](Flight* f)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu) { return f->phase != Flight::Phase::kCopying; },
          &flight));
      if (flight.phase == Flight::Phase::kLanded) {
        status = flight.result;
      } else {
        flight.phase = Flight::Phase::kAbandoned;
        status = absl::CancelledError(
            absl::StrCat("local transport ", address_, " stopped before the message landed"));
      }
    }
    pending.done(std::move(status));
  }
}

}  // namespace strata::kvtier

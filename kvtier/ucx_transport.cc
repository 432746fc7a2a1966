#include "kvtier/ucx_transport.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <ucs/memory/memory_type.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace strata::kvtier {
namespace {

using Clock = std::chrono::steady_clock;

// Active message ids: a message (frame + caller's header, payload) and the
// receiver's verdict on one.
constexpr unsigned kDataAm = 1;
constexpr unsigned kAckAm = 2;
constexpr uint8_t kFrameVersion = 1;
// Data frame: version, message id, sender address length and bytes.
constexpr size_t kDataFrameFixedBytes = 1 + 8 + 2;
// Ack: version, message id, status code, message length and bytes.
constexpr size_t kAckFixedBytes = 1 + 8 + 4 + 4;
constexpr size_t kMaxAckMessageBytes = 1024;
// Address: magic, label length and bytes, worker address length and bytes,
// then the CRC32C of all that.
constexpr char kAddressMagic[4] = {'S', 'U', 'C', 'X'};
constexpr size_t kMaxLabelBytes = 200;
// How long a failed send waits for UCX to let go of its payload (after its
// endpoint was closed) before its completion runs anyway.
constexpr auto kReleaseGrace = std::chrono::seconds(1);
// How long the destructor lets UCX finish closing endpoints.
constexpr auto kShutdownGrace = std::chrono::seconds(1);

void PutU16(std::string& out, uint16_t v) {
  for (int i = 0; i < 2; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}

// Reads little-endian fields from a byte range; any read past its end makes
// ok() false.
class Reader {
 public:
  Reader(const void* data, size_t size) : p_(static_cast<const uint8_t*>(data)), left_(size) {}
  bool ok() const { return ok_; }
  size_t left() const { return left_; }
  uint64_t Uint(int bytes) {
    if (!Need(bytes)) return 0;
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= uint64_t{p_[i]} << (8 * i);
    Skip(bytes);
    return v;
  }
  std::string_view Bytes(size_t n) {
    if (!Need(n)) return {};
    std::string_view v(reinterpret_cast<const char*>(p_), n);
    Skip(n);
    return v;
  }

 private:
  bool Need(size_t n) {
    if (left_ < n) ok_ = false;
    return ok_;
  }
  void Skip(size_t n) {
    p_ += n;
    left_ -= n;
  }
  const uint8_t* p_;
  size_t left_;
  bool ok_ = true;
};

struct ParsedAddress {
  std::string_view label;
  std::string_view worker;  // the UCX worker address
};

absl::StatusOr<ParsedAddress> ParseAddress(std::string_view address) {
  constexpr size_t kFixed = sizeof(kAddressMagic) + 2 + 4 + 4;
  if (address.size() < kFixed || address.substr(0, 4) != std::string_view(kAddressMagic, 4)) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a UCX transport address (", address.size(), " bytes)"));
  }
  Reader r(address.data() + 4, address.size() - 4);
  ParsedAddress out;
  out.label = r.Bytes(r.Uint(2));
  out.worker = r.Bytes(r.Uint(4));
  const size_t crc_offset = address.size() - r.left();
  const uint32_t crc = static_cast<uint32_t>(r.Uint(4));
  if (!r.ok() || r.left() != 0 || out.worker.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed UCX transport address (", address.size(), " bytes)"));
  }
  if (Crc32c(address.data(), crc_offset) != crc) {
    return absl::InvalidArgumentError(
        absl::StrCat("damaged UCX transport address (", address.size(), " bytes, bad checksum)"));
  }
  return out;
}

std::string EncodeAddress(std::string_view label, std::string_view worker) {
  std::string out(kAddressMagic, 4);
  PutU16(out, static_cast<uint16_t>(label.size()));
  out.append(label);
  PutU32(out, static_cast<uint32_t>(worker.size()));
  out.append(worker);
  PutU32(out, Crc32c(out.data(), out.size()));
  return out;
}

absl::Status UcsError(const std::string& what, ucs_status_t status) {
  const std::string message = absl::StrCat(what, ": ", ucs_status_string(status));
  switch (status) {
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return absl::ResourceExhaustedError(message);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(message);
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_NO_ELEM:
      return absl::FailedPreconditionError(message);
    case UCS_ERR_CANCELED:
      return absl::CancelledError(message);
    case UCS_ERR_TIMED_OUT:
      return absl::DeadlineExceededError(message);
    default:
      return absl::UnavailableError(message);
  }
}

// The UCX resources ("tcp/lo", "posix/memory", ...) a context may use, from
// the report UCX prints (there is no query for them).
std::string ListResources(ucp_context_h context) {
  char* text = nullptr;
  size_t size = 0;
  FILE* f = open_memstream(&text, &size);
  if (f == nullptr) return "?";
  ucp_context_print_info(context, f);
  std::fclose(f);
  std::vector<std::string> names;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text, size), '\n')) {
    if (line.find(" resource ") == absl::string_view::npos) continue;
    const size_t space = line.find_last_of(' ');
    if (space != absl::string_view::npos) names.emplace_back(line.substr(space + 1));
  }
  std::free(text);
  return absl::StrJoin(names, " ");
}

std::string MemoryTypeNames(uint64_t types) {
  std::vector<std::string> names;
  for (int t = 0; t < UCS_MEMORY_TYPE_LAST; ++t) {
    if (types & (uint64_t{1} << t)) names.emplace_back(ucs_memory_type_names[t]);
  }
  return absl::StrJoin(names, " ");
}

}  // namespace

struct UcxTransport::State {
  struct Peer;

  // One Send, from Send until its completion has run and UCX let go of it.
  struct OutMsg {
    State* state = nullptr;
    uint64_t id = 0;
    std::string peer_address;
    std::string peer_label;
    Peer* peer = nullptr;  // once submitted
    std::string frame;     // frame + caller's header: UCX reads it until local_done
    std::span<const std::byte> payload;
    SendDone done;
    Clock::time_point deadline;
    void* request = nullptr;             // UCX's, until it completes locally
    bool local_done = false;             // UCX no longer reads frame or payload
    std::optional<absl::Status> final;   // the verdict; done runs with it
    Clock::time_point release_deadline;  // done runs by then even if UCX holds on
    bool done_ran = false;
  };

  // One endpoint to a peer. Kept (in dead_peers) after it failed, because
  // UCX's error callback and the sends that named it point at it.
  struct Peer {
    State* state = nullptr;
    std::string address;
    std::string label;
    ucp_ep_h ep = nullptr;
    bool failing = false;  // UCX reported an error, not handled yet
    bool down = false;     // endpoint closed
  };

  // A rendezvous payload on its way into the receiver's memory.
  struct InMsg {
    State* state = nullptr;
    uint64_t key = 0;
    uint64_t sender_id = 0;  // the sender's message id, for the ack
    std::string peer;
    std::vector<std::byte> header;
    std::span<std::byte> buffer;
    void* request = nullptr;
    bool landed = false;  // Landed ran
    // Set when the peer failed: by then UCX should have failed the request;
    // Landed runs then anyway.
    std::optional<Clock::time_point> give_up_at;
  };

  // An ack on its way out.
  struct AckOp {
    State* state = nullptr;
    std::string frame;
  };

  struct Region {
    size_t bytes = 0;
    ucp_mem_h memh = nullptr;
  };

  State(UcxTransportOptions o, Receiver* r) : options(std::move(o)), receiver(r) {}
  ~State();

  absl::Status Init();
  void Run();
  void Wake();

  // Progress thread only.
  void Submit(std::unique_ptr<OutMsg> msg);
  absl::StatusOr<Peer*> GetPeer(const std::string& address);
  void SetFinal(OutMsg* msg, absl::Status status);
  void MaybeComplete(OutMsg* msg);
  void PeerDown(Peer* peer, const absl::Status& why);
  void CloseEndpoint(Peer* peer);
  void AfterProgress();
  void CheckDeadlines(Clock::time_point now);
  void SendAcks();
  void RunReady();
  void Shutdown();
  void DestroyUcx();
  void PollClosing();
  void SetMemory(ucp_request_param_t& param, const void* data, size_t bytes) const;
  absl::Status MapMemory(void* data, size_t bytes);
  ucs_status_t OnData(const void* header, size_t header_length, void* data, size_t length,
                      const ucp_am_recv_param_t* param);
  ucs_status_t OnAck(const void* header, size_t header_length);
  void QueueAck(const std::string& peer, uint64_t id, const absl::Status& status);

  static void SendCallback(void* request, ucs_status_t status, void* user_data);
  static void RecvCallback(void* request, ucs_status_t status, size_t length, void* user_data);
  static void AckCallback(void* request, ucs_status_t status, void* user_data);
  static void EndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t DataHandler(void* arg, const void* header, size_t header_length, void* data,
                                  size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t AckHandler(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);

  const UcxTransportOptions options;
  Receiver* const receiver;

  // Set by Init, then read-only.
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  std::string address;
  std::string label;
  std::string resources;
  bool cuda = false;
  bool host_only = true;
  int epoll_fd = -1;
  int wake_fd = -1;
  std::thread thread;
  std::thread::id thread_id;
  absl::Notification started;

  absl::Mutex mu;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  std::vector<std::unique_ptr<OutMsg>> posted_sends ABSL_GUARDED_BY(mu);
  std::vector<std::function<void()>> posted_tasks ABSL_GUARDED_BY(mu);

  // Progress thread only (and the destructor, after it stopped).
  bool shutting_down = false;                        // messages that arrive now are dropped
  std::map<uint64_t, std::unique_ptr<OutMsg>> msgs;  // by id: deadlines in order
  absl::flat_hash_map<std::string, std::unique_ptr<Peer>> peers;
  std::vector<std::unique_ptr<Peer>> dead_peers;
  std::vector<std::pair<Peer*, ucs_status_t>> failed_peers;
  absl::flat_hash_map<uint64_t, std::unique_ptr<InMsg>> recvs;
  uint64_t next_recv_key = 1;
  struct PendingAck {
    std::string peer;
    uint64_t id;
    absl::Status status;
  };
  std::vector<PendingAck> acks;
  std::vector<std::string> connect;  // senders to have an endpoint to
  absl::flat_hash_map<AckOp*, std::unique_ptr<AckOp>> acks_in_flight;
  std::vector<void*> closing;  // endpoint close requests
  std::vector<std::pair<SendDone, absl::Status>> ready;
  std::vector<uint64_t> reap_msgs;
  std::vector<uint64_t> reap_recvs;
  std::vector<AckOp*> reap_acks;
  std::map<uintptr_t, Region> regions;  // by start address
  std::vector<ucp_mem_h> retired_memh;  // replaced regions, which sends in flight may use
};

absl::Status UcxTransport::State::Init() {
  if (receiver == nullptr) return absl::InvalidArgumentError("UcxTransport needs a receiver");
  if (options.send_timeout.count() <= 0) {
    return absl::InvalidArgumentError("UcxTransport: send_timeout must be positive");
  }
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return UcsError("reading the UCX configuration (UCX_* environment)", s);
  ucp_params_t params = {};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  // Wakeup: the progress thread sleeps on the worker's event fd.
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (s != UCS_OK) {
    context = nullptr;
    return UcsError("starting UCX", s);
  }
  ucp_context_attr_t context_attr = {};
  context_attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  s = ucp_context_query(context, &context_attr);
  if (s != UCS_OK) return UcsError("querying the UCX context", s);
  cuda = context_attr.memory_types &
         (UCS_BIT(UCS_MEMORY_TYPE_CUDA) | UCS_BIT(UCS_MEMORY_TYPE_CUDA_MANAGED));
  host_only = context_attr.memory_types == UCS_BIT(UCS_MEMORY_TYPE_HOST);
  resources = ListResources(context);

  ucp_worker_params_t worker_params = {};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // Init and the destructor touch the worker from the caller's thread,
  // everything else from the progress thread: never at the same time.
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  s = ucp_worker_create(context, &worker_params, &worker);
  if (s != UCS_OK) {
    worker = nullptr;
    return UcsError("creating the UCX worker", s);
  }
  ucp_worker_attr_t worker_attr = {};
  worker_attr.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS | UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  s = ucp_worker_query(worker, &worker_attr);
  if (s != UCS_OK) return UcsError("querying the UCX worker", s);
  const std::string worker_address(reinterpret_cast<const char*>(worker_attr.address),
                                   worker_attr.address_length);
  ucp_worker_release_address(worker, worker_attr.address);

  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  label = absl::StrCat(options.name, "@", host, ":", getpid());
  if (label.size() > kMaxLabelBytes) label.resize(kMaxLabelBytes);
  address = EncodeAddress(label, worker_address);
  const size_t frame_bytes = kDataFrameFixedBytes + address.size() + kMaxHeaderBytes;
  if (address.size() > UINT16_MAX || worker_attr.max_am_header < frame_bytes) {
    return absl::FailedPreconditionError(
        absl::StrCat("UCX allows active message headers of ", worker_attr.max_am_header,
                     " bytes; this transport needs ", frame_bytes,
                     " (its worker address is long: restrict UCX_TLS or UCX_NET_DEVICES)"));
  }

  const std::pair<unsigned, ucp_am_recv_callback_t> handlers[] = {{kDataAm, &DataHandler},
                                                                  {kAckAm, &AckHandler}};
  for (const auto& [id, cb] : handlers) {
    ucp_am_handler_param_t handler = {};
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                         UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    handler.id = id;
    handler.flags = UCP_AM_FLAG_WHOLE_MSG;  // eager messages arrive in one piece
    handler.cb = cb;
    handler.arg = this;
    s = ucp_worker_set_am_recv_handler(worker, &handler);
    if (s != UCS_OK) return UcsError("setting a UCX active message handler", s);
  }

  int worker_fd = -1;
  s = ucp_worker_get_efd(worker, &worker_fd);
  if (s != UCS_OK) return UcsError("getting the UCX worker's event fd", s);
  wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  if (wake_fd < 0 || epoll_fd < 0) {
    return absl::InternalError(absl::StrCat("UcxTransport: eventfd/epoll: ", strerror(errno)));
  }
  for (int fd : {worker_fd, wake_fd}) {
    epoll_event ev = {};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return absl::InternalError(absl::StrCat("UcxTransport: epoll_ctl: ", strerror(errno)));
    }
  }
  STRATA_LOG_INFO("UCX transport {}: resources [{}], memory types [{}], address {} bytes", label,
                  resources, MemoryTypeNames(context_attr.memory_types), address.size());
  thread = std::thread([this] { Run(); });
  thread_id = thread.get_id();
  started.Notify();
  return absl::OkStatus();
}

UcxTransport::State::~State() {
  if (thread.joinable()) {
    {
      absl::MutexLock lock(&mu);
      stopping = true;
    }
    Wake();
    thread.join();
  }
  DestroyUcx();  // done by Shutdown unless Init failed before the thread ran
  if (epoll_fd >= 0) close(epoll_fd);
  if (wake_fd >= 0) close(wake_fd);
  // The messages, peers and acks go with the members: the worker that
  // could call back into them is gone.
}

void UcxTransport::State::DestroyUcx() {
  for (auto& [start, region] : regions) retired_memh.push_back(region.memh);
  regions.clear();
  for (ucp_mem_h memh : retired_memh) {
    const ucs_status_t s = ucp_mem_unmap(context, memh);
    if (s != UCS_OK) STRATA_LOG_WARN("{}: ucp_mem_unmap: {}", label, ucs_status_string(s));
  }
  retired_memh.clear();
  if (worker != nullptr) ucp_worker_destroy(worker);
  worker = nullptr;
  if (context != nullptr) ucp_cleanup(context);
  context = nullptr;
}

void UcxTransport::State::Wake() {
  const uint64_t one = 1;
  // EAGAIN (the counter is full) still leaves the fd readable.
  [[maybe_unused]] ssize_t n = write(wake_fd, &one, sizeof(one));
}

void UcxTransport::State::Run() {
  started.WaitForNotification();  // until Init has set thread_id
  for (;;) {
    std::vector<std::unique_ptr<OutMsg>> sends;
    std::vector<std::function<void()>> tasks;
    bool stop;
    {
      absl::MutexLock lock(&mu);
      sends.swap(posted_sends);
      tasks.swap(posted_tasks);
      stop = stopping;
    }
    for (auto& task : tasks) task();
    if (stop) {
      // Not sent: Shutdown fails them with the rest.
      for (auto& send : sends) {
        send->local_done = true;
        msgs.emplace(send->id, std::move(send));
      }
      break;
    }
    for (auto& send : sends) Submit(std::move(send));
    bool busy = false;
    // Bounded, so that posted work and deadlines are seen under load.
    for (int i = 0; i < 64 && ucp_worker_progress(worker) != 0; ++i) busy = true;
    AfterProgress();
    if (busy) continue;
    {
      // Sends that callbacks on this thread posted (a completion that sends
      // the next message) did not wake it: submit them before sleeping.
      absl::MutexLock lock(&mu);
      if (!posted_sends.empty() || !posted_tasks.empty() || stopping) continue;
    }
    const ucs_status_t s = ucp_worker_arm(worker);
    if (s == UCS_ERR_BUSY) continue;  // events arrived meanwhile
    if (s != UCS_OK) STRATA_LOG_WARN("{}: ucp_worker_arm: {}", label, ucs_status_string(s));
    // Wake at least every 100 ms (UCX's keepalive runs in progress), and
    // every 10 ms while sends wait, to keep their deadlines.
    epoll_event events[2];
    epoll_wait(epoll_fd, events, 2, msgs.empty() ? 100 : 10);
    uint64_t count;
    [[maybe_unused]] ssize_t n = read(wake_fd, &count, sizeof(count));
  }
  Shutdown();
}

void UcxTransport::State::SetMemory(ucp_request_param_t& param, const void* data,
                                    size_t bytes) const {
  if (host_only) {
    // Nothing else can be here: spare UCX the memory type lookup.
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    param.memory_type = UCS_MEMORY_TYPE_HOST;
  }
  const auto start = reinterpret_cast<uintptr_t>(data);
  auto it = regions.upper_bound(start);
  if (bytes == 0 || it == regions.begin()) return;
  --it;
  if (start + bytes <= it->first + it->second.bytes) {
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    param.memh = it->second.memh;
  }
}

absl::Status UcxTransport::State::MapMemory(void* data, size_t bytes) {
  const auto start = reinterpret_cast<uintptr_t>(data);
  if (auto it = regions.find(start); it != regions.end() && it->second.bytes == bytes) {
    return absl::OkStatus();
  }
  ucp_mem_map_params_t params = {};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = data;
  params.length = bytes;
  ucp_mem_h memh = nullptr;
  const ucs_status_t s = ucp_mem_map(context, &params, &memh);
  if (s != UCS_OK) return UcsError(absl::StrCat("registering ", bytes, " bytes with UCX"), s);
  auto [it, inserted] = regions.try_emplace(start, Region{bytes, memh});
  if (!inserted) {
    retired_memh.push_back(it->second.memh);
    it->second = Region{bytes, memh};
  }
  return absl::OkStatus();
}

absl::StatusOr<UcxTransport::State::Peer*> UcxTransport::State::GetPeer(
    const std::string& peer_address) {
  if (auto it = peers.find(peer_address); it != peers.end()) return it->second.get();
  STRATA_ASSIGN_OR_RETURN(const ParsedAddress parsed, ParseAddress(peer_address));
  auto peer = std::make_unique<Peer>();
  peer->state = this;
  peer->address = peer_address;
  peer->label = std::string(parsed.label);
  ucp_ep_params_t params = {};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(parsed.worker.data());
  // Peer failures are reported (EndpointError) instead of being fatal.
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &EndpointError;
  params.err_handler.arg = peer.get();
  const ucs_status_t s = ucp_ep_create(worker, &params, &peer->ep);
  if (s != UCS_OK) {
    const std::string what =
        absl::StrCat("connecting to peer ", peer->label, ": ", ucs_status_string(s));
    // Should UCX have reported the failure to the error callback too.
    std::erase_if(failed_peers, [&](const auto& f) { return f.first == peer.get(); });
    // An address UCX cannot parse is the caller's error; anything else
    // (no common transport, no route) means the peer cannot be reached.
    return s == UCS_ERR_INVALID_PARAM || s == UCS_ERR_INVALID_ADDR
               ? absl::InvalidArgumentError(what)
               : absl::UnavailableError(what);
  }
  Peer* raw = peer.get();
  peers.emplace(peer_address, std::move(peer));
  return raw;
}

void UcxTransport::State::Submit(std::unique_ptr<OutMsg> owned) {
  OutMsg* msg = owned.get();
  msgs.emplace(msg->id, std::move(owned));
  absl::StatusOr<Peer*> peer = GetPeer(msg->peer_address);
  if (!peer.ok()) {
    msg->local_done = true;
    SetFinal(msg, peer.status());
    MaybeComplete(msg);
    return;
  }
  msg->peer = *peer;
  ucp_request_param_t param = {};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.cb.send = &SendCallback;
  param.user_data = msg;
  const size_t bytes = msg->payload.size();
  param.flags =
      bytes > 0 && bytes >= options.rndv_threshold ? UCP_AM_SEND_FLAG_RNDV : UCP_AM_SEND_FLAG_EAGER;
  SetMemory(param, msg->payload.data(), bytes);
  void* request = ucp_am_send_nbx(msg->peer->ep, kDataAm, msg->frame.data(), msg->frame.size(),
                                  msg->payload.data(), bytes, &param);
  if (request == nullptr) {
    msg->local_done = true;  // sent at once; the ack decides
  } else if (UCS_PTR_IS_ERR(request)) {
    msg->local_done = true;
    SetFinal(msg, absl::UnavailableError(absl::StrCat("sending ", bytes, " bytes to peer ",
                                                      msg->peer_label, ": ",
                                                      ucs_status_string(UCS_PTR_STATUS(request)))));
    MaybeComplete(msg);
  } else {
    msg->request = request;
  }
}

void UcxTransport::State::SetFinal(OutMsg* msg, absl::Status status) {
  if (msg->final.has_value()) return;
  msg->final = std::move(status);
  msg->release_deadline = Clock::now() + kReleaseGrace;
}

void UcxTransport::State::MaybeComplete(OutMsg* msg) {
  if (msg->final.has_value() && !msg->done_ran) {
    if (!msg->local_done && Clock::now() < msg->release_deadline) return;
    if (!msg->local_done) {
      STRATA_LOG_WARN("{}: UCX still holds a {}-byte send to {} {} ms after it failed", label,
                      msg->payload.size(), msg->peer_label,
                      std::chrono::duration_cast<std::chrono::milliseconds>(kReleaseGrace).count());
    }
    ready.emplace_back(std::move(msg->done), *msg->final);
    msg->done_ran = true;
  }
  if (msg->done_ran && msg->local_done) reap_msgs.push_back(msg->id);
}

void UcxTransport::State::SendCallback(void* request, ucs_status_t status, void* user_data) {
  auto* msg = static_cast<OutMsg*>(user_data);
  ucp_request_free(request);
  msg->request = nullptr;
  msg->local_done = true;
  if (status != UCS_OK) {
    msg->state->SetFinal(msg, absl::UnavailableError(
                                  absl::StrCat("sending ", msg->payload.size(), " bytes to peer ",
                                               msg->peer_label, ": ", ucs_status_string(status))));
  }
  msg->state->MaybeComplete(msg);
}

void UcxTransport::State::EndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* peer = static_cast<Peer*>(arg);
  if (peer->down || peer->failing) return;
  peer->failing = true;
  // Handled after progress returns: closing an endpoint from its own error
  // callback is not allowed.
  peer->state->failed_peers.emplace_back(peer, status);
}

void UcxTransport::State::CloseEndpoint(Peer* peer) {
  peer->down = true;
  if (peer->ep == nullptr) return;
  ucp_request_param_t param = {};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  // Force: drop what is queued (its requests complete with an error)
  // rather than wait for a peer that may be gone.
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* request = ucp_ep_close_nbx(peer->ep, &param);
  peer->ep = nullptr;
  if (UCS_PTR_IS_PTR(request)) {
    closing.push_back(request);
  } else if (UCS_PTR_IS_ERR(request)) {
    STRATA_LOG_WARN("{}: closing the endpoint to {}: {}", label, peer->label,
                    ucs_status_string(UCS_PTR_STATUS(request)));
  }
}

void UcxTransport::State::PeerDown(Peer* peer, const absl::Status& why) {
  if (peer->down) return;
  if (auto it = peers.find(peer->address); it != peers.end() && it->second.get() == peer) {
    dead_peers.push_back(std::move(it->second));
    peers.erase(it);
  }
  // Verdicts first, so that the cancellations the close causes do not
  // replace them.
  const absl::Status gone = absl::UnavailableError(
      absl::StrCat("peer ", peer->label, " is unreachable: ", why.message()));
  for (auto& [id, msg] : msgs) {
    if (msg->peer == peer) SetFinal(msg.get(), gone);
  }
  CloseEndpoint(peer);
  for (auto& [id, msg] : msgs) {
    if (msg->peer == peer) MaybeComplete(msg.get());
  }
  // Their memory goes back when UCX fails their requests (it does so for
  // the requests of a failed endpoint), so that it can no longer write
  // there; CheckDeadlines gives up waiting after a grace period.
  for (auto& [key, in] : recvs) {
    if (!in->landed && in->peer == peer->address) in->give_up_at = Clock::now() + kReleaseGrace;
  }
  STRATA_LOG_WARN("{}: peer {} failed: {}", label, peer->label, std::string(why.message()));
  receiver->PeerFailed(peer->address, why);
}

void UcxTransport::State::QueueAck(const std::string& peer, uint64_t id,
                                   const absl::Status& status) {
  acks.push_back({peer, id, status});
}

void UcxTransport::State::SendAcks() {
  std::vector<PendingAck> batch;
  batch.swap(acks);
  for (PendingAck& ack : batch) {
    absl::StatusOr<Peer*> peer = GetPeer(ack.peer);
    if (!peer.ok()) {
      STRATA_LOG_WARN("{}: cannot ack message {}: {}", label, ack.id, peer.status().ToString());
      continue;
    }
    auto op = std::make_unique<AckOp>();
    op->state = this;
    const absl::string_view message = ack.status.message().substr(0, kMaxAckMessageBytes);
    op->frame.reserve(kAckFixedBytes + message.size());
    op->frame.push_back(static_cast<char>(kFrameVersion));
    PutU64(op->frame, ack.id);
    PutU32(op->frame, static_cast<uint32_t>(ack.status.code()));
    PutU32(op->frame, static_cast<uint32_t>(message.size()));
    op->frame.append(message.data(), message.size());
    ucp_request_param_t param = {};
    param.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    param.cb.send = &AckCallback;
    param.user_data = op.get();
    param.flags = UCP_AM_SEND_FLAG_EAGER;
    void* request = ucp_am_send_nbx((*peer)->ep, kAckAm, op->frame.data(), op->frame.size(),
                                    nullptr, 0, &param);
    if (UCS_PTR_IS_ERR(request)) {
      STRATA_LOG_WARN("{}: acking message {} to {}: {}", label, ack.id, (*peer)->label,
                      ucs_status_string(UCS_PTR_STATUS(request)));
    } else if (request != nullptr) {
      AckOp* raw = op.get();
      acks_in_flight.emplace(raw, std::move(op));
    }
  }
}

void UcxTransport::State::AckCallback(void* request, ucs_status_t, void* user_data) {
  auto* op = static_cast<AckOp*>(user_data);
  ucp_request_free(request);
  // A lost ack is the sender's timeout to find.
  op->state->reap_acks.push_back(op);
}

void UcxTransport::State::RecvCallback(void* request, ucs_status_t status, size_t length,
                                       void* user_data) {
  auto* in = static_cast<InMsg*>(user_data);
  State* state = in->state;
  ucp_request_free(request);
  in->request = nullptr;
  state->reap_recvs.push_back(in->key);
  if (in->landed) return;  // its peer failed meanwhile
  in->landed = true;
  absl::Status result;
  if (status != UCS_OK) {
    result = absl::UnavailableError(
        absl::StrCat("receiving ", in->buffer.size(), " bytes from peer ",
                     UcxTransport::PeerLabel(in->peer), ": ", ucs_status_string(status)));
  } else if (length != in->buffer.size()) {
    result = absl::DataLossError(
        absl::StrCat("received ", length, " bytes of a ", in->buffer.size(), "-byte payload"));
  }
  state->receiver->Landed(in->peer, in->header, in->buffer, result);
  state->QueueAck(in->peer, in->sender_id, result);
}

ucs_status_t UcxTransport::State::DataHandler(void* arg, const void* header, size_t header_length,
                                              void* data, size_t length,
                                              const ucp_am_recv_param_t* param) {
  return static_cast<State*>(arg)->OnData(header, header_length, data, length, param);
}

ucs_status_t UcxTransport::State::AckHandler(void* arg, const void* header, size_t header_length,
                                             void*, size_t, const ucp_am_recv_param_t*) {
  return static_cast<State*>(arg)->OnAck(header, header_length);
}

ucs_status_t UcxTransport::State::OnData(const void* header, size_t header_length, void* data,
                                         size_t length, const ucp_am_recv_param_t* param) {
  const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
  if (shutting_down) return UCS_OK;  // its sender will see this peer go
  Reader r(header, header_length);
  const uint64_t version = r.Uint(1);
  const uint64_t id = r.Uint(8);
  const std::string peer(r.Bytes(r.Uint(2)));
  if (!r.ok() || version != kFrameVersion || r.left() > kMaxHeaderBytes) {
    STRATA_LOG_WARN("{}: dropping a malformed message ({}-byte header)", label, header_length);
    // A rendezvous sender learns of it; an eager one times out.
    return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
  }
  const auto* caller_header = static_cast<const std::byte*>(header) + (header_length - r.left());
  const std::span<const std::byte> user_header(caller_header, r.left());
  absl::StatusOr<std::span<std::byte>> buffer = receiver->Allocate(peer, user_header, length);
  if (!buffer.ok()) {
    // Refused: the data is dropped (a rendezvous sender's UCX request still
    // completes), and the ack carries the receiver's status.
    QueueAck(peer, id, buffer.status());
    return UCS_OK;
  }
  if (buffer->size() != length) {
    const absl::Status wrong = absl::InternalError(
        absl::StrCat("receiver gave ", buffer->size(), " bytes for a ", length, "-byte payload"));
    receiver->Landed(peer, user_header, *buffer, wrong);
    QueueAck(peer, id, wrong);
    return UCS_OK;
  }
  if (!rndv) {
    if (length > 0) std::memcpy(buffer->data(), data, length);
    receiver->Landed(peer, user_header, *buffer, absl::OkStatus());
    QueueAck(peer, id, absl::OkStatus());
    return UCS_OK;
  }
  auto in = std::make_unique<InMsg>();
  in->state = this;
  in->key = next_recv_key++;
  in->sender_id = id;
  in->peer = peer;
  in->header.assign(user_header.begin(), user_header.end());
  in->buffer = *buffer;
  ucp_request_param_t rp = {};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  rp.cb.recv_am = &RecvCallback;
  rp.user_data = in.get();
  SetMemory(rp, buffer->data(), length);
  void* request = ucp_am_recv_data_nbx(worker, data, buffer->data(), length, &rp);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {
    absl::Status result;
    if (request != nullptr) {
      result = absl::UnavailableError(absl::StrCat("receiving ", length, " bytes from peer ",
                                                   UcxTransport::PeerLabel(peer), ": ",
                                                   ucs_status_string(UCS_PTR_STATUS(request))));
    }
    receiver->Landed(peer, user_header, *buffer, result);
    QueueAck(peer, id, result);
    return UCS_OK;
  }
  in->request = request;
  recvs.emplace(in->key, std::move(in));
  // An endpoint to the sender now, not when the ack goes: its error
  // callback is what reports the sender's failure mid-transfer.
  connect.push_back(peer);
  return UCS_OK;
}

ucs_status_t UcxTransport::State::OnAck(const void* header, size_t header_length) {
  Reader r(header, header_length);
  const uint64_t version = r.Uint(1);
  const uint64_t id = r.Uint(8);
  const uint64_t code = r.Uint(4);
  const std::string_view message = r.Bytes(r.Uint(4));
  if (!r.ok() || version != kFrameVersion) {
    STRATA_LOG_WARN("{}: dropping a malformed ack ({} bytes)", label, header_length);
    return UCS_OK;
  }
  auto it = msgs.find(id);
  if (it == msgs.end()) return UCS_OK;  // late: the send already failed
  absl::Status status;
  if (code != 0) {
    status = absl::Status(code <= static_cast<uint64_t>(absl::StatusCode::kUnauthenticated)
                              ? static_cast<absl::StatusCode>(code)
                              : absl::StatusCode::kUnknown,
                          absl::string_view(message.data(), message.size()));
  }
  SetFinal(it->second.get(), std::move(status));
  MaybeComplete(it->second.get());
  return UCS_OK;
}

void UcxTransport::State::CheckDeadlines(Clock::time_point now) {
  for (auto& [key, in] : recvs) {
    if (in->landed || !in->give_up_at.has_value() || now < *in->give_up_at) continue;
    STRATA_LOG_WARN("{}: UCX still holds a {}-byte receive from failed peer {}", label,
                    in->buffer.size(), UcxTransport::PeerLabel(in->peer));
    in->landed = true;
    receiver->Landed(in->peer, in->header, in->buffer,
                     absl::UnavailableError(absl::StrCat("peer ", UcxTransport::PeerLabel(in->peer),
                                                         " failed mid-transfer")));
  }
  std::vector<Peer*> stuck;
  for (auto& [id, owned] : msgs) {
    OutMsg* msg = owned.get();
    if (msg->final.has_value()) {
      if (!msg->done_ran && now >= msg->release_deadline) MaybeComplete(msg);
      continue;
    }
    if (now < msg->deadline) continue;
    SetFinal(msg, absl::DeadlineExceededError(absl::StrCat(
                      "peer ", msg->peer_label, " did not confirm a ", msg->payload.size(),
                      "-byte message within ", options.send_timeout.count(), " ms")));
    if (!msg->local_done && msg->peer != nullptr && !msg->peer->down) stuck.push_back(msg->peer);
    MaybeComplete(msg);
  }
  for (Peer* peer : stuck) {
    // UCX 1.13 cannot cancel a send: closing the endpoint is what makes it
    // let go of the payload.
    PeerDown(peer, absl::DeadlineExceededError(absl::StrCat("a send was not confirmed within ",
                                                            options.send_timeout.count(),
                                                            " ms; endpoint closed")));
  }
}

void UcxTransport::State::AfterProgress() {
  while (!failed_peers.empty()) {
    std::vector<std::pair<Peer*, ucs_status_t>> batch;
    batch.swap(failed_peers);
    for (auto [peer, status] : batch) {
      PeerDown(peer, absl::UnavailableError(ucs_status_string(status)));
    }
  }
  for (const std::string& peer : connect) {
    if (absl::StatusOr<Peer*> p = GetPeer(peer); !p.ok()) {
      STRATA_LOG_WARN("{}: connecting back to a sender: {}", label, p.status().ToString());
    }
  }
  connect.clear();
  SendAcks();
  CheckDeadlines(Clock::now());
  PollClosing();
  RunReady();
}

void UcxTransport::State::PollClosing() {
  for (size_t i = 0; i < closing.size();) {
    if (ucp_request_check_status(closing[i]) == UCS_INPROGRESS) {
      ++i;
      continue;
    }
    ucp_request_free(closing[i]);
    closing[i] = closing.back();
    closing.pop_back();
  }
}

void UcxTransport::State::RunReady() {
  while (!ready.empty()) {
    std::vector<std::pair<SendDone, absl::Status>> batch;
    batch.swap(ready);
    for (auto& [done, status] : batch) done(std::move(status));
  }
  for (uint64_t id : reap_msgs) msgs.erase(id);
  reap_msgs.clear();
  for (uint64_t key : reap_recvs) recvs.erase(key);
  reap_recvs.clear();
  for (AckOp* op : reap_acks) acks_in_flight.erase(op);
  reap_acks.clear();
}

void UcxTransport::State::Shutdown() {
  const absl::Status stopped = absl::CancelledError(
      absl::StrCat("UCX transport ", label, " stopped before the peer confirmed the message"));
  shutting_down = true;
  for (auto& [id, msg] : msgs) SetFinal(msg.get(), stopped);
  for (auto& [address, peer] : peers) CloseEndpoint(peer.get());
  // Let UCX fail (or finish) what the closed endpoints carried, so that
  // completions and Landed run once UCX no longer touches the memory.
  const auto deadline = Clock::now() + kShutdownGrace;
  auto unsettled = [&] {
    if (!closing.empty()) return true;
    for (auto& [id, msg] : msgs) {
      if (!msg->local_done) return true;
    }
    for (auto& [key, in] : recvs) {
      if (in->request != nullptr) return true;
    }
    return false;
  };
  while (unsettled() && Clock::now() < deadline) {
    if (ucp_worker_progress(worker) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    PollClosing();
  }
  for (void* request : closing) ucp_request_free(request);
  closing.clear();
  // Whatever is left, UCX lets go of with the worker.
  DestroyUcx();
  const absl::Status cancelled =
      absl::CancelledError(absl::StrCat("UCX transport ", label, " stopped"));
  for (auto& [key, in] : recvs) {
    if (in->landed) continue;
    in->landed = true;
    receiver->Landed(in->peer, in->header, in->buffer, cancelled);
  }
  for (auto& [id, msg] : msgs) {
    if (!msg->done_ran) {
      ready.emplace_back(std::move(msg->done), *msg->final);
      msg->done_ran = true;
    }
  }
  acks.clear();  // no acks go out any more
  connect.clear();
  RunReady();
}

UcxTransport::UcxTransport(std::unique_ptr<State> state) : state_(std::move(state)) {}

UcxTransport::~UcxTransport() = default;

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(
    const UcxTransportOptions& options, Receiver* receiver) {
  auto state = std::make_unique<State>(options, receiver);
  STRATA_RETURN_IF_ERROR(state->Init());
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(state)));
}

std::string UcxTransport::local_address() const { return state_->address; }

bool UcxTransport::supports_cuda_memory() const { return state_->cuda; }

const std::string& UcxTransport::resources() const { return state_->resources; }

std::string UcxTransport::PeerLabel(std::string_view address) {
  absl::StatusOr<ParsedAddress> parsed = ParseAddress(address);
  return parsed.ok() ? std::string(parsed->label) : std::string();
}

absl::Status UcxTransport::Send(std::string_view peer_address, std::span<const std::byte> header,
                                std::span<const std::byte> payload, SendDone done) {
  if (header.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("message header of ", header.size(), " bytes; at most ", kMaxHeaderBytes));
  }
  if (!done) return absl::InvalidArgumentError("Send needs a completion");
  STRATA_ASSIGN_OR_RETURN(const ParsedAddress parsed, ParseAddress(peer_address));
  State& s = *state_;
  auto msg = std::make_unique<State::OutMsg>();
  msg->state = &s;
  msg->peer_address = std::string(peer_address);
  msg->peer_label = std::string(parsed.label);
  msg->payload = payload;
  msg->done = std::move(done);
  msg->deadline = Clock::now() + s.options.send_timeout;
  msg->frame.reserve(kDataFrameFixedBytes + s.address.size() + header.size());
  msg->frame.push_back(static_cast<char>(kFrameVersion));
  PutU64(msg->frame, 0);  // the id, below
  PutU16(msg->frame, static_cast<uint16_t>(s.address.size()));
  msg->frame.append(s.address);
  msg->frame.append(reinterpret_cast<const char*>(header.data()), header.size());
  {
    absl::MutexLock lock(&s.mu);
    if (s.stopping) return absl::FailedPreconditionError("UCX transport is stopping");
    msg->id = s.next_id++;
    for (int i = 0; i < 8; ++i) msg->frame[1 + i] = static_cast<char>(msg->id >> (8 * i));
    s.posted_sends.push_back(std::move(msg));
  }
  // The progress thread itself (a callback sending) looks at posted sends
  // before it sleeps: a wakeup would cost it two system calls per message.
  if (std::this_thread::get_id() != s.thread_id) s.Wake();
  return absl::OkStatus();
}

absl::Status UcxTransport::RegisterMemory(void* data, size_t bytes) {
  if (data == nullptr || bytes == 0) {
    return absl::InvalidArgumentError("RegisterMemory needs a non-empty range");
  }
  State& s = *state_;
  if (std::this_thread::get_id() == s.thread_id) return s.MapMemory(data, bytes);
  absl::Notification mapped;
  absl::Status result;
  {
    absl::MutexLock lock(&s.mu);
    if (s.stopping) return absl::FailedPreconditionError("UCX transport is stopping");
    s.posted_tasks.push_back([&] {
      result = s.MapMemory(data, bytes);
      mapped.Notify();
    });
  }
  s.Wake();
  mapped.WaitForNotification();
  return result;
}

}  // namespace strata::kvtier

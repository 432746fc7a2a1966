#include "bench/transfer_bench.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kvtier/kv_wire.h"
#include "kvtier/ucx_transport.h"

extern char** environ;

namespace strata::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kHelloMagic[4] = {'S', 'T', 'B', '1'};
constexpr char kEndMagic[4] = {'E', 'N', 'D', '1'};
// The page record shape a payload of N bytes stands for: bf16, one KV head
// of 64, 16-token pages, N / 4096 layers (a layer's K and V page is 4 KiB).
constexpr int64_t kLayerBytes = 2 * 16 * 1 * 64 * 2;
constexpr int64_t kMaxPayload = int64_t{65535} * kLayerBytes;  // layers is a u16
// The receiver's ring: at most this many bytes.
constexpr int64_t kMaxRingBytes = int64_t{8} << 30;
// How long the sender waits for the receiver's answers, and a parent for
// its child's "listening" line and exit.
constexpr int kControlTimeoutMs = 30000;
constexpr auto kChildExitGrace = std::chrono::seconds(10);

kvtier::KvWireFormat FormatFor(int64_t payload_bytes) {
  kvtier::KvWireFormat f;
  f.layers = static_cast<int>(payload_bytes / kLayerBytes);
  f.kv_heads = 1;
  f.head_dim = 64;
  f.page_size = 16;
  f.dtype = engine::DType::kBF16;
  return f;
}

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

// Closes a file descriptor when it goes.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Anonymous pages, faulted in up front so that the first pass over them
// does not time page faults; unmapped when it goes.
class Pages {
 public:
  static absl::StatusOr<Pages> Map(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) return Errno(absl::StrCat("mapping ", bytes, " bytes"));
    Pages pages;
    pages.data_ = static_cast<std::byte*>(p);
    pages.bytes_ = bytes;
    return pages;
  }
  Pages() = default;
  Pages(Pages&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  Pages& operator=(Pages&& o) noexcept {
    if (this != &o) {
      Unmap();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~Pages() { Unmap(); }
  std::byte* data() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  void Unmap() {
    if (data_ != nullptr) munmap(data_, bytes_);
    data_ = nullptr;
  }
  std::byte* data_ = nullptr;
  size_t bytes_ = 0;
};

// Waits until `fd` is readable; DeadlineExceeded after timeout_ms (< 0:
// no limit).
absl::Status WaitReadable(int fd, int timeout_ms, const char* what) {
  pollfd p = {fd, POLLIN, 0};
  for (;;) {
    const int n = poll(&p, 1, timeout_ms);
    if (n > 0) return absl::OkStatus();
    if (n == 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("no ", what, " within ", timeout_ms / 1000, " s"));
    }
    if (errno != EINTR) return Errno("poll");
  }
}

absl::Status WriteAll(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return Errno("writing to the control connection");
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// Reads exactly n bytes; Unavailable at EOF or an error.
absl::Status ReadAll(int fd, void* data, size_t n, int timeout_ms, const char* what) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    STRATA_RETURN_IF_ERROR(WaitReadable(fd, timeout_ms, what));
    const ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Errno(absl::StrCat("reading the ", what));
    if (r == 0) return absl::UnavailableError(absl::StrCat("the peer closed before the ", what));
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t GetUint(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t{static_cast<uint8_t>(p[i])} << (8 * i);
  return v;
}

absl::Status ReadU64s(int fd, std::span<uint64_t> out, int timeout_ms, const char* what) {
  std::string buf(out.size() * 8, '\0');
  STRATA_RETURN_IF_ERROR(ReadAll(fd, buf.data(), buf.size(), timeout_ms, what));
  for (size_t i = 0; i < out.size(); ++i) out[i] = GetUint(buf.data() + 8 * i, 8);
  return absl::OkStatus();
}

// "HOST:PORT" (the last colon splits, so "[::1]:80" and "::1:80" work).
absl::StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", address, "\" is not HOST:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return std::make_pair(host, address.substr(colon + 1));
}

absl::StatusOr<Fd> Connect(const std::string& address) {
  STRATA_ASSIGN_OR_RETURN(const auto host_port, SplitHostPort(address));
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* list = nullptr;
  const int rc = getaddrinfo(host_port.first.c_str(), host_port.second.c_str(), &hints, &list);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolving ", address, ": ", gai_strerror(rc)));
  }
  absl::Status last = absl::UnavailableError(absl::StrCat("no address for ", address));
  Fd fd;
  for (addrinfo* a = list; a != nullptr; a = a->ai_next) {
    Fd s(socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (s.get() < 0) {
      last = Errno("socket");
      continue;
    }
    if (connect(s.get(), a->ai_addr, a->ai_addrlen) == 0) {
      fd = std::move(s);
      break;
    }
    last = Errno(absl::StrCat("connecting to the transfer receiver at ", address));
  }
  freeaddrinfo(list);
  if (fd.get() < 0) return last;
  const int one = 1;
  setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// The receiver's side of one session: lands each payload in a free slot of
// its ring. Allocate and Landed run on the transport's thread; the counts
// are read by the session's thread.
class RingReceiver final : public kvtier::Transport::Receiver {
 public:
  // slots 0: one buffer that every message lands in, at once (what
  // ucx_perftest does; the bytes are not looked at).
  RingReceiver(std::byte* ring, int slots, int64_t slot_bytes)
      : ring_(ring), slot_bytes_(slot_bytes), shared_(slots == 0) {
    for (int i = slots - 1; i >= 0; --i) free_.push_back(i);
  }

  absl::StatusOr<std::span<std::byte>> Allocate(std::string_view, std::span<const std::byte> header,
                                                size_t payload_bytes) override {
    // What a decode worker checks before it takes a block.
    absl::StatusOr<kvtier::KvBlockHeader> parsed =
        kvtier::ParseKvBlockHeader(header, FormatFor(static_cast<int64_t>(payload_bytes)));
    absl::MutexLock lock(&mu_);
    if (!parsed.ok() || static_cast<int64_t>(payload_bytes) > slot_bytes_ ||
        (free_.empty() && !shared_)) {
      ++refused_;
      if (!parsed.ok()) return parsed.status();
      return absl::ResourceExhaustedError(absl::StrCat("no free ", slot_bytes_, "-byte slot for a ",
                                                       payload_bytes, "-byte payload"));
    }
    if (shared_) return std::span<std::byte>(ring_, payload_bytes);
    const int slot = free_.back();
    free_.pop_back();
    return std::span<std::byte>(ring_ + slot * slot_bytes_, payload_bytes);
  }

  void Landed(std::string_view, std::span<const std::byte>, std::span<std::byte> payload,
              absl::Status status) override {
    absl::MutexLock lock(&mu_);
    if (!shared_) free_.push_back(static_cast<int>((payload.data() - ring_) / slot_bytes_));
    ++(status.ok() ? landed_ : failed_);
  }

  void PeerFailed(std::string_view peer, const absl::Status& status) override {
    STRATA_LOG_WARN("transfer receiver: sender {} failed: {}",
                    kvtier::UcxTransport::PeerLabel(peer), std::string(status.message()));
  }

  std::array<uint64_t, 3> Counts() {
    absl::MutexLock lock(&mu_);
    return {landed_, failed_, refused_};
  }

 private:
  std::byte* const ring_;
  const int64_t slot_bytes_;
  const bool shared_;
  absl::Mutex mu_;
  std::vector<int> free_ ABSL_GUARDED_BY(mu_);
  uint64_t landed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t failed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t refused_ ABSL_GUARDED_BY(mu_) = 0;
};

// Hides warnings while a finished session's transports close: each may see
// the other's endpoint close first and warn that its peer failed, which
// says nothing about the run (its counts were checked). Leaves a level
// below warn (info, debug) that the user asked for alone.
class QuietTeardown {
 public:
  QuietTeardown() : saved_(internal::Logger().level()) {
    if (saved_ == spdlog::level::warn) internal::Logger().set_level(spdlog::level::err);
  }
  ~QuietTeardown() { internal::Logger().set_level(saved_); }
  QuietTeardown(const QuietTeardown&) = delete;
  QuietTeardown& operator=(const QuietTeardown&) = delete;

 private:
  const spdlog::level::level_enum saved_;
};

// A sender receives nothing: it refuses whatever arrives.
class NoReceiver final : public kvtier::Transport::Receiver {
 public:
  absl::StatusOr<std::span<std::byte>> Allocate(std::string_view, std::span<const std::byte>,
                                                size_t) override {
    return absl::FailedPreconditionError("the transfer benchmark's sender receives nothing");
  }
  void Landed(std::string_view, std::span<const std::byte>, std::span<std::byte>,
              absl::Status) override {}
  void PeerFailed(std::string_view, const absl::Status&) override {}
};

absl::Status SendAnswer(int fd, const absl::Status& status, std::string_view body) {
  std::string out;
  const std::string text = status.ok() ? std::string(body) : std::string(status.message());
  PutU32(out, static_cast<uint32_t>(status.code()));
  PutU32(out, static_cast<uint32_t>(text.size()));
  out.append(text);
  return WriteAll(fd, out.data(), out.size());
}

// One sender's session on an accepted connection.
absl::Status ServeSession(int fd) {
  char hello[16];
  // The hello follows the connect at once.
  STRATA_RETURN_IF_ERROR(ReadAll(fd, hello, sizeof(hello), kControlTimeoutMs, "sender's hello"));
  if (std::memcmp(hello, kHelloMagic, 4) != 0) {
    return absl::InvalidArgumentError("not a transfer benchmark sender (bad hello)");
  }
  const int64_t slots = static_cast<int64_t>(GetUint(hello + 4, 4));
  const int64_t slot_bytes = static_cast<int64_t>(GetUint(hello + 8, 8));
  if (slots > 65536 || slot_bytes < 4096 || slot_bytes > kMaxPayload ||
      slots * slot_bytes > kMaxRingBytes) {
    const absl::Status bad = absl::InvalidArgumentError(absl::StrCat(
        "a ring of ", slots, " slots of ", slot_bytes, " bytes is more than this receiver keeps"));
    (void)SendAnswer(fd, bad, "");
    return bad;
  }
  absl::StatusOr<Pages> ring =
      Pages::Map(static_cast<size_t>(std::max<int64_t>(slots, 1) * slot_bytes));
  if (!ring.ok()) {
    (void)SendAnswer(fd, ring.status(), "");
    return ring.status();
  }
  RingReceiver receiver(ring->data(), static_cast<int>(slots), slot_bytes);
  // Declared after the ring and the receiver: it goes first.
  absl::StatusOr<std::unique_ptr<kvtier::UcxTransport>> transport =
      kvtier::UcxTransport::Create({.name = "transfer-receiver"}, &receiver);
  absl::Status ready = transport.status();
  if (ready.ok()) ready = (*transport)->RegisterMemory(ring->data(), ring->size());
  STRATA_RETURN_IF_ERROR(SendAnswer(fd, ready, ready.ok() ? (*transport)->local_address() : ""));
  STRATA_RETURN_IF_ERROR(ready);
  char end[4];
  // As long as the sender runs: no limit. A sender that dies closes it.
  STRATA_RETURN_IF_ERROR(ReadAll(fd, end, sizeof(end), -1, "sender's end"));
  if (std::memcmp(end, kEndMagic, 4) != 0) {
    return absl::InvalidArgumentError("bad end message from the sender");
  }
  const std::array<uint64_t, 3> counts = receiver.Counts();
  std::string out;
  for (uint64_t c : counts) PutU64(out, c);
  QuietTeardown quiet;
  absl::Status written = WriteAll(fd, out.data(), out.size());
  transport->reset();
  return written;
}

// Keeps `window` messages of one size in flight: each completion sends the
// next message from the slot it freed, on the transport's thread, so that
// the next send needs no wakeup of another thread.
class Pump {
 public:
  // Message slots are `slot_stride` bytes apart from `slots` (0: all send
  // from one buffer).
  Pump(kvtier::UcxTransport* transport, const std::string& peer, std::byte* slots,
       int64_t slot_stride, int64_t size, int64_t total, uint64_t transfer_id)
      : transport_(transport),
        peer_(peer),
        slots_(slots),
        slot_stride_(slot_stride),
        size_(size),
        total_(total),
        transfer_id_(transfer_id),
        format_(FormatFor(size)),
        latencies_us_(static_cast<size_t>(total)),
        started_(static_cast<size_t>(total)) {}

  // Runs every message; the wall time from the first send to the last
  // completion.
  absl::StatusOr<double> Run(int window) {
    const int first = static_cast<int>(std::min<int64_t>(window, total_));
    std::vector<int64_t> indices;
    {
      absl::MutexLock lock(&mu_);
      start_ = Clock::now();
      for (int i = 0; i < first; ++i) indices.push_back(issued_++);
    }
    for (int i = 0; i < first; ++i) Issue(indices[static_cast<size_t>(i)], i);
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(this, &Pump::Finished));
    STRATA_RETURN_IF_ERROR(error_);
    return std::chrono::duration<double>(last_done_ - start_).count();
  }

  // Valid after Run: the send-to-completion times, microseconds.
  std::vector<double>& latencies_us() { return latencies_us_; }

 private:
  // Every message sent has completed, and none is left to send (or one
  // failed).
  bool Finished() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return completed_ == issued_ && (issued_ == total_ || !error_.ok());
  }

  void Issue(int64_t index, int slot) {
    kvtier::KvBlockHeader h;
    h.transfer_id = transfer_id_;
    h.index = static_cast<uint32_t>(index);
    h.count = static_cast<uint32_t>(total_);
    h.tokens = 16;
    h.format = format_;
    h.payload_bytes = static_cast<uint64_t>(size_);
    const std::array<std::byte, kvtier::KvBlockHeader::kBytes> header =
        kvtier::EncodeKvBlockHeader(h);
    started_[static_cast<size_t>(index)] = Clock::now();
    const std::span<const std::byte> payload(slots_ + slot * slot_stride_,
                                             static_cast<size_t>(size_));
    // The transport copies the header into its frame; the payload stays put
    // until the completion.
    absl::Status s = transport_->Send(
        peer_, header, payload, [this, index, slot](absl::Status st) { Done(index, slot, st); });
    if (!s.ok()) Done(index, slot, std::move(s));
  }

  void Done(int64_t index, int slot, absl::Status status) {
    const auto now = Clock::now();
    latencies_us_[static_cast<size_t>(index)] =
        std::chrono::duration<double, std::micro>(now - started_[static_cast<size_t>(index)])
            .count();
    int64_t next = -1;
    {
      absl::MutexLock lock(&mu_);
      ++completed_;
      last_done_ = now;
      if (!status.ok() && error_.ok()) {
        error_ = absl::Status(status.code(), absl::StrCat("sending message ", index, " of ", size_,
                                                          " bytes: ", status.message()));
      }
      if (error_.ok() && issued_ < total_) next = issued_++;
    }
    if (next >= 0) Issue(next, slot);
  }

  kvtier::UcxTransport* const transport_;
  const std::string& peer_;
  std::byte* const slots_;
  const int64_t slot_stride_;
  const int64_t size_;
  const int64_t total_;
  const uint64_t transfer_id_;
  const kvtier::KvWireFormat format_;
  // By message index: each written by the thread that sends or completes it.
  std::vector<double> latencies_us_;
  std::vector<Clock::time_point> started_;

  absl::Mutex mu_;
  int64_t issued_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t completed_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  Clock::time_point start_ ABSL_GUARDED_BY(mu_);
  Clock::time_point last_done_ ABSL_GUARDED_BY(mu_);
};

double Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

}  // namespace

absl::StatusOr<int64_t> ParseTransferSize(std::string_view text) {
  const std::string s(absl::StripAsciiWhitespace(std::string(text)));
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  int64_t value = 0;
  if (digits == 0 || !absl::SimpleAtoi(s.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat("\"", s, "\" is not a size (e.g. 16K, 4M)"));
  }
  const std::string unit = absl::AsciiStrToLower(s.substr(digits));
  int shift = -1;
  if (unit.empty() || unit == "b") shift = 0;
  if (unit == "k" || unit == "kib") shift = 10;
  if (unit == "m" || unit == "mib") shift = 20;
  if (unit == "g" || unit == "gib") shift = 30;
  if (shift < 0 || value > (int64_t{1} << (62 - shift))) {
    return absl::InvalidArgumentError(absl::StrCat("\"", s, "\" is not a size (e.g. 16K, 4M)"));
  }
  return value << shift;
}

absl::Status ValidateTransferOptions(const TransferBenchOptions& o) {
  if (o.sizes.empty()) return absl::InvalidArgumentError("--sizes: give at least one size");
  for (int64_t size : o.sizes) {
    if (size < 4096 || size > kMaxPayload || size % 4096 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--sizes: ", size, " bytes; each size must be a multiple of 4 KiB, 4 KiB to 255 MiB"));
    }
  }
  if (o.window < 1 || o.window > 1024) {
    return absl::InvalidArgumentError("--window must be 1 to 1024");
  }
  if (o.count < 0 || o.count > UINT32_MAX) {
    return absl::InvalidArgumentError("--count must be 0 (from --gib) to 2^32-1");
  }
  if (o.count == 0 && o.total_bytes <= 0) return absl::InvalidArgumentError("--gib must be > 0");
  if (o.warmup < -1 || o.warmup > UINT32_MAX) {
    return absl::InvalidArgumentError("--warmup must be >= 0");
  }
  const int64_t largest = *std::max_element(o.sizes.begin(), o.sizes.end());
  if (2 * int64_t{o.window} * largest > kMaxRingBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--window ", o.window, " of ", largest,
                                                   "-byte messages needs a receiver ring over ",
                                                   kMaxRingBytes >> 30, " GiB"));
  }
  if (o.send_timeout.count() <= 0) return absl::InvalidArgumentError("send timeout must be > 0");
  return absl::OkStatus();
}

absl::Status ServeTransferBench(const TransferServeOptions& o) {
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  addrinfo* list = nullptr;
  const std::string port = std::to_string(o.port);
  if (const int rc = getaddrinfo(o.host.c_str(), port.c_str(), &hints, &list); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--host ", o.host, ": not a numeric address: ", gai_strerror(rc)));
  }
  Fd listener(socket(list->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int one = 1;
  absl::Status bound;
  if (listener.get() < 0) {
    bound = Errno("socket");
  } else {
    setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listener.get(), list->ai_addr, list->ai_addrlen) != 0 ||
        listen(listener.get(), 4) != 0) {
      bound = Errno(absl::StrCat("listening on ", o.host, ":", o.port));
    }
  }
  freeaddrinfo(list);
  STRATA_RETURN_IF_ERROR(bound);
  sockaddr_storage addr = {};
  socklen_t len = sizeof(addr);
  if (getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return Errno("getsockname");
  }
  const int actual_port =
      ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                       : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  const std::string shown =
      o.host.find(':') != std::string::npos ? absl::StrCat("[", o.host, "]") : o.host;
  if (o.listening) o.listening(absl::StrCat(shown, ":", actual_port));
  for (;;) {
    // A one-session receiver (a child of the sender) whose sender never
    // comes gives up rather than wait forever.
    if (o.once) STRATA_RETURN_IF_ERROR(WaitReadable(listener.get(), kControlTimeoutMs, "sender"));
    Fd conn(accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (conn.get() < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return Errno("accept");
    }
    setsockopt(conn.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    absl::Status session = ServeSession(conn.get());
    if (o.once) return session;
    if (!session.ok()) {
      STRATA_LOG_WARN("transfer receiver: a session failed: {}", std::string(session.message()));
    }
  }
}

absl::StatusOr<TransferBenchResult> RunTransferBench(const std::string& server,
                                                     const TransferBenchOptions& o) {
  STRATA_RETURN_IF_ERROR(ValidateTransferOptions(o));
  const int64_t largest = *std::max_element(o.sizes.begin(), o.sizes.end());
  STRATA_ASSIGN_OR_RETURN(Fd fd, Connect(server));
  {
    std::string hello(kHelloMagic, 4);
    // Twice the window: a slot is free again only once its Landed ran.
    PutU32(hello, o.one_buffer ? 0 : static_cast<uint32_t>(2 * o.window));
    PutU64(hello, static_cast<uint64_t>(largest));
    STRATA_RETURN_IF_ERROR(WriteAll(fd.get(), hello.data(), hello.size()));
  }
  char head[8];
  STRATA_RETURN_IF_ERROR(
      ReadAll(fd.get(), head, sizeof(head), kControlTimeoutMs, "receiver's answer"));
  const auto code = static_cast<absl::StatusCode>(GetUint(head, 4));
  std::string body(GetUint(head + 4, 4), '\0');
  if (body.size() > (1 << 20)) return absl::InternalError("oversized answer from the receiver");
  STRATA_RETURN_IF_ERROR(
      ReadAll(fd.get(), body.data(), body.size(), kControlTimeoutMs, "receiver's answer"));
  if (code != absl::StatusCode::kOk) {
    return absl::Status(code, absl::StrCat("the transfer receiver at ", server, ": ", body));
  }
  const std::string peer = std::move(body);

  // The source slots outlive the transport (declared after them), which
  // stops reading them when it is destroyed.
  const int64_t stride = o.one_buffer ? 0 : largest;
  STRATA_ASSIGN_OR_RETURN(Pages source,
                          Pages::Map(static_cast<size_t>((o.one_buffer ? 1 : o.window) * largest)));
  // Bytes that are not all zero, in case a transport ever compresses.
  for (size_t i = 0; i < source.size(); i += 8) {
    const uint64_t v = (i + 1) * 0x9E3779B97F4A7C15ull;
    std::memcpy(source.data() + i, &v, 8);
  }
  NoReceiver nothing;
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<kvtier::UcxTransport> transport,
                          kvtier::UcxTransport::Create({.name = "transfer-sender",
                                                        .send_timeout = o.send_timeout,
                                                        .rndv_threshold = o.rndv_threshold},
                                                       &nothing));
  STRATA_RETURN_IF_ERROR(transport->RegisterMemory(source.data(), source.size()));

  TransferBenchResult result;
  result.resources = transport->resources();
  result.window = o.window;
  result.one_buffer = o.one_buffer;
  int64_t sent = 0;
  uint64_t transfer_id = 1;
  const int64_t warmup = o.warmup >= 0 ? o.warmup : 2 * int64_t{o.window};
  for (int64_t size : o.sizes) {
    const int64_t count = o.count > 0 ? o.count : std::max<int64_t>(1, o.total_bytes / size);
    if (warmup > 0) {
      // The endpoint, the first rendezvous of this size, the caches.
      Pump pump(transport.get(), peer, source.data(), stride, size, warmup, transfer_id++);
      STRATA_RETURN_IF_ERROR(pump.Run(o.window).status());
      sent += warmup;
    }
    Pump pump(transport.get(), peer, source.data(), stride, size, count, transfer_id++);
    STRATA_ASSIGN_OR_RETURN(const double seconds, pump.Run(o.window));
    sent += count;
    TransferSizeResult r;
    r.bytes = size;
    r.messages = count;
    r.seconds = seconds;
    r.gbps = seconds > 0 ? static_cast<double>(size * count) / seconds / 1e9 : 0;
    r.p50_us = Percentile(pump.latencies_us(), 0.50);
    r.p99_us = Percentile(pump.latencies_us(), 0.99);
    result.sizes.push_back(r);
  }
  QuietTeardown quiet;
  STRATA_RETURN_IF_ERROR(WriteAll(fd.get(), kEndMagic, 4));
  std::array<uint64_t, 3> counts;
  STRATA_RETURN_IF_ERROR(ReadU64s(fd.get(), counts, kControlTimeoutMs, "receiver's counts"));
  transport.reset();
  result.landed = static_cast<int64_t>(counts[0]);
  result.failed = static_cast<int64_t>(counts[1]);
  result.refused = static_cast<int64_t>(counts[2]);
  if (result.landed != sent || result.failed != 0 || result.refused != 0) {
    return absl::InternalError(absl::StrCat("sent ", sent, " messages; the receiver landed ",
                                            result.landed, ", failed ", result.failed, ", refused ",
                                            result.refused));
  }
  return result;
}

absl::StatusOr<TransferBenchResult> RunTransferBenchWithChild(
    const std::vector<std::string>& serve_args, const TransferBenchOptions& o) {
  STRATA_RETURN_IF_ERROR(ValidateTransferOptions(o));
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return Errno("readlink /proc/self/exe");
  exe[n] = '\0';
  std::vector<std::string> args = {exe};
  args.insert(args.end(), serve_args.begin(), serve_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return Errno("pipe");
  Fd read_end(out[0]);
  Fd write_end(out[1]);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), STDOUT_FILENO);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, exe, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("starting the transfer receiver (", exe, "): ", std::strerror(rc)));
  }
  write_end.Reset();  // EOF on read_end once the child exits
  // Stops the child on every way out; reaps it.
  auto stop_child = [pid](bool kill_now) {
    if (kill_now) kill(pid, SIGKILL);
    const auto deadline = Clock::now() + kChildExitGrace;
    int status = 0;
    for (;;) {
      const pid_t w = waitpid(pid, &status, WNOHANG);
      if (w == pid || (w < 0 && errno != EINTR)) break;
      if (Clock::now() >= deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        return absl::DeadlineExceededError("the transfer receiver did not exit; killed");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("the transfer receiver exited with status ",
                                            WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                                            WIFSIGNALED(status) ? " (signal)" : ""));
  };
  // Its first line: "... listening on HOST:PORT".
  std::string line;
  constexpr std::string_view kListening = "listening on ";
  while (line.find('\n') == std::string::npos) {
    char buf[256];
    absl::Status readable = WaitReadable(read_end.get(), kControlTimeoutMs, "receiver start");
    const ssize_t r = readable.ok() ? read(read_end.get(), buf, sizeof(buf)) : -1;
    if (r <= 0) {
      (void)stop_child(true);
      return readable.ok() ? absl::UnavailableError(
                                 absl::StrCat("the transfer receiver exited before it listened",
                                              line.empty() ? "" : ": ", line))
                           : readable;
    }
    line.append(buf, static_cast<size_t>(r));
  }
  line.resize(line.find('\n'));
  const size_t at = line.find(kListening);
  if (at == std::string::npos) {
    (void)stop_child(true);
    return absl::InternalError(absl::StrCat("unexpected output of the transfer receiver: ", line));
  }
  absl::StatusOr<TransferBenchResult> result =
      RunTransferBench(line.substr(at + kListening.size()), o);
  // It serves one session: it exits once that ended (or, after an error,
  // once the connection closed).
  absl::Status exited = stop_child(false);
  if (result.ok() && !exited.ok()) return exited;
  return result;
}

}  // namespace strata::bench

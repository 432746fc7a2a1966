#include "common/http_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

// Bytes of unread request data discarded after the response, and how long
// to spend on it (see LingeringClose).
constexpr size_t kMaxDrainBytes = 64 * 1024;
constexpr int kDrainTimeoutMs = 250;

const char* ReasonPhrase(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 413:
      return "Payload Too Large";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return status < 400 ? "OK" : "Error";
  }
}

std::string HostPort(const std::string& host, int port) {
  // IPv6 literals need brackets to be unambiguous next to the port.
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host.empty() ? "*" : host, ":", port);
}

// Drops CR and LF so that a handler's content type cannot inject headers.
std::string SanitizeHeaderValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c != '\r' && c != '\n') out.push_back(c);
  }
  return out;
}

std::string SerializeResponse(const HttpResponse& r, bool allow_get_header) {
  int status = r.status;
  if (status < 100 || status > 599) {
    STRATA_LOG_WARN("http: handler returned invalid status {}, sending 500", status);
    status = 500;
  }
  std::string out = absl::StrCat("HTTP/1.1 ", status, " ", ReasonPhrase(status), "\r\n",
                                 "Content-Type: ", SanitizeHeaderValue(r.content_type), "\r\n",
                                 "Content-Length: ", r.body.size(), "\r\n");
  if (allow_get_header) out.append("Allow: GET\r\n");
  out.append("Connection: close\r\n\r\n");
  out.append(r.body);
  return out;
}

HttpResponse TextResponse(int status, std::string body) {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

// How a wait for socket readiness ended.
enum class WaitResult { kReady, kTimeout, kStopped, kError };

// Waits until `fd` has `events`, the deadline passes, or stop_fd becomes
// readable (Stop() was called).
WaitResult WaitFor(int fd, short events, int stop_fd, Clock::time_point deadline) {
  for (;;) {
    const auto now = Clock::now();
    if (now >= deadline) return WaitResult::kTimeout;
    const auto remaining =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    const int r = poll(fds, 2, static_cast<int>(remaining));
    if (r < 0) {
      if (errno == EINTR) continue;
      return WaitResult::kError;
    }
    if (fds[1].revents != 0) return WaitResult::kStopped;
    // POLLHUP/POLLERR count as ready: the following recv/send reports them.
    if (fds[0].revents != 0) return WaitResult::kReady;
  }
}

// Sends all of `data` before the deadline. False if the client went away,
// was too slow, or the server is stopping.
bool SendAll(int fd, const std::string& data, int stop_fd, Clock::time_point deadline) {
  size_t sent = 0;
  while (sent < data.size()) {
    // MSG_NOSIGNAL: a peer that closed early must not kill us with SIGPIPE.
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (WaitFor(fd, POLLOUT, stop_fd, deadline) != WaitResult::kReady) return false;
      continue;
    }
    return false;
  }
  return true;
}

// Closing a socket that still has unread input makes the kernel send RST,
// which can discard our response before the client reads it (e.g. a POST
// body we never read). So: half-close, then briefly read and discard until
// the client closes too.
void LingeringClose(int fd, int stop_fd) {
  shutdown(fd, SHUT_WR);
  const auto deadline = Clock::now() + std::chrono::milliseconds(kDrainTimeoutMs);
  size_t drained = 0;
  char buf[4096];
  while (drained < kMaxDrainBytes) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      drained += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (WaitFor(fd, POLLIN, stop_fd, deadline) != WaitResult::kReady) break;
      continue;
    }
    break;  // EOF or error
  }
  close(fd);
}

// Finds the blank line ending the header block, accepting bare LF line ends
// as RFC 9112 allows. Returns the offset just past it, or 0 if not yet seen.
// Scanning starts at `from` so that a trickling client costs linear time.
size_t FindHeaderEnd(const std::string& buf, size_t from) {
  for (size_t i = from; i < buf.size(); ++i) {
    if (buf[i] != '\n') continue;
    if (i + 1 < buf.size() && buf[i + 1] == '\n') return i + 2;
    if (i + 2 < buf.size() && buf[i + 1] == '\r' && buf[i + 2] == '\n') return i + 3;
  }
  return 0;
}

bool IsTokenChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_' || c == '.' || c == '!' || c == '#' || c == '$' || c == '%' || c == '&' ||
         c == '\'' || c == '*' || c == '+' || c == '^' || c == '`' || c == '|' || c == '~';
}

// Parses "METHOD SP target SP HTTP/1.x". False if malformed.
bool ParseRequestLine(const std::string& header, HttpRequest* req) {
  size_t eol = header.find('\n');
  if (eol == std::string::npos) return false;
  std::string line = header.substr(0, eol);
  if (!line.empty() && line.back() == '\r') line.pop_back();
  const size_t sp1 = line.find(' ');
  if (sp1 == std::string::npos) return false;
  const size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos || line.find(' ', sp2 + 1) != std::string::npos) return false;
  req->method = line.substr(0, sp1);
  const std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string version = line.substr(sp2 + 1);
  if (req->method.empty()) return false;
  for (char c : req->method) {
    if (!IsTokenChar(c)) return false;
  }
  if (version.size() != 8 || version.compare(0, 7, "HTTP/1.") != 0 || version[7] < '0' ||
      version[7] > '9') {
    return false;
  }
  // Only origin-form targets ("/path?query"); we are never a proxy.
  if (target.empty() || target[0] != '/') return false;
  for (char c : target) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) return false;
  }
  const size_t q = target.find('?');
  req->path = target.substr(0, q);
  req->query = q == std::string::npos ? "" : target.substr(q + 1);
  return true;
}

}  // namespace

HttpServer::HttpServer() : HttpServer(Options()) {}

HttpServer::HttpServer(Options options) : options_(std::move(options)) {}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Handle(const std::string& path, HttpHandler handler) {
  if (running_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot add handler for ", path, ": HTTP server already started"));
  }
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP handler path must start with '/': \"", path, "\""));
  }
  if (!handler) return absl::InvalidArgumentError(absl::StrCat("null handler for ", path));
  handlers_[path] = std::move(handler);
  return absl::OkStatus();
}

absl::Status HttpServer::Start(const std::string& host, int port) {
  if (running_) {
    return absl::FailedPreconditionError(
        absl::StrCat("HTTP server already listening on port ", port_.load()));
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("invalid port ", port));
  }

  addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* addrs = nullptr;
  const std::string port_str = std::to_string(port);
  const int gai =
      getaddrinfo(host.empty() ? nullptr : host.c_str(), port_str.c_str(), &hints, &addrs);
  if (gai != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve ", HostPort(host, port), ": ", gai_strerror(gai)));
  }

  // Take the first address that binds (e.g. "localhost" may give ::1 first).
  int fd = -1;
  int last_errno = 0;
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    // Lets a restarted server rebind while old connections sit in TIME_WAIT;
    // on Linux it does not let two live listeners share a port.
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 64) == 0) break;
    last_errno = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(addrs);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", HostPort(host, port), ": ", std::strerror(last_errno)));
  }

  sockaddr_storage bound;
  socklen_t bound_len = sizeof(bound);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("getsockname: ", std::strerror(err)));
  }
  const int actual_port = bound.ss_family == AF_INET6
                              ? ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port)
                              : ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);

  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(err)));
  }

  listen_fd_ = fd;
  port_.store(actual_port);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = false;
  }
  running_ = true;
  const int num_workers = options_.num_workers > 0 ? options_.num_workers : 1;
  for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  STRATA_LOG_INFO("http: listening on {}", HostPort(host, actual_port));
  return absl::OkStatus();
}

void HttpServer::Stop() {
  if (!running_) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  // Wakes every poll() in the server at once; it stays readable.
  const uint64_t one = 1;
  if (write(stop_fd_, &one, sizeof(one)) != sizeof(one)) {
    STRATA_LOG_ERROR("http: cannot signal stop: {}", std::strerror(errno));
  }
  cv_.notify_all();
  accept_thread_.join();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  // Connections accepted but never served.
  for (int fd : pending_) close(fd);
  pending_.clear();
  close(listen_fd_);
  close(stop_fd_);
  listen_fd_ = -1;
  stop_fd_ = -1;
  port_.store(0);
  running_ = false;
}

void HttpServer::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      STRATA_LOG_ERROR("http: poll on listening socket: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      const int err = errno;
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        // Out of descriptors or memory: the connection stays queued and
        // poll() would fire again at once, so back off instead of spinning.
        STRATA_LOG_WARN("http: accept: {}", std::strerror(err));
        pollfd stop = {stop_fd_, POLLIN, 0};
        poll(&stop, 1, 100);
      }
      continue;  // EAGAIN, ECONNABORTED, EINTR...: nothing to do
    }
    bool queued = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (pending_.size() < options_.max_pending_connections) {
        pending_.push_back(fd);
        queued = true;
      }
    }
    if (queued) {
      cv_.notify_one();
    } else {
      // All workers busy with a backlog: refuse quickly rather than queue
      // without bound. One non-blocking send; if it does not fit, too bad.
      const std::string resp = SerializeResponse(TextResponse(503, "busy\n"), false);
      send(fd, resp.data(), resp.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      close(fd);
    }
  }
}

void HttpServer::WorkerLoop() {
  for (;;) {
    int fd;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      if (stopping_) return;  // Stop() closes whatever is still pending
      fd = pending_.front();
      pending_.pop_front();
    }
    ServeConnection(fd);
  }
}

void HttpServer::ServeConnection(int fd) {
  const auto timeout = std::chrono::milliseconds(options_.io_timeout_ms);
  const auto read_deadline = Clock::now() + timeout;

  // Read until the end of the headers. Anything after them (a body) is
  // ignored: we only serve GET.
  std::string buf;
  size_t header_end = 0;
  HttpResponse error;
  bool have_error = false;
  char chunk[4096];
  while (header_end == 0) {
    if (buf.size() >= options_.max_header_bytes) {
      error = TextResponse(431, "request header too large\n");
      have_error = true;
      break;
    }
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n > 0) {
      const size_t scan_from = buf.size() >= 2 ? buf.size() - 2 : 0;
      buf.append(chunk, static_cast<size_t>(n));
      header_end = FindHeaderEnd(buf, scan_from);
      if (header_end > options_.max_header_bytes) {
        error = TextResponse(431, "request header too large\n");
        have_error = true;
        break;
      }
      continue;
    }
    if (n == 0) {
      // The client closed. Nothing sent means nothing to answer (e.g. a
      // port probe); a truncated request gets 400 in case it still reads.
      if (buf.empty()) {
        close(fd);
        return;
      }
      error = TextResponse(400, "incomplete request\n");
      have_error = true;
      break;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      close(fd);
      return;
    }
    const WaitResult w = WaitFor(fd, POLLIN, stop_fd_, read_deadline);
    if (w == WaitResult::kStopped || w == WaitResult::kError) {
      close(fd);
      return;
    }
    if (w == WaitResult::kTimeout) {
      error = TextResponse(408, "request timeout\n");
      have_error = true;
      break;
    }
  }

  HttpResponse response;
  bool method_not_allowed = false;
  if (have_error) {
    response = std::move(error);
  } else {
    HttpRequest req;
    if (!ParseRequestLine(buf.substr(0, header_end), &req)) {
      response = TextResponse(400, "malformed request line\n");
    } else if (req.method != "GET") {
      response = TextResponse(405, "only GET is supported\n");
      method_not_allowed = true;
    } else {
      const auto it = handlers_.find(req.path);
      if (it == handlers_.end()) {
        response = TextResponse(404, "not found\n");
      } else {
        response = it->second(req);
      }
    }
  }

  const std::string wire = SerializeResponse(response, method_not_allowed);
  if (!SendAll(fd, wire, stop_fd_, Clock::now() + timeout)) {
    close(fd);
    return;
  }
  LingeringClose(fd, stop_fd_);
}

absl::Status AddMetricsHandlers(const metrics::Registry* registry, HttpServer* server) {
  if (registry == nullptr || server == nullptr) {
    return absl::InvalidArgumentError("AddMetricsHandlers: null registry or server");
  }
  absl::Status s = server->Handle("/metrics", [registry](const HttpRequest&) {
    HttpResponse r;
    r.content_type = metrics::kTextContentType;
    r.body = registry->RenderText();
    return r;
  });
  if (!s.ok()) return s;
  return server->Handle("/healthz", [](const HttpRequest&) { return TextResponse(200, "ok\n"); });
}

}  // namespace strata

#include "common/metrics_server.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/metrics.h"

namespace strata {
namespace {

// Stack size of the server's threads, set explicitly because of the CUDA
// libraries: glibc carves a thread's static TLS (the thread_local data of
// the executable and of the libraries loaded at startup) out of the stack
// it is asked for, and pthread_create fails with EINVAL when that does not
// fit. libcublasLt alone has ~92 KiB of it and libcublas 12 KiB, so a small
// fixed stack (civetweb's ~100 KiB, say) cannot start a single thread in a
// CUDA build. 1 MiB holds that and the request handling, and does not
// depend on `ulimit -s`, which the library's default (0) would use.
constexpr size_t kThreadStackBytes = size_t{1} << 20;

constexpr char kAllowedMethods[] = "GET, HEAD";

// While Start runs on a thread, libmicrohttpd's messages from that thread
// (why it cannot start, e.g. "Failed to bind to port 9090: Address already
// in use") are collected here instead of logged.
thread_local std::string* start_errors = nullptr;

// libmicrohttpd's log callback (MHD_OPTION_EXTERNAL_LOGGER).
__attribute__((format(printf, 2, 0))) void LogMessage(void* /*cls*/, const char* format,
                                                      va_list args) {
  char small[256];
  va_list copy;
  va_copy(copy, args);
  const int length = std::vsnprintf(small, sizeof(small), format, copy);
  va_end(copy);
  if (length < 0) return;
  std::string message;
  if (static_cast<size_t>(length) < sizeof(small)) {
    message.assign(small, static_cast<size_t>(length));
  } else {
    message.resize(static_cast<size_t>(length) + 1);
    std::vsnprintf(message.data(), message.size(), format, args);
    message.resize(static_cast<size_t>(length));
  }
  absl::StripTrailingAsciiWhitespace(&message);
  if (start_errors != nullptr) {
    if (!start_errors->empty()) start_errors->append("; ");
    start_errors->append(message);
  } else {
    STRATA_LOG_INFO("metrics server: {}", message);
  }
}

// Characters of numeric IPv4 and IPv6 addresses (with a "%scope" suffix)
// and of host names.
bool IsHostChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ||
         c == ':' || c == '%';
}

// The address to bind and the daemon flags it needs.
struct BindAddress {
  sockaddr_storage address{};
  unsigned int flags = 0;
};

// Fills *out for host (without brackets) and port; on failure, returns the
// reason.
std::string ResolveBindAddress(const std::string& host, uint16_t port, BindAddress* out) {
  if (host.empty()) {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&out->address);
    v4->sin_family = AF_INET;
    v4->sin_addr.s_addr = htonl(INADDR_ANY);
    v4->sin_port = htons(port);
    return "";
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int error = getaddrinfo(host.c_str(), nullptr, &hints, &found); error != 0) {
    return gai_strerror(error);
  }
  // A name's first IPv4 address, else its first IPv6 one.
  const addrinfo* pick = nullptr;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    if (a->ai_family == AF_INET) {
      pick = a;
      break;
    }
    if (a->ai_family == AF_INET6 && pick == nullptr) pick = a;
  }
  if (pick == nullptr || pick->ai_addrlen > sizeof(out->address)) {
    freeaddrinfo(found);
    return "no IPv4 or IPv6 address";
  }
  std::memcpy(&out->address, pick->ai_addr, pick->ai_addrlen);
  freeaddrinfo(found);
  if (out->address.ss_family == AF_INET) {
    reinterpret_cast<sockaddr_in*>(&out->address)->sin_port = htons(port);
  } else {
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&out->address);
    v6->sin6_port = htons(port);
    // "::" listens for IPv4 too, as a plain IPv6 socket on Linux would.
    out->flags = IN6_IS_ADDR_UNSPECIFIED(&v6->sin6_addr) ? MHD_USE_DUAL_STACK : MHD_USE_IPv6;
  }
  return "";
}

void DeleteString(void* text) { delete static_cast<std::string*>(text); }

// Sends `response` (which may be null: out of memory) with `status` and
// closes the connection after it; MHD_NO (the connection is dropped) if
// that cannot be done.
MHD_Result Send(MHD_Connection* connection, unsigned int status, MHD_Response* response,
                const char* content_type, bool allow_header = false) {
  if (response == nullptr) return MHD_NO;
  bool headers_added =
      MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type) == MHD_YES &&
      MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close") == MHD_YES;
  if (allow_header && headers_added) {
    headers_added =
        MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, kAllowedMethods) == MHD_YES;
  }
  // The queue keeps its own reference to the response.
  const MHD_Result result =
      headers_added ? MHD_queue_response(connection, status, response) : MHD_NO;
  MHD_destroy_response(response);
  return result;
}

// Sends a string literal.
template <size_t N>
MHD_Result SendText(MHD_Connection* connection, unsigned int status, const char (&text)[N],
                    bool allow_header = false) {
  // MHD_RESPMEM_PERSISTENT: the literal outlives the response, which only
  // reads it.
  return Send(
      connection, status,
      MHD_create_response_from_buffer(N - 1, const_cast<char*>(text), MHD_RESPMEM_PERSISTENT),
      "text/plain; charset=utf-8", allow_header);
}

MHD_Result SendMetrics(MHD_Connection* connection, const prometheus::Collectable& collectable) {
  std::unique_ptr<std::string> body;
  try {
    body = std::make_unique<std::string>(metrics::RenderText(collectable));
  } catch (const std::exception& e) {
    STRATA_LOG_ERROR("metrics server: collecting metrics failed: {}", e.what());
    return SendText(connection, MHD_HTTP_INTERNAL_SERVER_ERROR, "collecting metrics failed\n");
  }
  // The response takes the rendered text over and deletes it when done.
  MHD_Response* response = MHD_create_response_from_buffer_with_free_callback_cls(
      body->size(), body->data(), &DeleteString, body.get());
  if (response != nullptr) body.release();
  return Send(connection, MHD_HTTP_OK, response, metrics::kTextContentType);
}

// libmicrohttpd's request handler (MHD_AccessHandlerCallback). It is called
// once the request's headers are in; it answers at once, and ignores any
// body the request has (libmicrohttpd then closes the connection).
MHD_Result HandleRequest(void* cls, MHD_Connection* connection, const char* url, const char* method,
                         const char* /*version*/, const char* /*upload_data*/,
                         size_t* /*upload_data_size*/, void** /*request_state*/) {
  const auto& collectable = *static_cast<const prometheus::Collectable*>(cls);
  // No exception may unwind into libmicrohttpd's C code.
  try {
    // HEAD is answered like GET; libmicrohttpd leaves the body out.
    if (std::strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
        std::strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
      return SendText(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n",
                      /*allow_header=*/true);
    }
    // `url` is the path, without the query string.
    if (std::strcmp(url, "/metrics") == 0) return SendMetrics(connection, collectable);
    if (std::strcmp(url, "/healthz") == 0) return SendText(connection, MHD_HTTP_OK, "ok\n");
    return SendText(connection, MHD_HTTP_NOT_FOUND, "not found\n");
  } catch (const std::exception& e) {
    STRATA_LOG_ERROR("metrics server: answering a request failed: {}", e.what());
  } catch (...) {
    STRATA_LOG_ERROR("metrics server: answering a request failed");
  }
  return MHD_NO;  // closes the connection
}

}  // namespace

MetricsServer::MetricsServer(const prometheus::Collectable* collectable)
    : MetricsServer(collectable, Options()) {}

MetricsServer::MetricsServer(const prometheus::Collectable* collectable, Options options)
    : collectable_(collectable), options_(options) {}

MetricsServer::~MetricsServer() { Stop(); }

absl::Status MetricsServer::Start(const std::string& host, int port) {
  if (daemon_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("metrics server already running on port ", port_.load()));
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics port ", port, " out of [0, 65535]"));
  }
  if (options_.num_threads < 1 || options_.connection_timeout_s < 1 ||
      options_.max_connections < options_.num_threads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics server needs num_threads >= 1, connection_timeout_s >= 1 and max_connections >= "
        "num_threads; got ",
        options_.num_threads, ", ", options_.connection_timeout_s, " and ",
        options_.max_connections));
  }
  std::string bare_host = host;
  if (bare_host.size() >= 2 && bare_host.front() == '[' && bare_host.back() == ']') {
    bare_host = bare_host.substr(1, bare_host.size() - 2);
  }
  for (char c : bare_host) {
    if (!IsHostChar(c)) {
      return absl::InvalidArgumentError(absl::StrCat("bad metrics host \"", host, "\""));
    }
  }
  const std::string where = bare_host.empty() ? absl::StrCat("0.0.0.0:", port)
                            : bare_host.find(':') != std::string::npos
                                ? absl::StrCat("[", bare_host, "]:", port)
                                : absl::StrCat(bare_host, ":", port);
  BindAddress bind;
  if (std::string error = ResolveBindAddress(bare_host, static_cast<uint16_t>(port), &bind);
      !error.empty()) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", where, ": ", error));
  }

  // A pool of one is no pool (libmicrohttpd warns about it): leave it out.
  MHD_OptionItem pool[] = {
      {options_.num_threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END,
       options_.num_threads, nullptr},
      {MHD_OPTION_END, 0, nullptr},
  };
  std::string reason;
  start_errors = &reason;
  daemon_ = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG | bind.flags,
      static_cast<uint16_t>(port), /*apc=*/nullptr, /*apc_cls=*/nullptr, &HandleRequest,
      const_cast<prometheus::Collectable*>(collectable_),
      // First, so that no message goes to stderr.
      MHD_OPTION_EXTERNAL_LOGGER, &LogMessage, nullptr,  //
      MHD_OPTION_SOCK_ADDR, reinterpret_cast<sockaddr*>(&bind.address),
      MHD_OPTION_CONNECTION_TIMEOUT, static_cast<unsigned int>(options_.connection_timeout_s),
      MHD_OPTION_CONNECTION_LIMIT, static_cast<unsigned int>(options_.max_connections),
      MHD_OPTION_THREAD_STACK_SIZE, kThreadStackBytes,  //
      MHD_OPTION_ARRAY, pool,                           //
      MHD_OPTION_END);
  start_errors = nullptr;
  if (daemon_ == nullptr) {
    if (reason.empty()) reason = "libmicrohttpd could not start";
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", where, ": ", reason));
  }
  const MHD_DaemonInfo* info = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT);
  port_ = info != nullptr ? info->port : port;
  return absl::OkStatus();
}

void MetricsServer::Stop() {
  if (daemon_ == nullptr) return;
  // Wakes the threads, joins them and closes the listening socket and every
  // connection.
  MHD_stop_daemon(daemon_);
  daemon_ = nullptr;
  port_ = 0;
}

}  // namespace strata

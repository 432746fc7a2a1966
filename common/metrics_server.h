// The HTTP endpoint for Prometheus scrapes and liveness probes:
//
//   GET /metrics   the collectable's metrics in the text exposition format
//                  0.0.4 (Content-Type: text/plain; version=0.0.4)
//   GET /healthz   200 "ok\n"
//   HEAD           as GET, without the body
//   other methods  405
//   other paths    404
//
//   prometheus::Registry registry;
//   metrics::RefreshingCollectable scraped(&registry, [&] { UpdateGauges(); });
//   MetricsServer server(&scraped);
//   STRATA_RETURN_IF_ERROR(server.Start("0.0.0.0", 9090));
//   ...
//   server.Stop();   // or let the destructor do it
//
// It runs on GNU libmicrohttpd, event-driven: Options::num_threads threads
// each wait on an epoll set of connections, so a connection costs a socket
// and a small buffer, never a thread, and a client that connects and sends
// nothing, or sends its request a byte at a time, delays no one else. A
// connection with no traffic for Options::connection_timeout_s is closed,
// and at most Options::max_connections are open at once. The body is
// prometheus-cpp's TextSerializer output, rendered afresh for every request.
// Every response closes its connection (no keep-alive).
//
// libmicrohttpd's messages go to strata's log (common/logging.h) at info
// level, since they are nearly all about one client's bad request or
// dropped connection; those of a failed Start are in its error instead.
//
// Thread-safety: Start and Stop may be called from any thread, but not
// concurrently with each other. The collectable's Collect() runs on the
// server's threads, possibly several at once.
#ifndef STRATA_COMMON_METRICS_SERVER_H_
#define STRATA_COMMON_METRICS_SERVER_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "prometheus/collectable.h"

struct MHD_Daemon;

namespace strata {

class MetricsServer {
 public:
  struct Options {
    // Threads serving connections, each with its own event loop. A thread
    // is busy only while it reads, answers or writes; a scrape waits only
    // for another scrape's Collect() on the same thread.
    int num_threads = 2;
    // Seconds without traffic after which a connection is closed (one still
    // sending a byte now and then stays open, holding only its buffer).
    int connection_timeout_s = 2;
    // Connections open at once, over all threads (each thread takes its
    // share). Further ones wait in the kernel's listen queue until some
    // close, so this many silent clients delay a scrape by up to the
    // timeout. Each open one holds a socket and up to 32 KiB of buffer.
    int max_connections = 512;
  };

  // `collectable` (a prometheus::Registry, a metrics::RefreshingCollectable,
  // ...) is collected on every GET /metrics; it must outlive the server's
  // running period.
  explicit MetricsServer(const prometheus::Collectable* collectable);
  MetricsServer(const prometheus::Collectable* collectable, Options options);
  ~MetricsServer();  // calls Stop()

  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Listens on host:port and starts serving. host is a numeric IPv4 or IPv6
  // address ("0.0.0.0", "127.0.0.1", "::", "[::1]"; "::" takes IPv4
  // connections too) or a name, bound to its first IPv4 address, or its
  // first IPv6 one if it has none ("localhost"); empty means all IPv4
  // interfaces. Port 0 picks a free port; port() then tells which.
  // FailedPrecondition if already running; InvalidArgument for a bad port,
  // a host with characters no address has, or bad options; Unavailable,
  // naming host and port and the reason, if it cannot listen (the port is
  // in use, the host does not resolve or is not local).
  absl::Status Start(const std::string& host, int port);

  // Stops listening, closes every connection, idle or not, and joins the
  // server's threads; a Collect() in progress finishes first. Returns
  // within milliseconds. Safe to call twice, or without Start; the server
  // can be started again afterwards. Must not be called from the
  // collectable's Collect(), which runs on a thread that Stop joins.
  void Stop();

  // The port listened on, or 0 when not running.
  int port() const { return port_.load(); }

 private:
  const prometheus::Collectable* const collectable_;
  const Options options_;
  MHD_Daemon* daemon_ = nullptr;
  std::atomic<int> port_{0};
};

}  // namespace strata

#endif  // STRATA_COMMON_METRICS_SERVER_H_

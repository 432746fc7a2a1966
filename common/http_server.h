// A minimal HTTP/1.1 server for operational endpoints: Prometheus scrapes of
// /metrics and liveness probes of /healthz. It is not a general web server:
// only GET, one request per connection (every response carries
// "Connection: close"), handlers matched on the exact path, no request
// bodies, no TLS.
//
//   HttpServer server;
//   STRATA_RETURN_IF_ERROR(AddMetricsHandlers(&registry, &server));
//   STRATA_RETURN_IF_ERROR(server.Start("0.0.0.0", 9090));
//   ...
//   server.Stop();   // or let the destructor do it
//
// One accept thread hands connections to a few worker threads. Every socket
// wait also watches a stop event and a per-connection deadline, so a client
// that connects and sends nothing, sends headers byte by byte, or never reads
// its response holds a worker for at most the timeout and never delays Stop().
// Headers beyond a size cap get 431; malformed requests get 400.
//
// Thread-safety: Handle must be called before Start. Start and Stop may be
// called from any thread, but not concurrently with each other. Handlers run
// on worker threads, possibly several at once, and must be thread-safe.
#ifndef STRATA_COMMON_HTTP_SERVER_H_
#define STRATA_COMMON_HTTP_SERVER_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "common/metrics.h"

namespace strata {

struct HttpRequest {
  std::string method;  // always "GET" by the time a handler sees it
  std::string path;    // the request target up to '?', e.g. "/metrics"
  std::string query;   // after '?', without it; empty if none
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

class HttpServer {
 public:
  struct Options {
    // Threads that read requests and run handlers. Scrapes are rare and
    // quick; two keep one slow client from delaying a scrape.
    int num_workers = 2;
    // Request line plus headers, including the blank line; larger gets 431.
    size_t max_header_bytes = 8 * 1024;
    // Deadline for receiving the whole request, and separately for sending
    // the response; a client slower than this is dropped (408 on receive).
    int io_timeout_ms = 5000;
    // Accepted connections waiting for a worker; beyond this they get 503.
    size_t max_pending_connections = 64;
  };

  HttpServer();
  explicit HttpServer(Options options);
  ~HttpServer();  // calls Stop()

  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Serves GET requests for exactly `path` (query string ignored for
  // matching) with `handler`, replacing any handler already there.
  // InvalidArgument unless path starts with '/'; FailedPrecondition once
  // started.
  absl::Status Handle(const std::string& path, HttpHandler handler);

  // Listens on host:port and starts serving. host may be a numeric address
  // or a name ("0.0.0.0", "127.0.0.1", "::", "localhost"); empty means all
  // interfaces. Port 0 picks a free port; port() then tells which.
  // FailedPrecondition if already running; InvalidArgument for a bad port or
  // unresolvable host; Unavailable (naming the address and port) if it
  // cannot listen, e.g. the port is in use.
  absl::Status Start(const std::string& host, int port);

  // Stops accepting, aborts connections in progress and joins all threads.
  // Returns promptly (in-flight handlers are waited for, socket waits are
  // not). Safe to call twice, or without Start. The server can be started
  // again afterwards. Must not be called from a handler (it joins the
  // handler's own thread).
  void Stop();

  // The port listened on, or 0 when not running.
  int port() const { return port_.load(); }

 private:
  void AcceptLoop();
  void WorkerLoop();
  void ServeConnection(int fd);

  const Options options_;
  std::map<std::string, HttpHandler> handlers_;  // fixed while running

  std::atomic<int> port_{0};
  bool running_ = false;  // guarded by Start/Stop not running concurrently
  int listen_fd_ = -1;
  // An eventfd that becomes readable when Stop() begins; every poll() in the
  // server watches it so that no socket wait outlives Stop().
  int stop_fd_ = -1;
  std::thread accept_thread_;
  std::vector<std::thread> workers_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<int> pending_;  // accepted fds waiting for a worker
  bool stopping_ = false;    // guarded by mu_
};

// Registers GET /metrics (the registry's RenderText() with the Prometheus
// text Content-Type) and GET /healthz (200 "ok"). `registry` must outlive
// the server's running period.
absl::Status AddMetricsHandlers(const metrics::Registry* registry, HttpServer* server);

}  // namespace strata

#endif  // STRATA_COMMON_HTTP_SERVER_H_

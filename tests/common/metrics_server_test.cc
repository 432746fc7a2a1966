#include "common/metrics_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/logging.h"
#include "common/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// A blocking client socket connected to 127.0.0.1:port (or [::1]:port),
// with send and receive timeouts so that a stuck server fails the test
// instead of hanging it.
int Connect(int port, milliseconds timeout = milliseconds(10000), bool ipv6 = false) {
  const int fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_storage addr{};
  socklen_t length = 0;
  if (ipv6) {
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&addr);
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    v6->sin6_addr = in6addr_loopback;
    length = sizeof(sockaddr_in6);
  } else {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&addr);
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    v4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    length = sizeof(sockaddr_in);
  }
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), length) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// True if this machine has an IPv6 loopback to listen on.
bool HasIpv6Loopback() {
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 addr{};
  addr.sin6_family = AF_INET6;
  addr.sin6_addr = in6addr_loopback;
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

bool SendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Reads until the server closes the connection (every response does), or
// the receive timeout.
std::string ReadToEof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

struct Response {
  std::string status_line;                     // empty if nothing came back
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  double ms = 0;  // from connect to the end of the response
};

Response Parse(const std::string& raw) {
  Response r;
  const size_t end = raw.find("\r\n\r\n");
  if (end == std::string::npos) {
    r.status_line = raw;
    return r;
  }
  r.body = raw.substr(end + 4);
  size_t pos = 0;
  bool first = true;
  while (pos < end) {
    size_t eol = raw.find("\r\n", pos);
    if (eol == std::string::npos || eol > end) eol = end;
    const std::string line = raw.substr(pos, eol - pos);
    pos = eol + 2;
    if (first) {
      r.status_line = line;
      first = false;
      continue;
    }
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return std::tolower(c); });
    std::string value = line.substr(colon + 1);
    while (!value.empty() && value[0] == ' ') value.erase(0, 1);
    r.headers[name] = value;
  }
  return r;
}

// Sends `request` verbatim and parses everything the server sends back.
Response Exchange(int port, const std::string& request, milliseconds timeout = milliseconds(10000),
                  bool ipv6 = false) {
  const Clock::time_point start = Clock::now();
  const int fd = Connect(port, timeout, ipv6);
  if (fd < 0) return Response{};
  SendAll(fd, request);
  Response r = Parse(ReadToEof(fd));
  close(fd);
  r.ms = Ms(Clock::now() - start);
  return r;
}

Response Get(int port, const std::string& path, milliseconds timeout = milliseconds(10000),
             bool ipv6 = false) {
  return Exchange(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout, ipv6);
}

class MetricsServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto requests = metrics::FixedLabelCounter::Create(
        &registry_, "strata_requests_total", "Requests finished", "finish_reason", {"stop"});
    ASSERT_TRUE(requests.ok()) << requests.status();
    requests->Increment("stop", 3);
  }

  prometheus::Registry registry_;
  MetricsServer server_{&registry_};
};

TEST_F(MetricsServerTest, ServesMetricsOnPortZero) {
  EXPECT_EQ(server_.port(), 0);
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  ASSERT_GT(server_.port(), 0);
  Response r = Get(server_.port(), "/metrics");
  EXPECT_EQ(r.status_line, "HTTP/1.1 200 OK");
  EXPECT_THAT(r.headers["content-type"], StartsWith("text/plain; version=0.0.4"));
  EXPECT_EQ(r.headers["content-type"], metrics::kTextContentType);
  EXPECT_EQ(r.headers["content-length"], std::to_string(r.body.size()));
  EXPECT_EQ(r.body, metrics::RenderText(registry_));
  EXPECT_THAT(r.body, HasSubstr("# TYPE strata_requests_total counter\n"
                                "strata_requests_total{finish_reason=\"other\"} 0\n"
                                "strata_requests_total{finish_reason=\"stop\"} 3\n"));
  // The query string does not change the route.
  EXPECT_EQ(Get(server_.port(), "/metrics?name[]=x").status_line, "HTTP/1.1 200 OK");
}

TEST_F(MetricsServerTest, RefreshesBeforeEachScrape) {
  auto depth = metrics::AddGauge(&registry_, "strata_requests_waiting", "Waiting");
  ASSERT_TRUE(depth.ok());
  std::atomic<int> refreshes{0};
  metrics::RefreshingCollectable scraped(&registry_, [&] { (*depth)->Set(++refreshes); });
  MetricsServer server(&scraped);
  ASSERT_TRUE(server.Start("127.0.0.1", 0).ok());
  EXPECT_THAT(Get(server.port(), "/metrics").body, HasSubstr("\nstrata_requests_waiting 1\n"));
  EXPECT_THAT(Get(server.port(), "/metrics").body, HasSubstr("\nstrata_requests_waiting 2\n"));
  Get(server.port(), "/healthz");  // no collect
  EXPECT_EQ(refreshes.load(), 2);
}

TEST_F(MetricsServerTest, ServesHealthz) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  Response r = Get(server_.port(), "/healthz");
  EXPECT_EQ(r.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(r.body, "ok\n");
  EXPECT_THAT(r.headers["content-type"], StartsWith("text/plain"));
}

TEST_F(MetricsServerTest, OtherPathsAre404) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  for (const char* path : {"/", "/nope", "/metricsx", "/metrics/", "/metrics/x", "/METRICS",
                           "/healthz/x", "/Healthz"}) {
    const Response r = Get(server_.port(), path);
    EXPECT_THAT(r.status_line, StartsWith("HTTP/1.1 404")) << path;
    EXPECT_THAT(r.body, testing::Not(HasSubstr("strata_requests_total"))) << path;
  }
}

TEST_F(MetricsServerTest, HeadIsGetWithoutTheBody) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const Response get = Get(server_.port(), "/metrics");
  Response head = Exchange(server_.port(), "HEAD /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
  EXPECT_EQ(head.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(head.headers["content-type"], metrics::kTextContentType);
  EXPECT_EQ(head.headers["content-length"], std::to_string(get.body.size()));
  EXPECT_EQ(head.body, "");
  EXPECT_THAT(
      Exchange(server_.port(), "HEAD /nope HTTP/1.1\r\nHost: localhost\r\n\r\n").status_line,
      StartsWith("HTTP/1.1 404"));
}

TEST_F(MetricsServerTest, OtherMethodsAre405) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  for (const char* request : {
           "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
           "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
           "PUT /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi",
           "DELETE /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
           "OPTIONS /nope HTTP/1.1\r\nHost: localhost\r\n\r\n",
       }) {
    Response r = Exchange(server_.port(), request);
    EXPECT_THAT(r.status_line, StartsWith("HTTP/1.1 405")) << request;
    EXPECT_EQ(r.headers["allow"], "GET, HEAD") << request;
    EXPECT_THAT(r.body, testing::Not(HasSubstr("strata_requests_total"))) << request;
  }
  // A body the server did not read does not confuse it.
  EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n");
}

TEST_F(MetricsServerTest, MalformedRequestsGetAnErrorNotACrash) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  for (const char* request :
       {"garbage\r\n\r\n", "GET\r\n\r\n", "GET /metrics HTTP/9.9\r\n\r\n", "\r\n\r\n"}) {
    const Response r = Exchange(server_.port(), request);
    EXPECT_THAT(r.status_line, testing::Not(StartsWith("HTTP/1.1 200"))) << request;
  }
  // Headers past a connection's buffer (32 KiB) are refused.
  const Response big = Exchange(
      server_.port(), "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(40000, 'a') + "\r\n\r\n");
  EXPECT_THAT(big.status_line, testing::Not(StartsWith("HTTP/1.1 200")));
  EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n");
}

// A collectable that throws: the exception must stop at the server.
class ThrowingCollectable : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    throw std::runtime_error("boom");
  }
};

TEST(MetricsServerErrorTest, CollectThatThrowsIs500) {
  ThrowingCollectable throwing;
  MetricsServer server(&throwing);
  ASSERT_TRUE(server.Start("127.0.0.1", 0).ok());
  EXPECT_THAT(Get(server.port(), "/metrics").status_line, StartsWith("HTTP/1.1 500"));
  EXPECT_EQ(Get(server.port(), "/healthz").body, "ok\n");
}

TEST_F(MetricsServerTest, StartErrors) {
  EXPECT_EQ(server_.Start("127.0.0.1", -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server_.Start("127.0.0.1", 65536).code(), absl::StatusCode::kInvalidArgument);
  for (const char* host : {"127.0.0.1,127.0.0.2", "a b", "127.0.0.1:80", "[::1", "host/x"}) {
    const absl::Status s = server_.Start(host, 0);
    // "127.0.0.1:80" parses as an IPv6 literal and fails to resolve.
    EXPECT_FALSE(s.ok()) << host;
    EXPECT_NE(s.code(), absl::StatusCode::kFailedPrecondition) << host;
  }
  EXPECT_EQ(server_.Start("a b", 0).code(), absl::StatusCode::kInvalidArgument);

  MetricsServer::Options no_threads;
  no_threads.num_threads = 0;
  EXPECT_EQ(MetricsServer(&registry_, no_threads).Start("127.0.0.1", 0).code(),
            absl::StatusCode::kInvalidArgument);
  MetricsServer::Options no_timeout;
  no_timeout.connection_timeout_s = 0;
  EXPECT_EQ(MetricsServer(&registry_, no_timeout).Start("127.0.0.1", 0).code(),
            absl::StatusCode::kInvalidArgument);
  MetricsServer::Options fewer_connections_than_threads;
  fewer_connections_than_threads.num_threads = 4;
  fewer_connections_than_threads.max_connections = 3;
  EXPECT_EQ(MetricsServer(&registry_, fewer_connections_than_threads).Start("127.0.0.1", 0).code(),
            absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const int port = server_.port();
  EXPECT_EQ(server_.Start("127.0.0.1", 0).code(), absl::StatusCode::kFailedPrecondition);

  // Port in use: an error naming host, port and the reason, not a crash.
  MetricsServer other(&registry_);
  const absl::Status in_use = other.Start("127.0.0.1", port);
  EXPECT_EQ(in_use.code(), absl::StatusCode::kUnavailable) << in_use;
  EXPECT_THAT(in_use.message(), HasSubstr("127.0.0.1:" + std::to_string(port)));
  EXPECT_THAT(in_use.message(), HasSubstr("in use"));
  EXPECT_EQ(other.port(), 0);

  const absl::Status unresolvable = other.Start("no-such-host.invalid", 0);
  EXPECT_EQ(unresolvable.code(), absl::StatusCode::kUnavailable) << unresolvable;
  EXPECT_THAT(unresolvable.message(), HasSubstr("no-such-host.invalid:0"));
  // The one that started is unaffected.
  EXPECT_EQ(Get(port, "/healthz").body, "ok\n");
}

TEST_F(MetricsServerTest, HostForms) {
  for (const char* host : {"", "0.0.0.0", "localhost", "127.0.0.1"}) {
    ASSERT_TRUE(server_.Start(host, 0).ok()) << host;
    EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n") << host;
    server_.Stop();
  }
  if (!HasIpv6Loopback()) GTEST_SKIP() << "no IPv6 loopback on this machine";
  for (const char* host : {"::1", "[::1]"}) {
    ASSERT_TRUE(server_.Start(host, 0).ok()) << host;
    EXPECT_EQ(Get(server_.port(), "/healthz", milliseconds(10000), /*ipv6=*/true).body, "ok\n")
        << host;
    EXPECT_EQ(Connect(server_.port(), milliseconds(1000)), -1) << host << ": IPv6 only";
    server_.Stop();
  }
  // "::" serves IPv4 clients too.
  ASSERT_TRUE(server_.Start("::", 0).ok());
  EXPECT_EQ(Get(server_.port(), "/healthz", milliseconds(10000), /*ipv6=*/true).body, "ok\n");
  EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n");
  server_.Stop();
  // In-use errors name an IPv6 address in brackets.
  ASSERT_TRUE(server_.Start("::1", 0).ok());
  MetricsServer other(&registry_);
  const absl::Status in_use = other.Start("[::1]", server_.port());
  EXPECT_EQ(in_use.code(), absl::StatusCode::kUnavailable) << in_use;
  EXPECT_THAT(in_use.message(), HasSubstr("[::1]:" + std::to_string(server_.port())));
}

TEST_F(MetricsServerTest, StopTwiceStopWithoutStartAndRestart) {
  MetricsServer never_started(&registry_);
  never_started.Stop();
  never_started.Stop();

  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const int port = server_.port();
  EXPECT_EQ(Get(port, "/healthz").body, "ok\n");
  server_.Stop();
  server_.Stop();
  EXPECT_EQ(server_.port(), 0);
  EXPECT_EQ(Connect(port, milliseconds(1000)), -1);  // nothing listens any more

  // Restart on the same port (connections of the first run in TIME_WAIT do
  // not block it).
  ASSERT_TRUE(server_.Start("127.0.0.1", port).ok());
  EXPECT_EQ(server_.port(), port);
  EXPECT_EQ(Get(port, "/metrics").status_line, "HTTP/1.1 200 OK");
}

TEST_F(MetricsServerTest, ConcurrentScrapesWhileUpdating) {
  auto counter =
      metrics::FixedLabelCounter::Create(&registry_, "tokens_total", "Tokens", "kind", {"decode"});
  ASSERT_TRUE(counter.ok());
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  std::atomic<bool> done{false};
  std::thread writer([&] {
    while (!done.load()) counter->Increment("decode");
  });
  std::vector<std::thread> scrapers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    scrapers.emplace_back([&] {
      double last = -1;
      for (int i = 0; i < 25; ++i) {
        Response r = Get(server_.port(), "/metrics");
        const size_t at = r.body.find("tokens_total{kind=\"decode\"} ");
        if (r.status_line != "HTTP/1.1 200 OK" || at == std::string::npos) continue;
        const double v = std::stod(r.body.substr(at + 28));
        if (v >= last) ok.fetch_add(1);
        last = v;
      }
    });
  }
  for (auto& s : scrapers) s.join();
  done = true;
  writer.join();
  EXPECT_EQ(ok.load(), 100);
}

// Connections that never complete a request: `idle` connect and send
// nothing, `trickling` send a request's header one byte a second. A
// background thread keeps them all connected, reconnecting any that the
// server drops, until destroyed.
class SlowClients {
 public:
  SlowClients(int port, int idle, int trickling) : port_(port) {
    for (int i = 0; i < idle + trickling; ++i) {
      clients_.push_back({Connect(port_), i >= idle, 0});
    }
    thread_ = std::thread([this] { Run(); });
  }
  ~SlowClients() {
    stop_ = true;
    thread_.join();
    for (const Client& c : clients_) {
      if (c.fd >= 0) close(c.fd);
    }
  }

  int connected() const { return connected_.load(); }
  int dropped() const { return dropped_.load(); }

 private:
  static constexpr char kRequest[] = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";

  struct Client {
    int fd;
    bool trickles;
    size_t sent;
  };

  void Reconnect(Client& c) {
    if (c.fd >= 0) close(c.fd);
    c.fd = Connect(port_);
    c.sent = 0;
    dropped_.fetch_add(1);
  }

  void Run() {
    Clock::time_point next_byte = Clock::now();
    std::vector<pollfd> fds(clients_.size());
    while (!stop_.load()) {
      int up = 0;
      for (size_t i = 0; i < clients_.size(); ++i) {
        fds[i] = {clients_[i].fd, POLLIN, 0};
        up += clients_[i].fd >= 0 ? 1 : 0;
      }
      connected_ = up;
      poll(fds.data(), fds.size(), 10);
      for (size_t i = 0; i < clients_.size(); ++i) {
        // Anything readable is the server closing it (or an error response):
        // reconnect.
        if (clients_[i].fd < 0 || fds[i].revents != 0) Reconnect(clients_[i]);
      }
      if (Clock::now() >= next_byte) {
        next_byte += milliseconds(1000);
        for (Client& c : clients_) {
          if (!c.trickles || c.fd < 0) continue;
          const char byte = kRequest[c.sent % (sizeof(kRequest) - 1)];
          // The header never completes within a test: its 42 bytes take 42 s.
          if (send(c.fd, &byte, 1, MSG_NOSIGNAL) != 1) {
            Reconnect(c);
          } else {
            ++c.sent;
          }
        }
      }
    }
  }

  const int port_;
  std::vector<Client> clients_;
  std::atomic<bool> stop_{false};
  std::atomic<int> connected_{0};
  std::atomic<int> dropped_{0};
  std::thread thread_;
};

struct Latencies {
  std::vector<double> metrics_ms;  // sorted
  std::vector<double> healthz_ms;  // sorted
  int dropped = 0;                 // slow connections the server closed

  double P50(const std::vector<double>& ms) const { return ms[ms.size() / 2]; }
};

// Scrapes /metrics and /healthz of the server at `port` for `duration`
// while 100 idle and 10 trickling connections are held open to it.
Latencies ScrapeAmongSlowClients(int port, milliseconds duration) {
  Latencies out;
  SlowClients slow(port, /*idle=*/100, /*trickling=*/10);
  std::this_thread::sleep_for(milliseconds(300));  // let the server take them all
  EXPECT_EQ(slow.connected(), 110);
  const Clock::time_point end = Clock::now() + duration;
  while (Clock::now() < end) {
    const Response r = Get(port, "/metrics", milliseconds(2000));
    EXPECT_EQ(r.status_line, "HTTP/1.1 200 OK");
    EXPECT_THAT(r.body, HasSubstr("strata_requests_total{finish_reason=\"stop\"} 3\n"));
    out.metrics_ms.push_back(r.ms);
    const Response h = Get(port, "/healthz", milliseconds(2000));
    EXPECT_EQ(h.body, "ok\n");
    out.healthz_ms.push_back(h.ms);
    if (::testing::Test::HasFailure()) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  out.dropped = slow.dropped();
  std::sort(out.metrics_ms.begin(), out.metrics_ms.end());
  std::sort(out.healthz_ms.begin(), out.healthz_ms.end());
  return out;
}

// The requirement: with 100 idle connections and 10 that trickle a header
// byte a second, a fresh GET /metrics still answers within 100 ms. Scrapes
// for 3.5 s, longer than the connection timeout (2 s), so the window
// includes the server dropping the 100 idle ones and them reconnecting at
// once.
TEST_F(MetricsServerTest, IdleAndTricklingClientsDoNotDelayScrapes) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const Latencies l = ScrapeAmongSlowClients(server_.port(), milliseconds(3500));
  ASSERT_FALSE(l.metrics_ms.empty());
  std::printf(
      "under 100 idle + 10 trickling connections: GET /metrics n=%zu p50=%.2f ms max=%.2f ms, "
      "GET /healthz n=%zu p50=%.2f ms max=%.2f ms; slow connections dropped by the server: %d\n",
      l.metrics_ms.size(), l.P50(l.metrics_ms), l.metrics_ms.back(), l.healthz_ms.size(),
      l.P50(l.healthz_ms), l.healthz_ms.back(), l.dropped);
  RecordProperty("metrics_p50_ms", std::to_string(l.P50(l.metrics_ms)));
  RecordProperty("metrics_max_ms", std::to_string(l.metrics_ms.back()));
  EXPECT_LT(l.metrics_ms.back(), 100.0);
  EXPECT_LT(l.healthz_ms.back(), 100.0);
  // The timeout closes connections without traffic: every idle one was
  // dropped at least once. (A trickling one sends within every 2 s and
  // stays; it holds a buffer, not a thread.)
  EXPECT_GE(l.dropped, 100);
}

// The point of serving connections from an event loop: the clients above
// hold no thread. One thread and a timeout longer than the test, so that
// none of the 110 slow connections is ever dropped, still answer every
// scrape at once. (A server with a thread per connection and few threads,
// as prometheus::Exposer starts civetweb by default, answers none.)
TEST(MetricsServerDesignTest, SlowClientsHoldNoThread) {
  prometheus::Registry registry;
  auto requests = metrics::FixedLabelCounter::Create(
      &registry, "strata_requests_total", "Requests finished", "finish_reason", {"stop"});
  ASSERT_TRUE(requests.ok()) << requests.status();
  requests->Increment("stop", 3);
  MetricsServer::Options one_thread;
  one_thread.num_threads = 1;
  one_thread.connection_timeout_s = 30;
  MetricsServer server(&registry, one_thread);
  ASSERT_TRUE(server.Start("127.0.0.1", 0).ok());
  const Latencies l = ScrapeAmongSlowClients(server.port(), milliseconds(1500));
  ASSERT_FALSE(l.metrics_ms.empty());
  std::printf(
      "one thread, 110 slow connections kept open: GET /metrics n=%zu p50=%.2f ms max=%.2f ms\n",
      l.metrics_ms.size(), l.P50(l.metrics_ms), l.metrics_ms.back());
  EXPECT_LT(l.metrics_ms.back(), 100.0);
  EXPECT_LT(l.healthz_ms.back(), 100.0);
  EXPECT_EQ(l.dropped, 0);
}

TEST_F(MetricsServerTest, StopIsPrompt) {
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
    EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n");
    const Clock::time_point start = Clock::now();
    server_.Stop();
    const double ms = Ms(Clock::now() - start);
    std::printf("Stop: %.1f ms\n", ms);
    EXPECT_LT(ms, 500);
  }
}

TEST_F(MetricsServerTest, StopWithIdleClientsIsPrompt) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  std::vector<int> idle;
  for (int i = 0; i < 50; ++i) idle.push_back(Connect(server_.port()));
  const int trickling = Connect(server_.port());
  ASSERT_TRUE(SendAll(trickling, "GET /metr"));
  std::this_thread::sleep_for(milliseconds(100));
  const Clock::time_point start = Clock::now();
  server_.Stop();
  const double ms = Ms(Clock::now() - start);
  std::printf("Stop with 51 idle connections: %.1f ms\n", ms);
  EXPECT_LT(ms, 500);
  // Stop closed them all: each reads end-of-file at once.
  idle.push_back(trickling);
  for (int fd : idle) {
    char byte;
    EXPECT_EQ(recv(fd, &byte, 1, MSG_DONTWAIT), 0);
    close(fd);
  }
  // And it starts again.
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  EXPECT_EQ(Get(server_.port(), "/healthz").body, "ok\n");
}

// libmicrohttpd's messages (here about a bad request and a port in use)
// go through strata's logger: none reaches stderr below the log level.
TEST_F(MetricsServerTest, LibraryMessagesGoThroughTheLogger) {
  const spdlog::level::level_enum level = internal::Logger().level();
  const auto bad_request_and_port_in_use = [&] {
    ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
    EXPECT_THAT(Exchange(server_.port(), "GET /metrics HTTP/9.9\r\n\r\n").status_line,
                StartsWith("HTTP/1.1 505"));
    MetricsServer other(&registry_);
    EXPECT_FALSE(other.Start("127.0.0.1", server_.port()).ok());
    server_.Stop();  // joins the threads that log
  };

  ASSERT_TRUE(SetLogLevel("warn"));
  testing::internal::CaptureStderr();
  bad_request_and_port_in_use();
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");

  ASSERT_TRUE(SetLogLevel("info"));
  testing::internal::CaptureStderr();
  bad_request_and_port_in_use();
  const std::string logged = testing::internal::GetCapturedStderr();
  internal::Logger().set_level(level);
  // In strata's format; the failed Start's reason is in its status, not here.
  EXPECT_THAT(logged, HasSubstr(" I metrics server: "));
  EXPECT_THAT(logged, testing::Not(HasSubstr("in use")));
}

}  // namespace
}  // namespace strata

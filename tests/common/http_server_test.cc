#include "common/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "common/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using Clock = std::chrono::steady_clock;

// A blocking client socket connected to 127.0.0.1:port, with a receive
// timeout so that a broken server fails the test instead of hanging it.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
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

// Sends `request` verbatim and returns everything the server sends back.
std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  if (fd < 0) return "<connect failed>";
  SendAll(fd, request);
  std::string response = ReadToEof(fd);
  close(fd);
  return response;
}

struct Response {
  std::string status_line;
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
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

Response Get(int port, const std::string& path) {
  return Parse(Exchange(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n"));
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto requests =
        registry_.RegisterCounter("strata_requests_total", "Requests finished", {"finish_reason"});
    ASSERT_TRUE(requests.ok());
    (*(*requests)->WithLabels({"stop"}))->Increment(3);
    ASSERT_TRUE(AddMetricsHandlers(&registry_, &server_).ok());
  }

  metrics::Registry registry_;
  HttpServer server_;
};

TEST_F(HttpServerTest, ServesMetricsOnPortZero) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  ASSERT_GT(server_.port(), 0);
  Response r = Get(server_.port(), "/metrics");
  EXPECT_EQ(r.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(r.headers["connection"], "close");
  EXPECT_EQ(r.headers["content-length"], std::to_string(r.body.size()));
  EXPECT_EQ(r.body,
            "# HELP strata_requests_total Requests finished\n"
            "# TYPE strata_requests_total counter\n"
            "strata_requests_total{finish_reason=\"stop\"} 3\n");
  EXPECT_EQ(r.body, registry_.RenderText());
}

TEST_F(HttpServerTest, ServesHealthzAndIgnoresQueryString) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  Response h = Get(server_.port(), "/healthz");
  EXPECT_EQ(h.status_line, "HTTP/1.1 200 OK");
  EXPECT_EQ(h.body, "ok\n");
  Response m = Get(server_.port(), "/metrics?name[]=x");
  EXPECT_EQ(m.status_line, "HTTP/1.1 200 OK");
  // HTTP/1.0 clients and bare-LF line endings are accepted too.
  Response old = Parse(Exchange(server_.port(), "GET /healthz HTTP/1.0\n\n"));
  EXPECT_EQ(old.status_line, "HTTP/1.1 200 OK");
}

TEST_F(HttpServerTest, UnknownPathIs404) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  EXPECT_EQ(Get(server_.port(), "/nope").status_line, "HTTP/1.1 404 Not Found");
  EXPECT_EQ(Get(server_.port(), "/metrics/").status_line, "HTTP/1.1 404 Not Found");
}

TEST_F(HttpServerTest, NonGetIs405) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  Response r = Parse(Exchange(server_.port(),
                              "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                              "\r\nhello"));
  EXPECT_EQ(r.status_line, "HTTP/1.1 405 Method Not Allowed");
  EXPECT_EQ(r.headers["allow"], "GET");
  EXPECT_EQ(Parse(Exchange(server_.port(), "HEAD /metrics HTTP/1.1\r\n\r\n")).status_line,
            "HTTP/1.1 405 Method Not Allowed");
}

TEST_F(HttpServerTest, MalformedRequestsAre400) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const int port = server_.port();
  for (const std::string req :
       {"GARBAGE\r\n\r\n", "GET /metrics\r\n\r\n", "GET metrics HTTP/1.1\r\n\r\n",
        "GET /metrics HTTP/2.0\r\n\r\n", "GET  /metrics HTTP/1.1\r\n\r\n",
        "G(T /metrics HTTP/1.1\r\n\r\n", "GET /met rics HTTP/1.1\r\n\r\n"}) {
    EXPECT_EQ(Parse(Exchange(port, req)).status_line, "HTTP/1.1 400 Bad Request") << req;
  }
  // A truncated request followed by the client's half-close.
  const int fd = Connect(port);
  ASSERT_GE(fd, 0);
  SendAll(fd, "GET /metrics HTTP/1.1\r\nHost:");
  shutdown(fd, SHUT_WR);
  EXPECT_THAT(ReadToEof(fd), StartsWith("HTTP/1.1 400 Bad Request\r\n"));
  close(fd);
}

TEST_F(HttpServerTest, OversizedHeaderIs431) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  const std::string big = "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(10000, 'a') + "\r\n\r\n";
  EXPECT_EQ(Parse(Exchange(server_.port(), big)).status_line,
            "HTTP/1.1 431 Request Header Fields Too Large");
  // Endless header without a terminator: cut off at the cap, not read forever.
  const int fd = Connect(server_.port());
  ASSERT_GE(fd, 0);
  SendAll(fd, "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(20000, 'b'));
  EXPECT_THAT(ReadToEof(fd), StartsWith("HTTP/1.1 431 "));
  close(fd);
  // The server is still fine afterwards.
  EXPECT_EQ(Get(server_.port(), "/healthz").status_line, "HTTP/1.1 200 OK");
}

TEST(HttpServerTimeoutTest, SlowClientGets408) {
  HttpServer::Options options;
  options.io_timeout_ms = 200;
  HttpServer server(options);
  ASSERT_TRUE(server.Start("127.0.0.1", 0).ok());
  const int fd = Connect(server.port());
  ASSERT_GE(fd, 0);
  SendAll(fd, "GET /metr");  // and then nothing
  const auto start = Clock::now();
  EXPECT_THAT(ReadToEof(fd), StartsWith("HTTP/1.1 408 Request Timeout\r\n"));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  close(fd);
}

TEST_F(HttpServerTest, SilentClientDoesNotBlockStop) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  // More silent clients than workers, so some wait in the queue too.
  std::vector<int> fds;
  for (int i = 0; i < 4; ++i) {
    const int fd = Connect(server_.port());
    ASSERT_GE(fd, 0);
    fds.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let workers pick them up
  const auto start = Clock::now();
  server_.Stop();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
  EXPECT_EQ(server_.port(), 0);
  for (int fd : fds) {
    EXPECT_EQ(ReadToEof(fd), "");  // closed without a response
    close(fd);
  }
}

TEST_F(HttpServerTest, StopTwiceStopWithoutStartAndRestart) {
  HttpServer never_started;
  never_started.Stop();
  never_started.Stop();

  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  server_.Stop();
  server_.Stop();
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  EXPECT_EQ(Get(server_.port(), "/healthz").status_line, "HTTP/1.1 200 OK");
  // The destructor stops it.
}

TEST_F(HttpServerTest, StartErrors) {
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  EXPECT_EQ(server_.Start("127.0.0.1", 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(server_.Handle("/late", [](const HttpRequest&) { return HttpResponse{}; }).code(),
            absl::StatusCode::kFailedPrecondition);

  HttpServer other;
  const absl::Status in_use = other.Start("127.0.0.1", server_.port());
  EXPECT_EQ(in_use.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(in_use.message()), HasSubstr(std::to_string(server_.port())));
  EXPECT_EQ(other.port(), 0);

  EXPECT_EQ(other.Start("127.0.0.1", -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(other.Start("127.0.0.1", 65536).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(other.Handle("relative", [](const HttpRequest&) { return HttpResponse{}; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(other.Handle("/null", nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST(HttpServerHandlerTest, CustomHandlerStatusAndContentType) {
  HttpServer server;
  ASSERT_TRUE(server
                  .Handle("/custom",
                          [](const HttpRequest& req) {
                            HttpResponse r;
                            r.status = 503;
                            r.content_type = "application/json\r\nX-Injected: 1";
                            r.body = "{\"q\":\"" + req.query + "\"}";
                            return r;
                          })
                  .ok());
  ASSERT_TRUE(server.Start("127.0.0.1", 0).ok());
  const std::string raw = Exchange(server.port(), "GET /custom?a=b HTTP/1.1\r\n\r\n");
  Response r = Parse(raw);
  EXPECT_EQ(r.status_line, "HTTP/1.1 503 Service Unavailable");
  EXPECT_EQ(r.headers["content-type"], "application/jsonX-Injected: 1");
  EXPECT_EQ(r.headers.count("x-injected"), 0u);
  EXPECT_EQ(r.body, "{\"q\":\"a=b\"}");
}

TEST_F(HttpServerTest, ConcurrentScrapesWhileUpdating) {
  auto tokens = registry_.RegisterCounter("strata_tokens_total", "Tokens");
  ASSERT_TRUE(tokens.ok());
  metrics::Counter* counter = *(*tokens)->WithLabels({});
  ASSERT_TRUE(server_.Start("127.0.0.1", 0).ok());
  std::atomic<bool> done{false};
  std::thread updater([&] {
    while (!done.load()) counter->Increment();
  });
  std::vector<std::thread> scrapers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    scrapers.emplace_back([&] {
      for (int i = 0; i < 10; ++i) {
        Response r = Get(server_.port(), "/metrics");
        if (r.status_line == "HTTP/1.1 200 OK" &&
            r.body.find("strata_tokens_total ") != std::string::npos) {
          ++ok;
        }
      }
    });
  }
  for (auto& t : scrapers) t.join();
  done = true;
  updater.join();
  EXPECT_EQ(ok.load(), 40);
}

}  // namespace
}  // namespace strata

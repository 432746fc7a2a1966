// ServerProcess: a `strata serve` child process (or `strata prefill` /
// `strata decode`, see ServerProcess::Worker) on free loopback ports, for
// tests that drive the server over real gRPC and HTTP (tests/router,
// tests/bench). Its stderr goes to a file (Stderr()). Needs STRATA_BINARY (the strata executable)
// and STRATA_SOURCE_DIR (for models/tiny-llama) defined by the test target.
//
// Thread-safety: one thread owns it; the gRPC stub it hands out is
// thread-safe.
#ifndef STRATA_TESTS_ROUTER_SERVER_PROCESS_H_
#define STRATA_TESTS_ROUTER_SERVER_PROCESS_H_

#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "strata/v1/generate.grpc.pb.h"

extern char** environ;

namespace strata::testing_util {

inline const std::string kTinyModel = std::string(STRATA_SOURCE_DIR) + "/models/tiny-llama";

// Calls `method` with `request` as its serialized request; the response's
// bytes go to `response` (if given). For requests a typed stub cannot send
// (malformed ones) and services without generated stubs (grpc.health.v1).
inline grpc::Status RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel,
                                 const std::string& method, const std::string& request,
                                 std::string* response = nullptr) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1), response_buffer;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  generic.UnaryCall(&ctx, method, grpc::StubOptions(), &request_buffer, &response_buffer,
                    [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mu);
                      status = s;
                      done = true;
                      cv.notify_one();
                    });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (status.ok() && response != nullptr) {
    std::vector<grpc::Slice> slices;
    if (!response_buffer.Dump(&slices).ok())
      return grpc::Status(grpc::StatusCode::INTERNAL, "dump");
    response->clear();
    for (auto& s : slices) response->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return status;
}

// See the file comment. Extra arguments are appended to the serve command
// (a --grace-seconds or --max-context among them replaces the default of 10
// or 2048).
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_args = {},
                         const std::string& subcommand = "serve") {
    std::vector<std::string> args = {STRATA_BINARY,    subcommand,  "--model", kTinyModel,
                                     "--host",         "127.0.0.1", "--port",  "0",
                                     "--metrics-port", "0"};
    // The router runs no model.
    if (subcommand != "router") args.insert(args.end(), {"--threads", "2"});
    // Defaults that extra arguments may replace.
    for (const auto& [flag, value] : {std::pair<std::string, std::string>{"--grace-seconds", "10"},
                                      {"--max-context", "2048"}}) {
      if (std::find(extra_args.begin(), extra_args.end(), flag) == extra_args.end()) {
        extra_args.insert(extra_args.end(), {flag, value});
      }
    }
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    EXPECT_EQ(pipe(out), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    static int instance = 0;
    stderr_path_ = ::testing::TempDir() + "strata_serve_" + std::to_string(getpid()) + "_" +
                   std::to_string(instance++) + ".stderr";
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    close(out[1]);
    stdout_fd_ = out[0];
    const std::string line = ReadLine(std::chrono::seconds(30));
    std::smatch m;
    if (std::regex_search(line, m,
                          std::regex(R"(listening on [0-9.]+:(\d+) metrics on [0-9.]+:(\d+))"))) {
      port_ = std::stoi(m[1]);
      metrics_port_ = std::stoi(m[2]);
    }
    EXPECT_GT(port_, 0) << "server said: " << line;
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::Generation::NewStub(channel_);
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (stdout_fd_ >= 0) close(stdout_fd_);
    unlink(stderr_path_.c_str());
  }

  // Everything the server wrote to stderr so far.
  std::string Stderr() const {
    std::ifstream in(stderr_path_, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  // Sends a signal without waiting.
  void Signal(int signal_number) { kill(pid_, signal_number); }

  // Sends SIGTERM and returns the exit status (or -1 on timeout).
  int Terminate(std::chrono::seconds timeout) {
    kill(pid_, SIGTERM);
    return Wait(timeout);
  }
  int Wait(std::chrono::seconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  std::string ReadLine(std::chrono::milliseconds timeout) {
    std::string line;
    const auto end = std::chrono::steady_clock::now() + timeout;
    char c;
    while (std::chrono::steady_clock::now() < end) {
      pollfd p{stdout_fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      if (read(stdout_fd_, &c, 1) != 1) break;
      if (c == '\n') break;
      line += c;
    }
    return line;
  }

  v1::Generation::Stub& stub() { return *stub_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

  // grpc.health.v1.Health/Check of the whole server: 1 SERVING, 2
  // NOT_SERVING (the response's field 1), -1 when the call failed.
  int HealthStatus() {
    std::string bytes;
    if (!RawUnaryCall(channel_, "/grpc.health.v1.Health/Check", "", &bytes).ok()) return -1;
    if (bytes.empty()) return 0;  // the default: UNKNOWN
    return bytes.size() == 2 && bytes[0] == '\x08' ? bytes[1] : -1;
  }

  // GET /metrics over a raw socket.
  std::string Metrics() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(metrics_port_);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd);
      return "";
    }
    const std::string req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    (void)!write(fd, req.data(), req.size());
    std::string body;
    char buf[4096];
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) body.append(buf, n);
    close(fd);
    return body;
  }

  // The value of one sample line of /metrics (e.g. a name with labels).
  double Metric(const std::string& sample) {
    const std::string text = Metrics();
    const size_t at = text.find("\n" + sample + " ");
    if (at == std::string::npos) return -1;
    return std::stod(text.substr(at + sample.size() + 2));
  }

  // Polls a metric until pred holds (or a timeout); returns its last value.
  double WaitForMetric(const std::string& sample, std::function<bool(double)> pred,
                       std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    double v = -1;
    const auto end = std::chrono::steady_clock::now() + timeout;
    do {
      v = Metric(sample);
      if (pred(v)) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    } while (std::chrono::steady_clock::now() < end);
    return v;
  }

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string stderr_path_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

// Runs a shell command; returns its exit status and what it wrote to
// stdout (append 2>&1 for stderr too).
struct CommandResult {
  int exit_status = -1;
  std::string output;
};
inline CommandResult RunCommand(const std::string& command) {
  CommandResult r;
  FILE* p = popen(command.c_str(), "r");
  if (p == nullptr) return r;
  char buf[512];
  while (fgets(buf, sizeof(buf), p)) r.output += buf;
  const int status = pclose(p);
  r.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// A test suite whose tests share one server, started with `extra_args`
// before the suite's first test and stopped after its last.
template <const char* const* kExtraArgs = nullptr>
class SharedServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::vector<std::string> args;
    for (const char* const* a = kExtraArgs; a != nullptr && *a != nullptr; ++a) args.push_back(*a);
    server_ = new ServerProcess(args);
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static inline ServerProcess* server_ = nullptr;
};

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_ROUTER_SERVER_PROCESS_H_

// The control plane over real gRPC on 127.0.0.1: workers registering by
// heartbeat (HeartbeatClient -> ControlService) and found by the router's
// polling (WorkerDiscovery -> a fake Worker.Describe), becoming schedulable
// and leaving scheduling once they fall silent. Short intervals and expiry
// keep it fast.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/control_service.h"
#include "router/heartbeat_client.h"
#include "router/worker_discovery.h"
#include "router/worker_registry.h"
#include "strata/internal/v1/worker.grpc.pb.h"

namespace strata::router {
namespace {

using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;
using ::testing::HasSubstr;

constexpr absl::Duration kInterval = absl::Milliseconds(100);
constexpr absl::Duration kExpiry = absl::Milliseconds(500);

WorkerInfo DecodeInfo(const std::string& id, const std::string& address) {
  WorkerInfo info;
  info.set_worker_id(id);
  info.set_role(internal::v1::WORKER_ROLE_DECODE);
  info.set_grpc_address(address);
  info.set_kv_address("kv-" + id);
  info.set_model("tiny");
  info.set_kv_format("bf16");
  info.add_profiles("default");
  return info;
}

WorkerLoad IdleLoad() {
  WorkerLoad load;
  load.set_gpu_kv_total_bytes(1 << 30);
  load.set_gpu_kv_free_bytes(1 << 30);
  return load;
}

WorkerRegistryOptions RegistryOptions() {
  WorkerRegistryOptions options;
  options.model = "tiny";
  options.kv_format = "bf16";
  options.expiry = kExpiry;
  return options;
}

// Polls `done` every 10 ms until it holds or `timeout` passes; returns the
// time it took, or absl::InfiniteDuration() when it never held.
template <typename F>
absl::Duration WaitFor(F done, absl::Duration timeout) {
  const absl::Time start = absl::Now();
  while (absl::Now() - start < timeout) {
    if (done()) return absl::Now() - start;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return done() ? absl::Now() - start : absl::InfiniteDuration();
}

// A gRPC server on 127.0.0.1 with an OS-chosen port.
class TestServer {
 public:
  explicit TestServer(grpc::Service* service) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service);
    server_ = builder.BuildAndStart();
  }
  ~TestServer() { Shutdown(); }
  void Shutdown() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
  }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  bool ok() const { return server_ != nullptr && port_ > 0; }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// A worker's Worker service that answers Describe alone.
class FakeWorker final : public internal::v1::Worker::CallbackService {
 public:
  explicit FakeWorker(WorkerInfo info) : info_(std::move(info)) {}

  grpc::ServerUnaryReactor* Describe(grpc::CallbackServerContext* context,
                                     const internal::v1::DescribeRequest*,
                                     internal::v1::DescribeResponse* response) override {
    describes_.fetch_add(1);
    *response->mutable_info() = info_;
    *response->mutable_load() = IdleLoad();
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  int describes() const { return describes_.load(); }

 private:
  const WorkerInfo info_;
  std::atomic<int> describes_{0};
};

bool Schedulable(WorkerRegistry& registry, const std::string& id) {
  auto picked = registry.PickDecode("default", 0);
  return picked.ok() && picked->worker_id == id;
}

TEST(ControlPlaneTest, HeartbeatRegistersAndStoppingExpires) {
  WorkerRegistry registry(RegistryOptions());
  ControlService control(&registry, kInterval);
  TestServer router(&control);
  ASSERT_TRUE(router.ok());

  // Starts at a slow pace: the router's answer sets the interval.
  HeartbeatClient client(router.address(), absl::Seconds(1), [] {
    return std::make_pair(DecodeInfo("d1", "127.0.0.1:7001"), IdleLoad());
  });
  ASSERT_TRUE(client.Start().ok());
  EXPECT_LT(WaitFor([&] { return Schedulable(registry, "d1"); }, absl::Seconds(5)),
            absl::Seconds(5));
  auto picked = registry.PickDecode("default", 0);
  ASSERT_TRUE(picked.ok());
  EXPECT_EQ(picked->grpc_address, "127.0.0.1:7001");
  EXPECT_EQ(picked->kv_address, "kv-d1");
  EXPECT_EQ(
      WaitFor([&] { return client.interval() == kInterval; }, absl::Seconds(2)) < absl::Seconds(2),
      true);
  // Heartbeats keep coming at the router's pace.
  const int64_t before = control.heartbeats_accepted();
  absl::SleepFor(5 * kInterval);
  EXPECT_GE(control.heartbeats_accepted() - before, 3);
  EXPECT_TRUE(client.registered());
  EXPECT_TRUE(Schedulable(registry, "d1"));

  const absl::Time stop_start = absl::Now();
  client.Stop();
  EXPECT_LT(absl::Now() - stop_start, kInterval);  // joins at once
  const absl::Duration gone =
      WaitFor([&] { return !Schedulable(registry, "d1"); }, kExpiry + 4 * kInterval);
  EXPECT_LE(gone, kExpiry + 2 * kInterval);
  auto none = registry.PickDecode("default", 0);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), HasSubstr("not heard from"));
}

TEST(ControlPlaneTest, BadHeartbeatIsInvalidArgumentNamingTheField) {
  WorkerRegistry registry(RegistryOptions());
  ControlService control(&registry, kInterval);
  TestServer router(&control);
  ASSERT_TRUE(router.ok());
  auto stub = internal::v1::Control::NewStub(
      grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));

  auto call = [&](const WorkerInfo& info, const WorkerLoad& load,
                  internal::v1::HeartbeatResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    internal::v1::HeartbeatRequest request;
    *request.mutable_info() = info;
    *request.mutable_load() = load;
    return stub->Heartbeat(&ctx, request, response);
  };
  internal::v1::HeartbeatResponse response;
  WorkerInfo info = DecodeInfo("d1", "127.0.0.1:7001");
  info.clear_kv_address();
  grpc::Status s = call(info, IdleLoad(), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("WorkerInfo.kv_address"));

  WorkerLoad load = IdleLoad();
  load.set_running_sequences(-1);
  s = call(DecodeInfo("d1", "127.0.0.1:7001"), load, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("WorkerLoad.running_sequences"));

  info = DecodeInfo("d1", "127.0.0.1:7001");
  info.set_model("other");
  s = call(info, IdleLoad(), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("'other'"));
  EXPECT_THAT(s.error_message(), HasSubstr("'tiny'"));
  EXPECT_EQ(control.heartbeats_rejected(), 3);
  EXPECT_TRUE(registry.Snapshot().empty());

  s = call(DecodeInfo("d1", "127.0.0.1:7001"), IdleLoad(), &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.interval_ms(), 100u);
  EXPECT_TRUE(Schedulable(registry, "d1"));
}

class DiscoveryTest : public ::testing::TestWithParam<bool> {};

TEST_P(DiscoveryTest, DiscoveredWorkerIsSchedulableAndExpiresWhenItStops) {
  const bool by_dns = GetParam();
  // The worker reports a listening address: the router records the one it
  // dialed.
  FakeWorker fake(DecodeInfo("w1", "0.0.0.0:1"));
  auto server = std::make_unique<TestServer>(&fake);
  ASSERT_TRUE(server->ok());
  const std::string target =
      by_dns ? "dns:///localhost:" + std::to_string(server->port()) : server->address();
  if (by_dns) {
    auto resolved = WorkerDiscovery::Resolve(target);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    EXPECT_THAT(*resolved, ::testing::Contains(server->address()));
  }

  WorkerRegistry registry(RegistryOptions());
  WorkerDiscoveryOptions options;
  options.targets = {target};
  options.interval = kInterval;
  WorkerDiscovery discovery(&registry, options);
  ASSERT_TRUE(discovery.Start().ok());

  EXPECT_LT(WaitFor([&] { return Schedulable(registry, "w1"); }, absl::Seconds(5)),
            absl::Seconds(5));
  auto picked = registry.PickDecode("default", 0);
  ASSERT_TRUE(picked.ok());
  EXPECT_EQ(picked->grpc_address, server->address());
  auto snapshot = registry.Snapshot();
  ASSERT_EQ(snapshot.size(), 1u);
  EXPECT_EQ(snapshot[0].source, WorkerRegistry::Source::kDiscovered);
  // Polled every interval.
  const int before = fake.describes();
  absl::SleepFor(5 * kInterval);
  EXPECT_GE(fake.describes() - before, 3);
  EXPECT_TRUE(Schedulable(registry, "w1"));

  server->Shutdown();
  const absl::Duration gone =
      WaitFor([&] { return !Schedulable(registry, "w1"); }, kExpiry + 4 * kInterval);
  EXPECT_LE(gone, kExpiry + 2 * kInterval);

  const absl::Time stop_start = absl::Now();
  discovery.Stop();
  EXPECT_LT(absl::Now() - stop_start, kInterval);
  EXPECT_GE(discovery.rounds(), 5);
}

INSTANTIATE_TEST_SUITE_P(ByAddressAndDns, DiscoveryTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("Dns") : std::string("HostPort");
                         });

TEST(WorkerDiscoveryTest, TargetsAreValidated) {
  EXPECT_TRUE(WorkerDiscovery::ValidateTarget("10.0.0.1:50051").ok());
  EXPECT_TRUE(WorkerDiscovery::ValidateTarget("dns:///workers.ns.svc:50051").ok());
  EXPECT_EQ(WorkerDiscovery::ValidateTarget("dns://8.8.8.8/workers:50051").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WorkerDiscovery::ValidateTarget("dns:///workers").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WorkerDiscovery::ValidateTarget("unix:/tmp/sock").code(),
            absl::StatusCode::kInvalidArgument);
  WorkerRegistry registry(RegistryOptions());
  WorkerDiscovery bad(&registry, {.targets = {"nohost"}});
  EXPECT_EQ(bad.Start().code(), absl::StatusCode::kInvalidArgument);
  WorkerDiscovery empty(&registry, {});
  EXPECT_EQ(empty.Start().code(), absl::StatusCode::kInvalidArgument);
  // A plain host:port is dialed as given.
  auto same = WorkerDiscovery::Resolve("example.invalid:80");
  ASSERT_TRUE(same.ok());
  EXPECT_THAT(*same, ::testing::ElementsAre("example.invalid:80"));
}

TEST(WorkerDiscoveryTest, StopsQuicklyWhileAWorkerDoesNotAnswer) {
  // A port that nothing listens on (the fake's, once it has shut down):
  // calls wait for the connection until their deadline.
  FakeWorker fake(DecodeInfo("w1", "0.0.0.0:1"));
  std::string address;
  {
    TestServer server(&fake);
    address = server.address();
  }
  WorkerRegistry registry(RegistryOptions());
  WorkerDiscoveryOptions options;
  options.targets = {address};
  options.interval = absl::Seconds(5);
  WorkerDiscovery discovery(&registry, options);
  ASSERT_TRUE(discovery.Start().ok());
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time stop_start = absl::Now();
  discovery.Stop();
  EXPECT_LT(absl::Now() - stop_start, absl::Milliseconds(500));
  EXPECT_TRUE(registry.Snapshot().empty());
}

TEST(HeartbeatClientTest, StopsQuicklyWhileTheRouterIsDown) {
  std::string address;
  {
    WorkerRegistry registry(RegistryOptions());
    ControlService control(&registry, kInterval);
    TestServer server(&control);
    address = server.address();
  }
  HeartbeatClient client(address, absl::Seconds(5), [] {
    return std::make_pair(DecodeInfo("d1", "127.0.0.1:7001"), IdleLoad());
  });
  ASSERT_TRUE(client.Start().ok());
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time stop_start = absl::Now();
  client.Stop();
  EXPECT_LT(absl::Now() - stop_start, absl::Milliseconds(500));
  EXPECT_FALSE(client.registered());
  EXPECT_EQ(client.accepted(), 0);

  HeartbeatClient no_address("", kInterval,
                             [] { return std::make_pair(WorkerInfo(), WorkerLoad()); });
  EXPECT_EQ(no_address.Start().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata::router

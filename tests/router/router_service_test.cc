// RouterService over real gRPC on 127.0.0.1, in front of fake decode
// workers: small strata.v1.Generation services that echo the prompt's ids
// as tokens, fail before or after streaming, or block until cancelled, and
// record what reached them (metadata, deadline, cancellation). The registry
// is fed directly; prefill workers are only addresses (the router passes
// them on and never calls them).
#include "router/router_service.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "router/server_metrics.h"
#include "router/worker_registry.h"
#include "strata/v1/generate.grpc.pb.h"
#include "tests/router/worker_test_util.h"

namespace strata::router {
namespace {

using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using SystemTime = std::chrono::system_clock::time_point;

constexpr int kThreshold = 8;  // prefill_threshold_tokens
constexpr char kPrefillAddress[] = "127.0.0.1:7999";

// Polls `done` every 5 ms until it holds or `timeout` passes; returns the
// time it took, or absl::InfiniteDuration() when it never held.
template <typename F>
absl::Duration WaitFor(F done, absl::Duration timeout = absl::Seconds(2)) {
  const absl::Time start = absl::Now();
  while (absl::Now() - start < timeout) {
    if (done()) return absl::Now() - start;
    absl::SleepFor(absl::Milliseconds(5));
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
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  bool ok() const { return server_ != nullptr && port_ > 0; }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// A decode worker's Generation service, as far as the router can tell.
class FakeDecodeWorker final : public v1::Generation::CallbackService {
 public:
  enum class Mode {
    kEcho,          // `responses` responses, one prompt id each, the last final
    kFailBefore,    // `fail_code` before any response
    kFailAfterTwo,  // two responses, then `fail_code`
    kBlock,         // nothing until cancelled
  };

  explicit FakeDecodeWorker(Mode mode, int responses = 4,
                            grpc::StatusCode fail_code = grpc::StatusCode::UNAVAILABLE)
      : mode_(mode), responses_(responses), fail_code_(fail_code) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;

  int calls() const { return calls_.load(); }
  int cancellations() const { return cancellations_.load(); }
  v1::GenerateRequest last_request() const {
    absl::MutexLock lock(&mu_);
    return last_request_;
  }
  // The prefill address metadata of the last call (nullopt: none).
  std::optional<std::string> last_prefill_address() const {
    absl::MutexLock lock(&mu_);
    return last_prefill_address_;
  }
  SystemTime last_deadline() const {
    absl::MutexLock lock(&mu_);
    return last_deadline_;
  }

 private:
  class Stream;

  const Mode mode_;
  const int responses_;
  const grpc::StatusCode fail_code_;
  std::atomic<int> calls_{0};
  std::atomic<int> cancellations_{0};
  mutable absl::Mutex mu_;
  v1::GenerateRequest last_request_ ABSL_GUARDED_BY(mu_);
  std::optional<std::string> last_prefill_address_ ABSL_GUARDED_BY(mu_);
  SystemTime last_deadline_ ABSL_GUARDED_BY(mu_);
};

class FakeDecodeWorker::Stream final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  Stream(FakeDecodeWorker* worker, const v1::GenerateRequest& request) : worker_(worker) {
    absl::MutexLock lock(&mu_);
    const Mode mode = worker_->mode_;
    if (mode == Mode::kBlock) return;
    if (mode == Mode::kFailBefore) {
      FinishLocked(grpc::Status(worker_->fail_code_, "fake worker failed"));
      return;
    }
    const int n = mode == Mode::kFailAfterTwo ? 2 : worker_->responses_;
    const auto& ids = request.token_ids().ids();
    for (int i = 0; i < n; ++i) {
      v1::GenerateResponse r;
      r.set_request_id(request.request_id());
      r.add_token_ids(ids.empty() ? 0 : ids[i % ids.size()]);
      if (mode == Mode::kEcho && i == n - 1) {
        r.set_finish_reason(v1::FINISH_REASON_LENGTH);
        r.mutable_usage()->set_prompt_tokens(ids.size());
        r.mutable_usage()->set_completion_tokens(n);
        r.mutable_usage()->set_time_to_first_token_seconds(123.0);
      }
      pending_.push_back(std::move(r));
    }
    end_ = mode == Mode::kEcho ? grpc::Status::OK
                               : grpc::Status(worker_->fail_code_, "fake worker failed mid-stream");
    NextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
      return;
    }
    NextLocked();
  }
  void OnCancel() override {
    worker_->cancellations_.fetch_add(1);
    absl::MutexLock lock(&mu_);
    if (!writing_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  void OnDone() override { delete this; }

 private:
  void NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    writing_ = false;
    if (next_ < pending_.size()) {
      writing_ = true;
      StartWrite(&pending_[next_++]);
    } else {
      FinishLocked(end_);
    }
  }
  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  FakeDecodeWorker* const worker_;
  absl::Mutex mu_;
  std::vector<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::Status end_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerWriteReactor<v1::GenerateResponse>* FakeDecodeWorker::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  {
    absl::MutexLock lock(&mu_);
    last_request_ = *request;
    auto [begin, end] = context->client_metadata().equal_range(kPrefillAddressKey);
    last_prefill_address_.reset();
    if (begin != end)
      last_prefill_address_ = std::string(begin->second.data(), begin->second.size());
    last_deadline_ = context->deadline();
  }
  calls_.fetch_add(1);
  return new Stream(this, *request);
}

WorkerInfo Info(const std::string& id, internal::v1::WorkerRole role, const std::string& address) {
  return testing_util::TestWorkerInfo(id, role, address, {"default", "sparse"});
}

// `running` sequences make a worker less preferred than an idle one.
WorkerLoad DecodeLoad(int running) {
  WorkerLoad load;
  load.set_running_sequences(running);
  load.set_gpu_kv_total_bytes(int64_t{1} << 30);
  load.set_gpu_kv_free_bytes(int64_t{1} << 30);
  return load;
}

v1::GenerateRequest Prompt(int tokens) {
  v1::GenerateRequest request;
  for (int i = 0; i < tokens; ++i) request.mutable_token_ids()->add_ids(10 + i);
  return request;
}

struct Outcome {
  std::vector<v1::GenerateResponse> responses;
  grpc::Status status;

  std::vector<int32_t> tokens() const {
    std::vector<int32_t> out;
    for (const auto& r : responses)
      out.insert(out.end(), r.token_ids().begin(), r.token_ids().end());
    return out;
  }
};

class RouterServiceTest : public ::testing::Test {
 protected:
  RouterServiceTest() : registry_(RegistryOptions()) {}

  static WorkerRegistryOptions RegistryOptions() {
    WorkerRegistryOptions options;
    options.model = "tiny";
    options.kv_format = "bf16";
    options.expiry = absl::Seconds(60);  // never within a test
    options.default_kv_bytes_per_token = 1024;
    return options;
  }

  static RouterServiceOptions DefaultOptions() {
    RouterServiceOptions options;
    options.model_name = "tiny";
    options.architecture = "LlamaForCausalLM";
    options.limits.context_length = 512;
    options.limits.vocab_size = 1000;
    options.limits.default_max_tokens = 16;
    options.limits.profiles = {"default", "sparse"};
    options.prefill_threshold_tokens = kThreshold;
    options.max_requests_in_flight = 8;
    options.admit_by_kv = true;
    return options;
  }

  // A fake decode worker serving on its own port, registered as `id`.
  FakeDecodeWorker* AddDecode(const std::string& id, FakeDecodeWorker::Mode mode, int running = 0,
                              int responses = 4) {
    fakes_.push_back(std::make_unique<FakeDecodeWorker>(mode, responses));
    fake_servers_.push_back(std::make_unique<TestServer>(fakes_.back().get()));
    EXPECT_TRUE(fake_servers_.back()->ok());
    Register(id, internal::v1::WORKER_ROLE_DECODE, fake_servers_.back()->address(), running);
    return fakes_.back().get();
  }

  void Register(const std::string& id, internal::v1::WorkerRole role, const std::string& address,
                int running = 0) {
    ASSERT_TRUE(registry_
                    .Update(Info(id, role, address), DecodeLoad(running),
                            WorkerRegistry::Source::kHeartbeat)
                    .ok());
  }

  // The decode worker `id` (the index-th fake added) reports `free` bytes of
  // KV free of `total`.
  void ReportRoom(const std::string& id, size_t index, int64_t free,
                  int64_t total = int64_t{1} << 30) {
    WorkerLoad load = DecodeLoad(0);
    load.set_gpu_kv_total_bytes(total);
    load.set_gpu_kv_free_bytes(free);
    ASSERT_TRUE(
        registry_
            .Update(Info(id, internal::v1::WORKER_ROLE_DECODE, fake_servers_.at(index)->address()),
                    load, WorkerRegistry::Source::kHeartbeat)
            .ok());
  }

  void StartRouter(RouterServiceOptions options = DefaultOptions()) {
    auto metrics = ServerMetrics::Create(&metrics_registry_);
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    service_ =
        std::make_unique<RouterService>(&registry_, nullptr, metrics_.get(), std::move(options));
    router_server_ = std::make_unique<TestServer>(service_.get());
    ASSERT_TRUE(router_server_->ok());
    stub_ = v1::Generation::NewStub(
        grpc::CreateChannel(router_server_->address(), grpc::InsecureChannelCredentials()));
  }

  // Runs one Generate call to the end; no deadline when `timeout` is none.
  Outcome Generate(const v1::GenerateRequest& request,
                   std::optional<std::chrono::milliseconds> timeout = std::chrono::seconds(5)) {
    grpc::ClientContext context;
    if (timeout) context.set_deadline(std::chrono::system_clock::now() + *timeout);
    Outcome out;
    auto reader = stub_->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) out.responses.push_back(response);
    out.status = reader->Finish();
    return out;
  }

  // Destroyed in reverse: the router's server, the router, then the fakes'
  // servers and the fakes.
  std::string MetricsText() const { return metrics::RenderText(metrics_registry_); }

  WorkerRegistry registry_;
  prometheus::Registry metrics_registry_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::vector<std::unique_ptr<FakeDecodeWorker>> fakes_;
  std::vector<std::unique_ptr<TestServer>> fake_servers_;
  std::unique_ptr<RouterService> service_;
  std::unique_ptr<TestServer> router_server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

TEST_F(RouterServiceTest, RelaysTokensInOrderWithTheFinalUsage) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho, 0, 5);
  StartRouter();
  v1::GenerateRequest request = Prompt(3);
  request.mutable_sampling()->set_temperature(0.5f);
  request.mutable_stopping()->add_stop_token_ids(7);
  request.set_return_logprobs(true);
  const Outcome out = Generate(request);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_EQ(out.responses.size(), 5u);
  EXPECT_THAT(out.tokens(), ElementsAre(10, 11, 12, 10, 11));
  for (size_t i = 0; i + 1 < out.responses.size(); ++i) {
    EXPECT_EQ(out.responses[i].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  }
  const v1::GenerateResponse& last = out.responses.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().prompt_tokens(), 3u);
  EXPECT_EQ(last.usage().completion_tokens(), 5u);
  // The router's own time to first token, not the worker's.
  EXPECT_GT(last.usage().time_to_first_token_seconds(), 0.0);
  EXPECT_LT(last.usage().time_to_first_token_seconds(), 5.0);
  EXPECT_EQ(last.request_id(), "req-1");

  // What the worker got: the ids, the client's settings, a request id, the
  // profile and max_tokens spelled out.
  const v1::GenerateRequest seen = d1->last_request();
  EXPECT_THAT(seen.token_ids().ids(), ElementsAre(10, 11, 12));
  EXPECT_EQ(seen.request_id(), "req-1");
  EXPECT_FLOAT_EQ(seen.sampling().temperature(), 0.5f);
  EXPECT_THAT(seen.stopping().stop_token_ids(), ElementsAre(7));
  EXPECT_EQ(seen.stopping().max_tokens(), 16u);
  EXPECT_TRUE(seen.return_logprobs());
  EXPECT_EQ(seen.profile(), "default");
  EXPECT_EQ(d1->last_prefill_address(), std::nullopt);

  // A client's request id is kept.
  request.set_request_id("mine");
  request.set_profile("sparse");
  const Outcome named = Generate(request);
  ASSERT_TRUE(named.status.ok()) << named.status.error_message();
  EXPECT_EQ(named.responses.back().request_id(), "mine");
  EXPECT_EQ(d1->last_request().request_id(), "mine");
  EXPECT_EQ(d1->last_request().profile(), "sparse");
  EXPECT_EQ(service_->requests_forwarded(), 2);
  EXPECT_EQ(service_->retries(), 0);
  EXPECT_EQ(WaitFor([&] { return service_->requests_in_flight() == 0; }) < absl::Seconds(2), true);
  const std::string text = MetricsText();
  EXPECT_THAT(text, HasSubstr("strata_requests_total{finish_reason=\"length\"} 2"));
  EXPECT_THAT(text, HasSubstr("strata_time_to_first_token_seconds_count 2"));
  EXPECT_THAT(text, HasSubstr("strata_inter_token_latency_seconds_count 8"));
}

TEST_F(RouterServiceTest, LongPromptsNameThePrefillWorkerAndShortOnesDoNot) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  StartRouter();

  // No prefill worker yet: a long prompt is still served, by the decode
  // worker alone.
  Outcome out = Generate(Prompt(kThreshold));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(d1->last_prefill_address(), std::nullopt);
  EXPECT_EQ(service_->prefill_unavailable(), 1);

  Register("p1", internal::v1::WORKER_ROLE_PREFILL, kPrefillAddress);
  out = Generate(Prompt(kThreshold));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(d1->last_prefill_address(), std::optional<std::string>(kPrefillAddress));
  auto snapshot = registry_.Snapshot();
  ASSERT_EQ(snapshot.size(), 2u);
  EXPECT_EQ(snapshot[1].worker_id, "p1");
  EXPECT_EQ(snapshot[1].pending_prefill_tokens, kThreshold);

  out = Generate(Prompt(kThreshold - 1));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(d1->last_prefill_address(), std::nullopt);
  EXPECT_EQ(service_->prefill_skipped(), 1);
  EXPECT_EQ(service_->prefill_unavailable(), 1);
  // Every request was noted on the decode worker, with its KV.
  EXPECT_EQ(registry_.Snapshot()[0].pending_sequences, 3);
  EXPECT_EQ(registry_.Snapshot()[0].pending_kv_bytes,
            (2 * (kThreshold + 16) + (kThreshold - 1 + 16)) * 1024);
}

// A prompt whose start the router sent a decode worker before goes back to
// that worker, and is computed there when the rest is short.
TEST_F(RouterServiceTest, APromptGoesBackToTheWorkerHoldingItsStart) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  FakeDecodeWorker* d2 = AddDecode("d2", FakeDecodeWorker::Mode::kEcho);
  auto report = [&](const std::string& id, int running, int64_t capacity) {
    WorkerLoad load = DecodeLoad(running);
    load.set_prefix_capacity_tokens(capacity);
    const size_t i = id == "d1" ? 0 : 1;
    ASSERT_TRUE(registry_
                    .Update(Info(id, internal::v1::WORKER_ROLE_DECODE, fake_servers_[i]->address()),
                            load, WorkerRegistry::Source::kHeartbeat)
                    .ok());
  };
  report("d1", 0, 1000);
  report("d2", 0, 1000);
  Register("p1", internal::v1::WORKER_ROLE_PREFILL, kPrefillAddress);
  RouterServiceOptions options = DefaultOptions();
  options.prefix_affinity_options.block_tokens = 4;
  StartRouter(options);
  auto with_tail = [](int document, int tail, int tail_first) {
    v1::GenerateRequest r = Prompt(document);
    for (int i = 0; i < tail; ++i) r.mutable_token_ids()->add_ids(tail_first + i);
    return r;
  };
  auto callee = [&] { return d1->calls() > d2->calls() ? d1 : d2; };

  // The document with a question: computed by the prefill worker.
  Outcome out = Generate(with_tail(40, 3, 500));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  FakeDecodeWorker* holder = callee();
  FakeDecodeWorker* other = holder == d1 ? d2 : d1;
  const std::string holder_id = holder == d1 ? "d1" : "d2";
  EXPECT_EQ(holder->last_prefill_address(), std::optional<std::string>(kPrefillAddress));

  // Another question about it: to the holder, without the prefill worker
  // (the rest, 3 tokens and the 0-3 of a partial block, is below 8).
  out = Generate(with_tail(40, 3, 600));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(holder->calls(), 2);
  EXPECT_EQ(holder->last_prefill_address(), std::nullopt);
  EXPECT_EQ(service_->prefix_routed(), 1);
  EXPECT_THAT(MetricsText(), HasSubstr("strata_router_routes_total{route=\"stored_prefix\"} 1"));

  // The next turn of that conversation (the prompt, what was generated and
  // a short new message) too: the router remembers the answer as well.
  v1::GenerateRequest next = with_tail(40, 3, 600);
  for (const auto& r : out.responses) {
    for (int32_t id : r.token_ids()) next.mutable_token_ids()->add_ids(id);
  }
  for (int i = 0; i < 2; ++i) next.mutable_token_ids()->add_ids(900 + i);
  out = Generate(next);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(holder->calls(), 3);
  EXPECT_EQ(holder->last_prefill_address(), std::nullopt);
  EXPECT_EQ(service_->prefix_routed(), 2);

  // The document with a long new part: still the holder (it loads the
  // start), but the prefill worker computes the prompt.
  out = Generate(with_tail(40, 20, 700));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(holder->calls(), 4);
  EXPECT_EQ(holder->last_prefill_address(), std::optional<std::string>(kPrefillAddress));
  EXPECT_EQ(service_->prefix_routed(), 2);

  // A busy holder (beyond the load allowance) is passed over: the other
  // worker takes the request, through the prefill worker.
  report(holder_id, 10, 1000);
  report(holder_id == "d1" ? "d2" : "d1", 0, 1000);
  const int other_calls = other->calls();
  out = Generate(with_tail(40, 3, 800));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(other->calls(), other_calls + 1);
  EXPECT_EQ(other->last_prefill_address(), std::optional<std::string>(kPrefillAddress));
  EXPECT_EQ(service_->prefix_routed(), 2);

  // Workers that report no prefix store (restarted so) hold nothing: the
  // request goes through the prefill worker, and the router forgets what
  // it sent the one it picked.
  report(holder_id, 0, 0);
  report(holder_id == "d1" ? "d2" : "d1", 0, 0);
  ASSERT_EQ(service_->prefix_affinity()->num_workers(), 2);
  out = Generate(with_tail(40, 3, 900));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(service_->prefix_routed(), 2);
  EXPECT_EQ(service_->prefix_affinity()->num_workers(), 1);
}

TEST_F(RouterServiceTest, FailureBeforeStreamingIsRetriedOnAnotherWorker) {
  // d1 is idler, so picked first.
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kFailBefore, 0);
  FakeDecodeWorker* d2 = AddDecode("d2", FakeDecodeWorker::Mode::kEcho, 3);
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_THAT(out.tokens(), ElementsAre(10, 11, 12, 10));
  EXPECT_EQ(d1->calls(), 1);
  EXPECT_EQ(d2->calls(), 1);
  EXPECT_EQ(service_->retries(), 1);
  EXPECT_EQ(service_->requests_forwarded(), 1);
}

TEST_F(RouterServiceTest, UnreachableWorkerIsRetriedOnAnotherWorker) {
  std::string dead_address;
  {
    FakeDecodeWorker unused(FakeDecodeWorker::Mode::kEcho);
    TestServer dead(&unused);
    ASSERT_TRUE(dead.ok());
    dead_address = dead.address();
  }  // nothing listens there now
  Register("d1", internal::v1::WORKER_ROLE_DECODE, dead_address, 0);
  FakeDecodeWorker* d2 = AddDecode("d2", FakeDecodeWorker::Mode::kEcho, 3);
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.tokens().size(), 4u);
  EXPECT_EQ(d2->calls(), 1);
  EXPECT_EQ(service_->retries(), 1);
}

TEST_F(RouterServiceTest, BothWorkersFailingIsUnavailableNamingThem) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kFailBefore, 0);
  FakeDecodeWorker* d2 = AddDecode("d2", FakeDecodeWorker::Mode::kFailBefore, 3);
  AddDecode("d3", FakeDecodeWorker::Mode::kEcho, 6);  // a third try is not made
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(out.status.error_message(),
              AllOf(HasSubstr("decode worker d1"), HasSubstr("decode worker d2"),
                    HasSubstr("fake worker failed")));
  EXPECT_THAT(out.responses, IsEmpty());
  EXPECT_EQ(d1->calls() + d2->calls(), 2);
  EXPECT_EQ(fakes_[2]->calls(), 0);
  EXPECT_EQ(service_->retries(), 1);
}

TEST_F(RouterServiceTest, LoneWorkerFailingIsUnavailableWithNoRetry) {
  AddDecode("d1", FakeDecodeWorker::Mode::kFailBefore);
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(out.status.error_message(),
              AllOf(HasSubstr("decode worker d1"), HasSubstr("no decode worker to retry on")));
  EXPECT_EQ(service_->retries(), 0);
}

TEST_F(RouterServiceTest, FailureAfterStreamingIsUnavailableWithoutRetry) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kFailAfterTwo, 0);
  FakeDecodeWorker* d2 = AddDecode("d2", FakeDecodeWorker::Mode::kEcho, 3);
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(out.status.error_message(),
              AllOf(HasSubstr("decode worker d1"), HasSubstr("after 2 tokens were streamed")));
  EXPECT_THAT(out.tokens(), ElementsAre(10, 11));
  EXPECT_EQ(d1->calls(), 1);
  EXPECT_EQ(d2->calls(), 0);
  EXPECT_EQ(service_->retries(), 0);
}

TEST_F(RouterServiceTest, AWorkerStreamEndingWhileTheClientIsWrittenToIsSafe) {
  // The worker's last responses and its status arrive while the router is
  // still writing an earlier one to the client (no read outstanding on the
  // worker's call): the router's next read must not reach a call gRPC has
  // already ended. Under AddressSanitizer an early end was a
  // use-after-free in a few percent of calls; many calls make it show.
  AddDecode("d1", FakeDecodeWorker::Mode::kFailAfterTwo, 0);
  StartRouter();
  std::vector<std::thread> clients;
  std::atomic<int> wrong{0};
  // 4 clients against the router's 8 in-flight slots.
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&] {
      for (int i = 0; i < 100; ++i) {
        const Outcome out = Generate(Prompt(3));
        if (out.status.error_code() != grpc::StatusCode::UNAVAILABLE ||
            out.tokens() != std::vector<int32_t>{10, 11}) {
          if (++wrong < 4) {
            ADD_FAILURE() << out.status.error_code() << " " << out.status.error_message() << " "
                          << out.tokens().size();
          }
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST_F(RouterServiceTest, WorkersAnswerAboutTheRequestPassesThrough) {
  fakes_.push_back(std::make_unique<FakeDecodeWorker>(FakeDecodeWorker::Mode::kFailBefore, 0,
                                                      grpc::StatusCode::INVALID_ARGUMENT));
  fake_servers_.push_back(std::make_unique<TestServer>(fakes_.back().get()));
  Register("d1", internal::v1::WORKER_ROLE_DECODE, fake_servers_.back()->address());
  AddDecode("d2", FakeDecodeWorker::Mode::kEcho, 3);
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(out.status.error_message(), "fake worker failed");
  EXPECT_EQ(service_->retries(), 0);
}

TEST_F(RouterServiceTest, NoWorkerIsUnavailable) {
  StartRouter();
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(out.status.error_message(), HasSubstr("no decode worker is registered"));
  EXPECT_EQ(service_->requests_forwarded(), 0);
  EXPECT_EQ(WaitFor([&] { return service_->requests_in_flight() == 0; }) < absl::Seconds(2), true);
  EXPECT_THAT(MetricsText(), HasSubstr("strata_requests_rejected_total{reason=\"unavailable\"} 1"));
}

TEST_F(RouterServiceTest, InvalidRequestIsRefusedWithoutContactingAWorker) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  StartRouter();
  v1::GenerateRequest bad_id = Prompt(3);
  bad_id.mutable_token_ids()->add_ids(5000);
  Outcome out = Generate(bad_id);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("token_ids"));

  v1::GenerateRequest bad_temperature = Prompt(3);
  bad_temperature.mutable_sampling()->set_temperature(-1);
  out = Generate(bad_temperature);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("sampling.temperature"));

  v1::GenerateRequest text;  // the router has no tokenizer here
  text.set_text("hello");
  out = Generate(text);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("text"));

  v1::GenerateRequest bad_profile = Prompt(3);
  bad_profile.set_profile("nope");
  out = Generate(bad_profile);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("profile"));

  EXPECT_EQ(d1->calls(), 0);
  EXPECT_EQ(service_->requests_forwarded(), 0);
}

TEST_F(RouterServiceTest, ClientCancellationReachesTheWorker) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kBlock);
  StartRouter();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub_->Generate(&context, Prompt(3));
  ASSERT_LT(WaitFor([&] { return d1->calls() == 1; }), absl::Seconds(2));
  EXPECT_EQ(d1->cancellations(), 0);
  context.TryCancel();
  EXPECT_LT(WaitFor([&] { return d1->cancellations() == 1; }, absl::Seconds(1)), absl::Seconds(1));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(WaitFor([&] { return service_->requests_in_flight() == 0; }) < absl::Seconds(2), true);
  EXPECT_EQ(service_->retries(), 0);
}

TEST_F(RouterServiceTest, ClientDeadlineReachesTheWorker) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kBlock);
  StartRouter();
  const SystemTime before = std::chrono::system_clock::now();
  const Outcome out = Generate(Prompt(3), std::chrono::milliseconds(300));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GE(d1->last_deadline(), before);
  EXPECT_LE(d1->last_deadline(), before + std::chrono::milliseconds(400));
  EXPECT_LT(WaitFor([&] { return d1->cancellations() == 1; }, absl::Seconds(1)), absl::Seconds(1));
  EXPECT_EQ(service_->retries(), 0);
}

TEST_F(RouterServiceTest, DeadlinePassesThroughBoundedByTheWorkerCallTimeout) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  RouterServiceOptions options = DefaultOptions();
  options.worker_call_timeout = absl::Seconds(30);
  StartRouter(options);

  SystemTime before = std::chrono::system_clock::now();
  ASSERT_TRUE(Generate(Prompt(3), std::chrono::seconds(5)).status.ok());
  EXPECT_GT(d1->last_deadline(), before + std::chrono::seconds(4));
  EXPECT_LE(d1->last_deadline(), before + std::chrono::milliseconds(5100));

  // A later client deadline, or none: the worker call's timeout.
  before = std::chrono::system_clock::now();
  // (gRPC rounds the timeout it sends up.)
  ASSERT_TRUE(Generate(Prompt(3), std::chrono::seconds(600)).status.ok());
  EXPECT_LE(d1->last_deadline(), before + std::chrono::seconds(31));
  ASSERT_TRUE(Generate(Prompt(3), std::nullopt).status.ok());
  EXPECT_LE(d1->last_deadline(), before + std::chrono::seconds(31));
}

TEST_F(RouterServiceTest, NoClientDeadlineAndNoTimeoutMeansNoDeadline) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  StartRouter();
  ASSERT_TRUE(Generate(Prompt(3), std::nullopt).status.ok());
  EXPECT_GT(d1->last_deadline(), std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
}

TEST_F(RouterServiceTest, AdmissionIsBounded) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kBlock);
  RouterServiceOptions options = DefaultOptions();
  options.max_requests_in_flight = 1;
  StartRouter(options);
  grpc::ClientContext first;
  first.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub_->Generate(&first, Prompt(3));
  ASSERT_LT(WaitFor([&] { return d1->calls() == 1; }), absl::Seconds(2));
  const Outcome out = Generate(Prompt(3));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(out.status.error_message(), HasSubstr("1 requests in flight"));
  first.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The slot is free once both calls are over.
  ASSERT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
}

TEST_F(RouterServiceTest, AClientsNextRequestAfterItsStatusIsNotRefusedForAdmission) {
  // A request's in-flight slot is free once its status is sent, not once
  // gRPC is done with the call a little later: a client that asks again as
  // soon as it has its answer, one request at a time, is never refused.
  AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  RouterServiceOptions options = DefaultOptions();
  options.max_requests_in_flight = 1;
  StartRouter(options);
  int refused = 0;
  for (int i = 0; i < 300; ++i) {
    const Outcome out = Generate(Prompt(3));
    if (out.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++refused;
    } else {
      ASSERT_TRUE(out.status.ok()) << out.status.error_message();
    }
  }
  EXPECT_EQ(refused, 0);
  ASSERT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
}

// Prompt(3) with the default 16 tokens to generate: 19 KiB of KV.
constexpr int64_t kSmallRequestKv = 19 * 1024;

TEST_F(RouterServiceTest, ARequestWaitsForADecodeWorkerWithRoomForItsKv) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho, 0, 3);
  ReportRoom("d1", 0, kSmallRequestKv - 1);
  StartRouter();
  Outcome out;
  std::thread client([&] { out = Generate(Prompt(3)); });
  ASSERT_LT(WaitFor([&] { return service_->requests_queued() == 1; }), absl::Seconds(2));
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(d1->calls(), 0);
  EXPECT_EQ(service_->requests_in_flight(), 1);
  // The worker's next report has room: the request goes within a few ms.
  ReportRoom("d1", 0, kSmallRequestKv);
  client.join();
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_THAT(out.tokens(), ElementsAre(10, 11, 12));
  EXPECT_EQ(d1->calls(), 1);
  // (The queue lets go of the stream just after its call started.)
  EXPECT_LT(WaitFor([&] { return service_->requests_queued() == 0; }), absl::Seconds(1));
  EXPECT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
  EXPECT_THAT(MetricsText(), HasSubstr("strata_requests_total{finish_reason=\"length\"} 1"));
}

TEST_F(RouterServiceTest, ARequestWaitingLongerThanTheQueueTimeoutIsUnavailableNamingWhy) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  ReportRoom("d1", 0, 1000);
  RouterServiceOptions options = DefaultOptions();
  options.queue_timeout = absl::Milliseconds(300);
  StartRouter(options);
  const absl::Time start = absl::Now();
  const Outcome out = Generate(Prompt(3));
  const absl::Duration waited = absl::Now() - start;
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(out.status.error_message(),
              AllOf(HasSubstr("no decode worker had room for the request's KV within 300ms"),
                    HasSubstr("has room for 19 tokens of KV"), HasSubstr("0 tokens on d1")));
  EXPECT_GE(waited, absl::Milliseconds(290));
  EXPECT_LT(waited, absl::Seconds(2));
  EXPECT_EQ(d1->calls(), 0);
  // (The queue lets go of the stream just after it ended the call.)
  EXPECT_LT(WaitFor([&] { return service_->requests_queued() == 0; }), absl::Seconds(1));
  EXPECT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
  EXPECT_THAT(MetricsText(),
              HasSubstr("strata_requests_rejected_total{reason=\"queue_timeout\"} 1"));

  // With no queue timeout, at once.
  router_server_->Shutdown();
  options.queue_timeout = absl::ZeroDuration();
  StartRouter(options);
  const Outcome now = Generate(Prompt(3));
  EXPECT_EQ(now.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(now.status.error_message(), HasSubstr("has room for 19 tokens of KV"));
}

TEST_F(RouterServiceTest, AClientThatLeavesWhileItsRequestWaitsLeavesTheQueue) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  ReportRoom("d1", 0, 1000);
  StartRouter();
  // Cancelled.
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, Prompt(3));
  ASSERT_LT(WaitFor([&] { return service_->requests_queued() == 1; }), absl::Seconds(2));
  context.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(WaitFor([&] { return service_->requests_queued() == 0; }), absl::Seconds(1));
  // Its deadline passing.
  const Outcome out = Generate(Prompt(3), std::chrono::milliseconds(300));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(WaitFor([&] {
              return service_->requests_in_flight() == 0 && service_->requests_queued() == 0;
            }),
            absl::Seconds(1));
  // Room now reaches no one.
  ReportRoom("d1", 0, int64_t{1} << 30);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(d1->calls(), 0);
  EXPECT_THAT(MetricsText(),
              AllOf(HasSubstr("strata_requests_total{finish_reason=\"cancelled\"} 1"),
                    HasSubstr("strata_requests_total{finish_reason=\"deadline_exceeded\"} 1")));
}

TEST_F(RouterServiceTest, AWaitingRequestIsNotOvertakenByALaterOneOfItsProfile) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho, 0, 3);
  // Room for the small request, not for the large one (116 KiB).
  ReportRoom("d1", 0, 3 * kSmallRequestKv);
  StartRouter();
  Outcome large, small;
  std::thread first([&] { large = Generate(Prompt(100)); });
  ASSERT_LT(WaitFor([&] { return service_->requests_queued() == 1; }), absl::Seconds(2));
  std::thread second([&] { small = Generate(Prompt(3)); });
  ASSERT_LT(WaitFor([&] { return service_->requests_queued() == 2; }), absl::Seconds(2));
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(d1->calls(), 0);
  ReportRoom("d1", 0, int64_t{1} << 30);
  first.join();
  second.join();
  EXPECT_TRUE(large.status.ok()) << large.status.error_message();
  EXPECT_TRUE(small.status.ok()) << small.status.error_message();
  EXPECT_EQ(d1->calls(), 2);
}

TEST_F(RouterServiceTest, ARequestNoDecodeWorkerCouldEverHoldIsRefusedAtOnce) {
  FakeDecodeWorker* d1 = AddDecode("d1", FakeDecodeWorker::Mode::kEcho);
  ReportRoom("d1", 0, 100 * 1024, 100 * 1024);
  StartRouter();  // waiting would be allowed for 30 s
  const absl::Time start = absl::Now();
  const Outcome out = Generate(Prompt(200));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(),
              AllOf(HasSubstr("the prompt's 200 tokens and max_tokens 16"),
                    HasSubstr("can ever hold 216 tokens"), HasSubstr("100 tokens on d1")));
  EXPECT_EQ(d1->calls(), 0);
  EXPECT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
  // One that fits still goes.
  EXPECT_TRUE(Generate(Prompt(3)).status.ok());
}

TEST_F(RouterServiceTest, ModelInfoAndTokenizeAreAnsweredLocally) {
  StartRouter();
  grpc::ClientContext info_context;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(stub_->ModelInfo(&info_context, v1::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), "tiny");
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.context_length(), 512u);
  EXPECT_EQ(info.vocab_size(), 1000u);
  EXPECT_THAT(info.profiles(), ElementsAreArray({"default", "sparse"}));
  EXPECT_EQ(info.default_profile(), "default");

  grpc::ClientContext tokenize_context;
  v1::TokenizeRequest tokenize;
  tokenize.set_text("hello");
  v1::TokenizeResponse ids;
  EXPECT_EQ(stub_->Tokenize(&tokenize_context, tokenize, &ids).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

// Many clients at once, some cancelling at any point of their stream and
// some with deadlines that expire mid-stream, over a pool with a worker
// that always fails: every call ends with a status the client may expect,
// and the router lets go of every request (its destructor, at the end,
// waits for the last call to a worker).
TEST_F(RouterServiceTest, ConcurrentClientsCancellingAtAnyPoint) {
  AddDecode("d0", FakeDecodeWorker::Mode::kFailBefore);
  AddDecode("d1", FakeDecodeWorker::Mode::kEcho, 0, 40);
  AddDecode("d2", FakeDecodeWorker::Mode::kEcho, 0, 40);
  RouterServiceOptions options = DefaultOptions();
  options.max_requests_in_flight = 1000;
  StartRouter(options);
  constexpr int kThreads = 8;
  constexpr int kPerThread = 12;
  std::atomic<int> ok{0}, cancelled{0}, deadline{0}, unexpected{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const int kind = (t * kPerThread + i) % 4;  // 0: read all, 1: cancel, 2: deadline
        grpc::ClientContext context;
        context.set_deadline(
            std::chrono::system_clock::now() +
            (kind == 2 ? std::chrono::milliseconds(2 + i) : std::chrono::milliseconds(5000)));
        auto reader = stub_->Generate(&context, Prompt(1 + (i % 12)));
        v1::GenerateResponse response;
        int read = 0;
        while (reader->Read(&response)) {
          if (kind == 1 && ++read == i % 5) context.TryCancel();
        }
        if (kind == 1 && read < i % 5) context.TryCancel();
        const grpc::Status status = reader->Finish();
        switch (status.error_code()) {
          case grpc::StatusCode::OK:
            ok.fetch_add(1);
            break;
          case grpc::StatusCode::CANCELLED:
            cancelled.fetch_add(1);
            break;
          case grpc::StatusCode::DEADLINE_EXCEEDED:
            deadline.fetch_add(1);
            break;
          default:
            ADD_FAILURE() << status.error_code() << ": " << status.error_message();
            unexpected.fetch_add(1);
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_EQ(ok + cancelled + deadline, kThreads * kPerThread);
  EXPECT_GE(ok.load(), kThreads * kPerThread / 2);
  EXPECT_GT(cancelled.load(), 0);
  EXPECT_GT(service_->retries(), 0);
  EXPECT_LT(WaitFor([&] { return service_->requests_in_flight() == 0; }), absl::Seconds(2));
}

}  // namespace
}  // namespace strata::router

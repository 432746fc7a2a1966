// `strata serve` against hostile and careless clients: messages that do not
// parse, oversize and unbounded fields, clients that stop reading, repeated
// signals and a cache too small to serve. Each test drives a real server
// process over gRPC (tests/router/server_process.h).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "strata/v1/generate.grpc.pb.h"
#include "tests/router/server_process.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing_util::ServerProcess;
using Clock = std::chrono::steady_clock;

// Sends `bytes` as the request of `method` and returns the call's status
// (every case here fails before a response).
grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                     const std::string& bytes) {
  return testing_util::RawUnaryCall(channel, method, bytes);
}

v1::GenerateRequest TextRequest(const std::string& text, int max_tokens) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_stopping()->set_max_tokens(max_tokens);
  return r;
}

grpc::Status Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                      int* tokens = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&ctx, request);
  v1::GenerateResponse r;
  int n = 0;
  while (reader->Read(&r)) n += r.token_ids_size();
  if (tokens) *tokens = n;
  return reader->Finish();
}

class HardeningTest : public testing_util::SharedServerTest<> {};

TEST_F(HardeningTest, InvalidUtf8IsInvalidArgumentNamingTheField) {
  // GenerateRequest.text (field 2) = bytes ff fe: not UTF-8.
  const std::string bad_text("\x12\x02\xff\xfe", 4);
  grpc::Status s = RawCall(server_->channel(), "/strata.v1.Generation/Generate", bad_text);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("UTF-8"));
  EXPECT_THAT(s.error_message(), HasSubstr("text"));
  // TokenizeRequest.text is field 1.
  const std::string bad_tokenize("\x0a\x02\xff\xfe", 4);
  s = RawCall(server_->channel(), "/strata.v1.Generation/Tokenize", bad_tokenize);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("UTF-8"));
}

TEST_F(HardeningTest, UnparsableRequestIsInvalidArgumentWithAMessage) {
  // Field 2 claims 16 bytes and carries 3.
  grpc::Status s = RawCall(server_->channel(), "/strata.v1.Generation/Generate",
                           std::string("\x12\x10"
                                       "abc"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("cannot parse"));
}

TEST_F(HardeningTest, NothingReachesStderrBelowTheLogLevel) {
  // The cases above (and the libraries' complaints about them) are the
  // client's mistakes, answered to the client; at the default level
  // (warn) the server's stderr stays empty.
  RawCall(server_->channel(), "/strata.v1.Generation/Generate", std::string("\x12\x02\xff\xfe", 4));
  RawCall(server_->channel(), "/strata.v1.Generation/Generate",
          std::string("\x12\x10"
                      "abc"));
  EXPECT_EQ(server_->Stderr(), "");
}

TEST_F(HardeningTest, TextBeyondGrpcsDefaultLimitIsInvalidArgumentNotResourceExhausted) {
  // 5 MiB: more than gRPC's default receive limit (4 MiB), less than
  // strata's 16 MiB text limit. It can never fit the 2048-token context,
  // which the server says without tokenizing it.
  const auto start = Clock::now();
  grpc::Status s = Generate(server_->stub(), TextRequest(std::string(5 << 20, 'a'), 4));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("more than the context length"));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

TEST_F(HardeningTest, RequestOverTheSizeLimitIsInvalidArgumentNamingTheLimit) {
  // 20 MiB of token ids and text: over strata's 17 MiB request limit.
  v1::GenerateRequest r = TextRequest(std::string(20 << 20, 'a'), 4);
  grpc::Status s = Generate(server_->stub(), r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("this server accepts at most"));
}

TEST_F(HardeningTest, ErrorMessagesQuoteABoundedPrefixOfTheInput) {
  v1::GenerateRequest r = TextRequest("hello", 4);
  r.set_profile(std::string(100000, 'p'));
  grpc::Status s = Generate(server_->stub(), r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("profile"));
  EXPECT_LT(s.error_message().size(), 400u);
}

TEST_F(HardeningTest, StopTokenIdsAreCapped) {
  v1::GenerateRequest r = TextRequest("hello", 4);
  for (int i = 0; i < 1025; ++i) r.mutable_stopping()->add_stop_token_ids(i % 2000);
  grpc::Status s = Generate(server_->stub(), r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("stopping.stop_token_ids: at most 1024"));
  r.mutable_stopping()->mutable_stop_token_ids()->Truncate(1024);
  r.mutable_stopping()->set_ignore_eos(true);
  EXPECT_TRUE(Generate(server_->stub(), r).ok());
}

TEST_F(HardeningTest, MaxTokensFollowsTheDocumentedRange) {
  // [1, context length): 2048 is out, 2047 in (then cut by the context).
  grpc::Status s = Generate(server_->stub(), TextRequest("hello", 2048));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("stopping.max_tokens: must be in [1, 2048)"));
  v1::GenerateRequest ok = TextRequest("hello", 2047);
  // Half the vocabulary stops it: a short run.
  for (int id = 0; id < 1024; ++id) ok.mutable_stopping()->add_stop_token_ids(id);
  EXPECT_TRUE(Generate(server_->stub(), ok).ok());
}

// A client that never reads: a channel whose stream window is tiny and does
// not grow, so the server's writes stall after a few responses.
std::unique_ptr<v1::Generation::Stub> StubThatReadsNothing(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, -1);
  return v1::Generation::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

TEST(SlowClientTest, AClientThatStopsReadingFreesItsSlotWhenGenerationEnds) {
  ServerProcess server({"--max-in-flight", "1"});
  auto stuck_stub = StubThatReadsNothing(server.address());
  v1::GenerateRequest r = TextRequest("Return the number of", 1500);
  r.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext stuck;  // no deadline, and nobody reads
  auto reader = stuck_stub->Generate(&stuck, r);
  // The generation ends on the server (its KV and slot free) though the
  // client has read nothing.
  EXPECT_EQ(server.WaitForMetric(
                "strata_requests_total{finish_reason=\"length\"}", [](double v) { return v >= 1; },
                std::chrono::seconds(120)),
            1);
  EXPECT_EQ(server.WaitForMetric("strata_requests_in_flight", [](double v) { return v == 0; }), 0);
  int tokens = 0;
  grpc::Status next = Generate(server.stub(), TextRequest("hello", 4), &tokens);
  EXPECT_TRUE(next.ok()) << next.error_message();
  EXPECT_EQ(tokens, 4);
  // The stuck client can still read everything afterwards.
  v1::GenerateResponse resp;
  int got = 0;
  while (reader->Read(&resp)) got += resp.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(got, 1500);
}

TEST(SlowClientTest, UndeliveredTokensAreBoundedPerStream) {
  ServerProcess server({"--max-undelivered-tokens", "64"});
  auto stuck_stub = StubThatReadsNothing(server.address());
  v1::GenerateRequest r = TextRequest("Return the number of", 1900);
  r.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext stuck;
  auto reader = stuck_stub->Generate(&stuck, r);
  // Cancelled as too slow, long before its 1900 tokens: KV freed.
  EXPECT_EQ(server.WaitForMetric("strata_requests_total{finish_reason=\"client_too_slow\"}",
                                 [](double v) { return v >= 1; }),
            1);
  EXPECT_EQ(server.WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }), 0);
  EXPECT_EQ(server.Metric("strata_requests_total{finish_reason=\"length\"}"), 0);
  v1::GenerateResponse resp;
  int got = 0;
  while (reader->Read(&resp)) got += resp.token_ids_size();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(got, 1900);
}

TEST(ShutdownSignalTest, ASecondSignalDuringTheDrainExitsAtOnce) {
  ServerProcess server({"--grace-seconds", "120"});
  auto stuck_stub = StubThatReadsNothing(server.address());
  v1::GenerateRequest r = TextRequest("Return the number of", 1900);
  r.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext stuck;  // holds the drain: its call never completes
  auto reader = stuck_stub->Generate(&stuck, r);
  ASSERT_GE(server.WaitForMetric("strata_requests_in_flight", [](double v) { return v >= 1; }), 1);
  server.Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_EQ(server.Wait(std::chrono::seconds(0)), -1);  // still draining
  const auto start = Clock::now();
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(std::chrono::seconds(10)), 128 + SIGTERM);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  stuck.TryCancel();
}

TEST(StartupTest, AKvCacheSmallerThanOneContextIsRefusedAtStart) {
  // `timeout`: a server that starts anyway must not hang the test.
  const std::string cmd = "timeout 30 " + std::string(STRATA_BINARY) + " serve --model " +
                          testing_util::kTinyModel +
                          " --port 0 --metrics-port -1 --max-context 2048 --kv-pages 64 2>&1";
  const testing_util::CommandResult r = testing_util::RunCommand(cmd);
  EXPECT_NE(r.exit_status, 0);
  EXPECT_THAT(r.output, HasSubstr("less than one full context of 2048 tokens"));
  EXPECT_THAT(r.output, Not(HasSubstr("listening")));
}

TEST(TensorParallelFailureTest, ABrokenGroupTakesTheServerOutOfService) {
  // A rank fails mid-request (injected: the group is aborted after 5
  // steps). The request in flight fails; later ones are refused at once
  // with UNAVAILABLE naming the broken group, and the health service says
  // NOT_SERVING, so that an orchestrator restarts the server.
  setenv("STRATA_FAULT_BREAK_GROUP_AFTER_STEPS", "5", 1);
  ServerProcess server({"--tensor-parallel", "2", "--max-seqs", "2"});
  unsetenv("STRATA_FAULT_BREAK_GROUP_AFTER_STEPS");
  EXPECT_EQ(server.HealthStatus(), 1);
  int tokens = 0;
  const grpc::Status broken =
      Generate(server.stub(), TextRequest("Return the number of", 40), &tokens);
  EXPECT_FALSE(broken.ok());
  EXPECT_LT(tokens, 40);
  const auto start = Clock::now();
  const grpc::Status refused = Generate(server.stub(), TextRequest("Return the number of", 4));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2)) << "refused, not timed out";
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("tensor-parallel group is broken"));
  EXPECT_THAT(refused.error_message(), HasSubstr("fault injection"));
  EXPECT_EQ(server.HealthStatus(), 2) << "NOT_SERVING";
  EXPECT_THAT(server.Stderr(), HasSubstr("health is NOT_SERVING"));
}

TEST(TensorParallelFailureTest, ARankStuckOutsideACollectiveEndsTheServerInsteadOfHangingIt) {
  // A rank stops taking steps (injected: it stalls before its sixth, in no
  // collective). The leader's next collective times out (1 s) and breaks
  // the group; the stuck rank is waited for that long twice more, then the
  // server exits naming it, so that an orchestrator restarts it, and the
  // client's stream ends with an error instead of hanging.
  setenv("STRATA_FAULT_STALL_RANK_AFTER_STEPS", "5", 1);
  ServerProcess server(
      {"--tensor-parallel", "2", "--max-seqs", "2", "--collective-timeout-seconds", "1"});
  unsetenv("STRATA_FAULT_STALL_RANK_AFTER_STEPS");
  const auto start = Clock::now();
  int tokens = 0;
  const grpc::Status failed =
      Generate(server.stub(), TextRequest("Return the number of", 40), &tokens);
  EXPECT_FALSE(failed.ok());
  EXPECT_LT(tokens, 40);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(20)) << "ended, not hung";
  EXPECT_EQ(server.Wait(std::chrono::seconds(20)), EXIT_FAILURE);
  EXPECT_THAT(server.Stderr(), HasSubstr("rank(s) 1 did not finish their step within 1000 ms"));
  EXPECT_THAT(server.Stderr(), HasSubstr("exiting so that the worker is restarted"));
}

}  // namespace
}  // namespace strata

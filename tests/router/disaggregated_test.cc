// Disaggregated serving end to end: `strata prefill` and `strata decode`
// processes on loopback, the prompt computed by the prefill worker, its KV
// sent over UCX to the decode worker, which decodes. The tokens equal those
// of one worker computing everything; a prefill worker that is gone leaves
// the prompt to the decode worker; and both workers describe themselves on
// the internal Worker service.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "strata/internal/v1/worker.grpc.pb.h"
#include "strata/v1/generate.grpc.pb.h"
#include "tests/router/server_process.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using testing_util::ServerProcess;

// Small host buffers: the tiny model's page records are small.
// Prefill chunks of 256 tokens: a long prompt's KV leaves in parts.
const std::vector<std::string> kPrefillArgs = {"--kv-export-bytes",  "16777216", "--max-seqs", "8",
                                               "--max-batch-tokens", "256"};
const std::vector<std::string> kDecodeArgs = {"--kv-landing-bytes", "16777216", "--max-seqs", "8"};

// A profile file in the test's temporary directory; its path.
std::string WriteProfile(const std::string& name, const std::string& yaml) {
  const std::string path = ::testing::TempDir() + name;
  FILE* f = fopen(path.c_str(), "w");
  EXPECT_NE(f, nullptr) << path;
  if (f != nullptr) {
    fputs(yaml.c_str(), f);
    fclose(f);
  }
  return path;
}

std::vector<std::string> WithProfile(std::vector<std::string> args, const std::string& profile) {
  args.insert(args.end(), {"--profile", profile});
  return args;
}

struct Completion {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  v1::GenerateResponse last;
  grpc::Status status;
};

Completion Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                    const std::string& prefill_address = "") {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  if (!prefill_address.empty()) ctx.AddMetadata("strata-prefill-address", prefill_address);
  Completion c;
  auto reader = stub.Generate(&ctx, request);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    c.tokens.insert(c.tokens.end(), r.token_ids().begin(), r.token_ids().end());
    c.logprobs.insert(c.logprobs.end(), r.logprobs().begin(), r.logprobs().end());
    c.last = r;
  }
  c.status = reader->Finish();
  return c;
}

v1::GenerateRequest Request(int prompt_tokens, int max_tokens, uint32_t seed) {
  v1::GenerateRequest r;
  for (int i = 0; i < prompt_tokens; ++i) {
    r.mutable_token_ids()->add_ids(static_cast<int32_t>((seed * 7919u + i * 104729u) % 500 + 3));
  }
  r.mutable_sampling()->set_temperature(0);
  r.mutable_stopping()->set_max_tokens(max_tokens);
  r.mutable_stopping()->set_ignore_eos(true);
  r.set_return_logprobs(true);
  return r;
}

internal::v1::DescribeResponse Describe(const std::string& address) {
  auto stub = internal::v1::Worker::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  internal::v1::DescribeResponse out;
  EXPECT_TRUE(stub->Describe(&ctx, {}, &out).ok());
  return out;
}

// Over TCP alone, and with shared memory offered too (UCX keeps to TCP
// for endpoints that must notice a dead peer, but must accept the setting).
class DisaggregatedTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { setenv("UCX_TLS", GetParam(), 1); }
  void TearDown() override { unsetenv("UCX_TLS"); }
};

INSTANTIATE_TEST_SUITE_P(UcxTransports, DisaggregatedTest, ::testing::Values("tcp", "sm,tcp"));

TEST_P(DisaggregatedTest, APromptPrefilledElsewhereDecodesToTheSameTokens) {
  ServerProcess prefill(kPrefillArgs, "prefill");
  ServerProcess decode(kDecodeArgs, "decode");
  for (auto [prompt, max_tokens] : {std::pair{7, 20}, {40, 24}, {300, 16}}) {
    SCOPED_TRACE(prompt);
    const v1::GenerateRequest r = Request(prompt, max_tokens, static_cast<uint32_t>(prompt));
    const Completion here = Generate(decode.stub(), r);
    ASSERT_TRUE(here.status.ok()) << here.status.error_message();
    const Completion split = Generate(decode.stub(), r, prefill.address());
    ASSERT_TRUE(split.status.ok()) << split.status.error_message() << decode.Stderr();
    EXPECT_EQ(split.tokens, here.tokens);
    ASSERT_EQ(split.logprobs.size(), here.logprobs.size());
    for (size_t i = 0; i < here.logprobs.size(); ++i) {
      EXPECT_NEAR(split.logprobs[i], here.logprobs[i], 1e-4) << i;
    }
    EXPECT_EQ(split.last.usage().prompt_tokens(), static_cast<uint32_t>(prompt));
    EXPECT_EQ(split.last.usage().completion_tokens(), static_cast<uint32_t>(max_tokens));
  }
  // The KV crossed: the decode worker took three transfers.
  EXPECT_THAT(decode.Metrics(), HasSubstr("strata_kv_imports_total 3"));
  const internal::v1::DescribeResponse p = Describe(prefill.address());
  const internal::v1::DescribeResponse d = Describe(decode.address());
  EXPECT_EQ(p.info().role(), internal::v1::WORKER_ROLE_PREFILL);
  EXPECT_EQ(d.info().role(), internal::v1::WORKER_ROLE_DECODE);
  EXPECT_FALSE(d.info().kv_address().empty());
  EXPECT_EQ(p.info().kv_format(), d.info().kv_format());
  EXPECT_GT(d.load().gpu_kv_total_bytes(), 0);
  EXPECT_EQ(p.load().running_sequences(), 0);
}

TEST(DisaggregatedRoutingTest, APromptsKvCrossesInItsProfilesCodec) {
  // The profile's codec is the wire's: int8 pages, decoded on the decode
  // worker; the bytes on the wire are a fraction of the raw KV's.
  const std::string profile = WriteProfile("disagg_int8_profile.yaml", "name: wire\ncodec: int8\n");
  ServerProcess prefill(WithProfile(kPrefillArgs, profile), "prefill");
  ServerProcess decode(WithProfile(kDecodeArgs, profile), "decode");
  v1::GenerateRequest r = Request(300, 16, 21);
  r.set_profile("wire");
  const Completion here = Generate(decode.stub(), r);
  ASSERT_TRUE(here.status.ok()) << here.status.error_message();
  const Completion split = Generate(decode.stub(), r, prefill.address());
  ASSERT_TRUE(split.status.ok()) << split.status.error_message() << decode.Stderr();
  ASSERT_EQ(split.tokens.size(), here.tokens.size());
  EXPECT_EQ(split.tokens.front(), here.tokens.front()) << "sampled before the KV left";
  EXPECT_EQ(decode.Metric("strata_kv_imports_total"), 1);
  const double wire = decode.Metric("strata_kv_wire_bytes_total");
  const double raw = decode.Metric("strata_kv_raw_bytes_total");
  EXPECT_GT(wire, 0);
  EXPECT_LT(wire, 0.7 * raw) << "int8 on the wire, not raw";
  const double landing = decode.Metric("strata_kv_landing_bytes_total");
  EXPECT_EQ(
      decode.WaitForMetric("strata_kv_landing_bytes_free", [&](double v) { return v == landing; }),
      landing);
}

TEST(DisaggregatedRoutingTest, AGonePrefillWorkerLeavesThePromptToTheDecodeWorker) {
  ServerProcess decode(kDecodeArgs, "decode");
  const v1::GenerateRequest r = Request(50, 12, 3);
  const Completion here = Generate(decode.stub(), r);
  ASSERT_TRUE(here.status.ok());
  std::string gone;
  {
    ServerProcess prefill(kPrefillArgs, "prefill");
    gone = prefill.address();
  }  // killed
  const Completion fallback = Generate(decode.stub(), r, gone);
  ASSERT_TRUE(fallback.status.ok()) << fallback.status.error_message();
  EXPECT_EQ(fallback.tokens, here.tokens);
  EXPECT_THAT(decode.Stderr(), HasSubstr("remote prefill failed, computing the prompt here"));
}

TEST(DisaggregatedRoutingTest, ABadPrefillRequestIsRefusedNamingTheField) {
  ServerProcess prefill(kPrefillArgs, "prefill");
  auto stub = internal::v1::Worker::NewStub(
      grpc::CreateChannel(prefill.address(), grpc::InsecureChannelCredentials()));
  internal::v1::PrefillRequest bad;
  bad.set_request_id("r1");
  bad.add_prompt_ids(5);
  bad.set_kv_destination("nowhere");
  bad.set_transfer_id(1);
  bad.mutable_sampling()->set_temperature(-1);
  // Each call's answers, then its status.
  auto call = [&](const internal::v1::PrefillRequest& request) {
    grpc::ClientContext ctx;
    std::vector<internal::v1::PrefillResponse> answers;
    auto reader = stub->Prefill(&ctx, request);
    internal::v1::PrefillResponse out;
    while (reader->Read(&out)) answers.push_back(out);
    return std::make_pair(answers, reader->Finish());
  };
  const auto [refused_answers, s] = call(bad);
  EXPECT_TRUE(refused_answers.empty());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("temperature"));
  // A destination that is not a KV transport address: the send is refused
  // without reaching anyone, and the call fails naming it. The prompt's
  // KV leaves as its last step computes it, so the call fails before its
  // first token (the decode worker then computes the prompt itself).
  internal::v1::PrefillRequest nowhere = bad;
  nowhere.mutable_sampling()->set_temperature(0);
  const auto [answers, s2] = call(nowhere);
  EXPECT_TRUE(answers.empty());
  EXPECT_FALSE(s2.ok());
  EXPECT_THAT(s2.error_message(), HasSubstr("sending its KV"));
  // A longer prompt's first chunk leaves before its last step: the same.
  internal::v1::PrefillRequest longer = nowhere;
  for (int i = 0; i < 600; ++i) longer.add_prompt_ids(3 + i % 400);
  const auto [longer_answers, s3] = call(longer);
  EXPECT_TRUE(longer_answers.empty());
  EXPECT_THAT(s3.error_message(), HasSubstr("sending its KV"));
}

// Generate through the router until it answers OK (its discovery has found
// a decode worker), at most `timeout`.
Completion GenerateOnceReady(v1::Generation::Stub& stub, const v1::GenerateRequest& r,
                             std::chrono::seconds timeout = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  Completion c;
  do {
    c = Generate(stub, r);
    if (c.status.error_code() != grpc::StatusCode::UNAVAILABLE) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  } while (std::chrono::steady_clock::now() < end);
  return c;
}

TEST(DisaggregatedRoutingTest, TheRouterSendsLongPromptsThroughAPrefillWorker) {
  ServerProcess prefill(kPrefillArgs, "prefill");
  ServerProcess decode(kDecodeArgs, "decode");
  ServerProcess router({"--workers", prefill.address(), "--workers", decode.address(),
                        "--prefill-threshold-tokens", "32", "--heartbeat-seconds", "0.2"},
                       "router");
  const v1::GenerateRequest long_prompt = Request(120, 16, 5), short_prompt = Request(9, 16, 6);
  for (const v1::GenerateRequest* r : {&long_prompt, &short_prompt}) {
    const Completion direct = Generate(decode.stub(), *r);
    ASSERT_TRUE(direct.status.ok());
    const Completion routed = GenerateOnceReady(router.stub(), *r);
    ASSERT_TRUE(routed.status.ok()) << routed.status.error_message() << router.Stderr();
    EXPECT_EQ(routed.tokens, direct.tokens);
    EXPECT_EQ(routed.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  }
  // Only the long prompt crossed from the prefill worker.
  EXPECT_THAT(prefill.Metrics(), HasSubstr("strata_kv_exports_total 1"));
  EXPECT_THAT(decode.Metrics(), HasSubstr("strata_kv_imports_total 1"));
  // The router shows its pools.
  EXPECT_EQ(router.Metric("strata_router_workers{role=\"prefill\",state=\"schedulable\"}"), 1);
  EXPECT_EQ(router.Metric("strata_router_workers{role=\"decode\",state=\"schedulable\"}"), 1);
  EXPECT_GT(router.Metric("strata_router_pool_kv_total_bytes{role=\"decode\",tier=\"gpu\"}"), 0);
}

TEST(DisaggregatedRoutingTest, ADocumentAskedAgainIsComputedOnTheDecodeWorkerHoldingIt) {
  // The decode worker keeps prompts in its prefix store; the router sends
  // the same document with another question back to it, without the
  // prefill worker, and the worker loads the document's KV.
  const std::string profile = ::testing::TempDir() + "disagg_docs_profile.yaml";
  {
    FILE* f = fopen(profile.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fputs("name: docs\ntiers: {host_bytes: 64MiB, prefix_bytes: 32MiB}\n", f);
    fclose(f);
  }
  std::vector<std::string> prefill_args = kPrefillArgs, decode_args = kDecodeArgs;
  for (auto* args : {&prefill_args, &decode_args}) {
    args->insert(args->end(), {"--profile", profile});
  }
  ServerProcess prefill(prefill_args, "prefill");
  ServerProcess decode(decode_args, "decode");
  ServerProcess router(
      {"--workers", prefill.address(), "--workers", decode.address(), "--prefill-threshold-tokens",
       "32", "--heartbeat-seconds", "0.2", "--profile", profile},
      "router");
  const v1::GenerateRequest document = Request(200, 8, 11);
  auto asking = [&](int question) {
    v1::GenerateRequest r = document;
    for (int i = 0; i < 3; ++i) r.mutable_token_ids()->add_ids(400 + 10 * question + i);
    return r;
  };
  const Completion first = GenerateOnceReady(router.stub(), asking(1));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message() << router.Stderr();
  EXPECT_EQ(first.last.usage().cached_prompt_tokens(), 0u);
  const Completion again = Generate(router.stub(), asking(2));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message() << router.Stderr();
  EXPECT_GE(again.last.usage().cached_prompt_tokens(), 176u) << "the document's whole pages";
  EXPECT_EQ(router.Metric("strata_router_routes_total{route=\"stored_prefix\"}"), 1);
  EXPECT_EQ(decode.Metric("strata_kv_prefix_hits_total"), 1);
  EXPECT_EQ(prefill.Metric("strata_kv_exports_total"),
            router.Metric("strata_router_routes_total{route=\"prefill_worker\"}"));
  // The tokens of a worker that computed the whole prompt.
  ServerProcess plain(kDecodeArgs, "decode");
  EXPECT_EQ(again.tokens, Generate(plain.stub(), asking(2)).tokens);
}

TEST(DisaggregatedRoutingTest, ADeadDecodeWorkerLeavesSchedulingAndRequestsGoOn) {
  ServerProcess decode1(kDecodeArgs, "decode");
  auto decode2 = std::make_unique<ServerProcess>(kDecodeArgs, "decode");
  ServerProcess router({"--workers", decode1.address(), "--workers", decode2->address(),
                        "--heartbeat-seconds", "0.2", "--worker-expiry-seconds", "1"},
                       "router");
  const v1::GenerateRequest r = Request(20, 8, 9);
  const Completion before = GenerateOnceReady(router.stub(), r);
  ASSERT_TRUE(before.status.ok()) << before.status.error_message();
  decode2.reset();  // killed: SIGKILL, no drain
  // Every request succeeds: one that picks the dead worker before it
  // expires is retried on the live one, and after the expiry none picks it.
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i) {
    const Completion c = Generate(router.stub(), r);
    ASSERT_TRUE(c.status.ok()) << i << ": " << c.status.error_message();
    EXPECT_EQ(c.tokens, before.tokens);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// A decode worker whose cache holds one request at a time: the router
// keeps the others waiting until the worker reports room again, and every
// request completes (none is refused for want of room).
TEST(DisaggregatedRoutingTest, RequestsWaitForADecodeWorkerWithRoomInsteadOfFailing) {
  ServerProcess decode({"--kv-pages", "8", "--max-context", "128", "--max-seqs", "8"}, "decode");
  ServerProcess router({"--workers", decode.address(), "--heartbeat-seconds", "0.2",
                        "--max-context", "128", "--queue-timeout-seconds", "30"},
                       "router");
  // 60 + 50 tokens: most of the 128 the cache holds.
  const Completion first = GenerateOnceReady(router.stub(), Request(60, 50, 1));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  // (Those refused before the router's discovery found the worker.)
  const double unavailable_before =
      router.Metric("strata_requests_rejected_total{reason=\"unavailable\"}");
  constexpr int kRequests = 4;
  std::vector<Completion> done(kRequests);
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back([&, i] { done[i] = Generate(router.stub(), Request(60, 50, 1)); });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(done[i].status.ok()) << i << ": " << done[i].status.error_message();
    EXPECT_EQ(done[i].tokens, first.tokens) << i;
  }
  EXPECT_EQ(router.Metric("strata_requests_rejected_total{reason=\"unavailable\"}"),
            unavailable_before);
  EXPECT_EQ(router.Metric("strata_requests_rejected_total{reason=\"queue_timeout\"}"), 0);
  EXPECT_EQ(router.WaitForMetric("strata_requests_waiting", [](double v) { return v == 0; }), 0);
  EXPECT_EQ(decode.WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }), 0);
}

// Every pool a request can hold on a worker is empty again: GPU pages,
// host records, exports waiting to be sent, room reserved to land KV.
void ExpectPoolsEmpty(ServerProcess& worker, const std::string& name) {
  SCOPED_TRACE(name);
  auto zero = [](double v) { return v == 0; };
  EXPECT_EQ(worker.WaitForMetric("strata_kv_cache_pages_used", zero), 0);
  EXPECT_EQ(worker.WaitForMetric("strata_kv_host_bytes_used", zero), 0);
  EXPECT_EQ(worker.WaitForMetric("strata_kv_exports_held", zero), 0);
  const double total = worker.Metric("strata_kv_landing_bytes_total");
  EXPECT_EQ(
      worker.WaitForMetric("strata_kv_landing_bytes_free", [&](double v) { return v == total; }),
      total);
}

// Workers of two tensor-parallel ranks: a page's record carries both ranks'
// rows, which land on the same rank. A prefill worker of another size is
// never paired with the decode worker by the router, and asked directly it
// refuses before computing, so the decode worker computes the prompt.
TEST(DisaggregatedTensorParallelTest, WorkersOfTwoRanksExchangeKvRankToRank) {
  std::vector<std::string> prefill2 = kPrefillArgs, decode2 = kDecodeArgs;
  for (auto* args : {&prefill2, &decode2}) args->insert(args->end(), {"--tensor-parallel", "2"});
  ServerProcess p1(kPrefillArgs, "prefill"), p2(prefill2, "prefill");
  ServerProcess d2(decode2, "decode");
  ServerProcess one({"--max-seqs", "8"});
  const internal::v1::DescribeResponse described = Describe(d2.address());
  EXPECT_THAT(described.info().kv_format(), HasSubstr("/tp2"));
  EXPECT_EQ(Describe(p2.address()).info().kv_format(), described.info().kv_format());
  EXPECT_NE(Describe(p1.address()).info().kv_format(), described.info().kv_format());
  // Their KV bytes count every rank's rows, as one rank's do the whole
  // model's: the router counts tokens of room alike.
  const internal::v1::DescribeResponse one_rank = Describe(p1.address());
  const internal::v1::DescribeResponse two_ranks = Describe(p2.address());
  EXPECT_GT(one_rank.info().kv_bytes_per_token(), 0);
  EXPECT_EQ(two_ranks.info().kv_bytes_per_token(), one_rank.info().kv_bytes_per_token());
  EXPECT_EQ(two_ranks.load().gpu_kv_total_bytes(), one_rank.load().gpu_kv_total_bytes());

  const v1::GenerateRequest r = Request(300, 16, 31);
  const Completion expected = Generate(one.stub(), r);
  ASSERT_TRUE(expected.status.ok()) << expected.status.error_message();
  const Completion split = Generate(d2.stub(), r, p2.address());
  ASSERT_TRUE(split.status.ok()) << split.status.error_message() << d2.Stderr();
  EXPECT_EQ(split.tokens, expected.tokens) << "the tokens of one rank";
  EXPECT_EQ(d2.Metric("strata_kv_imports_total"), 1);

  const Completion refused = Generate(d2.stub(), r, p1.address());
  ASSERT_TRUE(refused.status.ok()) << refused.status.error_message();
  EXPECT_EQ(refused.tokens, expected.tokens);
  EXPECT_THAT(d2.Stderr(), HasSubstr("remote prefill failed, computing the prompt here"));
  EXPECT_THAT(d2.Stderr(), HasSubstr("is not this prefill worker's"));
  EXPECT_EQ(p1.Metric("strata_kv_exports_total"), 0) << "refused before computing";

  // Behind a router, long prompts go to the prefill worker of the decode
  // worker's size, however idle the other is.
  ServerProcess router(
      {"--workers", p1.address(), "--workers", p2.address(), "--workers", d2.address(),
       "--prefill-threshold-tokens", "32", "--heartbeat-seconds", "0.2"},
      "router");
  for (int i = 0; i < 3; ++i) {
    const Completion routed = GenerateOnceReady(router.stub(), Request(200 + i, 8, 40 + i));
    ASSERT_TRUE(routed.status.ok()) << routed.status.error_message() << router.Stderr();
  }
  EXPECT_EQ(p1.Metric("strata_kv_exports_total"), 0);
  EXPECT_EQ(p2.Metric("strata_kv_exports_total"), 4);
  ExpectPoolsEmpty(p2, "p2");
  ExpectPoolsEmpty(d2, "d2");
}

// A prompt long enough that its prefill and transfer take a while on the
// tiny model.
constexpr int kLongPrompt = 1500;

TEST(DisaggregatedFailureTest, TwoOfEachGiveTheTokensOfServeForTheSameSeeds) {
  ServerProcess serve({"--max-seqs", "8"});
  ServerProcess p1(kPrefillArgs, "prefill"), p2(kPrefillArgs, "prefill");
  ServerProcess d1(kDecodeArgs, "decode"), d2(kDecodeArgs, "decode");
  ServerProcess router(
      {"--workers", p1.address(), "--workers", p2.address(), "--workers", d1.address(), "--workers",
       d2.address(), "--prefill-threshold-tokens", "32", "--heartbeat-seconds", "0.2"},
      "router");
  for (int i = 0; i < 8; ++i) {
    v1::GenerateRequest r = Request(i % 2 == 0 ? 200 + 40 * i : 12, 24, 100 + i);
    r.mutable_sampling()->set_temperature(0.8f);
    r.mutable_sampling()->set_seed(1000 + i);
    const Completion expected = Generate(serve.stub(), r);
    ASSERT_TRUE(expected.status.ok());
    const Completion routed = GenerateOnceReady(router.stub(), r);
    ASSERT_TRUE(routed.status.ok()) << routed.status.error_message();
    EXPECT_EQ(routed.tokens, expected.tokens) << "request " << i;
  }
  const double exports =
      p1.Metric("strata_kv_exports_total") + p2.Metric("strata_kv_exports_total");
  EXPECT_EQ(exports, 4) << "the four long prompts went through prefill workers";
  for (auto [w, name] : {std::pair{&p1, "p1"}, {&p2, "p2"}, {&d1, "d1"}, {&d2, "d2"}}) {
    ExpectPoolsEmpty(*w, name);
  }
}

TEST(DisaggregatedFailureTest, AKilledDecodeWorkerFailsItsStreamsWithinTwoSeconds) {
  ServerProcess d1(kDecodeArgs, "decode");
  auto d2 = std::make_unique<ServerProcess>(kDecodeArgs, "decode");
  ServerProcess router(
      {"--workers", d1.address(), "--workers", d2->address(), "--heartbeat-seconds", "0.2"},
      "router");
  ASSERT_TRUE(GenerateOnceReady(router.stub(), Request(10, 2, 1)).status.ok());
  // Let both workers be seen before the streams are spread over them.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  // Streams long enough to be mid-stream when the worker is killed (they
  // all have their first token by then), short enough that the survivors
  // finish well within the deadline on a loaded machine under the
  // sanitizers (2 streams of 1900 tokens took 30-60 s there).
  constexpr int kStreams = 4, kStreamTokens = 400;
  struct Stream {
    std::atomic<bool> started{false};
    grpc::Status status;
    std::chrono::steady_clock::time_point ended;
  };
  std::vector<Stream> streams(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      auto reader = router.stub().Generate(&ctx, Request(20, kStreamTokens, 50 + i));
      v1::GenerateResponse r;
      while (reader->Read(&r)) streams[i].started = true;
      streams[i].status = reader->Finish();
      streams[i].ended = std::chrono::steady_clock::now();
    });
  }
  for (auto& s : streams) {
    while (!s.started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto killed = std::chrono::steady_clock::now();
  d2.reset();  // SIGKILL mid-stream
  for (auto& t : threads) t.join();
  int failed = 0, completed = 0;
  for (const Stream& s : streams) {
    if (s.status.ok()) {
      ++completed;
      continue;
    }
    ++failed;
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE) << s.status.error_message();
    EXPECT_LT(s.ended - killed, std::chrono::seconds(2));
  }
  EXPECT_GT(failed, 0) << "some streams were on the killed worker";
  EXPECT_GT(completed, 0) << "the others complete";
  ExpectPoolsEmpty(d1, "d1");
}

TEST(DisaggregatedRoutingTest, TheFirstTokenReachesTheClientWhileThePromptsKvTravels) {
  // The prefill worker's last KV blocks leave 1.5 s late: its first token
  // must not wait for them.
  setenv("STRATA_FAULT_DELAY_FINAL_KV_MS", "1500", 1);
  ServerProcess prefill(kPrefillArgs, "prefill");
  unsetenv("STRATA_FAULT_DELAY_FINAL_KV_MS");
  ServerProcess decode(kDecodeArgs, "decode");
  const v1::GenerateRequest r = Request(kLongPrompt, 6, 21);
  const Completion expected = Generate(decode.stub(), r);
  ASSERT_TRUE(expected.status.ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  ctx.AddMetadata("strata-prefill-address", prefill.address());
  auto reader = decode.stub().Generate(&ctx, r);
  std::vector<int32_t> tokens;
  std::vector<std::chrono::steady_clock::time_point> arrived;
  v1::GenerateResponse out;
  while (reader->Read(&out)) {
    for (int32_t t : out.token_ids()) {
      tokens.push_back(t);
      arrived.push_back(std::chrono::steady_clock::now());
    }
  }
  const grpc::Status status = reader->Finish();
  ASSERT_TRUE(status.ok()) << status.error_message() << decode.Stderr();
  EXPECT_EQ(tokens, expected.tokens);
  ASSERT_GE(arrived.size(), 2u);
  EXPECT_GT(arrived[1] - arrived[0], std::chrono::milliseconds(1000))
      << "the first token came with the KV, not before it";
  EXPECT_EQ(decode.Metric("strata_kv_imports_total"), 1);
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");
}

// A stream through a prefill worker whose last KV blocks leave 1.5 s late
// (STRATA_FAULT_DELAY_FINAL_KV_MS): `at_first_token` runs once the client
// has the first token, while those blocks wait.
Completion GenerateWithLateKv(ServerProcess& decode, const std::string& prefill_address,
                              const v1::GenerateRequest& r,
                              const std::function<void(grpc::ClientContext&)>& at_first_token) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  ctx.AddMetadata("strata-prefill-address", prefill_address);
  auto reader = decode.stub().Generate(&ctx, r);
  Completion c;
  v1::GenerateResponse out;
  while (reader->Read(&out)) {
    const bool first = c.tokens.empty() && out.token_ids_size() > 0;
    c.tokens.insert(c.tokens.end(), out.token_ids().begin(), out.token_ids().end());
    if (first) at_first_token(ctx);
  }
  c.status = reader->Finish();
  return c;
}

TEST(DisaggregatedFailureTest, ACancelAfterTheFirstTokenWhileTheKvTravelsFreesBothWorkers) {
  setenv("STRATA_FAULT_DELAY_FINAL_KV_MS", "1500", 1);
  ServerProcess prefill(kPrefillArgs, "prefill");
  unsetenv("STRATA_FAULT_DELAY_FINAL_KV_MS");
  ServerProcess decode(kDecodeArgs, "decode");
  const Completion c = GenerateWithLateKv(decode, prefill.address(), Request(kLongPrompt, 8, 31),
                                          [](grpc::ClientContext& ctx) { ctx.TryCancel(); });
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(c.tokens.size(), 1u);
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");
  EXPECT_TRUE(Generate(decode.stub(), Request(60, 4, 1), prefill.address()).status.ok())
      << "both still serve";
}

TEST(DisaggregatedFailureTest, APrefillWorkerKilledAfterItsFirstTokenLeavesThePromptHere) {
  // The client has the first token; the prefill worker dies before its
  // last blocks leave. The decode worker computes the prompt and that token
  // itself, and the client gets the tokens of one worker.
  setenv("STRATA_FAULT_DELAY_FINAL_KV_MS", "1500", 1);
  auto prefill = std::make_unique<ServerProcess>(kPrefillArgs, "prefill");
  unsetenv("STRATA_FAULT_DELAY_FINAL_KV_MS");
  ServerProcess decode(kDecodeArgs, "decode");
  const v1::GenerateRequest r = Request(kLongPrompt, 8, 41);
  const Completion expected = Generate(decode.stub(), r);
  ASSERT_TRUE(expected.status.ok());
  // Connected once before (see the test below).
  ASSERT_TRUE(Generate(decode.stub(), Request(300, 2, 5), prefill->address()).status.ok());
  const Completion c = GenerateWithLateKv(decode, prefill->address(), r,
                                          [&](grpc::ClientContext&) { prefill.reset(); });
  ASSERT_TRUE(c.status.ok()) << c.status.error_message() << decode.Stderr();
  EXPECT_EQ(c.tokens, expected.tokens);
  EXPECT_EQ(decode.Metric("strata_prefill_fallbacks_total"), 1);
  ExpectPoolsEmpty(decode, "decode");
}

TEST(DisaggregatedFailureTest, APrefillWorkerKilledMidTransferLeavesNothingBehind) {
  auto prefill = std::make_unique<ServerProcess>(kPrefillArgs, "prefill");
  ServerProcess decode(kDecodeArgs, "decode");
  const v1::GenerateRequest r = Request(kLongPrompt, 8, 77);
  const Completion expected = Generate(decode.stub(), r);
  ASSERT_TRUE(expected.status.ok());
  // The two connect once, before: UCX 1.13 aborts a process whose peer
  // dies while their connection is being set up (an assertion in its
  // wireup), which this test is not about.
  ASSERT_TRUE(Generate(decode.stub(), Request(300, 2, 5), prefill->address()).status.ok());
  Completion split;
  std::thread client([&] { split = Generate(decode.stub(), r, prefill->address()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  prefill.reset();  // SIGKILL while it computes or sends
  client.join();
  // The decode worker computes the prompt itself: the same tokens.
  ASSERT_TRUE(split.status.ok()) << split.status.error_message() << decode.Stderr();
  EXPECT_EQ(split.tokens, expected.tokens);
  ExpectPoolsEmpty(decode, "decode");
}

TEST(DisaggregatedFailureTest, ACancelDuringATransferFreesBothWorkers) {
  ServerProcess prefill(kPrefillArgs, "prefill");
  ServerProcess decode(kDecodeArgs, "decode");
  for (int delay_ms : {5, 20, 60}) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("strata-prefill-address", prefill.address());
    auto reader = decode.stub().Generate(&ctx, Request(kLongPrompt, 200, delay_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ctx.TryCancel();
    v1::GenerateResponse out;
    while (reader->Read(&out)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");
  // Both still serve.
  EXPECT_TRUE(Generate(decode.stub(), Request(60, 4, 1), prefill.address()).status.ok());
}

TEST(DisaggregatedFailureTest, ABlockCorruptedOnTheWayFailsItsRequestWithAClearError) {
  setenv("STRATA_FAULT_CORRUPT_KV_BLOCKS", "3", 1);
  ServerProcess prefill(kPrefillArgs, "prefill");
  unsetenv("STRATA_FAULT_CORRUPT_KV_BLOCKS");
  ServerProcess decode(kDecodeArgs, "decode");
  const Completion c = Generate(decode.stub(), Request(100, 8, 4), prefill.address());
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(c.status.error_message(), HasSubstr("does not match its CRC32C"));
  EXPECT_TRUE(c.tokens.size() <= 1u) << "at most the first token, never a wrong one after it";
  EXPECT_EQ(decode.Metric("strata_kv_imports_failed_total"), 1);
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");
}

class DisaggregatedClusterKvTest : public ::testing::TestWithParam<int> {};

TEST_P(DisaggregatedClusterKvTest, AClusterKvPromptIsClusteredOnThePrefillWorker) {
  // The prefill worker runs the prompt's k-means and sends the clusterings
  // after the pages; the decode worker redoes them instead of clustering,
  // with the tokens of a worker that does everything itself. With tensor
  // parallelism, every rank clusters its KV heads and the decode worker's
  // rank of the same number takes them (the metrics are rank 0's).
  const std::string profile = WriteProfile(
      "disagg_clusterkv_profile.yaml",
      "name: sparse\nkv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, "
      "window_tokens: 16, tokens_per_cluster: 16, cluster_chunk_tokens: 96, full_layers: 1}\n");
  std::vector<std::string> prefill_args = WithProfile(kPrefillArgs, profile);
  std::vector<std::string> decode_args = WithProfile(kDecodeArgs, profile);
  for (auto* args : {&prefill_args, &decode_args}) {
    args->insert(args->end(), {"--tensor-parallel", std::to_string(GetParam())});
  }
  ServerProcess prefill(prefill_args, "prefill");
  ServerProcess decode(decode_args, "decode");
  v1::GenerateRequest r = Request(300, 12, 5);
  r.set_profile("sparse");
  const Completion here = Generate(decode.stub(), r);
  ASSERT_TRUE(here.status.ok()) << here.status.error_message();
  const double kmeans_here = decode.Metric("strata_kv_policy_clusterings_total");
  EXPECT_GT(kmeans_here, 0);
  const Completion split = Generate(decode.stub(), r, prefill.address());
  ASSERT_TRUE(split.status.ok()) << split.status.error_message() << decode.Stderr();
  EXPECT_EQ(split.tokens, here.tokens);
  const double exported = prefill.Metric("strata_kv_policy_clusterings_exported_total");
  EXPECT_GE(exported, 3) << "the prompt's chunks of 96 tokens";
  // Per chunk, one for each sparse layer.
  const double imported = decode.Metric("strata_kv_policy_clusterings_imported_total");
  EXPECT_GE(imported, exported);
  EXPECT_EQ(std::fmod(imported, exported), 0.0);
  EXPECT_EQ(decode.Metric("strata_kv_policy_clusterings_total"), kmeans_here)
      << "no k-means on the decode worker for the prompt it was sent";
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");
}

// With its clusters homed in the host tier, the decode worker takes the
// prompt's upper layers from the landing records straight into that tier
// (no GPU pages for them, no reorder, no offload), with the same tokens.
TEST(DisaggregatedClusterKvHostTierTest, AnImportedPromptGoesStraightIntoTheHostTier) {
  const std::string profile = WriteProfile(
      "disagg_clusterkv_host_profile.yaml",
      "name: sparse\nkv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, "
      "window_tokens: 16, tokens_per_cluster: 16, cluster_chunk_tokens: 96, full_layers: 1}\n"
      "tiers: {host_bytes: 64MiB}\n");
  ServerProcess prefill(WithProfile(kPrefillArgs, profile), "prefill");
  ServerProcess decode(WithProfile(kDecodeArgs, profile), "decode");
  v1::GenerateRequest r = Request(300, 12, 5);
  r.set_profile("sparse");
  const Completion here = Generate(decode.stub(), r);
  ASSERT_TRUE(here.status.ok()) << here.status.error_message();
  EXPECT_GT(decode.Metric("strata_kv_offloads_total"), 0) << "clusters in the host tier";
  const Completion split = Generate(decode.stub(), r, prefill.address());
  ASSERT_TRUE(split.status.ok()) << split.status.error_message() << decode.Stderr();
  EXPECT_EQ(split.tokens, here.tokens);
  EXPECT_EQ(decode.Metric("strata_kv_imports_admitted_total"), 1) << decode.Stderr();
  EXPECT_GT(decode.Metric("strata_kv_import_upper_pages_saved_total"), 0);
  ExpectPoolsEmpty(prefill, "prefill");
  ExpectPoolsEmpty(decode, "decode");

  // With the admission turned off the prompt goes through the GPU, to the
  // same tokens.
  std::vector<std::string> off_args = WithProfile(kDecodeArgs, profile);
  off_args.insert(off_args.end(), {"--kv-import-admission", "false"});
  ServerProcess off(off_args, "decode");
  const Completion through_gpu = Generate(off.stub(), r, prefill.address());
  ASSERT_TRUE(through_gpu.status.ok()) << through_gpu.status.error_message() << off.Stderr();
  EXPECT_EQ(through_gpu.tokens, here.tokens);
  EXPECT_EQ(off.Metric("strata_kv_imports_total"), 1);
  EXPECT_EQ(off.Metric("strata_kv_imports_admitted_total"), 0);
  ExpectPoolsEmpty(off, "decode");
}

INSTANTIATE_TEST_SUITE_P(Ranks, DisaggregatedClusterKvTest, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "tp" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace strata

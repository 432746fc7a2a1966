// Integration tests of `strata serve`: the server runs as its own process on
// a loopback port and is driven over real gRPC (and HTTP for /metrics):
// streaming, agreement with local `strata generate`, concurrency,
// cancellation and deadlines (KV freed, seen in the metrics), every
// invalid-argument case, queue full, the health service, and SIGTERM drain.
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
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "strata/v1/generate.grpc.pb.h"
#include "tests/router/server_process.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

using testing_util::ServerProcess;
const std::string& kModel = testing_util::kTinyModel;

v1::GenerateRequest TextRequest(const std::string& text, int max_tokens, float temperature = 0,
                                uint64_t seed = 0) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_seed(seed);
  r.mutable_stopping()->set_max_tokens(max_tokens);
  r.set_return_logprobs(true);
  return r;
}

struct Completion {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::string text;
  int responses = 0;
  v1::GenerateResponse last;
  grpc::Status status;
};

Completion Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                    std::chrono::milliseconds deadline = std::chrono::milliseconds(0)) {
  grpc::ClientContext ctx;
  if (deadline.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  Completion c;
  auto reader = stub.Generate(&ctx, request);
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    ++c.responses;
    c.tokens.insert(c.tokens.end(), r.token_ids().begin(), r.token_ids().end());
    c.logprobs.insert(c.logprobs.end(), r.logprobs().begin(), r.logprobs().end());
    c.text += r.text();
    c.last = r;
  }
  c.status = reader->Finish();
  return c;
}

class ServerTest : public testing_util::SharedServerTest<> {};

TEST_F(ServerTest, StreamsTokensWithUsageAndLogprobs) {
  // Long enough (~0.1 s on two CPU cores) that tokens arrive over many
  // responses even when the test machine is busy; a handler may coalesce
  // the tokens that are ready, so a short completion can come as one.
  v1::GenerateRequest r = TextRequest("Return the number of", 300);
  r.mutable_stopping()->set_ignore_eos(true);
  Completion c = Generate(server_->stub(), r);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_GT(c.responses, 1);  // streamed, not one message at the end
  EXPECT_FALSE(c.text.empty());
  EXPECT_NE(c.last.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(c.last.usage().completion_tokens(), c.tokens.size());
  EXPECT_EQ(c.last.usage().prompt_tokens(), 5u);
  EXPECT_GT(c.last.usage().time_to_first_token_seconds(), 0);
  EXPECT_FALSE(c.last.request_id().empty());
  // One logprob per token, each a log-probability.
  ASSERT_EQ(c.logprobs.size(), c.tokens.size());
  for (float lp : c.logprobs) {
    EXPECT_TRUE(std::isfinite(lp));
    EXPECT_LE(lp, 0.0f);
  }
  // Without return_logprobs, none.
  r.set_return_logprobs(false);
  r.mutable_stopping()->set_max_tokens(8);
  Completion plain = Generate(server_->stub(), r);
  ASSERT_TRUE(plain.status.ok());
  EXPECT_EQ(plain.tokens.size(), 8u);
  EXPECT_TRUE(plain.logprobs.empty());
}

TEST_F(ServerTest, MatchesLocalGenerateForTheSameSeed) {
  const std::string cmd =
      std::string(STRATA_BINARY) + " generate --model " + kModel +
      " --prompt 'Return the number of' --max-tokens 20 --temperature 0.8 --top-p 0.9" +
      " --seed 11 --json --threads 2";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::vector<int32_t> local;
  std::vector<float> local_logprobs;
  char line[4096];
  while (fgets(line, sizeof(line), p)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.contains("token_id")) {
      local.push_back(j["token_id"].get<int32_t>());
      local_logprobs.push_back(j["logprob"].get<float>());
    }
  }
  ASSERT_EQ(pclose(p), 0);
  v1::GenerateRequest r = TextRequest("Return the number of", 20, 0.8f, 11);
  r.mutable_sampling()->set_top_p(0.9f);
  Completion c = Generate(server_->stub(), r);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.tokens, local);
  // The same model on the same backend: the same log-probabilities.
  ASSERT_EQ(c.logprobs.size(), local_logprobs.size());
  for (size_t i = 0; i < local_logprobs.size(); ++i) {
    EXPECT_NEAR(c.logprobs[i], local_logprobs[i], 1e-4) << "token " << i;
  }
}

TEST_F(ServerTest, ConcurrentRequestsGetTheirOwnTokens) {
  const std::vector<std::string> prompts = {
      "Return the number of", "Create a new",   "The default is",   "Raise an exception if",
      "This module provides", "Return True if", "Set the value of", "Close the file"};
  std::vector<Completion> alone;
  for (const auto& p : prompts) alone.push_back(Generate(server_->stub(), TextRequest(p, 16)));
  std::vector<Completion> together(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back(
        [&, i] { together[i] = Generate(server_->stub(), TextRequest(prompts[i], 16)); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << prompts[i];
    EXPECT_EQ(together[i].text, alone[i].text) << prompts[i];
  }
}

TEST_F(ServerTest, CancellationMidStreamFreesKv) {
  const double cancelled_before =
      server_->Metric("strata_requests_total{finish_reason=\"cancelled\"}");
  v1::GenerateRequest r = TextRequest("Return the number of", 1800);
  r.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = server_->stub().Generate(&ctx, r);
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_GT(server_->Metric("strata_kv_cache_pages_used"), 0);
  ctx.TryCancel();
  while (reader->Read(&resp)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(server_->WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }),
            0);
  EXPECT_EQ(server_->WaitForMetric("strata_requests_total{finish_reason=\"cancelled\"}",
                                   [&](double v) { return v == cancelled_before + 1; }),
            cancelled_before + 1);
}

TEST_F(ServerTest, DeadlineExceededStopsTheSequence) {
  v1::GenerateRequest r = TextRequest("Return the number of", 1800);
  r.mutable_stopping()->set_ignore_eos(true);
  Completion c = Generate(server_->stub(), r, std::chrono::milliseconds(150));
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(server_->WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }),
            0);
  EXPECT_GE(server_->WaitForMetric("strata_requests_total{finish_reason=\"deadline_exceeded\"}",
                                   [](double v) { return v >= 1; }),
            1);
}

TEST_F(ServerTest, InvalidArgumentsNameTheField) {
  struct Case {
    std::function<void(v1::GenerateRequest&)> edit;
    std::string field;
  } cases[] = {
      {[](auto& r) { r.set_text(""); }, "text: the prompt is empty"},
      {[](auto& r) { r.clear_input(); }, "input: set text or token_ids"},
      {[](auto& r) { r.mutable_token_ids(); }, "token_ids: the prompt is empty"},
      {[](auto& r) { r.mutable_token_ids()->add_ids(999999); }, "token_ids: id 999999"},
      {[](auto& r) {
         std::string long_text;
         for (int i = 0; i < 1000; ++i) long_text += "Return the number of ";
         r.set_text(long_text);
       },
       "context length"},
      {[](auto& r) { r.mutable_stopping()->set_max_tokens(0); }, "stopping.max_tokens"},
      {[](auto& r) { r.mutable_stopping()->set_max_tokens(100000000); }, "stopping.max_tokens"},
      {[](auto& r) { r.mutable_sampling()->set_temperature(-1); }, "sampling.temperature"},
      {[](auto& r) { r.mutable_sampling()->set_top_p(0); }, "sampling.top_p"},
      {[](auto& r) { r.mutable_sampling()->set_top_p(1.5); }, "sampling.top_p"},
      {[](auto& r) { r.mutable_sampling()->set_top_k(-3); }, "sampling.top_k"},
      {[](auto& r) { r.set_profile("nope"); }, "profile: unknown profile \"nope\""},
      {[](auto& r) { r.mutable_stopping()->add_stop(""); }, "stopping.stop"},
      {[](auto& r) { r.mutable_stopping()->add_stop_token_ids(-1); }, "stopping.stop_token_ids"},
      {[](auto& r) { r.set_request_id(std::string(200, 'x')); }, "request_id"},
  };
  for (const auto& c : cases) {
    v1::GenerateRequest r = TextRequest("hello", 4);
    c.edit(r);
    Completion out = Generate(server_->stub(), r);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(out.status.error_message(), HasSubstr(c.field));
  }
  EXPECT_GE(server_->Metric("strata_requests_rejected_total{reason=\"invalid_argument\"}"), 15);
}

TEST_F(ServerTest, TokenizeAndModelInfo) {
  grpc::ClientContext ctx1, ctx2;
  v1::TokenizeRequest treq;
  treq.set_text("Return the number of");
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(server_->stub().Tokenize(&ctx1, treq, &tresp).ok());
  EXPECT_EQ(tresp.token_ids_size(), 5);
  EXPECT_EQ(tresp.token_ids(0), 0);  // bos
  v1::ModelInfoResponse info;
  ASSERT_TRUE(server_->stub().ModelInfo(&ctx2, v1::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), "tiny-llama");
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.context_length(), 2048u);
  EXPECT_EQ(info.vocab_size(), 2048u);
  EXPECT_THAT(info.profiles(), ::testing::Contains("default"));
}

TEST_F(ServerTest, HealthServiceAndMetricsEndpoint) {
  // grpc.health.v1.Health/Check with an empty request: SERVING.
  EXPECT_EQ(server_->HealthStatus(), 1);

  const std::string metrics = server_->Metrics();
  EXPECT_THAT(metrics, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  for (const char* name : {"strata_requests_total", "strata_time_to_first_token_seconds_bucket",
                           "strata_inter_token_latency_seconds_count", "strata_requests_waiting",
                           "strata_requests_running", "strata_kv_cache_usage_ratio",
                           "strata_router_overhead_seconds_sum"}) {
    EXPECT_THAT(metrics, HasSubstr(name));
  }
}

TEST(ServerAdmissionTest, QueueFullIsResourceExhausted) {
  ServerProcess server({"--max-in-flight", "2"});
  v1::GenerateRequest longr = TextRequest("Return the number of", 1800);
  longr.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext c1, c2;
  auto r1 = server.stub().Generate(&c1, longr);
  auto r2 = server.stub().Generate(&c2, longr);
  v1::GenerateResponse resp;
  ASSERT_TRUE(r1->Read(&resp));
  ASSERT_TRUE(r2->Read(&resp));
  Completion third = Generate(server.stub(), TextRequest("hello", 4));
  EXPECT_EQ(third.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(third.status.error_message(), HasSubstr("retry later"));
  c1.TryCancel();
  c2.TryCancel();
  while (r1->Read(&resp)) {
  }
  while (r2->Read(&resp)) {
  }
  r1->Finish();
  r2->Finish();
  // Room again once the server has seen them go.
  EXPECT_EQ(server.WaitForMetric("strata_requests_in_flight", [](double v) { return v == 0; }), 0);
  Completion again = Generate(server.stub(), TextRequest("hello", 4));
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();
}

TEST(ServerShutdownTest, SigtermDrainsInFlightRequestsAndExitsZero) {
  ServerProcess server;
  v1::GenerateRequest r = TextRequest("Return the number of", 300);
  r.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = server.stub().Generate(&ctx, r);
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  std::vector<int32_t> tokens(resp.token_ids().begin(), resp.token_ids().end());
  std::thread terminate([&] { EXPECT_EQ(server.Terminate(std::chrono::seconds(20)), 0); });
  v1::GenerateResponse last;
  while (reader->Read(&resp)) {
    tokens.insert(tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    last = resp;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens.size(), 300u);  // the in-flight request finished
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  terminate.join();
  // Nothing listens any more.
  Completion after =
      Generate(server.stub(), TextRequest("hello", 4), std::chrono::milliseconds(2000));
  EXPECT_FALSE(after.status.ok());
}

TEST(ServerShutdownTest, GracePeriodCancelsWhatDoesNotFinish) {
  ServerProcess server({"--grace-seconds", "0.3"});
  v1::GenerateRequest r = TextRequest("Return the number of", 1900);
  r.mutable_stopping()->set_ignore_eos(true);
  r.mutable_sampling()->set_temperature(0);
  grpc::ClientContext ctx;
  auto reader = server.stub().Generate(&ctx, r);
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  const auto start = Clock::now();
  EXPECT_EQ(server.Terminate(std::chrono::seconds(20)), 0);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  while (reader->Read(&resp)) {
  }
  EXPECT_FALSE(reader->Finish().ok());
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  FILE* f = fopen(path.c_str(), "w");
  fputs(text.c_str(), f);
  fclose(f);
  return path;
}

TEST(ServerProfileTest, RequestsMayNameALoadedProfile) {
  const std::string path = WriteTemp("chat_profile.yaml", "name: chat\nkv_policy: {type: full}\n");
  ServerProcess server({"--profile", path});
  grpc::ClientContext ctx;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(server.stub().ModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
  EXPECT_THAT(info.profiles(), ::testing::ElementsAre("default", "chat"));
  v1::GenerateRequest r = TextRequest("hello", 4);
  r.set_profile("chat");
  EXPECT_TRUE(Generate(server.stub(), r).status.ok());
}

TEST(ServerProfileTest, SparsePolicyProfilesServeTheirRequests) {
  // A ClusterKV profile small enough that a 300-token prompt is clustered
  // and decodes over sinks + 32 selected tokens + the tail; the default
  // profile stays dense in the same server.
  const std::string path =
      WriteTemp("sparse_profile.yaml",
                "name: sparse\nkv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, "
                "window_tokens: 16, tokens_per_cluster: 16, full_layers: 1}\n");
  ServerProcess server({"--profile", path});
  std::string prompt;
  for (int i = 0; i < 60; ++i) prompt += "Return the number of items in the list. ";
  v1::GenerateRequest r = TextRequest(prompt, 24);
  r.mutable_stopping()->set_ignore_eos(true);
  v1::GenerateRequest dense = r;
  r.set_profile("sparse");
  EXPECT_EQ(server.Metric("strata_kv_policy_sparse_queries_total"), 0);
  const auto sparse_result = Generate(server.stub(), r);
  ASSERT_TRUE(sparse_result.status.ok()) << sparse_result.status.error_message();
  EXPECT_EQ(sparse_result.tokens.size(), 24u);
  // It decoded sparsely: clustered once, then (query, layer) pairs over the
  // selection on the one sparse layer, none densely for want of a slot.
  const double sparse_queries = server.Metric("strata_kv_policy_sparse_queries_total");
  EXPECT_GE(sparse_queries, 23);
  EXPECT_GE(server.Metric("strata_kv_policy_clusterings_total"), 1);
  EXPECT_EQ(server.Metric("strata_kv_policy_dense_no_slot_total"), 0);
  // The default profile's request adds no sparse query.
  EXPECT_TRUE(Generate(server.stub(), dense).status.ok());
  EXPECT_EQ(server.Metric("strata_kv_policy_sparse_queries_total"), sparse_queries);
}

TEST(ServerProfileTest, BadProfileFailsStartupWithAClearError) {
  const std::string path =
      WriteTemp("bad_profile.yaml", "name: chat\nkv_policy: {type: full, budget: 3}\n");
  const std::string cmd = std::string(STRATA_BINARY) + " serve --model " + kModel +
                          " --port 0 --profile " + path + " 2>&1";
  const testing_util::CommandResult r = testing_util::RunCommand(cmd);
  EXPECT_NE(r.exit_status, 0);
  EXPECT_THAT(r.output, HasSubstr("kv_policy.budget: unknown key"));
  EXPECT_THAT(r.output, HasSubstr(path));
}

TEST(ServerProfileTest, GpuBudgetsSizeTheCacheAndConflictWithKvPages) {
  // A profile's tiers.gpu_bytes sizes the KV cache; a budget below one
  // context is refused with the numbers, and --kv-pages beside it is
  // ambiguous.
  const std::string tiny = WriteTemp("tiny_gpu.yaml", "name: tiny\ntiers: {gpu_bytes: 1KiB}\n");
  const std::string base =
      std::string(STRATA_BINARY) + " serve --model " + kModel + " --port 0 --profile ";
  testing_util::CommandResult r = testing_util::RunCommand(base + tiny + " 2>&1");
  EXPECT_NE(r.exit_status, 0);
  EXPECT_THAT(r.output, HasSubstr("1024 bytes of GPU KV cache hold"));
  EXPECT_THAT(r.output, HasSubstr("less than one context"));
  const std::string roomy = WriteTemp("roomy_gpu.yaml", "name: roomy\ntiers: {gpu_bytes: 64MiB}\n");
  r = testing_util::RunCommand(base + roomy + " --kv-pages 100 2>&1");
  EXPECT_NE(r.exit_status, 0);
  EXPECT_THAT(r.output, HasSubstr("--kv-pages and the profiles' tiers.gpu_bytes"));
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

// Four requests of ~230 tokens each: in a cache of 320 tokens the server
// must preempt some of them.
std::vector<v1::GenerateRequest> PreemptionLoad() {
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 4; ++i) {
    std::string prompt;
    for (int w = 0; w < 10 + 3 * i; ++w) prompt += "Return the number of items. ";
    v1::GenerateRequest r = TextRequest(prompt, 150);
    r.mutable_stopping()->set_ignore_eos(true);
    requests.push_back(r);
  }
  return requests;
}

// The requests sent at once, one client thread each.
std::vector<Completion> GenerateTogether(v1::Generation::Stub& stub,
                                         const std::vector<v1::GenerateRequest>& requests) {
  std::vector<Completion> together(requests.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < requests.size(); ++i) {
    clients.emplace_back([&, i] { together[i] = Generate(stub, requests[i]); });
  }
  for (auto& t : clients) t.join();
  return together;
}

TEST(ServerHostTierTest, PreemptedRequestsSwapToTheHostTierAndStreamUnchanged) {
  // A cache of 320 tokens for four requests of ~230 tokens each: the server
  // must preempt; with a profile's host tier the preempted sequences swap
  // out and back, and each stream equals the request served alone.
  const std::string path =
      WriteTemp("host_tier_profile.yaml", "name: roomy\ntiers: {host_bytes: 64MiB}\n");
  ServerProcess server({"--profile", path, "--max-context", "256", "--kv-pages", "20"});
  const std::vector<v1::GenerateRequest> requests = PreemptionLoad();
  std::vector<Completion> alone;
  for (const auto& r : requests) alone.push_back(Generate(server.stub(), r));
  EXPECT_EQ(server.Metric("strata_kv_swap_outs_total"), 0);
  const std::vector<Completion> together = GenerateTogether(server.stub(), requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
  }
  EXPECT_GT(server.Metric("strata_kv_swap_outs_total"), 0);
  EXPECT_EQ(server.Metric("strata_kv_swap_ins_total"), server.Metric("strata_kv_swap_outs_total"));
  EXPECT_GT(server.Metric("strata_kv_host_bytes_total"), 0);
  // Every page and host record is back.
  EXPECT_EQ(server.WaitForMetric("strata_kv_host_bytes_used", [](double v) { return v == 0; }), 0);
  EXPECT_EQ(server.WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }), 0);
  EXPECT_EQ(server.Metric("strata_kv_host_records_lost_total"), 0);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

TEST(ServerHostTierTest, TheTiersSizeTheCacheAndGrowTheSequenceLimits) {
  // A ClusterKV profile with a host tier: the GPU budget is divided into
  // two page groups, and the sequence limits grow from their defaults (64
  // per step, 8 sparse) to what the tiers hold; the startup log says so.
  const std::string profile = WriteTemp(
      "grow.yaml",
      "name: grow\ncodec: int4\ntiers: {gpu_bytes: 64MiB, host_bytes: 256MiB}\n"
      "kv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, window_tokens: 16, "
      "tokens_per_cluster: 16, full_layers: 1}\n");
  setenv("STRATA_LOG_LEVEL", "info", 1);
  ServerProcess server({"--profile", profile, "--max-context", "512"});
  unsetenv("STRATA_LOG_LEVEL");
  const std::string log = server.Stderr();
  const std::regex limits("up to ([0-9]+) sequences per step, ([0-9]+) sparse");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, limits)) << log;
  EXPECT_GT(std::stoi(m[1]), 64) << log;
  EXPECT_GT(std::stoi(m[2]), 8) << log;
  EXPECT_GT(server.Metric("strata_kv_upper_pages_total"), 0);
  // Given flags are kept.
  setenv("STRATA_LOG_LEVEL", "info", 1);
  ServerProcess fixed(
      {"--profile", profile, "--max-context", "512", "--max-seqs", "3", "--max-sparse-seqs", "2"});
  unsetenv("STRATA_LOG_LEVEL");
  EXPECT_THAT(fixed.Stderr(), HasSubstr("up to 3 sequences per step, 2 sparse"));
}

TEST(ServerHostTierTest, PausedRequestsGoDownToTheSsdTierAndStreamUnchanged) {
  // The preemption load above with a host tier of 16 pages of every layer
  // over an SSD tier: the preempted sequences fill the host tier past its
  // high-water mark, move down to RocksDB and come back, and each stream
  // equals the request served alone. Everything is deleted afterwards.
  const std::string dir = ::testing::TempDir() + "/strata_ssd_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  const std::string path = WriteTemp(
      "ssd_tier_profile.yaml",
      "name: roomy\ntiers: {host_bytes: 512KiB, ssd_path: " + dir + ", ssd_bytes: 256MiB}\n");
  {
    ServerProcess server({"--profile", path, "--max-context", "256", "--kv-pages", "20"});
    const std::vector<v1::GenerateRequest> requests = PreemptionLoad();
    std::vector<Completion> alone;
    for (const auto& r : requests) alone.push_back(Generate(server.stub(), r));
    // Which sequences are paused, and for how long, depends on how the
    // clients' requests interleave: rounds until one went down.
    for (int round = 0; round < 5 && server.Metric("strata_kv_ssd_swap_outs_total") == 0; ++round) {
      const std::vector<Completion> together = GenerateTogether(server.stub(), requests);
      for (size_t i = 0; i < requests.size(); ++i) {
        ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
        EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
      }
    }
    EXPECT_GT(server.Metric("strata_kv_ssd_swap_outs_total"), 0);
    EXPECT_EQ(server.Metric("strata_kv_ssd_swap_ins_total"),
              server.Metric("strata_kv_ssd_swap_outs_total"));
    EXPECT_GT(server.Metric("strata_kv_ssd_bytes_read_total"), 0);
    EXPECT_EQ(server.Metric("strata_kv_ssd_sequences_lost_total"), 0);
    EXPECT_EQ(server.Metric("strata_kv_ssd_bytes_total"), 256 << 20);
    EXPECT_EQ(server.WaitForMetric("strata_kv_ssd_bytes_used", [](double v) { return v == 0; }), 0);
    EXPECT_EQ(server.WaitForMetric("strata_kv_host_bytes_used", [](double v) { return v == 0; }),
              0);
  }
  std::filesystem::remove_all(dir);
}

// A question about a long document (the same 30 sentences every time),
// 16 tokens, for the profile "docs" of the prefix tests.
v1::GenerateRequest DocumentQuestion(const std::string& question) {
  std::string document;
  for (int i = 0; i < 30; ++i) document += "Return the number of items in the list. ";
  v1::GenerateRequest r = TextRequest(document + question, 16);
  r.mutable_stopping()->set_ignore_eos(true);
  r.set_profile("docs");
  return r;
}

TEST(ServerHostTierTest, RequestsThatStartWithAStoredPrefixLoadItAndSayHowMuch) {
  // A document asked about twice, then the next turn of the first
  // conversation: the later requests load the earlier KV instead of
  // computing it, stream the tokens of a server without the store, and
  // Usage says how many prompt tokens were loaded.
  const std::string path = WriteTemp(
      "prefix_profile.yaml", "name: docs\ntiers: {host_bytes: 64MiB, prefix_bytes: 32MiB}\n");
  ServerProcess server({"--profile", path});
  ServerProcess plain;
  v1::GenerateRequest first = DocumentQuestion("How many?");
  v1::GenerateRequest again = DocumentQuestion("And how many now?");
  const Completion a = Generate(server.stub(), first);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.last.usage().cached_prompt_tokens(), 0u);
  const Completion b = Generate(server.stub(), again);
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_GT(b.last.usage().cached_prompt_tokens(), 200u) << "most of the document";
  EXPECT_LT(b.last.usage().cached_prompt_tokens(), b.last.usage().prompt_tokens());
  again.clear_profile();
  EXPECT_EQ(b.tokens, Generate(plain.stub(), again).tokens);
  EXPECT_EQ(server.Metric("strata_kv_prefix_hits_total"), 1);
  EXPECT_EQ(server.Metric("strata_kv_prefix_tokens_loaded_total"),
            b.last.usage().cached_prompt_tokens());
  EXPECT_GT(server.Metric("strata_kv_prefix_bytes_used"), 0);
  EXPECT_EQ(server.WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; }), 0);
}

TEST(ServerHostTierTest, StoredPrefixesOnTheSsdSurviveAKilledWorker) {
  // A document's KV is stored and written through to the SSD tier; the
  // server is killed (SIGKILL, nothing flushed at exit) and started again
  // on the same directory: it indexes the pages its predecessor wrote, the
  // document asked again comes up from the SSD, and the tokens are those
  // of a server without any store.
  const std::string dir = ::testing::TempDir() + "/strata_ssd_prefix_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  const std::string path = WriteTemp(
      "ssd_prefix_profile.yaml",
      "name: docs\ntiers: {host_bytes: 64MiB, prefix_bytes: 32MiB, ssd_path: " + dir +
          ", ssd_bytes: 256MiB, ssd_prefix_bytes: 128MiB, ssd_write_admission: always}\n");
  v1::GenerateRequest first = DocumentQuestion("How many?");
  v1::GenerateRequest again = DocumentQuestion("And how many now?");
  double written = 0;
  {
    ServerProcess server({"--profile", path});
    const Completion a = Generate(server.stub(), first);
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    // The pages are stored twice (the prompt's after its prefill, the last
    // one with generated tokens when the request ends) and each store is
    // written down on the I/O threads: wait for the request to end, then
    // for every page it stored to be on the SSD, before the kill.
    server.WaitForMetric("strata_kv_cache_pages_used", [](double v) { return v == 0; });
    const double stored = server.Metric("strata_kv_prefix_pages_stored_total");
    ASSERT_GT(stored, 0);
    written = server.WaitForMetric("strata_kv_ssd_prefix_pages_written_total",
                                   [&](double v) { return v == stored; });
    ASSERT_EQ(written, stored);
    server.Signal(SIGKILL);
    server.Wait(std::chrono::seconds(10));
  }
  ServerProcess restarted({"--profile", path});
  EXPECT_EQ(restarted.Metric("strata_kv_ssd_prefix_pages"), written);
  const Completion b = Generate(restarted.stub(), again);
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_GT(b.last.usage().cached_prompt_tokens(), 200u) << "most of the document, from the SSD";
  EXPECT_GT(restarted.Metric("strata_kv_ssd_prefix_pages_read_total"), 0);
  EXPECT_EQ(restarted.Metric("strata_kv_ssd_prefix_pages_lost_total"), 0);
  ServerProcess plain;
  again.clear_profile();
  EXPECT_EQ(b.tokens, Generate(plain.stub(), again).tokens);
  std::filesystem::remove_all(dir);
}

TEST(ServerHostTierTest, ClusterKvProfilesWithAHostTierRecallTheirClustersFromIt) {
  // The same ClusterKV policy with and without a host tier in one server:
  // the same tokens, the host one's clusters moved there and recalled, and
  // every host byte and GPU page back when the request ends.
  const std::string policy =
      "kv_policy: {type: clusterkv, budget_tokens: 32, sink_tokens: 4, window_tokens: 16, "
      "tokens_per_cluster: 16, full_layers: 1}\n";
  const std::string gpu = WriteTemp("tier_gpu.yaml", "name: gpu\n" + policy);
  const std::string host =
      WriteTemp("tier_host.yaml", "name: host\ncodec: bf16\ntiers: {host_bytes: 32MiB}\n" + policy);
  ServerProcess server({"--profile", gpu, "--profile", host});
  std::string prompt;
  for (int i = 0; i < 60; ++i) prompt += "Return the number of items in the list. ";
  v1::GenerateRequest r = TextRequest(prompt, 24);
  r.mutable_stopping()->set_ignore_eos(true);
  r.set_profile("gpu");
  const Completion on_gpu = Generate(server.stub(), r);
  ASSERT_TRUE(on_gpu.status.ok()) << on_gpu.status.error_message();
  EXPECT_EQ(server.Metric("strata_kv_offloads_total"), 0);
  r.set_profile("host");
  const Completion on_host = Generate(server.stub(), r);
  ASSERT_TRUE(on_host.status.ok()) << on_host.status.error_message();
  EXPECT_EQ(on_host.tokens, on_gpu.tokens);
  EXPECT_GT(server.Metric("strata_kv_offloads_total"), 0);
  EXPECT_GT(server.Metric("strata_kv_recall_tokens_total{result=\"recalled\"}"), 0);
  EXPECT_GT(server.Metric("strata_kv_recall_bytes_total"), 0);
  EXPECT_EQ(server.Metric("strata_kv_recall_bad_pieces_total"), 0);
  EXPECT_GT(server.Metric("strata_kv_recall_steps_total"), 0);
  EXPECT_GT(server.Metric("strata_kv_recall_seconds_total"), 0);
  EXPECT_EQ(server.WaitForMetric("strata_kv_host_bytes_used", [](double v) { return v == 0; }), 0);
  // The host profile's sparse layers got a page group of their own, whose
  // pages of clusters in the host tier were freed, and every page is back.
  EXPECT_GT(server.Metric("strata_kv_upper_pages_total"), 0);
  EXPECT_GT(server.Metric("strata_kv_upper_pages_released_total"), 0);
  EXPECT_EQ(server.WaitForMetric("strata_kv_upper_pages_used", [](double v) { return v == 0; }), 0);
  EXPECT_EQ(server.Metric("strata_kv_cache_pages_used"), 0);
}

}  // namespace
}  // namespace strata

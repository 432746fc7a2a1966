// WorkerPoolMetrics: the router's worker pools on /metrics, from a
// WorkerRegistry on a fake clock.
#include "router/worker_pool_metrics.h"

#include <string>
#include <tuple>

#include "common/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/router/worker_test_util.h"

namespace strata::router {
namespace {

using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;
using ::testing::HasSubstr;

WorkerInfo Info(const std::string& id, internal::v1::WorkerRole role, const std::string& address) {
  return testing_util::TestWorkerInfo(id, role, address);
}

TEST(WorkerPoolMetricsTest, PoolsAreSummedOverSchedulableWorkersAndCountedByState) {
  absl::Time now = absl::FromUnixSeconds(1000);
  WorkerRegistry registry({.model = "tiny",
                           .kv_format = "bf16",
                           .expiry = absl::Seconds(2),
                           .drop_after_expiries = 2,
                           .clock = [&] { return now; }});
  prometheus::Registry prometheus;
  auto metrics = WorkerPoolMetrics::Create(&prometheus);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  using internal::v1::WORKER_ROLE_DECODE;
  using internal::v1::WORKER_ROLE_PREFILL;
  WorkerLoad prefill;
  prefill.set_queued_prefill_tokens(300);
  WorkerLoad decode;
  decode.set_running_sequences(3);
  decode.set_waiting_sequences(1);
  decode.set_gpu_kv_total_bytes(1000);
  decode.set_gpu_kv_free_bytes(400);
  decode.set_host_kv_total_bytes(5000);
  decode.set_host_kv_free_bytes(2500);
  decode.set_prefix_capacity_tokens(4096);
  WorkerLoad draining = decode;
  draining.set_draining(true);
  ASSERT_TRUE(registry
                  .Update(Info("old", WORKER_ROLE_DECODE, "h:3"), decode,
                          WorkerRegistry::Source::kHeartbeat)
                  .ok());
  now += absl::Seconds(3);  // "old" expires
  for (const auto& [id, role, address, load] :
       {std::tuple{"p1", WORKER_ROLE_PREFILL, "h:1", prefill},
        std::tuple{"d1", WORKER_ROLE_DECODE, "h:2", decode},
        std::tuple{"d2", WORKER_ROLE_DECODE, "h:4", decode},
        std::tuple{"d3", WORKER_ROLE_DECODE, "h:5", draining}}) {
    ASSERT_TRUE(
        registry.Update(Info(id, role, address), load, WorkerRegistry::Source::kHeartbeat).ok());
  }
  registry.NoteAssigned("p1", 200);
  registry.NoteAssigned("d1", 100, 10);
  (*metrics)->Update(registry);
  std::string text = metrics::RenderText(prometheus);
  EXPECT_THAT(text, HasSubstr("strata_router_workers{role=\"decode\",state=\"schedulable\"} 2"));
  EXPECT_THAT(text, HasSubstr("strata_router_workers{role=\"decode\",state=\"draining\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_router_workers{role=\"decode\",state=\"expired\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_router_workers{role=\"prefill\",state=\"schedulable\"} 1"));
  EXPECT_THAT(text, HasSubstr("strata_router_pool_queued_prefill_tokens{role=\"prefill\"} 500"));
  // d1 and d2 (the draining and the expired ones are not schedulable), and
  // the sequence sent to d1 since its report.
  EXPECT_THAT(text, HasSubstr("strata_router_pool_running_sequences{role=\"decode\"} 7"));
  EXPECT_THAT(text, HasSubstr("strata_router_pool_waiting_sequences{role=\"decode\"} 2"));
  EXPECT_THAT(text,
              HasSubstr("strata_router_pool_kv_free_bytes{role=\"decode\",tier=\"gpu\"} 800"));
  EXPECT_THAT(text,
              HasSubstr("strata_router_pool_kv_total_bytes{role=\"decode\",tier=\"host\"} 10000"));
  EXPECT_THAT(text, HasSubstr("strata_router_pool_kv_free_bytes{role=\"decode\",tier=\"ssd\"} 0"));
  EXPECT_THAT(text, HasSubstr("strata_router_pool_prefix_capacity_tokens{role=\"decode\"} 8192"));
  // A restart at d2's address, and "old" forgotten after two expiries.
  ASSERT_TRUE(registry
                  .Update(Info("d2b", WORKER_ROLE_DECODE, "h:4"), decode,
                          WorkerRegistry::Source::kHeartbeat)
                  .ok());
  now += absl::Seconds(2);
  for (const auto& [id, role, address, load] :
       {std::tuple{"p1", WORKER_ROLE_PREFILL, "h:1", prefill},
        std::tuple{"d1", WORKER_ROLE_DECODE, "h:2", decode},
        std::tuple{"d2b", WORKER_ROLE_DECODE, "h:4", decode},
        std::tuple{"d3", WORKER_ROLE_DECODE, "h:5", draining}}) {
    ASSERT_TRUE(
        registry.Update(Info(id, role, address), load, WorkerRegistry::Source::kHeartbeat).ok());
  }
  (*metrics)->Update(registry);
  (*metrics)->Update(registry);  // counters do not count twice
  text = metrics::RenderText(prometheus);
  EXPECT_THAT(text, HasSubstr("strata_router_workers_replaced_total 1"));
  EXPECT_THAT(text, HasSubstr("strata_router_workers_dropped_total 1"));
  EXPECT_THAT(text, HasSubstr("strata_router_workers{role=\"decode\",state=\"expired\"} 0"));
}

}  // namespace
}  // namespace strata::router

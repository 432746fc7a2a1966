// WorkerPoolMetrics: the `strata router` process's view of its worker pools
// on /metrics, read from the WorkerRegistry before each scrape, so that an
// operator sees what the router schedules on (what Dynamo's and llm-d's
// dashboards show per pool):
//
//   strata_router_workers{role, state}             workers known, by role
//                                                  (prefill, decode) and
//                                                  state (schedulable,
//                                                  draining, expired)
//   strata_router_pool_queued_prefill_tokens{role} over the schedulable
//                                                  workers: reported plus
//                                                  sent since their report
//   strata_router_pool_running_sequences{role}     ... likewise
//   strata_router_pool_waiting_sequences{role}
//   strata_router_pool_kv_free_bytes{role, tier}   ... as reported (tier:
//   strata_router_pool_kv_total_bytes{role, tier}  gpu, host, ssd)
//   strata_router_pool_prefix_capacity_tokens{role}
//   strata_router_workers_dropped_total            forgotten for silence
//   strata_router_workers_replaced_total           restarted at an address
//
// Thread-safety: Update may run on several scrape threads at once; a mutex
// orders them.
#ifndef STRATA_ROUTER_WORKER_POOL_METRICS_H_
#define STRATA_ROUTER_WORKER_POOL_METRICS_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "router/worker_registry.h"

namespace strata::router {

class WorkerPoolMetrics {
 public:
  // Registers the families in `registry`, which must outlive this object.
  static absl::StatusOr<std::unique_ptr<WorkerPoolMetrics>> Create(prometheus::Registry* registry);

  // Sets the gauges from the registry's workers now.
  void Update(const WorkerRegistry& registry);

 private:
  WorkerPoolMetrics() = default;

  static constexpr int kRoles = 2;   // prefill, decode
  static constexpr int kStates = 3;  // schedulable, draining, expired
  static constexpr int kTiers = 3;   // gpu, host, ssd
  std::array<std::array<prometheus::Gauge*, kStates>, kRoles> workers_{};
  std::array<prometheus::Gauge*, kRoles> queued_{}, running_{}, waiting_{}, prefix_capacity_{};
  std::array<std::array<prometheus::Gauge*, kTiers>, kRoles> kv_free_{}, kv_total_{};
  prometheus::Counter* dropped_ = nullptr;
  prometheus::Counter* replaced_ = nullptr;
  std::mutex mu_;
  int64_t dropped_seen_ = 0, replaced_seen_ = 0;
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_WORKER_POOL_METRICS_H_

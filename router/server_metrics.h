// ServerMetrics: the strata_* metrics a server exposes on /metrics, kept in
// one place so names, help texts and labels stay consistent.
//
//   strata_requests_total{finish_reason}        requests finished, by reason
//   strata_requests_rejected_total{reason}      requests refused at admission
//   strata_time_to_first_token_seconds          histogram
//   strata_inter_token_latency_seconds          histogram
//   strata_router_overhead_seconds              request arrival to hand-off to
//                                               the engine (validation,
//                                               tokenization, admission)
//   strata_requests_in_flight                   admitted and not finished
//   strata_requests_waiting / _running          in the engine's queue / batch
//   strata_kv_cache_pages_used / _total, strata_kv_cache_usage_ratio
//
// Thread-safety: thread-safe (the metrics are atomics).
#ifndef STRATA_ROUTER_SERVER_METRICS_H_
#define STRATA_ROUTER_SERVER_METRICS_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "engine/async_engine.h"

namespace strata::router {

class ServerMetrics {
 public:
  using Duration = std::chrono::steady_clock::duration;

  // Registers the families in `registry`, which must outlive this object.
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(metrics::Registry* registry);

  void OnRejected(const std::string& reason);
  void OnAdmitted(Duration router_overhead);
  void OnFinished(const std::string& finish_reason);
  void ObserveTimeToFirstToken(Duration d);
  void ObserveInterTokenLatency(Duration d);
  // Refreshes the gauges (called before each scrape).
  void UpdateGauges(const engine::AsyncEngine::Stats& stats, int requests_in_flight);

 private:
  ServerMetrics() = default;

  metrics::CounterFamily* finished_ = nullptr;
  metrics::CounterFamily* rejected_ = nullptr;
  metrics::Histogram* ttft_ = nullptr;
  metrics::Histogram* itl_ = nullptr;
  metrics::Histogram* overhead_ = nullptr;
  metrics::Gauge* in_flight_ = nullptr;
  metrics::Gauge* waiting_ = nullptr;
  metrics::Gauge* running_ = nullptr;
  metrics::Gauge* pages_used_ = nullptr;
  metrics::Gauge* pages_total_ = nullptr;
  metrics::Gauge* usage_ = nullptr;
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_SERVER_METRICS_H_

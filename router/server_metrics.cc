#include "router/server_metrics.h"

#include "common/logging.h"
#include "common/status_macros.h"

namespace strata::router {
namespace {

double Seconds(ServerMetrics::Duration d) { return std::chrono::duration<double>(d).count(); }

template <typename T>
T* Child(metrics::Family<T>* family, const std::string& label) {
  auto child = family->WithLabels({label});
  if (!child.ok()) {
    STRATA_LOG_WARN("metric {}: {}", family->name(), child.status().ToString());
    return nullptr;
  }
  return *child;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(metrics::Registry* r) {
  std::unique_ptr<ServerMetrics> m(new ServerMetrics());
  STRATA_ASSIGN_OR_RETURN(m->finished_, r->RegisterCounter("strata_requests_total",
                                                           "Generate requests finished, by finish reason.",
                                                           {"finish_reason"}));
  STRATA_ASSIGN_OR_RETURN(m->rejected_, r->RegisterCounter("strata_requests_rejected_total",
                                                           "Generate requests refused before admission, by reason.",
                                                           {"reason"}));
  // Children that exist from the start render as 0 before the first event.
  for (const char* reason : {"stop", "length", "cancelled", "deadline_exceeded", "error"}) {
    Child(m->finished_, reason);
  }
  for (const char* reason : {"invalid_argument", "queue_full", "unavailable"}) Child(m->rejected_, reason);

  STRATA_ASSIGN_OR_RETURN(std::vector<double> latency, metrics::ExponentialBuckets(0.0005, 2.0, 18));
  STRATA_ASSIGN_OR_RETURN(auto* ttft, r->RegisterHistogram("strata_time_to_first_token_seconds",
                                                           "From request arrival to its first generated token.",
                                                           {}, latency));
  STRATA_ASSIGN_OR_RETURN(auto* itl, r->RegisterHistogram("strata_inter_token_latency_seconds",
                                                          "Between consecutive generated tokens of a request.",
                                                          {}, latency));
  STRATA_ASSIGN_OR_RETURN(std::vector<double> fine, metrics::ExponentialBuckets(0.00001, 2.0, 16));
  STRATA_ASSIGN_OR_RETURN(auto* overhead,
                          r->RegisterHistogram("strata_router_overhead_seconds",
                                               "From request arrival to its hand-off to the engine "
                                               "(validation, tokenization, admission).",
                                               {}, fine));
  STRATA_ASSIGN_OR_RETURN(m->ttft_, ttft->WithLabels({}));
  STRATA_ASSIGN_OR_RETURN(m->itl_, itl->WithLabels({}));
  STRATA_ASSIGN_OR_RETURN(m->overhead_, overhead->WithLabels({}));

  auto gauge = [&](const char* name, const char* help) -> absl::StatusOr<metrics::Gauge*> {
    STRATA_ASSIGN_OR_RETURN(auto* family, r->RegisterGauge(name, help));
    return family->WithLabels({});
  };
  STRATA_ASSIGN_OR_RETURN(m->in_flight_, gauge("strata_requests_in_flight", "Generate requests admitted and not finished."));
  STRATA_ASSIGN_OR_RETURN(m->waiting_, gauge("strata_requests_waiting", "Sequences queued for prefill in the engine."));
  STRATA_ASSIGN_OR_RETURN(m->running_, gauge("strata_requests_running", "Sequences in the running decode batch."));
  STRATA_ASSIGN_OR_RETURN(m->pages_used_, gauge("strata_kv_cache_pages_used", "KV cache pages held by sequences."));
  STRATA_ASSIGN_OR_RETURN(m->pages_total_, gauge("strata_kv_cache_pages_total", "KV cache pages in the cache."));
  STRATA_ASSIGN_OR_RETURN(m->usage_, gauge("strata_kv_cache_usage_ratio", "Fraction of KV cache pages in use."));
  return m;
}

void ServerMetrics::OnRejected(const std::string& reason) {
  if (auto* c = Child(rejected_, reason)) c->Increment();
}
void ServerMetrics::OnAdmitted(Duration d) { overhead_->Observe(Seconds(d)); }
void ServerMetrics::OnFinished(const std::string& reason) {
  if (auto* c = Child(finished_, reason)) c->Increment();
}
void ServerMetrics::ObserveTimeToFirstToken(Duration d) { ttft_->Observe(Seconds(d)); }
void ServerMetrics::ObserveInterTokenLatency(Duration d) { itl_->Observe(Seconds(d)); }

void ServerMetrics::UpdateGauges(const engine::AsyncEngine::Stats& s, int requests_in_flight) {
  in_flight_->Set(requests_in_flight);
  waiting_->Set(s.waiting);
  running_->Set(s.running);
  const int used = s.total_pages - s.free_pages;
  pages_used_->Set(used);
  pages_total_->Set(s.total_pages);
  usage_->Set(s.total_pages > 0 ? static_cast<double>(used) / s.total_pages : 0.0);
}

}  // namespace strata::router

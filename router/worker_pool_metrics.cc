#include "router/worker_pool_metrics.h"

#include <exception>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/metrics.h"
#include "common/status_macros.h"

namespace strata::router {
namespace {

constexpr const char* kRoleNames[] = {"prefill", "decode"};
constexpr const char* kStateNames[] = {"schedulable", "draining", "expired"};
constexpr const char* kTierNames[] = {"gpu", "host", "ssd"};

// The index of a worker's role in kRoleNames; -1 for an unknown role.
int RoleIndex(internal::v1::WorkerRole role) {
  switch (role) {
    case internal::v1::WORKER_ROLE_PREFILL:
      return 0;
    case internal::v1::WORKER_ROLE_DECODE:
      return 1;
    default:
      return -1;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerPoolMetrics>> WorkerPoolMetrics::Create(
    prometheus::Registry* registry) {
  std::unique_ptr<WorkerPoolMetrics> m(new WorkerPoolMetrics());
  std::string name;
  try {
    name = "strata_router_workers";
    auto& workers = prometheus::BuildGauge()
                        .Name(name)
                        .Help("Workers the router knows, by role and state.")
                        .Register(*registry);
    auto gauge = [&](const std::string& family_name, const std::string& help) -> auto& {
      name = family_name;
      return prometheus::BuildGauge().Name(family_name).Help(help).Register(*registry);
    };
    auto& queued = gauge("strata_router_pool_queued_prefill_tokens",
                         "Prompt tokens queued on the schedulable workers of a role (reported "
                         "plus sent since).");
    auto& running = gauge("strata_router_pool_running_sequences",
                          "Sequences running on the schedulable workers of a role (reported plus "
                          "sent since).");
    auto& waiting = gauge("strata_router_pool_waiting_sequences",
                          "Sequences waiting on the schedulable workers of a role.");
    auto& prefix = gauge("strata_router_pool_prefix_capacity_tokens",
                         "Prompt tokens the schedulable workers of a role can keep as prefixes.");
    auto& kv_free = gauge("strata_router_pool_kv_free_bytes",
                          "KV bytes free on the schedulable workers of a role, by tier.");
    auto& kv_total = gauge("strata_router_pool_kv_total_bytes",
                           "KV bytes on the schedulable workers of a role, by tier.");
    for (int r = 0; r < kRoles; ++r) {
      for (int s = 0; s < kStates; ++s) {
        m->workers_[r][s] = &workers.Add({{"role", kRoleNames[r]}, {"state", kStateNames[s]}});
      }
      m->queued_[r] = &queued.Add({{"role", kRoleNames[r]}});
      m->running_[r] = &running.Add({{"role", kRoleNames[r]}});
      m->waiting_[r] = &waiting.Add({{"role", kRoleNames[r]}});
      m->prefix_capacity_[r] = &prefix.Add({{"role", kRoleNames[r]}});
      for (int t = 0; t < kTiers; ++t) {
        m->kv_free_[r][t] = &kv_free.Add({{"role", kRoleNames[r]}, {"tier", kTierNames[t]}});
        m->kv_total_[r][t] = &kv_total.Add({{"role", kRoleNames[r]}, {"tier", kTierNames[t]}});
      }
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("metric ", name, ": ", e.what()));
  }
  STRATA_ASSIGN_OR_RETURN(
      m->dropped_,
      metrics::AddCounter(registry, "strata_router_workers_dropped_total",
                          "Workers forgotten after not being heard from for many expiries."));
  STRATA_ASSIGN_OR_RETURN(
      m->replaced_,
      metrics::AddCounter(registry, "strata_router_workers_replaced_total",
                          "Workers replaced by a new worker id at their address (a restart)."));
  return m;
}

void WorkerPoolMetrics::Update(const WorkerRegistry& registry) {
  std::array<std::array<int, kStates>, kRoles> workers{};
  std::array<double, kRoles> queued{}, running{}, waiting{}, prefix{};
  std::array<std::array<double, kTiers>, kRoles> kv_free{}, kv_total{};
  for (const WorkerRegistry::WorkerState& w : registry.Snapshot()) {
    const int r = RoleIndex(w.role);
    if (r < 0) continue;
    const int s = !w.live ? 2 : w.schedulable ? 0 : 1;
    ++workers[r][s];
    if (!w.schedulable) continue;
    const internal::v1::WorkerLoad& l = w.load;
    queued[r] += static_cast<double>(l.queued_prefill_tokens() + w.pending_prefill_tokens);
    running[r] += static_cast<double>(l.running_sequences() + w.pending_sequences);
    waiting[r] += static_cast<double>(l.waiting_sequences());
    prefix[r] += static_cast<double>(l.prefix_capacity_tokens());
    const int64_t free_bytes[kTiers] = {l.gpu_kv_free_bytes(), l.host_kv_free_bytes(),
                                        l.ssd_kv_free_bytes()};
    const int64_t total_bytes[kTiers] = {l.gpu_kv_total_bytes(), l.host_kv_total_bytes(),
                                         l.ssd_kv_total_bytes()};
    for (int t = 0; t < kTiers; ++t) {
      kv_free[r][t] += static_cast<double>(free_bytes[t]);
      kv_total[r][t] += static_cast<double>(total_bytes[t]);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (int r = 0; r < kRoles; ++r) {
    for (int s = 0; s < kStates; ++s) workers_[r][s]->Set(workers[r][s]);
    queued_[r]->Set(queued[r]);
    running_[r]->Set(running[r]);
    waiting_[r]->Set(waiting[r]);
    prefix_capacity_[r]->Set(prefix[r]);
    for (int t = 0; t < kTiers; ++t) {
      kv_free_[r][t]->Set(kv_free[r][t]);
      kv_total_[r][t]->Set(kv_total[r][t]);
    }
  }
  const int64_t dropped = registry.dropped_workers(), replaced = registry.replaced_workers();
  if (dropped > dropped_seen_) dropped_->Increment(static_cast<double>(dropped - dropped_seen_));
  if (replaced > replaced_seen_) {
    replaced_->Increment(static_cast<double>(replaced - replaced_seen_));
  }
  dropped_seen_ = std::max(dropped_seen_, dropped);
  replaced_seen_ = std::max(replaced_seen_, replaced);
}

}  // namespace strata::router

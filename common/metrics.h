// Prometheus metrics for strata: a thin layer over prometheus-cpp (Debian's
// prometheus-cpp-dev). Metrics live in a prometheus::Registry; the helpers
// here register them without letting prometheus-cpp's exceptions (it throws
// std::invalid_argument for a bad name or unsorted buckets) cross into
// strata, and bound the label values a caller can create.
//
//   prometheus::Registry registry;
//   STRATA_ASSIGN_OR_RETURN(prometheus::Gauge* waiting,
//                           metrics::AddGauge(&registry, "strata_requests_waiting", "..."));
//   waiting->Set(3);               // hot path: cache the pointer, no lookup
//   std::string text = metrics::RenderText(registry);   // what GET /metrics serves
//
// Families and their children are never removed here, so the pointers handed
// out stay valid for the registry's lifetime. prometheus-cpp's counters and
// gauges are atomics and its histograms take a short mutex per Observe, so
// updates may come from any thread while a scrape collects.
#ifndef STRATA_COMMON_METRICS_H_
#define STRATA_COMMON_METRICS_H_

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"

namespace strata::metrics {

// The HTTP Content-Type of RenderText()'s output: the text exposition format.
inline constexpr char kTextContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// Registers a gauge family without labels and returns its single child.
// InvalidArgument for a bad name, or a name registered with another type.
// Registering the same name twice returns the same gauge.
absl::StatusOr<prometheus::Gauge*> AddGauge(prometheus::Registry* registry, const std::string& name,
                                            const std::string& help);

// Registers a counter family without labels and returns its single child.
// InvalidArgument as AddGauge.
absl::StatusOr<prometheus::Counter*> AddCounter(prometheus::Registry* registry,
                                                const std::string& name, const std::string& help);

// Registers a histogram family without labels and returns its single child.
// `bucket_bounds` are the buckets' inclusive upper bounds, finite and
// strictly increasing (the +Inf bucket is implicit). InvalidArgument for a bad name or
// bounds.
absl::StatusOr<prometheus::Histogram*> AddHistogram(prometheus::Registry* registry,
                                                    const std::string& name,
                                                    const std::string& help,
                                                    const std::vector<double>& bucket_bounds);

// A counter family with one label whose values come from a fixed set, e.g.
// strata_requests_total{finish_reason}. Every value's counter is created up
// front, so it renders as 0 before its first event. A value outside the set
// counts under `other_value` (also created up front), so callers cannot grow
// the family, and the series Prometheus stores, without bound.
//
// Thread-safe: the set is fixed after Create, and Increment is a lookup in it
// plus an atomic add. A default-constructed one has no counters and ignores
// Increment.
class FixedLabelCounter {
 public:
  FixedLabelCounter() = default;

  // InvalidArgument for a bad metric or label name, an empty `values`, or a
  // name registered with another type.
  static absl::StatusOr<FixedLabelCounter> Create(prometheus::Registry* registry,
                                                  const std::string& name, const std::string& help,
                                                  const std::string& label_name,
                                                  const std::vector<std::string>& values,
                                                  const std::string& other_value = "other");

  // Adds delta (ignored if negative) to the counter of `value`, or of
  // other_value if `value` is not in the set.
  void Increment(std::string_view value, double delta = 1.0);

  // The value of `value`'s counter (other_value's if not in the set); 0 for a
  // default-constructed one.
  double Value(std::string_view value) const;

 private:
  prometheus::Counter* Find(std::string_view value) const;

  std::map<std::string, prometheus::Counter*, std::less<>> counters_;
  prometheus::Counter* other_ = nullptr;
};

// A Collectable that runs `refresh` and then collects `source`, for values
// that are computed on demand rather than updated as they change (e.g. queue
// depths read from the engine before each scrape). `source` must outlive this
// object; `refresh` may run on several threads at once.
class RefreshingCollectable : public prometheus::Collectable {
 public:
  RefreshingCollectable(const prometheus::Collectable* source, std::function<void()> refresh)
      : source_(source), refresh_(std::move(refresh)) {}

  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const prometheus::Collectable* const source_;
  const std::function<void()> refresh_;
};

// Collects `collectable` (a Registry, a RefreshingCollectable, ...) and
// renders it in the text exposition format 0.0.4 with prometheus-cpp's
// TextSerializer.
std::string RenderText(const prometheus::Collectable& collectable);

// `count` bounds start, start*factor, start*factor^2, ... InvalidArgument
// unless start > 0, factor > 1, count >= 1 and every bound is finite.
absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count);

}  // namespace strata::metrics

#endif  // STRATA_COMMON_METRICS_H_

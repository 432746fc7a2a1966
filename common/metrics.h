// Prometheus metrics for strata: a registry of metric families that renders
// itself in the Prometheus text exposition format, version 0.0.4.
//
//   metrics::Registry registry;
//   STRATA_ASSIGN_OR_RETURN(metrics::CounterFamily* requests,
//                           registry.RegisterCounter("strata_requests_total",
//                                                    "Requests finished, by reason",
//                                                    {"finish_reason"}));
//   STRATA_ASSIGN_OR_RETURN(metrics::Counter* stopped, requests->WithLabels({"stop"}));
//   stopped->Increment();          // hot path: cache `stopped`, no lookup
//   std::string text = registry.RenderText();   // served on GET /metrics
//
// A family is one metric name with a fixed set of label names; each distinct
// tuple of label values is a child (a Counter, Gauge or Histogram). Families
// and children are never removed, so the pointers handed out stay valid for
// the lifetime of the Registry and hot paths can cache them.
//
// Thread-safety: everything here is thread-safe. Counter, Gauge and Histogram
// updates are lock-free atomics (the decode loop updates them every step while
// the HTTP thread renders). Registration and WithLabels take a mutex, so call
// them at setup time or cache their results rather than calling per step.
#ifndef STRATA_COMMON_METRICS_H_
#define STRATA_COMMON_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata::metrics {

// The HTTP Content-Type of RenderText()'s output.
inline constexpr char kTextContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// A monotonically increasing value, e.g. requests or tokens processed. Names
// of counter families should end in `_total` by Prometheus convention.
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  // Adds delta. Negative and NaN deltas are ignored: a counter never goes down
  // (Prometheus treats a decrease as a process restart). Integer increments
  // are exact up to 2^53.
  void Increment(double delta = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that can go up and down, e.g. queue depth or KV-cache usage.
class Gauge {
 public:
  Gauge() = default;
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Increment(double delta = 1.0) { value_.fetch_add(delta, std::memory_order_relaxed); }
  void Decrement(double delta = 1.0) { value_.fetch_sub(delta, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Counts observations (e.g. latencies in seconds) into buckets with fixed
// upper bounds, plus their sum; rendered as cumulative `_bucket{le="..."}`
// lines ending with le="+Inf", then `_sum` and `_count`.
class Histogram {
 public:
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // Records one observation. NaN is ignored (it would poison _sum forever).
  void Observe(double value);

  // A point-in-time copy. `cumulative[i]` counts observations <= bounds()[i];
  // the last entry (index bounds().size()) is the +Inf bucket and equals
  // `count`. Under concurrent Observe calls, `sum` may lag the counts by the
  // observations in flight; the counts themselves are always consistent.
  struct Snapshot {
    std::vector<uint64_t> cumulative;
    uint64_t count = 0;
    double sum = 0.0;
  };
  Snapshot Read() const;

  // Finite, strictly increasing upper bounds (the +Inf bucket is implicit).
  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  template <typename T>
  friend class Family;
  explicit Histogram(std::shared_ptr<const std::vector<double>> bounds);

  std::shared_ptr<const std::vector<double>> bounds_;  // shared by the family
  // Per-bucket (not cumulative) counts, bounds_->size() + 1 of them, so that
  // Observe touches one counter; Read() accumulates.
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<double> sum_{0.0};
};

namespace internal {

// The type-independent part of a family, so that Registry can hold families
// of every type in one map. Not for use outside this module.
class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, std::vector<std::string> label_names)
      : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)) {}
  virtual ~FamilyBase() = default;
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  // Appends this family's HELP, TYPE and sample lines to *out.
  virtual void Render(std::string* out) const = 0;

 protected:
  // Checks the number and encoding of label values for WithLabels.
  absl::Status CheckLabelValues(const std::vector<std::string>& label_values) const;

 private:
  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
};

}  // namespace internal

// One metric family of children of type T (Counter, Gauge or Histogram).
// Created by Registry; thread-safe.
template <typename T>
class Family final : public internal::FamilyBase {
 public:
  // Returns the child for these label values (one per label name, in the
  // order the names were registered), creating it on first use. The pointer
  // is stable for the Registry's lifetime. InvalidArgument if the number of
  // values differs from the number of label names or a value is not UTF-8.
  // A family without labels has its single child created at registration so
  // that it renders (as zero) before its first update; get it with
  // WithLabels({}).
  absl::StatusOr<T*> WithLabels(const std::vector<std::string>& label_values);

  void Render(std::string* out) const override;

 private:
  friend class Registry;
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::shared_ptr<const std::vector<double>> bounds);

  T* GetOrCreateLocked(const std::vector<std::string>& label_values);

  // Histogram bucket bounds; null for counters and gauges.
  const std::shared_ptr<const std::vector<double>> bounds_;
  mutable std::mutex mu_;  // guards children_ (the map, not the children)
  // Ordered so that rendering is stable: children sorted by label values.
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;
};

// Families are defined in metrics.cc for these three types only.
extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// Owns metric families and renders them. Typically one per process (strata
// serve creates it and hands it to both the engine and the HTTP server); it
// must outlive every pointer it hands out. Thread-safe.
class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Register a family. `name` must match [a-zA-Z_:][a-zA-Z0-9_:]*, label
  // names [a-zA-Z_][a-zA-Z0-9_]* without a leading "__" (reserved), with no
  // duplicates; histograms may not use the label "le". InvalidArgument for a
  // bad name or non-UTF-8 help; AlreadyExists if the name, or any series name
  // the family writes (a histogram "x" writes x_bucket, x_sum and x_count),
  // clashes with one already registered.
  absl::StatusOr<CounterFamily*> RegisterCounter(const std::string& name, const std::string& help,
                                                 const std::vector<std::string>& label_names = {});
  absl::StatusOr<GaugeFamily*> RegisterGauge(const std::string& name, const std::string& help,
                                             const std::vector<std::string>& label_names = {});
  // `bucket_bounds` are the buckets' inclusive upper bounds: finite and
  // strictly increasing (a trailing +Inf is accepted and dropped, since the
  // +Inf bucket is always present). InvalidArgument otherwise.
  absl::StatusOr<HistogramFamily*> RegisterHistogram(const std::string& name,
                                                     const std::string& help,
                                                     const std::vector<std::string>& label_names,
                                                     std::vector<double> bucket_bounds);

  // The whole registry in the text exposition format 0.0.4: for each family,
  // sorted by name, `# HELP` and `# TYPE` lines then one line per sample,
  // children sorted by label values. Every line ends in '\n'.
  std::string RenderText() const;

 private:
  // Validates names and reserves the family's series names. Requires mu_.
  absl::Status CheckAndReserveLocked(const std::string& name, const std::string& help,
                                     const std::vector<std::string>& label_names,
                                     bool is_histogram);

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<internal::FamilyBase>> families_;
  std::set<std::string> series_names_;  // every sample name any family writes
};

// Name grammar checks, exposed for callers that build names dynamically.
bool IsValidMetricName(const std::string& name);
bool IsValidLabelName(const std::string& name);

// `count` bounds start, start*factor, start*factor^2, ... InvalidArgument
// unless start > 0, factor > 1 and count >= 1.
absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count);

// `count` bounds start, start+width, ... InvalidArgument unless width > 0 and
// count >= 1.
absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count);

// Bounds in seconds from 1 ms to 60 s in a 1-2.5-5 progression, wide enough
// for both inter-token latency (milliseconds) and time to first token under
// load (seconds).
std::vector<double> LatencyBucketsSeconds();

// Formats a sample value as the exposition format expects: shortest
// round-trip decimal independent of the locale ("0.25", "1e-05", "3"), and
// "+Inf", "-Inf", "NaN" for the special values.
std::string FormatValue(double value);

}  // namespace strata::metrics

#endif  // STRATA_COMMON_METRICS_H_

#include "common/metrics.h"

#include <cmath>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace strata::metrics {
namespace {

// prometheus-cpp reports bad names and bounds by throwing; this is where
// those exceptions stop.
absl::Status RegistrationError(const std::string& name, const std::exception& e) {
  return absl::InvalidArgumentError(absl::StrCat("metric ", name, ": ", e.what()));
}

}  // namespace

absl::StatusOr<prometheus::Gauge*> AddGauge(prometheus::Registry* registry, const std::string& name,
                                            const std::string& help) {
  try {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry).Add({});
  } catch (const std::exception& e) {
    return RegistrationError(name, e);
  }
}

absl::StatusOr<prometheus::Counter*> AddCounter(prometheus::Registry* registry,
                                                const std::string& name, const std::string& help) {
  try {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(*registry).Add({});
  } catch (const std::exception& e) {
    return RegistrationError(name, e);
  }
}

absl::StatusOr<prometheus::Histogram*> AddHistogram(prometheus::Registry* registry,
                                                    const std::string& name,
                                                    const std::string& help,
                                                    const std::vector<double>& bucket_bounds) {
  for (double bound : bucket_bounds) {
    if (!std::isfinite(bound)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric ", name, ": bucket bounds must be finite"));
    }
  }
  try {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(*registry).Add(
        {}, bucket_bounds);
  } catch (const std::exception& e) {
    return RegistrationError(name, e);
  }
}

absl::StatusOr<FixedLabelCounter> FixedLabelCounter::Create(prometheus::Registry* registry,
                                                            const std::string& name,
                                                            const std::string& help,
                                                            const std::string& label_name,
                                                            const std::vector<std::string>& values,
                                                            const std::string& other_value) {
  if (values.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("metric ", name, ": no label values"));
  }
  FixedLabelCounter c;
  try {
    auto& family = prometheus::BuildCounter().Name(name).Help(help).Register(*registry);
    for (const std::string& value : values) {
      c.counters_[value] = &family.Add({{label_name, value}});
    }
    c.other_ = &family.Add({{label_name, other_value}});
  } catch (const std::exception& e) {
    return RegistrationError(name, e);
  }
  return c;
}

prometheus::Counter* FixedLabelCounter::Find(std::string_view value) const {
  auto it = counters_.find(value);
  return it != counters_.end() ? it->second : other_;
}

void FixedLabelCounter::Increment(std::string_view value, double delta) {
  if (prometheus::Counter* c = Find(value)) c->Increment(delta);
}

double FixedLabelCounter::Value(std::string_view value) const {
  const prometheus::Counter* c = Find(value);
  return c != nullptr ? c->Value() : 0.0;
}

std::vector<prometheus::MetricFamily> RefreshingCollectable::Collect() const {
  if (refresh_) refresh_();
  return source_->Collect();
}

std::string RenderText(const prometheus::Collectable& collectable) {
  return prometheus::TextSerializer().Serialize(collectable.Collect());
}

absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !std::isfinite(start) || !(factor > 1) || !std::isfinite(factor) ||
      count < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ExponentialBuckets needs start > 0, factor > 1, count >= 1; got start=", start,
        " factor=", factor, " count=", count));
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  double b = start;
  for (int i = 0; i < count; ++i) {
    if (!std::isfinite(b)) {
      return absl::InvalidArgumentError("ExponentialBuckets: bounds overflow to infinity");
    }
    bounds.push_back(b);
    b *= factor;
  }
  return bounds;
}

}  // namespace strata::metrics

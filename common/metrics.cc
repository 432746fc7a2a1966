#include "common/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata::metrics {
namespace {

bool IsAsciiLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsAsciiDigit(char c) { return c >= '0' && c <= '9'; }

// Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, <= U+10FFFF).
// Prometheus rejects a scrape with invalid UTF-8 in it, so one bad label value
// would hide every metric; we refuse it at the source instead.
bool IsValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr uint32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// HELP text escapes backslash and line feed (quotes are literal there).
void AppendEscapedHelp(const std::string& s, std::string* out) {
  for (char c : s) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else {
      out->push_back(c);
    }
  }
}

// Label values additionally escape the double quote that delimits them.
void AppendEscapedLabelValue(const std::string& s, std::string* out) {
  for (char c : s) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '"') {
      out->append("\\\"");
    } else if (c == '\n') {
      out->append("\\n");
    } else {
      out->push_back(c);
    }
  }
}

// Appends `{n1="v1",n2="v2"` plus, if `le` is non-null, `,le="..."`, then `}`;
// appends nothing when there are no labels at all.
void AppendLabels(const std::vector<std::string>& names, const std::vector<std::string>& values,
                  const std::string* le, std::string* out) {
  if (names.empty() && le == nullptr) return;
  out->push_back('{');
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out->push_back(',');
    out->append(names[i]);
    out->append("=\"");
    AppendEscapedLabelValue(values[i], out);
    out->push_back('"');
  }
  if (le != nullptr) {
    if (!names.empty()) out->push_back(',');
    out->append("le=\"");
    out->append(*le);
    out->push_back('"');
  }
  out->push_back('}');
}

void AppendSample(const std::string& name, absl::string_view suffix,
                  const std::vector<std::string>& label_names,
                  const std::vector<std::string>& label_values, const std::string* le,
                  const std::string& value, std::string* out) {
  out->append(name);
  out->append(suffix.data(), suffix.size());
  AppendLabels(label_names, label_values, le, out);
  out->push_back(' ');
  out->append(value);
  out->push_back('\n');
}

std::string FormatCount(uint64_t v) {
  char buf[24];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

template <typename T>
constexpr const char* TypeName() {
  if constexpr (std::is_same_v<T, Counter>) {
    return "counter";
  } else if constexpr (std::is_same_v<T, Gauge>) {
    return "gauge";
  } else {
    return "histogram";
  }
}

}  // namespace

std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  // std::to_chars without a format gives the shortest representation that
  // round-trips, and unlike printf it never consults the locale (a ',' decimal
  // separator would break the scrape).
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), value);
  return std::string(buf, res.ptr);
}

bool IsValidMetricName(const std::string& name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = IsAsciiLetter(c) || c == '_' || c == ':' || (i > 0 && IsAsciiDigit(c));
    if (!ok) return false;
  }
  return true;
}

bool IsValidLabelName(const std::string& name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = IsAsciiLetter(c) || c == '_' || (i > 0 && IsAsciiDigit(c));
    if (!ok) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------
// Counter, Histogram

void Counter::Increment(double delta) {
  // `!(delta > 0)` also catches NaN.
  if (!(delta > 0)) return;
  value_.fetch_add(delta, std::memory_order_relaxed);
}

Histogram::Histogram(std::shared_ptr<const std::vector<double>> bounds)
    : bounds_(std::move(bounds)),
      counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_->size() + 1)) {
  for (size_t i = 0; i <= bounds_->size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  // Buckets are inclusive upper bounds (le = "less or equal"): the first bound
  // >= value; past the end is the +Inf bucket.
  const auto it = std::lower_bound(bounds_->begin(), bounds_->end(), value);
  counts_[it - bounds_->begin()].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot s;
  // Read the sum first: an observation in flight has already bumped its
  // bucket by the time it adds to the sum, so this keeps the sum from running
  // ahead of the counts.
  s.sum = sum_.load(std::memory_order_relaxed);
  s.cumulative.resize(bounds_->size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = running;
  }
  s.count = running;
  return s;
}

// ---------------------------------------------------------------------------
// Families

namespace internal {

absl::Status FamilyBase::CheckLabelValues(const std::vector<std::string>& label_values) const {
  if (label_values.size() != label_names_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metric ", name_, " has ", label_names_.size(), " label(s) (",
        absl::StrJoin(label_names_, ", "), ") but ", label_values.size(), " value(s) were given"));
  }
  for (size_t i = 0; i < label_values.size(); ++i) {
    if (!IsValidUtf8(label_values[i])) {
      return absl::InvalidArgumentError(absl::StrCat("metric ", name_, ": value of label ",
                                                     label_names_[i], " is not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

}  // namespace internal

template <typename T>
Family<T>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                  std::shared_ptr<const std::vector<double>> bounds)
    : FamilyBase(std::move(name), std::move(help), std::move(label_names)),
      bounds_(std::move(bounds)) {
  if (this->label_names().empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    GetOrCreateLocked({});
  }
}

template <typename T>
T* Family<T>::GetOrCreateLocked(const std::vector<std::string>& label_values) {
  auto it = children_.find(label_values);
  if (it != children_.end()) return it->second.get();
  std::unique_ptr<T> child;
  if constexpr (std::is_same_v<T, Histogram>) {
    child.reset(new Histogram(bounds_));
  } else {
    child = std::make_unique<T>();
  }
  T* raw = child.get();
  children_.emplace(label_values, std::move(child));
  return raw;
}

template <typename T>
absl::StatusOr<T*> Family<T>::WithLabels(const std::vector<std::string>& label_values) {
  if (absl::Status s = CheckLabelValues(label_values); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  return GetOrCreateLocked(label_values);
}

template <typename T>
void Family<T>::Render(std::string* out) const {
  const std::string& n = name();
  if (!help().empty()) {
    out->append("# HELP ");
    out->append(n);
    out->push_back(' ');
    AppendEscapedHelp(help(), out);
    out->push_back('\n');
  }
  out->append("# TYPE ");
  out->append(n);
  out->push_back(' ');
  out->append(TypeName<T>());
  out->push_back('\n');

  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [values, child] : children_) {
    if constexpr (std::is_same_v<T, Histogram>) {
      const Histogram::Snapshot snap = child->Read();
      const std::vector<double>& bounds = *bounds_;
      for (size_t i = 0; i <= bounds.size(); ++i) {
        const std::string le = i < bounds.size() ? FormatValue(bounds[i]) : "+Inf";
        AppendSample(n, "_bucket", label_names(), values, &le, FormatCount(snap.cumulative[i]),
                     out);
      }
      AppendSample(n, "_sum", label_names(), values, nullptr, FormatValue(snap.sum), out);
      AppendSample(n, "_count", label_names(), values, nullptr, FormatCount(snap.count), out);
    } else {
      AppendSample(n, "", label_names(), values, nullptr, FormatValue(child->Value()), out);
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---------------------------------------------------------------------------
// Registry

absl::Status Registry::CheckAndReserveLocked(const std::string& name, const std::string& help,
                                             const std::vector<std::string>& label_names,
                                             bool is_histogram) {
  if (!IsValidMetricName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid metric name \"", name, "\": must match [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  if (!IsValidUtf8(help)) {
    return absl::InvalidArgumentError(
        absl::StrCat("help text of metric ", name, " is not valid UTF-8"));
  }
  std::set<std::string> seen;
  for (const std::string& label : label_names) {
    if (!IsValidLabelName(label)) {
      return absl::InvalidArgumentError(absl::StrCat("metric ", name, ": invalid label name \"",
                                                     label,
                                                     "\": must match [a-zA-Z_][a-zA-Z0-9_]*"));
    }
    if (label.size() >= 2 && label[0] == '_' && label[1] == '_') {
      return absl::InvalidArgumentError(absl::StrCat("metric ", name, ": label name \"", label,
                                                     "\" is reserved (leading \"__\")"));
    }
    if (is_histogram && label == "le") {
      return absl::InvalidArgumentError(
          absl::StrCat("histogram ", name, ": label name \"le\" is reserved for buckets"));
    }
    if (!seen.insert(label).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric ", name, ": duplicate label name \"", label, "\""));
    }
  }

  // A histogram writes three series names; they must not collide with any
  // other family's, or Prometheus would see two TYPEs for one series.
  std::vector<std::string> series;
  if (is_histogram) {
    series = {name + "_bucket", name + "_sum", name + "_count", name};
  } else {
    series = {name};
  }
  if (families_.count(name) > 0) {
    return absl::AlreadyExistsError(absl::StrCat("metric ", name, " is already registered"));
  }
  for (const std::string& s : series) {
    if (series_names_.count(s) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("metric ", name, ": series name ", s, " clashes with a registered metric"));
    }
  }
  series_names_.insert(series.begin(), series.end());
  return absl::OkStatus();
}

absl::StatusOr<CounterFamily*> Registry::RegisterCounter(
    const std::string& name, const std::string& help, const std::vector<std::string>& label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckAndReserveLocked(name, help, label_names, false); !s.ok()) return s;
  auto* family = new CounterFamily(name, help, label_names, nullptr);
  families_.emplace(name, std::unique_ptr<internal::FamilyBase>(family));
  return family;
}

absl::StatusOr<GaugeFamily*> Registry::RegisterGauge(const std::string& name,
                                                     const std::string& help,
                                                     const std::vector<std::string>& label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckAndReserveLocked(name, help, label_names, false); !s.ok()) return s;
  auto* family = new GaugeFamily(name, help, label_names, nullptr);
  families_.emplace(name, std::unique_ptr<internal::FamilyBase>(family));
  return family;
}

absl::StatusOr<HistogramFamily*> Registry::RegisterHistogram(
    const std::string& name, const std::string& help, const std::vector<std::string>& label_names,
    std::vector<double> bucket_bounds) {
  if (!bucket_bounds.empty() && bucket_bounds.back() == std::numeric_limits<double>::infinity()) {
    bucket_bounds.pop_back();
  }
  for (size_t i = 0; i < bucket_bounds.size(); ++i) {
    if (!std::isfinite(bucket_bounds[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "histogram ", name, ": bucket bound ", FormatValue(bucket_bounds[i]), " is not finite"));
    }
    if (i > 0 && !(bucket_bounds[i] > bucket_bounds[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "histogram ", name, ": bucket bounds must strictly increase (",
          FormatValue(bucket_bounds[i - 1]), " then ", FormatValue(bucket_bounds[i]), ")"));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckAndReserveLocked(name, help, label_names, true); !s.ok()) return s;
  auto* family =
      new HistogramFamily(name, help, label_names,
                          std::make_shared<const std::vector<double>>(std::move(bucket_bounds)));
  families_.emplace(name, std::unique_ptr<internal::FamilyBase>(family));
  return family;
}

std::string Registry::RenderText() const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  // families_ is a std::map keyed by name, so this is sorted by name.
  for (const auto& [name, family] : families_) family->Render(&out);
  return out;
}

// ---------------------------------------------------------------------------
// Bucket helpers

absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !std::isfinite(start) || !(factor > 1) || !std::isfinite(factor) ||
      count < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExponentialBuckets needs start > 0, factor > 1, count >= 1; got start=",
                     FormatValue(start), " factor=", FormatValue(factor), " count=", count));
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

absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count) {
  if (!std::isfinite(start) || !(width > 0) || !std::isfinite(width) || count < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LinearBuckets needs finite start, width > 0, count >= 1; got start=", FormatValue(start),
        " width=", FormatValue(width), " count=", count));
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  for (int i = 0; i < count; ++i) {
    const double b = start + width * i;
    if (!std::isfinite(b) || (!bounds.empty() && !(b > bounds.back()))) {
      return absl::InvalidArgumentError("LinearBuckets: bounds overflow or stop increasing");
    }
    bounds.push_back(b);
  }
  return bounds;
}

std::vector<double> LatencyBucketsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0};
}

}  // namespace strata::metrics

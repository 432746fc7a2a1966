#include "common/metrics.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace strata::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

int CountLines(const std::string& text, const std::string& prefix) {
  int n = 0;
  size_t at = 0;
  while ((at = text.find("\n" + prefix, at)) != std::string::npos) {
    ++n;
    ++at;
  }
  return n + (text.rfind(prefix, 0) == 0 ? 1 : 0);
}

TEST(MetricsTest, RendersExpositionText) {
  prometheus::Registry r;
  auto queue = AddGauge(&r, "strata_queue_depth", "Requests waiting");
  ASSERT_TRUE(queue.ok()) << queue.status();
  (*queue)->Set(7);

  auto ttft = AddHistogram(&r, "strata_ttft_seconds", "Time to first token", {0.25, 0.5, 1.0});
  ASSERT_TRUE(ttft.ok()) << ttft.status();
  // Binary-exact values so the sum prints exactly; 0.25 lands in le="0.25"
  // because bounds are inclusive.
  for (double v : {0.125, 0.25, 0.375, 0.75, 2.0}) (*ttft)->Observe(v);

  // prometheus-cpp's TextSerializer: families by type (counters, gauges,
  // histograms) in registration order, histogram _count and _sum before the
  // buckets.
  EXPECT_EQ(RenderText(r),
            "# HELP strata_queue_depth Requests waiting\n"
            "# TYPE strata_queue_depth gauge\n"
            "strata_queue_depth 7\n"
            "# HELP strata_ttft_seconds Time to first token\n"
            "# TYPE strata_ttft_seconds histogram\n"
            "strata_ttft_seconds_count 5\n"
            "strata_ttft_seconds_sum 3.5\n"
            "strata_ttft_seconds_bucket{le=\"0.25\"} 2\n"
            "strata_ttft_seconds_bucket{le=\"0.5\"} 3\n"
            "strata_ttft_seconds_bucket{le=\"1\"} 4\n"
            "strata_ttft_seconds_bucket{le=\"+Inf\"} 5\n");

  auto requests =
      FixedLabelCounter::Create(&r, "strata_requests_total", "Requests finished, by reason",
                                "finish_reason", {"stop", "length"});
  ASSERT_TRUE(requests.ok()) << requests.status();
  requests->Increment("stop");
  requests->Increment("stop", 2);
  requests->Increment("length");
  // A family's children come in no particular order.
  const std::string text = RenderText(r);
  EXPECT_THAT(text, StartsWith("# HELP strata_requests_total Requests finished, by reason\n"
                               "# TYPE strata_requests_total counter\n"));
  EXPECT_THAT(text, HasSubstr("\nstrata_requests_total{finish_reason=\"stop\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("\nstrata_requests_total{finish_reason=\"length\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("\nstrata_requests_total{finish_reason=\"other\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("\n# HELP strata_queue_depth Requests waiting\n"));
}

TEST(MetricsTest, FixedLabelCounterRendersEveryValueBeforeItsFirstEvent) {
  prometheus::Registry r;
  auto rejected = FixedLabelCounter::Create(&r, "rejected_total", "Refused", "reason",
                                            {"invalid_argument", "queue_full", "unavailable"});
  ASSERT_TRUE(rejected.ok()) << rejected.status();
  const std::string text = RenderText(r);
  EXPECT_THAT(text, HasSubstr("rejected_total{reason=\"invalid_argument\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("rejected_total{reason=\"queue_full\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("rejected_total{reason=\"unavailable\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("rejected_total{reason=\"other\"} 0\n"));
  EXPECT_EQ(CountLines(text, "rejected_total{"), 4);
}

TEST(MetricsTest, FixedLabelCounterCountsUnknownValuesAsOther) {
  prometheus::Registry r;
  auto finished = FixedLabelCounter::Create(&r, "finished_total", "Finished", "finish_reason",
                                            {"stop", "length"}, "unknown");
  ASSERT_TRUE(finished.ok()) << finished.status();
  // However many distinct values callers pass, the family keeps its series.
  for (int i = 0; i < 1000; ++i) finished->Increment("reason_" + std::to_string(i));
  finished->Increment("stop");
  finished->Increment("");
  finished->Increment("Stop");  // values are case-sensitive

  EXPECT_EQ(finished->Value("stop"), 1);
  EXPECT_EQ(finished->Value("length"), 0);
  EXPECT_EQ(finished->Value("unknown"), 1002);
  EXPECT_EQ(finished->Value("anything else"), 1002);
  const std::string text = RenderText(r);
  EXPECT_EQ(CountLines(text, "finished_total{"), 3) << text;
  EXPECT_THAT(text, HasSubstr("finished_total{finish_reason=\"unknown\"} 1002\n"));
  EXPECT_THAT(text, Not(HasSubstr("reason_")));
}

TEST(MetricsTest, DefaultFixedLabelCounterIgnoresIncrements) {
  FixedLabelCounter none;
  none.Increment("stop");
  EXPECT_EQ(none.Value("stop"), 0);
}

TEST(MetricsTest, FixedLabelCounterIgnoresNegativeDeltas) {
  prometheus::Registry r;
  auto c = FixedLabelCounter::Create(&r, "c_total", "C", "kind", {"a"});
  ASSERT_TRUE(c.ok());
  c->Increment("a", 2);
  c->Increment("a", -1);
  EXPECT_EQ(c->Value("a"), 2);
}

TEST(MetricsTest, EscapesLabelValues) {
  prometheus::Registry r;
  auto c = FixedLabelCounter::Create(&r, "c_total", "C", "name", {"a\"b\\c\nd", "Grüße ✓"});
  ASSERT_TRUE(c.ok());
  const std::string text = RenderText(r);
  EXPECT_THAT(text, HasSubstr("c_total{name=\"a\\\"b\\\\c\\nd\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("c_total{name=\"Grüße ✓\"} 0\n"));
}

TEST(MetricsTest, BadNamesAreErrorsNotExceptions) {
  prometheus::Registry r;
  for (const char* name : {"", "1abc", "a-b", "a b", "ä"}) {
    EXPECT_EQ(AddGauge(&r, name, "h").status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_EQ(AddHistogram(&r, name, "h", {1.0}).status().code(),
              absl::StatusCode::kInvalidArgument)
        << name;
    EXPECT_EQ(FixedLabelCounter::Create(&r, name, "h", "l", {"v"}).status().code(),
              absl::StatusCode::kInvalidArgument)
        << name;
  }
  for (const char* label : {"", "1a", "a:b", "__reserved", "a-b"}) {
    auto c = FixedLabelCounter::Create(&r, "ok_total", "h", label, {"v"});
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << label;
  }
  auto empty = FixedLabelCounter::Create(&r, "empty_total", "h", "l", {});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  // A failed registration leaves no series behind for its values.
  EXPECT_THAT(RenderText(r), Not(HasSubstr("ok_total{")));
}

TEST(MetricsTest, NameOfAnotherTypeIsAnError) {
  prometheus::Registry r;
  ASSERT_TRUE(AddGauge(&r, "x", "h").ok());
  auto counter = FixedLabelCounter::Create(&r, "x", "h", "l", {"v"});
  EXPECT_EQ(counter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(counter.status().message(), HasSubstr("metric x"));
  EXPECT_EQ(AddHistogram(&r, "x", "h", {1.0}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, SameNameTwiceReturnsTheSameMetric) {
  prometheus::Registry r;
  auto a = AddGauge(&r, "g", "h");
  auto b = AddGauge(&r, "g", "h");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  auto c1 = FixedLabelCounter::Create(&r, "c_total", "h", "l", {"v"});
  auto c2 = FixedLabelCounter::Create(&r, "c_total", "h", "l", {"v"});
  ASSERT_TRUE(c1.ok() && c2.ok());
  c1->Increment("v");
  EXPECT_EQ(c2->Value("v"), 1);
}

TEST(MetricsTest, RejectsBadBuckets) {
  prometheus::Registry r;
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  int i = 0;
  for (const std::vector<double>& bounds : std::vector<std::vector<double>>{
           {1.0, 0.5}, {1.0, 1.0}, {1.0, nan}, {1.0, inf}, {-inf, 1.0}}) {
    auto h = AddHistogram(&r, absl::StrCat("h", i++), "h", bounds);
    EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << i;
  }
  // No bounds: only the +Inf bucket.
  auto h = AddHistogram(&r, "only_inf", "h", {});
  ASSERT_TRUE(h.ok()) << h.status();
  (*h)->Observe(3);
  EXPECT_THAT(RenderText(r), HasSubstr("only_inf_count 1\nonly_inf_sum 3\n"
                                       "only_inf_bucket{le=\"+Inf\"} 1\n"));
}

TEST(MetricsTest, ExponentialBuckets) {
  auto b = ExponentialBuckets(0.001, 10, 4);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(b->size(), 4u);
  EXPECT_DOUBLE_EQ((*b)[0], 0.001);
  EXPECT_DOUBLE_EQ((*b)[3], 1.0);
  EXPECT_FALSE(ExponentialBuckets(0, 2, 3).ok());
  EXPECT_FALSE(ExponentialBuckets(-1, 2, 3).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 1, 3).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 2, 0).ok());
  EXPECT_FALSE(ExponentialBuckets(std::numeric_limits<double>::quiet_NaN(), 2, 3).ok());
  EXPECT_FALSE(ExponentialBuckets(1e300, 1e10, 3).ok());  // overflows to +Inf
  // What strata serve's latency histograms use: 0.5 ms to about 65 s.
  auto latency = ExponentialBuckets(0.0005, 2.0, 18);
  ASSERT_TRUE(latency.ok());
  EXPECT_DOUBLE_EQ(latency->back(), 65.536);
}

TEST(MetricsTest, RefreshingCollectableRefreshesBeforeEachCollect) {
  prometheus::Registry r;
  auto depth = AddGauge(&r, "depth", "Queue depth");
  ASSERT_TRUE(depth.ok());
  int refreshes = 0;
  RefreshingCollectable scraped(&r, [&] { (*depth)->Set(++refreshes * 10); });
  EXPECT_THAT(RenderText(scraped), HasSubstr("depth 10\n"));
  EXPECT_THAT(RenderText(scraped), HasSubstr("depth 20\n"));
  EXPECT_EQ(refreshes, 2);
  // The registry itself is unchanged by a collect of its own.
  EXPECT_THAT(RenderText(r), HasSubstr("depth 20\n"));
  EXPECT_EQ(refreshes, 2);
}

TEST(MetricsTest, ConcurrentUpdatesSumExactly) {
  prometheus::Registry r;
  auto c = FixedLabelCounter::Create(&r, "c_total", "C", "kind", {"a", "b"});
  auto h = AddHistogram(&r, "h", "H", {1.0, 2.0});
  ASSERT_TRUE(c.ok() && h.ok());
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::atomic<bool> done{false};
  std::thread reader([&] {
    double last = 0;
    while (!done.load()) {
      const std::string text = RenderText(r);
      const size_t at = text.find("c_total{kind=\"a\"} ");
      ASSERT_NE(at, std::string::npos);
      const double v = std::stod(text.substr(at + 18));
      EXPECT_GE(v, last);  // a counter never goes down
      last = v;
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        c->Increment(t % 2 == 0 ? "a" : "b");
        (*h)->Observe(i % 3);
      }
    });
  }
  for (auto& w : writers) w.join();
  done = true;
  reader.join();
  EXPECT_EQ(c->Value("a"), kThreads / 2 * kPerThread);
  EXPECT_EQ(c->Value("b"), kThreads / 2 * kPerThread);
  EXPECT_THAT(RenderText(r), HasSubstr("h_count " + std::to_string(kThreads * kPerThread) + "\n"));
}

TEST(MetricsTest, ContentTypeIsTheTextFormat) {
  EXPECT_THAT(std::string(kTextContentType), StartsWith("text/plain; version=0.0.4"));
}

}  // namespace
}  // namespace strata::metrics

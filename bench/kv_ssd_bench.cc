#include "bench/kv_ssd_bench.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kvtier/record_mover.h"
#include "kvtier/ssd_store.h"

namespace strata::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Writes back dirty pages and drops the clean ones, so that what is read
// next comes from the disk; false when this process may not (not root).
bool DropPageCache() {
  sync();
  std::ofstream drop("/proc/sys/vm/drop_caches");
  if (!drop) return false;
  drop << "3\n";
  drop.flush();
  return drop.good();
}

// Runs `jobs` on a mover of `threads` threads; the seconds until the last
// is done. Any failed job is the error.
absl::StatusOr<double> RunJobs(kvtier::SsdStore* store, int threads,
                               std::vector<kvtier::RecordMover::Job> jobs) {
  kvtier::RecordMover mover(store, threads);
  const auto start = Clock::now();
  const size_t count = jobs.size();
  for (auto& job : jobs) mover.Submit(std::move(job));
  size_t done = 0;
  absl::Status failed;
  while (done < count) {
    for (const kvtier::RecordMover::Done& d : mover.TakeDone()) {
      ++done;
      if (!d.status.ok() && failed.ok()) failed = d.status;
    }
    if (done < count) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  STRATA_RETURN_IF_ERROR(failed);
  return seconds;
}

}  // namespace

absl::StatusOr<KvSsdBenchResult> RunKvSsdBench(const KvSsdBenchOptions& o) {
  if (o.path.empty() || o.value_bytes < 4096 || o.total_bytes < o.value_bytes ||
      o.io_threads.empty() || *std::min_element(o.io_threads.begin(), o.io_threads.end()) < 1) {
    return absl::InvalidArgumentError(
        "kv-ssd: give a path, values of at least 4096 bytes, a total of at least one value and "
        "I/O thread counts of at least 1");
  }
  const int64_t values = o.total_bytes / o.value_bytes;
  const std::filesystem::path dir = std::filesystem::path(o.path) / "strata-kv-ssd-bench";
  std::filesystem::remove_all(dir);
  STRATA_ASSIGN_OR_RETURN(
      std::unique_ptr<kvtier::SsdStore> store,
      kvtier::SsdStore::Open({.path = dir.string(),
                              .model = "bench",
                              .budget_bytes = values * (o.value_bytes + 4) + (1 << 20),
                              .direct_io = o.direct_io}));
  const int max_threads = *std::max_element(o.io_threads.begin(), o.io_threads.end());
  auto key = [](int64_t i) {
    return kvtier::SsdKey{kvtier::SsdKey::Owner::kPrefix, static_cast<uint64_t>(i + 1), 0, 0, 0};
  };
  // One record per job, random bytes (KV barely compresses; the store does
  // not try).
  auto buffers = [&](int jobs) {
    std::vector<std::vector<uint8_t>> b(static_cast<size_t>(jobs),
                                        std::vector<uint8_t>(static_cast<size_t>(o.value_bytes)));
    std::mt19937_64 rng(7);
    for (auto& v : b) {
      for (size_t i = 0; i + 8 <= v.size(); i += 8) {
        const uint64_t r = rng();
        std::copy_n(reinterpret_cast<const uint8_t*>(&r), 8, v.data() + i);
      }
    }
    return b;
  };
  // Values [0, values) cut into `jobs` contiguous runs, job j using record j.
  auto make_jobs = [&](int jobs, bool down, std::vector<std::vector<uint8_t>>& records) {
    std::vector<kvtier::RecordMover::Job> list;
    int64_t next = 0;
    for (int j = 0; j < jobs; ++j) {
      kvtier::RecordMover::Job job;
      job.id = static_cast<uint64_t>(j + 1);
      job.down = down;
      job.record_bytes = o.value_bytes;
      const int64_t n = values / jobs + (j < values % jobs ? 1 : 0);
      for (int64_t i = next; i < next + n; ++i) {
        job.keys.push_back(key(i));
        job.records.push_back(records[static_cast<size_t>(j)].data());
      }
      next += n;
      if (!job.records.empty()) list.push_back(std::move(job));
    }
    return list;
  };

  KvSsdBenchResult result;
  result.values = values;
  {
    const int jobs = max_threads * 4;
    auto records = buffers(jobs);
    STRATA_ASSIGN_OR_RETURN(const double seconds,
                            RunJobs(store.get(), max_threads, make_jobs(jobs, true, records)));
    result.write_gbps = static_cast<double>(values * o.value_bytes) / seconds / 1e9;
  }
  result.page_cache_dropped = true;
  for (int threads : o.io_threads) {
    result.page_cache_dropped &= DropPageCache();
    const int jobs = threads * 4;
    auto records = buffers(jobs);
    STRATA_ASSIGN_OR_RETURN(const double seconds,
                            RunJobs(store.get(), threads, make_jobs(jobs, false, records)));
    result.reads.push_back({threads, static_cast<double>(values * o.value_bytes) / seconds / 1e9});
  }
  store.reset();
  std::filesystem::remove_all(dir);
  return result;
}

}  // namespace strata::bench

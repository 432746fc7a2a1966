// The SSD tier's bandwidth as strata moves KV through it (`strata bench
// kv-ssd`): values of one host record each are written to an SsdStore by
// RecordMover jobs (as prefix pages go down), the page cache is dropped,
// and they are read back into host records by jobs on 1, 2, 4... I/O
// threads (as a prompt's prefix comes up). Compared with the disk's own
// sequential read (fio, bench/run_prefix_ttft.sh) in the same run.
//
// Thread-safety: RunKvSsdBench drives its own mover; call it from one thread.
#ifndef STRATA_BENCH_KV_SSD_BENCH_H_
#define STRATA_BENCH_KV_SSD_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::bench {

struct KvSsdBenchOptions {
  std::string path;                        // the database directory (created, emptied after)
  int64_t value_bytes = int64_t{2} << 20;  // one host record (Llama-3-8B: 16 tokens, bf16)
  int64_t total_bytes = int64_t{8} << 30;  // written, then read back per thread count
  std::vector<int> io_threads = {1, 2, 4, 8};
  bool direct_io = true;  // SsdStoreOptions::direct_io
};

struct KvSsdBenchResult {
  int64_t values = 0;
  double write_gbps = 0;  // GB/s (1e9 bytes), flushed to the disk
  // Whether the page cache was dropped before each read (needs root): if
  // not, the reads may come from memory.
  bool page_cache_dropped = false;
  struct Read {
    int io_threads = 0;
    double gbps = 0;
  };
  std::vector<Read> reads;
};

absl::StatusOr<KvSsdBenchResult> RunKvSsdBench(const KvSsdBenchOptions& options);

}  // namespace strata::bench

#endif  // STRATA_BENCH_KV_SSD_BENCH_H_

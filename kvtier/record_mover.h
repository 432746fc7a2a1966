// RecordMover: moves host-tier records to and from the SSD tier on I/O
// threads, so that the thread driving the model never waits for the disk.
//
// A job moves a list of records down to the SSD store or back up into host
// records, one value per record under the key the job gives for it,
// optionally after a small per-record header (what the record holds, for a
// value that outlives the process that wrote it). Two kinds of job:
//  - A swap (swap_id != 0: a paused sequence's KV, one record per page,
//    keyed by (swap_id, index); ids are never reused, so a job that
//    outlives its sequence touches no other swap's keys). Down: when one
//    write fails (the store's budget is full, an I/O error), deletes what
//    the job wrote and reports why. Up: reads every value, then deletes the
//    swap's keys.
//  - Keyed values that stay (swap_id == 0: stored prefixes). Down: a write
//    that fails deletes that key alone, and the others stand; the job ends
//    with a flush, so that what it wrote survives a crash. Up: keys stay.
// Up reads each value straight into its record (checking its size; the
// store checks its CRC). Done says which records moved, so that a job that
// failed part-way still serves the rest.
// The caller keeps the records alive and referenced until it has taken the
// job's completion (TakeDone): the I/O threads read or write them until
// then.
//
// Thread-safety: Submit and TakeDone are called from one thread (the block
// manager's); the jobs run on the mover's threads. The destructor finishes
// the jobs that are running and drops the queued ones.
#ifndef STRATA_KVTIER_RECORD_MOVER_H_
#define STRATA_KVTIER_RECORD_MOVER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvtier/ssd_store.h"

namespace strata::kvtier {

class RecordMover {
 public:
  struct Job {
    uint64_t id = 0;       // the caller's, returned in Done
    uint64_t swap_id = 0;  // a swap's SSD owner id (keys: Key(swap_id, i)); 0: `keys`
    bool down = true;      // host -> SSD; false: SSD -> host
    std::vector<uint8_t*> records;
    int64_t record_bytes = 0;
    std::vector<SsdKey> keys;  // swap_id == 0: one per record
    // Bytes before each record in its value (0: none). Down: `headers`
    // holds them, one per record; up: Done::headers receives them.
    int64_t header_bytes = 0;
    std::vector<std::vector<uint8_t>> headers;
  };
  struct Done {
    uint64_t id = 0;
    absl::Status status;                        // the first failure, if any
    std::vector<bool> moved;                    // per record
    std::vector<std::vector<uint8_t>> headers;  // up, with header_bytes: per record
    int64_t bytes = 0;                          // moved (values' record bytes and headers)
    int64_t micros = 0;                         // from the job's start to its end
  };

  // `store` outlives the mover; threads >= 1. before_read (tests only) is
  // called on the I/O thread before each read (a test blocks it to stand
  // for a disk that stops answering).
  RecordMover(SsdStore* store, int threads, std::function<void()> before_read = nullptr);
  ~RecordMover();
  RecordMover(const RecordMover&) = delete;
  RecordMover& operator=(const RecordMover&) = delete;

  void Submit(Job job);
  // The completions since the last call.
  std::vector<Done> TakeDone();
  SsdStore& store() const { return *store_; }

  static SsdKey Key(uint64_t swap_id, int record) {
    return {SsdKey::Owner::kSequence, swap_id, 0, 0, static_cast<uint32_t>(record)};
  }

 private:
  void Run();
  Done Move(const Job& job);

  SsdStore* store_;
  const std::function<void()> before_read_;
  absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<Done> done_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_RECORD_MOVER_H_

// RecordMover: moves host-tier records to and from the SSD tier on I/O
// threads, so that the thread driving the model never waits for the disk.
//
// A job moves the records of one swap (a paused sequence's KV, one record
// per page) down to the SSD store or back up into host records. Each record
// is one value, keyed by (the swap's id, the record's index); ids are never
// reused, so a job that outlives its sequence touches no other swap's keys.
//  - Down: writes every record; when one write fails (the store's budget
//    is full, an I/O error), deletes what the job wrote and reports why.
//  - Up: reads every value into its record, checking its size (the store
//    checks its CRC), then deletes the swap's keys.
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
    uint64_t swap_id = 0;  // the SSD owner id of the swap's values
    bool down = true;      // host -> SSD; false: SSD -> host
    std::vector<uint8_t*> records;
    int64_t record_bytes = 0;
  };
  struct Done {
    uint64_t id = 0;
    absl::Status status;
    int64_t bytes = 0;   // moved
    int64_t micros = 0;  // from the job's start to its end
  };

  // `store` outlives the mover; threads >= 1.
  RecordMover(SsdStore* store, int threads);
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
  absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<Done> done_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_RECORD_MOVER_H_

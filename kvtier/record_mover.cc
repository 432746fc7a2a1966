#include "kvtier/record_mover.h"

#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace strata::kvtier {

RecordMover::RecordMover(SsdStore* store, int threads) : store_(store) {
  for (int i = 0; i < std::max(threads, 1); ++i) threads_.emplace_back([this] { Run(); });
}

RecordMover::~RecordMover() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    queue_.clear();
  }
  for (std::thread& t : threads_) t.join();
}

void RecordMover::Submit(Job job) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(job));
}

std::vector<RecordMover::Done> RecordMover::TakeDone() {
  absl::MutexLock lock(&mu_);
  return std::exchange(done_, {});
}

void RecordMover::Run() {
  for (;;) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](RecordMover* m)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(m->mu_) { return m->stopping_ || !m->queue_.empty(); },
          this));
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    Done done = Move(job);
    absl::MutexLock lock(&mu_);
    done_.push_back(std::move(done));
  }
}

RecordMover::Done RecordMover::Move(const Job& job) {
  const auto start = std::chrono::steady_clock::now();
  Done done{job.id, absl::OkStatus(), 0, 0};
  const size_t bytes = static_cast<size_t>(job.record_bytes);
  for (size_t i = 0; i < job.records.size() && done.status.ok(); ++i) {
    const SsdKey key = Key(job.swap_id, static_cast<int>(i));
    if (job.down) {
      done.status = store_->Put(key, {job.records[i], bytes});
    } else {
      absl::StatusOr<std::vector<uint8_t>> value = store_->Get(key);
      if (!value.ok()) {
        done.status = value.status();
      } else if (value->size() != bytes) {
        done.status =
            absl::DataLossError(absl::StrCat("SSD value of swap ", job.swap_id, " record ", i,
                                             " holds ", value->size(), " bytes, not ", bytes));
      } else {
        std::memcpy(job.records[i], value->data(), bytes);
      }
    }
    if (done.status.ok()) done.bytes += job.record_bytes;
  }
  // Down and failed: nothing of the swap may stay. Up: the values served.
  if (!job.down || !done.status.ok()) {
    if (absl::Status deleted = store_->DeleteOwner(SsdKey::Owner::kSequence, job.swap_id);
        !deleted.ok() && done.status.ok()) {
      done.status = deleted;
    }
  }
  done.micros = std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::steady_clock::now() - start)
                    .count();
  return done;
}

}  // namespace strata::kvtier

#include "kvtier/record_mover.h"

#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace strata::kvtier {

RecordMover::RecordMover(SsdStore* store, int threads, std::function<void()> before_read)
    : store_(store), before_read_(std::move(before_read)) {
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
  const size_t n = job.records.size();
  Done done{job.id, absl::OkStatus(), std::vector<bool>(n, false), {}, 0, 0};
  const size_t bytes = static_cast<size_t>(job.record_bytes);
  const size_t header = static_cast<size_t>(job.header_bytes);
  const bool swap = job.swap_id != 0;
  if (!swap && job.keys.size() != n) {
    done.status = absl::InvalidArgumentError("an SSD move needs one key per record");
    return done;
  }
  if (job.down && header > 0 && job.headers.size() != n) {
    done.status = absl::InvalidArgumentError("an SSD move down needs one header per record");
    return done;
  }
  if (!job.down && header > 0) done.headers.assign(n, std::vector<uint8_t>(header));
  for (size_t i = 0; i < n; ++i) {
    // A swap is whole or nothing: its first failure ends it.
    if (swap && !done.status.ok()) break;
    const SsdKey key = swap ? Key(job.swap_id, static_cast<int>(i)) : job.keys[i];
    absl::Status status;
    if (job.down) {
      const std::span<const uint8_t> head =
          header > 0 ? std::span<const uint8_t>(job.headers[i]) : std::span<const uint8_t>();
      status = store_->Put(key, head, {job.records[i], bytes});
      // A value that stays may be there already (the same content: keys
      // are content-addressed, and its header says whose it is).
      if (!swap && absl::IsAlreadyExists(status)) status = absl::OkStatus();
    } else {
      const std::span<uint8_t> head =
          header > 0 ? std::span<uint8_t>(done.headers[i]) : std::span<uint8_t>();
      if (before_read_) before_read_();
      status = store_->GetInto(key, head, {job.records[i], bytes});
    }
    if (status.ok()) {
      done.moved[i] = true;
      done.bytes += static_cast<int64_t>(bytes + header);
      continue;
    }
    if (done.status.ok()) done.status = status;
    // A value that stays: the failed write leaves no half of itself.
    if (!swap && job.down) (void)store_->Delete(key);
  }
  // Values that stay are on the disk when the job is done (the store
  // writes no log): a crash after it loses none of them.
  if (!swap && job.down) {
    if (absl::Status flushed = store_->Flush(); !flushed.ok()) {
      done.status = flushed;
      for (size_t i = 0; i < n; ++i) {
        if (done.moved[i]) (void)store_->Delete(job.keys[i]);
      }
      done.moved.assign(n, false);
    }
  }
  // A swap down that failed leaves nothing; one up has served its values.
  if (swap && (!job.down || !done.status.ok())) {
    if (absl::Status deleted = store_->DeleteOwner(SsdKey::Owner::kSequence, job.swap_id);
        !deleted.ok() && done.status.ok()) {
      done.status = deleted;
    }
  }
  if (swap && !done.status.ok()) done.moved.assign(n, false);
  done.micros = std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::steady_clock::now() - start)
                    .count();
  return done;
}

}  // namespace strata::kvtier

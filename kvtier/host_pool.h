// HostPool: the host tier's memory, as fixed-size records.
//
// One HostBuffer from the backend (pinned and device-mapped on CUDA) is cut
// into records of one size (KvLayout::record_bytes(), rounded up to
// engine::kKvHostUnit: a page of every layer). A swapped page takes one
// record anywhere (Allocate); the host-homed blocks of a sequence's layer
// take a run of consecutive records (AllocateRun), since the device finds
// their pieces by offset. Each record has a state and a reference count:
//   kFree -> (Allocate) kInFlight -> (its copy is done) kResident
//   kResident -> (a copy reads it) kInFlight -> ...
// A copy that reads or writes a record holds a reference for as long as it
// runs; Release() of a record that is still referenced only marks it, and
// it becomes free when the last reference goes, so no copy ever touches a
// record that was handed to someone else. Each resident record carries the
// masked CRC32C of its bytes, set once its copy has landed and checked
// before anyone reads it back.
//
// Thread-safety: not thread-safe; owned by the block manager's thread.
#ifndef STRATA_KVTIER_HOST_POOL_H_
#define STRATA_KVTIER_HOST_POOL_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/thread_pool.h"
#include "engine/backend.h"

namespace strata::kvtier {

class HostPool {
 public:
  enum class State : uint8_t { kFree, kInFlight, kResident };

  // Allocates floor(budget_bytes / record_bytes) records through `backend`
  // (none when the budget is below one record).
  static absl::StatusOr<HostPool> Create(engine::Backend& backend, int64_t budget_bytes,
                                         int64_t record_bytes);
  HostPool() = default;

  int num_records() const { return static_cast<int>(state_.size()); }
  int num_free() const { return num_free_; }
  int64_t record_bytes() const { return record_bytes_; }
  // The distance between records: record_bytes rounded up to kKvHostUnit.
  int64_t record_stride() const { return stride_; }
  const engine::HostBuffer& buffer() const { return buffer_; }
  int64_t offset(int32_t record) const { return int64_t{record} * stride_; }
  uint8_t* data(int32_t record) const { return buffer_.data() + offset(record); }
  State state(int32_t record) const { return state_[record]; }
  int refs(int32_t record) const { return refs_[record]; }

  // Takes `count` free records into `records` (kInFlight, one reference
  // each, for the copy that fills them); false (taking none) when fewer are
  // free.
  bool Allocate(int count, std::vector<int32_t>& records);
  // Takes `count` consecutive free records (each as Allocate does) and
  // returns the first; -1 (taking none) when no such run is free.
  int32_t AllocateRun(int count);
  // A reference for a copy that reads a resident record (kInFlight).
  void Ref(int32_t record);
  // Drops a copy's reference. The last one makes a record resident again,
  // or free if it was released meanwhile.
  void Unref(int32_t record);
  // Computes and stores the record's CRC (after its copy landed).
  void Seal(int32_t record);
  // DataLoss naming the record when its bytes no longer match its CRC.
  absl::Status Verify(int32_t record) const;
  // Seal and Verify over many records, split over `pool`'s threads (null:
  // this thread): a 32k-token prompt's KV is gigabytes, whose CRCs take
  // one thread a good part of a second. Distinct records only.
  void SealAll(std::span<const int32_t> records, ThreadPool* pool);
  // The index in `records` of the first that fails its check;
  // records.size() when every one passes.
  size_t FirstCorrupt(std::span<const int32_t> records, ThreadPool* pool) const;
  // The masked CRC32C Seal stored.
  uint32_t crc(int32_t record) const { return crc_[record]; }
  // The owner gives the record up; it is free now, or when its last
  // reference goes.
  void Release(int32_t record);

 private:
  engine::HostBuffer buffer_;
  int64_t record_bytes_ = 0;
  int64_t stride_ = 0;
  std::vector<State> state_;
  std::vector<int32_t> refs_;
  std::vector<uint32_t> crc_;   // masked CRC32C of resident records
  std::vector<bool> released_;  // released while referenced
  int num_free_ = 0;
  int32_t cursor_ = 0;  // where the next search for free records starts
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_HOST_POOL_H_

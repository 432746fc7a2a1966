#include "kvtier/host_pool.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "common/status_macros.h"

namespace strata::kvtier {

absl::StatusOr<HostPool> HostPool::Create(engine::Backend& backend, int64_t budget_bytes,
                                          int64_t record_bytes) {
  if (record_bytes < 1) return absl::InvalidArgumentError("host pool: record size must be >= 1");
  HostPool pool;
  pool.record_bytes_ = record_bytes;
  const int64_t records = budget_bytes > 0 ? budget_bytes / record_bytes : 0;
  if (records > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("host pool: ", records, " records is too many"));
  }
  if (records > 0) {
    STRATA_ASSIGN_OR_RETURN(pool.buffer_, backend.AllocateHost(records * record_bytes));
  }
  pool.state_.assign(records, State::kFree);
  pool.refs_.assign(records, 0);
  pool.crc_.assign(records, 0);
  pool.released_.assign(records, false);
  pool.free_.reserve(records);
  for (int64_t r = records - 1; r >= 0; --r) pool.free_.push_back(static_cast<int32_t>(r));
  return pool;
}

bool HostPool::Allocate(int count, std::vector<int32_t>& records) {
  if (count < 0 || count > num_free()) return false;
  for (int i = 0; i < count; ++i) {
    const int32_t r = free_.back();
    free_.pop_back();
    state_[r] = State::kInFlight;
    refs_[r] = 1;
    released_[r] = false;
    records.push_back(r);
  }
  return true;
}

void HostPool::Ref(int32_t record) {
  state_[record] = State::kInFlight;
  ++refs_[record];
}

void HostPool::Unref(int32_t record) {
  if (--refs_[record] > 0) return;
  if (released_[record]) {
    state_[record] = State::kFree;
    released_[record] = false;
    free_.push_back(record);
  } else {
    state_[record] = State::kResident;
  }
}

void HostPool::Seal(int32_t record) {
  crc_[record] = MaskCrc(Crc32c(data(record), static_cast<size_t>(record_bytes_)));
}

absl::Status HostPool::Verify(int32_t record) const {
  const uint32_t computed = MaskCrc(Crc32c(data(record), static_cast<size_t>(record_bytes_)));
  if (computed == crc_[record]) return absl::OkStatus();
  return absl::DataLossError(absl::StrFormat(
      "host KV record %d (%d bytes) failed its CRC32C check (stored 0x%08x, computed 0x%08x)",
      record, record_bytes_, crc_[record], computed));
}

void HostPool::Release(int32_t record) {
  if (refs_[record] > 0) {
    released_[record] = true;
    return;
  }
  state_[record] = State::kFree;
  free_.push_back(record);
}

}  // namespace strata::kvtier

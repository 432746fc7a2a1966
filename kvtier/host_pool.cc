#include "kvtier/host_pool.h"

#include <algorithm>

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
  pool.stride_ =
      (record_bytes + engine::kKvHostUnit - 1) / engine::kKvHostUnit * engine::kKvHostUnit;
  const int64_t records = budget_bytes > 0 ? budget_bytes / pool.stride_ : 0;
  if (records > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("host pool: ", records, " records is too many"));
  }
  if (records > 0) {
    STRATA_ASSIGN_OR_RETURN(pool.buffer_, backend.AllocateHost(records * pool.stride_));
  }
  pool.state_.assign(records, State::kFree);
  pool.refs_.assign(records, 0);
  pool.crc_.assign(records, 0);
  pool.released_.assign(records, false);
  pool.num_free_ = static_cast<int>(records);
  return pool;
}

bool HostPool::Allocate(int count, std::vector<int32_t>& records) {
  if (count < 0 || count > num_free_) return false;
  const int32_t n = num_records();
  for (int taken = 0; taken < count; cursor_ = (cursor_ + 1) % n) {
    if (state_[cursor_] != State::kFree) continue;
    state_[cursor_] = State::kInFlight;
    refs_[cursor_] = 1;
    released_[cursor_] = false;
    records.push_back(cursor_);
    ++taken;
  }
  num_free_ -= count;
  return true;
}

int32_t HostPool::AllocateRun(int count) {
  if (count < 1 || count > num_free_) return -1;
  const int32_t n = num_records();
  int32_t run = 0;
  for (int32_t r = 0; r < n; ++r) {
    run = state_[r] == State::kFree ? run + 1 : 0;
    if (run < count) continue;
    const int32_t first = r - count + 1;
    for (int32_t x = first; x <= r; ++x) {
      state_[x] = State::kInFlight;
      refs_[x] = 1;
      released_[x] = false;
    }
    num_free_ -= count;
    return first;
  }
  return -1;
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
    ++num_free_;
  } else {
    state_[record] = State::kResident;
  }
}

void HostPool::Seal(int32_t record) {
  crc_[record] = MaskCrc(Crc32c(data(record), static_cast<size_t>(record_bytes_)));
}

void HostPool::SealAll(std::span<const int32_t> records, ThreadPool* pool) {
  if (pool == nullptr || records.size() < 2) {
    for (int32_t r : records) Seal(r);
    return;
  }
  pool->ParallelFor(static_cast<int64_t>(records.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) Seal(records[i]);
  });
}

size_t HostPool::FirstCorrupt(std::span<const int32_t> records, ThreadPool* pool) const {
  auto bad = [&](size_t i) {
    return MaskCrc(Crc32c(data(records[i]), static_cast<size_t>(record_bytes_))) !=
           crc_[records[i]];
  };
  if (pool == nullptr || records.size() < 2) {
    for (size_t i = 0; i < records.size(); ++i) {
      if (bad(i)) return i;
    }
    return records.size();
  }
  std::vector<char> failed(records.size(), 0);
  pool->ParallelFor(static_cast<int64_t>(records.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) failed[i] = bad(static_cast<size_t>(i));
  });
  return static_cast<size_t>(std::find(failed.begin(), failed.end(), 1) - failed.begin());
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
  ++num_free_;
}

}  // namespace strata::kvtier

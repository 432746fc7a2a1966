#include "kvtier/landing_area.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status_macros.h"

namespace strata::kvtier {

LandingArea::LandingArea(std::vector<int32_t> records, std::byte* base, int64_t stride,
                         int64_t record_bytes)
    : base_(base),
      stride_(stride),
      record_bytes_(record_bytes),
      all_records_(records.size()),
      free_(std::move(records)) {}

absl::Status LandingArea::Reserve(uint64_t id, int blocks, absl::Time lease_end) {
  if (blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", id, ": ", blocks, " blocks to reserve"));
  }
  absl::MutexLock lock(&mu_);
  if (transfers_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("KV transfer ", id, " is already reserved"));
  }
  if (static_cast<size_t>(blocks) > free_.size()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV transfer ", id, " needs ", blocks,
                                                     " host records to land in; ", free_.size(),
                                                     " of ", all_records_, " are free"));
  }
  Transfer t;
  t.lease_end = lease_end;
  t.states.assign(blocks, State::kReserved);
  for (int i = 0; i < blocks; ++i) {
    t.blocks.push_back({free_.back(), 0});
    free_.pop_back();
  }
  transfers_.emplace(id, std::move(t));
  return absl::OkStatus();
}

absl::StatusOr<LandingArea::Transfer*> LandingArea::HeldLocked(uint64_t id) {
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) {
    return absl::NotFoundError(
        absl::StrCat("KV transfer ", id, " is not reserved here (or its lease ended)"));
  }
  return &it->second;
}

absl::StatusOr<std::span<std::byte>> LandingArea::Place(uint64_t id, uint32_t index, uint32_t count,
                                                        size_t bytes, engine::KvCodecKind codec,
                                                        int tokens) {
  absl::MutexLock lock(&mu_);
  STRATA_ASSIGN_OR_RETURN(Transfer * held, HeldLocked(id));
  Transfer& t = *held;
  if (count != t.blocks.size()) {
    return absl::InvalidArgumentError(absl::StrCat("KV transfer ", id, ": sent as ", count,
                                                   " blocks, reserved for ", t.blocks.size()));
  }
  if (index >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", id, ": block ", index, " of ", count));
  }
  if (bytes == 0 || bytes > static_cast<size_t>(record_bytes_) ||
      (codec == engine::KvCodecKind::kBf16 && bytes != static_cast<size_t>(record_bytes_))) {
    return absl::InvalidArgumentError(absl::StrCat("KV transfer ", id, ": block of ", bytes,
                                                   " bytes; records hold ", record_bytes_));
  }
  if (t.states[index] != State::kReserved) {
    return absl::AlreadyExistsError(
        absl::StrCat("KV transfer ", id, ": block ", index, " was sent twice"));
  }
  t.states[index] = State::kWriting;
  Block& block = t.blocks[index];
  block.bytes = static_cast<int64_t>(bytes);
  block.codec = codec;
  block.tokens = tokens;
  return std::span<std::byte>(base_ + int64_t{block.record} * stride_, bytes);
}

void LandingArea::Landed(uint64_t id, uint32_t index, uint32_t crc, const absl::Status& status) {
  int32_t record = -1;
  int64_t bytes = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = transfers_.find(id);
    if (it == transfers_.end() || index >= it->second.states.size() ||
        it->second.states[index] != State::kWriting) {
      return;
    }
    record = it->second.blocks[index].record;
    bytes = it->second.blocks[index].bytes;
  }
  // Checked here, on the transport's thread as each block arrives, so that
  // loading a long prompt's KV does not stall the engine on gigabytes of
  // CRCs. The record stays this writer's until its state changes below.
  const bool intact = status.ok() && MaskCrc(Crc32c(base_ + int64_t{record} * stride_,
                                                    static_cast<size_t>(bytes))) == crc;
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  Transfer& t = it->second;
  t.states[index] = !status.ok() ? State::kFailed : intact ? State::kLanded : State::kCorrupt;
  t.blocks[index].crc = crc;
  if (t.dropped) DropLocked(it);
}

absl::StatusOr<std::span<std::byte>> LandingArea::PlacePart(uint64_t id, uint32_t index,
                                                            uint32_t count, int first_layer,
                                                            int part_layers, int layers,
                                                            int64_t layer_bytes,
                                                            engine::KvCodecKind codec, int tokens) {
  absl::MutexLock lock(&mu_);
  STRATA_ASSIGN_OR_RETURN(Transfer * held, HeldLocked(id));
  Transfer& t = *held;
  if (count != t.blocks.size() || index >= count) {
    return absl::InvalidArgumentError(absl::StrCat("KV transfer ", id, ": block ", index, " of ",
                                                   count, "; reserved for ", t.blocks.size()));
  }
  if (layers < 1 || layers > kMaxLayers || first_layer < 0 || part_layers < 1 ||
      first_layer + part_layers > layers || layer_bytes < 1 ||
      int64_t{layers} * layer_bytes > record_bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", id, ": block ", index, ": layers ", first_layer, " to ",
                     first_layer + part_layers - 1, " of ", layers, ", ", layer_bytes,
                     " bytes each; records hold ", record_bytes_));
  }
  auto found = t.parts.find(index);
  if (found == t.parts.end()) {
    if (t.states[index] != State::kReserved) {
      return absl::AlreadyExistsError(
          absl::StrCat("KV transfer ", id, ": block ", index, " was sent twice"));
    }
    found = t.parts.emplace(index, Parts{.layers = layers, .layer_bytes = layer_bytes}).first;
    t.states[index] = State::kWriting;
    Block& block = t.blocks[index];
    block.bytes = int64_t{layers} * layer_bytes;
    block.codec = codec;
    block.tokens = tokens;
  }
  Parts& parts = found->second;
  const Block& block = t.blocks[index];
  if (parts.layers != layers || parts.layer_bytes != layer_bytes || block.codec != codec ||
      block.tokens != tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", id, ": a part of block ", index,
                     " disagrees with the block's first part (layers, bytes, codec or tokens)"));
  }
  for (int l = first_layer; l < first_layer + part_layers; ++l) {
    if (parts.placed[l]) {
      return absl::AlreadyExistsError(
          absl::StrCat("KV transfer ", id, ": layer ", l, " of block ", index, " was sent twice"));
    }
  }
  for (int l = first_layer; l < first_layer + part_layers; ++l) parts.placed[l] = true;
  ++parts.writing;
  return std::span<std::byte>(base_ + int64_t{block.record} * stride_ + first_layer * layer_bytes,
                              static_cast<size_t>(part_layers * layer_bytes));
}

void LandingArea::PartLanded(uint64_t id, uint32_t index, int first_layer, int part_layers,
                             uint32_t crc, const absl::Status& status) {
  std::byte* data = nullptr;
  int64_t bytes = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = transfers_.find(id);
    if (it == transfers_.end()) return;
    auto parts = it->second.parts.find(index);
    if (parts == it->second.parts.end() || first_layer < 0 || part_layers < 1 ||
        first_layer + part_layers > parts->second.layers || !parts->second.placed[first_layer] ||
        parts->second.landed[first_layer] || parts->second.writing == 0) {
      return;
    }
    data = base_ + int64_t{it->second.blocks[index].record} * stride_ +
           first_layer * parts->second.layer_bytes;
    bytes = part_layers * parts->second.layer_bytes;
  }
  // As in Landed: the part's layers stay this writer's until `writing`
  // drops below.
  const bool intact = status.ok() && MaskCrc(Crc32c(data, static_cast<size_t>(bytes))) == crc;
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  Transfer& t = it->second;
  Parts& parts = t.parts.find(index)->second;
  --parts.writing;
  for (int l = first_layer; l < first_layer + part_layers; ++l) parts.landed[l] = true;
  if (!status.ok()) {
    parts.error = State::kFailed;
  } else if (!intact && parts.error != State::kFailed) {
    parts.error = State::kCorrupt;
  }
  if (parts.writing == 0 && parts.error != State::kLanded) {
    t.states[index] = parts.error;
  } else if (parts.writing == 0 && static_cast<int>(parts.landed.count()) == parts.layers) {
    t.states[index] = State::kLanded;
  }
  if (t.dropped) DropLocked(it);
}

absl::StatusOr<std::span<std::byte>> LandingArea::PlaceState(uint64_t id, uint32_t index,
                                                             uint32_t count, size_t bytes) {
  absl::MutexLock lock(&mu_);
  STRATA_ASSIGN_OR_RETURN(Transfer * held, HeldLocked(id));
  Transfer& t = *held;
  if (count == 0 || count > kMaxStateValues || index >= count ||
      (!t.values.empty() && count != t.values.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer ", id, ": planner state value ", index, " of ", count));
  }
  // Bounded by the KV it comes with (a clustering is a few percent of it).
  const int64_t budget = static_cast<int64_t>(t.blocks.size()) * record_bytes_;
  if (bytes == 0 || t.value_bytes + static_cast<int64_t>(bytes) > budget) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV transfer ", id, ": planner state of ", t.value_bytes + static_cast<int64_t>(bytes),
        " bytes; a transfer of ", t.blocks.size(), " pages takes at most ", budget));
  }
  if (t.values.empty()) t.values.resize(count);
  StateValue& value = t.values[index];
  if (value.state != State::kReserved) {
    return absl::AlreadyExistsError(
        absl::StrCat("KV transfer ", id, ": planner state value ", index, " was sent twice"));
  }
  value.state = State::kWriting;
  value.data.resize(bytes);
  t.value_bytes += static_cast<int64_t>(bytes);
  return std::as_writable_bytes(std::span<uint8_t>(value.data));
}

void LandingArea::StateLanded(uint64_t id, uint32_t index, uint32_t crc,
                              const absl::Status& status) {
  const uint8_t* data = nullptr;
  size_t bytes = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = transfers_.find(id);
    if (it == transfers_.end() || index >= it->second.values.size() ||
        it->second.values[index].state != State::kWriting) {
      return;
    }
    data = it->second.values[index].data.data();
    bytes = it->second.values[index].data.size();
  }
  // The buffer stays this writer's until its state changes below.
  const bool intact = status.ok() && MaskCrc(Crc32c(data, bytes)) == crc;
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  Transfer& t = it->second;
  t.values[index].state = !status.ok() ? State::kFailed : intact ? State::kLanded : State::kCorrupt;
  if (t.dropped) DropLocked(it);
}

std::vector<std::vector<uint8_t>> LandingArea::PlannerStateHeads(uint64_t id, size_t bytes) const {
  std::vector<std::vector<uint8_t>> heads;
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) return heads;
  for (const StateValue& value : it->second.values) {
    if (value.state != State::kLanded) continue;
    const size_t n = std::min(bytes, value.data.size());
    heads.emplace_back(value.data.begin(), value.data.begin() + static_cast<std::ptrdiff_t>(n));
  }
  return heads;
}

absl::StatusOr<std::vector<LandingArea::Block>> LandingArea::Take(
    uint64_t id, std::vector<std::vector<uint8_t>>* state) {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) {
    return absl::NotFoundError(
        absl::StrCat("KV transfer ", id, " is not held here (never reserved, or its lease ended)"));
  }
  Transfer& t = it->second;
  for (size_t i = 0; i < t.states.size(); ++i) {
    if (t.states[i] == State::kLanded) continue;
    const std::string where =
        absl::StrCat("KV transfer ", id, ": block ", i, " of ", t.states.size());
    const State state = t.states[i];
    DropLocked(it);  // may forget `t`
    if (state == State::kCorrupt) {
      return absl::DataLossError(
          absl::StrCat(where, " does not match its CRC32C (corrupt on the way)"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat(where, state == State::kFailed ? " failed on the way" : " has not arrived"));
  }
  for (size_t i = 0; i < t.values.size(); ++i) {
    if (t.values[i].state == State::kLanded) continue;
    const std::string where =
        absl::StrCat("KV transfer ", id, ": planner state value ", i, " of ", t.values.size());
    const State value_state = t.values[i].state;
    DropLocked(it);  // may forget `t`
    if (value_state == State::kCorrupt) {
      return absl::DataLossError(
          absl::StrCat(where, " does not match its CRC32C (corrupt on the way)"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        where, value_state == State::kFailed ? " failed on the way" : " has not arrived"));
  }
  if (state != nullptr) {
    state->clear();
    for (StateValue& value : t.values) state->push_back(std::move(value.data));
  }
  std::vector<Block> blocks = std::move(t.blocks);
  transfers_.erase(it);
  return blocks;
}

void LandingArea::Free(std::span<const int32_t> records) {
  absl::MutexLock lock(&mu_);
  free_.insert(free_.end(), records.begin(), records.end());
}

void LandingArea::Drop(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it != transfers_.end()) DropLocked(it);
}

void LandingArea::DropLocked(absl::flat_hash_map<uint64_t, Transfer>::iterator it) {
  Transfer& t = it->second;
  t.dropped = true;
  bool writing = false;
  for (const StateValue& value : t.values) writing |= value.state == State::kWriting;
  for (size_t i = 0; i < t.states.size(); ++i) {
    // A block in parts is written only while a part is in flight.
    auto parts = t.parts.find(static_cast<uint32_t>(i));
    const bool written =
        parts != t.parts.end() ? parts->second.writing > 0 : t.states[i] == State::kWriting;
    if (written) {
      writing = true;
    } else if (t.blocks[i].record >= 0) {
      free_.push_back(t.blocks[i].record);
      t.blocks[i].record = -1;
    }
  }
  if (!writing) transfers_.erase(it);
}

bool LandingArea::SenderDone(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) return false;
  it->second.sender_done = true;
  it->second.lease_end = absl::InfiniteFuture();
  return true;
}

bool LandingArea::SenderFailed(uint64_t id, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) return false;
  it->second.sender_error =
      status.ok() ? absl::UnknownError("the sender failed without saying why") : status;
  return true;
}

absl::StatusOr<bool> LandingArea::Ready(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  if (it == transfers_.end() || it->second.dropped) {
    return absl::NotFoundError(
        absl::StrCat("KV transfer ", id, " is not held here (never reserved, or its lease ended)"));
  }
  if (!it->second.sender_error.ok()) {
    const absl::Status error = it->second.sender_error;
    DropLocked(it);
    return absl::AbortedError(
        absl::StrCat("KV transfer ", id, ": its sender failed: ", error.ToString()));
  }
  return it->second.sender_done;
}

int LandingArea::Expire(absl::Time now) {
  absl::MutexLock lock(&mu_);
  int expired = 0;
  std::vector<uint64_t> ids;
  for (const auto& [id, t] : transfers_) {
    if (!t.dropped && t.lease_end < now) ids.push_back(id);
  }
  for (uint64_t id : ids) {
    DropLocked(transfers_.find(id));
    ++expired;
  }
  return expired;
}

bool LandingArea::Holds(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = transfers_.find(id);
  return it != transfers_.end() && !it->second.dropped;
}

int LandingArea::num_free() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(free_.size());
}

int LandingArea::num_transfers() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [id, t] : transfers_) n += !t.dropped;
  return n;
}

}  // namespace strata::kvtier

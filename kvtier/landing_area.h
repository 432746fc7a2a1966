// LandingArea: host records where KV sent by other workers lands.
//
// A decode worker receives a prompt's KV from the prefill worker that
// computed it, one page record per message (kvtier/kv_wire.h), on the KV
// transport's thread, while the block manager's thread runs steps. The
// area is a fixed set of the host tier's records, set aside when the block
// manager starts, so a block lands once, in pinned, device-mapped memory,
// and is copied from there straight into the sequence's pages
// (KvBlockManager::LoadImported).
//
// A transfer's life:
//   Reserve(id, blocks, lease)   before the prefill worker is asked to send;
//                                takes its records now (or fails at once)
//   Place(id, index) / Landed    per block, on the transport's thread (or
//   PlacePart / PartLanded       per part of a block's layers, when the
//                                prompt's last pages leave layer by layer)
//   PlaceState / StateLanded     per planner-state value (what the prefill
//                                worker's KV policy computed on the prompt),
//                                in heap memory the transfer owns, at most
//                                as many bytes as its records in all
//   SenderDone(id)               the sender's word that everything it sent
//                                has landed (a prefill worker answers once
//                                its sends are acknowledged); or
//   SenderFailed(id, status)     that it will not all land
//   Take(id)                     by the block manager, once Ready: every
//                                block and state value landed; the records
//                                are the caller's until Free
// A reservation still held when its lease ends (the request died, the
// prefill worker never sent) is dropped by Expire, and Drop drops one at
// once. A record that the transport is writing is freed only when its
// Landed comes, so no late write touches a record handed to another.
//
// Thread-safety: thread-safe.
#ifndef STRATA_KVTIER_LANDING_AREA_H_
#define STRATA_KVTIER_LANDING_AREA_H_

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/kv_codec.h"

namespace strata::kvtier {

class LandingArea {
 public:
  // The records `records` (indices into the host tier), each record_bytes
  // long at base + record * stride.
  LandingArea(std::vector<int32_t> records, std::byte* base, int64_t stride, int64_t record_bytes);

  struct Block {
    int32_t record = -1;
    uint32_t crc = 0;  // the payload CRC its header carried
    // The payload as placed: its bytes (at most record_bytes), codec and
    // the page's tokens.
    int64_t bytes = 0;
    engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
    int tokens = 0;
  };

  // ResourceExhausted when fewer than `blocks` records are free,
  // AlreadyExists for an id held already, InvalidArgument for blocks < 1.
  absl::Status Reserve(uint64_t id, int blocks, absl::Time lease_end);
  // Where block `index` of transfer `id` lands (`bytes`, at most
  // record_bytes, in `codec` with `tokens` tokens); the caller writes it and
  // then calls Landed. NotFound for an id not reserved (or expired),
  // InvalidArgument for a bad index, size or block count, AlreadyExists
  // for a block placed twice.
  absl::StatusOr<std::span<std::byte>> Place(uint64_t id, uint32_t index, uint32_t count,
                                             size_t bytes,
                                             engine::KvCodecKind codec = engine::KvCodecKind::kBf16,
                                             int tokens = 0);
  // Block `index` has landed with the payload CRC its header named (OK),
  // or failed on the way (then Take fails). Checks the payload against
  // the CRC here (the caller's thread, as each block arrives): a mismatch
  // makes Take fail with DataLoss naming the block.
  void Landed(uint64_t id, uint32_t index, uint32_t crc, const absl::Status& status);
  // Part of block `index`: layers [first_layer, first_layer + part_layers)
  // of a record of `layers` layers of `layer_bytes` each (layers *
  // layer_bytes at most record_bytes), in `codec` with `tokens` tokens; where
  // those layers go in the block's record. The block is whole once every
  // layer has landed. Errors as Place's, and InvalidArgument for layers out
  // of range or a part that disagrees with the block's earlier parts;
  // AlreadyExists for a layer sent twice or a block also sent whole.
  absl::StatusOr<std::span<std::byte>> PlacePart(uint64_t id, uint32_t index, uint32_t count,
                                                 int first_layer, int part_layers, int layers,
                                                 int64_t layer_bytes, engine::KvCodecKind codec,
                                                 int tokens);
  // Landed for a part PlacePart placed (its payload checked here as well).
  void PartLanded(uint64_t id, uint32_t index, int first_layer, int part_layers, uint32_t crc,
                  const absl::Status& status);
  static constexpr int kMaxLayers = 256;
  // The same for planner-state value `index` of `count` (count the same
  // for every value of the transfer, at most kMaxStateValues).
  absl::StatusOr<std::span<std::byte>> PlaceState(uint64_t id, uint32_t index, uint32_t count,
                                                  size_t bytes);
  void StateLanded(uint64_t id, uint32_t index, uint32_t crc, const absl::Status& status);
  static constexpr uint32_t kMaxStateValues = 4096;
  // Every block of the transfer, in order, once all have landed intact;
  // the transfer is gone and its records are the caller's (Free them once
  // read). DataLoss naming the first block that failed its CRC,
  // FailedPrecondition naming the first block missing or failed (the
  // transfer is dropped either way), NotFound for an id not held. The
  // planner-state values that came go to `state` (when not null).
  absl::StatusOr<std::vector<Block>> Take(uint64_t id,
                                          std::vector<std::vector<uint8_t>>* state = nullptr);
  void Free(std::span<const int32_t> records);
  // The first `bytes` bytes (or fewer) of each planner-state value of a
  // transfer that have landed intact, copied (a value's header, to decide
  // what to do with the transfer before taking it); empty when none or the
  // id is not held.
  std::vector<std::vector<uint8_t>> PlannerStateHeads(uint64_t id, size_t bytes) const;
  // The sender finished: everything it sent has landed (an error of a
  // block placed shows in Take). The transfer is held until taken or
  // dropped, with no lease: its request is the engine's now (which drops
  // it on every path). False when it is not held.
  bool SenderDone(uint64_t id);
  // The sender failed (`status`: why) and not everything will land; Ready
  // then says so. The records stay until the transfer is dropped. False
  // when it is not held.
  bool SenderFailed(uint64_t id, const absl::Status& status);
  // Whether Take may be called: true once SenderDone, false while the
  // sender runs; Aborted naming the sender's error after SenderFailed (the
  // transfer is dropped then), NotFound for an id not held.
  absl::StatusOr<bool> Ready(uint64_t id);
  // Drops a transfer (unknown ids are ignored).
  void Drop(uint64_t id);
  // Drops the transfers whose lease ended before `now`; returns how many.
  int Expire(absl::Time now);

  bool Holds(uint64_t id) const;
  int num_records() const { return static_cast<int>(all_records_); }
  int num_free() const;
  int num_transfers() const;
  int64_t record_bytes() const { return record_bytes_; }

 private:
  enum class State : uint8_t { kReserved, kWriting, kLanded, kFailed, kCorrupt };
  struct StateValue {
    std::vector<uint8_t> data;
    State state = State::kReserved;
  };
  // A block that comes in parts: its state is kWriting until every layer
  // has landed (kLanded) or, with no part in flight, one failed.
  struct Parts {
    int layers = 0;
    int64_t layer_bytes = 0;
    std::bitset<kMaxLayers> placed, landed;
    int writing = 0;               // parts placed and not landed
    State error = State::kLanded;  // kFailed or kCorrupt once a part was
  };
  struct Transfer {
    std::vector<Block> blocks;
    std::vector<State> states;
    absl::flat_hash_map<uint32_t, Parts> parts;  // by block, for those sent in parts
    // Planner state: sized by the first value placed (its count); each
    // value's buffer stays put while it is written.
    std::vector<StateValue> values;
    int64_t value_bytes = 0;
    absl::Time lease_end;
    bool dropped = false;  // waiting for blocks being written
    bool sender_done = false;
    absl::Status sender_error;  // SenderFailed's
  };
  // A transfer that is reserved and not dropped (NotFound otherwise), for
  // a block or value to be placed in.
  absl::StatusOr<Transfer*> HeldLocked(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the records of a dropped transfer that nothing writes, and
  // forgets it once none is written.
  void DropLocked(absl::flat_hash_map<uint64_t, Transfer>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::byte* base_;
  int64_t stride_, record_bytes_;
  size_t all_records_;
  mutable absl::Mutex mu_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Transfer> transfers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_LANDING_AREA_H_

// KvBlockManager: the one owner of a worker's KV memory.
//
// It hands out the GPU tier's pages (the model's paged caches, at fixed
// addresses so recorded CUDA graphs stay valid; one pool per page group,
// engine/kv_memory.h) and keeps a host tier of
// pinned, device-mapped records (HostPool). The batcher allocates through it
// (it implements engine::KvMemory), and preemption moves a sequence's KV to
// the host tier when there is room (SwapOut, the way vLLM's swap mode
// does), so the sequence later resumes where it stopped instead of
// recomputing its tokens; when the host tier is full it is recomputed.
//
// Copies run on the backend's copy stream:
//  - SwapOut enqueues the pages' copy to fresh host records and frees the
//    pages at once; compute that follows waits for the copy on the device
//    (Backend::ComputeAfterFence), never the host thread.
//  - Poll (once per step) seals records whose copy has landed: each gets
//    the masked CRC32C of its bytes.
//  - SwapIn checks every record against its CRC before anything is copied
//    back; a record that fails is lost (DataLoss), the sequence's host copy
//    is dropped and the batcher recomputes it, so a corrupt host block never
//    becomes tokens.
// A record is freed only when the last copy that reads it has finished
// (HostPool's reference counts), so cancelling a sequence mid-copy is safe.
//
// Thread-safety: not thread-safe; driven by the batcher's thread. stats()
// is read on that thread too (e.g. in AsyncEngine's after-step hook).
#ifndef STRATA_KVTIER_KV_BLOCK_MANAGER_H_
#define STRATA_KVTIER_KV_BLOCK_MANAGER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/kv_memory.h"
#include "engine/model.h"
#include "engine/page_allocator.h"
#include "kvtier/host_pool.h"
#include "kvtier/kv_layout.h"

namespace strata::kvtier {

struct KvBlockManagerOptions {
  // Bytes of the host tier (pinned memory, allocated at start); 0: none, and
  // preempted sequences are recomputed.
  int64_t host_bytes = 0;
};

class KvBlockManager final : public engine::KvMemory {
 public:
  struct Stats {
    int gpu_pages_total = 0;  // the lower group (every layer with one group)
    int gpu_pages_used = 0;
    int upper_pages_total = 0;  // the upper group (0 with one group)
    int upper_pages_used = 0;
    int64_t host_bytes_total = 0;
    int64_t host_bytes_used = 0;  // records not free, copies in flight included
    int swapped_sequences = 0;
    int copies_in_flight = 0;       // swap copies whose fence is not done
    int64_t swap_outs = 0;          // sequences moved to the host tier
    int64_t swap_outs_refused = 0;  // preemptions the host tier had no room for
    int64_t swap_ins = 0;           // sequences brought back
    int64_t bytes_to_host = 0;
    int64_t bytes_from_host = 0;
    int64_t host_records_lost = 0;  // records that failed their CRC check
  };

  // The layout is checked against the model's caches (KvLayout::Create) and
  // the host tier allocated now. The model must outlive the manager.
  static absl::StatusOr<std::unique_ptr<KvBlockManager>> Create(
      engine::Model* model, const KvBlockManagerOptions& options);

  // engine::KvMemory.
  int page_size() const override { return layout_.page_size(); }
  int num_pages(engine::PageGroup group) const override { return pool(group).num_pages(); }
  int num_free_pages(engine::PageGroup group) const override { return pool(group).num_free(); }
  bool AllocatePages(engine::PageGroup group, int count, std::vector<int32_t>& pages) override;
  absl::Status FreePages(engine::PageGroup group, std::vector<int32_t>& pages) override;
  absl::StatusOr<bool> SwapOut(int64_t seq_id, engine::SequencePages& pages, int tokens) override;
  int SwapInPages(int64_t seq_id, engine::PageGroup group) const override;
  absl::StatusOr<bool> SwapIn(int64_t seq_id, engine::SequencePages& pages) override;
  void DropSwapped(int64_t seq_id) override;
  absl::Status Poll() override;

  // ---- Host-homed blocks (KvPolicyRunner) ----------------------------------
  // A run of host records that one offload of a sequence's blocks fills;
  // the device writes and reads it only inside steps, which end
  // synchronised, so freeing between steps is safe.
  struct HostRegion {
    int32_t first_record = -1;
    int32_t records = 0;
    int64_t offset = 0;  // bytes into host_buffer()
    int64_t bytes = 0;
  };
  // Nullopt when no run of records that large is free.
  std::optional<HostRegion> AllocateHostRegion(int64_t bytes);
  void FreeHostRegion(const HostRegion& region);
  const engine::HostBuffer& host_buffer() const { return host_.buffer(); }

  const KvLayout& layout() const { return layout_; }
  Stats stats() const;
  // Every GPU page and host record free and no copy in flight: nothing a
  // sequence held is left behind.
  bool Idle() const;
  // The host records holding a swapped sequence's KV, in page order (empty
  // when it is not swapped); with host_pool(), for tests that inspect them.
  std::vector<int32_t> HostRecordsOf(int64_t seq_id) const;
  HostPool& host_pool() { return host_; }

 private:
  struct Swapped {
    std::vector<int32_t> records;  // one per page, in page order
    // With two groups: the pages whose upper layers were off the GPU (the
    // record holds no upper layers for them).
    std::vector<bool> upper_off_gpu;
    int tokens = 0;
    engine::CopyFence fence = engine::kFenceDone;  // the copy to the host
    bool sealed = false;                           // copy landed, CRCs set
  };
  // Records a copy still uses, freed (one reference each) when it is done.
  struct InFlight {
    engine::CopyFence fence;
    std::vector<int32_t> records;
  };

  KvBlockManager(engine::Model* model, KvLayout layout, HostPool host);
  // Waits for the swap-out copy if needed, then seals its records.
  absl::Status Seal(Swapped& swapped);

  engine::Model* model_;
  KvLayout layout_;
  engine::PageAllocator& pool(engine::PageGroup g) {
    return g == engine::PageGroup::kLower ? pages_ : upper_pages_;
  }
  const engine::PageAllocator& pool(engine::PageGroup g) const {
    return g == engine::PageGroup::kLower ? pages_ : upper_pages_;
  }
  engine::PageAllocator pages_, upper_pages_;
  HostPool host_;
  absl::flat_hash_map<int64_t, Swapped> swapped_;
  std::vector<InFlight> in_flight_;
  std::vector<engine::RowCopy> copies_;  // scratch
  Stats counters_;                       // the cumulative fields
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_BLOCK_MANAGER_H_

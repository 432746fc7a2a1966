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
// With an SSD tier (SsdStore), swapped sequences go further down whole
// when the host tier fills: Poll starts moving the oldest swapped
// sequence's records to the SSD once more than ssd_high_water of the host
// records are in use, or a swap-out found too few free, on I/O threads
// (RecordMover); its host records are freed when the writes have landed.
// SwapIn of a sequence on the SSD starts bringing it back into host
// records and returns false (not yet); Poll also brings the oldest ones
// back ahead of need while the host tier is below half the high-water
// mark. A value that fails its check on the way up loses the sequence
// (SwapIn: DataLoss, recomputed); a full SSD budget leaves the sequence in
// the host tier. Its SSD keys are deleted when it comes back up, is
// dropped, or the manager goes.
//
// Prefix reuse (prefix_bytes > 0): a sequence's whole pages are copied to
// host records (StorePrefix: its prompt's when the prefill completes, the
// rest when it ends; pages stored already are kept, not copied again),
// indexed by content (PrefixIndex's
// chain keys under prefix_space), and a later sequence whose tokens start
// with them gets that KV copied into its pages instead of computing it
// (LoadPrefix). The stored prefixes take at most prefix_bytes of the host
// tier, least recently used out first; a record that fails its CRC is
// dropped and its part of the prompt computed. With two page groups a
// record holds a page of both, and a prefix ends at the first page whose
// upper layers are off the GPU.
// With an SSD tier and ssd_prefix_bytes > 0, prefix pages also go down to
// the SSD (ssd_admission: when the host store evicts them, or as soon as
// they are stored), each value headed by its chain key, tokens and CRC, so
// they outlive the process: a new manager indexes what its predecessor
// stored. A prompt whose prefix continues on the SSD gets those pages read
// back into host records on the I/O threads (LoadPrefix answers
// Unavailable until they are up; the caller asks again), checked against
// their header, then loaded as above. The SSD prefixes take at most
// ssd_prefix_bytes, least recently used out first.
// The prefix code lives in kv_block_manager_prefixes.cc.
//
// Disaggregated serving (kv_block_manager_transfer.cc). On a prefill
// worker, a prompt's pages are copied to host records as its prefill
// chunks complete them (ExportKv; the final call adds the rest) and, once
// sealed, handed to the export sink in order (the prefill service, which
// sends them to the decode worker while the prompt's next chunks compute);
// the records are held until the sink's owner calls ReleaseExport (from
// any thread), or the sequence ends without its final export
// (DropExport). On a decode worker, KV arriving from prefill workers lands
// in a set of host records set aside at start (landing_area(), written and
// CRC-checked block by block on the transport's thread), and LoadImported
// copies it into the sequence's pages, all at once or a share per call
// while other sequences run (a long prompt's KV is gigabytes: loaded at
// once it would hold their next step up that long). Reservations whose
// lease ends are dropped in Poll. With the final part of an export come
// the KV policy's values computed on the prompt (AddExportPlannerState);
// when they are expected (ExpectExportPlannerState) and come after the
// pages' last part, that part is not final and a final part of the values
// alone follows. With an import they go to the caller
// (TakeImportedPlannerState). With an ImportAdmitter (a decode worker's KV
// policy whose ClusterKV clusters live in the host tier), the upper layers
// of the tokens those values cluster go from the landing records straight
// into the host tier when the import starts, and their upper pages are
// never allocated (kPageOffGpu).
//
// Thread-safety: not thread-safe; driven by the batcher's thread. stats()
// is read on that thread too (e.g. in AsyncEngine's after-step hook).
#ifndef STRATA_KVTIER_KV_BLOCK_MANAGER_H_
#define STRATA_KVTIER_KV_BLOCK_MANAGER_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/kv_memory.h"
#include "engine/model.h"
#include "engine/page_allocator.h"
#include "kvtier/host_pool.h"
#include "kvtier/kv_device.h"
#include "kvtier/kv_layout.h"
#include "kvtier/landing_area.h"
#include "kvtier/prefix_index.h"
#include "kvtier/profile.h"
#include "kvtier/record_mover.h"
#include "kvtier/ssd_store.h"

namespace strata::kvtier {

struct KvBlockManagerOptions {
  // Bytes of the host tier (pinned memory, allocated at start); 0: none, and
  // preempted sequences are recomputed.
  int64_t host_bytes = 0;
  // The SSD tier below the host tier (opened by the caller, and kept open
  // while the manager lives); null: none.
  SsdStore* ssd = nullptr;
  // Share of the host records in use above which swapped sequences move
  // down to the SSD, oldest first.
  double ssd_high_water = 0.75;
  int io_threads = 2;  // threads moving records to and from the SSD
  // How long a sequence or a prompt waits for the SSD tier. Past it a
  // paused sequence being read up is recomputed from its tokens (SwapIn
  // answers DataLoss), one being written down resumes from its host
  // records, and a prompt computes the part of its stored prefix still
  // being read. The stalled reads and writes keep their host records until
  // they return, then free them.
  std::chrono::milliseconds ssd_read_timeout{30000};
  // How long an export whose pages have all gone waits for the planner
  // state it expects (ExpectExportPlannerState) before it ends without it
  // (the decode worker then computes it): a planner that failed must not
  // hold the export, and the request, until the receiver's lease ends.
  std::chrono::milliseconds planner_state_timeout{5000};
  // The parts of consecutive layers a prompt's last chunk of pages leaves
  // in, each copied out as the step's forward completes its layers
  // (ExportByLayer) and sent as its own messages (kv_wire.h), so that what
  // is left to send after the prompt's last step is the last part's. 1:
  // the last chunk's pages leave whole after the step. Needs one rank and
  // one page group (else whole too).
  int export_layer_parts = 4;
  // Tests only: called on an I/O thread before each SSD read.
  std::function<void()> ssd_before_read = nullptr;
  // Threads that compute and check the host records' CRCs when many are
  // sealed or loaded at once (a long prompt's prefix, a long swap).
  int crc_threads = 8;
  // Host bytes stored prompt prefixes may take (part of host_bytes); 0:
  // no prefix reuse. prefix_space names what may share KV (the model and
  // its KV format): prefixes stored under another are never used.
  int64_t prefix_bytes = 0;
  std::string prefix_space = {};
  // SSD bytes stored prefixes may take (with `ssd` and prefix_bytes; part
  // of the store's budget); 0: prefixes stay in the host tier. When a
  // prefix page goes down (a profile's tiers.ssd_write_admission):
  //  kNever: never; kCold: when the host store evicts it for a newer one;
  //  kAlways: once stored (write-through; the host copy is then a cache).
  int64_t ssd_prefix_bytes = 0;
  enum class SsdAdmission { kNever, kCold, kAlways };
  SsdAdmission ssd_admission = SsdAdmission::kCold;
  // Host bytes set aside (part of host_bytes) for KV that prefill workers
  // send this worker (decode workers; landing_area()); 0: none.
  int64_t landing_bytes = 0;
  // Per workload (SequencePages::workload, one per profile): the host bytes
  // its paused sequences and host-homed clusters may hold together (its
  // profile's host_bytes less its prefix_bytes); at that line its swap-outs
  // and regions are refused, whatever the others leave free. Negative, or
  // no entry: no line of its own (a profile without host_bytes).
  std::vector<int64_t> workload_host_bytes = {};
  // The same on the SSD tier (its profile's ssd_bytes less its
  // ssd_prefix_bytes): its paused sequences moved down and the host-homed
  // clusters charged to it (ChargeSsd). Past it a paused sequence stays in
  // host memory and a batch of clusters is not sent down.
  std::vector<int64_t> workload_ssd_bytes = {};
  // The codec a workload's exported pages travel in (its profile's codec;
  // no entry: raw, the caches' own bytes). See kvtier/kv_wire.h.
  std::vector<engine::KvCodecKind> workload_wire_codec = {};
  // "never", "cold" or "always".
  static absl::StatusOr<SsdAdmission> ParseSsdAdmission(std::string_view name);
};

// Takes the upper layers of part of an imported prompt's KV straight from
// the landing records into a lower tier (a KV policy's host-homed clusters:
// KvPolicyRunner), so that the upper pages of those tokens are never
// allocated, copied to the GPU, reordered and offloaded again. Called by
// KvBlockManager::LoadImported on its thread, between steps.
class ImportAdmitter {
 public:
  // A page of an imported prompt as it landed: a host record, raw (kBf16:
  // the caches' own bytes, its CRC checked as it landed) or coded (one
  // block per layer and KV head, each with its CRC, checked when decoded).
  struct LandedPage {
    const uint8_t* bytes = nullptr;
    engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
    int tokens = 0;
  };
  struct Range {
    int begin = 0, end = 0;  // tokens; empty: none
  };
  virtual ~ImportAdmitter() = default;
  // The tokens whose upper-layer KV Admit would take for sequence seq_id
  // (its workload; `tokens` prompt tokens, whose first decode step follows;
  // the first kStateHeadBytes of each value of the prefill worker's planner
  // state): cheap, nothing reserved. Empty when it would take none (then
  // the whole prompt goes to the GPU as before).
  static constexpr size_t kStateHeadBytes = 64;
  virtual Range PlanAdmission(int64_t seq_id, int workload, int tokens,
                              std::span<const std::vector<uint8_t>> state_heads) = 0;
  // Reserves what admitting the planned range needs (its pool slot, GPU
  // ring pages, host regions), so that Admit cannot run out: false (nothing
  // reserved) when something is short. Held until Admit's sequence is
  // released or DropAdmitted.
  virtual bool ReserveAdmission(int64_t seq_id, int workload, int tokens) = 0;
  // Takes what PlanAdmission named, from `pages` (every page of the
  // prompt). On success the sequence holds it until its KV policy releases
  // the sequence (or DropAdmitted). An error takes nothing and drops the
  // reservation: DataLoss (a coded block or a clustering that fails its
  // check) fails the import; another lets the pages go to the GPU.
  virtual absl::StatusOr<Range> Admit(int64_t seq_id, int workload, int tokens,
                                      std::span<const std::vector<uint8_t>> state,
                                      std::span<const LandedPage> pages) = 0;
  // Admit may leave its encoding running on threads of its own, reading
  // `pages` (which stay put until this says it is done or DropAdmitted
  // returns): true once done and applied; false while it runs; an error
  // (DataLoss for a block or clustering that failed its check) when it
  // failed, the admission then dropped and the import to fail.
  virtual absl::StatusOr<bool> AdmitDone(int64_t seq_id) = 0;
  // A sequence reserved or admitted whose import then failed or was
  // dropped: what it holds is freed (nothing for one it does not hold),
  // once its encoding, if running, has stopped.
  virtual void DropAdmitted(int64_t seq_id) = 0;
};

class KvBlockManager final : public engine::KvMemory {
 public:
  struct Stats {
    int gpu_pages_total = 0;  // the lower group (every layer with one group)
    int gpu_pages_used = 0;
    int upper_pages_total = 0;  // the upper group (0 with one group)
    int upper_pages_used = 0;
    int64_t host_bytes_total = 0;  // the landing area's records excluded (below)
    int64_t host_bytes_used = 0;   // records not free, copies in flight included
    int swapped_sequences = 0;
    int copies_in_flight = 0;       // swap copies whose fence is not done
    int64_t swap_outs = 0;          // sequences moved to the host tier
    int64_t swap_outs_refused = 0;  // preemptions the host tier had no room for
    int64_t swap_ins = 0;           // sequences brought back
    int64_t bytes_to_host = 0;
    int64_t bytes_from_host = 0;
    int64_t host_records_lost = 0;  // records that failed their CRC check
    // Records read up whose rows the device's CRCs did not cover whole (a
    // record's upper layers off the GPU), checked in host memory instead:
    // one core's pass over the record, an order slower than the device.
    int64_t records_checked_in_host_memory = 0;
    // The SSD tier.
    int sequences_on_ssd = 0;
    int ssd_moves_in_flight = 0;
    int64_t ssd_swap_outs = 0;          // swapped sequences moved down
    int64_t ssd_swap_outs_refused = 0;  // ... that did not fit its budget (stayed in host)
    int64_t ssd_swap_ins = 0;           // sequences brought back up
    int64_t ssd_sequences_lost = 0;     // ... whose values failed a check (recomputed)
    int64_t ssd_bytes_written = 0;
    int64_t ssd_bytes_read = 0;
    int64_t ssd_swap_in_micros = 0;  // time the swap-ins took on the I/O threads
    // Reads from the SSD given up on after ssd_read_timeout: swap-ins
    // (sequence recomputed) and prefix pages (computed).
    int64_t ssd_reads_timed_out = 0;
    // Prefix reuse.
    int64_t prefix_bytes_used = 0;  // host bytes of stored prefix pages
    int64_t prefix_lookups = 0;     // sequences that asked
    int64_t prefix_hits = 0;        // ... and got some of their KV
    int64_t prefix_tokens_loaded = 0;
    int64_t prefix_pages_stored = 0;
    int64_t prefix_pages_evicted = 0;
    int64_t prefix_records_lost = 0;  // failed their CRC (dropped, recomputed)
    // Tokens the prefix store can keep, host and SSD tiers together.
    int64_t prefix_capacity_tokens = 0;
    // Prefixes on the SSD tier.
    int64_t ssd_prefix_bytes_used = 0;     // stored there now (values and CRCs)
    int ssd_prefix_pages = 0;              // ... pages
    int64_t ssd_prefix_pages_written = 0;  // pages written down
    int64_t ssd_prefix_pages_refused = 0;  // ... that did not fit or failed to write
    int64_t ssd_prefix_pages_evicted = 0;  // deleted for newer ones (budget)
    int64_t ssd_prefix_hits = 0;           // lookups that found pages there
    int64_t ssd_prefix_pages_read = 0;     // pages brought back up
    int64_t ssd_prefix_pages_lost = 0;     // ... that failed a check (deleted, computed)
    int64_t ssd_prefix_bytes_read = 0;
    int64_t ssd_prefix_read_micros = 0;    // the reads' time on the I/O threads
    int64_t ssd_prefix_pages_indexed = 0;  // found at start (stored by a predecessor)
    // Disaggregated serving.
    int64_t kv_exports = 0;         // prompts whose KV was handed over
    int64_t kv_export_bytes = 0;    // ... host bytes copied
    int exports_held = 0;           // ... not yet released by the sender
    int64_t kv_imports = 0;         // transfers loaded into pages
    int64_t kv_import_bytes = 0;    // ... their bytes
    int64_t kv_imports_failed = 0;  // ... that failed (missing or corrupt blocks)
    // ... whose upper layers of some tokens went straight to a lower tier
    // (ImportAdmitter), and the upper pages they did not take.
    int64_t kv_imports_admitted = 0;
    int64_t kv_import_upper_pages_saved = 0;
    int64_t kv_transfers_expired = 0;  // reservations whose lease ended first
    int landing_records_total = 0;
    int landing_records_free = 0;
  };

  // The layout is checked against the model's caches (KvLayout::Create) and
  // the host tier allocated now. The model must outlive the manager.
  static absl::StatusOr<std::unique_ptr<KvBlockManager>> Create(
      engine::Model* model, const KvBlockManagerOptions& options);
  // Waits for the SSD moves that are running, and deletes the SSD keys of
  // the sequences still swapped.
  ~KvBlockManager() override;

  // engine::KvMemory.
  int page_size() const override { return layout_.page_size(); }
  int num_pages(engine::PageGroup group) const override { return pool(group).num_pages(); }
  int num_free_pages(engine::PageGroup group) const override { return pool(group).num_free(); }
  bool AllocatePages(engine::PageGroup group, int count, std::vector<int32_t>& pages) override;
  absl::Status FreePages(engine::PageGroup group, std::vector<int32_t>& pages) override;
  absl::StatusOr<bool> SwapOut(int64_t seq_id, engine::SequencePages& pages, int tokens) override;
  int SwapInPages(int64_t seq_id, engine::PageGroup group) const override;
  absl::StatusOr<bool> SwapIn(int64_t seq_id, engine::SequencePages& pages) override;
  bool SwapMoving(int64_t seq_id) const override;
  void DropSwapped(int64_t seq_id) override;
  absl::Status Poll() override;
  bool Settling() const override;
  std::vector<uint32_t> LoadedPrefixCrcs() const override { return loaded_crcs_; }
  // Unavailable while part of the prefix comes up from the SSD tier.
  absl::StatusOr<int> LoadPrefix(std::span<const int32_t> tokens,
                                 engine::SequencePages& pages) override;
  absl::Status StorePrefix(std::span<const int32_t> tokens,
                           const engine::SequencePages& pages) override;
  uint64_t LastPrefixStore() const override { return last_prefix_store_; }
  // Seals the stores whose copies are done first (a call between polls
  // sees them).
  std::optional<std::vector<uint32_t>> PrefixStoreCrcs(uint64_t id) override;
  // Waits (polling) until the prefix pages being stored have landed in
  // their tiers (host copies sealed, SSD writes done); false when `timeout`
  // passed first. For a clean exit: the destructor drops SSD writes still
  // queued. Called on the thread that drives the manager, or after it
  // stopped.
  absl::StatusOr<bool> FinishPrefixWrites(std::chrono::milliseconds timeout);

  // ---- Disaggregated serving (see the file comment) ------------------------
  absl::Status ExportKv(uint64_t key, std::span<const int32_t> tokens,
                        const engine::SequencePages& pages, bool final) override;
  bool ExportByLayer(uint64_t key, std::span<const int32_t> tokens,
                     const engine::SequencePages& pages) override;
  absl::Status LayerKvWritten(int layer) override;
  absl::Status LayersEnqueued() override;
  absl::Status FinishLayerExports() override;
  void DropExport(uint64_t key) override;
  // Held with the export and handed over with its final part.
  void AddExportPlannerState(uint64_t key, std::vector<std::vector<uint8_t>> state) override;
  void ExpectExportPlannerState(uint64_t key) override;
  absl::StatusOr<bool> LoadImported(int64_t seq_id, uint64_t transfer_id,
                                    std::span<const int32_t> tokens, engine::SequencePages& pages,
                                    int64_t max_bytes) override;
  void DropImported(uint64_t transfer_id) override;
  std::vector<std::vector<uint8_t>> TakeImportedPlannerState() override {
    return std::move(imported_planner_state_);
  }
  bool ImportedKvExact() const override { return imported_exact_; }
  // Part of a prompt's KV, sealed in host records, ready to send: one
  // block per token page (a host record: kv_layout.h), or the same layers
  // of each page (part_layers > 0: parts of the pages that ExportByLayer
  // sent), with its masked CRC32C, from page first_block on; `final` on the
  // last part (which may have no blocks).
  struct ExportedKv {
    uint64_t key = 0;
    int first_block = 0;
    bool final = false;
    struct Block {
      std::span<const std::byte> data;
      uint32_t crc = 0;  // masked CRC32C of `data` (KvPayloadCrc)
      int tokens = 0;    // tokens of the page it holds
      engine::KvCodecKind codec = engine::KvCodecKind::kBf16;  // of `data`
      // The record's layers [first_layer, first_layer + part_layers) alone
      // (part_layers 0: the whole record).
      int first_layer = 0;
      int part_layers = 0;
    };
    std::vector<Block> blocks;
    // On the final part: what the KV policy computed on the prompt
    // (AddExportPlannerState), to send after the blocks.
    std::vector<std::span<const std::byte>> planner_state;
  };
  // Called on the manager's thread (in Poll) for each part of an export
  // once sealed, in order; must return quickly. The blocks stay valid until
  // ReleaseExport(key).
  // Thread-safe: may be set while the manager's thread runs.
  using ExportSink = std::function<void(ExportedKv exported)>;
  void set_export_sink(ExportSink sink) {
    absl::MutexLock lock(&released_mu_);
    export_sink_ = std::move(sink);
  }
  // Gives an export's records back (its blocks were sent, or never will
  // be). Thread-safe: the records are freed by the next Poll. Destroy the
  // manager only once nothing reads an export.
  void ReleaseExport(uint64_t key);
  // Decode workers: who may take imported prompts' upper layers straight
  // into a lower tier (null: nobody; every page goes to the GPU). Set
  // between steps; `admitter` must outlive its use or be unset first.
  void set_import_admitter(ImportAdmitter* admitter) { admitter_ = admitter; }
  // Where KV sent by prefill workers lands (null without landing_bytes).
  // Thread-safe, and outlives nothing: the transport's receiver must stop
  // before the manager goes.
  LandingArea* landing_area() { return landing_.get(); }
  // Bytes of one block on the wire (a host record).
  int64_t block_bytes() const { return layout_.record_bytes(); }
  // Forgets every prefix stored in the host tier (their records are freed
  // once no copy reads them); with cold SSD admission they go down first.
  void ClearPrefixes();

  // ---- Host-homed blocks (KvPolicyRunner) ----------------------------------
  // A run of host records that one offload of a sequence's blocks fills;
  // the device writes and reads it only inside steps, which end
  // synchronised, so freeing between steps is safe.
  struct HostRegion {
    int32_t first_record = -1;
    int32_t records = 0;
    int64_t offset = 0;  // bytes into host_buffer()
    int64_t bytes = 0;
    int workload = -1;  // charged to (-1: none)
  };
  // Nullopt when no run of records that large is free, or `workload`
  // (-1: none) would pass its line (workload_host_bytes).
  std::optional<HostRegion> AllocateHostRegion(int64_t bytes, int workload = -1);
  void FreeHostRegion(const HostRegion& region);
  const engine::HostBuffer& host_buffer() const { return host_.buffer(); }
  // The SSD tier (null: none), and a fresh owner id for a sequence's values
  // there (never reused, shared with the swaps' ids).
  SsdStore* ssd() const { return options_.ssd; }
  uint64_t NewSsdOwner() { return next_swap_id_++; }
  // Share of the host tier's records in use (the landing area excluded).
  double HostUsedShare() const;
  // Host bytes a workload holds (its swapped sequences' records in host
  // memory and its regions), and the share of its line they are (0 without
  // a line).
  int64_t WorkloadHostBytes(int workload) const;
  double WorkloadHostShare(int workload) const;
  // SSD bytes a workload holds (its paused sequences there and what was
  // charged to it). ChargeSsd adds `bytes` (host-homed clusters about to be
  // written) unless that passes its line (false: nothing charged);
  // RefundSsd gives them back when they are deleted or refused.
  int64_t WorkloadSsdBytes(int workload) const;
  bool ChargeSsd(int workload, int64_t bytes);
  void RefundSsd(int workload, int64_t bytes);

  const KvLayout& layout() const { return layout_; }
  Stats stats() const;
  // Every GPU page and host record free and no copy in flight, apart from
  // stored prefixes: nothing a sequence held is left behind.
  bool Idle() const;
  // The host records holding a swapped sequence's KV, in page order (empty
  // when it is not swapped); with host_pool(), for tests that inspect them.
  std::vector<int32_t> HostRecordsOf(int64_t seq_id) const;
  // The SSD owner id of a swapped sequence's values while they are on the
  // SSD (nullopt otherwise), for tests that inspect them.
  std::optional<uint64_t> SsdSwapIdOf(int64_t seq_id) const;
  HostPool& host_pool() { return host_; }

 private:
  // Where a swapped sequence's KV is.
  enum class Tier {
    kHost,     // in `records`
    kToSsd,    // in `records`, being written to the SSD (`job`)
    kSsd,      // on the SSD only (no records)
    kFromSsd,  // being read into `records` (`job`)
    kLost,     // a value failed its check on the way up: recompute
  };
  struct Swapped {
    std::vector<int32_t> records;  // one per page, in page order (kSsd: none)
    int pages = 0;                 // records it takes in the host tier
    // With two groups: the pages whose upper layers were off the GPU (the
    // record holds no upper layers for them).
    std::vector<bool> upper_off_gpu;
    int tokens = 0;
    engine::CopyFence fence = engine::kFenceDone;  // the copy to the host
    bool sealed = false;                           // copy landed, CRCs set
    Tier tier = Tier::kHost;
    uint64_t swap_id = 0;  // names its SSD values (never reused)
    uint64_t job = 0;      // the move in flight (kToSsd, kFromSsd)
    // The records' CRCs from their swap-out, kept while they are on the SSD:
    // what comes back up must match them (checked end to end, beside the
    // store's own check of what it wrote).
    std::vector<uint32_t> crcs;
    // Brought back up from the SSD (moving it down again would chase the
    // move up), or refused by it: it stays in the host tier until it is
    // swapped in.
    bool stays_in_host = false;
    int workload = 0;  // SequencePages::workload
  };
  // An SSD move in flight: whose it is, and the records it holds a
  // reference to (freed when it is done if their owner went meanwhile).
  struct Move {
    int64_t seq_id;
    uint64_t swap_id;
    bool down;
    std::vector<int32_t> records;
    std::chrono::steady_clock::time_point started;
  };
  // Whether the move of a swapped sequence (kToSsd, kFromSsd) has run past
  // ssd_read_timeout.
  bool MoveTimedOut(const Swapped& swapped) const;
  // Records a copy still uses, freed (one reference each) when it is done.
  struct InFlight {
    engine::CopyFence fence;
    std::vector<int32_t> records;
  };

  KvBlockManager(engine::Model* model, KvLayout layout, HostPool host,
                 const KvBlockManagerOptions& options);
  // Enqueues copies_ between the caches and the host tier and orders the
  // compute enqueued later after them. On an error nothing is left running
  // (a copy that started is waited for).
  absl::StatusOr<engine::CopyFence> EnqueueCopies(bool to_host);
  // After EnqueueCopies(to_host = false) of `records` (copies_ holds their
  // rows, record by record, as KvLayout::AppendRecordCopies lists them):
  // the index of the first record whose bytes, where they landed on the
  // device, fail the CRC it was sealed with; records.size() when all pass.
  // The device checksums each row (Backend::ChecksumRows) and the row CRCs
  // are folded into the record's; a record whose rows do not cover it whole
  // (upper layers off the GPU) is checked in host memory. Waits for the
  // copies.
  absl::StatusOr<size_t> FirstCorruptCopied(std::span<const int32_t> records);
  // Records a workload's line allows (-1: no line).
  int64_t WorkloadRecordLimit(int workload) const;
  // Waits for the swap-out copy if needed, then seals its records.
  absl::Status Seal(Swapped& swapped);
  // SSD tier: applies finished moves, then starts moves down (host too
  // full) and up (room for the oldest on the SSD).
  absl::Status PollSsd();
  void StartMove(int64_t seq_id, Swapped& swapped, bool down);
  void FinishMove(const RecordMover::Done& done);
  // The swapped sequence swapped out first among those in `tier`.
  std::pair<const int64_t, Swapped>* Oldest(Tier tier);

  // Prefixes (kv_block_manager_prefixes.cc).
  // Evicts the least recently used unreferenced host prefix page, writing
  // it down first when `to_ssd` and the admission is cold; false when none.
  bool EvictHostPrefix(bool to_ssd);
  // Seals and indexes stored prefixes whose copy landed (writing them
  // down with write-through admission).
  absl::Status SealPendingPrefixes();
  // Indexes the prefixes a predecessor left on the SSD (and deletes what
  // is over budget).
  absl::Status IndexSsdPrefixes();
  // Starts writing host prefix records down (each referenced until done);
  // pages already there or that do not fit the budget are skipped.
  // release_records: the pages were evicted, so their records are given up
  // now (freed when the write is done, or at once if skipped).
  void WritePrefixesDown(std::vector<PrefixIndex::Evicted> pages, bool release_records);
  // Deletes the least recently used SSD prefix not moving; false when none.
  bool EvictSsdPrefix();
  // Starts reading chain[first, first + count) up into host records.
  void ReadPrefixesUp(std::span<const PrefixKey> chain, std::span<const int32_t> tokens,
                      size_t first, size_t count);
  void FinishPrefixMove(const RecordMover::Done& done);
  // The header stored before a prefix page on the SSD.
  std::vector<uint8_t> PrefixHeader(const PrefixKey& key, std::span<const int32_t> tokens,
                                    uint32_t crc) const;
  int64_t PrefixHeaderBytes() const { return 28 + 4 * int64_t{layout_.page_size()}; }
  // The upper page of a sequence's i-th token page (kPageOffGpu with one
  // group), for AppendRecordCopies.
  // Keeps the whole pages of `tokens` as stored prefix pages, as
  // StorePrefix does from a sequence's GPU pages, from raw host records in
  // page order (an import's landing records, whose upper layers may never
  // reach the GPU).
  absl::Status StorePrefixFromRecords(std::span<const int32_t> tokens,
                                      std::span<const int32_t> records);
  // StorePrefix's common part: the first `blocks` pages of `tokens` not
  // stored yet get a record each, filled by fill(page, record) (host bytes
  // now, or row copies appended to copies_, enqueued after).
  absl::Status StorePrefixPages(std::span<const int32_t> tokens, size_t blocks,
                                const std::function<void(size_t, int32_t)>& fill);
  static int32_t UpperOf(const engine::SequencePages& pages, size_t i) {
    return i < pages.upper.size() ? pages.upper[i] : engine::kPageOffGpu;
  }

  engine::Model* model_;
  // The copies to and from the caches: the model's backend, or every
  // tensor-parallel rank's (a record holds every rank's part of a page).
  std::unique_ptr<KvDevice> device_;
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
  absl::flat_hash_map<int, int64_t> region_records_;  // by workload
  absl::flat_hash_map<int, int64_t> ssd_charged_;     // by workload (ChargeSsd)
  std::vector<InFlight> in_flight_;
  std::vector<engine::RowCopy> copies_;  // scratch
  std::vector<uint32_t> row_crcs_;       // scratch of FirstCorruptCopied
  std::vector<uint32_t> loaded_crcs_;    // the last LoadPrefix's (LoadedPrefixCrcs)
  // The last LoadImported's planner state (TakeImportedPlannerState), and
  // whether all its pages came raw (ImportedKvExact).
  std::vector<std::vector<uint8_t>> imported_planner_state_;
  bool imported_exact_ = false;
  Stats counters_;  // the cumulative fields
  KvBlockManagerOptions options_;
  uint64_t next_swap_id_ = 1;
  // Host records a refused swap-out needed: moves down make that much room.
  int wanted_free_records_ = 0;
  // Stored prefixes: the index (values are host records), how many records
  // it holds and may hold, and the copies still filling records (indexed
  // once they land, in Poll).
  PrefixIndex prefixes_;
  int prefix_records_ = 0;
  int max_prefix_records_ = 0;
  struct PendingPrefix {
    engine::CopyFence fence;
    uint64_t store = 0;  // the StorePrefix call (PrefixStores)
    std::vector<PrefixKey> keys;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<int32_t> records;
    std::vector<int> pages;  // each record's page index in its tokens
  };
  std::vector<PendingPrefix> pending_prefixes_;
  // The latest StorePrefix calls (PrefixStoreCrcs): per call, each page's
  // stored CRC once sealed (0: not stored by it).
  struct PrefixStore {
    uint64_t id = 0;
    bool sealed = false;
    std::vector<uint32_t> crcs;
  };
  static constexpr size_t kPrefixStoresKept = 64;
  std::deque<PrefixStore> prefix_stores_;
  uint64_t next_prefix_store_ = 0, last_prefix_store_ = 0;
  // Prefix pages on the SSD, by their chain key's first word (the value's
  // header holds the whole key and the tokens, checked when read back).
  struct SsdPrefix {
    int64_t bytes = 0;
    enum class State { kStored, kWriting, kReading } state = State::kStored;
    std::list<uint64_t>::iterator lru;  // in ssd_prefix_lru_, most recent at the back
    std::chrono::steady_clock::time_point read_since = {};  // kReading: when it started
    bool timed_out = false;  // counted as given up on (kReading past the timeout)
  };
  absl::flat_hash_map<uint64_t, SsdPrefix> ssd_prefixes_;
  std::list<uint64_t> ssd_prefix_lru_;
  int64_t ssd_prefix_bytes_ = 0;  // in ssd_prefixes_
  // A prefix move in flight: its pages, their records (referenced).
  struct PrefixMove {
    bool down = true;
    std::vector<PrefixKey> keys;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<int32_t> records;
  };
  absl::flat_hash_map<uint64_t, PrefixMove> prefix_moves_;  // by job id
  uint64_t next_job_ = 1;
  absl::flat_hash_map<uint64_t, Move> moves_;  // by job id
  std::unique_ptr<ThreadPool> crc_pool_;       // HostPool::SealAll / FirstCorrupt
  // Disaggregated serving: exports by key (records held until released),
  // the keys released from other threads, and copies that read landing
  // records (freed to the landing area when done).
  struct Export {
    std::vector<int32_t> records;  // one per page exported so far
    // Parts whose copy is not yet sealed and delivered, in order.
    struct Part {
      engine::CopyFence fence;
      int first = 0;  // records[first, first + count)
      int count = 0;
      int tokens = 0;  // the prompt's tokens with KV when it was made
      bool final = false;
      // Raw records (kBf16), or coded pages of `bytes` each.
      engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
      std::vector<int64_t> bytes;
      // ExportByLayer's: these layers of each page, at `offset` into its
      // record (`bytes` are theirs); part_layers 0: whole records.
      int first_layer = 0;
      int part_layers = 0;
      std::vector<int64_t> offsets;
    };
    std::deque<Part> pending;
    bool final = false;                               // its last part was made
    std::vector<std::vector<uint8_t>> planner_state;  // AddExportPlannerState's
    // ExpectExportPlannerState: the end waits for the planner state (from
    // as many planners as expected it); and whether it all came, and
    // whether the export's end was delivered.
    bool state_expected = false, state_came = false, ended = false;
    int state_parts_expected = 0, state_parts_came = 0;
    // When its pages' last part went without the expected state.
    std::optional<std::chrono::steady_clock::time_point> pages_sent;
    // ExportByLayer armed it for a forward that ended before its last
    // layer: its final ExportKv fails.
    bool layers_missing = false;
  };
  // Exports armed by ExportByLayer for the step being enqueued: their
  // pages [first, first + count) of records, whose layers from next_layer
  // on are still to copy out.
  struct LayerExport {
    uint64_t key = 0;
    int first = 0;
    int count = 0;
    int tokens = 0;
    engine::KvCodecKind codec = engine::KvCodecKind::kBf16;
    std::vector<int32_t> pages;  // the pages' (lower group)
    int next_layer = 0;
  };
  std::vector<LayerExport> layer_exports_;
  // The last copy LayerKvWritten enqueued in the step (FinishLayerExports).
  engine::CopyFence layer_fence_ = engine::kFenceDone;
  absl::Status PollTransfers();
  // Hands each export's parts whose copies are done to `sink`, in order.
  absl::Status HandOverExports(const ExportSink& sink);
  // The exports whose last pages were all copied out layer by layer in the
  // step being enqueued (LayersEnqueued).
  std::vector<uint64_t> layer_keys_;
  // The codec a workload's pages are exported in, and a coder for it.
  engine::KvCodecKind WireCodec(int workload) const;
  const engine::KvCodec& Coder(engine::KvCodecKind codec);
  std::array<std::unique_ptr<engine::KvCodec>, 4> coders_;
  std::vector<engine::KvBlockCopy> blocks_;  // scratch of coded exports and imports
  // Gives an export's records back (each when no copy writes it).
  void FreeExport(absl::flat_hash_map<uint64_t, Export>::iterator it);
  absl::flat_hash_map<uint64_t, Export> exports_;
  absl::Mutex released_mu_;
  ExportSink export_sink_ ABSL_GUARDED_BY(released_mu_);
  std::vector<uint64_t> released_exports_ ABSL_GUARDED_BY(released_mu_);
  std::unique_ptr<LandingArea> landing_;
  std::vector<InFlight> landing_in_flight_;
  // Transfers being loaded a part at a time (LoadImported with max_bytes):
  // their pages, held from the first call, and blocks from `next` on still
  // in landing records (record -1: handed to landing_in_flight_).
  struct Import {
    int tokens = 0;
    engine::SequencePages pages;
    std::vector<LandingArea::Block> blocks;
    int next = 0;
    engine::CopyFence last_fence = engine::kFenceDone;  // its last copy into the pages
    std::vector<std::vector<uint8_t>> planner_state;
    bool exact = true;  // every page loaded so far came raw
    // Admitted (ImportAdmitter): its sequence, and whether the admitter
    // holds its upper layers of some tokens (their upper pages are off).
    int64_t seq_id = 0;
    bool admitted = false;
    bool admitting = false;  // its encoding runs (ImportAdmitter::AdmitDone)
  };
  absl::flat_hash_map<uint64_t, Import> importing_;
  // LoadImported's first call: takes the transfer from the landing area
  // and allocates its pages (false: too few are free).
  absl::StatusOr<bool> StartImport(int64_t seq_id, int workload, uint64_t transfer_id,
                                   std::span<const int32_t> tokens);
  ImportAdmitter* admitter_ = nullptr;
  // Destroyed first: its threads write into the host tier.
  std::unique_ptr<RecordMover> mover_;
};

// The block manager a server's profiles ask for together: their host_bytes,
// prefix_bytes and ssd_prefix_bytes summed, the most eager of the write
// admissions of those with an SSD tier, over `ssd` (OpenSsdForProfiles).
// prefix_space names the KV the prefixes hold (the model and its KV format).
absl::StatusOr<KvBlockManagerOptions> ManagerOptionsForProfiles(
    const std::vector<KvProfile>& profiles, SsdStore* ssd, std::string prefix_space);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_BLOCK_MANAGER_H_

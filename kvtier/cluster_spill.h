// ClusterSpill: host-homed ClusterKV clusters (KvPolicyRunner's tiering)
// moved one tier further down, to the SSD, and fetched back inside the
// decode step that selects them.
//
// Writing down. The runner hands Write a sequence's clusters that are in
// host memory (a snapshot of its tier tables: per layer and KV head, each
// cluster's pieces and where they lie). A writer thread stores each
// (layer, KV head, cluster) as one SSD value, keyed by the sequence's
// spill owner id: the cluster's pieces byte for byte as they lie in host
// memory, each an encoded KV block with its own header and CRC, so the
// value needs no re-encoding either way. When every value of the batch is
// stored, Poll reports it done, and the runner marks those pieces
// kPieceBelowHost on the device and frees their host memory. A write that
// fails (the SSD budget is full, an I/O error) deletes what the batch
// wrote and is reported refused: the clusters stay in host memory.
//
// Fetching up (engine::PieceFetcher). A recall that misses a piece below
// host memory calls Fetch, from the step: each cluster asked for is read
// (in parallel on I/O threads) into a staging area of host memory that
// the next call reuses, and decoded from there into the GPU ring; the
// decode step waits for it, and it counts as a hard miss. A value that is
// missing or fails the store's CRC gives -1: the recall treats it as a bad
// piece, and the sequence is recomputed from its tokens (the pieces' own
// CRCs are checked by the recall as for any host piece). The step waits at
// most fetch_timeout: reads still running then give -1 too, and until
// they have all returned the SSD counts as stalled and every fetch fails
// at once (a disk that stops answering costs recomputation, not a hung
// step). Reads land in buffers of their own and are copied into the
// staging area only while their fetch still waits for them, so a late one
// never writes where a later step reads.
//
// Reading ahead (read_ahead(), a second PieceFetcher, for the recall of a
// guessed selection: engine::TierRing::list_only). It never waits: it
// answers every piece -1 at once and queues reads of the clusters on the
// SSD those pieces belong to, each into a buffer of its own, while the
// layer before the one guessed computes. A step's Fetch of that layer then
// takes a cluster read ahead (copied into the staging area) or being read
// (waited for) instead of reading it again; one still queued is read anew
// ahead of the others. The reads ahead of one layer are kept until a read
// ahead or a Fetch of another layer, DropReadsAhead or a timed-out fetch
// drops them (their queued reads are then not made); those queued hold
// at most the staging area's bytes, and take their buffers when read.
// Readers take a step's fetches first, reads ahead next (leaving one
// reader to promotions while any wait), promotions last.
//
// Promoting (Promote). A sequence running again whose clusters are on the
// SSD may have them read back into host memory the caller allocated, on
// the I/O threads, behind the steps' own fetches (a step waits behind at
// most the one value each reader is reading). PollPromotions reports the
// clusters read and checked; the caller points its tables at their host
// copies between steps and then calls Promoted, which deletes their values
// (until then a step still fetches them from the SSD). A value that could
// not be read stays where it is, fetched as before.
//
// Forget drops a sequence: a batch of it being written stops after the
// values in progress, queued ones are dropped (promotion reads too), and
// its values are deleted; it returns true then, and the caller may free
// the batch's (and a promotion's) host memory. It waits at most
// forget_timeout for the values in progress: a write or promotion read the
// SSD does not finish by then (a disk that stops answering) leaves Forget
// returning false, and the sequence's host memory must stay until Poll
// reports it (Done::forgotten, for a batch or a promotion), once it has
// returned and the values are deleted.
// An ended sequence never holds the engine up.
//
// Thread-safety: Write, Poll, Forget and the accessors are called by the
// thread that drives the model; Fetch and the read ahead from the step (on
// the CUDA backend host callback threads of the streams, the two possibly
// at once) while that thread runs. A mutex guards what they share.
#ifndef STRATA_KVTIER_CLUSTER_SPILL_H_
#define STRATA_KVTIER_CLUSTER_SPILL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "engine/backend.h"
#include "kvtier/ssd_store.h"

namespace strata::kvtier {

class ClusterSpill final : public engine::PieceFetcher {
 public:
  struct Options {
    // The host buffer the recall reads (the block manager's): the clusters
    // written lie in it, and fetched ones land in its staging area
    // (SetStaging), so that offsets into it are offsets the recall reads.
    uint8_t* host_data = nullptr;
    int io_threads = 4;  // parallel reads in Fetch, and writes of a batch
    // How long a step waits for its reads (see above).
    std::chrono::milliseconds fetch_timeout{2000};
    // How long Forget waits for a batch being written (see above).
    std::chrono::milliseconds forget_timeout{2000};
    // Tests only: called on the I/O thread before each read, and before
    // each value written (a test blocks them to stand for a disk that
    // stops answering).
    std::function<void()> before_read = nullptr;
    std::function<void()> before_write = nullptr;
  };
  struct Stats {
    int64_t batches_written = 0;  // Write batches stored
    int64_t batches_refused = 0;  // ... that the SSD refused (stayed in host)
    int64_t clusters_written = 0;
    int64_t bytes_written = 0;
    int64_t write_micros = 0;
    int64_t hard_misses = 0;          // clusters fetched in a step
    int64_t hard_miss_pieces = 0;     // ... their pieces asked for
    int64_t bytes_read = 0;           // ... bytes read
    int64_t fetch_micros = 0;         // time the steps waited for them
    int64_t fetches_failed = 0;       // pieces that could not be had (-1)
    int64_t fetch_timeouts = 0;       // fetches that gave up on reads still running
    int64_t read_ahead_clusters = 0;  // clusters whose reads ahead were queued
    int64_t read_ahead_bytes = 0;     // ... the bytes they read
    int64_t read_ahead_used = 0;      // hard misses a read ahead served
    int64_t forget_timeouts = 0;      // Forget calls that left a stalled write or read behind
    int64_t promotions = 0;           // Promote calls reported
    int64_t clusters_promoted = 0;    // ... clusters read back into host memory
    int64_t bytes_promoted = 0;
    int64_t promote_micros = 0;  // from Promote to the last read
    bool stalled = false;        // reads a fetch gave up on are still running
    int64_t bytes_resident = 0;  // on the SSD now
    int sequences = 0;           // with values on the SSD now
    int batches_in_flight = 0;
  };

  // One cluster of a batch: its pieces [first_piece, first_piece + pieces)
  // lie at host bytes [host_offset, host_offset + bytes), piece i at
  // host_offset + piece_offsets[i].
  struct Cluster {
    uint16_t layer = 0;
    uint16_t head = 0;
    uint32_t block = 0;
    int32_t first_piece = 0;
    int64_t host_offset = 0;
    int64_t bytes = 0;
    std::vector<int64_t> piece_offsets;
  };
  struct Batch {
    int64_t seq_id = 0;
    int slot = 0;  // the sequence's pool slot (Fetch names pieces by slot)
    std::vector<Cluster> clusters;
    uint64_t tag = 0;  // the caller's, returned by Poll
  };
  struct Done {
    int64_t seq_id = 0;
    uint64_t tag = 0;
    absl::Status status;  // ok: every cluster is on the SSD
    // The sequence was forgotten while this batch was being written (Forget
    // returned false): its values are deleted now, and the batch's host
    // memory is the caller's again.
    bool forgotten = false;
  };
  // A cluster read back by Promote, described as one written: its pieces
  // now lie at host bytes host_offset + piece_offsets[i].
  using PromotedCluster = Cluster;
  struct Promotion {
    int64_t seq_id = 0;
    uint64_t tag = 0;
    std::vector<PromotedCluster> clusters;  // read and checked; the rest stay
  };

  // `store` and the host memory outlive the spill.
  ClusterSpill(SsdStore* store, const Options& options);
  // Waits for the batch being written; deletes every value still stored.
  ~ClusterSpill() override;
  ClusterSpill(const ClusterSpill&) = delete;
  ClusterSpill& operator=(const ClusterSpill&) = delete;

  // Queues a batch; `owner` names the sequence's values (SsdKey id, never
  // reused across sequences; the same for every batch of one sequence).
  // The host bytes must stay as they are until Poll reports the batch.
  void Write(uint64_t owner, Batch batch);
  // The batches finished since the last call.
  std::vector<Done> Poll();
  // The sequence ends: its batches stop and its values are deleted before
  // this returns true; false when a batch being written outlived
  // forget_timeout (see the file comment: Poll reports it, forgotten, once
  // it returns; no other batch of the sequence is reported).
  bool Forget(int64_t seq_id);
  // Where fetched clusters land: bytes [offset, offset + bytes) of the
  // host buffer (bytes 0: nowhere, every fetch fails). Set between steps.
  void SetStaging(int64_t offset, int64_t bytes);
  // Host bytes Promote needs for every cluster of the sequence on the SSD
  // (each rounded up to whole host units); 0 when it has none, or a batch
  // or promotion of it is in flight.
  int64_t PromotionBytes(int64_t seq_id) const;
  // Reads those clusters into host bytes [host_offset, host_offset +
  // PromotionBytes(seq_id)) (see the file comment); `tag` is the caller's,
  // returned by PollPromotions. The bytes are written until it reports it.
  void Promote(int64_t seq_id, int64_t host_offset, uint64_t tag);
  // The promotions finished since the last call.
  std::vector<Promotion> PollPromotions();
  // The caller's tables point at these clusters' host copies now: their
  // values are deleted, and fetches no longer look for them.
  void Promoted(int64_t seq_id, std::span<const PromotedCluster> clusters);
  // Whether a batch of the sequence is queued or being written.
  bool Writing(int64_t seq_id) const;
  // Whether any of the sequence's clusters are on the SSD.
  bool HasClusters(int64_t seq_id) const;
  Stats stats() const;

  // engine::PieceFetcher.
  void Fetch(int layer, std::span<const engine::PieceFetcher::Piece> pieces,
             std::span<int64_t> offsets) override;
  // The fetcher of reads ahead (see above); lives as long as the spill.
  engine::PieceFetcher* read_ahead() { return &read_ahead_; }
  // Drops the reads ahead (the step that would have taken them ended).
  void DropReadsAhead();

 private:
  class ReadAhead final : public engine::PieceFetcher {
   public:
    explicit ReadAhead(ClusterSpill* spill) : spill_(spill) {}
    void Fetch(int layer, std::span<const Piece> pieces, std::span<int64_t> offsets) override {
      spill_->StartReadsAhead(layer, pieces, offsets);
    }

   private:
    ClusterSpill* spill_;
  };
  struct StoredCluster {
    int64_t bytes = 0;
    int32_t first_piece = 0;
    std::vector<int64_t> piece_offsets;
  };
  struct Sequence {
    uint64_t owner = 0;
    int slot = 0;
    int writing = 0;         // batches queued or being written
    int promoting = 0;       // promotion reads queued or running
    bool forgotten = false;  // Forget gave up waiting for its write
    // By (layer, head, block): the clusters on the SSD; by (layer, head):
    // their first pieces and blocks, sorted, to find a piece's cluster.
    absl::flat_hash_map<uint64_t, StoredCluster> clusters;
    absl::flat_hash_map<uint64_t, std::vector<std::pair<int32_t, uint32_t>>> firsts;
    int64_t bytes = 0;
  };
  struct Queued {
    uint64_t owner;
    Batch batch;
  };
  static uint64_t ClusterId(uint32_t layer, uint32_t head, uint32_t block) {
    return (uint64_t{layer} << 48) | (uint64_t{head} << 32) | block;
  }
  // One value read for a Fetch, into a buffer of its own; copied into the
  // staging area by the reader only while the fetch still waits for it. A
  // read ahead has no `dest`: the Fetch that takes it copies the buffer.
  struct FetchWait;
  struct ReadJob {
    SsdKey key;
    uint8_t* dest = nullptr;  // in the staging area
    std::vector<uint8_t> buffer;
    bool ok = false;       // guarded by wait->mu
    bool done = false;     // ... the read returned (or was skipped)
    bool dropped = false;  // ... a read ahead no longer wanted
    bool started = false;  // ... a reader took it (not dropped then)
    bool ahead = false;    // a read ahead (set once, before it is queued)
    int64_t bytes = 0;     // a read ahead's value bytes (its buffer's, once read)
    std::shared_ptr<FetchWait> wait;
  };
  // The cluster a fetched piece belongs to (mu_ held): its sequence and
  // ClusterId, its value's description and the piece's index in it; null
  // when the SSD has no such piece.
  struct Found {
    int64_t seq_id = 0;
    uint64_t id = 0;
    const Sequence* seq = nullptr;
    const StoredCluster* cluster = nullptr;
    int64_t index = 0;
  };
  std::optional<Found> FindLocked(int layer, const engine::PieceFetcher::Piece& p) const;
  // ReadAhead::Fetch.
  void StartReadsAhead(int layer, std::span<const engine::PieceFetcher::Piece> pieces,
                       std::span<int64_t> offsets);
  // Drops the reads ahead (mu_ held): of sequence seq_id, or all when -1.
  void DropReadsAheadLocked(int64_t seq_id);
  struct FetchWait {
    std::mutex mu;
    std::condition_variable cv;
    int remaining = 0;
    bool abandoned = false;  // the fetch gave up: copy nothing more
  };
  // One value of a promotion, read straight into its host bytes.
  struct PromotionState;
  struct PromoteJob {
    SsdKey key;
    std::span<uint8_t> dest;
    size_t index = 0;  // in state->promotion.clusters
    std::shared_ptr<PromotionState> state;
  };
  struct PromotionState {
    Promotion promotion;  // every cluster asked for
    std::vector<char> ok;
    int remaining = 0;
    std::chrono::steady_clock::time_point started;
  };
  void ReaderLoop();
  void WriterLoop();
  // A reader's promotion read (mu_ not held).
  void ReadForPromotion(const PromoteJob& job);
  // Writes one batch (on the writer thread); deletes what it wrote on a failure.
  absl::Status WriteBatch(const Queued& q, int64_t* bytes);
  // Deletes a sequence's values and forgets it (mu_ held, none of its
  // batches queued or being written).
  void DropLocked(absl::flat_hash_map<int64_t, Sequence>::iterator it);
  // A forgotten sequence whose last write or promotion read returned:
  // dropped, and reported (Done::forgotten; mu_ held).
  void DropForgottenLocked(int64_t seq_id, uint64_t tag);

  SsdStore* store_;
  Options options_;
  int64_t staging_offset_ = 0, staging_bytes_ = 0;  // guarded by mu_
  ThreadPool write_pool_;

  mutable std::mutex mu_;
  std::condition_variable queue_cv_;
  std::condition_variable batch_done_cv_;
  std::deque<Queued> queue_;
  int64_t writing_seq_ = -1;  // the sequence whose batch is being written
  bool has_writing_seq_ = false;
  std::atomic<bool> cancel_writing_{false};  // Forget stops that batch
  bool stopping_ = false;
  std::vector<Done> done_;
  absl::flat_hash_map<int64_t, Sequence> sequences_;
  absl::flat_hash_map<int, int64_t> slot_seq_;  // sequences with clusters, by slot
  Stats stats_;
  // The readers' queue, and the reads queued or running (under mu_).
  std::condition_variable read_cv_;
  std::deque<std::shared_ptr<ReadJob>> read_queue_;
  std::deque<std::shared_ptr<ReadJob>> ahead_queue_;  // taken when read_queue_ is empty
  std::deque<PromoteJob> promote_queue_;              // taken when both are empty
  // The reads ahead of layer ahead_layer_, by (sequence, ClusterId), and
  // their bytes.
  absl::flat_hash_map<std::pair<int64_t, uint64_t>, std::shared_ptr<ReadJob>> ahead_;
  int ahead_layer_ = -1;
  int64_t ahead_bytes_ = 0;
  int ahead_reading_ = 0;  // reads ahead being read
  ReadAhead read_ahead_{this};
  std::vector<Promotion> promotions_done_;
  int reads_outstanding_ = 0;
  std::vector<std::thread> readers_;
  std::thread writer_;  // last: started once the rest is built
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_CLUSTER_SPILL_H_

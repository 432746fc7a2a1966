// The CUDA backend's tiered sparse decoding (engine::Backend::OffloadBlocks
// and RecallBlocks): argument checks and launches of cuda/kernels/kv_tier.h
// and the encoders of kv_codec.h, kept apart from cuda_backend.cc.
//
// Thread-safety: as the backend (one thread at a time).
#ifndef STRATA_CUDA_TIERING_H_
#define STRATA_CUDA_TIERING_H_

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cuda/cuda_utils.h"
#include "cuda/kernels/kv_tier.h"
#include "engine/backend.h"

namespace strata::cuda {

// `workspace` holds the encode jobs; it grows as needed (never used by a
// graph: offloads run only in steps that are not replayed).
absl::Status OffloadBlocks(const engine::Tensor& k_cache, const engine::Tensor& v_cache,
                           const engine::SequenceRange& range, const engine::Tensor& extents,
                           int first_block, int num_blocks, int block_stride,
                           engine::KvCodecKind codec, const engine::HostBuffer& host,
                           int64_t region_unit, int64_t units_per_head,
                           engine::TierTables& slot_tables, DeviceBuffer& workspace,
                           cudaStream_t stream);

// The device workspace RecallBlocks needs for plans of `plan`'s capacity
// (its entries tensor), so that it does not change between steps.
size_t RecallWorkspaceBytes(const engine::SparsePlan& plan, const engine::Tensor& k_cache);

// Where a layer's recalls on one stream (the backend keeps one set of
// these for the main stream's fetches, one for the side stream's reads
// ahead, engine::TierRing::list_only) fetch pieces below host
// memory (engine::PieceFetcher) from: the fetch list (pinned, device-mapped
// host memory the plan kernel writes and the decode kernel reads) and the
// host function of the stream that hands it to the fetcher. Graphs that
// record a recall hold the addresses, so a context keeps them for as long
// as it lives. The fetcher is read when the host function runs: a replay
// fetches through the one the layer's latest RecallBlocks call named,
// which must outlive the recordings that may replay.
//
// Thread-safety: set_fetcher from the backend's thread; the host function
// runs on a CUDA thread, one at a time for the stream the recalls use.
class RecallFetchContext {
 public:
  static absl::StatusOr<std::unique_ptr<RecallFetchContext>> Create(int layer);
  RecallFetchContext(const RecallFetchContext&) = delete;
  RecallFetchContext& operator=(const RecallFetchContext&) = delete;
  ~RecallFetchContext();

  void set_fetcher(engine::PieceFetcher* fetcher) {
    fetcher_.store(fetcher, std::memory_order_release);
  }
  // What the recall's kernels and host function use (RecallParams::fetch).
  const kernels::RecallFetchList& list() const { return list_; }

 private:
  explicit RecallFetchContext(int layer) : layer_(layer) {}
  // The host function: answers the listed pieces through the fetcher.
  static void Fetch(void* context);

  const int layer_;
  std::atomic<engine::PieceFetcher*> fetcher_{nullptr};
  void* host_ = nullptr;                               // pinned: the count, the list, the offsets
  const kernels::RecallFetchPiece* pieces_ = nullptr;  // host views of the list
  int64_t* offsets_ = nullptr;                         // ... and of the answers
  kernels::RecallFetchList list_;
  std::vector<engine::PieceFetcher::Piece> scratch_;  // the list, as the fetcher takes it
};

// The contexts of one backend, by layer.
class RecallFetchContexts {
 public:
  // The context a recall of `layer` with `fetcher` uses, which
  // then fetches through `fetcher`; null when `fetcher` is (the layer's
  // context, if any, keeps its fetcher). A layer's first context allocates
  // pinned memory: FailedPrecondition while `capturing`. InvalidArgument for
  // a layer outside [0, 65536).
  absl::StatusOr<RecallFetchContext*> ForRecall(int layer, engine::PieceFetcher* fetcher,
                                                bool capturing);

 private:
  std::vector<std::unique_ptr<RecallFetchContext>> by_layer_;
};

// `workspace` holds RecallWorkspaceBytes; `decode_ctas` CTAs decode the
// missed pieces. `fetch` (may be null) fetches the pieces below host
// memory; without it they are bad pieces.
absl::Status RecallBlocks(engine::Tensor& k_cache, engine::Tensor& v_cache,
                          engine::SparsePlan& plan, const engine::Tensor& extents,
                          engine::TierTables& tables, engine::TierRing& ring, void* workspace,
                          size_t workspace_bytes, int decode_ctas, RecallFetchContext* fetch,
                          cudaStream_t stream);

}  // namespace strata::cuda

#endif  // STRATA_CUDA_TIERING_H_

// KvDevice: the copies between a worker's KV caches and its host tier, on
// the backend that holds the caches or, with tensor parallelism, on every
// rank's backend at once.
//
// The block manager sees one list of cache tensors (KvLayout::caches():
// rank 0's K and V of every layer, then rank 1's, ...) and one fence per
// batch of copies. A KvDevice sends each rank's rows to that rank's
// backend (its caches, its copy stream) and keeps, per fence it hands out,
// the ranks' own fences: done when all are. With one rank it is the
// backend itself.
//
// The copies of a tensor-parallel group are issued from the thread that
// drives rank 0, between steps, while the other ranks' threads wait for the
// next step (engine/tensor_parallel.h), so each backend still has one user
// at a time.
//
// Thread-safety: one thread at a time (the block manager's).
#ifndef STRATA_KVTIER_KV_DEVICE_H_
#define STRATA_KVTIER_KV_DEVICE_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"

namespace strata::kvtier {

class KvDevice {
 public:
  // The backends of `model`'s ranks (Model::ranks()), each holding
  // `tensors_per_rank` of the caches.
  KvDevice(const engine::Model& model, int tensors_per_rank);

  int num_ranks() const { return static_cast<int>(backends_.size()); }

  // Pinned host memory every rank's device reaches (rank 0 allocates it;
  // the CUDA backend's host buffers are portable).
  absl::StatusOr<engine::HostBuffer> AllocateHost(size_t bytes);
  // As engine::Backend's, with `tensors` every rank's caches.
  absl::StatusOr<engine::CopyFence> CopyRowsToHost(std::span<const engine::Tensor> tensors,
                                                   std::span<const engine::RowCopy> rows,
                                                   const engine::HostBuffer& host);
  absl::StatusOr<engine::CopyFence> CopyRowsFromHost(const engine::HostBuffer& host,
                                                     std::span<const engine::RowCopy> rows,
                                                     std::span<const engine::Tensor> tensors);
  absl::StatusOr<bool> FenceDone(engine::CopyFence fence);
  absl::Status WaitFence(engine::CopyFence fence);
  // Each rank's compute waits for its own part of the copies.
  absl::Status ComputeAfterFence(engine::CopyFence fence);
  absl::Status ChecksumRows(std::span<const engine::Tensor> tensors,
                            std::span<const engine::RowCopy> rows, std::span<uint32_t> crcs);
  // As engine::Backend's, with `k_caches` and `v_caches` every rank's by
  // layer (rank r's layer l at r * layers + l, as the blocks' `layer`
  // counts): each rank codes its own blocks.
  absl::StatusOr<engine::CopyFence> EncodeBlocksToHost(engine::KvCodecKind codec,
                                                       std::span<const engine::Tensor> k_caches,
                                                       std::span<const engine::Tensor> v_caches,
                                                       std::span<const engine::KvBlockCopy> blocks,
                                                       const engine::HostBuffer& host);
  // Returns once every rank has decoded and checked its blocks (the ranks
  // one after another).
  absl::Status DecodeBlocksFromHost(const engine::HostBuffer& host,
                                    std::span<const engine::KvBlockCopy> blocks,
                                    std::span<const engine::Tensor> k_caches,
                                    std::span<const engine::Tensor> v_caches);

 private:
  // Splits `rows` by rank into rank_rows_ (tensor indices made the rank's
  // own); InvalidArgument for a tensor past the last rank's.
  absl::Status SplitByRank(std::span<const engine::RowCopy> rows);
  // Splits `blocks` by rank into rank_blocks_ (layers made the rank's own);
  // InvalidArgument for a layer past the last rank's.
  absl::Status SplitBlocksByRank(std::span<const engine::KvBlockCopy> blocks);
  // A rank's fence: which backend issued it, and its id there.
  struct RankFence {
    int rank = 0;
    engine::CopyFence fence = engine::kFenceDone;
  };
  // Calls `issue(r)` for each rank r that has_work(r): one fence for all.
  // On a rank's failure, waits for the ranks already issued.
  using RankIssue = absl::FunctionRef<absl::StatusOr<engine::CopyFence>(int rank)>;
  absl::StatusOr<engine::CopyFence> IssueOnRanks(absl::FunctionRef<bool(int)> has_work,
                                                 const RankIssue& issue);
  // InvalidArgument unless there are a K and a V cache per layer of every
  // rank (the block codec calls).
  absl::Status CheckCodecCaches(std::string_view op, std::span<const engine::Tensor> k_caches,
                                std::span<const engine::Tensor> v_caches) const;
  // Issues `copy` on each rank with rows, over that rank's caches (as
  // IssueOnRanks).
  using RankCopy = absl::FunctionRef<absl::StatusOr<engine::CopyFence>(
      engine::Backend&, std::span<const engine::Tensor>, std::span<const engine::RowCopy>)>;
  absl::StatusOr<engine::CopyFence> CopyByRank(std::span<const engine::Tensor> tensors,
                                               std::span<const engine::RowCopy> rows,
                                               const RankCopy& copy);
  // A fence for the ranks' fences (kFenceDone when all are).
  engine::CopyFence Combine(std::vector<RankFence> fences);
  // The ranks' fences of `fence` (empty: done, or unknown and so done).
  const std::vector<RankFence>* Parts(engine::CopyFence fence) const;

  std::vector<engine::Backend*> backends_;
  int tensors_per_rank_;
  std::vector<std::vector<engine::RowCopy>> rank_rows_;
  std::vector<std::vector<size_t>> rank_index_;  // rank_rows_[r][i] is rows[rank_index_[r][i]]
  std::vector<uint32_t> rank_crcs_;
  std::vector<std::vector<engine::KvBlockCopy>> rank_blocks_;
  // Fences handed out for several ranks, by id: each rank's own. A fence
  // found done is forgotten; an id no longer here is done.
  std::map<engine::CopyFence, std::vector<RankFence>> fences_;
  engine::CopyFence next_fence_ = 1;
};

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_KV_DEVICE_H_

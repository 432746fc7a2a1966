#include "kvtier/kv_device.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace strata::kvtier {

KvDevice::KvDevice(const engine::Model& model, int tensors_per_rank)
    : tensors_per_rank_(tensors_per_rank) {
  for (engine::Model* rank : model.ranks()) backends_.push_back(&rank->backend());
  rank_rows_.resize(backends_.size());
  rank_index_.resize(backends_.size());
  rank_blocks_.resize(backends_.size());
}

absl::StatusOr<engine::HostBuffer> KvDevice::AllocateHost(size_t bytes) {
  return backends_.front()->AllocateHost(bytes);
}

absl::Status KvDevice::SplitByRank(std::span<const engine::RowCopy> rows) {
  for (size_t r = 0; r < backends_.size(); ++r) {
    rank_rows_[r].clear();
    rank_index_[r].clear();
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const engine::RowCopy& row = rows[i];
    const int rank = row.tensor / tensors_per_rank_;
    if (row.tensor < 0 || rank >= num_ranks()) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV copy: tensor ", row.tensor, " of ", num_ranks() * tensors_per_rank_));
    }
    engine::RowCopy own = row;
    own.tensor -= rank * tensors_per_rank_;
    rank_rows_[rank].push_back(own);
    rank_index_[rank].push_back(i);
  }
  return absl::OkStatus();
}

absl::Status KvDevice::SplitBlocksByRank(std::span<const engine::KvBlockCopy> blocks) {
  const int layers = tensors_per_rank_ / 2;
  for (auto& own : rank_blocks_) own.clear();
  for (const engine::KvBlockCopy& block : blocks) {
    const int rank = block.layer / layers;
    if (block.layer < 0 || rank >= num_ranks()) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV block copy: layer ", block.layer, " of ", num_ranks() * layers));
    }
    engine::KvBlockCopy own = block;
    own.layer -= rank * layers;
    rank_blocks_[rank].push_back(own);
  }
  return absl::OkStatus();
}

engine::CopyFence KvDevice::Combine(std::vector<RankFence> fences) {
  std::erase_if(fences, [](const RankFence& f) { return f.fence == engine::kFenceDone; });
  if (fences.empty()) return engine::kFenceDone;
  const engine::CopyFence id = next_fence_++;
  fences_.emplace(id, std::move(fences));
  return id;
}

const std::vector<KvDevice::RankFence>* KvDevice::Parts(engine::CopyFence fence) const {
  auto it = fences_.find(fence);
  return it == fences_.end() ? nullptr : &it->second;
}

absl::StatusOr<engine::CopyFence> KvDevice::IssueOnRanks(absl::FunctionRef<bool(int)> has_work,
                                                         const RankIssue& issue) {
  std::vector<RankFence> fences;
  for (int r = 0; r < num_ranks(); ++r) {
    if (!has_work(r)) continue;
    absl::StatusOr<engine::CopyFence> f = issue(r);
    if (!f.ok()) {
      // The caller frees what the copies touch once this fails: the ranks
      // already copying finish first.
      for (const RankFence& issued : fences) {
        (void)backends_[issued.rank]->WaitFence(issued.fence);
      }
      return f.status();
    }
    fences.push_back({r, *f});
  }
  return Combine(std::move(fences));
}

absl::StatusOr<engine::CopyFence> KvDevice::CopyByRank(std::span<const engine::Tensor> tensors,
                                                       std::span<const engine::RowCopy> rows,
                                                       const RankCopy& copy) {
  STRATA_RETURN_IF_ERROR(SplitByRank(rows));
  return IssueOnRanks([&](int r) { return !rank_rows_[r].empty(); },
                      [&](int r) {
                        return copy(*backends_[r],
                                    tensors.subspan(r * tensors_per_rank_, tensors_per_rank_),
                                    rank_rows_[r]);
                      });
}

absl::Status KvDevice::CheckCodecCaches(std::string_view op,
                                        std::span<const engine::Tensor> k_caches,
                                        std::span<const engine::Tensor> v_caches) const {
  const size_t layers = static_cast<size_t>(tensors_per_rank_ / 2);
  if (k_caches.size() != layers * backends_.size() || v_caches.size() != k_caches.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV block ", std::string(op), ": ", k_caches.size(), " K and ", v_caches.size(),
        " V caches for ", num_ranks(), " ranks of ", layers, " layers"));
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::CopyFence> KvDevice::CopyRowsToHost(std::span<const engine::Tensor> tensors,
                                                           std::span<const engine::RowCopy> rows,
                                                           const engine::HostBuffer& host) {
  if (num_ranks() == 1) return backends_[0]->CopyRowsToHost(tensors, rows, host);
  return CopyByRank(
      tensors, rows,
      [&](engine::Backend& b, std::span<const engine::Tensor> caches,
          std::span<const engine::RowCopy> own) { return b.CopyRowsToHost(caches, own, host); });
}

absl::StatusOr<engine::CopyFence> KvDevice::CopyRowsFromHost(
    const engine::HostBuffer& host, std::span<const engine::RowCopy> rows,
    std::span<const engine::Tensor> tensors) {
  if (num_ranks() == 1) return backends_[0]->CopyRowsFromHost(host, rows, tensors);
  return CopyByRank(
      tensors, rows,
      [&](engine::Backend& b, std::span<const engine::Tensor> caches,
          std::span<const engine::RowCopy> own) { return b.CopyRowsFromHost(host, own, caches); });
}

absl::StatusOr<bool> KvDevice::FenceDone(engine::CopyFence fence) {
  if (num_ranks() == 1) return backends_[0]->FenceDone(fence);
  const std::vector<RankFence>* parts = Parts(fence);
  if (parts == nullptr) return true;
  for (const RankFence& part : *parts) {
    STRATA_ASSIGN_OR_RETURN(const bool done, backends_[part.rank]->FenceDone(part.fence));
    if (!done) return false;
  }
  fences_.erase(fence);
  return true;
}

absl::Status KvDevice::WaitFence(engine::CopyFence fence) {
  if (num_ranks() == 1) return backends_[0]->WaitFence(fence);
  const std::vector<RankFence>* parts = Parts(fence);
  if (parts == nullptr) return absl::OkStatus();
  for (const RankFence& part : *parts) {
    STRATA_RETURN_IF_ERROR(backends_[part.rank]->WaitFence(part.fence));
  }
  fences_.erase(fence);
  return absl::OkStatus();
}

absl::Status KvDevice::ComputeAfterFence(engine::CopyFence fence) {
  if (num_ranks() == 1) return backends_[0]->ComputeAfterFence(fence);
  const std::vector<RankFence>* parts = Parts(fence);
  if (parts == nullptr) return absl::OkStatus();
  for (const RankFence& part : *parts) {
    STRATA_RETURN_IF_ERROR(backends_[part.rank]->ComputeAfterFence(part.fence));
  }
  return absl::OkStatus();
}

absl::Status KvDevice::ChecksumRows(std::span<const engine::Tensor> tensors,
                                    std::span<const engine::RowCopy> rows,
                                    std::span<uint32_t> crcs) {
  if (num_ranks() == 1) return backends_[0]->ChecksumRows(tensors, rows, crcs);
  if (crcs.size() != rows.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ChecksumRows: ", crcs.size(), " CRCs for ", rows.size(), " rows"));
  }
  STRATA_RETURN_IF_ERROR(SplitByRank(rows));
  for (int r = 0; r < num_ranks(); ++r) {
    if (rank_rows_[r].empty()) continue;
    rank_crcs_.resize(rank_rows_[r].size());
    STRATA_RETURN_IF_ERROR(backends_[r]->ChecksumRows(
        tensors.subspan(r * tensors_per_rank_, tensors_per_rank_), rank_rows_[r], rank_crcs_));
    for (size_t i = 0; i < rank_crcs_.size(); ++i) crcs[rank_index_[r][i]] = rank_crcs_[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::CopyFence> KvDevice::EncodeBlocksToHost(
    engine::KvCodecKind codec, std::span<const engine::Tensor> k_caches,
    std::span<const engine::Tensor> v_caches, std::span<const engine::KvBlockCopy> blocks,
    const engine::HostBuffer& host) {
  if (num_ranks() == 1) {
    return backends_[0]->EncodeBlocksToHost(codec, k_caches, v_caches, blocks, host);
  }
  STRATA_RETURN_IF_ERROR(CheckCodecCaches("encode", k_caches, v_caches));
  STRATA_RETURN_IF_ERROR(SplitBlocksByRank(blocks));
  const size_t layers = static_cast<size_t>(tensors_per_rank_ / 2);
  return IssueOnRanks([&](int r) { return !rank_blocks_[r].empty(); },
                      [&](int r) {
                        return backends_[r]->EncodeBlocksToHost(
                            codec, k_caches.subspan(r * layers, layers),
                            v_caches.subspan(r * layers, layers), rank_blocks_[r], host);
                      });
}

absl::Status KvDevice::DecodeBlocksFromHost(const engine::HostBuffer& host,
                                            std::span<const engine::KvBlockCopy> blocks,
                                            std::span<const engine::Tensor> k_caches,
                                            std::span<const engine::Tensor> v_caches) {
  if (num_ranks() == 1) return backends_[0]->DecodeBlocksFromHost(host, blocks, k_caches, v_caches);
  STRATA_RETURN_IF_ERROR(CheckCodecCaches("decode", k_caches, v_caches));
  STRATA_RETURN_IF_ERROR(SplitBlocksByRank(blocks));
  const size_t layers = static_cast<size_t>(tensors_per_rank_ / 2);
  for (int r = 0; r < num_ranks(); ++r) {
    if (rank_blocks_[r].empty()) continue;
    absl::Status decoded = backends_[r]->DecodeBlocksFromHost(host, rank_blocks_[r],
                                                              k_caches.subspan(r * layers, layers),
                                                              v_caches.subspan(r * layers, layers));
    if (!decoded.ok()) {
      return absl::Status(decoded.code(), absl::StrCat("rank ", r, ": ", decoded.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata::kvtier

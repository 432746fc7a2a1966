#include "engine/in_process_communicator.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace strata::engine {
namespace {

// What one rank brought to a collective; the ranks' must agree.
struct Posted {
  const Tensor* tensor = nullptr;
  std::string signature;  // operation, dtype, shape (and root)
};

std::string Signature(std::string_view op, const Tensor& t, int root = -1) {
  std::string s = absl::StrCat(std::string(op), " of ", DTypeName(t.dtype()), " [",
                               absl::StrJoin(t.shape(), ", "), "]");
  if (root >= 0) absl::StrAppend(&s, " from rank ", root);
  return s;
}

// The state the ranks of one group share.
class Group {
 public:
  Group(int size, std::chrono::milliseconds timeout)
      : size_(size), timeout_(timeout), posted_(size), here_(size, false) {}

  int size() const { return size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // Posts `rank`'s part and waits until every rank has posted its own;
  // then checks that they agree. On success every posted tensor may be
  // read until the matching Leave.
  absl::Status Enter(int rank, Posted posted) {
    {
      absl::MutexLock lock(&mu_);
      posted_[rank] = std::move(posted);
    }
    if (absl::Status s = Barrier(rank, posted_[rank].signature); !s.ok()) return s;
    absl::MutexLock lock(&mu_);
    if (!broken_.empty()) return absl::AbortedError(broken_);
    for (int r = 0; r < size_; ++r) {
      if (posted_[r].signature != posted_[0].signature) {
        // The ranks went different ways: none reads another's tensor, and
        // the group is done (a rank seeing no mismatch later would wait
        // for ranks that will never come).
        const std::string error =
            absl::StrCat("tensor-parallel collective: rank 0 called ", posted_[0].signature,
                         ", rank ", r, " called ", posted_[r].signature);
        if (broken_.empty()) broken_ = error;
        return absl::InvalidArgumentError(error);
      }
    }
    return absl::OkStatus();
  }
  // Waits until every rank has read what it needed from the others.
  absl::Status Leave(int rank, std::string_view op) { return Barrier(rank, op); }

  const Tensor& posted(int rank) const { return *posted_[rank].tensor; }

  void Abort(std::string_view reason) {
    absl::MutexLock lock(&mu_);
    if (broken_.empty())
      broken_ = absl::StrCat("tensor-parallel group aborted: ", std::string(reason));
  }
  absl::Status Health() {
    absl::MutexLock lock(&mu_);
    return broken_.empty() ? absl::OkStatus() : absl::AbortedError(broken_);
  }

 private:
  absl::Status Barrier(int rank, std::string_view op) {
    absl::MutexLock lock(&mu_);
    if (!broken_.empty()) return absl::AbortedError(broken_);
    const uint64_t generation = generation_;
    here_[rank] = true;
    if (++arrived_ == size_) {
      arrived_ = 0;
      here_.assign(size_, false);
      ++generation_;
      return absl::OkStatus();
    }
    auto passed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return generation_ != generation || !broken_.empty();
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&passed), absl::FromChrono(timeout_))) {
      std::vector<int> missing;
      for (int r = 0; r < size_; ++r) {
        if (!here_[r]) missing.push_back(r);
      }
      broken_ = absl::StrCat("tensor-parallel ", std::string(op), " on rank ", rank, ": rank(s) ",
                             absl::StrJoin(missing, ", "), " did not join within ",
                             timeout_.count(), " ms");
      return absl::DeadlineExceededError(broken_);
    }
    if (generation_ == generation) return absl::AbortedError(broken_);
    return absl::OkStatus();
  }

  const int size_;
  const std::chrono::milliseconds timeout_;
  absl::Mutex mu_;
  std::vector<Posted> posted_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> here_ ABSL_GUARDED_BY(mu_);  // arrived at the current barrier
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::string broken_ ABSL_GUARDED_BY(mu_);  // why the group broke; empty while usable
};

class InProcessCommunicator : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank)
      : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  std::string_view name() const override { return "in-process"; }
  std::chrono::milliseconds timeout() const override { return group_->timeout(); }

  absl::Status AllReduceSum(Tensor& data) override {
    if (!data.defined() || data.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor-parallel all-reduce: the in-process group sums f32 tensors, got ",
                       data.defined() ? DTypeName(data.dtype()) : "an undefined tensor"));
    }
    if (absl::Status s = group_->Enter(rank_, {&data, Signature("all-reduce", data)}); !s.ok()) {
      return s;
    }
    const auto n = static_cast<size_t>(data.numel());
    sum_.assign(n, 0.0f);
    for (int r = 0; r < size(); ++r) {
      const float* in = group_->posted(r).data_as<const float>();
      for (size_t i = 0; i < n; ++i) sum_[i] += in[i];
    }
    if (absl::Status s = group_->Leave(rank_, "all-reduce"); !s.ok()) return s;
    std::memcpy(data.data(), sum_.data(), n * sizeof(float));
    return absl::OkStatus();
  }

  absl::Status AllGather(const Tensor& in, Tensor& out) override {
    if (!in.defined() || !out.defined() || in.dtype() != out.dtype() || in.rank() < 1 ||
        in.rank() > 2 || out.rank() != in.rank() || (in.rank() == 2 && in.dim(0) != out.dim(0)) ||
        out.dim(-1) != in.dim(-1) * size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor-parallel all-gather: ", in.DebugString(), " from each of ", size(),
                       " ranks does not fill ", out.DebugString()));
    }
    if (absl::Status s = group_->Enter(rank_, {&in, Signature("all-gather", in)}); !s.ok()) {
      return s;
    }
    const int64_t rows = in.rank() == 2 ? in.dim(0) : 1;
    const size_t piece = static_cast<size_t>(in.dim(-1)) * DTypeSize(in.dtype());
    auto* dst = static_cast<char*>(out.data());
    for (int r = 0; r < size(); ++r) {
      const auto* src = static_cast<const char*>(group_->posted(r).data());
      for (int64_t row = 0; row < rows; ++row) {
        std::memcpy(dst + (row * size() + r) * piece, src + row * piece, piece);
      }
    }
    return group_->Leave(rank_, "all-gather");
  }

  absl::Status Broadcast(Tensor& data, int root) override {
    if (!data.defined() || root < 0 || root >= size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor-parallel broadcast: root ", root,
                                                     " of ", size(), " ranks, or no tensor"));
    }
    if (absl::Status s = group_->Enter(rank_, {&data, Signature("broadcast", data, root)});
        !s.ok()) {
      return s;
    }
    if (rank_ != root) std::memcpy(data.data(), group_->posted(root).data(), data.nbytes());
    return group_->Leave(rank_, "broadcast");
  }

  void Abort(std::string_view reason) override { group_->Abort(reason); }
  absl::Status Health() const override { return group_->Health(); }

 private:
  std::shared_ptr<Group> group_;
  const int rank_;
  std::vector<float> sum_;  // all-reduce scratch, reused
};

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateInProcessGroup(
    int size, std::chrono::milliseconds timeout) {
  if (size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor-parallel group of ", size, " ranks: at least one"));
  }
  if (timeout.count() <= 0) {
    return absl::InvalidArgumentError("tensor-parallel group: the collective timeout must be > 0");
  }
  auto group = std::make_shared<Group>(size, timeout);
  std::vector<std::unique_ptr<Communicator>> ranks;
  for (int r = 0; r < size; ++r) {
    ranks.push_back(std::make_unique<InProcessCommunicator>(group, r));
  }
  return ranks;
}

}  // namespace strata::engine

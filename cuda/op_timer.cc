#include "cuda/op_timer.h"

#include <string>

#include "common/status_macros.h"

namespace strata::cuda {

OpTimer::Scope::Scope(OpTimer* timer, const char* op, cudaStream_t stream) {
  if (!timer->enabled_) return;
  const int start = timer->AcquireEvent();
  const int end = timer->AcquireEvent();
  if (start < 0 || end < 0) return;
  if (cudaEventRecord(timer->events_[start].get(), stream) != cudaSuccess) {
    LogIfError(cudaGetLastError(), "cudaEventRecord (op timing)");
    return;
  }
  timer_ = timer;
  stream_ = stream;
  pending_ = static_cast<int>(timer->pending_.size());
  timer->pending_.push_back({op, start, end});
}

OpTimer::Scope::~Scope() {
  if (timer_ == nullptr) return;
  const Pending& p = timer_->pending_[pending_];
  if (cudaEventRecord(timer_->events_[p.end].get(), stream_) != cudaSuccess) {
    LogIfError(cudaGetLastError(), "cudaEventRecord (op timing)");
    timer_->pending_[pending_].op = nullptr;  // dropped from the totals
  }
}

int OpTimer::AcquireEvent() {
  if (next_event_ == static_cast<int>(events_.size())) {
    absl::StatusOr<CudaEvent> event = CudaEvent::Create(/*timing=*/true);
    if (!event.ok()) return -1;
    events_.push_back(*std::move(event));
  }
  return next_event_++;
}

absl::StatusOr<std::vector<engine::OpTime>> OpTimer::Take() {
  std::vector<engine::OpTime> totals;
  absl::flat_hash_map<std::string, size_t> index;
  for (const Pending& p : pending_) {
    if (p.op == nullptr) continue;
    STRATA_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(events_[p.end].get()));
    float ms = 0;
    STRATA_CUDA_RETURN_IF_ERROR(
        cudaEventElapsedTime(&ms, events_[p.start].get(), events_[p.end].get()));
    auto [it, inserted] = index.try_emplace(p.op, totals.size());
    if (inserted) totals.push_back({p.op, 0, 0.0});
    engine::OpTime& t = totals[it->second];
    ++t.calls;
    t.ms += ms;
  }
  pending_.clear();
  next_event_ = 0;
  return totals;
}

}  // namespace strata::cuda

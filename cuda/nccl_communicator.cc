#include "cuda/nccl_communicator.h"

#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#if STRATA_HAVE_NCCL

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.h"
#include "cuda/nccl_library.h"

namespace strata::cuda {
namespace {

using Clock = std::chrono::steady_clock;
using engine::DType;
using engine::Tensor;

// NCCL's own setup (topology discovery, shared memory, proxies) takes
// seconds, so creation is not held to a tight collective timeout.
constexpr std::chrono::milliseconds kMinSetupTime = std::chrono::seconds(60);
// How long a healthy teardown may take to finalise before it is left to
// finish in the background (it only waits longer when CUDA graphs still
// hold the communicators).
constexpr std::chrono::milliseconds kMaxFinalizeWait = std::chrono::seconds(10);
// What the last communicator's destructor waits beyond the timeout.
constexpr std::chrono::milliseconds kTeardownGrace = std::chrono::seconds(5);

int64_t Millis(std::chrono::milliseconds d) { return static_cast<int64_t>(d.count()); }

bool Pending(ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; }

// Status code for an NCCL failure: a peer or the network going away is
// Unavailable, the rest (CUDA errors, internal errors, misuse) Internal.
absl::StatusCode NcclCode(ncclResult_t r) {
  return r == ncclRemoteError || r == ncclSystemError ? absl::StatusCode::kUnavailable
                                                      : absl::StatusCode::kInternal;
}

// Waits for the rank's NCCL call to finish in the background: spins for a
// little while (a collective's launch usually takes tens of microseconds),
// then sleeps in growing steps.
void Backoff(int attempt) {
  if (attempt < 200) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(std::min(1000, 20 * (attempt - 199))));
  }
}

// A collective enqueued outside a capture, bracketed by two events.
struct Watched {
  const char* what = "";  // "all-reduce"
  cudaEvent_t start = nullptr;
  cudaEvent_t end = nullptr;
  bool started = false;
  Clock::time_point deadline;  // once `start` has fired
};

// One rank's NCCL state; owned by the group, so that it outlives the rank's
// communicator until the group's teardown is over.
struct Rank {
  Rank(int index, int device) : index(index), device(device) {}

  const int index;
  const int device;
  // Serialises calls on `comm` between the rank's thread and the watchdog,
  // and its release; null once aborted or destroyed.
  absl::Mutex call_mu;
  ncclComm_t comm ABSL_GUARDED_BY(call_mu) = nullptr;
  // Guarded by Group::mu_ (Rank does not name it).
  std::deque<Watched> watched;
  std::vector<cudaEvent_t> free_events;
  // The rank's thread only, then the teardown. Scratch of AllGather; the
  // buffers it replaced while graphs could hold them stay until teardown.
  DeviceBuffer scratch;
  bool scratch_in_graphs = false;
  std::vector<DeviceBuffer> retired;
  std::atomic<bool> captured{false};  // a collective was recorded into a graph
};

// What the ranks' communicators share: the NCCL library, the ranks, the
// broken state and the watchdog thread.
class Group {
 public:
  Group(const NcclLibrary& nccl, std::chrono::milliseconds timeout,
        std::vector<std::unique_ptr<Rank>> ranks)
      : nccl(nccl),
        timeout(timeout),
        ranks(std::move(ranks)),
        interval_(std::clamp<std::chrono::milliseconds>(timeout / 20, std::chrono::milliseconds(1),
                                                        std::chrono::milliseconds(100))),
        live_(static_cast<int>(this->ranks.size())) {}
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  static void StartWatchdog(const std::shared_ptr<Group>& group) {
    // The thread holds the group, so a teardown it is left to finish alone
    // (see Release) still has it.
    group->watchdog_ = std::thread([group] { group->WatchdogMain(); });
  }

  int size() const { return static_cast<int>(ranks.size()); }

  // OK, or Aborted with the reason the group broke.
  absl::Status Health() {
    absl::MutexLock lock(&mu_);
    return broken_ ? absl::AbortedError(reason_) : absl::OkStatus();
  }

  // Breaks the group (the first reason stays) and has the watchdog abort
  // the NCCL communicators. Never blocks on NCCL: ncclCommAbort may wait
  // for CUDA graphs to go (see the header), which a rank's own thread or an
  // Abort caller must not.
  void Break(const std::string& reason) {
    absl::MutexLock lock(&mu_);
    BreakLocked(reason);
  }

  // Two events for a collective, from the rank's pool or new (on the
  // current device, the rank's).
  absl::Status TakeEvents(Rank& rank, cudaEvent_t* start, cudaEvent_t* end) {
    {
      absl::MutexLock lock(&mu_);
      if (rank.free_events.size() >= 2) {
        *start = rank.free_events.back();
        rank.free_events.pop_back();
        *end = rank.free_events.back();
        rank.free_events.pop_back();
        return absl::OkStatus();
      }
    }
    STRATA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(start, cudaEventDisableTiming));
    const cudaError_t second = cudaEventCreateWithFlags(end, cudaEventDisableTiming);
    if (second != cudaSuccess) {
      LogIfError(cudaEventDestroy(*start), "cudaEventDestroy");
      return STRATA_CUDA_STATUS(second);
    }
    return absl::OkStatus();
  }
  void ReturnEvents(Rank& rank, cudaEvent_t start, cudaEvent_t end) {
    absl::MutexLock lock(&mu_);
    rank.free_events.push_back(start);
    rank.free_events.push_back(end);
  }
  // Hands a collective enqueued between `start` and `end` to the watchdog.
  void Watch(Rank& rank, const char* what, cudaEvent_t start, cudaEvent_t end) {
    Watched w;
    w.what = what;
    w.start = start;
    w.end = end;
    absl::MutexLock lock(&mu_);
    rank.watched.push_back(w);
  }

  // Called by each communicator's destructor; the last one has the watchdog
  // tear the group down, and waits for that a bounded time.
  void Release() {
    bool finished = false;
    bool captured = false;
    for (const auto& rank : ranks) captured = captured || rank->captured.load();
    {
      absl::MutexLock lock(&mu_);
      if (--live_ > 0) return;
      stop_ = true;
      wake_.Signal();
      mu_.AwaitWithTimeout(absl::Condition(this, &Group::TeardownSettled),
                           absl::FromChrono(timeout + kTeardownGrace));
      finished = done_;
    }
    if (finished) {
      watchdog_.join();
      return;
    }
    STRATA_LOG_ERROR(
        "tensor-parallel group: NCCL has not released its communicators{}; their teardown "
        "goes on in the background",
        captured ? " (CUDA graphs that recorded their collectives still exist: release them, "
                   "or destroy the backends, before the communicators)"
                 : "");
    watchdog_.detach();
  }

  const NcclLibrary& nccl;
  const std::chrono::milliseconds timeout;
  const std::vector<std::unique_ptr<Rank>> ranks;

 private:
  void BreakLocked(const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (broken_) return;
    broken_ = true;
    reason_ = reason;
    abort_pending_ = true;
    wake_.Signal();
    STRATA_LOG_ERROR("tensor-parallel group broken: {}", reason);
  }

  bool TeardownSettled() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done_ || parked_; }

  bool NothingWatchedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const auto& rank : ranks) {
      if (!rank->watched.empty()) return false;
    }
    return true;
  }

  void WatchdogMain() {
    while (true) {
      bool abort_now = false;
      bool finish = false;
      {
        absl::MutexLock lock(&mu_);
        // Once every rank is gone, the watched collectives still get their
        // time to finish (or to time out) before the teardown.
        const bool finishable = stop_ && (broken_ || NothingWatchedLocked());
        if (!abort_pending_ && !finishable) {
          wake_.WaitWithTimeout(&mu_, absl::FromChrono(interval_));
        }
        abort_now = std::exchange(abort_pending_, false);
        finish = stop_ && (broken_ || NothingWatchedLocked());
      }
      if (abort_now) AbortAll();
      if (finish) break;
      Poll();
    }
    Teardown();
    absl::MutexLock lock(&mu_);
    done_ = true;
  }

  // Retires finished collectives, starts the clocks of those that began,
  // breaks the group when one ran out of time or NCCL reports an error.
  void Poll() {
    const Clock::time_point now = Clock::now();
    for (const auto& rank_ptr : ranks) {
      Rank& rank = *rank_ptr;
      {
        absl::MutexLock lock(&mu_);
        if (!rank.watched.empty()) LogIfError(cudaSetDevice(rank.device), "cudaSetDevice");
        // A stream runs its work in order: the first unfinished collective
        // is the only one that needs a look.
        while (!rank.watched.empty()) {
          Watched& w = rank.watched.front();
          if (!w.started) {
            const cudaError_t began = cudaEventQuery(w.start);
            if (began == cudaErrorNotReady) break;
            if (began != cudaSuccess) {
              BreakLocked(absl::StrCat("tensor-parallel ", w.what, " on rank ", rank.index,
                                       ": CUDA error ", cudaGetErrorName(began), " (",
                                       cudaGetErrorString(began), ")"));
              break;
            }
            w.started = true;
            w.deadline = now + timeout;
          }
          const cudaError_t ended = cudaEventQuery(w.end);
          if (ended == cudaSuccess) {
            rank.free_events.push_back(w.start);
            rank.free_events.push_back(w.end);
            rank.watched.pop_front();
            continue;
          }
          if (ended != cudaErrorNotReady) {
            BreakLocked(absl::StrCat("tensor-parallel ", w.what, " on rank ", rank.index,
                                     ": CUDA error ", cudaGetErrorName(ended), " (",
                                     cudaGetErrorString(ended), ")"));
          } else if (now >= w.deadline) {
            BreakLocked(absl::StrCat("tensor-parallel ", w.what, " on rank ", rank.index,
                                     " did not complete within ", Millis(timeout), " ms"));
          }
          break;
        }
      }
      // Errors NCCL found on its own threads (a peer's proxy, the network).
      std::string error;
      {
        absl::MutexLock lock(&rank.call_mu);
        ncclResult_t state = ncclSuccess;
        if (rank.comm != nullptr) {
          const ncclResult_t r = nccl.CommGetAsyncError(rank.comm, &state);
          if (r != ncclSuccess) state = r;
          if (!Pending(state)) error = nccl.Describe(state, rank.comm);
        }
      }
      if (!error.empty()) {
        Break(absl::StrCat("tensor-parallel group: NCCL failed on rank ", rank.index, ": ", error));
      }
    }
  }

  // ncclCommAbort on every communicator not yet released: their kernels
  // return, so every rank's stream gets past its collectives.
  void AbortAll() {
    for (const auto& rank : ranks) {
      ncclComm_t comm = nullptr;
      {
        absl::MutexLock lock(&rank->call_mu);
        comm = std::exchange(rank->comm, nullptr);
      }
      if (comm == nullptr) continue;
      LogIfError(cudaSetDevice(rank->device), "cudaSetDevice");
      if (const ncclResult_t r = nccl.CommAbort(comm); r != ncclSuccess) {
        STRATA_LOG_ERROR("ncclCommAbort on rank {}: {}", rank->index, nccl.Describe(r, nullptr));
      }
    }
  }

  // Finalises and destroys the communicators of a healthy group; aborts
  // them when NCCL reports an error.
  void FinalizeAndDestroy() {
    std::vector<ncclComm_t> comms;
    for (const auto& rank : ranks) {
      absl::MutexLock lock(&rank->call_mu);
      comms.push_back(std::exchange(rank->comm, nullptr));
    }
    auto abort_all = [&] {
      for (int i = 0; i < size(); ++i) {
        if (comms[i] == nullptr) continue;
        LogIfError(cudaSetDevice(ranks[i]->device), "cudaSetDevice");
        (void)nccl.CommAbort(comms[i]);
      }
    };
    // Non-blocking: each call returns at once and NCCL finalises every
    // communicator in the background, so one thread can finalise them all
    // (a blocking finalise waits for its peers).
    for (int i = 0; i < size(); ++i) {
      if (comms[i] == nullptr) continue;
      LogIfError(cudaSetDevice(ranks[i]->device), "cudaSetDevice");
      if (const ncclResult_t r = nccl.CommFinalize(comms[i]); !Pending(r)) {
        STRATA_LOG_ERROR("ncclCommFinalize on rank {}: {}", i, nccl.Describe(r, comms[i]));
        abort_all();
        return;
      }
    }
    const Clock::time_point deadline = Clock::now() + std::min(timeout, kMaxFinalizeWait);
    for (int attempt = 0;; ++attempt) {
      bool all_done = true;
      for (int i = 0; i < size(); ++i) {
        if (comms[i] == nullptr) continue;
        ncclResult_t state = ncclSuccess;
        const ncclResult_t r = nccl.CommGetAsyncError(comms[i], &state);
        if (r != ncclSuccess) state = r;
        if (!Pending(state)) {
          STRATA_LOG_ERROR("finalising NCCL on rank {}: {}", i, nccl.Describe(state, comms[i]));
          abort_all();
          return;
        }
        all_done = all_done && state == ncclSuccess;
      }
      if (all_done) break;
      if (Clock::now() >= deadline) {
        // NCCL waits for the graphs that recorded its collectives to be
        // destroyed; let the last destructor return meanwhile.
        absl::MutexLock lock(&mu_);
        if (!parked_) {
          parked_ = true;
          STRATA_LOG_WARN(
              "tensor-parallel group: NCCL is still finalising its communicators after {} ms",
              Millis(std::min(timeout, kMaxFinalizeWait)));
        }
      }
      if (Parked()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      } else {
        Backoff(attempt);
      }
    }
    // Finalised: destroying frees local resources without waiting.
    for (int i = 0; i < size(); ++i) {
      if (comms[i] == nullptr) continue;
      LogIfError(cudaSetDevice(ranks[i]->device), "cudaSetDevice");
      if (const ncclResult_t r = nccl.CommDestroy(comms[i]); r != ncclSuccess) {
        STRATA_LOG_ERROR("ncclCommDestroy on rank {}: {}", i, nccl.Describe(r, nullptr));
      }
    }
  }

  bool Parked() {
    absl::MutexLock lock(&mu_);
    return parked_;
  }

  void Teardown() {
    bool broken = false;
    {
      absl::MutexLock lock(&mu_);
      broken = broken_;
    }
    if (broken) {
      AbortAll();  // nothing left to do if the break already did
    } else {
      FinalizeAndDestroy();
    }
    // No kernel of the group runs any more: its memory can go.
    for (const auto& rank : ranks) {
      LogIfError(cudaSetDevice(rank->device), "cudaSetDevice");
      rank->scratch.Reset();
      rank->retired.clear();
      absl::MutexLock lock(&mu_);
      for (const Watched& w : rank->watched) {
        rank->free_events.push_back(w.start);
        rank->free_events.push_back(w.end);
      }
      rank->watched.clear();
      for (cudaEvent_t e : rank->free_events) LogIfError(cudaEventDestroy(e), "cudaEventDestroy");
      rank->free_events.clear();
    }
  }

  const std::chrono::milliseconds interval_;  // the watchdog's polling period
  absl::Mutex mu_;
  absl::CondVar wake_;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  std::string reason_ ABSL_GUARDED_BY(mu_);
  bool abort_pending_ ABSL_GUARDED_BY(mu_) = false;  // broken, not yet aborted
  int live_ ABSL_GUARDED_BY(mu_);                    // communicators not destroyed
  bool stop_ ABSL_GUARDED_BY(mu_) = false;           // every communicator is gone
  bool parked_ ABSL_GUARDED_BY(mu_) = false;         // teardown waits for graphs
  bool done_ ABSL_GUARDED_BY(mu_) = false;           // teardown over
  std::thread watchdog_;
};

class NcclCommunicator final : public engine::Communicator {
 public:
  NcclCommunicator(std::shared_ptr<Group> group, Rank* rank, engine::Backend* backend)
      : group_(std::move(group)), rank_(rank), backend_(backend) {}
  ~NcclCommunicator() override { group_->Release(); }

  int rank() const override { return rank_->index; }
  int size() const override { return group_->size(); }
  std::string_view name() const override { return "nccl"; }
  std::chrono::milliseconds timeout() const override { return group_->timeout; }

  absl::Status AllReduceSum(Tensor& data) override;
  absl::Status AllGather(const Tensor& in, Tensor& out) override;
  absl::Status Broadcast(Tensor& data, int root) override;
  void Abort(std::string_view reason) override {
    group_->Break(
        absl::StrCat("tensor-parallel group aborted by rank ", rank(), ": ", std::string(reason)));
  }
  absl::Status Health() const override { return group_->Health(); }

 private:
  struct Queue {
    cudaStream_t stream = nullptr;
    bool capturing = false;
  };
  using Call = absl::FunctionRef<ncclResult_t(ncclComm_t, cudaStream_t)>;

  // The rank's stream, made current with its device, and whether it is
  // being captured; Aborted once the group is broken.
  absl::StatusOr<Queue> Begin(const char* op);
  // Enqueues `call` on the queue and waits until NCCL has (ncclInProgress),
  // for at most the timeout. Outside a capture the watchdog gets it.
  absl::Status Launch(const char* what, const Queue& queue, Call call);
  // AllGather's scratch of at least `bytes`.
  absl::StatusOr<void*> Scratch(size_t bytes, bool capturing);
  // The status a failing NCCL call returns on this rank; breaks the group,
  // since peers would otherwise wait for this rank's part.
  absl::Status Fail(absl::StatusCode code, const std::string& message) {
    group_->Break(message);
    return absl::Status(code, message);
  }

  const NcclLibrary& nccl() const { return group_->nccl; }

  std::shared_ptr<Group> group_;
  Rank* rank_;
  engine::Backend* backend_;
};

absl::StatusOr<NcclCommunicator::Queue> NcclCommunicator::Begin(const char* op) {
  STRATA_RETURN_IF_ERROR(group_->Health());
  STRATA_ASSIGN_OR_RETURN(const CudaStreamInfo info, StreamOf(*backend_));
  if (info.device != rank_->device) {
    return absl::InternalError(absl::StrCat(op, ": rank ", rank_->index, "'s backend moved from ",
                                            "device ", rank_->device, " to ", info.device));
  }
  STRATA_CUDA_RETURN_IF_ERROR(cudaSetDevice(info.device));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  STRATA_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(info.stream, &capture));
  if (capture == cudaStreamCaptureStatusInvalidated) {
    // The capture already failed; enqueueing would be an NCCL error that
    // breaks the group for a local problem.
    return absl::FailedPreconditionError(
        absl::StrCat(op, ": the graph capture of rank ", rank_->index, " was invalidated"));
  }
  return Queue{info.stream, capture == cudaStreamCaptureStatusActive};
}

absl::Status NcclCommunicator::Launch(const char* what, const Queue& queue, Call call) {
  Rank& rank = *rank_;
  // Replays of a graph are single launches the group never sees, so only
  // collectives enqueued directly are watched (and events cannot be
  // recorded into a capture for the watchdog to query anyway).
  cudaEvent_t start = nullptr;
  cudaEvent_t end = nullptr;
  if (!queue.capturing) {
    STRATA_RETURN_IF_ERROR(group_->TakeEvents(rank, &start, &end));
    if (const cudaError_t e = cudaEventRecord(start, queue.stream); e != cudaSuccess) {
      group_->ReturnEvents(rank, start, end);
      return STRATA_CUDA_STATUS(e);
    }
  }
  auto give_back_events = [&] {
    if (start != nullptr) group_->ReturnEvents(rank, start, end);
  };
  const Clock::time_point deadline = Clock::now() + group_->timeout;
  for (int attempt = 0;; ++attempt) {
    ncclResult_t state = ncclSuccess;
    std::string error;
    {
      absl::MutexLock lock(&rank.call_mu);
      if (rank.comm == nullptr) break;  // aborted: Health says why
      if (attempt == 0) {
        state = call(rank.comm, queue.stream);
      } else {
        const ncclResult_t r = nccl().CommGetAsyncError(rank.comm, &state);
        if (r != ncclSuccess) state = r;
      }
      if (!Pending(state)) error = nccl().Describe(state, rank.comm);
    }
    if (state == ncclSuccess) {
      if (queue.capturing) {
        rank.captured = true;
        return absl::OkStatus();
      }
      if (const cudaError_t e = cudaEventRecord(end, queue.stream); e != cudaSuccess) {
        give_back_events();
        return STRATA_CUDA_STATUS(e);
      }
      group_->Watch(rank, what, start, end);
      return absl::OkStatus();
    }
    if (!error.empty()) {
      give_back_events();
      return Fail(NcclCode(state), absl::StrCat("tensor-parallel ", what, " on rank ", rank.index,
                                                ": NCCL error ", error));
    }
    // In progress: NCCL launches it from a thread of its own. The stream
    // must not get more work until it has (NCCL's rule for non-blocking
    // communicators), so the call does not return before.
    if (!group_->Health().ok()) break;
    if (Clock::now() >= deadline) {
      give_back_events();
      return Fail(absl::StatusCode::kDeadlineExceeded,
                  absl::StrCat("tensor-parallel ", what, " on rank ", rank.index,
                               " did not complete within ", Millis(group_->timeout), " ms"));
    }
    Backoff(attempt);
  }
  give_back_events();
  const absl::Status health = group_->Health();
  return health.ok() ? absl::AbortedError("tensor-parallel group: communicator released") : health;
}

absl::StatusOr<void*> NcclCommunicator::Scratch(size_t bytes, bool capturing) {
  Rank& rank = *rank_;
  if (rank.scratch.size() < bytes) {
    // A capture may not allocate, and the recording would keep the address.
    if (capturing) {
      return absl::FailedPreconditionError(
          absl::StrCat("AllGather: its scratch buffer would have to grow to ", bytes,
                       " bytes during a graph capture; run the collective once outside a capture "
                       "first"));
    }
    if (rank.scratch_in_graphs) {
      rank.retired.push_back(std::move(rank.scratch));
      rank.scratch_in_graphs = false;
    }
    rank.scratch.Reset();  // cudaFree waits for the device, so earlier users are done
    STRATA_ASSIGN_OR_RETURN(rank.scratch, DeviceBuffer::Allocate(bytes));
  }
  if (capturing) rank.scratch_in_graphs = true;
  return rank.scratch.data();
}

absl::Status NcclCommunicator::AllReduceSum(Tensor& data) {
  constexpr char kOp[] = "AllReduceSum";
  if (!data.defined()) return absl::InvalidArgumentError("AllReduceSum: tensor is undefined");
  ncclDataType_t type = ncclFloat32;
  switch (data.dtype()) {
    case DType::kF32:
      type = ncclFloat32;
      break;
    case DType::kBF16:
      type = ncclBfloat16;
      break;
    case DType::kF16:
      type = ncclFloat16;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "AllReduceSum: NCCL sums f32, bf16 or f16 tensors, not ", data.DebugString()));
  }
  STRATA_ASSIGN_OR_RETURN(const Queue queue, Begin(kOp));
  if (data.numel() == 0) return absl::OkStatus();
  return Launch("all-reduce", queue, [&](ncclComm_t comm, cudaStream_t stream) {
    return nccl().AllReduce(data.data(), data.data(), static_cast<size_t>(data.numel()), type,
                            ncclSum, comm, stream);
  });
}

absl::Status NcclCommunicator::AllGather(const Tensor& in, Tensor& out) {
  constexpr char kOp[] = "AllGather";
  const int n = size();
  if (!in.defined() || !out.defined()) {
    return absl::InvalidArgumentError("AllGather: undefined tensor");
  }
  bool shapes_ok = in.dtype() == out.dtype() && in.rank() >= 1 && out.rank() == in.rank() &&
                   out.dim(-1) == n * in.dim(-1);
  for (int d = 0; shapes_ok && d + 1 < in.rank(); ++d) shapes_ok = in.dim(d) == out.dim(d);
  if (!shapes_ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("AllGather: expected in [rows, cols] and out [rows, ", n,
                     " * cols] of one dtype (", in.DebugString(), ", ", out.DebugString(), ")"));
  }
  const size_t in_bytes = in.nbytes();
  STRATA_ASSIGN_OR_RETURN(const Queue queue, Begin(kOp));
  if (in_bytes == 0) return absl::OkStatus();
  const size_t row_bytes = static_cast<size_t>(in.dim(-1)) * engine::DTypeSize(in.dtype());
  const size_t rows = in_bytes / row_bytes;
  // NCCL concatenates along the first dimension, in rank order. With one
  // row (or one rank) that already is the layout asked for.
  if (rows == 1 || n == 1) {
    return Launch("all-gather", queue, [&](ncclComm_t comm, cudaStream_t stream) {
      return nccl().AllGather(in.data(), out.data(), in_bytes, ncclInt8, comm, stream);
    });
  }
  STRATA_ASSIGN_OR_RETURN(void* scratch, Scratch(in_bytes * n, queue.capturing));
  STRATA_RETURN_IF_ERROR(Launch("all-gather", queue, [&](ncclComm_t comm, cudaStream_t stream) {
    return nccl().AllGather(in.data(), scratch, in_bytes, ncclInt8, comm, stream);
  }));
  // scratch holds every rank's [rows, cols] block in turn; rank r's block
  // becomes columns [r * cols, (r + 1) * cols) of out.
  auto* dst = static_cast<char*>(out.data());
  const auto* src = static_cast<const char*>(scratch);
  for (int r = 0; r < n; ++r) {
    STRATA_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(dst + r * row_bytes, n * row_bytes,
                                                  src + r * in_bytes, row_bytes, row_bytes, rows,
                                                  cudaMemcpyDeviceToDevice, queue.stream));
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Broadcast(Tensor& data, int root) {
  constexpr char kOp[] = "Broadcast";
  if (!data.defined()) return absl::InvalidArgumentError("Broadcast: tensor is undefined");
  if (root < 0 || root >= size()) {
    return absl::InvalidArgumentError(absl::StrCat("Broadcast: root ", root,
                                                   " is not a rank of this group of ", size(), " (",
                                                   data.DebugString(), ")"));
  }
  STRATA_ASSIGN_OR_RETURN(const Queue queue, Begin(kOp));
  if (data.nbytes() == 0) return absl::OkStatus();
  return Launch("broadcast", queue, [&](ncclComm_t comm, cudaStream_t stream) {
    return nccl().Broadcast(data.data(), data.data(), data.nbytes(), ncclInt8, root, comm, stream);
  });
}

// Aborts the communicators of a group whose creation failed. Nothing has
// been captured yet, so NCCL's abort does not wait.
void AbortCreated(const NcclLibrary& nccl, std::span<const ncclComm_t> comms,
                  std::span<const int> devices) {
  for (size_t i = 0; i < comms.size(); ++i) {
    if (comms[i] == nullptr) continue;
    LogIfError(cudaSetDevice(devices[i]), "cudaSetDevice");
    (void)nccl.CommAbort(comms[i]);
  }
}

// Creates the communicators in one NCCL group from this thread and waits
// until every one is ready.
absl::Status InitComms(const NcclLibrary& nccl, std::span<const int> devices,
                       std::chrono::milliseconds setup_time, std::vector<ncclComm_t>& comms) {
  const int n = static_cast<int>(devices.size());
  ncclUniqueId id;
  if (const ncclResult_t r = nccl.GetUniqueId(&id); r != ncclSuccess) {
    return absl::Status(NcclCode(r), absl::StrCat("CreateNcclGroup: ncclGetUniqueId failed: ",
                                                  nccl.Describe(r, nullptr)));
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every call returns at once: see the header
  comms.assign(n, nullptr);
  std::string error;
  if (const ncclResult_t r = nccl.GroupStart(); r != ncclSuccess) {
    return absl::InternalError(
        absl::StrCat("CreateNcclGroup: ncclGroupStart failed: ", nccl.Describe(r, nullptr)));
  }
  for (int i = 0; i < n && error.empty(); ++i) {
    // NCCL binds a communicator to the device current at its creation. (No
    // early return: the group must be ended.)
    if (const cudaError_t e = cudaSetDevice(devices[i]); e != cudaSuccess) {
      error = STRATA_CUDA_STATUS(e).ToString();
      break;
    }
    const ncclResult_t r = nccl.CommInitRankConfig(&comms[i], n, id, i, &config);
    if (!Pending(r) && error.empty()) {
      error = absl::StrCat("ncclCommInitRankConfig for rank ", i, " (device ", devices[i],
                           ") failed: ", nccl.Describe(r, nullptr));
    }
  }
  if (const ncclResult_t r = nccl.GroupEnd(); !Pending(r) && error.empty()) {
    error = absl::StrCat("ncclGroupEnd failed: ", nccl.Describe(r, nullptr));
  }
  if (!error.empty()) return absl::InternalError(absl::StrCat("CreateNcclGroup: ", error));
  const Clock::time_point deadline = Clock::now() + setup_time;
  for (int attempt = 0;; ++attempt) {
    bool all_ready = true;
    for (int i = 0; i < n; ++i) {
      if (comms[i] == nullptr) {
        return absl::InternalError(
            absl::StrCat("CreateNcclGroup: NCCL returned no communicator for rank ", i));
      }
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = nccl.CommGetAsyncError(comms[i], &state);
      if (r != ncclSuccess) state = r;
      if (!Pending(state)) {
        return absl::Status(NcclCode(state),
                            absl::StrCat("CreateNcclGroup: setting up rank ", i, " (device ",
                                         devices[i], ") failed: ", nccl.Describe(state, comms[i])));
      }
      all_ready = all_ready && state == ncclSuccess;
    }
    if (all_ready) return absl::OkStatus();
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("CreateNcclGroup: NCCL did not set up ", n,
                                                      " communicator(s) within ",
                                                      Millis(setup_time), " ms"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

absl::StatusOr<std::string> NcclVersion() {
  STRATA_ASSIGN_OR_RETURN(const NcclLibrary* nccl, NcclLibrary::Load());
  return absl::StrCat("NCCL ", nccl->version_string(), " (", nccl->path(), ")");
}

absl::StatusOr<std::vector<std::unique_ptr<engine::Communicator>>> CreateNcclGroup(
    std::span<engine::Backend* const> backends, std::chrono::milliseconds timeout) {
  if (backends.empty()) return absl::InvalidArgumentError("CreateNcclGroup: no backends");
  if (timeout.count() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CreateNcclGroup: the timeout must be positive, not ", Millis(timeout), " ms"));
  }
  const int n = static_cast<int>(backends.size());
  std::vector<int> devices;
  for (int i = 0; i < n; ++i) {
    if (backends[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("CreateNcclGroup: backend ", i, " is null"));
    }
    absl::StatusOr<CudaStreamInfo> info = StreamOf(*backends[i]);
    if (!info.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CreateNcclGroup: backend ", i, " (", std::string(backends[i]->name()),
                       ") is not a CUDA backend; an NCCL group needs one CUDA backend per GPU"));
    }
    for (int j = 0; j < i; ++j) {
      if (devices[j] == info->device) {
        return absl::InvalidArgumentError(absl::StrCat("CreateNcclGroup: backends ", j, " and ", i,
                                                       " both drive CUDA device ", info->device,
                                                       "; each rank needs a GPU of its own"));
      }
    }
    devices.push_back(info->device);
  }
  STRATA_ASSIGN_OR_RETURN(const NcclLibrary* nccl, NcclLibrary::Load());

  // Creating the communicators switches this thread's device; give it back.
  int caller_device = -1;
  if (cudaGetDevice(&caller_device) != cudaSuccess) {
    cudaGetLastError();
    caller_device = -1;
  }
  std::vector<ncclComm_t> comms;
  const absl::Status created = InitComms(*nccl, devices, std::max(timeout, kMinSetupTime), comms);
  if (!created.ok()) AbortCreated(*nccl, comms, devices);
  if (caller_device >= 0) LogIfError(cudaSetDevice(caller_device), "cudaSetDevice");
  STRATA_RETURN_IF_ERROR(created);

  std::vector<std::unique_ptr<Rank>> ranks;
  for (int i = 0; i < n; ++i) {
    auto rank = std::make_unique<Rank>(i, devices[i]);
    absl::MutexLock lock(&rank->call_mu);
    rank->comm = comms[i];
    ranks.push_back(std::move(rank));
  }
  auto group = std::make_shared<Group>(*nccl, timeout, std::move(ranks));
  Group::StartWatchdog(group);
  std::vector<std::unique_ptr<engine::Communicator>> communicators;
  for (int i = 0; i < n; ++i) {
    communicators.push_back(
        std::make_unique<NcclCommunicator>(group, group->ranks[i].get(), backends[i]));
  }
  STRATA_LOG_INFO("tensor-parallel group of {} GPU(s) over NCCL {}, timeout {} ms", n,
                  nccl->version_string(), Millis(timeout));
  return communicators;
}

}  // namespace strata::cuda

#else  // !STRATA_HAVE_NCCL

namespace strata::cuda {
namespace {

absl::Status NoNccl() {
  return absl::UnimplementedError(
      "strata was built without NCCL (nccl.h was not found at build time), so it cannot run a "
      "tensor-parallel group on GPUs; rebuild with a CUDA toolkit that ships nccl.h");
}

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<engine::Communicator>>> CreateNcclGroup(
    std::span<engine::Backend* const>, std::chrono::milliseconds) {
  return NoNccl();
}

absl::StatusOr<std::string> NcclVersion() { return NoNccl(); }

}  // namespace strata::cuda

#endif  // STRATA_HAVE_NCCL

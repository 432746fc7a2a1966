// A fixed-size pool of worker threads for data-parallel loops.
//
// ParallelFor splits [0, n) into contiguous chunks, runs them on the workers
// and the calling thread, and returns when all are done. The CPU backend uses
// it for every operator, so a chunk must not depend on another chunk.
//
// Thread-safety: ParallelFor may be called from one thread at a time (the
// pool serialises concurrent callers with a mutex).
#ifndef STRATA_COMMON_THREAD_POOL_H_
#define STRATA_COMMON_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace strata {

class ThreadPool {
 public:
  // num_threads <= 0 means one per hardware thread.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at
  // least min_chunk items (except the last), so tiny loops stay on one thread.
  void ParallelFor(int64_t n, int64_t min_chunk,
                   const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  void WorkerLoop();

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serialises ParallelFor callers

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_chunk_ = 0;
  int64_t next_chunk_ = 0;
  int64_t num_chunks_ = 0;
  int64_t chunks_done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace strata

#endif  // STRATA_COMMON_THREAD_POOL_H_

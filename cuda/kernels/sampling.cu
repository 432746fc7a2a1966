// Token sampling on the device (see sampling.h). The decisions (argmax,
// top-k and top-p sets, the race) use only the arithmetic of
// engine/sample_math.h, so they match the CPU reference bit for bit; the
// logprob's log-sum-exp uses fast intrinsics (it is reported, not decided
// on).
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/kernels/dependent_launch.cuh"
#include "cuda/kernels/sampling.h"
#include "engine/backend.h"
#include "engine/sample_math.h"

namespace strata::cuda::kernels {
namespace {

namespace sm = engine::sample_math;

constexpr int kThreads = 1024;
constexpr int kBins = 256;  // 8 bits of the 16-bit key per radix pass
constexpr unsigned kFullMask = 0xffffffffu;

using U64 = unsigned long long;
using ReduceU64 = cub::BlockReduce<U64, kThreads>;
using ReduceF32 = cub::BlockReduce<float, kThreads>;
using ScanI32 = cub::BlockScan<int, kThreads>;

struct MaxU64 {
  __device__ __forceinline__ U64 operator()(U64 a, U64 b) const { return a > b ? a : b; }
};
struct MaxF32 {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumF32 {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

struct SharedState {
  union {
    ReduceU64::TempStorage reduce_u64;
    ReduceF32::TempStorage reduce_f32;
    ScanI32::TempStorage scan;
  } temp;
  unsigned counts[kBins];
  U64 mass[kBins];
  int bin;    // FindBin's result
  U64 above;  // and the total of the bins before it
  double target;
  int nth_id;
  U64 best;
  float max_value;
  float log_z;
};

struct alignas(16) Bits8 {
  uint16_t v[8];
};

__device__ __forceinline__ float Bf16Value(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// Packs (key, id) so that the maximum has the highest key and, among equal
// keys, the lowest id.
__device__ __forceinline__ U64 PackKeyId(uint32_t key, int id) {
  return (static_cast<U64>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int UnpackId(U64 packed) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(packed));
}

// Calls f(id, bits, valid) for every token of the row. All lanes of a warp
// iterate equally often (lanes past the end get valid == false), so f may
// use full-warp intrinsics; each thread sees its ids in increasing order.
template <bool kVec, typename F>
__device__ __forceinline__ void ForEachToken(const uint16_t* row, int vocab, F&& f) {
  const int lane = threadIdx.x & 31;
  if constexpr (kVec) {
    const int n = vocab / 8;
    const Bits8* p = reinterpret_cast<const Bits8*>(row);
    for (int j = threadIdx.x; j - lane < n; j += kThreads) {
      const bool ok = j < n;
      Bits8 b = {};
      if (ok) b = p[j];
#pragma unroll
      for (int k = 0; k < 8; ++k) f(j * 8 + k, b.v[k], ok);
    }
  } else {
    for (int i = threadIdx.x; i - lane < vocab; i += kThreads) {
      const bool ok = i < vocab;
      f(i, ok ? row[i] : uint16_t{0}, ok);
    }
  }
}

// counts[bin] += 1 for every lane with bin >= 0, one atomic per distinct bin
// of the warp. Called by all lanes of the warp.
__device__ __forceinline__ void HistCount(int bin, unsigned* counts) {
  const unsigned group = __match_any_sync(kFullMask, bin);
  if (bin >= 0 && static_cast<int>(threadIdx.x & 31) == __ffs(group) - 1) {
    atomicAdd(&counts[bin], static_cast<unsigned>(__popc(group)));
  }
}

// mass[bin] += w for every lane with bin >= 0; when the whole warp shares
// the bin (the common case: logits crowd into few exponents) one atomic
// adds the warp's sum. Called by all lanes of the warp.
__device__ __forceinline__ void HistMass(int bin, U64 w, U64* mass) {
  const unsigned group = __match_any_sync(kFullMask, bin);
  if (group == kFullMask) {
    if (bin < 0) return;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) w += __shfl_xor_sync(kFullMask, w, off);
    if ((threadIdx.x & 31) == 0) atomicAdd(&mass[bin], w);
  } else if (bin >= 0 && w > 0) {
    atomicAdd(&mass[bin], w);
  }
}

// Run by warp 0: the first bin b, from 255 down, with
// base + hist[255] + ... + hist[b] >= target; sets s.bin and s.above (base +
// the bins before b).
template <typename T>
__device__ void FindBin(const T* hist, U64 base, double target, SharedState& s) {
  const int lane = threadIdx.x & 31;
  U64 local = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) local += hist[kBins - 1 - 8 * lane - k];
  U64 incl = local;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const U64 other = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += other;
  }
  U64 before = base + incl - local;
  const bool crosses = static_cast<double>(base + incl) >= target &&
                       (lane == 0 || static_cast<double>(before) < target);
  const unsigned who = __ballot_sync(kFullMask, crosses);
  if (who == 0) {  // cannot happen for valid input; keep everything
    if (lane == 0) {
      s.bin = 0;
      s.above = base;
    }
    return;
  }
  if (lane == __ffs(who) - 1) {
    for (int k = 0; k < 8; ++k) {
      const int b = kBins - 1 - 8 * lane - k;
      if (static_cast<double>(before + hist[b]) >= target || k == 7) {
        s.bin = b;
        s.above = before;
        break;
      }
      before += hist[b];
    }
  }
}

// The id of the n-th (1-based) lowest-id token whose key is `key`; each
// thread scans a contiguous chunk, a block scan orders the chunks.
__device__ int NthIdWithKey(const uint16_t* row, int vocab, uint32_t key, int n, SharedState& s) {
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(vocab, begin + chunk);
  int count = 0;
  for (int i = begin; i < end; ++i) count += sm::Key16(row[i]) == key ? 1 : 0;
  __syncthreads();  // s.temp may still be in use
  int before = 0;
  ScanI32(s.temp.scan).ExclusiveSum(count, before);
  if (threadIdx.x == 0) s.nth_id = vocab - 1;
  __syncthreads();
  if (before < n && n <= before + count) {
    int left = n - before;
    for (int i = begin; i < end; ++i) {
      if (sm::Key16(row[i]) == key && --left == 0) {
        s.nth_id = i;
        break;
      }
    }
  }
  __syncthreads();
  return s.nth_id;
}

template <bool kVec>
__global__ void __launch_bounds__(kThreads) SampleTokensKernel(SampleTokensParams p) {
  WaitForPrerequisites();
  __shared__ SharedState s;
  const int tid = threadIdx.x;
  const int vocab = p.vocab;
  const uint16_t* row =
      static_cast<const uint16_t*>(p.logits) + static_cast<int64_t>(blockIdx.x) * vocab;
  const int32_t* f = p.params + static_cast<int64_t>(blockIdx.x) * engine::kSamplingFields;
  const float temperature = __int_as_float(f[engine::kSampleTemperature]);
  const int top_k = f[engine::kSampleTopK];
  const float top_p = __int_as_float(f[engine::kSampleTopP]);
  const uint64_t seed =
      static_cast<uint64_t>(static_cast<uint32_t>(f[engine::kSampleSeedLo])) |
      (static_cast<uint64_t>(static_cast<uint32_t>(f[engine::kSampleSeedHi])) << 32);
  const uint32_t counter = static_cast<uint32_t>(f[engine::kSampleCounter]);
  const bool greedy = !(temperature > 0.0f);
  const int k = (top_k > 0 && top_k < vocab) ? top_k : vocab;
  const bool use_top_k = !greedy && k < vocab;
  const bool use_top_p = !greedy && top_p < 1.0f;

  // ---- Pass 1: argmax, online log-sum-exp, top-k's high-byte histogram.
  for (int i = tid; i < kBins; i += kThreads) s.counts[i] = 0;
  __syncthreads();
  U64 best = 0;
  float m = -INFINITY, sum = 0.0f;
  ForEachToken<kVec>(row, vocab, [&](int id, uint16_t bits, bool ok) {
    const uint32_t key = sm::Key16(bits);
    if (ok) {
      const U64 packed = PackKeyId(key, id);
      best = packed > best ? packed : best;
      const float v = Bf16Value(bits);
      if (v > m) {
        sum = sum * __expf(m - v) + 1.0f;
        m = v;
      } else if (v > -INFINITY) {
        sum += __expf(v - m);
      }
    }
    if (use_top_k) HistCount(ok ? static_cast<int>(key >> 8) : -1, s.counts);
  });
  best = ReduceU64(s.temp.reduce_u64).Reduce(best, MaxU64());
  if (tid == 0) s.best = best;
  __syncthreads();
  const float block_max = ReduceF32(s.temp.reduce_f32).Reduce(m, MaxF32());
  if (tid == 0) s.max_value = block_max;
  __syncthreads();
  const float part = m == -INFINITY ? 0.0f : sum * __expf(m - s.max_value);
  const float total = ReduceF32(s.temp.reduce_f32).Reduce(part, SumF32());
  if (tid == 0) s.log_z = s.max_value + logf(total);
  __syncthreads();
  const int best_id = UnpackId(s.best);
  const float max_logit = Bf16Value(row[best_id]);
  const float log_z = s.log_z;
  if (greedy) {
    if (tid == 0) {
      p.token_ids[blockIdx.x] = best_id;
      p.logprobs[blockIdx.x] = max_logit - log_z;
    }
    return;
  }
  const float inv_t = fminf(1.0f / temperature, 3.0e38f);

  // Kept: key > thr_key, or key == thr_key and id < thr_end.
  uint32_t thr_key = 0;
  int thr_end = vocab;

  // ---- Top-k: the k-th largest key, two radix passes.
  if (use_top_k) {
    if (tid < 32) FindBin(s.counts, 0, static_cast<double>(k), s);
    __syncthreads();
    const uint32_t b1 = static_cast<uint32_t>(s.bin);
    const int above1 = static_cast<int>(s.above);
    __syncthreads();
    for (int i = tid; i < kBins; i += kThreads) s.counts[i] = 0;
    __syncthreads();
    ForEachToken<kVec>(row, vocab, [&](int, uint16_t bits, bool ok) {
      const uint32_t key = sm::Key16(bits);
      HistCount(ok && (key >> 8) == b1 ? static_cast<int>(key & 0xffu) : -1, s.counts);
    });
    __syncthreads();
    if (tid < 32) FindBin(s.counts, static_cast<U64>(above1), static_cast<double>(k), s);
    __syncthreads();
    thr_key = (b1 << 8) | static_cast<uint32_t>(s.bin);
    const int need = k - static_cast<int>(s.above);
    const int ties = static_cast<int>(s.counts[s.bin]);
    thr_end = need >= ties ? vocab : NthIdWithKey(row, vocab, thr_key, need, s) + 1;
    __syncthreads();
  }

  // ---- Top-p: the same select over the fixed-point masses of the kept set.
  if (use_top_p) {
    for (int i = tid; i < kBins; i += kThreads) {
      s.counts[i] = 0;
      s.mass[i] = 0;
    }
    __syncthreads();
    auto weight = [&](int id, uint16_t bits, bool ok, uint32_t key) -> U64 {
      const bool kept = ok && (key > thr_key || (key == thr_key && id < thr_end));
      return kept ? sm::Weight((Bf16Value(bits) - max_logit) * inv_t) : 0;
    };
    ForEachToken<kVec>(row, vocab, [&](int id, uint16_t bits, bool ok) {
      const uint32_t key = sm::Key16(bits);
      const U64 w = weight(id, bits, ok, key);
      HistMass(w > 0 ? static_cast<int>(key >> 8) : -1, w, s.mass);
    });
    __syncthreads();
    if (tid < 32) {
      U64 t = 0;
      for (int b = tid; b < kBins; b += 32) t += s.mass[b];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(kFullMask, t, off);
      const double target = sm::TopPTarget(top_p, t);
      if (tid == 0) s.target = target;
      FindBin(s.mass, 0, target, s);
    }
    __syncthreads();
    const double target = s.target;
    const uint32_t b1 = static_cast<uint32_t>(s.bin);
    const U64 above1 = s.above;
    __syncthreads();
    for (int i = tid; i < kBins; i += kThreads) {
      s.counts[i] = 0;
      s.mass[i] = 0;
    }
    __syncthreads();
    ForEachToken<kVec>(row, vocab, [&](int id, uint16_t bits, bool ok) {
      const uint32_t key = sm::Key16(bits);
      const bool in_bin = ok && (key >> 8) == b1;
      const U64 w = in_bin ? weight(id, bits, ok, key) : 0;
      // Counts only tokens of the kept set: a kept token in b1 weighs > 0
      // or lies below the crossing key.
      const bool kept = in_bin && (key > thr_key || (key == thr_key && id < thr_end));
      HistCount(kept ? static_cast<int>(key & 0xffu) : -1, s.counts);
      HistMass(w > 0 ? static_cast<int>(key & 0xffu) : -1, w, s.mass);
    });
    __syncthreads();
    if (tid < 32) FindBin(s.mass, above1, target, s);
    __syncthreads();
    const uint32_t tp = (b1 << 8) | static_cast<uint32_t>(s.bin);
    const U64 above = s.above;
    const int64_t ties = s.counts[s.bin];
    const U64 w = ties > 0 ? s.mass[s.bin] / static_cast<U64>(ties) : 0;
    const int64_t j = w > 0 ? sm::TopPTieCount(target, above, w, ties) : ties;
    int end;
    if (j >= ties) {
      end = tp == thr_key ? thr_end : vocab;
    } else {
      end = NthIdWithKey(row, vocab, tp, static_cast<int>(j), s) + 1;
    }
    thr_key = tp;
    thr_end = end;
    __syncthreads();
  }

  // ---- The race over the kept set.
  const uint64_t row_key = sm::RowKey(seed, counter);
  U64 winner = 0;
  ForEachToken<kVec>(row, vocab, [&](int id, uint16_t bits, bool ok) {
    const uint32_t key = sm::Key16(bits);
    if (!ok || !(key > thr_key || (key == thr_key && id < thr_end))) return;
    const float v = Bf16Value(bits);
    if (!((v - max_logit) * inv_t >= sm::kRaceFloor)) return;
    const float score = sm::Score(v, max_logit, inv_t, row_key, static_cast<uint32_t>(id));
    const U64 packed = PackKeyId(sm::Key(score), id);
    winner = packed > winner ? packed : winner;
  });
  __syncthreads();
  winner = ReduceU64(s.temp.reduce_u64).Reduce(winner, MaxU64());
  if (tid == 0) {
    const int id = winner == 0 ? best_id : UnpackId(winner);
    p.token_ids[blockIdx.x] = id;
    p.logprobs[blockIdx.x] = Bf16Value(row[id]) - log_z;
  }
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

cudaError_t LaunchSampleTokens(const SampleTokensParams& params, cudaStream_t stream) {
  if (params.rows <= 0) return cudaSuccess;
  auto kernel = params.vocab % 8 == 0 && Aligned16(params.logits) ? SampleTokensKernel<true>
                                                                  : SampleTokensKernel<false>;
  return LaunchDependent(kernel, params.rows, kThreads, 0, stream, params);
}

}  // namespace strata::cuda::kernels

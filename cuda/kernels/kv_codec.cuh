// Device functions of the KV block codecs, for kernels that encode or decode
// blocks themselves (the batch launchers in kv_codec.cu; the recall step,
// which decodes blocks from pinned, device-mapped host memory inside the
// decode step). engine/kv_codec.h states the block format; every byte these
// functions write, and every value they decode, equals what engine::KvCodec
// does on the CPU: the arithmetic is engine/kv_codec_math.h's, one correctly
// rounded fp32 operation at a time, and the group reductions are
// order-independent, so a parallel reduction finds the CPU loop's bits.
//
// All functions here are CTA-cooperative: every thread of a one-dimensional
// block of exactly kThreads threads (a power of two, 32 to 1024) calls them
// with the same arguments, and they synchronise the block (__syncthreads)
// inside, so they must not be called under divergent control flow. Each
// ends with a barrier, after which its shared memory may be reused.
// `smem` / `scratch` must be 16-byte aligned shared memory of the size
// kv_codec.h's functions give (KvCodecSmemBytes, KvDecodeSmemBytes,
// kKvCrcScratchBytes).
//
// Device code only: include from .cu files.
#ifndef STRATA_CUDA_KERNELS_KV_CODEC_CUH_
#define STRATA_CUDA_KERNELS_KV_CODEC_CUH_

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels/kv_codec.h"
#include "engine/kv_codec.h"
#include "engine/kv_codec_math.h"

namespace strata::cuda::kernels {
namespace kv_codec_internal {

namespace cm = engine::kv_codec_math;

// ---- CRC32C ----------------------------------------------------------------------
//
// The CRC register is a polynomial over GF(2) modulo P (the Castagnoli
// polynomial), held reflected as common/crc32c.cc holds it: bit 31 is the
// coefficient of x^0. Feeding a byte is linear in the register and the byte
// together, so for a message A || B
//   reg(A || B, r0) = reg(B, 0) ^ reg(A, r0) * x^(8 |B|)   (mod P),
// and the standard CRC (init ~0, final xor ~0) is ~reg(M, ~crc_in).
//
// The parallel method: the message is cut into rounds of kThreads chunks of
// kCrcChunkBytes bytes, thread t taking chunk t of every round. The
// message is right-aligned on that grid: the virtual bytes in front of it
// are zeros, which leave a zero register unchanged, so they need no work
// and every chunk has the same length. Each thread runs the table-driven
// byte loop over its chunks from a zero register, carrying its register
// from one round to the next by the x^(8 (round - chunk)) factor (Horner).
// The registers of neighbouring threads are then merged pairwise in a tree,
// left * x^(8 |right|) ^ right: five levels of warp shuffles, then the
// warps' results the same way in warp 0. Every chunk, round and subtree has
// a length fixed at compile time, so every multiplier is a constant, and a
// product by a constant is 32 masked xors of constants (no tables, no
// multiplications by run-time values). The initial value ~crc_in is folded
// into the data: starting from register R equals starting from 0 with R's
// four bytes xored into the message's first four (each step moves one byte
// of the register into the table index), so messages of 4 bytes or more
// take no extra shift; shorter ones are done by one thread.
//
// Shared memory loads: consecutive threads read bytes kCrcChunkBytes (17
// words, odd) apart, so a warp's 32 loads hit 32 different banks.

inline constexpr uint32_t kCrcPoly = 0x82F63B78u;  // reflected, without x^32
inline constexpr uint32_t kCrcOne = 0x80000000u;   // x^0
inline constexpr int kCrcChunkBytes = 68;

STRATA_HOST_DEVICE constexpr uint32_t CrcTimesX(uint32_t a) {
  return (a >> 1) ^ ((a & 1u) ? kCrcPoly : 0u);
}

// a * b mod P (for compile-time constants).
STRATA_HOST_DEVICE constexpr uint32_t CrcMulModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if ((a >> (31 - i)) & 1u) product ^= b;
    b = CrcTimesX(b);
  }
  return product;
}

// x^(8 n) mod P: the factor that appends n zero bytes to a register.
STRATA_HOST_DEVICE constexpr uint32_t CrcXPow8N(uint64_t n) {
  uint32_t result = kCrcOne;
  uint32_t base = kCrcOne >> 8;  // x^8
  while (n != 0) {
    if (n & 1u) result = CrcMulModP(result, base);
    base = CrcMulModP(base, base);
    n >>= 1;
  }
  return result;
}

// The byte table: the register after feeding byte b into register 0.
STRATA_HOST_DEVICE constexpr uint32_t CrcByteEntry(uint32_t b) {
  for (int bit = 0; bit < 8; ++bit) b = CrcTimesX(b);
  return b;
}

// a * kK mod P; unrolled with kK * x^i folded into constants.
template <uint32_t kK>
STRATA_HOST_DEVICE __forceinline__ uint32_t CrcMulConst(uint32_t a) {
  uint32_t product = 0;
  uint32_t basis = kK;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 32; ++i) {
    product ^= basis & (0u - ((a >> (31 - i)) & 1u));
    basis = CrcTimesX(basis);
  }
  return product;
}

// strata::MaskCrc / UnmaskCrc (common/crc32c.h), for device code.
STRATA_HOST_DEVICE constexpr uint32_t MaskCrc32c(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0x9e3779b9u;
}
STRATA_HOST_DEVICE constexpr uint32_t UnmaskCrc32c(uint32_t masked) {
  const uint32_t rotated = masked - 0x9e3779b9u;
  return (rotated >> 17) | (rotated << 15);
}

constexpr int Log2(int v) { return v <= 1 ? 0 : 1 + Log2(v / 2); }

// Thread `thread`'s register over its chunks of an n-byte message (n >= 4),
// fetch(i) giving byte i, with `init` (the initial register) folded into the
// first four bytes. Host-callable for tests of the method.
template <int kThreads, typename Fetch>
STRATA_HOST_DEVICE uint32_t CrcThreadRegister(int thread, uint64_t n, uint32_t init,
                                              const uint32_t* table, const Fetch& fetch) {
  constexpr uint64_t kRound = uint64_t{kThreads} * kCrcChunkBytes;
  const uint64_t rounds = (n + kRound - 1) / kRound;
  const int64_t pad = static_cast<int64_t>(rounds * kRound - n);  // < kRound: round 0 only
  uint32_t r = 0;
  for (uint64_t round = 0; round < rounds; ++round) {
    // The bytes between this thread's previous chunk and this one.
    r = CrcMulConst<CrcXPow8N(kRound - kCrcChunkBytes)>(r);
    const int64_t begin =
        static_cast<int64_t>(round * kRound + static_cast<uint64_t>(thread) * kCrcChunkBytes) - pad;
    int j = 0;
    if (begin < 0) j = static_cast<int>(-begin < kCrcChunkBytes ? -begin : kCrcChunkBytes);
    for (; j < kCrcChunkBytes; ++j) {
      const uint64_t i = static_cast<uint64_t>(begin + j);
      uint32_t byte = fetch(i);
      if (i < 4) byte ^= (init >> (8 * i)) & 0xffu;
      r = table[(r ^ byte) & 0xffu] ^ (r >> 8);
    }
  }
  return r;
}

// Levels [kLevel, kLevels) of the pairwise merge over a warp's lanes, each
// lane's value covering kSegment bytes at level 0; lane 0 ends with the
// merge of all (lanes past a partner's range are never merged in).
template <int kLevel, int kLevels, uint64_t kSegment>
__device__ __forceinline__ uint32_t CrcWarpMerge(uint32_t v, int lane) {
  if constexpr (kLevel < kLevels) {
    const uint32_t right = __shfl_down_sync(0xffffffffu, v, 1 << kLevel);
    const uint32_t merged = CrcMulConst<CrcXPow8N(kSegment << kLevel)>(v) ^ right;
    if ((lane & ((2 << kLevel) - 1)) == 0) v = merged;
    return CrcWarpMerge<kLevel + 1, kLevels, kSegment>(v, lane);
  } else {
    return v;
  }
}

// Crc32cExtend(crc, message) for an n-byte message given by fetch(i).
// scratch: kKvCrcScratchBytes of shared memory.
template <int kThreads, typename Fetch>
__device__ uint32_t BlockCrc32cCore(uint32_t crc, uint64_t n, const Fetch& fetch,
                                    unsigned char* scratch) {
  static_assert(kThreads >= 32 && kThreads <= 1024 && (kThreads & (kThreads - 1)) == 0,
                "kThreads must be a power of two in [32, 1024]");
  static_assert(256 * 4 + 33 * 4 <= kKvCrcScratchBytes, "CRC scratch too small");
  uint32_t* table = reinterpret_cast<uint32_t*>(scratch);
  uint32_t* partial = table + 256;  // one per warp
  uint32_t* result = partial + 32;
  const int tid = threadIdx.x;
  for (int b = tid; b < 256; b += kThreads) table[b] = CrcByteEntry(static_cast<uint32_t>(b));
  __syncthreads();
  const uint32_t init = ~crc;
  if (n < 4) {
    if (tid == 0) {
      uint32_t r = init;
      for (uint64_t i = 0; i < n; ++i) r = table[(r ^ fetch(i)) & 0xffu] ^ (r >> 8);
      *result = ~r;
    }
  } else {
    constexpr int kWarps = kThreads / 32;
    const int lane = tid & 31, warp = tid >> 5;
    uint32_t r = CrcThreadRegister<kThreads>(tid, n, init, table, fetch);
    r = CrcWarpMerge<0, 5, kCrcChunkBytes>(r, lane);
    if (lane == 0) partial[warp] = r;
    __syncthreads();
    if (warp == 0) {
      uint32_t w = lane < kWarps ? partial[lane] : 0u;
      w = CrcWarpMerge<0, Log2(kWarps), uint64_t{32} * kCrcChunkBytes>(w, lane);
      if (lane == 0) *result = ~w;
    }
  }
  __syncthreads();
  const uint32_t out = *result;
  __syncthreads();
  return out;
}

// ---- block fields -----------------------------------------------------------------

inline constexpr uint32_t kCrcOffset = 28;

__device__ __forceinline__ uint32_t LoadLe16(const uint8_t* p) { return p[0] | (p[1] << 8); }
__device__ __forceinline__ uint32_t LoadLe32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
__device__ __forceinline__ void StoreLe16(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
__device__ __forceinline__ void StoreLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

__device__ __forceinline__ bool Aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Bytes per element of a source dtype wire code (0 f32, 1 f16, 2 bf16, 3 fp8).
__device__ __forceinline__ int SourceBytes(int wire) { return wire == 0 ? 4 : (wire == 3 ? 1 : 2); }

// A checked header.
struct KvBlockHeader {
  KvCodecKind codec;
  int source;  // wire code
  int tokens;
  int head_dim;
  int key_group;
  int value_group;
  uint32_t payload_bytes;
};

// engine::KvCodec::Inspect's header checks (all but the block's length and
// the CRC): 0, or KvBlockError::kBadHeader.
__device__ inline int ParseKvBlockHeader(const uint8_t* p, KvBlockHeader* h) {
  constexpr int kBad = static_cast<int>(KvBlockError::kBadHeader);
  if (p[0] != 'S' || p[1] != 'K' || p[2] != 'V' || p[3] != 'B') return kBad;
  if (p[4] != engine::kBlockVersion) return kBad;
  if (p[5] > static_cast<uint8_t>(KvCodecKind::kInt4)) return kBad;
  if (p[6] > 3) return kBad;               // source dtype
  if (p[7] != 0) return kBad;              // flags
  if (LoadLe32(p + 24) != 0) return kBad;  // reserved
  const uint32_t tokens = LoadLe32(p + 8);
  const uint32_t head_dim = LoadLe32(p + 12);
  if (tokens < 1 || tokens > static_cast<uint32_t>(engine::kMaxBlockTokens)) return kBad;
  if (head_dim < 1 || head_dim > static_cast<uint32_t>(engine::kMaxBlockHeadDim)) return kBad;
  if (uint64_t{tokens} * head_dim > static_cast<uint64_t>(engine::kMaxBlockElements)) return kBad;
  h->codec = static_cast<KvCodecKind>(p[5]);
  h->source = p[6];
  h->tokens = static_cast<int>(tokens);
  h->head_dim = static_cast<int>(head_dim);
  h->key_group = static_cast<int>(LoadLe16(p + 20));
  h->value_group = static_cast<int>(LoadLe16(p + 22));
  const bool grouped = h->codec == KvCodecKind::kInt8 || h->codec == KvCodecKind::kInt4;
  if (grouped ? (h->key_group == 0 || h->value_group == 0)
              : (h->key_group != 0 || h->value_group != 0)) {
    return kBad;
  }
  h->payload_bytes = LoadLe32(p + 16);
  const size_t needed = KvBlockBytes(h->codec, h->tokens, h->head_dim, SourceBytes(h->source),
                                     grouped ? h->key_group : 1, grouped ? h->value_group : 1) -
                        engine::kBlockHeaderBytes;
  if (h->payload_bytes != needed) return kBad;
  return 0;
}

__device__ inline void WriteKvBlockHeader(uint8_t* p, KvCodecKind codec, uint8_t source, int tokens,
                                          int head_dim, uint32_t payload_bytes) {
  const bool grouped = codec == KvCodecKind::kInt8 || codec == KvCodecKind::kInt4;
  p[0] = 'S';
  p[1] = 'K';
  p[2] = 'V';
  p[3] = 'B';
  p[4] = engine::kBlockVersion;
  p[5] = static_cast<uint8_t>(codec);
  p[6] = source;
  p[7] = 0;  // flags
  StoreLe32(p + 8, static_cast<uint32_t>(tokens));
  StoreLe32(p + 12, static_cast<uint32_t>(head_dim));
  StoreLe32(p + 16, payload_bytes);
  StoreLe16(p + 20, grouped ? engine::kKeyGroupTokens : 0);
  StoreLe16(p + 22, grouped ? engine::kValueGroupChannels : 0);
  StoreLe32(p + 24, 0);  // reserved
  StoreLe32(p + kCrcOffset, 0);
}

// ---- element types -------------------------------------------------------------

// The cache / output element types: their bits, their wire code as a block
// source, and the conversions.
template <typename T>
struct KvElement;

template <>
struct KvElement<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr uint8_t kWireCode = 2;
  __device__ static float ToFloat(Bits b) { return cm::Bf16BitsToFloat(b); }
  // Round to nearest even, NaN to 0x7fc0: engine::KvCodec::Decode's kBF16.
  __device__ static Bits FromFloat(float f) { return cm::FloatToBf16Bits(f); }
};

template <>
struct KvElement<__nv_fp8_e4m3> {
  using Bits = uint8_t;
  static constexpr uint8_t kWireCode = 3;
  __device__ static float ToFloat(Bits b) { return cm::Fp8E4M3ToFloat(b); }
  // The conversion the backend's KV-cache writes use (elementwise.cu,
  // FromFloat<fp8>): round to nearest even, saturating to +-448; for every
  // finite or infinite input the same bits as cm::FloatToFp8E4M3.
  __device__ static Bits FromFloat(float f) {
    return static_cast<Bits>(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
  }
};

template <typename Op>
__device__ __forceinline__ float WarpAllReduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Copies the block (bytes, from shared memory) to `out`: 16-byte stores
// where `out` is 16-byte aligned (then a warp writes 512 contiguous bytes,
// full PCIe write-combining lines for mapped host memory), else 4-byte or
// byte stores; never past the block's end, which may be the next block's
// start.
template <int kThreads>
__device__ void StoreBlock(uint8_t* out, const uint8_t* block, size_t bytes) {
  const int tid = threadIdx.x;
  size_t done = 0;
  if (Aligned(out, 16)) {
    const size_t words = bytes / 16;
    for (size_t i = tid; i < words; i += kThreads) {
      reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(block)[i];
    }
    done = words * 16;
  } else if (Aligned(out, 4)) {
    const size_t words = bytes / 4;
    for (size_t i = tid; i < words; i += kThreads) {
      reinterpret_cast<uint32_t*>(out)[i] = reinterpret_cast<const uint32_t*>(block)[i];
    }
    done = words * 4;
  }
  for (size_t i = done + tid; i < bytes; i += kThreads) out[i] = block[i];
}

// Copies in[from, to) to block[from, to) (from a multiple of 16): 16-byte
// loads where `in` is 16-byte aligned and the 16 bytes lie within
// `capacity` (they may run past `to`: block has room up to the next 16),
// else byte loads.
template <int kThreads>
__device__ void LoadBlock(uint8_t* block, const uint8_t* in, size_t from, size_t to,
                          size_t capacity) {
  const int tid = threadIdx.x;
  if (Aligned(in, 16)) {
    for (size_t at = from + size_t{16} * tid; at < to; at += size_t{16} * kThreads) {
      if (at + 16 <= capacity) {
        *reinterpret_cast<uint4*>(block + at) = *reinterpret_cast<const uint4*>(in + at);
      } else {
        for (size_t i = at; i < to; ++i) block[i] = in[i];
      }
    }
  } else {
    for (size_t i = from + tid; i < to; i += kThreads) block[i] = in[i];
  }
}

// Reads elements of a checked block in shared memory as Out bits.
struct KvBlockReader {
  KvCodecKind codec;
  int source;
  int d;
  int key_group;
  int value_group;
  int groups_v;
  const uint8_t* k_data;  // raw: the K tensor; fp8, int8, int4: K codes
  const uint8_t* v_data;
  const uint16_t* scale_k;       // fp8: [d]
  const uint16_t* scale_v;       // fp8: [n]
  const uint32_t* key_params;    // int8/int4: [ceil(n / key_group)][d], scale | zero << 16
  const uint32_t* value_params;  // int8/int4: [n][groups_v]

  __device__ KvBlockReader(const KvBlockHeader& h, const uint8_t* payload)
      : codec(h.codec),
        source(h.source),
        d(h.head_dim),
        key_group(h.key_group),
        value_group(h.value_group),
        groups_v(h.value_group > 0 ? (h.head_dim + h.value_group - 1) / h.value_group : 0) {
    const int n = h.tokens;
    const size_t elements = size_t{1} * n * d;
    scale_k = reinterpret_cast<const uint16_t*>(payload);
    scale_v = scale_k + d;
    key_params = reinterpret_cast<const uint32_t*>(payload);
    value_params = key_params;
    switch (codec) {
      case KvCodecKind::kBf16:
        k_data = payload;
        v_data = payload + elements * SourceBytes(source);
        break;
      case KvCodecKind::kFp8E4M3:
        k_data = payload + 2 * d + 2 * n;
        v_data = k_data + elements;
        break;
      case KvCodecKind::kInt8:
      case KvCodecKind::kInt4: {
        const int groups_k = (n + key_group - 1) / key_group;
        value_params = key_params + size_t{1} * groups_k * d;
        k_data = reinterpret_cast<const uint8_t*>(value_params + size_t{1} * n * groups_v);
        v_data = k_data + (codec == KvCodecKind::kInt8 ? elements : (elements + 1) / 2);
        break;
      }
    }
  }

  __device__ float RawToFloat(const uint8_t* data, int i) const {
    switch (source) {
      case 0:
        return cm::BitsFloat(reinterpret_cast<const uint32_t*>(data)[i]);
      case 1:
        return cm::Fp16BitsToFloat(reinterpret_cast<const uint16_t*>(data)[i]);
      case 2:
        return cm::Bf16BitsToFloat(reinterpret_cast<const uint16_t*>(data)[i]);
      default:
        return cm::Fp8E4M3ToFloat(data[i]);
    }
  }

  // Element (t, c) of K (tensor 0) or V (tensor 1).
  template <typename Out>
  __device__ typename KvElement<Out>::Bits Get(int tensor, int t, int c) const {
    using O = KvElement<Out>;
    using Bits = typename O::Bits;
    const int i = t * d + c;
    const uint8_t* data = tensor == 0 ? k_data : v_data;
    switch (codec) {
      case KvCodecKind::kBf16:
        // The cache's own dtype: a bit copy (NaN payloads included).
        if (source == O::kWireCode) return reinterpret_cast<const Bits*>(data)[i];
        return O::FromFloat(RawToFloat(data, i));
      case KvCodecKind::kFp8E4M3: {
        const uint16_t s = tensor == 0 ? scale_k[c] : scale_v[t];
        return O::FromFloat(cm::Fp8Dequantize(data[i], cm::Fp16BitsToFloat(s)));
      }
      default: {
        const uint32_t p = tensor == 0 ? key_params[(t / key_group) * d + c]
                                       : value_params[t * groups_v + c / value_group];
        const int q = codec == KvCodecKind::kInt8 ? data[i] : (data[i >> 1] >> (4 * (i & 1))) & 0xf;
        return O::FromFloat(cm::AffineDequantize(q, cm::Fp16BitsToFloat(p & 0xffffu),
                                                 cm::Fp16BitsToFloat(p >> 16)));
      }
    }
  }
};

// Writes rows [0, rows) of K and V, 8 elements per thread and step: one
// 16-byte (bf16) or 8-byte (fp8) store where the row piece is whole and
// aligned, else element stores.
template <int kThreads, typename Out, typename RowOffset>
__device__ void WriteDecodedRows(const KvBlockReader& reader, Out* k_out, Out* v_out,
                                 const RowOffset& row_offset, int rows) {
  using Bits = typename KvElement<Out>::Bits;
  constexpr int kVec = 8;
  const int d = reader.d;
  const int pieces = (d + kVec - 1) / kVec;
  const int items = rows * pieces;
  for (int item = threadIdx.x; item < 2 * items; item += kThreads) {
    const int tensor = item >= items ? 1 : 0;
    const int rest = item - tensor * items;
    const int t = rest / pieces;
    const int c0 = (rest - t * pieces) * kVec;
    const int len = d - c0 < kVec ? d - c0 : kVec;
    Bits* dst = reinterpret_cast<Bits*>(tensor == 0 ? k_out : v_out) + row_offset(t) + c0;
    if (len == kVec && Aligned(dst, kVec * sizeof(Bits))) {
      uint32_t words[kVec * sizeof(Bits) / 4];
#pragma unroll
      for (int w = 0; w < static_cast<int>(sizeof(words) / 4); ++w) words[w] = 0;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t bits = reader.Get<Out>(tensor, t, c0 + j);
        constexpr int kPerWord = 4 / sizeof(Bits);
        words[j / kPerWord] |= bits << (8 * sizeof(Bits) * (j % kPerWord));
      }
      if constexpr (sizeof(Bits) == 2) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
      } else {
        *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
      }
    } else {
      for (int j = 0; j < len; ++j) dst[j] = reader.Get<Out>(tensor, t, c0 + j);
    }
  }
}

}  // namespace kv_codec_internal

// ---- public device API ------------------------------------------------------------

// strata::Crc32cExtend(crc, data, n) (and with crc 0, strata::Crc32c): the
// standard CRC-32C of n bytes at `data` (shared or global memory, any
// alignment) appended to a message whose CRC is `crc`. Every thread gets
// the result. scratch: kKvCrcScratchBytes of shared memory.
template <int kThreads>
__device__ uint32_t BlockCrc32cExtend(uint32_t crc, const void* data, size_t n,
                                      unsigned char* scratch) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  return kv_codec_internal::BlockCrc32cCore<kThreads>(
      crc, n, [p](uint64_t i) -> uint32_t { return p[i]; }, scratch);
}

template <int kThreads>
__device__ uint32_t BlockCrc32c(const void* data, size_t n, unsigned char* scratch) {
  return BlockCrc32cExtend<kThreads>(0, data, n, scratch);
}

// The (unmasked) CRC a block stores: CRC32C of its bytes [0, 28) followed
// by its payload, block[32, 32 + payload_bytes), in one pass.
template <int kThreads>
__device__ uint32_t KvBlockCrc32c(const uint8_t* block, uint32_t payload_bytes,
                                  unsigned char* scratch) {
  constexpr uint32_t kGap = engine::kBlockHeaderBytes - kv_codec_internal::kCrcOffset;
  return kv_codec_internal::BlockCrc32cCore<kThreads>(
      0, uint64_t{kv_codec_internal::kCrcOffset} + payload_bytes,
      [block](uint64_t i) -> uint32_t {
        return block[i < kv_codec_internal::kCrcOffset ? i : i + kGap];
      },
      scratch);
}

// Encodes K and V rows [0, tokens) into one block at `out` (device memory or
// mapped host memory, any alignment; 16 bytes is fastest), byte for byte
// engine::KvCodec::Create(kind)->Encode(k rows, v rows, source, ...) with
// source kBF16 for a bf16 Cache and kF8E4M3 for __nv_fp8_e4m3. Row r of K is
// at k + row_offset(r) (an element offset, int64; row_offset is a functor so
// the caller can walk the paged cache), head_dim elements; V likewise. The
// block is built in shared memory, its CRC computed there, then written out
// with wide stores. Returns the block's size, KvBlockBytes(kind, tokens,
// head_dim, sizeof(Cache)).
//
// The caller checks the shape (tokens >= 1, head_dim in [1, 1024],
// tokens * head_dim <= 2^26) and gives KvCodecSmemBytes(kind, tokens,
// head_dim, sizeof(Cache)) bytes of smem. K and V are read from global
// memory twice for the quantised codecs (scales first, codes second); the
// second pass mostly hits L1/L2.
template <int kThreads, typename Cache, typename RowOffset>
__device__ size_t EncodeKvBlock(KvCodecKind kind, const Cache* k, const Cache* v,
                                RowOffset row_offset, int tokens, int head_dim, uint8_t* out,
                                unsigned char* smem) {
  namespace ki = kv_codec_internal;
  namespace cm = engine::kv_codec_math;
  using E = ki::KvElement<Cache>;
  using Bits = typename E::Bits;
  static_assert(engine::kValueGroupChannels == 32, "a value group is one warp's lanes");
  constexpr int kWarps = kThreads / 32;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int n = tokens, d = head_dim;
  const int elements = n * d;
  const size_t bytes = KvBlockBytes(kind, n, d, sizeof(Bits));
  const uint32_t payload_bytes = static_cast<uint32_t>(bytes - engine::kBlockHeaderBytes);
  uint8_t* block = smem;
  uint8_t* payload = block + engine::kBlockHeaderBytes;
  const Bits* kb = reinterpret_cast<const Bits*>(k);
  const Bits* vb = reinterpret_cast<const Bits*>(v);
  auto load = [&](const Bits* base, int t, int c) -> float {
    return E::ToFloat(base[row_offset(t) + c]);
  };
  const float inf = cm::BitsFloat(0x7f800000u);

  if (tid == 0) ki::WriteKvBlockHeader(block, kind, E::kWireCode, n, d, payload_bytes);
  switch (kind) {
    case KvCodecKind::kBf16: {
      // The rows' bytes, in 16-byte pieces.
      const int row_bytes = d * static_cast<int>(sizeof(Bits));
      const int pieces = (row_bytes + 15) / 16;
      const int per_tensor = n * pieces;
      for (int item = tid; item < 2 * per_tensor; item += kThreads) {
        const int tensor = item >= per_tensor ? 1 : 0;
        const int rest = item - tensor * per_tensor;
        const int t = rest / pieces;
        const int p = rest - t * pieces;
        const uint8_t* src =
            reinterpret_cast<const uint8_t*>((tensor == 0 ? kb : vb) + row_offset(t)) + 16 * p;
        uint8_t* dst = payload + size_t{1} * (tensor * n + t) * row_bytes + 16 * p;
        const int len = row_bytes - 16 * p < 16 ? row_bytes - 16 * p : 16;
        if (len == 16 && ki::Aligned(src, 16) && ki::Aligned(dst, 16)) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int b = 0; b < len; ++b) dst[b] = src[b];
        }
      }
      break;
    }
    case KvCodecKind::kFp8E4M3: {
      uint16_t* scale_k = reinterpret_cast<uint16_t*>(payload);  // little-endian, as the format
      uint16_t* scale_v = scale_k + d;
      uint8_t* codes_k = payload + 2 * d + 2 * n;
      uint8_t* codes_v = codes_k + elements;
      // Key scales: a thread per channel walks the tokens (the CPU's order;
      // the reduction is order-independent anyway).
      for (int c = tid; c < d; c += kThreads) {
        float amax = 0.0f;
        for (int t = 0; t < n; ++t) amax = cm::MaxTotal(amax, cm::AbsF(load(kb, t, c)));
        scale_k[c] = cm::Fp8ScaleBits(amax);
      }
      // Value scales: a warp per token.
      for (int t = warp; t < n; t += kWarps) {
        float amax = 0.0f;
        for (int c = lane; c < d; c += 32) amax = cm::MaxTotal(amax, cm::AbsF(load(vb, t, c)));
        amax = ki::WarpAllReduce(amax, [](float a, float b) { return cm::MaxTotal(a, b); });
        if (lane == 0) scale_v[t] = cm::Fp8ScaleBits(amax);
      }
      __syncthreads();
      for (int i = tid; i < elements; i += kThreads) {
        const int t = i / d, c = i - (i / d) * d;
        codes_k[i] = cm::Fp8Quantize(load(kb, t, c), cm::Fp16BitsToFloat(scale_k[c]));
        codes_v[i] = cm::Fp8Quantize(load(vb, t, c), cm::Fp16BitsToFloat(scale_v[t]));
      }
      break;
    }
    case KvCodecKind::kInt8:
    case KvCodecKind::kInt4: {
      constexpr int kKeyGroup = engine::kKeyGroupTokens;
      constexpr int kValueGroup = engine::kValueGroupChannels;
      const bool int8 = kind == KvCodecKind::kInt8;
      const int q_max = int8 ? 255 : 15;
      const int groups_k = (n + kKeyGroup - 1) / kKeyGroup;
      const int groups_v = (d + kValueGroup - 1) / kValueGroup;
      // (scale, zero) pairs as one little-endian word: scale | zero << 16.
      uint32_t* key_params = reinterpret_cast<uint32_t*>(payload);
      uint32_t* value_params = key_params + groups_k * d;
      uint8_t* codes_k = reinterpret_cast<uint8_t*>(value_params + n * groups_v);
      const int code_bytes = int8 ? elements : (elements + 1) / 2;
      uint8_t* codes_v = codes_k + code_bytes;
      // Key params: a thread per (group, channel).
      for (int item = tid; item < groups_k * d; item += kThreads) {
        const int g = item / d, c = item - (item / d) * d;
        const int t_end = (g + 1) * kKeyGroup < n ? (g + 1) * kKeyGroup : n;
        float lo = inf, hi = -inf;
        for (int t = g * kKeyGroup; t < t_end; ++t) {
          const float x = load(kb, t, c);
          lo = cm::MinTotal(lo, x);
          hi = cm::MaxTotal(hi, x);
        }
        const cm::AffineParams p = cm::AffineParamsFor(lo, hi, q_max);
        key_params[item] = p.scale_bits | (static_cast<uint32_t>(p.zero_bits) << 16);
      }
      // Value params: a warp per (token, group), a lane per channel.
      for (int item = warp; item < n * groups_v; item += kWarps) {
        const int t = item / groups_v;
        const int c = (item - t * groups_v) * kValueGroup + lane;
        float lo = inf, hi = -inf;  // the identities, for lanes past the last channel
        if (c < d) lo = hi = load(vb, t, c);
        lo = ki::WarpAllReduce(lo, [](float a, float b) { return cm::MinTotal(a, b); });
        hi = ki::WarpAllReduce(hi, [](float a, float b) { return cm::MaxTotal(a, b); });
        if (lane == 0) {
          const cm::AffineParams p = cm::AffineParamsFor(lo, hi, q_max);
          value_params[item] = p.scale_bits | (static_cast<uint32_t>(p.zero_bits) << 16);
        }
      }
      __syncthreads();
      auto code = [&](int tensor, int i) -> uint32_t {
        const int t = i / d, c = i - (i / d) * d;
        const uint32_t p = tensor == 0 ? key_params[(t / kKeyGroup) * d + c]
                                       : value_params[t * groups_v + c / kValueGroup];
        const float x = load(tensor == 0 ? kb : vb, t, c);
        return static_cast<uint32_t>(cm::AffineQuantize(x, cm::Fp16BitsToFloat(p & 0xffffu),
                                                        cm::Fp16BitsToFloat(p >> 16), q_max));
      };
      for (int j = tid; j < code_bytes; j += kThreads) {
        if (int8) {
          codes_k[j] = static_cast<uint8_t>(code(0, j));
          codes_v[j] = static_cast<uint8_t>(code(1, j));
        } else {
          // Element 2j in the low nibble, 2j + 1 in the high one (0: padding).
          const bool pair = 2 * j + 1 < elements;
          codes_k[j] = static_cast<uint8_t>(code(0, 2 * j) | (pair ? code(0, 2 * j + 1) << 4 : 0));
          codes_v[j] = static_cast<uint8_t>(code(1, 2 * j) | (pair ? code(1, 2 * j + 1) << 4 : 0));
        }
      }
      break;
    }
  }
  __syncthreads();
  const uint32_t crc = KvBlockCrc32c<kThreads>(block, payload_bytes, smem + KvRoundUp16(bytes));
  if (tid == 0) ki::StoreLe32(block + ki::kCrcOffset, ki::MaskCrc32c(crc));
  __syncthreads();
  ki::StoreBlock<kThreads>(out, block, bytes);
  __syncthreads();
  return bytes;
}

// Checks and decodes one block at `in` (device memory or mapped host memory;
// 16-byte aligned for 16-byte loads, any other alignment works with byte
// loads) of which at most in_capacity bytes may be read (the block may be
// shorter; its header says how long it is).
//
// Checks, before anything is written: the header as engine::KvCodec::Inspect
// checks it (kBadHeader), the block's length against in_capacity
// (kTruncated), head_dim == expect_head_dim (kWrongHeadDim), the block
// against the shared memory (kTooLarge), then the CRC (kBadCrc). Returns
// that error (as an int, < 0) with the outputs untouched, or the block's
// token count, after writing rows [0, min(rows_to_write, tokens)) of K and V
// at k_out + row_offset(r) and v_out + row_offset(r) (element offsets,
// head_dim elements each):
//  - Out = __nv_bfloat16: the values engine::KvCodec::Decode gives with
//    out dtype kBF16 (the fp32 result rounded to nearest even), bit for bit;
//    for a raw block of a bf16 source the bits copied.
//  - Out = __nv_fp8_e4m3 (an fp8 cache): for a raw block of an fp8 source
//    the bits copied; otherwise the fp32 value (Decode's kF32 result)
//    rounded to e4m3 as the backend's cache writes round (saturating).
//
// smem: smem_bytes of 16-byte aligned shared memory, by default
// KvDecodeSmemBytes(expect_head_dim): the block takes up to smem_bytes -
// kKvCrcScratchBytes (rounded down to 16), the CRC scratch the rest. The
// whole block is staged there, so `in` is read once; after a successful
// call it is still there (smem[0, 32 + payload_bytes)) until the caller
// overwrites it.
template <int kThreads, typename Out, typename RowOffset>
__device__ int DecodeKvBlock(const uint8_t* in, size_t in_capacity, int expect_head_dim, Out* k_out,
                             Out* v_out, RowOffset row_offset, int rows_to_write,
                             unsigned char* smem, size_t smem_bytes = 0) {
  namespace ki = kv_codec_internal;
  const size_t total = smem_bytes != 0 ? smem_bytes : KvDecodeSmemBytes(expect_head_dim);
  const size_t capacity =
      total > kKvCrcScratchBytes ? (total - kKvCrcScratchBytes) & ~size_t{15} : 0;
  uint8_t* block = smem;
  int status = 0;
  if (in_capacity < engine::kBlockHeaderBytes) {
    status = static_cast<int>(KvBlockError::kTruncated);
  } else if (capacity < engine::kBlockHeaderBytes) {
    status = static_cast<int>(KvBlockError::kTooLarge);
  } else {
    ki::LoadBlock<kThreads>(block, in, 0, engine::kBlockHeaderBytes, in_capacity);
    __syncthreads();
    ki::KvBlockHeader h{};
    status = ki::ParseKvBlockHeader(block, &h);
    const size_t bytes = engine::kBlockHeaderBytes + size_t{h.payload_bytes};
    if (status == 0) {
      if (bytes > in_capacity) {
        status = static_cast<int>(KvBlockError::kTruncated);
      } else if (h.head_dim != expect_head_dim) {
        status = static_cast<int>(KvBlockError::kWrongHeadDim);
      } else if (KvRoundUp16(bytes) > capacity) {
        status = static_cast<int>(KvBlockError::kTooLarge);
      }
    }
    if (status == 0) {
      ki::LoadBlock<kThreads>(block, in, engine::kBlockHeaderBytes, bytes, in_capacity);
      __syncthreads();
      const uint32_t crc = KvBlockCrc32c<kThreads>(block, h.payload_bytes, block + capacity);
      if (crc != ki::UnmaskCrc32c(ki::LoadLe32(block + ki::kCrcOffset))) {
        status = static_cast<int>(KvBlockError::kBadCrc);
      }
    }
    if (status == 0) {
      const int rows =
          rows_to_write < 0 ? 0 : (rows_to_write < h.tokens ? rows_to_write : h.tokens);
      const ki::KvBlockReader reader(h, block + engine::kBlockHeaderBytes);
      ki::WriteDecodedRows<kThreads>(reader, k_out, v_out, row_offset, rows);
      status = h.tokens;
    }
  }
  __syncthreads();
  return status;
}

}  // namespace strata::cuda::kernels

#endif  // STRATA_CUDA_KERNELS_KV_CODEC_CUH_

// engine::KvCodec: encodes one KV block for the host and SSD tiers and the
// wire, and decodes (and checks) blocks that come back.
//
// A block is one cluster (or page run) of one (layer, KV head): K rows
// [tokens, head_dim] and V rows [tokens, head_dim], row-major, read from host
// memory as DType elements (kF32, kBF16, kF16 or kF8E4M3; kI32 is
// refused). Every block names its codec and shape and carries a CRC32C, so
// a reader needs nothing but the bytes; a block that fails its checks is
// lost (absl::DataLossError), never decoded into wrong values.
//
// Block format (version 1), all multi-byte fields little-endian:
//
//   offset size
//    0     4   magic "SKVB"
//    4     1   version = 1
//    5     1   codec (KvCodecKind)
//    6     1   source dtype: 0 f32, 1 f16, 2 bf16, 3 f8_e4m3 (fixed wire
//              codes, independent of DType's order)
//    7     1   flags = 0
//    8     4   tokens n     in [1, 2^20]
//   12     4   head_dim D   in [1, 1024], and n * D <= 2^26 (so that every
//                           payload, 512 MiB at most, fits the u32 below)
//   16     4   payload_bytes
//   20     2   key_group   (int8/int4: tokens per key group; else 0)
//   22     2   value_group (int8/int4: channels per value group; else 0)
//   24     4   reserved = 0
//   28     4   MaskCrc(CRC32C of bytes [0, 28) followed by the payload)
//   32         payload, exactly payload_bytes; the block ends with it
//
// Payloads (scales and zeros are fp16 bits, u16 little-endian):
//
//  - bf16 (raw): K then V, [n, D] each, in the source dtype, byte for byte.
//    Named "bf16" after the GPU cache's dtype, it stores whatever dtype the
//    cache holds unchanged (fp32 on the CPU backend), so it is lossless on
//    every backend.
//  - fp8_e4m3: scale_k[D] (keys per channel: s_d = fp16(amax_d / 448) over
//    the block's tokens), scale_v[n] (values per token: s_t = fp16(amax_t /
//    448) over the D channels), K codes [n, D], V codes [n, D]: code =
//    e4m3(x / s) (round to nearest even, saturating at +-448), 0 when s is 0
//    or not finite. Decoded x' = e4m3_to_float(code) * s.
//  - int8 / int4 (KIVI-style asymmetric, Q = 255 / 15): keys per channel in
//    groups of key_group = 128 tokens (the last group partial), values per
//    token in groups of value_group = 32 channels (the last partial). Per
//    group: lo = min, hi = max, scale = fp16((hi - lo) / Q), zero = fp16(lo);
//    with s, m their fp32 values, q = clamp(rint((x - m) / s), 0, Q) (ties to
//    even), 0 when s is 0 or not finite; decoded x' = q * s + m. Layout: key
//    params [ceil(n / key_group)][D] and value params [n][ceil(D /
//    value_group)] as (scale, zero) pairs, then K codes, then V codes. int8
//    codes are bytes, [n, D] row-major; int4 codes pack the row-major [n, D]
//    elements two to a byte, element 2i in the low nibble and 2i + 1 in the
//    high one; when n * D is odd the last byte's high nibble is padding,
//    written as 0 (so ceil(n * D / 2) bytes per tensor; any D is accepted).
//  Every operation above is one correctly rounded fp32 operation (see
//  engine/kv_codec_math.h, shared with the CUDA kernels, which must produce the
//  same bytes).
//
// Bytes per token-head at D = 128, for a block of n tokens (plus the 32-byte
// header, 32 / n; 0.4 at ClusterKV's n = 80):
//   bf16     2 * D * sizeof(source): 512 from bf16/fp16, 1024 from fp32
//   fp8_e4m3 258 + 256 / n                            (261.2 at n = 80)
//   int8     272 + 512 * ceil(n / 128) / n            (278.4 at n = 80)
//   int4     144 + 512 * ceil(n / 128) / n            (150.4 at n = 80)
//
// Round-trip error bounds, per element x of a group (keys: a channel's
// tokens; values: a token's channels), all tested (tests/engine/kv_codec_test.cc):
//  - bf16: none, bit-exact.
//  - fp8_e4m3, with the group's s and amax = max |x|:
//      |x - x'| <= 2^-4 * |x| * (1 + 2^-16) + 2^-10 * s + 448 * 2^-25
//    2^-4 |x| is half an e4m3 ulp in the normal range (3 mantissa bits);
//    2^-10 * s is half the subnormal e4m3 step (2^-9) times s; the fp32
//    divide and multiply add a few 2^-24 |x|. Where fp16 rounds s below
//    amax / 448, x / s can pass 448 and saturate: for a normal fp16 s that
//    costs at most 2^-11 |x|, inside the first term; for an fp16-subnormal
//    s (amax < 448 * 2^-14, about 0.027) or s = 0 (amax <= 448 * 2^-25) at
//    most 448 * 2^-25 (about 1.3e-5) absolute, the last term.
//  - int8 / int4, with the group's lo, hi, t = (hi - lo) / Q, s and m:
//      |x - x'| <= s / 2 + |lo - m| + Q * max(0, t - s) + 2^-22 * (|x| + |m| + Q * s)
//    s / 2 is the rounding to an integer code; |lo - m| (at most 2^-11 |lo|,
//    or 2^-25 below 2^-14) the fp16 rounding of the zero point; Q * (t - s)
//    the codes clamped at Q when fp16 rounded the scale down (at most
//    2^-11 * (hi - lo) for a normal fp16 s, Q * 2^-25 for a subnormal or
//    zero one); the last term the fp32 roundings of the formulas. For int8
//    that is about 0.5 to 0.63 steps of (hi - lo) / 255, for int4 of
//    (hi - lo) / 15.
//
// Non-finite inputs: bf16 copies them. fp8 and int8/int4 turn the whole
// group (a key channel, a value token or token group) into NaN: an inf or
// NaN makes amax, or lo/hi and so s, non-finite, the codes are then 0, and
// 0 * s decodes to NaN. So does a finite group beyond fp16's range (s
// overflows: fp8 amax > 448 * 65504, int8 range > 255 * 65504); a group
// whose lo is beyond +-65504 decodes to +-inf. Downstream, the batcher ends
// sequences whose logits are not finite, so nothing is silently wrong.
//
// Thread-safety: a KvCodec is immutable and may be used from any number of
// threads at once; Decode and Inspect are pure functions.
#ifndef STRATA_ENGINE_KV_CODEC_H_
#define STRATA_ENGINE_KV_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tensor.h"

namespace strata::engine {

enum class KvCodecKind : uint8_t {
  kBf16 = 0,  // raw: the cache's own dtype, bit-exact
  kFp8E4M3 = 1,
  kInt8 = 2,
  kInt4 = 3,
};

// "bf16" | "fp8_e4m3" | "int8" | "int4"; InvalidArgument naming the value
// and the choices otherwise.
absl::StatusOr<KvCodecKind> ParseKvCodecKind(std::string_view name);
// The profile name of a codec ("unknown" for a value outside the enum).
std::string_view KvCodecKindName(KvCodecKind kind);

inline constexpr size_t kBlockHeaderBytes = 32;
inline constexpr uint8_t kBlockVersion = 1;
inline constexpr int kMaxBlockTokens = 1 << 20;
inline constexpr int kMaxBlockHeadDim = 1024;
inline constexpr int64_t kMaxBlockElements = int64_t{1} << 26;  // tokens * head_dim
// The groups the int8/int4 encoders use (the decoder reads them from the
// header, so other values decode too).
inline constexpr int kKeyGroupTokens = 128;
inline constexpr int kValueGroupChannels = 32;

// What a block's header says (once checked).
struct KvBlockInfo {
  KvCodecKind codec = KvCodecKind::kBf16;
  DType source = DType::kF32;
  int tokens = 0;
  int head_dim = 0;
  size_t bytes = 0;     // the whole block, header included
  int key_group = 0;    // int8/int4 only; 0 otherwise
  int value_group = 0;  // int8/int4 only; 0 otherwise
};

class KvCodec {
 public:
  virtual ~KvCodec() = default;

  // InvalidArgument for a value outside KvCodecKind.
  static absl::StatusOr<std::unique_ptr<KvCodec>> Create(KvCodecKind kind);

  virtual KvCodecKind kind() const = 0;

  // The exact size of the encoded block, header included; 0 when the shape
  // or source dtype is one Encode refuses.
  virtual size_t EncodedBytes(int tokens, int head_dim, DType source) const = 0;

  // Encodes K and V ([tokens, head_dim] each, `source` elements, host
  // memory, any alignment) into `out`, whose size must be
  // EncodedBytes(tokens, head_dim, source). InvalidArgument for a shape
  // outside the limits above, a kI32 source, null inputs or a wrong out
  // size. Deterministic: the same input gives the same bytes.
  virtual absl::Status Encode(const void* k, const void* v, DType source, int tokens, int head_dim,
                              std::span<uint8_t> out) const = 0;

  // Checks a block as Inspect does, then decodes it into k_out and v_out
  // ([tokens, head_dim] each, out_dtype elements, host memory, sized from
  // Inspect). out_dtype: kF32 for every codec (dequantised or widened, exact
  // for bf16 blocks); for bf16 (raw) blocks also the block's source dtype (a
  // byte-for-byte copy); for the quantised codecs also kBF16 (the fp32
  // result rounded to nearest even). Any other out_dtype, or a null output,
  // is InvalidArgument; a block that fails its checks is DataLoss. Fills
  // *info_or_null when given. Never reads outside `block`, whatever its
  // bytes.
  static absl::Status Decode(std::span<const uint8_t> block, DType out_dtype, void* k_out,
                             void* v_out, KvBlockInfo* info_or_null);

  // Checks a block without decoding it: its size covers the header, magic,
  // version, codec, source dtype, flags and reserved fields, the shape and
  // groups are in range, payload_bytes matches what the shape needs and the
  // block's length, and the CRC matches. DataLoss naming the first problem
  // ("KV block: CRC mismatch (stored 0x..., computed 0x...)").
  static absl::StatusOr<KvBlockInfo> Inspect(std::span<const uint8_t> block);

  // The length a block starting at bytes[0] declares (header + its
  // payload_bytes), or 0 when `bytes` cannot hold it (or even the header):
  // for reading a block out of a larger buffer before Inspect checks it.
  static size_t DeclaredBytes(std::span<const uint8_t> bytes);
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_KV_CODEC_H_

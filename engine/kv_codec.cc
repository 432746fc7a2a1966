#include "engine/kv_codec.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "engine/kv_codec_math.h"

namespace strata::engine {
namespace {

namespace cm = kv_codec_math;

// The raw codec's payload is the caller's tensor bytes, and callers' 16-bit
// elements are read with the block's little-endian loads: both are only the
// block format's byte order on a little-endian host (x86-64, aarch64).
static_assert(std::endian::native == std::endian::little, "KV blocks assume a little-endian host");

// Debian's abseil has its own string_view, which StrCat takes; std's is
// converted.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr char kMagic[4] = {'S', 'K', 'V', 'B'};
constexpr size_t kCrcOffset = 28;

// --- little-endian fields (byte stores, so the host's order never matters) --

void StoreLe16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

void StoreLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint16_t LoadLe16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

uint32_t LoadLe32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// --- source dtypes and their wire codes --------------------------------------

std::optional<uint8_t> DTypeToWire(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 0;
    case DType::kF16:
      return 1;
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
      return 3;
    case DType::kI32:
      return std::nullopt;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromWire(uint8_t code) {
  switch (code) {
    case 0:
      return DType::kF32;
    case 1:
      return DType::kF16;
    case 2:
      return DType::kBF16;
    case 3:
      return DType::kF8E4M3;
    default:
      return std::nullopt;
  }
}

// One element of a source buffer, widened to fp32 (exact for every source
// dtype). memcpy because the caller's buffer may be unaligned.
float LoadAsFloat(const uint8_t* base, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, base + 4 * i, sizeof(f));
      return f;
    }
    case DType::kF16:
      return cm::Fp16BitsToFloat(LoadLe16(base + 2 * i));
    case DType::kBF16:
      return cm::Bf16BitsToFloat(LoadLe16(base + 2 * i));
    case DType::kF8E4M3:
      return cm::Fp8E4M3ToFloat(base[i]);
    case DType::kI32:
      break;
  }
  return 0.0f;  // unreachable: sources are validated first
}

std::vector<float> ToFloats(const void* src, DType dtype, size_t count) {
  std::vector<float> out(count);
  const auto* base = static_cast<const uint8_t*>(src);
  if (dtype == DType::kF32) {
    std::memcpy(out.data(), base, count * sizeof(float));
  } else {
    for (size_t i = 0; i < count; ++i) out[i] = LoadAsFloat(base, dtype, i);
  }
  return out;
}

// Writes fp32 values to a caller's buffer as kF32 or kBF16 (any alignment).
void StoreFloats(const std::vector<float>& values, DType out_dtype, void* dst) {
  auto* out = static_cast<uint8_t*>(dst);
  if (out_dtype == DType::kF32) {
    std::memcpy(out, values.data(), values.size() * sizeof(float));
    return;
  }
  for (size_t i = 0; i < values.size(); ++i) {  // kBF16, the only other choice
    const uint16_t b = cm::FloatToBf16Bits(values[i]);
    std::memcpy(out + 2 * i, &b, sizeof(b));
  }
}

// --- shapes and sizes ---------------------------------------------------------

absl::Status CheckShape(int tokens, int head_dim, std::string_view what) {
  if (tokens < 1 || tokens > kMaxBlockTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(what), ": tokens ", tokens, " out of range [1, ", kMaxBlockTokens, "]"));
  }
  if (head_dim < 1 || head_dim > kMaxBlockHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(what), ": head_dim ", head_dim,
                                                   " out of range [1, ", kMaxBlockHeadDim, "]"));
  }
  if (int64_t{tokens} * head_dim > kMaxBlockElements) {
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(what), ": tokens * head_dim = ", int64_t{tokens} * head_dim, " exceeds ",
                     kMaxBlockElements));
  }
  return absl::OkStatus();
}

size_t CeilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

int QMax(KvCodecKind kind) { return kind == KvCodecKind::kInt8 ? 255 : 15; }

size_t CodeBytesPerTensor(KvCodecKind kind, size_t elements) {
  return kind == KvCodecKind::kInt4 ? CeilDiv(elements, 2) : elements;
}

// Payload size for a checked shape (n * D <= 2^26 and groups >= 1 for the
// integer codecs, so nothing here overflows).
uint64_t PayloadBytes(KvCodecKind kind, DType source, size_t n, size_t d, size_t key_group,
                      size_t value_group) {
  const size_t elements = n * d;
  switch (kind) {
    case KvCodecKind::kBf16:
      return 2 * elements * DTypeSize(source);
    case KvCodecKind::kFp8E4M3:
      return 2 * d + 2 * n + 2 * elements;
    case KvCodecKind::kInt8:
    case KvCodecKind::kInt4: {
      const size_t key_params = 4 * CeilDiv(n, key_group) * d;
      const size_t value_params = 4 * n * CeilDiv(d, value_group);
      return key_params + value_params + 2 * CodeBytesPerTensor(kind, elements);
    }
  }
  return 0;
}

// --- the header ---------------------------------------------------------------

struct Header {
  KvCodecKind codec;
  DType source;
  int tokens;
  int head_dim;
  int key_group;
  int value_group;
  uint32_t payload_bytes;
};

void WriteHeader(const Header& h, uint8_t* out) {
  std::memcpy(out, kMagic, 4);
  out[4] = kBlockVersion;
  out[5] = static_cast<uint8_t>(h.codec);
  out[6] = *DTypeToWire(h.source);
  out[7] = 0;  // flags
  StoreLe32(out + 8, static_cast<uint32_t>(h.tokens));
  StoreLe32(out + 12, static_cast<uint32_t>(h.head_dim));
  StoreLe32(out + 16, h.payload_bytes);
  StoreLe16(out + 20, static_cast<uint16_t>(h.key_group));
  StoreLe16(out + 22, static_cast<uint16_t>(h.value_group));
  StoreLe32(out + 24, 0);  // reserved
  StoreLe32(out + kCrcOffset, 0);
}

uint32_t BlockCrc(std::span<const uint8_t> block) {
  const uint32_t crc = Crc32c(block.data(), kCrcOffset);
  return Crc32cExtend(crc, block.data() + kBlockHeaderBytes, block.size() - kBlockHeaderBytes);
}

absl::Status Corrupt(std::string_view what) {
  return absl::DataLossError(absl::StrCat("KV block: ", Sv(what)));
}

// Every check of Inspect; on success the payload is exactly what the header
// describes and may be parsed without further bounds checks.
absl::StatusOr<Header> CheckBlock(std::span<const uint8_t> block) {
  if (block.size() < kBlockHeaderBytes) {
    return Corrupt(
        absl::StrCat(block.size(), " bytes, shorter than the ", kBlockHeaderBytes, "-byte header"));
  }
  const uint8_t* p = block.data();
  if (std::memcmp(p, kMagic, 4) != 0) {
    return Corrupt(absl::StrFormat("bad magic 0x%08x (expected \"SKVB\")", LoadLe32(p)));
  }
  if (p[4] != kBlockVersion) {
    return Corrupt(absl::StrCat("version ", p[4], " is not supported (this build reads version ",
                                kBlockVersion, ")"));
  }
  if (p[5] > static_cast<uint8_t>(KvCodecKind::kInt4)) {
    return Corrupt(absl::StrCat("unknown codec ", p[5]));
  }
  Header h;
  h.codec = static_cast<KvCodecKind>(p[5]);
  const std::optional<DType> source = DTypeFromWire(p[6]);
  if (!source) return Corrupt(absl::StrCat("unknown source dtype ", p[6]));
  h.source = *source;
  if (p[7] != 0) return Corrupt(absl::StrFormat("flags 0x%02x set (none are defined)", p[7]));
  const uint32_t reserved = LoadLe32(p + 24);
  if (reserved != 0) {
    return Corrupt(absl::StrFormat("reserved field is 0x%08x (must be 0)", reserved));
  }
  const uint32_t tokens = LoadLe32(p + 8);
  const uint32_t head_dim = LoadLe32(p + 12);
  if (tokens < 1 || tokens > static_cast<uint32_t>(kMaxBlockTokens)) {
    return Corrupt(absl::StrCat("tokens ", tokens, " out of range [1, ", kMaxBlockTokens, "]"));
  }
  if (head_dim < 1 || head_dim > static_cast<uint32_t>(kMaxBlockHeadDim)) {
    return Corrupt(
        absl::StrCat("head_dim ", head_dim, " out of range [1, ", kMaxBlockHeadDim, "]"));
  }
  if (uint64_t{tokens} * head_dim > static_cast<uint64_t>(kMaxBlockElements)) {
    return Corrupt(absl::StrCat("tokens * head_dim = ", uint64_t{tokens} * head_dim, " exceeds ",
                                kMaxBlockElements));
  }
  h.tokens = static_cast<int>(tokens);
  h.head_dim = static_cast<int>(head_dim);
  h.key_group = LoadLe16(p + 20);
  h.value_group = LoadLe16(p + 22);
  const bool grouped = h.codec == KvCodecKind::kInt8 || h.codec == KvCodecKind::kInt4;
  if (grouped ? (h.key_group == 0 || h.value_group == 0)
              : (h.key_group != 0 || h.value_group != 0)) {
    return Corrupt(absl::StrCat("key_group ", h.key_group, " and value_group ", h.value_group,
                                " for codec ", Sv(KvCodecKindName(h.codec)), " (must be ",
                                grouped ? "at least 1)" : "0)"));
  }
  h.payload_bytes = LoadLe32(p + 16);
  const uint64_t needed =
      PayloadBytes(h.codec, h.source, tokens, head_dim, h.key_group, h.value_group);
  if (h.payload_bytes != needed) {
    return Corrupt(absl::StrCat("header says ", h.payload_bytes, " payload bytes, but codec ",
                                Sv(KvCodecKindName(h.codec)), " with ", tokens, " tokens x ",
                                head_dim, " (", DTypeName(h.source), ") needs ", needed));
  }
  if (block.size() != kBlockHeaderBytes + needed) {
    return Corrupt(absl::StrCat(block.size(), " bytes, but the header says ", kBlockHeaderBytes,
                                " + ", needed));
  }
  const uint32_t stored = UnmaskCrc(LoadLe32(p + kCrcOffset));
  const uint32_t computed = BlockCrc(block);
  if (stored != computed) {
    return Corrupt(
        absl::StrFormat("CRC mismatch (stored 0x%08x, computed 0x%08x)", stored, computed));
  }
  return h;
}

KvBlockInfo ToInfo(const Header& h) {
  KvBlockInfo info;
  info.codec = h.codec;
  info.source = h.source;
  info.tokens = h.tokens;
  info.head_dim = h.head_dim;
  info.bytes = kBlockHeaderBytes + h.payload_bytes;
  info.key_group = h.key_group;
  info.value_group = h.value_group;
  return info;
}

// --- the codecs ---------------------------------------------------------------

// Shared argument checks of Encode; the size check needs the codec.
absl::Status CheckEncodeArgs(const void* k, const void* v, DType source, int tokens, int head_dim) {
  if (auto s = CheckShape(tokens, head_dim, "KV block encode"); !s.ok()) return s;
  if (!DTypeToWire(source)) {
    return absl::InvalidArgumentError(absl::StrCat("KV block encode: source dtype ",
                                                   DTypeName(source),
                                                   " (F32, F16, BF16 or F8_E4M3 expected)"));
  }
  if (k == nullptr || v == nullptr) {
    return absl::InvalidArgumentError("KV block encode: null K or V");
  }
  return absl::OkStatus();
}

class CodecBase : public KvCodec {
 public:
  explicit CodecBase(KvCodecKind kind) : kind_(kind) {}

  KvCodecKind kind() const final { return kind_; }

  size_t EncodedBytes(int tokens, int head_dim, DType source) const final {
    if (!CheckShape(tokens, head_dim, "").ok() || !DTypeToWire(source)) return 0;
    return kBlockHeaderBytes +
           PayloadBytes(kind_, source, tokens, head_dim, key_group(), value_group());
  }

  absl::Status Encode(const void* k, const void* v, DType source, int tokens, int head_dim,
                      std::span<uint8_t> out) const final {
    if (auto s = CheckEncodeArgs(k, v, source, tokens, head_dim); !s.ok()) return s;
    const size_t bytes = EncodedBytes(tokens, head_dim, source);
    if (out.size() != bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KV block encode: output is ", out.size(), " bytes; codec ", Sv(KvCodecKindName(kind_)),
          " with ", tokens, " tokens x ", head_dim, " (", DTypeName(source), ") needs ", bytes));
    }
    const Header h{.codec = kind_,
                   .source = source,
                   .tokens = tokens,
                   .head_dim = head_dim,
                   .key_group = key_group(),
                   .value_group = value_group(),
                   .payload_bytes = static_cast<uint32_t>(bytes - kBlockHeaderBytes)};
    WriteHeader(h, out.data());
    EncodePayload(k, v, source, tokens, head_dim, out.subspan(kBlockHeaderBytes));
    StoreLe32(out.data() + kCrcOffset, MaskCrc(BlockCrc(out)));
    return absl::OkStatus();
  }

 protected:
  virtual int key_group() const { return 0; }
  virtual int value_group() const { return 0; }
  // Writes exactly PayloadBytes(...) bytes; arguments are checked.
  virtual void EncodePayload(const void* k, const void* v, DType source, int n, int d,
                             std::span<uint8_t> payload) const = 0;

 private:
  const KvCodecKind kind_;
};

class RawCodec final : public CodecBase {
 public:
  RawCodec() : CodecBase(KvCodecKind::kBf16) {}

 protected:
  void EncodePayload(const void* k, const void* v, DType source, int n, int d,
                     std::span<uint8_t> payload) const override {
    const size_t tensor_bytes = size_t{1} * n * d * DTypeSize(source);
    std::memcpy(payload.data(), k, tensor_bytes);
    std::memcpy(payload.data() + tensor_bytes, v, tensor_bytes);
  }
};

class Fp8Codec final : public CodecBase {
 public:
  Fp8Codec() : CodecBase(KvCodecKind::kFp8E4M3) {}

 protected:
  void EncodePayload(const void* k, const void* v, DType source, int n, int d,
                     std::span<uint8_t> payload) const override {
    const size_t elements = size_t{1} * n * d;
    const std::vector<float> kf = ToFloats(k, source, elements);
    const std::vector<float> vf = ToFloats(v, source, elements);
    uint8_t* scale_k = payload.data();
    uint8_t* scale_v = scale_k + 2 * d;
    uint8_t* codes_k = scale_v + 2 * n;
    uint8_t* codes_v = codes_k + elements;

    // Keys: one scale per channel over the block's tokens.
    std::vector<float> amax(d, 0.0f);
    for (int t = 0; t < n; ++t) {
      for (int c = 0; c < d; ++c) {
        amax[c] = cm::MaxTotal(amax[c], cm::AbsF(kf[size_t{1} * t * d + c]));
      }
    }
    std::vector<float> sk(d);
    for (int c = 0; c < d; ++c) {
      const uint16_t bits = cm::Fp8ScaleBits(amax[c]);
      StoreLe16(scale_k + 2 * c, bits);
      sk[c] = cm::Fp16BitsToFloat(bits);
    }
    for (size_t i = 0; i < elements; ++i) codes_k[i] = cm::Fp8Quantize(kf[i], sk[i % d]);

    // Values: one scale per token over its channels.
    for (int t = 0; t < n; ++t) {
      const float* row = vf.data() + size_t{1} * t * d;
      float token_amax = 0.0f;
      for (int c = 0; c < d; ++c) token_amax = cm::MaxTotal(token_amax, cm::AbsF(row[c]));
      const uint16_t bits = cm::Fp8ScaleBits(token_amax);
      StoreLe16(scale_v + 2 * t, bits);
      const float s = cm::Fp16BitsToFloat(bits);
      for (int c = 0; c < d; ++c) codes_v[size_t{1} * t * d + c] = cm::Fp8Quantize(row[c], s);
    }
  }
};

// Writes code q of element i of a tensor's code array.
void PutCode(KvCodecKind kind, uint8_t* codes, size_t i, int q) {
  if (kind == KvCodecKind::kInt8) {
    codes[i] = static_cast<uint8_t>(q);
  } else {
    codes[i / 2] |= static_cast<uint8_t>(q << (4 * (i & 1)));
  }
}

int GetCode(KvCodecKind kind, const uint8_t* codes, size_t i) {
  if (kind == KvCodecKind::kInt8) return codes[i];
  return (codes[i / 2] >> (4 * (i & 1))) & 0xf;
}

class AffineCodec final : public CodecBase {
 public:
  explicit AffineCodec(KvCodecKind kind) : CodecBase(kind) {}

 protected:
  int key_group() const override { return kKeyGroupTokens; }
  int value_group() const override { return kValueGroupChannels; }

  void EncodePayload(const void* k, const void* v, DType source, int n, int d,
                     std::span<uint8_t> payload) const override {
    const KvCodecKind codec = kind();
    const int q_max = QMax(codec);
    const size_t elements = size_t{1} * n * d;
    const std::vector<float> kf = ToFloats(k, source, elements);
    const std::vector<float> vf = ToFloats(v, source, elements);
    const int groups_k = static_cast<int>(CeilDiv(n, kKeyGroupTokens));
    const int groups_v = static_cast<int>(CeilDiv(d, kValueGroupChannels));
    uint8_t* key_params = payload.data();
    uint8_t* value_params = key_params + size_t{4} * groups_k * d;
    uint8_t* codes_k = value_params + size_t{4} * n * groups_v;
    const size_t code_bytes = CodeBytesPerTensor(codec, elements);
    uint8_t* codes_v = codes_k + code_bytes;
    std::memset(codes_k, 0, 2 * code_bytes);  // int4: nibbles are or-ed in; padding stays 0

    // Keys: per channel, over groups of kKeyGroupTokens tokens.
    std::vector<float> lo(d), hi(d), s(d), m(d);
    for (int g = 0; g < groups_k; ++g) {
      const int t_begin = g * kKeyGroupTokens;
      const int t_end = std::min(n, t_begin + kKeyGroupTokens);
      std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
      std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
      for (int t = t_begin; t < t_end; ++t) {
        const float* row = kf.data() + size_t{1} * t * d;
        for (int c = 0; c < d; ++c) {
          lo[c] = cm::MinTotal(lo[c], row[c]);
          hi[c] = cm::MaxTotal(hi[c], row[c]);
        }
      }
      for (int c = 0; c < d; ++c) {
        const cm::AffineParams params = cm::AffineParamsFor(lo[c], hi[c], q_max);
        uint8_t* slot = key_params + 4 * (size_t{1} * g * d + c);
        StoreLe16(slot, params.scale_bits);
        StoreLe16(slot + 2, params.zero_bits);
        s[c] = cm::Fp16BitsToFloat(params.scale_bits);
        m[c] = cm::Fp16BitsToFloat(params.zero_bits);
      }
      for (int t = t_begin; t < t_end; ++t) {
        for (int c = 0; c < d; ++c) {
          const size_t i = size_t{1} * t * d + c;
          PutCode(codec, codes_k, i, cm::AffineQuantize(kf[i], s[c], m[c], q_max));
        }
      }
    }

    // Values: per token, over groups of kValueGroupChannels channels.
    for (int t = 0; t < n; ++t) {
      for (int g = 0; g < groups_v; ++g) {
        const int c_begin = g * kValueGroupChannels;
        const int c_end = std::min(d, c_begin + kValueGroupChannels);
        const size_t row = size_t{1} * t * d;
        float group_lo = std::numeric_limits<float>::infinity();
        float group_hi = -std::numeric_limits<float>::infinity();
        for (int c = c_begin; c < c_end; ++c) {
          group_lo = cm::MinTotal(group_lo, vf[row + c]);
          group_hi = cm::MaxTotal(group_hi, vf[row + c]);
        }
        const cm::AffineParams params = cm::AffineParamsFor(group_lo, group_hi, q_max);
        uint8_t* slot = value_params + 4 * (size_t{1} * t * groups_v + g);
        StoreLe16(slot, params.scale_bits);
        StoreLe16(slot + 2, params.zero_bits);
        const float gs = cm::Fp16BitsToFloat(params.scale_bits);
        const float gm = cm::Fp16BitsToFloat(params.zero_bits);
        for (int c = c_begin; c < c_end; ++c) {
          PutCode(codec, codes_v, row + c, cm::AffineQuantize(vf[row + c], gs, gm, q_max));
        }
      }
    }
  }
};

// --- decoding -----------------------------------------------------------------

absl::Status CheckOutDtype(const Header& h, DType out) {
  if (h.codec == KvCodecKind::kBf16) {
    if (out == DType::kF32 || out == h.source) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("KV block decode: out dtype ", DTypeName(out), " for a bf16 (raw) block of ",
                     DTypeName(h.source), " (F32 or its source dtype expected)"));
  }
  if (out == DType::kF32 || out == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("KV block decode: out dtype ", DTypeName(out),
                                                 " for a ", Sv(KvCodecKindName(h.codec)),
                                                 " block (F32 or BF16 expected)"));
}

void DecodeRaw(const Header& h, const uint8_t* payload, DType out, void* k_out, void* v_out) {
  const size_t elements = size_t{1} * h.tokens * h.head_dim;
  const size_t tensor_bytes = elements * DTypeSize(h.source);
  if (out == h.source) {
    std::memcpy(k_out, payload, tensor_bytes);
    std::memcpy(v_out, payload + tensor_bytes, tensor_bytes);
    return;
  }
  StoreFloats(ToFloats(payload, h.source, elements), DType::kF32, k_out);
  StoreFloats(ToFloats(payload + tensor_bytes, h.source, elements), DType::kF32, v_out);
}

void DecodeFp8(const Header& h, const uint8_t* payload, DType out, void* k_out, void* v_out) {
  const int n = h.tokens;
  const int d = h.head_dim;
  const size_t elements = size_t{1} * n * d;
  const uint8_t* scale_k = payload;
  const uint8_t* scale_v = scale_k + 2 * d;
  const uint8_t* codes_k = scale_v + 2 * n;
  const uint8_t* codes_v = codes_k + elements;
  std::vector<float> sk(d);
  for (int c = 0; c < d; ++c) sk[c] = cm::Fp16BitsToFloat(LoadLe16(scale_k + 2 * c));
  std::vector<float> values(elements);
  for (size_t i = 0; i < elements; ++i) values[i] = cm::Fp8Dequantize(codes_k[i], sk[i % d]);
  StoreFloats(values, out, k_out);
  for (int t = 0; t < n; ++t) {
    const float s = cm::Fp16BitsToFloat(LoadLe16(scale_v + 2 * t));
    for (int c = 0; c < d; ++c) {
      const size_t i = size_t{1} * t * d + c;
      values[i] = cm::Fp8Dequantize(codes_v[i], s);
    }
  }
  StoreFloats(values, out, v_out);
}

void DecodeAffine(const Header& h, const uint8_t* payload, DType out, void* k_out, void* v_out) {
  const int n = h.tokens;
  const int d = h.head_dim;
  const size_t elements = size_t{1} * n * d;
  const size_t groups_k = CeilDiv(n, h.key_group);
  const size_t groups_v = CeilDiv(d, h.value_group);
  const uint8_t* key_params = payload;
  const uint8_t* value_params = key_params + 4 * groups_k * d;
  const uint8_t* codes_k = value_params + 4 * n * groups_v;
  const uint8_t* codes_v = codes_k + CodeBytesPerTensor(h.codec, elements);
  std::vector<float> values(elements);
  for (int t = 0; t < n; ++t) {
    const uint8_t* params = key_params + 4 * (t / h.key_group) * size_t{1} * d;
    for (int c = 0; c < d; ++c) {
      const float s = cm::Fp16BitsToFloat(LoadLe16(params + 4 * c));
      const float m = cm::Fp16BitsToFloat(LoadLe16(params + 4 * c + 2));
      const size_t i = size_t{1} * t * d + c;
      values[i] = cm::AffineDequantize(GetCode(h.codec, codes_k, i), s, m);
    }
  }
  StoreFloats(values, out, k_out);
  for (int t = 0; t < n; ++t) {
    for (int c = 0; c < d; ++c) {
      const uint8_t* params = value_params + 4 * (size_t{1} * t * groups_v + c / h.value_group);
      const float s = cm::Fp16BitsToFloat(LoadLe16(params));
      const float m = cm::Fp16BitsToFloat(LoadLe16(params + 2));
      const size_t i = size_t{1} * t * d + c;
      values[i] = cm::AffineDequantize(GetCode(h.codec, codes_v, i), s, m);
    }
  }
  StoreFloats(values, out, v_out);
}

}  // namespace

absl::StatusOr<KvCodecKind> ParseKvCodecKind(std::string_view name) {
  for (KvCodecKind kind :
       {KvCodecKind::kBf16, KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    if (name == KvCodecKindName(kind)) return kind;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown codec \"", Sv(name), "\" (bf16, fp8_e4m3, int8 or int4)"));
}

std::string_view KvCodecKindName(KvCodecKind kind) {
  switch (kind) {
    case KvCodecKind::kBf16:
      return "bf16";
    case KvCodecKind::kFp8E4M3:
      return "fp8_e4m3";
    case KvCodecKind::kInt8:
      return "int8";
    case KvCodecKind::kInt4:
      return "int4";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<KvCodec>> KvCodec::Create(KvCodecKind kind) {
  switch (kind) {
    case KvCodecKind::kBf16:
      return std::unique_ptr<KvCodec>(new RawCodec());
    case KvCodecKind::kFp8E4M3:
      return std::unique_ptr<KvCodec>(new Fp8Codec());
    case KvCodecKind::kInt8:
    case KvCodecKind::kInt4:
      return std::unique_ptr<KvCodec>(new AffineCodec(kind));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown codec kind ", static_cast<int>(kind), " (0 to 3)"));
}

absl::StatusOr<KvBlockInfo> KvCodec::Inspect(std::span<const uint8_t> block) {
  absl::StatusOr<Header> h = CheckBlock(block);
  if (!h.ok()) return h.status();
  return ToInfo(*h);
}

absl::Status KvCodec::Decode(std::span<const uint8_t> block, DType out_dtype, void* k_out,
                             void* v_out, KvBlockInfo* info_or_null) {
  absl::StatusOr<Header> h = CheckBlock(block);
  if (!h.ok()) return h.status();
  if (auto s = CheckOutDtype(*h, out_dtype); !s.ok()) return s;
  if (k_out == nullptr || v_out == nullptr) {
    return absl::InvalidArgumentError("KV block decode: null K or V output");
  }
  const uint8_t* payload = block.data() + kBlockHeaderBytes;
  switch (h->codec) {
    case KvCodecKind::kBf16:
      DecodeRaw(*h, payload, out_dtype, k_out, v_out);
      break;
    case KvCodecKind::kFp8E4M3:
      DecodeFp8(*h, payload, out_dtype, k_out, v_out);
      break;
    case KvCodecKind::kInt8:
    case KvCodecKind::kInt4:
      DecodeAffine(*h, payload, out_dtype, k_out, v_out);
      break;
  }
  if (info_or_null != nullptr) *info_or_null = ToInfo(*h);
  return absl::OkStatus();
}

}  // namespace strata::engine

namespace strata::engine {

size_t KvCodec::DeclaredBytes(std::span<const uint8_t> bytes) {
  if (bytes.size() < kBlockHeaderBytes) return 0;
  const size_t total = kBlockHeaderBytes + LoadLe32(bytes.data() + 16);
  return total <= bytes.size() ? total : 0;
}

}  // namespace strata::engine

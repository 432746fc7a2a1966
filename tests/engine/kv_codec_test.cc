#include "engine/kv_codec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "engine/kv_codec_math.h"
#include "engine/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::engine {
namespace {

namespace cm = kv_codec_math;
using ::testing::HasSubstr;

constexpr DType kSources[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3};
constexpr KvCodecKind kKinds[] = {KvCodecKind::kBf16, KvCodecKind::kFp8E4M3, KvCodecKind::kInt8,
                                  KvCodecKind::kInt4};

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// --- kv_codec_math against engine/tensor.h's conversions -------------------------

// Every fp16 rounding boundary: each representable value, the midpoints
// between neighbours and the floats next to them, both signs.
std::vector<float> Fp16Boundaries() {
  std::vector<float> out;
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = Fp16ToFloat(static_cast<uint16_t>(h));
    const float b = Fp16ToFloat(static_cast<uint16_t>(h + 1));  // 0x7c00: inf
    const float mid = h + 1 == 0x7c00 ? 65520.0f : static_cast<float>((double(a) + b) / 2);
    for (float f : {a, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f),
                    std::nextafter(a, 1e30f)}) {
      out.push_back(f);
      out.push_back(-f);
    }
  }
  return out;
}

std::vector<float> Fp8Boundaries() {
  std::vector<float> out;
  for (uint32_t c = 0; c < 0x7e; ++c) {
    const float a = Fp8E4M3ToFloat(static_cast<uint8_t>(c));
    const float b = Fp8E4M3ToFloat(static_cast<uint8_t>(c + 1));
    const float mid = static_cast<float>((double(a) + b) / 2);
    for (float f : {a, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      out.push_back(f);
      out.push_back(-f);
    }
  }
  for (float f : {448.0f, 449.0f, 463.9f, 464.0f, 480.0f, 1e30f, 1.0f / 1024,
                  std::nextafter(1.0f / 1024, 1.0f), std::nextafter(1.0f / 1024, 0.0f), 1e-30f,
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN()}) {
    out.push_back(f);
    out.push_back(-f);
  }
  return out;
}

// Every 509th float bit pattern (all exponents, signs, NaNs, subnormals):
// the number of those where `ours` and `engine` differ.
template <typename Ours, typename Engine>
uint64_t DenseSampleMismatches(Ours ours, Engine engine) {
  uint64_t mismatches = 0;
  for (uint64_t b = 0; b <= 0xffffffffull; b += 509) {
    const float f = FromBits(static_cast<uint32_t>(b));
    if (ours(f) != engine(f)) {
      if (mismatches == 0) ADD_FAILURE() << "first mismatch at bits 0x" << std::hex << b;
      ++mismatches;
    }
  }
  return mismatches;
}

TEST(CodecMathTest, Fp16MatchesEngine) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    ASSERT_EQ(Bits(cm::Fp16BitsToFloat(static_cast<uint16_t>(h))),
              Bits(Fp16ToFloat(static_cast<uint16_t>(h))))
        << std::hex << h;
  }
  for (float f : Fp16Boundaries()) {
    ASSERT_EQ(cm::FloatToFp16Bits(f), FloatToFp16(f)) << std::hex << Bits(f);
  }
  EXPECT_EQ(DenseSampleMismatches(cm::FloatToFp16Bits, FloatToFp16), 0u);
}

TEST(CodecMathTest, Bf16MatchesEngine) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    ASSERT_EQ(Bits(cm::Bf16BitsToFloat(static_cast<uint16_t>(b))),
              Bits(Bf16ToFloat(static_cast<uint16_t>(b))));
  }
  EXPECT_EQ(DenseSampleMismatches(cm::FloatToBf16Bits, FloatToBf16), 0u);
}

TEST(CodecMathTest, Fp8E4M3MatchesEngine) {
  for (uint32_t c = 0; c < 256; ++c) {
    ASSERT_EQ(Bits(cm::Fp8E4M3ToFloat(static_cast<uint8_t>(c))),
              Bits(Fp8E4M3ToFloat(static_cast<uint8_t>(c))))
        << std::hex << c;
  }
  for (float f : Fp8Boundaries()) {
    ASSERT_EQ(cm::FloatToFp8E4M3(f), FloatToFp8E4M3(f)) << std::hex << Bits(f);
  }
  EXPECT_EQ(DenseSampleMismatches(cm::FloatToFp8E4M3, FloatToFp8E4M3), 0u);
}

// All 2^32 floats (half a minute); run by hand after changing a conversion:
// --gtest_also_run_disabled_tests --gtest_filter='*Exhaustive*'.
TEST(CodecMathTest, DISABLED_ExhaustiveConversionsMatchEngine) {
  uint64_t fp16_mismatches = 0, fp8_mismatches = 0;
  for (uint64_t b = 0; b <= 0xffffffffull; ++b) {
    const float f = FromBits(static_cast<uint32_t>(b));
    fp16_mismatches += cm::FloatToFp16Bits(f) != FloatToFp16(f);
    fp8_mismatches += cm::FloatToFp8E4M3(f) != FloatToFp8E4M3(f);
  }
  EXPECT_EQ(fp16_mismatches, 0u);
  EXPECT_EQ(fp8_mismatches, 0u);
}

TEST(CodecMathTest, GroupReductionsIgnoreOrder) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Bits(cm::MinTotal(0.0f, -0.0f)), Bits(-0.0f));
  EXPECT_EQ(Bits(cm::MinTotal(-0.0f, 0.0f)), Bits(-0.0f));
  EXPECT_EQ(Bits(cm::MaxTotal(0.0f, -0.0f)), Bits(0.0f));
  EXPECT_EQ(Bits(cm::MaxTotal(-0.0f, 0.0f)), Bits(0.0f));
  EXPECT_EQ(Bits(cm::MinTotal(1.0f, -nan)), cm::kCanonicalNanBits);
  EXPECT_EQ(Bits(cm::MaxTotal(-nan, 1.0f)), cm::kCanonicalNanBits);
  EXPECT_EQ(cm::MinTotal(2.0f, -3.0f), -3.0f);
  EXPECT_EQ(cm::MaxTotal(2.0f, -3.0f), 2.0f);
}

TEST(CodecMathTest, AffineQuantizeClampsAndRoundsHalfToEven) {
  EXPECT_EQ(cm::AffineQuantize(2.5f, 1.0f, 0.0f, 15), 2);
  EXPECT_EQ(cm::AffineQuantize(3.5f, 1.0f, 0.0f, 15), 4);
  EXPECT_EQ(cm::AffineQuantize(-4.0f, 1.0f, 0.0f, 15), 0);
  EXPECT_EQ(cm::AffineQuantize(400.0f, 1.0f, 0.0f, 255), 255);
  EXPECT_EQ(cm::AffineQuantize(std::nanf(""), 1.0f, 0.0f, 255), 0);
  EXPECT_EQ(cm::AffineQuantize(3.0f, 0.0f, 0.0f, 255), 0);
  EXPECT_EQ(cm::AffineQuantize(3.0f, std::numeric_limits<float>::infinity(), 0.0f, 255), 0);
  EXPECT_TRUE(std::isnan(cm::AffineDequantize(0, std::numeric_limits<float>::infinity(), 1.0f)));
}

TEST(CodecMathTest, AGroupOfInfinitiesGetsTheCanonicalNanScale) {
  // inf - inf: NaN, whose sign the CPU and the GPU would disagree on.
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(cm::AffineParamsFor(inf, inf, 15).scale_bits, 0x7e00);
  EXPECT_EQ(cm::AffineParamsFor(-inf, -inf, 255).scale_bits, 0x7e00);
  EXPECT_EQ(cm::AffineParamsFor(-inf, inf, 255).scale_bits, 0x7c00);  // inf, not NaN
}

// --- test data -----------------------------------------------------------------

// Source bytes of K or V plus the fp32 values the codec sees (the source
// widened, exact).
struct Tensor {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

Tensor MakeTensor(const std::vector<float>& x, DType dtype) {
  Tensor t;
  t.bytes.resize(x.size() * DTypeSize(dtype));
  t.values.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    switch (dtype) {
      case DType::kF32:
        std::memcpy(&t.bytes[4 * i], &x[i], 4);
        t.values[i] = x[i];
        break;
      case DType::kBF16: {
        const uint16_t b = FloatToBf16(x[i]);
        std::memcpy(&t.bytes[2 * i], &b, 2);
        t.values[i] = Bf16ToFloat(b);
        break;
      }
      case DType::kF16: {
        const uint16_t h = FloatToFp16(x[i]);
        std::memcpy(&t.bytes[2 * i], &h, 2);
        t.values[i] = Fp16ToFloat(h);
        break;
      }
      case DType::kF8E4M3:
        t.bytes[i] = FloatToFp8E4M3(x[i]);
        t.values[i] = Fp8E4M3ToFloat(t.bytes[i]);
        break;
      case DType::kI32:
        ADD_FAILURE() << "no I32 data";
    }
  }
  return t;
}

// Gaussian-ish keys with outlier channels (KIVI's observation: a few
// channels of K are far larger than the rest and offset) and values with
// per-token magnitudes; `magnitude` scales everything (tiny magnitudes make
// fp16-subnormal scales).
struct KvData {
  Tensor k, v;
};

KvData MakeKv(int n, int d, DType dtype, uint32_t seed, float magnitude = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> channel_scale(d), channel_offset(d), k(size_t{1} * n * d), v(k.size());
  for (int c = 0; c < d; ++c) {
    const bool outlier = uniform(rng) < 0.1f;
    channel_scale[c] = outlier ? 12.0f + 8.0f * uniform(rng) : 0.5f + uniform(rng);
    channel_offset[c] = outlier ? 20.0f * (uniform(rng) - 0.5f) : 0.2f * normal(rng);
  }
  for (int t = 0; t < n; ++t) {
    const float token_scale = 0.2f + 2.0f * uniform(rng);
    for (int c = 0; c < d; ++c) {
      const size_t i = size_t{1} * t * d + c;
      k[i] = magnitude * (channel_scale[c] * normal(rng) + channel_offset[c]);
      v[i] = magnitude * token_scale * normal(rng);
    }
  }
  return {MakeTensor(k, dtype), MakeTensor(v, dtype)};
}

std::unique_ptr<KvCodec> MakeCodec(KvCodecKind kind) {
  auto codec = KvCodec::Create(kind);
  EXPECT_TRUE(codec.ok()) << codec.status();
  return std::move(*codec);
}

std::vector<uint8_t> Encode(const KvCodec& codec, const KvData& kv, DType dtype, int n, int d) {
  std::vector<uint8_t> block(codec.EncodedBytes(n, d, dtype));
  const absl::Status s = codec.Encode(kv.k.bytes.data(), kv.v.bytes.data(), dtype, n, d, block);
  EXPECT_TRUE(s.ok()) << s;
  return block;
}

struct Decoded {
  std::vector<float> k, v;
};

Decoded DecodeF32(const std::vector<uint8_t>& block, int n, int d) {
  Decoded out{std::vector<float>(size_t{1} * n * d), std::vector<float>(size_t{1} * n * d)};
  const absl::Status s = KvCodec::Decode(block, DType::kF32, out.k.data(), out.v.data(), nullptr);
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

// Rewrites a block's CRC field so that it matches its (edited) bytes.
void FixCrc(std::vector<uint8_t>& block) {
  uint32_t crc = Crc32c(block.data(), 28);
  crc = Crc32cExtend(crc, block.data() + 32, block.size() - 32);
  const uint32_t masked = MaskCrc(crc);
  for (int i = 0; i < 4; ++i) block[28 + i] = static_cast<uint8_t>(masked >> (8 * i));
}

constexpr int kTokenCounts[] = {1, 7, 80, 129, 300};
constexpr int kHeadDims[] = {16, 64, 72, 128};

// --- names and creation ----------------------------------------------------------

TEST(CodecTest, NamesRoundTrip) {
  for (KvCodecKind kind : kKinds) {
    auto parsed = ParseKvCodecKind(KvCodecKindName(kind));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, kind);
    EXPECT_EQ(MakeCodec(kind)->kind(), kind);
  }
  EXPECT_EQ(KvCodecKindName(KvCodecKind::kFp8E4M3), "fp8_e4m3");
  auto bad = ParseKvCodecKind("fp4");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("\"fp4\""));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("bf16, fp8_e4m3, int8 or int4"));
  EXPECT_EQ(KvCodec::Create(static_cast<KvCodecKind>(7)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- sizes and format --------------------------------------------------------------

TEST(CodecTest, EncodedBytesMatchesTheFormat) {
  for (int n : kTokenCounts) {
    for (int d : kHeadDims) {
      for (DType dtype : kSources) {
        const size_t e = size_t{1} * n * d;
        const size_t gk = (n + 127) / 128, gv = (d + 31) / 32;
        EXPECT_EQ(MakeCodec(KvCodecKind::kBf16)->EncodedBytes(n, d, dtype),
                  32 + 2 * e * DTypeSize(dtype));
        EXPECT_EQ(MakeCodec(KvCodecKind::kFp8E4M3)->EncodedBytes(n, d, dtype),
                  32 + 2 * d + 2 * n + 2 * e);
        EXPECT_EQ(MakeCodec(KvCodecKind::kInt8)->EncodedBytes(n, d, dtype),
                  32 + 4 * gk * d + 4 * n * gv + 2 * e);
        EXPECT_EQ(MakeCodec(KvCodecKind::kInt4)->EncodedBytes(n, d, dtype),
                  32 + 4 * gk * d + 4 * n * gv + 2 * ((e + 1) / 2));
      }
    }
  }
  // Odd n * D for int4: the last byte is half padding.
  EXPECT_EQ(MakeCodec(KvCodecKind::kInt4)->EncodedBytes(3, 5, DType::kF32),
            32u + 4 * 5 + 4 * 3 + 2 * 8);
  // codec.h's bytes per token-head at D = 128, n = 80 (header included):
  // 261.6, 278.8 and 150.8 times 80 tokens.
  EXPECT_EQ(MakeCodec(KvCodecKind::kFp8E4M3)->EncodedBytes(80, 128, DType::kBF16), 20928u);
  EXPECT_EQ(MakeCodec(KvCodecKind::kInt8)->EncodedBytes(80, 128, DType::kBF16), 22304u);
  EXPECT_EQ(MakeCodec(KvCodecKind::kInt4)->EncodedBytes(80, 128, DType::kBF16), 12064u);
}

TEST(CodecTest, EncodeWritesExactlyEncodedBytesAndInspectAgrees) {
  for (KvCodecKind kind : kKinds) {
    auto codec = MakeCodec(kind);
    for (int n : kTokenCounts) {
      for (int d : {1, 3, 72}) {
        for (DType dtype : kSources) {
          const KvData kv = MakeKv(n, d, dtype, n * 1000 + d);
          const size_t bytes = codec->EncodedBytes(n, d, dtype);
          // One byte more or less is refused.
          std::vector<uint8_t> wrong(bytes + 1);
          EXPECT_EQ(codec->Encode(kv.k.bytes.data(), kv.v.bytes.data(), dtype, n, d, wrong).code(),
                    absl::StatusCode::kInvalidArgument);
          EXPECT_EQ(codec
                        ->Encode(kv.k.bytes.data(), kv.v.bytes.data(), dtype, n, d,
                                 std::span<uint8_t>(wrong).first(bytes - 1))
                        .code(),
                    absl::StatusCode::kInvalidArgument);
          const std::vector<uint8_t> block = Encode(*codec, kv, dtype, n, d);
          auto info = KvCodec::Inspect(block);
          ASSERT_TRUE(info.ok()) << info.status();
          EXPECT_EQ(info->codec, kind);
          EXPECT_EQ(info->source, dtype);
          EXPECT_EQ(info->tokens, n);
          EXPECT_EQ(info->head_dim, d);
          EXPECT_EQ(info->bytes, bytes);
          const bool grouped = kind == KvCodecKind::kInt8 || kind == KvCodecKind::kInt4;
          EXPECT_EQ(info->key_group, grouped ? 128 : 0);
          EXPECT_EQ(info->value_group, grouped ? 32 : 0);
        }
      }
    }
  }
}

// The header's bytes, field by field, for a raw block built by hand.
TEST(CodecTest, HeaderLayout) {
  const float k[6] = {1, 2, 3, 4, 5, 6}, v[6] = {-1, -2, -3, -4, -5, -6};
  auto codec = MakeCodec(KvCodecKind::kBf16);
  std::vector<uint8_t> block(codec->EncodedBytes(3, 2, DType::kF32));
  ASSERT_EQ(block.size(), 32u + 48u);
  ASSERT_TRUE(codec->Encode(k, v, DType::kF32, 3, 2, block).ok());
  const uint8_t expected_header[28] = {'S', 'K', 'V', 'B', 1, 0, 0, 0, 3, 0, 0, 0, 2, 0,
                                       0,   0,   48,  0,   0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(std::vector<uint8_t>(block.begin(), block.begin() + 28),
            std::vector<uint8_t>(std::begin(expected_header), std::end(expected_header)));
  EXPECT_EQ(std::memcmp(block.data() + 32, k, 24), 0);
  EXPECT_EQ(std::memcmp(block.data() + 56, v, 24), 0);
  uint32_t crc = Crc32cExtend(Crc32c(block.data(), 28), block.data() + 32, 48);
  const uint32_t masked = MaskCrc(crc);
  EXPECT_EQ(block[28] | block[29] << 8 | block[30] << 16 | uint32_t(block[31]) << 24, masked);

  // Source dtype wire codes and the int codecs' groups.
  const uint16_t kb[2] = {0x3c00, 0x4000}, vb[2] = {0, 0};
  auto int8 = MakeCodec(KvCodecKind::kInt8);
  block.assign(int8->EncodedBytes(1, 2, DType::kBF16), 0);
  ASSERT_TRUE(int8->Encode(kb, vb, DType::kBF16, 1, 2, block).ok());
  EXPECT_EQ(block[5], 2);  // int8
  EXPECT_EQ(block[6], 2);  // bf16
  EXPECT_EQ(block[20] | block[21] << 8, 128);
  EXPECT_EQ(block[22] | block[23] << 8, 32);
}

// A hand-computed int8 block: keys [0, 1] over two tokens of one channel.
TEST(CodecTest, Int8BytesForAKnownInput) {
  const float k[2] = {0.0f, 1.0f}, v[2] = {0.5f, -2.0f};
  auto codec = MakeCodec(KvCodecKind::kInt8);
  std::vector<uint8_t> block(codec->EncodedBytes(2, 1, DType::kF32));
  ASSERT_EQ(block.size(), 32u + 4 + 8 + 2 + 2);
  ASSERT_TRUE(codec->Encode(k, v, DType::kF32, 2, 1, block).ok());
  // Key scale fp16(1 / 255) = 0x1c04 (2^-8 + 4 * 2^-18), zero 0; value
  // groups of one element: scale 0, zero fp16(x) (0x3800 = 0.5, 0xc000 = -2);
  // key codes 0, rint(1 / s) = 255; value codes 0.
  const std::vector<uint8_t> payload = {0x04, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x38,
                                        0x00, 0x00, 0x00, 0xc0, 0x00, 0xff, 0x00, 0x00};
  EXPECT_EQ(std::vector<uint8_t>(block.begin() + 32, block.end()), payload);
  const Decoded out = DecodeF32(block, 2, 1);
  EXPECT_EQ(out.k[0], 0.0f);
  EXPECT_EQ(out.k[1], 255.0f * cm::Fp16BitsToFloat(0x1c04));
  EXPECT_EQ(out.v[0], 0.5f);
  EXPECT_EQ(out.v[1], -2.0f);
}

// The decoder takes the groups from the header, not from the encoder's
// defaults: one parameter pair per element here.
TEST(CodecTest, DecodesGroupsFromTheHeader) {
  const int n = 2, d = 3;
  std::vector<uint8_t> block(32 + 4 * n * d + 4 * n * d + 2 * ((n * d + 1) / 2), 0);
  const uint8_t header[24] = {'S', 'K', 'V', 'B', 1, 3, 0, 0, n, 0, 0, 0,
                              d,   0,   0,   0,   0, 0, 0, 0, 1, 0, 1, 0};
  std::memcpy(block.data(), header, sizeof(header));
  const uint32_t payload = static_cast<uint32_t>(block.size() - 32);
  block[16] = static_cast<uint8_t>(payload);
  for (int i = 0; i < 2 * n * d; ++i) {  // scale 1.0 (0x3c00), zero i
    const uint16_t zero = FloatToFp16(static_cast<float>(i));
    block[32 + 4 * i + 1] = 0x3c;
    block[32 + 4 * i + 2] = static_cast<uint8_t>(zero);
    block[32 + 4 * i + 3] = static_cast<uint8_t>(zero >> 8);
  }
  const size_t codes = 32 + 8 * n * d;
  block[codes] = 0x21;      // K codes 1, 2
  block[codes + 3] = 0xf0;  // V codes 0, 15
  FixCrc(block);
  const Decoded out = DecodeF32(block, n, d);
  EXPECT_THAT(out.k, ::testing::ElementsAre(1, 3, 2, 3, 4, 5));
  EXPECT_THAT(out.v, ::testing::ElementsAre(6, 22, 8, 9, 10, 11));
}

// --- round trips and error bounds -------------------------------------------------

TEST(CodecTest, Bf16IsBitExactForEverySource) {
  auto codec = MakeCodec(KvCodecKind::kBf16);
  for (int n : kTokenCounts) {
    for (int d : kHeadDims) {
      for (DType dtype : kSources) {
        const KvData kv = MakeKv(n, d, dtype, 7 * n + d);
        const std::vector<uint8_t> block = Encode(*codec, kv, dtype, n, d);
        std::vector<uint8_t> k(kv.k.bytes.size()), v(kv.v.bytes.size());
        KvBlockInfo info;
        ASSERT_TRUE(KvCodec::Decode(block, dtype, k.data(), v.data(), &info).ok());
        EXPECT_EQ(k, kv.k.bytes);
        EXPECT_EQ(v, kv.v.bytes);
        EXPECT_EQ(info.bytes, block.size());
        const Decoded wide = DecodeF32(block, n, d);
        for (size_t i = 0; i < wide.k.size(); ++i) {
          ASSERT_EQ(Bits(wide.k[i]), Bits(kv.k.values[i]));
          ASSERT_EQ(Bits(wide.v[i]), Bits(kv.v.values[i]));
        }
      }
    }
  }
}

// The bound codec.h states for fp8_e4m3, with s recomputed here from the
// group's amax through engine's fp16 conversion.
double Fp8Bound(float x, float amax) {
  const double s = Fp16ToFloat(FloatToFp16(amax / 448.0f));
  return std::ldexp(std::fabs(x), -4) * (1 + std::ldexp(1.0, -16)) + std::ldexp(s, -10) +
         448 * std::ldexp(1.0, -25);
}

// The bound codec.h states for int8/int4 (group lo, hi; Q = 255 or 15).
double AffineBound(float x, float lo, float hi, int q) {
  const double t = (double(hi) - lo) / q;
  const double s = Fp16ToFloat(FloatToFp16((hi - lo) / static_cast<float>(q)));
  const double m = Fp16ToFloat(FloatToFp16(lo));
  return 0.5 * s + std::fabs(lo - m) + q * std::max(0.0, t - s) +
         std::ldexp(std::fabs(x) + std::fabs(m) + q * s, -22);
}

// Checks every element against its bound; returns the largest error/bound.
double CheckQuantisedBounds(KvCodecKind kind, float magnitude) {
  auto codec = MakeCodec(kind);
  const int q = kind == KvCodecKind::kInt8 ? 255 : 15;
  double worst_ratio = 0;  // error / bound, reported
  for (int n : kTokenCounts) {
    for (int d : kHeadDims) {
      for (DType dtype : kSources) {
        SCOPED_TRACE(testing::Message() << KvCodecKindName(kind) << " n=" << n << " d=" << d
                                        << " source=" << DTypeName(dtype));
        const KvData kv = MakeKv(n, d, dtype, 31 * n + d, magnitude);
        const Decoded out = DecodeF32(Encode(*codec, kv, dtype, n, d), n, d);
        const std::vector<float>& k = kv.k.values;
        const std::vector<float>& v = kv.v.values;
        int failures = 0;  // the first few are reported
        auto check = [&](float x, float y, double bound) {
          worst_ratio = std::max(worst_ratio, std::fabs(double(x) - y) / bound);
          if (!(std::fabs(double(x) - y) <= bound) && ++failures <= 5) {
            ADD_FAILURE() << x << " decoded as " << y << ", bound " << bound;
          }
        };
        if (kind == KvCodecKind::kFp8E4M3) {
          for (int c = 0; c < d; ++c) {
            float amax = 0;
            for (int t = 0; t < n; ++t) amax = std::max(amax, std::fabs(k[t * d + c]));
            for (int t = 0; t < n; ++t) {
              check(k[t * d + c], out.k[t * d + c], Fp8Bound(k[t * d + c], amax));
            }
          }
          for (int t = 0; t < n; ++t) {
            float amax = 0;
            for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(v[t * d + c]));
            for (int c = 0; c < d; ++c) {
              check(v[t * d + c], out.v[t * d + c], Fp8Bound(v[t * d + c], amax));
            }
          }
          continue;
        }
        for (int g = 0; g * 128 < n; ++g) {
          const int end = std::min(n, g * 128 + 128);
          for (int c = 0; c < d; ++c) {
            float lo = INFINITY, hi = -INFINITY;
            for (int t = g * 128; t < end; ++t) {
              lo = std::min(lo, k[t * d + c]);
              hi = std::max(hi, k[t * d + c]);
            }
            for (int t = g * 128; t < end; ++t) {
              check(k[t * d + c], out.k[t * d + c], AffineBound(k[t * d + c], lo, hi, q));
            }
          }
        }
        for (int t = 0; t < n; ++t) {
          for (int g = 0; g * 32 < d; ++g) {
            const int end = std::min(d, g * 32 + 32);
            float lo = INFINITY, hi = -INFINITY;
            for (int c = g * 32; c < end; ++c) {
              lo = std::min(lo, v[t * d + c]);
              hi = std::max(hi, v[t * d + c]);
            }
            for (int c = g * 32; c < end; ++c) {
              check(v[t * d + c], out.v[t * d + c], AffineBound(v[t * d + c], lo, hi, q));
            }
          }
        }
      }
    }
  }
  return worst_ratio;
}

// The bounds hold, and are not vacuous: some element comes close to its bound.
TEST(CodecTest, Fp8WithinItsBound) {
  EXPECT_GT(CheckQuantisedBounds(KvCodecKind::kFp8E4M3, 1), 0.5);
}
TEST(CodecTest, Int8WithinItsBound) { EXPECT_GT(CheckQuantisedBounds(KvCodecKind::kInt8, 1), 0.5); }
TEST(CodecTest, Int4WithinItsBound) { EXPECT_GT(CheckQuantisedBounds(KvCodecKind::kInt4, 1), 0.5); }

// Tiny magnitudes: fp16-subnormal scales and zero points, and scales that
// round to zero.
TEST(CodecTest, WithinBoundsAtTinyMagnitudes) {
  for (KvCodecKind kind : {KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    CheckQuantisedBounds(kind, 1e-3f);
    CheckQuantisedBounds(kind, 1e-6f);
  }
}

TEST(CodecTest, QuantisedBf16OutIsTheF32ResultRounded) {
  for (KvCodecKind kind : {KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    auto codec = MakeCodec(kind);
    const KvData kv = MakeKv(80, 72, DType::kBF16, 99);
    const std::vector<uint8_t> block = Encode(*codec, kv, DType::kBF16, 80, 72);
    const Decoded wide = DecodeF32(block, 80, 72);
    std::vector<uint16_t> k(80 * 72), v(80 * 72);
    ASSERT_TRUE(KvCodec::Decode(block, DType::kBF16, k.data(), v.data(), nullptr).ok());
    for (size_t i = 0; i < k.size(); ++i) {
      ASSERT_EQ(k[i], FloatToBf16(wide.k[i]));
      ASSERT_EQ(v[i], FloatToBf16(wide.v[i]));
    }
  }
}

TEST(CodecTest, ConstantGroupsDecodeToTheirFp16Value) {
  std::vector<float> x(64 * 16, 0.3f);
  const Tensor t = MakeTensor(x, DType::kF32);
  for (KvCodecKind kind : {KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    const KvData kv{t, t};
    const Decoded out = DecodeF32(Encode(*MakeCodec(kind), kv, DType::kF32, 64, 16), 64, 16);
    for (float y : out.k) ASSERT_EQ(y, Fp16ToFloat(FloatToFp16(0.3f)));
  }
}

TEST(CodecTest, EncodeIsDeterministic) {
  for (KvCodecKind kind : kKinds) {
    for (DType dtype : kSources) {
      const KvData kv = MakeKv(129, 72, dtype, 5);
      const std::vector<uint8_t> a = Encode(*MakeCodec(kind), kv, dtype, 129, 72);
      const std::vector<uint8_t> b = Encode(*MakeCodec(kind), kv, dtype, 129, 72);
      EXPECT_EQ(a, b);
    }
  }
}

// A non-finite input turns its group into NaN, never into finite values.
TEST(CodecTest, NonFiniteInputsPoisonTheirGroup) {
  const int n = 40, d = 64;
  for (KvCodecKind kind : {KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(),
                      std::numeric_limits<float>::infinity(), -1e30f}) {
      KvData kv = MakeKv(n, d, DType::kF32, 3);
      std::memcpy(&kv.k.bytes[4 * (5 * d + 7)], &bad, 4);   // token 5, channel 7
      std::memcpy(&kv.v.bytes[4 * (9 * d + 33)], &bad, 4);  // token 9, channel 33
      const Decoded out = DecodeF32(Encode(*MakeCodec(kind), kv, DType::kF32, n, d), n, d);
      SCOPED_TRACE(testing::Message() << KvCodecKindName(kind) << " " << bad);
      for (int t = 0; t < n; ++t) {
        for (int c = 0; c < d; ++c) {
          const size_t i = size_t{1} * t * d + c;
          EXPECT_EQ(std::isnan(out.k[i]), c == 7) << t << "," << c;
          // Values: the token (fp8) or the token's channel group of 32 (int).
          const bool v_group = t == 9 && (kind == KvCodecKind::kFp8E4M3 || c / 32 == 1);
          EXPECT_EQ(std::isnan(out.v[i]), v_group) << t << "," << c;
        }
      }
    }
  }
}

// --- corruption ----------------------------------------------------------------------

std::vector<uint8_t> SmallBlock(KvCodecKind kind) {
  const KvData kv = MakeKv(3, 8, DType::kBF16, 11);
  return Encode(*MakeCodec(kind), kv, DType::kBF16, 3, 8);
}

TEST(CodecTest, EverySingleByteFlipIsDataLoss) {
  for (KvCodecKind kind : kKinds) {
    const std::vector<uint8_t> block = SmallBlock(kind);
    std::vector<float> k(24), v(24);
    for (size_t i = 0; i < block.size(); ++i) {
      for (uint8_t flip : {0x01, 0x80, 0xff}) {
        std::vector<uint8_t> bad = block;
        bad[i] ^= flip;
        const absl::Status s = KvCodec::Decode(bad, DType::kF32, k.data(), v.data(), nullptr);
        ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss)
            << KvCodecKindName(kind) << " byte " << i << " ^ " << int{flip} << ": " << s;
        EXPECT_THAT(std::string(s.message()), HasSubstr("KV block: "));
        EXPECT_EQ(KvCodec::Inspect(bad).status().code(), absl::StatusCode::kDataLoss);
      }
    }
  }
}

TEST(CodecTest, TruncationAndExtensionAreDataLoss) {
  for (KvCodecKind kind : kKinds) {
    const std::vector<uint8_t> block = SmallBlock(kind);
    for (size_t len = 0; len < block.size(); ++len) {
      const auto s = KvCodec::Inspect(std::span<const uint8_t>(block).first(len)).status();
      ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss) << len;
    }
    std::vector<uint8_t> longer = block;
    longer.push_back(0);
    EXPECT_EQ(KvCodec::Inspect(longer).status().code(), absl::StatusCode::kDataLoss);
  }
  const std::vector<uint8_t> twelve(12, 0);
  EXPECT_EQ(std::string(KvCodec::Inspect(twelve).status().message()),
            "KV block: 12 bytes, shorter than the 32-byte header");
}

TEST(CodecTest, CrcMismatchNamesBothValues) {
  std::vector<uint8_t> block = SmallBlock(KvCodecKind::kInt8);
  block.back() ^= 1;
  const absl::Status s = KvCodec::Inspect(block).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()),
              ::testing::MatchesRegex("KV block: CRC mismatch \\(stored 0x[0-9a-f]{8}, computed "
                                      "0x[0-9a-f]{8}\\)"));
}

// Field checks, each with the CRC recomputed so that the field itself is
// what gets refused.
TEST(CodecTest, BadFieldsAreNamed) {
  struct Case {
    size_t offset;
    uint8_t value;
    const char* message;
  };
  const Case cases[] = {
      {0, 'X', "bad magic"},
      {4, 2, "version 2 is not supported"},
      {5, 7, "unknown codec 7"},
      {6, 9, "unknown source dtype 9"},
      {7, 1, "flags 0x01 set"},
      {24, 1, "reserved field is 0x00000001 (must be 0)"},
      {27, 0x80, "reserved field is 0x80000000"},
      {8, 0, "tokens 0 out of range"},
      {11, 1, "tokens 16777219 out of range"},
      {12, 0, "head_dim 0 out of range"},
      {13, 4, "head_dim 1032 out of range"},
      {16, 0, "header says 0 payload bytes"},
      {20, 0, "key_group 0 and value_group 32 for codec int8 (must be at least 1)"},
      {22, 4, "header says 92 payload bytes, but codec int8"},  // value groups of 4 channels
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> block = SmallBlock(KvCodecKind::kInt8);
    block[c.offset] = c.value;
    FixCrc(block);
    const absl::Status s = KvCodec::Inspect(block).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << c.message;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message));
  }
  std::vector<uint8_t> fp8 = SmallBlock(KvCodecKind::kFp8E4M3);
  fp8[22] = 32;
  FixCrc(fp8);
  EXPECT_THAT(std::string(KvCodec::Inspect(fp8).status().message()),
              HasSubstr("key_group 0 and value_group 32 for codec fp8_e4m3 (must be 0)"));
  // tokens * head_dim beyond 2^26 with each in range.
  std::vector<uint8_t> big = SmallBlock(KvCodecKind::kBf16);
  big[10] = 1;  // tokens 65539
  big[12] = 0;  // head_dim 1024
  big[13] = 4;
  FixCrc(big);
  EXPECT_THAT(std::string(KvCodec::Inspect(big).status().message()), HasSubstr("exceeds 67108864"));
}

TEST(CodecTest, DecodeToAWrongDtypeIsInvalidArgument) {
  std::vector<float> k(24), v(24);
  for (KvCodecKind kind : {KvCodecKind::kFp8E4M3, KvCodecKind::kInt8, KvCodecKind::kInt4}) {
    const std::vector<uint8_t> block = SmallBlock(kind);
    for (DType out : {DType::kF16, DType::kF8E4M3, DType::kI32}) {
      const absl::Status s = KvCodec::Decode(block, out, k.data(), v.data(), nullptr);
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_THAT(std::string(s.message()), HasSubstr("F32 or BF16 expected"));
    }
  }
  // A raw block decodes to F32 or its own dtype only.
  const KvData kv = MakeKv(3, 8, DType::kF32, 1);
  const std::vector<uint8_t> raw = Encode(*MakeCodec(KvCodecKind::kBf16), kv, DType::kF32, 3, 8);
  const absl::Status s = KvCodec::Decode(raw, DType::kBF16, k.data(), v.data(), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("F32 or its source dtype expected"));
  EXPECT_EQ(KvCodec::Decode(raw, DType::kF32, nullptr, v.data(), nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CodecTest, EncodeRefusesBadArguments) {
  const std::vector<float> x(4096, 1.0f);
  for (KvCodecKind kind : kKinds) {
    auto codec = MakeCodec(kind);
    std::vector<uint8_t> out(codec->EncodedBytes(2, 2, DType::kF32));
    auto encode = [&](const void* k, DType dtype, int n, int d) {
      return codec->Encode(k, x.data(), dtype, n, d, out);
    };
    EXPECT_THAT(std::string(encode(x.data(), DType::kF32, 0, 2).message()), HasSubstr("tokens 0"));
    EXPECT_THAT(std::string(encode(x.data(), DType::kF32, (1 << 20) + 1, 2).message()),
                HasSubstr("tokens 1048577"));
    EXPECT_THAT(std::string(encode(x.data(), DType::kF32, 2, 1025).message()),
                HasSubstr("head_dim 1025"));
    EXPECT_THAT(std::string(encode(x.data(), DType::kF32, 1 << 20, 1024).message()),
                HasSubstr("exceeds"));
    EXPECT_THAT(std::string(encode(x.data(), DType::kI32, 2, 2).message()),
                HasSubstr("source dtype I32"));
    EXPECT_THAT(std::string(encode(nullptr, DType::kF32, 2, 2).message()), HasSubstr("null"));
    EXPECT_EQ(encode(x.data(), DType::kI32, 2, 2).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(codec->EncodedBytes(0, 2, DType::kF32), 0u);
    EXPECT_EQ(codec->EncodedBytes(2, 2, DType::kI32), 0u);
    EXPECT_EQ(codec->EncodedBytes(1 << 20, 1024, DType::kF32), 0u);
    EXPECT_TRUE(encode(x.data(), DType::kF32, 2, 2).ok());
  }
}

// The fuzzer's seed corpus (tests/fuzz/make_corpus.py writes it without
// this code) holds valid blocks of every codec: a second writer of the
// format that must agree with this one.
TEST(CodecTest, SeedCorpusBlocksAreValid) {
  const std::filesystem::path dir =
      std::filesystem::path(STRATA_FIXTURES_DIR) / ".." / "fuzz" / "corpus" / "kv_block_fuzzer";
  int valid = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("valid_", 0) != 0) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    const std::vector<uint8_t> block((std::istreambuf_iterator<char>(in)),
                                     std::istreambuf_iterator<char>());
    auto info = KvCodec::Inspect(block);
    ASSERT_TRUE(info.ok()) << name << ": " << info.status();
    std::vector<float> k(size_t{1} * info->tokens * info->head_dim), v(k.size());
    EXPECT_TRUE(KvCodec::Decode(block, DType::kF32, k.data(), v.data(), nullptr).ok()) << name;
    ++valid;
  }
  EXPECT_GE(valid, 4);
}

}  // namespace
}  // namespace strata::engine

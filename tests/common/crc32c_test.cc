#include "common/crc32c.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

using crc32c_internal::ExtendHardware;
using crc32c_internal::ExtendPortable;
using crc32c_internal::HardwareAvailable;

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(n);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

// Every implementation under test, as (name, Extend).
using ExtendFn = uint32_t (*)(uint32_t, const void*, size_t);
std::vector<std::pair<std::string, ExtendFn>> Implementations() {
  std::vector<std::pair<std::string, ExtendFn>> impls = {{"public", &Crc32cExtend},
                                                         {"portable", &ExtendPortable}};
  if (HardwareAvailable()) impls.push_back({"hardware", &ExtendHardware});
  return impls;
}

TEST(Crc32cTest, KnownVectors) {
  std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xff), ascending(32), descending(32);
  for (int i = 0; i < 32; ++i) {
    ascending[i] = static_cast<uint8_t>(i);
    descending[i] = static_cast<uint8_t>(31 - i);
  }
  const std::string check = "123456789";
  for (const auto& [name, extend] : Implementations()) {
    SCOPED_TRACE(name);
    EXPECT_EQ(extend(0, check.data(), check.size()), 0xE3069283u);
    // RFC 3720, B.4.
    EXPECT_EQ(extend(0, zeros.data(), zeros.size()), 0x8A9136AAu);
    EXPECT_EQ(extend(0, ones.data(), ones.size()), 0x62A8AB43u);
    EXPECT_EQ(extend(0, ascending.data(), ascending.size()), 0x46DD794Eu);
    EXPECT_EQ(extend(0, descending.data(), descending.size()), 0x113FDB5Cu);
    EXPECT_EQ(extend(0, nullptr, 0), 0u);
  }
  EXPECT_EQ(Crc32c(check.data(), check.size()), 0xE3069283u);
}

TEST(Crc32cTest, ExtendOverEverySplitEqualsOneShot) {
  const std::vector<uint8_t> data = RandomBytes(3000, 1);
  for (const auto& [name, extend] : Implementations()) {
    SCOPED_TRACE(name);
    const uint32_t whole = extend(0, data.data(), data.size());
    EXPECT_EQ(whole, ExtendPortable(0, data.data(), data.size()));
    for (size_t split = 0; split <= data.size(); ++split) {
      const uint32_t head = extend(0, data.data(), split);
      ASSERT_EQ(extend(head, data.data() + split, data.size() - split), whole) << split;
    }
  }
}

// Lengths around every path of the hardware loop (three streams of 8 KiB
// and 256-byte lanes, single 8-byte words, single bytes) at every alignment.
TEST(Crc32cTest, HardwareEqualsPortableAtOddLengthsAndAlignments) {
  if (!HardwareAvailable()) GTEST_SKIP() << "no SSE4.2";
  const std::vector<uint8_t> data = RandomBytes(200000, 2);
  // One round of 3 x 8 KiB lanes is 24576 bytes, one of 3 x 256-byte lanes 768.
  const size_t lengths[] = {0,    1,     7,     8,     9,     255,   767,    768,   769,
                            1000, 24575, 24576, 24577, 25357, 50699, 100000, 199000};
  for (size_t offset = 0; offset < 16; ++offset) {
    for (size_t n : lengths) {
      ASSERT_EQ(ExtendHardware(0x12345678u, data.data() + offset, n),
                ExtendPortable(0x12345678u, data.data() + offset, n))
          << "offset " << offset << " length " << n;
    }
  }
  std::mt19937 rng(3);
  for (int i = 0; i < 300; ++i) {
    const size_t offset = rng() % 64;
    const size_t n = rng() % (data.size() - offset);
    const uint32_t crc = rng();
    ASSERT_EQ(ExtendHardware(crc, data.data() + offset, n),
              ExtendPortable(crc, data.data() + offset, n))
        << "offset " << offset << " length " << n;
  }
}

TEST(Crc32cTest, ShiftByZeroBytesIsAppendingZeros) {
  const std::vector<uint8_t> zeros(5000, 0);
  std::mt19937 rng(4);
  for (size_t n : {size_t{0}, size_t{1}, size_t{3}, size_t{8}, size_t{256}, size_t{4999}}) {
    const uint32_t crc = rng();
    // The register is the complemented CRC.
    EXPECT_EQ(~crc32c_internal::ShiftByZeroBytes(~crc, n), ExtendPortable(crc, zeros.data(), n))
        << n;
  }
}

TEST(Crc32cTest, CombinerFoldsPieceCrcsIntoTheWholeCrc) {
  for (size_t piece : {size_t{1}, size_t{7}, size_t{4096}, size_t{32768}}) {
    SCOPED_TRACE(piece);
    const std::vector<uint8_t> data = RandomBytes(piece * 5, static_cast<uint32_t>(piece));
    const Crc32cCombiner combiner(piece);
    EXPECT_EQ(combiner.piece_bytes(), piece);
    uint32_t folded = 0;  // the CRC of no bytes
    for (size_t i = 0; i < 5; ++i) {
      folded = combiner.Combine(folded, Crc32c(data.data() + i * piece, piece));
      EXPECT_EQ(folded, Crc32c(data.data(), (i + 1) * piece)) << "after piece " << i;
    }
    // A piece out of place changes the fold.
    uint32_t swapped =
        combiner.Combine(Crc32c(data.data() + piece, piece), Crc32c(data.data(), piece));
    EXPECT_NE(swapped, Crc32c(data.data(), 2 * piece));
  }
}

TEST(Crc32cTest, MaskRoundTripsAndChangesTheValue) {
  std::mt19937 rng(5);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t crc = i < 3 ? uint32_t(i) : rng();
    EXPECT_EQ(UnmaskCrc(MaskCrc(crc)), crc);
    EXPECT_NE(MaskCrc(crc), crc);
    EXPECT_NE(MaskCrc(MaskCrc(crc)), crc);
  }
}

// Why stored CRCs are masked: the CRC of a message followed by its own CRC
// is the same for every message; with the stored CRC masked it is not.
TEST(Crc32cTest, MaskingBreaksTheSelfCheckResidue) {
  auto with_crc = [](std::vector<uint8_t> m, bool mask) {
    uint32_t crc = Crc32c(m.data(), m.size());
    if (mask) crc = MaskCrc(crc);
    for (int i = 0; i < 4; ++i) m.push_back(static_cast<uint8_t>(crc >> (8 * i)));
    return Crc32c(m.data(), m.size());
  };
  const std::vector<uint8_t> a = RandomBytes(100, 6), b = RandomBytes(37, 7);
  EXPECT_EQ(with_crc(a, false), with_crc(b, false));
  EXPECT_NE(with_crc(a, true), with_crc(b, true));
}

// Throughput on a 1 MiB buffer; informational (timings are not asserted
// because sanitizer builds and loaded machines vary). Run with
// --gtest_also_run_disabled_tests --gtest_filter='*Throughput*'.
TEST(Crc32cTest, DISABLED_Throughput) {
  const std::vector<uint8_t> data = RandomBytes(1 << 20, 8);
  auto gbps = [&](ExtendFn fn, int reps) {
    uint32_t sink = 0;
    double best = 1e30;
    for (int round = 0; round < 5; ++round) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) sink ^= fn(sink, data.data(), data.size());
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      best = std::min(best, s);
    }
    EXPECT_NE(sink, 0x5a5a5a5au);  // keeps the loop
    return double(data.size()) * reps / best / 1e9;
  };
  const double portable = gbps(&ExtendPortable, 4);
  std::printf("crc32c portable: %.2f GB/s\n", portable);
  if (HardwareAvailable()) {
    const double hardware = gbps(&ExtendHardware, 200);
    std::printf("crc32c hardware: %.2f GB/s (%.1fx portable)\n", hardware, hardware / portable);
  }
}

}  // namespace
}  // namespace strata

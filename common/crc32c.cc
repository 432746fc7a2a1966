#include "common/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define STRATA_CRC32C_X86 1
#endif

namespace strata {
namespace {

// GF(2) polynomials modulo P are held in the reflected form the CRC register
// uses: bit 31 is the coefficient of x^0, bit 0 that of x^31.
constexpr uint32_t kPoly = 0x82F63B78u;  // P without its x^32 term, reflected
constexpr uint32_t kOne = 0x80000000u;   // x^0

constexpr uint32_t TimesX(uint32_t a) { return (a >> 1) ^ ((a & 1u) ? kPoly : 0u); }

// a * b mod P: b * x^i accumulated over the terms x^i of a. Branch-free
// inner step so that it is also usable at run time without mispredictions.
constexpr uint32_t MultModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    product ^= b & (0u - ((a >> (31 - i)) & 1u));
    b = TimesX(b);
  }
  return product;
}

// x^(8 * n) mod P by square-and-multiply over the bits of n.
constexpr uint32_t XPow8N(uint64_t n) {
  uint32_t result = kOne;
  uint32_t base = kOne >> 8;  // x^8
  while (n != 0) {
    if (n & 1u) result = MultModP(result, base);
    base = MultModP(base, base);
    n >>= 1;
  }
  return result;
}

// The register update for one input byte, for the portable path.
constexpr std::array<uint32_t, 256> MakeByteTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t r = b;
    for (int bit = 0; bit < 8; ++bit) r = TimesX(r);
    table[b] = r;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kByteTable = MakeByteTable();

// Multiplication of a register by a fixed K = x^(8 * lane) mod P as four
// table lookups: the product is linear in the register, so it is the xor of
// the products of its four bytes.
using ShiftTable = std::array<std::array<uint32_t, 256>, 4>;

constexpr ShiftTable MakeShiftTable(uint64_t lane_bytes) {
  const uint32_t k = XPow8N(lane_bytes);
  ShiftTable table{};
  for (int j = 0; j < 4; ++j) {
    for (uint32_t b = 0; b < 256; ++b) table[j][b] = MultModP(b << (8 * j), k);
  }
  return table;
}

inline uint32_t Shift(const ShiftTable& t, uint32_t r) {
  return t[0][r & 0xff] ^ t[1][(r >> 8) & 0xff] ^ t[2][(r >> 16) & 0xff] ^ t[3][r >> 24];
}

uint32_t ExtendPortableRegister(uint32_t r, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) r = kByteTable[(r ^ p[i]) & 0xff] ^ (r >> 8);
  return r;
}

#if defined(STRATA_CRC32C_X86)
// Lane sizes of the three-stream loop. Long lanes amortise the combine (two
// shifts per round) to nothing; short lanes keep mid-sized buffers (a KV
// block of a few KiB) on three streams too. Any multiple of 8 is correct.
constexpr size_t kLongLane = 8192;
constexpr size_t kShortLane = 256;
constexpr ShiftTable kLongShift = MakeShiftTable(kLongLane);
constexpr ShiftTable kShortShift = MakeShiftTable(kShortLane);

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));  // unaligned loads are fine on x86-64
  return v;
}

// Three streams over lanes a, b, c of one round: the round's register is
// ((r_a * K) ^ r_b) * K ^ r_c, where r_a starts from the running register
// and r_b, r_c from zero (the CRC register is linear in its start value and
// the data).
template <size_t kLane>
__attribute__((target("sse4.2"))) inline uint32_t ThreeStreamRounds(uint32_t r, const uint8_t*& p,
                                                                    size_t& n,
                                                                    const ShiftTable& shift) {
  while (n >= 3 * kLane) {
    uint64_t ra = r, rb = 0, rc = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      ra = _mm_crc32_u64(ra, Load64(p + i));
      rb = _mm_crc32_u64(rb, Load64(p + kLane + i));
      rc = _mm_crc32_u64(rc, Load64(p + 2 * kLane + i));
    }
    r = Shift(shift, Shift(shift, static_cast<uint32_t>(ra)) ^ static_cast<uint32_t>(rb)) ^
        static_cast<uint32_t>(rc);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return r;
}

__attribute__((target("sse4.2"))) uint32_t ExtendHardwareRegister(uint32_t r, const uint8_t* p,
                                                                  size_t n) {
  r = ThreeStreamRounds<kLongLane>(r, p, n, kLongShift);
  r = ThreeStreamRounds<kShortLane>(r, p, n, kShortShift);
  uint64_t r64 = r;
  for (; n >= 8; n -= 8, p += 8) r64 = _mm_crc32_u64(r64, Load64(p));
  r = static_cast<uint32_t>(r64);
  for (; n > 0; --n, ++p) r = _mm_crc32_u8(r, *p);
  return r;
}
#endif

}  // namespace

namespace crc32c_internal {

uint32_t ExtendPortable(uint32_t crc, const void* data, size_t n) {
  return ~ExtendPortableRegister(~crc, static_cast<const uint8_t*>(data), n);
}

bool HardwareAvailable() {
#if defined(STRATA_CRC32C_X86)
  static const bool available = __builtin_cpu_supports("sse4.2");
  return available;
#else
  return false;
#endif
}

uint32_t ExtendHardware(uint32_t crc, const void* data, size_t n) {
#if defined(STRATA_CRC32C_X86)
  return ~ExtendHardwareRegister(~crc, static_cast<const uint8_t*>(data), n);
#else
  return ExtendPortable(crc, data, n);
#endif
}

uint32_t ShiftByZeroBytes(uint32_t crc_register, uint64_t n) {
  return MultModP(crc_register, XPow8N(n));
}

}  // namespace crc32c_internal

// The standard CRC (init and final xor ~0) of a || b is the register
// product Crc32c(a) * x^(8|b|) xor Crc32c(b): the ~0 terms cancel.
Crc32cCombiner::Crc32cCombiner(uint64_t piece_bytes) : piece_bytes_(piece_bytes) {
  const uint32_t k = XPow8N(piece_bytes);
  for (int j = 0; j < 4; ++j) {
    for (uint32_t b = 0; b < 256; ++b) shift_[j][b] = MultModP(b << (8 * j), k);
  }
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
  if (n == 0) return crc;
  return crc32c_internal::HardwareAvailable() ? crc32c_internal::ExtendHardware(crc, data, n)
                                              : crc32c_internal::ExtendPortable(crc, data, n);
}

}  // namespace strata

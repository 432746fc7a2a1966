// Number formats and quantisation arithmetic of the KV block codecs
// (engine/kv_codec.h), shared by the CPU codec and the CUDA kernels so that
// both produce and read the same bytes.
//
// Bit-for-bit agreement between host and device rests on three rules:
//  - Every floating-point operation is one correctly rounded IEEE operation
//    (AddRn/SubRn/MulRn/DivRn: __fadd_rn etc. on the device, which nvcc
//    never contracts into FMAs; plain operators on the host, whose users
//    compile with -ffp-contract=off, see engine/CMakeLists.txt; x86-64
//    without -mfma has no FMA to contract into anyway). Rounding to an
//    integer is round-half-to-even on both sides (rintf in the default
//    rounding mode; __float2int_rn).
//  - Conversions to and from fp16, bf16 and fp8 e4m3 are written here
//    bitwise (no _Float16, no __half, no library calls), so they cannot
//    differ between compilers. They equal engine/tensor.h's host
//    conversions bit for bit (a dense sample in the unit tests, all 2^32
//    floats in a disabled test), and on an H100 they equalled CUDA's
//    __float2half_rn and __nv_cvt_float_to_fp8(x, __NV_SATFINITE,
//    __NV_E4M3) and their own host results, as did the quantise and
//    dequantise formulas below (checked once over 12M inputs).
//  - Group reductions (min, max, max |x|) are order-independent: -0 is
//    taken as below +0 and any NaN yields the same canonical NaN, so a
//    parallel tree reduction on the GPU finds the same value as the CPU's
//    sequential loop.
//
// Thread-safety: pure functions.
#ifndef STRATA_ENGINE_KV_CODEC_MATH_H_
#define STRATA_ENGINE_KV_CODEC_MATH_H_

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

// The same definition as engine/backend.h's, so either header may come first.
#ifndef STRATA_HOST_DEVICE
#if defined(__CUDACC__)
#define STRATA_HOST_DEVICE __host__ __device__
#else
#define STRATA_HOST_DEVICE
#endif
#endif

namespace strata::engine::kv_codec_math {

inline constexpr uint32_t kCanonicalNanBits = 0x7fc00000u;
inline constexpr float kFp8E4M3Max = 448.0f;

// --- bits and correctly rounded arithmetic ----------------------------------

STRATA_HOST_DEVICE inline uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

STRATA_HOST_DEVICE inline float BitsFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

STRATA_HOST_DEVICE inline float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

STRATA_HOST_DEVICE inline float SubRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

STRATA_HOST_DEVICE inline float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

STRATA_HOST_DEVICE inline float DivRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Round half to even, for values well inside the int range (callers clamp
// first). The host relies on the default rounding mode, which strata never
// changes.
STRATA_HOST_DEVICE inline int RintToInt(float v) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(v);
#else
  return static_cast<int>(std::rint(v));
#endif
}

STRATA_HOST_DEVICE inline bool IsNan(float f) { return (FloatBits(f) & 0x7fffffffu) > 0x7f800000u; }
STRATA_HOST_DEVICE inline bool IsFinite(float f) {
  return (FloatBits(f) & 0x7f800000u) != 0x7f800000u;
}
STRATA_HOST_DEVICE inline float AbsF(float f) { return BitsFloat(FloatBits(f) & 0x7fffffffu); }

// --- order-independent group reductions -------------------------------------

// min(a, b) with -0 < +0 and NaN absorbing (as the canonical NaN): an
// associative, commutative operation, so any reduction order gives the same
// bits.
STRATA_HOST_DEVICE inline float MinTotal(float a, float b) {
  if (IsNan(a) || IsNan(b)) return BitsFloat(kCanonicalNanBits);
  if (a < b) return a;
  if (b < a) return b;
  return BitsFloat(FloatBits(a) | FloatBits(b));  // equal; of +0 and -0, -0
}

STRATA_HOST_DEVICE inline float MaxTotal(float a, float b) {
  if (IsNan(a) || IsNan(b)) return BitsFloat(kCanonicalNanBits);
  if (a > b) return a;
  if (b > a) return b;
  return BitsFloat(FloatBits(a) & FloatBits(b));  // equal; of +0 and -0, +0
}

// --- RNE right shift shared by the narrowing conversions --------------------

// round(m / 2^shift), ties to even; 1 <= shift <= 31.
STRATA_HOST_DEVICE inline uint32_t ShiftRightRne(uint32_t m, uint32_t shift) {
  uint32_t q = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (q & 1u))) ++q;
  return q;
}

// The significand and exponent of |f| for f finite and non-zero:
// |f| = significand * 2^(exponent - 150), with subnormals given exponent 1
// and no implicit bit.
struct Fp32Parts {
  uint32_t significand;
  uint32_t exponent;
};
STRATA_HOST_DEVICE inline Fp32Parts SplitAbs(uint32_t abs_bits) {
  const uint32_t e = abs_bits >> 23;
  const uint32_t m = abs_bits & 0x7fffffu;
  if (e == 0) return {m, 1u};
  return {m | 0x800000u, e};
}

// --- fp16 -------------------------------------------------------------------

// fp16 bits -> fp32, exact. NaN payloads are kept (shifted), as engine's.
STRATA_HOST_DEVICE inline float Fp16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    exp = 127 - 15 + 1;  // subnormal: normalise the significand
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    return BitsFloat(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
  }
  return BitsFloat(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// fp32 -> fp16 bits, round to nearest even; beyond the largest finite value
// (65504, up to the midpoint 65520) to infinity; NaN to sign | 0x7e00.
STRATA_HOST_DEVICE inline uint16_t FloatToFp16Bits(float f) {
  const uint32_t bits = FloatBits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520
  if (abs < 0x38800000u) {  // below 2^-14: fp16 subnormal (multiples of 2^-24) or zero
    if (abs == 0) return static_cast<uint16_t>(sign);
    const Fp32Parts p = SplitAbs(abs);
    // |f| * 2^24 = significand * 2^(exponent - 126), exponent <= 112.
    const uint32_t shift = 126u - p.exponent;
    if (shift > 24) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to 0
    return static_cast<uint16_t>(sign | ShiftRightRne(p.significand, shift));
  }
  // Normal: rebias the exponent (127 -> 15), round 23 mantissa bits to 10.
  // A carry out of the mantissa correctly bumps the exponent.
  const uint32_t half = (((abs >> 23) - 112u) << 10) | ((abs >> 13) & 0x3ffu);
  const uint32_t rest = abs & 0x1fffu;
  const uint32_t rounded = half + ((rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);
}

// --- bf16 -------------------------------------------------------------------

STRATA_HOST_DEVICE inline float Bf16BitsToFloat(uint16_t b) {
  return BitsFloat(static_cast<uint32_t>(b) << 16);
}

// Round to nearest even; NaN to 0x7fc0 (as engine::FloatToBf16).
STRATA_HOST_DEVICE inline uint16_t FloatToBf16Bits(float f) {
  const uint32_t bits = FloatBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// --- fp8 e4m3 (OCP: bias 7, no infinities, max 448, NaN 0x7f/0xff) ---------

STRATA_HOST_DEVICE inline float Fp8E4M3ToFloat(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t mant = v & 0x7u;
  if (exp == 0xf && mant == 0x7) return BitsFloat(kCanonicalNanBits);
  if (exp == 0) {  // subnormal: mant * 2^-9, exact in fp32
    return BitsFloat(sign | FloatBits(MulRn(static_cast<float>(mant), 1.0f / 512.0f)));
  }
  return BitsFloat(sign | ((exp + 127 - 7) << 23) | (mant << 20));
}

// Round to nearest even; finite values beyond +-448 and infinities saturate
// to +-448 (0x7e/0xfe); NaN becomes 0x7f. Same as engine::FloatToFp8E4M3 and
// CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3).
STRATA_HOST_DEVICE inline uint8_t FloatToFp8E4M3(float f) {
  const uint32_t bits = FloatBits(f);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return 0x7fu;
  if (abs >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448
  if (abs < 0x3c800000u) {  // below 2^-6: subnormal e4m3, multiples of 2^-9
    if (abs == 0) return static_cast<uint8_t>(sign);
    const Fp32Parts p = SplitAbs(abs);
    // |f| * 2^9 = significand * 2^(exponent - 141), exponent <= 120.
    const uint32_t shift = 141u - p.exponent;
    if (shift > 24) return static_cast<uint8_t>(sign);  // below 2^-10: rounds to 0
    // Rounding up to 8 gives 0x08, the smallest normal, as it should.
    return static_cast<uint8_t>(sign | ShiftRightRne(p.significand, shift));
  }
  // Normal: rebias (127 -> 7), round 23 mantissa bits to 3. Below 448 a
  // carry never reaches the NaN pattern 0x7f.
  const uint32_t code = (((abs >> 23) - 120u) << 3) | ((abs >> 20) & 0x7u);
  const uint32_t rest = abs & 0xfffffu;
  const uint32_t rounded =
      code + ((rest > 0x80000u || (rest == 0x80000u && (code & 1u))) ? 1u : 0u);
  return static_cast<uint8_t>(sign | rounded);
}

// --- the codecs' quantisation formulas (engine/kv_codec.h states the format) ---

// A scale that quantisation can divide by: positive and finite.
STRATA_HOST_DEVICE inline bool ScaleUsable(float s) { return s > 0.0f && IsFinite(s); }

// fp8_e4m3 codec: s = fp16(amax / 448) over the group.
STRATA_HOST_DEVICE inline uint16_t Fp8ScaleBits(float amax) {
  return FloatToFp16Bits(DivRn(amax, kFp8E4M3Max));
}

STRATA_HOST_DEVICE inline uint8_t Fp8Quantize(float x, float s) {
  return ScaleUsable(s) ? FloatToFp8E4M3(DivRn(x, s)) : uint8_t{0};
}

STRATA_HOST_DEVICE inline float Fp8Dequantize(uint8_t code, float s) {
  return MulRn(Fp8E4M3ToFloat(code), s);
}

// int8/int4 codecs (asymmetric, KIVI-style): q_max = 255 or 15.
struct AffineParams {
  uint16_t scale_bits;  // fp16((hi - lo) / q_max)
  uint16_t zero_bits;   // fp16(lo)
};

STRATA_HOST_DEVICE inline AffineParams AffineParamsFor(float lo, float hi, int q_max) {
  const float scale = DivRn(SubRn(hi, lo), static_cast<float>(q_max));
  // inf - inf is a NaN whose sign differs between x86 (negative) and the
  // GPU (positive): one canonical NaN, so every encoder writes the same
  // bytes for a group holding an infinity.
  const uint16_t scale_bits = scale != scale ? uint16_t{0x7e00u} : FloatToFp16Bits(scale);
  return {scale_bits, FloatToFp16Bits(lo)};
}

// clamp(rint((x - m) / s), 0, q_max), or 0 when s is not usable. Clamping
// before rounding equals clamping after (the bounds are integers), keeps
// the conversion to int in range, and sends NaN to 0.
STRATA_HOST_DEVICE inline int AffineQuantize(float x, float s, float m, int q_max) {
  if (!ScaleUsable(s)) return 0;
  float v = DivRn(SubRn(x, m), s);
  if (!(v > 0.0f)) v = 0.0f;
  const float top = static_cast<float>(q_max);
  if (v > top) v = top;
  return RintToInt(v);
}

// q * s + m. With a non-finite s this is NaN (0 * inf), so a group whose
// scale overflowed never decodes to finite garbage.
STRATA_HOST_DEVICE inline float AffineDequantize(int q, float s, float m) {
  return AddRn(MulRn(static_cast<float>(q), s), m);
}

}  // namespace strata::engine::kv_codec_math

#endif  // STRATA_ENGINE_KV_CODEC_MATH_H_

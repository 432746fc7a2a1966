// The arithmetic of Backend::SampleTokens that the CPU reference and the
// CUDA kernel must compute bit for bit alike, so that both pick the same
// token for the same logits, parameters, seed and counter.
//
// Only IEEE-exact operations are used: integer ops, single additions,
// subtractions, multiplications and divisions, and explicit fmaf (a fused
// multiply-add is exactly defined). Every multiply that feeds an add is
// written as fmaf, so the result does not depend on whether a compiler
// contracts a * b + c (nvcc does by default). exp and log are evaluated with
// fixed polynomials here instead of libm / CUDA intrinsics, whose last-bit
// rounding differs between host and device.
#ifndef STRATA_ENGINE_SAMPLE_MATH_H_
#define STRATA_ENGINE_SAMPLE_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "engine/backend.h"

namespace strata::engine::sample_math {

STRATA_HOST_DEVICE inline uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}
STRATA_HOST_DEVICE inline float BitsFloat(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

// Order-preserving key of a logit: a < b as floats iff Key(a) < Key(b), and
// -0.0 has the key of +0.0 (the two compare equal). Ties between equal
// logits are broken by the lower token id.
STRATA_HOST_DEVICE inline uint32_t Key(float x) {
  uint32_t b = FloatBits(x);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// The same key for a bf16 logit, in 16 bits: Key16(b) < Key16(c) iff the
// values compare so (its order matches Key of the widened value).
STRATA_HOST_DEVICE inline uint32_t Key16(uint16_t b) {
  if (b == 0x8000u) b = 0;
  return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}

// exp(x) for x in [-24, 0] (relative error ~1e-7).
STRATA_HOST_DEVICE inline float Exp(float x) {
  const float k = floorf(fmaf(x, 1.44269504f, 0.5f));
  float r = fmaf(k, -0.693145751953125f, x);            // ln2 split in a 16-bit high part
  r = fmaf(k, -1.428606765330187e-06f, r);              // and the rest
  float p = fmaf(r, 1.98412698e-04f, 1.38888889e-03f);  // 1/5040, 1/720
  p = fmaf(p, r, 8.33333333e-03f);
  p = fmaf(p, r, 4.16666667e-02f);
  p = fmaf(p, r, 1.66666667e-01f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float scale = BitsFloat(static_cast<uint32_t>(static_cast<int>(k) + 127) << 23);
  return p * scale;  // exact: a power of two, the result stays normal
}

// log(x) for a positive normal x (absolute error ~1e-7).
STRATA_HOST_DEVICE inline float Log(float x) {
  const uint32_t bits = FloatBits(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float m = BitsFloat((bits & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  if (m > 1.41421356f) {
    m = m * 0.5f;  // exact
    e += 1;
  }
  // log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172.
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = fmaf(s2, 0.111111111f, 0.142857143f);  // 1/9, 1/7
  p = fmaf(p, s2, 0.2f);
  p = fmaf(p, s2, 0.333333333f);
  const float s3 = s * s2;
  const float log_m = 2.0f * fmaf(s3, p, s);  // doubling is exact
  const float fe = static_cast<float>(e);
  return fmaf(fe, 0.693145751953125f, fmaf(fe, 1.428606765330187e-06f, log_m));
}

// A token's weight for the top-p mass: exp(x) in 2^-32 fixed point, where
// x = (logit - max) / T <= 0 (tokens below -24 weigh nothing). Integer sums
// do not depend on the order of summation.
inline constexpr float kWeightFloor = -24.0f;
STRATA_HOST_DEVICE inline uint64_t Weight(float x) {
  if (!(x >= kWeightFloor)) return 0;
  return static_cast<uint64_t>(Exp(x) * 4294967296.0f);
}

// The mass top-p must reach: top_p * (total weight of the top-k set).
STRATA_HOST_DEVICE inline double TopPTarget(float top_p, uint64_t total) {
  return static_cast<double>(top_p) * static_cast<double>(total);
}
// How many of `ties` tokens of equal weight `w` (> 0) the nucleus keeps when
// the tokens before them weigh `above` (< target): the fewest j with
// above + j * w >= target, at least 1 and at most `ties`.
STRATA_HOST_DEVICE inline int64_t TopPTieCount(double target, uint64_t above, uint64_t w,
                                               int64_t ties) {
  const double need = ceil((target - static_cast<double>(above)) / static_cast<double>(w));
  int64_t j =
      need < 1.0 ? 1 : (need > static_cast<double>(ties) ? ties : static_cast<int64_t>(need));
  return j;
}

// The row's random stream: a key from (seed, counter); the noise of token i
// is a function of (key, i) only.
STRATA_HOST_DEVICE inline uint64_t RowKey(uint64_t seed, uint32_t counter) {
  return SplitMix64(seed ^ SplitMix64(0x5a3c9e1f00000000ull | counter));
}
STRATA_HOST_DEVICE inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
// Gumbel noise -log(-log(u)) of token i, u uniform on the grid
// (2j + 1) / 2^24 inside (0, 1); always in [-2.82, 16.7].
STRATA_HOST_DEVICE inline float Gumbel(uint64_t row_key, uint32_t id) {
  const uint32_t h =
      Mix32(Mix32(id ^ static_cast<uint32_t>(row_key)) ^ static_cast<uint32_t>(row_key >> 32));
  const float u = static_cast<float>(2u * (h >> 9) + 1u) * 5.9604644775390625e-08f;  // exact
  return -Log(-Log(u));
}
// Exponential-race (Gumbel-max) score of a kept token: the kept token with
// the highest score (ties: lower id) is an exact draw from the renormalised
// softmax(logits / T) over the kept set.
STRATA_HOST_DEVICE inline float Score(float logit, float max_logit, float inv_t, uint64_t row_key,
                                      uint32_t id) {
  return fmaf(logit - max_logit, inv_t, Gumbel(row_key, id));
}
// A token whose (logit - max) / T is below this cannot win the race: its
// score is < -20 + 16.7, while the most likely token (always kept, x = 0)
// scores >= -2.82. Skipping it changes nothing.
inline constexpr float kRaceFloor = -20.0f;

}  // namespace strata::engine::sample_math

#endif  // STRATA_ENGINE_SAMPLE_MATH_H_

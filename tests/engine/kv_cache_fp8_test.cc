// The fp8 e4m3 KV cache on the CPU reference backend: the host conversions,
// every cache operator on fp8 caches against the same operator on fp32
// caches holding the same (rounded) values, and a whole model with
// --kv-cache-dtype fp8_e4m3.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu_backend.h"
#include "engine/model.h"
#include "engine/model_loader.h"
#include "engine/tensor.h"
#include "gtest/gtest.h"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

// ---- Conversions --------------------------------------------------------------

TEST(Fp8E4M3Test, EveryEncodingRoundTrips) {
  for (int v = 0; v < 256; ++v) {
    const auto byte = static_cast<uint8_t>(v);
    const float f = Fp8E4M3ToFloat(byte);
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(f)) << v;
      continue;
    }
    EXPECT_EQ(FloatToFp8E4M3(f), byte) << "byte " << v << " decodes to " << f;
  }
}

TEST(Fp8E4M3Test, KnownValues) {
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);        // largest finite
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), 0.015625f);     // smallest normal, 2^-6
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), 0.001953125f);  // smallest subnormal, 2^-9
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0xb8), -1.0f);
  EXPECT_EQ(FloatToFp8E4M3(1.0f), 0x38);
  EXPECT_EQ(FloatToFp8E4M3(-0.0f), 0x80);
  // Saturation instead of overflow (and infinities saturate too).
  EXPECT_EQ(FloatToFp8E4M3(1e6f), 0x7e);
  EXPECT_EQ(FloatToFp8E4M3(-500.0f), 0xfe);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(FloatToFp8E4M3(-std::numeric_limits<float>::quiet_NaN()), 0x7f);
  // Round to nearest, ties to even: 1 + 1/16 lies halfway between 1 and
  // 1 + 1/8 (mantissa 0 is even); 1 + 3/16 between 1 + 1/8 and 1 + 2/8.
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);
  EXPECT_EQ(FloatToFp8E4M3(1.1875f), 0x3a);
  EXPECT_EQ(FloatToFp8E4M3(1.07f), 0x39);
  // Subnormal ties: 2^-10 is halfway between 0 and 2^-9; 3 * 2^-10 between
  // 2^-9 and 2^-8.
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(3.0f, -10)), 0x02);
  // Just under the smallest normal rounds up to it.
  EXPECT_EQ(FloatToFp8E4M3(0.0156f), 0x08);
}

TEST(Fp8E4M3Test, RoundingErrorIsAtMostHalfAStep) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mag(-12.0f, 8.5f);
  for (int i = 0; i < 100000; ++i) {
    const float x = std::exp2(mag(rng)) * (i % 2 ? 1.0f : -1.0f);
    const float y = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
    const float a = std::fabs(x);
    if (a >= 448.0f) {
      EXPECT_EQ(std::fabs(y), 448.0f);
      continue;
    }
    // Spacing of e4m3 values around |x|: 2^-9 below 2^-6, else 2^(e-3).
    const float step = a < 0.015625f ? 0.001953125f : std::ldexp(1.0f, std::ilogb(a) - 3);
    EXPECT_LE(std::fabs(y - x), step / 2) << x;
  }
}

// ---- CPU operators on fp8 caches ---------------------------------------------

std::vector<float> RandomValues(std::mt19937& rng, size_t n, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

std::vector<float> RoundedToFp8(std::vector<float> v) {
  for (float& x : v) x = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
  return v;
}

class CpuFp8CacheTest : public ::testing::Test {
 protected:
  Tensor Make(DType dtype, std::vector<int64_t> shape, const std::vector<float>& values) {
    auto t = cpu_->Allocate(dtype, std::move(shape));
    EXPECT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE(cpu_->CopyFromHost(values.data(), DType::kF32, t->numel(), *t, 0).ok());
    return *t;
  }
  Tensor MakeI32(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
    auto t = cpu_->Allocate(DType::kI32, std::move(shape));
    EXPECT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE(cpu_->CopyFromHost(values.data(), DType::kI32, t->numel(), *t, 0).ok());
    return *t;
  }
  std::vector<float> Read(const Tensor& t) {
    std::vector<float> v(t.numel());
    EXPECT_TRUE(cpu_->CopyToHost(t, v.data()).ok());
    return v;
  }

  std::unique_ptr<Backend> cpu_ = CreateCpuBackend(2);
  std::mt19937 rng_{11};
};

TEST_F(CpuFp8CacheTest, CopiesRoundOnceAndWidenExactly) {
  const std::vector<float> values = RandomValues(rng_, 1000, 600.0f);  // some saturate
  Tensor t = Make(DType::kF8E4M3, {1000}, values);
  EXPECT_EQ(t.nbytes(), 1000u);
  EXPECT_EQ(Read(t), RoundedToFp8(values));
}

TEST_F(CpuFp8CacheTest, WriteKvThenAttentionMatchesRoundedF32Cache) {
  const QkvLayout layout{4, 2, 16};
  const int page = 4, pages = 6, tokens = 19;
  const std::vector<float> qkv_values = RandomValues(rng_, tokens * layout.row_width(), 2.0f);
  std::vector<int32_t> slots(tokens);
  std::vector<int32_t> table = {5, 2, 0, 4, 1};  // out of order, one page unused
  for (int t = 0; t < tokens; ++t) slots[t] = table[t / page] * page + t % page;
  AttentionBatch batch;
  batch.num_seqs = 1;
  batch.max_blocks_per_seq = 5;
  batch.page_size = page;
  batch.max_query_len = tokens;
  batch.max_context_len = tokens;
  batch.host_query_start = {0, tokens};
  batch.host_context_len = {tokens};
  batch.query_start = MakeI32({2}, batch.host_query_start);
  batch.context_len = MakeI32({1}, batch.host_context_len);
  batch.block_table = MakeI32({1, 5}, table);
  const Tensor slot_t = MakeI32({tokens}, slots);
  const std::vector<int64_t> cache_shape = {pages, page, 2, 16};
  const std::vector<float> zeros(pages * page * 2 * 16, 0.0f);

  // fp8 cache written from the activations...
  Tensor qkv = Make(DType::kF32, {tokens, layout.row_width()}, qkv_values);
  Tensor k8 = Make(DType::kF8E4M3, cache_shape, zeros),
         v8 = Make(DType::kF8E4M3, cache_shape, zeros);
  ASSERT_TRUE(cpu_->WriteKv(qkv, layout, slot_t, k8, v8).ok());
  Tensor out8 = Make(DType::kF32, {tokens, 4 * 16}, std::vector<float>(tokens * 64, 0.0f));
  ASSERT_TRUE(cpu_->Attention(qkv, layout, k8, v8, batch, 0.25f, 0, out8).ok());

  // ...against an fp32 cache written from activations whose k and v parts
  // were rounded to fp8 first.
  std::vector<float> rounded = qkv_values;
  for (int t = 0; t < tokens; ++t) {
    for (int i = 4 * 16; i < layout.row_width(); ++i) {
      float& x = rounded[t * layout.row_width() + i];
      x = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
    }
  }
  Tensor qkv_r = Make(DType::kF32, {tokens, layout.row_width()}, rounded);
  Tensor k32 = Make(DType::kF32, cache_shape, zeros), v32 = Make(DType::kF32, cache_shape, zeros);
  ASSERT_TRUE(cpu_->WriteKv(qkv_r, layout, slot_t, k32, v32).ok());
  Tensor out32 = Make(DType::kF32, {tokens, 4 * 16}, std::vector<float>(tokens * 64, 0.0f));
  ASSERT_TRUE(cpu_->Attention(qkv, layout, k32, v32, batch, 0.25f, 0, out32).ok());

  EXPECT_EQ(Read(k8), Read(k32));
  EXPECT_EQ(Read(v8), Read(v32));
  EXPECT_EQ(Read(out8), Read(out32));
}

TEST_F(CpuFp8CacheTest, ClusterKeysAndKeyBoundsMatchRoundedF32Cache) {
  const int page = 8, pages = 8, hkv = 2, d = 16, count = 48;
  const std::vector<float> k_values =
      RoundedToFp8(RandomValues(rng_, pages * page * hkv * d, 3.0f));
  const std::vector<float> v_values =
      RoundedToFp8(RandomValues(rng_, pages * page * hkv * d, 3.0f));
  const std::vector<int64_t> shape = {pages, page, hkv, d};
  std::vector<int32_t> table(pages);
  std::iota(table.rbegin(), table.rend(), 0);
  SequenceRange range;
  range.block_table = MakeI32({pages}, table);
  range.page_size = page;
  range.begin = 4;
  range.count = count;

  std::vector<std::vector<float>> results;
  for (DType dtype : {DType::kF8E4M3, DType::kF32}) {
    Tensor k = Make(dtype, shape, k_values), v = Make(dtype, shape, v_values);
    Tensor centroids = Make(DType::kF32, {hkv, 8, d}, std::vector<float>(hkv * 8 * d, 0.0f));
    Tensor extents = MakeI32({hkv, 8, 2}, std::vector<int32_t>(hkv * 8 * 2, 0));
    ASSERT_TRUE(cpu_->ClusterKeys(k, v, range, 6, 5, 1, centroids, extents, nullptr,
                                  engine::ClusterRows::kReorder)
                    .ok());
    Tensor lo = Make(DType::kF32, {hkv, 8, d}, std::vector<float>(hkv * 8 * d, 0.0f));
    Tensor hi = Make(DType::kF32, {hkv, 8, d}, std::vector<float>(hkv * 8 * d, 0.0f));
    Tensor quest_extents = MakeI32({hkv, 8, 2}, std::vector<int32_t>(hkv * 8 * 2, 0));
    ASSERT_TRUE(cpu_->KeyBounds(k, range, 8, 0, lo, hi, quest_extents).ok());
    std::vector<float> all;
    for (const Tensor* t : {&k, &v, &centroids, &lo, &hi}) {
      const std::vector<float> part = Read(*t);
      all.insert(all.end(), part.begin(), part.end());
    }
    std::vector<int32_t> ext(hkv * 8 * 2);
    ASSERT_TRUE(cpu_->CopyToHost(extents, ext.data()).ok());
    all.insert(all.end(), ext.begin(), ext.end());
    results.push_back(std::move(all));
  }
  EXPECT_EQ(results[0], results[1]);
}

TEST_F(CpuFp8CacheTest, MixedCacheDtypesAreRejected) {
  const std::vector<float> zeros(2 * 4 * 1 * 8, 0.0f);
  Tensor k = Make(DType::kF8E4M3, {2, 4, 1, 8}, zeros);
  Tensor v = Make(DType::kF32, {2, 4, 1, 8}, zeros);
  Tensor qkv = Make(DType::kF32, {1, 24}, std::vector<float>(24, 1.0f));
  Tensor slots = MakeI32({1}, {0});
  const absl::Status s = cpu_->WriteKv(qkv, {1, 1, 8}, slots, k, v);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("one dtype"), std::string::npos) << s;
}

TEST_F(CpuFp8CacheTest, CacheNotMatchingTheLayoutIsRejected) {
  // Caches of head_dim 128 with a layout of head_dim 64: an error, not a
  // read past the row buffer.
  const std::vector<float> zeros(2 * 16 * 2 * 128, 0.0f);
  Tensor k = Make(DType::kF8E4M3, {2, 16, 2, 128}, zeros);
  Tensor v = Make(DType::kF8E4M3, {2, 16, 2, 128}, zeros);
  const QkvLayout layout{4, 2, 64};
  Tensor qkv =
      Make(DType::kF32, {1, layout.row_width()}, std::vector<float>(layout.row_width(), 1.0f));
  Tensor out = Make(DType::kF32, {1, 4 * 64}, std::vector<float>(4 * 64, 0.0f));
  AttentionBatch batch;
  batch.num_seqs = 1;
  batch.max_blocks_per_seq = 1;
  batch.page_size = 16;
  batch.max_query_len = 1;
  batch.max_context_len = 1;
  batch.host_query_start = {0, 1};
  batch.host_context_len = {1};
  batch.query_start = MakeI32({2}, batch.host_query_start);
  batch.context_len = MakeI32({1}, batch.host_context_len);
  batch.block_table = MakeI32({1, 1}, {0});
  const absl::Status s = cpu_->Attention(qkv, layout, k, v, batch, 0.125f, 0, out);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("do not match"), std::string::npos) << s;
  // Non-cache operators refuse fp8 tensors instead of reading them as fp32.
  Tensor x8 = Make(DType::kF8E4M3, {1, 128}, std::vector<float>(128, 1.0f));
  Tensor w = Make(DType::kF32, {128}, std::vector<float>(128, 1.0f));
  Tensor y = Make(DType::kF32, {1, 128}, std::vector<float>(128, 0.0f));
  EXPECT_TRUE(absl::IsInvalidArgument(cpu_->RmsNorm(x8, w, 1e-5f, y)));
}

// ---- Whole model ---------------------------------------------------------------

TEST(KvCacheTypeTest, Parses) {
  EXPECT_EQ(*ParseKvCacheType("auto"), KvCacheType::kActivation);
  EXPECT_EQ(*ParseKvCacheType("fp8"), KvCacheType::kFp8E4M3);
  EXPECT_EQ(*ParseKvCacheType("fp8_e4m3"), KvCacheType::kFp8E4M3);
  const auto bad = ParseKvCacheType("fp8_e5m2");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fp8_e5m2"), std::string::npos);
}

// The golden Llama fixture with an fp8 cache: a quarter of the fp32 cache's
// bytes, and logits near the fp32 cache's. e4m3 keeps 3 mantissa bits, so
// each key and value element carries about 2.7% rms rounding error; on this
// random-weight model (whose logits are nearly flat, so any change is large
// relative to them) that moves the logits by 7.8% relative L2.
TEST(KvCacheFp8ModelTest, LogitsStayCloseToFullPrecisionCache) {
  const std::string dir = testing_util::FixturePath("models/llama_gqa");
  std::vector<std::vector<float>> logits;
  std::vector<int64_t> bytes;
  for (KvCacheType type : {KvCacheType::kActivation, KvCacheType::kFp8E4M3}) {
    auto backend = CreateCpuBackend(2);
    ModelOptions options;
    options.max_seqs = 1;
    options.max_context = 96;
    options.max_batch_tokens = 96;
    options.max_logit_rows = 96;
    options.kv_cache = type;
    auto loaded = LoadModel({dir, ""}, backend.get(), options);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    Model& model = *loaded->model;
    bytes.push_back(model.kv_bytes_per_token());
    EXPECT_EQ(model.k_cache(0).dtype(),
              type == KvCacheType::kFp8E4M3 ? DType::kF8E4M3 : DType::kF32);
    const int n = 80;
    StepInput in;
    for (int i = 0; i < n; ++i) {
      in.token_ids.push_back((i * 37 + 11) % model.config().vocab_size);
      in.positions.push_back(i);
      in.logit_rows.push_back(i);
    }
    in.query_start = {0, n};
    in.context_len = {n};
    in.block_tables = {{}};
    for (int p = 0; p * options.page_size < n; ++p) in.block_tables[0].push_back(p);
    auto out = model.Forward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    logits.push_back(*out);
  }
  EXPECT_EQ(bytes[0], 4 * bytes[1]);
  double num = 0, den = 0;
  for (size_t i = 0; i < logits[0].size(); ++i) {
    const double diff = double{logits[1][i]} - logits[0][i];
    num += diff * diff;
    den += double{logits[0][i]} * logits[0][i];
  }
  const double rel = std::sqrt(num / den);
  EXPECT_GT(rel, 0.0) << "the fp8 cache changed nothing: is it really fp8?";
  EXPECT_LT(rel, 0.12);
  std::printf("llama_gqa fixture, 80 tokens: fp8 vs fp32 cache logits relative L2 %.4g\n", rel);
}

}  // namespace
}  // namespace strata::engine

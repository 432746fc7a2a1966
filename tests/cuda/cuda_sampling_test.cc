// SampleTokens on the GPU against the CPU reference: the same token ids for
// the same logits, parameters, seeds and counters, and logprobs within
// 1e-3. Logits are bf16-representable so both backends see the same values.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/sampler.h"
#include "gtest/gtest.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::cuda {
namespace {

using engine::SampledToken;
using engine::SamplingRow;
using engine::SamplingTable;
using testing_util::CudaVsCpuTest;
using testing_util::RoundBf16;

class CudaSamplingTest : public CudaVsCpuTest {
 protected:
  // Samples [rows.size(), vocab] logits on `backend`.
  void Run(Backend& backend, const std::vector<float>& logits, int64_t vocab,
           const std::vector<SamplingRow>& rows, std::vector<SampledToken>* out) {
    const int64_t r = static_cast<int64_t>(rows.size());
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor l, Upload(backend, {r, vocab}, logits));
    SamplingTable table;
    table.host_params = engine::EncodeSamplingRows(rows);
    STRATA_ASSERT_OK_AND_ASSIGN(
        table.params, UploadI32(backend, {r, engine::kSamplingFields}, table.host_params));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor ids, backend.Allocate(DType::kI32, {r}));
    STRATA_ASSERT_OK_AND_ASSIGN(Tensor lp, backend.Allocate(DType::kF32, {r}));
    STRATA_ASSERT_OK(backend.Fill(ids, -1));
    STRATA_ASSERT_OK(backend.SampleTokens(l, table, ids, lp));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> host_ids, DownloadI32(backend, ids));
    STRATA_ASSERT_OK_AND_ASSIGN(std::vector<float> host_lp, Download(backend, lp));
    out->resize(r);
    for (int64_t i = 0; i < r; ++i) (*out)[i] = {host_ids[i], host_lp[i]};
  }

  // Mixed parameters: greedy, plain temperature, top-k, top-p, both, and
  // the degenerate cuts (top_k 1, top_k >= V, tiny top_p).
  std::vector<SamplingRow> MixedRows(int n, int64_t vocab) {
    const engine::SamplingParams kinds[] = {
        {0.0f, 0, 1.0f, 0},  {1.0f, 0, 1.0f, 0},  {0.7f, 50, 0.95f, 0},
        {1.0f, 1, 1.0f, 0},  {1.0f, 0, 0.5f, 0},  {1.5f, 1000, 1.0f, 0},
        {0.9f, 0, 0.9f, 0},  {2.0f, 40, 1.0f, 0}, {1.0f, static_cast<int>(vocab), 0.3f, 0},
        {0.3f, 0, 1e-6f, 0}, {1.2f, 7, 0.8f, 0},  {0.05f, 0, 0.99f, 0},
    };
    std::vector<SamplingRow> rows;
    for (int i = 0; i < n; ++i) {
      SamplingRow row;
      row.params = kinds[i % (sizeof(kinds) / sizeof(kinds[0]))];
      row.params.seed = rng_();
      row.counter = static_cast<uint32_t>(rng_() % 4096);
      rows.push_back(row);
    }
    return rows;
  }

  // bf16 logits, never all zero: normal with the given spread, optionally
  // drawn from few distinct values so that ties straddle the cuts.
  std::vector<float> Logits(int64_t rows, int64_t vocab, float spread, int distinct = 0) {
    std::normal_distribution<float> normal(0.0f, spread);
    std::vector<float> levels;
    for (int i = 0; i < distinct; ++i) levels.push_back(RoundBf16(normal(rng_) + 0.125f));
    std::vector<float> l(static_cast<size_t>(rows * vocab));
    for (float& v : l) {
      v = distinct > 0 ? levels[rng_() % distinct] : RoundBf16(normal(rng_));
    }
    return l;
  }

  void Compare(const std::string& what, const std::vector<float>& logits, int64_t vocab,
               const std::vector<SamplingRow>& rows) {
    std::vector<SampledToken> want, got;
    ASSERT_NO_FATAL_FAILURE(Run(cpu(), logits, vocab, rows, &want));
    ASSERT_NO_FATAL_FAILURE(Run(cuda(), logits, vocab, rows, &got));
    for (size_t i = 0; i < rows.size(); ++i) {
      const engine::SamplingParams& p = rows[i].params;
      const std::string ctx = absl::StrCat(what, " row ", i, " (T ", p.temperature, ", top_k ",
                                           p.top_k, ", top_p ", p.top_p, ", seed ", p.seed,
                                           ", counter ", rows[i].counter, ") [", Seed(), "]");
      EXPECT_EQ(got[i].id, want[i].id) << ctx;
      EXPECT_NEAR(got[i].logprob, want[i].logprob, 1e-3) << ctx;
    }
  }
};

TEST_F(CudaSamplingTest, SampleTokensMatchesCpuAtLlamaVocab) {
  const int64_t vocab = 128256;
  for (float spread : {1.0f, 4.0f}) {
    const std::vector<SamplingRow> rows = MixedRows(64, vocab);
    Compare(absl::StrCat("V=128256 spread ", spread), Logits(64, vocab, spread), vocab, rows);
  }
}

TEST_F(CudaSamplingTest, SampleTokensMatchesCpuAtSmallAndOddVocab) {
  for (int64_t vocab : {1, 2, 37, 1000, 1001, 32003}) {
    const int r = static_cast<int>(1 + rng_() % 64);
    Compare(absl::StrCat("V=", vocab), Logits(r, vocab, 2.0f), vocab, MixedRows(r, vocab));
  }
}

TEST_F(CudaSamplingTest, SampleTokensMatchesCpuWithManyTies) {
  for (int64_t vocab : {64, 5000, 128256}) {
    for (int distinct : {1, 3, 20}) {
      Compare(absl::StrCat("V=", vocab, " distinct ", distinct), Logits(24, vocab, 1.0f, distinct),
              vocab, MixedRows(24, vocab));
    }
  }
}

TEST_F(CudaSamplingTest, SampleTokensManyCountersOfOneRow) {
  // One row drawn at 64 counters: each draw must agree.
  const int64_t vocab = 4096;
  const std::vector<float> one = Logits(1, vocab, 1.5f);
  std::vector<float> logits;
  std::vector<SamplingRow> rows;
  for (uint32_t c = 0; c < 64; ++c) {
    logits.insert(logits.end(), one.begin(), one.end());
    rows.push_back({{1.0f, c % 2 ? 100 : 0, c % 3 ? 0.9f : 1.0f, 17}, c});
  }
  Compare("counters", logits, vocab, rows);
}

TEST_F(CudaSamplingTest, NonFiniteRowsGiveANonFiniteLogprobOnBothBackends) {
  // The batcher ends a sequence whose sampled logprob is not finite (its
  // logits are NaN or infinite); both backends must report it so. Row 0 is
  // all NaN (a NaN hidden state), row 1 has a +inf, row 2 is healthy.
  constexpr int64_t kVocab = 1000;
  std::vector<float> logits(3 * kVocab, 0.25f);
  for (int64_t i = 0; i < kVocab; ++i) logits[i] = std::nanf("");
  logits[kVocab + 17] = INFINITY;
  std::vector<SamplingRow> rows(3);
  for (auto& row : rows) row.params = {1.0f, 0, 1.0f, 5};
  rows[0].params.temperature = 0.0f;
  for (Backend* backend : {&cpu(), &cuda()}) {
    std::vector<SampledToken> out;
    Run(*backend, logits, kVocab, rows, &out);
    ASSERT_EQ(out.size(), 3u);
    EXPECT_FALSE(std::isfinite(out[0].logprob)) << (backend == &cpu() ? "cpu" : "cuda");
    EXPECT_FALSE(std::isfinite(out[1].logprob)) << (backend == &cpu() ? "cpu" : "cuda");
    EXPECT_TRUE(std::isfinite(out[2].logprob)) << (backend == &cpu() ? "cpu" : "cuda");
  }
}

TEST_F(CudaSamplingTest, SampleTokensRejectsBadArguments) {
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor l, Upload(cuda(), {1, 8}, std::vector<float>(8, 0.5f)));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor ids, cuda().Allocate(DType::kI32, {1}));
  STRATA_ASSERT_OK_AND_ASSIGN(Tensor lp, cuda().Allocate(DType::kF32, {1}));
  SamplingTable table;
  table.host_params = engine::EncodeSamplingRows(std::vector<SamplingRow>{{{1.0f, 0, 0.0f, 0}, 0}});
  STRATA_ASSERT_OK_AND_ASSIGN(table.params,
                              UploadI32(cuda(), {1, engine::kSamplingFields}, table.host_params));
  const absl::Status s = cuda().SampleTokens(l, table, ids, lp);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("top_p"), std::string::npos) << s;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda().SampleTokens(l, table, ids, ids)));
}

}  // namespace
}  // namespace strata::cuda

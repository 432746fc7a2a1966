// Backend::EncodeBlocksToHost / DecodeBlocksFromHost on the CPU backend:
// each (layer, page, head) block is engine::KvCodec's block of those rows;
// decoding gives the rows back (bit for bit raw, within the codec's error
// quantised), touches nothing else, and a block that fails its check is
// DataLoss naming it.
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu_backend.h"
#include "engine/kv_codec.h"
#include "gtest/gtest.h"

namespace strata::engine {
namespace {

constexpr int kPages = 6, kPageSize = 16, kHeads = 2, kHeadDim = 32, kLayers = 2;

class KvBlockCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = CreateCpuBackend(1);
    for (int l = 0; l < kLayers; ++l) {
      for (auto* caches : {&k_, &v_}) {
        Tensor t = backend_->Allocate(DType::kF32, {kPages, kPageSize, kHeads, kHeadDim}).value();
        ASSERT_TRUE(backend_->FillRandom(t, 7 * l + caches->size() + (caches == &v_), 1.0f).ok());
        caches->push_back(t);
      }
    }
  }
  // Fresh caches of zeros, shaped as the others.
  std::vector<Tensor> Zeros() {
    std::vector<Tensor> out;
    for (int l = 0; l < kLayers; ++l) {
      Tensor t = backend_->Allocate(DType::kF32, {kPages, kPageSize, kHeads, kHeadDim}).value();
      EXPECT_TRUE(backend_->Fill(t, 0).ok());
      out.push_back(t);
    }
    return out;
  }
  // Page 3 (12 tokens) and page 1 (16) of every layer and head, packed.
  std::vector<KvBlockCopy> Blocks(KvCodecKind codec, int64_t* total) {
    auto coder = KvCodec::Create(codec).value();
    std::vector<KvBlockCopy> blocks;
    int64_t at = 0;
    for (const auto& [page, tokens] : {std::pair{3, 12}, std::pair{1, 16}}) {
      for (int l = 0; l < kLayers; ++l) {
        for (int h = 0; h < kHeads; ++h) {
          const auto bytes =
              static_cast<int64_t>(coder->EncodedBytes(tokens, kHeadDim, DType::kF32));
          blocks.push_back({l, page, h, tokens, at, bytes});
          at += bytes;
        }
      }
    }
    *total = at;
    return blocks;
  }
  static const float* Row(const Tensor& t, int page, int token, int head) {
    return static_cast<const float*>(t.data()) +
           ((int64_t{page} * kPageSize + token) * kHeads + head) * kHeadDim;
  }

  std::unique_ptr<Backend> backend_;
  std::vector<Tensor> k_, v_;
};

TEST_F(KvBlockCopyTest, BlocksAreTheCodecsAndDecodeBackIntoTheirRowsOnly) {
  for (KvCodecKind codec :
       {KvCodecKind::kBf16, KvCodecKind::kInt8, KvCodecKind::kFp8E4M3, KvCodecKind::kInt4}) {
    SCOPED_TRACE(static_cast<int>(codec));
    int64_t total = 0;
    const std::vector<KvBlockCopy> blocks = Blocks(codec, &total);
    HostBuffer host = backend_->AllocateHost(static_cast<size_t>(total)).value();
    ASSERT_TRUE(backend_->EncodeBlocksToHost(codec, k_, v_, blocks, host).ok());
    // Each block is the codec's own encoding of its rows.
    auto coder = KvCodec::Create(codec).value();
    for (const KvBlockCopy& b : blocks) {
      std::vector<float> k(b.tokens * kHeadDim), v(k.size());
      for (int t = 0; t < b.tokens; ++t) {
        std::memcpy(&k[t * kHeadDim], Row(k_[b.layer], b.page, t, b.head), kHeadDim * 4);
        std::memcpy(&v[t * kHeadDim], Row(v_[b.layer], b.page, t, b.head), kHeadDim * 4);
      }
      std::vector<uint8_t> want(static_cast<size_t>(b.bytes));
      ASSERT_TRUE(coder->Encode(k.data(), v.data(), DType::kF32, b.tokens, kHeadDim, want).ok());
      ASSERT_EQ(std::memcmp(want.data(), host.data() + b.host_offset, want.size()), 0)
          << "layer " << b.layer << " page " << b.page << " head " << b.head;
    }
    std::vector<Tensor> k_out = Zeros(), v_out = Zeros();
    ASSERT_TRUE(backend_->DecodeBlocksFromHost(host, blocks, k_out, v_out).ok());
    const double tolerance = codec == KvCodecKind::kBf16   ? 0.0
                             : codec == KvCodecKind::kInt4 ? 0.3
                                                           : 0.07;
    for (int l = 0; l < kLayers; ++l) {
      for (int page = 0; page < kPages; ++page) {
        for (int t = 0; t < kPageSize; ++t) {
          for (int h = 0; h < kHeads; ++h) {
            const bool copied = (page == 3 && t < 12) || page == 1;
            for (int c = 0; c < kHeadDim; ++c) {
              const float got_k = Row(k_out[l], page, t, h)[c];
              const float got_v = Row(v_out[l], page, t, h)[c];
              if (!copied) {
                ASSERT_EQ(got_k, 0.0f) << "a row outside the blocks was written";
                ASSERT_EQ(got_v, 0.0f);
                continue;
              }
              ASSERT_LE(std::fabs(got_k - Row(k_[l], page, t, h)[c]), tolerance);
              ASSERT_LE(std::fabs(got_v - Row(v_[l], page, t, h)[c]), tolerance);
            }
          }
        }
      }
    }
  }
}

TEST_F(KvBlockCopyTest, ACorruptBlockIsDataLossNamingItAndBadListsAreRefused) {
  int64_t total = 0;
  std::vector<KvBlockCopy> blocks = Blocks(KvCodecKind::kInt8, &total);
  HostBuffer host = backend_->AllocateHost(static_cast<size_t>(total)).value();
  ASSERT_TRUE(backend_->EncodeBlocksToHost(KvCodecKind::kInt8, k_, v_, blocks, host).ok());
  host.data()[blocks[5].host_offset + blocks[5].bytes / 2] ^= 0x08;
  std::vector<Tensor> k_out = Zeros(), v_out = Zeros();
  absl::Status s = backend_->DecodeBlocksFromHost(host, blocks, k_out, v_out);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("block 5"), std::string::npos) << s;
  // A block read as another token count than it holds.
  blocks[5].tokens = 11;
  host.data()[blocks[5].host_offset + blocks[5].bytes / 2] ^= 0x08;
  s = backend_->DecodeBlocksFromHost(host, blocks, k_out, v_out);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  // Bad lists, before anything is read or written.
  std::vector<KvBlockCopy> bad = {{kLayers, 0, 0, 4, 0, 100}};
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->DecodeBlocksFromHost(host, bad, k_out, v_out)));
  bad = {{0, kPages, 0, 4, 0, 100}};
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->DecodeBlocksFromHost(host, bad, k_out, v_out)));
  bad = {{0, 0, 0, kPageSize + 1, 0, 100}};
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->DecodeBlocksFromHost(host, bad, k_out, v_out)));
  bad = {{0, 0, 0, 4, total - 10, 100}};
  EXPECT_TRUE(absl::IsInvalidArgument(backend_->DecodeBlocksFromHost(host, bad, k_out, v_out)));
  bad = {{0, 0, 0, 4, 0, 100}};  // not the block's encoded size
  EXPECT_TRUE(absl::IsInvalidArgument(
      backend_->EncodeBlocksToHost(KvCodecKind::kInt8, k_, v_, bad, host).status()));
}

}  // namespace
}  // namespace strata::engine

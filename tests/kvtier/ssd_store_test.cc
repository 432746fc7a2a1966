// SsdStore over a real RocksDB database in a temporary directory: blocks
// round-trip, bytes that change on disk are caught, the budget refuses what
// does not fit, a sequence's keys go with it, a crashed predecessor's
// sequence keys are deleted at the next open (prefixes stay), and a path
// that cannot hold a database is a clear error.
#include "kvtier/ssd_store.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class SsdStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("ssd_store_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<SsdStore> Open(int64_t budget = int64_t{1} << 30, int64_t min_blob = 1024) {
    auto s = SsdStore::Open({dir_.string(), "llama", budget, min_blob});
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }
  static std::vector<uint8_t> Bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
  }
  static SsdKey Seq(uint64_t id, uint32_t block) {
    return {SsdKey::Owner::kSequence, id, 3, 1, block};
  }

  fs::path dir_;
};

TEST_F(SsdStoreTest, BlocksRoundTripAndCountAgainstTheBudget) {
  auto store = Open();
  const auto small = Bytes(100, 1), large = Bytes(300000, 2);  // large goes to a blob file
  ASSERT_TRUE(store->Put(Seq(7, 0), small).ok());
  ASSERT_TRUE(store->Put(Seq(7, 1), large).ok());
  EXPECT_EQ(*store->Get(Seq(7, 0)), small);
  EXPECT_EQ(*store->Get(Seq(7, 1)), large);
  EXPECT_TRUE(absl::IsNotFound(store->Get(Seq(7, 2)).status()));
  EXPECT_TRUE(absl::IsAlreadyExists(store->Put(Seq(7, 0), small)));
  EXPECT_EQ(store->stats().bytes_used, 100 + 4 + 300000 + 4);
  ASSERT_TRUE(store->Delete(Seq(7, 0)).ok());
  EXPECT_TRUE(absl::IsNotFound(store->Get(Seq(7, 0)).status()));
  EXPECT_EQ(store->stats().bytes_used, 300000 + 4);
}

TEST_F(SsdStoreTest, KeysSortByOwnerSoASequenceGoesInOneCall) {
  auto store = Open();
  for (uint32_t b = 0; b < 20; ++b) {
    ASSERT_TRUE(store->Put(Seq(5, b), Bytes(2000, b)).ok());
    ASSERT_TRUE(store->Put(Seq(6, b), Bytes(2000, b)).ok());
  }
  // Ids whose bytes differ only in the low byte, and one at the top of the
  // range, stay apart.
  ASSERT_TRUE(store->Put(Seq(0xffffffffffffffffull, 0), Bytes(10, 9)).ok());
  ASSERT_TRUE(store->DeleteOwner(SsdKey::Owner::kSequence, 5).ok());
  EXPECT_TRUE(absl::IsNotFound(store->Get(Seq(5, 3)).status()));
  EXPECT_TRUE(store->Get(Seq(6, 3)).ok());
  EXPECT_TRUE(store->Get(Seq(0xffffffffffffffffull, 0)).ok());
  EXPECT_EQ(store->stats().bytes_used, 20 * 2004 + 14);
  ASSERT_TRUE(store->DeleteOwner(SsdKey::Owner::kSequence, 0xffffffffffffffffull).ok());
  ASSERT_TRUE(store->DeleteOwner(SsdKey::Owner::kSequence, 6).ok());
  EXPECT_EQ(store->stats().bytes_used, 0);
}

TEST_F(SsdStoreTest, AFullBudgetRefusesAndWritesNothing) {
  auto store = Open(/*budget=*/10000);
  ASSERT_TRUE(store->Put(Seq(1, 0), Bytes(6000, 1)).ok());
  const absl::Status refused = store->Put(Seq(1, 1), Bytes(6000, 2));
  EXPECT_TRUE(absl::IsResourceExhausted(refused)) << refused;
  EXPECT_TRUE(absl::IsNotFound(store->Get(Seq(1, 1)).status()));
  EXPECT_EQ(store->stats().puts_refused, 1);
  ASSERT_TRUE(store->DeleteOwner(SsdKey::Owner::kSequence, 1).ok());
  EXPECT_TRUE(store->Put(Seq(1, 1), Bytes(6000, 2)).ok()) << "room again";
}

TEST_F(SsdStoreTest, ACrashedPredecessorsSequencesAreDeletedAndPrefixesKept) {
  const SsdKey prefix{SsdKey::Owner::kPrefix, 0xabcdef, 0, 0, 0};
  {
    auto store = Open();
    ASSERT_TRUE(store->Put(Seq(1, 0), Bytes(5000, 1)).ok());
    ASSERT_TRUE(store->Put(Seq(2, 0), Bytes(5000, 2)).ok());
    ASSERT_TRUE(store->Put(prefix, Bytes(7000, 3)).ok());
    // Closed without deleting the sequences: as after kill -9.
  }
  auto store = Open();
  EXPECT_EQ(store->stats().stale_keys_deleted, 2);
  EXPECT_TRUE(absl::IsNotFound(store->Get(Seq(1, 0)).status()));
  EXPECT_EQ(*store->Get(prefix), Bytes(7000, 3));
  EXPECT_EQ(store->stats().bytes_used, 7004);
}

TEST_F(SsdStoreTest, BytesChangedOnDiskAreDataLossNeverReturned) {
  const auto value = Bytes(200000, 4);
  {
    auto store = Open();
    ASSERT_TRUE(store->Put({SsdKey::Owner::kPrefix, 9, 0, 0, 0}, value).ok());
    ASSERT_TRUE(store->Flush().ok());  // out of the log, into a blob file
  }
  // Flip bytes in the middle of every blob file (where the value lives).
  int flipped = 0;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    if (entry.path().extension() != ".blob") continue;
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    const auto size = static_cast<std::streamoff>(fs::file_size(entry.path()));
    for (std::streamoff at = size / 3; at < size / 3 + 64; ++at) {
      f.seekg(at);
      char c = 0;
      f.read(&c, 1);
      f.seekp(at);
      c = static_cast<char>(c ^ 0x5a);
      f.write(&c, 1);
    }
    ++flipped;
  }
  ASSERT_GT(flipped, 0) << "the value went to a blob file";
  auto store = Open();
  const auto got = store->Get({SsdKey::Owner::kPrefix, 9, 0, 0, 0});
  EXPECT_TRUE(absl::IsDataLoss(got.status())) << got.status();
  EXPECT_EQ(store->stats().corrupt, 1);
}

TEST_F(SsdStoreTest, APathThatCannotHoldADatabaseIsAClearError) {
  fs::create_directories(dir_);
  const fs::path file = dir_ / "a_file";
  std::ofstream(file) << "x";
  auto s = SsdStore::Open({(file / "db").string(), "llama", 1 << 20, 1024});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr((file / "db").string()));
  EXPECT_TRUE(absl::IsInvalidArgument(SsdStore::Open({"", "llama", 1 << 20, 1024}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(SsdStore::Open({dir_.string(), "llama", 0, 1024}).status()));
}

}  // namespace
}  // namespace strata::kvtier

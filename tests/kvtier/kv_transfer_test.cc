// Disaggregated serving's KV hand-over on the CPU backend: a prefill
// worker's batcher exports a prompt's KV, its blocks travel in the wire
// format into a decode worker's landing area, and the decode worker's
// batcher loads them and decodes the same tokens as one worker doing both;
// corrupt, missing and expired transfers fail their request alone, and
// nothing is left behind on either side.
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "engine/batcher.h"
#include "engine/cpu_backend.h"
#include "engine/model_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/clustering_store.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/kv_wire.h"
#include "kvtier/landing_area.h"
#include "tests/engine/test_util.h"
#include "tests/kvtier/kv_test_util.h"

namespace strata::kvtier {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<engine::Backend> g_backend = engine::CreateCpuBackend(2);

std::unique_ptr<engine::Model> LoadGolden(const std::string& name, engine::ModelOptions options) {
  auto loaded = engine::LoadModel({testing_util::FixturePath("models/" + name), ""},
                                  g_backend.get(), options);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return std::move(loaded->model);
}

engine::ModelOptions SmallCache(int num_pages) {
  engine::ModelOptions options;
  options.max_seqs = 4;
  options.max_context = 256;
  options.max_batch_tokens = 96;
  options.page_size = 8;
  options.num_pages = num_pages;
  return options;
}

std::vector<int32_t> Prompt(int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 500) + 3;
  return p;
}

// ---- The wire format --------------------------------------------------------

KvWireFormat Format() {
  return {.layers = 2, .kv_heads = 2, .head_dim = 16, .page_size = 8, .upper_first_layer = 2};
}

KvBlockHeader Header() {
  KvBlockHeader h;
  h.transfer_id = 42;
  h.index = 3;
  h.count = 5;
  h.tokens = 8;
  h.format = Format();
  h.payload_crc = 0x1234;
  h.payload_bytes = static_cast<uint64_t>(Format().record_bytes());
  return h;
}

TEST(KvWireTest, AHeaderRoundTrips) {
  const auto bytes = EncodeKvBlockHeader(Header());
  auto parsed = ParseKvBlockHeader(bytes, Format());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->transfer_id, 42u);
  EXPECT_EQ(parsed->index, 3u);
  EXPECT_EQ(parsed->count, 5u);
  EXPECT_EQ(parsed->tokens, 8u);
  EXPECT_EQ(parsed->payload_crc, 0x1234u);
  EXPECT_EQ(parsed->payload_bytes, static_cast<uint64_t>(Format().record_bytes()));
}

TEST(KvWireTest, EveryFlippedByteOfAHeaderIsCaught) {
  const auto good = EncodeKvBlockHeader(Header());
  for (size_t i = 0; i < good.size(); ++i) {
    auto bad = good;
    bad[i] ^= std::byte{0x10};
    if (i >= 60) continue;  // the reserved tail is not covered (always zero)
    EXPECT_FALSE(ParseKvBlockHeader(bad, Format()).ok()) << "byte " << i;
  }
  EXPECT_TRUE(
      absl::IsInvalidArgument(ParseKvBlockHeader(std::span(good).first(10), Format()).status()));
}

TEST(KvWireTest, ACodedPageRecordCarriesItsBlocksBytes) {
  KvBlockHeader h = Header();
  h.codec = engine::KvCodecKind::kInt8;
  h.tokens = 5;
  const int64_t want = Format().coded_record_bytes(engine::KvCodecKind::kInt8, 5);
  ASSERT_GT(want, 0);
  EXPECT_LT(want, Format().record_bytes());
  h.payload_bytes = static_cast<uint64_t>(want);
  auto parsed = ParseKvBlockHeader(EncodeKvBlockHeader(h), Format());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->codec, engine::KvCodecKind::kInt8);
  // The raw size, or a size for other tokens, is refused.
  h.payload_bytes = static_cast<uint64_t>(Format().record_bytes());
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("a page record of 5 tokens in int8 has"));
  h = Header();
  h.codec = static_cast<engine::KvCodecKind>(9);
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("unknown codec 9"));
}

TEST(KvWireTest, AnotherLayoutIsRefusedNamingTheField) {
  KvWireFormat mine = Format();
  mine.kv_heads = 4;
  const absl::Status s = ParseKvBlockHeader(EncodeKvBlockHeader(Header()), mine).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_THAT(s.message(), HasSubstr("KV heads differs: the sender's 2, this worker's 4"));
  KvBlockHeader h = Header();
  h.payload_bytes = 100;
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("payload of 100 bytes"));
  h = Header();
  h.index = 5;
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("block 5 of 5"));
}

TEST(KvWireTest, TheSendersTensorParallelRanksMustBeTheReceivers) {
  // A record of 2 ranks holds both ranks' rows: twice one rank's bytes,
  // raw or coded.
  KvWireFormat two = Format();
  two.ranks = 2;
  EXPECT_EQ(two.record_bytes(), 2 * Format().record_bytes());
  EXPECT_EQ(two.coded_record_bytes(engine::KvCodecKind::kInt8, 5),
            2 * Format().coded_record_bytes(engine::KvCodecKind::kInt8, 5));
  KvBlockHeader h = Header();
  h.format = two;
  h.payload_bytes = static_cast<uint64_t>(two.record_bytes());
  auto parsed = ParseKvBlockHeader(EncodeKvBlockHeader(h), two);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->format.ranks, 2);
  // Rank r's rows land on rank r: a worker of another size refuses them.
  const absl::Status s = ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_THAT(s.message(),
              HasSubstr("tensor-parallel ranks differs: the sender's 2, this worker's 1"));
}

TEST(KvWireTest, APartOfAPagesLayersCarriesThoseLayersBytes) {
  KvBlockHeader h = Header();
  h.codec = engine::KvCodecKind::kInt8;
  h.tokens = 5;
  h.first_layer = 1;
  h.part_layers = 1;
  const int64_t layer = Format().layer_bytes(engine::KvCodecKind::kInt8, 5);
  EXPECT_EQ(2 * layer, Format().coded_record_bytes(engine::KvCodecKind::kInt8, 5));
  h.payload_bytes = static_cast<uint64_t>(layer);
  auto parsed = ParseKvBlockHeader(EncodeKvBlockHeader(h), Format());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->is_part());
  EXPECT_EQ(parsed->first_layer, 1);
  EXPECT_EQ(parsed->part_layers, 1);
  // The whole record's bytes for one layer, layers past the record's, a
  // whole record that names a first layer, and parts with two ranks are
  // refused.
  h.payload_bytes = static_cast<uint64_t>(2 * layer);
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("a page record's 1 layers of 5 tokens in int8 has"));
  h.payload_bytes = static_cast<uint64_t>(layer);
  h.first_layer = 2;
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("layers 2 to 2 of a page record of 2 layers"));
  h = Header();
  h.first_layer = 1;
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status().message(),
              HasSubstr("a whole record from layer 1"));
  KvWireFormat two = Format();
  two.ranks = 2;
  h = Header();
  h.format = two;
  h.part_layers = 1;
  h.payload_bytes = static_cast<uint64_t>(two.layer_bytes(engine::KvCodecKind::kBf16, 8));
  EXPECT_THAT(ParseKvBlockHeader(EncodeKvBlockHeader(h), two).status().message(),
              HasSubstr("parts need one rank"));
}

TEST(KvWireTest, TheFuzzersValidSeedParses) {
  // tests/fuzz/make_corpus.py writes the wire format on its own: the seed
  // must be what the encoder writes, or the fuzzer starts from nothing.
  std::ifstream in(testing_util::FixturePath("../fuzz/corpus/kv_wire_fuzzer/valid.skvh"),
                   std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  KvWireFormat llama = {
      .layers = 32, .kv_heads = 8, .head_dim = 128, .page_size = 16, .upper_first_layer = 32};
  auto parsed = ParseKvBlockHeader(
      std::span(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()), llama);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->transfer_id, 7u);
  EXPECT_EQ(parsed->count, 4u);
}

// ---- The landing area -------------------------------------------------------

class LandingAreaTest : public ::testing::Test {
 protected:
  static constexpr int64_t kBytes = 64;
  LandingAreaTest()
      : memory_(8 * kBytes), area_({0, 1, 2, 3, 4, 5, 6, 7}, memory_.data(), kBytes, kBytes) {}
  std::vector<std::byte> memory_;
  LandingArea area_;
  absl::Time later_ = absl::Now() + absl::Hours(1);
};

TEST_F(LandingAreaTest, BlocksLandAndAreTakenInOrder) {
  ASSERT_TRUE(area_.Reserve(1, 3, later_).ok());
  EXPECT_EQ(area_.num_free(), 5);
  for (uint32_t i : {2u, 0u, 1u}) {
    auto where = area_.Place(1, i, 3, kBytes);
    ASSERT_TRUE(where.ok()) << where.status();
    std::memset(where->data(), static_cast<int>(i + 1), where->size());
    area_.Landed(1, i, KvPayloadCrc(*where), absl::OkStatus());
  }
  auto blocks = area_.Take(1);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  ASSERT_EQ(blocks->size(), 3u);
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(memory_[(*blocks)[i].record * kBytes], std::byte(i + 1));
  }
  EXPECT_FALSE(area_.Holds(1));
  std::vector<int32_t> records;
  for (const auto& b : *blocks) records.push_back(b.record);
  area_.Free(records);
  EXPECT_EQ(area_.num_free(), 8);
}

TEST_F(LandingAreaTest, RefusesWhatDoesNotFitOrWasNotReserved) {
  EXPECT_TRUE(absl::IsResourceExhausted(area_.Reserve(1, 9, later_)));
  ASSERT_TRUE(area_.Reserve(1, 2, later_).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(area_.Reserve(1, 1, later_)));
  EXPECT_TRUE(absl::IsNotFound(area_.Place(2, 0, 2, kBytes).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(area_.Place(1, 0, 3, kBytes).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(area_.Place(1, 0, 2, kBytes - 1).status()));
  auto where = area_.Place(1, 0, 2, kBytes);
  ASSERT_TRUE(where.ok());
  EXPECT_TRUE(absl::IsAlreadyExists(area_.Place(1, 0, 2, kBytes).status()));
  area_.Landed(1, 0, KvPayloadCrc(*where), absl::OkStatus());
  const absl::Status missing = area_.Take(1).status();
  EXPECT_THAT(missing.message(), HasSubstr("block 1 of 2 has not arrived"));
  EXPECT_EQ(area_.num_free(), 8) << "a failed take drops the transfer";
}

TEST_F(LandingAreaTest, ABlockThatDoesNotMatchItsCrcIsCaughtAsItLands) {
  ASSERT_TRUE(area_.Reserve(1, 2, later_).ok());
  for (uint32_t i : {0u, 1u}) {
    auto where = area_.Place(1, i, 2, kBytes);
    ASSERT_TRUE(where.ok());
    std::memset(where->data(), 7, where->size());
    const uint32_t crc = KvPayloadCrc(*where);
    if (i == 1) (*where)[3] = std::byte{8};  // changed after its CRC was taken
    area_.Landed(1, i, crc, absl::OkStatus());
  }
  const absl::Status corrupt = area_.Take(1).status();
  EXPECT_TRUE(absl::IsDataLoss(corrupt)) << corrupt;
  EXPECT_THAT(corrupt.message(), HasSubstr("block 1 of 2 does not match its CRC32C"));
  EXPECT_EQ(area_.num_free(), 8);
}

TEST_F(LandingAreaTest, ABlockInPartsIsWholeOnceEveryLayerLanded) {
  // Records of 64 bytes: 4 layers of 16.
  ASSERT_TRUE(area_.Reserve(1, 2, later_).ok());
  const auto kInt8 = engine::KvCodecKind::kInt8;
  // Block 0 in two parts, the later layers first; block 1 whole.
  for (auto [first, layers] : {std::pair{2, 2}, {0, 2}}) {
    auto where = area_.PlacePart(1, 0, 2, first, layers, 4, 16, kInt8, 8);
    ASSERT_TRUE(where.ok()) << where.status();
    EXPECT_EQ(where->size(), static_cast<size_t>(layers * 16));
    std::memset(where->data(), first + 1, where->size());
    area_.PartLanded(1, 0, first, layers, KvPayloadCrc(*where), absl::OkStatus());
  }
  // A layer sent twice, a part that disagrees, and the block sent whole too.
  EXPECT_TRUE(absl::IsAlreadyExists(area_.PlacePart(1, 0, 2, 1, 1, 4, 16, kInt8, 8).status()));
  EXPECT_TRUE(absl::IsAlreadyExists(area_.Place(1, 0, 2, kBytes).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(area_.PlacePart(1, 1, 2, 0, 1, 4, 32, kInt8, 8).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(area_.PlacePart(1, 1, 2, 3, 2, 4, 16, kInt8, 8).status()));
  auto whole = area_.Place(1, 1, 2, 48, kInt8, 8);
  ASSERT_TRUE(whole.ok());
  area_.Landed(1, 1, KvPayloadCrc(*whole), absl::OkStatus());
  auto blocks = area_.Take(1);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_EQ((*blocks)[0].bytes, 64);
  EXPECT_EQ((*blocks)[0].tokens, 8);
  const std::byte* record = memory_.data() + (*blocks)[0].record * kBytes;
  EXPECT_EQ(record[0], std::byte{1});
  EXPECT_EQ(record[31], std::byte{1});
  EXPECT_EQ(record[32], std::byte{3});
  EXPECT_EQ(record[63], std::byte{3});
  std::vector<int32_t> records;
  for (const auto& b : *blocks) records.push_back(b.record);
  area_.Free(records);
  EXPECT_EQ(area_.num_free(), 8);
}

TEST_F(LandingAreaTest, ACorruptPartFailsItsBlockAndADropWaitsForPartsInFlight) {
  const auto kInt8 = engine::KvCodecKind::kInt8;
  ASSERT_TRUE(area_.Reserve(1, 1, later_).ok());
  auto first = area_.PlacePart(1, 0, 1, 0, 2, 4, 16, kInt8, 8);
  auto second = area_.PlacePart(1, 0, 1, 2, 2, 4, 16, kInt8, 8);
  ASSERT_TRUE(first.ok() && second.ok());
  std::memset(first->data(), 5, first->size());
  const uint32_t crc = KvPayloadCrc(*first);
  (*first)[0] = std::byte{6};  // changed on the way
  area_.PartLanded(1, 0, 0, 2, crc, absl::OkStatus());
  // Dropped while the second part is written: its record stays until then.
  area_.Drop(1);
  EXPECT_EQ(area_.num_free(), 7);
  area_.PartLanded(1, 0, 2, 2, KvPayloadCrc(*second), absl::OkStatus());
  EXPECT_EQ(area_.num_free(), 8);
  EXPECT_EQ(area_.num_transfers(), 0);

  ASSERT_TRUE(area_.Reserve(2, 1, later_).ok());
  auto part = area_.PlacePart(2, 0, 1, 0, 4, 4, 16, kInt8, 8);
  ASSERT_TRUE(part.ok());
  const uint32_t good = KvPayloadCrc(*part);
  (*part)[7] ^= std::byte{1};
  area_.PartLanded(2, 0, 0, 4, good, absl::OkStatus());
  const absl::Status corrupt = area_.Take(2).status();
  EXPECT_TRUE(absl::IsDataLoss(corrupt)) << corrupt;
  EXPECT_THAT(corrupt.message(), HasSubstr("block 0 of 1 does not match its CRC32C"));
  EXPECT_EQ(area_.num_free(), 8);
}

TEST(KvWireTest, APlannerStateHeaderRoundTripsAndIsChecked) {
  KvBlockHeader h = Header();
  h.kind = KvBlockHeader::Kind::kPlannerState;
  h.index = 1;
  h.count = 2;
  h.tokens = 0;
  h.payload_bytes = 12345;
  auto parsed = ParseKvBlockHeader(EncodeKvBlockHeader(h), Format());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->kind, KvBlockHeader::Kind::kPlannerState);
  EXPECT_EQ(parsed->payload_bytes, 12345u);
  for (auto bad : {std::pair<uint32_t, uint64_t>{3, 12345}, {0, 0}, {0, uint64_t{2} << 30}}) {
    h.tokens = bad.first;
    h.payload_bytes = bad.second;
    const absl::Status refused = ParseKvBlockHeader(EncodeKvBlockHeader(h), Format()).status();
    EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
    EXPECT_THAT(refused.message(), HasSubstr("planner state"));
  }
}

TEST_F(LandingAreaTest, PlannerStateLandsBesideTheBlocksWithinItsShare) {
  // Two pages of 64 bytes: at most 128 bytes of planner state.
  ASSERT_TRUE(area_.Reserve(1, 2, later_).ok());
  for (uint32_t i : {0u, 1u}) {
    auto where = area_.Place(1, i, 2, kBytes);
    ASSERT_TRUE(where.ok());
    area_.Landed(1, i, KvPayloadCrc(*where), absl::OkStatus());
  }
  EXPECT_TRUE(absl::IsInvalidArgument(area_.PlaceState(1, 0, 2, 129).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(area_.PlaceState(1, 2, 2, 4).status()));
  EXPECT_TRUE(absl::IsNotFound(area_.PlaceState(2, 0, 2, 4).status()));
  for (uint32_t i : {1u, 0u}) {
    auto where = area_.PlaceState(1, i, 2, 64);
    ASSERT_TRUE(where.ok()) << where.status();
    std::memset(where->data(), static_cast<int>(10 + i), where->size());
    area_.StateLanded(1, i, KvPayloadCrc(*where), absl::OkStatus());
  }
  EXPECT_TRUE(absl::IsInvalidArgument(area_.PlaceState(1, 0, 2, 1).status())) << "over the share";
  std::vector<std::vector<uint8_t>> state;
  auto blocks = area_.Take(1, &state);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  ASSERT_EQ(state.size(), 2u);
  EXPECT_EQ(state[0], std::vector<uint8_t>(64, 10));
  EXPECT_EQ(state[1], std::vector<uint8_t>(64, 11));
  std::vector<int32_t> records;
  for (const auto& b : *blocks) records.push_back(b.record);
  area_.Free(records);

  // A value changed on the way fails the transfer as it is taken.
  ASSERT_TRUE(area_.Reserve(2, 1, later_).ok());
  auto where = area_.Place(2, 0, 1, kBytes);
  ASSERT_TRUE(where.ok());
  area_.Landed(2, 0, KvPayloadCrc(*where), absl::OkStatus());
  auto value = area_.PlaceState(2, 0, 1, 8);
  ASSERT_TRUE(value.ok());
  const uint32_t crc = KvPayloadCrc(*value);
  (*value)[2] ^= std::byte{1};
  area_.StateLanded(2, 0, crc, absl::OkStatus());
  const absl::Status corrupt = area_.Take(2, &state).status();
  EXPECT_TRUE(absl::IsDataLoss(corrupt)) << corrupt;
  EXPECT_THAT(corrupt.message(), HasSubstr("planner state value 0 of 1 does not match"));
  EXPECT_EQ(area_.num_free(), 8);
  EXPECT_EQ(area_.num_transfers(), 0);
}

TEST_F(LandingAreaTest, AnExpiredLeaseFreesItsRecordsOnceNothingWritesThem) {
  const absl::Time soon = absl::Now() + absl::Milliseconds(1);
  ASSERT_TRUE(area_.Reserve(1, 4, soon).ok());
  ASSERT_TRUE(area_.Place(1, 0, 4, kBytes).ok());  // being written
  EXPECT_EQ(area_.Expire(soon + absl::Seconds(1)), 1);
  EXPECT_FALSE(area_.Holds(1));
  EXPECT_EQ(area_.num_free(), 7) << "the record being written stays out";
  EXPECT_TRUE(absl::IsNotFound(area_.Place(1, 1, 4, kBytes).status()));
  area_.Landed(1, 0, 0, absl::OkStatus());
  EXPECT_EQ(area_.num_free(), 8);
  EXPECT_EQ(area_.num_transfers(), 0);
}

// ---- Prefill on one worker, decode on another ---------------------------------

// One worker of either kind: a model, its block manager and a batcher.
struct Worker {
  // export_clusterings: a prefill worker's runner, which clusters the
  // ClusterKV prompts it exports (KvPolicyRunnerOptions::exports).
  // prefix_records: host records stored prompt prefixes may take.
  // tiered: the layers from 1 on have their own pages, and the policy's
  // clusters are homed in the host tier; a decode worker (landing room)
  // then admits imported prompts straight into it when `admit`.
  // clusterings: where the runner keeps prompts' clusterings for reuse.
  Worker(int landing_records, const KvPolicyConfig* policy = nullptr,
         engine::KvCodecKind wire_codec = engine::KvCodecKind::kBf16,
         bool export_clusterings = false, int prefix_records = 0, bool tiered = false,
         bool admit = true, ClusteringStore* clusterings = nullptr) {
    engine::ModelOptions model_options = SmallCache(80);
    if (tiered) {
      model_options.num_upper_pages = 80;
      model_options.upper_first_layer = 1;
    }
    model = LoadGolden("llama_gqa", model_options);
    auto layout = KvLayout::Create(*model);
    EXPECT_TRUE(layout.ok());
    const int64_t record = (layout->record_bytes() + 63) / 64 * 64;
    // Tiered: as much again for the host-homed clusters.
    KvBlockManagerOptions options{.host_bytes = record * (64 + prefix_records + (tiered ? 64 : 0)),
                                  .landing_bytes = record * landing_records};
    options.workload_wire_codec = {wire_codec};
    options.prefix_bytes = record * prefix_records;
    // Short, for the test of a planner state that never comes; on the CPU
    // a planner hands its state over within the poll that follows the step.
    options.planner_state_timeout = std::chrono::milliseconds(100);
    auto created = KvBlockManager::Create(model.get(), options);
    EXPECT_TRUE(created.ok()) << created.status();
    manager = std::move(*created);
    manager->set_export_sink([this](KvBlockManager::ExportedKv e) { exports.push_back(e); });
    if (policy != nullptr) {
      KvTierOptions tier;
      if (tiered) tier.manager = manager.get();
      auto runner_created =
          KvPolicyRunner::Create(model.get(), {*policy},
                                 {.max_sparse_seqs = 4,
                                  .tier = tier,
                                  .clusterings = clusterings,
                                  .exports = export_clusterings ? manager.get() : nullptr,
                                  .imports = landing_records > 0});
      EXPECT_TRUE(runner_created.ok()) << runner_created.status();
      runner = std::move(*runner_created);
      EXPECT_TRUE(model->set_attention_planner(runner.get()).ok());
      if (admit && runner->AdmitsImports()) manager->set_import_admitter(runner.get());
    }
    batcher = std::make_unique<engine::Batcher>(model.get(), nullptr, engine::BatcherOptions{},
                                                manager.get());
  }
  std::vector<engine::TokenEvent> RunToEnd() {
    std::vector<engine::TokenEvent> events;
    // Steps may only wait for work beside them (an import's clusters being
    // encoded): bounded by time as well as by count.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    for (int step = 0;
         batcher->HasWork() && (step < 2000 || std::chrono::steady_clock::now() < give_up);
         ++step) {
      auto out = batcher->Step();
      EXPECT_TRUE(out.ok()) << out.status();
      if (!out.ok()) break;
      events.insert(events.end(), out->begin(), out->end());
    }
    // What the engine does between steps and while it idles: the planner
    // hands an export its values, which go out with the export's end.
    for (int i = 0; i < 2; ++i) EXPECT_TRUE(batcher->PollKv().ok());
    return events;
  }
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<KvPolicyRunner> runner;
  std::unique_ptr<KvBlockManager> manager;
  std::unique_ptr<engine::Batcher> batcher;
  std::vector<KvBlockManager::ExportedKv> exports;
};

std::vector<int32_t> Tokens(const std::vector<engine::TokenEvent>& events) {
  std::vector<int32_t> tokens;
  for (const auto& e : events) tokens.push_back(e.token_id);
  return tokens;
}

engine::GenerationRequest Request(uint64_t id, int prompt_len, int max_tokens) {
  engine::GenerationRequest r;
  r.id = id;
  r.prompt = Prompt(prompt_len, 11 + static_cast<uint32_t>(id));
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

// What the prefill worker does: the prompt alone, its first token sampled,
// its KV exported under `key`.
engine::TokenEvent Prefill(Worker& p, const engine::GenerationRequest& r, uint64_t key) {
  engine::GenerationRequest pr = r;
  pr.max_tokens = 1;
  pr.export_kv = key;
  EXPECT_TRUE(p.batcher->Add(pr).ok());
  const std::vector<engine::TokenEvent> events = p.RunToEnd();
  EXPECT_EQ(events.size(), 1u);
  return events.empty() ? engine::TokenEvent{} : events[0];
}

// What the transport does (testing_util::Deliver); the prefill worker then
// frees its export.
void Send(Worker& p, Worker& d, uint64_t transfer_id, int corrupt = -1, int corrupt_state = -1) {
  ASSERT_FALSE(p.exports.empty());
  const absl::Status delivered = testing_util::Deliver(p.exports, p.manager->layout(), *d.manager,
                                                       transfer_id, corrupt, corrupt_state);
  ASSERT_TRUE(delivered.ok()) << delivered;
  p.manager->ReleaseExport(p.exports.back().key);
  p.exports.clear();
}

engine::GenerationRequest DecodeRequest(const engine::GenerationRequest& r,
                                        const engine::TokenEvent& first, uint64_t transfer_id) {
  engine::GenerationRequest dr = r;
  dr.generated = {{first.token_id, first.logprob}};
  dr.import_kv = transfer_id;
  return dr;
}

// The tokens `alone` gives `r`, computing its prompt itself.
std::vector<int32_t> OneWorkersTokens(Worker& alone, const engine::GenerationRequest& r) {
  EXPECT_TRUE(alone.batcher->Add(r).ok());
  return Tokens(alone.RunToEnd());
}

void ExpectNothingLeft(Worker& w) {
  ASSERT_TRUE(w.manager->Poll().ok());
  EXPECT_TRUE(w.manager->Idle());
  EXPECT_EQ(w.manager->stats().exports_held, 0);
  if (w.manager->landing_area() != nullptr) {
    EXPECT_EQ(w.manager->landing_area()->num_transfers(), 0);
  }
}

void ExpectSameTokensAsOneWorker(const KvPolicyConfig* policy) {
  Worker p(0, policy), d(64, policy), alone(0, policy);
  const int page = d.manager->layout().page_size();
  for (int prompt_len : {5, 8, 61, 120}) {
    SCOPED_TRACE(prompt_len);
    const engine::GenerationRequest r = Request(prompt_len, prompt_len, 40);
    ASSERT_TRUE(alone.batcher->Add(r).ok());
    const std::vector<int32_t> expected = Tokens(alone.RunToEnd());
    ASSERT_EQ(expected.size(), 40u);

    const uint64_t transfer = 1000 + prompt_len;
    ASSERT_TRUE(
        d.manager->landing_area()
            ->Reserve(transfer, (prompt_len + page - 1) / page, absl::Now() + absl::Hours(1))
            .ok());
    const engine::TokenEvent first = Prefill(p, r, 7);
    EXPECT_EQ(first.finish, engine::FinishReason::kLength) << first.error;
    // A prompt longer than a step's tokens (96) leaves in parts: the pages
    // its first chunk completed before the rest was computed.
    if (prompt_len > 96) EXPECT_GE(p.exports.size(), 2u);
    // The last chunk's pages left layer by layer as its step computed them
    // (KvBlockManagerOptions::export_layer_parts): a part per layer of the
    // two, then the export's end.
    const int layers = p.manager->layout().num_layers();
    std::vector<int> part_first_layers;
    for (const auto& e : p.exports) {
      if (!e.blocks.empty() && e.blocks[0].part_layers > 0) {
        part_first_layers.push_back(e.blocks[0].first_layer);
      }
    }
    EXPECT_EQ(static_cast<int>(part_first_layers.size()), layers);
    for (int l = 0; l < static_cast<int>(part_first_layers.size()); ++l) {
      EXPECT_EQ(part_first_layers[l], l);
    }
    EXPECT_TRUE(p.exports.back().final && p.exports.back().blocks.empty());
    ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
    ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
    const std::vector<engine::TokenEvent> events = d.RunToEnd();
    EXPECT_EQ(Tokens(events), expected) << "the first token is streamed by the decode worker too";
    EXPECT_EQ(events.back().finish, engine::FinishReason::kLength);
  }
  if (d.runner != nullptr) {
    EXPECT_GT(d.runner->stats().sparse_queries, 0);
    EXPECT_GT(d.runner->stats().clusterings, 0) << "clustered on the decode worker";
  }
  EXPECT_EQ(d.manager->stats().kv_imports, 4);
  EXPECT_EQ(p.manager->stats().kv_exports, 4);
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
}

// ClusterKV for the tiny model's short prompts.
KvPolicyConfig SmallClusterKv() {
  KvPolicyConfig c;
  c.type = "clusterkv";
  c.budget_tokens = 24;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.tokens_per_cluster = 8;
  c.full_layers = 0;
  return c;
}

// SmallClusterKv() clustered in chunks of 32 above one dense layer: the
// upper page group of a tiered Worker is exactly its sparse layers.
KvPolicyConfig ChunkedClusterKv() {
  KvPolicyConfig c = SmallClusterKv();
  c.cluster_chunk_tokens = 32;
  c.full_layers = 1;
  return c;
}

TEST(DisaggregatedKvTest, DecodingImportedKvGivesTheTokensOfOneWorker) {
  ExpectSameTokensAsOneWorker(nullptr);
}

TEST(DisaggregatedKvTest, ClusterKvDecodesImportedKvAsItsOwn) {
  const KvPolicyConfig c = SmallClusterKv();
  ExpectSameTokensAsOneWorker(&c);
}

// A prefill worker that runs ClusterKV clusters the prompts it exports, as
// the decode worker's first step would, without moving their rows, and
// sends the clusterings after the pages: the decode worker redoes them
// (a reorder) instead of running the k-means, and its tokens are those of
// one worker doing everything. A clustering corrupted on the way fails its
// request alone, with nothing left behind.
TEST(DisaggregatedKvTest, ClusterKvPromptsAreClusteredOnThePrefillWorker) {
  const KvPolicyConfig c = ChunkedClusterKv();
  Worker p(0, &c, engine::KvCodecKind::kBf16, /*export_clusterings=*/true), d(64, &c), alone(0, &c);
  const int page = d.manager->layout().page_size();
  const int sparse_layers = p.model->config().num_layers - c.full_layers;
  int64_t exported = 0;
  for (int prompt_len : {8, 61, 97, 150}) {
    SCOPED_TRACE(prompt_len);
    const engine::GenerationRequest r = Request(prompt_len, prompt_len, 24);
    const int64_t alone_before = alone.runner->stats().clusterings;
    ASSERT_TRUE(alone.batcher->Add(r).ok());
    const std::vector<int32_t> expected = Tokens(alone.RunToEnd());
    const int64_t alone_clusterings = alone.runner->stats().clusterings - alone_before;

    const uint64_t transfer = 2000 + prompt_len;
    ASSERT_TRUE(
        d.manager->landing_area()
            ->Reserve(transfer, (prompt_len + page - 1) / page, absl::Now() + absl::Hours(1))
            .ok());
    const int64_t p_before = p.runner->stats().exported_clusterings;
    const engine::TokenEvent first = Prefill(p, r, 7);
    ASSERT_FALSE(p.exports.empty());
    const int64_t chunks = p.runner->stats().exported_clusterings - p_before;
    EXPECT_EQ(static_cast<int64_t>(p.exports.back().planner_state.size()), chunks);
    exported += chunks;
    // The prefill worker's pages went out as computed: one worker that
    // loads them gets its tokens (checked by the decode worker's below).
    const int64_t d_before = d.runner->stats().clusterings;
    const int64_t imported_before = d.runner->stats().imported_clusterings;
    ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
    ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
    const std::vector<engine::TokenEvent> events = d.RunToEnd();
    EXPECT_EQ(Tokens(events), expected);
    const int64_t imported = d.runner->stats().imported_clusterings - imported_before;
    EXPECT_EQ(imported, chunks * sparse_layers);
    EXPECT_EQ(d.runner->stats().clusterings - d_before, alone_clusterings - imported)
        << "the prompt's k-means ran on the prefill worker only";
    if (prompt_len == 150) EXPECT_GE(chunks, 3) << "a long prompt clusters in several chunks";
    if (prompt_len == 8) EXPECT_EQ(chunks, 0) << "nothing to cluster";
  }
  EXPECT_GT(exported, 0);
  EXPECT_EQ(d.runner->stats().reused_clusterings, d.runner->stats().imported_clusterings);

  // A clustering corrupted on the way: the transfer fails its CRC as it
  // is loaded, and its request ends with the error.
  const engine::GenerationRequest r = Request(90, 150, 8);
  const uint64_t transfer = 3000;
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(transfer, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  const engine::TokenEvent first = Prefill(p, r, 8);
  ASSERT_FALSE(p.exports.back().planner_state.empty());
  ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer, /*corrupt=*/-1, /*corrupt_state=*/1));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
  const std::vector<engine::TokenEvent> events = d.RunToEnd();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish, engine::FinishReason::kError);
  EXPECT_NE(events.back().error.find("planner state value 1"), std::string::npos)
      << events.back().error;
  EXPECT_NE(events.back().error.find("CRC32C"), std::string::npos) << events.back().error;
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
  EXPECT_EQ(p.runner->num_free_slots(), 4) << "the export's slot came back";
}

// While a sequence decodes, an imported prompt's KV comes into its pages a
// share a step (BatcherOptions::max_import_bytes_per_step): the running
// sequence keeps getting a token every step meanwhile, and both get the
// tokens of one worker. A request cancelled half-loaded leaves nothing.
// A decode worker that keeps prefixes keeps an imported prompt's KV as it
// came, before ClusterKV's first decode step reorders its pages in place: a
// later prompt that starts with part of it, computed on that worker, loads
// those pages and gets the tokens of computing everything. Pages stored
// after the reorder would hold other positions' keys (later ones among
// them). A prompt that came coded (lossy) is not kept.
TEST(DisaggregatedKvTest, AnImportedPromptIsKeptAsAPrefixInItsOrderAndOnlyWhenLossless) {
  const KvPolicyConfig clusterkv = SmallClusterKv();
  // With no sparse policy the whole sequence is stored when it ends too.
  for (const KvPolicyConfig* c : {&clusterkv, static_cast<const KvPolicyConfig*>(nullptr)})
    for (const engine::KvCodecKind codec :
         {engine::KvCodecKind::kBf16, engine::KvCodecKind::kInt8}) {
      SCOPED_TRACE(engine::KvCodecKindName(codec));
      SCOPED_TRACE(c != nullptr ? "clusterkv" : "full");
      Worker p(0, c, codec), d(64, c, engine::KvCodecKind::kBf16, false, /*prefix_records=*/32),
          alone(0, c);
      const int page = d.manager->layout().page_size();
      const engine::GenerationRequest r = Request(5, 120, 8);
      const uint64_t transfer = 4000;
      ASSERT_TRUE(d.manager->landing_area()
                      ->Reserve(transfer, (120 + page - 1) / page, absl::Now() + absl::Hours(1))
                      .ok());
      const engine::TokenEvent first = Prefill(p, r, 9);
      ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
      ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
      ASSERT_EQ(d.RunToEnd().back().finish, engine::FinishReason::kLength);
      if (c != nullptr) ASSERT_GT(d.runner->stats().sparse_queries, 0);

      // Its first 48 tokens, then others.
      engine::GenerationRequest next = Request(6, 0, 16);
      next.prompt.assign(r.prompt.begin(), r.prompt.begin() + 48);
      const std::vector<int32_t> more = Prompt(24, 77);
      next.prompt.insert(next.prompt.end(), more.begin(), more.end());
      const std::vector<int32_t> expected = OneWorkersTokens(alone, next);
      const int64_t loaded_before = d.manager->stats().prefix_tokens_loaded;
      ASSERT_TRUE(d.batcher->Add(next).ok());
      EXPECT_EQ(Tokens(d.RunToEnd()), expected);
      const int64_t loaded = d.manager->stats().prefix_tokens_loaded - loaded_before;
      if (codec == engine::KvCodecKind::kBf16) {
        EXPECT_EQ(loaded, 48) << "the imported prompt's pages were kept";
      } else {
        EXPECT_EQ(loaded, 0) << "a lossy import is not kept";
      }
      ExpectNothingLeft(p);
      ExpectNothingLeft(d);
    }
}

// A decode worker with a ClusteringStore keeps the clusterings that came
// with an exact imported prompt under the pages it stored the prompt in: a
// later prompt that loads those pages redoes them instead of running the
// k-means, with one worker's tokens.
TEST(DisaggregatedKvTest, AnImportedPromptsClusteringsAreKeptWithItsPages) {
  const KvPolicyConfig c = ChunkedClusterKv();
  ClusteringStore store(int64_t{64} << 20);
  Worker p(0, &c, engine::KvCodecKind::kBf16, /*export_clusterings=*/true);
  Worker d(64, &c, engine::KvCodecKind::kBf16, false, /*prefix_records=*/32, false, true, &store);
  Worker alone(0, &c);
  const int page = d.manager->layout().page_size();
  const engine::GenerationRequest r = Request(5, 150, 8);
  const uint64_t transfer = 4100;
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(transfer, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  const engine::TokenEvent first = Prefill(p, r, 9);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
  ASSERT_EQ(d.RunToEnd().back().finish, engine::FinishReason::kLength);
  ASSERT_GT(d.runner->stats().imported_clusterings, 0);
  EXPECT_GT(d.runner->stats().kept_clusterings, 0) << "the imported clusterings were not kept";

  // The same document with another question.
  engine::GenerationRequest next = Request(6, 0, 16);
  next.prompt.assign(r.prompt.begin(), r.prompt.begin() + 128);
  const std::vector<int32_t> more = Prompt(20, 99);
  next.prompt.insert(next.prompt.end(), more.begin(), more.end());
  const int64_t alone_before = alone.runner->stats().clusterings;
  const std::vector<int32_t> expected = OneWorkersTokens(alone, next);
  const int64_t alone_clusterings = alone.runner->stats().clusterings - alone_before;
  const KvPolicyRunner::Stats before = d.runner->stats();
  ASSERT_TRUE(d.batcher->Add(next).ok());
  EXPECT_EQ(Tokens(d.RunToEnd()), expected);
  const KvPolicyRunner::Stats after = d.runner->stats();
  EXPECT_GT(d.manager->stats().prefix_tokens_loaded, 0);
  EXPECT_GT(after.reused_clusterings, before.reused_clusterings)
      << "the kept clusterings were not reused";
  EXPECT_LT(after.clusterings - before.clusterings, alone_clusterings)
      << "the k-means ran for every chunk";
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
}

// A decode worker whose ClusterKV clusters live in the host tier takes an
// imported prompt's upper layers straight from the landing records into
// it, cluster by cluster in the prefill worker's clusterings: the upper
// pages inside the clustered chunks are never allocated, no k-means and no
// reorder run, and the tokens are those of one worker computing everything
// (bf16), and the same bytes as admitting it through the GPU (int8 on the
// wire). Nothing is left behind.
TEST(DisaggregatedKvTest, AnImportedClusterKvPromptGoesStraightIntoTheHostTier) {
  const KvPolicyConfig c = ChunkedClusterKv();
  for (const engine::KvCodecKind codec : {engine::KvCodecKind::kBf16, engine::KvCodecKind::kInt8}) {
    SCOPED_TRACE(engine::KvCodecKindName(codec));
    Worker p(0, &c, codec, /*export_clusterings=*/true, 0, /*tiered=*/true);
    Worker d(64, &c, codec, false, /*prefix_records=*/32, /*tiered=*/true);
    Worker through_gpu(64, &c, codec, false, 0, /*tiered=*/true, /*admit=*/false);
    Worker alone(0, &c, codec, false, 0, /*tiered=*/true);
    ASSERT_TRUE(d.runner->AdmitsImports());
    const int page = d.manager->layout().page_size();
    for (int prompt_len : {61, 97, 150}) {
      SCOPED_TRACE(prompt_len);
      const engine::GenerationRequest r = Request(prompt_len, prompt_len, 24);
      const std::vector<int32_t> expected = OneWorkersTokens(alone, r);
      std::vector<int32_t> tokens[2];
      Worker* decoders[2] = {&d, &through_gpu};
      for (int i = 0; i < 2; ++i) {
        Worker& w = *decoders[i];
        const uint64_t transfer = 5000 + prompt_len;
        ASSERT_TRUE(
            w.manager->landing_area()
                ->Reserve(transfer, (prompt_len + page - 1) / page, absl::Now() + absl::Hours(1))
                .ok());
        const engine::TokenEvent first = Prefill(p, r, 11);
        ASSERT_NO_FATAL_FAILURE(Send(p, w, transfer));
        ASSERT_TRUE(w.batcher->Add(DecodeRequest(r, first, transfer)).ok());
        tokens[i] = Tokens(w.RunToEnd());
      }
      EXPECT_EQ(tokens[0], tokens[1]) << "the same as through the GPU";
      if (codec == engine::KvCodecKind::kBf16) EXPECT_EQ(tokens[0], expected);
      ExpectNothingLeft(d);
      EXPECT_EQ(d.runner->num_free_slots(), 4);
    }
    const KvPolicyRunner::Stats& s = d.runner->stats();
    EXPECT_EQ(s.admitted_sequences, 3);
    EXPECT_EQ(s.clusterings, through_gpu.runner->stats().clusterings)
        << "no k-means of the prompt (only of the windows decoding adds)";
    EXPECT_EQ(s.reused_clusterings, s.imported_clusterings);
    EXPECT_EQ(s.admitted_clusterings, s.imported_clusterings);
    EXPECT_GT(s.recall_tokens, 0) << "decoded from the host tier";
    EXPECT_EQ(d.manager->stats().kv_imports_admitted, 3);
    // The clustered chunks' whole pages in the upper group, never taken:
    // e.g. 150 tokens: sinks 4, the chunks up to the last 2 x window.
    EXPECT_GT(d.manager->stats().kv_import_upper_pages_saved, 10);
    EXPECT_EQ(through_gpu.runner->stats().admitted_sequences, 0);
    EXPECT_EQ(through_gpu.manager->stats().kv_import_upper_pages_saved, 0);

    // The last prompt's pages were kept as a prefix from the landing
    // records when it came exact: a prompt starting with its first 48
    // tokens loads them, with the tokens of computing everything.
    engine::GenerationRequest next = Request(9, 0, 16);
    const std::vector<int32_t> last = Request(150, 150, 1).prompt;
    next.prompt.assign(last.begin(), last.begin() + 48);
    const std::vector<int32_t> more = Prompt(24, 78);
    next.prompt.insert(next.prompt.end(), more.begin(), more.end());
    const std::vector<int32_t> next_expected = OneWorkersTokens(alone, next);
    const int64_t loaded_before = d.manager->stats().prefix_tokens_loaded;
    ASSERT_TRUE(d.batcher->Add(next).ok());
    EXPECT_EQ(Tokens(d.RunToEnd()), next_expected);
    EXPECT_EQ(d.manager->stats().prefix_tokens_loaded - loaded_before,
              codec == engine::KvCodecKind::kBf16 ? 48 : 0);
    ExpectNothingLeft(d);
  }
}

// What an admission reserved goes back when its import fails, and the
// request alone fails: a clustering corrupted on the way, a page corrupted
// on the way, a request cancelled while its KV loads a share a step.
TEST(DisaggregatedKvTest, AFailedAdmissionFailsItsRequestAloneAndLeavesNothing) {
  const KvPolicyConfig c = ChunkedClusterKv();
  Worker p(0, &c, engine::KvCodecKind::kInt8, true, 0, true);
  Worker d(64, &c, engine::KvCodecKind::kInt8, false, 0, true);
  const int page = d.manager->layout().page_size();
  const engine::GenerationRequest r = Request(1, 150, 8);
  for (const bool corrupt_state : {true, false}) {
    SCOPED_TRACE(corrupt_state ? "a clustering" : "a page");
    const uint64_t transfer = 6000 + corrupt_state;
    ASSERT_TRUE(d.manager->landing_area()
                    ->Reserve(transfer, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                    .ok());
    const engine::TokenEvent first = Prefill(p, r, 12);
    ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer, corrupt_state ? -1 : 10, corrupt_state ? 0 : -1));
    ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
    const std::vector<engine::TokenEvent> events = d.RunToEnd();
    ASSERT_FALSE(events.empty());
    EXPECT_EQ(events.back().finish, engine::FinishReason::kError);
    EXPECT_NE(events.back().error.find("CRC32C"), std::string::npos) << events.back().error;
    ExpectNothingLeft(d);
    EXPECT_EQ(d.runner->num_free_slots(), 4);
    EXPECT_EQ(d.runner->stats().admitted_sequences, 0);
  }
  // A block whose header names another shape of the same size (8 tokens
  // of 16 channels sent as 16 of 8), its CRCs made right by the sender:
  // refused by its header before anything is decoded.
  {
    const uint64_t transfer = 6050;
    ASSERT_TRUE(d.manager->landing_area()
                    ->Reserve(transfer, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                    .ok());
    const engine::TokenEvent first = Prefill(p, r, 14);
    auto codec = engine::KvCodec::Create(engine::KvCodecKind::kInt8);
    ASSERT_TRUE(codec.ok());
    const int d_head = d.model->config().head_dim, heads = d.manager->layout().num_kv_heads();
    const size_t block = (*codec)->EncodedBytes(page, d_head, d.model->kv_cache_dtype());
    ASSERT_EQ((*codec)->EncodedBytes(d_head, page, d.model->kv_cache_dtype()), block);
    bool forged = false;
    for (KvBlockManager::ExportedKv& e : p.exports) {
      if (e.first_block > 10 || e.blocks.empty() || e.blocks[0].part_layers > 0 ||
          e.first_block + static_cast<int>(e.blocks.size()) <= 10) {
        continue;
      }
      KvBlockManager::ExportedKv::Block& b = e.blocks[10 - e.first_block];
      // Page 10, layer 1 (an upper layer), head 0.
      auto* bytes = reinterpret_cast<uint8_t*>(const_cast<std::byte*>(b.data.data())) +
                    size_t{1} * heads * block;
      const uint32_t tokens = d_head, dim = page;
      std::memcpy(bytes + 8, &tokens, 4);
      std::memcpy(bytes + 12, &dim, 4);
      const uint32_t crc = MaskCrc(Crc32cExtend(Crc32c(bytes, 28), bytes + 32, block - 32));
      std::memcpy(bytes + 28, &crc, 4);
      b.crc = KvPayloadCrc(b.data);
      forged = true;
    }
    ASSERT_TRUE(forged);
    ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
    ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
    const std::vector<engine::TokenEvent> events = d.RunToEnd();
    ASSERT_FALSE(events.empty());
    EXPECT_EQ(events.back().finish, engine::FinishReason::kError);
    EXPECT_THAT(events.back().error, HasSubstr("page 10 layer 1 head 0: a int8 block of 16 x 8"));
    ExpectNothingLeft(d);
    EXPECT_EQ(d.runner->num_free_slots(), 4);
  }
  // Dropped while it loads a share at a time (its request ended).
  const uint64_t transfer = 6100;
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(transfer, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  Prefill(p, r, 13);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
  engine::SequencePages loaded;
  const int64_t admitted_before = d.manager->stats().kv_imports_admitted;
  absl::StatusOr<bool> part =
      d.manager->LoadImported(42, transfer, r.prompt, loaded, /*max_bytes=*/1);
  EXPECT_TRUE(absl::IsUnavailable(part.status())) << part.status();
  EXPECT_EQ(d.manager->stats().kv_imports_admitted - admitted_before, 1);
  EXPECT_EQ(d.runner->num_free_slots(), 3) << "held by the admission";
  d.manager->DropImported(transfer);
  EXPECT_EQ(d.runner->num_free_slots(), 4);
  ExpectNothingLeft(d);
}

// An admitted import whose host copy goes bad before its first decode step
// (its recall finds a piece that fails its check) is recomputed from its
// tokens like any sequence whose KV is lost, though that step took it from
// the waiting queue: it ends with the tokens of computing everything.
TEST(DisaggregatedKvTest, AnAdmittedImportLostAtItsFirstStepIsRecomputed) {
  const KvPolicyConfig c = ChunkedClusterKv();
  Worker p(0, &c, engine::KvCodecKind::kBf16, true, 0, true);
  Worker d(64, &c, engine::KvCodecKind::kBf16, false, 0, true);
  Worker alone(0, &c, engine::KvCodecKind::kBf16, false, 0, true);
  engine::BatcherOptions options;
  options.max_import_bytes_per_step = 2 * d.manager->layout().record_bytes();
  d.batcher = std::make_unique<engine::Batcher>(d.model.get(), nullptr, options, d.manager.get());
  // Long enough to run until the import is loaded, however long the
  // encoding beside the steps takes (with nothing running, an import loads
  // at once, and its first decode step would come before the test's flip).
  const engine::GenerationRequest running = Request(1, 20, 220);
  const engine::GenerationRequest imported = Request(2, 150, 12);
  const std::vector<int32_t> running_alone = OneWorkersTokens(alone, running);
  const std::vector<int32_t> imported_alone = OneWorkersTokens(alone, imported);
  std::map<uint64_t, std::vector<int32_t>> tokens;
  auto step = [&] {
    auto out = d.batcher->Step();
    ASSERT_TRUE(out.ok()) << out.status();
    for (const engine::TokenEvent& e : *out) {
      EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      if (e.token_id >= 0) tokens[e.request_id].push_back(e.token_id);
    }
  };
  ASSERT_TRUE(d.batcher->Add(running).ok());
  for (int i = 0; i < 3; ++i) ASSERT_NO_FATAL_FAILURE(step());
  const int page = d.manager->layout().page_size();
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(20, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  const engine::TokenEvent first = Prefill(p, imported, 15);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 20));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(imported, first, 20)).ok());
  // Stepped until its clusters are in the host tier (encoded beside the
  // steps), its pages still loading a share a step.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (d.runner->stats().admitted_sequences == 0) {
    ASSERT_LT(std::chrono::steady_clock::now(), give_up);
    ASSERT_NO_FATAL_FAILURE(step());
  }
  ASSERT_EQ(d.manager->stats().kv_imports_admitted, 1);
  ASSERT_EQ(d.manager->stats().kv_imports, 0) << "still loading a share a step";
  // Every host unit of its clusters flipped.
  const std::vector<KvBlockManager::HostRegion> regions = d.runner->HostRegionsOf(2);
  ASSERT_FALSE(regions.empty());
  uint8_t* host = d.manager->host_buffer().data();
  for (const KvBlockManager::HostRegion& region : regions) {
    for (int64_t at = 0; at < region.bytes; at += engine::kKvHostUnit) {
      host[region.offset + at + 5] ^= 0x40;
    }
  }
  for (int i = 0; d.batcher->HasWork() && i < 500; ++i) ASSERT_NO_FATAL_FAILURE(step());
  EXPECT_FALSE(d.batcher->HasWork());
  EXPECT_GT(d.runner->stats().recall_bad_pieces, 0);
  EXPECT_EQ(d.runner->stats().lost_sequences, 1);
  EXPECT_EQ(tokens[1], running_alone);
  EXPECT_EQ(tokens[2], imported_alone) << "recomputed here";
  ExpectNothingLeft(d);
  EXPECT_EQ(d.runner->num_free_slots(), 4);
}

// An admission encodes beside the steps: while it is held up, the running
// sequence keeps getting a token every step and the import waits; once it
// goes on, the import completes with one worker's tokens. A request
// cancelled while its admission encodes is dropped once the encoding has
// stopped (it reads the landing records and writes the host regions), with
// nothing left behind.
TEST(DisaggregatedKvTest, AnAdmissionEncodesBesideTheStepsAndACancelWaitsForIt) {
  const KvPolicyConfig c = ChunkedClusterKv();
  Worker p(0, &c, engine::KvCodecKind::kBf16, true, 0, true);
  Worker alone(0, &c, engine::KvCodecKind::kBf16, false, 0, true);
  // The decode worker, its admissions held at a gate.
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  int waiting = 0;
  Worker d(64, &c, engine::KvCodecKind::kBf16, false, 0, true);
  {
    KvTierOptions tier;
    tier.manager = d.manager.get();
    tier.admit_before_encode = [&] {
      std::unique_lock<std::mutex> lock(mu);
      ++waiting;
      cv.notify_all();
      cv.wait(lock, [&] { return open; });
    };
    d.batcher.reset();
    d.manager->set_import_admitter(nullptr);
    ASSERT_TRUE(d.model->set_attention_planner(nullptr).ok());
    auto runner = KvPolicyRunner::Create(d.model.get(), {c},
                                         {.max_sparse_seqs = 4, .tier = tier, .imports = true});
    ASSERT_TRUE(runner.ok()) << runner.status();
    d.runner = *std::move(runner);
    ASSERT_TRUE(d.model->set_attention_planner(d.runner.get()).ok());
    d.manager->set_import_admitter(d.runner.get());
    d.batcher = std::make_unique<engine::Batcher>(d.model.get(), nullptr, engine::BatcherOptions{},
                                                  d.manager.get());
  }
  auto wait_held = [&](int n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return waiting >= n; });
  };
  const engine::GenerationRequest running = Request(1, 20, 40);
  const engine::GenerationRequest imported = Request(2, 150, 12);
  const std::vector<int32_t> running_alone = OneWorkersTokens(alone, running);
  const std::vector<int32_t> imported_alone = OneWorkersTokens(alone, imported);
  std::map<uint64_t, std::vector<int32_t>> tokens;
  auto step = [&] {
    std::set<uint64_t> got;
    auto out = d.batcher->Step();
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return got;
    for (const engine::TokenEvent& e : *out) {
      EXPECT_NE(e.finish, engine::FinishReason::kError) << e.error;
      if (e.token_id >= 0) tokens[e.request_id].push_back(e.token_id);
      if (e.token_id >= 0) got.insert(e.request_id);
    }
    return got;
  };
  const int page = d.manager->layout().page_size();
  ASSERT_TRUE(d.batcher->Add(running).ok());
  step();
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(30, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  const engine::TokenEvent imported_first = Prefill(p, imported, 16);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 30));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(imported, imported_first, 30)).ok());
  step();
  ASSERT_TRUE(wait_held(1));
  for (int i = 0; i < 10; ++i) {
    EXPECT_TRUE(step().contains(1)) << "the running sequence's token in step " << i;
  }
  EXPECT_EQ(d.manager->stats().kv_imports, 0) << "waits for its clusters";
  {
    std::lock_guard<std::mutex> lock(mu);
    open = true;
  }
  cv.notify_all();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (d.batcher->HasWork() && std::chrono::steady_clock::now() < give_up) step();
  EXPECT_EQ(tokens[1], running_alone);
  EXPECT_EQ(tokens[2], imported_alone);
  EXPECT_EQ(d.runner->stats().admitted_sequences, 1);

  // Cancelled while its admission is held: the cancel returns once the
  // encoding has stopped.
  {
    std::lock_guard<std::mutex> lock(mu);
    open = false;
  }
  ASSERT_TRUE(d.manager->landing_area()
                  ->Reserve(31, (150 + page - 1) / page, absl::Now() + absl::Hours(1))
                  .ok());
  engine::GenerationRequest again = imported;
  again.id = 3;
  const engine::TokenEvent first = Prefill(p, again, 17);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 31));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(again, first, 31)).ok());
  step();
  ASSERT_TRUE(wait_held(2));
  const auto cancelled = std::chrono::steady_clock::now();
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::lock_guard<std::mutex> lock(mu);
    open = true;
    cv.notify_all();
  });
  d.batcher->Cancel(3);
  while (d.batcher->HasWork()) step();
  EXPECT_GE(std::chrono::steady_clock::now() - cancelled, std::chrono::milliseconds(50))
      << "the drop waited for the held encoding";
  opener.join();
  ExpectNothingLeft(d);
  EXPECT_EQ(d.runner->num_free_slots(), 4);
  EXPECT_EQ(d.runner->stats().admitted_sequences, 1) << "the cancelled one never applied";
}

TEST(DisaggregatedKvTest, AnImportLoadsAShareAStepWhileOthersDecode) {
  Worker p(0), d(64), alone(0);
  const int page = d.manager->layout().page_size();
  engine::BatcherOptions options;
  options.max_import_bytes_per_step = 2 * d.manager->layout().record_bytes();
  d.batcher = std::make_unique<engine::Batcher>(d.model.get(), nullptr, options, d.manager.get());
  const engine::GenerationRequest running = Request(1, 20, 60);
  const engine::GenerationRequest imported = Request(2, 150, 12);
  ASSERT_TRUE(alone.batcher->Add(running).ok());
  const std::vector<int32_t> running_alone = Tokens(alone.RunToEnd());
  ASSERT_TRUE(alone.batcher->Add(imported).ok());
  const std::vector<int32_t> imported_alone = Tokens(alone.RunToEnd());

  ASSERT_TRUE(d.batcher->Add(running).ok());
  std::map<uint64_t, std::vector<int32_t>> tokens;
  auto step = [&] {
    auto out = d.batcher->Step();
    EXPECT_TRUE(out.ok()) << out.status();
    std::set<uint64_t> got;
    if (out.ok()) {
      for (const engine::TokenEvent& e : *out) {
        if (e.token_id >= 0) tokens[e.request_id].push_back(e.token_id);
        if (e.token_id >= 0) got.insert(e.request_id);
      }
    }
    return got;
  };
  for (int i = 0; i < 4; ++i) step();  // the running sequence decodes
  const int pages = (150 + page - 1) / page;
  ASSERT_TRUE(d.manager->landing_area()->Reserve(10, pages, absl::Now() + absl::Hours(1)).ok());
  const engine::TokenEvent first = Prefill(p, imported, 7);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 10));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(imported, first, 10)).ok());
  int loading_steps = 0;
  while (d.manager->stats().kv_imports == 0) {
    ASSERT_LT(loading_steps, 100);
    const std::set<uint64_t> got = step();
    EXPECT_TRUE(got.contains(1)) << "the running sequence got no token in step " << loading_steps;
    ++loading_steps;
  }
  EXPECT_GE(loading_steps, pages / 2 - 1) << "two pages a step";
  while (d.batcher->HasWork()) step();
  EXPECT_EQ(tokens[1], running_alone);
  EXPECT_EQ(tokens[2], imported_alone);

  // Cancelled half-loaded: its pages and records go back.
  ASSERT_TRUE(d.batcher->Add(running).ok());
  for (int i = 0; i < 2; ++i) step();
  ASSERT_TRUE(d.manager->landing_area()->Reserve(11, pages, absl::Now() + absl::Hours(1)).ok());
  engine::GenerationRequest again = imported;
  again.id = 3;
  const engine::TokenEvent first_again = Prefill(p, again, 8);
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 11));
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(again, first_again, 11)).ok());
  step();
  step();
  EXPECT_EQ(d.manager->stats().kv_imports, 1) << "still loading";
  d.batcher->Cancel(3);
  while (d.batcher->HasWork()) step();
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
}

// Pages coded on the wire (the profile's codec): a fraction of the raw
// bytes, decoded into the decode worker's pages; requests complete with
// nothing left behind. (Greedy tokens may differ from one worker's: the
// codecs are lossy; the next test checks the rows themselves.)
TEST(DisaggregatedKvTest, CodedPagesTravelInAFractionOfTheBytes) {
  for (engine::KvCodecKind codec :
       {engine::KvCodecKind::kInt8, engine::KvCodecKind::kFp8E4M3, engine::KvCodecKind::kInt4}) {
    SCOPED_TRACE(static_cast<int>(codec));
    Worker p(0, nullptr, codec), d(64), alone(0);
    const int page = d.manager->layout().page_size();
    const int64_t record = d.manager->layout().record_bytes();
    for (int prompt_len : {5, 61, 120}) {
      SCOPED_TRACE(prompt_len);
      const engine::GenerationRequest r = Request(prompt_len, prompt_len, 24);
      ASSERT_TRUE(alone.batcher->Add(r).ok());
      const std::vector<int32_t> expected = Tokens(alone.RunToEnd());
      const uint64_t transfer = 2000 + prompt_len;
      const int pages = (prompt_len + page - 1) / page;
      ASSERT_TRUE(
          d.manager->landing_area()->Reserve(transfer, pages, absl::Now() + absl::Hours(1)).ok());
      const engine::TokenEvent first = Prefill(p, r, 9);
      int64_t wire = 0;
      for (const auto& part : p.exports) {
        for (const auto& b : part.blocks) {
          EXPECT_EQ(b.codec, codec);
          wire += static_cast<int64_t>(b.data.size());
        }
      }
      EXPECT_LT(wire, int64_t{pages} * record * 7 / 10) << "coded, not raw";
      ASSERT_NO_FATAL_FAILURE(Send(p, d, transfer));
      ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, transfer)).ok());
      const std::vector<engine::TokenEvent> events = d.RunToEnd();
      ASSERT_EQ(events.size(), 24u);
      EXPECT_EQ(events.back().finish, engine::FinishReason::kLength) << events.back().error;
      EXPECT_EQ(events.front().token_id, expected.front()) << "sampled on the prefill worker";
    }
    EXPECT_EQ(d.manager->stats().kv_imports, 3);
    EXPECT_EQ(d.manager->stats().kv_imports_failed, 0);
    ExpectNothingLeft(p);
    ExpectNothingLeft(d);
  }
}

TEST(DisaggregatedKvTest, CodedPagesDecodeIntoTheRowsTheyCameFrom) {
  // The same prompt exported raw (the exact rows, page by page) and coded
  // in int8; the coded one is loaded into the decode worker's pages, whose
  // rows must be the raw ones within int8's error, page for page.
  Worker raw_p(0), coded_p(0, nullptr, engine::KvCodecKind::kInt8), d(64);
  const KvLayout& layout = d.manager->layout();
  const int page = layout.page_size();
  const engine::GenerationRequest r = Request(1, 61, 4);
  Prefill(raw_p, r, 1);
  const int pages = (61 + page - 1) / page;
  // Per page: the record as floats, put together from its parts.
  std::vector<std::vector<float>> raw(
      pages, std::vector<float>(static_cast<size_t>(layout.record_bytes()) / sizeof(float)));
  const int64_t layer_bytes = layout.record_bytes() / layout.num_layers();
  for (const auto& part : raw_p.exports) {
    for (size_t i = 0; i < part.blocks.size(); ++i) {
      const auto& b = part.blocks[i];
      ASSERT_EQ(b.codec, engine::KvCodecKind::kBf16);
      ASSERT_LT(part.first_block + i, raw.size());
      std::memcpy(reinterpret_cast<std::byte*>(raw[part.first_block + i].data()) +
                      b.first_layer * layer_bytes,
                  b.data.data(), b.data.size());
    }
  }
  raw_p.manager->ReleaseExport(raw_p.exports.back().key);
  raw_p.exports.clear();
  ASSERT_TRUE(d.manager->landing_area()->Reserve(5, pages, absl::Now() + absl::Hours(1)).ok());
  Prefill(coded_p, r, 2);
  ASSERT_NO_FATAL_FAILURE(Send(coded_p, d, 5));
  engine::SequencePages loaded;
  absl::StatusOr<bool> done = d.manager->LoadImported(1, 5, r.prompt, loaded, /*max_bytes=*/0);
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_TRUE(*done);
  ASSERT_EQ(static_cast<int>(loaded.lower.size()), pages);
  const int64_t row_floats = int64_t{page} * layout.num_kv_heads() * layout.head_dim();
  const int64_t token_floats = int64_t{layout.num_kv_heads()} * layout.head_dim();
  for (int i = 0; i < pages; ++i) {
    const int tokens = std::min(page, 61 - i * page);
    for (int t = 0; t < 2 * layout.num_layers(); ++t) {
      const float* got = static_cast<const float*>(layout.caches()[t].data()) +
                         int64_t{loaded.lower[i]} * row_floats;
      const float* want = raw[i].data() + t * row_floats;
      for (int64_t k = 0; k < tokens * token_floats; k += layout.head_dim()) {
        float scale = 0;
        for (int c = 0; c < layout.head_dim(); ++c) scale = std::max(scale, std::fabs(want[k + c]));
        for (int c = 0; c < layout.head_dim(); ++c) {
          ASSERT_NEAR(got[k + c], want[k + c], 0.02f * scale + 1e-4f)
              << "page " << i << ", cache " << t << ", element " << k + c;
        }
      }
    }
  }
  ASSERT_TRUE(d.manager->Free(loaded).ok());
  ExpectNothingLeft(raw_p);
  ExpectNothingLeft(coded_p);
  ExpectNothingLeft(d);
}

// Two requests, raw or coded with `codec`; block `corrupt` of the first is
// flipped on the way: it fails alone, naming the block, and nothing stays.
void ExpectACorruptBlockFailsItsRequestAlone(engine::KvCodecKind codec, int corrupt) {
  Worker p(0, nullptr, codec), d(64);
  const int page = d.manager->layout().page_size();
  const engine::GenerationRequest bad = Request(1, 50, 10), good = Request(2, 40, 10);
  for (const auto* r : {&bad, &good}) {
    ASSERT_TRUE(d.manager->landing_area()
                    ->Reserve(r->id, (static_cast<int>(r->prompt.size()) + page - 1) / page,
                              absl::Now() + absl::Hours(1))
                    .ok());
    const engine::TokenEvent first = Prefill(p, *r, r->id);
    ASSERT_NO_FATAL_FAILURE(Send(p, d, r->id, r == &bad ? corrupt : -1));
    ASSERT_TRUE(d.batcher->Add(DecodeRequest(*r, first, r->id)).ok());
  }
  std::map<uint64_t, engine::TokenEvent> last;
  for (const auto& e : d.RunToEnd()) last[e.request_id] = e;
  EXPECT_EQ(last[1].finish, engine::FinishReason::kError);
  EXPECT_THAT(last[1].error,
              HasSubstr(absl::StrCat("block ", corrupt, " of 7 does not match its CRC32C")));
  EXPECT_EQ(last[2].finish, engine::FinishReason::kLength) << last[2].error;
  EXPECT_EQ(d.manager->stats().kv_imports_failed, 1);
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
}

TEST(DisaggregatedKvTest, ACorruptBlockFailsItsRequestAloneWithAClearError) {
  ExpectACorruptBlockFailsItsRequestAlone(engine::KvCodecKind::kBf16, 3);
}

TEST(DisaggregatedKvTest, ACodedBlockCorruptedOnTheWayFailsItsRequestAlone) {
  ExpectACorruptBlockFailsItsRequestAlone(engine::KvCodecKind::kInt8, 2);
}

TEST(DisaggregatedKvTest, ATransferThatNeverCameOrExpiredFailsItsRequest) {
  Worker d(64);
  engine::GenerationRequest r = Request(1, 30, 5);
  r.generated = {{17, -1.0f}};
  r.import_kv = 99;  // never reserved
  ASSERT_TRUE(d.batcher->Add(r).ok());
  // An expired one: reserved, half sent, its lease over.
  ASSERT_TRUE(d.manager->landing_area()->Reserve(5, 4, absl::Now() - absl::Seconds(1)).ok());
  ASSERT_TRUE(d.manager->landing_area()->Place(5, 0, 4, d.manager->block_bytes()).ok());
  d.manager->landing_area()->Landed(5, 0, 0, absl::OkStatus());
  engine::GenerationRequest expired = Request(2, 30, 5);
  expired.generated = {{17, -1.0f}};
  expired.import_kv = 5;
  ASSERT_TRUE(d.batcher->Add(expired).ok());
  std::map<uint64_t, engine::TokenEvent> last;
  for (const auto& e : d.RunToEnd()) last[e.request_id] = e;
  EXPECT_EQ(last[1].finish, engine::FinishReason::kError);
  EXPECT_THAT(last[1].error, HasSubstr("KV transfer 99 is not held here"));
  EXPECT_EQ(last[2].finish, engine::FinishReason::kError);
  EXPECT_EQ(d.manager->stats().kv_transfers_expired, 1);
  ExpectNothingLeft(d);
}

TEST(DisaggregatedKvTest, AFirstTokenThatStopsEndsTheRequestAndDropsItsTransfer) {
  Worker d(64);
  engine::GenerationRequest r = Request(1, 30, 5);
  r.stop_token_ids = {17};
  r.generated = {{17, -1.0f}};
  r.import_kv = 8;
  ASSERT_TRUE(d.manager->landing_area()->Reserve(8, 4, absl::Now() + absl::Hours(1)).ok());
  ASSERT_TRUE(d.batcher->Add(r).ok());
  const std::vector<engine::TokenEvent> events = d.RunToEnd();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token_id, 17);
  EXPECT_EQ(events[0].finish, engine::FinishReason::kStop);
  ExpectNothingLeft(d);
}

TEST(DisaggregatedKvTest, ARequestStartsAtItsFirstTokenAndLoadsItsKvOnceTheSenderIsDone) {
  // The decode worker takes the request as soon as the prefill worker's
  // first token comes: the token goes out at once, and the request waits
  // for its KV (others go on meanwhile) until the sender says all landed.
  Worker p(0), d(64), alone(0);
  const engine::GenerationRequest r = Request(1, 61, 12), other = Request(2, 20, 12);
  const std::vector<int32_t> expected = OneWorkersTokens(alone, r);
  const std::vector<int32_t> expected_other = OneWorkersTokens(alone, other);

  ASSERT_TRUE(d.manager->landing_area()->Reserve(21, 8, absl::Now() + absl::Hours(1)).ok());
  const engine::TokenEvent first = Prefill(p, r, 7);
  ASSERT_TRUE(d.batcher->Add(DecodeRequest(r, first, 21)).ok());
  ASSERT_TRUE(d.batcher->Add(other).ok());
  std::vector<int32_t> tokens, other_tokens;
  auto step = [&] {
    auto events = d.batcher->Step();
    ASSERT_TRUE(events.ok()) << events.status();
    for (const auto& e : *events) (e.request_id == 1 ? tokens : other_tokens).push_back(e.token_id);
  };
  ASSERT_NO_FATAL_FAILURE(step());
  EXPECT_EQ(tokens, std::vector<int32_t>{first.token_id}) << "streamed before the KV landed";
  // The blocks land, but the sender has not said it is done: still waiting.
  const absl::Status delivered =
      testing_util::Deliver(p.exports, p.manager->layout(), *d.manager, 21, -1, -1,
                            /*sender_done=*/false);
  ASSERT_TRUE(delivered.ok()) << delivered;
  p.manager->ReleaseExport(p.exports.back().key);
  p.exports.clear();
  for (int i = 0; i < 5; ++i) ASSERT_NO_FATAL_FAILURE(step());
  EXPECT_EQ(tokens.size(), 1u);
  EXPECT_EQ(d.batcher->queued_prompt_tokens(), 0) << "its prompt is not computed here";
  EXPECT_EQ(d.manager->stats().kv_imports, 0);
  EXPECT_GE(other_tokens.size(), 5u) << "the other request decodes meanwhile";
  ASSERT_TRUE(d.manager->landing_area()->SenderDone(21));
  for (const auto& e : d.RunToEnd()) {
    (e.request_id == 1 ? tokens : other_tokens).push_back(e.token_id);
  }
  EXPECT_EQ(tokens, expected);
  EXPECT_EQ(other_tokens, expected_other);
  EXPECT_EQ(d.manager->stats().kv_imports, 1);
  ExpectNothingLeft(p);
  ExpectNothingLeft(d);
}

TEST(DisaggregatedKvTest, ASenderFailingAfterTheFirstTokenLeavesThePromptToThisWorker) {
  // With import_fallback (the first token is out), the prompt and that
  // token are computed here: the same tokens as one worker. Without it the
  // request fails, naming the sender's error. Nothing is left either way.
  Worker p(0), d(64), alone(0);
  const engine::GenerationRequest r = Request(1, 61, 12);
  const std::vector<int32_t> expected = OneWorkersTokens(alone, r);
  for (const bool fallback : {true, false}) {
    SCOPED_TRACE(fallback);
    const uint64_t transfer = fallback ? 31 : 32;
    ASSERT_TRUE(d.manager->landing_area()->Reserve(transfer, 8, absl::Now() + absl::Hours(1)).ok());
    const engine::TokenEvent first = Prefill(p, r, 7);
    p.manager->ReleaseExport(p.exports.back().key);
    p.exports.clear();
    engine::GenerationRequest dr = DecodeRequest(r, first, transfer);
    dr.import_fallback = fallback;
    ASSERT_TRUE(d.batcher->Add(dr).ok());
    // Alone and waiting for its KV: it is not taken for a prompt too large
    // to ever fit.
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(d.batcher->Step().ok());
    ASSERT_TRUE(d.manager->landing_area()->Holds(transfer));
    // A block lands, then the sender fails.
    const auto placed = d.manager->landing_area()->Place(transfer, 0, 8, d.manager->block_bytes());
    ASSERT_TRUE(placed.ok()) << placed.status();
    d.manager->landing_area()->Landed(transfer, 0, 0, absl::OkStatus());
    ASSERT_TRUE(d.manager->landing_area()->SenderFailed(
        transfer, absl::UnavailableError("prefill worker p: peer went away")));
    const std::vector<engine::TokenEvent> events = d.RunToEnd();
    ASSERT_FALSE(events.empty());
    if (fallback) {
      EXPECT_EQ(Tokens(events), std::vector<int32_t>(expected.begin() + 1, expected.end()));
      EXPECT_EQ(events.back().finish, engine::FinishReason::kLength);
    } else {
      EXPECT_EQ(events.back().finish, engine::FinishReason::kError);
      EXPECT_THAT(events.back().error,
                  HasSubstr("its sender failed: UNAVAILABLE: prefill worker p: peer went away"));
    }
    EXPECT_EQ(d.manager->stats().kv_imports, 0);
    ExpectNothingLeft(p);
    ExpectNothingLeft(d);
  }
}

TEST(DisaggregatedKvTest, APlannerStateThatComesAfterThePagesEndsTheExport) {
  // On the GPU the prompt's clusterings are read back after its step: the
  // pages' last part goes without them, not final, and a final part of
  // the values alone follows. One released first sends nothing more.
  Worker p(0), d(64);
  const engine::GenerationRequest r = Request(1, 61, 4);
  p.manager->ExpectExportPlannerState(7);
  const engine::TokenEvent first = Prefill(p, r, 7);
  ASSERT_FALSE(p.exports.empty());
  EXPECT_FALSE(p.exports.back().final) << "its planner state is still to come";
  EXPECT_EQ(p.exports.back().first_block + p.exports.back().blocks.size(), 8u);
  p.manager->AddExportPlannerState(7, {std::vector<uint8_t>(40, 3)});
  ASSERT_TRUE(p.manager->Poll().ok());
  ASSERT_TRUE(p.exports.back().final);
  EXPECT_TRUE(p.exports.back().blocks.empty());
  EXPECT_EQ(p.exports.back().first_block, 8);
  ASSERT_EQ(p.exports.back().planner_state.size(), 1u);
  EXPECT_EQ(p.exports.back().planner_state[0].size(), 40u);
  // It crosses like any export, the value with it.
  ASSERT_TRUE(d.manager->landing_area()->Reserve(5, 8, absl::Now() + absl::Hours(1)).ok());
  ASSERT_NO_FATAL_FAILURE(Send(p, d, 5));
  std::vector<std::vector<uint8_t>> state;
  auto blocks = d.manager->landing_area()->Take(5, &state);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_EQ(blocks->size(), 8u);
  ASSERT_EQ(state.size(), 1u);
  EXPECT_EQ(state[0], std::vector<uint8_t>(40, 3));
  std::vector<int32_t> records;
  for (const auto& b : *blocks) records.push_back(b.record);
  d.manager->landing_area()->Free(records);
  ExpectNothingLeft(d);
  EXPECT_GE(first.token_id, 0);

  // One whose state never comes ends without it after the timeout (a
  // planner that failed holds nothing for longer).
  {
    Worker q(0);
    q.manager->ExpectExportPlannerState(9);
    Prefill(q, Request(3, 30, 4), 9);
    ASSERT_FALSE(q.exports.back().final);
    ASSERT_TRUE(q.manager->Poll().ok());
    EXPECT_FALSE(q.exports.back().final) << "within the timeout";
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    ASSERT_TRUE(q.manager->Poll().ok());
    ASSERT_TRUE(q.exports.back().final);
    EXPECT_TRUE(q.exports.back().blocks.empty());
    EXPECT_TRUE(q.exports.back().planner_state.empty());
    q.manager->ReleaseExport(9);
    q.exports.clear();
    ExpectNothingLeft(q);
  }

  // Released before its state came: the state is dropped on arrival.
  p.manager->ExpectExportPlannerState(8);
  Prefill(p, Request(2, 30, 4), 8);
  ASSERT_FALSE(p.exports.back().final);
  p.manager->ReleaseExport(8);
  p.exports.clear();
  ASSERT_TRUE(p.manager->Poll().ok());
  p.manager->AddExportPlannerState(8, {std::vector<uint8_t>(40, 3)});
  ASSERT_TRUE(p.manager->Poll().ok());
  EXPECT_TRUE(p.exports.empty());
  ExpectNothingLeft(p);
}

TEST(DisaggregatedKvTest, AForwardThatEndsBeforeItsLastLayerFailsTheExportAndFreesIt) {
  // What the batcher does around a step whose forward fails after its
  // first layer: the export armed for it fails at its final call, clearly,
  // and nothing is left once it is dropped.
  Worker p(0);
  const int page = p.manager->layout().page_size();
  const std::vector<int32_t> tokens = Prompt(20, 5);
  engine::SequencePages pages;
  const int needed = (20 + page - 1) / page;
  ASSERT_TRUE(p.manager->AllocatePages(engine::PageGroup::kLower, needed, pages.lower));
  ASSERT_TRUE(p.manager->ExportByLayer(4, tokens, pages));
  EXPECT_FALSE(p.manager->ExportByLayer(4, tokens, pages)) << "armed once";
  ASSERT_TRUE(p.manager->LayerKvWritten(0).ok());  // the first of two layers
  ASSERT_TRUE(p.manager->FinishLayerExports().ok());
  const absl::Status final = p.manager->ExportKv(4, tokens, pages, /*final=*/true);
  EXPECT_TRUE(absl::IsFailedPrecondition(final)) << final;
  EXPECT_THAT(final.message(), HasSubstr("later layers were never copied out"));
  p.manager->DropExport(4);
  ASSERT_TRUE(p.manager->FreePages(engine::PageGroup::kLower, pages.lower).ok());
  ExpectNothingLeft(p);
  EXPECT_EQ(p.manager->stats().host_bytes_used, 0);

  // Whole, the same calls end it with a part per layer.
  ASSERT_TRUE(p.manager->AllocatePages(engine::PageGroup::kLower, needed, pages.lower));
  ASSERT_TRUE(p.manager->ExportByLayer(5, tokens, pages));
  ASSERT_TRUE(p.manager->LayerKvWritten(0).ok());
  ASSERT_TRUE(p.manager->LayerKvWritten(1).ok());
  ASSERT_TRUE(p.manager->FinishLayerExports().ok());
  ASSERT_TRUE(p.manager->ExportKv(5, tokens, pages, /*final=*/true).ok());
  ASSERT_TRUE(p.manager->Poll().ok());
  ASSERT_EQ(p.exports.size(), 3u);
  EXPECT_EQ(p.exports[0].blocks.size(), static_cast<size_t>(needed));
  EXPECT_EQ(p.exports[1].blocks[0].first_layer, 1);
  EXPECT_TRUE(p.exports[2].final);
  p.manager->ReleaseExport(5);
  p.exports.clear();
  ASSERT_TRUE(p.manager->FreePages(engine::PageGroup::kLower, pages.lower).ok());
  ExpectNothingLeft(p);
  EXPECT_EQ(p.manager->stats().host_bytes_used, 0);
}

TEST(DisaggregatedKvTest, APrefillCancelledMidPromptDropsWhatItExported) {
  Worker p(0);
  engine::GenerationRequest r = Request(1, 200, 1);
  r.export_kv = 9;
  ASSERT_TRUE(p.batcher->Add(r).ok());
  ASSERT_TRUE(p.batcher->Step().ok());  // the first chunk: 96 of 200 tokens
  ASSERT_TRUE(p.manager->Poll().ok());
  ASSERT_EQ(p.exports.size(), 1u) << "its first pages left before the rest was computed";
  EXPECT_EQ(p.exports[0].blocks.size(), 96u / 8);
  EXPECT_FALSE(p.exports[0].final);
  EXPECT_EQ(p.manager->stats().exports_held, 1);
  p.batcher->Cancel(1);
  p.RunToEnd();
  ExpectNothingLeft(p);
}

TEST(DisaggregatedKvTest, ARefusedRequestDropsItsTransfer) {
  Worker d(64);
  ASSERT_TRUE(d.manager->landing_area()->Reserve(4, 2, absl::Now() + absl::Hours(1)).ok());
  engine::GenerationRequest r = Request(1, 10, 0);  // max_tokens 0: refused
  r.generated = {{17, -1.0f}};
  r.import_kv = 4;
  EXPECT_FALSE(d.batcher->Add(r).ok());
  EXPECT_FALSE(d.manager->landing_area()->Holds(4));
  ExpectNothingLeft(d);
}

TEST_F(LandingAreaTest, ATransferIsReadyOnlyOnceItsSenderIsDoneAndThenHasNoLease) {
  const absl::Time soon = absl::Now() + absl::Milliseconds(1);
  ASSERT_TRUE(area_.Reserve(1, 2, soon).ok());
  EXPECT_EQ(area_.Ready(1).value_or(true), false) << "its sender still sends";
  ASSERT_TRUE(area_.SenderDone(1));
  EXPECT_EQ(area_.Ready(1).value_or(false), true);
  EXPECT_EQ(area_.Expire(soon + absl::Hours(1)), 0);
  EXPECT_TRUE(area_.Holds(1));
  area_.Drop(1);
  EXPECT_FALSE(area_.SenderDone(1));
  EXPECT_TRUE(absl::IsNotFound(area_.Ready(1).status()));
  EXPECT_EQ(area_.num_free(), 8);
}

TEST_F(LandingAreaTest, ASenderThatFailedMakesItsTransferAbortedAndDropsIt) {
  ASSERT_TRUE(area_.Reserve(1, 2, absl::Now() + absl::Hours(1)).ok());
  auto where = area_.Place(1, 0, 2, static_cast<size_t>(area_.record_bytes()));
  ASSERT_TRUE(where.ok()) << where.status();
  ASSERT_TRUE(area_.SenderFailed(1, absl::UnavailableError("peer went away")));
  // A block still being written keeps its record until it lands.
  const absl::Status ready = area_.Ready(1).status();
  EXPECT_TRUE(absl::IsAborted(ready)) << ready;
  EXPECT_THAT(ready.message(), HasSubstr("its sender failed: UNAVAILABLE: peer went away"));
  EXPECT_FALSE(area_.Holds(1));
  EXPECT_LT(area_.num_free(), 8);
  area_.Landed(1, 0, 0, absl::CancelledError("late"));
  EXPECT_EQ(area_.num_free(), 8);
  EXPECT_EQ(area_.num_transfers(), 0);
}

TEST(DisaggregatedKvTest, AnExportWithNoRoomFailsItsRequestAndFreesItsPages) {
  auto model = LoadGolden("llama_gqa", SmallCache(80));
  auto manager = KvBlockManager::Create(model.get(), {.host_bytes = 0});
  ASSERT_TRUE(manager.ok());
  engine::Batcher batcher(model.get(), nullptr, {}, manager->get());
  engine::GenerationRequest r = Request(1, 30, 1);
  r.export_kv = 3;
  ASSERT_TRUE(batcher.Add(r).ok());
  std::vector<engine::TokenEvent> events;
  while (batcher.HasWork()) {
    auto out = batcher.Step();
    ASSERT_TRUE(out.ok());
    events.insert(events.end(), out->begin(), out->end());
  }
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].finish, engine::FinishReason::kError);
  EXPECT_THAT(events[0].error, HasSubstr("its KV was not exported"));
  EXPECT_TRUE((*manager)->Idle());
}

}  // namespace
}  // namespace strata::kvtier

// WorkerRegistry on a fake clock: validation, expiry and restarts, and how
// prefill and decode workers are picked.
#include "router/worker_registry.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/router/worker_test_util.h"

namespace strata::router {
namespace {

using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;
using ::testing::AllOf;
using ::testing::HasSubstr;
using Source = WorkerRegistry::Source;

constexpr int64_t kGiB = int64_t{1} << 30;

WorkerInfo Info(const std::string& id, internal::v1::WorkerRole role, const std::string& address,
                std::vector<std::string> profiles = {"default"}) {
  return testing_util::TestWorkerInfo(id, role, address, profiles);
}

WorkerInfo Prefill(const std::string& id, const std::string& address,
                   std::vector<std::string> profiles = {"default"}) {
  return Info(id, internal::v1::WORKER_ROLE_PREFILL, address, std::move(profiles));
}

WorkerInfo Decode(const std::string& id, const std::string& address,
                  std::vector<std::string> profiles = {"default"}) {
  return Info(id, internal::v1::WORKER_ROLE_DECODE, address, std::move(profiles));
}

WorkerLoad PrefillLoad(int64_t queued) {
  WorkerLoad load;
  load.set_queued_prefill_tokens(queued);
  return load;
}

// A decode worker with `gpu_free` of 10 GiB of GPU KV free and no host tier.
WorkerLoad DecodeLoad(int running, int waiting, int64_t gpu_free = 10 * kGiB) {
  WorkerLoad load;
  load.set_running_sequences(running);
  load.set_waiting_sequences(waiting);
  load.set_gpu_kv_total_bytes(10 * kGiB);
  load.set_gpu_kv_free_bytes(gpu_free);
  return load;
}

class WorkerRegistryTest : public ::testing::Test {
 protected:
  WorkerRegistryTest() : registry_(Options()) {}

  WorkerRegistryOptions Options() {
    WorkerRegistryOptions options;
    options.model = "tiny";
    options.kv_format = "bf16";
    options.expiry = absl::Seconds(2);
    options.clock = [this] { return now_; };
    return options;
  }

  void Advance(absl::Duration d) { now_ += d; }

  std::string PickPrefillId(const std::string& profile = "default") {
    auto picked = registry_.PickPrefill(profile);
    EXPECT_TRUE(picked.ok()) << picked.status();
    return picked.ok() ? picked->worker_id : "";
  }

  std::string PickDecodeId(int64_t kv_bytes = 0, const std::string& profile = "default") {
    auto picked = registry_.PickDecode(profile, kv_bytes);
    EXPECT_TRUE(picked.ok()) << picked.status();
    return picked.ok() ? picked->worker_id : "";
  }

  absl::Time now_ = absl::FromUnixSeconds(1000000);
  WorkerRegistry registry_;
};

TEST_F(WorkerRegistryTest, EmptyRegistryIsUnavailable) {
  auto p = registry_.PickPrefill("default");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(p.status().message(), HasSubstr("no prefill worker is registered"));
  auto d = registry_.PickDecode("default", 0);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(d.status().message(), HasSubstr("no decode worker is registered"));
}

TEST_F(WorkerRegistryTest, PickReturnsTheWorkersAddresses) {
  ASSERT_TRUE(
      registry_.Update(Prefill("p1", "10.0.0.1:7000"), PrefillLoad(0), Source::kHeartbeat).ok());
  auto picked = registry_.PickPrefill("default");
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->worker_id, "p1");
  EXPECT_EQ(picked->grpc_address, "10.0.0.1:7000");
  EXPECT_EQ(picked->kv_address, "kv-p1");
  // A prefill worker is not a decode worker.
  EXPECT_EQ(registry_.PickDecode("default", 0).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(WorkerRegistryTest, WorkerExpiresAfterTwoSecondsAndIsDroppedLater) {
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(0), Source::kHeartbeat).ok());
  Advance(absl::Milliseconds(1999));
  EXPECT_EQ(PickPrefillId(), "p1");
  Advance(absl::Milliseconds(1));
  auto picked = registry_.PickPrefill("default");
  EXPECT_EQ(picked.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(picked.status().message(),
              AllOf(HasSubstr("no prefill worker is schedulable"), HasSubstr("1 registered"),
                    HasSubstr("1 not heard from within 2s")));
  auto snapshot = registry_.Snapshot();
  ASSERT_EQ(snapshot.size(), 1u);
  EXPECT_FALSE(snapshot[0].live);
  EXPECT_FALSE(snapshot[0].schedulable);
  EXPECT_EQ(snapshot[0].age, absl::Seconds(2));

  // A heartbeat brings it back.
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(0), Source::kHeartbeat).ok());
  EXPECT_EQ(PickPrefillId(), "p1");

  // Silent for 10 expiries: forgotten and counted.
  Advance(absl::Seconds(20));
  EXPECT_EQ(registry_.PickPrefill("default").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(registry_.Snapshot().empty());
  EXPECT_EQ(registry_.dropped_workers(), 1);
  EXPECT_THAT(registry_.PickPrefill("default").status().message(), HasSubstr("registered"));
}

TEST_F(WorkerRegistryTest, NewIdAtSameAddressReplacesTheOldWorker) {
  ASSERT_TRUE(registry_.Update(Decode("d-old", "h:1"), DecodeLoad(0, 0), Source::kHeartbeat).ok());
  ASSERT_TRUE(
      registry_.Update(Decode("d-other", "h:2"), DecodeLoad(5, 0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Decode("d-new", "h:1"), DecodeLoad(9, 0), Source::kHeartbeat).ok());
  auto snapshot = registry_.Snapshot();
  ASSERT_EQ(snapshot.size(), 2u);
  EXPECT_EQ(snapshot[0].worker_id, "d-new");
  EXPECT_EQ(snapshot[1].worker_id, "d-other");
  EXPECT_EQ(registry_.replaced_workers(), 1);
  // d-old (idle) is gone: d-other (5 running) beats d-new (9 running).
  EXPECT_EQ(PickDecodeId(), "d-other");
}

TEST_F(WorkerRegistryTest, DrainingWorkerIsNotSchedulable) {
  WorkerLoad draining = PrefillLoad(0);
  draining.set_draining(true);
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), draining, Source::kHeartbeat).ok());
  auto picked = registry_.PickPrefill("default");
  EXPECT_EQ(picked.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(picked.status().message(), HasSubstr("1 draining"));
  ASSERT_TRUE(registry_.Update(Prefill("p2", "h:2"), PrefillLoad(100000), Source::kHeartbeat).ok());
  EXPECT_EQ(PickPrefillId(), "p2");  // busy, but not draining
  auto snapshot = registry_.Snapshot();
  ASSERT_EQ(snapshot.size(), 2u);
  EXPECT_TRUE(snapshot[0].live);
  EXPECT_FALSE(snapshot[0].schedulable);
}

TEST_F(WorkerRegistryTest, ValidationErrorsNameTheField) {
  struct Case {
    std::string name;
    std::function<void(WorkerInfo*, WorkerLoad*)> mutate;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"worker_id", [](WorkerInfo* i, WorkerLoad*) { i->clear_worker_id(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.worker_id is empty"},
      {"role", [](WorkerInfo* i, WorkerLoad*) { i->clear_role(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.role is unspecified"},
      {"role_unknown",
       [](WorkerInfo* i, WorkerLoad*) { i->set_role(static_cast<internal::v1::WorkerRole>(7)); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.role 7"},
      {"address_empty", [](WorkerInfo* i, WorkerLoad*) { i->clear_grpc_address(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.grpc_address is empty"},
      {"address_no_port", [](WorkerInfo* i, WorkerLoad*) { i->set_grpc_address("host"); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.grpc_address 'host' is not host:port"},
      {"address_bad_port", [](WorkerInfo* i, WorkerLoad*) { i->set_grpc_address("host:99999"); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.grpc_address 'host:99999'"},
      {"address_port_zero", [](WorkerInfo* i, WorkerLoad*) { i->set_grpc_address("host:0"); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.grpc_address 'host:0'"},
      {"address_no_host", [](WorkerInfo* i, WorkerLoad*) { i->set_grpc_address(":80"); },
       absl::StatusCode::kInvalidArgument, "the host is empty"},
      {"address_v6_brackets", [](WorkerInfo* i, WorkerLoad*) { i->set_grpc_address("::1:80"); },
       absl::StatusCode::kInvalidArgument, "brackets"},
      {"kv_address", [](WorkerInfo* i, WorkerLoad*) { i->clear_kv_address(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.kv_address is empty"},
      {"model_empty", [](WorkerInfo* i, WorkerLoad*) { i->clear_model(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.model is empty"},
      {"profiles", [](WorkerInfo* i, WorkerLoad*) { i->clear_profiles(); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.profiles is empty"},
      {"profile_empty", [](WorkerInfo* i, WorkerLoad*) { i->add_profiles(""); },
       absl::StatusCode::kInvalidArgument, "WorkerInfo.profiles[1] is empty"},
      {"model_mismatch", [](WorkerInfo* i, WorkerLoad*) { i->set_model("huge"); },
       absl::StatusCode::kFailedPrecondition, "serves model 'huge' but this router serves 'tiny'"},
      {"kv_format_mismatch", [](WorkerInfo* i, WorkerLoad*) { i->set_kv_format("fp8"); },
       absl::StatusCode::kFailedPrecondition, "KV format 'fp8' but this router expects 'bf16'"},
      {"queued", [](WorkerInfo*, WorkerLoad* l) { l->set_queued_prefill_tokens(-1); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.queued_prefill_tokens is negative (-1)"},
      {"running", [](WorkerInfo*, WorkerLoad* l) { l->set_running_sequences(-2); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.running_sequences is negative"},
      {"prefix_capacity", [](WorkerInfo*, WorkerLoad* l) { l->set_prefix_capacity_tokens(-16); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.prefix_capacity_tokens is negative"},
      {"waiting", [](WorkerInfo*, WorkerLoad* l) { l->set_waiting_sequences(-3); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.waiting_sequences is negative"},
      {"gpu_free_negative", [](WorkerInfo*, WorkerLoad* l) { l->set_gpu_kv_free_bytes(-1); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.gpu_kv_free_bytes is negative"},
      {"gpu_free_over_total",
       [](WorkerInfo*, WorkerLoad* l) {
         l->set_gpu_kv_total_bytes(10);
         l->set_gpu_kv_free_bytes(11);
       },
       absl::StatusCode::kInvalidArgument,
       "WorkerLoad.gpu_kv_free_bytes (11) exceeds gpu_kv_total_bytes (10)"},
      {"host_free_over_total", [](WorkerInfo*, WorkerLoad* l) { l->set_host_kv_free_bytes(1); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.host_kv_free_bytes (1) exceeds"},
      {"ssd_total_negative", [](WorkerInfo*, WorkerLoad* l) { l->set_ssd_kv_total_bytes(-5); },
       absl::StatusCode::kInvalidArgument, "WorkerLoad.ssd_kv_total_bytes is negative"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    WorkerInfo info = Decode("d1", "h:1");
    WorkerLoad load = DecodeLoad(0, 0);
    c.mutate(&info, &load);
    absl::Status s = registry_.Update(info, load, Source::kHeartbeat);
    EXPECT_EQ(s.code(), c.code) << s;
    EXPECT_THAT(s.message(), HasSubstr(c.message));
  }
  // Nothing refused was recorded.
  EXPECT_TRUE(registry_.Snapshot().empty());
  // The valid forms of an address.
  for (const std::string address : {"h:1", "10.1.2.3:65535", "[::1]:50051", "pod-3.svc.local:80"}) {
    EXPECT_TRUE(registry_.Validate(Decode("d1", address), DecodeLoad(0, 0)).ok()) << address;
  }
}

TEST_F(WorkerRegistryTest, EmptyExpectationsAcceptAnyModel) {
  WorkerRegistryOptions options = Options();
  options.model.clear();
  options.kv_format.clear();
  WorkerRegistry any(options);
  WorkerInfo info = Decode("d1", "h:1");
  info.set_model("other");
  info.set_kv_format("fp8");
  EXPECT_TRUE(any.Update(info, DecodeLoad(0, 0), Source::kDiscovered).ok());
  auto snapshot = any.Snapshot();
  ASSERT_EQ(snapshot.size(), 1u);
  EXPECT_EQ(snapshot[0].source, Source::kDiscovered);
}

TEST_F(WorkerRegistryTest, APrefillWorkerIsPickedOnlyForADecodeWorkerOfItsKvFormat) {
  // A router that accepts any format (workers of two tensor-parallel sizes
  // behind it): a prompt's KV crosses only between workers of one format.
  WorkerRegistryOptions options = Options();
  options.kv_format.clear();
  WorkerRegistry mixed(options);
  WorkerInfo tp1 = Prefill("p1", "h:1"), tp2 = Prefill("p2", "h:2");
  tp1.set_kv_format("bf16/heads8");
  tp2.set_kv_format("bf16/heads4/tp2");
  ASSERT_TRUE(mixed.Update(tp1, PrefillLoad(0), Source::kHeartbeat).ok());
  ASSERT_TRUE(mixed.Update(tp2, PrefillLoad(9000), Source::kHeartbeat).ok());
  auto picked = mixed.PickPrefill("default", "bf16/heads4/tp2");
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->worker_id, "p2") << "the busier one, of the decode worker's format";
  EXPECT_EQ(picked->kv_format, "bf16/heads4/tp2");
  EXPECT_EQ(mixed.PickPrefill("default")->worker_id, "p1") << "any format: the least queued";
  const absl::Status none = mixed.PickPrefill("default", "bf16/heads2/tp4").status();
  EXPECT_TRUE(absl::IsNotFound(none)) << none;
  EXPECT_THAT(none.message(), AllOf(HasSubstr("no prefill worker has KV format 'bf16/heads2/tp4'"),
                                    HasSubstr("'bf16/heads4/tp2', 'bf16/heads8'")));
}

TEST_F(WorkerRegistryTest, PrefillPicksLeastQueuedTokens) {
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(5000), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Prefill("p2", "h:2"), PrefillLoad(100), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Prefill("p3", "h:3"), PrefillLoad(3000), Source::kHeartbeat).ok());
  EXPECT_EQ(PickPrefillId(), "p2");
  EXPECT_EQ(PickPrefillId(), "p2");  // without NoteAssigned nothing changes
}

TEST_F(WorkerRegistryTest, NoteAssignedSpreadsABurstUntilTheNextHeartbeat) {
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Prefill("p2", "h:2"), PrefillLoad(1000), Source::kHeartbeat).ok());
  // A burst of 2000-token prompts between two heartbeats.
  std::vector<std::string> picks;
  for (int i = 0; i < 4; ++i) {
    std::string id = PickPrefillId();
    registry_.NoteAssigned(id, 2000);
    picks.push_back(id);
  }
  // p1: 0 -> 2000; p2: 1000 -> 3000; p1: 2000 -> 4000; p2: 3000 -> 5000.
  EXPECT_THAT(picks, ::testing::ElementsAre("p1", "p2", "p1", "p2"));
  auto snapshot = registry_.Snapshot();
  EXPECT_EQ(snapshot[0].pending_prefill_tokens, 4000);
  // p1's heartbeat reports its queue (the router's assignments included):
  // the pending count starts again from it.
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(500), Source::kHeartbeat).ok());
  EXPECT_EQ(registry_.Snapshot()[0].pending_prefill_tokens, 0);
  EXPECT_EQ(PickPrefillId(), "p1");     // 500 < 1000 + 4000
  registry_.NoteAssigned("gone", 100);  // an unknown id is ignored
}

TEST_F(WorkerRegistryTest, TiesGoRoundRobin) {
  ASSERT_TRUE(registry_.Update(Prefill("p1", "h:1"), PrefillLoad(0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Prefill("p2", "h:2"), PrefillLoad(0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Prefill("p3", "h:3"), PrefillLoad(7), Source::kHeartbeat).ok());
  std::vector<std::string> picks;
  for (int i = 0; i < 4; ++i) picks.push_back(PickPrefillId());
  EXPECT_THAT(picks, ::testing::ElementsAre("p1", "p2", "p1", "p2"));
}

TEST_F(WorkerRegistryTest, ProfileFiltering) {
  ASSERT_TRUE(
      registry_.Update(Prefill("p1", "h:1", {"chat"}), PrefillLoad(0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_
                  .Update(Prefill("p2", "h:2", {"chat", "long-context"}), PrefillLoad(900),
                          Source::kHeartbeat)
                  .ok());
  ASSERT_TRUE(
      registry_.Update(Decode("d1", "h:3", {"chat"}), DecodeLoad(0, 0), Source::kHeartbeat).ok());
  EXPECT_EQ(PickPrefillId("chat"), "p1");
  EXPECT_EQ(PickPrefillId("long-context"), "p2");
  auto none = registry_.PickPrefill("code");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), AllOf(HasSubstr("no prefill worker serves profile 'code'"),
                                             HasSubstr("chat, long-context")));
  EXPECT_EQ(registry_.PickDecode("long-context", 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(PickDecodeId(0, "chat"), "d1");
}

TEST_F(WorkerRegistryTest, DecodePicksLowestScore) {
  // Same sequences; d2's KV is fuller.
  ASSERT_TRUE(
      registry_.Update(Decode("d1", "h:1"), DecodeLoad(4, 0, 8 * kGiB), Source::kHeartbeat).ok());
  ASSERT_TRUE(
      registry_.Update(Decode("d2", "h:2"), DecodeLoad(4, 0, 2 * kGiB), Source::kHeartbeat).ok());
  EXPECT_EQ(PickDecodeId(), "d1");
  // A waiting sequence weighs more than a running one.
  ASSERT_TRUE(
      registry_.Update(Decode("d1", "h:1"), DecodeLoad(5, 2, 8 * kGiB), Source::kHeartbeat).ok());
  ASSERT_TRUE(
      registry_.Update(Decode("d2", "h:2"), DecodeLoad(8, 0, 8 * kGiB), Source::kHeartbeat).ok());
  // d1: 5 + 2*2 + 8*0.2 = 10.6; d2: 8 + 1.6 = 9.6.
  EXPECT_DOUBLE_EQ(WorkerRegistry::DecodeScore(DecodeLoad(5, 2, 8 * kGiB), 0, 0), 10.6);
  EXPECT_EQ(PickDecodeId(), "d2");
}

TEST_F(WorkerRegistryTest, DecodeBurstSpreadsWithNoteAssigned) {
  ASSERT_TRUE(registry_.Update(Decode("d1", "h:1"), DecodeLoad(0, 0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Decode("d2", "h:2"), DecodeLoad(1, 0), Source::kHeartbeat).ok());
  std::vector<std::string> picks;
  for (int i = 0; i < 4; ++i) {
    std::string id = PickDecodeId(kGiB / 4);
    registry_.NoteAssigned(id, 1000, kGiB / 4);
    picks.push_back(id);
  }
  EXPECT_THAT(picks, ::testing::ElementsAre("d1", "d2", "d1", "d2"));
  auto snapshot = registry_.Snapshot();
  EXPECT_EQ(snapshot[0].pending_sequences, 2);
  EXPECT_EQ(snapshot[0].pending_kv_bytes, kGiB / 2);
}

TEST_F(WorkerRegistryTest, DecodeCapacityFiltering) {
  WorkerLoad host_tier = DecodeLoad(0, 0, kGiB);  // idle, 1 GiB GPU free...
  host_tier.set_host_kv_total_bytes(4 * kGiB);    // ...and 2 GiB host free
  host_tier.set_host_kv_free_bytes(2 * kGiB);
  ASSERT_TRUE(registry_.Update(Decode("d1", "h:1"), host_tier, Source::kHeartbeat).ok());
  ASSERT_TRUE(
      registry_.Update(Decode("d2", "h:2"), DecodeLoad(30, 0, 5 * kGiB), Source::kHeartbeat).ok());
  EXPECT_EQ(PickDecodeId(kGiB), "d1");          // idle, and room enough
  EXPECT_EQ(PickDecodeId(3 * kGiB), "d1");      // GPU and host together
  EXPECT_EQ(PickDecodeId(3 * kGiB + 1), "d2");  // only the busy one has room
  // No room now: a request may wait for some.
  auto none = registry_.PickDecode("default", 6 * kGiB);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(none.status().message(), AllOf(HasSubstr("has room for 6442450944 tokens of KV"),
                                             HasSubstr("5368709120 tokens on d2")));
  // What the router sent since counts against the room.
  registry_.NoteAssigned("d2", 0, 4 * kGiB);
  EXPECT_EQ(registry_.PickDecode("default", 3 * kGiB + 1).status().code(),
            absl::StatusCode::kResourceExhausted);
  // More than any worker holds even empty (d1: 10 GiB GPU and 4 GiB host):
  // waiting would not help.
  auto never = registry_.PickDecode("default", 14 * kGiB + 1);
  EXPECT_EQ(never.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(never.status().message(), AllOf(HasSubstr("can ever hold 15032385537 tokens"),
                                              HasSubstr("15032385536 tokens on d1")));
  EXPECT_EQ(registry_.PickDecode("default", -1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(WorkerRegistryTest, ATokenOfKvIsCountedInEachWorkersOwnBytes) {
  // The same free bytes hold twice the tokens on a worker whose cache
  // takes half the bytes a token (fp8 against bf16).
  WorkerInfo bf16 = Decode("d1", "h:1"), fp8 = Decode("d2", "h:2");
  bf16.set_kv_bytes_per_token(1024);
  fp8.set_kv_bytes_per_token(512);
  ASSERT_TRUE(registry_.Update(bf16, DecodeLoad(0, 0, kGiB), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(fp8, DecodeLoad(5, 0, kGiB), Source::kHeartbeat).ok());
  EXPECT_EQ(PickDecodeId(kGiB / 1024), "d1");  // the idler one, room enough
  EXPECT_EQ(PickDecodeId(kGiB / 1024 + 1), "d2");
  EXPECT_EQ(PickDecodeId(kGiB / 512), "d2");
  auto none = registry_.PickDecode("default", kGiB / 512 + 1);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(none.status().message(), HasSubstr("the most free: 2097152 tokens on d2"));
  // What was sent since counts in the worker's own bytes.
  registry_.NoteAssigned("d2", 0, kGiB / 1024);
  EXPECT_EQ(registry_.Snapshot()[1].pending_kv_bytes, kGiB / 2);
  // A negative size is refused.
  fp8.set_kv_bytes_per_token(-1);
  EXPECT_THAT(registry_.Update(fp8, DecodeLoad(0, 0), Source::kHeartbeat).message(),
              HasSubstr("WorkerInfo.kv_bytes_per_token is negative"));
}

TEST_F(WorkerRegistryTest, DecodeExcludesWorkersById) {
  ASSERT_TRUE(registry_.Update(Decode("d1", "h:1"), DecodeLoad(0, 0), Source::kHeartbeat).ok());
  ASSERT_TRUE(registry_.Update(Decode("d2", "h:2"), DecodeLoad(5, 0), Source::kHeartbeat).ok());
  EXPECT_EQ(PickDecodeId(), "d1");
  // The idlest one excluded, the other is picked however loaded.
  auto picked = registry_.PickDecode("default", 0, {"d1"});
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->worker_id, "d2");
  // Unknown ids change nothing.
  picked = registry_.PickDecode("default", 0, {"gone"});
  ASSERT_TRUE(picked.ok()) << picked.status();
  EXPECT_EQ(picked->worker_id, "d1");
  auto none = registry_.PickDecode("default", 0, {"d2", "d1"});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), AllOf(HasSubstr("d1"), HasSubstr("d2")));
  // Capacity still applies to the workers left.
  EXPECT_EQ(registry_.PickDecode("default", 11 * kGiB, {"d1"}).status().code(),
            absl::StatusCode::kOutOfRange);
  registry_.NoteAssigned("d2", 0, 5 * kGiB);
  EXPECT_EQ(registry_.PickDecode("default", 6 * kGiB, {"d1"}).status().code(),
            absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace strata::router

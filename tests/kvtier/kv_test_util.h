// Inputs and helpers the KV-tier tests share: random prompts, the small
// ClusterKV configuration that clusters llama_gqa's short prompts (a few
// dozen clusters, a budget well below the context), serving one request
// to its end, and delivering a prefill worker's exported KV into a decode
// worker's landing area as the transport does.
#ifndef STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_
#define STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "engine/batcher.h"
#include "gtest/gtest.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/kv_wire.h"
#include "kvtier/landing_area.h"

namespace strata::testing_util {

// `len` token ids in [3, 503), the same for the same seed.
inline std::vector<int32_t> RandomPrompt(int len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 500) + 3;
  return p;
}

// ClusterKV over 8-token clusters, a 24-token budget, 4 sinks, a 16-token
// window and the first layer dense.
inline kvtier::KvPolicyConfig SmallClusterKv() {
  kvtier::KvPolicyConfig c;
  c.type = "clusterkv";
  c.budget_tokens = 24;
  c.sink_tokens = 4;
  c.window_tokens = 16;
  c.tokens_per_cluster = 8;
  c.full_layers = 1;
  return c;
}

inline std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A request served alone: its tokens, and how many of its prompt's tokens
// came from a stored prefix.
struct Served {
  std::vector<int32_t> tokens;
  int cached = 0;
};

inline Served Serve(engine::Batcher& batcher, const engine::GenerationRequest& r) {
  EXPECT_TRUE(batcher.Add(r).ok());
  Served out;
  for (int step = 0; batcher.HasWork() && step < 10000; ++step) {
    auto events = batcher.Step();
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) break;
    for (const auto& e : *events) {
      out.tokens.push_back(e.token_id);
      if (e.finish != engine::FinishReason::kNone) out.cached = e.cached_tokens;
    }
  }
  return out;
}

// What the transport does with a prefill worker's exports (its parts, in
// order, the last one final): each block with a header in the sender's
// wire format, parsed against the receiver's (an error of ParseKvBlock
// Header is returned, as the receiver would refuse it), placed in the
// receiver's landing area under `transfer_id` and landed, and the sender
// then done (LandingArea::SenderDone, unless `sender_done` is false);
// `corrupt` flips a payload byte of that block on the way.
inline absl::Status Deliver(const std::vector<kvtier::KvBlockManager::ExportedKv>& exports,
                            const kvtier::KvLayout& sender, kvtier::KvBlockManager& receiver,
                            uint64_t transfer_id, int corrupt = -1, int corrupt_state = -1,
                            bool sender_done = true) {
  if (exports.empty() || !exports.back().final) {
    return absl::FailedPreconditionError("no complete export to deliver");
  }
  // Pages, each whole or in parts of its layers (the same pages again, the
  // next layers).
  int total = 0;
  for (const auto& part : exports) {
    total = std::max(total, part.first_block + static_cast<int>(part.blocks.size()));
  }
  const kvtier::KvWireFormat format = kvtier::KvWireFormat::Of(receiver.layout());
  std::set<int> corrupted;
  for (const kvtier::KvBlockManager::ExportedKv& e : exports) {
    for (size_t i = 0; i < e.blocks.size(); ++i) {
      const int index = e.first_block + static_cast<int>(i);
      kvtier::KvBlockHeader h;
      h.transfer_id = transfer_id;
      h.index = static_cast<uint32_t>(index);
      h.count = static_cast<uint32_t>(total);
      h.tokens = static_cast<uint32_t>(e.blocks[i].tokens);
      h.codec = e.blocks[i].codec;
      h.format = kvtier::KvWireFormat::Of(sender);
      h.payload_crc = e.blocks[i].crc;
      h.payload_bytes = e.blocks[i].data.size();
      h.first_layer = e.blocks[i].first_layer;
      h.part_layers = e.blocks[i].part_layers;
      EXPECT_EQ(kvtier::KvPayloadCrc(e.blocks[i].data), h.payload_crc);
      absl::StatusOr<kvtier::KvBlockHeader> parsed =
          kvtier::ParseKvBlockHeader(kvtier::EncodeKvBlockHeader(h), format);
      if (!parsed.ok()) return parsed.status();
      kvtier::LandingArea& area = *receiver.landing_area();
      auto where =
          parsed->is_part()
              ? area.PlacePart(parsed->transfer_id, parsed->index, parsed->count,
                               parsed->first_layer, parsed->part_layers, format.layers,
                               format.layer_bytes(parsed->codec, static_cast<int>(parsed->tokens)),
                               parsed->codec, static_cast<int>(parsed->tokens))
              : area.Place(parsed->transfer_id, parsed->index, parsed->count, parsed->payload_bytes,
                           parsed->codec, static_cast<int>(parsed->tokens));
      if (!where.ok()) return where.status();
      if (where->size() != e.blocks[i].data.size()) return absl::InternalError("sizes differ");
      std::memcpy(where->data(), e.blocks[i].data.data(), where->size());
      // The first message of block `corrupt` (its first part, or it whole).
      if (index == corrupt && corrupted.insert(index).second) {
        (*where)[where->size() / 2] ^= std::byte{1};
      }
      if (parsed->is_part()) {
        area.PartLanded(parsed->transfer_id, parsed->index, parsed->first_layer,
                        parsed->part_layers, parsed->payload_crc, absl::OkStatus());
      } else {
        area.Landed(parsed->transfer_id, parsed->index, parsed->payload_crc, absl::OkStatus());
      }
    }
  }
  // Then the planner state of the final part, as the prefill worker sends it.
  const auto& state = exports.back().planner_state;
  for (size_t i = 0; i < state.size(); ++i) {
    kvtier::KvBlockHeader h;
    h.kind = kvtier::KvBlockHeader::Kind::kPlannerState;
    h.transfer_id = transfer_id;
    h.index = static_cast<uint32_t>(i);
    h.count = static_cast<uint32_t>(state.size());
    h.format = kvtier::KvWireFormat::Of(sender);
    h.payload_crc = kvtier::KvPayloadCrc(state[i]);
    h.payload_bytes = state[i].size();
    absl::StatusOr<kvtier::KvBlockHeader> parsed =
        kvtier::ParseKvBlockHeader(kvtier::EncodeKvBlockHeader(h), format);
    if (!parsed.ok()) return parsed.status();
    auto where = receiver.landing_area()->PlaceState(parsed->transfer_id, parsed->index,
                                                     parsed->count, parsed->payload_bytes);
    if (!where.ok()) return where.status();
    std::memcpy(where->data(), state[i].data(), where->size());
    if (static_cast<int>(i) == corrupt_state) (*where)[where->size() / 3] ^= std::byte{4};
    receiver.landing_area()->StateLanded(parsed->transfer_id, parsed->index, parsed->payload_crc,
                                         absl::OkStatus());
  }
  // And the sender's word that it is done, as its Prefill answer brings it.
  if (sender_done) receiver.landing_area()->SenderDone(transfer_id);
  return absl::OkStatus();
}

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_KVTIER_KV_TEST_UTIL_H_

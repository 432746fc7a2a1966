#include "engine/cpu_kv_tiering.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace strata::engine::cpu_tiering {
namespace {

absl::Status Bad(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cpu ", op, ": ", what));
}

// The caches are [pages, page_size, Hkv, D] of kF32 or kF8E4M3.
struct CacheView {
  const Tensor& cache;
  int64_t hkv, d;
  size_t elem;
  uint8_t* row(int64_t slot, int h) const {
    return static_cast<uint8_t*>(cache.data()) + ((slot * hkv + h) * d) * elem;
  }
};

absl::Status CheckCaches(const char* op, const Tensor& k, const Tensor& v) {
  if (!k.defined() || k.rank() != 4 || k.shape() != v.shape() || k.dtype() != v.dtype() ||
      (k.dtype() != DType::kF32 && k.dtype() != DType::kF8E4M3)) {
    return Bad(op, "caches must be F32 or F8_E4M3 [pages, page_size, Hkv, D], alike");
  }
  return absl::OkStatus();
}

int64_t SlotOf(const int32_t* table, int page_size, int64_t index) {
  return int64_t{table[index / page_size]} * page_size + index % page_size;
}

}  // namespace

absl::Status OffloadBlocks(const Tensor& k_cache, const Tensor& v_cache, const SequenceRange& range,
                           const Tensor& extents, int first_block, int num_blocks, int block_stride,
                           KvCodecKind codec_kind, const HostBuffer& host, int64_t region_unit,
                           int64_t units_per_head, TierTables& t) {
  constexpr char kOp[] = "OffloadBlocks";
  STRATA_RETURN_IF_ERROR(CheckCaches(kOp, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(ValidateOffloadBlocks("cpu OffloadBlocks", k_cache, extents, first_block,
                                               num_blocks, block_stride, host, region_unit,
                                               units_per_head, t));
  const int64_t hkv = k_cache.dim(2), d = k_cache.dim(3);
  const int64_t max_blocks = extents.dim(1), max_pieces = t.piece_host.dim(1);
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<KvCodec> codec, KvCodec::Create(codec_kind));
  const CacheView k{k_cache, hkv, d, DTypeSize(k_cache.dtype())};
  const CacheView v{v_cache, hkv, d, DTypeSize(v_cache.dtype())};
  const int32_t* table = range.block_table.data_as<int32_t>();
  const int32_t* ext = extents.data_as<int32_t>();
  int32_t* base = t.piece_base.data_as<int32_t>();
  int32_t* where = t.piece_host.data_as<int32_t>();
  int32_t* count = t.piece_count.data_as<int32_t>();
  std::vector<uint8_t> k_rows(kKvPieceTokens * d * k.elem), v_rows(k_rows.size());
  for (int64_t h = 0; h < hkv; ++h) {
    int64_t unit = region_unit + h * units_per_head;
    const int64_t end = unit + units_per_head;
    int32_t pieces = count[h];
    for (int b = first_block; b < first_block + num_blocks; b += block_stride) {
      const int32_t first = ext[(h * max_blocks + b) * 2], size = ext[(h * max_blocks + b) * 2 + 1];
      base[h * max_blocks + b] = pieces;
      for (int32_t off = 0; off < size; off += kKvPieceTokens) {
        const int n = std::min<int>(kKvPieceTokens, size - off);
        for (int j = 0; j < n; ++j) {
          const int64_t slot = SlotOf(table, range.page_size, first + off + j);
          std::memcpy(&k_rows[j * d * k.elem], k.row(slot, static_cast<int>(h)), d * k.elem);
          std::memcpy(&v_rows[j * d * v.elem], v.row(slot, static_cast<int>(h)), d * v.elem);
        }
        const size_t bytes = codec->EncodedBytes(n, static_cast<int>(d), k_cache.dtype());
        const int64_t units = (static_cast<int64_t>(bytes) + kKvHostUnit - 1) / kKvHostUnit;
        if (bytes == 0 || unit + units > end || pieces >= max_pieces) {
          return Bad(kOp, absl::StrCat("head ", h, ": the pieces outgrow the ", units_per_head,
                                       " host units or ", max_pieces, " pieces reserved"));
        }
        STRATA_RETURN_IF_ERROR(
            codec->Encode(k_rows.data(), v_rows.data(), k_cache.dtype(), n, static_cast<int>(d),
                          std::span<uint8_t>(host.data() + unit * kKvHostUnit, bytes)));
        where[h * max_pieces + pieces++] = static_cast<int32_t>(unit);
        unit += units;
      }
    }
    count[h] = pieces;
  }
  return absl::OkStatus();
}

absl::Status RecallBlocks(Tensor& k_cache, Tensor& v_cache, SparsePlan& plan, const Tensor& extents,
                          TierTables& t, TierRing& ring) {
  constexpr char kOp[] = "RecallBlocks";
  STRATA_RETURN_IF_ERROR(CheckCaches(kOp, k_cache, v_cache));
  STRATA_RETURN_IF_ERROR(ValidateRecallBlocks("cpu RecallBlocks", k_cache, plan, extents, t, ring));
  const int64_t hkv = k_cache.dim(2), d = k_cache.dim(3), page_size = k_cache.dim(1);
  const int64_t max_blocks = extents.dim(2), max_pieces = t.piece_host.dim(2);
  const int ring_rows = ring.ring_rows;
  const CacheView k{k_cache, hkv, d, DTypeSize(k_cache.dtype())};
  const CacheView v{v_cache, hkv, d, DTypeSize(v_cache.dtype())};
  const size_t row_bytes = d * k.elem;
  int32_t* stats = ring.stats.data_as<int32_t>();
  std::vector<float> k_dec, v_dec;
  std::vector<uint8_t> k_raw, v_raw;
  struct Run {
    int32_t block, pos, take;
  };
  std::vector<Run> runs;
  std::vector<PieceFetcher::Piece> fetch;
  std::vector<int64_t> fetched;
  for (int i = 0; i < plan.num_entries; ++i) {
    const int64_t slot = plan.host(i, kPlanSlot);
    const int blocks = plan.host(i, kPlanNumBlocks);
    if (blocks == 0) continue;
    int32_t& status = ring.status.data_as<int32_t>()[slot];
    const int32_t* pages = ring.ring_pages.data_as<int32_t>() + slot * (ring_rows / page_size);
    auto ring_slot = [&](int64_t pos) {
      const int64_t r = pos % ring_rows;
      return int64_t{pages[r / page_size]} * page_size + r % page_size;
    };
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t list = i * hkv + h, sh = slot * hkv + h;
      int32_t* keys = plan.key_index.data_as<int32_t>() + list * plan.max_keys;
      const int32_t key_count = plan.key_count.data_as<int32_t>()[list];
      const int32_t tail = plan.host(i, kPlanContextLen) - plan.host(i, kPlanTailBegin);
      const int32_t* ext = extents.data_as<int32_t>() + sh * max_blocks * 2;
      int32_t* base = t.piece_base.data_as<int32_t>() + sh * max_blocks;
      const int32_t* where = t.piece_host.data_as<int32_t>() + sh * max_pieces;
      int32_t* res_start = t.res_start.data_as<int32_t>() + sh * max_blocks;
      int32_t* res_count = t.res_count.data_as<int32_t>() + sh * max_blocks;
      int32_t& head = t.ring_head.data_as<int32_t>()[sh];
      // The selection's runs: block b's first `take` tokens, in score order
      // (SelectTokens). Extents ascend with the block, so the block of a
      // run's first index is the last whose extent starts at or before it.
      runs.clear();
      int64_t host_tokens = 0;
      for (int32_t pos = plan.host(i, kPlanSinkEnd); pos < key_count - tail;) {
        const int32_t x = keys[pos];
        int lo = 0, hi = blocks;  // last b with ext[b].first <= x
        while (hi - lo > 1) {
          const int mid = (lo + hi) / 2;
          if (ext[mid * 2] <= x)
            lo = mid;
          else
            hi = mid;
        }
        const int32_t take = std::min(ext[lo * 2 + 1], key_count - tail - pos);
        if (take <= 0 || ext[lo * 2] != x) {
          return absl::InternalError(
              absl::StrCat("cpu ", kOp, ": selection at ", pos, " does not start a block"));
        }
        runs.push_back({lo, pos, take});
        if (base[lo] >= 0) host_tokens += take;
        pos += take;
      }
      if (ring.list_only) {
        // Read ahead: the missed pieces below host memory, listed; nothing
        // else changes (nothing for a selection the ring cannot hold).
        if (host_tokens * 2 > ring_rows) continue;
        for (const Run& r : runs) {
          if (base[r.block] < 0) continue;
          if (res_count[r.block] >= r.take && res_start[r.block] >= int64_t{head} - ring_rows) {
            continue;  // resident
          }
          for (int32_t off = 0; off < r.take; off += kKvPieceTokens) {
            const int32_t piece = base[r.block] + off / kKvPieceTokens;
            if (where[piece] == kPieceBelowHost) {
              fetch.push_back({static_cast<int32_t>(slot), static_cast<int32_t>(h), piece});
            }
          }
        }
        continue;
      }
      if (host_tokens * 2 > ring_rows) {
        status |= kRecallRingTooSmall;
        continue;
      }
      // Classify: hits stay, refreshes move ahead of the writes, misses
      // come from the host.
      const int32_t h0 = head;
      std::vector<Run> refresh, miss;
      for (const Run& r : runs) {
        if (base[r.block] < 0) continue;
        const bool resident =
            res_count[r.block] >= r.take && res_start[r.block] >= int64_t{h0} - ring_rows;
        if (resident && res_start[r.block] >= int64_t{h0} + host_tokens - ring_rows) {
          stats[kStatHitTokens] += r.take;
        } else if (resident) {
          refresh.push_back(r);
        } else {
          miss.push_back(r);
        }
      }
      std::sort(refresh.begin(), refresh.end(), [&](const Run& a, const Run& b) {
        return res_start[a.block] < res_start[b.block];
      });
      int32_t w = h0;
      for (const Run& r : refresh) {
        // Forward copies: each destination precedes its source (in positions
        // before the modulo), so no row is overwritten before it is read.
        for (int32_t j = 0; j < r.take; ++j) {
          const int64_t from = ring_slot(res_start[r.block] + j), to = ring_slot(w + j);
          std::memmove(k.row(to, static_cast<int>(h)), k.row(from, static_cast<int>(h)), row_bytes);
          std::memmove(v.row(to, static_cast<int>(h)), v.row(from, static_cast<int>(h)), row_bytes);
        }
        res_start[r.block] = w;
        res_count[r.block] = r.take;
        w += r.take;
        stats[kStatRefreshedTokens] += r.take;
      }
      // Misses take their ring positions in selection order whether or not
      // their pieces then pass their checks (a failed one is not resident,
      // and its sequence's step is not used).
      for (const Run& r : miss) {
        res_start[r.block] = w;
        res_count[r.block] = r.take;
        stats[kStatRecalledTokens] += r.take;
        const int32_t size = ext[r.block * 2 + 1];
        // Pieces below host memory come up first (a hard miss), the run's
        // together; the fetcher keeps them in place until its next call.
        fetch.clear();
        for (int32_t off = 0; off < r.take; off += kKvPieceTokens) {
          const int32_t piece = base[r.block] + off / kKvPieceTokens;
          if (where[piece] == kPieceBelowHost && ring.fetcher != nullptr) {
            fetch.push_back({static_cast<int32_t>(slot), static_cast<int32_t>(h), piece});
          }
        }
        fetched.assign(fetch.size(), -1);
        if (!fetch.empty()) ring.fetcher->Fetch(t.layer, fetch, fetched);
        size_t next_fetched = 0;
        bool good = true;
        for (int32_t off = 0; off < r.take; off += kKvPieceTokens) {
          const int32_t piece = base[r.block] + off / kKvPieceTokens;
          const int64_t at = where[piece] == kPieceBelowHost
                                 ? (ring.fetcher != nullptr ? fetched[next_fetched++] : -1)
                                 : int64_t{where[piece]} * kKvHostUnit;
          const int expect = std::min(kKvPieceTokens, size - off);
          absl::StatusOr<KvBlockInfo> info = absl::DataLossError("outside the host buffer");
          std::span<const uint8_t> block;
          if (at >= 0 && at < static_cast<int64_t>(ring.host.bytes)) {
            const std::span<const uint8_t> bytes(ring.host.data() + at, ring.host.bytes - at);
            const size_t declared = KvCodec::DeclaredBytes(bytes);
            if (declared > 0) {
              block = bytes.first(declared);
              info = KvCodec::Inspect(block);
            }
          }
          if (!info.ok() || info->tokens != expect || info->head_dim != d) {
            ++stats[kStatBadPieces];
            good = false;
            continue;
          }
          ++stats[kStatRecalledPieces];
          stats[kStatRecalledKiB] += static_cast<int32_t>((info->bytes + 1023) / 1024);
          const int n = std::min<int>(expect, r.take - off);
          if (info->codec == KvCodecKind::kBf16) {
            // Raw: the cache's own dtype, byte for byte.
            k_raw.resize(expect * row_bytes);
            v_raw.resize(expect * row_bytes);
            STRATA_RETURN_IF_ERROR(
                KvCodec::Decode(block, k_cache.dtype(), k_raw.data(), v_raw.data(), nullptr));
            for (int j = 0; j < n; ++j) {
              std::memcpy(k.row(ring_slot(w + off + j), static_cast<int>(h)), &k_raw[j * row_bytes],
                          row_bytes);
              std::memcpy(v.row(ring_slot(w + off + j), static_cast<int>(h)), &v_raw[j * row_bytes],
                          row_bytes);
            }
          } else {
            k_dec.resize(expect * d);
            v_dec.resize(expect * d);
            STRATA_RETURN_IF_ERROR(
                KvCodec::Decode(block, DType::kF32, k_dec.data(), v_dec.data(), nullptr));
            for (int j = 0; j < n; ++j) {
              uint8_t* kr = k.row(ring_slot(w + off + j), static_cast<int>(h));
              uint8_t* vr = v.row(ring_slot(w + off + j), static_cast<int>(h));
              for (int64_t x = 0; x < d; ++x) {
                if (k_cache.dtype() == DType::kF32) {
                  reinterpret_cast<float*>(kr)[x] = k_dec[j * d + x];
                  reinterpret_cast<float*>(vr)[x] = v_dec[j * d + x];
                } else {
                  kr[x] = FloatToFp8E4M3(k_dec[j * d + x]);
                  vr[x] = FloatToFp8E4M3(v_dec[j * d + x]);
                }
              }
            }
          }
        }
        if (!good) {
          status |= kRecallBadBlock;
          res_count[r.block] = 0;
        }
        w += r.take;
      }
      head = w;
      for (const Run& r : runs) {
        if (base[r.block] < 0) continue;
        for (int32_t j = 0; j < r.take; ++j) {
          keys[r.pos + j] = KvCacheSlotIndex(ring_slot(res_start[r.block] + j));
        }
      }
    }
  }
  if (ring.list_only && !fetch.empty()) {
    fetched.assign(fetch.size(), -1);
    ring.fetcher->Fetch(t.layer, fetch, fetched);  // the answers are not used
  }
  return absl::OkStatus();
}

}  // namespace strata::engine::cpu_tiering

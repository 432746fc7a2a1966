// SsdStore: the SSD tier of a worker's KV memory, one RocksDB database.
//
// Values are KV blocks (an encoded cluster or a record of pages); keys name
// what they hold: (owner, layer, KV head, block), where the owner is a
// sequence (its keys die with it) or a prompt prefix (content-addressed,
// kept across sequences and restarts). Keys sort by owner first, so a
// sequence's keys form one range, deleted in one call. Each model has a
// column family of its own; large values go to RocksDB's integrated blob
// files (BlobDB options), keeping the LSM tree small; each value's size is
// kept beside it in a small column family, so that the budget is counted
// and a sequence's keys deleted without reading its values back.
//
// Every stored value carries a masked CRC32C (common/crc32c.h) after its
// bytes, checked on every read; a value that fails it (or that RocksDB's
// own checksums reject) is DataLoss, never returned. The store keeps a
// byte budget: a Put that would pass it is ResourceExhausted and writes
// nothing, so a full SSD degrades to the caller evicting or recomputing.
// Open() deletes every sequence key a crashed predecessor left (prefixes
// stay), counts what remains against the budget, and checks that the
// database can be written. A block is written once: Put of a key that
// holds one is AlreadyExists.
//
// Thread-safety: thread-safe (RocksDB is; the byte count is atomic), so
// I/O threads may read while the engine thread writes.
#ifndef STRATA_KVTIER_SSD_STORE_H_
#define STRATA_KVTIER_SSD_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/profile.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace strata::kvtier {

struct SsdKey {
  enum class Owner : uint8_t { kSequence = 's', kPrefix = 'p' };
  Owner owner = Owner::kSequence;
  uint64_t id = 0;  // the sequence id, or the prefix's hash
  uint16_t layer = 0;
  uint16_t kv_head = 0;
  uint32_t block = 0;  // cluster or page index
  // 17 bytes, big-endian after the owner byte, so that keys sort by owner.
  std::string Encode() const;
};

struct SsdStoreOptions {
  std::string path;          // the database directory (created if missing)
  std::string model;         // names the column family
  int64_t budget_bytes = 0;  // stored bytes allowed (values and their CRCs)
  // Values at least this large go to blob files.
  int64_t min_blob_bytes = 64 << 10;
  // O_DIRECT reads, flushes and compactions: the host tier is the cache,
  // so the page cache would only copy every value once more (and hold
  // memory the host tier needs). A file system without O_DIRECT (tmpfs)
  // falls back to buffered I/O.
  bool direct_io = true;
};

class SsdStore {
 public:
  struct Stats {
    int64_t bytes_used = 0;
    int64_t budget_bytes = 0;
    int64_t puts = 0, puts_refused = 0, gets = 0, misses = 0, corrupt = 0;
    int64_t bytes_written = 0, bytes_read = 0;
    int64_t stale_keys_deleted = 0;  // at Open: sequence keys of a predecessor
  };

  // InvalidArgument for an empty path or model, or a budget < 1;
  // FailedPrecondition naming the path when the database cannot be created,
  // opened or written (RocksDB's reason included).
  static absl::StatusOr<std::unique_ptr<SsdStore>> Open(const SsdStoreOptions& options);
  ~SsdStore();

  // ResourceExhausted (nothing written) when the budget cannot hold it.
  absl::Status Put(const SsdKey& key, std::span<const uint8_t> value) {
    return Put(key, {}, value);
  }
  // Stores `head` followed by `body` as one value (e.g. a small header
  // naming what a record holds, then the record), without joining them first.
  absl::Status Put(const SsdKey& key, std::span<const uint8_t> head, std::span<const uint8_t> body);
  // NotFound when absent; DataLoss when the stored bytes fail a check.
  absl::StatusOr<std::vector<uint8_t>> Get(const SsdKey& key);
  // Reads a value of exactly head.size() + body.size() bytes into the two
  // (e.g. straight into a host record); DataLoss when it has another size
  // or fails a check. Nothing is written to them on an error but DataLoss.
  absl::Status GetInto(const SsdKey& key, std::span<uint8_t> head, std::span<uint8_t> body);
  // Every id of `owner` with the bytes its keys hold, in key order (e.g. the
  // prefixes a predecessor stored, to index them again at start).
  absl::StatusOr<std::vector<std::pair<uint64_t, int64_t>>> ListOwners(SsdKey::Owner owner);
  // Deletes one key (its bytes go back to the budget); absent keys are fine.
  absl::Status Delete(const SsdKey& key);
  // Deletes every key of one owner (a sequence that ended).
  absl::Status DeleteOwner(SsdKey::Owner owner, uint64_t id);
  // Writes what is still only in the write-ahead log to table and blob
  // files (e.g. before a planned shutdown, so prefixes restart cheaply).
  absl::Status Flush();
  Stats stats() const;

 private:
  SsdStore() = default;
  // Deletes [begin, end) and gives its bytes back to the budget.
  absl::Status DeleteRange(const std::string& begin, const std::string& end);
  // Reads a value and checks its CRC; `read` gets the bytes before it.
  absl::Status Read(const SsdKey& key,
                    const std::function<absl::Status(std::span<const uint8_t>)>& read);

  SsdStoreOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  // Every family's handle (destroyed before the database closes); ours:
  // the values, and their sizes.
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  rocksdb::ColumnFamilyHandle* family_ = nullptr;
  rocksdb::ColumnFamilyHandle* sizes_ = nullptr;
  std::atomic<int64_t> bytes_used_{0};
  std::atomic<int64_t> puts_{0}, puts_refused_{0}, gets_{0}, misses_{0}, corrupt_{0};
  std::atomic<int64_t> bytes_written_{0}, bytes_read_{0};
  int64_t stale_keys_deleted_ = 0;
};

// The SSD tier a server's profiles ask for together: one database (a
// worker has one) at the ssd_path they share, with their ssd_bytes summed,
// and `model`'s column family. Null when no profile has an SSD tier;
// InvalidArgument naming both when two profiles name different paths.
absl::StatusOr<std::unique_ptr<SsdStore>> OpenSsdForProfiles(const std::vector<KvProfile>& profiles,
                                                             const std::string& model);

}  // namespace strata::kvtier

#endif  // STRATA_KVTIER_SSD_STORE_H_

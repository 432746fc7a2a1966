#include "kvtier/ssd_store.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/write_batch.h>

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status_macros.h"

namespace strata::kvtier {
namespace {

// A value's size is kept beside it, in a column family of small entries,
// written in the same batch: the budget is counted and a range deleted
// without reading the (blob) values back.
std::string SizesFamily(const std::string& model) { return model + ".sizes"; }

std::string EncodeSize(int64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i)
    s[i] = static_cast<char>((static_cast<uint64_t>(n) >> (8 * i)) & 0xff);
  return s;
}

int64_t DecodeSize(const rocksdb::Slice& s) {
  if (s.size() != 8) return -1;
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(s[i])) << (8 * i);
  return static_cast<int64_t>(n);
}

std::string OwnerPrefix(SsdKey::Owner owner, uint64_t id) {
  std::string s(9, '\0');
  s[0] = static_cast<char>(owner);
  for (int i = 0; i < 8; ++i) s[1 + i] = static_cast<char>((id >> (56 - 8 * i)) & 0xff);
  return s;
}

// The smallest key above every key starting with `prefix`.
std::string PrefixEnd(std::string prefix) {
  while (!prefix.empty() && static_cast<uint8_t>(prefix.back()) == 0xff) prefix.pop_back();
  if (!prefix.empty()) prefix.back() = static_cast<char>(static_cast<uint8_t>(prefix.back()) + 1);
  return prefix;
}

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  const std::string message = absl::StrCat(what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(message);
  if (s.IsCorruption()) return absl::DataLossError(message);
  return absl::UnavailableError(message);
}

}  // namespace

std::string SsdKey::Encode() const {
  std::string s = OwnerPrefix(owner, id);
  s.push_back(static_cast<char>(layer >> 8));
  s.push_back(static_cast<char>(layer & 0xff));
  s.push_back(static_cast<char>(kv_head >> 8));
  s.push_back(static_cast<char>(kv_head & 0xff));
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((block >> (24 - 8 * i)) & 0xff));
  return s;
}

absl::StatusOr<std::unique_ptr<SsdStore>> SsdStore::Open(const SsdStoreOptions& options) {
  if (options.path.empty() || options.model.empty() || options.budget_bytes < 1) {
    return absl::InvalidArgumentError(
        "SSD tier: give a path, a model name and a budget of at least one byte");
  }
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("SSD tier: cannot create the directory ", options.path, ": ", ec.message()));
  }
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  // Values are written without a log (Put): the two families of a batch
  // must reach the disk together, or a crash could leave a value without
  // its size (bytes never counted nor deleted) or the reverse.
  db_options.atomic_flush = true;
  rocksdb::ColumnFamilyOptions values;
  values.compression = rocksdb::kNoCompression;  // KV bytes (often quantised) barely compress
  values.enable_blob_files = true;
  values.min_blob_size = static_cast<uint64_t>(std::max<int64_t>(options.min_blob_bytes, 0));
  values.enable_blob_garbage_collection = true;
  rocksdb::ColumnFamilyOptions sizes;
  // Every family the database has is opened (other models' included): a
  // RocksDB database must open them all.
  std::vector<std::string> names;
  if (!rocksdb::DB::ListColumnFamilies(db_options, options.path, &names).ok()) {
    names = {rocksdb::kDefaultColumnFamilyName};
  }
  for (const std::string& wanted : {options.model, SizesFamily(options.model)}) {
    if (std::find(names.begin(), names.end(), wanted) == names.end()) names.push_back(wanted);
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const std::string& name : names) {
    const bool is_sizes = name.size() > 6 && name.compare(name.size() - 6, 6, ".sizes") == 0;
    families.emplace_back(name, is_sizes ? sizes : values);
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  db_options.use_direct_reads = options.direct_io;
  db_options.use_direct_io_for_flush_and_compaction = options.direct_io;
  rocksdb::Status opened = rocksdb::DB::Open(db_options, options.path, families, &handles, &db);
  if (!opened.ok() && options.direct_io) {
    // No O_DIRECT here (e.g. tmpfs): buffered, as the file system allows.
    db_options.use_direct_reads = false;
    db_options.use_direct_io_for_flush_and_compaction = false;
    opened = rocksdb::DB::Open(db_options, options.path, families, &handles, &db);
  }
  if (!opened.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("SSD tier: cannot open the database at ",
                                                      options.path, ": ", opened.ToString()));
  }
  std::unique_ptr<SsdStore> store(new SsdStore());
  store->options_ = options;
  store->db_.reset(db);
  store->handles_ = handles;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == options.model) store->family_ = handles[i];
    if (names[i] == SizesFamily(options.model)) store->sizes_ = handles[i];
  }
  // A crashed predecessor's sequences are gone: their keys too. Prefixes
  // stay, and count against the budget.
  const std::string seq_begin(1, static_cast<char>(SsdKey::Owner::kSequence));
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), store->sizes_));
  int64_t kept = 0, stale = 0;
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (!it->key().starts_with(seq_begin)) {
      kept += std::max<int64_t>(DecodeSize(it->value()), 0);
    } else {
      ++stale;
    }
  }
  STRATA_RETURN_IF_ERROR(FromRocks(it->status(), "SSD tier: reading the stored sizes"));
  it.reset();
  if (stale > 0) {
    STRATA_RETURN_IF_ERROR(store->DeleteRange(seq_begin, PrefixEnd(seq_begin)));
  }
  store->bytes_used_ = kept;
  store->stale_keys_deleted_ = stale;
  // A store that cannot be written fails now, not on the first eviction.
  const SsdKey probe{SsdKey::Owner::kSequence, 0, 0, 0, 0};
  rocksdb::WriteOptions write;
  if (rocksdb::Status s = db->Put(write, store->sizes_, probe.Encode(), EncodeSize(0)); !s.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("SSD tier: cannot write the database at ", options.path, ": ", s.ToString()));
  }
  STRATA_RETURN_IF_ERROR(FromRocks(db->Delete(write, store->sizes_, probe.Encode()),
                                   "SSD tier: deleting the write probe"));
  return store;
}

SsdStore::~SsdStore() {
  if (db_ == nullptr) return;
  for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close();
}

absl::Status SsdStore::Put(const SsdKey& key, std::span<const uint8_t> head,
                           std::span<const uint8_t> body) {
  const int64_t bytes = static_cast<int64_t>(head.size() + body.size()) + 4;
  if (bytes_used_.fetch_add(bytes) + bytes > options_.budget_bytes) {
    bytes_used_.fetch_sub(bytes);
    ++puts_refused_;
    return absl::ResourceExhaustedError(absl::StrCat("SSD tier: ", bytes, " bytes do not fit the ",
                                                     options_.budget_bytes, "-byte budget"));
  }
  const std::string k = key.Encode();
  std::string old;
  if (db_->KeyMayExist(rocksdb::ReadOptions(), sizes_, k, &old) &&
      db_->Get(rocksdb::ReadOptions(), sizes_, k, &old).ok()) {
    bytes_used_.fetch_sub(bytes);
    return absl::AlreadyExistsError("SSD tier: a block is written once; this key holds one");
  }
  std::string framed;
  framed.reserve(static_cast<size_t>(bytes));
  if (!head.empty()) framed.append(reinterpret_cast<const char*>(head.data()), head.size());
  if (!body.empty()) framed.append(reinterpret_cast<const char*>(body.data()), body.size());
  const uint32_t crc =
      MaskCrc(Crc32c(reinterpret_cast<const uint8_t*>(framed.data()), framed.size()));
  for (int i = 0; i < 4; ++i) framed.push_back(static_cast<char>((crc >> (8 * i)) & 0xff));
  rocksdb::WriteBatch batch;
  batch.Put(family_, k, framed);
  batch.Put(sizes_, k, EncodeSize(bytes));
  // No write-ahead log: the store is a cache, and a value would otherwise
  // be written twice (log, then blob file). A crash loses the values not
  // yet flushed, with their sizes (one batch): they are simply absent at
  // the next start. Close flushes (avoid_flush_during_shutdown is false).
  rocksdb::WriteOptions write;
  write.disableWAL = true;
  if (rocksdb::Status s = db_->Write(write, &batch); !s.ok()) {
    bytes_used_.fetch_sub(bytes);
    return FromRocks(s, absl::StrCat("SSD tier: writing to ", options_.path));
  }
  ++puts_;
  bytes_written_ += bytes;
  return absl::OkStatus();
}

absl::Status SsdStore::Read(const SsdKey& key,
                            const std::function<absl::Status(std::span<const uint8_t>)>& read) {
  ++gets_;
  rocksdb::PinnableSlice value;
  // The value's own CRC32C (checked below) covers it end to end: RocksDB's
  // block and blob checksums would read every byte once more.
  rocksdb::ReadOptions options;
  options.verify_checksums = false;
  options.fill_cache = false;
  const rocksdb::Status s = db_->Get(options, family_, key.Encode(), &value);
  if (s.IsNotFound()) {
    ++misses_;
    return absl::NotFoundError("SSD tier: no such block");
  }
  if (!s.ok()) {
    if (s.IsCorruption()) ++corrupt_;
    return FromRocks(s, absl::StrCat("SSD tier: reading from ", options_.path));
  }
  if (value.size() < 4) {
    ++corrupt_;
    return absl::DataLossError("SSD tier: a stored block is shorter than its checksum");
  }
  const size_t n = value.size() - 4;
  const auto* bytes = reinterpret_cast<const uint8_t*>(value.data());
  uint32_t stored = 0;
  for (int i = 0; i < 4; ++i) stored |= static_cast<uint32_t>(bytes[n + i]) << (8 * i);
  if (UnmaskCrc(stored) != Crc32c(bytes, n)) {
    ++corrupt_;
    return absl::DataLossError("SSD tier: a stored block failed its CRC32C check");
  }
  bytes_read_ += static_cast<int64_t>(value.size());
  return read({bytes, n});
}

absl::StatusOr<std::vector<uint8_t>> SsdStore::Get(const SsdKey& key) {
  std::vector<uint8_t> out;
  STRATA_RETURN_IF_ERROR(Read(key, [&](std::span<const uint8_t> value) {
    out.assign(value.begin(), value.end());
    return absl::OkStatus();
  }));
  return out;
}

absl::Status SsdStore::GetInto(const SsdKey& key, std::span<uint8_t> head,
                               std::span<uint8_t> body) {
  return Read(key, [&](std::span<const uint8_t> value) {
    if (value.size() != head.size() + body.size()) {
      return absl::DataLossError(absl::StrCat("SSD tier: a stored block holds ", value.size(),
                                              " bytes, not ", head.size() + body.size()));
    }
    // (memcpy of an empty span may not name its null pointer.)
    if (!head.empty()) std::memcpy(head.data(), value.data(), head.size());
    if (!body.empty()) std::memcpy(body.data(), value.data() + head.size(), body.size());
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<std::pair<uint64_t, int64_t>>> SsdStore::ListOwners(
    SsdKey::Owner owner) {
  const std::string begin(1, static_cast<char>(owner));
  const std::string end = PrefixEnd(begin);
  rocksdb::ReadOptions read;
  const rocksdb::Slice upper(end);
  read.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read, sizes_));
  std::vector<std::pair<uint64_t, int64_t>> owners;
  for (it->Seek(begin); it->Valid(); it->Next()) {
    const rocksdb::Slice k = it->key();
    if (k.size() < 9) continue;
    uint64_t id = 0;
    for (int i = 0; i < 8; ++i) id = (id << 8) | static_cast<uint8_t>(k[1 + i]);
    const int64_t bytes = std::max<int64_t>(DecodeSize(it->value()), 0);
    if (!owners.empty() && owners.back().first == id) {
      owners.back().second += bytes;
    } else {
      owners.emplace_back(id, bytes);
    }
  }
  STRATA_RETURN_IF_ERROR(FromRocks(it->status(), "SSD tier: listing stored keys"));
  return owners;
}

absl::Status SsdStore::Delete(const SsdKey& key) {
  const std::string k = key.Encode();
  return DeleteRange(k, k + '\0');
}

absl::Status SsdStore::DeleteOwner(SsdKey::Owner owner, uint64_t id) {
  const std::string prefix = OwnerPrefix(owner, id);
  return DeleteRange(prefix, PrefixEnd(prefix));
}

absl::Status SsdStore::DeleteRange(const std::string& begin, const std::string& end) {
  rocksdb::ReadOptions read;
  const rocksdb::Slice upper(end);
  read.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read, sizes_));
  int64_t freed = 0, keys = 0;
  for (it->Seek(begin); it->Valid(); it->Next()) {
    freed += std::max<int64_t>(DecodeSize(it->value()), 0);
    ++keys;
  }
  STRATA_RETURN_IF_ERROR(FromRocks(it->status(), "SSD tier: listing keys to delete"));
  it.reset();
  if (keys == 0) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  batch.DeleteRange(family_, begin, end);
  batch.DeleteRange(sizes_, begin, end);
  STRATA_RETURN_IF_ERROR(FromRocks(db_->Write(rocksdb::WriteOptions(), &batch),
                                   absl::StrCat("SSD tier: deleting from ", options_.path)));
  bytes_used_ -= freed;
  return absl::OkStatus();
}

absl::Status SsdStore::Flush() {
  return FromRocks(db_->Flush(rocksdb::FlushOptions(), {family_, sizes_}),
                   absl::StrCat("SSD tier: flushing ", options_.path));
}

SsdStore::Stats SsdStore::stats() const {
  Stats s;
  s.bytes_used = bytes_used_.load();
  s.budget_bytes = options_.budget_bytes;
  s.puts = puts_.load();
  s.puts_refused = puts_refused_.load();
  s.gets = gets_.load();
  s.misses = misses_.load();
  s.corrupt = corrupt_.load();
  s.bytes_written = bytes_written_.load();
  s.bytes_read = bytes_read_.load();
  s.stale_keys_deleted = stale_keys_deleted_;
  return s;
}

absl::StatusOr<std::unique_ptr<SsdStore>> OpenSsdForProfiles(const std::vector<KvProfile>& profiles,
                                                             const std::string& model) {
  SsdStoreOptions options;
  options.model = model;
  std::string first;  // the profile that named the path
  for (const KvProfile& p : profiles) {
    if (p.tiers.ssd_path.empty()) continue;
    if (options.path.empty()) {
      options.path = p.tiers.ssd_path;
      first = p.name;
    } else if (p.tiers.ssd_path != options.path) {
      return absl::InvalidArgumentError(absl::StrCat(
          "profiles \"", first, "\" and \"", p.name, "\" name different tiers.ssd_path (",
          options.path, ", ", p.tiers.ssd_path, "): a worker has one SSD database"));
    }
    options.budget_bytes += p.tiers.ssd_bytes;
  }
  if (options.path.empty()) return std::unique_ptr<SsdStore>();
  return SsdStore::Open(options);
}

}  // namespace strata::kvtier

// MappedFile: a read-only memory map of a whole file.
//
// Model weights are read straight from the page cache through the map, so a
// tensor is copied once, into the backend's memory (converting its dtype on
// the way), and never staged in an intermediate heap buffer.
//
// Both readers here take regular files only: a FIFO, device, socket or
// directory is refused (InvalidArgument naming the path and what it is)
// without blocking on it and before anything is read.
//
// Thread-safety: immutable after Open; safe to read from any thread.
#ifndef STRATA_ENGINE_MAPPED_FILE_H_
#define STRATA_ENGINE_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace strata::engine {

class MappedFile {
 public:
  // Maps `path` read-only. Errors name the path and the system error
  // (NotFound when it does not exist).
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole (small) regular file into a string, e.g. a JSON config.
// Errors as for MappedFile::Open.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_MAPPED_FILE_H_

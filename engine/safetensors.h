// Reading safetensors files (https://huggingface.co/docs/safetensors):
// an 8-byte little-endian header length, a JSON header mapping tensor names
// to {dtype, shape, data_offsets}, then the raw tensor bytes.
//
// ParseSafetensors validates the whole header of a file's bytes (JSON shape,
// known dtypes, offsets inside the file, sizes matching shapes), so a tensor
// view handed out later is always in bounds; SafetensorsFile maps a file and
// parses it so. SafetensorsModel joins a model directory's single file or
// shards (model.safetensors.index.json). Only regular files are opened: a
// FIFO, device or directory is refused before anything is read from it.
//
// Thread-safety: immutable after Open; safe to read from any thread.
#ifndef STRATA_ENGINE_SAFETENSORS_H_
#define STRATA_ENGINE_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/mapped_file.h"
#include "engine/tensor.h"

namespace strata::engine {

// A tensor inside a mapped file. `data` points into the map.
struct TensorView {
  std::string name;
  std::string file;  // path of the file holding it, for error messages
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
};

// The tensors and metadata a safetensors header describes.
struct SafetensorsContents {
  std::map<std::string, TensorView> tensors;
  std::map<std::string, std::string> metadata;  // string values of "__metadata__"
};

// Parses and validates a whole safetensors file held in `bytes` (header
// length, JSON header and data section). The views point into `bytes`, which
// must outlive them. `source` names the file in errors and in TensorView::file.
absl::StatusOr<SafetensorsContents> ParseSafetensors(absl::Span<const uint8_t> bytes,
                                                     const std::string& source);

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const std::map<std::string, TensorView>& tensors() const { return contents_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return contents_.metadata; }

 private:
  SafetensorsFile(std::unique_ptr<MappedFile> file, SafetensorsContents contents)
      : file_(std::move(file)), contents_(std::move(contents)) {}

  std::unique_ptr<MappedFile> file_;
  SafetensorsContents contents_;
};

class SafetensorsModel {
 public:
  // Opens `dir`/model.safetensors, or the shards listed in
  // `dir`/model.safetensors.index.json.
  static absl::StatusOr<std::unique_ptr<SafetensorsModel>> Open(const std::string& dir);

  // Finds a tensor; NotFound names the tensor and the directory.
  absl::StatusOr<TensorView> Get(const std::string& name) const;
  bool Has(const std::string& name) const { return tensors_.count(name) > 0; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorView> tensors_;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_SAFETENSORS_H_

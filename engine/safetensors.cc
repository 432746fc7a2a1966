#include "engine/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::engine {
namespace {

using nlohmann::json;

// The header may not exceed 100 MB (the format's own limit), which also
// bounds what a corrupt length can make us parse.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::StatusOr<DType> ParseDType(const std::string& s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "I32") return DType::kI32;
  return absl::UnimplementedError(absl::StrCat("unsupported dtype \"", s, "\""));
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SafetensorsContents> ParseSafetensors(absl::Span<const uint8_t> bytes,
                                                     const std::string& source) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid safetensors file: ", what));
  };
  if (bytes.size() < 8) return bad("shorter than its 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);  // little-endian on every supported host
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the file size ", bytes.size(),
                            " (truncated file?)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  const json header = json::parse(header_begin, header_begin + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object()) return bad("header is not a JSON object");

  const uint8_t* data_begin = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;

  SafetensorsContents contents;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (v.is_string()) contents.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    // (clang 14 cannot capture a structured binding.)
    auto bad_tensor = [&, &tensor_name = name](const std::string& what) {
      return bad(absl::StrCat("tensor \"", tensor_name, "\": ", what));
    };
    if (!entry.is_object()) return bad_tensor("entry is not an object");
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) return bad_tensor("missing dtype");
    if (shape_it == entry.end() || !shape_it->is_array()) return bad_tensor("missing shape");
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
      return bad_tensor("data_offsets must be two unsigned integers");
    }
    TensorView view;
    view.name = name;
    view.file = source;
    auto dtype = ParseDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return bad_tensor(std::string(dtype.status().message()));
    view.dtype = *dtype;
    int64_t numel = 1;
    for (const auto& d : *shape_it) {
      if (!d.is_number_unsigned()) return bad_tensor("shape holds a non-integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 40) ||
          (dim > 0 && static_cast<uint64_t>(numel) > (uint64_t{1} << 42) / dim)) {
        return bad_tensor("shape is implausibly large");
      }
      view.shape.push_back(static_cast<int64_t>(dim));
      numel *= static_cast<int64_t>(dim);
    }
    const uint64_t begin = (*offsets_it)[0].get<uint64_t>();
    const uint64_t end = (*offsets_it)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return bad_tensor(absl::StrCat("data_offsets [", begin, ", ", end,
                                     ") outside the data section of ", data_size,
                                     " bytes (truncated file?)"));
    }
    if (end - begin != static_cast<uint64_t>(numel) * DTypeSize(view.dtype)) {
      return bad_tensor(absl::StrCat("holds ", end - begin, " bytes but its shape and dtype need ",
                                     numel * DTypeSize(view.dtype)));
    }
    view.data = data_begin + begin;
    view.nbytes = end - begin;
    ranges.emplace_back(begin, end);
    contents.tensors.emplace(name, std::move(view));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return bad("tensors overlap in the data section");
  }
  return contents;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  STRATA_ASSIGN_OR_RETURN(auto mapped, MappedFile::Open(path));
  STRATA_ASSIGN_OR_RETURN(
      SafetensorsContents contents,
      ParseSafetensors(absl::MakeConstSpan(mapped->data(), mapped->size()), path));
  return std::unique_ptr<SafetensorsFile>(
      new SafetensorsFile(std::move(mapped), std::move(contents)));
}

absl::StatusOr<std::unique_ptr<SafetensorsModel>> SafetensorsModel::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto model = std::make_unique<SafetensorsModel>();
  model->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::vector<std::string> shard_names;
  json weight_map;
  if (fs::exists(index_path)) {
    STRATA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path.string()));
    const json index = json::parse(text, nullptr, false);
    if (index.is_discarded() || !index.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": not valid JSON"));
    }
    const auto it = index.find("weight_map");
    if (it == index.end() || !it->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": missing \"weight_map\" object"));
    }
    weight_map = *it;
    std::set<std::string> unique;
    for (const auto& [tensor, shard] : weight_map.items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map[\"", tensor, "\"] is not a file name"));
      }
      const std::string name = shard.get<std::string>();
      if (name.find('/') != std::string::npos || name == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": shard name \"", name,
                                                       "\" is not a plain file name"));
      }
      if (unique.insert(name).second) shard_names.push_back(name);
    }
  } else if (fs::exists(single_path)) {
    shard_names.push_back("model.safetensors");
  } else {
    return absl::NotFoundError(absl::StrCat(
        dir, ": no model.safetensors or model.safetensors.index.json in the model directory"));
  }
  for (const std::string& name : shard_names) {
    STRATA_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / name).string()));
    for (const auto& [tensor, view] : file->tensors()) {
      if (!model->tensors_.emplace(tensor, view).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(file->path(), ": tensor \"", tensor, "\" also appears in another shard"));
      }
    }
    model->files_.push_back(std::move(file));
  }
  // Every tensor the index promises must be in the shard it names.
  for (const auto& [tensor, shard] : weight_map.items()) {
    const auto it = model->tensors_.find(tensor);
    if (it == model->tensors_.end()) {
      return absl::NotFoundError(absl::StrCat(index_path.string(), ": tensor \"", tensor,
                                              "\" is listed for ", shard.get<std::string>(),
                                              " but that file does not hold it"));
    }
  }
  return model;
}

absl::StatusOr<TensorView> SafetensorsModel::Get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(
        absl::StrCat(dir_, ": missing tensor \"", name, "\" in the model's safetensors files"));
  }
  return it->second;
}

}  // namespace strata::engine

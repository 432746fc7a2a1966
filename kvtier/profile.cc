#include "kvtier/profile.h"

#include <yaml-cpp/yaml.h>

#include <cctype>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/mapped_file.h"

namespace strata::kvtier {
namespace {

// Reads typed keys of one YAML map, remembering which keys were consumed so
// that leftovers (typos, unknown options) are reported.
class MapReader {
 public:
  MapReader(const YAML::Node& node, std::string path, const std::string& source)
      : node_(node), path_(std::move(path)), source_(source) {}

  absl::Status Error(const std::string& key, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": ", path_.empty() ? "" : path_ + ".", key, ": ", what));
  }

  bool Has(const std::string& key) const { return node_[key].IsDefined() && !node_[key].IsNull(); }

  absl::Status String(const std::string& key, std::string* out,
                      const std::set<std::string>& allowed = {}) {
    seen_.insert(key);
    if (!Has(key)) return absl::OkStatus();
    const YAML::Node v = node_[key];
    if (!v.IsScalar()) return Error(key, "must be a string");
    *out = v.Scalar();
    if (!allowed.empty() && allowed.count(*out) == 0) {
      return Error(key,
                   absl::StrCat("\"", *out, "\" is not one of ", absl::StrJoin(allowed, ", ")));
    }
    return absl::OkStatus();
  }

  absl::Status Int(const std::string& key, int* out, int min, int max) {
    seen_.insert(key);
    if (!Has(key)) return absl::OkStatus();
    const YAML::Node v = node_[key];
    int64_t value;
    if (!v.IsScalar() || !absl::SimpleAtoi(v.Scalar(), &value))
      return Error(key, "must be an integer");
    if (value < min || value > max)
      return Error(key, absl::StrCat("must be in [", min, ", ", max, "], got ", value));
    *out = static_cast<int>(value);
    return absl::OkStatus();
  }

  absl::Status Bytes(const std::string& key, int64_t* out) {
    seen_.insert(key);
    if (!Has(key)) return absl::OkStatus();
    const YAML::Node v = node_[key];
    if (!v.IsScalar()) return Error(key, "must be a size such as 8GiB");
    auto bytes = ParseByteSize(v.Scalar());
    if (!bytes.ok()) return Error(key, std::string(bytes.status().message()));
    *out = *bytes;
    return absl::OkStatus();
  }

  absl::StatusOr<YAML::Node> Map(const std::string& key) {
    seen_.insert(key);
    if (!Has(key)) return YAML::Node(YAML::NodeType::Map);
    if (!node_[key].IsMap()) return Error(key, "must be a map");
    return node_[key];
  }

  absl::Status NoUnknownKeys() const {
    for (const auto& kv : node_) {
      const std::string key = kv.first.Scalar();
      if (seen_.count(key) == 0) return Error(key, "unknown key");
    }
    return absl::OkStatus();
  }

 private:
  YAML::Node node_;
  std::string path_;
  const std::string& source_;
  std::set<std::string> seen_;
};

absl::StatusOr<KvProfile> ParseNode(const YAML::Node& root, const std::string& source) {
  if (!root.IsMap())
    return absl::InvalidArgumentError(absl::StrCat(source, ": a profile must be a YAML map"));
  KvProfile p;
  MapReader top(root, "", source);
  STRATA_RETURN_IF_ERROR(top.String("name", &p.name));
  if (p.name.empty()) return top.Error("name", "is required");
  for (char c : p.name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return top.Error("name", "may hold only letters, digits, '-', '_' and '.'");
    }
  }
  STRATA_RETURN_IF_ERROR(top.String("codec", &p.codec, {"bf16", "fp8_e4m3", "int8", "int4"}));

  STRATA_ASSIGN_OR_RETURN(YAML::Node policy_node, top.Map("kv_policy"));
  MapReader policy(policy_node, "kv_policy", source);
  KvPolicyConfig& k = p.policy;
  STRATA_RETURN_IF_ERROR(
      policy.String("type", &k.type, {"full", "streaming", "quest", "clusterkv"}));
  STRATA_RETURN_IF_ERROR(policy.Int("budget_tokens", &k.budget_tokens, 1, 1 << 24));
  STRATA_RETURN_IF_ERROR(policy.Int("sink_tokens", &k.sink_tokens, 0, 1 << 20));
  STRATA_RETURN_IF_ERROR(policy.Int("window_tokens", &k.window_tokens, 0, 1 << 24));
  STRATA_RETURN_IF_ERROR(policy.Int("tokens_per_cluster", &k.tokens_per_cluster, 1, 1 << 16));
  STRATA_RETURN_IF_ERROR(policy.Int("kmeans_iterations", &k.kmeans_iterations, 1, 1000));
  STRATA_RETURN_IF_ERROR(policy.Int("full_layers", &k.full_layers, 0, 1024));
  STRATA_RETURN_IF_ERROR(policy.Int("quest_page_tokens", &k.quest_page_tokens, 1, 4096));
  STRATA_RETURN_IF_ERROR(policy.NoUnknownKeys());

  STRATA_ASSIGN_OR_RETURN(YAML::Node tiers_node, top.Map("tiers"));
  MapReader tiers(tiers_node, "tiers", source);
  TierConfig& t = p.tiers;
  STRATA_RETURN_IF_ERROR(tiers.Bytes("gpu_bytes", &t.gpu_bytes));
  STRATA_RETURN_IF_ERROR(tiers.Bytes("host_bytes", &t.host_bytes));
  STRATA_RETURN_IF_ERROR(tiers.String("ssd_path", &t.ssd_path));
  STRATA_RETURN_IF_ERROR(tiers.Bytes("ssd_bytes", &t.ssd_bytes));
  STRATA_RETURN_IF_ERROR(
      tiers.String("ssd_write_admission", &t.ssd_write_admission, {"never", "cold", "always"}));
  STRATA_RETURN_IF_ERROR(tiers.NoUnknownKeys());
  if (t.ssd_bytes > 0 && t.ssd_path.empty()) return tiers.Error("ssd_bytes", "needs ssd_path");
  if (!t.ssd_path.empty() && t.ssd_bytes == 0)
    return tiers.Error("ssd_path", "needs ssd_bytes > 0");
  STRATA_RETURN_IF_ERROR(top.NoUnknownKeys());
  return p;
}

}  // namespace

KvProfile DefaultProfile() {
  KvProfile p;
  p.name = "default";
  return p;
}

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  const std::string s(absl::StripAsciiWhitespace(text));
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  int64_t value;
  if (digits == 0 || !absl::SimpleAtoi(s.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", text, "\" is not a byte size (e.g. 8GiB)"));
  }
  const std::string unit(absl::StripAsciiWhitespace(s.substr(digits)));
  static const std::pair<const char*, int64_t> kUnits[] = {{"", 1},
                                                           {"B", 1},
                                                           {"KB", 1000},
                                                           {"MB", 1000000},
                                                           {"GB", 1000000000},
                                                           {"TB", 1000000000000},
                                                           {"KiB", 1 << 10},
                                                           {"MiB", 1 << 20},
                                                           {"GiB", int64_t{1} << 30},
                                                           {"TiB", int64_t{1} << 40}};
  for (const auto& [name, scale] : kUnits) {
    if (unit == name) {
      if (value > INT64_MAX / scale)
        return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is too large"));
      return value * scale;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("\"", text, "\": unknown unit \"", unit,
                                                 "\" (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"));
}

absl::StatusOr<KvProfile> ParseProfile(const std::string& yaml_text, const std::string& source) {
  // yaml-cpp reports errors by exception; they stop here.
  try {
    return ParseNode(YAML::Load(yaml_text), source);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": invalid YAML at line ", e.mark.line + 1, ": ", e.msg));
  }
}

absl::StatusOr<KvProfile> LoadProfile(const std::string& path) {
  STRATA_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(path));
  return ParseProfile(text, path);
}

absl::Status CheckSupported(const KvProfile& p, const std::string& source) {
  auto unsupported = [&](const std::string& key, const std::string& value) {
    return absl::UnimplementedError(absl::StrCat(source, ": ", key, " ", value,
                                                 " is not available in this build yet (profile \"",
                                                 p.name, "\")"));
  };
  if (!p.tiers.ssd_path.empty()) return unsupported("tiers.ssd_path", "(an SSD tier)");
  return absl::OkStatus();
}

}  // namespace strata::kvtier

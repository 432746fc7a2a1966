#include "kvtier/profile.h"

#include <yaml-cpp/yaml.h>

#include <cctype>
#include <set>
#include <string>
#include <vector>

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

  // Every key not read, one line each.
  absl::Status NoUnknownKeys() const {
    std::vector<std::string> unknown;
    for (const auto& kv : node_) {
      const std::string key = kv.first.Scalar();
      if (seen_.count(key) == 0)
        unknown.push_back(std::string(Error(key, "unknown key").message()));
    }
    if (unknown.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrJoin(unknown, "\n"));
  }

 private:
  YAML::Node node_;
  std::string path_;
  const std::string& source_;
  std::set<std::string> seen_;
};

// Every problem of the profile is collected (one line each), not only the
// first, so that one run of `strata profile check` lists them all.
absl::StatusOr<KvProfile> ParseNode(const YAML::Node& root, const std::string& source) {
  if (!root.IsMap())
    return absl::InvalidArgumentError(absl::StrCat(source, ": a profile must be a YAML map"));
  std::vector<std::string> errors;
  auto note = [&errors](const absl::Status& s) {
    if (!s.ok()) errors.push_back(std::string(s.message()));
  };
  KvProfile p;
  MapReader top(root, "", source);
  note(top.String("name", &p.name));
  if (p.name.empty() && errors.empty()) note(top.Error("name", "is required"));
  for (char c : p.name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      note(top.Error("name", "may hold only letters, digits, '-', '_' and '.'"));
      break;
    }
  }
  note(top.String("codec", &p.codec, {"bf16", "fp8_e4m3", "int8", "int4"}));

  absl::StatusOr<YAML::Node> policy_node = top.Map("kv_policy");
  note(policy_node.status());
  if (policy_node.ok()) {
    MapReader policy(*policy_node, "kv_policy", source);
    KvPolicyConfig& k = p.policy;
    note(policy.String("type", &k.type, {"full", "streaming", "quest", "clusterkv"}));
    note(policy.Int("budget_tokens", &k.budget_tokens, 1, 1 << 24));
    note(policy.Int("sink_tokens", &k.sink_tokens, 0, 1 << 20));
    note(policy.Int("window_tokens", &k.window_tokens, 0, 1 << 24));
    note(policy.Int("tokens_per_cluster", &k.tokens_per_cluster, 1, 1 << 16));
    note(policy.Int("kmeans_iterations", &k.kmeans_iterations, 1, 1000));
    note(policy.Int("cluster_chunk_tokens", &k.cluster_chunk_tokens, 0, 1 << 24));
    note(policy.Int("full_layers", &k.full_layers, 0, 1024));
    note(policy.Int("quest_page_tokens", &k.quest_page_tokens, 1, 4096));
    note(policy.NoUnknownKeys());
  }

  absl::StatusOr<YAML::Node> tiers_node = top.Map("tiers");
  note(tiers_node.status());
  if (tiers_node.ok()) {
    MapReader tiers(*tiers_node, "tiers", source);
    TierConfig& t = p.tiers;
    note(tiers.Bytes("gpu_bytes", &t.gpu_bytes));
    note(tiers.Bytes("host_bytes", &t.host_bytes));
    note(tiers.Bytes("prefix_bytes", &t.prefix_bytes));
    note(tiers.String("ssd_path", &t.ssd_path));
    note(tiers.Bytes("ssd_bytes", &t.ssd_bytes));
    note(tiers.Bytes("ssd_prefix_bytes", &t.ssd_prefix_bytes));
    note(tiers.String("ssd_write_admission", &t.ssd_write_admission, {"never", "cold", "always"}));
    note(tiers.NoUnknownKeys());
    if (t.ssd_bytes > 0 && t.ssd_path.empty()) note(tiers.Error("ssd_bytes", "needs ssd_path"));
    if (t.prefix_bytes > t.host_bytes) {
      note(tiers.Error("prefix_bytes",
                       "is more than host_bytes (stored prefixes live in the host "
                       "tier)"));
    }
    if (t.ssd_prefix_bytes > t.ssd_bytes) {
      note(tiers.Error("ssd_prefix_bytes", "is more than ssd_bytes (it is part of them)"));
    }
    if (t.ssd_prefix_bytes > 0 && t.prefix_bytes == 0) {
      note(tiers.Error("ssd_prefix_bytes",
                       "needs prefix_bytes > 0 (prefix pages pass through the host tier)"));
    }
    if (!t.ssd_path.empty() && t.ssd_bytes == 0) {
      note(tiers.Error("ssd_path", "needs ssd_bytes > 0"));
    }
  }
  note(top.NoUnknownKeys());
  if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
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
  if (!p.tiers.ssd_path.empty() && p.tiers.host_bytes == 0) {
    return unsupported("tiers.ssd_path",
                       "without tiers.host_bytes (the SSD tier sits below a host "
                       "tier)");
  }
  return absl::OkStatus();
}

}  // namespace strata::kvtier

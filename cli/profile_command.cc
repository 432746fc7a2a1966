#include "cli/profile_command.h"

#include <cstdio>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/exit_status.h"
#include "engine/model.h"
#include "engine/model_loader.h"
#include "kvtier/kv_sizing.h"
#include "kvtier/profile.h"

namespace strata::cli {

void AddProfileCommand(CLI::App& app, ProfileFlags& f, int& exit_code) {
  CLI::App* profile = app.add_subcommand("profile", "KV profiles");
  profile->require_subcommand(1);
  CLI::App* check = profile->add_subcommand(
      "check", "Validate KV profile files and explain every error (budgets too, for a model)");
  check->add_option("files", f.files, "Profile YAML files")->required();
  check->add_option("--model", f.model_dir, "Check the budgets against this model's shapes");
  check->add_option("--dummy-weights", f.dummy_weights,
                    "... or a preset's shapes (llama-3-8b, ...)");
  check->add_option("--max-context", f.max_context, "Tokens per sequence the budgets must hold")
      ->check(CLI::Range(2, 1 << 24));
  check
      ->add_option("--kv-cache-dtype", f.kv_cache_dtype,
                   "The GPU cache's dtype: auto (bf16) or fp8_e4m3 (fp8)")
      ->check(CLI::IsMember({"auto", "fp8", "fp8_e4m3"}));
  check->callback([&f, &exit_code] { exit_code = RunProfileCheck(f); });
}

int RunProfileCheck(const ProfileFlags& f) {
  constexpr char kCmd[] = "strata profile check";
  std::optional<kvtier::KvSizingInput> model;
  if (!f.model_dir.empty() || !f.dummy_weights.empty()) {
    auto config = engine::LoadSourceConfig({f.model_dir, f.dummy_weights});
    if (!config.ok()) return ExitWithError(kCmd, config.status());
    auto kv_cache = engine::ParseKvCacheType(f.kv_cache_dtype);
    if (!kv_cache.ok()) return ExitWithError(kCmd, kv_cache.status());
    model.emplace();
    model->config = *config;
    model->kv_dtype =
        *kv_cache == engine::KvCacheType::kFp8E4M3 ? engine::DType::kF8E4M3 : engine::DType::kBF16;
    model->max_context = std::min(f.max_context, config->max_position_embeddings);
  }
  bool all_ok = true;
  for (const std::string& path : f.files) {
    std::vector<std::string> problems;
    absl::StatusOr<kvtier::KvProfile> profile = kvtier::LoadProfile(path);
    if (!profile.ok()) {
      for (absl::string_view line : absl::StrSplit(profile.status().message(), '\n')) {
        problems.emplace_back(line);
      }
    } else {
      if (absl::Status s = kvtier::CheckSupported(*profile, path); !s.ok()) {
        problems.emplace_back(s.message());
      }
      if (model.has_value()) {
        for (const std::string& p : kvtier::BudgetProblems(*profile, *model)) {
          problems.push_back(absl::StrCat(path, ": ", p));
        }
      }
    }
    if (problems.empty()) {
      std::string how;
      if (model.has_value() && profile->tiers.gpu_bytes > 0) {
        kvtier::KvSizingInput in = *model;
        in.gpu_bytes = profile->tiers.gpu_bytes;
        if (auto s = kvtier::SizeKvCacheForProfiles({*profile}, in); s.ok()) {
          how = absl::StrCat(" (", in.max_context, "-token sequences: ", s->Describe(), ")");
        }
      }
      std::printf("%s: ok%s\n", path.c_str(), how.c_str());
      continue;
    }
    all_ok = false;
    for (const std::string& p : problems) std::printf("%s\n", p.c_str());
  }
  return all_ok ? 0 : 2;
}

}  // namespace strata::cli

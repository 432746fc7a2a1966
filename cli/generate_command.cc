#include "cli/generate_command.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/backend_factory.h"
#include "cli/exit_status.h"
#include "common/logging.h"
#include "engine/batcher.h"
#include "engine/model_loader.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/profile.h"
#include "kvtier/ssd_store.h"
#include "nlohmann/json.hpp"
#include "strata/v1/generate.grpc.pb.h"

namespace strata::cli {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  if (absl::StripAsciiWhitespace(text).empty()) return ids;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &id)) {
      return absl::InvalidArgumentError(absl::StrCat(flag, ": \"", part, "\" is not a token id"));
    }
    ids.push_back(id);
  }
  return ids;
}

int Fail(const absl::Status& status) { return ExitWithError("strata generate", status); }

// Prints generated tokens as they arrive, in the format the flags ask for,
// and the closing summary. Shared by local and remote generation so their
// output is identical.
class TokenPrinter {
 public:
  TokenPrinter(const GenerateFlags& f, bool has_text) : f_(f), has_text_(has_text) {
    if (!f_.json && !f_.logprobs && has_text_) std::fputs(f_.prompt.c_str(), stdout);
  }

  void Token(int32_t id, float logprob, const std::string& text) {
    const auto now = Clock::now();
    if (completion_tokens_ == 1) second_token_ = now;
    if (completion_tokens_++ == 0) first_token_ = now;
    last_token_ = now;
    if (f_.json) {
      nlohmann::json j = {{"token_id", id}, {"text", text}, {"logprob", logprob}};
      std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else if (f_.logprobs || !has_text_) {
      std::printf("%d\t%.6f\t%s\n", id, logprob, text.c_str());
    } else {
      std::fputs(text.c_str(), stdout);
    }
    std::fflush(stdout);
  }

  // Text that came without a token of its own (held-back text at the end).
  void TrailingText(const std::string& text) {
    if (text.empty()) return;
    if (f_.json) {
      std::cout << nlohmann::json({{"text", text}})
                       .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                << "\n";
    } else {
      std::fputs(text.c_str(), stdout);
    }
  }

  // `kv` (local runs with a profile): the KV tiers' statistics.
  void Summary(size_t prompt_tokens, const std::string& finish, double load_s,
               const nlohmann::json& kv = nullptr) {
    const double ttft = std::chrono::duration<double>(first_token_ - start_).count();
    const double decode_s = std::chrono::duration<double>(last_token_ - first_token_).count();
    const double tok_s =
        completion_tokens_ > 1 && decode_s > 0 ? (completion_tokens_ - 1) / decode_s : 0.0;
    if (f_.json) {
      nlohmann::json summary = {
          {"summary",
           {{"prompt_tokens", prompt_tokens},
            {"completion_tokens", completion_tokens_},
            {"finish_reason", finish},
            {"time_to_first_token_ms", ttft * 1e3},
            {"decode_tokens_per_s", tok_s},
            // The first decode step (where a KV policy first organises
            // the prompt, e.g. ClusterKV's k-means).
            {"second_token_ms",
             completion_tokens_ > 1
                 ? std::chrono::duration<double, std::milli>(second_token_ - first_token_).count()
                 : 0.0},
            {"load_s", load_s},
            {"backend", f_.server.empty() ? f_.backend : "server " + f_.server}}}};
      if (!kv.is_null()) summary["summary"]["kv"] = kv;
      std::cout << summary.dump() << "\n";
    } else {
      if (!f_.logprobs && has_text_) std::fputs("\n", stdout);
      std::fflush(stdout);
      std::fprintf(stderr,
                   "[%zu prompt tokens, %d generated, finish: %s, time to first token %.1f ms, "
                   "%.1f tokens/s]\n",
                   prompt_tokens, completion_tokens_, finish.c_str(), ttft * 1e3, tok_s);
    }
  }

 private:
  const GenerateFlags& f_;
  const bool has_text_;
  const Clock::time_point start_ = Clock::now();
  Clock::time_point first_token_ = start_, second_token_ = start_, last_token_ = start_;
  int completion_tokens_ = 0;
};

std::string FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    case v1::FINISH_REASON_ERROR:
      return "error";
    default:
      return "none";
  }
}

absl::StatusCode FromGrpc(grpc::StatusCode code) {
  return code == grpc::StatusCode::INVALID_ARGUMENT ? absl::StatusCode::kInvalidArgument
                                                    : absl::StatusCode::kUnavailable;
}

int RunRemote(const GenerateFlags& f, const std::vector<int32_t>& prompt_ids,
              const std::vector<int32_t>& stop_ids) {
  auto channel = grpc::CreateChannel(f.server, grpc::InsecureChannelCredentials());
  auto stub = v1::Generation::NewStub(channel);
  v1::GenerateRequest request;
  request.set_profile(f.server_profile);
  if (prompt_ids.empty()) {
    request.set_text(f.prompt);
  } else {
    request.mutable_token_ids()->mutable_ids()->Add(prompt_ids.begin(), prompt_ids.end());
  }
  v1::SamplingParams* sampling = request.mutable_sampling();
  sampling->set_temperature(f.temperature);
  sampling->set_top_p(f.top_p);
  sampling->set_top_k(f.top_k);
  sampling->set_seed(f.seed);
  v1::StoppingCriteria* stopping = request.mutable_stopping();
  stopping->set_max_tokens(f.max_tokens);
  for (const auto& s : f.stop) stopping->add_stop(s);
  stopping->mutable_stop_token_ids()->Add(stop_ids.begin(), stop_ids.end());
  stopping->set_ignore_eos(f.ignore_eos);
  request.set_return_logprobs(true);

  grpc::ClientContext context;
  if (f.timeout_seconds > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(f.timeout_seconds * 1000)));
  }
  TokenPrinter printer(f, /*has_text=*/true);
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  size_t prompt_tokens = prompt_ids.size();
  std::string finish = "none";
  nlohmann::json kv = nullptr;
  while (reader->Read(&response)) {
    const int n = response.token_ids_size();
    for (int i = 0; i < n; ++i) {
      // A response's text belongs to its tokens together; print it with the last.
      printer.Token(response.token_ids(i),
                    i < response.logprobs_size() ? response.logprobs(i) : 0.0f,
                    i == n - 1 ? response.text() : "");
    }
    if (n == 0) printer.TrailingText(response.text());
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      finish = FinishName(response.finish_reason());
      prompt_tokens = response.usage().prompt_tokens();
      kv = {{"cached_prompt_tokens", response.usage().cached_prompt_tokens()}};
    }
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    return Fail(absl::Status(FromGrpc(status.error_code()),
                             absl::StrCat(f.server, ": ", status.error_message())));
  }
  printer.Summary(prompt_tokens, finish, 0.0, kv);
  return 0;
}

}  // namespace

void AddGenerateCommand(CLI::App& app, GenerateFlags& f, int& exit_code) {
  CLI::App* cmd =
      app.add_subcommand("generate", "Generate text from a prompt, locally or from a server");
  cmd->add_option("--server", f.server, "HOST:PORT of a strata server (instead of a local model)");
  cmd->add_option("--timeout", f.timeout_seconds,
                  "With --server: deadline of the call in seconds (0: none)");
  cmd->add_option("--model", f.model_dir, "Hugging Face model directory");
  auto* prompt = cmd->add_option("--prompt", f.prompt, "Prompt text");
  auto* ids = cmd->add_option("--prompt-ids", f.prompt_ids,
                              "Prompt as comma-separated token ids (@FILE: read them from FILE)");
  prompt->excludes(ids);
  cmd->add_option("--max-tokens", f.max_tokens, "Tokens to generate")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", f.temperature, "0 for greedy");
  cmd->add_option("--top-p", f.top_p, "Nucleus probability mass");
  cmd->add_option("--top-k", f.top_k, "Sample among the K most likely (0: all)");
  cmd->add_option("--seed", f.seed, "Sampling seed");
  cmd->add_option("--backend", f.backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option(
      "--dummy-weights", f.dummy_weights,
      "Random weights: a preset (llama-3-8b, llama-3-70b, llama-3-1b, qwen2-0.5b, tiny) or "
      "\"config\" for --model's config");
  cmd->add_flag("--logprobs", f.logprobs, "Print each token's log-probability");
  cmd->add_flag("--json", f.json, "One JSON object per token, then a summary object");
  cmd->add_flag("--ignore-eos", f.ignore_eos, "Keep generating past end-of-sequence tokens");
  cmd->add_option("--stop", f.stop, "Stop string (repeatable)");
  cmd->add_option("--stop-token-ids", f.stop_token_ids, "Comma-separated ids that end generation");
  cmd->add_option("--threads", f.threads, "CPU backend threads (0: all cores)");
  cmd->add_option("--tensor-parallel", f.tensor_parallel,
                  "Split the model over N ranks (GPUs 0..N-1 on cuda, through NCCL)")
      ->check(CLI::Range(1, 64));
  cmd->add_option("--collective-timeout-seconds", f.collective_timeout_seconds,
                  "Seconds a tensor-parallel rank waits for the others in a collective before "
                  "the step fails")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-batch-tokens", f.max_batch_tokens, "Prefill chunk size")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--kv-cache-dtype", f.kv_cache_dtype,
                  "KV cache storage: auto (the activation dtype) or fp8_e4m3 (fp8)")
      ->check(CLI::IsMember({"auto", "fp8", "fp8_e4m3"}));
  cmd->add_option("--profile", f.profile,
                  "KV profile YAML: its policy, codec and host tier, as strata serve uses them");
  cmd->add_option("--server-profile", f.server_profile,
                  "With --server: the name of the server's profile the request uses (see its "
                  "ModelInfo; default: the server's default)");
  cmd->callback([&f, &exit_code] { exit_code = RunGenerate(f); });
}

int RunGenerate(const GenerateFlags& f) {
  if (f.prompt.empty() && f.prompt_ids.empty()) {
    return Fail(absl::InvalidArgumentError("give --prompt TEXT or --prompt-ids 1,2,3"));
  }
  // "@FILE": the ids are in a file (a long prompt passes the limit of one
  // command-line argument).
  std::string prompt_ids_text = f.prompt_ids;
  if (absl::StartsWith(prompt_ids_text, "@")) {
    std::ifstream in(prompt_ids_text.substr(1));
    if (!in) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--prompt-ids: cannot read ", prompt_ids_text.substr(1))));
    }
    prompt_ids_text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto prompt_ids = ParseIds(prompt_ids_text, "--prompt-ids");
  if (!prompt_ids.ok()) return Fail(prompt_ids.status());
  auto stop_ids = ParseIds(f.stop_token_ids, "--stop-token-ids");
  if (!stop_ids.ok()) return Fail(stop_ids.status());
  if (!f.server.empty()) {
    if (!f.model_dir.empty() || !f.dummy_weights.empty() || !f.profile.empty()) {
      return Fail(absl::InvalidArgumentError(
          "--server excludes --model, --dummy-weights and --profile (the server has its own)"));
    }
    return RunRemote(f, *prompt_ids, *stop_ids);
  }
  if (!f.server_profile.empty()) {
    return Fail(absl::InvalidArgumentError("--server-profile needs --server"));
  }
  if (f.model_dir.empty() && f.dummy_weights.empty()) {
    return Fail(absl::InvalidArgumentError(
        "give --model DIR, --dummy-weights PRESET or --server HOST:PORT"));
  }
  kvtier::KvProfile profile = kvtier::DefaultProfile();
  if (!f.profile.empty()) {
    auto loaded_profile = kvtier::LoadProfile(f.profile);
    if (!loaded_profile.ok()) return Fail(loaded_profile.status());
    if (auto s = kvtier::CheckSupported(*loaded_profile, f.profile); !s.ok()) return Fail(s);
    profile = *std::move(loaded_profile);
  }
  auto ranks = CreateRanks(
      f.backend, f.threads, f.tensor_parallel,
      std::chrono::milliseconds(static_cast<int64_t>(f.collective_timeout_seconds * 1000)));
  if (!ranks.ok()) return Fail(ranks.status());

  engine::ModelSource source{f.model_dir, f.dummy_weights};
  // Size the context for this one request.
  const int prompt_guess = prompt_ids->empty() ? static_cast<int>(f.prompt.size()) + 8
                                               : static_cast<int>(prompt_ids->size());
  engine::ModelOptions options;
  options.max_seqs = 1;
  options.max_batch_tokens = f.max_batch_tokens;
  options.max_context = prompt_guess + f.max_tokens + 1;
  auto kv_cache = engine::ParseKvCacheType(f.kv_cache_dtype);
  if (!kv_cache.ok()) return Fail(kv_cache.status());
  options.kv_cache = *kv_cache;
  auto config = engine::LoadSourceConfig(source);
  if (!config.ok()) return Fail(config.status());
  if (profile.tiers.host_bytes > 0 && profile.policy.type == "clusterkv" &&
      profile.policy.full_layers < config->num_layers) {
    // Two page groups: the request's pages below the profile's sparse
    // layers; from them its pages too (the prompt is prefilled whole before
    // it is clustered) and the ring its host-homed clusters are recalled
    // into (twice the budget). The upper pages of clusters in the host tier
    // are freed as they go there.
    const int context_pages = (options.max_context + options.page_size - 1) / options.page_size;
    options.num_pages = context_pages;
    options.num_upper_pages =
        context_pages +
        (2 * profile.policy.budget_tokens + options.page_size - 1) / options.page_size;
    options.upper_first_layer = profile.policy.full_layers;
  }
  if (absl::Status s = LoadRanks(**ranks, source, options); !s.ok()) return Fail(s);
  engine::LoadedModel* loaded = &(*ranks)->loaded;
  const engine::Tokenizer* tokenizer = loaded->tokenizer.get();
  engine::Model* model = loaded->model.get();
  // The profile's SSD tier is opened (and checked) even though one
  // sequence is never paused: a bad path fails here as it would in serve.
  auto ssd = kvtier::OpenSsdForProfiles(
      {profile},
      std::filesystem::path(source.model_dir.empty() ? source.dummy_preset : source.model_dir)
          .lexically_normal()
          .filename()
          .string());
  if (!ssd.ok()) return Fail(ssd.status());
  // As serve's: a profile's stored prefixes (on its SSD tier, from earlier
  // runs or servers of the same model and KV format) serve this prompt too.
  auto manager_options = kvtier::ManagerOptionsForProfiles(
      {profile}, ssd->get(),
      absl::StrCat(
          std::filesystem::path(source.model_dir.empty() ? source.dummy_preset : source.model_dir)
              .lexically_normal()
              .filename()
              .string(),
          "/", engine::KvCacheTypeName(options.kv_cache),
          // A record of several ranks holds each rank's heads apart.
          f.tensor_parallel > 1 ? absl::StrCat("/tp", f.tensor_parallel) : ""));
  if (!manager_options.ok()) return Fail(manager_options.status());
  auto kv_manager = kvtier::KvBlockManager::Create(model, *manager_options);
  if (!kv_manager.ok()) return Fail(kv_manager.status());
  std::unique_ptr<kvtier::RankedKvPolicies> policies;  // a runner per rank
  kvtier::KvPolicyRunner* runner = nullptr;            // rank 0's, for its statistics
  if (profile.policy.type != "full") {
    auto tier = kvtier::KvTierOptions::FromProfiles({profile}, kv_manager->get());
    if (!tier.ok()) return Fail(tier.status());
    auto installed = kvtier::RankedKvPolicies::Install(model, {profile.policy},
                                                       {.max_sparse_seqs = 1, .tier = *tier});
    if (!installed.ok()) return Fail(installed.status());
    policies = std::move(*installed);
    runner = &policies->leader();
  }

  std::vector<int32_t> prompt = *prompt_ids;
  if (prompt.empty()) {
    if (tokenizer == nullptr) {
      return Fail(absl::InvalidArgumentError(
          "--prompt needs a tokenizer in the model directory; use --prompt-ids"));
    }
    auto encoded = tokenizer->Encode(f.prompt, /*add_special_tokens=*/true);
    if (!encoded.ok()) return Fail(encoded.status());
    prompt = *std::move(encoded);
  }

  engine::Batcher batcher(model, tokenizer, {}, kv_manager->get());
  engine::GenerationRequest request;
  request.id = 1;
  request.prompt = prompt;
  request.max_tokens = f.max_tokens;
  request.sampling = {f.temperature, f.top_k, f.top_p, f.seed};
  request.stop_token_ids = *stop_ids;
  request.stop_strings = f.stop;
  request.ignore_eos = f.ignore_eos;
  if (auto s = batcher.Add(request); !s.ok()) return Fail(s);

  TokenPrinter printer(f, tokenizer != nullptr);
  engine::FinishReason finish = engine::FinishReason::kNone;
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    if (!events.ok()) return Fail(events.status());
    // Waiting for its stored prefix to come up from the SSD.
    if (batcher.last_step_idle()) std::this_thread::sleep_for(std::chrono::microseconds(200));
    for (const engine::TokenEvent& e : *events) {
      if (e.token_id >= 0) printer.Token(e.token_id, e.logprob, e.text);
      if (e.finish != engine::FinishReason::kNone) finish = e.finish;
    }
  }
  // Its KV stored for the next run (host copies, then the SSD writes).
  if (absl::StatusOr<bool> landed = (*kv_manager)->FinishPrefixWrites(std::chrono::seconds(60));
      !landed.ok() || !*landed) {
    STRATA_LOG_WARN("stored prefixes not all written to the SSD tier: {}",
                    landed.ok() ? "timed out" : landed.status().ToString());
  }
  nlohmann::json kv = nullptr;
  if (!f.profile.empty()) {
    const kvtier::KvBlockManager::Stats tiers = (*kv_manager)->stats();
    kv = {{"profile", profile.name},
          {"policy", profile.policy.type},
          {"codec", profile.codec},
          {"host_bytes", tiers.host_bytes_total},
          {"swap_outs", tiers.swap_outs},
          {"ssd_bytes", *ssd != nullptr ? (*ssd)->stats().budget_bytes : 0},
          {"ssd_swap_outs", tiers.ssd_swap_outs},
          {"upper_pages", tiers.upper_pages_total},
          {"upper_pages_released", batcher.num_upper_pages_released()},
          {"cached_prompt_tokens", tiers.prefix_tokens_loaded},
          {"prefix_pages_stored", tiers.prefix_pages_stored},
          {"ssd_prefix_pages", tiers.ssd_prefix_pages},
          {"ssd_prefix_pages_written", tiers.ssd_prefix_pages_written},
          {"ssd_prefix_pages_read", tiers.ssd_prefix_pages_read},
          {"ssd_prefix_bytes_read", tiers.ssd_prefix_bytes_read},
          {"ssd_prefix_read_ms", static_cast<double>(tiers.ssd_prefix_read_micros) / 1e3},
          {"ssd_prefix_pages_lost", tiers.ssd_prefix_pages_lost},
          {"ssd_reads_timed_out", tiers.ssd_reads_timed_out}};
    if (runner != nullptr) {
      const kvtier::KvPolicyRunner::Stats& s = runner->stats();
      kv["sparse_queries"] = s.sparse_queries;
      kv["clusterings"] = s.clusterings;
      kv["clusterings_reused"] = s.reused_clusterings;
      kv["clusterings_kept"] = s.kept_clusterings;
      kv["clusterings_imported"] = s.imported_clusterings;
      kv["offloads"] = s.offloads;
      kv["offloaded_bytes"] = s.offloaded_bytes;
      kv["recall_hit_tokens"] = s.recall_hit_tokens;
      kv["recall_refreshed_tokens"] = s.recall_refreshed_tokens;
      kv["recall_tokens"] = s.recall_tokens;
      kv["recall_bytes"] = s.recall_kib * 1024;
      kv["recall_bad_pieces"] = s.recall_bad_pieces;
      kv["recall_ms"] = static_cast<double>(s.recall_micros) / 1e3;
      kv["recall_steps"] = s.recall_steps;
      kv["prefetch_tokens"] = s.prefetch_tokens;
      kv["prefetch_bytes"] = s.prefetch_kib * 1024;
      kv["prefetch_ms"] = static_cast<double>(s.prefetch_micros) / 1e3;
      kv["lost_sequences"] = s.lost_sequences;
      kv["ssd_cluster_spills"] = s.spills;
      kv["ssd_clusters_spilled"] = s.spilled_clusters;
      kv["ssd_cluster_spills_refused"] = s.spills_refused;
      kv["ssd_hard_misses"] = s.hard_misses;
      kv["ssd_hard_miss_bytes"] = s.hard_miss_bytes;
      kv["ssd_hard_miss_ms"] = static_cast<double>(s.hard_miss_micros) / 1e3;
      kv["ssd_hard_miss_failed"] = s.hard_miss_failed;
      kv["ssd_hard_miss_timeouts"] = s.hard_miss_timeouts;
      kv["ssd_read_ahead_clusters"] = s.read_ahead_clusters;
      kv["ssd_read_ahead_bytes"] = s.read_ahead_bytes;
      kv["ssd_hard_misses_read_ahead"] = s.read_ahead_used;
      kv["ssd_cluster_writes_abandoned"] = s.spill_writes_abandoned;
      kv["ssd_cluster_promotions"] = s.promotions;
      kv["ssd_clusters_promoted"] = s.promoted_clusters;
      kv["ssd_cluster_promoted_bytes"] = s.promoted_bytes;
    }
  }
  printer.Summary(prompt.size(), std::string(engine::FinishReasonName(finish)),
                  loaded->load_seconds, kv);
  policies.reset();  // the planners off the models before they go
  return 0;
}

}  // namespace strata::cli

#include "cli/generate_command.h"

#include <chrono>
#include <cstdio>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/backend_factory.h"
#include "engine/batcher.h"
#include "engine/model_loader.h"
#include "nlohmann/json.hpp"

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

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "strata generate: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

void AddGenerateCommand(CLI::App& app, GenerateFlags& f, int& exit_code) {
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt with a local model");
  cmd->add_option("--model", f.model_dir, "Hugging Face model directory");
  auto* prompt = cmd->add_option("--prompt", f.prompt, "Prompt text");
  auto* ids = cmd->add_option("--prompt-ids", f.prompt_ids, "Prompt as comma-separated token ids");
  prompt->excludes(ids);
  cmd->add_option("--max-tokens", f.max_tokens, "Tokens to generate")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", f.temperature, "0 for greedy");
  cmd->add_option("--top-p", f.top_p, "Nucleus probability mass");
  cmd->add_option("--top-k", f.top_k, "Sample among the K most likely (0: all)");
  cmd->add_option("--seed", f.seed, "Sampling seed");
  cmd->add_option("--backend", f.backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dummy-weights", f.dummy_weights,
                  "Random weights: a preset (llama-3-8b, llama-3-1b, qwen2-0.5b, tiny) or "
                  "\"config\" for --model's config");
  cmd->add_flag("--logprobs", f.logprobs, "Print each token's log-probability");
  cmd->add_flag("--json", f.json, "One JSON object per token, then a summary object");
  cmd->add_flag("--ignore-eos", f.ignore_eos, "Keep generating past end-of-sequence tokens");
  cmd->add_option("--stop", f.stop, "Stop string (repeatable)");
  cmd->add_option("--stop-token-ids", f.stop_token_ids, "Comma-separated ids that end generation");
  cmd->add_option("--threads", f.threads, "CPU backend threads (0: all cores)");
  cmd->add_option("--max-batch-tokens", f.max_batch_tokens, "Prefill chunk size")->check(CLI::Range(1, 1 << 20));
  cmd->callback([&f, &exit_code] { exit_code = RunGenerate(f); });
}

int RunGenerate(const GenerateFlags& f) {
  if (f.model_dir.empty() && f.dummy_weights.empty()) {
    return Fail(absl::InvalidArgumentError("give --model DIR or --dummy-weights PRESET"));
  }
  if (f.prompt.empty() && f.prompt_ids.empty()) {
    return Fail(absl::InvalidArgumentError("give --prompt TEXT or --prompt-ids 1,2,3"));
  }
  auto backend = CreateBackend(f.backend, f.threads);
  if (!backend.ok()) return Fail(backend.status());

  auto prompt_ids = ParseIds(f.prompt_ids, "--prompt-ids");
  if (!prompt_ids.ok()) return Fail(prompt_ids.status());
  auto stop_ids = ParseIds(f.stop_token_ids, "--stop-token-ids");
  if (!stop_ids.ok()) return Fail(stop_ids.status());

  engine::ModelSource source{f.model_dir, f.dummy_weights};
  // Size the context for this one request.
  const int prompt_guess = prompt_ids->empty() ? static_cast<int>(f.prompt.size()) + 8
                                               : static_cast<int>(prompt_ids->size());
  engine::ModelOptions options;
  options.max_seqs = 1;
  options.max_batch_tokens = f.max_batch_tokens;
  options.max_context = prompt_guess + f.max_tokens + 1;
  auto loaded = engine::LoadModel(source, backend->get(), options);
  if (!loaded.ok()) return Fail(loaded.status());
  const engine::Tokenizer* tokenizer = loaded->tokenizer.get();

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

  engine::Batcher batcher(loaded->model.get(), tokenizer);
  engine::GenerationRequest request;
  request.id = 1;
  request.prompt = prompt;
  request.max_tokens = f.max_tokens;
  request.sampling = {f.temperature, f.top_k, f.top_p, f.seed};
  request.stop_token_ids = *stop_ids;
  request.stop_strings = f.stop;
  request.ignore_eos = f.ignore_eos;
  if (auto s = batcher.Add(request); !s.ok()) return Fail(s);

  const auto start = Clock::now();
  Clock::time_point first_token, last_token;
  int completion_tokens = 0;
  engine::FinishReason finish = engine::FinishReason::kNone;
  if (!f.json && !f.logprobs && tokenizer != nullptr) std::fputs(f.prompt.c_str(), stdout);
  while (batcher.HasWork()) {
    auto events = batcher.Step();
    if (!events.ok()) return Fail(events.status());
    for (const engine::TokenEvent& e : *events) {
      last_token = Clock::now();
      if (completion_tokens++ == 0) first_token = last_token;
      if (f.json) {
        nlohmann::json j = {{"token_id", e.token_id}, {"text", e.text}, {"logprob", e.logprob}};
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      } else if (f.logprobs || tokenizer == nullptr) {
        std::printf("%d\t%.6f\t%s\n", e.token_id, e.logprob, e.text.c_str());
      } else {
        std::fputs(e.text.c_str(), stdout);
      }
      std::fflush(stdout);
      if (e.finish != engine::FinishReason::kNone) finish = e.finish;
    }
  }
  const double ttft = std::chrono::duration<double>(first_token - start).count();
  const double decode_s = std::chrono::duration<double>(last_token - first_token).count();
  const double tok_s = completion_tokens > 1 && decode_s > 0 ? (completion_tokens - 1) / decode_s : 0.0;
  if (f.json) {
    nlohmann::json summary = {
        {"summary",
         {{"prompt_tokens", prompt.size()},
          {"completion_tokens", completion_tokens},
          {"finish_reason", std::string(engine::FinishReasonName(finish))},
          {"time_to_first_token_ms", ttft * 1e3},
          {"decode_tokens_per_s", tok_s},
          {"load_s", loaded->load_seconds},
          {"backend", f.backend}}}};
    std::cout << summary.dump() << "\n";
  } else {
    if (!f.logprobs && tokenizer != nullptr) std::fputs("\n", stdout);
    std::fprintf(stderr,
                 "[%d prompt tokens, %d generated, finish: %s, time to first token %.1f ms, "
                 "%.1f tokens/s]\n",
                 static_cast<int>(prompt.size()), completion_tokens,
                 std::string(engine::FinishReasonName(finish)).c_str(), ttft * 1e3, tok_s);
  }
  return 0;
}

}  // namespace strata::cli

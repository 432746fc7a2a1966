#include "engine/batcher.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace strata::engine {

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

struct Batcher::Sequence {
  explicit Sequence(GenerationRequest r) : req(std::move(r)) { tokens = req.prompt; }
  GenerationRequest req;
  std::vector<int32_t> tokens;  // prompt + decode tokens fed so far + generated
  int num_computed = 0;         // tokens whose KV is in the cache
  int generated = 0;
  size_t decode_fed = 0;  // req.decode_tokens appended to `tokens`
  bool sampled = false;   // this step computed its last token's logits
  bool swapped = false;   // its KV (num_computed tokens) waits in the host tier
  bool lost = false;      // this step's KV was not trusted: recompute
  int cached_tokens = 0;  // of its first prefill, loaded from a stored prefix
  bool prefix_asked = false;
  bool prompt_stored = false;  // its prompt's KV went to the prefix store
  // Its KV came from another worker coded by a lossy codec: not what
  // computing it here gives, so never stored as a prefix.
  bool kv_inexact = false;
  // req.import_kv was loaded, failed or dropped: never asked again (a
  // recompute computes the prompt here).
  bool import_done = false;
  size_t generated_emitted = 0;  // of req.generated
  bool export_done = false;      // req.export_kv's final export was made
  SequencePages pages;
  // Token ids that end the sequence: its stop_token_ids, and the model's
  // eos ids unless ignore_eos. A set, so a long list costs O(1) per token.
  absl::flat_hash_set<int32_t> stop_ids;
  std::optional<IncrementalDetokenizer> detok;
  std::string text;    // decoded output so far
  size_t emitted = 0;  // bytes of `text` already returned
  bool finished = false;
};

Batcher::Batcher(Model* model, const Tokenizer* tokenizer, BatcherOptions options,
                 KvMemory* kv_memory)
    : model_(model), tokenizer_(tokenizer), options_(options), kv_(kv_memory) {
  if (kv_ == nullptr) {
    const ModelOptions& o = model->options();
    own_kv_ = std::make_unique<PagedKvMemory>(o.page_size, o.num_pages, o.num_upper_pages);
    kv_ = own_kv_.get();
  } else {
    // A prompt's KV may leave as its last step is computed (ExportByLayer).
    model_->set_layer_kv_observer(kv_);
  }
  for (int id : model->config().eos_token_ids) eos_ids_.push_back(id);
  if (tokenizer_ != nullptr) {
    for (int32_t id : tokenizer_->eos_ids()) {
      if (std::find(eos_ids_.begin(), eos_ids_.end(), id) == eos_ids_.end()) eos_ids_.push_back(id);
    }
  }
}

Batcher::~Batcher() {
  if (own_kv_ == nullptr) model_->set_layer_kv_observer(nullptr);
}

absl::Status Batcher::Add(GenerationRequest request) {
  if (absl::Status s = Validate(request); !s.ok()) {
    // Its KV from another worker will never be loaded.
    if (request.import_kv != 0) kv_->DropImported(request.import_kv);
    return s;
  }
  auto same_id = [&](const std::unique_ptr<Sequence>& s) { return s->req.id == request.id; };
  if (std::any_of(waiting_.begin(), waiting_.end(), same_id) ||
      std::any_of(running_.begin(), running_.end(), same_id) ||
      std::any_of(swapped_.begin(), swapped_.end(), same_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", request.id, ": a request with this id is already running"));
  }
  auto seq = std::make_unique<Sequence>(std::move(request));
  seq->pages.workload = seq->req.kv_policy;
  seq->stop_ids.insert(seq->req.stop_token_ids.begin(), seq->req.stop_token_ids.end());
  if (!seq->req.ignore_eos) seq->stop_ids.insert(eos_ids_.begin(), eos_ids_.end());
  if (tokenizer_ != nullptr) seq->detok.emplace(tokenizer_, /*skip_special_tokens=*/true);
  waiting_.push_back(std::move(seq));
  return absl::OkStatus();
}

absl::Status Batcher::Validate(const GenerationRequest& request) const {
  const ModelConfig& config = model_->config();
  const ModelOptions& opts = model_->options();
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("request ", request.id, ": ", what));
  };
  if (request.prompt.empty()) return bad("prompt is empty");
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return bad(
          absl::StrCat("prompt token id ", id, " outside the vocabulary of ", config.vocab_size));
    }
  }
  for (int32_t id : request.decode_tokens) {
    if (id < 0 || id >= config.vocab_size) {
      return bad(
          absl::StrCat("decode token id ", id, " outside the vocabulary of ", config.vocab_size));
    }
  }
  for (int32_t id : request.stop_token_ids) {
    if (id < 0 || id >= config.vocab_size) {
      return bad(absl::StrCat("stop token id ", id, " outside the vocabulary"));
    }
  }
  for (const SampledToken& token : request.generated) {
    if (token.id < 0 || token.id >= config.vocab_size) {
      return bad(absl::StrCat("generated token id ", token.id, " outside the vocabulary of ",
                              config.vocab_size));
    }
  }
  if (request.import_kv != 0 && request.generated.empty()) {
    return bad("imported KV needs the token generated after the prompt");
  }
  if (!request.generated.empty() && !request.decode_tokens.empty()) {
    return bad("generated tokens and decode tokens cannot be combined");
  }
  if (static_cast<int64_t>(request.generated.size()) > request.max_tokens) {
    return bad(absl::StrCat(request.generated.size(),
                            " tokens already generated exceed max_tokens ", request.max_tokens));
  }
  if (request.max_tokens <= 0) return bad("max_tokens must be positive");
  if (static_cast<int64_t>(request.prompt.size()) +
          static_cast<int64_t>(request.decode_tokens.size()) +
          static_cast<int64_t>(request.generated.size()) >=
      opts.max_context + (request.generated.empty() ? 0 : 1)) {
    const std::string what =
        request.decode_tokens.empty()
            ? absl::StrCat("prompt of ", request.prompt.size(), " tokens leaves")
            : absl::StrCat("prompt of ", request.prompt.size(), " tokens and ",
                           request.decode_tokens.size(), " decode tokens leave");
    return bad(absl::StrCat(what, " no room in the context of ", opts.max_context));
  }
  const int64_t pages_needed =
      (static_cast<int64_t>(request.prompt.size()) + opts.page_size) / opts.page_size;
  for (PageGroup group : {PageGroup::kLower, PageGroup::kUpper}) {
    if (group == PageGroup::kUpper && !kv_->has_upper_group()) continue;
    if (pages_needed > kv_->num_pages(group)) {
      return bad(absl::StrCat("prompt needs ", pages_needed, " KV pages, the cache has ",
                              kv_->num_pages(group),
                              group == PageGroup::kUpper ? " in its upper layers" : ""));
    }
  }
  if (!request.stop_strings.empty() && tokenizer_ == nullptr) {
    return bad("stop strings need a tokenizer");
  }
  for (const auto& s : request.stop_strings) {
    if (s.empty()) return bad("stop strings must not be empty");
  }
  if (absl::Status s = request.sampling.Validate(); !s.ok()) return bad(std::string(s.message()));
  return absl::OkStatus();
}

int64_t Batcher::queued_prompt_tokens() const {
  int64_t tokens = 0;
  for (const auto& seq : waiting_) {
    // A prompt whose KV is on its way from a prefill worker is not
    // computed here.
    if (seq->req.import_kv != 0 && !seq->import_done) continue;
    tokens += static_cast<int64_t>(seq->tokens.size()) - seq->num_computed;
  }
  return tokens;
}

int Batcher::MaxCachedPages() const {
  int pages = kv_->num_pages(PageGroup::kLower);
  if (kv_->has_upper_group()) pages = std::min(pages, kv_->num_pages(PageGroup::kUpper));
  return pages;
}

void Batcher::Cancel(uint64_t request_id) {
  auto cancel = [&](auto& container) {
    for (auto it = container.begin(); it != container.end(); ++it) {
      if ((*it)->req.id == request_id) {
        EndExport(**it);
        ReleaseKv(**it);
        container.erase(it);
        cancelled_.push_back(request_id);
        return true;
      }
    }
    return false;
  };
  if (cancel(waiting_) || cancel(running_)) return;
  cancel(swapped_);
}

bool Batcher::EnsurePages(Sequence& seq, int tokens) {
  return !OverCap(seq, tokens) && kv_->Grow(seq.pages, tokens);
}

int Batcher::page_cap(int policy) const {
  if (policy < 0 || policy >= static_cast<int>(options_.max_pages_per_policy.size())) return 0;
  const int cap = options_.max_pages_per_policy[policy];
  if (cap <= 0) return 0;
  const ModelOptions& opts = model_->options();
  return std::max(cap, (opts.max_context + opts.page_size - 1) / opts.page_size);
}

int Batcher::pages_of_policy(int policy) const {
  int pages = 0;
  auto add = [&](const auto& queue) {
    for (const auto& seq : queue) {
      if (seq->req.kv_policy == policy) pages += static_cast<int>(seq->pages.lower.size());
    }
  };
  add(running_);
  add(waiting_);
  return pages;
}

bool Batcher::OverCap(const Sequence& seq, int tokens) const {
  const int cap = page_cap(seq.req.kv_policy);
  if (cap == 0) return false;
  const int page = model_->options().page_size;
  const int more = (tokens + page - 1) / page - static_cast<int>(seq.pages.lower.size());
  return more > 0 && pages_of_policy(seq.req.kv_policy) + more > cap;
}

void Batcher::EndExport(Sequence& seq) {
  if (seq.req.export_kv != 0 && !seq.export_done) {
    // Ended (cancelled, failed) before its KV was all handed over: what
    // was is dropped.
    kv_->DropExport(seq.req.export_kv);
    seq.export_done = true;
  }
}

void Batcher::ReleaseKv(Sequence& seq) {
  seq.kv_inexact = false;  // its KV is gone: what is computed next is this worker's
  if (seq.req.import_kv != 0 && !seq.import_done) {
    kv_->DropImported(seq.req.import_kv);
    seq.import_done = true;
  }
  if (seq.swapped) {
    kv_->DropSwapped(static_cast<int64_t>(seq.req.id));
    seq.swapped = false;
  }
  if (absl::Status s = kv_->Free(seq.pages); !s.ok()) {
    STRATA_LOG_ERROR("request {}: {}", seq.req.id, s.ToString());
  }
  if (AttentionPlanner* planner = model_->attention_planner(); planner != nullptr) {
    planner->Release(static_cast<int64_t>(seq.req.id));
  }
}

bool Batcher::Preempt(Sequence& seq) {
  ++num_preemptions_;
  if (seq.num_computed > 0) {
    // The KV policy's state (e.g. the sequence's clusters) stays with the
    // planner, which may give back the GPU memory only the running
    // sequence needs (Pause): the KV comes back exactly as it was.
    absl::StatusOr<bool> swapped =
        kv_->SwapOut(static_cast<int64_t>(seq.req.id), seq.pages, seq.num_computed);
    if (!swapped.ok()) {
      STRATA_LOG_ERROR("request {}: swap-out failed, recomputing instead: {}", seq.req.id,
                       swapped.status().ToString());
    } else if (*swapped) {
      seq.swapped = true;
      ++num_swapped_out_;
      if (AttentionPlanner* planner = model_->attention_planner(); planner != nullptr) {
        planner->Pause(static_cast<int64_t>(seq.req.id));
      }
      return true;
    }
  }
  ReleaseKv(seq);
  seq.num_computed = 0;  // recomputed from its tokens (prompt + output so far)
  return false;
}

bool Batcher::ReclaimYoungerPrompts(const Sequence& oldest) {
  bool reclaimed = false;
  for (auto it = waiting_.rbegin(); it != waiting_.rend() && it->get() != &oldest; ++it) {
    Sequence& younger = **it;
    if (younger.pages.empty()) continue;
    ++num_preemptions_;
    ReleaseKv(younger);
    younger.num_computed = 0;
    reclaimed = true;
  }
  return reclaimed;
}

absl::Status Batcher::ResumeSwapped() {
  const int max_running = model_->options().max_seqs;
  while (!swapped_.empty() && static_cast<int>(running_.size()) < max_running) {
    Sequence& seq = *swapped_.front();
    const int64_t id = static_cast<int64_t>(seq.req.id);
    // Leave every running sequence a page to grow into this step, so that
    // bringing one back does not preempt another at once.
    const int headroom = static_cast<int>(running_.size());
    if (OverCap(seq, seq.num_computed)) break;
    if (kv_->num_free_pages(PageGroup::kLower) - kv_->SwapInPages(id, PageGroup::kLower) <
            headroom ||
        (kv_->has_upper_group() &&
         kv_->num_free_pages(PageGroup::kUpper) - kv_->SwapInPages(id, PageGroup::kUpper) <
             headroom)) {
      break;
    }
    // The planner's part first (e.g. a recall ring), then the KV.
    AttentionPlanner* planner = model_->attention_planner();
    if (planner != nullptr) {
      STRATA_ASSIGN_OR_RETURN(const bool ready, planner->Resume(id));
      if (!ready) break;
    }
    absl::StatusOr<bool> resumed = kv_->SwapIn(id, seq.pages);
    if (resumed.ok() && !*resumed) {
      if (planner != nullptr) planner->Pause(id);
      break;
    }
    // Any other error leaves the sequence swapped (its host copy is still
    // the manager's, and a cancel drops it).
    if (!resumed.ok() && !absl::IsDataLoss(resumed.status())) return resumed.status();
    seq.swapped = false;  // back on the GPU, or its host copy already dropped
    if (resumed.ok()) {
      running_.push_back(std::move(swapped_.front()));
      swapped_.pop_front();
      continue;
    }
    // The host copy is corrupt: never decode from it. The sequence starts
    // over from its tokens, so its output does not change.
    ++num_kv_lost_;
    STRATA_LOG_WARN("request {}: {}; recomputing its {} tokens", seq.req.id,
                    resumed.status().ToString(), seq.num_computed);
    ReleaseKv(seq);
    seq.num_computed = 0;
    waiting_.push_front(std::move(swapped_.front()));
    swapped_.pop_front();
  }
  return absl::OkStatus();
}

void Batcher::Finish(Sequence& seq, FinishReason reason, std::vector<TokenEvent>& events) {
  // Text held back (a possible stop-string prefix, bytes of an unfinished
  // character) goes out with the last event. Stop conditions have already
  // settled the text themselves.
  if (reason == FinishReason::kLength) {
    if (seq.detok) seq.text += seq.detok->Flush();
    events.back().text += seq.text.substr(seq.emitted);
    seq.emitted = seq.text.size();
  }
  events.back().finish = reason;
  events.back().cached_tokens = seq.cached_tokens;
  seq.finished = true;
  if (seq.req.export_kv != 0 &&
      (reason == FinishReason::kStop || reason == FinishReason::kLength)) {
    // Its KV goes on to the worker that decodes it (copied before the
    // pages are freed below).
    seq.export_done = true;
    if (absl::Status s = kv_->ExportKv(seq.req.export_kv,
                                       std::span<const int32_t>(seq.tokens).first(seq.num_computed),
                                       seq.pages, /*final=*/true);
        !s.ok()) {
      kv_->DropExport(seq.req.export_kv);
      ++num_failed_;
      events.back().finish = FinishReason::kError;
      events.back().error =
          absl::StrCat("request ", seq.req.id, ": its KV was not exported: ", s.message());
    }
  }
  const AttentionPlanner* planner = model_->attention_planner();
  if ((reason == FinishReason::kStop || reason == FinishReason::kLength) && !seq.kv_inexact &&
      (planner == nullptr || !planner->Reordered(static_cast<int64_t>(seq.req.id)))) {
    // Its KV may serve a later request that starts with the same tokens
    // (the next turn of a conversation, the same document again).
    if (absl::Status s = kv_->StorePrefix(
            std::span<const int32_t>(seq.tokens).first(seq.num_computed), seq.pages);
        !s.ok()) {
      STRATA_LOG_WARN("request {}: prefix not stored: {}", seq.req.id, s.ToString());
    }
  }
  ReleaseKv(seq);
}

void Batcher::StorePrompt(Sequence& seq) {
  // The prompt's KV is complete: it is stored now, before a KV policy that
  // reorders it in place (ClusterKV, at the first decode step) does, so
  // that a later request starting with the same document or conversation
  // loads it instead of computing it (what the request generates is stored
  // when it ends, where the KV stays in order).
  if (absl::Status s =
          kv_->StorePrefix(std::span<const int32_t>(seq.tokens).first(seq.num_computed), seq.pages);
      !s.ok()) {
    STRATA_LOG_WARN("request {}: prompt not stored: {}", seq.req.id, s.ToString());
  } else if (const uint64_t store = kv_->LastPrefixStore();
             store != 0 && model_->attention_planner() != nullptr) {
    model_->attention_planner()->NoteStoredPrompt(
        static_cast<int64_t>(seq.req.id), seq.num_computed,
        [kv = kv_, store] { return kv->PrefixStoreCrcs(store); });
  }
}

void Batcher::FailSequence(Sequence& seq, const std::string& error,
                           std::vector<TokenEvent>& events) {
  ++num_failed_;
  events.push_back({seq.req.id, -1, 0.0f, "", FinishReason::kError, error});
  seq.finished = true;
  EndExport(seq);
  ReleaseKv(seq);
}

void Batcher::EmitToken(Sequence& seq, const SampledToken& token, std::vector<TokenEvent>& events) {
  const ModelOptions& opts = model_->options();
  seq.tokens.push_back(token.id);
  ++seq.generated;
  events.push_back({seq.req.id, token.id, token.logprob, "", FinishReason::kNone, ""});

  if (seq.stop_ids.contains(token.id)) {
    if (seq.detok) seq.text += seq.detok->Flush();
    events.back().text = seq.text.substr(seq.emitted);
    seq.emitted = seq.text.size();
    Finish(seq, FinishReason::kStop, events);
    return;
  }
  if (seq.detok) seq.text += seq.detok->Push(token.id);

  // Stop strings: cut the text at the earliest match.
  size_t longest_stop = 0;
  size_t match = std::string::npos;
  for (const auto& stop : seq.req.stop_strings) {
    longest_stop = std::max(longest_stop, stop.size());
    const size_t from = seq.emitted >= stop.size() ? seq.emitted - stop.size() + 1 : 0;
    const size_t at = seq.text.find(stop, from);
    if (at != std::string::npos) match = std::min(match, at);
  }
  if (match != std::string::npos) {
    events.back().text =
        seq.text.substr(seq.emitted, match > seq.emitted ? match - seq.emitted : 0);
    seq.text.resize(std::max(match, seq.emitted));
    seq.emitted = seq.text.size();
    Finish(seq, FinishReason::kStop, events);
    return;
  }
  if (seq.generated >= seq.req.max_tokens ||
      static_cast<int>(seq.tokens.size()) >= opts.max_context) {
    Finish(seq, FinishReason::kLength, events);
    return;
  }
  // Hold back a tail that could still grow into a stop string.
  size_t hold = 0;
  for (const auto& stop : seq.req.stop_strings) {
    for (size_t len = std::min(stop.size() - 1, seq.text.size() - seq.emitted); len > hold; --len) {
      if (seq.text.compare(seq.text.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  const size_t ready = seq.text.size() - hold;
  if (ready > seq.emitted) {
    events.back().text = seq.text.substr(seq.emitted, ready - seq.emitted);
    seq.emitted = ready;
  }
}

absl::Status Batcher::PollKv() {
  // The planner first: what it hands the KV memory goes out in this poll.
  if (AttentionPlanner* planner = model_->attention_planner(); planner != nullptr) {
    STRATA_RETURN_IF_ERROR(planner->Poll());
  }
  return kv_->Poll();
}

std::vector<TokenEvent> Batcher::TakeGeneratedTokens() {
  std::vector<TokenEvent> events;
  for (auto& seq : waiting_) {
    while (!seq->finished && seq->generated_emitted < seq->req.generated.size()) {
      EmitToken(*seq, seq->req.generated[seq->generated_emitted++], events);
    }
  }
  std::erase_if(waiting_, [](const std::unique_ptr<Sequence>& s) { return s->finished; });
  return events;
}

absl::StatusOr<std::vector<TokenEvent>> Batcher::Step() {
  last_step_idle_ = false;
  std::vector<TokenEvent> events;
  for (uint64_t id : cancelled_) events.push_back({id, -1, 0.0f, "", FinishReason::kCancelled, ""});
  cancelled_.clear();

  STRATA_RETURN_IF_ERROR(PollKv());
  // Tokens generated elsewhere go out first, and may end their request.
  std::vector<TokenEvent> generated = TakeGeneratedTokens();
  events.insert(events.end(), generated.begin(), generated.end());
  STRATA_RETURN_IF_ERROR(ResumeSwapped());

  const ModelOptions& opts = model_->options();
  StepInput in;
  in.query_start.push_back(0);
  std::vector<Sequence*> step_seqs;
  std::vector<int> step_rows;         // chunk length per sequence in the step
  std::vector<bool> samples;          // whether the sequence samples this step
  std::vector<SamplingRow> sampling;  // per logit row
  int budget = opts.max_batch_tokens;
  auto add_rows = [&](Sequence& seq, int count, bool sample) {
    for (int j = 0; j < count; ++j) {
      in.token_ids.push_back(seq.tokens[seq.num_computed + j]);
      in.positions.push_back(seq.num_computed + j);
    }
    in.query_start.push_back(static_cast<int32_t>(in.token_ids.size()));
    in.context_len.push_back(seq.num_computed + count);
    in.block_tables.push_back(seq.pages.lower);
    if (kv_->has_upper_group()) in.upper_block_tables.push_back(seq.pages.upper);
    in.seq_ids.push_back(static_cast<int64_t>(seq.req.id));
    in.kv_policies.push_back(seq.req.kv_policy);
    if (sample) {
      in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()) - 1);
      // The counter is the index of the token being generated, so a seed
      // draws the same completion whatever else is batched (and after a
      // preemption).
      sampling.push_back({seq.req.sampling, static_cast<uint32_t>(seq.generated)});
    }
    step_seqs.push_back(&seq);
    step_rows.push_back(count);
    samples.push_back(sample);
    budget -= count;
  };

  // 1. Decodes, oldest first; preempt the newest when pages run out.
  for (size_t i = 0;
       i < running_.size() && budget > 0 && static_cast<int>(step_seqs.size()) < opts.max_seqs;) {
    Sequence& seq = *running_[i];
    if (EnsurePages(seq, seq.num_computed + 1)) {
      add_rows(seq, 1, true);
      ++i;
      continue;
    }
    // Victims go newest first, so pushing each to the front keeps both
    // queues oldest first. A sequence at its workload's cap preempts the
    // newest of its own workload (itself at the latest).
    size_t v = running_.size() - 1;
    if (OverCap(seq, seq.num_computed + 1)) {
      while (v > i && running_[v]->req.kv_policy != seq.req.kv_policy) --v;
    }
    std::unique_ptr<Sequence> victim = std::move(running_[v]);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(v));
    if (Preempt(*victim)) {
      swapped_.push_front(std::move(victim));
    } else {
      waiting_.push_front(std::move(victim));
    }
    // If the victim was `seq` itself, running_[i] is the next sequence.
  }
  // 2. Prefill chunks, oldest first, in the remaining budget.
  // A prompt waits for KV on its way: its stored prefix from the SSD, or
  // its transfer from a prefill worker.
  bool kv_arriving = false;
  int prefill_budget = options_.max_prefill_tokens_per_step > 0
                           ? std::min(budget, options_.max_prefill_tokens_per_step)
                           : budget;
  for (auto& seq_ptr : waiting_) {
    if (prefill_budget <= 0 || static_cast<int>(step_seqs.size()) >= opts.max_seqs) break;
    Sequence& seq = *seq_ptr;
    if (seq.finished) continue;
    // Swapped sequences are older: no new prompt starts before they are back.
    if (!swapped_.empty() && seq.pages.empty()) break;
    if (seq.req.import_kv != 0 && !seq.import_done && seq.pages.empty()) {
      // The prompt's KV was computed by another worker.
      // Named for admission (a KV policy taking part of it straight into a
      // lower tier) only when its next step is a decode step.
      const int64_t admit_as =
          seq.tokens.size() == seq.req.prompt.size() + 1 ? static_cast<int64_t>(seq.req.id) : -1;
      absl::StatusOr<bool> loaded =
          kv_->LoadImported(admit_as, seq.req.import_kv,
                            std::span<const int32_t>(seq.tokens).first(seq.req.prompt.size()),
                            seq.pages, running_.empty() ? 0 : options_.max_import_bytes_per_step);
      if (loaded.ok() && !*loaded) break;          // wait for pages
      if (absl::IsUnavailable(loaded.status())) {  // still arriving, or the rest next step
        kv_arriving = true;
        continue;
      }
      seq.import_done = true;
      if (absl::IsAborted(loaded.status()) && seq.req.import_fallback) {
        // Its sender failed after the first token went out: the prompt and
        // that token are computed here, as a prompt of its own would be.
        STRATA_LOG_WARN("request {}: computing the prompt here: {}", seq.req.id,
                        loaded.status().ToString());
      } else if (!loaded.ok()) {
        FailSequence(seq,
                     absl::StrCat("request ", seq.req.id,
                                  ": the prompt's KV from the prefill worker could not be used: ",
                                  loaded.status().ToString()),
                     events);
        continue;
      } else {
        seq.num_computed = static_cast<int>(seq.req.prompt.size());
        seq.prefix_asked = true;
        std::vector<std::vector<uint8_t>> state = kv_->TakeImportedPlannerState();
        // The prompt's KV is complete now, as after its last prefill chunk
        // (StorePrompt): stored before the first decode step reorders it,
        // and only when it came exact (a lossy wire codec's KV is not what
        // computing the prompt gives). Its first sampled step is a decode
        // step, after which the pages are no longer in token order.
        seq.prompt_stored = true;
        seq.kv_inexact = !kv_->ImportedKvExact();
        if (!seq.kv_inexact) StorePrompt(seq);
        if (!state.empty() && model_->attention_planner() != nullptr) {
          model_->attention_planner()->NoteImportedState(static_cast<int64_t>(seq.req.id),
                                                         std::move(state));
        }
      }
    }
    if (seq.num_computed == 0 && seq.pages.empty() && seq.tokens.size() > 2) {
      // A stored prefix saves computing its KV. Two tokens at least are
      // computed, so that the rest is a prefill chunk (a lone token would
      // look like a decode step to a sparse KV policy).
      absl::StatusOr<int> loaded = kv_->LoadPrefix(
          std::span<const int32_t>(seq.tokens).first(seq.tokens.size() - 1), seq.pages);
      if (absl::IsUnavailable(loaded.status())) {
        // Its prefix is on its way up from a lower tier: asked again next
        // step, and younger prompts may go first meanwhile.
        kv_arriving = true;
        continue;
      }
      if (!loaded.ok()) {
        STRATA_LOG_WARN("request {}: stored prefix not loaded: {}", seq.req.id,
                        loaded.status().ToString());
      } else {
        seq.num_computed = *loaded;
        if (!seq.prefix_asked) seq.cached_tokens = *loaded;
        if (*loaded > 0 && model_->attention_planner() != nullptr) {
          model_->attention_planner()->NotePrompt(static_cast<int64_t>(seq.req.id), *loaded,
                                                  kv_->LoadedPrefixCrcs());
        }
      }
      seq.prefix_asked = true;
    }
    const int remaining = static_cast<int>(seq.tokens.size()) - seq.num_computed;
    int chunk = std::min(remaining, prefill_budget);
    // A prompt's last token is never left alone for the next step: a
    // one-token chunk would look like a decode step to a sparse KV policy,
    // which would organise the prompt (ClusterKV reorders it) before the
    // prompt is complete.
    if (remaining - chunk == 1 && chunk > 1) --chunk;
    // At its workload's cap: it waits, and other workloads' prompts go on.
    if (OverCap(seq, seq.num_computed + chunk)) continue;
    if (!EnsurePages(seq, seq.num_computed + chunk) &&
        !(step_seqs.empty() && ReclaimYoungerPrompts(seq) &&
          EnsurePages(seq, seq.num_computed + chunk))) {
      break;  // wait for pages
    }
    if (seq.req.export_kv != 0 && model_->attention_planner() != nullptr) {
      // Again after a recomputation (Release forgot it).
      model_->attention_planner()->NoteExport(static_cast<int64_t>(seq.req.id), seq.req.export_kv,
                                              static_cast<int>(seq.tokens.size()));
    }
    add_rows(seq, chunk, chunk == remaining);
    prefill_budget -= chunk;
  }
  // Those that failed to load their KV are done (none is in this step).
  std::erase_if(waiting_, [](const std::unique_ptr<Sequence>& s) { return s->finished; });
  if (in.token_ids.empty() && running_.empty() && !swapped_.empty() &&
      !kv_->SwapMoving(static_cast<int64_t>(swapped_.front()->req.id))) {
    // Nothing could run and the oldest swapped sequence still does not fit
    // beside the pages that waiting prompts hold: it gives up its host copy
    // and is recomputed, so that the batcher always moves on.
    Sequence& seq = *swapped_.front();
    STRATA_LOG_WARN("request {}: cannot swap back in ({} pages free); recomputing it", seq.req.id,
                    kv_->num_free_pages(PageGroup::kLower));
    ReleaseKv(seq);
    seq.num_computed = 0;
    waiting_.push_front(std::move(swapped_.front()));
    swapped_.pop_front();
    return events;
  }
  if (in.token_ids.empty()) {
    last_step_idle_ = events.empty();
    // Nothing runs and the oldest waiting sequence still cannot get its
    // pages: it needs more than the whole cache. It ends with an error; the
    // requests behind it go on.
    if (!waiting_.empty() && running_.empty() && swapped_.empty() && !kv_arriving) {
      Sequence& seq = *waiting_.front();
      TokenEvent e{seq.req.id, -1, 0.0f, "", FinishReason::kError, ""};
      e.error = absl::StrCat("request ", seq.req.id, " needs ", seq.tokens.size(),
                             " tokens of KV cache; the cache holds ",
                             int64_t{MaxCachedPages()} * opts.page_size);
      events.push_back(std::move(e));
      EndExport(seq);
      ReleaseKv(seq);
      waiting_.pop_front();
    }
    return events;
  }

  bool layer_exports = false;
  for (size_t k = 0; k < step_seqs.size(); ++k) {
    Sequence& seq = *step_seqs[k];
    if (seq.req.export_kv != 0 && !seq.export_done && samples[k] &&
        seq.num_computed + step_rows[k] == static_cast<int>(seq.tokens.size()) &&
        seq.generated == 0) {
      // The prompt's last chunk: its KV may leave layer by layer as this
      // step computes it.
      layer_exports |= kv_->ExportByLayer(seq.req.export_kv, seq.tokens, seq.pages);
    }
  }
  absl::StatusOr<std::vector<SampledToken>> forward = model_->ForwardSample(in, sampling);
  if (layer_exports) STRATA_RETURN_IF_ERROR(kv_->FinishLayerExports());
  STRATA_ASSIGN_OR_RETURN(std::vector<SampledToken> sampled, std::move(forward));
  // Sequences whose KV the planner could not trust this step: their tokens
  // are dropped and they start over from their tokens.
  absl::flat_hash_set<int64_t> lost;
  if (AttentionPlanner* planner = model_->attention_planner(); planner != nullptr) {
    STRATA_ASSIGN_OR_RETURN(std::vector<AttentionPlanner::LostSequence> lost_now,
                            planner->EndStep());
    for (const AttentionPlanner::LostSequence& l : lost_now) {
      ++num_kv_lost_;
      STRATA_LOG_WARN("request {}: {}; recomputing it", l.seq_id, l.why);
      lost.insert(l.seq_id);
    }
    if (kv_->has_upper_group()) {
      for (const AttentionPlanner::OffGpuRange& r : planner->TakeOffGpuRanges()) {
        if (lost.contains(r.seq_id)) continue;  // released below
        for (Sequence* seq : step_seqs) {
          if (static_cast<int64_t>(seq->req.id) != r.seq_id) continue;
          STRATA_ASSIGN_OR_RETURN(const int freed, kv_->ReleaseUpper(seq->pages, r.begin, r.end));
          num_upper_pages_released_ += freed;
        }
      }
    }
  }
  size_t sample_index = 0;
  for (size_t k = 0; k < step_seqs.size(); ++k) {
    Sequence& seq = *step_seqs[k];
    if (lost.contains(static_cast<int64_t>(seq.req.id))) {
      sample_index += samples[k];
      seq.lost = true;
      continue;
    }
    seq.num_computed += step_rows[k];
    seq.sampled = samples[k];
    if (!samples[k]) {
      if (seq.req.export_kv != 0) {
        // The pages this chunk completed leave now, while the rest of the
        // prompt is computed (a failure here is retried by the next call).
        if (absl::Status s = kv_->ExportKv(
                seq.req.export_kv, std::span<const int32_t>(seq.tokens).first(seq.num_computed),
                seq.pages, /*final=*/false);
            !s.ok()) {
          STRATA_LOG_WARN("request {}: KV export deferred: {}", seq.req.id, s.ToString());
        }
      }
      continue;
    }
    const SampledToken& token = sampled[sample_index++];
    if (!std::isfinite(token.logprob)) {
      // The model's output for this sequence is NaN or infinite (bad
      // weights, an overflow, a corrupt KV block): whatever token was drawn
      // from it is noise. The sequence ends with an error; the others in
      // the batch, computed row by row, go on.
      FailSequence(seq,
                   absl::StrCat("request ", seq.req.id, ": the model's logits at position ",
                                seq.num_computed,
                                " are not finite (NaN or infinity); the "
                                "sequence was stopped"),
                   events);
      continue;
    }
    if (!seq.prompt_stored) {
      seq.prompt_stored = true;
      StorePrompt(seq);
    }
    if (seq.decode_fed < seq.req.decode_tokens.size()) {
      // Validate() left room for every decode token before max_context.
      seq.tokens.push_back(seq.req.decode_tokens[seq.decode_fed++]);
      continue;
    }
    EmitToken(seq, token, events);
  }
  if (!lost.empty()) {
    for (auto it = running_.begin(); it != running_.end();) {
      Sequence& seq = **it;
      if (!seq.lost) {
        ++it;
        continue;
      }
      seq.lost = false;
      ReleaseKv(seq);
      seq.num_computed = 0;
      waiting_.push_front(std::move(*it));
      it = running_.erase(it);
    }
    // A sequence's first decode step may come from waiting_ (one whose
    // prompt's KV was imported): it starts over from its tokens too.
    for (auto& seq_ptr : waiting_) {
      Sequence& seq = *seq_ptr;
      if (!seq.lost) continue;
      seq.lost = false;
      seq.sampled = false;
      ReleaseKv(seq);
      seq.num_computed = 0;
    }
  }
  // Sequences whose prompt is done join the running batch; finished leave.
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    Sequence& seq = **it;
    if (seq.finished) {
      it = waiting_.erase(it);
    } else if (seq.sampled && seq.num_computed == static_cast<int>(seq.tokens.size()) - 1) {
      running_.push_back(std::move(*it));
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }
  std::erase_if(running_, [](const std::unique_ptr<Sequence>& s) { return s->finished; });
  return events;
}

}  // namespace strata::engine

// Batcher: continuous batching over a Model.
//
// Requests join and leave the running batch between steps. Each Step():
//  1. every running sequence whose prompt is done contributes one decode
//     token (taking a new KV page when it crosses a page boundary);
//  2. waiting sequences contribute prefill chunks, oldest first, up to the
//     step's token budget (long prompts are split over several steps);
//  3. the Model runs the mixed batch once and samples on the backend
//     (Model::ForwardSample) the next token of each sequence that reached
//     the end of its tokens, which is detokenized and checked
//     against the stop conditions (EOS, stop token ids, stop strings, max
//     tokens, context length).
// A sequence whose logits come out non-finite ends alone with kError (see
// FailSequence); the rest of the batch carries on.
// When KV pages run out, the newest running sequence is preempted. With a
// host tier (KvMemory::SwapOut) its KV moves there and it resumes, oldest
// first, when pages free up: swapped sequences come back before any new
// prompt starts. Otherwise (or when the host tier is full) its pages are
// freed and it is recomputed from its tokens later. Either way its output so
// far is kept, so the stream it produces does not change; a host copy that
// fails its check is dropped and the sequence recomputed.
// A request's decode_tokens are fed after its prompt one decode step each,
// as if they had been generated (nothing is emitted for them): the way a
// new turn's question meets a long context whose KV has already been
// prefilled and, under a sparse KV policy, compressed.
//
// Thread-safety: not thread-safe; one thread owns the batcher and calls
// Add, Cancel and Step.
#ifndef STRATA_ENGINE_BATCHER_H_
#define STRATA_ENGINE_BATCHER_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/kv_memory.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

namespace strata::engine {

struct GenerationRequest {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int max_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;
  // The KV policy of the model's AttentionPlanner this request uses (0: the
  // default). Checked by the planner's owner, not by the batcher.
  int32_t kv_policy = 0;
  // Tokens fed one per decode step after the prompt's prefill, before
  // sampling starts (see the file comment); their steps emit no events and
  // do not count against max_tokens.
  std::vector<int32_t> decode_tokens;

  // Disaggregated serving (see KvMemory's "other workers" part).
  // Prefill side: the KV of its prompt goes to KvMemory::ExportKv under
  // this key, page by page as its prefill chunks complete them, the rest
  // when it finishes (before its pages are freed); a failed final export
  // ends it with kError. 0: none.
  uint64_t export_kv = 0;
  // Decode side: tokens already generated for this request elsewhere (the
  // first token, sampled where the prompt was computed). They are emitted
  // first, by the next step, through the same stop conditions as tokens
  // generated here, and count against max_tokens.
  std::vector<SampledToken> generated = {};
  // Decode side: the transfer holding the prompt's KV (KvMemory::
  // LoadImported): loaded instead of computed. The request may come before
  // the KV has all landed (it waits, its generated tokens emitted). A
  // transfer that fails to load ends the request with kError naming why;
  // except, with `import_fallback`, one whose sender failed (Aborted): the
  // prompt is then computed here, and the request goes on. 0: none.
  uint64_t import_kv = 0;
  bool import_fallback = false;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
std::string_view FinishReasonName(FinishReason reason);

// One generated token of one request.
struct TokenEvent {
  uint64_t request_id = 0;
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::string text;  // complete UTF-8; empty for held-back bytes and specials
  FinishReason finish = FinishReason::kNone;  // set on the request's last event
  std::string error;                          // with kError: what went wrong
  // On the last event: prompt tokens whose KV came from a stored prefix
  // (KvMemory::LoadPrefix) instead of being computed.
  int cached_tokens = 0;
};

struct BatcherOptions {
  // Prefill tokens per step are limited by the model's max_batch_tokens;
  // this caps them lower so decodes are not starved by long prompts.
  int max_prefill_tokens_per_step = 0;  // 0: max_batch_tokens
  // While sequences are decoding, a prompt's KV sent by a prefill worker
  // (GenerationRequest::import_kv) is brought into its pages this many
  // bytes a step at most (about 5 ms of PCIe at 50 GB/s), so that a long
  // prompt's gigabytes do not hold their next token up; with nothing else
  // running it is loaded at once. 0: always at once.
  int64_t max_import_bytes_per_step = int64_t{256} << 20;
  // A workload's share of the GPU KV cache (a profile's tiers.gpu_bytes):
  // max_pages_per_policy[i] caps the pages (of the lower group) that the
  // requests with kv_policy i hold together; when one needs more, it waits
  // or the newest of them is preempted, never a request of another
  // workload. Missing or 0: no cap (the pages others leave free). A cap
  // below one full context is raised to one, so a request always fits.
  std::vector<int> max_pages_per_policy = {};
};

class Batcher {
 public:
  // tokenizer may be null (then events carry no text and stop strings are
  // refused). kv_memory owns the KV pages (null: the model's pages alone,
  // no host tier); it must have the model's page count. Model, tokenizer and
  // kv_memory must outlive the batcher.
  Batcher(Model* model, const Tokenizer* tokenizer, BatcherOptions options = {},
          KvMemory* kv_memory = nullptr);
  ~Batcher();

  // Queues a request. InvalidArgument for an empty prompt, ids outside the
  // vocabulary, a prompt (with its decode tokens) that leaves no room to
  // generate, bad sampling values, or a duplicate id.
  absl::Status Add(GenerationRequest request);
  // The checks of Add that depend only on the request and the (immutable)
  // model, tokenizer and cache size: safe to call from any thread.
  absl::Status Validate(const GenerationRequest& request) const;
  // Stops a request; its KV is freed now and a final event with kCancelled
  // is returned by the next Step. Unknown ids are ignored.
  void Cancel(uint64_t request_id);

  bool HasWork() const {
    return !waiting_.empty() || !running_.empty() || !swapped_.empty() || !cancelled_.empty();
  }
  // KvMemory::Settling, and its Poll: for a caller with no work to step
  // that lets the KV memory's copies and moves finish.
  bool KvSettling() const { return kv_->Settling(); }
  // Polls the KV memory and the attention planner's work between steps.
  absl::Status PollKv();
  // Runs one step; returns the tokens it produced.
  absl::StatusOr<std::vector<TokenEvent>> Step();
  // The tokens of waiting requests that were generated elsewhere
  // (GenerationRequest::generated: a prefill worker's first token), which
  // a Step would emit first: a caller that streams may take them before
  // the step, so that they need not wait for it (loading the prompt's KV,
  // the first decode step).
  std::vector<TokenEvent> TakeGeneratedTokens();
  // Whether the last Step computed nothing while work remains: its
  // sequences wait for KV moving between lower tiers (an SSD read), so the
  // caller may pause briefly rather than step again at once.
  bool last_step_idle() const { return last_step_idle_; }

  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  // Prompt tokens of waiting sequences still to compute (what a router
  // balances prefill work on).
  int64_t queued_prompt_tokens() const;
  // Sequences whose KV waits in the host tier.
  int num_swapped() const { return static_cast<int>(swapped_.size()); }
  // Free pages of the lower page group (of every layer with one group).
  int free_pages() const { return kv_->num_free_pages(PageGroup::kLower); }
  int free_upper_pages() const { return kv_->num_free_pages(PageGroup::kUpper); }
  // GPU pages (of the lower group) the requests with kv_policy `policy`
  // hold, and the cap they share (0: none; BatcherOptions).
  int pages_of_policy(int policy) const;
  int page_cap(int policy) const;
  // Sequences preempted so far (swapped to the host tier or recomputed).
  int64_t num_preemptions() const { return num_preemptions_; }
  // Of those, sequences whose KV went to the host tier.
  int64_t num_swapped_out() const { return num_swapped_out_; }
  // Sequences whose KV in a lower tier failed its check (a swapped copy,
  // or a block the planner recalled) and were recomputed.
  int64_t num_kv_lost() const { return num_kv_lost_; }
  // Sequences ended by an error of their own (see FailSequence) so far.
  int64_t num_failed() const { return num_failed_; }
  // Upper-layer pages freed because the planner moved their tokens' KV to a
  // lower tier (AttentionPlanner::TakeOffGpuRanges).
  int64_t num_upper_pages_released() const { return num_upper_pages_released_; }

 private:
  struct Sequence;

  bool EnsurePages(Sequence& seq, int tokens);
  // Whether growing `seq` to `tokens` would pass its workload's page cap.
  bool OverCap(const Sequence& seq, int tokens) const;
  // Pages of the smaller group: the most a sequence can hold.
  int MaxCachedPages() const;
  // Frees the sequence's KV pages and tells the model's planner it is gone.
  void ReleaseKv(Sequence& seq);
  // A sequence that ends without its final export drops what it exported.
  void EndExport(Sequence& seq);
  // Swaps the sequence's KV to the host tier (true) or frees it for a
  // recompute (false).
  bool Preempt(Sequence& seq);
  // When nothing else runs and `oldest` (a waiting prompt) cannot get the
  // pages for its next chunk because younger prompts hold theirs, they give
  // them back and restart later, so that prefills cannot block each other.
  // True when any page was given back.
  bool ReclaimYoungerPrompts(const Sequence& oldest);
  // Brings swapped sequences back while pages allow; a failed host copy
  // sends its sequence to be recomputed.
  absl::Status ResumeSwapped();
  void Finish(Sequence& seq, FinishReason reason, std::vector<TokenEvent>& events);
  // Keeps the KV of a sequence's computed (or imported) prompt as a prefix
  // for later requests, while its pages are in token order.
  void StorePrompt(Sequence& seq);
  // Ends one sequence with kError and `error`, freeing its KV; the step and
  // the other sequences go on.
  void FailSequence(Sequence& seq, const std::string& error, std::vector<TokenEvent>& events);
  void EmitToken(Sequence& seq, const SampledToken& token, std::vector<TokenEvent>& events);

  Model* model_;
  const Tokenizer* tokenizer_;
  BatcherOptions options_;
  std::unique_ptr<KvMemory> own_kv_;  // when the caller gave none
  KvMemory* kv_;
  std::vector<int32_t> eos_ids_;
  std::deque<std::unique_ptr<Sequence>> waiting_;   // prefill not finished
  std::vector<std::unique_ptr<Sequence>> running_;  // decoding
  std::deque<std::unique_ptr<Sequence>> swapped_;   // KV in the host tier, oldest first
  std::vector<uint64_t> cancelled_;
  int64_t num_preemptions_ = 0;
  int64_t num_failed_ = 0;
  int64_t num_swapped_out_ = 0;
  int64_t num_kv_lost_ = 0;
  int64_t num_upper_pages_released_ = 0;
  bool last_step_idle_ = false;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_BATCHER_H_

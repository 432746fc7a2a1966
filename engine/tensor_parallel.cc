#include "engine/tensor_parallel.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "engine/model.h"

namespace strata::engine {

absl::StatusOr<TensorParallelShard> ShardModel(const ModelConfig& c, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor parallelism: rank ", rank, " of ", size, " ranks"));
  }
  auto refuse = [&](std::string_view what, int64_t n) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor parallelism: ", c.architecture, "'s ", n, " ", std::string(what),
                     " do not split over ", size, " ranks (--tensor-parallel must divide them)"));
  };
  if (c.num_q_heads % size != 0) return refuse("query heads", c.num_q_heads);
  if (c.num_kv_heads % size != 0 && size % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor parallelism: ", c.architecture, "'s ", c.num_kv_heads,
                     " KV heads neither split over nor replicate onto ", size,
                     " ranks (one of the two numbers must divide the other)"));
  }
  if (c.intermediate_size % size != 0) return refuse("intermediate channels", c.intermediate_size);
  if (c.vocab_size % size != 0) return refuse("vocabulary entries", c.vocab_size);
  TensorParallelShard s;
  s.rank = rank;
  s.size = size;
  s.q_heads = c.num_q_heads / size;
  s.first_q_head = rank * s.q_heads;
  if (c.num_kv_heads >= size) {
    s.kv_heads = c.num_kv_heads / size;
    s.first_kv_head = rank * s.kv_heads;
  } else {
    // Fewer KV heads than ranks: each rank holds the one its query heads
    // read (N / Hkv ranks hold each).
    s.kv_heads = 1;
    s.first_kv_head = s.first_q_head / (c.num_q_heads / c.num_kv_heads);
  }
  s.intermediate = c.intermediate_size / size;
  s.first_intermediate = rank * s.intermediate;
  s.vocab = c.vocab_size / size;
  s.first_vocab = rank * s.vocab;
  return s;
}

TensorParallelRunner::TensorParallelRunner(std::vector<Model*> followers) {
  if (const char* n = std::getenv("STRATA_FAULT_STALL_RANK_AFTER_STEPS"); n != nullptr) {
    stall_after_ = std::atoll(n);
    STRATA_LOG_WARN("STRATA_FAULT_STALL_RANK_AFTER_STEPS={}: the last rank stalls on purpose", n);
  }
  for (Model* model : followers) {
    auto rank = std::make_unique<Rank>();
    rank->model = model;
    ranks_.push_back(std::move(rank));
  }
  for (auto& rank : ranks_) {
    Rank* r = rank.get();
    r->thread = std::thread([this, r] { Loop(*r); });
  }
}

TensorParallelRunner::~TensorParallelRunner() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (auto& rank : ranks_) rank->thread.join();
}

void TensorParallelRunner::Start(const StepCall& call) {
  absl::MutexLock lock(&mu_);
  call_ = call;
  for (auto& rank : ranks_) {
    rank->has_call = true;
    rank->done = false;
  }
}

absl::Status TensorParallelRunner::Finish(std::chrono::milliseconds timeout) {
  const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
  absl::MutexLock lock(&mu_);
  absl::Status first;
  std::vector<std::string> stuck;
  for (size_t i = 0; i < ranks_.size(); ++i) {
    Rank& r = *ranks_[i];
    auto done = [&r]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return r.done; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&done), deadline)) {
      stuck.push_back(absl::StrCat(i + 1));
      continue;
    }
    if (first.ok() && !r.status.ok()) first = r.status;
  }
  if (!stuck.empty()) {
    return absl::DeadlineExceededError(
        absl::StrCat("tensor-parallel rank(s) ", absl::StrJoin(stuck, ", "),
                     " did not finish their step within ", timeout.count(), " ms"));
  }
  return first;
}

void TensorParallelRunner::Loop(Rank& rank) {
  for (;;) {
    StepCall call;
    {
      absl::MutexLock lock(&mu_);
      auto called = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return rank.has_call || stopping_; };
      mu_.Await(absl::Condition(&called));
      if (!rank.has_call) return;  // stopping
      rank.has_call = false;
      call = call_;
    }
    if (Stalled(rank)) return;
    absl::Status status;
    if (call.sample) {
      status = rank.model->ForwardSample(*call.input, call.rows).status();
    } else {
      status = rank.model->Forward(*call.input).status();
    }
    absl::MutexLock lock(&mu_);
    rank.status = std::move(status);
    rank.done = true;
  }
}

bool TensorParallelRunner::Stalled(Rank& rank) {
  if (stall_after_ < 0 || &rank != ranks_.back().get() || ++rank.steps <= stall_after_) {
    return false;
  }
  STRATA_LOG_WARN("fault injection: rank {} stalls before its step", ranks_.size());
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&stopping_));
  return true;
}

void RankedPlanner::Release(int64_t seq_id) {
  for (AttentionPlanner* p : ranks_) p->Release(seq_id);
}

void RankedPlanner::NotePrompt(int64_t seq_id, int loaded_tokens,
                               std::span<const uint32_t> page_crcs) {
  for (AttentionPlanner* p : ranks_) p->NotePrompt(seq_id, loaded_tokens, page_crcs);
}

void RankedPlanner::NoteStoredPrompt(int64_t seq_id, int stored_tokens, StoredPageCrcs page_crcs) {
  for (AttentionPlanner* p : ranks_) p->NoteStoredPrompt(seq_id, stored_tokens, page_crcs);
}

void RankedPlanner::NoteExport(int64_t seq_id, uint64_t export_key, int prompt_tokens) {
  for (AttentionPlanner* p : ranks_) p->NoteExport(seq_id, export_key, prompt_tokens);
}

void RankedPlanner::NoteImportedState(int64_t seq_id, std::vector<std::vector<uint8_t>> state) {
  std::vector<std::vector<std::vector<uint8_t>>> per_rank(ranks_.size());
  for (std::vector<uint8_t>& value : state) {
    const int rank = ranks_[0]->ImportedStateRank(value);
    if (rank == -1) {
      for (auto& mine : per_rank) mine.push_back(value);
    } else if (rank >= 0 && rank < static_cast<int>(ranks_.size())) {
      per_rank[static_cast<size_t>(rank)].push_back(std::move(value));
    }
  }
  for (size_t r = 0; r < ranks_.size(); ++r) {
    if (!per_rank[r].empty()) ranks_[r]->NoteImportedState(seq_id, std::move(per_rank[r]));
  }
}

absl::Status RankedPlanner::Poll() {
  absl::Status first;
  for (AttentionPlanner* p : ranks_) {
    if (absl::Status s = p->Poll(); !s.ok() && first.ok()) first = std::move(s);
  }
  return first;
}

bool RankedPlanner::Reordered(int64_t seq_id) const {
  // Every rank reorders alike (the same policy on the same tokens); any
  // that did makes the sequence's KV unfit to store by prefix.
  for (const AttentionPlanner* p : ranks_) {
    if (p->Reordered(seq_id)) return true;
  }
  return false;
}

void RankedPlanner::Pause(int64_t seq_id) {
  for (AttentionPlanner* p : ranks_) p->Pause(seq_id);
}

absl::StatusOr<bool> RankedPlanner::Resume(int64_t seq_id) {
  // Every rank is asked, even after one refused: a rank counts what it
  // tries for a sequence (kvtier::RankSharedTier matches the ranks' rings
  // by that count), so stopping at the first refusal would leave the ranks
  // out of step, and a later step would resume the sequence on some ranks
  // only, planning different entries on each.
  absl::Status first;
  bool all = true;
  std::vector<bool> took(ranks_.size(), false);
  for (size_t r = 0; r < ranks_.size(); ++r) {
    absl::StatusOr<bool> resumed = ranks_[r]->Resume(seq_id);
    if (!resumed.ok() && first.ok()) first = resumed.status();
    took[r] = resumed.ok() && *resumed;
    all &= took[r];
  }
  if (!all) {
    // The ranks that took it back give it up again: it stays paused on
    // all of them until all can.
    for (size_t r = 0; r < ranks_.size(); ++r) {
      if (took[r]) ranks_[r]->Pause(seq_id);
    }
  }
  if (!first.ok()) return first;
  return all;
}

absl::StatusOr<std::vector<AttentionPlanner::LostSequence>> RankedPlanner::EndStep() {
  std::vector<LostSequence> lost;
  absl::Status first;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    absl::StatusOr<std::vector<LostSequence>> rank_lost = ranks_[r]->EndStep();
    if (!rank_lost.ok()) {
      if (first.ok()) first = rank_lost.status();
      continue;
    }
    for (LostSequence& l : *rank_lost) {
      const bool known = std::any_of(lost.begin(), lost.end(),
                                     [&](const LostSequence& k) { return k.seq_id == l.seq_id; });
      if (!known) {
        if (r > 0) l.why = absl::StrCat("rank ", r, ": ", l.why);
        lost.push_back(std::move(l));
      }
    }
  }
  if (!first.ok()) return first;
  return lost;
}

std::vector<AttentionPlanner::OffGpuRange> RankedPlanner::TakeOffGpuRanges() {
  // Every rank moves the same token ranges (its heads of them); the pages
  // are shared, so rank 0's say which to free, and the others' are taken
  // so that they do not pile up.
  std::vector<OffGpuRange> ranges = ranks_[0]->TakeOffGpuRanges();
  for (size_t r = 1; r < ranks_.size(); ++r) (void)ranks_[r]->TakeOffGpuRanges();
  return ranges;
}

}  // namespace strata::engine

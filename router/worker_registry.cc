#include "router/worker_registry.h"

#include <algorithm>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/logging.h"

namespace strata::router {
namespace {

using internal::v1::WorkerInfo;
using internal::v1::WorkerLoad;
using internal::v1::WorkerRole;

// Far beyond any real id or address; bounds what one report can make the
// router store and log.
constexpr size_t kMaxIdBytes = 256;
constexpr size_t kMaxAddressBytes = 1024;

const char* SourceName(WorkerRegistry::Source source) {
  return source == WorkerRegistry::Source::kHeartbeat ? "heartbeat" : "discovery";
}

bool Serves(const WorkerInfo& info, const std::string& profile) {
  return std::find(info.profiles().begin(), info.profiles().end(), profile) !=
         info.profiles().end();
}

absl::Status CheckNotNegative(const char* field, int64_t value) {
  if (value >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("WorkerLoad.", field, " is negative (", value, ")"));
}

absl::Status CheckTier(const char* tier, int64_t free_bytes, int64_t total_bytes) {
  const std::string free_field = absl::StrCat(tier, "_kv_free_bytes");
  const std::string total_field = absl::StrCat(tier, "_kv_total_bytes");
  if (absl::Status s = CheckNotNegative(free_field.c_str(), free_bytes); !s.ok()) return s;
  if (absl::Status s = CheckNotNegative(total_field.c_str(), total_bytes); !s.ok()) return s;
  if (free_bytes > total_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("WorkerLoad.", free_field, " (", free_bytes,
                                                   ") exceeds ", total_field, " (", total_bytes,
                                                   ")"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* WorkerRoleName(WorkerRole role) {
  switch (role) {
    case internal::v1::WORKER_ROLE_PREFILL:
      return "prefill";
    case internal::v1::WORKER_ROLE_DECODE:
      return "decode";
    default:
      return "unspecified";
  }
}

absl::Status ValidateHostPort(const std::string& address, const std::string& field) {
  if (address.empty())
    return absl::InvalidArgumentError(absl::StrCat(field, " is empty (want host:port)"));
  if (address.size() > kMaxAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is longer than ", kMaxAddressBytes, " bytes"));
  }
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " '", address, "' is not host:port: ", why));
  };
  absl::string_view host, port;
  const absl::string_view a = address;
  if (a.front() == '[') {
    const size_t close = a.find(']');
    if (close == absl::string_view::npos) return bad("no ']' after the IPv6 address");
    if (close + 1 >= a.size() || a[close + 1] != ':') return bad("no :port after ']'");
    host = a.substr(1, close - 1);
    port = a.substr(close + 2);
  } else {
    const size_t colon = a.rfind(':');
    if (colon == absl::string_view::npos) return bad("no :port");
    host = a.substr(0, colon);
    port = a.substr(colon + 1);
    if (host.find(':') != absl::string_view::npos) {
      return bad("an IPv6 address must be in brackets ([addr]:port)");
    }
  }
  if (host.empty()) return bad("the host is empty");
  for (char c : host) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) ||
        !absl::ascii_isprint(static_cast<unsigned char>(c)) || c == '/') {
      return bad("the host has a space, a '/' or an unprintable character");
    }
  }
  int port_number = 0;
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return absl::ascii_isdigit(c); }) ||
      !absl::SimpleAtoi(port, &port_number) || port_number < 1 || port_number > 65535) {
    return bad("the port must be a number in 1..65535");
  }
  return absl::OkStatus();
}

WorkerRegistry::WorkerRegistry(WorkerRegistryOptions options) : options_(std::move(options)) {}

absl::Time WorkerRegistry::Now() const { return options_.clock ? options_.clock() : absl::Now(); }

absl::Status WorkerRegistry::Validate(const WorkerInfo& info, const WorkerLoad& load) const {
  if (info.worker_id().empty()) return absl::InvalidArgumentError("WorkerInfo.worker_id is empty");
  if (info.worker_id().size() > kMaxIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("WorkerInfo.worker_id is longer than ", kMaxIdBytes, " bytes"));
  }
  if (info.role() == internal::v1::WORKER_ROLE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        "WorkerInfo.role is unspecified (want WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE)");
  }
  if (info.role() != internal::v1::WORKER_ROLE_PREFILL &&
      info.role() != internal::v1::WORKER_ROLE_DECODE) {
    return absl::InvalidArgumentError(
        absl::StrCat("WorkerInfo.role ", static_cast<int>(info.role()), " is not a known role"));
  }
  if (absl::Status s = ValidateHostPort(info.grpc_address(), "WorkerInfo.grpc_address"); !s.ok()) {
    return s;
  }
  if (info.kv_address().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("WorkerInfo.kv_address is empty: a ",
                                                   WorkerRoleName(info.role()),
                                                   " worker must give its KV transport address"));
  }
  if (info.kv_address().size() > kMaxAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("WorkerInfo.kv_address is longer than ", kMaxAddressBytes, " bytes"));
  }
  if (info.model().empty()) return absl::InvalidArgumentError("WorkerInfo.model is empty");
  if (info.kv_format().empty()) return absl::InvalidArgumentError("WorkerInfo.kv_format is empty");
  if (info.kv_bytes_per_token() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("WorkerInfo.kv_bytes_per_token is negative (",
                                                   info.kv_bytes_per_token(), ")"));
  }
  if (info.profiles().empty()) {
    return absl::InvalidArgumentError("WorkerInfo.profiles is empty: the worker serves no profile");
  }
  for (int i = 0; i < info.profiles_size(); ++i) {
    if (info.profiles(i).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("WorkerInfo.profiles[", i, "] is empty"));
    }
  }
  const std::pair<const char*, int64_t> counts[] = {
      {"queued_prefill_tokens", load.queued_prefill_tokens()},
      {"waiting_sequences", load.waiting_sequences()},
      {"running_sequences", load.running_sequences()},
      {"prefix_capacity_tokens", load.prefix_capacity_tokens()}};
  for (const auto& [field, value] : counts) {
    if (absl::Status s = CheckNotNegative(field, value); !s.ok()) return s;
  }
  if (absl::Status s = CheckTier("gpu", load.gpu_kv_free_bytes(), load.gpu_kv_total_bytes());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckTier("host", load.host_kv_free_bytes(), load.host_kv_total_bytes());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckTier("ssd", load.ssd_kv_free_bytes(), load.ssd_kv_total_bytes());
      !s.ok()) {
    return s;
  }
  // A worker of another model or KV layout is well formed but must not be
  // scheduled here: its KV could not be exchanged with the others'.
  if (!options_.model.empty() && info.model() != options_.model) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", info.worker_id(), " serves model '", info.model(),
                     "' but this router serves '", options_.model, "' (WorkerInfo.model)"));
  }
  if (!options_.kv_format.empty() && info.kv_format() != options_.kv_format) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", info.worker_id(), " has KV format '", info.kv_format(),
        "' but this router expects '", options_.kv_format, "' (WorkerInfo.kv_format)"));
  }
  return absl::OkStatus();
}

absl::Status WorkerRegistry::Update(const WorkerInfo& info, const WorkerLoad& load, Source source) {
  if (absl::Status s = Validate(info, load); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  const absl::Time now = Now();
  DropStaleLocked(now);
  // Another id at this address: that process is gone (a worker's id is new
  // with every start), and requests sent to its id would reach the new one.
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (it->first != info.worker_id() && it->second.info.grpc_address() == info.grpc_address()) {
      STRATA_LOG_INFO("worker {} at {} restarted as {}", it->first, info.grpc_address(),
                      info.worker_id());
      ++replaced_;
      workers_.erase(it++);
    } else {
      ++it;
    }
  }
  auto [it, inserted] = workers_.try_emplace(info.worker_id());
  Entry& e = it->second;
  if (inserted) {
    STRATA_LOG_INFO("{} worker {} at {} registered by {} (profiles: {})",
                    WorkerRoleName(info.role()), info.worker_id(), info.grpc_address(),
                    SourceName(source), absl::StrJoin(info.profiles(), ", "));
  } else if (now - e.last_seen >= options_.expiry) {
    STRATA_LOG_INFO("worker {} at {} is back after {}", info.worker_id(), info.grpc_address(),
                    absl::FormatDuration(now - e.last_seen));
  }
  e.info = info;
  e.load = load;
  e.source = source;
  e.last_seen = now;
  // The report counts what the router sent before it (queued or done).
  e.pending_prefill_tokens = 0;
  e.pending_sequences = 0;
  e.pending_kv_bytes = 0;
  return absl::OkStatus();
}

void WorkerRegistry::DropStaleLocked(absl::Time now) {
  const absl::Duration drop_after = options_.expiry * std::max(1, options_.drop_after_expiries);
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (now - it->second.last_seen >= drop_after) {
      STRATA_LOG_INFO("worker {} at {} dropped: not heard from for {}", it->first,
                      it->second.info.grpc_address(),
                      absl::FormatDuration(now - it->second.last_seen));
      ++dropped_;
      workers_.erase(it++);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<std::vector<const WorkerRegistry::Entry*>> WorkerRegistry::CandidatesLocked(
    WorkerRole role, const std::string& profile, absl::Time now) const {
  const char* name = WorkerRoleName(role);
  int registered = 0, expired = 0, draining = 0, schedulable = 0;
  std::set<std::string> served;  // by the schedulable workers, for the message
  std::vector<const Entry*> out;
  for (const auto& [id, e] : workers_) {
    if (e.info.role() != role) continue;
    ++registered;
    if (now - e.last_seen >= options_.expiry) {
      ++expired;
      continue;
    }
    if (e.load.draining()) {
      ++draining;
      continue;
    }
    ++schedulable;
    if (Serves(e.info, profile)) {
      out.push_back(&e);
    } else {
      served.insert(e.info.profiles().begin(), e.info.profiles().end());
    }
  }
  if (registered == 0) {
    return absl::UnavailableError(absl::StrCat("no ", name, " worker is registered"));
  }
  if (schedulable == 0) {
    return absl::UnavailableError(
        absl::StrCat("no ", name, " worker is schedulable: of ", registered, " registered, ",
                     expired, " not heard from within ", absl::FormatDuration(options_.expiry),
                     " and ", draining, " draining"));
  }
  if (out.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no ", name, " worker serves profile '", profile, "' (the ", schedulable,
                     " schedulable serve: ", absl::StrJoin(served, ", "), ")"));
  }
  std::sort(out.begin(), out.end(), [](const Entry* a, const Entry* b) {
    return a->info.worker_id() < b->info.worker_id();
  });
  return out;
}

namespace {

PickedWorker ToPicked(const WorkerInfo& info, const WorkerLoad& load) {
  PickedWorker picked{info.worker_id(), info.grpc_address(), info.kv_address(), info.kv_format()};
  picked.prefix_capacity_tokens = load.prefix_capacity_tokens();
  return picked;
}

}  // namespace

absl::StatusOr<PickedWorker> WorkerRegistry::PickPrefill(const std::string& profile,
                                                         const std::string& kv_format) {
  absl::MutexLock lock(&mu_);
  const absl::Time now = Now();
  DropStaleLocked(now);
  auto candidates = CandidatesLocked(internal::v1::WORKER_ROLE_PREFILL, profile, now);
  if (!candidates.ok()) return candidates.status();
  if (!kv_format.empty()) {
    std::set<std::string> others;
    std::erase_if(*candidates, [&](const Entry* e) {
      if (e->info.kv_format() == kv_format) return false;
      others.insert(e->info.kv_format());
      return true;
    });
    if (candidates->empty()) {
      return absl::NotFoundError(
          absl::StrCat("no prefill worker has KV format '", kv_format, "' (theirs: '",
                       absl::StrJoin(others, "', '"),
                       "'); a prompt's KV crosses only between workers of one "
                       "layout and tensor-parallel size"));
    }
  }
  int64_t best = std::numeric_limits<int64_t>::max();
  std::vector<const Entry*> ties;
  for (const Entry* e : *candidates) {
    const int64_t queued = e->load.queued_prefill_tokens() + e->pending_prefill_tokens;
    if (queued < best) {
      best = queued;
      ties.clear();
    }
    if (queued == best) ties.push_back(e);
  }
  const Entry* picked = ties[prefill_turn_++ % ties.size()];
  return ToPicked(picked->info, picked->load);
}

double WorkerRegistry::DecodeScore(const WorkerLoad& load, int pending_sequences,
                                   int64_t pending_kv_bytes) {
  double score = static_cast<double>(load.running_sequences()) + pending_sequences +
                 kWaitingWeight * load.waiting_sequences();
  int64_t total = load.gpu_kv_total_bytes();
  int64_t free = load.gpu_kv_free_bytes();
  if (total <= 0) {
    total = load.host_kv_total_bytes();
    free = load.host_kv_free_bytes();
  }
  if (total > 0) {
    const double used = static_cast<double>(total - free + pending_kv_bytes);
    score += kKvUtilisationWeight * std::max(0.0, used / static_cast<double>(total));
  }
  return score;
}

absl::StatusOr<PickedWorker> WorkerRegistry::PickDecode(const std::string& profile,
                                                        int64_t kv_tokens_needed,
                                                        const std::vector<std::string>& exclude,
                                                        const DecodePreference* prefer) {
  if (kv_tokens_needed < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_tokens_needed is negative (", kv_tokens_needed, ")"));
  }
  absl::MutexLock lock(&mu_);
  const absl::Time now = Now();
  DropStaleLocked(now);
  auto candidates = CandidatesLocked(internal::v1::WORKER_ROLE_DECODE, profile, now);
  if (!candidates.ok()) return candidates.status();
  if (!exclude.empty()) {
    auto excluded = [&](const Entry* e) {
      return std::find(exclude.begin(), exclude.end(), e->info.worker_id()) != exclude.end();
    };
    candidates->erase(std::remove_if(candidates->begin(), candidates->end(), excluded),
                      candidates->end());
    if (candidates->empty()) {
      return absl::UnavailableError(absl::StrCat("no decode worker serving profile '", profile,
                                                 "' is left besides ",
                                                 absl::StrJoin(exclude, ", ")));
    }
  }
  double best = std::numeric_limits<double>::infinity();
  std::vector<const Entry*> ties;
  std::vector<std::pair<const Entry*, double>> eligible;  // with room, and their scores
  // In tokens: workers' bytes per token differ with their cache types.
  int64_t most_free = std::numeric_limits<int64_t>::min();
  const Entry* most_free_worker = nullptr;
  int64_t largest = std::numeric_limits<int64_t>::min();
  const Entry* largest_worker = nullptr;
  for (const Entry* e : *candidates) {
    const int64_t per_token = KvBytesPerToken(*e);
    const int64_t total =
        (e->load.gpu_kv_total_bytes() + e->load.host_kv_total_bytes()) / per_token;
    if (total > largest) {
      largest = total;
      largest_worker = e;
    }
    const int64_t free =
        (e->load.gpu_kv_free_bytes() + e->load.host_kv_free_bytes() - e->pending_kv_bytes) /
        per_token;
    if (free > most_free) {
      most_free = free;
      most_free_worker = e;
    }
    if (free < kv_tokens_needed) continue;
    const double score = DecodeScore(e->load, e->pending_sequences, e->pending_kv_bytes);
    eligible.emplace_back(e, score);
    if (score < best) {
      best = score;
      ties.clear();
    }
    if (score == best) ties.push_back(e);
  }
  if (ties.empty() && largest < kv_tokens_needed) {
    return absl::OutOfRangeError(absl::StrCat(
        "no decode worker serving profile '", profile, "' can ever hold ", kv_tokens_needed,
        " tokens of KV (GPU and host tiers; the largest: ", std::max<int64_t>(0, largest),
        " tokens on ", largest_worker->info.worker_id(), ")"));
  }
  if (ties.empty()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "no decode worker serving profile '", profile, "' has room for ", kv_tokens_needed,
        " tokens of KV (GPU and host tiers; the most free: ", std::max<int64_t>(0, most_free),
        " tokens on ", most_free_worker->info.worker_id(), ")"));
  }
  if (prefer != nullptr) {
    // The holder of the longest stored start whose load is within the
    // allowance of the least loaded's.
    for (const auto& [worker_id, tokens] : prefer->holders) {
      for (const auto& [e, score] : eligible) {
        // A worker that reports no prefix store now (restarted with
        // another configuration) holds nothing, whatever was sent it.
        if (e->info.worker_id() != worker_id || e->load.prefix_capacity_tokens() <= 0 ||
            score > best + prefer->max_extra_load) {
          continue;
        }
        PickedWorker picked = ToPicked(e->info, e->load);
        picked.prefix_tokens = tokens;
        return picked;
      }
    }
  }
  const Entry* picked = ties[decode_turn_++ % ties.size()];
  return ToPicked(picked->info, picked->load);
}

void WorkerRegistry::NoteAssigned(const std::string& worker_id, int64_t prompt_tokens,
                                  int64_t kv_tokens) {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) return;
  Entry& e = it->second;
  if (e.info.role() == internal::v1::WORKER_ROLE_PREFILL) {
    e.pending_prefill_tokens += std::max<int64_t>(0, prompt_tokens);
  } else {
    ++e.pending_sequences;
    e.pending_kv_bytes += std::max<int64_t>(0, kv_tokens) * KvBytesPerToken(e);
  }
}

std::vector<WorkerRegistry::WorkerState> WorkerRegistry::Snapshot() const {
  absl::MutexLock lock(&mu_);
  const absl::Time now = Now();
  std::vector<WorkerState> out;
  out.reserve(workers_.size());
  for (const auto& [id, e] : workers_) {
    WorkerState s;
    s.worker_id = id;
    s.role = e.info.role();
    s.grpc_address = e.info.grpc_address();
    s.profiles.assign(e.info.profiles().begin(), e.info.profiles().end());
    s.source = e.source;
    s.age = now - e.last_seen;
    s.live = s.age < options_.expiry;
    s.schedulable = s.live && !e.load.draining();
    s.load = e.load;
    s.pending_prefill_tokens = e.pending_prefill_tokens;
    s.pending_sequences = e.pending_sequences;
    s.pending_kv_bytes = e.pending_kv_bytes;
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(),
            [](const WorkerState& a, const WorkerState& b) { return a.worker_id < b.worker_id; });
  return out;
}

int64_t WorkerRegistry::dropped_workers() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

int64_t WorkerRegistry::replaced_workers() const {
  absl::MutexLock lock(&mu_);
  return replaced_;
}

}  // namespace strata::router

#include "router/server_metrics.h"

#include <algorithm>

#include "common/status_macros.h"

namespace strata::router {
namespace {

double Seconds(ServerMetrics::Duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(prometheus::Registry* r) {
  std::unique_ptr<ServerMetrics> m(new ServerMetrics());
  STRATA_ASSIGN_OR_RETURN(
      m->finished_,
      metrics::FixedLabelCounter::Create(
          r, "strata_requests_total", "Generate requests finished, by finish reason.",
          "finish_reason",
          {"stop", "length", "cancelled", "deadline_exceeded", "client_too_slow", "error"}));
  STRATA_ASSIGN_OR_RETURN(m->rejected_,
                          metrics::FixedLabelCounter::Create(
                              r, "strata_requests_rejected_total",
                              "Generate requests refused before admission, by reason.", "reason",
                              {"invalid_argument", "queue_full", "queue_timeout", "unavailable"}));
  STRATA_ASSIGN_OR_RETURN(
      m->routes_,
      metrics::FixedLabelCounter::Create(
          r, "strata_router_routes_total",
          "Requests the router sent to a decode worker, by where their prompt was computed.",
          "route", {"prefill_worker", "short_prompt", "stored_prefix", "no_prefill_worker"}));

  STRATA_ASSIGN_OR_RETURN(std::vector<double> latency,
                          metrics::ExponentialBuckets(0.0005, 2.0, 18));
  STRATA_ASSIGN_OR_RETURN(
      m->ttft_,
      metrics::AddHistogram(r, "strata_time_to_first_token_seconds",
                            "From request arrival to its first generated token.", latency));
  STRATA_ASSIGN_OR_RETURN(
      m->itl_,
      metrics::AddHistogram(r, "strata_inter_token_latency_seconds",
                            "Between consecutive generated tokens of a request.", latency));
  STRATA_ASSIGN_OR_RETURN(std::vector<double> fine, metrics::ExponentialBuckets(0.00001, 2.0, 16));
  STRATA_ASSIGN_OR_RETURN(
      m->overhead_, metrics::AddHistogram(r, "strata_router_overhead_seconds",
                                          "From request arrival to its hand-off to the engine "
                                          "(validation, tokenization, admission).",
                                          fine));

  STRATA_ASSIGN_OR_RETURN(m->in_flight_,
                          metrics::AddGauge(r, "strata_requests_in_flight",
                                            "Generate requests admitted and not finished."));
  STRATA_ASSIGN_OR_RETURN(m->waiting_,
                          metrics::AddGauge(r, "strata_requests_waiting",
                                            "Sequences queued for prefill in the engine."));
  STRATA_ASSIGN_OR_RETURN(m->running_, metrics::AddGauge(r, "strata_requests_running",
                                                         "Sequences in the running decode batch."));
  STRATA_ASSIGN_OR_RETURN(m->pages_used_, metrics::AddGauge(r, "strata_kv_cache_pages_used",
                                                            "KV cache pages held by sequences."));
  STRATA_ASSIGN_OR_RETURN(m->pages_total_, metrics::AddGauge(r, "strata_kv_cache_pages_total",
                                                             "KV cache pages in the cache."));
  STRATA_ASSIGN_OR_RETURN(m->usage_, metrics::AddGauge(r, "strata_kv_cache_usage_ratio",
                                                       "Fraction of KV cache pages in use."));
  STRATA_ASSIGN_OR_RETURN(
      m->upper_used_,
      metrics::AddGauge(r, "strata_kv_upper_pages_used",
                        "Pages of the upper layers' page group held by sequences (0 with one "
                        "group)."));
  STRATA_ASSIGN_OR_RETURN(m->upper_total_, metrics::AddGauge(r, "strata_kv_upper_pages_total",
                                                             "Pages of the upper layers' group."));
  auto counter = [&](TotalCounter& c, const char* name, const char* help) -> absl::Status {
    STRATA_ASSIGN_OR_RETURN(c.counter, metrics::AddCounter(r, name, help));
    return absl::OkStatus();
  };
  STRATA_RETURN_IF_ERROR(counter(m->upper_released_, "strata_kv_upper_pages_released_total",
                                 "Upper-layer pages freed because their tokens' KV went to the "
                                 "host tier."));
  STRATA_RETURN_IF_ERROR(
      counter(m->preemptions_, "strata_preemptions_total",
              "Sequences preempted for KV pages (swapped to the host tier, or recomputed "
              "later)."));
  STRATA_RETURN_IF_ERROR(counter(m->failed_sequences_, "strata_sequences_failed_total",
                                 "Sequences ended by an error of their own (e.g. non-finite "
                                 "logits); the rest of their batch went on."));
  STRATA_RETURN_IF_ERROR(counter(m->sparse_queries_, "strata_kv_policy_sparse_queries_total",
                                 "(Decode query, layer) pairs a sparse KV policy attended over "
                                 "its selection instead of the whole context."));
  STRATA_RETURN_IF_ERROR(counter(m->dense_no_slot_, "strata_kv_policy_dense_no_slot_total",
                                 "Decode steps of sparse-policy sequences that found no slot "
                                 "(--max-sparse-seqs) and decoded densely."));
  STRATA_RETURN_IF_ERROR(counter(m->clusterings_, "strata_kv_policy_clusterings_total",
                                 "ClusterKV k-means clusterings of a sequence's keys."));
  STRATA_RETURN_IF_ERROR(counter(m->clusterings_reused_,
                                 "strata_kv_policy_clusterings_reused_total",
                                 "(Prompt chunk, layer) ClusterKV clusterings redone from one "
                                 "stored for the same loaded prefix pages, instead of a k-means."));
  STRATA_RETURN_IF_ERROR(counter(m->clusterings_kept_, "strata_kv_policy_clusterings_kept_total",
                                 "Prompt chunks whose ClusterKV clustering, computed on loaded "
                                 "prefix pages, was stored for reuse."));
  STRATA_RETURN_IF_ERROR(counter(m->clusterings_exported_,
                                 "strata_kv_policy_clusterings_exported_total",
                                 "Prompt chunks clustered on a prefill worker and sent with their "
                                 "KV to the decode worker."));
  STRATA_RETURN_IF_ERROR(counter(m->clusterings_imported_,
                                 "strata_kv_policy_clusterings_imported_total",
                                 "(Prompt chunk, layer) ClusterKV clusterings redone from those a "
                                 "prefill worker sent with the KV, instead of a k-means."));
  STRATA_ASSIGN_OR_RETURN(m->swapped_,
                          metrics::AddGauge(r, "strata_requests_swapped",
                                            "Sequences paused with their KV in the host tier."));
  STRATA_ASSIGN_OR_RETURN(m->host_used_,
                          metrics::AddGauge(r, "strata_kv_host_bytes_used",
                                            "Bytes of the host KV tier held by sequences or "
                                            "copies in flight."));
  STRATA_ASSIGN_OR_RETURN(m->host_total_, metrics::AddGauge(r, "strata_kv_host_bytes_total",
                                                            "Bytes of the host KV tier."));
  STRATA_ASSIGN_OR_RETURN(m->copies_in_flight_,
                          metrics::AddGauge(r, "strata_kv_copies_in_flight",
                                            "KV copies between tiers not finished yet."));
  STRATA_RETURN_IF_ERROR(counter(m->swap_outs_, "strata_kv_swap_outs_total",
                                 "Preempted sequences whose KV moved to the host tier."));
  STRATA_RETURN_IF_ERROR(counter(m->swap_ins_, "strata_kv_swap_ins_total",
                                 "Swapped sequences whose KV came back to the GPU."));
  STRATA_RETURN_IF_ERROR(counter(m->swap_outs_refused_, "strata_kv_swap_outs_refused_total",
                                 "Preemptions the host tier had no room for (recomputed)."));
  STRATA_RETURN_IF_ERROR(counter(m->bytes_to_host_, "strata_kv_bytes_to_host_total",
                                 "KV bytes copied from the GPU to the host tier."));
  STRATA_RETURN_IF_ERROR(counter(m->bytes_from_host_, "strata_kv_bytes_from_host_total",
                                 "KV bytes copied from the host tier to the GPU."));
  STRATA_RETURN_IF_ERROR(counter(m->offloads_, "strata_kv_offloads_total",
                                 "(Sequence, layer) clusterings whose clusters moved to the host "
                                 "tier."));
  STRATA_RETURN_IF_ERROR(counter(m->offload_refused_, "strata_kv_offload_refused_total",
                                 "(Sequence, layer) clusterings kept on the GPU: the host tier "
                                 "had no room."));
  STRATA_ASSIGN_OR_RETURN(
      m->recall_tokens_,
      metrics::FixedLabelCounter::Create(
          r, "strata_kv_recall_tokens_total",
          "Selected host-homed tokens of decode steps: hit (in the GPU ring), refreshed (moved "
          "within it), recalled (read from host memory).",
          "result", {"hit", "refreshed", "recalled"}));
  STRATA_RETURN_IF_ERROR(counter(m->recall_bytes_, "strata_kv_recall_bytes_total",
                                 "Host bytes the decode steps' recalls read."));
  STRATA_RETURN_IF_ERROR(counter(m->recall_bad_, "strata_kv_recall_bad_pieces_total",
                                 "Recalled KV pieces that failed their check; their sequences "
                                 "were recomputed."));
  STRATA_RETURN_IF_ERROR(counter(m->recall_steps_, "strata_kv_recall_steps_total",
                                 "Decode steps that recalled host-homed KV."));
  STRATA_ASSIGN_OR_RETURN(
      m->recall_seconds_,
      metrics::AddCounter(r, "strata_kv_recall_seconds_total",
                          "Device time of the recalls of host-homed KV (planning to the last "
                          "piece decoded); over strata_kv_recall_steps_total, the recall latency "
                          "per step."));
  STRATA_RETURN_IF_ERROR(counter(m->records_lost_, "strata_kv_host_records_lost_total",
                                 "Host KV records that failed their CRC check; their sequences "
                                 "were recomputed."));
  STRATA_RETURN_IF_ERROR(counter(m->prefetch_bytes_, "strata_kv_prefetch_bytes_total",
                                 "Host bytes read ahead of a layer for the clusters its guessed "
                                 "selection picked (beside the previous layer's compute)."));
  STRATA_RETURN_IF_ERROR(counter(m->cluster_spills_, "strata_kv_ssd_cluster_spills_total",
                                 "Batches of a sequence's host-homed clusters sent down to the "
                                 "SSD tier."));
  STRATA_RETURN_IF_ERROR(
      counter(m->clusters_spilled_, "strata_kv_ssd_clusters_spilled_total",
              "Host-homed (layer, KV head) clusters sent down to the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->cluster_spills_refused_,
                                 "strata_kv_ssd_cluster_spills_refused_total",
                                 "Batches of clusters the SSD tier had no room for (they stayed "
                                 "in host memory)."));
  STRATA_ASSIGN_OR_RETURN(m->ssd_cluster_bytes_,
                          metrics::AddGauge(r, "strata_kv_ssd_cluster_bytes",
                                            "Bytes of host-homed clusters on the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->hard_misses_, "strata_kv_ssd_hard_misses_total",
                                 "Clusters a decode step selected that were only on the SSD "
                                 "tier (the step waited for them)."));
  STRATA_RETURN_IF_ERROR(counter(m->read_ahead_used_, "strata_kv_ssd_hard_misses_read_ahead_total",
                                 "Hard misses whose cluster the layer before had started "
                                 "reading from the SSD tier (a guessed selection)."));
  STRATA_RETURN_IF_ERROR(counter(m->read_ahead_clusters_, "strata_kv_ssd_read_ahead_clusters_total",
                                 "Clusters read from the SSD tier ahead of the layer whose "
                                 "guessed selection missed them."));
  STRATA_RETURN_IF_ERROR(counter(m->read_ahead_bytes_, "strata_kv_ssd_read_ahead_bytes_total",
                                 "Bytes of those reads ahead."));
  STRATA_RETURN_IF_ERROR(counter(m->hard_miss_bytes_, "strata_kv_ssd_hard_miss_bytes_total",
                                 "Bytes the hard misses read from the SSD tier."));
  STRATA_ASSIGN_OR_RETURN(m->hard_miss_seconds_,
                          metrics::AddCounter(r, "strata_kv_ssd_hard_miss_seconds_total",
                                              "Time decode steps waited for hard misses."));
  STRATA_RETURN_IF_ERROR(counter(m->hard_miss_failed_, "strata_kv_ssd_hard_miss_failed_total",
                                 "Pieces a hard miss could not have (missing or corrupt); their "
                                 "sequences were recomputed."));
  STRATA_RETURN_IF_ERROR(counter(m->hard_miss_timeouts_, "strata_kv_ssd_hard_miss_timeouts_total",
                                 "Hard misses whose reads the SSD did not return in time; their "
                                 "sequences were recomputed."));
  STRATA_RETURN_IF_ERROR(counter(m->spill_writes_abandoned_,
                                 "strata_kv_ssd_cluster_writes_abandoned_total",
                                 "Ended sequences whose clusters' write to (or read back from) the "
                                 "SSD did not finish in time; their host memory was freed once it "
                                 "returned."));
  STRATA_RETURN_IF_ERROR(counter(m->cluster_promotions_, "strata_kv_ssd_cluster_promotions_total",
                                 "Sequences running again whose clusters on the SSD tier were "
                                 "read back into host memory ahead of the steps selecting them."));
  STRATA_RETURN_IF_ERROR(counter(m->clusters_promoted_, "strata_kv_ssd_clusters_promoted_total",
                                 "Clusters read back from the SSD tier into host memory."));
  STRATA_RETURN_IF_ERROR(counter(m->cluster_promoted_bytes_,
                                 "strata_kv_ssd_cluster_promoted_bytes_total",
                                 "Bytes of the clusters read back from the SSD tier."));
  STRATA_ASSIGN_OR_RETURN(m->ssd_sequences_,
                          metrics::AddGauge(r, "strata_kv_ssd_sequences",
                                            "Swapped sequences with their KV on the SSD tier "
                                            "(or moving there)."));
  STRATA_ASSIGN_OR_RETURN(m->ssd_used_, metrics::AddGauge(r, "strata_kv_ssd_bytes_used",
                                                          "Bytes stored in the SSD KV tier."));
  STRATA_ASSIGN_OR_RETURN(m->ssd_total_, metrics::AddGauge(r, "strata_kv_ssd_bytes_total",
                                                           "The SSD KV tier's budget in bytes."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_swap_outs_, "strata_kv_ssd_swap_outs_total",
                                 "Swapped sequences moved down from the host tier to the SSD."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_swap_ins_, "strata_kv_ssd_swap_ins_total",
                                 "Swapped sequences brought back up from the SSD."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_swap_outs_refused_, "strata_kv_ssd_swap_outs_refused_total",
                                 "Moves down the SSD refused (its budget full, or an I/O "
                                 "error); the sequences stayed in the host tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_bytes_written_, "strata_kv_ssd_bytes_written_total",
                                 "KV bytes written to the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_bytes_read_, "strata_kv_ssd_bytes_read_total",
                                 "KV bytes read back from the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_lost_, "strata_kv_ssd_sequences_lost_total",
                                 "Sequences whose KV failed a check on its way up from the SSD; "
                                 "they were recomputed."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_exports_, "strata_kv_exports_total",
                                 "Prompts whose KV this prefill worker sent to a decode worker."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_export_bytes_, "strata_kv_export_bytes_total",
                                 "Bytes of KV this prefill worker sent to decode workers."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_imports_, "strata_kv_imports_total",
                                 "Prompts whose KV this decode worker took from a prefill "
                                 "worker instead of computing it."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_import_bytes_, "strata_kv_import_bytes_total",
                                 "Bytes of KV this decode worker took from prefill workers."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_imports_failed_, "strata_kv_imports_failed_total",
                                 "KV transfers refused when loaded (a block corrupt or missing); "
                                 "their requests failed."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_imports_admitted_, "strata_kv_imports_admitted_total",
                                 "Imported ClusterKV prompts whose upper layers went from the "
                                 "landing records straight into the host tier."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_import_upper_pages_saved_,
                                 "strata_kv_import_upper_pages_saved_total",
                                 "Upper-group GPU pages those imports never took."));
  STRATA_RETURN_IF_ERROR(counter(m->kv_transfers_expired_, "strata_kv_transfers_expired_total",
                                 "Room reserved for a prompt's KV given back when its lease "
                                 "ended first."));
  STRATA_ASSIGN_OR_RETURN(
      m->exports_held_,
      metrics::AddGauge(r, "strata_kv_exports_held",
                        "Prompts' KV this prefill worker holds in its host tier until sent."));
  STRATA_ASSIGN_OR_RETURN(
      m->landing_free_,
      metrics::AddGauge(r, "strata_kv_landing_bytes_free",
                        "Free host bytes where KV sent by prefill workers lands."));
  STRATA_ASSIGN_OR_RETURN(
      m->landing_total_, metrics::AddGauge(r, "strata_kv_landing_bytes_total",
                                           "Host bytes set aside for KV sent by prefill workers."));
  STRATA_ASSIGN_OR_RETURN(
      m->transfer_seconds_,
      metrics::AddHistogram(r, "strata_kv_transfer_seconds",
                            "A prompt's KV, from its first token sampled on the prefill worker "
                            "to every block landed on this decode worker.",
                            latency));
  STRATA_ASSIGN_OR_RETURN(
      m->remote_prefill_seconds_,
      metrics::AddHistogram(r, "strata_prefill_remote_seconds",
                            "A prompt's compute on the prefill worker, from its arrival there "
                            "to its first token.",
                            latency));
  STRATA_ASSIGN_OR_RETURN(m->wire_bytes_,
                          metrics::AddCounter(r, "strata_kv_wire_bytes_total",
                                              "Bytes of KV received from prefill workers."));
  STRATA_ASSIGN_OR_RETURN(
      m->raw_bytes_, metrics::AddCounter(r, "strata_kv_raw_bytes_total",
                                         "The KV received from prefill workers, as raw bf16."));
  STRATA_ASSIGN_OR_RETURN(
      m->prefill_fallbacks_,
      metrics::AddCounter(r, "strata_prefill_fallbacks_total",
                          "Prompts computed on this decode worker because their prefill "
                          "worker failed or could not be reached."));
  STRATA_ASSIGN_OR_RETURN(
      m->prefix_used_, metrics::AddGauge(r, "strata_kv_prefix_bytes_used",
                                         "Host bytes of stored prompt prefixes kept for reuse."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_lookups_, "strata_kv_prefix_lookups_total",
                                 "Sequences that looked for a stored prefix of their tokens."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_hits_, "strata_kv_prefix_hits_total",
                                 "Sequences that loaded part of their KV from a stored prefix."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_tokens_, "strata_kv_prefix_tokens_loaded_total",
                                 "Prompt tokens whose KV was loaded instead of computed."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_stored_, "strata_kv_prefix_pages_stored_total",
                                 "KV pages of finished requests stored for reuse."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_evicted_, "strata_kv_prefix_pages_evicted_total",
                                 "Stored prefix pages evicted (least recently used first)."));
  STRATA_RETURN_IF_ERROR(counter(m->prefix_lost_, "strata_kv_prefix_pages_lost_total",
                                 "Stored prefix pages that failed their CRC check; their tokens "
                                 "were computed instead."));
  STRATA_ASSIGN_OR_RETURN(
      m->ssd_prefix_used_,
      metrics::AddGauge(r, "strata_kv_ssd_prefix_bytes_used",
                        "SSD bytes of stored prompt prefixes (kept across restarts)."));
  STRATA_ASSIGN_OR_RETURN(m->ssd_prefix_pages_,
                          metrics::AddGauge(r, "strata_kv_ssd_prefix_pages",
                                            "Stored prompt prefix pages on the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_written_, "strata_kv_ssd_prefix_pages_written_total",
                                 "Stored prefix pages written down to the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_refused_, "strata_kv_ssd_prefix_pages_refused_total",
                                 "Prefix pages that did not fit the SSD prefix budget or failed "
                                 "to write."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_evicted_, "strata_kv_ssd_prefix_pages_evicted_total",
                                 "SSD prefix pages deleted for newer ones (least recently used)."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_hits_, "strata_kv_ssd_prefix_hits_total",
                                 "Prompts whose stored prefix went on below the host tier, on "
                                 "the SSD (read back up before they ran)."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_read_, "strata_kv_ssd_prefix_pages_read_total",
                                 "Prefix pages read back up from the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_bytes_read_, "strata_kv_ssd_prefix_bytes_read_total",
                                 "Bytes of prefix pages read back up from the SSD tier."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_prefix_lost_, "strata_kv_ssd_prefix_pages_lost_total",
                                 "SSD prefix pages that failed a check on the way up (deleted; "
                                 "their tokens computed)."));
  STRATA_RETURN_IF_ERROR(counter(m->ssd_reads_timed_out_, "strata_kv_ssd_reads_timed_out_total",
                                 "Swap-ins and prefix pages the SSD tier did not return within "
                                 "the read timeout (recomputed)."));
  STRATA_ASSIGN_OR_RETURN(
      m->ssd_prefix_read_seconds_,
      metrics::AddCounter(r, "strata_kv_ssd_prefix_read_seconds_total",
                          "Time the prefix reads from the SSD took on the I/O threads (summed "
                          "over threads)."));
  STRATA_ASSIGN_OR_RETURN(
      m->ssd_swap_in_seconds_,
      metrics::AddCounter(r, "strata_kv_ssd_swap_in_seconds_total",
                          "Time the moves up from the SSD took on the I/O threads; over "
                          "strata_kv_ssd_swap_ins_total, the latency of one."));
  return m;
}

void ServerMetrics::TotalCounter::Advance(int64_t total) {
  if (total > seen) counter->Increment(static_cast<double>(total - seen));
  seen = std::max(seen, total);
}

void ServerMetrics::OnRejected(const std::string& reason) { rejected_.Increment(reason); }

void ServerMetrics::OnRouted(const std::string& route) { routes_.Increment(route); }
void ServerMetrics::OnAdmitted(Duration d) { overhead_->Observe(Seconds(d)); }
void ServerMetrics::OnFinished(const std::string& reason) { finished_.Increment(reason); }
void ServerMetrics::ObserveTimeToFirstToken(Duration d) { ttft_->Observe(Seconds(d)); }
void ServerMetrics::ObserveInterTokenLatency(Duration d) { itl_->Observe(Seconds(d)); }

void ServerMetrics::UpdateGauges(const engine::AsyncEngine::Stats& s, int requests_in_flight) {
  in_flight_->Set(requests_in_flight);
  waiting_->Set(s.waiting);
  running_->Set(s.running);
  const int used = s.total_pages - s.free_pages;
  pages_used_->Set(used);
  pages_total_->Set(s.total_pages);
  const int upper_used = s.upper_total_pages - s.upper_free_pages;
  upper_used_->Set(upper_used);
  upper_total_->Set(s.upper_total_pages);
  // Admission stops at whichever group fills first.
  double usage = s.total_pages > 0 ? static_cast<double>(used) / s.total_pages : 0.0;
  if (s.upper_total_pages > 0) {
    usage = std::max(usage, static_cast<double>(upper_used) / s.upper_total_pages);
  }
  usage_->Set(usage);
  std::lock_guard<std::mutex> lock(totals_mu_);
  upper_released_.Advance(s.upper_pages_released);
  preemptions_.Advance(s.preemptions);
  failed_sequences_.Advance(s.failed_sequences);
}

void ServerMetrics::UpdateKvPolicyStats(const kvtier::KvPolicyRunner::Stats& stats) {
  std::lock_guard<std::mutex> lock(totals_mu_);
  sparse_queries_.Advance(stats.sparse_queries);
  dense_no_slot_.Advance(stats.dense_no_slot);
  clusterings_.Advance(stats.clusterings);
  clusterings_reused_.Advance(stats.reused_clusterings);
  clusterings_kept_.Advance(stats.kept_clusterings);
  clusterings_exported_.Advance(stats.exported_clusterings);
  clusterings_imported_.Advance(stats.imported_clusterings);
  offloads_.Advance(stats.offloads);
  offload_refused_.Advance(stats.offload_refused);
  auto advance = [&](const char* result, int64_t total, int64_t& seen) {
    if (total > seen) recall_tokens_.Increment(result, static_cast<double>(total - seen));
    seen = std::max(seen, total);
  };
  advance("hit", stats.recall_hit_tokens, recall_seen_[0]);
  advance("refreshed", stats.recall_refreshed_tokens, recall_seen_[1]);
  advance("recalled", stats.recall_tokens, recall_seen_[2]);
  recall_bytes_.Advance(stats.recall_kib * 1024);
  prefetch_bytes_.Advance(stats.prefetch_kib * 1024);
  recall_bad_.Advance(stats.recall_bad_pieces);
  recall_steps_.Advance(stats.recall_steps);
  cluster_spills_.Advance(stats.spills);
  clusters_spilled_.Advance(stats.spilled_clusters);
  cluster_spills_refused_.Advance(stats.spills_refused);
  hard_misses_.Advance(stats.hard_misses);
  hard_miss_bytes_.Advance(stats.hard_miss_bytes);
  hard_miss_failed_.Advance(stats.hard_miss_failed);
  hard_miss_timeouts_.Advance(stats.hard_miss_timeouts);
  read_ahead_used_.Advance(stats.read_ahead_used);
  read_ahead_clusters_.Advance(stats.read_ahead_clusters);
  read_ahead_bytes_.Advance(stats.read_ahead_bytes);
  spill_writes_abandoned_.Advance(stats.spill_writes_abandoned);
  cluster_promotions_.Advance(stats.promotions);
  clusters_promoted_.Advance(stats.promoted_clusters);
  cluster_promoted_bytes_.Advance(stats.promoted_bytes);
  ssd_cluster_bytes_->Set(static_cast<double>(stats.ssd_cluster_bytes));
  if (stats.hard_miss_micros > hard_miss_micros_seen_) {
    hard_miss_seconds_->Increment(
        static_cast<double>(stats.hard_miss_micros - hard_miss_micros_seen_) / 1e6);
    hard_miss_micros_seen_ = stats.hard_miss_micros;
  }
  if (stats.recall_micros > recall_micros_seen_) {
    recall_seconds_->Increment(static_cast<double>(stats.recall_micros - recall_micros_seen_) /
                               1e6);
    recall_micros_seen_ = stats.recall_micros;
  }
}

void ServerMetrics::UpdateKvTierStats(const kvtier::KvBlockManager::Stats& s) {
  swapped_->Set(s.swapped_sequences);
  host_used_->Set(static_cast<double>(s.host_bytes_used));
  host_total_->Set(static_cast<double>(s.host_bytes_total));
  copies_in_flight_->Set(s.copies_in_flight);
  std::lock_guard<std::mutex> lock(totals_mu_);
  swap_outs_.Advance(s.swap_outs);
  swap_ins_.Advance(s.swap_ins);
  swap_outs_refused_.Advance(s.swap_outs_refused);
  bytes_to_host_.Advance(s.bytes_to_host);
  bytes_from_host_.Advance(s.bytes_from_host);
  records_lost_.Advance(s.host_records_lost);
  ssd_sequences_->Set(s.sequences_on_ssd);
  prefix_used_->Set(static_cast<double>(s.prefix_bytes_used));
  exports_held_->Set(s.exports_held);
  kv_exports_.Advance(s.kv_exports);
  kv_export_bytes_.Advance(s.kv_export_bytes);
  kv_imports_.Advance(s.kv_imports);
  kv_import_bytes_.Advance(s.kv_import_bytes);
  kv_imports_failed_.Advance(s.kv_imports_failed);
  kv_imports_admitted_.Advance(s.kv_imports_admitted);
  kv_import_upper_pages_saved_.Advance(s.kv_import_upper_pages_saved);
  kv_transfers_expired_.Advance(s.kv_transfers_expired);
  prefix_lookups_.Advance(s.prefix_lookups);
  prefix_hits_.Advance(s.prefix_hits);
  prefix_tokens_.Advance(s.prefix_tokens_loaded);
  prefix_stored_.Advance(s.prefix_pages_stored);
  prefix_evicted_.Advance(s.prefix_pages_evicted);
  prefix_lost_.Advance(s.prefix_records_lost);
  ssd_swap_outs_.Advance(s.ssd_swap_outs);
  ssd_swap_ins_.Advance(s.ssd_swap_ins);
  ssd_swap_outs_refused_.Advance(s.ssd_swap_outs_refused);
  ssd_bytes_written_.Advance(s.ssd_bytes_written);
  ssd_bytes_read_.Advance(s.ssd_bytes_read);
  ssd_lost_.Advance(s.ssd_sequences_lost);
  ssd_prefix_used_->Set(static_cast<double>(s.ssd_prefix_bytes_used));
  ssd_prefix_pages_->Set(s.ssd_prefix_pages);
  ssd_prefix_written_.Advance(s.ssd_prefix_pages_written);
  ssd_prefix_refused_.Advance(s.ssd_prefix_pages_refused);
  ssd_prefix_evicted_.Advance(s.ssd_prefix_pages_evicted);
  ssd_prefix_hits_.Advance(s.ssd_prefix_hits);
  ssd_prefix_read_.Advance(s.ssd_prefix_pages_read);
  ssd_prefix_bytes_read_.Advance(s.ssd_prefix_bytes_read);
  ssd_prefix_lost_.Advance(s.ssd_prefix_pages_lost);
  ssd_reads_timed_out_.Advance(s.ssd_reads_timed_out);
  if (s.ssd_prefix_read_micros > ssd_prefix_read_micros_seen_) {
    ssd_prefix_read_seconds_->Increment(
        static_cast<double>(s.ssd_prefix_read_micros - ssd_prefix_read_micros_seen_) / 1e6);
    ssd_prefix_read_micros_seen_ = s.ssd_prefix_read_micros;
  }
  if (s.ssd_swap_in_micros > ssd_swap_in_micros_seen_) {
    ssd_swap_in_seconds_->Increment(
        static_cast<double>(s.ssd_swap_in_micros - ssd_swap_in_micros_seen_) / 1e6);
    ssd_swap_in_micros_seen_ = s.ssd_swap_in_micros;
  }
}

void ServerMetrics::UpdateLandingArea(int64_t free_bytes, int64_t total_bytes) {
  landing_free_->Set(static_cast<double>(free_bytes));
  landing_total_->Set(static_cast<double>(total_bytes));
}

void ServerMetrics::ObserveRemotePrefill(double compute_seconds, double transfer_seconds,
                                         int64_t wire_bytes, int64_t raw_bytes) {
  remote_prefill_seconds_->Observe(compute_seconds);
  transfer_seconds_->Observe(transfer_seconds);
  wire_bytes_->Increment(static_cast<double>(wire_bytes));
  raw_bytes_->Increment(static_cast<double>(raw_bytes));
}

void ServerMetrics::OnPrefillFallback() { prefill_fallbacks_->Increment(); }

void ServerMetrics::UpdateSsdStats(const kvtier::SsdStore::Stats& s) {
  ssd_used_->Set(static_cast<double>(s.bytes_used));
  ssd_total_->Set(static_cast<double>(s.budget_bytes));
}

}  // namespace strata::router

// ServerMetrics: the strata_* metrics a server exposes on /metrics, kept in
// one place so names, help texts and labels stay consistent.
//
//   strata_requests_total{finish_reason}        requests finished, by reason
//   strata_requests_rejected_total{reason}      requests refused at admission
//   strata_time_to_first_token_seconds          histogram
//   strata_inter_token_latency_seconds          histogram
//   strata_router_overhead_seconds              request arrival to hand-off to
//                                               the engine (validation,
//                                               tokenization, admission)
//   strata_router_routes_total{route}           `strata router`: how a prompt
//                                               was computed: prefill_worker,
//                                               short_prompt or stored_prefix
//                                               (on the decode worker), or
//                                               no_prefill_worker (none free)
//   strata_requests_in_flight                   admitted and not finished
//   strata_requests_waiting / _running          in the engine's queue / batch
//   strata_kv_cache_pages_used / _total, strata_kv_cache_usage_ratio
//                                               (the usage of the fuller page
//                                               group when there are two)
//   strata_kv_upper_pages_used / _total         the upper layers' page group
//                                               (0 with one group)
//   strata_kv_upper_pages_released_total        upper pages freed as their
//                                               tokens went to the host tier
//   strata_preemptions_total                    sequences preempted for KV
//                                               pages (swapped or recomputed)
//   strata_sequences_failed_total               sequences ended by an error
//                                               of their own
//   strata_kv_policy_sparse_queries_total       (decode query, layer) pairs a
//                                               sparse KV policy served
//   strata_kv_policy_dense_no_slot_total        decode steps of sparse-policy
//                                               sequences that found no slot
//   strata_kv_policy_clusterings_total          ClusterKV clusterings
//   strata_kv_policy_clusterings_reused_total   ... redone from a stored one
//   strata_kv_policy_clusterings_kept_total     prompt chunks' clusterings
//                                               stored for reuse
//   strata_kv_policy_clusterings_exported_total prompt chunks clustered on a
//                                               prefill worker, sent with the KV
//   strata_kv_policy_clusterings_imported_total (chunk, layer) clusterings
//                                               redone from those sent
//   strata_requests_swapped                     sequences paused with their
//                                               KV in the host tier
//   strata_kv_host_bytes_used / _total          the host tier's records in use
//   strata_kv_copies_in_flight                  swap copies not finished
//   strata_kv_swap_outs_total, _swap_ins_total  sequences moved to the host
//                                               tier and back
//   strata_kv_swap_outs_refused_total           preemptions the host tier had
//                                               no room for (recomputed)
//   strata_kv_bytes_to_host_total / _from_host_total
//   strata_kv_host_records_lost_total           host records that failed
//                                               their CRC (recomputed)
//   strata_kv_offloads_total, _offload_refused_total  (sequence, layer)
//                                               clusterings moved to the host
//                                               tier / kept on the GPU for
//                                               want of room
//   strata_kv_recall_tokens_total{result}       selected host-homed tokens:
//                                               hit (in the GPU ring),
//                                               refreshed (moved within it),
//                                               recalled (read from host)
//   strata_kv_recall_bytes_total                host bytes the recalls read
//   strata_kv_recall_bad_pieces_total           recalled pieces that failed
//                                               their check (sequence
//                                               recomputed)
//   strata_kv_recall_seconds_total              device time of the recalls;
//   strata_kv_recall_steps_total                over the steps that recalled:
//                                               the recall latency per step
//   strata_kv_ssd_cluster_spills_total          batches of a sequence's host-
//                                               homed clusters sent to the SSD
//   strata_kv_ssd_clusters_spilled_total        ... their clusters
//   strata_kv_ssd_cluster_spills_refused_total  ... the SSD had no room for
//   strata_kv_ssd_cluster_bytes                 bytes of clusters on the SSD
//   strata_kv_ssd_hard_misses_total             clusters a decode step had to
//                                               fetch from the SSD
//   strata_kv_ssd_hard_miss_bytes_total         ... their bytes
//   strata_kv_ssd_hard_miss_seconds_total       ... time the steps waited
//   strata_kv_ssd_hard_miss_failed_total        ... pieces that could not be
//                                               had (sequence recomputed)
//   strata_kv_ssd_hard_miss_timeouts_total      ... fetches the SSD did not
//                                               answer in time (recomputed)
//   strata_kv_ssd_hard_misses_read_ahead_total  ... found read (or reading)
//                                               ahead by the previous layer
//   strata_kv_ssd_read_ahead_clusters_total     clusters read ahead of need
//   strata_kv_ssd_read_ahead_bytes_total        ... their bytes
//   strata_kv_ssd_cluster_writes_abandoned_total ended sequences whose
//                                               clusters' write (or read
//                                               back) the SSD held past the
//                                               timeout
//   strata_kv_ssd_cluster_promotions_total      sequences running again whose
//                                               clusters came back up from
//                                               the SSD to host memory
//   strata_kv_ssd_clusters_promoted_total       ... those clusters
//   strata_kv_ssd_cluster_promoted_bytes_total  ... their bytes
//   strata_kv_prefetch_bytes_total              host bytes read ahead for the
//                                               next layer's guessed selection
//   strata_kv_ssd_sequences                     swapped sequences on the SSD
//   strata_kv_ssd_bytes_used / _total           the SSD tier's bytes in use
//   strata_kv_ssd_swap_outs_total, _swap_ins_total  swapped sequences moved
//                                               down to the SSD and back up
//   strata_kv_ssd_swap_outs_refused_total       moves down the SSD budget
//                                               refused (stayed in host)
//   strata_kv_ssd_bytes_written_total / _read_total
//   strata_kv_ssd_swap_in_seconds_total         time the moves up took
//   strata_kv_ssd_sequences_lost_total          sequences whose SSD copy
//                                               failed a check (recomputed)
//   strata_kv_prefix_bytes_used                 host bytes of stored prefixes
//   strata_kv_prefix_lookups_total, _hits_total sequences that asked for a
//                                               stored prefix / got one
//   strata_kv_prefix_tokens_loaded_total        prompt tokens not computed
//   strata_kv_prefix_pages_stored_total, _evicted_total
//   strata_kv_prefix_pages_lost_total           stored pages that failed
//                                               their CRC (computed instead)
//   strata_kv_ssd_prefix_bytes_used, _pages     prefix pages on the SSD tier
//   strata_kv_ssd_prefix_pages_written_total, _refused_total, _evicted_total
//   strata_kv_ssd_prefix_hits_total             prompts whose prefix went
//                                               on below, on the SSD
//   strata_kv_ssd_prefix_pages_read_total, _bytes_read_total, _lost_total
//   strata_kv_ssd_prefix_read_seconds_total     the reads' time (I/O threads)
//   strata_kv_ssd_reads_timed_out_total         swap-ins and prefix pages the
//                                               SSD did not return in time
//                                               (recomputed)
//   strata_kv_exports_total, _export_bytes_total  prompts' KV a prefill worker
//                                               handed to decode workers
//   strata_kv_imports_total, _import_bytes_total  KV a decode worker took from
//                                               prefill workers
//   strata_kv_imports_failed_total              ... refused (corrupt, missing)
//   strata_kv_imports_admitted_total,           ... whose upper layers went
//     _import_upper_pages_saved_total           straight to the host tier,
//                                               and the GPU pages not taken
//   strata_kv_transfers_expired_total           reservations whose lease ended
//   strata_kv_exports_held                      exports not yet sent (prefill)
//   strata_kv_landing_bytes_free, _total        where sent KV lands (decode)
//   strata_kv_transfer_seconds                  histogram: a prompt's KV, from
//                                               its first token sampled on the
//                                               prefill worker to every block
//                                               landed here (decode)
//   strata_prefill_remote_seconds               histogram: the prefill
//                                               worker's compute of a prompt
//   strata_kv_wire_bytes_total, _raw_bytes_total  KV received, and the same
//                                               KV as raw bf16 (decode)
//   strata_prefill_fallbacks_total              prompts computed here because
//                                               the prefill worker failed
//
// The counters have a child from the start for each reason strata gives
// (finish_reason: stop, length, cancelled, deadline_exceeded,
// client_too_slow, error; reason: invalid_argument, queue_full,
// queue_timeout (`strata router`: no decode worker had room in time),
// unavailable), so each renders as 0 before its first event; any other
// reason counts as "other", so that the label values stay a fixed set.
//
// Thread-safety: thread-safe (prometheus-cpp's metrics are atomics, and its
// histograms take a short mutex per observation).
#ifndef STRATA_ROUTER_SERVER_METRICS_H_
#define STRATA_ROUTER_SERVER_METRICS_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "engine/async_engine.h"
#include "kvtier/kv_block_manager.h"
#include "kvtier/kv_policy.h"
#include "kvtier/ssd_store.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace strata::router {

class ServerMetrics {
 public:
  using Duration = std::chrono::steady_clock::duration;

  // Registers the families in `registry`, which must outlive this object.
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(prometheus::Registry* registry);

  void OnRejected(const std::string& reason);
  // The router sent a request on `route` (see strata_router_routes_total).
  void OnRouted(const std::string& route);
  void OnAdmitted(Duration router_overhead);
  void OnFinished(const std::string& finish_reason);
  void ObserveTimeToFirstToken(Duration d);
  void ObserveInterTokenLatency(Duration d);
  // Refreshes the gauges and the engine's counters (called before each
  // scrape).
  void UpdateGauges(const engine::AsyncEngine::Stats& stats, int requests_in_flight);
  // A decode worker's landing area (thread-safe to read at any time).
  void UpdateLandingArea(int64_t free_bytes, int64_t total_bytes);
  // A prompt computed by a prefill worker: its compute and transfer times
  // and the KV's bytes on the wire and as raw bf16.
  void ObserveRemotePrefill(double compute_seconds, double transfer_seconds, int64_t wire_bytes,
                            int64_t raw_bytes);
  void OnPrefillFallback();
  // Brings the KV policy counters up to `stats` (the runner's running
  // totals). Thread-safe; cheap enough to call after every engine step,
  // on the engine thread, the only one that may read the runner's stats.
  void UpdateKvPolicyStats(const kvtier::KvPolicyRunner::Stats& stats);
  // The same for the KV block manager's tiers (gauges and counters).
  void UpdateKvTierStats(const kvtier::KvBlockManager::Stats& stats);
  // The SSD store's bytes (gauges).
  void UpdateSsdStats(const kvtier::SsdStore::Stats& stats);

 private:
  ServerMetrics() = default;

  metrics::FixedLabelCounter finished_;
  metrics::FixedLabelCounter rejected_;
  metrics::FixedLabelCounter routes_;
  prometheus::Histogram* ttft_ = nullptr;
  prometheus::Histogram* itl_ = nullptr;
  prometheus::Histogram* overhead_ = nullptr;
  prometheus::Gauge* in_flight_ = nullptr;
  prometheus::Gauge* waiting_ = nullptr;
  prometheus::Gauge* running_ = nullptr;
  prometheus::Gauge* pages_used_ = nullptr;
  prometheus::Gauge* pages_total_ = nullptr;
  prometheus::Gauge* usage_ = nullptr;
  prometheus::Gauge* upper_used_ = nullptr;
  prometheus::Gauge* upper_total_ = nullptr;
  prometheus::Gauge* swapped_ = nullptr;
  prometheus::Gauge* host_used_ = nullptr;
  prometheus::Gauge* host_total_ = nullptr;
  prometheus::Gauge* copies_in_flight_ = nullptr;
  prometheus::Gauge* ssd_sequences_ = nullptr;
  prometheus::Gauge* ssd_used_ = nullptr;
  prometheus::Gauge* ssd_total_ = nullptr;
  prometheus::Gauge* prefix_used_ = nullptr;
  prometheus::Gauge* exports_held_ = nullptr;
  prometheus::Gauge* landing_free_ = nullptr;
  prometheus::Gauge* landing_total_ = nullptr;
  prometheus::Histogram* transfer_seconds_ = nullptr;
  prometheus::Histogram* remote_prefill_seconds_ = nullptr;
  prometheus::Counter* wire_bytes_ = nullptr;
  prometheus::Counter* raw_bytes_ = nullptr;
  prometheus::Counter* prefill_fallbacks_ = nullptr;

  // Counters fed from running totals kept elsewhere: each update adds what
  // grew since the last one.
  struct TotalCounter {
    prometheus::Counter* counter = nullptr;
    int64_t seen = 0;
    void Advance(int64_t total);
  };
  std::mutex totals_mu_;
  TotalCounter preemptions_, failed_sequences_, upper_released_;
  TotalCounter sparse_queries_, dense_no_slot_, clusterings_, clusterings_reused_,
      clusterings_kept_, clusterings_exported_, clusterings_imported_;
  TotalCounter swap_outs_, swap_ins_, swap_outs_refused_, bytes_to_host_, bytes_from_host_,
      records_lost_;
  TotalCounter offloads_, offload_refused_, recall_bytes_, recall_bad_, recall_steps_;
  TotalCounter prefetch_bytes_;
  TotalCounter cluster_spills_, clusters_spilled_, cluster_spills_refused_, hard_misses_,
      read_ahead_used_, read_ahead_clusters_, read_ahead_bytes_, hard_miss_bytes_,
      hard_miss_failed_, hard_miss_timeouts_, spill_writes_abandoned_, cluster_promotions_,
      clusters_promoted_, cluster_promoted_bytes_;
  prometheus::Counter* hard_miss_seconds_ = nullptr;
  int64_t hard_miss_micros_seen_ = 0;
  prometheus::Gauge* ssd_cluster_bytes_ = nullptr;
  TotalCounter prefix_lookups_, prefix_hits_, prefix_tokens_, prefix_stored_, prefix_evicted_,
      prefix_lost_;
  TotalCounter kv_exports_, kv_export_bytes_, kv_imports_, kv_import_bytes_, kv_imports_failed_,
      kv_imports_admitted_, kv_import_upper_pages_saved_, kv_transfers_expired_;
  TotalCounter ssd_swap_outs_, ssd_swap_ins_, ssd_swap_outs_refused_, ssd_bytes_written_,
      ssd_bytes_read_, ssd_lost_;
  prometheus::Counter* ssd_swap_in_seconds_ = nullptr;
  int64_t ssd_swap_in_micros_seen_ = 0;
  prometheus::Gauge* ssd_prefix_used_ = nullptr;
  prometheus::Gauge* ssd_prefix_pages_ = nullptr;
  TotalCounter ssd_prefix_written_, ssd_prefix_refused_, ssd_prefix_evicted_, ssd_prefix_hits_,
      ssd_prefix_read_, ssd_prefix_bytes_read_, ssd_prefix_lost_, ssd_reads_timed_out_;
  prometheus::Counter* ssd_prefix_read_seconds_ = nullptr;
  int64_t ssd_prefix_read_micros_seen_ = 0;
  prometheus::Counter* recall_seconds_ = nullptr;
  int64_t recall_micros_seen_ = 0;
  metrics::FixedLabelCounter recall_tokens_;
  int64_t recall_seen_[3] = {0, 0, 0};  // hit, refreshed, recalled
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_SERVER_METRICS_H_

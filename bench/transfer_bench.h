// The KV transfer between processes (`strata bench transfer`): blocks of
// 16 KiB to 4 MiB sent by one UcxTransport (kvtier/ucx_transport.h) to
// another in a second process, each message a 64-byte KV block header
// (kvtier/kv_wire.h) and its payload, as a prefill worker sends a decode
// worker a prompt's KV. Per block size it reports GB/s (payload bytes over
// the wall time from the first send to the last completion, which is the
// receiver's ack that the payload landed) and the time from each send to
// its completion. bench/run_transfer.sh compares it with ucx_perftest's
// ucp_am_bw over the same UCX transport, in the same run.
//
// Two roles, one per process:
//  - the receiver (ServeTransferBench, `--serve`) listens on a TCP port for
//    senders. Per sender it starts a UcxTransport whose Receiver checks each
//    header (ParseKvBlockHeader) and lands the payload in a ring of host
//    slots registered with RegisterMemory (plain, pre-faulted pages: no GPU
//    is involved, and Debian's UCX cannot move CUDA memory anyway), and
//    gives the sender its UCX address over that TCP connection;
//  - the sender (RunTransferBench, `--connect HOST:PORT`) sends from a ring
//    of registered slots, keeping `window` messages in flight: each
//    completion sends the next message from the slot it freed.
// RunTransferBenchWithChild starts the receiver as a child process (the
// same binary, through posix_spawn) and runs the sender against it.
//
// The TCP connection carries (little-endian): the sender's hello ("STB1",
// u32 slots, u64 slot bytes: the receiver's ring; 0 slots: one buffer of
// slot bytes that every message lands in), the receiver's answer
// (u32 status code, u32 length, then its UCX address or an error message),
// and once every size has run the sender's "END1" and the receiver's counts
// (u64 landed, u64 failed, u64 refused), which the sender checks against
// what it sent. A receiver whose sender goes away (EOF) drops the session.
//
// Thread-safety: each function runs on its caller's thread (plus the
// transport's own); the receiver serves one sender at a time.
#ifndef STRATA_BENCH_TRANSFER_BENCH_H_
#define STRATA_BENCH_TRANSFER_BENCH_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/ucx_transport.h"

namespace strata::bench {

struct TransferBenchOptions {
  // Payload bytes of one message; each a multiple of 4 KiB (the header's
  // KV shape is derived from it), 4 KiB to 256 MiB.
  std::vector<int64_t> sizes = {16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20};
  int64_t count = 0;                       // timed messages per size (0: total_bytes / size)
  int64_t total_bytes = int64_t{1} << 30;  // payload bytes per size when count is 0
  int window = 16;                         // messages in flight
  int64_t warmup = -1;                     // untimed messages per size first (-1: 2 x window)
  std::chrono::milliseconds send_timeout{10000};
  // The sender's UcxTransportOptions::rndv_threshold: payloads of at least
  // this many bytes go by rendezvous, smaller ones eagerly.
  size_t rndv_threshold = kvtier::UcxTransportOptions().rndv_threshold;
  // Send every message from one buffer and land every message in one, as
  // ucx_perftest does: its cache-warm best case. By default the sender
  // cycles through `window` slots and the receiver through 2 x window, as
  // KV pages are distinct memory (at 1 MiB and up their rings outgrow the
  // last-level cache).
  bool one_buffer = false;
};

struct TransferSizeResult {
  int64_t bytes = 0;     // payload of one message
  int64_t messages = 0;  // timed
  double seconds = 0;    // first send to last completion
  double gbps = 0;       // payload GB/s (1e9 bytes)
  // Send to completion of one message, with `window` in flight (so mostly
  // the queue ahead of it), microseconds.
  double p50_us = 0;
  double p99_us = 0;
};

struct TransferBenchResult {
  std::string resources;  // UCX resources the sender's context may use
  int window = 0;
  bool one_buffer = false;
  std::vector<TransferSizeResult> sizes;
  // The receiver's counts over the whole session (warm-up included).
  int64_t landed = 0;
  int64_t failed = 0;
  int64_t refused = 0;
};

// "16K", "1M", "2MiB", "65536": binary units (K, KiB, M, MiB, G, GiB; any
// case); InvalidArgument otherwise.
absl::StatusOr<int64_t> ParseTransferSize(std::string_view text);

// InvalidArgument naming the first bad option.
absl::Status ValidateTransferOptions(const TransferBenchOptions& options);

struct TransferServeOptions {
  // The address to listen on: loopback unless senders on other hosts are
  // meant to reach it (0.0.0.0).
  std::string host = "127.0.0.1";
  int port = 0;       // 0: any free port (see listening)
  bool once = false;  // return after the first sender's session
  // Called once the socket listens, with "HOST:PORT" (the port chosen).
  std::function<void(const std::string& address)> listening;
};

// Serves senders until an error, or after one session with `once`. A
// session that fails (a sender that went away, a bad hello) is logged and
// does not stop the server unless `once`.
absl::Status ServeTransferBench(const TransferServeOptions& options);

// The sender against the receiver at "HOST:PORT". Unavailable when it
// cannot be reached; a failed send fails the run with its status; Internal
// when the receiver's counts differ from what was sent.
absl::StatusOr<TransferBenchResult> RunTransferBench(const std::string& server,
                                                     const TransferBenchOptions& options);

// Spawns this executable (/proc/self/exe) with `serve_args` (the arguments
// after argv[0] that make it serve one session on loopback and print its
// "listening on HOST:PORT" line on stdout), runs RunTransferBench against
// it and waits for it to exit (killing it if it does not).
absl::StatusOr<TransferBenchResult> RunTransferBenchWithChild(
    const std::vector<std::string>& serve_args, const TransferBenchOptions& options);

}  // namespace strata::bench

#endif  // STRATA_BENCH_TRANSFER_BENCH_H_

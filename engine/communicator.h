// engine::Communicator: the collectives of a tensor-parallel forward pass,
// between the ranks of one group, each rank driving its own Backend.
//
// Every rank calls the same collectives in the same order, with tensors of
// the same dtype and shape. A collective is ordered like a backend operator
// on its rank: after the rank's earlier operators, before its later ones
// (NCCL enqueues on the CUDA backend's stream; the in-process group of the
// CPU backend runs it on the calling thread).
//
// A rank that does not arrive (it died, failed, or took another path) must
// not hang the others: a collective that waits longer than the group's
// timeout fails with DeadlineExceeded, and the group is then broken (every
// later collective fails with Aborted). A rank that fails outside a
// collective calls Abort, so that the others fail at once instead of
// waiting out the timeout.
//
// Implementations: the in-process group (engine/in_process_communicator.h)
// for the CPU backend, so CI checks tensor-parallel correctness without
// GPUs, and NCCL for the CUDA backend (cuda/nccl_communicator.h).
//
// Thread-safety: each rank's Communicator is used by one thread at a time
// (the one driving its Backend); Abort may be called from any thread.
#ifndef STRATA_ENGINE_COMMUNICATOR_H_
#define STRATA_ENGINE_COMMUNICATOR_H_

#include <chrono>
#include <string_view>

#include "absl/status/status.h"
#include "engine/tensor.h"

namespace strata::engine {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "in-process", "nccl": for logs and errors.
  virtual std::string_view name() const = 0;
  // How long a collective waits for every rank before it fails.
  virtual std::chrono::milliseconds timeout() const = 0;

  // data = the sum over ranks of every rank's data, in place. Every rank
  // ends with the same values (the in-process group adds in rank order).
  virtual absl::Status AllReduceSum(Tensor& data) = 0;
  // Concatenates every rank's `in` [rows, cols] along its last dimension, in
  // rank order: out [rows, size * cols], the same on every rank (a
  // vocabulary-split LM head's logits gathered for sampling). 1-D tensors
  // concatenate.
  virtual absl::Status AllGather(const Tensor& in, Tensor& out) = 0;
  // data = root's data on every rank.
  virtual absl::Status Broadcast(Tensor& data, int root) = 0;

  // Breaks the group: collectives waiting on any rank fail now, later ones
  // fail at once. For a rank that fails outside a collective.
  virtual void Abort(std::string_view reason) = 0;
  // OK while the group works; once it is broken (Abort, a collective that
  // timed out), Aborted with the reason. A broken group stays broken: the
  // process must be restarted. Any thread.
  virtual absl::Status Health() const = 0;
};

}  // namespace strata::engine

#endif  // STRATA_ENGINE_COMMUNICATOR_H_

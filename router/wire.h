// The router's side of the wire: messages read from and written to gRPC as
// raw bytes, so that a request strata cannot parse (truncated, or a string
// field that is not UTF-8) is refused with INVALID_ARGUMENT and a message
// naming what is wrong, instead of gRPC's bare INTERNAL; and the logs of
// the libraries underneath (protobuf, gRPC) routed into strata's logger, so
// that nothing reaches stderr below the configured level.
//
// Thread-safety: every function here is thread-safe.
#ifndef STRATA_ROUTER_WIRE_H_
#define STRATA_ROUTER_WIRE_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/status.h>

#include <cstddef>

#include "absl/status/status.h"
#include "google/protobuf/message.h"

namespace strata::router {

// Sends protobuf's and gRPC's own log lines through strata's logger:
// protobuf's errors about a client's bad message at debug level (they are
// the client's mistake, answered to it), the rest at their own level.
// Idempotent.
void RouteLibraryLogs();

// Parses `bytes` into `message`. InvalidArgument naming the message and the
// reason (e.g. the string field that is not UTF-8) when it does not parse,
// or when it is larger than `max_bytes`.
absl::Status ParseMessage(const grpc::ByteBuffer& bytes, size_t max_bytes,
                          google::protobuf::Message* message);

// Serializes `message` into `out`, replacing what it held. Internal only if
// protobuf refuses.
absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* out);

// absl::Status -> grpc::Status with the same code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace strata::router

#endif  // STRATA_ROUTER_WIRE_H_

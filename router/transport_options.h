// The gRPC server settings that keep a server's connections healthy:
// keepalive pings that find dead peers, a limit on idle connections, and
// the receive limit that goes with strata's own request-size limit.
//
// Thread-safety: plain functions over values.
#ifndef STRATA_ROUTER_TRANSPORT_OPTIONS_H_
#define STRATA_ROUTER_TRANSPORT_OPTIONS_H_

#include <grpcpp/server_builder.h>

#include <cstddef>

namespace strata::router {

struct TransportOptions {
  // A ping after this long without activity; a peer that does not answer
  // within the timeout is dropped with its calls (which cancels them).
  int keepalive_time_ms = 30'000;
  int keepalive_timeout_ms = 10'000;
  // A connection with no call for this long is closed.
  int max_connection_idle_ms = 300'000;
  // Streams one connection may have open at once.
  int max_concurrent_streams = 1024;
  // strata's own limit on a serialized request (RequestLimits::
  // max_request_bytes). gRPC refuses by itself, with RESOURCE_EXHAUSTED,
  // messages beyond twice this: everything between is read and answered
  // INVALID_ARGUMENT by strata, naming the limit, while no message can make
  // the server buffer without bound.
  size_t max_request_bytes = 0;
};

// Applies `options` to `builder`.
void ApplyTransportOptions(const TransportOptions& options, grpc::ServerBuilder* builder);

}  // namespace strata::router

#endif  // STRATA_ROUTER_TRANSPORT_OPTIONS_H_

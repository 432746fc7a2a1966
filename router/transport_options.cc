#include "router/transport_options.h"

#include <grpc/grpc.h>

#include <algorithm>
#include <climits>

namespace strata::router {

void ApplyTransportOptions(const TransportOptions& o, grpc::ServerBuilder* builder) {
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, o.keepalive_time_ms);
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, o.keepalive_timeout_ms);
  // Clients may ping as often as the server does, even between calls,
  // without being dropped for it.
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                              std::min(o.keepalive_time_ms, 10'000));
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, o.max_connection_idle_ms);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, o.max_concurrent_streams);
  if (o.max_request_bytes > 0) {
    const size_t transport_limit = std::min<size_t>(2 * o.max_request_bytes, INT_MAX);
    builder->SetMaxReceiveMessageSize(static_cast<int>(transport_limit));
  }
}

}  // namespace strata::router

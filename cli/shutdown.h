// How every strata server process stops: SIGTERM or SIGINT starts a drain
// (health NOT_SERVING, new calls refused, in-flight calls may finish
// within the grace period and are cancelled after it); a second signal
// during the drain exits at once with 128 + the signal.
#ifndef STRATA_CLI_SHUTDOWN_H_
#define STRATA_CLI_SHUTDOWN_H_

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <functional>

namespace strata::cli {

// Blocks SIGTERM and SIGINT in this thread and every thread it starts
// later (call first thing), so that DrainOnSignal alone receives them.
sigset_t BlockShutdownSignals();

// Waits for the first signal, then drains `server`: `on_drain` runs once
// the health service says NOT_SERVING (e.g. to tell a router this worker
// drains), and this returns once every call is over and their final
// statuses have had a moment to leave.
void DrainOnSignal(const char* command, const sigset_t& signals, grpc::Server& server,
                   double grace_seconds, const std::function<void()>& on_drain = nullptr);

}  // namespace strata::cli

#endif  // STRATA_CLI_SHUTDOWN_H_

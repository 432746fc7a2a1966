#include "cli/shutdown.h"

#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "common/logging.h"

namespace strata::cli {

sigset_t BlockShutdownSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

void DrainOnSignal(const char* command, const sigset_t& signals, grpc::Server& server,
                   double grace_seconds, const std::function<void()>& on_drain) {
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  STRATA_LOG_WARN("received signal {}: draining (grace {} s); a second signal exits at once",
                  signal_number, grace_seconds);
  // A second SIGTERM or SIGINT during the drain: the operator wants out now.
  std::thread([signals, command] {
    int second = 0;
    sigwait(&signals, &second);
    std::fprintf(stderr, "%s: second signal %d during the drain, exiting now\n", command, second);
    std::_Exit(128 + second);
  }).detach();
  server.GetHealthCheckService()->SetServingStatus(false);
  if (on_drain) on_drain();
  // Refuses new calls now; in-flight calls may finish until the deadline,
  // after which gRPC cancels them (their handlers cancel the sequences).
  server.Shutdown(std::chrono::system_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000)));
  server.Wait();
  // Wait() returns once every handler has returned, but a call's final
  // status may still sit in the transport's buffers; exiting at once can
  // cut it off, and a client that received every token would see its call
  // fail. Give the transports a moment to write them out.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
}

}  // namespace strata::cli

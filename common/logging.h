// Process-wide logging for strata, a thin layer over spdlog so that callers
// do not depend on the logging library directly.
//
//   STRATA_LOG_INFO("loaded {} tensors from {}", n, path);
//
// Logs go to stderr, so stdout stays free for machine-readable output (e.g.
// --json). The level starts at "warn" (or $STRATA_LOG_LEVEL when set) and
// SetLogLevel changes it.
//
// Thread-safety: thread-safe (the logger is created once, on first use, and
// spdlog's sinks are synchronised).
#ifndef STRATA_COMMON_LOGGING_H_
#define STRATA_COMMON_LOGGING_H_

#include <string_view>

#include "spdlog/spdlog.h"

namespace strata {

// Sets the minimum level: "trace", "debug", "info", "warn", "error", "off".
// Unknown names leave the level unchanged and return false.
bool SetLogLevel(std::string_view level);

namespace internal {
// The strata logger, created on first use.
spdlog::logger& Logger();
}  // namespace internal

}  // namespace strata

#define STRATA_LOG_DEBUG(...) ::strata::internal::Logger().debug(__VA_ARGS__)
#define STRATA_LOG_INFO(...) ::strata::internal::Logger().info(__VA_ARGS__)
#define STRATA_LOG_WARN(...) ::strata::internal::Logger().warn(__VA_ARGS__)
#define STRATA_LOG_ERROR(...) ::strata::internal::Logger().error(__VA_ARGS__)

#endif  // STRATA_COMMON_LOGGING_H_

// Process-wide logging for strata, a thin layer over spdlog so that callers
// do not depend on the logging library directly.
//
//   STRATA_LOG_INFO("loaded {} tensors from {}", n, path);
//
// Thread-safe: spdlog's default logger is synchronised. Logs go to stderr so
// that stdout stays free for machine-readable output (e.g. --json).
#ifndef STRATA_COMMON_LOGGING_H_
#define STRATA_COMMON_LOGGING_H_

#include <string_view>

#include "spdlog/spdlog.h"

namespace strata {

// Sets the minimum level: "trace", "debug", "info", "warn", "error", "off".
// Unknown names leave the level unchanged and return false.
bool SetLogLevel(std::string_view level);

}  // namespace strata

#define STRATA_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define STRATA_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define STRATA_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define STRATA_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)

#endif  // STRATA_COMMON_LOGGING_H_

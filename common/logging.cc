#include "common/logging.h"

#include <memory>
#include <string>

#include "spdlog/sinks/stdout_color_sinks.h"

namespace strata {
namespace {

// Installs a stderr logger as the default before main() runs.
struct StderrLoggerInstaller {
  StderrLoggerInstaller() {
    auto logger = spdlog::stderr_color_mt("strata");
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ %v");
    spdlog::set_default_logger(std::move(logger));
    spdlog::set_level(spdlog::level::warn);
  }
};
const StderrLoggerInstaller installer;

}  // namespace

bool SetLogLevel(std::string_view level) {
  const auto parsed = spdlog::level::from_str(std::string(level));
  if (parsed == spdlog::level::off && level != "off") return false;
  spdlog::set_level(parsed);
  return true;
}

}  // namespace strata

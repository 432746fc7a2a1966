#include "common/logging.h"

#include <cstdlib>
#include <memory>
#include <string>

#include "spdlog/sinks/stdout_color_sinks.h"

namespace strata {
namespace internal {

spdlog::logger& Logger() {
  // Created on first use rather than by a static initializer, which a
  // static library may never run when nothing else references this file.
  static spdlog::logger* logger = [] {
    auto l = spdlog::stderr_color_mt("strata");
    l->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ %v");
    l->set_level(spdlog::level::warn);
    if (const char* env = std::getenv("STRATA_LOG_LEVEL")) {
      const auto level = spdlog::level::from_str(env);
      if (level != spdlog::level::off || std::string(env) == "off") l->set_level(level);
    }
    return l.get();  // spdlog's registry keeps it alive
  }();
  return *logger;
}

}  // namespace internal

bool SetLogLevel(std::string_view level) {
  const auto parsed = spdlog::level::from_str(std::string(level));
  if (parsed == spdlog::level::off && level != "off") return false;
  internal::Logger().set_level(parsed);
  return true;
}

}  // namespace strata

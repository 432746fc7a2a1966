// Fuzzes the config.json parser (engine/model_config.h, ParseModelConfig).
// A config that parses is valid (Validate) and its derived numbers (rotary
// frequencies, parameter count) are computed, as model loading does.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "engine/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = strata::engine::ParseModelConfig(text, "config.json");
  if (!config.ok()) return 0;
  if (!config->Validate().ok()) std::abort();
  const std::vector<float> inv_freq = config->RopeInvFreq();
  if (static_cast<int>(inv_freq.size()) != config->head_dim / 2) std::abort();
  if (config->NumParameters() <= 0) std::abort();
  return 0;
}

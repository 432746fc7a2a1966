// Fuzzes the KV profile parser (kvtier/profile.h, ParseProfile) with
// arbitrary YAML, and ParseByteSize with the raw input. yaml-cpp's exceptions
// must stop inside ParseProfile; a profile that parses is checked with
// CheckSupported like a server's --profile.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvtier/profile.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)strata::kvtier::ParseByteSize(text);
  auto profile = strata::kvtier::ParseProfile(text, "profile.yaml");
  if (!profile.ok()) return 0;
  (void)strata::kvtier::CheckSupported(*profile, "profile.yaml");
  return 0;
}

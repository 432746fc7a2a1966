// Fuzzes the safetensors parser (engine/safetensors.h, ParseSafetensors):
// the input is a whole file (8-byte header length, JSON header, data). A
// header that parses must describe tensors that lie inside the input, with
// byte sizes that match their shapes; every tensor's bytes are read to let
// AddressSanitizer check that.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "absl/types/span.h"
#include "engine/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto contents =
      strata::engine::ParseSafetensors(absl::MakeConstSpan(data, size), "fuzz.safetensors");
  if (!contents.ok()) return 0;
  uint8_t sum = 0;
  for (const auto& [name, view] : contents->tensors) {
    if (view.data < data || view.data + view.nbytes > data + size) std::abort();
    if (static_cast<size_t>(view.numel()) * strata::engine::DTypeSize(view.dtype) != view.nbytes) {
      std::abort();
    }
    for (size_t i = 0; i < view.nbytes; ++i) sum += view.data[i];
  }
  volatile uint8_t sink = sum;
  (void)sink;
  return 0;
}

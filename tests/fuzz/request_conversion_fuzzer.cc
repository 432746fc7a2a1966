// Fuzzes request validation (router/request_conversion.h, ToEngineRequest):
// the input is a serialized strata.v1.GenerateRequest (inputs that do not
// parse are skipped), converted with the tokenizer of models/tiny-llama and
// a server's limits. An accepted request must fit those limits.
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "router/request_conversion.h"
#include "strata/v1/generate.pb.h"

namespace {

std::unique_ptr<strata::engine::Tokenizer>* tokenizer = nullptr;
strata::router::RequestLimits* limits = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Invalid UTF-8 in proto3 strings is logged by the parser; not news here.
  google::protobuf::SetLogHandler(nullptr);
  const std::string dir = STRATA_SOURCE_DIR "/models/tiny-llama";
  auto loaded = strata::engine::LoadTokenizer(dir);
  auto config = strata::engine::LoadModelConfig(dir);
  if (!loaded.ok() || !config.ok()) {
    std::fprintf(stderr, "cannot load %s\n", dir.c_str());
    std::abort();
  }
  tokenizer = new std::unique_ptr<strata::engine::Tokenizer>(*std::move(loaded));
  limits = new strata::router::RequestLimits;
  // As `strata serve --model models/tiny-llama --profile long-doc.yaml` sets them.
  limits->context_length = 512;
  limits->vocab_size = config->vocab_size;
  limits->default_max_tokens = 256;
  limits->max_token_bytes = strata::router::MaxTokenBytes(**tokenizer);
  limits->profiles = {"default", "long-doc"};
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  strata::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  // With the tokenizer, and as a server without one (token ids only).
  const strata::engine::Tokenizer* tokenizers[] = {tokenizer->get(), nullptr};
  for (const strata::engine::Tokenizer* t : tokenizers) {
    auto converted = strata::router::ToEngineRequest(request, t, *limits);
    if (!converted.ok()) continue;
    const auto& r = *converted;
    if (r.prompt.empty() || static_cast<int>(r.prompt.size()) >= limits->context_length ||
        r.max_tokens < 1 ||
        static_cast<int>(r.prompt.size()) + r.max_tokens > limits->context_length) {
      std::fprintf(stderr, "accepted a request outside the limits\n");
      std::abort();
    }
    for (int32_t id : r.prompt) {
      if (id < 0 || id >= limits->vocab_size) std::abort();
    }
  }
  return 0;
}

// GenerationService: the public strata.v1.Generation gRPC service in front
// of an AsyncEngine (router, prefill and decode in one process).
//
// Every call is served on gRPC's callback API: no thread waits on a call,
// so thousands of concurrent streams cost memory in proportion to their
// undelivered tokens and a bounded number of gRPC threads.
//
// Generate parses the request itself (a message that does not parse, e.g. a
// string field that is not UTF-8, is INVALID_ARGUMENT naming why), validates
// it (INVALID_ARGUMENT naming the field), admits it against a bounded number
// of requests in flight (RESOURCE_EXHAUSTED beyond it), submits it to the
// engine and streams the tokens back as they come, coalescing the tokens
// that are ready into one response while the previous write is in flight.
//
// A request holds its in-flight slot while the engine holds its sequence:
// from admission to the engine's last event. A client that stops reading
// therefore loses nothing but its own stream: its slot is free once its
// generation ends, and if it falls `max_undelivered_tokens` behind, its
// sequence is cancelled (KV freed) and its call too (CANCELLED).
//
// Client cancellation or an expired deadline cancels the sequence in the
// engine, which frees its KV before the next step.
//
// On a decode worker (set_remote_prefill), a call from the router whose
// metadata names a prefill worker (kPrefillAddressKey) has its prompt
// computed there: the stream reserves room for the KV, waits for the
// prefill worker's first token (its KV landed here by then), and submits
// the request with that token and the KV to the engine, which streams the
// token at once and decodes the rest. A prefill worker that cannot be
// reached or does not answer in time leaves the prompt to be computed here,
// so the request still completes.
//
// Thread-safety: gRPC calls the handlers from many threads and the engine
// calls the streams' sinks from its own; the service's state is atomics and
// each stream's state is under its own mutex.
#ifndef STRATA_ROUTER_GENERATION_SERVICE_H_
#define STRATA_ROUTER_GENERATION_SERVICE_H_

#include <atomic>
#include <string>

#include "decode/remote_prefill.h"
#include "engine/async_engine.h"
#include "engine/tokenizer.h"
#include "router/request_conversion.h"
#include "router/server_metrics.h"
#include "strata/v1/generate.grpc.pb.h"

namespace strata::router {

struct ServiceOptions {
  std::string model_name;
  std::string architecture;
  RequestLimits limits;
  std::string default_profile = "default";
  int max_requests_in_flight = 256;  // waiting + running in the engine
  // Tokens generated for a stream and not yet taken by its client's
  // transport (gRPC's flow control window full). Beyond this the client is
  // not reading: its sequence and call are cancelled.
  int max_undelivered_tokens = 8192;
};

// The generated service with Generate and Tokenize taking raw bytes (parsed
// by the router, see the file comment) and ModelInfo typed.
using GenerationServiceBase =
    v1::Generation::WithRawCallbackMethod_Generate<v1::Generation::WithRawCallbackMethod_Tokenize<
        v1::Generation::WithCallbackMethod_ModelInfo<v1::Generation::Service>>>;

class GenerateStream;

// Tokenize and ModelInfo as every strata.v1.Generation front end answers
// them (this service and the router's): the raw request parsed and its
// text tokenized with `tokenizer` (null: refused), and the served model
// described.
grpc::ServerUnaryReactor* AnswerTokenize(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer& request,
                                         const engine::Tokenizer* tokenizer,
                                         size_t max_request_bytes, grpc::ByteBuffer* response);
grpc::ServerUnaryReactor* AnswerModelInfo(grpc::CallbackServerContext* context,
                                          const std::string& model_name,
                                          const std::string& architecture,
                                          const RequestLimits& limits,
                                          const std::string& default_profile,
                                          v1::ModelInfoResponse* response);

// The metadata key of the prefill worker's address on a Generate call from
// the router to a decode worker (strata/internal/v1/worker.proto).
inline constexpr char kPrefillAddressKey[] = "strata-prefill-address";

class GenerationService final : public GenerationServiceBase {
 public:
  // engine, tokenizer (may be null) and metrics (may be null) must outlive
  // the service. The service must outlive every call and every sequence it
  // submitted: stop the gRPC server (Shutdown, Wait) and then the engine
  // (Stop) before destroying it.
  GenerationService(engine::AsyncEngine* engine, const engine::Tokenizer* tokenizer,
                    ServerMetrics* metrics, ServiceOptions options);

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* context,
                                      const v1::ModelInfoRequest* request,
                                      v1::ModelInfoResponse* response) override;

  // Makes this a decode worker that has prompts computed by prefill workers
  // (see the file comment). Set before serving; must outlive the service.
  void set_remote_prefill(decode::RemotePrefill* remote) { remote_prefill_ = remote; }
  // Requests whose remote prefill failed and were computed here instead.
  int64_t prefill_fallbacks() const { return prefill_fallbacks_.load(); }

  // Requests admitted whose sequence the engine still holds.
  int requests_in_flight() const { return in_flight_.load(); }
  // Generate calls gRPC has not finished with (admitted or not).
  int open_streams() const { return open_streams_.load(); }

 private:
  friend class GenerateStream;

  engine::AsyncEngine* engine_;
  const engine::Tokenizer* tokenizer_;
  ServerMetrics* metrics_;
  ServiceOptions options_;
  std::atomic<int> in_flight_{0};
  std::atomic<int> open_streams_{0};
  std::atomic<uint64_t> next_id_{1};
  decode::RemotePrefill* remote_prefill_ = nullptr;
  std::atomic<int64_t> prefill_fallbacks_{0};
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_GENERATION_SERVICE_H_

// GenerationService: the public strata.v1.Generation gRPC service in front
// of an AsyncEngine (router, prefill and decode in one process).
//
// Generate validates the request (INVALID_ARGUMENT naming the field), admits
// it against a bounded number of requests in flight (RESOURCE_EXHAUSTED
// beyond it, so memory stays bounded), submits it to the engine and streams
// the tokens back as they come. It watches the call's context: on client
// cancellation or deadline the request is cancelled in the engine, which
// frees its KV before the next step.
//
// Thread-safety: gRPC calls the handlers from many threads; the service's
// state is atomics and the thread-safe engine.
#ifndef STRATA_ROUTER_GENERATION_SERVICE_H_
#define STRATA_ROUTER_GENERATION_SERVICE_H_

#include <atomic>
#include <string>

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
  int max_requests_in_flight = 256;  // waiting + running
};

class GenerationService final : public v1::Generation::Service {
 public:
  // engine, tokenizer (may be null) and metrics (may be null) must outlive
  // the service.
  GenerationService(engine::AsyncEngine* engine, const engine::Tokenizer* tokenizer,
                    ServerMetrics* metrics, ServiceOptions options);

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override;
  grpc::Status ModelInfo(grpc::ServerContext* context, const v1::ModelInfoRequest* request,
                         v1::ModelInfoResponse* response) override;

  int requests_in_flight() const { return in_flight_.load(); }

 private:
  engine::AsyncEngine* engine_;
  const engine::Tokenizer* tokenizer_;
  ServerMetrics* metrics_;
  ServiceOptions options_;
  std::atomic<int> in_flight_{0};
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace strata::router

#endif  // STRATA_ROUTER_GENERATION_SERVICE_H_

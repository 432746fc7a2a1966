// A worker's description as the router's tests register it: model "tiny",
// KV format "bf16", the given profiles.
#ifndef STRATA_TESTS_ROUTER_WORKER_TEST_UTIL_H_
#define STRATA_TESTS_ROUTER_WORKER_TEST_UTIL_H_

#include <string>
#include <vector>

#include "strata/internal/v1/worker.pb.h"

namespace strata::testing_util {

inline internal::v1::WorkerInfo TestWorkerInfo(const std::string& id, internal::v1::WorkerRole role,
                                               const std::string& address,
                                               const std::vector<std::string>& profiles = {
                                                   "default"}) {
  internal::v1::WorkerInfo info;
  info.set_worker_id(id);
  info.set_role(role);
  info.set_grpc_address(address);
  info.set_kv_address("kv-" + id);
  info.set_model("tiny");
  info.set_kv_format("bf16");
  for (const std::string& p : profiles) info.add_profiles(p);
  return info;
}

}  // namespace strata::testing_util

#endif  // STRATA_TESTS_ROUTER_WORKER_TEST_UTIL_H_

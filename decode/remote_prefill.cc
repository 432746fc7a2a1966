#include "decode/remote_prefill.h"

#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace strata::decode {
namespace {

// Transfer ids differ between this worker's lives, so a block of a transfer
// from before a restart never lands in a new one.
uint64_t FirstTransferId() {
  std::random_device random;
  return (uint64_t{random()} << 32 | random()) & ~uint64_t{0xffffff};
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& address) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("prefill worker ", address, ": ", s.error_message()));
}

}  // namespace

RemotePrefill::RemotePrefill(kvtier::LandingArea* area, int page_size, std::string kv_address,
                             RemotePrefillOptions options)
    : area_(area),
      page_size_(page_size),
      kv_address_(std::move(kv_address)),
      options_(options),
      next_transfer_(FirstTransferId()) {}

internal::v1::Worker::Stub* RemotePrefill::StubFor(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto& stub = stubs_[address];
  if (stub == nullptr) {
    stub = internal::v1::Worker::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }
  return stub.get();
}

std::shared_ptr<RemotePrefill::Call> RemotePrefill::Start(const std::string& prefill_address,
                                                          internal::v1::PrefillRequest request,
                                                          First first, Done done) {
  const uint64_t transfer_id = next_transfer_.fetch_add(1) + 1;
  const int blocks = (request.prompt_ids_size() + page_size_ - 1) / page_size_;
  if (absl::Status s =
          area_->Reserve(transfer_id, blocks, absl::Now() + options_.timeout + options_.lease);
      !s.ok()) {
    done(s);
    return nullptr;
  }
  auto call = std::make_shared<Call>();
  call->owner_ = this;
  call->transfer_id_ = transfer_id;
  call->address_ = prefill_address;
  call->first_ = std::move(first);
  call->done_ = std::move(done);
  call->request_ = std::move(request);
  call->request_.set_request_id(absl::StrCat(call->request_.request_id(), "/", transfer_id));
  call->request_.set_kv_destination(kv_address_);
  call->request_.set_transfer_id(transfer_id);
  call->request_.set_kv_format(options_.kv_format);
  call->context_.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  call->self_ = call;
  StubFor(prefill_address)->async()->Prefill(&call->context_, &call->request_, call.get());
  call->StartRead(&call->response_);
  call->StartCall();
  return call;
}

void RemotePrefill::Call::OnReadDone(bool ok) {
  if (!ok) return;  // OnDone follows
  if (response_.kv_landed()) {
    landed_ = true;
    landed_response_ = response_;
  } else if (first_) {
    taken_ = first_(transfer_id_, {response_.first_token(), response_.first_logprob()});
    first_ = nullptr;
  }
  StartRead(&response_);
}

void RemotePrefill::Call::OnDone(const grpc::Status& status) {
  // The last reaction: this call goes with it.
  const std::shared_ptr<Call> self = std::move(self_);
  kvtier::LandingArea* area = owner_->area_;
  absl::Status error;
  if (!status.ok()) {
    error = FromGrpc(status, address_);
  } else if (!landed_) {
    error = absl::UnavailableError(
        absl::StrCat("prefill worker ", address_, " ended its answer before the KV had landed"));
  }
  if (!error.ok()) {
    if (taken_) {
      area->SenderFailed(transfer_id_, error);
    } else {
      area->Drop(transfer_id_);
    }
    done_(error);
    return;
  }
  // Landed: now its owner's to load or drop, however long the request
  // waits for its turn.
  area->SenderDone(transfer_id_);
  Result result;
  result.transfer_id = transfer_id_;
  result.first = {landed_response_.first_token(), landed_response_.first_logprob()};
  result.response = landed_response_;
  done_(std::move(result));
}

}  // namespace strata::decode

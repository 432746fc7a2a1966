#include "router/wire.h"

#include <grpc/support/log.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "google/protobuf/stubs/logging.h"

namespace strata::router {
namespace {

// The last line protobuf logged on this thread: when a parse fails, it says
// why (protobuf reports a string field with invalid UTF-8 only there).
thread_local std::string t_last_protobuf_error;

void ProtobufLog(google::protobuf::LogLevel level, const char* file, int line,
                 const std::string& message) {
  if (level >= google::protobuf::LOGLEVEL_FATAL) {
    STRATA_LOG_ERROR("protobuf {}:{}: {}", file, line, message);
    return;
  }
  t_last_protobuf_error = message;
  // Parse errors describe a client's bad message, which the client is
  // answered about; they are not the server's errors.
  STRATA_LOG_DEBUG("protobuf {}:{}: {}", file, line, message);
}

void GrpcLog(gpr_log_func_args* args) {
  switch (args->severity) {
    case GPR_LOG_SEVERITY_ERROR:
      STRATA_LOG_ERROR("grpc {}:{}: {}", args->file, args->line, args->message);
      break;
    case GPR_LOG_SEVERITY_INFO:
      STRATA_LOG_INFO("grpc {}:{}: {}", args->file, args->line, args->message);
      break;
    default:
      STRATA_LOG_DEBUG("grpc {}:{}: {}", args->file, args->line, args->message);
      break;
  }
}

}  // namespace

void RouteLibraryLogs() {
  static std::once_flag once;
  std::call_once(once, [] {
    google::protobuf::SetLogHandler(&ProtobufLog);
    gpr_set_log_function(&GrpcLog);
  });
}

absl::Status ParseMessage(const grpc::ByteBuffer& bytes, size_t max_bytes,
                          google::protobuf::Message* message) {
  const std::string& name = message->GetDescriptor()->name();
  const size_t size = bytes.Length();
  if (size > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": the request is ", size, " bytes; this server accepts at most ", max_bytes));
  }
  grpc::ByteBuffer copy(bytes);  // shares the slices; the reader needs a mutable buffer
  grpc::ProtoBufferReader reader(&copy);
  if (!reader.status().ok()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unreadable request bytes"));
  }
  t_last_protobuf_error.clear();
  if (!message->ParseFromZeroCopyStream(&reader)) {
    std::string why =
        t_last_protobuf_error.empty() ? "not a valid serialized message" : t_last_protobuf_error;
    t_last_protobuf_error.clear();
    return absl::InvalidArgumentError(absl::StrCat(name, ": cannot parse the request: ", why));
  }
  return absl::OkStatus();
}

absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  out->Clear();  // the serializer wants an empty buffer (a stream reuses one)
  bool own_buffer = false;
  const grpc::Status s =
      grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, out, &own_buffer);
  if (!s.ok()) return absl::InternalError(s.error_message());
  return absl::OkStatus();
}

grpc::Status ToGrpcStatus(const absl::Status& s) {
  // absl and gRPC number their codes alike (both follow google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace strata::router

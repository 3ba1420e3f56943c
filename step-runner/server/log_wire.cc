#include "step-runner/server/log_wire.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/slice.h"

namespace step_runner::server {
namespace {

using google::protobuf::internal::WireFormatLite;

// A slice's hold on the owner of its bytes: released by gRPC once they are written.
void ReleaseOwner(void* hold) { delete static_cast<std::shared_ptr<const void>*>(hold); }

}  // namespace

proto::FollowLogsResponse::Stream ToProto(logs::Stream stream) {
  return stream == logs::Stream::kStderr ? proto::FollowLogsResponse::STREAM_STDERR
                                         : proto::FollowLogsResponse::STREAM_STDOUT;
}

grpc::ByteBuffer EncodeLogChunk(const LogBytes& bytes) {
  // Field 1 (data) first, as protobuf writes it: its tag and length, the bytes, then the
  // other fields, which protobuf serialises itself.
  uint8_t head[1 + 10];
  uint8_t* end = WireFormatLite::WriteTagToArray(proto::FollowLogsResponse::kDataFieldNumber,
                                                 WireFormatLite::WIRETYPE_LENGTH_DELIMITED, head);
  end = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(bytes.data.size(), end);
  proto::FollowLogsResponse rest;
  rest.set_offset(bytes.offset);
  rest.set_stream(ToProto(bytes.stream));
  const std::string tail = rest.SerializeAsString();

  grpc::Slice slices[3] = {
      grpc::Slice(head, static_cast<size_t>(end - head)),
      // gRPC only reads a slice it sends; the cast is its constructor's want of a `void*`.
      grpc::Slice(const_cast<char*>(bytes.data.data()), bytes.data.size(), &ReleaseOwner,
                  new std::shared_ptr<const void>(bytes.owner)),
      grpc::Slice(tail),
  };
  return grpc::ByteBuffer(slices, 3);
}

absl::StatusOr<grpc::ByteBuffer> EncodeLogMessage(const proto::FollowLogsResponse& message) {
  grpc::ByteBuffer buffer;
  bool own_buffer = false;
  grpc::Status s = grpc::SerializationTraits<proto::FollowLogsResponse>::Serialize(message, &buffer, &own_buffer);
  if (!s.ok()) return absl::InternalError(absl::StrCat("serialising a log message: ", s.error_message()));
  return buffer;
}

}  // namespace step_runner::server

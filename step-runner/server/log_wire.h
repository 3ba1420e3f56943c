#ifndef STEP_RUNNER_SERVER_LOG_WIRE_H_
#define STEP_RUNNER_SERVER_LOG_WIRE_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/step_runner.pb.h"
#include "step-runner/logs/job_log.h"

namespace step_runner::server {

// A run of a job's log bytes, and what keeps them alive.
struct LogBytes {
  int64_t offset = 0;
  logs::Stream stream = logs::Stream::kStdout;
  absl::string_view data;
  std::shared_ptr<const void> owner;
};

// A FollowLogsResponse carrying `bytes`, built around them without copying them: gRPC sends
// the slice as it is and lets go of the owner once it has. The bytes on the wire are exactly
// what protobuf serialises for the same message (fields in the same order), so every client,
// GitLab's among them, parses it as usual. FollowLogs is a raw gRPC method for this:
// protobuf's own path copied each 1 MiB chunk once more, into a new buffer.
grpc::ByteBuffer EncodeLogChunk(const LogBytes& bytes);

// Any other FollowLogsResponse (the stream's last message) through protobuf.
absl::StatusOr<grpc::ByteBuffer> EncodeLogMessage(const proto::FollowLogsResponse& message);

proto::FollowLogsResponse::Stream ToProto(logs::Stream stream);

}  // namespace step_runner::server

#endif  // STEP_RUNNER_SERVER_LOG_WIRE_H_

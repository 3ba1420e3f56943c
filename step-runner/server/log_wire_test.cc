#include "step-runner/server/log_wire.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner::server {
namespace {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return bytes;
}

TEST(LogWireTest, ChunkIsExactlyWhatProtobufWouldSendAndHoldsItsBytesUntilSent) {
  // An owner whose release we can see, holding bytes of every value (a length over 127 takes a
  // two-byte varint, over 16383 three).
  std::string bytes;
  for (int i = 0; i < 70000; ++i) bytes.push_back(static_cast<char>(i * 7));
  bool released = false;
  auto owner = std::shared_ptr<const void>(bytes.data(), [&](const void*) { released = true; });
  LogBytes span{.offset = int64_t{5} << 33, .stream = logs::Stream::kStderr, .data = bytes, .owner = std::move(owner)};
  proto::FollowLogsResponse expected;
  expected.set_data(bytes);
  expected.set_offset(span.offset);
  expected.set_stream(proto::FollowLogsResponse::STREAM_STDERR);
  {
    grpc::ByteBuffer encoded = EncodeLogChunk(span);
    span.owner.reset();
    EXPECT_FALSE(released) << "released while gRPC may still send the bytes";
    EXPECT_TRUE(Flatten(encoded) == expected.SerializeAsString());
    proto::FollowLogsResponse parsed;
    ASSERT_TRUE(parsed.ParseFromString(Flatten(encoded)));
    EXPECT_TRUE(parsed.data() == bytes);
    EXPECT_EQ(parsed.offset(), span.offset);
    EXPECT_EQ(parsed.stream(), proto::FollowLogsResponse::STREAM_STDERR);
  }
  EXPECT_TRUE(released);
}

TEST(LogWireTest, LastMessageCarriesTheJobStatus) {
  proto::FollowLogsResponse last;
  last.set_offset(42);
  last.mutable_job_status()->set_id("job-1");
  last.mutable_job_status()->set_status(proto::StepResult::failure);
  SR_ASSERT_OK_AND_ASSIGN(grpc::ByteBuffer encoded, EncodeLogMessage(last));
  proto::FollowLogsResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(Flatten(encoded)));
  EXPECT_EQ(parsed.offset(), 42);
  EXPECT_EQ(parsed.job_status().id(), "job-1");
  EXPECT_EQ(parsed.job_status().status(), proto::StepResult::failure);
  EXPECT_TRUE(parsed.data().empty());
}

}  // namespace
}  // namespace step_runner::server

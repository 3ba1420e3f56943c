#include "step-runner/logs/job_log.h"

#include <stdlib.h>

#include <atomic>

#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"

namespace step_runner::logs {
namespace {

class JobLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/sr_job_log_test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
  }
  void TearDown() override { SR_EXPECT_OK(RemoveTree(dir_)); }
  std::string dir_;
};

std::string ReadAll(const JobLog& log) {
  auto fd = log.OpenReader();
  EXPECT_TRUE(fd.ok());
  std::string all;
  JobLog::Chunk chunk;
  int64_t offset = 0;
  for (;;) {
    auto n = log.Read(fd->get(), offset, 3, &chunk);
    EXPECT_TRUE(n.ok());
    if (*n == 0) break;
    all += chunk.data;
    offset += *n;
  }
  return all;
}

TEST_F(JobLogTest, ChunksNeverMixStreams) {
  SR_ASSERT_OK_AND_ASSIGN(auto log, JobLog::Create(dir_));
  SR_ASSERT_OK(log->Append(Stream::kStdout, "out1\n"));
  SR_ASSERT_OK(log->Append(Stream::kStderr, "err\n"));
  SR_ASSERT_OK(log->Append(Stream::kStdout, "out2\n"));
  SR_ASSERT_OK_AND_ASSIGN(auto fd, log->OpenReader());
  JobLog::Chunk chunk;
  SR_ASSERT_OK_AND_ASSIGN(size_t n, log->Read(fd.get(), 0, 100, &chunk));
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(chunk.data, "out1\n");
  EXPECT_EQ(chunk.stream, Stream::kStdout);
  SR_ASSERT_OK_AND_ASSIGN(n, log->Read(fd.get(), 7, 100, &chunk));  // mid-stderr
  EXPECT_EQ(chunk.data, "r\n");
  EXPECT_EQ(chunk.stream, Stream::kStderr);
  SR_ASSERT_OK_AND_ASSIGN(n, log->Read(fd.get(), 9, 100, &chunk));
  EXPECT_EQ(chunk.data, "out2\n");
  EXPECT_EQ(chunk.stream, Stream::kStdout);
}

TEST_F(JobLogTest, OffsetPastEndIsOutOfRange) {
  SR_ASSERT_OK_AND_ASSIGN(auto log, JobLog::Create(dir_));
  SR_ASSERT_OK(log->Append(Stream::kStdout, "abc"));
  SR_ASSERT_OK_AND_ASSIGN(auto fd, log->OpenReader());
  JobLog::Chunk chunk;
  EXPECT_TRUE(absl::IsOutOfRange(log->Read(fd.get(), 4, 10, &chunk).status()));
  EXPECT_TRUE(absl::IsOutOfRange(log->Read(fd.get(), -1, 10, &chunk).status()));
  SR_ASSERT_OK_AND_ASSIGN(size_t n, log->Read(fd.get(), 3, 10, &chunk));
  EXPECT_EQ(n, 0u);
}

TEST_F(JobLogTest, WaitersWakeOnAppendAndFinish) {
  SR_ASSERT_OK_AND_ASSIGN(auto log, JobLog::Create(dir_));
  std::atomic<int> woken{0};
  ASSERT_TRUE(log->WaitForData(0, [&] { ++woken; }).has_value());
  SR_ASSERT_OK(log->Append(Stream::kStdout, "x"));
  EXPECT_EQ(woken.load(), 1);
  EXPECT_FALSE(log->WaitForData(0, [&] { ++woken; }).has_value());  // data already there
  auto id = log->WaitForData(1, [&] { ++woken; });
  ASSERT_TRUE(id.has_value());
  log->Finish();
  EXPECT_EQ(woken.load(), 2);
  EXPECT_FALSE(log->WaitForData(1, [&] { ++woken; }).has_value());  // finished
  EXPECT_FALSE(log->Append(Stream::kStdout, "late").ok());
}

TEST_F(JobLogTest, ReopenedLogIsByteExactWithStreams) {
  std::string binary("\0\xff\xfe\r\n\n\n", 7);
  {
    SR_ASSERT_OK_AND_ASSIGN(auto log, JobLog::Create(dir_));
    SR_ASSERT_OK(log->Append(Stream::kStdout, binary));
    SR_ASSERT_OK(log->Append(Stream::kStderr, "E"));
  }  // dropped without Finish, as when the daemon is killed
  SR_ASSERT_OK_AND_ASSIGN(auto log, JobLog::OpenFinished(dir_));
  EXPECT_TRUE(log->finished());
  EXPECT_EQ(log->size(), 8);
  EXPECT_EQ(ReadAll(*log), binary + "E");
  SR_ASSERT_OK_AND_ASSIGN(auto fd, log->OpenReader());
  JobLog::Chunk chunk;
  SR_ASSERT_OK(log->Read(fd.get(), 7, 10, &chunk).status());
  EXPECT_EQ(chunk.stream, Stream::kStderr);
}

}  // namespace
}  // namespace step_runner::logs

#include "step-runner/audit/audit_log.h"

#include <stdlib.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"

namespace step_runner::audit {
namespace {

using ::testing::HasSubstr;

class AuditLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/sr_audit_test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/audit.log";
  }
  void TearDown() override { (void)RemoveTree(dir_); }

  void Write(int n) {
    SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AuditLog> log, AuditLog::Open(path_));
    for (int i = 0; i < n; ++i) {
      SR_ASSERT_OK(log->Append({{"kind", "rpc"}, {"method", "Run"}, {"job", absl::StrCat("job-", i)}, {"uid", 0}}));
    }
  }
  std::vector<std::string> Lines() {
    std::vector<std::string> lines = absl::StrSplit(ReadFile(path_).value(), '\n');
    lines.pop_back();
    return lines;
  }
  void Rewrite(const std::vector<std::string>& lines) {
    std::string text;
    for (const std::string& l : lines) absl::StrAppend(&text, l, "\n");
    SR_ASSERT_OK(WriteFileAtomically(path_, text, 0600));
  }

  std::string dir_;
  std::string path_;
};

TEST_F(AuditLogTest, AnIntactChainVerifiesAcrossReopening) {
  Write(3);
  Write(2);  // a restarted daemon continues the same chain
  absl::StatusOr<int64_t> lines = Verify(path_);
  SR_ASSERT_OK(lines.status());
  EXPECT_EQ(*lines, 5);
  std::vector<std::string> text = Lines();
  EXPECT_THAT(text[0], HasSubstr(std::string(64, '0')));
  EXPECT_THAT(text[1], HasSubstr(Sha256Hex(text[0])));
  EXPECT_THAT(FormatLine(text[4]), HasSubstr("method=Run"));
}

TEST_F(AuditLogTest, OneChangedByteIsDetectedAndNamed) {
  Write(4);
  std::vector<std::string> lines = Lines();
  size_t at = lines[1].find("job-1");
  ASSERT_NE(at, std::string::npos);
  lines[1][at + 4] = '7';  // job-1 -> job-7, still valid JSON
  Rewrite(lines);
  absl::StatusOr<int64_t> result = Verify(path_);
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.status().message(), HasSubstr("line 2:"));
}

TEST_F(AuditLogTest, RemovedReorderedAndTruncatedLinesAreDetected) {
  Write(5);
  const std::vector<std::string> original = Lines();

  std::vector<std::string> removed = original;
  removed.erase(removed.begin() + 2);
  Rewrite(removed);
  EXPECT_FALSE(Verify(path_).ok());

  std::vector<std::string> swapped = original;
  std::swap(swapped[1], swapped[2]);
  Rewrite(swapped);
  EXPECT_FALSE(Verify(path_).ok());

  std::vector<std::string> truncated = original;
  truncated.pop_back();
  Rewrite(truncated);
  absl::StatusOr<int64_t> result = Verify(path_);
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.status().message(), HasSubstr("head"));

  Rewrite(original);
  SR_EXPECT_OK(Verify(path_).status());
}

TEST_F(AuditLogTest, ReopeningATruncatedLogRecordsTheProblemInTheChain) {
  Write(3);
  std::vector<std::string> lines = Lines();
  lines.pop_back();
  Rewrite(lines);
  Write(1);
  std::string text = ReadFile(path_).value();
  EXPECT_THAT(text, HasSubstr("audit_log_reopened"));
  // The chain itself continues intact from what was there.
  SR_EXPECT_OK(Verify(path_).status());
}

TEST_F(AuditLogTest, ValuesCannotBreakALine) {
  SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AuditLog> log, AuditLog::Open(path_));
  SR_ASSERT_OK(log->Append({{"kind", "rpc"}, {"job", "evil\n{\"kind\":\"forged\"}\xff"}}));
  EXPECT_EQ(Lines().size(), 1u);
  SR_EXPECT_OK(Verify(path_).status());
}

}  // namespace
}  // namespace step_runner::audit

#include "proxy/server.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <string>

#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "proxy/audit.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"

namespace step_runner::proxy {
namespace {

class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/proxy_test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~ScratchDir() { (void)RemoveTree(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  ::stat(path.c_str(), &st);
  return st.st_mode & 0777;
}

TEST(ProxyHostKeyTest, GeneratedOnceOwnerOnlyAndKept) {
  ScratchDir dir;
  const std::string path = dir.path() + "/host_ed25519";
  SR_ASSERT_OK(EnsureHostKey(path));
  EXPECT_EQ(ModeOf(path), 0600u);
  SR_ASSERT_OK_AND_ASSIGN(std::string first, ReadFile(path));
  EXPECT_NE(first.find("OPENSSH PRIVATE KEY"), std::string::npos);
  SR_ASSERT_OK(EnsureHostKey(path));  // a restart: the same key, not a new one
  EXPECT_EQ(ReadFile(path).value_or(""), first);
}

TEST(ProxyHostKeyTest, RefusesAKeyOthersCanRead) {
  ScratchDir dir;
  const std::string path = dir.path() + "/host_ed25519";
  SR_ASSERT_OK(EnsureHostKey(path));
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  absl::Status s = EnsureHostKey(path);
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_NE(s.message().find("(mode 0644)"), absl::string_view::npos) << s;  // as chmod takes it, not 420
  SR_ASSERT_OK(WriteFileAtomically(path, "not a key", 0600));
  EXPECT_TRUE(absl::IsInvalidArgument(EnsureHostKey(path)));
}

TEST(ProxyAuditLogTest, OneJsonObjectPerLineOwnerOnly) {
  ScratchDir dir;
  const std::string path = dir.path() + "/audit.jsonl";
  SR_ASSERT_OK_AND_ASSIGN(auto audit, AuditLog::Open(path));
  audit->Write({{"event", "connection"}, {"user", "ws\nforged"}});
  // Bytes that are not UTF-8 (a username is whatever the client sent) do not break the line.
  audit->Write({{"event", "channel"}, {"user", std::string("\xff\xfe", 2)}});
  EXPECT_EQ(ModeOf(path), 0600u);
  std::vector<std::string> lines =
      absl::StrSplit(ReadFile(path).value_or(""), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(nlohmann::json::parse(lines[0])["user"], "ws\nforged");
  EXPECT_EQ(nlohmann::json::parse(lines[1])["event"], "channel");
  EXPECT_EQ(AuditTime(absl::FromUnixMillis(1795335590123)), "2026-11-22T08:19:50.123Z");
}

}  // namespace
}  // namespace step_runner::proxy

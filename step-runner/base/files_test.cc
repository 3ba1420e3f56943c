#include "step-runner/base/files.h"
#include "step-runner/base/sha256.h"

#include <sys/stat.h>

#include <cstdlib>

#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/sr_files_test.XXXXXX";
  return ::mkdtemp(tmpl);
}

TEST(FilesTest, AtomicWriteReplacesContentAndKeepsMode) {
  std::string dir = TempDir();
  std::string path = dir + "/record";
  SR_ASSERT_OK(WriteFileAtomically(path, "first", 0600));
  SR_ASSERT_OK(WriteFileAtomically(path, std::string("sec\0ond", 7), 0600));
  SR_ASSERT_OK_AND_ASSIGN(std::string content, ReadFile(path));
  EXPECT_EQ(content, std::string("sec\0ond", 7));
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  SR_EXPECT_OK(RemoveTree(dir));
}

// Renaming over a fifo or a device would replace it with a plain file (as root, /dev/null).
TEST(FilesTest, AtomicWriteNeverReplacesASpecialFile) {
  std::string dir = TempDir();
  const std::string fifo = dir + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  absl::Status s = WriteFileAtomically(fifo, "x", 0600);
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  struct stat st;
  ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_TRUE(RemoveTree(dir).ok());
}

TEST(FilesTest, MakeDirsAndRemoveTree) {
  std::string dir = TempDir();
  SR_ASSERT_OK(MakeDirs(dir + "/a/b/c", 0700));
  SR_ASSERT_OK(WriteFileAtomically(dir + "/a/b/c/f", "x", 0600));
  SR_ASSERT_OK(RemoveTree(dir));
  struct stat st;
  EXPECT_NE(::stat(dir.c_str(), &st), 0);
  SR_EXPECT_OK(RemoveTree(dir));  // missing is fine
}

TEST(FilesTest, ReadMissingFileNamesPath) {
  auto content = ReadFile("/nonexistent/sr-file");
  ASSERT_FALSE(content.ok());
  EXPECT_TRUE(absl::IsNotFound(content.status()));
  EXPECT_NE(content.status().message().find("/nonexistent/sr-file"), std::string::npos);
}

}  // namespace
}  // namespace step_runner

namespace step_runner {
namespace {

// The audit chain and the job fingerprints depend on these being the standard SHA-256.
TEST(Sha256Test, MatchesTheStandardVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256(std::string(1000000, 'a')).size(), 32u);
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

}  // namespace
}  // namespace step_runner

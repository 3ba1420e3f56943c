#include "step-runner/base/files.h"

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

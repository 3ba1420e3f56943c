// CheckoutFreshClone against git itself: a repository made with the git CLI is cloned with
// libgit2 (no checkout), checked out by CheckoutFreshClone, and then git must find the work tree
// and the index exactly as its own clone would leave them.
#include "steps-catalog/helper/fresh_checkout.h"

#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "steps-catalog/helper/git_ops.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/temp_dir_test_util.h"

namespace step_runner::catalog {
namespace {

using ::testing::HasSubstr;

// Runs a shell command; its stdout, or the exit status if it failed.
std::string Shell(const std::string& command) {
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  std::string out;
  char buffer[4096];
  size_t n;
  while ((n = ::fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, n);
  const int status = ::pclose(pipe);
  return status == 0 ? out : absl::StrCat("FAILED (", status, "): ", command, "\n", out);
}

class FreshCheckoutTest : public TempDirTest {
 protected:
  // A repository at dir_/src whose one commit holds `files` (path -> content), made by git.
  void MakeSource(const std::string& setup) {
    const std::string src = dir_ + "/src";
    ASSERT_EQ(Shell(absl::StrCat("set -e; git init -q -b main ", src, "; cd ", src, "; ", setup,
                                 "; git add -A; git -c user.name=t -c user.email=t@e commit -qm one")),
              "");
  }
  // libgit2's clone of it, without a checkout, as sr-catalog makes it.
  RepositoryPtr CloneWithoutCheckout(const std::string& autocrlf = "") {
    EnsureLibgit2();
    git_clone_options options = GIT_CLONE_OPTIONS_INIT;
    options.checkout_opts.checkout_strategy = GIT_CHECKOUT_NONE;
    git_repository* raw = nullptr;
    const int rc = git_clone(&raw, (dir_ + "/src").c_str(), ClonePath().c_str(), &options);
    EXPECT_EQ(rc, 0) << git_error_last()->message;
    RepositoryPtr repo(raw);
    if (!autocrlf.empty()) {
      git_config* config = nullptr;
      EXPECT_EQ(git_repository_config(&config, repo.get()), 0);
      EXPECT_EQ(git_config_set_string(config, "core.autocrlf", autocrlf.c_str()), 0);
      git_config_free(config);
    }
    return repo;
  }
  std::string ClonePath() const { return dir_ + "/clone"; }
};

TEST_F(FreshCheckoutTest, WritesTheTreeWithModesAndLinksAndGitFindsItClean) {
  ASSERT_NO_FATAL_FAILURE(MakeSource(
      "printf 'hello\\n' > a.txt; mkdir -p bin deep/x/y; printf '#!/bin/sh\\necho hi\\n' > bin/run.sh;"
      "chmod +x bin/run.sh; printf 'z' > deep/x/y/z.txt; : > empty.txt; ln -s a.txt link"));
  RepositoryPtr repo = CloneWithoutCheckout();
  ASSERT_NE(repo, nullptr);
  SR_ASSERT_OK(CheckoutFreshClone(repo.get(), 3));

  EXPECT_EQ(ReadFile(ClonePath() + "/a.txt").value_or(""), "hello\n");
  EXPECT_EQ(ReadFile(ClonePath() + "/deep/x/y/z.txt").value_or(""), "z");
  EXPECT_EQ(ReadFile(ClonePath() + "/empty.txt").value_or("missing"), "");
  struct stat st;
  ASSERT_EQ(::stat((ClonePath() + "/bin/run.sh").c_str(), &st), 0);
  EXPECT_NE(st.st_mode & S_IXUSR, 0u);
  ASSERT_EQ(::stat((ClonePath() + "/a.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & S_IXUSR, 0u);
  char target[64] = {};
  ASSERT_GT(::readlink((ClonePath() + "/link").c_str(), target, sizeof target - 1), 0);
  EXPECT_STREQ(target, "a.txt");

  // The index holds each file's stat data: diff-files compares it without reading content (a
  // file whose stat data differs is listed even when its content is the same). First: git
  // status would refresh the index.
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git diff-files --name-only"), "");
  // git itself: nothing modified, nothing untracked, and the index matches HEAD.
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git status --porcelain"), "");
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git diff --cached --stat"), "");
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git ls-files -s bin/run.sh link | cut -c1-6"), "100755\n120000\n");
}

TEST_F(FreshCheckoutTest, ContentGoesThroughTheConfiguredFilters) {
  ASSERT_NO_FATAL_FAILURE(MakeSource("printf 'one\\ntwo\\n' > text.txt"));
  RepositoryPtr repo = CloneWithoutCheckout(/*autocrlf=*/"true");
  ASSERT_NE(repo, nullptr);
  SR_ASSERT_OK(CheckoutFreshClone(repo.get(), 2));
  EXPECT_EQ(ReadFile(ClonePath() + "/text.txt").value_or(""), "one\r\ntwo\r\n");
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git status --porcelain"), "");
}

TEST_F(FreshCheckoutTest, AttributesOutsideTheTreeApply) {
  ASSERT_NO_FATAL_FAILURE(MakeSource("printf 'one\\n' > text.txt; printf 'one\\n' > data.bin"));
  RepositoryPtr repo = CloneWithoutCheckout();
  ASSERT_NE(repo, nullptr);
  SR_ASSERT_OK(WriteFileAtomically(ClonePath() + "/.git/info/attributes", "*.txt text eol=crlf\n", 0644));
  SR_ASSERT_OK(CheckoutFreshClone(repo.get(), 2));
  EXPECT_EQ(ReadFile(ClonePath() + "/text.txt").value_or(""), "one\r\n");
  EXPECT_EQ(ReadFile(ClonePath() + "/data.bin").value_or(""), "one\n");
  EXPECT_EQ(Shell("cd " + ClonePath() + " && git status --porcelain"), "");
}

TEST_F(FreshCheckoutTest, ATreeWithAttributesIsLeftToLibgit2WithNothingWritten) {
  ASSERT_NO_FATAL_FAILURE(MakeSource("mkdir sub; printf '*.txt text eol=crlf\\n' > sub/.gitattributes; "
                                     "printf 'x\\n' > sub/a.txt; printf 'y\\n' > b.txt"));
  RepositoryPtr repo = CloneWithoutCheckout();
  ASSERT_NE(repo, nullptr);
  absl::Status status = CheckoutFreshClone(repo.get(), 2);
  EXPECT_TRUE(absl::IsFailedPrecondition(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("sub/.gitattributes"));
  EXPECT_EQ(Shell("ls -A " + ClonePath()), ".git\n");
}

TEST_F(FreshCheckoutTest, SymlinksWhereTheFilesystemHasNoneAreLeftToLibgit2) {
  ASSERT_NO_FATAL_FAILURE(MakeSource("printf 'a\\n' > a.txt; ln -s a.txt link"));
  RepositoryPtr repo = CloneWithoutCheckout();
  ASSERT_NE(repo, nullptr);
  git_config* config = nullptr;
  ASSERT_EQ(git_repository_config(&config, repo.get()), 0);
  ASSERT_EQ(git_config_set_bool(config, "core.symlinks", 0), 0);
  git_config_free(config);
  absl::Status status = CheckoutFreshClone(repo.get(), 2);
  EXPECT_TRUE(absl::IsFailedPrecondition(status)) << status;
  EXPECT_EQ(Shell("ls -A " + ClonePath()), ".git\n");
}

// sr-catalog's clone: its own checkout where it can, libgit2's where it cannot; git finds
// both clean.
TEST_F(FreshCheckoutTest, CloneChecksOutEitherWay) {
  ASSERT_NO_FATAL_FAILURE(MakeSource("mkdir sub; printf 'x\\n' > sub/a.txt; printf 'y\\n' > b.txt"));
  SR_ASSERT_OK_AND_ASSIGN(CloneResult plain, Clone({.url = dir_ + "/src", .dir = dir_ + "/plain"}));
  EXPECT_FALSE(plain.sha.empty());
  EXPECT_EQ(ReadFile(dir_ + "/plain/sub/a.txt").value_or(""), "x\n");
  EXPECT_EQ(Shell("cd " + dir_ + "/plain && git diff-files --name-only && git status --porcelain"), "");

  ASSERT_EQ(Shell("cd " + dir_ + "/src && printf '*.txt text eol=crlf\\n' > .gitattributes && git add -A && "
                  "git -c user.name=t -c user.email=t@e commit -qm two"),
            "");
  SR_ASSERT_OK_AND_ASSIGN(CloneResult with_attributes, Clone({.url = dir_ + "/src", .dir = dir_ + "/attr"}));
  EXPECT_EQ(ReadFile(dir_ + "/attr/sub/a.txt").value_or(""), "x\r\n");  // libgit2's checkout applied them
  EXPECT_EQ(Shell("cd " + dir_ + "/attr && git status --porcelain"), "");
}

TEST_F(FreshCheckoutTest, AnEmptyRepositoryHasNothingToWrite) {
  ASSERT_EQ(Shell("git init -q -b main " + dir_ + "/src"), "");
  RepositoryPtr repo = CloneWithoutCheckout();
  ASSERT_NE(repo, nullptr);
  SR_EXPECT_OK(CheckoutFreshClone(repo.get(), 2));
  EXPECT_EQ(Shell("ls -A " + ClonePath()), ".git\n");
}

}  // namespace
}  // namespace step_runner::catalog

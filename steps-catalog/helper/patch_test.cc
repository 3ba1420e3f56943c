#include "steps-catalog/helper/patch.h"

#include <git2.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "steps-catalog/helper/git_ops.h"
#include "steps-catalog/helper/temp_dir_test_util.h"

namespace step_runner::catalog {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kPlainDiff[] = R"(--- a/calc.py
+++ b/calc.py
@@ -1,3 +1,4 @@
 def add(a, b):
     return a + b
+# end
 
--- /dev/null
+++ b/new_test.py
@@ -0,0 +1,2 @@
+import calc
+assert calc.add(1, 2) == 3
)";

TEST(ExtractDiffTest, TakesTheFencedDiffAndTheSummary) {
  std::string answer = absl::StrCat("Summary: add a marker.\n\nHere you go:\n```diff\n", kPlainDiff, "```\nDone.\n");
  SR_ASSERT_OK_AND_ASSIGN(std::string diff, ExtractDiff(answer));
  EXPECT_EQ(diff, kPlainDiff);
  EXPECT_EQ(ExtractSummary(answer), "add a marker.");
  EXPECT_EQ(ExtractSummary("I changed calc.py.\n```diff\n...```"), "I changed calc.py.");
}

TEST(ExtractDiffTest, FindsAnUnfencedDiffAndRefusesProse) {
  SR_ASSERT_OK_AND_ASSIGN(std::string diff, ExtractDiff(absl::StrCat("Sure.\n", kPlainDiff)));
  EXPECT_EQ(diff, kPlainDiff);
  EXPECT_TRUE(absl::IsInvalidArgument(ExtractDiff("I am not sure what you mean.").status()));
  // A fenced block of code that is not a diff is not taken for one.
  EXPECT_FALSE(ExtractDiff("```python\nprint(1)\n```\n").ok());
}

TEST(NormalizeDiffTest, AddsGitHeadersModesAndRecountsHunks) {
  // Wrong counts (models miscount), and the blank context line lost its space.
  std::string sloppy = "--- a/calc.py\n+++ b/calc.py\n@@ -1,9 +1,9 @@\n def add(a, b):\n     return a + b\n+# end\n\n";
  SR_ASSERT_OK_AND_ASSIGN(NormalizedDiff n, NormalizeDiff(sloppy));
  EXPECT_EQ(n.text,
            "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,3 @@\n"
            " def add(a, b):\n     return a + b\n+# end\n");
  SR_ASSERT_OK_AND_ASSIGN(NormalizedDiff two, NormalizeDiff(kPlainDiff));
  EXPECT_THAT(two.files, ElementsAre("calc.py", "new_test.py"));
  EXPECT_THAT(two.text, HasSubstr("diff --git a/new_test.py b/new_test.py\nnew file mode 100644\n--- /dev/null\n"
                                  "+++ b/new_test.py\n@@ -0,0 +1,2 @@\n"));
}

TEST(NormalizeDiffTest, ReadsHeaderLookalikesInsideAHunkAsItsBody) {
  // Removing the SQL comment "-- old" and adding "++ new" inside a hunk of 3 lines.
  std::string diff = "--- a/q.sql\n+++ b/q.sql\n@@ -1,2 +1,2 @@\n--- old\n+++ new\n select 1;\n";
  SR_ASSERT_OK_AND_ASSIGN(NormalizedDiff n, NormalizeDiff(diff));
  EXPECT_THAT(n.files, ElementsAre("q.sql"));
  EXPECT_THAT(n.text, HasSubstr("@@ -1,2 +1,2 @@\n--- old\n+++ new\n select 1;\n"));
}

TEST(NormalizeDiffTest, AnOvercountedHunkDoesNotSwallowTheNextFile) {
  std::string diff = "--- a/x.py\n+++ b/x.py\n@@ -1,9 +1,9 @@\n-a\n+b\n--- a/y.py\n+++ b/y.py\n@@ -1 +1 @@\n-c\n+d\n";
  SR_ASSERT_OK_AND_ASSIGN(NormalizedDiff n, NormalizeDiff(diff));
  EXPECT_THAT(n.files, ElementsAre("x.py", "y.py"));
}

TEST(NormalizeDiffTest, RefusesPathsOutsideTheWorkTree) {
  for (const char* path : {"../etc/passwd", "/etc/passwd", ".git/hooks/pre-commit", "a/../../x"}) {
    std::string diff = absl::StrCat("--- /dev/null\n+++ b/", path, "\n@@ -0,0 +1 @@\n+x\n");
    EXPECT_TRUE(absl::IsInvalidArgument(NormalizeDiff(diff).status())) << path;
  }
  EXPECT_TRUE(absl::IsInvalidArgument(NormalizeDiff("--- a/x\n+++ b/x\n").status()));
}

class ApplyDiffTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    git_libgit2_init();
    git_repository* repo = nullptr;
    ASSERT_EQ(git_repository_init(&repo, dir_.c_str(), 0), 0);
    git_repository_free(repo);
    SR_ASSERT_OK(WriteFileAtomically(dir_ + "/calc.py", "def add(a, b):\n    return a + b\n\n", 0644));
    SR_ASSERT_OK(CommitAll(dir_, "seed", "T", "t@example.com").status());
  }
};

TEST_F(ApplyDiffTest, AppliesToTheWorkTreeIncludingNewFiles) {
  SR_ASSERT_OK_AND_ASSIGN(std::vector<std::string> files, ApplyDiff(dir_, kPlainDiff));
  EXPECT_THAT(files, ElementsAre("calc.py", "new_test.py"));
  EXPECT_EQ(ReadFile(dir_ + "/calc.py").value_or(""), "def add(a, b):\n    return a + b\n# end\n\n");
  EXPECT_EQ(ReadFile(dir_ + "/new_test.py").value_or(""), "import calc\nassert calc.add(1, 2) == 3\n");
}

TEST_F(ApplyDiffTest, AStaleDiffChangesNothingAndSaysWhy) {
  std::string stale = "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n-def sub(a, b):\n+def minus(a, b):\n     return a - b\n";
  absl::StatusOr<std::vector<std::string>> applied = ApplyDiff(dir_, absl::StrCat(stale, "--- /dev/null\n+++ b/x.py\n@@ -0,0 +1 @@\n+x\n"));
  ASSERT_TRUE(absl::IsFailedPrecondition(applied.status())) << applied.status();
  EXPECT_THAT(applied.status().message(), HasSubstr("does not apply"));
  EXPECT_THAT(applied.status().message(), HasSubstr("calc.py"));
  // All or nothing: the new file of the same diff was not created.
  EXPECT_FALSE(ReadFile(dir_ + "/x.py").ok());
  EXPECT_EQ(ReadFile(dir_ + "/calc.py").value_or(""), "def add(a, b):\n    return a + b\n\n");
}

}  // namespace
}  // namespace step_runner::catalog

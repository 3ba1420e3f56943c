// Unit tests for the small pieces: the output protocol, secret masking, auth headers, the
// model endpoint URL, and the prompt's repository context.
#include <git2.h>

#include <nlohmann/json.hpp>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "steps-catalog/helper/generate.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/http.h"
#include "steps-catalog/helper/output.h"
#include "steps-catalog/helper/secrets.h"
#include "steps-catalog/helper/temp_dir_test_util.h"

namespace step_runner::catalog {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

using OutputWriterTest = TempDirTest;

TEST_F(OutputWriterTest, AppendsOneJsonObjectPerLine) {
  const std::string path = dir_ + "/output.jsonl";
  SR_ASSERT_OK(WriteFileAtomically(path, "{\"name\":\"earlier\",\"value\":1}\n", 0600));
  SR_ASSERT_OK_AND_ASSIGN(OutputWriter out, OutputWriter::Open(path));
  SR_ASSERT_OK(out.Write("sha", "abc"));
  SR_ASSERT_OK(out.Write("files", nlohmann::json::array({"a.py", "b.py"})));
  SR_ASSERT_OK(out.Write("log", "line1\nline2 \xff"));
  EXPECT_EQ(ReadFile(path).value_or(""),
            "{\"name\":\"earlier\",\"value\":1}\n"
            "{\"name\":\"sha\",\"value\":\"abc\"}\n"
            "{\"name\":\"files\",\"value\":[\"a.py\",\"b.py\"]}\n"
            "{\"name\":\"log\",\"value\":\"line1\\nline2 \xEF\xBF\xBD\"}\n");
}

// A failed fetch's error quoted the server's whole progress output (kilobytes of meters); only
// what says something is kept.
TEST(RemoteMessagesTest, ProgressMetersAreLeftOut) {
  EXPECT_EQ(WhatTheRemoteSaid("Enumerating objects: 19, done.\nCounting objects:   5% (1/19)\rCounting objects:  10% (2/19)\r"
                              "Counting objects: 100% (19/19), done.\nTotal 19 (delta 2), reused 0\n"),
            "");
  EXPECT_EQ(WhatTheRemoteSaid("remote: Compressing objects: 100% (3/3)\r\nremote: GitLab: the branch is protected\n"),
            "remote: GitLab: the branch is protected");
  EXPECT_EQ(WhatTheRemoteSaid("hook says no\nand why\n"), "hook says no\nand why");
}

TEST(SecretMaskerTest, MasksEveryOccurrenceLongestFirst) {
  SecretMasker masker;
  masker.Add("tok");  // too short to mask meaningfully
  masker.Add("secret-token");
  masker.Add("secret-token-long");
  EXPECT_EQ(masker.Mask("a secret-token-long and secret-token, tok"), "a [MASKED] and [MASKED], tok");
}

TEST(AuthHeadersTest, PrivateTokenOrBearerAndNothingWithoutAToken) {
  EXPECT_THAT(AuthHeaders(AuthScheme::kPrivateToken, "t0k3n"), ElementsAre(HttpHeader{"PRIVATE-TOKEN", "t0k3n"}));
  EXPECT_THAT(AuthHeaders(AuthScheme::kBearer, "k3y"), ElementsAre(HttpHeader{"Authorization", "Bearer k3y"}));
  EXPECT_TRUE(AuthHeaders(AuthScheme::kBearer, "").empty());
  EXPECT_EQ(UrlEncode("demo/calc ulator"), "demo%2Fcalc%20ulator");
}

TEST(ChatCompletionsUrlTest, AcceptsTheUsualWaysOfWritingAnEndpoint) {
  EXPECT_EQ(ChatCompletionsUrl("http://h:8000"), "http://h:8000/v1/chat/completions");
  EXPECT_EQ(ChatCompletionsUrl("http://h:8000/v1/"), "http://h:8000/v1/chat/completions");
  EXPECT_EQ(ChatCompletionsUrl("http://h/api/v1/chat/completions"), "http://h/api/v1/chat/completions");
}

using ContextTest = TempDirTest;

TEST_F(ContextTest, NamedFilesFirstWithinTheBudgetIgnoredAndBinaryFilesNever) {
  git_libgit2_init();
  git_repository* repo = nullptr;
  ASSERT_EQ(git_repository_init(&repo, dir_.c_str(), 0), 0);
  git_repository_free(repo);
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/.gitignore", "build/\n", 0644));
  SR_ASSERT_OK(MakeDirs(dir_ + "/build", 0755));
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/build/out.txt", "ignored", 0644));
  SR_ASSERT_OK(MakeDirs(dir_ + "/src", 0755));
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/src/big.py", std::string(900, 'x'), 0644));
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/small.py", "s = 1\n", 0644));
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/logo.png", std::string("\x89PNG\0\0", 6), 0644));
  SR_ASSERT_OK_AND_ASSIGN(RepositoryContext context, CollectContext(dir_, "Fix src/big.py please", 1000));
  EXPECT_THAT(context.files, ElementsAre(".gitignore", "logo.png", "small.py", "src/big.py"));
  std::vector<std::string> included;
  for (const auto& [path, text] : context.contents) included.push_back(path);
  // big.py is named, so it goes first; then the smallest that still fit.
  EXPECT_THAT(included, ElementsAre("src/big.py", "small.py", ".gitignore"));

  GenerateRequest request{.title = "Fix it", .description = "Please.", .feedback = "FAILED test_x"};
  std::string prompt = BuildPrompt(request, context);
  EXPECT_THAT(prompt, HasSubstr("## Task\nFix it\n\nPlease.\n"));
  EXPECT_THAT(prompt, HasSubstr(absl::StrCat(kFeedbackHeading, "\n")));
  EXPECT_THAT(prompt, HasSubstr("FAILED test_x"));
  EXPECT_THAT(prompt, HasSubstr("## File: small.py\n```\ns = 1\n```\n"));
  EXPECT_THAT(prompt, Not(HasSubstr("ignored")));
}

}  // namespace
}  // namespace step_runner::catalog

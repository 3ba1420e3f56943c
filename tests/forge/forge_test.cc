// The local forge on its own: GitLab's shapes and error codes, git over smart HTTP with token
// auth (driven by the real git CLI), the fake model, and state that survives a restart.
#include "tests/forge/forge_fixture.h"
#include "tests/forge/forge_test_base.h"

#include <httplib.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;

struct Raw {
  int status = 0;
  std::string body;
};

Raw RawRequest(const Forge& forge, const std::string& method, const std::string& path,
               const httplib::Headers& headers, const std::string& body = "") {
  httplib::Client client(forge.url());
  client.set_read_timeout(30, 0);
  httplib::Result r = method == "GET" ? client.Get(path.c_str(), headers)
                                      : client.Post(path.c_str(), headers, body, "application/json");
  if (!r) return {-1, httplib::to_string(r.error())};
  return {r->status, r->body};
}

// git with the token sent as GitLab accepts it (Basic, any user name), never in a URL.
std::vector<std::string> Git(const Forge& forge, std::vector<std::string> args) {
  std::vector<std::string> argv = {
      "git", "-c", absl::StrCat("http.extraHeader=Authorization: Basic ", absl::Base64Escape("agent:" + forge.token())),
      "-c", "user.name=Tester", "-c", "user.email=tester@example.com"};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}
const std::vector<std::string> kGitEnv = {"GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", "HOME=/nonexistent"};

using ForgeTest = ForgeTestBase;

TEST_F(ForgeTest, AuthenticatesWithPrivateTokenOrBearerAndRefusesOthers) {
  SR_ASSERT_OK_AND_ASSIGN(json user, forge_->Api("GET", "/api/v4/user"));
  EXPECT_EQ(user["username"], "agent");
  EXPECT_EQ(RawRequest(*forge_, "GET", "/api/v4/user", {{"Authorization", "Bearer " + forge_->token()}}).status, 200);
  Raw none = RawRequest(*forge_, "GET", "/api/v4/user", {});
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(json::parse(none.body)["message"], "401 Unauthorized");
  EXPECT_EQ(RawRequest(*forge_, "GET", "/api/v4/projects/1", {{"PRIVATE-TOKEN", "wrong"}}).status, 401);
}

TEST_F(ForgeTest, ServesProjectsAndIssuesWithGitLabShapesAnd404s) {
  SR_ASSERT_OK_AND_ASSIGN(json by_id, forge_->Api("GET", "/api/v4/projects/1"));
  SR_ASSERT_OK_AND_ASSIGN(json by_path, forge_->Api("GET", "/api/v4/projects/demo%2Fcalculator"));
  EXPECT_EQ(by_id, by_path);
  EXPECT_EQ(by_id["path_with_namespace"], "demo/calculator");
  EXPECT_EQ(by_id["http_url_to_repo"], forge_->clone_url());
  SR_ASSERT_OK_AND_ASSIGN(json issue, forge_->Api("GET", "/api/v4/projects/1/issues/2"));
  EXPECT_EQ(issue["iid"], 2);
  EXPECT_EQ(issue["title"], "Add integer division that rejects zero");
  EXPECT_THAT(issue["web_url"].get<std::string>(), HasSubstr("/demo/calculator/-/issues/2"));

  Raw project = RawRequest(*forge_, "GET", "/api/v4/projects/demo%2Fnope", {{"PRIVATE-TOKEN", forge_->token()}});
  EXPECT_EQ(project.status, 404);
  EXPECT_EQ(json::parse(project.body)["message"], "404 Project Not Found");
  EXPECT_EQ(RawRequest(*forge_, "GET", "/api/v4/projects/1/issues/99", {{"PRIVATE-TOKEN", forge_->token()}}).status, 404);
}

TEST_F(ForgeTest, CloneAndPushOverSmartHttpWithTheToken) {
  const std::string clone = tmp_.path() + "/clone";
  // Without credentials, or with a wrong token: 401, and git says so (no prompt, no hang).
  SR_ASSERT_OK_AND_ASSIGN(CommandResult anonymous,
                          RunCommand({"git", "clone", forge_->clone_url(), clone + "-denied"}, absl::Seconds(60), kGitEnv));
  EXPECT_NE(anonymous.exit_code, 0);
  std::vector<std::string> wrong = {"git", "-c", "http.extraHeader=Authorization: Basic " + absl::Base64Escape("agent:wrong"),
                                    "clone", forge_->clone_url(), clone + "-denied"};
  SR_ASSERT_OK_AND_ASSIGN(CommandResult denied, RunCommand(wrong, absl::Seconds(60), kGitEnv));
  EXPECT_NE(denied.exit_code, 0);
  httplib::Client raw(forge_->url());
  raw.set_read_timeout(30, 0);
  auto refs = raw.Get("/demo/calculator.git/info/refs?service=git-upload-pack",
                      {{"Authorization", "Basic " + absl::Base64Escape("agent:wrong")}});
  ASSERT_TRUE(refs);
  EXPECT_EQ(refs->status, 401);
  EXPECT_EQ(refs->get_header_value("WWW-Authenticate"), "Basic realm=\"GitLab\"");

  SR_ASSERT_OK_AND_ASSIGN(CommandResult cloned,
                          RunCommand(Git(*forge_, {"clone", forge_->clone_url(), clone}), absl::Seconds(60), kGitEnv));
  ASSERT_EQ(cloned.exit_code, 0) << cloned.err;
  // The seed project's test suite really runs and passes.
  SR_ASSERT_OK_AND_ASSIGN(CommandResult tests, RunCommand({"make", "-C", clone, "test"}, absl::Seconds(60)));
  EXPECT_EQ(tests.exit_code, 0) << tests.out << tests.err;
  EXPECT_THAT(ReadFile(clone + "/test-results/junit.xml").value_or(""), HasSubstr("tests=\"2\""));

  SR_ASSERT_OK(WriteFileAtomically(clone + "/NOTES.md", "notes\n", 0644));
  for (auto args : std::vector<std::vector<std::string>>{{"-C", clone, "checkout", "-b", "feature/x"},
                                                         {"-C", clone, "add", "NOTES.md"},
                                                         {"-C", clone, "commit", "-m", "Add notes"}}) {
    SR_ASSERT_OK_AND_ASSIGN(CommandResult r, RunCommand(Git(*forge_, args), absl::Seconds(60), kGitEnv));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  SR_ASSERT_OK_AND_ASSIGN(CommandResult pushed,
                          RunCommand(Git(*forge_, {"-C", clone, "push", "origin", "feature/x"}), absl::Seconds(60), kGitEnv));
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult head, RunCommand({"git", "-C", clone, "rev-parse", "HEAD"}));
  SR_ASSERT_OK_AND_ASSIGN(json branch, forge_->Api("GET", "/api/v4/projects/1/repository/branches/feature%2Fx"));
  EXPECT_EQ(branch["commit"]["id"].get<std::string>() + "\n", head.out);
  EXPECT_EQ(branch["commit"]["title"], "Add notes");

  // main is protected, as on GitLab.
  SR_ASSERT_OK_AND_ASSIGN(CommandResult to_main,
                          RunCommand(Git(*forge_, {"-C", clone, "push", "origin", "feature/x:main"}), absl::Seconds(60), kGitEnv));
  EXPECT_NE(to_main.exit_code, 0);
  EXPECT_THAT(to_main.err, HasSubstr("not allowed to push code to protected branches"));
}

TEST_F(ForgeTest, MergeRequestsAreUniquePerOpenSourceBranchAndShowTheirChanges) {
  const std::string clone = tmp_.path() + "/clone";
  SR_ASSERT_OK_AND_ASSIGN(CommandResult cloned,
                          RunCommand(Git(*forge_, {"clone", forge_->clone_url(), clone}), absl::Seconds(60), kGitEnv));
  ASSERT_EQ(cloned.exit_code, 0) << cloned.err;
  SR_ASSERT_OK(WriteFileAtomically(clone + "/calc.py", "def add(a, b):\n    return a + b\n", 0644));
  for (auto args : std::vector<std::vector<std::string>>{{"-C", clone, "checkout", "-b", "topic"},
                                                         {"-C", clone, "commit", "-am", "Shorter calc"},
                                                         {"-C", clone, "push", "origin", "topic"}}) {
    SR_ASSERT_OK_AND_ASSIGN(CommandResult r, RunCommand(Git(*forge_, args), absl::Seconds(60), kGitEnv));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  json request = {{"source_branch", "topic"}, {"target_branch", "main"}, {"title", "Topic"}, {"description", "d"}};
  SR_ASSERT_OK_AND_ASSIGN(json mr, forge_->Api("POST", "/api/v4/projects/1/merge_requests", request));
  EXPECT_EQ(mr["iid"], 1);
  EXPECT_EQ(mr["source_branch"], "topic");
  Raw again = RawRequest(*forge_, "POST", "/api/v4/projects/1/merge_requests", {{"PRIVATE-TOKEN", forge_->token()}},
                         request.dump());
  EXPECT_EQ(again.status, 409);
  EXPECT_THAT(again.body, HasSubstr("Another open merge request already exists for this source branch: !1"));
  SR_ASSERT_OK_AND_ASSIGN(json open, forge_->Api("GET", "/api/v4/projects/1/merge_requests?source_branch=topic&state=opened"));
  EXPECT_EQ(open.size(), 1u);
  SR_ASSERT_OK_AND_ASSIGN(json changes, forge_->Api("GET", "/api/v4/projects/1/merge_requests/1/changes"));
  ASSERT_EQ(changes["changes"].size(), 1u);
  EXPECT_EQ(changes["changes"][0]["new_path"], "calc.py");
  EXPECT_THAT(changes["changes"][0]["diff"].get<std::string>(), HasSubstr("-def subtract(a, b):"));
}

TEST_F(ForgeTest, KeepsNotesAndMergeRequestsAcrossARestart) {
  SR_ASSERT_OK(forge_->Api("POST", "/api/v4/projects/1/issues/1/notes", {{"body", "hello"}}).status());
  SR_ASSERT_OK(forge_->Stop());
  auto restarted = Forge::Start(tmp_.path() + "/forge");
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  SR_ASSERT_OK_AND_ASSIGN(json notes, (*restarted)->Api("GET", "/api/v4/projects/1/issues/1/notes"));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0]["body"], "hello");
}

TEST_F(ForgeTest, FakeModelAnswersFromFixturesAndFixesOnFeedback) {
  auto chat = [&](const std::string& key, const std::string& prompt) {
    json request = {{"model", "fake"}, {"messages", {{{"role", "user"}, {"content", prompt}}}}};
    return RawRequest(*forge_, "POST", "/v1/chat/completions", {{"Authorization", "Bearer " + key}}, request.dump());
  };
  EXPECT_EQ(chat("wrong", "Add integer division that rejects zero").status, 401);
  Raw first = chat(forge_->model_key(), "Task: Add integer division that rejects zero");
  ASSERT_EQ(first.status, 200) << first.body;
  std::string content = json::parse(first.body)["choices"][0]["message"]["content"];
  EXPECT_THAT(content, HasSubstr("+    return a / b"));
  Raw fix = chat(forge_->model_key(), "Task: Add integer division that rejects zero\nFailing test output:\nFAIL");
  EXPECT_THAT(json::parse(fix.body)["choices"][0]["message"]["content"].get<std::string>(), HasSubstr("+    return a // b"));
  SR_ASSERT_OK(forge_->SetModelMode(2, "junk"));
  Raw junk = chat(forge_->model_key(), "Task: Add integer division that rejects zero");
  EXPECT_THAT(json::parse(junk.body)["choices"][0]["message"]["content"].get<std::string>(), Not(HasSubstr("```diff")));
}

}  // namespace
}  // namespace step_runner::testing

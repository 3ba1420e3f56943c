// The catalog's step files: each one parses and declares its secrets sensitive, the workflow's
// references resolve, and the issue-to-MR workflow runs end to end in the real engine
// (`step-runner exec`) against the local forge, twice, the second run changing nothing.
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/testing.h"
#include "step-runner/engine/engine.h"
#include "step-runner/engine/loader.h"
#include "step-runner/steps/step_file.h"
#include "tests/forge/forge_test_base.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

const std::string kCatalog = SR_SOURCE_DIR "/steps-catalog";
const std::vector<std::string> kSteps = {"git/clone",      "git/branch",      "git/commit",    "git/push",
                                         "gitlab/issue",   "gitlab/open-mr",  "gitlab/comment", "generate",
                                         "test",           "workflows/issue-to-mr"};

TEST(StepFilesTest, EveryStepParsesAndKeepsItsSecretsSensitive) {
  for (const std::string& name : kSteps) {
    const std::string path = absl::StrCat(kCatalog, "/", name, "/step.yml");
    SR_ASSERT_OK_AND_ASSIGN(std::string text, ReadFile(path));
    absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(text, path);
    ASSERT_TRUE(file.ok()) << file.status();
    for (const auto& [input, param] : file->spec.inputs) {
      if (input == "token" || absl::EndsWith(input, "_key")) {
        EXPECT_TRUE(param.sensitive) << name << ": " << input;
      }
    }
  }
}

TEST(StepFilesTest, TheWorkflowsReferencesResolveWithTheirInputs) {
  const std::string path = kCatalog + "/workflows/issue-to-mr/step.yml";
  SR_ASSERT_OK_AND_ASSIGN(std::string text, ReadFile(path));
  SR_ASSERT_OK_AND_ASSIGN(steps::StepFile file, steps::ParseStepFile(text, path));
  engine::StepLoader loader({.catalog_dir = kCatalog});
  std::vector<steps::Violation> problems =
      engine::CheckReferences(file, kCatalog + "/workflows/issue-to-mr", path, loader);
  for (const steps::Violation& v : problems) ADD_FAILURE() << v.field << ": " << v.description;
}

// The result tree's children, whichever JSON field naming the printer used.
const json& Children(const json& node) {
  static const json kNone = json::array();
  if (node.contains("sub_step_results")) return node["sub_step_results"];
  if (node.contains("subStepResults")) return node["subStepResults"];
  return kNone;
}
json Child(const json& node, const std::string& name) {
  for (const json& c : Children(node)) {
    if (c.value("name", "") == name) return c;
  }
  return json();
}

class WorkflowTest : public ForgeTestBase {
 protected:
  // Runs the workflow for `issue` in a fresh work dir; the result tree, or an error.
  absl::StatusOr<CommandResult> Exec(int issue, const std::string& work, json* result) {
    SR_RETURN_IF_ERROR(MakeDirs(work, 0700));
    const std::string result_path = work + ".result.json";
    std::vector<std::string> argv = {StepRunnerBinary(), "exec", kCatalog + "/workflows/issue-to-mr/step.yml",
                                     "--catalog", kCatalog, "--work-dir", work, "--result", result_path,
                                     "--input", "forge_url=" + forge_->url(), "--input", "project=demo/calculator",
                                     "--input", absl::StrCat("issue=", issue), "--input", "token=" + forge_->token()};
    SR_ASSIGN_OR_RETURN(CommandResult run,
                        RunCommand(argv, absl::Seconds(240),
                                   {absl::StrCat("PATH=", CatalogBinaryDir(), ":", std::getenv("PATH"))}));
    *result = json::parse(ReadFile(result_path).value_or("{}"), nullptr, false);
    return run;
  }
};

TEST_F(WorkflowTest, IssueToMergeRequestWithAFixRoundThenARerunChangesNothing) {
  json result;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult run, Exec(2, tmp_.path() + "/work1", &result));
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  const json tree = result.value("result", json::object());

  // The tests ran, failed once, and the fix round made them pass; later rounds were skipped.
  EXPECT_EQ(Child(tree, "test")["outputs"]["failed"], 1);
  EXPECT_EQ(Child(tree, "fix_1")["status"], "success");
  EXPECT_EQ(Child(tree, "test_1")["outputs"]["failed"], 0);
  EXPECT_EQ(Child(tree, "test_1")["outputs"]["passed"], 4);
  EXPECT_EQ(Child(tree, "fix_2")["status"], "skipped");

  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  ASSERT_EQ(mrs.size(), 1u);
  EXPECT_EQ(mrs[0]["source_branch"], "step-runner/issue-2");
  EXPECT_EQ(mrs[0]["target_branch"], "main");
  EXPECT_EQ(mrs[0]["draft"], false);
  EXPECT_EQ(tree["outputs"]["mr_url"], mrs[0]["web_url"]);
  SR_ASSERT_OK_AND_ASSIGN(json branch, forge_->Api("GET", "/api/v4/projects/1/repository/branches/step-runner%2Fissue-2"));
  EXPECT_EQ(branch["commit"]["title"], "Resolve #2: Add integer division that rejects zero");
  EXPECT_EQ(branch["commit"]["id"], mrs[0]["sha"]);
  SR_ASSERT_OK_AND_ASSIGN(json changes, forge_->Api("GET", "/api/v4/projects/1/merge_requests/1/changes"));
  ASSERT_EQ(changes["changes"].size(), 2u);
  EXPECT_THAT(changes["changes"][0]["diff"].get<std::string>(), HasSubstr("+    return a // b"));
  SR_ASSERT_OK_AND_ASSIGN(json notes, forge_->Api("GET", "/api/v4/projects/1/issues/2/notes"));
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_THAT(notes[0]["body"].get<std::string>(), HasSubstr(mrs[0]["web_url"].get<std::string>()));
  EXPECT_THAT(notes[0]["body"].get<std::string>(), HasSubstr("(tests: 4 passed, 0 failed)"));

  // The same workflow again, from scratch: it resumes the branch and the forge stays as it was.
  json again;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult rerun, Exec(2, tmp_.path() + "/work2", &again));
  ASSERT_EQ(rerun.exit_code, 0) << rerun.out << rerun.err;
  const json tree2 = again.value("result", json::object());
  EXPECT_EQ(Child(tree2, "generate")["status"], "skipped");
  EXPECT_EQ(Child(tree2, "commit")["outputs"]["committed"], false);
  EXPECT_EQ(Child(tree2, "open_mr")["outputs"]["created"], false);
  EXPECT_EQ(Child(tree2, "comment")["outputs"]["posted"], false);
  SR_ASSERT_OK_AND_ASSIGN(json mrs2, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  EXPECT_EQ(mrs2.size(), 1u);
  SR_ASSERT_OK_AND_ASSIGN(json branch2, forge_->Api("GET", "/api/v4/projects/1/repository/branches/step-runner%2Fissue-2"));
  EXPECT_EQ(branch2["commit"]["id"], branch["commit"]["id"]);
  SR_ASSERT_OK_AND_ASSIGN(json notes2, forge_->Api("GET", "/api/v4/projects/1/issues/2/notes"));
  EXPECT_EQ(notes2.size(), 1u);

  // The token is nowhere: not in the logs, the result trees, the clones or the artifacts.
  for (const std::string& text : {run.out, run.err, rerun.out, rerun.err, result.dump(), again.dump()}) {
    EXPECT_THAT(text, Not(HasSubstr(forge_->token())));
  }
  SR_ASSERT_OK_AND_ASSIGN(CommandResult grep, RunCommand({"grep", "-rlF", forge_->token(), tmp_.path() + "/work1",
                                                          tmp_.path() + "/work2"}));
  EXPECT_EQ(grep.out, "");
}

// A run whose generate step failed leaves its branch at the base, with nothing on the forge.
// Run again in the same folder, it must generate again: it used to take the branch for
// resumed work, skip generate, and open an empty merge request that the comment called done.
TEST_F(WorkflowTest, ARerunAfterAFailedGenerateGeneratesAgain) {
  SR_ASSERT_OK(forge_->SetModelMode(2, "junk"));
  json failed;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult run, Exec(2, tmp_.path() + "/work", &failed));
  ASSERT_NE(run.exit_code, 0);
  EXPECT_THAT(run.out + run.err, HasSubstr("no usable diff"));
  SR_ASSERT_OK(forge_->SetModelMode(2, "diff"));
  json result;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult rerun, Exec(2, tmp_.path() + "/work", &result));
  ASSERT_EQ(rerun.exit_code, 0) << rerun.out << rerun.err;
  const json tree = result.value("result", json::object());
  EXPECT_EQ(Child(tree, "branch")["outputs"]["resumed"], false);
  EXPECT_EQ(Child(tree, "generate")["status"], "success");
  EXPECT_EQ(Child(tree, "commit")["outputs"]["committed"], true);
  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  ASSERT_EQ(mrs.size(), 1u);
  SR_ASSERT_OK_AND_ASSIGN(json changes, forge_->Api("GET", "/api/v4/projects/1/merge_requests/1/changes"));
  EXPECT_FALSE(changes["changes"].empty());
}

TEST_F(WorkflowTest, AMissingIssueFailsClearlyAndTouchesNothing) {
  json result;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult run, Exec(99, tmp_.path() + "/work", &result));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_THAT(run.out + run.err, HasSubstr("issue #99 not found in project demo/calculator"));
  EXPECT_EQ(Child(result.value("result", json::object()), "issue")["status"], "failure");
  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  EXPECT_THAT(mrs, IsEmpty());
}

// dist://git/clone with a depth, through the step language (the number input reaches
// sr-catalog as --depth N): the clone holds only that many commits.
TEST_F(ForgeTestBase, TheCloneStepCutsTheHistoryAtItsDepth) {
  SR_ASSERT_OK(forge_->Api("POST", "/api/v4/projects", {{"path", "demo/deep"}}).status());
  const std::string source = tmp_.path() + "/deep-source";
  SR_ASSERT_OK(MakeDirs(source, 0700));
  const std::string push_url =
      absl::StrReplaceAll(forge_->url(), {{"http://", absl::StrCat("http://agent:", forge_->token(), "@")}}) + "/demo/deep.git";
  std::vector<std::vector<std::string>> setup = {{"git", "-C", source, "init", "-q", "-b", "main"}};
  for (const char* file : {"a", "b", "c", "d"}) {
    setup.push_back({"sh", "-c", absl::StrCat("echo ", file, " > ", source, "/", file)});
    setup.push_back({"git", "-C", source, "add", "-A"});
    setup.push_back({"git", "-C", source, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", file});
  }
  setup.push_back({"git", "-C", source, "push", "-q", push_url, "main"});
  for (const std::vector<std::string>& command : setup) {
    SR_ASSERT_OK_AND_ASSIGN(CommandResult r, RunCommand(command, absl::Seconds(60)));
    ASSERT_EQ(r.exit_code, 0) << absl::StrJoin(command, " ") << ": " << r.err;
  }
  const std::string work = tmp_.path() + "/deep-work";
  SR_ASSERT_OK(MakeDirs(work, 0700));
  SR_ASSERT_OK_AND_ASSIGN(
      CommandResult run,
      RunCommand({StepRunnerBinary(), "exec", kCatalog + "/git/clone/step.yml", "--catalog", kCatalog, "--work-dir", work,
                  "--input", "url=" + forge_->url() + "/demo/deep.git", "--input", "depth=2", "--input", "token=" + forge_->token()},
                 absl::Seconds(120), {absl::StrCat("PATH=", CatalogBinaryDir(), ":", std::getenv("PATH"))}));
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  EXPECT_THAT(run.out + run.err, HasSubstr("(the last 2 commits)"));
  EXPECT_THAT(run.out + run.err, Not(HasSubstr(forge_->token())));
  SR_ASSERT_OK_AND_ASSIGN(CommandResult count, RunCommand({"git", "-C", work + "/repo", "rev-list", "--count", "HEAD"},
                                                          absl::Seconds(60)));
  EXPECT_EQ(count.out, "2\n") << count.err;
  SR_ASSERT_OK_AND_ASSIGN(CommandResult log, RunCommand({"git", "-C", work + "/repo", "log", "--format=%s"}, absl::Seconds(60)));
  EXPECT_EQ(log.out, "d\nc\n");
}

// Git step references over smart HTTP (libgit2 against the forge's `git http-backend`), by tag
// and by branch; a revision that does not exist is a clear error that names it, and nothing runs.
TEST_F(ForgeTestBase, GitStepReferencesOverHttp) {
  SR_ASSERT_OK(forge_->Api("POST", "/api/v4/projects", {{"path", "demo/steps"}}).status());
  const std::string repo = tmp_.path() + "/steps-repo";
  SR_ASSERT_OK(MakeDirs(repo + "/greet", 0700));
  SR_ASSERT_OK(WriteFileAtomically(repo + "/greet/step.yml",
                                   "spec:\n  inputs:\n    who: {type: string, default: world}\n---\n"
                                   "exec:\n  command: [echo, \"hello ${{ inputs.who }} over http\"]\n",
                                   0600));
  // The forge's git asks for HTTP Basic with the token; the test's URL carries it.
  const std::string url = absl::StrReplaceAll(forge_->url(), {{"http://", absl::StrCat("http://agent:", forge_->token(), "@")}}) +
                          "/demo/steps.git";
  for (const std::vector<std::string>& git :
       {std::vector<std::string>{"git", "-C", repo, "init", "-q", "-b", "main"},
        {"git", "-C", repo, "add", "-A"},
        {"git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "greet"},
        {"git", "-C", repo, "tag", "v1"},
        {"git", "-C", repo, "push", "-q", url, "main", "v1"}}) {
    SR_ASSERT_OK_AND_ASSIGN(CommandResult r, RunCommand(git, absl::Seconds(60)));
    ASSERT_EQ(r.exit_code, 0) << absl::StrJoin(git, " ") << ": " << r.err;
  }
  auto exec = [&](const std::string& name, const std::string& steps) -> absl::StatusOr<CommandResult> {
    const std::string file = tmp_.path() + "/" + name + ".yml";
    SR_RETURN_IF_ERROR(WriteFileAtomically(file, steps, 0600));
    SR_RETURN_IF_ERROR(MakeDirs(tmp_.path() + "/work-" + name, 0700));
    return RunCommand({StepRunnerBinary(), "exec", file, "--work-dir", tmp_.path() + "/work-" + name},
                      absl::Seconds(120));
  };
  SR_ASSERT_OK_AND_ASSIGN(
      CommandResult ok,
      exec("ok", absl::StrCat("spec: {}\n---\nrun:\n"
                              "  - name: by_tag\n    step: {git: {url: \"", url, "\", rev: v1, dir: greet}}\n"
                              "    inputs: {who: tag}\n"
                              "  - name: by_branch\n    step: {git: {url: \"", url, "\", rev: main, dir: greet}}\n")));
  EXPECT_EQ(ok.exit_code, 0) << ok.out << ok.err;
  EXPECT_THAT(ok.out, HasSubstr("hello tag over http\nhello world over http\n"));

  SR_ASSERT_OK_AND_ASSIGN(
      CommandResult missing,
      exec("missing", absl::StrCat("spec: {}\n---\nrun:\n"
                                   "  - name: nope\n    step: {git: {url: \"", url, "\", rev: v9, dir: greet}}\n")));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.out + missing.err, HasSubstr("v9"));
  EXPECT_THAT(missing.out, Not(HasSubstr("hello")));
  // The URL's password (the forge token) is not in the message.
  EXPECT_THAT(missing.out + missing.err, Not(HasSubstr(forge_->token())));
  EXPECT_THAT(missing.out + missing.err, HasSubstr("agent:[MASKED]@"));
}

}  // namespace
}  // namespace step_runner::testing

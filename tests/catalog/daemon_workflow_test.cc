// The issue-to-MR workflow end to end THROUGH THE DAEMON, as a gateway or a quick action would
// run it: a real `step-runner serve` with the catalog, a step file that calls
// dist://workflows/issue-to-mr, the forge token as a masked job variable, the client library for
// Run, FollowLogs, FollowSteps and Status, and the local forge (tests/forge) as GitLab and model.
//
// Issue #2's model fixture breaks a test with its first diff and fixes it when shown the failing
// log, so one run exercises the fix round. Each test runs twice: without the sandbox, and under
// bubblewrap with the network allowed to the forge's host:port only (skipped only where bwrap
// cannot work on this host, as tests/sandbox does).
#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/testing.h"
#include "step-runner/client/client.h"
#include "tests/forge/forge_test_base.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsSupersetOf;
using ::testing::Not;
using json = nlohmann::json;

const std::string kCatalog = SR_SOURCE_DIR "/steps-catalog";
constexpr int kIssue = 2;  // its first diff breaks a test; the fix round repairs it
constexpr char kBranch[] = "step-runner/issue-2";
constexpr char kTokenVariable[] = "FORGE_TOKEN";

// What a caller sends: the workflow from the catalog, its token from a masked job variable (so
// the daemon masks it from the first byte, like a CI/CD variable), the rest as job inputs.
constexpr char kStepFile[] = R"(spec:
  inputs:
    forge_url: {type: string}
    project: {type: string}
    issue: {type: number}
---
run:
  - name: issue_to_mr
    step: dist://workflows/issue-to-mr
    inputs:
      forge_url: "${{ inputs.forge_url }}"
      project: "${{ inputs.project }}"
      issue: "${{ inputs.issue }}"
      token: "${{ vars.FORGE_TOKEN }}"
)";

json ToJson(const google::protobuf::Message& message) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;  // the names of step-results.json
  (void)google::protobuf::util::MessageToJsonString(message, &text, options);
  return json::parse(text, nullptr, false);
}

json Child(const json& node, const std::string& name) {
  if (node.contains("sub_step_results")) {
    for (const json& c : node["sub_step_results"]) {
      if (c.value("name", "") == name) return c;
    }
  }
  return json();
}

// The workflow's own steps (clone, generate, test, fix_1, ...) under the caller's one step.
json WorkflowSteps(const json& root) { return Child(root, "issue_to_mr"); }

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

struct DaemonSetup {
  std::string name;
  bool sandboxed;
};
void PrintTo(const DaemonSetup& setup, std::ostream* os) { *os << setup.name; }

class DaemonWorkflowTest : public ForgeTestBase, public ::testing::WithParamInterface<DaemonSetup> {
 protected:
  void SetUp() override {
    ForgeTestBase::SetUp();
    if (HasFatalFailure()) return;
    // Steps get the daemon's PATH; the catalog's steps exec sr-catalog from it.
    const char* path = std::getenv("PATH");
    ::setenv("PATH", absl::StrCat(CatalogBinaryDir(), ":", path ? path : "/usr/bin:/bin").c_str(), 1);
    std::vector<std::string> flags = {"--catalog", kCatalog};
    if (GetParam().sandboxed) {
      // The forge's host:port and nothing else (the model is the forge too).
      const std::string host_port = forge_->url().substr(forge_->url().find("://") + 3);
      flags.insert(flags.end(), {"--sandbox=bwrap", "--network=allow", "--allow-host", host_port});
    }
    daemon_dir_ = tmp_.path() + "/daemon";
    ASSERT_TRUE(MakeDirs(daemon_dir_, 0700).ok());
    auto daemon = Daemon::Start(daemon_dir_, flags);
    if (!daemon.ok() && GetParam().sandboxed) {
      // Only an honest refusal (bwrap cannot make namespaces here) may skip: it names the fix.
      ASSERT_THAT(std::string(daemon.status().message()), HasSubstr("--sandbox=none")) << daemon.status();
      GTEST_SKIP() << daemon.status().message();
    }
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
  }

  proto::RunRequest WorkflowRequest(const std::string& id, const std::string& work_dir) const {
    proto::RunRequest request;
    request.set_id(id);
    request.set_steps(kStepFile);
    request.set_work_dir(work_dir);
    (*request.mutable_inputs())["forge_url"].set_string_value(forge_->url());
    (*request.mutable_inputs())["project"].set_string_value(Forge::kProject);
    (*request.mutable_inputs())["issue"].set_number_value(kIssue);
    proto::Variable* token = request.mutable_job()->add_variables();
    token->set_key(kTokenVariable);
    token->set_value(forge_->token());
    token->set_masked(true);
    // Bounds every wait below: the job ends (timeout) even if a step hangs.
    request.mutable_timeout()->set_seconds(300);
    return request;
  }

  struct Outcome {
    proto::Status status;
    std::string log;
    std::vector<proto::FollowStepsResponse> events;
  };
  // Starts the job, then follows its log and (from another connection, at the same time) its
  // step events until it has finished.
  Outcome RunWorkflow(const std::string& id, const std::string& work_dir) {
    Outcome out;
    absl::Status started = client_->Run(WorkflowRequest(id, work_dir));
    EXPECT_TRUE(started.ok()) << started;
    if (!started.ok()) return out;
    absl::Status events_status;
    std::thread events([&] {
      client::Client events_client(daemon_->ClientOptions());
      events_status = events_client.FollowSteps(
          id, 0, [&](const proto::FollowStepsResponse& e) { out.events.push_back(e); });
    });
    absl::StatusOr<proto::Status> final_status =
        client_->Follow(id, 0, [&](const proto::FollowLogsResponse& chunk) { out.log += chunk.data(); });
    events.join();
    EXPECT_TRUE(events_status.ok()) << events_status;
    EXPECT_TRUE(final_status.ok()) << final_status.status();
    if (final_status.ok()) out.status = *final_status;
    // Status (not the stream's last message) is what a gateway polls: it carries the tree too.
    absl::StatusOr<proto::Status> polled = client_->GetStatus(id);
    EXPECT_TRUE(polled.ok()) << polled.status();
    if (polled.ok()) out.status = *polled;
    return out;
  }

  std::string JobsDir() const { return daemon_->state_dir() + "/jobs"; }

  std::string daemon_dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
};

// "STARTED name" / "FINISHED name" for each step event, by the step's path from the job's root.
std::set<std::string> StepEvents(const std::vector<proto::FollowStepsResponse>& events) {
  std::set<std::string> seen;
  for (const proto::FollowStepsResponse& e : events) {
    if (e.kind() == proto::FollowStepsResponse::STEP_STARTED) seen.insert("STARTED " + e.step_path());
    if (e.kind() == proto::FollowStepsResponse::STEP_FINISHED) seen.insert("FINISHED " + e.step_path());
  }
  return seen;
}

TEST_P(DaemonWorkflowTest, IssueToMergeRequestWithAFixRoundThenARerunChangesNothing) {
  const std::string work1 = tmp_.path() + "/work1";
  Outcome first = RunWorkflow("issue-2-first", work1);
  ASSERT_EQ(first.status.status(), proto::StepResult::success)
      << first.status.message() << "\n" << first.log << "\n" << daemon_->stderr_output();

  // The result tree from Status: the tests ran, failed once, and the fix round made them pass.
  const json tree = WorkflowSteps(ToJson(first.status.result()));
  ASSERT_FALSE(tree.is_null()) << ToJson(first.status.result()).dump(2);
  EXPECT_EQ(Child(tree, "test")["outputs"]["failed"], 1);
  EXPECT_EQ(Child(tree, "fix_1")["status"], "success");
  EXPECT_EQ(Child(tree, "test_1")["outputs"]["failed"], 0);
  EXPECT_EQ(Child(tree, "test_1")["outputs"]["passed"], 4);
  EXPECT_EQ(Child(tree, "fix_2")["status"], "skipped");

  // The same tree on disk, in the job's folder, for whoever reviews the work later (written
  // right after the job's end goes out).
  const std::vector<std::string> job_dirs = ListDir(JobsDir());
  ASSERT_EQ(job_dirs.size(), 1u);
  const std::string results_path = JobsDir() + "/" + job_dirs[0] + "/step-results.json";
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (::access(results_path.c_str(), F_OK) != 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  SR_ASSERT_OK_AND_ASSIGN(std::string results_text, ReadFile(results_path));
  const json on_disk = WorkflowSteps(json::parse(results_text, nullptr, false));
  EXPECT_EQ(Child(on_disk, "test")["outputs"]["failed"], 1);
  EXPECT_EQ(Child(on_disk, "fix_1")["status"], "success");
  EXPECT_EQ(Child(on_disk, "test_1")["outputs"]["failed"], 0);

  // The job's log, as FollowLogs streamed it, tells the same story.
  EXPECT_THAT(first.log, HasSubstr("test: exit 2, 3 passed, 1 failed"));
  EXPECT_THAT(first.log, HasSubstr("test: exit 0, 4 passed, 0 failed"));
  EXPECT_THAT(first.log, HasSubstr("comment: posted on #2"));

  // The step events streamed while it ran, the fix round among them.
  EXPECT_THAT(StepEvents(first.events),
              IsSupersetOf({"STARTED issue_to_mr/clone", "FINISHED issue_to_mr/clone",
                            "STARTED issue_to_mr/generate", "FINISHED issue_to_mr/generate",
                            "STARTED issue_to_mr/test", "FINISHED issue_to_mr/test",
                            "STARTED issue_to_mr/fix_1", "FINISHED issue_to_mr/fix_1",
                            "STARTED issue_to_mr/test_1", "FINISHED issue_to_mr/test_1"}));
  ASSERT_FALSE(first.events.empty());
  EXPECT_EQ(first.events.back().kind(), proto::FollowStepsResponse::JOB_FINISHED);

  // Exactly one MR, from the issue's branch into main, with the generated commit on the branch.
  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  ASSERT_EQ(mrs.size(), 1u) << mrs.dump(2);
  EXPECT_EQ(mrs[0]["source_branch"], kBranch);
  EXPECT_EQ(mrs[0]["target_branch"], "main");
  EXPECT_EQ(mrs[0]["draft"], false);
  EXPECT_EQ(tree["outputs"]["mr_url"], mrs[0]["web_url"]);
  SR_ASSERT_OK_AND_ASSIGN(json branch,
                          forge_->Api("GET", "/api/v4/projects/1/repository/branches/step-runner%2Fissue-2"));
  EXPECT_EQ(branch["commit"]["title"], "Resolve #2: Add integer division that rejects zero");
  EXPECT_EQ(branch["commit"]["id"], mrs[0]["sha"]);
  EXPECT_EQ(tree["outputs"]["sha"], branch["commit"]["id"]);
  SR_ASSERT_OK_AND_ASSIGN(json changes, forge_->Api("GET", "/api/v4/projects/1/merge_requests/1/changes"));
  ASSERT_FALSE(changes["changes"].empty());
  EXPECT_THAT(changes["changes"][0]["diff"].get<std::string>(), HasSubstr("+    return a // b"));

  // The issue has the comment with the MR's link.
  SR_ASSERT_OK_AND_ASSIGN(json notes, forge_->Api("GET", "/api/v4/projects/1/issues/2/notes"));
  ASSERT_EQ(notes.size(), 1u) << notes.dump(2);
  EXPECT_THAT(notes[0]["body"].get<std::string>(), HasSubstr(mrs[0]["web_url"].get<std::string>()));
  EXPECT_THAT(notes[0]["body"].get<std::string>(), HasSubstr("(tests: 4 passed, 0 failed)"));

  // The same workflow again as a new job (a retried quick action): it resumes the branch and the
  // forge stays as it was.
  const std::string work2 = tmp_.path() + "/work2";
  Outcome second = RunWorkflow("issue-2-again", work2);
  ASSERT_EQ(second.status.status(), proto::StepResult::success) << second.status.message() << "\n" << second.log;
  const json tree2 = WorkflowSteps(ToJson(second.status.result()));
  EXPECT_EQ(Child(tree2, "generate")["status"], "skipped");
  EXPECT_EQ(Child(tree2, "commit")["outputs"]["committed"], false);
  EXPECT_EQ(Child(tree2, "open_mr")["outputs"]["created"], false);
  EXPECT_EQ(Child(tree2, "comment")["outputs"]["posted"], false);
  SR_ASSERT_OK_AND_ASSIGN(json mrs2, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  EXPECT_EQ(mrs2.size(), 1u);
  SR_ASSERT_OK_AND_ASSIGN(json branch2,
                          forge_->Api("GET", "/api/v4/projects/1/repository/branches/step-runner%2Fissue-2"));
  EXPECT_EQ(branch2["commit"]["id"], branch["commit"]["id"]);
  SR_ASSERT_OK_AND_ASSIGN(json notes2, forge_->Api("GET", "/api/v4/projects/1/issues/2/notes"));
  EXPECT_EQ(notes2.size(), 1u);

  // The token is nowhere: not in either job's log, result tree or step events, not in anything
  // under the daemon's state dir (records, logs, events, artifacts), the work dirs, or what the
  // daemon printed. The grep is the whole check, so first make sure it can find the token.
  const std::string& token = forge_->token();
  ASSERT_FALSE(token.empty());
  for (const Outcome* run : {&first, &second}) {
    EXPECT_THAT(run->log, Not(HasSubstr(token)));
    EXPECT_THAT(run->status.DebugString(), Not(HasSubstr(token)));
    for (const proto::FollowStepsResponse& e : run->events) EXPECT_THAT(e.DebugString(), Not(HasSubstr(token)));
  }
  EXPECT_THAT(daemon_->stderr_output(), Not(HasSubstr(token)));
  SR_ASSERT_OK(MakeDirs(tmp_.path() + "/canary", 0700));
  SR_ASSERT_OK(WriteFileAtomically(tmp_.path() + "/canary/token.txt", token, 0600));
  SR_ASSERT_OK_AND_ASSIGN(CommandResult grep, RunCommand({"grep", "-rlF", "--", token, daemon_->state_dir(), work1,
                                                          work2, tmp_.path() + "/canary"}));
  EXPECT_EQ(grep.out, tmp_.path() + "/canary/token.txt\n") << "the token was found in these files";
}

TEST_P(DaemonWorkflowTest, AMissingIssueFailsTheJobClearlyAndTouchesNothing) {
  proto::RunRequest request = WorkflowRequest("issue-99", tmp_.path() + "/work");
  (*request.mutable_inputs())["issue"].set_number_value(99);
  SR_ASSERT_OK(client_->Run(request));
  std::string log;
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, client_->Follow("issue-99", 0, [&](const proto::FollowLogsResponse& c) {
    log += c.data();
  }));
  EXPECT_EQ(status.status(), proto::StepResult::failure);
  EXPECT_EQ(status.error().kind(), proto::StatusError::failed);
  EXPECT_THAT(log + status.message(), HasSubstr("issue #99 not found in project demo/calculator"));
  EXPECT_EQ(Child(WorkflowSteps(ToJson(status.result())), "issue")["status"], "failure");
  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=all"));
  EXPECT_TRUE(mrs.empty());
}

INSTANTIATE_TEST_SUITE_P(Daemon, DaemonWorkflowTest,
                         ::testing::Values(DaemonSetup{"Unsandboxed", false}, DaemonSetup{"Sandboxed", true}),
                         [](const ::testing::TestParamInfo<DaemonSetup>& info) { return info.param.name; });

}  // namespace
}  // namespace step_runner::testing

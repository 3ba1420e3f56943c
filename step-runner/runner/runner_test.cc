#include "step-runner/runner/runner.h"

#include <signal.h>
#include <stdlib.h>
#include <dirent.h>
#include <sys/stat.h>

#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/testing.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::runner {
namespace {

using ::testing::HasSubstr;

class RunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    internal::SetMinLogSeverity(internal::Severity::kWarning);
    char tmpl[] = "/tmp/sr_runner_test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    StartRunner();
  }
  void TearDown() override {
    runner_.reset();
    SR_EXPECT_OK(RemoveTree(dir_));
  }
  void StartRunner() {
    RunnerOptions options{.state_dir = dir_ + "/state",
                          .base_env = {"PATH=/usr/bin:/bin"},
                          .drain_timeout = absl::Milliseconds(300),
                          .secrets_root = dir_ + "/secrets"};
    auto runner = Runner::Create(options);
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = *std::move(runner);
  }

  proto::RunRequest Request(const std::string& id, const std::string& definition) {
    proto::RunRequest request;
    request.set_id(id);
    request.set_steps("{}\n---\n" + definition);
    return request;
  }

  // Waits (with a deadline) until the job has ended and returns its status.
  proto::Status WaitFinished(const std::string& id, absl::Duration deadline = absl::Seconds(20)) {
    absl::Time until = absl::Now() + deadline;
    while (absl::Now() < until) {
      auto status = runner_->GetStatus(id);
      if (status.ok() && (*status)[0].status() != proto::StepResult::running) return (*status)[0];
      absl::SleepFor(absl::Milliseconds(5));
    }
    ADD_FAILURE() << "job " << id << " did not finish within " << deadline;
    return {};
  }

  std::string LogOf(const std::string& id) {
    auto job = runner_->GetJob(id);
    EXPECT_TRUE(job.ok());
    std::shared_ptr<logs::JobLog> log = (*job)->log();
    auto fd = log->OpenReader();
    std::string all;
    logs::JobLog::Chunk chunk;
    while (true) {
      auto n = log->Read(fd->get(), static_cast<int64_t>(all.size()), 1 << 20, &chunk);
      if (!n.ok() || *n == 0) break;
      all += chunk.data;
    }
    return all;
  }

  std::string dir_;
  std::unique_ptr<Runner> runner_;
};

TEST_F(RunnerTest, ExecSuccessAndOutput) {
  SR_ASSERT_OK(runner_->Run(Request("a", "exec:\n  command: [echo, hello]\n")));
  proto::Status status = WaitFinished("a");
  EXPECT_EQ(status.status(), proto::StepResult::success);
  EXPECT_EQ(status.exit_code(), 0);
  EXPECT_FALSE(status.has_error());
  EXPECT_EQ(LogOf("a"), "hello\n");
  EXPECT_EQ(status.log_size(), 6);
}

TEST_F(RunnerTest, RunSequenceStopsAtFirstFailure) {
  SR_ASSERT_OK(runner_->Run(Request("seq", R"(run:
  - name: one
    script: echo one
  - name: two
    script: "false; echo not reached"
  - name: three
    script: echo three
)")));
  proto::Status status = WaitFinished("seq");
  EXPECT_EQ(status.status(), proto::StepResult::failure);
  EXPECT_EQ(status.error().kind(), proto::StatusError::failed);
  EXPECT_THAT(status.message(), HasSubstr("step \"two\" exited with code 1"));
  EXPECT_EQ(LogOf("seq"), "one\n");
  ASSERT_EQ(status.result().sub_step_results_size(), 2);
  EXPECT_EQ(status.result().sub_step_results(1).exec_result().exit_code(), 1);
}

TEST_F(RunnerTest, PipefailInScripts) {
  SR_ASSERT_OK(runner_->Run(Request("p", "run:\n  - name: s\n    script: \"false | true\"\n")));
  EXPECT_EQ(WaitFinished("p").status(), proto::StepResult::failure);
}

TEST_F(RunnerTest, EnvLayersAndWorkDir) {
  proto::RunRequest request = Request("env", R"y(run:
  - name: show
    script: echo "$A $B $C $D $(pwd)"
    env: {D: from_step}
env: {C: from_definition}
)y");
  (*request.mutable_env())["A"] = "from_request";
  (*request.mutable_env())["C"] = "overridden";
  auto* var = request.mutable_job()->add_variables();
  var->set_key("B");
  var->set_value("from_variable");
  request.set_work_dir(dir_ + "/wd");
  SR_ASSERT_OK(runner_->Run(request));
  EXPECT_EQ(WaitFinished("env").status(), proto::StepResult::success);
  EXPECT_EQ(LogOf("env"), "from_request from_variable from_definition from_step " + dir_ + "/wd\n");
}

TEST_F(RunnerTest, FileVariableIsAnOwnerOnlyFileRemovedAfterTheJob) {
  proto::RunRequest request = Request("file", R"y(run:
  - name: show
    script: stat -c '%a' "$CONFIG"; cat "$CONFIG"; echo "$CONFIG" > path.txt
)y");
  request.set_work_dir(dir_ + "/wd");
  auto* var = request.mutable_job()->add_variables();
  var->set_key("CONFIG");
  var->set_value("contents");
  var->set_file(true);
  SR_ASSERT_OK(runner_->Run(request));
  EXPECT_EQ(WaitFinished("file").status(), proto::StepResult::success);
  EXPECT_EQ(LogOf("file"), "600\ncontents");
  SR_ASSERT_OK_AND_ASSIGN(std::string path, ReadFile(dir_ + "/wd/path.txt"));
  path.pop_back();
  struct stat st;
  EXPECT_NE(::stat(path.c_str(), &st), 0) << path << " should be gone";
}

TEST_F(RunnerTest, MaskedVariableNeverInLogOrStatus) {
  proto::RunRequest request = Request("mask", R"y(run:
  - name: leak
    script: |
      printf 'token=%s\n' "$TOKEN"
      printf '%s' "$TOKEN" | head -c 5; printf '%s\n' "$(printf '%s' "$TOKEN" | tail -c +6)"
      echo "$TOKEN" >&2
      exit 3
)y");
  auto* var = request.mutable_job()->add_variables();
  var->set_key("TOKEN");
  var->set_value("glpat-SuperSecret123");
  var->set_masked(true);
  SR_ASSERT_OK(runner_->Run(request));
  proto::Status status = WaitFinished("mask");
  std::string log = LogOf("mask");
  EXPECT_EQ(log.find("SuperSecret"), std::string::npos) << log;
  EXPECT_EQ(log, "token=[MASKED]\n[MASKED]\n[MASKED]\n");
  EXPECT_EQ(status.DebugString().find("SuperSecret"), std::string::npos);
}

TEST_F(RunnerTest, IdempotentRun) {
  proto::RunRequest request = Request("idem", "run:\n  - name: s\n    script: echo once >> " + dir_ + "/count\n");
  SR_ASSERT_OK(runner_->Run(request));
  SR_ASSERT_OK(runner_->Run(request));
  WaitFinished("idem");
  SR_ASSERT_OK(runner_->Run(request));  // also after it finished
  absl::SleepFor(absl::Milliseconds(200));
  SR_ASSERT_OK_AND_ASSIGN(std::string count, ReadFile(dir_ + "/count"));
  EXPECT_EQ(count, "once\n");
  proto::RunRequest other = Request("idem", "exec: {command: [true]}\n");
  absl::Status s = runner_->Run(other);
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
}

TEST_F(RunnerTest, InvalidRequestsStartNothing) {
  EXPECT_TRUE(absl::IsInvalidArgument(runner_->Run(Request("", "exec: {command: [true]}\n"))));
  absl::Status s = runner_->Run(Request("bad", "exec: {command: [true], shell: yes}\n"));
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(std::string(s.message()), HasSubstr("steps:3:"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("unknown key \"shell\""));
  EXPECT_TRUE(absl::IsNotFound(runner_->GetStatus("bad").status()));
  proto::RunRequest relative = Request("rel", "exec: {command: [true]}\n");
  relative.set_work_dir("relative/dir");
  EXPECT_TRUE(absl::IsInvalidArgument(runner_->Run(relative)));
  SR_ASSERT_OK_AND_ASSIGN(auto all, runner_->GetStatus(""));
  EXPECT_TRUE(all.empty());
}

TEST_F(RunnerTest, CommandNotFoundFailsWithMessageInLog) {
  SR_ASSERT_OK(runner_->Run(Request("nf", "exec: {command: [no-such-binary-sr]}\n")));
  proto::Status status = WaitFinished("nf");
  EXPECT_EQ(status.status(), proto::StepResult::failure);
  EXPECT_EQ(status.exit_code(), 127);
  EXPECT_THAT(LogOf("nf"), HasSubstr("no-such-binary-sr"));
}

TEST_F(RunnerTest, SignalDeathIs128PlusN) {
  SR_ASSERT_OK(runner_->Run(Request("sig", "exec: {command: [sh, -c, 'kill -TERM $$']}\n")));
  proto::Status status = WaitFinished("sig");
  EXPECT_EQ(status.exit_code(), 128 + SIGTERM);
  EXPECT_THAT(status.message(), HasSubstr("killed by signal 15"));
}

TEST_F(RunnerTest, CancelIsGracefulThenForced) {
  proto::RunRequest graceful = Request("g", "exec: {command: [sh, -c, 'trap \"echo bye; exit 0\" TERM; echo ready; while :; do sleep 0.05; done']}\n");
  SR_ASSERT_OK(runner_->Run(graceful));
  proto::RunRequest stubborn = Request("s", "exec: {command: [sh, -c, 'trap \"\" TERM; echo ready; while :; do sleep 0.05; done']}\n");
  stubborn.mutable_graceful_exit_timeout()->set_nanos(300000000);
  SR_ASSERT_OK(runner_->Run(stubborn));
  absl::Time until = absl::Now() + absl::Seconds(10);
  while ((LogOf("g").empty() || LogOf("s").empty()) && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  SR_ASSERT_OK(runner_->Cancel("g"));
  SR_ASSERT_OK(runner_->Cancel("s"));
  proto::Status g = WaitFinished("g");
  EXPECT_EQ(g.status(), proto::StepResult::cancelled);
  EXPECT_EQ(g.error().kind(), proto::StatusError::cancelled);
  // The trap ran (sh may also report its SIGTERM'd sleep as "Terminated").
  EXPECT_THAT(LogOf("g"), ::testing::StartsWith("ready\n"));
  EXPECT_THAT(LogOf("g"), ::testing::EndsWith("bye\n"));
  proto::Status s = WaitFinished("s");
  EXPECT_EQ(s.status(), proto::StepResult::cancelled);
  EXPECT_EQ(s.exit_code(), 128 + SIGKILL);
  EXPECT_TRUE(absl::IsNotFound(runner_->Cancel("nope")));
}

TEST_F(RunnerTest, JobTimeout) {
  proto::RunRequest request = Request("t", "exec: {command: [sleep, '30']}\n");
  request.mutable_timeout()->set_nanos(200000000);
  SR_ASSERT_OK(runner_->Run(request));
  proto::Status status = WaitFinished("t");
  EXPECT_EQ(status.status(), proto::StepResult::cancelled);
  EXPECT_EQ(status.error().kind(), proto::StatusError::timeout);
  EXPECT_THAT(status.message(), HasSubstr("timeout"));
}

TEST_F(RunnerTest, CloseDeletesStateAndIsIdempotent) {
  SR_ASSERT_OK(runner_->Run(Request("c", "exec: {command: [sleep, '30']}\n")));
  SR_ASSERT_OK(runner_->Close("c"));
  EXPECT_TRUE(absl::IsNotFound(runner_->GetStatus("c").status()));
  SR_ASSERT_OK(runner_->Close("c"));
  // The id is reusable right away, with another request.
  SR_ASSERT_OK(runner_->Run(Request("c", "exec: {command: [echo, again]}\n")));
  EXPECT_EQ(WaitFinished("c").status(), proto::StepResult::success);
}

// A gateway closes a job the moment it sees the final status. Whatever the job still wrote
// then must not race the removal: a closed job must not come back after a restart.
TEST_F(RunnerTest, CloseRightAfterTheEndLeavesNothingBehind) {
  for (int i = 0; i < 40; ++i) {
    const std::string id = absl::StrCat("quick-", i);
    SR_ASSERT_OK(runner_->Run(Request(id, "exec: {command: [echo, done]}\n")));
    for (;;) {
      auto status = runner_->GetStatus(id);
      ASSERT_TRUE(status.ok()) << status.status();
      if ((*status)[0].status() != proto::StepResult::running) break;
    }
    SR_ASSERT_OK(runner_->Close(id));
  }
  const absl::Time until = absl::Now() + absl::Seconds(10);
  std::vector<std::string> left;
  do {
    absl::SleepFor(absl::Milliseconds(20));
    left.clear();
    if (DIR* d = ::opendir((dir_ + "/state/jobs").c_str())) {
      while (dirent* e = ::readdir(d)) {
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") left.push_back(e->d_name);
      }
      ::closedir(d);
    }
  } while (!left.empty() && absl::Now() < until);
  EXPECT_THAT(left, ::testing::IsEmpty());
  runner_.reset();
  StartRunner();
  auto all = runner_->GetStatus("");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(*all, ::testing::IsEmpty());
}

TEST_F(RunnerTest, RestartKeepsFinishedJobsAndInterruptsRunningOnes) {
  SR_ASSERT_OK(runner_->Run(Request("done", "exec: {command: [echo, kept]}\n")));
  WaitFinished("done");
  SR_ASSERT_OK(runner_->Run(Request("live", "exec: {command: [sh, -c, 'echo started; sleep 30']}\n")));
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (LogOf("live").empty() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  // Simulate a daemon that died without cleaning up: copy the state away before the runner's
  // destructor (which kills and records) runs, and restore it.
  SR_ASSERT_OK_AND_ASSIGN(auto before, runner_->GetStatus("live"));
  std::string copy = "cp -a " + dir_ + "/state " + dir_ + "/state.crash";
  ASSERT_EQ(::system(copy.c_str()), 0);
  runner_.reset();
  ASSERT_EQ(::system(("rm -rf " + dir_ + "/state && mv " + dir_ + "/state.crash " + dir_ + "/state").c_str()), 0);
  // step-results.json is written just after a job's end: a daemon may die before it is.
  ASSERT_EQ(::system(("rm -f " + dir_ + "/state/jobs/*/step-results.json").c_str()), 0);
  StartRunner();
  // Both jobs' result trees are back on disk, written from their records.
  std::vector<std::string> results;
  if (DIR* d = ::opendir((dir_ + "/state/jobs").c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      auto text = ReadFile(dir_ + "/state/jobs/" + e->d_name + "/step-results.json");
      results.push_back(text.ok() ? *text : text.status().ToString());
    }
    ::closedir(d);
  }
  EXPECT_THAT(results, ::testing::UnorderedElementsAre(::testing::HasSubstr("\"status\": \"success\""),
                                                       ::testing::HasSubstr("\"status\": \"failure\"")));
  SR_ASSERT_OK_AND_ASSIGN(auto done, runner_->GetStatus("done"));
  EXPECT_EQ(done[0].status(), proto::StepResult::success);
  EXPECT_EQ(LogOf("done"), "kept\n");
  SR_ASSERT_OK_AND_ASSIGN(auto live, runner_->GetStatus("live"));
  EXPECT_EQ(live[0].status(), proto::StepResult::failure);
  EXPECT_EQ(live[0].error().kind(), proto::StatusError::interrupted);
  EXPECT_EQ(LogOf("live"), "started\n");
}

TEST_F(RunnerTest, RetentionByCount) {
  runner_.reset();
  RunnerOptions options{.state_dir = dir_ + "/state", .base_env = {"PATH=/usr/bin:/bin"},
                        .max_retained_jobs = 3, .secrets_root = dir_ + "/secrets"};
  SR_ASSERT_OK_AND_ASSIGN(runner_, Runner::Create(options));
  for (int i = 0; i < 6; ++i) {
    std::string id = "r" + std::to_string(i);
    SR_ASSERT_OK(runner_->Run(Request(id, "exec: {command: [true]}\n")));
    WaitFinished(id);
  }
  // The prune runs right after the last job's status turned final; wait for it.
  std::vector<proto::Status> all;
  absl::Time until = absl::Now() + absl::Seconds(10);
  do {
    SR_ASSERT_OK_AND_ASSIGN(all, runner_->GetStatus(""));
  } while (all.size() != 3 && absl::Now() < until && (absl::SleepFor(absl::Milliseconds(5)), true));
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].id(), "r3");
  EXPECT_EQ(all[2].id(), "r5");
}

TEST_F(RunnerTest, RetentionByAge) {
  runner_.reset();
  RunnerOptions options{.state_dir = dir_ + "/state", .base_env = {"PATH=/usr/bin:/bin"},
                        .max_job_age = absl::Milliseconds(300), .secrets_root = dir_ + "/secrets"};
  SR_ASSERT_OK_AND_ASSIGN(runner_, Runner::Create(options));
  SR_ASSERT_OK(runner_->Run(Request("old", "exec: {command: [true]}\n")));
  WaitFinished("old");
  absl::SleepFor(absl::Milliseconds(400));
  // Each finished job prunes what has aged out.
  SR_ASSERT_OK(runner_->Run(Request("new", "exec: {command: [true]}\n")));
  WaitFinished("new");
  // The prune runs right after "new"'s status turned final; wait for it.
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (runner_->GetStatus("old").ok() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(absl::IsNotFound(runner_->GetStatus("old").status()));
  SR_EXPECT_OK(runner_->GetStatus("new").status());
  // Its files are gone too (removed right after it leaves the table).
  std::string jobs = dir_ + "/state/jobs";
  auto count_entries = [&jobs] {
    int entries = 0;
    DIR* d = ::opendir(jobs.c_str());
    while (d != nullptr) {
      struct dirent* e = ::readdir(d);
      if (e == nullptr) break;
      if (e->d_name[0] != '.') ++entries;
    }
    if (d != nullptr) ::closedir(d);
    return entries;
  };
  until = absl::Now() + absl::Seconds(10);
  while (count_entries() != 1 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(count_entries(), 1);
}

}  // namespace
}  // namespace step_runner::runner

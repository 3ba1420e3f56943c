// sr-catalog: the helper program the catalog's step files exec.
//
//   sr-catalog SUBCOMMAND --flag value ... [--output-file PATH] [--timeout SECONDS]
//
//   clone    --url --dir [--ref] [--depth]                          -> sha, dir, reused
//   branch   --dir --name [--base main]                             -> branch, sha, created, resumed
//   commit   --dir --message --author-name --author-email           -> committed, sha
//   push     --dir --branch                                         -> branch, sha
//   issue    --forge-url --project --iid                            -> iid, title, description, web_url
//   open-mr  --forge-url --project --source --target --title [--description] [--draft true|false]
//                                                                   -> iid, web_url, created
//   comment  --forge-url --project --issue --body                   -> note_id, posted
//   generate --endpoint --model --dir (--task-file F | --title T [--description D])
//            [--feedback-file F] [--artifacts-dir D] [--max-attempts 3] [--request-timeout 120]
//                                                                   -> files_changed, summary, attempts
//   test     --dir [--command CMD] [--allow-failure true|false] [--artifacts-dir D] [--test-timeout 1800]
//                                                                   -> passed, failed, skipped, exit_code,
//                                                                      failure_log_tail, log_file, command
//
// Guarantees:
// - Outputs are JSON Lines {"name": ..., "value": ...} appended to --output-file (stdout without
//   it): GitLab step-runner's output protocol. Progress goes to stderr.
// - Secrets come only from the environment: SR_GIT_TOKEN (git over HTTPS), SR_FORGE_TOKEN (the
//   GitLab API; SR_GIT_TOKEN when unset), SR_MODEL_KEY (the model endpoint). They are masked in
//   every message and artifact, and never written to .git/config or a remote URL.
// - Every network call has a timeout, and the whole command a deadline (--timeout, default
//   900 s; libgit2 1.5 has no network timeouts of its own): no fault hangs a step.
// - Exit codes: 0 done (also "nothing to commit", and failing tests with --allow-failure true),
//   1 failed (the reason on stderr), 2 usage, 124 the deadline passed.
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <iostream>
#include <map>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/generate.h"
#include "steps-catalog/helper/git_ops.h"
#include "steps-catalog/helper/gitlab.h"
#include "steps-catalog/helper/output.h"
#include "steps-catalog/helper/secrets.h"
#include "steps-catalog/helper/test_report.h"

namespace step_runner::catalog {
namespace {

using json = nlohmann::json;

class Flags {
 public:
  absl::Status Parse(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
      absl::string_view flag = argv[i];
      if (!absl::ConsumePrefix(&flag, "--")) return absl::InvalidArgumentError(absl::StrCat("unexpected argument ", argv[i]));
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", flag, " needs a value"));
      values_[std::string(flag)] = argv[++i];
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Required(const std::string& name) const {
    auto it = values_.find(name);
    if (it == values_.end() || it->second.empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
    return it->second;
  }
  std::string Get(const std::string& name, const std::string& fallback = "") const {
    auto it = values_.find(name);
    return it == values_.end() || it->second.empty() ? fallback : it->second;
  }
  absl::StatusOr<int> Int(const std::string& name, int fallback) const {
    std::string v = Get(name);
    if (v.empty()) return fallback;
    int out = 0;
    if (!absl::SimpleAtoi(v, &out)) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be a number, not ", v));
    return out;
  }
  absl::StatusOr<bool> Bool(const std::string& name) const {
    std::string v = Get(name, "false");
    if (v == "true" || v == "1" || v == "yes") return true;
    if (v == "false" || v == "0" || v == "no") return false;
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be true or false, not ", v));
  }

 private:
  std::map<std::string, std::string> values_;
};

std::string Absolute(const std::string& path) {
  char resolved[PATH_MAX];
  return ::realpath(path.c_str(), resolved) != nullptr ? std::string(resolved) : path;
}

std::string ForgeToken() {
  std::string token = SecretFromEnv(kForgeTokenEnv);
  return token.empty() ? SecretFromEnv(kGitTokenEnv) : token;
}

// Where a step's files go when no --artifacts-dir is given: beside the work tree, never in it
// (a commit of everything would pick them up).
std::string DefaultArtifacts(const std::string& dir, const std::string& step) {
  return absl::StrCat(Absolute(dir), ".artifacts/", step, "-", absl::ToUnixMillis(absl::Now()));
}

absl::Status RunClone(const Flags& f, OutputWriter& out) {
  CloneRequest request;
  SR_ASSIGN_OR_RETURN(request.url, f.Required("url"));
  SR_ASSIGN_OR_RETURN(request.dir, f.Required("dir"));
  request.ref = f.Get("ref");
  SR_ASSIGN_OR_RETURN(request.depth, f.Int("depth", 0));
  request.token = SecretFromEnv(kGitTokenEnv);
  SR_ASSIGN_OR_RETURN(CloneResult result, Clone(request));
  SR_RETURN_IF_ERROR(out.Write("sha", result.sha));
  SR_RETURN_IF_ERROR(out.Write("dir", Absolute(request.dir)));
  return out.Write("reused", result.reused);
}

absl::Status RunBranch(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(std::string dir, f.Required("dir"));
  SR_ASSIGN_OR_RETURN(std::string name, f.Required("name"));
  SR_ASSIGN_OR_RETURN(BranchResult result, CheckoutBranch(dir, name, f.Get("base", "main")));
  std::cerr << "branch: " << (result.resumed ? "resuming the earlier work on " : result.created ? "created " : "reusing ") << name << " at " << result.sha << "\n";
  SR_RETURN_IF_ERROR(out.Write("branch", name));
  SR_RETURN_IF_ERROR(out.Write("sha", result.sha));
  SR_RETURN_IF_ERROR(out.Write("created", result.created));
  return out.Write("resumed", result.resumed);
}

absl::Status RunCommit(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(std::string dir, f.Required("dir"));
  SR_ASSIGN_OR_RETURN(std::string message, f.Required("message"));
  SR_ASSIGN_OR_RETURN(std::string name, f.Required("author-name"));
  SR_ASSIGN_OR_RETURN(std::string email, f.Required("author-email"));
  SR_ASSIGN_OR_RETURN(CommitResult result, CommitAll(dir, message, name, email));
  std::cerr << (result.committed ? absl::StrCat("commit: created ", result.sha)
                                 : absl::StrCat("commit: nothing to commit; HEAD stays at ", result.sha))
            << "\n";
  SR_RETURN_IF_ERROR(out.Write("committed", result.committed));
  return out.Write("sha", result.sha);
}

absl::Status RunPush(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(std::string dir, f.Required("dir"));
  SR_ASSIGN_OR_RETURN(std::string branch, f.Required("branch"));
  SR_RETURN_IF_ERROR(Push(dir, branch, SecretFromEnv(kGitTokenEnv)));
  SR_ASSIGN_OR_RETURN(std::string sha, HeadSha(dir));
  SR_RETURN_IF_ERROR(out.Write("branch", branch));
  return out.Write("sha", sha);
}

absl::StatusOr<GitLabClient> Forge(const Flags& f) {
  SR_ASSIGN_OR_RETURN(std::string url, f.Required("forge-url"));
  SR_ASSIGN_OR_RETURN(std::string project, f.Required("project"));
  return GitLabClient(url, project, ForgeToken());
}

absl::Status RunIssue(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(GitLabClient forge, Forge(f));
  SR_ASSIGN_OR_RETURN(int iid, f.Int("iid", 0));
  if (iid <= 0) return absl::InvalidArgumentError("--iid must be a positive issue number");
  SR_ASSIGN_OR_RETURN(json issue, forge.GetIssue(iid));
  std::cerr << "issue: #" << iid << " " << issue.value("title", "") << "\n";
  SR_RETURN_IF_ERROR(out.Write("iid", iid));
  SR_RETURN_IF_ERROR(out.Write("title", issue.value("title", "")));
  SR_RETURN_IF_ERROR(out.Write("description", issue.value("description", json("")).is_string()
                                                  ? issue.value("description", "") : ""));
  return out.Write("web_url", issue.value("web_url", ""));
}

absl::Status RunOpenMr(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(GitLabClient forge, Forge(f));
  MergeRequestSpec spec;
  SR_ASSIGN_OR_RETURN(spec.source_branch, f.Required("source"));
  spec.target_branch = f.Get("target", "main");
  SR_ASSIGN_OR_RETURN(spec.title, f.Required("title"));
  spec.description = f.Get("description");
  SR_ASSIGN_OR_RETURN(spec.draft, f.Bool("draft"));
  SR_ASSIGN_OR_RETURN(MergeRequest mr, forge.OpenMergeRequestOnce(spec));
  std::cerr << "open-mr: " << (mr.created ? "opened !" : "already open: !") << mr.iid << " " << mr.web_url << "\n";
  SR_RETURN_IF_ERROR(out.Write("iid", mr.iid));
  SR_RETURN_IF_ERROR(out.Write("web_url", mr.web_url));
  return out.Write("created", mr.created);
}

absl::Status RunComment(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(GitLabClient forge, Forge(f));
  SR_ASSIGN_OR_RETURN(int iid, f.Int("issue", 0));
  if (iid <= 0) return absl::InvalidArgumentError("--issue must be a positive issue number");
  SR_ASSIGN_OR_RETURN(std::string body, f.Required("body"));
  bool posted = false;
  SR_ASSIGN_OR_RETURN(json note, forge.CommentOnce(iid, body, &posted));
  std::cerr << "comment: " << (posted ? "posted" : "already there, not posted again") << " on #" << iid << "\n";
  SR_RETURN_IF_ERROR(out.Write("note_id", note.value("id", 0)));
  return out.Write("posted", posted);
}

absl::Status RunGenerate(const Flags& f, OutputWriter& out) {
  GenerateRequest request;
  SR_ASSIGN_OR_RETURN(request.endpoint, f.Required("endpoint"));
  SR_ASSIGN_OR_RETURN(request.model, f.Required("model"));
  SR_ASSIGN_OR_RETURN(request.dir, f.Required("dir"));
  if (std::string task_file = f.Get("task-file"); !task_file.empty()) {
    SR_ASSIGN_OR_RETURN(std::string task, ReadFile(task_file));
    size_t nl = task.find('\n');
    request.title = task.substr(0, nl);
    request.description = nl == std::string::npos ? "" : task.substr(nl + 1);
  } else {
    SR_ASSIGN_OR_RETURN(request.title, f.Required("title"));
    request.description = f.Get("description");
  }
  if (std::string feedback_file = f.Get("feedback-file"); !feedback_file.empty()) {
    SR_ASSIGN_OR_RETURN(request.feedback, ReadFile(feedback_file));
  }
  request.api_key = SecretFromEnv(kModelKeyEnv);
  request.artifacts_dir = f.Get("artifacts-dir", DefaultArtifacts(request.dir, "generate"));
  SR_ASSIGN_OR_RETURN(request.max_attempts, f.Int("max-attempts", 3));
  SR_ASSIGN_OR_RETURN(int timeout, f.Int("request-timeout", 120));
  request.timeout = absl::Seconds(timeout);
  SR_ASSIGN_OR_RETURN(GenerateResult result, Generate(request, SecretMasker::FromEnvironment()));
  SR_RETURN_IF_ERROR(out.Write("files_changed", result.files_changed));
  SR_RETURN_IF_ERROR(out.Write("summary", result.summary));
  SR_RETURN_IF_ERROR(out.Write("attempts", result.attempts));
  return out.Write("artifacts_dir", Absolute(request.artifacts_dir));
}

// Returns FAILED_PRECONDITION (after writing the outputs) when tests fail and failure is not allowed.
absl::Status RunTestCommand(const Flags& f, OutputWriter& out) {
  SR_ASSIGN_OR_RETURN(std::string dir, f.Required("dir"));
  dir = Absolute(dir);
  std::string artifacts = f.Get("artifacts-dir", DefaultArtifacts(dir, "test"));
  SR_RETURN_IF_ERROR(MakeDirs(artifacts, 0700));
  artifacts = Absolute(artifacts);
  const std::string stamp = absl::StrCat(absl::ToUnixMillis(absl::Now()));
  const std::string log_path = absl::StrCat(artifacts, "/test-", stamp, ".log");
  const std::string junit_path = absl::StrCat(artifacts, "/junit-", stamp, ".xml");
  std::string command = f.Get("command");
  if (command.empty()) {
    SR_ASSIGN_OR_RETURN(command, DetectTestCommand(dir, junit_path));
  }
  SR_ASSIGN_OR_RETURN(bool allow_failure, f.Bool("allow-failure"));
  SR_ASSIGN_OR_RETURN(int timeout, f.Int("test-timeout", 1800));
  std::cerr << "test: running `" << command << "` in " << dir << "\n";
  SR_ASSIGN_OR_RETURN(TestRun run, RunTests(dir, command, log_path, junit_path, absl::Seconds(timeout)));
  SR_ASSIGN_OR_RETURN(std::string log, ReadFile(log_path));
  const SecretMasker masker = SecretMasker::FromEnvironment();
  const std::string tail = run.counts.failed > 0 ? masker.Mask(Tail(log, 60, 6000)) : "";
  std::cerr << "test: exit " << run.exit_code << ", " << run.counts.passed << " passed, " << run.counts.failed
            << " failed, " << run.counts.skipped << " skipped"
            << (run.reports.empty() ? " (from the output)" : " (from JUnit XML)") << "\n";
  if (!tail.empty()) std::cerr << "test: failure log tail:\n" << tail << "\n";
  SR_RETURN_IF_ERROR(out.Write("passed", run.counts.passed));
  SR_RETURN_IF_ERROR(out.Write("failed", run.counts.failed));
  SR_RETURN_IF_ERROR(out.Write("skipped", run.counts.skipped));
  SR_RETURN_IF_ERROR(out.Write("exit_code", run.exit_code));
  SR_RETURN_IF_ERROR(out.Write("command", command));
  SR_RETURN_IF_ERROR(out.Write("failure_log_tail", tail));
  SR_RETURN_IF_ERROR(out.Write("log_file", log_path));
  if (run.counts.failed > 0 && !allow_failure) {
    return absl::FailedPreconditionError(absl::StrCat(run.counts.failed, " test(s) failed (exit ", run.exit_code, ")"));
  }
  return absl::OkStatus();
}

using Handler = absl::Status (*)(const Flags&, OutputWriter&);
const std::map<std::string, Handler>& Subcommands() {
  static const auto* commands = new std::map<std::string, Handler>{
      {"clone", RunClone},       {"branch", RunBranch},   {"commit", RunCommit},
      {"push", RunPush},         {"issue", RunIssue},     {"open-mr", RunOpenMr},
      {"comment", RunComment},   {"generate", RunGenerate}, {"test", RunTestCommand}};
  return *commands;
}

}  // namespace
}  // namespace step_runner::catalog

int main(int argc, char** argv) {
  using namespace step_runner::catalog;
  if (argc < 2 || Subcommands().count(argv[1]) == 0) {
    std::cerr << "usage: sr-catalog {clone|branch|commit|push|issue|open-mr|comment|generate|test} --flag value ...\n";
    return 2;
  }
  const std::string command = argv[1];
  Flags flags;
  if (absl::Status s = flags.Parse(argc, argv, 2); !s.ok()) {
    std::cerr << "sr-catalog " << command << ": " << s.message() << "\n";
    return 2;
  }
  auto timeout = flags.Int("timeout", 900);
  if (!timeout.ok()) {
    std::cerr << "sr-catalog " << command << ": " << timeout.status().message() << "\n";
    return 2;
  }
  // The last line of defence against a stalled peer (libgit2 1.5 has no network timeouts).
  std::thread([seconds = *timeout, command] {
    std::this_thread::sleep_for(std::chrono::seconds(seconds));
    std::cerr << "sr-catalog " << command << ": error: gave up after " << seconds << " s (--timeout)\n";
    _exit(124);
  }).detach();
  auto out = OutputWriter::Open(flags.Get("output-file"));
  absl::Status status = out.ok() ? Subcommands().at(command)(flags, *out) : out.status();
  if (!status.ok()) {
    const SecretMasker masker = SecretMasker::FromEnvironment();
    std::cerr << "sr-catalog " << command << ": error: " << masker.Mask(status.message()) << "\n";
    return absl::IsInvalidArgument(status) && absl::StrContains(status.message(), "is required") ? 2 : 1;
  }
  return 0;
}

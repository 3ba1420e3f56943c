#include "tests/integration/daemon_fixture.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/numbers.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"

namespace step_runner::testing {
namespace {

// The test's environment with `extra` ("K=V") replacing any inherited variable of that name.
std::vector<std::string> TestEnvironment(const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string entry = *e;
    std::string name = entry.substr(0, entry.find('=') + 1);
    bool overridden = false;
    for (const std::string& x : extra) overridden = overridden || x.rfind(name, 0) == 0;
    if (!overridden) env.push_back(std::move(entry));
  }
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

}  // namespace

std::string StepRunnerBinary() { return SR_BINARY_DIR "/step-runner/step-runner"; }
std::string PatternWriterBinary() { return SR_BINARY_DIR "/tests/pattern_writer"; }

TempDir::TempDir() {
  char tmpl[] = "/tmp/sr_test.XXXXXX";
  path_ = ::mkdtemp(tmpl);
}
TempDir::~TempDir() { (void)RemoveTree(path_); }

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const std::string& dir,
                                                      std::vector<std::string> extra_args,
                                                      absl::Duration deadline,
                                                      const std::vector<std::string>& run_as) {
  std::unique_ptr<Daemon> daemon(new Daemon());
  daemon->socket_ = dir + "/sr.sock";
  daemon->state_ = dir + "/state";
  daemon->stderr_path_ = dir + "/daemon.stderr";
  // A restarted daemon appends to the same file; only what this one writes counts as ready.
  const size_t skip = ReadFile(daemon->stderr_path_).value_or("").size();
  UniqueFd err(::open(daemon->stderr_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!err) return ErrnoStatus(errno, "open(daemon.stderr)");
  std::vector<std::string> argv = {StepRunnerBinary(), "serve", "--socket", daemon->socket_,
                                   "--state-dir", daemon->state_, "--log-level", "warning"};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  // Tests of other things run steps that write outside their tree; they get --sandbox=none
  // unless they ask for the sandbox themselves (tests/sandbox does).
  if (std::none_of(extra_args.begin(), extra_args.end(),
                   [](const std::string& a) { return a == "--sandbox" || a.rfind("--sandbox=", 0) == 0; })) {
    argv.push_back("--sandbox=none");
  }
  argv.insert(argv.begin(), run_as.begin(), run_as.end());
  auto child = process::Subprocess::Spawn(
      {.argv = argv, .env = TestEnvironment({}), .stdout_fd = err.get(), .stderr_fd = err.get()});
  if (!child.ok()) return child.status();
  daemon->child_.emplace(*std::move(child));
  absl::Time until = absl::Now() + deadline;
  while (absl::Now() < until) {
    if (daemon->stderr_output().find("step-runner is listening on socket", skip) != std::string::npos) {
      return daemon;
    }
    pollfd pfd{.fd = daemon->child_->pidfd(), .events = POLLIN};
    if (::poll(&pfd, 1, 5) > 0) {
      return absl::InternalError(absl::StrCat("the daemon exited at start: ", daemon->stderr_output()));
    }
  }
  return absl::DeadlineExceededError(absl::StrCat("the daemon did not become ready: ", daemon->stderr_output()));
}

Daemon::~Daemon() {
  if (child_ && !exited_) {
    (void)child_->SignalGroup(SIGKILL);
    (void)child_->Reap();
  }
}

std::string Daemon::stderr_output() const { return ReadFile(stderr_path_).value_or(""); }

void Daemon::Signal(int signo) {
  if (!exited_) ::kill(child_->pid(), signo);
}

absl::StatusOr<int> Daemon::Wait(absl::Duration deadline) {
  if (exited_) return absl::FailedPreconditionError("already reaped");
  pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(deadline))) <= 0) {
    return absl::DeadlineExceededError("the daemon did not exit in time");
  }
  exited_ = true;
  return child_->Reap();
}

client::ClientOptions Daemon::ClientOptions() const {
  client::ClientOptions options;
  options.endpoint.socket_path = socket_;
  options.reconnect_timeout = absl::Seconds(20);
  return options;
}

std::string Steps(const std::string& definition) { return "{}\n---\n" + definition; }

proto::RunRequest Request(const std::string& id, const std::string& definition) {
  proto::RunRequest request;
  request.set_id(id);
  request.set_steps(Steps(definition));
  return request;
}

absl::StatusOr<proto::Status> WaitForJob(client::Client& client, const std::string& id,
                                         absl::Duration deadline) {
  absl::Time until = absl::Now() + deadline;
  for (;;) {
    auto status = client.GetStatus(id);
    if (!status.ok()) return status.status();
    if (status->status() != proto::StepResult::running) return *status;
    if (absl::Now() > until) return absl::DeadlineExceededError(absl::StrCat("job ", id, " still running"));
    absl::SleepFor(absl::Milliseconds(10));
  }
}

absl::StatusOr<std::string> ReadLog(client::Client& client, const std::string& id) {
  std::string log;
  auto status = client.Follow(id, 0, [&](const proto::FollowLogsResponse& chunk) { log += chunk.data(); });
  if (!status.ok()) return status.status();
  return log;
}

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv, absl::Duration deadline,
                                         const std::vector<std::string>& env, const std::string& input) {
  auto out = process::MakeOutputPipe();
  auto err = process::MakeOutputPipe();
  if (!out.ok() || !err.ok()) return absl::InternalError("pipe");
  TempDir tmp;
  std::string input_path = tmp.path() + "/stdin";
  if (absl::Status s = WriteFileAtomically(input_path, input, 0600); !s.ok()) return s;
  UniqueFd in(::open(input_path.c_str(), O_RDONLY | O_CLOEXEC));
  auto child = process::Subprocess::Spawn({.argv = argv,
                                           .env = TestEnvironment(env),
                                           .stdout_fd = out->write_end.get(),
                                           .stderr_fd = err->write_end.get(),
                                           .stdin_fd = in.get()});
  if (!child.ok()) return child.status();
  out->write_end.Close();
  err->write_end.Close();
  CommandResult result;
  absl::Time until = absl::Now() + deadline;
  bool out_open = true, err_open = true;
  char buf[65536];
  while (out_open || err_open) {
    int remaining = static_cast<int>(absl::ToInt64Milliseconds(until - absl::Now()));
    if (remaining <= 0) {
      (void)child->SignalGroup(SIGKILL);
      (void)child->Reap();
      return absl::DeadlineExceededError(absl::StrCat(argv[0], " did not finish in time; stderr: ", result.err));
    }
    pollfd fds[2] = {{.fd = out_open ? out->read_end.get() : -1, .events = POLLIN},
                     {.fd = err_open ? err->read_end.get() : -1, .events = POLLIN}};
    if (::poll(fds, 2, remaining) <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (!fds[i].revents) continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? result.out : result.err).append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EAGAIN) {
        (i == 0 ? out_open : err_open) = false;
      }
    }
  }
  pollfd pfd{.fd = child->pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(until - absl::Now())))) <= 0) {
    (void)child->SignalGroup(SIGKILL);
  }
  auto code = child->Reap();
  if (!code.ok()) return code.status();
  result.exit_code = *code;
  return result;
}

std::vector<std::string> OpenFds(pid_t pid) {
  const std::string fd_dir = absl::StrCat("/proc/", pid, "/fd");
  std::vector<std::pair<int, std::string>> fds;
  DIR* dir = ::opendir(fd_dir.c_str());
  if (dir == nullptr) return {};
  while (struct dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    char target[PATH_MAX];
    ssize_t length = ::readlink(absl::StrCat(fd_dir, "/", entry->d_name).c_str(), target, sizeof target);
    fds.emplace_back(std::atoi(entry->d_name), length < 0 ? "?" : std::string(target, length));
  }
  ::closedir(dir);
  std::sort(fds.begin(), fds.end());
  std::vector<std::string> listed;
  for (const auto& [fd, target] : fds) listed.push_back(absl::StrCat(fd, " -> ", target));
  return listed;
}

std::vector<std::string> SettledOpenFds(pid_t pid) {
  std::vector<std::string> fds = OpenFds(pid);
  for (absl::Time settled = absl::Now() + absl::Milliseconds(200), until = absl::Now() + absl::Seconds(10);
       absl::Now() < settled && absl::Now() < until;) {
    absl::SleepFor(absl::Milliseconds(20));
    if (std::vector<std::string> now = OpenFds(pid); now.size() != fds.size()) {
      fds = std::move(now);
      settled = absl::Now() + absl::Milliseconds(200);
    }
  }
  return fds;
}

std::vector<std::string> EnvironmentWith(const std::vector<std::string>& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    absl::string_view entry(*e);
    absl::string_view name = entry.substr(0, entry.find('='));
    bool overridden = std::any_of(overrides.begin(), overrides.end(), [&](const std::string& o) {
      return absl::string_view(o).substr(0, o.find('=')) == name;
    });
    if (!overridden) env.emplace_back(entry);
  }
  env.insert(env.end(), overrides.begin(), overrides.end());
  return env;
}

std::string ShStep(const std::string& script) {
  std::string quoted;
  for (char c : script) {
    if (c == '\\' || c == '"') quoted += '\\';
    quoted += c;
  }
  return absl::StrCat("exec: {command: [sh, -c, \"", quoted, "\"]}\n");
}

std::string WaitForFileScript(const std::string& path, absl::Duration limit) {
  return absl::StrCat("i=0; while [ ! -e ", path, " ] && [ $i -lt ", limit / absl::Milliseconds(50),
                      " ]; do sleep 0.05; i=$((i+1)); done");
}

std::string ExpectedPattern(int64_t bytes) {
  absl::StatusOr<CommandResult> result = RunCommand({PatternWriterBinary(), "--expect", absl::StrCat(bytes)});
  if (!result.ok() || result->exit_code != 0) {
    ADD_FAILURE() << "pattern_writer --expect " << bytes << " failed: " << result.status();
    return "";
  }
  return result->out;
}

std::string Difference(const std::string& got, const std::string& want) {
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  if (i == got.size() && i == want.size()) return "identical";
  return absl::StrCat("got ", got.size(), " bytes, want ", want.size(), "; first difference at byte ", i);
}

std::vector<pid_t> ReadPids(const std::string& path) {
  std::vector<pid_t> pids;
  std::string text = ReadFile(path).value_or("");
  text.resize(text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1);
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    pid_t pid;
    if (absl::SimpleAtoi(line, &pid)) pids.push_back(pid);
  }
  return pids;
}

}  // namespace step_runner::testing

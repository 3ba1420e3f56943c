#include "tests/proxy/proxy_fixture.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"

extern char** environ;

namespace step_runner::testing {

std::string WorkspaceProxyBinary() { return SR_BINARY_DIR "/proxy/workspace-proxy"; }

absl::StatusOr<std::unique_ptr<Process>> Process::Start(const std::vector<std::string>& argv,
                                                        const std::string& output_prefix,
                                                        const std::vector<std::string>& env) {
  std::unique_ptr<Process> p(new Process());
  p->out_path_ = output_prefix + ".out";
  p->err_path_ = output_prefix + ".err";
  UniqueFd out(::open(p->out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  UniqueFd err(::open(p->err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!out || !err) return ErrnoStatus(errno, absl::StrCat("open ", output_prefix));
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = argv,
                                                  .env = env.empty() ? EnvironmentWith({}) : env,
                                                  .stdout_fd = out.get(),
                                                  .stderr_fd = err.get()}));
  p->child_.emplace(std::move(child));
  return p;
}

Process::~Process() {
  if (!exit_code_) {
    (void)child_->SignalGroup(SIGKILL);
    (void)child_->Reap();
  }
}

std::string Process::out() const { return ReadFile(out_path_).value_or(""); }
std::string Process::err() const { return ReadFile(err_path_).value_or(""); }

bool Process::Exited() const {
  if (exit_code_) return true;
  pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
  return ::poll(&pfd, 1, 0) > 0;
}

void Process::Signal(int signo) {
  if (!exit_code_) (void)child_->SignalGroup(signo);
}

absl::StatusOr<int> Process::Wait(absl::Duration deadline) {
  if (exit_code_) return *exit_code_;
  pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
  const int ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline)));
  if (::poll(&pfd, 1, ms) <= 0) return absl::DeadlineExceededError("the process did not exit in time");
  SR_ASSIGN_OR_RETURN(int code, child_->Reap());
  exit_code_ = code;
  return code;
}


std::string ShellQuote(const std::string& word) {
  std::string quoted = "'";
  for (char c : word) {
    if (c == '\'') quoted += "'\\''";
    else quoted += c;
  }
  return quoted + "'";
}

absl::StatusOr<ClientKey> MakeClientKey(const std::string& path) {
  SR_ASSIGN_OR_RETURN(CommandResult result,
                      RunCommand({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path}));
  if (result.exit_code != 0) return absl::InternalError(absl::StrCat("ssh-keygen: ", result.err));
  SR_ASSIGN_OR_RETURN(std::string line, ReadFile(path + ".pub"));
  return ClientKey{path, std::string(absl::StripAsciiWhitespace(line))};
}

absl::StatusOr<std::unique_ptr<ProxyProcess>> ProxyProcess::Start(Options options) {
  std::unique_ptr<ProxyProcess> proxy(new ProxyProcess());
  proxy->options_ = std::move(options);
  const std::string& dir = proxy->options_.dir;
  proxy->config_ = dir + "/proxy.yml";
  proxy->routing_ = dir + "/routing.yml";
  proxy->audit_ = dir + "/audit.jsonl";
  proxy->ready_ = dir + "/proxy.ready";
  SR_RETURN_IF_ERROR(proxy->WriteRouting(proxy->options_.routing_yaml));
  SR_RETURN_IF_ERROR(proxy->Launch());
  return proxy;
}

ProxyProcess::~ProxyProcess() = default;

absl::Status ProxyProcess::WriteRouting(const std::string& yaml) {
  return WriteFileAtomically(routing_, yaml, 0600);
}

absl::Status ProxyProcess::Launch() {
  const std::string& dir = options_.dir;
  std::string config = absl::StrCat("listen: {address: 127.0.0.1, port: ", port_, "}\n",
                                    "host_key: ", dir, "/host_ed25519\n",
                                    "routing: ", routing_, "\n",
                                    "routing_poll_interval: 100ms\n",
                                    "audit_log: ", audit_, "\n");
  if (!options_.forge_url.empty()) absl::StrAppend(&config, "forge: {url: ", options_.forge_url, "}\n");
  if (!options_.limits_yaml.empty()) absl::StrAppend(&config, "limits: {", options_.limits_yaml, "}\n");
  absl::StrAppend(&config, options_.extra_yaml);
  SR_RETURN_IF_ERROR(WriteFileAtomically(config_, config, 0600));
  ::unlink(ready_.c_str());
  SR_ASSIGN_OR_RETURN(process_, Process::Start({WorkspaceProxyBinary(), "--config", config_,
                                                "--ready-file", ready_, "--log-level", "info"},
                                               absl::StrCat(dir, "/proxy.", launches_++)));
  int port = 0;
  const bool ready = PollUntil(
      [&] {
        auto text = ReadFile(ready_);
        return (text.ok() && absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &port)) ||
               process_->Exited();
      },
      absl::Seconds(20));
  if (!ready || port == 0) {
    return absl::UnavailableError(absl::StrCat("workspace-proxy did not start: ", process_->err()));
  }
  port_ = port;
  return absl::OkStatus();
}

absl::StatusOr<int> ProxyProcess::Stop(int signo, absl::Duration deadline) {
  process_->Signal(signo);
  return process_->Wait(deadline);
}

absl::Status ProxyProcess::Restart(int signo) {
  SR_RETURN_IF_ERROR(Stop(signo).status());
  return Launch();
}

std::vector<std::string> ProxyProcess::AuditLines() const {
  std::string text = ReadFile(audit_).value_or("");
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

std::vector<std::string> SshArgv(int port, const std::string& user, const std::string& key,
                                 const std::vector<std::string>& options,
                                 const std::vector<std::string>& args) {
  // ssh takes the first value given for an option: the caller's come first, to override.
  std::vector<std::string> argv = {"ssh", "-F", "/dev/null"};
  argv.insert(argv.end(), options.begin(), options.end());
  for (const char* word : {"-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
                           "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                           "ConnectTimeout=20"}) {
    argv.push_back(word);
  }
  argv.insert(argv.end(), {"-i", key, "-p", absl::StrCat(port)});
  argv.push_back(absl::StrCat(user, "@127.0.0.1"));
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

std::string SshCommand(int port, const std::string& user, const std::string& key,
                       const std::vector<std::string>& options, const std::vector<std::string>& args) {
  std::vector<std::string> words;
  for (const std::string& w : SshArgv(port, user, key, options, args)) words.push_back(ShellQuote(w));
  return absl::StrJoin(words, " ");
}

}  // namespace step_runner::testing

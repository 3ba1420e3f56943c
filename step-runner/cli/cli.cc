#include "step-runner/cli/cli.h"

#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/sandbox/flags.h"
#include "step-runner/server/daemon.h"

namespace step_runner::cli {

namespace {

// The flags that collect: each --env, --input, ... adds one more.
bool IsRepeatable(const std::string& name) {
  static const auto* const repeatable = new std::set<std::string>{
      "env", "input", "var", "masked-var", "file-var", "allow-uid", "allow-host", "hide"};
  return repeatable->count(name) > 0;
}

}  // namespace

std::optional<Args> Parse(int argc, char** argv, int first, const std::vector<std::string>& valued,
                          const std::vector<std::string>& boolean, std::string* error) {
  Args args;
  auto is = [](const std::vector<std::string>& set, const std::string& name) {
    return std::find(set.begin(), set.end(), name) != set.end();
  };
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      args.positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (is(boolean, name) && !value) {
      args.switches[name] = true;
    } else if (is(boolean, name)) {
      *error = absl::StrCat("--", name, " takes no value (give --", name, " alone)");
      return std::nullopt;
    } else if (is(valued, name)) {
      if (!value) {
        if (i + 1 >= argc) {
          *error = absl::StrCat("--", name, " needs a value");
          return std::nullopt;
        }
        value = argv[++i];
      }
      // A second --id or --socket is a slip (an alias plus a flag, a pasted line): taking one
      // of them silently would run something the user did not ask for.
      if (args.values.count(name) && !IsRepeatable(name)) {
        *error = absl::StrCat("--", name, " is given more than once; give it once");
        return std::nullopt;
      }
      args.values.emplace(name, *value);
    } else {
      *error = absl::StrCat("unknown flag --", name);
      return std::nullopt;
    }
  }
  return args;
}

void Notice(const std::string& message) { std::cerr << "step-runner: " << message << std::endl; }

int ExitForStatus(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return kExitInvalid;
    case absl::StatusCode::kNotFound:
      return kExitNotFound;
    case absl::StatusCode::kUnavailable:
      return kExitUnavailable;
    default:
      return kExitSoftware;
  }
}

int Fail(const absl::Status& status) {
  Notice(std::string(status.message()));
  return ExitForStatus(status);
}

std::string DefaultSocket() {
  if (const char* env = std::getenv("STEP_RUNNER_SOCKET"); env && *env) return env;
  return absl::StrCat("/tmp/step-runner-", ::getuid(), "/step-runner.sock");
}

std::string StateHome() {
  if (const char* xdg = std::getenv("XDG_STATE_HOME"); xdg && *xdg) return absl::StrCat(xdg, "/step-runner");
  if (const char* home = std::getenv("HOME"); home && *home) return absl::StrCat(home, "/.local/state/step-runner");
  return absl::StrCat("/tmp/step-runner-", ::getuid(), "/state");
}

absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& text) {
  absl::Duration d;
  if (!absl::ParseDuration(text, &d) || d < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": expected a duration like 90s or 5m, got \"", text, "\""));
  }
  return d;
}

// Where dist:// steps come from: --catalog, $STEP_RUNNER_CATALOG, the installed catalog beside
// the binary (../share/step-runner/steps), or this build's source tree.
std::string CatalogDir(const Args& args) {
  if (auto dir = args.Get("catalog")) return *dir;
  if (const char* env = std::getenv("STEP_RUNNER_CATALOG")) return env;
  const std::string installed = OwnBinaryDir() + "/../share/step-runner/steps";
  if (struct stat st; ::stat(installed.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return installed;
  return SR_DEFAULT_CATALOG;
}

std::vector<std::string> ServeFlags() {
  std::vector<std::string> flags = {"socket", "state-dir", "allow-uid", "max-jobs", "max-age",
                                    "graceful-exit-timeout", "log-level", "catalog"};
  flags.insert(flags.end(), sandbox::ServeFlagNames().begin(), sandbox::ServeFlagNames().end());
  return flags;
}

int CmdServe(const Args& args) {
  server::DaemonOptions options;
  options.socket_path = args.Get("socket").value_or(DefaultSocket());
  options.runner.state_dir = args.Get("state-dir").value_or(StateHome() + "/daemon");
  // Jobs, the sandbox's hiding and the work trees name it by path, from other folders than this.
  if (!absl::StartsWith(options.runner.state_dir, "/")) {
    char cwd[PATH_MAX];
    if (::getcwd(cwd, sizeof cwd) == nullptr) return Fail(ErrnoStatus(errno, "getcwd"));
    options.runner.state_dir = absl::StrCat(cwd, "/", options.runner.state_dir);
  }
  for (const std::string& uid : args.All("allow-uid")) {
    uint32_t value;
    if (!absl::SimpleAtoi(uid, &value)) return Fail(absl::InvalidArgumentError("--allow-uid: not a uid: " + uid));
    options.extra_allowed_uids.insert(value);
  }
  if (auto n = args.Get("max-jobs")) {
    if (!absl::SimpleAtoi(*n, &options.runner.max_retained_jobs) || options.runner.max_retained_jobs == 0) {
      return Fail(absl::InvalidArgumentError("--max-jobs: expected a positive number"));
    }
  }
  if (auto age = args.Get("max-age")) {
    auto d = ParseDurationFlag("max-age", *age);
    if (!d.ok()) return Fail(d.status());
    options.runner.max_job_age = *d;
  }
  if (auto grace = args.Get("graceful-exit-timeout")) {
    auto d = ParseDurationFlag("graceful-exit-timeout", *grace);
    if (!d.ok()) return Fail(d.status());
    options.runner.default_graceful_exit_timeout = *d;
  }
  options.runner.catalog_dir = CatalogDir(args);
  if (auto level = args.Get("log-level")) {
    if (*level == "info") internal::SetMinLogSeverity(internal::Severity::kInfo);
    else if (*level == "warning") internal::SetMinLogSeverity(internal::Severity::kWarning);
    else if (*level == "error") internal::SetMinLogSeverity(internal::Severity::kError);
    else return Fail(absl::InvalidArgumentError("--log-level: expected info, warning or error"));
  }
  // Steps start from a small, known environment (GitLab's list plus HOME), not the daemon's.
  for (const char* name : {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LOGNAME", "USER", "SHELL",
                           "TERM", "TMPDIR", "TZ", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                           "http_proxy", "https_proxy", "no_proxy", "all_proxy"}) {
    if (const char* value = std::getenv(name)) options.runner.base_env.push_back(absl::StrCat(name, "=", value));
  }
  if (!std::getenv("PATH")) options.runner.base_env.push_back("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  auto sandbox = sandbox::OptionsFromFlags({[&](const std::string& n) { return args.Get(n); },
                                            [&](const std::string& n) { return args.All(n); }},
                                           options.runner.state_dir, options.socket_path);
  if (!sandbox.ok()) return Fail(sandbox.status());
  options.sandbox = *std::move(sandbox);
  absl::Status s = server::Serve(options);
  if (!s.ok()) return Fail(s);
  return 0;
}

}  // namespace step_runner::cli

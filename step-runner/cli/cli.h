#ifndef STEP_RUNNER_CLI_CLI_H_
#define STEP_RUNNER_CLI_CLI_H_

// What the two programs share: `step-runner` (the CLI) and `step-runner-daemon` (what
// `step-runner serve` runs): flag parsing, exit codes, default paths, and the serve command.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace step_runner::cli {

// CLI exit codes beyond the job's own (documented in README.md).
inline constexpr int kExitUsage = 2;
inline constexpr int kExitTimeout = 124;
inline constexpr int kExitCancelled = 130;
inline constexpr int kExitInvalid = 65;       // EX_DATAERR: the daemon rejected the request
inline constexpr int kExitNotFound = 66;      // EX_NOINPUT: no such job or file
inline constexpr int kExitUnavailable = 69;   // EX_UNAVAILABLE: the daemon could not be reached
inline constexpr int kExitInterrupted = 75;   // EX_TEMPFAIL: the daemon died while the job ran
inline constexpr int kExitSoftware = 70;      // EX_SOFTWARE: anything else

struct Args {
  std::vector<std::string> positional;
  std::multimap<std::string, std::string> values;
  std::map<std::string, bool> switches;

  std::optional<std::string> Get(const std::string& name) const {
    auto it = values.find(name);
    if (it == values.end()) return std::nullopt;
    return it->second;
  }
  std::vector<std::string> All(const std::string& name) const {
    std::vector<std::string> out;
    for (auto [it, end] = values.equal_range(name); it != end; ++it) out.push_back(it->second);
    return out;
  }
  bool Has(const std::string& name) const { return switches.count(name) > 0; }
};

struct UsageError {
  std::string message;
};

// Parses "--flag value", "--flag=value" and "--switch" against the allowed sets.
std::optional<Args> Parse(int argc, char** argv, int first, const std::vector<std::string>& valued,
                          const std::vector<std::string>& boolean, std::string* error);

// Prints "step-runner: MESSAGE" on stderr.
void Notice(const std::string& message);
int ExitForStatus(const absl::Status& status);
// Notice(status), then its exit code.
int Fail(const absl::Status& status);

// $STEP_RUNNER_SOCKET, or /tmp/step-runner-UID/step-runner.sock.
std::string DefaultSocket();
// $XDG_STATE_HOME/step-runner, ~/.local/state/step-runner, or /tmp/step-runner-UID/state.
std::string StateHome();
absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& text);
// Where dist:// steps come from (see cli.cc).
std::string CatalogDir(const Args& args);

// step-runner serve: the flags it takes, and the command itself (returns the exit code).
std::vector<std::string> ServeFlags();
int CmdServe(const Args& args);

}  // namespace step_runner::cli

#endif  // STEP_RUNNER_CLI_CLI_H_

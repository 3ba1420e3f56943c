#ifndef STEP_RUNNER_AUDIT_CLI_H_
#define STEP_RUNNER_AUDIT_CLI_H_

#include <string>

namespace step_runner::audit {

// The audit log of a daemon's state dir.
std::string LogPath(const std::string& state_dir);

// `step-runner audit verify` and `step-runner audit tail [--follow] [--lines N]`: prints to
// stdout/stderr and returns the exit code (0 intact, 1 tampered, 66 no log, 2 usage).
int RunCommand(const std::string& subcommand, const std::string& state_dir, bool follow, int lines);

}  // namespace step_runner::audit

#endif  // STEP_RUNNER_AUDIT_CLI_H_

#ifndef STEP_RUNNER_TESTS_INTEGRATION_DAEMON_FIXTURE_H_
#define STEP_RUNNER_TESTS_INTEGRATION_DAEMON_FIXTURE_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "proto/step_runner.pb.h"
#include "step-runner/client/client.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::testing {

// Paths of the binaries under test (built into the CMake binary dir).
std::string StepRunnerBinary();
std::string PatternWriterBinary();

// Polls `condition` every `interval` until it holds or `deadline` passes; whether it held.
template <typename Condition>
bool PollUntil(Condition condition, absl::Duration deadline, absl::Duration interval = absl::Milliseconds(5)) {
  const absl::Time until = absl::Now() + deadline;
  for (;;) {
    if (condition()) return true;
    if (absl::Now() >= until) return false;
    absl::SleepFor(interval);
  }
}

// The test's environment with `overrides` ("KEY=VALUE") replacing any inherited entry of the
// same name: getenv() returns the first match, so appending alone would not override.
std::vector<std::string> EnvironmentWith(const std::vector<std::string>& overrides);

// A step running `script` with sh -c. The exec form (not `run:`, no bash needed) so that the
// step's process is the shell itself and `$$` is the leader of the step's process group.
std::string ShStep(const std::string& script);

// Shell code that waits for `path` to exist, for at most `limit`: a test that fails before
// creating it must not leave a step running for long.
std::string WaitForFileScript(const std::string& path, absl::Duration limit = absl::Minutes(2));

// What `pattern_writer BYTES ...` writes (its `--expect` output), byte for byte.
std::string ExpectedPattern(int64_t bytes);

// Where two byte strings first differ, for failure messages (printing megabytes helps no one).
std::string Difference(const std::string& got, const std::string& want);

// Pids from a file that shells append `$$` lines to; a line still being written is ignored.
std::vector<pid_t> ReadPids(const std::string& path);

// A temporary folder, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The real `step-runner serve` as a child process on `<dir>/sr.sock` with state in
// `<dir>/state`. Start() returns once the daemon printed its ready marker. `extra_args` are
// more serve flags; without a --sandbox flag among them it runs with --sandbox=none, since most
// tests are about other things and their steps write outside their trees. `run_as`, when
// given, goes before the command (e.g. setpriv to run the daemon as another user).
class Daemon {
 public:
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const std::string& dir,
                                                       std::vector<std::string> extra_args = {},
                                                       absl::Duration deadline = absl::Seconds(20),
                                                       const std::vector<std::string>& run_as = {});
  ~Daemon();  // SIGKILLs the daemon if it still runs

  pid_t pid() const { return child_->pid(); }
  const std::string& socket_path() const { return socket_; }
  const std::string& state_dir() const { return state_; }
  // What the daemon wrote to stderr so far.
  std::string stderr_output() const;

  void Signal(int signo);
  // Waits for the daemon to exit; its exit code (128+N for signal N), or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration deadline);

  client::ClientOptions ClientOptions() const;

 private:
  Daemon() = default;
  std::optional<process::Subprocess> child_;
  std::string socket_;
  std::string state_;
  std::string stderr_path_;
  bool exited_ = false;
};

// A step file from a definition document (the spec document is empty).
std::string Steps(const std::string& definition);
proto::RunRequest Request(const std::string& id, const std::string& definition);

// Polls Status until the job is no longer running (with a deadline).
absl::StatusOr<proto::Status> WaitForJob(client::Client& client, const std::string& id,
                                         absl::Duration deadline = absl::Seconds(30));

// Reads the whole log of a job through FollowLogs (it must have finished).
absl::StatusOr<std::string> ReadLog(client::Client& client, const std::string& id);

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
// Runs a command (argv, with the test's environment plus `env`), feeding `input` on stdin;
// gives up after `deadline` (killing it) with DEADLINE_EXCEEDED.
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                         absl::Duration deadline = absl::Seconds(60),
                                         const std::vector<std::string>& env = {},
                                         const std::string& input = "");

// Open fds of a process, from /proc/<pid>/fd, each as "N -> target" (sorted by N), so that a
// failing count says what is open.
std::vector<std::string> OpenFds(pid_t pid);
// OpenFds once their number has not changed for 200 ms (at most 10 s of waiting): what a process
// holds at rest, not the files it opens and closes as it finishes its work.
std::vector<std::string> SettledOpenFds(pid_t pid);

}  // namespace step_runner::testing

#endif  // STEP_RUNNER_TESTS_INTEGRATION_DAEMON_FIXTURE_H_

#ifndef STEP_RUNNER_PROCESS_SUBPROCESS_H_
#define STEP_RUNNER_PROCESS_SUBPROCESS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::process {

// For SpawnOptions fds: keep the parent's fd of the same number.
inline constexpr int kInheritFd = -2;

struct SpawnOptions {
  std::vector<std::string> argv;  // argv[0] without a '/' is looked up in env's PATH
  std::vector<std::string> env;   // "KEY=VALUE"; the child gets exactly this
  std::string work_dir;           // empty: inherit
  int stdout_fd = -1;             // dup'ed onto fd 1 in the child (-1: /dev/null)
  int stderr_fd = -1;             // dup'ed onto fd 2 in the child (-1: /dev/null)
  int stdin_fd = -1;              // dup'ed onto fd 0 in the child (-1: /dev/null)
  // dup'ed onto fd 3 in the child (-1: fd 3 stays closed). The sandbox helper's channel back
  // to the daemon; must be above 3 itself.
  int fd3 = -1;
  // dup'ed onto fd 4 (-1: closed); needs fd3. A warm sandbox's spec channel (sandbox.h).
  int fd4 = -1;
};

// A child started with posix_spawn into its own session and process group, with stdin on
// /dev/null unless given, default signal dispositions, an empty signal mask and no fds but 0, 1 and 2.
// Holds a pidfd from straight after the spawn, so signalling and reaping never race with pid
// reuse. Not thread-safe; move-only.
class Subprocess {
 public:
  static absl::StatusOr<Subprocess> Spawn(const SpawnOptions& options);

  Subprocess(Subprocess&&) = default;
  Subprocess& operator=(Subprocess&&) = default;

  pid_t pid() const { return pid_; }
  // Readable once the child has exited (for an epoll loop).
  int pidfd() const { return pidfd_.get(); }

  // Signals the child's whole process group (it is the group leader, pgid == pid). Only call
  // this before Reap(): while the leader is unreaped its pid, and so the group id, cannot be
  // reused, which makes the group kill race-free.
  absl::Status SignalGroup(int signo);

  // Waits for the child (blocking unless it has exited) and returns its exit code, or 128+N
  // if signal N killed it.
  absl::StatusOr<int> Reap();

 private:
  Subprocess(pid_t pid, UniqueFd pidfd) : pid_(pid), pidfd_(std::move(pidfd)) {}
  pid_t pid_;
  UniqueFd pidfd_;
};

// Finds `name` as execvp would, in the PATH given as a "PATH=..." entry of `env` (or the
// default path). Returns NOT_FOUND with the name when it is nowhere.
absl::StatusOr<std::string> FindExecutable(const std::string& name,
                                           const std::vector<std::string>& env);

// Start time of process `pid` in clock ticks since boot (field 22 of /proc/pid/stat), and
// the kernel's boot id: together they name one process instance across pid reuse.
absl::StatusOr<uint64_t> ProcessStartTicks(pid_t pid);
std::string BootId();

// Processes of group `pgid` that are alive (zombies, which only wait to be reaped, excluded).
std::vector<pid_t> LiveProcessesInGroup(pid_t pgid);

// A pipe whose read end is non-blocking and close-on-exec (for the parent's event loop) and
// whose write end is blocking (for the child's fd 1 or 2).
struct OutputPipe {
  UniqueFd read_end;
  UniqueFd write_end;
};
absl::StatusOr<OutputPipe> MakeOutputPipe();

}  // namespace step_runner::process

#endif  // STEP_RUNNER_PROCESS_SUBPROCESS_H_

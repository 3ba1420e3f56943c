#ifndef STEP_RUNNER_BENCH_BENCH_UTIL_H_
#define STEP_RUNNER_BENCH_BENCH_UTIL_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "step-runner/client/client.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::bench {

// Where the build put the daemon binary (SR_BINARY_DIR is set by bench/CMakeLists.txt).
std::string DefaultStepRunnerBinary();

// The bench's own environment as "KEY=VALUE" entries, for children it spawns.
std::vector<std::string> Environment();

// A temporary folder under `parent`, removed with everything in it on destruction.
class TempDir {
 public:
  static absl::StatusOr<std::unique_ptr<TempDir>> Create(const std::string& parent);
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// `step-runner serve` as a child process on `<dir>/sr.sock` with its state in `<dir>/state`.
// The same start-up handshake as tests/integration/daemon_fixture.cc (copied rather than linked,
// because that library pulls in gtest): Start() returns once the ready marker is on stderr.
class DaemonProcess {
 public:
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const std::string& binary,
                                                              const std::string& dir,
                                                              const std::vector<std::string>& extra_args);
  ~DaemonProcess();  // SIGKILLs the daemon if Stop() was not called or did not work

  pid_t pid() const { return child_->pid(); }
  const std::string& socket_path() const { return socket_; }
  client::ClientOptions ClientOptions() const;
  std::string stderr_output() const;

  // SIGTERM, then waits for a clean exit (its jobs are finished by then, so this is quick).
  absl::Status Stop(absl::Duration deadline = absl::Seconds(20));

 private:
  DaemonProcess() = default;
  std::optional<process::Subprocess> child_;
  std::string socket_;
  std::string stderr_path_;
  bool exited_ = false;
};

// Memory figures of a process from /proc/<pid>/status, in KiB.
struct MemoryUsage {
  int64_t rss_kib = 0;       // VmRSS: resident now
  int64_t hwm_kib = 0;       // VmHWM: peak resident since start
  int64_t rss_anon_kib = 0;  // RssAnon: heap, stacks, relocated data: the daemon's own
  int64_t rss_file_kib = 0;  // RssFile: mapped binary and library pages (shared with others)
};
absl::StatusOr<MemoryUsage> ReadMemoryUsage(pid_t pid);

// CPU time of a process from /proc/<pid>/stat: its own (utime+stime) and that of its reaped
// children (cutime+cstime), which is where the steps the daemon ran end up.
struct CpuTime {
  absl::Duration self;
  absl::Duration children;
};
absl::StatusOr<CpuTime> ReadCpuTime(pid_t pid);
// The same for the calling process, from getrusage (microsecond resolution).
CpuTime OwnCpuTime();

using Clock = std::chrono::steady_clock;
inline double MicrosSince(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

// Summary of a sample of durations (microseconds) or rates.
struct Summary {
  size_t count = 0;
  double min = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double max = 0;
  double mean = 0;
};
// Nearest-rank percentiles; an empty sample gives all zeros.
Summary Summarize(std::vector<double> sample);

// The type of the filesystem holding `path` ("ext4", "tmpfs", ...): the daemon's per-job cost
// depends on it (every job creates, renames and deletes files in its state dir).
std::string FilesystemType(const std::string& path);

// Reads `fds` (non-blocking read ends) to EOF, discarding the bytes, or writing them to `sink`
// if it is an fd; returns how many there were. Polls instead of spinning, as the daemon does.
absl::StatusOr<int64_t> DrainToEof(const std::vector<int>& fds, size_t buffer_bytes, int sink = -1);

// The environment the daemon gives steps (main.cc keeps these names of its own environment),
// for raw baselines that must see an equally small environment.
std::vector<std::string> StepEnvironment();

}  // namespace step_runner::bench

#endif  // STEP_RUNNER_BENCH_BENCH_UTIL_H_

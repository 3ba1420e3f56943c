#ifndef STEP_RUNNER_PROXY_BACKEND_H_
#define STEP_RUNNER_PROXY_BACKEND_H_

#include <optional>
#include <utility>

#include "absl/status/statusor.h"
#include "proxy/config.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::proxy {

// One byte stream to a workspace's step-runner: a connected unix socket, or one end of a
// socketpair whose other end is the stdin and stdout of the backend command.
class BackendStream {
 public:
  // Connects (socket backend) or spawns the expanded command with posix_spawn, no shell.
  static absl::StatusOr<BackendStream> Dial(const Workspace& workspace);
  // A moved-from stream owns nothing (std::optional's own move would leave a hollow child).
  BackendStream(BackendStream&& other) noexcept
      : fd_(std::move(other.fd_)), child_(std::exchange(other.child_, std::nullopt)) {}
  BackendStream& operator=(BackendStream&& other) noexcept {
    Stop();
    fd_ = std::move(other.fd_);
    child_ = std::exchange(other.child_, std::nullopt);
    return *this;
  }
  ~BackendStream();  // closes the stream, then stops and reaps the command

  // Non-blocking, close-on-exec.
  int fd() const { return fd_.get(); }
  // The command's exit code once it ended by itself after closing its end (0 for a socket).
  int ExitCode();

 private:
  BackendStream() = default;
  void Stop();
  UniqueFd fd_;
  std::optional<process::Subprocess> child_;
};

}  // namespace step_runner::proxy

#endif  // STEP_RUNNER_PROXY_BACKEND_H_

#ifndef STEP_RUNNER_SERVER_LISTENER_H_
#define STEP_RUNNER_SERVER_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::server {

// The daemon's unix socket. It is created owner-only (0600, in a folder the daemon owns), and
// every accepted connection's peer credentials (SO_PEERCRED) are checked against the allowed
// uids before the connection is handed on; others are closed at once and logged.
class UnixListener {
 public:
  using ConnectionHandler = std::function<void(UniqueFd connection, pid_t pid, uid_t uid)>;

  // Binds `path`. A stale socket left by a dead daemon is replaced; a live one is an error.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Bind(const std::string& path,
                                                            std::set<uid_t> allowed_uids);
  ~UnixListener();

  // Accepts on a background thread until Stop().
  void Start(ConnectionHandler handler);
  // Stops accepting and removes the socket file. Idempotent.
  void Stop();

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }

 private:
  UnixListener(std::string path, UniqueFd fd, UniqueFd wake, std::set<uid_t> allowed);
  void AcceptLoop();

  const std::string path_;
  UniqueFd fd_;
  UniqueFd wake_;
  const std::set<uid_t> allowed_uids_;
  ConnectionHandler handler_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

}  // namespace step_runner::server

#endif  // STEP_RUNNER_SERVER_LISTENER_H_

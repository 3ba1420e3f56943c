#include "proxy/backend.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"

extern char** environ;

namespace step_runner::proxy {
namespace {

absl::Status SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return ErrnoStatus(errno, "fcntl O_NONBLOCK");
  }
  return absl::OkStatus();
}

// Waits up to `ms` for the child's pidfd to become readable (it exited).
bool ExitedWithin(const process::Subprocess& child, int ms) {
  pollfd pfd{.fd = child.pidfd(), .events = POLLIN};
  return ::poll(&pfd, 1, ms) > 0;
}

}  // namespace

absl::StatusOr<BackendStream> BackendStream::Dial(const Workspace& workspace) {
  BackendStream stream;
  if (!workspace.backend.socket.empty()) {
    const std::string& path = workspace.backend.socket;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path) {
      return absl::InvalidArgumentError(absl::StrCat("socket path too long: ", path));
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    stream.fd_.Reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!stream.fd_) return ErrnoStatus(errno, "socket");
    // Blocking connect: on a unix socket it completes or fails at once (no handshake).
    if (::connect(stream.fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot connect to ", path, ": ", std::strerror(errno)));
    }
    SR_RETURN_IF_ERROR(SetNonBlocking(stream.fd_.get()));
    return stream;
  }
  SR_ASSIGN_OR_RETURN(std::vector<std::string> argv, ExpandCommand(workspace));
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    return ErrnoStatus(errno, "socketpair");
  }
  stream.fd_.Reset(pair[0]);
  UniqueFd child_end(pair[1]);
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  // The command's own complaints ("no such container") go to the proxy's stderr.
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = argv,
                                                  .env = env,
                                                  .stdout_fd = child_end.get(),
                                                  .stderr_fd = process::kInheritFd,
                                                  .stdin_fd = child_end.get()}));
  stream.child_.emplace(std::move(child));
  SR_RETURN_IF_ERROR(SetNonBlocking(stream.fd_.get()));
  return stream;
}

int BackendStream::ExitCode() {
  if (!child_) return 0;
  fd_.Close();
  // `step-runner proxy` exits as soon as either side closes; give it a moment to do so.
  if (!ExitedWithin(*child_, 500)) return 0;
  auto code = child_->Reap();
  child_.reset();
  return code.value_or(255);
}

void BackendStream::Stop() {
  fd_.Close();
  if (!child_) return;
  // EOF on its stdin ends `step-runner proxy` by itself; a command that ignores it is stopped.
  if (!ExitedWithin(*child_, 200)) {
    (void)child_->SignalGroup(SIGTERM);
    if (!ExitedWithin(*child_, 1000)) (void)child_->SignalGroup(SIGKILL);
  }
  (void)child_->Reap();
  child_.reset();
}

BackendStream::~BackendStream() { Stop(); }

}  // namespace step_runner::proxy

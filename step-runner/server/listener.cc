#include "step-runner/server/listener.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"

namespace step_runner::server {
namespace {

absl::StatusOr<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes: ", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

}  // namespace

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Bind(const std::string& path,
                                                                 std::set<uid_t> allowed_uids) {
  absl::StatusOr<sockaddr_un> addr = Address(path);
  if (!addr.ok()) return addr.status();
  const std::string dir = Dirname(path);  // "." for a bare name: nothing to make
  if (dir != ".") {
    if (absl::Status s = MakeDirs(dir, 0700); !s.ok()) return s;
  }

  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a socket"));
    }
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("another step-runner is already listening on ", path));
    }
    ::unlink(path.c_str());  // stale: its daemon is gone
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return ErrnoStatus(errno, "socket(AF_UNIX)");
  // The umask makes bind create the socket 0600 from the start: no window in which another
  // user could connect before a chmod.
  mode_t old_mask = ::umask(0177);
  int rc = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr);
  int bind_errno = errno;
  ::umask(old_mask);
  if (rc != 0) return ErrnoStatus(bind_errno, absl::StrCat("bind(", path, ")"));
  if (::chmod(path.c_str(), 0600) != 0) return ErrnoStatus(errno, absl::StrCat("chmod(", path, ")"));
  if (::listen(fd.get(), 128) != 0) return ErrnoStatus(errno, absl::StrCat("listen(", path, ")"));
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return ErrnoStatus(errno, "eventfd");
  return std::unique_ptr<UnixListener>(
      new UnixListener(path, std::move(fd), std::move(wake), std::move(allowed_uids)));
}

UnixListener::UnixListener(std::string path, UniqueFd fd, UniqueFd wake, std::set<uid_t> allowed)
    : path_(std::move(path)), fd_(std::move(fd)), wake_(std::move(wake)), allowed_uids_(std::move(allowed)) {}

UnixListener::~UnixListener() { Stop(); }

void UnixListener::Start(ConnectionHandler handler) {
  handler_ = std::move(handler);
  thread_ = std::thread([this] { AcceptLoop(); });
}

void UnixListener::Stop() {
  if (stopped_.exchange(true)) return;
  uint64_t one = 1;
  ssize_t unused = ::write(wake_.get(), &one, sizeof one);
  (void)unused;
  if (thread_.joinable()) thread_.join();
  ::unlink(path_.c_str());
  fd_.Close();
}

void UnixListener::AcceptLoop() {
  while (!stopped_.load()) {
    pollfd fds[2] = {{.fd = fd_.get(), .events = POLLIN}, {.fd = wake_.get(), .events = POLLIN}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno != EINTR) SR_PLOG(ERROR) << "poll(listener)";
      continue;
    }
    if (fds[1].revents) return;
    // Non-blocking, as gRPC's own listener accepts: gRPC reads until EAGAIN, and a blocking fd
    // would park one of its poller threads in recvmsg until the peer writes.
    UniqueFd conn(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!conn) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) SR_PLOG(WARNING) << "accept";
      if (errno == EMFILE || errno == ENFILE) ::usleep(100 * 1000);  // let fds free up
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      SR_PLOG(WARNING) << "getsockopt(SO_PEERCRED); refusing the connection";
      continue;
    }
    if (!allowed_uids_.count(cred.uid)) {
      SR_LOG(WARNING) << "refused a connection from uid " << cred.uid << " (pid " << cred.pid
                      << "): not an allowed uid (use --allow-uid)";
      continue;
    }
    handler_(std::move(conn), cred.pid, cred.uid);
  }
}

}  // namespace step_runner::server

#include "step-runner/process/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>

#include <cerrno>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "step-runner/base/files.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace step_runner::process {
namespace {

int PidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

}  // namespace

absl::StatusOr<std::string> FindExecutable(const std::string& name,
                                           const std::vector<std::string>& env) {
  if (name.empty()) return absl::InvalidArgumentError("empty command");
  if (name.find('/') != std::string::npos) return name;
  std::string path = "/usr/local/bin:/usr/bin:/bin";
  for (const std::string& entry : env) {
    if (entry.rfind("PATH=", 0) == 0) path = entry.substr(5);
  }
  for (absl::string_view dir : absl::StrSplit(path, ':')) {
    std::string candidate = absl::StrCat(dir.empty() ? "." : dir, "/", name);
    if (IsExecutableFile(candidate)) return candidate;
  }
  return absl::NotFoundError(absl::StrCat("command not found in PATH: ", name));
}

absl::StatusOr<Subprocess> Subprocess::Spawn(const SpawnOptions& options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::string program;
  if (auto found = FindExecutable(options.argv[0], options.env); found.ok()) {
    program = *found;
  } else {
    return found.status();
  }

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  absl::Cleanup destroy_actions = [&] { posix_spawn_file_actions_destroy(&actions); };
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  absl::Cleanup destroy_attr = [&] { posix_spawnattr_destroy(&attr); };

  if (options.fd3 >= 0 && options.fd3 <= 3) return absl::InvalidArgumentError("fd3 must be a descriptor above 3");
  if (options.fd4 >= 0 && (options.fd4 <= 4 || options.fd3 < 0)) {
    return absl::InvalidArgumentError("fd4 must be a descriptor above 4, with fd3 given");
  }
  const int wanted[3] = {options.stdin_fd, options.stdout_fd, options.stderr_fd};
  for (int target = 0; target < 3; ++target) {
    if (wanted[target] >= 0) {
      posix_spawn_file_actions_adddup2(&actions, wanted[target], target);
    } else if (wanted[target] != kInheritFd) {
      posix_spawn_file_actions_addopen(&actions, target, "/dev/null", target == 0 ? O_RDONLY : O_WRONLY, 0);
    }
  }
  if (options.fd3 >= 0) posix_spawn_file_actions_adddup2(&actions, options.fd3, 3);
  if (options.fd4 >= 0) posix_spawn_file_actions_adddup2(&actions, options.fd4, 4);
  // Nothing of the daemon's (sockets, logs, other jobs' pipes) leaks into a step.
  posix_spawn_file_actions_addclosefrom_np(&actions, options.fd4 >= 0 ? 5 : options.fd3 >= 0 ? 4 : 3);
  if (!options.work_dir.empty()) {
    posix_spawn_file_actions_addchdir_np(&actions, options.work_dir.c_str());
  }

  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  // SETSID: a new session and process group, so the step and all its descendants are one
  // killable group, detached from any controlling terminal of the daemon.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF |
                                      POSIX_SPAWN_SETSIGMASK);

  std::vector<char*> argv;
  for (const std::string& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const std::string& e : options.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  pid_t pid;
  // posix_spawn returns the error number; it does not set errno.
  int rc = ::posix_spawn(&pid, program.c_str(), &actions, &attr, argv.data(), envp.data());
  if (rc != 0) {
    return ErrnoStatus(rc, absl::StrCat("cannot run \"", options.argv[0], "\"",
                                        options.work_dir.empty() ? "" : " in ", options.work_dir));
  }
  UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    int err = errno;
    // Without a pidfd we cannot supervise it; do not leave it running unsupervised.
    ::kill(-pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return ErrnoStatus(err, "pidfd_open (needs Linux 5.3 or later)");
  }
  return Subprocess(pid, std::move(pidfd));
}

absl::Status Subprocess::SignalGroup(int signo) {
  if (::kill(-pid_, signo) != 0 && errno != ESRCH) {
    return ErrnoStatus(errno, absl::StrCat("kill(-", pid_, ", ", signo, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> Subprocess::Reap() {
  siginfo_t info{};
  for (;;) {
    if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info,
                 WEXITED) == 0) {
      break;
    }
    if (errno != EINTR) return ErrnoStatus(errno, "waitid(P_PIDFD)");
  }
  if (info.si_code == CLD_EXITED) return info.si_status;
  return 128 + info.si_status;
}

absl::StatusOr<uint64_t> ProcessStartTicks(pid_t pid) {
  auto stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return stat.status();
  // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
  size_t close = stat->rfind(')');
  if (close == std::string::npos) return absl::InternalError("malformed /proc/pid/stat");
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(*stat).substr(close + 2), ' ');
  // fields[0] is field 3 (state); starttime is field 22.
  uint64_t ticks;
  if (fields.size() < 20 || !absl::SimpleAtoi(fields[19], &ticks)) {
    return absl::InternalError("malformed /proc/pid/stat");
  }
  return ticks;
}

std::string BootId() {
  // Constant until the next boot; read once.
  static const std::string boot_id = [] {
    auto id = ReadFile("/proc/sys/kernel/random/boot_id");
    if (!id.ok()) return std::string();
    while (!id->empty() && id->back() == '\n') id->pop_back();
    return *id;
  }();
  return boot_id;
}

std::vector<pid_t> LiveProcessesInGroup(pid_t pgid) {
  std::vector<pid_t> live;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return live;
  while (struct dirent* entry = ::readdir(proc)) {
    pid_t pid;
    if (!absl::SimpleAtoi(entry->d_name, &pid)) continue;
    auto stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
    if (!stat.ok()) continue;
    size_t close = stat->rfind(')');
    if (close == std::string::npos) continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::string_view(*stat).substr(close + 2), ' ');
    // fields[0] is the state (field 3), fields[2] the pgid (field 5).
    pid_t group;
    if (fields.size() > 2 && fields[0] != "Z" && absl::SimpleAtoi(fields[2], &group) &&
        group == pgid) {
      live.push_back(pid);
    }
  }
  ::closedir(proc);
  return live;
}

absl::StatusOr<OutputPipe> MakeOutputPipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
  OutputPipe pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
  if (::fcntl(fds[0], F_SETFL, O_NONBLOCK) != 0) return ErrnoStatus(errno, "fcntl(O_NONBLOCK)");
  // A larger pipe means fewer wake-ups of the event loop for chatty steps; best effort.
  ::fcntl(fds[0], F_SETPIPE_SZ, 1 << 20);
  return pipe;
}

}  // namespace step_runner::process

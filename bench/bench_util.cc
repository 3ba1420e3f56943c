#include "bench/bench_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <numeric>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::bench {

std::string DefaultStepRunnerBinary() { return SR_BINARY_DIR "/step-runner/step-runner"; }

std::vector<std::string> Environment() {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  return env;
}

absl::StatusOr<std::unique_ptr<TempDir>> TempDir::Create(const std::string& parent) {
  std::string tmpl = parent + "/sr_bench.XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return ErrnoStatus(errno, absl::StrCat("mkdtemp(", tmpl, ")"));
  return std::unique_ptr<TempDir>(new TempDir(tmpl));
}

TempDir::~TempDir() { (void)RemoveTree(path_); }

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(
    const std::string& binary, const std::string& dir, const std::vector<std::string>& extra_args) {
  std::unique_ptr<DaemonProcess> daemon(new DaemonProcess());
  daemon->socket_ = dir + "/sr.sock";
  daemon->stderr_path_ = dir + "/daemon.stderr";
  UniqueFd err(::open(daemon->stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!err) return ErrnoStatus(errno, "open(daemon.stderr)");
  std::vector<std::string> argv = {binary,        "serve",       "--socket",  daemon->socket_,
                                   "--state-dir", dir + "/state", "--log-level", "warning"};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  auto child = process::Subprocess::Spawn(
      {.argv = argv, .env = Environment(), .stdout_fd = err.get(), .stderr_fd = err.get()});
  if (!child.ok()) return child.status();
  daemon->child_.emplace(*std::move(child));
  const absl::Time until = absl::Now() + absl::Seconds(20);
  while (absl::Now() < until) {
    if (daemon->stderr_output().find("step-runner is listening on socket") != std::string::npos) {
      return daemon;
    }
    pollfd pfd{.fd = daemon->child_->pidfd(), .events = POLLIN};
    if (::poll(&pfd, 1, 5) > 0) {
      daemon->exited_ = true;
      (void)daemon->child_->Reap();
      return absl::InternalError(absl::StrCat("the daemon exited at start: ", daemon->stderr_output()));
    }
  }
  return absl::DeadlineExceededError(
      absl::StrCat("the daemon did not become ready: ", daemon->stderr_output()));
}

DaemonProcess::~DaemonProcess() {
  if (child_ && !exited_) {
    (void)child_->SignalGroup(SIGKILL);
    (void)child_->Reap();
  }
}

client::ClientOptions DaemonProcess::ClientOptions() const {
  client::ClientOptions options;
  options.endpoint.socket_path = socket_;
  // A daemon that went away is a failed benchmark, not something to wait minutes for.
  options.reconnect_timeout = absl::Seconds(10);
  options.rpc_timeout = absl::Seconds(60);
  return options;
}

std::string DaemonProcess::stderr_output() const { return ReadFile(stderr_path_).value_or(""); }

absl::Status DaemonProcess::Stop(absl::Duration deadline) {
  if (exited_) return absl::OkStatus();
  ::kill(child_->pid(), SIGTERM);
  pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(deadline))) <= 0) {
    return absl::DeadlineExceededError("the daemon did not exit after SIGTERM");
  }
  exited_ = true;
  absl::StatusOr<int> code = child_->Reap();
  if (!code.ok()) return code.status();
  if (*code != 0) {
    return absl::InternalError(absl::StrCat("the daemon exited with code ", *code, ": ", stderr_output()));
  }
  return absl::OkStatus();
}

absl::StatusOr<MemoryUsage> ReadMemoryUsage(pid_t pid) {
  absl::StatusOr<std::string> status = ReadFile(absl::StrCat("/proc/", pid, "/status"));
  if (!status.ok()) return status.status();
  MemoryUsage usage;
  struct Field {
    absl::string_view prefix;
    int64_t* value;
    bool seen = false;
  };
  Field fields[] = {{"VmRSS:", &usage.rss_kib},
                    {"VmHWM:", &usage.hwm_kib},
                    {"RssAnon:", &usage.rss_anon_kib},
                    {"RssFile:", &usage.rss_file_kib}};
  for (absl::string_view line : absl::StrSplit(*status, '\n')) {
    for (Field& field : fields) {
      if (!absl::ConsumePrefix(&line, field.prefix)) continue;
      line = absl::StripAsciiWhitespace(line);
      absl::ConsumeSuffix(&line, "kB");
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), field.value)) {
        return absl::InternalError(absl::StrCat("malformed /proc/", pid, "/status line: ", line));
      }
      field.seen = true;
    }
  }
  for (const Field& field : fields) {
    if (!field.seen) return absl::InternalError(absl::StrCat("no ", field.prefix, " in /proc/", pid, "/status"));
  }
  return usage;
}

absl::StatusOr<CpuTime> ReadCpuTime(pid_t pid) {
  absl::StatusOr<std::string> stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return stat.status();
  // The command name (field 2) may hold spaces; the fields resume after the last ')'.
  size_t close = stat->rfind(')');
  if (close == std::string::npos || close + 2 > stat->size()) return absl::InternalError("malformed stat");
  std::vector<absl::string_view> fields = absl::StrSplit(absl::string_view(*stat).substr(close + 2), ' ');
  // fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17.
  int64_t ticks[4];
  if (fields.size() < 15) return absl::InternalError("malformed stat");
  for (int i = 0; i < 4; ++i) {
    if (!absl::SimpleAtoi(fields[11 + i], &ticks[i])) return absl::InternalError("malformed stat");
  }
  const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
  return CpuTime{.self = absl::Seconds((ticks[0] + ticks[1]) / hz),
                 .children = absl::Seconds((ticks[2] + ticks[3]) / hz)};
}

CpuTime OwnCpuTime() {
  auto total = [](int who) {
    rusage usage{};
    ::getrusage(who, &usage);
    return absl::DurationFromTimeval(usage.ru_utime) + absl::DurationFromTimeval(usage.ru_stime);
  };
  return CpuTime{.self = total(RUSAGE_SELF), .children = total(RUSAGE_CHILDREN)};
}

Summary Summarize(std::vector<double> sample) {
  Summary s;
  s.count = sample.size();
  if (sample.empty()) return s;
  std::sort(sample.begin(), sample.end());
  auto rank = [&](double p) {
    size_t index = static_cast<size_t>(std::ceil(p * static_cast<double>(sample.size())));
    return sample[std::clamp<size_t>(index, 1, sample.size()) - 1];
  };
  s.min = sample.front();
  s.p50 = rank(0.50);
  s.p90 = rank(0.90);
  s.p99 = rank(0.99);
  s.max = sample.back();
  s.mean = std::accumulate(sample.begin(), sample.end(), 0.0) / static_cast<double>(sample.size());
  return s;
}

std::string FilesystemType(const std::string& path) {
  struct statfs fs {};
  if (::statfs(path.c_str(), &fs) != 0) return "unknown";
  // Magic numbers from linux/magic.h (not included: it is not in every libc's headers).
  switch (static_cast<uint64_t>(fs.f_type)) {
    case 0xEF53:
      return "ext4";
    case 0x01021994:
      return "tmpfs";
    case 0x794c7630:
      return "overlayfs";
    case 0x58465342:
      return "xfs";
    case 0x9123683E:
      return "btrfs";
    default:
      return absl::StrCat("fs type 0x", absl::Hex(static_cast<uint64_t>(fs.f_type)));
  }
}

absl::StatusOr<int64_t> DrainToEof(const std::vector<int>& fds, size_t buffer_bytes, int sink) {
  // One buffer for the whole run: a fresh allocation of this size per call would be an mmap/munmap
  // pair per spawn, which the daemon (thread_local buffer) does not pay either.
  static thread_local std::string buffer;
  if (buffer.size() < buffer_bytes) buffer.resize(buffer_bytes);
  std::vector<pollfd> open;
  for (int fd : fds) open.push_back({.fd = fd, .events = POLLIN});
  int64_t total = 0;
  size_t remaining = open.size();
  while (remaining > 0) {
    if (::poll(open.data(), open.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "poll");
    }
    for (pollfd& p : open) {
      if (p.fd < 0 || p.revents == 0) continue;
      // Read until the pipe is empty, as the daemon does per wake-up.
      for (;;) {
        ssize_t n = ::read(p.fd, buffer.data(), buffer_bytes);
        if (n > 0) {
          total += n;
          if (sink >= 0) SR_RETURN_IF_ERROR(WriteAll(sink, absl::string_view(buffer.data(), static_cast<size_t>(n))));
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        if (n < 0) return ErrnoStatus(errno, "read");
        p.fd = -1;  // EOF: poll ignores negative fds
        --remaining;
        break;
      }
    }
  }
  return total;
}

std::vector<std::string> StepEnvironment() {
  std::vector<std::string> env;
  for (const char* name : {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LOGNAME", "USER", "SHELL",
                           "TERM", "TMPDIR", "TZ", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                           "http_proxy", "https_proxy", "no_proxy", "all_proxy"}) {
    if (const char* value = std::getenv(name)) env.push_back(absl::StrCat(name, "=", value));
  }
  if (!std::getenv("PATH")) env.push_back("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  return env;
}

}  // namespace step_runner::bench

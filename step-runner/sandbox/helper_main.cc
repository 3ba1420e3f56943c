// step-runner-sandbox: the small process between the daemon and bwrap, one per step.
//
//   step-runner-sandbox [--verdict FILE] [--output-limit N] ... [--netns] [--forward IP=HOST:PORT]...
//                       -- bwrap ARGS...
//   step-runner-sandbox --warm [limits, cgroup] -- bwrap ARGS... -- step-runner-sandbox --stub 3 --report 4
//   step-runner-sandbox --stub 3 --report 4 [--as-uid UID --as-gid GID]    (inside, see stub.cc)
//
// --warm (the daemon's pool, see README.md "Warm sandboxes"): bwrap starts at once; the step's
// per-step limits arrive later on stdin (a socket), its spec goes straight to the stub on fd 4
// (passed to the stub as fd 3), and the stub reports the step's exit code on a pipe. The helper
// then tells the daemon the exit code on its stdin and closes its output, so that the step is
// over for the daemon before the sandbox's teardown.
//
// It does what bwrap cannot:
//  - sets the step's rlimits and puts it in the job's cgroups, in the child before exec;
//  - counts the step's output (stdout + stderr, which it relays to the daemon) against the job's
//    budget, warns at 80%, and kills the step when the budget is spent: RLIMIT_FSIZE does not
//    apply to pipes, so the bytes must be counted where they pass;
//  - watches the cgroup: a warning at 80% of the memory limit, and a kill when forks are refused
//    (a fork bomb at pids.max otherwise spins forever);
//  - for `--network=allow`, makes the step's network namespace (loopback only) with a listener
//    per allowed host:port inside it, and relays those connections, from outside, to exactly
//    those destinations;
//  - writes why it killed the step to the verdict file, which the daemon turns into the job's
//    `resource_exhausted` error;
//  - forwards SIGTERM/SIGINT/SIGHUP (a graceful cancel) to the sandbox's processes, keeping
//    bwrap, in a process group of its own, out of it.
//
// A separate small binary, not the daemon re-invoked: the daemon links gRPC and takes ~15 ms to
// start, which would be most of a short step's cost; and it links no abseil (see helper_plan.h). It is single-threaded, so the fork below
// is safe (the rule against fork() is for the multi-threaded daemon); the child only makes
// syscalls before exec.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>
#include <cstdio>
#include <cstdlib>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "step-runner/base/unique_fd.h"
#include "step-runner/sandbox/cgroup_files.h"
#include "step-runner/sandbox/helper_plan.h"
#include "step-runner/sandbox/stub.h"

namespace step_runner::sandbox {
namespace {

constexpr int kExitSetupFailed = 126;
// A warm helper's fd 4: the stub's spec, which the daemon writes straight to the stub.
constexpr int kSpecFd = 4;
// What the stub says once bwrap has made its sandbox (then "<exit code>\n" when the step ends).
constexpr char kReady[] = "ready\n";
constexpr size_t kBuffer = 64 << 10;
using Clock = std::chrono::steady_clock;

// No abseil here (see helper_plan.h): a StrCat of our own.
template <typename... Parts>
std::string Cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Beside `path`, then renamed over it: the daemon reads all of it or nothing.
void WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (fd && WriteAll(fd.get(), text.data(), text.size()) && fd.Close()) ::rename(tmp.c_str(), path.c_str());
}

void Say(const std::string& text) {
  std::string line = Cat("step-runner: ", text, "\n");
  (void)WriteAll(STDERR_FILENO, line.data(), line.size());
}

// The daemon's warnings channel, when it gave us one (-1 otherwise).
int g_warnings_fd = -1;

// A budget warning: into the job's log like everything we say, and to the daemon, which
// records it as a WARNING step event.
void Warn(const std::string& text) {
  Say(Cat("warning: ", text));
  if (g_warnings_fd >= 0) {
    std::string line = text + "\n";
    (void)WriteAll(g_warnings_fd, line.data(), line.size());
  }
}

// --- the child: namespace, listeners, cgroup, rlimits, then bwrap --------------------------

[[noreturn]] void ChildFail(int fd, const std::string& what) {
  std::string line = Cat("step-runner: sandbox setup failed: ", what, ": ", std::strerror(errno), "\n");
  ssize_t unused = ::write(fd, line.data(), line.size());
  (void)unused;
  ::_exit(kExitSetupFailed);
}

void WriteProcFile(int err_fd, const char* path, const std::string& text) {
  UniqueFd fd(::open(path, O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    ChildFail(err_fd, path);
  }
}

// A network namespace of our own with loopback up. As root this needs nothing else; otherwise
// it comes with a user namespace that maps our uid to itself (bwrap then nests its own).
void EnterNetworkNamespace(int err_fd) {
  if (::unshare(CLONE_NEWNET) != 0) {
    if (errno != EPERM || ::getuid() == 0) ChildFail(err_fd, "unshare(CLONE_NEWNET)");
    const uid_t uid = ::getuid();
    const gid_t gid = ::getgid();
    if (::unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0) ChildFail(err_fd, "unshare(CLONE_NEWUSER|CLONE_NEWNET)");
    WriteProcFile(err_fd, "/proc/self/setgroups", "deny");
    WriteProcFile(err_fd, "/proc/self/uid_map", Cat(uid, " ", uid, " 1"));
    WriteProcFile(err_fd, "/proc/self/gid_map", Cat(gid, " ", gid, " 1"));
  }
  UniqueFd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (!s || ::ioctl(s.get(), SIOCGIFFLAGS, &ifr) != 0) ChildFail(err_fd, "SIOCGIFFLAGS(lo)");
  ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP | IFF_RUNNING);
  if (::ioctl(s.get(), SIOCSIFFLAGS, &ifr) != 0) ChildFail(err_fd, "SIOCSIFFLAGS(lo)");
}

// Listeners inside the namespace, handed to the parent over `channel` (SCM_RIGHTS).
void SendListeners(int err_fd, int channel, const std::vector<Forward>& forwards) {
  std::vector<UniqueFd> fds;
  for (const Forward& f : forwards) {
    UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1;
    ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(f.target.port);
    if (::inet_pton(AF_INET, f.listen_ip.c_str(), &addr.sin_addr) != 1) ChildFail(err_fd, f.listen_ip);
    if (::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(s.get(), 64) != 0) {
      ChildFail(err_fd, Cat("listen on ", f.listen_ip, ":", f.target.port));
    }
    fds.push_back(std::move(s));
  }
  std::vector<int> raw;
  for (const UniqueFd& fd : fds) raw.push_back(fd.get());
  char byte = 'L';
  iovec iov{.iov_base = &byte, .iov_len = 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * raw.size()));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * raw.size());
  std::memcpy(CMSG_DATA(cmsg), raw.data(), sizeof(int) * raw.size());
  if (::sendmsg(channel, &msg, 0) != 1) ChildFail(err_fd, "sendmsg(listeners)");
}

void SetLimit(int err_fd, int resource, uint64_t value, uint64_t hard_extra, const char* name) {
  if (value == 0) return;
  rlimit limit{.rlim_cur = value, .rlim_max = value + hard_extra};
  rlimit current;
  // Never above what we have: an unprivileged process cannot raise its hard limit.
  if (::getrlimit(resource, &current) == 0 && current.rlim_max != RLIM_INFINITY) {
    limit.rlim_max = std::min<rlim_t>(limit.rlim_max, current.rlim_max);
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_cur, limit.rlim_max);
  }
  if (::setrlimit(resource, &limit) != 0) ChildFail(err_fd, name);
}

[[noreturn]] void ChildMain(const HelperPlan& plan, const std::vector<std::string>& bwrap, int out_fd, int err_fd,
                            int channel, int stub_report) {
  if (plan.new_netns) {
    EnterNetworkNamespace(err_fd);
    SendListeners(err_fd, channel, plan.forwards);
  }
  JobCgroup cgroup{plan.cgroup_v2, plan.cgroup_v1_memory, plan.cgroup_v1_pids};
  if (std::string error; !JoinCgroup(cgroup, &error)) ChildFail(err_fd, error);
  SetLimit(err_fd, RLIMIT_AS, plan.rlimits.memory_bytes, 0, "RLIMIT_AS");
  // SIGXCPU at the soft limit, SIGKILL a little later for a step that catches it.
  SetLimit(err_fd, RLIMIT_CPU, plan.rlimits.cpu_seconds, 5, "RLIMIT_CPU");
  SetLimit(err_fd, RLIMIT_NPROC, plan.rlimits.processes, 0, "RLIMIT_NPROC");
  SetLimit(err_fd, RLIMIT_NOFILE, plan.rlimits.open_files, 0, "RLIMIT_NOFILE");
  if (::dup2(out_fd, STDOUT_FILENO) < 0 || ::dup2(err_fd, STDERR_FILENO) < 0) ChildFail(err_fd, "dup2");
  if (plan.warm) {
    // The stub's spec (our fd 4, from the daemon) on its fd 3 and its report channel on fd 4;
    // bwrap passes both through. The claim on our stdin is not for the sandbox.
    UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (::dup2(kSpecFd, 3) < 0 || ::dup2(stub_report, 4) < 0 || !null || ::dup2(null.get(), STDIN_FILENO) < 0) {
      ChildFail(err_fd, "dup2");
    }
  }
  std::vector<char*> argv;
  for (const std::string& a : bwrap) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // bwrap in a process group of its own: the daemon's SIGTERM to the step's group (ours) must not
  // reach it (it would die at once and, --die-with-parent, take the sandbox with it before the
  // step could shut down gracefully); we forward the signal to the step instead.
  ::setpgid(0, 0);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::execv(argv[0], argv.data());
  ChildFail(STDERR_FILENO, Cat("exec ", bwrap[0]));
}

// --- the parent: relay output and connections, watch limits ---------------------------------

std::vector<UniqueFd> ReceiveListeners(int channel, size_t count) {
  std::vector<UniqueFd> out;
  char byte;
  iovec iov{.iov_base = &byte, .iov_len = 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * count));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  if (::recvmsg(channel, &msg, MSG_CMSG_CLOEXEC) != 1) return out;  // the child failed and said why
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    std::vector<int> fds(n);
    std::memcpy(fds.data(), CMSG_DATA(c), n * sizeof(int));
    for (int fd : fds) out.emplace_back(fd);
  }
  return out;
}

// Connects to an allowed destination from outside the step's namespace.
UniqueFd Dial(const HostPort& target) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(target.host.c_str(), std::to_string(target.port).c_str(), &hints, &found) != 0) return UniqueFd();
  UniqueFd out;
  for (addrinfo* a = found; a != nullptr && !out; a = a->ai_next) {
    UniqueFd s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (s && ::connect(s.get(), a->ai_addr, a->ai_addrlen) == 0) out = std::move(s);
  }
  ::freeaddrinfo(found);
  return out;
}

struct Relay {
  UniqueFd inside;
  UniqueFd outside;
  bool inside_open = true;   // still reading from it
  bool outside_open = true;
};

class Helper {
 public:
  Helper(HelperPlan plan, pid_t child, UniqueFd pidfd, UniqueFd signals, UniqueFd out, UniqueFd err,
         std::vector<UniqueFd> listeners, UniqueFd stub_status, std::string stub_said)
      : plan_(std::move(plan)), child_(child), pidfd_(std::move(pidfd)), signals_(std::move(signals)),
        listeners_(std::move(listeners)), stub_status_(std::move(stub_status)), stub_said_(std::move(stub_said)) {
    streams_[0] = std::move(out);
    streams_[1] = std::move(err);
    cgroup_ = {plan_.cgroup_v2, plan_.cgroup_v1_memory, plan_.cgroup_v1_pids};
    baseline_ = ReadCounters(cgroup_);
  }

  int Run() {
    int status = 0;
    bool exited = false;
    bool reported_by_stub = false;
    Clock::time_point next_check = Clock::now() + std::chrono::milliseconds(100);
    Clock::time_point drain_until = Clock::time_point::max();
    // The stub may have reported before the claim was read to its end (a short step, and a
    // helper that waited for a CPU): its report is then in stub_said_ already, and the stub,
    // which keeps its end open until we are gone, sends nothing more.
    if (std::optional<int> code = StubStatusSaid()) {
      status = *code;
      reported_by_stub = true;
      DrainStreams();
    }
    while (!reported_by_stub && (streams_[0] || streams_[1] || !exited)) {
      std::vector<pollfd> fds;
      for (const UniqueFd& s : streams_) fds.push_back({.fd = s ? s.get() : -1, .events = POLLIN});
      fds.push_back({.fd = exited ? -1 : pidfd_.get(), .events = POLLIN});
      fds.push_back({.fd = signals_.get(), .events = POLLIN});
      fds.push_back({.fd = stub_status_ ? stub_status_.get() : -1, .events = POLLIN});
      for (const UniqueFd& l : listeners_) fds.push_back({.fd = l.get(), .events = POLLIN});
      for (const Relay& r : relays_) {
        fds.push_back({.fd = r.inside_open ? r.inside.get() : -1, .events = POLLIN});
        fds.push_back({.fd = r.outside_open ? r.outside.get() : -1, .events = POLLIN});
      }
      const bool watching = !cgroup_.empty() && !exited;
      int timeout = watching ? 100 : -1;
      if (exited) {
        timeout = static_cast<int>(std::max<int64_t>(
            0, std::chrono::duration_cast<std::chrono::milliseconds>(drain_until - Clock::now()).count()));
      }
      int n = ::poll(fds.data(), fds.size(), timeout);
      if (n < 0 && errno != EINTR) break;
      // Every 100 ms, not at every wake-up: reading the cgroup's files costs more than relaying
      // a chunk of output, and a short step would pay it on its way out.
      if (watching && Clock::now() >= next_check) {
        CheckCgroup();
        next_check = Clock::now() + std::chrono::milliseconds(100);
      }
      if (exited && Clock::now() >= drain_until) break;  // nothing of the step can still write
      if (n <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (fds[i].revents) Pump(i);
      }
      if (fds[2].revents && !exited) {
        siginfo_t info{};
        if (::waitid(static_cast<idtype_t>(P_PIDFD), pidfd_.get(), &info, WEXITED) == 0) {
          exited = true;
          status = info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
          drain_until = Clock::now() + std::chrono::seconds(2);
        }
      }
      if (fds[3].revents) ForwardSignals();
      if (fds[4].revents && !exited) {
        if (std::optional<int> code = ReadStubStatus()) {
          // The step is over and everything it wrote is in the pipes: take it and report now.
          // The sandbox's teardown (its namespaces and mounts, a few milliseconds in the
          // kernel) then happens after the step's result is out, not before.
          status = *code;
          reported_by_stub = true;
          DrainStreams();
          break;
        }
      }
      size_t at = 5;
      for (size_t i = 0; i < listeners_.size(); ++i, ++at) {
        if (fds[at].revents) Accept(i);
      }
      for (auto it = relays_.begin(); it != relays_.end();) {
        // New relays were appended after `fds` was built; they have no entries yet.
        if (at + 1 >= fds.size()) break;
        if (fds[at].revents) Copy(*it, true);
        if (fds[at + 1].revents) Copy(*it, false);
        at += 2;
        it = (!it->inside_open && !it->outside_open) ? relays_.erase(it) : std::next(it);
      }
    }
    // The namespace is gone; this is for anything that escaped it. After the stub's report
    // the namespace is still there (its processes are killed and its teardown waits for our
    // exit), nothing in it can leave its PID namespace, and the job's end removes the cgroup.
    if (!reported_by_stub) KillCgroup(cgroup_);
    // Only a step that failed can have been the OOM killer's (and reading the cgroup's files
    // is most of what a step that succeeded would wait for here).
    if (!verdict_ && status != 0 && ReadCounters(cgroup_).oom_kills > baseline_.oom_kills) {
      verdict_ = Cat("the memory limit of ", plan_.memory_limit, " bytes was reached (a process was killed by the OOM killer)");
    }
    if (!verdict_ && status == 128 + SIGXCPU) {
      verdict_ = Cat("the CPU time limit of ", plan_.rlimits.cpu_seconds, " s was reached");
    }
    if (verdict_) {
      // A step cut short did not succeed, even if what was left of it exited 0.
      if (status == 0) status = 128 + SIGKILL;
      Say(Cat("resource limit: ", *verdict_));
      if (!plan_.verdict_path.empty()) WriteFileAtomically(plan_.verdict_path, *verdict_);
    }
    if (reported_by_stub) {  // only a warm sandbox's stub reports
      // Everything is said: the step's output is relayed and the verdict written. The daemon
      // learns the step's end on our stdin (its claim channel) and closes it once it is done
      // with the step; the sandbox is torn down after that (see stub.cc).
      ::close(STDOUT_FILENO);
      ::close(STDERR_FILENO);
      const std::string report = Cat(status, "\n");
      if (WriteAll(STDIN_FILENO, report.data(), report.size())) {
        // Until the daemon closes the socket (POLLHUP; it shut its side for writing long ago).
        pollfd closed{.fd = STDIN_FILENO, .events = 0};
        (void)::poll(&closed, 1, 10'000);
      }
    }
    return status;
  }

 private:
  void Kill(std::string why) {
    if (verdict_) return;
    verdict_ = std::move(why);
    // The outer bwrap's death takes the namespace's init with it (--die-with-parent), and the
    // kernel then kills every process in the namespace.
    ::kill(child_, SIGKILL);
    KillCgroup(cgroup_);
  }

  // Every process below bwrap (so, in the sandbox), whatever its session or group: from the
  // parent links in /proc, which also covers what the namespace's init adopted.
  std::vector<pid_t> SandboxProcesses() const {
    std::multimap<pid_t, pid_t> children;
    if (DIR* proc = ::opendir("/proc")) {
      while (struct dirent* e = ::readdir(proc)) {
        char* end = nullptr;
        long pid = std::strtol(e->d_name, &end, 10);
        if (*end != '\0' || pid <= 0) continue;
        std::string stat = ReadSmallFile(Cat("/proc/", pid, "/stat"));
        size_t paren = stat.rfind(')');
        if (paren == std::string::npos) continue;
        char state;
        long ppid = 0;
        if (std::sscanf(stat.c_str() + paren + 1, " %c %ld", &state, &ppid) == 2) {
          children.emplace(static_cast<pid_t>(ppid), static_cast<pid_t>(pid));
        }
      }
      ::closedir(proc);
    }
    std::vector<pid_t> out, queue = {child_};
    while (!queue.empty()) {
      pid_t parent = queue.back();
      queue.pop_back();
      for (auto [it, end] = children.equal_range(parent); it != end; ++it) {
        out.push_back(it->second);
        queue.push_back(it->second);
      }
    }
    return out;
  }

  void ForwardSignals() {
    signalfd_siginfo info;
    while (::read(signals_.get(), &info, sizeof info) == sizeof info) {
      // Not to bwrap itself (it would die at once); the namespace's init ignores it (the kernel
      // drops default-action signals to a namespace init from outside), the step gets it.
      for (pid_t pid : SandboxProcesses()) ::kill(pid, static_cast<int>(info.ssi_signo));
    }
  }

  // Relays what one read of stream `i` gives; false when there was nothing (yet).
  bool Pump(int i) {
    char buffer[kBuffer];
    ssize_t n = ::read(streams_[i].get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) return true;
    if (n < 0 && errno == EAGAIN) return false;
    if (n <= 0) {
      streams_[i].Reset();
      return false;
    }
    size_t keep = static_cast<size_t>(n);
    if (plan_.output_limit > 0 && relayed_ + keep > plan_.output_limit) keep = plan_.output_limit - relayed_;
    if (verdict_) keep = 0;  // a killed step's last bytes are not kept either
    if (keep > 0 && !WriteAll(i == 0 ? STDOUT_FILENO : STDERR_FILENO, buffer, keep)) {
      Kill("its output could not be delivered");
    }
    relayed_ += keep;
    const uint64_t total = plan_.output_used + relayed_;
    if (plan_.output_budget > 0 && !output_warned_ && total * 5 >= plan_.output_budget * 4) {
      output_warned_ = true;
      Warn(Cat("the job's output reached 80% of its budget (", total, " of ", plan_.output_budget,
                       " bytes)"));
    }
    if (keep < static_cast<size_t>(n) && !verdict_) {
      Kill(Cat("the output limit of ", plan_.output_budget, " bytes was reached"));
    }
    return true;
  }

  // What the step printed and is still in the pipes (all of it, once the stub has reported).
  void DrainStreams() {
    for (int i = 0; i < 2; ++i) {
      while (streams_[i] && Pump(i)) {
      }
    }
  }

  // The stub's "<exit code>\n" once the step has ended (a warm sandbox); nullopt until then,
  // and for good when the stub is gone without saying (bwrap's own exit then tells).
  std::optional<int> ReadStubStatus() {
    char buffer[32];
    ssize_t n = ::read(stub_status_.get(), buffer, sizeof buffer);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return std::nullopt;
    if (n <= 0) {
      stub_status_.Reset();
      return StubStatusSaid();
    }
    stub_said_.append(buffer, static_cast<size_t>(n));
    return StubStatusSaid();
  }

  // The step's exit code, once the stub's report line is whole in stub_said_.
  std::optional<int> StubStatusSaid() {
    if (stub_said_.rfind(kReady, 0) == 0) stub_said_.erase(0, sizeof kReady - 1);  // said before the claim came
    size_t newline = stub_said_.find('\n');
    if (newline == std::string::npos) {
      if (stub_said_.size() > 16) stub_status_.Reset();
      return std::nullopt;
    }
    char* end = nullptr;
    long code = std::strtol(stub_said_.c_str(), &end, 10);
    if (end != stub_said_.c_str() + newline || code < 0 || code > 255) {
      stub_status_.Reset();
      return std::nullopt;
    }
    return static_cast<int>(code);
  }

  void CheckCgroup() {
    CgroupCounters now = ReadCounters(cgroup_);
    if (plan_.memory_limit > 0 && !memory_warned_ && now.memory_current * 5 >= plan_.memory_limit * 4) {
      memory_warned_ = true;
      Warn(Cat("the job's memory use reached 80% of its limit (", now.memory_current, " of ",
                       plan_.memory_limit, " bytes)"));
    }
    if (now.fork_refusals > baseline_.fork_refusals) {
      Kill(Cat("the process limit of ", plan_.process_limit, " was reached (a fork was refused)"));
    }
  }

  void Accept(size_t i) {
    UniqueFd inside(::accept4(listeners_[i].get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!inside) return;
    UniqueFd outside = Dial(plan_.forwards[i].target);
    if (!outside) return;  // the step sees a closed connection
    relays_.push_back({std::move(inside), std::move(outside)});
  }

  void Copy(Relay& r, bool from_inside) {
    UniqueFd& from = from_inside ? r.inside : r.outside;
    UniqueFd& to = from_inside ? r.outside : r.inside;
    bool& open = from_inside ? r.inside_open : r.outside_open;
    char buffer[kBuffer];
    ssize_t n = ::read(from.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) return;
    if (n <= 0 || !WriteAll(to.get(), buffer, static_cast<size_t>(n))) {
      open = false;
      ::shutdown(to.get(), SHUT_WR);  // pass the half-close on
    }
  }

  const HelperPlan plan_;
  const pid_t child_;
  UniqueFd pidfd_;
  UniqueFd signals_;
  UniqueFd streams_[2];
  std::vector<UniqueFd> listeners_;
  UniqueFd stub_status_;  // a warm sandbox's stub reports the step's exit here
  std::string stub_said_;
  std::list<Relay> relays_;
  JobCgroup cgroup_;
  CgroupCounters baseline_;
  uint64_t relayed_ = 0;
  bool output_warned_ = false;
  bool memory_warned_ = false;
  std::optional<std::string> verdict_;
};

// A warm helper's wait for its step: the claim arrives on stdin, whole, then EOF. Meanwhile
// the stub says "ready" on `report` once bwrap has made the sandbox, and the daemon hears "R"
// on stdin (it gives steps only sandboxes that are ready). nullopt when the sandbox died
// meanwhile or the daemon let it go (EOF with nothing).
std::optional<WarmClaim> AwaitClaim(int pidfd, int report, std::string* stub_said) {
  std::string text;
  bool report_open = true;
  for (;;) {
    pollfd fds[3] = {{.fd = STDIN_FILENO, .events = POLLIN},
                     {.fd = pidfd, .events = POLLIN},
                     {.fd = report_open ? report : -1, .events = POLLIN}};
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      return std::nullopt;
    }
    if (fds[2].revents) {
      char buffer[64];
      ssize_t n = ::read(report, buffer, sizeof buffer);
      if (n > 0) {
        stub_said->append(buffer, static_cast<size_t>(n));
        if (stub_said->rfind(kReady, 0) == 0) {
          stub_said->erase(0, sizeof kReady - 1);
          (void)WriteAll(STDIN_FILENO, "R", 1);
        }
      } else if (n == 0 || errno != EAGAIN) {
        report_open = false;  // the stub is gone: bwrap's exit follows
      }
    }
    if (fds[0].revents) {
      char buffer[kBuffer];
      ssize_t n = ::read(STDIN_FILENO, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return std::nullopt;
      if (n > 0) {
        text.append(buffer, static_cast<size_t>(n));
        continue;
      }
      if (text.empty()) return std::nullopt;
      WarmClaim claim;
      if (!DecodeClaim(text, &claim)) {
        Say("sandbox setup failed: the daemon's claim is malformed");
        return std::nullopt;
      }
      return claim;
    }
    // bwrap ended before a step came: it could not make the sandbox (what it said went to the
    // daemon's pipe, unread), or it was killed.
    if (fds[1].revents) return std::nullopt;
  }
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--stub") return StubMain(args);
  std::vector<std::string> bwrap;
  std::optional<HelperPlan> plan(std::in_place);
  if (std::string error; !ParseHelperArgv(args, &*plan, &bwrap, &error)) {
    Say(Cat("step-runner-sandbox: ", error));
    return 2;
  }
  if (plan->warnings_fd3 && ::fcntl(3, F_SETFD, FD_CLOEXEC) == 0) g_warnings_fd = 3;
  // Ours to pass on, not to keep (see ChildMain).
  if (plan->warm && ::fcntl(kSpecFd, F_SETFD, FD_CLOEXEC) != 0) {
    Say("step-runner-sandbox: --warm needs the stub's spec on fd 4");
    return 2;
  }
  int out[2], err[2], channel[2] = {-1, -1}, report[2] = {-1, -1};
  if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0 ||
      (plan->new_netns && ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, channel) != 0) ||
      (plan->warm && ::pipe2(report, O_CLOEXEC | O_NONBLOCK) != 0)) {
    Say(Cat("sandbox setup failed: ", std::strerror(errno)));
    return kExitSetupFailed;
  }
  UniqueFd out_r(out[0]), out_w(out[1]), err_r(err[0]), err_w(err[1]), chan_parent(channel[0]), chan_child(channel[1]);
  UniqueFd report_r(report[0]), report_w(report[1]);
  // Cancelling a job signals its process group, which is ours alone: we pass SIGTERM (or INT,
  // HUP) on to every process of the sandbox and keep relaying what the step prints until it is
  // gone. SIGKILL still ends us, and --die-with-parent then ends the sandbox. Blocked before the
  // fork so none is lost in between; the child unblocks them before exec.
  sigset_t forwarded;
  sigemptyset(&forwarded);
  for (int signo : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&forwarded, signo);
  ::sigprocmask(SIG_BLOCK, &forwarded, nullptr);
  UniqueFd signals(::signalfd(-1, &forwarded, SFD_CLOEXEC | SFD_NONBLOCK));
  const pid_t child = ::fork();
  if (child < 0) {
    Say(Cat("sandbox setup failed: fork: ", std::strerror(errno)));
    return kExitSetupFailed;
  }
  if (child == 0) ChildMain(*plan, bwrap, out_w.get(), err_w.get(), chan_child.get(), report_w.get());
  out_w.Close();
  err_w.Close();
  chan_child.Close();
  report_w.Close();
  if (plan->warm) ::close(kSpecFd);
  ::signal(SIGPIPE, SIG_IGN);
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, child, 0)));
  if (!pidfd) {
    ::kill(child, SIGKILL);
    Say(Cat("sandbox setup failed: pidfd_open: ", std::strerror(errno)));
    return kExitSetupFailed;
  }
  std::string stub_said;
  if (plan->warm) {
    // bwrap builds the sandbox meanwhile. The step's spec goes to the stub at the same time as
    // this claim to us, and waits in its pipe if the sandbox is not done yet.
    std::optional<WarmClaim> claim = AwaitClaim(pidfd.get(), report_r.get(), &stub_said);
    if (!claim) {
      // bwrap's whole process group: killed while it is still making the sandbox, bwrap can
      // leave its namespace's first process waiting for it forever (one was found orphaned
      // under pid 1, blocked on bwrap's eventfd; it is in the group until the sandbox is made).
      ::kill(-child, SIGKILL);
      ::kill(child, SIGKILL);
      siginfo_t info{};
      (void)::waitid(static_cast<idtype_t>(P_PIDFD), pidfd.get(), &info, WEXITED);
      return kExitSetupFailed;
    }
    plan->verdict_path = claim->verdict_path;
    plan->output_limit = claim->output_limit;
    plan->output_budget = claim->output_budget;
    plan->output_used = claim->output_used;
  }
  std::vector<UniqueFd> listeners;
  if (plan->new_netns) listeners = ReceiveListeners(chan_parent.get(), plan->forwards.size());
  for (int fd : {out_r.get(), err_r.get()}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  Helper helper(*std::move(plan), child, std::move(pidfd), std::move(signals), std::move(out_r), std::move(err_r),
                std::move(listeners), std::move(report_r), std::move(stub_said));
  return helper.Run();
}

}  // namespace
}  // namespace step_runner::sandbox

int main(int argc, char** argv) { return step_runner::sandbox::Main(argc, argv); }

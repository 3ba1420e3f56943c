// The stub: the first process inside a warm sandbox (`step-runner-sandbox --stub 3 --report 4`).
//
// bwrap made the sandbox before its step was known: the read-only system, /dev, /proc, the
// private /tmp, every namespace, and the host's root at kWarmHostRoot. The stub forks the step's
// process at once; that process waits on fd 3 for its StubSpec (which the daemon writes when a
// step takes the sandbox), then, in this order:
//  1. makes the step's mounts (the same list bwrap gets for a cold sandbox: ViewMounts), with
//     sources taken from the host's root;
//  2. detaches the host's root, so nothing of the host is reachable but what was bound;
//  3. for an unprivileged daemon, moves into a user namespace of its own that maps the daemon's
//     uid back (it ran as uid 0 to be allowed to mount), as bwrap does after its own setup;
//  4. drops every capability (bounding set, ambient, effective, permitted, inheritable);
//  5. changes to the step's folder and becomes the step (execve with the step's env).
// The stub itself drops its capabilities, waits for the step and reports its exit code on fd 4
// to the helper, which can then answer for the step before the sandbox is torn down.
// Until then only this code runs in the sandbox. no_new_privs was set by bwrap, so nothing the
// step execs can gain capabilities back.
#include "step-runner/sandbox/stub.h"

#include <fcntl.h>
#include <poll.h>
#include <linux/capability.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "step-runner/base/unique_fd.h"
#include "step-runner/sandbox/helper_plan.h"

namespace step_runner::sandbox {
namespace {

constexpr int kExitSetupFailed = 126;

// What the kernel's mount_setattr takes (named apart from glibc's, whose <sys/mount.h> version
// depends on the glibc release).
struct MountAttributes {
  uint64_t attr_set;
  uint64_t attr_clr;
  uint64_t propagation;
  uint64_t userns_fd;
};
constexpr uint64_t kAttrReadOnly = 0x1;  // MOUNT_ATTR_RDONLY
constexpr uint64_t kAttrNoSuid = 0x2;    // MOUNT_ATTR_NOSUID
constexpr uint64_t kAttrNoDev = 0x4;     // MOUNT_ATTR_NODEV
constexpr unsigned kAtRecursive = 0x8000;

[[noreturn]] void Fail(const std::string& what) {
  std::string line = "step-runner: sandbox setup failed: " + what + ": " + std::strerror(errno) + "\n";
  ssize_t unused = ::write(STDERR_FILENO, line.data(), line.size());
  (void)unused;
  ::_exit(kExitSetupFailed);
}

bool ReadAll(int fd, std::string* out) {
  char buffer[64 << 10];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    out->append(buffer, static_cast<size_t>(n));
  }
}

void WriteFile(const char* path, const std::string& text) {
  UniqueFd fd(::open(path, O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) Fail(path);
}

// Creates the folders of `path` that are missing (inside a tmpfs that hides a parent, or the
// private /tmp: the read-only system has every folder the host has).
void MakeParents(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1)) {
    std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) Fail("mkdir " + dir);
  }
}

// A mount point of the kind the source is: a folder, or an (empty) file.
void MakeMountPoint(const std::string& target, bool is_dir) {
  MakeParents(target);
  struct stat st;
  if (::lstat(target.c_str(), &st) == 0) return;
  if (is_dir) {
    if (::mkdir(target.c_str(), 0755) != 0 && errno != EEXIST) Fail("mkdir " + target);
  } else {
    UniqueFd fd(::open(target.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    if (!fd) Fail("create " + target);
  }
}

// nosuid and nodev (and read-only) on the bind and everything below it, as bwrap sets them.
void Restrict(const std::string& target, bool read_only) {
  MountAttributes attributes{.attr_set = kAttrNoSuid | kAttrNoDev | (read_only ? kAttrReadOnly : 0),
                             .attr_clr = 0, .propagation = 0, .userns_fd = 0};
  if (::syscall(SYS_mount_setattr, AT_FDCWD, target.c_str(), kAtRecursive, &attributes, sizeof attributes) == 0) {
    return;
  }
  if (errno != ENOSYS) Fail("mount_setattr " + target);
  // Before Linux 5.12: the bind itself (mounts below it keep their flags).
  unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (read_only ? MS_RDONLY : 0);
  if (::mount(nullptr, target.c_str(), nullptr, flags, nullptr) != 0) Fail("remount " + target);
}

void Apply(const MountOp& op) {
  switch (op.kind) {
    case MountOp::kBind:
    case MountOp::kReadOnlyBind: {
      const std::string source = std::string(kWarmHostRoot) + op.source;
      struct stat st;
      if (::stat(source.c_str(), &st) != 0) Fail("cannot find " + op.source);
      MakeMountPoint(op.target, S_ISDIR(st.st_mode));
      if (::mount(source.c_str(), op.target.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
        Fail("bind " + op.source);
      }
      Restrict(op.target, op.kind == MountOp::kReadOnlyBind);
      return;
    }
    case MountOp::kTmpfs:
      MakeMountPoint(op.target, true);
      if (::mount("tmpfs", op.target.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") != 0) {
        Fail("tmpfs over " + op.target);
      }
      return;
    case MountOp::kHideFile:
      MakeMountPoint(op.target, false);
      if (::mount("/dev/null", op.target.c_str(), nullptr, MS_BIND, nullptr) != 0) Fail("hide " + op.target);
      Restrict(op.target, true);
      return;
  }
}

// Back to the daemon's uid, in a user namespace nested in bwrap's (where the stub is uid 0).
void BecomeUser(const std::string& uid, const std::string& gid) {
  if (::unshare(CLONE_NEWUSER) != 0) Fail("unshare(CLONE_NEWUSER)");
  WriteFile("/proc/self/setgroups", "deny");
  WriteFile("/proc/self/uid_map", uid + " 0 1");
  WriteFile("/proc/self/gid_map", gid + " 0 1");
  // The ids the step runs as (the namespace's creator is its root until it says otherwise).
  const uid_t u = static_cast<uid_t>(std::strtoul(uid.c_str(), nullptr, 10));
  const gid_t g = static_cast<gid_t>(std::strtoul(gid.c_str(), nullptr, 10));
  if (::setresgid(g, g, g) != 0 || ::setresuid(u, u, u) != 0) Fail("setresuid");
}

void DropCapabilities() {
  for (int cap = 0; cap <= 63; ++cap) {
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL && errno != EPERM) Fail("PR_CAPBSET_DROP");
  }
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) Fail("PR_CAP_AMBIENT");
  __user_cap_header_struct header{.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capset, &header, data) != 0) Fail("capset");
}

// After the fork, the first write to each page of this process's memory copies it, and the
// first run of each page of code maps it: a page fault each, which in a VM costs tens of
// microseconds (half a millisecond in all, measured, between the spec's arrival and the first
// mount). Going through the same motions once while the sandbox waits for its step takes them
// off the step's way in: the stack as deep as ReadAll's buffer, the heap as big as a spec, and
// the decoder's code.
void Rehearse() {
  volatile char stack[96 << 10];
  for (size_t i = 0; i < sizeof stack; i += 4096) stack[i] = 0;
  std::string heap(48 << 10, 'x');
  StubSpec sample{.mounts = {{MountOp::kBind, heap.substr(0, 256), "/x"}, {MountOp::kTmpfs, "", "/y"}},
                  .cwd = "/",
                  .argv = {"/bin/true", heap.substr(0, 1024)},
                  .env = {heap.substr(0, 4096), "A=B"}};
  StubSpec decoded;
  (void)DecodeStubSpec(EncodeStubSpec(sample), &decoded);
  struct stat st;
  (void)::stat(kWarmHostRoot, &st);
}

}  // namespace

namespace {

// The step's process, forked before the step is known: it waits for the spec, makes the mounts
// and becomes the step.
[[noreturn]] void StepMain(int spec_fd, const std::string& uid, const std::string& gid) {
  Rehearse();
  std::string text;
  const bool read = ReadAll(spec_fd, &text);
  ::close(spec_fd);
  // The daemon let this sandbox go unused.
  if (read && text.empty()) ::_exit(0);
  StubSpec spec;
  if (!read || !DecodeStubSpec(text, &spec)) {
    errno = EPROTO;
    Fail("the step's spec did not arrive whole");
  }
  for (const MountOp& op : spec.mounts) Apply(op);
  if (::umount2(kWarmHostRoot, MNT_DETACH) != 0) Fail("detach the host's root");
  ::rmdir(kWarmHostRoot);
  if (!uid.empty()) BecomeUser(uid, gid);
  DropCapabilities();
  if (!spec.cwd.empty() && ::chdir(spec.cwd.c_str()) != 0) Fail("cannot enter " + spec.cwd);
  std::vector<char*> argv, env;
  for (std::string& a : spec.argv) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (std::string& e : spec.env) env.push_back(e.data());
  env.push_back(nullptr);
  ::execve(argv[0], argv.data(), env.data());
  const int error = errno;
  std::string line = "step-runner: cannot run " + spec.argv[0] + ": " + std::strerror(error) + "\n";
  ssize_t unused = ::write(STDERR_FILENO, line.data(), line.size());
  (void)unused;
  ::_exit(error == ENOENT ? 127 : 126);
}

}  // namespace

int StubMain(const std::vector<std::string>& args) {
  int spec_fd = -1, report_fd = -1;
  std::string uid, gid;
  for (size_t i = 0; i + 1 < args.size(); i += 2) {
    if (args[i] == "--stub") spec_fd = std::atoi(args[i + 1].c_str());
    if (args[i] == "--report") report_fd = std::atoi(args[i + 1].c_str());
    if (args[i] == "--as-uid") uid = args[i + 1];
    if (args[i] == "--as-gid") gid = args[i + 1];
  }
  if (spec_fd < 3 || report_fd < 3 || uid.empty() != gid.empty()) {
    errno = EINVAL;
    Fail("usage: step-runner-sandbox --stub FD --report FD [--as-uid UID --as-gid GID]");
  }
  ::fcntl(report_fd, F_SETFD, FD_CLOEXEC);
  // The step's process is made now, before the step is known, so that a claim wakes a process
  // that is ready to mount and exec: no fork (and no wait for a CPU to pick the child up) on
  // the step's way in.
  const pid_t step = ::fork();
  if (step < 0) Fail("fork");
  if (step == 0) {
    ::close(report_fd);
    StepMain(spec_fd, uid, gid);
  }
  ::close(spec_fd);
  // This process waits beside the step for as long as it runs: nothing it holds is for the
  // step (no capabilities, nothing to trace or to read through /proc).
  DropCapabilities();
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  // bwrap is done: the sandbox can take a step.
  ssize_t said = ::write(report_fd, "ready\n", 6);
  (void)said;
  // The helper passes SIGTERM, SIGINT and SIGHUP to every process in the sandbox, this one
  // included: they are the step's to act on.
  struct sigaction ignore{};
  ignore.sa_handler = [](int) {};
  for (int signo : {SIGTERM, SIGINT, SIGHUP}) ::sigaction(signo, &ignore, nullptr);
  // The step is done when its process is: the helper answers for it at once, and the
  // sandbox's teardown (this exit, then bwrap's, then the kernel's) follows after.
  int status = 0;
  while (::waitpid(step, &status, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  const std::string report = std::to_string(code) + "\n";
  ssize_t unused = ::write(report_fd, report.data(), report.size());
  (void)unused;
  // Whatever the step left running dies with it (everything here but bwrap's init and us).
  ::kill(-1, SIGKILL);
  // The sandbox's teardown starts when this process exits. It waits until the helper is gone,
  // which is after the daemon has the step's end: the kernel's work of undoing namespaces and
  // mounts then does not stand between the step and its result.
  pollfd gone{.fd = report_fd, .events = 0};
  (void)::poll(&gone, 1, 30'000);
  ::_exit(code);
}

}  // namespace step_runner::sandbox

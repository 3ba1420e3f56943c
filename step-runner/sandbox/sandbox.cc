#include "step-runner/sandbox/sandbox.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cerrno>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::sandbox {
namespace {

constexpr char kVerdictFile[] = "/sandbox.verdict";
// How long the pool waits after a step starts or ends before it makes sandboxes (see TakeWarm),
// and after a step started in a sandbox of its own (bwrap takes ~15-30 ms on 2 cores).
constexpr absl::Duration kQuietBeforeRefill = absl::Milliseconds(20);
constexpr absl::Duration kQuietAfterColdStart = absl::Milliseconds(60);

// nullopt when `path` does not exist.
std::optional<HiddenPath> Existing(const std::string& path) {
  struct stat st;
  if (path.empty() || ::lstat(path.c_str(), &st) != 0) return std::nullopt;
  return HiddenPath{path, S_ISDIR(st.st_mode)};
}

// `path` with every link on the way followed (itself when it does not exist yet).
std::string Resolved(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (real == nullptr) return path;
  std::string out = real;
  ::free(real);
  return out;
}

// Runs `argv` to the end (or `deadline`) and returns its exit code and what it wrote.
absl::StatusOr<std::pair<int, std::string>> RunProbe(const std::vector<std::string>& argv, absl::Duration deadline) {
  SR_ASSIGN_OR_RETURN(process::OutputPipe pipe, process::MakeOutputPipe());
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = argv,
                                                  .env = {"PATH=/usr/local/bin:/usr/bin:/bin"},
                                                  .stdout_fd = pipe.write_end.get(),
                                                  .stderr_fd = pipe.write_end.get()}));
  pipe.write_end.Close();
  std::string output;
  const absl::Time until = absl::Now() + deadline;
  for (;;) {
    int left = static_cast<int>(absl::ToInt64Milliseconds(until - absl::Now()));
    pollfd pfd{.fd = pipe.read_end.get(), .events = POLLIN};
    if (left <= 0 || ::poll(&pfd, 1, left) == 0) {
      (void)child.SignalGroup(SIGKILL);
      (void)child.Reap();
      return absl::DeadlineExceededError(absl::StrCat("the sandbox probe did not finish in time: ", output));
    }
    char buf[4096];
    ssize_t n = ::read(pipe.read_end.get(), buf, sizeof buf);
    if (n > 0) {
      output.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EAGAIN) {
      break;
    }
  }
  SR_ASSIGN_OR_RETURN(int code, child.Reap());
  return std::make_pair(code, output);
}

std::string PolicyText(const Limits& l) {
  return absl::StrCat("bwrap memory=", l.memory_bytes, " cpu=", l.cpu_seconds, "s procs=", l.processes,
                      " files=", l.open_files, " output=", l.output_bytes);
}

// The paths of `hide` that exist, less those another one covers (for a step with `work_tree`,
// or none: ""). Each as the kernel finds it: a mount on a symlink's own path lands where the
// link points, so a link is hidden as what it points to (and a link to a folder as a folder).
std::vector<HiddenPath> HiddenPaths(std::vector<std::string> hide, const std::string& work_tree) {
  for (std::string& path : hide) {
    if (!path.empty()) path = Resolved(path);
  }
  std::vector<HiddenPath> hidden;
  for (const std::string& path : hide) {
    if (path.empty() || path[0] != '/' || path == "/" || path == work_tree) continue;
    // Inside another hidden folder it is gone already (unless our tree brings it back).
    bool covered = false;
    for (const std::string& other : hide) {
      covered = covered || (other != path && !other.empty() && other != "/" && Within(path, other) &&
                            (work_tree.empty() || !Within(path, work_tree)));
    }
    if (covered) continue;
    if (std::optional<HiddenPath> h = Existing(path)) hidden.push_back(*h);
  }
  return hidden;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Sandbox>> Sandbox::Create(SandboxOptions options) {
  std::unique_ptr<Sandbox> sandbox(new Sandbox(std::move(options)));
  SR_RETURN_IF_ERROR(sandbox->Init());
  return sandbox;
}

Sandbox::~Sandbox() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (refill_thread_.joinable()) refill_thread_.join();  // finishes the sandbox it is making
  std::deque<WarmSandbox> unused;
  {
    absl::MutexLock lock(&mu_);
    unused.swap(warm_);
  }
  for (WarmSandbox& warm : unused) Discard(std::move(warm));
  cleanup_.reset();  // runs what is queued
  cgroups_.RemoveAll();
}

absl::Status Sandbox::Init() {
  if (options_.bwrap.empty()) {
    absl::StatusOr<std::string> found =
        process::FindExecutable("bwrap", {absl::StrCat("PATH=", getenv("PATH") ? getenv("PATH") : "/usr/bin:/bin")});
    if (!found.ok()) {
      return absl::FailedPreconditionError(
          "bubblewrap (bwrap) is not installed, and steps run under it by default: install it (apt-get install "
          "bubblewrap), or start the daemon with --sandbox=none in a setup where steps are trusted");
    }
    options_.bwrap = *found;
  }
  if (options_.helper.empty()) options_.helper = OwnBinaryDir() + "/step-runner-sandbox";
  // Absolute and without links: a warm sandbox runs it as kWarmHostRoot + this path.
  if (char* real = ::realpath(options_.helper.c_str(), nullptr)) {
    options_.helper = real;
    ::free(real);
  }
  if (::access(options_.helper.c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("the sandbox helper ", options_.helper,
                                                      " is missing; it is installed beside step-runner"));
  }
  if (options_.network == NetworkMode::kAllow) {
    forwards_ = PlanForwards(options_.allowed);
    hosts_file_ = absl::StrCat(options_.state_dir, "/sandbox-hosts");
    SR_RETURN_IF_ERROR(MakeDirs(options_.state_dir, 0700));
    // World-readable: the step (perhaps another uid inside its user namespace) reads it as /etc/hosts.
    SR_RETURN_IF_ERROR(WriteFileAtomically(hosts_file_, HostsFile(forwards_), 0644));
  }
  // The probe is the real thing: the helper, in the network mode steps will get, around bwrap
  // with every namespace a step gets. A guess from sysctls would miss seccomp filters,
  // AppArmor and container runtimes that refuse unshare.
  StepView view{.argv = {"/bin/true"}, .network = options_.network == NetworkMode::kAllow ? NetworkMode::kAllow
                                                                                        : NetworkMode::kNone};
  HelperPlan plan{.new_netns = options_.network == NetworkMode::kAllow};
  SR_ASSIGN_OR_RETURN(auto probe, RunProbe(HelperArgv(options_.helper, plan, BwrapArgv(options_.bwrap, view)),
                                           absl::Seconds(20)));
  if (probe.first != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bubblewrap cannot create the step sandbox's namespaces here (exit code ", probe.first, ": ",
        absl::StripTrailingAsciiWhitespace(probe.second),
        "). Fix one of: allow unprivileged user namespaces (sysctl -w kernel.unprivileged_userns_clone=1 and "
        "user.max_user_namespaces > 0; in a container, a seccomp/AppArmor profile that permits unshare and "
        "mount), run the daemon as root in its container, or, where steps are trusted, start it with "
        "--sandbox=none"));
  }
  cgroups_ = CgroupRoot::Detect("step-runner");
  // Said at start-up, loudly, because these limits then hold per process only (see README.md).
  if (!cgroups_.has_pids()) {
    SR_LOG(WARNING) << "no writable pids cgroup: the process limit falls back to RLIMIT_NPROC"
                    << (::getuid() == 0 ? ", which does not apply to root: fork bombs are not contained" : "");
  }
  if (!cgroups_.has_memory()) {
    SR_LOG(WARNING) << "no writable memory cgroup: the memory limit falls back to RLIMIT_AS per process";
  }
  if (options_.warm > 0) {
    // Warm sandboxes mount from inside their user namespace, which some kernels and security
    // profiles refuse where bwrap itself works: then every sandbox is made cold, as safe and
    // only slower.
    if (absl::Status warm = ProbeWarm(); !warm.ok()) {
      SR_LOG(WARNING) << "warm sandboxes do not work here (" << warm.message()
                      << "); every step's sandbox is made when the step starts";
      options_.warm = 0;
    } else {
      RequestRefill(absl::ZeroDuration());
      refill_thread_ = std::thread([this] { RefillLoop(); });
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> Sandbox::DaemonWideHidden(NetworkMode network) const {
  std::vector<std::string> hide = {options_.state_dir, Dirname(options_.socket_path), options_.secrets_root};
  hide.insert(hide.end(), options_.hidden.begin(), options_.hidden.end());
  if (network == NetworkMode::kNone) hide.insert(hide.end(), options_.token_stores.begin(), options_.token_stores.end());
  return hide;
}

absl::StatusOr<Sandbox::WarmSandbox> Sandbox::MakeWarm() {
  int number;
  {
    absl::MutexLock lock(&mu_);
    number = ++next_warm_;
  }
  JobCgroup cgroup;
  if (cgroups_.has_memory() || cgroups_.has_pids()) {
    absl::StatusOr<JobCgroup> made = cgroups_.CreateJob(absl::StrCat("warm-", number), options_.limits);
    if (!made.ok()) return absl::InternalError(absl::StrCat("cannot make a cgroup: ", made.status().message()));
    cgroup = *made;
  }
  HelperPlan plan;
  plan.warm = true;
  plan.memory_limit = options_.limits.memory_bytes;
  plan.process_limit = options_.limits.processes;
  plan.rlimits = options_.limits;
  if (!cgroup.memory_dir().empty()) plan.rlimits.memory_bytes = 0;
  if (!cgroup.pids_dir().empty()) plan.rlimits.processes = 0;
  plan.cgroup_v2 = cgroup.v2;
  plan.cgroup_v1_memory = cgroup.v1_memory;
  plan.cgroup_v1_pids = cgroup.v1_pids;
  plan.warnings_fd3 = true;
  auto fail = [&](absl::Status status) {
    if (!cgroup.empty()) RemoveCgroup(cgroup);
    return status;
  };
  absl::StatusOr<process::OutputPipe> out = process::MakeOutputPipe();
  absl::StatusOr<process::OutputPipe> err = process::MakeOutputPipe();
  absl::StatusOr<process::OutputPipe> warnings = process::MakeOutputPipe();
  // The claim channel is a socket: the helper reports the step's exit code back on it.
  int claim[2], spec[2];
  if (!out.ok() || !err.ok() || !warnings.ok() || ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, claim) != 0) {
    return fail(absl::InternalError("cannot make a warm sandbox's pipes"));
  }
  UniqueFd claim_read(claim[0]), claim_write(claim[1]);
  if (::pipe2(spec, O_CLOEXEC) != 0) return fail(absl::InternalError("cannot make a warm sandbox's pipes"));
  UniqueFd spec_read(spec[0]), spec_write(spec[1]);
  // A warm sandbox only takes steps without network.
  std::vector<MountOp> premounted = ViewMounts({.hidden = HiddenPaths(DaemonWideHidden(NetworkMode::kNone), "")});
  absl::StatusOr<process::Subprocess> helper = process::Subprocess::Spawn(
      {.argv = HelperArgv(options_.helper, plan,
                          WarmBwrapArgv(options_.bwrap, options_.helper, ::getuid(), ::getgid(), premounted)),
       .env = {},
       .work_dir = "/",
       .stdout_fd = out->write_end.get(),
       .stderr_fd = err->write_end.get(),
       .stdin_fd = claim_read.get(),
       .fd3 = warnings->write_end.get(),
       .fd4 = spec_read.get()});
  if (!helper.ok()) return fail(helper.status());
  return WarmSandbox{.helper = *std::move(helper),
                     .claim = std::move(claim_write),
                     .spec = std::move(spec_write),
                     .stdout_read = std::move(out->read_end),
                     .stderr_read = std::move(err->read_end),
                     .warnings_read = std::move(warnings->read_end),
                     .cgroup = cgroup,
                     .premounted = std::move(premounted)};
}

void Sandbox::RequestRefill(absl::Duration delay) {
  absl::MutexLock lock(&mu_);
  refill_at_ = absl::Now() + delay;
}

bool Sandbox::RefillShouldWake() const {
  return stopping_ || refill_at_ != refill_waiting_for_ || absl::Now() >= refill_at_;
}

void Sandbox::RefillLoop() {
  absl::MutexLock lock(&mu_);
  for (;;) {
    while (!stopping_ && absl::Now() < refill_at_) {
      // Wakes at the time asked for, or when someone asks for an earlier one.
      refill_waiting_for_ = refill_at_;
      mu_.AwaitWithDeadline(absl::Condition(this, &Sandbox::RefillShouldWake), refill_at_);
    }
    if (stopping_) return;
    refill_at_ = absl::InfiniteFuture();
    mu_.Unlock();
    Refill();
    mu_.Lock();
  }
}

void Sandbox::Refill() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_ || static_cast<int>(warm_.size()) >= options_.warm) return;
    }
    absl::StatusOr<WarmSandbox> warm = MakeWarm();
    if (!warm.ok()) {
      // Steps still run, in cold sandboxes; the next refill tries again.
      SR_LOG(WARNING) << "cannot make a warm sandbox: " << warm.status();
      return;
    }
    // One at a time, and into the pool only when ready: sandboxes made side by side slow each
    // other (and whatever step runs) down, and a step never waits for one still being made.
    if (absl::Status ready = AwaitReady(*warm); !ready.ok()) {
      SR_LOG(WARNING) << "a warm sandbox did not become ready: " << ready;
      Discard(*std::move(warm));
      return;
    }
    absl::MutexLock lock(&mu_);
    warm_.push_back(*std::move(warm));
  }
}

absl::Status Sandbox::AwaitReady(WarmSandbox& warm) {
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (absl::Now() < until) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::CancelledError("the daemon is stopping");
    }
    pollfd fds[2] = {{.fd = warm.claim.get(), .events = POLLIN}, {.fd = warm.helper.pidfd(), .events = POLLIN}};
    if (::poll(fds, 2, 50) <= 0) continue;
    char said = 0;
    if (fds[0].revents && ::recv(warm.claim.get(), &said, 1, MSG_DONTWAIT) == 1 && said == 'R') {
      return absl::OkStatus();
    }
    // Anything else is a sandbox that failed: its helper exits.
    return absl::InternalError("its helper ended (bwrap could not make the sandbox)");
  }
  return absl::DeadlineExceededError("not ready in 10 s");
}

std::optional<Sandbox::WarmSandbox> Sandbox::TakeWarm() {
  std::optional<WarmSandbox> taken;
  std::vector<WarmSandbox> dead;
  {
    absl::MutexLock lock(&mu_);
    while (!warm_.empty() && !taken) {
      WarmSandbox warm = std::move(warm_.front());
      warm_.pop_front();
      pollfd pfd{.fd = warm.helper.pidfd(), .events = POLLIN};
      if (::poll(&pfd, 1, 0) == 0) {
        taken.emplace(std::move(warm));
      } else {
        // Its helper is gone (killed): of no use to a step.
        dead.push_back(std::move(warm));
      }
    }
  }
  for (WarmSandbox& warm : dead) {
    SR_LOG(WARNING) << "a warm sandbox ended before a step took it";
    Discard(std::move(warm));
  }
  // The pool is topped up once steps have let the machine be for a moment: making sandboxes is
  // kernel work (namespaces, mounts, cgroup moves) that, done beside a step that just started,
  // slows it (and the end of its job) by more than a warm sandbox saves. A step that found the
  // pool empty makes its own sandbox now, which takes longer: the refill waits for that too.
  // Between an agent's steps there is time; steps back to back beyond the pool's size get cold
  // sandboxes rather than pile sandbox-making onto each other.
  if (options_.warm > 0) RequestRefill(taken ? kQuietBeforeRefill : kQuietAfterColdStart);
  return taken;
}

absl::Status Sandbox::SendClaim(WarmSandbox& warm, const WarmClaim& claim, const StubSpec& spec) {
  // The spec first: the stub starts on the mounts while the helper reads its part.
  const std::string text = EncodeStubSpec(spec);
  // The whole spec fits in the pipe (a big environment may need a bigger one), so this write
  // does not wait for a sandbox that is still being made.
  if (text.size() > (60 << 10)) ::fcntl(warm.spec.get(), F_SETPIPE_SZ, static_cast<int>(text.size()) + 4096);
  SR_RETURN_IF_ERROR(WriteAll(warm.spec.get(), text));
  warm.spec.Close();
  SR_RETURN_IF_ERROR(WriteAll(warm.claim.get(), EncodeClaim(claim)));
  if (::shutdown(warm.claim.get(), SHUT_WR) != 0) return ErrnoStatus(errno, "shutdown(claim)");
  if (::fcntl(warm.claim.get(), F_SETFL, O_NONBLOCK) != 0) return ErrnoStatus(errno, "fcntl(claim)");
  return absl::OkStatus();
}

void Sandbox::Discard(WarmSandbox warm) {
  auto doomed = std::make_shared<WarmSandbox>(std::move(warm));
  cleanup_->Post([doomed] {
    // Letting it go (its claim socket closed) makes the helper take its bwrap down with it,
    // which a SIGKILL to the helper alone would not while bwrap is still making the sandbox
    // (see helper_main.cc); the SIGKILL is for a helper that does not go within a second.
    doomed->spec.Close();
    doomed->claim.Close();
    pollfd gone{.fd = doomed->helper.pidfd(), .events = POLLIN};
    if (::poll(&gone, 1, 1000) <= 0) (void)doomed->helper.SignalGroup(SIGKILL);
    (void)doomed->helper.Reap();
    if (!doomed->cgroup.empty()) RemoveCgroup(doomed->cgroup);
  });
}

absl::Status Sandbox::ProbeWarm() {
  SR_ASSIGN_OR_RETURN(WarmSandbox warm, MakeWarm());
  absl::Status sent = SendClaim(warm, WarmClaim{}, {.mounts = {}, .cwd = "/", .argv = {"/bin/true"}, .env = {}});
  warm.claim.Close();  // its exit code is the helper's: it need not wait for us to read a report
  std::string said;
  const absl::Time until = absl::Now() + absl::Seconds(20);
  bool exited = false;
  while (sent.ok() && !exited && absl::Now() < until) {
    pollfd fds[2] = {{.fd = warm.helper.pidfd(), .events = POLLIN}, {.fd = warm.stderr_read.get(), .events = POLLIN}};
    ::poll(fds, 2, 100);
    exited = fds[0].revents != 0;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(warm.stderr_read.get(), buf, sizeof buf)) > 0) said.append(buf, static_cast<size_t>(n));
  }
  if (!exited) {
    Discard(std::move(warm));
    return sent.ok() ? absl::DeadlineExceededError("its probe did not finish in 20 s") : sent;
  }
  absl::StatusOr<int> code = warm.helper.Reap();
  if (!warm.cgroup.empty()) RemoveCgroup(warm.cgroup);
  if (!code.ok()) return code.status();
  if (*code != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("exit code ", *code, ": ", absl::StripTrailingAsciiWhitespace(said)));
  }
  return absl::OkStatus();
}

std::string Sandbox::Describe() const {
  std::string network(NetworkModeName(options_.network));
  if (options_.network == NetworkMode::kAllow) {
    std::vector<std::string> hosts;
    for (const HostPort& hp : options_.allowed) hosts.push_back(hp.ToString());
    absl::StrAppend(&network, " (", absl::StrJoin(hosts, ", "), ")");
  }
  std::string limits = PolicyText(options_.limits);
  if (!cgroups_.has_pids()) {
    absl::StrAppend(&limits, ::getuid() == 0 ? "; WARNING: no writable pids cgroup and running as root, so the "
                                               "process limit is not enforced"
                                             : "; process limit by RLIMIT_NPROC (no writable pids cgroup)");
  }
  if (!cgroups_.has_memory()) absl::StrAppend(&limits, "; memory limit by RLIMIT_AS (no writable memory cgroup)");
  return absl::StrCat("steps run sandboxed: ", limits, "; network for steps that ask: ", network, "; ",
                      cgroups_.Describe());
}

namespace {

// The folders of the step's program and of its PATH that lie under /tmp (a checkout built
// there, tools unpacked there): the sandbox's private /tmp would make "command not found" of them.
std::vector<std::string> ToolFoldersUnderTmp(const std::string& program, const std::vector<std::string>& env) {
  std::vector<std::string> candidates = {Dirname(program)};
  for (const std::string& entry : env) {
    if (!absl::StartsWith(entry, "PATH=")) continue;
    for (absl::string_view dir : absl::StrSplit(absl::string_view(entry).substr(5), ':')) {
      candidates.emplace_back(dir);
    }
  }
  std::vector<std::string> folders;
  for (std::string& dir : candidates) {
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    if (!absl::StartsWith(dir, "/tmp/") || dir.find("/..") != std::string::npos) continue;
    struct stat st;
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    // Bound at its own path, so it must be that path: a link (or /./) could point anywhere.
    if (Resolved(dir) != dir) continue;
    if (std::find(folders.begin(), folders.end(), dir) == folders.end()) folders.push_back(dir);
  }
  return folders;
}

}  // namespace

absl::Status Sandbox::CheckJobWorkTree(const std::string& work_tree, const std::string& job_dir) const {
  const std::string resolved = Resolved(work_tree);
  SR_RETURN_IF_ERROR(CheckWorkTree(resolved));
  return CheckTreeAgainstHidden(resolved, work_tree, job_dir);
}

absl::Status Sandbox::CheckTreeAgainstHidden(const std::string& work_tree, const std::string& named,
                                             const std::string& job_dir) const {
  // The tree is bound writable after the daemon's folders are hidden, so a tree inside one of
  // them brings that part back: in the state dir, only the job's own folder may hold its tree
  // (its default tree is there); nothing in the secrets root or a --hide folder; and not the
  // socket's folder itself.
  auto refuse = [&](const std::string& hidden) {
    return absl::InvalidArgumentError(absl::StrCat("the work tree \"", named, "\" lies inside \"",
                                                   hidden, "\", which the sandbox hides from steps"));
  };
  std::vector<std::string> inside_refused = {options_.secrets_root};
  inside_refused.insert(inside_refused.end(), options_.hidden.begin(), options_.hidden.end());
  for (const std::string& hidden : inside_refused) {
    if (!hidden.empty() && Within(work_tree, Resolved(hidden))) return refuse(hidden);
  }
  if (!options_.state_dir.empty() && Within(work_tree, Resolved(options_.state_dir)) &&
      !Within(work_tree, Resolved(job_dir))) {
    return refuse(options_.state_dir);
  }
  if (!options_.socket_path.empty() && work_tree == Resolved(Dirname(options_.socket_path))) {
    return refuse(Dirname(options_.socket_path));
  }
  return absl::OkStatus();
}

absl::Status Sandbox::Launch(const runner::LaunchContext& context, runner::PlannedStep& step) {
  if (step.argv.empty()) return absl::InvalidArgumentError("empty command");
  // Resolved here, with the step's PATH, so "command not found" stays the runner's exit 127
  // rather than a bwrap error.
  SR_ASSIGN_OR_RETURN(std::string program, process::FindExecutable(step.argv[0], step.env));
  // The tree and folder as the kernel will find them: bwrap (and the stub) make mount points
  // without following links, and a link must not make a system folder look like a job's tree.
  const std::string work_tree = Resolved(context.job_work_dir);
  SR_RETURN_IF_ERROR(CheckWorkTree(work_tree));
  SR_RETURN_IF_ERROR(CheckTreeAgainstHidden(work_tree, context.job_work_dir, context.job_dir));
  // A step asks with `network: true` in its step file; a whole job with STEP_RUNNER_NETWORK=1
  // in its env. The daemon's policy decides either way.
  // The job's wish comes from its request, not from the step's environment: an earlier step's
  // exports can set anything there, and step code must not grant itself network.
  const bool wants = step.wants_network || context.job_asks_network;
  const NetworkMode network = wants ? options_.network : NetworkMode::kNone;

  JobSlot slot;
  std::vector<std::string> other_trees;
  {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = jobs_.try_emplace(context.job_id);
    if (inserted) {
      it->second.number = ++next_slot_;
      it->second.work_tree = work_tree;
    }
    std::string net(NetworkModeName(network));
    if (network == NetworkMode::kAllow) {
      std::vector<std::string> hosts;
      for (const HostPort& hp : options_.allowed) hosts.push_back(hp.ToString());
      absl::StrAppend(&net, ":", absl::StrJoin(hosts, ","));
    }
    it->second.grant = {PolicyText(options_.limits), net};
    slot = it->second;
    for (const auto& [id, other] : jobs_) {
      if (id != context.job_id) other_trees.push_back(other.work_tree);
    }
  }

  StepView view;
  view.argv = step.argv;
  view.argv[0] = program;
  view.work_tree = work_tree;
  view.cwd = step.work_dir.empty() ? "" : Resolved(step.work_dir);
  view.network = network;
  std::vector<std::string> hide = DaemonWideHidden(network);
  for (const std::string& tree : other_trees) {
    // Not a tree that holds ours or that ours holds (jobs sharing a folder share it).
    if (!Within(work_tree, tree) && !Within(tree, work_tree)) hide.push_back(tree);
  }
  view.hidden = HiddenPaths(hide, work_tree);
  // Tool folders are bound before the hiding, which skips what the fresh /tmp already hides: one
  // inside a hidden folder would bring that folder's contents back (PATH is the step's to set).
  for (std::string& tools : ToolFoldersUnderTmp(program, step.env)) {
    const bool inside_hidden = std::any_of(hide.begin(), hide.end(), [&](const std::string& h) {
      return !h.empty() && (Within(tools, h) || Within(tools, Resolved(h)));
    });
    if (!inside_hidden) view.tool_binds.push_back(std::move(tools));
  }
  // The job's own file variables, and nothing else of the secrets root: the folder the runner
  // made for this job (never a path from the environment, which steps can set).
  if (!context.secrets_dir.empty() && Existing(context.secrets_dir)) {
    view.readonly_binds.push_back(Resolved(context.secrets_dir));
  }
  if (network == NetworkMode::kAllow) view.hosts_file = hosts_file_;
  // Only this step's own output folder of the hidden job state, so that it can report outputs.
  if (!context.io_dir.empty() && Existing(context.io_dir)) view.writable_binds.push_back(context.io_dir);

  const std::string verdict = context.job_dir + kVerdictFile;
  ::unlink(verdict.c_str());
  HelperPlan plan;
  plan.verdict_path = verdict;
  struct stat log;
  plan.output_used = ::stat((context.job_dir + "/log").c_str(), &log) == 0 ? static_cast<uint64_t>(log.st_size) : 0;
  plan.output_budget = options_.limits.output_bytes;
  if (plan.output_budget > 0) {
    if (plan.output_used >= plan.output_budget) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the job's output budget of ", plan.output_budget, " bytes is spent"));
    }
    plan.output_limit = plan.output_budget - plan.output_used;
  }
  step.explain_exit = [verdict](int) -> std::optional<std::string> {
    absl::StatusOr<std::string> why = ReadFile(verdict);
    if (!why.ok()) return std::nullopt;
    ::unlink(verdict.c_str());
    return *why;
  };

  // A step without network takes a warm sandbox when there is one: the same view, mounted by
  // the stub instead of bwrap.
  if (network == NetworkMode::kNone) {
    std::optional<WarmSandbox> warm = TakeWarm();
    std::optional<std::vector<MountOp>> mounts;
    if (warm) mounts = MountsLeftForStub(view, warm->premounted);
    if (warm && !mounts) {
      SR_LOG(INFO) << "a warm sandbox's hidden folders cover one of the step's tool folders; making one for it";
      Discard(*std::move(warm));
      warm.reset();
    }
    if (warm) {
      WarmClaim claim{.verdict_path = plan.verdict_path,
                      .output_limit = plan.output_limit,
                      .output_budget = plan.output_budget,
                      .output_used = plan.output_used};
      StubSpec spec{.mounts = *std::move(mounts), .cwd = view.cwd, .argv = view.argv, .env = step.env};
      // The stub finds a bind's source under the host's root as seen from inside, where an
      // absolute symlink on the way (a work tree reached through a link) would point into the
      // read-only view instead: it gets the path resolved here, as bwrap resolves it outside.
      for (MountOp& op : spec.mounts) {
        if (!op.source.empty()) op.source = Resolved(op.source);
      }
      if (absl::Status sent = SendClaim(*warm, claim, spec); sent.ok()) {
        {
          absl::MutexLock lock(&mu_);
          if (auto it = jobs_.find(context.job_id); it != jobs_.end()) it->second.warm_cgroups.push_back(warm->cgroup);
        }
        step.prepared.emplace(runner::PreparedProcess{.child = std::move(warm->helper),
                                                      .stdout_read = std::move(warm->stdout_read),
                                                      .stderr_read = std::move(warm->stderr_read),
                                                      .warnings_read = std::move(warm->warnings_read),
                                                      .exit_report = std::move(warm->claim)});
        return absl::OkStatus();
      } else {
        SR_LOG(WARNING) << "a warm sandbox did not take its step (" << sent << "); making one for it";
        Discard(*std::move(warm));
      }
    }
  }

  if (slot.cgroup.empty() && (cgroups_.has_memory() || cgroups_.has_pids())) {
    absl::StatusOr<JobCgroup> cgroup = cgroups_.CreateJob(absl::StrCat("job-", slot.number), options_.limits);
    if (!cgroup.ok()) return absl::InternalError(absl::StrCat("cannot make the job's cgroup: ", cgroup.status().message()));
    slot.cgroup = *cgroup;
    absl::MutexLock lock(&mu_);
    if (auto it = jobs_.find(context.job_id); it != jobs_.end()) it->second.cgroup = slot.cgroup;
  }
  plan.memory_limit = options_.limits.memory_bytes;
  plan.process_limit = options_.limits.processes;
  plan.rlimits = options_.limits;
  // Where a cgroup bounds memory and processes for the whole job, the per-process rlimits would
  // only get in the way (RLIMIT_AS breaks runtimes that reserve address space, and RLIMIT_NPROC
  // counts every process of the uid, the daemon's threads included).
  if (!slot.cgroup.memory_dir().empty()) plan.rlimits.memory_bytes = 0;
  if (!slot.cgroup.pids_dir().empty()) plan.rlimits.processes = 0;
  plan.cgroup_v2 = slot.cgroup.v2;
  plan.cgroup_v1_memory = slot.cgroup.v1_memory;
  plan.cgroup_v1_pids = slot.cgroup.v1_pids;
  if (network == NetworkMode::kAllow) {
    plan.new_netns = true;
    plan.forwards = forwards_;
  }
  plan.warnings_fd3 = true;
  step.warnings_channel = true;
  step.argv = HelperArgv(options_.helper, plan, BwrapArgv(options_.bwrap, view));
  return absl::OkStatus();
}

void Sandbox::OnStepEvent(const std::string& job_id, const proto::FollowStepsResponse& event) {
  // A step's end, like its start, puts the pool's refill off (see TakeWarm).
  if (event.kind() == proto::FollowStepsResponse::STEP_FINISHED ||
      event.kind() == proto::FollowStepsResponse::JOB_FINISHED) {
    if (options_.warm > 0) RequestRefill(kQuietBeforeRefill);
  }
  if (event.kind() != proto::FollowStepsResponse::JOB_FINISHED) return;
  std::vector<JobCgroup> warm_cgroups;
  JobCgroup job_cgroup;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return;
    warm_cgroups = std::move(it->second.warm_cgroups);
    job_cgroup = it->second.cgroup;
    jobs_.erase(it);
  }
  cleanup_->Post([warm_cgroups, job_cgroup] {
    // Whatever a cold step left behind goes now.
    if (!job_cgroup.empty()) RemoveCgroup(job_cgroup);
    // The warm sandboxes' helpers are let go a moment after their steps end (the runner's
    // kSandboxTeardownDelay) and leave by themselves; killing them now would put their
    // teardown beside the job's end. A second is far more than they need.
    for (const JobCgroup& cgroup : warm_cgroups) {
      if (!cgroup.empty()) RemoveCgroup(cgroup, std::chrono::milliseconds(1000));
    }
  });
}

Sandbox::Grant Sandbox::LastGrant(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return {};
  return it->second.grant;
}

}  // namespace step_runner::sandbox

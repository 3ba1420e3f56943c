// The step sandbox end to end: the real daemon with --sandbox=bwrap, the real helper and real
// bubblewrap, steps that try to get out, and the audit log of it all.
//
// Where bwrap cannot create its namespaces (a nested container without user namespaces), the
// daemon refuses to start; that refusal and its message are tested, and the tests that need a
// sandbox are skipped with the daemon's reason rather than passing vacuously.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "nlohmann/json.hpp"
#include "gtest/gtest.h"
#include "step-runner/audit/audit_log.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "step-runner/process/subprocess.h"
#include "step-runner/sandbox/helper_plan.h"
#include "step-runner/sandbox/policy.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A TCP server on 127.0.0.1 that greets every connection with `greeting` and closes it.
class GreetingServer {
 public:
  explicit GreetingServer(std::string greeting) : greeting_(std::move(greeting)) {
    fd_.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd_.get(), 16) != 0 ||
        ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot listen";
      return;
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] {
      while (!stop_) {
        pollfd pfd{.fd = fd_.get(), .events = POLLIN};
        if (::poll(&pfd, 1, 50) <= 0) continue;
        UniqueFd c(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (c) (void)WriteAll(c.get(), greeting_ + "\n");
      }
    });
  }
  ~GreetingServer() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int port() const { return port_; }

 private:
  std::string greeting_;
  UniqueFd fd_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A folder outside /tmp (under /var/tmp unless told): the sandbox's private /tmp would hide
// anything under /tmp anyway, so hiding the state dir and token stores is only tested for real
// elsewhere.
class DirOutsideTmp {
 public:
  explicit DirOutsideTmp(const std::string& parent = "/var/tmp") {
    std::string tmpl = parent + "/sr_sandbox_test.XXXXXX";
    path_ = ::mkdtemp(tmpl.data());
  }
  ~DirOutsideTmp() { (void)RemoveTree(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void AddVariable(proto::RunRequest& request, const std::string& key, const std::string& value, bool masked,
                 bool file) {
  proto::Variable* var = request.mutable_job()->add_variables();
  var->set_key(key);
  var->set_value(value);
  var->set_masked(masked);
  var->set_file(file);
}

// A script whose outcome is one word per probe, so that assertions read plainly.
std::string Probe(const std::string& name, const std::string& command) {
  return absl::StrCat("if ", command, " >/dev/null 2>&1; then echo ", name, "=yes; else echo ", name, "=no; fi");
}

std::string Connect(const std::string& host, int port) {
  return absl::StrCat("(exec 3<>/dev/tcp/", host, "/", port, " && head -n1 <&3 | grep -q .)");
}

// A script indented for a `script: |` block of a run sequence.
std::string Indent(const std::string& script) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(script, '\n')) absl::StrAppend(&out, "      ", line, "\n");
  return out;
}

// Every test runs twice: with the daemon's default warm sandboxes (made ahead, mounted by the
// stub), and with --sandbox-warm=0 (each made by bwrap when its step starts). The walls must be
// the same either way.
class SandboxTest : public ::testing::TestWithParam<bool> {
 protected:
  bool warm() const { return GetParam(); }

  // Starts the daemon with the sandbox on; false (and the test skipped) where bwrap cannot work.
  bool Start(std::vector<std::string> flags = {}, const std::string& dir = "") {
    flags.insert(flags.begin(), "--sandbox=bwrap");
    if (!warm()) flags.push_back("--sandbox-warm=0");
    auto daemon = Daemon::Start(dir.empty() ? dir_.path() : dir, flags);
    if (!daemon.ok()) {
      // Only an honest refusal may skip: it must name the fix.
      EXPECT_THAT(std::string(daemon.status().message()), HasSubstr("--sandbox=none"));
      skip_reason_ = std::string(daemon.status().message());
      return false;
    }
    // The stub uses nothing bwrap does not (mounts in a user namespace, a nested one to map
    // the uid back): where bwrap works, a daemon that fell back to cold sandboxes is a bug.
    if (warm()) {
      EXPECT_THAT((*daemon)->stderr_output(), Not(HasSubstr("warm sandboxes do not work here")));
    }
    daemon_ = *std::move(daemon);
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
    return true;
  }

  struct Outcome {
    proto::Status status;
    std::string log;
  };
  Outcome RunScript(const std::string& id, const std::string& script, std::map<std::string, std::string> env = {},
                    absl::Duration deadline = absl::Seconds(90)) {
    proto::RunRequest request = Request(id, "run:\n  - name: probe\n    script: |\n" + Indent(script));
    for (auto& [k, v] : env) (*request.mutable_env())[k] = v;
    request.mutable_timeout()->set_seconds(absl::ToInt64Seconds(deadline));
    return Run(request, deadline + absl::Seconds(30));
  }
  Outcome Run(const proto::RunRequest& request, absl::Duration deadline = absl::Seconds(120)) {
    Outcome out;
    absl::Status started = client_->Run(request);
    EXPECT_TRUE(started.ok()) << started;
    absl::StatusOr<proto::Status> status = WaitForJob(*client_, request.id(), deadline);
    EXPECT_TRUE(status.ok()) << status.status();
    if (status.ok()) out.status = *status;
    out.log = ReadLog(*client_, request.id()).value_or("");
    return out;
  }
  // What the job's log holds now (it may still be running).
  std::string ReadLogSoFar(const std::string& id) {
    absl::StatusOr<proto::Status> status = client_->GetStatus(id);
    if (!status.ok() || status->log_size() == 0) return "";
    std::string log;
    (void)client_->Follow(id, 0, [&](const proto::FollowLogsResponse& c) { log += c.data(); }, nullptr,
                          status->log_size());
    return log;
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
  std::string skip_reason_;
};

#define START_OR_SKIP(...)                                   \
  do {                                                       \
    if (!Start(__VA_ARGS__)) GTEST_SKIP() << skip_reason_;   \
  } while (0)

TEST_P(SandboxTest, NoTcpConnectionWhenTheNetworkIsOff) {
  GreetingServer server("hello");
  START_OR_SKIP();
  const std::string script = Probe("reached", Connect("127.0.0.1", server.port())) + "\nip -o link | wc -l";
  Outcome plain = RunScript("off", script);
  EXPECT_THAT(plain.log, HasSubstr("reached=no"));
  EXPECT_THAT(plain.log, HasSubstr("\n1\n"));  // only loopback
  // Asking for the network changes nothing when the daemon's policy is none.
  Outcome asked = RunScript("asked", script, {{"STEP_RUNNER_NETWORK", "1"}});
  EXPECT_THAT(asked.log, HasSubstr("reached=no"));
}

TEST_P(SandboxTest, AllowListReachesExactlyTheAllowedHostAndPort) {
  GreetingServer allowed("allowed"), other("other");
  START_OR_SKIP({"--network=allow", "--allow-host", absl::StrCat("localhost:", allowed.port())});
  const std::string script = absl::StrCat(
      Probe("allowed_by_name", Connect("localhost", allowed.port())), "\n",
      Probe("other_port", Connect("localhost", other.port())), "\n",
      Probe("other_by_ip", Connect("127.0.0.1", other.port())), "\n",
      // The host's own loopback is not the step's: the allowed port by IP is not there either.
      Probe("allowed_by_ip", Connect("127.0.0.1", allowed.port())));
  Outcome granted = RunScript("granted", script, {{"STEP_RUNNER_NETWORK", "1"}});
  EXPECT_EQ(granted.status.status(), proto::StepResult::success) << granted.log;
  EXPECT_THAT(granted.log, HasSubstr("allowed_by_name=yes"));
  EXPECT_THAT(granted.log, HasSubstr("other_port=no"));
  EXPECT_THAT(granted.log, HasSubstr("other_by_ip=no"));
  EXPECT_THAT(granted.log, HasSubstr("allowed_by_ip=no"));
  // A step that did not ask gets no network at all.
  Outcome not_asked = RunScript("not-asked", script);
  EXPECT_THAT(not_asked.log, HasSubstr("allowed_by_name=no"));
}

TEST_P(SandboxTest, CannotWriteOutsideItsTreeNorReadTheStateDirOrTokenStore) {
  DirOutsideTmp outside;
  const std::string tokens = outside.path() + "/git-credentials";
  SR_ASSERT_OK(WriteFileAtomically(tokens, "https://oauth2:SECRET-TOKEN@gitlab.example\n", 0600));
  const std::string daemon_dir = outside.path() + "/daemon";
  SR_ASSERT_OK(MakeDirs(daemon_dir, 0700));
  START_OR_SKIP({"--hide", tokens}, daemon_dir);
  // A job first, so that the state dir holds a log and a record to go after.
  Outcome first = RunScript("first", "echo FIRST-JOB-OUTPUT");
  const std::string state = daemon_->state_dir();
  const std::string script = absl::StrCat(
      Probe("wrote_tree", "touch ./in-tree"), "\n",
      Probe("wrote_etc", "touch /etc/sr-sandbox-test"), "\n",
      Probe("wrote_outside", absl::StrCat("touch ", outside.path(), "/escaped")), "\n",
      Probe("read_tokens", absl::StrCat("grep -q SECRET ", tokens)), "\n",
      Probe("read_audit", absl::StrCat("test -s ", state, "/audit.log")), "\n",
      Probe("read_logs", absl::StrCat("grep -rq FIRST-JOB-OUTPUT ", state)), "\n",
      Probe("saw_socket", absl::StrCat("test -S ", daemon_->socket_path())));
  proto::RunRequest request = Request("second", "run:\n  - name: probe\n    script: |\n" + Indent(script));
  request.set_work_dir(outside.path() + "/tree");
  Outcome second = Run(request);
  EXPECT_EQ(second.status.status(), proto::StepResult::success) << second.log;
  for (const char* line : {"wrote_tree=yes", "wrote_etc=no", "wrote_outside=no", "read_tokens=no", "read_audit=no",
                           "read_logs=no", "saw_socket=no"}) {
    EXPECT_THAT(second.log, HasSubstr(line));
  }
  EXPECT_EQ(::access((outside.path() + "/tree/in-tree").c_str(), F_OK), 0);
  EXPECT_NE(::access((outside.path() + "/escaped").c_str(), F_OK), 0);
  EXPECT_NE(::access("/etc/sr-sandbox-test", F_OK), 0);
  // A job cannot make the system its writable tree: Run refuses it, and nothing starts.
  proto::RunRequest system = Request("system", "run:\n  - name: probe\n    script: touch /etc/sr-sandbox-test\n");
  system.set_work_dir("/etc");
  absl::Status refused = client_->Run(system);
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_THAT(refused.message(), HasSubstr("system folder"));
  EXPECT_TRUE(absl::IsNotFound(client_->GetStatus("system").status()));
  EXPECT_NE(::access("/etc/sr-sandbox-test", F_OK), 0);
}

// --hide names a folder and a file through symlinks: what they point to is hidden, and the
// steps still run (a mount over the link's own path would land on what it points to, with the
// wrong kind: a file over a folder).
TEST_P(SandboxTest, PathsHiddenThroughLinksAreHiddenWhereTheyPoint) {
  DirOutsideTmp outside;
  SR_ASSERT_OK(MakeDirs(outside.path() + "/keys", 0700));
  SR_ASSERT_OK(WriteFileAtomically(outside.path() + "/keys/id", "SECRET-KEY\n", 0600));
  SR_ASSERT_OK(WriteFileAtomically(outside.path() + "/token", "SECRET-TOKEN\n", 0600));
  ASSERT_EQ(::symlink((outside.path() + "/keys").c_str(), (outside.path() + "/keys-link").c_str()), 0);
  ASSERT_EQ(::symlink((outside.path() + "/token").c_str(), (outside.path() + "/token-link").c_str()), 0);
  START_OR_SKIP({"--hide", outside.path() + "/keys-link", "--hide", outside.path() + "/token-link"});
  const std::string script = absl::StrCat(
      Probe("key_by_path", absl::StrCat("grep -q SECRET ", outside.path(), "/keys/id")), "\n",
      Probe("key_by_link", absl::StrCat("grep -q SECRET ", outside.path(), "/keys-link/id")), "\n",
      Probe("token_by_path", absl::StrCat("grep -q SECRET ", outside.path(), "/token")), "\n",
      Probe("token_by_link", absl::StrCat("grep -q SECRET ", outside.path(), "/token-link")));
  for (const char* id : {"first", "second"}) {
    Outcome out = RunScript(id, script);
    EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
    for (const char* line : {"key_by_path=no", "key_by_link=no", "token_by_path=no", "token_by_link=no"}) {
      EXPECT_THAT(out.log, HasSubstr(line)) << id;
    }
  }
}

TEST_P(SandboxTest, ItsOwnFileVariablesAreReadableAndNothingElseOfTheSecretStore) {
  START_OR_SKIP();
  // Another job's file variable, alive while ours runs.
  proto::RunRequest other = Request("other", "exec:\n  command: [sleep, \"3002\"]\n");
  AddVariable(other, "THEIR_KEY", "THEIR-SECRET", false, true);
  SR_ASSERT_OK(client_->Run(other));
  proto::RunRequest mine = Request(
      "mine", "run:\n  - name: probe\n    script: |\n" +
                  Indent(absl::StrCat("cat \"$MY_KEY\"; echo\n",
                                      Probe("read_theirs", "grep -rqs THEIR-SECRET /dev/shm $(dirname \"$MY_KEY\")/.."))));
  AddVariable(mine, "MY_KEY", "MY-FILE-CONTENT", false, true);
  Outcome out = Run(mine);
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("MY-FILE-CONTENT"));
  EXPECT_THAT(out.log, HasSubstr("read_theirs=no"));
  SR_ASSERT_OK(client_->Cancel("other"));
  SR_EXPECT_OK(WaitForJob(*client_, "other").status());
}

// What a step controls (its environment, its PATH, the exports it hands to later steps) must not
// widen what the sandbox shows it. Each of these re-exposed the daemon's folders, another job's
// file variables, or the network before it was fixed.
TEST_P(SandboxTest, StepCodeCannotWidenItsViewThroughEnvPathOrExports) {
  START_OR_SKIP({"--network=all"});
  proto::RunRequest other = Request("other", "exec:\n  command: [sleep, \"3003\"]\n");
  AddVariable(other, "THEIR_KEY", "THEIR-SECRET", false, true);
  SR_ASSERT_OK(client_->Run(other));
  const std::string state = daemon_->state_dir();
  const std::string secrets_root = absl::StrCat("/dev/shm/step-runner-", ::getuid());
  // A path that starts with the secrets root and climbs out of it, to the state dir.
  const std::string climb = absl::StrCat(secrets_root, "/../..", state);
  const std::string probes = absl::StrCat(
      // The job's own folder shows (its tree's mount point is made there); another's must not.
      Probe("saw_state", absl::StrCat("test -s ", state, "/audit.log -o $(ls ", state, "/jobs | wc -l) -gt 1")), "\n",
      Probe("read_theirs", "grep -rqs THEIR-SECRET /dev/shm " + secrets_root), "\n",
      // More than loopback in /proc/net/dev: the step has the host's network.
      Probe("network", "test $(tail -n +3 /proc/net/dev | wc -l) -gt 1"), "\n");
  proto::RunRequest mine = Request(
      "mine",
      absl::StrCat("run:\n"
                   "  - name: export\n"
                   "    script: |\n",
                   Indent(absl::StrCat("printf '{\"name\":\"CLIMB2\",\"value\":\"%s\"}\\n' \"", climb,
                                       "\" >> \"${{ export_file }}\"\n"
                                       "printf '{\"name\":\"STEP_RUNNER_NETWORK\",\"value\":\"1\"}\\n' >> "
                                       "\"${{ export_file }}\"\n"
                                       "echo first-step-done\n")),
                   "  - name: probe\n"
                   "    script: |\n",
                   Indent(probes)));
  (*mine.mutable_env())["CLIMB"] = climb;
  (*mine.mutable_env())["WHOLE_ROOT"] = secrets_root + "/.";  // every job's file variables
  // PATH is the step's to set, and folders on it under /tmp are bound back into the sandbox.
  (*mine.mutable_env())["PATH"] = absl::StrCat(state, "/jobs:/usr/bin:/bin");
  AddVariable(mine, "MY_KEY", "MY-FILE-CONTENT", false, true);
  Outcome out = Run(mine);
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("first-step-done"));
  for (const char* line : {"saw_state=no", "read_theirs=no", "network=no"}) EXPECT_THAT(out.log, HasSubstr(line));
  SR_ASSERT_OK(client_->Cancel("other"));
  SR_EXPECT_OK(WaitForJob(*client_, "other").status());
}

// A work tree is bound writable after the daemon's folders are hidden: the state dir, or the
// socket's folder, as a job's tree would hand the step every job's records, or the daemon itself.
TEST_P(SandboxTest, TheDaemonsOwnFoldersAreRefusedAsWorkTrees) {
  START_OR_SKIP();
  const std::string marker = "sr-should-not-exist";
  for (const std::string& tree : {daemon_->state_dir(), daemon_->state_dir() + "/jobs", dir_.path()}) {
    proto::RunRequest request =
        Request(absl::StrCat("tree", tree.size()), "run:\n  - name: probe\n    script: touch " + marker + "\n");
    request.set_work_dir(tree);
    absl::Status refused = client_->Run(request);
    EXPECT_TRUE(absl::IsInvalidArgument(refused)) << tree << ": " << refused;
    EXPECT_THAT(refused.message(), HasSubstr("which the sandbox hides from steps")) << tree;
    EXPECT_TRUE(absl::IsNotFound(client_->GetStatus(request.id()).status())) << tree;
    EXPECT_NE(::access((tree + "/" + marker).c_str(), F_OK), 0) << tree;
  }
}

// A step of a root daemon is uid 0 without capabilities, and uid 0 may write global kernel
// settings (kernel.core_pattern runs a program as host root): /proc/sys is read-only.
TEST_P(SandboxTest, KernelSettingsAreReadOnly) {
  START_OR_SKIP();
  Outcome out = RunScript("sysctl", absl::StrCat(Probe("read", "cat /proc/sys/vm/swappiness"), "\n",
                                                 Probe("wrote", "cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness")));
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("read=yes"));
  EXPECT_THAT(out.log, HasSubstr("wrote=no"));
}

// Host pids of processes whose command line is exactly `argv`.
std::vector<pid_t> FindProcesses(const std::vector<std::string>& argv) {
  std::string want;
  for (const std::string& a : argv) want += a + '\0';
  std::vector<pid_t> out;
  DIR* proc = ::opendir("/proc");
  while (struct dirent* e = proc ? ::readdir(proc) : nullptr) {
    pid_t pid;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    if (ReadFile(absl::StrCat("/proc/", pid, "/cmdline")).value_or("") == want) out.push_back(pid);
  }
  if (proc) ::closedir(proc);
  return out;
}

TEST_P(SandboxTest, CannotSeeOrSignalTheDaemonOrAnotherJob) {
  START_OR_SKIP();
  // A duration of its own: the Warm and Cold runs of this test may run at once (ctest -j2), and
  // each must find its own victim, not the other's (which its test cancels).
  const std::string duration = absl::StrCat("3001.", ::getpid());
  SR_ASSERT_OK(client_->Run(Request("victim", absl::StrCat("exec:\n  command: [sleep, \"", duration, "\"]\n"))));
  std::vector<pid_t> victim;
  for (absl::Time until = absl::Now() + absl::Seconds(30); victim.empty() && absl::Now() < until;) {
    victim = FindProcesses({"/usr/bin/sleep", duration});
    if (victim.empty()) victim = FindProcesses({"/bin/sleep", duration});
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(victim.size(), 1u);
  const std::string script = absl::StrCat(
      Probe("killed_daemon", absl::StrCat("kill -KILL ", daemon_->pid())), "\n",
      Probe("killed_victim", absl::StrCat("kill -KILL ", victim[0])), "\n",
      "echo procs=$(ls /proc | grep -c '^[0-9]')\n",
      Probe("saw_daemon", "grep -qs 'se[r]ve' /proc/[0-9]*/cmdline"));
  Outcome attacker = RunScript("attacker", script);
  EXPECT_THAT(attacker.log, HasSubstr("killed_daemon=no"));
  EXPECT_THAT(attacker.log, HasSubstr("killed_victim=no"));
  EXPECT_THAT(attacker.log, HasSubstr("saw_daemon=no"));
  // The namespace's init (bwrap), the shell, ls and grep: nothing of anyone else.
  int procs = 0;
  size_t at = attacker.log.find("procs=");
  ASSERT_NE(at, std::string::npos);
  ASSERT_TRUE(absl::SimpleAtoi(attacker.log.substr(at + 6, attacker.log.find('\n', at) - at - 6), &procs));
  EXPECT_LE(procs, 6);
  SR_ASSERT_OK_AND_ASSIGN(proto::Status victim_status, client_->GetStatus("victim"));
  EXPECT_EQ(victim_status.status(), proto::StepResult::running);
  EXPECT_EQ(::kill(victim[0], 0), 0);
  SR_ASSERT_OK(client_->Cancel("victim"));
  SR_EXPECT_OK(WaitForJob(*client_, "victim").status());
}

void ExpectResourceExhausted(const proto::Status& status, const std::string& what, const std::string& log) {
  EXPECT_EQ(status.status(), proto::StepResult::failure) << log.substr(0, 2000);
  EXPECT_EQ(status.error().kind(), proto::StatusError::resource_exhausted) << status.message();
  EXPECT_THAT(status.message(), HasSubstr(what));
}

// Where no cgroup can be made, the daemon says so at start-up, and these limits hold per process
// only: a fork bomb as root is then not contained, and an RLIMIT_AS failure is the step's own.
#define SKIP_WITHOUT_CGROUP(controller)                                                           \
  do {                                                                                            \
    if (absl::StrContains(daemon_->stderr_output(), "no writable " controller " cgroup")) {       \
      GTEST_SKIP() << "no writable " controller " cgroup here: " << daemon_->stderr_output();     \
    }                                                                                             \
  } while (0)

TEST_P(SandboxTest, ForkBombEndsAsResourceExhaustedAndTheDaemonAnswers) {
  START_OR_SKIP({"--limit-procs", "64"});
  SKIP_WITHOUT_CGROUP("pids");
  // The shell stays: `wait` would return as soon as its own child pipeline did, and the step
  // could then end (its group killed) before the bomb reached the limit, on a slow machine.
  Outcome bomb = RunScript("bomb", "bomb() { bomb | bomb & }; bomb; sleep 60", {}, absl::Seconds(90));
  ExpectResourceExhausted(bomb.status, "process limit of 64", bomb.log);
  // The daemon is still itself: it answers and runs the next job.
  Outcome after = RunScript("after", "echo still-here");
  EXPECT_EQ(after.status.status(), proto::StepResult::success);
  EXPECT_THAT(after.log, HasSubstr("still-here"));
}

TEST_P(SandboxTest, MemoryWarnsAt80PercentAndAHogEndsAsResourceExhausted) {
  START_OR_SKIP({"--limit-memory", "128M"});
  SKIP_WITHOUT_CGROUP("memory");
  // Near the limit: a warning in the log, and the job still succeeds.
  Outcome near = RunScript("near", "python3 -c 'import time; x = bytearray(100 << 20); time.sleep(1.5)'");
  EXPECT_EQ(near.status.status(), proto::StepResult::success) << near.log;
  EXPECT_THAT(near.log, HasSubstr("memory use reached 80%"));
  Outcome hog = RunScript("hog", "python3 -c 'x = bytearray(1 << 30)'");
  ExpectResourceExhausted(hog.status, "memory limit", hog.log);
  SR_EXPECT_OK(client_->GetStatus("hog").status());
}

TEST_P(SandboxTest, TenGigabyteLogWriterEndsAsResourceExhausted) {
  START_OR_SKIP({"--limit-output", "8M"});
  Outcome writer = RunScript("writer", "head -c 10G /dev/zero | tr '\\0' x");
  ExpectResourceExhausted(writer.status, "output limit", writer.log);
  EXPECT_THAT(writer.log, HasSubstr("80% of its budget"));
  // The log holds the budget's worth and the notices, not 10 GB.
  EXPECT_GE(writer.status.log_size(), 8 << 20);
  EXPECT_LT(writer.status.log_size(), (8 << 20) + 4096);
}

// The 80% warning is a step event too, so a gateway following the steps sees it coming; and
// only the sandbox helper can raise one: the step's own fd 3 is closed.
TEST_P(SandboxTest, OutputBudgetWarningIsAStepEventThatAStepCannotForge) {
  START_OR_SKIP({"--limit-output", "1M"});
  Outcome near = RunScript("near", "echo fake >&3 || echo no-fd3\nhead -c 900000 /dev/zero | tr '\\0' x");
  EXPECT_EQ(near.status.status(), proto::StepResult::success) << near.log.substr(0, 500);
  EXPECT_THAT(near.log, HasSubstr("no-fd3"));
  std::vector<proto::FollowStepsResponse> events;
  SR_ASSERT_OK(client_->FollowSteps("near", 0, [&](const proto::FollowStepsResponse& e) { events.push_back(e); }));
  std::vector<std::string> warnings;
  for (const auto& e : events) {
    if (e.kind() == proto::FollowStepsResponse::WARNING) warnings.push_back(e.step_path() + ": " + e.warning());
  }
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_THAT(warnings[0], HasSubstr("probe: the job's output reached 80% of its budget"));
  // And in the audit trail, for whoever reviews the job later.
  SR_ASSERT_OK_AND_ASSIGN(std::string audit, ReadFile(dir_.path() + "/state/audit.log"));
  EXPECT_THAT(audit, HasSubstr("\"kind\":\"warning\""));
  EXPECT_THAT(audit, HasSubstr("80% of its budget"));
  // Before the step's finished event, where it belongs.
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events[events.size() - 2].kind(), proto::FollowStepsResponse::STEP_FINISHED);
}

// `network: true` is how a step file asks; catalog steps declare it on their exec. Without it,
// even under an allow-list, a step has no network.
TEST_P(SandboxTest, StepFileAsksForNetworkWithTheNetworkKey) {
  GreetingServer allowed("allowed");
  START_OR_SKIP({"--network=allow", "--allow-host", absl::StrCat("localhost:", allowed.port())});
  const std::string probe = Probe("reached", Connect("localhost", allowed.port()));
  Outcome out = Run(Request("keyed", absl::StrCat("run:\n"
                                                  "  - name: asks\n    network: true\n    script: '", probe, "'\n"
                                                  "  - name: silent\n    script: '", probe, "'\n"
                                                  "  - name: exec_asks\n    exec:\n      network: true\n"
                                                  "      command: [bash, -c, '", probe, "']\n")));
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("reached=yes\nreached=no\nreached=yes"));

  // The audit log names each step's own grant, whatever the next step got. (Its last lines are
  // written just after the job's end goes out.)
  const std::string audit_path = daemon_->state_dir() + "/audit.log";
  std::map<std::string, std::string> network_of;  // step -> network, from its step_finished line
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (network_of.size() < 3 && absl::Now() < deadline) {
    network_of.clear();
    for (absl::string_view line : absl::StrSplit(ReadFile(audit_path).value_or(""), '\n')) {
      if (!absl::StrContains(line, "\"job\":\"keyed\"") || !absl::StrContains(line, "\"kind\":\"step_finished\"")) continue;
      const auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_object() && record.contains("network")) {
        network_of[record.value("step", "")] = record.value("network", "");
      }
    }
    if (network_of.size() < 3) absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_THAT(network_of["asks"], ::testing::StartsWith("allow"));
  EXPECT_EQ(network_of["silent"], "none");
  EXPECT_THAT(network_of["exec_asks"], ::testing::StartsWith("allow"));
}

// A step's ${{ output_file }} and ${{ export_file }} live in the job's state, which is hidden
// from it: only its own io folder is bound back, writable.
TEST_P(SandboxTest, OutputsAndExportsWorkInsideTheSandbox) {
  START_OR_SKIP();
  proto::RunRequest request = Request("io",
                                      "run:\n"
                                      "  - name: greet\n"
                                      "    step: ./greet\n"
                                      "    inputs: {name: sandbox}\n"
                                      "  - name: set\n"
                                      "    script: printf '{\"name\":\"COLOR\",\"value\":\"blue\"}\\n' >> \"${{ export_file }}\"\n"
                                      "  - name: consume\n"
                                      "    script: echo \"message=${{ steps.greet.outputs.message }} color=$COLOR\"\n");
  request.set_steps_dir(SR_SOURCE_DIR "/tests/conformance/cases/greeting_typed_inputs");
  Outcome out = Run(request);
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("message=hi sandbox color=blue"));
}

// A checkout built under /tmp (as CI clones often are): the step's tools on PATH are found,
// read-only, although the sandbox's /tmp is private.
TEST_P(SandboxTest, ToolsOnAPathUnderTmpStayReachable) {
  TempDir tools;  // under /tmp
  ASSERT_TRUE(MakeDirs(tools.path() + "/bin", 0755).ok());
  ASSERT_TRUE(WriteFileAtomically(tools.path() + "/bin/sr-hello", "#!/bin/sh\necho hello from $0\n", 0755).ok());
  START_OR_SKIP();
  Outcome out = RunScript("tools", absl::StrCat(Probe("writable", "touch " + tools.path() + "/bin/x"), "\nsr-hello"),
                          {{"PATH", tools.path() + "/bin:/usr/bin:/bin"}});
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr("hello from"));
  EXPECT_THAT(out.log, HasSubstr("writable=no"));
}

TEST_P(SandboxTest, CpuTimeLimitEndsAsResourceExhausted) {
  START_OR_SKIP({"--limit-cpu", "1"});
  Outcome spin = RunScript("spin", "while :; do :; done");
  ExpectResourceExhausted(spin.status, "CPU time limit", spin.log);
}

TEST_P(SandboxTest, AuditChainRecordsCallersAndStepsVerifiesAndCatchesTampering) {
  START_OR_SKIP();
  proto::RunRequest request = Request("audited", "run:\n  - name: greet\n    script: echo $TOKEN\n");
  AddVariable(request, "TOKEN", "MASKED-SECRET-VALUE", true, false);
  (*request.mutable_env())["PLAIN"] = "ENV-VALUE-NOT-FOR-AUDIT";
  Outcome out = Run(request);
  EXPECT_EQ(out.status.status(), proto::StepResult::success);
  daemon_->Signal(SIGTERM);
  SR_ASSERT_OK_AND_ASSIGN(int code, daemon_->Wait(absl::Seconds(60)));
  EXPECT_EQ(code, 0);

  const std::string path = daemon_->state_dir() + "/audit.log";
  SR_ASSERT_OK_AND_ASSIGN(std::string text, ReadFile(path));
  EXPECT_THAT(text, Not(HasSubstr("MASKED-SECRET-VALUE")));
  EXPECT_THAT(text, Not(HasSubstr("ENV-VALUE-NOT-FOR-AUDIT")));
  // This test process is the caller: its uid and pid, from the socket's peer credentials.
  std::string run_line;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StrContains(line, "\"method\":\"Run\"")) run_line = std::string(line);
  }
  EXPECT_THAT(run_line, HasSubstr(absl::StrCat("\"pid\":", ::getpid(), ",")));
  EXPECT_THAT(run_line, HasSubstr(absl::StrCat("\"uid\":", ::getuid())));
  EXPECT_THAT(text, HasSubstr("\"kind\":\"step_finished\""));
  EXPECT_THAT(text, HasSubstr("\"network\":\"none\""));
  EXPECT_THAT(text, HasSubstr("\"sandbox\":\"bwrap"));

  auto verify = [&] {
    auto r = RunCommand({StepRunnerBinary(), "audit", "verify", "--state-dir", daemon_->state_dir()});
    EXPECT_TRUE(r.ok()) << r.status();
    return r.value_or(CommandResult{});
  };
  CommandResult intact = verify();
  EXPECT_EQ(intact.exit_code, 0) << intact.err;
  CommandResult tail = RunCommand({StepRunnerBinary(), "audit", "tail", "--state-dir", daemon_->state_dir()}).value();
  EXPECT_THAT(tail.out, HasSubstr("step_finished"));

  // One byte changed (in the middle of the chain).
  std::string edited = text;
  size_t at = edited.find("\"audited\"");
  ASSERT_NE(at, std::string::npos);
  edited[at + 1] = 'A';
  SR_ASSERT_OK(WriteFileAtomically(path, edited, 0600));
  CommandResult changed = verify();
  EXPECT_EQ(changed.exit_code, 1);
  EXPECT_THAT(changed.err, HasSubstr("line "));

  // One line removed.
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  lines.erase(lines.begin() + 1);
  SR_ASSERT_OK(WriteFileAtomically(path, absl::StrJoin(lines, "\n"), 0600));
  CommandResult removed = verify();
  EXPECT_EQ(removed.exit_code, 1);
  EXPECT_THAT(removed.err, HasSubstr("line 1"));

  SR_ASSERT_OK(WriteFileAtomically(path, text, 0600));
  EXPECT_EQ(verify().exit_code, 0);
}

TEST_P(SandboxTest, GracefulCancelReachesTheStepInsideTheSandbox) {
  START_OR_SKIP();
  SR_ASSERT_OK(client_->Run(Request(
      "graceful", "run:\n  - name: trap\n    script: |\n" +
                      Indent("trap 'echo got-term; exit 3' TERM\necho ready\nwhile :; do sleep 0.1; done"))));
  std::string log;
  for (absl::Time until = absl::Now() + absl::Seconds(60); !absl::StrContains(log, "ready") && absl::Now() < until;) {
    absl::SleepFor(absl::Milliseconds(20));
    log = ReadLogSoFar("graceful");
  }
  ASSERT_THAT(log, HasSubstr("ready"));
  SR_ASSERT_OK(client_->Cancel("graceful"));
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, WaitForJob(*client_, "graceful", absl::Seconds(60)));
  EXPECT_EQ(status.status(), proto::StepResult::cancelled);
  EXPECT_EQ(status.exit_code(), 3);  // its trap ran: SIGTERM, not the SIGKILL after the grace
  EXPECT_THAT(ReadLog(*client_, "graceful").value_or(""), HasSubstr("got-term"));
}

TEST_P(SandboxTest, AuditTailFollowPrintsNewLinesAsTheyCome) {
  START_OR_SKIP();
  SR_ASSERT_OK_AND_ASSIGN(process::OutputPipe out, process::MakeOutputPipe());
  SR_ASSERT_OK_AND_ASSIGN(
      process::Subprocess tail,
      process::Subprocess::Spawn({.argv = {StepRunnerBinary(), "audit", "tail", "--follow", "--state-dir",
                                           daemon_->state_dir()},
                                  .env = {"PATH=/usr/bin:/bin"},
                                  .stdout_fd = out.write_end.get()}));
  out.write_end.Close();
  Outcome job = RunScript("followed", "echo hi");
  EXPECT_EQ(job.status.status(), proto::StepResult::success);
  std::string printed;
  for (absl::Time until = absl::Now() + absl::Seconds(60);
       !absl::StrContains(printed, "job_finished") && absl::Now() < until;) {
    pollfd pfd{.fd = out.read_end.get(), .events = POLLIN};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    char buf[4096];
    ssize_t n = ::read(out.read_end.get(), buf, sizeof buf);
    if (n > 0) printed.append(buf, static_cast<size_t>(n));
    if (n == 0) break;
  }
  SR_EXPECT_OK(tail.SignalGroup(SIGKILL));
  (void)tail.Reap();
  EXPECT_THAT(printed, HasSubstr("job=followed"));
  EXPECT_THAT(printed, HasSubstr("job_finished"));
}

TEST_P(SandboxTest, SandboxNoneRunsUnconfinedAndSaysSoLoudly) {
  GreetingServer server("hello");
  auto daemon = Daemon::Start(dir_.path(), {"--sandbox=none"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  daemon_ = *std::move(daemon);
  client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
  EXPECT_THAT(daemon_->stderr_output(), HasSubstr("UNSANDBOXED"));
  // What the sandbox forbids works here, which is also what shows the tests above can fail.
  Outcome free = RunScript("free", absl::StrCat(Probe("reached", Connect("127.0.0.1", server.port())), "\n",
                                                Probe("wrote_outside", absl::StrCat("touch ", dir_.path(), "/escaped"))));
  EXPECT_THAT(free.log, HasSubstr("reached=yes"));
  EXPECT_THAT(free.log, HasSubstr("wrote_outside=yes"));
}

// The daemon's children: the pool's helpers, and whatever a step left that is not reaped yet.
std::vector<pid_t> ChildrenOf(pid_t parent) {
  std::vector<pid_t> children;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return children;
  while (struct dirent* e = ::readdir(proc)) {
    pid_t pid;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    std::string stat = ReadFile(absl::StrCat("/proc/", pid, "/stat")).value_or("");
    // "pid (comm) state ppid ...": the comm may hold spaces, so read after its ')'.
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::vector<std::string> fields = absl::StrSplit(stat.substr(close + 2), ' ');
    pid_t ppid;
    if (fields.size() > 1 && absl::SimpleAtoi(fields[1], &ppid) && ppid == parent) children.push_back(pid);
  }
  ::closedir(proc);
  return children;
}

// A warm sandbox's helper whose stub reports the step's exit before the helper has read the
// whole claim (a short step, and a helper that waited for a CPU: seen under ctest -j2) still
// answers at once. It used to keep that early report unread until the stub gave up on it after
// 30 s, and the job stayed running that long.
TEST(WarmHelperTest, AReportThatCameBeforeTheClaimWasReadIsAnsweredAtOnce) {
  const std::string helper = SR_BINARY_DIR "/step-runner/step-runner-sandbox";
  if (::access("/usr/bin/bwrap", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/bwrap";
  sandbox::HelperPlan plan;
  plan.warm = true;
  plan.warnings_fd3 = true;
  int claim[2], spec[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, claim), 0);
  ASSERT_EQ(::pipe2(spec, O_CLOEXEC), 0);
  UniqueFd claim_read(claim[0]), claim_write(claim[1]), spec_read(spec[0]), spec_write(spec[1]);
  SR_ASSERT_OK_AND_ASSIGN(process::OutputPipe out, process::MakeOutputPipe());
  SR_ASSERT_OK_AND_ASSIGN(process::OutputPipe err, process::MakeOutputPipe());
  SR_ASSERT_OK_AND_ASSIGN(process::OutputPipe warnings, process::MakeOutputPipe());
  SR_ASSERT_OK_AND_ASSIGN(
      process::Subprocess child,
      process::Subprocess::Spawn({.argv = sandbox::HelperArgv(helper, plan,
                                                               sandbox::WarmBwrapArgv("/usr/bin/bwrap", helper,
                                                                                      ::getuid(), ::getgid())),
                                  .env = {},
                                  .work_dir = "/",
                                  .stdout_fd = out.write_end.get(),
                                  .stderr_fd = err.write_end.get(),
                                  .stdin_fd = claim_read.get(),
                                  .fd3 = warnings.write_end.get(),
                                  .fd4 = spec_read.get()}));
  claim_read.Close();
  spec_read.Close();
  out.write_end.Close();
  err.write_end.Close();
  warnings.write_end.Close();
  auto read_claim_channel = [&](absl::Duration within) {
    std::string said;
    const absl::Time until = absl::Now() + within;
    while (absl::Now() < until && said.find('\n') == std::string::npos && said != "R") {
      pollfd ready{.fd = claim_write.get(), .events = POLLIN};
      if (::poll(&ready, 1, 50) <= 0) continue;
      char buffer[64];
      ssize_t n = ::recv(claim_write.get(), buffer, sizeof buffer, 0);
      if (n <= 0) break;
      said.append(buffer, static_cast<size_t>(n));
    }
    return said;
  };
  if (read_claim_channel(absl::Seconds(10)) != "R") {
    (void)child.SignalGroup(SIGKILL);
    (void)child.Reap();
    GTEST_SKIP() << "bwrap cannot make a sandbox here";
  }
  // The step first, and time for it to run and for the stub to report; the claim after.
  SR_ASSERT_OK(WriteAll(spec_write.get(), sandbox::EncodeStubSpec({.cwd = "/", .argv = {"/bin/true"}})));
  spec_write.Close();
  absl::SleepFor(absl::Milliseconds(500));
  SR_ASSERT_OK(WriteAll(claim_write.get(), sandbox::EncodeClaim(sandbox::WarmClaim{})));
  ASSERT_EQ(::shutdown(claim_write.get(), SHUT_WR), 0);
  const absl::Time claimed = absl::Now();
  EXPECT_EQ(read_claim_channel(absl::Seconds(10)), "0\n");
  EXPECT_LT(absl::Now() - claimed, absl::Seconds(10));
  claim_write.Close();  // lets the helper go, and the sandbox with it
  SR_ASSERT_OK_AND_ASSIGN(int code, child.Reap());
  EXPECT_EQ(code, 0);
}

// For a job that never ended (seen twice in full ctest -j2 runs, never alone): where each of
// the daemon's threads waits in the kernel, and the processes under it, so that the next time
// the failure says which side is stuck.
std::string DescribeStall(pid_t daemon) {
  std::string out = "daemon threads (comm: wchan / kernel stack):\n";
  DIR* tasks = ::opendir(absl::StrCat("/proc/", daemon, "/task").c_str());
  while (struct dirent* e = tasks ? ::readdir(tasks) : nullptr) {
    if (e->d_name[0] == '.') continue;
    const std::string task = absl::StrCat("/proc/", daemon, "/task/", e->d_name);
    absl::StrAppend(&out, "  ", e->d_name, " ", absl::StripAsciiWhitespace(ReadFile(task + "/comm").value_or("?")),
                    ": ", ReadFile(task + "/wchan").value_or("?"), "\n",
                    ReadFile(task + "/stack").value_or(""));
  }
  if (tasks) ::closedir(tasks);
  std::vector<pid_t> level = {daemon};
  for (int depth = 1; depth <= 4 && !level.empty(); ++depth) {
    std::vector<pid_t> next;
    for (pid_t parent : level) {
      for (pid_t child : ChildrenOf(parent)) {
        std::string cmdline = ReadFile(absl::StrCat("/proc/", child, "/cmdline")).value_or("");
        std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
        absl::StrAppend(&out, std::string(2 * depth, ' '), child, " (parent ", parent, ", ",
                        ReadFile(absl::StrCat("/proc/", child, "/wchan")).value_or("?"), "): ", cmdline, "\n");
        next.push_back(child);
      }
    }
    level = std::move(next);
  }
  return out;
}

// Steps back to back, each job closed the moment it ends: the sandbox a step used (whose
// teardown can outlast the job) is reaped, nothing piles up, and the daemon keeps answering.
TEST_P(SandboxTest, JobsClosedTheMomentTheyEndLeaveNothingBehind) {
  START_OR_SKIP();
  for (int i = 0; i < 40; ++i) {
    const std::string id = absl::StrCat("quick-", i);
    SR_ASSERT_OK(client_->Run(Request(id, i % 2 ? "exec:\n  command: [/bin/true]\n" : "run:\n  - name: s\n    script: echo step\n")));
    absl::StatusOr<proto::Status> status = WaitForJob(*client_, id);
    ASSERT_TRUE(status.ok()) << status.status() << "\nlog so far: " << ReadLogSoFar(id) << "\n"
                             << DescribeStall(daemon_->pid());
    EXPECT_EQ(status->status(), proto::StepResult::success) << status->message();
    SR_ASSERT_OK(client_->Close(id));
  }
  Outcome after = RunScript("after", "echo still-serving");
  EXPECT_THAT(after.log, HasSubstr("still-serving"));
  SR_ASSERT_OK(client_->Close("after"));
  // What is left: at most the pool's ready sandboxes (2 by default), no zombie, no lingerer.
  const size_t allowed = warm() ? 2 : 0;
  std::vector<pid_t> children;
  for (int i = 0; i < 100; ++i) {
    children = ChildrenOf(daemon_->pid());
    if (children.size() <= allowed) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_LE(children.size(), allowed) << absl::StrJoin(children, " ");
}

// The stub hands the step its argv, environment and folder byte for byte, as bwrap does.
TEST_P(SandboxTest, TheStepGetsExactlyItsArgvEnvironmentAndFolder) {
  START_OR_SKIP();
  DirOutsideTmp tree;
  SR_ASSERT_OK(MakeDirs(tree.path() + "/sub dir", 0755));
  proto::RunRequest request = Request(
      "exact", "exec:\n  command: [/bin/sh, -c, 'printf \"<%s>\" \"$0\" \"$ODD\" \"$PWD\"', \"two  spaces\"]\n"
               "  work_dir: \"sub dir\"\n");
  (*request.mutable_env())["ODD"] = "a=b\nline two\t'quoted'";
  request.set_work_dir(tree.path());
  Outcome out = Run(request);
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_THAT(out.log, HasSubstr(absl::StrCat("<two  spaces><a=b\nline two\t'quoted'><", tree.path(), "/sub dir>")));
}

// Processes in the cgroups of the daemon with pid `daemon` (its pool's and its jobs').
std::vector<pid_t> ProcessesOfDaemonCgroups(pid_t daemon) {
  std::vector<pid_t> found;
  const std::string mark = absl::StrCat("/step-runner.", daemon, "/");
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return found;
  while (struct dirent* e = ::readdir(proc)) {
    pid_t pid;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    if (absl::StrContains(ReadFile(absl::StrCat("/proc/", pid, "/cgroup")).value_or(""), mark)) found.push_back(pid);
  }
  ::closedir(proc);
  return found;
}

// A daemon killed while its pool is being made (the first sandboxes are made right after it
// starts listening) leaves nothing running: each sandbox's helper sees its claim socket close
// and takes all of bwrap down, even mid-way through making the sandbox.
TEST(SandboxPoolTest, ADaemonKilledWhileItsPoolIsMadeLeavesNoProcessBehind) {
  for (int round = 0; round < 20; ++round) {
    TempDir dir;
    auto daemon = Daemon::Start(dir.path(), {"--sandbox=bwrap"});
    if (!daemon.ok()) GTEST_SKIP() << daemon.status();
    const pid_t pid = (*daemon)->pid();
    // The pool's processes are found through its cgroups ("<its own cgroup>/step-runner.PID");
    // without them there is no telling this daemon's sandboxes from another test's.
    bool has_cgroups = false;
    for (absl::string_view line : absl::StrSplit(ReadFile(absl::StrCat("/proc/", pid, "/cgroup")).value_or(""), '\n')) {
      std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
      if (parts.size() != 3) continue;
      for (const std::string& root : {absl::StrCat("/sys/fs/cgroup/", parts[1]), std::string("/sys/fs/cgroup")}) {
        has_cgroups = has_cgroups || ::access(absl::StrCat(root, parts[2], "/step-runner.", pid).c_str(), F_OK) == 0;
      }
    }
    if (!has_cgroups) GTEST_SKIP() << "no writable cgroup here";
    absl::SleepFor(absl::Milliseconds(2 * round));
    (*daemon)->Signal(SIGKILL);
    (void)(*daemon)->Wait(absl::Seconds(10));
    std::vector<pid_t> left;
    for (int i = 0; i < 60; ++i) {
      left = ProcessesOfDaemonCgroups(pid);
      if (left.empty()) break;
      absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_TRUE(left.empty()) << "round " << round << ": " << absl::StrJoin(left, " ");
    for (pid_t p : left) ::kill(p, SIGKILL);
  }
}

// A work tree whose path goes through a symlink is still the step's to write (the link is
// followed outside the sandbox, not into its read-only view of the system).
TEST_P(SandboxTest, AWorkTreeReachedThroughASymlinkIsWritable) {
  START_OR_SKIP();
  DirOutsideTmp base;
  SR_ASSERT_OK(MakeDirs(base.path() + "/real/tree", 0755));
  ASSERT_EQ(::symlink((base.path() + "/real").c_str(), (base.path() + "/link").c_str()), 0);
  proto::RunRequest request = Request("linked", "run:\n  - name: write\n    script: echo hi > made-here\n");
  request.set_work_dir(base.path() + "/link/tree");
  Outcome out = Run(request);
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log;
  EXPECT_EQ(ReadFile(base.path() + "/real/tree/made-here").value_or(""), "hi\n");
}

// A state dir in shared memory (a benchmark's, or a host whose only fast disk is tmpfs): the
// jobs' default trees lie under /dev/shm, which is not a system folder (the sandbox's /dev is a
// fresh one; the tree is bound into it). It used to be refused as one, so no job could start.
TEST_P(SandboxTest, AStateDirUnderDevShmRunsJobsInTheirOwnTrees) {
  DirOutsideTmp shm("/dev/shm");
  ASSERT_FALSE(shm.path().empty());
  START_OR_SKIP({}, shm.path());
  Outcome out = RunScript("in-shm", "echo hi > made-here\ncat made-here\nls /dev/shm | wc -l");
  EXPECT_EQ(out.status.status(), proto::StepResult::success) << out.log << out.status.message();
  EXPECT_THAT(out.log, HasSubstr("hi\n"));
  // The fresh /dev/shm shows only the way down to the job's tree, not the host's shared memory.
  EXPECT_THAT(out.log, HasSubstr("\n1\n"));
  proto::RunRequest other = Request("shm-root", "run:\n  - name: write\n    script: echo no > x\n");
  other.set_work_dir("/dev/shm");
  absl::Status refused = client_->Run(other);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
}

INSTANTIATE_TEST_SUITE_P(WarmAndCold, SandboxTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) { return info.param ? "Warm" : "Cold"; });

// A daemon that is not root (as in the workspace image): its warm sandboxes' stub mounts as
// root of bwrap's user namespace, then maps the daemon's uid back for the step. The step must
// run as that uid, with no capability, behind the same walls as a cold sandbox's.
TEST(SandboxUnprivilegedTest, AWarmSandboxOfANonRootDaemonKeepsItsWalls) {
  if (::getuid() != 0) GTEST_SKIP() << "this whole suite runs unprivileged already";
  constexpr uid_t kNobody = 65534;
  TempDir dir;
  ASSERT_EQ(::chown(dir.path().c_str(), kNobody, kNobody), 0);
  const std::vector<std::string> as_nobody = {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"};
  std::vector<std::string> probe = as_nobody;
  probe.insert(probe.end(), {"test", "-x", StepRunnerBinary()});
  absl::StatusOr<CommandResult> reachable = RunCommand(probe);
  if (!reachable.ok() || reachable->exit_code != 0) GTEST_SKIP() << "nobody cannot run " << StepRunnerBinary();
  auto daemon = Daemon::Start(dir.path(), {"--sandbox=bwrap"}, absl::Seconds(20), as_nobody);
  if (!daemon.ok()) {
    EXPECT_THAT(std::string(daemon.status().message()), HasSubstr("--sandbox=none"));
    GTEST_SKIP() << daemon.status();
  }
  EXPECT_THAT((*daemon)->stderr_output(), Not(HasSubstr("warm sandboxes do not work here")));
  client::Client client((*daemon)->ClientOptions());
  const std::string state = (*daemon)->state_dir();
  const std::string script = absl::StrCat(
      "echo uid=$(id -u) gid=$(id -g)\n", "grep CapEff /proc/self/status\n",
      // The warm path: the sandbox's first process is the stub, not the step's own bwrap.
      Probe("warm", "grep -q -- --stub /proc/1/cmdline"), "\n", Probe("wrote_tree", "touch ./in-tree"), "\n",
      Probe("wrote_etc", "touch /etc/sr-sandbox-test"), "\n",
      Probe("read_audit", absl::StrCat("test -s ", state, "/audit.log")), "\n",
      Probe("saw_host_root", "test -e /tmp/.step-runner-host"));
  proto::RunRequest request =
      Request("unprivileged", "run:\n  - name: probe\n    script: |\n" + Indent(script));
  SR_ASSERT_OK(client.Run(request));
  absl::StatusOr<proto::Status> status = WaitForJob(client, "unprivileged", absl::Seconds(60));
  ASSERT_TRUE(status.ok()) << status.status();
  std::string log = ReadLog(client, "unprivileged").value_or("");
  EXPECT_EQ(status->status(), proto::StepResult::success) << log;
  for (const char* line : {"uid=65534 gid=65534", "CapEff:\t0000000000000000", "warm=yes", "wrote_tree=yes",
                           "wrote_etc=no", "read_audit=no", "saw_host_root=no"}) {
    EXPECT_THAT(log, HasSubstr(line));
  }
}

TEST(SandboxStartTest, UnknownSandboxOrBadLimitsAreRefusedAtStart) {
  TempDir dir;
  auto bad = Daemon::Start(dir.path(), {"--sandbox=chroot"}, absl::Seconds(20));
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("--sandbox: expected bwrap or none"));
  auto allow = Daemon::Start(dir.path(), {"--sandbox=bwrap", "--network=allow"}, absl::Seconds(20));
  ASSERT_FALSE(allow.ok());
  EXPECT_THAT(std::string(allow.status().message()), HasSubstr("--allow-host"));
}

}  // namespace
}  // namespace step_runner::testing

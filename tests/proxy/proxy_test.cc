// End-to-end tests of workspace-proxy: the real step-runner daemon behind it, the stock OpenSSH
// client in front of it, and the step-runner CLI going through both with --via. Every assertion
// is about what a user sees: the bytes printed, exit codes, OpenSSH's messages, the audit trail.
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "step-runner/base/unique_fd.h"
#include "tests/helpers/tcp_relay.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/proxy/proxy_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// SIGKILLs `pid` through a pidfd if it still runs `marker` (so a reused pid is never hit).
bool KillIfStillOurs(pid_t pid, const std::string& marker) {
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return false;
  std::string cmdline = ReadFile(absl::StrCat("/proc/", pid, "/cmdline")).value_or("");
  std::string stat = ReadFile(absl::StrCat("/proc/", pid, "/stat")).value_or("");
  const size_t close = stat.rfind(')');
  const bool zombie = close == std::string::npos || close + 2 >= stat.size() || stat[close + 2] == 'Z';
  if (cmdline.find(marker) == std::string::npos || zombie) return false;
  return ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) == 0;
}

// Resident memory of a process, from /proc.
int64_t ResidentBytes(pid_t pid) {
  std::string status = ReadFile(absl::StrCat("/proc/", pid, "/status")).value_or("");
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    if (absl::ConsumePrefix(&line, "VmRSS:")) {
      int64_t kib = 0;
      (void)absl::SimpleAtoi(absl::StripSuffix(absl::StripAsciiWhitespace(line), " kB"), &kib);
      return kib * 1024;
    }
  }
  return -1;
}


// The local forge's GET /api/v4/user: two tokens, everything else 401.
class FakeForge {
 public:
  FakeForge() {
    server_.Get("/api/v4/user", [](const httplib::Request& request, httplib::Response& response) {
      const std::string token = request.get_header_value("PRIVATE-TOKEN");
      if (token == "alice-token-123") {
        response.set_content(R"({"id": 1, "username": "alice"})", "application/json");
      } else if (token == "bob-token-456") {
        response.set_content(R"({"id": 2, "username": "bob"})", "application/json");
      } else {
        response.status = 401;
        response.set_content(R"({"message": "401 Unauthorized"})", "application/json");
      }
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~FakeForge() {
    server_.stop();
    thread_.join();
  }
  std::string url() const { return absl::StrCat("http://127.0.0.1:", port_); }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

class ProxyTest : public ::testing::Test {
 protected:
  // Small limits, so that each one can be reached with a handful of connections.
  static constexpr char kLimits[] =
      "max_auth_tries: 3, max_auth_failures_per_address: 6, max_unauthenticated_per_address: 4, "
      "max_connections_per_user: 3, max_channels_per_connection: 3";

  void SetUp() override {
    auto daemon = Daemon::Start(dir_.path());
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
    SR_ASSERT_OK_AND_ASSIGN(alice_, MakeClientKey(dir_.path() + "/alice"));
    SR_ASSERT_OK_AND_ASSIGN(bob_, MakeClientKey(dir_.path() + "/bob"));
    SR_ASSERT_OK_AND_ASSIGN(mallory_, MakeClientKey(dir_.path() + "/mallory"));
  }

  // `ssh USER@proxy step-runner proxy` logging in with a token, which ssh reads from
  // SSH_ASKPASS (as an agent's wrapper would), from 127.0.0.4.
  CommandResult TokenSsh(const std::string& user, const std::string& token) {
    const std::string askpass = absl::StrCat(dir_.path(), "/askpass-", token);
    EXPECT_TRUE(WriteFileAtomically(askpass, absl::StrCat("#!/bin/sh\necho ", token, "\n"), 0700).ok());
    return Run(SshArgv(proxy_->port(), user, mallory_.path,
                       {"-o", "BatchMode=no", "-o", "PubkeyAuthentication=no", "-o",
                        "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1"},
                       {"-b", "127.0.0.4", "step-runner", "proxy"}),
               EnvironmentWith({"SSH_ASKPASS=" + askpass, "SSH_ASKPASS_REQUIRE=force"}));
  }

  void StartProxy(const std::string& limits = kLimits, const std::string& forge_url = "",
                  const std::string& extra_yaml = "") {
    auto proxy = ProxyProcess::Start({.dir = dir_.path(),
                                      .routing_yaml = Routing({"ws", "ws-cmd", "bob-ws", "limited"}),
                                      .limits_yaml = limits,
                                      .forge_url = forge_url,
                                      .extra_yaml = extra_yaml});
    ASSERT_TRUE(proxy.ok()) << proxy.status();
    proxy_ = *std::move(proxy);
  }

  // The routing file for some of: ws (alice, the daemon's socket), ws-cmd (alice, through a
  // `step-runner proxy` command), bob-ws (bob), limited (alice), ws2 (alice).
  std::string Routing(const std::vector<std::string>& names) const {
    std::string yaml = "workspaces:\n";
    for (const std::string& name : names) {
      const std::string& key = name == "bob-ws" ? bob_.public_line : alice_.public_line;
      const std::string owner = name == "bob-ws" ? "bob" : "alice";
      const std::string backend =
          name == "ws-cmd"
              ? absl::StrCat("{command: \"", StepRunnerBinary(), " proxy --socket ",
                             daemon_->socket_path(), "\"}")
              : absl::StrCat("{socket: ", daemon_->socket_path(), "}");
      absl::StrAppend(&yaml, "  ", name, ":\n    owner: ", owner, "\n    authorized_keys: [\"",
                      key, "\"]\n    backend: ", backend, "\n");
    }
    return yaml;
  }

  std::string StepFile(const std::string& name, const std::string& definition) {
    std::string path = absl::StrCat(dir_.path(), "/", name, ".yml");
    EXPECT_TRUE(WriteFileAtomically(path, Steps(definition), 0600).ok());
    return path;
  }

  // A job writing `bytes` of the known pattern in 16 KiB writes `delay_us` apart, then holding
  // until Release(name), so that a client can be followed (or disturbed) for as long as needed.
  std::string PatternJob(const std::string& name, int64_t bytes, int delay_us) {
    return StepFile(name, ShStep(absl::StrCat(PatternWriterBinary(), " ", bytes, " 16384 ", delay_us,
                                              " || exit 1; ", WaitForFileScript(ReleasePath(name)))));
  }
  std::string ReleasePath(const std::string& name) const { return dir_.path() + "/release-" + name; }
  absl::Status Release(const std::string& name) { return WriteFileAtomically(ReleasePath(name), "", 0600); }

  // The CLI with its resume points inside the test's folder.
  std::unique_ptr<Process> StartCli(const std::string& name, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {StepRunnerBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto process = Process::Start(argv, absl::StrCat(dir_.path(), "/", name),
                                  EnvironmentWith({"XDG_STATE_HOME=" + dir_.path() + "/state-" + name}));
    EXPECT_TRUE(process.ok()) << process.status();
    return process.ok() ? *std::move(process) : nullptr;
  }

  // Runs a command to the end (with a deadline).
  CommandResult Run(const std::vector<std::string>& argv, const std::vector<std::string>& env = {},
                    absl::Duration deadline = absl::Seconds(60)) {
    auto result = RunCommand(argv, deadline, env);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.value_or(CommandResult{});
  }

  std::string Ssh(const std::string& user, const ClientKey& key,
                  const std::vector<std::string>& options = {},
                  const std::vector<std::string>& args = {"step-runner", "proxy"}) {
    return SshCommand(proxy_->port(), user, key.path, options, args);
  }

  // `step-runner status` of job `id` through the proxy as `user`.
  CommandResult StatusVia(const std::string& user, const ClientKey& key, const std::string& id) {
    return Run({StepRunnerBinary(), "status", id, "--via", Ssh(user, key)});
  }

  // An OpenSSH ControlMaster connection to workspace "ws" with its control socket at `control`.
  void StartMaster(const std::string& control, std::unique_ptr<Process>* master) {
    auto started = Process::Start(SshArgv(proxy_->port(), "ws", alice_.path,
                                          {"-M", "-S", control, "-o", "ControlPersist=no"}, {"-N"}),
                                  dir_.path() + "/master");
    ASSERT_TRUE(started.ok()) << started.status();
    *master = *std::move(started);
    ASSERT_TRUE(PollUntil([&] { return ::access(control.c_str(), F_OK) == 0 || (*master)->Exited(); },
                          absl::Seconds(30)))
        << (*master)->err();
  }

  // `ssh -N -L local:/step-runner.sock ws@proxy`, once ssh has made the local socket.
  void StartForward(const std::string& local, std::unique_ptr<Process>* forward) {
    auto started = Process::Start(SshArgv(proxy_->port(), "ws", alice_.path,
                                          {"-N", "-L", absl::StrCat(local, ":/step-runner.sock")}),
                                  dir_.path() + "/forward");
    ASSERT_TRUE(started.ok()) << started.status();
    *forward = *std::move(started);
    ASSERT_TRUE(PollUntil([&] { return ::access(local.c_str(), F_OK) == 0 || (*forward)->Exited(); },
                          absl::Seconds(30)))
        << (*forward)->err();
  }

  // Connects to the unix socket `path` (retrying while ssh has not started listening on it),
  // and returns the connection.
  static UniqueFd ConnectTo(const std::string& path) {
    sockaddr_un addr{.sun_family = AF_UNIX};
    if (path.size() >= sizeof addr.sun_path) return UniqueFd();
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    UniqueFd fd;
    PollUntil(
        [&] {
          fd = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
          return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
        },
        absl::Seconds(30), absl::Milliseconds(10));
    return fd;
  }
  // True when a connection to `path` (an ssh -L socket) is closed from the far side with nothing
  // sent: the proxy refused the forward's channel.
  static bool ClosedWithNothing(const std::string& path) {
    UniqueFd fd = ConnectTo(path);
    pollfd pfd{.fd = fd.get(), .events = POLLIN};
    char byte;
    return fd && ::poll(&pfd, 1, 30000) == 1 && ::read(fd.get(), &byte, 1) == 0;
  }

  int CountAudit(const std::vector<std::string>& needles) const {
    int n = 0;
    for (const std::string& line : proxy_->AuditLines()) {
      bool all = true;
      for (const std::string& needle : needles) all = all && absl::StrContains(line, needle);
      n += all ? 1 : 0;
    }
    return n;
  }
  // The number of audit records with all of `needles`, once it reached `at_least` (or after 20s).
  // A record is written when its connection or channel has been torn down, which can be just
  // after the client saw the end.
  int AwaitAudit(const std::vector<std::string>& needles, int at_least) const {
    int n = 0;
    PollUntil([&] { return (n = CountAudit(needles)) >= at_least; }, absl::Seconds(20),
              absl::Milliseconds(20));
    return n;
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
  ClientKey alice_, bob_, mallory_;
  std::unique_ptr<ProxyProcess> proxy_;
};

// The three ways in that a stock OpenSSH client has: exec `step-runner proxy` (to a socket
// backend and to a command backend) and the `step-runner` subsystem. Output is byte-exact.
TEST_F(ProxyTest, ExecSubsystemAndCommandBackend) {
  StartProxy();
  constexpr int64_t kBytes = 512 << 10;
  const std::string file = StepFile("exec", ShStep(absl::StrCat(PatternWriterBinary(), " ", kBytes)));
  auto cli = StartCli("exec", {"run", file, "--id", "via-exec", "--follow", "--via", Ssh("ws", alice_)});
  ASSERT_NE(cli, nullptr);
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(60)));
  EXPECT_EQ(exit_code, 0) << cli->err();
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(cli->out() == expected) << Difference(cli->out(), expected);

  CommandResult logs = Run({StepRunnerBinary(), "logs", "via-exec", "--via",
                            Ssh("ws", alice_, {"-s"}, {"step-runner"})},
                           EnvironmentWith({"XDG_STATE_HOME=" + dir_.path() + "/state-logs"}));
  EXPECT_EQ(logs.exit_code, 0) << logs.err;
  EXPECT_TRUE(logs.out == expected) << Difference(logs.out, expected);

  CommandResult status = StatusVia("ws-cmd", alice_, "via-exec");
  EXPECT_EQ(status.exit_code, 0) << status.err;
  EXPECT_THAT(status.out, HasSubstr("success"));

  // The audit trail names the key by fingerprint, the workspace and the bytes moved.
  CommandResult fingerprint = Run({"ssh-keygen", "-l", "-E", "sha256", "-f", alice_.path + ".pub"});
  std::vector<std::string> words = absl::StrSplit(fingerprint.out, ' ');
  ASSERT_GE(words.size(), 2u);
  EXPECT_EQ(AwaitAudit({"\"event\":\"connection\"", "\"auth\":\"publickey\"",
                        absl::StrCat("\"key_fingerprint\":\"", words[1], "\""),
                        "\"workspace\":\"ws\""}, 2),
            2);
  EXPECT_EQ(AwaitAudit({"\"event\":\"connection\"", "\"workspace\":\"ws-cmd\""}, 1), 1);
  EXPECT_GE(AwaitAudit({"\"event\":\"channel\"", "\"kind\":\"subsystem\"", "\"end\":\"backend closed\""}, 1), 1);
  bool saw_stream = false;
  for (const std::string& line : proxy_->AuditLines()) {
    auto record = nlohmann::json::parse(line, nullptr, false);
    if (record.is_object() && record.value("kind", "") == "exec" &&
        record.value("bytes_to_client", int64_t{0}) > kBytes) {
      saw_stream = true;
    }
  }
  EXPECT_TRUE(saw_stream) << "no channel record carries the streamed log";
}

// One SSH connection (OpenSSH's ControlMaster) carries several step-runner channels at once, up
// to the per-connection limit; the next one is refused with a message.
// Connected sockets of the unix socket at `path` (/proc/net/unix lists each accepted connection
// under the listener's path, with state 03, connected).
int ConnectionsTo(const std::string& path) {
  absl::StatusOr<std::string> table = ReadFile("/proc/net/unix");
  if (!table.ok()) return 0;
  int count = 0;
  for (absl::string_view line : absl::StrSplit(*table, '\n', absl::SkipEmpty())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() >= 8 && fields[5] == "03" && fields[7] == path) ++count;
  }
  return count;
}

TEST_F(ProxyTest, SeveralChannelsOverOneConnection) {
  StartProxy();
  const std::string control = dir_.path() + "/ctl";
  std::unique_ptr<Process> master;
  ASSERT_NO_FATAL_FAILURE(StartMaster(control, &master));
  const std::vector<std::string> mux = {"-S", control, "-o", "ControlMaster=no"};

  // Three channels held open (their stdin stays open), the fourth is one too many.
  std::vector<std::unique_ptr<Process>> held(3);
  auto hold = [&](int i) {
    auto p = Process::Start({"sh", "-c", absl::StrCat("sleep 60 | ", Ssh("ws", alice_, mux))},
                            absl::StrCat(dir_.path(), "/held", i));
    if (p.ok()) held[i] = *std::move(p);
    return p.status();
  };
  const int before = ConnectionsTo(daemon_->socket_path());
  for (int i = 0; i < 3; ++i) SR_ASSERT_OK(hold(i));
  // Each held channel sent nothing; its bridge is a connection to the daemon's socket. Probing
  // before all three are there would take a holder's slot on a slow machine.
  ASSERT_TRUE(PollUntil([&] { return ConnectionsTo(daemon_->socket_path()) >= before + 3; }, absl::Seconds(30)))
      << "the holders': " << held[0]->err() << " | " << held[1]->err() << " | " << held[2]->err();
  std::string fourth_err;
  ASSERT_TRUE(PollUntil(
      [&] {
        CommandResult r = Run(SshArgv(proxy_->port(), "ws", alice_.path, mux, {"step-runner", "proxy"}));
        fourth_err = r.err;
        return absl::StrContains(r.err, "too many channels on this connection (limit 3)");
      },
      absl::Seconds(30), absl::Milliseconds(100)))
      << "the fourth channel's stderr: " << fourth_err << "\nthe holders': " << held[0]->err() << " | "
      << held[1]->err() << " | " << held[2]->err() << "\nthe master's: " << master->err();
  held.clear();  // SIGKILLs the holders: their channels close

  // Two jobs at once over the one connection, each streaming its own bytes.
  const std::string file_a = StepFile("a", ShStep(absl::StrCat(PatternWriterBinary(), " 200000 4096 1000")));
  const std::string file_b = StepFile("b", ShStep(absl::StrCat(PatternWriterBinary(), " 300000 4096 1000")));
  std::unique_ptr<Process> a, b;
  ASSERT_TRUE(PollUntil(
      [&] {
        // The killed holders' channels close asynchronously: retry until there is room.
        a = StartCli("a", {"run", file_a, "--id", "mux-a", "--follow", "--via", Ssh("ws", alice_, mux)});
        b = StartCli("b", {"run", file_b, "--id", "mux-b", "--follow", "--via", Ssh("ws", alice_, mux)});
        auto ea = a->Wait(absl::Seconds(60));
        auto eb = b->Wait(absl::Seconds(60));
        return ea.ok() && eb.ok() && *ea == 0 && *eb == 0;
      },
      absl::Seconds(60), absl::Milliseconds(200)))
      << a->err() << b->err();
  EXPECT_TRUE(a->out() == ExpectedPattern(200000)) << Difference(a->out(), ExpectedPattern(200000));
  EXPECT_TRUE(b->out() == ExpectedPattern(300000)) << Difference(b->out(), ExpectedPattern(300000));

  // All of that was one authenticated connection.
  master->Signal(SIGTERM);
  SR_ASSERT_OK(master->Wait(absl::Seconds(30)).status());
  ASSERT_GE(AwaitAudit({"\"event\":\"connection\"", "\"workspace\":\"ws\""}, 1), 1);
  int max_channels = 0;
  for (const std::string& line : proxy_->AuditLines()) {
    auto record = nlohmann::json::parse(line, nullptr, false);
    if (record.is_object() && record.value("event", "") == "connection") {
      max_channels = std::max(max_channels, record.value("channels", 0));
    }
  }
  EXPECT_GE(max_channels, 5);
}

// Everything but step-runner is refused, each with a message the user can act on.
TEST_F(ProxyTest, ForbiddenRequestsAreRefusedWithAMessage) {
  StartProxy();
  struct Case {
    std::vector<std::string> options;
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{}, {"ls", "/"}, "workspace-proxy: command not allowed: ls /"},
      {{}, {}, "workspace-proxy: interactive shells are not available"},
      {{"-tt"}, {}, "PTY allocation request failed"},
      {{"-s"}, {"sftp"}, "workspace-proxy: subsystem not allowed: sftp"},
      {{"-W", "127.0.0.1:22"}, {}, "stdio forwarding failed"},
  };
  for (const Case& c : cases) {
    CommandResult r = Run(SshArgv(proxy_->port(), "ws", alice_.path, c.options, c.args));
    EXPECT_NE(r.exit_code, 0) << absl::StrJoin(c.args, " ");
    EXPECT_THAT(r.err, HasSubstr(c.message)) << absl::StrJoin(c.args, " ");
  }
  CommandResult shell = Run(SshArgv(proxy_->port(), "ws", alice_.path, {}, {}));
  EXPECT_THAT(shell.err, HasSubstr("step-runner proxy"));  // says what is allowed

  // TCP forwarding (here from a local socket, `-L local.sock:host:port`): the channel is refused
  // and a client on the local socket sees the connection close.
  const std::string local = dir_.path() + "/local.sock";
  auto forward = Process::Start(SshArgv(proxy_->port(), "ws", alice_.path,
                                        {"-N", "-L", absl::StrCat(local, ":127.0.0.1:22")}),
                                dir_.path() + "/forward");
  ASSERT_TRUE(forward.ok());
  EXPECT_TRUE(ClosedWithNothing(local)) << (*forward)->err();
  ASSERT_TRUE(PollUntil([&] { return absl::StrContains((*forward)->err(), "administratively prohibited"); },
                        absl::Seconds(30)))
      << (*forward)->err();
  EXPECT_GE(AwaitAudit({"\"kind\":\"direct-tcpip\"", "\"end\":\"refused: channel type not allowed\""}, 1), 1);
  EXPECT_EQ(AwaitAudit({"\"end\":\"refused: command not allowed: ls /\""}, 1), 1);
}

// `ssh -N -L ./local.sock:/step-runner.sock ws@proxy`: a local socket that is the workspace's
// step-runner. The stock CLI talks to it as to a daemon on this machine; the forward is audited
// and counts against the channel limit like any channel.
TEST_F(ProxyTest, StreamLocalForwardingReachesTheWorkspace) {
  StartProxy();
  const std::string local = dir_.path() + "/local.sock";
  std::unique_ptr<Process> forward;
  ASSERT_NO_FATAL_FAILURE(StartForward(local, &forward));

  constexpr int64_t kBytes = 300 << 10;
  const std::string file = StepFile("local", ShStep(absl::StrCat(PatternWriterBinary(), " ", kBytes)));
  auto cli = StartCli("local", {"run", file, "--id", "via-streamlocal", "--follow", "--socket", local});
  ASSERT_NE(cli, nullptr);
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(60)));
  EXPECT_EQ(exit_code, 0) << cli->err() << forward->err();
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(cli->out() == expected) << Difference(cli->out(), expected);
  // The job is the workspace's: its daemon has it, and another way in sees it too.
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, client_->GetStatus("via-streamlocal"));
  EXPECT_EQ(status.status(), proto::StepResult::success);
  CommandResult again = Run({StepRunnerBinary(), "status", "via-streamlocal", "--socket", local});
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_THAT(again.out, HasSubstr("success"));

  // Each connection to the local socket is one channel; the limit (3) holds for them too.
  std::vector<UniqueFd> held;
  const int before = ConnectionsTo(daemon_->socket_path());
  for (int i = 0; i < 3; ++i) {
    held.push_back(ConnectTo(local));
    ASSERT_TRUE(held.back());
  }
  ASSERT_TRUE(PollUntil([&] { return ConnectionsTo(daemon_->socket_path()) >= before + 3; }, absl::Seconds(30)));
  EXPECT_TRUE(ClosedWithNothing(local));  // the fourth is refused
  ASSERT_TRUE(PollUntil([&] { return absl::StrContains(forward->err(), "open failed"); }, absl::Seconds(30)))
      << forward->err();
  held.clear();

  forward->Signal(SIGTERM);
  SR_ASSERT_OK(forward->Wait(absl::Seconds(30)).status());
  EXPECT_GE(AwaitAudit({"\"kind\":\"direct-streamlocal\"", "\"end\":\"refused: too many channels on this connection (limit 3)\""}, 1), 1);
  bool saw_stream = false;
  PollUntil(
      [&] {
        for (const std::string& line : proxy_->AuditLines()) {
          auto record = nlohmann::json::parse(line, nullptr, false);
          if (record.is_object() && record.value("kind", "") == "direct-streamlocal" &&
              record.value("bytes_to_client", int64_t{0}) > kBytes) {
            saw_stream = true;
          }
        }
        return saw_stream;
      },
      absl::Seconds(20));
  EXPECT_TRUE(saw_stream) << "no streamlocal channel record carries the streamed log";
}

// A forward added to a connection that carries a command channel (ControlMaster's `-O forward`)
// is refused while the command runs, and accepted once it is gone (proxy/README.md: libssh's
// packet-level log is off while a command streams).
TEST_F(ProxyTest, StreamLocalOnAConnectionCarryingACommandWaitsForItToEnd) {
  StartProxy();
  const std::string control = dir_.path() + "/ctl";
  std::unique_ptr<Process> master;
  ASSERT_NO_FATAL_FAILURE(StartMaster(control, &master));
  const std::vector<std::string> mux = {"-S", control, "-o", "ControlMaster=no"};
  const int before = ConnectionsTo(daemon_->socket_path());
  auto command = Process::Start({"sh", "-c", absl::StrCat("sleep 60 | ", Ssh("ws", alice_, mux))}, dir_.path() + "/held");
  ASSERT_TRUE(command.ok()) << command.status();
  ASSERT_TRUE(PollUntil([&] { return ConnectionsTo(daemon_->socket_path()) >= before + 1; }, absl::Seconds(30)));

  const std::string local = dir_.path() + "/added.sock";
  CommandResult added = Run(SshArgv(proxy_->port(), "ws", alice_.path,
                                    {"-S", control, "-O", "forward", "-L", absl::StrCat(local, ":/step-runner.sock")}));
  ASSERT_EQ(added.exit_code, 0) << added.err;
  EXPECT_TRUE(ClosedWithNothing(local));
  EXPECT_GE(AwaitAudit({"\"kind\":\"unknown\"", "\"end\":\"refused: channel type not allowed\""}, 1), 1);

  command->reset();  // SIGKILLs the holder: its channel closes
  ASSERT_TRUE(PollUntil([&] { return ConnectionsTo(daemon_->socket_path()) <= before; }, absl::Seconds(30)));
  CommandResult status;
  ASSERT_TRUE(PollUntil(
      [&] {
        status = Run({StepRunnerBinary(), "status", "--socket", local});
        return status.exit_code == 0;
      },
      absl::Seconds(30), absl::Milliseconds(200)))
      << status.err << master->err();
  master->Signal(SIGTERM);
  SR_ASSERT_OK(master->Wait(absl::Seconds(30)).status());
}

// `streamlocal: false` in the proxy's config: the forward's channel is refused, as any other.
TEST_F(ProxyTest, StreamLocalCanBeTurnedOff) {
  StartProxy(kLimits, "", "streamlocal: false\n");
  const std::string local = dir_.path() + "/local.sock";
  std::unique_ptr<Process> forward;
  ASSERT_NO_FATAL_FAILURE(StartForward(local, &forward));
  EXPECT_TRUE(ClosedWithNothing(local));
  ASSERT_TRUE(PollUntil([&] { return absl::StrContains(forward->err(), "administratively prohibited"); },
                        absl::Seconds(30)))
      << forward->err();
  EXPECT_GE(AwaitAudit({"\"kind\":\"unknown\"", "\"end\":\"refused: channel type not allowed\""}, 1), 1);
}

// Unknown keys, wrong tokens, unknown workspaces, a handshake flood, a password-guessing address
// and too many connections are each refused, while another user's job streams through the proxy
// from start to end, byte for byte.
TEST_F(ProxyTest, BadActorsAreRefusedWhileOthersWork) {
  FakeForge forge;
  StartProxy(kLimits, forge.url());
  constexpr int64_t kBytes = 2 << 20;
  const std::string file = PatternJob("bob", kBytes, 20000);
  auto bob = StartCli("bob", {"run", file, "--id", "bob-job", "--follow", "--via", Ssh("bob-ws", bob_)});
  ASSERT_NE(bob, nullptr);
  ASSERT_TRUE(PollUntil([&] { return !bob->out().empty() || bob->Exited(); }, absl::Seconds(60)))
      << bob->err();

  // Keys: unknown key, a key of another workspace, an unknown workspace.
  for (auto [user, key] : {std::pair{"ws", &mallory_}, std::pair{"bob-ws", &alice_},
                           std::pair{"no-such-workspace", &alice_}}) {
    CommandResult r = Run(SshArgv(proxy_->port(), user, key->path, {}, {"step-runner", "proxy"}));
    EXPECT_EQ(r.exit_code, 255) << user;
    EXPECT_THAT(r.err, HasSubstr("Permission denied")) << user;
  }

  // Tokens, through the forge: alice's token opens alice's workspace, not bob's; a wrong one
  // opens nothing. ssh reads the token from SSH_ASKPASS (as an agent's wrapper would).
  EXPECT_EQ(TokenSsh("bob-ws", "alice-token-123").exit_code, 255);
  EXPECT_EQ(TokenSsh("ws", "wrong-token-789").exit_code, 255);
  {
    const std::string askpass = dir_.path() + "/askpass-good";
    SR_ASSERT_OK(WriteFileAtomically(askpass, "#!/bin/sh\necho alice-token-123\n", 0700));
    CommandResult ok = Run({StepRunnerBinary(), "status", "bob-job", "--via",
                            SshCommand(proxy_->port(), "ws", mallory_.path,
                                       {"-o", "BatchMode=no", "-o", "PubkeyAuthentication=no", "-o",
                                        "PreferredAuthentications=password"},
                                       {"step-runner", "proxy"})},
                           EnvironmentWith({"SSH_ASKPASS=" + askpass, "SSH_ASKPASS_REQUIRE=force"}));
    EXPECT_EQ(ok.exit_code, 0) << ok.err;
    EXPECT_THAT(ok.out, HasSubstr("bob-job"));
  }
  EXPECT_EQ(AwaitAudit({"\"auth\":\"token\"", "\"token_user\":\"alice\""}, 1), 1);

  // A handshake flood from one address: past 4 unauthenticated connections, the proxy closes
  // new ones at once (no SSH banner). Meanwhile alice, from another address, gets in.
  std::vector<UniqueFd> flood;
  int refused = 0;
  for (int i = 0; i < 12; ++i) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in from{.sin_family = AF_INET, .sin_port = 0, .sin_addr = {htonl(0x7f000002)}};
    sockaddr_in to{.sin_family = AF_INET, .sin_port = htons(static_cast<uint16_t>(proxy_->port())),
                   .sin_addr = {htonl(0x7f000001)}};
    ASSERT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&from), sizeof from), 0);
    ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&to), sizeof to), 0);
    pollfd pfd{.fd = fd.get(), .events = POLLIN};
    char banner[256];
    // The proxy speaks first: its version line, or EOF when it refused the connection.
    if (::poll(&pfd, 1, 20000) == 1 && ::read(fd.get(), banner, sizeof banner) == 0) ++refused;
    flood.push_back(std::move(fd));
  }
  EXPECT_EQ(refused, 12 - 4);
  CommandResult during_flood = StatusVia("ws", alice_, "bob-job");
  EXPECT_EQ(during_flood.exit_code, 0) << during_flood.err;
  flood.clear();

  // Guessing from one address: after 6 failures the address is refused even with a good key.
  for (int i = 0; i < 6; ++i) {
    Run(SshArgv(proxy_->port(), "ws", mallory_.path, {"-b", "127.0.0.3"}, {"step-runner", "proxy"}));
  }
  CommandResult blocked = Run(SshArgv(proxy_->port(), "ws", alice_.path, {"-b", "127.0.0.3"},
                                      {"step-runner", "proxy"}));
  EXPECT_EQ(blocked.exit_code, 255);
  EXPECT_THAT(blocked.err, Not(HasSubstr("Permission denied")));  // refused before auth
  EXPECT_GE(AwaitAudit({"\"end\":\"refused: too many authentication failures from this address\""}, 1), 1);

  // Connections per user: three held, the fourth is told why.
  // The fourth is probed only once the three are in (ssh runs LocalCommand after it
  // authenticates): a probe that raced them would take one's place and leave with it.
  std::vector<std::unique_ptr<Process>> held;
  std::vector<std::string> in;
  for (int i = 0; i < 3; ++i) {
    in.push_back(absl::StrCat(dir_.path(), "/limited", i, ".in"));
    auto p = Process::Start(SshArgv(proxy_->port(), "limited", alice_.path,
                                    {"-N", "-o", "PermitLocalCommand=yes", "-o", "LocalCommand=touch " + in.back()}),
                            absl::StrCat(dir_.path(), "/limited", i));
    ASSERT_TRUE(p.ok());
    held.push_back(*std::move(p));
  }
  auto all_in = [&] {
    return std::all_of(in.begin(), in.end(), [](const std::string& f) { return ::access(f.c_str(), F_OK) == 0; });
  };
  ASSERT_TRUE(PollUntil(all_in, absl::Seconds(30), absl::Milliseconds(20)));
  std::string last_refusal;
  ASSERT_TRUE(PollUntil(
      [&] {
        CommandResult r = Run(SshArgv(proxy_->port(), "limited", alice_.path, {}, {"step-runner", "proxy"}));
        last_refusal = r.err;
        return absl::StrContains(r.err, "too many connections for workspace \"limited\" (limit 3)");
      },
      absl::Seconds(30), absl::Milliseconds(100)))
      << "the fourth connection's last answer: " << last_refusal << "\nthe held ones said: "
      << [&] {
           std::string said;
           for (const auto& p : held) absl::StrAppend(&said, p->err(), "\n");
           return said;
         }();
  held.clear();

  // Bob never noticed.
  SR_ASSERT_OK(Release("bob"));
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, bob->Wait(absl::Seconds(120)));
  EXPECT_EQ(exit_code, 0) << bob->err();
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(bob->out() == expected) << Difference(bob->out(), expected);
  EXPECT_THAT(bob->err(), Not(HasSubstr("reconnecting")));
  // No secret in the audit trail or the proxy's log.
  const std::string audit = ReadFile(proxy_->audit_path()).value_or("");
  for (const char* secret : {"alice-token-123", "wrong-token-789"}) {
    EXPECT_THAT(audit, Not(HasSubstr(secret)));
    EXPECT_THAT(proxy_->stderr_output(), Not(HasSubstr(secret)));
  }
}

// A client that stops reading (its ssh is SIGSTOPped) holds only its own stream: another
// session streams in full meanwhile, the proxy's memory stays bounded, and the stopped client,
// continued, gets every byte.
TEST_F(ProxyTest, ClientThatStopsReadingIsContained) {
  StartProxy();
  constexpr int64_t kBig = 64 << 20;
  const std::string pid_file = dir_.path() + "/stalled.pids";
  const std::string file = StepFile("big", ShStep(absl::StrCat(PatternWriterBinary(), " ", kBig, " 262144")));
  auto stalled = StartCli("stalled", {"run", file, "--id", "big", "--follow", "--via",
                                      absl::StrCat("echo $$ >> ", pid_file, "; exec ",
                                                   Ssh("bob-ws", bob_))});
  ASSERT_NE(stalled, nullptr);
  ASSERT_TRUE(PollUntil([&] { return stalled->out().size() > (1 << 20) || stalled->Exited(); },
                        absl::Seconds(60)));
  const std::vector<pid_t> pids = ReadPids(pid_file);
  ASSERT_FALSE(pids.empty());
  ASSERT_EQ(::kill(pids.back(), SIGSTOP), 0);
  const int64_t rss_before = ResidentBytes(proxy_->pid());

  // The whole 64 MiB job ends while its client is stopped.
  ASSERT_TRUE(PollUntil(
      [&] {
        auto status = client_->GetStatus("big");
        return status.ok() && status->status() != proto::StepResult::running;
      },
      absl::Seconds(120), absl::Milliseconds(50)));
  constexpr int64_t kOther = 4 << 20;
  const std::string other_file = StepFile("other", ShStep(absl::StrCat(PatternWriterBinary(), " ", kOther)));
  auto other = StartCli("other", {"run", other_file, "--id", "other", "--follow", "--via", Ssh("ws", alice_)});
  SR_ASSERT_OK_AND_ASSIGN(int other_exit, other->Wait(absl::Seconds(60)));
  EXPECT_EQ(other_exit, 0) << other->err();
  EXPECT_TRUE(other->out() == ExpectedPattern(kOther)) << Difference(other->out(), ExpectedPattern(kOther));
  const int64_t rss_after = ResidentBytes(proxy_->pid());
  // Bounded buffering: a few windows and buffers, nowhere near the 60+ MiB the job wrote.
  EXPECT_LT(rss_after - rss_before, 16 << 20) << rss_before << " -> " << rss_after;
  const int64_t printed_while_stopped = static_cast<int64_t>(stalled->out().size());
  EXPECT_LT(printed_while_stopped, 32 << 20);

  ASSERT_EQ(::kill(pids.back(), SIGCONT), 0);
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, stalled->Wait(absl::Seconds(120)));
  EXPECT_EQ(exit_code, 0) << stalled->err();
  EXPECT_TRUE(stalled->out() == ExpectedPattern(kBig)) << Difference(stalled->out(), ExpectedPattern(kBig));
}

// The routing file changes under a live stream: a new workspace becomes reachable, a removed
// one refuses new connections, and the open connection streams on to the end.
TEST_F(ProxyTest, RoutingReloadKeepsOpenConnections) {
  StartProxy();
  constexpr int64_t kBytes = 1 << 20;
  const std::string file = PatternJob("reload", kBytes, 5000);
  auto cli = StartCli("reload", {"run", file, "--id", "reload", "--follow", "--via", Ssh("ws", alice_)});
  ASSERT_TRUE(PollUntil([&] { return !cli->out().empty() || cli->Exited(); }, absl::Seconds(60)));

  SR_ASSERT_OK(proxy_->WriteRouting(Routing({"ws2", "bob-ws"})));
  ASSERT_TRUE(PollUntil([&] { return StatusVia("ws2", alice_, "reload").exit_code == 0; },
                        absl::Seconds(30), absl::Milliseconds(100)));
  // (Plain ssh: the CLI would keep retrying a workspace that is gone.)
  CommandResult removed = Run(SshArgv(proxy_->port(), "ws", alice_.path, {}, {"step-runner", "proxy"}));
  EXPECT_EQ(removed.exit_code, 255);
  EXPECT_THAT(removed.err, HasSubstr("Permission denied"));
  // A broken routing file is not loaded; the last good one stays.
  SR_ASSERT_OK(proxy_->WriteRouting("workspaces: [not, a, mapping]\n"));
  ASSERT_TRUE(PollUntil([&] { return absl::StrContains(proxy_->stderr_output(), "routing not reloaded"); },
                        absl::Seconds(30)));
  EXPECT_EQ(StatusVia("ws2", alice_, "reload").exit_code, 0);

  SR_ASSERT_OK(Release("reload"));
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(60)));
  EXPECT_EQ(exit_code, 0) << cli->err();
  EXPECT_TRUE(cli->out() == ExpectedPattern(kBytes)) << Difference(cli->out(), ExpectedPattern(kBytes));
  EXPECT_THAT(cli->err(), Not(HasSubstr("reconnecting")));
}

// An idle connection is closed; the host key is made once, owner-only, and kept across restarts.
TEST_F(ProxyTest, IdleTimeoutAndPersistentHostKey) {
  StartProxy("idle_timeout: 1s");
  const std::string key_path = dir_.path() + "/host_ed25519";
  struct stat st;
  ASSERT_EQ(::stat(key_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const std::string key = ReadFile(key_path).value_or("");

  auto idle = Process::Start(SshArgv(proxy_->port(), "ws", alice_.path, {"-N"}), dir_.path() + "/idle");
  ASSERT_TRUE(idle.ok());
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, (*idle)->Wait(absl::Seconds(30)));
  EXPECT_EQ(exit_code, 255);
  EXPECT_EQ(AwaitAudit({"\"end\":\"idle timeout\""}, 1), 1);

  SR_ASSERT_OK(proxy_->Restart(SIGTERM));
  EXPECT_EQ(ReadFile(key_path).value_or(""), key);
  EXPECT_EQ(StatusVia("ws", alice_, "none").exit_code, 66);  // reached the daemon: no such job
}

// With the forge down, a token login to a workspace that exists and to one that does not get
// the same answer (the first used to be told the forge was unavailable: names were enumerable).
TEST_F(ProxyTest, WithTheForgeDownKnownAndUnknownWorkspacesGetTheSameAnswer) {
  UniqueFd closed(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof addr;
  ASSERT_EQ(::bind(closed.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::getsockname(closed.get(), reinterpret_cast<sockaddr*>(&addr), &length), 0);
  // Bound, never listening: a connection to it is refused, as to a forge that is down.
  StartProxy(kLimits, absl::StrCat("http://127.0.0.1:", ntohs(addr.sin_port)));
  CommandResult known = TokenSsh("ws", "alice-token-123");
  CommandResult unknown = TokenSsh("no-such-workspace", "alice-token-123");
  EXPECT_EQ(known.exit_code, 255);
  EXPECT_EQ(unknown.exit_code, 255);
  EXPECT_THAT(known.err, HasSubstr("forge unavailable"));
  EXPECT_EQ(absl::StrReplaceAll(known.err, {{"ws@", "USER@"}}),
            absl::StrReplaceAll(unknown.err, {{"no-such-workspace@", "USER@"}}));
}

// A client that connects and then says nothing (before the key exchange) must not hold up a
// shutdown: SIGTERM used to wait out the login grace, then exit 1 ("connections still open").
TEST_F(ProxyTest, ShutdownDoesNotWaitForAClientStalledBeforeTheKeyExchange) {
  StartProxy();
  UniqueFd stalled(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(proxy_->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(stalled.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  // The proxy's banner says it has taken the connection into its key exchange.
  pollfd pfd{.fd = stalled.get(), .events = POLLIN};
  ASSERT_EQ(::poll(&pfd, 1, 10000), 1);
  char banner[64] = {};
  ASSERT_GT(::read(stalled.get(), banner, sizeof banner - 1), 0);
  EXPECT_EQ(std::string(banner).rfind("SSH-2.0", 0), 0u) << banner;
  const absl::Time start = absl::Now();
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, proxy_->Stop(SIGTERM));
  EXPECT_EQ(exit_code, 0) << proxy_->stderr_output();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // the login grace here is 20 s
  EXPECT_EQ(AwaitAudit({"\"end\":\"proxy shutdown\""}, 1), 1);
}

// THE CHAOS TEST. A job streams a known byte pattern through the proxy to the CLI, whose ssh is
// SIGKILLed at random points over 100 times while the proxy itself is restarted a few times (by
// SIGKILL and by SIGTERM). The CLI must print exactly the job's log, and the job must end once,
// successfully, never having noticed.
TEST_F(ProxyTest, ChaosSshKilled100TimesAndProxyRestarted) {
  StartProxy();
  constexpr int kKills = 100;
  constexpr int kRestartEvery = 30;  // proxy restarts after kill 30, 60 and 90
  constexpr int64_t kBytes = 8 << 20;
  const std::string pid_file = dir_.path() + "/ssh.pids";
  // About 25s of output in 16 KiB writes, then the job waits until the test made all its kills.
  const std::string file = PatternJob("chaos", kBytes, 50000);
  const std::string via = absl::StrCat("echo $$ >> ", pid_file, "; exec ", Ssh("ws", alice_),
                                       " 2>> ", dir_.path(), "/ssh.stderr");
  auto cli = StartCli("chaos", {"run", file, "--id", "chaos", "--follow", "--via", via});
  ASSERT_NE(cli, nullptr);

  const unsigned seed = std::random_device()();
  std::mt19937 rng(seed);
  SCOPED_TRACE(absl::StrCat("random seed ", seed));
  // How long each ssh lives before it is killed: from mid-handshake to mid-stream.
  std::uniform_int_distribution<int> life_ms(5, 250);
  int kills = 0, kills_mid_stream = 0, restarts = 0;
  size_t seen = 0;
  const absl::Time start = absl::Now();
  while (kills < kKills && !cli->Exited()) {
    std::vector<pid_t> pids;
    // The client's longest backoff is 2s; a new dial must come well within this.
    ASSERT_TRUE(PollUntil(
        [&] {
          pids = ReadPids(pid_file);
          return pids.size() > seen || cli->Exited();
        },
        absl::Seconds(30), absl::Milliseconds(1)))
        << "no new ssh after " << kills << " kills; " << cli->err();
    if (cli->Exited()) break;
    seen = pids.size();
    absl::SleepFor(absl::Milliseconds(life_ms(rng)));
    const int64_t printed = static_cast<int64_t>(cli->out().size());
    if (KillIfStillOurs(pids.back(), "ssh")) {
      ++kills;
      if (printed > 0 && printed < kBytes) ++kills_mid_stream;
      if (kills % kRestartEvery == 0) {
        SR_ASSERT_OK(proxy_->Restart(restarts % 2 == 0 ? SIGKILL : SIGTERM));
        ++restarts;
      }
    }
  }
  const absl::Duration chaos = absl::Now() - start;
  SR_ASSERT_OK(Release("chaos"));
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(120)));
  EXPECT_EQ(exit_code, 0) << cli->err();
  EXPECT_GE(kills, kKills);
  EXPECT_EQ(restarts, kKills / kRestartEvery);
  EXPECT_GE(kills_mid_stream, 10);
  std::cerr << kills << " ssh connections killed and " << restarts << " proxy restarts in " << chaos
            << "; " << kills_mid_stream << " kills while the log streamed\n";

  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "chaos"));
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(log == expected) << "the job's log: " << Difference(log, expected);
  EXPECT_TRUE(cli->out() == log) << "the CLI's output: " << Difference(cli->out(), log);
  // One job, one result: the daemon saw a single Run and a single successful end.
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, client_->GetStatus("chaos"));
  EXPECT_EQ(status.status(), proto::StepResult::success);
  SR_ASSERT_OK_AND_ASSIGN(std::vector<proto::Status> jobs, client_->ListJobs());
  EXPECT_EQ(jobs.size(), 1u);
}

// The CLI's built-in SSH client (--ssh, libssh) instead of --via: the same byte-exact stream
// across two proxy restarts (the persisted host key keeps known_hosts valid), and a server whose
// host key is not in known_hosts is refused at once with a message, not retried for minutes.
TEST_F(ProxyTest, BuiltInSshClientResumesAcrossProxyRestarts) {
  StartProxy();
  SR_ASSERT_OK_AND_ASSIGN(CommandResult host_key,
                          RunCommand({"ssh-keygen", "-y", "-f", dir_.path() + "/host_ed25519"}));
  const std::string known_hosts = dir_.path() + "/known_hosts";
  SR_ASSERT_OK(WriteFileAtomically(
      known_hosts, absl::StrCat("[127.0.0.1]:", proxy_->port(), " ", host_key.out), 0600));
  const std::string target = absl::StrCat("ws@127.0.0.1:", proxy_->port());

  const std::string empty_known_hosts = dir_.path() + "/empty_known_hosts";
  SR_ASSERT_OK(WriteFileAtomically(empty_known_hosts, "", 0600));
  CommandResult unknown = Run({StepRunnerBinary(), "status", "--ssh", target, "--ssh-key",
                               alice_.path, "--ssh-known-hosts", empty_known_hosts});
  EXPECT_NE(unknown.exit_code, 0);
  EXPECT_THAT(unknown.err, HasSubstr("host key is not in known_hosts"));

  constexpr int64_t kBytes = 4 << 20;
  const std::string file = PatternJob("builtin", kBytes, 10000);
  auto cli = StartCli("builtin", {"run", file, "--id", "builtin", "--follow", "--ssh", target,
                                  "--ssh-key", alice_.path, "--ssh-known-hosts", known_hosts});
  ASSERT_NE(cli, nullptr);
  for (int restart = 0; restart < 2; ++restart) {
    const size_t before = cli->out().size();
    ASSERT_TRUE(PollUntil([&] { return cli->out().size() > before + 65536 || cli->Exited(); },
                          absl::Seconds(60)))
        << cli->err();
    SR_ASSERT_OK(proxy_->Restart(SIGKILL));
  }
  SR_ASSERT_OK(Release("builtin"));
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(120)));
  EXPECT_EQ(exit_code, 0) << cli->err();
  EXPECT_THAT(cli->err(), HasSubstr("reconnecting"));  // the restarts did cut it
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(cli->out() == expected) << Difference(cli->out(), expected);
}

// A network drop under the built-in client: a TCP hop between it and the proxy (a NAT, a load
// balancer) ends its connection 45 times, at random points from the middle of the SSH handshake
// to the middle of the stream. A cut during the key exchange or the authentication is a failed
// dial to retry, not a refused key: the CLI prints the job's log byte for byte and exits 0, and
// the daemon ran one job.
TEST_F(ProxyTest, BuiltInSshClientResumesAcrossCutTcpConnections) {
  StartProxy();
  SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<TcpRelay> relay, TcpRelay::Start(proxy_->port()));
  SR_ASSERT_OK_AND_ASSIGN(CommandResult host_key,
                          RunCommand({"ssh-keygen", "-y", "-f", dir_.path() + "/host_ed25519"}));
  const std::string known_hosts = dir_.path() + "/known_hosts";
  SR_ASSERT_OK(WriteFileAtomically(
      known_hosts, absl::StrCat("[127.0.0.1]:", relay->port(), " ", host_key.out), 0600));

  constexpr int kCuts = 45;
  constexpr int64_t kBytes = 4 << 20;
  // About 10 s of output in 16 KiB writes, then the job waits until the test made all its cuts.
  const std::string file = PatternJob("cut", kBytes, 40000);
  auto cli = StartCli("cut", {"run", file, "--id", "cut", "--follow", "--ssh",
                              absl::StrCat("ws@127.0.0.1:", relay->port()), "--ssh-key", alice_.path,
                              "--ssh-known-hosts", known_hosts});
  ASSERT_NE(cli, nullptr);

  const unsigned seed = std::random_device()();
  std::mt19937 rng(seed);
  SCOPED_TRACE(absl::StrCat("random seed ", seed));
  // A handshake here takes ~5-10 ms: two cuts in three come in the first 12 ms of a connection,
  // into its key exchange or authentication; the third once the connection delivered (the CLI
  // printed more), up to 100 ms later, so that the stream moves on however slow the machine.
  // (With a cut during the authentication taken for a refused key, as before this test, 3 of 3
  // runs failed: "the key was refused", exit 65.)
  std::uniform_int_distribution<int> early_ms(0, 12), late_ms(0, 100);
  int cuts = 0, cuts_mid_stream = 0;
  int64_t seen = 0;
  while (cuts < kCuts && !cli->Exited()) {
    ASSERT_TRUE(PollUntil([&] { return relay->connections() > seen || cli->Exited(); }, absl::Seconds(30),
                          absl::Milliseconds(1)))
        << "no new connection after " << cuts << " cuts; " << cli->err();
    if (cli->Exited()) break;
    seen = relay->connections();
    if (cuts % 3 != 2) {
      absl::SleepFor(absl::Milliseconds(early_ms(rng)));
    } else {
      const size_t before = cli->out().size();
      ASSERT_TRUE(PollUntil(
          [&] {
            const size_t now = cli->out().size();
            return now > before || now >= static_cast<size_t>(kBytes) || cli->Exited();
          },
          absl::Seconds(30), absl::Milliseconds(1)))
          << "nothing printed over connection " << seen << "; " << cli->err();
      absl::SleepFor(absl::Milliseconds(late_ms(rng)));
    }
    const int64_t printed = static_cast<int64_t>(cli->out().size());
    relay->Cut();
    ++cuts;
    if (printed > 0 && printed < kBytes) ++cuts_mid_stream;
  }
  SR_ASSERT_OK(Release("cut"));
  SR_ASSERT_OK_AND_ASSIGN(int exit_code, cli->Wait(absl::Seconds(120)));
  EXPECT_EQ(exit_code, 0) << cli->err();
  EXPECT_EQ(cuts, kCuts) << cli->err();
  EXPECT_GE(cuts_mid_stream, 5);
  EXPECT_THAT(cli->err(), HasSubstr("reconnecting"));
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(cli->out() == expected) << "the CLI's output: " << Difference(cli->out(), expected);
  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "cut"));
  EXPECT_TRUE(log == expected) << "the job's log: " << Difference(log, expected);
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, client_->GetStatus("cut"));
  EXPECT_EQ(status.status(), proto::StepResult::success);
  SR_ASSERT_OK_AND_ASSIGN(std::vector<proto::Status> jobs, client_->ListJobs());
  EXPECT_EQ(jobs.size(), 1u);
}

}  // namespace
}  // namespace step_runner::testing

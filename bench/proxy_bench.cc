// proxy_bench: workspace-proxy against OpenSSH's sshd on loopback, side by side in one run.
//
//   1. dispatch:   run-to-completion of `exec: [/bin/true]` through a warm proxy connection
//                  (one ssh process carrying gRPC; RunAndFollow to the end) vs
//                  `ssh host /bin/true` with a fresh connection each time vs the same through
//                  an OpenSSH ControlMaster connection; the bwrap side also with pauses
//                  between commands (--gap_ms, 50 and 250 ms: the sandbox pool refills in
//                  such pauses; an agent's model call takes longer);
//   2. throughput: a job's N MiB log followed through the proxy (FollowLogs over ssh; and over a
//      streamlocal forward, `ssh -N -L`) vs
//                  `ssh host cat FILE` of the same bytes through sshd, both with one cipher;
//   3. reconnect:  the connection under a following client is cut (`--via 'ssh ...'`: the ssh
//                  process SIGKILLed; the built-in `--ssh` client: its TCP connection shut
//                  down by a relay in between); the time from the cut to the first byte the
//                  client receives again.
//
// The bench starts its own sshd (temporary config and host key, 127.0.0.1, an unused port; as
// root it creates /run/sshd, sshd's privilege-separation directory, when missing), its own
// step-runner daemon and its own workspace-proxy. Both sides of each comparison alternate in
// one process; the machine is shared, so compare within a run.
//
//   proxy_bench [--quick] [--runs N] [--log_mib N] [--reconnects N] [--cipher C] [--markdown F]
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <cerrno>
#include <iostream>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "bench/bench_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"
#include "tests/helpers/tcp_relay.h"

ABSL_FLAG(bool, quick, false, "smoke-test sizes (CTest): a few runs, 16 MiB, 3 reconnects");
ABSL_FLAG(int, runs, 200, "timed dispatch runs per side");
ABSL_FLAG(int, warmup, 10, "untimed dispatch runs per side first");
ABSL_FLAG(std::vector<std::string>, gap_ms, std::vector<std::string>({"50", "250"}),
          "untimed pauses before each command of the paced bwrap dispatch sides (ms), one side each");
ABSL_FLAG(int64_t, log_mib, 1024, "MiB of log streamed per throughput round");
ABSL_FLAG(int, throughput_rounds, 3, "throughput rounds per side (alternating); medians reported");
ABSL_FLAG(int, reconnects, 30, "killed connections for the reconnect figure");
ABSL_FLAG(std::string, cipher, "aes128-gcm@openssh.com", "the cipher both sides use");
ABSL_FLAG(std::string, markdown, "", "also write the results as markdown to this file");
ABSL_FLAG(std::string, tmp_dir, "/tmp", "where sockets, keys, state and the log file go");

namespace step_runner::bench {
namespace {

using testing::TcpRelay;

std::string ProxyBinary() { return SR_BINARY_DIR "/proxy/workspace-proxy"; }

absl::StatusOr<process::Subprocess> Spawn(const std::vector<std::string>& argv, int stdout_fd = -1,
                                          int stderr_fd = -1) {
  return process::Subprocess::Spawn(
      {.argv = argv, .env = Environment(), .stdout_fd = stdout_fd, .stderr_fd = stderr_fd});
}

// Runs argv to the end; its exit code.
absl::StatusOr<int> RunToEnd(const std::vector<std::string>& argv) {
  SR_ASSIGN_OR_RETURN(process::Subprocess child, Spawn(argv));
  return child.Reap();
}

absl::Status WaitForFile(const std::string& path, absl::Duration deadline) {
  const absl::Time until = absl::Now() + deadline;
  while (::access(path.c_str(), F_OK) != 0) {
    if (absl::Now() > until) return absl::DeadlineExceededError(absl::StrCat(path, " never appeared"));
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::OkStatus();
}

absl::Status WaitForPort(int port, absl::Duration deadline) {
  const absl::Time until = absl::Now() + deadline;
  for (;;) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{.sin_family = AF_INET, .sin_port = htons(static_cast<uint16_t>(port)),
                     .sin_addr = {htonl(INADDR_LOOPBACK)}};
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return absl::OkStatus();
    if (absl::Now() > until) return absl::DeadlineExceededError(absl::StrCat("port ", port, " never opened"));
    absl::SleepFor(absl::Milliseconds(20));
  }
}

absl::StatusOr<int> UnusedPort() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{.sin_family = AF_INET, .sin_port = 0, .sin_addr = {htonl(INADDR_LOOPBACK)}};
  socklen_t len = sizeof addr;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return ErrnoStatus(errno, "bind");
  }
  return ntohs(addr.sin_port);
}

// A background process that is SIGTERMed, then reaped, when it goes out of scope.
struct Background {
  std::optional<process::Subprocess> child;
  ~Background() {
    if (child) {
      (void)child->SignalGroup(SIGTERM);
      (void)child->Reap();
    }
  }
};

struct Setup {
  std::string dir;
  std::string key;
  std::string cipher;
  int sshd_port = 0;
  int proxy_port = 0;
  std::string user;
  Background sshd, proxy, master;
  std::unique_ptr<DaemonProcess> daemon;       // default step isolation (bwrap)
  std::unique_ptr<DaemonProcess> daemon_none;  // --sandbox=none: the transport alone

  std::vector<std::string> SshBase(int port) const {
    return {"ssh", "-F", "/dev/null", "-i", key, "-p", absl::StrCat(port), "-c", cipher,
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"};
  }
  std::vector<std::string> SshToSshd(const std::vector<std::string>& extra,
                                     const std::vector<std::string>& command) const {
    std::vector<std::string> argv = SshBase(sshd_port);
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(absl::StrCat(user, "@127.0.0.1"));
    argv.insert(argv.end(), command.begin(), command.end());
    return argv;
  }
  // The proxy's exec channel as a --via command line.
  std::string ViaProxy(const std::string& workspace = "ws") const {
    std::vector<std::string> argv = SshBase(proxy_port);
    argv.insert(argv.end(), {workspace + "@127.0.0.1", "step-runner", "proxy"});
    return absl::StrJoin(argv, " ");
  }
  client::ClientOptions ProxyClientOptions(const std::string& workspace = "ws") const {
    client::ClientOptions options;
    options.endpoint.via_command = ViaProxy(workspace);
    options.reconnect_timeout = absl::Seconds(30);
    options.rpc_timeout = absl::Seconds(120);
    return options;
  }
};

absl::Status StartAll(Setup& s) {
  SR_RETURN_IF_ERROR(RunToEnd({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", s.dir + "/client"}).status());
  SR_RETURN_IF_ERROR(RunToEnd({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", s.dir + "/sshd_host"}).status());
  s.key = s.dir + "/client";
  SR_ASSIGN_OR_RETURN(std::string pub, ReadFile(s.key + ".pub"));
  pub = std::string(absl::StripAsciiWhitespace(pub));
  SR_RETURN_IF_ERROR(WriteFileAtomically(s.dir + "/authorized_keys", pub + "\n", 0600));
  const char* user = std::getenv("USER");
  s.user = user && *user ? user : "root";

  // sshd: a throwaway config; as root, the privilege-separation directory it insists on.
  if (::getuid() == 0 && ::access("/run/sshd", F_OK) != 0) ::mkdir("/run/sshd", 0755);
  SR_ASSIGN_OR_RETURN(s.sshd_port, UnusedPort());
  const std::string sshd_config = absl::StrCat(
      "Port ", s.sshd_port, "\nListenAddress 127.0.0.1\nHostKey ", s.dir, "/sshd_host\n",
      "AuthorizedKeysFile ", s.dir, "/authorized_keys\nPidFile none\nUsePAM no\nStrictModes no\n",
      "PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
      "PermitRootLogin prohibit-password\nMaxSessions 1000\nMaxStartups 1000\nLogLevel ERROR\n");
  SR_RETURN_IF_ERROR(WriteFileAtomically(s.dir + "/sshd_config", sshd_config, 0600));
  UniqueFd sshd_log(::open((s.dir + "/sshd.log").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
  auto sshd = Spawn({"/usr/sbin/sshd", "-D", "-e", "-f", s.dir + "/sshd_config"}, -1, sshd_log.get());
  if (!sshd.ok()) return absl::FailedPreconditionError(absl::StrCat("sshd did not start: ", sshd.status().message()));
  s.sshd.child.emplace(*std::move(sshd));
  if (!WaitForPort(s.sshd_port, absl::Seconds(20)).ok()) {
    // No comparison without sshd (not installed, no privilege-separation dir, not root...).
    return absl::FailedPreconditionError(absl::StrCat(
        "sshd did not start: ", ReadFile(s.dir + "/sshd.log").value_or("(no log)")));
  }

  SR_ASSIGN_OR_RETURN(s.daemon, DaemonProcess::Start(DefaultStepRunnerBinary(), s.dir, {}));
  SR_RETURN_IF_ERROR(MakeDirs(s.dir + "/none", 0700));
  SR_ASSIGN_OR_RETURN(s.daemon_none, DaemonProcess::Start(DefaultStepRunnerBinary(), s.dir + "/none",
                                                          {"--sandbox=none"}));
  const std::string routing = absl::StrCat(
      "workspaces:\n  ws:\n    authorized_keys: [\"", pub, "\"]\n    backend: {socket: ",
      s.daemon->socket_path(), "}\n  ws-none:\n    authorized_keys: [\"", pub,
      "\"]\n    backend: {socket: ", s.daemon_none->socket_path(), "}\n");
  SR_RETURN_IF_ERROR(WriteFileAtomically(s.dir + "/routing.yml", routing, 0600));
  const std::string config = absl::StrCat("listen: {address: 127.0.0.1, port: 0}\nhost_key: ", s.dir,
                                          "/proxy_host\nrouting: ", s.dir, "/routing.yml\naudit_log: ",
                                          s.dir, "/audit.jsonl\n");
  SR_RETURN_IF_ERROR(WriteFileAtomically(s.dir + "/proxy.yml", config, 0600));
  SR_ASSIGN_OR_RETURN(process::Subprocess proxy,
                      Spawn({ProxyBinary(), "--config", s.dir + "/proxy.yml", "--ready-file",
                             s.dir + "/proxy.ready"}));
  s.proxy.child.emplace(std::move(proxy));
  SR_RETURN_IF_ERROR(WaitForFile(s.dir + "/proxy.ready", absl::Seconds(20)));
  SR_ASSIGN_OR_RETURN(std::string port, ReadFile(s.dir + "/proxy.ready"));
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(port), &s.proxy_port)) {
    return absl::InternalError("bad proxy ready file");
  }

  // The ControlMaster connection that the multiplexed side reuses.
  SR_ASSIGN_OR_RETURN(process::Subprocess master,
                      Spawn(s.SshToSshd({"-M", "-S", s.dir + "/ctl", "-o", "ControlPersist=no", "-N"}, {})));
  s.master.child.emplace(std::move(master));
  SR_RETURN_IF_ERROR(WaitForFile(s.dir + "/ctl", absl::Seconds(20)));
  // sshd works for this user at all (a misconfigured sshd would make every figure meaningless).
  SR_ASSIGN_OR_RETURN(int code, RunToEnd(s.SshToSshd({}, {"/bin/true"})));
  if (code != 0) return absl::FailedPreconditionError("ssh to the bench's sshd failed; see sshd.log");
  return absl::OkStatus();
}

std::string StepFile(const std::string& definition) { return absl::StrCat("spec: {}\n---\n", definition); }

// Run and follow to the end in one call (RunAndFollow), as `step-runner run --follow` does.
absl::Status RunOnce(client::Client& client, const std::string& id, const std::string& steps) {
  proto::RunRequest request;
  request.set_id(id);
  request.set_steps(steps);
  SR_ASSIGN_OR_RETURN(proto::Status status, client.RunAndFollow(request, [](const proto::FollowLogsResponse&) {}));
  if (status.status() != proto::StepResult::success) {
    return absl::InternalError(absl::StrCat("job ", id, " failed: ", status.ShortDebugString()));
  }
  return absl::OkStatus();
}

struct DispatchResult {
  Summary proxy, proxy_none, fresh, mux, direct, direct_none;
  std::vector<std::pair<int, Summary>> proxy_paced;  // bwrap, with each --gap_ms before each command
};

absl::StatusOr<DispatchResult> Dispatch(Setup& s, int runs, int warmup) {
  std::vector<int> gaps;
  for (const std::string& gap : absl::GetFlag(FLAGS_gap_ms)) {
    if (!absl::SimpleAtoi(gap, &gaps.emplace_back()) || gaps.back() < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--gap_ms: not a number of milliseconds: ", gap));
    }
  }
  // Through the proxy to each daemon, and the same calls on each daemon's socket: what the proxy
  // adds on top of the daemon, with and without the daemon's step isolation.
  client::Client proxy_bwrap(s.ProxyClientOptions("ws"));
  client::Client proxy_none(s.ProxyClientOptions("ws-none"));
  client::Client direct_bwrap(s.daemon->ClientOptions());
  client::Client direct_none(s.daemon_none->ClientOptions());
  const std::string steps = StepFile("exec: {command: [/bin/true]}\n");
  int next = 0;
  // Each side returns the microseconds of one command; Close, cleanup, is not timed.
  auto daemon_side = [&](client::Client& c) {
    return [&c, &next, &steps]() -> absl::StatusOr<double> {
      const std::string id = absl::StrCat("d", next++);
      const Clock::time_point start = Clock::now();
      SR_RETURN_IF_ERROR(RunOnce(c, id, steps));
      const double micros = MicrosSince(start);
      SR_RETURN_IF_ERROR(c.Close(id));
      return micros;
    };
  };
  // The same, after an untimed pause: commands as an agent sends them (a result read, a model
  // call, the next command), where the sandbox pool refills between steps.
  auto paced_side = [&](client::Client& c, absl::Duration gap) {
    return [run = daemon_side(c), gap]() -> absl::StatusOr<double> {
      absl::SleepFor(gap);
      return run();
    };
  };
  auto ssh_side = [&](bool multiplexed) {
    std::vector<std::string> extra;
    if (multiplexed) extra = {"-S", s.dir + "/ctl", "-o", "ControlMaster=no"};
    return [argv = s.SshToSshd(extra, {"/bin/true"})]() -> absl::StatusOr<double> {
      const Clock::time_point start = Clock::now();
      SR_ASSIGN_OR_RETURN(int code, RunToEnd(argv));
      if (code != 0) return absl::InternalError(absl::StrCat("ssh exited ", code));
      return MicrosSince(start);
    };
  };
  struct Side {
    std::function<absl::StatusOr<double>()> run;
    std::vector<double> micros;
  };
  // Order: the result fields below.
  std::vector<Side> sides = {{daemon_side(proxy_bwrap), {}}, {daemon_side(proxy_none), {}},
                             {ssh_side(false), {}},           {ssh_side(true), {}},
                             {daemon_side(direct_bwrap), {}}, {daemon_side(direct_none), {}}};
  for (int gap : gaps) sides.push_back({paced_side(proxy_bwrap, absl::Milliseconds(gap)), {}});
  for (int i = 0; i < warmup; ++i) {
    for (Side& side : sides) SR_RETURN_IF_ERROR(side.run().status());
  }
  // Interleaved in batches of 10, the order rotating, so noise hits all sides alike.
  const size_t n_sides = sides.size();
  for (int done = 0, batch = 0; done < runs; done += 10, ++batch) {
    const int n = std::min(10, runs - done);
    for (size_t k = 0; k < n_sides; ++k) {
      Side& side = sides[(static_cast<size_t>(batch) + k) % n_sides];
      for (int i = 0; i < n; ++i) {
        SR_ASSIGN_OR_RETURN(double micros, side.run());
        side.micros.push_back(micros);
      }
    }
  }
  DispatchResult result{Summarize(sides[0].micros), Summarize(sides[1].micros),
                        Summarize(sides[2].micros), Summarize(sides[3].micros),
                        Summarize(sides[4].micros), Summarize(sides[5].micros)};
  for (size_t i = 0; i < gaps.size(); ++i) result.proxy_paced.emplace_back(gaps[i], Summarize(sides[6 + i].micros));
  return result;
}

struct ThroughputResult {
  double proxy_mib_s = 0;
  double streamlocal_mib_s = 0;  // the same FollowLogs through `ssh -N -L local.sock:...`
  double sshd_mib_s = 0;
  // CPU seconds per GiB moved: the proxy process itself, and sshd's per-connection processes
  // (reaped by the listening sshd, so counted in its children's time).
  double proxy_cpu_s_per_gib = 0;
  double streamlocal_cpu_s_per_gib = 0;
  double sshd_cpu_s_per_gib = 0;
};

absl::StatusOr<ThroughputResult> Throughput(Setup& s, int64_t mib, int rounds) {
  const int64_t bytes = mib << 20;
  // The same bytes on both sides: the job writes random data to its log, and sshd's side cats
  // that log file (steps may not see the bench's /tmp, so the data cannot come from there).
  client::Client client(s.ProxyClientOptions());
  proto::RunRequest request;
  request.set_id("log");
  request.set_steps(StepFile(absl::StrCat("exec: {command: [head, -c, \"", bytes, "\", /dev/urandom]}\n")));
  SR_RETURN_IF_ERROR(client.Run(request));
  proto::Status done;
  for (;;) {
    SR_ASSIGN_OR_RETURN(done, client.GetStatus("log"));
    if (done.status() != proto::StepResult::running) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  if (done.status() != proto::StepResult::success) {
    return absl::InternalError(absl::StrCat("the log job failed: ", done.ShortDebugString()));
  }
  const std::string& work_dir = done.result().exec_result().work_dir();
  const std::string data = work_dir.substr(0, work_dir.rfind('/')) + "/log";
  // The whole log file: the daemon adds a warning line of its own when a job passes 80% of its
  // output budget (1 GiB by default), so the log is a little longer than what the step wrote.
  SR_ASSIGN_OR_RETURN(std::string contents, ReadFile(data));  // also warms the page cache
  const int64_t log_bytes = static_cast<int64_t>(contents.size());
  if (log_bytes < bytes || log_bytes != done.log_size()) {
    return absl::InternalError(absl::StrCat(data, " holds ", log_bytes, " bytes; the job wrote ",
                                            bytes, ", its status says ", done.log_size()));
  }
  contents.clear();
  contents.shrink_to_fit();
  // The third side: a streamlocal forward of the proxy (one `ssh -N -L` for all rounds).
  const std::string forwarded = s.dir + "/forwarded.sock";
  std::vector<std::string> forward_argv = s.SshBase(s.proxy_port);
  forward_argv.insert(forward_argv.end(), {"-N", "-L", absl::StrCat(forwarded, ":/step-runner.sock"), "ws@127.0.0.1"});
  Background forward;
  SR_ASSIGN_OR_RETURN(process::Subprocess forward_ssh, Spawn(forward_argv));
  forward.child.emplace(std::move(forward_ssh));
  SR_RETURN_IF_ERROR(WaitForFile(forwarded, absl::Seconds(20)));
  client::ClientOptions local_options;
  local_options.endpoint.socket_path = forwarded;
  local_options.rpc_timeout = absl::Seconds(120);
  client::Client local_client(local_options);

  std::vector<double> proxy, streamlocal, sshd;
  absl::Duration proxy_cpu, streamlocal_cpu, sshd_cpu;
  const pid_t proxy_pid = s.proxy.child->pid();
  const pid_t sshd_pid = s.sshd.child->pid();
  // FollowLogs of the whole log through `via`; its MiB/s, the proxy's CPU added to `cpu`.
  auto follow = [&](client::Client& via, absl::Duration& cpu) -> absl::StatusOr<double> {
    int64_t got = 0;
    SR_ASSIGN_OR_RETURN(CpuTime cpu_before, ReadCpuTime(proxy_pid));
    const Clock::time_point start = Clock::now();
    SR_RETURN_IF_ERROR(via.Follow("log", 0, [&](const proto::FollowLogsResponse& c) {
      got += static_cast<int64_t>(c.data().size());
    }).status());
    const double secs = MicrosSince(start) / 1e6;
    SR_ASSIGN_OR_RETURN(CpuTime cpu_after, ReadCpuTime(proxy_pid));
    cpu += cpu_after.self - cpu_before.self;
    if (got != log_bytes) return absl::DataLossError(absl::StrCat("followed ", got, " of ", log_bytes));
    return static_cast<double>(mib) / secs;
  };
  for (int r = 0; r < rounds; ++r) {
    for (int step = 0; step < 3; ++step) {
      const int side = (step + r) % 3;  // each round starts with the next side
      if (side == 0) {
        SR_ASSIGN_OR_RETURN(double rate, follow(client, proxy_cpu));
        proxy.push_back(rate);
      } else if (side == 1) {
        SR_ASSIGN_OR_RETURN(double rate, follow(local_client, streamlocal_cpu));
        streamlocal.push_back(rate);
      } else {
        SR_ASSIGN_OR_RETURN(process::OutputPipe pipe, process::MakeOutputPipe());
        SR_ASSIGN_OR_RETURN(CpuTime cpu_before, ReadCpuTime(sshd_pid));
        const Clock::time_point start = Clock::now();
        SR_ASSIGN_OR_RETURN(process::Subprocess ssh, Spawn(s.SshToSshd({}, {"cat", data}), pipe.write_end.get()));
        pipe.write_end.Close();
        SR_ASSIGN_OR_RETURN(int64_t got, DrainToEof({pipe.read_end.get()}, 256 << 10));
        SR_RETURN_IF_ERROR(ssh.Reap().status());
        const double secs = MicrosSince(start) / 1e6;
        // The session process is reaped by the listener once the connection closed.
        absl::SleepFor(absl::Milliseconds(200));
        SR_ASSIGN_OR_RETURN(CpuTime cpu_after, ReadCpuTime(sshd_pid));
        sshd_cpu += (cpu_after.self + cpu_after.children) - (cpu_before.self + cpu_before.children);
        if (got != log_bytes) return absl::DataLossError(absl::StrCat("ssh cat gave ", got, " of ", log_bytes));
        sshd.push_back(static_cast<double>(mib) / secs);
      }
    }
  }
  SR_RETURN_IF_ERROR(client.Close("log"));
  const double gib = static_cast<double>(log_bytes) * rounds / (1 << 30);
  return ThroughputResult{.proxy_mib_s = Summarize(proxy).p50,
                          .streamlocal_mib_s = Summarize(streamlocal).p50,
                          .sshd_mib_s = Summarize(sshd).p50,
                          .proxy_cpu_s_per_gib = absl::ToDoubleSeconds(proxy_cpu) / gib,
                          .streamlocal_cpu_s_per_gib = absl::ToDoubleSeconds(streamlocal_cpu) / gib,
                          .sshd_cpu_s_per_gib = absl::ToDoubleSeconds(sshd_cpu) / gib};
}

// A way to reach the proxy whose connection the bench can cut: how many connections it has
// made so far, and how to cut the newest.
struct Cuttable {
  client::ClientOptions options;
  std::function<int64_t()> connections;
  std::function<absl::Status()> cut;
};

// `--via 'ssh ...'`: each dial's ssh writes its pid to a file; the cut SIGKILLs the newest.
Cuttable ViaSshKilled(const Setup& s) {
  const std::string pids = absl::StrCat(s.dir, "/via.pids");
  auto newest = [pids]() -> std::vector<std::string> {
    return absl::StrSplit(ReadFile(pids).value_or(""), '\n', absl::SkipEmpty());
  };
  Cuttable c{.options = s.ProxyClientOptions()};
  c.options.endpoint.via_command = absl::StrCat("echo $$ >> ", pids, "; exec ", s.ViaProxy());
  c.connections = [newest] { return static_cast<int64_t>(newest().size()); };
  c.cut = [newest]() -> absl::Status {
    pid_t pid = 0;
    std::vector<std::string> lines = newest();
    if (lines.empty() || !absl::SimpleAtoi(lines.back(), &pid)) return absl::InternalError("no ssh pid");
    if (::kill(pid, SIGKILL) != 0) return ErrnoStatus(errno, "kill(ssh)");
    return absl::OkStatus();
  };
  return c;
}

// The client's built-in SSH client (`--ssh ws@host:port`, libssh) through a TCP relay whose
// connection is cut, as a network drop cuts it.
absl::StatusOr<Cuttable> BuiltInSshThroughRelay(const Setup& s, TcpRelay& relay) {
  UniqueFd public_key(::open((s.dir + "/proxy_host.pub").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!public_key) return ErrnoStatus(errno, "open(proxy_host.pub)");
  SR_ASSIGN_OR_RETURN(process::Subprocess keygen,
                      Spawn({"ssh-keygen", "-y", "-f", s.dir + "/proxy_host"}, public_key.get()));
  SR_ASSIGN_OR_RETURN(int code, keygen.Reap());
  SR_ASSIGN_OR_RETURN(std::string host_key, ReadFile(s.dir + "/proxy_host.pub"));
  if (code != 0 || host_key.empty()) return absl::InternalError("ssh-keygen -y of the proxy's host key failed");
  const std::string known_hosts = s.dir + "/known_hosts";
  SR_RETURN_IF_ERROR(WriteFileAtomically(
      known_hosts, absl::StrCat("[127.0.0.1]:", relay.port(), " ", host_key), 0600));
  Cuttable c{.options = s.ProxyClientOptions()};
  c.options.endpoint = {.ssh_target = absl::StrCat("ws@127.0.0.1:", relay.port()),
                        .ssh_key = s.key,
                        .ssh_known_hosts = known_hosts};
  c.connections = [&relay] { return relay.connections(); };
  c.cut = [&relay] {
    relay.Cut();
    return absl::OkStatus();
  };
  return c;
}

// Cuts the connection under a following client `kills` times; per cut, the time until the
// client's sink gets a byte again, with the client library's defaults (a connection that was
// delivering is redialled at once).
absl::StatusOr<Summary> Reconnect(const Cuttable& way, int kills, const std::string& id) {
  client::Client client(way.options);
  proto::RunRequest request;
  request.set_id(id);
  // A line every ~2 ms, so a resumed stream has bytes waiting at once.
  request.set_steps(StepFile("exec: {command: [sh, -c, \"while :; do echo tick; sleep 0.002; done\"]}\n"));
  SR_RETURN_IF_ERROR(client.Run(request));
  std::atomic<int64_t> chunks{0};
  // The first chunk that came over a connection made after the cut (bytes of the cut one may
  // still arrive just after the cut: they were on their way).
  std::atomic<int64_t> connections_at_cut{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> resumed_ns{0};
  std::thread follower([&] {
    client::Client follow_client(way.options);
    (void)follow_client.Follow(id, 0, [&](const proto::FollowLogsResponse&) {
      const int64_t now = absl::GetCurrentTimeNanos();
      ++chunks;
      if (resumed_ns == 0 && way.connections() > connections_at_cut) resumed_ns = now;
    });
  });
  std::vector<double> latencies;
  absl::Status status;
  int64_t seen = way.connections();
  for (int k = 0; k < kills && status.ok(); ++k) {
    // Wait for a fresh connection that delivers, then cut it.
    const absl::Time until = absl::Now() + absl::Seconds(30);
    int64_t connections = 0;
    for (;;) {
      connections = way.connections();
      const int64_t before = chunks;
      absl::SleepFor(absl::Milliseconds(50));
      if (connections > seen && chunks > before) break;
      if (absl::Now() > until) {
        status = absl::DeadlineExceededError("no reconnect within 30s");
        break;
      }
    }
    if (!status.ok()) break;
    seen = connections;
    resumed_ns = 0;
    connections_at_cut = connections;
    const int64_t killed_at = absl::GetCurrentTimeNanos();
    if (!way.cut().ok()) continue;
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (resumed_ns == 0 && absl::Now() < deadline) absl::SleepFor(absl::Microseconds(200));
    if (resumed_ns == 0) {
      status = absl::DeadlineExceededError("no byte after a cut within 30s");
      break;
    }
    latencies.push_back(static_cast<double>(resumed_ns - killed_at) / 1e3);
    connections_at_cut = std::numeric_limits<int64_t>::max();
  }
  (void)client.Cancel(id);
  follower.join();
  (void)client.Close(id);
  SR_RETURN_IF_ERROR(status);
  return Summarize(latencies);
}

std::string Ms(double micros) { return absl::StrFormat("%.2f ms", micros / 1000); }

absl::Status Main() {
  const bool quick = absl::GetFlag(FLAGS_quick);
  const int runs = quick ? 10 : absl::GetFlag(FLAGS_runs);
  const int warmup = quick ? 2 : absl::GetFlag(FLAGS_warmup);
  const int64_t mib = quick ? 16 : absl::GetFlag(FLAGS_log_mib);
  const int rounds = quick ? 1 : absl::GetFlag(FLAGS_throughput_rounds);
  const int reconnects = quick ? 3 : absl::GetFlag(FLAGS_reconnects);
  SR_ASSIGN_OR_RETURN(std::unique_ptr<TempDir> tmp, TempDir::Create(absl::GetFlag(FLAGS_tmp_dir)));
  Setup s;
  s.dir = tmp->path();
  s.cipher = absl::GetFlag(FLAGS_cipher);
  SR_RETURN_IF_ERROR(StartAll(s));

  SR_ASSIGN_OR_RETURN(DispatchResult d, Dispatch(s, runs, warmup));
  SR_ASSIGN_OR_RETURN(ThroughputResult t, Throughput(s, mib, rounds));
  SR_ASSIGN_OR_RETURN(Summary r_via, Reconnect(ViaSshKilled(s), reconnects, "tick-via"));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<TcpRelay> relay, TcpRelay::Start(s.proxy_port));
  SR_ASSIGN_OR_RETURN(Cuttable built_in, BuiltInSshThroughRelay(s, *relay));
  SR_ASSIGN_OR_RETURN(Summary r_built_in, Reconnect(built_in, reconnects, "tick-built-in"));

  utsname uts{};
  ::uname(&uts);
  std::string md = absl::StrFormat(
      "proxy_bench, %s, %s %s, %ld cores, cipher %s; %d dispatch runs per side, %d MiB x %d "
      "rounds, %d reconnects per row\n\n",
      absl::FormatTime("%Y-%m-%d %H:%M UTC", absl::Now(), absl::UTCTimeZone()), uts.sysname,
      uts.release, ::sysconf(_SC_NPROCESSORS_ONLN), s.cipher, runs, mib, rounds, reconnects);
  absl::StrAppend(&md, "| Dispatch of /bin/true (RunAndFollow; ssh: the whole command) | p50 | p99 | p50 / proxy (sandbox=none) p50 |\n| --- | --- | --- | --- |\n");
  auto row = [&](const char* name, const Summary& x) {
    absl::StrAppend(&md, "| ", name, " | ", Ms(x.p50), " | ", Ms(x.p99), " | ",
                    absl::StrFormat("%.1fx", x.p50 / d.proxy_none.p50), " |\n");
  };
  row("warm proxy connection, daemon --sandbox=none", d.proxy_none);
  row("warm proxy connection, daemon default (bwrap)", d.proxy);
  for (const auto& [gap, summary] : d.proxy_paced) {
    const std::string paced = absl::StrCat("the same, ", gap, " ms between commands (as an agent sends them)");
    row(paced.c_str(), summary);
  }
  row("`ssh host /bin/true`, fresh connection", d.fresh);
  row("`ssh host /bin/true`, ControlMaster", d.mux);
  row("(reference: daemon socket, --sandbox=none)", d.direct_none);
  row("(reference: daemon socket, bwrap)", d.direct);
  absl::StrAppend(&md, "\n| Log streaming | MiB/s (median) | server CPU s per GiB |\n| --- | --- | --- |\n",
                  absl::StrFormat("| FollowLogs through the proxy (CPU: workspace-proxy) | %.0f | %.2f |\n",
                                  t.proxy_mib_s, t.proxy_cpu_s_per_gib),
                  absl::StrFormat("| the same through `ssh -N -L local.sock:/step-runner.sock` (streamlocal) | %.0f | %.2f |\n",
                                  t.streamlocal_mib_s, t.streamlocal_cpu_s_per_gib),
                  absl::StrFormat("| `ssh host cat` through sshd (CPU: sshd sessions) | %.0f | %.2f |\n",
                                  t.sshd_mib_s, t.sshd_cpu_s_per_gib));
  absl::StrAppend(&md, "\n| Reconnect: cut to first resumed byte (client defaults) | p50 | p99 | max |\n| --- | --- | --- | --- |\n",
                  "| `--via 'ssh ... step-runner proxy'`, the ssh process killed | ", Ms(r_via.p50), " | ",
                  Ms(r_via.p99), " | ", Ms(r_via.max), " |\n",
                  "| built-in `--ssh ws@host:port` (libssh), its TCP connection cut | ", Ms(r_built_in.p50),
                  " | ", Ms(r_built_in.p99), " | ", Ms(r_built_in.max), " |\n");
  std::cout << md;
  if (const std::string path = absl::GetFlag(FLAGS_markdown); !path.empty()) {
    SR_RETURN_IF_ERROR(WriteFileAtomically(path, md, 0644));
  }
  SR_RETURN_IF_ERROR(s.daemon->Stop());
  SR_RETURN_IF_ERROR(s.daemon_none->Stop());
  return absl::OkStatus();
}

}  // namespace
}  // namespace step_runner::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("workspace-proxy against OpenSSH's sshd (see BENCHMARKS.md)");
  absl::ParseCommandLine(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  absl::Status s = step_runner::bench::Main();
  if (absl::IsFailedPrecondition(s) && absl::StrContains(s.message(), "sshd did not start")) {
    std::cerr << "proxy_bench: skipped: " << s.message() << "\n";
    return 77;  // CTest's SKIP_RETURN_CODE
  }
  if (!s.ok()) {
    std::cerr << "proxy_bench: " << s << "\n";
    return 1;
  }
  return 0;
}

#ifndef STEP_RUNNER_TESTS_PROXY_PROXY_FIXTURE_H_
#define STEP_RUNNER_TESTS_PROXY_PROXY_FIXTURE_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "step-runner/process/subprocess.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {

std::string WorkspaceProxyBinary();


// A process in the background whose stdout and stderr go to files (read at any time), in its own
// process group. The destructor SIGKILLs the group if it still runs.
class Process {
 public:
  static absl::StatusOr<std::unique_ptr<Process>> Start(const std::vector<std::string>& argv,
                                                        const std::string& output_prefix,
                                                        const std::vector<std::string>& env = {});
  ~Process();

  pid_t pid() const { return child_->pid(); }
  std::string out() const;
  std::string err() const;
  bool Exited() const;
  void Signal(int signo);
  // Its exit code (128+N for signal N), or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration deadline);

 private:
  Process() = default;
  std::optional<process::Subprocess> child_;
  std::string out_path_;
  std::string err_path_;
  std::optional<int> exit_code_;
};


// Single-quotes `word` for /bin/sh.
std::string ShellQuote(const std::string& word);

// An ed25519 key pair made by ssh-keygen: `path` (private) and its authorized_keys line.
struct ClientKey {
  std::string path;
  std::string public_line;
};
absl::StatusOr<ClientKey> MakeClientKey(const std::string& path);

// A running workspace-proxy with its config in `dir`. The first start takes an ephemeral port;
// Restart() reuses it, so clients dial the same address across restarts.
class ProxyProcess {
 public:
  struct Options {
    std::string dir;
    std::string routing_yaml;
    std::string limits_yaml;  // the inside of the config's `limits:` mapping (flow style)
    std::string forge_url;    // empty: no token auth
    std::string extra_yaml;   // more top-level config lines, as they are
  };
  static absl::StatusOr<std::unique_ptr<ProxyProcess>> Start(Options options);
  ~ProxyProcess();

  int port() const { return port_; }
  pid_t pid() const { return process_->pid(); }
  const std::string& audit_path() const { return audit_; }
  const std::string& routing_path() const { return routing_; }
  std::string stderr_output() const { return process_->err(); }
  // The audit log's records so far (one JSON object per line).
  std::vector<std::string> AuditLines() const;

  // Stops the proxy with `signo` and waits up to `deadline` for it to exit: its exit code.
  absl::StatusOr<int> Stop(int signo, absl::Duration deadline = absl::Seconds(30));
  // Stops the proxy with `signo` (SIGKILL or SIGTERM), then starts it again on the same port.
  absl::Status Restart(int signo);
  // Rewrites the routing file (atomically, as an operator's tooling would).
  absl::Status WriteRouting(const std::string& yaml);

 private:
  ProxyProcess() = default;
  absl::Status Launch();
  Options options_;
  std::string config_;
  std::string routing_;
  std::string audit_;
  std::string ready_;
  int port_ = 0;
  int launches_ = 0;
  std::unique_ptr<Process> process_;
};

// `ssh` with no user configuration, a throwaway known-hosts file and key-only authentication
// (BatchMode), to `user@127.0.0.1:port`, followed by `args`. `options` come first and win.
// LogLevel stays INFO: that is where OpenSSH shows the proxy's banners.
std::vector<std::string> SshArgv(int port, const std::string& user, const std::string& key,
                                 const std::vector<std::string>& options = {},
                                 const std::vector<std::string>& args = {});
// The same as one shell command line (for --via).
std::string SshCommand(int port, const std::string& user, const std::string& key,
                       const std::vector<std::string>& options = {},
                       const std::vector<std::string>& args = {});

}  // namespace step_runner::testing

#endif  // STEP_RUNNER_TESTS_PROXY_PROXY_FIXTURE_H_

#ifndef STEP_RUNNER_PROXY_CONFIG_H_
#define STEP_RUNNER_PROXY_CONFIG_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace step_runner::proxy {

struct Limits {
  // Failed authentication attempts before a connection is cut.
  int max_auth_tries = 3;
  // Failures from one source address within `auth_failure_window` before new connections from it
  // are refused (until the oldest failure leaves the window).
  int max_auth_failures_per_address = 20;
  absl::Duration auth_failure_window = absl::Minutes(1);
  // Time from accept to authenticated; also the key-exchange timeout.
  absl::Duration login_grace = absl::Seconds(20);
  int max_connections = 256;
  // Connections from one address that have not authenticated yet (a flood of handshakes).
  int max_unauthenticated_per_address = 8;
  // Authenticated connections per SSH user (= workspace).
  int max_connections_per_user = 16;
  int max_channels_per_connection = 8;
  // A connection with no channel traffic and no channel request for this long is closed.
  absl::Duration idle_timeout = absl::Minutes(30);
  // SSH keepalive requests keep NAT state alive; TCP keepalives (same interval and count) find
  // a peer that vanished without a FIN.
  absl::Duration keepalive_interval = absl::Seconds(15);
  int keepalive_count = 4;
  // Bytes read from a client's channel that wait for a slow backend, per channel. Past this the
  // proxy stops reading and the SSH window closes: the client is slowed, never the proxy.
  int64_t channel_buffer = 256 << 10;
};

// The proxy's own configuration (`workspace-proxy --config FILE`, YAML).
struct Config {
  std::string listen_address = "127.0.0.1";
  int listen_port = 2222;  // 0: an ephemeral port, printed on the ready line
  std::string host_key;    // generated (ed25519, 0600) on first start
  std::string routing;     // the routing file, reloaded when it changes
  absl::Duration routing_poll_interval = absl::Seconds(1);
  std::string audit_log;   // JSON lines; empty: stderr
  std::string forge_url;   // empty: no token authentication
  absl::Duration forge_timeout = absl::Seconds(10);
  // Accept `ssh -L ./local.sock:/step-runner.sock` (direct-streamlocal@openssh.com). Seeing that
  // channel type costs libssh's packet-level log formatting (server.cc, OnLibsshLog): about 0.3
  // CPU seconds per GiB streamed through the proxy (BENCHMARKS.md); false saves it.
  bool streamlocal = true;
  Limits limits;
};

absl::StatusOr<Config> ParseConfig(absl::string_view yaml, const std::string& base_dir);
absl::StatusOr<Config> LoadConfig(const std::string& path);

// Where a workspace's step-runner is.
struct Backend {
  std::string socket;                // a unix socket of `step-runner serve`
  std::vector<std::string> command;  // argv template; stdin/stdout reach `step-runner proxy`
};

struct Workspace {
  std::string name;
  std::string owner;  // the forge username allowed to log in with a token
  std::vector<std::string> authorized_keys;  // "TYPE BASE64 [comment]" lines
  std::map<std::string, std::string> vars;   // extra {placeholders} for the command template
  Backend backend;
};

// The routing file: SSH username (workspace name) -> workspace.
struct Routing {
  std::map<std::string, Workspace, std::less<>> workspaces;
  const Workspace* Find(absl::string_view name) const;
};

absl::StatusOr<Routing> ParseRouting(absl::string_view yaml);
absl::StatusOr<Routing> LoadRouting(const std::string& path);

// Splits a command template into words the way a POSIX shell splits a simple command (blanks,
// single and double quotes, backslash), without running a shell: no expansion, no operators.
absl::StatusOr<std::vector<std::string>> SplitCommand(absl::string_view command);
// The command template's words with {workspace}, {owner} and the workspace's vars substituted
// word by word, so a value can never add or split words.
absl::StatusOr<std::vector<std::string>> ExpandCommand(const Workspace& workspace);

// Whether `name` is a valid workspace name: [A-Za-z0-9._-], 1 to 64 characters, not starting
// with '-' or '.' (it reaches command templates and file names).
bool ValidWorkspaceName(absl::string_view name);

}  // namespace step_runner::proxy

#endif  // STEP_RUNNER_PROXY_CONFIG_H_

#ifndef STEP_RUNNER_SERVER_DAEMON_H_
#define STEP_RUNNER_SERVER_DAEMON_H_

#include <sys/types.h>

#include <optional>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "step-runner/runner/runner.h"
#include "step-runner/sandbox/sandbox.h"

namespace step_runner::server {

struct DaemonOptions {
  std::string socket_path;
  // Besides the daemon's own uid and root.
  std::set<uid_t> extra_allowed_uids;
  runner::RunnerOptions runner;
  // The step sandbox; nullopt runs steps unsandboxed (--sandbox=none, logged as a warning).
  std::optional<sandbox::SandboxOptions> sandbox;
  // How long streams get to drain at shutdown, after the jobs have ended.
  absl::Duration stream_drain_timeout = absl::Seconds(5);
};

// `step-runner serve`: runs until SIGTERM, SIGINT or SIGHUP, then cancels running jobs
// gracefully, records their state, ends every stream and returns.
//
// Guarantees:
//  - the socket is 0600 and each peer's uid is checked (SO_PEERCRED);
//  - job records and logs live in the state dir and survive a restart, even after SIGKILL;
//  - the standard gRPC health service and server reflection are served;
//  - every RPC and step event is recorded in <state-dir>/audit.log (a hash chain).
//
// REQUIRES: SIGTERM, SIGINT and SIGHUP are blocked in every thread (call BlockShutdownSignals
// first thing in main, before any thread starts).
absl::Status Serve(const DaemonOptions& options);
void BlockShutdownSignals();

}  // namespace step_runner::server

#endif  // STEP_RUNNER_SERVER_DAEMON_H_

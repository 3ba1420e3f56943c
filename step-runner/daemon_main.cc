// step-runner-daemon: the daemon, started as `step-runner serve ...` (which execs this program
// in place, keeping its pid and command line). Takes exactly serve's flags.
//
// A separate program so that the daemon maps only what it uses: the CLI links the built-in SSH
// client (libssh, libcrypto and Kerberos), which would cost the idle daemon ~2 MiB of resident
// memory if it were loaded there (BENCHMARKS.md, "Daemon memory").
#include <signal.h>

#include <iostream>
#include <string>

#include "absl/synchronization/mutex.h"
#include "step-runner/base/malloc_tuning.h"
#include "step-runner/cli/cli.h"
#include "step-runner/server/daemon.h"

int main(int argc, char** argv) {
  using namespace step_runner;  // NOLINT
  // Debian builds abseil with mutex deadlock detection on: every nested lock then updates a
  // process-wide graph, which showed up as nearly half the daemon's CPU with many jobs.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  base::KeepStreamingBuffersMapped();
  ::signal(SIGPIPE, SIG_IGN);
  if (argc < 2 || std::string(argv[1]) != "serve") {
    std::cerr << "step-runner-daemon: run it as `step-runner serve [flags]` (see step-runner --help)\n";
    return cli::kExitUsage;
  }
  server::BlockShutdownSignals();
  std::string error;
  std::optional<cli::Args> args = cli::Parse(argc, argv, 2, cli::ServeFlags(), {}, &error);
  if (!args) {
    std::cerr << "step-runner serve: " << error << "\n(see step-runner --help)\n";
    return cli::kExitUsage;
  }
  try {
    return cli::CmdServe(*args);
  } catch (const cli::UsageError& e) {
    std::cerr << "step-runner serve: " << e.message << "\n(see step-runner --help)\n";
    return cli::kExitUsage;
  }
}

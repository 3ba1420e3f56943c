#include "step-runner/audit/cli.h"

#include <unistd.h>

#include <iostream>

#include "step-runner/audit/audit_log.h"

namespace step_runner::audit {

std::string LogPath(const std::string& state_dir) { return state_dir + "/audit.log"; }

int RunCommand(const std::string& subcommand, const std::string& state_dir, bool follow, int lines) {
  const std::string path = LogPath(state_dir);
  if (::access(path.c_str(), R_OK) != 0) {
    std::cerr << "step-runner audit: no audit log at " << path << " (see --state-dir)\n";
    return 66;
  }
  if (subcommand == "verify") {
    absl::StatusOr<int64_t> n = Verify(path);
    if (!n.ok()) {
      std::cerr << "step-runner audit: " << path << " FAILED verification: " << n.status().message() << "\n";
      return 1;
    }
    std::cout << path << ": intact, " << *n << " lines\n";
    return 0;
  }
  if (subcommand == "tail") {
    absl::Status s = Tail(
        path, lines, follow, [](const std::string& line) { std::cout << line << std::endl; }, [] { return false; });
    if (!s.ok()) {
      std::cerr << "step-runner audit: " << s.message() << "\n";
      return 1;
    }
    return 0;
  }
  std::cerr << "step-runner audit: expected verify or tail, got \"" << subcommand << "\"\n";
  return 2;
}

}  // namespace step_runner::audit

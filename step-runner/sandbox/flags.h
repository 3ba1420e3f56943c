#ifndef STEP_RUNNER_SANDBOX_FLAGS_H_
#define STEP_RUNNER_SANDBOX_FLAGS_H_

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "step-runner/sandbox/sandbox.h"

namespace step_runner::sandbox {

// `step-runner serve` flags of the sandbox (valued ones; --allow-host and --hide repeat):
//   --sandbox=bwrap|none (default bwrap)   --network=none|all|allow (default none)
//   --allow-host HOST:PORT   --limit-memory BYTES   --limit-cpu SECONDS   --limit-procs N
//   --limit-files N   --limit-output BYTES   --hide PATH   --sandbox-helper PATH
//   --sandbox-warm N (default 2: sandboxes kept ready for steps without network)
const std::vector<std::string>& ServeFlagNames();

struct FlagReader {
  std::function<std::optional<std::string>(const std::string&)> get;
  std::function<std::vector<std::string>(const std::string&)> all;
};

// The sandbox the flags ask for; nullopt for --sandbox=none. INVALID_ARGUMENT naming the flag.
absl::StatusOr<std::optional<SandboxOptions>> OptionsFromFlags(const FlagReader& flags, const std::string& state_dir,
                                                               const std::string& socket_path);

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_FLAGS_H_

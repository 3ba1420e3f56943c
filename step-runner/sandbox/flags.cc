#include "step-runner/sandbox/flags.h"

#include <unistd.h>

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::sandbox {
namespace {

absl::Status Number(const FlagReader& flags, const std::string& name, uint64_t* out) {
  std::optional<std::string> text = flags.get(name);
  if (!text) return absl::OkStatus();
  if (!absl::SimpleAtoi(*text, out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": expected a number (0 for no limit), got \"", *text, "\""));
  }
  return absl::OkStatus();
}

absl::Status Bytes(const FlagReader& flags, const std::string& name, uint64_t* out) {
  std::optional<std::string> text = flags.get(name);
  if (!text) return absl::OkStatus();
  absl::StatusOr<uint64_t> n = ParseByteSize(*text);
  if (!n.ok()) return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", n.status().message()));
  *out = *n;
  return absl::OkStatus();
}

}  // namespace

const std::vector<std::string>& ServeFlagNames() {
  static const std::vector<std::string> names = {"sandbox",     "network",     "allow-host",   "limit-memory",
                                                 "limit-cpu",   "limit-procs", "limit-files",  "limit-output",
                                                 "hide",        "sandbox-helper", "sandbox-warm"};
  return names;
}

absl::StatusOr<std::optional<SandboxOptions>> OptionsFromFlags(const FlagReader& flags, const std::string& state_dir,
                                                               const std::string& socket_path) {
  const std::string kind = flags.get("sandbox").value_or("bwrap");
  if (kind != "bwrap" && kind != "none") {
    return absl::InvalidArgumentError(absl::StrCat("--sandbox: expected bwrap or none, got \"", kind, "\""));
  }
  SandboxOptions options;
  SR_ASSIGN_OR_RETURN(options.network, ParseNetworkMode(flags.get("network").value_or("none")));
  for (const std::string& text : flags.all("allow-host")) {
    SR_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(text));
    options.allowed.push_back(hp);
  }
  if (options.network == NetworkMode::kAllow && options.allowed.empty()) {
    return absl::InvalidArgumentError("--network=allow needs at least one --allow-host HOST:PORT");
  }
  if (options.network != NetworkMode::kAllow && !options.allowed.empty()) {
    return absl::InvalidArgumentError("--allow-host only means something with --network=allow");
  }
  SR_RETURN_IF_ERROR(Bytes(flags, "limit-memory", &options.limits.memory_bytes));
  SR_RETURN_IF_ERROR(Number(flags, "limit-cpu", &options.limits.cpu_seconds));
  SR_RETURN_IF_ERROR(Number(flags, "limit-procs", &options.limits.processes));
  SR_RETURN_IF_ERROR(Number(flags, "limit-files", &options.limits.open_files));
  SR_RETURN_IF_ERROR(Bytes(flags, "limit-output", &options.limits.output_bytes));
  if (kind == "none") return std::optional<SandboxOptions>();
  options.state_dir = state_dir;
  options.socket_path = socket_path;
  // Where the runner keeps file variables by default (runner.cc); the state dir's fallback is
  // hidden with the state dir.
  options.secrets_root = absl::StrCat("/dev/shm/step-runner-", ::getuid());
  if (const char* home = std::getenv("HOME"); home && *home) {
    options.token_stores = {absl::StrCat(home, "/.git-credentials"), absl::StrCat(home, "/.config/git/credentials")};
  }
  if (const char* config = std::getenv("XDG_CONFIG_HOME"); config && *config) {
    options.token_stores.push_back(absl::StrCat(config, "/git/credentials"));
  }
  options.hidden = flags.all("hide");
  options.helper = flags.get("sandbox-helper").value_or("");
  if (std::optional<std::string> warm = flags.get("sandbox-warm")) {
    if (!absl::SimpleAtoi(*warm, &options.warm) || options.warm < 0 || options.warm > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("--sandbox-warm: expected how many sandboxes to keep ready, 0 to 64, got \"", *warm, "\""));
    }
  }
  return std::optional<SandboxOptions>(std::move(options));
}

}  // namespace step_runner::sandbox

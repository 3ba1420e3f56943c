#ifndef STEP_RUNNER_SANDBOX_HELPER_PLAN_H_
#define STEP_RUNNER_SANDBOX_HELPER_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

// What the daemon asks of step-runner-sandbox, and its command line both ways. Plain C++ with no
// abseil: the helper starts once per step, and loading abseil's ~30 shared libraries took ~12 ms
// of its start on a loaded machine, against ~1 ms for a binary with only libstdc++.
namespace step_runner::sandbox {

// One allowed destination of `--network=allow`.
struct HostPort {
  std::string host;  // a DNS name or an IPv4 loopback literal
  uint16_t port = 0;
  std::string ToString() const { return host + ":" + std::to_string(port); }
  bool operator==(const HostPort&) const = default;
};

// Where an allowed destination appears inside the step's network namespace.
struct Forward {
  std::string listen_ip;  // 127.x.y.z, on the step's own loopback
  HostPort target;        // what the helper connects to, outside
};

// Per-job budgets; 0 means unlimited.
struct Limits {
  uint64_t memory_bytes = uint64_t{4} << 30;
  uint64_t cpu_seconds = 3600;
  uint64_t processes = 1024;
  uint64_t open_files = 4096;
  uint64_t output_bytes = uint64_t{1} << 30;
};

struct HelperPlan {
  std::string verdict_path;    // where it writes why it killed the step
  uint64_t output_limit = 0;   // bytes this step may still write (stdout + stderr)
  uint64_t output_budget = 0;  // the job's whole budget, for messages and the 80% warning
  uint64_t output_used = 0;    // what the job's log already holds
  uint64_t memory_limit = 0;   // for the 80% warning and the verdict
  uint64_t process_limit = 0;  // for the verdict
  Limits rlimits;              // memory_bytes here becomes RLIMIT_AS (0: not set)
  std::string cgroup_v2;       // joined before exec; empty: none
  std::string cgroup_v1_memory;
  std::string cgroup_v1_pids;
  bool new_netns = false;  // the helper makes the network namespace (for forwards)
  // fd 3 is the daemon's warnings channel (runner::PlannedStep::warnings_channel): each warning
  // line goes there too, and becomes a step event. Never inherited by bwrap or the step.
  bool warnings_fd3 = false;
  std::vector<Forward> forwards;
  // A warm sandbox: start bwrap now, and wait on stdin for the WarmClaim of the step it runs.
  bool warm = false;
};

// One mount of a step's view, applied in order after the fixed part of every sandbox (the
// read-only root, /dev, /proc, the private /tmp). bwrap applies them for a cold sandbox; the
// stub applies them itself in a warm one (see helper_main.cc).
struct MountOp {
  enum Kind : char {
    kReadOnlyBind = 'r',  // source (a host path) at target, read-only
    kBind = 'b',          // source at target, writable
    kTmpfs = 't',         // an empty tmpfs at target (hides a folder)
    kHideFile = 'n',      // /dev/null at target (hides a file)
  };
  Kind kind = kTmpfs;
  std::string source;  // empty for kTmpfs and kHideFile
  std::string target;
  bool operator==(const MountOp&) const = default;
};

// Where a warm sandbox sees the host's root until its stub detaches it (under the private /tmp).
inline constexpr char kWarmHostRoot[] = "/tmp/.step-runner-host";

// What the stub inside a warm sandbox does for its one step: the mounts, then the step.
struct StubSpec {
  std::vector<MountOp> mounts;
  std::string cwd;
  std::vector<std::string> argv;  // argv[0] an absolute path
  std::vector<std::string> env;   // "KEY=VALUE"; the step gets exactly this
  bool operator==(const StubSpec&) const = default;
};

// What the daemon sends a warm helper on its stdin when a step takes its sandbox: the per-step
// part of the HelperPlan (the rest was on its command line). The stub's spec goes straight to
// the stub, on the helper's fd 4, which the helper passes on to it as fd 3.
struct WarmClaim {
  std::string verdict_path;
  uint64_t output_limit = 0;
  uint64_t output_budget = 0;
  uint64_t output_used = 0;
};

// Length-prefixed ("<size>:<bytes>") so that any byte, newlines included, passes through.
std::string EncodeStubSpec(const StubSpec& spec);
bool DecodeStubSpec(const std::string& text, StubSpec* spec);
std::string EncodeClaim(const WarmClaim& claim);
bool DecodeClaim(const std::string& text, WarmClaim* claim);

std::vector<std::string> HelperArgv(const std::string& helper, const HelperPlan& plan,
                                    const std::vector<std::string>& bwrap_argv);
// The inverse, for the helper (args without argv[0]); `rest` gets what follows "--". False
// with `error` set on a malformed command line.
bool ParseHelperArgv(const std::vector<std::string>& args, HelperPlan* plan, std::vector<std::string>* rest,
                     std::string* error);

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_HELPER_PLAN_H_

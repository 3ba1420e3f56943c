#ifndef STEP_RUNNER_SANDBOX_POLICY_H_
#define STEP_RUNNER_SANDBOX_POLICY_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "step-runner/sandbox/helper_plan.h"

// The step sandbox's policy and the argv that enforces it. Pure functions of their inputs (no
// I/O), so that what a step can see is unit-tested line by line; the daemon side (sandbox.h)
// gathers the inputs and the helper (helper_main.cc) carries out the parts bwrap cannot.
namespace step_runner::sandbox {

enum class NetworkMode { kNone, kAll, kAllow };
absl::StatusOr<NetworkMode> ParseNetworkMode(absl::string_view text);
absl::string_view NetworkModeName(NetworkMode mode);

// "host:port". IP literals outside 127.0.0.0/8 are refused: the step reaches an allowed host
// through a loopback alias that /etc/hosts gives the host's name (see README.md).
absl::StatusOr<HostPort> ParseHostPort(absl::string_view text);

// "1073741824", "512M", "4G", "64k" (powers of 1024).
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);


// A path to hide from the step: a directory gets an empty tmpfs over it, a file /dev/null.
struct HiddenPath {
  std::string path;
  bool is_dir = true;
};

// One loopback address per distinct host (127.0.0.1 literals keep theirs), in the order given.
std::vector<Forward> PlanForwards(const std::vector<HostPort>& allowed);
// The sandbox's /etc/hosts: localhost plus a line per named host of `forwards`.
std::string HostsFile(const std::vector<Forward>& forwards);

// Everything one step's sandbox is made of.
struct StepView {
  std::vector<std::string> argv;  // argv[0] resolved to an absolute path
  std::string work_tree;          // writable; empty: none
  std::string cwd;
  NetworkMode network = NetworkMode::kNone;  // what this step gets (after policy)
  std::vector<HiddenPath> hidden;
  std::vector<std::string> readonly_binds;  // re-exposed after hiding (this job's secret files)
  // Folders under /tmp that the step's programs live in (its PATH, its argv[0]): the private
  // /tmp would hide them, so they are bound back read-only before anything is hidden.
  std::vector<std::string> tool_binds;
  // Re-exposed writable after hiding: the folder of this step's ${{ output_file }} and
  // ${{ export_file }}, which lives in the (hidden) job state.
  std::vector<std::string> writable_binds;
  std::string hosts_file;                   // bound over /etc/hosts when non-empty
  bool drop_capabilities = true;            // always on outside tests of the builder
};

// Whether `path` is `dir` or lies below it (component-wise: /a/bc is not within /a/b).
bool Within(const std::string& path, const std::string& dir);

// A work tree is bound read-write into the sandbox, so it must not be the system itself: "/",
// or a system folder (/usr, /etc, ...) or one that holds one. INVALID_ARGUMENT naming it.
absl::Status CheckWorkTree(const std::string& path);

// bwrap's argv for `view`, ending in "--" and the step's own argv. The order matters: bwrap
// applies mounts in order, so hiding comes after the read-only root and before the work tree and
// secrets are bound back in.
std::vector<std::string> BwrapArgv(const std::string& bwrap, const StepView& view);
// The mounts of `view` after the fixed part, in the order BwrapArgv gives them to bwrap.
std::vector<MountOp> ViewMounts(const StepView& view);
// bwrap's flags for one of them ("--bind SRC DST", ...).
std::vector<std::string> BwrapMountArgs(const MountOp& op);

// A warm sandbox: made before its step is known, so only the part that every step without
// network shares (BwrapArgv's fixed part, --unshare-net, and `premounted`: the daemon-wide
// hidden paths, as ViewMounts gives them for a view without a tree), plus the host's root at
// kWarmHostRoot, and the helper's stub (`helper --stub 3 --report 4`) as the command. The
// stub's step process reads a StubSpec on fd 3, makes the step's mounts, detaches the host
// root, drops its capabilities and becomes the step; the stub reports its exit on fd 4.
// `uid`/`gid`: the daemon's (not 0: the stub maps them back for the step).
std::vector<std::string> WarmBwrapArgv(const std::string& bwrap, const std::string& helper, uid_t uid, gid_t gid,
                                       const std::vector<MountOp>& premounted = {});
// The mounts of `view` (ViewMounts) that a warm sandbox made with `premounted` still needs:
// those it has are left out unless they are inside the work tree (the tree's bind brings them
// back; they are hidden again after it). nullopt when the premounted ones would not give the
// same view: a mount that comes before one of them in ViewMounts' order and lies inside it (a
// tool folder inside a hidden folder, which the hiding covers) would come after it instead.
std::optional<std::vector<MountOp>> MountsLeftForStub(const StepView& view, const std::vector<MountOp>& premounted);

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_POLICY_H_

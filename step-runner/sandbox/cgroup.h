#ifndef STEP_RUNNER_SANDBOX_CGROUP_H_
#define STEP_RUNNER_SANDBOX_CGROUP_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "step-runner/sandbox/cgroup_files.h"
#include "step-runner/sandbox/policy.h"

// Control groups for jobs, where the daemon may make them: cgroup v2 when the memory and pids
// controllers can be delegated under the daemon's own cgroup, else the v1 memory and pids
// hierarchies (as in containers on older hosts). A cgroup bounds a whole job (every process of
// it, whatever it forks) where rlimits only bound one process each; as root, RLIMIT_NPROC does
// not apply at all, so only a pids cgroup stops a fork bomb.
namespace step_runner::sandbox {

// Where job cgroups go: a folder of the daemon's own under each usable hierarchy.
class CgroupRoot {
 public:
  // Probes by creating "<own cgroup>/<name>" (removing leftovers of dead daemons first); a root
  // with nothing usable is not an error (limits then rest on rlimits; see README.md).
  static CgroupRoot Detect(absl::string_view name);

  bool has_memory() const { return !parent_.memory_dir().empty(); }
  bool has_pids() const { return !parent_.pids_dir().empty(); }
  std::string Describe() const;

  // A cgroup for job number `slot` with the memory and process limits set.
  absl::StatusOr<JobCgroup> CreateJob(absl::string_view leaf, const Limits& limits) const;
  // Removes the daemon's folder (at shutdown; best effort).
  void RemoveAll() const;

 private:
  JobCgroup parent_;
};

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_CGROUP_H_

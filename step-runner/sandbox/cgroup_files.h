#ifndef STEP_RUNNER_SANDBOX_CGROUP_FILES_H_
#define STEP_RUNNER_SANDBOX_CGROUP_FILES_H_

#include <chrono>
#include <cstdint>
#include <string>

// One job's cgroups and what the helper does with them: join, read the counters, kill. Plain
// C++ (no abseil), for the same start-up reason as helper_plan.h.
namespace step_runner::sandbox {

// Empty strings where there is no such cgroup.
struct JobCgroup {
  std::string v2;
  std::string v1_memory;
  std::string v1_pids;
  bool empty() const { return v2.empty() && v1_memory.empty() && v1_pids.empty(); }
  std::string memory_dir() const { return v2.empty() ? v1_memory : v2; }
  std::string pids_dir() const { return v2.empty() ? v1_pids : v2; }
};

// Counters of a job's cgroup (0 where it has no such controller).
struct CgroupCounters {
  uint64_t memory_current = 0;
  uint64_t oom_kills = 0;
  uint64_t fork_refusals = 0;  // forks refused at pids.max
};
CgroupCounters ReadCounters(const JobCgroup& cgroup);
// Moves the calling process into the job's cgroups; false with `error` set if it cannot.
bool JoinCgroup(const JobCgroup& cgroup, std::string* error);
// SIGKILLs every process in the cgroup (what cgroup.kill does on v2).
void KillCgroup(const JobCgroup& cgroup);
// Kills what is left (after `grace`, for processes that are on their way out), then removes
// the folders (best effort; a busy one stays).
void RemoveCgroup(const JobCgroup& cgroup, std::chrono::milliseconds grace = std::chrono::milliseconds(0));

// Small file helpers for cgroup files (whole reads, one write).
std::string ReadSmallFile(const std::string& path);
bool WriteSmallFile(const std::string& path, const std::string& value);

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_CGROUP_FILES_H_

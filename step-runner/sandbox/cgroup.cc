#include "step-runner/sandbox/cgroup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::sandbox {
namespace {

constexpr char kCgroupFs[] = "/sys/fs/cgroup";

absl::Status WriteTo(const std::string& path, absl::string_view value) {
  if (!WriteSmallFile(path, std::string(value))) return ErrnoStatus(errno, absl::StrCat("write(", path, ")"));
  return absl::OkStatus();
}

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// "memory" -> "/process_api/abc" from /proc/self/cgroup ("" for the v2 line).
std::string OwnPath(absl::string_view controller) {
  std::string text = ReadFile("/proc/self/cgroup").value_or("");
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    for (absl::string_view c : absl::StrSplit(parts[1], ',')) {
      if (c == controller) return std::string(parts[2]);
    }
    if (controller.empty() && parts[0] == "0" && parts[1].empty()) return std::string(parts[2]);
  }
  return "";
}

bool PidAlive(pid_t pid) { return ::kill(pid, 0) == 0 || errno == EPERM; }

// Removes a cgroup folder and its sub-folders (rmdir works on a cgroup without processes).
void RemoveDirs(const std::string& dir) {
  if (DIR* d = ::opendir(dir.c_str())) {
    std::vector<std::string> children;
    while (struct dirent* e = ::readdir(d)) {
      if (e->d_type == DT_DIR && e->d_name[0] != '.') children.push_back(absl::StrCat(dir, "/", e->d_name));
    }
    ::closedir(d);
    for (const std::string& child : children) RemoveDirs(child);
  }
  ::rmdir(dir.c_str());
}

// Leftovers of daemons that are gone: "<parent>/step-runner.<pid>" with a dead pid.
void RemoveStale(const std::string& parent, absl::string_view prefix) {
  DIR* d = ::opendir(parent.c_str());
  if (d == nullptr) return;
  std::vector<std::string> stale;
  while (struct dirent* e = ::readdir(d)) {
    absl::string_view name = e->d_name;
    pid_t pid;
    if (absl::ConsumePrefix(&name, prefix) && absl::ConsumePrefix(&name, ".") && absl::SimpleAtoi(name, &pid) &&
        !PidAlive(pid)) {
      stale.push_back(absl::StrCat(parent, "/", e->d_name));
    }
  }
  ::closedir(d);
  for (const std::string& dir : stale) RemoveDirs(dir);
}

// The daemon's own v2 cgroup under `mount`.
std::string OwnV2Folder(const std::string& mount) {
  return absl::StrCat(mount, absl::StripSuffix(OwnPath(""), "/"));
}

std::string ProbeFolder(const std::string& parent, absl::string_view name) {
  if (!IsDir(parent)) return "";
  RemoveStale(parent, name);
  std::string dir = absl::StrCat(parent, "/", name, ".", ::getpid());
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return "";
  return dir;
}

bool HasWord(const std::string& path, absl::string_view word) {
  std::string text = ReadFile(path).value_or("");
  for (absl::string_view w : absl::StrSplit(text, absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
    if (w == word) return true;
  }
  return false;
}

}  // namespace

CgroupRoot CgroupRoot::Detect(absl::string_view name) {
  CgroupRoot root;
  // v2: a pure v2 mount, or the "unified" one of a hybrid layout.
  for (std::string mount : {std::string(kCgroupFs), absl::StrCat(kCgroupFs, "/unified")}) {
    if (::access((mount + "/cgroup.controllers").c_str(), R_OK) != 0) continue;
    std::string own = OwnV2Folder(mount);
    if (!HasWord(own + "/cgroup.controllers", "memory") || !HasWord(own + "/cgroup.controllers", "pids")) break;
    // Delegation needs both controllers enabled for our children; a non-root cgroup with
    // processes in it refuses that (the "no internal processes" rule), and then v2 is out.
    if (!HasWord(own + "/cgroup.subtree_control", "memory") || !HasWord(own + "/cgroup.subtree_control", "pids")) {
      if (!WriteTo(own + "/cgroup.subtree_control", "+memory +pids").ok()) break;
    }
    std::string dir = ProbeFolder(own, name);
    if (dir.empty()) break;
    if (!WriteTo(dir + "/cgroup.subtree_control", "+memory +pids").ok()) {
      RemoveDirs(dir);
      break;
    }
    root.parent_.v2 = dir;
    return root;
  }
  // v1: separate memory and pids hierarchies.
  for (auto [controller, out] : {std::pair<const char*, std::string*>{"memory", &root.parent_.v1_memory},
                                 std::pair<const char*, std::string*>{"pids", &root.parent_.v1_pids}}) {
    std::string hierarchy = absl::StrCat(kCgroupFs, "/", controller);
    if (::access((hierarchy + "/cgroup.procs").c_str(), R_OK) != 0) continue;
    *out = ProbeFolder(absl::StrCat(hierarchy, absl::StripSuffix(OwnPath(controller), "/")), name);
  }
  if (!root.parent_.v1_memory.empty()) {
    // Children inherit hierarchical accounting only when asked on some kernels; harmless if not.
    (void)WriteTo(root.parent_.v1_memory + "/memory.use_hierarchy", "1");
  }
  return root;
}

std::string CgroupRoot::Describe() const {
  if (!parent_.v2.empty()) return absl::StrCat("cgroup v2 at ", parent_.v2);
  if (parent_.empty()) return "no writable cgroup";
  return absl::StrCat("cgroup v1 (memory: ", parent_.v1_memory.empty() ? "none" : parent_.v1_memory,
                      ", pids: ", parent_.v1_pids.empty() ? "none" : parent_.v1_pids, ")");
}

absl::StatusOr<JobCgroup> CgroupRoot::CreateJob(absl::string_view leaf, const Limits& limits) const {
  JobCgroup job;
  auto make = [&](const std::string& parent, std::string* out) -> absl::Status {
    if (parent.empty()) return absl::OkStatus();
    std::string dir = absl::StrCat(parent, "/", leaf);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return ErrnoStatus(errno, absl::StrCat("mkdir(", dir, ")"));
    *out = dir;
    return absl::OkStatus();
  };
  SR_RETURN_IF_ERROR(make(parent_.v2, &job.v2));
  SR_RETURN_IF_ERROR(make(parent_.v1_memory, &job.v1_memory));
  SR_RETURN_IF_ERROR(make(parent_.v1_pids, &job.v1_pids));
  if (limits.memory_bytes > 0) {
    if (!job.v2.empty()) {
      SR_RETURN_IF_ERROR(WriteTo(job.v2 + "/memory.max", absl::StrCat(limits.memory_bytes)));
      (void)WriteTo(job.v2 + "/memory.swap.max", "0");
    } else if (!job.v1_memory.empty()) {
      SR_RETURN_IF_ERROR(WriteTo(job.v1_memory + "/memory.limit_in_bytes", absl::StrCat(limits.memory_bytes)));
      // Swap counts too where the kernel accounts it; without that a hog would just swap.
      (void)WriteTo(job.v1_memory + "/memory.memsw.limit_in_bytes", absl::StrCat(limits.memory_bytes));
    }
  }
  if (limits.processes > 0 && !job.pids_dir().empty()) {
    SR_RETURN_IF_ERROR(WriteTo(job.pids_dir() + "/pids.max", absl::StrCat(limits.processes)));
  }
  return job;
}

void CgroupRoot::RemoveAll() const {
  for (const std::string& dir : {parent_.v2, parent_.v1_memory, parent_.v1_pids}) {
    if (!dir.empty()) RemoveDirs(dir);
  }
}

}  // namespace step_runner::sandbox

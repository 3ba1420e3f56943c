#include "step-runner/sandbox/cgroup_files.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

namespace step_runner::sandbox {
namespace {

// The number after "`key` " on one of the lines of `path` (memory.events, pids.events, ...).
uint64_t ReadKey(const std::string& path, const std::string& key) {
  std::istringstream in(ReadSmallFile(path));
  std::string name;
  uint64_t value = 0;
  while (in >> name >> value) {
    if (name == key) return value;
  }
  return 0;
}

uint64_t ReadNumber(const std::string& path) { return std::strtoull(ReadSmallFile(path).c_str(), nullptr, 10); }

std::vector<pid_t> Procs(const std::string& dir) {
  std::vector<pid_t> out;
  std::istringstream in(ReadSmallFile(dir + "/cgroup.procs"));
  pid_t pid;
  while (in >> pid) out.push_back(pid);
  return out;
}

}  // namespace

std::string ReadSmallFile(const std::string& path) {
  std::string out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

bool WriteSmallFile(const std::string& path, const std::string& value) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::write(fd, value.data(), value.size()) == static_cast<ssize_t>(value.size());
  int saved = errno;
  ::close(fd);
  errno = saved;
  return ok;
}

CgroupCounters ReadCounters(const JobCgroup& cgroup) {
  CgroupCounters c;
  if (!cgroup.v2.empty()) {
    c.memory_current = ReadNumber(cgroup.v2 + "/memory.current");
    c.oom_kills = ReadKey(cgroup.v2 + "/memory.events", "oom_kill");
    c.fork_refusals = ReadKey(cgroup.v2 + "/pids.events", "max");
    return c;
  }
  if (!cgroup.v1_memory.empty()) {
    c.memory_current = ReadNumber(cgroup.v1_memory + "/memory.usage_in_bytes");
    c.oom_kills = ReadKey(cgroup.v1_memory + "/memory.oom_control", "oom_kill");
  }
  if (!cgroup.v1_pids.empty()) c.fork_refusals = ReadKey(cgroup.v1_pids + "/pids.events", "max");
  return c;
}

bool JoinCgroup(const JobCgroup& cgroup, std::string* error) {
  for (const std::string& dir : {cgroup.v2, cgroup.v1_memory, cgroup.v1_pids}) {
    if (dir.empty()) continue;
    if (!WriteSmallFile(dir + "/cgroup.procs", "0")) {
      *error = "joining " + dir + ": " + std::strerror(errno);
      return false;
    }
  }
  return true;
}

void KillCgroup(const JobCgroup& cgroup) {
  if (!cgroup.v2.empty() && WriteSmallFile(cgroup.v2 + "/cgroup.kill", "1")) return;
  // v1 has no cgroup.kill. A fork bomb refills the list as we go, so go round until it is
  // empty (bounded: pids.max caps how many there can be, and each round kills all it sees).
  const std::string dir = cgroup.pids_dir().empty() ? cgroup.memory_dir() : cgroup.pids_dir();
  if (dir.empty()) return;
  for (int round = 0; round < 100; ++round) {
    std::vector<pid_t> pids = Procs(dir);
    if (pids.empty()) return;
    for (pid_t pid : pids) {
      if (pid != ::getpid()) ::kill(pid, SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

void RemoveCgroup(const JobCgroup& cgroup, std::chrono::milliseconds grace) {
  // What is in it may be on its way out by itself: rmdir succeeds once it is empty.
  const auto give_up = std::chrono::steady_clock::now() + grace;
  for (const std::string& dir : {cgroup.v2, cgroup.v1_memory, cgroup.v1_pids}) {
    while (!dir.empty() && ::rmdir(dir.c_str()) != 0 && errno == EBUSY && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  KillCgroup(cgroup);
  for (const std::string& dir : {cgroup.v2, cgroup.v1_memory, cgroup.v1_pids}) {
    if (dir.empty()) continue;
    // Killed processes leave the cgroup once they are reaped, which takes a moment.
    for (int i = 0; i < 200 && ::rmdir(dir.c_str()) != 0 && errno == EBUSY; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
}

}  // namespace step_runner::sandbox

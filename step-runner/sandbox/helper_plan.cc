#include "step-runner/sandbox/helper_plan.h"

#include <cerrno>
#include <cstdlib>
#include <map>

namespace step_runner::sandbox {
namespace {

bool ParseNumber(const std::string& text, uint64_t* out) {
  if (text.empty() || text[0] == '-') return false;
  errno = 0;
  char* end = nullptr;
  unsigned long long n = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0') return false;
  *out = n;
  return true;
}

}  // namespace

std::vector<std::string> HelperArgv(const std::string& helper, const HelperPlan& plan,
                                    const std::vector<std::string>& bwrap_argv) {
  auto n = [](uint64_t v) { return std::to_string(v); };
  std::vector<std::string> a = {helper,
                                "--verdict", plan.verdict_path,
                                "--output-limit", n(plan.output_limit),
                                "--output-budget", n(plan.output_budget),
                                "--output-used", n(plan.output_used),
                                "--memory-limit", n(plan.memory_limit),
                                "--process-limit", n(plan.process_limit),
                                "--rlimit-as", n(plan.rlimits.memory_bytes),
                                "--rlimit-cpu", n(plan.rlimits.cpu_seconds),
                                "--rlimit-nproc", n(plan.rlimits.processes),
                                "--rlimit-nofile", n(plan.rlimits.open_files)};
  if (!plan.cgroup_v2.empty()) a.insert(a.end(), {"--cgroup-v2", plan.cgroup_v2});
  if (!plan.cgroup_v1_memory.empty()) a.insert(a.end(), {"--cgroup-v1-memory", plan.cgroup_v1_memory});
  if (!plan.cgroup_v1_pids.empty()) a.insert(a.end(), {"--cgroup-v1-pids", plan.cgroup_v1_pids});
  if (plan.new_netns) a.push_back("--netns");
  if (plan.warnings_fd3) a.push_back("--warnings-fd3");
  for (const Forward& f : plan.forwards) a.insert(a.end(), {"--forward", f.listen_ip + "=" + f.target.ToString()});
  a.push_back("--");
  a.insert(a.end(), bwrap_argv.begin(), bwrap_argv.end());
  return a;
}

bool ParseHelperArgv(const std::vector<std::string>& args, HelperPlan* plan, std::vector<std::string>* rest,
                     std::string* error) {
  *plan = HelperPlan();
  const std::map<std::string, uint64_t*> numbers = {
      {"--output-limit", &plan->output_limit},      {"--output-budget", &plan->output_budget},
      {"--output-used", &plan->output_used},        {"--memory-limit", &plan->memory_limit},
      {"--process-limit", &plan->process_limit},    {"--rlimit-as", &plan->rlimits.memory_bytes},
      {"--rlimit-cpu", &plan->rlimits.cpu_seconds}, {"--rlimit-nproc", &plan->rlimits.processes},
      {"--rlimit-nofile", &plan->rlimits.open_files},
  };
  const std::map<std::string, std::string*> strings = {
      {"--verdict", &plan->verdict_path},
      {"--cgroup-v2", &plan->cgroup_v2},
      {"--cgroup-v1-memory", &plan->cgroup_v1_memory},
      {"--cgroup-v1-pids", &plan->cgroup_v1_pids},
  };
  size_t i = 0;
  for (; i < args.size() && args[i] != "--"; ++i) {
    const std::string& flag = args[i];
    if (flag == "--netns") {
      plan->new_netns = true;
      continue;
    }
    if (flag == "--warnings-fd3") {
      plan->warnings_fd3 = true;
      continue;
    }
    if (i + 1 >= args.size()) {
      *error = flag + " needs a value";
      return false;
    }
    const std::string& value = args[++i];
    if (auto num = numbers.find(flag); num != numbers.end()) {
      if (!ParseNumber(value, num->second)) {
        *error = flag + ": not a number: " + value;
        return false;
      }
    } else if (auto str = strings.find(flag); str != strings.end()) {
      *str->second = value;
    } else if (flag == "--forward") {
      // IP=HOST:PORT
      size_t eq = value.find('='), colon = value.rfind(':');
      uint64_t port = 0;
      if (eq == std::string::npos || colon == std::string::npos || colon < eq ||
          !ParseNumber(value.substr(colon + 1), &port) || port == 0 || port > 65535) {
        *error = "--forward: expected IP=HOST:PORT, got " + value;
        return false;
      }
      plan->forwards.push_back(
          {value.substr(0, eq), {value.substr(eq + 1, colon - eq - 1), static_cast<uint16_t>(port)}});
    } else {
      *error = "unknown flag " + flag;
      return false;
    }
  }
  if (i + 1 >= args.size()) {
    *error = "expected -- and a command";
    return false;
  }
  rest->assign(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
  return true;
}

}  // namespace step_runner::sandbox

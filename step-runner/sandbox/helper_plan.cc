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

void PutField(std::string* out, const std::string& field) {
  out->append(std::to_string(field.size()));
  out->push_back(':');
  out->append(field);
}

// Reads the fields of `text` in order; false at the first malformed one.
class FieldReader {
 public:
  explicit FieldReader(const std::string& text) : text_(text) {}
  bool Next(std::string* field) {
    size_t colon = text_.find(':', at_);
    uint64_t size = 0;
    if (colon == std::string::npos || !ParseNumber(text_.substr(at_, colon - at_), &size) ||
        size > text_.size() - colon - 1) {
      return false;
    }
    *field = text_.substr(colon + 1, size);
    at_ = colon + 1 + size;
    return true;
  }
  bool Number(uint64_t* n) {
    std::string field;
    return Next(&field) && ParseNumber(field, n);
  }
  bool List(std::vector<std::string>* out) {
    uint64_t count = 0;
    if (!Number(&count) || count > text_.size()) return false;
    out->resize(count);
    for (std::string& item : *out) {
      if (!Next(&item)) return false;
    }
    return true;
  }
  bool AtEnd() const { return at_ == text_.size(); }

 private:
  const std::string& text_;
  size_t at_ = 0;
};

void PutList(std::string* out, const std::vector<std::string>& items) {
  PutField(out, std::to_string(items.size()));
  for (const std::string& item : items) PutField(out, item);
}

}  // namespace

std::string EncodeStubSpec(const StubSpec& spec) {
  std::string out;
  PutField(&out, std::to_string(spec.mounts.size()));
  for (const MountOp& op : spec.mounts) {
    PutField(&out, std::string(1, static_cast<char>(op.kind)));
    PutField(&out, op.source);
    PutField(&out, op.target);
  }
  PutField(&out, spec.cwd);
  PutList(&out, spec.argv);
  PutList(&out, spec.env);
  return out;
}

bool DecodeStubSpec(const std::string& text, StubSpec* spec) {
  *spec = StubSpec();
  FieldReader in(text);
  uint64_t count = 0;
  if (!in.Number(&count) || count > text.size()) return false;
  spec->mounts.resize(count);
  for (MountOp& op : spec->mounts) {
    std::string kind;
    if (!in.Next(&kind) || kind.size() != 1 || std::string("rbtn").find(kind[0]) == std::string::npos) return false;
    op.kind = static_cast<MountOp::Kind>(kind[0]);
    if (!in.Next(&op.source) || !in.Next(&op.target) || op.target.empty() || op.target[0] != '/') return false;
  }
  return in.Next(&spec->cwd) && in.List(&spec->argv) && !spec->argv.empty() && in.List(&spec->env) && in.AtEnd();
}

std::string EncodeClaim(const WarmClaim& claim) {
  std::string out;
  PutField(&out, claim.verdict_path);
  for (uint64_t n : {claim.output_limit, claim.output_budget, claim.output_used}) PutField(&out, std::to_string(n));
  return out;
}

bool DecodeClaim(const std::string& text, WarmClaim* claim) {
  *claim = WarmClaim();
  FieldReader in(text);
  return in.Next(&claim->verdict_path) && in.Number(&claim->output_limit) && in.Number(&claim->output_budget) &&
         in.Number(&claim->output_used) && in.AtEnd();
}

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
  if (plan.warm) a.push_back("--warm");
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
    if (flag == "--warm") {
      plan->warm = true;
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

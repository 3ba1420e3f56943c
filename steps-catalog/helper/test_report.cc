#include "steps-catalog/helper/test_report.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>

#include <cerrno>
#include <regex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/process/subprocess.h"

extern char** environ;

namespace step_runner::catalog {
namespace {

int SumMatches(const std::string& text, const std::regex& re, int group) {
  int sum = 0;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
    sum += std::stoi((*it)[group].str());
  }
  return sum;
}

// JUnit files written since `since` under `dir` (a few levels deep; .git and dependency
// folders skipped).
void FindReports(const std::string& dir, int depth, time_t since, std::vector<std::string>* out) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* entry = ::readdir(d)) {
    std::string name = entry->d_name;
    if (name == "." || name == ".." || name == ".git" || name == "node_modules" || name == "vendor") continue;
    std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode) && depth > 0) {
      FindReports(path, depth - 1, since, out);
    } else if (S_ISREG(st.st_mode) && absl::EndsWith(name, ".xml") && st.st_mtime >= since) {
      out->push_back(path);
    }
  }
  ::closedir(d);
}

}  // namespace

absl::StatusOr<TestCounts> ParseJUnitXml(absl::string_view xml) {
  TestCounts counts;
  bool in_case = false, case_failed = false, case_skipped = false, saw_suite = false;
  auto close_case = [&] {
    if (case_failed) {
      ++counts.failed;
    } else if (case_skipped) {
      ++counts.skipped;
    } else {
      ++counts.passed;
    }
    in_case = false;
  };
  size_t pos = 0;
  while ((pos = xml.find('<', pos)) != absl::string_view::npos) {
    if (xml.substr(pos, 4) == "<!--") {
      pos = xml.find("-->", pos);
      if (pos == absl::string_view::npos) break;
      continue;
    }
    if (xml.substr(pos, 9) == "<![CDATA[") {
      pos = xml.find("]]>", pos);
      if (pos == absl::string_view::npos) break;
      continue;
    }
    size_t end = xml.find('>', pos);
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("JUnit XML: unterminated tag");
    absl::string_view tag = xml.substr(pos + 1, end - pos - 1);
    pos = end + 1;
    bool closing = absl::ConsumePrefix(&tag, "/");
    bool self_closing = absl::ConsumeSuffix(&tag, "/");
    absl::string_view name = tag.substr(0, tag.find_first_of(" \t\r\n"));
    if (name == "testsuite" || name == "testsuites") saw_suite = true;
    if (name == "testcase") {
      if (closing) {
        if (in_case) close_case();
      } else {
        if (in_case) close_case();  // an unclosed previous case
        in_case = true;
        case_failed = case_skipped = false;
        if (self_closing) close_case();
      }
    } else if (in_case && !closing) {
      if (name == "failure" || name == "error") case_failed = true;
      if (name == "skipped") case_skipped = true;
    }
  }
  if (in_case) close_case();
  if (!saw_suite) return absl::InvalidArgumentError("not a JUnit report (no <testsuite>)");
  counts.found = true;
  return counts;
}

TestCounts ParseTestOutput(absl::string_view output_view) {
  const std::string output(output_view);
  TestCounts counts;
  std::smatch m;
  // CTest: "75% tests passed, 1 tests failed out of 4"
  static const std::regex ctest(R"((\d+)% tests passed, (\d+) tests? failed out of (\d+))");
  if (std::regex_search(output, m, ctest)) {
    counts.failed = std::stoi(m[2]);
    counts.passed = std::stoi(m[3]) - counts.failed;
    counts.found = true;
    return counts;
  }
  // unittest: "Ran 4 tests in 0.001s" then "OK" or "FAILED (failures=1, errors=1, skipped=1)"
  static const std::regex ran(R"(Ran (\d+) tests? in )");
  if (std::regex_search(output, m, ran)) {
    int total = std::stoi(m[1]);
    static const std::regex failures(R"(failures=(\d+))"), errors(R"(errors=(\d+))"), skipped(R"(skipped=(\d+))");
    counts.failed = SumMatches(output, failures, 1) + SumMatches(output, errors, 1);
    counts.skipped = SumMatches(output, skipped, 1);
    counts.passed = std::max(0, total - counts.failed - counts.skipped);
    counts.found = true;
    return counts;
  }
  // pytest: "===== 3 passed, 1 failed, 2 skipped in 0.12s ====="
  static const std::regex pytest(R"(=+ (.*\d+ (passed|failed|error|errors|skipped).*) in [\d.]+s)");
  if (std::regex_search(output, m, pytest)) {
    const std::string summary = m[1];
    static const std::regex part(R"((\d+) (passed|failed|errors?|skipped))");
    for (auto it = std::sregex_iterator(summary.begin(), summary.end(), part); it != std::sregex_iterator(); ++it) {
      int n = std::stoi((*it)[1]);
      std::string kind = (*it)[2];
      if (kind == "passed") counts.passed += n;
      else if (kind == "skipped") counts.skipped += n;
      else counts.failed += n;
    }
    counts.found = true;
    return counts;
  }
  // go test -v: one line per test.
  static const std::regex go_pass(R"(--- PASS: )"), go_fail(R"(--- FAIL: )"), go_skip(R"(--- SKIP: )");
  int pass = static_cast<int>(std::distance(std::sregex_iterator(output.begin(), output.end(), go_pass), std::sregex_iterator()));
  int fail = static_cast<int>(std::distance(std::sregex_iterator(output.begin(), output.end(), go_fail), std::sregex_iterator()));
  int skip = static_cast<int>(std::distance(std::sregex_iterator(output.begin(), output.end(), go_skip), std::sregex_iterator()));
  if (pass + fail + skip > 0) {
    counts = {pass, fail, skip, true};
  }
  return counts;
}

absl::StatusOr<std::string> DetectTestCommand(const std::string& dir, const std::string& junit_path) {
  if (PathExists(dir + "/build/CTestTestfile.cmake")) {
    return absl::StrCat("ctest --test-dir build --output-on-failure --output-junit '", junit_path, "'");
  }
  for (const char* makefile : {"Makefile", "makefile", "GNUmakefile"}) {
    auto text = ReadFile(absl::StrCat(dir, "/", makefile));
    if (text.ok() && (absl::StartsWith(*text, "test:") || absl::StrContains(*text, "\ntest:"))) return "make test";
  }
  if (auto package = ReadFile(dir + "/package.json"); package.ok() && absl::StrContains(*package, "\"test\"")) {
    return "npm test";
  }
  if (PathExists(dir + "/go.mod")) return "go test -v ./...";
  for (const char* marker : {"pytest.ini", "pyproject.toml", "setup.cfg", "setup.py", "conftest.py", "tests"}) {
    if (PathExists(absl::StrCat(dir, "/", marker))) {
      return absl::StrCat("python3 -m pytest --junitxml='", junit_path, "'");
    }
  }
  return absl::NotFoundError(absl::StrCat("no test command found in ", dir,
                                          " (looked for CTest, make test, npm test, go test, pytest); "
                                          "give one with the command input"));
}

std::string Tail(absl::string_view text, size_t max_lines, size_t max_bytes) {
  absl::string_view tail = absl::StripTrailingAsciiWhitespace(text);
  size_t start = tail.size();
  for (size_t lines = 0; start > 0 && lines < max_lines; ++lines) {
    size_t nl = tail.rfind('\n', start - 1);
    start = nl == absl::string_view::npos ? 0 : nl;
  }
  tail = tail.substr(start);
  absl::ConsumePrefix(&tail, "\n");
  if (tail.size() > max_bytes) tail = tail.substr(tail.size() - max_bytes);
  return std::string(tail);
}

absl::StatusOr<TestRun> RunTests(const std::string& dir, const std::string& command, const std::string& log_path,
                                 const std::string& junit_path, absl::Duration timeout) {
  TestRun run{.command = command, .log_path = log_path};
  UniqueFd log(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!log) return ErrnoStatus(errno, absl::StrCat("open(", log_path, ")"));
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) env.push_back(*e);
  // Reports older than this are a previous run's, not ours (second granularity: mtime's).
  const time_t started = ::time(nullptr) - 1;
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = {"sh", "-c", command},
                                                  .env = env,
                                                  .work_dir = dir,
                                                  .stdout_fd = log.get(),
                                                  .stderr_fd = log.get()}));
  pollfd pfd{.fd = child.pidfd(), .events = POLLIN};
  bool timed_out = ::poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) == 0;
  if (timed_out) {
    (void)child.SignalGroup(SIGTERM);
    if (::poll(&pfd, 1, 10000) == 0) (void)child.SignalGroup(SIGKILL);
  }
  SR_ASSIGN_OR_RETURN(run.exit_code, child.Reap());
  if (timed_out) {
    run.exit_code = 124;
    (void)WriteAll(log.get(), absl::StrCat("\nsr-catalog test: timed out after ", absl::FormatDuration(timeout), "\n"));
  }
  std::vector<std::string> candidates;
  FindReports(dir, 4, started, &candidates);
  if (PathExists(junit_path)) candidates.push_back(junit_path);
  for (const std::string& path : candidates) {
    auto xml = ReadFile(path);
    if (!xml.ok() || !absl::StrContains(*xml, "<testsuite")) continue;
    auto counts = ParseJUnitXml(*xml);
    if (!counts.ok()) continue;
    run.counts.passed += counts->passed;
    run.counts.failed += counts->failed;
    run.counts.skipped += counts->skipped;
    run.counts.found = true;
    run.reports.push_back(path);
  }
  if (!run.counts.found) {
    SR_ASSIGN_OR_RETURN(std::string output, ReadFile(log_path));
    run.counts = ParseTestOutput(output);
  }
  if (run.exit_code != 0 && run.counts.failed == 0) run.counts.failed = 1;
  return run;
}

}  // namespace step_runner::catalog

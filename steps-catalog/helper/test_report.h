#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_TEST_REPORT_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_TEST_REPORT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

// The `test` step: finding a project's test command, running it, and counting results from
// JUnit XML when the run leaves some, else from the runner's own summary line.
namespace step_runner::catalog {

struct TestCounts {
  int passed = 0;
  int failed = 0;  // failures and errors
  int skipped = 0;
  bool found = false;  // whether anything was counted at all
};

// Counts <testcase> elements of a JUnit XML report (any nesting of <testsuites>/<testsuite>):
// one with a <failure> or <error> child is failed, with <skipped> skipped, else passed.
// INVALID_ARGUMENT when the text is not a JUnit report.
absl::StatusOr<TestCounts> ParseJUnitXml(absl::string_view xml);

// Counts from a runner's summary in its output: pytest ("3 passed, 1 failed"), unittest
// ("Ran 4 tests" + "FAILED (failures=1, errors=1)"), CTest ("75% tests passed, 1 tests failed
// out of 4"), go test ("--- PASS"/"--- FAIL" lines). `found` is false when none matched.
TestCounts ParseTestOutput(absl::string_view output);

// The test command for the project in `dir` (run with sh -c): CTest when build/ holds a CTest
// tree, `make test` for a Makefile with a test target, `npm test` for a package.json with a test
// script, `go test ./...` for go.mod, pytest for a Python project. NOT_FOUND when none fits.
absl::StatusOr<std::string> DetectTestCommand(const std::string& dir, const std::string& junit_path);

// The last `max_lines` lines of `text`, at most `max_bytes` bytes.
std::string Tail(absl::string_view text, size_t max_lines, size_t max_bytes);

struct TestRun {
  std::string command;
  int exit_code = 0;  // 124 when it timed out
  TestCounts counts;
  std::vector<std::string> reports;  // the JUnit files counted
  std::string log_path;
};
// Runs `command` (sh -c) in `dir` with stdout and stderr into `log_path`; after `timeout` its
// process group gets SIGTERM, then SIGKILL. Counts come from JUnit files written during the run
// (under `dir`, or `junit_path`), else from the output. A failing run with nothing countable
// counts one failure, so a caller looping on `failed` never mistakes it for success.
absl::StatusOr<TestRun> RunTests(const std::string& dir, const std::string& command, const std::string& log_path,
                                 const std::string& junit_path, absl::Duration timeout);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_TEST_REPORT_H_

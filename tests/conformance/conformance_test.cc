// The step-language conformance suite: one folder per case under tests/conformance/cases, each
// run with the real binary's local runner (`step-runner exec`, the daemon's engine in-process):
//
//   step.yml      the job's step file (it may refer to steps beside it, e.g. ./greet)
//   inputs.json   optional: the job's inputs, passed as --input NAME=JSON
//   expect.json   what must come out:
//     "exit_code":    the CLI's exit code (0 success, 65 rejected, the step's code on failure)
//     "status":       the job's final status (success, failure, cancelled)
//     "error":        substrings of the error (stderr for a rejected file, else the job message)
//     "log":          the exact log; or "log_contains" / "log_excludes": substrings
//     "result":       a subset of the result tree (step-results.json) that must match
//     "catalog":      a folder of the case to serve as the dist:// catalog
//     "git_repo":     {"dir": D, "url_placeholder": P}: D becomes a git repository (one commit,
//                     tag v1) and every P in step.yml is replaced by its file:// URL
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "step-runner/base/files.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using Json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kCases = std::string(SR_SOURCE_DIR) + "/tests/conformance/cases";

std::vector<std::string> CaseNames() {
  std::vector<std::string> names;
  DIR* d = ::opendir(kCases.c_str());
  while (d) {
    struct dirent* e = ::readdir(d);
    if (!e) break;
    if (e->d_name[0] != '.') names.push_back(e->d_name);
  }
  if (d) ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

// `expected` is a subset of `actual`: every key it names has an equal value (objects
// recursively, arrays element by element and of the same length).
void ExpectSubset(const Json& expected, const Json& actual, const std::string& where) {
  if (expected.is_object()) {
    ASSERT_TRUE(actual.is_object()) << where << ": expected an object, got " << actual.dump();
    for (const auto& [k, v] : expected.items()) {
      ASSERT_TRUE(actual.contains(k)) << where << "." << k << " is missing in " << actual.dump();
      ExpectSubset(v, actual[k], where + "." + k);
    }
  } else if (expected.is_array()) {
    ASSERT_TRUE(actual.is_array() && actual.size() == expected.size())
        << where << ": expected " << expected.size() << " items, got " << actual.dump();
    for (size_t i = 0; i < expected.size(); ++i) ExpectSubset(expected[i], actual[i], absl::StrCat(where, "[", i, "]"));
  } else {
    EXPECT_EQ(expected, actual) << where;
  }
}

std::vector<std::string> Strings(const Json& v) {
  std::vector<std::string> out;
  if (v.is_string()) out.push_back(v.get<std::string>());
  if (v.is_array()) for (const auto& s : v) out.push_back(s.get<std::string>());
  return out;
}

class ConformanceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ConformanceTest, Case) {
  const std::string source = kCases + "/" + GetParam();
  TempDir tmp;
  // Each case runs in a copy of its folder, which is also the work dir.
  const std::string work = tmp.path() + "/case";
  ASSERT_EQ(RunCommand({"cp", "-r", source, work})->exit_code, 0);
  auto expect_text = ReadFile(work + "/expect.json");
  ASSERT_TRUE(expect_text.ok()) << expect_text.status();
  const Json expect = Json::parse(*expect_text);

  if (expect.contains("git_repo")) {
    const std::string repo = work + "/" + expect["git_repo"]["dir"].get<std::string>();
    for (std::vector<std::string> cmd : std::vector<std::vector<std::string>>{
             {"git", "-C", repo, "init", "-q", "-b", "main"},
             {"git", "-C", repo, "add", "-A"},
             {"git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "steps"},
             {"git", "-C", repo, "tag", "v1"}}) {
      auto r = RunCommand(cmd);
      ASSERT_TRUE(r.ok() && r->exit_code == 0) << absl::StrJoin(cmd, " ") << ": " << (r.ok() ? r->err : "");
    }
    auto step = ReadFile(work + "/step.yml");
    ASSERT_TRUE(step.ok());
    ASSERT_TRUE(WriteFileAtomically(work + "/step.yml",
                                    absl::StrReplaceAll(*step, {{expect["git_repo"]["url_placeholder"].get<std::string>(),
                                                                 "file://" + repo}}),
                                    0600)
                    .ok());
  }

  std::vector<std::string> argv = {StepRunnerBinary(), "exec", work + "/step.yml", "--work-dir", work,
                                   "--result", tmp.path() + "/result.json"};
  if (auto inputs = ReadFile(work + "/inputs.json"); inputs.ok()) {
    const Json parsed = Json::parse(*inputs);
    for (const auto& [k, v] : parsed.items()) {
      argv.push_back("--input");
      argv.push_back(absl::StrCat(k, "=", v.dump()));
    }
  }
  argv.push_back("--catalog");
  argv.push_back((expect.contains("catalog") ? work + "/" + expect["catalog"].get<std::string>()
                                                           : tmp.path() + "/no-catalog"));
  auto run = RunCommand(argv, absl::Seconds(120), {"XDG_CACHE_HOME=" + tmp.path() + "/cache"});
  ASSERT_TRUE(run.ok()) << run.status();
  SCOPED_TRACE(absl::StrCat("stdout:\n", run->out, "\nstderr:\n", run->err));

  if (expect.contains("exit_code")) {
    EXPECT_EQ(run->exit_code, expect["exit_code"].get<int>());
  }
  Json result = Json::object();
  if (auto text = ReadFile(tmp.path() + "/result.json"); text.ok()) result = Json::parse(*text);
  if (expect.contains("status")) {
    EXPECT_EQ(result.value("status", "none"), expect["status"].get<std::string>());
  }
  for (const std::string& e : Strings(expect.value("error", Json()))) {
    EXPECT_THAT(run->err + result.value("message", ""), HasSubstr(e));
  }
  if (expect.contains("log")) {
    EXPECT_EQ(run->out, expect["log"].get<std::string>());
  }
  for (const std::string& s : Strings(expect.value("log_contains", Json()))) EXPECT_THAT(run->out, HasSubstr(s));
  for (const std::string& s : Strings(expect.value("log_excludes", Json()))) {
    EXPECT_THAT(run->out + run->err, Not(HasSubstr(s)));
    EXPECT_THAT(result.dump(), Not(HasSubstr(s)));
  }
  if (expect.contains("result")) ExpectSubset(expect["result"], result.value("result", Json::object()), "result");
}

INSTANTIATE_TEST_SUITE_P(Cases, ConformanceTest, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// Bigger than any step file should be: refused with a clear error, memory bounded.
TEST(ConformanceLimits, HundredMegabyteFileIsRefused) {
  TempDir tmp;
  const std::string path = tmp.path() + "/huge.yml";
  {
    std::ofstream out(path);
    out << "spec: {}\n---\nrun:\n";
    std::string line = "  - name: s\n    script: echo " + std::string(1000, 'x') + "\n";
    for (size_t written = 0; written < (100u << 20); written += line.size()) out << line;
  }
  auto run = RunCommand({StepRunnerBinary(), "exec", path}, absl::Seconds(120));
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->exit_code, 65);
  EXPECT_THAT(run->err, HasSubstr("the limit is"));
}

}  // namespace
}  // namespace step_runner::testing

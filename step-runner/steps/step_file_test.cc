#include "step-runner/steps/step_file.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner::steps {
namespace {

using ::testing::HasSubstr;

TEST(StepFileTest, ParsesExec) {
  SR_ASSERT_OK_AND_ASSIGN(StepFile f, ParseStepFile(R"({}
---
exec:
  command: [/bin/echo, "a b", ";rm -rf /"]
  work_dir: /tmp
env:
  A: "1"
)", "steps"));
  ASSERT_TRUE(f.definition.exec.has_value());
  EXPECT_THAT(f.definition.exec->command,
              ::testing::ElementsAre("/bin/echo", "a b", ";rm -rf /"));
  EXPECT_EQ(f.definition.exec->work_dir, "/tmp");
  EXPECT_EQ(f.definition.env.at("A"), "1");
}

TEST(StepFileTest, ParsesRunSequenceOfScripts) {
  SR_ASSERT_OK_AND_ASSIGN(StepFile f, ParseStepFile(R"(spec: {}
---
run:
  - name: first
    script: echo one
    env: {X: y}
  - name: second
    script: |
      echo two
)", "steps"));
  ASSERT_EQ(f.definition.run.size(), 2u);
  EXPECT_EQ(f.definition.run[0].name, "first");
  EXPECT_EQ(f.definition.run[0].env.at("X"), "y");
  EXPECT_EQ(f.definition.run[1].script, "echo two\n");
  EXPECT_EQ(f.definition.run[1].position.line, 7);
}

TEST(StepFileTest, MalformedYamlHasLineAndColumn) {
  auto f = ParseStepFile("{}\n---\nrun:\n  - name: a\n    script: [unclosed\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(f.status()));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("malformed YAML"));
  EXPECT_THAT(std::string(f.status().message()), ::testing::ContainsRegex("steps:[0-9]+:[0-9]+: "));
}

TEST(StepFileTest, ReportsSeveralViolationsWithPositions) {
  std::vector<Violation> violations;
  auto f = ParseStepFile(R"({}
---
run:
  - name: ok_step
    script: true
    colour: red
  - name: 1bad
    script: [not, a, string]
)", "job.yml", &violations);
  ASSERT_FALSE(f.ok());
  ASSERT_EQ(violations.size(), 3u) << f.status();
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("job.yml:6:5: run[0].colour: unknown key \"colour\""));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("job.yml:7:11: run[1].name: a step name must match"));
  EXPECT_THAT(std::string(f.status().message()),
              HasSubstr("job.yml:8:13: run[1].script: expected a string, found a sequence"));
}

TEST(StepFileTest, RequiresTwoDocuments) {
  auto f = ParseStepFile("exec: {command: [true]}\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("expected two YAML documents"));
}

TEST(StepFileTest, ExactlyOneOfExecOrRun) {
  auto f = ParseStepFile("{}\n---\nenv: {A: b}\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("exactly one of \"exec\" or \"run\""));
}

TEST(StepFileTest, EmptyCommandRejected) {
  auto f = ParseStepFile("{}\n---\nexec: {command: []}\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("exec.command: expected a non-empty sequence"));
}

TEST(StepFileTest, UnsupportedFeaturesAreRefusedNotIgnored) {
  auto f = ParseStepFile("{}\n---\nexec: {command: [echo, '${{ inputs.x }}']}\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("expressions"));
  auto g = ParseStepFile("{}\n---\nrun:\n  - name: a\n    step: ./other\n", "steps");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("step references are not supported"));
}

TEST(StepFileTest, OversizedFileRejectedBeforeParsing) {
  std::string big(kMaxStepFileBytes + 1, '#');
  auto f = ParseStepFile(big, "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("the limit is"));
}

// Step files come from untrusted clients (often a model): hostile YAML must end in an error,
// never a crash of the daemon or unbounded memory.
TEST(StepFileTest, NestingTenThousandDeepIsAnError) {
  for (const char* open_close : {"[]", "{}"}) {
    std::string deep = "{}\n---\nexec: {command: [true]}\nenv: ";
    for (int i = 0; i < 10000; ++i) deep += open_close[0];
    for (int i = 0; i < 10000; ++i) deep += open_close[1];
    auto f = ParseStepFile(deep, "steps");
    ASSERT_FALSE(f.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(f.status()));
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("steps:4:69: the YAML is nested deeper than 64 levels"));
  }
  std::string block = "{}\n---\nexec: {command: [true]}\nenv:\n";
  for (int i = 0; i < 10000; ++i) block += std::string(static_cast<size_t>(i) + 1, ' ') + "- \n";
  auto f = ParseStepFile(block, "steps");
  ASSERT_FALSE(f.ok());
}

// yaml-cpp 0.7 alone loops forever, its memory growing, on each of these (found by fuzzing).
TEST(StepFileTest, InputsThatHangYamlCppAreRejectedWithAPosition) {
  for (const char* text : {"{}\n,\n", ",\n", "\"x\",\n", "[a]\n,\n", "{}\n,--\nexec:ho, hi]\n ?work_dir: /: {A: b}\n"}) {
    auto f = ParseStepFile(text, "steps");
    ASSERT_FALSE(f.ok()) << text;
    EXPECT_THAT(std::string(f.status().message()), ::testing::ContainsRegex("^steps:[0-9]+:[0-9]+: malformed YAML"))
        << text;
  }
}

TEST(StepFileTest, InvalidUtf8IsRejectedWithAPosition) {
  auto f = ParseStepFile("{}\n---\nexec: {command: [echo, \"\xff\xfe\"]}\n", "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("steps:3:25: the step file is not valid UTF-8"));
}

TEST(StepFileTest, AliasBombIsAQuickClearError) {
  // A billion "lol"s if expanded; the parser never expands aliases it does not need.
  std::string bomb = "{}\n---\nexec: {command: [true]}\nenv:\n";
  bomb += "  x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n";
  for (int i = 1; i < 10; ++i) {
    bomb += "  x" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int j = 0; j < 10; ++j) bomb += std::string(j ? ", " : "") + "*a" + std::to_string(i - 1);
    bomb += "]\n";
  }
  auto f = ParseStepFile(bomb, "steps");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("env.x9: expected a string, found a sequence"));
}

}  // namespace
}  // namespace step_runner::steps

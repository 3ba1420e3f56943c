#include "step-runner/engine/engine.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

// Runs processes for real, one at a time, their output into one file.
class TestHost : public Host {
 public:
  explicit TestHost(std::string log_path) : log_path_(std::move(log_path)) {}
  ProcessOutcome RunProcess(const ProcessSpec& spec) override {
    names.push_back(spec.name);
    if (spec.wants_network) networked.push_back(spec.name);
    int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    absl::StatusOr<process::Subprocess> child = process::Subprocess::Spawn(
        {.argv = spec.argv, .env = spec.env, .work_dir = spec.work_dir, .stdout_fd = fd, .stderr_fd = fd});
    ::close(fd);
    ProcessOutcome outcome;
    if (!child.ok()) {
      outcome.spawn_error = std::string(child.status().message());
      outcome.exit_code = 127;
      return outcome;
    }
    outcome.exit_code = child->Reap().value_or(1);
    return outcome;
  }
  void Log(absl::string_view line) override { logged += std::string(line); }
  void Publish(const proto::StepResult&, const proto::StepResult& node, const std::string& path, bool finished) override {
    events.push_back(absl::StrCat(finished ? "finished " : "started ", path, " ", proto::StepResult::Status_Name(node.status())));
  }
  void AddSecret(const std::string& value) override { secrets.push_back(value); }
  bool Cancelled() override { return false; }
  bool SleepUnlessCancelled(absl::Duration) override { return false; }

  std::vector<std::string> names, events, secrets, networked;
  std::string logged;

 private:
  std::string log_path_;
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/engine-test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    loader_ = std::make_unique<StepLoader>(LoaderOptions{dir_ + "/catalog", dir_ + "/cache"});
  }
  void TearDown() override { (void)RemoveTree(dir_); }

  void Write(const std::string& rel, const std::string& text) {
    std::string path = dir_ + "/" + rel;
    ASSERT_TRUE(MakeDirs(path.substr(0, path.rfind('/')), 0700).ok());
    ASSERT_TRUE(WriteFileAtomically(path, text, 0600).ok());
  }

  JobOutcome Run(const std::string& text, Json inputs = Json::object()) {
    return RunWith(text, [&](JobSpec& job) { job.inputs = std::move(inputs); });
  }
  JobOutcome RunWith(const std::string& text, const std::function<void(JobSpec&)>& adjust) {
    absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(text, "job.yml");
    EXPECT_TRUE(file.ok()) << file.status();
    if (!file.ok()) return {};
    JobSpec job;
    job.file = std::make_shared<steps::StepFile>(*file);
    job.file_dir = dir_;
    job.env = {{"PATH", "/usr/bin:/bin"}};
    job.work_dir = dir_;
    job.io_root = dir_ + "/io";
    job.shell = {"bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c"};
    job.loader = loader_.get();
    adjust(job);
    host_ = std::make_unique<TestHost>(dir_ + "/log");
    return RunJob(job, *host_);
  }
  std::string Log() { return ReadFile(dir_ + "/log").value_or(""); }

  std::string dir_;
  std::unique_ptr<StepLoader> loader_;
  std::unique_ptr<TestHost> host_;
};

TEST_F(EngineTest, OutputsFlowToLaterStepsWithTypes) {
  Write("count/step.yml", R"(spec:
  inputs:
    n: {type: number}
  outputs:
    doubled: {type: number}
    words: {type: array}
---
exec:
  command: [bash, -c, 'echo "{\"name\":\"doubled\",\"value\":$(( $1 * 2 ))}" > "$2"; echo "{\"name\":\"words\",\"value\":[\"a\",\"b\"]}" >> "$2"', x, "${{ inputs.n }}", "${{ output_file }}"]
)");
  JobOutcome out = Run(R"(spec: {}
---
run:
  - name: count
    step: ./count
    inputs: {n: 21}
  - name: show
    script: echo "got ${{ steps.count.outputs.doubled }} and ${{ join(steps.count.outputs.words, '+') }}"
)");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_EQ(Log(), "got 42 and a+b\n");
  ASSERT_EQ(out.result.sub_step_results_size(), 2);
  EXPECT_EQ(out.result.sub_step_results(0).outputs().at("doubled").number_value(), 42);
}

TEST_F(EngineTest, ScriptTemplatesAreDataNotShell) {
  JobOutcome out = Run(R"(spec:
  inputs:
    evil: {type: string}
---
run:
  - name: greet
    script: echo "hello ${{ inputs.evil }}" && echo '${{ inputs.evil }}'
)", Json{{"evil", "$(touch pwned); `id`; ' \" done"}});
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_THAT(Log(), HasSubstr("hello $(touch pwned); `id`; ' \" done\n"));
  EXPECT_FALSE(ReadFile(dir_ + "/pwned").ok());
  // Inside single quotes the value is read too (it printed ${SR_EXPR_1}), and stays data.
  EXPECT_EQ(Log(), "hello $(touch pwned); `id`; ' \" done\n$(touch pwned); `id`; ' \" done\n");
}

// Where the quoting stands at each template: single quotes, $'...', a comment with an
// apostrophe before it; past a heredoc the template is left as a variable, as before.
TEST_F(EngineTest, ScriptTemplatesInsideSingleQuotesReadTheirValue) {
  JobOutcome out = Run(R"(spec:
  inputs:
    who: {type: string}
---
run:
  - name: greet
    script: |
      # don't be fooled by this apostrophe
      # nor by ${{ inputs.who }}'s in a comment
      echo 'hello ${{ inputs.who }}!' "and ${{ inputs.who }}" plain-${{ inputs.who }}
      printf '%s\n' $'tab\t${{ inputs.who }}'
      cat <<'EOF'
      literal ${{ inputs.who }}
      EOF
)", Json{{"who", "it's me; echo pwned"}});
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_EQ(Log(), "hello it's me; echo pwned! and it's me; echo pwned plain-it's me; echo pwned\n"
                   "tab\tit's me; echo pwned\n"
                   "literal ${SR_EXPR_5}\n");
}

TEST_F(EngineTest, SkippedAndContinueOnErrorAndRetry) {
  JobOutcome out = Run(R"(spec: {}
---
run:
  - name: never
    if: ${{ 1 == 2 }}
    script: echo never
  - name: flaky
    retry: {max: 2, delay: 0s}
    script: 'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; [ $n -ge 2 ]'
  - name: broken
    continue_on_error: true
    script: exit 3
  - name: last
    script: echo last
)");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  ASSERT_EQ(out.result.sub_step_results_size(), 4);
  EXPECT_EQ(out.result.sub_step_results(0).status(), proto::StepResult::skipped);
  EXPECT_EQ(out.result.sub_step_results(1).attempts(), 3);
  EXPECT_EQ(out.result.sub_step_results(1).status(), proto::StepResult::success);
  EXPECT_EQ(out.result.sub_step_results(2).status(), proto::StepResult::failure);
  EXPECT_TRUE(out.result.sub_step_results(2).continued_on_error());
  EXPECT_EQ(Log(), "last\n");
}

// A failure that continue_on_error absorbed does not describe a later one: the job's error is
// the later one's (it was reported as the earlier step's exit code and kind).
TEST_F(EngineTest, AFailureAfterAContinuedOneReportsItsOwnKindAndExitCode) {
  JobOutcome out = Run(R"(spec:
  outputs:
    x: {type: string}
---
run:
  - name: c
    continue_on_error: true
    script: exit 7
  - name: ok
    script: echo fine
outputs:
  x: "${{ 3 }}"
)");
  EXPECT_EQ(out.status, proto::StepResult::failure);
  EXPECT_THAT(out.message, HasSubstr("output \"x\" is declared as a string"));
  EXPECT_EQ(out.error_kind, proto::StatusError::failed);
  EXPECT_EQ(out.exit_code, 1);
}

// A null from an expression is as if the input were not given: the default applies, and a
// required input says it is missing (both used to pass null through to the step).
TEST_F(EngineTest, ANullInputTakesTheDefaultOrIsMissing) {
  Write("child/step.yml", R"(spec:
  inputs:
    d: {type: string, default: dflt}
    s: {type: string}
---
exec:
  command: [echo, "d=${{ inputs.d }}"]
)");
  JobOutcome defaulted = Run("spec: {}\n---\nrun:\n  - name: c\n    step: ./child\n    inputs: {s: x, d: \"${{ null }}\"}\n");
  EXPECT_EQ(defaulted.status, proto::StepResult::success) << defaulted.message;
  EXPECT_EQ(Log(), "d=dflt\n");
  JobOutcome missing = Run("spec: {}\n---\nrun:\n  - name: c\n    step: ./child\n    inputs: {s: \"${{ null }}\"}\n");
  EXPECT_EQ(missing.status, proto::StepResult::failure);
  EXPECT_THAT(missing.message, HasSubstr("missing required input \"s\" (a string): it was given null"));
}

// An inline `run:` sees the steps before it in the enclosing sequence, at run time as the
// validation already allowed (it failed with "steps has no property").
TEST_F(EngineTest, AnInlineSequenceSeesTheStepsBeforeIt) {
  Write("out/step.yml", R"(spec:
  outputs:
    v: {type: string}
---
exec:
  command: [sh, -c, 'echo "{\"name\":\"v\",\"value\":\"hello\"}" > "$0"', "${{ output_file }}"]
)");
  JobOutcome out = Run(R"(spec: {}
---
run:
  - name: a
    step: ./out
  - name: group
    run:
      - name: b
        script: echo "inner sees ${{ steps.a.outputs.v }}"
)");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_EQ(Log(), "inner sees hello\n");
}

// GitLab Functions name the file func.yml: a folder with only that one is a step too.
TEST_F(EngineTest, AFolderWithFuncYmlIsAStep) {
  Write("fn/func.yml", "spec: {}\n---\nexec:\n  command: [echo, from-func-yml]\n");
  JobOutcome out = Run("spec: {}\n---\nrun:\n  - name: f\n    step: ./fn\n");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_EQ(Log(), "from-func-yml\n");
  JobOutcome missing = Run("spec: {}\n---\nrun:\n  - name: f\n    step: ./nothing-here\n");
  EXPECT_THAT(missing.message, HasSubstr("step.yml (nor func.yml)"));
}

TEST_F(EngineTest, ExportsBecomeEnvAndPrecedenceHolds) {
  JobOutcome out = Run(R"(spec: {}
---
run:
  - name: export
    script: echo '{"name":"COLOUR","value":"blue"}' > "${{ export_file }}"
  - name: show
    script: echo "$COLOUR $LEVEL"
    env: {LEVEL: invocation}
env:
  LEVEL: sequence
)");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_EQ(Log(), "blue invocation\n");
}

// The result tree goes to disk (the job record, step-results.json) and to every Status caller:
// a masked variable a step exports is masked there as in the log, and so is a known token.
TEST_F(EngineTest, MaskedVariablesAndTokensAreMaskedInTheResultTree) {
  JobOutcome out = RunWith(R"(spec: {}
---
run:
  - name: leak
    script: |
      printf '{"name":"LEAK","value":"%s"}\n' "$TOKEN" >> "${{ export_file }}"
      printf '{"name":"PAT","value":"glpat-abcdefghij0123"}\n' >> "${{ export_file }}"
)", [](JobSpec& job) {
    job.env["TOKEN"] = "s3cr3t-masked-value-42";
    job.job_variables["TOKEN"] = "s3cr3t-masked-value-42";
    job.masked_variables.insert("TOKEN");
  });
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  ASSERT_EQ(out.result.sub_step_results_size(), 1);
  const auto& exports = out.result.sub_step_results(0).exports();
  ASSERT_TRUE(exports.contains("LEAK"));
  EXPECT_EQ(exports.at("LEAK"), "[MASKED]");
  EXPECT_EQ(exports.at("PAT"), "[MASKED]");
  EXPECT_THAT(out.result.DebugString(), Not(HasSubstr("s3cr3t-masked-value-42")));
}

// A masked value inside a struct or an array (an output, then another step's input and the
// job's output) is masked at any depth, as a plain string output is.
TEST_F(EngineTest, MaskedValuesInsideStructsAndArraysAreMaskedInTheResultTree) {
  Write("leak/step.yml", R"(spec:
  outputs:
    st: {type: struct}
    ar: {type: array}
---
exec:
  command: [bash, -c, 'printf ''{"name":"st","value":{"t":"%s","n":{"%s":1}}}\n{"name":"ar","value":[["%s"]]}\n'' "$TOKEN" "$TOKEN" "$TOKEN" > "$0"', "${{ output_file }}"]
)");
  Write("take/step.yml", R"(spec:
  inputs:
    cfg: {type: struct}
    list: {type: array}
---
exec:
  command: ["true"]
)");
  JobOutcome out = RunWith(R"(spec:
  outputs:
    o: {type: struct}
---
run:
  - name: l
    step: ./leak
  - name: pass
    step: ./take
    inputs: {cfg: "${{ steps.l.outputs.st }}", list: "${{ steps.l.outputs.ar }}"}
outputs:
  o: "${{ steps.l.outputs.st }}"
)", [](JobSpec& job) {
    job.env["TOKEN"] = "s3cr3t-masked-value-42";
    job.job_variables["TOKEN"] = "s3cr3t-masked-value-42";
    job.masked_variables.insert("TOKEN");
  });
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_THAT(out.result.DebugString(), Not(HasSubstr("s3cr3t-masked-value-42")));
  ASSERT_EQ(out.result.sub_step_results_size(), 2);
  const auto& st = out.result.sub_step_results(0).outputs().at("st").struct_value().fields();
  EXPECT_EQ(st.at("t").string_value(), "[MASKED]");
  EXPECT_TRUE(st.at("n").struct_value().fields().contains("[MASKED]"));
  EXPECT_EQ(out.result.sub_step_results(0).outputs().at("ar").list_value().values(0).list_value().values(0).string_value(),
            "[MASKED]");
}

// A sensitive value given to an input of the wrong type is not quoted in the error: quoted, a
// long one would be cut short of what the masker looks for, and one with a quote escaped.
TEST_F(EngineTest, ASecretGivenToAnInputOfTheWrongTypeIsNotQuotedInTheError) {
  Write("num/step.yml", "spec:\n  inputs:\n    n: {type: number}\n---\nexec: {command: [\"true\"]}\n");
  const std::string secret = absl::StrCat("Pa\"ss\\", std::string(80, 'x'), "-end");
  JobOutcome out = RunWith(R"(spec:
  inputs:
    tok: {type: string, sensitive: true}
---
run:
  - name: c
    step: ./num
    inputs: {n: "${{ inputs.tok }}"}
)", [&](JobSpec& job) {
    job.inputs["tok"] = secret;
    job.sensitive_inputs.insert("tok");
  });
  EXPECT_EQ(out.status, proto::StepResult::failure);
  EXPECT_THAT(out.message, HasSubstr("input \"n\" must be a number, found a value of another type"));
  EXPECT_THAT(out.message, Not(HasSubstr("xxxxxxxx")));
  EXPECT_THAT(out.message, Not(HasSubstr("missing")));
  EXPECT_THAT(out.message, Not(HasSubstr("step \"c\": step \"c\"")));
}

// A value nested past the limit is refused where it enters (protobuf could write such a result
// tree but not read it back: every Status of the daemon failed), and a string from a surrogate
// pair is one valid character.
TEST_F(EngineTest, DeepOutputsAreRefusedAndEveryStringOfTheTreeIsUtf8) {
  const std::string deep = std::string(50, '[') + std::string(50, ']');
  JobOutcome out = Run(absl::StrCat("spec:\n  outputs:\n    o: {type: array}\n---\nrun:\n  - name: a\n    script: \"true\"\n",
                                    "outputs:\n  o: '${{ fromJSON(\"", deep, "\") }}'\n"));
  EXPECT_EQ(out.status, proto::StepResult::failure);
  EXPECT_THAT(out.message, HasSubstr("output \"o\" nests 50 levels deep; the limit is 32"));
  std::string wire;
  ASSERT_TRUE(out.result.SerializeToString(&wire));
  proto::StepResult back;
  EXPECT_TRUE(back.ParseFromString(wire));

  JobOutcome smile = Run(
      "spec:\n  outputs:\n    e: {type: string}\n---\nrun:\n  - name: a\n    script: \"true\"\n"
      "outputs:\n  e: 'smile ${{ \"\\ud83d\\ude00\" }}'\n");
  EXPECT_EQ(smile.status, proto::StepResult::success) << smile.message;
  EXPECT_EQ(smile.result.outputs().at("e").string_value(), "smile \xF0\x9F\x98\x80");
}

// An export holding a NUL (its value or its name) fails the step: the environment would cut
// the value at the NUL (or drop the variable), unlike what the record shows.
TEST_F(EngineTest, AnExportHoldingANulFailsTheStep) {
  for (const auto& [record, expected] : std::vector<std::pair<std::string, std::string>>{
           {R"({"name":"X","value":"a\\u0000b"})", "export X holds a NUL byte"},
           {R"({"name":"Y\\u0000Z","value":"v"})", "is empty or holds '=' or a NUL byte"}}) {
    JobOutcome out = Run(absl::StrCat("spec: {}\n---\nrun:\n  - name: e\n    script: |\n      printf '", record,
                                      "\\n' > \"${{ export_file }}\"\n"));
    EXPECT_EQ(out.status, proto::StepResult::failure) << record;
    EXPECT_THAT(out.message, HasSubstr(expected));
  }
}

// The output and export files are the step's to replace: a FIFO there must not hold the job
// forever, nor a link to /dev/zero take the daemon's memory. Each fails the step, saying why.
TEST_F(EngineTest, AReplacedOutputOrExportFileFailsTheStepAndHoldsNothing) {
  for (const auto& [how, expected] : std::vector<std::pair<std::string, std::string>>{
           {"rm -f \"$F\"; mkfifo \"$F\"", "is not a regular file"},
           {"rm -f \"$F\"; ln -s /dev/zero \"$F\"", "is a symbolic link"},
           {"head -c 17000000 /dev/zero | tr '\\0' ' ' > \"$F\"", "over the limit of 16777216 bytes"}}) {
    JobOutcome out = RunWith(
        absl::StrCat("spec: {}\n---\nrun:\n  - name: swap\n    script: |\n      F=\"${{ export_file }}\"\n      ", how, "\n"),
        [&, n = expected.size()](JobSpec& job) { job.io_root = absl::StrCat(dir_, "/io-", n); });
    EXPECT_EQ(out.status, proto::StepResult::failure) << how;
    EXPECT_THAT(out.message, HasSubstr(expected)) << how;
  }
}

// An output of the wrong type fails the step. So does one nested 200,000 deep in the output file
// (a few hundred kilobytes): building and copying it crashed the process (a step could take
// the daemon down).
TEST_F(EngineTest, MissingAndMistypedOutputsFailTheStep) {
  for (const auto& [type, writer, expected] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"string", R"(echo "{\"name\":\"x\",\"value\":5}")",
            "output \"x\" is declared as a string, but received the number 5"},
           {"array",
            R"(n=200000; printf "{\"name\":\"x\",\"value\":"; head -c $n /dev/zero | tr "\0" "["; head -c $n /dev/zero | tr "\0" "]"; printf "}\n")",
            "output_file line 1: the value nests deeper than 32 levels"}}) {
    Write(type + "/step.yml", absl::StrCat("spec:\n  outputs:\n    x: {type: ", type, "}\n---\nexec:\n  command: [bash, -c, '{ ",
                                           writer, "; } > \"$0\"', \"${{ output_file }}\"]\n"));
    JobOutcome out = Run(absl::StrCat("spec: {}\n---\nrun:\n  - name: b\n    step: ./", type, "\n"));
    EXPECT_EQ(out.status, proto::StepResult::failure) << type;
    EXPECT_THAT(out.message, HasSubstr(expected));
  }
}

TEST_F(EngineTest, SensitiveInputsAreSecretsAndMaskedInResults) {
  Write("use/step.yml", R"(spec:
  inputs:
    token: {type: string, sensitive: true}
---
exec:
  command: [echo, "${{ inputs.token }}"]
)");
  JobOutcome out = Run("spec: {}\n---\nrun:\n  - name: u\n    step: ./use\n    inputs: {token: glpat-secretvalue123}\n");
  EXPECT_EQ(out.status, proto::StepResult::success) << out.message;
  EXPECT_THAT(host_->secrets, ::testing::Contains("glpat-secretvalue123"));
  EXPECT_EQ(out.result.sub_step_results(0).inputs().at("token").string_value(), "[MASKED]");
  EXPECT_THAT(out.result.sub_step_results(0).exec_result().command(), ElementsAre("echo", "[MASKED]"));
}

TEST_F(EngineTest, BindInputsReportsEveryProblem) {
  absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(
      "spec:\n  inputs:\n    a: {type: number}\n    b: {type: string}\n---\nexec: {command: [true]}\n", "s");
  ASSERT_TRUE(file.ok());
  absl::StatusOr<Json> bound = BindInputs(file->spec, Json{{"a", "x"}, {"c", 1}}, "s");
  ASSERT_FALSE(bound.ok());
  EXPECT_THAT(std::string(bound.status().message()), HasSubstr("does not accept an input named \"c\""));
  EXPECT_THAT(std::string(bound.status().message()), HasSubstr("input \"a\" must be a number"));
  EXPECT_THAT(std::string(bound.status().message()), HasSubstr("missing required input \"b\""));
  // "a" was given, with the wrong type: that is the one problem with it, not also "missing".
  EXPECT_THAT(std::string(bound.status().message()), Not(HasSubstr("missing required input \"a\"")));
}

TEST_F(EngineTest, CyclesAndUnknownStepsAreFoundBeforeRunning) {
  Write("a/step.yml", "spec: {}\n---\nrun:\n  - name: b\n    step: ../b\n");
  Write("b/step.yml", "spec: {}\n---\nrun:\n  - name: a\n    step: ../a\n");
  absl::StatusOr<steps::StepFile> file =
      steps::ParseStepFile("spec: {}\n---\nrun:\n  - name: a\n    step: ./a\n  - name: x\n    step: ./missing\n", "job.yml");
  ASSERT_TRUE(file.ok());
  std::vector<steps::Violation> v = CheckReferences(*file, dir_, "job.yml", *loader_);
  ASSERT_EQ(v.size(), 2u);
  EXPECT_THAT(v[0].description, HasSubstr("a cycle"));
  EXPECT_THAT(v[1].description, HasSubstr("not found"));
  // Each is placed in the file that holds it: the cycle closes in b/step.yml (line 4), the
  // missing step is the job's own (it was all labelled with the job file's name).
  EXPECT_THAT(v[0].file, ::testing::EndsWith("/b/step.yml"));
  EXPECT_EQ(v[0].position.line, 4);
  EXPECT_EQ(v[1].file, "");
}

}  // namespace
}  // namespace step_runner::engine

namespace step_runner::engine {
namespace {

// `network: true` asks for network for exactly what it covers: an exec that declares it, or
// an invocation and everything beneath it. The sandbox then applies the daemon's policy.
TEST_F(EngineTest, NetworkAskCoversExactlyWhatDeclaresIt) {
  Write("fetch/step.yml", "spec: {}\n---\nexec:\n  command: [/bin/true]\n  network: true\n");
  Write("plain/step.yml", "spec: {}\n---\nexec:\n  command: [/bin/true]\n");
  JobOutcome out = Run(R"(spec: {}
---
run:
  - name: fetch
    step: ./fetch
  - name: plain
    step: ./plain
  - name: asked
    network: true
    step: ./plain
  - name: nested
    network: true
    run:
      - name: inner
        script: "true"
  - name: script
    script: "true"
)");
  EXPECT_EQ(out.status, proto::StepResult::success) << Log();
  EXPECT_THAT(host_->networked, ::testing::ElementsAre("fetch", "asked", "nested/inner"));
  EXPECT_THAT(host_->names, ::testing::ElementsAre("fetch", "plain", "asked", "nested/inner", "script"));
}

}  // namespace
}  // namespace step_runner::engine

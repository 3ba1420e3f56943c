// step_bench: the step language's own costs (issue 3), each beside a baseline in the same run.
//
//   1. parse:  a generated 1,000-step `run:` sequence (scripts, inline execs, local step
//              references, templates reading inputs and earlier steps' outputs, `if:`s) through
//              steps::ParseStepFile, and through ParseStepFile + engine::CheckReferences (what
//              Runner::Run validates before a job starts), against YAML::LoadAll of the same text
//              (the YAML tree alone, which ParseStepFile builds first).
//   2. expr:   expr::Evaluate of a representative mix of expressions (a context lookup,
//              operators, format/contains/toJSON, `a.b || "default"`) and expr::Expand of a
//              string with templates in it; ns per expression.
//   3. run:    a job whose definition is a `run:` of N steps, each `exec: {command: [/bin/true]}`,
//              run to the end (a) by runner::Runner in-process, as `step-runner exec` does, with no
//              sandbox, and (b) by the daemon (`step-runner serve --sandbox=none`) through the
//              client library, Run + Follow as sr_bench does; against (c) N posix_spawn + waitpid
//              of /bin/true with the same environment. Per-step overhead = (side - raw) / N,
//              taken per repetition against the raw run of the same repetition (the sides rotate
//              which goes first), then the median over repetitions.
//
// The machines are shared and noisy: every comparison runs interleaved in one process and the
// report gives ratios. No assertion on timing anywhere; the smoke test (--quick) only checks that
// the bench runs to the end.
//
//   step_bench [--quick] [--parse_steps 1000] [--parse_reps 15] [--expr_iterations 20000]
//              [--expr_reps 9] [--run_steps 100] [--run_reps 15] [--markdown FILE] [--tmp_dir DIR]
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/notification.h"
#include "bench/bench_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/engine/engine.h"
#include "step-runner/engine/loader.h"
#include "step-runner/expr/expression.h"
#include "step-runner/runner/runner.h"
#include "step-runner/steps/step_file.h"
#include "yaml-cpp/yaml.h"

ABSL_FLAG(bool, quick, false, "smoke-test sizes (overrides every size and repetition flag)");
ABSL_FLAG(int, parse_steps, 1000, "steps in the generated run: sequence that is parsed");
ABSL_FLAG(int, parse_reps, 15, "timed parses per side (sides interleaved)");
ABSL_FLAG(int, expr_iterations, 20000, "evaluations of each expression per repetition");
ABSL_FLAG(int, expr_reps, 9, "repetitions over the whole expression mix (interleaved)");
ABSL_FLAG(int, run_steps, 100, "exec: [/bin/true] steps in the job that is run");
ABSL_FLAG(int, run_reps, 15, "timed repetitions of each side of the run comparison");
ABSL_FLAG(int, run_warmup, 2, "untimed repetitions of each side first");
ABSL_FLAG(std::string, markdown, "", "also write the tables as markdown to this file");
ABSL_FLAG(std::string, tmp_dir, "/tmp", "where the runner's and the daemon's state dirs go");

namespace step_runner::bench {
namespace {

struct Config {
  int parse_steps = 0;
  int parse_reps = 0;
  int expr_iterations = 0;
  int expr_reps = 0;
  int run_steps = 0;
  int run_reps = 0;
  int run_warmup = 0;
};

double Median(std::vector<double> v) { return Summarize(std::move(v)).p50; }

// Text for a Markdown table cell: a bare '|' would end the cell.
std::string Cell(absl::string_view text) { return absl::StrReplaceAll(text, {{"|", "\\|"}}); }

// ---------------------------------------------------------------------------------------------
// 1. Parse and validation.

// A referenced step with an input and an output, so that references are loaded and checked and
// later steps can read `steps.<name>.outputs.text`.
constexpr char kChildStep[] = R"(spec:
  inputs:
    text: {type: string}
    times: {type: number, default: 1}
  outputs:
    text: {type: string}
---
exec:
  command: [/bin/sh, -c, 'printf "{\"name\":\"text\",\"value\":\"%s\"}\n" "$0" > "$1"', "${{ inputs.text }}", "${{ output_file }}"]
)";

// A run: sequence of `steps` items in a rotation of five kinds that between them use every part
// of the language a real file does. Items that read an earlier step read the latest reference
// step before them (every fifth item from index 2 on).
std::string GeneratedStepFile(int steps) {
  std::string out = R"(spec:
  inputs:
    name: {type: string, default: world}
    count: {type: number, default: 3}
    flag: {type: boolean, default: true}
    token: {type: string, sensitive: true, default: ""}
---
env:
  GREETING: "hello ${{ inputs.name }}"
run:
)";
  int last_ref = -1;  // index of the latest reference step so far
  auto earlier = [&]() { return absl::StrCat("steps.s", last_ref, ".outputs.text"); };
  for (int i = 0; i < steps; ++i) {
    absl::StrAppend(&out, "  - name: s", i, "\n");
    switch (i % 5) {
      case 0:
        absl::StrAppend(&out, "    script: echo \"step ", i, " for ${{ inputs.name }}\" && test -n \"$N\"\n",
                        "    env: {N: \"${{ inputs.count }}\"}\n");
        break;
      case 1:
        absl::StrAppend(&out, "    exec:\n      command: [/bin/echo, \"${{ format('{0}-{1}', inputs.name, ", i,
                        ") }}\", \"${{ inputs.count + ", i, " }}\"]\n");
        break;
      case 2:
        absl::StrAppend(&out, "    step: ./child\n    inputs:\n      text: \"",
                        last_ref < 0 ? std::string("${{ inputs.name }}") : absl::StrCat("${{ ", earlier(), " }}"),
                        "\"\n      times: ", i, "\n");
        last_ref = i;
        break;
      case 3:
        absl::StrAppend(&out, "    if: ${{ inputs.flag && ", earlier(), " != '' }}\n",
                        "    timeout: 30s\n    script: echo \"${{ ", earlier(), " }}\"\n");
        break;
      default:
        absl::StrAppend(&out, "    exec:\n      command: [/bin/true, \"${{ ", earlier(),
                        " || 'default' }}\", \"${{ contains(inputs.name, 'or') }}\"]\n",
                        "    env: {TOKEN: \"${{ inputs.token }}\"}\n");
        break;
    }
  }
  absl::StrAppend(&out, "outputs:\n  last: \"${{ ", earlier(), " }}\"\n");
  return out;
}

struct ParseResult {
  int steps = 0;
  size_t bytes = 0;
  int references = 0;
  double yaml_us = 0;     // medians over repetitions, per file
  double parse_us = 0;
  double validate_us = 0;  // parse + CheckReferences
};

absl::StatusOr<ParseResult> RunParse(const Config& config, const std::string& tmp) {
  const std::string dir = tmp + "/parse";
  SR_RETURN_IF_ERROR(MakeDirs(dir + "/child", 0700));
  SR_RETURN_IF_ERROR(WriteFileAtomically(dir + "/child/step.yml", kChildStep, 0600));
  const std::string text = GeneratedStepFile(config.parse_steps);
  engine::StepLoader loader({});

  // Once untimed: the file must be valid, or the timings would be of the error path.
  {
    std::vector<steps::Violation> violations;
    absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(text, "steps", &violations);
    if (!file.ok()) return file.status();
    if (static_cast<int>(file->definition.run.size()) != config.parse_steps) {
      return absl::InternalError("the generated file parsed to the wrong number of steps");
    }
    violations = engine::CheckReferences(*file, dir, "steps", loader);
    if (!violations.empty()) return steps::InvalidArgument(violations, "steps");
  }

  std::vector<double> yaml, parse, validate;
  size_t documents = 0;  // keeps the YAML side's result alive, so none of it is optimised away
  auto yaml_side = [&]() -> absl::Status {
    const Clock::time_point start = Clock::now();
    std::vector<YAML::Node> docs = YAML::LoadAll(text);
    yaml.push_back(MicrosSince(start));
    documents += docs.size();
    return absl::OkStatus();
  };
  auto parse_side = [&]() -> absl::Status {
    const Clock::time_point start = Clock::now();
    absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(text, "steps");
    parse.push_back(MicrosSince(start));
    return file.status();
  };
  auto validate_side = [&]() -> absl::Status {
    const Clock::time_point start = Clock::now();
    absl::StatusOr<steps::StepFile> file = steps::ParseStepFile(text, "steps");
    if (!file.ok()) return file.status();
    std::vector<steps::Violation> violations = engine::CheckReferences(*file, dir, "steps", loader);
    validate.push_back(MicrosSince(start));
    if (!violations.empty()) return steps::InvalidArgument(violations, "steps");
    return absl::OkStatus();
  };
  const std::function<absl::Status()> sides[] = {yaml_side, parse_side, validate_side};
  for (int rep = 0; rep < config.parse_reps; ++rep) {
    for (int k = 0; k < 3; ++k) SR_RETURN_IF_ERROR(sides[rep % 2 == 0 ? k : 2 - k]());  // ABCCBA
  }
  if (documents != 2u * static_cast<size_t>(config.parse_reps)) {
    return absl::InternalError("YAML::LoadAll did not find the two documents");
  }
  ParseResult result;
  result.steps = config.parse_steps;
  result.bytes = text.size();
  result.references = (config.parse_steps + 2) / 5;
  result.yaml_us = Median(yaml);
  result.parse_us = Median(parse);
  result.validate_us = Median(validate);
  return result;
}

// ---------------------------------------------------------------------------------------------
// 2. Expressions.

struct ExprCase {
  const char* label;
  const char* text;
  bool expand;  // expr::Expand of a string with templates, not expr::Evaluate of one expression
  expr::Json expected;
  // Evaluated with 100 earlier steps' outputs in the `steps` context instead of one, as late in
  // a long run: sequence (the cost of a lookup should not grow with what it does not read).
  bool many_steps = false;
};

std::vector<ExprCase> ExprCases() {
  return {
      {"context lookup", "steps.build.outputs.sha", false, "3f2a9c1"},
      {"operators", "inputs.count + 1 > 3 && inputs.flag && steps.build.outputs.sha != ''", false, true},
      {"format()", "format('{0}-{1}@{2}', inputs.name, inputs.count, steps.build.outputs.sha)", false,
       "world-3@3f2a9c1"},
      {"contains()", "contains(steps.build.outputs.words, 'beta')", false, true},
      {"toJSON()", "toJSON(steps.build.outputs.words)", false, R"(["alpha","beta","gamma"])"},
      {"a.b || \"default\"", "inputs.missing || \"default\"", false, "default"},
      {"Expand, 2 templates in a string", "deploy ${{ inputs.name }} at ${{ steps.build.outputs.sha }}", true,
       "deploy world at 3f2a9c1"},
      {"context lookup, 100 steps in context", "steps.build.outputs.sha", false, "3f2a9c1", true},
  };
}

expr::Context ExprContext(bool many_steps) {
  expr::Context context;
  context.Set("inputs", {{"name", "world"}, {"count", 3}, {"flag", true}, {"token", "s3cret"}});
  context.MarkSensitive("inputs.token");
  expr::Json steps = {{"build", {{"outputs", {{"sha", "3f2a9c1"}, {"words", {"alpha", "beta", "gamma"}}}}}}};
  for (int i = 0; many_steps && i < 99; ++i) {
    steps[absl::StrCat("s", i)] = {{"outputs", {{"sha", absl::StrCat("sha", i)}, {"words", {"alpha", "beta"}}}}};
  }
  context.Set("steps", std::move(steps));
  context.Set("env", {{"HOME", "/home/bench"}, {"PATH", "/usr/bin:/bin"}});
  context.Set("job", {{"id", "42"}});
  return context;
}

struct ExprResult {
  std::vector<std::string> labels;
  std::vector<std::string> texts;
  std::vector<double> ns;  // median over repetitions of the mean per evaluation
};

absl::StatusOr<ExprResult> RunExpr(const Config& config) {
  const std::vector<ExprCase> cases = ExprCases();
  const expr::Context small = ExprContext(false);
  const expr::Context large = ExprContext(true);
  auto eval = [&](const ExprCase& c) {
    const expr::Context& context = c.many_steps ? large : small;
    return c.expand ? expr::Expand(c.text, context) : expr::Evaluate(c.text, context);
  };
  for (const ExprCase& c : cases) {  // a case that errors would time the error path
    absl::StatusOr<expr::Value> v = eval(c);
    if (!v.ok()) return absl::InternalError(absl::StrCat(c.text, ": ", v.status().message()));
    if (v->json != c.expected) {
      return absl::InternalError(absl::StrCat(c.text, " gave ", v->json.dump(), ", expected ", c.expected.dump()));
    }
  }
  std::vector<std::vector<double>> samples(cases.size());
  size_t ok = 0;  // consumed below, so the evaluations cannot be optimised away
  for (int rep = 0; rep < config.expr_reps; ++rep) {
    // Rotate the starting case, so none always runs first (cold) or last.
    for (size_t k = 0; k < cases.size(); ++k) {
      const size_t i = (k + static_cast<size_t>(rep)) % cases.size();
      const Clock::time_point start = Clock::now();
      for (int n = 0; n < config.expr_iterations; ++n) ok += eval(cases[i]).ok() ? 1 : 0;
      samples[i].push_back(MicrosSince(start) * 1000 / config.expr_iterations);
    }
  }
  if (ok != cases.size() * static_cast<size_t>(config.expr_iterations) * static_cast<size_t>(config.expr_reps)) {
    return absl::InternalError("an evaluation failed while timed");
  }
  ExprResult result;
  for (size_t i = 0; i < cases.size(); ++i) {
    result.labels.push_back(cases[i].label);
    result.texts.push_back(cases[i].text);
    result.ns.push_back(Median(samples[i]));
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// 3. Running a run: sequence.

std::string TrueSequence(int steps) {
  std::string out = "{}\n---\nrun:\n";
  for (int i = 0; i < steps; ++i) absl::StrAppend(&out, "  - name: t", i, "\n    exec: {command: [/bin/true]}\n");
  return out;
}

// N x posix_spawn + waitpid of /bin/true: the floor, with none of what a step runner adds (own
// session, pidfd, output pipes, records, logs, events). Microseconds for all N.
absl::StatusOr<double> RawOnce(int steps, const std::vector<std::string>& env) {
  std::vector<char*> envp;
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  char true_path[] = "/bin/true";
  char* argv[] = {true_path, nullptr};
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < steps; ++i) {
    pid_t pid;
    if (int err = ::posix_spawn(&pid, true_path, nullptr, nullptr, argv, envp.data()); err != 0) {
      return ErrnoStatus(err, "posix_spawn(/bin/true)");
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
      if (errno != EINTR) return ErrnoStatus(errno, "waitpid");
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return absl::InternalError("/bin/true failed");
  }
  return MicrosSince(start);
}

absl::Status CheckSucceeded(const proto::Status& status, const std::string& id, int steps) {
  if (status.status() != proto::StepResult::success) {
    return absl::InternalError(absl::StrCat("job ", id, " did not succeed: ", status.message()));
  }
  if (status.result().sub_step_results_size() != steps) {
    return absl::InternalError(absl::StrCat("job ", id, " ran ", status.result().sub_step_results_size(),
                                            " steps, expected ", steps));
  }
  return absl::OkStatus();
}

// One job through the in-process Runner, Run until its log is finished (the job's final status
// is set before that, job.cc Finish), as `step-runner exec` waits. Microseconds.
absl::StatusOr<double> RunnerOnce(runner::Runner& runner, const proto::RunRequest& request, int steps) {
  const Clock::time_point start = Clock::now();
  SR_RETURN_IF_ERROR(runner.Run(request));
  SR_ASSIGN_OR_RETURN(std::shared_ptr<const runner::Job> job, runner.GetJob(request.id()));
  std::shared_ptr<logs::JobLog> log = job->log();
  while (!log->finished()) {
    absl::Notification done;
    if (log->WaitForData(log->size(), [&done] { done.Notify(); })) done.WaitForNotification();
  }
  const double micros = MicrosSince(start);
  SR_RETURN_IF_ERROR(CheckSucceeded(job->status(), request.id(), steps));
  return micros;
}

// One job through the daemon: Run, then Follow until the final status (sr_bench's dispatch).
absl::StatusOr<double> DaemonOnce(client::Client& client, const proto::RunRequest& request, int steps) {
  const Clock::time_point start = Clock::now();
  SR_RETURN_IF_ERROR(client.Run(request));
  SR_ASSIGN_OR_RETURN(proto::Status status, client.Follow(request.id(), 0, [](const proto::FollowLogsResponse&) {}));
  const double micros = MicrosSince(start);
  SR_RETURN_IF_ERROR(CheckSucceeded(status, request.id(), steps));
  return micros;
}

enum RunSide { kRaw, kRunner, kDaemon, kRunSides };
constexpr const char* kRunSideNames[kRunSides] = {
    "raw posix_spawn + waitpid", "Runner in-process (`step-runner exec`), no sandbox",
    "daemon `serve --sandbox=none`, Run + Follow"};

struct RunResult {
  int steps = 0;
  int reps = 0;
  double total_us[kRunSides] = {};     // median per job (N steps)
  double overhead_us[kRunSides] = {};  // median over reps of (side - raw of the same rep) / N
  double ratio[kRunSides] = {};        // median over reps of side / raw of the same rep
};

absl::StatusOr<RunResult> RunSequence(const Config& config, const std::string& tmp) {
  const std::vector<std::string> env = StepEnvironment();
  const std::string work_dir = tmp + "/work";
  SR_RETURN_IF_ERROR(MakeDirs(work_dir, 0700));
  SR_RETURN_IF_ERROR(MakeDirs(tmp + "/daemon", 0700));

  runner::RunnerOptions options;
  options.state_dir = tmp + "/runner-state";
  options.secrets_root = tmp + "/secrets";
  options.base_env = env;
  SR_ASSIGN_OR_RETURN(std::unique_ptr<runner::Runner> runner, runner::Runner::Create(options));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> daemon,
                      DaemonProcess::Start(DefaultStepRunnerBinary(), tmp + "/daemon", {"--sandbox=none"}));
  client::Client client(daemon->ClientOptions());

  proto::RunRequest request;
  request.set_steps(TrueSequence(config.run_steps));
  request.set_work_dir(work_dir);
  int next_id = 0;
  // Jobs are Closed (untimed, so the job table stays small) one repetition late: a Close right
  // when the log ends can land while the job still writes its final record, and then its folder
  // is left behind (see BENCHMARKS.md, "Step language"); a whole repetition later it is done.
  std::vector<std::string> runner_jobs, daemon_jobs, runner_closing, daemon_closing;
  auto close_jobs = [&]() -> absl::Status {
    for (const std::string& id : runner_closing) SR_RETURN_IF_ERROR(runner->Close(id));
    for (const std::string& id : daemon_closing) SR_RETURN_IF_ERROR(client.Close(id));
    runner_closing = std::exchange(runner_jobs, {});
    daemon_closing = std::exchange(daemon_jobs, {});
    return absl::OkStatus();
  };
  auto once = [&](int side) -> absl::StatusOr<double> {
    request.set_id(absl::StrCat("seq-", next_id++));
    switch (side) {
      case kRaw:
        return RawOnce(config.run_steps, env);
      case kRunner:
        runner_jobs.push_back(request.id());
        return RunnerOnce(*runner, request, config.run_steps);
      default:
        daemon_jobs.push_back(request.id());
        return DaemonOnce(client, request, config.run_steps);
    }
  };
  for (int i = 0; i < config.run_warmup; ++i) {
    for (int side = 0; side < kRunSides; ++side) SR_RETURN_IF_ERROR(once(side).status());
    SR_RETURN_IF_ERROR(close_jobs());
  }
  std::vector<double> totals[kRunSides], overheads[kRunSides], ratios[kRunSides];
  for (int rep = 0; rep < config.run_reps; ++rep) {
    double micros[kRunSides];
    for (int k = 0; k < kRunSides; ++k) {
      const int side = (k + rep) % kRunSides;  // each side takes every position in turn
      SR_ASSIGN_OR_RETURN(micros[side], once(side));
    }
    SR_RETURN_IF_ERROR(close_jobs());
    for (int side = 0; side < kRunSides; ++side) {
      totals[side].push_back(micros[side]);
      overheads[side].push_back((micros[side] - micros[kRaw]) / config.run_steps);
      ratios[side].push_back(micros[side] / micros[kRaw]);
    }
  }
  runner->Shutdown(absl::Seconds(10));
  SR_RETURN_IF_ERROR(daemon->Stop());
  RunResult result;
  result.steps = config.run_steps;
  result.reps = config.run_reps;
  for (int side = 0; side < kRunSides; ++side) {
    result.total_us[side] = Median(totals[side]);
    result.overhead_us[side] = Median(overheads[side]);
    result.ratio[side] = Median(ratios[side]);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------

std::string Report(const Config& config, const ParseResult& parse, const ExprResult& ex, const RunResult& run) {
  std::string out;
  absl::StrAppendFormat(&out,
                        "### Parse + validation: a %d-step run: sequence (%d bytes, %d local references; "
                        "median of %d per side, interleaved)\n\n",
                        parse.steps, parse.bytes, parse.references, config.parse_reps);
  absl::StrAppend(&out, "| side | per file | per step | / YAML::LoadAll |\n|---|---:|---:|---:|\n");
  auto parse_row = [&](const char* label, double us) {
    absl::StrAppendFormat(&out, "| %s | %.2f ms | %.1f us | %.2fx |\n", label, us / 1000, us / parse.steps,
                          us / parse.yaml_us);
  };
  parse_row("YAML::LoadAll (the YAML tree alone)", parse.yaml_us);
  parse_row("steps::ParseStepFile", parse.parse_us);
  parse_row("ParseStepFile + engine::CheckReferences", parse.validate_us);

  absl::StrAppendFormat(&out,
                        "\n### Expression evaluation (median of %d repetitions of %d evaluations each)\n\n",
                        config.expr_reps, config.expr_iterations);
  absl::StrAppend(&out, "| case | expression | ns per evaluation | / context lookup |\n|---|---|---:|---:|\n");
  for (size_t i = 0; i < ex.ns.size(); ++i) {
    absl::StrAppendFormat(&out, "| %s | `%s` | %.0f | %.1fx |\n", Cell(ex.labels[i]), Cell(ex.texts[i]), ex.ns[i],
                          ex.ns[i] / ex.ns[0]);
  }

  absl::StrAppendFormat(&out,
                        "\n### A run: of %d steps, each `exec: {command: [/bin/true]}` (%d repetitions, "
                        "sides rotating; medians)\n\n",
                        run.steps, run.reps);
  absl::StrAppend(&out,
                  "| side | per job | per step | overhead per step vs raw | side / raw |\n|---|---:|---:|---:|---:|\n");
  for (int side = 0; side < kRunSides; ++side) {
    absl::StrAppendFormat(&out, "| %s | %.1f ms | %.0f us | %s | %.2fx |\n", kRunSideNames[side],
                          run.total_us[side] / 1000, run.total_us[side] / run.steps,
                          side == kRaw ? std::string("-") : absl::StrFormat("%.0f us", run.overhead_us[side]),
                          run.ratio[side]);
  }
  absl::StrAppend(&out,
                  "\nOverhead and ratio are taken per repetition against the raw run of the same "
                  "repetition, then the median over repetitions.\n");
  return out;
}

absl::Status Main() {
  Config config;
  if (absl::GetFlag(FLAGS_quick)) {
    config = {.parse_steps = 50, .parse_reps = 2, .expr_iterations = 200, .expr_reps = 2,
              .run_steps = 5, .run_reps = 2, .run_warmup = 1};
  } else {
    config = {.parse_steps = absl::GetFlag(FLAGS_parse_steps),
              .parse_reps = absl::GetFlag(FLAGS_parse_reps),
              .expr_iterations = absl::GetFlag(FLAGS_expr_iterations),
              .expr_reps = absl::GetFlag(FLAGS_expr_reps),
              .run_steps = absl::GetFlag(FLAGS_run_steps),
              .run_reps = absl::GetFlag(FLAGS_run_reps),
              .run_warmup = absl::GetFlag(FLAGS_run_warmup)};
  }
  if (config.parse_steps < 5 || config.parse_reps < 1 || config.expr_iterations < 1 || config.expr_reps < 1 ||
      config.run_steps < 1 || config.run_reps < 1 || config.run_warmup < 0) {
    return absl::InvalidArgumentError("--parse_steps must be >= 5 and every other size >= 1");
  }
  internal::SetMinLogSeverity(internal::Severity::kWarning);
  SR_ASSIGN_OR_RETURN(std::unique_ptr<TempDir> tmp, TempDir::Create(absl::GetFlag(FLAGS_tmp_dir)));
  std::cerr << "step_bench: parse\n";
  SR_ASSIGN_OR_RETURN(ParseResult parse, RunParse(config, tmp->path()));
  std::cerr << "step_bench: expressions\n";
  SR_ASSIGN_OR_RETURN(ExprResult ex, RunExpr(config));
  std::cerr << "step_bench: run: sequence\n";
  SR_ASSIGN_OR_RETURN(RunResult run, RunSequence(config, tmp->path()));
  const std::string report = Report(config, parse, ex, run);
  std::cout << report;
  if (const std::string path = absl::GetFlag(FLAGS_markdown); !path.empty()) std::ofstream(path) << report;
  return absl::OkStatus();
}

}  // namespace
}  // namespace step_runner::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status s = step_runner::bench::Main();
  if (!s.ok()) {
    std::cerr << "step_bench: " << s << std::endl;
    return 1;
  }
  return 0;
}

#ifndef STEP_RUNNER_ENGINE_ENGINE_H_
#define STEP_RUNNER_ENGINE_ENGINE_H_

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "proto/step_runner.pb.h"
#include "step-runner/engine/loader.h"
#include "step-runner/expr/expression.h"
#include "step-runner/steps/step_file.h"

namespace step_runner::engine {

using EnvMap = std::map<std::string, std::string>;
using Json = nlohmann::json;

// One process the engine wants run, fully resolved.
struct ProcessSpec {
  std::string name;  // the step's path, e.g. "build/compile"
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "KEY=VALUE"
  std::string work_dir;
  std::string io_dir;  // holds its output_file and export_file
  absl::Time deadline = absl::InfiniteFuture();  // per-step timeouts, the tightest that applies
  bool wants_network = false;  // `network: true` on it or on a step that contains it
};

struct ProcessOutcome {
  int exit_code = 0;
  bool timed_out = false;       // the deadline passed; it was stopped
  bool cancelled = false;       // the job was cancelled while it ran (or before it started)
  std::string spawn_error;      // it never started (already shown in the log)
  std::optional<std::string> resource_exhausted;  // a resource limit ended it
};

// What the engine needs from whoever runs it: the daemon's Job, or a test. Called from the
// engine's own thread; RunProcess blocks until the process has ended and its output is drained.
class Host {
 public:
  virtual ~Host() = default;
  virtual ProcessOutcome RunProcess(const ProcessSpec& spec) = 0;
  // A line of the engine's own (skips, retries, errors) for the job's log.
  virtual void Log(absl::string_view line) = 0;
  // The result tree changed: `node` started or finished (`path` names it from the root).
  virtual void Publish(const proto::StepResult& tree, const proto::StepResult& node,
                       const std::string& path, bool finished) = 0;
  // A value that must be masked from now on (a sensitive input or output).
  virtual void AddSecret(const std::string& value) = 0;
  virtual bool Cancelled() = 0;
  // Sleeps up to `d`; returns early (true) when the job is cancelled.
  virtual bool SleepUnlessCancelled(absl::Duration d) = 0;
};

struct JobSpec {
  std::shared_ptr<const steps::StepFile> file;
  std::string file_dir;  // relative references in the job's file start here
  Json inputs = Json::object();  // the job's own inputs (already checked by BindJobInputs)
  std::set<std::string> sensitive_inputs;
  EnvMap env;  // the container's and the runner's: base env, request env, job variables
  Json job_variables = Json::object();  // ${{ job.X }} and ${{ vars.X }}
  std::set<std::string> masked_variables;
  std::string work_dir;
  std::string io_root;  // a folder per process for output_file and export_file
  // How a script: runs, e.g. {bash, -e, -o, pipefail, -c}. Empty: bash with errexit and
  // pipefail where the job's PATH has bash, else sh -e (looked up at the job's first script).
  std::vector<std::string> shell;
  StepLoader* loader = nullptr;
};

struct JobOutcome {
  proto::StepResult::Status status = proto::StepResult::success;
  proto::StatusError::Kind error_kind = proto::StatusError::unspecified;
  std::string message;
  int exit_code = 0;
  proto::StepResult result;
};

// Runs a job's step tree to the end: references, inputs, expressions, outputs, exports,
// env precedence, if/timeout/retry/continue_on_error. Blocking; one call per job.
JobOutcome RunJob(const JobSpec& job, Host& host);

// Checks and completes a step's inputs against its spec: unknown names, types, required
// inputs, defaults. `values` are already expanded; those named in `sensitive_values` carry a
// secret and are never quoted in an error. Returns the complete inputs.
absl::StatusOr<Json> BindInputs(const steps::Spec& spec, const Json& values, absl::string_view step_name,
                                const std::set<std::string>& sensitive_values = {});

// Loads every static reference (local and dist://) under `file`, recursively, and checks the
// inputs given to each, so that a job whose tree cannot work is refused before anything runs:
// unknown steps, cycles, unknown or missing inputs, wrong literal types. Git and dynamic
// references are checked when they run. Returns every problem found as violations.
std::vector<steps::Violation> CheckReferences(const steps::StepFile& file, const std::string& file_dir,
                                              const std::string& source, StepLoader& loader);

// The result tree as JSON (step-results.json), in the protobuf JSON mapping.
std::string ResultToJson(const proto::StepResult& result);

// Status value for skipped steps (an extension of GitLab's enum).
inline constexpr proto::StepResult::Status kSkipped = proto::StepResult::skipped;

}  // namespace step_runner::engine

#endif  // STEP_RUNNER_ENGINE_ENGINE_H_

#ifndef STEP_RUNNER_STEPS_STEP_FILE_H_
#define STEP_RUNNER_STEPS_STEP_FILE_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace step_runner::steps {

// 1-based position in the step file, as a person counts it.
struct SourcePosition {
  int line = 0;
  int column = 0;
};

// One problem found in a step file: where, which key, what was expected and what was found.
struct Violation {
  SourcePosition position;
  std::string field;  // e.g. "run[1].script"
  std::string description;
};

using Env = std::map<std::string, std::string>;

struct ExecDefinition {
  std::vector<std::string> command;  // argv; never run through a shell
  std::string work_dir;              // empty: the job's work dir
};

// An item of a `run:` sequence.
struct Invocation {
  std::string name;
  // The script body; it runs under bash with errexit and pipefail (sh when bash is missing).
  std::string script;
  Env env;
  SourcePosition position;
};

struct StepDefinition {
  std::optional<ExecDefinition> exec;  // exactly one of exec / run
  std::vector<Invocation> run;
  Env env;
};

struct StepFile {
  StepDefinition definition;
};

// Parses a step file in GitLab's two-document format (a spec, `---`, a definition). Bad input
// yields INVALID_ARGUMENT whose message lists every violation found, one per line, as
// "<source>:<line>:<column>: <field>: <description>"; `violations` (if non-null) receives them
// in structured form.
absl::StatusOr<StepFile> ParseStepFile(absl::string_view text, absl::string_view source_name,
                                       std::vector<Violation>* violations = nullptr);

// INVALID_ARGUMENT whose message lists the violations, one per line, as
// "<source>:<line>:<column>: <field>: <description>" (the position is left out when unknown),
// with the same violations attached as a google.rpc.BadRequest payload (kBadRequestTypeUrl).
absl::Status InvalidArgument(const std::vector<Violation>& violations, absl::string_view source_name);
inline constexpr char kBadRequestTypeUrl[] = "type.googleapis.com/google.rpc.BadRequest";

// Step files larger than this are rejected before parsing.
inline constexpr size_t kMaxStepFileBytes = 4 << 20;
// Bounds on the YAML itself, checked before a tree is built.
inline constexpr int kMaxYamlDepth = 64;
inline constexpr size_t kMaxYamlAliases = 1000;
inline constexpr size_t kMaxYamlNodes = 200000;

}  // namespace step_runner::steps

#endif  // STEP_RUNNER_STEPS_STEP_FILE_H_

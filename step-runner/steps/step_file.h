#ifndef STEP_RUNNER_STEPS_STEP_FILE_H_
#define STEP_RUNNER_STEPS_STEP_FILE_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

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
  std::string file;  // the file it is in, when not the one being checked (a step it refers to)
};

using Env = std::map<std::string, std::string>;  // values may hold ${{ }} templates
using Json = nlohmann::json;

// The types of inputs and outputs (GitLab's spec types).
enum class ValueType { kString, kNumber, kBoolean, kStruct, kArray };
std::string TypeName(ValueType type);
bool HasType(const Json& value, ValueType type);
// How a JSON value is described in errors ("a number", "a string", ...).
std::string DescribeJson(const Json& value);

struct Param {
  ValueType type = ValueType::kString;
  std::optional<Json> default_value;  // none: the input is required, the output must be written
  bool sensitive = false;
  SourcePosition position;
};

struct Spec {
  std::map<std::string, Param> inputs;
  std::map<std::string, Param> outputs;
  bool delegate_outputs = false;  // `outputs: delegate`
};

// Where a step comes from (`step:` or its alias `func:`).
struct StepReference {
  enum class Kind { kLocal, kDist, kGit, kDynamic };
  Kind kind = Kind::kLocal;
  std::string text;  // as written, for messages (and re-parsed at run time when dynamic)
  std::string path;  // kLocal: a path; kDist: the name after dist://
  // kGit: the repository, the revision, and the folder and file of the step inside it.
  std::string git_url, git_rev, git_dir, git_file = "step.yml";
};
// Parses a short reference (a string): local path, dist://, or host/path[/-/dir]@rev.
absl::StatusOr<StepReference> ParseShortReference(absl::string_view text);

struct RetryPolicy {
  int max_attempts = 1;  // retry.max extra attempts, plus the first
  absl::Duration delay = absl::ZeroDuration();
};

struct StepDefinition;

// An item of a `run:` sequence.
struct Invocation {
  std::string name;
  SourcePosition position;
  // Exactly one of these three.
  std::optional<std::string> script;  // bash with errexit and pipefail (sh when bash is missing)
  std::optional<StepReference> step;
  std::shared_ptr<const StepDefinition> inline_definition;  // {exec: ...} or {run: ...} in place
  std::map<std::string, Json> inputs;  // strings may hold ${{ }} templates
  Env env;
  // Beyond GitLab: control flow.
  std::string if_condition;  // a template; empty: always runs
  std::optional<absl::Duration> timeout;
  RetryPolicy retry;
  bool continue_on_error = false;
  // Beyond GitLab: asks for network for everything this step runs; the daemon's sandbox
  // policy decides what it gets (none, all, or its allow-list).
  bool network = false;
};

struct ExecDefinition {
  std::vector<std::string> command;  // argv; never run through a shell
  std::string work_dir;              // empty: the job's work dir
  bool network = false;              // beyond GitLab: this command asks for network
};

struct StepDefinition {
  std::optional<ExecDefinition> exec;  // exactly one of exec / run
  std::vector<Invocation> run;
  Env env;
  std::map<std::string, Json> outputs;  // of a run: sequence, by name (templates)
  std::string delegate;                 // a run: sequence's outputs are this step's
};

struct StepFile {
  Spec spec;
  StepDefinition definition;
};

// Parses a step file in GitLab's two-document format (a spec, `---`, a definition), checking
// every ${{ }} template's syntax and the contexts it reads (declared inputs, earlier steps). Bad input
// yields INVALID_ARGUMENT whose message lists every violation found, one per line, as
// "<source>:<line>:<column>: <field>: <description>"; `violations` (if non-null) receives them
// in structured form.
absl::StatusOr<StepFile> ParseStepFile(absl::string_view text, absl::string_view source_name,
                                       std::vector<Violation>* violations = nullptr);

// Step files already parsed, by their exact text. An agent sends the same steps again and again
// (its workflow's, the catalog's), and each parse is three passes over the YAML on the way to the
// job's first process (~0.1 ms; BENCHMARKS.md, sixth session). Holds the last `capacity` texts
// of at most `max_text_bytes` each that parsed; a text that does not parse is parsed (and
// refused) each time. Thread-safe.
class ParsedStepFiles {
 public:
  explicit ParsedStepFiles(size_t capacity = 64, size_t max_text_bytes = 64 << 10)
      : capacity_(capacity), max_text_bytes_(max_text_bytes) {}

  // As ParseStepFile; the file is shared with every other caller that sent the same text.
  absl::StatusOr<std::shared_ptr<const StepFile>> Parse(absl::string_view text, absl::string_view source_name,
                                                        std::vector<Violation>* violations = nullptr);

 private:
  struct Entry {
    std::shared_ptr<const StepFile> file;
    uint64_t last_used = 0;
  };
  const size_t capacity_;
  const size_t max_text_bytes_;
  absl::Mutex mu_;
  std::map<std::string, Entry, std::less<>> files_ ABSL_GUARDED_BY(mu_);
  uint64_t uses_ ABSL_GUARDED_BY(mu_) = 0;
};

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

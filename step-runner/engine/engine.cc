#include "step-runner/engine/engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <functional>

#include "absl/strings/match.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/base/utf8.h"
#include "step-runner/logs/masker.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::engine {
namespace {

using ::google::protobuf::util::TimeUtil;
using steps::Invocation;
using steps::Spec;
using steps::StepDefinition;

constexpr char kMasked[] = "[MASKED]";
// Bounds what a step may hand back through its output and export files.
constexpr size_t kMaxOutputFileBytes = 16 << 20;

google::protobuf::Timestamp Now() { return TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(absl::Now())); }

// How deep a value given to an input or set as an output may nest. The result tree carries
// them as protobuf Values (two message levels per level), and protobuf parses at most 100
// levels: a deeper job record could be written but not read back (Status of every job failed).
constexpr int kMaxValueDepth = 32;

int Depth(const Json& v) {
  int deepest = 0;
  if (v.is_array() || v.is_object()) {
    for (const auto& item : v) deepest = std::max(deepest, Depth(item));
    ++deepest;
  }
  return deepest;
}

// Where a script's text stands, quoting-wise, at each template, so that a template inside
// single quotes still reads its value: the quotes are closed around the variable
// ('a '"${SR_EXPR_0}"' b'), and the value itself never becomes shell text. Bash's grammar is
// bigger than this: past a heredoc ("<<") the tracking stops and templates are left as
// ${SR_EXPR_n}, as before (a quoted heredoc's body does not expand them).
class ShellQuoting {
 public:
  enum class State { kPlain, kSingle, kDouble, kAnsiC, kComment, kUnknown };

  // Moves over script text (the text between two templates).
  void Advance(absl::string_view text) {
    for (size_t i = 0; i < text.size() && state_ != State::kUnknown; ++i) {
      const char c = text[i];
      const bool has_next = i + 1 < text.size();
      switch (state_) {
        case State::kSingle:
          if (c == '\'') state_ = State::kPlain;
          break;
        case State::kComment:
          // A comment ("# don't") runs to the end of the line, templates in it too; its quotes
          // are no quotes.
          if (c == '\n') state_ = State::kPlain;
          break;
        case State::kAnsiC:
        case State::kDouble:
          if (c == '\\') ++i;
          else if (c == (state_ == State::kDouble ? '"' : '\'')) state_ = State::kPlain;
          break;
        case State::kPlain:
          if (c == '\\') {
            ++i;
          } else if (c == '\'') {
            state_ = State::kSingle;
          } else if (c == '"') {
            state_ = State::kDouble;
          } else if (c == '$' && has_next && text[i + 1] == '\'') {
            state_ = State::kAnsiC;
            ++i;
          } else if (c == '#' && word_start_) {
            state_ = State::kComment;
          } else if (c == '<' && has_next && text[i + 1] == '<') {
            state_ = State::kUnknown;
          }
          break;
        case State::kUnknown: break;
      }
      word_start_ = state_ == State::kPlain && (absl::ascii_isspace(static_cast<unsigned char>(c)) ||
                                                 c == ';' || c == '&' || c == '|' || c == '(' || c == ')');
    }
  }

  // How a template here reads variable `var`.
  std::string Reference(absl::string_view var) const {
    switch (state_) {
      case State::kSingle: return absl::StrCat("'\"${", var, "}\"'");
      case State::kAnsiC: return absl::StrCat("'\"${", var, "}\"$'");
      default: return absl::StrCat("${", var, "}");
    }
  }

 private:
  State state_ = State::kPlain;
  bool word_start_ = true;
};

// How deeply JSON text nests its arrays and objects, read without building it: a value nested
// 200,000 deep is a few hundred kilobytes of step output, and building, copying or walking it
// recursively would overflow the stack of the daemon's thread.
size_t JsonTextNesting(absl::string_view text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// The value's own check: an error naming `what` when it nests too deep.
absl::Status CheckDepth(const Json& v, absl::string_view what) {
  if (int depth = Depth(v); depth > kMaxValueDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " nests ", depth, " levels deep; the limit is ", kMaxValueDepth));
  }
  return absl::OkStatus();
}

// The result tree must always serialize and parse back: strings become valid UTF-8 (protobuf
// refuses others), and a value past kMaxValueDepth (refused where it enters) is cut.
google::protobuf::Value ToProtoValue(const Json& v, int depth = 0) {
  google::protobuf::Value out;
  if ((v.is_array() || v.is_object()) && depth >= kMaxValueDepth) {
    out.set_string_value("[nested too deep]");
    return out;
  }
  switch (v.type()) {
    case Json::value_t::null: out.set_null_value(google::protobuf::NULL_VALUE); break;
    case Json::value_t::boolean: out.set_bool_value(v.get<bool>()); break;
    case Json::value_t::string: out.set_string_value(ToValidUtf8(v.get<std::string>())); break;
    case Json::value_t::array:
      for (const auto& item : v) *out.mutable_list_value()->add_values() = ToProtoValue(item, depth + 1);
      break;
    case Json::value_t::object:
      for (const auto& [k, item] : v.items()) {
        (*out.mutable_struct_value()->mutable_fields())[ToValidUtf8(k)] = ToProtoValue(item, depth + 1);
      }
      break;
    default: out.set_number_value(v.get<double>()); break;
  }
  return out;
}

// Every string in `v` that holds a secret, for the masker.
void CollectStrings(const Json& v, std::vector<std::string>& out) {
  if (v.is_string()) {
    out.push_back(v.get<std::string>());
  } else if (v.is_array() || v.is_object()) {
    for (const auto& item : v) CollectStrings(item, out);
  } else if (!v.is_null()) {
    out.push_back(expr::ToDisplayString(v));
  }
}

// The outputs a step produced, and which of them are sensitive.
struct StepOutputs {
  Json values = Json::object();
  std::set<std::string> sensitive;
};

// Where a failing step leaves the job: which error kind, and the exit code to report.
struct FailureInfo {
  proto::StatusError::Kind kind = proto::StatusError::failed;
  int exit_code = 1;
};

class JobRun {
 public:
  JobRun(const JobSpec& job, Host& host) : job_(job), host_(host) {}

  JobOutcome Run() {
    Frame root;
    root.spec = &job_.file->spec;
    root.step_dir = job_.file_dir;
    root.inputs = job_.inputs;
    root.sensitive_inputs = job_.sensitive_inputs;
    for (const std::string& name : job_.sensitive_inputs) {
      if (job_.inputs.contains(name)) SecretsOf(job_.inputs[name]);
    }
    // Masked job variables are masked in the result tree too (a step may export or output one),
    // which goes to disk (the job record, step-results.json) and to every Status caller.
    for (const std::string& name : job_.masked_variables) {
      if (job_.job_variables.contains(name)) SecretsOf(job_.job_variables[name]);
    }
    const bool root_is_exec = job_.file->definition.exec.has_value();
    if (root_is_exec) {
      tree_.set_name("exec");
      root.path = "exec";
    }
    tree_.set_status(proto::StepResult::running);
    *tree_.mutable_start_time() = Now();
    if (root_is_exec) PublishMasked(tree_, root.path, false);
    StepOutputs outputs;
    absl::Status status = RunDefinition(job_.file->definition, root, tree_, outputs);
    if (status.ok()) status = CheckOutputs(*root.spec, root, outputs, "the job");
    SetOutputs(tree_, outputs);
    Finish(tree_, status);
    if (root_is_exec) PublishMasked(tree_, root.path, true);

    JobOutcome outcome;
    MaskTree(tree_);
    outcome.result = tree_;
    outcome.status = tree_.status();
    if (!status.ok()) {
      outcome.status = host_.Cancelled() ? proto::StepResult::cancelled : proto::StepResult::failure;
      outcome.message = std::string(status.message());
      outcome.error_kind = failure_.kind;
      outcome.exit_code = failure_.exit_code;
    }
    return outcome;
  }

 private:
  struct SequenceState;
  // What a step sees while it runs.
  struct Frame {
    const Spec* spec = nullptr;
    std::string step_dir;
    Json inputs = Json::object();
    std::set<std::string> sensitive_inputs;
    std::vector<EnvMap> env_layers;  // outermost first; the innermost wins
    absl::Time deadline = absl::InfiniteFuture();
    std::string path;                 // names from the root, "a/b"
    std::vector<std::string> files;   // the step files on the way here, for cycles
    bool network = false;             // a step on the way here asked for network
    // For an inline definition: the sequence it is an item of (null in a step file's own).
    const SequenceState* enclosing = nullptr;
  };
  // The outputs of the steps run so far in a sequence, as ${{ steps }} sees them.
  struct SequenceState {
    Json steps = Json::object();
    std::set<std::string> sensitive_paths;  // "steps.x.outputs.y"
  };

  void SecretsOf(const Json& v) {
    std::vector<std::string> values;
    CollectStrings(v, values);
    for (std::string& s : values) {
      if (!s.empty()) {
        host_.AddSecret(s);
        secrets_.push_back(std::move(s));
      }
    }
  }

  Json Masked(const Json& v, bool sensitive) const { return sensitive ? Json(kMasked) : v; }

  EnvMap CurrentEnv(const Frame& frame) const {
    EnvMap env = job_.env;
    for (const auto& [k, v] : exports_) env[k] = v;
    for (const EnvMap& layer : frame.env_layers) {
      for (const auto& [k, v] : layer) env[k] = v;
    }
    return env;
  }

  expr::Context MakeContext(const Frame& frame, const SequenceState* sequence, const std::string& io_dir) const {
    expr::Context ctx;
    ctx.Set("inputs", frame.inputs);
    for (const std::string& name : frame.sensitive_inputs) ctx.MarkSensitive("inputs." + name);
    EnvMap env = CurrentEnv(frame);
    Json env_json = Json::object();
    for (const auto& [k, v] : env) env_json[k] = v;
    ctx.Set("env", std::move(env_json));
    ctx.Set("job", job_.job_variables);
    ctx.Set("vars", job_.job_variables);
    for (const std::string& name : job_.masked_variables) {
      ctx.MarkSensitive("job." + name);
      ctx.MarkSensitive("vars." + name);
      ctx.MarkSensitive("env." + name);
    }
    ctx.Set("work_dir", job_.work_dir);
    ctx.Set("step_dir", frame.step_dir);
    ctx.Set("func_dir", frame.step_dir);
    ctx.Set("output_file", io_dir.empty() ? Json(nullptr) : Json(io_dir + "/output.jsonl"));
    ctx.Set("export_file", io_dir.empty() ? Json(nullptr) : Json(io_dir + "/export.jsonl"));
    if (sequence) {
      ctx.Set("steps", sequence->steps);
      for (const std::string& path : sequence->sensitive_paths) ctx.MarkSensitive(path);
    } else {
      ctx.Set("steps", Json::object());
    }
    return ctx;
  }

  // Expands every template in a JSON value (strings, and strings inside arrays and objects).
  absl::StatusOr<expr::Value> ExpandJson(const Json& v, const expr::Context& ctx) {
    if (v.is_string()) return expr::Expand(v.get<std::string>(), ctx);
    if (v.is_array() || v.is_object()) {
      expr::Value out{v.is_array() ? Json::array() : Json::object(), false};
      for (auto it = v.begin(); it != v.end(); ++it) {
        SR_ASSIGN_OR_RETURN(expr::Value item, ExpandJson(*it, ctx));
        if (v.is_array()) {
          out.json.push_back(std::move(item.json));
        } else {
          out.json[it.key()] = std::move(item.json);
        }
        out.sensitive = out.sensitive || item.sensitive;
      }
      return out;
    }
    return expr::Value{v, false};
  }

  absl::StatusOr<EnvMap> ExpandEnv(const steps::Env& env, const expr::Context& ctx, absl::string_view what) {
    EnvMap out;
    for (const auto& [k, v] : env) {
      absl::StatusOr<expr::Value> value = expr::Expand(v, ctx);
      if (!value.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ".env.", k, ": ", value.status().message()));
      std::string text = expr::ToDisplayString(value->json);
      if (text.find('\0') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(what, ".env.", k, ": the value holds a NUL byte"));
      }
      if (value->sensitive) SecretsOf(Json(text));
      out[k] = std::move(text);
    }
    return out;
  }

  // Each process gets its own folder for ${{ output_file }} and ${{ export_file }}. It is made
  // only when the process was told where it is: the only way to learn the path is an expanded
  // expression, so a process whose argv, env and work dir do not contain it cannot use it, and
  // most processes (a plain command, a test run) skip the folder's files entirely.
  std::string NextIoDir() { return absl::StrCat(job_.io_root, "/", ++io_counter_); }

  // bash with errexit and pipefail, as GitLab's script step; sh where there is no bash. Looked
  // up at the first script, so jobs of plain commands do not walk PATH.
  const std::vector<std::string>& Shell() {
    if (!job_.shell.empty()) return job_.shell;
    if (shell_.empty()) {
      auto path = job_.env.find("PATH");
      const std::vector<std::string> env = {path == job_.env.end() ? "" : absl::StrCat("PATH=", path->second)};
      shell_ = process::FindExecutable("bash", env).ok()
                   ? std::vector<std::string>{"bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c"}
                   : std::vector<std::string>{"sh", "-e", "-c"};
    }
    return shell_;
  }

  static bool Mentions(const ProcessSpec& spec, const std::string& dir) {
    auto has = [&](const std::string& text) { return text.find(dir) != std::string::npos; };
    return has(spec.work_dir) || std::any_of(spec.argv.begin(), spec.argv.end(), has) ||
           std::any_of(spec.env.begin(), spec.env.end(), has);
  }

  // Made by us with mode 0700 just now, so its two empty files are created in place (O_EXCL):
  // nothing else can have put anything there.
  absl::Status MakeIoDir(const std::string& dir) {
    if (!io_root_made_) {
      SR_RETURN_IF_ERROR(MakeDirs(job_.io_root, 0700));
      io_root_made_ = true;
    }
    if (::mkdir(dir.c_str(), 0700) != 0) return ErrnoStatus(errno, absl::StrCat("mkdir(", dir, ")"));
    for (const char* name : {"/output.jsonl", "/export.jsonl"}) {
      const std::string path = dir + name;
      UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
      if (!fd) return ErrnoStatus(errno, absl::StrCat("creating ", path));
    }
    return absl::OkStatus();
  }

  // Reads a JSON Lines file of {"name": ..., "value": ...} records.
  absl::StatusOr<std::vector<std::pair<std::string, Json>>> ReadRecords(const std::string& path, absl::string_view what) {
    // The step's code may have replaced the file: a link to /dev/zero or another job's log, a
    // FIFO that would hold the job forever. None of that is read.
    absl::StatusOr<std::string> read = ReadRegularFile(path, kMaxOutputFileBytes, /*follow_links=*/false, what);
    if (absl::IsNotFound(read.status())) return std::vector<std::pair<std::string, Json>>{};
    if (!read.ok()) return read.status();
    const std::string& text = *read;
    std::vector<std::pair<std::string, Json>> records;
    int line_number = 0;
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      ++line_number;
      if (absl::StripAsciiWhitespace(line).empty()) continue;
      // The record itself is one level; its value may take kMaxValueDepth more.
      if (JsonTextNesting(line) > static_cast<size_t>(kMaxValueDepth) + 1) {
        return absl::InvalidArgumentError(absl::StrCat(what, " line ", line_number, ": the value nests deeper than ",
                                                       kMaxValueDepth, " levels"));
      }
      Json record = Json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded() || !record.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(what, " line ", line_number,
                                                       ": expected a JSON object {\"name\": ..., \"value\": ...}"));
      }
      auto name = record.find("name");
      auto value = record.find("value");
      if (name == record.end() || !name->is_string() || name->get<std::string>().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(what, " line ", line_number, ": \"name\" must be a non-empty string"));
      }
      if (value == record.end() || value->is_null()) {
        return absl::InvalidArgumentError(absl::StrCat(what, " line ", line_number, ": \"value\" is missing or null"));
      }
      records.emplace_back(name->get<std::string>(), std::move(*value));
    }
    return records;
  }

  // Reads the exports a process wrote: they become env for every later step of the job.
  absl::Status CollectExports(const std::string& io_dir, const std::string& step, proto::StepResult& result) {
    SR_ASSIGN_OR_RETURN(auto records, ReadRecords(io_dir + "/export.jsonl", absl::StrCat("step \"", step, "\": export_file")));
    for (auto& [name, value] : records) {
      if (!value.is_string() && !value.is_number() && !value.is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat("step \"", step, "\": export ", name,
                                                       " must be a string, number or boolean, found ",
                                                       steps::DescribeJson(value)));
      }
      if (name.empty() || name.find('=') != std::string::npos || name.find('\0') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("step \"", step, "\": export name \"", absl::CEscape(name),
                                                       "\" is empty or holds '=' or a NUL byte"));
      }
      std::string text = expr::ToDisplayString(value);
      // An environment value ends at its first NUL: later steps would get less than the record
      // shows.
      if (text.find('\0') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("step \"", step, "\": export ", name, " holds a NUL byte"));
      }
      exports_[name] = text;
      (*result.mutable_exports())[name] = text;
    }
    return absl::OkStatus();
  }

  // Checks outputs against the spec that declares them: undeclared, mistyped and missing ones
  // are errors; a missing one with a default takes it.
  absl::Status CheckOutputs(const Spec& spec, const Frame& frame, StepOutputs& outputs, absl::string_view who) {
    if (spec.delegate_outputs) return absl::OkStatus();
    std::vector<std::string> declared;
    for (const auto& [name, param] : spec.outputs) declared.push_back(name);
    for (const auto& [name, value] : outputs.values.items()) {
      auto it = spec.outputs.find(name);
      if (it == spec.outputs.end()) {
        return absl::InvalidArgumentError(absl::StrCat(who, ": unexpected output \"", name, "\"; the spec declares ",
                                                       declared.empty() ? "no outputs" : absl::StrJoin(declared, ", ")));
      }
      SR_RETURN_IF_ERROR(CheckDepth(value, absl::StrCat(who, ": output \"", name, "\"")));
      if (!steps::HasType(value, it->second.type)) {
        return absl::InvalidArgumentError(absl::StrCat(who, ": output \"", name, "\" is declared as ",
                                                       steps::TypeName(it->second.type), ", but received ",
                                                       outputs.sensitive.count(name) ? "a sensitive value of another type"
                                                                                     : steps::DescribeJson(value)));
      }
    }
    for (const auto& [name, param] : spec.outputs) {
      if (!outputs.values.contains(name)) {
        if (!param.default_value) {
          return absl::InvalidArgumentError(absl::StrCat(who, ": missing output \"", name, "\" (declared as ",
                                                         steps::TypeName(param.type), ", with no default)"));
        }
        outputs.values[name] = *param.default_value;
      }
      if (param.sensitive) {
        outputs.sensitive.insert(name);
        SecretsOf(outputs.values[name]);
      }
    }
    (void)frame;
    return absl::OkStatus();
  }

  void SetOutputs(proto::StepResult& result, const StepOutputs& outputs) {
    result.clear_outputs();
    for (const auto& [name, value] : outputs.values.items()) {
      (*result.mutable_outputs())[name] = ToProtoValue(Masked(value, outputs.sensitive.count(name) > 0));
    }
  }

  void Finish(proto::StepResult& result, const absl::Status& status) {
    *result.mutable_end_time() = Now();
    if (status.ok()) {
      result.set_status(proto::StepResult::success);
    } else {
      result.set_status(host_.Cancelled() ? proto::StepResult::cancelled : proto::StepResult::failure);
      if (result.message().empty()) result.set_message(MaskText(std::string(status.message())));
    }
  }

  // Secrets found late (an output) also appear in what was recorded earlier (a command line
  // that carried the value): every string of the tree is masked again before it leaves.
  void MaskTree(proto::StepResult& r) const {
    for (std::string& arg : *r.mutable_exec_result()->mutable_command()) arg = MaskText(arg);
    r.set_message(MaskText(r.message()));
    for (auto& [k, v] : *r.mutable_exports()) v = MaskText(v);
    for (auto& [k, v] : *r.mutable_outputs()) MaskValue(v);
    for (auto& [k, v] : *r.mutable_inputs()) MaskValue(v);
    for (proto::StepResult& child : *r.mutable_sub_step_results()) MaskTree(child);
  }
  // Every string in a value, at any depth (a struct or array output can carry a secret), and
  // a struct's keys.
  void MaskValue(google::protobuf::Value& v) const {
    switch (v.kind_case()) {
      case google::protobuf::Value::kStringValue: v.set_string_value(MaskText(v.string_value())); break;
      case google::protobuf::Value::kListValue:
        for (google::protobuf::Value& item : *v.mutable_list_value()->mutable_values()) MaskValue(item);
        break;
      case google::protobuf::Value::kStructValue: {
        auto& fields = *v.mutable_struct_value()->mutable_fields();
        std::vector<std::pair<std::string, google::protobuf::Value>> renamed;
        for (auto it = fields.begin(); it != fields.end();) {
          MaskValue(it->second);
          if (std::string key = MaskText(it->first); key != it->first) {
            renamed.emplace_back(std::move(key), std::move(it->second));
            it = fields.erase(it);
          } else {
            ++it;
          }
        }
        for (auto& [key, value] : renamed) fields[key] = std::move(value);
        break;
      }
      default: break;
    }
  }

  void PublishMasked(const proto::StepResult& node, const std::string& path, bool finished) {
    proto::StepResult tree = tree_;
    MaskTree(tree);
    proto::StepResult shown = node;
    MaskTree(shown);
    host_.Publish(tree, shown, path, finished);
  }

  // The log's rules: the secrets, and tokens with a well-known prefix (glpat-...) whether or not
  // anyone declared them.
  // Also made valid UTF-8: every string of the result tree and of a failure's message passes
  // here, and protobuf will not carry one that is not.
  std::string MaskText(const std::string& text) const {
    std::string masked = logs::MaskSecrets(text, secrets_);
    return IsValidUtf8(masked) ? masked : ToValidUtf8(masked);
  }

  absl::Status Fail(proto::StatusError::Kind kind, int exit_code, std::string message) {
    failure_ = {kind, exit_code};
    return absl::AbortedError(MaskText(std::move(message)));
  }

  absl::Status RunProcess(ProcessSpec spec, const std::string& step, proto::StepResult& result,
                          std::vector<std::string> shown_command) {
    for (const std::string& arg : shown_command) result.mutable_exec_result()->add_command(arg);
    result.mutable_exec_result()->set_work_dir(spec.work_dir);
    if (host_.Cancelled()) return Fail(proto::StatusError::cancelled, 0, "the job was cancelled");
    ProcessOutcome outcome = host_.RunProcess(spec);
    result.mutable_exec_result()->set_exit_code(outcome.exit_code);
    if (outcome.cancelled) return Fail(proto::StatusError::cancelled, outcome.exit_code, "the job was cancelled");
    if (!outcome.spawn_error.empty()) {
      return Fail(proto::StatusError::failed, outcome.exit_code, absl::StrCat("step \"", step, "\": ", outcome.spawn_error));
    }
    if (outcome.resource_exhausted) {
      return Fail(proto::StatusError::resource_exhausted, outcome.exit_code,
                  absl::StrCat("step \"", step, "\": ", *outcome.resource_exhausted));
    }
    if (outcome.timed_out) {
      return Fail(proto::StatusError::timeout, outcome.exit_code,
                  absl::StrCat("step \"", step, "\" exceeded its timeout and was stopped"));
    }
    if (outcome.exit_code != 0) {
      std::string how = outcome.exit_code > 128 ? absl::StrCat("was killed by signal ", outcome.exit_code - 128)
                                                : absl::StrCat("exited with code ", outcome.exit_code);
      return Fail(proto::StatusError::failed, outcome.exit_code, absl::StrCat("step \"", step, "\" ", how));
    }
    return absl::OkStatus();
  }

  // An error in the step file's use (a bad expression, a wrong input) fails the step.
  absl::Status Invalid(const std::string& step, const absl::Status& status) {
    return Fail(proto::StatusError::failed, 1, absl::StrCat("step \"", step, "\": ", status.message()));
  }

  std::string StepName(const Frame& frame) const {
    size_t slash = frame.path.rfind('/');
    return slash == std::string::npos ? frame.path : frame.path.substr(slash + 1);
  }

  absl::Status RunExec(const steps::ExecDefinition& exec, const Frame& frame, proto::StepResult& result,
                       StepOutputs& outputs) {
    const std::string name = frame.path.empty() ? "exec" : StepName(frame);
    const std::string io_dir = NextIoDir();
    const expr::Context ctx = MakeContext(frame, nullptr, io_dir);
    ProcessSpec spec;
    spec.name = frame.path.empty() ? "exec" : frame.path;
    std::vector<std::string> shown;
    for (size_t i = 0; i < exec.command.size(); ++i) {
      absl::StatusOr<expr::Value> arg = expr::Expand(exec.command[i], ctx);
      if (!arg.ok()) return Invalid(name, absl::InvalidArgumentError(absl::StrCat("exec.command[", i, "]: ", arg.status().message())));
      std::string text = expr::ToDisplayString(arg->json);
      if (text.find('\0') != std::string::npos) {
        return Invalid(name, absl::InvalidArgumentError(absl::StrCat("exec.command[", i, "] holds a NUL byte")));
      }
      if (arg->sensitive) SecretsOf(Json(text));
      shown.push_back(arg->sensitive ? kMasked : text);
      spec.argv.push_back(std::move(text));
    }
    std::string work_dir = job_.work_dir;
    if (!exec.work_dir.empty()) {
      absl::StatusOr<expr::Value> dir = expr::Expand(exec.work_dir, ctx);
      if (!dir.ok()) return Invalid(name, absl::InvalidArgumentError(absl::StrCat("exec.work_dir: ", dir.status().message())));
      work_dir = expr::ToDisplayString(dir->json);
      if (!absl::StartsWith(work_dir, "/")) work_dir = absl::StrCat(job_.work_dir, "/", work_dir);
    }
    spec.work_dir = work_dir;
    for (const auto& [k, v] : CurrentEnv(frame)) spec.env.push_back(absl::StrCat(k, "=", v));
    spec.deadline = frame.deadline;
    spec.wants_network = frame.network || exec.network;
    const bool uses_io = Mentions(spec, io_dir);
    if (uses_io) {
      if (absl::Status s = MakeIoDir(io_dir); !s.ok()) return Invalid(name, s);
      spec.io_dir = io_dir;
    }
    // Gone however the step ends: a failed one's files (up to 16 MiB each) would otherwise stay
    // until the job is closed.
    absl::Cleanup remove_io = [&] {
      if (uses_io) (void)RemoveTree(io_dir);
    };
    SR_RETURN_IF_ERROR(RunProcess(std::move(spec), name, result, std::move(shown)));
    if (!uses_io) return absl::OkStatus();
    if (absl::Status s = CollectExports(io_dir, name, result); !s.ok()) return Invalid(name, s);
    absl::StatusOr<std::vector<std::pair<std::string, Json>>> records =
        ReadRecords(io_dir + "/output.jsonl", "output_file");
    if (!records.ok()) return Invalid(name, records.status());
    for (auto& [key, value] : *records) outputs.values[key] = std::move(value);
    return absl::OkStatus();
  }

  absl::Status RunScript(const Invocation& inv, const Frame& frame, const SequenceState& sequence,
                         proto::StepResult& result) {
    const std::string io_dir = NextIoDir();
    const expr::Context ctx = MakeContext(frame, &sequence, io_dir);
    // Templates in a script never become shell text: each value goes into the environment, and
    // the script reads it as ${SR_EXPR_n}, so a value full of quotes and semicolons stays data
    // (inside single quotes too: see ShellQuoting).
    std::string script;
    EnvMap values;
    const std::string& text = *inv.script;
    ShellQuoting quoting;
    for (size_t pos = 0;;) {
      size_t open = text.find("${{", pos);
      if (open == std::string::npos) {
        script.append(text, pos);
        break;
      }
      size_t close = expr::FindTemplateEnd(text, open);
      if (close == std::string::npos) return Invalid(inv.name, absl::InvalidArgumentError("an expression in script is not closed"));
      absl::StatusOr<expr::Value> value = expr::Expand(text.substr(open, close + 2 - open), ctx);
      if (!value.ok()) return Invalid(inv.name, absl::InvalidArgumentError(absl::StrCat("script: ", value.status().message())));
      std::string var = absl::StrCat("SR_EXPR_", values.size());
      std::string shown = expr::ToDisplayString(value->json);
      if (value->sensitive) SecretsOf(Json(shown));
      values[var] = std::move(shown);
      quoting.Advance(absl::string_view(text).substr(pos, open - pos));
      absl::StrAppend(&script, text.substr(pos, open - pos), quoting.Reference(var));
      pos = close + 2;
    }
    Frame child = frame;
    absl::StatusOr<EnvMap> env = ExpandEnv(inv.env, ctx, inv.name);
    if (!env.ok()) return Invalid(inv.name, env.status());
    child.env_layers.push_back(*std::move(env));
    ProcessSpec spec;
    spec.name = frame.path.empty() ? inv.name : frame.path;  // the invocation's own path already
    spec.argv = Shell();
    spec.argv.push_back(script);
    spec.work_dir = job_.work_dir;
    for (const auto& [k, v] : CurrentEnv(child)) spec.env.push_back(absl::StrCat(k, "=", v));
    for (const auto& [k, v] : values) spec.env.push_back(absl::StrCat(k, "=", v));
    spec.deadline = frame.deadline;
    spec.wants_network = frame.network;
    const bool uses_io = Mentions(spec, io_dir);
    if (uses_io) {
      if (absl::Status s = MakeIoDir(io_dir); !s.ok()) return Invalid(inv.name, s);
      spec.io_dir = io_dir;
    }
    absl::Cleanup remove_io = [&] {
      if (uses_io) (void)RemoveTree(io_dir);
    };
    std::vector<std::string> shown = Shell();
    shown.push_back(MaskText(script));
    SR_RETURN_IF_ERROR(RunProcess(std::move(spec), inv.name, result, std::move(shown)));
    if (!uses_io) return absl::OkStatus();
    if (absl::Status s = CollectExports(io_dir, inv.name, result); !s.ok()) return Invalid(inv.name, s);
    return absl::OkStatus();
  }

  absl::Status RunReference(const Invocation& inv, const Frame& frame, const SequenceState& sequence,
                            proto::StepResult& result, StepOutputs& outputs) {
    const expr::Context ctx = MakeContext(frame, &sequence, "");
    steps::StepReference ref = *inv.step;
    if (ref.kind == steps::StepReference::Kind::kDynamic) {
      absl::StatusOr<expr::Value> text = expr::Expand(ref.text, ctx);
      if (!text.ok()) return Invalid(inv.name, absl::InvalidArgumentError(absl::StrCat("step: ", text.status().message())));
      absl::StatusOr<steps::StepReference> parsed = steps::ParseShortReference(expr::ToDisplayString(text->json));
      if (!parsed.ok()) return Invalid(inv.name, parsed.status());
      if (parsed->kind == steps::StepReference::Kind::kDynamic) {
        return Invalid(inv.name, absl::InvalidArgumentError("a step reference cannot expand to another expression"));
      }
      ref = *std::move(parsed);
    }
    absl::StatusOr<LoadedStep> loaded = job_.loader->Load(ref, frame.step_dir);
    if (!loaded.ok()) return Invalid(inv.name, loaded.status());
    if (std::find(frame.files.begin(), frame.files.end(), loaded->path) != frame.files.end()) {
      return Invalid(inv.name, absl::InvalidArgumentError(absl::StrCat("step ", ref.text, " refers back to itself (a cycle)")));
    }
    // Inputs: expanded in the caller's context, then checked against the step's spec.
    Json given = Json::object();
    std::set<std::string> derived_sensitive;
    for (const auto& [key, value] : inv.inputs) {
      absl::StatusOr<expr::Value> v = ExpandJson(value, ctx);
      if (!v.ok()) return Invalid(inv.name, absl::InvalidArgumentError(absl::StrCat("inputs.", key, ": ", v.status().message())));
      given[key] = v->json;
      if (v->sensitive) derived_sensitive.insert(key);
    }
    // No step name from BindInputs: Invalid names the step.
    absl::StatusOr<Json> inputs = BindInputs(loaded->file->spec, given, "", derived_sensitive);
    if (!inputs.ok()) return Invalid(inv.name, inputs.status());
    Frame child;
    child.spec = &loaded->file->spec;
    child.step_dir = loaded->dir;
    child.inputs = *std::move(inputs);
    for (const auto& [name, param] : loaded->file->spec.inputs) {
      if (param.sensitive || derived_sensitive.count(name)) child.sensitive_inputs.insert(name);
    }
    for (const std::string& name : child.sensitive_inputs) SecretsOf(child.inputs[name]);
    for (const auto& [name, value] : child.inputs.items()) {
      (*result.mutable_inputs())[name] = ToProtoValue(Masked(value, child.sensitive_inputs.count(name) > 0));
    }
    child.env_layers = frame.env_layers;
    absl::StatusOr<EnvMap> env = ExpandEnv(inv.env, ctx, inv.name);
    if (!env.ok()) return Invalid(inv.name, env.status());
    child.env_layers.push_back(*std::move(env));
    child.deadline = frame.deadline;
    child.network = frame.network;
    child.path = frame.path;
    child.files = frame.files;
    child.files.push_back(loaded->path);
    SR_RETURN_IF_ERROR(RunDefinition(loaded->file->definition, child, result, outputs));
    absl::Status checked = CheckOutputs(*child.spec, child, outputs, absl::StrCat("step \"", inv.name, "\""));
    if (!checked.ok()) return Fail(proto::StatusError::failed, 1, std::string(checked.message()));
    return absl::OkStatus();
  }

  // One item of a sequence, with its if/timeout/retry.
  absl::Status RunInvocation(const Invocation& inv, const Frame& parent, const SequenceState& sequence,
                             proto::StepResult& result, StepOutputs& outputs) {
    const std::string path = parent.path.empty() ? inv.name : absl::StrCat(parent.path, "/", inv.name);
    result.set_name(inv.name);
    result.set_status(proto::StepResult::running);
    *result.mutable_start_time() = Now();
    if (!inv.if_condition.empty()) {
      absl::StatusOr<expr::Value> cond = expr::Expand(inv.if_condition, MakeContext(parent, &sequence, ""));
      if (!cond.ok()) {
        absl::Status failed = Invalid(inv.name, absl::InvalidArgumentError(absl::StrCat("if: ", cond.status().message())));
        Finish(result, failed);
        PublishMasked(result, path, true);
        return failed;
      }
      if (!expr::IsTruthy(cond->json)) {
        result.set_status(kSkipped);
        result.set_message(absl::StrCat("skipped: its if (", inv.if_condition, ") was false"));
        *result.mutable_end_time() = Now();
        PublishMasked(result, path, true);
        return absl::OkStatus();
      }
    }
    PublishMasked(result, path, false);

    Frame frame = parent;
    frame.path = path;
    frame.network = frame.network || inv.network;
    if (inv.timeout) frame.deadline = std::min(parent.deadline, absl::Now() + *inv.timeout);
    absl::Status status;
    for (int attempt = 1; attempt <= inv.retry.max_attempts; ++attempt) {
      result.set_attempts(attempt);
      result.clear_sub_step_results();
      result.clear_exec_result();
      result.clear_exports();
      result.clear_message();
      outputs = StepOutputs();
      if (inv.timeout) frame.deadline = std::min(parent.deadline, absl::Now() + *inv.timeout);
      if (inv.script) {
        status = RunScript(inv, frame, sequence, result);
      } else if (inv.step) {
        status = RunReference(inv, frame, sequence, result, outputs);
      } else {
        Frame inline_frame = frame;
        inline_frame.enclosing = &sequence;  // its steps see the ones before it, as in GitLab
        status = RunDefinition(*inv.inline_definition, inline_frame, result, outputs);
      }
      if (status.ok() || host_.Cancelled() || attempt == inv.retry.max_attempts) break;
      host_.Log(absl::StrCat("step-runner: step \"", path, "\" failed (", status.message(), "); retrying in ",
                             absl::FormatDuration(inv.retry.delay), " (attempt ", attempt + 1, " of ",
                             inv.retry.max_attempts, ")\n"));
      if (host_.SleepUnlessCancelled(inv.retry.delay)) break;
    }
    SetOutputs(result, outputs);
    Finish(result, status);
    PublishMasked(result, path, true);
    return status;
  }

  absl::Status RunSequence(const StepDefinition& def, const Frame& frame, proto::StepResult& result,
                           StepOutputs& outputs) {
    // An inline sequence starts from what its enclosing one has run (its own steps shadow
    // those names); a step file's sequence from nothing.
    SequenceState sequence = frame.enclosing ? *frame.enclosing : SequenceState{};
    absl::Status failed;
    for (const Invocation& inv : def.run) {
      if (host_.Cancelled()) return Fail(proto::StatusError::cancelled, failure_.exit_code, "the job was cancelled");
      proto::StepResult* child = result.add_sub_step_results();
      StepOutputs child_outputs;
      absl::Status status = RunInvocation(inv, frame, sequence, *child, child_outputs);
      sequence.steps[inv.name] = Json{{"outputs", child_outputs.values}};
      for (const std::string& name : child_outputs.sensitive) {
        sequence.sensitive_paths.insert(absl::StrCat("steps.", inv.name, ".outputs.", name));
      }
      if (status.ok() || (inv.continue_on_error && !host_.Cancelled())) {
        // A failure that a retry or continue_on_error absorbed does not describe a later one
        // (an output of the wrong type reported as that earlier step's timeout, exit 124).
        failure_ = FailureInfo{};
      }
      if (status.ok()) continue;
      if (inv.continue_on_error && !host_.Cancelled()) {
        child->set_continued_on_error(true);
        host_.Log(absl::StrCat("step-runner: step \"", inv.name, "\" failed (", status.message(),
                               "); continuing (continue_on_error)\n"));
        continue;
      }
      return status;
    }
    const expr::Context ctx = MakeContext(frame, &sequence, "");
    if (!def.delegate.empty()) {
      const Json& delegated = sequence.steps[def.delegate]["outputs"];
      outputs.values = delegated;
      for (const std::string& path : sequence.sensitive_paths) {
        const std::string prefix = absl::StrCat("steps.", def.delegate, ".outputs.");
        if (absl::StartsWith(path, prefix)) outputs.sensitive.insert(path.substr(prefix.size()));
      }
    }
    for (const auto& [name, value] : def.outputs) {
      absl::StatusOr<expr::Value> v = ExpandJson(value, ctx);
      if (!v.ok()) {
        return Fail(proto::StatusError::failed, 1, absl::StrCat("outputs.", name, ": ", v.status().message()));
      }
      outputs.values[name] = v->json;
      if (v->sensitive) {
        outputs.sensitive.insert(name);
        SecretsOf(v->json);
      }
    }
    return absl::OkStatus();
  }

  absl::Status RunDefinition(const StepDefinition& def, Frame& frame, proto::StepResult& result, StepOutputs& outputs) {
    absl::StatusOr<EnvMap> env = ExpandEnv(def.env, MakeContext(frame, nullptr, ""), frame.path.empty() ? "definition" : frame.path);
    if (!env.ok()) return Invalid(frame.path.empty() ? "exec" : StepName(frame), env.status());
    Frame inner = frame;
    inner.env_layers.push_back(*std::move(env));  // the step's own env wins over its callers'
    if (def.exec) return RunExec(*def.exec, inner, result, outputs);
    return RunSequence(def, inner, result, outputs);
  }

  const JobSpec& job_;
  Host& host_;
  proto::StepResult tree_;
  EnvMap exports_;
  std::vector<std::string> secrets_;
  FailureInfo failure_;
  int io_counter_ = 0;
  bool io_root_made_ = false;
  std::vector<std::string> shell_;  // Shell()'s answer
};

void CheckTree(const StepDefinition& def, const std::string& dir, const std::string& file,
               std::vector<std::string>& files, StepLoader& loader, std::vector<steps::Violation>& out, int depth) {
  // `file`: the step file these invocations are in, when it is not the job's own (empty).
  auto add = [&](const Invocation& inv, std::string field, std::string description) {
    out.push_back({inv.position, std::move(field), std::move(description), file});
  };
  for (const Invocation& inv : def.run) {
    if (inv.inline_definition) CheckTree(*inv.inline_definition, dir, file, files, loader, out, depth);
    if (!inv.step) continue;
    using Kind = steps::StepReference::Kind;
    if (inv.step->kind != Kind::kLocal && inv.step->kind != Kind::kDist) continue;
    const std::string field = absl::StrCat(inv.name, ".step");
    absl::StatusOr<LoadedStep> loaded = loader.Load(*inv.step, dir);
    if (!loaded.ok()) {
      add(inv, field, std::string(loaded.status().message()));
      continue;
    }
    if (std::find(files.begin(), files.end(), loaded->path) != files.end() || depth > 32) {
      add(inv, field,
          absl::StrCat("step ", inv.step->text, " leads back to a step that refers to it (a cycle: ",
                       absl::StrJoin(files, " -> "), " -> ", loaded->path, ")"));
      continue;
    }
    // Literal inputs are checked now; templated ones when they run.
    const steps::Spec& spec = loaded->file->spec;
    for (const auto& [k, v] : inv.inputs) {
      auto it = spec.inputs.find(k);
      if (it == spec.inputs.end()) {
        add(inv, absl::StrCat(inv.name, ".inputs.", k),
            absl::StrCat("step ", inv.step->text, " does not accept an input named \"", k, "\""));
      } else if (!(v.is_string() && absl::StrContains(v.get<std::string>(), "${{")) &&
                 !steps::HasType(v, it->second.type)) {
        add(inv, absl::StrCat(inv.name, ".inputs.", k),
            absl::StrCat("must be ", steps::TypeName(it->second.type), ", found ", steps::DescribeJson(v)));
      }
    }
    for (const auto& [name, param] : spec.inputs) {
      if (!param.default_value && !inv.inputs.count(name)) {
        add(inv, absl::StrCat(inv.name, ".inputs"),
            absl::StrCat("missing required input \"", name, "\" of step ", inv.step->text));
      }
    }
    files.push_back(loaded->path);
    CheckTree(loaded->file->definition, loaded->dir, loaded->path, files, loader, out, depth + 1);
    files.pop_back();
  }
}

}  // namespace

absl::StatusOr<Json> BindInputs(const steps::Spec& spec, const Json& values, absl::string_view step_name,
                                const std::set<std::string>& sensitive_values) {
  Json bound = Json::object();
  std::vector<std::string> problems;
  std::vector<std::string> declared;
  for (const auto& [name, param] : spec.inputs) declared.push_back(name);
  for (const auto& [name, value] : values.items()) {
    auto it = spec.inputs.find(name);
    if (it == spec.inputs.end()) {
      problems.push_back(absl::StrCat("the step does not accept an input named \"", name, "\" (it accepts: ",
                                      declared.empty() ? "none" : absl::StrJoin(declared, ", "), ")"));
      continue;
    }
    if (absl::Status deep = CheckDepth(value, absl::StrCat("input \"", name, "\"")); !deep.ok()) {
      problems.emplace_back(deep.message());
      continue;
    }
    if (value.is_null()) continue;  // as if not given (below)
    if (!steps::HasType(value, it->second.type)) {
      problems.push_back(absl::StrCat("input \"", name, "\" must be ", steps::TypeName(it->second.type), ", found ",
                                      // Quoted, a secret would be cut to 60 bytes: no masker
                                      // finds a secret's first 57 bytes.
                                      it->second.sensitive || sensitive_values.count(name)
                                          ? "a value of another type"
                                          : steps::DescribeJson(value)));
      continue;
    }
    bound[name] = value;
  }
  for (const auto& [name, param] : spec.inputs) {
    // Given: bound, or already reported as the wrong type (not also "missing"). A null (from an
    // expression: a literal one is refused before the job starts) counts as not given.
    const bool given_null = values.contains(name) && values[name].is_null();
    if (values.contains(name) && !given_null) continue;
    if (param.default_value) {
      bound[name] = *param.default_value;
    } else {
      problems.push_back(absl::StrCat("missing required input \"", name, "\" (", steps::TypeName(param.type), ")",
                                      given_null ? ": it was given null" : ""));
    }
  }
  if (!problems.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(step_name.empty() ? "" : absl::StrCat("step \"", step_name, "\": "),
                                                   absl::StrJoin(problems, "; ")));
  }
  return bound;
}

std::vector<steps::Violation> CheckReferences(const steps::StepFile& file, const std::string& file_dir,
                                              const std::string& source, StepLoader& loader) {
  std::vector<steps::Violation> out;
  std::vector<std::string> files = {source};
  CheckTree(file.definition, file_dir, "", files, loader, out, 0);
  return out;
}

JobOutcome RunJob(const JobSpec& job, Host& host) { return JobRun(job, host).Run(); }

std::string ResultToJson(const proto::StepResult& result) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(result, &out, options);
  return out;
}

}  // namespace step_runner::engine

#include "step-runner/steps/step_file.h"

#include <regex>
#include <set>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/rpc/error_details.pb.h"
#include "yaml.h"  // libyaml
#include "yaml-cpp/depthguard.h"
#include "yaml-cpp/yaml.h"

namespace step_runner::steps {
namespace {

// yaml-cpp reports 0-based marks; people count from 1.
SourcePosition PositionOf(const YAML::Mark& mark) { return {mark.line + 1, mark.column + 1}; }

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Scalar: return absl::StrCat("the scalar \"", node.Scalar(), "\"");
    case YAML::NodeType::Sequence: return "a sequence";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Undefined: return "nothing";
  }
  return "an unknown node";
}

bool IsValidName(const std::string& name) {
  static const std::regex kName("^[a-zA-Z_][a-zA-Z0-9_]*$");
  return std::regex_match(name, kName);
}

// Walks the YAML tree, collecting every violation rather than stopping at the first, so that a
// model (or a person) can fix a generated file in one round.
class Parser {
 public:
  explicit Parser(std::vector<Violation>* out) : violations_(out) {}

  void Add(const YAML::Node& at, const std::string& field, std::string description) {
    violations_->push_back({PositionOf(at.Mark()), field, std::move(description)});
  }

  bool ExpectMap(const YAML::Node& node, const std::string& field) {
    if (node.IsMap()) return true;
    Add(node, field, absl::StrCat("expected a map, found ", Describe(node)));
    return false;
  }

  std::optional<std::string> String(const YAML::Node& node, const std::string& field) {
    if (node.IsScalar()) return node.Scalar();
    Add(node, field, absl::StrCat("expected a string, found ", Describe(node)));
    return std::nullopt;
  }

  // Reports keys outside `allowed`; unknown keys are errors, as in GitLab's schema.
  void CheckKeys(const YAML::Node& map, const std::string& field,
                 const std::set<std::string>& allowed) {
    for (const auto& kv : map) {
      const std::string key = kv.first.IsScalar() ? kv.first.Scalar() : "";
      if (!allowed.count(key)) {
        Add(kv.first, field.empty() ? key : absl::StrCat(field, ".", key),
            absl::StrCat("unknown key \"", key, "\"; expected one of: ",
                         absl::StrJoin(allowed, ", ")));
      }
    }
  }

  // Expressions are the step-language issue's work; until then they are refused, not ignored.
  void RejectExpression(const YAML::Node& node, const std::string& field) {
    if (node.IsScalar() && node.Scalar().find("${{") != std::string::npos) {
      Add(node, field, "expressions (${{ ... }}) are not supported by this step-runner yet");
    }
  }

  Env ParseEnv(const YAML::Node& node, const std::string& field) {
    Env env;
    if (!ExpectMap(node, field)) return env;
    for (const auto& kv : node) {
      std::string key = kv.first.IsScalar() ? kv.first.Scalar() : "";
      std::string key_field = absl::StrCat(field, ".", key);
      if (key.empty() || key.find('=') != std::string::npos || key.find('\0') != std::string::npos) {
        Add(kv.first, key_field, "an environment variable name must be non-empty and hold no '='");
        continue;
      }
      if (auto value = String(kv.second, key_field)) {
        RejectExpression(kv.second, key_field);
        env[key] = *value;
      }
    }
    return env;
  }

  void ParseSpec(const YAML::Node& doc) {
    if (doc.IsNull()) return;
    if (!ExpectMap(doc, "spec document")) return;
    CheckKeys(doc, "", {"spec"});
    YAML::Node spec = doc["spec"];
    if (!spec || spec.IsNull()) return;
    if (!ExpectMap(spec, "spec")) return;
    CheckKeys(spec, "spec", {"inputs", "outputs"});
    if (YAML::Node inputs = spec["inputs"]; inputs && !inputs.IsNull() && ExpectMap(inputs, "spec.inputs")) {
      for (const auto& kv : inputs) {
        std::string name = kv.first.Scalar();
        std::string field = absl::StrCat("spec.inputs.", name);
        if (!IsValidName(name)) {
          Add(kv.first, field, "an input name must match ^[a-zA-Z_][a-zA-Z0-9_]*$");
        }
        if (!ExpectMap(kv.second, field)) continue;
        CheckKeys(kv.second, field, {"type", "default", "sensitive", "description"});
        if (!kv.second["default"]) {
          // A job's top-level step file receives no inputs, so a required one can never be met.
          Add(kv.first, field, "input has no default, but a job's step file receives no inputs");
        }
      }
    }
    if (YAML::Node outputs = spec["outputs"]; outputs && !outputs.IsNull()) {
      Add(outputs, "spec.outputs", "outputs of a job's top-level step are not supported yet");
    }
  }

  void ParseExec(const YAML::Node& node, StepDefinition& def) {
    if (!ExpectMap(node, "exec")) return;
    CheckKeys(node, "exec", {"command", "work_dir"});
    ExecDefinition exec;
    YAML::Node command = node["command"];
    if (!command) {
      Add(node, "exec.command", "missing required key \"command\" (a list of argv strings)");
    } else if (!command.IsSequence() || command.size() == 0) {
      Add(command, "exec.command",
          absl::StrCat("expected a non-empty sequence of strings, found ", Describe(command)));
    } else {
      for (size_t i = 0; i < command.size(); ++i) {
        std::string field = absl::StrCat("exec.command[", i, "]");
        if (auto arg = String(command[i], field)) {
          RejectExpression(command[i], field);
          exec.command.push_back(*arg);
        }
      }
    }
    if (YAML::Node work_dir = node["work_dir"]) {
      if (auto dir = String(work_dir, "exec.work_dir")) {
        RejectExpression(work_dir, "exec.work_dir");
        exec.work_dir = *dir;
      }
    }
    def.exec = std::move(exec);
  }

  void ParseRun(const YAML::Node& node, StepDefinition& def) {
    if (!node.IsSequence() || node.size() == 0) {
      Add(node, "run", absl::StrCat("expected a non-empty sequence of steps, found ", Describe(node)));
      return;
    }
    std::set<std::string> names;
    for (size_t i = 0; i < node.size(); ++i) {
      const YAML::Node item = node[i];
      std::string field = absl::StrCat("run[", i, "]");
      if (!ExpectMap(item, field)) continue;
      CheckKeys(item, field, {"name", "script", "step", "func", "inputs", "env"});
      Invocation inv;
      inv.position = PositionOf(item.Mark());
      if (YAML::Node name = item["name"]) {
        if (auto n = String(name, field + ".name")) {
          inv.name = *n;
          if (!IsValidName(inv.name)) {
            Add(name, field + ".name", "a step name must match ^[a-zA-Z_][a-zA-Z0-9_]*$");
          } else if (!names.insert(inv.name).second) {
            Add(name, field + ".name", absl::StrCat("duplicate step name \"", inv.name, "\""));
          }
        }
      } else {
        Add(item, field + ".name", "missing required key \"name\"");
      }
      bool has_script = static_cast<bool>(item["script"]);
      bool has_step = item["step"] || item["func"];
      if (has_script == has_step) {
        Add(item, field, "a step needs exactly one of \"script\" or \"step\"");
      }
      if (has_step) {
        YAML::Node ref = item["step"] ? item["step"] : item["func"];
        Add(ref, field + ".step", "step references are not supported by this step-runner yet; use script");
      }
      if (YAML::Node script = item["script"]) {
        if (auto s = String(script, field + ".script")) {
          RejectExpression(script, field + ".script");
          inv.script = *s;
        }
      }
      if (YAML::Node inputs = item["inputs"]) {
        if (has_script) Add(inputs, field + ".inputs", "a script step takes no inputs");
      }
      if (YAML::Node env = item["env"]) inv.env = ParseEnv(env, field + ".env");
      def.run.push_back(std::move(inv));
    }
  }

  void ParseDefinition(const YAML::Node& doc, StepDefinition& def) {
    if (!ExpectMap(doc, "definition")) return;
    CheckKeys(doc, "", {"exec", "run", "env", "outputs", "delegate"});
    YAML::Node exec = doc["exec"];
    YAML::Node run = doc["run"];
    if (static_cast<bool>(exec) == static_cast<bool>(run)) {
      Add(doc, "definition", "a definition needs exactly one of \"exec\" or \"run\"");
    }
    if (exec) ParseExec(exec, def);
    if (run) ParseRun(run, def);
    if (YAML::Node env = doc["env"]) def.env = ParseEnv(env, "env");
    for (const char* key : {"outputs", "delegate"}) {
      if (YAML::Node n = doc[key]) {
        Add(n, key, "outputs of a job's top-level step are not supported yet");
      }
    }
  }

 private:
  std::vector<Violation>* violations_;
};

// Checks the text with libyaml before yaml-cpp sees it. yaml-cpp 0.7 loops forever, with
// growing memory, on some malformed input (a "," outside any flow collection, found by
// fuzzing); libyaml, the reference parser, rejects such input with an exact position. Its event
// stream also bounds what yaml-cpp will build: nesting depth, aliases and node count.
std::optional<Violation> PrevalidateYaml(absl::string_view text) {
  yaml_parser_t parser;
  if (!yaml_parser_initialize(&parser)) return Violation{{1, 1}, "", "out of memory"};
  yaml_parser_set_input_string(&parser, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);
  std::optional<Violation> violation;
  int depth = 0;
  size_t nodes = 0;
  size_t aliases = 0;
  for (bool done = false; !done && !violation;) {
    yaml_event_t event;
    if (!yaml_parser_parse(&parser, &event)) {
      SourcePosition at{static_cast<int>(parser.problem_mark.line) + 1, static_cast<int>(parser.problem_mark.column) + 1};
      std::string what = "malformed YAML: ";
      if (parser.error == YAML_READER_ERROR) {
        // The reader reports a byte offset, not a mark.
        at = {1, 1};
        for (size_t i = 0; i < parser.problem_offset && i < text.size(); ++i) {
          if (text[i] == '\n') {
            ++at.line;
            at.column = 1;
          } else {
            ++at.column;
          }
        }
        what = "the step file is not valid UTF-8: ";
      }
      violation = Violation{at, "", absl::StrCat(what, parser.problem ? parser.problem : "parse error",
                                                 parser.context ? absl::StrCat(" (", parser.context, ")") : "")};
      break;
    }
    const SourcePosition at{static_cast<int>(event.start_mark.line) + 1, static_cast<int>(event.start_mark.column) + 1};
    switch (event.type) {
      case YAML_SEQUENCE_START_EVENT:
      case YAML_MAPPING_START_EVENT:
        if (++depth > kMaxYamlDepth) {
          violation = Violation{at, "", absl::StrCat("the YAML is nested deeper than ", kMaxYamlDepth, " levels")};
        }
        ++nodes;
        break;
      case YAML_SEQUENCE_END_EVENT:
      case YAML_MAPPING_END_EVENT:
        --depth;
        break;
      case YAML_SCALAR_EVENT:
        ++nodes;
        break;
      case YAML_ALIAS_EVENT:
        if (++aliases > kMaxYamlAliases) {
          violation = Violation{at, "", absl::StrCat("the YAML uses more than ", kMaxYamlAliases,
                                                     " aliases; step files have no need for so many")};
        }
        break;
      case YAML_STREAM_END_EVENT:
        done = true;
        break;
      default:
        break;
    }
    if (!violation && nodes > kMaxYamlNodes) {
      violation = Violation{at, "", absl::StrCat("the YAML has more than ", kMaxYamlNodes, " nodes")};
    }
    yaml_event_delete(&event);
  }
  yaml_parser_delete(&parser);
  return violation;
}

}  // namespace

absl::StatusOr<StepFile> ParseStepFile(absl::string_view text, absl::string_view source_name,
                                       std::vector<Violation>* violations_out) {
  std::vector<Violation> violations;
  StepFile file;
  if (text.size() > kMaxStepFileBytes) {
    violations.push_back({{1, 1}, "", absl::StrCat("the step file is ", text.size(),
                                                   " bytes; the limit is ", kMaxStepFileBytes)});
  } else if (std::optional<Violation> invalid = PrevalidateYaml(text)) {
    violations.push_back(*std::move(invalid));
  } else {
    try {
      std::vector<YAML::Node> docs = YAML::LoadAll(std::string(text));
      if (docs.size() != 2) {
        violations.push_back(
            {{1, 1}, "", absl::StrCat("expected two YAML documents (a spec, then ---, then a "
                                      "definition), found ", docs.size())});
      } else {
        Parser parser(&violations);
        parser.ParseSpec(docs[0]);
        parser.ParseDefinition(docs[1], file.definition);
      }
    } catch (const YAML::DeepRecursion& e) {
      violations.push_back({PositionOf(e.mark), "",
                            absl::StrCat("the YAML is nested deeper than ", e.depth(), " levels")});
    } catch (const YAML::Exception& e) {
      violations.push_back({PositionOf(e.mark), "", absl::StrCat("malformed YAML: ", e.msg)});
    }
  }
  if (violations.empty()) return file;
  absl::Status status = InvalidArgument(violations, source_name);
  if (violations_out) *violations_out = std::move(violations);
  return status;
}

absl::Status InvalidArgument(const std::vector<Violation>& violations, absl::string_view source_name) {
  std::vector<std::string> lines;
  google::rpc::BadRequest details;
  for (const Violation& v : violations) {
    std::string where = v.position.line > 0
                            ? absl::StrCat(source_name, ":", v.position.line, ":", v.position.column, ": ")
                            : "";
    lines.push_back(absl::StrCat(where, v.field.empty() ? "" : v.field + ": ", v.description));
    google::rpc::BadRequest::FieldViolation* fv = details.add_field_violations();
    fv->set_field(v.field.empty() ? std::string(source_name) : absl::StrCat(source_name, ".", v.field));
    fv->set_description(absl::StrCat(where, v.description));
  }
  absl::Status status = absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
  status.SetPayload(kBadRequestTypeUrl, absl::Cord(details.SerializeAsString()));
  return status;
}

}  // namespace step_runner::steps

#include "step-runner/steps/step_file.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "step-runner/expr/expression.h"
#include "google/rpc/error_details.pb.h"
#include "yaml.h"  // libyaml
#include "yaml-cpp/depthguard.h"
#include "yaml-cpp/eventhandler.h"
#include "yaml-cpp/parser.h"
#include "yaml-cpp/yaml.h"

namespace step_runner::steps {
namespace {

// yaml-cpp reports 0-based marks; people count from 1.
SourcePosition PositionOf(const YAML::Mark& mark) { return {mark.line + 1, mark.column + 1}; }

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Scalar: return absl::StrCat("the scalar \"", node.Scalar(), "\"");
    case YAML::NodeType::Sequence: return node.size() == 0 ? "an empty sequence" : "a sequence";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Undefined: return "nothing";
  }
  return "an unknown node";
}

bool IsValidName(const std::string& name) {
  static const std::regex kName("^[a-zA-Z_][a-zA-Z0-9_]*$");
  return std::regex_match(name, kName);
}

const std::set<std::string>& KnownContexts() {
  static const std::set<std::string> kContexts = {"inputs",      "steps",    "env",      "job",
                                                  "vars",        "output_file", "export_file",
                                                  "step_dir",    "func_dir", "work_dir"};
  return kContexts;
}

// A YAML node as JSON: plain scalars take their YAML type (true, 3.5, null), quoted ones stay
// strings, as a YAML reader in GitLab's Go code would have it.
Json ToJson(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Scalar: {
      const std::string& text = node.Scalar();
      if (node.Tag() != "?") return text;  // quoted or explicitly tagged
      if (text == "true" || text == "True" || text == "TRUE") return true;
      if (text == "false" || text == "False" || text == "FALSE") return false;
      if (text == "null" || text == "~" || text.empty()) return nullptr;
      int64_t i;
      if (absl::SimpleAtoi(text, &i)) return i;
      double d;
      if (!text.empty() && (std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '-' ||
                            text[0] == '.') && absl::SimpleAtod(text, &d)) {
        return d;
      }
      return text;
    }
    case YAML::NodeType::Sequence: {
      Json out = Json::array();
      for (const auto& item : node) out.push_back(ToJson(item));
      return out;
    }
    case YAML::NodeType::Map: {
      Json out = Json::object();
      for (const auto& kv : node) out[kv.first.Scalar()] = ToJson(kv.second);
      return out;
    }
  }
  return nullptr;
}

// What templates in one place of the file may read.
struct Scope {
  const Spec* spec = nullptr;
  const std::set<std::string>* steps = nullptr;  // steps whose outputs are visible; null: none
};

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

  // Checks the syntax of every template in a string, and that what it reads exists: a known
  // context, a declared input, a step that runs earlier.
  void CheckTemplate(const YAML::Node& node, const std::string& field, const std::string& text,
                     const Scope& scope) {
    if (text.find("${{") == std::string::npos) return;
    absl::StatusOr<std::vector<expr::ContextPath>> paths = expr::CheckTemplates(text);
    if (!paths.ok()) {
      Add(node, field, std::string(paths.status().message()));
      return;
    }
    for (const expr::ContextPath& path : *paths) {
      const std::string& root = path.parts[0];
      if (!KnownContexts().count(root)) {
        Add(node, field, absl::StrCat("unknown context \"", root, "\" in an expression; available: ",
                                      absl::StrJoin(KnownContexts(), ", ")));
      } else if (root == "inputs" && path.parts.size() > 1 && scope.spec &&
                 !scope.spec->inputs.count(path.parts[1])) {
        std::vector<std::string> declared;
        for (const auto& [name, param] : scope.spec->inputs) declared.push_back(name);
        Add(node, field, absl::StrCat("the expression reads inputs.", path.parts[1],
                                      ", which the spec does not declare; declared inputs: ",
                                      declared.empty() ? "none" : absl::StrJoin(declared, ", ")));
      } else if (root == "steps" && !scope.steps) {
        Add(node, field, "steps.<name> is only available inside a run: sequence");
      } else if (root == "steps" && path.parts.size() > 1 && !scope.steps->count(path.parts[1])) {
        Add(node, field, absl::StrCat("the expression reads steps.", path.parts[1],
                                      ", but no step of that name runs before this point",
                                      scope.steps->empty() ? "" : absl::StrCat(" (earlier steps: ",
                                          absl::StrJoin(*scope.steps, ", "), ")")));
      }
    }
  }

  void CheckJsonTemplates(const YAML::Node& node, const std::string& field, const Json& value,
                          const Scope& scope) {
    if (value.is_string()) {
      CheckTemplate(node, field, value.get<std::string>(), scope);
    } else if (value.is_array() || value.is_object()) {
      for (const auto& item : value) CheckJsonTemplates(node, field, item, scope);
    }
  }

  Env ParseEnv(const YAML::Node& node, const std::string& field, const Scope& scope) {
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
        CheckTemplate(kv.second, key_field, *value, scope);
        env[key] = *value;
      }
    }
    return env;
  }

  std::optional<ValueType> ParseType(const YAML::Node& node, const std::string& field) {
    static const std::map<std::string, ValueType> kTypes = {{"string", ValueType::kString},
                                                            {"number", ValueType::kNumber},
                                                            {"boolean", ValueType::kBoolean},
                                                            {"struct", ValueType::kStruct},
                                                            {"array", ValueType::kArray}};
    auto text = String(node, field);
    if (!text) return std::nullopt;
    auto it = kTypes.find(*text);
    if (it == kTypes.end()) {
      Add(node, field, absl::StrCat("unknown type \"", *text, "\"; expected one of: array, boolean, number, string, struct"));
      return std::nullopt;
    }
    return it->second;
  }

  void ParseParams(const YAML::Node& node, const std::string& field, std::map<std::string, Param>& out) {
    if (!ExpectMap(node, field)) return;
    for (const auto& kv : node) {
      std::string name = kv.first.IsScalar() ? kv.first.Scalar() : "";
      std::string param_field = absl::StrCat(field, ".", name);
      if (!IsValidName(name)) Add(kv.first, param_field, "a name must match ^[a-zA-Z_][a-zA-Z0-9_]*$");
      if (!ExpectMap(kv.second, param_field)) continue;
      CheckKeys(kv.second, param_field, {"type", "default", "sensitive", "description"});
      Param param;
      param.position = PositionOf(kv.first.Mark());
      if (YAML::Node type = kv.second["type"]) {
        if (auto t = ParseType(type, param_field + ".type")) param.type = *t;
      } else {
        Add(kv.second, param_field + ".type", "missing required key \"type\" (string, number, boolean, struct or array)");
      }
      if (YAML::Node def = kv.second["default"]) {
        Json value = ToJson(def);
        if (!HasType(value, param.type)) {
          Add(def, param_field + ".default", absl::StrCat("expected ", TypeName(param.type), ", found ", DescribeJson(value)));
        }
        if (value.is_string() && value.get<std::string>().find("${{") != std::string::npos) {
          Add(def, param_field + ".default", "a default cannot use expressions");
        }
        param.default_value = std::move(value);
      }
      if (YAML::Node sensitive = kv.second["sensitive"]) {
        Json value = ToJson(sensitive);
        if (!value.is_boolean()) {
          Add(sensitive, param_field + ".sensitive", absl::StrCat("expected true or false, found ", DescribeJson(value)));
        } else {
          param.sensitive = value.get<bool>();
        }
      }
      out[name] = std::move(param);
    }
  }

  void ParseSpec(const YAML::Node& doc, Spec& spec) {
    if (doc.IsNull()) return;
    if (!ExpectMap(doc, "spec document")) return;
    CheckKeys(doc, "", {"spec"});
    YAML::Node node = doc["spec"];
    if (!node || node.IsNull()) return;
    if (!ExpectMap(node, "spec")) return;
    CheckKeys(node, "spec", {"inputs", "outputs"});
    if (YAML::Node inputs = node["inputs"]; inputs && !inputs.IsNull()) {
      ParseParams(inputs, "spec.inputs", spec.inputs);
    }
    if (YAML::Node outputs = node["outputs"]; outputs && !outputs.IsNull()) {
      if (outputs.IsScalar() && outputs.Scalar() == "delegate") {
        spec.delegate_outputs = true;
      } else if (outputs.IsScalar()) {
        Add(outputs, "spec.outputs", absl::StrCat("expected a map of outputs or \"delegate\", found ", Describe(outputs)));
      } else {
        ParseParams(outputs, "spec.outputs", spec.outputs);
      }
    }
  }

  std::optional<bool> Bool(const YAML::Node& node, const std::string& field) {
    Json value = ToJson(node);
    if (value.is_boolean()) return value.get<bool>();
    Add(node, field, absl::StrCat("expected true or false, found ", DescribeJson(value)));
    return std::nullopt;
  }

  void ParseExec(const YAML::Node& node, const std::string& field, ExecDefinition& exec, const Scope& scope) {
    if (!ExpectMap(node, field)) return;
    CheckKeys(node, field, {"command", "work_dir", "network"});
    YAML::Node command = node["command"];
    if (!command) {
      Add(node, field + ".command", "missing required key \"command\" (a list of argv strings)");
    } else if (!command.IsSequence() || command.size() == 0) {
      Add(command, field + ".command",
          absl::StrCat("expected a non-empty sequence of strings, found ", Describe(command)));
    } else {
      for (size_t i = 0; i < command.size(); ++i) {
        std::string arg_field = absl::StrCat(field, ".command[", i, "]");
        if (auto arg = String(command[i], arg_field)) {
          CheckTemplate(command[i], arg_field, *arg, scope);
          exec.command.push_back(*arg);
        }
      }
    }
    if (YAML::Node work_dir = node["work_dir"]) {
      if (auto dir = String(work_dir, field + ".work_dir")) {
        CheckTemplate(work_dir, field + ".work_dir", *dir, scope);
        exec.work_dir = *dir;
      }
    }
    if (YAML::Node network = node["network"]) exec.network = Bool(network, field + ".network").value_or(false);
  }

  std::optional<StepReference> ParseReference(const YAML::Node& node, const std::string& field,
                                              const Scope& scope) {
    if (node.IsScalar()) {
      CheckTemplate(node, field, node.Scalar(), scope);
      absl::StatusOr<StepReference> ref = ParseShortReference(node.Scalar());
      if (!ref.ok()) {
        Add(node, field, std::string(ref.status().message()));
        return std::nullopt;
      }
      return *ref;
    }
    if (!ExpectMap(node, field)) return std::nullopt;
    CheckKeys(node, field, {"git"});
    YAML::Node git = node["git"];
    if (!git) {
      Add(node, field, "expected a string reference or {git: {url, rev, dir, file}}");
      return std::nullopt;
    }
    if (!ExpectMap(git, field + ".git")) return std::nullopt;
    CheckKeys(git, field + ".git", {"url", "rev", "dir", "file"});
    StepReference ref;
    ref.kind = StepReference::Kind::kGit;
    for (const char* key : {"url", "rev"}) {
      if (!git[key]) Add(git, absl::StrCat(field, ".git.", key), absl::StrCat("missing required key \"", key, "\""));
    }
    if (git["url"]) ref.git_url = String(git["url"], field + ".git.url").value_or("");
    if (git["rev"]) ref.git_rev = String(git["rev"], field + ".git.rev").value_or("");
    if (git["dir"]) ref.git_dir = String(git["dir"], field + ".git.dir").value_or("");
    if (git["file"]) ref.git_file = String(git["file"], field + ".git.file").value_or("step.yml");
    ref.text = absl::StrCat(ref.git_url, "@", ref.git_rev, ref.git_dir.empty() ? "" : " dir " + ref.git_dir);
    return ref;
  }

  void ParseInvocation(const YAML::Node& item, const std::string& field, const Spec& spec,
                       std::set<std::string>& earlier, Invocation& inv) {
    CheckKeys(item, field, {"name", "script", "step", "func", "inputs", "env", "exec", "run", "outputs",
                            "delegate", "if", "timeout", "retry", "continue_on_error", "network"});
    const Scope scope{&spec, &earlier};
    inv.position = PositionOf(item.Mark());
    if (YAML::Node name = item["name"]) {
      if (auto n = String(name, field + ".name")) {
        inv.name = *n;
        if (!IsValidName(inv.name)) {
          Add(name, field + ".name", "a step name must match ^[a-zA-Z_][a-zA-Z0-9_]*$");
        } else if (earlier.count(inv.name)) {
          Add(name, field + ".name", absl::StrCat("duplicate step name \"", inv.name, "\""));
        }
      }
    } else {
      Add(item, field + ".name", "missing required key \"name\"");
    }
    const bool has_script = static_cast<bool>(item["script"]);
    const bool has_step = item["step"] || item["func"];
    const bool has_inline = item["exec"] || item["run"];
    if (int(has_script) + int(has_step) + int(has_inline) != 1) {
      Add(item, field, "a step needs exactly one of \"script\", \"step\" (or \"func\"), \"exec\" or \"run\"");
    }
    if (item["step"] && item["func"]) Add(item, field, "\"step\" and \"func\" are the same key; give one");
    if (has_step) {
      YAML::Node ref = item["step"] ? item["step"] : item["func"];
      inv.step = ParseReference(ref, field + ".step", scope);
    }
    if (YAML::Node script = item["script"]) {
      if (auto text = String(script, field + ".script")) {
        CheckTemplate(script, field + ".script", *text, scope);
        inv.script = *text;
      }
    }
    if (has_inline && !has_step && !has_script) {
      auto def = std::make_shared<StepDefinition>();
      ParseDefinitionBody(item, field, spec, *def, &earlier);
      inv.inline_definition = std::move(def);
    } else {
      for (const char* key : {"outputs", "delegate"}) {
        if (item[key]) Add(item[key], absl::StrCat(field, ".", key), "only an inline run: step has outputs or delegate");
      }
    }
    if (YAML::Node inputs = item["inputs"]) {
      if (!has_step) {
        Add(inputs, field + ".inputs", "only a step reference (step: or func:) takes inputs");
      } else if (ExpectMap(inputs, field + ".inputs")) {
        for (const auto& kv : inputs) {
          std::string name = kv.first.IsScalar() ? kv.first.Scalar() : "";
          Json value = ToJson(kv.second);
          CheckJsonTemplates(kv.second, absl::StrCat(field, ".inputs.", name), value, scope);
          inv.inputs[name] = std::move(value);
        }
      }
    }
    if (YAML::Node env = item["env"]; env && !has_inline) inv.env = ParseEnv(env, field + ".env", scope);
    if (YAML::Node cond = item["if"]) {
      if (auto text = String(cond, field + ".if")) {
        // `if: inputs.x` and `if: ${{ inputs.x }}` mean the same.
        inv.if_condition = text->find("${{") == std::string::npos ? absl::StrCat("${{ ", *text, " }}") : *text;
        CheckTemplate(cond, field + ".if", inv.if_condition, scope);
      }
    }
    if (YAML::Node timeout = item["timeout"]) {
      absl::Duration d;
      auto text = String(timeout, field + ".timeout");
      if (text && (!absl::ParseDuration(*text, &d) || d <= absl::ZeroDuration())) {
        Add(timeout, field + ".timeout", absl::StrCat("expected a positive duration such as 90s or 5m, found \"", *text, "\""));
      } else if (text) {
        inv.timeout = d;
      }
    }
    if (YAML::Node retry = item["retry"]; retry && ExpectMap(retry, field + ".retry")) {
      CheckKeys(retry, field + ".retry", {"max", "delay"});
      if (YAML::Node max = retry["max"]) {
        Json value = ToJson(max);
        if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > 100) {
          Add(max, field + ".retry.max", absl::StrCat("expected a whole number from 0 to 100, found ", DescribeJson(value)));
        } else {
          inv.retry.max_attempts = 1 + value.get<int>();
        }
      }
      if (YAML::Node delay = retry["delay"]) {
        absl::Duration d;
        auto text = String(delay, field + ".retry.delay");
        if (text && (!absl::ParseDuration(*text, &d) || d < absl::ZeroDuration() || d > absl::Hours(1))) {
          Add(delay, field + ".retry.delay", absl::StrCat("expected a duration up to 1h such as 2s, found \"", *text, "\""));
        } else if (text) {
          inv.retry.delay = d;
        }
      }
    }
    if (YAML::Node coe = item["continue_on_error"]) {
      inv.continue_on_error = Bool(coe, field + ".continue_on_error").value_or(false);
    }
    if (YAML::Node network = item["network"]) inv.network = Bool(network, field + ".network").value_or(false);
  }

  void ParseRun(const YAML::Node& node, const std::string& field, const Spec& spec, StepDefinition& def,
                const std::set<std::string>* outer_steps) {
    if (!node.IsSequence() || node.size() == 0) {
      Add(node, field, absl::StrCat("expected a non-empty sequence of steps, found ", Describe(node)));
      return;
    }
    // A nested sequence sees the steps before it in the enclosing one, as GitLab's does.
    std::set<std::string> earlier = outer_steps ? *outer_steps : std::set<std::string>{};
    for (size_t i = 0; i < node.size(); ++i) {
      const YAML::Node item = node[i];
      std::string item_field = absl::StrCat(field, "[", i, "]");
      if (!ExpectMap(item, item_field)) continue;
      Invocation inv;
      ParseInvocation(item, item_field, spec, earlier, inv);
      if (!inv.name.empty()) earlier.insert(inv.name);
      def.run.push_back(std::move(inv));
    }
  }

  // The body shared by a file's definition and an inline step: exec or run, env, outputs.
  void ParseDefinitionBody(const YAML::Node& doc, const std::string& prefix, const Spec& spec,
                           StepDefinition& def, const std::set<std::string>* outer_steps) {
    auto at = [&](const char* key) { return prefix.empty() ? std::string(key) : absl::StrCat(prefix, ".", key); };
    YAML::Node exec = doc["exec"];
    YAML::Node run = doc["run"];
    if (static_cast<bool>(exec) == static_cast<bool>(run)) {
      Add(doc, prefix.empty() ? "definition" : prefix, "a definition needs exactly one of \"exec\" or \"run\"");
    }
    const Scope outer_scope{&spec, outer_steps};
    if (exec) {
      def.exec.emplace();
      ParseExec(exec, at("exec"), *def.exec, outer_scope);
    }
    if (run) ParseRun(run, at("run"), spec, def, outer_steps);
    if (YAML::Node env = doc["env"]) def.env = ParseEnv(env, at("env"), outer_scope);
    std::set<std::string> all_steps = outer_steps ? *outer_steps : std::set<std::string>{};
    for (const Invocation& inv : def.run) all_steps.insert(inv.name);
    const Scope after_scope{&spec, &all_steps};
    if (YAML::Node outputs = doc["outputs"]) {
      if (!run) {
        Add(outputs, at("outputs"), "only a run: sequence maps outputs; an exec step writes them to ${{ output_file }}");
      } else if (ExpectMap(outputs, at("outputs"))) {
        for (const auto& kv : outputs) {
          std::string name = kv.first.IsScalar() ? kv.first.Scalar() : "";
          Json value = ToJson(kv.second);
          CheckJsonTemplates(kv.second, absl::StrCat(at("outputs"), ".", name), value, after_scope);
          def.outputs[name] = std::move(value);
        }
      }
    }
    if (YAML::Node delegate = doc["delegate"]) {
      if (auto name = String(delegate, at("delegate"))) {
        if (!run) {
          Add(delegate, at("delegate"), "only a run: sequence can delegate its outputs");
        } else if (!all_steps.count(*name)) {
          Add(delegate, at("delegate"), absl::StrCat("no step named \"", *name, "\" in this sequence"));
        }
        def.delegate = *name;
      }
      if (doc["outputs"]) Add(delegate, at("delegate"), "give either outputs or delegate, not both");
    }
  }

  void ParseDefinition(const YAML::Node& doc, const Spec& spec, StepDefinition& def) {
    if (!ExpectMap(doc, "definition")) return;
    CheckKeys(doc, "", {"exec", "run", "env", "outputs", "delegate"});
    ParseDefinitionBody(doc, "", spec, def, nullptr);
    if (spec.delegate_outputs && def.exec) {
      Add(doc, "spec.outputs", "outputs: delegate on an exec step is not supported; declare the outputs");
    }
    if (spec.delegate_outputs && def.run.size() > 0 && def.delegate.empty()) {
      Add(doc, "delegate", "spec.outputs is \"delegate\", so the sequence must name the step with delegate: <step name>");
    }
  }

 private:
  std::vector<Violation>* violations_;
};

// An anchor or alias name ends where libyaml and yaml-cpp agree (see CheckYamlSyntax).
std::optional<Violation> CheckNameEnd(absl::string_view text, size_t from, char sigil, const unsigned char* name,
                                      SourcePosition at) {
  if (name == nullptr) return std::nullopt;
  const std::string written = absl::StrCat(std::string(1, sigil), reinterpret_cast<const char*>(name));
  const size_t found = text.find(written, from);
  const size_t end = found == absl::string_view::npos ? found : found + written.size();
  if (end == absl::string_view::npos || end >= text.size() || absl::string_view(" \t\r\n,[]{}").find(text[end]) !=
                                                                    absl::string_view::npos) {
    return std::nullopt;
  }
  return Violation{at, "", absl::StrCat("the ", sigil == '&' ? "anchor" : "alias", " \"", written,
                                        "\" must end with a space or a line break (names are letters, digits, _ and -)")};
}

// Checks the text with libyaml before yaml-cpp sees it. yaml-cpp 0.7 loops forever, with
// growing memory, on some malformed input (a "," outside any flow collection, found by
// fuzzing); libyaml, the reference parser, rejects such input with an exact position.
// libyaml ends an anchor or alias name at the first character that is not a letter, digit, "_"
// or "-"; yaml-cpp 0.7 runs on to the next space or flow indicator. Where the two disagree
// ("&name:x,-", found by fuzzing) yaml-cpp reads another document than the one checked here,
// so the name must end where both agree. Counts libyaml's events into `events`.
std::optional<Violation> CheckYamlSyntax(absl::string_view text, size_t* events) {
  yaml_parser_t parser;
  if (!yaml_parser_initialize(&parser)) return Violation{{1, 1}, "", "out of memory"};
  yaml_parser_set_input_string(&parser, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);
  std::optional<Violation> violation;
  *events = 0;
  // Also bounds libyaml's own work: it walks 10,000 open brackets slowly (and yaml-cpp's reading
  // of the depth is checked again in CheckYamlShape).
  int depth = 0;
  // Each open collection; for a mapping, whether a key comes next and the keys seen (with the
  // line of each). A key given twice is refused, as GitLab's YAML reader (yaml.v3) does: which
  // of the two counted differed from place to place ("script: a" then "script: b" ran a).
  struct Open {
    bool mapping = false;
    bool key_next = true;
    std::map<std::string, int> keys;
  };
  std::vector<Open> open;
  auto node_event = [&](const yaml_event_t& event, const SourcePosition& at) -> std::optional<Violation> {
    if (open.empty() || !open.back().mapping) return std::nullopt;
    Open& map = open.back();
    const bool is_key = std::exchange(map.key_next, !map.key_next);
    if (!is_key || event.type != YAML_SCALAR_EVENT) return std::nullopt;
    std::string key(reinterpret_cast<const char*>(event.data.scalar.value), event.data.scalar.length);
    auto [it, inserted] = map.keys.emplace(key, at.line);
    if (inserted) return std::nullopt;
    return Violation{at, "", absl::StrCat("the key \"", key, "\" is given twice (first on line ", it->second,
                                          "); each key of a mapping must be unique")};
  };
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
    ++*events;
    const SourcePosition at{static_cast<int>(event.start_mark.line) + 1, static_cast<int>(event.start_mark.column) + 1};
    const size_t from = event.start_mark.index;
    switch (event.type) {
      case YAML_SCALAR_EVENT:
        violation = CheckNameEnd(text, from, '&', event.data.scalar.anchor, at);
        if (!violation) violation = node_event(event, at);
        break;
      case YAML_SEQUENCE_START_EVENT:
      case YAML_MAPPING_START_EVENT:
        violation = CheckNameEnd(text, from, '&', event.type == YAML_SEQUENCE_START_EVENT ? event.data.sequence_start.anchor
                                                                                       : event.data.mapping_start.anchor, at);
        if (!violation && ++depth > kMaxYamlDepth) {
          violation = Violation{at, "", absl::StrCat("the YAML is nested deeper than ", kMaxYamlDepth, " levels")};
        }
        if (!violation) violation = node_event(event, at);
        open.push_back(Open{.mapping = event.type == YAML_MAPPING_START_EVENT});
        break;
      case YAML_SEQUENCE_END_EVENT:
      case YAML_MAPPING_END_EVENT:
        --depth;
        if (!open.empty()) open.pop_back();
        break;
      case YAML_ALIAS_EVENT:
        violation = CheckNameEnd(text, from, '*', event.data.alias.anchor, at);
        if (!violation) violation = node_event(event, at);
        break;
      case YAML_STREAM_END_EVENT:
        done = true;
        break;
      default:
        break;
    }
    yaml_event_delete(&event);
  }
  yaml_parser_delete(&parser);
  return violation;
}

// Walks yaml-cpp's own events for the text, before any tree is built, and bounds what the tree
// would be. These checks sit on yaml-cpp's reading, not libyaml's: where the two tokenizers
// still disagree on some input, it is yaml-cpp's reading that gets built.
//  - Its events are at most twice libyaml's (plus a margin): yaml-cpp 0.7 has inputs on which
//    its scanner emits events forever ("!\t:x\n,y", found by fuzzing; libyaml reads a tag and
//    a scalar), which would otherwise be an endless loop with growing memory.
//  - Depth, and the number of aliases.
//  - Values, counting each alias as a copy of the node it names: yaml-cpp shares an aliased node,
//    but the step's values are converted to JSON, which copies it, so a few lines of nested
//    aliases ("billion laughs", found by fuzzing) would expand to 2^40 values.
//  - An alias inside the node it names, which yaml-cpp builds as a cycle (and walking it would
//    never end).
class YamlShapeCheck : public YAML::EventHandler {
 public:
  YamlShapeCheck(absl::string_view text, size_t event_budget) : text_(text), event_budget_(event_budget) {}

  // Throws Refused to stop the parse at the first violation.
  struct Refused {
    Violation violation;
  };

  void OnDocumentStart(const YAML::Mark& mark) override {
    Count(mark);
    anchored_values_.clear();
  }
  void OnDocumentEnd() override { Count(last_mark_); }
  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override { Leaf(mark, anchor); }
  void OnScalar(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor, const std::string&) override {
    Leaf(mark, anchor);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    Count(mark);
    for (const OpenCollection& open : open_collections_) {
      if (open.anchor == anchor) Refuse(mark, absl::StrCat("the alias ", WrittenAt(mark), " is inside the node it names"));
    }
    if (++aliases_ > kMaxYamlAliases) {
      Refuse(mark, absl::StrCat("the YAML uses more than ", kMaxYamlAliases, " aliases; step files have no need for so many"));
    }
    // An alias to an undefined anchor counts as one value; yaml-cpp refuses it when it builds.
    const auto anchored = anchored_values_.find(anchor);
    AddValues(mark, anchored == anchored_values_.end() ? 1 : anchored->second);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value) override {
    Open(mark, anchor);
  }
  void OnSequenceEnd() override { Close(); }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor, YAML::EmitterStyle::value) override {
    Open(mark, anchor);
  }
  void OnMapEnd() override { Close(); }

 private:
  struct OpenCollection {
    YAML::anchor_t anchor;
    size_t values_before;
  };

  // The alias as written ("*name"): yaml-cpp's events number anchors instead of naming them.
  std::string WrittenAt(const YAML::Mark& mark) const {
    if (mark.pos < 0 || static_cast<size_t>(mark.pos) >= text_.size()) return "here";
    absl::string_view rest = text_.substr(static_cast<size_t>(mark.pos));
    return std::string(rest.substr(0, std::min(rest.find_first_of(" \t\r\n,[]{}"), size_t{64})));
  }
  [[noreturn]] static void Refuse(const YAML::Mark& mark, std::string what) {
    throw Refused{Violation{PositionOf(mark), "", std::move(what)}};
  }
  void Count(const YAML::Mark& mark) {
    if (!mark.is_null()) last_mark_ = mark;
    if (++events_ > event_budget_) {
      Refuse(last_mark_, "malformed YAML: the parser reads more values here than the text holds "
                         "(is there a \",\" outside brackets?)");
    }
  }
  void AddValues(const YAML::Mark& mark, size_t count) {
    values_ += count;
    if (values_ > kMaxYamlNodes) {
      Refuse(mark, aliases_ == 0 ? absl::StrCat("the YAML has more than ", kMaxYamlNodes, " values")
                                 : absl::StrCat("the YAML expands to more than ", kMaxYamlNodes,
                                                " values through its aliases (each alias counts as a copy of its node)"));
    }
  }
  void Leaf(const YAML::Mark& mark, YAML::anchor_t anchor) {
    Count(mark);
    if (anchor != YAML::NullAnchor) anchored_values_[anchor] = 1;
    AddValues(mark, 1);
  }
  void Open(const YAML::Mark& mark, YAML::anchor_t anchor) {
    Count(mark);
    open_collections_.push_back({anchor, values_});
    if (static_cast<int>(open_collections_.size()) > kMaxYamlDepth) {
      Refuse(mark, absl::StrCat("the YAML is nested deeper than ", kMaxYamlDepth, " levels"));
    }
    AddValues(mark, 1);
  }
  void Close() {
    Count(last_mark_);
    if (open_collections_.empty()) return;
    const OpenCollection& ended = open_collections_.back();
    if (ended.anchor != YAML::NullAnchor) anchored_values_[ended.anchor] = values_ - ended.values_before;
    open_collections_.pop_back();
  }

  const absl::string_view text_;
  const size_t event_budget_;
  size_t events_ = 0;
  size_t aliases_ = 0;
  size_t values_ = 0;
  YAML::Mark last_mark_ = YAML::Mark::null_mark();
  std::vector<OpenCollection> open_collections_;
  // Each anchor's value count, for the aliases that name it.
  absl::flat_hash_map<YAML::anchor_t, size_t> anchored_values_;
};

std::optional<Violation> CheckYamlShape(absl::string_view text, size_t libyaml_events) {
  std::istringstream in{std::string(text)};
  YAML::Parser parser(in);
  YamlShapeCheck check(text, 2 * libyaml_events + 64);
  try {
    while (parser.HandleNextDocument(check)) {
    }
  } catch (const YamlShapeCheck::Refused& refused) {
    return refused.violation;
  } catch (const YAML::Exception& e) {
    return Violation{PositionOf(e.mark), "", absl::StrCat("malformed YAML: ", e.msg)};
  }
  return std::nullopt;
}

}  // namespace

// YAML merge keys, as GitLab's reader (yaml.v3) applies them: `<<: *defaults` (or a list of
// such maps) adds each key the mapping does not set itself; of a list, the earlier map wins.
// yaml-cpp leaves "<<" as an ordinary key, which then read as an unknown key or a bad value.
void ResolveMergeKeys(YAML::Node node, std::vector<Violation>& out) {
  if (node.IsSequence()) {
    for (YAML::Node item : node) ResolveMergeKeys(item, out);
    return;
  }
  if (!node.IsMap()) return;
  std::vector<YAML::Node> values;
  for (const auto& entry : node) values.push_back(entry.second);
  for (YAML::Node& value : values) ResolveMergeKeys(value, out);
  const YAML::Node& view = node;  // const: looking a key up must not add it
  const YAML::Node merge = view["<<"];
  if (!merge) return;
  std::vector<YAML::Node> sources;
  if (merge.IsMap()) {
    sources.push_back(merge);
  } else if (merge.IsSequence()) {
    for (const YAML::Node& item : merge) sources.push_back(item);
  }
  if (sources.empty() || !std::all_of(sources.begin(), sources.end(), [](const YAML::Node& m) { return m.IsMap(); })) {
    out.push_back({PositionOf(merge.Mark()), "<<", "a merge key takes a map or a list of maps (<<: *name)"});
    return;
  }
  node.remove("<<");
  for (const YAML::Node& source : sources) {
    for (const auto& entry : source) {
      if (!view[entry.first.Scalar()]) node[entry.first] = entry.second;
    }
  }
}

absl::StatusOr<StepFile> ParseStepFile(absl::string_view text, absl::string_view source_name,
                                       std::vector<Violation>* violations_out) {
  std::vector<Violation> violations;
  StepFile file;
  if (text.size() > kMaxStepFileBytes) {
    violations.push_back({{1, 1}, "", absl::StrCat("the step file is ", text.size(),
                                                   " bytes; the limit is ", kMaxStepFileBytes)});
  } else if (size_t libyaml_events = 0; std::optional<Violation> invalid = CheckYamlSyntax(text, &libyaml_events)) {
    violations.push_back(*std::move(invalid));
  } else if (std::optional<Violation> too_big = CheckYamlShape(text, libyaml_events)) {
    violations.push_back(*std::move(too_big));
  } else {
    try {
      std::vector<YAML::Node> docs = YAML::LoadAll(std::string(text));
      if (docs.size() != 2) {
        violations.push_back(
            {{1, 1}, "", absl::StrCat("expected two YAML documents (a spec, then ---, then a "
                                      "definition), found ", docs.size())});
      } else {
        for (YAML::Node& doc : docs) ResolveMergeKeys(doc, violations);
        Parser parser(&violations);
        parser.ParseSpec(docs[0], file.spec);
        parser.ParseDefinition(docs[1], file.spec, file.definition);
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

absl::StatusOr<std::shared_ptr<const StepFile>> ParsedStepFiles::Parse(absl::string_view text,
                                                                      absl::string_view source_name,
                                                                      std::vector<Violation>* violations) {
  const bool keep = capacity_ > 0 && text.size() <= max_text_bytes_;
  if (keep) {
    absl::MutexLock lock(&mu_);
    if (auto it = files_.find(text); it != files_.end()) {
      it->second.last_used = ++uses_;
      return it->second.file;
    }
  }
  // Parsed outside the lock: another text's parse need not wait for this one.
  absl::StatusOr<StepFile> parsed = ParseStepFile(text, source_name, violations);
  if (!parsed.ok()) return parsed.status();
  auto file = std::make_shared<const StepFile>(*std::move(parsed));
  if (keep) {
    absl::MutexLock lock(&mu_);
    if (files_.size() >= capacity_ && files_.find(text) == files_.end()) {
      auto oldest = std::min_element(files_.begin(), files_.end(), [](const auto& a, const auto& b) {
        return a.second.last_used < b.second.last_used;
      });
      files_.erase(oldest);
    }
    files_[std::string(text)] = Entry{file, ++uses_};
  }
  return file;
}

std::string TypeName(ValueType type) {
  switch (type) {
    case ValueType::kString: return "a string";
    case ValueType::kNumber: return "a number";
    case ValueType::kBoolean: return "a boolean";
    case ValueType::kStruct: return "a struct";
    case ValueType::kArray: return "an array";
  }
  return "a value";
}

bool HasType(const Json& value, ValueType type) {
  switch (type) {
    case ValueType::kString: return value.is_string();
    case ValueType::kNumber: return value.is_number();
    case ValueType::kBoolean: return value.is_boolean();
    case ValueType::kStruct: return value.is_object();
    case ValueType::kArray: return value.is_array();
  }
  return false;
}

std::string DescribeJson(const Json& value) {
  std::string shown = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
  switch (value.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return absl::StrCat("the boolean ", shown);
    case Json::value_t::string: return absl::StrCat("the string ", shown);
    case Json::value_t::array: return absl::StrCat("an array ", shown);
    case Json::value_t::object: return absl::StrCat("a struct ", shown);
    default: return absl::StrCat("the number ", shown);
  }
}

absl::StatusOr<StepReference> ParseShortReference(absl::string_view text) {
  StepReference ref;
  ref.text = std::string(text);
  if (text.empty()) return absl::InvalidArgumentError("a step reference cannot be empty");
  if (absl::StrContains(text, "${{")) {
    ref.kind = StepReference::Kind::kDynamic;
    return ref;
  }
  if (absl::StartsWith(text, "dist://")) {
    ref.kind = StepReference::Kind::kDist;
    ref.path = std::string(text.substr(7));
    if (ref.path.empty() || absl::StrContains(ref.path, "..") || absl::StartsWith(ref.path, "/")) {
      return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is not a valid dist:// reference; for example dist://git/clone"));
    }
    return ref;
  }
  if (absl::StartsWith(text, ".") || absl::StartsWith(text, "/")) {
    ref.kind = StepReference::Kind::kLocal;
    ref.path = std::string(text);
    return ref;
  }
  // host/path[/-/dir]@rev, fetched over https (GitLab's short git form).
  size_t at = text.rfind('@');
  if (at == absl::string_view::npos || at == 0 || at + 1 == text.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", text, "\" is not a step reference: expected a local path (./dir or /dir), dist://name, "
        "or a git reference host/path[/-/dir]@rev"));
  }
  ref.kind = StepReference::Kind::kGit;
  ref.git_rev = std::string(text.substr(at + 1));
  absl::string_view location = text.substr(0, at);
  size_t sep = location.find("/-/");
  absl::string_view repo = sep == absl::string_view::npos ? location : location.substr(0, sep);
  if (sep != absl::string_view::npos) ref.git_dir = std::string(location.substr(sep + 3));
  if (absl::EndsWith(ref.git_dir, ".yml") || absl::EndsWith(ref.git_dir, ".yaml")) {
    size_t slash = ref.git_dir.rfind('/');
    ref.git_file = slash == std::string::npos ? ref.git_dir : ref.git_dir.substr(slash + 1);
    ref.git_dir = slash == std::string::npos ? "" : ref.git_dir.substr(0, slash);
  }
  ref.git_url = absl::StrContains(repo, "://") ? std::string(repo) : absl::StrCat("https://", repo);
  return ref;
}

absl::Status InvalidArgument(const std::vector<Violation>& violations, absl::string_view source_name) {
  std::vector<std::string> lines;
  google::rpc::BadRequest details;
  for (const Violation& v : violations) {
    const absl::string_view file = v.file.empty() ? source_name : absl::string_view(v.file);
    std::string where =
        v.position.line > 0 ? absl::StrCat(file, ":", v.position.line, ":", v.position.column, ": ") : "";
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

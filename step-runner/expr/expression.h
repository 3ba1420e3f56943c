#ifndef STEP_RUNNER_EXPR_EXPRESSION_H_
#define STEP_RUNNER_EXPR_EXPRESSION_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

// The `${{ ... }}` expression language of step files.
//
// A JSON superset: literals (strings in single or double quotes, numbers, true, false, null,
// arrays, objects), context lookups (`inputs.name`, `steps.build.outputs["sha"]`), the operators
// `! == != < <= > >= && || + -` and parentheses, and functions:
//
//   contains(haystack, needle)  string contains substring, or array contains element
//   startsWith(s, prefix)       endsWith(s, suffix)
//   join(array[, separator])    elements as strings, separator "," by default
//   format(template, args...)   "{0} and {1}" placeholders; "{{" and "}}" are literal braces
//   toJSON(value)               fromJSON(string)
//
// Truthiness: false, null, 0, "", [] and {} are falsy. `a || b` is a if truthy, else b, and a
// missing property or index on the left counts as falsy, so `inputs.x || "default"` works.
// `a && b` is a if falsy, else b. `+` adds numbers and concatenates strings or arrays; mixing
// types is an error (use format()). Every error says where it is and what was expected.
//
// Sensitivity: a value derived from a sensitive one (a sensitive input or output, a masked
// variable) is sensitive too, whatever the operators or functions in between.
namespace step_runner::expr {

using Json = nlohmann::json;

struct Value {
  Json json;
  bool sensitive = false;
};

// The names an expression can see. Each top-level context (inputs, env, steps, job, ...) is a
// JSON value; sensitive paths are dotted paths ("inputs.token") whose value, and everything
// read through or derived from it, is sensitive.
class Context {
 public:
  void Set(const std::string& name, Json value);
  void MarkSensitive(const std::string& dotted_path);
  bool Has(const std::string& name) const { return values_.count(name) > 0; }

  const std::map<std::string, Json>& values() const { return values_; }
  // True if the value at `path` is sensitive or holds something sensitive.
  bool IsSensitive(const std::string& dotted_path) const;

 private:
  std::map<std::string, Json> values_;
  std::set<std::string> sensitive_paths_;
};

// Evaluates one expression (the text between `${{` and `}}`).
absl::StatusOr<Value> Evaluate(absl::string_view expression, const Context& context);

// Expands a string that may hold `${{ }}` templates. A string that is exactly one template
// keeps the expression's type; otherwise every piece is turned into a string and joined.
absl::StatusOr<Value> Expand(absl::string_view text, const Context& context);
bool HasTemplate(absl::string_view text);
// The index of the "}}" that closes the template opening at `open` (the index of "${{"),
// skipping string literals; npos when it is not closed.
size_t FindTemplateEnd(absl::string_view text, size_t open);

// A context lookup that an expression makes: the identifier and the constant member names or
// string indexes after it, e.g. `steps.build.outputs["sha"]` is {"steps", "build", "outputs",
// "sha"}. `column` is 1-based within the expression.
struct ContextPath {
  std::vector<std::string> parts;
  int column = 0;
};

// Parses every `${{ }}` template in `text` without evaluating anything, and returns the context
// paths they read, for validation before a step runs. An error says what is malformed (an
// expression that does not close, a syntax error) and where.
absl::StatusOr<std::vector<ContextPath>> CheckTemplates(absl::string_view text);

// How a value reads inside a string: strings as they are, null as "", numbers without a
// trailing ".0", arrays and objects as JSON.
std::string ToDisplayString(const Json& value);
bool IsTruthy(const Json& value);

inline constexpr size_t kMaxExpressionBytes = 64 << 10;
inline constexpr int kMaxNesting = 64;
// Levels of the parsed tree, counting each link of a chain of operators, members or indexes.
inline constexpr int kMaxTreeHeight = 256;

}  // namespace step_runner::expr

#endif  // STEP_RUNNER_EXPR_EXPRESSION_H_

// Fuzzes the expression language: evaluation and template expansion of any bytes must give a
// value or an error (INVALID_ARGUMENT, or NOT_FOUND for a missing property), never a crash.
#include <cstddef>
#include <cstdint>

#include "step-runner/expr/expression.h"

using step_runner::expr::Context;
using step_runner::expr::Json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Context* context = [] {
    auto* c = new Context();
    c->Set("inputs", Json{{"name", "world"}, {"n", 3}, {"list", Json::array({1, "two", nullptr})},
                          {"token", "glpat-x"}, {"nested", {{"a", {{"b", true}}}}}});
    c->Set("steps", Json{{"build", {{"outputs", {{"sha", "abc"}}}}}});
    c->Set("env", Json{{"HOME", "/root"}});
    c->MarkSensitive("inputs.token");
    return c;
  }();
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  for (const auto& result : {step_runner::expr::Evaluate(text, *context), step_runner::expr::Expand(text, *context)}) {
    if (!result.ok() && result.status().code() != absl::StatusCode::kInvalidArgument &&
        result.status().code() != absl::StatusCode::kNotFound) {
      __builtin_trap();
    }
  }
  return 0;
}

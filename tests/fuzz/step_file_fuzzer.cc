// Fuzzes the step-file parser: any bytes must give a StepFile or an INVALID_ARGUMENT, never a
// crash, a hang or unbounded memory (libFuzzer enforces -rss_limit_mb and -timeout).
#include <cstddef>
#include <cstdint>

#include "step-runner/steps/step_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto file = step_runner::steps::ParseStepFile(text, "fuzz");
  if (!file.ok() && file.status().code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
  return 0;
}

#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_OUTPUT_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_OUTPUT_H_

#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::catalog {

// A step's outputs in GitLab step-runner's protocol: one JSON object per line,
// {"name": "...", "value": ...}, appended to the file the engine passes as ${{ output_file }}.
// Each line goes out in one write(2), so a reader never sees half a line. Not thread-safe.
class OutputWriter {
 public:
  // An empty path writes to stdout (handy when running sr-catalog by hand).
  static absl::StatusOr<OutputWriter> Open(const std::string& path);

  absl::Status Write(absl::string_view name, const nlohmann::json& value);

 private:
  explicit OutputWriter(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;  // invalid: stdout
};

// One output line, without the newline (exposed for tests).
std::string OutputLine(absl::string_view name, const nlohmann::json& value);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_OUTPUT_H_

#include "steps-catalog/helper/output.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"

namespace step_runner::catalog {

std::string OutputLine(absl::string_view name, const nlohmann::json& value) {
  nlohmann::json line = {{"name", std::string(name)}, {"value", value}};
  // `replace`: a value with invalid UTF-8 (a test log, say) must not abort the step.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

absl::StatusOr<OutputWriter> OutputWriter::Open(const std::string& path) {
  if (path.empty()) return OutputWriter(UniqueFd());
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  return OutputWriter(std::move(fd));
}

absl::Status OutputWriter::Write(absl::string_view name, const nlohmann::json& value) {
  return WriteAll(fd_ ? fd_.get() : STDOUT_FILENO, OutputLine(name, value) + "\n");
}

}  // namespace step_runner::catalog

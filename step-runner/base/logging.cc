#include "step-runner/base/logging.h"

#include <string.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace step_runner::internal {
namespace {
std::atomic<int> min_severity{static_cast<int>(Severity::kInfo)};

char SeverityLetter(Severity s) {
  switch (s) {
    case Severity::kInfo: return 'I';
    case Severity::kWarning: return 'W';
    case Severity::kError: return 'E';
  }
  return '?';
}
}  // namespace

void SetMinLogSeverity(Severity severity) { min_severity = static_cast<int>(severity); }
bool LogEnabled(Severity severity) { return static_cast<int>(severity) >= min_severity.load(); }

LogMessage::LogMessage(Severity severity, const char* file, int line, bool append_errno)
    : severity_(severity), file_(file), line_(line), saved_errno_(errno),
      append_errno_(append_errno) {}

LogMessage::~LogMessage() {
  if (append_errno_) stream_ << ": " << strerror(saved_errno_);
  const char* base = strrchr(file_, '/');
  std::string line;
  line += SeverityLetter(severity_);
  line += absl::FormatTime(" %Y-%m-%dT%H:%M:%E3SZ ", absl::Now(), absl::UTCTimeZone());
  line += base ? base + 1 : file_;
  line += ':' + std::to_string(line_) + "] " + stream_.str() + '\n';
  // One write(2) so concurrent threads never interleave within a line.
  ssize_t unused = ::write(STDERR_FILENO, line.data(), line.size());
  (void)unused;
}

}  // namespace step_runner::internal

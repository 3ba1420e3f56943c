#ifndef STEP_RUNNER_BASE_LOGGING_H_
#define STEP_RUNNER_BASE_LOGGING_H_

#include <sstream>

// A small stand-in for absl/log, which Debian's abseil 20220623 lacks. One line per message on
// stderr: severity, UTC time, file:line, message. The macro shape follows LOG(...) so it can be
// swapped for absl/log later.
namespace step_runner::internal {

enum class Severity { kInfo, kWarning, kError };

class LogMessage {
 public:
  LogMessage(Severity severity, const char* file, int line, bool append_errno = false);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  Severity severity_;
  const char* file_;
  int line_;
  int saved_errno_;
  bool append_errno_;
  std::ostringstream stream_;
};

// Messages below this severity are dropped. Tests and benchmarks turn INFO off.
void SetMinLogSeverity(Severity severity);
bool LogEnabled(Severity severity);

// Turns the stream expression into void so the whole macro is one expression (no dangling else).
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace step_runner::internal

#define SR_LOG_SEVERITY_INFO ::step_runner::internal::Severity::kInfo
#define SR_LOG_SEVERITY_WARNING ::step_runner::internal::Severity::kWarning
#define SR_LOG_SEVERITY_ERROR ::step_runner::internal::Severity::kError

#define SR_LOG(sev)                                                          \
  !::step_runner::internal::LogEnabled(SR_LOG_SEVERITY_##sev)                \
      ? (void)0                                                              \
      : ::step_runner::internal::Voidify() &                                 \
            ::step_runner::internal::LogMessage(SR_LOG_SEVERITY_##sev, __FILE__, __LINE__).stream()

// Appends ": strerror(errno)" for the errno at the point of the macro.
#define SR_PLOG(sev)                                                         \
  !::step_runner::internal::LogEnabled(SR_LOG_SEVERITY_##sev)                \
      ? (void)0                                                              \
      : ::step_runner::internal::Voidify() &                                 \
            ::step_runner::internal::LogMessage(SR_LOG_SEVERITY_##sev, __FILE__, __LINE__, true).stream()

#endif  // STEP_RUNNER_BASE_LOGGING_H_

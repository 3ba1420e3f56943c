#include "proxy/audit.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"

namespace step_runner::proxy {

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  int fd = path.empty() ? ::dup(STDERR_FILENO)
                        : ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("open audit log ", path));
  return std::unique_ptr<AuditLog>(new AuditLog(UniqueFd(fd)));
}

void AuditLog::Write(const nlohmann::json& record) {
  // Replacement, not exceptions, for invalid UTF-8 (a username is whatever the client sent).
  std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line += '\n';
  absl::MutexLock lock(&mu_);
  if (absl::Status s = WriteAll(fd_.get(), line); !s.ok()) {
    SR_LOG(ERROR) << "audit log: " << s;
  }
}

std::string AuditTime(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

}  // namespace step_runner::proxy

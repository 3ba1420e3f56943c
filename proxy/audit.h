#ifndef STEP_RUNNER_PROXY_AUDIT_H_
#define STEP_RUNNER_PROXY_AUDIT_H_

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::proxy {

// The audit trail: one JSON object per line, appended with one write(2) each so that lines from
// concurrent connections never interleave. Callers put no secret in a record: keys appear as
// fingerprints, tokens as the forge username they belong to. Thread-safe.
class AuditLog {
 public:
  // An empty path writes to stderr.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);
  void Write(const nlohmann::json& record);

 private:
  explicit AuditLog(UniqueFd fd) : fd_(std::move(fd)) {}
  absl::Mutex mu_;
  UniqueFd fd_ ABSL_GUARDED_BY(mu_);
};

// RFC 3339 UTC with milliseconds, the time format of every audit record.
std::string AuditTime(absl::Time t);

}  // namespace step_runner::proxy

#endif  // STEP_RUNNER_PROXY_AUDIT_H_

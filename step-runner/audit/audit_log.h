#ifndef STEP_RUNNER_AUDIT_AUDIT_LOG_H_
#define STEP_RUNNER_AUDIT_AUDIT_LOG_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"
#include "step-runner/base/sha256.h"  // the chain hashes each line with Sha256Hex
#include "step-runner/base/unique_fd.h"

// The daemon's audit log: append-only JSON lines in the state dir, one per RPC and per step
// event. Each line carries "prev", the SHA-256 of the line before it (64 zeros for the first),
// and "seq", its number; a head file beside the log holds the last line's seq and hash. Any
// edited byte, removed or reordered line breaks the chain at a line that Verify names; a
// truncated end disagrees with the head.
//
// Tamper-evident, not tamper-proof: someone who can write the state dir can rewrite the whole
// chain and the head. Ship the lines elsewhere (audit tail --follow) to make that visible too.
// Secrets never go in: callers pass ids, methods, uids, codes and policies, never env or argv.
namespace step_runner::audit {

class AuditLog {
 public:
  // Opens (creating) `path`, continuing the chain of what is there. A head that disagrees with
  // the file is itself recorded as the first new line, never silently repaired.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);

  // Appends `fields` (an object) plus seq, time and prev, as one line. Thread-safe.
  absl::Status Append(nlohmann::json fields);

  const std::string& path() const { return path_; }

 private:
  AuditLog(std::string path, UniqueFd fd, UniqueFd head) : path_(std::move(path)), fd_(std::move(fd)), head_(std::move(head)) {}
  const std::string path_;
  absl::Mutex mu_;
  UniqueFd fd_ ABSL_GUARDED_BY(mu_);
  UniqueFd head_ ABSL_GUARDED_BY(mu_);
  int64_t seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::string prev_ ABSL_GUARDED_BY(mu_);
};

std::string HeadPath(const std::string& log_path);

// OK with the number of lines, or DATA_LOSS naming the first bad line and what is wrong.
absl::StatusOr<int64_t> Verify(const std::string& path);

// One line for people: time, what, who, job, result.
std::string FormatLine(absl::string_view json_line);

// Prints the last `lines` lines, then (follow) new ones as they come, until `stop` is true.
absl::Status Tail(const std::string& path, int lines, bool follow, const std::function<void(const std::string&)>& print,
                  const std::function<bool()>& stop);

}  // namespace step_runner::audit

#endif  // STEP_RUNNER_AUDIT_AUDIT_LOG_H_

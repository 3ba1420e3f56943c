#ifndef STEP_RUNNER_LOGS_EVENT_LOG_H_
#define STEP_RUNNER_LOGS_EVENT_LOG_H_

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/step_runner.pb.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/logs/waiters.h"

namespace step_runner::logs {

// A job's step events, numbered 1, 2, 3, ... Kept in memory (a job has few) and appended to
// `<dir>/events` as length-delimited records, so that a restarted daemon can replay them.
// Thread-safe; same waiting model as JobLog.
class EventLog {
 public:
  static absl::StatusOr<std::shared_ptr<EventLog>> Create(const std::string& dir);
  // Reads what a previous daemon wrote (a torn last record is dropped), as finished.
  static absl::StatusOr<std::shared_ptr<EventLog>> OpenFinished(const std::string& dir);
  // Same, but open for appending (the torn tail, if any, is cut off first).
  static absl::StatusOr<std::shared_ptr<EventLog>> Reopen(const std::string& dir);

  // Assigns the next seq to `event` and appends it.
  absl::Status Append(proto::FollowStepsResponse event);
  void Finish();
  bool finished() const;
  int64_t last_seq() const;

  // Events with seq > after_seq (at most max_count). OUT_OF_RANGE if after_seq is negative or
  // beyond the last event.
  absl::StatusOr<std::vector<proto::FollowStepsResponse>> ReadAfter(int64_t after_seq, size_t max_count) const;

  using WaiterId = Waiters::Id;
  // Calls `wake` once when an event after `after_seq` exists or the log finishes; nullopt (and
  // nothing registered) if that is already so.
  std::optional<WaiterId> WaitForEvents(int64_t after_seq, std::function<void()> wake);
  void CancelWait(WaiterId id);

 private:
  explicit EventLog(UniqueFd writer) : writer_(std::move(writer)) {}
  static absl::StatusOr<std::shared_ptr<EventLog>> Load(const std::string& dir, bool writable);

  mutable absl::Mutex mu_;
  UniqueFd writer_ ABSL_GUARDED_BY(mu_);
  std::vector<proto::FollowStepsResponse> events_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  Waiters waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace step_runner::logs

#endif  // STEP_RUNNER_LOGS_EVENT_LOG_H_

#ifndef STEP_RUNNER_LOGS_JOB_LOG_H_
#define STEP_RUNNER_LOGS_JOB_LOG_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/logs/waiters.h"

namespace step_runner::logs {

enum class Stream : uint8_t { kStdout = 1, kStderr = 2 };

// One job's output: an append-only file of raw bytes addressed by byte offset (`log`), plus a
// small index of the offsets where the source stream switches between stdout and stderr
// (`log.idx`, 9-byte records: little-endian int64 offset, uint8 stream). The bytes are stored
// exactly as the steps wrote them (after masking), so replay is byte-exact.
//
// Thread-safe. Appends come from one writer; any number of readers read concurrently, each
// through its own fd, and wait for new bytes with one-shot callbacks.
class JobLog {
 public:
  // Creates an empty log in `dir` (which must exist), open for appending.
  static absl::StatusOr<std::shared_ptr<JobLog>> Create(const std::string& dir);
  // Opens the log a previous daemon wrote, as finished (no more appends).
  static absl::StatusOr<std::shared_ptr<JobLog>> OpenFinished(const std::string& dir);

  absl::Status Append(Stream stream, absl::string_view data);
  // No more appends; wakes every waiter. Closes the writer fd. Idempotent.
  void Finish();

  int64_t size() const;
  bool finished() const;

  // An fd for Read(); each follower holds its own, so the log stays readable to it even after
  // the job is closed and its files are deleted.
  absl::StatusOr<UniqueFd> OpenReader() const;

  // Where a read at `offset` may go: at most `max_bytes`, stopping where the stream switches
  // and at the end of what was appended. OUT_OF_RANGE if offset is negative or past the end.
  struct Extent {
    int64_t offset = 0;
    size_t length = 0;  // 0 at the end
    Stream stream = Stream::kStdout;
  };
  absl::StatusOr<Extent> Locate(int64_t offset, size_t max_bytes) const;
  // Reads the bytes of `extent` (from Locate) into `dest`, which has room for them all.
  absl::Status ReadExtent(int reader_fd, const Extent& extent, char* dest) const;

  struct Chunk {
    int64_t offset = 0;
    Stream stream = Stream::kStdout;
    std::string data;
  };
  // Reads up to `max_bytes` at `offset` into `chunk`, stopping where the stream switches, so
  // that every byte of a chunk comes from one stream. Returns the bytes read (0 at the end).
  // OUT_OF_RANGE if offset is negative or past the end.
  absl::StatusOr<size_t> Read(int reader_fd, int64_t offset, size_t max_bytes, Chunk* chunk) const;

  using WaiterId = Waiters::Id;
  // Calls `wake` once (from the appending thread; keep it cheap) when the log grows past
  // `offset` or finishes. Returns nullopt, registering nothing, if that is already so.
  std::optional<WaiterId> WaitForData(int64_t offset, std::function<void()> wake);
  void CancelWait(WaiterId id);

 private:
  JobLog(std::string dir, UniqueFd writer, UniqueFd index_writer);
  std::string LogPath() const;

  const std::string dir_;
  mutable absl::Mutex mu_;
  UniqueFd writer_ ABSL_GUARDED_BY(mu_);
  UniqueFd index_writer_ ABSL_GUARDED_BY(mu_);
  int64_t size_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Offset -> stream that starts there (and runs until the next entry).
  std::map<int64_t, Stream> switches_ ABSL_GUARDED_BY(mu_);
  Waiters waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace step_runner::logs

#endif  // STEP_RUNNER_LOGS_JOB_LOG_H_

#ifndef STEP_RUNNER_BASE_FILES_H_
#define STEP_RUNNER_BASE_FILES_H_

#include <sys/types.h>

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace step_runner {

// errno -> absl::Status, always with the operation and path as context.
absl::Status ErrnoStatus(int err, absl::string_view what);

absl::StatusOr<std::string> ReadFile(const std::string& path);
// Reads a file that someone else (a step's code) may have made or replaced: NOT_FOUND if there is
// none; INVALID_ARGUMENT, naming it `what`, if it is not a regular file (a FIFO or device would
// block or never end), if it is a symbolic link and `follow_links` is false, or if it holds more
// than `max_bytes` (however big it says it is, no more than that is read).
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, size_t max_bytes, bool follow_links,
                                            absl::string_view what);
// Writes to a temporary file beside `path`, then renames it over `path`, so readers (and a
// daemon restarted after SIGKILL) see either the old or the new content, never a torn one.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view data, mode_t mode);
// Writes all of `data` to fd, retrying on EINTR and short writes.
absl::Status WriteAll(int fd, absl::string_view data);
// mkdir -p with `mode` for directories it creates.
absl::Status MakeDirs(const std::string& path, mode_t mode);
// Whether `path` exists (following symlinks).
bool PathExists(const std::string& path);
// rm -rf; a missing path is fine.
absl::Status RemoveTree(const std::string& path);
// The folder part of `path` ("." when it has none, "/" for a file in the root).
std::string Dirname(const std::string& path);
// The folder of the running program, where its helper programs are installed beside it.
std::string OwnBinaryDir();

}  // namespace step_runner

#endif  // STEP_RUNNER_BASE_FILES_H_

#ifndef STEP_RUNNER_TESTS_FORGE_FORGE_GIT_H_
#define STEP_RUNNER_TESTS_FORGE_FORGE_GIT_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// The forge's git side: seeding bare repositories (libgit2), reading branches and MR diffs out
// of them, and serving them over smart HTTP through git's own `git http-backend` as a CGI.
namespace step_runner::forge {

// Creates a bare repository at `bare_dir` whose `main` holds one commit with every file under
// `source_dir` (recursively, executable bits kept), with a fixed author and date so the seed
// sha is stable. Pushes to main are refused by a pre-receive hook (GitLab's protected branch)
// and non-fast-forward pushes by receive.denyNonFastForwards.
absl::Status SeedBareRepository(const std::string& source_dir, const std::string& bare_dir);

// An empty bare repository at `bare_dir` that accepts pushes (main unprotected), for projects
// created through the API.
absl::Status InitBareRepository(const std::string& bare_dir);

struct BranchInfo {
  std::string sha;
  std::string title;  // first line of the commit message
  std::string message;
  std::string author_name;
};
// NOT_FOUND when the branch does not exist.
absl::StatusOr<BranchInfo> ReadBranch(const std::string& bare_dir, const std::string& branch);

struct FileChange {
  std::string old_path;
  std::string new_path;
  bool new_file = false;
  bool deleted_file = false;
  std::string diff;  // the hunks, as GitLab's `changes[].diff` holds them
};
// The changes of `source` against its merge base with `target` (what an MR shows).
absl::StatusOr<std::vector<FileChange>> DiffBranches(const std::string& bare_dir,
                                                     const std::string& target,
                                                     const std::string& source);

struct CgiRequest {
  std::string method;
  std::string path_info;  // "/demo/calculator.git/info/refs"
  std::string query;
  std::string content_type;
  std::string git_protocol;  // the Git-Protocol header (protocol v2), may be empty
  std::string remote_user;
  int body_fd = -1;  // the request body, positioned at its start; -1 for none
  size_t body_size = 0;
};
struct CgiResponse {
  int status = 200;
  std::multimap<std::string, std::string> headers;
  std::string body;
};
// Runs `git http-backend` for one request with GIT_PROJECT_ROOT=`project_root`. The CGI's
// stderr goes to the forge's stderr. Gives up (killing it) after `timeout_seconds`.
absl::StatusOr<CgiResponse> RunGitHttpBackend(const std::string& project_root, const CgiRequest& request,
                                              int timeout_seconds);

// Splits a CGI response ("Header: v\r\n...\r\n\r\nbody") into status, headers and body.
absl::StatusOr<CgiResponse> ParseCgiOutput(absl::string_view output);

}  // namespace step_runner::forge

#endif  // STEP_RUNNER_TESTS_FORGE_FORGE_GIT_H_

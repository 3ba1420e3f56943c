#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_OPS_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_OPS_H_

#include <string>

#include "absl/status/statusor.h"

// The catalog's git steps, through libgit2 (never the git CLI). Over HTTP(S) the token is
// handed to libgit2's credential callback (Basic, as GitLab accepts: user "oauth2", the token as
// password), so it is never written into .git/config, a remote URL or a log. Shallow clones
// (depth) go through shallow.h, which sends the token in the same Basic header.
namespace step_runner::catalog {

struct CloneRequest {
  std::string url;  // must not carry credentials
  std::string ref;  // a branch; empty: the remote's default
  std::string dir;
  // > 0: only the last `depth` commits of the one branch (git's --depth, which implies
  // --single-branch); over http(s) only (see shallow.h), other URLs get the whole history.
  int depth = 0;
  std::string token;
};
struct CloneResult {
  std::string sha;  // HEAD after the clone
  bool reused = false;  // `dir` already held a clone of `url`; it was fetched, not re-cloned
};
// Clones `url` into `dir`. A retry into a directory that already holds a clone of the same URL
// fetches instead of failing, so a retried workflow is idempotent.
absl::StatusOr<CloneResult> Clone(const CloneRequest& request);

struct BranchResult {
  std::string sha;
  bool created = false;  // a new local branch
  bool resumed = false;  // the branch existed (locally, or on origin): an earlier run's work
};
// Checks out branch `name`. A missing local branch is created from origin/<name> when that
// exists, else from `base` (a local branch, else origin/<base>).
absl::StatusOr<BranchResult> CheckoutBranch(const std::string& dir, const std::string& name,
                                            const std::string& base);

struct CommitResult {
  bool committed = false;  // false: the work tree matched HEAD, nothing to commit
  std::string sha;         // the new commit, or HEAD when nothing was committed
};
// Stages every change (new, modified, deleted; .gitignore respected) and commits it on HEAD.
absl::StatusOr<CommitResult> CommitAll(const std::string& dir, const std::string& message,
                                       const std::string& author_name, const std::string& author_email);

// Pushes local branch `branch` to the same branch on origin. A ref the server refuses (a
// protected branch, a non-fast-forward) is FAILED_PRECONDITION naming the branch, the reason and
// what the remote said; a rejected token is UNAUTHENTICATED.
absl::Status Push(const std::string& dir, const std::string& branch, const std::string& token);

// HEAD's sha in `dir`.
absl::StatusOr<std::string> HeadSha(const std::string& dir);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_OPS_H_

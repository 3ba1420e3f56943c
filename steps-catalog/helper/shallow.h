#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_SHALLOW_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_SHALLOW_H_

#include <git2.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/smart_http.h"

// Shallow repositories with libgit2 1.5, which reads them but cannot make, fetch into or push
// from one: the history is cut and moved by smart_http, the objects stored and packed by
// libgit2. A shallow repository is an ordinary one plus .git/shallow, the commits whose parents
// are missing on purpose, so git and libgit2 both work in it afterwards.
namespace step_runner::catalog {

// True for the URLs this code can reach (http:// and https://).
bool IsSmartHttpUrl(const std::string& url);

// Clones `branch` (empty: the remote's default) with its last `depth` commits into `dir`, git's
// `clone --depth N --single-branch`, without checking out: HEAD, the branch, origin and its
// tracking ref are set. nullopt when the remote is empty (nothing to cut: clone it in full). On
// an error nothing is left behind in `dir`.
absl::StatusOr<std::optional<RepositoryPtr>> CloneShallow(const SmartHttpRemote& remote, const std::string& branch,
                                                          const std::string& dir, int depth);

// Fetches origin into a shallow repository, as `git fetch [--depth N]`: the tracking refs move
// to the remote's tips, .git/shallow follows the new boundary. depth 0 keeps the boundary.
absl::Status FetchIntoShallow(git_repository* repo, const SmartHttpRemote& remote, int depth);

// Pushes local `branch` from a shallow repository to the same name on `remote`: only the commits
// the remote lacks and the objects their parents do not already hold. Not a fast-forward is
// FAILED_PRECONDITION, before anything is sent; a refusal by the forge is in the report.
absl::StatusOr<PushReport> PushFromShallow(git_repository* repo, const SmartHttpRemote& remote, const std::string& branch);

// The refusal of a push that is not a fast-forward (shared with libgit2's push).
absl::Status NotFastForward(const std::string& branch);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_SHALLOW_H_

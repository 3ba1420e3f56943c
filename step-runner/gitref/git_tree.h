#ifndef STEP_RUNNER_GITREF_GIT_TREE_H_
#define STEP_RUNNER_GITREF_GIT_TREE_H_

#include <string>

#include "absl/status/statusor.h"

namespace step_runner::gitref {

// The checked-out tree of `url` at `rev` (a branch, a tag or a full commit id), fetched into
// `cache_dir` when it is not there yet: bare repositories under repos/, trees under
// trees/<commit>, shared by every process that uses the same folder (a lock file per
// repository; trees are published by rename, so a reader sees a whole tree or none).
// NOT_FOUND when the revision does not exist; FAILED_PRECONDITION when git fails.
absl::StatusOr<std::string> FetchGitTree(const std::string& cache_dir, const std::string& url, const std::string& rev);

}  // namespace step_runner::gitref

#endif  // STEP_RUNNER_GITREF_GIT_TREE_H_

#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_FRESH_CHECKOUT_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_FRESH_CHECKOUT_H_

#include <git2.h>

#include "absl/status/status.h"

namespace step_runner::catalog {

// Writes HEAD's tree into the work tree of a clone made with GIT_CHECKOUT_NONE (the work tree
// holds nothing but .git), on `threads` threads, and writes the index with each file's stat
// data, so that the clone is clean at once. When a filter may apply (core.autocrlf, an
// attributes file outside the tree), content goes through libgit2's filters (git_blob_filter)
// as libgit2's checkout would; otherwise blobs are written as they are.
//
// Why: libgit2 1.5's checkout writes one file at a time and resolves each path (~10 readlinks a
// file); it was 560 of a 10,000-file clone's 1,700 ms, where git's own clone is ~1,600 ms
// (BENCHMARKS.md, catalog).
//
// FAILED_PRECONDITION, with nothing written, for a tree this does not handle the way git
// would: a .gitattributes in the tree (it changes how files are written, and would be read
// while files are being written), a submodule, a name git refuses (".git", "..", a '/'), or a
// symlink where core.symlinks is false.
// The caller then uses libgit2's checkout, which handles (or refuses) those.
absl::Status CheckoutFreshClone(git_repository* repo, int threads);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_FRESH_CHECKOUT_H_

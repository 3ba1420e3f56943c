#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_PATCH_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_PATCH_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// Unified diffs from a model: finding them in an answer, repairing what models commonly get
// wrong, and applying them to a work tree through libgit2.
namespace step_runner::catalog {

// The diff in a model's answer: the first ```diff / ```patch fenced block, else the first
// fenced block that looks like a diff, else the text from the first "diff --git" or "--- "
// line. INVALID_ARGUMENT when there is none.
absl::StatusOr<std::string> ExtractDiff(absl::string_view answer);

// The answer's one-line summary: the text after "Summary:", else its first line of prose.
std::string ExtractSummary(absl::string_view answer);

struct NormalizedDiff {
  std::string text;                 // what libgit2 parses
  std::vector<std::string> files;   // paths touched (the new path; the old one for a deletion)
  std::vector<std::string> file_texts;  // `text` cut per file, in the order of `files`
};
// Rewrites a unified diff into git's form: a "diff --git" header per file (models often omit
// it), new/deleted file modes for /dev/null sides, no "index" lines (models invent them), hunk
// line counts recomputed from the hunk bodies (models often miscount), and a blank line inside
// a hunk read as an empty context line. INVALID_ARGUMENT when there are no hunks, or a path is
// absolute, climbs out with "..", or points into .git.
absl::StatusOr<NormalizedDiff> NormalizeDiff(absl::string_view diff);

// Normalizes and applies `diff` to the work tree of the repository at `dir`, all or nothing.
// FAILED_PRECONDITION with libgit2's reason (which file, which hunk) when it does not apply.
// Returns the paths changed.
absl::StatusOr<std::vector<std::string>> ApplyDiff(const std::string& dir, absl::string_view diff);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_PATCH_H_

#include "steps-catalog/helper/git_util.h"

#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace step_runner::catalog {

void EnsureLibgit2() {
  static std::once_flag once;
  // Never shut down: objects may be freed by static destructors after main returns.
  std::call_once(once, [] {
    git_libgit2_init();
    // libgit2 caches no tree over 4 KiB by default, so a push's walk of the remote's trees
    // inflated and delta-resolved a large folder's tree again at every visit.
    (void)git_libgit2_opts(GIT_OPT_SET_CACHE_OBJECT_LIMIT, GIT_OBJECT_TREE, static_cast<size_t>(1) << 20);
  });
}

absl::Status GitErrorToStatus(int rc, absl::string_view what) {
  const git_error* err = git_error_last();
  std::string message = absl::StrCat(what, ": ", err != nullptr && err->message != nullptr
                                                     ? err->message
                                                     : absl::StrCat("libgit2 error ", rc));
  switch (rc) {
    case GIT_ENOTFOUND:
      return absl::NotFoundError(message);
    case GIT_EAUTH:
      return absl::UnauthenticatedError(message);
    case GIT_ENONFASTFORWARD:
    case GIT_EEXISTS:
    case GIT_ECONFLICT:
    case GIT_EAPPLYFAIL:
      return absl::FailedPreconditionError(message);
    case GIT_EUSER:
      return absl::AbortedError(message);
    default:
      return absl::InternalError(message);
  }
}

std::string OidToHex(const git_oid& oid) {
  char buf[GIT_OID_HEXSZ + 1];
  git_oid_tostr(buf, sizeof buf, &oid);
  return buf;
}

std::string WhatTheRemoteSaid(absl::string_view sideband) {
  static constexpr absl::string_view kProgress[] = {
      "Enumerating objects:", "Counting objects:", "Compressing objects:", "Writing objects:",
      "Receiving objects:",   "Resolving deltas:", "Delta compression",    "Total "};
  std::vector<std::string> kept;
  // A meter rewrites its line with '\r': every piece between line ends is looked at on its own.
  for (absl::string_view line : absl::StrSplit(sideband, absl::ByAnyChar("\r\n"), absl::SkipWhitespace())) {
    line = absl::StripAsciiWhitespace(line);
    absl::string_view body = line;
    absl::ConsumePrefix(&body, "remote: ");
    bool progress = false;
    for (absl::string_view prefix : kProgress) progress = progress || absl::StartsWith(body, prefix);
    if (!progress) kept.emplace_back(line);
  }
  return absl::StrJoin(kept, "\n");
}

}  // namespace step_runner::catalog

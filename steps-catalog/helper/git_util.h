#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_UTIL_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_UTIL_H_

#include <git2.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

// libgit2 plumbing shared by the catalog helper and the local forge: one error converter and
// owning pointers for libgit2 objects.
namespace step_runner::catalog {

// Initializes libgit2 once per process (thread-safe, idempotent).
void EnsureLibgit2();

// A libgit2 return code plus git_error_last() as a Status with context:
// "<what>: <libgit2 message>". GIT_ENOTFOUND maps to NOT_FOUND, GIT_EAUTH to
// UNAUTHENTICATED, GIT_ENONFASTFORWARD/GIT_EEXISTS to FAILED_PRECONDITION, others to INTERNAL.
absl::Status GitErrorToStatus(int rc, absl::string_view what);

template <typename T, void (*Free)(T*)>
struct GitDeleter {
  void operator()(T* p) const { Free(p); }
};
template <typename T, void (*Free)(T*)>
using GitPtr = std::unique_ptr<T, GitDeleter<T, Free>>;

using RepositoryPtr = GitPtr<git_repository, git_repository_free>;
using ReferencePtr = GitPtr<git_reference, git_reference_free>;
using CommitPtr = GitPtr<git_commit, git_commit_free>;
using TreePtr = GitPtr<git_tree, git_tree_free>;
using IndexPtr = GitPtr<git_index, git_index_free>;
using RemotePtr = GitPtr<git_remote, git_remote_free>;
using SignaturePtr = GitPtr<git_signature, git_signature_free>;
using DiffPtr = GitPtr<git_diff, git_diff_free>;
using PatchPtr = GitPtr<git_patch, git_patch_free>;
using ObjectPtr = GitPtr<git_object, git_object_free>;
using TreeBuilderPtr = GitPtr<git_treebuilder, git_treebuilder_free>;
using ConfigPtr = GitPtr<git_config, git_config_free>;
using StatusListPtr = GitPtr<git_status_list, git_status_list_free>;

// The hex form of an object id.
std::string OidToHex(const git_oid& oid);

// What a git server printed on its sideband, for an error message: a hook's reason, say,
// without the progress meters ("Counting objects:  5% (1/19)\r..."), which can run to
// kilobytes and say nothing about why the transfer failed. Empty when nothing else is left.
std::string WhatTheRemoteSaid(absl::string_view sideband);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_GIT_UTIL_H_

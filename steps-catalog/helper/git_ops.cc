#include "steps-catalog/helper/git_ops.h"

#include <sys/stat.h>

#include <algorithm>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/fresh_checkout.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/shallow.h"

namespace step_runner::catalog {
namespace {

// What the credential and push callbacks share with their caller.
struct TransferState {
  std::string token;
  int credential_calls = 0;
  std::vector<std::string> rejected;  // "refs/heads/x: reason"
  std::string remote_messages;        // what the server printed (sideband), e.g. a hook's reason
};

int Credentials(git_credential** out, const char* /*url*/, const char* username_from_url,
                unsigned int allowed_types, void* payload) {
  auto* state = static_cast<TransferState*>(payload);
  if (!(allowed_types & GIT_CREDENTIAL_USERPASS_PLAINTEXT)) return GIT_PASSTHROUGH;
  if (state->token.empty()) {
    git_error_set_str(GIT_ERROR_NET, "the forge asks for credentials and no token was given (SR_GIT_TOKEN)");
    return GIT_EAUTH;
  }
  // libgit2 calls again after a 401; the same token would be refused forever.
  if (++state->credential_calls > 1) {
    git_error_set_str(GIT_ERROR_NET, "the forge rejected the token (401 Unauthorized)");
    return GIT_EAUTH;
  }
  const char* user = username_from_url != nullptr && *username_from_url != '\0' ? username_from_url : "oauth2";
  return git_credential_userpass_plaintext_new(out, user, state->token.c_str());
}

int Sideband(const char* str, int len, void* payload) {
  static_cast<TransferState*>(payload)->remote_messages.append(str, static_cast<size_t>(len));
  return 0;
}

int PushUpdateReference(const char* refname, const char* status, void* payload) {
  if (status != nullptr) static_cast<TransferState*>(payload)->rejected.push_back(absl::StrCat(refname, ": ", status));
  return 0;
}

git_remote_callbacks Callbacks(TransferState* state) {
  git_remote_callbacks callbacks = GIT_REMOTE_CALLBACKS_INIT;
  callbacks.credentials = Credentials;
  callbacks.sideband_progress = Sideband;
  callbacks.push_update_reference = PushUpdateReference;
  callbacks.payload = state;
  return callbacks;
}

absl::Status RejectCredentialsInUrl(const std::string& url) {
  absl::string_view rest = url;
  size_t scheme = rest.find("://");
  if (scheme == absl::string_view::npos) return absl::OkStatus();
  rest.remove_prefix(scheme + 3);
  absl::string_view authority = rest.substr(0, rest.find('/'));
  if (absl::StrContains(authority, '@')) {
    // Never echo the URL: it holds the secret.
    return absl::InvalidArgumentError(
        "the repository URL carries credentials; give the token through the token input (SR_GIT_TOKEN) instead");
  }
  return absl::OkStatus();
}

absl::StatusOr<RepositoryPtr> Open(const std::string& dir) {
  EnsureLibgit2();
  git_repository* repo = nullptr;
  if (int rc = git_repository_open(&repo, dir.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("open repository ", dir));
  }
  return RepositoryPtr(repo);
}

// A libgit2 error, with what the remote said appended (a hook's reason, say).
absl::Status TransferError(int rc, absl::string_view what, const TransferState& state) {
  absl::Status status = GitErrorToStatus(rc, what);
  std::string remote = WhatTheRemoteSaid(state.remote_messages);
  if (remote.empty()) return status;
  return absl::Status(status.code(), absl::StrCat(status.message(), "; the remote said: ", remote));
}

absl::StatusOr<std::string> Head(git_repository* repo) {
  git_oid oid;
  if (int rc = git_reference_name_to_id(&oid, repo, "HEAD"); rc < 0) return GitErrorToStatus(rc, "resolve HEAD");
  return OidToHex(oid);
}

}  // namespace

absl::StatusOr<std::string> HeadSha(const std::string& dir) {
  SR_ASSIGN_OR_RETURN(RepositoryPtr repo, Open(dir));
  return Head(repo.get());
}

absl::StatusOr<CloneResult> Clone(const CloneRequest& request) {
  EnsureLibgit2();
  SR_RETURN_IF_ERROR(RejectCredentialsInUrl(request.url));
  if (request.depth < 0) {
    return absl::InvalidArgumentError(absl::StrCat("depth must be 0 (the whole history) or more, not ", request.depth));
  }
  const bool over_http = IsSmartHttpUrl(request.url);
  if (request.depth > 0 && !over_http) {
    std::cerr << "clone: depth applies to http(s) URLs; fetching the whole history of " << request.url << "\n";
  }
  const SmartHttpRemote smart{.url = request.url, .token = request.token};
  TransferState state{.token = request.token};
  struct stat st;
  if (::stat((request.dir + "/.git").c_str(), &st) == 0) {
    SR_ASSIGN_OR_RETURN(RepositoryPtr repo, Open(request.dir));
    git_remote* raw_remote = nullptr;
    if (int rc = git_remote_lookup(&raw_remote, repo.get(), "origin"); rc < 0) {
      return GitErrorToStatus(rc, absl::StrCat(request.dir, " is a repository without an origin"));
    }
    RemotePtr remote(raw_remote);
    if (request.url != git_remote_url(remote.get())) {
      return absl::FailedPreconditionError(
          absl::StrCat(request.dir, " already holds a clone of another repository (", git_remote_url(remote.get()), ")"));
    }
    if (git_repository_is_shallow(repo.get()) == 1) {
      // libgit2 1.5's fetch negotiation walks the history and fails at the cut.
      if (!over_http) {
        return absl::FailedPreconditionError(absl::StrCat(request.dir, " is a shallow clone, which only an http(s) URL can fetch into"));
      }
      if (absl::Status fetched = FetchIntoShallow(repo.get(), smart, request.depth); !fetched.ok()) {
        return absl::Status(fetched.code(), absl::StrCat("fetch ", request.url, ": ", fetched.message()));
      }
    } else {
      git_fetch_options fetch = GIT_FETCH_OPTIONS_INIT;
      fetch.callbacks = Callbacks(&state);
      if (int rc = git_remote_fetch(remote.get(), nullptr, &fetch, nullptr); rc < 0) {
        return TransferError(rc, absl::StrCat("fetch ", request.url), state);
      }
    }
    SR_ASSIGN_OR_RETURN(std::string sha, Head(repo.get()));
    std::cerr << "clone: " << request.dir << " already holds " << request.url << "; fetched\n";
    return CloneResult{sha, true};
  }
  RepositoryPtr repo;
  if (request.depth > 0 && over_http) {
    absl::StatusOr<std::optional<RepositoryPtr>> shallow = CloneShallow(smart, request.ref, request.dir, request.depth);
    if (!shallow.ok()) {
      if (absl::IsNotFound(shallow.status())) return shallow.status();
      return absl::Status(shallow.status().code(), absl::StrCat("clone ", request.url, ": ", shallow.status().message()));
    }
    if (*shallow) {
      repo = std::move(**shallow);
    } else {
      std::cerr << "clone: " << request.url << " is empty; nothing to cut at depth " << request.depth << "\n";
    }
  }
  if (!repo) {
    git_clone_options options = GIT_CLONE_OPTIONS_INIT;
    options.fetch_opts.callbacks = Callbacks(&state);
    if (!request.ref.empty()) options.checkout_branch = request.ref.c_str();
    // The files are written below, by CheckoutFreshClone where it can.
    options.checkout_opts.checkout_strategy = GIT_CHECKOUT_NONE;
    git_repository* raw_repo = nullptr;
    if (int rc = git_clone(&raw_repo, request.url.c_str(), request.dir.c_str(), &options); rc < 0) {
      absl::Status status = TransferError(rc, absl::StrCat("clone ", request.url), state);
      if (rc == GIT_ENOTFOUND && !request.ref.empty()) {
        return absl::NotFoundError(absl::StrCat("clone ", request.url, ": no branch ", request.ref, " (", status.message(), ")"));
      }
      return status;
    }
    repo.reset(raw_repo);
  }
  // Two threads were ~5% faster than one on tmpfs and as fast on a (churned) ext4, where they
  // took twice the CPU in the kernel's inode allocation; more were not measured.
  const int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 2u));
  if (absl::Status fresh = CheckoutFreshClone(repo.get(), threads); absl::IsFailedPrecondition(fresh)) {
    std::cerr << "clone: " << fresh.message() << ": libgit2's checkout writes the files\n";
    git_checkout_options checkout = GIT_CHECKOUT_OPTIONS_INIT;
    checkout.checkout_strategy = GIT_CHECKOUT_SAFE;
    if (int rc = git_checkout_head(repo.get(), &checkout); rc < 0) {
      return GitErrorToStatus(rc, absl::StrCat("checkout of ", request.url, " into ", request.dir));
    }
  } else if (!fresh.ok()) {
    return absl::Status(fresh.code(), absl::StrCat("checkout of ", request.url, " into ", request.dir, ": ", fresh.message()));
  }
  SR_ASSIGN_OR_RETURN(std::string sha, Head(repo.get()));
  std::cerr << "clone: " << request.url << " -> " << request.dir << " at " << sha << "\n";
  return CloneResult{sha, false};
}

namespace {

// Whether the work tree differs from HEAD: changed, added or untracked files (ignored ones aside).
absl::StatusOr<bool> HasUncommittedChanges(git_repository* repo) {
  git_status_options options = GIT_STATUS_OPTIONS_INIT;
  options.show = GIT_STATUS_SHOW_INDEX_AND_WORKDIR;
  options.flags = GIT_STATUS_OPT_INCLUDE_UNTRACKED | GIT_STATUS_OPT_EXCLUDE_SUBMODULES;
  git_status_list* raw = nullptr;
  if (int rc = git_status_list_new(&raw, repo, &options); rc < 0) return GitErrorToStatus(rc, "status");
  StatusListPtr list(raw);
  return git_status_list_entrycount(list.get()) > 0;
}

// The first of `revisions` that names a commit; NOT_FOUND when none does.
absl::StatusOr<ObjectPtr> FirstCommit(git_repository* repo, const std::vector<std::string>& revisions) {
  for (const std::string& revision : revisions) {
    git_object* raw = nullptr;
    int rc = git_revparse_single(&raw, repo, absl::StrCat(revision, "^{commit}").c_str());
    if (rc == GIT_ENOTFOUND) continue;
    if (rc < 0) return GitErrorToStatus(rc, absl::StrCat("resolve ", revision));
    return ObjectPtr(raw);
  }
  return absl::NotFoundError("none of them");
}

}  // namespace

absl::StatusOr<BranchResult> CheckoutBranch(const std::string& dir, const std::string& name,
                                            const std::string& base) {
  SR_ASSIGN_OR_RETURN(RepositoryPtr repo, Open(dir));
  BranchResult result;
  absl::StatusOr<ObjectPtr> base_commit =
      FirstCommit(repo.get(), {absl::StrCat("refs/heads/", base), absl::StrCat("refs/remotes/origin/", base)});
  if (!base_commit.ok() && !absl::IsNotFound(base_commit.status())) return base_commit.status();
  git_reference* raw_branch = nullptr;
  int rc = git_branch_lookup(&raw_branch, repo.get(), name.c_str(), GIT_BRANCH_LOCAL);
  if (rc == GIT_ENOTFOUND) {
    // The branch on origin first: an earlier run's pushed work is continued, never forked.
    absl::StatusOr<ObjectPtr> on_origin = FirstCommit(repo.get(), {absl::StrCat("refs/remotes/origin/", name)});
    if (!on_origin.ok() && !absl::IsNotFound(on_origin.status())) return on_origin.status();
    git_object* start = on_origin.ok() ? on_origin->get() : base_commit.ok() ? base_commit->get() : nullptr;
    if (start == nullptr) return absl::NotFoundError(absl::StrCat("base branch ", base, " not found in ", dir));
    rc = git_branch_create(&raw_branch, repo.get(), name.c_str(), reinterpret_cast<git_commit*>(start), 0);
    if (rc < 0) return GitErrorToStatus(rc, absl::StrCat("create branch ", name));
    result.created = true;
  } else if (rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("look up branch ", name));
  }
  ReferencePtr branch(raw_branch);
  git_object* raw_target = nullptr;
  if (rc = git_reference_peel(&raw_target, branch.get(), GIT_OBJECT_COMMIT); rc < 0) {
    return GitErrorToStatus(rc, "peel branch");
  }
  ObjectPtr target(raw_target);
  // Resumed: the branch (from origin, or left here by an earlier run) carries work: commits that
  // its base does not have (not merely an older base), or changes not yet committed. A branch
  // with neither, as a run whose generate step failed leaves it, has nothing to resume: the
  // work is done again.
  size_t ahead = 0, behind = 0;
  if (base_commit.ok()) {
    if (rc = git_graph_ahead_behind(&ahead, &behind, repo.get(), git_object_id(target.get()),
                                    git_object_id(base_commit->get()));
        rc < 0) {
      return GitErrorToStatus(rc, absl::StrCat("compare ", name, " with ", base));
    }
  }
  SR_ASSIGN_OR_RETURN(bool uncommitted, HasUncommittedChanges(repo.get()));
  result.resumed = !base_commit.ok() || ahead > 0 || uncommitted;
  git_checkout_options checkout = GIT_CHECKOUT_OPTIONS_INIT;
  // SAFE: uncommitted work is never overwritten; a conflict is an error, not data loss.
  checkout.checkout_strategy = GIT_CHECKOUT_SAFE;
  if (rc = git_checkout_tree(repo.get(), target.get(), &checkout); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("check out ", name));
  }
  if (rc = git_repository_set_head(repo.get(), git_reference_name(branch.get())); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("set HEAD to ", name));
  }
  result.sha = OidToHex(*git_object_id(target.get()));
  return result;
}

absl::StatusOr<CommitResult> CommitAll(const std::string& dir, const std::string& message,
                                       const std::string& author_name, const std::string& author_email) {
  SR_ASSIGN_OR_RETURN(RepositoryPtr repo, Open(dir));
  git_index* raw_index = nullptr;
  if (int rc = git_repository_index(&raw_index, repo.get()); rc < 0) return GitErrorToStatus(rc, "open index");
  IndexPtr index(raw_index);
  // One pass over the work tree (git_status: stat per tracked file, plus the untracked ones,
  // .gitignore respected) finds what changed; only those paths are staged. add_all followed by
  // update_all would walk the tree twice.
  git_status_options options = GIT_STATUS_OPTIONS_INIT;
  options.show = GIT_STATUS_SHOW_WORKDIR_ONLY;
  options.flags = GIT_STATUS_OPT_INCLUDE_UNTRACKED | GIT_STATUS_OPT_RECURSE_UNTRACKED_DIRS |
                  GIT_STATUS_OPT_EXCLUDE_SUBMODULES | GIT_STATUS_OPT_DISABLE_PATHSPEC_MATCH;
  git_status_list* raw_status = nullptr;
  if (int rc = git_status_list_new(&raw_status, repo.get(), &options); rc < 0) {
    return GitErrorToStatus(rc, "list changes");
  }
  StatusListPtr changes(raw_status);
  for (size_t i = 0; i < git_status_list_entrycount(changes.get()); ++i) {
    const git_status_entry* entry = git_status_byindex(changes.get(), i);
    const git_diff_delta* delta = entry->index_to_workdir;
    if (delta == nullptr) continue;
    if (entry->status & GIT_STATUS_WT_DELETED) {
      if (int rc = git_index_remove_bypath(index.get(), delta->old_file.path); rc < 0) {
        return GitErrorToStatus(rc, absl::StrCat("stage deletion of ", delta->old_file.path));
      }
    } else if (int rc = git_index_add_bypath(index.get(), delta->new_file.path); rc < 0) {
      return GitErrorToStatus(rc, absl::StrCat("stage ", delta->new_file.path));
    }
  }
  if (int rc = git_index_write(index.get()); rc < 0) return GitErrorToStatus(rc, "write index");
  git_oid tree_oid;
  if (int rc = git_index_write_tree(&tree_oid, index.get()); rc < 0) return GitErrorToStatus(rc, "write tree");

  git_object* raw_head = nullptr;
  int head_rc = git_revparse_single(&raw_head, repo.get(), "HEAD^{commit}");
  ObjectPtr head(raw_head);
  if (head_rc < 0 && head_rc != GIT_ENOTFOUND) return GitErrorToStatus(head_rc, "resolve HEAD");
  if (head) {
    const git_oid* head_tree = git_commit_tree_id(reinterpret_cast<git_commit*>(head.get()));
    if (git_oid_equal(head_tree, &tree_oid)) {
      return CommitResult{false, OidToHex(*git_object_id(head.get()))};
    }
  }
  git_tree* raw_tree = nullptr;
  if (int rc = git_tree_lookup(&raw_tree, repo.get(), &tree_oid); rc < 0) return GitErrorToStatus(rc, "tree");
  TreePtr tree(raw_tree);
  git_signature* raw_sig = nullptr;
  if (int rc = git_signature_now(&raw_sig, author_name.c_str(), author_email.c_str()); rc < 0) {
    return GitErrorToStatus(rc, "author");
  }
  SignaturePtr sig(raw_sig);
  const git_commit* parents[1] = {reinterpret_cast<const git_commit*>(head.get())};
  std::string full_message = absl::StrCat(absl::StripTrailingAsciiWhitespace(message), "\n");
  git_oid commit;
  if (int rc = git_commit_create(&commit, repo.get(), "HEAD", sig.get(), sig.get(), nullptr, full_message.c_str(),
                                 tree.get(), head ? 1 : 0, parents);
      rc < 0) {
    return GitErrorToStatus(rc, "commit");
  }
  return CommitResult{true, OidToHex(commit)};
}

absl::Status Push(const std::string& dir, const std::string& branch, const std::string& token) {
  SR_ASSIGN_OR_RETURN(RepositoryPtr repo, Open(dir));
  git_reference* raw_ref = nullptr;
  if (int rc = git_branch_lookup(&raw_ref, repo.get(), branch.c_str(), GIT_BRANCH_LOCAL); rc < 0) {
    return rc == GIT_ENOTFOUND ? absl::NotFoundError(absl::StrCat("no local branch ", branch, " in ", dir))
                               : GitErrorToStatus(rc, "look up branch");
  }
  ReferencePtr ref(raw_ref);
  git_remote* raw_remote = nullptr;
  if (int rc = git_remote_lookup(&raw_remote, repo.get(), "origin"); rc < 0) return GitErrorToStatus(rc, "origin");
  RemotePtr remote(raw_remote);
  TransferState state{.token = token};
  if (git_repository_is_shallow(repo.get()) == 1) {
    // libgit2 1.5's push walks the history to choose what to send, and fails at the cut.
    const std::string url = git_remote_url(remote.get());
    if (!IsSmartHttpUrl(url)) {
      return absl::FailedPreconditionError(absl::StrCat(dir, " is a shallow clone, which can push only to an http(s) URL"));
    }
    absl::StatusOr<PushReport> report = PushFromShallow(repo.get(), {.url = url, .token = token}, branch);
    if (report.status() == NotFastForward(branch)) return report.status();  // it names the push already
    if (!report.ok()) {
      return absl::Status(report.status().code(), absl::StrCat("push ", branch, ": ", report.status().message()));
    }
    state.rejected = std::move(report->rejected);
    state.remote_messages = std::move(report->remote_messages);
  } else {
    git_push_options options = GIT_PUSH_OPTIONS_INIT;
    options.callbacks = Callbacks(&state);
    std::string refspec = absl::StrCat("refs/heads/", branch, ":refs/heads/", branch);
    char* specs[] = {refspec.data()};
    git_strarray refspecs = {specs, 1};
    if (int rc = git_remote_push(remote.get(), &refspecs, &options); rc < 0) {
      if (rc == GIT_ENONFASTFORWARD) return NotFastForward(branch);
      return TransferError(rc, absl::StrCat("push ", branch), state);
    }
  }
  if (!state.rejected.empty()) {
    std::string remote_said = WhatTheRemoteSaid(state.remote_messages);
    return absl::FailedPreconditionError(absl::StrCat(
        "the push of ", branch, " was refused by the forge (", absl::StrJoin(state.rejected, "; "), ")",
        remote_said.empty() ? "" : absl::StrCat("; the remote said: ", remote_said)));
  }
  std::cerr << "push: " << branch << " -> origin\n";
  return absl::OkStatus();
}

}  // namespace step_runner::catalog

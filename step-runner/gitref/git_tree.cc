#include "step-runner/gitref/git_tree.h"

#include <fcntl.h>
#include <git2.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"
#include "step-runner/base/sha256.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::gitref {
namespace {

absl::Status GitError(absl::string_view what) {
  const git_error* e = git_error_last();
  return absl::FailedPreconditionError(absl::StrCat(what, ": ", e && e->message ? e->message : "unknown libgit2 error"));
}

// Owns one libgit2 object.
template <typename T, void (*Free)(T*)>
struct GitPtr {
  T* p = nullptr;
  ~GitPtr() {
    if (p) Free(p);
  }
};

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

absl::StatusOr<std::string> FetchGitTree(const std::string& cache_dir, const std::string& url, const std::string& rev) {
  if (cache_dir.empty()) return absl::FailedPreconditionError("git steps need a cache folder");
  static std::once_flag once;
  std::call_once(once, [] { git_libgit2_init(); });
  const std::string key = Sha256Hex(url).substr(0, 32);
  const std::string repo_dir = absl::StrCat(cache_dir, "/repos/", key, ".git");
  SR_RETURN_IF_ERROR(MakeDirs(cache_dir + "/repos", 0700));
  SR_RETURN_IF_ERROR(MakeDirs(cache_dir + "/trees", 0700));

  UniqueFd lock(::open(absl::StrCat(repo_dir, ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock.valid() || ::flock(lock.get(), LOCK_EX) != 0) {
    return absl::InternalError(absl::StrCat("cannot lock the git cache for ", url));
  }

  GitPtr<git_repository, git_repository_free> repo;
  if (IsDir(repo_dir)) {
    if (git_repository_open_bare(&repo.p, repo_dir.c_str()) != 0) return GitError("opening the git cache");
  } else if (git_repository_init(&repo.p, repo_dir.c_str(), /*is_bare=*/1) != 0) {
    return GitError("creating the git cache");
  }

  // A full commit id that is already here needs no network.
  auto resolve = [&]() -> std::optional<std::string> {
    for (const std::string& spec : {absl::StrCat("refs/remotes/origin/", rev), absl::StrCat("refs/tags/", rev), rev}) {
      GitPtr<git_object, git_object_free> obj;
      if (git_revparse_single(&obj.p, repo.p, spec.c_str()) != 0) continue;
      GitPtr<git_object, git_object_free> commit;
      if (git_object_peel(&commit.p, obj.p, GIT_OBJECT_COMMIT) != 0) continue;
      return std::string(git_oid_tostr_s(git_object_id(commit.p)));
    }
    return std::nullopt;
  };
  std::optional<std::string> sha;
  if (rev.size() == 40) sha = resolve();
  if (!sha) {
    GitPtr<git_remote, git_remote_free> remote;
    if (git_remote_create_anonymous(&remote.p, repo.p, url.c_str()) != 0) return GitError(absl::StrCat("git step ", url));
    git_fetch_options fetch = GIT_FETCH_OPTIONS_INIT;
    fetch.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_ALL;
    char heads[] = "+refs/heads/*:refs/remotes/origin/*";
    char tags[] = "+refs/tags/*:refs/tags/*";
    char* specs[] = {heads, tags};
    git_strarray refspecs = {specs, 2};
    if (git_remote_fetch(remote.p, &refspecs, &fetch, nullptr) != 0) {
      return GitError(absl::StrCat("fetching the git step ", url));
    }
    sha = resolve();
  }
  if (!sha) {
    return absl::NotFoundError(absl::StrCat("git step ", url, ": revision \"", rev,
                                            "\" does not exist (no such branch, tag or commit)"));
  }

  const std::string tree_dir = absl::StrCat(cache_dir, "/trees/", *sha);
  if (IsDir(tree_dir)) return tree_dir;
  // Checked out beside, then published by rename: a reader sees a whole tree or none.
  const std::string tmp = absl::StrCat(tree_dir, ".tmp-", ::getpid());
  (void)RemoveTree(tmp);
  SR_RETURN_IF_ERROR(MakeDirs(tmp, 0700));
  GitPtr<git_object, git_object_free> commit;
  git_oid oid;
  if (git_oid_fromstr(&oid, sha->c_str()) != 0 || git_object_lookup(&commit.p, repo.p, &oid, GIT_OBJECT_COMMIT) != 0) {
    return GitError("reading the fetched commit");
  }
  git_checkout_options checkout = GIT_CHECKOUT_OPTIONS_INIT;
  checkout.checkout_strategy = GIT_CHECKOUT_FORCE;
  checkout.target_directory = tmp.c_str();
  if (git_checkout_tree(repo.p, commit.p, &checkout) != 0) {
    absl::Status error = GitError(absl::StrCat("checking out ", url, "@", rev));
    (void)RemoveTree(tmp);
    return error;
  }
  if (::rename(tmp.c_str(), tree_dir.c_str()) != 0) {
    (void)RemoveTree(tmp);
    if (!IsDir(tree_dir)) return absl::InternalError(absl::StrCat("cannot publish ", tree_dir));
  }
  return tree_dir;
}

}  // namespace step_runner::gitref

#include "step-runner/engine/loader.h"

#include <fcntl.h>
#include <git2.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cerrno>
#include <cstdio>
#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::engine {
namespace {

// A password in a git URL's user info (https://user:TOKEN@host/...) never reaches a message:
// messages go to the log, the result tree and the gateway's model.
absl::Status WithoutUrlPassword(const absl::Status& status, const std::string& url) {
  const size_t scheme = url.find("://");
  if (scheme == std::string::npos) return status;
  const size_t at = url.find('@', scheme + 3);
  const size_t colon = url.find(':', scheme + 3);
  if (at == std::string::npos || colon == std::string::npos || colon > at || url.find('/', scheme + 3) < at) {
    return status;
  }
  const std::string password = url.substr(colon + 1, at - colon - 1);
  if (password.empty()) return status;
  return absl::Status(status.code(), absl::StrReplaceAll(status.message(), {{password, "[MASKED]"}}));
}

std::string Sha256Hex(absl::string_view input) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(input.data(), input.size(), digest, &length, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) absl::StrAppendFormat(&hex, "%02x", digest[i]);
  return hex;
}

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

// One in-process lock per repository, besides the lock file that other processes honour.
absl::Mutex& RepoMutex(const std::string& key) {
  static absl::Mutex map_mu;
  static auto* mutexes = new std::map<std::string, std::unique_ptr<absl::Mutex>>();
  absl::MutexLock lock(&map_mu);
  auto& slot = (*mutexes)[key];
  if (!slot) slot = std::make_unique<absl::Mutex>();
  return *slot;
}

}  // namespace

StepLoader::StepLoader(LoaderOptions options) : options_(std::move(options)) {
  static std::once_flag once;
  std::call_once(once, [] { git_libgit2_init(); });
}

absl::StatusOr<LoadedStep> StepLoader::LoadFile(const std::string& path, const std::string& source) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("step ", source, " not found: no file ", path));
  }
  if (S_ISDIR(st.st_mode)) return LoadFile(path + "/step.yml", source);
  if (static_cast<size_t>(st.st_size) > steps::kMaxStepFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("step ", source, ": ", path, " is ", st.st_size,
                                                   " bytes; the limit is ", steps::kMaxStepFileBytes));
  }
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  SR_ASSIGN_OR_RETURN(steps::StepFile file, steps::ParseStepFile(text, path));
  char real[PATH_MAX];
  std::string real_path = ::realpath(path.c_str(), real) ? std::string(real) : path;
  size_t slash = real_path.rfind('/');
  return LoadedStep{std::make_shared<const steps::StepFile>(std::move(file)),
                    slash == std::string::npos ? "." : real_path.substr(0, slash), source, real_path};
}

absl::StatusOr<LoadedStep> StepLoader::Load(const steps::StepReference& ref, const std::string& from_dir) {
  using Kind = steps::StepReference::Kind;
  switch (ref.kind) {
    case Kind::kLocal: {
      std::string path = absl::StartsWith(ref.path, "/") ? ref.path : absl::StrCat(from_dir, "/", ref.path);
      if (!absl::EndsWith(path, ".yml") && !absl::EndsWith(path, ".yaml")) path += "/step.yml";
      return LoadFile(path, ref.text);
    }
    case Kind::kDist: {
      if (options_.catalog_dir.empty()) {
        return absl::NotFoundError(absl::StrCat("step ", ref.text, ": this step-runner has no catalog"));
      }
      return LoadFile(absl::StrCat(options_.catalog_dir, "/", ref.path, "/step.yml"), ref.text);
    }
    case Kind::kGit: {
      absl::StatusOr<std::string> fetched = GitTree(ref.git_url, ref.git_rev);
      if (!fetched.ok()) return WithoutUrlPassword(fetched.status(), ref.git_url);
      const std::string& tree = *fetched;
      if (absl::StrContains(ref.git_dir, "..") || absl::StrContains(ref.git_file, "..")) {
        return absl::InvalidArgumentError(absl::StrCat("step ", ref.text, ": dir and file cannot hold \"..\""));
      }
      std::string dir = ref.git_dir.empty() ? tree : absl::StrCat(tree, "/", ref.git_dir);
      return LoadFile(absl::StrCat(dir, "/", ref.git_file), ref.text);
    }
    case Kind::kDynamic:
      break;
  }
  return absl::InternalError(absl::StrCat("step ", ref.text, ": a dynamic reference must be expanded first"));
}

absl::StatusOr<std::string> StepLoader::GitTree(const std::string& url, const std::string& rev) {
  if (options_.cache_dir.empty()) return absl::FailedPreconditionError("git steps need a cache folder");
  const std::string key = Sha256Hex(url).substr(0, 32);
  const std::string repo_dir = absl::StrCat(options_.cache_dir, "/repos/", key, ".git");
  SR_RETURN_IF_ERROR(MakeDirs(options_.cache_dir + "/repos", 0700));
  SR_RETURN_IF_ERROR(MakeDirs(options_.cache_dir + "/trees", 0700));

  absl::MutexLock in_process(&RepoMutex(key));
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

  const std::string tree_dir = absl::StrCat(options_.cache_dir, "/trees/", *sha);
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

}  // namespace step_runner::engine

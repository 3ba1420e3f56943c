#include "steps-catalog/helper/fresh_checkout.h"

#include <fcntl.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "step-runner/base/files.h"
#include "step-runner/base/unique_fd.h"
#include "steps-catalog/helper/git_util.h"

namespace step_runner::catalog {
namespace {

using BlobPtr = GitPtr<git_blob, git_blob_free>;

struct PlannedFile {
  std::string path;  // relative to the work tree
  git_oid id;
  git_filemode_t mode;
  struct stat st = {};  // once written
};

struct Plan {
  std::vector<std::string> dirs;  // parents before children (the walk is pre-order)
  std::vector<PlannedFile> files;
  std::string refused;  // why this tree is left to libgit2's checkout
};

bool GitRefusesName(const char* name) {
  return name[0] == '\0' || std::strcmp(name, ".") == 0 || std::strcmp(name, "..") == 0 ||
         std::strchr(name, '/') != nullptr || ::strcasecmp(name, ".git") == 0;
}

int Visit(const char* root, const git_tree_entry* entry, void* payload) {
  auto* plan = static_cast<Plan*>(payload);
  const char* name = git_tree_entry_name(entry);
  std::string path = absl::StrCat(root, name);
  if (GitRefusesName(name)) {
    plan->refused = absl::StrCat("the tree holds a name git refuses (\"", path, "\")");
    return -1;
  }
  if (std::strcmp(name, ".gitattributes") == 0) {
    plan->refused = absl::StrCat("the tree has attributes (", path, ")");
    return -1;
  }
  const git_filemode_t mode = git_tree_entry_filemode(entry);
  switch (mode) {
    case GIT_FILEMODE_TREE:
      plan->dirs.push_back(std::move(path));
      return 0;
    case GIT_FILEMODE_BLOB:
    case GIT_FILEMODE_BLOB_EXECUTABLE:
    case GIT_FILEMODE_LINK:
      plan->files.push_back({.path = std::move(path), .id = *git_tree_entry_id(entry), .mode = mode});
      return 0;
    default:
      plan->refused = absl::StrCat("the tree has a submodule (", path, ")");
      return -1;
  }
}

absl::Status WriteFile(git_repository* repo, const std::string& workdir, bool filtered, PlannedFile& file) {
  git_blob* raw_blob = nullptr;
  if (int rc = git_blob_lookup(&raw_blob, repo, &file.id); rc < 0) return GitErrorToStatus(rc, file.path);
  BlobPtr blob(raw_blob);
  const std::string full = workdir + file.path;
  if (file.mode == GIT_FILEMODE_LINK) {
    const std::string target(static_cast<const char*>(git_blob_rawcontent(blob.get())),
                             static_cast<size_t>(git_blob_rawsize(blob.get())));
    if (::symlink(target.c_str(), full.c_str()) != 0) return ErrnoStatus(errno, absl::StrCat("symlink(", full, ")"));
    if (::lstat(full.c_str(), &file.st) != 0) return ErrnoStatus(errno, absl::StrCat("lstat(", full, ")"));
    return absl::OkStatus();
  }
  git_buf content = GIT_BUF_INIT;
  absl::string_view bytes(static_cast<const char*>(git_blob_rawcontent(blob.get())),
                          static_cast<size_t>(git_blob_rawsize(blob.get())));
  if (filtered) {
    git_blob_filter_options options = GIT_BLOB_FILTER_OPTIONS_INIT;
    if (int rc = git_blob_filter(&content, blob.get(), file.path.c_str(), &options); rc < 0) {
      git_buf_dispose(&content);
      return GitErrorToStatus(rc, absl::StrCat("filter ", file.path));
    }
    bytes = absl::string_view(content.ptr, content.size);
  }
  // Modes as git writes them (the umask applies); O_EXCL: the work tree was empty.
  UniqueFd fd(::open(full.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                     file.mode == GIT_FILEMODE_BLOB_EXECUTABLE ? 0777 : 0666));
  absl::Status written = fd ? WriteAll(fd.get(), bytes) : ErrnoStatus(errno, absl::StrCat("open(", full, ")"));
  git_buf_dispose(&content);
  if (!written.ok()) return written;
  if (::fstat(fd.get(), &file.st) != 0) return ErrnoStatus(errno, absl::StrCat("fstat(", full, ")"));
  return absl::OkStatus();
}

// Whether a filter may change how a blob is written, with no .gitattributes in the tree: the
// configuration (core.autocrlf) or an attributes file outside it (the repository's
// info/attributes, core.attributesFile, the XDG one, the system one). When nothing can, the
// blobs are written as they are: libgit2's per-file attribute lookup (path resolution and
// stats) cost ~40 us of CPU a file here.
bool FiltersMayApply(git_repository* repo, git_config* config) {
  const char* value = nullptr;
  if (git_config_get_string(&value, config, "core.autocrlf") == 0 && std::strcmp(value, "false") != 0) return true;
  if (git_config_get_string(&value, config, "core.attributesFile") == 0) return true;
  if (PathExists(absl::StrCat(git_repository_path(repo), "info/attributes"))) return true;
  if (const char* xdg = std::getenv("XDG_CONFIG_HOME"); xdg && *xdg && PathExists(absl::StrCat(xdg, "/git/attributes"))) return true;
  if (const char* home = std::getenv("HOME"); home && *home && PathExists(absl::StrCat(home, "/.config/git/attributes"))) return true;
  git_buf system = GIT_BUF_INIT;
  bool found = false;
  if (git_libgit2_opts(GIT_OPT_GET_SEARCH_PATH, GIT_CONFIG_LEVEL_SYSTEM, &system) < 0) return true;
  for (absl::string_view dir : absl::StrSplit(absl::string_view(system.ptr, system.size), GIT_PATH_LIST_SEPARATOR)) {
    if (!dir.empty() && PathExists(absl::StrCat(dir, "/gitattributes"))) found = true;
  }
  git_buf_dispose(&system);
  return found;
}

git_index_entry IndexEntry(const PlannedFile& file) {
  git_index_entry entry = {};
  entry.ctime.seconds = static_cast<int32_t>(file.st.st_ctim.tv_sec);
  entry.ctime.nanoseconds = static_cast<uint32_t>(file.st.st_ctim.tv_nsec);
  entry.mtime.seconds = static_cast<int32_t>(file.st.st_mtim.tv_sec);
  entry.mtime.nanoseconds = static_cast<uint32_t>(file.st.st_mtim.tv_nsec);
  entry.dev = static_cast<uint32_t>(file.st.st_dev);
  entry.ino = static_cast<uint32_t>(file.st.st_ino);
  entry.mode = file.mode;
  entry.uid = file.st.st_uid;
  entry.gid = file.st.st_gid;
  entry.file_size = static_cast<uint32_t>(file.st.st_size);  // truncated, as git does
  entry.id = file.id;
  entry.path = file.path.c_str();
  return entry;
}

}  // namespace

absl::Status CheckoutFreshClone(git_repository* repo, int threads) {
  const char* workdir_c = git_repository_workdir(repo);
  if (workdir_c == nullptr) return absl::FailedPreconditionError("the repository is bare");
  const std::string workdir = workdir_c;  // ends with '/'
  git_object* raw_tree = nullptr;
  int rc = git_revparse_single(&raw_tree, repo, "HEAD^{tree}");
  if (rc == GIT_ENOTFOUND || rc == GIT_EUNBORNBRANCH) return absl::OkStatus();  // an empty repository
  if (rc < 0) return GitErrorToStatus(rc, "HEAD's tree");
  ObjectPtr tree(raw_tree);

  git_config* raw_config = nullptr;
  if (rc = git_repository_config_snapshot(&raw_config, repo); rc < 0) return GitErrorToStatus(rc, "the configuration");
  ConfigPtr config(raw_config);
  Plan plan;
  rc = git_tree_walk(reinterpret_cast<git_tree*>(tree.get()), GIT_TREEWALK_PRE, Visit, &plan);
  if (!plan.refused.empty()) return absl::FailedPreconditionError(plan.refused);
  if (rc < 0) return GitErrorToStatus(rc, "walking HEAD's tree");

  // A filesystem without symlinks (libgit2 sets core.symlinks=false when it finds one at clone
  // time) gets them as plain files from libgit2's checkout.
  if (int symlinks = 1; git_config_get_bool(&symlinks, config.get(), "core.symlinks") == 0 && !symlinks &&
                        std::any_of(plan.files.begin(), plan.files.end(),
                                    [](const PlannedFile& f) { return f.mode == GIT_FILEMODE_LINK; })) {
    return absl::FailedPreconditionError("the tree has symlinks and core.symlinks is false");
  }
  for (const std::string& dir : plan.dirs) {
    const std::string full = workdir + dir;
    if (::mkdir(full.c_str(), 0777) != 0) return ErrnoStatus(errno, absl::StrCat("mkdir(", full, ")"));
  }

  // Each thread reads blobs through a repository of its own: libgit2's objects are not shared
  // across threads.
  const bool filtered = FiltersMayApply(repo, config.get());
  std::atomic<size_t> next{0};
  std::vector<absl::Status> errors(static_cast<size_t>(std::max(threads, 1)));
  auto work = [&](size_t worker) {
    git_repository* raw_own = nullptr;
    if (int open_rc = git_repository_open(&raw_own, git_repository_path(repo)); open_rc < 0) {
      errors[worker] = GitErrorToStatus(open_rc, "opening the clone");
      next = plan.files.size();
      return;
    }
    RepositoryPtr own(raw_own);
    for (size_t i; (i = next.fetch_add(1)) < plan.files.size();) {
      if (absl::Status s = WriteFile(own.get(), workdir, filtered, plan.files[i]); !s.ok()) {
        errors[worker] = std::move(s);
        next = plan.files.size();  // the others stop too
        return;
      }
    }
  };
  std::vector<std::thread> helpers;
  for (size_t worker = 1; worker < errors.size(); ++worker) helpers.emplace_back(work, worker);
  work(0);
  for (std::thread& helper : helpers) helper.join();
  for (const absl::Status& error : errors) {
    if (!error.ok()) return error;
  }

  // A new index, not the one the clone may have written: libgit2 treats every entry not older
  // than the index file it read as "racily clean" and hashes the file again when it writes
  // the index, which for a fresh clone is every file (~0.5 s of a 10,000-file clone).
  const std::string index_path = absl::StrCat(git_repository_path(repo), "index");
  if (::unlink(index_path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoStatus(errno, absl::StrCat("unlink(", index_path, ")"));
  }
  git_index* raw_index = nullptr;
  if (rc = git_index_open(&raw_index, index_path.c_str()); rc < 0) return GitErrorToStatus(rc, "the index");
  IndexPtr index(raw_index);
  for (const PlannedFile& file : plan.files) {
    const git_index_entry entry = IndexEntry(file);
    if (rc = git_index_add(index.get(), &entry); rc < 0) return GitErrorToStatus(rc, absl::StrCat("indexing ", file.path));
  }
  if (rc = git_index_write(index.get()); rc < 0) return GitErrorToStatus(rc, "writing the index");
  return absl::OkStatus();
}

}  // namespace step_runner::catalog

#include "tests/forge/forge_git.h"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/process/subprocess.h"
#include "steps-catalog/helper/git_util.h"

extern char** environ;

namespace step_runner::forge {
namespace {

using catalog::GitErrorToStatus;

constexpr char kPreReceiveHook[] = R"(#!/bin/sh
# Installed by sr-forge: main is a protected branch, as on GitLab.
while read old new ref; do
  if [ "$ref" = "refs/heads/main" ]; then
    echo "GitLab: You are not allowed to push code to protected branches on this project." >&2
    exit 1
  fi
done
exit 0
)";

// Writes every file under `dir` as blobs into a tree, recursing into folders.
absl::StatusOr<git_oid> BuildTree(git_repository* repo, const std::string& dir) {
  git_treebuilder* raw_builder = nullptr;
  if (int rc = git_treebuilder_new(&raw_builder, repo, nullptr); rc < 0) {
    return GitErrorToStatus(rc, "git_treebuilder_new");
  }
  catalog::TreeBuilderPtr builder(raw_builder);
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus(errno, absl::StrCat("opendir(", dir, ")"));
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(d)) {
    std::string name = entry->d_name;
    if (name == "." || name == ".." || name == ".git" || name == "__pycache__" || name == "test-results") continue;
    names.push_back(name);
  }
  ::closedir(d);
  for (const std::string& name : names) {
    std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat(", path, ")"));
    git_oid oid;
    git_filemode_t mode;
    if (S_ISDIR(st.st_mode)) {
      SR_ASSIGN_OR_RETURN(oid, BuildTree(repo, path));
      mode = GIT_FILEMODE_TREE;
    } else {
      SR_ASSIGN_OR_RETURN(std::string content, ReadFile(path));
      if (int rc = git_blob_create_from_buffer(&oid, repo, content.data(), content.size()); rc < 0) {
        return GitErrorToStatus(rc, "git_blob_create_from_buffer");
      }
      mode = (st.st_mode & 0111) ? GIT_FILEMODE_BLOB_EXECUTABLE : GIT_FILEMODE_BLOB;
    }
    if (int rc = git_treebuilder_insert(nullptr, builder.get(), name.c_str(), &oid, mode); rc < 0) {
      return GitErrorToStatus(rc, "git_treebuilder_insert");
    }
  }
  git_oid tree;
  if (int rc = git_treebuilder_write(&tree, builder.get()); rc < 0) {
    return GitErrorToStatus(rc, "git_treebuilder_write");
  }
  return tree;
}

absl::StatusOr<catalog::RepositoryPtr> OpenBare(const std::string& bare_dir) {
  catalog::EnsureLibgit2();
  git_repository* repo = nullptr;
  if (int rc = git_repository_open_bare(&repo, bare_dir.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("open ", bare_dir));
  }
  return catalog::RepositoryPtr(repo);
}

absl::StatusOr<catalog::CommitPtr> BranchCommit(git_repository* repo, const std::string& branch) {
  git_object* obj = nullptr;
  if (int rc = git_revparse_single(&obj, repo, absl::StrCat("refs/heads/", branch, "^{commit}").c_str()); rc < 0) {
    if (rc == GIT_ENOTFOUND) return absl::NotFoundError(absl::StrCat("branch ", branch, " not found"));
    return GitErrorToStatus(rc, absl::StrCat("resolve ", branch));
  }
  return catalog::CommitPtr(reinterpret_cast<git_commit*>(obj));
}

}  // namespace

namespace {

absl::StatusOr<catalog::RepositoryPtr> InitBare(const std::string& bare_dir) {
  catalog::EnsureLibgit2();
  git_repository_init_options options = GIT_REPOSITORY_INIT_OPTIONS_INIT;
  options.flags = GIT_REPOSITORY_INIT_BARE | GIT_REPOSITORY_INIT_MKPATH;
  options.initial_head = "main";
  git_repository* raw_repo = nullptr;
  if (int rc = git_repository_init_ext(&raw_repo, bare_dir.c_str(), &options); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("init ", bare_dir));
  }
  catalog::RepositoryPtr repo(raw_repo);
  git_config* raw_config = nullptr;
  if (int rc = git_repository_config(&raw_config, repo.get()); rc < 0) return GitErrorToStatus(rc, "config");
  catalog::ConfigPtr config(raw_config);
  if (int rc = git_config_set_bool(config.get(), "http.receivepack", 1); rc < 0) return GitErrorToStatus(rc, "config");
  if (int rc = git_config_set_bool(config.get(), "receive.denyNonFastForwards", 1); rc < 0) {
    return GitErrorToStatus(rc, "config");
  }
  return repo;
}

}  // namespace

absl::Status InitBareRepository(const std::string& bare_dir) { return InitBare(bare_dir).status(); }

absl::Status SeedBareRepository(const std::string& source_dir, const std::string& bare_dir) {
  SR_ASSIGN_OR_RETURN(catalog::RepositoryPtr repo, InitBare(bare_dir));
  SR_ASSIGN_OR_RETURN(git_oid tree_oid, BuildTree(repo.get(), source_dir));
  git_tree* raw_tree = nullptr;
  if (int rc = git_tree_lookup(&raw_tree, repo.get(), &tree_oid); rc < 0) return GitErrorToStatus(rc, "tree");
  catalog::TreePtr tree(raw_tree);
  git_signature* raw_sig = nullptr;
  // 2026-01-01T00:00:00Z: a fixed date, so the seed commit's sha is the same on every run.
  if (int rc = git_signature_new(&raw_sig, "Forge Seed", "seed@forge.local", 1767225600, 0); rc < 0) {
    return GitErrorToStatus(rc, "signature");
  }
  catalog::SignaturePtr sig(raw_sig);
  git_oid commit;
  if (int rc = git_commit_create(&commit, repo.get(), "refs/heads/main", sig.get(), sig.get(), nullptr,
                                 "Initial commit\n", tree.get(), 0, nullptr);
      rc < 0) {
    return GitErrorToStatus(rc, "commit");
  }
  SR_RETURN_IF_ERROR(MakeDirs(bare_dir + "/hooks", 0755));
  return WriteFileAtomically(bare_dir + "/hooks/pre-receive", kPreReceiveHook, 0755);
}

absl::StatusOr<BranchInfo> ReadBranch(const std::string& bare_dir, const std::string& branch) {
  SR_ASSIGN_OR_RETURN(catalog::RepositoryPtr repo, OpenBare(bare_dir));
  SR_ASSIGN_OR_RETURN(catalog::CommitPtr commit, BranchCommit(repo.get(), branch));
  BranchInfo info;
  info.sha = catalog::OidToHex(*git_commit_id(commit.get()));
  info.message = git_commit_message(commit.get());
  info.title = std::string(absl::StripAsciiWhitespace(info.message.substr(0, info.message.find('\n'))));
  info.author_name = git_commit_author(commit.get())->name;
  return info;
}

absl::StatusOr<std::vector<FileChange>> DiffBranches(const std::string& bare_dir, const std::string& target,
                                                     const std::string& source) {
  SR_ASSIGN_OR_RETURN(catalog::RepositoryPtr repo, OpenBare(bare_dir));
  SR_ASSIGN_OR_RETURN(catalog::CommitPtr target_commit, BranchCommit(repo.get(), target));
  SR_ASSIGN_OR_RETURN(catalog::CommitPtr source_commit, BranchCommit(repo.get(), source));
  git_oid base_oid;
  if (int rc = git_merge_base(&base_oid, repo.get(), git_commit_id(target_commit.get()),
                              git_commit_id(source_commit.get()));
      rc < 0) {
    return GitErrorToStatus(rc, "merge base");
  }
  git_commit* raw_base = nullptr;
  if (int rc = git_commit_lookup(&raw_base, repo.get(), &base_oid); rc < 0) return GitErrorToStatus(rc, "base");
  catalog::CommitPtr base(raw_base);
  git_tree *raw_old = nullptr, *raw_new = nullptr;
  if (int rc = git_commit_tree(&raw_old, base.get()); rc < 0) return GitErrorToStatus(rc, "tree");
  catalog::TreePtr old_tree(raw_old);
  if (int rc = git_commit_tree(&raw_new, source_commit.get()); rc < 0) return GitErrorToStatus(rc, "tree");
  catalog::TreePtr new_tree(raw_new);
  git_diff* raw_diff = nullptr;
  if (int rc = git_diff_tree_to_tree(&raw_diff, repo.get(), old_tree.get(), new_tree.get(), nullptr); rc < 0) {
    return GitErrorToStatus(rc, "diff");
  }
  catalog::DiffPtr diff(raw_diff);
  std::vector<FileChange> changes;
  for (size_t i = 0; i < git_diff_num_deltas(diff.get()); ++i) {
    const git_diff_delta* delta = git_diff_get_delta(diff.get(), i);
    FileChange change;
    change.old_path = delta->old_file.path;
    change.new_path = delta->new_file.path;
    change.new_file = delta->status == GIT_DELTA_ADDED;
    change.deleted_file = delta->status == GIT_DELTA_DELETED;
    git_patch* raw_patch = nullptr;
    if (int rc = git_patch_from_diff(&raw_patch, diff.get(), i); rc < 0) return GitErrorToStatus(rc, "patch");
    catalog::PatchPtr patch(raw_patch);
    git_buf buf = GIT_BUF_INIT;
    if (int rc = git_patch_to_buf(&buf, patch.get()); rc < 0) return GitErrorToStatus(rc, "patch text");
    std::string text(buf.ptr, buf.size);
    git_buf_dispose(&buf);
    // GitLab's `diff` field starts at the first hunk; the file header lives in the other fields.
    size_t hunk = text.find("\n@@");
    change.diff = hunk == std::string::npos ? "" : text.substr(hunk + 1);
    changes.push_back(std::move(change));
  }
  return changes;
}

absl::StatusOr<CgiResponse> ParseCgiOutput(absl::string_view output) {
  CgiResponse response;
  for (;;) {
    size_t eol = output.find('\n');
    if (eol == absl::string_view::npos) return absl::InternalError("CGI output ended inside its headers");
    absl::string_view line = absl::StripSuffix(output.substr(0, eol), "\r");
    output.remove_prefix(eol + 1);
    if (line.empty()) break;
    size_t colon = line.find(':');
    if (colon == absl::string_view::npos) {
      return absl::InternalError(absl::StrCat("malformed CGI header: ", line));
    }
    std::string name(absl::StripAsciiWhitespace(line.substr(0, colon)));
    std::string value(absl::StripAsciiWhitespace(line.substr(colon + 1)));
    if (absl::EqualsIgnoreCase(name, "Status")) {
      if (!absl::SimpleAtoi(value.substr(0, value.find(' ')), &response.status)) {
        return absl::InternalError(absl::StrCat("malformed CGI status: ", value));
      }
    } else {
      response.headers.emplace(std::move(name), std::move(value));
    }
  }
  response.body = std::string(output);
  return response;
}

absl::StatusOr<CgiResponse> RunGitHttpBackend(const std::string& project_root, const CgiRequest& request,
                                              int timeout_seconds) {
  std::vector<std::string> env = {
      absl::StrCat("GIT_PROJECT_ROOT=", project_root),
      "GIT_HTTP_EXPORT_ALL=1",
      // No user or system config may change what the forge serves.
      "GIT_CONFIG_NOSYSTEM=1",
      absl::StrCat("HOME=", project_root),
      absl::StrCat("REMOTE_USER=", request.remote_user),
      "REMOTE_ADDR=127.0.0.1",
      absl::StrCat("REQUEST_METHOD=", request.method),
      absl::StrCat("QUERY_STRING=", request.query),
      absl::StrCat("PATH_INFO=", request.path_info),
      absl::StrCat("CONTENT_TYPE=", request.content_type),
      "GATEWAY_INTERFACE=CGI/1.1",
  };
  if (request.body_fd >= 0) env.push_back(absl::StrCat("CONTENT_LENGTH=", request.body_size));
  if (!request.git_protocol.empty()) env.push_back(absl::StrCat("HTTP_GIT_PROTOCOL=", request.git_protocol));
  for (char** e = environ; *e != nullptr; ++e) {
    if (absl::StartsWith(*e, "PATH=")) env.push_back(*e);
  }
  SR_ASSIGN_OR_RETURN(process::OutputPipe out, process::MakeOutputPipe());
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = {"git", "http-backend"},
                                                  .env = env,
                                                  .stdout_fd = out.write_end.get(),
                                                  .stderr_fd = process::kInheritFd,
                                                  .stdin_fd = request.body_fd}));
  out.write_end.Close();
  std::string output;
  absl::Time deadline = absl::Now() + absl::Seconds(timeout_seconds);
  char buf[65536];
  for (;;) {
    int remaining = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (remaining <= 0) {
      (void)child.SignalGroup(SIGKILL);
      (void)child.Reap();
      return absl::DeadlineExceededError("git http-backend did not finish in time");
    }
    pollfd pfd{.fd = out.read_end.get(), .events = POLLIN};
    if (::poll(&pfd, 1, remaining) <= 0) continue;
    ssize_t n = ::read(out.read_end.get(), buf, sizeof buf);
    if (n > 0) {
      output.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno != EAGAIN && errno != EINTR) {
      return ErrnoStatus(errno, "read(git http-backend)");
    }
  }
  // Its stdout is closed, so it is exiting; the deadline still bounds a stuck child.
  pollfd pfd{.fd = child.pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, std::max<int>(0, static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now())))) <= 0) {
    (void)child.SignalGroup(SIGKILL);
  }
  SR_ASSIGN_OR_RETURN(int code, child.Reap());
  absl::StatusOr<CgiResponse> response = ParseCgiOutput(output);
  if (!response.ok()) {
    return absl::InternalError(absl::StrCat("git http-backend exited with ", code, ": ", response.status().message()));
  }
  return response;
}

}  // namespace step_runner::forge

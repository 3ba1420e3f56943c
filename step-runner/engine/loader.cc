#include "step-runner/engine/loader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cerrno>
#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/process/subprocess.h"

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

}  // namespace

namespace {

// A folder's step file: step.yml, or func.yml (GitLab Functions' name for it) when only that is
// there.
std::string StepFileIn(const std::string& dir) {
  const std::string step = dir + "/step.yml";
  const std::string func = dir + "/func.yml";
  struct stat st;
  if (::stat(step.c_str(), &st) != 0 && ::stat(func.c_str(), &st) == 0) return func;
  return step;
}

}  // namespace

StepLoader::StepLoader(LoaderOptions options) : options_(std::move(options)) {
  if (options_.git_helper.empty()) options_.git_helper = OwnBinaryDir() + "/step-runner-git";
}

absl::StatusOr<LoadedStep> StepLoader::LoadFile(const std::string& path, const std::string& source) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("step ", source, " not found: no file ", path,
                                            absl::EndsWith(path, "/step.yml") ? " (nor func.yml)" : ""));
  }
  if (S_ISDIR(st.st_mode)) return LoadFile(StepFileIn(path), source);
  if (static_cast<size_t>(st.st_size) > steps::kMaxStepFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("step ", source, ": ", path, " is ", st.st_size,
                                                   " bytes; the limit is ", steps::kMaxStepFileBytes));
  }
  // Step files in a work tree are the steps' to change while the job runs: a FIFO must not hold
  // the job, nor a file that grows while it is read take the daemon's memory.
  SR_ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, steps::kMaxStepFileBytes, /*follow_links=*/true,
                                                        absl::StrCat("step ", source, ": ", path)));
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
      if (!absl::EndsWith(path, ".yml") && !absl::EndsWith(path, ".yaml")) path = StepFileIn(path);
      return LoadFile(path, ref.text);
    }
    case Kind::kDist: {
      if (options_.catalog_dir.empty()) {
        return absl::NotFoundError(absl::StrCat("step ", ref.text, ": this step-runner has no catalog"));
      }
      return LoadFile(StepFileIn(absl::StrCat(options_.catalog_dir, "/", ref.path)), ref.text);
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
  if (absl::StrContains(url, "\n") || absl::StrContains(rev, "\n")) {
    return absl::InvalidArgumentError("git step: the URL and the revision cannot hold a line break");
  }
  // step-runner-git does the fetch (see gitref/main.cc for why it is a separate program). The
  // URL goes on its stdin, never its argv, because it may hold a password.
  int request[2], reply[2];
  if (::pipe2(request, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
  UniqueFd request_read(request[0]), request_write(request[1]);
  if (::pipe2(reply, O_CLOEXEC) != 0) return ErrnoStatus(errno, "pipe2");
  UniqueFd reply_read(reply[0]), reply_write(reply[1]);
  process::SpawnOptions spawn;
  spawn.argv = {options_.git_helper, "fetch-tree", options_.cache_dir};
  for (char** e = environ; *e; ++e) spawn.env.emplace_back(*e);
  spawn.stdin_fd = request_read.get();
  spawn.stdout_fd = reply_write.get();
  spawn.stderr_fd = reply_write.get();
  absl::StatusOr<process::Subprocess> child = process::Subprocess::Spawn(spawn);
  if (!child.ok()) {
    return absl::InternalError(absl::StrCat("cannot start ", options_.git_helper, ": ", child.status().message()));
  }
  request_read.Reset();
  reply_write.Reset();
  // A few hundred bytes: far below a pipe's buffer, so writing before reading cannot block.
  (void)WriteAll(request_write.get(), absl::StrCat(url, "\n", rev, "\n"));
  request_write.Reset();
  std::string output;
  char buffer[4096];
  for (;;) {
    ssize_t n = ::read(reply_read.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (output.size() < (64 << 10)) output.append(buffer, static_cast<size_t>(n));
  }
  SR_ASSIGN_OR_RETURN(int code, child->Reap());
  output = std::string(absl::StripTrailingAsciiWhitespace(output));
  switch (code) {
    case 0:
      return output;
    case 3:
      return absl::NotFoundError(output);
    case 4:
      return absl::FailedPreconditionError(output);
    default:
      return absl::InternalError(absl::StrCat("git step ", url, ": step-runner-git exited with ", code, ": ", output));
  }
}

}  // namespace step_runner::engine

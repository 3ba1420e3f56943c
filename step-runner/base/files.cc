#include "step-runner/base/files.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner {

absl::Status ErrnoStatus(int err, absl::string_view what) {
  return absl::ErrnoToStatus(err, what);
}

namespace {

// Reads `fd` to its end; past `max_bytes`, INVALID_ARGUMENT naming it `what`.
absl::StatusOr<std::string> ReadToEnd(int fd, size_t max_bytes, absl::string_view what) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("read(", what, ")"));
    }
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, " is over the limit of ", max_bytes, " bytes"));
    }
  }
}

}  // namespace

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  return ReadToEnd(fd.get(), std::string().max_size(), path);
}

absl::StatusOr<std::string> ReadRegularFile(const std::string& path, size_t max_bytes, bool follow_links,
                                            absl::string_view what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | (follow_links ? 0 : O_NOFOLLOW)));
  if (!fd && errno == ELOOP && !follow_links) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is a symbolic link, which is not followed"));
  }
  if (!fd && errno == ENOENT) return absl::NotFoundError(absl::StrCat(what, ": no file ", path));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("fstat(", path, ")"));
  if (!S_ISREG(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(what, " is not a regular file"));
  return ReadToEnd(fd.get(), max_bytes, what);
}

absl::Status WriteAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "write");
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view data, mode_t mode) {
  // A rename would replace a device or a fifo with a plain file: `--result /dev/null` run as
  // root once turned the machine's /dev/null into a regular file.
  if (struct stat st; ::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a regular file"));
  }
  std::string tmp = absl::StrCat(path, ".tmp");
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", tmp, ")"));
  if (absl::Status s = WriteAll(fd.get(), data); !s.ok()) {
    ::unlink(tmp.c_str());
    return absl::Status(s.code(), absl::StrCat(s.message(), " (", tmp, ")"));
  }
  if (!fd.Close()) return ErrnoStatus(errno, absl::StrCat("close(", tmp, ")"));
  // No fsync: records must survive the daemon dying (page cache does), not the machine.
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoStatus(err, absl::StrCat("rename(", tmp, ", ", path, ")"));
  }
  return absl::OkStatus();
}

absl::Status MakeDirs(const std::string& path, mode_t mode) {
  if (path.empty()) return absl::InvalidArgumentError("empty directory path");
  // Usually the parent exists: one mkdir, no walk (this runs on every Run).
  if (::mkdir(path.c_str(), mode) == 0) return absl::OkStatus();
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    partial = path.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), mode) != 0 && errno != EEXIST) {
      return ErrnoStatus(errno, absl::StrCat("mkdir(", partial, ")"));
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat(", path, ")"));
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string OwnBinaryDir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  return Dirname(std::string(buf, static_cast<size_t>(n)));
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::Status RemoveTree(const std::string& path) {
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) -> int {
    return ::remove(p) == 0 || errno == ENOENT ? 0 : -1;
  };
  if (::nftw(path.c_str(), remove_one, 32, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT) {
    return ErrnoStatus(errno, absl::StrCat("remove(", path, ")"));
  }
  return absl::OkStatus();
}

}  // namespace step_runner

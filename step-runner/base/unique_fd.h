#ifndef STEP_RUNNER_BASE_UNIQUE_FD_H_
#define STEP_RUNNER_BASE_UNIQUE_FD_H_

#include <unistd.h>

#include <utility>

namespace step_runner {

// Owns one file descriptor and closes it on destruction. Move-only; never pass a raw owning int
// across an API.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.Release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) Reset(other.Release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { Close(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  int Release() { return std::exchange(fd_, -1); }
  void Reset(int fd = -1) {
    Close();
    fd_ = fd;
  }
  // Returns false if close(2) reported an error; the fd is gone either way.
  bool Close() {
    if (fd_ < 0) return true;
    return ::close(std::exchange(fd_, -1)) == 0;
  }

 private:
  int fd_ = -1;
};

}  // namespace step_runner

#endif  // STEP_RUNNER_BASE_UNIQUE_FD_H_

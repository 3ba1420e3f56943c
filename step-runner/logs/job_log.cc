#include "step-runner/logs/job_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"

namespace step_runner::logs {
namespace {
constexpr size_t kIndexRecordBytes = 9;

std::string EncodeSwitch(int64_t offset, Stream stream) {
  std::string record(kIndexRecordBytes, '\0');
  uint64_t v = static_cast<uint64_t>(offset);
  for (int i = 0; i < 8; ++i) record[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  record[8] = static_cast<char>(stream);
  return record;
}
}  // namespace

JobLog::JobLog(std::string dir, UniqueFd writer, UniqueFd index_writer)
    : dir_(std::move(dir)), writer_(std::move(writer)), index_writer_(std::move(index_writer)) {}

std::string JobLog::LogPath() const { return dir_ + "/log"; }

absl::StatusOr<std::shared_ptr<JobLog>> JobLog::Create(const std::string& dir) {
  std::string log_path = dir + "/log";
  std::string index_path = dir + "/log.idx";
  UniqueFd writer(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600));
  if (!writer) return ErrnoStatus(errno, absl::StrCat("open(", log_path, ")"));
  UniqueFd index(::open(index_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600));
  if (!index) return ErrnoStatus(errno, absl::StrCat("open(", index_path, ")"));
  return std::shared_ptr<JobLog>(new JobLog(dir, std::move(writer), std::move(index)));
}

absl::StatusOr<std::shared_ptr<JobLog>> JobLog::OpenFinished(const std::string& dir) {
  auto log = std::shared_ptr<JobLog>(new JobLog(dir, UniqueFd(), UniqueFd()));
  struct stat st;
  if (::stat(log->LogPath().c_str(), &st) != 0) {
    return ErrnoStatus(errno, absl::StrCat("stat(", log->LogPath(), ")"));
  }
  absl::MutexLock lock(&log->mu_);
  log->size_ = st.st_size;
  log->finished_ = true;
  // A missing or torn index only loses stream tags, never bytes; the default is stdout.
  if (auto index = ReadFile(dir + "/log.idx"); index.ok()) {
    for (size_t i = 0; i + kIndexRecordBytes <= index->size(); i += kIndexRecordBytes) {
      uint64_t v = 0;
      for (int b = 0; b < 8; ++b) v |= static_cast<uint64_t>(static_cast<uint8_t>((*index)[i + b])) << (8 * b);
      Stream s = static_cast<Stream>((*index)[i + 8]);
      if (s == Stream::kStdout || s == Stream::kStderr) log->switches_[static_cast<int64_t>(v)] = s;
    }
  }
  return log;
}

absl::Status JobLog::Append(Stream stream, absl::string_view data) {
  if (data.empty()) return absl::OkStatus();
  std::vector<std::function<void()>> woken;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return absl::FailedPreconditionError("append to a finished log");
    auto last = switches_.empty() ? std::nullopt : std::optional<Stream>(switches_.rbegin()->second);
    if (last != stream) {
      // The index record goes first: after a crash it may name an offset no byte reached,
      // which is harmless, but never leaves bytes with the wrong stream.
      if (absl::Status s = WriteAll(index_writer_.get(), EncodeSwitch(size_, stream)); !s.ok()) return s;
      switches_[size_] = stream;
    }
    if (absl::Status s = WriteAll(writer_.get(), data); !s.ok()) return s;
    size_ += static_cast<int64_t>(data.size());
    woken = waiters_.TakeAll();
  }
  WakeAll(std::move(woken));
  return absl::OkStatus();
}

void JobLog::Finish() {
  std::vector<std::function<void()>> woken;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
    writer_.Close();
    index_writer_.Close();
    woken = waiters_.TakeAll();
  }
  WakeAll(std::move(woken));
}

int64_t JobLog::size() const {
  absl::MutexLock lock(&mu_);
  return size_;
}

bool JobLog::finished() const {
  absl::MutexLock lock(&mu_);
  return finished_;
}

absl::StatusOr<UniqueFd> JobLog::OpenReader() const {
  UniqueFd fd(::open(LogPath().c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", LogPath(), ")"));
  return fd;
}

absl::StatusOr<JobLog::Extent> JobLog::Locate(int64_t offset, size_t max_bytes) const {
  absl::MutexLock lock(&mu_);
  if (offset < 0 || offset > size_) {
    return absl::OutOfRangeError(
        absl::StrCat("offset ", offset, " is outside the log, which has ", size_, " bytes"));
  }
  int64_t end = size_;
  Extent extent{.offset = offset};
  auto next = switches_.upper_bound(offset);
  if (next != switches_.end()) end = std::min(end, next->first);
  if (next != switches_.begin()) extent.stream = std::prev(next)->second;
  extent.length = static_cast<size_t>(std::min<int64_t>(end - offset, static_cast<int64_t>(max_bytes)));
  return extent;
}

absl::Status JobLog::ReadExtent(int reader_fd, const Extent& extent, char* dest) const {
  size_t got = 0;
  while (got < extent.length) {
    const auto at = static_cast<off_t>(extent.offset + static_cast<int64_t>(got));
    ssize_t n = ::pread(reader_fd, dest + got, extent.length - got, at);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "pread(log)");
    }
    // Bytes below size() are on disk: a short file means someone truncated it.
    if (n == 0) return absl::DataLossError(absl::StrCat("the log ends at ", extent.offset + got, ", before ",
                                                        extent.offset + extent.length, " bytes"));
    got += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> JobLog::Read(int reader_fd, int64_t offset, size_t max_bytes,
                                    Chunk* chunk) const {
  absl::StatusOr<Extent> extent = Locate(offset, max_bytes);
  if (!extent.ok()) return extent.status();
  chunk->offset = offset;
  chunk->stream = extent->stream;
  chunk->data.resize(extent->length);
  if (absl::Status s = ReadExtent(reader_fd, *extent, chunk->data.data()); !s.ok()) return s;
  return extent->length;
}

std::optional<JobLog::WaiterId> JobLog::WaitForData(int64_t offset, std::function<void()> wake) {
  absl::MutexLock lock(&mu_);
  if (size_ > offset || finished_) return std::nullopt;
  return waiters_.Add(std::move(wake));
}

void JobLog::CancelWait(WaiterId id) {
  absl::MutexLock lock(&mu_);
  waiters_.Remove(id);
}

}  // namespace step_runner::logs

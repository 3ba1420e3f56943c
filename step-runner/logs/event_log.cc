#include "step-runner/logs/event_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "step-runner/base/files.h"

namespace step_runner::logs {

absl::StatusOr<std::shared_ptr<EventLog>> EventLog::Create(const std::string& dir) {
  std::string path = dir + "/events";
  UniqueFd writer(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600));
  if (!writer) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  return std::shared_ptr<EventLog>(new EventLog(std::move(writer)));
}

absl::StatusOr<std::shared_ptr<EventLog>> EventLog::OpenFinished(const std::string& dir) {
  return Load(dir, /*writable=*/false);
}

absl::StatusOr<std::shared_ptr<EventLog>> EventLog::Reopen(const std::string& dir) {
  return Load(dir, /*writable=*/true);
}

absl::StatusOr<std::shared_ptr<EventLog>> EventLog::Load(const std::string& dir, bool writable) {
  const std::string path = dir + "/events";
  std::shared_ptr<EventLog> log(new EventLog(UniqueFd()));
  absl::MutexLock lock(&log->mu_);
  absl::StatusOr<std::string> bytes = ReadFile(path);
  int good_end = 0;
  if (bytes.ok()) {
    google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes->data()),
                                              static_cast<int>(bytes->size()));
    uint32_t size;
    while (in.ReadVarint32(&size)) {
      std::string record;
      proto::FollowStepsResponse event;
      if (!in.ReadString(&record, static_cast<int>(size)) || !event.ParseFromString(record)) break;
      log->events_.push_back(std::move(event));
      good_end = in.CurrentPosition();
    }
  }
  if (!writable) {
    log->finished_ = true;  // a job from before events existed simply has none
    return log;
  }
  UniqueFd writer(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!writer) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  if (::ftruncate(writer.get(), good_end) != 0) return ErrnoStatus(errno, absl::StrCat("ftruncate(", path, ")"));
  log->writer_ = std::move(writer);
  return log;
}

absl::Status EventLog::Append(proto::FollowStepsResponse event) {
  std::vector<std::function<void()>> woken;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return absl::FailedPreconditionError("append to a finished event log");
    event.set_seq(static_cast<int64_t>(events_.size()) + 1);
    std::string record;
    {
      google::protobuf::io::StringOutputStream stream(&record);
      google::protobuf::io::CodedOutputStream out(&stream);
      out.WriteVarint32(static_cast<uint32_t>(event.ByteSizeLong()));
      event.SerializeToCodedStream(&out);
    }
    // One write per record, so a crash leaves at most the last one torn.
    absl::Status written = WriteAll(writer_.get(), record);
    events_.push_back(std::move(event));
    woken = waiters_.TakeAll();
    if (!written.ok()) return written;
  }
  WakeAll(std::move(woken));
  return absl::OkStatus();
}

void EventLog::Finish() {
  std::vector<std::function<void()>> woken;
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
    writer_.Close();
    woken = waiters_.TakeAll();
  }
  WakeAll(std::move(woken));
}

bool EventLog::finished() const {
  absl::MutexLock lock(&mu_);
  return finished_;
}

int64_t EventLog::last_seq() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(events_.size());
}

absl::StatusOr<std::vector<proto::FollowStepsResponse>> EventLog::ReadAfter(int64_t after_seq,
                                                                          size_t max_count) const {
  absl::MutexLock lock(&mu_);
  if (after_seq < 0 || after_seq > static_cast<int64_t>(events_.size())) {
    return absl::OutOfRangeError(absl::StrCat("after_seq ", after_seq, " is outside the job's events, which number ",
                                              events_.size()));
  }
  std::vector<proto::FollowStepsResponse> out;
  for (size_t i = static_cast<size_t>(after_seq); i < events_.size() && out.size() < max_count; ++i) {
    out.push_back(events_[i]);
  }
  return out;
}

std::optional<EventLog::WaiterId> EventLog::WaitForEvents(int64_t after_seq, std::function<void()> wake) {
  absl::MutexLock lock(&mu_);
  if (static_cast<int64_t>(events_.size()) > after_seq || finished_) return std::nullopt;
  return waiters_.Add(std::move(wake));
}

void EventLog::CancelWait(WaiterId id) {
  absl::MutexLock lock(&mu_);
  waiters_.Remove(id);
}

}  // namespace step_runner::logs

#include "step-runner/runner/job.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/time_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"

namespace step_runner::runner {
namespace {

using ::google::protobuf::util::TimeUtil;

// Big reads keep the loop's wake-ups few when a step writes fast; the cap per wake-up keeps
// one chatty step from starving the others.
constexpr size_t kReadChunk = 256 << 10;
constexpr int kMaxReadsPerWakeup = 16;

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}

logs::Stream StreamOf(int index) { return index == 0 ? logs::Stream::kStdout : logs::Stream::kStderr; }

}  // namespace

Job::Job(std::string id, std::string dir, std::string fingerprint)
    : id_(std::move(id)), dir_(std::move(dir)), fingerprint_(std::move(fingerprint)) {}

absl::StatusOr<std::shared_ptr<Job>> Job::Create(JobConfig config, EventLoop* loop,
                                                 FinishedCallback on_finished) {
  std::shared_ptr<Job> job(new Job(config.id, config.dir, config.fingerprint));
  job->config_ = std::move(config);
  job->loop_ = loop;
  job->on_finished_ = std::move(on_finished);
  auto log = logs::JobLog::Create(job->dir_);
  if (!log.ok()) return log.status();
  job->log_ = *std::move(log);
  auto events = logs::EventLog::Create(job->dir_);
  if (!events.ok()) return events.status();
  job->events_ = *std::move(events);
  {
    absl::MutexLock lock(&job->mu_);
    job->status_.set_id(job->id_);
    job->status_.set_status(proto::StepResult::running);
    *job->status_.mutable_start_time() = ToProto(absl::Now());
    job->status_.mutable_result()->set_status(proto::StepResult::running);
  }
  job->WriteRecord(nullptr);
  return job;
}

absl::StatusOr<std::shared_ptr<Job>> Job::Recover(const std::string& dir, proto::JobRecord record,
                                                  bool interrupted) {
  std::shared_ptr<Job> job(
      new Job(record.status().id(), dir, record.request_fingerprint()));
  auto log = logs::JobLog::OpenFinished(dir);
  if (!log.ok()) return log.status();
  job->log_ = *std::move(log);
  auto events = interrupted ? logs::EventLog::Reopen(dir) : logs::EventLog::OpenFinished(dir);
  if (!events.ok()) return events.status();
  job->events_ = *std::move(events);
  {
    absl::MutexLock lock(&job->mu_);
    job->status_ = record.status();
    job->finished_ = true;
  }
  if (interrupted) {
    job->Emit(proto::FollowStepsResponse::JOB_FINISHED, nullptr);
    job->events_->Finish();
  }
  return job;
}

void Job::Emit(proto::FollowStepsResponse::Kind kind, const proto::StepResult* step) {
  proto::FollowStepsResponse event;
  event.set_kind(kind);
  *event.mutable_time() = ToProto(absl::Now());
  if (step) *event.mutable_result() = *step;
  if (kind == proto::FollowStepsResponse::JOB_FINISHED) {
    *event.mutable_job_status() = status();
    *event.mutable_result() = event.job_status().result();
  }
  if (absl::Status s = events_->Append(std::move(event)); !s.ok()) {
    SR_LOG(ERROR) << "job " << id_ << ": cannot record a step event: " << s;
  }
}

proto::Status Job::status() const {
  absl::MutexLock lock(&mu_);
  proto::Status status = status_;
  status.set_log_size(log_->size());
  return status;
}

bool Job::finished() const {
  absl::MutexLock lock(&mu_);
  return finished_;
}

absl::Time Job::end_time() const {
  absl::MutexLock lock(&mu_);
  return absl::FromUnixNanos(TimeUtil::TimestampToNanoseconds(status_.end_time()));
}

void Job::DeleteWhenFinished() {
  bool finished_now;
  {
    absl::MutexLock lock(&mu_);
    delete_when_finished_ = true;
    finished_now = finished_;
  }
  if (finished_now) RemoveFolders();
}

std::string Job::Mask(absl::string_view text) const { return logs::MaskSecrets(text, config_.secrets); }

void Job::WriteRecord(const proto::ProcessGroupRecord* running_group) {
  proto::JobRecord record;
  {
    absl::MutexLock lock(&mu_);
    *record.mutable_status() = status_;
  }
  record.mutable_status()->set_log_size(log_->size());
  record.set_request_fingerprint(fingerprint_);
  record.set_work_dir(config_.work_dir);
  if (running_group) *record.mutable_running_group() = *running_group;
  if (absl::Status s = WriteFileAtomically(dir_ + "/record.pb", record.SerializeAsString(), 0600);
      !s.ok()) {
    SR_LOG(ERROR) << "job " << id_ << ": cannot write its record: " << s;
  }
}

void Job::Start() {
  if (started_ || finished()) return;
  started_ = true;
  if (config_.timeout != absl::InfiniteDuration()) {
    timeout_timer_ = loop_->AddTimer(config_.timeout, [this, self = shared_from_this()] {
      timeout_timer_ = 0;
      RequestCancel(proto::StatusError::timeout,
                    absl::StrCat("the job exceeded its timeout of ",
                                 absl::FormatDuration(config_.timeout)));
    });
  }
  StartNextStep();
}

void Job::StartNextStep() {
  if (cancel_) {
    Finish(proto::StepResult::cancelled, cancel_->first, cancel_->second, last_exit_code_);
    return;
  }
  if (next_step_ == config_.steps.size()) {
    if (!log_error_.ok()) {
      Finish(proto::StepResult::failure, proto::StatusError::failed,
             absl::StrCat("the job's log could not be written: ", log_error_.ToString()),
             last_exit_code_);
      return;
    }
    Finish(proto::StepResult::success, proto::StatusError::unspecified, "", 0);
    return;
  }
  const size_t index = next_step_++;
  const PlannedStep& step = config_.steps[index];
  absl::Time start = absl::Now();
  proto::StepResult started;
  {
    absl::MutexLock lock(&mu_);
    proto::StepResult* result = status_.mutable_result()->add_sub_step_results();
    result->set_name(step.name);
    result->set_status(proto::StepResult::running);
    *result->mutable_start_time() = ToProto(start);
    for (const std::string& arg : step.argv) result->mutable_exec_result()->add_command(Mask(arg));
    result->mutable_exec_result()->set_work_dir(step.work_dir);
    started = *result;
  }
  Emit(proto::FollowStepsResponse::STEP_STARTED, &started);

  absl::StatusOr<process::OutputPipe> out = process::MakeOutputPipe();
  absl::StatusOr<process::OutputPipe> err =
      out.ok() ? process::MakeOutputPipe() : absl::StatusOr<process::OutputPipe>(out.status());
  absl::StatusOr<process::Subprocess> child =
      err.ok() ? process::Subprocess::Spawn({.argv = step.argv,
                                             .env = step.env,
                                             .work_dir = step.work_dir,
                                             .stdout_fd = out->write_end.get(),
                                             .stderr_fd = err->write_end.get()})
               : absl::StatusOr<process::Subprocess>(err.status());
  if (!child.ok()) {
    // Shown in the log, where the person following the job looks first.
    std::string message = Mask(absl::StrCat("step \"", step.name, "\": ", child.status().message()));
    AppendOutput(1, absl::StrCat("step-runner: ", message, "\n"));
    last_exit_code_ = absl::IsNotFound(child.status()) ? 127 : 126;
    proto::StepResult finished;
    {
      absl::MutexLock lock(&mu_);
      proto::StepResult* result = status_.mutable_result()->mutable_sub_step_results(index);
      result->set_status(proto::StepResult::failure);
      result->mutable_exec_result()->set_exit_code(last_exit_code_);
      *result->mutable_end_time() = ToProto(absl::Now());
      finished = *result;
    }
    Emit(proto::FollowStepsResponse::STEP_FINISHED, &finished);
    Finish(proto::StepResult::failure, proto::StatusError::failed, message, last_exit_code_);
    return;
  }

  live_.emplace(LiveStep{.index = index, .child = *std::move(child), .start = start});
  live_->pipes[0].emplace(OutputPipe{std::move(out->read_end), logs::StreamMasker(config_.secrets)});
  live_->pipes[1].emplace(OutputPipe{std::move(err->read_end), logs::StreamMasker(config_.secrets)});
  // out/err write ends close here: the child holds the only copies, so EOF means it is done.
  out->write_end.Close();
  err->write_end.Close();

  proto::ProcessGroupRecord group;
  group.set_pgid(live_->child.pid());
  if (auto ticks = process::ProcessStartTicks(live_->child.pid()); ticks.ok()) {
    group.set_leader_start_ticks(*ticks);
  }
  group.set_boot_id(process::BootId());
  WriteRecord(&group);

  auto self = shared_from_this();
  for (int i = 0; i < 2; ++i) {
    absl::Status s = loop_->WatchFd(live_->pipes[i]->fd.get(), EPOLLIN,
                                    [this, self, i](uint32_t) { OnOutput(i); });
    if (!s.ok()) SR_LOG(ERROR) << "job " << id_ << ": " << s;
  }
  absl::Status s = loop_->WatchFd(live_->child.pidfd(), EPOLLIN, [this, self](uint32_t) { OnLeaderExit(); });
  if (!s.ok()) SR_LOG(ERROR) << "job " << id_ << ": " << s;
}

void Job::AppendOutput(int stream_index, absl::string_view data) {
  absl::Status s;
  if (live_ && live_->pipes[stream_index] && live_->pipes[stream_index]->masker.active()) {
    s = log_->Append(StreamOf(stream_index), live_->pipes[stream_index]->masker.Process(data));
  } else {
    s = log_->Append(StreamOf(stream_index), data);
  }
  if (!s.ok() && log_error_.ok()) {
    log_error_ = s;
    SR_LOG(ERROR) << "job " << id_ << ": writing the log failed: " << s;
  }
}

void Job::OnOutput(int stream_index) {
  if (!live_ || !live_->pipes[stream_index]) return;
  static thread_local std::string buffer(kReadChunk, '\0');
  int fd = live_->pipes[stream_index]->fd.get();
  for (int i = 0; i < kMaxReadsPerWakeup; ++i) {
    ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n > 0) {
      AppendOutput(stream_index, absl::string_view(buffer.data(), static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    ClosePipe(stream_index);  // EOF, or an error that ends this stream
    MaybeStepDone();
    return;
  }
}

void Job::ClosePipe(int stream_index) {
  auto& pipe = live_->pipes[stream_index];
  if (!pipe) return;
  std::string held_back = pipe->masker.Flush();
  if (!held_back.empty()) {
    absl::Status s = log_->Append(StreamOf(stream_index), held_back);
    if (!s.ok() && log_error_.ok()) log_error_ = s;
  }
  loop_->UnwatchFd(pipe->fd.get());
  pipe.reset();
}

void Job::OnLeaderExit() {
  loop_->UnwatchFd(live_->child.pidfd());
  // The leader is a zombie, so its pid (the group id) cannot be reused yet: killing what is
  // left of the group now is race-free. A step's processes do not outlive the step.
  (void)live_->child.SignalGroup(SIGKILL);
  absl::StatusOr<int> code = live_->child.Reap();
  live_->reaped = true;
  live_->exit_code = code.ok() ? *code : 1;
  if (!code.ok()) SR_LOG(ERROR) << "job " << id_ << ": " << code.status();
  if (live_->kill_timer) loop_->CancelTimer(std::exchange(live_->kill_timer, 0));
  if (live_->pipes[0] || live_->pipes[1]) {
    // Whatever escaped the group (setsid) and still holds a pipe gets a short grace to let
    // the pipe drain; then the step is done without it.
    live_->drain_timer = loop_->AddTimer(config_.drain_timeout, [this, self = shared_from_this()] {
      if (!live_) return;
      live_->drain_timer = 0;
      for (int i = 0; i < 2; ++i) {
        if (live_->pipes[i]) {
          OnOutput(i);
          ClosePipe(i);
        }
      }
      MaybeStepDone();
    });
  }
  MaybeStepDone();
}

void Job::MaybeStepDone() {
  if (!live_ || !live_->reaped || live_->pipes[0] || live_->pipes[1]) return;
  if (live_->drain_timer) loop_->CancelTimer(live_->drain_timer);
  StepFinished();
}

void Job::StepFinished() {
  const size_t index = live_->index;
  const int exit_code = live_->exit_code;
  live_.reset();
  last_exit_code_ = exit_code;
  const std::string& name = config_.steps[index].name;
  proto::StepResult finished;
  {
    absl::MutexLock lock(&mu_);
    proto::StepResult* result = status_.mutable_result()->mutable_sub_step_results(index);
    result->mutable_exec_result()->set_exit_code(exit_code);
    *result->mutable_end_time() = ToProto(absl::Now());
    result->set_status(cancel_ ? proto::StepResult::cancelled
                       : exit_code == 0 ? proto::StepResult::success
                                        : proto::StepResult::failure);
    finished = *result;
  }
  Emit(proto::FollowStepsResponse::STEP_FINISHED, &finished);
  if (cancel_) {
    Finish(proto::StepResult::cancelled, cancel_->first, cancel_->second, exit_code);
  } else if (exit_code != 0) {
    std::string how = exit_code > 128 ? absl::StrCat("was killed by signal ", exit_code - 128)
                                      : absl::StrCat("exited with code ", exit_code);
    Finish(proto::StepResult::failure, proto::StatusError::failed,
           absl::StrCat("step \"", name, "\" ", how), exit_code);
  } else {
    StartNextStep();
  }
}

void Job::RequestCancel(proto::StatusError::Kind kind, std::string message) {
  if (finished()) return;
  if (!cancel_) cancel_.emplace(kind, std::move(message));
  if (!started_) {
    Finish(proto::StepResult::cancelled, cancel_->first, cancel_->second, 0);
    return;
  }
  if (!live_ || live_->reaped || live_->kill_timer) return;  // nothing left to signal
  if (config_.graceful_exit_timeout <= absl::ZeroDuration()) {
    (void)live_->child.SignalGroup(SIGKILL);
    return;
  }
  (void)live_->child.SignalGroup(SIGTERM);
  live_->kill_timer = loop_->AddTimer(config_.graceful_exit_timeout, [this, self = shared_from_this()] {
    if (!live_ || live_->reaped) return;
    live_->kill_timer = 0;
    SR_LOG(INFO) << "job " << id_ << ": step still running after "
                 << absl::FormatDuration(config_.graceful_exit_timeout) << "; sending SIGKILL";
    (void)live_->child.SignalGroup(SIGKILL);
  });
}

void Job::ForceKill() {
  if (live_ && !live_->reaped) (void)live_->child.SignalGroup(SIGKILL);
}

void Job::Finish(proto::StepResult::Status status, proto::StatusError::Kind kind,
                 const std::string& message, int exit_code) {
  if (timeout_timer_) loop_->CancelTimer(std::exchange(timeout_timer_, 0));
  bool remove;
  {
    absl::MutexLock lock(&mu_);
    status_.set_status(status);
    status_.set_exit_code(exit_code);
    *status_.mutable_end_time() = ToProto(absl::Now());
    status_.mutable_result()->set_status(status);
    if (kind != proto::StatusError::unspecified) {
      std::string masked = Mask(message);
      status_.set_message(masked);
      status_.mutable_error()->set_kind(kind);
      status_.mutable_error()->set_message(masked);
    }
    finished_ = true;
    remove = delete_when_finished_;
  }
  // Only now may followers' streams end: a client that asks for the status when its stream
  // ends must already see the final one.
  Emit(proto::FollowStepsResponse::JOB_FINISHED, nullptr);
  events_->Finish();
  log_->Finish();
  if (!config_.secrets_dir.empty()) (void)RemoveTree(config_.secrets_dir);
  // A retained job needs its status and log, not its plan (argv and env copies per step).
  std::vector<PlannedStep>().swap(config_.steps);
  if (remove) {
    RemoveFolders();
  } else {
    WriteRecord(nullptr);
  }
  if (on_finished_) on_finished_(*this);
}

void Job::RemoveFolders() {
  if (absl::Status s = RemoveTree(dir_); !s.ok()) SR_LOG(WARNING) << "job " << id_ << ": " << s;
  if (!config_.secrets_dir.empty()) (void)RemoveTree(config_.secrets_dir);
}

}  // namespace step_runner::runner

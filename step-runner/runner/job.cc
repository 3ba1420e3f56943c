#include "step-runner/runner/job.h"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/time_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::runner {
namespace {

using ::google::protobuf::util::TimeUtil;

// A whole pipe (1 MiB, process/subprocess.cc) per read: a step that writes fast then costs one
// read, one log append and at most one follower message per MiB (256 KiB reads made four of
// each, and the follower's share of gRPC's per-message work showed; BENCHMARKS.md, seventh
// session). The cap per wake-up (4 MiB, as with 16 reads of 256 KiB before) keeps a chatty
// stdout from starving stderr and cancel.
constexpr size_t kReadChunk = 1 << 20;
constexpr int kMaxReadsPerWakeup = 4;

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}

std::string StepResultsPath(const std::string& dir) { return dir + "/step-results.json"; }

// The result tree (sensitive values already masked), for whoever reviews the job's work later.
absl::Status WriteStepResultsFile(const std::string& dir, const proto::StepResult& result) {
  return WriteFileAtomically(StepResultsPath(dir), engine::ResultToJson(result), 0600);
}

logs::Stream StreamOf(int index) { return index == 0 ? logs::Stream::kStdout : logs::Stream::kStderr; }

}  // namespace

Job::Job(std::string id, std::string dir, std::string fingerprint)
    : id_(std::move(id)), dir_(std::move(dir)), fingerprint_(std::move(fingerprint)) {}

Job::~Job() = default;

absl::StatusOr<std::shared_ptr<Job>> Job::Create(JobConfig config, EventLoop* loop, ThreadCache* engine_threads,
                                                 FinishedCallback on_finished) {
  std::shared_ptr<Job> job(new Job(config.id, config.dir, config.fingerprint));
  job->config_ = std::move(config);
  job->loop_ = loop;
  job->engine_threads_ = engine_threads;
  job->on_finished_ = std::move(on_finished);
  auto log = logs::JobLog::Create(job->dir_);
  if (!log.ok()) return log.status();
  job->log_ = *std::move(log);
  auto events = logs::EventLog::Create(job->dir_);
  if (!events.ok()) return events.status();
  job->events_ = *std::move(events);
  // What the engine's thread waits on while a step runs (see WatchLive).
  job->epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!job->epoll_) return ErrnoStatus(errno, "epoll_create1");
  job->kick_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!job->kick_) return ErrnoStatus(errno, "eventfd");
  epoll_event kick{.events = EPOLLIN, .data = {.u32 = kKick}};
  if (::epoll_ctl(job->epoll_.get(), EPOLL_CTL_ADD, job->kick_.get(), &kick) != 0) {
    return ErrnoStatus(errno, "epoll_ctl");
  }
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
    job->Record(job->MakeEvent(proto::FollowStepsResponse::JOB_FINISHED, nullptr), /*hook_now=*/true);
    job->events_->Finish();
  }
  // Missing when the previous daemon died before it wrote it (or while the job ran).
  if (struct stat st; ::stat(StepResultsPath(dir).c_str(), &st) != 0 && errno == ENOENT) {
    if (absl::Status s = WriteStepResultsFile(dir, record.status().result()); !s.ok()) {
      SR_LOG(WARNING) << "job " << job->id_ << ": cannot write step-results.json: " << s;
    }
  }
  return job;
}

proto::FollowStepsResponse Job::MakeEvent(proto::FollowStepsResponse::Kind kind, const proto::StepResult* step,
                                          const std::string& path, const std::string& warning) const {
  proto::FollowStepsResponse event;
  event.set_kind(kind);
  if (!path.empty()) event.set_step_path(path);
  if (!warning.empty()) event.set_warning(warning);
  *event.mutable_time() = ToProto(absl::Now());
  if (step) *event.mutable_result() = *step;
  if (kind == proto::FollowStepsResponse::JOB_FINISHED) {
    *event.mutable_job_status() = status();
    *event.mutable_result() = event.job_status().result();
  }
  return event;
}

void Job::Record(proto::FollowStepsResponse event, bool hook_now) {
  if (config_.step_event_hook) {
    if (hook_now) {
      config_.step_event_hook(id_, event);
    } else {
      unhooked_.push_back(event);
    }
  }
  if (absl::Status s = events_->Append(std::move(event)); !s.ok()) {
    SR_LOG(ERROR) << "job " << id_ << ": cannot record a step event: " << s;
  }
}

void Job::RecordQueued(bool hook_now, bool through_last_finished) {
  size_t end = queued_.size();
  if (through_last_finished) {
    while (end > 0 && queued_[end - 1].kind() != proto::FollowStepsResponse::STEP_FINISHED) --end;
  }
  for (size_t i = 0; i < end; ++i) Record(std::move(queued_[i]), hook_now);
  queued_.erase(queued_.begin(), queued_.begin() + static_cast<ptrdiff_t>(end));
}

void Job::RunDeferredHooks() {
  for (const proto::FollowStepsResponse& event : unhooked_) config_.step_event_hook(id_, event);
  unhooked_.clear();
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

bool Job::HasTimeout() const { return config_.timeout != absl::InfiniteDuration(); }

void Job::Start() {
  if (HasTimeout()) {
    timeout_timer_ = loop_->AddTimer(config_.timeout, [this, self = shared_from_this()] {
      timeout_timer_ = 0;
      RequestCancel(proto::StatusError::timeout,
                    absl::StrCat("the job exceeded its timeout of ",
                                 absl::FormatDuration(config_.timeout)));
    });
  }
}

void Job::StartEngine() {
  // The engine blocks while a process runs, so it gets a thread of its own (a parked one when
  // there is one). That thread also makes the job's processes and watches them to their end,
  // and ends the job: the loop is not on the way of a step (see RunProcess).
  engine_threads_->Run([this, self = shared_from_this()] {
    engine::JobOutcome outcome = engine::RunJob(config_.spec, *this);
    End(std::move(outcome));
  });
}

// ---- engine::Host (the engine's thread) ---------------------------------------------------

void Job::Log(absl::string_view line) {
  absl::Status s = log_->Append(logs::Stream::kStderr, Mask(line));
  if (!s.ok() && log_error_.ok()) log_error_ = s;
}

void Job::Publish(const proto::StepResult& tree, const proto::StepResult& node, const std::string& path,
                  bool finished) {
  {
    absl::MutexLock lock(&mu_);
    *status_.mutable_result() = tree;
  }
  // Recorded (in the events file, and for the hook: the audit log, the sandbox) once the engine
  // waits for something: right after the next spawn, or at the job's end. On the way to a
  // step's start and to the job's end they were 0.05-0.1 ms each on a small VM (BENCHMARKS.md,
  // sixth session). Each keeps the time it happened.
  queued_.push_back(
      MakeEvent(finished ? proto::FollowStepsResponse::STEP_FINISHED : proto::FollowStepsResponse::STEP_STARTED, &node, path));
}

void Job::AddSecret(const std::string& value) {
  if (std::find(config_.secrets.begin(), config_.secrets.end(), value) == config_.secrets.end()) {
    config_.secrets.push_back(value);
  }
}

bool Job::Cancelled() {
  absl::MutexLock lock(&cancel_mu_);
  return cancel_.has_value();
}

bool Job::SleepUnlessCancelled(absl::Duration d) {
  RecordQueued(/*hook_now=*/true);
  absl::MutexLock lock(&cancel_mu_);
  auto cancelled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(cancel_mu_) { return cancel_.has_value(); };
  cancel_mu_.AwaitWithTimeout(absl::Condition(&cancelled), d);
  return cancel_.has_value();
}

// ---- processes (the engine's thread) ------------------------------------------------------

namespace {

// Spawns `planned` with fresh pipes for its output (and warnings).
absl::StatusOr<PreparedProcess> SpawnPlanned(const PlannedStep& planned) {
  SR_ASSIGN_OR_RETURN(process::OutputPipe out, process::MakeOutputPipe());
  SR_ASSIGN_OR_RETURN(process::OutputPipe err, process::MakeOutputPipe());
  process::OutputPipe warnings;
  if (planned.warnings_channel) {
    SR_ASSIGN_OR_RETURN(warnings, process::MakeOutputPipe());
  }
  SR_ASSIGN_OR_RETURN(process::Subprocess child, process::Subprocess::Spawn({.argv = planned.argv,
                                                                            .env = planned.env,
                                                                            .work_dir = planned.work_dir,
                                                                            .stdout_fd = out.write_end.get(),
                                                                            .stderr_fd = err.write_end.get(),
                                                                            .fd3 = warnings.write_end.get()}));
  // The write ends close here: the child holds the only copies, so EOF means it is done.
  PreparedProcess prepared{.child = std::move(child),
                           .stdout_read = std::move(out.read_end),
                           .stderr_read = std::move(err.read_end)};
  if (planned.warnings_channel) prepared.warnings_read = std::move(warnings.read_end);
  return prepared;
}

// Milliseconds until `deadline` for epoll_wait, rounded up so that a wake-up is never early.
int WaitTimeoutMs(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return -1;
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))), 1 << 30));
}

}  // namespace

engine::ProcessOutcome Job::RunProcess(const engine::ProcessSpec& spec) {
  // The job's own thread makes the process and watches it to its end. On the loop, a spawn
  // (0.5 ms or more; the sandbox's longer) held up every other job's output, and the hops to the
  // loop and back were on the way to every step's start and end (BENCHMARKS.md, sixth session).
  if (Cancelled()) {
    RecordQueued(/*hook_now=*/true);
    return {.exit_code = last_exit_code_, .cancelled = true};
  }
  // Earlier steps' ends are recorded before the launch: the hook (the audit log) names the
  // sandbox grant of the job's latest launch, which for them is still their own. The starts
  // queued after them (this step's) wait for the spawn, and so get this launch's grant.
  RecordQueued(/*hook_now=*/true, /*through_last_finished=*/true);
  // The launch hook (the sandbox) may rewrite the process; the result tree keeps the step's
  // own command, which is what its author wrote.
  PlannedStep planned{
      .name = spec.name, .argv = spec.argv, .env = spec.env, .work_dir = spec.work_dir, .wants_network = spec.wants_network};
  absl::Status hooked =
      config_.launch_hook
          ? config_.launch_hook({.job_id = id_,
                                 .job_dir = dir_,
                                 .job_work_dir = config_.work_dir,
                                 .io_dir = spec.io_dir,
                                 .secrets_dir = config_.secrets_dir,
                                 .job_asks_network = JobAsksNetwork()},
                                planned)
          : absl::OkStatus();
  absl::StatusOr<PreparedProcess> child = !hooked.ok()        ? absl::StatusOr<PreparedProcess>(hooked)
                                          : planned.prepared ? absl::StatusOr<PreparedProcess>(*std::move(planned.prepared))
                                                             : SpawnPlanned(planned);
  RecordQueued(/*hook_now=*/true);  // the step's start, while its process gets going
  if (!child.ok()) {
    // Shown in the log, where the person following the job looks first.
    std::string message = Mask(child.status().message());
    AppendOutput(1, absl::StrCat("step-runner: step \"", spec.name, "\": ", message, "\n"));
    last_exit_code_ = absl::IsNotFound(child.status()) ? 127 : 126;
    return {.exit_code = last_exit_code_, .spawn_error = message};
  }

  live_.emplace(LiveStep{.child = std::move(child->child)});
  live_->pipes[0].emplace(OutputPipe{std::move(child->stdout_read), logs::StreamMasker(config_.secrets)});
  live_->pipes[1].emplace(OutputPipe{std::move(child->stderr_read), logs::StreamMasker(config_.secrets)});
  live_->path = spec.name;
  live_->warnings = std::move(child->warnings_read);
  live_->exit_report = std::move(child->exit_report);
  live_->exit_report_watched = live_->exit_report.has_value();
  live_->deadline = spec.deadline;

  // So that a daemon that dies while the step runs kills its group at the next start.
  proto::ProcessGroupRecord group;
  group.set_pgid(live_->child.pid());
  if (auto ticks = process::ProcessStartTicks(live_->child.pid()); ticks.ok()) {
    group.set_leader_start_ticks(*ticks);
  }
  group.set_boot_id(process::BootId());
  WriteRecord(&group);

  WatchLive();
  return StepFinished(planned.explain_exit);
}

void Job::WatchLive() {
  // epoll rather than poll: it hands out what is ready in the order it became ready, so that
  // when stdout and stderr both have something by the time this thread runs, the log keeps the
  // order the step wrote them in.
  std::array<int, kKick> watched;
  watched.fill(-1);
  auto wanted = [this](uint32_t slot) {
    switch (slot) {
      case kStdout:
      case kStderr: return live_->pipes[slot] ? live_->pipes[slot]->fd.get() : -1;
      case kWarnings: return live_->warnings ? live_->warnings->get() : -1;
      case kExitReport: return live_->exit_report_watched ? live_->exit_report->get() : -1;
      default: return live_->reaped ? -1 : live_->child.pidfd();
    }
  };
  // A source that closed has left the set by itself (and the DEL fails, harmlessly); the
  // leader once reaped and the exit report once said are still open and leave it here.
  auto unwatch = [&](uint32_t slot) {
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, watched[slot], nullptr);
    watched[slot] = -1;
  };
  for (uint32_t slot = 0; slot < kKick; ++slot) {
    epoll_event event{.events = EPOLLIN, .data = {.u32 = slot}};
    const int fd = wanted(slot);
    if (fd < 0) continue;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
      // Not expected (the set was made for this); the step's deadlines still end it.
      SR_LOG(ERROR) << "job " << id_ << ": " << ErrnoStatus(errno, "epoll_ctl");
      continue;
    }
    watched[slot] = fd;
  }
  for (;;) {
    for (uint32_t slot = 0; slot < kKick; ++slot) {
      if (watched[slot] >= 0 && wanted(slot) != watched[slot]) unwatch(slot);
    }
    if (live_->ended && !live_->pipes[0] && !live_->pipes[1]) break;

    // The next deadline: the step's own timeout and the SIGKILL after a SIGTERM while it runs;
    // once it has ended, the grace for whatever still holds its pipes.
    absl::Time next = absl::InfiniteFuture();
    if (!live_->ended) {
      if (!live_->timed_out) next = std::min(next, live_->deadline);
      next = std::min(next, live_->kill_at);
    } else {
      next = std::min(next, live_->drain_until);
    }
    std::array<epoll_event, kKick + 1> events;
    const int ready = ::epoll_wait(epoll_.get(), events.data(), events.size(), WaitTimeoutMs(next));
    if (ready < 0 && errno != EINTR) {
      SR_LOG(ERROR) << "job " << id_ << ": " << ErrnoStatus(errno, "epoll_wait");
      ::usleep(1000);  // not a busy loop; the deadlines below still end the step
    }
    for (int i = 0; i < ready; ++i) {
      switch (events[i].data.u32) {
        case kStdout: OnOutput(0); break;
        case kStderr: OnOutput(1); break;
        case kWarnings: OnWarnings(); break;
        case kExitReport: OnExitReport(); break;
        case kLeader: OnLeaderExit(); break;
        case kKick: OnKick(); break;
        default: break;
      }
    }

    const absl::Time now = absl::Now();
    if (!live_->ended && !live_->timed_out && now >= live_->deadline) {
      live_->timed_out = true;
      SignalLive(SIGTERM);
    }
    if (!live_->ended && now >= live_->kill_at) {
      live_->kill_at = absl::InfiniteFuture();
      SR_LOG(INFO) << "job " << id_ << ": step still running after "
                   << absl::FormatDuration(config_.graceful_exit_timeout) << "; sending SIGKILL";
      (void)live_->child.SignalGroup(SIGKILL);
    }
    if (live_->ended && now >= live_->drain_until) {
      // Whatever escaped the group (setsid) and still holds a pipe had its grace; the step is
      // done without it.
      for (int i = 0; i < 2; ++i) {
        if (live_->pipes[i]) {
          OnOutput(i);
          ClosePipe(i);
        }
      }
    }
  }
  // What is still open goes on without this job's watch (a lingering sandbox's pidfd, its
  // exit report, the warnings pipe until the step is finished).
  for (uint32_t slot = 0; slot < kKick; ++slot) {
    if (watched[slot] >= 0) unwatch(slot);
  }
}

void Job::OnKick() {
  uint64_t count;
  (void)!::read(kick_.get(), &count, sizeof count);
  bool cancel, force;
  {
    absl::MutexLock lock(&cancel_mu_);
    cancel = cancel_.has_value();
    force = force_kill_;
  }
  if (force && !live_->reaped) (void)live_->child.SignalGroup(SIGKILL);
  if (cancel) SignalCancel();
}

void Job::SignalCancel() {
  if (!live_ || live_->ended || live_->kill_at != absl::InfiniteFuture()) return;  // nothing left to signal
  if (config_.graceful_exit_timeout <= absl::ZeroDuration()) {
    (void)live_->child.SignalGroup(SIGKILL);
    return;
  }
  SignalLive(SIGTERM);
}

void Job::End(engine::JobOutcome outcome) {
  {
    absl::MutexLock lock(&mu_);
    *status_.mutable_result() = outcome.result;
  }
  (void)RemoveTree(config_.spec.io_root);
  std::optional<std::pair<proto::StatusError::Kind, std::string>> cancel;
  {
    absl::MutexLock lock(&cancel_mu_);
    cancel = cancel_;
    kick_.Close();  // a retained job holds no fd for requests it no longer takes
  }
  epoll_.Close();
  if (cancel) {
    Finish(proto::StepResult::cancelled, cancel->first, cancel->second, outcome.exit_code);
  } else if (outcome.status == proto::StepResult::success && !log_error_.ok()) {
    Finish(proto::StepResult::failure, proto::StatusError::failed,
           absl::StrCat("the job's log could not be written: ", log_error_.ToString()), outcome.exit_code);
  } else {
    Finish(outcome.status, outcome.error_kind, outcome.message, outcome.exit_code);
  }
}

void Job::SignalLive(int signo) {
  if (!live_ || live_->ended) return;
  (void)live_->child.SignalGroup(signo);
  if (signo != SIGTERM || live_->kill_at != absl::InfiniteFuture()) return;
  if (config_.graceful_exit_timeout <= absl::ZeroDuration()) {
    (void)live_->child.SignalGroup(SIGKILL);
    return;
  }
  live_->kill_at = absl::Now() + config_.graceful_exit_timeout;
}

bool Job::JobAsksNetwork() const {
  auto it = config_.spec.env.find("STEP_RUNNER_NETWORK");
  return it != config_.spec.env.end() && it->second == "1";
}

void Job::AppendOutput(int stream_index, absl::string_view data) {
  absl::Status s;
  if (live_ && live_->pipes[stream_index]) {
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
  // Not zeroed (a string's would be): a quiet step's thread only touches the pages it reads into.
  static thread_local std::unique_ptr<char[]> buffer(new char[kReadChunk]);
  int fd = live_->pipes[stream_index]->fd.get();
  for (int i = 0; i < kMaxReadsPerWakeup; ++i) {
    ssize_t n = ::read(fd, buffer.get(), kReadChunk);
    if (n > 0) {
      AppendOutput(stream_index, absl::string_view(buffer.get(), static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    ClosePipe(stream_index);  // EOF, or an error that ends this stream
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
  pipe.reset();
}

void Job::OnWarnings() {
  if (!live_ || !live_->warnings) return;
  char buffer[4096];
  ssize_t n = ::read(live_->warnings->get(), buffer, sizeof buffer);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) {
    live_->warnings.reset();
    return;
  }
  std::string& partial = live_->warnings_partial;
  partial.append(buffer, static_cast<size_t>(n));
  size_t newline;
  while ((newline = partial.find('\n')) != std::string::npos) {
    std::string line = Mask(partial.substr(0, newline));
    partial.erase(0, newline + 1);
    Record(MakeEvent(proto::FollowStepsResponse::WARNING, nullptr, live_->path, line), /*hook_now=*/true);
  }
  // The helper writes short lines; a runaway one is cut rather than buffered without bound.
  if (partial.size() > sizeof buffer) partial.clear();
}

void Job::OnLeaderExit() {
  // The leader is a zombie, so its pid (the group id) cannot be reused yet: killing what is
  // left of the group now is race-free. A step's processes do not outlive the step.
  (void)live_->child.SignalGroup(SIGKILL);
  absl::StatusOr<int> code = live_->child.Reap();
  live_->reaped = true;
  if (!code.ok()) SR_LOG(ERROR) << "job " << id_ << ": " << code.status();
  if (!live_->ended) StepEnded(code.ok() ? *code : 1);
}

void Job::OnExitReport() {
  if (!live_ || !live_->exit_report_watched) return;
  char buffer[32];
  ssize_t n = ::read(live_->exit_report->get(), buffer, sizeof buffer);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  std::string& text = live_->exit_report_text;
  if (n > 0) text.append(buffer, static_cast<size_t>(n));
  const size_t newline = text.find('\n');
  int code = 0;
  const bool whole = newline != std::string::npos && absl::SimpleAtoi(text.substr(0, newline), &code) && code >= 0 &&
                     code <= 255;
  if (!whole && n > 0 && text.size() <= 16) return;  // more to come
  // Said, or never will be (closed, or garbled): the leader's exit tells then. The socket stays
  // open until the step is finished here: the process may wait for that to tear down (a
  // sandbox), so that the teardown does not compete with the step's end.
  live_->exit_report_watched = false;
  if (!whole) live_->exit_report.reset();
  if (whole && !live_->ended) StepEnded(code);
}

void Job::StepEnded(int exit_code) {
  live_->ended = true;
  live_->exit_code = exit_code;
  live_->kill_at = absl::InfiniteFuture();
  // Whatever escaped the group (setsid) and still holds a pipe gets a short grace to let the
  // pipe drain (see WatchLive).
  live_->drain_until = absl::Now() + config_.drain_timeout;
}

void Job::Linger(process::Subprocess child, std::optional<UniqueFd> exit_report) {
  auto lingering = std::make_shared<process::Subprocess>(std::move(child));
  auto held = exit_report ? std::make_shared<UniqueFd>(*std::move(exit_report)) : nullptr;
  // Not tied to this job, which may be closed and gone before the process exits.
  EventLoop* loop = loop_;
  loop->Post([loop, lingering, held] {
    if (held) {
      // Closing the channel lets the sandbox go, and its teardown (namespaces, mounts: a few
      // milliseconds of kernel work) would run beside the job's own end on a small machine,
      // which a client waiting for the result pays for: it waits a moment, so the result goes
      // out first.
      loop->AddTimer(kSandboxTeardownDelay, [held] { held->Close(); });
    }
    auto reap = [lingering] {
      (void)lingering->SignalGroup(SIGKILL);  // anything it left in its group; it is unreaped
      (void)lingering->Reap();
    };
    absl::Status s = loop->WatchFd(lingering->pidfd(), EPOLLIN, [loop, reap, lingering](uint32_t) {
      loop->UnwatchFd(lingering->pidfd());
      reap();
    });
    if (!s.ok()) reap();
  });
}

engine::ProcessOutcome Job::StepFinished(const std::function<std::optional<std::string>(int)>& explain_exit) {
  const int exit_code = live_->exit_code;
  const bool timed_out = live_->timed_out;
  if (live_->warnings) OnWarnings();  // what the helper said last, before the step's finished event
  if (!live_->reaped) {
    // It reported the step's end and is finishing up (its sandbox's teardown).
    Linger(std::move(live_->child), std::move(live_->exit_report));
  }
  live_.reset();
  last_exit_code_ = exit_code;
  engine::ProcessOutcome outcome{.exit_code = exit_code, .timed_out = timed_out, .cancelled = Cancelled()};
  if (explain_exit) outcome.resource_exhausted = explain_exit(exit_code);
  return outcome;
}

// ---- requests from other threads ----------------------------------------------------------

void Job::RequestCancel(proto::StatusError::Kind kind, std::string message) {
  if (finished()) return;
  absl::MutexLock lock(&cancel_mu_);
  if (!cancel_) cancel_.emplace(kind, std::move(message));
  Kick();
}

void Job::ForceKill() {
  absl::MutexLock lock(&cancel_mu_);
  force_kill_ = true;
  Kick();
}

void Job::Kick() {
  if (!kick_) return;  // the engine is done: nothing left to signal
  const uint64_t one = 1;
  (void)!::write(kick_.get(), &one, sizeof one);
}

void Job::Finish(proto::StepResult::Status status, proto::StatusError::Kind kind,
                 const std::string& message, int exit_code) {
  // File variables are gone before anyone can see the job as ended.
  if (!config_.secrets_dir.empty()) (void)RemoveTree(config_.secrets_dir);
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
  }
  // Everything this job writes into its folder is written before it counts as finished: a
  // Close that comes the moment the status turns final (or a stream ends) removes the folder,
  // and must not race a last write that would leave a half-removed job for the next start.
  // The hook (the audit log, the sandbox) writes nowhere a Close could race: it gets the last
  // events once the job's followers have them.
  RecordQueued(/*hook_now=*/false);
  Record(MakeEvent(proto::FollowStepsResponse::JOB_FINISHED, nullptr), /*hook_now=*/false);
  bool remove;
  {
    absl::MutexLock lock(&mu_);
    remove = delete_when_finished_;
  }
  if (!remove) WriteRecord(nullptr);
  {
    absl::MutexLock lock(&mu_);
    finished_ = true;
    remove = delete_when_finished_;
  }
  // Only now may followers' streams end: a client that asks for the status when its stream
  // ends must already see the final one.
  events_->Finish();
  log_->Finish();
  RunDeferredHooks();
  // A retained job needs its status and log, not its plan (the step tree, env copies).
  config_.spec = engine::JobSpec();
  if (remove) RemoveFolders();
  // The result tree as JSON, for whoever reviews the job's work later, is written a moment
  // after the end is out, by the loop: on the way to the end, it cost every run 0.1 ms
  // (BENCHMARKS.md, fifth session), and right after it, it competed with the result's delivery
  // for a small machine's cores. It holds what the record already holds; a daemon that dies
  // before writing it writes it from the record at its next start (Recover).
  if (!remove) loop_->PostDelayed(kStepResultsDelay, [self = shared_from_this()] { self->WriteStepResults(); });
  if (HasTimeout()) {
    loop_->Post([this, self = shared_from_this()] {
      if (timeout_timer_) loop_->CancelTimer(std::exchange(timeout_timer_, 0));
    });
  }
  if (on_finished_) on_finished_(*this);
}

void Job::WriteStepResults() {
  absl::MutexLock folder_lock(&folder_mu_);
  if (folders_removed_) return;
  if (absl::Status s = WriteStepResultsFile(dir_, status().result()); !s.ok()) {
    SR_LOG(WARNING) << "job " << id_ << ": cannot write step-results.json: " << s;
  }
}

void Job::RemoveFolders() {
  absl::MutexLock folder_lock(&folder_mu_);
  folders_removed_ = true;
  if (absl::Status s = RemoveTree(dir_); !s.ok()) SR_LOG(WARNING) << "job " << id_ << ": " << s;
  if (!config_.secrets_dir.empty()) (void)RemoveTree(config_.secrets_dir);
}

}  // namespace step_runner::runner

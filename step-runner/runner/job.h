#ifndef STEP_RUNNER_RUNNER_JOB_H_
#define STEP_RUNNER_RUNNER_JOB_H_

#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/job_record.pb.h"
#include "proto/step_runner.pb.h"
#include "step-runner/base/event_loop.h"
#include "step-runner/logs/event_log.h"
#include "step-runner/logs/job_log.h"
#include "step-runner/logs/masker.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::runner {

// One process to run, fully resolved: argv, env and work dir.
struct PlannedStep {
  std::string name;
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "KEY=VALUE"
  std::string work_dir;
};

struct JobConfig {
  std::string id;
  std::string dir;            // the job's state folder: record.pb, log, log.idx
  std::string secrets_dir;    // file variables; removed when the job ends
  std::string work_dir;
  std::string fingerprint;    // salted hash of the RunRequest, for idempotency
  std::vector<PlannedStep> steps;
  std::vector<std::string> secrets;  // masked in the log and in messages
  absl::Duration timeout = absl::InfiniteDuration();
  absl::Duration graceful_exit_timeout = absl::Seconds(30);
  absl::Duration drain_timeout = absl::Seconds(2);
};

// A job's life: its steps run one after another as processes supervised on the event loop, its
// output goes through the masker into the JobLog, and every state change is written to
// record.pb so that a restarted daemon knows what happened.
//
// Start/RequestCancel/the process callbacks run on the loop thread only; status() and the
// accessors are thread-safe.
class Job : public std::enable_shared_from_this<Job> {
 public:
  using FinishedCallback = std::function<void(Job&)>;

  // A job that starts now (call Start on the loop thread).
  static absl::StatusOr<std::shared_ptr<Job>> Create(JobConfig config, EventLoop* loop,
                                                     FinishedCallback on_finished);
  // A job read back from record.pb (a previous daemon's); it is finished. `interrupted`: the
  // previous daemon died while it ran, and its event stream gets the job-finished event now.
  static absl::StatusOr<std::shared_ptr<Job>> Recover(const std::string& dir,
                                                      proto::JobRecord record, bool interrupted);

  void Start();
  void RequestCancel(proto::StatusError::Kind kind, std::string message);
  // SIGKILL to the live step's group now (after RequestCancel, when there is no time left).
  void ForceKill();

  const std::string& id() const { return id_; }
  const std::string& dir() const { return dir_; }
  const std::string& fingerprint() const { return fingerprint_; }
  std::shared_ptr<logs::JobLog> log() const { return log_; }
  std::shared_ptr<logs::EventLog> events() const { return events_; }
  proto::Status status() const;
  bool finished() const;
  absl::Time end_time() const;

  // Delete the job's folders once it has finished (Close on a running job).
  void DeleteWhenFinished();

 private:
  struct OutputPipe {
    UniqueFd fd;
    logs::StreamMasker masker;
  };
  struct LiveStep {
    size_t index;
    process::Subprocess child;
    std::array<std::optional<OutputPipe>, 2> pipes;  // stdout, stderr
    bool reaped = false;
    int exit_code = -1;
    absl::Time start;
    EventLoop::TimerId kill_timer = 0;
    EventLoop::TimerId drain_timer = 0;
  };

  Job(std::string id, std::string dir, std::string fingerprint);

  void StartNextStep();
  void OnOutput(int stream_index);
  void AppendOutput(int stream_index, absl::string_view data);
  void ClosePipe(int stream_index);
  void OnLeaderExit();
  void MaybeStepDone();
  void StepFinished();
  void Finish(proto::StepResult::Status status, proto::StatusError::Kind kind,
              const std::string& message, int exit_code);
  void WriteRecord(const proto::ProcessGroupRecord* running_group);
  void RemoveFolders();
  std::string Mask(absl::string_view text) const;
  void Emit(proto::FollowStepsResponse::Kind kind, const proto::StepResult* step);

  const std::string id_;
  const std::string dir_;
  const std::string fingerprint_;
  JobConfig config_;
  EventLoop* loop_ = nullptr;
  FinishedCallback on_finished_;
  std::shared_ptr<logs::JobLog> log_;
  std::shared_ptr<logs::EventLog> events_;

  // Loop-thread state.
  bool started_ = false;
  size_t next_step_ = 0;
  std::optional<LiveStep> live_;
  std::optional<std::pair<proto::StatusError::Kind, std::string>> cancel_;
  EventLoop::TimerId timeout_timer_ = 0;
  int last_exit_code_ = 0;
  absl::Status log_error_;

  mutable absl::Mutex mu_;
  proto::Status status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool delete_when_finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace step_runner::runner

#endif  // STEP_RUNNER_RUNNER_JOB_H_

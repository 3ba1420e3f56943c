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
#include "step-runner/engine/engine.h"
#include "step-runner/logs/event_log.h"
#include "step-runner/logs/job_log.h"
#include "step-runner/logs/masker.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::runner {

// A process started before its step was known (the sandbox's warm pool), already told what to
// run: the runner adopts it as the step's process instead of spawning one. Its stdout and
// stderr (and warnings) come through pipes whose read ends are here.
struct PreparedProcess {
  process::Subprocess child;  // a process group leader, like a spawned step
  UniqueFd stdout_read;       // non-blocking
  UniqueFd stderr_read;
  std::optional<UniqueFd> warnings_read;  // as PlannedStep::warnings_channel
  // Where the process reports its step's exit code ("N\n") once the step is over, before it
  // exits itself (a sandbox's teardown can take it milliseconds more): the runner takes the step
  // as ended then, closes this channel kSandboxTeardownDelay later (the process exits when it
  // is closed), and reaps the process whenever it does exit.
  std::optional<UniqueFd> exit_report;
};
inline constexpr absl::Duration kSandboxTeardownDelay = absl::Milliseconds(20);
// How long after a job's end its step-results.json is written (see Job::Finish).
inline constexpr absl::Duration kStepResultsDelay = absl::Milliseconds(10);

// One process to run, fully resolved: argv, env and work dir.
struct PlannedStep {
  std::string name;
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "KEY=VALUE"
  std::string work_dir;
  // The step asked for network access (the sandbox's policy decides what it gets).
  bool wants_network = false;
  // Set by a LaunchHook: explains an exit that a resource limit caused (the job then ends with
  // error kind resource_exhausted and this message); nullopt for an ordinary exit.
  std::function<std::optional<std::string>(int exit_code)> explain_exit;
  // Set by a LaunchHook: the process gets a pipe on fd 3, and each line it writes there becomes
  // a WARNING step event (the sandbox helper's budget warnings). The step itself never sees
  // fd 3: the helper closes it before bwrap runs, so a step cannot forge these events.
  bool warnings_channel = false;
  // Set by a LaunchHook instead of rewriting argv: the process that runs this step, already
  // started; argv, env and work_dir are then not used.
  std::optional<PreparedProcess> prepared;
};

// What a LaunchHook knows of the job a process belongs to.
struct LaunchContext {
  std::string job_id;
  std::string job_dir;       // the job's state folder (the step must not see it)
  std::string job_work_dir;  // the job's work tree (the step may write there)
  // Where the step's ${{ output_file }} and ${{ export_file }} live: the step MUST be able to
  // write here (bind it writable inside the sandbox even though it is under job_dir).
  std::string io_dir;
  // The job's own file variables (empty: it has none); only these may be shown to its steps.
  std::string secrets_dir;
  // The job's request asked for network for all its steps (STEP_RUNNER_NETWORK=1 in its env).
  // From the request only: a step's own environment can be changed by earlier steps' exports.
  bool job_asks_network = false;
};
// Rewrites a process right before it is spawned: the step sandbox wraps argv here. An error
// fails the step with the error's message, and nothing is spawned.
using LaunchHook = std::function<absl::Status(const LaunchContext&, PlannedStep&)>;
// Sees every step event of every job as it is recorded (the audit log).
using StepEventHook = std::function<void(const std::string& job_id, const proto::FollowStepsResponse&)>;

struct JobConfig {
  std::string id;
  std::string dir;            // the job's state folder: record.pb, log, log.idx
  std::string secrets_dir;    // file variables; removed when the job ends
  std::string work_dir;
  std::string fingerprint;    // salted hash of the RunRequest, for idempotency
  engine::JobSpec spec;       // what runs: the step tree, inputs, env
  std::vector<std::string> secrets;  // masked in the log and in messages
  absl::Duration timeout = absl::InfiniteDuration();
  absl::Duration graceful_exit_timeout = absl::Seconds(30);
  absl::Duration drain_timeout = absl::Seconds(2);
  LaunchHook launch_hook;          // unset: processes run as planned
  StepEventHook step_event_hook;   // unset: events only go to the job's event log
};

// A job's life: the step engine walks its step tree on a thread of its own, and that thread
// also runs the job's processes one at a time: it spawns each, puts its output through the
// masker into the JobLog, watches for its end and its deadlines, and ends the job. Every state
// change is written to record.pb so that a restarted daemon knows what happened. The event loop
// keeps the job's timeout and what outlives a step (a sandbox's teardown).
//
// Start runs on the loop thread; RequestCancel and ForceKill on any thread (they wake the
// engine's thread, which signals the process); status() and the accessors are thread-safe.
class Job : public std::enable_shared_from_this<Job>, private engine::Host {
 public:
  using FinishedCallback = std::function<void(Job&)>;

  // A job that starts now (call Start on the loop thread). Its step engine runs on a thread
  // from `engine_threads`.
  static absl::StatusOr<std::shared_ptr<Job>> Create(JobConfig config, EventLoop* loop, ThreadCache* engine_threads,
                                                     FinishedCallback on_finished);
  // A job read back from record.pb (a previous daemon's); it is finished. `interrupted`: the
  // previous daemon died while it ran, and its event stream gets the job-finished event now.
  static absl::StatusOr<std::shared_ptr<Job>> Recover(const std::string& dir,
                                                      proto::JobRecord record, bool interrupted);

  ~Job() override;

  // Starting a job is two calls, in this order: Start posted to the loop when the job has a
  // timeout (it sets the timer), then StartEngine on the caller's thread. The job's end posts
  // the timer's cancel to the loop, so it comes after Start however fast the job is; and the
  // engine starts without waiting for the loop's next turn, which was ~0.1 ms of every run.
  bool HasTimeout() const;
  void Start();
  void StartEngine();
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
  // STEP_RUNNER_NETWORK=1 in the job's own environment (its request), not in a step's.
  bool JobAsksNetwork() const;
  struct OutputPipe {
    UniqueFd fd;
    logs::StreamMasker masker;
  };
  // The step whose process runs, on the engine's thread.
  struct LiveStep {
    process::Subprocess child;
    std::array<std::optional<OutputPipe>, 2> pipes;  // stdout, stderr
    bool ended = false;   // the step's exit code is known (reaped, or reported)
    bool reaped = false;
    std::optional<UniqueFd> exit_report;  // PreparedProcess::exit_report
    bool exit_report_watched = false;     // not yet said, nor closed
    std::string exit_report_text;
    int exit_code = -1;
    absl::Time deadline = absl::InfiniteFuture();     // the step's own timeout
    absl::Time kill_at = absl::InfiniteFuture();      // SIGKILL, after a SIGTERM it ignores
    absl::Time drain_until = absl::InfiniteFuture();  // once ended: the grace for its pipes
    bool timed_out = false;
    std::string path;                 // the step's path, for its warning events
    std::optional<UniqueFd> warnings;  // PlannedStep::warnings_channel
    std::string warnings_partial;      // a line not yet ended
  };

  Job(std::string id, std::string dir, std::string fingerprint);

  // engine::Host, on the engine's thread.
  engine::ProcessOutcome RunProcess(const engine::ProcessSpec& spec) override;
  void Log(absl::string_view line) override;
  void Publish(const proto::StepResult& tree, const proto::StepResult& node, const std::string& path,
               bool finished) override;
  void AddSecret(const std::string& value) override;
  bool Cancelled() override;
  bool SleepUnlessCancelled(absl::Duration d) override;

  // The live step, on the engine's thread: its output, its end, its deadlines, and the
  // requests (cancel, kill) that Kick announces; returns once it has ended and its pipes are
  // drained (or given up on).
  void WatchLive();
  void OnKick();
  void Kick() ABSL_EXCLUSIVE_LOCKS_REQUIRED(cancel_mu_);  // any thread
  void SignalCancel();
  void SignalLive(int signo);
  void OnOutput(int stream_index);
  void AppendOutput(int stream_index, absl::string_view data);
  void ClosePipe(int stream_index);
  void OnWarnings();
  void OnLeaderExit();
  void OnExitReport();
  void StepEnded(int exit_code);
  engine::ProcessOutcome StepFinished(const std::function<std::optional<std::string>(int)>& explain_exit);
  // Reaps a process that reported its step's end and has not exited yet, when it does; its
  // exit report channel is closed (which lets it go) after kSandboxTeardownDelay. On the loop.
  void Linger(process::Subprocess child, std::optional<UniqueFd> exit_report);
  // The engine is done: the job ends (on the engine's thread).
  void End(engine::JobOutcome outcome);
  void Finish(proto::StepResult::Status status, proto::StatusError::Kind kind,
              const std::string& message, int exit_code);
  void WriteRecord(const proto::ProcessGroupRecord* running_group);
  void RemoveFolders();
  // step-results.json, unless the folders are gone. Runs on the loop after the job's end is out.
  void WriteStepResults();
  std::string Mask(absl::string_view text) const;
  proto::FollowStepsResponse MakeEvent(proto::FollowStepsResponse::Kind kind, const proto::StepResult* step,
                                       const std::string& path = "", const std::string& warning = "") const;
  // Appends `event` to the events file, and gives it to the step-event hook now or keeps it for
  // RunDeferredHooks.
  void Record(proto::FollowStepsResponse event, bool hook_now);
  // Records the events Publish queued, in order: all of them, or those up to the last step end.
  void RecordQueued(bool hook_now, bool through_last_finished = false);
  void RunDeferredHooks();

  const std::string id_;
  const std::string dir_;
  const std::string fingerprint_;
  JobConfig config_;
  EventLoop* loop_ = nullptr;
  ThreadCache* engine_threads_ = nullptr;
  FinishedCallback on_finished_;
  std::shared_ptr<logs::JobLog> log_;
  std::shared_ptr<logs::EventLog> events_;

  // Loop-thread state.
  EventLoop::TimerId timeout_timer_ = 0;

  // The engine thread's state.
  std::optional<LiveStep> live_;
  std::vector<proto::FollowStepsResponse> queued_;    // published, not yet recorded
  std::vector<proto::FollowStepsResponse> unhooked_;  // recorded, not yet given to the hook
  int last_exit_code_ = 0;
  absl::Status log_error_;

  // What the engine's thread waits on while a step runs; a source's slot rides in its events.
  UniqueFd epoll_;
  enum WatchSlot : uint32_t { kStdout, kStderr, kWarnings, kExitReport, kLeader, kKick };

  // Requests from other threads; Kick wakes the engine's thread for them.
  absl::Mutex cancel_mu_;
  // An eventfd while the engine runs. Closed (under the lock) by the engine's thread, which
  // alone reads it without the lock.
  UniqueFd kick_;
  std::optional<std::pair<proto::StatusError::Kind, std::string>> cancel_ ABSL_GUARDED_BY(cancel_mu_);
  bool force_kill_ ABSL_GUARDED_BY(cancel_mu_) = false;

  mutable absl::Mutex mu_;
  proto::Status status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool delete_when_finished_ ABSL_GUARDED_BY(mu_) = false;

  // Held while the job's folder is written after its end (step-results.json) or removed, which
  // a Close does from its own thread.
  absl::Mutex folder_mu_;
  bool folders_removed_ ABSL_GUARDED_BY(folder_mu_) = false;
};

}  // namespace step_runner::runner

#endif  // STEP_RUNNER_RUNNER_JOB_H_

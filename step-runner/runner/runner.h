#ifndef STEP_RUNNER_RUNNER_RUNNER_H_
#define STEP_RUNNER_RUNNER_RUNNER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/step_runner.pb.h"
#include "step-runner/base/event_loop.h"
#include "step-runner/logs/job_log.h"
#include "step-runner/engine/loader.h"
#include "step-runner/runner/job.h"

namespace step_runner::runner {

struct RunnerOptions {
  std::string state_dir;
  // Environment every step starts from ("KEY=VALUE"), before the request's env and variables.
  std::vector<std::string> base_env;
  absl::Duration default_graceful_exit_timeout = absl::Seconds(30);
  // After a step's leader exits, how long descendants that escaped its group may keep its
  // output pipes open before the step is declared done without them.
  absl::Duration drain_timeout = absl::Seconds(2);
  // Retention of finished jobs; running jobs are never dropped.
  size_t max_retained_jobs = 10000;
  absl::Duration max_job_age = absl::Hours(24 * 7);
  // Where file variables go: a memory-backed folder when possible, so secrets never reach
  // disk. Empty: /dev/shm if writable, else the state dir.
  std::string secrets_root;
  // dist:// steps (the catalog); empty: none.
  std::string catalog_dir;
  // Git steps' cache; empty: <state_dir>/step-cache.
  std::string step_cache_dir;
  // Every step process passes through this before it is spawned (the sandbox); unset: as is.
  LaunchHook launch_hook;
  // Checks a job's work tree when the job is asked for (the sandbox refuses some), so that Run
  // answers INVALID_ARGUMENT and nothing starts; unset: any absolute folder.
  std::function<absl::Status(const std::string& work_tree, const std::string& job_dir)> check_work_tree;
  // Every job's step events, as recorded (the audit log).
  StepEventHook step_event_hook;
};

// The daemon's core, with no gRPC types: validates and starts jobs, answers status queries,
// cancels and closes jobs, and keeps the job table durable in `state_dir`. On creation it
// recovers the previous daemon's jobs: finished ones as they were, running ones as failed
// with error kind `interrupted`, after killing their leftover process groups.
//
// Thread-safe.
class Runner {
 public:
  static absl::StatusOr<std::unique_ptr<Runner>> Create(RunnerOptions options);
  ~Runner();

  // Validates synchronously (INVALID_ARGUMENT naming the problem; nothing starts), then runs the
  // job in the background. Idempotent by id: the same request again is OK and starts nothing;
  // another request with a used id is FAILED_PRECONDITION.
  absl::Status Run(const proto::RunRequest& request);
  // Graceful cancel: SIGTERM to the live step's group, SIGKILL after the grace. NOT_FOUND for an
  // unknown id; OK (no-op) for a finished job.
  absl::Status Cancel(const std::string& id);
  // Cancels if running and deletes the job's state. Idempotent: unknown ids are OK.
  absl::Status Close(const std::string& id);
  // One job (NOT_FOUND if unknown), or every retained job when `id` is empty, oldest first.
  absl::StatusOr<std::vector<proto::Status>> GetStatus(const std::string& id) const;
  // The job itself (its log, events and status stay valid for the holder even after Close).
  absl::StatusOr<std::shared_ptr<const Job>> GetJob(const std::string& id) const;

  // Refuses new jobs, cancels running ones gracefully, and waits up to `deadline` for them to
  // end. Their final states are recorded.
  void Shutdown(absl::Duration deadline);

 private:
  explicit Runner(RunnerOptions options);
  absl::Status Init();
  absl::Status Recover();
  absl::StatusOr<JobConfig> Plan(const proto::RunRequest& request, const std::string& dir_name);
  std::string Fingerprint(const proto::RunRequest& request) const;
  void OnJobFinished(Job& job);
  void Prune();

  RunnerOptions options_;
  std::string jobs_dir_;
  std::string salt_;
  std::unique_ptr<EventLoop> loop_;
  ThreadCache engine_threads_;
  std::unique_ptr<engine::StepLoader> loader_;
  steps::ParsedStepFiles parsed_files_;  // Run requests' step files

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  // The retained finished jobs, oldest end first, so that pruning drops from the front instead
  // of sorting the whole table on every job's end.
  std::multimap<absl::Time, std::shared_ptr<Job>> finished_by_end_ ABSL_GUARDED_BY(mu_);
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
};

// Validation shared with the client: ids are 1..256 bytes of printable characters.
absl::Status ValidateJobId(const std::string& id);

}  // namespace step_runner::runner

#endif  // STEP_RUNNER_RUNNER_RUNNER_H_

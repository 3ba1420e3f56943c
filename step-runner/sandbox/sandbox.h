#ifndef STEP_RUNNER_SANDBOX_SANDBOX_H_
#define STEP_RUNNER_SANDBOX_SANDBOX_H_

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/step_runner.pb.h"
#include "step-runner/base/event_loop.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/process/subprocess.h"
#include "step-runner/runner/job.h"
#include "step-runner/sandbox/cgroup.h"
#include "step-runner/sandbox/policy.h"

namespace step_runner::sandbox {

struct SandboxOptions {
  NetworkMode network = NetworkMode::kNone;
  std::vector<HostPort> allowed;  // for kAllow
  Limits limits;
  std::string state_dir;    // hidden from steps
  std::string socket_path;  // its folder is hidden from steps
  std::string secrets_root;  // hidden, except the running job's own file variables
  // Hidden unless the step is granted network (the git credential store: the steps that push
  // are the steps that need the network).
  std::vector<std::string> token_stores;
  std::vector<std::string> hidden;  // always hidden
  std::string bwrap;   // empty: "bwrap" in PATH
  std::string helper;  // empty: step-runner-sandbox beside the running binary
  // Sandboxes made ahead of their steps (see README.md, "Warm sandboxes"); 0: every sandbox is
  // made when its step starts.
  int warm = 2;
};

// The daemon's side of the step sandbox: wraps every step process in the helper and bwrap (the
// runner's launch hook), keeps one cgroup per running job, and says which policy a step got.
// Thread-safe.
class Sandbox {
 public:
  // Checks, by running a real sandboxed /bin/true through the helper, that bwrap can create its
  // namespaces here; FAILED_PRECONDITION naming the fixes if not.
  static absl::StatusOr<std::unique_ptr<Sandbox>> Create(SandboxOptions options);
  ~Sandbox();

  // runner::LaunchHook.
  absl::Status Launch(const runner::LaunchContext& context, runner::PlannedStep& step);
  // RunnerOptions::check_work_tree: INVALID_ARGUMENT for a tree the sandbox would not bind (a
  // system folder, or one that would show steps what the daemon hides). Launch checks again.
  absl::Status CheckJobWorkTree(const std::string& work_tree, const std::string& job_dir) const;
  // runner::StepEventHook (frees a finished job's cgroup).
  void OnStepEvent(const std::string& job_id, const proto::FollowStepsResponse& event);

  // What the last step of `job_id` ran under, for the audit log.
  struct Grant {
    std::string policy;   // e.g. "bwrap memory=4294967296 cpu=3600s procs=1024 files=4096 output=1073741824"
    std::string network;  // none, all, or allow:host:port,...
  };
  Grant LastGrant(const std::string& job_id) const;
  // One line for the start-up log.
  std::string Describe() const;

 private:
  explicit Sandbox(SandboxOptions options) : options_(std::move(options)) {}
  absl::Status Init();

  struct JobSlot {
    int number = 0;
    std::string work_tree;
    JobCgroup cgroup;  // made at the job's first cold step
    std::vector<JobCgroup> warm_cgroups;  // of the warm sandboxes its steps took
    Grant grant;
  };

  // A sandbox made ahead of its step: the helper waits for the claim on its stdin, bwrap has
  // made (or is making) the namespaces and mounts, and the stub inside waits for its spec.
  struct WarmSandbox {
    process::Subprocess helper;
    UniqueFd claim;  // the helper's stdin, a socket: the claim goes in, the exit code comes back
    UniqueFd spec;   // the stub's fd 3
    UniqueFd stdout_read, stderr_read, warnings_read;
    JobCgroup cgroup;
    std::vector<MountOp> premounted;  // what bwrap hid before the step was known
  };

  // The daemon's own folders (state, socket, secrets, --hide) and, for a step without
  // network, the token stores: hidden from every step.
  std::vector<std::string> DaemonWideHidden(NetworkMode network) const;
  // INVALID_ARGUMENT if binding `work_tree` (resolved; `named` as the job gave it) would show
  // steps what the daemon hides.
  absl::Status CheckTreeAgainstHidden(const std::string& work_tree, const std::string& named,
                                      const std::string& job_dir) const;

  absl::StatusOr<WarmSandbox> MakeWarm();
  // Asks for the pool to be topped up to options_.warm in `delay` (from now: a later request
  // puts an earlier one off).
  void RequestRefill(absl::Duration delay);
  bool RefillShouldWake() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RefillLoop();  // refill_thread_
  void Refill();
  // Waits for the helper's "R" (bwrap has made the sandbox) on the claim socket.
  absl::Status AwaitReady(WarmSandbox& warm);
  // The oldest warm sandbox (all in the pool are ready), if any; dead ones are thrown away.
  std::optional<WarmSandbox> TakeWarm();
  // Sends `spec` to the stub and `claim` to the helper; the step then runs.
  static absl::Status SendClaim(WarmSandbox& warm, const WarmClaim& claim, const StubSpec& spec);
  // Kills and reaps it off the caller's thread, and removes its cgroup.
  void Discard(WarmSandbox warm);
  // Runs /bin/true in a warm sandbox; its error says what went wrong.
  absl::Status ProbeWarm();

  SandboxOptions options_;
  CgroupRoot cgroups_;
  std::vector<Forward> forwards_;
  std::string hosts_file_;

  // Removing a cgroup waits for its killed processes to be reaped; that happens here, off the
  // runner's event loop (which calls OnStepEvent before it ends the job's streams).
  std::unique_ptr<SerialExecutor> cleanup_ = std::make_unique<SerialExecutor>();
  // Makes warm sandboxes, off the runner's event loop (a spawn takes a millisecond or so).
  std::thread refill_thread_;

  mutable absl::Mutex mu_;
  std::map<std::string, JobSlot> jobs_ ABSL_GUARDED_BY(mu_);
  int next_slot_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<WarmSandbox> warm_ ABSL_GUARDED_BY(mu_);  // ready ones only
  int next_warm_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time refill_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time refill_waiting_for_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
};

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_SANDBOX_H_

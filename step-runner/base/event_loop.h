#ifndef STEP_RUNNER_BASE_EVENT_LOOP_H_
#define STEP_RUNNER_BASE_EVENT_LOOP_H_

#include <sys/epoll.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner {

// One thread that owns every watched fd and timer: epoll over the fds, an eventfd for posted
// work, and a timeout computed from the nearest deadline. Callbacks run on the loop thread,
// one at a time, so state touched only from callbacks needs no locking.
//
// Post() and PostDelayed() are thread-safe. WatchFd/UnwatchFd/AddTimer/CancelTimer must be
// called on the loop thread (from a callback or a posted task).
class EventLoop {
 public:
  using FdCallback = std::function<void(uint32_t epoll_events)>;
  using TimerId = uint64_t;

  static absl::StatusOr<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();  // stops and joins the thread

  void Post(std::function<void()> task);
  // Runs `task` on the loop `delay` from now (or when the loop stops, if sooner), without waking
  // the loop before then: for work that must not compete with what the caller is finishing
  // (each immediate wake-up of the loop's thread costs a small VM tens of microseconds).
  void PostDelayed(absl::Duration delay, std::function<void()> task);
  // Posts `task` and blocks until it has run (must not be called on the loop thread).
  void RunSync(std::function<void()> task);
  bool InLoopThread() const;

  absl::Status WatchFd(int fd, uint32_t events, FdCallback callback);
  void UnwatchFd(int fd);
  TimerId AddTimer(absl::Duration delay, std::function<void()> callback);
  void CancelTimer(TimerId id);

  // Stops the loop after the tasks already posted; idempotent.
  void Stop();

 private:
  EventLoop(UniqueFd epoll, UniqueFd wake, UniqueFd delayed_timer);
  void Loop();
  void Wake();
  // The delayed tasks that are due (all of them when `all`), in order; re-arms the timer.
  std::vector<std::function<void()>> TakeDueDelayed(bool all) ABSL_LOCKS_EXCLUDED(mu_);
  void ArmDelayedTimer(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  UniqueFd epoll_fd_;
  UniqueFd wake_fd_;
  UniqueFd delayed_timer_fd_;  // a timerfd, armed for the earliest delayed task
  std::thread thread_;

  absl::Mutex mu_;
  std::vector<std::function<void()>> posted_ ABSL_GUARDED_BY(mu_);
  std::multimap<absl::Time, std::function<void()>> delayed_ ABSL_GUARDED_BY(mu_);
  absl::Time delayed_timer_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  // Loop-thread state.
  absl::flat_hash_map<int, std::shared_ptr<FdCallback>> fd_callbacks_;
  std::multimap<absl::Time, TimerId> timers_by_deadline_;
  absl::flat_hash_map<TimerId, std::pair<std::multimap<absl::Time, TimerId>::iterator,
                                         std::function<void()>>> timers_;
  TimerId next_timer_id_ = 1;
};

// Runs tasks in order on one background thread. Thread-safe.
class SerialExecutor {
 public:
  SerialExecutor();
  ~SerialExecutor();  // runs what is queued, then joins
  void Post(std::function<void()> task);

 private:
  void Loop();
  absl::Mutex mu_;
  std::vector<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Runs each task on a thread of its own at once, for tasks that block for long (a job's step
// engine waits on its processes), where a fixed pool would make tasks wait for each other. A
// thread whose task is done parks for `park_time` and takes the next task, so a busy daemon
// does not start (mmap, clone) and join a thread per job: that was ~0.1-0.2 ms of every
// job's run to completion on our VMs (BENCHMARKS.md, fifth session). Thread-safe.
class ThreadCache {
 public:
  explicit ThreadCache(absl::Duration park_time = absl::Seconds(30), int max_parked = 4);
  // Parked threads exit. Tasks still running finish on their threads, which then exit: nothing
  // waits for them (the daemon's shutdown has its own deadline for its jobs).
  ~ThreadCache();
  ThreadCache(const ThreadCache&) = delete;
  ThreadCache& operator=(const ThreadCache&) = delete;

  void Run(std::function<void()> task);

  int parked_for_test() const;

 private:
  struct State;
  static void Work(std::shared_ptr<State> state, std::function<void()> task);
  std::shared_ptr<State> state_;
};

}  // namespace step_runner

#endif  // STEP_RUNNER_BASE_EVENT_LOOP_H_

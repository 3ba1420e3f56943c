#include "step-runner/base/event_loop.h"

#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"

namespace step_runner {

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create() {
  UniqueFd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return ErrnoStatus(errno, "epoll_create1");
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return ErrnoStatus(errno, "eventfd");
  epoll_event ev{.events = EPOLLIN, .data = {.fd = wake.get()}};
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0) {
    return ErrnoStatus(errno, "epoll_ctl(eventfd)");
  }
  UniqueFd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!timer) return ErrnoStatus(errno, "timerfd_create");
  epoll_event timer_ev{.events = EPOLLIN, .data = {.fd = timer.get()}};
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, timer.get(), &timer_ev) != 0) {
    return ErrnoStatus(errno, "epoll_ctl(timerfd)");
  }
  return std::unique_ptr<EventLoop>(new EventLoop(std::move(epoll), std::move(wake), std::move(timer)));
}

EventLoop::EventLoop(UniqueFd epoll, UniqueFd wake, UniqueFd delayed_timer)
    : epoll_fd_(std::move(epoll)), wake_fd_(std::move(wake)), delayed_timer_fd_(std::move(delayed_timer)) {
  thread_ = std::thread([this] { Loop(); });
}

EventLoop::~EventLoop() {
  Stop();
  if (thread_.joinable()) thread_.join();
}

bool EventLoop::InLoopThread() const { return std::this_thread::get_id() == thread_.get_id(); }

void EventLoop::Wake() {
  uint64_t one = 1;
  ssize_t unused = ::write(wake_fd_.get(), &one, sizeof one);
  (void)unused;  // EAGAIN means a wake-up is already pending.
}

void EventLoop::Post(std::function<void()> task) {
  {
    absl::MutexLock lock(&mu_);
    posted_.push_back(std::move(task));
  }
  Wake();
}

void EventLoop::PostDelayed(absl::Duration delay, std::function<void()> task) {
  const absl::Time deadline = absl::Now() + std::max(delay, absl::ZeroDuration());
  absl::MutexLock lock(&mu_);
  delayed_.emplace(deadline, std::move(task));
  if (deadline < delayed_timer_at_) ArmDelayedTimer(deadline);
}

void EventLoop::ArmDelayedTimer(absl::Time deadline) {
  delayed_timer_at_ = deadline;
  itimerspec spec{};
  if (deadline != absl::InfiniteFuture()) {
    // Relative, rounded up to a microsecond and never zero (zero would disarm it).
    const absl::Duration left = std::max(deadline - absl::Now(), absl::Microseconds(1));
    spec.it_value = absl::ToTimespec(absl::Ceil(left, absl::Microseconds(1)));
  }
  if (::timerfd_settime(delayed_timer_fd_.get(), 0, &spec, nullptr) != 0) {
    SR_PLOG(ERROR) << "timerfd_settime";
    Wake();  // the loop looks at the delayed tasks on every turn
  }
}

std::vector<std::function<void()>> EventLoop::TakeDueDelayed(bool all) {
  std::vector<std::function<void()>> due;
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  while (!delayed_.empty() && (all || delayed_.begin()->first <= now)) {
    due.push_back(std::move(delayed_.begin()->second));
    delayed_.erase(delayed_.begin());
  }
  ArmDelayedTimer(delayed_.empty() ? absl::InfiniteFuture() : delayed_.begin()->first);
  return due;
}

void EventLoop::RunSync(std::function<void()> task) {
  absl::Notification done;
  Post([&] {
    task();
    done.Notify();
  });
  done.WaitForNotification();
}

void EventLoop::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  Wake();
}

absl::Status EventLoop::WatchFd(int fd, uint32_t events, FdCallback callback) {
  epoll_event ev{.events = events, .data = {.fd = fd}};
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return ErrnoStatus(errno, absl::StrCat("epoll_ctl(ADD, ", fd, ")"));
  }
  fd_callbacks_[fd] = std::make_shared<FdCallback>(std::move(callback));
  return absl::OkStatus();
}

void EventLoop::UnwatchFd(int fd) {
  if (fd_callbacks_.erase(fd) > 0) ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

EventLoop::TimerId EventLoop::AddTimer(absl::Duration delay, std::function<void()> callback) {
  TimerId id = next_timer_id_++;
  auto it = timers_by_deadline_.emplace(absl::Now() + delay, id);
  timers_.emplace(id, std::make_pair(it, std::move(callback)));
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  auto it = timers_.find(id);
  if (it == timers_.end()) return;
  timers_by_deadline_.erase(it->second.first);
  timers_.erase(it);
}

void EventLoop::Loop() {
  epoll_event events[64];
  for (;;) {
    int timeout_ms = -1;
    if (!timers_by_deadline_.empty()) {
      absl::Duration until = timers_by_deadline_.begin()->first - absl::Now();
      timeout_ms = until <= absl::ZeroDuration()
                       ? 0
                       : static_cast<int>(absl::ToInt64Milliseconds(until + absl::Milliseconds(1)));
    }
    int n = ::epoll_wait(epoll_fd_.get(), events, 64, timeout_ms);
    if (n < 0 && errno != EINTR) {
      SR_PLOG(ERROR) << "epoll_wait";
      continue;
    }
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (fd == wake_fd_.get() || fd == delayed_timer_fd_.get()) {
        uint64_t count;
        ssize_t unused = ::read(fd, &count, sizeof count);
        (void)unused;
        continue;
      }
      auto it = fd_callbacks_.find(fd);
      if (it == fd_callbacks_.end()) continue;  // unwatched by an earlier callback this round
      std::shared_ptr<FdCallback> callback = it->second;  // survives UnwatchFd inside itself
      (*callback)(events[i].events);
    }
    absl::Time now = absl::Now();
    while (!timers_by_deadline_.empty() && timers_by_deadline_.begin()->first <= now) {
      TimerId id = timers_by_deadline_.begin()->second;
      auto it = timers_.find(id);
      std::function<void()> callback = std::move(it->second.second);
      timers_by_deadline_.erase(timers_by_deadline_.begin());
      timers_.erase(it);
      callback();
    }
    std::vector<std::function<void()>> tasks;
    bool stop;
    {
      absl::MutexLock lock(&mu_);
      tasks.swap(posted_);
      stop = stopping_;
    }
    for (auto& task : tasks) task();
    // Delayed tasks that are due; at a stop, all of them (their work is not dropped).
    bool any_delayed;
    {
      absl::MutexLock lock(&mu_);
      any_delayed = !delayed_.empty() && (stop || delayed_.begin()->first <= absl::Now());
    }
    if (any_delayed) {
      for (auto& task : TakeDueDelayed(stop)) task();
    }
    if (stop) {
      absl::MutexLock lock(&mu_);
      if (posted_.empty() && delayed_.empty()) return;
    }
  }
}

SerialExecutor::SerialExecutor() { thread_ = std::thread([this] { Loop(); }); }

SerialExecutor::~SerialExecutor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void SerialExecutor::Post(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
}

void SerialExecutor::Loop() {
  for (;;) {
    std::vector<std::function<void()>> tasks;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !queue_.empty() || stopping_;
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and nothing left to run
      tasks.swap(queue_);
    }
    for (auto& task : tasks) task();
  }
}

struct ThreadCache::State {
  State(absl::Duration park_time, int max_parked) : park_time(park_time), max_parked(max_parked) {}
  const absl::Duration park_time;
  const int max_parked;
  mutable absl::Mutex mu;
  // Tasks handed to parked threads, each promised to one of them: the parked threads without a
  // task are parked - handed.size().
  std::deque<std::function<void()>> handed ABSL_GUARDED_BY(mu);
  int parked ABSL_GUARDED_BY(mu) = 0;  // threads waiting in Work
  bool stopping ABSL_GUARDED_BY(mu) = false;
};

ThreadCache::ThreadCache(absl::Duration park_time, int max_parked)
    : state_(std::make_shared<State>(park_time, max_parked)) {}

ThreadCache::~ThreadCache() {
  absl::MutexLock lock(&state_->mu);
  state_->stopping = true;
}

void ThreadCache::Run(std::function<void()> task) {
  {
    absl::MutexLock lock(&state_->mu);
    if (state_->parked > static_cast<int>(state_->handed.size()) && !state_->stopping) {
      state_->handed.push_back(std::move(task));
      return;
    }
  }
  // Detached: the thread holds the state, and the cache may be destroyed before it is done.
  std::thread(&ThreadCache::Work, state_, std::move(task)).detach();
}

int ThreadCache::parked_for_test() const {
  absl::MutexLock lock(&state_->mu);
  return state_->parked;
}

void ThreadCache::Work(std::shared_ptr<State> state, std::function<void()> task) {
  for (;;) {
    task();
    task = nullptr;  // what it captured goes now, not when the next task comes
    absl::MutexLock lock(&state->mu);
    if (state->stopping || state->parked >= state->max_parked) return;
    ++state->parked;
    auto ready = [&state]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state->mu) {
      return state->stopping || !state->handed.empty();
    };
    state->mu.AwaitWithTimeout(absl::Condition(&ready), state->park_time);
    --state->parked;
    // A task handed over just as the park ran out is still taken: it was promised to a parked
    // thread, and this is one.
    if (!state->handed.empty()) {
      task = std::move(state->handed.front());
      state->handed.pop_front();
      continue;
    }
    return;  // timed out or stopping, with no task promised to it
  }
}

}  // namespace step_runner

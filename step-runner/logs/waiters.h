#ifndef STEP_RUNNER_LOGS_WAITERS_H_
#define STEP_RUNNER_LOGS_WAITERS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

namespace step_runner::logs {

// One-shot wake-up callbacks of a growing log. Not thread-safe by itself: the owning log guards
// it with its mutex, takes the callbacks out under the lock, and runs them after unlocking.
class Waiters {
 public:
  using Id = uint64_t;

  Id Add(std::function<void()> wake) {
    Id id = next_++;
    waiters_.emplace(id, std::move(wake));
    return id;
  }
  void Remove(Id id) { waiters_.erase(id); }
  std::vector<std::function<void()>> TakeAll() {
    std::vector<std::function<void()>> out;
    out.reserve(waiters_.size());
    for (auto& [id, wake] : waiters_) out.push_back(std::move(wake));
    waiters_.clear();
    return out;
  }

 private:
  std::map<Id, std::function<void()>> waiters_;
  Id next_ = 1;
};

// Runs callbacks taken out with TakeAll (outside the owner's lock).
inline void WakeAll(std::vector<std::function<void()>> woken) {
  for (auto& wake : woken) wake();
}

}  // namespace step_runner::logs

#endif  // STEP_RUNNER_LOGS_WAITERS_H_

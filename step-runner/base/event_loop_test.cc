#include "step-runner/base/event_loop.h"

#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner {
namespace {

TEST(EventLoopTest, PostDelayedRunsAfterItsDelayInDeadlineOrder) {
  SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::Create());
  absl::Mutex mu;
  std::string order;
  absl::Time ran_late;
  absl::Notification all_ran;
  const absl::Time posted = absl::Now();
  // From another thread than the loop's, the later deadline first.
  std::thread poster([&] {
    loop->PostDelayed(absl::Milliseconds(80), [&] {
      absl::MutexLock lock(&mu);
      order += "late";
      ran_late = absl::Now();
      all_ran.Notify();
    });
    loop->PostDelayed(absl::Milliseconds(20), [&] {
      absl::MutexLock lock(&mu);
      order += "early,";
    });
  });
  poster.join();
  ASSERT_TRUE(all_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  absl::MutexLock lock(&mu);
  EXPECT_EQ(order, "early,late");
  EXPECT_GE(ran_late - posted, absl::Milliseconds(80));
}

TEST(EventLoopTest, PostedWorkDoesNotWaitForADelayedTask) {
  SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::Create());
  absl::Notification delayed_ran, posted_ran;
  loop->PostDelayed(absl::Seconds(30), [&] { delayed_ran.Notify(); });
  loop->Post([&] { posted_ran.Notify(); });
  ASSERT_TRUE(posted_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_FALSE(delayed_ran.HasBeenNotified());
}

TEST(EventLoopTest, DelayedTasksStillWaitingRunWhenTheLoopStops) {
  bool ran = false;
  {
    SR_ASSERT_OK_AND_ASSIGN(std::unique_ptr<EventLoop> loop, EventLoop::Create());
    loop->PostDelayed(absl::Hours(1), [&] { ran = true; });
  }  // the destructor stops and joins the loop
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace step_runner

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "step-runner/base/event_loop.h"

namespace step_runner {
namespace {

// Polls `done` for up to 10 s (thread start-up and parking are asynchronous).
template <typename F>
bool Eventually(F done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

TEST(ThreadCacheTest, BlockingTasksDoNotWaitForEachOther) {
  ThreadCache cache;
  absl::Notification first_running, second_done;
  std::atomic<bool> first_done{false};
  cache.Run([&] {
    first_running.Notify();
    // Blocks until the second task, started after this one, has run: only possible if the
    // second got a thread of its own.
    second_done.WaitForNotification();
    first_done = true;
  });
  first_running.WaitForNotification();
  cache.Run([&] { second_done.Notify(); });
  EXPECT_TRUE(second_done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_TRUE(Eventually([&] { return first_done.load(); }));
}

TEST(ThreadCacheTest, AFinishedThreadTakesTheNextTask) {
  ThreadCache cache;
  std::thread::id first_thread, second_thread;
  absl::Notification first, second;
  cache.Run([&] {
    first_thread = std::this_thread::get_id();
    first.Notify();
  });
  first.WaitForNotification();
  ASSERT_TRUE(Eventually([&] { return cache.parked_for_test() == 1; }));
  cache.Run([&] {
    second_thread = std::this_thread::get_id();
    second.Notify();
  });
  ASSERT_TRUE(second.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(first_thread, second_thread);
  EXPECT_TRUE(Eventually([&] { return cache.parked_for_test() == 1; }));
}

TEST(ThreadCacheTest, ParkedThreadsLeaveAfterTheParkTimeAndAtMostMaxParkedStay) {
  ThreadCache cache(absl::Seconds(2), /*max_parked=*/2);
  absl::Notification release;
  std::atomic<int> done{0};
  for (int i = 0; i < 4; ++i) {
    cache.Run([&] {
      release.WaitForNotification();
      ++done;
    });
  }
  release.Notify();
  ASSERT_TRUE(Eventually([&] { return done.load() == 4; }));
  // Four threads ran; two of them park, the others exit at once.
  ASSERT_TRUE(Eventually([&] { return cache.parked_for_test() == 2; }));
  EXPECT_TRUE(Eventually([&] { return cache.parked_for_test() == 0; }));
}

TEST(ThreadCacheTest, ATaskStillRunningWhenTheCacheGoesFinishes) {
  absl::Notification release;
  auto finished = std::make_shared<absl::Notification>();
  {
    ThreadCache cache;
    cache.Run([&release, finished] {
      release.WaitForNotification();
      finished->Notify();
    });
  }
  release.Notify();
  EXPECT_TRUE(finished->WaitForNotificationWithTimeout(absl::Seconds(10)));
}

}  // namespace
}  // namespace step_runner

#ifndef STEP_RUNNER_BASE_TESTING_H_
#define STEP_RUNNER_BASE_TESTING_H_

#include "gtest/gtest.h"

// Debian's abseil has no status matchers; these print the status on failure.
#define SR_EXPECT_OK(expr)                                   \
  do {                                                       \
    const auto& sr_s_ = (expr);                              \
    EXPECT_TRUE(sr_s_.ok()) << #expr << ": " << sr_s_;       \
  } while (0)
#define SR_ASSERT_OK(expr)                                   \
  do {                                                       \
    const auto& sr_s_ = (expr);                              \
    ASSERT_TRUE(sr_s_.ok()) << #expr << ": " << sr_s_;       \
  } while (0)
#define SR_ASSERT_OK_AND_ASSIGN(lhs, expr)                              \
  auto SR_TESTING_CONCAT_(sr_or_, __LINE__) = (expr);                   \
  ASSERT_TRUE(SR_TESTING_CONCAT_(sr_or_, __LINE__).ok())                \
      << #expr << ": " << SR_TESTING_CONCAT_(sr_or_, __LINE__).status(); \
  lhs = std::move(SR_TESTING_CONCAT_(sr_or_, __LINE__)).value()
#define SR_TESTING_CONCAT_INNER_(a, b) a##b
#define SR_TESTING_CONCAT_(a, b) SR_TESTING_CONCAT_INNER_(a, b)

#endif  // STEP_RUNNER_BASE_TESTING_H_

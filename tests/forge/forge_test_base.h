#ifndef STEP_RUNNER_TESTS_FORGE_FORGE_TEST_BASE_H_
#define STEP_RUNNER_TESTS_FORGE_FORGE_TEST_BASE_H_

#include <memory>

#include "gtest/gtest.h"
#include "tests/forge/forge_fixture.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {

// A gtest fixture with a fresh local forge (state in tmp_) per test.
class ForgeTestBase : public ::testing::Test {
 protected:
  void SetUp() override {
    auto forge = Forge::Start(tmp_.path() + "/forge");
    ASSERT_TRUE(forge.ok()) << forge.status();
    forge_ = *std::move(forge);
  }
  TempDir tmp_;
  std::unique_ptr<Forge> forge_;
};

}  // namespace step_runner::testing

#endif  // STEP_RUNNER_TESTS_FORGE_FORGE_TEST_BASE_H_

#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_TEMP_DIR_TEST_UTIL_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_TEMP_DIR_TEST_UTIL_H_

#include <stdlib.h>

#include <string>

#include "gtest/gtest.h"
#include "step-runner/base/files.h"

namespace step_runner::catalog {

// A test fixture with a fresh folder in dir_, removed with its content after the test.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/sr_catalog_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { (void)RemoveTree(dir_); }
  std::string dir_;
};

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_TEMP_DIR_TEST_UTIL_H_

#include "steps-catalog/helper/test_report.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "steps-catalog/helper/temp_dir_test_util.h"

namespace step_runner::catalog {
namespace {

using ::testing::HasSubstr;

TEST(ParseJUnitXmlTest, CountsCasesByOutcomeAcrossSuites) {
  constexpr char kXml[] = R"(<?xml version="1.0"?>
<testsuites>
  <!-- <testcase name="commented out"/> -->
  <testsuite name="a" tests="3">
    <testcase name="ok1" classname="A"/>
    <testcase name="bad" classname="A"><failure message="x"><![CDATA[<testcase> in a log]]></failure></testcase>
    <testcase name="skip"><skipped/></testcase>
  </testsuite>
  <testsuite name="b">
    <testcase name="ok2"></testcase>
    <testcase name="err"><error message="boom"/></testcase>
  </testsuite>
</testsuites>)";
  SR_ASSERT_OK_AND_ASSIGN(TestCounts counts, ParseJUnitXml(kXml));
  EXPECT_EQ(counts.passed, 2);
  EXPECT_EQ(counts.failed, 2);
  EXPECT_EQ(counts.skipped, 1);
  EXPECT_TRUE(absl::IsInvalidArgument(ParseJUnitXml("<project><target/></project>").status()));
}

TEST(ParseTestOutputTest, ReadsEachRunnersSummary) {
  TestCounts unittest = ParseTestOutput("...\nRan 5 tests in 0.01s\n\nFAILED (failures=1, errors=1)\n");
  EXPECT_EQ(unittest.passed, 3);
  EXPECT_EQ(unittest.failed, 2);
  TestCounts pytest = ParseTestOutput("===== 7 passed, 2 failed, 1 skipped in 0.52s =====\n");
  EXPECT_EQ(pytest.passed, 7);
  EXPECT_EQ(pytest.failed, 2);
  EXPECT_EQ(pytest.skipped, 1);
  TestCounts ctest = ParseTestOutput("75% tests passed, 1 tests failed out of 4\n");
  EXPECT_EQ(ctest.passed, 3);
  EXPECT_EQ(ctest.failed, 1);
  TestCounts go = ParseTestOutput("--- PASS: TestA (0.00s)\n--- FAIL: TestB (0.00s)\n--- PASS: TestC (0.00s)\n");
  EXPECT_EQ(go.passed, 2);
  EXPECT_EQ(go.failed, 1);
  EXPECT_FALSE(ParseTestOutput("make: Nothing to be done\n").found);
}

TEST(TailTest, KeepsTheLastLinesWithinTheByteBudget) {
  EXPECT_EQ(Tail("a\nb\nc\nd\n", 2, 100), "c\nd");
  EXPECT_EQ(Tail("a\nb\n", 10, 100), "a\nb");
  EXPECT_EQ(Tail("0123456789", 5, 4), "6789");
}

using RunTestsTest = TempDirTest;

TEST_F(RunTestsTest, DetectsMakeTestAndCountsFromTheJUnitItWrites) {
  SR_ASSERT_OK(WriteFileAtomically(dir_ + "/Makefile",
                                   "test:\n\tmkdir -p out && printf '<testsuite><testcase name=\"a\"/>"
                                   "<testcase name=\"b\"><failure/></testcase></testsuite>' > out/r.xml && false\n",
                                   0644));
  SR_ASSERT_OK_AND_ASSIGN(std::string command, DetectTestCommand(dir_, dir_ + "/j.xml"));
  EXPECT_EQ(command, "make test");
  SR_ASSERT_OK_AND_ASSIGN(TestRun run, RunTests(dir_, command, dir_ + "/log", dir_ + "/j.xml", absl::Seconds(60)));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_EQ(run.counts.passed, 1);
  EXPECT_EQ(run.counts.failed, 1);
  EXPECT_EQ(run.reports.size(), 1u);
}

TEST_F(RunTestsTest, AFailingCommandWithNothingToCountIsOneFailureAndATimeoutIsStopped) {
  SR_ASSERT_OK_AND_ASSIGN(TestRun failed, RunTests(dir_, "echo broken; exit 3", dir_ + "/log", dir_ + "/j.xml", absl::Seconds(60)));
  EXPECT_EQ(failed.exit_code, 3);
  EXPECT_EQ(failed.counts.failed, 1);
  EXPECT_THAT(ReadFile(dir_ + "/log").value_or(""), HasSubstr("broken"));
  SR_ASSERT_OK_AND_ASSIGN(TestRun slow, RunTests(dir_, "sleep 600", dir_ + "/log2", dir_ + "/j.xml", absl::Milliseconds(300)));
  EXPECT_EQ(slow.exit_code, 124);
  EXPECT_THAT(ReadFile(dir_ + "/log2").value_or(""), HasSubstr("timed out"));
  EXPECT_TRUE(absl::IsNotFound(DetectTestCommand(dir_, dir_ + "/j.xml").status()));
}

}  // namespace
}  // namespace step_runner::catalog

#include "step-runner/process/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner::process {
namespace {

using ::testing::HasSubstr;

const std::vector<std::string> kEnv = {"PATH=/usr/bin:/bin"};

// Runs a shell snippet, returns (exit code, stdout).
std::pair<int, std::string> RunShell(const std::string& script) {
  auto pipe = MakeOutputPipe();
  EXPECT_TRUE(pipe.ok());
  auto child = Subprocess::Spawn(
      {.argv = {"sh", "-c", script}, .env = kEnv, .stdout_fd = pipe->write_end.get()});
  EXPECT_TRUE(child.ok()) << child.status();
  pipe->write_end.Close();
  ::fcntl(pipe->read_end.get(), F_SETFL, 0);  // blocking read for the test
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipe->read_end.get(), buf, sizeof buf)) > 0) out.append(buf, n);
  auto code = child->Reap();
  EXPECT_TRUE(code.ok());
  return {*code, out};
}

TEST(SubprocessTest, ExitCode) {
  EXPECT_EQ(RunShell("exit 0").first, 0);
  EXPECT_EQ(RunShell("exit 42").first, 42);
}

TEST(SubprocessTest, DeathBySignalIs128PlusN) {
  EXPECT_EQ(RunShell("kill -KILL $$").first, 128 + SIGKILL);
  EXPECT_EQ(RunShell("kill -SEGV $$").first, 128 + SIGSEGV);
}

TEST(SubprocessTest, OwnSessionAndProcessGroup) {
  auto [code, out] = RunShell("ps -o pid=,pgid=,sid= -p $$ 2>/dev/null || cat /proc/$$/stat");
  ASSERT_EQ(code, 0);
  // The leader's pid, pgid and sid are the same number.
  std::istringstream in(out);
  long pid, pgid, sid;
  if (in >> pid >> pgid >> sid) {
    EXPECT_EQ(pid, pgid);
    EXPECT_EQ(pid, sid);
  }
}

TEST(SubprocessTest, NoDaemonFdLeaksIntoChild) {
  // An fd without O_CLOEXEC in the parent must still not reach the child.
  int leaky = ::open("/dev/null", O_RDONLY);
  ASSERT_GE(leaky, 3);
  auto [code, out] = RunShell("ls /proc/self/fd");
  ::close(leaky);
  ASSERT_EQ(code, 0);
  // 0, 1, 2 and the fd ls itself opens to read the directory.
  EXPECT_EQ(out, "0\n1\n2\n3\n");
}

TEST(SubprocessTest, CommandNotFoundIsAClearError) {
  auto child = Subprocess::Spawn({.argv = {"no-such-command-sr"}, .env = kEnv});
  ASSERT_FALSE(child.ok());
  EXPECT_THAT(std::string(child.status().message()), HasSubstr("no-such-command-sr"));
}

TEST(SubprocessTest, MissingWorkDirIsAClearError) {
  auto child = Subprocess::Spawn({.argv = {"true"}, .env = kEnv, .work_dir = "/nonexistent-sr"});
  ASSERT_FALSE(child.ok());
  EXPECT_THAT(std::string(child.status().message()), HasSubstr("/nonexistent-sr"));
}

TEST(SubprocessTest, SignalGroupReachesGrandchildren) {
  auto child = Subprocess::Spawn({.argv = {"sh", "-c", "sleep 100 & sleep 100; wait"}, .env = kEnv});
  ASSERT_TRUE(child.ok());
  ::usleep(100 * 1000);
  SR_ASSERT_OK(child->SignalGroup(SIGKILL));
  SR_ASSERT_OK_AND_ASSIGN(int code, child->Reap());
  EXPECT_EQ(code, 128 + SIGKILL);
  // No process of the group is left.
  for (int i = 0; i < 100 && !LiveProcessesInGroup(child->pid()).empty(); ++i) {
    ::usleep(10 * 1000);
  }
  EXPECT_TRUE(LiveProcessesInGroup(child->pid()).empty());
}

TEST(SubprocessTest, StartTicksIdentifyAProcess) {
  SR_ASSERT_OK_AND_ASSIGN(uint64_t self, ProcessStartTicks(::getpid()));
  EXPECT_GT(self, 0u);
  EXPECT_FALSE(BootId().empty());
}

}  // namespace
}  // namespace step_runner::process

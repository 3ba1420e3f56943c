// Integration tests: the real daemon binary on a unix socket in a temporary folder, driven
// through the client library, the CLI and raw sockets.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override { StartDaemon(); }
  void StartDaemon(std::vector<std::string> args = {}) {
    auto daemon = Daemon::Start(dir_.path(), std::move(args));
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
  }
  // Runs the CLI against this daemon.
  CommandResult Cli(std::vector<std::string> args, const std::string& input = "",
                    absl::Duration deadline = absl::Seconds(60)) {
    std::vector<std::string> argv = {StepRunnerBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--socket");
    argv.push_back(daemon_->socket_path());
    auto result = RunCommand(argv, deadline, {"XDG_STATE_HOME=" + dir_.path() + "/client-state"}, input);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.value_or(CommandResult{});
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
};

TEST_F(DaemonTest, RunFollowAndStatusThroughTheCli) {
  std::string file = dir_.path() + "/steps.yml";
  SR_ASSERT_OK(WriteFileAtomically(file, Steps("run:\n  - name: a\n    script: echo hello; echo err >&2\n"), 0600));
  CommandResult r = Cli({"run", file, "--id", "cli-1", "--follow"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "hello\nerr\n");
  CommandResult split = Cli({"logs", "cli-1", "--split-streams"});
  EXPECT_EQ(split.out, "hello\n");
  EXPECT_EQ(split.err, "err\n");
  CommandResult status = Cli({"status"});
  EXPECT_THAT(status.out, HasSubstr("cli-1"));
  EXPECT_THAT(status.out, HasSubstr("success"));
}

}  // namespace
}  // namespace step_runner::testing

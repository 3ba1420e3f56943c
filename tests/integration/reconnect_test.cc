// Reconnect and durability tests: the real daemon binary, with the connection between client
// and daemon killed over and over, the client process killed mid-follow, and the daemon itself
// killed or stopped while jobs run. Every assertion is about what a person using step-runner
// would see: the bytes printed, the exit code, the jobs listed, the processes left behind.
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "step-runner/base/unique_fd.h"
#include "step-runner/process/subprocess.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::optional<pid_t> ReadPid(const std::string& path) {
  std::vector<pid_t> pids = ReadPids(path);
  if (pids.empty()) return std::nullopt;
  return pids.back();
}

// Whether `pid` runs: it exists and is not a zombie. Killed orphans are reparented to pid 1,
// which does not necessarily reap them, so "gone" has to include "zombie".
bool IsRunning(pid_t pid) {
  auto stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return false;
  size_t close = stat->rfind(')');
  if (close == std::string::npos || close + 2 >= stat->size()) return false;
  char state = (*stat)[close + 2];
  return state != 'Z' && state != 'X';
}

// SIGKILLs `pid` if it is still a running process whose command line mentions `marker`. Through
// a pidfd, so that a pid that was reused meanwhile is never hit. Returns whether it was killed.
bool KillIfStillOurs(pid_t pid, const std::string& marker) {
  // Raw syscalls: glibc 2.36's <sys/pidfd.h> lacks extern "C" and does not link from C++.
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return false;
  std::string cmdline = ReadFile(absl::StrCat("/proc/", pid, "/cmdline")).value_or("");
  if (cmdline.find(marker) == std::string::npos || !IsRunning(pid)) return false;
  return ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) == 0;
}

// A command running in the background whose stdout and stderr are collected while the test acts
// on it (kills its connections, or kills it).
class BackgroundCommand {
 public:
  static absl::StatusOr<std::unique_ptr<BackgroundCommand>> Start(
      const std::vector<std::string>& argv, const std::vector<std::string>& env) {
    auto out = process::MakeOutputPipe();
    if (!out.ok()) return out.status();
    auto err = process::MakeOutputPipe();
    if (!err.ok()) return err.status();
    auto child = process::Subprocess::Spawn({.argv = argv,
                                             .env = env,
                                             .stdout_fd = out->write_end.get(),
                                             .stderr_fd = err->write_end.get()});
    if (!child.ok()) return child.status();
    std::unique_ptr<BackgroundCommand> command(new BackgroundCommand());
    command->child_.emplace(*std::move(child));
    // The child holds the only write ends now: EOF means it (and whatever inherited them) ended.
    out->write_end.Close();
    err->write_end.Close();
    command->reader_ = std::thread(
        [c = command.get(), o = std::move(out->read_end), e = std::move(err->read_end)]() mutable {
          c->ReadUntilEof(std::move(o), std::move(e));
        });
    return command;
  }

  ~BackgroundCommand() {
    if (!reaped_) {
      (void)child_->SignalGroup(SIGKILL);
      (void)child_->Reap();
    }
    stop_ = true;
    reader_.join();
  }

  pid_t pid() const { return child_->pid(); }
  std::string out() const {
    absl::MutexLock lock(&mu_);
    return out_;
  }
  std::string err() const {
    absl::MutexLock lock(&mu_);
    return err_;
  }
  int64_t out_size() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(out_.size());
  }
  bool exited() const {
    pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
    return reaped_ || ::poll(&pfd, 1, 0) > 0;
  }
  void Kill() { Signal(SIGKILL); }
  void Signal(int signo) {
    if (!reaped_) (void)child_->SignalGroup(signo);
  }

  // Waits for the command to exit and for the end of its output; its exit code (128+N for
  // signal N), or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration deadline) {
    if (reaped_) return absl::FailedPreconditionError("already reaped");
    const absl::Time until = absl::Now() + deadline;
    pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
    int ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(until - absl::Now())));
    if (::poll(&pfd, 1, ms) <= 0) {
      return absl::DeadlineExceededError("the command did not exit in time");
    }
    {
      absl::MutexLock lock(&mu_);
      if (!mu_.AwaitWithDeadline(absl::Condition(&eof_), until)) {
        return absl::DeadlineExceededError("the command exited but its output is still open");
      }
    }
    reaped_ = true;
    return child_->Reap();
  }

 private:
  BackgroundCommand() = default;

  void ReadUntilEof(UniqueFd out, UniqueFd err) {
    bool open[2] = {true, true};
    const int fds[2] = {out.get(), err.get()};
    char buffer[65536];
    while ((open[0] || open[1]) && !stop_) {
      pollfd pfds[2] = {{.fd = open[0] ? fds[0] : -1, .events = POLLIN},
                        {.fd = open[1] ? fds[1] : -1, .events = POLLIN}};
      // A timeout only so that the destructor's stop_ is noticed.
      if (::poll(pfds, 2, 50) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!pfds[i].revents) continue;
        ssize_t n = ::read(fds[i], buffer, sizeof buffer);
        if (n > 0) {
          absl::MutexLock lock(&mu_);
          (i == 0 ? out_ : err_).append(buffer, static_cast<size_t>(n));
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
          open[i] = false;
        }
      }
    }
    absl::MutexLock lock(&mu_);
    eof_ = true;
  }

  std::optional<process::Subprocess> child_;
  bool reaped_ = false;
  std::atomic<bool> stop_{false};
  std::thread reader_;
  mutable absl::Mutex mu_;
  std::string out_ ABSL_GUARDED_BY(mu_);
  std::string err_ ABSL_GUARDED_BY(mu_);
  bool eof_ ABSL_GUARDED_BY(mu_) = false;
};

class ReconnectTest : public ::testing::Test {
 protected:
  void SetUp() override { StartDaemon(); }

  // Starts (or, after the previous one died, restarts) the daemon on the same folder.
  void StartDaemon() {
    auto daemon = Daemon::Start(dir_.path());
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
  }

  // The CLI's own state (resume points) lives in the test's folder, never in the user's home.
  std::vector<std::string> CliEnvironment() const {
    return EnvironmentWith({"XDG_STATE_HOME=" + dir_.path() + "/client-state"});
  }

  // argv for the CLI against this daemon's socket.
  std::vector<std::string> CliArgv(const std::vector<std::string>& args) const {
    std::vector<std::string> argv = {StepRunnerBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--socket");
    argv.push_back(daemon_->socket_path());
    return argv;
  }

  // Runs the CLI against this daemon and waits for it.
  CommandResult Cli(const std::vector<std::string>& args,
                    absl::Duration deadline = absl::Seconds(60)) {
    CommandResult result;
    auto command = BackgroundCommand::Start(CliArgv(args), CliEnvironment());
    EXPECT_TRUE(command.ok()) << command.status();
    if (!command.ok()) return result;
    auto exit_code = (*command)->Wait(deadline);
    EXPECT_TRUE(exit_code.ok()) << exit_code.status() << "; stderr: " << (*command)->err();
    result.exit_code = exit_code.value_or(-1);
    result.out = (*command)->out();
    result.err = (*command)->err();
    return result;
  }

  // The contents of the CLI's resume points ($XDG_STATE_HOME/step-runner/follow/*.offset).
  std::vector<std::string> ResumePoints() const {
    std::vector<std::string> points;
    const std::string folder = dir_.path() + "/client-state/step-runner/follow";
    DIR* dir = ::opendir(folder.c_str());
    if (dir == nullptr) return points;
    while (struct dirent* entry = ::readdir(dir)) {
      if (absl::EndsWith(entry->d_name, ".offset")) {
        // The file holds the byte offset as a fixed-width decimal number, then the job's start.
        std::string text = ReadFile(absl::StrCat(folder, "/", entry->d_name)).value_or("");
        std::vector<std::string> fields = absl::StrSplit(text, ' ');
        int64_t offset;
        points.push_back(fields.size() == 2 && absl::SimpleAtoi(fields[0], &offset) ? absl::StrCat(offset)
                                                                                    : "<unreadable>");
      }
    }
    ::closedir(dir);
    return points;
  }

  // Writes a step file for the CLI; returns its path.
  std::string StepFile(const std::string& name, const std::string& definition) {
    std::string path = absl::StrCat(dir_.path(), "/", name, ".yml");
    EXPECT_TRUE(WriteFileAtomically(path, Steps(definition), 0600).ok());
    return path;
  }

  // A --via command that records each bridge's pid in `pid_file` (one line per dial) before
  // becoming `step-runner proxy`, so that the test can kill the live bridge. The bridges'
  // notices go to a file: they must not hold the client's stderr pipe open.
  std::string RecordingVia(const std::string& pid_file) const {
    return absl::StrCat("echo $$ >> ", pid_file, "; exec ", StepRunnerBinary(), " proxy --socket ",
                        daemon_->socket_path(), " 2>> ", dir_.path(), "/proxy.stderr");
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<client::Client> client_;
};

// Kills the newest bridge in `pid_file` whenever one appears, after a random 20-120 ms of life,
// until `kills` bridges were killed or `give_up()` says to stop. Returns the kills made; calls
// `on_kill` just before each.
template <typename GiveUp, typename OnKill>
int KillBridges(const std::string& pid_file, const std::string& marker, int kills, GiveUp give_up,
                OnKill on_kill) {
  const unsigned seed = std::random_device()();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> life_ms(20, 120);
  SCOPED_TRACE(absl::StrCat("random seed ", seed));
  int killed = 0;
  size_t bridges_seen = 0;
  while (killed < kills) {
    // Wait for the client to dial a bridge the test has not killed yet. The deadline covers the
    // client's longest backoff (2s by default) many times over.
    std::vector<pid_t> pids;
    bool fresh = PollUntil(
        [&] {
          pids = ReadPids(pid_file);
          return pids.size() > bridges_seen || give_up();
        },
        absl::Seconds(30), absl::Milliseconds(1));
    if (!fresh) {
      ADD_FAILURE() << "the client dialled no new bridge within 30s after " << killed << " kills";
      break;
    }
    if (give_up()) break;
    bridges_seen = pids.size();
    // Not synchronisation: how long this connection lives before it is cut, at random.
    absl::SleepFor(absl::Milliseconds(life_ms(rng)));
    on_kill();
    if (KillIfStillOurs(pids.back(), marker)) ++killed;
  }
  return killed;
}

// A job streams a few MiB while the CLI follows it through a --via bridge that is SIGKILLed at
// least 50 times. The CLI must print exactly the job's log, no byte lost or doubled.
TEST_F(ReconnectTest, ChaosClientConnectionKilled50Times) {
  constexpr int kKills = 50;
  constexpr int64_t kBytes = 4 << 20;
  const std::string pid_file = dir_.path() + "/bridges.pids";
  const std::string release = dir_.path() + "/release";
  // About 6s of output in 16 KiB writes, so that kills cut a live stream; then the job holds
  // until the test made all its kills, however long those take. (With the client's current
  // backoff, which never starts over within one Follow, 50 kills take about 90s.)
  const std::string file = StepFile(
      "chaos", ShStep(absl::StrCat(PatternWriterBinary(), " ", kBytes, " 16384 25000 || exit 1; ",
                                   WaitForFileScript(release, absl::Minutes(4)))));
  auto cli = BackgroundCommand::Start({StepRunnerBinary(), "run", file, "--id", "chaos", "--follow",
                                       "--via", RecordingVia(pid_file)},
                                      CliEnvironment());
  ASSERT_TRUE(cli.ok()) << cli.status();

  const absl::Time start = absl::Now();
  int kills_mid_stream = 0;
  int kills = KillBridges(
      pid_file, daemon_->socket_path(), kKills, [&] { return (*cli)->exited(); },
      [&] {
        int64_t printed = (*cli)->out_size();
        if (printed > 0 && printed < kBytes) ++kills_mid_stream;
      });
  const absl::Duration killing = absl::Now() - start;
  SR_ASSERT_OK(WriteFileAtomically(release, "", 0600));
  auto exit_code = (*cli)->Wait(absl::Seconds(60));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status() << "; stderr: " << (*cli)->err();
  EXPECT_EQ(*exit_code, 0) << (*cli)->err();
  EXPECT_GE(kills, kKills) << (*cli)->err();
  // Every kill was followed by a new dial.
  EXPECT_GE(ReadPids(pid_file).size(), static_cast<size_t>(kKills + 1));
  // Otherwise no resume from the middle of the output was tested.
  EXPECT_GE(kills_mid_stream, 1);
  std::cerr << kills << " bridges killed in " << killing << ", " << kills_mid_stream
            << " of them while the output streamed\n";

  const std::string out = (*cli)->out();
  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "chaos"));
  const std::string expected = ExpectedPattern(kBytes);
  EXPECT_TRUE(log == expected) << "the job's log: " << Difference(log, expected);
  EXPECT_TRUE(out == log) << "the CLI's output: " << Difference(out, log);
}

// The client library over a --via bridge that is killed during Follow: the sink gets every byte
// of the log once, in order, each chunk at the offset where the previous one ended.
TEST_F(ReconnectTest, ClientLibraryReconnectsViaCommand) {
  constexpr int kKills = 20;
  constexpr int64_t kBytes = 2 << 20;
  const std::string pid_file = dir_.path() + "/bridges.pids";
  const std::string release = dir_.path() + "/release";
  client::ClientOptions options;
  options.endpoint.via_command = RecordingVia(pid_file);
  options.reconnect_timeout = absl::Seconds(20);
  // Short backoffs keep the test quick; the CLI test above runs with the defaults.
  options.initial_backoff = absl::Milliseconds(10);
  options.max_backoff = absl::Milliseconds(100);
  client::Client client(options);
  SR_ASSERT_OK(client.Run(
      Request("lib", ShStep(absl::StrCat(PatternWriterBinary(), " ", kBytes,
                                         " 8192 10000 || exit 1; ", WaitForFileScript(release))))));

  std::atomic<int64_t> received{0};
  std::atomic<int> kills_mid_stream{0};
  std::atomic<int> kills{0};
  std::atomic<bool> follow_done{false};
  std::thread killer([&] {
    kills = KillBridges(
        pid_file, daemon_->socket_path(), kKills, [&] { return follow_done.load(); },
        [&] {
          int64_t at = received.load();
          if (at > 0 && at < kBytes) ++kills_mid_stream;
        });
    // Only now may the job end: every kill hit a Follow still in progress.
    (void)WriteFileAtomically(release, "", 0600);
  });

  std::string got;
  int64_t misplaced_chunks = 0;
  auto final_status = client.Follow("lib", 0, [&](const proto::FollowLogsResponse& chunk) {
    if (chunk.offset() != static_cast<int64_t>(got.size())) ++misplaced_chunks;
    got += chunk.data();
    received = static_cast<int64_t>(got.size());
  });
  follow_done = true;
  killer.join();
  SR_ASSERT_OK(final_status.status());
  EXPECT_EQ(final_status->status(), proto::StepResult::success) << final_status->message();
  EXPECT_EQ(misplaced_chunks, 0);
  EXPECT_GE(kills.load(), kKills);
  // Otherwise no resume from the middle of the log was tested.
  EXPECT_GE(kills_mid_stream.load(), 1);
  EXPECT_GE(client.dials(), kills.load() + 1);

  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "lib"));
  EXPECT_TRUE(log == ExpectedPattern(kBytes))
      << "the job's log: " << Difference(log, ExpectedPattern(kBytes));
  EXPECT_TRUE(got == log) << "what Follow delivered: " << Difference(got, log);
  EXPECT_EQ(final_status->log_size(), static_cast<int64_t>(log.size()));
}

// `run --follow` is SIGKILLed halfway through a job; `logs --follow` started again prints the
// rest: together, exactly the job's log.
TEST_F(ReconnectTest, KilledClientProcessResumesWhereItStopped) {
  constexpr int64_t kFirstPart = 1 << 20;
  constexpr int64_t kSecondPart = 1 << 20;
  const std::string release = dir_.path() + "/release";
  // The job pauses between its two parts and the client is killed in the pause. (Killed while it
  // prints, the client can print a chunk twice:
  // ClientKilledMidStreamNeverPrintsAByteTwice.)
  const std::string file = StepFile(
      "resume", ShStep(absl::StrCat(PatternWriterBinary(), " ", kFirstPart,
                                    " 16384 2000 || exit 1; ", WaitForFileScript(release), "; ",
                                    PatternWriterBinary(), " ", kSecondPart, " 16384 2000")));
  const std::string first_part = ExpectedPattern(kFirstPart);
  const std::string second_part = ExpectedPattern(kSecondPart);
  auto first = BackgroundCommand::Start(CliArgv({"run", file, "--id", "resume", "--follow"}),
                                        CliEnvironment());
  ASSERT_TRUE(first.ok()) << first.status();
  // Killed once it printed the first part and recorded how far it got, in the state folder where
  // it documents keeping its resume point.
  ASSERT_TRUE(PollUntil(
      [&] {
        return (*first)->exited() ||
               ((*first)->out_size() == kFirstPart &&
                ResumePoints() == std::vector<std::string>{absl::StrCat(kFirstPart)});
      },
      absl::Seconds(30)))
      << "printed " << (*first)->out_size()
      << " bytes; resume points: " << absl::StrJoin(ResumePoints(), ",");
  ASSERT_FALSE((*first)->exited()) << (*first)->err();
  (*first)->Kill();
  auto killed = (*first)->Wait(absl::Seconds(10));
  ASSERT_TRUE(killed.ok()) << killed.status();
  EXPECT_EQ(*killed, 128 + SIGKILL);
  const std::string first_out = (*first)->out();
  EXPECT_TRUE(first_out == first_part)
      << "the killed client's output: " << Difference(first_out, first_part);

  // Started again while the job still runs, it resumes and then follows the live log.
  auto second = BackgroundCommand::Start(CliArgv({"logs", "resume", "--follow"}), CliEnvironment());
  ASSERT_TRUE(second.ok()) << second.status();
  const std::string resuming = absl::StrCat("resuming job resume at byte ", kFirstPart);
  EXPECT_TRUE(PollUntil(
      [&] { return (*second)->err().find(resuming) != std::string::npos || (*second)->exited(); },
      absl::Seconds(30)));
  EXPECT_THAT((*second)->err(), HasSubstr(resuming));
  SR_ASSERT_OK(WriteFileAtomically(release, "", 0600));
  auto exit_code = (*second)->Wait(absl::Seconds(60));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0) << (*second)->err();
  const std::string second_out = (*second)->out();
  EXPECT_TRUE(second_out == second_part)
      << "the second client's output: " << Difference(second_out, second_part);

  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "resume"));
  EXPECT_TRUE(log == first_part + second_part)
      << "the job's log: " << Difference(log, first_part + second_part);
  const std::string both = first_out + second_out;
  EXPECT_TRUE(both == log) << "first + second output: " << Difference(both, log);

  // A follow that completed leaves no resume point: following again prints the whole log.
  EXPECT_THAT(ResumePoints(), ::testing::IsEmpty());
  CommandResult again = Cli({"logs", "resume", "--follow"});
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_TRUE(again.out == log) << "a third follow: " << Difference(again.out, log);
}

// SIGKILL of the daemon while a job runs: the step outlives it (own process group), and the
// restarted daemon kills it, reports the job interrupted and still serves the finished job.
// A resume point belongs to one job: when its id is closed and used again for a new job, a
// client started again shows the new job from its first byte (it used to skip as many bytes as
// it had shown of the old one).
TEST_F(ReconnectTest, AResumePointIsNotAppliedToANewJobUnderTheSameId) {
  const std::string release = dir_.path() + "/release";
  const std::string old_job = StepFile(
      "old", ShStep(absl::StrCat("echo old-job-first-part; ", WaitForFileScript(release), "; echo old-job-rest")));
  auto first = BackgroundCommand::Start(CliArgv({"run", old_job, "--id", "reused", "--follow"}), CliEnvironment());
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(PollUntil([&] { return (*first)->exited() || ResumePoints() == std::vector<std::string>{"19"}; },
                        absl::Seconds(30)))
      << "resume points: " << absl::StrJoin(ResumePoints(), ",") << "; stderr: " << (*first)->err();
  (*first)->Kill();
  ASSERT_TRUE((*first)->Wait(absl::Seconds(10)).ok());
  SR_ASSERT_OK(client_->Close("reused"));  // cancels the old job and frees its id

  // Someone else starts the new job; the client started again follows it.
  SR_ASSERT_OK(client_->Run(Request("reused", ShStep("echo this-is-the-new-job; echo and-all-of-it"))));
  CommandResult second = Cli({"logs", "reused", "--follow"});
  EXPECT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(second.out, "this-is-the-new-job\nand-all-of-it\n");
  EXPECT_THAT(second.err, HasSubstr("job reused is not the one followed before"));
  EXPECT_THAT(ResumePoints(), ::testing::IsEmpty());
}

// A mistyped socket path, or a --via command that never connects, looked like a hang for the
// whole reconnect timeout (5 minutes): the CLI now says at once what it is waiting for, once.
TEST_F(ReconnectTest, AnUnreachableDaemonIsSaidAtOnceNotAfterTheTimeout) {
  for (const std::vector<std::string>& where :
       {std::vector<std::string>{"--socket", dir_.path() + "/no-such.sock"}, std::vector<std::string>{"--via", "false"}}) {
    std::vector<std::string> argv = {StepRunnerBinary(), "status"};
    argv.insert(argv.end(), where.begin(), where.end());
    auto cli = BackgroundCommand::Start(argv, CliEnvironment());
    ASSERT_TRUE(cli.ok()) << cli.status();
    EXPECT_TRUE(PollUntil([&] { return (*cli)->err().find("retrying for up to") != std::string::npos; },
                          absl::Seconds(20)))
        << where[1] << ": " << (*cli)->err();
    EXPECT_THAT((*cli)->err(), HasSubstr("cannot reach the daemon ("));
    absl::SleepFor(absl::Seconds(2));  // several redials meanwhile: still one notice
    EXPECT_EQ(std::vector<std::string>(absl::StrSplit((*cli)->err(), "cannot reach")).size(), 2u) << (*cli)->err();
    EXPECT_THAT((*cli)->err(), Not(HasSubstr("connection lost")));
    (*cli)->Kill();
    ASSERT_TRUE((*cli)->Wait(absl::Seconds(10)).ok());
  }
}

// `exec` runs its steps in sessions of their own, out of the terminal's reach: Ctrl-C on the
// CLI used to leave them running (and its temporary state behind). It is now a cancel.
TEST_F(ReconnectTest, CtrlCOnExecCancelsItsStepsAndLeavesNothing) {
  const std::string pid_file = dir_.path() + "/background.pid";
  const std::string file = StepFile(
      "interrupted", ShStep(absl::StrCat("trap 'echo got-term; exit 3' TERM; sleep 300 & echo $! > ", pid_file,
                                         "; echo started; wait")));
  auto cli = BackgroundCommand::Start({StepRunnerBinary(), "exec", file, "--result", dir_.path() + "/result.json"},
                                      CliEnvironment());
  ASSERT_TRUE(cli.ok()) << cli.status();
  ASSERT_TRUE(PollUntil([&] { return (*cli)->out().find("started") != std::string::npos || (*cli)->exited(); },
                        absl::Seconds(30)));
  ASSERT_FALSE((*cli)->exited()) << (*cli)->err();
  pid_t background = 0;
  ASSERT_TRUE(absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadFile(pid_file).value_or("")), &background));
  ASSERT_EQ(::kill((*cli)->pid(), SIGINT), 0);
  auto code = (*cli)->Wait(absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 128 + SIGINT) << (*cli)->err();
  EXPECT_THAT((*cli)->out(), HasSubstr("got-term"));  // the step was asked to stop, and could
  EXPECT_THAT((*cli)->err(), HasSubstr("interrupted"));
  EXPECT_THAT(ReadFile(dir_.path() + "/result.json").value_or(""), HasSubstr("\"cancelled\""));
  // Nothing of the step is left: its background process went with its process group.
  EXPECT_TRUE(PollUntil([&] { return ::kill(background, 0) != 0; }, absl::Seconds(10)));
}

TEST_F(ReconnectTest, DaemonSigkilledMidJobAndRestarted) {
  SR_ASSERT_OK(
      client_->Run(Request("finished", ShStep("echo finished job; printf %s no-newline"))));
  SR_ASSERT_OK_AND_ASSIGN(proto::Status finished, WaitForJob(*client_, "finished"));
  ASSERT_EQ(finished.status(), proto::StepResult::success);

  const std::string leader_file = dir_.path() + "/leader.pid";
  const std::string child_file = dir_.path() + "/child.pid";
  SR_ASSERT_OK(client_->Run(
      Request("running", ShStep(absl::StrCat("echo $$ > ", leader_file, "; sleep 60 & echo $! > ",
                                             child_file, "; echo started; wait")))));
  ASSERT_TRUE(PollUntil(
      [&] {
        auto status = client_->GetStatus("running");
        return ReadPid(leader_file) && ReadPid(child_file) && status.ok() && status->log_size() > 0;
      },
      absl::Seconds(20)));
  const pid_t leader = *ReadPid(leader_file);
  const pid_t child = *ReadPid(child_file);

  daemon_->Signal(SIGKILL);
  SR_ASSERT_OK_AND_ASSIGN(int daemon_exit, daemon_->Wait(absl::Seconds(10)));
  EXPECT_EQ(daemon_exit, 128 + SIGKILL);
  // Nothing killed them yet: the step's processes are in their own process group.
  EXPECT_TRUE(IsRunning(leader));
  EXPECT_TRUE(IsRunning(child));

  StartDaemon();
  if (HasFatalFailure()) return;
  // The leftover processes are killed by the restarted daemon, promptly.
  EXPECT_TRUE(PollUntil([&] { return !IsRunning(leader) && !IsRunning(child); }, absl::Seconds(10)))
      << "leftover step processes still run: " << leader << " " << child;
  EXPECT_THAT(process::LiveProcessesInGroup(leader), ::testing::IsEmpty());

  SR_ASSERT_OK_AND_ASSIGN(std::vector<proto::Status> jobs, client_->ListJobs());
  std::vector<std::string> ids;
  for (const proto::Status& job : jobs) ids.push_back(job.id());
  EXPECT_THAT(ids, ::testing::UnorderedElementsAre("finished", "running"));

  SR_ASSERT_OK_AND_ASSIGN(proto::Status done, client_->GetStatus("finished"));
  EXPECT_EQ(done.status(), proto::StepResult::success);
  EXPECT_EQ(ReadLog(*client_, "finished").value_or("<error>"), "finished job\nno-newline");

  SR_ASSERT_OK_AND_ASSIGN(proto::Status interrupted, client_->GetStatus("running"));
  EXPECT_EQ(interrupted.status(), proto::StepResult::failure);
  EXPECT_EQ(interrupted.error().kind(), proto::StatusError::interrupted)
      << interrupted.DebugString();
  EXPECT_EQ(ReadLog(*client_, "running").value_or("<error>"), "started\n");
  // The CLI tells a person following it that the daemon died under the job (EX_TEMPFAIL).
  CommandResult follow = Cli({"logs", "running", "--follow"});
  EXPECT_EQ(follow.exit_code, 75) << follow.err;
  EXPECT_EQ(follow.out, "started\n");
}

// SIGTERM: the daemon gives the running job its graceful exit, lets the follower receive the
// whole log, and exits 0. Restarted, it shows the job cancelled with the trap's output.
TEST_F(ReconnectTest, SigtermShutdownIsGraceful) {
  SR_ASSERT_OK(client_->Run(
      Request("term", ShStep("trap \"echo graceful; exit 0\" TERM; echo up; "
                             "i=0; while [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"))));

  absl::Mutex mu;
  std::string received;
  std::optional<absl::StatusOr<proto::Status>> follow_result;
  int64_t end_offset = -1;
  client::ClientOptions options = daemon_->ClientOptions();
  // The daemon is gone for good after the stream: do not wait minutes to find that out.
  options.reconnect_timeout = absl::Seconds(2);
  std::thread follower([&] {
    client::Client client(options);
    auto result = client.Follow(
        "term", 0,
        [&](const proto::FollowLogsResponse& chunk) {
          absl::MutexLock lock(&mu);
          received += chunk.data();
        },
        &end_offset);
    absl::MutexLock lock(&mu);
    follow_result = std::move(result);
  });
  auto received_text = [&] {
    absl::MutexLock lock(&mu);
    return received;
  };
  EXPECT_TRUE(PollUntil([&] { return received_text().find("up\n") != std::string::npos; },
                        absl::Seconds(20)));

  daemon_->Signal(SIGTERM);
  // The step exits at once on SIGTERM; the rest is the daemon's own shutdown (streams get 5s).
  auto exit_code = daemon_->Wait(absl::Seconds(15));
  if (!exit_code.ok()) {
    // Unblock the follower before failing.
    daemon_->Signal(SIGKILL);
    (void)daemon_->Wait(absl::Seconds(10));
  }
  follower.join();
  ASSERT_TRUE(exit_code.ok()) << exit_code.status() << "; " << daemon_->stderr_output();
  EXPECT_EQ(*exit_code, 0) << daemon_->stderr_output();

  ASSERT_TRUE(follow_result.has_value());
  // The stream ended with every byte; the Status call after it may find the daemon gone.
  if (follow_result->ok()) {
    EXPECT_EQ((*follow_result)->status(), proto::StepResult::cancelled);
  } else {
    EXPECT_TRUE(absl::IsUnavailable(follow_result->status())) << follow_result->status();
  }
  EXPECT_THAT(received, HasSubstr("graceful"));

  StartDaemon();
  if (HasFatalFailure()) return;
  SR_ASSERT_OK_AND_ASSIGN(proto::Status status, client_->GetStatus("term"));
  EXPECT_EQ(status.status(), proto::StepResult::cancelled);
  EXPECT_EQ(status.error().kind(), proto::StatusError::cancelled) << status.DebugString();
  SR_ASSERT_OK_AND_ASSIGN(std::string log, ReadLog(*client_, "term"));
  // (sh may report the sleep that SIGTERM ended in between.)
  EXPECT_THAT(log, ::testing::StartsWith("up\n"));
  EXPECT_THAT(log, ::testing::EndsWith("graceful\n"));
  EXPECT_EQ(received, log) << "the follower did not get the whole log";
  EXPECT_EQ(end_offset, static_cast<int64_t>(log.size()));
}

// `run` is retried with the same id (a second CLI invocation while the job runs, and two racing
// ones): the step runs once, and the retry's --follow shows that one job.
TEST_F(ReconnectTest, RunRetriedWithSameIdStartsOneJob) {
  const std::string count = dir_.path() + "/count";
  const std::string release = dir_.path() + "/release";
  const std::string file =
      StepFile("once", ShStep(absl::StrCat("echo x >> ", count, "; echo started; ",
                                           WaitForFileScript(release), "; echo finished")));
  CommandResult first = Cli({"run", file, "--id", "once"});
  EXPECT_EQ(first.exit_code, 0) << first.err;
  EXPECT_EQ(first.out, "once\n");
  ASSERT_TRUE(PollUntil([&] { return ReadFile(count).ok(); }, absl::Seconds(20)));

  // The retry arrives while the job still runs.
  auto retry = BackgroundCommand::Start(CliArgv({"run", file, "--id", "once", "--follow"}),
                                        CliEnvironment());
  ASSERT_TRUE(retry.ok()) << retry.status();
  ASSERT_TRUE(PollUntil([&] { return (*retry)->out() == "started\n" || (*retry)->exited(); },
                        absl::Seconds(20)))
      << (*retry)->err();
  SR_ASSERT_OK_AND_ASSIGN(proto::Status running, client_->GetStatus("once"));
  EXPECT_EQ(running.status(), proto::StepResult::running);
  SR_ASSERT_OK(WriteFileAtomically(release, "", 0600));
  auto exit_code = (*retry)->Wait(absl::Seconds(60));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0) << (*retry)->err();
  EXPECT_EQ((*retry)->out(), "started\nfinished\n");
  EXPECT_EQ(ReadFile(count).value_or(""), "x\n");

  // Two invocations racing each other with a new id: still one job.
  const std::string raced_count = dir_.path() + "/raced";
  const std::string raced = StepFile("raced", ShStep(absl::StrCat("echo x >> ", raced_count)));
  auto a = BackgroundCommand::Start(CliArgv({"run", raced, "--id", "raced", "--follow"}),
                                    CliEnvironment());
  auto b = BackgroundCommand::Start(CliArgv({"run", raced, "--id", "raced", "--follow"}),
                                    CliEnvironment());
  ASSERT_TRUE(a.ok() && b.ok());
  for (auto* command : {&*a, &*b}) {
    auto code = (*command)->Wait(absl::Seconds(60));
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_EQ(*code, 0) << (*command)->err();
  }
  EXPECT_EQ(ReadFile(raced_count).value_or(""), "x\n");
}

// A Follow that has streamed for longer than reconnect_timeout must still redial after a drop:
// the give-up clock measures one outage, not the whole call (`run --follow` of a job running
// over 5 minutes once exited 69 at its first hiccup).
TEST_F(ReconnectTest, FollowOutlastingReconnectTimeoutSurvivesADrop) {
  const std::string pid_file = dir_.path() + "/bridges.pids";
  const std::string release = dir_.path() + "/release";
  client::ClientOptions options;
  options.endpoint.via_command = RecordingVia(pid_file);
  options.reconnect_timeout = absl::Seconds(1);
  client::Client client(options);
  SR_ASSERT_OK(client.Run(Request(
      "long", ShStep(absl::StrCat("echo before; ", WaitForFileScript(release), "; echo after")))));
  const absl::Time start = absl::Now();
  std::atomic<bool> follow_done{false};
  std::atomic<bool> redialled{false};
  std::thread killer([&] {
    // The drop comes once the Follow has been streaming for longer than reconnect_timeout.
    PollUntil([&] { return absl::Now() > start + absl::Milliseconds(1500) || follow_done; },
              absl::Seconds(10));
    std::optional<pid_t> bridge = ReadPid(pid_file);
    if (bridge && KillIfStillOurs(*bridge, daemon_->socket_path())) {
      redialled = PollUntil([&] { return ReadPids(pid_file).size() > 1 || follow_done; },
                            absl::Seconds(10)) &&
                  ReadPids(pid_file).size() > 1;
    }
    (void)WriteFileAtomically(release, "", 0600);
  });
  std::string got;
  auto final_status = client.Follow(
      "long", 0, [&](const proto::FollowLogsResponse& chunk) { got += chunk.data(); });
  follow_done = true;
  killer.join();
  SR_EXPECT_OK(final_status.status());
  EXPECT_TRUE(redialled) << "the client gave up instead of dialling again";
  EXPECT_EQ(got, "before\nafter\n");
}

// The backoff starts over after a connection that worked: otherwise, from the 7th drop of one
// Follow on, every drop stalled the output for max_backoff (2s) although the daemon answered.
TEST_F(ReconnectTest, ReconnectBackoffStartsOverAfterAWorkingConnection) {
  constexpr int kDrops = 10;
  const std::string pid_file = dir_.path() + "/bridges.pids";
  const std::string release = dir_.path() + "/release";
  client::ClientOptions options;  // the defaults: 20ms initial backoff, 2s at most
  options.endpoint.via_command = RecordingVia(pid_file);
  client::Client client(options);
  SR_ASSERT_OK(
      client.Run(Request("drops", ShStep(absl::StrCat("echo up; ", WaitForFileScript(release))))));
  std::atomic<bool> follow_done{false};
  absl::Duration slowest;
  std::thread killer([&] {
    for (int i = 0; i < kDrops && !follow_done; ++i) {
      size_t bridges = ReadPids(pid_file).size();
      // Not synchronisation: the connection works for a while (Status, then FollowLogs).
      absl::SleepFor(absl::Milliseconds(200));
      const absl::Time killed = absl::Now();
      if (!KillIfStillOurs(ReadPids(pid_file).back(), daemon_->socket_path())) break;
      if (!PollUntil([&] { return ReadPids(pid_file).size() > bridges || follow_done; },
                     absl::Seconds(10), absl::Milliseconds(1))) {
        break;
      }
      slowest = std::max(slowest, absl::Now() - killed);
    }
    (void)WriteFileAtomically(release, "", 0600);
  });
  ASSERT_TRUE(PollUntil([&] { return !ReadPids(pid_file).empty(); }, absl::Seconds(10)));
  auto final_status = client.Follow("drops", 0, [](const proto::FollowLogsResponse&) {});
  follow_done = true;
  killer.join();
  SR_EXPECT_OK(final_status.status());
  EXPECT_GE(client.dials(), kDrops + 1);
  EXPECT_LT(slowest, absl::Milliseconds(500))
      << "a drop after a working connection waited for the longest backoff";
}

// Ctrl-C at a random moment mid-stream: the CLI finishes printing and recording the chunk in
// hand, then exits, so a client started again continues exactly after it. (Against SIGKILL no
// client can promise this; there the window is the two syscalls between printing a chunk and
// recording it.)
TEST_F(ReconnectTest, ClientInterruptedMidStreamNeverPrintsAByteTwice) {
  constexpr int kRounds = 10;
  constexpr int64_t kBytes = 1 << 20;
  const std::string expected = ExpectedPattern(kBytes);
  std::mt19937 rng{std::random_device{}()};
  std::uniform_int_distribution<int64_t> threshold(64 << 10, 768 << 10);
  for (int round = 0; round < kRounds; ++round) {
    const std::string id = absl::StrCat("mid", round);
    const std::string file =
        StepFile(id, ShStep(absl::StrCat(PatternWriterBinary(), " ", kBytes, " 4096 2000")));
    auto first =
        BackgroundCommand::Start(CliArgv({"run", file, "--id", id, "--follow"}), CliEnvironment());
    ASSERT_TRUE(first.ok()) << first.status();
    const int64_t kill_at = threshold(rng);
    ASSERT_TRUE(PollUntil([&] { return (*first)->out_size() >= kill_at || (*first)->exited(); },
                          absl::Seconds(30)));
    (*first)->Signal(SIGINT);
    auto interrupted = (*first)->Wait(absl::Seconds(10));
    ASSERT_TRUE(interrupted.ok()) << interrupted.status();
    EXPECT_EQ(*interrupted, 128 + SIGINT);
    CommandResult second = Cli({"logs", id, "--follow"});
    EXPECT_EQ(second.exit_code, 0) << second.err;
    const std::string both = (*first)->out() + second.out;
    EXPECT_TRUE(both == expected) << "round " << round << ": " << Difference(both, expected) << "; "
                                  << second.err;
  }
}

}  // namespace
}  // namespace step_runner::testing

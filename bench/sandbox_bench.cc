// sandbox_bench: what the step sandbox adds to a step's dispatch, side by side in one run.
//
//   daemon, --sandbox=none    run-to-completion of `exec: [/bin/true]` (Run, then FollowLogs until
//                             the job's final status, as a client sees it)
//   daemon, --sandbox=bwrap   the same through the sandbox, as the daemon runs by default: the
//                             step takes a warm sandbox (made ahead by the pool) when there is one
//   daemon, bwrap cold        the same with --sandbox-warm=0: every sandbox made when its step
//                             starts (helper + bwrap + namespaces + cgroup)
//   raw bwrap                 posix_spawn + wait of bwrap around /bin/true with the daemon's
//                             argv, no daemon: the floor the sandbox cannot go below
//   raw /bin/true             posix_spawn + wait of /bin/true
//
// The sides alternate in ABBA batches, so load that drifts over the run hits all of them; the
// per-batch paired difference is the figure to quote (pooled percentiles of a shared machine
// are noisier).
//
// --gap_ms N pauses (untimed) between runs, as a client that reads a step's result before it
// sends the next would; 0 is back to back, the hardest case for a pool that is refilled behind
// the steps.
//
// Then, by itself: raw bwrap sandboxes made 1, 2, 4 at a time (--concurrency), sandboxes a
// second against /bin/true the same way: whether parallel making lifts the ceiling on steps that
// come back to back, each in its own fresh sandbox.
//
//   sandbox_bench [--quick] [--runs N] [--batch N] [--gap_ms N] [--concurrency 1,2,4] [--markdown FILE]
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/sandbox/policy.h"

ABSL_FLAG(bool, quick, false, "smoke-test sizes");
ABSL_FLAG(int, runs, 300, "timed runs per side");
ABSL_FLAG(int, batch, 10, "runs per side per batch (ABBA)");
ABSL_FLAG(int, warmup, 10, "untimed runs per side first");
ABSL_FLAG(int, gap_ms, 0, "untimed pause between runs");
ABSL_FLAG(bool, print_samples, false, "print every run's time (side, batch, ms) to stderr");
ABSL_FLAG(std::string, markdown, "", "also write the table as markdown to this file");
ABSL_FLAG(std::string, tmp_dir, "/tmp", "where the daemons' sockets and state go");
ABSL_FLAG(std::vector<std::string>, concurrency, std::vector<std::string>({"1", "2", "4"}),
          "after the table: raw bwrap sandboxes made this many at a time (comma-separated; empty: "
          "skip), to see whether making sandboxes in parallel raises how many a second this "
          "machine can make: the ceiling for steps that come back to back, each in a fresh sandbox");
ABSL_FLAG(int, concurrency_runs, 120, "sandboxes (and /bin/true runs) per concurrency level");

namespace step_runner::bench {
namespace {

constexpr char kSteps[] = "{}\n---\nexec:\n  command: [/bin/true]\n";

// One job, Run to final status through FollowLogs; microseconds.
absl::StatusOr<double> DaemonRunOnce(client::Client& client, const std::string& id) {
  proto::RunRequest request;
  request.set_id(id);
  request.set_steps(kSteps);
  const Clock::time_point start = Clock::now();
  SR_RETURN_IF_ERROR(client.Run(request));
  SR_ASSIGN_OR_RETURN(proto::Status status, client.Follow(id, 0, [](const proto::FollowLogsResponse&) {}));
  const double micros = MicrosSince(start);
  if (status.status() != proto::StepResult::success) {
    return absl::InternalError(absl::StrCat("job ", id, " did not succeed: ", status.message()));
  }
  SR_RETURN_IF_ERROR(client.Close(id));  // untimed: keeps the job table small
  return micros;
}

absl::StatusOr<double> RawOnce(const std::vector<std::string>& argv) {
  const Clock::time_point start = Clock::now();
  SR_ASSIGN_OR_RETURN(process::Subprocess child, process::Subprocess::Spawn({.argv = argv, .env = Environment()}));
  SR_ASSIGN_OR_RETURN(int code, child.Reap());
  const double micros = MicrosSince(start);
  if (code != 0) return absl::InternalError(absl::StrCat(argv[0], " exited with ", code));
  return micros;
}

std::string Ms(double micros) { return absl::StrFormat("%.2f ms", micros / 1000); }

// `total` runs of `argv`, `parallel` at a time (each of `parallel` threads runs its share back to
// back); the wall time in microseconds.
absl::StatusOr<double> RawInParallel(const std::vector<std::string>& argv, int parallel, int total) {
  std::vector<absl::Status> results(parallel);
  std::vector<std::thread> threads;
  const Clock::time_point start = Clock::now();
  for (int t = 0; t < parallel; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < total && results[t].ok(); i += parallel) results[t] = RawOnce(argv).status();
    });
  }
  for (std::thread& thread : threads) thread.join();
  const double micros = MicrosSince(start);
  for (const absl::Status& s : results) SR_RETURN_IF_ERROR(s);
  return micros;
}

// How many fresh sandboxes a second this machine makes, k at a time, against /bin/true the same
// way. A sandbox per step is the design (a step never shares one), so for steps that come back
// to back faster than the pool refills, this rate is the ceiling, whatever the daemon does.
absl::StatusOr<std::string> ConcurrencyTable(const std::vector<std::string>& bwrap, int total) {
  std::string table = absl::StrFormat(
      "\n| at a time (%d runs each: bwrap, then /bin/true) | raw bwrap /bin/true: per second | wall per sandbox | "
      "raw /bin/true: per second | wall per run |\n|---|---|---|---|---|\n",
      total);
  for (const std::string& level : absl::GetFlag(FLAGS_concurrency)) {
    int parallel = 0;
    if (!absl::SimpleAtoi(level, &parallel) || parallel < 1 || parallel > 64) {
      return absl::InvalidArgumentError(absl::StrCat("--concurrency: expected numbers from 1 to 64, got \"", level, "\""));
    }
    SR_ASSIGN_OR_RETURN(double sandboxes, RawInParallel(bwrap, parallel, total));
    SR_ASSIGN_OR_RETURN(double plain, RawInParallel({"/bin/true"}, parallel, total));
    absl::StrAppend(&table, "| ", parallel, " | ", absl::StrFormat("%.0f", total / (sandboxes / 1e6)), " | ",
                    Ms(sandboxes / total), " | ", absl::StrFormat("%.0f", total / (plain / 1e6)), " | ",
                    Ms(plain / total), " |\n");
  }
  return table;
}

absl::Status Main() {
  const bool quick = absl::GetFlag(FLAGS_quick);
  const int runs = quick ? 20 : absl::GetFlag(FLAGS_runs);
  const int batch = quick ? 5 : absl::GetFlag(FLAGS_batch);
  const int warmup = quick ? 2 : absl::GetFlag(FLAGS_warmup);
  SR_ASSIGN_OR_RETURN(std::unique_ptr<TempDir> tmp, TempDir::Create(absl::GetFlag(FLAGS_tmp_dir)));
  const std::string binary = DefaultStepRunnerBinary();
  SR_RETURN_IF_ERROR(MakeDirs(tmp->path() + "/none", 0700));
  SR_RETURN_IF_ERROR(MakeDirs(tmp->path() + "/bwrap", 0700));
  SR_RETURN_IF_ERROR(MakeDirs(tmp->path() + "/cold", 0700));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> plain,
                      DaemonProcess::Start(binary, tmp->path() + "/none", {"--sandbox=none"}));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> boxed,
                      DaemonProcess::Start(binary, tmp->path() + "/bwrap", {"--sandbox=bwrap"}));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> cold,
                      DaemonProcess::Start(binary, tmp->path() + "/cold", {"--sandbox=bwrap", "--sandbox-warm=0"}));
  client::Client plain_client(plain->ClientOptions());
  client::Client boxed_client(boxed->ClientOptions());
  client::Client cold_client(cold->ClientOptions());
  const absl::Duration gap = absl::Milliseconds(absl::GetFlag(FLAGS_gap_ms));
  // The same bwrap argv a step gets (no hidden paths: they only add mounts of tmpfs).
  sandbox::StepView view{.argv = {"/bin/true"}, .work_tree = tmp->path(), .cwd = tmp->path()};
  const std::vector<std::string> bwrap = sandbox::BwrapArgv("/usr/bin/bwrap", view);

  enum Side { kNone, kBwrap, kCold, kRawBwrap, kRawTrue, kSides };
  const char* names[kSides] = {"daemon, --sandbox=none", "daemon, --sandbox=bwrap (warm pool, default)",
                               "daemon, --sandbox=bwrap --sandbox-warm=0 (cold)", "raw bwrap /bin/true",
                               "raw /bin/true"};
  std::vector<double> samples[kSides];
  std::vector<double> paired;  // per batch: median(bwrap) - median(none)
  int next_id = 0;
  auto once = [&](int side) -> absl::StatusOr<double> {
    if (gap > absl::ZeroDuration()) absl::SleepFor(gap);
    switch (side) {
      case kNone:
        return DaemonRunOnce(plain_client, absl::StrCat("n", next_id++));
      case kBwrap:
        return DaemonRunOnce(boxed_client, absl::StrCat("b", next_id++));
      case kCold:
        return DaemonRunOnce(cold_client, absl::StrCat("c", next_id++));
      case kRawBwrap:
        return RawOnce(bwrap);
      default:
        return RawOnce({"/bin/true"});
    }
  };
  for (int i = 0; i < warmup; ++i) {
    for (int side = 0; side < kSides; ++side) SR_RETURN_IF_ERROR(once(side).status());
  }
  for (int done = 0, b = 0; done < runs; done += batch, ++b) {
    const int n = std::min(batch, runs - done);
    for (int k = 0; k < kSides; ++k) {
      const int side = b % 2 == 0 ? k : kSides - 1 - k;  // ABBA
      for (int i = 0; i < n; ++i) {
        SR_ASSIGN_OR_RETURN(double micros, once(side));
        samples[side].push_back(micros);
        if (absl::GetFlag(FLAGS_print_samples)) std::cerr << names[side] << "\t" << b << "\t" << Ms(micros) << "\n";
      }
    }
    auto last = [&](int side) {
      return Summarize(std::vector<double>(samples[side].end() - n, samples[side].end())).p50;
    };
    paired.push_back(last(kBwrap) - last(kNone));
  }
  std::string table = absl::StrFormat(
      "| side (%d runs each, ABBA batches of %d, %d ms between runs) | p50 | p90 | p99 | mean |\n|---|---|---|---|---|\n",
      runs, batch, absl::GetFlag(FLAGS_gap_ms));
  Summary s[kSides];
  for (int side = 0; side < kSides; ++side) {
    s[side] = Summarize(samples[side]);
    absl::StrAppend(&table, "| ", names[side], " | ", Ms(s[side].p50), " | ", Ms(s[side].p90), " | ",
                    Ms(s[side].p99), " | ", Ms(s[side].mean), " |\n");
  }
  absl::StrAppend(&table, "| **sandbox adds** (bwrap - none) | ", Ms(s[kBwrap].p50 - s[kNone].p50), " | ",
                  Ms(s[kBwrap].p90 - s[kNone].p90), " | ", Ms(s[kBwrap].p99 - s[kNone].p99), " | ",
                  Ms(s[kBwrap].mean - s[kNone].mean), " |\n");
  absl::StrAppend(&table, "| cold sandbox adds (cold - none) | ", Ms(s[kCold].p50 - s[kNone].p50), " | ",
                  Ms(s[kCold].p90 - s[kNone].p90), " | ", Ms(s[kCold].p99 - s[kNone].p99), " | ",
                  Ms(s[kCold].mean - s[kNone].mean), " |\n");
  absl::StrAppend(&table, "\nPaired per-batch difference of medians (bwrap - none): p50 ",
                  Ms(Summarize(paired).p50), ", over ", paired.size(), " batches. Goal: < 5 ms at p50.\n");
  if (!absl::GetFlag(FLAGS_concurrency).empty()) {
    SR_ASSIGN_OR_RETURN(std::string concurrency, ConcurrencyTable(bwrap, quick ? 8 : absl::GetFlag(FLAGS_concurrency_runs)));
    absl::StrAppend(&table, concurrency);
  }
  std::cout << table;
  if (const std::string path = absl::GetFlag(FLAGS_markdown); !path.empty()) std::ofstream(path) << table;
  SR_RETURN_IF_ERROR(plain->Stop());
  SR_RETURN_IF_ERROR(cold->Stop());
  return boxed->Stop();
}

}  // namespace
}  // namespace step_runner::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status s = step_runner::bench::Main();
  if (!s.ok()) {
    std::cerr << "sandbox_bench: " << s << std::endl;
    return 1;
  }
  return 0;
}

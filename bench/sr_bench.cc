// sr_bench: the step-runner daemon against doing the same work by hand, side by side in one run.
//
//   1. dispatch:   run-to-completion of `exec: [/bin/true]` through the daemon (Run, then Follow
//                  until the job ends, as a client sees it) vs posix_spawn + wait of /bin/true
//                  with the same stdout/stderr pipes;
//   2. throughput: a step writing N bytes to stdout, read back through FollowLogs, vs the same
//                  producer into a pipe that the bench drains;
//   3. memory:     the daemon's VmRSS/VmHWM idle after start and with jobs retained.
//
// The machine is shared and noisy, so both sides of each comparison run interleaved in one
// process and the report gives ratios; absolute figures are only comparable within one run.
//
//   sr_bench [--quick] [--runs N] [--log_mib N] [--retained_jobs N] [--markdown FILE]
//            [--samples_csv FILE] [--tmp_dir DIR]        (all flags: sr_bench --help)
#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "bench/bench_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/malloc_tuning.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"

ABSL_FLAG(bool, quick, false,
          "smoke-test sizes (overrides --runs/--warmup/--log_mib/--throughput_rounds/--retained_jobs)");
ABSL_FLAG(int, runs, 1000, "timed dispatch runs per side");
// The daemon's own costs; what the step sandbox adds is bench/sandbox_bench's to measure.
ABSL_FLAG(std::string, sandbox, "none", "the daemons' --sandbox (none or bwrap)");
ABSL_FLAG(int, warmup, 20, "untimed dispatch runs per side before timing");
ABSL_FLAG(int, batch, 10, "dispatch runs per side per batch; the sides alternate by batch (ABBA)");
ABSL_FLAG(bool, close_jobs, true,
          "Close each dispatch job after its timed run (untimed), so the job table stays small");
ABSL_FLAG(int64_t, log_mib, 1024, "MiB the throughput step writes to stdout");
ABSL_FLAG(int, throughput_rounds, 3, "throughput rounds per side (alternating); medians reported");
ABSL_FLAG(bool, throughput_split, true,
          "also time the daemon's ingest (producer to finished job) and replay (FollowLogs of a "
          "finished log) separately");
ABSL_FLAG(int, retained_jobs, 1000, "jobs run and kept (not closed) for the memory figure");
ABSL_FLAG(std::string, markdown, "", "also write the results as markdown to this file");
ABSL_FLAG(std::string, samples_csv, "",
          "also write every timed dispatch run (order, side, microseconds) to this CSV file, to see "
          "noise over time; the memory phase's jobs follow as side \"retained\"");
ABSL_FLAG(std::string, daemon, "", "step-runner binary (default: the one in the build tree)");
ABSL_FLAG(std::string, tmp_dir, "/tmp", "where the daemons' sockets and state dirs go");

namespace step_runner::bench {
namespace {

// The daemon reads step output 1 MiB at a time (runner/job.cc); the pipe baseline does too.
constexpr size_t kReadChunk = 1 << 20;
constexpr int64_t kMiB = 1 << 20;
// The retention limit is set far above anything the bench creates, so no job is pruned behind its
// back (the memory phase counts the jobs it retained).
constexpr char kMaxJobs[] = "1000000";

struct Config {
  std::string daemon_binary;
  std::string tmp_dir;
  int runs = 0;
  int warmup = 0;
  int batch = 0;
  bool close_jobs = true;
  int64_t log_bytes = 0;
  int throughput_rounds = 0;
  bool throughput_split = true;
  int retained_jobs = 0;
  std::string dd;  // absolute path, the same binary for both sides
  std::vector<std::string> step_env;
};

std::string StepFile(const std::vector<std::string>& argv) {
  return absl::StrCat("{}\n---\nexec:\n  command: [", absl::StrJoin(argv, ", "), "]\n");
}

std::vector<std::string> DdArgv(const Config& config) {
  return {config.dd, "if=/dev/zero", "bs=1M", absl::StrCat("count=", config.log_bytes), "iflag=count_bytes",
          "status=none"};
}

absl::Status CheckSuccess(const proto::Status& status, const std::string& id) {
  if (status.status() == proto::StepResult::success) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("job ", id, " did not succeed: ",
                                          proto::StepResult::Status_Name(status.status()), ": ",
                                          status.message()));
}

// ---------------------------------------------------------------------------------------------
// One run of each side.

// posix_spawn + wait of `argv`, with both output pipes drained to EOF: what the daemon does for
// a step, minus everything that makes it a daemon (RPC, job table, records, log file). With
// `sink_path`, the output goes into a new file there (deleted after), as into a log.
absl::StatusOr<double> RawRunOnce(const Config& config, const std::vector<std::string>& argv,
                                  const std::string& work_dir, int64_t* bytes, const std::string& sink_path = "") {
  const Clock::time_point start = Clock::now();
  UniqueFd sink;
  // Deleted once timed (or on an error): freeing its pages is not what is measured, as the
  // daemon's Close of its log is not.
  absl::Cleanup remove_sink = [&sink_path] {
    if (!sink_path.empty()) ::unlink(sink_path.c_str());
  };
  if (!sink_path.empty()) {
    sink = UniqueFd(::open(sink_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600));
    if (!sink) return ErrnoStatus(errno, absl::StrCat("open(", sink_path, ")"));
  }
  SR_ASSIGN_OR_RETURN(process::OutputPipe out, process::MakeOutputPipe());
  SR_ASSIGN_OR_RETURN(process::OutputPipe err, process::MakeOutputPipe());
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = argv,
                                                  .env = config.step_env,
                                                  .work_dir = work_dir,
                                                  .stdout_fd = out.write_end.get(),
                                                  .stderr_fd = err.write_end.get()}));
  // The child holds the only write ends now, so EOF means it is done writing.
  out.write_end.Close();
  err.write_end.Close();
  SR_ASSIGN_OR_RETURN(int64_t n, DrainToEof({out.read_end.get(), err.read_end.get()}, kReadChunk, sink.get()));
  SR_ASSIGN_OR_RETURN(int code, child.Reap());
  if (sink && !sink.Close()) return ErrnoStatus(errno, absl::StrCat("close(", sink_path, ")"));
  const double micros = MicrosSince(start);
  if (code != 0) return absl::InternalError(absl::StrCat(argv[0], " exited with ", code));
  if (bytes) *bytes = n;
  return micros;
}

struct DaemonRunTimes {
  double total = 0;   // Run + Follow: run-to-completion as the client sees it
  double run = 0;     // the Run RPC alone
  double follow = 0;  // Follow: FollowLogs until the log ends, then its Status RPC
};

absl::StatusOr<DaemonRunTimes> DaemonRunOnce(client::Client& client, const std::string& id,
                                             const std::string& steps, int64_t* bytes) {
  proto::RunRequest request;
  request.set_id(id);
  request.set_steps(steps);
  int64_t received = 0;
  const Clock::time_point start = Clock::now();
  SR_RETURN_IF_ERROR(client.Run(request));
  const Clock::time_point ran = Clock::now();
  // Counts and drops the bytes: storing 1 GiB would measure the allocator, not the daemon.
  absl::StatusOr<proto::Status> status =
      client.Follow(id, 0, [&](const proto::FollowLogsResponse& chunk) {
        received += static_cast<int64_t>(chunk.data().size());
      });
  DaemonRunTimes times;
  times.total = MicrosSince(start);
  times.run = std::chrono::duration<double, std::micro>(ran - start).count();
  times.follow = times.total - times.run;
  if (!status.ok()) return status.status();
  SR_RETURN_IF_ERROR(CheckSuccess(*status, id));
  if (bytes) *bytes = received;
  return times;
}

// Run-to-completion in one call (RunAndFollow): microseconds.
absl::StatusOr<double> DaemonOneCallOnce(client::Client& client, const std::string& id, const std::string& steps) {
  proto::RunRequest request;
  request.set_id(id);
  request.set_steps(steps);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<proto::Status> status = client.RunAndFollow(request, [](const proto::FollowLogsResponse&) {});
  const double micros = MicrosSince(start);
  if (!status.ok()) return status.status();
  SR_RETURN_IF_ERROR(CheckSuccess(*status, id));
  return micros;
}

// ---------------------------------------------------------------------------------------------
// Phases.

struct DispatchResult {
  Summary raw;
  Summary daemon;
  Summary one_call;  // RunAndFollow: run-to-completion in one call
  Summary run_rpc;
  Summary follow;
  Summary status_rpc;  // a unary Status RPC of a finished job: the floor of one round trip
  std::string samples_csv;  // "seq,side,micros" per timed run, in the order they ran
  // The overhead computed per ABBA batch pair (each side's batch median, side by side in time),
  // then the median over pairs: robust to load that drifts over the run, which the pooled p50s
  // are not.
  double paired_overhead = 0;
  double paired_one_call_overhead = 0;
  absl::Duration daemon_cpu_per_job;
  absl::Duration raw_cpu_per_run;  // the bench's own CPU per raw run (spawn, drain, reap)
};

absl::StatusOr<DispatchResult> RunDispatch(const Config& config, DaemonProcess& daemon,
                                           const std::string& work_dir) {
  const std::vector<std::string> argv = {"/bin/true"};
  const std::string steps = StepFile(argv);
  client::Client client(daemon.ClientOptions());
  std::vector<double> raw, total, one_call, run, follow, status_rpc;
  std::string csv = "seq,side,micros\n";
  int seq = 0;
  int next_id = 0;
  absl::Duration raw_cpu, daemon_cpu;
  std::vector<double> pair_overheads, pair_one_call_overheads;

  auto daemon_side = [&](bool timed) -> absl::Status {
    const std::string id = absl::StrCat("dispatch-", next_id++);
    SR_ASSIGN_OR_RETURN(DaemonRunTimes t, DaemonRunOnce(client, id, steps, nullptr));
    const Clock::time_point start = Clock::now();
    SR_RETURN_IF_ERROR(client.GetStatus(id).status());
    const double status_micros = MicrosSince(start);
    if (config.close_jobs) SR_RETURN_IF_ERROR(client.Close(id));
    if (timed) {
      total.push_back(t.total);
      absl::StrAppend(&csv, seq++, ",daemon,", absl::StrFormat("%.1f", t.total), "\n");
      run.push_back(t.run);
      follow.push_back(t.follow);
      status_rpc.push_back(status_micros);
    }
    return absl::OkStatus();
  };
  auto one_call_side = [&](bool timed) -> absl::Status {
    const std::string id = absl::StrCat("dispatch-", next_id++);
    SR_ASSIGN_OR_RETURN(double micros, DaemonOneCallOnce(client, id, steps));
    if (config.close_jobs) SR_RETURN_IF_ERROR(client.Close(id));
    if (timed) {
      one_call.push_back(micros);
      absl::StrAppend(&csv, seq++, ",one_call,", absl::StrFormat("%.1f", micros), "\n");
    }
    return absl::OkStatus();
  };
  auto raw_side = [&](bool timed) -> absl::Status {
    SR_ASSIGN_OR_RETURN(double micros, RawRunOnce(config, argv, work_dir, nullptr));
    if (timed) {
      raw.push_back(micros);
      absl::StrAppend(&csv, seq++, ",raw,", absl::StrFormat("%.1f", micros), "\n");
    }
    return absl::OkStatus();
  };

  for (int i = 0; i < config.warmup; ++i) {
    SR_RETURN_IF_ERROR(raw_side(false));
    SR_RETURN_IF_ERROR(daemon_side(false));
    SR_RETURN_IF_ERROR(one_call_side(false));
  }
  // Batches in rotating order: each side goes first a third of the time, so none always runs
  // right after another has warmed (or trashed) the caches, and a burst of noise hits all.
  for (int done = 0, batch = 0; done < config.runs; done += config.batch, ++batch) {
    const int n = std::min(config.batch, config.runs - done);
    for (int slot = 0; slot < 3; ++slot) {
      const int side = (slot + batch) % 3;  // 0 raw, 1 Run + Follow, 2 RunAndFollow
      if (side == 2) {
        for (int i = 0; i < n; ++i) SR_RETURN_IF_ERROR(one_call_side(true));
      } else if (side == 1) {
        SR_ASSIGN_OR_RETURN(CpuTime before, ReadCpuTime(daemon.pid()));
        for (int i = 0; i < n; ++i) SR_RETURN_IF_ERROR(daemon_side(true));
        SR_ASSIGN_OR_RETURN(CpuTime after, ReadCpuTime(daemon.pid()));
        daemon_cpu += after.self - before.self;
      } else {
        const CpuTime before = OwnCpuTime();
        for (int i = 0; i < n; ++i) SR_RETURN_IF_ERROR(raw_side(true));
        raw_cpu += OwnCpuTime().self - before.self;
      }
    }
    const double raw_batch = Summarize(std::vector<double>(raw.end() - n, raw.end())).p50;
    const double daemon_batch = Summarize(std::vector<double>(total.end() - n, total.end())).p50;
    pair_overheads.push_back((daemon_batch - raw_batch) / raw_batch);
    const double one_call_batch = Summarize(std::vector<double>(one_call.end() - n, one_call.end())).p50;
    pair_one_call_overheads.push_back((one_call_batch - raw_batch) / raw_batch);
  }
  DispatchResult result;
  result.raw = Summarize(raw);
  result.daemon = Summarize(total);
  result.one_call = Summarize(one_call);
  result.run_rpc = Summarize(run);
  result.follow = Summarize(follow);
  result.status_rpc = Summarize(status_rpc);
  result.samples_csv = std::move(csv);
  result.paired_overhead = Summarize(std::move(pair_overheads)).p50;
  result.paired_one_call_overhead = Summarize(std::move(pair_one_call_overheads)).p50;
  result.daemon_cpu_per_job = daemon_cpu / config.runs;
  result.raw_cpu_per_run = raw_cpu / config.runs;
  return result;
}

struct ThroughputResult {
  std::vector<double> pipe_mbps;
  std::vector<double> daemon_mbps;
  // The pipe side again, but drained into a new file beside the daemon's state dir: the least
  // that keeping the output at all costs (every byte the daemon ingests takes this path).
  std::vector<double> file_mbps;
  // CPU seconds per round (medians): who burns the two cores.
  double pipe_reader_cpu = 0;  // the bench draining the pipe
  double pipe_producer_cpu = 0;
  double daemon_cpu = 0;
  double daemon_client_cpu = 0;  // the bench in Follow (gRPC receive + protobuf parse)
  double daemon_producer_cpu = 0;
  std::optional<double> ingest_mbps;  // Run until the job finished (nobody following)
  std::optional<double> replay_mbps;  // Follow of the finished log from offset 0
};

double Median(std::vector<double> v) { return v.empty() ? 0 : Summarize(std::move(v)).p50; }

double MegabytesPerSecond(int64_t bytes, double micros) { return static_cast<double>(bytes) / micros; }

absl::StatusOr<ThroughputResult> RunThroughput(const Config& config, DaemonProcess& daemon,
                                               const std::string& work_dir) {
  const std::vector<std::string> argv = DdArgv(config);
  const std::string steps = StepFile(argv);
  client::Client client(daemon.ClientOptions());
  ThroughputResult result;
  std::vector<double> pipe_reader, pipe_producer, daemon_self, daemon_client, daemon_producer;
  auto check_bytes = [&](int64_t got, absl::string_view side) -> absl::Status {
    if (got == config.log_bytes) return absl::OkStatus();
    return absl::InternalError(absl::StrCat(side, ": read ", got, " bytes, expected ", config.log_bytes));
  };
  for (int round = 0; round < config.throughput_rounds; ++round) {
    // The three sides take turns going first, so none always runs on a page cache the one
    // before it just filled, nor always right after the daemon's log was deleted.
    for (int turn = 0; turn < 3; ++turn) {
      const int side = (round + turn) % 3;
      if (side == 0) {
        const CpuTime before = OwnCpuTime();
        int64_t bytes = 0;
        SR_ASSIGN_OR_RETURN(double micros, RawRunOnce(config, argv, work_dir, &bytes));
        const CpuTime after = OwnCpuTime();
        SR_RETURN_IF_ERROR(check_bytes(bytes, "pipe"));
        result.pipe_mbps.push_back(MegabytesPerSecond(bytes, micros));
        pipe_reader.push_back(absl::ToDoubleSeconds(after.self - before.self));
        pipe_producer.push_back(absl::ToDoubleSeconds(after.children - before.children));
      } else if (side == 1) {
        const std::string id = absl::StrCat("throughput-", round);
        SR_ASSIGN_OR_RETURN(CpuTime daemon_before, ReadCpuTime(daemon.pid()));
        const CpuTime before = OwnCpuTime();
        int64_t bytes = 0;
        SR_ASSIGN_OR_RETURN(DaemonRunTimes t, DaemonRunOnce(client, id, steps, &bytes));
        const CpuTime after = OwnCpuTime();
        SR_ASSIGN_OR_RETURN(CpuTime daemon_after, ReadCpuTime(daemon.pid()));
        SR_RETURN_IF_ERROR(check_bytes(bytes, "daemon"));
        result.daemon_mbps.push_back(MegabytesPerSecond(bytes, t.total));
        daemon_self.push_back(absl::ToDoubleSeconds(daemon_after.self - daemon_before.self));
        daemon_client.push_back(absl::ToDoubleSeconds(after.self - before.self));
        daemon_producer.push_back(absl::ToDoubleSeconds(daemon_after.children - daemon_before.children));
        // The log would otherwise stay on disk (and in the page cache) for the rest of the run.
        SR_RETURN_IF_ERROR(client.Close(id));
      } else {
        int64_t bytes = 0;
        SR_ASSIGN_OR_RETURN(double micros, RawRunOnce(config, argv, work_dir, &bytes, work_dir + "/throughput.file"));
        SR_RETURN_IF_ERROR(check_bytes(bytes, "pipe -> file"));
        result.file_mbps.push_back(MegabytesPerSecond(bytes, micros));
      }
    }
  }
  result.pipe_reader_cpu = Median(pipe_reader);
  result.pipe_producer_cpu = Median(pipe_producer);
  result.daemon_cpu = Median(daemon_self);
  result.daemon_client_cpu = Median(daemon_client);
  result.daemon_producer_cpu = Median(daemon_producer);

  if (config.throughput_split) {
    // Which half is slow: taking the output in (pipe -> log file) or handing it out (log file
    // -> gRPC stream -> client)? With nobody following, the ingest runs alone; the replay then
    // reads a finished log that is still in the page cache.
    const std::string id = "throughput-split";
    proto::RunRequest request;
    request.set_id(id);
    request.set_steps(steps);
    const Clock::time_point start = Clock::now();
    SR_RETURN_IF_ERROR(client.Run(request));
    for (;;) {
      SR_ASSIGN_OR_RETURN(proto::Status status, client.GetStatus(id));
      if (status.status() != proto::StepResult::running) {
        SR_RETURN_IF_ERROR(CheckSuccess(status, id));
        break;
      }
      // Polling granularity is ~0.1% of a 1 GiB ingest; fine for a diagnostic.
      absl::SleepFor(absl::Milliseconds(2));
    }
    result.ingest_mbps = MegabytesPerSecond(config.log_bytes, MicrosSince(start));
    int64_t bytes = 0;
    const Clock::time_point replay = Clock::now();
    SR_ASSIGN_OR_RETURN(proto::Status status,
                        client.Follow(id, 0, [&](const proto::FollowLogsResponse& chunk) {
                          bytes += static_cast<int64_t>(chunk.data().size());
                        }));
    result.replay_mbps = MegabytesPerSecond(bytes, MicrosSince(replay));
    SR_RETURN_IF_ERROR(check_bytes(bytes, "replay"));
    SR_RETURN_IF_ERROR(client.Close(id));
  }
  return result;
}

struct MemoryResult {
  MemoryUsage idle;
  MemoryUsage first_job;  // a client connected and one job run: the base for per-job cost
  MemoryUsage retained;
  size_t retained_count = 0;
  Summary retained_dispatch;  // run-to-completion while the table grows from 0 to N
  // The same for the first and the last tenth of those jobs: does a bigger table slow it down?
  Summary retained_first;
  Summary retained_last;
  std::vector<double> retained_times;  // in order, for --samples_csv
  std::optional<MemoryUsage> after_phases;  // the dispatch/throughput daemon at the end
};

absl::StatusOr<MemoryResult> RunMemory(const Config& config, const std::string& dir) {
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> daemon,
                      DaemonProcess::Start(config.daemon_binary, dir,
                                           {"--max-jobs", kMaxJobs, "--sandbox=" + absl::GetFlag(FLAGS_sandbox)}));
  // Let the gRPC threads finish starting, so "idle" is the settled figure, not a snapshot of
  // start-up.
  absl::SleepFor(absl::Milliseconds(500));
  MemoryResult result;
  SR_ASSIGN_OR_RETURN(result.idle, ReadMemoryUsage(daemon->pid()));

  client::Client client(daemon->ClientOptions());
  const std::string steps = StepFile({"/bin/true"});
  std::vector<double> times;
  for (int i = 0; i < config.retained_jobs; ++i) {
    SR_ASSIGN_OR_RETURN(DaemonRunTimes t, DaemonRunOnce(client, absl::StrCat("retained-", i), steps, nullptr));
    times.push_back(t.total);
    if (i == 0) {
      SR_ASSIGN_OR_RETURN(result.first_job, ReadMemoryUsage(daemon->pid()));
    }
  }
  SR_ASSIGN_OR_RETURN(std::vector<proto::Status> jobs, client.ListJobs());
  result.retained_count = jobs.size();
  if (result.retained_count != static_cast<size_t>(config.retained_jobs)) {
    return absl::InternalError(absl::StrCat("the daemon retains ", result.retained_count, " jobs, expected ",
                                            config.retained_jobs));
  }
  absl::SleepFor(absl::Milliseconds(200));
  SR_ASSIGN_OR_RETURN(result.retained, ReadMemoryUsage(daemon->pid()));
  const size_t tenth = std::max<size_t>(1, times.size() / 10);
  result.retained_first = Summarize(std::vector<double>(times.begin(), times.begin() + tenth));
  result.retained_last = Summarize(std::vector<double>(times.end() - tenth, times.end()));
  result.retained_dispatch = Summarize(times);
  result.retained_times = std::move(times);
  SR_RETURN_IF_ERROR(daemon->Stop());
  return result;
}

// ---------------------------------------------------------------------------------------------
// Report: one list of sections, rendered as an aligned text table or as markdown.

struct Section {
  std::string title;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> notes;
};

std::string Micros(double us) { return absl::StrFormat("%.0f us", us); }
std::string Mib(int64_t kib) { return absl::StrFormat("%.1f MiB", static_cast<double>(kib) / 1024); }
std::string Mbps(double v) { return absl::StrFormat("%.0f MB/s", v); }
std::string Seconds(double s) { return absl::StrFormat("%.2f s", s); }
std::string Verdict(bool met) { return met ? "MET" : "NOT MET"; }

std::vector<Section> BuildReport(const Config& config, const DispatchResult& d, const ThroughputResult& t,
                                 const MemoryResult& m) {
  std::vector<Section> sections;

  const double overhead = (d.daemon.p50 - d.raw.p50) / d.raw.p50;
  const double one_call_overhead = (d.one_call.p50 - d.raw.p50) / d.raw.p50;
  Section dispatch{
      .title = absl::StrFormat("Dispatch: run-to-completion of /bin/true (%d runs per side, batches of %d in rotating order)",
                               config.runs, config.batch),
      .header = {"", "raw posix_spawn+wait", "daemon Run+Follow", "daemon / raw", "daemon RunAndFollow", "one call / raw"},
  };
  auto row = [](const std::string& name, double raw, double daemon, double one_call) {
    return std::vector<std::string>{name, Micros(raw), Micros(daemon), absl::StrFormat("%.2fx", daemon / raw),
                                    Micros(one_call), absl::StrFormat("%.2fx", one_call / raw)};
  };
  dispatch.rows.push_back(row("p50", d.raw.p50, d.daemon.p50, d.one_call.p50));
  dispatch.rows.push_back(row("p90", d.raw.p90, d.daemon.p90, d.one_call.p90));
  dispatch.rows.push_back(row("p99", d.raw.p99, d.daemon.p99, d.one_call.p99));
  dispatch.rows.push_back(row("min", d.raw.min, d.daemon.min, d.one_call.min));
  dispatch.rows.push_back(row("mean", d.raw.mean, d.daemon.mean, d.one_call.mean));
  dispatch.rows.push_back({"CPU per run", Micros(absl::ToDoubleMicroseconds(d.raw_cpu_per_run)) + " (bench)",
                           Micros(absl::ToDoubleMicroseconds(d.daemon_cpu_per_job)) + " (daemon)", "", "", ""});
  dispatch.notes.push_back(absl::StrFormat(
      "Overhead (daemon_p50 - raw_p50) / raw_p50: Run+Follow %.2f, RunAndFollow %.2f; goal <= 0.50: %s. The "
      "same per batch, median over batches (robust to load drifting during the run): %.2f and %.2f.",
      overhead, one_call_overhead, Verdict(std::min(overhead, one_call_overhead) <= 0.5), d.paired_overhead,
      d.paired_one_call_overhead));
  dispatch.notes.push_back(absl::StrCat(
      "Both sides: /bin/true with stdout and stderr on pipes drained to EOF, the daemon's step environment, a "
      "work dir. Daemon jobs ",
      config.close_jobs ? "were Closed after each timed run (Close not timed)" : "were not closed",
      "; the daemon runs with --max-jobs ", kMaxJobs, ". Daemon CPU per run includes the untimed Status and Close RPCs."));
  sections.push_back(std::move(dispatch));

  Section split{.title = "Dispatch: where the daemon's time goes (same runs)",
                .header = {"phase", "p50", "p99", "share of daemon p50"}};
  auto share = [&](double v) { return absl::StrFormat("%.0f%%", 100 * v / d.daemon.p50); };
  split.rows.push_back({"Run RPC (validate, create job dir + log + record, reply)", Micros(d.run_rpc.p50),
                        Micros(d.run_rpc.p99), share(d.run_rpc.p50)});
  split.rows.push_back({"Follow (FollowLogs until the job ends; its last message has the status)", Micros(d.follow.p50),
                        Micros(d.follow.p99), share(d.follow.p50)});
  split.rows.push_back({"  reference: one Status RPC round trip", Micros(d.status_rpc.p50),
                        Micros(d.status_rpc.p99), share(d.status_rpc.p50)});
  split.rows.push_back({"  reference: raw spawn+wait", Micros(d.raw.p50), Micros(d.raw.p99), share(d.raw.p50)});
  const double floor = 2 * d.status_rpc.p50;
  split.notes.push_back(absl::StrFormat(
      "RPC floor: run-to-completion is two sequential round trips (Run, then FollowLogs, whose last message "
      "carries the final status); at the Status round trip's p50 that is %s = %.0f%% of raw p50, against a "
      "budget of 50%% for everything the daemon adds.",
      Micros(floor), 100 * floor / d.raw.p50));
  split.notes.push_back(
      "Follow minus one round trip minus the raw spawn is roughly what the daemon spends between the Run "
      "reply and the end of the FollowLogs stream beyond the spawn itself (loop hand-off, record writes, "
      "pipe/pidfd wake-ups, log finish, stream wake-up).");
  sections.push_back(std::move(split));

  const double pipe = Median(t.pipe_mbps);
  const double daemon = Median(t.daemon_mbps);
  Section throughput{
      .title = absl::StrFormat("Log throughput: %d MiB of stdout (%d round(s) per side, sides rotating; medians)",
                               config.log_bytes / kMiB, config.throughput_rounds),
      .header = {"", "pipe -> bench (drain)", "daemon -> FollowLogs", "daemon / pipe"},
  };
  throughput.rows.push_back({"throughput", Mbps(pipe), Mbps(daemon), absl::StrFormat("%.2f", daemon / pipe)});
  auto rounds = [](const std::vector<double>& v) {
    std::vector<std::string> s;
    for (double x : v) s.push_back(absl::StrFormat("%.0f", x));
    return absl::StrJoin(s, ", ");
  };
  throughput.rows.push_back({"each round (MB/s)", rounds(t.pipe_mbps), rounds(t.daemon_mbps), ""});
  const double pipe_to_file = Median(t.file_mbps);
  throughput.rows.push_back({"  reference: pipe -> bench -> new file on the state dir's filesystem", Mbps(pipe_to_file),
                             absl::StrFormat("daemon / this: %.2f", daemon / pipe_to_file),
                             absl::StrFormat("%.2f", pipe_to_file / pipe)});
  throughput.rows.push_back({"  each round (MB/s)", rounds(t.file_mbps), "", ""});
  throughput.rows.push_back({"CPU: producer (dd)", Seconds(t.pipe_producer_cpu), Seconds(t.daemon_producer_cpu), ""});
  throughput.rows.push_back({"CPU: reader", Seconds(t.pipe_reader_cpu) + " (bench)",
                             Seconds(t.daemon_cpu) + " (daemon)", ""});
  throughput.rows.push_back({"CPU: client", "-", Seconds(t.daemon_client_cpu) + " (bench)", ""});
  if (t.ingest_mbps) {
    throughput.rows.push_back({"daemon ingest alone (Run until finished, nobody following)", "",
                               Mbps(*t.ingest_mbps), absl::StrFormat("%.2f", *t.ingest_mbps / pipe)});
    throughput.rows.push_back({"daemon replay alone (FollowLogs of the finished log)", "",
                               Mbps(*t.replay_mbps), absl::StrFormat("%.2f", *t.replay_mbps / pipe)});
  }
  throughput.notes.push_back(absl::StrFormat("Ratio daemon/pipe = %.2f; goal >= 0.50: %s.", daemon / pipe,
                                             Verdict(daemon / pipe >= 0.5)));
  throughput.notes.push_back(absl::StrCat(
      "Producer on both sides: ", absl::StrJoin(DdArgv(config), " "),
      ". Pipe side: the bench spawns it exactly as the daemon does (posix_spawn, stdout and stderr on 1 MiB "
      "pipes) and drains them with 1 MiB reads, the daemon's read size, so the difference is what the daemon "
      "adds: the log file write, the read back, gRPC framing over the unix socket and the client's parse. "
      "MB = 10^6 bytes; CPU is user+system seconds per round. The pipe -> file reference is the pipe side with "
      "every read also written to a new file beside the daemon's state dir (then deleted): the least any runner "
      "that keeps its output pays, and what the daemon's ingest does before anything is sent."));
  sections.push_back(std::move(throughput));

  const double goal_mib = 15e6 / (1 << 20);
  Section memory{.title = "Daemon memory (/proc/<pid>/status)",
                 .header = {"state", "VmRSS", "RssAnon", "RssFile", "VmHWM"}};
  auto mem_row = [](const std::string& name, const MemoryUsage& u) {
    return std::vector<std::string>{name, Mib(u.rss_kib), Mib(u.rss_anon_kib), Mib(u.rss_file_kib), Mib(u.hwm_kib)};
  };
  memory.rows.push_back(mem_row("idle after start", m.idle));
  memory.rows.push_back(mem_row("1 job run, client connected", m.first_job));
  memory.rows.push_back(mem_row(absl::StrCat(m.retained_count, " finished jobs retained"), m.retained));
  if (m.after_phases) {
    memory.rows.push_back(mem_row("after the dispatch + throughput phases (all closed)", *m.after_phases));
  }
  const bool idle_met = static_cast<double>(m.idle.rss_kib) / 1024 < goal_mib;
  memory.notes.push_back(absl::StrFormat("Idle VmRSS %s; goal < 15 MB (%.1f MiB): %s.", Mib(m.idle.rss_kib), goal_mib,
                                         Verdict(idle_met)));
  memory.notes.push_back(absl::StrFormat(
      "Idle and retained: a fresh daemon with no client at the idle reading, then %d /bin/true jobs run one after "
      "another (Run + Follow) and not closed. Per retained job (from the 1-job reading): %.1f KiB of VmRSS. "
      "Run-to-completion while the table grew: p50 %s, p99 %s (first tenth of the jobs p50 %s, last tenth p50 "
      "%s). RssFile is the mapped binary and shared libraries "
      "(shared with any other process using them); RssAnon is the daemon's own heap and stacks.",
      m.retained_count,
      static_cast<double>(m.retained.rss_kib - m.first_job.rss_kib) /
          static_cast<double>(std::max<size_t>(1, m.retained_count - 1)),
      Micros(m.retained_dispatch.p50), Micros(m.retained_dispatch.p99), Micros(m.retained_first.p50),
      Micros(m.retained_last.p50)));
  sections.push_back(std::move(memory));
  return sections;
}

std::string RenderText(const std::vector<Section>& sections) {
  std::string out;
  for (const Section& s : sections) {
    std::vector<size_t> width(s.header.size(), 0);
    auto measure = [&](const std::vector<std::string>& cells) {
      for (size_t i = 0; i < cells.size() && i < width.size(); ++i) width[i] = std::max(width[i], cells[i].size());
    };
    measure(s.header);
    for (const auto& r : s.rows) measure(r);
    auto line = [&](const std::vector<std::string>& cells) {
      std::string l;
      for (size_t i = 0; i < width.size(); ++i) {
        const std::string& cell = i < cells.size() ? cells[i] : "";
        // First column left-aligned (labels), the figures right-aligned.
        l += i == 0 ? absl::StrFormat("%-*s", width[i], cell) : absl::StrFormat("  %*s", width[i], cell);
      }
      return std::string(absl::StripTrailingAsciiWhitespace(l)) + "\n";
    };
    absl::StrAppend(&out, "\n== ", s.title, " ==\n", line(s.header));
    size_t total = 0;
    for (size_t w : width) total += w + 2;
    absl::StrAppend(&out, std::string(total - 2, '-'), "\n");
    for (const auto& r : s.rows) out += line(r);
    for (const std::string& note : s.notes) absl::StrAppend(&out, "  * ", note, "\n");
  }
  return out;
}

std::string RenderMarkdown(const std::vector<Section>& sections) {
  std::string out;
  for (const Section& s : sections) {
    absl::StrAppend(&out, "\n### ", s.title, "\n\n| ", absl::StrJoin(s.header, " | "), " |\n|");
    for (size_t i = 0; i < s.header.size(); ++i) out += i == 0 ? "---|" : "---:|";
    out += "\n";
    for (const auto& r : s.rows) absl::StrAppend(&out, "| ", absl::StrJoin(r, " | "), " |\n");
    if (!s.notes.empty()) out += "\n";
    for (const std::string& note : s.notes) absl::StrAppend(&out, "- ", note, "\n");
  }
  return out;
}

std::string MachineDescription() {
  std::string model = "unknown";
  if (auto cpuinfo = ReadFile("/proc/cpuinfo"); cpuinfo.ok()) {
    for (absl::string_view line : absl::StrSplit(*cpuinfo, '\n')) {
      if (absl::ConsumePrefix(&line, "model name")) {
        model = std::string(absl::StripAsciiWhitespace(absl::StripPrefix(absl::StripAsciiWhitespace(line), ":")));
        break;
      }
    }
  }
  std::string memory = "unknown";
  if (auto meminfo = ReadFile("/proc/meminfo"); meminfo.ok()) {
    for (absl::string_view line : absl::StrSplit(*meminfo, '\n')) {
      if (absl::ConsumePrefix(&line, "MemTotal:")) {
        memory = std::string(absl::StripAsciiWhitespace(line));
        break;
      }
    }
  }
  utsname uts{};
  ::uname(&uts);
  return absl::StrFormat("%d CPUs (nproc), %s, kernel %s, MemTotal %s", ::sysconf(_SC_NPROCESSORS_ONLN), model,
                         uts.release, memory);
}

// ---------------------------------------------------------------------------------------------

absl::StatusOr<Config> MakeConfig() {
  Config config;
  config.daemon_binary = absl::GetFlag(FLAGS_daemon).empty() ? DefaultStepRunnerBinary() : absl::GetFlag(FLAGS_daemon);
  config.tmp_dir = absl::GetFlag(FLAGS_tmp_dir);
  config.runs = absl::GetFlag(FLAGS_runs);
  config.warmup = absl::GetFlag(FLAGS_warmup);
  config.batch = absl::GetFlag(FLAGS_batch);
  config.close_jobs = absl::GetFlag(FLAGS_close_jobs);
  config.log_bytes = absl::GetFlag(FLAGS_log_mib) * kMiB;
  config.throughput_rounds = absl::GetFlag(FLAGS_throughput_rounds);
  config.throughput_split = absl::GetFlag(FLAGS_throughput_split);
  config.retained_jobs = absl::GetFlag(FLAGS_retained_jobs);
  if (absl::GetFlag(FLAGS_quick)) {
    config.runs = 50;
    config.warmup = 5;
    config.log_bytes = 64 * kMiB;
    config.throughput_rounds = 1;
    config.retained_jobs = 100;
  }
  if (config.runs < 1 || config.batch < 1 || config.warmup < 0 || config.log_bytes < kMiB ||
      config.throughput_rounds < 1 || config.retained_jobs < 1) {
    return absl::InvalidArgumentError(
        "--runs, --batch, --throughput_rounds, --retained_jobs must be >= 1, --warmup >= 0, --log_mib >= 1");
  }
  config.step_env = StepEnvironment();
  SR_ASSIGN_OR_RETURN(config.dd, process::FindExecutable("dd", config.step_env));
  if (::access(config.daemon_binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("no step-runner binary at ", config.daemon_binary));
  }
  return config;
}

absl::Status Main(const std::string& command_line) {
  SR_ASSIGN_OR_RETURN(Config config, MakeConfig());
  const std::string machine = MachineDescription();
  const std::string state_fs =
      absl::StrCat(config.tmp_dir, " (", FilesystemType(config.tmp_dir), ")");
  const std::string date = absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::Now(), absl::UTCTimeZone());
  std::cerr << "sr_bench: " << machine << "\n"
            << "sr_bench: " << config.runs << " dispatch runs per side, " << config.log_bytes / kMiB
            << " MiB x " << config.throughput_rounds << " throughput rounds, " << config.retained_jobs
            << " retained jobs" << std::endl;

  SR_ASSIGN_OR_RETURN(std::unique_ptr<TempDir> tmp, TempDir::Create(config.tmp_dir));
  const std::string work_dir = tmp->path() + "/work";
  SR_RETURN_IF_ERROR(MakeDirs(work_dir, 0700));

  // Memory first, in a daemon of its own: "idle" must not include what the other phases leave.
  std::cerr << "sr_bench: memory (" << config.retained_jobs << " retained jobs)..." << std::endl;
  SR_RETURN_IF_ERROR(MakeDirs(tmp->path() + "/mem", 0700));
  SR_ASSIGN_OR_RETURN(MemoryResult memory, RunMemory(config, tmp->path() + "/mem"));

  SR_RETURN_IF_ERROR(MakeDirs(tmp->path() + "/main", 0700));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<DaemonProcess> daemon,
                      DaemonProcess::Start(config.daemon_binary, tmp->path() + "/main",
                                           {"--max-jobs", kMaxJobs, "--sandbox=" + absl::GetFlag(FLAGS_sandbox)}));
  std::cerr << "sr_bench: dispatch..." << std::endl;
  SR_ASSIGN_OR_RETURN(DispatchResult dispatch, RunDispatch(config, *daemon, work_dir));
  if (const std::string path = absl::GetFlag(FLAGS_samples_csv); !path.empty()) {
    std::string csv = dispatch.samples_csv;
    for (size_t i = 0; i < memory.retained_times.size(); ++i) {
      absl::StrAppend(&csv, i, ",retained,", absl::StrFormat("%.1f", memory.retained_times[i]), "\n");
    }
    SR_RETURN_IF_ERROR(WriteFileAtomically(path, csv, 0644));
  }
  std::cerr << "sr_bench: throughput..." << std::endl;
  SR_ASSIGN_OR_RETURN(ThroughputResult throughput, RunThroughput(config, *daemon, work_dir));
  SR_ASSIGN_OR_RETURN(memory.after_phases, ReadMemoryUsage(daemon->pid()));
  SR_RETURN_IF_ERROR(daemon->Stop());

  const std::vector<Section> report = BuildReport(config, dispatch, throughput, memory);
  std::cout << "sr_bench " << date << "\n" << machine << "\nDaemon state dirs under " << state_fs << "\n"
            << RenderText(report) << std::flush;
  if (const std::string path = absl::GetFlag(FLAGS_markdown); !path.empty()) {
    std::string md = absl::StrCat("Command: `", command_line, "`  \nDate: ", date, "  \nMachine: ", machine,
                                  "  \nDaemon state dirs under: ", state_fs, "\n", RenderMarkdown(report));
    SR_RETURN_IF_ERROR(WriteFileAtomically(path, md, 0644));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace step_runner::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("sr_bench [--quick] [--runs N] [--log_mib N] [--retained_jobs N] [--markdown FILE]");
  std::vector<std::string> words(argv, argv + argc);
  const std::string command_line = absl::StrJoin(words, " ");
  absl::ParseCommandLine(argc, argv);
  // The bench is the client here, and receives the log as our CLI does (both sides of every
  // comparison run in this one process).
  step_runner::base::KeepStreamingBuffersMapped();
  absl::Status status = step_runner::bench::Main(command_line);
  if (!status.ok()) {
    std::cerr << "sr_bench: " << status << std::endl;
    return 1;
  }
  return 0;
}

// step-runner: the daemon, its stdio bridge, and the client CLI.
//
//   step-runner serve --socket PATH --state-dir DIR     the daemon
//   step-runner proxy [--socket PATH]                    stdin/stdout <-> the daemon's socket
//   step-runner run FILE [--id ID] [--env K=V] [--follow] ...
//   step-runner logs ID [--offset N] [--follow]
//   step-runner events ID [--after-seq N]
//   step-runner exec FILE [--env K=V]                    in-process, no daemon
//   step-runner status [ID] | cancel ID | close ID
//
// Guarantees of the client commands:
//  - a dropped connection is redialled with backoff, then Status, then FollowLogs from the last
//    byte delivered: no byte is printed twice or missed;
//  - `run` may be retried with the same id: it never starts a second job;
//  - a client killed while following and started again (same id, same daemon) resumes where the
//    killed one stopped, from the resume point it keeps in $XDG_STATE_HOME/step-runner/follow;
//  - the exit code follows the job's outcome (see README.md).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <climits>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "step-runner/base/malloc_tuning.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "google/protobuf/util/json_util.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/utf8.h"
#include "step-runner/steps/step_file.h"
#include "google/protobuf/util/time_util.h"
#include "step-runner/runner/runner.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/cli/cli.h"
#include "step-runner/client/client.h"
#include "step-runner/client/ssh_transport.h"
#include "step-runner/server/daemon.h"
#include "step-runner/audit/cli.h"
#include "step-runner/sandbox/flags.h"

namespace step_runner {
namespace {

using namespace cli;  // NOLINT: the commands share its flags, exit codes and defaults


constexpr char kUsage[] = R"(usage:
  step-runner serve [--socket PATH] [--state-dir DIR] [--allow-uid UID]...
                    [--max-jobs N] [--max-age DURATION] [--graceful-exit-timeout DURATION]
                    [--log-level info|warning|error] [--catalog DIR]
  step-runner proxy [--socket PATH]
  step-runner run FILE|- [--id ID] [--input NAME=VALUE]... [--env K=V]... [--var K=V]... [--masked-var K=V]...
                    [--file-var K=V]... [--work-dir DIR] [--timeout DURATION]
                    [--graceful-exit-timeout DURATION] [--follow] [--split-streams]
  step-runner logs ID [--offset N] [--follow] [--split-streams]
  step-runner events ID [--after-seq N]
  step-runner exec FILE|- [--input NAME=VALUE]... [--env K=V]... [--work-dir DIR] [--timeout DURATION]
                    [--result FILE] [--catalog DIR]
                    (runs in-process, no daemon; prints the log, then the result tree as JSON)
  step-runner status [ID]
  step-runner cancel ID
  step-runner close ID
  step-runner audit verify|tail [--state-dir DIR] [--follow] [--lines N]

serve's step sandbox (see step-runner/sandbox/README.md):
  --sandbox=bwrap|none (default bwrap)  --network=none|all|allow (default none)
  --allow-host HOST:PORT...  --limit-memory BYTES (4G)  --limit-cpu SECONDS (3600)
  --limit-procs N (1024)  --limit-files N (4096)  --limit-output BYTES (1G)  --hide PATH...
  --sandbox-warm N (2: sandboxes made ahead for steps without network; 0: none)

Client commands reach the daemon through --socket PATH (default: $STEP_RUNNER_SOCKET) or
--via 'COMMAND' (a command whose stdin/stdout reach `step-runner proxy`, e.g.
--via 'ssh workspace step-runner proxy'), or the built-in SSH client:
--ssh WORKSPACE@HOST[:PORT] --ssh-key FILE [--ssh-known-hosts FILE] (workspace-proxy).
)";




int ExitForJob(const proto::Status& job) {
  switch (job.status()) {
    case proto::StepResult::success:
      return 0;
    case proto::StepResult::cancelled:
      return job.error().kind() == proto::StatusError::timeout ? kExitTimeout : kExitCancelled;
    case proto::StepResult::failure:
      if (job.error().kind() == proto::StatusError::interrupted) return kExitInterrupted;
      // A step's own `timeout:` fails the job (the step was killed, 143): still a timeout.
      if (job.error().kind() == proto::StatusError::timeout) return kExitTimeout;
      return job.exit_code() > 0 && job.exit_code() < 256 ? job.exit_code() : 1;
    default:
      return kExitSoftware;
  }
}

std::string StatusName(proto::StepResult::Status s) {
  return proto::StepResult::Status_Name(s);
}


client::ClientOptions ClientOptionsFrom(const Args& args) {
  // Said before dialling, as usage (exit 2): they used to surface as a refused request (65)
  // after connecting, or one endpoint was silently dropped for the other.
  if (args.Get("ssh") && args.Get("via")) throw UsageError{"give --ssh or --via, not both"};
  if (auto ssh = args.Get("ssh")) {
    if (!args.Get("ssh-key")) throw UsageError{"--ssh needs --ssh-key FILE (the key the workspace authorizes)"};
    if (auto target = client::ParseSshTarget(*ssh); !target.ok()) throw UsageError{std::string(target.status().message())};
  } else if (args.Get("ssh-key") || args.Get("ssh-known-hosts")) {
    throw UsageError{"--ssh-key and --ssh-known-hosts go with --ssh WORKSPACE@HOST[:PORT]"};
  }
  client::ClientOptions options;
  options.endpoint.socket_path = args.Get("socket").value_or(DefaultSocket());
  options.endpoint.via_command = args.Get("via").value_or("");
  options.endpoint.ssh_target = args.Get("ssh").value_or("");
  options.endpoint.ssh_key = args.Get("ssh-key").value_or("");
  options.endpoint.ssh_known_hosts = args.Get("ssh-known-hosts").value_or("");
  options.on_notice = Notice;
  return options;
}

// Where a follower keeps how far it got, so that a killed client started again resumes there.
// The offset is rewritten in place with one pwrite of a fixed-width line on an fd kept open:
// between printing a chunk and recording it there are two syscalls, nothing more. The line also
// names the job by its start time: an id can be closed and used again for a new job, whose log
// must then be shown from its first byte.
class ResumePoint {
 public:
  struct Position {
    int64_t offset = 0;
    std::string job_start;  // empty: not recorded (a position saved by an older client)
  };

  ResumePoint(const client::Endpoint& endpoint, const std::string& id) {
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over endpoint and id
    const absl::string_view nul("\0", 1);
    // (The --ssh target only when set, so that existing resume points keep their names.)
    const std::string ssh = endpoint.ssh_target.empty() ? "" : absl::StrCat(nul, endpoint.ssh_target);
    for (char c : absl::StrCat(endpoint.via_command, nul, endpoint.socket_path, nul, id, ssh)) {
      hash = (hash ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    }
    dir_ = StateHome() + "/follow";
    path_ = absl::StrFormat("%s/%016x.offset", dir_, hash);
  }
  Position Load() const {
    auto text = ReadFile(path_);
    if (!text.ok()) return {};
    std::vector<std::string> fields = absl::StrSplit(absl::StripAsciiWhitespace(*text), ' ');
    Position position;
    if (fields.empty() || !absl::SimpleAtoi(fields[0], &position.offset) || position.offset < 0) return {};
    if (fields.size() > 1) position.job_start = fields[1];
    return position;
  }
  // `job_start`: JobStart() of the job the offset is in.
  void Save(int64_t offset, const std::string& job_start) {
    if (!fd_) {
      if (!MakeDirs(dir_, 0700).ok()) return;
      fd_.Reset(::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
      if (!fd_) return;
    }
    std::string text = absl::StrFormat("%020d %s\n", offset, job_start);
    ssize_t unused = ::pwrite(fd_.get(), text.data(), text.size(), 0);
    (void)unused;
  }
  void Clear() {
    fd_.Close();
    ::unlink(path_.c_str());
  }
  static std::string JobStart(const proto::Status& status) {
    return absl::StrCat(status.start_time().seconds(), ".", absl::Dec(status.start_time().nanos(), absl::kZeroPad9));
  }

 private:
  std::string dir_;
  std::string path_;
  UniqueFd fd_;
};

// Ctrl-C, SIGTERM or SIGHUP while following: end at once, unless a chunk is being printed and
// recorded; then end right after, so that a client started again never prints a byte twice.
volatile sig_atomic_t g_in_output = 0;
volatile sig_atomic_t g_deferred_signal = 0;

extern "C" void OnInterrupt(int signo) {
  if (g_in_output) {
    g_deferred_signal = signo;
    return;
  }
  ::_exit(128 + signo);
}

void DeferInterruptsWhileOutputting() {
  struct sigaction action{};
  action.sa_handler = OnInterrupt;
  sigemptyset(&action.sa_mask);
  for (int signo : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(signo, &action, nullptr);
}

// Streams a job's log to stdout (stderr chunks to stderr with --split-streams) and returns the
// CLI exit code.
// `start`: the job to run first (step-runner run --follow), in the same call as the follow when
// there is nothing to resume.
int FollowToTerminal(client::Client& client, const client::Endpoint& endpoint, const std::string& id,
                     std::optional<int64_t> explicit_offset, bool split_streams, bool follow,
                     const proto::RunRequest* start = nullptr) {
  ResumePoint resume(endpoint, id);
  int64_t offset = 0;
  std::string job_start;  // of the job being followed, once known
  int job_start_asks = 0;  // from inside the stream, at most a few (each may wait up to 2 s)
  if (explicit_offset) {
    offset = *explicit_offset;
  } else if (follow) {
    ResumePoint::Position saved = resume.Load();
    if (saved.offset > 0) {
      // Only if it is still the same job: the id may have been closed and used again.
      absl::StatusOr<proto::Status> now = client.GetStatus(id);
      if (now.ok()) job_start = ResumePoint::JobStart(*now);
      if (now.ok() && (saved.job_start.empty() || saved.job_start == job_start)) {
        offset = saved.offset;
      } else {
        if (now.ok()) Notice(absl::StrCat("job ", id, " is not the one followed before (it started later); from its first byte"));
        resume.Clear();
        job_start.clear();
      }
    }
  }
  auto started = [&] { Notice(absl::StrCat("job ", id, " started")); };
  if (start && offset > 0) {
    // A killed client started again: the job is there (Run is idempotent); resume where it was.
    if (absl::Status s = client.Run(*start); !s.ok()) return Fail(s);
    started();
    start = nullptr;
  }
  if (follow && !explicit_offset && offset > 0) Notice(absl::StrCat("resuming job ", id, " at byte ", offset));
  std::optional<int64_t> stop_at;
  if (!follow) {
    auto status = client.GetStatus(id);
    if (!status.ok()) return Fail(status.status());
    stop_at = status->log_size();
  }
  if (follow) DeferInterruptsWhileOutputting();
  auto sink = [&](const proto::FollowLogsResponse& chunk) {
    int fd = split_streams && chunk.stream() == proto::FollowLogsResponse::STREAM_STDERR ? 2 : 1;
    g_in_output = 1;
    if (absl::Status s = WriteAll(fd, chunk.data()); !s.ok()) {
      Notice(absl::StrCat("cannot write the output: ", s.message()));
      ::_exit(kExitSoftware);
    }
    if (follow) {
      if (job_start.empty() && job_start_asks++ < 3) {
        // The first output of this follow: which job it is, for a client started again later.
        // (Not GetStatus: its redial would pull the connection from under this stream.)
        absl::StatusOr<proto::Status> now = client.GetStatusOnThisConnection(id);
        if (now.ok()) job_start = ResumePoint::JobStart(*now);
      }
      resume.Save(chunk.offset() + static_cast<int64_t>(chunk.data().size()), job_start);
    }
    g_in_output = 0;
    if (g_deferred_signal) ::_exit(128 + g_deferred_signal);
  };
  auto final_status = start ? client.RunAndFollow(*start, sink, started) : client.Follow(id, offset, sink, nullptr, stop_at);
  if (!final_status.ok()) {
    if (absl::IsOutOfRange(final_status.status()) && follow && !explicit_offset) resume.Clear();
    return Fail(final_status.status());
  }
  if (!follow) return 0;
  resume.Clear();
  const proto::Status& job = *final_status;
  if (job.status() == proto::StepResult::success) {
    Notice(absl::StrCat("job ", id, " succeeded"));
  } else {
    Notice(absl::StrCat("job ", id, " ", StatusName(job.status()), ": ", job.message(),
                        job.exit_code() ? absl::StrCat(" (exit code ", job.exit_code(), ")") : ""));
  }
  return ExitForJob(job);
}

// A step file named on the command line, or "-" for stdin.
absl::StatusOr<std::string> ReadStepFileArg(const std::string& file) {
  if (file == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  // A file too big to be a step file is refused before it is read into memory.
  struct stat st;
  if (::stat(file.c_str(), &st) == 0 && static_cast<size_t>(st.st_size) > steps::kMaxStepFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": the step file is ", st.st_size,
                                                   " bytes; the limit is ", steps::kMaxStepFileBytes));
  }
  return ReadFile(file);
}

// Every string of a request must be UTF-8 (protobuf refuses to send one that is not, with a log
// line and no reason): said here, with where, before anything is sent.
absl::Status CheckUtf8(absl::string_view what, absl::string_view text) {
  int line = 1, column = 1;
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const size_t length = Utf8SequenceLength(text, i);
    if (length == 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, absl::StrContains(text, '\n') ? absl::StrCat(":", line, ":", column) : "",
                                                     ": not valid UTF-8 (byte 0x", absl::Hex(byte), " at offset ", i,
                                                     "); every string of a request must be UTF-8"));
    }
    if (byte == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
    i += length;
  }
  return absl::OkStatus();
}

absl::Status CheckRequestUtf8(const proto::RunRequest& request) {
  SR_RETURN_IF_ERROR(CheckUtf8("the step file", request.steps()));
  SR_RETURN_IF_ERROR(CheckUtf8("--id", request.id()));
  SR_RETURN_IF_ERROR(CheckUtf8("--work-dir", request.work_dir()));
  for (const auto& [k, v] : request.env()) {
    SR_RETURN_IF_ERROR(CheckUtf8("--env", k));
    SR_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("--env ", k), v));
  }
  for (const proto::Variable& var : request.job().variables()) {
    SR_RETURN_IF_ERROR(CheckUtf8("a variable's name", var.key()));
    // A masked value is not named in the message (it is a secret).
    SR_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("the variable ", var.key()), var.value()));
  }
  for (const auto& [k, v] : request.inputs()) {
    SR_RETURN_IF_ERROR(CheckUtf8("--input", k));
    if (v.has_string_value()) SR_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("--input ", k), v.string_value()));
  }
  return absl::OkStatus();
}

// The job id a command names, if any, checked as CheckUtf8 does.
absl::Status CheckJobIdArg(const Args& args) {
  return args.positional.empty() ? absl::OkStatus() : CheckUtf8("the job id", args.positional[0]);
}

absl::StatusOr<std::pair<std::string, std::string>> SplitKeyValue(const std::string& flag, const std::string& kv) {
  size_t eq = kv.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": expected KEY=VALUE, got \"", kv, "\""));
  }
  return std::make_pair(kv.substr(0, eq), kv.substr(eq + 1));
}


void SetDuration(absl::Duration d, google::protobuf::Duration* out) {
  out->set_seconds(absl::ToInt64Seconds(d));
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d - absl::Seconds(out->seconds()))));
}

// --input NAME=VALUE: VALUE is read as JSON when it is JSON (5, true, [1,2], {"a":1}), else as
// a string; a string input given 5 receives "5".
absl::Status AddInputs(const Args& args, proto::RunRequest& request) {
  for (const std::string& kv : args.All("input")) {
    SR_ASSIGN_OR_RETURN(auto p, SplitKeyValue("input", kv));
    google::protobuf::Value value;
    if (!google::protobuf::util::JsonStringToMessage(p.second, &value).ok()) value.set_string_value(p.second);
    (*request.mutable_inputs())[p.first] = value;
  }
  return absl::OkStatus();
}


// step-runner audit verify|tail: reads the daemon's audit log directly (no daemon needed).
int CmdAudit(const Args& args) {
  if (args.positional.size() != 1) throw UsageError{"audit takes verify or tail"};
  int lines = 20;
  if (auto n = args.Get("lines"); n && !absl::SimpleAtoi(*n, &lines)) throw UsageError{"--lines: expected a number"};
  return audit::RunCommand(args.positional[0], args.Get("state-dir").value_or(StateHome() + "/daemon"),
                           args.Has("follow"), lines);
}


// Copies bytes both ways between stdin/stdout and the daemon's socket until either side closes.
int CmdProxy(const Args& args) {
  std::string path = args.Get("socket").value_or(DefaultSocket());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return Fail(absl::InvalidArgumentError("socket path too long"));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return Fail(absl::UnavailableError(absl::StrCat("cannot connect to ", path, ": ", std::strerror(errno))));
  }
  Notice(absl::StrCat("proxy connected to ", path));
  std::vector<char> buffer(256 << 10);
  pollfd fds[2] = {{.fd = STDIN_FILENO, .events = POLLIN}, {.fd = sock.get(), .events = POLLIN}};
  const int outputs[2] = {sock.get(), STDOUT_FILENO};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return Fail(ErrnoStatus(errno, "poll"));
    }
    for (int i = 0; i < 2; ++i) {
      if (!fds[i].revents) continue;
      ssize_t n = ::read(fds[i].fd, buffer.data(), buffer.size());
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return 0;  // either side closed: the bridge is done
      if (!WriteAll(outputs[i], absl::string_view(buffer.data(), static_cast<size_t>(n))).ok()) return 0;
    }
  }
}

int CmdRun(const Args& args) {
  if (args.positional.size() != 1) throw UsageError{"run takes one step file (or - for stdin)"};
  proto::RunRequest request;
  auto steps = ReadStepFileArg(args.positional[0]);
  if (!steps.ok()) return Fail(steps.status());
  request.set_steps(*std::move(steps));
  std::string id = args.Get("id").value_or("");
  if (id.empty()) {
    id = absl::StrFormat("job-%d-%d", absl::ToUnixMillis(absl::Now()), ::getpid());
  }
  request.set_id(id);
  for (const std::string& kv : args.All("env")) {
    auto p = SplitKeyValue("env", kv);
    if (!p.ok()) return Fail(p.status());
    (*request.mutable_env())[p->first] = p->second;
  }
  for (const char* flag : {"var", "masked-var", "file-var"}) {
    for (const std::string& kv : args.All(flag)) {
      auto p = SplitKeyValue(flag, kv);
      if (!p.ok()) return Fail(p.status());
      proto::Variable* var = request.mutable_job()->add_variables();
      var->set_key(p->first);
      var->set_value(p->second);
      var->set_masked(std::string(flag) == "masked-var");
      var->set_file(std::string(flag) == "file-var");
    }
  }
  if (auto dir = args.Get("work-dir")) request.set_work_dir(*dir);
  if (absl::Status s = AddInputs(args, request); !s.ok()) return Fail(s);
  // Relative step references start beside the step file, as in GitLab (and `exec`), when the
  // daemon shares this machine's files: through --via or --ssh the file's folder is not there,
  // and they start in the job's work tree.
  if (args.positional[0] != "-" && !args.Get("via") && !args.Get("ssh")) {
    char real[PATH_MAX];
    if (::realpath(args.positional[0].c_str(), real)) request.set_steps_dir(Dirname(real));
  }
  if (auto t = args.Get("timeout")) {
    auto d = ParseDurationFlag("timeout", *t);
    if (!d.ok()) return Fail(d.status());
    SetDuration(*d, request.mutable_timeout());
  }
  if (auto t = args.Get("graceful-exit-timeout")) {
    auto d = ParseDurationFlag("graceful-exit-timeout", *t);
    if (!d.ok()) return Fail(d.status());
    SetDuration(*d, request.mutable_graceful_exit_timeout());
  }
  if (absl::Status s = CheckRequestUtf8(request); !s.ok()) return Fail(s);
  client::ClientOptions options = ClientOptionsFrom(args);
  client::Client client(options);
  if (args.Has("follow")) {
    return FollowToTerminal(client, options.endpoint, id, std::nullopt, args.Has("split-streams"), true, &request);
  }
  if (absl::Status s = client.Run(request); !s.ok()) return Fail(s);
  std::cout << id << std::endl;
  return 0;
}

int CmdLogs(const Args& args) {
  if (args.positional.size() != 1) throw UsageError{"logs takes one job id"};
  if (absl::Status s = CheckJobIdArg(args); !s.ok()) return Fail(s);
  std::optional<int64_t> offset;
  if (auto o = args.Get("offset")) {
    int64_t value;
    if (!absl::SimpleAtoi(*o, &value) || value < 0) return Fail(absl::InvalidArgumentError("--offset: expected a byte offset"));
    offset = value;
  }
  client::ClientOptions options = ClientOptionsFrom(args);
  client::Client client(options);
  return FollowToTerminal(client, options.endpoint, args.positional[0], offset, args.Has("split-streams"),
                          args.Has("follow"));
}

std::string FormatTime(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ",
                          absl::FromUnixNanos(google::protobuf::util::TimeUtil::TimestampToNanoseconds(t)),
                          absl::UTCTimeZone());
}

int CmdStatus(const Args& args) {
  if (args.positional.size() > 1) throw UsageError{"status takes at most one job id"};
  if (absl::Status s = CheckJobIdArg(args); !s.ok()) return Fail(s);
  client::Client client(ClientOptionsFrom(args));
  std::vector<proto::Status> jobs;
  if (args.positional.empty()) {
    auto all = client.ListJobs();
    if (!all.ok()) return Fail(all.status());
    jobs = *std::move(all);
  } else {
    auto one = client.GetStatus(args.positional[0]);
    if (!one.ok()) return Fail(one.status());
    jobs.push_back(*std::move(one));
  }
  std::cout << absl::StrFormat("%-24s %-10s %-12s %5s %12s  %-20s %s\n", "ID", "STATUS", "ERROR", "EXIT",
                               "LOG BYTES", "ENDED", "MESSAGE");
  for (const proto::Status& job : jobs) {
    std::string error = job.has_error() ? proto::StatusError::Kind_Name(job.error().kind()) : "-";
    std::cout << absl::StrFormat("%-24s %-10s %-12s %5d %12d  %-20s %s\n", job.id(), StatusName(job.status()),
                                 error, job.exit_code(), job.log_size(), FormatTime(job.end_time()), job.message());
  }
  if (args.positional.size() == 1) return ExitForJob(jobs[0]) == kExitSoftware ? 0 : ExitForJob(jobs[0]);
  return 0;
}

// The local runner: the daemon's engine in-process, for an agent inside the workspace. State goes
// to a temporary folder that is removed at the end; steps run in the current directory.
// A regular file (or a new one) is replaced whole; /dev/stdout, a fifo or the like is written
// in place, never renamed over.
absl::Status WriteResult(const std::string& path, const std::string& json) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode)) return WriteFileAtomically(path, json, 0600);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  return WriteAll(fd.get(), json);
}

int CmdExec(const Args& args) {
  if (args.positional.size() != 1) throw UsageError{"exec takes one step file (or - for stdin)"};
  proto::RunRequest request;
  request.set_id("exec");
  auto steps = ReadStepFileArg(args.positional[0]);
  if (!steps.ok()) return Fail(steps.status());
  request.set_steps(*std::move(steps));
  for (const std::string& kv : args.All("env")) {
    auto p = SplitKeyValue("env", kv);
    if (!p.ok()) return Fail(p.status());
    (*request.mutable_env())[p->first] = p->second;
  }
  if (absl::Status s = AddInputs(args, request); !s.ok()) return Fail(s);
  // Relative step references start beside the step file, as in GitLab.
  if (args.positional[0] != "-") {
    char real[PATH_MAX];
    if (::realpath(args.positional[0].c_str(), real)) {
      std::string path = real;
      request.set_steps_dir(path.substr(0, path.rfind('/')));
    }
  }
  char cwd[4096];
  request.set_work_dir(args.Get("work-dir").value_or(::getcwd(cwd, sizeof cwd) ? cwd : "/"));
  if (auto t = args.Get("timeout")) {
    auto d = ParseDurationFlag("timeout", *t);
    if (!d.ok()) return Fail(d.status());
    SetDuration(*d, request.mutable_timeout());
  }
  char tmpl[] = "/tmp/step-runner-exec.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return Fail(ErrnoStatus(errno, "mkdtemp"));
  const std::string state = tmpl;
  int code;
  {
    runner::RunnerOptions options;
    options.state_dir = state + "/state";
    options.secrets_root = state + "/secrets";
    options.catalog_dir = CatalogDir(args);
    if (const char* cache = std::getenv("XDG_CACHE_HOME")) options.step_cache_dir = absl::StrCat(cache, "/step-runner/steps");
    for (char** e = environ; *e; ++e) options.base_env.emplace_back(*e);  // the caller's own environment
    internal::SetMinLogSeverity(internal::Severity::kWarning);
    // Ctrl-C, SIGTERM and SIGHUP become a cancel: the steps run in sessions of their own, out of
    // the terminal's reach, so without this they would outlive the CLI (and its temporary state
    // would stay behind). Blocked before the runner's threads exist, so that only this one takes them.
    sigset_t signals;
    sigemptyset(&signals);
    for (int signo : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&signals, signo);
    ::pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    auto local = runner::Runner::Create(options);
    if (!local.ok()) return Fail(local.status());
    std::atomic<bool> done{false};
    std::atomic<int> interrupted{0};
    runner::Runner* runner = local->get();
    std::thread watcher([&] {
      int signo = 0;
      if (::sigwait(&signals, &signo) != 0 || done) return;
      interrupted = signo;
      Notice(absl::StrCat("interrupted (", strsignal(signo), "): cancelling the steps"));
      (void)runner->Cancel("exec");
    });
    absl::Cleanup stop_watcher = [&] {
      done = true;
      ::pthread_kill(watcher.native_handle(), SIGHUP);  // wakes its sigwait; it then does nothing
      watcher.join();
    };
    if (absl::Status s = (*local)->Run(request); !s.ok()) {
      std::move(stop_watcher).Invoke();
      (void)RemoveTree(state);
      return Fail(s);
    }
    std::shared_ptr<logs::JobLog> log = (*(*local)->GetJob("exec"))->log();
    auto reader = log->OpenReader();
    if (!reader.ok()) return Fail(reader.status());
    int64_t offset = 0;
    for (;;) {
      bool finished = log->finished();
      logs::JobLog::Chunk chunk;
      auto n = log->Read(reader->get(), offset, 1 << 20, &chunk);
      if (!n.ok()) return Fail(n.status());
      if (*n > 0) {
        (void)WriteAll(chunk.stream == logs::Stream::kStderr ? 2 : 1, chunk.data);
        offset += static_cast<int64_t>(*n);
        continue;
      }
      if (finished) break;
      absl::Notification more;
      auto waiter = log->WaitForData(offset, [&more] { more.Notify(); });
      if (waiter) more.WaitForNotification();
    }
    proto::Status status = (*(*local)->GetStatus("exec"))[0];
    std::string json;
    google::protobuf::util::JsonPrintOptions print;
    print.add_whitespace = true;
    print.preserve_proto_field_names = true;  // the same names as step-results.json
    (void)google::protobuf::util::MessageToJsonString(status, &json, print);
    bool result_lost = false;
    if (auto path = args.Get("result")) {
      if (absl::Status s = WriteResult(*path, json); !s.ok()) {
        Notice(absl::StrCat("the result was not written: ", s.message()));
        result_lost = true;
      }
    } else {
      std::cerr << json;
    }
    if (status.status() != proto::StepResult::success) {
      // The reason, in one line, without reading the JSON.
      Notice(absl::StrCat("job ", StatusName(status.status()), ": ", status.message()));
    }
    code = interrupted ? 128 + interrupted : ExitForJob(status);
    // A run that succeeded but could not hand back its result did not do what was asked.
    if (code == 0 && result_lost) code = kExitSoftware;
  }
  (void)RemoveTree(state);
  return code;
}

// Prints a job's step events, one line each, until the job has finished.
int CmdEvents(const Args& args) {
  if (args.positional.size() != 1) throw UsageError{"events takes one job id"};
  if (absl::Status s = CheckJobIdArg(args); !s.ok()) return Fail(s);
  int64_t after = 0;
  if (auto a = args.Get("after-seq")) {
    if (!absl::SimpleAtoi(*a, &after) || after < 0) return Fail(absl::InvalidArgumentError("--after-seq: expected a number"));
  }
  client::Client client(ClientOptionsFrom(args));
  absl::Status s = client.FollowSteps(args.positional[0], after, [](const proto::FollowStepsResponse& e) {
    const proto::StepResult& r = e.result();
    std::string what;
    switch (e.kind()) {
      case proto::FollowStepsResponse::STEP_STARTED:
        what = absl::StrCat("step ", r.name(), " started");
        break;
      case proto::FollowStepsResponse::STEP_FINISHED:
        what = absl::StrCat("step ", r.name(), " ", StatusName(r.status()), " (exit code ", r.exec_result().exit_code(), ")");
        break;
      case proto::FollowStepsResponse::JOB_FINISHED:
        what = absl::StrCat("job ", StatusName(e.job_status().status()),
                            e.job_status().message().empty() ? "" : ": " + e.job_status().message());
        break;
      case proto::FollowStepsResponse::WARNING:
        what = absl::StrCat("warning", e.step_path().empty() ? "" : " (" + e.step_path() + ")", ": ", e.warning());
        break;
      default:
        what = "unknown event";
    }
    std::cout << absl::StrFormat("%4d %s %s\n", e.seq(), FormatTime(e.time()), what) << std::flush;
  });
  if (!s.ok()) return Fail(s);
  return 0;
}

int CmdCancelOrClose(const Args& args, bool close) {
  if (args.positional.size() != 1) throw UsageError{close ? "close takes one job id" : "cancel takes one job id"};
  if (absl::Status s = CheckJobIdArg(args); !s.ok()) return Fail(s);
  client::Client client(ClientOptionsFrom(args));
  absl::Status s = close ? client.Close(args.positional[0]) : client.Cancel(args.positional[0]);
  if (!s.ok()) return Fail(s);
  return 0;
}

int Main(int argc, char** argv) {
  // Debian builds abseil with mutex deadlock detection on: every nested lock then updates a
  // process-wide graph, which showed up as nearly half the daemon's CPU with many jobs.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::cout << kUsage;
    return argc < 2 ? kExitUsage : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> endpoint = {"socket", "via", "ssh", "ssh-key", "ssh-known-hosts"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.end(), endpoint.begin(), endpoint.end());
    return more;
  };
  struct Spec {
    std::vector<std::string> valued;
    std::vector<std::string> boolean;
    std::function<int(const Args&)> run;
  };
  std::map<std::string, Spec> commands = {
      {"serve", {ServeFlags(), {}, CmdServe}},
      {"proxy", {{"socket"}, {}, CmdProxy}},
      {"run", {with({"id", "env", "input", "var", "masked-var", "file-var", "work-dir", "timeout", "graceful-exit-timeout"}),
               {"follow", "split-streams"}, CmdRun}},
      {"logs", {with({"offset"}), {"follow", "split-streams"}, CmdLogs}},
      {"status", {with({}), {}, CmdStatus}},
      {"events", {with({"after-seq"}), {}, CmdEvents}},
      {"exec", {{"env", "input", "work-dir", "timeout", "result", "catalog"}, {}, CmdExec}},
      {"cancel", {with({}), {}, [](const Args& a) { return CmdCancelOrClose(a, false); }}},
      {"close", {with({}), {}, [](const Args& a) { return CmdCancelOrClose(a, true); }}},
  };
  commands["audit"] = {{"state-dir", "lines"}, {"follow"}, CmdAudit};
  auto it = commands.find(command);
  if (it == commands.end()) {
    std::cerr << "step-runner: unknown command \"" << command << "\"\n" << kUsage;
    return kExitUsage;
  }
  if (command == "serve") {
    // The daemon is its own, smaller program (see daemon_main.cc): exec it in place, so that the
    // pid and the command line stay those of `step-runner serve`.
    const std::string daemon = OwnBinaryDir() + "/step-runner-daemon";
    ::execv(daemon.c_str(), argv);
    Notice(absl::StrCat("cannot run ", daemon, " (", std::strerror(errno),
                        "); serving from this process, which uses more memory"));
    server::BlockShutdownSignals();
  }
  for (int i = 2; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  std::string error;
  std::optional<Args> args = Parse(argc, argv, 2, it->second.valued, it->second.boolean, &error);
  if (!args) {
    std::cerr << "step-runner " << command << ": " << error << "\n" << kUsage;
    return kExitUsage;
  }
  try {
    return it->second.run(*args);
  } catch (const UsageError& e) {
    std::cerr << "step-runner " << command << ": " << e.message << "\n" << kUsage;
    return kExitUsage;
  }
}

}  // namespace
}  // namespace step_runner

int main(int argc, char** argv) {
  // A client writing into a closed pipe (`... | head`) should stop quietly, not die by SIGPIPE
  // halfway through a write; the write error ends it.
  ::signal(SIGPIPE, SIG_IGN);
  step_runner::base::KeepStreamingBuffersMapped();  // `logs --follow` receives 1 MiB chunks
  return step_runner::Main(argc, argv);
}

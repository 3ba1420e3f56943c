#include "step-runner/server/daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_posix.h"
#include "step-runner/audit/audit_log.h"
#include "step-runner/audit/cli.h"
#include "step-runner/audit/records.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/server/listener.h"
#include "step-runner/server/reflection.h"
#include "step-runner/server/service.h"

namespace step_runner::server {
namespace {

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  return set;
}

// Many concurrent jobs each hold a few pipes; the soft limit is often a stingy 1024.
void RaiseFdLimit() {
  rlimit limit;
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &limit);
  }
}

// Steps go through the sandbox (when there is one), and their events into the audit log.
void InstallStepHooks(runner::RunnerOptions& options, sandbox::Sandbox* sandbox, audit::AuditLog* log) {
  if (sandbox) {
    options.launch_hook = [sandbox](const runner::LaunchContext& c, runner::PlannedStep& s) {
      return sandbox->Launch(c, s);
    };
    options.check_work_tree = [sandbox](const std::string& work_tree, const std::string& job_dir) {
      return sandbox->CheckJobWorkTree(work_tree, job_dir);
    };
  }
  options.step_event_hook = [sandbox, log](const std::string& job, const proto::FollowStepsResponse& event) {
    sandbox::Sandbox::Grant grant = sandbox ? sandbox->LastGrant(job) : sandbox::Sandbox::Grant{"none", "all"};
    if (absl::Status s = log->Append(audit::StepRecord(job, event, grant.policy, grant.network)); !s.ok()) {
      SR_LOG(ERROR) << "audit log: " << s;
    }
    if (sandbox) sandbox->OnStepEvent(job, event);
  };
}

// One daemon per state dir: a second one's recovery would take the first one's running jobs for
// leftovers of a crash, kill their processes and mark them interrupted.
absl::StatusOr<UniqueFd> LockStateDir(const std::string& state_dir) {
  const std::string path = state_dir + "/daemon.lock";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return ErrnoStatus(errno, absl::StrCat("flock(", path, ")"));
    std::string holder = ReadFile(path).value_or("");
    return absl::FailedPreconditionError(
        absl::StrCat("another step-runner daemon", holder.empty() ? "" : absl::StrCat(" (pid ", holder, ")"),
                     " is using the state dir ", state_dir, "; stop it first, or give this one its own --state-dir"));
  }
  const std::string pid = absl::StrCat(::getpid());
  if (::ftruncate(fd.get(), 0) != 0 || ::pwrite(fd.get(), pid.data(), pid.size(), 0) < 0) {
    return ErrnoStatus(errno, absl::StrCat("writing ", path));
  }
  return fd;
}

}  // namespace

void BlockShutdownSignals() {
  sigset_t set = ShutdownSignals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

absl::Status Serve(const DaemonOptions& options) {
  RaiseFdLimit();
  std::set<uid_t> allowed = options.extra_allowed_uids;
  allowed.insert(::getuid());
  allowed.insert(0);
  SR_RETURN_IF_ERROR(MakeDirs(options.runner.state_dir, 0700));
  // Held until the daemon exits (the kernel lets go of it however the process ends).
  SR_ASSIGN_OR_RETURN(UniqueFd state_lock, LockStateDir(options.runner.state_dir));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<UnixListener> listener,
                      UnixListener::Bind(options.socket_path, allowed));
  SR_ASSIGN_OR_RETURN(std::unique_ptr<audit::AuditLog> audit_log,
                      audit::AuditLog::Open(audit::LogPath(options.runner.state_dir)));
  std::unique_ptr<sandbox::Sandbox> sandbox;
  if (options.sandbox) {
    SR_ASSIGN_OR_RETURN(sandbox, sandbox::Sandbox::Create(*options.sandbox));
    SR_LOG(INFO) << sandbox->Describe();
    if (::geteuid() == 0) {
      SR_LOG(WARNING) << "running as root: steps run as uid 0 without capabilities, so they can read root-only "
                         "files and reach root-owned sockets that are not hidden (step-runner/sandbox/README.md); "
                         "run the daemon as an unprivileged user where steps are not trusted";
    }
  } else {
    SR_LOG(WARNING) << "--sandbox=none: steps run UNSANDBOXED, as the daemon's uid, with its network, its files "
                       "and its state; use this only where every step is trusted";
  }
  runner::RunnerOptions runner_options = options.runner;
  InstallStepHooks(runner_options, sandbox.get(), audit_log.get());
  SR_ASSIGN_OR_RETURN(std::unique_ptr<runner::Runner> runner, runner::Runner::Create(runner_options));

  audit::PeerTable peers;
  StepRunnerService service(runner.get(), audit_log.get(), &peers);
  grpc::EnableDefaultHealthCheckService(true);
  Reflection reflection({proto::StepRunner::service_full_name(), "grpc.health.v1.Health"});
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  for (grpc::Service* s : reflection.services()) builder.RegisterService(s);
  // Step files up to the parser's limit must reach the parser, which explains what is wrong.
  builder.SetMaxReceiveMessageSize(16 << 20);
  // Clients ping to notice a dead SSH hop quickly; allow it, and ping them too so the streams of
  // vanished clients are released.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) return absl::InternalError("could not start the gRPC server");
  server->GetHealthCheckService()->SetServingStatus(true);

  // We accept on our own socket (to check peer credentials) and hand each connection to gRPC,
  // which names it "fd:N": that is how each RPC finds its caller's uid and pid for the audit.
  grpc::Server* grpc_server = server.get();
  listener->Start([grpc_server, &peers](UniqueFd connection, pid_t pid, uid_t uid) {
    const int fd = connection.Release();  // gRPC owns it from here
    peers.Set(fd, {pid, uid});
    grpc::AddInsecureChannelFromFd(grpc_server, fd);
  });
  // The same marker as GitLab's step-runner, which gitlab-runner's executors wait for.
  std::string ready = absl::StrCat("step-runner is listening on socket ", options.socket_path, "\n");
  ssize_t unused = ::write(STDERR_FILENO, ready.data(), ready.size());
  (void)unused;

  sigset_t signals = ShutdownSignals();
  int signo = 0;
  ::sigwait(&signals, &signo);
  SR_LOG(INFO) << "received signal " << signo << "; shutting down";

  listener->Stop();
  server->GetHealthCheckService()->SetServingStatus(false);
  // Jobs first: their logs end, so the followers' streams end cleanly with every byte.
  runner->Shutdown(options.runner.default_graceful_exit_timeout + options.runner.drain_timeout +
                   absl::Seconds(1));
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::ToInt64Milliseconds(options.stream_drain_timeout)));
  server->Wait();
  runner.reset();
  SR_LOG(INFO) << "stopped";
  return absl::OkStatus();
}

}  // namespace step_runner::server

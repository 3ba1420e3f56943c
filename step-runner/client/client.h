#ifndef STEP_RUNNER_CLIENT_CLIENT_H_
#define STEP_RUNNER_CLIENT_CLIENT_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/step_runner.grpc.pb.h"
#include "step-runner/process/subprocess.h"

namespace step_runner::client {

// Where the daemon is: its socket, or a command whose stdin/stdout carry the connection
// (`ssh host step-runner proxy`, `docker exec -i ... step-runner proxy`).
struct Endpoint {
  std::string socket_path;
  std::string via_command;  // run with /bin/sh -c; wins over socket_path when set
  // The built-in SSH client (ssh_transport.h): USER@HOST[:PORT], wins over both when set.
  std::string ssh_target;
  std::string ssh_key;
  std::string ssh_known_hosts;  // empty: ~/.ssh/known_hosts
};

class SshTransport;

// One gRPC connection over one fd: a connected unix socket, or one end of a socketpair whose
// other end is the via command's stdin/stdout. It never redials by itself; when the fd dies,
// every RPC on it fails UNAVAILABLE and the owner dials a new Connection.
class Connection {
 public:
  static absl::StatusOr<std::unique_ptr<Connection>> Dial(const Endpoint& endpoint);
  ~Connection();  // closes the channel and stops the via command

  proto::StepRunner::Stub* stub() { return stub_.get(); }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  Connection() = default;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<proto::StepRunner::Stub> stub_;
  std::optional<process::Subprocess> via_;
  std::unique_ptr<SshTransport> ssh_;
};

struct ClientOptions {
  Endpoint endpoint;
  // Gives up after the daemon has been unreachable this long in a row.
  absl::Duration reconnect_timeout = absl::Minutes(5);
  // The wait before a redial, doubling up to max_backoff. A connection that was delivering and
  // dropped is redialled once at once, before any wait.
  absl::Duration initial_backoff = absl::Milliseconds(20);
  absl::Duration max_backoff = absl::Seconds(2);
  absl::Duration rpc_timeout = absl::Seconds(30);
  // Told about each lost connection and reconnect (for a person watching stderr).
  std::function<void(const std::string&)> on_notice;
};

// The step-runner client: every call dials when needed and, when the connection drops, dials
// again with backoff and retries. Run is safe to retry (idempotent by id), and Follow resumes
// from the last byte it delivered, so output is never duplicated or lost across reconnects.
// Not thread-safe.
class Client {
 public:
  explicit Client(ClientOptions options);
  ~Client();

  absl::Status Run(const proto::RunRequest& request);
  absl::StatusOr<proto::Status> GetStatus(const std::string& id);
  // GetStatus on the connection there is, once, within 2 s: no dial, no redial, and a broken
  // connection is left for the call that is using it (so this is safe from inside a Follow's sink).
  // UNAVAILABLE when there is none or it failed.
  absl::StatusOr<proto::Status> GetStatusOnThisConnection(const std::string& id);
  absl::StatusOr<std::vector<proto::Status>> ListJobs();
  absl::Status Cancel(const std::string& id);
  absl::Status Close(const std::string& id);

  using Sink = std::function<void(const proto::FollowLogsResponse& chunk)>;
  // Streams the log of job `id` from `offset` into `sink` until the job has ended and all of its
  // log was delivered (or until `stop_at` bytes, when set), reconnecting as needed. Returns the
  // job's final status; `*end_offset` (if given) gets the offset after the last byte delivered.
  absl::StatusOr<proto::Status> Follow(const std::string& id, int64_t offset, const Sink& sink,
                                       int64_t* end_offset = nullptr,
                                       std::optional<int64_t> stop_at = std::nullopt);

  // Run, then Follow from offset 0, in one call where the daemon offers RunAndFollow (ours), else
  // as Run and Follow (GitLab's step-runner). `on_started` runs once, when the daemon has
  // accepted the job. A dropped stream resumes with Follow from the last byte delivered.
  absl::StatusOr<proto::Status> RunAndFollow(const proto::RunRequest& request, const Sink& sink,
                                             const std::function<void()>& on_started = nullptr);

  using EventSink = std::function<void(const proto::FollowStepsResponse& event)>;
  // Streams the step events of job `id` after `after_seq` into `sink` until the job-finished
  // event, reconnecting as needed and resuming after the last event delivered.
  absl::Status FollowSteps(const std::string& id, int64_t after_seq, const EventSink& sink);

  // Connections dialled so far (1 + reconnects).
  int dials() const { return dials_; }

 private:
  // Runs `call` on a live connection; on a transport failure, redials with backoff and retries
  // until it succeeds, fails for another reason, or the daemon has been unreachable for
  // reconnect_timeout in a row. A call that made progress before failing (it sets `*progress`)
  // starts both the backoff and the give-up clock over.
  using Call = std::function<grpc::Status(proto::StepRunner::Stub*, bool* progress)>;
  absl::Status WithReconnect(const Call& call);
  absl::Status EnsureConnected();
  void DropConnection(const std::string& why);
  // One Status call through `stub` for `id` (empty: every job), within `deadline` if given (else
  // options_.rpc_timeout).
  grpc::Status CallStatus(proto::StepRunner::Stub* stub, const std::string& id, proto::StatusResponse* response,
                          std::optional<absl::Duration> deadline = std::nullopt) const;
  void Backoff(absl::Time give_up_at, absl::Duration& delay);
  std::unique_ptr<grpc::ClientContext> NewContext(bool with_deadline) const;

  ClientOptions options_;
  std::unique_ptr<Connection> connection_;
  int dials_ = 0;
};

// A transport failure (the connection dropped or could not be made), as opposed to an answer.
bool IsTransportError(const grpc::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace step_runner::client

#endif  // STEP_RUNNER_CLIENT_CLIENT_H_

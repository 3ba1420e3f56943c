#include "step-runner/client/client.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/create_channel_posix.h"
#include "grpcpp/grpcpp.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/client/ssh_transport.h"

namespace step_runner::client {
namespace {

grpc::ChannelArguments ChannelArgs() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  // Notice a silently dead hop (an SSH connection that hangs) within seconds, not minutes.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  return args;
}

absl::StatusOr<UniqueFd> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return absl::InvalidArgumentError("socket path too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // Non-blocking like every fd gRPC polls; connect() on a unix socket completes at once anyway.
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return ErrnoStatus(errno, "socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", path, ": ", std::strerror(errno)));
  }
  if (::fcntl(fd.get(), F_SETFL, O_NONBLOCK) != 0) return ErrnoStatus(errno, "fcntl(O_NONBLOCK)");
  return fd;
}

}  // namespace

bool IsTransportError(const grpc::Status& status) {
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::UNKNOWN:  // "Stream removed" and the like, when the fd dies mid-call
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::INTERNAL:  // a torn HTTP/2 frame from a killed bridge
      return true;
    default:
      return false;
  }
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status out(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  // Carry google.rpc details (BadRequest violations) over as payloads keyed by type URL.
  google::rpc::Status rich;
  if (!status.error_details().empty() && rich.ParseFromString(status.error_details())) {
    for (const google::protobuf::Any& detail : rich.details()) {
      out.SetPayload(detail.type_url(), absl::Cord(detail.value()));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Connection>> Connection::Dial(const Endpoint& endpoint) {
  std::unique_ptr<Connection> connection(new Connection());
  UniqueFd fd;
  if (!endpoint.ssh_target.empty()) {
    auto target = ParseSshTarget(endpoint.ssh_target);
    if (!target.ok()) return target.status();
    target->key_file = endpoint.ssh_key;
    target->known_hosts = endpoint.ssh_known_hosts;
    auto transport = SshTransport::Start(*target, &fd);
    if (!transport.ok()) return transport.status();
    connection->ssh_ = *std::move(transport);
    if (::fcntl(fd.get(), F_SETFL, O_NONBLOCK) != 0) return ErrnoStatus(errno, "fcntl(O_NONBLOCK)");
  } else if (!endpoint.via_command.empty()) {
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
      return ErrnoStatus(errno, "socketpair");
    }
    fd.Reset(pair[0]);
    if (::fcntl(fd.get(), F_SETFL, O_NONBLOCK) != 0) return ErrnoStatus(errno, "fcntl(O_NONBLOCK)");
    UniqueFd theirs(pair[1]);
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    auto via = process::Subprocess::Spawn({.argv = {"/bin/sh", "-c", endpoint.via_command},
                                           .env = env,
                                           .stdout_fd = theirs.get(),
                                           .stderr_fd = process::kInheritFd,
                                           .stdin_fd = theirs.get()});
    if (!via.ok()) return absl::UnavailableError(absl::StrCat("--via: ", via.status().message()));
    connection->via_.emplace(*std::move(via));
  } else {
    if (endpoint.socket_path.empty()) {
      return absl::InvalidArgumentError("no daemon given: pass --socket, --via or set STEP_RUNNER_SOCKET");
    }
    auto connected = ConnectUnix(endpoint.socket_path);
    if (!connected.ok()) return connected.status();
    fd = *std::move(connected);
  }
  // gRPC owns the fd from here.
  connection->channel_ = grpc::CreateCustomInsecureChannelFromFd("step-runner", fd.Release(), ChannelArgs());
  connection->stub_ = proto::StepRunner::NewStub(connection->channel_);
  return connection;
}

Connection::~Connection() {
  stub_.reset();
  channel_.reset();
  ssh_.reset();
  if (via_) {
    // The bridge exits when its stdin closes; give it a moment, then make sure.
    pollfd pfd{.fd = via_->pidfd(), .events = POLLIN};
    if (::poll(&pfd, 1, 500) <= 0) (void)via_->SignalGroup(SIGKILL);
    (void)via_->Reap();
  }
}

Client::Client(ClientOptions options) : options_(std::move(options)) {}
Client::~Client() = default;

std::unique_ptr<grpc::ClientContext> Client::NewContext(bool with_deadline) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (with_deadline) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.rpc_timeout)));
  }
  return context;
}

absl::Status Client::EnsureConnected() {
  if (connection_) return absl::OkStatus();
  auto connection = Connection::Dial(options_.endpoint);
  if (!connection.ok()) return connection.status();
  connection_ = *std::move(connection);
  ++dials_;
  return absl::OkStatus();
}

void Client::DropConnection(const std::string& why) {
  if (connection_ && options_.on_notice) options_.on_notice(absl::StrCat("connection lost (", why, "); reconnecting"));
  connection_.reset();
}

void Client::Backoff(absl::Time give_up_at, absl::Duration& delay) {
  absl::SleepFor(std::min(delay, std::max(give_up_at - absl::Now(), absl::ZeroDuration())));
  delay = std::min(delay * 2, options_.max_backoff);
}

absl::Status Client::WithReconnect(const Call& call) {
  absl::Time give_up_at = absl::Now() + options_.reconnect_timeout;
  absl::Duration delay = options_.initial_backoff;
  absl::Time last_immediate_redial = absl::InfinitePast();
  absl::Status last;
  bool announced = false;
  for (;;) {
    if (absl::Status s = EnsureConnected(); !s.ok()) {
      // A malformed endpoint will not get better by waiting.
      if (absl::IsInvalidArgument(s)) return s;
      last = s;
    } else {
      bool progress = false;
      grpc::Status status = call(connection_->stub(), &progress);
      if (status.ok() || !IsTransportError(status)) return FromGrpcStatus(status);
      last = FromGrpcStatus(status);
      if (!progress) {
        connection_.reset();  // no answer at all this time: said once, below, not at every dial
      } else {
        DropConnection(status.error_message());
        announced = false;  // a new outage gets its own notice
        // The connection worked until it dropped: this is a new outage, not the same one. A
        // dropped hop (a killed ssh, a restarted proxy) is usually dialable at once, so the
        // redial does not wait, unless the last one was moments ago: a hop that answers and
        // then breaks every time gets the backoff, not a busy loop.
        give_up_at = absl::Now() + options_.reconnect_timeout;
        delay = options_.initial_backoff;
        if (absl::Now() - last_immediate_redial >= absl::Milliseconds(50)) {
          last_immediate_redial = absl::Now();
          continue;
        }
      }
    }
    if (absl::Now() >= give_up_at) {
      return absl::UnavailableError(absl::StrCat("the daemon is unreachable: ", last.message()));
    }
    if (!announced && options_.on_notice) {
      // Otherwise a mistyped socket path looks like a hang for the whole reconnect timeout.
      announced = true;
      options_.on_notice(absl::StrCat("cannot reach the daemon (", last.message(), "); retrying for up to ",
                                      absl::FormatDuration(absl::Seconds(absl::ToInt64Seconds(give_up_at - absl::Now()))),
                                      " (Ctrl-C to stop)"));
    }
    Backoff(give_up_at, delay);
  }
}

absl::Status Client::Run(const proto::RunRequest& request) {
  return WithReconnect([&](proto::StepRunner::Stub* stub, bool*) {
    proto::RunResponse response;
    return stub->Run(NewContext(true).get(), request, &response);
  });
}

grpc::Status Client::CallStatus(proto::StepRunner::Stub* stub, const std::string& id, proto::StatusResponse* response,
                                std::optional<absl::Duration> deadline) const {
  proto::StatusRequest request;
  request.set_id(id);
  response->Clear();
  std::unique_ptr<grpc::ClientContext> context = NewContext(true);
  if (deadline) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(absl::ToInt64Milliseconds(*deadline)));
  }
  return stub->Status(context.get(), request, response);
}

namespace {
// The one job a Status call for an id answers with.
absl::StatusOr<proto::Status> TheJob(const proto::StatusResponse& response) {
  if (response.jobs_size() != 1) return absl::InternalError("the daemon returned no status for the job");
  return response.jobs(0);
}
}  // namespace

absl::StatusOr<proto::Status> Client::GetStatus(const std::string& id) {
  proto::StatusResponse response;
  SR_RETURN_IF_ERROR(
      WithReconnect([&](proto::StepRunner::Stub* stub, bool*) { return CallStatus(stub, id, &response); }));
  return TheJob(response);
}

absl::StatusOr<proto::Status> Client::GetStatusOnThisConnection(const std::string& id) {
  if (!connection_) return absl::UnavailableError("not connected");
  proto::StatusResponse response;
  // Short: the caller is in the middle of a stream, which waits for it.
  if (grpc::Status status = CallStatus(connection_->stub(), id, &response, absl::Seconds(2)); !status.ok()) {
    return FromGrpcStatus(status);
  }
  return TheJob(response);
}

absl::StatusOr<std::vector<proto::Status>> Client::ListJobs() {
  proto::StatusResponse response;
  absl::Status s = WithReconnect([&](proto::StepRunner::Stub* stub, bool*) { return CallStatus(stub, "", &response); });
  if (!s.ok()) return s;
  return std::vector<proto::Status>(response.jobs().begin(), response.jobs().end());
}

absl::Status Client::Cancel(const std::string& id) {
  proto::CancelRequest request;
  request.set_id(id);
  return WithReconnect([&](proto::StepRunner::Stub* stub, bool*) {
    proto::CancelResponse response;
    return stub->Cancel(NewContext(true).get(), request, &response);
  });
}

absl::Status Client::Close(const std::string& id) {
  proto::CloseRequest request;
  request.set_id(id);
  return WithReconnect([&](proto::StepRunner::Stub* stub, bool*) {
    proto::CloseResponse response;
    return stub->Close(NewContext(true).get(), request, &response);
  });
}

absl::StatusOr<proto::Status> Client::Follow(const std::string& id, int64_t offset, const Sink& sink,
                                             int64_t* end_offset, std::optional<int64_t> stop_at) {
  bool reconnected = false;
  std::optional<proto::Status> final_status;
  absl::Status result = WithReconnect([&](proto::StepRunner::Stub* stub, bool* progress) -> grpc::Status {
    if (reconnected) {
      // After a reconnect, make sure the job is still there before resuming: a job that was
      // closed meanwhile is an answer (NOT_FOUND), not something to retry.
      proto::StatusRequest request;
      request.set_id(id);
      proto::StatusResponse response;
      grpc::Status s = stub->Status(NewContext(true).get(), request, &response);
      if (!s.ok()) return s;
      *progress = true;  // the daemon answered: a drop after this is a new outage
    }
    reconnected = true;
    if (stop_at && offset >= *stop_at) return grpc::Status::OK;
    proto::FollowLogsRequest request;
    request.set_id(id);
    request.set_offset(offset);
    auto context = NewContext(false);
    std::unique_ptr<grpc::ClientReader<proto::FollowLogsResponse>> reader =
        stub->FollowLogs(context.get(), request);
    proto::FollowLogsResponse chunk;
    while (reader->Read(&chunk)) {
      *progress = true;
      if (chunk.has_job_status()) final_status = chunk.job_status();
      if (chunk.data().empty()) continue;
      // Servers that set the offset extension must agree with our count; GitLab's do not set it.
      if (chunk.offset() != 0 && chunk.offset() != offset) {
        context->TryCancel();
        reader->Finish();
        return grpc::Status(grpc::StatusCode::DATA_LOSS,
                            absl::StrCat("expected log offset ", offset, ", the daemon sent ", chunk.offset()));
      }
      if (stop_at && offset + static_cast<int64_t>(chunk.data().size()) > *stop_at) {
        chunk.mutable_data()->resize(static_cast<size_t>(*stop_at - offset));
      }
      chunk.set_offset(offset);
      sink(chunk);
      offset += static_cast<int64_t>(chunk.data().size());
      if (stop_at && offset >= *stop_at) {
        context->TryCancel();
        reader->Finish();
        return grpc::Status::OK;
      }
    }
    return reader->Finish();
  });
  if (end_offset) *end_offset = offset;
  if (!result.ok()) return result;
  // Our daemon sends the final status at the end of the stream; ask only servers that do not.
  if (final_status && !stop_at) return *final_status;
  return GetStatus(id);
}

absl::StatusOr<proto::Status> Client::RunAndFollow(const proto::RunRequest& request, const Sink& sink,
                                                   const std::function<void()>& on_started) {
  bool accepted = false;
  auto accept = [&] {
    if (accepted) return;
    accepted = true;
    if (on_started) on_started();
  };
  int64_t offset = 0;
  if (EnsureConnected().ok()) {
    auto context = NewContext(false);
    auto reader = connection_->stub()->RunAndFollow(context.get(), request);
    std::optional<proto::Status> final_status;
    reader->WaitForInitialMetadata();
    if (context->GetServerInitialMetadata().count("step-runner-job")) accept();
    proto::FollowLogsResponse chunk;
    grpc::Status status;
    while (reader->Read(&chunk)) {
      accept();
      if (chunk.has_job_status()) final_status = chunk.job_status();
      if (chunk.data().empty()) continue;
      if (chunk.offset() != offset) {
        context->TryCancel();
        reader->Finish();
        return absl::DataLossError(absl::StrCat("expected log offset ", offset, ", the daemon sent ", chunk.offset()));
      }
      sink(chunk);
      offset += static_cast<int64_t>(chunk.data().size());
    }
    status = reader->Finish();
    if (status.ok() && final_status) return *final_status;
    if (!status.ok() && !IsTransportError(status) && status.error_code() != grpc::StatusCode::UNIMPLEMENTED) {
      return FromGrpcStatus(status);  // the daemon's answer (a bad request, an id in use): final
    }
    if (IsTransportError(status)) DropConnection(status.error_message());
  }
  // A daemon without RunAndFollow, or a stream that broke: Run is idempotent by id, and Follow
  // resumes after the last byte delivered.
  if (!accepted) {
    SR_RETURN_IF_ERROR(Run(request));
    accept();
  }
  return Follow(request.id(), offset, sink);
}

absl::Status Client::FollowSteps(const std::string& id, int64_t after_seq, const EventSink& sink) {
  return WithReconnect([&](proto::StepRunner::Stub* stub, bool* progress) -> grpc::Status {
    proto::FollowStepsRequest request;
    request.set_id(id);
    request.set_after_seq(after_seq);
    auto context = NewContext(false);
    auto reader = stub->FollowSteps(context.get(), request);
    proto::FollowStepsResponse event;
    while (reader->Read(&event)) {
      *progress = true;
      if (event.seq() <= after_seq) continue;  // never deliver an event twice
      sink(event);
      after_seq = event.seq();
    }
    return reader->Finish();
  });
}

}  // namespace step_runner::client

#include "step-runner/server/service.h"

#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "step-runner/base/logging.h"
#include "google/rpc/status.pb.h"
#include "step-runner/logs/job_log.h"
#include "step-runner/server/log_wire.h"
#include "step-runner/steps/step_file.h"

namespace step_runner::server {
namespace {

// Below gRPC's default 4 MiB receive limit, so stock clients (GitLab's) accept every chunk.
constexpr size_t kChunkBytes = 1 << 20;

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// A raw method's request, parsed as gRPC would have.
template <typename Message>
absl::Status ParseRequest(const grpc::ByteBuffer& raw, Message* message) {
  grpc::ByteBuffer buffer(raw);  // shares the slices; Deserialize empties the buffer it reads
  grpc::Status s = grpc::SerializationTraits<Message>::Deserialize(&buffer, message);
  if (!s.ok()) {
    // gRPC gives no reason; the usual one is a string field that is not UTF-8, which protobuf refuses.
    return absl::InvalidArgumentError(absl::StrCat(
        "the request does not parse: ",
        s.error_message().empty() ? "a string field that is not valid UTF-8, or not a request of this method"
                                  : s.error_message()));
  }
  return absl::OkStatus();
}

// A server stream that replays a growing source from a position, then follows it live, and
// finishes once the source is finished and fully sent. At most one write is in flight, so a
// slow client holds one message of memory and slows nothing else. Subclasses say how to fill
// the next message and how to wait for more; this class owns the gRPC choreography.
template <typename Response>
class TailReactor : public grpc::ServerWriteReactor<Response> {
 public:
  explicit TailReactor(SerialExecutor* pump) : pump_(pump), handle_(std::make_shared<Handle>()) {
    handle_->reactor = this;
  }

  // Call once, after construction (it calls the subclass). `announce`: send the initial
  // metadata now rather than with the first message, which may be a long way off.
  void Begin(bool announce = false) {
    absl::MutexLock lock(&mu_);
    if (announce) this->StartSendInitialMetadata();
    NextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    write_pending_ = false;
    // gRPC is done with it: a follower that now waits for more holds no chunk (up to 1 MiB).
    response_ = Response();
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke"));
      return;
    }
    NextLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    CancelWaitLocked();
    if (!write_pending_) FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&handle_->mu);
      handle_->reactor = nullptr;  // wake-ups still queued become no-ops
    }
    {
      absl::MutexLock lock(&mu_);
      CancelWaitLocked();
    }
    delete this;
  }

 protected:
  using WaiterId = uint64_t;
  // Fills `response` with the next message: true if there was one, false if caught up.
  virtual absl::StatusOr<bool> FillNext(Response* response) = 0;
  virtual bool SourceFinished() const = 0;
  // Registers `wake` for when more is available; nullopt if it already is.
  virtual std::optional<WaiterId> WaitForMore(std::function<void()> wake) = 0;
  virtual void CancelWait(WaiterId id) = 0;
  // Whether everything the source holds was read (cheap: no reading). Default: unknown.
  virtual bool NothingLeftToRead() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return false; }
  // Once the source is finished and fully sent: an optional last message (default: none).
  virtual bool FillFinal(Response*) { return false; }

 private:
  // Outlives the reactor so that a wake-up queued on the pump can tell it is gone.
  struct Handle {
    absl::Mutex mu;
    TailReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };

  bool OnlyTheEndIsLeft() {
    absl::MutexLock lock(&mu_);
    return SourceFinished() && NothingLeftToRead();
  }

  void Wake() {
    absl::MutexLock lock(&mu_);
    waiter_.reset();
    NextLocked();
  }

  void NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (;;) {
      if (finished_ || write_pending_ || waiter_) return;
      if (cancelled_) {
        FinishLocked(grpc::Status::CANCELLED);
        return;
      }
      // Ask before filling: a finished source has its final size, so being caught up with it
      // then means the stream is complete.
      const bool was_finished = SourceFinished();
      absl::StatusOr<bool> filled = FillNext(&response_);
      if (!filled.ok()) {
        FinishLocked(ToGrpcStatus(filled.status()));
        return;
      }
      if (*filled) {
        write_pending_ = true;
        this->StartWrite(&response_);
        return;
      }
      if (was_finished) {
        if (FillFinal(&response_)) {
          // The last message and the stream's end go out together: one batch, where a write
          // then a Finish cost the client another hop of gRPC's threads on both sides.
          finished_ = true;
          CancelWaitLocked();
          this->StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
          return;
        }
        FinishLocked(grpc::Status::OK);
        return;
      }
      std::weak_ptr<Handle> weak = handle_;
      SerialExecutor* pump = pump_;
      // Wake-ups come from the thread that appends; the follow-up reading happens on the pump.
      waiter_ = WaitForMore([weak, pump] {
        std::shared_ptr<Handle> handle = weak.lock();
        if (!handle) return;
        {
          // At the source's end with nothing left to read, all there is to do is send the last
          // message, and it goes from the waking thread: the hop to the pump was ~40 us of every
          // run's end on a small VM (BENCHMARKS.md, sixth session).
          absl::MutexLock lock(&handle->mu);
          if (handle->reactor && handle->reactor->OnlyTheEndIsLeft()) {
            handle->reactor->Wake();
            return;
          }
        }
        pump->Post([weak] {
          std::shared_ptr<Handle> handle = weak.lock();
          if (!handle) return;
          absl::MutexLock lock(&handle->mu);
          if (handle->reactor) handle->reactor->Wake();
        });
      });
      // nullopt: more arrived (or the source finished) since FillNext; go round again.
    }
  }

  void CancelWaitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (waiter_) CancelWait(*std::exchange(waiter_, std::nullopt));
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    CancelWaitLocked();
    this->Finish(status);
  }

  SerialExecutor* const pump_;
  std::shared_ptr<Handle> handle_;

  absl::Mutex mu_;
  Response response_ ABSL_GUARDED_BY(mu_);
  bool write_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<WaiterId> waiter_ ABSL_GUARDED_BY(mu_);
};

// FollowLogs: a job's log from a byte offset, in chunks that never mix stdout and stderr.
class LogTailReactor final : public TailReactor<grpc::ByteBuffer> {
 public:
  using StatusSource = std::function<proto::Status()>;
  LogTailReactor(std::shared_ptr<logs::JobLog> log, UniqueFd reader, int64_t offset,
                 StatusSource final_status, SerialExecutor* pump)
      : TailReactor(pump), log_(std::move(log)), reader_(std::move(reader)),
        final_status_(std::move(final_status)), offset_(offset) {}

 private:
  absl::StatusOr<bool> FillNext(grpc::ByteBuffer* response) override {
    absl::StatusOr<logs::JobLog::Extent> extent = log_->Locate(offset_, kChunkBytes);
    if (!extent.ok()) return extent.status();
    if (extent->length == 0) return false;
    // Read straight into the buffer gRPC will send from (not zeroed first, as a string's would
    // be); it goes back to the heap once the bytes are on the socket.
    std::shared_ptr<char[]> buffer(new char[extent->length]);
    if (absl::Status s = log_->ReadExtent(reader_.get(), *extent, buffer.get()); !s.ok()) return s;
    *response = EncodeLogChunk({.offset = extent->offset, .stream = extent->stream,
                                .data = absl::string_view(buffer.get(), extent->length), .owner = buffer});
    offset_ += static_cast<int64_t>(extent->length);
    return true;
  }
  bool SourceFinished() const override { return log_->finished(); }
  bool NothingLeftToRead() const override { return offset_ >= log_->size(); }
  std::optional<WaiterId> WaitForMore(std::function<void()> wake) override {
    return log_->WaitForData(offset_, std::move(wake));
  }
  void CancelWait(WaiterId id) override { log_->CancelWait(id); }
  // The job's final status rides on the last message, so the client needs no Status call after
  // the stream (which also works when the daemon is gone right after, as at shutdown).
  bool FillFinal(grpc::ByteBuffer* response) override {
    proto::FollowLogsResponse last;
    last.set_offset(offset_);
    *last.mutable_job_status() = final_status_();
    absl::StatusOr<grpc::ByteBuffer> encoded = EncodeLogMessage(last);
    if (!encoded.ok()) {
      SR_LOG(ERROR) << encoded.status();
      return false;  // the stream still ends; the client asks Status
    }
    *response = *std::move(encoded);
    return true;
  }

  const std::shared_ptr<logs::JobLog> log_;
  const UniqueFd reader_;
  const StatusSource final_status_;
  int64_t offset_;  // only touched under the base's lock, from FillNext/WaitForMore
};

// FollowSteps: a job's step events after a sequence number.
class StepsTailReactor final : public TailReactor<proto::FollowStepsResponse> {
 public:
  StepsTailReactor(std::shared_ptr<logs::EventLog> events, int64_t after_seq, SerialExecutor* pump)
      : TailReactor(pump), events_(std::move(events)), after_seq_(after_seq) {}

 private:
  absl::StatusOr<bool> FillNext(proto::FollowStepsResponse* response) override {
    absl::StatusOr<std::vector<proto::FollowStepsResponse>> next = events_->ReadAfter(after_seq_, 1);
    if (!next.ok()) return next.status();
    if (next->empty()) return false;
    *response = std::move(next->front());
    after_seq_ = response->seq();
    return true;
  }
  bool SourceFinished() const override { return events_->finished(); }
  std::optional<WaiterId> WaitForMore(std::function<void()> wake) override {
    return events_->WaitForEvents(after_seq_, std::move(wake));
  }
  void CancelWait(WaiterId id) override { events_->CancelWait(id); }

  const std::shared_ptr<logs::EventLog> events_;
  int64_t after_seq_;
};

template <typename Response>
class ErrorReactor : public grpc::ServerWriteReactor<Response> {
 public:
  explicit ErrorReactor(const absl::Status& status) { this->Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const auto code = static_cast<grpc::StatusCode>(status.code());
  // The status travels in trailing metadata, which clients cap (8 KiB by default in gRPC): past
  // that they report "metadata size exceeds limit" instead of the error. A message that long
  // (thousands of violations, a huge value quoted) is cut, and its details left out.
  constexpr size_t kMaxStatusBytes = 3 << 10;
  auto bad_request = status.GetPayload(steps::kBadRequestTypeUrl);
  if (status.message().size() > kMaxStatusBytes) {
    size_t cut = kMaxStatusBytes;
    while (cut > 0 && (status.message()[cut] & 0xC0) == 0x80) --cut;  // not mid-character
    return grpc::Status(code, absl::StrCat(status.message().substr(0, cut), "... (the message has ",
                                           status.message().size(), " bytes; cut to fit a gRPC status)"));
  }
  if (bad_request && bad_request->size() > kMaxStatusBytes) {
    return grpc::Status(code, absl::StrCat(status.message(), " (the violations' details are left out: too big for a gRPC status)"));
  }
  if (!bad_request) return grpc::Status(code, std::string(status.message()));
  // Structured violations travel as google.rpc.Status in grpc-status-details-bin, where stock
  // clients (and gateways handing errors back to a model) look for them.
  google::rpc::Status rich;
  rich.set_code(static_cast<int>(status.code()));
  rich.set_message(std::string(status.message()));
  google::protobuf::Any* any = rich.add_details();
  any->set_type_url(steps::kBadRequestTypeUrl);
  any->set_value(std::string(*bad_request));
  return grpc::Status(code, std::string(status.message()), rich.SerializeAsString());
}

StepRunnerService::StepRunnerService(runner::Runner* runner, audit::AuditLog* audit, const audit::PeerTable* peers)
    : runner_(runner), audit_(audit), peers_(peers) {}

void StepRunnerService::Audit(grpc::CallbackServerContext* context, absl::string_view method,
                              const std::string& job_id, const absl::Status& result) {
  if (audit_ == nullptr) return;
  std::optional<audit::PeerTable::Peer> peer = peers_ ? peers_->Lookup(context->peer()) : std::nullopt;
  if (absl::Status s = audit_->Append(audit::RpcRecord(method, peer, job_id, result)); !s.ok()) {
    SR_LOG(ERROR) << "audit log: " << s;
  }
}
StepRunnerService::~StepRunnerService() = default;

grpc::ServerUnaryReactor* StepRunnerService::Run(grpc::CallbackServerContext* context,
                                                 const proto::RunRequest* request, proto::RunResponse*) {
  absl::Status result = runner_->Run(*request);
  Audit(context, "Run", request->id(), result);
  return FinishUnary(context, result);
}

grpc::ServerUnaryReactor* StepRunnerService::Close(grpc::CallbackServerContext* context,
                                                   const proto::CloseRequest* request, proto::CloseResponse*) {
  absl::Status result = runner_->Close(request->id());
  Audit(context, "Close", request->id(), result);
  return FinishUnary(context, result);
}

grpc::ServerUnaryReactor* StepRunnerService::Cancel(grpc::CallbackServerContext* context,
                                                    const proto::CancelRequest* request, proto::CancelResponse*) {
  absl::Status result = runner_->Cancel(request->id());
  Audit(context, "Cancel", request->id(), result);
  return FinishUnary(context, result);
}

grpc::ServerUnaryReactor* StepRunnerService::Status(grpc::CallbackServerContext* context,
                                                    const proto::StatusRequest* request,
                                                    proto::StatusResponse* response) {
  absl::StatusOr<std::vector<proto::Status>> jobs = runner_->GetStatus(request->id());
  if (jobs.ok()) {
    for (proto::Status& job : *jobs) *response->add_jobs() = std::move(job);
  }
  Audit(context, "Status", request->id(), jobs.status());
  return FinishUnary(context, jobs.status());
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* StepRunnerService::FollowLogs(grpc::CallbackServerContext* context,
                                                                        const grpc::ByteBuffer* raw_request) {
  proto::FollowLogsRequest request;
  if (absl::Status s = ParseRequest(*raw_request, &request); !s.ok()) {
    Audit(context, "FollowLogs", "", s);
    return new ErrorReactor<grpc::ByteBuffer>(s);
  }
  return TailLog(context, "FollowLogs", request.id(), request.offset(), /*announce=*/false);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* StepRunnerService::RunAndFollow(grpc::CallbackServerContext* context,
                                                                          const grpc::ByteBuffer* raw_request) {
  proto::RunRequest request;
  absl::Status result = ParseRequest(*raw_request, &request);
  if (result.ok()) result = runner_->Run(request);
  if (!result.ok()) {
    Audit(context, "RunAndFollow", request.id(), result);
    return new ErrorReactor<grpc::ByteBuffer>(result);
  }
  context->AddInitialMetadata("step-runner-job", "accepted");
  return TailLog(context, "RunAndFollow", request.id(), 0, /*announce=*/true);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* StepRunnerService::TailLog(grpc::CallbackServerContext* context,
                                                                     absl::string_view method, const std::string& id,
                                                                     int64_t offset, bool announce) {
  using Error = ErrorReactor<grpc::ByteBuffer>;
  absl::StatusOr<std::shared_ptr<const runner::Job>> job = runner_->GetJob(id);
  Audit(context, method, id, job.status());
  if (!job.ok()) return new Error(job.status());
  std::shared_ptr<logs::JobLog> log = (*job)->log();
  if (offset < 0 || offset > log->size()) {
    return new Error(absl::OutOfRangeError(absl::StrCat(
        "offset ", offset, " is outside the log of job \"", id, "\", which has ", log->size(), " bytes")));
  }
  absl::StatusOr<UniqueFd> reader = log->OpenReader();
  if (!reader.ok()) return new Error(reader.status());
  // Bound to this job, not its id: the id may name another job by the time the stream ends.
  auto final_status = [job = *job] { return job->status(); };
  auto* reactor = new LogTailReactor(std::move(log), *std::move(reader), offset, std::move(final_status), &pump_);
  reactor->Begin(announce);
  return reactor;
}

grpc::ServerWriteReactor<proto::FollowStepsResponse>* StepRunnerService::FollowSteps(
    grpc::CallbackServerContext* context, const proto::FollowStepsRequest* request) {
  using Error = ErrorReactor<proto::FollowStepsResponse>;
  absl::StatusOr<std::shared_ptr<const runner::Job>> job = runner_->GetJob(request->id());
  Audit(context, "FollowSteps", request->id(), job.status());
  if (!job.ok()) return new Error(job.status());
  std::shared_ptr<logs::EventLog> events = (*job)->events();
  if (request->after_seq() < 0 || request->after_seq() > events->last_seq()) {
    return new Error(absl::OutOfRangeError(absl::StrCat("after_seq ", request->after_seq(), " is outside the ",
                                                        events->last_seq(), " events of job \"", request->id(), "\"")));
  }
  auto* reactor = new StepsTailReactor(std::move(events), request->after_seq(), &pump_);
  reactor->Begin();
  return reactor;
}

}  // namespace step_runner::server

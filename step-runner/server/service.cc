#include "step-runner/server/service.h"

#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "step-runner/base/logging.h"
#include "google/rpc/status.pb.h"
#include "step-runner/logs/job_log.h"
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

proto::FollowLogsResponse::Stream ToProto(logs::Stream s) {
  return s == logs::Stream::kStderr ? proto::FollowLogsResponse::STREAM_STDERR
                                    : proto::FollowLogsResponse::STREAM_STDOUT;
}

class ErrorReactor : public grpc::ServerWriteReactor<proto::FollowLogsResponse> {
 public:
  explicit ErrorReactor(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

// Streams one job's log from an offset: replays what is on disk, then follows live appends, and
// finishes once the job has ended and every byte went out.
class LogTailReactor : public grpc::ServerWriteReactor<proto::FollowLogsResponse> {
 public:
  LogTailReactor(std::shared_ptr<logs::JobLog> log, UniqueFd reader, int64_t offset,
                 SerialExecutor* pump, std::atomic<int>* live)
      : log_(std::move(log)), reader_(std::move(reader)), pump_(pump), live_(live),
        handle_(std::make_shared<Handle>()), offset_(offset) {
    handle_->reactor = this;
    ++*live_;
    absl::MutexLock lock(&mu_);
    NextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    write_pending_ = false;
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
    --*live_;
    delete this;
  }

 private:
  // Outlives the reactor so that a wake-up queued on the pump can tell it is gone.
  struct Handle {
    absl::Mutex mu;
    LogTailReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };

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
      // Read the finished flag before reading: a log that is finished has its final size, so
      // reaching it then means the stream is complete.
      const bool was_finished = log_->finished();
      logs::JobLog::Chunk chunk;
      absl::StatusOr<size_t> n = log_->Read(reader_.get(), offset_, kChunkBytes, &chunk);
      if (!n.ok()) {
        FinishLocked(ToGrpcStatus(n.status()));
        return;
      }
      if (*n > 0) {
        response_.set_data(std::move(chunk.data));
        response_.set_offset(chunk.offset);
        response_.set_stream(ToProto(chunk.stream));
        offset_ += static_cast<int64_t>(*n);
        write_pending_ = true;
        StartWrite(&response_);
        return;
      }
      if (was_finished) {
        FinishLocked(grpc::Status::OK);
        return;
      }
      std::weak_ptr<Handle> weak = handle_;
      SerialExecutor* pump = pump_;
      waiter_ = log_->WaitForData(offset_, [weak, pump] {
        pump->Post([weak] {
          std::shared_ptr<Handle> handle = weak.lock();
          if (!handle) return;
          absl::MutexLock lock(&handle->mu);
          if (handle->reactor) handle->reactor->Wake();
        });
      });
      // nullopt: bytes arrived (or the log finished) since the read; go round again.
    }
  }

  void CancelWaitLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (waiter_) log_->CancelWait(*std::exchange(waiter_, std::nullopt));
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    CancelWaitLocked();
    Finish(status);
  }

  const std::shared_ptr<logs::JobLog> log_;
  const UniqueFd reader_;
  SerialExecutor* const pump_;
  std::atomic<int>* const live_;
  std::shared_ptr<Handle> handle_;

  absl::Mutex mu_;
  int64_t offset_ ABSL_GUARDED_BY(mu_);
  proto::FollowLogsResponse response_ ABSL_GUARDED_BY(mu_);
  bool write_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<logs::JobLog::WaiterId> waiter_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const auto code = static_cast<grpc::StatusCode>(status.code());
  auto bad_request = status.GetPayload(steps::kBadRequestTypeUrl);
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

StepRunnerService::StepRunnerService(runner::Runner* runner) : runner_(runner) {}
StepRunnerService::~StepRunnerService() = default;

grpc::ServerUnaryReactor* StepRunnerService::Run(grpc::CallbackServerContext* context,
                                                 const proto::RunRequest* request, proto::RunResponse*) {
  return FinishUnary(context, runner_->Run(*request));
}

grpc::ServerUnaryReactor* StepRunnerService::Close(grpc::CallbackServerContext* context,
                                                   const proto::CloseRequest* request, proto::CloseResponse*) {
  return FinishUnary(context, runner_->Close(request->id()));
}

grpc::ServerUnaryReactor* StepRunnerService::Cancel(grpc::CallbackServerContext* context,
                                                    const proto::CancelRequest* request, proto::CancelResponse*) {
  return FinishUnary(context, runner_->Cancel(request->id()));
}

grpc::ServerUnaryReactor* StepRunnerService::Status(grpc::CallbackServerContext* context,
                                                    const proto::StatusRequest* request,
                                                    proto::StatusResponse* response) {
  absl::StatusOr<std::vector<proto::Status>> jobs = runner_->GetStatus(request->id());
  if (jobs.ok()) {
    for (proto::Status& job : *jobs) *response->add_jobs() = std::move(job);
  }
  return FinishUnary(context, jobs.status());
}

grpc::ServerWriteReactor<proto::FollowLogsResponse>* StepRunnerService::FollowLogs(
    grpc::CallbackServerContext*, const proto::FollowLogsRequest* request) {
  absl::StatusOr<std::shared_ptr<logs::JobLog>> log = runner_->GetLog(request->id());
  if (!log.ok()) return new ErrorReactor(log.status());
  if (request->offset() < 0 || request->offset() > (*log)->size()) {
    return new ErrorReactor(absl::OutOfRangeError(absl::StrCat(
        "offset ", request->offset(), " is outside the log of job \"", request->id(), "\", which has ",
        (*log)->size(), " bytes")));
  }
  absl::StatusOr<UniqueFd> reader = (*log)->OpenReader();
  if (!reader.ok()) return new ErrorReactor(reader.status());
  return new LogTailReactor(*std::move(log), *std::move(reader), request->offset(), &pump_,
                            &live_followers_);
}

}  // namespace step_runner::server

#ifndef STEP_RUNNER_SERVER_SERVICE_H_
#define STEP_RUNNER_SERVER_SERVICE_H_

#include <memory>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "proto/step_runner.grpc.pb.h"
#include "step-runner/audit/audit_log.h"
#include "step-runner/audit/records.h"
#include "step-runner/base/event_loop.h"
#include "step-runner/runner/runner.h"

namespace step_runner::server {

// The one place absl::Status becomes grpc::Status (the codes share their numbers).
grpc::Status ToGrpcStatus(const absl::Status& status);

// Translates the StepRunner RPCs into calls on the Runner; holds no job state of its own.
// FollowLogs streams through a write reactor that keeps at most one write in flight, so a slow
// follower costs one chunk of memory and never slows the job or other followers.
//
// FollowLogs and RunAndFollow are raw methods (grpc::ByteBuffer in and out), so that a log's
// bytes reach gRPC without being copied (log_wire.h); the others use the generated messages.
using StepRunnerBase = proto::StepRunner::WithCallbackMethod_Run<
    proto::StepRunner::WithCallbackMethod_Close<proto::StepRunner::WithRawCallbackMethod_FollowLogs<
        proto::StepRunner::WithCallbackMethod_Status<proto::StepRunner::WithCallbackMethod_Cancel<
            proto::StepRunner::WithCallbackMethod_FollowSteps<
                proto::StepRunner::WithRawCallbackMethod_RunAndFollow<proto::StepRunner::Service>>>>>>>;

class StepRunnerService final : public StepRunnerBase {
 public:
  // Each RPC is recorded in `audit` (when given), with its caller from `peers`.
  explicit StepRunnerService(runner::Runner* runner, audit::AuditLog* audit = nullptr,
                             const audit::PeerTable* peers = nullptr);
  ~StepRunnerService() override;

  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context, const proto::RunRequest* request,
                                proto::RunResponse* response) override;
  grpc::ServerUnaryReactor* Close(grpc::CallbackServerContext* context, const proto::CloseRequest* request,
                                  proto::CloseResponse* response) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context, const proto::CancelRequest* request,
                                   proto::CancelResponse* response) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context, const proto::StatusRequest* request,
                                   proto::StatusResponse* response) override;
  // request: a FollowLogsRequest; responses: FollowLogsResponse messages.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* FollowLogs(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<proto::FollowStepsResponse>* FollowSteps(
      grpc::CallbackServerContext* context, const proto::FollowStepsRequest* request) override;
  // request: a RunRequest; responses: FollowLogsResponse messages.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* RunAndFollow(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* request) override;

 private:
  // The log of job `id` from `offset`, live; `announce` sends the initial metadata at once.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* TailLog(grpc::CallbackServerContext* context, absl::string_view method,
                                                      const std::string& id, int64_t offset, bool announce);
  void Audit(grpc::CallbackServerContext* context, absl::string_view method, const std::string& job_id,
             const absl::Status& result);

  runner::Runner* runner_;
  audit::AuditLog* audit_;
  const audit::PeerTable* peers_;
  // Wake-ups of caught-up followers run here, off the event loop that appends to the logs.
  SerialExecutor pump_;
};

}  // namespace step_runner::server

#endif  // STEP_RUNNER_SERVER_SERVICE_H_

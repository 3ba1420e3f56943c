#include "step-runner/audit/records.h"

#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"

namespace step_runner::audit {
namespace {

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  for (char& c : name) c = c == ' ' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return name;
}

}  // namespace

void PeerTable::Set(int fd, Peer peer) {
  absl::MutexLock lock(&mu_);
  peers_[fd] = peer;
}

std::optional<PeerTable::Peer> PeerTable::Lookup(absl::string_view grpc_peer) const {
  int fd;
  if (!absl::ConsumePrefix(&grpc_peer, "fd:") || !absl::SimpleAtoi(grpc_peer, &fd)) return std::nullopt;
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(fd);
  if (it == peers_.end()) return std::nullopt;
  return it->second;
}

nlohmann::json RpcRecord(absl::string_view method, const std::optional<PeerTable::Peer>& peer,
                         absl::string_view job_id, const absl::Status& result) {
  nlohmann::json j = {{"kind", "rpc"}, {"method", std::string(method)}, {"code", CodeName(result.code())}};
  if (peer) {
    j["uid"] = peer->uid;
    j["pid"] = peer->pid;
  }
  if (!job_id.empty()) j["job"] = std::string(job_id);
  return j;
}

nlohmann::json StepRecord(absl::string_view job_id, const proto::FollowStepsResponse& event,
                          absl::string_view sandbox_policy, absl::string_view network) {
  nlohmann::json j = {{"job", std::string(job_id)}};
  switch (event.kind()) {
    case proto::FollowStepsResponse::STEP_STARTED:
      j["kind"] = "step_started";
      j["step"] = event.result().name();
      break;
    case proto::FollowStepsResponse::STEP_FINISHED:
      j["kind"] = "step_finished";
      j["step"] = event.result().name();
      j["status"] = proto::StepResult::Status_Name(event.result().status());
      // What the step's process ran under; a skipped step and a run: sequence ran none of
      // their own (their children's lines say what those got).
      if (event.result().has_exec_result()) {
        j["exit_code"] = event.result().exec_result().exit_code();
        j["sandbox"] = std::string(sandbox_policy);
        j["network"] = std::string(network);
      }
      break;
    case proto::FollowStepsResponse::WARNING:
      j["kind"] = "warning";
      j["step"] = event.step_path();
      j["warning"] = event.warning();
      break;
    case proto::FollowStepsResponse::JOB_FINISHED:
      j["kind"] = "job_finished";
      j["status"] = proto::StepResult::Status_Name(event.job_status().status());
      j["exit_code"] = event.job_status().exit_code();
      if (event.job_status().has_error()) {
        j["error"] = proto::StatusError::Kind_Name(event.job_status().error().kind());
      }
      break;
    default:
      j["kind"] = "step_event";
      break;
  }
  return j;
}

}  // namespace step_runner::audit

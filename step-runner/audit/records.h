#ifndef STEP_RUNNER_AUDIT_RECORDS_H_
#define STEP_RUNNER_AUDIT_RECORDS_H_

#include <sys/types.h>

#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"
#include "proto/step_runner.pb.h"

// What the daemon writes to its audit log, in one place, so that what may appear there (and
// what never may: env values, argv, step scripts, output) is reviewed here.
namespace step_runner::audit {

// The peer credentials (SO_PEERCRED) of each live connection, by the fd gRPC serves it on:
// gRPC names such a connection "fd:N" (grpc::AddInsecureChannelFromFd), which is all an RPC
// handler can see of its connection.
class PeerTable {
 public:
  struct Peer {
    pid_t pid = 0;
    uid_t uid = 0;
  };
  void Set(int fd, Peer peer);
  // From a gRPC peer string ("fd:12"); nullopt if it names no known connection.
  std::optional<Peer> Lookup(absl::string_view grpc_peer) const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, Peer> peers_ ABSL_GUARDED_BY(mu_);
};

// {"kind":"rpc","method":..,"uid":..,"pid":..,"job":..,"code":"OK"|"NOT_FOUND"|..}
nlohmann::json RpcRecord(absl::string_view method, const std::optional<PeerTable::Peer>& peer,
                         absl::string_view job_id, const absl::Status& result);

// {"kind":"step_started"|"step_finished"|"job_finished","job":..,"step":..,"exit_code":..,
//  "sandbox":..,"network":..}. Only names, states and codes: never the command, env or output.
nlohmann::json StepRecord(absl::string_view job_id, const proto::FollowStepsResponse& event,
                          absl::string_view sandbox_policy, absl::string_view network);

}  // namespace step_runner::audit

#endif  // STEP_RUNNER_AUDIT_RECORDS_H_

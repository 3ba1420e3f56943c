#ifndef STEP_RUNNER_CLIENT_SSH_TRANSPORT_H_
#define STEP_RUNNER_CLIENT_SSH_TRANSPORT_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "step-runner/base/unique_fd.h"

struct ssh_session_struct;
struct ssh_channel_struct;

namespace step_runner::client {

// Where the built-in SSH client goes: `user@host[:port]`, a private key file, and the
// known_hosts file that must hold the server's host key (empty: ~/.ssh/known_hosts).
struct SshTarget {
  std::string user;
  std::string host;
  int port = 22;
  std::string key_file;
  std::string known_hosts;
};
absl::StatusOr<SshTarget> ParseSshTarget(absl::string_view user_at_host_port);

// The built-in alternative to `--via 'ssh ... step-runner proxy'`: a libssh client connection
// whose exec channel `step-runner proxy` is bridged by one thread to a socketpair, the other end
// of which carries gRPC. Host keys are checked against known_hosts; an unknown or changed key and
// a refused key are INVALID_ARGUMENT (waiting will not fix them), an unreachable server is
// UNAVAILABLE (the client redials).
class SshTransport {
 public:
  static absl::StatusOr<std::unique_ptr<SshTransport>> Start(const SshTarget& target,
                                                             UniqueFd* grpc_end);
  ~SshTransport();  // stops the bridge thread, closes the channel and the connection

 private:
  SshTransport() = default;
  void Bridge();

  ssh_session_struct* session_ = nullptr;
  ssh_channel_struct* channel_ = nullptr;
  UniqueFd ours_;
  UniqueFd wake_;  // eventfd: the destructor stops the thread
  std::thread thread_;
};

}  // namespace step_runner::client

#endif  // STEP_RUNNER_CLIENT_SSH_TRANSPORT_H_

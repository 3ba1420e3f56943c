#ifndef STEP_RUNNER_PROXY_SERVER_H_
#define STEP_RUNNER_PROXY_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proxy/config.h"

namespace step_runner::proxy {

// Loads the ed25519 host key at `path`, or generates one there (mode 0600) on first start.
// Refuses a key file that others may read.
absl::Status EnsureHostKey(const std::string& path);

class ServerState;

// The SSH front door: listens, authenticates, and bridges each allowed channel to its
// workspace's step-runner. One thread accepts (and reloads the routing file when it changes);
// each connection is served by its own thread running a libssh event loop, so a slow or stuck
// client costs its own thread and bounded buffers, never another session.
class Server {
 public:
  // Binds the listening socket (so port() is known) and loads the routing file.
  static absl::StatusOr<std::unique_ptr<Server>> Create(Config config);
  ~Server();

  int port() const;
  // Accepts and serves until Stop(); then ends every connection and returns once their threads
  // are done (or after a few seconds).
  absl::Status Run();
  // Thread-safe; not async-signal-safe (main.cc calls it from a signal-waiting thread).
  void Stop();

 private:
  explicit Server(std::unique_ptr<ServerState> state);
  std::unique_ptr<ServerState> state_;
};

}  // namespace step_runner::proxy

#endif  // STEP_RUNNER_PROXY_SERVER_H_

#ifndef STEP_RUNNER_TESTS_HELPERS_TCP_RELAY_H_
#define STEP_RUNNER_TESTS_HELPERS_TCP_RELAY_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "step-runner/base/unique_fd.h"

namespace step_runner::testing {

// A TCP hop on 127.0.0.1 in front of a port, that a test or a benchmark can cut as a dropped
// network connection is cut: both sockets of a connection are shut down at once, so
// each end sees its connection end (a client, as behind a NAT or a load balancer that went
// away; the server, as the proxy sees a vanished client). Each connection gets a thread
// copying both ways.
class TcpRelay {
 public:
  static absl::StatusOr<std::unique_ptr<TcpRelay>> Start(int target_port);
  ~TcpRelay();
  TcpRelay(const TcpRelay&) = delete;
  TcpRelay& operator=(const TcpRelay&) = delete;

  int port() const { return port_; }
  // Connections accepted (and connected onwards) so far.
  int64_t connections() const { return connections_; }
  // Ends the newest of the open connections, both ways; nothing if none is open.
  void Cut();

 private:
  TcpRelay(UniqueFd listener, int port, int target_port);
  void AcceptLoop();
  void Bridge(int a, int b);

  const UniqueFd listener_;
  const int port_;
  const int target_port_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> connections_{0};
  std::mutex mu_;
  // Guarded by mu_: each open connection's two fds, oldest first; a bridge removes its own
  // before its fds close.
  std::vector<std::pair<int, int>> open_;
  std::thread acceptor_;
  std::vector<std::thread> bridges_;  // only the acceptor adds, only the destructor joins
};

}  // namespace step_runner::testing

#endif  // STEP_RUNNER_TESTS_HELPERS_TCP_RELAY_H_

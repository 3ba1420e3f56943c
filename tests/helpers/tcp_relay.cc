#include "tests/helpers/tcp_relay.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "step-runner/base/files.h"

namespace step_runner::testing {
namespace {

// send(2) with MSG_NOSIGNAL: a peer whose socket was cut is an ended connection, not a SIGPIPE
// for the process the relay lives in.
bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpRelay>> TcpRelay::Start(int target_port) {
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{.sin_family = AF_INET, .sin_port = 0, .sin_addr = {htonl(INADDR_LOOPBACK)}};
  socklen_t len = sizeof addr;
  if (!listener || ::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
      ::listen(listener.get(), 16) != 0) {
    return ErrnoStatus(errno, "relay: listen on 127.0.0.1");
  }
  std::unique_ptr<TcpRelay> relay(new TcpRelay(std::move(listener), ntohs(addr.sin_port), target_port));
  relay->acceptor_ = std::thread([r = relay.get()] { r->AcceptLoop(); });
  return relay;
}

TcpRelay::TcpRelay(UniqueFd listener, int port, int target_port)
    : listener_(std::move(listener)), port_(port), target_port_(target_port) {}

TcpRelay::~TcpRelay() {
  stopping_ = true;
  ::shutdown(listener_.get(), SHUT_RDWR);  // wakes accept()
  acceptor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [a, b] : open_) {
      ::shutdown(a, SHUT_RDWR);
      ::shutdown(b, SHUT_RDWR);
    }
  }
  for (std::thread& bridge : bridges_) bridge.join();
}

void TcpRelay::Cut() {
  std::lock_guard<std::mutex> lock(mu_);
  if (open_.empty()) return;
  ::shutdown(open_.back().first, SHUT_RDWR);
  ::shutdown(open_.back().second, SHUT_RDWR);
}

void TcpRelay::AcceptLoop() {
  while (!stopping_) {
    UniqueFd client(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!client) {
      if (stopping_ || (errno != EINTR && errno != ECONNABORTED)) return;
      continue;
    }
    UniqueFd server(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{.sin_family = AF_INET, .sin_port = htons(static_cast<uint16_t>(target_port_)),
                     .sin_addr = {htonl(INADDR_LOOPBACK)}};
    if (::connect(server.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) continue;
    // A hop adds no waits of its own: what Nagle does is up to the two ends.
    for (int fd : {client.get(), server.get()}) {
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_.emplace_back(client.get(), server.get());
    }
    ++connections_;
    // The fds close when the bridge's thread function is done, after it left open_.
    bridges_.emplace_back([this, c = std::make_shared<UniqueFd>(std::move(client)),
                           s = std::make_shared<UniqueFd>(std::move(server))] { Bridge(c->get(), s->get()); });
  }
}

void TcpRelay::Bridge(int a, int b) {
  char buffer[64 << 10];
  for (bool ended = false; !ended;) {
    pollfd fds[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2 && !ended; ++i) {
      if (!fds[i].revents) continue;
      const ssize_t n = ::read(fds[i].fd, buffer, sizeof buffer);
      ended = n <= 0 || !SendAll(fds[1 - i].fd, buffer, static_cast<size_t>(n));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  ::shutdown(a, SHUT_RDWR);
  ::shutdown(b, SHUT_RDWR);
  std::erase(open_, std::make_pair(a, b));
}

}  // namespace step_runner::testing

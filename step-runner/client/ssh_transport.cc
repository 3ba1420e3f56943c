#include "step-runner/client/ssh_transport.h"

#include <libssh/libssh.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"

namespace step_runner::client {

absl::StatusOr<SshTarget> ParseSshTarget(absl::string_view text) {
  SshTarget target;
  const size_t at = text.find('@');
  if (at == absl::string_view::npos || at == 0) {
    return absl::InvalidArgumentError("--ssh: expected USER@HOST[:PORT] (the user names the workspace)");
  }
  target.user = std::string(text.substr(0, at));
  absl::string_view host = text.substr(at + 1);
  absl::string_view port;
  if (absl::StartsWith(host, "[")) {
    // An IPv6 address in brackets, then perhaps :PORT ("[::1]:2222").
    const size_t close = host.find(']');
    if (close == absl::string_view::npos) return absl::InvalidArgumentError("--ssh: no ']' after the IPv6 address");
    absl::string_view rest = host.substr(close + 1);
    if (!rest.empty()) {
      if (!absl::ConsumePrefix(&rest, ":")) {
        return absl::InvalidArgumentError("--ssh: expected :PORT after the IPv6 address in brackets");
      }
      if (rest.empty()) return absl::InvalidArgumentError("--ssh: bad port");
      port = rest;
    }
    host = host.substr(1, close - 1);
  } else if (host.find(':') != host.rfind(':')) {
    // "fe80::1:2222" cannot say where the address ends: brackets can ("[fe80::1]:2222").
    return absl::InvalidArgumentError("--ssh: put an IPv6 address in brackets: USER@[ADDRESS]:PORT");
  } else if (const size_t colon = host.rfind(':'); colon != absl::string_view::npos) {
    port = host.substr(colon + 1);
    host = host.substr(0, colon);
    if (port.empty()) return absl::InvalidArgumentError("--ssh: bad port");
  }
  if (!port.empty() && (!absl::SimpleAtoi(port, &target.port) || target.port <= 0 || target.port > 65535)) {
    return absl::InvalidArgumentError("--ssh: bad port");
  }
  if (host.empty()) return absl::InvalidArgumentError("--ssh: no host");
  target.host = std::string(host);
  return target;
}

absl::StatusOr<std::unique_ptr<SshTransport>> SshTransport::Start(const SshTarget& target,
                                                                  UniqueFd* grpc_end) {
  std::unique_ptr<SshTransport> t(new SshTransport());
  t->session_ = ssh_new();
  if (t->session_ == nullptr) return absl::InternalError("ssh_new failed");
  const unsigned port = static_cast<unsigned>(target.port);
  long timeout = 20;
  ssh_options_set(t->session_, SSH_OPTIONS_HOST, target.host.c_str());
  ssh_options_set(t->session_, SSH_OPTIONS_PORT, &port);
  ssh_options_set(t->session_, SSH_OPTIONS_USER, target.user.c_str());
  ssh_options_set(t->session_, SSH_OPTIONS_TIMEOUT, &timeout);
  // gRPC's requests are small writes that wait for an answer: with Nagle on, the second of two
  // writes in a row waits for the peer's delayed ACK of the first (40 ms on Linux), in the key
  // exchange and in every RPC. Through a TCP hop in between (a relay, a load balancer), which the
  // proxy's own quick ACKs do not reach, a reconnect took ~100 ms instead of ~11 (BENCHMARKS.md).
  const int no_delay = 1;
  ssh_options_set(t->session_, SSH_OPTIONS_NODELAY, &no_delay);
  if (!target.known_hosts.empty()) {
    ssh_options_set(t->session_, SSH_OPTIONS_KNOWNHOSTS, target.known_hosts.c_str());
  }
  const std::string where = absl::StrCat(target.user, "@", target.host, ":", target.port);
  if (ssh_connect(t->session_) != SSH_OK) {
    return absl::UnavailableError(absl::StrCat("ssh ", where, ": ", ssh_get_error(t->session_)));
  }
  // Never trust a host key on first use: the server's key must already be in known_hosts.
  const enum ssh_known_hosts_e known = ssh_session_is_known_server(t->session_);
  if (known != SSH_KNOWN_HOSTS_OK) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ssh ", where, ": the server's host key is ",
        known == SSH_KNOWN_HOSTS_CHANGED ? "DIFFERENT from the one in" : "not in",
        " known_hosts (", target.known_hosts.empty() ? "~/.ssh/known_hosts" : target.known_hosts,
        "); add it, e.g. with ssh-keyscan -p ", target.port, " ", target.host));
  }
  ssh_key key = nullptr;
  if (ssh_pki_import_privkey_file(target.key_file.c_str(), nullptr, nullptr, nullptr, &key) != SSH_OK) {
    return absl::InvalidArgumentError(absl::StrCat("--ssh-key: cannot read ", target.key_file));
  }
  const int auth = ssh_userauth_publickey(t->session_, nullptr, key);
  ssh_key_free(key);
  if (auth == SSH_AUTH_ERROR) {
    // The connection failed during the authentication (dropped, timed out): worth a redial,
    // unlike a refusal.
    return absl::UnavailableError(absl::StrCat("ssh ", where, ": ", ssh_get_error(t->session_)));
  }
  if (auth != SSH_AUTH_SUCCESS) {
    return absl::InvalidArgumentError(absl::StrCat("ssh ", where, ": the key was refused"));
  }
  t->channel_ = ssh_channel_new(t->session_);
  if (t->channel_ == nullptr || ssh_channel_open_session(t->channel_) != SSH_OK ||
      ssh_channel_request_exec(t->channel_, "step-runner proxy") != SSH_OK) {
    return absl::UnavailableError(absl::StrCat("ssh ", where, ": ", ssh_get_error(t->session_)));
  }
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) return ErrnoStatus(errno, "socketpair");
  t->ours_.Reset(pair[0]);
  grpc_end->Reset(pair[1]);
  t->wake_.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!t->wake_) return ErrnoStatus(errno, "eventfd");
  t->thread_ = std::thread([raw = t.get()] { raw->Bridge(); });
  return t;
}

// Copies both ways until either side ends. The session stays blocking: a write waits for the
// server's window, which is the backpressure a slow daemon should exert.
void SshTransport::Bridge() {
  char buffer[64 << 10];
  const int ssh_fd = ssh_get_fd(session_);
  bool local_open = true;
  for (;;) {
    // Bytes libssh already holds would not wake poll: drain them first.
    while (ssh_channel_poll(channel_, 0) > 0) {
      const int n = ssh_channel_read_nonblocking(channel_, buffer, sizeof buffer, 0);
      if (n <= 0) break;
      if (!WriteAll(ours_.get(), absl::string_view(buffer, static_cast<size_t>(n))).ok()) return;
    }
    if (ssh_channel_is_eof(channel_) || ssh_channel_is_closed(channel_) || !ssh_is_connected(session_)) {
      ::shutdown(ours_.get(), SHUT_RDWR);
      return;
    }
    pollfd fds[3] = {{.fd = ssh_fd, .events = POLLIN},
                     {.fd = local_open ? ours_.get() : -1, .events = POLLIN},
                     {.fd = wake_.get(), .events = POLLIN}};
    if (::poll(fds, 3, 1000) < 0 && errno != EINTR) return;
    if (fds[2].revents) return;
    if (fds[1].revents) {
      const ssize_t n = ::read(ours_.get(), buffer, sizeof buffer);
      if (n > 0) {
        if (ssh_channel_write(channel_, buffer, static_cast<uint32_t>(n)) != n) {
          ::shutdown(ours_.get(), SHUT_RDWR);
          return;
        }
      } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        ssh_channel_send_eof(channel_);
        local_open = false;
      }
    }
  }
}

SshTransport::~SshTransport() {
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!::write(wake_.get(), &one, sizeof one);
    thread_.join();
  }
  if (channel_ != nullptr) {
    if (ssh_is_connected(session_)) ssh_channel_close(channel_);
    ssh_channel_free(channel_);
  }
  if (session_ != nullptr) {
    if (ssh_is_connected(session_)) ssh_disconnect(session_);
    ssh_free(session_);
  }
}

}  // namespace step_runner::client

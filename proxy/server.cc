#include "proxy/server.h"

#include <arpa/inet.h>
#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <libssh/server.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "proxy/audit.h"
#include "proxy/auth.h"
#include "proxy/backend.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::proxy {

absl::Status EnsureHostKey(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (st.st_mode & 077) {
      return absl::FailedPreconditionError(absl::StrCat(
          "host key ", path, " is readable by others (mode ", absl::StrFormat("%04o", st.st_mode & 0777),
          "); chmod 600 it"));
    }
    ssh_key key = nullptr;
    if (ssh_pki_import_privkey_file(path.c_str(), nullptr, nullptr, nullptr, &key) != SSH_OK) {
      return absl::InvalidArgumentError(absl::StrCat("cannot read host key ", path));
    }
    ssh_key_free(key);
    return absl::OkStatus();
  }
  if (errno != ENOENT) return ErrnoStatus(errno, absl::StrCat("stat ", path));
  ssh_key key = nullptr;
  if (ssh_pki_generate(SSH_KEYTYPE_ED25519, 0, &key) != SSH_OK) {
    return absl::InternalError("cannot generate an ed25519 host key");
  }
  char* text = nullptr;
  const int rc = ssh_pki_export_privkey_base64(key, nullptr, nullptr, nullptr, &text);
  ssh_key_free(key);
  if (rc != SSH_OK || text == nullptr) return absl::InternalError("cannot export the host key");
  std::string pem(text);
  ssh_string_free_char(text);
  // Written under a temporary name with mode 0600 and renamed: never visible half-written or
  // with a wider mode.
  absl::Status s = WriteFileAtomically(path, pem, 0600);
  std::fill(pem.begin(), pem.end(), '\0');
  SR_RETURN_IF_ERROR(s);
  SR_LOG(INFO) << "generated host key " << path;
  return absl::OkStatus();
}

// Everything the accept thread and the connection threads share.
class ServerState {
 public:
  Config config;
  std::unique_ptr<AuditLog> audit;
  std::unique_ptr<FailureLimiter> failures;
  ssh_bind bind = nullptr;
  int port = 0;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> next_connection_id{1};

  ~ServerState() {
    if (bind) ssh_bind_free(bind);
  }

  std::shared_ptr<const Routing> routing() {
    absl::MutexLock lock(&mu_);
    return routing_;
  }
  void set_routing(std::shared_ptr<const Routing> routing) {
    absl::MutexLock lock(&mu_);
    routing_ = std::move(routing);
  }

  // Admission at accept: total and per-address unauthenticated connections.
  std::string Admit(const std::string& address) {
    absl::MutexLock lock(&mu_);
    if (connections_ >= config.limits.max_connections) return "too many connections";
    if (unauthenticated_[address] >= config.limits.max_unauthenticated_per_address) {
      return "too many unauthenticated connections from this address";
    }
    ++connections_;
    ++unauthenticated_[address];
    ++threads_;
    return "";
  }
  // An authenticated connection of `user`; false when the user has too many already.
  bool Authenticate(const std::string& address, const std::string& user) {
    absl::MutexLock lock(&mu_);
    if (per_user_[user] >= config.limits.max_connections_per_user) return false;
    ++per_user_[user];
    LeaveUnauthenticated(address);
    return true;
  }
  void Release(const std::string& address, const std::string& user, bool authenticated) {
    absl::MutexLock lock(&mu_);
    --connections_;
    if (authenticated) {
      if (--per_user_[user] <= 0) per_user_.erase(user);
    } else {
      LeaveUnauthenticated(address);
    }
  }
  void ThreadDone() {
    absl::MutexLock lock(&mu_);
    --threads_;
  }
  bool WaitForThreads(absl::Duration deadline) {
    absl::MutexLock lock(&mu_);
    auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return threads_ == 0; };
    return mu_.AwaitWithTimeout(absl::Condition(&none), deadline);
  }

 private:
  void LeaveUnauthenticated(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (--unauthenticated_[address] <= 0) unauthenticated_.erase(address);
  }

  absl::Mutex mu_;
  std::shared_ptr<const Routing> routing_ ABSL_GUARDED_BY(mu_);
  int connections_ ABSL_GUARDED_BY(mu_) = 0;
  int threads_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, int> unauthenticated_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int> per_user_ ABSL_GUARDED_BY(mu_);
};

namespace {

constexpr size_t kReadChunk = 256 << 10;

struct Peer {
  std::string address = "unknown";
  int port = 0;
};

Peer PeerOf(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  Peer peer;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return peer;
  char host[INET6_ADDRSTRLEN] = "?";
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<sockaddr_in*>(&addr);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    peer.port = ntohs(in->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<sockaddr_in6*>(&addr);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    peer.port = ntohs(in6->sin6_port);
  }
  peer.address = host;
  return peer;
}

// The kernel notices a peer that vanished without a FIN (pulled cable, dead NAT): probes after
// `interval` of silence, and gives up on unacknowledged data after interval * count.
void SetTcpOptions(int fd, const Limits& limits) {
  const int one = 1;
  const int interval = static_cast<int>(std::max<int64_t>(1, absl::ToInt64Seconds(limits.keepalive_interval)));
  const int count = limits.keepalive_count;
  const unsigned user_timeout = static_cast<unsigned>(interval) * static_cast<unsigned>(count) * 1000u;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &interval, sizeof interval);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
  ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
}

// The key exchange, driven here (libssh's non-blocking mode) rather than inside libssh, so that
// every wait can ask the kernel for quick ACKs: OpenSSH's client writes its KEXINIT and then its
// ECDH_INIT with Nagle on, so the second waited for our delayed ACK of the first, 40 ms of each
// connect, and so of every reconnect (BENCHMARKS.md, "SSH proxy").
// SSH_AGAIN when the deadline passed or the proxy is stopping (a client that stalls before or
// during the key exchange must not hold up a shutdown for the whole login grace).
int HandleKeyExchange(ssh_session session, int fd, absl::Time deadline, const std::atomic<bool>& stopping) {
  ssh_set_blocking(session, 0);
  int rc;
  while ((rc = ssh_handle_key_exchange(session)) == SSH_AGAIN) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration() || stopping) break;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    // libssh queues what it cannot send at once; a short wait keeps that flowing too.
    pollfd pfd{.fd = fd, .events = POLLIN};
    ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(10, absl::ToInt64Milliseconds(left) + 1)));
  }
  ssh_set_blocking(session, 1);
  return rc;
}

// The SSH name of a channel type; libssh 0.10 reports every type it does not parse as unknown,
// so for those the name comes from its log (`logged`, see OnLibsshLog).
std::string ChannelTypeName(int subtype, const std::string& logged) {
  switch (subtype) {
    case SSH_CHANNEL_SESSION: return "session";
    case SSH_CHANNEL_DIRECT_TCPIP: return "direct-tcpip";
    case SSH_CHANNEL_FORWARDED_TCPIP: return "forwarded-tcpip";
    case SSH_CHANNEL_X11: return "x11";
    case SSH_CHANNEL_AUTH_AGENT: return "auth-agent";
    default: return logged.empty() ? "unknown" : logged.substr(0, 64);
  }
}

// `ssh -L ./local.sock:/remote.sock`: OpenSSH's streamlocal forwarding.
constexpr char kStreamLocalChannel[] = "direct-streamlocal@openssh.com";

const char* ChannelRequestName(int subtype) {
  switch (subtype) {
    case SSH_CHANNEL_REQUEST_PTY: return "pty";
    case SSH_CHANNEL_REQUEST_EXEC: return "exec";
    case SSH_CHANNEL_REQUEST_SHELL: return "shell";
    case SSH_CHANNEL_REQUEST_ENV: return "env";
    case SSH_CHANNEL_REQUEST_SUBSYSTEM: return "subsystem";
    case SSH_CHANNEL_REQUEST_WINDOW_CHANGE: return "window-change";
    case SSH_CHANNEL_REQUEST_X11: return "x11";
    default: return "other";
  }
}

constexpr char kUsage[] =
    "this proxy only carries step-runner: run `step-runner proxy` (exec) or the `step-runner` "
    "subsystem, e.g. step-runner run FILE --via 'ssh -p PORT WORKSPACE@HOST step-runner proxy'";

class Connection;

// One session channel: refused with a message, or bridged to a backend stream.
struct Bridge {
  Connection* connection = nullptr;
  ssh_channel channel = nullptr;
  ssh_channel_callbacks_struct callbacks{};
  int id = 0;
  std::string kind;      // "exec", "subsystem", "shell", ...; empty until the first request
  std::string refusal;   // set: write it to the client's stderr and close
  std::optional<BackendStream> backend;
  std::string to_backend;  // read from the client, not yet written to the backend (bounded)
  size_t to_backend_offset = 0;
  bool client_eof = false;
  bool backend_eof = false;
  bool backend_write_shut = false;
  bool done = false;
  short registered_events = 0;
  int64_t bytes_to_backend = 0;
  int64_t bytes_to_client = 0;
  absl::Time start = absl::Now();
  std::string end_reason;
};

class Connection {
 public:
  Connection(ServerState& state, ssh_session session, std::string address, int port, uint64_t id)
      : state_(state), session_(session), address_(std::move(address)), port_(port), id_(id) {}
  ~Connection() {
    bridges_.clear();
    if (event_) ssh_event_free(event_);
    ssh_free(session_);
    // This thread's libssh log hook points here (OnLibsshLog): nothing may log into it after.
    ssh_set_log_level(SSH_LOG_NOLOG);
    ssh_set_log_callback(nullptr);
    ssh_set_log_userdata(nullptr);
  }

  void Serve();

 private:
  static int OnAuthPubkey(ssh_session, const char* user, ssh_key key, char state, void* self);
  static int OnAuthPassword(ssh_session, const char* user, const char* password, void* self);
  static ssh_channel OnChannelOpen(ssh_session, void* self);
  static int OnMessage(ssh_session, ssh_message message, void* self);
  static int OnExec(ssh_session, ssh_channel, const char* command, void* bridge);
  static int OnSubsystem(ssh_session, ssh_channel, const char* subsystem, void* bridge);
  static int OnShell(ssh_session, ssh_channel, void* bridge);
  static int OnFdEvent(socket_t, int, void*) { return 0; }
  static void OnLibsshLog(int priority, const char* function, const char* message, void* self);

  // Shared by both authentication methods once the credential checked out.
  int Authenticated(const std::string& user, const std::string& method);
  int AuthFailed(const std::string& user, const std::string& why);
  void Banner(const std::string& text);
  void StartBridge(Bridge& bridge, const std::string& kind);
  int OpenStreamLocal(ssh_message message);
  void NewBridge(Bridge& bridge);
  void Pump(Bridge& bridge);
  void FinishBridge(Bridge& bridge, const std::string& reason, int exit_code);
  void UpdateInterest(Bridge& bridge);
  void AuditBridge(const Bridge& bridge);
  void AuditRefusedOpen(const std::string& kind, const std::string& why);
  void UpdateLogLevel();
  void AuditConnection();

  ServerState& state_;
  ssh_session session_;
  ssh_event event_ = nullptr;
  ssh_server_callbacks_struct server_callbacks_{};
  const std::string address_;
  const int port_;
  const uint64_t id_;
  const absl::Time start_ = absl::Now();
  absl::Time last_activity_ = absl::Now();

  std::string user_;
  std::string method_;
  std::string fingerprint_;
  std::string token_user_;
  bool authenticated_ = false;
  bool admitted_as_user_ = false;
  int auth_failures_ = 0;
  std::string end_reason_;
  int next_bridge_id_ = 0;
  int64_t bytes_to_backend_ = 0;
  int64_t bytes_to_client_ = 0;
  int channels_ = 0;
  // The type of the latest channel open, as libssh logged it (see OnLibsshLog).
  std::string logged_channel_type_;
  int log_level_ = -1;  // libssh's, for this thread; -1: not set yet
  std::vector<std::unique_ptr<Bridge>> bridges_;
};

// libssh 0.10 parses session, direct-tcpip, forwarded-tcpip, x11 and agent channel opens, and
// hands every other type over as SSH_CHANNEL_UNKNOWN, without its name or its data: the one place
// the name shows is the line it logs at packet level ("Clients wants to open a <type> channel"),
// just before it hands the open over. Its log settings are per thread and this thread serves
// this connection only, so this connection's opens are told apart by that line (and nothing else
// from the log is kept). The streamlocal socket path is not seen this way.
void Connection::OnLibsshLog(int, const char*, const char* message, void* self) {
  constexpr absl::string_view kOpen = "Clients wants to open a ";
  absl::string_view text = message;
  const size_t at = text.find(kOpen);
  if (at == absl::string_view::npos) return;
  text.remove_prefix(at + kOpen.size());
  static_cast<Connection*>(self)->logged_channel_type_ = std::string(absl::StripSuffix(text, " channel"));
}

void Connection::Banner(const std::string& text) {
  ssh_string banner = ssh_string_from_char(absl::StrCat("workspace-proxy: ", text, "\n").c_str());
  if (banner == nullptr) return;
  ssh_send_issue_banner(session_, banner);
  ssh_string_free(banner);
}

int Connection::AuthFailed(const std::string& user, const std::string& why) {
  user_ = user;
  ++auth_failures_;
  state_.failures->RecordFailure(address_);
  SR_LOG(INFO) << "connection " << id_ << " from " << address_ << ": authentication as \"" << user
               << "\" failed: " << why;
  if (auth_failures_ >= state_.config.limits.max_auth_tries) {
    end_reason_ = "too many authentication failures";
    Banner("too many authentication failures");
  }
  return SSH_AUTH_DENIED;
}

int Connection::Authenticated(const std::string& user, const std::string& method) {
  if (!state_.Authenticate(address_, user)) {
    // Not the client's fault: no failure is counted, but the connection ends.
    Banner(absl::StrCat("too many connections for workspace \"", user, "\" (limit ",
                        state_.config.limits.max_connections_per_user, ")"));
    end_reason_ = "too many connections for this user";
    return SSH_AUTH_DENIED;
  }
  admitted_as_user_ = true;
  authenticated_ = true;
  user_ = user;
  method_ = method;
  last_activity_ = absl::Now();
  // From here on the event loop must never wait inside libssh: writes are sized to the window.
  ssh_set_blocking(session_, 0);
  return SSH_AUTH_SUCCESS;
}

int Connection::OnAuthPubkey(ssh_session, const char* user, ssh_key key, char signature_state,
                             void* self) {
  auto* c = static_cast<Connection*>(self);
  if (c->authenticated_ || !c->end_reason_.empty()) return SSH_AUTH_DENIED;
  std::shared_ptr<const Routing> routing = c->state_.routing();
  const Workspace* ws = routing->Find(user);
  // The same answer for an unknown workspace and an unknown key: names are not enumerable.
  if (ws == nullptr) return c->AuthFailed(user, "unknown workspace");
  if (!KeyAuthorized(key, ws->authorized_keys)) {
    return c->AuthFailed(user, absl::StrCat("key ", KeyFingerprint(key), " not authorized"));
  }
  if (signature_state == SSH_PUBLICKEY_STATE_NONE) return SSH_AUTH_SUCCESS;  // "send a signature"
  if (signature_state != SSH_PUBLICKEY_STATE_VALID) return c->AuthFailed(user, "bad signature");
  c->fingerprint_ = KeyFingerprint(key);
  return c->Authenticated(user, "publickey");
}

int Connection::OnAuthPassword(ssh_session, const char* user, const char* password, void* self) {
  auto* c = static_cast<Connection*>(self);
  if (c->authenticated_ || !c->end_reason_.empty()) return SSH_AUTH_DENIED;
  if (c->state_.config.forge_url.empty()) return c->AuthFailed(user, "token auth is off");
  // The token first, whatever the name: a workspace that exists and one that does not must get
  // the same answer (and take as long), or names could be probed, e.g. while the forge is down.
  // Blocks this connection's thread only, for at most forge_timeout.
  auto forge_user = ForgeUserForToken(c->state_.config.forge_url, password,
                                      c->state_.config.forge_timeout);
  if (!forge_user.ok()) {
    if (absl::IsUnavailable(forge_user.status())) {
      SR_LOG(WARNING) << "token check: " << forge_user.status();
      c->Banner("the token could not be checked (forge unavailable); try again later");
    }
    return c->AuthFailed(user, std::string(forge_user.status().message()));
  }
  std::shared_ptr<const Routing> routing = c->state_.routing();
  const Workspace* ws = routing->Find(user);
  if (ws == nullptr) return c->AuthFailed(user, "unknown workspace");
  if (ws->owner.empty()) return c->AuthFailed(user, "the workspace has no owner for token auth");
  if (*forge_user != ws->owner) {
    return c->AuthFailed(user, absl::StrCat("token of ", *forge_user, ", not the owner"));
  }
  c->token_user_ = *forge_user;
  return c->Authenticated(user, "token");
}

ssh_channel Connection::OnChannelOpen(ssh_session session, void* self) {
  auto* c = static_cast<Connection*>(self);
  if (!c->authenticated_) return nullptr;
  auto bridge = std::make_unique<Bridge>();
  bridge->connection = c;
  bridge->id = c->next_bridge_id_++;
  bridge->channel = ssh_channel_new(session);
  if (bridge->channel == nullptr) return nullptr;
  // Accepted even when over the limit, only to say why on the client's stderr; the first
  // request gets the refusal.
  c->NewBridge(*bridge);
  ssh_channel_callbacks_struct& cb = bridge->callbacks;
  cb.userdata = bridge.get();
  cb.channel_exec_request_function = OnExec;
  cb.channel_subsystem_request_function = OnSubsystem;
  cb.channel_shell_request_function = OnShell;
  // pty, env, x11 and agent forwarding requests have no callback: libssh answers them with a
  // failure, which OpenSSH reports ("PTY allocation request failed").
  ssh_callbacks_init(&cb);
  ssh_set_channel_callbacks(bridge->channel, &cb);
  ssh_channel channel = bridge->channel;
  c->bridges_.push_back(std::move(bridge));
  return channel;
}

int Connection::OnMessage(ssh_session, ssh_message message, void* self) {
  auto* c = static_cast<Connection*>(self);
  const int type = ssh_message_type(message);
  const int subtype = ssh_message_subtype(message);
  if (type == SSH_REQUEST_CHANNEL_OPEN && c->authenticated_) {
    if (subtype == SSH_CHANNEL_UNKNOWN && c->logged_channel_type_ == kStreamLocalChannel) {
      return c->OpenStreamLocal(message);
    }
    c->AuditRefusedOpen(ChannelTypeName(subtype, c->logged_channel_type_), "channel type not allowed");
  } else if (type == SSH_REQUEST_CHANNEL && subtype != SSH_CHANNEL_REQUEST_ENV &&
             subtype != SSH_CHANNEL_REQUEST_WINDOW_CHANGE) {
    SR_LOG(INFO) << "connection " << c->id_ << ": refused channel request "
                 << ChannelRequestName(subtype);
  }
  return 1;  // not handled: libssh sends the protocol's refusal
}

// Logging at packet level formats a few lines per packet, in libssh, before the callback can
// drop them: 10-30% more CPU for the proxy while a channel streams (BENCHMARKS.md). So the level
// is up only while this connection carries no command channel (exec, subsystem): a connection
// made for forwarding (`ssh -N -L`) recognizes every streamlocal open, one carrying
// `step-runner proxy` pays nothing, and a forward opened on it meanwhile is refused.
void Connection::UpdateLogLevel() {
  const bool carrying_commands = std::any_of(bridges_.begin(), bridges_.end(), [](const auto& b) {
    return !b->done && !b->kind.empty() && b->kind != "direct-streamlocal";
  });
  const int level = carrying_commands ? SSH_LOG_NOLOG : SSH_LOG_PACKET;
  if (level == log_level_) return;
  ssh_set_log_level(level);
  log_level_ = level;
  if (carrying_commands) logged_channel_type_.clear();
}

// Counts a new channel, and refuses it (bridge.refusal) when the connection has its limit of
// open ones already.
void Connection::NewBridge(Bridge& bridge) {
  ++channels_;
  last_activity_ = absl::Now();
  const auto open = std::count_if(bridges_.begin(), bridges_.end(), [](const auto& b) { return !b->done; });
  if (open >= state_.config.limits.max_channels_per_connection) {
    bridge.refusal = absl::StrCat("too many channels on this connection (limit ",
                                  state_.config.limits.max_channels_per_connection, ")");
  }
}

void Connection::AuditRefusedOpen(const std::string& kind, const std::string& why) {
  state_.audit->Write({{"event", "channel"},
                       {"connection", id_},
                       {"user", user_},
                       {"workspace", user_},
                       {"source", address_},
                       {"kind", kind},
                       {"time", AuditTime(absl::Now())},
                       {"end", absl::StrCat("refused: ", why)}});
}

// A streamlocal forward carries the same bytes as `step-runner proxy` over exec, to the same
// backend, whatever socket path the client named (libssh does not pass it on; the workspace's
// step-runner is the only socket the proxy serves). Refusals refuse the open itself: the channel
// has no stderr to explain on, and OpenSSH shows "open failed".
int Connection::OpenStreamLocal(ssh_message message) {
  auto bridge = std::make_unique<Bridge>();
  bridge->connection = this;
  bridge->id = next_bridge_id_++;
  NewBridge(*bridge);
  StartBridge(*bridge, "direct-streamlocal");
  if (!bridge->refusal.empty()) {
    SR_LOG(INFO) << "connection " << id_ << ": streamlocal forward refused: " << bridge->refusal;
    AuditRefusedOpen("direct-streamlocal", bridge->refusal);
    return 1;  // libssh answers with the protocol's refusal
  }
  bridge->channel = ssh_message_channel_request_open_reply_accept(message);
  if (bridge->channel == nullptr) {
    SR_LOG(WARNING) << "connection " << id_ << ": accepting a streamlocal channel failed: " << ssh_get_error(session_);
    return 0;
  }
  ssh_callbacks_init(&bridge->callbacks);
  ssh_set_channel_callbacks(bridge->channel, &bridge->callbacks);
  bridges_.push_back(std::move(bridge));
  return 0;
}

int Connection::OnExec(ssh_session, ssh_channel, const char* command, void* self) {
  auto* bridge = static_cast<Bridge*>(self);
  std::vector<absl::string_view> words = absl::StrSplit(command, absl::ByAnyChar(" \t"), absl::SkipEmpty());
  const bool allowed = words.size() == 2 && words[0] == "step-runner" && words[1] == "proxy";
  if (!allowed && bridge->refusal.empty()) {
    bridge->refusal = absl::StrCat("command not allowed: ", std::string(command).substr(0, 200),
                                   "\n", kUsage);
  }
  bridge->connection->StartBridge(*bridge, "exec");
  return SSH_OK;  // success: the refusal, if any, goes to the client's stderr
}

int Connection::OnSubsystem(ssh_session, ssh_channel, const char* subsystem, void* self) {
  auto* bridge = static_cast<Bridge*>(self);
  if (std::string(subsystem) != "step-runner" && bridge->refusal.empty()) {
    bridge->refusal = absl::StrCat("subsystem not allowed: ", std::string(subsystem).substr(0, 100),
                                   "\n", kUsage);
  }
  bridge->connection->StartBridge(*bridge, absl::StrCat("subsystem"));
  return SSH_OK;
}

int Connection::OnShell(ssh_session, ssh_channel, void* self) {
  auto* bridge = static_cast<Bridge*>(self);
  if (bridge->refusal.empty()) {
    bridge->refusal = absl::StrCat("interactive shells are not available\n", kUsage);
  }
  bridge->connection->StartBridge(*bridge, "shell");
  return SSH_OK;
}

void Connection::StartBridge(Bridge& bridge, const std::string& kind) {
  last_activity_ = absl::Now();
  if (!bridge.kind.empty()) {
    // A second exec/shell/subsystem on one channel is a protocol error from the client.
    if (bridge.refusal.empty()) bridge.refusal = "one command per channel";
    return;
  }
  bridge.kind = kind;
  if (!bridge.refusal.empty()) return;
  std::shared_ptr<const Routing> routing = state_.routing();
  const Workspace* ws = routing->Find(user_);
  if (ws == nullptr) {
    bridge.refusal = absl::StrCat("workspace \"", user_, "\" is no longer routed");
    return;
  }
  auto backend = BackendStream::Dial(*ws);
  if (!backend.ok()) {
    SR_LOG(WARNING) << "connection " << id_ << ": workspace " << user_ << ": " << backend.status();
    bridge.refusal = absl::StrCat("the workspace's step-runner is unreachable: ",
                                  backend.status().message());
    return;
  }
  bridge.backend.emplace(*std::move(backend));
}

void Connection::FinishBridge(Bridge& bridge, const std::string& reason, int exit_code) {
  if (bridge.done) return;
  bridge.done = true;
  bridge.end_reason = reason;
  if (bridge.registered_events != 0) {
    ssh_event_remove_fd(event_, bridge.backend->fd());
    bridge.registered_events = 0;
  }
  if (!ssh_channel_is_closed(bridge.channel)) {
    // Only a session channel has an exit status; a forward just ends.
    if (bridge.kind != "direct-streamlocal") ssh_channel_request_send_exit_status(bridge.channel, exit_code);
    ssh_channel_send_eof(bridge.channel);
    ssh_channel_close(bridge.channel);
  }
  bridge.backend.reset();
  ssh_remove_channel_callbacks(bridge.channel, &bridge.callbacks);
  // libssh frees it once the client's close arrives (or with the session).
  ssh_channel_free(bridge.channel);
  bridge.channel = nullptr;
  bytes_to_backend_ += bridge.bytes_to_backend;
  bytes_to_client_ += bridge.bytes_to_client;
  AuditBridge(bridge);
}

// Moves what can move without blocking, in both directions, within the bounds: at most
// channel_buffer bytes wait for the backend, and the backend is read only as far as the client's
// SSH window allows, so a client that stops reading stops its own stream and nothing else.
void Connection::Pump(Bridge& bridge) {
  if (bridge.done) return;
  // A refusal is delivered in answer to the channel's request (exec, shell, subsystem): closing
  // before it arrives would leave the client's request dangling on a freed channel.
  if (!bridge.refusal.empty() && !bridge.kind.empty()) {
    std::string text = absl::StrCat("workspace-proxy: ", bridge.refusal, "\n");
    ssh_channel_write_stderr(bridge.channel, text.data(), static_cast<uint32_t>(text.size()));
    FinishBridge(bridge, absl::StrCat("refused: ", bridge.refusal.substr(0, bridge.refusal.find('\n'))),
                 bridge.kind == "exec" || bridge.kind == "subsystem" ? 127 : 1);
    return;
  }
  if (!bridge.backend) {
    if (ssh_channel_is_closed(bridge.channel) || ssh_channel_is_eof(bridge.channel)) {
      FinishBridge(bridge, "closed by client before a request", 0);
    }
    return;
  }
  const int fd = bridge.backend->fd();
  char buffer[kReadChunk];
  // Client -> backend.
  const size_t cap = static_cast<size_t>(state_.config.limits.channel_buffer);
  while (!bridge.client_eof && bridge.to_backend.size() - bridge.to_backend_offset < cap) {
    const size_t room = std::min(kReadChunk, cap - (bridge.to_backend.size() - bridge.to_backend_offset));
    const int n = ssh_channel_read_nonblocking(bridge.channel, buffer, static_cast<uint32_t>(room), 0);
    if (n > 0) {
      bridge.to_backend.append(buffer, static_cast<size_t>(n));
      bridge.bytes_to_backend += n;
      last_activity_ = absl::Now();
      continue;
    }
    if (n == SSH_EOF || (n == 0 && ssh_channel_is_eof(bridge.channel))) bridge.client_eof = true;
    if (n == SSH_ERROR) bridge.client_eof = true;
    break;
  }
  while (bridge.to_backend_offset < bridge.to_backend.size()) {
    const ssize_t n = ::send(fd, bridge.to_backend.data() + bridge.to_backend_offset,
                             bridge.to_backend.size() - bridge.to_backend_offset, MSG_NOSIGNAL);
    if (n > 0) {
      bridge.to_backend_offset += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
    FinishBridge(bridge, "backend closed", 255);
    return;
  }
  if (bridge.to_backend_offset == bridge.to_backend.size()) {
    bridge.to_backend.clear();
    bridge.to_backend_offset = 0;
  } else if (bridge.to_backend_offset >= kReadChunk) {
    // Drop what was sent, so the buffer stays near channel_buffer, not twice that.
    bridge.to_backend.erase(0, bridge.to_backend_offset);
    bridge.to_backend_offset = 0;
  }
  if (bridge.client_eof && bridge.to_backend_offset == bridge.to_backend.size() &&
      !bridge.backend_write_shut) {
    ::shutdown(fd, SHUT_WR);
    bridge.backend_write_shut = true;
  }
  // Backend -> client, never more than the client's window: libssh buffers what it is given.
  while (!bridge.backend_eof && !ssh_channel_is_closed(bridge.channel)) {
    const uint32_t window = ssh_channel_window_size(bridge.channel);
    if (window == 0) break;
    const ssize_t n = ::read(fd, buffer, std::min<size_t>(kReadChunk, window));
    if (n > 0) {
      const int written = ssh_channel_write(bridge.channel, buffer, static_cast<uint32_t>(n));
      if (written != n) {
        FinishBridge(bridge, "client connection failed", 255);
        return;
      }
      bridge.bytes_to_client += n;
      last_activity_ = absl::Now();
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
    bridge.backend_eof = true;
  }
  if (bridge.backend_eof) {
    FinishBridge(bridge, "backend closed", bridge.backend->ExitCode());
    return;
  }
  if (ssh_channel_is_closed(bridge.channel)) {
    FinishBridge(bridge, "closed by client", 0);
    return;
  }
  UpdateInterest(bridge);
}

void Connection::UpdateInterest(Bridge& bridge) {
  short events = 0;
  if (!bridge.backend_eof && ssh_channel_window_size(bridge.channel) > 0) events |= POLLIN;
  if (bridge.to_backend_offset < bridge.to_backend.size()) events |= POLLOUT;
  if (events == bridge.registered_events) return;
  const int fd = bridge.backend->fd();
  if (bridge.registered_events != 0) ssh_event_remove_fd(event_, fd);
  if (events != 0) ssh_event_add_fd(event_, fd, events, OnFdEvent, &bridge);
  bridge.registered_events = events;
}

void Connection::AuditBridge(const Bridge& bridge) {
  const absl::Time end = absl::Now();
  state_.audit->Write({{"event", "channel"},
                       {"connection", id_},
                       {"channel", bridge.id},
                       {"user", user_},
                       {"workspace", user_},
                       {"source", address_},
                       {"kind", bridge.kind.empty() ? "session" : bridge.kind},
                       {"start", AuditTime(bridge.start)},
                       {"end_time", AuditTime(end)},
                       {"duration_ms", absl::ToInt64Milliseconds(end - bridge.start)},
                       {"bytes_to_workspace", bridge.bytes_to_backend},
                       {"bytes_to_client", bridge.bytes_to_client},
                       {"end", bridge.end_reason}});
}

void Connection::AuditConnection() {
  const absl::Time end = absl::Now();
  nlohmann::json record = {{"event", "connection"},
                           {"connection", id_},
                           {"source", absl::StrCat(address_, ":", port_)},
                           {"user", user_},
                           {"authenticated", authenticated_},
                           {"auth_failures", auth_failures_},
                           {"start", AuditTime(start_)},
                           {"end_time", AuditTime(end)},
                           {"duration_ms", absl::ToInt64Milliseconds(end - start_)},
                           {"channels", channels_},
                           {"bytes_to_workspace", bytes_to_backend_},
                           {"bytes_to_client", bytes_to_client_},
                           {"end", end_reason_}};
  if (authenticated_) {
    record["workspace"] = user_;
    record["auth"] = method_;
    if (!fingerprint_.empty()) record["key_fingerprint"] = fingerprint_;
    if (!token_user_.empty()) record["token_user"] = token_user_;
  }
  state_.audit->Write(record);
}

void Connection::Serve() {
  const Limits& limits = state_.config.limits;
  server_callbacks_.userdata = this;
  server_callbacks_.auth_pubkey_function = OnAuthPubkey;
  server_callbacks_.auth_password_function = OnAuthPassword;
  server_callbacks_.channel_open_request_session_function = OnChannelOpen;
  ssh_callbacks_init(&server_callbacks_);
  ssh_set_server_callbacks(session_, &server_callbacks_);
  ssh_set_message_callback(session_, OnMessage, this);
  if (state_.config.streamlocal) {
    // Per thread in libssh; this thread is this connection's (see OnLibsshLog).
    ssh_set_log_userdata(this);
    ssh_set_log_callback(OnLibsshLog);
    UpdateLogLevel();
  }
  long grace = std::max<long>(1, static_cast<long>(absl::ToInt64Seconds(limits.login_grace)));
  ssh_options_set(session_, SSH_OPTIONS_TIMEOUT, &grace);
  const int socket_fd = ssh_get_fd(session_);
  SetTcpOptions(socket_fd, limits);

  if (int rc = HandleKeyExchange(session_, socket_fd, start_ + limits.login_grace, state_.stopping); rc != SSH_OK) {
    end_reason_ = rc != SSH_AGAIN  ? absl::StrCat("key exchange failed: ", ssh_get_error(session_))
                  : state_.stopping ? "proxy shutdown"
                                    : "key exchange not finished within the login grace time";
  } else {
    int methods = SSH_AUTH_METHOD_PUBLICKEY;
    if (!state_.config.forge_url.empty()) methods |= SSH_AUTH_METHOD_PASSWORD;
    ssh_set_auth_methods(session_, methods);
    event_ = ssh_event_new();
    ssh_event_add_session(event_, session_);
    const absl::Time login_deadline = start_ + limits.login_grace;
    absl::Time next_keepalive = absl::Now() + limits.keepalive_interval;
    while (end_reason_.empty()) {
      if (state_.stopping) {
        end_reason_ = "proxy shutdown";
        break;
      }
      const absl::Time now = absl::Now();
      if (!authenticated_) {
        if (now >= login_deadline) {
          end_reason_ = "login grace time over";
          break;
        }
      } else {
        // By index: reading a channel lets libssh handle packets, and a CHANNEL_OPEN among them
        // appends to bridges_ (each Bridge itself stays put: they are held by pointer).
        for (size_t i = 0; i < bridges_.size(); ++i) Pump(*bridges_[i]);
        // Finished bridges go; their channels are libssh's to free.
        std::erase_if(bridges_, [](const std::unique_ptr<Bridge>& b) { return b->done; });
        if (state_.config.streamlocal) UpdateLogLevel();
        // Open channels without a byte in either direction count as idle too.
        if (now - last_activity_ >= limits.idle_timeout) {
          end_reason_ = "idle timeout";
          break;
        }
        if (now >= next_keepalive) {
          ssh_send_keepalive(session_);
          next_keepalive = now + limits.keepalive_interval;
        }
      }
      if ((ssh_get_status(session_) & (SSH_CLOSED | SSH_CLOSED_ERROR)) != 0 ||
          !ssh_is_connected(session_)) {
        end_reason_ = authenticated_ ? "closed by client" : "closed before authentication";
        break;
      }
      // OpenSSH leaves Nagle on for sessions without a tty, so a gRPC request written in two
      // pieces waits for our ACK of the first; the kernel's delayed ACK made that 40 ms per
      // request. Quick-ack mode does not stick, hence before every wait.
      const int one = 1;
      ::setsockopt(socket_fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
      // Woken by the client's packets (data, window adjustments) and by the backends' fds; the
      // timeout only paces the shutdown, idle and keepalive checks.
      if (ssh_event_dopoll(event_, 250) == SSH_ERROR) {
        end_reason_ = authenticated_ ? "connection lost" : "connection lost before authentication";
        break;
      }
    }
  }
  for (size_t i = 0; i < bridges_.size(); ++i) {
    FinishBridge(*bridges_[i], end_reason_.empty() ? "connection closed" : end_reason_, 255);
  }
  bridges_.clear();
  if (ssh_is_connected(session_)) ssh_disconnect(session_);
  state_.Release(address_, user_, admitted_as_user_);
  AuditConnection();
}

}  // namespace

Server::Server(std::unique_ptr<ServerState> state) : state_(std::move(state)) {}
Server::~Server() = default;

int Server::port() const { return state_->port; }

void Server::Stop() { state_->stopping = true; }

absl::StatusOr<std::unique_ptr<Server>> Server::Create(Config config) {
  auto state = std::make_unique<ServerState>();
  state->config = std::move(config);
  const Config& c = state->config;
  SR_RETURN_IF_ERROR(EnsureHostKey(c.host_key));
  SR_ASSIGN_OR_RETURN(Routing routing, LoadRouting(c.routing));
  state->set_routing(std::make_shared<const Routing>(std::move(routing)));
  SR_ASSIGN_OR_RETURN(state->audit, AuditLog::Open(c.audit_log));
  state->failures = std::make_unique<FailureLimiter>(c.limits.max_auth_failures_per_address,
                                                     c.limits.auth_failure_window);
  state->bind = ssh_bind_new();
  if (state->bind == nullptr) return absl::InternalError("ssh_bind_new failed");
  int port = c.listen_port;
  int verbosity = SSH_LOG_NOLOG;
  ssh_bind_options_set(state->bind, SSH_BIND_OPTIONS_LOG_VERBOSITY, &verbosity);
  if (ssh_bind_options_set(state->bind, SSH_BIND_OPTIONS_BINDADDR, c.listen_address.c_str()) != SSH_OK ||
      ssh_bind_options_set(state->bind, SSH_BIND_OPTIONS_BINDPORT, &port) != SSH_OK ||
      ssh_bind_options_set(state->bind, SSH_BIND_OPTIONS_HOSTKEY, c.host_key.c_str()) != SSH_OK) {
    return absl::InvalidArgumentError(absl::StrCat("ssh_bind options: ", ssh_get_error(state->bind)));
  }
  if (ssh_bind_listen(state->bind) != SSH_OK) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", c.listen_address, ":",
                                               c.listen_port, ": ", ssh_get_error(state->bind)));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  const int fd = ssh_bind_get_fd(state->bind);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    state->port = addr.ss_family == AF_INET6
                      ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                      : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  }
  return std::unique_ptr<Server>(new Server(std::move(state)));
}

namespace {

// What identifies one version of the routing file: a rewrite in place or a rename over it
// changes at least one of these.
struct FileVersion {
  ino_t inode = 0;
  int64_t size = -1;
  int64_t mtime_ns = 0;
  bool operator==(const FileVersion&) const = default;
};

FileVersion VersionOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return {};
  return {st.st_ino, st.st_size, st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec};
}

}  // namespace

absl::Status Server::Run() {
  ServerState& state = *state_;
  const int listen_fd = ssh_bind_get_fd(state.bind);
  FileVersion routing_version = VersionOf(state.config.routing);
  absl::Time next_routing_check = absl::Now() + state.config.routing_poll_interval;
  while (!state.stopping) {
    pollfd pfd{.fd = listen_fd, .events = POLLIN};
    const int ready = ::poll(&pfd, 1, 200);
    if (absl::Now() >= next_routing_check) {
      next_routing_check = absl::Now() + state.config.routing_poll_interval;
      FileVersion version = VersionOf(state.config.routing);
      if (!(version == routing_version)) {
        routing_version = version;
        auto routing = LoadRouting(state.config.routing);
        if (routing.ok()) {
          state.set_routing(std::make_shared<const Routing>(*std::move(routing)));
          SR_LOG(INFO) << "routing reloaded: " << state.routing()->workspaces.size()
                       << " workspaces";
        } else {
          // Open connections and the last good routing stay; the operator sees why.
          SR_LOG(ERROR) << "routing not reloaded, keeping the previous one: " << routing.status();
        }
      }
    }
    if (ready <= 0) continue;
    ssh_session session = ssh_new();
    if (session == nullptr) continue;
    if (ssh_bind_accept(state.bind, session) != SSH_OK) {
      ssh_free(session);
      continue;
    }
    const Peer peer = PeerOf(ssh_get_fd(session));
    const std::string& address = peer.address;
    const int peer_port = peer.port;
    const uint64_t id = state.next_connection_id++;
    std::string refusal;
    if (state.failures->Blocked(address)) {
      refusal = "too many authentication failures from this address";
    } else {
      refusal = state.Admit(address);
    }
    if (!refusal.empty()) {
      // Closed before the key exchange: a flood costs an accept and a close, no thread.
      ssh_free(session);
      state.audit->Write({{"event", "connection"},
                          {"connection", id},
                          {"source", absl::StrCat(address, ":", peer_port)},
                          {"start", AuditTime(absl::Now())},
                          {"authenticated", false},
                          {"end", absl::StrCat("refused: ", refusal)}});
      continue;
    }
    try {
      std::thread([&state, session, address, peer_port, id] {
        {
          Connection connection(state, session, address, peer_port, id);
          connection.Serve();
        }
        state.ThreadDone();
      }).detach();
    } catch (const std::system_error& e) {
      // Out of threads: refuse this connection, keep serving the others.
      SR_LOG(ERROR) << "cannot start a connection thread: " << e.what();
      ssh_free(session);
      state.Release(address, "", /*authenticated=*/false);
      state.ThreadDone();
    }
  }
  // Connections notice `stopping` within one poll interval and say goodbye.
  if (!state.WaitForThreads(absl::Seconds(10))) {
    return absl::DeadlineExceededError("connections still open 10s after shutdown");
  }
  return absl::OkStatus();
}

}  // namespace step_runner::proxy

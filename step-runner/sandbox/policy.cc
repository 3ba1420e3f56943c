#include "step-runner/sandbox/policy.h"

#include <arpa/inet.h>

#include <algorithm>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace step_runner::sandbox {
namespace {

bool IsIpv4(const std::string& host, in_addr* out) { return ::inet_pton(AF_INET, host.c_str(), out) == 1; }

bool IsLoopback(const in_addr& addr) { return (ntohl(addr.s_addr) >> 24) == 127; }

}  // namespace

absl::StatusOr<NetworkMode> ParseNetworkMode(absl::string_view text) {
  if (text == "none") return NetworkMode::kNone;
  if (text == "all") return NetworkMode::kAll;
  if (text == "allow") return NetworkMode::kAllow;
  return absl::InvalidArgumentError(absl::StrCat("--network: expected none, all or allow, got \"", text, "\""));
}

absl::string_view NetworkModeName(NetworkMode mode) {
  switch (mode) {
    case NetworkMode::kNone:
      return "none";
    case NetworkMode::kAll:
      return "all";
    case NetworkMode::kAllow:
      return "allow";
  }
  return "none";
}

absl::StatusOr<HostPort> ParseHostPort(absl::string_view text) {
  size_t colon = text.rfind(':');
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--allow-host \"", text, "\": ", why));
  };
  if (colon == absl::string_view::npos || colon == 0) return bad("expected HOST:PORT");
  uint32_t port = 0;
  if (!absl::SimpleAtoi(text.substr(colon + 1), &port) || port == 0 || port > 65535) {
    return bad("the port must be 1..65535");
  }
  HostPort out{absl::AsciiStrToLower(text.substr(0, colon)), static_cast<uint16_t>(port)};
  in_addr addr;
  if (IsIpv4(out.host, &addr)) {
    if (!IsLoopback(addr)) return bad("IP addresses outside 127.0.0.0/8 cannot be forwarded; give the host's name");
    return out;
  }
  for (char c : out.host) {
    if (!absl::ascii_isalnum(c) && c != '-' && c != '.') return bad("not a host name (IPv6 is not supported)");
  }
  return out;
}

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  uint64_t scale = 1;
  absl::string_view digits = text;
  if (!text.empty()) {
    switch (absl::ascii_toupper(text.back())) {
      case 'K':
        scale = uint64_t{1} << 10;
        break;
      case 'M':
        scale = uint64_t{1} << 20;
        break;
      case 'G':
        scale = uint64_t{1} << 30;
        break;
      case 'T':
        scale = uint64_t{1} << 40;
        break;
      default:
        break;
    }
    if (scale != 1) digits.remove_suffix(1);
  }
  uint64_t n = 0;
  if (!absl::SimpleAtoi(digits, &n) || n > UINT64_MAX / scale) {
    return absl::InvalidArgumentError(absl::StrCat("expected a size in bytes (like 512M or 4G), got \"", text, "\""));
  }
  return n * scale;
}

std::vector<Forward> PlanForwards(const std::vector<HostPort>& allowed) {
  std::vector<Forward> out;
  std::map<std::string, std::string> alias_of;  // host -> its loopback address
  int next = 10;  // 127.0.0.1..9 stay free for what steps bind themselves
  for (const HostPort& hp : allowed) {
    in_addr addr;
    std::string ip;
    if (IsIpv4(hp.host, &addr)) {
      ip = hp.host;
    } else if (auto it = alias_of.find(hp.host); it != alias_of.end()) {
      ip = it->second;
    } else {
      ip = absl::StrCat("127.0.", next / 256, ".", next % 256);
      ++next;
      alias_of[hp.host] = ip;
    }
    out.push_back({ip, hp});
  }
  return out;
}

std::string HostsFile(const std::vector<Forward>& forwards) {
  // The aliases come first: the first line naming a host wins, so an allowed "localhost:PORT"
  // reaches its forward rather than the step's own loopback.
  std::string out;
  std::map<std::string, std::string> seen;
  for (const Forward& f : forwards) {
    if (f.listen_ip == f.target.host || seen.count(f.target.host)) continue;
    seen[f.target.host] = f.listen_ip;
    absl::StrAppend(&out, f.listen_ip, "\t", f.target.host, "\n");
  }
  absl::StrAppend(&out, "127.0.0.1\tlocalhost\n::1\tlocalhost\n");
  return out;
}

bool Within(const std::string& path, const std::string& dir) {
  return path == dir || (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
                         (dir == "/" || path[dir.size()] == '/'));
}

absl::Status CheckWorkTree(const std::string& path) {
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat("the work tree \"", path, "\" is not an absolute path"));
  }
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  // Shared memory is where a tmpfs-only host keeps its state dir; the sandbox's /dev is a fresh
  // one, so a folder under /dev/shm bound into it exposes nothing else of the host's /dev.
  constexpr absl::string_view kSharedMemory = "/dev/shm/";
  if (p.size() > kSharedMemory.size() && absl::StartsWith(p, kSharedMemory) && !absl::StrContains(p, "/..")) {
    return absl::OkStatus();
  }
  for (const char* system : {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root",
                             "/run", "/sbin", "/sys", "/usr", "/var", "/opt", "/home", "/srv"}) {
    const std::string dir = system;
    // The folder itself, or a folder holding it (binding /usr/.. would be binding /).
    if (p == dir || (p.size() > dir.size() && p.compare(0, dir.size(), dir) == 0 && p[dir.size()] == '/' &&
                     (dir == "/usr" || dir == "/etc" || dir == "/bin" || dir == "/sbin" || dir == "/lib" ||
                      dir == "/lib32" || dir == "/lib64" || dir == "/boot" || dir == "/proc" || dir == "/sys" ||
                      dir == "/dev"))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the work tree \"", path, "\" is a system folder; the sandbox would make it writable (give a job its own folder)"));
    }
  }
  return absl::OkStatus();
}

namespace {

// Every sandbox starts like this: the system read-only, fresh kernel views, a private /tmp,
// its own PID, IPC and UTS namespaces.
std::vector<std::string> FixedPart(const std::string& bwrap) {
  return {bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
          // Kernel settings read-only: a step of a root daemon is uid 0 (without capabilities),
          // and uid 0 may write global sysctls (kernel.core_pattern runs a program as host root).
          // bwrap covers these only for callers that are not root. The bind's source is the
          // host's /proc, but /proc/sys/net shows the reader's own network namespace.
          "--ro-bind", "/proc/sys", "/proc/sys", "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
          "--tmpfs", "/tmp",
          "--unshare-pid", "--unshare-ipc", "--unshare-uts",
          // Every process of the step dies with it: if the helper goes, so does the
          // namespace's init and with it every process inside.
          "--die-with-parent",
          // No terminal to push input into (TIOCSTI) even if one leaks in. Signals still reach
          // the step: the helper forwards them by pid.
          "--new-session"};
}

}  // namespace

std::vector<MountOp> ViewMounts(const StepView& view) {
  std::vector<MountOp> ops;
  // A hidden path inside the work tree must be hidden after the tree is bound (else the bind
  // brings it back); one that holds the tree (the state dir holds the default work trees) must
  // be hidden before.
  auto inside_tree = [&](const std::string& path) {
    return !view.work_tree.empty() && path != view.work_tree && Within(path, view.work_tree);
  };
  auto hide = [&](bool after_tree) {
    for (const HiddenPath& h : view.hidden) {
      if (inside_tree(h.path) != after_tree) continue;
      // Under the fresh /tmp, /dev and /proc it is already gone (bwrap would only create an
      // empty mount point).
      bool fresh = false;
      for (const char* dir : {"/tmp", "/dev", "/proc"}) {
        fresh = fresh || h.path == dir || h.path.rfind(absl::StrCat(dir, "/"), 0) == 0;
      }
      // ...unless a tool folder brought it back.
      for (const std::string& tools : view.tool_binds) {
        fresh = fresh && !(h.path == tools || h.path.rfind(tools + "/", 0) == 0);
      }
      if (!after_tree && fresh) continue;
      ops.push_back({h.is_dir ? MountOp::kTmpfs : MountOp::kHideFile, "", h.path});
    }
  };
  for (const std::string& path : view.tool_binds) ops.push_back({MountOp::kReadOnlyBind, path, path});
  hide(false);
  if (!view.hosts_file.empty()) ops.push_back({MountOp::kReadOnlyBind, view.hosts_file, "/etc/hosts"});
  if (!view.work_tree.empty()) ops.push_back({MountOp::kBind, view.work_tree, view.work_tree});
  hide(true);
  for (const std::string& path : view.readonly_binds) ops.push_back({MountOp::kReadOnlyBind, path, path});
  for (const std::string& path : view.writable_binds) ops.push_back({MountOp::kBind, path, path});
  return ops;
}

std::vector<std::string> BwrapMountArgs(const MountOp& op) {
  switch (op.kind) {
    case MountOp::kReadOnlyBind:
      return {"--ro-bind", op.source, op.target};
    case MountOp::kBind:
      return {"--bind", op.source, op.target};
    case MountOp::kTmpfs:
      return {"--tmpfs", op.target};
    case MountOp::kHideFile:
      return {"--ro-bind", "/dev/null", op.target};
  }
  return {};
}

std::vector<std::string> BwrapArgv(const std::string& bwrap, const StepView& view) {
  std::vector<std::string> a = FixedPart(bwrap);
  // A step that is root outside would keep every capability (bwrap drops them only for
  // unprivileged callers), and with CAP_SYS_ADMIN could simply remount / read-write.
  if (view.drop_capabilities) {
    a.insert(a.end(), {"--cap-drop", "ALL"});
  }
  if (view.network == NetworkMode::kNone) a.push_back("--unshare-net");
  // kAllow: the helper already put this process in a namespace with only loopback and the
  // forwards; bwrap stays in it. kAll: the host's network.
  for (const MountOp& op : ViewMounts(view)) {
    std::vector<std::string> args = BwrapMountArgs(op);
    a.insert(a.end(), args.begin(), args.end());
  }
  if (!view.cwd.empty()) a.insert(a.end(), {"--chdir", view.cwd});
  a.push_back("--");
  a.insert(a.end(), view.argv.begin(), view.argv.end());
  return a;
}

std::vector<std::string> WarmBwrapArgv(const std::string& bwrap, const std::string& helper, uid_t uid, gid_t gid,
                                       const std::vector<MountOp>& premounted) {
  std::vector<std::string> a = FixedPart(bwrap);
  a.push_back("--unshare-net");
  // Hiding the daemon's own folders is the same for every step: done now, it is off the step's
  // way in (each tmpfs is a new superblock; the stub would mount it when the step is known).
  for (const MountOp& op : premounted) {
    std::vector<std::string> args = BwrapMountArgs(op);
    a.insert(a.end(), args.begin(), args.end());
  }
  // The host's root, writable, for the stub to bind the step's tree from (the hiding above is
  // in the sandbox's view, not in this bind); the stub detaches it before the step runs.
  a.insert(a.end(), {"--bind", "/", kWarmHostRoot});
  std::vector<std::string> stub = {absl::StrCat(kWarmHostRoot, helper), "--stub", "3", "--report", "4"};
  if (uid != 0) {
    // The stub mounts, so it needs CAP_SYS_ADMIN in the user namespace that owns the mount
    // namespace: uid 0 in it (bwrap's usual second namespace for the caller's uid would own
    // nothing). The stub then makes that second namespace itself, mapping the caller's uid
    // back, and drops every capability before the step runs.
    // CAP_SETFCAP: the kernel lets a namespace map its parent's uid 0 (the stub's, here) only
    // for a creator that holds it (bwrap holds every capability when it does the same).
    a.insert(a.end(), {"--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "CAP_SYS_ADMIN", "--cap-add",
                       "CAP_SETPCAP", "--cap-add", "CAP_SETFCAP"});
    stub.insert(stub.end(), {"--as-uid", absl::StrCat(uid), "--as-gid", absl::StrCat(gid)});
  }
  // As root, bwrap keeps every capability; the stub drops them all before the step runs.
  a.push_back("--");
  a.insert(a.end(), stub.begin(), stub.end());
  return a;
}

std::optional<std::vector<MountOp>> MountsLeftForStub(const StepView& view, const std::vector<MountOp>& premounted) {
  const std::vector<MountOp> all = ViewMounts(view);
  // Whether all[i] is left out: bwrap made it, and the tree's bind does not bring it back.
  std::vector<bool> premade(all.size());
  std::vector<MountOp> left;
  for (size_t i = 0; i < all.size(); ++i) {
    premade[i] = std::find(premounted.begin(), premounted.end(), all[i]) != premounted.end() &&
                 (view.work_tree.empty() || !Within(all[i].target, view.work_tree));
    if (!premade[i]) left.push_back(all[i]);
  }
  // What the stub mounts lands on top of what bwrap made; in ViewMounts' order it may have come
  // first, and been covered by it.
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t earlier = 0; premade[i] && earlier < i; ++earlier) {
      if (!premade[earlier] && Within(all[earlier].target, all[i].target)) return std::nullopt;
    }
  }
  return left;
}

}  // namespace step_runner::sandbox

#include "proxy/config.h"

#include <arpa/inet.h>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::proxy {
namespace {

// yaml-cpp reports problems by throwing; everything that reads a node goes through these so that
// no exception leaves this file. (Both files are written by the operator, not by clients: the
// libyaml pre-check that guards step files is not needed here.)
absl::Status Invalid(absl::string_view file, const YAML::Node& node, absl::string_view what) {
  const YAML::Mark mark = node.Mark();
  if (mark.is_null()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", what));
  return absl::InvalidArgumentError(
      absl::StrCat(file, ":", mark.line + 1, ":", mark.column + 1, ": ", what));
}

absl::Status CheckKeys(absl::string_view file, const YAML::Node& map,
                       const std::set<std::string>& allowed) {
  if (!map.IsMap()) return Invalid(file, map, "expected a mapping");
  for (const auto& entry : map) {
    const std::string key = entry.first.Scalar();
    if (!allowed.count(key)) {
      return Invalid(file, entry.first,
                     absl::StrCat("unknown key \"", key, "\" (expected one of: ",
                                  absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> String(absl::string_view file, const YAML::Node& node,
                                   absl::string_view name) {
  if (!node.IsScalar()) return Invalid(file, node, absl::StrCat(name, ": expected a string"));
  return node.Scalar();
}

absl::StatusOr<bool> Boolean(absl::string_view file, const YAML::Node& node, absl::string_view name) {
  if (node.IsScalar() && (node.Scalar() == "true" || node.Scalar() == "false")) return node.Scalar() == "true";
  return Invalid(file, node, absl::StrCat(name, ": expected true or false"));
}

absl::StatusOr<int64_t> Integer(absl::string_view file, const YAML::Node& node,
                                absl::string_view name, int64_t min) {
  int64_t value;
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), &value) || value < min) {
    return Invalid(file, node, absl::StrCat(name, ": expected an integer >= ", min));
  }
  return value;
}

// "256KiB", "1MiB" or a plain number of bytes.
absl::StatusOr<int64_t> Bytes(absl::string_view file, const YAML::Node& node,
                              absl::string_view name) {
  if (!node.IsScalar()) return Invalid(file, node, absl::StrCat(name, ": expected a size"));
  absl::string_view text = node.Scalar();
  int64_t unit = 1;
  for (auto [suffix, factor] : {std::pair<absl::string_view, int64_t>{"KiB", 1 << 10},
                                {"MiB", 1 << 20}, {"GiB", int64_t{1} << 30}}) {
    if (absl::ConsumeSuffix(&text, suffix)) {
      unit = factor;
      break;  // one unit: "1MiBKiB" is no size
    }
  }
  int64_t value;
  if (!absl::SimpleAtoi(text, &value) || value <= 0) {
    return Invalid(file, node, absl::StrCat(name, ": expected a size such as 256KiB"));
  }
  // Past 1 GiB a buffer is a mistake (and past 8 EiB the product wraps, to a negative size).
  constexpr int64_t kMaxBytes = int64_t{1} << 30;
  if (value > kMaxBytes / unit) return Invalid(file, node, absl::StrCat(name, ": at most 1GiB"));
  return value * unit;
}

absl::StatusOr<absl::Duration> Duration(absl::string_view file, const YAML::Node& node,
                                        absl::string_view name) {
  absl::Duration d;
  if (!node.IsScalar() || !absl::ParseDuration(node.Scalar(), &d) || d <= absl::ZeroDuration()) {
    return Invalid(file, node, absl::StrCat(name, ": expected a positive duration such as 30s"));
  }
  return d;
}

std::string Resolve(const std::string& base_dir, const std::string& path) {
  if (path.empty() || path[0] == '/' || base_dir.empty()) return path;
  return absl::StrCat(base_dir, absl::EndsWith(base_dir, "/") ? "" : "/", path);
}

absl::Status ParseLimits(const YAML::Node& node, Limits& limits) {
  constexpr absl::string_view kFile = "config";
  SR_RETURN_IF_ERROR(CheckKeys(kFile, node,
                               {"max_auth_tries", "max_auth_failures_per_address",
                                "auth_failure_window", "login_grace", "max_connections",
                                "max_unauthenticated_per_address", "max_connections_per_user",
                                "max_channels_per_connection", "idle_timeout",
                                "keepalive_interval", "keepalive_count", "channel_buffer"}));
  struct IntField {
    const char* name;
    int* field;
  };
  for (IntField f : {IntField{"max_auth_tries", &limits.max_auth_tries},
                     IntField{"max_auth_failures_per_address", &limits.max_auth_failures_per_address},
                     IntField{"max_connections", &limits.max_connections},
                     IntField{"max_unauthenticated_per_address",
                              &limits.max_unauthenticated_per_address},
                     IntField{"max_connections_per_user", &limits.max_connections_per_user},
                     IntField{"max_channels_per_connection", &limits.max_channels_per_connection},
                     IntField{"keepalive_count", &limits.keepalive_count}}) {
    if (node[f.name]) {
      SR_ASSIGN_OR_RETURN(int64_t v, Integer(kFile, node[f.name], f.name, 1));
      *f.field = static_cast<int>(std::min<int64_t>(v, 1 << 30));
    }
  }
  struct DurationField {
    const char* name;
    absl::Duration* field;
  };
  for (DurationField f : {DurationField{"auth_failure_window", &limits.auth_failure_window},
                          DurationField{"login_grace", &limits.login_grace},
                          DurationField{"idle_timeout", &limits.idle_timeout},
                          DurationField{"keepalive_interval", &limits.keepalive_interval}}) {
    if (node[f.name]) {
      SR_ASSIGN_OR_RETURN(*f.field, Duration(kFile, node[f.name], f.name));
    }
  }
  if (node["channel_buffer"]) {
    SR_ASSIGN_OR_RETURN(limits.channel_buffer,
                        Bytes(kFile, node["channel_buffer"], "channel_buffer"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Config> ParseConfigNode(const YAML::Node& root, const std::string& base_dir) {
  constexpr absl::string_view kFile = "config";
  Config config;
  SR_RETURN_IF_ERROR(CheckKeys(kFile, root,
                               {"listen", "host_key", "routing", "routing_poll_interval",
                                "audit_log", "forge", "limits", "streamlocal"}));
  if (const YAML::Node listen = root["listen"]) {
    SR_RETURN_IF_ERROR(CheckKeys(kFile, listen, {"address", "port"}));
    if (listen["address"]) {
      SR_ASSIGN_OR_RETURN(config.listen_address, String(kFile, listen["address"], "address"));
    }
    if (listen["port"]) {
      SR_ASSIGN_OR_RETURN(int64_t port, Integer(kFile, listen["port"], "port", 0));
      if (port > 65535) return Invalid(kFile, listen["port"], "port: at most 65535");
      config.listen_port = static_cast<int>(port);
    }
  }
  if (!root["host_key"]) return absl::InvalidArgumentError("config: host_key is required");
  SR_ASSIGN_OR_RETURN(config.host_key, String(kFile, root["host_key"], "host_key"));
  config.host_key = Resolve(base_dir, config.host_key);
  if (!root["routing"]) return absl::InvalidArgumentError("config: routing is required");
  SR_ASSIGN_OR_RETURN(config.routing, String(kFile, root["routing"], "routing"));
  config.routing = Resolve(base_dir, config.routing);
  if (root["routing_poll_interval"]) {
    SR_ASSIGN_OR_RETURN(config.routing_poll_interval,
                        Duration(kFile, root["routing_poll_interval"], "routing_poll_interval"));
  }
  if (root["audit_log"]) {
    SR_ASSIGN_OR_RETURN(config.audit_log, String(kFile, root["audit_log"], "audit_log"));
    config.audit_log = Resolve(base_dir, config.audit_log);
  }
  if (const YAML::Node forge = root["forge"]) {
    SR_RETURN_IF_ERROR(CheckKeys(kFile, forge, {"url", "timeout"}));
    if (!forge["url"]) return Invalid(kFile, forge, "forge: url is required");
    SR_ASSIGN_OR_RETURN(config.forge_url, String(kFile, forge["url"], "url"));
    if (!absl::StartsWith(config.forge_url, "http://") &&
        !absl::StartsWith(config.forge_url, "https://")) {
      return Invalid(kFile, forge["url"], "forge url: expected http:// or https://");
    }
    absl::string_view authority = absl::string_view(config.forge_url).substr(config.forge_url.find("//") + 2);
    authority = authority.substr(0, authority.find_first_of("/?#"));
    // "http://localhost:x@other-host" goes to other-host: a URL with credentials is refused
    // outright (they would sit in the config in clear, and they hide where the URL points).
    if (absl::StrContains(authority, "@")) {
      return Invalid(kFile, forge["url"], "forge url: no user or password in the URL (the proxy sends each user's own token)");
    }
    if (absl::StartsWith(config.forge_url, "http://")) {
      // Users' tokens are checked against the forge: over plain HTTP only to this host.
      absl::string_view host = authority;
      if (absl::StartsWith(host, "[")) {
        host = host.substr(0, host.find(']') + 1);
      } else {
        host = host.substr(0, host.find(':'));
      }
      in_addr ipv4{};
      const bool loopback_ipv4 = ::inet_pton(AF_INET, std::string(host).c_str(), &ipv4) == 1 &&
                                 (ntohl(ipv4.s_addr) >> 24) == 127;
      if (host != "localhost" && host != "[::1]" && !loopback_ipv4) {
        return Invalid(kFile, forge["url"],
                       "forge url: http:// would send users' tokens in clear; use https:// (http:// is for a "
                       "forge on this host only: 127.0.0.1, localhost, [::1])");
      }
    }
    while (absl::EndsWith(config.forge_url, "/")) config.forge_url.pop_back();
    if (forge["timeout"]) {
      SR_ASSIGN_OR_RETURN(config.forge_timeout, Duration(kFile, forge["timeout"], "timeout"));
    }
  }
  if (const YAML::Node limits = root["limits"]) {
    SR_RETURN_IF_ERROR(ParseLimits(limits, config.limits));
  }
  if (root["streamlocal"]) {
    SR_ASSIGN_OR_RETURN(config.streamlocal, Boolean(kFile, root["streamlocal"], "streamlocal"));
  }
  return config;
}

absl::StatusOr<Workspace> ParseWorkspace(const std::string& name, const YAML::Node& node) {
  constexpr absl::string_view kFile = "routing";
  Workspace ws;
  ws.name = name;
  SR_RETURN_IF_ERROR(CheckKeys(kFile, node, {"owner", "authorized_keys", "vars", "backend"}));
  if (node["owner"]) {
    SR_ASSIGN_OR_RETURN(ws.owner, String(kFile, node["owner"], "owner"));
  }
  if (const YAML::Node keys = node["authorized_keys"]) {
    // A sequence of lines, or one block of authorized_keys text.
    std::vector<std::string> lines;
    if (keys.IsSequence()) {
      for (const auto& key : keys) {
        SR_ASSIGN_OR_RETURN(std::string line, String(kFile, key, "authorized_keys"));
        lines.push_back(line);
      }
    } else {
      SR_ASSIGN_OR_RETURN(std::string text, String(kFile, keys, "authorized_keys"));
      for (absl::string_view line : absl::StrSplit(text, '\n')) lines.emplace_back(line);
    }
    for (std::string& line : lines) {
      absl::string_view trimmed = absl::StripAsciiWhitespace(line);
      if (trimmed.empty() || trimmed[0] == '#') continue;
      ws.authorized_keys.emplace_back(trimmed);
    }
  }
  if (const YAML::Node vars = node["vars"]) {
    if (!vars.IsMap()) return Invalid(kFile, vars, "vars: expected a mapping");
    for (const auto& entry : vars) {
      SR_ASSIGN_OR_RETURN(ws.vars[entry.first.Scalar()], String(kFile, entry.second, "vars"));
    }
  }
  const YAML::Node backend = node["backend"];
  if (!backend) return Invalid(kFile, node, absl::StrCat(name, ": backend is required"));
  SR_RETURN_IF_ERROR(CheckKeys(kFile, backend, {"socket", "command"}));
  if (backend["socket"].IsDefined() == backend["command"].IsDefined()) {
    return Invalid(kFile, backend, absl::StrCat(name, ": backend needs socket or command (one)"));
  }
  if (backend["socket"]) {
    SR_ASSIGN_OR_RETURN(ws.backend.socket, String(kFile, backend["socket"], "socket"));
  } else {
    SR_ASSIGN_OR_RETURN(std::string command, String(kFile, backend["command"], "command"));
    auto words = SplitCommand(command);
    if (!words.ok()) return Invalid(kFile, backend["command"], words.status().message());
    ws.backend.command = *std::move(words);
    // Checked now, so that a typo in a placeholder is reported on load, not on first connect.
    auto expanded = ExpandCommand(ws);
    if (!expanded.ok()) return Invalid(kFile, backend["command"], expanded.status().message());
  }
  return ws;
}

}  // namespace

absl::StatusOr<Config> ParseConfig(absl::string_view yaml, const std::string& base_dir) {
  try {
    return ParseConfigNode(YAML::Load(std::string(yaml)), base_dir);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", e.what()));
  }
}

absl::StatusOr<Config> LoadConfig(const std::string& path) {
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  const size_t slash = path.rfind('/');
  auto config = ParseConfig(text, slash == std::string::npos ? "." : path.substr(0, slash));
  if (!config.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", config.status().message()));
  return config;
}

const Workspace* Routing::Find(absl::string_view name) const {
  auto it = workspaces.find(name);
  return it == workspaces.end() ? nullptr : &it->second;
}

absl::StatusOr<Routing> ParseRouting(absl::string_view yaml) {
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    SR_RETURN_IF_ERROR(CheckKeys("routing", root, {"workspaces"}));
    Routing routing;
    const YAML::Node workspaces = root["workspaces"];
    if (!workspaces || workspaces.IsNull()) return routing;
    if (!workspaces.IsMap()) return Invalid("routing", workspaces, "workspaces: expected a mapping");
    for (const auto& entry : workspaces) {
      const std::string name = entry.first.Scalar();
      if (!ValidWorkspaceName(name)) {
        return Invalid("routing", entry.first,
                       absl::StrCat("invalid workspace name \"", name,
                                    "\" (letters, digits, '.', '_', '-'; at most 64)"));
      }
      // Later entries used to lose silently: an operator appending an updated block got no effect.
      if (routing.workspaces.count(name)) {
        return Invalid("routing", entry.first, absl::StrCat("workspace \"", name, "\" is defined twice"));
      }
      SR_ASSIGN_OR_RETURN(Workspace ws, ParseWorkspace(name, entry.second));
      routing.workspaces.emplace(name, std::move(ws));
    }
    return routing;
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("routing: ", e.what()));
  }
}

absl::StatusOr<Routing> LoadRouting(const std::string& path) {
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto routing = ParseRouting(text);
  if (!routing.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", routing.status().message()));
  // A relative socket is relative to the routing file, as the config's paths are to the config.
  const size_t slash = path.rfind('/');
  const std::string base_dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  for (auto& [name, ws] : routing->workspaces) {
    if (!ws.backend.socket.empty()) ws.backend.socket = Resolve(base_dir, ws.backend.socket);
  }
  return routing;
}

absl::StatusOr<std::vector<std::string>> SplitCommand(absl::string_view command) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  for (size_t i = 0; i < command.size(); ++i) {
    const char c = command[i];
    if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) words.push_back(std::exchange(word, ""));
      in_word = false;
    } else if (c == '\'') {
      const size_t end = command.find('\'', i + 1);
      if (end == absl::string_view::npos) return absl::InvalidArgumentError("unterminated ' in command");
      absl::StrAppend(&word, command.substr(i + 1, end - i - 1));
      in_word = true;
      i = end;
    } else if (c == '"') {
      in_word = true;
      for (++i;; ++i) {
        if (i >= command.size()) return absl::InvalidArgumentError("unterminated \" in command");
        if (command[i] == '"') break;
        if (command[i] == '\\' && i + 1 < command.size() &&
            absl::string_view("\"\\$`").find(command[i + 1]) != absl::string_view::npos) {
          ++i;
        }
        word += command[i];
      }
    } else if (c == '\\') {
      if (i + 1 >= command.size()) return absl::InvalidArgumentError("trailing \\ in command");
      word += command[++i];
      in_word = true;
    } else if (absl::string_view("|&;<>()$`*?[]#~").find(c) != absl::string_view::npos) {
      // No shell runs the template: these would silently mean something else than intended.
      return absl::InvalidArgumentError(absl::StrCat(
          "command: '", std::string(1, c),
          "' needs a shell; quote it, or write the shell explicitly (sh -c '...')"));
    } else {
      word += c;
      in_word = true;
    }
  }
  if (in_word) words.push_back(std::move(word));
  if (words.empty()) return absl::InvalidArgumentError("command is empty");
  return words;
}

absl::StatusOr<std::vector<std::string>> ExpandCommand(const Workspace& workspace) {
  std::vector<std::string> argv;
  for (const std::string& word : workspace.backend.command) {
    std::string out;
    for (size_t i = 0; i < word.size(); ++i) {
      if (word[i] != '{') {
        out += word[i];
        continue;
      }
      const size_t end = word.find('}', i);
      if (end == std::string::npos) return absl::InvalidArgumentError("command: unterminated {");
      const std::string name = word.substr(i + 1, end - i - 1);
      if (name == "workspace") {
        out += workspace.name;
      } else if (name == "owner") {
        out += workspace.owner;
      } else if (auto it = workspace.vars.find(name); it != workspace.vars.end()) {
        out += it->second;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "command: unknown placeholder {", name, "} (known: {workspace}, {owner}, vars)"));
      }
      i = end;
    }
    argv.push_back(std::move(out));
  }
  return argv;
}

bool ValidWorkspaceName(absl::string_view name) {
  if (name.empty() || name.size() > 64 || name[0] == '-' || name[0] == '.') return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

}  // namespace step_runner::proxy

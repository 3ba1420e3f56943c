#include "tests/forge/forge_fixture.h"

#include <fcntl.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "tests/forge/forge_server.h"

extern char** environ;

namespace step_runner::testing {

std::string ForgeBinary() { return SR_BINARY_DIR "/tests/forge/sr-forge"; }
std::string CatalogBinaryDir() { return SR_BINARY_DIR "/steps-catalog/helper"; }
std::string CatalogBinary() { return CatalogBinaryDir() + "/sr-catalog"; }

absl::StatusOr<std::unique_ptr<Forge>> Forge::Start(const std::string& state_dir, std::vector<std::string> env,
                                                    absl::Duration deadline) {
  std::unique_ptr<Forge> forge(new Forge());
  forge->token_ = forge::kDefaultToken;
  forge->model_key_ = forge::kDefaultModelKey;
  std::vector<std::string> full_env;
  for (char** e = environ; *e != nullptr; ++e) full_env.push_back(*e);
  for (const std::string& kv : env) {
    if (absl::StartsWith(kv, "SR_FORGE_TOKEN=")) forge->token_ = kv.substr(strlen("SR_FORGE_TOKEN="));
    if (absl::StartsWith(kv, "SR_MODEL_KEY=")) forge->model_key_ = kv.substr(strlen("SR_MODEL_KEY="));
    full_env.push_back(kv);
  }
  // getenv returns the first match, so the overrides go in front of the inherited environment.
  std::rotate(full_env.begin(), full_env.end() - static_cast<long>(env.size()), full_env.end());
  SR_RETURN_IF_ERROR(MakeDirs(state_dir, 0700));
  const std::string ready = state_dir + ".ready";
  ::unlink(ready.c_str());
  forge->log_path_ = state_dir + ".log";
  UniqueFd log(::open(forge->log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  if (!log) return ErrnoStatus(errno, "open(forge log)");
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = {ForgeBinary(), "--state-dir", state_dir, "--ready-file", ready},
                                                  .env = full_env,
                                                  .stdout_fd = log.get(),
                                                  .stderr_fd = log.get()}));
  forge->child_.emplace(std::move(child));
  const absl::Time until = absl::Now() + deadline;
  while (absl::Now() < until) {
    if (auto url = ReadFile(ready); url.ok() && !url->empty()) {
      forge->url_ = std::string(absl::StripTrailingAsciiWhitespace(*url));
      return forge;
    }
    pollfd pfd{.fd = forge->child_->pidfd(), .events = POLLIN};
    if (::poll(&pfd, 1, 10) > 0) {
      (void)forge->child_->Reap();
      forge->child_.reset();
      return absl::InternalError(absl::StrCat("sr-forge exited at start: ", forge->log()));
    }
  }
  return absl::DeadlineExceededError(absl::StrCat("sr-forge did not become ready: ", forge->log()));
}

Forge::~Forge() { (void)Stop(); }

absl::Status Forge::Stop() {
  if (!child_) return absl::OkStatus();
  (void)child_->SignalGroup(SIGTERM);
  pollfd pfd{.fd = child_->pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, 10000) <= 0) (void)child_->SignalGroup(SIGKILL);
  absl::StatusOr<int> code = child_->Reap();
  child_.reset();
  if (!code.ok()) return code.status();
  if (*code != 0) return absl::InternalError(absl::StrCat("sr-forge exited with ", *code, ": ", log()));
  return absl::OkStatus();
}

std::string Forge::log() const { return ReadFile(log_path_).value_or(""); }

absl::StatusOr<nlohmann::json> Forge::Api(const std::string& method, const std::string& path,
                                          const nlohmann::json& body) const {
  httplib::Client client(url_);
  client.set_connection_timeout(10, 0);
  client.set_read_timeout(30, 0);
  httplib::Headers headers = {{"PRIVATE-TOKEN", token_}};
  std::string payload = body.is_null() ? "" : body.dump();
  if (method != "GET" && method != "POST" && method != "PUT") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported method ", method));
  }
  httplib::Result result = method == "GET"    ? client.Get(path.c_str(), headers)
                           : method == "POST" ? client.Post(path.c_str(), headers, payload, "application/json")
                                              : client.Put(path.c_str(), headers, payload, "application/json");
  if (!result) return absl::UnavailableError(absl::StrCat(method, " ", path, ": ", httplib::to_string(result.error())));
  if (result->status < 200 || result->status >= 300) {
    return absl::FailedPreconditionError(absl::StrCat(method, " ", path, ": HTTP ", result->status, ": ", result->body));
  }
  nlohmann::json parsed = nlohmann::json::parse(result->body, nullptr, false);
  if (parsed.is_discarded()) return absl::InternalError(absl::StrCat(method, " ", path, ": not JSON: ", result->body));
  return parsed;
}

absl::Status Forge::SetModelMode(int iid, const std::string& mode) const {
  return Api("PUT", absl::StrCat("/-/model/mode?iid=", iid, "&mode=", mode)).status();
}

}  // namespace step_runner::testing

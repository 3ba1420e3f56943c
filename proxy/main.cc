// workspace-proxy --config FILE [--ready-file PATH] [--log-level info|warning|error]
//
// The SSH front door to many workspaces' step-runners (see proxy/README.md).
#include <curl/curl.h>
#include <signal.h>

#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"

namespace {

constexpr char kUsage[] =
    "usage: workspace-proxy --config FILE [--ready-file PATH] [--log-level info|warning|error]\n";

int Fail(const std::string& message) {
  std::cerr << "workspace-proxy: " << message << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace step_runner;
  std::string config_path, ready_file, log_level = "warning";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) return false;
      out = argv[++i];
      return true;
    };
    bool ok = true;
    if (arg == "--config") ok = value(config_path);
    else if (arg == "--ready-file") ok = value(ready_file);
    else if (arg == "--log-level") ok = value(log_level);
    else if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    } else ok = false;
    if (!ok) {
      std::cerr << kUsage;
      return 2;
    }
  }
  if (config_path.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  if (log_level == "info") internal::SetMinLogSeverity(internal::Severity::kInfo);
  else if (log_level == "warning") internal::SetMinLogSeverity(internal::Severity::kWarning);
  else if (log_level == "error") internal::SetMinLogSeverity(internal::Severity::kError);
  else return Fail("--log-level: expected info, warning or error");

  // Signals are taken by one thread with sigwait; every other thread (libssh's included) keeps
  // them blocked. A write to a closed socket is an error return, not a death.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  curl_global_init(CURL_GLOBAL_DEFAULT);

  auto config = proxy::LoadConfig(config_path);
  if (!config.ok()) return Fail(std::string(config.status().message()));
  auto server = proxy::Server::Create(*std::move(config));
  if (!server.ok()) return Fail(server.status().ToString());

  std::thread signal_waiter([&] {
    int signo = 0;
    sigwait(&signals, &signo);
    (*server)->Stop();
  });
  signal_waiter.detach();

  const std::string ready = absl::StrCat("workspace-proxy listening on port ", (*server)->port());
  if (!ready_file.empty()) {
    if (absl::Status s = WriteFileAtomically(ready_file, absl::StrCat((*server)->port(), "\n"), 0644);
        !s.ok()) {
      return Fail(s.ToString());
    }
  }
  std::cerr << ready << std::endl;
  absl::Status s = (*server)->Run();
  if (!s.ok()) return Fail(s.ToString());
  return 0;
}

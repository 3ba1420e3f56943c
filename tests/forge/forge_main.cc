// sr-forge: a local forge for tests and the demo.
//
//   sr-forge --state-dir DIR [--port 0] [--ready-file FILE] [--fixtures-dir DIR]
//            [--model-sleep-seconds N] [--model-latency-ms N]
//
// - Binds 127.0.0.1 only (an ephemeral port by default), then prints "sr-forge listening on URL"
//   on stdout and writes URL to --ready-file (atomically), so a starter can wait for either.
// - Seeds DIR on first start: project demo/calculator (a git repository with a test suite),
//   three issues, user `agent`. A restart keeps what DIR holds.
// - The API token is SR_FORGE_TOKEN, the model key SR_MODEL_KEY (fixed demo defaults otherwise);
//   both are read from the environment so they never show in `ps`.
// - SIGTERM/SIGINT stop it cleanly (exit 0).
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "step-runner/base/files.h"
#include "tests/forge/forge_server.h"

namespace {

int Usage(const std::string& problem) {
  std::cerr << "sr-forge: " << problem << "\n"
            << "usage: sr-forge --state-dir DIR [--port N] [--ready-file FILE] [--fixtures-dir DIR]"
               " [--model-sleep-seconds N] [--model-latency-ms N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  step_runner::forge::ForgeOptions options;
  options.fixtures_dir = SR_SOURCE_DIR "/tests/forge/fixtures";
  std::string ready_file;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) return Usage("missing value for " + flag);
    std::string value = argv[++i];
    if (flag == "--state-dir") {
      options.state_dir = value;
    } else if (flag == "--port") {
      if (!absl::SimpleAtoi(value, &options.port)) return Usage("bad --port");
    } else if (flag == "--ready-file") {
      ready_file = value;
    } else if (flag == "--fixtures-dir") {
      options.fixtures_dir = value;
    } else if (flag == "--model-sleep-seconds") {
      if (!absl::SimpleAtoi(value, &options.model_sleep_seconds)) return Usage("bad --model-sleep-seconds");
    } else if (flag == "--model-latency-ms") {
      if (!absl::SimpleAtoi(value, &options.model_latency_ms) || options.model_latency_ms < 0) {
        return Usage("bad --model-latency-ms");
      }
    } else {
      return Usage("unknown flag " + flag);
    }
  }
  if (options.state_dir.empty()) return Usage("--state-dir is required");
  if (const char* token = std::getenv("SR_FORGE_TOKEN"); token != nullptr && *token != '\0') options.token = token;
  if (const char* key = std::getenv("SR_MODEL_KEY"); key != nullptr && *key != '\0') options.model_key = key;

  // Block the stop signals before any thread exists, so only the waiter below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A client that hangs up mid-response must not kill the forge.
  signal(SIGPIPE, SIG_IGN);

  auto forge = step_runner::forge::ForgeServer::Create(options);
  if (!forge.ok()) {
    std::cerr << "sr-forge: " << forge.status() << "\n";
    return 1;
  }
  auto url = (*forge)->Bind();
  if (!url.ok()) {
    std::cerr << "sr-forge: " << url.status() << "\n";
    return 1;
  }
  if (!ready_file.empty()) {
    if (auto s = step_runner::WriteFileAtomically(ready_file, *url + "\n", 0644); !s.ok()) {
      std::cerr << "sr-forge: " << s << "\n";
      return 1;
    }
  }
  std::cout << "sr-forge listening on " << *url << std::endl;

  std::thread waiter([&] {
    int signo = 0;
    sigwait(&stop_signals, &signo);
    (*forge)->Stop();
  });
  absl::Status served = (*forge)->Serve();
  // Serve() also returns when the server fails; wake the waiter so it can be joined.
  if (!served.ok()) std::cerr << "sr-forge: " << served << "\n";
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  return served.ok() ? 0 : 1;
}

#ifndef STEP_RUNNER_TESTS_FORGE_FORGE_SERVER_H_
#define STEP_RUNNER_TESTS_FORGE_FORGE_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace step_runner::forge {

inline constexpr char kDefaultToken[] = "sr-demo-token-agent";
inline constexpr char kDefaultModelKey[] = "sr-demo-model-key";

struct ForgeOptions {
  std::string state_dir;     // state.json and repos/; seeded when state.json is missing
  std::string fixtures_dir;  // tests/forge/fixtures
  std::string token = kDefaultToken;         // the user `agent`'s token
  std::string model_key = kDefaultModelKey;  // the chat-completions API key
  int model_sleep_seconds = 30;              // how long mode `sleep` stalls
  // How long every completion takes before it answers, like a real model's latency (the demo
  // uses it so that the job is still running when it kills its client); 0 for none.
  int model_latency_ms = 0;
  int port = 0;                              // 0: ephemeral
};

// A small GitLab + OpenAI-compatible server on 127.0.0.1 for tests and the demo: the subset of
// REST API v4 the catalog uses, git over smart HTTP through `git http-backend`, and a fake model
// answering from fixtures. Its state is a JSON document in the state dir, rewritten atomically
// after each change, so a restarted forge keeps issues, notes and merge requests.
// Thread-safe: handlers run on httplib's pool and share state under one mutex.
class ForgeServer {
 public:
  static absl::StatusOr<std::unique_ptr<ForgeServer>> Create(ForgeOptions options);
  ~ForgeServer();

  // Binds 127.0.0.1 (on options.port, or an ephemeral one); returns the base URL.
  absl::StatusOr<std::string> Bind();
  // Serves until Stop(); returns an error if the server failed.
  absl::Status Serve();
  // Thread-safe; wakes a handler stalled in model mode `sleep` or in the model's latency.
  void Stop();

 private:
  class Impl;
  explicit ForgeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace step_runner::forge

#endif  // STEP_RUNNER_TESTS_FORGE_FORGE_SERVER_H_

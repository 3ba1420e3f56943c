#ifndef STEP_RUNNER_TESTS_FORGE_FORGE_FIXTURE_H_
#define STEP_RUNNER_TESTS_FORGE_FORGE_FIXTURE_H_

#include <sys/types.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "step-runner/process/subprocess.h"

// Starts the local forge (tests/forge, `sr-forge`) for tests and the demo with one call:
//
//   SR_ASSERT_OK_AND_ASSIGN(auto forge, Forge::Start(tmp.path() + "/forge"));
//   forge->url();            // http://127.0.0.1:PORT
//   forge->clone_url();      // http://127.0.0.1:PORT/demo/calculator.git
//   forge->Api("GET", "/api/v4/projects/1/merge_requests");
namespace step_runner::testing {

// Paths of the binaries built beside the tests.
std::string ForgeBinary();
std::string CatalogBinary();
// The folder holding sr-catalog, for a PATH that step files can find it on.
std::string CatalogBinaryDir();

class Forge {
 public:
  static constexpr char kProject[] = "demo/calculator";

  // Starts sr-forge with its state in `state_dir` (seeded when new, kept when not) and returns
  // once it serves. `env` ("K=V") is added to the forge's environment.
  static absl::StatusOr<std::unique_ptr<Forge>> Start(const std::string& state_dir,
                                                      std::vector<std::string> env = {},
                                                      absl::Duration deadline = absl::Seconds(30));
  ~Forge();  // SIGTERM, then SIGKILL after a grace

  const std::string& url() const { return url_; }
  std::string clone_url() const { return url_ + "/" + kProject + ".git"; }
  const std::string& token() const { return token_; }
  const std::string& model_key() const { return model_key_; }
  // What the forge wrote to stdout and stderr so far.
  std::string log() const;

  // Calls the forge's API with the token; the parsed JSON body, or an error with the HTTP
  // status and body.
  absl::StatusOr<nlohmann::json> Api(const std::string& method, const std::string& path,
                                     const nlohmann::json& body = nullptr) const;
  // Switches the fake model's answers for issue `iid` (diff, junk, sleep, malformed, stale,
  // stale-once).
  absl::Status SetModelMode(int iid, const std::string& mode) const;
  // Stops the forge (SIGTERM) and waits for it to exit.
  absl::Status Stop();

 private:
  Forge() = default;
  std::optional<process::Subprocess> child_;
  std::string url_;
  std::string token_;
  std::string model_key_;
  std::string log_path_;
};

}  // namespace step_runner::testing

#endif  // STEP_RUNNER_TESTS_FORGE_FORGE_FIXTURE_H_

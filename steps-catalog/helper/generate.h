#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_GENERATE_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_GENERATE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "steps-catalog/helper/secrets.h"

// The `generate` step: ask an OpenAI-compatible /v1/chat/completions endpoint for a unified
// diff that does the task, and apply it to the work tree.
namespace step_runner::catalog {

// Heading of the failing test log in the prompt (the local forge's fake model keys on it).
inline constexpr char kFeedbackHeading[] = "## Failing test output";
// Said to the model when its diff did not apply (the fake model keys on "did not apply").
inline constexpr char kDidNotApply[] = "Your diff did not apply";

struct GenerateRequest {
  std::string endpoint;  // "http://host:port", ".../v1" or ".../v1/chat/completions"
  std::string model;
  std::string api_key;   // from SR_MODEL_KEY; sent as a Bearer header
  std::string dir;       // the work tree
  std::string title;
  std::string description;
  std::string feedback;  // e.g. a failing test log; may be empty
  std::string artifacts_dir;  // prompts and answers land here, secrets masked
  int max_attempts = 3;
  absl::Duration timeout = absl::Seconds(120);  // per model call
  size_t context_budget = 48 * 1024;            // bytes of file contents in the prompt
};

struct GenerateResult {
  std::vector<std::string> files_changed;
  std::string summary;
  int attempts = 0;
};

// Calls the model, applies its diff; when the answer has no diff or the diff does not apply,
// tells the model what went wrong and asks again, up to max_attempts. A transport failure, a
// timeout or a rejected key ends it at once (retrying would not help and costs time).
absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request, const SecretMasker& masker);

// The chat-completions URL for an endpoint as users write it.
std::string ChatCompletionsUrl(absl::string_view endpoint);

struct RepositoryContext {
  std::vector<std::string> files;  // every file of the work tree (not ignored, not .git)
  std::vector<std::pair<std::string, std::string>> contents;  // the ones included, path -> text
};
// Lists the work tree and picks file contents within `budget` bytes: files named in `task`
// first, then the rest smallest first; binary files never.
absl::StatusOr<RepositoryContext> CollectContext(const std::string& dir, absl::string_view task, size_t budget);

// The user message: task, failing test output, file list, file contents, and the answer format.
std::string BuildPrompt(const GenerateRequest& request, const RepositoryContext& context);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_GENERATE_H_

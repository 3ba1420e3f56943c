#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_SECRETS_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_SECRETS_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace step_runner::catalog {

// Where secrets come from: environment variables only, never argv (visible in `ps` and logs).
inline constexpr char kGitTokenEnv[] = "SR_GIT_TOKEN";
inline constexpr char kForgeTokenEnv[] = "SR_FORGE_TOKEN";
inline constexpr char kModelKeyEnv[] = "SR_MODEL_KEY";

// The value of an env var, or "" when unset.
std::string SecretFromEnv(const char* name);

// Replaces every occurrence of known secrets in text with [MASKED] before it is written to an
// artifact or printed. Secrets shorter than 4 bytes are ignored (masking "a" would shred the
// text and protect nothing). Not thread-safe.
class SecretMasker {
 public:
  // A masker holding the values of SR_GIT_TOKEN, SR_FORGE_TOKEN and SR_MODEL_KEY.
  static SecretMasker FromEnvironment();

  void Add(absl::string_view secret);
  std::string Mask(absl::string_view text) const;

 private:
  std::vector<std::string> secrets_;  // longest first, so a secret containing another is masked whole
};

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_SECRETS_H_

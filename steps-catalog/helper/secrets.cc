#include "steps-catalog/helper/secrets.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_replace.h"

namespace step_runner::catalog {

std::string SecretFromEnv(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

SecretMasker SecretMasker::FromEnvironment() {
  SecretMasker masker;
  for (const char* name : {kGitTokenEnv, kForgeTokenEnv, kModelKeyEnv}) masker.Add(SecretFromEnv(name));
  return masker;
}

void SecretMasker::Add(absl::string_view secret) {
  if (secret.size() < 4) return;
  if (std::find(secrets_.begin(), secrets_.end(), secret) != secrets_.end()) return;
  secrets_.emplace_back(secret);
  std::stable_sort(secrets_.begin(), secrets_.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
}

std::string SecretMasker::Mask(absl::string_view text) const {
  std::string out(text);
  for (const std::string& secret : secrets_) absl::StrReplaceAll({{secret, "[MASKED]"}}, &out);
  return out;
}

}  // namespace step_runner::catalog

#ifndef STEP_RUNNER_LOGS_MASKER_H_
#define STEP_RUNNER_LOGS_MASKER_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace step_runner::logs {

inline constexpr absl::string_view kMaskedText = "[MASKED]";

// Tokens with a well-known prefix are masked whether or not anyone declared them: a prefix
// followed by at least kMinTokenChars of [A-Za-z0-9_.-] becomes "[MASKED]" as a whole.
inline constexpr absl::string_view kTokenPrefixes[] = {
    "glpat-", "gldt-", "glrt-", "glptt-", "glsoat-", "glcbt-", "gloas-",  // GitLab
    "ghp_", "gho_", "ghs_", "ghu_", "github_pat_",                         // GitHub
    "xoxb-", "xoxp-",                                                      // Slack
};
inline constexpr size_t kMinTokenChars = 8;

// Replaces every occurrence of the secrets, and every token with a known prefix, in one byte
// stream with "[MASKED]", at the source, before anything reaches the log. A secret split
// across two writes is still caught: bytes that might begin a secret are held back until the
// next write (or Flush) decides. Not thread-safe: one masker per stream.
class StreamMasker {
 public:
  explicit StreamMasker(std::vector<std::string> secrets);

  // Returns the bytes that are safe to emit now. The view points into `data` or into this
  // masker and stays valid until the next call. Output with nothing to mask (the common case)
  // is not copied: the masker sits on the path of every byte a step writes.
  absl::string_view Process(absl::string_view data);
  // End of stream: returns what was held back.
  std::string Flush();

 private:
  // `final`: nothing more will come, so nothing is held back.
  absl::string_view MaskSecrets(absl::string_view data, bool final);
  absl::string_view MaskTokens(absl::string_view data, bool final);

  std::vector<std::string> secrets_;  // non-empty, longest first
  std::string pending_;               // held back by the secrets pass
  std::string token_pending_;         // held back by the token pass
  // Scratch buffers that keep their capacity from one write to the next.
  std::string secrets_in_, secrets_out_, tokens_in_, tokens_out_;
};

// Masks whole strings (status messages and the like) with the same rules.
std::string MaskSecrets(absl::string_view text, const std::vector<std::string>& secrets);

}  // namespace step_runner::logs

#endif  // STEP_RUNNER_LOGS_MASKER_H_

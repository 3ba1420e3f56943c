#ifndef STEP_RUNNER_LOGS_MASKER_H_
#define STEP_RUNNER_LOGS_MASKER_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace step_runner::logs {

inline constexpr absl::string_view kMaskedText = "[MASKED]";

// Replaces every occurrence of the secrets in one byte stream with "[MASKED]", at the source,
// before anything reaches the log. A secret split across two writes is still caught: bytes
// that might begin a secret are held back until the next write (or Flush) decides.
// Not thread-safe: one masker per stream.
class StreamMasker {
 public:
  explicit StreamMasker(std::vector<std::string> secrets);

  bool active() const { return !secrets_.empty(); }
  // Returns the bytes that are safe to emit now.
  std::string Process(absl::string_view data);
  // End of stream: returns what was held back.
  std::string Flush();

 private:
  std::vector<std::string> secrets_;  // non-empty, longest first
  std::string pending_;
};

// Masks whole strings (status messages and the like) with the same rules.
std::string MaskSecrets(absl::string_view text, const std::vector<std::string>& secrets);

}  // namespace step_runner::logs

#endif  // STEP_RUNNER_LOGS_MASKER_H_

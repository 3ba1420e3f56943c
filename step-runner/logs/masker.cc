#include "step-runner/logs/masker.h"

#include <algorithm>
#include <utility>

namespace step_runner::logs {

StreamMasker::StreamMasker(std::vector<std::string> secrets) {
  for (std::string& s : secrets) {
    if (!s.empty()) secrets_.push_back(std::move(s));
  }
  // Longest first, so that where two secrets start at one position the longer one wins.
  std::sort(secrets_.begin(), secrets_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  secrets_.erase(std::unique(secrets_.begin(), secrets_.end()), secrets_.end());
}

namespace {

bool IsTokenChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == '.';
}

// A token longer than this is masked without waiting for its end.
constexpr size_t kMaxHeldToken = 4096;

}  // namespace

std::string StreamMasker::Process(absl::string_view data) { return MaskTokens(MaskSecrets(data), false); }

std::string StreamMasker::Flush() {
  std::string tail = MaskTokens(std::exchange(pending_, std::string()), false);
  return tail + MaskTokens("", true);
}

std::string StreamMasker::MaskTokens(absl::string_view data, bool final) {
  std::string buffer = std::exchange(token_pending_, std::string());
  buffer.append(data.data(), data.size());
  std::string out;
  out.reserve(buffer.size());
  size_t pos = 0;
  while (pos < buffer.size()) {
    // The earliest prefix from here.
    size_t best = std::string::npos;
    size_t best_len = 0;
    for (absl::string_view prefix : kTokenPrefixes) {
      size_t at = buffer.find(prefix.data(), pos, prefix.size());
      if (at < best) {
        best = at;
        best_len = prefix.size();
      }
    }
    if (best == std::string::npos) break;
    size_t end = best + best_len;
    while (end < buffer.size() && IsTokenChar(buffer[end])) ++end;
    if (end == buffer.size() && !final && end - best < kMaxHeldToken) {
      // The token may go on in the next write: decide then.
      out.append(buffer, pos, best - pos);
      token_pending_ = buffer.substr(best);
      return out;
    }
    out.append(buffer, pos, best - pos);
    if (end - best - best_len >= kMinTokenChars) {
      out.append(kMaskedText.data(), kMaskedText.size());
    } else {
      out.append(buffer, best, end - best);
    }
    pos = end;
  }
  // Hold back a tail that may be the start of a prefix.
  size_t hold = 0;
  if (!final) {
    size_t remaining = buffer.size() - pos;
    for (absl::string_view prefix : kTokenPrefixes) {
      for (size_t len = std::min(remaining, prefix.size() - 1); len > hold; --len) {
        if (buffer.compare(buffer.size() - len, len, prefix.data(), len) == 0) {
          hold = len;
          break;
        }
      }
    }
  }
  out.append(buffer, pos, buffer.size() - pos - hold);
  token_pending_ = buffer.substr(buffer.size() - hold);
  return out;
}

std::string StreamMasker::MaskSecrets(absl::string_view data) {
  if (secrets_.empty()) return std::string(data);
  std::string buffer = std::move(pending_);
  pending_.clear();
  buffer.append(data.data(), data.size());
  std::string out;
  out.reserve(buffer.size());
  size_t pos = 0;
  for (;;) {
    size_t best = std::string::npos;
    size_t best_len = 0;
    for (const std::string& s : secrets_) {
      size_t at = buffer.find(s, pos);
      if (at < best) {
        best = at;
        best_len = s.size();
      }
    }
    if (best == std::string::npos) break;
    out.append(buffer, pos, best - pos);
    out.append(kMaskedText.data(), kMaskedText.size());
    pos = best + best_len;
  }
  // Hold back the longest tail that is a proper prefix of some secret.
  size_t remaining = buffer.size() - pos;
  size_t hold = 0;
  for (const std::string& s : secrets_) {
    for (size_t len = std::min(remaining, s.size() - 1); len > hold; --len) {
      if (buffer.compare(buffer.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  out.append(buffer, pos, remaining - hold);
  pending_ = buffer.substr(buffer.size() - hold);
  return out;
}

std::string MaskSecrets(absl::string_view text, const std::vector<std::string>& secrets) {
  StreamMasker masker(secrets);
  std::string out = masker.Process(text);
  return out + masker.Flush();
}

}  // namespace step_runner::logs

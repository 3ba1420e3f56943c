#include "step-runner/logs/masker.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "step-runner/base/utf8.h"

namespace step_runner::logs {

namespace {

// How a string appears inside a JSON string (and so in an error message that quotes a value,
// or a step's `toJSON` output): quotes, backslashes and control characters escaped.
std::string JsonEscaped(absl::string_view text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out;
}

}  // namespace

StreamMasker::StreamMasker(std::vector<std::string> secrets) {
  for (std::string& s : secrets) {
    if (s.empty()) continue;
    // A secret with a quote, a backslash or a newline (a password, a PEM key) is also masked
    // in its escaped form, which is how it shows wherever it is quoted as JSON.
    if (std::string escaped = JsonEscaped(s); escaped != s) secrets_.push_back(std::move(escaped));
    // One that is not UTF-8 shows repaired (U+FFFD for the bad bytes) wherever protobuf or JSON
    // carries it: the result tree, a status message.
    if (!IsValidUtf8(s)) secrets_.push_back(ToValidUtf8(s));
    secrets_.push_back(std::move(s));
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

// The first bytes that the known prefixes begin with ("g" and "x"), each once.
const std::string& PrefixFirstBytes() {
  static const std::string* bytes = [] {
    auto* s = new std::string;
    for (absl::string_view prefix : kTokenPrefixes) {
      if (s->find(prefix[0]) == std::string::npos) s->push_back(prefix[0]);
    }
    return s;
  }();
  return *bytes;
}

// Finds known token prefixes in one buffer, front to back. It remembers where the next
// occurrence of each first byte lies, so a buffer full of near misses ("g" in prose) is still
// scanned about once per first byte rather than once per candidate.
class PrefixFinder {
 public:
  explicit PrefixFinder(absl::string_view text) : text_(text), next_(PrefixFirstBytes().size(), kUnknown) {}

  // The earliest position >= from where a whole prefix starts, or npos; sets *length to its size.
  size_t Next(size_t from, size_t* length) {
    for (size_t pos = from;;) {
      size_t at = NextCandidate(pos);
      if (at == absl::string_view::npos) return at;
      for (absl::string_view prefix : kTokenPrefixes) {
        if (absl::StartsWith(text_.substr(at), prefix)) {
          *length = prefix.size();
          return at;
        }
      }
      pos = at + 1;
    }
  }

 private:
  static constexpr size_t kUnknown = absl::string_view::npos - 1;

  size_t NextCandidate(size_t from) {
    size_t best = absl::string_view::npos;
    const std::string& firsts = PrefixFirstBytes();
    for (size_t i = 0; i < firsts.size(); ++i) {
      if (next_[i] == kUnknown || (next_[i] != absl::string_view::npos && next_[i] < from)) {
        const void* hit = from < text_.size() ? std::memchr(text_.data() + from, firsts[i], text_.size() - from) : nullptr;
        next_[i] = hit ? static_cast<size_t>(static_cast<const char*>(hit) - text_.data()) : absl::string_view::npos;
      }
      best = std::min(best, next_[i]);
    }
    return best;
  }

  absl::string_view text_;
  std::vector<size_t> next_;  // per first byte: its next position, npos when none is left
};

}  // namespace

absl::string_view StreamMasker::Process(absl::string_view data) { return MaskTokens(MaskSecrets(data, false), false); }

std::string StreamMasker::Flush() {
  // What the secrets pass held back may hold a whole secret (one that a longer one starts with).
  std::string held = std::exchange(pending_, std::string());
  std::string secrets_masked(MaskSecrets(held, /*final=*/true));
  std::string tail(MaskTokens(secrets_masked, false));
  absl::string_view last = MaskTokens("", true);
  tail.append(last.data(), last.size());
  return tail;
}

absl::string_view StreamMasker::MaskTokens(absl::string_view data, bool final) {
  absl::string_view buffer = data;
  if (!token_pending_.empty()) {
    tokens_in_.assign(token_pending_);
    tokens_in_.append(data.data(), data.size());
    token_pending_.clear();
    buffer = tokens_in_;
  }
  tokens_out_.clear();
  bool rewritten = false;  // whether the output differs from buffer's head (then it is in tokens_out_)
  PrefixFinder finder(buffer);
  size_t pos = 0;
  size_t prefix_length = 0;
  for (size_t at = finder.Next(0, &prefix_length); at != absl::string_view::npos;
       at = finder.Next(pos, &prefix_length)) {
    size_t end = at + prefix_length;
    while (end < buffer.size() && IsTokenChar(buffer[end])) ++end;
    tokens_out_.append(buffer.data() + pos, at - pos);
    if (end == buffer.size() && !final && end - at < kMaxHeldToken) {
      // The token may go on in the next write: decide then.
      token_pending_.assign(buffer.data() + at, buffer.size() - at);
      return tokens_out_;
    }
    if (end - at - prefix_length >= kMinTokenChars) {
      tokens_out_.append(kMaskedText.data(), kMaskedText.size());
      rewritten = true;
    } else {
      tokens_out_.append(buffer.data() + at, end - at);
    }
    pos = end;
  }
  // Hold back a tail that may be the start of a prefix.
  size_t hold = 0;
  if (!final) {
    size_t remaining = buffer.size() - pos;
    for (absl::string_view prefix : kTokenPrefixes) {
      for (size_t len = std::min(remaining, prefix.size() - 1); len > hold; --len) {
        if (buffer.substr(buffer.size() - len) == prefix.substr(0, len)) {
          hold = len;
          break;
        }
      }
    }
  }
  token_pending_.assign(buffer.data() + buffer.size() - hold, hold);
  if (!rewritten) return buffer.substr(0, buffer.size() - hold);
  tokens_out_.append(buffer.data() + pos, buffer.size() - pos - hold);
  return tokens_out_;
}

absl::string_view StreamMasker::MaskSecrets(absl::string_view data, bool final) {
  if (secrets_.empty()) return data;
  absl::string_view buffer = data;
  if (!pending_.empty()) {
    secrets_in_.assign(pending_);
    secrets_in_.append(data.data(), data.size());
    pending_.clear();
    buffer = secrets_in_;
  }
  // Where each secret occurs next; found again only once the output has moved past it.
  std::vector<size_t> next(secrets_.size());
  for (size_t i = 0; i < secrets_.size(); ++i) next[i] = buffer.find(secrets_[i]);
  secrets_out_.clear();
  bool rewritten = false;
  size_t pos = 0;
  size_t undecided = absl::string_view::npos;  // where a match might still grow into a longer one
  for (;;) {
    size_t best = absl::string_view::npos;
    size_t best_len = 0;
    for (size_t i = 0; i < secrets_.size(); ++i) {
      if (next[i] != absl::string_view::npos && next[i] < pos) next[i] = buffer.find(secrets_[i], pos);
      if (next[i] < best) {  // strictly earlier: at a tie the longer secret (listed first) wins
        best = next[i];
        best_len = secrets_[i].size();
      }
    }
    if (best == absl::string_view::npos) break;
    // "secret" matched at the end of this write, and "secretvalue" may follow in the next: masking
    // the short one now would let the longer one's tail through. Decide when more comes.
    const absl::string_view rest = buffer.substr(best);
    for (size_t i = 0; !final && i < secrets_.size() && secrets_[i].size() > best_len; ++i) {
      if (rest.size() < secrets_[i].size() && absl::StartsWith(secrets_[i], rest)) undecided = best;
    }
    if (undecided != absl::string_view::npos) break;
    secrets_out_.append(buffer.data() + pos, best - pos);
    secrets_out_.append(kMaskedText.data(), kMaskedText.size());
    rewritten = true;
    pos = best + best_len;
  }
  // Hold back the longest tail that is a proper prefix of some secret.
  size_t remaining = buffer.size() - pos;
  size_t hold = undecided != absl::string_view::npos ? buffer.size() - undecided : 0;
  static const std::vector<std::string> kNothing;  // at the end, nothing more can complete a secret
  for (const std::string& s : final ? kNothing : secrets_) {  // both lvalues: no copy
    for (size_t len = std::min(remaining, s.size() - 1); len > hold; --len) {
      if (buffer.substr(buffer.size() - len) == absl::string_view(s).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  pending_.assign(buffer.data() + buffer.size() - hold, hold);
  if (!rewritten) return buffer.substr(0, buffer.size() - hold);
  secrets_out_.append(buffer.data() + pos, remaining - hold);
  return secrets_out_;
}

std::string MaskSecrets(absl::string_view text, const std::vector<std::string>& secrets) {
  // Most strings hold nothing to mask (the engine masks every string of the result tree at each
  // step's start and end): no masker is built for them.
  size_t prefix_length = 0;
  if (secrets.empty() && PrefixFinder(text).Next(0, &prefix_length) == absl::string_view::npos) {
    return std::string(text);
  }
  StreamMasker masker(secrets);
  std::string out(masker.Process(text));
  return out + masker.Flush();
}

}  // namespace step_runner::logs

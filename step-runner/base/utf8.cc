#include "step-runner/base/utf8.h"

#include <cstdint>

namespace step_runner {

size_t Utf8SequenceLength(absl::string_view text, size_t at) {
  const auto byte = static_cast<unsigned char>(text[at]);
  const size_t length = byte < 0x80                ? 1
                        : (byte & 0xE0) == 0xC0 ? 2
                        : (byte & 0xF0) == 0xE0 ? 3
                        : (byte & 0xF8) == 0xF0 ? 4
                                                : 0;
  if (length == 0 || at + length > text.size()) return 0;
  uint32_t code = length == 1 ? byte : length == 2 ? byte & 0x1F : length == 3 ? byte & 0x0F : byte & 0x07;
  for (size_t k = 1; k < length; ++k) {
    const auto next = static_cast<unsigned char>(text[at + k]);
    if ((next & 0xC0) != 0x80) return 0;
    code = (code << 6) | (next & 0x3F);
  }
  // No overlong forms, no surrogates, nothing past U+10FFFF.
  if ((length == 2 && code < 0x80) || (length == 3 && code < 0x800) ||
      (length == 4 && (code < 0x10000 || code > 0x10FFFF)) || (code >= 0xD800 && code <= 0xDFFF)) {
    return 0;
  }
  return length;
}

bool IsValidUtf8(absl::string_view text) {
  for (size_t i = 0; i < text.size();) {
    const size_t length = Utf8SequenceLength(text, i);
    if (length == 0) return false;
    i += length;
  }
  return true;
}

std::string ToValidUtf8(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (size_t length = Utf8SequenceLength(text, i); length > 0) {
      out.append(text.data() + i, length);
      i += length;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD REPLACEMENT CHARACTER
      ++i;
    }
  }
  return out;
}

}  // namespace step_runner

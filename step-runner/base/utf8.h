#ifndef STEP_RUNNER_BASE_UTF8_H_
#define STEP_RUNNER_BASE_UTF8_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace step_runner {

// The length of the well-formed UTF-8 sequence that starts at text[at] (1 to 4), or 0 when
// none does: a stray continuation byte, a cut sequence, an overlong form, a surrogate, or a
// code point past U+10FFFF. Protobuf refuses such strings in its string fields.
size_t Utf8SequenceLength(absl::string_view text, size_t at);

bool IsValidUtf8(absl::string_view text);

// `text` with every byte that does not begin a well-formed sequence replaced by U+FFFD.
std::string ToValidUtf8(absl::string_view text);

}  // namespace step_runner

#endif  // STEP_RUNNER_BASE_UTF8_H_

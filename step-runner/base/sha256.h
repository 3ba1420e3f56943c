#ifndef STEP_RUNNER_BASE_SHA256_H_
#define STEP_RUNNER_BASE_SHA256_H_

#include <string>

#include "absl/strings/string_view.h"

namespace step_runner {

// SHA-256 through nettle rather than OpenSSL: the daemon only needs the hash, and loading and
// initialising libcrypto costs the idle daemon ~3 MiB of resident memory.
std::string Sha256(absl::string_view data);     // 32 raw bytes
std::string Sha256Hex(absl::string_view data);  // 64 lowercase hex digits

}  // namespace step_runner

#endif  // STEP_RUNNER_BASE_SHA256_H_

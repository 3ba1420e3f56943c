#ifndef STEP_RUNNER_PROXY_AUTH_H_
#define STEP_RUNNER_PROXY_AUTH_H_

#include <deque>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

// libssh's key handle, without pulling libssh.h into every includer.
struct ssh_key_struct;

namespace step_runner::proxy {

// Whether `key` is one of the authorized_keys lines ("TYPE BASE64 [comment]"; options before
// the type are not supported and such lines never match).
bool KeyAuthorized(ssh_key_struct* key, const std::vector<std::string>& authorized_keys);

// "SHA256:..." as OpenSSH prints it (ssh-keygen -lf).
std::string KeyFingerprint(ssh_key_struct* key);

// Asks the forge whose token this is: GET {forge_url}/api/v4/user with a PRIVATE-TOKEN header.
// Returns the username, PERMISSION_DENIED when the forge rejects the token, UNAVAILABLE when the
// forge cannot be asked. The token is never logged or kept.
absl::StatusOr<std::string> ForgeUserForToken(const std::string& forge_url,
                                              absl::string_view token, absl::Duration timeout);

// Failed authentications per source address within a sliding window. Thread-safe.
class FailureLimiter {
 public:
  FailureLimiter(int max_failures, absl::Duration window)
      : max_failures_(max_failures), window_(window) {}
  void RecordFailure(const std::string& address, absl::Time now = absl::Now());
  // Whether the address has used up its failures (new connections from it are refused).
  bool Blocked(const std::string& address, absl::Time now = absl::Now());

 private:
  void Expire(std::deque<absl::Time>& times, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const int max_failures_;
  const absl::Duration window_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::deque<absl::Time>> failures_ ABSL_GUARDED_BY(mu_);
};

}  // namespace step_runner::proxy

#endif  // STEP_RUNNER_PROXY_AUTH_H_

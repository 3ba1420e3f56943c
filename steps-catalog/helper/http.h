#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_HTTP_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_HTTP_H_

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace step_runner::catalog {

using HttpHeader = std::pair<std::string, std::string>;

// GitLab takes a personal token as PRIVATE-TOKEN or as a Bearer token; OpenAI-compatible
// endpoints take a Bearer key; git over HTTP takes Basic with user "oauth2" and the token as the
// password (what the libgit2 credential callback sends too).
enum class AuthScheme { kPrivateToken, kBearer, kGitBasic };
// The header carrying `token`; an empty token gives no header (nothing to send).
std::vector<HttpHeader> AuthHeaders(AuthScheme scheme, absl::string_view token);

struct HttpRequest {
  std::string method = "GET";
  std::string url;
  std::vector<HttpHeader> headers;
  std::string body;
  std::string content_type = "application/json";  // of a non-empty body
  absl::Duration timeout = absl::Seconds(30);
  absl::Duration connect_timeout = absl::Seconds(10);
  // > 0: also give up when no byte arrives for this long (a long transfer's `timeout` is large,
  // and a stalled server must not hold a step for all of it).
  absl::Duration stall_timeout = absl::ZeroDuration();
  // When set, a 2xx response's body is handed over piece by piece as it arrives (a git pack may
  // not fit in memory) instead of being kept in HttpResponse::body; an error from it ends the
  // transfer and is what Fetch returns. Other statuses keep their body as usual.
  std::function<absl::Status(absl::string_view)> body_sink;
};

struct HttpResponse {
  long status = 0;
  std::string body;
};

// One HTTP exchange through libcurl. Transport failures are UNAVAILABLE (with the URL, which
// never carries a secret: tokens travel in headers), a timeout is DEADLINE_EXCEEDED; any HTTP
// status is a response. Never follows redirects, so a token is never sent to another host.
absl::StatusOr<HttpResponse> Fetch(const HttpRequest& request);

// Percent-encodes one path segment ("demo/calculator" -> "demo%2Fcalculator").
std::string UrlEncode(absl::string_view segment);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_HTTP_H_

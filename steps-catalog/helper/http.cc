#include "steps-catalog/helper/http.h"

#include <curl/curl.h>

#include <algorithm>
#include <memory>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace step_runner::catalog {
namespace {

struct BodyTarget {
  CURL* curl;
  const HttpRequest* request;
  HttpResponse* response;
  absl::Status sink_status;
};

size_t TakeBody(char* data, size_t size, size_t n, void* payload) {
  auto* target = static_cast<BodyTarget*>(payload);
  long status = 0;
  curl_easy_getinfo(target->curl, CURLINFO_RESPONSE_CODE, &status);
  if (target->request->body_sink && status >= 200 && status < 300) {
    target->sink_status = target->request->body_sink(absl::string_view(data, size * n));
    if (!target->sink_status.ok()) return 0;  // curl ends the transfer with CURLE_WRITE_ERROR
  } else {
    target->response->body.append(data, size * n);
  }
  return size * n;
}

}  // namespace

std::vector<HttpHeader> AuthHeaders(AuthScheme scheme, absl::string_view token) {
  if (token.empty()) return {};
  if (scheme == AuthScheme::kPrivateToken) return {{"PRIVATE-TOKEN", std::string(token)}};
  if (scheme == AuthScheme::kGitBasic) {
    return {{"Authorization", absl::StrCat("Basic ", absl::Base64Escape(absl::StrCat("oauth2:", token)))}};
  }
  return {{"Authorization", absl::StrCat("Bearer ", token)}};
}

std::string UrlEncode(absl::string_view segment) {
  std::string out;
  for (unsigned char c : segment) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

absl::StatusOr<HttpResponse> Fetch(const HttpRequest& request) {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) return absl::InternalError("curl_easy_init failed");
  curl_slist* raw_headers = nullptr;
  for (const auto& [name, value] : request.headers) {
    raw_headers = curl_slist_append(raw_headers, absl::StrCat(name, ": ", value).c_str());
  }
  if (!request.body.empty()) {
    raw_headers = curl_slist_append(raw_headers, absl::StrCat("Content-Type: ", request.content_type).c_str());
  }
  std::unique_ptr<curl_slist, void (*)(curl_slist*)> headers(raw_headers, curl_slist_free_all);
  HttpResponse response;
  CURL* c = curl.get();
  curl_easy_setopt(c, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  if (!request.body.empty() || request.method == "POST" || request.method == "PUT") {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.body.c_str());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
  BodyTarget target{.curl = c, .request = &request, .response = &response};
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, TakeBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &target);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(request.timeout)));
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(absl::ToInt64Milliseconds(request.connect_timeout)));
  if (request.stall_timeout > absl::ZeroDuration()) {
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    // Whole seconds for curl, at least one (0 would turn the check off).
    const int64_t stall_seconds = std::max<int64_t>(1, absl::ToInt64Seconds(absl::Ceil(request.stall_timeout, absl::Seconds(1))));
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(stall_seconds));
  }
  // No signals from curl's resolver timeouts in a process that may run threads.
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  // A proxy must never see a token meant for a forge on this machine.
  curl_easy_setopt(c, CURLOPT_NOPROXY, "127.0.0.1,localhost,::1");
  char error[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, error);
  CURLcode rc = curl_easy_perform(c);
  if (!target.sink_status.ok()) return target.sink_status;
  if (rc == CURLE_OPERATION_TIMEDOUT) {
    return absl::DeadlineExceededError(absl::StrCat(
        request.method, " ", request.url, ": no answer within ", absl::FormatDuration(request.timeout),
        request.stall_timeout > absl::ZeroDuration()
            ? absl::StrCat(", or nothing received for ", absl::FormatDuration(request.stall_timeout))
            : ""));
  }
  if (rc != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat(request.method, " ", request.url, ": ",
                                               error[0] != '\0' ? error : curl_easy_strerror(rc)));
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &response.status);
  return response;
}

}  // namespace step_runner::catalog

#include "proxy/auth.h"

#include <curl/curl.h>
#include <libssh/libssh.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace step_runner::proxy {

bool KeyAuthorized(ssh_key key, const std::vector<std::string>& authorized_keys) {
  for (const std::string& line : authorized_keys) {
    std::vector<std::string> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() < 2) continue;
    const enum ssh_keytypes_e type = ssh_key_type_from_name(fields[0].c_str());
    if (type == SSH_KEYTYPE_UNKNOWN) continue;
    ssh_key candidate = nullptr;
    if (ssh_pki_import_pubkey_base64(fields[1].c_str(), type, &candidate) != SSH_OK) continue;
    const bool same = ssh_key_cmp(candidate, key, SSH_KEY_CMP_PUBLIC) == 0;
    ssh_key_free(candidate);
    if (same) return true;
  }
  return false;
}

std::string KeyFingerprint(ssh_key key) {
  unsigned char* hash = nullptr;
  size_t length = 0;
  if (ssh_get_publickey_hash(key, SSH_PUBLICKEY_HASH_SHA256, &hash, &length) != SSH_OK) {
    return "unknown";
  }
  char* text = ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, length);
  ssh_clean_pubkey_hash(&hash);
  if (text == nullptr) return "unknown";
  std::string fingerprint(text);
  ssh_string_free_char(text);
  return fingerprint;
}

namespace {

struct Body {
  std::string data;
  bool too_big = false;
};

size_t Collect(char* ptr, size_t size, size_t nmemb, void* userdata) {
  auto* body = static_cast<Body*>(userdata);
  // /api/v4/user is a few KiB; a forge answering megabytes is not one we talk to.
  constexpr size_t kMaxBody = 1 << 20;
  if (body->data.size() + size * nmemb > kMaxBody) {
    body->too_big = true;
    return 0;
  }
  body->data.append(ptr, size * nmemb);
  return size * nmemb;
}

}  // namespace

absl::StatusOr<std::string> ForgeUserForToken(const std::string& forge_url,
                                              absl::string_view token, absl::Duration timeout) {
  // A token with a line break would smuggle a second header into the request.
  if (token.empty() || token.find_first_of("\r\n") != absl::string_view::npos) {
    return absl::PermissionDeniedError("malformed token");
  }
  std::unique_ptr<CURL, decltype(&curl_easy_cleanup)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) return absl::InternalError("curl_easy_init failed");
  const std::string url = absl::StrCat(forge_url, "/api/v4/user");
  std::string header = absl::StrCat("PRIVATE-TOKEN: ", token);
  curl_slist* headers = curl_slist_append(nullptr, header.c_str());
  // The copy of the token in `header` is wiped once the request is done.
  std::unique_ptr<curl_slist, decltype(&curl_slist_free_all)> header_list(headers,
                                                                         curl_slist_free_all);
  Body body;
  curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, Collect);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl.get(), CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(timeout)));
  curl_easy_setopt(curl.get(), CURLOPT_NOSIGNAL, 1L);
  // Never follow a redirect: the token would go wherever the forge points.
  curl_easy_setopt(curl.get(), CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(curl.get(), CURLOPT_PROTOCOLS_STR, "http,https");
  const CURLcode rc = curl_easy_perform(curl.get());
  std::fill(header.begin(), header.end(), '\0');
  if (rc != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat("forge ", url, ": ", curl_easy_strerror(rc)));
  }
  long code = 0;
  curl_easy_getinfo(curl.get(), CURLINFO_RESPONSE_CODE, &code);
  if (code == 401 || code == 403) return absl::PermissionDeniedError("the forge rejected the token");
  if (code != 200) return absl::UnavailableError(absl::StrCat("forge ", url, ": HTTP ", code));
  nlohmann::json user = nlohmann::json::parse(body.data, nullptr, /*allow_exceptions=*/false);
  if (!user.is_object() || !user.contains("username") || !user["username"].is_string()) {
    return absl::UnavailableError(absl::StrCat("forge ", url, ": no username in the answer"));
  }
  return user["username"].get<std::string>();
}

void FailureLimiter::Expire(std::deque<absl::Time>& times, absl::Time now) {
  while (!times.empty() && times.front() + window_ <= now) times.pop_front();
}

void FailureLimiter::RecordFailure(const std::string& address, absl::Time now) {
  absl::MutexLock lock(&mu_);
  auto& times = failures_[address];
  Expire(times, now);
  times.push_back(now);
  // Bounded memory: an address never needs more entries than it takes to be blocked.
  while (static_cast<int>(times.size()) > max_failures_) times.pop_front();
  // Forget quiet addresses now and then, so a scan from many addresses cannot grow the map.
  if (failures_.size() > 10000) {
    absl::erase_if(failures_, [&](auto& entry) {
      Expire(entry.second, now);
      return entry.second.empty();
    });
  }
}

bool FailureLimiter::Blocked(const std::string& address, absl::Time now) {
  absl::MutexLock lock(&mu_);
  auto it = failures_.find(address);
  if (it == failures_.end()) return false;
  Expire(it->second, now);
  return static_cast<int>(it->second.size()) >= max_failures_;
}

}  // namespace step_runner::proxy

#include "steps-catalog/helper/gitlab.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/http.h"

namespace step_runner::catalog {

using json = nlohmann::json;

namespace {

// GitLab's error bodies are {"message": "..."} or {"message": [...]} or {"error": "..."}.
std::string ErrorText(const std::string& body) {
  json parsed = json::parse(body, nullptr, false);
  if (parsed.is_object()) {
    for (const char* key : {"message", "error"}) {
      if (parsed.contains(key)) return parsed[key].is_string() ? parsed[key].get<std::string>() : parsed[key].dump();
    }
  }
  return body.substr(0, 200);
}

}  // namespace

GitLabClient::GitLabClient(std::string base_url, std::string project, std::string token, absl::Duration timeout)
    : base_url_(absl::StripSuffix(base_url, "/")), project_(std::move(project)), token_(std::move(token)),
      timeout_(timeout) {}

absl::StatusOr<json> GitLabClient::Call(const std::string& method, const std::string& path, const json& body,
                                        long* http_status) {
  if (http_status != nullptr) *http_status = 0;
  HttpRequest request;
  request.method = method;
  request.url = absl::StrCat(base_url_, "/api/v4/projects/", UrlEncode(project_), path);
  request.headers = AuthHeaders(AuthScheme::kPrivateToken, token_);
  request.headers.push_back({"Accept", "application/json"});
  if (!body.is_null()) request.body = body.dump();
  request.timeout = timeout_;
  SR_ASSIGN_OR_RETURN(HttpResponse response, Fetch(request));
  if (http_status != nullptr) *http_status = response.status;
  const std::string what = absl::StrCat(method, " ", request.url);
  switch (response.status) {
    case 200:
    case 201:
      break;
    case 401:
      return absl::UnauthenticatedError(absl::StrCat(
          "the forge rejected the token (401 Unauthorized) for ", what,
          token_.empty() ? " (no token given: set it in the step's token input)" : ""));
    case 403:
      return absl::PermissionDeniedError(absl::StrCat("not allowed (403) for ", what, ": ", ErrorText(response.body)));
    case 404:
      return absl::NotFoundError(absl::StrCat("not found (404) for ", what, ": ", ErrorText(response.body)));
    default:
      if (response.status >= 500) {
        return absl::UnavailableError(absl::StrCat("the forge failed (", response.status, ") for ", what, ": ",
                                                   ErrorText(response.body)));
      }
      return absl::FailedPreconditionError(
          absl::StrCat("the forge refused (", response.status, ") ", what, ": ", ErrorText(response.body)));
  }
  json parsed = json::parse(response.body, nullptr, false);
  if (parsed.is_discarded()) return absl::InternalError(absl::StrCat(what, ": the answer is not JSON"));
  return parsed;
}

absl::StatusOr<json> GitLabClient::GetIssue(int iid) {
  absl::StatusOr<json> issue = Call("GET", absl::StrCat("/issues/", iid));
  if (absl::IsNotFound(issue.status())) {
    // Tell a missing project from a missing issue: the user fixes different inputs.
    if (absl::IsNotFound(Call("GET", "").status())) {
      return absl::NotFoundError(absl::StrCat("project ", project_, " not found on ", base_url_));
    }
    return absl::NotFoundError(absl::StrCat("issue #", iid, " not found in project ", project_));
  }
  return issue;
}

absl::StatusOr<json> GitLabClient::CommentOnce(int iid, const std::string& body, bool* posted) {
  *posted = false;
  // 100 per page is GitLab's maximum; a bot's comment is among the latest.
  SR_ASSIGN_OR_RETURN(json notes, Call("GET", absl::StrCat("/issues/", iid, "/notes?per_page=100&sort=desc")));
  for (const json& note : notes) {
    if (note.value("body", "") == body) return note;
  }
  SR_ASSIGN_OR_RETURN(json note, Call("POST", absl::StrCat("/issues/", iid, "/notes"), json{{"body", body}}));
  *posted = true;
  return note;
}

absl::StatusOr<MergeRequest> GitLabClient::OpenMergeRequestOnce(const MergeRequestSpec& spec) {
  // The open MR from this branch into this target: one into another target (a branch may have
  // several) is not the one asked for, and taking it reported success for an MR that did not
  // exist.
  const std::string query = absl::StrCat("/merge_requests?state=opened&source_branch=", UrlEncode(spec.source_branch),
                                         "&target_branch=", UrlEncode(spec.target_branch));
  auto existing = [&]() -> absl::StatusOr<std::optional<MergeRequest>> {
    SR_ASSIGN_OR_RETURN(json list, Call("GET", query));
    if (!list.is_array()) return std::nullopt;
    for (const json& mr : list) {
      if (mr.value("target_branch", spec.target_branch) != spec.target_branch) continue;  // a forge ignoring the filter
      return MergeRequest{mr.value("iid", 0), mr.value("web_url", ""), false};
    }
    return std::nullopt;
  };
  SR_ASSIGN_OR_RETURN(std::optional<MergeRequest> found, existing());
  if (found) return *found;
  std::string title = spec.title;
  if (spec.draft && !absl::StartsWith(title, "Draft:")) title = "Draft: " + title;
  json body = {{"source_branch", spec.source_branch},
               {"target_branch", spec.target_branch},
               {"title", title},
               {"description", spec.description},
               {"remove_source_branch", true}};
  long http_status = 0;
  absl::StatusOr<json> created = Call("POST", "/merge_requests", body, &http_status);
  if (!created.ok() && http_status == 409) {
    // Another run created it between our lookup and our create: use that one.
    SR_ASSIGN_OR_RETURN(found, existing());
    if (found) return *found;
  }
  if (!created.ok()) return created.status();
  return MergeRequest{created->value("iid", 0), created->value("web_url", ""), true};
}

}  // namespace step_runner::catalog

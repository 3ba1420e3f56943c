#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_GITLAB_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_GITLAB_H_

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace step_runner::catalog {

struct MergeRequestSpec {
  std::string source_branch;
  std::string target_branch;
  std::string title;
  std::string description;
  bool draft = false;
};

struct MergeRequest {
  int iid = 0;
  std::string web_url;
  bool created = false;  // false: an open MR for the source branch already existed
};

// The slice of GitLab REST API v4 the catalog uses. Errors name the request and what the
// forge said: 401 is UNAUTHENTICATED ("the forge rejected the token"), 403 PERMISSION_DENIED,
// 404 NOT_FOUND, other statuses FAILED_PRECONDITION or UNAVAILABLE (5xx). The token goes in a
// PRIVATE-TOKEN header, never in a URL or a message.
class GitLabClient {
 public:
  // `base_url`: the forge's root ("https://gitlab.example.com"), `project`: numeric id or path.
  GitLabClient(std::string base_url, std::string project, std::string token,
               absl::Duration timeout = absl::Seconds(30));

  absl::StatusOr<nlohmann::json> GetIssue(int iid);
  // Posts `body` on issue `iid` unless a note with exactly that body is already there (so a
  // retried workflow does not comment twice). Returns the note; `posted` says which case.
  absl::StatusOr<nlohmann::json> CommentOnce(int iid, const std::string& body, bool* posted);
  // Returns the open MR for spec.source_branch if there is one, else creates it.
  absl::StatusOr<MergeRequest> OpenMergeRequestOnce(const MergeRequestSpec& spec);

  // GET/POST `path` under /api/v4/projects/<project>; the parsed JSON body. `http_status`, when
  // given, receives the HTTP status (0 when there was no answer).
  absl::StatusOr<nlohmann::json> Call(const std::string& method, const std::string& path,
                                      const nlohmann::json& body = nullptr, long* http_status = nullptr);

 private:
  std::string base_url_;
  std::string project_;
  std::string token_;
  absl::Duration timeout_;
};

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_GITLAB_H_

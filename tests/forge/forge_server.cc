#include "tests/forge/forge_server.h"

#include <fcntl.h>
#include <httplib.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/base/unique_fd.h"
#include "tests/forge/forge_git.h"

namespace step_runner::forge {

using json = nlohmann::json;

namespace {

constexpr char kProjectPath[] = "demo/calculator";

std::string NowIso() { return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()); }

void Reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void ReplyMessage(httplib::Response& res, int status, const std::string& message) {
  Reply(res, status, json{{"message", message}});
}

absl::StatusOr<json> ReadJsonFile(const std::string& path) {
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json parsed = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return parsed;
}

// GitLab takes parameters as JSON or as form/query fields; this reads either.
std::optional<std::string> Param(const httplib::Request& req, const json& body, const std::string& name) {
  if (body.is_object() && body.contains(name)) {
    const json& v = body[name];
    if (v.is_string()) return v.get<std::string>();
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    return v.dump();
  }
  if (req.has_param(name.c_str())) return req.get_param_value(name.c_str());
  return std::nullopt;
}

json ParseBody(const httplib::Request& req) {
  if (absl::StrContains(req.get_header_value("Content-Type"), "json")) {
    json body = json::parse(req.body, nullptr, false);
    if (!body.is_discarded()) return body;
  }
  return json::object();
}

}  // namespace

class ForgeServer::Impl {
 public:
  explicit Impl(ForgeOptions options) : options_(std::move(options)) {}

  absl::Status LoadOrSeed();
  absl::StatusOr<std::string> Bind();
  absl::Status Serve() {
    if (!server_.listen_after_bind()) return absl::InternalError("the forge's HTTP server failed");
    return absl::OkStatus();
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    stop_cv_.notify_all();
    server_.stop();
  }

 private:
  void Routes();
  std::string StatePath() const { return options_.state_dir + "/state.json"; }
  std::string ReposDir() const { return options_.state_dir + "/repos"; }
  std::string BareDir(const json& project) const {
    return absl::StrCat(ReposDir(), "/", project["path"].get<std::string>(), ".git");
  }
  // REQUIRES: mu_ held.
  void Persist() {
    if (absl::Status s = WriteFileAtomically(StatePath(), state_.dump(1), 0600); !s.ok()) {
      SR_LOG(ERROR) << "could not save the forge state: " << s;
    }
  }
  int NextId(const std::string& kind) {
    int id = state_["next_id"].value(kind, 1);
    state_["next_id"][kind] = id + 1;
    return id;
  }

  bool ApiAuthorized(const httplib::Request& req) const {
    if (req.get_header_value("PRIVATE-TOKEN") == options_.token) return true;
    return req.get_header_value("Authorization") == absl::StrCat("Bearer ", options_.token);
  }
  // GitLab's git-over-HTTP auth: Basic with any user name and the token as password.
  bool GitAuthorized(const httplib::Request& req) const {
    const std::string value = req.get_header_value("Authorization");  // by value: keep it alive
    absl::string_view header = value;
    if (!absl::ConsumePrefix(&header, "Basic ")) return false;
    std::string decoded;
    if (!absl::Base64Unescape(header, &decoded)) return false;
    size_t colon = decoded.find(':');
    return colon != std::string::npos && decoded.substr(colon + 1) == options_.token;
  }

  // REQUIRES: mu_ held. Finds a project by numeric id or (URL-encoded) full path.
  json* FindProject(const std::string& id_or_path) {
    std::string key = httplib::detail::decode_url(id_or_path, false);
    int id = 0;
    bool numeric = absl::SimpleAtoi(key, &id);
    for (json& project : state_["projects"]) {
      if (numeric ? project["id"].get<int>() == id : project["path"].get<std::string>() == key) return &project;
    }
    return nullptr;
  }
  static json* FindByIid(json& list, int iid) {
    for (json& item : list) {
      if (item["iid"].get<int>() == iid) return &item;
    }
    return nullptr;
  }

  std::string BaseUrl() const { return absl::StrCat("http://127.0.0.1:", port_); }
  json UserJson() const {
    return {{"id", 1}, {"username", "agent"}, {"name", "Step Runner Agent"}, {"state", "active"},
            {"web_url", BaseUrl() + "/agent"}};
  }
  json ProjectJson(const json& p) const {
    std::string path = p["path"];
    return {{"id", p["id"]},
            {"name", path.substr(path.rfind('/') + 1)},
            {"path", path.substr(path.rfind('/') + 1)},
            {"path_with_namespace", path},
            {"default_branch", "main"},
            {"visibility", "private"},
            {"web_url", absl::StrCat(BaseUrl(), "/", path)},
            {"http_url_to_repo", absl::StrCat(BaseUrl(), "/", path, ".git")}};
  }
  json IssueJson(const json& p, const json& issue) const {
    return {{"id", issue["id"]},
            {"iid", issue["iid"]},
            {"project_id", p["id"]},
            {"title", issue["title"]},
            {"description", issue["description"]},
            {"state", "opened"},
            {"labels", json::array()},
            {"author", UserJson()},
            {"created_at", issue["created_at"]},
            {"updated_at", issue["created_at"]},
            {"user_notes_count", issue["notes"].size()},
            {"web_url", absl::StrCat(BaseUrl(), "/", p["path"].get<std::string>(), "/-/issues/",
                                     issue["iid"].get<int>())}};
  }
  json NoteJson(const json& issue, const json& note) const {
    return {{"id", note["id"]},       {"body", note["body"]},     {"author", UserJson()},
            {"created_at", note["created_at"]}, {"updated_at", note["created_at"]}, {"system", false},
            {"noteable_type", "Issue"}, {"noteable_iid", issue["iid"]}};
  }
  json MergeRequestJson(const json& p, const json& mr) const {
    std::string title = mr["title"];
    bool draft = absl::StartsWith(title, "Draft:") || absl::StartsWith(title, "[Draft]") ||
                 absl::StartsWith(title, "(Draft)");
    std::string sha;
    if (auto branch = ReadBranch(BareDir(p), mr["source_branch"]); branch.ok()) sha = branch->sha;
    return {{"id", mr["id"]},
            {"iid", mr["iid"]},
            {"project_id", p["id"]},
            {"title", title},
            {"description", mr["description"]},
            {"state", mr["state"]},
            {"source_branch", mr["source_branch"]},
            {"target_branch", mr["target_branch"]},
            {"source_project_id", p["id"]},
            {"target_project_id", p["id"]},
            {"draft", draft},
            {"work_in_progress", draft},
            {"sha", sha},
            {"author", UserJson()},
            {"created_at", mr["created_at"]},
            {"web_url", absl::StrCat(BaseUrl(), "/", p["path"].get<std::string>(), "/-/merge_requests/",
                                     mr["iid"].get<int>())}};
  }

  void HandleNotes(const httplib::Request& req, httplib::Response& res, bool post);
  void HandleCreateMergeRequest(const httplib::Request& req, httplib::Response& res);
  void HandleChat(const httplib::Request& req, httplib::Response& res);
  void HandleGit(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader* reader);

  ForgeOptions options_;
  httplib::Server server_;
  int port_ = 0;
  json fixtures_;  // model.json

  std::mutex mu_;
  json state_;
  std::map<int, std::string> model_modes_;  // per issue iid, runtime overrides
  json model_requests_ = json::array();
  bool stopping_ = false;
  std::condition_variable stop_cv_;
};

absl::Status ForgeServer::Impl::LoadOrSeed() {
  SR_ASSIGN_OR_RETURN(fixtures_, ReadJsonFile(options_.fixtures_dir + "/model.json"));
  SR_RETURN_IF_ERROR(MakeDirs(options_.state_dir, 0700));
  if (::access(StatePath().c_str(), F_OK) == 0) {
    SR_ASSIGN_OR_RETURN(state_, ReadJsonFile(StatePath()));
    return absl::OkStatus();
  }
  SR_ASSIGN_OR_RETURN(json issues, ReadJsonFile(options_.fixtures_dir + "/issues.json"));
  state_ = {{"next_id", json::object()}, {"projects", json::array()}};
  json project = {{"id", 1}, {"path", kProjectPath}, {"issues", json::array()}, {"merge_requests", json::array()}};
  for (const json& issue : issues) {
    project["issues"].push_back({{"id", 100 + issue["iid"].get<int>()},
                                 {"iid", issue["iid"]},
                                 {"title", issue["title"]},
                                 {"description", issue["description"]},
                                 {"created_at", NowIso()},
                                 {"notes", json::array()}});
  }
  SR_RETURN_IF_ERROR(SeedBareRepository(options_.fixtures_dir + "/calculator", BareDir(project)));
  state_["projects"].push_back(std::move(project));
  // The repository first, the state last: a seed interrupted halfway is redone from scratch.
  return WriteFileAtomically(StatePath(), state_.dump(1), 0600);
}

absl::StatusOr<std::string> ForgeServer::Impl::Bind() {
  Routes();
  if (options_.port == 0) {
    port_ = server_.bind_to_any_port("127.0.0.1");
  } else {
    port_ = server_.bind_to_port("127.0.0.1", options_.port) ? options_.port : -1;
  }
  if (port_ <= 0) return absl::UnavailableError("cannot bind 127.0.0.1");
  return BaseUrl();
}

void ForgeServer::Impl::Routes() {
  // Handlers run on httplib's threads; an exception must never escape into them.
  server_.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    ReplyMessage(res, 500, absl::StrCat("500 Internal Server Error: ", what));
  });
  // git pushes can be large and slow on a loaded machine.
  server_.set_read_timeout(60, 0);
  server_.set_write_timeout(60, 0);
  // As GitLab's front (nginx, tcp_nodelay on by default): a reply's header and body are separate
  // writes, and with Nagle's algorithm the body waited for the client's delayed ACK (~40 ms).
  server_.set_tcp_nodelay(true);

  auto api = [this](auto handler) {
    return [this, handler](const httplib::Request& req, httplib::Response& res) {
      if (!ApiAuthorized(req)) return ReplyMessage(res, 401, "401 Unauthorized");
      std::lock_guard<std::mutex> lock(mu_);
      handler(req, res);
    };
  };
  // Runs `handler` with the project of match 1, or answers 404 as GitLab does.
  auto with_project = [this, api](auto handler) {
    return api([this, handler](const httplib::Request& req, httplib::Response& res) {
      json* project = FindProject(req.matches[1]);
      if (project == nullptr) return ReplyMessage(res, 404, "404 Project Not Found");
      handler(req, res, *project);
    });
  };

  server_.Get("/api/v4/user", api([this](const httplib::Request&, httplib::Response& res) {
                Reply(res, 200, UserJson());
              }));
  // Creates an empty project: {"path": "group/name"} (GitLab takes name and namespace_id; the
  // forge keeps it to the path). Benchmarks fill it by pushing.
  server_.Post("/api/v4/projects", api([this](const httplib::Request& req, httplib::Response& res) {
                 std::string path = Param(req, ParseBody(req), "path").value_or("");
                 if (path.find('/') == std::string::npos || absl::StrContains(path, "..")) {
                   return Reply(res, 400, {{"error", "path must be group/name"}});
                 }
                 if (FindProject(path) != nullptr) {
                   return Reply(res, 400, {{"message", {{"path", {"has already been taken"}}}}});
                 }
                 json project = {{"id", static_cast<int>(state_["projects"].size()) + 1}, {"path", path},
                                 {"issues", json::array()}, {"merge_requests", json::array()}};
                 if (absl::Status s = InitBareRepository(BareDir(project)); !s.ok()) {
                   return ReplyMessage(res, 500, std::string(s.message()));
                 }
                 state_["projects"].push_back(project);
                 Persist();
                 Reply(res, 201, ProjectJson(project));
               }));
  server_.Get(R"(/api/v4/projects/(.+)/issues/(\d+)/notes)",
              [this](const httplib::Request& req, httplib::Response& res) { HandleNotes(req, res, false); });
  server_.Post(R"(/api/v4/projects/(.+)/issues/(\d+)/notes)",
               [this](const httplib::Request& req, httplib::Response& res) { HandleNotes(req, res, true); });
  server_.Get(R"(/api/v4/projects/(.+)/issues/(\d+))",
              with_project([this](const httplib::Request& req, httplib::Response& res, json& p) {
                json* issue = FindByIid(p["issues"], std::stoi(req.matches[2]));
                if (issue == nullptr) return ReplyMessage(res, 404, "404 Not found");
                Reply(res, 200, IssueJson(p, *issue));
              }));
  // Runs `handler` with the project of match 1 and its MR of match 2, or answers 404.
  auto with_mr = [with_project](auto handler) {
    return with_project([handler](const httplib::Request& req, httplib::Response& res, json& p) {
      json* mr = FindByIid(p["merge_requests"], std::stoi(req.matches[2]));
      if (mr == nullptr) return ReplyMessage(res, 404, "404 Not found");
      handler(res, p, *mr);
    });
  };
  server_.Get(R"(/api/v4/projects/(.+)/merge_requests/(\d+)/changes)",
              with_mr([this](httplib::Response& res, json& p, json& mr) {
                json out = MergeRequestJson(p, mr);
                out["changes"] = json::array();
                auto changes = DiffBranches(BareDir(p), mr["target_branch"], mr["source_branch"]);
                if (!changes.ok()) return ReplyMessage(res, 500, std::string(changes.status().message()));
                for (const FileChange& c : *changes) {
                  out["changes"].push_back({{"old_path", c.old_path}, {"new_path", c.new_path},
                                            {"new_file", c.new_file}, {"deleted_file", c.deleted_file},
                                            {"renamed_file", c.old_path != c.new_path}, {"diff", c.diff}});
                }
                Reply(res, 200, out);
              }));
  server_.Get(R"(/api/v4/projects/(.+)/merge_requests/(\d+))",
              with_mr([this](httplib::Response& res, json& p, json& mr) { Reply(res, 200, MergeRequestJson(p, mr)); }));
  server_.Get(R"(/api/v4/projects/(.+)/merge_requests)",
              with_project([this](const httplib::Request& req, httplib::Response& res, json& p) {
                json out = json::array();
                for (const json& mr : p["merge_requests"]) {
                  if (req.has_param("source_branch") && mr["source_branch"] != req.get_param_value("source_branch")) continue;
                  if (req.has_param("target_branch") && mr["target_branch"] != req.get_param_value("target_branch")) continue;
                  std::string state = req.has_param("state") ? req.get_param_value("state") : "all";
                  if (state != "all" && mr["state"] != state) continue;
                  out.push_back(MergeRequestJson(p, mr));
                }
                Reply(res, 200, out);
              }));
  server_.Post(R"(/api/v4/projects/(.+)/merge_requests)",
               [this](const httplib::Request& req, httplib::Response& res) { HandleCreateMergeRequest(req, res); });
  server_.Get(R"(/api/v4/projects/(.+)/repository/branches/(.+))",
              with_project([this](const httplib::Request& req, httplib::Response& res, json& p) {
                std::string name = httplib::detail::decode_url(req.matches[2], false);
                auto branch = ReadBranch(BareDir(p), name);
                if (!branch.ok()) return ReplyMessage(res, 404, "404 Branch Not Found");
                Reply(res, 200, {{"name", name},
                                 {"merged", false},
                                 {"protected", name == "main"},
                                 {"commit", {{"id", branch->sha}, {"title", branch->title},
                                             {"message", branch->message}, {"author_name", branch->author_name}}}});
              }));
  server_.Get(R"(/api/v4/projects/(.+))",
              with_project([this](const httplib::Request&, httplib::Response& res, json& p) {
                Reply(res, 200, ProjectJson(p));
              }));

  server_.Post("/v1/chat/completions",
               [this](const httplib::Request& req, httplib::Response& res) { HandleChat(req, res); });
  // Test controls for the fake model (not GitLab's): switch an issue's mode, list the prompts seen.
  server_.Put("/-/model/mode", api([this](const httplib::Request& req, httplib::Response& res) {
                int iid = 0;
                if (!absl::SimpleAtoi(req.get_param_value("iid"), &iid) || !req.has_param("mode")) {
                  return ReplyMessage(res, 400, "400 Bad request - iid and mode are required");
                }
                model_modes_[iid] = req.get_param_value("mode");
                Reply(res, 200, {{"iid", iid}, {"mode", model_modes_[iid]}});
              }));
  server_.Get("/-/model/requests", api([this](const httplib::Request&, httplib::Response& res) {
                Reply(res, 200, model_requests_);
              }));

  server_.Get(R"(/(.+\.git)(/.*))",
              [this](const httplib::Request& req, httplib::Response& res) { HandleGit(req, res, nullptr); });
  server_.Post(R"(/(.+\.git)(/.*))",
               [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader) {
                 HandleGit(req, res, &reader);
               });
}

void ForgeServer::Impl::HandleNotes(const httplib::Request& req, httplib::Response& res, bool post) {
  if (!ApiAuthorized(req)) return ReplyMessage(res, 401, "401 Unauthorized");
  std::lock_guard<std::mutex> lock(mu_);
  json* project = FindProject(req.matches[1]);
  if (project == nullptr) return ReplyMessage(res, 404, "404 Project Not Found");
  json* issue = FindByIid((*project)["issues"], std::stoi(req.matches[2]));
  if (issue == nullptr) return ReplyMessage(res, 404, "404 Not found");
  if (!post) {
    json out = json::array();
    // GitLab lists notes newest first by default.
    for (auto it = (*issue)["notes"].rbegin(); it != (*issue)["notes"].rend(); ++it) {
      out.push_back(NoteJson(*issue, *it));
    }
    return Reply(res, 200, out);
  }
  std::optional<std::string> body = Param(req, ParseBody(req), "body");
  if (!body || body->empty()) return Reply(res, 400, {{"error", "body is missing"}});
  json note = {{"id", NextId("note")}, {"body", *body}, {"created_at", NowIso()}};
  (*issue)["notes"].push_back(note);
  Persist();
  Reply(res, 201, NoteJson(*issue, note));
}

void ForgeServer::Impl::HandleCreateMergeRequest(const httplib::Request& req, httplib::Response& res) {
  if (!ApiAuthorized(req)) return ReplyMessage(res, 401, "401 Unauthorized");
  std::lock_guard<std::mutex> lock(mu_);
  json* project = FindProject(req.matches[1]);
  if (project == nullptr) return ReplyMessage(res, 404, "404 Project Not Found");
  json body = ParseBody(req);
  std::optional<std::string> source = Param(req, body, "source_branch");
  std::optional<std::string> target = Param(req, body, "target_branch");
  std::optional<std::string> title = Param(req, body, "title");
  for (const auto& [name, value] : {std::pair{"source_branch", source}, {"target_branch", target}, {"title", title}}) {
    if (!value || value->empty()) return Reply(res, 400, {{"error", absl::StrCat(name, " is missing")}});
  }
  // As GitLab: not into itself, and one open MR per source and target (a branch may have
  // several, into different targets).
  if (*source == *target) {
    return Reply(res, 422, {{"message", {"You can't use same project/branch for source and target"}}});
  }
  for (const std::string& branch : {*source, *target}) {
    if (!ReadBranch(BareDir(*project), branch).ok()) {
      return Reply(res, 422, {{"message", {absl::StrCat("Branch ", branch, " does not exist")}}});
    }
  }
  for (const json& mr : (*project)["merge_requests"]) {
    if (mr["source_branch"] == *source && mr["target_branch"] == *target && mr["state"] == "opened") {
      return Reply(res, 409, {{"message", {absl::StrCat("Another open merge request already exists for this "
                                                        "source branch: !", mr["iid"].get<int>())}}});
    }
  }
  std::string draft = Param(req, body, "draft").value_or("false");
  std::string final_title = *title;
  if (draft == "true" && !absl::StartsWith(final_title, "Draft:")) final_title = "Draft: " + final_title;
  int iid = static_cast<int>((*project)["merge_requests"].size()) + 1;
  json mr = {{"id", NextId("merge_request")},
             {"iid", iid},
             {"title", final_title},
             {"description", Param(req, body, "description").value_or("")},
             {"state", "opened"},
             {"source_branch", *source},
             {"target_branch", *target},
             {"created_at", NowIso()}};
  (*project)["merge_requests"].push_back(mr);
  Persist();
  Reply(res, 201, MergeRequestJson(*project, mr));
}

void ForgeServer::Impl::HandleChat(const httplib::Request& req, httplib::Response& res) {
  // The model key, or the forge's own token: GitLab's AI gateway also takes the user's token.
  const std::string auth = req.get_header_value("Authorization");
  if (auth != absl::StrCat("Bearer ", options_.model_key) && auth != absl::StrCat("Bearer ", options_.token)) {
    return Reply(res, 401, {{"error", {{"message", "Incorrect API key provided."},
                                       {"type", "invalid_request_error"},
                                       {"code", "invalid_api_key"}}}});
  }
  json request = json::parse(req.body, nullptr, false);
  if (request.is_discarded() || !request.contains("messages") || !request["messages"].is_array() ||
      request["messages"].empty()) {
    return Reply(res, 400, {{"error", {{"message", "messages is required"}, {"type", "invalid_request_error"}}}});
  }
  std::string all_text, last_user;
  for (const json& m : request["messages"]) {
    std::string content = m.value("content", "");
    all_text += content + "\n";
    if (m.value("role", "") == "user") last_user = content;
  }
  const std::string feedback_marker = fixtures_.value("feedback_marker", "");
  const std::string retry_marker = fixtures_.value("retry_marker", "");
  const bool feedback = !feedback_marker.empty() && absl::StrContains(all_text, feedback_marker);
  const bool retry = !retry_marker.empty() && absl::StrContains(last_user, retry_marker);

  int iid = 0;
  std::string mode = "diff";
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const json& project : state_["projects"]) {
      for (const json& issue : project["issues"]) {
        if (absl::StrContains(all_text, issue["title"].get<std::string>())) iid = issue["iid"];
      }
    }
    if (auto it = model_modes_.find(iid); it != model_modes_.end()) mode = it->second;
    model_requests_.push_back({{"iid", iid}, {"mode", mode}, {"feedback", feedback}, {"retry", retry},
                               {"last_user_message", last_user}});
  }

  if (options_.model_latency_ms > 0) {
    std::unique_lock<std::mutex> lock(mu_);
    stop_cv_.wait_for(lock, std::chrono::milliseconds(options_.model_latency_ms), [this] { return stopping_; });
  }
  std::string content;
  const json issue_fixture = fixtures_["issues"].value(std::to_string(iid), json::object());
  auto diff_answer = [&](const std::string& file_key, const std::string& summary_key) -> std::string {
    auto diff = ReadFile(absl::StrCat(options_.fixtures_dir, "/", fixtures_.value(file_key, issue_fixture.value(file_key, ""))));
    if (!diff.ok()) return fixtures_.value("junk", "");
    return absl::StrCat("Summary: ", issue_fixture.value(summary_key, issue_fixture.value("summary", "Changes.")),
                        "\n\n```diff\n", *diff, "```\n");
  };
  if (iid == 0 || issue_fixture.empty() || mode == "junk") {
    content = fixtures_.value("junk", "");
  } else if (mode == "sleep") {
    std::unique_lock<std::mutex> lock(mu_);
    stop_cv_.wait_for(lock, std::chrono::seconds(options_.model_sleep_seconds), [this] { return stopping_; });
    content = fixtures_.value("junk", "");
  } else if (mode == "stale" || (mode == "stale-once" && !retry)) {
    content = diff_answer("stale", "summary");
  } else if (feedback && issue_fixture.contains("fix")) {
    content = diff_answer("fix", "fix_summary");
  } else {
    content = diff_answer("first", "summary");
  }
  if (mode == "malformed") {
    // A 200 that is not a chat completion (a misconfigured gateway, another API behind the URL).
    return Reply(res, 200, {{"object", "error"}, {"detail", "not what you asked for"}});
  }
  static std::atomic<int> completion_id{0};
  Reply(res, 200,
        {{"id", absl::StrCat("chatcmpl-", ++completion_id)},
         {"object", "chat.completion"},
         {"created", absl::ToUnixSeconds(absl::Now())},
         {"model", request.value("model", "fake")},
         {"choices", {{{"index", 0}, {"message", {{"role", "assistant"}, {"content", content}}},
                       {"finish_reason", "stop"}}}},
         {"usage", {{"prompt_tokens", all_text.size() / 4}, {"completion_tokens", content.size() / 4},
                    {"total_tokens", (all_text.size() + content.size()) / 4}}}});
}

void ForgeServer::Impl::HandleGit(const httplib::Request& req, httplib::Response& res,
                                  const httplib::ContentReader* reader) {
  if (!GitAuthorized(req)) {
    res.set_header("WWW-Authenticate", "Basic realm=\"GitLab\"");
    res.status = 401;
    res.set_content("HTTP Basic: Access denied\n", "text/plain");
    return;
  }
  std::string project_path(absl::StripSuffix(std::string(req.matches[1]), ".git"));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (FindProject(project_path) == nullptr) {
      res.status = 404;
      res.set_content("The project you were looking for could not be found.\n", "text/plain");
      return;
    }
  }
  CgiRequest cgi;
  cgi.method = req.method;
  cgi.path_info = absl::StrCat("/", project_path, ".git", std::string(req.matches[2]));
  std::string query;
  for (const auto& [k, v] : req.params) absl::StrAppend(&query, query.empty() ? "" : "&", k, "=", v);
  cgi.query = query;
  cgi.content_type = req.get_header_value("Content-Type");
  cgi.git_protocol = req.get_header_value("Git-Protocol");
  cgi.remote_user = "agent";
  // The body goes to an unlinked file, so a large push never sits in memory and the CGI reads
  // it as a plain stdin.
  UniqueFd body;
  if (reader != nullptr) {
    body.Reset(::open(options_.state_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!body) return ReplyMessage(res, 500, "cannot buffer the request body");
    bool ok = true;
    (*reader)([&](const char* data, size_t size) {
      ok = ok && WriteAll(body.get(), absl::string_view(data, size)).ok();
      cgi.body_size += size;
      return ok;
    });
    if (!ok || ::lseek(body.get(), 0, SEEK_SET) != 0) return ReplyMessage(res, 500, "cannot buffer the request body");
    cgi.body_fd = body.get();
  }
  auto out = RunGitHttpBackend(ReposDir(), cgi, 120);
  if (!out.ok()) {
    SR_LOG(ERROR) << "git http-backend: " << out.status();
    return ReplyMessage(res, 500, std::string(out.status().message()));
  }
  res.status = out->status;
  std::string content_type = "application/octet-stream";
  for (const auto& [name, value] : out->headers) {
    if (absl::EqualsIgnoreCase(name, "Content-Type")) {
      content_type = value;
    } else if (!absl::EqualsIgnoreCase(name, "Content-Length")) {
      res.set_header(name.c_str(), value);
    }
  }
  res.set_content(std::move(out->body), content_type.c_str());
}

ForgeServer::ForgeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ForgeServer::~ForgeServer() = default;

absl::StatusOr<std::unique_ptr<ForgeServer>> ForgeServer::Create(ForgeOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  SR_RETURN_IF_ERROR(impl->LoadOrSeed());
  return std::unique_ptr<ForgeServer>(new ForgeServer(std::move(impl)));
}

absl::StatusOr<std::string> ForgeServer::Bind() { return impl_->Bind(); }
absl::Status ForgeServer::Serve() { return impl_->Serve(); }
void ForgeServer::Stop() { impl_->Stop(); }

}  // namespace step_runner::forge

#include "steps-catalog/helper/generate.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/http.h"
#include "steps-catalog/helper/patch.h"

namespace step_runner::catalog {

using json = nlohmann::json;

namespace {

constexpr char kSystemPrompt[] =
    "You are a careful software engineer working in a git repository. Make the change the task "
    "asks for, with tests when the project has them. Answer with one line 'Summary: <what you "
    "changed>' followed by exactly one unified diff in a ```diff fenced block, with paths relative "
    "to the repository root prefixed a/ and b/ (use /dev/null for new files). Do not explain "
    "further.";

constexpr size_t kMaxFeedbackBytes = 8 * 1024;

void ListFiles(git_repository* repo, const std::string& root, const std::string& rel, std::vector<std::string>* out) {
  DIR* d = ::opendir((rel.empty() ? root : absl::StrCat(root, "/", rel)).c_str());
  if (d == nullptr) return;
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(d)) names.emplace_back(entry->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    if (name == "." || name == ".." || name == ".git") continue;
    std::string path = rel.empty() ? name : absl::StrCat(rel, "/", name);
    int ignored = 0;
    if (git_ignore_path_is_ignored(&ignored, repo, path.c_str()) == 0 && ignored) continue;
    struct stat st;
    if (::lstat(absl::StrCat(root, "/", path).c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      ListFiles(repo, root, path, out);
    } else if (S_ISREG(st.st_mode)) {
      out->push_back(path);
    }
  }
}

absl::Status WriteArtifact(const std::string& dir, const std::string& name, const std::string& text,
                           const SecretMasker& masker) {
  if (dir.empty()) return absl::OkStatus();
  return WriteFileAtomically(absl::StrCat(dir, "/", name), masker.Mask(text), 0600);
}

}  // namespace

std::string ChatCompletionsUrl(absl::string_view endpoint) {
  endpoint = absl::StripSuffix(endpoint, "/");
  if (absl::EndsWith(endpoint, "/chat/completions")) return std::string(endpoint);
  if (absl::EndsWith(endpoint, "/v1")) return absl::StrCat(endpoint, "/chat/completions");
  return absl::StrCat(endpoint, "/v1/chat/completions");
}

absl::StatusOr<RepositoryContext> CollectContext(const std::string& dir, absl::string_view task, size_t budget) {
  EnsureLibgit2();
  git_repository* raw_repo = nullptr;
  if (int rc = git_repository_open(&raw_repo, dir.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("open repository ", dir));
  }
  RepositoryPtr repo(raw_repo);
  RepositoryContext context;
  ListFiles(repo.get(), dir, "", &context.files);
  std::vector<std::pair<bool, std::string>> order;  // (not named in the task, path)
  for (const std::string& path : context.files) {
    std::string base = path.substr(path.rfind('/') + 1);
    order.emplace_back(!(absl::StrContains(task, path) || absl::StrContains(task, base)), path);
  }
  std::vector<std::pair<std::string, std::string>> named, rest;
  for (const auto& [unnamed, path] : order) {
    auto text = ReadFile(absl::StrCat(dir, "/", path));
    if (!text.ok() || text->find('\0') != std::string::npos) continue;  // unreadable or binary
    (unnamed ? rest : named).emplace_back(path, *std::move(text));
  }
  std::stable_sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) { return a.second.size() < b.second.size(); });
  size_t used = 0;
  for (auto* group : {&named, &rest}) {
    for (auto& [path, text] : *group) {
      if (used + text.size() > budget) continue;
      used += text.size();
      context.contents.emplace_back(path, std::move(text));
    }
  }
  return context;
}

std::string BuildPrompt(const GenerateRequest& request, const RepositoryContext& context) {
  std::string prompt = absl::StrCat("## Task\n", request.title, "\n\n", request.description, "\n");
  if (!request.feedback.empty()) {
    absl::string_view feedback = request.feedback;
    if (feedback.size() > kMaxFeedbackBytes) feedback = feedback.substr(feedback.size() - kMaxFeedbackBytes);
    absl::StrAppend(&prompt, "\n", kFeedbackHeading,
                    "\nThe tests fail with your previous change applied (it is in the files below). "
                    "Fix the code so they pass.\n```\n", feedback, "\n```\n");
  }
  absl::StrAppend(&prompt, "\n## Repository files\n");
  for (const std::string& path : context.files) absl::StrAppend(&prompt, path, "\n");
  for (const auto& [path, text] : context.contents) {
    absl::StrAppend(&prompt, "\n## File: ", path, "\n```\n", text, absl::EndsWith(text, "\n") ? "" : "\n", "```\n");
  }
  absl::StrAppend(&prompt, "\nAnswer with 'Summary: ...' and one ```diff block.\n");
  return prompt;
}

absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request, const SecretMasker& masker) {
  if (!request.artifacts_dir.empty()) SR_RETURN_IF_ERROR(MakeDirs(request.artifacts_dir, 0700));
  SR_ASSIGN_OR_RETURN(RepositoryContext context,
                      CollectContext(request.dir, absl::StrCat(request.title, "\n", request.description, "\n", request.feedback),
                                     request.context_budget));
  json messages = json::array({{{"role", "system"}, {"content", kSystemPrompt}},
                               {{"role", "user"}, {"content", BuildPrompt(request, context)}}});
  const std::string url = ChatCompletionsUrl(request.endpoint);
  std::string problem;
  for (int attempt = 1; attempt <= request.max_attempts; ++attempt) {
    json body = {{"model", request.model}, {"messages", messages}, {"temperature", 0}};
    const std::string payload = body.dump(-1, ' ', false, json::error_handler_t::replace);
    SR_RETURN_IF_ERROR(WriteArtifact(request.artifacts_dir, absl::StrCat("attempt-", attempt, "-request.json"),
                                     body.dump(2, ' ', false, json::error_handler_t::replace), masker));
    std::cerr << "generate: attempt " << attempt << "/" << request.max_attempts << ": asking " << request.model
              << " at " << url << "\n";
    HttpRequest http{.method = "POST", .url = url, .headers = AuthHeaders(AuthScheme::kBearer, request.api_key),
                     .body = payload, .timeout = request.timeout};
    SR_ASSIGN_OR_RETURN(HttpResponse response, Fetch(http));
    SR_RETURN_IF_ERROR(WriteArtifact(request.artifacts_dir, absl::StrCat("attempt-", attempt, "-response.json"),
                                     response.body, masker));
    if (response.status == 401 || response.status == 403) {
      return absl::UnauthenticatedError(absl::StrCat("the model endpoint rejected the key (", response.status, ") at ", url));
    }
    if (response.status != 200) {
      return absl::UnavailableError(absl::StrCat("the model endpoint answered ", response.status, " at ", url, ": ",
                                                 masker.Mask(response.body.substr(0, 300))));
    }
    json parsed = json::parse(response.body, nullptr, false);
    std::string content;
    if (!parsed.is_discarded() && parsed.contains("choices") && parsed["choices"].is_array() &&
        !parsed["choices"].empty() && parsed["choices"][0].contains("message") &&
        parsed["choices"][0]["message"].value("content", json()).is_string()) {
      content = parsed["choices"][0]["message"]["content"];
    } else {
      // Malformed at the protocol level: nothing to show the model, but another call may do.
      problem = "the endpoint's answer is not a chat completion (no choices[0].message.content)";
      std::cerr << "generate: attempt " << attempt << ": " << problem << "\n";
      continue;
    }
    absl::StatusOr<std::string> diff = ExtractDiff(content);
    absl::StatusOr<std::vector<std::string>> applied =
        diff.ok() ? ApplyDiff(request.dir, *diff) : absl::StatusOr<std::vector<std::string>>(diff.status());
    if (applied.ok()) {
      std::cerr << "generate: applied a diff touching " << applied->size() << " file(s)\n";
      return GenerateResult{*applied, ExtractSummary(content), attempt};
    }
    problem = std::string(applied.status().message());
    std::cerr << "generate: attempt " << attempt << ": " << problem << "\n";
    messages.push_back({{"role", "assistant"}, {"content", content}});
    messages.push_back(
        {{"role", "user"},
         {"content", diff.ok() ? absl::StrCat(kDidNotApply, ": ", problem,
                                              ". Answer again with a corrected unified diff against the files "
                                              "exactly as shown above.")
                               : "Your answer did not contain a unified diff. Answer with 'Summary: ...' and "
                                 "exactly one ```diff fenced block."}});
  }
  return absl::FailedPreconditionError(absl::StrCat("no usable diff from the model after ", request.max_attempts,
                                                    " attempts; last problem: ", problem));
}

}  // namespace step_runner::catalog

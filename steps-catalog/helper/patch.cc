#include "steps-catalog/helper/patch.h"

#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/git_util.h"

namespace step_runner::catalog {
namespace {

bool LooksLikeDiff(absl::string_view text) {
  return absl::StrContains(text, "\n@@ ") || absl::StartsWith(text, "@@ ") ||
         absl::StartsWith(text, "diff --git ") || absl::StartsWith(text, "--- ");
}

struct Hunk {
  int old_start = 0;
  int new_start = 0;
  int declared_old = -1;  // the header's counts; only to settle "--- " lines inside a hunk
  int declared_new = -1;
  int seen_old = 0;
  int seen_new = 0;
  std::string section;  // what follows the second "@@"
  std::vector<std::string> lines;
};

struct FilePatch {
  std::string old_path;  // "" for /dev/null
  std::string new_path;
  bool has_paths = false;
  std::vector<std::string> extra_headers;  // mode and rename lines, kept as given
  std::vector<Hunk> hunks;
};

// "a/x.py\t2024-..." -> "x.py"; "/dev/null" -> "".
std::string DiffPath(absl::string_view raw, absl::string_view prefix) {
  raw = absl::StripAsciiWhitespace(raw.substr(0, raw.find('\t')));
  if (raw == "/dev/null") return "";
  absl::ConsumePrefix(&raw, prefix);
  return std::string(raw);
}

absl::Status CheckPath(const std::string& path) {
  if (path.empty()) return absl::OkStatus();
  if (path[0] == '/') return absl::InvalidArgumentError(absl::StrCat("the diff names an absolute path: ", path));
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part == "..") return absl::InvalidArgumentError(absl::StrCat("the diff climbs out of the repository: ", path));
  }
  if (path == ".git" || absl::StartsWith(path, ".git/")) {
    return absl::InvalidArgumentError(absl::StrCat("the diff writes into .git: ", path));
  }
  return absl::OkStatus();
}

// "@@ -12,5 +12,7 @@ def f():" -> starts and the section text.
std::optional<Hunk> ParseHunkHeader(absl::string_view line) {
  absl::string_view rest = line.substr(3);
  size_t end = rest.find(" @@");
  if (end == absl::string_view::npos) return std::nullopt;
  std::vector<absl::string_view> ranges = absl::StrSplit(rest.substr(0, end), ' ', absl::SkipEmpty());
  if (ranges.size() != 2 || ranges[0][0] != '-' || ranges[1][0] != '+') return std::nullopt;
  Hunk hunk;
  auto parse = [](absl::string_view range, int* start, int* count) {
    range.remove_prefix(1);
    size_t comma = range.find(',');
    if (comma == absl::string_view::npos) {
      *count = 1;
    } else if (!absl::SimpleAtoi(range.substr(comma + 1), count)) {
      return false;
    }
    return absl::SimpleAtoi(range.substr(0, comma), start);
  };
  if (!parse(ranges[0], &hunk.old_start, &hunk.declared_old) || !parse(ranges[1], &hunk.new_start, &hunk.declared_new)) {
    return std::nullopt;
  }
  hunk.section = std::string(rest.substr(end + 3));
  return hunk;
}

}  // namespace

absl::StatusOr<std::string> ExtractDiff(absl::string_view answer) {
  std::optional<std::string> any_fenced;
  size_t pos = 0;
  while ((pos = answer.find("```", pos)) != absl::string_view::npos) {
    size_t info_end = answer.find('\n', pos);
    if (info_end == absl::string_view::npos) break;
    absl::string_view info = absl::StripAsciiWhitespace(answer.substr(pos + 3, info_end - pos - 3));
    size_t close = answer.find("\n```", info_end);
    absl::string_view body = answer.substr(info_end + 1, close == absl::string_view::npos
                                                             ? absl::string_view::npos
                                                             : close - info_end);
    if ((info == "diff" || info == "patch") && LooksLikeDiff(body)) return std::string(body);
    if (!any_fenced && LooksLikeDiff(body)) any_fenced = std::string(body);
    if (close == absl::string_view::npos) break;
    pos = close + 4;
  }
  if (any_fenced) return *any_fenced;
  for (absl::string_view marker : {"diff --git ", "--- "}) {
    size_t at = absl::StartsWith(answer, marker) ? 0 : answer.find(absl::StrCat("\n", marker));
    if (at == absl::string_view::npos) continue;
    absl::string_view body = answer.substr(at == 0 ? 0 : at + 1);
    if (LooksLikeDiff(body)) return std::string(body);
  }
  return absl::InvalidArgumentError("the answer contains no unified diff");
}

std::string ExtractSummary(absl::string_view answer) {
  for (absl::string_view line : absl::StrSplit(answer, '\n')) {
    absl::string_view stripped = absl::StripAsciiWhitespace(line);
    if (absl::ConsumePrefix(&stripped, "Summary:")) return std::string(absl::StripAsciiWhitespace(stripped));
  }
  for (absl::string_view line : absl::StrSplit(answer, '\n')) {
    absl::string_view stripped = absl::StripAsciiWhitespace(line);
    if (stripped.empty()) continue;
    if (absl::StartsWith(stripped, "```") || absl::StartsWith(stripped, "diff --git") ||
        absl::StartsWith(stripped, "--- ")) {
      break;
    }
    return std::string(stripped.substr(0, 200));
  }
  return "";
}

absl::StatusOr<NormalizedDiff> NormalizeDiff(absl::string_view diff) {
  std::vector<absl::string_view> lines = absl::StrSplit(diff, '\n');
  std::vector<FilePatch> files;
  Hunk* hunk = nullptr;  // the hunk whose body we are reading
  for (size_t i = 0; i < lines.size(); ++i) {
    absl::string_view line = absl::StripSuffix(lines[i], "\r");
    if (absl::StartsWith(line, "diff --git ")) {
      files.emplace_back();
      hunk = nullptr;
      // Paths come from ---/+++; a mode-only change has none, so read them from the header.
      std::vector<absl::string_view> parts = absl::StrSplit(line.substr(11), ' ');
      if (parts.size() == 2) {
        files.back().old_path = DiffPath(parts[0], "a/");
        files.back().new_path = DiffPath(parts[1], "b/");
      }
      continue;
    }
    // A removed "-- x" line followed by an added "++ y" looks like a file header. Inside a hunk
    // its header says is unfinished, and not followed by "@@" as a real file header is, it is
    // the body it most likely is. (Header counts alone are not trusted: models miscount.)
    const bool hunk_open = hunk != nullptr &&
                           (hunk->seen_old < hunk->declared_old || hunk->seen_new < hunk->declared_new) &&
                           !(i + 2 < lines.size() && absl::StartsWith(lines[i + 2], "@@ "));
    if (!hunk_open && absl::StartsWith(line, "--- ") && i + 1 < lines.size() && absl::StartsWith(lines[i + 1], "+++ ")) {
      if (files.empty() || files.back().has_paths || !files.back().hunks.empty()) files.emplace_back();
      FilePatch& file = files.back();
      file.old_path = DiffPath(line.substr(4), "a/");
      file.new_path = DiffPath(absl::StripSuffix(lines[i + 1], "\r").substr(4), "b/");
      file.has_paths = true;
      hunk = nullptr;
      ++i;
      continue;
    }
    if (absl::StartsWith(line, "@@ ")) {
      if (files.empty()) return absl::InvalidArgumentError("the diff has a hunk before any file header");
      std::optional<Hunk> parsed = ParseHunkHeader(line);
      if (!parsed) return absl::InvalidArgumentError(absl::StrCat("malformed hunk header: ", line));
      files.back().hunks.push_back(*std::move(parsed));
      hunk = &files.back().hunks.back();
      continue;
    }
    if (hunk != nullptr) {
      // Models and editors strip the space of an empty context line.
      absl::string_view body = line.empty() ? absl::string_view(" ") : line;
      if (body[0] == ' ' || body[0] == '+' || body[0] == '-' || body[0] == '\\') {
        hunk->seen_old += body[0] == ' ' || body[0] == '-';
        hunk->seen_new += body[0] == ' ' || body[0] == '+';
        hunk->lines.emplace_back(body);
        continue;
      }
      hunk = nullptr;  // prose after the hunk
    }
    if (!files.empty() && files.back().hunks.empty()) {
      for (absl::string_view header : {"new file mode ", "deleted file mode ", "old mode ", "new mode ",
                                       "rename from ", "rename to ", "similarity index "}) {
        if (absl::StartsWith(line, header)) files.back().extra_headers.emplace_back(line);
      }
    }
  }
  NormalizedDiff out;
  for (FilePatch& file : files) {
    // A diff ends with an empty line after the split; drop trailing blank context it produced.
    for (Hunk& h : file.hunks) {
      while (!h.lines.empty() && h.lines.back() == " ") h.lines.pop_back();
    }
    if (file.hunks.empty()) continue;
    SR_RETURN_IF_ERROR(CheckPath(file.old_path));
    SR_RETURN_IF_ERROR(CheckPath(file.new_path));
    if (file.old_path.empty() && file.new_path.empty()) {
      return absl::InvalidArgumentError("a file in the diff has no path");
    }
    const size_t file_start = out.text.size();
    const std::string& a = file.old_path.empty() ? file.new_path : file.old_path;
    const std::string& b = file.new_path.empty() ? file.old_path : file.new_path;
    absl::StrAppend(&out.text, "diff --git a/", a, " b/", b, "\n");
    bool has_mode = false;
    for (const std::string& header : file.extra_headers) {
      has_mode = has_mode || absl::StartsWith(header, "new file") || absl::StartsWith(header, "deleted file");
      absl::StrAppend(&out.text, header, "\n");
    }
    if (!has_mode && file.old_path.empty()) absl::StrAppend(&out.text, "new file mode 100644\n");
    if (!has_mode && file.new_path.empty()) absl::StrAppend(&out.text, "deleted file mode 100644\n");
    absl::StrAppend(&out.text, "--- ", file.old_path.empty() ? "/dev/null" : "a/" + file.old_path, "\n");
    absl::StrAppend(&out.text, "+++ ", file.new_path.empty() ? "/dev/null" : "b/" + file.new_path, "\n");
    for (const Hunk& h : file.hunks) {
      int old_count = 0, new_count = 0;
      for (const std::string& l : h.lines) {
        if (l[0] == ' ' || l[0] == '-') ++old_count;
        if (l[0] == ' ' || l[0] == '+') ++new_count;
      }
      // git writes the start of an empty side as the line before it (0 for a new file).
      int old_start = old_count == 0 && file.old_path.empty() ? 0 : h.old_start;
      int new_start = new_count == 0 && file.new_path.empty() ? 0 : h.new_start;
      absl::StrAppend(&out.text, "@@ -", old_start, ",", old_count, " +", new_start, ",", new_count, " @@",
                      h.section, "\n");
      for (const std::string& l : h.lines) absl::StrAppend(&out.text, l, "\n");
    }
    out.files.push_back(b);
    out.file_texts.push_back(out.text.substr(file_start));
  }
  if (out.files.empty()) return absl::InvalidArgumentError("the diff has no hunks");
  return out;
}

absl::StatusOr<std::vector<std::string>> ApplyDiff(const std::string& dir, absl::string_view diff) {
  SR_ASSIGN_OR_RETURN(NormalizedDiff normalized, NormalizeDiff(diff));
  EnsureLibgit2();
  git_repository* raw_repo = nullptr;
  if (int rc = git_repository_open(&raw_repo, dir.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("open repository ", dir));
  }
  RepositoryPtr repo(raw_repo);
  git_diff* raw_diff = nullptr;
  if (int rc = git_diff_from_buffer(&raw_diff, normalized.text.data(), normalized.text.size()); rc < 0) {
    return absl::InvalidArgumentError(absl::StrCat("the diff cannot be parsed: ", GitErrorToStatus(rc, "parse").message()));
  }
  DiffPtr parsed(raw_diff);
  if (int rc = git_apply(repo.get(), parsed.get(), GIT_APPLY_LOCATION_WORKDIR, nullptr); rc < 0) {
    std::string reason(GitErrorToStatus(rc, "apply").message());
    // libgit2 names the hunk, not the file; check each file alone to tell the model which.
    std::vector<std::string> failing;
    git_apply_options check = GIT_APPLY_OPTIONS_INIT;
    check.flags = GIT_APPLY_CHECK;
    for (size_t i = 0; i < normalized.files.size(); ++i) {
      git_diff* raw_one = nullptr;
      const std::string& one_text = normalized.file_texts[i];
      if (git_diff_from_buffer(&raw_one, one_text.data(), one_text.size()) < 0) continue;
      DiffPtr one(raw_one);
      if (git_apply(repo.get(), one.get(), GIT_APPLY_LOCATION_WORKDIR, &check) < 0) failing.push_back(normalized.files[i]);
    }
    return absl::FailedPreconditionError(absl::StrCat("the diff does not apply to ",
                                                      failing.empty() ? "the work tree" : absl::StrJoin(failing, ", "),
                                                      ": ", reason));
  }
  return normalized.files;
}

}  // namespace step_runner::catalog

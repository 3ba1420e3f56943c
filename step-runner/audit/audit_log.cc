#include "step-runner/audit/audit_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "step-runner/base/files.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::audit {
namespace {

const std::string kGenesis(64, '0');

// The file's lines (without their '\n'); a last line without one is returned in `torn`.
std::vector<std::string> SplitLines(const std::string& text, std::string* torn) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  // StrSplit gives one more (empty) piece after a final '\n'.
  *torn = lines.back();
  lines.pop_back();
  return lines;
}

struct Head {
  int64_t seq = 0;
  std::string hash;
};

std::optional<Head> ReadHead(const std::string& log_path) {
  absl::StatusOr<std::string> text = ReadFile(HeadPath(log_path));
  if (!text.ok() || text->empty()) return std::nullopt;
  std::vector<std::string> parts = absl::StrSplit(*text, absl::ByAnyChar(" \n"), absl::SkipEmpty());
  Head head;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &head.seq)) return Head{-1, ""};
  head.hash = parts[1];
  return head;
}

std::string Now() { return absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()); }

}  // namespace

std::string HeadPath(const std::string& log_path) { return log_path + ".head"; }

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  UniqueFd head(::open(HeadPath(path).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!head) return ErrnoStatus(errno, absl::StrCat("open(", HeadPath(path), ")"));
  std::unique_ptr<AuditLog> log(new AuditLog(path, std::move(fd), std::move(head)));
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string torn;
  std::vector<std::string> lines = SplitLines(text, &torn);
  std::optional<std::string> problem;
  {
    absl::MutexLock lock(&log->mu_);
    log->prev_ = kGenesis;
    if (!lines.empty()) {
      log->prev_ = Sha256Hex(lines.back());
      nlohmann::json last = nlohmann::json::parse(lines.back(), nullptr, false);
      log->seq_ = last.is_object() && last.contains("seq") && last["seq"].is_number_integer()
                      ? last["seq"].get<int64_t>()
                      : static_cast<int64_t>(lines.size());
    }
    if (!torn.empty()) {
      // A line cut short (a crash mid-write): end it, and chain on from it as it is.
      SR_RETURN_IF_ERROR(WriteAll(log->fd_.get(), "\n"));
      log->prev_ = Sha256Hex(torn);
      ++log->seq_;
      problem = "the last line was incomplete (cut short by a crash?)";
    }
    std::optional<Head> head_now = ReadHead(path);
    if (!problem && head_now && (head_now->seq != log->seq_ || head_now->hash != log->prev_)) {
      problem = absl::StrCat("the head file says line ", head_now->seq, " is the last, the log ends at line ",
                             log->seq_, " (lines removed, or the log replaced?)");
    }
  }
  if (problem) {
    SR_LOG(WARNING) << "audit log " << path << ": " << *problem;
    SR_RETURN_IF_ERROR(log->Append({{"kind", "audit_log_reopened"}, {"problem", *problem}}));
  }
  return log;
}

absl::Status AuditLog::Append(nlohmann::json fields) {
  absl::MutexLock lock(&mu_);
  fields["seq"] = seq_ + 1;
  fields["time"] = Now();
  fields["prev"] = prev_;
  // dump() with its default escaping: control characters and newlines never split a line, and
  // invalid UTF-8 is replaced rather than thrown.
  std::string line = fields.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  // One write per line (O_APPEND): concurrent daemons never interleave inside a line.
  SR_RETURN_IF_ERROR(WriteAll(fd_.get(), line + "\n"));
  ++seq_;
  prev_ = Sha256Hex(line);
  std::string head = absl::StrFormat("%020d %s\n", seq_, prev_);
  if (::pwrite(head_.get(), head.data(), head.size(), 0) != static_cast<ssize_t>(head.size())) {
    return ErrnoStatus(errno, absl::StrCat("pwrite(", HeadPath(path_), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Verify(const std::string& path) {
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string torn;
  std::vector<std::string> lines = SplitLines(text, &torn);
  if (!torn.empty()) {
    return absl::DataLossError(absl::StrCat("line ", lines.size() + 1, ": incomplete (no newline at the end)"));
  }
  std::string prev = kGenesis;
  int64_t prev_seq = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const size_t n = i + 1;
    nlohmann::json j = nlohmann::json::parse(lines[i], nullptr, false);
    if (!j.is_object() || !j.contains("prev") || !j["prev"].is_string() || !j.contains("seq") ||
        !j["seq"].is_number_integer()) {
      return absl::DataLossError(absl::StrCat("line ", n, ": not an audit record (edited?)"));
    }
    if (j["prev"].get<std::string>() != prev) {
      if (n == 1) return absl::DataLossError("line 1: does not start the chain (lines removed from the start?)");
      return absl::DataLossError(absl::StrCat("line ", n - 1, ": its hash does not match the prev of line ", n,
                                              ": line ", n - 1, " was changed, or lines were removed or "
                                              "reordered there"));
    }
    if (j["seq"].get<int64_t>() != prev_seq + 1) {
      return absl::DataLossError(absl::StrCat("line ", n, ": seq ", j["seq"].get<int64_t>(), " follows seq ",
                                              prev_seq, " (lines removed or reordered)"));
    }
    prev_seq = j["seq"].get<int64_t>();
    prev = Sha256Hex(lines[i]);
  }
  std::optional<Head> head = ReadHead(path);
  if (!head) {
    if (!lines.empty()) return absl::DataLossError(absl::StrCat(HeadPath(path), " is missing"));
  } else if (head->seq != prev_seq || head->hash != prev) {
    return absl::DataLossError(absl::StrCat("line ", lines.size(), ": the log ends at seq ", prev_seq,
                                            " but its head file records seq ", head->seq,
                                            " (lines removed from the end, or the last line changed)"));
  }
  return static_cast<int64_t>(lines.size());
}

std::string FormatLine(absl::string_view json_line) {
  nlohmann::json j = nlohmann::json::parse(json_line, nullptr, false);
  if (!j.is_object()) return std::string(json_line);
  std::string out = absl::StrFormat("%-27s %6d %-14s", j.value("time", ""), j.value("seq", int64_t{0}),
                                    j.value("kind", "?"));
  for (auto& [key, value] : j.items()) {
    if (key == "time" || key == "seq" || key == "kind" || key == "prev") continue;
    absl::StrAppend(&out, " ", key, "=", value.is_string() ? value.get<std::string>() : value.dump());
  }
  return out;
}

absl::Status Tail(const std::string& path, int lines, bool follow, const std::function<void(const std::string&)>& print,
                  const std::function<bool()>& stop) {
  SR_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string torn;
  std::vector<std::string> all = SplitLines(text, &torn);
  size_t first = lines >= 0 && all.size() > static_cast<size_t>(lines) ? all.size() - static_cast<size_t>(lines) : 0;
  for (size_t i = first; i < all.size(); ++i) print(FormatLine(all[i]));
  if (!follow) return absl::OkStatus();
  off_t offset = static_cast<off_t>(text.size() - torn.size());
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return ErrnoStatus(errno, absl::StrCat("open(", path, ")"));
  std::string pending;
  while (!stop()) {
    char buf[65536];
    ssize_t n = ::pread(fd.get(), buf, sizeof buf, offset);
    if (n < 0) return ErrnoStatus(errno, absl::StrCat("read(", path, ")"));
    if (n == 0) {
      absl::SleepFor(absl::Milliseconds(200));
      continue;
    }
    offset += n;
    pending.append(buf, static_cast<size_t>(n));
    size_t newline;
    while ((newline = pending.find('\n')) != std::string::npos) {
      print(FormatLine(absl::string_view(pending).substr(0, newline)));
      pending.erase(0, newline + 1);
    }
  }
  return absl::OkStatus();
}

}  // namespace step_runner::audit

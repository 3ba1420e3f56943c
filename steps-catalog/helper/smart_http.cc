#include "steps-catalog/helper/smart_http.h"

#include <algorithm>
#include <iostream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/status_macros.h"
#include "steps-catalog/helper/git_util.h"
#include "steps-catalog/helper/http.h"

namespace step_runner::catalog {
namespace {

constexpr size_t kMaxPktLine = 65520;  // git's LARGE_PACKET_MAX
constexpr absl::string_view kAgent = "agent=step-runner";

std::string ServiceUrl(const SmartHttpRemote& remote, absl::string_view rest) {
  return absl::StrCat(absl::StripSuffix(remote.url, "/"), rest);
}

// What a forge's HTTP status means for a git request.
absl::Status HttpError(const SmartHttpRemote& remote, const HttpResponse& response, absl::string_view what) {
  std::string said(absl::StripAsciiWhitespace(response.body.substr(0, 300)));
  std::string suffix = said.empty() ? "" : absl::StrCat(": ", said);
  switch (response.status) {
    case 401:
      return absl::UnauthenticatedError(remote.token.empty()
                                            ? "the forge asks for credentials and no token was given (SR_GIT_TOKEN)"
                                            : "the forge rejected the token (401 Unauthorized)");
    case 403:
      return absl::PermissionDeniedError(absl::StrCat(what, " ", remote.url, ": 403 Forbidden", suffix));
    case 404:
      return absl::NotFoundError(absl::StrCat(what, " ", remote.url, ": 404 Not Found", suffix));
    default:
      return absl::UnavailableError(absl::StrCat(what, " ", remote.url, ": HTTP ", response.status, suffix));
  }
}

// One stateless RPC: POST <url>/<service> with `body`; the answer goes to `sink` as it comes.
absl::Status PostToService(const SmartHttpRemote& remote, absl::string_view service, std::string body,
                           const std::function<absl::Status(absl::string_view)>& sink, absl::string_view what) {
  HttpRequest http{.method = "POST",
                   .url = ServiceUrl(remote, absl::StrCat("/", service)),
                   .headers = AuthHeaders(AuthScheme::kGitBasic, remote.token),
                   .body = std::move(body),
                   .content_type = absl::StrCat("application/x-", service, "-request"),
                   // A large repository over a slow link; the forge's own limits apply first.
                   // git's server sends progress while it counts and compresses, so a silence
                   // this long is a stall.
                   .timeout = absl::Hours(1),
                   .stall_timeout = absl::Minutes(2),
                   .body_sink = sink};
  http.headers.emplace_back("Accept", absl::StrCat("application/x-", service, "-result"));
  SR_ASSIGN_OR_RETURN(HttpResponse response, Fetch(http));
  if (response.status != 200) return HttpError(remote, response, what);
  return absl::OkStatus();
}

// The capabilities this client asks for: those it can use that the server offers.
std::string Capabilities(const RemoteRefs& refs, std::initializer_list<absl::string_view> wanted) {
  std::vector<absl::string_view> chosen;
  for (absl::string_view capability : wanted) {
    if (refs.Has(capability)) chosen.push_back(capability);
  }
  if (std::any_of(refs.capabilities.begin(), refs.capabilities.end(),
                  [](const std::string& c) { return absl::StartsWith(c, "agent="); })) {
    chosen.push_back(kAgent);
  }
  return absl::StrJoin(chosen, " ");
}

// A side-band packet: 1 is data, 2 progress (shown, as git does, on stderr), 3 a fatal error.
// Returns the data of band 1, empty for the others.
absl::StatusOr<absl::string_view> Demultiplex(absl::string_view payload, std::string* remote_messages) {
  if (payload.empty()) return absl::string_view();
  absl::string_view data = payload.substr(1);
  switch (payload[0]) {
    case 1:
      return data;
    case 2:
      std::cerr << "remote: " << data << (absl::EndsWith(data, "\n") || absl::EndsWith(data, "\r") ? "" : "\n");
      if (remote_messages != nullptr) remote_messages->append(data.data(), data.size());
      return absl::string_view();
    case 3:
      return absl::UnavailableError(
          absl::StrCat("the remote failed: ", absl::StripTrailingAsciiWhitespace(data)));
    default:
      return absl::DataLossError(absl::StrFormat("the remote sent side-band %d, which does not exist", payload[0]));
  }
}

absl::Status ErrPacket(absl::string_view payload) {
  absl::string_view message = payload;
  if (absl::ConsumePrefix(&message, "ERR ")) {
    return absl::FailedPreconditionError(
        absl::StrCat("the remote said: ", absl::StripTrailingAsciiWhitespace(message)));
  }
  return absl::OkStatus();
}

bool IsSha(absl::string_view s) {
  return s.size() == 40 && std::all_of(s.begin(), s.end(), [](char c) { return absl::ascii_isxdigit(c); });
}

}  // namespace

std::string PktLine(absl::string_view payload) {
  return absl::StrCat(absl::StrFormat("%04x", payload.size() + 4), payload);
}

void PktLineReader::Append(absl::string_view bytes) {
  // Keep the buffer from growing with everything ever received: drop what was read once it is
  // at least half of it.
  if (offset_ > 0 && offset_ * 2 >= buffer_.size()) {
    buffer_.erase(0, offset_);
    offset_ = 0;
  }
  buffer_.append(bytes.data(), bytes.size());
}

absl::StatusOr<std::optional<PktLineReader::Packet>> PktLineReader::Next() {
  if (pending() < 4) return std::nullopt;
  absl::string_view header(buffer_.data() + offset_, 4);
  uint32_t length = 0;
  if (!std::all_of(header.begin(), header.end(), [](char c) { return absl::ascii_isxdigit(c); }) ||
      !absl::SimpleHexAtoi(header, &length)) {
    return absl::DataLossError(absl::StrCat("not a git pkt-line (it starts with \"",
                                            absl::CHexEscape(header), "\"): is this a git smart HTTP server?"));
  }
  if (length == 0) {
    offset_ += 4;
    return Packet{.flush = true};
  }
  if (length < 4 || length > kMaxPktLine + 4) {
    return absl::DataLossError(absl::StrCat("a git pkt-line of impossible length ", length));
  }
  if (pending() < length) return std::nullopt;
  Packet packet{.payload = absl::string_view(buffer_.data() + offset_ + 4, length - 4)};
  offset_ += length;
  return packet;
}

absl::StatusOr<RemoteRefs> DiscoverRefs(const SmartHttpRemote& remote, absl::string_view service) {
  HttpRequest http{.url = ServiceUrl(remote, absl::StrCat("/info/refs?service=", service)),
                   .headers = AuthHeaders(AuthScheme::kGitBasic, remote.token),
                   .timeout = absl::Minutes(2)};
  SR_ASSIGN_OR_RETURN(HttpResponse response, Fetch(http));
  if (response.status != 200) return HttpError(remote, response, "list the refs of");
  PktLineReader reader;
  reader.Append(response.body);
  RemoteRefs refs;
  bool announced = false;  // "# service=..." then a flush
  bool first_ref = true;
  for (;;) {
    SR_ASSIGN_OR_RETURN(std::optional<PktLineReader::Packet> packet, reader.Next());
    if (!packet) {
      return absl::DataLossError(absl::StrCat("the ref list of ", remote.url, " ended early: is it a git smart HTTP server?"));
    }
    if (!announced) {
      if (packet->flush) {
        announced = true;
      } else if (!absl::StartsWith(packet->payload, "# service=")) {
        return absl::DataLossError(absl::StrCat(remote.url, " does not speak git's smart HTTP protocol"));
      }
      continue;
    }
    if (packet->flush) break;
    SR_RETURN_IF_ERROR(ErrPacket(packet->payload));
    absl::string_view line = absl::StripSuffix(packet->payload, "\n");
    if (first_ref) {
      first_ref = false;
      size_t nul = line.find('\0');
      if (nul != absl::string_view::npos) {
        for (absl::string_view capability : absl::StrSplit(line.substr(nul + 1), ' ', absl::SkipEmpty())) {
          refs.capabilities.emplace(capability);
          absl::string_view target = capability;
          if (absl::ConsumePrefix(&target, "symref=HEAD:")) refs.head_target = std::string(target);
        }
        line = line.substr(0, nul);
      }
    }
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(' ', 1));
    if (parts.size() != 2 || !IsSha(parts[0])) {
      return absl::DataLossError(absl::StrCat("a malformed ref line from ", remote.url, ": \"", absl::CHexEscape(line), "\""));
    }
    // Peeled tags ("^{}") and an empty repository's "capabilities^{}" are not refs.
    if (absl::EndsWith(parts[1], "^{}")) continue;
    refs.refs.emplace(std::string(parts[1]), std::string(parts[0]));
  }
  return refs;
}

absl::StatusOr<ShallowUpdate> FetchPack(const SmartHttpRemote& remote, const RemoteRefs& refs,
                                        const FetchRequest& request,
                                        const std::function<absl::Status(absl::string_view)>& pack_sink) {
  if (request.wants.empty()) return absl::InvalidArgumentError("a fetch needs at least one commit to ask for");
  const bool shallow = request.depth > 0 || !request.shallow.empty();
  if (shallow && !refs.Has("shallow")) {
    return absl::FailedPreconditionError(absl::StrCat(remote.url, " does not serve shallow history"));
  }
  if (!refs.Has("side-band-64k") && !refs.Has("side-band")) {
    return absl::FailedPreconditionError(absl::StrCat(remote.url, " offers no side-band, which this client needs"));
  }
  // No multi_ack: the server answers the haves with a single ACK (or NAK at "done"), and the pack
  // follows at once. One request carries everything (stateless RPC).
  std::string body;
  for (size_t i = 0; i < request.wants.size(); ++i) {
    body += i == 0 ? PktLine(absl::StrCat("want ", request.wants[i], " ",
                                          Capabilities(refs, {"side-band-64k", "ofs-delta", "shallow"}), "\n"))
                   : PktLine(absl::StrCat("want ", request.wants[i], "\n"));
  }
  for (const std::string& sha : request.shallow) body += PktLine(absl::StrCat("shallow ", sha, "\n"));
  if (request.depth > 0) body += PktLine(absl::StrCat("deepen ", request.depth, "\n"));
  absl::StrAppend(&body, kFlushPkt);
  for (const std::string& sha : request.haves) body += PktLine(absl::StrCat("have ", sha, "\n"));
  body += PktLine("done\n");

  enum class Phase { kShallowList, kAcknowledgements, kPack, kDone };
  Phase phase = shallow ? Phase::kShallowList : Phase::kAcknowledgements;
  ShallowUpdate update;
  PktLineReader reader;
  auto take = [&](absl::string_view bytes) -> absl::Status {
    reader.Append(bytes);
    for (;;) {
      SR_ASSIGN_OR_RETURN(std::optional<PktLineReader::Packet> packet, reader.Next());
      if (!packet) return absl::OkStatus();
      if (phase == Phase::kDone) return absl::DataLossError("the remote sent more after the end of the pack");
      if (packet->flush) {
        if (phase == Phase::kShallowList) {
          phase = Phase::kAcknowledgements;
        } else if (phase == Phase::kPack) {
          phase = Phase::kDone;
        } else {
          return absl::DataLossError("the remote ended its answer before sending a pack");
        }
        continue;
      }
      SR_RETURN_IF_ERROR(ErrPacket(packet->payload));
      absl::string_view line = absl::StripSuffix(packet->payload, "\n");
      if (phase == Phase::kShallowList) {
        absl::string_view sha = line;
        if (absl::ConsumePrefix(&sha, "shallow ") && IsSha(sha)) {
          update.shallow.emplace_back(sha);
        } else if (absl::ConsumePrefix(&sha, "unshallow ") && IsSha(sha)) {
          update.unshallow.emplace_back(sha);
        } else {
          return absl::DataLossError(absl::StrCat("unexpected in the remote's shallow list: \"", absl::CHexEscape(line), "\""));
        }
        continue;
      }
      if (phase == Phase::kAcknowledgements && (absl::StartsWith(line, "ACK ") || line == "NAK")) continue;
      phase = Phase::kPack;
      SR_ASSIGN_OR_RETURN(absl::string_view data, Demultiplex(packet->payload, nullptr));
      if (!data.empty()) SR_RETURN_IF_ERROR(pack_sink(data));
    }
  };
  SR_RETURN_IF_ERROR(PostToService(remote, "git-upload-pack", std::move(body), take, "fetch from"));
  if (phase != Phase::kDone || reader.pending() != 0) {
    return absl::DataLossError(absl::StrCat("the answer of ", remote.url, " ended before the pack did"));
  }
  return update;
}

absl::StatusOr<PushReport> SendPack(const SmartHttpRemote& remote, const RemoteRefs& refs, const RefUpdate& update,
                                    absl::string_view pack) {
  if (!refs.Has("report-status")) {
    return absl::FailedPreconditionError(absl::StrCat(remote.url, " does not report the outcome of a push (report-status)"));
  }
  const bool side_band = refs.Has("side-band-64k");
  std::string body = PktLine(absl::StrCat(update.old_sha, " ", update.new_sha, " ", update.ref, std::string(1, '\0'),
                                          Capabilities(refs, {"report-status", "side-band-64k"}), "\n"));
  absl::StrAppend(&body, kFlushPkt, pack);

  PushReport report;
  PktLineReader outer;   // side-band packets, when side-band is on
  PktLineReader status;  // the report-status lines
  bool outer_done = false;
  auto take = [&](absl::string_view bytes) -> absl::Status {
    if (!side_band) {
      status.Append(bytes);
      return absl::OkStatus();
    }
    outer.Append(bytes);
    for (;;) {
      SR_ASSIGN_OR_RETURN(std::optional<PktLineReader::Packet> packet, outer.Next());
      if (!packet) return absl::OkStatus();
      if (packet->flush) {
        outer_done = true;
        continue;
      }
      SR_ASSIGN_OR_RETURN(absl::string_view data, Demultiplex(packet->payload, &report.remote_messages));
      status.Append(data);
    }
  };
  SR_RETURN_IF_ERROR(PostToService(remote, "git-receive-pack", std::move(body), take, "push to"));
  bool unpacked = false, reported = false, status_done = false;
  for (;;) {
    SR_ASSIGN_OR_RETURN(std::optional<PktLineReader::Packet> packet, status.Next());
    if (!packet) break;
    if (packet->flush) {
      status_done = true;
      break;
    }
    absl::string_view line = absl::StripSuffix(packet->payload, "\n");
    if (absl::ConsumePrefix(&line, "unpack ")) {
      if (line != "ok") {
        const std::string said = WhatTheRemoteSaid(report.remote_messages);
        return absl::DataLossError(absl::StrCat("the forge could not unpack the pushed objects: ", line,
                                                said.empty() ? "" : "; the remote said: ", said));
      }
      unpacked = true;
    } else if (absl::ConsumePrefix(&line, "ok ")) {
      reported = reported || line == update.ref;
    } else if (absl::ConsumePrefix(&line, "ng ")) {
      std::pair<absl::string_view, absl::string_view> ref_reason = absl::StrSplit(line, absl::MaxSplits(' ', 1));
      report.rejected.push_back(absl::StrCat(ref_reason.first, ": ", ref_reason.second));
      reported = reported || ref_reason.first == update.ref;
    }
  }
  if (!unpacked || !reported || !status_done || (side_band && !outer_done)) {
    std::string said(absl::StripAsciiWhitespace(report.remote_messages));
    return absl::DataLossError(absl::StrCat("the forge's answer to the push of ", update.ref, " was cut short",
                                            said.empty() ? "" : "; the remote said: ", said));
  }
  return report;
}

}  // namespace step_runner::catalog

#ifndef STEP_RUNNER_STEPS_CATALOG_HELPER_SMART_HTTP_H_
#define STEP_RUNNER_STEPS_CATALOG_HELPER_SMART_HTTP_H_

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// Git's smart HTTP protocol (version 0, stateless RPC: what every forge serves), for the one
// thing libgit2 1.5 cannot do: shallow history. libgit2 has no `deepen` (it came in 1.7) and its
// revision walk fails on the missing parents of a shallow commit, so a shallow clone, a fetch
// into one and a push from one go over the wire here; libgit2 still indexes and builds the
// packs. Nothing here shells out to git.
namespace step_runner::catalog {

// One pkt-line: four hex digits of length (themselves included), then the payload.
std::string PktLine(absl::string_view payload);
inline constexpr absl::string_view kFlushPkt = "0000";

// Splits a byte stream into pkt-lines as it arrives.
class PktLineReader {
 public:
  struct Packet {
    bool flush = false;
    absl::string_view payload;  // valid until the next Append or Next
  };
  void Append(absl::string_view bytes);
  // The next whole packet; nullopt until more bytes come. A malformed length is an error.
  absl::StatusOr<std::optional<Packet>> Next();
  // Bytes received and not yet returned as a packet.
  size_t pending() const { return buffer_.size() - offset_; }

 private:
  std::string buffer_;
  size_t offset_ = 0;
};

struct SmartHttpRemote {
  std::string url;    // https://host/group/project.git; never carries credentials
  std::string token;  // sent as Basic (user "oauth2"); empty: no credentials
};

struct RemoteRefs {
  std::map<std::string, std::string> refs;  // "refs/heads/main" -> sha
  std::string head_target;                  // what HEAD points at ("refs/heads/main"), if said
  std::set<std::string> capabilities;       // "side-band-64k", "shallow", "agent=git/2.39", ...
  bool Has(absl::string_view capability) const { return capabilities.contains(std::string(capability)); }
};

// GET <url>/info/refs?service=<service>: the refs and capabilities of git-upload-pack or
// git-receive-pack. 401 is UNAUTHENTICATED, 404 NOT_FOUND, with the forge's words.
absl::StatusOr<RemoteRefs> DiscoverRefs(const SmartHttpRemote& remote, absl::string_view service);

struct FetchRequest {
  std::vector<std::string> wants;    // commits to fetch
  std::vector<std::string> haves;    // commits the client has (its ref tips)
  std::vector<std::string> shallow;  // the client's shallow commits (.git/shallow)
  int depth = 0;                     // > 0: cut the history this many commits below the wants
};
struct ShallowUpdate {
  std::vector<std::string> shallow;    // commits that are shallow now (their parents were not sent)
  std::vector<std::string> unshallow;  // commits whose parents were sent after all
};
// POST <url>/git-upload-pack: asks for `request`'s history and hands every byte of the pack that
// comes back to `pack_sink` (progress goes to stderr). The server must offer "shallow" when a
// depth or shallow commits are given.
absl::StatusOr<ShallowUpdate> FetchPack(const SmartHttpRemote& remote, const RemoteRefs& refs,
                                        const FetchRequest& request,
                                        const std::function<absl::Status(absl::string_view)>& pack_sink);

struct RefUpdate {
  std::string old_sha;  // what the remote has now (40 zeros: a new ref)
  std::string new_sha;
  std::string ref;  // "refs/heads/topic"
};
struct PushReport {
  std::vector<std::string> rejected;  // "refs/heads/x: reason"
  std::string remote_messages;        // what the server printed (a hook's reason, say)
};
// POST <url>/git-receive-pack: one ref update with its pack. A refused update is a report, not
// an error; an unpack failure on the server is an error.
absl::StatusOr<PushReport> SendPack(const SmartHttpRemote& remote, const RemoteRefs& refs, const RefUpdate& update,
                                    absl::string_view pack);

}  // namespace step_runner::catalog

#endif  // STEP_RUNNER_STEPS_CATALOG_HELPER_SMART_HTTP_H_

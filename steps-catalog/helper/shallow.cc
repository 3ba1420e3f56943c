#include "steps-catalog/helper/shallow.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <functional>
#include <iostream>
#include <memory>
#include <set>
#include <unordered_set>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::catalog {
namespace {

using OdbPtr = GitPtr<git_odb, git_odb_free>;
using PackBuilderPtr = GitPtr<git_packbuilder, git_packbuilder_free>;

constexpr char kNoCommit[] = "0000000000000000000000000000000000000000";

// Object ids as hash keys: their 20 raw bytes.
std::string Key(const git_oid& oid) { return std::string(reinterpret_cast<const char*>(oid.id), GIT_OID_RAWSZ); }
using OidSet = std::unordered_set<std::string>;

absl::StatusOr<git_oid> ParseOid(const std::string& hex) {
  git_oid oid;
  if (git_oid_fromstrn(&oid, hex.data(), hex.size()) < 0 || hex.size() != GIT_OID_HEXSZ) {
    return absl::DataLossError(absl::StrCat("not an object id: \"", hex, "\""));
  }
  return oid;
}

absl::StatusOr<OdbPtr> Odb(git_repository* repo) {
  git_odb* raw = nullptr;
  if (int rc = git_repository_odb(&raw, repo); rc < 0) return GitErrorToStatus(rc, "open the object database");
  return OdbPtr(raw);
}

std::string ShallowFile(git_repository* repo) { return absl::StrCat(git_repository_path(repo), "shallow"); }

absl::StatusOr<std::set<std::string>> ReadShallow(git_repository* repo) {
  absl::StatusOr<std::string> text = ReadFile(ShallowFile(repo));
  if (absl::IsNotFound(text.status())) return std::set<std::string>();
  if (!text.ok()) return text.status();
  std::set<std::string> shas;
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipWhitespace())) shas.emplace(line);
  return shas;
}

// .git/shallow as git writes it: one sha per line, sorted; no file when nothing is cut.
absl::Status ApplyShallowUpdate(git_repository* repo, const ShallowUpdate& update) {
  SR_ASSIGN_OR_RETURN(std::set<std::string> shas, ReadShallow(repo));
  shas.insert(update.shallow.begin(), update.shallow.end());
  for (const std::string& sha : update.unshallow) shas.erase(sha);
  if (shas.empty()) {
    if (::unlink(ShallowFile(repo).c_str()) != 0 && errno != ENOENT) return ErrnoStatus(errno, "unlink .git/shallow");
    return absl::OkStatus();
  }
  return WriteFileAtomically(ShallowFile(repo), absl::StrCat(absl::StrJoin(shas, "\n"), "\n"), 0644);
}

// Fetches `request` into the repository's object database (libgit2 indexes the pack as it comes).
absl::StatusOr<ShallowUpdate> FetchInto(git_repository* repo, const SmartHttpRemote& remote, const RemoteRefs& refs,
                                        const FetchRequest& request) {
  SR_ASSIGN_OR_RETURN(OdbPtr odb, Odb(repo));
  git_odb_writepack* pack = nullptr;
  if (int rc = git_odb_write_pack(&pack, odb.get(), nullptr, nullptr); rc < 0) {
    return GitErrorToStatus(rc, "start a pack");
  }
  absl::Cleanup free_pack = [pack] { pack->free(pack); };
  git_indexer_progress stats{};
  SR_ASSIGN_OR_RETURN(ShallowUpdate update,
                      FetchPack(remote, refs, request, [&](absl::string_view data) -> absl::Status {
                        if (int rc = pack->append(pack, data.data(), data.size(), &stats); rc < 0) {
                          return GitErrorToStatus(rc, "store the fetched objects");
                        }
                        return absl::OkStatus();
                      }));
  if (int rc = pack->commit(pack, &stats); rc < 0) return GitErrorToStatus(rc, "index the fetched objects");
  std::cerr << "fetch: " << stats.received_objects << " objects, " << stats.received_bytes << " bytes from "
            << remote.url << (request.depth > 0 ? absl::StrCat(" (the last ", request.depth, " commits)") : "")
            << "\n";
  return update;
}

// The parents of a commit this clone holds; nullopt for one it does not (beyond a shallow cut).
absl::StatusOr<std::optional<std::vector<git_oid>>> Parents(git_repository* repo, const git_oid& oid) {
  git_commit* raw = nullptr;
  int rc = git_commit_lookup(&raw, repo, &oid);
  if (rc == GIT_ENOTFOUND) return std::nullopt;
  if (rc < 0) return GitErrorToStatus(rc, absl::StrCat("read commit ", OidToHex(oid)));
  CommitPtr commit(raw);
  std::vector<git_oid> parents;
  for (unsigned i = 0; i < git_commit_parentcount(commit.get()); ++i) parents.push_back(*git_commit_parent_id(commit.get(), i));
  return parents;
}

// Walks the history this clone holds from `starts` (breadth first), never past a commit in
// `stop`; calls `visit` for each commit held. libgit2 1.5's own walk fails at a shallow cut.
absl::Status WalkHeld(git_repository* repo, const std::vector<git_oid>& starts, const OidSet& stop,
                      const std::function<void(const git_oid&)>& visit) {
  OidSet seen;
  std::deque<git_oid> queue(starts.begin(), starts.end());
  while (!queue.empty()) {
    git_oid oid = queue.front();
    queue.pop_front();
    if (stop.contains(Key(oid)) || !seen.insert(Key(oid)).second) continue;
    SR_ASSIGN_OR_RETURN(std::optional<std::vector<git_oid>> parents, Parents(repo, oid));
    if (!parents) continue;
    visit(oid);
    queue.insert(queue.end(), parents->begin(), parents->end());
  }
  return absl::OkStatus();
}

// Every tree and blob under `tree`, skipping subtrees already in `objects`.
absl::Status AddTreeObjects(git_repository* repo, const git_oid& tree_id, OidSet* objects) {
  if (!objects->insert(Key(tree_id)).second) return absl::OkStatus();
  git_tree* raw = nullptr;
  if (int rc = git_tree_lookup(&raw, repo, &tree_id); rc < 0) return GitErrorToStatus(rc, "read a tree");
  TreePtr tree(raw);
  for (size_t i = 0; i < git_tree_entrycount(tree.get()); ++i) {
    const git_tree_entry* entry = git_tree_entry_byindex(tree.get(), i);
    switch (git_tree_entry_type(entry)) {
      case GIT_OBJECT_TREE:
        SR_RETURN_IF_ERROR(AddTreeObjects(repo, *git_tree_entry_id(entry), objects));
        break;
      case GIT_OBJECT_BLOB:
        objects->insert(Key(*git_tree_entry_id(entry)));
        break;
      default:  // a submodule's commit lives in another repository
        break;
    }
  }
  return absl::OkStatus();
}

// Puts into `pack` the objects of `tree` that are neither in `remote_has` nor already packed.
absl::Status PackTree(git_repository* repo, git_packbuilder* pack, const git_oid& tree_id, const OidSet& remote_has,
                      OidSet* packed) {
  if (remote_has.contains(Key(tree_id)) || !packed->insert(Key(tree_id)).second) return absl::OkStatus();
  if (int rc = git_packbuilder_insert(pack, &tree_id, nullptr); rc < 0) return GitErrorToStatus(rc, "pack a tree");
  git_tree* raw = nullptr;
  if (int rc = git_tree_lookup(&raw, repo, &tree_id); rc < 0) return GitErrorToStatus(rc, "read a tree");
  TreePtr tree(raw);
  for (size_t i = 0; i < git_tree_entrycount(tree.get()); ++i) {
    const git_tree_entry* entry = git_tree_entry_byindex(tree.get(), i);
    const git_oid* id = git_tree_entry_id(entry);
    if (git_tree_entry_type(entry) == GIT_OBJECT_TREE) {
      SR_RETURN_IF_ERROR(PackTree(repo, pack, *id, remote_has, packed));
    } else if (git_tree_entry_type(entry) == GIT_OBJECT_BLOB && !remote_has.contains(Key(*id)) &&
               packed->insert(Key(*id)).second) {
      if (int rc = git_packbuilder_insert(pack, id, git_tree_entry_name(entry)); rc < 0) {
        return GitErrorToStatus(rc, "pack a file");
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<git_oid> CommitTree(git_repository* repo, const git_oid& commit_id) {
  git_commit* raw = nullptr;
  if (int rc = git_commit_lookup(&raw, repo, &commit_id); rc < 0) return GitErrorToStatus(rc, "read a commit");
  CommitPtr commit(raw);
  return *git_commit_tree_id(commit.get());
}

bool IsEmptyDirectory(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return false;
  bool empty = true;
  while (dirent* entry = ::readdir(d)) {
    if (std::string_view(entry->d_name) != "." && std::string_view(entry->d_name) != "..") empty = false;
  }
  ::closedir(d);
  return empty;
}

absl::Status SetReference(git_repository* repo, const std::string& name, const git_oid& oid, const std::string& why) {
  git_reference* raw = nullptr;
  if (int rc = git_reference_create(&raw, repo, name.c_str(), &oid, 1, why.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("set ", name));
  }
  git_reference_free(raw);
  return absl::OkStatus();
}

}  // namespace

bool IsSmartHttpUrl(const std::string& url) {
  return absl::StartsWith(url, "http://") || absl::StartsWith(url, "https://");
}

absl::StatusOr<std::optional<RepositoryPtr>> CloneShallow(const SmartHttpRemote& remote, const std::string& branch,
                                                          const std::string& dir, int depth) {
  EnsureLibgit2();
  struct stat st;
  const bool existed = ::stat(dir.c_str(), &st) == 0;
  if (existed && !IsEmptyDirectory(dir)) {
    return absl::FailedPreconditionError(absl::StrCat("'", dir, "' exists and is not an empty directory"));
  }
  SR_ASSIGN_OR_RETURN(RemoteRefs refs, DiscoverRefs(remote, "git-upload-pack"));
  if (refs.refs.empty()) return std::nullopt;
  const std::string ref = branch.empty() ? refs.head_target : absl::StrCat("refs/heads/", branch);
  absl::string_view name = ref;
  if (!absl::ConsumePrefix(&name, "refs/heads/")) {
    return absl::FailedPreconditionError(
        absl::StrCat("clone ", remote.url, ": its HEAD names no branch; give the branch to clone (ref)"));
  }
  auto tip = refs.refs.find(ref);
  if (tip == refs.refs.end()) return absl::NotFoundError(absl::StrCat("clone ", remote.url, ": no branch ", name));
  SR_ASSIGN_OR_RETURN(git_oid oid, ParseOid(tip->second));

  // Nothing half-made stays behind: the folder goes if this made it, else what was put in it.
  bool done = false;
  absl::Cleanup undo = [&] {
    if (!done) (void)RemoveTree(existed ? absl::StrCat(dir, "/.git") : dir);
  };
  git_repository* raw_repo = nullptr;
  if (int rc = git_repository_init(&raw_repo, dir.c_str(), 0); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("create a repository in ", dir));
  }
  RepositoryPtr repo(raw_repo);
  SR_ASSIGN_OR_RETURN(ShallowUpdate update, FetchInto(repo.get(), remote, refs, {.wants = {tip->second}, .depth = depth}));
  SR_RETURN_IF_ERROR(ApplyShallowUpdate(repo.get(), update));

  // As `git clone --depth` does: origin fetches this one branch.
  const std::string tracking = absl::StrCat("refs/remotes/origin/", name);
  git_remote* raw_remote = nullptr;
  if (int rc = git_remote_create_with_fetchspec(&raw_remote, repo.get(), "origin", remote.url.c_str(),
                                                absl::StrCat("+", ref, ":", tracking).c_str());
      rc < 0) {
    return GitErrorToStatus(rc, "add the remote origin");
  }
  RemotePtr origin(raw_remote);
  const std::string why = absl::StrCat("clone: from ", remote.url);
  SR_RETURN_IF_ERROR(SetReference(repo.get(), tracking, oid, why));
  git_reference* raw_branch = nullptr;
  if (int rc = git_reference_create(&raw_branch, repo.get(), ref.c_str(), &oid, 1, why.c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("create branch ", name));
  }
  ReferencePtr local(raw_branch);
  if (int rc = git_branch_set_upstream(local.get(), absl::StrCat("origin/", name).c_str()); rc < 0) {
    return GitErrorToStatus(rc, absl::StrCat("track origin/", name));
  }
  if (int rc = git_repository_set_head(repo.get(), ref.c_str()); rc < 0) return GitErrorToStatus(rc, "set HEAD");
  done = true;
  return std::optional<RepositoryPtr>(std::move(repo));
}

absl::Status FetchIntoShallow(git_repository* repo, const SmartHttpRemote& remote, int depth) {
  git_remote* raw_remote = nullptr;
  if (int rc = git_remote_lookup(&raw_remote, repo, "origin"); rc < 0) return GitErrorToStatus(rc, "origin");
  RemotePtr origin(raw_remote);
  SR_ASSIGN_OR_RETURN(RemoteRefs refs, DiscoverRefs(remote, "git-upload-pack"));
  SR_ASSIGN_OR_RETURN(OdbPtr odb, Odb(repo));

  // Where each remote ref lands, by origin's fetch refspecs.
  std::vector<std::pair<std::string, git_oid>> updates;
  std::vector<std::string> wants;
  for (const auto& [name, sha] : refs.refs) {
    for (size_t i = 0; i < git_remote_refspec_count(origin.get()); ++i) {
      const git_refspec* spec = git_remote_get_refspec(origin.get(), i);
      if (git_refspec_direction(spec) != GIT_DIRECTION_FETCH || !git_refspec_src_matches(spec, name.c_str())) continue;
      git_buf local = GIT_BUF_INIT;
      int rc = git_refspec_transform(&local, spec, name.c_str());
      absl::Cleanup dispose = [&local] { git_buf_dispose(&local); };
      if (rc < 0) return GitErrorToStatus(rc, absl::StrCat("map ", name));
      SR_ASSIGN_OR_RETURN(git_oid oid, ParseOid(sha));
      updates.emplace_back(std::string(local.ptr, local.size), oid);
      if (!git_odb_exists(odb.get(), &oid) && std::find(wants.begin(), wants.end(), sha) == wants.end()) {
        wants.push_back(sha);
      }
      break;
    }
  }
  if (!wants.empty()) {
    FetchRequest request{.wants = wants, .depth = depth};
    SR_ASSIGN_OR_RETURN(std::set<std::string> shallow, ReadShallow(repo));
    request.shallow.assign(shallow.begin(), shallow.end());
    // The tips of every branch here: the server sends nothing below them.
    git_reference_iterator* raw_it = nullptr;
    if (int rc = git_reference_iterator_new(&raw_it, repo); rc < 0) return GitErrorToStatus(rc, "list refs");
    std::unique_ptr<git_reference_iterator, void (*)(git_reference_iterator*)> it(raw_it, git_reference_iterator_free);
    git_reference* raw_ref = nullptr;
    while (git_reference_next(&raw_ref, it.get()) == 0) {
      ReferencePtr reference(raw_ref);
      const git_oid* target = git_reference_target(reference.get());
      if (target == nullptr || (!git_reference_is_branch(reference.get()) && !git_reference_is_remote(reference.get()))) {
        continue;
      }
      std::string hex = OidToHex(*target);
      if (std::find(request.haves.begin(), request.haves.end(), hex) == request.haves.end()) request.haves.push_back(hex);
    }
    SR_ASSIGN_OR_RETURN(ShallowUpdate update, FetchInto(repo, remote, refs, request));
    SR_RETURN_IF_ERROR(ApplyShallowUpdate(repo, update));
  }
  for (const auto& [name, oid] : updates) SR_RETURN_IF_ERROR(SetReference(repo, name, oid, "fetch: origin"));
  return absl::OkStatus();
}

absl::StatusOr<PushReport> PushFromShallow(git_repository* repo, const SmartHttpRemote& remote, const std::string& branch) {
  const std::string ref = absl::StrCat("refs/heads/", branch);
  git_oid new_oid;
  if (int rc = git_reference_name_to_id(&new_oid, repo, ref.c_str()); rc < 0) {
    return rc == GIT_ENOTFOUND ? absl::NotFoundError(absl::StrCat("no local branch ", branch))
                               : GitErrorToStatus(rc, "look up branch");
  }
  SR_ASSIGN_OR_RETURN(RemoteRefs refs, DiscoverRefs(remote, "git-receive-pack"));
  auto remote_tip = refs.refs.find(ref);
  const std::string old_sha = remote_tip == refs.refs.end() ? kNoCommit : remote_tip->second;
  const std::string new_sha = OidToHex(new_oid);
  if (old_sha == new_sha) {
    std::cerr << "push: origin's " << branch << " is already at " << new_sha << "\n";
    return PushReport{};
  }
  SR_ASSIGN_OR_RETURN(OdbPtr odb, Odb(repo));
  if (old_sha != kNoCommit) {
    // A fast-forward only, as git push without --force: origin's tip must be in this history.
    SR_ASSIGN_OR_RETURN(git_oid old_oid, ParseOid(old_sha));
    bool found = false;
    SR_RETURN_IF_ERROR(WalkHeld(repo, {new_oid}, {}, [&](const git_oid& oid) { found = found || git_oid_equal(&oid, &old_oid); }));
    if (!found) return NotFastForward(branch);
  }
  // What the remote has, as far as this clone knows: the history under each of its refs.
  std::vector<git_oid> remote_tips;
  for (const auto& [name, sha] : refs.refs) {
    SR_ASSIGN_OR_RETURN(git_oid oid, ParseOid(sha));
    if (git_odb_exists(odb.get(), &oid)) remote_tips.push_back(oid);
  }
  OidSet remote_commits;
  SR_RETURN_IF_ERROR(WalkHeld(repo, remote_tips, {}, [&](const git_oid& oid) { remote_commits.insert(Key(oid)); }));
  std::vector<git_oid> new_commits;
  SR_RETURN_IF_ERROR(WalkHeld(repo, {new_oid}, remote_commits, [&](const git_oid& oid) { new_commits.push_back(oid); }));

  // The trees of the commits the new ones stand on are on the remote: only what differs goes.
  OidSet remote_objects;
  OidSet new_keys;
  for (const git_oid& oid : new_commits) new_keys.insert(Key(oid));
  for (const git_oid& oid : new_commits) {
    SR_ASSIGN_OR_RETURN(std::optional<std::vector<git_oid>> parents, Parents(repo, oid));
    for (const git_oid& parent : parents.value_or(std::vector<git_oid>())) {
      if (new_keys.contains(Key(parent)) || !git_odb_exists(odb.get(), &parent)) continue;
      SR_ASSIGN_OR_RETURN(git_oid tree, CommitTree(repo, parent));
      SR_RETURN_IF_ERROR(AddTreeObjects(repo, tree, &remote_objects));
    }
  }
  git_packbuilder* raw_pack = nullptr;
  if (int rc = git_packbuilder_new(&raw_pack, repo); rc < 0) return GitErrorToStatus(rc, "start a pack");
  PackBuilderPtr pack(raw_pack);
  OidSet packed;
  for (const git_oid& oid : new_commits) {
    if (int rc = git_packbuilder_insert(pack.get(), &oid, nullptr); rc < 0) return GitErrorToStatus(rc, "pack a commit");
    SR_ASSIGN_OR_RETURN(git_oid tree, CommitTree(repo, oid));
    SR_RETURN_IF_ERROR(PackTree(repo, pack.get(), tree, remote_objects, &packed));
  }
  git_buf bytes = GIT_BUF_INIT;
  absl::Cleanup dispose = [&bytes] { git_buf_dispose(&bytes); };
  if (int rc = git_packbuilder_write_buf(&bytes, pack.get()); rc < 0) return GitErrorToStatus(rc, "write the pack");
  std::cerr << "push: " << new_commits.size() << (new_commits.size() == 1 ? " commit, " : " commits, ")
            << git_packbuilder_object_count(pack.get())
            << " objects (" << bytes.size << " bytes) to " << remote.url << "\n";
  SR_ASSIGN_OR_RETURN(PushReport report, SendPack(remote, refs, {.old_sha = old_sha, .new_sha = new_sha, .ref = ref},
                                                  absl::string_view(bytes.ptr, bytes.size)));
  if (report.rejected.empty()) {
    SR_RETURN_IF_ERROR(SetReference(repo, absl::StrCat("refs/remotes/origin/", branch), new_oid, "push: origin"));
  }
  return report;
}

absl::Status NotFastForward(const std::string& branch) {
  // libgit2 refuses before sending anything, as `git push` does without --force; so does this.
  return absl::FailedPreconditionError(absl::StrCat("the push of ", branch, " was refused: not a fast-forward (origin's ",
                                                    branch, " has commits this clone does not have)"));
}

}  // namespace step_runner::catalog

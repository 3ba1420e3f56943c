// sr-catalog driven for real against the local forge (tests/forge): clone over smart HTTP with
// the token, branch, commit, push, MRs, comments, generate against the fake model, test
// counting, and the faults (wrong token, unknown project or issue, unreachable forge, junk or a
// stalled model, a stale diff, a refused push). Secrets never land on disk or in outputs.
#include <dirent.h>
#include <sys/stat.h>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"
#include "tests/forge/forge_test_base.h"
#include "tests/integration/daemon_fixture.h"

namespace step_runner::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;

// Every file under `dir` (recursively) whose content holds `needle`.
void FilesContaining(const std::string& dir, const std::string& needle, std::vector<std::string>* out) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* entry = ::readdir(d)) {
    std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      FilesContaining(path, needle, out);
    } else if (S_ISREG(st.st_mode) && absl::StrContains(ReadFile(path).value_or(""), needle)) {
      out->push_back(path);
    }
  }
  ::closedir(d);
}

// A git smart HTTP server whose upload-pack answer stops after the pack's header: a clone
// fails after the repository was made.
class BrokenPackServer {
 public:
  BrokenPackServer() {
    const std::string sha(40, 'a');
    auto pkt = [](const std::string& payload) { return absl::StrFormat("%04x", payload.size() + 4) + payload; };
    server_.Get("/broken.git/info/refs", [=](const httplib::Request&, httplib::Response& response) {
      response.set_content(pkt("# service=git-upload-pack\n") + "0000" +
                               pkt(sha + " HEAD" + std::string(1, '\0') +
                                   "shallow side-band-64k ofs-delta symref=HEAD:refs/heads/main agent=git/2\n") +
                               pkt(sha + " refs/heads/main\n") + "0000",
                           "application/x-git-upload-pack-advertisement");
    });
    server_.Post("/broken.git/git-upload-pack", [=, this](const httplib::Request&, httplib::Response& response) {
      served_pack_ = true;
      // A pack of 5 objects, cut after its 12-byte header.
      response.set_content(pkt("shallow " + sha + "\n") + "0000" + pkt("NAK\n") +
                               pkt(std::string("\x01PACK\0\0\0\x02\0\0\0\x05", 13)) + "0000",
                           "application/x-git-upload-pack-result");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~BrokenPackServer() {
    server_.stop();
    thread_.join();
  }
  std::string url() const { return absl::StrCat("http://127.0.0.1:", port_); }
  bool served_pack() const { return served_pack_; }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::atomic<bool> served_pack_{false};
};

struct CatalogRun {
  int exit_code = -1;
  std::string err;
  std::map<std::string, json> outputs;
};

class CatalogTest : public ForgeTestBase {
 protected:
  void SetUp() override {
    ForgeTestBase::SetUp();
    if (HasFatalFailure()) return;
    work_ = tmp_.path() + "/work";
    ASSERT_TRUE(MakeDirs(work_, 0700).ok());
  }

  // Runs `sr-catalog args...` in the work dir with the secrets in its environment.
  CatalogRun Catalog(std::vector<std::string> args, std::vector<std::string> env = {}) {
    const std::string output = absl::StrCat(work_, "/out-", ++runs_, ".jsonl");
    std::vector<std::string> argv = {"sh", "-c", "cd \"$0\" && exec \"$@\"", work_, CatalogBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--output-file", output});
    if (env.empty()) {
      env = {"SR_GIT_TOKEN=" + forge_->token(), "SR_FORGE_TOKEN=" + forge_->token(), "SR_MODEL_KEY=" + forge_->model_key()};
    }
    auto result = RunCommand(argv, absl::Seconds(120), env);
    CatalogRun run;
    if (!result.ok()) {
      run.err = std::string(result.status().message());
      return run;
    }
    run.exit_code = result->exit_code;
    run.err = result->err;
    for (absl::string_view line : absl::StrSplit(ReadFile(output).value_or(""), '\n', absl::SkipEmpty())) {
      json record = json::parse(line, nullptr, false);
      EXPECT_TRUE(record.is_object() && record.contains("name") && record.contains("value")) << line;
      if (record.is_object()) run.outputs[record.value("name", "")] = record["value"];
    }
    return run;
  }
  std::vector<std::string> ForgeArgs(std::vector<std::string> args) {
    // The subcommand first, then the forge's flags.
    args.insert(args.begin() + 1, {"--forge-url", forge_->url(), "--project", Forge::kProject});
    return args;
  }
  // Clones the demo project into work/repo and checks out `branch`.
  void CloneAndBranch(const std::string& branch) {
    CatalogRun clone = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "repo"});
    ASSERT_EQ(clone.exit_code, 0) << clone.err;
    CatalogRun made = Catalog({"branch", "--dir", "repo", "--name", branch, "--base", "main"});
    ASSERT_EQ(made.exit_code, 0) << made.err;
  }
  CatalogRun GenerateFor(int iid, std::vector<std::string> extra = {}) {
    auto issue = forge_->Api("GET", absl::StrCat("/api/v4/projects/1/issues/", iid));
    std::vector<std::string> args = {"generate", "--endpoint", forge_->url(), "--model", "fake", "--dir", "repo",
                                     "--title", issue.ok() ? (*issue)["title"].get<std::string>() : "",
                                     "--artifacts-dir", absl::StrCat(work_, "/artifacts-", runs_ + 1)};
    args.insert(args.end(), extra.begin(), extra.end());
    return Catalog(args);
  }
  void ExpectNoSecretsOnDisk() {
    for (const std::string& secret : {forge_->token(), forge_->model_key()}) {
      std::vector<std::string> found;
      FilesContaining(work_, secret, &found);
      EXPECT_THAT(found, ::testing::IsEmpty()) << "a secret is on disk";
    }
  }

  std::string work_;
  int runs_ = 0;
};

TEST_F(CatalogTest, CloneBranchCommitPushWithTheTokenNeverOnDisk) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("feature/notes"));
  EXPECT_THAT(ReadFile(work_ + "/repo/.git/config").value_or(""), HasSubstr("url = " + forge_->clone_url() + "\n"));

  CatalogRun nothing = Catalog({"commit", "--dir", "repo", "--message", "m", "--author-name", "A", "--author-email", "a@x"});
  ASSERT_EQ(nothing.exit_code, 0) << nothing.err;
  EXPECT_EQ(nothing.outputs["committed"], false);
  EXPECT_THAT(nothing.err, HasSubstr("nothing to commit"));

  ASSERT_TRUE(WriteFileAtomically(work_ + "/repo/NOTES.md", "notes\n", 0644).ok());
  ASSERT_TRUE(::unlink((work_ + "/repo/README.md").c_str()) == 0);
  CatalogRun commit = Catalog({"commit", "--dir", "repo", "--message", "Add notes", "--author-name", "Agent", "--author-email",
                        "agent@example.com"});
  ASSERT_EQ(commit.exit_code, 0) << commit.err;
  EXPECT_EQ(commit.outputs["committed"], true);
  CatalogRun push = Catalog({"push", "--dir", "repo", "--branch", "feature/notes"});
  ASSERT_EQ(push.exit_code, 0) << push.err;
  EXPECT_EQ(push.outputs["sha"], commit.outputs["sha"]);

  SR_ASSERT_OK_AND_ASSIGN(json branch, forge_->Api("GET", "/api/v4/projects/1/repository/branches/feature%2Fnotes"));
  EXPECT_EQ(branch["commit"]["id"], commit.outputs["sha"]);
  EXPECT_EQ(branch["commit"]["title"], "Add notes");
  EXPECT_EQ(branch["commit"]["author_name"], "Agent");

  // Run again into the same folder: fetched, not re-cloned, and the branch is reused.
  CatalogRun again = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "repo"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.outputs["reused"], true);
  CatalogRun reused = Catalog({"branch", "--dir", "repo", "--name", "feature/notes"});
  EXPECT_EQ(reused.outputs["created"], false);
  EXPECT_EQ(reused.outputs["resumed"], true);
  ExpectNoSecretsOnDisk();
}

// `resumed` means the branch carries work: commits its base lacks, or uncommitted changes. A
// branch that is only behind its base (pushed empty, then the base moved on) carries none.
TEST_F(CatalogTest, ABranchThatIsOnlyBehindItsBaseIsNotResumedWork) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("trunk"));  // a base of our own: main is protected
  ASSERT_EQ(Catalog({"push", "--dir", "repo", "--branch", "trunk"}).exit_code, 0);
  ASSERT_EQ(Catalog({"branch", "--dir", "repo", "--name", "step-runner/old", "--base", "trunk"}).exit_code, 0);
  ASSERT_EQ(Catalog({"push", "--dir", "repo", "--branch", "step-runner/old"}).exit_code, 0);
  ASSERT_EQ(Catalog({"branch", "--dir", "repo", "--name", "trunk"}).exit_code, 0);
  ASSERT_TRUE(WriteFileAtomically(work_ + "/repo/later.txt", "later\n", 0644).ok());
  ASSERT_EQ(Catalog({"commit", "--dir", "repo", "--message", "later", "--author-name", "A", "--author-email", "a@x"}).exit_code, 0);
  ASSERT_EQ(Catalog({"push", "--dir", "repo", "--branch", "trunk"}).exit_code, 0);

  CatalogRun fresh = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "again"});
  ASSERT_EQ(fresh.exit_code, 0) << fresh.err;
  CatalogRun behind = Catalog({"branch", "--dir", "again", "--name", "step-runner/old", "--base", "trunk"});
  ASSERT_EQ(behind.exit_code, 0) << behind.err;
  EXPECT_EQ(behind.outputs["resumed"], false);
  // Uncommitted changes on it are work to resume.
  ASSERT_TRUE(WriteFileAtomically(work_ + "/again/wip.txt", "wip\n", 0644).ok());
  CatalogRun dirty = Catalog({"branch", "--dir", "again", "--name", "step-runner/old", "--base", "trunk"});
  EXPECT_EQ(dirty.outputs["resumed"], true);
}

TEST_F(CatalogTest, RefusedPushesAreClearErrors) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("main"));
  ASSERT_TRUE(WriteFileAtomically(work_ + "/repo/x.txt", "x\n", 0644).ok());
  ASSERT_EQ(Catalog({"commit", "--dir", "repo", "--message", "x", "--author-name", "A", "--author-email", "a@x"}).exit_code, 0);
  CatalogRun to_main = Catalog({"push", "--dir", "repo", "--branch", "main"});
  EXPECT_EQ(to_main.exit_code, 1);
  EXPECT_THAT(to_main.err, HasSubstr("the push of main was refused by the forge"));
  EXPECT_THAT(to_main.err, HasSubstr("not allowed to push code to protected branches"));

  // Two clones diverge on one branch: the second push is not a fast-forward, and is refused.
  ASSERT_EQ(Catalog({"clone", "--url", forge_->clone_url(), "--dir", "repo2"}).exit_code, 0);
  for (const char* dir : {"repo", "repo2"}) {
    ASSERT_EQ(Catalog({"branch", "--dir", dir, "--name", "topic", "--base", "main"}).exit_code, 0);
    ASSERT_TRUE(WriteFileAtomically(absl::StrCat(work_, "/", dir, "/y.txt"), dir, 0644).ok());
    ASSERT_EQ(Catalog({"commit", "--dir", dir, "--message", dir, "--author-name", "A", "--author-email", "a@x"}).exit_code, 0);
  }
  ASSERT_EQ(Catalog({"push", "--dir", "repo", "--branch", "topic"}).exit_code, 0);
  CatalogRun diverged = Catalog({"push", "--dir", "repo2", "--branch", "topic"});
  EXPECT_EQ(diverged.exit_code, 1);
  EXPECT_THAT(diverged.err, HasSubstr("the push of topic was refused: not a fast-forward"));

  CatalogRun wrong = Catalog({"push", "--dir", "repo", "--branch", "main"}, {"SR_GIT_TOKEN=wrong-token"});
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_THAT(wrong.err, HasSubstr("rejected the token"));
  EXPECT_THAT(wrong.err, Not(HasSubstr("wrong-token")));
}

// git/clone's depth over HTTP (libgit2 1.5 cannot clone shallow; see steps-catalog/helper/shallow.h):
// the clone holds only the last commits, and branch, commit, push and a later clone into the same
// folder all still work in it.
TEST_F(CatalogTest, ShallowCloneHoldsTheLastCommitsAndBranchCommitPushStillWork) {
  // Runs git in `dir` (a check from outside: git reads .git/shallow the way a user's tools do).
  auto git = [&](const std::string& dir, std::vector<std::string> args) {
    args.insert(args.begin(), {"git", "-C", absl::StrCat(work_, "/", dir)});
    absl::StatusOr<CommandResult> result = RunCommand(args, absl::Seconds(60));
    EXPECT_TRUE(result.ok() && result->exit_code == 0)
        << absl::StrJoin(args, " ") << ": " << (result.ok() ? result->err : result.status().ToString());
    return result.ok() ? std::string(absl::StripTrailingAsciiWhitespace(result->out)) : "";
  };
  auto commit = [&](const std::string& dir, const std::string& file) {
    EXPECT_TRUE(WriteFileAtomically(absl::StrCat(work_, "/", dir, "/", file), file + "\n", 0644).ok());
    CatalogRun run = Catalog({"commit", "--dir", dir, "--message", "add " + file, "--author-name", "A", "--author-email", "a@x"});
    EXPECT_EQ(run.exit_code, 0) << run.err;
    return run.outputs["sha"].get<std::string>();
  };
  auto push = [&](const std::string& dir, const std::string& branch) {
    return Catalog({"push", "--dir", dir, "--branch", branch});
  };
  // Three commits on topic, from a full clone.
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("topic"));
  std::vector<std::string> topic;
  for (const char* file : {"one.txt", "two.txt", "three.txt"}) topic.push_back(commit("repo", file));
  ASSERT_EQ(push("repo", "topic").exit_code, 0);

  CatalogRun clone = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "shallow", "--ref", "topic", "--depth", "2"});
  ASSERT_EQ(clone.exit_code, 0) << clone.err;
  EXPECT_EQ(clone.outputs["sha"], topic[2]);
  EXPECT_EQ(clone.outputs["reused"], false);
  EXPECT_EQ(git("shallow", {"rev-list", "--count", "HEAD"}), "2");
  EXPECT_EQ(ReadFile(work_ + "/shallow/.git/shallow").value_or(""), topic[1] + "\n");
  EXPECT_EQ(git("shallow", {"rev-parse", "--abbrev-ref", "HEAD"}), "topic");
  EXPECT_EQ(git("shallow", {"rev-parse", "--abbrev-ref", "topic@{upstream}"}), "origin/topic");
  git("shallow", {"fsck", "--no-progress", "--strict"});  // every object down to the cut is there
  EXPECT_EQ(git("shallow", {"status", "--porcelain"}), "");
  EXPECT_EQ(ReadFile(work_ + "/shallow/three.txt").value_or(""), "three.txt\n");

  // topic moves on; a clone into the same folder fetches it and keeps the depth.
  topic.push_back(commit("repo", "four.txt"));
  ASSERT_EQ(push("repo", "topic").exit_code, 0);
  CatalogRun again = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "shallow", "--ref", "topic", "--depth", "2"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.outputs["reused"], true);
  EXPECT_EQ(git("shallow", {"rev-parse", "origin/topic"}), topic[3]);
  EXPECT_EQ(git("shallow", {"rev-list", "--count", "origin/topic"}), "2");
  git("shallow", {"fsck", "--no-progress", "--strict"});

  // New work on a new branch is pushed; the forge's receive-pack checks the objects are whole.
  ASSERT_EQ(Catalog({"branch", "--dir", "shallow", "--name", "feature/shallow", "--base", "topic"}).exit_code, 0);
  std::string work = commit("shallow", "five.txt");
  CatalogRun pushed = push("shallow", "feature/shallow");
  ASSERT_EQ(pushed.exit_code, 0) << pushed.err;
  // The new commit, its tree and its one new file: what the parent already holds is not sent.
  EXPECT_THAT(pushed.err, HasSubstr("push: 1 commit, 3 objects"));
  SR_ASSERT_OK_AND_ASSIGN(json branch, forge_->Api("GET", "/api/v4/projects/1/repository/branches/feature%2Fshallow"));
  EXPECT_EQ(branch["commit"]["id"], work);
  EXPECT_EQ(git("shallow", {"rev-parse", "origin/feature/shallow"}), work);
  // Pushed again with nothing new: nothing to do.
  EXPECT_EQ(push("shallow", "feature/shallow").exit_code, 0);

  // topic here is behind origin's and has diverged: refused before anything is sent.
  ASSERT_EQ(Catalog({"branch", "--dir", "shallow", "--name", "topic"}).exit_code, 0);
  commit("shallow", "six.txt");
  CatalogRun diverged = push("shallow", "topic");
  EXPECT_EQ(diverged.exit_code, 1);
  EXPECT_THAT(diverged.err, HasSubstr("the push of topic was refused: not a fast-forward"));
  // main is protected on the forge: its refusal and the hook's words come back.
  ASSERT_EQ(Catalog({"clone", "--url", forge_->clone_url(), "--dir", "main", "--depth", "1"}).exit_code, 0);
  commit("main", "seven.txt");
  CatalogRun to_main = push("main", "main");
  EXPECT_EQ(to_main.exit_code, 1);
  EXPECT_THAT(to_main.err, HasSubstr("the push of main was refused by the forge"));
  EXPECT_THAT(to_main.err, HasSubstr("not allowed to push code to protected branches"));
  SR_ASSERT_OK_AND_ASSIGN(json forge_topic, forge_->Api("GET", "/api/v4/projects/1/repository/branches/topic"));
  EXPECT_EQ(forge_topic["commit"]["id"], topic[3]);
  ExpectNoSecretsOnDisk();
}

TEST_F(CatalogTest, ShallowCloneFaultsAreClearErrorsAndLeaveNothingBehind) {
  auto clone = [&](const std::string& dir, std::vector<std::string> extra, std::vector<std::string> env = {}) {
    std::vector<std::string> args = {"clone", "--url", forge_->clone_url(), "--dir", dir};
    args.insert(args.end(), extra.begin(), extra.end());
    return Catalog(args, env);
  };
  CatalogRun negative = clone("negative", {"--depth", "-1"});
  EXPECT_EQ(negative.exit_code, 1);
  EXPECT_THAT(negative.err, HasSubstr("depth must be 0 (the whole history) or more, not -1"));

  CatalogRun wrong = clone("denied", {"--depth", "1"}, {"SR_GIT_TOKEN=not-the-token"});
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_THAT(wrong.err, HasSubstr("rejected the token"));
  EXPECT_THAT(wrong.err, Not(HasSubstr("not-the-token")));
  CatalogRun none = clone("anonymous", {"--depth", "1"}, {"SR_MODEL_KEY=x"});
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_THAT(none.err, HasSubstr("no token was given"));

  CatalogRun missing = clone("nobranch", {"--depth", "1", "--ref", "no-such-branch"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, HasSubstr("no branch no-such-branch"));
  CatalogRun elsewhere = Catalog({"clone", "--url", forge_->url() + "/demo/nothing-here.git", "--dir", "nothere", "--depth", "1"});
  EXPECT_EQ(elsewhere.exit_code, 1);
  EXPECT_THAT(elsewhere.err, HasSubstr("404"));
  // An empty folder given to clone into stays, empty.
  ASSERT_TRUE(MakeDirs(work_ + "/empty", 0755).ok());
  EXPECT_EQ(clone("empty", {"--depth", "1", "--ref", "no-such-branch"}).exit_code, 1);
  for (const char* dir : {"negative", "denied", "anonymous", "nobranch", "nothere"}) {
    struct stat st;
    EXPECT_NE(::stat(absl::StrCat(work_, "/", dir).c_str(), &st), 0) << dir << " was left behind";
  }
  struct stat st;
  EXPECT_NE(::stat((work_ + "/empty/.git").c_str(), &st), 0);
  EXPECT_EQ(::stat((work_ + "/empty").c_str(), &st), 0);

  // A forge that fails mid-clone (its pack ends after the header): the repository was made by
  // then, and goes again; an empty folder given to clone into stays, empty.
  BrokenPackServer broken;
  for (const char* dir : {"halfway", "empty"}) {
    CatalogRun cut = Catalog({"clone", "--url", broken.url() + "/broken.git", "--dir", dir, "--depth", "1"});
    EXPECT_EQ(cut.exit_code, 1) << dir;
    EXPECT_THAT(cut.err, HasSubstr("clone " + broken.url() + "/broken.git: ")) << dir;
  }
  EXPECT_TRUE(broken.served_pack());
  EXPECT_NE(::stat((work_ + "/halfway").c_str(), &st), 0) << "a half-made clone was left behind";
  EXPECT_NE(::stat((work_ + "/empty/.git").c_str(), &st), 0) << "a half-made clone was left behind";
  EXPECT_EQ(::stat((work_ + "/empty").c_str(), &st), 0);

  // A folder with other files in it is refused, and they stay.
  ASSERT_TRUE(MakeDirs(work_ + "/busy", 0755).ok());
  ASSERT_TRUE(WriteFileAtomically(work_ + "/busy/keep.txt", "keep\n", 0644).ok());
  CatalogRun busy = clone("busy", {"--depth", "1"});
  EXPECT_EQ(busy.exit_code, 1);
  EXPECT_THAT(busy.err, HasSubstr("exists and is not an empty directory"));
  EXPECT_EQ(ReadFile(work_ + "/busy/keep.txt").value_or(""), "keep\n");
}

TEST_F(CatalogTest, MergeRequestAndCommentAreIdempotent) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("step-runner/issue-1"));
  ASSERT_TRUE(WriteFileAtomically(work_ + "/repo/x.txt", "x\n", 0644).ok());
  ASSERT_EQ(Catalog({"commit", "--dir", "repo", "--message", "x", "--author-name", "A", "--author-email", "a@x"}).exit_code, 0);
  ASSERT_EQ(Catalog({"push", "--dir", "repo", "--branch", "step-runner/issue-1"}).exit_code, 0);
  std::vector<std::string> open = ForgeArgs({"open-mr", "--source", "step-runner/issue-1", "--target", "main", "--title",
                                         "Resolve #1", "--description", "Closes #1", "--draft", "true"});
  CatalogRun first = Catalog(open);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_EQ(first.outputs["created"], true);
  CatalogRun second = Catalog(open);
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(second.outputs["created"], false);
  EXPECT_EQ(second.outputs["iid"], first.outputs["iid"]);
  EXPECT_EQ(second.outputs["web_url"], first.outputs["web_url"]);
  // The open MR goes into main: asked for another target, it is not taken for the one asked for
  // (it was reported as opened); here the forge has no such target.
  std::vector<std::string> elsewhere = ForgeArgs({"open-mr", "--source", "step-runner/issue-1", "--target", "release",
                                                  "--title", "Resolve #1", "--description", "Closes #1"});
  CatalogRun other_target = Catalog(elsewhere);
  EXPECT_NE(other_target.exit_code, 0);
  EXPECT_THAT(other_target.err, HasSubstr("Branch release does not exist"));
  SR_ASSERT_OK_AND_ASSIGN(json mrs, forge_->Api("GET", "/api/v4/projects/1/merge_requests?state=opened"));
  ASSERT_EQ(mrs.size(), 1u);
  EXPECT_EQ(mrs[0]["source_branch"], "step-runner/issue-1");
  EXPECT_EQ(mrs[0]["target_branch"], "main");
  EXPECT_EQ(mrs[0]["draft"], true);
  EXPECT_EQ(mrs[0]["title"], "Draft: Resolve #1");

  std::vector<std::string> comment = ForgeArgs({"comment", "--issue", "1", "--body", "MR: " + first.outputs["web_url"].get<std::string>()});
  CatalogRun posted = Catalog(comment);
  ASSERT_EQ(posted.exit_code, 0) << posted.err;
  EXPECT_EQ(posted.outputs["posted"], true);
  CatalogRun not_again = Catalog(comment);
  EXPECT_EQ(not_again.outputs["posted"], false);
  EXPECT_EQ(not_again.outputs["note_id"], posted.outputs["note_id"]);
  SR_ASSERT_OK_AND_ASSIGN(json notes, forge_->Api("GET", "/api/v4/projects/1/issues/1/notes"));
  EXPECT_EQ(notes.size(), 1u);

  CatalogRun issue = Catalog(ForgeArgs({"issue", "--iid", "1"}));
  ASSERT_EQ(issue.exit_code, 0) << issue.err;
  EXPECT_EQ(issue.outputs["title"], "Add a multiply function");
  EXPECT_THAT(issue.outputs["description"].get<std::string>(), HasSubstr("multiply(a, b)"));
}

TEST_F(CatalogTest, ForgeFaultsAreClearErrorsWithoutHanging) {
  CatalogRun wrong_token = Catalog(ForgeArgs({"issue", "--iid", "1"}), {"SR_FORGE_TOKEN=not-the-token"});
  EXPECT_EQ(wrong_token.exit_code, 1);
  EXPECT_THAT(wrong_token.err, HasSubstr("rejected the token (401 Unauthorized)"));
  EXPECT_THAT(wrong_token.err, Not(HasSubstr("not-the-token")));

  CatalogRun no_project = Catalog({"issue", "--forge-url", forge_->url(), "--project", "demo/nope", "--iid", "1"});
  EXPECT_EQ(no_project.exit_code, 1);
  EXPECT_THAT(no_project.err, HasSubstr("project demo/nope not found"));
  CatalogRun no_issue = Catalog(ForgeArgs({"issue", "--iid", "42"}));
  EXPECT_EQ(no_issue.exit_code, 1);
  EXPECT_THAT(no_issue.err, HasSubstr("issue #42 not found in project demo/calculator"));

  CatalogRun clone_wrong = Catalog({"clone", "--url", forge_->clone_url(), "--dir", "denied"}, {"SR_GIT_TOKEN=not-the-token"});
  EXPECT_EQ(clone_wrong.exit_code, 1);
  EXPECT_THAT(clone_wrong.err, HasSubstr("rejected the token"));
  CatalogRun in_url = Catalog({"clone", "--url", "http://agent:secret-in-url@127.0.0.1:1/x.git", "--dir", "x"});
  EXPECT_EQ(in_url.exit_code, 1);
  EXPECT_THAT(in_url.err, HasSubstr("carries credentials"));
  EXPECT_THAT(in_url.err, Not(HasSubstr("secret-in-url")));

  const std::string url = forge_->url();
  SR_ASSERT_OK(forge_->Stop());
  CatalogRun unreachable = Catalog({"issue", "--forge-url", url, "--project", "demo/calculator", "--iid", "1"});
  EXPECT_EQ(unreachable.exit_code, 1);
  EXPECT_THAT(unreachable.err, HasSubstr("Failed to connect to 127.0.0.1"));
  CatalogRun clone_unreachable = Catalog({"clone", "--url", url + "/demo/calculator.git", "--dir", "gone"});
  EXPECT_EQ(clone_unreachable.exit_code, 1);
  EXPECT_THAT(clone_unreachable.err, HasSubstr("clone " + url));
}

TEST_F(CatalogTest, GenerateAppliesTheModelsDiffAndFixesFromATestLog) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("step-runner/issue-2"));
  CatalogRun first = GenerateFor(2);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_EQ(first.outputs["files_changed"], json::array({"calc.py", "test_calc.py"}));
  EXPECT_EQ(first.outputs["summary"], "Add divide(a, b) with floor division and a zero check.");
  EXPECT_THAT(ReadFile(work_ + "/repo/calc.py").value_or(""), HasSubstr("return a / b"));

  CatalogRun failing = Catalog({"test", "--dir", "repo", "--allow-failure", "true", "--artifacts-dir", work_ + "/t1"});
  ASSERT_EQ(failing.exit_code, 0) << failing.err;
  EXPECT_EQ(failing.outputs["passed"], 3);
  EXPECT_EQ(failing.outputs["failed"], 1);
  EXPECT_EQ(failing.outputs["command"], "make test");
  EXPECT_THAT(failing.outputs["failure_log_tail"].get<std::string>(), HasSubstr("AssertionError: 3.5 != 3"));
  CatalogRun strict = Catalog({"test", "--dir", "repo", "--artifacts-dir", work_ + "/t2"});
  EXPECT_EQ(strict.exit_code, 1);
  EXPECT_THAT(strict.err, HasSubstr("1 test(s) failed"));

  CatalogRun fix = GenerateFor(2, {"--feedback-file", failing.outputs["log_file"].get<std::string>()});
  ASSERT_EQ(fix.exit_code, 0) << fix.err;
  EXPECT_EQ(fix.outputs["files_changed"], json::array({"calc.py"}));
  CatalogRun passing = Catalog({"test", "--dir", "repo", "--artifacts-dir", work_ + "/t3"});
  ASSERT_EQ(passing.exit_code, 0) << passing.err;
  EXPECT_EQ(passing.outputs["passed"], 4);
  EXPECT_EQ(passing.outputs["failed"], 0);

  // The prompt and answer are kept, secrets masked; the fake model saw the failing log.
  SR_ASSERT_OK_AND_ASSIGN(json seen, forge_->Api("GET", "/-/model/requests"));
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[1]["feedback"], true);
  std::string request = ReadFile(fix.outputs["artifacts_dir"].get<std::string>() + "/attempt-1-request.json").value_or("");
  EXPECT_THAT(request, HasSubstr("3.5 != 3"));
  EXPECT_THAT(ReadFile(fix.outputs["artifacts_dir"].get<std::string>() + "/attempt-1-response.json").value_or(""),
              HasSubstr("a // b"));
  ExpectNoSecretsOnDisk();
}

TEST_F(CatalogTest, GenerateRetriesAStaleDiffShowingTheModelWhy) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("step-runner/issue-3"));
  SR_ASSERT_OK(forge_->SetModelMode(3, "stale-once"));
  CatalogRun run = GenerateFor(3);
  ASSERT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.outputs["attempts"], 2);
  EXPECT_EQ(run.outputs["files_changed"], json::array({"calc.py", "test_power.py"}));
  SR_ASSERT_OK_AND_ASSIGN(json seen, forge_->Api("GET", "/-/model/requests"));
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_THAT(seen[1]["last_user_message"].get<std::string>(), HasSubstr("did not apply"));
  EXPECT_THAT(seen[1]["last_user_message"].get<std::string>(), HasSubstr("calc.py"));
}

TEST_F(CatalogTest, ModelFaultsEndInClearErrorsAndLeaveTheTreeAlone) {
  ASSERT_NO_FATAL_FAILURE(CloneAndBranch("step-runner/issue-3"));
  SR_ASSERT_OK(forge_->SetModelMode(3, "junk"));
  CatalogRun junk = GenerateFor(3, {"--max-attempts", "2"});
  EXPECT_EQ(junk.exit_code, 1);
  EXPECT_THAT(junk.err, HasSubstr("no usable diff from the model after 2 attempts"));
  EXPECT_THAT(junk.err, HasSubstr("no unified diff"));

  SR_ASSERT_OK(forge_->SetModelMode(3, "stale"));
  CatalogRun stale = GenerateFor(3, {"--max-attempts", "2"});
  EXPECT_EQ(stale.exit_code, 1);
  EXPECT_THAT(stale.err, HasSubstr("does not apply to calc.py"));

  SR_ASSERT_OK(forge_->SetModelMode(3, "malformed"));
  CatalogRun malformed = GenerateFor(3, {"--max-attempts", "2"});
  EXPECT_EQ(malformed.exit_code, 1);
  EXPECT_THAT(malformed.err, HasSubstr("not a chat completion"));

  SR_ASSERT_OK(forge_->SetModelMode(3, "sleep"));
  CatalogRun slow = GenerateFor(3, {"--request-timeout", "1"});
  EXPECT_EQ(slow.exit_code, 1);
  EXPECT_THAT(slow.err, HasSubstr("no answer within 1s"));

  // The whole command's deadline holds even when a single call's timeout is longer.
  CatalogRun stalled = GenerateFor(3, {"--request-timeout", "60", "--timeout", "1"});
  EXPECT_EQ(stalled.exit_code, 124);
  EXPECT_THAT(stalled.err, HasSubstr("gave up after 1 s"));

  CatalogRun wrong_key = Catalog({"generate", "--endpoint", forge_->url(), "--model", "m", "--dir", "repo", "--title", "t"},
                          {"SR_MODEL_KEY=wrong-key"});
  EXPECT_EQ(wrong_key.exit_code, 1);
  EXPECT_THAT(wrong_key.err, HasSubstr("rejected the key"));
  // Nothing of the failed attempts reached the work tree.
  SR_ASSERT_OK_AND_ASSIGN(CommandResult status, RunCommand({"git", "-C", work_ + "/repo", "status", "--porcelain"}));
  EXPECT_EQ(status.out, "");
}

}  // namespace
}  // namespace step_runner::testing

// catalog_bench: the catalog's git steps (sr-catalog, libgit2) against the git CLI, side by side
// in one run, on one generated repository served by the local forge over smart HTTP.
//
//   catalog_bench [--files 10000] [--commits 1000] [--changed 100] [--reps 5] [--tmp-dir /tmp] [--quick]
//
// - The repository (N files in 100 folders, M commits touching 10 files each) is generated with
//   `git fast-import` straight into the forge's bare repository (setup, not timed).
// - Timed, per rep, the two sides alternating which goes first: a full clone over HTTP with the
//   token; a commit of `--changed` modified files (sr-catalog commit vs `git add -A && git
//   commit`); a push of that commit to a new branch; then a --depth 1 clone and a push of one
//   commit from it.
// - One untimed clone per side first, so both start with the server's pack and the page cache
//   warm.
// - Prints a Markdown table of medians, wall time and CPU time (user+sys of the command and its
//   children, e.g. git's index-pack), and the ratios sr-catalog / git (below 1: faster). The CPU
//   figure is the steadier one on a shared machine. No assertion on timing: the smoke test
//   (--quick) only checks it runs to the end.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <iostream>
#include <map>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "step-runner/base/files.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/process/subprocess.h"
#include "tests/forge/forge_fixture.h"

namespace step_runner::bench {
namespace {

struct Options {
  int files = 10000;
  int commits = 1000;
  int changed = 100;
  int reps = 5;
  std::string tmp_dir = "/tmp";  // the clones' filesystem matters (ext4 inode allocation, tmpfs)
};

// CPU time (user + sys) of this process's reaped children so far, in ms.
double ChildrenCpuMs() {
  rusage usage;
  ::getrusage(RUSAGE_CHILDREN, &usage);
  auto ms = [](const timeval& t) { return t.tv_sec * 1000.0 + t.tv_usec / 1000.0; };
  return ms(usage.ru_utime) + ms(usage.ru_stime);
}

// Runs argv in `dir` with `env` added, stdin from `input_path` (or /dev/null); fails on a
// non-zero exit (with the command's output) or after 10 minutes.
absl::Status Run(const std::vector<std::string>& argv, const std::string& dir, const std::vector<std::string>& env,
                 const std::string& log_path, const std::string& input_path = "") {
  std::vector<std::string> full_env = env;  // first match wins in getenv: ours go first
  for (const std::string& e : Environment()) full_env.push_back(e);
  UniqueFd log(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  UniqueFd in;
  if (!input_path.empty()) in.Reset(::open(input_path.c_str(), O_RDONLY | O_CLOEXEC));
  SR_ASSIGN_OR_RETURN(process::Subprocess child,
                      process::Subprocess::Spawn({.argv = argv, .env = full_env, .work_dir = dir,
                                                  .stdout_fd = log.get(), .stderr_fd = log.get(),
                                                  .stdin_fd = in ? in.get() : -1}));
  pollfd pfd{.fd = child.pidfd(), .events = POLLIN};
  if (::poll(&pfd, 1, 600000) <= 0) (void)child.SignalGroup(SIGKILL);
  SR_ASSIGN_OR_RETURN(int code, child.Reap());
  if (code != 0) {
    return absl::InternalError(absl::StrCat(argv[0], " ", argv.size() > 1 ? argv[1] : "", " exited with ", code, ": ",
                                            ReadFile(log_path).value_or("")));
  }
  return absl::OkStatus();
}

std::string Content(int file, int version) {
  std::string text = absl::StrFormat("// file %d, version %d\n", file, version);
  for (int line = 0; line < 8; ++line) {
    absl::StrAppendFormat(&text, "int f%d_%d(int x) { return x * %d + %d; }\n", file, line, file % 97 + line, version);
  }
  return text;
}
std::string FilePath(int file) { return absl::StrFormat("dir%02d/file%05d.c", file % 100, file); }

// A fast-import stream: one commit with every file, then commits touching 10 files each.
std::string FastImportStream(const Options& o) {
  std::string out;
  auto data = [&out](const std::string& text) { absl::StrAppend(&out, "data ", text.size(), "\n", text, "\n"); };
  for (int c = 1; c <= o.commits; ++c) {
    absl::StrAppend(&out, "commit refs/heads/main\nmark :", c, "\ncommitter Bench <bench@example.com> ",
                    1767225600 + c * 60, " +0000\n");
    data(absl::StrCat("Commit ", c));
    if (c > 1) absl::StrAppend(&out, "from :", c - 1, "\n");
    std::vector<int> touched;
    if (c == 1) {
      for (int f = 0; f < o.files; ++f) touched.push_back(f);
    } else {
      for (int k = 0; k < 10; ++k) touched.push_back(static_cast<int>((c * 7919L + k * 104729L) % o.files));
    }
    for (int f : touched) {
      absl::StrAppend(&out, "M 100644 inline ", FilePath(f), "\n");
      data(Content(f, c));
    }
  }
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

absl::Status Main(const Options& o) {
  SR_ASSIGN_OR_RETURN(std::unique_ptr<TempDir> tmp, TempDir::Create(o.tmp_dir));
  const std::string root = tmp->path();
  SR_ASSIGN_OR_RETURN(std::unique_ptr<testing::Forge> forge, testing::Forge::Start(root + "/forge"));
  SR_RETURN_IF_ERROR(forge->Api("POST", "/api/v4/projects", {{"path", "bench/big"}}).status());
  const std::string bare = root + "/forge/repos/bench/big.git";
  std::cerr << "catalog_bench: generating " << o.files << " files, " << o.commits << " commits\n";
  SR_RETURN_IF_ERROR(WriteFileAtomically(root + "/import", FastImportStream(o), 0600));
  SR_RETURN_IF_ERROR(Run({"git", "--git-dir", bare, "fast-import", "--quiet"}, root, {}, root + "/import.log", root + "/import"));

  const std::string url = forge->url() + "/bench/big.git";
  const std::vector<std::string> git_env = {"GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", "HOME=" + root};
  const std::vector<std::string> git_auth = {
      "git", "-c", "http.extraHeader=Authorization: Basic " + absl::Base64Escape("agent:" + forge->token()),
      "-c", "user.name=Bench", "-c", "user.email=bench@example.com"};
  auto git = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = git_auth;
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  };
  const std::vector<std::string> sr_env = {"SR_GIT_TOKEN=" + forge->token()};
  const std::string sr = testing::CatalogBinary();

  std::map<std::string, std::vector<double>> ms, cpu;  // "clone/sr" -> samples
  // Times `argvs`, run one after the other, as one operation.
  auto timed = [&](const std::string& key, const std::vector<std::vector<std::string>>& argvs, const std::string& dir,
                   const std::vector<std::string>& env) -> absl::Status {
    const double cpu_start = ChildrenCpuMs();
    auto start = Clock::now();
    for (const auto& argv : argvs) SR_RETURN_IF_ERROR(Run(argv, dir, env, root + "/run.log"));
    ms[key].push_back(MicrosSince(start) / 1000.0);
    cpu[key].push_back(ChildrenCpuMs() - cpu_start);
    return absl::OkStatus();
  };
  // Warm-up: the server packs once for each side, and the page cache holds the repository.
  SR_RETURN_IF_ERROR(Run({sr, "clone", "--url", url, "--dir", root + "/warm-sr"}, root, sr_env, root + "/w.log"));
  SR_RETURN_IF_ERROR(Run(git({"clone", "-q", url, root + "/warm-git"}), root, git_env, root + "/w.log"));
  SR_RETURN_IF_ERROR(RemoveTree(root + "/warm-sr"));
  SR_RETURN_IF_ERROR(RemoveTree(root + "/warm-git"));
  auto modify = [&](const std::string& dir, int rep) -> absl::Status {
    for (int k = 0; k < o.changed; ++k) {
      int f = (k * 97 + rep) % o.files;
      SR_RETURN_IF_ERROR(WriteFileAtomically(absl::StrCat(dir, "/", FilePath(f)), Content(f, 100000 + rep), 0644));
    }
    return absl::OkStatus();
  };
  for (int rep = 0; rep < o.reps; ++rep) {
    const std::string sr_dir = absl::StrCat(root, "/sr-", rep), git_dir = absl::StrCat(root, "/git-", rep);
    const std::string sr_branch = absl::StrCat("bench-sr-", rep), git_branch = absl::StrCat("bench-git-", rep);
    const bool sr_first = rep % 2 == 0;
    for (int side = 0; side < 2; ++side) {
      if ((side == 0) == sr_first) {
        SR_RETURN_IF_ERROR(timed("clone/sr", {{sr, "clone", "--url", url, "--dir", sr_dir}}, root, sr_env));
      } else {
        SR_RETURN_IF_ERROR(timed("clone/git", {git({"clone", "-q", url, git_dir})}, root, git_env));
      }
    }
    SR_RETURN_IF_ERROR(Run({sr, "branch", "--dir", sr_dir, "--name", sr_branch}, root, sr_env, root + "/b.log"));
    SR_RETURN_IF_ERROR(Run(git({"checkout", "-q", "-b", git_branch}), git_dir, git_env, root + "/b.log"));
    SR_RETURN_IF_ERROR(modify(sr_dir, rep));
    SR_RETURN_IF_ERROR(modify(git_dir, rep));
    for (int side = 0; side < 2; ++side) {
      if ((side == 0) == sr_first) {
        // Each side's own message: the same tree, author and second would otherwise make the two
        // commits one object, and the second side's push would find it on the server already
        // (git's push then sent nothing, in 3 of 5 reps, whenever the two commits fell in the
        // same second).
        SR_RETURN_IF_ERROR(timed("commit/sr", {{sr, "commit", "--dir", sr_dir, "--message", "change (sr)",
                                                "--author-name", "Bench", "--author-email", "bench@example.com"}},
                                 root, sr_env));
      } else {
        SR_RETURN_IF_ERROR(
            timed("commit/git", {git({"add", "-A"}), git({"commit", "-q", "-m", "change (git)"})}, git_dir, git_env));
      }
    }
    for (int side = 0; side < 2; ++side) {
      if ((side == 0) == sr_first) {
        SR_RETURN_IF_ERROR(timed("push/sr", {{sr, "push", "--dir", sr_dir, "--branch", sr_branch}}, root, sr_env));
      } else {
        SR_RETURN_IF_ERROR(timed("push/git", {git({"push", "-q", "origin", git_branch})}, git_dir, git_env));
      }
    }
    SR_RETURN_IF_ERROR(RemoveTree(sr_dir));
    SR_RETURN_IF_ERROR(RemoveTree(git_dir));

    // The same with --depth 1: the clone, then a push of one commit from it (sr-catalog speaks
    // the protocol itself for both; libgit2 1.5 cannot).
    const std::string sr_shallow = sr_dir + "-shallow", git_shallow = git_dir + "-shallow";
    for (int side = 0; side < 2; ++side) {
      if ((side == 0) == sr_first) {
        SR_RETURN_IF_ERROR(timed("shallow-clone/sr", {{sr, "clone", "--url", url, "--dir", sr_shallow, "--depth", "1"}},
                                 root, sr_env));
      } else {
        SR_RETURN_IF_ERROR(timed("shallow-clone/git", {git({"clone", "-q", "--depth", "1", url, git_shallow})}, root, git_env));
      }
    }
    SR_RETURN_IF_ERROR(Run({sr, "branch", "--dir", sr_shallow, "--name", sr_branch + "-shallow"}, root, sr_env, root + "/b.log"));
    SR_RETURN_IF_ERROR(Run(git({"checkout", "-q", "-b", git_branch + "-shallow"}), git_shallow, git_env, root + "/b.log"));
    SR_RETURN_IF_ERROR(modify(sr_shallow, rep + 50));
    SR_RETURN_IF_ERROR(modify(git_shallow, rep + 50));
    SR_RETURN_IF_ERROR(Run({sr, "commit", "--dir", sr_shallow, "--message", "shallow change (sr)", "--author-name",
                            "Bench", "--author-email", "bench@example.com"},
                           root, sr_env, root + "/c.log"));
    SR_RETURN_IF_ERROR(Run(git({"add", "-A"}), git_shallow, git_env, root + "/c.log"));
    SR_RETURN_IF_ERROR(Run(git({"commit", "-q", "-m", "shallow change (git)"}), git_shallow, git_env, root + "/c.log"));
    for (int side = 0; side < 2; ++side) {
      if ((side == 0) == sr_first) {
        SR_RETURN_IF_ERROR(timed("shallow-push/sr", {{sr, "push", "--dir", sr_shallow, "--branch", sr_branch + "-shallow"}},
                                 root, sr_env));
      } else {
        SR_RETURN_IF_ERROR(
            timed("shallow-push/git", {git({"push", "-q", "origin", git_branch + "-shallow"})}, git_shallow, git_env));
      }
    }
    SR_RETURN_IF_ERROR(RemoveTree(sr_shallow));
    SR_RETURN_IF_ERROR(RemoveTree(git_shallow));
  }
  std::cout << absl::StrFormat("Repository: %d files, %d commits; commit of %d changed files; %d rep(s), medians; "
                               "work trees on %s (%s).\n\n",
                               o.files, o.commits, o.changed, o.reps, o.tmp_dir, FilesystemType(o.tmp_dir))
            << "| operation | sr-catalog wall (ms) | git CLI wall (ms) | wall ratio | sr-catalog CPU (ms) | git CLI CPU (ms) | CPU ratio |\n"
            << "|---|---|---|---|---|---|---|\n";
  const std::pair<const char*, const char*> operations[] = {{"clone", "clone"},
                                                            {"commit", "commit"},
                                                            {"push", "push"},
                                                            {"shallow-clone", "clone --depth 1"},
                                                            {"shallow-push", "push from the depth-1 clone"}};
  for (const auto& [op, label] : operations) {
    const std::string a = absl::StrCat(op, "/sr"), b = absl::StrCat(op, "/git");
    double wa = Median(ms[a]), wb = Median(ms[b]), ca = Median(cpu[a]), cb = Median(cpu[b]);
    std::cout << absl::StrFormat("| %s | %.0f | %.0f | %.2f | %.0f | %.0f | %.2f |\n", label, wa, wb, wb > 0 ? wa / wb : 0,
                                 ca, cb, cb > 0 ? ca / cb : 0);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace step_runner::bench

int main(int argc, char** argv) {
  step_runner::bench::Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--quick") {
      o.files = 500, o.commits = 20, o.changed = 20, o.reps = 1;
      continue;
    }
    if (flag == "--tmp-dir" && i + 1 < argc) {
      o.tmp_dir = argv[++i];
      continue;
    }
    int* target = flag == "--files" ? &o.files : flag == "--commits" ? &o.commits : flag == "--changed" ? &o.changed
                  : flag == "--reps" ? &o.reps : nullptr;
    if (target == nullptr || i + 1 >= argc || !absl::SimpleAtoi(argv[++i], target)) {
      std::cerr << "usage: catalog_bench [--files N] [--commits N] [--changed N] [--reps N] [--tmp-dir DIR] [--quick]\n";
      return 2;
    }
  }
  if (absl::Status s = step_runner::bench::Main(o); !s.ok()) {
    std::cerr << "catalog_bench: " << s << "\n";
    return 1;
  }
  return 0;
}

// step-runner-git: fetches a git step reference into the step cache, out of the daemon's process.
//
//   step-runner-git fetch-tree CACHE_DIR      (the URL and the revision come on stdin, one per line)
//
// Prints the checked-out tree's folder. On failure prints the reason and exits 3 when the
// revision does not exist, 4 when git failed, 5 for anything else.
//
// Why a separate program: libgit2 brings TLS, SSH and Kerberos libraries (~3 MiB resident) that
// the daemon would otherwise load at start for a feature most jobs never use, and a network
// fetch of untrusted content is better kept out of the daemon anyway. The URL comes on stdin
// because it may hold a password, and any local user can read a process's argv.
#include <iostream>
#include <string>

#include "step-runner/gitref/git_tree.h"

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) != "fetch-tree") {
    std::cerr << "usage: step-runner-git fetch-tree CACHE_DIR  (URL and revision on stdin, one per line)\n";
    return 2;
  }
  std::string url, rev;
  if (!std::getline(std::cin, url) || !std::getline(std::cin, rev) || url.empty() || rev.empty()) {
    std::cerr << "step-runner-git: expected the URL and the revision on stdin, one per line\n";
    return 2;
  }
  absl::StatusOr<std::string> tree = step_runner::gitref::FetchGitTree(argv[2], url, rev);
  if (tree.ok()) {
    std::cout << *tree << std::flush;
    return 0;
  }
  std::cout << tree.status().message() << std::flush;
  if (absl::IsNotFound(tree.status())) return 3;
  if (absl::IsFailedPrecondition(tree.status())) return 4;
  return 5;
}

#ifndef STEP_RUNNER_ENGINE_LOADER_H_
#define STEP_RUNNER_ENGINE_LOADER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "step-runner/steps/step_file.h"

namespace step_runner::engine {

// A step file read and parsed, with the folder that its relative references and
// ${{ step_dir }} mean.
struct LoadedStep {
  std::shared_ptr<const steps::StepFile> file;
  std::string dir;
  std::string source;  // for messages: the path, dist:// name or git location
  std::string path;    // the file's real path: the same file twice on one chain is a cycle
};

struct LoaderOptions {
  // dist://NAME is CATALOG/NAME/step.yml. dist://script is built in (a `script:` step).
  std::string catalog_dir;
  // Git steps: bare repositories and checked-out trees, content-addressed by commit, shared
  // by every job (and every daemon) that uses the same folder.
  std::string cache_dir;
  // The program that fetches git references (step-runner-git); empty: the one beside the
  // running binary.
  std::string git_helper;
};

// Resolves step references to parsed step files. Thread-safe; the git cache is also safe
// between processes (a lock file per repository, trees published by rename).
class StepLoader {
 public:
  explicit StepLoader(LoaderOptions options);

  // `from_dir`: the folder of the file that holds the reference. A dynamic reference must have
  // been expanded (ParseShortReference of its value) before it comes here.
  absl::StatusOr<LoadedStep> Load(const steps::StepReference& ref, const std::string& from_dir);

  const LoaderOptions& options() const { return options_; }

 private:
  absl::StatusOr<LoadedStep> LoadFile(const std::string& path, const std::string& source);
  // The checked-out tree of `url` at `rev`: fetched into the cache when not there yet.
  absl::StatusOr<std::string> GitTree(const std::string& url, const std::string& rev);

  LoaderOptions options_;
};

}  // namespace step_runner::engine

#endif  // STEP_RUNNER_ENGINE_LOADER_H_

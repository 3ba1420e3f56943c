#ifndef STEP_RUNNER_SANDBOX_STUB_H_
#define STEP_RUNNER_SANDBOX_STUB_H_

#include <string>
#include <vector>

namespace step_runner::sandbox {

// `step-runner-sandbox --stub FD [--as-uid UID --as-gid GID]`, inside a warm sandbox (see
// stub.cc): `args` without argv[0]. Returns only on a usage error; otherwise it becomes the step.
int StubMain(const std::vector<std::string>& args);

}  // namespace step_runner::sandbox

#endif  // STEP_RUNNER_SANDBOX_STUB_H_

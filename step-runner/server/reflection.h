#ifndef STEP_RUNNER_SERVER_REFLECTION_H_
#define STEP_RUNNER_SERVER_REFLECTION_H_

#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"

namespace step_runner::server {

// gRPC server reflection (grpc.reflection.v1alpha and grpc.reflection.v1) over this binary's
// compiled-in descriptors, so that grpcurl and other stock tools can list and call the daemon's
// services. Ours rather than Debian's grpc++_reflection, which links the TLS-enabled grpc++ and
// with it libssl and libcrypto: ~4 MiB of the idle daemon's resident memory.
//
// `services`: the fully qualified names that list_services reports (the health service has no
// descriptor here, as with gRPC's own plugin, so only its name is listed).
class Reflection {
 public:
  explicit Reflection(std::vector<std::string> services);
  ~Reflection();

  // Register both with the ServerBuilder; they must outlive the server.
  std::vector<grpc::Service*> services();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace step_runner::server

#endif  // STEP_RUNNER_SERVER_REFLECTION_H_

#include "step-runner/server/reflection.h"

#include <set>
#include <utility>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace step_runner::server {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::DescriptorPool;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;

// One stream: a response for each request, in order. `Api` is the generated namespace of one
// protocol version; both versions have the same messages.
template <typename Request, typename Response>
class ReflectionStream final : public grpc::ServerBidiReactor<Request, Response> {
 public:
  explicit ReflectionStream(const std::vector<std::string>* services) : services_(services) {
    this->StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or went away
      this->Finish(grpc::Status::OK);
      return;
    }
    response_.Clear();
    Answer();
    this->StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    this->StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  void Answer() {
    const DescriptorPool* pool = DescriptorPool::generated_pool();
    response_.set_valid_host(request_.host());
    *response_.mutable_original_request() = request_;
    switch (request_.message_request_case()) {
      case Request::kListServices:
        for (const std::string& name : *services_) response_.mutable_list_services_response()->add_service()->set_name(name);
        return;
      case Request::kFileByFilename:
        return SendFile(pool->FindFileByName(request_.file_by_filename()), request_.file_by_filename());
      case Request::kFileContainingSymbol:
        return SendFile(pool->FindFileContainingSymbol(request_.file_containing_symbol()),
                        request_.file_containing_symbol());
      case Request::kFileContainingExtension: {
        const auto& ask = request_.file_containing_extension();
        const Descriptor* type = pool->FindMessageTypeByName(ask.containing_type());
        const FieldDescriptor* extension = type ? pool->FindExtensionByNumber(type, ask.extension_number()) : nullptr;
        return SendFile(extension ? extension->file() : nullptr,
                        ask.containing_type() + " extension " + std::to_string(ask.extension_number()));
      }
      case Request::kAllExtensionNumbersOfType: {
        const Descriptor* type = pool->FindMessageTypeByName(request_.all_extension_numbers_of_type());
        if (!type) return Error(grpc::StatusCode::NOT_FOUND, "unknown type " + request_.all_extension_numbers_of_type());
        std::vector<const FieldDescriptor*> extensions;
        pool->FindAllExtensions(type, &extensions);
        auto* numbers = response_.mutable_all_extension_numbers_response();
        numbers->set_base_type_name(type->full_name());
        for (const FieldDescriptor* e : extensions) numbers->add_extension_number(e->number());
        return;
      }
      default:
        return Error(grpc::StatusCode::UNIMPLEMENTED, "the request names no reflection query");
    }
  }

  // The file, then each file it imports (transitively) that this stream has not sent yet, as
  // gRPC's own reflection does: a client builds its descriptor pool from them.
  void SendFile(const FileDescriptor* file, const std::string& what) {
    if (!file) return Error(grpc::StatusCode::NOT_FOUND, "not found: " + what);
    auto* files = response_.mutable_file_descriptor_response();
    std::vector<const FileDescriptor*> pending = {file};
    bool first = true;
    while (!pending.empty()) {
      const FileDescriptor* f = pending.back();
      pending.pop_back();
      if (!first && !sent_.insert(f->name()).second) continue;
      if (first) sent_.insert(f->name());
      first = false;
      google::protobuf::FileDescriptorProto proto;
      f->CopyTo(&proto);
      proto.SerializeToString(files->add_file_descriptor_proto());
      for (int i = 0; i < f->dependency_count(); ++i) pending.push_back(f->dependency(i));
    }
  }

  void Error(grpc::StatusCode code, const std::string& message) {
    response_.mutable_error_response()->set_error_code(static_cast<int>(code));
    response_.mutable_error_response()->set_error_message(message);
  }

  const std::vector<std::string>* services_;
  std::set<std::string> sent_;  // files this stream has sent
  Request request_;
  Response response_;
};

template <typename Api>
class ReflectionService final : public Api::ServerReflection::CallbackService {
 public:
  explicit ReflectionService(const std::vector<std::string>* services) : services_(services) {}

  grpc::ServerBidiReactor<typename Api::ServerReflectionRequest, typename Api::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext*) override {
    return new ReflectionStream<typename Api::ServerReflectionRequest, typename Api::ServerReflectionResponse>(services_);
  }

 private:
  const std::vector<std::string>* services_;
};

// The generated namespaces, as template arguments.
struct V1Alpha {
  using ServerReflection = grpc::reflection::v1alpha::ServerReflection;
  using ServerReflectionRequest = grpc::reflection::v1alpha::ServerReflectionRequest;
  using ServerReflectionResponse = grpc::reflection::v1alpha::ServerReflectionResponse;
};
struct V1 {
  using ServerReflection = grpc::reflection::v1::ServerReflection;
  using ServerReflectionRequest = grpc::reflection::v1::ServerReflectionRequest;
  using ServerReflectionResponse = grpc::reflection::v1::ServerReflectionResponse;
};

}  // namespace

struct Reflection::Impl {
  explicit Impl(std::vector<std::string> names) : services(std::move(names)), v1alpha(&services), v1(&services) {}
  std::vector<std::string> services;
  ReflectionService<V1Alpha> v1alpha;
  ReflectionService<V1> v1;
};

Reflection::Reflection(std::vector<std::string> services) {
  services.push_back("grpc.reflection.v1alpha.ServerReflection");
  services.push_back("grpc.reflection.v1.ServerReflection");
  impl_ = std::make_unique<Impl>(std::move(services));
}

Reflection::~Reflection() = default;

std::vector<grpc::Service*> Reflection::services() { return {&impl_->v1alpha, &impl_->v1}; }

}  // namespace step_runner::server

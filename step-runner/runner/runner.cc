#include "step-runner/runner/runner.h"

#include <dirent.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "step-runner/engine/engine.h"
#include "step-runner/base/files.h"
#include "step-runner/base/sha256.h"
#include "step-runner/base/logging.h"
#include "step-runner/base/status_macros.h"
#include "step-runner/process/subprocess.h"
#include "step-runner/steps/step_file.h"

namespace step_runner::runner {
namespace {

using ::google::protobuf::util::TimeUtil;

constexpr absl::Duration kPruneInterval = absl::Minutes(1);

// A request problem outside the step file, in the same structured form as step-file problems.
absl::Status Invalid(const std::string& field, std::string description) {
  return steps::InvalidArgument({steps::Violation{{}, field, std::move(description)}}, "request");
}

absl::Status ValidateEnvName(const std::string& name, absl::string_view what) {
  if (name.empty() || name.find('=') != std::string::npos || name.find('\0') != std::string::npos) {
    return Invalid(absl::StrCat(what, "[\"", absl::CHexEscape(name), "\"]"),
                   "a name must be non-empty and hold no '=' or NUL");
  }
  return absl::OkStatus();
}

absl::Status ValidateEnvValue(const std::string& name, const std::string& value, absl::string_view what) {
  if (value.find('\0') != std::string::npos) {
    return Invalid(absl::StrCat(what, "[\"", name, "\"]"), "the value holds a NUL byte");
  }
  return absl::OkStatus();
}

absl::StatusOr<absl::Duration> DurationField(const google::protobuf::Duration& d, bool present,
                                             absl::string_view name, absl::Duration fallback) {
  if (!present) return fallback;
  if (d.seconds() < 0 || d.nanos() < 0 || d.nanos() >= 1000000000) {
    return Invalid(std::string(name), "must be a non-negative duration");
  }
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

// Environment as an ordered map, so later layers override earlier ones.
using EnvMap = std::map<std::string, std::string>;

std::string RandomHex(size_t bytes) {
  std::string raw(bytes, '\0');
  if (::getrandom(raw.data(), raw.size(), 0) != static_cast<ssize_t>(raw.size())) {
    // getrandom does not fail for small sizes after boot; fall back to something unique anyway.
    raw = absl::StrCat(::getpid(), absl::ToUnixNanos(absl::Now()));
  }
  return absl::BytesToHexString(raw);
}

}  // namespace

absl::Status ValidateJobId(const std::string& id) {
  if (id.empty()) return Invalid("id", "a job needs a non-empty id");
  if (id.size() > 256) return Invalid("id", "at most 256 bytes");
  for (unsigned char c : id) {
    if (c < 0x20 || c == 0x7f) return Invalid("id", "control characters are not allowed");
  }
  return absl::OkStatus();
}

Runner::Runner(RunnerOptions options) : options_(std::move(options)) {}

Runner::~Runner() {
  if (!loop_) return;
  Shutdown(absl::ZeroDuration());
  // Whatever still runs is killed outright: no step outlives its supervisor unsupervised.
  std::vector<std::shared_ptr<Job>> jobs;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, job] : jobs_) jobs.push_back(job);
  }
  loop_->Post([jobs] {
    for (const auto& job : jobs) job->ForceKill();
  });
  {
    absl::MutexLock lock(&mu_);
    auto all_ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ == 0; };
    mu_.AwaitWithTimeout(absl::Condition(&all_ended), options_.drain_timeout + absl::Seconds(3));
  }
  loop_.reset();
}

absl::StatusOr<std::unique_ptr<Runner>> Runner::Create(RunnerOptions options) {
  std::unique_ptr<Runner> runner(new Runner(std::move(options)));
  SR_RETURN_IF_ERROR(runner->Init());
  return runner;
}

absl::Status Runner::Init() {
  if (options_.state_dir.empty()) return absl::InvalidArgumentError("a state dir is required");
  SR_RETURN_IF_ERROR(MakeDirs(options_.state_dir, 0700));
  // The state holds job logs (masked) and records; nobody but the daemon's user reads it.
  if (::chmod(options_.state_dir.c_str(), 0700) != 0) {
    return ErrnoStatus(errno, absl::StrCat("chmod(", options_.state_dir, ")"));
  }
  jobs_dir_ = options_.state_dir + "/jobs";
  SR_RETURN_IF_ERROR(MakeDirs(jobs_dir_, 0700));
  loader_ = std::make_unique<engine::StepLoader>(engine::LoaderOptions{
      options_.catalog_dir,
      options_.step_cache_dir.empty() ? options_.state_dir + "/step-cache" : options_.step_cache_dir});

  std::string salt_path = options_.state_dir + "/fingerprint.salt";
  if (auto salt = ReadFile(salt_path); salt.ok() && salt->size() == 32) {
    salt_ = *salt;
  } else {
    salt_ = RandomHex(16);
    SR_RETURN_IF_ERROR(WriteFileAtomically(salt_path, salt_, 0600));
  }

  if (options_.secrets_root.empty()) {
    std::string shm = absl::StrCat("/dev/shm/step-runner-", ::getuid());
    if (MakeDirs(shm, 0700).ok() && ::access(shm.c_str(), W_OK) == 0) {
      options_.secrets_root = shm;
    } else {
      options_.secrets_root = options_.state_dir + "/secrets";
      SR_LOG(WARNING) << "/dev/shm is not writable; file variables go to " << options_.secrets_root;
    }
  }
  SR_RETURN_IF_ERROR(MakeDirs(options_.secrets_root, 0700));

  SR_ASSIGN_OR_RETURN(loop_, EventLoop::Create());
  SR_RETURN_IF_ERROR(Recover());
  Prune();
  // Ages out finished jobs even when no new job finishes to trigger a prune.
  struct Ticker {
    static void Arm(Runner* runner, EventLoop* loop) {
      loop->AddTimer(kPruneInterval, [runner, loop] {
        runner->Prune();
        Arm(runner, loop);
      });
    }
  };
  loop_->Post([this, loop = loop_.get()] { Ticker::Arm(this, loop); });
  return absl::OkStatus();
}

absl::Status Runner::Recover() {
  DIR* dir = ::opendir(jobs_dir_.c_str());
  if (dir == nullptr) return ErrnoStatus(errno, absl::StrCat("opendir(", jobs_dir_, ")"));
  std::vector<std::string> names;
  while (struct dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());  // names start with creation time: oldest first

  const std::string boot_id = process::BootId();
  int interrupted = 0;
  absl::MutexLock lock(&mu_);
  for (const std::string& name : names) {
    std::string path = absl::StrCat(jobs_dir_, "/", name);
    auto bytes = ReadFile(path + "/record.pb");
    proto::JobRecord record;
    if (!bytes.ok() || !record.ParseFromString(*bytes) || record.status().id().empty()) {
      // A job folder without a readable record was being created when the daemon died, or is
      // not ours: nothing in it can be served.
      SR_LOG(WARNING) << "removing " << path << ": no readable job record";
      (void)RemoveTree(path);
      continue;
    }
    (void)RemoveTree(absl::StrCat(options_.secrets_root, "/", name));
    const bool was_running = record.status().status() == proto::StepResult::running;
    if (was_running) {
      ++interrupted;
      const proto::ProcessGroupRecord& group = record.running_group();
      if (group.pgid() > 0 && group.boot_id() == boot_id) {
        // Kill only if the group is provably the one the job started: its leader is the same
        // process instance, or gone while members remain (then the pgid cannot have been reused).
        auto ticks = process::ProcessStartTicks(group.pgid());
        bool same = ticks.ok() ? *ticks == group.leader_start_ticks()
                               : !process::LiveProcessesInGroup(group.pgid()).empty();
        if (same) {
          SR_LOG(WARNING) << "job " << record.status().id() << ": killing leftover process group "
                          << group.pgid();
          ::kill(-group.pgid(), SIGKILL);
        }
      }
      proto::Status* status = record.mutable_status();
      status->set_status(proto::StepResult::failure);
      status->set_message("the daemon stopped while the job was running");
      status->mutable_error()->set_kind(proto::StatusError::interrupted);
      status->mutable_error()->set_message(status->message());
      *status->mutable_end_time() = TimeUtil::GetCurrentTime();
      status->mutable_result()->set_status(proto::StepResult::failure);
      for (proto::StepResult& step : *status->mutable_result()->mutable_sub_step_results()) {
        if (step.status() == proto::StepResult::running) step.set_status(proto::StepResult::failure);
      }
      record.clear_running_group();
      if (auto size = ReadFile(path + "/log"); size.ok()) status->set_log_size(size->size());
      (void)WriteFileAtomically(path + "/record.pb", record.SerializeAsString(), 0600);
    }
    auto job = Job::Recover(path, std::move(record), was_running);
    if (!job.ok()) {
      SR_LOG(WARNING) << "skipping " << path << ": " << job.status();
      continue;
    }
    auto [it, inserted] = jobs_.emplace((*job)->id(), *job);
    if (!inserted) {
      // Two folders for one id (a Close whose deletion the crash cut short): newest wins.
      std::swap(it->second, *job);
      (void)RemoveTree((*job)->dir());
    }
  }
  for (const auto& [id, job] : jobs_) finished_by_end_.emplace(job->end_time(), job);
  if (!jobs_.empty()) {
    SR_LOG(INFO) << "recovered " << jobs_.size() << " jobs from " << jobs_dir_ << " ("
                 << interrupted << " interrupted)";
  }
  return absl::OkStatus();
}

std::string Runner::Fingerprint(const proto::RunRequest& request) const {
  std::string serialized;
  {
    google::protobuf::io::StringOutputStream stream(&serialized);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);  // map order must not change the fingerprint
    request.SerializeToCodedStream(&coded);
  }
  // Salted, so that the record on disk does not let anyone test guesses of masked values.
  std::string input = salt_ + serialized;
  return Sha256(input);
}

absl::StatusOr<JobConfig> Runner::Plan(const proto::RunRequest& request, const std::string& dir_name) {
  JobConfig config;
  config.id = request.id();
  config.dir = absl::StrCat(jobs_dir_, "/", dir_name);
  SR_ASSIGN_OR_RETURN(config.timeout, DurationField(request.timeout(), request.has_timeout(),
                                                    "timeout", absl::InfiniteDuration()));
  if (request.has_timeout() && config.timeout == absl::ZeroDuration()) {
    config.timeout = absl::InfiniteDuration();  // 0 means no limit, as in GitLab's client
  }
  SR_ASSIGN_OR_RETURN(config.graceful_exit_timeout,
                      DurationField(request.graceful_exit_timeout(), request.has_graceful_exit_timeout(),
                                    "graceful_exit_timeout", options_.default_graceful_exit_timeout));
  config.drain_timeout = options_.drain_timeout;
  config.launch_hook = options_.launch_hook;
  config.step_event_hook = options_.step_event_hook;

  std::vector<steps::Violation> violations;
  absl::StatusOr<std::shared_ptr<const steps::StepFile>> file = parsed_files_.Parse(request.steps(), "steps", &violations);
  if (!file.ok()) return file.status();

  // Job.build_dir overrides work_dir, as in GitLab.
  config.work_dir = !request.job().build_dir().empty() ? request.job().build_dir() : request.work_dir();
  if (!config.work_dir.empty() && config.work_dir[0] != '/') {
    return Invalid(request.job().build_dir().empty() ? "work_dir" : "job.build_dir",
                   absl::StrCat("\"", config.work_dir, "\" must be an absolute path"));
  }
  if (config.work_dir.empty()) config.work_dir = config.dir + "/work";
  if (options_.check_work_tree) {
    if (absl::Status s = options_.check_work_tree(config.work_dir, config.dir); !s.ok()) {
      return Invalid(request.job().build_dir().empty() ? "work_dir" : "job.build_dir", std::string(s.message()));
    }
  }

  // Referenced steps (local and dist://) are loaded now, so that an unknown step, a cycle or a
  // wrong input is refused before anything runs. Relative references start at the work dir.
  const std::string steps_dir = request.steps_dir().empty() ? config.work_dir : request.steps_dir();
  if (steps_dir[0] != '/') return Invalid("steps_dir", "must be an absolute path");
  violations = engine::CheckReferences(**file, steps_dir, "steps", *loader_);
  if (!violations.empty()) return steps::InvalidArgument(violations, "steps");

  engine::JobSpec& spec = config.spec;
  spec.file = *std::move(file);
  spec.file_dir = steps_dir;
  spec.work_dir = config.work_dir;
  spec.io_root = config.dir + "/io";
  spec.loader = loader_.get();

  // The job's own inputs (an extension of RunRequest), checked against its spec.
  engine::Json given = engine::Json::object();
  for (const auto& [name, value] : request.inputs()) {
    std::string json;
    (void)google::protobuf::util::MessageToJsonString(value, &json);
    given[name] = engine::Json::parse(json, nullptr, false);
  }
  // A command line has no types: a string input given 5 or true receives "5" or "true".
  for (auto& [name, value] : given.items()) {
    auto it = spec.file->spec.inputs.find(name);
    if (it != spec.file->spec.inputs.end() && it->second.type == steps::ValueType::kString &&
        (value.is_number() || value.is_boolean())) {
      value = value.is_boolean() ? (value.get<bool>() ? "true" : "false") : expr::ToDisplayString(value);
    }
  }
  absl::StatusOr<engine::Json> inputs = engine::BindInputs(spec.file->spec, given, "");
  if (!inputs.ok()) return Invalid("inputs", std::string(inputs.status().message()));
  spec.inputs = *std::move(inputs);
  for (const auto& [name, param] : spec.file->spec.inputs) {
    if (!param.sensitive) continue;
    spec.sensitive_inputs.insert(name);
    const engine::Json& v = spec.inputs[name];
    std::string text = v.is_string() ? v.get<std::string>() : v.dump();
    if (!text.empty()) config.secrets.push_back(text);
  }

  EnvMap env;
  for (const std::string& entry : options_.base_env) {
    size_t eq = entry.find('=');
    if (eq != std::string::npos) env[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  for (const auto& [k, v] : request.env()) {
    SR_RETURN_IF_ERROR(ValidateEnvName(k, "env"));
    SR_RETURN_IF_ERROR(ValidateEnvValue(k, v, "env"));
    env[k] = v;
  }
  bool any_file = false;
  for (const proto::Variable& var : request.job().variables()) {
    SR_RETURN_IF_ERROR(ValidateEnvName(var.key(), "job.variables"));
    if (var.masked() && !var.value().empty()) {
      config.secrets.push_back(var.value());
      spec.masked_variables.insert(var.key());
    }
    if (var.file()) {
      if (var.key().find('/') != std::string::npos || var.key() == "." || var.key() == "..") {
        return Invalid(absl::StrCat("job.variables[\"", var.key(), "\"]"), "a file variable's name cannot hold '/'");
      }
      any_file = true;
      env[var.key()] = absl::StrCat(options_.secrets_root, "/", dir_name, "/", var.key());
      spec.job_variables[var.key()] = env[var.key()];
      spec.masked_variables.erase(var.key());  // the expression sees the path, not the secret
    } else {
      SR_RETURN_IF_ERROR(ValidateEnvValue(var.key(), var.value(), "job.variables"));
      env[var.key()] = var.value();
      spec.job_variables[var.key()] = var.value();
    }
  }
  if (any_file) config.secrets_dir = absl::StrCat(options_.secrets_root, "/", dir_name);
  spec.env = env;
  return config;
}

absl::Status Runner::Run(const proto::RunRequest& request) {
  SR_RETURN_IF_ERROR(ValidateJobId(request.id()));
  const std::string fingerprint = Fingerprint(request);
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return absl::UnavailableError("step-runner is shutting down");
  if (auto it = jobs_.find(request.id()); it != jobs_.end()) {
    if (it->second->fingerprint() == fingerprint) return absl::OkStatus();  // a retried Run
    return absl::FailedPreconditionError(absl::StrCat(
        "job \"", request.id(), "\" already exists with a different request; Close it first or use another id"));
  }

  // Names sort by creation time, which recovery relies on.
  const std::string dir_name =
      absl::StrFormat("%020d-%s", absl::ToUnixMicros(absl::Now()), RandomHex(4));
  SR_ASSIGN_OR_RETURN(JobConfig config, Plan(request, dir_name));
  config.fingerprint = fingerprint;

  // Nothing is created until the whole request is valid. The job's folder first: the default
  // work dir is inside it, and each is then one mkdir rather than a walk from the root.
  SR_RETURN_IF_ERROR(MakeDirs(config.dir, 0700));
  if (absl::Status s = MakeDirs(config.work_dir, 0700); !s.ok()) {
    (void)RemoveTree(config.dir);
    return Invalid("work_dir", absl::StrCat("cannot create it: ", s.message()));
  }
  absl::Status prepared = absl::OkStatus();
  if (!config.secrets_dir.empty()) {
    prepared = MakeDirs(config.secrets_dir, 0700);
    for (const proto::Variable& var : request.job().variables()) {
      if (!var.file() || !prepared.ok()) continue;
      prepared = WriteFileAtomically(absl::StrCat(config.secrets_dir, "/", var.key()), var.value(), 0600);
    }
  }
  absl::StatusOr<std::shared_ptr<Job>> job =
      prepared.ok() ? Job::Create(std::move(config), loop_.get(), &engine_threads_,
                                  [this](Job& finished) { OnJobFinished(finished); })
                    : absl::StatusOr<std::shared_ptr<Job>>(prepared);
  if (!job.ok()) {
    (void)RemoveTree(absl::StrCat(jobs_dir_, "/", dir_name));
    (void)RemoveTree(absl::StrCat(options_.secrets_root, "/", dir_name));
    return absl::InternalError(absl::StrCat("cannot prepare the job: ", job.status().message()));
  }
  jobs_[request.id()] = *job;
  ++running_;
  // Without a timeout there is nothing for the loop to do, and waking it costs every run.
  if ((*job)->HasTimeout()) loop_->Post([job = *job] { job->Start(); });
  (*job)->StartEngine();
  return absl::OkStatus();
}

absl::Status Runner::Cancel(const std::string& id) {
  std::shared_ptr<Job> job;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job with id \"", id, "\""));
    job = it->second;
  }
  loop_->Post([job] { job->RequestCancel(proto::StatusError::cancelled, "the job was cancelled"); });
  return absl::OkStatus();
}

absl::Status Runner::Close(const std::string& id) {
  std::shared_ptr<Job> job;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return absl::OkStatus();
    job = std::move(it->second);
    jobs_.erase(it);
    if (job->finished()) {
      auto [begin, end] = finished_by_end_.equal_range(job->end_time());
      for (auto i = begin; i != end; ++i) {
        if (i->second == job) {
          finished_by_end_.erase(i);
          break;
        }
      }
    }
  }
  // The id is free at once; the processes get their graceful exit and the folders go after.
  job->DeleteWhenFinished();
  loop_->Post([job] { job->RequestCancel(proto::StatusError::cancelled, "the job was closed"); });
  return absl::OkStatus();
}

absl::StatusOr<std::vector<proto::Status>> Runner::GetStatus(const std::string& id) const {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    absl::MutexLock lock(&mu_);
    if (!id.empty()) {
      auto it = jobs_.find(id);
      if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job with id \"", id, "\""));
      jobs.push_back(it->second);
    } else {
      for (const auto& [key, job] : jobs_) jobs.push_back(job);
    }
  }
  std::vector<proto::Status> out;
  out.reserve(jobs.size());
  for (const auto& job : jobs) out.push_back(job->status());
  std::sort(out.begin(), out.end(), [](const proto::Status& a, const proto::Status& b) {
    return TimeUtil::TimestampToNanoseconds(a.start_time()) < TimeUtil::TimestampToNanoseconds(b.start_time());
  });
  return out;
}

absl::StatusOr<std::shared_ptr<const Job>> Runner::GetJob(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job with id \"", id, "\""));
  return std::shared_ptr<const Job>(it->second);
}

void Runner::OnJobFinished(Job& job) {
  {
    absl::MutexLock lock(&mu_);
    --running_;
    // A job closed while it ran is no longer in the table and is not retained.
    auto it = jobs_.find(job.id());
    if (it != jobs_.end() && it->second.get() == &job) finished_by_end_.emplace(job.end_time(), it->second);
  }
  Prune();
}

void Runner::Prune() {
  std::vector<std::shared_ptr<Job>> dropped;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time oldest_kept = absl::Now() - options_.max_job_age;
    while (!finished_by_end_.empty() && (finished_by_end_.size() > options_.max_retained_jobs ||
                                         finished_by_end_.begin()->first < oldest_kept)) {
      std::shared_ptr<Job> job = std::move(finished_by_end_.begin()->second);
      finished_by_end_.erase(finished_by_end_.begin());
      auto it = jobs_.find(job->id());
      if (it != jobs_.end() && it->second == job) jobs_.erase(it);
      dropped.push_back(std::move(job));
    }
  }
  // Followers still reading a dropped job keep their open fd; only the names go.
  for (auto& job : dropped) job->DeleteWhenFinished();
}

void Runner::Shutdown(absl::Duration deadline) {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    absl::MutexLock lock(&mu_);
    if (!shutting_down_) {
      shutting_down_ = true;
      for (const auto& [id, job] : jobs_) jobs.push_back(job);
    }
  }
  if (!jobs.empty() && loop_) {
    loop_->Post([jobs] {
      for (const auto& job : jobs) {
        job->RequestCancel(proto::StatusError::cancelled, "step-runner is shutting down");
      }
    });
  }
  absl::MutexLock lock(&mu_);
  auto all_ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ == 0; };
  mu_.AwaitWithTimeout(absl::Condition(&all_ended), deadline);
}

}  // namespace step_runner::runner

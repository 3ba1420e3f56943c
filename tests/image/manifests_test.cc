// The orchestrator manifests in workspace-image/manifests, parsed with yaml-cpp and checked for
// what the daemon and the entrypoint rely on: the image, the socket at
// /run/step-runner/step-runner.sock on a volume, the state directory on the workspace volume, a
// non-root security context, a grace period longer than the daemon's graceful exit timeout,
// egress limited to DNS, the forge and the model endpoint, and a warm pool that references the
// template. The agent-sandbox fields are checked against kubernetes-sigs/agent-sandbox's v1alpha1
// CRDs (required fields, known spec fields, enum values).

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace {

constexpr char kImage[] = "registry.example.com/step-runner/workspace:latest";
constexpr char kSocket[] = "/run/step-runner/step-runner.sock";
constexpr char kSocketDir[] = "/run/step-runner";
constexpr char kWorkspaceLabel[] = "step-runner-workspace";

std::string ManifestPath(const std::string& name) {
  return std::string(SR_SOURCE_DIR) + "/workspace-image/manifests/" + name;
}

// Every document of a manifest file; a parse error fails the test with its position.
std::vector<YAML::Node> Load(const std::string& name) {
  try {
    return YAML::LoadAllFromFile(ManifestPath(name));
  } catch (const YAML::Exception& e) {
    ADD_FAILURE() << name << ": " << e.what();
    return {};
  }
}

// The one document of `kind` in a manifest file (an undefined node when there is none).
YAML::Node Document(const std::string& file, const std::string& kind) {
  YAML::Node found;
  int count = 0;
  for (const YAML::Node& doc : Load(file)) {
    if (doc["kind"] && doc["kind"].as<std::string>() == kind) {
      found = doc;
      ++count;
    }
  }
  EXPECT_EQ(count, 1) << file << " should hold exactly one " << kind;
  return found;
}

YAML::Node Named(const YAML::Node& list, const std::string& name) {
  if (list && list.IsSequence()) {
    for (const YAML::Node& item : list) {
      if (item["name"] && item["name"].as<std::string>() == name) return item;
    }
  }
  return YAML::Node(YAML::NodeType::Undefined);
}

std::optional<std::string> Env(const YAML::Node& container, const std::string& name) {
  YAML::Node var = Named(container["env"], name);
  if (!var || !var["value"]) return std::nullopt;
  return var["value"].as<std::string>();
}

// "20s" or "2m" in seconds; the daemon's default (30 s) when unset.
int GracefulExitSeconds(const YAML::Node& container) {
  std::string text = Env(container, "SR_GRACEFUL_EXIT_TIMEOUT").value_or("30s");
  int value = 0;
  EXPECT_TRUE(absl::SimpleAtoi(text.substr(0, text.size() - 1), &value)) << text;
  if (absl::EndsWith(text, "m")) return value * 60;
  EXPECT_TRUE(absl::EndsWith(text, "s")) << text;
  return value;
}

bool IsUnder(const std::string& path, const std::string& dir) {
  return path == dir || absl::StartsWith(path, absl::StrCat(dir, "/"));
}

// The volume mounted at the deepest mount point that contains `path`, or "" when none does.
std::string VolumeHolding(const YAML::Node& container, const std::string& path, std::string* mount_path) {
  std::string best_volume, best_path;
  for (const YAML::Node& mount : container["volumeMounts"]) {
    std::string at = mount["mountPath"] ? mount["mountPath"].as<std::string>() : mount["path"].as<std::string>();
    if (IsUnder(path, at) && at.size() > best_path.size()) {
      best_path = at;
      best_volume = mount["name"].as<std::string>();
    }
  }
  if (mount_path) *mount_path = best_path;
  return best_volume;
}

// What every pod that runs the workspace image must get right.
void CheckWorkspacePod(const YAML::Node& pod_spec, const std::string& where) {
  SCOPED_TRACE(where);
  ASSERT_TRUE(pod_spec.IsMap());
  YAML::Node container = Named(pod_spec["containers"], "step-runner");
  ASSERT_TRUE(container) << "no container named step-runner";
  EXPECT_EQ(container["image"].as<std::string>(), kImage);
  // No command or args: the image's entrypoint must run, or nothing forwards SIGTERM to the daemon.
  EXPECT_FALSE(container["command"]) << "the entrypoint must not be overridden";
  EXPECT_FALSE(container["args"]);
  EXPECT_EQ(Env(container, "STEP_RUNNER_SOCKET").value_or(""), kSocket);

  // Every mount names a volume the pod defines.
  std::set<std::string> volumes;
  for (const YAML::Node& v : pod_spec["volumes"]) volumes.insert(v["name"].as<std::string>());
  for (const YAML::Node& m : container["volumeMounts"]) {
    EXPECT_TRUE(volumes.count(m["name"].as<std::string>())) << "mount of undefined volume " << m["name"];
  }
  std::string at;
  EXPECT_EQ(VolumeHolding(container, kSocket, &at), "step-runner-run");
  EXPECT_EQ(at, kSocketDir);

  // The state dir (as the entrypoint computes it) must be on the workspace volume, or jobs and
  // logs vanish with the container.
  std::string workspace = Env(container, "SR_WORKSPACE").value_or("/workspace");
  std::string state = Env(container, "SR_STATE_DIR").value_or(workspace + "/.step-runner");
  EXPECT_EQ(VolumeHolding(container, state, &at), "workspace") << "state dir " << state;
  EXPECT_EQ(at, "/workspace");

  // Non-root, no privilege escalation, nothing added.
  YAML::Node pod_sc = pod_spec["securityContext"], sc = container["securityContext"];
  ASSERT_TRUE(sc) << "container securityContext";
  bool non_root = (sc["runAsNonRoot"] && sc["runAsNonRoot"].as<bool>()) ||
                  (pod_sc && pod_sc["runAsNonRoot"] && pod_sc["runAsNonRoot"].as<bool>());
  EXPECT_TRUE(non_root) << "runAsNonRoot";
  YAML::Node uid = sc["runAsUser"] ? sc["runAsUser"] : (pod_sc ? pod_sc["runAsUser"] : YAML::Node());
  ASSERT_TRUE(uid) << "runAsUser";
  EXPECT_EQ(uid.as<int>(), 1000) << "the image's workspace user";
  EXPECT_FALSE(sc["privileged"] && sc["privileged"].as<bool>());
  ASSERT_TRUE(sc["allowPrivilegeEscalation"]);
  EXPECT_FALSE(sc["allowPrivilegeEscalation"].as<bool>());
  ASSERT_TRUE(sc["capabilities"]["drop"]);
  EXPECT_EQ(sc["capabilities"]["drop"][0].as<std::string>(), "ALL");
  EXPECT_FALSE(sc["capabilities"]["add"]) << "no capabilities are needed";

  // A read-only root needs every path the entrypoint writes on a volume: HOME (git's credential
  // store and config) and /tmp besides the socket dir and the workspace.
  if (sc["readOnlyRootFilesystem"] && sc["readOnlyRootFilesystem"].as<bool>()) {
    EXPECT_FALSE(VolumeHolding(container, "/home/workspace/.git-credentials", nullptr).empty()) << "HOME";
    EXPECT_FALSE(VolumeHolding(container, "/tmp/x", nullptr).empty()) << "/tmp";
  }

  // The kubelet must wait for the daemon's graceful stop before its own SIGKILL.
  ASSERT_TRUE(pod_spec["terminationGracePeriodSeconds"]);
  EXPECT_GT(pod_spec["terminationGracePeriodSeconds"].as<int>(), GracefulExitSeconds(container) + 10);
  // Untrusted steps get no Kubernetes API token.
  ASSERT_TRUE(pod_spec["automountServiceAccountToken"]);
  EXPECT_FALSE(pod_spec["automountServiceAccountToken"].as<bool>());
}

// Egress allowed: the cluster DNS on 53, and IP blocks (the forge, the model endpoint), each a
// single host, on TCP ports only. Returns the allowed host ports, for the caller to compare.
std::set<std::string> CheckEgress(const YAML::Node& egress, const std::string& where) {
  SCOPED_TRACE(where);
  std::set<std::string> allowed;
  EXPECT_TRUE(egress.IsSequence() && egress.size() > 0) << "an empty egress list allows nothing at all, not even DNS";
  for (const YAML::Node& rule : egress) {
    // A rule without `to` or without `ports` allows every destination or every port.
    if (!rule["to"] || rule["to"].size() == 0 || !rule["ports"] || rule["ports"].size() == 0) {
      ADD_FAILURE() << "egress rule without `to` or `ports` allows every destination or port";
      allowed.insert("*");
      continue;
    }
    for (const YAML::Node& peer : rule["to"]) {
      if (peer["ipBlock"]) {
        std::string cidr = peer["ipBlock"]["cidr"].as<std::string>();
        EXPECT_TRUE(absl::EndsWith(cidr, "/32") || absl::EndsWith(cidr, "/128")) << "wide block " << cidr;
        for (const YAML::Node& port : rule["ports"]) {
          EXPECT_EQ(port["protocol"].as<std::string>(), "TCP");
          allowed.insert(absl::StrCat(cidr, ":", port["port"].as<int>()));
        }
      } else {
        // Anything but an IP block must be the cluster DNS, on port 53 only.
        EXPECT_EQ(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as<std::string>(""),
                  "kube-system");
        EXPECT_EQ(peer["podSelector"]["matchLabels"]["k8s-app"].as<std::string>(""), "kube-dns");
        for (const YAML::Node& port : rule["ports"]) EXPECT_EQ(port["port"].as<int>(), 53);
        allowed.insert("dns:53");
      }
    }
  }
  return allowed;
}

const std::set<std::string> kAllowedEgress = {"dns:53", "203.0.113.10/32:443", "203.0.113.10/32:22",
                                              "198.51.100.20/32:443"};

TEST(ManifestsTest, EveryManifestParses) {
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(std::string(SR_SOURCE_DIR) + "/workspace-image/manifests")) {
    if (entry.path().extension() != ".yaml") continue;
    ++files;
    std::vector<YAML::Node> docs = Load(entry.path().filename().string());
    EXPECT_FALSE(docs.empty()) << entry.path();
    for (const YAML::Node& doc : docs) {
      EXPECT_TRUE(doc.IsMap()) << entry.path();
      EXPECT_TRUE((doc["apiVersion"] && doc["kind"]) || doc["schemaVersion"]) << entry.path();
    }
  }
  EXPECT_GE(files, 5);
}

TEST(ManifestsTest, PlainPod) {
  YAML::Node pod = Document("pod.yaml", "Pod");
  ASSERT_TRUE(pod);
  EXPECT_EQ(pod["apiVersion"].as<std::string>(), "v1");
  EXPECT_EQ(pod["metadata"]["labels"]["app.kubernetes.io/name"].as<std::string>(), kWorkspaceLabel);
  CheckWorkspacePod(pod["spec"], "pod.yaml");
  // The workspace volume outlives the pod: a claim that pod.yaml itself defines.
  YAML::Node workspace = Named(pod["spec"]["volumes"], "workspace");
  ASSERT_TRUE(workspace["persistentVolumeClaim"]);
  YAML::Node pvc = Document("pod.yaml", "PersistentVolumeClaim");
  ASSERT_TRUE(pvc);
  EXPECT_EQ(pvc["metadata"]["name"].as<std::string>(), workspace["persistentVolumeClaim"]["claimName"].as<std::string>());
  // The token arrives as a file where the entrypoint looks for it, read-only.
  YAML::Node container = Named(pod["spec"]["containers"], "step-runner");
  std::string token_file = Env(container, "SR_TOKEN_FILE").value_or("");
  std::string at;
  std::string volume = VolumeHolding(container, token_file, &at);
  ASSERT_FALSE(volume.empty()) << "SR_TOKEN_FILE " << token_file << " is on no volume";
  EXPECT_TRUE(Named(pod["spec"]["volumes"], volume)["secret"]) << "the token comes from a Secret";
  bool read_only = false;
  for (const YAML::Node& m : container["volumeMounts"]) {
    if (m["name"].as<std::string>() == volume) read_only = m["readOnly"] && m["readOnly"].as<bool>();
  }
  EXPECT_TRUE(read_only);
}

TEST(ManifestsTest, NetworkPolicyAllowsOnlyDnsForgeAndModel) {
  YAML::Node policy = Document("networkpolicy.yaml", "NetworkPolicy");
  ASSERT_TRUE(policy);
  EXPECT_EQ(policy["apiVersion"].as<std::string>(), "networking.k8s.io/v1");
  std::set<std::string> types;
  for (const YAML::Node& t : policy["spec"]["policyTypes"]) types.insert(t.as<std::string>());
  EXPECT_TRUE(types.count("Egress")) << "without Egress in policyTypes the egress rules are not enforced";
  EXPECT_EQ(CheckEgress(policy["spec"]["egress"], "networkpolicy.yaml"), kAllowedEgress);
  // It selects the workspace pods, by the label pod.yaml and the template give them.
  EXPECT_EQ(policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as<std::string>(""),
            kWorkspaceLabel);
  YAML::Node pod = Document("pod.yaml", "Pod");
  EXPECT_EQ(pod["metadata"]["labels"]["app.kubernetes.io/name"].as<std::string>(""), kWorkspaceLabel);
  // Ingress only from the SSH gateway, to sshd.
  for (const YAML::Node& rule : policy["spec"]["ingress"]) {
    ASSERT_TRUE(rule["from"] && rule["from"].size() > 0) << "ingress rule without `from` allows everyone";
    for (const YAML::Node& port : rule["ports"]) EXPECT_EQ(port["port"].as<int>(), 2222);
  }
}

TEST(ManifestsTest, SandboxTemplateFollowsTheAgentSandboxSchema) {
  YAML::Node tmpl = Document("sandbox-template.yaml", "SandboxTemplate");
  ASSERT_TRUE(tmpl);
  EXPECT_EQ(tmpl["apiVersion"].as<std::string>(), "extensions.agents.x-k8s.io/v1alpha1");
  ASSERT_TRUE(tmpl["metadata"]["name"]);
  // The CRD's spec has exactly these fields; podTemplate and podTemplate.spec.containers are required.
  const std::set<std::string> known = {"networkPolicy", "networkPolicyManagement", "podTemplate"};
  for (const auto& field : tmpl["spec"]) {
    EXPECT_TRUE(known.count(field.first.as<std::string>())) << "unknown SandboxTemplate field spec."
                                                            << field.first.as<std::string>();
  }
  std::string management = tmpl["spec"]["networkPolicyManagement"].as<std::string>("Managed");
  EXPECT_TRUE(management == "Managed" || management == "Unmanaged") << management;
  EXPECT_EQ(management, "Managed") << "the template's network policy is the one enforced for sandboxes";
  ASSERT_TRUE(tmpl["spec"]["podTemplate"]["spec"]["containers"]);
  EXPECT_EQ(tmpl["spec"]["podTemplate"]["metadata"]["labels"]["app.kubernetes.io/name"].as<std::string>(""),
            kWorkspaceLabel);
  CheckWorkspacePod(tmpl["spec"]["podTemplate"]["spec"], "sandbox-template.yaml");
  EXPECT_EQ(CheckEgress(tmpl["spec"]["networkPolicy"]["egress"], "sandbox-template.yaml spec.networkPolicy"),
            kAllowedEgress);
  // The same ingress as the standalone policy: the SSH gateway only.
  YAML::Node policy = Document("networkpolicy.yaml", "NetworkPolicy");
  EXPECT_EQ(YAML::Dump(tmpl["spec"]["networkPolicy"]["ingress"]), YAML::Dump(policy["spec"]["ingress"]));
}

TEST(ManifestsTest, WarmPoolReferencesTheTemplate) {
  YAML::Node pool = Document("sandbox-warmpool.yaml", "SandboxWarmPool");
  YAML::Node tmpl = Document("sandbox-template.yaml", "SandboxTemplate");
  ASSERT_TRUE(pool);
  ASSERT_TRUE(tmpl);
  EXPECT_EQ(pool["apiVersion"].as<std::string>(), "extensions.agents.x-k8s.io/v1alpha1");
  // Both required by the CRD.
  ASSERT_TRUE(pool["spec"]["replicas"]);
  EXPECT_GE(pool["spec"]["replicas"].as<int>(), 1);
  ASSERT_TRUE(pool["spec"]["sandboxTemplateRef"]["name"]);
  EXPECT_EQ(pool["spec"]["sandboxTemplateRef"]["name"].as<std::string>(), tmpl["metadata"]["name"].as<std::string>());
  EXPECT_EQ(pool["metadata"]["namespace"].as<std::string>("default"), tmpl["metadata"]["namespace"].as<std::string>("default"))
      << "a template reference is resolved in the pool's namespace";
}

TEST(ManifestsTest, GitLabDevfile) {
  std::vector<YAML::Node> docs = Load("devfile.yaml");
  ASSERT_EQ(docs.size(), 1u);
  const YAML::Node& devfile = docs[0];
  EXPECT_EQ(devfile["schemaVersion"].as<std::string>(), "2.2.0");
  YAML::Node daemon = Named(devfile["components"], "step-runner");
  ASSERT_TRUE(daemon["container"]) << "a container component named step-runner";
  const YAML::Node& c = daemon["container"];
  EXPECT_EQ(c["image"].as<std::string>(), kImage);
  EXPECT_FALSE(c["command"]) << "the image's entrypoint must run";
  EXPECT_FALSE(c["args"]);
  EXPECT_EQ(Env(c, "STEP_RUNNER_SOCKET").value_or(""), kSocket);
  // GitLab persists /projects (the sources, mountSources); the state must live there.
  ASSERT_TRUE(c["mountSources"] && c["mountSources"].as<bool>());
  std::string workspace = Env(c, "SR_WORKSPACE").value_or("/workspace");
  EXPECT_TRUE(IsUnder(Env(c, "SR_STATE_DIR").value_or(workspace + "/.step-runner"), "/projects"));
  // The socket directory is a volume component, shared with the editor's container.
  std::string at;
  std::string volume = VolumeHolding(c, kSocket, &at);
  EXPECT_EQ(at, kSocketDir);
  ASSERT_TRUE(Named(devfile["components"], volume)["volume"]) << "no volume component " << volume;
  int editors = 0;
  for (const YAML::Node& component : devfile["components"]) {
    if (!component["attributes"] || !component["attributes"]["gl/inject-editor"]) continue;
    ++editors;
    EXPECT_EQ(VolumeHolding(component["container"], kSocket, nullptr), volume) << "the editor reaches the socket";
    EXPECT_EQ(Env(component["container"], "STEP_RUNNER_SOCKET").value_or(""), kSocket);
  }
  EXPECT_EQ(editors, 1) << "GitLab injects its editor into exactly one container";
  // The devfile 2.2.0 schema's constraints on names and endpoints.
  const std::regex name_re("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
  const std::set<std::string> exposures = {"public", "internal", "none"};
  const std::set<std::string> protocols = {"http", "https", "ws", "wss", "tcp", "udp"};
  for (const YAML::Node& component : devfile["components"]) {
    std::string name = component["name"].as<std::string>();
    EXPECT_TRUE(std::regex_match(name, name_re) && name.size() <= 63) << "component name " << name;
    EXPECT_EQ(int(component["container"].IsDefined()) + int(component["volume"].IsDefined()), 1) << name;
    if (!component["container"]) continue;
    for (const YAML::Node& endpoint : component["container"]["endpoints"]) {
      std::string endpoint_name = endpoint["name"].as<std::string>();
      EXPECT_TRUE(std::regex_match(endpoint_name, name_re) && endpoint_name.size() <= 15) << endpoint_name;
      EXPECT_GT(endpoint["targetPort"].as<int>(), 0);
      EXPECT_TRUE(exposures.count(endpoint["exposure"].as<std::string>("public")));
      EXPECT_TRUE(protocols.count(endpoint["protocol"].as<std::string>("http")));
    }
  }
  EXPECT_LT(GracefulExitSeconds(c), 30) << "the pod keeps Kubernetes' default 30 s grace period";
}

}  // namespace

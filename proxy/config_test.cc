#include "proxy/config.h"

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/files.h"
#include "step-runner/base/testing.h"

namespace step_runner::proxy {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(ProxyConfigTest, DefaultsAndRelativePaths) {
  SR_ASSERT_OK_AND_ASSIGN(Config config, ParseConfig(R"(
listen: {address: 0.0.0.0, port: 0}
host_key: keys/host_ed25519
routing: /etc/routing.yml
limits: {max_channels_per_connection: 2, idle_timeout: 90s, channel_buffer: 64KiB}
forge: {url: "http://127.0.0.1:3000/"}
)", "/srv/proxy"));
  EXPECT_EQ(config.listen_address, "0.0.0.0");
  EXPECT_EQ(config.listen_port, 0);
  EXPECT_EQ(config.host_key, "/srv/proxy/keys/host_ed25519");
  EXPECT_EQ(config.routing, "/etc/routing.yml");
  EXPECT_EQ(config.forge_url, "http://127.0.0.1:3000");
  EXPECT_EQ(config.limits.max_channels_per_connection, 2);
  EXPECT_EQ(config.limits.idle_timeout, absl::Seconds(90));
  EXPECT_EQ(config.limits.channel_buffer, 64 << 10);
  EXPECT_EQ(config.limits.max_auth_tries, 3);  // untouched default
  EXPECT_TRUE(config.streamlocal);
  SR_ASSERT_OK_AND_ASSIGN(Config off, ParseConfig("host_key: k\nrouting: r\nstreamlocal: false\n", "/srv"));
  EXPECT_FALSE(off.streamlocal);
  absl::StatusOr<Config> bad = ParseConfig("host_key: k\nrouting: r\nstreamlocal: maybe\n", "/srv");
  EXPECT_THAT(bad.status().message(), HasSubstr("streamlocal: expected true or false"));
}

TEST(ProxyConfigTest, MistakesAreReportedWithTheirPlace) {
  auto typo = ParseConfig("host_key: k\nrouting: r\nlimits: {max_chanels: 3}\n", "/");
  EXPECT_THAT(typo.status().message(), HasSubstr("unknown key \"max_chanels\""));
  EXPECT_THAT(typo.status().message(), HasSubstr("config:3:"));
  // A size that overflowed was taken (and nothing was forwarded); two units were one.
  for (const char* size : {"17179869184GiB", "2GiB", "1MiBKiB"}) {
    auto buffer = ParseConfig(absl::StrCat("host_key: k\nrouting: r\nlimits: {channel_buffer: ", size, "}\n"), "/");
    EXPECT_FALSE(buffer.ok()) << size;
  }
  auto port = ParseConfig("host_key: k\nrouting: r\nlisten: {port: 70000}\n", "/");
  EXPECT_THAT(port.status().message(), HasSubstr("at most 65535"));
  EXPECT_FALSE(ParseConfig("routing: r\n", "/").ok());  // no host key
  auto forge = ParseConfig("host_key: k\nrouting: r\nforge: {url: ftp://x}\n", "/");
  EXPECT_THAT(forge.status().message(), HasSubstr("http://"));
  // Tokens are checked against the forge: plain HTTP only to this host.
  auto clear = ParseConfig("host_key: k\nrouting: r\nforge: {url: \"http://gitlab.example.com/\"}\n", "/");
  EXPECT_THAT(clear.status().message(), HasSubstr("would send users' tokens in clear; use https://"));
  auto sneaky = ParseConfig("host_key: k\nrouting: r\nforge: {url: \"http://localhost.example.com:80/\"}\n", "/");
  // A host that only begins like a loopback address, and credentials that move the host.
  for (const char* elsewhere : {"http://127.0.0.1.evil.example/", "http://localhost:x@192.0.2.2:18080",
                                "http://127.0.0.1@192.0.2.2/", "https://user:pw@gitlab.example.com"}) {
    auto refused = ParseConfig(absl::StrCat("host_key: k\nrouting: r\nforge: {url: \"", elsewhere, "\"}\n"), "/");
    EXPECT_FALSE(refused.ok()) << elsewhere;
  }
  EXPECT_FALSE(sneaky.ok());
  for (const char* local : {"http://localhost:3000", "http://[::1]:3000/", "http://127.0.0.1/"}) {
    auto ok = ParseConfig(absl::StrCat("host_key: k\nrouting: r\nforge: {url: \"", local, "\"}\n"), "/");
    EXPECT_TRUE(ok.ok()) << local << ": " << ok.status();
  }
  SR_EXPECT_OK(ParseConfig("host_key: k\nrouting: r\nforge: {url: \"https://gitlab.example.com\"}\n", "/").status());
}

TEST(ProxyRoutingTest, SocketAndCommandBackends) {
  SR_ASSERT_OK_AND_ASSIGN(Routing routing, ParseRouting(R"(
workspaces:
  ws-1:
    owner: alice
    authorized_keys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop
      - "# a comment"
    backend: {socket: /run/ws-1.sock}
  ws-2:
    vars: {namespace: agents, pod: ws-2-abc}
    authorized_keys: |
      ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl one
      ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl two
    backend: {command: "kubectl exec -i -n {namespace} {pod} -- step-runner proxy"}
)"));
  ASSERT_NE(routing.Find("ws-1"), nullptr);
  EXPECT_EQ(routing.Find("ws-1")->backend.socket, "/run/ws-1.sock");
  EXPECT_EQ(routing.Find("ws-1")->authorized_keys.size(), 1u);
  EXPECT_EQ(routing.Find("ws-1")->owner, "alice");
  EXPECT_EQ(routing.Find("ws-3"), nullptr);
  const Workspace* ws2 = routing.Find("ws-2");
  ASSERT_NE(ws2, nullptr);
  EXPECT_EQ(ws2->authorized_keys.size(), 2u);
  SR_ASSERT_OK_AND_ASSIGN(std::vector<std::string> argv, ExpandCommand(*ws2));
  EXPECT_THAT(argv, ElementsAre("kubectl", "exec", "-i", "-n", "agents", "ws-2-abc", "--",
                                "step-runner", "proxy"));
}

TEST(ProxyRoutingTest, RejectsBadWorkspaces) {
  EXPECT_THAT(ParseRouting("workspaces: {\"../x\": {backend: {socket: /s}}}").status().message(),
              HasSubstr("invalid workspace name"));
  EXPECT_THAT(ParseRouting("workspaces: {w: {backend: {socket: /s, command: x}}}").status().message(),
              HasSubstr("one"));
  EXPECT_THAT(ParseRouting("workspaces: {w: {}}").status().message(), HasSubstr("backend"));
  EXPECT_THAT(ParseRouting("workspaces: {w: {backend: {command: \"docker exec {pod}\"}}}")
                  .status().message(),
              HasSubstr("unknown placeholder {pod}"));
  SR_EXPECT_OK(ParseRouting("workspaces:\n").status());
  // An operator appending an updated block: refused, not silently the first one.
  EXPECT_THAT(ParseRouting("workspaces:\n  w: {backend: {socket: /a}}\n  w: {backend: {socket: /b}}\n").status().message(),
              HasSubstr("workspace \"w\" is defined twice"));
}

// As the config's paths are relative to the config file, a routing file's relative sockets are
// relative to it (they were taken from the proxy's working directory).
TEST(ProxyRoutingTest, ARelativeSocketIsRelativeToTheRoutingFile) {
  char tmpl[] = "/tmp/proxy-config-test.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  SR_ASSERT_OK(WriteFileAtomically(dir + "/routing.yaml",
                                   "workspaces:\n  rel: {backend: {socket: ../d/sr.sock}}\n  abs: {backend: {socket: /run/sr.sock}}\n",
                                   0600));
  SR_ASSERT_OK_AND_ASSIGN(Routing routing, LoadRouting(dir + "/routing.yaml"));
  EXPECT_EQ(routing.Find("rel")->backend.socket, dir + "/../d/sr.sock");
  EXPECT_EQ(routing.Find("abs")->backend.socket, "/run/sr.sock");
  (void)RemoveTree(dir);
}

TEST(ProxyCommandTest, SplitsLikeAShellWithoutRunningOne) {
  SR_ASSERT_OK_AND_ASSIGN(auto words, SplitCommand("docker exec -i {workspace} step-runner proxy"));
  EXPECT_THAT(words, ElementsAre("docker", "exec", "-i", "{workspace}", "step-runner", "proxy"));
  SR_ASSERT_OK_AND_ASSIGN(auto quoted, SplitCommand(R"(sh -c 'exec a "b" | c' "x \"y\"" z\ w)"));
  EXPECT_THAT(quoted, ElementsAre("sh", "-c", "exec a \"b\" | c", "x \"y\"", "z w"));
  EXPECT_THAT(SplitCommand("a | b").status().message(), HasSubstr("needs a shell"));
  EXPECT_THAT(SplitCommand("a $(b)").status().message(), HasSubstr("needs a shell"));
  EXPECT_FALSE(SplitCommand("'open").ok());
  EXPECT_FALSE(SplitCommand("   ").ok());
}

TEST(ProxyCommandTest, PlaceholderValuesNeverSplitWords) {
  Workspace ws;
  ws.name = "ws";
  ws.vars["pod"] = "a b; rm -rf /";
  ws.backend.command = {"kubectl", "exec", "{pod}", "--", "x{workspace}y"};
  SR_ASSERT_OK_AND_ASSIGN(auto argv, ExpandCommand(ws));
  EXPECT_THAT(argv, ElementsAre("kubectl", "exec", "a b; rm -rf /", "--", "xwsy"));
}

TEST(ProxyWorkspaceNameTest, OnlySafeNames) {
  EXPECT_TRUE(ValidWorkspaceName("ws-1.prod_2"));
  EXPECT_FALSE(ValidWorkspaceName(""));
  EXPECT_FALSE(ValidWorkspaceName("-rf"));
  EXPECT_FALSE(ValidWorkspaceName(".."));
  EXPECT_FALSE(ValidWorkspaceName("a/b"));
  EXPECT_FALSE(ValidWorkspaceName("a b"));
  EXPECT_FALSE(ValidWorkspaceName(std::string(65, 'a')));
}

}  // namespace
}  // namespace step_runner::proxy

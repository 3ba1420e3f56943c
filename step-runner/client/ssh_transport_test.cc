#include "step-runner/client/ssh_transport.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace step_runner::client {
namespace {

using ::testing::HasSubstr;

TEST(SshTargetTest, HostsPortsAndBracketedIpv6) {
  absl::StatusOr<SshTarget> plain = ParseSshTarget("ws@host.example:2222");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->user, "ws");
  EXPECT_EQ(plain->host, "host.example");
  EXPECT_EQ(plain->port, 2222);
  absl::StatusOr<SshTarget> no_port = ParseSshTarget("ws@host.example");
  ASSERT_TRUE(no_port.ok());
  EXPECT_EQ(no_port->port, 22);
  // The port after an address in brackets used to be dropped for 22.
  absl::StatusOr<SshTarget> v6 = ParseSshTarget("ws@[::1]:33957");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->port, 33957);
  absl::StatusOr<SshTarget> v6_default = ParseSshTarget("ws@[fe80::1]");
  ASSERT_TRUE(v6_default.ok()) << v6_default.status();
  EXPECT_EQ(v6_default->host, "fe80::1");
  EXPECT_EQ(v6_default->port, 22);
}

TEST(SshTargetTest, MistakesAreNamed) {
  EXPECT_THAT(ParseSshTarget("host:22").status().message(), HasSubstr("USER@HOST"));
  EXPECT_THAT(ParseSshTarget("ws@host:").status().message(), HasSubstr("bad port"));
  EXPECT_THAT(ParseSshTarget("ws@host:70000").status().message(), HasSubstr("bad port"));
  EXPECT_THAT(ParseSshTarget("ws@[::1").status().message(), HasSubstr("no ']'"));
  EXPECT_THAT(ParseSshTarget("ws@[::1]x").status().message(), HasSubstr(":PORT"));
  EXPECT_THAT(ParseSshTarget("ws@[::1]:").status().message(), HasSubstr("bad port"));
  EXPECT_THAT(ParseSshTarget("ws@fe80::1:2222").status().message(), HasSubstr("in brackets"));
  EXPECT_THAT(ParseSshTarget("ws@:22").status().message(), HasSubstr("no host"));
}

}  // namespace
}  // namespace step_runner::client

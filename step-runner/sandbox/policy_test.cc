#include "step-runner/sandbox/policy.h"

#include <algorithm>

#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner::sandbox {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

// Index of the first "flag a b" triple (or pair) in argv, or -1.
int Find(const std::vector<std::string>& argv, const std::vector<std::string>& seq) {
  for (size_t i = 0; i + seq.size() <= argv.size(); ++i) {
    if (std::equal(seq.begin(), seq.end(), argv.begin() + static_cast<std::ptrdiff_t>(i))) return static_cast<int>(i);
  }
  return -1;
}

StepView BaseView() {
  StepView view;
  view.argv = {"/bin/echo", "hi"};
  view.work_tree = "/state/jobs/j1/work";
  view.cwd = "/state/jobs/j1/work";
  return view;
}

TEST(BwrapArgvTest, ReadOnlySystemFreshKernelViewsPrivateTmpAndNamespaces) {
  std::string line = absl::StrJoin(BwrapArgv("/usr/bin/bwrap", BaseView()), " ");
  // Kernel settings read-only right after /proc: a root daemon's steps are uid 0.
  EXPECT_THAT(line, HasSubstr("/usr/bin/bwrap --ro-bind / / --dev /dev --proc /proc --ro-bind /proc/sys /proc/sys "
                              "--ro-bind-try /proc/sysrq-trigger /proc/sysrq-trigger --tmpfs /tmp"));
  EXPECT_THAT(line, HasSubstr("--unshare-pid --unshare-ipc --unshare-uts --die-with-parent --new-session --cap-drop ALL"));
  EXPECT_THAT(line, HasSubstr("--unshare-net"));
  EXPECT_THAT(line, HasSubstr("--bind /state/jobs/j1/work /state/jobs/j1/work"));
  EXPECT_THAT(line, HasSubstr("--chdir /state/jobs/j1/work -- /bin/echo hi"));
}

TEST(BwrapArgvTest, NetworkIsSharedOnlyWhenGranted) {
  StepView view = BaseView();
  view.network = NetworkMode::kAll;
  EXPECT_EQ(Find(BwrapArgv("bwrap", view), {"--unshare-net"}), -1);
  // kAllow: the helper's namespace (loopback and forwards), which bwrap must not replace.
  view.network = NetworkMode::kAllow;
  view.hosts_file = "/state/sandbox-hosts";
  std::vector<std::string> argv = BwrapArgv("bwrap", view);
  EXPECT_EQ(Find(argv, {"--unshare-net"}), -1);
  EXPECT_GE(Find(argv, {"--ro-bind", "/state/sandbox-hosts", "/etc/hosts"}), 0);
}

// Tools under /tmp come back read-only, first; what must stay hidden inside them is hidden after
// (under /tmp alone it would be skipped as already gone with the private /tmp).
TEST(BwrapArgvTest, ToolFoldersUnderTmpAreBoundBackBeforeHiding) {
  StepView view = BaseView();
  view.tool_binds = {"/tmp/checkout/build/bin"};
  view.hidden = {{"/tmp/checkout/build/bin/state", true}, {"/tmp/elsewhere", true}};
  std::vector<std::string> argv = BwrapArgv("bwrap", view);
  int tmp = Find(argv, {"--tmpfs", "/tmp"});
  int tools = Find(argv, {"--ro-bind", "/tmp/checkout/build/bin", "/tmp/checkout/build/bin"});
  int hidden = Find(argv, {"--tmpfs", "/tmp/checkout/build/bin/state"});
  ASSERT_GE(tmp, 0);
  ASSERT_GT(tools, tmp);
  ASSERT_GT(hidden, tools);
  EXPECT_EQ(Find(argv, {"--tmpfs", "/tmp/elsewhere"}), -1);  // gone with the private /tmp already
}

TEST(BwrapArgvTest, HiddenFoldersAreCoveredBeforeTheWorkTreeIsBoundBack) {
  StepView view = BaseView();
  view.hidden = {{"/state", true}, {"/run/step-runner", true}, {"/root/.git-credentials", false},
                 {"/tmp/other-job", true}, {"/state/jobs/j1/work/.secret", true}};
  std::vector<std::string> argv = BwrapArgv("bwrap", view);
  int state = Find(argv, {"--tmpfs", "/state"});
  int tree = Find(argv, {"--bind", "/state/jobs/j1/work", "/state/jobs/j1/work"});
  int inner = Find(argv, {"--tmpfs", "/state/jobs/j1/work/.secret"});
  ASSERT_GE(state, 0);
  ASSERT_GE(tree, 0);
  EXPECT_LT(state, tree);  // else the tmpfs would cover the work tree too
  EXPECT_GT(inner, tree);  // else the bind would bring it back
  EXPECT_GE(Find(argv, {"--tmpfs", "/run/step-runner"}), 0);
  EXPECT_GE(Find(argv, {"--ro-bind", "/dev/null", "/root/.git-credentials"}), 0);
  EXPECT_EQ(Find(argv, {"--tmpfs", "/tmp/other-job"}), -1);  // the private /tmp hides it already
}

TEST(BwrapArgvTest, SecretFilesAreBoundReadOnlyAfterHiding) {
  StepView view = BaseView();
  view.hidden = {{"/var/secrets", true}, {"/dev/shm/step-runner-0", true}};
  view.readonly_binds = {"/var/secrets/j1/TOKEN"};
  std::vector<std::string> argv = BwrapArgv("bwrap", view);
  int hide = Find(argv, {"--tmpfs", "/var/secrets"});
  ASSERT_GE(hide, 0);
  EXPECT_LT(hide, Find(argv, {"--ro-bind", "/var/secrets/j1/TOKEN", "/var/secrets/j1/TOKEN"}));
  EXPECT_EQ(Find(argv, {"--tmpfs", "/dev/shm/step-runner-0"}), -1);  // the fresh /dev has none of it
}

TEST(PolicyParseTest, TheSystemCannotBeAWorkTree) {
  for (const char* bad : {"/", "/usr", "/etc/", "/usr/lib", "/proc/1", "/home", "/var", "relative", "/dev/shm",
                          "/dev/shm/", "/dev/pts/x", "/dev", "/dev/shm/../pts"}) {
    EXPECT_FALSE(CheckWorkTree(bad).ok()) << bad;
  }
  for (const char* good : {"/var/lib/step-runner/jobs/1/work", "/home/dev/project", "/tmp/x", "/workspace",
                          "/dev/shm/state/jobs/1/work"}) {
    SR_EXPECT_OK(CheckWorkTree(good));
  }
}

TEST(PolicyParseTest, HostPortsAndSizes) {
  SR_ASSERT_OK_AND_ASSIGN(HostPort hp, ParseHostPort("GitLab.com:443"));
  EXPECT_EQ(hp, (HostPort{"gitlab.com", 443}));
  SR_EXPECT_OK(ParseHostPort("127.0.0.1:8080").status());
  EXPECT_FALSE(ParseHostPort("10.0.0.1:443").ok());  // cannot be given a loopback alias
  EXPECT_FALSE(ParseHostPort("gitlab.com").ok());
  EXPECT_FALSE(ParseHostPort("gitlab.com:0").ok());
  EXPECT_FALSE(ParseHostPort("gitlab.com:70000").ok());
  EXPECT_FALSE(ParseHostPort("a b:1").ok());
  EXPECT_EQ(ParseByteSize("512M").value(), 512u << 20);
  EXPECT_EQ(ParseByteSize("4g").value(), uint64_t{4} << 30);
  EXPECT_EQ(ParseByteSize("1000").value(), 1000u);
  EXPECT_FALSE(ParseByteSize("lots").ok());
  EXPECT_FALSE(ParseNetworkMode("some").ok());
}

TEST(PolicyParseTest, EachNamedHostGetsItsOwnLoopbackAddressAndAHostsLine) {
  std::vector<Forward> f = PlanForwards({{"gitlab.com", 443}, {"api.model.dev", 443}, {"gitlab.com", 22},
                                         {"127.0.0.1", 9000}});
  ASSERT_EQ(f.size(), 4u);
  EXPECT_EQ(f[0].listen_ip, f[2].listen_ip);
  EXPECT_NE(f[0].listen_ip, f[1].listen_ip);
  EXPECT_EQ(f[3].listen_ip, "127.0.0.1");
  std::string hosts = HostsFile(f);
  EXPECT_THAT(hosts, HasSubstr(f[0].listen_ip + "\tgitlab.com\n"));
  EXPECT_THAT(hosts, HasSubstr(f[1].listen_ip + "\tapi.model.dev\n"));
  EXPECT_THAT(hosts, Not(HasSubstr("\t127.0.0.1")));
}

TEST(HelperArgvTest, RoundTrips) {
  HelperPlan plan;
  plan.verdict_path = "/state/jobs/j1/sandbox.verdict";
  plan.output_limit = 100;
  plan.output_budget = 200;
  plan.output_used = 100;
  plan.memory_limit = 1 << 30;
  plan.process_limit = 64;
  plan.rlimits.processes = 0;
  plan.cgroup_v1_pids = "/sys/fs/cgroup/pids/x/job-1";
  plan.new_netns = true;
  plan.forwards = PlanForwards({{"gitlab.com", 443}});
  std::vector<std::string> rest;
  std::vector<std::string> argv = HelperArgv("helper", plan, {"bwrap", "--", "true"});
  ASSERT_EQ(argv[0], "helper");
  argv.erase(argv.begin());
  HelperPlan back;
  std::string error;
  ASSERT_TRUE(ParseHelperArgv(argv, &back, &rest, &error)) << error;
  EXPECT_THAT(rest, ElementsAre("bwrap", "--", "true"));
  EXPECT_EQ(back.verdict_path, plan.verdict_path);
  EXPECT_EQ(back.output_limit, 100u);
  EXPECT_EQ(back.output_budget, 200u);
  EXPECT_EQ(back.process_limit, 64u);
  EXPECT_EQ(back.rlimits.processes, 0u);
  EXPECT_EQ(back.cgroup_v1_pids, plan.cgroup_v1_pids);
  EXPECT_TRUE(back.new_netns);
  ASSERT_EQ(back.forwards.size(), 1u);
  EXPECT_EQ(back.forwards[0].target, (HostPort{"gitlab.com", 443}));
  EXPECT_FALSE(ParseHelperArgv({"--bogus", "1", "--", "x"}, &back, &rest, &error));
  EXPECT_FALSE(ParseHelperArgv({"--verdict", "v"}, &back, &rest, &error));
  EXPECT_FALSE(ParseHelperArgv({"--output-limit", "-1", "--", "x"}, &back, &rest, &error));
}

// A warm sandbox gets, from its stub, exactly the mounts bwrap gets for a cold one, in the same
// order: the two paths cannot drift apart.
TEST(WarmSandboxTest, TheStubMakesTheMountsBwrapWouldInTheSameOrder) {
  StepView view = BaseView();
  view.tool_binds = {"/tmp/checkout/bin"};
  view.hidden = {{"/state", true}, {"/state/jobs/j1/work/.secret", false}, {"/home/u/.git-credentials", false}};
  view.readonly_binds = {"/dev/shm/step-runner-0/j1/var"};
  view.writable_binds = {"/state/jobs/j1/io/1"};
  std::vector<std::string> rendered;
  for (const MountOp& op : ViewMounts(view)) {
    std::vector<std::string> args = BwrapMountArgs(op);
    rendered.insert(rendered.end(), args.begin(), args.end());
  }
  std::string cold = absl::StrJoin(BwrapArgv("bwrap", view), " ");
  EXPECT_THAT(cold, HasSubstr(absl::StrJoin(rendered, " ") + " --chdir"));
  // The state dir (holding the tree) before the tree, the secret inside the tree after it.
  EXPECT_THAT(absl::StrJoin(rendered, " "),
              HasSubstr("--tmpfs /state --ro-bind /dev/null /home/u/.git-credentials --bind /state/jobs/j1/work "
                        "/state/jobs/j1/work --ro-bind /dev/null /state/jobs/j1/work/.secret"));
}

// The daemon's own folders are hidden by bwrap when the warm sandbox is made; the stub makes
// only what is left, and the step sees the same view as a cold one would give it.
TEST(WarmSandboxTest, DaemonWideHidingIsDoneAheadAndTheStubMakesTheRest) {
  const std::vector<MountOp> premounted = {{MountOp::kTmpfs, "", "/state"},
                                           {MountOp::kHideFile, "", "/home/u/.git-credentials"},
                                           {MountOp::kTmpfs, "", "/state/jobs/j1/work/.cache"}};
  std::string warm = absl::StrJoin(WarmBwrapArgv("/usr/bin/bwrap", "/opt/sr/step-runner-sandbox", 0, 0, premounted), " ");
  // Hidden in the sandbox's view before the host's root is bound beside it (which they do not touch).
  EXPECT_THAT(warm, HasSubstr("--unshare-net --tmpfs /state --ro-bind /dev/null /home/u/.git-credentials "
                              "--tmpfs /state/jobs/j1/work/.cache --bind / /tmp/.step-runner-host"));

  StepView view = BaseView();
  view.hidden = {{"/state", true}, {"/home/u/.git-credentials", false}, {"/state/jobs/j1/work/.cache", true},
                 {"/other/tree", true}};
  view.writable_binds = {"/state/jobs/j1/io/1"};
  std::optional<std::vector<MountOp>> left = MountsLeftForStub(view, premounted);
  ASSERT_TRUE(left.has_value());
  // The tree, then what its bind brings back is hidden again (even though bwrap hid it too),
  // a hidden path that was not premounted, and the io folder inside the hidden state.
  EXPECT_THAT(*left, ::testing::ElementsAre(MountOp{MountOp::kTmpfs, "", "/other/tree"},
                                            MountOp{MountOp::kBind, "/state/jobs/j1/work", "/state/jobs/j1/work"},
                                            MountOp{MountOp::kTmpfs, "", "/state/jobs/j1/work/.cache"},
                                            MountOp{MountOp::kBind, "/state/jobs/j1/io/1", "/state/jobs/j1/io/1"}));

  // A tool folder inside a hidden folder: in a cold sandbox the hiding covers it; on top of a
  // premounted one it would show. Such a step does not take a warm sandbox.
  view.tool_binds = {"/state/bin"};
  EXPECT_FALSE(MountsLeftForStub(view, premounted).has_value());
  // Nothing premounted: the stub makes all of it.
  EXPECT_EQ(MountsLeftForStub(view, {}), ViewMounts(view));
}

TEST(WarmSandboxTest, AnUnprivilegedDaemonsStubMountsAsRootOfItsNamespaceThenMapsTheUidBack) {
  std::string root = absl::StrJoin(WarmBwrapArgv("/usr/bin/bwrap", "/opt/sr/step-runner-sandbox", 0, 0), " ");
  EXPECT_THAT(root, HasSubstr("--unshare-net --bind / /tmp/.step-runner-host"));
  EXPECT_THAT(root, HasSubstr("-- /tmp/.step-runner-host/opt/sr/step-runner-sandbox --stub 3 --report 4"));
  EXPECT_THAT(root, Not(HasSubstr("--unshare-user")));
  EXPECT_THAT(root, Not(HasSubstr("--as-uid")));
  std::string user = absl::StrJoin(WarmBwrapArgv("/usr/bin/bwrap", "/opt/sr/step-runner-sandbox", 1001, 1002), " ");
  EXPECT_THAT(user, HasSubstr("--unshare-user --uid 0 --gid 0 --cap-add CAP_SYS_ADMIN"));
  EXPECT_THAT(user, HasSubstr("--stub 3 --report 4 --as-uid 1001 --as-gid 1002"));
  // Never --cap-drop: the stub needs CAP_SYS_ADMIN to mount, and drops everything itself.
  EXPECT_THAT(user, Not(HasSubstr("--cap-drop")));
}

TEST(WarmSandboxTest, SpecsAndClaimsRoundTripAnyBytesAndRefuseGarbage) {
  StubSpec spec{.mounts = {{MountOp::kTmpfs, "", "/state"}, {MountOp::kBind, "/w", "/w"}},
                .cwd = "/w/sub dir",
                .argv = {"/bin/sh", "-c", "echo 'a:b'\n\0x"},
                .env = {"A=1", "MULTI=line one\nline: two", std::string("NUL=a\0b", 7)}};
  StubSpec back;
  ASSERT_TRUE(DecodeStubSpec(EncodeStubSpec(spec), &back));
  EXPECT_EQ(back, spec);
  const std::string text = EncodeStubSpec(spec);
  EXPECT_FALSE(DecodeStubSpec(text.substr(0, text.size() - 1), &back));  // cut short
  EXPECT_FALSE(DecodeStubSpec(text + "1:x", &back));                    // trailing bytes
  EXPECT_FALSE(DecodeStubSpec("", &back));
  EXPECT_FALSE(DecodeStubSpec("99999999999999999999:", &back));
  // A mount target that is not absolute, an unknown kind, a step without argv.
  EXPECT_FALSE(DecodeStubSpec(EncodeStubSpec({.mounts = {{MountOp::kTmpfs, "", "relative"}}, .argv = {"/bin/true"}}),
                              &back));
  std::string bad_kind = EncodeStubSpec({.mounts = {{MountOp::kTmpfs, "", "/x"}}, .argv = {"/bin/true"}});
  bad_kind.replace(bad_kind.find("1:t"), 3, "1:z");
  EXPECT_FALSE(DecodeStubSpec(bad_kind, &back));
  EXPECT_FALSE(DecodeStubSpec(EncodeStubSpec({.cwd = "/"}), &back));

  WarmClaim claim{.verdict_path = "/state/jobs/j1/sandbox.verdict", .output_limit = 5, .output_budget = 10,
                  .output_used = 5};
  WarmClaim claim_back;
  ASSERT_TRUE(DecodeClaim(EncodeClaim(claim), &claim_back));
  EXPECT_EQ(claim_back.verdict_path, claim.verdict_path);
  EXPECT_EQ(claim_back.output_limit, 5u);
  EXPECT_EQ(claim_back.output_budget, 10u);
  EXPECT_EQ(claim_back.output_used, 5u);
  EXPECT_FALSE(DecodeClaim("3:abc", &claim_back));
}

}  // namespace
}  // namespace step_runner::sandbox

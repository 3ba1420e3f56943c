#include "proxy/auth.h"

#include <libssh/libssh.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace step_runner::proxy {
namespace {

// A fresh ed25519 key and its authorized_keys line.
struct TestKey {
  TestKey() {
    EXPECT_EQ(ssh_pki_generate(SSH_KEYTYPE_ED25519, 0, &key), SSH_OK);
    char* b64 = nullptr;
    EXPECT_EQ(ssh_pki_export_pubkey_base64(key, &b64), SSH_OK);
    line = absl::StrCat("ssh-ed25519 ", b64, " someone@somewhere");
    ssh_string_free_char(b64);
  }
  ~TestKey() { ssh_key_free(key); }
  ssh_key key = nullptr;
  std::string line;
};

TEST(ProxyKeyTest, MatchesOnlyListedKeys) {
  TestKey alice, bob;
  EXPECT_TRUE(KeyAuthorized(alice.key, {"# comment", "garbage", bob.line, alice.line}));
  EXPECT_FALSE(KeyAuthorized(alice.key, {bob.line}));
  EXPECT_FALSE(KeyAuthorized(alice.key, {}));
  // Options in front of the key type are not supported: such a line never grants access.
  EXPECT_FALSE(KeyAuthorized(alice.key, {absl::StrCat("command=\"x\" ", alice.line)}));
}

TEST(ProxyKeyTest, OpenSshFormat) {
  TestKey key;
  const std::string fingerprint = KeyFingerprint(key.key);
  EXPECT_TRUE(absl::StartsWith(fingerprint, "SHA256:")) << fingerprint;
  EXPECT_EQ(fingerprint.size(), 7u + 43u) << fingerprint;  // unpadded base64 of 32 bytes
}

TEST(ProxyFailureLimiterTest, BlocksWithinTheWindowOnly) {
  FailureLimiter limiter(3, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  limiter.RecordFailure("10.0.0.1", t0);
  limiter.RecordFailure("10.0.0.1", t0 + absl::Seconds(1));
  EXPECT_FALSE(limiter.Blocked("10.0.0.1", t0 + absl::Seconds(2)));
  limiter.RecordFailure("10.0.0.1", t0 + absl::Seconds(2));
  EXPECT_TRUE(limiter.Blocked("10.0.0.1", t0 + absl::Seconds(3)));
  EXPECT_FALSE(limiter.Blocked("10.0.0.2", t0 + absl::Seconds(3)));
  // The first failure leaves the window: one more attempt is allowed again.
  EXPECT_FALSE(limiter.Blocked("10.0.0.1", t0 + absl::Seconds(61)));
}

TEST(ProxyForgeTest, UnreachableForgeIsUnavailableNotDenied) {
  // Port 1 on loopback: nothing listens; the answer must not be "wrong token".
  auto user = ForgeUserForToken("http://127.0.0.1:1", "token", absl::Seconds(5));
  EXPECT_TRUE(absl::IsUnavailable(user.status())) << user.status();
  EXPECT_TRUE(absl::IsPermissionDenied(
      ForgeUserForToken("http://127.0.0.1:1", "a\r\nX-Evil: 1", absl::Seconds(5)).status()));
}

}  // namespace
}  // namespace step_runner::proxy

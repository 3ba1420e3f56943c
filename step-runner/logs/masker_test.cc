#include "step-runner/logs/masker.h"

#include <random>

#include "gtest/gtest.h"

namespace step_runner::logs {
namespace {

TEST(MaskerTest, MasksWholeOccurrences) {
  EXPECT_EQ(MaskSecrets("token=s3cr3t; again s3cr3t.", {"s3cr3t"}),
            "token=[MASKED]; again [MASKED].");
}

TEST(MaskerTest, NoSecretsPassesBytesThrough) {
  StreamMasker masker({});
  std::string binary("\0\xff\r\n", 4);
  EXPECT_EQ(masker.Process(binary), binary);
  EXPECT_EQ(masker.Flush(), "");
}

TEST(MaskerTest, SecretSplitAcrossWritesIsMasked) {
  StreamMasker masker({"hunter2"});
  std::string out = masker.Process("password: hun");
  out += masker.Process("ter");
  out += masker.Process("2 ok");
  out += masker.Flush();
  EXPECT_EQ(out, "password: [MASKED] ok");
}

TEST(MaskerTest, HeldBackPrefixIsReleasedWhenItIsNotASecret) {
  StreamMasker masker({"hunter2"});
  std::string out = masker.Process("hunt");
  EXPECT_EQ(out, "");
  out += masker.Process("ing season");
  out += masker.Flush();
  EXPECT_EQ(out, "hunting season");
}

TEST(MaskerTest, LongerOverlappingSecretWins) {
  EXPECT_EQ(MaskSecrets("abcdef", {"abc", "abcdef"}), "[MASKED]");
}

// Every way of cutting the stream into writes yields the same masked output.
TEST(MaskerTest, RandomSplitsGiveTheSameResult) {
  const std::string text = "x glpat-ABC y glpat-ABC glpat-AB glpat-ABCglpat-ABC z";
  const std::vector<std::string> secrets = {"glpat-ABC", "AB z"};
  const std::string expected = MaskSecrets(text, secrets);
  EXPECT_EQ(expected.find("glpat-ABC"), std::string::npos);
  std::mt19937 rng(7);
  for (int round = 0; round < 500; ++round) {
    StreamMasker masker(secrets);
    std::string out;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t len = std::uniform_int_distribution<size_t>(0, 5)(rng);
      len = std::min(len, text.size() - pos);
      out += masker.Process(absl::string_view(text).substr(pos, len));
      pos += len;
    }
    out += masker.Flush();
    ASSERT_EQ(out, expected) << "round " << round;
  }
}

}  // namespace
}  // namespace step_runner::logs

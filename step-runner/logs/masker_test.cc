#include "step-runner/logs/masker.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace step_runner::logs {
namespace {

TEST(MaskerTest, MasksWholeOccurrences) {
  EXPECT_EQ(MaskSecrets("token=s3cr3t; again s3cr3t.", {"s3cr3t"}),
            "token=[MASKED]; again [MASKED].");
}

// A value quoted as JSON (an error message naming it, a step's toJSON) carries a secret's
// quotes, backslashes and newlines escaped: that form is masked too.
TEST(MaskerTest, ASecretIsMaskedInItsJsonEscapedFormToo) {
  const std::string secret = "Pa\"ss\\w0rd\n-----END KEY-----\x01";
  EXPECT_EQ(MaskSecrets(absl::StrCat("found the string \"Pa\\\"ss\\\\w0rd\\n-----END KEY-----\\u0001\"; raw ",
                                     secret, "."),
                        {secret}),
            "found the string \"[MASKED]\"; raw [MASKED].");
}

// A secret that is not UTF-8 shows with U+FFFD for its bad bytes wherever protobuf carries it.
TEST(MaskerTest, ASecretThatIsNotUtf8IsMaskedInItsRepairedFormToo) {
  EXPECT_EQ(MaskSecrets("tree: abc-secret\xEF\xBF\xBD.", {"abc-secret\xff"}), "tree: [MASKED].");
}

TEST(MaskerTest, NoSecretsPassesBytesThrough) {
  StreamMasker masker({});
  std::string binary("\0\xff\r\n", 4);
  EXPECT_EQ(masker.Process(binary), binary);
  EXPECT_EQ(masker.Flush(), "");
}

TEST(MaskerTest, SecretSplitAcrossWritesIsMasked) {
  StreamMasker masker({"hunter2"});
  std::string out(masker.Process("password: hun"));
  absl::StrAppend(&out, masker.Process("ter"));
  absl::StrAppend(&out, masker.Process("2 ok"));
  out += masker.Flush();
  EXPECT_EQ(out, "password: [MASKED] ok");
}

TEST(MaskerTest, HeldBackPrefixIsReleasedWhenItIsNotASecret) {
  StreamMasker masker({"hunter2"});
  std::string out(masker.Process("hunt"));
  EXPECT_EQ(out, "");
  absl::StrAppend(&out, masker.Process("ing season"));
  out += masker.Flush();
  EXPECT_EQ(out, "hunting season");
}

TEST(MaskerTest, LongerOverlappingSecretWins) {
  EXPECT_EQ(MaskSecrets("abcdef", {"abc", "abcdef"}), "[MASKED]");
}

// "secret" is a secret and so is "secretvalue": "secretva" at the end of one write must wait for
// the next, or the short one is masked and the long one's tail ("value") goes out in clear.
TEST(MaskerTest, AShortSecretAtTheEndOfAWriteWaitsForALongerOneItBegins) {
  StreamMasker masker({"secret", "secretvalue"});
  std::string out(masker.Process("x secretva"));
  absl::StrAppend(&out, masker.Process("lue z secret"));
  out += masker.Flush();
  EXPECT_EQ(out, "x [MASKED] z [MASKED]");
  // Cut everywhere: the same as in one piece.
  const std::string text = "secretvalue secretv secret secretvaluesecret";
  const std::string whole = MaskSecrets(text, {"secret", "secretvalue"});
  EXPECT_EQ(whole, "[MASKED] [MASKED]v [MASKED] [MASKED][MASKED]");
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    StreamMasker split({"secret", "secretvalue"});
    std::string got(split.Process(absl::string_view(text).substr(0, cut)));
    absl::StrAppend(&got, split.Process(absl::string_view(text).substr(cut)));
    got += split.Flush();
    EXPECT_EQ(got, whole) << "cut at " << cut;
  }
}

// Every way of cutting the stream into writes yields the same masked output.
TEST(MaskerTest, RandomSplitsGiveTheSameResult) {
  const std::string text = "x glpat-ABC y glpat-ABC glpat-AB glpat-ABCglpat-ABC z";
  const std::vector<std::string> secrets = {"glpat-ABC", "AB z", "glpat-A"};
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
      absl::StrAppend(&out, masker.Process(absl::string_view(text).substr(pos, len)));
      pos += len;
    }
    out += masker.Flush();
    ASSERT_EQ(out, expected) << "round " << round;
  }
}

// Well-known token shapes are masked even when nobody declared them as secrets: an agent that
// echoes a personal access token it found must not leak it into the durable log.
TEST(MaskerTest, KnownTokenPrefixesAreMaskedWithoutDeclaration) {
  EXPECT_EQ(MaskSecrets("push with glpat-abcdEFGH1234_xyz now", {}), "push with [MASKED] now");
  EXPECT_EQ(MaskSecrets("gh: ghp_0123456789abcdefghij\n", {}), "gh: [MASKED]\n");
  // Too short to be a token: kept, so prose that mentions a prefix stays readable.
  EXPECT_EQ(MaskSecrets("a glpat-xyz example", {}), "a glpat-xyz example");
}

TEST(MaskerTest, TokenSplitAcrossWritesIsMasked) {
  StreamMasker masker({});
  std::string out(masker.Process("token: gl"));
  absl::StrAppend(&out, masker.Process("pat-abcd"));
  absl::StrAppend(&out, masker.Process("efgh1234 done"));
  out += masker.Flush();
  EXPECT_EQ(out, "token: [MASKED] done");
}

TEST(MaskerTest, TokenAtEndOfStreamIsMaskedByFlush) {
  StreamMasker masker({});
  std::string out(masker.Process("last line glpat-abcdefgh12"));
  EXPECT_EQ(out.find("glpat"), std::string::npos);
  out += masker.Flush();
  EXPECT_EQ(out, "last line [MASKED]");
}

TEST(MaskerTest, TokenRandomSplitsGiveTheSameResult) {
  const std::string text = "a ghp_abcdefgh12345678 b glpat- c xoxb-1234-5678-abcd\nglpat-ZZZZZZZZZZ";
  const std::string expected = MaskSecrets(text, {"b gl"});
  EXPECT_EQ(expected, "a [MASKED] [MASKED]pat- c [MASKED]\n[MASKED]");
  std::mt19937 rng(11);
  for (int round = 0; round < 500; ++round) {
    StreamMasker masker({"b gl"});
    std::string out;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t len = std::min(std::uniform_int_distribution<size_t>(0, 6)(rng), text.size() - pos);
      absl::StrAppend(&out, masker.Process(absl::string_view(text).substr(pos, len)));
      pos += len;
    }
    out += masker.Flush();
    ASSERT_EQ(out, expected) << "round " << round;
  }
}

// A long stream mixing prose full of near misses ("g", "gl", "glpat" too short), declared
// secrets and real tokens, cut into writes of every size from one byte to 64 KiB: the output
// is exactly the stream with each secret and token replaced, whatever the cuts.
TEST(MaskerTest, LongMixedStreamIsMaskedExactlyAtAnyWriteSize) {
  const std::vector<std::string> secrets = {"hunter2", "s3cr3t-value"};
  const std::vector<std::pair<std::string, std::string>> pieces = {
      {"going glad ", "going glad "},
      {"hunter2", "[MASKED]"},
      {" glpat-short ", " glpat-short "},
      {"glpat-0123456789abcdef ", "[MASKED] "},
      {"\nxoxo gh ghp ", "\nxoxo gh ghp "},
      {"s3cr3t-value", "[MASKED]"},
      {std::string("\0\xffgg", 4), std::string("\0\xffgg", 4)},
      {"github_pat_ABCDEFGH_12345678\n", "[MASKED]\n"},
      {" hunter ", " hunter "},
  };
  std::mt19937 rng(5);
  std::string text, expected;
  while (text.size() < (1u << 20)) {
    const auto& [in, out] = pieces[std::uniform_int_distribution<size_t>(0, pieces.size() - 1)(rng)];
    text += in;
    expected += out;
  }
  EXPECT_EQ(MaskSecrets(text, secrets), expected);
  for (size_t max_write : {1u, 7u, 4096u, 65536u}) {
    StreamMasker masker(secrets);
    std::string got;
    for (size_t pos = 0; pos < text.size();) {
      size_t len = std::min(std::uniform_int_distribution<size_t>(1, max_write)(rng), text.size() - pos);
      absl::StrAppend(&got, masker.Process(absl::string_view(text).substr(pos, len)));
      pos += len;
    }
    got += masker.Flush();
    ASSERT_EQ(got.size(), expected.size()) << "writes of up to " << max_write << " bytes";
    ASSERT_TRUE(got == expected) << "writes of up to " << max_write << " bytes";
  }
}

}  // namespace
}  // namespace step_runner::logs

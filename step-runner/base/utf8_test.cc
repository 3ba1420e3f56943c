#include "step-runner/base/utf8.h"

#include "gtest/gtest.h"

namespace step_runner {
namespace {

TEST(Utf8Test, SequenceLengthsOfWellFormedAndMalformedText) {
  EXPECT_EQ(Utf8SequenceLength("a", 0), 1u);
  EXPECT_EQ(Utf8SequenceLength("\xC3\xA9", 0), 2u);          // é
  EXPECT_EQ(Utf8SequenceLength("\xE2\x82\xAC", 0), 3u);      // €
  EXPECT_EQ(Utf8SequenceLength("\xF0\x9F\x98\x80", 0), 4u);  // 😀
  EXPECT_EQ(Utf8SequenceLength("\x80", 0), 0u);              // a stray continuation byte
  EXPECT_EQ(Utf8SequenceLength("\xE2\x82", 0), 0u);          // cut short
  EXPECT_EQ(Utf8SequenceLength("\xC0\xAF", 0), 0u);          // overlong '/'
  EXPECT_EQ(Utf8SequenceLength("\xED\xA0\xBD", 0), 0u);      // a surrogate (CESU-8)
  EXPECT_EQ(Utf8SequenceLength("\xF4\x90\x80\x80", 0), 0u);  // past U+10FFFF
}

TEST(Utf8Test, InvalidBytesBecomeReplacementCharacters) {
  EXPECT_TRUE(IsValidUtf8("smile \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("a\xFF"));
  EXPECT_EQ(ToValidUtf8("smile \xF0\x9F\x98\x80"), "smile \xF0\x9F\x98\x80");
  EXPECT_EQ(ToValidUtf8("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(ToValidUtf8("\xED\xA0\xBD"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
}

}  // namespace
}  // namespace step_runner

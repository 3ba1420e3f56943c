#include "steps-catalog/helper/smart_http.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace step_runner::catalog {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Every packet `reader` holds, "<flush>" for a flush.
std::vector<std::string> Drain(PktLineReader& reader) {
  std::vector<std::string> packets;
  for (;;) {
    auto packet = reader.Next();
    EXPECT_TRUE(packet.ok()) << packet.status();
    if (!packet.ok() || !*packet) return packets;
    packets.push_back((*packet)->flush ? "<flush>" : std::string((*packet)->payload));
  }
}

TEST(PktLineTest, LengthCountsItsOwnFourDigits) {
  EXPECT_EQ(PktLine("want 1234\n"), "000ewant 1234\n");
  EXPECT_EQ(PktLine(""), "0004");
  EXPECT_EQ(PktLine(std::string(65520, 'x')).substr(0, 4), "fff4");
}

// A response comes in pieces of any size: cut anywhere, it splits into the same packets.
TEST(PktLineTest, AStreamCutAtAnyByteGivesTheSamePackets) {
  const std::string pack_data("\x01PACK\0\0\0\x02", 10);
  const std::string stream = PktLine("shallow 0123\n") + std::string(kFlushPkt) + PktLine("NAK\n") + PktLine(pack_data) +
                             std::string(kFlushPkt);
  const std::vector<std::string> expected = {"shallow 0123\n", "<flush>", "NAK\n", pack_data, "<flush>"};
  for (size_t piece = 1; piece <= stream.size(); ++piece) {
    PktLineReader reader;
    std::vector<std::string> packets;
    for (size_t at = 0; at < stream.size(); at += piece) {
      reader.Append(absl::string_view(stream).substr(at, piece));
      for (std::string& packet : Drain(reader)) packets.push_back(std::move(packet));
    }
    EXPECT_EQ(packets, expected) << "pieces of " << piece;
    EXPECT_EQ(reader.pending(), 0u);
  }
}

TEST(PktLineTest, AHalfPacketWaitsForTheRest) {
  PktLineReader reader;
  reader.Append("000aab");
  EXPECT_THAT(Drain(reader), ElementsAre());
  EXPECT_EQ(reader.pending(), 6u);
  reader.Append("cdef0000");
  EXPECT_THAT(Drain(reader), ElementsAre("abcdef", "<flush>"));
}

TEST(PktLineTest, WhatIsNotAPktLineIsAnError) {
  for (const char* junk : {"<htm", "00g1", "0002", "0003", "fff9"}) {
    PktLineReader reader;
    reader.Append(junk);
    reader.Append(std::string(70000, 'x'));
    auto packet = reader.Next();
    EXPECT_EQ(packet.status().code(), absl::StatusCode::kDataLoss) << junk;
  }
  PktLineReader html;
  html.Append("<html><body>Sign in</body></html>");
  EXPECT_THAT(html.Next().status().message(), HasSubstr("is this a git smart HTTP server?"));
}

}  // namespace
}  // namespace step_runner::catalog

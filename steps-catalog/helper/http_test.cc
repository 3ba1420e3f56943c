#include "steps-catalog/helper/http.h"

#include <httplib.h>

#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace step_runner::catalog {
namespace {

using ::testing::HasSubstr;

// A server whose /stall sends a byte and then nothing (until the test ends), and whose /trickle
// sends a byte every 300 ms for 3 s: a slow answer, not a stalled one.
class SlowServer {
 public:
  SlowServer() {
    server_.Get("/stall", [this](const httplib::Request&, httplib::Response& response) {
      response.set_chunked_content_provider("text/plain", [this](size_t, httplib::DataSink& sink) {
        sink.write("a", 1);
        while (!stopping_) absl::SleepFor(absl::Milliseconds(20));
        sink.done();
        return true;
      });
    });
    server_.Get("/trickle", [](const httplib::Request&, httplib::Response& response) {
      response.set_chunked_content_provider("text/plain", [](size_t offset, httplib::DataSink& sink) {
        if (offset >= 10) {
          sink.done();
          return true;
        }
        absl::SleepFor(absl::Milliseconds(300));
        sink.write("b", 1);
        return true;
      });
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~SlowServer() {
    stopping_ = true;
    server_.stop();
    thread_.join();
  }
  std::string url(const std::string& path) const { return absl::StrCat("http://127.0.0.1:", port_, path); }

 private:
  httplib::Server server_;
  std::atomic<bool> stopping_{false};
  int port_ = 0;
  std::thread thread_;
};

TEST(FetchTest, AStalledTransferEndsAfterItsStallTimeoutAndSaysSo) {
  SlowServer server;
  const absl::Time start = absl::Now();
  absl::StatusOr<HttpResponse> response =
      Fetch({.url = server.url("/stall"), .timeout = absl::Minutes(5), .stall_timeout = absl::Seconds(1)});
  ASSERT_FALSE(response.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(response.status())) << response.status();
  EXPECT_THAT(response.status().message(), HasSubstr("nothing received for 1s"));
  // Long before the whole-transfer limit (5 minutes): the stall ended it.
  EXPECT_LT(absl::Now() - start, absl::Minutes(1));
}

TEST(FetchTest, ASlowButSteadyTransferIsNotAStall) {
  SlowServer server;
  absl::StatusOr<HttpResponse> response =
      Fetch({.url = server.url("/trickle"), .timeout = absl::Minutes(1), .stall_timeout = absl::Seconds(1)});
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->body, "bbbbbbbbbb");
}

// A stall limit under a second is not rounded away to "no limit" (curl counts whole seconds).
TEST(FetchTest, AStallTimeoutUnderASecondStillApplies) {
  SlowServer server;
  const absl::Time start = absl::Now();
  absl::StatusOr<HttpResponse> response = Fetch(
      {.url = server.url("/stall"), .timeout = absl::Minutes(5), .stall_timeout = absl::Milliseconds(200)});
  EXPECT_TRUE(absl::IsDeadlineExceeded(response.status())) << response.status();
  EXPECT_LT(absl::Now() - start, absl::Minutes(1));  // the stall ended it, not the 5 minutes
}

}  // namespace
}  // namespace step_runner::catalog

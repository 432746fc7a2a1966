// LocalTransport between instances of one process: payloads land
// byte-exact on the receiver's thread and every completion runs once on
// the sender's; a refused message fails alone with the receiver's status;
// unknown and malformed addresses, long headers; a destroyed peer fails
// the sends queued to it and is reported; a send the receiver does not
// take in time fails with DeadlineExceeded (and the receiver gets its
// memory back); the destructor fails what is in flight; completions may
// send.
#include "kvtier/local_transport.h"

#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace strata::kvtier {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::span<const std::byte> AsBytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::string AsString(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

std::vector<std::byte> Pattern(size_t bytes, int message) {
  std::vector<std::byte> v(bytes);
  for (size_t i = 0; i < bytes; ++i) {
    v[i] = static_cast<std::byte>((i * 131 + (i >> 12) + static_cast<size_t>(message) * 97) & 0xff);
  }
  return v;
}

// Keeps each payload in its own buffer (by header) and records what it was
// told, and on which thread.
class TestReceiver : public Transport::Receiver {
 public:
  absl::StatusOr<std::span<std::byte>> Allocate(std::string_view /*peer*/,
                                                std::span<const std::byte> header,
                                                size_t bytes) override {
    const std::string h = AsString(header);
    if (h.starts_with("slow")) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms_));
    absl::MutexLock lock(&mu_);
    threads_.push_back(std::this_thread::get_id());
    if (h.starts_with("refuse"))
      return absl::ResourceExhaustedError(absl::StrCat("no room for ", h));
    auto& buffer = buffers_[h];
    buffer.assign(bytes, std::byte{0});
    return std::span<std::byte>(buffer);
  }
  void Landed(std::string_view peer, std::span<const std::byte> header,
              std::span<std::byte> payload, absl::Status status) override {
    absl::MutexLock lock(&mu_);
    threads_.push_back(std::this_thread::get_id());
    const std::string h = AsString(header);
    EXPECT_EQ(payload.data(), buffers_[h].data());
    landings_[h].push_back(status);
    peers_[h] = std::string(peer);
  }
  void PeerFailed(std::string_view peer, const absl::Status& status) override {
    absl::MutexLock lock(&mu_);
    EXPECT_TRUE(absl::IsUnavailable(status)) << status;
    failed_peers_.emplace_back(peer);
  }

  std::vector<std::byte> Buffer(const std::string& h) {
    absl::MutexLock lock(&mu_);
    return buffers_[h];
  }
  std::vector<absl::Status> Landings(const std::string& h) {
    absl::MutexLock lock(&mu_);
    return landings_[h];
  }
  std::string Peer(const std::string& h) {
    absl::MutexLock lock(&mu_);
    return peers_[h];
  }
  std::vector<std::string> FailedPeers() {
    absl::MutexLock lock(&mu_);
    return failed_peers_;
  }
  bool WaitLandings(const std::string& h, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto some = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !landings_[h].empty(); };
    return mu_.AwaitWithTimeout(absl::Condition(&some), timeout);
  }
  std::vector<std::thread::id> Threads() {
    absl::MutexLock lock(&mu_);
    return threads_;
  }

  std::atomic<int> slow_ms_{0};  // Allocate sleeps this long for headers starting with "slow"

 private:
  absl::Mutex mu_;
  std::map<std::string, std::vector<std::byte>> buffers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::vector<absl::Status>> landings_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> failed_peers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread::id> threads_ ABSL_GUARDED_BY(mu_);
};

class Completions {
 public:
  Transport::SendDone For(int message) {
    return [this, message](absl::Status status) {
      absl::MutexLock lock(&mu_);
      statuses_[message].push_back(std::move(status));
      threads_.push_back(std::this_thread::get_id());
      ++total_;
    };
  }
  bool Wait(int n, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return total_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }
  absl::Status Only(int message) {
    absl::MutexLock lock(&mu_);
    const auto& s = statuses_[message];
    if (s.size() != 1) {
      return absl::InternalError(
          absl::StrCat("message ", message, " completed ", s.size(), " times"));
    }
    return s[0];
  }
  int total() {
    absl::MutexLock lock(&mu_);
    return total_;
  }
  std::vector<std::thread::id> threads() {
    absl::MutexLock lock(&mu_);
    return threads_;
  }

 private:
  absl::Mutex mu_;
  std::map<int, std::vector<absl::Status>> statuses_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread::id> threads_ ABSL_GUARDED_BY(mu_);
  int total_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST(LocalTransportTest, MessagesLandByteExactOnTheTransportsThreads) {
  TestReceiver ra, rb;
  LocalTransport a(&ra), b(&rb);
  EXPECT_NE(a.local_address(), b.local_address());
  EXPECT_TRUE(a.local_address().starts_with("local:"));
  constexpr int kMessages = 64;
  std::vector<std::vector<std::byte>> payloads;
  for (int i = 0; i < kMessages; ++i) payloads.push_back(Pattern(i == 3 ? 0 : 65536 + i, i));
  Completions done;
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_TRUE(
        a.Send(b.local_address(), AsBytes(absl::StrCat("m", i)), payloads[i], done.For(i)).ok());
  }
  ASSERT_TRUE(done.Wait(kMessages, absl::Seconds(10)));
  for (int i = 0; i < kMessages; ++i) {
    const std::string h = absl::StrCat("m", i);
    EXPECT_TRUE(done.Only(i).ok()) << done.Only(i);
    EXPECT_TRUE(rb.Buffer(h) == payloads[i]) << h;
    ASSERT_EQ(rb.Landings(h).size(), 1u);
    EXPECT_TRUE(rb.Landings(h)[0].ok());
    EXPECT_EQ(rb.Peer(h), a.local_address());
  }
  const auto sender_threads = done.threads();
  const auto receiver_threads = rb.Threads();
  for (auto id : sender_threads) {
    EXPECT_EQ(id, sender_threads[0]);  // one thread: a's
    EXPECT_NE(id, std::this_thread::get_id());
  }
  for (auto id : receiver_threads) {
    EXPECT_EQ(id, receiver_threads[0]);  // one thread: b's
    EXPECT_NE(id, sender_threads[0]);
  }
}

TEST(LocalTransportTest, RefusedMessageFailsAloneWithTheReceiversStatus) {
  TestReceiver ra, rb;
  LocalTransport a(&ra), b(&rb);
  const std::vector<std::string> headers = {"m0", "refuse-1", "m2"};
  const auto payload = Pattern(1000, 1);
  Completions done;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(a.Send(b.local_address(), AsBytes(headers[i]), payload, done.For(i)).ok());
  }
  ASSERT_TRUE(done.Wait(3, absl::Seconds(5)));
  EXPECT_TRUE(done.Only(0).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(done.Only(1))) << done.Only(1);
  EXPECT_EQ(done.Only(1).message(), "no room for refuse-1");
  EXPECT_TRUE(rb.Landings("refuse-1").empty());
  EXPECT_TRUE(done.Only(2).ok());
}

TEST(LocalTransportTest, BadAndUnknownAddressesAndLongHeaders) {
  TestReceiver ra;
  LocalTransport a(&ra);
  const auto payload = Pattern(10, 1);
  Completions done;
  for (const std::string bad : {"", "local:", "local:x1", "remote:1", "garbage"}) {
    const absl::Status s = a.Send(bad, AsBytes("h"), payload, done.For(0));
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << bad << ": " << s;
  }
  const std::string long_header(Transport::kMaxHeaderBytes + 1, 'h');
  EXPECT_TRUE(absl::IsInvalidArgument(
      a.Send(a.local_address(), AsBytes(long_header), payload, done.For(0))));
  EXPECT_TRUE(absl::IsInvalidArgument(a.Send(a.local_address(), AsBytes("h"), payload, nullptr)));
  EXPECT_EQ(done.total(), 0);
  // Well formed, but nobody is there.
  ASSERT_TRUE(a.Send("local:999999999", AsBytes("h"), payload, done.For(1)).ok());
  ASSERT_TRUE(done.Wait(1, absl::Seconds(5)));
  EXPECT_TRUE(absl::IsUnavailable(done.Only(1))) << done.Only(1);
  EXPECT_THAT(done.Only(1).message(), HasSubstr("local:999999999"));
  // To itself.
  const std::string max_header(Transport::kMaxHeaderBytes, 'h');
  ASSERT_TRUE(a.Send(a.local_address(), AsBytes(max_header), payload, done.For(2)).ok());
  ASSERT_TRUE(done.Wait(2, absl::Seconds(5)));
  EXPECT_TRUE(done.Only(2).ok()) << done.Only(2);
  EXPECT_TRUE(ra.Buffer(max_header) == payload);
}

TEST(LocalTransportTest, DestroyedPeerFailsQueuedSendsAndIsReported) {
  TestReceiver ra, rb;
  LocalTransport a(&ra);
  auto b = std::make_unique<LocalTransport>(&rb);
  const std::string b_address = b->local_address();
  rb.slow_ms_ = 200;
  const auto payload = Pattern(4096, 1);
  Completions done;
  // b sleeps in the first Allocate while the rest queue up.
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(a.Send(b_address, AsBytes(absl::StrCat("slow", i)), payload, done.For(i)).ok());
  }
  std::this_thread::sleep_for(milliseconds(50));
  const auto start = Clock::now();
  b.reset();
  ASSERT_TRUE(done.Wait(8, absl::Seconds(3)));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
  EXPECT_TRUE(done.Only(0).ok()) << done.Only(0);  // the one b was taking
  for (int i = 1; i < 8; ++i) {
    EXPECT_TRUE(absl::IsUnavailable(done.Only(i))) << done.Only(i);
    EXPECT_THAT(done.Only(i).message(), HasSubstr(b_address));
  }
  // Reported once to a (which had sent to b).
  for (int spin = 0; spin < 100 && ra.FailedPeers().empty(); ++spin) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_EQ(ra.FailedPeers(), std::vector<std::string>{b_address});
  // Later sends to the address fail.
  ASSERT_TRUE(a.Send(b_address, AsBytes("late"), payload, done.For(8)).ok());
  ASSERT_TRUE(done.Wait(9, absl::Seconds(3)));
  EXPECT_TRUE(absl::IsUnavailable(done.Only(8)));
}

TEST(LocalTransportTest, SendNotTakenInTimeFailsWithDeadlineExceeded) {
  TestReceiver ra, rb;
  LocalTransport a(&ra, {.send_timeout = milliseconds(100)});
  LocalTransport b(&rb);
  rb.slow_ms_ = 500;
  const auto payload = Pattern(4096, 1);
  Completions done;
  const auto start = Clock::now();
  ASSERT_TRUE(a.Send(b.local_address(), AsBytes("slow"), payload, done.For(0)).ok());
  ASSERT_TRUE(done.Wait(1, absl::Seconds(3)));
  const auto took = Clock::now() - start;
  EXPECT_GE(took, milliseconds(95));
  EXPECT_LT(took, milliseconds(400));
  EXPECT_TRUE(absl::IsDeadlineExceeded(done.Only(0))) << done.Only(0);
  EXPECT_THAT(done.Only(0).message(), HasSubstr("4096-byte"));
  // b wakes up: its memory comes back with an error, the payload (which a
  // may have freed) is not read, and a's completion does not run again.
  ASSERT_TRUE(rb.WaitLandings("slow", absl::Seconds(3)));
  EXPECT_TRUE(absl::IsCancelled(rb.Landings("slow")[0])) << rb.Landings("slow")[0];
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(done.total(), 1);
  EXPECT_TRUE(rb.Buffer("slow") == std::vector<std::byte>(4096));
}

TEST(LocalTransportTest, DestructorFailsSendsInFlightOnceAndCompletionsMaySend) {
  TestReceiver ra, rb;
  LocalTransport b(&rb);
  const auto payload = Pattern(4096, 2);
  {
    LocalTransport a(&ra);
    Completions done;
    std::function<void(int)> send = [&](int i) {
      Transport::SendDone record = done.For(i);
      ASSERT_TRUE(a.Send(b.local_address(), AsBytes(absl::StrCat("chain", i)), payload,
                         [&, i, record](absl::Status s) {
                           record(s);
                           if (i + 1 < 10) send(i + 1);
                         })
                      .ok());
    };
    send(0);
    ASSERT_TRUE(done.Wait(10, absl::Seconds(5)));
    for (int i = 0; i < 10; ++i) EXPECT_TRUE(done.Only(i).ok()) << done.Only(i);
  }
  rb.slow_ms_ = 100;
  Completions done;
  {
    LocalTransport a(&ra);
    for (int i = 0; i < 5; ++i) {
      ASSERT_TRUE(
          a.Send(b.local_address(), AsBytes(absl::StrCat("slow", i)), payload, done.For(i)).ok());
    }
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ(done.total(), 5);  // all ran, inside the destructor
  for (int i = 0; i < 5; ++i) {
    const absl::Status s = done.Only(i);
    EXPECT_TRUE(s.ok() || absl::IsCancelled(s)) << s;
  }
  EXPECT_TRUE(absl::IsCancelled(done.Only(4))) << done.Only(4);
}

}  // namespace
}  // namespace strata::kvtier

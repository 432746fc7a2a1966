// Tests of IncrementalDetokenizer: held-back partial characters, U+FFFD for
// bytes that can never become valid, special-token skipping and the
// SentencePiece leading space, on a hand-made tokenizer and on the fixture
// tokenizers.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/tokenizer.h"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

constexpr char kReplacement[] = "\xEF\xBF\xBD";

// A tokenizer whose tokens are fixed byte strings; only what the
// detokenizer uses is implemented.
class FakeTokenizer : public Tokenizer {
 public:
  FakeTokenizer(std::vector<std::string> tokens, std::set<int32_t> specials, bool strips)
      : tokens_(std::move(tokens)), specials_(std::move(specials)), strips_(strips) {}

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view, bool) const override {
    return absl::UnimplementedError("fake");
  }
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>&, bool) const override {
    return absl::UnimplementedError("fake");
  }
  std::string TokenBytes(int32_t id) const override {
    return id >= 0 && id < vocab_size() ? tokens_[id] : std::string();
  }
  bool StripsLeadingSpace() const override { return strips_; }
  bool IsSpecial(int32_t id) const override { return specials_.count(id) > 0; }
  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }
  std::optional<int32_t> bos_id() const override { return std::nullopt; }
  std::vector<int32_t> eos_ids() const override { return {}; }
  std::optional<int32_t> TokenToId(std::string_view) const override { return std::nullopt; }

 private:
  std::vector<std::string> tokens_;
  std::set<int32_t> specials_;
  bool strips_;
};

enum : int32_t {
  kFox0,      // F0 9F   (first half of U+1F98A)
  kFox1,      // A6
  kFox2,      // 8A
  kA,         // "a"
  kFF,        // a byte that is never valid UTF-8
  kC3,        // a two-byte lead
  kBos,       // "<s>" (special)
  kHello,     // " Hello"
  kWorld,     // " world"
  kCjkHead,   // E4 B8 (first two bytes of U+4E2D)
  kSurrogate  // ED A0 (would be a surrogate: invalid)
};

FakeTokenizer MakeFake(bool strips) {
  return FakeTokenizer({"\xF0\x9F", "\xA6", "\x8A", "a", "\xFF", "\xC3", "<s>", " Hello", " world",
                        "\xE4\xB8", "\xED\xA0"},
                       {kBos}, strips);
}

std::vector<std::string> PushAll(IncrementalDetokenizer* detok, const std::vector<int32_t>& ids) {
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(detok->Push(id));
  return pieces;
}

TEST(IncrementalDetokenizerTest, HoldsBackSplitCharacter) {
  FakeTokenizer fake = MakeFake(false);
  IncrementalDetokenizer detok(&fake, false);
  EXPECT_EQ(PushAll(&detok, {kA, kFox0, kFox1, kFox2, kA}),
            (std::vector<std::string>{"a", "", "", "\xF0\x9F\xA6\x8A", "a"}));
  EXPECT_EQ(detok.Flush(), "");
}

TEST(IncrementalDetokenizerTest, NeverValidBytesAreReplacedAtOnce) {
  FakeTokenizer fake = MakeFake(false);
  IncrementalDetokenizer detok(&fake, false);
  EXPECT_EQ(detok.Push(kFF), kReplacement);
  // A lead byte is held, then replaced as soon as a non-continuation comes.
  EXPECT_EQ(detok.Push(kC3), "");
  EXPECT_EQ(detok.Push(kA), std::string(kReplacement) + "a");
  // ED A0 can never start a valid character (it would encode a surrogate):
  // one replacement per maximal ill-formed subpart, like Decode.
  EXPECT_EQ(detok.Push(kSurrogate), std::string(kReplacement) + kReplacement);
  // A truncated 4-byte sequence interrupted by another lead byte.
  EXPECT_EQ(detok.Push(kFox0), "");
  EXPECT_EQ(detok.Push(kFox0), kReplacement);
  EXPECT_EQ(detok.Push(kFox1), "");
  EXPECT_EQ(detok.Push(kFox2), "\xF0\x9F\xA6\x8A");
}

TEST(IncrementalDetokenizerTest, FlushReplacesIncompleteTail) {
  FakeTokenizer fake = MakeFake(false);
  IncrementalDetokenizer detok(&fake, false);
  EXPECT_EQ(detok.Push(kA), "a");
  EXPECT_EQ(detok.Push(kCjkHead), "");
  EXPECT_EQ(detok.Flush(), kReplacement);
  EXPECT_EQ(detok.Flush(), "");
}

TEST(IncrementalDetokenizerTest, SkipsSpecialTokens) {
  FakeTokenizer fake = MakeFake(false);
  IncrementalDetokenizer skipping(&fake, true);
  EXPECT_EQ(PushAll(&skipping, {kBos, kHello, kBos}), (std::vector<std::string>{"", " Hello", ""}));
  // Skipped specials do not break a character apart.
  EXPECT_EQ(PushAll(&skipping, {kFox0, kBos, kFox1, kFox2}),
            (std::vector<std::string>{"", "", "", "\xF0\x9F\xA6\x8A"}));
  IncrementalDetokenizer keeping(&fake, false);
  EXPECT_EQ(PushAll(&keeping, {kBos, kHello}), (std::vector<std::string>{"<s>", " Hello"}));
}

TEST(IncrementalDetokenizerTest, StripsOnlyTheFirstLeadingSpace) {
  FakeTokenizer fake = MakeFake(true);
  IncrementalDetokenizer detok(&fake, false);
  // The bos does not count as the first token.
  EXPECT_EQ(PushAll(&detok, {kBos, kHello, kWorld, kHello}),
            (std::vector<std::string>{"<s>", "Hello", " world", " Hello"}));
  IncrementalDetokenizer skipping(&fake, true);
  EXPECT_EQ(PushAll(&skipping, {kBos, kHello, kWorld}),
            (std::vector<std::string>{"", "Hello", " world"}));
  FakeTokenizer plain = MakeFake(false);
  IncrementalDetokenizer keep(&plain, false);
  EXPECT_EQ(keep.Push(kHello), " Hello");
}

// On the real tokenizers: an emoji absent from their training text is
// spread over several byte tokens, and nothing comes out until it is whole.
class FixtureDetokenizerTest : public testing::TestWithParam<std::string> {};

TEST_P(FixtureDetokenizerTest, EmojiHeldBackUntilComplete) {
  auto tokenizer = LoadTokenizer(testing_util::FixturePath("tokenizers/" + GetParam()));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600, not in the fixtures' corpus
  auto ids = (*tokenizer)->Encode(emoji, false);
  ASSERT_TRUE(ids.ok()) << ids.status();
  // At least two tokens carry bytes of the emoji.
  int byte_tokens = 0;
  for (int32_t id : *ids) {
    const std::string bytes = (*tokenizer)->TokenBytes(id);
    if (bytes.find_first_of("\xF0\x9F\x98\x80") != std::string::npos) ++byte_tokens;
  }
  ASSERT_GE(byte_tokens, 2);
  IncrementalDetokenizer detok(tokenizer->get(), true);
  for (size_t i = 0; i + 1 < ids->size(); ++i) {
    EXPECT_EQ(detok.Push((*ids)[i]), "") << "token " << i;
  }
  EXPECT_EQ(detok.Push(ids->back()), emoji);
  EXPECT_EQ(detok.Flush(), "");

  // Also inside text, and through a whole ZWJ sequence and a flag.
  const std::string text =
      "ok \xF0\x9F\x98\x80 \xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB "
      "\xF0\x9F\x87\xA9\xF0\x9F\x87\xAA!";
  ids = (*tokenizer)->Encode(text, false);
  ASSERT_TRUE(ids.ok());
  IncrementalDetokenizer stream(tokenizer->get(), true);
  std::string streamed;
  for (int32_t id : *ids) {
    const std::string piece = stream.Push(id);
    // Never a partial character: every piece re-encodes to itself.
    EXPECT_EQ(piece.find(kReplacement), std::string::npos);
    streamed += piece;
  }
  streamed += stream.Flush();
  auto decoded = (*tokenizer)->Decode(*ids, true);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(streamed, *decoded);
  EXPECT_EQ(streamed, text);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, FixtureDetokenizerTest,
                         testing::Values("llama3_bpe", "qwen2_bpe", "gpt2_bpe", "sentencepiece"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace strata::engine

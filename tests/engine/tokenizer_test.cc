// Tests of LoadTokenizer, the BPE (tokenizer.json) and SentencePiece
// (tokenizer.model) tokenizers against the reference outputs in
// tests/fixtures/tokenizers/*/cases.json (made by tools/make_golden.py with
// Hugging Face tokenizers and sentencepiece), plus the error paths.
#include "engine/tokenizer.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

using Json = nlohmann::json;

std::string FixtureDir(const std::string& name) {
  return testing_util::FixturePath("tokenizers/" + name);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

// A fresh empty directory under the test temp dir.
std::string MakeTempDir() {
  std::string pattern = testing::TempDir() + "/strata_tokenizer_XXXXXX";
  char* dir = mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  return pattern;
}

// Strict UTF-8 check, written independently of the code under test.
bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int n;
    uint32_t cp;
    if (c < 0x80) {
      n = 0, cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated
    for (int k = 1; k <= n; ++k) {
      const unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

struct Case {
  std::string text;
  bool add_special_tokens;
  std::vector<int32_t> ids;
  std::string decoded;
};

std::vector<Case> LoadCases(const std::string& dir) {
  const Json json = Json::parse(ReadFile(dir + "/cases.json"), nullptr, false);
  EXPECT_TRUE(json.is_array());
  std::vector<Case> cases;
  if (!json.is_array()) return cases;
  for (const Json& c : json) {
    cases.push_back({c["text"].get<std::string>(), c["add_special_tokens"].get<bool>(),
                     c["ids"].get<std::vector<int32_t>>(), c["decoded"].get<std::string>()});
  }
  return cases;
}

std::unique_ptr<Tokenizer> LoadOrDie(const std::string& dir) {
  auto tokenizer = LoadTokenizer(dir);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

// ---------------------------------------------------------------------------
// Reference cases.

class FixtureTest : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = FixtureDir(GetParam());
    tokenizer_ = LoadOrDie(dir_);
    ASSERT_NE(tokenizer_, nullptr);
    cases_ = LoadCases(dir_);
    ASSERT_FALSE(cases_.empty());
  }
  bool is_sentencepiece() const { return GetParam() == "sentencepiece"; }

  std::string dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<Case> cases_;
};

TEST_P(FixtureTest, EncodeMatchesReference) {
  for (const Case& c : cases_) {
    auto ids = tokenizer_->Encode(c.text, c.add_special_tokens);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c.ids) << "text: \"" << c.text << "\" add_special_tokens "
                           << c.add_special_tokens;
  }
}

TEST_P(FixtureTest, DecodeMatchesReference) {
  for (const Case& c : cases_) {
    auto text = tokenizer_->Decode(c.ids, /*skip_special_tokens=*/false);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, c.decoded) << "text: \"" << c.text << "\"";
  }
}

// Streams `ids` through an IncrementalDetokenizer, checking that every piece
// is valid UTF-8, and returns the concatenation.
std::string Stream(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDetokenizer detok(&tokenizer, skip);
  std::string text;
  for (int32_t id : ids) {
    std::string piece = detok.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece)) << "token " << id;
    text += piece;
  }
  std::string rest = detok.Flush();
  EXPECT_TRUE(IsValidUtf8(rest));
  return text + rest;
}

TEST_P(FixtureTest, IncrementalDetokenizerMatchesDecode) {
  for (const Case& c : cases_) {
    SCOPED_TRACE("text: \"" + c.text + "\"");
    auto skipped = tokenizer_->Decode(c.ids, /*skip_special_tokens=*/true);
    ASSERT_TRUE(skipped.ok()) << skipped.status();
    EXPECT_EQ(Stream(*tokenizer_, c.ids, /*skip=*/true), *skipped);
    if (is_sentencepiece()) {
      // sentencepiece never prints control tokens, so the reference decoding
      // is the one without specials.
      EXPECT_EQ(Stream(*tokenizer_, c.ids, /*skip=*/true), c.decoded);
    } else {
      EXPECT_EQ(Stream(*tokenizer_, c.ids, /*skip=*/false), c.decoded);
    }
  }
}

TEST_P(FixtureTest, ConcurrentEncodeIsConsistent) {
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 10; ++round) {
        for (const Case& c : cases_) {
          auto ids = tokenizer_->Encode(c.text, c.add_special_tokens);
          if (!ids.ok() || *ids != c.ids) ++mismatches[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, FixtureTest,
                         testing::Values("llama3_bpe", "qwen2_bpe", "gpt2_bpe", "sentencepiece"),
                         [](const auto& info) { return info.param; });

// ---------------------------------------------------------------------------
// Special tokens and configuration.

TEST(TokenizerConfigTest, Llama3) {
  auto tokenizer = LoadOrDie(FixtureDir("llama3_bpe"));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->bos_id(), tokenizer->TokenToId("<|begin_of_text|>"));
  EXPECT_EQ(tokenizer->bos_id(), 0);
  EXPECT_EQ(tokenizer->eos_ids(), std::vector<int32_t>{*tokenizer->TokenToId("<|end_of_text|>")});
  EXPECT_TRUE(tokenizer->IsSpecial(*tokenizer->TokenToId("<|eot_id|>")));
  EXPECT_FALSE(tokenizer->StripsLeadingSpace());
  EXPECT_EQ(tokenizer->TokenBytes(*tokenizer->TokenToId("<|eot_id|>")), "<|eot_id|>");
  EXPECT_EQ(tokenizer->TokenToId("Ġ"), tokenizer->Encode(" ", false)->at(0));
  EXPECT_EQ(tokenizer->TokenToId("no such token"), std::nullopt);
  auto ids = tokenizer->Encode("<|start_header_id|>user<|end_header_id|>", true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), 0);
  EXPECT_EQ(ids->at(1), *tokenizer->TokenToId("<|start_header_id|>"));
  EXPECT_EQ(ids->back(), *tokenizer->TokenToId("<|end_header_id|>"));
  auto skipped = tokenizer->Decode(*ids, /*skip_special_tokens=*/true);
  ASSERT_TRUE(skipped.ok());
  EXPECT_EQ(*skipped, "user");
}

TEST(TokenizerConfigTest, Gpt2AndQwen2) {
  auto gpt2 = LoadOrDie(FixtureDir("gpt2_bpe"));
  ASSERT_NE(gpt2, nullptr);
  EXPECT_EQ(gpt2->bos_id(), std::nullopt);
  EXPECT_EQ(gpt2->eos_ids(), std::vector<int32_t>{*gpt2->TokenToId("<|endoftext|>")});
  auto qwen = LoadOrDie(FixtureDir("qwen2_bpe"));
  ASSERT_NE(qwen, nullptr);
  EXPECT_EQ(qwen->bos_id(), std::nullopt);
  EXPECT_EQ(qwen->eos_ids(), std::vector<int32_t>{*qwen->TokenToId("<|im_end|>")});
}

TEST(TokenizerConfigTest, SentencePiece) {
  auto tokenizer = LoadOrDie(FixtureDir("sentencepiece"));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_ids(), std::vector<int32_t>{2});
  EXPECT_TRUE(tokenizer->StripsLeadingSpace());
  EXPECT_TRUE(tokenizer->IsSpecial(1));
  EXPECT_TRUE(tokenizer->IsSpecial(2));
  EXPECT_FALSE(tokenizer->IsSpecial(0));
  EXPECT_EQ(tokenizer->TokenBytes(1), "<s>");
  EXPECT_EQ(tokenizer->TokenBytes(0), " \xE2\x81\x87 ");
  auto byte_id = tokenizer->TokenToId("<0xE3>");
  ASSERT_TRUE(byte_id.has_value());
  EXPECT_EQ(tokenizer->TokenBytes(*byte_id), "\xE3");
  EXPECT_EQ(tokenizer->TokenToId("no such piece"), std::nullopt);
  EXPECT_EQ(tokenizer->vocab_size(), 600);
  // Control pieces written in the text are recognised.
  auto ids = tokenizer->Encode("Hello</s>", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->back(), 2);
  auto plain = tokenizer->Encode("Hello", false);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(std::vector<int32_t>(ids->begin(), ids->end() - 1), *plain);
}

TEST(TokenizerConfigTest, SentencePieceAddBosFalse) {
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.model", ReadFile(FixtureDir("sentencepiece") + "/tokenizer.model"));
  WriteFile(dir + "/tokenizer_config.json", R"({"add_bos_token": false, "add_eos_token": true})");
  auto tokenizer = LoadOrDie(dir);
  ASSERT_NE(tokenizer, nullptr);
  auto ids = tokenizer->Encode("Hello world", true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), 281);
  EXPECT_EQ(ids->back(), 2);
}

TEST(TokenizerConfigTest, GenerationConfigAddsEosIds) {
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", ReadFile(FixtureDir("llama3_bpe") + "/tokenizer.json"));
  WriteFile(dir + "/tokenizer_config.json",
            ReadFile(FixtureDir("llama3_bpe") + "/tokenizer_config.json"));
  WriteFile(dir + "/generation_config.json", R"({"bos_token_id": 0, "eos_token_id": [1, 4]})");
  auto tokenizer = LoadOrDie(dir);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->eos_ids(), (std::vector<int32_t>{1, 4}));

  WriteFile(dir + "/generation_config.json", R"({"eos_token_id": 4})");
  tokenizer = LoadOrDie(dir);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->eos_ids(), (std::vector<int32_t>{1, 4}));
}

TEST(TokenizerConfigTest, WorksWithoutConfig) {
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", ReadFile(FixtureDir("llama3_bpe") + "/tokenizer.json"));
  auto tokenizer = LoadOrDie(dir);
  ASSERT_NE(tokenizer, nullptr);
  // The template's leading special token is taken as the bos.
  EXPECT_EQ(tokenizer->bos_id(), 0);
  EXPECT_TRUE(tokenizer->eos_ids().empty());
}

// Older tokenizer.json files write merges as "left right" strings; both
// forms must give the same tokenizer.
TEST(BpeFormatTest, MergesAsStrings) {
  Json json = Json::parse(ReadFile(FixtureDir("llama3_bpe") + "/tokenizer.json"), nullptr, false);
  ASSERT_TRUE(json.is_object());
  Json merges = Json::array();
  for (const Json& pair : json["model"]["merges"]) {
    merges.push_back(pair[0].get<std::string>() + " " + pair[1].get<std::string>());
  }
  json["model"]["merges"] = merges;
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", json.dump());
  auto tokenizer = LoadOrDie(dir);
  ASSERT_NE(tokenizer, nullptr);
  for (const Case& c : LoadCases(FixtureDir("llama3_bpe"))) {
    auto ids = tokenizer->Encode(c.text, c.add_special_tokens);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c.ids) << c.text;
  }
}

// ---------------------------------------------------------------------------
// Bad input.

// Writes a tokenizer.json built from the gpt2 fixture after `edit` and
// returns LoadTokenizer's status.
absl::Status LoadEditedGpt2(const std::function<void(Json&)>& edit) {
  Json json = Json::parse(ReadFile(FixtureDir("gpt2_bpe") + "/tokenizer.json"), nullptr, false);
  EXPECT_TRUE(json.is_object());
  edit(json);
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", json.dump());
  return LoadTokenizer(dir).status();
}

TEST(TokenizerErrorTest, MissingDirectory) {
  auto tokenizer = LoadTokenizer("/nonexistent/strata/model");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tokenizer.status().message().find("/nonexistent/strata/model"), std::string::npos);
}

TEST(TokenizerErrorTest, NoTokenizerFiles) {
  auto tokenizer = LoadTokenizer(MakeTempDir());
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("tokenizer.json"), std::string::npos);
}

TEST(TokenizerErrorTest, NotJson) {
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", "this is { not json");
  auto tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tokenizer.status().message().find("tokenizer.json"), std::string::npos);
  EXPECT_NE(tokenizer.status().message().find("JSON"), std::string::npos);
}

TEST(TokenizerErrorTest, TruncatedJson) {
  const std::string text = ReadFile(FixtureDir("qwen2_bpe") + "/tokenizer.json");
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", text.substr(0, text.size() / 2));
  auto tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("tokenizer.json"), std::string::npos);
}

TEST(TokenizerErrorTest, TruncatedSentencePieceModel) {
  const std::string proto = ReadFile(FixtureDir("sentencepiece") + "/tokenizer.model");
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.model", proto.substr(0, proto.size() / 3));
  auto tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("tokenizer.model"), std::string::npos);
}

TEST(TokenizerErrorTest, UnsupportedModelType) {
  absl::Status status = LoadEditedGpt2([](Json& json) { json["model"]["type"] = "WordPiece"; });
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("WordPiece"), std::string::npos) << status;
  EXPECT_NE(status.message().find("model.type"), std::string::npos) << status;
}

TEST(TokenizerErrorTest, MergeWithUnknownToken) {
  absl::Status status = LoadEditedGpt2([](Json& json) {
    json["model"]["merges"][3] = Json::array({"no_such_token", "e"});
  });
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("model.merges[3]"), std::string::npos) << status;
  EXPECT_NE(status.message().find("no_such_token"), std::string::npos) << status;
}

TEST(TokenizerErrorTest, MalformedFields) {
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["model"]["vocab"]["x"] = "seven"; }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["model"]["merges"] = 3; }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["model"]["merges"][0] = "nospace"; }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["model"].erase("vocab"); }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json.erase("model"); }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["added_tokens"][0]["id"] = -4; }).ok());
  EXPECT_FALSE(LoadEditedGpt2([](Json& json) { json["model"]["byte_fallback"] = true; }).ok());
  absl::Status status = LoadEditedGpt2([](Json& json) {
    json["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}};
  });
  EXPECT_NE(status.message().find("Metaspace"), std::string::npos) << status;
  status = LoadEditedGpt2([](Json& json) {
    json["pre_tokenizer"] = {
        {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  });
  EXPECT_NE(status.message().find("pre_tokenizer.pattern"), std::string::npos) << status;
  status = LoadEditedGpt2([](Json& json) { json["normalizer"] = {{"type", "Lowercase"}}; });
  EXPECT_NE(status.message().find("Lowercase"), std::string::npos) << status;
}

TEST(TokenizerErrorTest, BadTokenizerConfig) {
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokenizer.json", ReadFile(FixtureDir("gpt2_bpe") + "/tokenizer.json"));
  WriteFile(dir + "/tokenizer_config.json", "{ broken");
  auto tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("tokenizer_config.json"), std::string::npos);

  WriteFile(dir + "/tokenizer_config.json", R"({"eos_token": "<|not_a_token|>"})");
  tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("eos_token"), std::string::npos);

  WriteFile(dir + "/tokenizer_config.json", "{}");
  WriteFile(dir + "/generation_config.json", R"({"eos_token_id": 99999})");
  tokenizer = LoadTokenizer(dir);
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("generation_config.json"), std::string::npos);
}

TEST(TokenizerErrorTest, DecodeOutOfRange) {
  for (const char* name : {"gpt2_bpe", "sentencepiece"}) {
    auto tokenizer = LoadOrDie(FixtureDir(name));
    ASSERT_NE(tokenizer, nullptr);
    const int32_t size = tokenizer->vocab_size();
    EXPECT_FALSE(tokenizer->Decode({1, size}, false).ok()) << name;
    EXPECT_FALSE(tokenizer->Decode({-1}, true).ok()) << name;
    EXPECT_EQ(tokenizer->Decode({size - 1}, false).ok(), true) << name;
    EXPECT_EQ(tokenizer->TokenBytes(size), "");
    EXPECT_EQ(tokenizer->TokenBytes(-5), "");
  }
}

TEST(TokenizerErrorTest, EncodeInvalidUtf8) {
  auto tokenizer = LoadOrDie(FixtureDir("gpt2_bpe"));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_FALSE(tokenizer->Encode("abc\xFF", false).ok());
}

TEST(BpeDecodeTest, InvalidBytesBecomeReplacementCharacters) {
  auto tokenizer = LoadOrDie(FixtureDir("gpt2_bpe"));
  ASSERT_NE(tokenizer, nullptr);
  // "é" is two bytes; encoded alone, byte-level BPE may need two tokens.
  // Decoding only the first byte token gives U+FFFD.
  std::optional<int32_t> lead = tokenizer->TokenToId("Ã");  // the byte 0xC3
  ASSERT_TRUE(lead.has_value());
  auto text = tokenizer->Decode({*lead}, false);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "\xEF\xBF\xBD");
  auto a = tokenizer->TokenToId("a");
  ASSERT_TRUE(a.has_value());
  text = tokenizer->Decode({*lead, *a}, false);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text,
            "\xEF\xBF\xBD"
            "a");
}

}  // namespace
}  // namespace strata::engine

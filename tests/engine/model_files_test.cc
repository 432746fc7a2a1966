// Startup checks on the files of a model directory: anything but a regular
// file (a FIFO, a device, a directory) is refused with an error naming the
// path before a read can block on it, and token ids in config.json,
// generation_config.json and tokenizer.json that do not fit the vocabulary
// (past int32, negative, >= vocab_size) are refused with an error naming the
// key instead of being truncated.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/bpe_tokenizer.h"
#include "engine/cpu_backend.h"
#include "engine/mapped_file.h"
#include "engine/model_config.h"
#include "engine/model_loader.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/test_util.h"

namespace strata::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing_util::FixturePath;
using testing_util::TempDir;

// Generous: the loads below take milliseconds, even under sanitizers.
constexpr auto kTimeout = std::chrono::seconds(20);

// Runs `load` on its own thread and returns its status, or a DeadlineExceeded
// error if it has not finished within kTimeout. A load blocked on opening
// `fifo` is then released by opening the FIFO's other end, so a failing test
// neither hangs nor leaves a thread behind.
absl::Status RunWithTimeout(std::function<absl::Status()> load, const std::string& fifo) {
  auto task = std::make_shared<std::packaged_task<absl::Status()>>(std::move(load));
  std::future<absl::Status> result = task->get_future();
  std::thread thread([task] { (*task)(); });
  if (result.wait_for(kTimeout) == std::future_status::ready) {
    thread.join();
    return result.get();
  }
  // A reader blocked in open() returns once a writer opens; a reader blocked
  // in read() returns end-of-file once that writer closes.
  const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
  if (fd >= 0) ::close(fd);
  thread.join();
  return absl::DeadlineExceededError(
      absl::StrCat("the load was still blocked after ", kTimeout.count(),
                   " s (then returned: ", result.get().ToString(), ")"));
}

std::string Message(const absl::Status& s) { return std::string(s.message()); }

// A model directory with a valid config but `name` a FIFO.
class FifoModelDir {
 public:
  FifoModelDir(const std::string& fixture, const std::string& name) {
    dir_.CopyFrom(FixturePath(fixture));
    fifo_ = dir_.path() + "/" + name;
    fs::remove(fifo_);
    EXPECT_EQ(::mkfifo(fifo_.c_str(), 0600), 0) << fifo_;
  }
  const std::string& path() const { return dir_.path(); }
  const std::string& fifo() const { return fifo_; }

 private:
  TempDir dir_;
  std::string fifo_;
};

TEST(ModelFilesTest, FifoAsWeightsFailsFastNamingThePath) {
  FifoModelDir dir("models/llama_gqa", "model.safetensors");
  const absl::Status s =
      RunWithTimeout([&] { return testing_util::LoadModelStatus(dir.path()); }, dir.fifo());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(Message(s),
              AllOf(HasSubstr(dir.fifo()), HasSubstr("not a regular file"), HasSubstr("FIFO")));
}

TEST(ModelFilesTest, FifoAsAShardFailsFast) {
  FifoModelDir dir("models/llama3_rope", "model-00004-of-00007.safetensors");
  const absl::Status s =
      RunWithTimeout([&] { return testing_util::LoadModelStatus(dir.path()); }, dir.fifo());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(Message(s), AllOf(HasSubstr(dir.fifo()), HasSubstr("not a regular file")));
}

TEST(ModelFilesTest, FifoAsTheShardIndexFailsFast) {
  FifoModelDir dir("models/llama3_rope", "model.safetensors.index.json");
  const absl::Status s =
      RunWithTimeout([&] { return testing_util::LoadModelStatus(dir.path()); }, dir.fifo());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(Message(s), AllOf(HasSubstr(dir.fifo()), HasSubstr("not a regular file")));
}

TEST(ModelFilesTest, FifoAsConfigFailsFast) {
  for (const char* name : {"config.json", "generation_config.json"}) {
    FifoModelDir dir("models/llama_gqa", name);
    const absl::Status s =
        RunWithTimeout([&] { return LoadModelConfig(dir.path()).status(); }, dir.fifo());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(Message(s), AllOf(HasSubstr(dir.fifo()), HasSubstr("not a regular file"))) << name;
  }
}

TEST(ModelFilesTest, FifoAsTokenizerFilesFailsFast) {
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    TempDir dir;
    dir.CopyFrom(FixturePath("tokenizers/gpt2_bpe"));
    const std::string fifo = dir.path() + "/" + name;
    fs::remove(fifo);
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    const absl::Status s = RunWithTimeout([&] { return LoadTokenizer(dir.path()).status(); }, fifo);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(Message(s), AllOf(HasSubstr(fifo), HasSubstr("not a regular file"))) << name;
  }
}

TEST(ModelFilesTest, DirectoryAndDeviceAsWeightsAreRefused) {
  {
    TempDir dir;
    dir.CopyFrom(FixturePath("models/llama_gqa"));
    const std::string weights = dir.path() + "/model.safetensors";
    fs::remove(weights);
    fs::create_directory(weights);
    EXPECT_THAT(Message(testing_util::LoadModelStatus(dir.path())),
                AllOf(HasSubstr(weights), HasSubstr("not a regular file (a directory)")));
  }
  {
    TempDir dir;
    dir.CopyFrom(FixturePath("models/llama_gqa"));
    const std::string weights = dir.path() + "/model.safetensors";
    fs::remove(weights);
    fs::create_symlink("/dev/zero", weights);
    EXPECT_THAT(Message(testing_util::LoadModelStatus(dir.path())),
                AllOf(HasSubstr(weights), HasSubstr("not a regular file (a character device)")));
  }
  // Both readers, directly.
  EXPECT_THAT(Message(MappedFile::Open("/dev/null").status()), HasSubstr("character device"));
  EXPECT_THAT(Message(ReadFileToString("/dev/null").status()), HasSubstr("character device"));
  EXPECT_THAT(Message(ReadFileToString("/").status()), HasSubstr("a directory"));
  EXPECT_EQ(ReadFileToString("/nonexistent/x.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelFilesTest, RegularFilesAndSymlinksToThemStillLoad) {
  TempDir dir;
  dir.CopyFrom(FixturePath("models/llama_gqa"));
  const std::string weights = dir.path() + "/model.safetensors";
  fs::rename(weights, dir.path() + "/real.safetensors");
  fs::create_symlink(dir.path() + "/real.safetensors", weights);
  EXPECT_TRUE(testing_util::LoadModelStatus(dir.path()).ok())
      << testing_util::LoadModelStatus(dir.path());
  auto text = ReadFileToString(dir.path() + "/config.json");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->size(), fs::file_size(dir.path() + "/config.json"));
}

// --- token ids ---------------------------------------------------------------

std::string Config(const std::string& extra) {
  return R"({"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
    "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2)" +
         extra + "}";
}

TEST(ModelFilesTest, ConfigTokenIdsOutsideTheVocabularyAreRefusedNamingTheKey) {
  struct Case {
    std::string extra, key, value;
  } cases[] = {
      // 2^32 would read as 0 if truncated to int32, 2^32 + 3 as 3.
      {R"(,"eos_token_id":4294967296)", "eos_token_id", "4294967296"},
      {R"(,"eos_token_id":[2, 4294967299])", "eos_token_id", "4294967299"},
      {R"(,"bos_token_id":2147483648)", "bos_token_id", "2147483648"},
      {R"(,"bos_token_id":18446744073709551615)", "bos_token_id", "18446744073709551615"},
      {R"(,"eos_token_id":-9223372036854775808)", "eos_token_id", "-9223372036854775808"},
      {R"(,"eos_token_id":-1)", "eos_token_id", "-1"},
      {R"(,"bos_token_id":[-2])", "bos_token_id", "-2"},
      {R"(,"eos_token_id":10)", "eos_token_id", "10"},  // == vocab_size
      {R"(,"eos_token_id":[1, 99])", "eos_token_id", "99"},
      {R"(,"eos_token_id":2.0)", "eos_token_id", "integer"},
      {R"(,"eos_token_id":"2")", "eos_token_id", "token id"},
      {R"(,"bos_token_id":[1, null])", "bos_token_id", "integer"},
  };
  for (const Case& c : cases) {
    auto parsed = ParseModelConfig(Config(c.extra), "dir/config.json");
    ASSERT_FALSE(parsed.ok()) << c.extra;
    EXPECT_THAT(Message(parsed.status()),
                AllOf(HasSubstr("dir/config.json"), HasSubstr(c.key), HasSubstr(c.value)))
        << c.extra;
  }
  auto ok = ParseModelConfig(Config(R"(,"bos_token_id":0,"eos_token_id":[9, 2])"), "config.json");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->bos_token_ids, std::vector<int>({0}));
  EXPECT_EQ(ok->eos_token_ids, std::vector<int>({9, 2}));
}

TEST(ModelFilesTest, ImplausiblyLargeSizesAreRefused) {
  // Each size is in range on its own; together they would overflow the
  // parameter count and the fused q/k/v width.
  auto parsed = ParseModelConfig(
      R"({"architectures":["LlamaForCausalLM"],"vocab_size":1073741824,"hidden_size":1073741824,
      "intermediate_size":1073741824,"num_hidden_layers":1073741824,
      "num_attention_heads":2097152,"num_key_value_heads":2097152})",
      "config.json");
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(Message(parsed.status()), HasSubstr("implausibly large"));
  parsed = ParseModelConfig(
      R"({"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":4,
      "intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":1073741824,
      "num_key_value_heads":1073741824,"head_dim":2})",
      "config.json");
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(Message(parsed.status()), HasSubstr("num_key_value_heads are implausibly large"));
}

TEST(ModelFilesTest, GenerationConfigTokenIdsAreChecked) {
  struct Case {
    std::string eos, value;
  } cases[] = {
      {"4294967296", "4294967296"},
      {"[4294967297]", "4294967297"},
      {"18446744073709551615", "18446744073709551615"},
      {"-1", "-1"},
      {"[3, 10]", "10"},
      {"1.5", "integer"},
  };
  for (const Case& c : cases) {
    TempDir dir;
    dir.Write("config.json", Config(""));
    const std::string gen =
        dir.Write("generation_config.json", "{\"eos_token_id\": " + c.eos + "}");
    auto config = LoadModelConfig(dir.path());
    ASSERT_FALSE(config.ok()) << c.eos;
    EXPECT_THAT(Message(config.status()),
                AllOf(HasSubstr(gen), HasSubstr("eos_token_id"), HasSubstr(c.value)))
        << c.eos;
  }
  TempDir dir;
  dir.Write("config.json", Config(R"(,"eos_token_id":2)"));
  dir.Write("generation_config.json", R"({"eos_token_id": [2, 9]})");
  auto config = LoadModelConfig(dir.path());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->eos_token_ids, std::vector<int>({2, 9}));
}

TEST(ModelFilesTest, TokenizerGenerationConfigIdsAreChecked) {
  struct Case {
    std::string eos, value;
  } cases[] = {
      {"4294967296", "4294967296"},
      {"18446744073709551615", "18446744073709551615"},  // not wrapped to -1
      {"[-5]", "-5"},
      {"[0, 100000]", "100000"},  // past this vocabulary
  };
  for (const Case& c : cases) {
    TempDir dir;
    dir.CopyFrom(FixturePath("tokenizers/gpt2_bpe"));
    const std::string gen =
        dir.Write("generation_config.json", "{\"eos_token_id\": " + c.eos + "}");
    auto tokenizer = LoadTokenizer(dir.path());
    ASSERT_FALSE(tokenizer.ok()) << c.eos;
    EXPECT_THAT(Message(tokenizer.status()),
                AllOf(HasSubstr(gen), HasSubstr("eos_token_id"), HasSubstr(c.value)))
        << c.eos;
  }
}

TEST(ModelFilesTest, TokenizerJsonIdsAreChecked) {
  const auto base = nlohmann::json::parse(R"({
    "pre_tokenizer": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
  ASSERT_TRUE(BpeTokenizer::FromJson(base.dump(), "tokenizer.json").ok());
  struct Case {
    std::string patch, key, value;
  } cases[] = {
      {R"({"model": {"vocab": {"b": 4294967296}}})", "model.vocab", "4294967296"},
      {R"({"model": {"vocab": {"a": -1}}})", "model.vocab", "-1"},
      {R"({"model": {"vocab": {"a": 18446744073709551615}}})", "model.vocab",
       "18446744073709551615"},
      {R"({"added_tokens": [{"id": 4294967297, "content": "<x>"}]})", "added_tokens[0].id",
       "4294967297"},
      {R"({"post_processor": {"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
           "special_tokens": {"<s>": {"ids": [2147483648]}}}})",
       "post_processor.special_tokens", "2147483648"},
      {R"({"post_processor": {"type": "RobertaProcessing", "cls": ["<s>", -3],
           "sep": ["</s>", 1]}})",
       "post_processor.cls", "-3"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = base;
    j.merge_patch(nlohmann::json::parse(c.patch));
    auto tokenizer = BpeTokenizer::FromJson(j.dump(), "dir/tokenizer.json");
    ASSERT_FALSE(tokenizer.ok()) << j.dump();
    EXPECT_THAT(Message(tokenizer.status()),
                AllOf(HasSubstr("dir/tokenizer.json"), HasSubstr(c.key), HasSubstr(c.value)))
        << j.dump();
  }
}

TEST(ModelFilesTest, TokenizerJsonSplitOnALiteralStringLoads) {
  // {"String": ...} patterns are literal: "." splits on dots only. (PCRE2
  // refused the literal option together with Unicode properties, so every
  // such tokenizer.json failed to load.)
  auto tokenizer = BpeTokenizer::FromJson(R"({
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"String": "."}, "behavior": "Isolated"},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, ".": 2, "ab": 3}, "merges": ["a b"]}})",
                                          "tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto ids = (*tokenizer)->Encode("ab.ab", /*add_special_tokens=*/false);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, std::vector<int32_t>({3, 2, 3}));
}

}  // namespace
}  // namespace strata::engine

// Access to libsentencepiece through a separately loaded shim library.
//
// Debian's libsentencepiece exports its own bundled copy of protobuf-lite.
// Linked into a process that also uses libprotobuf (gRPC, our protos), the
// two copies' symbols interpose and the process crashes while registering
// its protobuf descriptors. So strata never links libsentencepiece into a
// binary: engine/sentencepiece_shim/ wraps it in a small shared library that
// is dlopen'ed with RTLD_LOCAL | RTLD_DEEPBIND on first use, keeping
// sentencepiece and its protobuf copy out of the global symbol scope.
//
// SentencePieceProcessor below is the narrow interface the shim implements
// (just what SentencePieceTokenizer needs). Both sides are built by the same
// compiler and standard library, so std types may cross it.
//
// Lookup order for the shim: $STRATA_SENTENCEPIECE_SHIM; next to the running
// executable; ../lib beside it; the build tree it was compiled in; the
// dynamic loader's search path (LD_LIBRARY_PATH).
//
// Thread-safety: LoadSentencePieceProcessor is thread-safe; a processor's
// const methods may be called concurrently.
#ifndef STRATA_ENGINE_SENTENCEPIECE_LIBRARY_H_
#define STRATA_ENGINE_SENTENCEPIECE_LIBRARY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata::engine {

class SentencePieceProcessor {
 public:
  virtual ~SentencePieceProcessor() = default;
  // Loads a serialized ModelProto; false with *error set when it is invalid.
  virtual bool Load(const std::string& model_proto, std::string* error) = 0;
  virtual int GetPieceSize() const = 0;
  virtual std::string IdToPiece(int id) const = 0;
  virtual int PieceToId(const std::string& piece) const = 0;
  virtual bool IsControl(int id) const = 0;
  virtual bool IsUnknown(int id) const = 0;
  virtual bool IsByte(int id) const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  virtual bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const = 0;
  virtual bool Decode(const std::vector<int>& ids, std::string* text, std::string* error) const = 0;
};

// Creates a processor from the shim (loading the shim on first use).
// FailedPrecondition naming the paths tried when the shim cannot be loaded.
absl::StatusOr<std::unique_ptr<SentencePieceProcessor>> CreateSentencePieceProcessor();

}  // namespace strata::engine

// The one symbol the shim exports.
extern "C" strata::engine::SentencePieceProcessor* StrataCreateSentencePieceProcessor();

#endif  // STRATA_ENGINE_SENTENCEPIECE_LIBRARY_H_

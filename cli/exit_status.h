// How every strata subcommand reports a failed Status: the message on
// stderr, prefixed with the command, and an exit code scripts can tell
// apart: 2 for bad input (InvalidArgument), 1 for everything else.
#ifndef STRATA_CLI_EXIT_STATUS_H_
#define STRATA_CLI_EXIT_STATUS_H_

#include <cstdio>
#include <string>

#include "absl/status/status.h"

namespace strata::cli {

inline int ExitWithError(const char* command, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", command, std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace strata::cli

#endif  // STRATA_CLI_EXIT_STATUS_H_

#ifndef STEP_RUNNER_BASE_STATUS_MACROS_H_
#define STEP_RUNNER_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Same semantics as ABSL_RETURN_IF_ERROR / ABSL_ASSIGN_OR_RETURN, which abseil 20220623 lacks,
// so a later abseil upgrade is a sed.
#define SR_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    if (absl::Status sr_status_ = (expr); !sr_status_.ok()) \
      return sr_status_;                         \
  } while (0)

#define SR_CONCAT_INNER_(a, b) a##b
#define SR_CONCAT_(a, b) SR_CONCAT_INNER_(a, b)

#define SR_ASSIGN_OR_RETURN(lhs, expr) \
  SR_ASSIGN_OR_RETURN_IMPL_(SR_CONCAT_(sr_statusor_, __LINE__), lhs, expr)

#define SR_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                              \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // STEP_RUNNER_BASE_STATUS_MACROS_H_

// Constants shared with the Python side (sam_fused/constants.py);
// tests/test_plan.py::test_constants_match_the_native_header checks that both say the same.
#pragma once

#include <cstdint>

namespace sam_fused {

constexpr int64_t kOptRestore = 0;  // OPT_RESTORE
constexpr int64_t kOptSgd = 1;      // OPT_SGD
constexpr int64_t kOptAdam = 2;     // OPT_ADAM
constexpr float kNormEps = 1e-12f;  // NORM_EPS
constexpr int64_t kCudaChunk = 65536;  // CHUNK
constexpr int kUpdateScalars = 13;     // len(UPDATE_SCALARS)

}  // namespace sam_fused

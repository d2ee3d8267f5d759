// A branch-free float exp that compilers vectorise inside `#pragma omp simd` loops.
//
// exp(x) = 2^k · e^r with k = round(x / ln 2) and r = x − k ln 2 (ln 2 split in two parts, Cody-Waite),
// e^r by its degree-7 Taylor polynomial on |r| ≤ ln2/2 (truncation error < 6e-9, under 0.1 ulp).
// Rounding uses the 1.5·2^23 trick so that no libm call blocks vectorisation. exp(−∞) = 0, NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace dora {

inline float vec_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23
  constexpr float kLow = -87.3f;         // below: the result is under the smallest normal float
  constexpr float kHigh = 88.7f;         // above: overflow
  // Comparisons are false for NaN, so a NaN x keeps flowing into r and the polynomial.
  const float xc = x > kLow ? (x < kHigh ? x : kHigh) : kLow;
  const float k = (xc * kLog2e + kRound) - kRound;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < kLow ? 0.0f : (x > kHigh ? static_cast<float>(INFINITY) : y);
}

}  // namespace dora

// vec_math.h -- branch-free float exp / log1p for the CPU kernel, written so that GCC and Clang
// vectorise the loops that call them (glibc's expf / log1pf are opaque calls and keep a loop
// scalar: measured ~6 ns per call here versus ~1 ns per element vectorised with AVX2).
//
// Accuracy (checked against the C library in double by tests/cpp/test_amid_cpp.cpp over the
// ranges the kernel uses): exp within 2 ulp for x >= -87.3 and exactly 0 below
// (no denormal results), for x <= 88.7; log1p within 2.5 ulp for y > -1. Double precision keeps the C library.
//
// The translation unit that includes this is compiled with -fno-trapping-math (so selects can be
// if-converted) and -fopenmp-simd (so `#pragma omp simd reduction` works); no -ffast-math: inf
// and NaN keep their IEEE meaning.
#pragma once

#include <cmath>
#include <cstdint>

#include "../amid_math.h"

namespace amid {

struct VecMath {
  static constexpr bool kBounded = false;  // (amid_math.h: LibMath::kBounded; the CPU keeps every guard)
  static constexpr bool kWideWeights = false;  // (amid_math.h: WideWeights; the CPU keeps the log1p series)
  static constexpr bool kNearGaps = false;  // (amid_math.h: NearGaps; the CPU keeps the far-gap form)
  // exp(x): x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial (truncation
  // < 6e-9 relative), 2^n assembled in the exponent bits. -inf and x < -87.3 give 0; NaN gives NaN.
  static AMID_HD float exp(float x) {
    constexpr float kLo = -87.33654f, kHi = 88.72283f;
    const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;  // Cody-Waite
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float scale = bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
    const float y = p * scale;
    return x < kLo ? 0.0f : (x == x ? y : x);
  }

  // log(u) for normal u > 0: u = m 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), and the
  // classic fdlibm/musl logf kernel: s = f/(2+f), log(1+f) = f - hfsq + s (hfsq + R(s^2)).
  static AMID_HD float log_pos(float u) {
    const int32_t bits = bit_cast<int32_t>(u);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    float m = bit_cast<float>((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
    const bool big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1 : e;
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s, w = z * z;
    const float R = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
    const float hfsq = 0.5f * f * f;
    const float dk = static_cast<float>(e);
    return s * (hfsq + R) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
  }

  // log1p(y) for y > -1 with full relative accuracy for small |y| (Goldberg: log(u) * y / (u - 1)
  // with u = 1 + y rounded, which cancels the rounding of u). u = 0 (y = -1) gives -inf.
  static AMID_HD float log1p(float y) {
    const float u = 1.0f + y;
    const float d = u - 1.0f;
    const bool sub = u < 1.17549435e-38f;  // subnormal u: scale by 2^24 first
    const float lu = log_pos(sub ? u * 16777216.0f : u) - (sub ? 16.6355323334f : 0.0f);
    const float res = d == 0.0f ? y : lu * (y / d);
    return u > 0.0f ? res : -std::numeric_limits<float>::infinity();
  }

  // log(u) for u >= 0 (subnormal u scaled by 2^24 first; 0 gives -inf).
  static AMID_HD float log(float u) {
    const bool sub = u < 1.17549435e-38f;
    const float lu = log_pos(sub ? u * 16777216.0f : u) - (sub ? 16.6355323334f : 0.0f);
    return u > 0.0f ? lu : -std::numeric_limits<float>::infinity();
  }

  static AMID_HD float log_mix(float s) { return log(s); }  // (LibMath::log_mix; s is normal)
  static AMID_HD float rcp(float x) { return 1.0f / x; }
  static AMID_HD float rcp_approx(float x) { return 1.0f / x; }
  static AMID_HD float exp_approx(float x) { return exp(x); }
  static AMID_HD float expm1_small(float x) { return LibMath::expm1_small(x); }
  static AMID_HD float expm1_from_exp(float x, float e) { return LibMath::expm1_from_exp(x, e); }
  static AMID_HD float expm1_from_exp_abs(float x, float nax, float e) { return LibMath::expm1_from_exp_abs(x, nax, e); }
  static AMID_HD float expm1_div(float x) { return LibMath::expm1_div(x); }

  static AMID_HD double exp(double x) { return std::exp(x); }
  static AMID_HD double exp_approx(double x) { return std::exp(x); }
  // 2^y (amid_math.h: LibMath::exp2_approx), as exp of y ln 2 (one more rounding of the argument, |y| 2^-24)
  static AMID_HD float exp2_approx(float y) { return exp(y * 0.693147180559945309f); }
  static AMID_HD double exp2_approx(double y) { return std::exp2(y); }
  static AMID_HD double log1p(double x) { return std::log1p(x); }
  static AMID_HD double log(double x) { return std::log(x); }
  static AMID_HD double log_sel(bool use_log1p, double y, double s) { return LibMath::log_sel(use_log1p, y, s); }
  static AMID_HD double rcp(double x) { return 1.0 / x; }
  static AMID_HD double rcp_approx(double x) { return 1.0 / x; }
  static AMID_HD double expm1_small(double x) { return LibMath::expm1_small(x); }
  static AMID_HD double expm1_from_exp(double x, double e) { return LibMath::expm1_from_exp(x, e); }
  static AMID_HD double expm1_from_exp_abs(double x, double nax, double e) { return LibMath::expm1_from_exp_abs(x, nax, e); }
  static AMID_HD double expm1_div(double x) { return LibMath::expm1_div(x); }
};

}  // namespace amid

// checks.h -- input validation and option parsing shared by the CPU and CUDA host wrappers, so
// that every backend fails with identical messages. amid/ops.py repeats these messages in the fake
// (meta) kernels; tests/test_errors.py pins them.
//
// Message style: "amid::<op>: expected <what>, but got <what came>".
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "amid_math.h"

namespace amid {

// The smallest alpha-beta exponent accepted (1/a, 1/b and 1/(ab) stay finite in float32 math).
constexpr double kMinAbExponent = 1e-30;

// A macro's value as a string literal (build macros such as AMID_TORCH_VERSION, AMID_CPU_TARGET).
#define AMID_STR2(...) #__VA_ARGS__
#define AMID_STR(...) AMID_STR2(__VA_ARGS__)

#define AMID_CHECK(cond, op, ...) TORCH_CHECK((cond), "amid::", op, ": ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& x) {
  std::string s = "[";
  for (int64_t i = 0; i < x.dim(); ++i) {
    s += (i ? ", " : "") + std::to_string(x.size(i));
  }
  return s + "]";
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype of the loss, of the statistics and of row weights / grad_loss: float64 for float64
// logits (so gradcheck works), float32 otherwise.
inline at::ScalarType loss_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

// student_logits / teacher_logits: same 2-D shape [N, V], same dtype and device, unit stride along
// V (any row stride).
inline void check_logits_pair(const char* op, const at::Tensor& s, const at::Tensor& t) {
  AMID_CHECK(s.dim() == 2, op, "expected student_logits to be 2-D [N, V], but got a ", s.dim(),
             "-D tensor of shape ", shape_str(s));
  AMID_CHECK(t.dim() == 2, op, "expected teacher_logits to be 2-D [N, V], but got a ", t.dim(),
             "-D tensor of shape ", shape_str(t));
  AMID_CHECK(s.sizes() == t.sizes(), op,
             "expected student_logits and teacher_logits to have the same shape, but got ",
             shape_str(s), " and ", shape_str(t));
  AMID_CHECK(s.size(1) >= 1, op,
             "expected a vocabulary of at least 1 entry, but got student_logits of shape ",
             shape_str(s));
  AMID_CHECK(s.scalar_type() == t.scalar_type(), op,
             "expected student_logits and teacher_logits to have the same dtype, but got ",
             s.scalar_type(), " and ", t.scalar_type());
  AMID_CHECK(is_supported_dtype(s.scalar_type()), op,
             "expected student_logits of dtype float16, bfloat16, float32 or float64, but got ",
             s.scalar_type());
  AMID_CHECK(s.device() == t.device(), op,
             "expected student_logits and teacher_logits on the same device, but got ", s.device(),
             " and ", t.device());
  AMID_CHECK(s.size(1) <= 1 || s.numel() == 0 || s.stride(1) == 1, op,
             "expected student_logits to have stride 1 in the last dimension, but got stride ",
             s.stride(1));
  AMID_CHECK(t.size(1) <= 1 || t.numel() == 0 || t.stride(1) == 1, op,
             "expected teacher_logits to have stride 1 in the last dimension, but got stride ",
             t.stride(1));
}

// A per-row vector ([N], loss dtype, same device as the logits): row_weight, grad_loss.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& x,
                             const at::Tensor& logits) {
  const auto want = loss_dtype(logits.scalar_type());
  AMID_CHECK(x.dim() == 1 && x.size(0) == logits.size(0), op, "expected ", name, " of shape [",
             logits.size(0), "], but got ", shape_str(x));
  AMID_CHECK(x.scalar_type() == want, op, "expected ", name, " of dtype ", want, ", but got ",
             x.scalar_type());
  AMID_CHECK(x.device() == logits.device(), op, "expected ", name, " on device ", logits.device(),
             ", but got ", x.device());
}

inline void check_stats(const char* op, const at::Tensor& stats, const at::Tensor& logits) {
  const auto want = loss_dtype(logits.scalar_type());
  AMID_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == kNumStats, op,
             "expected stats of shape [", logits.size(0), ", ", kNumStats, "], but got ",
             shape_str(stats));
  AMID_CHECK(stats.scalar_type() == want, op, "expected stats of dtype ", want, ", but got ",
             stats.scalar_type());
  AMID_CHECK(stats.device() == logits.device(), op, "expected stats on device ", logits.device(),
             ", but got ", stats.device());
}

// The tensor arguments of each op, checked in the same order by every backend.
inline void check_fwd_args(const char* op, const at::Tensor& s, const at::Tensor& t,
                           const std::optional<at::Tensor>& row_weight) {
  check_logits_pair(op, s, t);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, s);
}

inline void check_bwd_args(const char* op, const at::Tensor& grad_loss, const at::Tensor& s,
                           const at::Tensor& t, const std::optional<at::Tensor>& row_weight,
                           const at::Tensor& stats) {
  check_logits_pair(op, s, t);
  check_row_vector(op, "grad_loss", grad_loss, s);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, s);
  check_stats(op, stats, s);
}

inline void check_scale_grad_args(const char* op, const at::Tensor& grad, const at::Tensor& grad_loss) {
  AMID_CHECK(grad.dim() == 2 && grad.is_contiguous(), op,
             "expected grad to be a contiguous 2-D [N, V] tensor, but got shape ", shape_str(grad));
  AMID_CHECK(is_supported_dtype(grad.scalar_type()), op,
             "expected grad of dtype float16, bfloat16, float32 or float64, but got ", grad.scalar_type());
  check_row_vector(op, "grad_loss", grad_loss, grad);
}

inline Divergence parse_divergence(const char* op, const std::string& d) {
  if (d == "kl") return Divergence::kKL;
  if (d == "ab") return Divergence::kAB;
  AMID_CHECK(false, op, "expected divergence to be one of 'kl', 'ab', but got '", d, "'");
  return Divergence::kKL;
}

inline Order parse_order(const char* op, const std::string& o) {
  if (o == "pr") return Order::kPR;
  if (o == "qr") return Order::kQR;
  if (o == "rp") return Order::kRP;
  if (o == "rq") return Order::kRQ;
  if (o == "jsd") return Order::kJSD;
  AMID_CHECK(false, op, "expected order to be one of 'pr', 'qr', 'rp', 'rq', 'jsd', but got '", o, "'");
  return Order::kPR;
}

// Chebyshev economization: the polynomial sum_{n<N} a[n] v^n on |v| <= h as one of degree M - 1 (out[0..M)),
// dropping its Chebyshev terms of degree >= M; returns their sum of magnitudes, a bound on the change.
template <int N, int M>
double economize(const double (&a)[N], double h, double (&out)[M]) {
  double mono[N], cheb[N] = {0.0};
  double hp = 1.0;
  for (int n = 0; n < N; ++n, hp *= h) mono[n] = a[n] * hp;  // in t = v / h, |t| <= 1
  // t^n = 2^(1-n) sum_{k <= n/2} C(n, k) T_{n-2k} (the k = n/2 term halved)
  for (int n = 0; n < N; ++n) {
    double binom = 1.0, scale = std::ldexp(1.0, 1 - n);
    for (int k = 0; 2 * k <= n; ++k) {
      cheb[n - 2 * k] += mono[n] * scale * binom * (2 * k == n ? 0.5 : 1.0);
      binom = binom * (n - k) / (k + 1);
    }
  }
  double dropped = 0.0;
  for (int j = M; j < N; ++j) dropped += std::abs(cheb[j]);
  // back to monomials: T_0 = 1, T_1 = t, T_{j+1} = 2 t T_j - T_{j-1}
  double Tm[M][M] = {{0.0}};
  Tm[0][0] = 1.0;
  if (M > 1) Tm[1][1] = 1.0;
  for (int j = 1; j + 1 < M; ++j) {
    for (int i = 0; i < M; ++i) Tm[j + 1][i] = (i > 0 ? 2.0 * Tm[j][i - 1] : 0.0) - Tm[j - 1][i];
  }
  hp = 1.0;
  for (int i = 0; i < M; ++i, hp *= h) {
    double c = 0.0;
    for (int j = 0; j < M; ++j) c += cheb[j] * Tm[j][i];
    out[i] = c / hp;
  }
  return dropped;
}

// Float's coefficients of the alpha-beta series (LossParams::ab_phi_cd; in v, for |g v| <= 1/2), by economize
// in u = g v, where phi / (c d) has the coefficients s_k = sum_{j<=k} rho^j / (k+2)! (rho = c / g < 1: no
// cancellation, and nothing overflows for exponents down to 1e-30, where g^k in v's coefficients would scale
// the interval to 1e29); then ab_phi_cd[k] = e_k g^k. The economization is below 8.0e-9 relative on the
// interval (tests/cpp: test_float_series).
inline void ab_series_float(double c, double g, double (&phi_cd)[kAbPhiTermsFloat]) {
  const double rho = c / g;
  double s[kAbPhiTerms], geo = 0.0, rp = 1.0, fact = 1.0;
  for (int k = 0; k < kAbPhiTerms; ++k) {
    geo += rp;
    rp *= rho;
    fact *= k + 2;
    s[k] = geo / fact;
  }
  double e[kAbPhiTermsFloat];
  economize(s, 0.5, e);
  double gk = 1.0;
  for (int k = 0; k < kAbPhiTermsFloat; ++k, gk *= g) phi_cd[k] = e[k] * gk;
}

// Validates the loss options and folds them into the kernels' parameter block.
template <typename T>
LossParams<T> make_params(const char* op, double alpha, double lam, const std::string& divergence,
                          const std::string& order, double ab_alpha, double ab_beta,
                          double temperature, bool detach_assistant) {
  AMID_CHECK(std::isfinite(alpha), op, "expected a finite alpha, but got ", alpha);
  AMID_CHECK(lam >= 0.0 && lam <= 1.0, op, "expected lam in [0, 1], but got ", lam);
  AMID_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
             "expected temperature > 0, but got ", temperature);
  // The kernels multiply by 1/T in the math dtype: it must be finite there.
  AMID_CHECK(1.0 / temperature <= double(std::numeric_limits<T>::max()), op,
             "expected temperature >= ", 1.0 / double(std::numeric_limits<T>::max()), " (its inverse must be finite in ",
             std::is_same<T, double>::value ? "float64" : "float32", " math), but got ", temperature);
  LossParams<T> P;
  P.divergence = parse_divergence(op, divergence);
  P.order = parse_order(op, order);
  if (P.divergence == Divergence::kAB) {
    AMID_CHECK(std::isfinite(ab_alpha) && ab_alpha > 0.0, op,
               "expected ab_alpha > 0 for the alpha-beta divergence, but got ", ab_alpha);
    AMID_CHECK(std::isfinite(ab_beta) && ab_beta > 0.0, op,
               "expected ab_beta > 0 for the alpha-beta divergence, but got ", ab_beta);
    // 1/a and 1/b must be finite in float32 math (the limits a, b -> 0 are not implemented).
    AMID_CHECK(ab_alpha >= kMinAbExponent, op, "expected ab_alpha >= ", kMinAbExponent,
               " for the alpha-beta divergence, but got ", ab_alpha);
    AMID_CHECK(ab_beta >= kMinAbExponent, op, "expected ab_beta >= ", kMinAbExponent,
               " for the alpha-beta divergence, but got ", ab_beta);
  }
  AMID_CHECK(!detach_assistant || P.order != Order::kJSD, op,
             "expected detach_assistant=False with order 'jsd' (a detached assistant is supported for 'qr' "
             "and 'rq' only), but got detach_assistant=True");
  AMID_CHECK(!detach_assistant || P.order == Order::kQR || P.order == Order::kRQ, op,
             "expected order 'qr' or 'rq' with detach_assistant=True (in '", order,
             "' the student enters only through the assistant, so detaching it leaves no "
             "gradient), but got order '", order, "'");
  P.detach = detach_assistant;
  P.lam = T(lam);
  P.one_minus_lam = T(1.0 - lam);
  P.log_lam = T(std::log(lam));
  P.log_1m_lam = T(std::log1p(-lam));
  P.log_odds = T(std::log1p(-lam) - std::log(lam));
  P.lam_ratio = T(lam / (1.0 - lam));
  P.lam_tiny = std::min(lam, 1.0 - lam) < 16.0 * double(std::numeric_limits<T>::min()) || lam < 0x1p-60;
  const double k = 0.5 * (1.0 - alpha);
  P.k = T(k);
  P.inv_k = k != 0.0 ? T(1.0 / k) : T(0);
  P.pow_n = (k == 1.0 || k == 0.5 || k == 0.25 || k == 0.125) ? int(1.0 / k) : 0;
  P.k_log2e = T(k * kLog2e);
  P.log2_lam = T(std::log(lam) * kLog2e);
  P.log2_1m_lam = T(std::log1p(-lam) * kLog2e);
  P.c_non[0] = k != 0.0 ? T(std::log1p(-lam) / k) : T(0);
  P.c_non[1] = k != 0.0 ? T(std::log(lam) / k) : T(0);
  // The power mean's series (LossParams::mix_h): E(y) = 1 + lam' (e^y - 1) = sum e_n y^n, log E = lam' sum
  // h_n y^n from (log E)' E = E', n h_n = n / n! - sum_{0<j<n} j h_j lam' / (n-j)! (lam' factored out, so
  // that no cancellation depends on its size). Its singularity is at |y| >= pi, so kMixTaylor terms are exact
  // in double for |y| < 1/2; economize takes them to kMixTerms on that interval (1.3e-7 relative at most over
  // lam' in (0, 1], ~2 float ulp; tests/cpp: test_mix_economized), then scaled by lam' / k.
  for (int i = 0; i < 2; ++i) {
    const double lw = i == 0 ? 1.0 - lam : lam;
    double h[kMixTaylor + 1] = {0.0}, fact[kMixTaylor + 1] = {1.0};
    for (int n = 1; n <= kMixTaylor; ++n) fact[n] = fact[n - 1] * n;
    for (int n = 1; n <= kMixTaylor; ++n) {
      double acc = n / fact[n];
      for (int j = 1; j < n; ++j) acc -= j * h[j] * lw / fact[n - j];
      h[n] = acc / n;
    }
    double taylor[kMixTaylor], econ[kMixTerms];
    for (int n = 0; n < kMixTaylor; ++n) taylor[n] = h[n + 1];
    economize(taylor, 0.5, econ);
    double ln2_pow = kLn2;  // ln(2)^(n+1)
    for (int n = 0; n < kMixTerms; ++n, ln2_pow *= kLn2) {
      P.mix_h[i][n] = T(k != 0.0 ? econ[n] * (lw / k) : 0.0);
      P.mix_h2[i][n] = T(k != 0.0 ? econ[n] * (lw / k) * ln2_pow : 0.0);
    }
  }
  P.ln2_inv_k = k != 0.0 ? T(kLn2 / k) : T(0);
  if (lam == 0.0) {
    P.mode = MixMode::kStudent;
  } else if (lam == 1.0) {
    P.mode = MixMode::kTeacher;
  } else if (alpha == 1.0) {
    P.mode = MixMode::kGeometric;
  } else {
    P.mode = MixMode::kPower;
  }
  P.ab_a = T(ab_alpha);
  P.ab_b = T(ab_beta);
  P.ab_g = T(ab_alpha + ab_beta);
  P.ab_a_over_g = T(ab_alpha / (ab_alpha + ab_beta));
  P.ab_b_over_g = T(ab_beta / (ab_alpha + ab_beta));
  P.inv_ab = T(1.0 / (ab_alpha * ab_beta));
  P.inv_a = T(1.0 / ab_alpha);
  P.inv_b = T(1.0 / ab_beta);
  const bool x_r = P.order == Order::kPR || P.order == Order::kQR || P.order == Order::kJSD;
  const double c = x_r ? ab_beta : ab_alpha, g = ab_alpha + ab_beta;
  P.ab_c = T(c);
  // The element terms' form (ab_terms_pow): the other exponent dd = g - c, exact, and the series of
  // phi / (c dd) for |g v| < 1/2: in double its 18 Taylor coefficients sum_{j<n-1} c^j g^(n-2-j) / n!, summed
  // without cancellation; in float their Chebyshev economization on that interval (ab_series_float).
  const double dd = x_r ? ab_alpha : ab_beta;
  P.ab_d = T(dd);
  P.inv_c = T(1.0 / c);
  P.inv_d = T(1.0 / dd);
  P.inv_g = T(1.0 / g);
  const bool gd_series = T(c) > T(dd);  // (as ab_terms_one_series compares them: rounded)
  P.ab_e_s = T(gd_series ? dd : c);
  P.inv_e_s = T(gd_series ? 1.0 / dd : 1.0 / c);
  P.ab_pcd_k = T(gd_series ? -1.0 / c : 1.0 / dd);
  P.ab_other_g = T(gd_series ? g : -g);
  P.ab_g_log2e = T(g * kLog2e);
  P.ab_c_log2e = T(c * kLog2e);
  P.ab_d_log2e = T(dd * kLog2e);
  P.ab_shift_limit = T(std::min(60.0, -std::log(ab_alpha * ab_beta)));
  if constexpr (std::is_same<T, float>::value) {
    double e_cd[kAbPhiTermsFloat];
    ab_series_float(c, g, e_cd);
    for (int n = 0; n < kAbPhiTerms; ++n) P.ab_phi_cd[n] = n < kAbPhiTermsFloat ? T(e_cd[n]) : T(0);
  } else {
    double S = 1.0, cpow = 1.0, nfact = 2.0;  // S_n = sum_{j<n-1} c^j g^(n-2-j), S_2 = 1
    for (int n = 2; n < 2 + kAbPhiTerms; ++n) {
      P.ab_phi_cd[n - 2] = T(S / nfact);
      cpow *= c;
      S = g * S + cpow;
      nfact *= n + 1;
    }
  }
  P.inv_temperature = T(1.0 / temperature);
  return P;
}

// ------------------------------------------------------------------------------------------------
// The sparse-teacher ops (amid_loss_topk_fwd / _bwd; docs/topk.md), shared by the CPU kernel and
// csrc/cuda/amid_topk_cuda.cu.

enum class TopkTail { kRenorm, kBucket };

inline TopkTail parse_tail(const char* op, std::string_view tail) {
  if (tail == "renorm") return TopkTail::kRenorm;
  if (tail == "bucket") return TopkTail::kBucket;
  AMID_CHECK(false, op, "expected tail to be one of 'renorm', 'bucket', but got '", std::string(tail), "'");
  return TopkTail::kRenorm;
}

// The tensor arguments of the topk ops, checked in this order (amid/ops.py repeats the messages).
inline void check_topk_args(const char* op, const at::Tensor& s, const at::Tensor& lp, const at::Tensor& idx,
                            const std::optional<at::Tensor>& tail_logmass,
                            const std::optional<at::Tensor>& row_weight, TopkTail tail, double temperature) {
  AMID_CHECK(s.dim() == 2, op, "expected student_logits to be 2-D [N, V], but got a ", s.dim(),
             "-D tensor of shape ", shape_str(s));
  AMID_CHECK(s.size(1) >= 1, op, "expected a vocabulary of at least 1 entry, but got student_logits of shape ",
             shape_str(s));
  AMID_CHECK(is_supported_dtype(s.scalar_type()), op,
             "expected student_logits of dtype float16, bfloat16, float32 or float64, but got ", s.scalar_type());
  AMID_CHECK(s.size(1) <= 1 || s.numel() == 0 || s.stride(1) == 1, op,
             "expected student_logits to have stride 1 in the last dimension, but got stride ", s.stride(1));
  const int64_t N = s.size(0), V = s.size(1);
  AMID_CHECK(lp.dim() == 2 && lp.size(0) == N && lp.size(1) >= 1 && lp.size(1) <= V, op,
             "expected teacher_logprobs of shape [N, k] with N = ", N, " and 1 <= k <= V = ", V, ", but got ",
             shape_str(lp));
  const auto want = loss_dtype(s.scalar_type());
  AMID_CHECK(lp.scalar_type() == want, op, "expected teacher_logprobs of dtype ", want, ", but got ",
             lp.scalar_type());
  AMID_CHECK(lp.device() == s.device(), op, "expected teacher_logprobs on device ", s.device(), ", but got ",
             lp.device());
  AMID_CHECK(idx.sizes() == lp.sizes(), op, "expected teacher_indices of shape ", shape_str(lp), ", but got ",
             shape_str(idx));
  AMID_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
             "expected teacher_indices of dtype Int or Long, but got ", idx.scalar_type());
  AMID_CHECK(idx.device() == s.device(), op, "expected teacher_indices on device ", s.device(), ", but got ",
             idx.device());
  if (tail_logmass) {
    AMID_CHECK(tail == TopkTail::kBucket, op,
               "expected teacher_tail_logmass only with tail 'bucket', but got it with tail 'renorm'");
    check_row_vector(op, "teacher_tail_logmass", *tail_logmass, s);
  }
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, s);
  AMID_CHECK(tail != TopkTail::kBucket || temperature == 1.0, op,
             "expected temperature 1 with tail 'bucket' (the teacher's tail mass at another temperature is not "
             "determined by its top-k log-probabilities), but got ", temperature);
}

// One row's teacher indices (host values): the first out-of-range or repeated index raises the same
// error as the CPU kernel's per-row check (the CUDA host wrapper calls it on the row its kernel flagged).
inline void check_topk_row_indices(const char* op, const int64_t* idx, int64_t k, int64_t V, int64_t row) {
  std::vector<bool> seen(size_t(V), false);
  for (int64_t b = 0; b < k; ++b) {
    const int64_t i = idx[b];
    const bool in_range = i >= 0 && i < V;
    AMID_CHECK(in_range, op, "expected teacher_indices in [0, V) with V = ", V, ", but got ", i, " in row ", row);
    AMID_CHECK(!seen[size_t(i)], op, "expected distinct teacher_indices in each row, but row ", row,
               " repeats index ", i);
    seen[size_t(i)] = true;
  }
}

}  // namespace amid

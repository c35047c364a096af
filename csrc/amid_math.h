// amid_math.h -- the per-element and per-row math of the AMiD loss, shared by the CPU and CUDA
// kernels so that both backends compute exactly the same formulas (one place for the math).
//
// Notation (see ../shared/docs/amid-math.md, the spec): for one row with temperature-scaled logits
// t (teacher) and s (student), A = LSE(t), B = LSE(s), lp = t - A, lq = s - B, p = e^lp, q = e^lq.
// The assistant is the alpha-mixture  r~ = (lam p^k + (1-lam) q^k)^(1/k),  k = (1-alpha)/2
// (geometric p^lam q^(1-lam) at alpha = 1), lt = log r~, Z = LSE(lt), lr = lt - Z, r = e^lr, and
// w = d lt / d lq. A loss F(lr, lq) has, with G = dF/dlr and H = dF/dlq (explicit part),
//
//     dF/ds_j = w_j (G_j - r_j S_G) + H_j - q_j K,      K = S_Gw - Wbar S_G + S_H,
//     S_G = sum G,  S_Gw = sum G w,  S_H = sum H,  Wbar = sum r w                    (spec §4.1)
//
// and with the assistant detached (TAID) only the explicit part remains: H_j - q_j S_H.
//
// The element functions are templates on
//   * a math policy `M` providing exp / log1p / expm1 (LibMath below: the C/CUDA math library; the
//     CPU kernel passes a vectorisable polynomial policy for float, see cpu/vec_math.h), and
//   * the divergence and order as compile-time constants, so a kernel's inner loop has no switch.
// Everything is branch-free (selects), so CPU loops vectorise and GPU warps do not diverge. No
// fast-math: the loss is user-visible.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AMID_HD __host__ __device__ __forceinline__
#else
#define AMID_HD inline
#endif

namespace amid {

// Divergence and order codes, parsed once on the host from the schema's strings.
enum class Divergence : int { kKL = 0, kAB = 1 };
enum class Order : int { kPR = 0, kQR = 1, kRP = 2, kRQ = 3 };

// How lt = log r~ is formed; chosen on the host from (alpha, lam) so the kernels never branch on
// floating-point parameter values per element.
enum class MixMode : int {
  kStudent = 0,    // lam == 0: r~ = q for every alpha
  kTeacher = 1,    // lam == 1: r~ = p for every alpha
  kGeometric = 2,  // alpha == 1: lt = lam lp + (1-lam) lq, w = 1-lam
  kPower = 3,      // alpha != 1, 0 < lam < 1: the power mean, stable expm1/log1p form
};

// Number of per-row statistics the forward op returns and the backward op consumes:
// [A, B, Z, S_G, K] (log-sum-exps of the scaled teacher/student logits and of lt, and the two
// row scalars of the gradient). Keep in sync with amid/ops.py (NUM_STATS).
constexpr int kNumStats = 5;

template <typename T>
struct LossParams {
  MixMode mode;
  Divergence divergence;
  Order order;
  bool detach;      // gradient does not flow through the student inside r (qr / rq only)
  T lam, one_minus_lam;
  T k, inv_k;       // k = (1 - alpha) / 2, used by kPower only
  T ab_a, ab_b;     // alpha-beta divergence exponents (a on the first argument)
  T ab_g, ab_a_over_g, ab_b_over_g, inv_ab, inv_a, inv_b;  // a+b, a/(a+b), b/(a+b), 1/(ab), 1/a, 1/b
  T inv_temperature;
};

template <typename T>
AMID_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ------------------------------------------------------------------------------------------------
// Math policy: the C / CUDA math library (accurate to ~1 ulp).

struct LibMath {
  static AMID_HD float exp(float x) { return ::expf(x); }
  static AMID_HD double exp(double x) { return ::exp(x); }
  static AMID_HD float log(float x) { return ::logf(x); }
  static AMID_HD double log(double x) { return ::log(x); }
  static AMID_HD float log1p(float x) { return ::log1pf(x); }
  static AMID_HD double log1p(double x) { return ::log1p(x); }
  // expm1(x) for x <= 0, given e = exp(x) (so no second special-function call in float): e - 1 is
  // exact enough once |x| >= 1/2 (|e - 1| >= 0.39: < 2 ulp relative); below, a degree-8 Taylor
  // polynomial is accurate to < 1 ulp. This matters as alpha -> 1, where
  // lt - lq = log1p(lam expm1(k d)) / k amplifies the absolute error of expm1 by 1/k (spec §5.3).
  static AMID_HD float expm1_nonpos(float x, float e) {
    const float poly = x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 +
                       x * (1.0f / 720 + x * (1.0f / 5040 + x * (1.0f / 40320))))))));
    return x > -0.5f ? poly : e - 1.0f;
  }
  static AMID_HD double expm1_nonpos(double x, double /*e*/) { return ::expm1(x); }
};

// ------------------------------------------------------------------------------------------------
// The mixture: lt = log r~ and w = d lt / d lq for one element, from lp and lq (either may be
// -inf, never +inf or NaN: invalid rows are caught before this is called).
template <MixMode MODE, class M, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T& lt, T& w) {
  if constexpr (MODE == MixMode::kStudent) {
    lt = lq;
    w = T(1);
  } else if constexpr (MODE == MixMode::kTeacher) {
    lt = lp;
    w = T(0);
  } else if constexpr (MODE == MixMode::kGeometric) {
    // One -inf operand gives -inf (no 0 * inf: lam is in (0, 1) here).
    lt = P.lam * lp + P.one_minus_lam * lq;
    w = P.one_minus_lam;
  } else {
    // Reference the larger of p^k, q^k so the expm1 argument is <= 0 (spec §3.2), and share
    // e = exp(-|k d|) between the mixture and the weight w = sigmoid(log((1-lam)/lam) - k d).
    const T x = P.k * (lp - lq);  // NaN when both are -inf (handled by the last select)
    const bool q_ref = x <= T(0);
    const T ax = q_ref ? x : -x;  // -|x|
    const T e = M::exp(ax);
    const T em1 = M::expm1_nonpos(ax, e);
    const T lam_ref = q_ref ? P.lam : P.one_minus_lam;
    const T base = q_ref ? lq : lp;
    const T lt_ = base + M::log1p(lam_ref * em1) * P.inv_k;
    const T w_ = q_ref ? P.one_minus_lam / (P.one_minus_lam + P.lam * e)
                       : P.one_minus_lam * e / (P.one_minus_lam * e + P.lam);
    const bool both_masked = (lp == neg_inf<T>()) & (lq == neg_inf<T>());
    lt = both_masked ? neg_inf<T>() : lt_;
    w = both_masked ? T(0) : w_;
  }
}

// Runtime-mode form (for code that does not specialise on the mode).
template <class M, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T& lt, T& w) {
  switch (P.mode) {
    case MixMode::kStudent: mixture<MixMode::kStudent, M>(P, lp, lq, lt, w); return;
    case MixMode::kTeacher: mixture<MixMode::kTeacher, M>(P, lp, lq, lt, w); return;
    case MixMode::kGeometric: mixture<MixMode::kGeometric, M>(P, lp, lq, lt, w); return;
    default: mixture<MixMode::kPower, M>(P, lp, lq, lt, w); return;
  }
}

// ------------------------------------------------------------------------------------------------
// Per-element loss term l (summing to the row loss L), G = dF/dlr and H = dF/dlq, from the
// probabilities and their logs. kl uses the official masked semantics: where a logit is -inf the
// term is dropped (l = G = H = 0) while its r~ mass stays in Z. ab needs no mask: exp(-inf) = 0.
template <typename T>
struct Terms {
  T l, G, H;
};

template <Divergence D, Order O, class M, typename T>
AMID_HD Terms<T> element_terms(const LossParams<T>& P, T p, T q, T r, T lp, T lq, T lr) {
  Terms<T> o;
  if constexpr (D == Divergence::kKL) {
    const bool keep = (lp != neg_inf<T>()) & (lq != neg_inf<T>());
    // Differences are formed from finite stand-ins so masked lanes hold no inf - inf.
    const T lp0 = keep ? lp : T(0), lq0 = keep ? lq : T(0), lr0 = keep ? lr : T(0);
    T l, G, H;
    if constexpr (O == Order::kPR) {  // KL(p||r)
      l = p * (lp0 - lr0);
      G = -p;
      H = T(0);
    } else if constexpr (O == Order::kQR) {  // KL(q||r)
      const T d = lq0 - lr0;
      l = q * d;
      G = -q;
      H = q * (d + T(1));
    } else if constexpr (O == Order::kRP) {  // KL(r||p)
      const T d = lr0 - lp0;
      l = r * d;
      G = r * (d + T(1));
      H = T(0);
    } else {  // KL(r||q)
      const T d = lr0 - lq0;
      l = r * d;
      G = r * (d + T(1));
      H = -r;
    }
    o.l = keep ? l : T(0);
    o.G = keep ? G : T(0);
    o.H = keep ? H : T(0);
  } else {
    // alpha-beta divergence D(x||y) = -(1/(ab)) sum[x^a y^b - (a/g) x^g - (b/g) y^g], g = a + b;
    // dD/dlx = (x^g - x^a y^b)/b, dD/dly = (y^g - x^a y^b)/a. Powers are taken in log space.
    constexpr bool x_is_r = (O == Order::kRP || O == Order::kRQ);
    constexpr bool other_is_p = (O == Order::kPR || O == Order::kRP);
    const T lo = other_is_p ? lp : lq;  // log of the non-assistant distribution
    const T lx = x_is_r ? lr : lo, ly = x_is_r ? lo : lr;
    const T xy = M::exp(P.ab_a * lx + P.ab_b * ly);
    const T xg = M::exp(P.ab_g * lx);
    const T yg = M::exp(P.ab_g * ly);
    o.l = -(xy - P.ab_a_over_g * xg - P.ab_b_over_g * yg) * P.inv_ab;
    const T dx = (xg - xy) * P.inv_b;  // dD/dlx
    const T dy = (yg - xy) * P.inv_a;  // dD/dly
    o.G = x_is_r ? dx : dy;            // the derivative w.r.t. the assistant's log
    o.H = other_is_p ? T(0) : (x_is_r ? dy : dx);
  }
  return o;
}

// Gradient of the row loss with respect to the temperature-scaled student logits, for one element.
template <typename T>
AMID_HD T element_grad(bool detach, T w, T q, T r, const Terms<T>& o, T S_G, T K) {
  return detach ? o.H - q * K : w * (o.G - r * S_G) + o.H - q * K;
}

// The row scalar K of the gradient from the row sums; detached, only the explicit part stays.
template <typename S>
AMID_HD S row_K(bool detach, S S_G, S S_Gw, S S_H, S Wbar) {
  return detach ? S_H : S_Gw - Wbar * S_G + S_H;
}

// ------------------------------------------------------------------------------------------------
// Dispatch helpers: call f with the divergence / order / mixture mode as compile-time constants.

template <Divergence D>
using DivC = std::integral_constant<Divergence, D>;
template <Order O>
using OrderC = std::integral_constant<Order, O>;
template <MixMode MODE>
using ModeC = std::integral_constant<MixMode, MODE>;

template <typename F>
inline void dispatch_loss(Divergence d, Order o, F&& f) {
  auto with_order = [&](auto dc) {
    switch (o) {
      case Order::kPR: f(dc, OrderC<Order::kPR>{}); break;
      case Order::kQR: f(dc, OrderC<Order::kQR>{}); break;
      case Order::kRP: f(dc, OrderC<Order::kRP>{}); break;
      default: f(dc, OrderC<Order::kRQ>{}); break;
    }
  };
  if (d == Divergence::kKL) {
    with_order(DivC<Divergence::kKL>{});
  } else {
    with_order(DivC<Divergence::kAB>{});
  }
}

template <typename F>
inline void dispatch_mode(MixMode m, F&& f) {
  switch (m) {
    case MixMode::kStudent: f(ModeC<MixMode::kStudent>{}); break;
    case MixMode::kTeacher: f(ModeC<MixMode::kTeacher>{}); break;
    case MixMode::kGeometric: f(ModeC<MixMode::kGeometric>{}); break;
    default: f(ModeC<MixMode::kPower>{}); break;
  }
}

}  // namespace amid

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
// Everything here is plain arithmetic on one scalar type `T` (float for 16/32-bit inputs, double
// for float64) and compiles for host and device. No fast-math: the loss is user-visible.
#pragma once

#include <cmath>
#include <limits>

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
  T ab_a_over_g, ab_b_over_g, inv_ab, inv_a, inv_b;  // a/(a+b), b/(a+b), 1/(ab), 1/a, 1/b
  T inv_temperature;
};

template <typename T>
AMID_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ------------------------------------------------------------------------------------------------
// Elementary functions. Host code uses <cmath>; device code the CUDA math library (same names via
// overloads). Kept as thin wrappers so a kernel can swap in faster variants in one place.

AMID_HD float amid_exp(float x) { return ::expf(x); }
AMID_HD double amid_exp(double x) { return ::exp(x); }
AMID_HD float amid_log(float x) { return ::logf(x); }
AMID_HD double amid_log(double x) { return ::log(x); }
AMID_HD float amid_log1p(float x) { return ::log1pf(x); }
AMID_HD double amid_log1p(double x) { return ::log1p(x); }

// expm1(x) for x <= 0 given e = exp(x), without a second special-function call: e - 1 is exact
// enough once |x| >= 1/2 (|e - 1| >= 0.39, so the rounding of e costs < 2 ulp relative); below
// that a degree-8 Taylor polynomial is accurate to < 1 ulp in float. This matters as alpha -> 1:
// lt - lq = log1p(lam expm1(k d)) / k amplifies the absolute error of expm1 by 1/k (spec §5.3).
AMID_HD float expm1_nonpos(float x, float e) {
  if (x > -0.5f) {
    return x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 +
           x * (1.0f / 720 + x * (1.0f / 5040 + x * (1.0f / 40320))))))));
  }
  return e - 1.0f;
}
AMID_HD double expm1_nonpos(double x, double /*e*/) { return ::expm1(x); }

// ------------------------------------------------------------------------------------------------
// The mixture: lt = log r~ and w = d lt / d lq for one element, from lp and lq (either may be
// -inf, never +inf or NaN: invalid rows are caught before this is called).
template <typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T& lt, T& w) {
  switch (P.mode) {
    case MixMode::kStudent:
      lt = lq;
      w = T(1);
      return;
    case MixMode::kTeacher:
      lt = lp;
      w = T(0);
      return;
    case MixMode::kGeometric:
      // One -inf operand gives -inf (no 0 * inf: lam is in (0, 1) here).
      lt = P.lam * lp + P.one_minus_lam * lq;
      w = P.one_minus_lam;
      return;
    case MixMode::kPower:
    default: {
      if (lp == neg_inf<T>() && lq == neg_inf<T>()) {  // both masked: d = -inf - -inf is NaN
        lt = neg_inf<T>();
        w = T(0);
        return;
      }
      // Reference the larger of p^k, q^k so the expm1 argument is <= 0 (spec §3.2), and share
      // e = exp(-|k d|) between the mixture and the weight w = sigmoid(log((1-lam)/lam) - k d).
      const T x = P.k * (lp - lq);
      if (x <= T(0)) {
        const T e = amid_exp(x);
        lt = lq + amid_log1p(P.lam * expm1_nonpos(x, e)) * P.inv_k;
        w = P.one_minus_lam / (P.one_minus_lam + P.lam * e);
      } else {
        const T e = amid_exp(-x);
        lt = lp + amid_log1p(P.one_minus_lam * expm1_nonpos(-x, e)) * P.inv_k;
        w = P.one_minus_lam * e / (P.one_minus_lam * e + P.lam);
      }
      return;
    }
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

template <typename T>
AMID_HD Terms<T> element_terms(const LossParams<T>& P, T p, T q, T r, T lp, T lq, T lr) {
  Terms<T> o;
  if (P.divergence == Divergence::kKL) {
    if (lp == neg_inf<T>() || lq == neg_inf<T>()) {
      o.l = o.G = o.H = T(0);
      return o;
    }
    switch (P.order) {
      case Order::kPR: {  // KL(p||r)
        o.l = p * (lp - lr);
        o.G = -p;
        o.H = T(0);
        break;
      }
      case Order::kQR: {  // KL(q||r)
        const T d = lq - lr;
        o.l = q * d;
        o.G = -q;
        o.H = q * (d + T(1));
        break;
      }
      case Order::kRP: {  // KL(r||p)
        const T d = lr - lp;
        o.l = r * d;
        o.G = r * (d + T(1));
        o.H = T(0);
        break;
      }
      case Order::kRQ:
      default: {  // KL(r||q)
        const T d = lr - lq;
        o.l = r * d;
        o.G = r * (d + T(1));
        o.H = -r;
        break;
      }
    }
    return o;
  }
  // alpha-beta divergence D(x||y) = -(1/(ab)) sum[x^a y^b - (a/g) x^g - (b/g) y^g], g = a + b;
  // dD/dlx = (x^g - x^a y^b)/b, dD/dly = (y^g - x^a y^b)/a. Powers are taken in log space.
  const T a = P.ab_a, b = P.ab_b, g = P.ab_a + P.ab_b;
  T lx, ly;
  switch (P.order) {
    case Order::kPR: lx = lp; ly = lr; break;
    case Order::kQR: lx = lq; ly = lr; break;
    case Order::kRP: lx = lr; ly = lp; break;
    case Order::kRQ:
    default: lx = lr; ly = lq; break;
  }
  const T xy = amid_exp(a * lx + b * ly);
  const T xg = amid_exp(g * lx);
  const T yg = amid_exp(g * ly);
  o.l = -(xy - P.ab_a_over_g * xg - P.ab_b_over_g * yg) * P.inv_ab;
  const T dx = (xg - xy) * P.inv_b;  // dD/dlx
  const T dy = (yg - xy) * P.inv_a;  // dD/dly
  switch (P.order) {
    case Order::kPR: o.G = dy; o.H = T(0); break;
    case Order::kQR: o.G = dy; o.H = dx; break;
    case Order::kRP: o.G = dx; o.H = T(0); break;
    case Order::kRQ:
    default: o.G = dx; o.H = dy; break;
  }
  return o;
}

// Row accumulators of the sums pass (spec §3.4 in lemma form). `S` may be wider than the element
// type (the CPU kernel sums float terms in double).
template <typename S>
struct RowSums {
  S L = S(0), S_G = S(0), S_Gw = S(0), S_H = S(0), Wbar = S(0);
  template <typename T>
  AMID_HD void add(T w, T r, const Terms<T>& o) {
    L += S(o.l);
    S_G += S(o.G);
    S_Gw += S(o.G) * S(w);
    S_H += S(o.H);
    Wbar += S(r) * S(w);
  }
  AMID_HD void merge(const RowSums& b) {
    L += b.L;
    S_G += b.S_G;
    S_Gw += b.S_Gw;
    S_H += b.S_H;
    Wbar += b.Wbar;
  }
  // The row scalar K of the gradient; with the assistant detached only the explicit part stays.
  AMID_HD S K(bool detach) const { return detach ? S_H : S_Gw - Wbar * S_G + S_H; }
};

// Gradient of the row loss with respect to the temperature-scaled student logits, for one element.
template <typename T>
AMID_HD T element_grad(const LossParams<T>& P, T w, T q, T r, const Terms<T>& o, T S_G, T K) {
  if (P.detach) {
    return o.H - q * K;
  }
  return w * (o.G - r * S_G) + o.H - q * K;
}

}  // namespace amid

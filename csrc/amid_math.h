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
#elif defined(__GNUC__)
// Always inlined: the CPU kernel's loops vectorise only if no call is left in them, and GCC's
// inlining budget otherwise depends on unrelated code (e.g. -DNDEBUG kept VecMath::exp a call).
#define AMID_HD inline __attribute__((always_inline))
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
// row scalars of the gradient; for kl the shifted S_G', K' of element_terms). Keep in sync with
// amid/ops.py (NUM_STATS).
constexpr int kNumStats = 5;

// Coefficients kept for the series of the alpha-beta element function phi (see ab_parts).
constexpr int kAbPhiTerms = 18;

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
  T ab_c, ab_c_over_g;  // c: the exponent of the assistant in x^a y^b (b in pr / qr, a in rp / rq)
  T ab_phi[kAbPhiTerms];  // phi(v) = sum_{n>=2} ab_phi[n-2] v^n, ab_phi[n-2] = c (c^(n-1) - g^(n-1)) / n!
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
  // expm1(x) for |x| < 1/2 as a degree-8 Taylor polynomial (< 1 ulp there; no special function).
  static AMID_HD float expm1_small(float x) {
    return x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 +
           x * (1.0f / 720 + x * (1.0f / 5040 + x * (1.0f / 40320))))))));
  }
  static AMID_HD double expm1_small(double x) { return ::expm1(x); }
  // expm1(x) given e = exp(x) (so no second special-function call in float): e - 1 is exact enough
  // once |x| >= 1/2 (|e - 1| >= 0.39: < 2 ulp relative); below, the polynomial. This matters as
  // alpha -> 1, where lt - lq = log1p(lam expm1(k d)) / k amplifies the absolute error of expm1 by
  // 1/k (spec §5.3), and in the small-divergence regime (spec §5.6).
  static AMID_HD float expm1_from_exp(float x, float e) {
    return (x > -0.5f) & (x < 0.5f) ? expm1_small(x) : e - 1.0f;
  }
  static AMID_HD double expm1_from_exp(double x, double /*e*/) { return ::expm1(x); }
};

// ------------------------------------------------------------------------------------------------
// The reference side of a loss: the distribution the assistant is compared with (p for pr / rp,
// q for qr / rq). Small losses are the regime where r ~ that side (spec §5.6), so the kernels carry
// d = lt - l_ref, computed without cancellation, next to lt.
template <Order O>
constexpr bool ref_is_p() {
  return O == Order::kPR || O == Order::kRP;
}

// The mixture for one element: lt = log r~, w = d lt / d lq and d = lt - l_ref (l_ref = lp when
// REF_P, else lq), from lp, lq and dpq = lp - lq. The caller forms dpq as (t - s)/T - (A - B),
// not as the difference of lp and lq, so that it keeps its accuracy when p ~ q. lp, lq may be -inf
// (never +inf or NaN: invalid rows are caught before this is called); d is +-inf where one side
// is -inf, and 0 where both are.
template <MixMode MODE, bool REF_P, class M, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& d) {
  const bool both_masked = (lp == neg_inf<T>()) & (lq == neg_inf<T>());
  T lt_, w_, d_;
  if constexpr (MODE == MixMode::kStudent) {
    lt_ = lq;
    w_ = T(1);
    d_ = REF_P ? -dpq : T(0);
  } else if constexpr (MODE == MixMode::kTeacher) {
    lt_ = lp;
    w_ = T(0);
    d_ = REF_P ? T(0) : dpq;
  } else if constexpr (MODE == MixMode::kGeometric) {
    // One -inf operand gives -inf (no 0 * inf: lam is in (0, 1) here).
    lt_ = P.lam * lp + P.one_minus_lam * lq;
    w_ = P.one_minus_lam;
    d_ = REF_P ? -P.one_minus_lam * dpq : P.lam * dpq;
  } else {
    // Reference the larger of p^k, q^k (the branch's "base") so the expm1 argument is <= 0
    // (spec §3.2), and share e = exp(-|k dpq|) between the mixture and the weight
    // w = sigmoid(log((1-lam)/lam) - k dpq). With B the base and N the other side,
    //   lt = l_B + log1p(lam_N em1) / k,   em1 = expm1(-|x|),  x = k dpq.
    // d = lt - l_ref: when the base is the loss's reference ("own" branch) that log1p term is d
    // itself; otherwise d = l_N - l_ref + (that term), which cancels as r -> ref, so it is taken
    // as log1p(lam_N' expm1(|x|)) / k with expm1(|x|) = -em1 / e (lam_N' = the weight of the
    // non-reference side), unless |x| > 80 where e^|x| nears float's range (and d is large).
    const T x = P.k * dpq;  // NaN when both are -inf (handled by the last select)
    const bool q_base = x <= T(0);
    const T ax = q_base ? x : -x;  // -|x|
    const T e = M::exp(ax);
    const T em1 = M::expm1_from_exp(ax, e);
    const bool own = REF_P ? !q_base : q_base;
    const bool big = ax < T(-80);
    const T lam_nonref = REF_P ? P.one_minus_lam : P.lam;  // weight of the side that is not l_ref
    const T lam_ref = REF_P ? P.lam : P.one_minus_lam;
    const T arg = own ? lam_nonref * em1 : (big ? lam_ref * em1 : -lam_nonref * em1 / e);
    const T c = M::log1p(arg) * P.inv_k;
    const T l_ref = REF_P ? lp : lq, l_non = REF_P ? lq : lp;
    const bool direct = own | !big;
    d_ = direct ? c : (l_non - l_ref) + c;
    lt_ = direct ? l_ref + c : l_non + c;
    w_ = q_base ? P.one_minus_lam / (P.one_minus_lam + P.lam * e)
                : P.one_minus_lam * e / (P.one_minus_lam * e + P.lam);
  }
  lt = both_masked ? neg_inf<T>() : lt_;
  w = both_masked ? T(0) : w_;
  d = both_masked ? T(0) : d_;
}

// Runtime-mode form (for code that does not specialise on the mode).
template <bool REF_P, class M, typename T>
AMID_HD void mixture(const LossParams<T>& P, T lp, T lq, T dpq, T& lt, T& w, T& d) {
  switch (P.mode) {
    case MixMode::kStudent: mixture<MixMode::kStudent, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    case MixMode::kTeacher: mixture<MixMode::kTeacher, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    case MixMode::kGeometric: mixture<MixMode::kGeometric, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
    default: mixture<MixMode::kPower, REF_P, M>(P, lp, lq, dpq, lt, w, d); return;
  }
}

// The mixture from the temperature-scaled logits tf, sf and their log-sum-exps A, B, returning lp
// and lq too; the one place that forms lp - lq as (tf - sf) - (A - B) (see mixture). The first form
// takes the mode as a template argument, the second reads it from P.
template <MixMode MODE, bool REF_P, class M, typename T>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, T A, T B, T& lp, T& lq, T& lt, T& w, T& d) {
  lp = tf - A;
  lq = sf - B;
  mixture<MODE, REF_P, M>(P, lp, lq, (tf - sf) - (A - B), lt, w, d);
}

template <bool REF_P, class M, typename T>
AMID_HD void mixture_from_logits(const LossParams<T>& P, T tf, T sf, T A, T B, T& lp, T& lq, T& lt, T& w, T& d) {
  lp = tf - A;
  lq = sf - B;
  mixture<REF_P, M>(P, lp, lq, (tf - sf) - (A - B), lt, w, d);
}

// tau = r~ - o for one element (o = e^l_ref, d = lt - l_ref), without cancellation when r~ ~ o.
// The row sum of tau is Sum r~ - 1 (taking Sum o = 1, as it is up to rounding), so
// Z = LSE(lt) = log1p(Sum tau): accurate where Z is small, unlike m + log(Sum e^(lt - m)), whose
// absolute error is eps |m| (spec §5.6).
template <class M, typename T>
AMID_HD T assistant_excess(T o, T d, T lt) {
  const bool near = d <= T(1);  // e^d <= e; false for d = +inf (o = 0)
  const T E = M::exp(near ? d : lt);
  return near ? o * M::expm1_from_exp(d, E) : E - o;
}

// ------------------------------------------------------------------------------------------------
// The alpha-beta divergence per element, relative to the reference side o (the non-assistant
// distribution) as for kl: with x the assistant, v = lx - lo and c its exponent in x^a y^b,
//   x^a y^b - (a/g) x^g - (b/g) y^g = o^g phi(v),  phi(v) = expm1(c v) - (c/g) expm1(g v)
// (the constant 1 - a/g - b/g is exactly 0), so the loss is second order in v with no cancellation
// left once phi is a series for small |g v|. Returned: Xc = o^g expm1(c v), Xg = o^g expm1(g v)
// and Phi = o^g phi(v); for |g v| >= 1/2 (or a -inf side) from the powers themselves,
// Xc = o^(g-c) x^c - o^g, Xg = x^g - o^g (no cancellation there). Needs a, b > 0.
// c[I] + v (c[I+1] + v (... c[N-1])), expanded at compile time: a loop left inside an element
// function would stop the CPU kernel's loops from vectorising (GCC does not unroll it first).
template <int I, int N, typename T>
AMID_HD T horner(const T* c, T v) {
  if constexpr (I == N - 1) {
    return c[I];
  } else {
    return c[I] + v * horner<I + 1, N>(c, v);
  }
}

template <typename T>
AMID_HD T ab_phi_small(const LossParams<T>& P, T v) {
  // |g v| < 1/2: the terms fall by at least g|v|/n; 10 (float) or 18 (double) of them.
  constexpr int n = std::is_same<T, double>::value ? kAbPhiTerms : 10;
  return horner<0, n>(P.ab_phi, v) * v * v;
}

template <typename T>
struct AbParts {
  T Xc, Xg, Phi;
};

// og = o^g = exp(g lo), passed in when the caller has it.
template <class M, typename T>
AMID_HD AbParts<T> ab_parts(const LossParams<T>& P, T lo, T lx, T v, T og) {
  const T gv = P.ab_g * v;
  const bool small = (gv > T(-0.5)) & (gv < T(0.5));  // false for NaN / inf v
  const T xc = M::exp(P.ab_c * lx + (P.ab_g - P.ab_c) * lo) - og;
  const T xg = M::exp(P.ab_g * lx) - og;
  // Both forms are evaluated and one selected (no branch: the CPU loops vectorise; a series in
  // one arm of a conditional became masked loads of the coefficients, which stopped that).
  const T xc_small = og * M::expm1_small(P.ab_c * v), xg_small = og * M::expm1_small(gv);
  const T phi_small = og * ab_phi_small(P, v), phi_big = xc - P.ab_c_over_g * xg;
  AbParts<T> r;
  r.Xc = small ? xc_small : xc;
  r.Xg = small ? xg_small : xg;
  r.Phi = small ? phi_small : phi_big;
  return r;
}

// ------------------------------------------------------------------------------------------------
// Per-element loss term l (summing to the row loss L) and the two gradient terms, from the
// probabilities, their logs, and e = lr - l_ref (formed by the caller as d - Z: accurate when r ~
// the reference side, where lr - l_ref itself would cancel).
//
// The gradient of the row loss is, with G = dF/dlr and H = dF/dlq (explicit part),
//   w (G - r S_G) + H - q K,   S_G = sum G,   K = sum G w - Wbar S_G + sum H.
// For kl, S_G and K are 1 + O(loss) (or -1, or 0), so the terms are returned shifted by those
// constants, G' = G - r S0 and H' = H - q K0, and the row sums of G', H' replace S_G, K:
//   w (G' - r S_G') + H' - q K',  S_G' = sum G',  K' = sum G' w - Wbar S_G' + sum H'
// (the same form; exact with Sum r = Sum q = 1). Nothing then adds or subtracts 1 from a small
// number. S0, K0: pr (-1, 0), qr (-1, 1), rp (1, 0), rq (1, -1). kl uses the official masked
// semantics: where a logit is -inf the loss term and G, H are dropped while r~ stays in Z, so there
// G' = -r S0, H' = -q K0. ab needs no mask (exp(-inf) = 0) and no shift (S0 = K0 = 0).
template <typename T>
struct Terms {
  T l, G, H;
};

template <Divergence D, Order O, class M, typename T>
AMID_HD Terms<T> element_terms(const LossParams<T>& P, T p, T q, T r, T lp, T lq, T lr, T e) {
  Terms<T> o;
  if constexpr (D == Divergence::kKL) {
    const bool keep = (lp != neg_inf<T>()) & (lq != neg_inf<T>());
    const T ref = ref_is_p<O>() ? p : q;
    // r - ref: ref expm1(e) near r = ref, the plain difference once |e| >= 1/2 (no cancellation).
    const T diff = (e > T(-0.5)) & (e < T(0.5)) ? ref * M::expm1_small(e) : r - ref;
    T l, G, H, G_out, H_out;
    if constexpr (O == Order::kPR || O == Order::kQR) {  // KL(x || r): l = x (lx - lr) = -x e
      l = -ref * e;
      G = diff;                                    // -x + r
      H = O == Order::kQR ? -q * e : T(0);         // q (1 - e) - q
      G_out = r;
      H_out = O == Order::kQR ? -q : T(0);
    } else {  // KL(r || y): l = r (lr - ly) = r e
      l = r * e;
      G = r * e;                                   // r (e + 1) - r
      H = O == Order::kRQ ? -diff : T(0);          // -r + q
      G_out = -r;
      H_out = O == Order::kRQ ? q : T(0);
    }
    o.l = keep ? l : T(0);
    o.G = keep ? G : G_out;
    o.H = keep ? H : H_out;
  } else {
    // alpha-beta divergence D(x||y) = -(1/(ab)) sum[x^a y^b - (a/g) x^g - (b/g) y^g], g = a + b,
    // dD/dlx = (x^g - x^a y^b)/b, dD/dly = (y^g - x^a y^b)/a; in the parts of ab_parts with
    // v = e = lr - l_ref: l = -Phi/(ab); G = dD/dlr = (Xg - Xc)/a (pr / qr) or /b (rp / rq);
    // qr: H = dD/dlq = -Xc/b; rq: H = -Xc/a.
    constexpr bool x_r = (O == Order::kPR || O == Order::kQR);
    const T lo = ref_is_p<O>() ? lp : lq;
    const AbParts<T> t = ab_parts<M>(P, lo, lr, e, M::exp(P.ab_g * lo));
    o.l = -t.Phi * P.inv_ab;
    o.G = (t.Xg - t.Xc) * (x_r ? P.inv_a : P.inv_b);
    o.H = O == Order::kQR ? -t.Xc * P.inv_b : (O == Order::kRQ ? -t.Xc * P.inv_a : T(0));
  }
  return o;
}

// Gradient of the row loss with respect to the temperature-scaled student logits, for one element
// (G, H, S_G, K shifted for kl as above).
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

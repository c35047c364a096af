// amid_loss_cpu.cpp -- CPU kernels of the AMiD loss (math: ../amid_math.h; spec:
// ../shared/docs/amid-math.md).
//
// Forward, per row with weight w_n != 0 (rows with weight 0 are skipped, not read, and get zeros):
//   1. maxima of t/T and s/T and the validity check (NaN or +inf anywhere, or a row that is all
//      -inf, makes the row's loss, stats and gradient NaN: documented and tested);
//   2. A = LSE(t/T), B = LSE(s/T), caching p and q;
//   3. lt = log r~, w and d = lt - l_ref per element (cached), and Z = LSE(lt) (for kl as
//      log1p(sum (r~ - o)) when that is small: spec §5.6), caching r;
//   4. the row sums (loss L, S_G, S_Gw, S_H, Wbar) and, if asked, the gradient row.
// The backward (from the saved stats) rebuilds p, q, lt, w, r with the same passes and writes the
// gradient row.
//
// Threads own whole rows (at::parallel_for); each thread keeps thirteen [V] scratch arrays in the math
// type (the scaled logits, p, q, lt, w, d = lt - l_ref, r and the per-element terms), so nothing of size [N, V]
// exists besides the gradient. Each pass is one branch-free loop over scratch: with float math
// (16/32-bit inputs) the loops vectorise (an AVX2 clone is chosen at load time where the CPU has
// it) using the polynomial exp / log1p of vec_math.h; float64 inputs use the C library in double.
// Row sums are accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../amid_math.h"
#include "../checks.h"
#include "vec_math.h"

// An AVX2 + FMA clone of each loop beside the baseline one; the dynamic loader picks per CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER) && defined(__linux__)
#define AMID_CPU_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define AMID_CPU_CLONES
#endif

namespace amid {
namespace {

using M = VecMath;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// ------------------------------------------------------------------------------------------------
// Conversions between the input dtype and the math type, one pass per row. bf16 / fp16 go through
// their bit patterns (c10's conversions keep loops scalar): bf16 -> float is a shift, fp16 -> float
// the exponent-rebias trick (exact, also for subnormals, inf and NaN).

// x * scale for one finite x, saturated at the type's largest magnitude instead of overflowing to
// +-inf (a tiny temperature times a large logit; +inf would read as an invalid row, -inf as a masked
// entry): the scaled row then ranks as before, with entries beyond the range tied at the limit.
template <typename acc_t>
AMID_HD acc_t scale_logit(acc_t x, acc_t scale) {
  const acc_t y = x * scale;
  const bool over = (y == kInf<acc_t>) | (y == -kInf<acc_t>);
  const bool finite_x = (x < kInf<acc_t>) & (x > -kInf<acc_t>);
  return over & finite_x ? (y > acc_t(0) ? std::numeric_limits<acc_t>::max() : std::numeric_limits<acc_t>::lowest()) : y;
}

template <typename scalar_t, typename acc_t>
AMID_CPU_CLONES void load_scaled(const scalar_t* x, int64_t V, acc_t scale, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = scale_logit(bit_cast<float>(uint32_t(x[v].x) << 16), scale);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const uint32_t h = x[v].x, em = h & 0x7fffu;
      const float mag = em >= 0x7c00u ? bit_cast<float>((em << 13) | 0x7f800000u)   // inf / NaN
                                      : bit_cast<float>(em << 13) * 0x1p+112f;       // (sub)normal
      out[v] = scale_logit(bit_cast<float>(bit_cast<uint32_t>(mag) | ((h & 0x8000u) << 16)), scale);
    }
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = scale_logit(acc_t(x[v]), scale);
  }
}

template <typename scalar_t, typename acc_t>
AMID_CPU_CLONES void store_row(const acc_t* g, int64_t V, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {  // round to nearest even; NaN stays NaN
      const uint32_t u = bit_cast<uint32_t>(g[v]);
      const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      out[v].x = uint16_t(g[v] != g[v] ? 0x7fc0u : r);
    }
  } else {
    for (int64_t v = 0; v < V; ++v) out[v] = scalar_t(g[v]);
  }
}

// ------------------------------------------------------------------------------------------------
// Row passes over the thread's [V] scratch: tf, sf = t/T, s/T; p, q, lt, w, r as in the spec.
// Each is one loop that vectorises (reductions kept in their own loops: GCC stops vectorising a
// heavy loop body when a reduction rides along).

// Maxima of the scaled rows, and whether any entry is NaN or +inf.
template <typename acc_t>
AMID_CPU_CLONES void pass_max(const acc_t* tf, const acc_t* sf, int64_t V, acc_t& mt_out, acc_t& ms_out,
                              bool& bad_out) {
  acc_t mt = -kInf<acc_t>, ms = -kInf<acc_t>;
  int bad = 0;
#pragma omp simd reduction(max : mt, ms) reduction(| : bad)
  for (int64_t v = 0; v < V; ++v) {
    bad |= !((tf[v] < kInf<acc_t>) & (sf[v] < kInf<acc_t>));  // NaN compares false
    mt = tf[v] > mt ? tf[v] : mt;
    ms = sf[v] > ms ? sf[v] : ms;
  }
  mt_out = mt;
  ms_out = ms;
  bad_out = bad != 0;
}

template <typename acc_t>
AMID_CPU_CLONES acc_t pass_max_of(const acc_t* x, int64_t V) {
  acc_t m = -kInf<acc_t>;
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

// out = e^(x - m) elementwise.
template <typename acc_t>
AMID_CPU_CLONES void pass_exp(const acc_t* x, int64_t V, acc_t m, acc_t* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = M::exp(x[v] - m);
}

// out = e^(log_prob(x, a)) elementwise.
template <typename acc_t>
AMID_CPU_CLONES void pass_exp_lse(const acc_t* x, int64_t V, RowLse<acc_t> a, acc_t* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = M::exp(log_prob(x[v], a));
}

template <typename acc_t>
AMID_CPU_CLONES double pass_sum(const acc_t* x, int64_t V) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) sum += double(x[v]);
  return sum;
}

template <typename acc_t>
AMID_CPU_CLONES void pass_scale(acc_t* x, int64_t V, acc_t c) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] *= c;
}

// lt, w and d = lt - l_ref per element (amid_math.h: mixture_from_logits).
template <MixMode MODE, bool REF_P, typename acc_t>
AMID_CPU_CLONES void pass_mixture(const LossParams<acc_t>& P, const acc_t* tf, const acc_t* sf, int64_t V,
                                  RowLse<acc_t> A, RowLse<acc_t> B, acc_t dAB, acc_t* lt, acc_t* w, acc_t* d) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    acc_t lpv, lqv, ltv, wv, dv;
    mixture_from_logits<MODE, REF_P, M>(P, tf[v], sf[v], A, B, dAB, lpv, lqv, ltv, wv, dv);
    lt[v] = ltv;
    w[v] = wv;
    d[v] = dv;
  }
}

// The combined order (kJSD): lt, w and d relative to both sides in one loop (amid_math.h:
// mixture_both; the common exp / expm1 evaluated once).
template <MixMode MODE, typename acc_t>
AMID_CPU_CLONES void pass_mixture_both(const LossParams<acc_t>& P, const acc_t* tf, const acc_t* sf, int64_t V,
                                       RowLse<acc_t> A, RowLse<acc_t> B, acc_t dAB, acc_t* lt, acc_t* w, acc_t* dp,
                                       acc_t* dq) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    acc_t lpv, lqv, ltv, wv, dpv, dqv;
    mixture_both_from_logits<MODE, M>(P, tf[v], sf[v], A, B, dAB, lpv, lqv, ltv, wv, dpv, dqv);
    lt[v] = ltv;
    w[v] = wv;
    dp[v] = dpv;
    dq[v] = dqv;
  }
}

// tau = r~ - o per element (amid_math.h: assistant_excess), for Z = log1p(sum tau).
template <typename acc_t>
AMID_CPU_CLONES void pass_excess(const acc_t* o, const acc_t* d, const acc_t* lt, int64_t V, acc_t* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = assistant_excess<M>(o[v], d[v], lt[v]);
}

struct Sums {
  double L, S_G, S_Gw, S_H, Wbar;
};

// kl: sum lb, sum l1 and sum |l1| (amid_math.h: Terms, kl_row_loss).
template <typename acc_t>
AMID_CPU_CLONES void pass_kl_loss_parts(int64_t V, const acc_t* lb, const acc_t* l1, double& bound_l, double& sum_l1,
                                        double& abs_l1) {
  double a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
  for (int64_t v = 0; v < V; ++v) {
    a += double(lb[v]);
    b += double(l1[v]);
    c += std::abs(double(l1[v]));
  }
  bound_l = a;
  sum_l1 = b;
  abs_l1 = c;
}

// Per-element terms into scratch (G -> gs, H -> hs, l -> ls), then the row sums in a plain loop.
template <Divergence D, Order O, typename acc_t>
AMID_CPU_CLONES void pass_terms(const LossParams<acc_t>& P, const acc_t* tf, const acc_t* sf, int64_t V,
                                RowLse<acc_t> A, RowLse<acc_t> B, acc_t Z, const acc_t* p, const acc_t* q, const acc_t* r, const acc_t* lt,
                                const acc_t* d, acc_t* ls, acc_t* gs, acc_t* hs, acc_t* l1s, acc_t* lbs) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const Terms<acc_t> o = element_terms<D, O, M>(P, p[v], q[v], r[v], log_prob(tf[v], A), log_prob(sf[v], B),
                                                     lt[v] - Z, d[v] - Z);
    ls[v] = o.l;
    gs[v] = o.G;
    hs[v] = o.H;
    if constexpr (D == Divergence::kKL) {
      l1s[v] = o.l1;
      lbs[v] = o.lb;
    }
  }
}

// The combined order (kJSD): G = lam G_pr + (1 - lam) G_qr and the same for H, in place in gs, hs
// (amid_math.h: jsd_terms; the single-order passes wrote each order's terms, since one loop with both
// bodies no longer vectorises).
template <typename acc_t>
AMID_CPU_CLONES void pass_combine(int64_t V, acc_t lam, acc_t one_minus_lam, acc_t* gs, acc_t* hs, const acc_t* gs2,
                                  const acc_t* hs2) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    gs[v] = lam * gs[v] + one_minus_lam * gs2[v];
    hs[v] = lam * hs[v] + one_minus_lam * hs2[v];
  }
}

template <typename acc_t>
AMID_CPU_CLONES Sums pass_sums(int64_t V, const acc_t* ls, const acc_t* gs, const acc_t* hs, const acc_t* r,
                               const acc_t* w) {
  double L = 0, S_G = 0, S_Gw = 0, S_H = 0, Wbar = 0;
#pragma omp simd reduction(+ : L, S_G, S_Gw, S_H, Wbar)
  for (int64_t v = 0; v < V; ++v) {
    L += double(ls[v]);
    S_G += double(gs[v]);
    S_Gw += double(gs[v]) * double(w[v]);
    S_H += double(hs[v]);
    Wbar += double(r[v]) * double(w[v]);
  }
  return {L, S_G, S_Gw, S_H, Wbar};
}

// The gradient row from the cached terms: out = scale * (w (G - r S_G) + H - q K).
template <typename acc_t>
AMID_CPU_CLONES void pass_grad(bool detach, int64_t V, const acc_t* gs, const acc_t* hs, const acc_t* q,
                               const acc_t* r, const acc_t* w, acc_t S_G, acc_t K, acc_t scale, acc_t* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const Terms<acc_t> o{acc_t(0), gs[v], hs[v]};
    out[v] = scale * element_grad(detach, w[v], q[v], r[v], o, S_G, K);
  }
}

// ------------------------------------------------------------------------------------------------
// Rows

// Per-thread scratch, reused across its rows: the scaled logits, p, q, lt, w, d, r and the terms;
// for the combined order (kJSD) also d2 = lt - lq and the qr terms ls2, gs2, hs2, l1s2, lbs2 (d then
// holds lt - lp and ls, gs, hs, l1s, lbs the pr terms).
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> tf, sf, p, q, lt, w, d, r, ls, gs, hs, l1s, lbs, d2, ls2, gs2, hs2, l1s2, lbs2;
  RowScratch(int64_t V, bool jsd)
      : tf(V), sf(V), p(V), q(V), lt(V), w(V), d(V), r(V), ls(V), gs(V), hs(V), l1s(V), lbs(V), d2(jsd ? V : 0),
        ls2(jsd ? V : 0), gs2(jsd ? V : 0), hs2(jsd ? V : 0), l1s2(jsd ? V : 0), lbs2(jsd ? V : 0) {}
};

template <typename scalar_t>
void fill_nan_row(double* loss, double* stats, scalar_t* grad, int64_t V) {
  *loss = std::numeric_limits<double>::quiet_NaN();
  std::fill(stats, stats + kNumStats, std::numeric_limits<double>::quiet_NaN());
  if (grad) std::fill(grad, grad + V, scalar_t(std::numeric_limits<float>::quiet_NaN()));
}

// The per-element terms for the loss (D, O) selected at run time.
// Z2: the second term's Z of the combined order (kJSD; see amid_math.h: kStatZ2), unused otherwise.
template <typename acc_t>
void terms_row(const LossParams<acc_t>& P, int64_t V, RowLse<acc_t> A, RowLse<acc_t> B, acc_t Z, acc_t Z2,
               RowScratch<acc_t>& S) {
  dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
    if constexpr (decltype(oc)::value == Order::kJSD) {
      // pr with d = lt - lp and Z, qr with d2 = lt - lq and Z2, then the weighted G, H.
      constexpr Divergence DV = decltype(dc)::value;
      pass_terms<DV, Order::kPR>(P, S.tf.data(), S.sf.data(), V, A, B, Z, S.p.data(), S.q.data(), S.r.data(),
                                 S.lt.data(), S.d.data(), S.ls.data(), S.gs.data(), S.hs.data(), S.l1s.data(),
                                 S.lbs.data());
      pass_terms<DV, Order::kQR>(P, S.tf.data(), S.sf.data(), V, A, B, Z2, S.p.data(), S.q.data(), S.r.data(),
                                 S.lt.data(), S.d2.data(), S.ls2.data(), S.gs2.data(), S.hs2.data(), S.l1s2.data(),
                                 S.lbs2.data());
      pass_combine(V, P.lam, P.one_minus_lam, S.gs.data(), S.hs.data(), S.gs2.data(), S.hs2.data());
    } else {
      pass_terms<decltype(dc)::value, decltype(oc)::value>(P, S.tf.data(), S.sf.data(), V, A, B, Z, S.p.data(),
                                                           S.q.data(), S.r.data(), S.lt.data(), S.d.data(),
                                                           S.ls.data(), S.gs.data(), S.hs.data(), S.l1s.data(),
                                                           S.lbs.data());
    }
  });
}

template <typename acc_t>
bool row_ref_is_p(const LossParams<acc_t>& P) {
  return P.order == Order::kPR || P.order == Order::kRP;
}

template <typename acc_t>
void mixture_row(const LossParams<acc_t>& P, int64_t V, RowLse<acc_t> A, RowLse<acc_t> B, RowScratch<acc_t>& S) {
  // A - B in double, rounded once (logit_gap's row constant).
  const acc_t dAB = acc_t((double(A.m) - double(B.m)) + (double(A.l) - double(B.l)));
  dispatch_mode(P.mode, [&](auto mode) {
    constexpr MixMode MODE = decltype(mode)::value;
    if (P.order == Order::kJSD) {  // lt, w, d = lt - lp, then d2 = lt - lq (amid_math.h: mixture_both)
      pass_mixture_both<MODE>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data(),
                              S.d2.data());
    } else if (row_ref_is_p(P)) {
      pass_mixture<MODE, true>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data());
    } else {
      pass_mixture<MODE, false>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data());
    }
  });
}

// Forward of one row: loss (times weight), the kNumStats stats and, if grad != nullptr, the gradient row
// d(weight * L)/ds.
template <typename scalar_t, typename acc_t>
void forward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, double weight,
                 RowScratch<acc_t>& S, double* loss, double* stats, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  load_scaled(t, V, invT, S.tf.data());
  load_scaled(s, V, invT, S.sf.data());
  acc_t mt, ms;
  bool bad;
  pass_max(S.tf.data(), S.sf.data(), V, mt, ms, bad);
  if (bad || mt == -kInf<acc_t> || ms == -kInf<acc_t>) {
    fill_nan_row(loss, stats, grad, V);
    return;
  }
  // Log-sum-exps (sums in double: a float running sum loses ~sqrt(V) ulps), then p and q.
  pass_exp(S.tf.data(), V, mt, S.p.data());
  pass_exp(S.sf.data(), V, ms, S.q.data());
  const double st = pass_sum(S.p.data(), V), ss = pass_sum(S.q.data(), V);
  // Each as max + log(sum) (amid_math.h: RowLse): log p keeps its accuracy at any logit scale.
  const RowLse<acc_t> A{mt, acc_t(std::log(st))}, B{ms, acc_t(std::log(ss))};
  pass_scale(S.p.data(), V, acc_t(1.0 / st));
  pass_scale(S.q.data(), V, acc_t(1.0 / ss));
  // The mixture and Z = LSE(lt), then r.
  mixture_row(P, V, A, B, S);
  const acc_t m = pass_max_of(S.lt.data(), V);
  if (m == -kInf<acc_t>) {  // alpha >= 1 with disjoint supports: the assistant is undefined
    fill_nan_row(loss, stats, grad, V);
    return;
  }
  pass_exp(S.lt.data(), V, m, S.r.data());
  const double sr = pass_sum(S.r.data(), V);
  // Z = log1p(sum tau) while that sum is small, where it is accurate (amid_math.h:
  // assistant_excess); else the log-sum-exp. The combined order (kJSD) has one per term: Z over p
  // (d = lt - lp), Z2 over q (d2 = lt - lq); otherwise Z2 = Z.
  auto row_Z = [&](const acc_t* o, const acc_t* d) {
    pass_excess(o, d, S.lt.data(), V, S.ls.data());
    const double tau_sum = pass_sum(S.ls.data(), V);
    return acc_t(std::abs(tau_sum) < 0.5 ? std::log1p(tau_sum) : m + std::log(sr));
  };
  const acc_t Z = row_Z(row_ref_is_p(P) || P.order == Order::kJSD ? S.p.data() : S.q.data(), S.d.data());
  const acc_t Z2 = P.order == Order::kJSD ? row_Z(S.q.data(), S.d2.data()) : Z;
  pass_scale(S.r.data(), V, acc_t(1.0 / sr));
  // Row sums, stats, and the gradient (chain rule through s/T: the 1/T factor).
  terms_row(P, V, A, B, Z, Z2, S);
  const Sums sums = pass_sums(V, S.ls.data(), S.gs.data(), S.hs.data(), S.r.data(), S.w.data());
  const double K = row_K(P.detach, sums.S_G, sums.S_Gw, sums.S_H, sums.Wbar);
  double L = sums.L;
  if (P.divergence == Divergence::kKL) {
    double bound_l, sum_l1, abs_l1;
    pass_kl_loss_parts(V, S.lbs.data(), S.l1s.data(), bound_l, sum_l1, abs_l1);
    L = kl_row_loss(L, bound_l, sum_l1, abs_l1, double(Z));
  }
  if (P.order == Order::kJSD) {  // L is the pr loss so far; the qr one from its own terms, then combined
    double L2 = pass_sum(S.ls2.data(), V);
    if (P.divergence == Divergence::kKL) {
      double bound_l, sum_l1, abs_l1;
      pass_kl_loss_parts(V, S.lbs2.data(), S.l1s2.data(), bound_l, sum_l1, abs_l1);
      L2 = kl_row_loss(L2, bound_l, sum_l1, abs_l1, double(Z2));
    }
    L = double(P.lam) * L + double(P.one_minus_lam) * L2;
  }
  *loss = weight * L;
  stats[kStatAMax] = A.m;
  stats[kStatALog] = A.l;
  stats[kStatBMax] = B.m;
  stats[kStatBLog] = B.l;
  stats[kStatZ] = Z;
  stats[kStatZ2] = Z2;
  stats[kStatSG] = sums.S_G;
  stats[kStatK] = K;
  if (grad) {
    pass_grad(P.detach, V, S.gs.data(), S.hs.data(), S.q.data(), S.r.data(), S.w.data(), acc_t(sums.S_G), acc_t(K),
              acc_t(weight) * invT, S.tf.data());
    store_row(S.tf.data(), V, grad);
  }
}

// Backward of one row from its stats (A, B in two parts, Z, S_G, K, Z2): the same passes without the
// reductions.
template <typename scalar_t, typename acc_t>
void backward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, acc_t scale,
                  const acc_t* st, RowScratch<acc_t>& S, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  const RowLse<acc_t> A{st[kStatAMax], st[kStatALog]}, B{st[kStatBMax], st[kStatBLog]};
  const acc_t Z = st[kStatZ], Z2 = st[kStatZ2], S_G = st[kStatSG], K = st[kStatK];
  load_scaled(t, V, invT, S.tf.data());
  load_scaled(s, V, invT, S.sf.data());
  pass_exp_lse(S.tf.data(), V, A, S.p.data());  // p, q, r directly from the saved log-normalisers
  pass_exp_lse(S.sf.data(), V, B, S.q.data());
  mixture_row(P, V, A, B, S);
  pass_exp(S.lt.data(), V, Z, S.r.data());
  terms_row(P, V, A, B, Z, Z2, S);
  pass_grad(P.detach, V, S.gs.data(), S.hs.data(), S.q.data(), S.r.data(), S.w.data(), S_G, K, scale, S.tf.data());
  store_row(S.tf.data(), V, grad);
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1)); }

// ------------------------------------------------------------------------------------------------
// Host wrappers

std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& row_weight,
    double alpha, double lam, std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_fwd";
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const auto ldtype = loss_dtype(student_logits.scalar_type());
  // Row results are double here; cast to the loss dtype at the end (O(N)).
  at::Tensor loss = at::zeros({N}, student_logits.options().dtype(at::kDouble));
  at::Tensor stats = at::zeros({N, kNumStats}, student_logits.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student_logits.options()) : at::empty({0}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->to(at::kDouble).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    const scalar_t* s = student_logits.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher_logits.const_data_ptr<scalar_t>();
    const int64_t lds = student_logits.stride(0), ldt = teacher_logits.stride(0);
    const double* wp = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
    double* lp = loss.data_ptr<double>();
    double* sp = stats.data_ptr<double>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(V, P.order == Order::kJSD);
      for (int64_t n = begin; n < end; ++n) {
        const double wn = wp ? wp[n] : 1.0;
        scalar_t* grow = gp ? gp + n * V : nullptr;
        if (wn == 0.0) {  // ignored row: not read, zero loss / stats / gradient
          if (grow) std::fill(grow, grow + V, scalar_t(0));
          continue;
        }
        forward_row<scalar_t, acc_t>(P, s + n * lds, t + n * ldt, V, wn, scratch, lp + n, sp + n * kNumStats, grow);
      }
    });
  });
  return {loss.to(ldtype), stats.to(ldtype), grad};
}

at::Tensor amid_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits, const std::optional<at::Tensor>& row_weight,
                             const at::Tensor& stats, double alpha, double lam, std::string_view divergence,
                             std::string_view order, double ab_alpha, double ab_beta, double temperature,
                             bool detach_assistant) {
  constexpr const char* op = "amid_loss_bwd";
  check_bwd_args(op, grad_loss, student_logits, teacher_logits, row_weight, stats);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  at::Tensor gl = grad_loss.contiguous(), st = stats.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    const scalar_t* s = student_logits.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher_logits.const_data_ptr<scalar_t>();
    const int64_t lds = student_logits.stride(0), ldt = teacher_logits.stride(0);
    const loss_t* wp = weight.defined() ? weight.const_data_ptr<loss_t>() : nullptr;
    const loss_t* glp = gl.const_data_ptr<loss_t>();
    const loss_t* stp = st.const_data_ptr<loss_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> scratch(V, P.order == Order::kJSD);
      for (int64_t n = begin; n < end; ++n) {
        const acc_t wn = wp ? acc_t(wp[n]) : acc_t(1);
        scalar_t* grow = gp + n * V;
        if (wn == acc_t(0)) {
          std::fill(grow, grow + V, scalar_t(0));
          continue;
        }
        acc_t row_stats[kNumStats];
        for (int i = 0; i < kNumStats; ++i) row_stats[i] = acc_t(stp[n * kNumStats + i]);
        const acc_t scale = acc_t(glp[n]) * wn * P.inv_temperature;
        backward_row<scalar_t, acc_t>(P, s + n * lds, t + n * ldt, V, scale, row_stats, scratch, grow);
      }
    });
  });
  return grad;
}

void scale_grad_cpu_(at::Tensor& grad, const at::Tensor& grad_loss) {
  constexpr const char* op = "scale_grad_";
  check_scale_grad_args(op, grad, grad_loss);
  const int64_t N = grad.size(0), V = grad.size(1);
  if (N == 0 || V == 0) return;
  at::Tensor gl = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cpu_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const loss_t* g = gl.const_data_ptr<loss_t>();
    scalar_t* x = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (g[n] == loss_t(1)) continue;  // the common case: nothing to do
        const acc_t gn = acc_t(g[n]);
        scalar_t* row = x + n * V;
        for (int64_t v = 0; v < V; ++v) row[v] = scalar_t(acc_t(row[v]) * gn);
      }
    });
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY_IMPL(amid, CPU, m) {
  m.impl("amid_loss_fwd", &amid_loss_fwd_cpu);
  m.impl("amid_loss_bwd", &amid_loss_bwd_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
}

}  // namespace amid

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

// Clones of each loop for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline; the dynamic
// loader picks per CPU. (GCC splits a clone string at commas: "avx2,fma" made two clones, AVX2 without
// FMA and FMA without AVX2, not one with both.) -DAMID_CPU_TARGET=x86-64-v3 (a benchmarking build)
// compiles one level only, to measure the AVX2 loops on an AVX-512 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER) && defined(__linux__)
#define AMID_X86_CLONES 1
#ifdef AMID_CPU_TARGET
#define AMID_CPU_CLONES __attribute__((target("arch=" AMID_STR(AMID_CPU_TARGET))))
#else
#define AMID_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#else
#ifdef AMID_CPU_TARGET  // (else build_info would report a forced level that the loops do not have)
#error "AMID_CPU_TARGET selects an x86-64 level of the CPU loops: it needs GCC or Clang on x86-64 Linux"
#endif
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
  for (int64_t v = 0; v < V; ++v) out[v] = M::exp(log_prob<M>(x[v], a));
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

// lt, w and d = lt - l_ref per element (amid_math.h: mixture_from_logits). TINY_LAM: whether the
// mixture keeps its branch for lam or 1 - lam below float's normal range; the callers pass false
// unless P.lam_tiny, so that the loop has no control flow and vectorises.
template <MixMode MODE, bool REF_P, bool TINY_LAM, typename acc_t>
AMID_CPU_CLONES void pass_mixture(const LossParams<acc_t>& P, const acc_t* tf, const acc_t* sf, int64_t V,
                                  RowLse<acc_t> A, RowLse<acc_t> B, acc_t dAB, acc_t* lt, acc_t* w, acc_t* d) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    acc_t lpv, lqv, ltv, wv, dv;
    mixture_from_logits<MODE, REF_P, M, TINY_LAM>(P, tf[v], sf[v], A, B, dAB, lpv, lqv, ltv, wv, dv);
    lt[v] = ltv;
    w[v] = wv;
    d[v] = dv;
  }
}

// The combined order (kJSD): lt, w and d relative to both sides in one loop (amid_math.h:
// mixture_both; the common exp / expm1 evaluated once).
template <MixMode MODE, bool TINY_LAM, typename acc_t>
AMID_CPU_CLONES void pass_mixture_both(const LossParams<acc_t>& P, const acc_t* tf, const acc_t* sf, int64_t V,
                                       RowLse<acc_t> A, RowLse<acc_t> B, acc_t dAB, acc_t* lt, acc_t* w, acc_t* dp,
                                       acc_t* dq) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    acc_t lpv, lqv, ltv, wv, dpv, dqv;
    mixture_both_from_logits<MODE, M, TINY_LAM>(P, tf[v], sf[v], A, B, dAB, lpv, lqv, ltv, wv, dpv, dqv);
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
    const Terms<acc_t> o = element_terms<D, O, M>(P, p[v], q[v], r[v], log_prob<M>(tf[v], A), log_prob<M>(sf[v], B),
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
  const acc_t dAB = row_lse_gap(A, B);
  auto run = [&](auto mode, auto tiny) {
    constexpr MixMode MODE = decltype(mode)::value;
    constexpr bool TINY = decltype(tiny)::value;
    if (P.order == Order::kJSD) {  // lt, w, d = lt - lp, then d2 = lt - lq (amid_math.h: mixture_both)
      pass_mixture_both<MODE, TINY>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data(),
                                    S.d2.data());
    } else if (row_ref_is_p(P)) {
      pass_mixture<MODE, true, TINY>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data());
    } else {
      pass_mixture<MODE, false, TINY>(P, S.tf.data(), S.sf.data(), V, A, B, dAB, S.lt.data(), S.w.data(), S.d.data());
    }
  };
  dispatch_mode(P.mode, [&](auto mode) {
    if (decltype(mode)::value == MixMode::kPower && P.lam_tiny) {
      run(mode, std::true_type{});  // lam or 1 - lam < 2e-37 (float): the scalar loop with the extra branch
    } else {
      run(mode, std::false_type{});
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


// ------------------------------------------------------------------------------------------------
// Sparse teacher (amid_loss_topk_fwd / _bwd; math and gradients: docs/topk.md). The teacher of a
// row is its top-k log-probabilities lp [k] at distinct token indices I [k]. Each row is turned into
// a dense row of float math values and handed to forward_row above (the same element math, row sums
// and gradient as the dense op; forward_row with scalar_t = acc_t reads and writes math values):
//   renorm: student s [V], teacher lp on I and -inf elsewhere (the dense loss with a masked
//           teacher, at any temperature); the gradient row is the dense one.
//   bucket: k + 1 bins, student c = [s_I, LSE_{v not in I} s_v], teacher [lp, log P_tail] (the given
//           tail log-mass, else log(1 - sum exp lp)); T = 1. The bin gradient G [k + 1] goes back
//           to the V positions: G_b at i_b, G_tail * exp(s_v - c_tail) at every v not in I (the
//           derivative of c_tail is q_v / Q_tail).
// Indices are validated per row with a [V] marker array (range and duplicates); ignored rows
// (weight 0) are not read at all.

template <typename acc_t>
AMID_CPU_CLONES void pass_fill(acc_t* x, int64_t V, acc_t c) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) x[v] = c;
}

// out = g * e^(x - c) elementwise (the tail bin's gradient spread over the tail tokens).
template <typename acc_t>
AMID_CPU_CLONES void pass_tail_grad(const acc_t* x, int64_t V, acc_t c, acc_t g, acc_t* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = g * M::exp(x[v] - c);
}

template <typename acc_t>
struct TopkScratch {
  RowScratch<acc_t> row;           // forward_row's scratch: [V] (renorm) or [k + 1] (bucket)
  std::vector<acc_t> sx, tx, gx;   // the row handed to forward_row and its gradient
  std::vector<acc_t> full, tmp;    // bucket: the student row [V] and a [V] work row
  std::vector<uint8_t> mark;       // [V]: 1 at the row's teacher indices
  // jsd: the combined order's second-side rows (RowScratch d2, ...), which forward_row writes.
  TopkScratch(TopkTail tail, int64_t V, int64_t k, bool jsd)
      : row(tail == TopkTail::kRenorm ? V : k + 1, jsd),
        sx(tail == TopkTail::kRenorm ? V : k + 1),
        tx(tail == TopkTail::kRenorm ? V : k + 1),
        gx(tail == TopkTail::kRenorm ? V : k + 1),
        full(tail == TopkTail::kBucket ? V : 0),
        tmp(tail == TopkTail::kBucket ? V : 0),
        mark(V, 0) {}
};

// Marks the row's indices, refusing out-of-range or repeated ones (the marks are cleared on error).
template <typename index_t>
void mark_indices(const char* op, const index_t* idx, int64_t k, int64_t V, int64_t row, uint8_t* mark) {
  for (int64_t b = 0; b < k; ++b) {
    const int64_t i = int64_t(idx[b]);
    const bool in_range = i >= 0 && i < V;
    const bool repeated = in_range && mark[i];
    if (!in_range || repeated) {
      for (int64_t c = 0; c < b; ++c) mark[int64_t(idx[c])] = 0;
      AMID_CHECK(in_range, op, "expected teacher_indices in [0, V) with V = ", V, ", but got ", i, " in row ", row);
      AMID_CHECK(!repeated, op, "expected distinct teacher_indices in each row, but row ", row, " repeats index ", i);
    }
    mark[i] = 1;
  }
}

template <typename index_t>
void unmark_indices(const index_t* idx, int64_t k, uint8_t* mark) {
  for (int64_t b = 0; b < k; ++b) mark[int64_t(idx[b])] = 0;
}

// One row of the sparse-teacher loss: loss = weight * L and, if grad != nullptr, d(weight * L)/ds.
template <typename scalar_t, typename acc_t, typename index_t>
void topk_row(const char* op, const LossParams<acc_t>& P, TopkTail tail, const scalar_t* s, const acc_t* lp,
              const index_t* idx, const acc_t* tail_logmass, int64_t V, int64_t k, int64_t row, double weight,
              TopkScratch<acc_t>& S, double* loss, scalar_t* grad) {
  double stats[kNumStats];
  mark_indices(op, idx, k, V, row, S.mark.data());
  if (tail == TopkTail::kRenorm) {
    load_scaled(s, V, acc_t(1), S.sx.data());
    pass_fill(S.tx.data(), V, -kInf<acc_t>);
    for (int64_t b = 0; b < k; ++b) S.tx[int64_t(idx[b])] = lp[b];
    forward_row<acc_t, acc_t>(P, S.sx.data(), S.tx.data(), V, weight, S.row, loss, stats,
                              grad ? S.gx.data() : nullptr);
    if (grad) store_row(S.gx.data(), V, grad);
  } else {
    acc_t* full = S.full.data();
    acc_t* tmp = S.tmp.data();
    load_scaled(s, V, acc_t(1), full);
    acc_t mx, unused;
    bool bad;
    pass_max(full, full, V, mx, unused, bad);
    // The student's tail bin c = LSE over the tokens outside I (-inf when there are none; NaN when
    // the row holds NaN or +inf anywhere, which makes the row NaN as in the dense op).
    std::copy(full, full + V, tmp);
    for (int64_t b = 0; b < k; ++b) {
      const int64_t i = int64_t(idx[b]);
      S.sx[b] = full[i];
      tmp[i] = -kInf<acc_t>;
    }
    acc_t c;
    const acc_t m = pass_max_of(tmp, V);
    if (bad) {
      c = std::numeric_limits<acc_t>::quiet_NaN();
    } else if (m == -kInf<acc_t>) {
      c = -kInf<acc_t>;
    } else {
      pass_exp(tmp, V, m, tmp);
      c = acc_t(double(m) + std::log(pass_sum(tmp, V)));
    }
    S.sx[k] = c;
    // The teacher's bins: lp and the log of its tail mass.
    double top_max = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < k; ++b) {
      S.tx[b] = lp[b];
      top_max = std::max(top_max, double(lp[b]));
    }
    if (tail_logmass) {
      S.tx[k] = *tail_logmass;
    } else {
      // log(1 - sum_b exp(lp_b)), -inf when the top-k hold all the mass (or more, after rounding).
      double top = top_max;
      if (top_max > -std::numeric_limits<double>::infinity() && top_max < std::numeric_limits<double>::infinity()) {
        double sum = 0;
        for (int64_t b = 0; b < k; ++b) sum += std::exp(double(lp[b]) - top_max);
        top = top_max + std::log(sum);
      }
      S.tx[k] = acc_t(top < 0 ? std::log(-std::expm1(top)) : (top >= 0 ? -std::numeric_limits<double>::infinity()
                                                                          : std::numeric_limits<double>::quiet_NaN()));
    }
    forward_row<acc_t, acc_t>(P, S.sx.data(), S.tx.data(), k + 1, weight, S.row, loss, stats,
                              grad ? S.gx.data() : nullptr);
    if (grad) {
      const acc_t g_tail = S.gx[k];
      if (c == -kInf<acc_t>) {
        pass_fill(tmp, V, acc_t(0));  // no tail tokens with mass: nothing to spread
      } else {
        pass_tail_grad(full, V, c, g_tail, tmp);
      }
      for (int64_t b = 0; b < k; ++b) tmp[int64_t(idx[b])] = S.gx[b];
      store_row(tmp, V, grad);
    }
  }
  unmark_indices(idx, k, S.mark.data());
}

// Shared by the forward (weight = row_weight) and the backward (weight = grad_loss * row_weight,
// gradient always written): every row with weight != 0 through topk_row.
void topk_rows(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logprobs,
               const at::Tensor& teacher_indices, const std::optional<at::Tensor>& tail_logmass,
               const at::Tensor& weight, TopkTail tail, double alpha, double lam, std::string_view divergence,
               std::string_view order, double ab_alpha, double ab_beta, double temperature, bool detach_assistant,
               at::Tensor& loss, at::Tensor* grad) {
  const int64_t N = student_logits.size(0), V = student_logits.size(1), k = teacher_logprobs.size(1);
  at::Tensor lpc = teacher_logprobs.contiguous(), idxc = teacher_indices.contiguous();
  at::Tensor tlc = tail_logmass ? tail_logmass->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_topk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    AT_DISPATCH_INDEX_TYPES(idxc.scalar_type(), "amid_loss_topk_cpu_idx", [&] {
      const scalar_t* s = student_logits.const_data_ptr<scalar_t>();
      const int64_t lds = student_logits.stride(0);
      const acc_t* lpp = lpc.const_data_ptr<acc_t>();
      const index_t* ip = idxc.const_data_ptr<index_t>();
      const acc_t* tlp = tlc.defined() ? tlc.const_data_ptr<acc_t>() : nullptr;
      const double* wp = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
      double* lossp = loss.data_ptr<double>();
      scalar_t* gp = grad ? grad->data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
        TopkScratch<acc_t> scratch(tail, V, k, P.order == Order::kJSD);
        for (int64_t n = begin; n < end; ++n) {
          const double wn = wp ? wp[n] : 1.0;
          scalar_t* grow = gp ? gp + n * V : nullptr;
          if (wn == 0.0) {  // ignored row: not read (not even its indices), zero loss and gradient
            if (grow) std::fill(grow, grow + V, scalar_t(0));
            continue;
          }
          topk_row<scalar_t, acc_t, index_t>(op, P, tail, s + n * lds, lpp + n * k, ip + n * k,
                                             tlp ? tlp + n : nullptr, V, k, n, wn, scratch, lossp + n, grow);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> amid_loss_topk_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_tail_logmass, const std::optional<at::Tensor>& row_weight,
    std::string_view tail, double alpha, double lam, std::string_view divergence, std::string_view order,
    double ab_alpha, double ab_beta, double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_topk_fwd";
  const TopkTail tl = parse_tail(op, tail);
  check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tl,
                  temperature);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  at::Tensor loss = at::zeros({N}, student_logits.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student_logits.options()) : at::empty({0}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->to(at::kDouble).contiguous() : at::Tensor();
  topk_rows(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, weight, tl, alpha, lam,
            divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, loss,
            compute_grad ? &grad : nullptr);
  return {loss.to(loss_dtype(student_logits.scalar_type())), grad};
}

at::Tensor amid_loss_topk_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                  const at::Tensor& teacher_logprobs, const at::Tensor& teacher_indices,
                                  const std::optional<at::Tensor>& teacher_tail_logmass,
                                  const std::optional<at::Tensor>& row_weight, std::string_view tail, double alpha,
                                  double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                  double ab_beta, double temperature, bool detach_assistant) {
  constexpr const char* op = "amid_loss_topk_bwd";
  const TopkTail tl = parse_tail(op, tail);
  check_topk_args(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, row_weight, tl,
                  temperature);
  check_row_vector(op, "grad_loss", grad_loss, student_logits);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  at::Tensor loss = at::zeros({N}, student_logits.options().dtype(at::kDouble));
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  at::Tensor weight = grad_loss.to(at::kDouble);
  if (row_weight) weight = weight * row_weight->to(at::kDouble);
  weight = weight.contiguous();
  topk_rows(op, student_logits, teacher_logprobs, teacher_indices, teacher_tail_logmass, weight, tl, alpha, lam,
            divergence, order, ab_alpha, ab_beta, temperature, detach_assistant, loss, &grad);
  return grad;
}

// A build without the CUDA kernels (no AMID_WITH_CUDA): a clear error for CUDA tensors instead of the
// dispatcher's. With them, csrc/cuda/amid_topk_cuda.cu registers the CUDA kernels.
#ifndef AMID_WITH_CUDA
[[noreturn]] void topk_no_cuda(const char* op) {
  AMID_CHECK(false, op, "expected CPU tensors: this build of amid has no CUDA kernels (amid.amid_loss_topk runs the "
             "dense op, amid_loss_fwd, on CUDA tensors instead), but got CUDA tensors");
  throw;  // unreachable
}

std::tuple<at::Tensor, at::Tensor> amid_loss_topk_fwd_no_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, std::string_view, double, double, std::string_view, std::string_view, double,
    double, double, bool, bool) {
  topk_no_cuda("amid_loss_topk_fwd");
}

at::Tensor amid_loss_topk_bwd_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                      std::string_view, double, double, std::string_view, std::string_view, double,
                                      double, double, bool) {
  topk_no_cuda("amid_loss_topk_bwd");
}
#endif  // !AMID_WITH_CUDA

// ------------------------------------------------------------------------------------------------
// Vocab-parallel partial rows (amid/parallel.py). A rank holds the columns [v0, v0 + V_r) of every
// row. The forward's three reductions become three passes over that slice whose per-row results
// merge across slices with max and sum only (so across ranks with all_reduce MAX / SUM, O(N)):
//   R1 amid_partial_lse:  (t_max, sum e^(t/T - t_max), s_max, sum e^(s/T - s_max), bad), merged as
//       M = max m_r, S = sum S_r e^(m_r - M) into A = (M, log S), B likewise (RowLse form);
//   R2 amid_partial_mix:  given merged A, B: (lt_max, sum e^(lt - lt_max), sum tau), merged the same
//       way into Z (log1p(sum tau) or lt_max + log sum, as forward_row chooses);
//   R3 amid_partial_sums: given A, B, Z: the loss and gradient row sums (L, S_G, S_Gw, S_H, Wbar and
//       kl's bound_l, sum_l1, abs_l1), merged by sum; K and L follow as in forward_row.
// The gradient of the slice is amid_loss_bwd on the slice with the merged stats (it reduces over
// nothing). The passes and the element math are forward_row's / backward_row's; only the split of
// the reductions is new. Outputs are float64 whatever the logits' dtype (the merge of partial sums
// stays exact to double rounding). Rows with weight 0 are not read and get the neutral state
// (-inf, 0, -inf, 0, 0) / zeros; rows whose input stats hold NaN (rows found invalid by an earlier
// merge) get NaN.

constexpr int kNumPartialLse = 5;   // [t_max, t_sum, s_max, s_sum, bad]
constexpr int kNumPartialMix = 3;   // [lt_max, lt_sum, tau_sum]
constexpr int kNumPartialSums = 8;  // [L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1]

inline void check_partial_stats(const char* op, const at::Tensor& stats, const at::Tensor& logits) {
  AMID_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == kNumStats, op,
             "expected stats of shape [", logits.size(0), ", ", kNumStats, "], but got ", shape_str(stats));
  AMID_CHECK(stats.scalar_type() == at::kDouble, op, "expected stats of dtype ", at::kDouble, ", but got ",
             stats.scalar_type());
  AMID_CHECK(stats.device() == logits.device(), op, "expected stats on device ", logits.device(), ", but got ",
             stats.device());
}

template <typename scalar_t, typename acc_t>
void partial_lse_row(acc_t invT, const scalar_t* s, const scalar_t* t, int64_t V, RowScratch<acc_t>& S,
                     double* out) {
  load_scaled(t, V, invT, S.tf.data());
  load_scaled(s, V, invT, S.sf.data());
  acc_t mt, ms;
  bool bad;
  pass_max(S.tf.data(), S.sf.data(), V, mt, ms, bad);
  out[0] = -kInf<double>;
  out[1] = 0;
  out[2] = -kInf<double>;
  out[3] = 0;
  out[4] = bad ? 1.0 : 0.0;
  if (bad) return;
  if (mt != -kInf<acc_t>) {
    pass_exp(S.tf.data(), V, mt, S.p.data());
    out[0] = mt;
    out[1] = pass_sum(S.p.data(), V);
  }
  if (ms != -kInf<acc_t>) {
    pass_exp(S.sf.data(), V, ms, S.q.data());
    out[2] = ms;
    out[3] = pass_sum(S.q.data(), V);
  }
}

// p, q (from the merged log-normalisers) and the mixture of a slice: backward_row's first passes.
template <typename scalar_t, typename acc_t>
void partial_mixture(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, RowLse<acc_t> A,
                     RowLse<acc_t> B, RowScratch<acc_t>& S) {
  load_scaled(t, V, P.inv_temperature, S.tf.data());
  load_scaled(s, V, P.inv_temperature, S.sf.data());
  pass_exp_lse(S.tf.data(), V, A, S.p.data());
  pass_exp_lse(S.sf.data(), V, B, S.q.data());
  mixture_row(P, V, A, B, S);
}

template <typename scalar_t, typename acc_t>
void partial_mix_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, RowLse<acc_t> A,
                     RowLse<acc_t> B, RowScratch<acc_t>& S, double* out) {
  partial_mixture(P, s, t, V, A, B, S);
  const acc_t m = pass_max_of(S.lt.data(), V);
  out[0] = m;
  out[1] = 0;
  if (m != -kInf<acc_t>) {
    pass_exp(S.lt.data(), V, m, S.r.data());
    out[1] = pass_sum(S.r.data(), V);
  }
  pass_excess(row_ref_is_p(P) ? S.p.data() : S.q.data(), S.d.data(), S.lt.data(), V, S.ls.data());
  out[2] = pass_sum(S.ls.data(), V);
}

template <typename scalar_t, typename acc_t>
void partial_sums_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, RowLse<acc_t> A,
                      RowLse<acc_t> B, acc_t Z, RowScratch<acc_t>& S, double* out) {
  partial_mixture(P, s, t, V, A, B, S);
  pass_exp(S.lt.data(), V, Z, S.r.data());  // r = e^(lt - Z) with the merged Z (as backward_row)
  terms_row(P, V, A, B, Z, Z, S);  // single orders only (Z2 = Z): the partial ops refuse kJSD
  const Sums sums = pass_sums(V, S.ls.data(), S.gs.data(), S.hs.data(), S.r.data(), S.w.data());
  out[0] = sums.L;
  out[1] = sums.S_G;
  out[2] = sums.S_Gw;
  out[3] = sums.S_H;
  out[4] = sums.Wbar;
  out[5] = out[6] = out[7] = 0;
  if (P.divergence == Divergence::kKL) pass_kl_loss_parts(V, S.lbs.data(), S.l1s.data(), out[5], out[6], out[7]);
}

// The row loop shared by the three partial ops: skips rows of weight 0 (zeros, or `skipped` for
// R1), fills rows whose input stats hold NaN with NaN, and calls row(n, s_row, t_row, out_row).
template <typename scalar_t, typename F>
void partial_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& weight,
                  const double* stp, at::Tensor& out, const double* skipped, F&& row) {
  const int64_t N = student_logits.size(0), V = student_logits.size(1), k = out.size(1);
  if (N == 0) return;
  const scalar_t* s = student_logits.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher_logits.const_data_ptr<scalar_t>();
  const int64_t lds = student_logits.stride(0), ldt = teacher_logits.stride(0);
  double* op = out.data_ptr<double>();
  const bool wd = weight.defined();
  const bool w64 = wd && weight.scalar_type() == at::kDouble;
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    using acc_t = at::opmath_type<scalar_t>;
    RowScratch<acc_t> scratch(V, false);
    for (int64_t n = begin; n < end; ++n) {
      double* o = op + n * k;
      const double wn =
          !wd ? 1.0 : (w64 ? weight.const_data_ptr<double>()[n] : double(weight.const_data_ptr<float>()[n]));
      if (wn == 0.0) {
        for (int64_t i = 0; i < k; ++i) o[i] = skipped ? skipped[i] : 0.0;
        continue;
      }
      if (stp) {
        bool nan = false;
        for (int i = 0; i < kNumStats; ++i) nan |= std::isnan(stp[n * kNumStats + i]);
        if (nan) {
          std::fill(o, o + k, std::numeric_limits<double>::quiet_NaN());
          continue;
        }
      }
      row(n, s + n * lds, t + n * ldt, V, scratch, o);
    }
  });
}

at::Tensor amid_partial_lse_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                const std::optional<at::Tensor>& row_weight, double temperature) {
  constexpr const char* op = "amid_partial_lse";
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  const int64_t N = student_logits.size(0);
  at::Tensor out = at::empty({N, kNumPartialLse}, student_logits.options().dtype(at::kDouble));
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  static const double skipped[kNumPartialLse] = {-kInf<double>, 0.0, -kInf<double>, 0.0, 0.0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_partial_lse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Validates temperature exactly as the forward does (the other options are unused here).
    const auto P = make_params<acc_t>(op, 0.0, 0.0, "kl", "pr", 0.2, 0.7, temperature, false);
    partial_rows<scalar_t>(student_logits, teacher_logits, weight, nullptr, out, skipped,
                           [&](int64_t, const scalar_t* s, const scalar_t* t, int64_t V, RowScratch<acc_t>& S,
                               double* o) { partial_lse_row<scalar_t, acc_t>(P.inv_temperature, s, t, V, S, o); });
  });
  return out;
}

template <int kCols, bool kWithZ>
at::Tensor amid_partial_pass_cpu(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                 double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                 double ab_beta, double temperature, bool detach_assistant) {
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  check_partial_stats(op, stats, student_logits);
  AMID_CHECK(order != "jsd", op, "expected order to be one of 'pr', 'qr', 'rp', 'rq' (the combined order 'jsd' is not ",
             "available vocab-parallel yet), but got 'jsd'");
  const int64_t N = student_logits.size(0);
  at::Tensor out = at::empty({N, kCols}, student_logits.options().dtype(at::kDouble));
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  at::Tensor st = stats.contiguous();
  const double* stp = st.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_partial_pass_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    partial_rows<scalar_t>(
        student_logits, teacher_logits, weight, stp, out, nullptr,
        [&](int64_t n, const scalar_t* s, const scalar_t* t, int64_t V, RowScratch<acc_t>& S, double* o) {
          const double* r = stp + n * kNumStats;
          const RowLse<acc_t> A{acc_t(r[kStatAMax]), acc_t(r[kStatALog])}, B{acc_t(r[kStatBMax]), acc_t(r[kStatBLog])};
          if constexpr (kWithZ) {
            partial_sums_row<scalar_t, acc_t>(P, s, t, V, A, B, acc_t(r[kStatZ]), S, o);
          } else {
            partial_mix_row<scalar_t, acc_t>(P, s, t, V, A, B, S, o);
          }
        });
  });
  return out;
}

at::Tensor amid_partial_mix_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                double ab_beta, double temperature, bool detach_assistant) {
  return amid_partial_pass_cpu<kNumPartialMix, false>("amid_partial_mix", student_logits, teacher_logits, row_weight,
                                                      stats, alpha, lam, divergence, order, ab_alpha, ab_beta,
                                                      temperature, detach_assistant);
}

at::Tensor amid_partial_sums_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                 double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                 double ab_beta, double temperature, bool detach_assistant) {
  return amid_partial_pass_cpu<kNumPartialSums, true>("amid_partial_sums", student_logits, teacher_logits, row_weight,
                                                      stats, alpha, lam, divergence, order, ab_alpha, ab_beta,
                                                      temperature, detach_assistant);
}

}  // namespace

std::string cpu_loop_isa() {
#if defined(AMID_X86_CLONES) && defined(AMID_CPU_TARGET)
  return AMID_STR(AMID_CPU_TARGET);
#elif defined(AMID_X86_CLONES)
  // The resolver's choice (GCC picks the highest level the CPU supports).
  return __builtin_cpu_supports("x86-64-v4") ? "x86-64-v4" : __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3"
                                                                                                   : "baseline";
#else
  return "baseline";
#endif
}

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY_IMPL(amid, CPU, m) {
  m.impl("amid_loss_fwd", &amid_loss_fwd_cpu);
  m.impl("amid_loss_bwd", &amid_loss_bwd_cpu);
  m.impl("scale_grad_", &scale_grad_cpu_);
  m.impl("amid_partial_lse", &amid_partial_lse_cpu);
  m.impl("amid_partial_mix", &amid_partial_mix_cpu);
  m.impl("amid_partial_sums", &amid_partial_sums_cpu);
  m.impl("amid_loss_topk_fwd", &amid_loss_topk_fwd_cpu);
  m.impl("amid_loss_topk_bwd", &amid_loss_topk_bwd_cpu);
}

#ifndef AMID_WITH_CUDA
// A build without CUDA kernels: registered here so that CUDA tensors get a clear error (with them,
// csrc/cuda/amid_topk_cuda.cu registers the CUDA kernels of the sparse-teacher ops).
TORCH_LIBRARY_IMPL(amid, CUDA, m) {
  m.impl("amid_loss_topk_fwd", &amid_loss_topk_fwd_no_cuda);
  m.impl("amid_loss_topk_bwd", &amid_loss_topk_bwd_no_cuda);
}
#endif

}  // namespace amid

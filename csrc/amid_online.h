// amid_online.h -- the AMiD row reductions in online ("flash") form, for kernels that see a row in
// pieces: each thread / CTA accumulates its elements, partial states merge in any order, and a
// final step gives the row statistics. Host + device, so tests/cpp checks it on the CPU against
// the CPU kernel (which sees whole rows and sums directly).
//
// Two reductions per row (spec §3.3):
//   R1  OnlineLSE over t/T and s/T                      -> A = LSE(t/T), B = LSE(s/T)
//   R2  RowAcc over lt (needs A, B)                     -> Z = LSE(lt), the loss L, S_G and K
//       (JsdRowAcc for the combined order 'jsd': the pr and qr states side by side)
// R2 keeps Z-dependent sums relative to the running max m of lt: with rho = e^(lt - m),
// S = sum rho, r = rho / S and Z = m + log S, a sum of r^c f is (sum rho^c f) / S^c, and when m
// grows by d every such sum is multiplied by e^(-c d). The loss-specific sums (fields f below),
// their exponents c and the closing formulas are derived in the spec §3.4 / §4 and restated at
// each case.
#pragma once

#include "amid_math.h"

namespace amid {

// e^(c d) for a sum of exponent c, with the convention that exponent-0 sums never scale (avoids
// 0 * inf when d = -inf, i.e. when the other side was empty).
template <class M, typename T>
AMID_HD T rescale_factor(T c, T d) {
  return c == T(0) ? T(1) : M::exp(c * d);
}

// Log-sum-exp in online form, with the NaN / +inf detector of the validity check.
// The sum is kept in base 2: s = sum 2^(x L - m2), L = log2(e) in T and m2 = m L rounded, so that each term of a
// chunk is one FMA and one exponential (on the GPU FFMA + MUFU.EX2, where e^(x - m) took FADD, FMUL and MUFU.EX2:
// two instructions per element of R1 fewer, both sides). As e^(x - m) with its product (x - m) L rounded, each
// term is e^((x - m) L ln 2) up to the rounding of its argument, times 2^delta, delta = m L - m2 (|delta| <= half
// an ulp of m2): a factor common to every term, which log_sum takes back exactly (delta by one FMA). So L's own
// rounding still multiplies x - m only, never x (which can be 1e4 times larger).
// delta grows with m (half an ulp of m L): past |m| = 2^(D + 6) (D = 24 digits in float, 53 in double; 2^30 and
// 2^59) 2^delta could overflow, and so could m L itself (|m| > 2.4e38 in float). There the scale is L 2^-j instead
// (lf), with j such that |m lf| is in [2^(D+5), 2^(D+6)) L: |delta| stays at most 2^6 (half an ulp of m2), and
// every x other than m, which differs from it by at least an ulp of m, gets a term below 2^-92 of m's (an ulp of m
// times lf is 2^6 L), where its true share e^(x - m) <= e^-64 is as negligible: the sum is the count of the
// elements equal to m, as it should be. A side whose scale changes drops its sum the same way (the two maxima are at least that
// far apart), so raise and merge multiply by 0 there instead of by 2^(m2 - m2') in mixed units.
template <typename T>
struct OnlineLSE {
  static constexpr T kL = T(kLog2e);
  static constexpr int kD = std::numeric_limits<T>::digits;
  T m = neg_inf<T>(), m2 = neg_inf<T>(), s = T(0), lf = kL;
  static AMID_HD T scale_of(T m) {
    using std::fabs;
    if (!(fabs(m) >= std::ldexp(T(1), kD + 6)) || !(fabs(m) < std::numeric_limits<T>::infinity())) return kL;
    int e;  // |m| in [2^(e-1), 2^e)
    std::frexp(m, &e);
    return std::ldexp(kL, kD + 6 - e);
  }
  // The factor that takes a sum from reference (m2, lf) to (m2n, lfn): 2^(m2 - m2n) at the same scale, else 0.
  template <class M>
  static AMID_HD T rescale(T m2, T lf, T m2n, T lfn) {
    return lf == lfn ? M::exp2(m2 - m2n) : T(0);
  }
  template <class M>
  AMID_HD void add(T x) {
    if (x > m) {  // also false for NaN / -inf: those never move the max
      const T lx = scale_of(x), x2 = x * lx;
      s = s * rescale<M>(m2, lf, x2, lx) + M::exp2(fma_t(x, lx, -x2));  // m = -inf: s = 0 * 0 + 2^(x L - x2)
      m = x;
      m2 = x2;
      lf = lx;
    } else if (x != neg_inf<T>()) {
      s += M::exp2(fma_t(x, lf, -m2));
    }
  }
  // The state without its caches (m2 and lf are functions of m, as raise, add and merge set them): what the GPU
  // kernels' block and cluster reductions keep in shared memory and exchange, 2 values instead of 4 (static shared
  // memory decides whether three kl CTAs fit per SM).
  struct Packed {
    T m, s;
  };
  AMID_HD Packed pack() const { return Packed{m, s}; }
  static AMID_HD OnlineLSE unpack(const Packed& p) {
    OnlineLSE o;
    o.m = p.m;
    o.s = p.s;
    o.lf = scale_of(p.m);
    o.m2 = p.m * o.lf;
    return o;
  }
  // p's sum taken to a maximum mx >= p.m (merge's factor on the side with the smaller maximum, without the sum it is
  // added to), so that the sums of states taken to their common maximum add: the GPU kernels' R1 reductions take the
  // maxima first, then these, then plain sums (amid_loss_kernels.cuh: lse_group_reduce). p.m = mx (an all -inf group
  // too) keeps the sum as it is.
  template <class M>
  static AMID_HD T sum_to(const Packed& p, T mx) {
    const OnlineLSE a = unpack(p);
    const T lx = scale_of(mx);
    const T f = rescale<M>(a.m2, a.lf, mx * lx, lx);
    return p.m == mx ? p.s : p.s * f;
  }
  // log(sum e^(x - m)), so that the log-sum-exp is m + log_sum (RowLse{m, log_sum}): the log of s without the
  // common factor 2^delta (1 where m is not finite: an all -inf side, or +inf, an invalid row either way). The
  // factor comes off s before the log: log s - delta ln 2 would cancel, up to |delta| 2^-24 absolute (|m| ~ 2^30).
  template <class M>
  AMID_HD T log_sum() const {
    const bool finite = (m > neg_inf<T>()) & (m < std::numeric_limits<T>::infinity());
    return M::log(finite ? s * M::exp2(-fma_t(m, lf, -m2)) : s);
  }
  // n elements at once (the GPU kernels' vector chunk) in three steps, which LseAcc::add_chunk runs for both
  // sides with one branch: the chunk's maximum (chunk_max); the running max raised to it, at most once per
  // chunk and rarely after the first chunks (raise); one exponential per element relative to it
  // (sum_chunk; M::exp2_approx: on the GPU a single MUFU.EX2). NaN never moves the max (it is summed, and
  // makes s NaN); +inf moves it and sums inf - inf = NaN: both leave s NaN, which the caller reads as an
  // invalid row (LseAcc::invalid).
  template <int n>
  static AMID_HD T chunk_max(const T* x) {
    using std::fmax;  // fmax(c, NaN) = c: one FMNMX on the GPU
    T cm = neg_inf<T>();
#pragma unroll
    for (int j = 0; j < n; ++j) cm = fmax(cm, x[j]);
    return cm;
  }
  // The running max raised to cm where cm is larger, the sum rescaled to it. The chunk's maximum then adds
  // M::exp2_approx(delta) in sum_chunk: on the GPU MUFU.EX2's value near 0, which need not be 2^delta exactly
  // (unmeasured; the C++ tests' emulation gives it its worst error, 2^-22). That term is the largest of the row's
  // sum, and its error would move A and B the same way in every row (3e-7 in the emulation, the one float gradient
  // above issue 9's 1e-4: kl/jsd at alpha 3, lam 0.1, 1.14e-4; with this 4.6e-5). So raise adds 2^delta less the
  // approximate value at the same argument once, here in the cold block (0 where the exponential is exact, as the
  // host's library math).
  // A tie with the maximum (another element equal to it) keeps its error, as before.
  // kRaw: R1 on the unscaled logits of a row at temperature T (invT = 1 / T; the GPU kernels at T != 1): the state
  // of the scaled logits x / T kept on the raw ones, m the raw maximum and lf the scale of raw logits, scale_of(m / T)
  // / T (L / T in the ordinary range), so that each term is still one FMA of the raw logit and no element takes a
  // product by 1 / T; `unscale` then gives the state of the scaled logits.
  template <class M, bool kRaw = false>
  AMID_HD void raise(T cm, T invT = T(1)) {
    if (cm > m) {  // a new running max
      const T lc = kRaw ? scale_of(cm * invT) * invT : scale_of(cm);
      const T c2 = cm * lc, dc = fma_t(cm, lc, -c2);  // dc: the maximum's own argument, delta
      s = s * rescale<M>(m2, lf, c2, lc) + (M::exp2(dc) - M::exp2_approx(dc));  // m = -inf: s = 0 (+ the correction)
      m = cm;
      m2 = c2;
      lf = lc;
    }
  }
  // A kRaw state (raise) made the state of the scaled logits: the maximum m / T (the largest scaled logit, rounding being
  // monotone) with its own scale, and s times 2^(delta' - delta) for the two states' common factors (delta = m lf - m2,
  // see above; where the difference could overflow, |delta| <= 2^7 each, as two exponentials). Its terms differ from
  // those of R1 on the scaled logits by the rounding of lf = L / T instead of that of each x / T: 2^-24 relative of
  // (x - m) L / T where the scaled R1 had 2^-24 of x L / T; where 1 / T is a power of two they are the same values, and
  // so is the state (delta' = delta, a factor of exactly 1). An all -inf side, or +inf / NaN (an invalid row), keeps
  // its sum.
  template <class M>
  AMID_HD void unscale(T invT) {
    using std::fabs;
    const T ms = m * invT, ls = scale_of(ms), m2s = ms * ls;
    const bool finite = (m > neg_inf<T>()) & (m < std::numeric_limits<T>::infinity());
    const T dr = fma_t(m, lf, -m2), ds = fma_t(ms, ls, -m2s), d = ds - dr;
    if (finite) s = fabs(d) < T(64) ? s * M::exp2(d) : s * M::exp2(-dr) * M::exp2(ds);
    m = ms;
    m2 = m2s;
    lf = ls;
  }
  // The terms of a chunk once m >= its max. While every element so far was -inf they are taken relative to
  // float's lowest value instead of m2 = -inf (x L - m2 would be NaN for x = -inf): -inf adds 0, NaN adds NaN.
  // (A branch that skipped such chunks also skipped a NaN in them, among -inf only, before the first finite
  // logit: the row read as valid, the NaN as a masked entry.)
  template <class M, int n>
  AMID_HD void sum_chunk(const T* x) {
    using std::fmax;
    const T ms2 = fmax(m2, std::numeric_limits<T>::lowest());  // m2, unless m2 = -inf
#pragma unroll
    for (int j = 0; j < n; ++j) s += M::exp2_approx(fma_t(x[j], lf, -ms2));
  }
  // Branch-free, with one exponential: the side with the larger max keeps its sum, the other's is
  // scaled by 2^(lo.m2 - hi.m2) (0 for an empty side, m = -inf; 1 for equal maxima). A side with m = +inf
  // has s NaN already (add_chunk), and the result stays NaN (invalid).
  template <class M>
  AMID_HD void merge(const OnlineLSE& o) {
    const bool ge = m >= o.m;
    const T e = m == o.m ? T(1) : (ge ? rescale<M>(o.m2, o.lf, m2, lf) : rescale<M>(m2, lf, o.m2, o.lf));
    s = s * (ge ? T(1) : e) + o.s * (ge ? e : T(1));
    m = ge ? m : o.m;
    m2 = ge ? m2 : o.m2;
    lf = ge ? lf : o.lf;
  }
};

// R1 state: both log-sum-exps (a NaN sum where a NaN or +inf was seen) and each side's smallest logit (bounded: every
// logit finite with |x| < 2^100, so the row can take the BoundedRow math policy; the largest is the running max).
template <typename T>
struct LseAcc {
  OnlineLSE<T> t, s;
  // The smallest x of each side (fmin ignores NaN; -inf gives -inf): the bounded test, and with the maxima the bounds
  // of every element's lp - lq (near_gaps). A NaN or +inf logit leaves t.s NaN (add; add_chunk's sums turn NaN by
  // themselves), which invalid() reads.
  T lo_t = std::numeric_limits<T>::infinity(), lo_s = std::numeric_limits<T>::infinity();
  template <class M>
  AMID_HD void add(T tv, T sv) {
    using std::fmin;
    const bool ok = (tv < std::numeric_limits<T>::infinity()) & (sv < std::numeric_limits<T>::infinity());
    lo_t = fmin(lo_t, tv);
    lo_s = fmin(lo_s, sv);
    t.template add<M>(tv);
    s.template add<M>(sv);
    t.s = ok ? t.s : std::numeric_limits<T>::quiet_NaN();  // (NaN stays NaN through every later add, raise and merge)
  }
  // Both sides' chunk steps (OnlineLSE: chunk_max, raise, sum_chunk), with one branch for a new running max
  // on either (rarely taken). MIN = false leaves the chunk out of the minima: for a caller that takes the minima of
  // the unscaled 16-bit logits itself, two to an instruction (amid_loss_kernels.cuh: PackedMin), and folds them in
  // by add_min.
  // kRaw: tv, sv are the unscaled logits of a row at temperature 1 / invT (OnlineLSE::raise; then unscale).
  template <class M, int n, bool MIN = true, bool kRaw = false>
  AMID_HD void add_chunk(const T* tv, const T* sv, T invT = T(1)) {
    using std::fmin;
    if constexpr (MIN) {
#pragma unroll
      for (int j = 0; j < n; ++j) lo_t = fmin(lo_t, tv[j]), lo_s = fmin(lo_s, sv[j]);
    }
    const T ct = OnlineLSE<T>::template chunk_max<n>(tv), cs = OnlineLSE<T>::template chunk_max<n>(sv);
    if ((ct > t.m) | (cs > s.m)) {  // a new running max on either side
      t.template raise<M, kRaw>(ct, invT);
      s.template raise<M, kRaw>(cs, invT);
    }
    t.template sum_chunk<M, n>(tv);
    s.template sum_chunk<M, n>(sv);
  }
  // The state of the scaled logits from one of add_chunk<..., kRaw = true> (OnlineLSE::unscale; the minima too).
  template <class M>
  AMID_HD void unscale(T invT) {
    t.template unscale<M>(invT);
    s.template unscale<M>(invT);
    lo_t *= invT;
    lo_s *= invT;
  }
  // NaN or +inf seen (a NaN sum), or a side that is all -inf.
  AMID_HD bool invalid() const {
    return (t.s != t.s) | (s.s != s.s) | (t.m == neg_inf<T>()) | (s.m == neg_inf<T>());
  }
  // Every logit in (-2^100, 2^100): the running maxima below 2^100 and the minima above -2^100.
  AMID_HD bool bounded() const {
    constexpr T kB = T(1.2676506002282294e30);  // 2^100
    return (t.m < kB) & (s.m < kB) & (lo_t > -kB) & (lo_s > -kB);
  }
  // The minima of logits summed with add_chunk<M, n, false> (fmin: a NaN, +inf when there were none, leaves them).
  AMID_HD void add_min(T xt, T xs) {
    lo_t = std::fmin(lo_t, xt);
    lo_s = std::fmin(lo_s, xs);
  }
  template <class M>
  AMID_HD void merge(const LseAcc& o) {
    t.template merge<M>(o.t);
    s.template merge<M>(o.s);
    lo_t = lo_t < o.lo_t ? lo_t : o.lo_t;
    lo_s = lo_s < o.lo_s ? lo_s : o.lo_s;
  }
  // Without the caches (OnlineLSE::Packed), for the GPU reductions: merged through the full state, the same bits.
  struct Packed {
    typename OnlineLSE<T>::Packed t, s;
    T lo_t, lo_s;
    template <class M>
    AMID_HD void merge(const Packed& o) {
      LseAcc a = unpack(*this);
      a.template merge<M>(unpack(o));
      *this = a.pack();
    }
  };
  AMID_HD Packed pack() const { return Packed{t.pack(), s.pack(), lo_t, lo_s}; }
  static AMID_HD LseAcc unpack(const Packed& p) {
    LseAcc a;
    a.t = OnlineLSE<T>::unpack(p.t);
    a.s = OnlineLSE<T>::unpack(p.s);
    a.lo_t = p.lo_t;
    a.lo_s = p.lo_s;
    return a;
  }
};

// The condition of a row loss from its closing formula: its error bound (in the units of L; eps times it is
// about the error) over |L|; 0 when both are 0 (p = q: every term vanishes). Where this exceeds kExactCond
// the online kernels take the row's sums from the exact pass (ExactAcc): the closing formulas' first-order
// terms then cancel to a result that is far smaller than they are (Z not small next to the divergence), or
// ab's shifted terms grow as e^(g |Z|). The loss stands for the gradient's row sums, which come from the same
// sums by the same kind of formula. Measured in tests/cpp (float, the CUDA kernels' emulated math): see
// test_online_float.
constexpr double kExactCond = 16;
template <typename T>
AMID_HD T cond_of(T bound_L, T L) {
  const T a = abs_nn(L);
  return a > T(0) ? bound_L / a : (bound_L > T(0) ? std::numeric_limits<T>::infinity() : T(0));
}

// R2 state for loss (D, O). Fields: m (running max of lt), pm = e^m (and for ab e^(c m), e^(g m)),
// S = sum rho, Wb = sum rho w (w - (1 - lam) in rp / rq: see add), and up to
// five loss-specific sums f[i] with exponents c_i (c = 0: plain sums, independent of Z). o is the
// loss's reference side (p for pr / rp, q for qr / rq), d = lt - l_ref, tau = r~ - o (see
// amid_math.h: mixture, assistant_excess), U the unmasked elements.
// An element's reference-side probability o (q in qr / rq) and o^g, as RowAcc::add formed them (ab; kl: 0).
template <typename T>
struct RefPowers {
  T o, og;
};

template <Divergence D, Order O, typename T>
struct RowAcc {
  static constexpr int kF = D == Divergence::kKL ? 9 : 11;
  // kl pr / qr: the indices of sum_notU o (the reference side's masked mass) and sum_U o (its kept mass,
  // summed by itself only in the general policy; see kept_mass). rp / rq keep 1 - sum_notU o: one more
  // float in their R2 state would cost the resident kernel its third CTA per SM (shared memory).
  static constexpr bool kSumsKept = D == Divergence::kKL && (O == Order::kPR || O == Order::kQR);
  static constexpr int kMasked = (O == Order::kPR || O == Order::kQR) ? 2 : 8;
  static constexpr int kKept = 8;
  // Whether add sums w - (1 - lam) instead of w (see add).
  static constexpr bool kCenterW = O == Order::kRP || O == Order::kRQ;
  T m = neg_inf<T>(), S = T(0), Wb = T(0);
  // Powers of e^m (each <= 1: lt <= 0 up to rounding, c, g > 0), updated with m: r~ = rho e^m, and for ab
  // x^c o^(g-c) = (the sum term x^a rho^b or rho^a y^b) e^(c m) and r~^g = rho^g e^(g m), so that these
  // need no exponential of their own.
  static constexpr int kPm = D == Divergence::kKL ? 1 : 3;
  T pm[kPm] = {};
  T f[kF] = {};

  // Exponent of field i:
  //   kl pr / qr: f0 = -sum_U o d, f1 = sum_U o w, f2 = sum_notU o, f3 = sum tau,
  //               f4 = sum_U tau w + sum_notU r~ w                                       c = 0
  //               f5 = sum_U o phi1(d), f6 = sum_notU r~, f7 = sum_U o |d|, f8 = sum_U o  c = 0
  //   kl rp / rq: f0 = sum_U rho, f1 = sum_U rho d, f2 = sum_U rho w, f3 = sum_U rho w d  (c = 1),
  //               f4 = sum tau, f5 = sum_U o phi2(d), f6 = sum_notU r~, f7 = sum_U o |d|,
  //               f8 = sum_notU o                                                         (c = 0)
  //   (phi1(d) = e^d - 1 - d and phi2(d) = 1 + (d - 1) e^d: the second-order KL element functions of
  //   amid_math.h's element_terms, here of d = lt - l_ref, before Z is known; see finalize.)
  //   ab pr / qr: f0 = sum x^a rho^b, f1 = sum x^a rho^b w (c = b), f2 = sum x^g (c = 0),
  //               f3 = sum rho^g, f4 = sum rho^g w (c = g)     (x = p or q, g = a + b)
  //   ab rp / rq: f0 = sum rho^a y^b, f1 = sum rho^a y^b w (c = a), f2 = sum y^g (c = 0),
  //               f3 = sum rho^g, f4 = sum rho^g w (c = g)     (y = p or q)
  //   ab, relative to o (amid_math.h: ab_terms_one_series, with v = d):  f5 = sum o^g w, f6 = sum Pcd,
  //               f7 = sum Ts, f8 = sum Pcd w, f9 = sum Ts w, f10 = sum tau               c = 0
  //               (Ts: Hc or Gd, ab_series_is_gd; the other from these, in finalize)
  static AMID_HD T exponent(const LossParams<T>& P, int i) {
    if constexpr (D == Divergence::kKL) {
      return (O == Order::kRP || O == Order::kRQ) && i < 4 ? T(1) : T(0);
    } else {
      const T c01 = (O == Order::kPR || O == Order::kQR) ? P.ab_b : P.ab_a;
      return i < 2 ? c01 : (i == 2 || i >= 5 ? T(0) : P.ab_g);
    }
  }

  // Raise the reference max to mx (>= m), rescaling every Z-dependent sum.
  // The whole rescaling sits in the block of the new maximum: a row's running maximum grows O(log n)
  // times per thread, and the steady state is one comparison (bench/sass_gauge.py counts that block as cold).
  template <class M>
  AMID_HD void rebase(const LossParams<T>& P, T mx) {
    if constexpr (M::kFixedShift) return;  // m stays 0 (begin)
    if (mx > m) {
      if (m != neg_inf<T>()) {
        const T d = m - mx;
        const T e1 = M::exp(d);
        S *= e1;
        Wb *= e1;
#pragma unroll
        for (int i = 0; i < kF; ++i) {
          const T c = exponent(P, i);
          f[i] *= (c == T(1) ? e1 : rescale_factor<M>(c, d));
        }
      }
      m = mx;
      pm[0] = M::exp(mx);
      if constexpr (kPm == 3) {
        pm[1] = M::exp(P.ab_c * mx);
        pm[2] = M::exp(P.ab_g * mx);
      }
    }
  }

  // The state R2 starts from: m = 0 for the FixedShift policy (amid_math.h), which never raises it (so e^(c m) = 1);
  // else m = -inf, raised by the first element.
  template <class M>
  AMID_HD void begin() {
    if constexpr (M::kFixedShift) {
      m = T(0);
#pragma unroll
      for (int i = 0; i < kPm; ++i) pm[i] = T(1);
    }
  }
  // Whether a FixedShift R2's sums hold the row well enough (amid_math.h: FixedShift, kFixedShiftMinS); false also
  // for S NaN. Else the kernel runs R2 again under the running maximum.
  AMID_HD bool shift_ok() const { return S >= T(kFixedShiftMinS); }

  // One element; the caller has already rebased to m >= lt. lp, lq may be -inf.
  // In the rp / rq orders (kCenterW) every w-weighted sum (Wb and the fields with w) takes w - (1 - lam)
  // instead of w: 1 - lam is w where p = q (in every mixture mode; exactly w in the student, teacher and
  // geometric ones), so the summed weights are O(d), not O(1). K = S_Gw - Wbar S_G + S_H is unchanged in
  // exact arithmetic (S_Gw moves by -w0 S_G, Wbar by -w0: finalize's forms of S_Gw are linear in the
  // w-sums), but its two products no longer cancel: with lam <= 0.1 (r ~ q) K was their small difference
  // (Z's error times Wbar ~ 1), and the emulated float gradient of kl/rq and ab/rq was off by 2.0e-4
  // normwise (tests/cpp, ordinary inputs), now by 4.0e-5 and 7.4e-5. Not in pr / qr: there the
  // uncentred S_Gw carries w0 S_G, whose error cancels S_G's own in the gradient (ab/qr at alpha 0.5,
  // lam 0.02: 1.2e-4 uncentred, 6.0e-4 centred); kl's pr / qr S_G is the masked mass (no error to cancel).
  // Returns (ab) the element's o and o^g, which the 16-bit resident alpha-beta kernels of the orders whose reference is q
  // keep for W (add_from_logits_c3, amid_math.h: ab_grad_from_kept3); other callers drop them.
  template <class M>
  AMID_HD RefPowers<T> add(const LossParams<T>& P, T lp, T lq, T lt, T w_elem, T d) {
    const T w = kCenterW ? w_elem - P.one_minus_lam : w_elem;
    const bool finite_lt = M::kBounded || lt != neg_inf<T>();  // (lt is finite in a bounded row)
    const T rel = finite_lt ? lt - m : neg_inf<T>();  // log rho
    const T rho = M::exp_approx(rel);
    S += rho;
    Wb += rho * w;
    if constexpr (D == Divergence::kKL) {
      constexpr bool x_r = (O == Order::kPR || O == Order::kQR);
      const T o = M::exp_approx(ref_is_p<O>() ? lp : lq);
      // tau = r~ - o (as assistant_excess): o expm1(d) for |d| < 1/2, with expm1(d) = d + d^2 phi1(d) from
      // the series the loss term needs anyway (one series per element, not two); else rho e^m - o (no
      // cancellation there: r~ / o = e^d is outside [0.6, 1.65]). r~ = rho e^m = e^(lt - m) e^m carries
      // ~2^-22 + (|lt - m| + |m|) 2^-24 of relative error, as e^lt would (|lt| 2^-24).
      const bool small = std::fabs(d) < T(0.5);  // false for NaN / inf d
      const T d2 = d * d;
      const T p1 = phi1_div(d);
      const T tau_big = (M::kFixedShift ? rho : rho * pm[0]) - o;
      // pr / qr: o d^2 phi1(d) once, for tau (o d + it, one FMA) and for f[5] (their loss term): one instruction
      // fewer than tau as o (d + d^2 phi1) and the term as its own product
      T o_phi1 = T(0), tau;
      if constexpr (x_r) {
        o_phi1 = o * (d2 * p1);
        tau = small ? fma_t(o, d, o_phi1) : tau_big;
      } else {
        tau = small ? o * (d + d2 * p1) : tau_big;
      }
      f[x_r ? 3 : 4] += tau;
      const bool keep = M::kBounded || ((lp != neg_inf<T>()) & (lq != neg_inf<T>()));
      if (!keep) {
        f[6] += o + tau;  // r~
        if constexpr (x_r) {
          f[2] += o;
          f[4] += (o + tau) * w;
        } else {
          f[8] += o;
        }
        return {T(0), T(0)};
      }
      // sum_U o directly: 1 - sum_notU o loses its digits when most of o is masked (a top-k teacher's
      // tail under alpha >= 1), and finalize multiplies it by up to e^-Z. A bounded row has no masked
      // element (sum_U o is 1 there, up to rounding): nothing to add.
      if constexpr (kSumsKept && !M::kBounded) f[kKept] += o;
      // o phi(d), second order in d for |d| < 1/2 (the series of element_terms; phi2 / d^2 = 1 + (d - 1)
      // phi1 / d^2, which loses at most a bit at d = -1/2), else from tau = o expm1(d) = r~ - o:
      // phi1: tau - o d; phi2: o + (d - 1) r~ = d (o + tau) - tau.
      if constexpr (x_r) {
        f[0] -= o * d;
        f[1] += o * w;
        f[4] += tau * w;
        f[5] += small ? o_phi1 : tau - o * d;
      } else {
        f[0] += rho;
        f[1] += rho * d;
        f[2] += rho * w;
        f[3] += rho * w * d;
        f[5] += small ? o * d2 * (T(1) + (d - T(1)) * p1) : d * (o + tau) - tau;
      }
      f[7] += o * abs_nn(d);  // the error bound of the first-order form (d finite here: kept element)
      return {T(0), T(0)};
    } else {
      const T lo = (O == Order::kPR || O == Order::kRP) ? lp : lq;  // the non-assistant side
      // x^a rho^b (pr/qr) or rho^a y^b (rp/rq), all in log space: -inf gives 0.
      const T lxy = (O == Order::kPR || O == Order::kQR) ? P.ab_a * lo + P.ab_b * rel : P.ab_a * rel + P.ab_b * lo;
      // o^g and rho^g by exp2_approx of g log2(e) times the log (arguments <= 0), as W's ab_terms: on the C++ tests' emulation of its
      // error the worst float loss went from 6.5e-6 to 8.2e-6 relative (budget 1e-5) and the gradients got
      // better (4.0e-4 -> 2.0e-4 on ordinary inputs). x^a rho^b and o need an exponential without exp_approx's |x| 2^-24
      // (with it the loss of ab/rq at alpha = 1, lam = 0.1, and of ab/pr for o, went past 1e-5): exp_corrected, whose
      // error does not grow with the argument, for ~5 instructions fewer than expf each.
      const T xy = exp_corrected<M>(lxy);
      const T og = M::exp2_approx(P.ab_g_log2e * lo);
      const T rg = M::exp2_approx(P.ab_g_log2e * rel);
      f[0] += xy;
      f[1] += xy * w;
      f[2] += og;
      f[3] += rg;
      f[4] += rg * w;
      // W's element terms at v = d (lt - lo, before Z is known), divided by the small exponents (ab_terms_pow):
      // from r~^g and x^c o^(g-c) (the assistant's powers). Of Hc and Gd the sums take the series term Ts (and Pcd),
      // with w too, and finalize forms the other from them (Gd = Hc - g Pcd): formed per element, it cost an FMA and
      // a select or two (bf16 sm_90a R2: ab/rq 105.0 -> 103.9 per element, ab/pr 108.25 -> 103.9). The emulated
      // float errors stay within their budgets (tests/cpp; the worst gradient, ordinary bf16 inputs with a teacher
      // offset of 300, 5.7e-5 -> 7.0e-5 of 1e-4).
      const AbSeriesTerms<T> at = ab_terms_one_series<M>(P, d, og, M::kFixedShift ? rg : rg * pm[2],
                                                          M::kFixedShift ? xy : xy * pm[1]);
      f[5] += og * w;
      f[6] += at.Pcd;
      f[7] += at.Ts;
      f[8] += at.Pcd * w;
      f[9] += at.Ts * w;
      // tau = r~ - o as for kl: the series for |d| < 1/2, else rho e^m - o.
      const T o = exp_corrected<M>(lo);
      f[10] += std::fabs(d) < T(0.5) ? o * M::expm1_small(d) : (M::kFixedShift ? rho : rho * pm[0]) - o;
      return {o, og};
    }
  }

  // Whether field i is a plain sum (exponent 0, independent of the running max) for every P.
  static constexpr bool plain(int i) {
    if constexpr (D == Divergence::kKL) {
      return !((O == Order::kRP || O == Order::kRQ) && i < 4);
    } else {
      return i == 2 || i >= 5;
    }
  }

  // Merge: the side with the larger running max keeps its Z-dependent sums and powers of e^m, the
  // other's sums are scaled by e^(c dm), dm = lo.m - hi.m <= 0 (-inf for a side that saw no finite lt,
  // whose Z-dependent sums are 0: scaled to 0; 0 for equal maxima); plain sums add as they are. Where
  // the old merge rebased both operands with two accurate exponentials each, this takes one approximate
  // exponential per exponent class and a multiply-add per scaled field.
  // The factors of a merge, from the two running maxima: which side is larger, and e^(c dm) for the
  // exponents c = 1 (S, Wb; kl rp / rq: f0..f3) and, for ab, c01 (f0, f1) and g (f3, f4).
  struct MergeScale {
    bool ge;
    T e1, e_c01, e_g;
  };
  template <class M>
  static AMID_HD MergeScale merge_scale(const LossParams<T>& P, T m_a, T m_b) {
    MergeScale k;
    k.ge = m_a >= m_b;
    const bool same = m_a == m_b;
    const T dm = same ? T(0) : (k.ge ? m_b - m_a : m_a - m_b);
    // (exp_approx: the scaled side's share of the merged sum is e^(c dm), so the factor's relative error,
    // ~2^-22 + c |dm| 2^-24, costs the sum at most ~2^-22 relative per merge. 1 for equal maxima, as every merge
    // of a FixedShift R2 (m = 0) has: the GPU's ex2.approx(0) is 1, the C++ tests' emulation of it is not)
    k.e1 = same ? T(1) : M::exp_approx(dm);
    k.e_c01 = k.e_g = k.e1;
    if constexpr (D == Divergence::kAB) {  // (an exponent that underflowed to 0 in T: no scaling, as rescale_factor)
      const T c01 = exponent(P, 0), g = exponent(P, 3);
      k.e_c01 = same | (c01 == T(0)) ? T(1) : M::exp_approx(c01 * dm);
      k.e_g = same | (g == T(0)) ? T(1) : M::exp_approx(g * dm);
    }
    return k;
  }
  template <class M>
  AMID_HD void merge(const LossParams<T>& P, const RowAcc& o) {
    merge_scaled(merge_scale<M>(P, m, o.m), o);
  }
  AMID_HD void merge_scaled(const MergeScale& k, const RowAcc& o) {
    // The side with the smaller max is scaled: o's sums (ge), or this one's (two arms: in a warp's
    // butterfly both run, each a multiply-add per scaled field).
    // (The plain sums after the branch: on the GPU, o's fields arrive by warp shuffles, which cannot run
    // in divergent code, so every field a branch reads is live before it; the plain ones can wait.)
    auto factor = [&](int i) { return D == Divergence::kKL ? k.e1 : (i < 2 ? k.e_c01 : k.e_g); };
    if (k.ge) {
      S += o.S * k.e1;
      Wb += o.Wb * k.e1;
#pragma unroll
      for (int i = 0; i < kF; ++i) {
        if (!plain(i)) f[i] += o.f[i] * factor(i);
      }
    } else {
      S = S * k.e1 + o.S;
      Wb = Wb * k.e1 + o.Wb;
#pragma unroll
      for (int i = 0; i < kF; ++i) {
        if (!plain(i)) f[i] = f[i] * factor(i) + o.f[i];
      }
#pragma unroll
      for (int i = 0; i < kPm; ++i) pm[i] = o.pm[i];
      m = o.m;
    }
#pragma unroll
    for (int i = 0; i < kF; ++i) {
      if (plain(i)) f[i] += o.f[i];
    }
  }

  // The state's plain sums (S, Wb and every field): where every state's m is 0 and its powers of e^m are 1 (a
  // FixedShift R2: begin, and rebase does nothing), merge's factors are all 1 (merge_scale: equal maxima) and merging
  // is adding these, the same bits (x + y * 1 rounds as x + y). The GPU's reduction of such states shuffles and adds
  // these kF + 2 values only (amid_loss_kernels.cuh), not m and the powers, and computes no factors.
  struct Sums {
    T S, Wb, f[kF];
    AMID_HD void add(const Sums& o) {
      S += o.S;
      Wb += o.Wb;
#pragma unroll
      for (int i = 0; i < kF; ++i) f[i] += o.f[i];
    }
  };
  AMID_HD Sums sums() const {
    Sums u;
    u.S = S, u.Wb = Wb;
#pragma unroll
    for (int i = 0; i < kF; ++i) u.f[i] = f[i];
    return u;
  }
  AMID_HD void set_sums(const Sums& u) {
    S = u.S, Wb = u.Wb;
#pragma unroll
    for (int i = 0; i < kF; ++i) f[i] = u.f[i];
  }

  // kl: sum_U o, the reference side's unmasked mass. pr / qr: 1 when nothing is masked (every bounded row,
  // where add does not sum it), else the direct sum (1 - sum_notU o cancels when most of o is masked, as
  // under a top-k teacher with alpha >= 1); rp / rq: 1 - sum_notU o.
  AMID_HD T kept_mass() const {
    if constexpr (kSumsKept) {
      return f[kMasked] > T(0) ? f[kKept] : T(1);
    } else if constexpr (D == Divergence::kKL) {
      return T(1) - f[kMasked];
    } else {
      return T(1);
    }
  }

  // Closing formulas: Z, the row loss L and the gradient's row scalars S_G and K (for kl, the
  // shifted S_G', K' of element_terms). Returns false when the assistant is undefined (no element
  // with finite lt).
  // Also the loss's error bound in units of its rounding (bound_L: the sum of the magnitudes of the terms that
  // the chosen closing form adds; eps bound_L is about its error), which says when the exact pass is wanted
  // (cond_of).
  template <class M>
  AMID_HD bool finalize(const LossParams<T>& P, T log_S, T& Z, T& L, T& S_G, T& K, T& bound_L) const {
    if (!(S > T(0))) return false;
    Z = m + log_S;
    const T inv_S = T(1) / S;
    const T Wbar = Wb * inv_S;  // (in rp / rq Wbar - (1 - lam), with S_Gw moved to match: add's centred w)
    T S_Gw, S_H;
    if constexpr (D == Divergence::kKL) {
      // Z = log1p(sum tau) while that sum is small (accurate there), else the running LSE.
      const T tau_sum = f[(O == Order::kPR || O == Order::kQR) ? 3 : 4];
      const bool near = (tau_sum > T(-0.5)) & (tau_sum < T(0.5));
      Z = near ? M::log1p(tau_sum) : Z;
      // The row loss in two forms, as the CPU kernel's kl_row_loss chooses: first order (below; its
      // terms cancel when the divergence is small, leaving eps / loss relative error), and second
      // order from the sums of o phi(d) (spec §5.6): with e = d - Z, E = e^-Z and sum o = 1,
      //   o phi1(e) = E o phi1(d) + phi1(-Z) o + expm1(-Z) o d,
      //   o phi2(e) = E o phi2(d) + phi2(-Z) o - Z E tau,
      // and -o e = o phi1(e) - (r - o), r e = o phi2(e) + (r - o) on U, where sum_U (r - o) =
      // f_m - E sum_notU r~ (f_m = sum_notU o): every term is second order in the divergence, or a
      // masked mass. Error bounds in units of eps: the sum of the terms' magnitudes, and sum_U o |d| + |Z|.
      const T E = M::exp(-Z), em1 = M::expm1_from_exp(-Z, E);
      const bool zs = (Z > T(-0.5)) & (Z < T(0.5));
      const T mz = -Z;
      if constexpr (O == Order::kPR || O == Order::kQR) {
        // L = sum_U o (lo - lr) = Z (1 - f_m) - sum_U o d, with the masked mass f_m = sum_notU o;
        // S_G' = sum_U (r - o) + sum_notU r = f_m; sum G' w = sum_U (r - o) w + sum_notU r w,
        // which is Wbar - sum_U o w, a difference of O(1) sums; near Z = 0 it is taken from the
        // small sums instead: with r = r~ / (1 + S) and r~ = o + tau, (f4 - S sum_U o w) / (1 + S).
        // qr: sum H' = sum_U (-q e) - f_m = L - f_m.
        const T f_m = f[2];
        const T o_U = kept_mass();  // 1 - f_m, accurate also when f_m ~ 1
        const T L1 = f[0] + Z * o_U;
        const T phi_z = zs ? mz * mz * phi1_div(mz) : em1 + Z;  // phi1(-Z) = expm1(-Z) + Z
        const T L2 = E * (f[5] + f[6]) + phi_z * o_U - em1 * f[0] - f_m;
        const T b2 = E * (f[5] + f[6]) + phi_z * o_U + (em1 * f[0] < T(0) ? -em1 * f[0] : em1 * f[0]) + f_m;
        L = kl_row_loss(L2, b2, L1, f[7], Z);
        bound_L = kl_row_bound(b2, f[7], Z);
        S_G = f_m;
        S_Gw = near ? (f[4] - tau_sum * f[1]) / (T(1) + tau_sum) : Wbar - f[1];
        S_H = O == Order::kQR ? L - f_m : T(0);
      } else {
        // With Sr = sum_U r and R_m = 1 - Sr (exactly 0 unmasked: S and f0 add the same terms):
        // L = sum_U r (d - Z); S_G' = sum_U r e - sum_notU r = L - R_m;
        // sum G' w = sum_U r w e - sum_notU r w; rq: sum H' = sum_U (q - r) + sum_notU q = R_m.
        const T Sr = f[0] * inv_S, R_m = (S - f[0]) * inv_S;
        const T L1 = f[1] * inv_S - Z * Sr;
        const T O_m = f[8], T_U = f[4] - (f[6] - O_m);  // sum_U tau = sum tau - sum_notU (r~ - o)
        const T phi_z = zs ? mz * mz * phi2_div(mz) : T(1) - (Z + T(1)) * E;  // phi2(-Z)
        const T zt = Z * E * T_U;
        const T o_U = kept_mass();  // 1 - O_m
        const T L2 = E * f[5] + phi_z * o_U - zt + O_m - E * f[6];
        // (o_U = 1 - O_m is off by eps absolute, so its term's bound is phi_z (|o_U| + O_m) (phi2 >= 0): where
        // most of o is masked, o_U may round below 0, and the signed phi_z o_U made the bound negative and chose
        // L2 at 1e10 times its error: a top-8 teacher with Z = -20 gave -2402 for 20.8 (tests/cpp))
        const T b2 = E * f[5] + phi_z * (abs_nn(o_U) + O_m) + (zt < T(0) ? -zt : zt) + O_m + E * f[6];
        L = kl_row_loss(L2, b2, L1, f[7], Z);  // sum_U o |d| stands for sum_U r |d| (the same to first order)
        bound_L = kl_row_bound(b2, f[7], Z);
        S_G = L - R_m;
        const T Rw = f[2] * inv_S;
        S_Gw = (f[3] * inv_S - Z * Rw) - (Wb - f[2]) * inv_S;
        S_H = O == Order::kRQ ? R_m : T(0);
      }
    } else if (f[10] > T(-0.75) || P.ab_g * -Z < P.ab_shift_limit) {
      // (f10 = sum tau = e^Z - 1 <= 1 for every alpha; below -3/4 the assistant's mass is mostly
      // missing and log1p(f10) loses digits: then Z is the running LSE's, and the power sums relative to
      // the running max, below, give the loss, unless a b is so small that their difference (divided by
      // a b) loses more than the shift below, whose terms grow as e^(g |Z|): ab_shift_limit. The
      // sums relative to o are the more accurate ones wherever both apply: measured in tests/cpp.)
      // Near Z = 0 (r~ sums to about 1; or farther, as said), relative to o, where the sums f5.. are small
      // (spec §5.6): the element terms at e = d - Z from those at d, all divided by the small exponents as the
      // terms are (ab_terms_pow; unscaled, these sums lost every digit in float for a b = 1e-20, and gave NaN at
      // the minimum, 1e-60, in the C++ tests' emulation of the CUDA kernels).
      // With m_c = expm1(-c Z), m_g = expm1(-g Z), mu = (m_c - m_g) / dd = (e^(-c Z) - e^(-g Z)) / dd,
      // Hg = o^g expm1(g d) / g = (c Hc + dd Gd) / g (no cancellation: Hc, Gd have the sign of d) and
      // Phi_z = phi(-Z) / (c dd):
      //   sum Pcd(e) = O Phi_z + e^(-c Z) sum Pcd + mu sum Hg                    (O = sum o^g),
      //   sum Gd(e)  = e^(-g Z) sum Gd - mu (O + c sum Hc),   the same with w   (sum Gd = sum Hc - g sum Pcd),
      //   sum Hc(e)  = O m_c / c + e^(-c Z) sum Hc.
      if (f[10] > T(-0.75)) Z = M::log1p(f[10]);  // as for kl: accurate near 0, and ab's sums depend on it at first order
      const T c = P.ab_c, dd = P.ab_d, g = P.ab_g;
      const T ec = M::exp(-c * Z), eg = M::exp(-g * Z);
      // Phi_z, m_c / c and -mu are the element terms of o = 1, x = e^-Z (v = -Z): ab_terms_pow's forms, which
      // never divide a tiny product by a tiny exponent.
      const AbTerms<T> tz = ab_terms_pow<M>(P, -Z, T(1), eg, ec);
      const T phi_z = tz.Pcd, hc_z = tz.Hc, mu = -tz.Gd;
      const T Om = f[2], Omw = f[5], Pcd = f[6];
      // Hc and Gd (with w) from the sums of the series term Ts and of Pcd (see add): the other term is Ts + ab_other_g Pcd
      const bool gd_series = ab_series_is_gd(P);
      const T To = f[7] + P.ab_other_g * Pcd, Tow = f[9] + P.ab_other_g * f[8];
      const T Hc = gd_series ? To : f[7], Hcw = gd_series ? Tow : f[9];
      const T Gd = gd_series ? f[7] : To, Gdw = gd_series ? f[9] : Tow;
      const T Hg = (c * Hc + dd * Gd) * P.inv_g;
      L = -(Om * phi_z + ec * Pcd + mu * Hg);
      bound_L = abs_nn(Om * phi_z) + abs_nn(ec * Pcd) + abs_nn(mu * Hg);
      S_G = eg * Gd - mu * (Om + c * Hc);
      S_Gw = eg * Gdw - mu * (Omw + c * Hcw);
      S_H = (O == Order::kQR || O == Order::kRQ) ? -(Om * hc_z + ec * Hc) : T(0);
    } else {
      const T a = P.ab_a, b = P.ab_b, g = P.ab_g;
      const T c01 = (O == Order::kPR || O == Order::kQR) ? b : a;
      const T s01 = M::exp(-c01 * log_S), sg = M::exp(-g * log_S);  // S^-c
      const T T1 = f[0] * s01, T1w = f[1] * s01, To = f[2], Tr = f[3] * sg, Trw = f[4] * sg;
      if constexpr (O == Order::kPR || O == Order::kQR) {
        // D(x || r): G = dD/dlr = (r^g - x^a r^b)/a; qr: H = dD/dlq = (q^g - q^a r^b)/b
        L = -(T1 - P.ab_a_over_g * To - P.ab_b_over_g * Tr) * P.inv_ab;
        bound_L = (abs_nn(T1) + abs_nn(P.ab_a_over_g * To) + abs_nn(P.ab_b_over_g * Tr)) * abs_nn(P.inv_ab);
        S_G = (Tr - T1) * P.inv_a;
        S_Gw = (Trw - T1w) * P.inv_a;
        S_H = O == Order::kQR ? (To - T1) * P.inv_b : T(0);
      } else {
        // D(r || y): G = dD/dlr = (r^g - r^a y^b)/b; rq: H = dD/dlq = (q^g - r^a q^b)/a
        L = -(T1 - P.ab_a_over_g * Tr - P.ab_b_over_g * To) * P.inv_ab;
        bound_L = (abs_nn(T1) + abs_nn(P.ab_a_over_g * Tr) + abs_nn(P.ab_b_over_g * To)) * abs_nn(P.inv_ab);
        S_G = (Tr - T1) * P.inv_b;
        S_Gw = (Trw - T1w) * P.inv_b;
        S_H = O == Order::kRQ ? (To - T1) * P.inv_a : T(0);
      }
    }
    K = row_K(P.detach, S_G, S_Gw, S_H, Wbar);
    return true;
  }

  // sum r w (centred in rp / rq: see add), as finalize forms it; the exact pass's K takes it.
  AMID_HD T wbar() const { return Wb * (T(1) / S); }

  // finalize with log S formed here, and the second Z of the stats (amid_math.h: kStatZ2), which for
  // a single order is Z (the kernels call this form; JsdRowAcc has the same).
  template <class M>
  AMID_HD bool close(const LossParams<T>& P, T& Z, T& Z2, T& L, T& S_G, T& K) const {
    T cond;
    return close<M>(P, Z, Z2, L, S_G, K, cond);
  }
  // ... and the loss's condition (cond_of): above kExactCond, the kernels take the row's sums from the exact
  // pass (ExactAcc) instead.
  template <class M>
  AMID_HD bool close(const LossParams<T>& P, T& Z, T& Z2, T& L, T& S_G, T& K, T& cond) const {
    T bound_L = T(0);
    const bool ok = finalize<M>(P, M::log(S), Z, L, S_G, K, bound_L);
    Z2 = Z;
    cond = cond_of(bound_L, L);
    return ok;
  }
};

// R2 state of the combined order (kJSD, lam D(p||r) + (1 - lam) D(q||r)): the pr and qr states side
// by side, fed from one evaluation of the mixture per element (amid_math.h: mixture_both, d relative
// to p for the first and to q for the second). Each closes with its own Z (log1p of its own excess
// sum: accurate where r ~ its side), and the W pass evaluates each term with its own (Z for pr, Z2 for
// qr: amid_math.h, jsd_terms); the loss and the gradient's row scalars are the weighted sums (the
// lemma is linear in G, H).
template <Divergence D, typename T>
struct JsdRowAcc {
  RowAcc<D, Order::kPR, T> a;
  RowAcc<D, Order::kQR, T> b;

  template <class M>
  AMID_HD void rebase(const LossParams<T>& P, T mx) {
    a.template rebase<M>(P, mx);
    b.template rebase<M>(P, mx);
  }
  template <class M>
  AMID_HD void begin() {
    a.template begin<M>();
    b.template begin<M>();
  }
  AMID_HD bool shift_ok() const { return a.shift_ok(); }  // (b sums the same rho)
  template <class M>
  AMID_HD void add(const LossParams<T>& P, T lp, T lq, T lt, T w, T dp, T dq) {
    a.template add<M>(P, lp, lq, lt, w, dp);
    b.template add<M>(P, lp, lq, lt, w, dq);
  }
  // Both states saw the same lt (add and rebase move both), so they have the same running max, and
  // the factors of a merge (the same exponents: pr and qr share c = b) are computed once.
  template <class M>
  AMID_HD void merge(const LossParams<T>& P, const JsdRowAcc& o) {
    const auto k = RowAcc<D, Order::kPR, T>::template merge_scale<M>(P, a.m, o.a.m);
    a.merge_scaled(k, o.a);
    b.merge_scaled(typename RowAcc<D, Order::kQR, T>::MergeScale{k.ge, k.e1, k.e_c01, k.e_g}, o.b);
  }
  // (RowAcc::Sums: both sides' plain sums, for states whose m is 0)
  struct Sums {
    typename RowAcc<D, Order::kPR, T>::Sums a;
    typename RowAcc<D, Order::kQR, T>::Sums b;
    AMID_HD void add(const Sums& o) {
      a.add(o.a);
      b.add(o.b);
    }
  };
  AMID_HD Sums sums() const { return Sums{a.sums(), b.sums()}; }
  AMID_HD void set_sums(const Sums& u) {
    a.set_sums(u.a);
    b.set_sums(u.b);
  }
  AMID_HD T wbar() const { return a.wbar(); }  // (pr and qr: both uncentred, the same sums)
  template <class M>
  AMID_HD bool close(const LossParams<T>& P, T& Z, T& Z2, T& L, T& S_G, T& K) const {
    T cond;
    return close<M>(P, Z, Z2, L, S_G, K, cond);
  }
  template <class M>
  AMID_HD bool close(const LossParams<T>& P, T& Z, T& Z2, T& L, T& S_G, T& K, T& cond) const {
    T La, Ga, Ka, Lb, Gb, Kb, ba = T(0), bb = T(0);
    if (!a.template finalize<M>(P, M::log(a.S), Z, La, Ga, Ka, ba) ||
        !b.template finalize<M>(P, M::log(b.S), Z2, Lb, Gb, Kb, bb)) {
      return false;
    }
    cond = max_nn(cond_of(ba, La), cond_of(bb, Lb));  // (each term's loss: the weights do not change it)
    L = P.lam * La + P.one_minus_lam * Lb;
    S_G = P.lam * Ga + P.one_minus_lam * Gb;
    K = P.lam * Ka + P.one_minus_lam * Kb;
    return true;
  }
};

// The exact pass (R3): with Z known, the row sums of the CPU kernel (loss, S_G, S_Gw, S_H), summed from each
// element's e = d - Z and its terms (amid_math.h: element_terms) as the W pass evaluates them. No exponent
// classes: every field is a plain sum, and states merge by adding. Only for rows without -inf (the kernels'
// rule), where every kl loss term is second order and >= 0 (ref phi1(e) or ref phi2(e)): their sum is accurate
// to its last bits, so the CPU kernel's first-order alternative (kl_row_loss) is not needed. The online
// kernels take it for a row whose closing formulas would lose too much (RowAcc::close's cond, cond_of): R2's
// sums expand around Z = 0 before Z is known, and where Z is not small next to the divergence the closing
// formulas subtract first-order terms to get a second-order result. w is centred in rp / rq as R2's
// (RowAcc::add), so that finalize can take R2's Wbar.
template <Divergence D, Order O, typename T>
struct ExactAcc {
  static constexpr bool kCenterW = O == Order::kRP || O == Order::kRQ;
  T l = T(0), G = T(0), Gw = T(0), H = T(0);

  AMID_HD void add_terms(const LossParams<T>& P, const Terms<T>& o, T w_elem) {
    const T w = kCenterW ? w_elem - P.one_minus_lam : w_elem;
    l += o.l;
    G += o.G;
    Gw += o.G * w;
    H += o.H;
  }
  // One element from its mixture (amid_math.h: w_mixture), as grad_from_mixture evaluates it.
  template <class M>
  AMID_HD void add(const LossParams<T>& P, T lp, T lq, T lt, T w, T d, T Z) {
    const T lr = lt - Z;
    const T p = M::exp_approx(lp), q = M::exp_approx(lq), r = M::exp_approx(lr);
    add_terms(P, element_terms<D, O, M>(P, p, q, r, lp, lq, lr, d - Z), w);
  }
  AMID_HD void merge(const ExactAcc& o) {
    l += o.l, G += o.G, Gw += o.Gw, H += o.H;
  }
  // The row loss, S_G and K, with Wbar from R2 (centred as w here).
  AMID_HD void finalize(const LossParams<T>& P, T Wbar, T& L, T& S_G, T& K) const {
    L = l;
    S_G = G;
    K = row_K(P.detach, G, Gw, H, Wbar);
  }
};

// The exact pass of the combined order: the pr terms with Z, the qr ones with Z2 (amid_math.h: jsd_terms),
// combined as JsdRowAcc::close.
template <Divergence D, typename T>
struct JsdExactAcc {
  ExactAcc<D, Order::kPR, T> a;
  ExactAcc<D, Order::kQR, T> b;
  template <class M>
  AMID_HD void add(const LossParams<T>& P, T lp, T lq, T lt, T w, T dp, T dq, T Z, T Z2) {
    const T lr = lt - Z;
    const T p = M::exp_approx(lp), q = M::exp_approx(lq), r = M::exp_approx(lr);
    const JsdTerms<T> jt = jsd_terms<D, M>(P, p, q, r, lp, lq, lr, lt - Z2, dp - Z, dq - Z2);
    a.add_terms(P, jt.a, w);
    b.add_terms(P, jt.b, w);
  }
  AMID_HD void merge(const JsdExactAcc& o) {
    a.merge(o.a);
    b.merge(o.b);
  }
  AMID_HD void finalize(const LossParams<T>& P, T Wbar, T& L, T& S_G, T& K) const {
    T La, Ga, Ka, Lb, Gb, Kb;
    a.finalize(P, Wbar, La, Ga, Ka);
    b.finalize(P, Wbar, Lb, Gb, Kb);
    L = P.lam * La + P.one_minus_lam * Lb;
    S_G = P.lam * Ga + P.one_minus_lam * Gb;
    K = P.lam * Ka + P.one_minus_lam * Kb;
  }
};

// One element into an exact-pass state from the scaled logits (W's mixture: w_mixture; for kJSD R2's own).
template <Divergence D, Order O, bool POWER, class M, typename T, typename Acc, typename G>
AMID_HD void exact_from_logits(Acc& acc, const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB, T Z,
                               T Z2) {
  if constexpr (O == Order::kJSD) {
    T lp, lq, lt, w, dp, dq;
    mixture_both_from_logits_split<POWER, M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, dp, dq);
    acc.template add<M>(P, lp, lq, lt, w, dp, dq, Z, Z2);
  } else {
    T lp, lq, lt, w, d;
    w_mixture<O, POWER, M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, d);
    acc.template add<M>(P, lp, lq, lt, w, d, Z);
  }
}

// One element into an R2 state from the scaled logits tf, sf (the CUDA kernels' R2, and the C++ tests'
// emulation of it): the mixture (POWER as in amid_math.h: mixture_from_logits_split), a rebase to its
// lt, and the sums; the combined order keeps d relative to both sides.
template <Order O, bool POWER, class M, typename T, typename Acc, typename G>
AMID_HD void add_from_logits(Acc& acc, const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB) {
  if constexpr (O == Order::kJSD) {
    T lp, lq, lt, w, dp, dq;
    mixture_both_from_logits_split<POWER, M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, dp, dq);
    acc.template rebase<M>(P, lt);
    acc.template add<M>(P, lp, lq, lt, w, dp, dq);
  } else {
    T lp, lq, lt, w, d;
    mixture_from_logits_split<POWER, ref_is_p<O>(), M>(P, tf, sf, A, B, dAB, lp, lq, lt, w, d);
    acc.template rebase<M>(P, lt);
    acc.template add<M>(P, lp, lq, lt, w, d);
  }
}

// The same for the power mean of a single order, returning the element's term for W (amid_math.h: power_kept,
// d or c) for a later grad_from_logits_c (the GPU's resident R2 keeps it).
template <Order O, class M, typename T, typename Acc, typename G>
AMID_HD T add_from_logits_c(Acc& acc, const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB) {
  static_assert(O != Order::kJSD, "add_from_logits_c: single orders only (kJSD has two logarithm terms)");
  const T lp = log_prob<M>(tf, A), lq = log_prob<M>(sf, B);
  T lt, w, d, c;
  mixture<MixMode::kPower, ref_is_p<O>(), M>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, dAB), lt, w, d, c);
  acc.template rebase<M>(P, lt);
  acc.template add<M>(P, lp, lq, lt, w, d);
  return power_kept<M>(lp, lq, c, d);
}

// The same for the 16-bit resident alpha-beta kernels of the orders whose reference is q (qr, rq) in a bounded row:
// besides d (BoundedRow's power_kept), the element's q and q^g, from which W forms its powers with two exponentials
// fewer (amid_math.h: ab_grad_from_kept3).
template <Order O, class M, typename T, typename Acc, typename G>
AMID_HD T add_from_logits_c3(Acc& acc, const LossParams<T>& P, T tf, T sf, RowLse<T> A, RowLse<T> B, G dAB,
                             RefPowers<T>& kept) {
  static_assert((O == Order::kQR || O == Order::kRQ) && M::kBounded,
                "add_from_logits_c3: alpha-beta qr / rq, bounded rows");
  const T lp = log_prob<M>(tf, A), lq = log_prob<M>(sf, B);
  T lt, w, d, c;
  mixture<MixMode::kPower, ref_is_p<O>(), M>(P, lp, lq, logit_gap<M>(tf, sf, lp, lq, dAB), lt, w, d, c);
  acc.template rebase<M>(P, lt);
  kept = acc.template add<M>(P, lp, lq, lt, w, d);
  return d;
}

// The R2 state of loss (D, O).
template <Divergence D, Order O, typename T>
struct RowAccOf {
  using type = RowAcc<D, O, T>;
};
template <Divergence D, typename T>
struct RowAccOf<D, Order::kJSD, T> {
  using type = JsdRowAcc<D, T>;
};

// The exact-pass state of loss (D, O).
template <Divergence D, Order O, typename T>
struct ExactAccOf {
  using type = ExactAcc<D, O, T>;
};
template <Divergence D, typename T>
struct ExactAccOf<D, Order::kJSD, T> {
  using type = JsdExactAcc<D, T>;
};

}  // namespace amid

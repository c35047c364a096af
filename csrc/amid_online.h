// amid_online.h -- the AMiD row reductions in online ("flash") form, for kernels that see a row in
// pieces: each thread / CTA accumulates its elements, partial states merge in any order, and a
// final step gives the row statistics. Host + device, so tests/cpp checks it on the CPU against
// the CPU kernel (which sees whole rows and sums directly).
//
// Two reductions per row (spec §3.3):
//   R1  OnlineLSE over t/T and s/T                      -> A = LSE(t/T), B = LSE(s/T)
//   R2  RowAcc over lt (needs A, B)                     -> Z = LSE(lt), the loss L, S_G and K
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
template <typename T>
struct OnlineLSE {
  T m = neg_inf<T>(), s = T(0);
  template <class M>
  AMID_HD void add(T x) {
    if (x > m) {  // also false for NaN / -inf: those never move the max
      s = s * M::exp(m - x) + T(1);  // m = -inf: s = 0 * 0 + 1
      m = x;
    } else if (x != neg_inf<T>()) {
      s += M::exp(x - m);
    }
  }
  template <class M>
  AMID_HD void merge(const OnlineLSE& o) {
    if (o.m == neg_inf<T>()) return;
    if (m == neg_inf<T>()) {
      *this = o;
      return;
    }
    const T mx = m > o.m ? m : o.m;
    s = s * M::exp(m - mx) + o.s * M::exp(o.m - mx);
    m = mx;
  }
  AMID_HD T value(T log_s) const { return m + log_s; }  // caller supplies log(s)
};

// R1 state: both log-sum-exps and the invalid-input flag (NaN or +inf seen).
template <typename T>
struct LseAcc {
  OnlineLSE<T> t, s;
  T bad = T(0);
  template <class M>
  AMID_HD void add(T tv, T sv) {
    bad = ((tv < std::numeric_limits<T>::infinity()) & (sv < std::numeric_limits<T>::infinity())) ? bad : T(1);
    t.template add<M>(tv);
    s.template add<M>(sv);
  }
  template <class M>
  AMID_HD void merge(const LseAcc& o) {
    t.template merge<M>(o.t);
    s.template merge<M>(o.s);
    bad = bad > o.bad ? bad : o.bad;
  }
};

// R2 state for loss (D, O). Fields: m (running max of lt), S = sum rho, Wb = sum rho w, and up to
// five loss-specific sums f[i] with exponents c_i (c = 0: plain sums, independent of Z).
template <Divergence D, Order O, typename T>
struct RowAcc {
  static constexpr int kF = 5;
  T m = neg_inf<T>(), S = T(0), Wb = T(0);
  T f[kF] = {T(0), T(0), T(0), T(0), T(0)};

  // Exponent of field i:
  //   kl pr / qr: f0 = sum_U x (lx - lt), f1 = sum_U x, f2 = sum_U x w   (x = p or q)       c = 0
  //   kl rp / rq: f0 = sum_U rho, f1 = sum_U rho (lt - ly), f2 = sum_U rho w,
  //               f3 = sum_U rho w (lt - ly)                   (ly = lp or lq)            c = 1
  //   ab pr / qr: f0 = sum x^a rho^b, f1 = sum x^a rho^b w (c = b), f2 = sum x^g (c = 0),
  //               f3 = sum rho^g, f4 = sum rho^g w (c = g)     (x = p or q, g = a + b)
  //   ab rp / rq: f0 = sum rho^a y^b, f1 = sum rho^a y^b w (c = a), f2 = sum y^g (c = 0),
  //               f3 = sum rho^g, f4 = sum rho^g w (c = g)     (y = p or q)
  static AMID_HD T exponent(const LossParams<T>& P, int i) {
    if constexpr (D == Divergence::kKL) {
      return (O == Order::kRP || O == Order::kRQ) ? T(1) : T(0);
    } else {
      const T c01 = (O == Order::kPR || O == Order::kQR) ? P.ab_b : P.ab_a;
      return i < 2 ? c01 : (i == 2 ? T(0) : P.ab_g);
    }
  }

  // Raise the reference max to mx (>= m), rescaling every Z-dependent sum.
  template <class M>
  AMID_HD void rebase(const LossParams<T>& P, T mx) {
    if (!(mx > m)) return;
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
  }

  // One element; the caller has already rebased to m >= lt. lp, lq may be -inf.
  template <class M>
  AMID_HD void add(const LossParams<T>& P, T lp, T lq, T lt, T w) {
    const bool finite_lt = lt != neg_inf<T>();
    const T rel = finite_lt ? lt - m : neg_inf<T>();  // log rho
    const T rho = M::exp(rel);
    S += rho;
    Wb += rho * w;
    if constexpr (D == Divergence::kKL) {
      const bool keep = (lp != neg_inf<T>()) & (lq != neg_inf<T>());
      if (!keep) return;
      if constexpr (O == Order::kPR || O == Order::kQR) {
        const T lx = O == Order::kPR ? lp : lq;
        const T x = M::exp(lx);
        f[0] += x * (lx - lt);
        f[1] += x;
        f[2] += x * w;
      } else {
        const T ly = O == Order::kRP ? lp : lq;
        const T d = lt - ly;
        f[0] += rho;
        f[1] += rho * d;
        f[2] += rho * w;
        f[3] += rho * w * d;
      }
    } else {
      const T lo = (O == Order::kPR || O == Order::kRP) ? lp : lq;  // the non-assistant side
      // x^a rho^b (pr/qr) or rho^a y^b (rp/rq), all in log space: -inf gives 0.
      const T lxy = (O == Order::kPR || O == Order::kQR) ? P.ab_a * lo + P.ab_b * rel : P.ab_a * rel + P.ab_b * lo;
      const T xy = M::exp(lxy);
      const T og = M::exp(P.ab_g * lo);
      const T rg = M::exp(P.ab_g * rel);
      f[0] += xy;
      f[1] += xy * w;
      f[2] += og;
      f[3] += rg;
      f[4] += rg * w;
    }
  }

  // A side that saw no finite lt has m = -inf and zero Z-dependent sums, so rebasing it only moves
  // its reference (rebase skips the scaling when m = -inf); its plain (c = 0) sums add as they are.
  template <class M>
  AMID_HD void merge(const LossParams<T>& P, const RowAcc& o) {
    RowAcc b = o;
    const T mx = m > b.m ? m : b.m;
    rebase<M>(P, mx);
    b.template rebase<M>(P, mx);
    S += b.S;
    Wb += b.Wb;
#pragma unroll
    for (int i = 0; i < kF; ++i) f[i] += b.f[i];
  }

  // Closing formulas: Z, the row loss L and the gradient's row scalars S_G and K.
  // Returns false when the assistant is undefined (no element with finite lt).
  template <class M>
  AMID_HD bool finalize(const LossParams<T>& P, T log_S, T& Z, T& L, T& S_G, T& K) const {
    if (!(S > T(0))) return false;
    Z = m + log_S;
    const T inv_S = T(1) / S;
    const T Wbar = Wb * inv_S;
    T S_Gw, S_H;
    if constexpr (D == Divergence::kKL) {
      if constexpr (O == Order::kPR || O == Order::kQR) {
        // L = sum_U x (lx - lt) + Z sum_U x;  G = -x (on U)
        L = f[0] + Z * f[1];
        S_G = -f[1];
        S_Gw = -f[2];
        S_H = O == Order::kQR ? L + f[1] : T(0);  // qr: H = x (lx - lr + 1)
      } else {
        // Sr = sum_U r, L = sum_U r (lr - ly), G = r (lr - ly + 1) on U, Rw = sum_U r w
        const T Sr = f[0] * inv_S;
        L = f[1] * inv_S - Z * Sr;
        S_G = L + Sr;
        const T Rw = f[2] * inv_S;
        S_Gw = f[3] * inv_S - Z * Rw + Rw;
        S_H = O == Order::kRQ ? -Sr : T(0);  // rq: H = -r (on U)
      }
    } else {
      const T a = P.ab_a, b = P.ab_b, g = P.ab_g;
      const T c01 = (O == Order::kPR || O == Order::kQR) ? b : a;
      const T s01 = M::exp(-c01 * log_S), sg = M::exp(-g * log_S);  // S^-c
      const T T1 = f[0] * s01, T1w = f[1] * s01, To = f[2], Tr = f[3] * sg, Trw = f[4] * sg;
      if constexpr (O == Order::kPR || O == Order::kQR) {
        // D(x || r): G = dD/dlr = (r^g - x^a r^b)/a; qr: H = dD/dlq = (q^g - q^a r^b)/b
        L = -(T1 - P.ab_a_over_g * To - P.ab_b_over_g * Tr) * P.inv_ab;
        S_G = (Tr - T1) * P.inv_a;
        S_Gw = (Trw - T1w) * P.inv_a;
        S_H = O == Order::kQR ? (To - T1) * P.inv_b : T(0);
      } else {
        // D(r || y): G = dD/dlr = (r^g - r^a y^b)/b; rq: H = dD/dlq = (q^g - r^a q^b)/a
        L = -(T1 - P.ab_a_over_g * Tr - P.ab_b_over_g * To) * P.inv_ab;
        S_G = (Tr - T1) * P.inv_b;
        S_Gw = (Trw - T1w) * P.inv_b;
        S_H = O == Order::kRQ ? (To - T1) * P.inv_a : T(0);
      }
    }
    K = row_K(P.detach, S_G, S_Gw, S_H, Wbar);
    return true;
  }
};

}  // namespace amid

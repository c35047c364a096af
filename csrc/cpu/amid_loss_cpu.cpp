// amid_loss_cpu.cpp -- CPU kernels of the AMiD loss (math: ../amid_math.h; spec:
// ../shared/docs/amid-math.md).
//
// Forward, per row with weight w_n != 0 (rows with weight 0 are skipped, not read, and get zeros):
//   1. maxima of t/T and s/T and the validity check (NaN or +inf anywhere, or a row that is all
//      -inf, makes the row's loss, stats and gradient NaN: documented and tested);
//   2. A = LSE(t/T), B = LSE(s/T), caching p and q;
//   3. lt = log r~ and w per element (cached), and Z = LSE(lt), caching r;
//   4. the row sums (loss L, S_G, S_Gw, S_H, Wbar) and, if asked, the gradient row.
// The backward (from the saved stats) rebuilds p, q, lt, w, r with the same passes and writes the
// gradient row.
//
// Threads own whole rows (at::parallel_for); each thread keeps five [V] scratch arrays (p, q, lt,
// w, r) in the math type, so nothing of size [N, V] exists besides the gradient. Each pass is one
// branch-free loop: with float math (16/32-bit inputs) the loops vectorise (AVX2 clone chosen at
// load time where the CPU has it) using the polynomial exp/log1p of vec_math.h; float64 inputs use
// the C library in double. Row sums are accumulated in double.
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
// Row passes. Pointers: t, s = one row of the inputs [V]; the rest are [V] scratch of the thread.

// Maxima of the scaled rows, and whether any entry is NaN or +inf.
template <typename scalar_t, typename acc_t>
AMID_CPU_CLONES void pass_max(const scalar_t* t, const scalar_t* s, int64_t V, acc_t invT, acc_t& mt_out,
                              acc_t& ms_out, bool& bad_out) {
  acc_t mt = -kInf<acc_t>, ms = -kInf<acc_t>;
  int bad = 0;
#pragma omp simd reduction(max : mt, ms) reduction(| : bad)
  for (int64_t v = 0; v < V; ++v) {
    const acc_t tv = acc_t(t[v]) * invT, sv = acc_t(s[v]) * invT;
    bad |= !((tv < kInf<acc_t>) & (sv < kInf<acc_t>));  // NaN compares false
    mt = tv > mt ? tv : mt;
    ms = sv > ms ? sv : ms;
  }
  mt_out = mt;
  ms_out = ms;
  bad_out = bad != 0;
}

// p = e^(t/T - mt), q = e^(s/T - ms) and their sums.
template <typename scalar_t, typename acc_t>
AMID_CPU_CLONES void pass_exp(const scalar_t* t, const scalar_t* s, int64_t V, acc_t invT, acc_t mt, acc_t ms,
                              acc_t* p, acc_t* q, double& st_out, double& ss_out) {
  double st = 0, ss = 0;
#pragma omp simd reduction(+ : st, ss)
  for (int64_t v = 0; v < V; ++v) {
    p[v] = M::exp(acc_t(t[v]) * invT - mt);
    q[v] = M::exp(acc_t(s[v]) * invT - ms);
    st += double(p[v]);
    ss += double(q[v]);
  }
  st_out = st;
  ss_out = ss;
}

// lt and w per element (normalising the cached p and q by cp, cq on the way); returns max lt.
template <MixMode MODE, typename scalar_t, typename acc_t>
AMID_CPU_CLONES acc_t pass_mixture(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s, int64_t V,
                                   acc_t A, acc_t B, acc_t cp, acc_t cq, acc_t* p, acc_t* q, acc_t* lt, acc_t* w) {
  const acc_t invT = P.inv_temperature;
  acc_t m = -kInf<acc_t>;
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    p[v] *= cp;
    q[v] *= cq;
    acc_t ltv, wv;
    mixture<MODE, M>(P, acc_t(t[v]) * invT - A, acc_t(s[v]) * invT - B, ltv, wv);
    lt[v] = ltv;
    w[v] = wv;
    m = ltv > m ? ltv : m;
  }
  return m;
}

// r = e^(lt - m) and its sum.
template <typename acc_t>
AMID_CPU_CLONES double pass_exp_shift(const acc_t* lt, int64_t V, acc_t m, acc_t* r) {
  double sr = 0;
#pragma omp simd reduction(+ : sr)
  for (int64_t v = 0; v < V; ++v) {
    r[v] = M::exp(lt[v] - m);
    sr += double(r[v]);
  }
  return sr;
}

struct Sums {
  double L, S_G, S_Gw, S_H, Wbar;
};

// Row sums of the loss and of the gradient's row scalars (normalising the cached r by cr).
template <Divergence D, Order O, typename scalar_t, typename acc_t>
AMID_CPU_CLONES Sums pass_sums(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s, int64_t V,
                               acc_t A, acc_t B, acc_t Z, acc_t cr, const acc_t* p, const acc_t* q, acc_t* r,
                               const acc_t* lt, const acc_t* w) {
  const acc_t invT = P.inv_temperature;
  double L = 0, S_G = 0, S_Gw = 0, S_H = 0, Wbar = 0;
#pragma omp simd reduction(+ : L, S_G, S_Gw, S_H, Wbar)
  for (int64_t v = 0; v < V; ++v) {
    r[v] *= cr;
    const Terms<acc_t> o = element_terms<D, O, M>(P, p[v], q[v], r[v], acc_t(t[v]) * invT - A,
                                                  acc_t(s[v]) * invT - B, lt[v] - Z);
    L += double(o.l);
    S_G += double(o.G);
    S_Gw += double(o.G) * double(w[v]);
    S_H += double(o.H);
    Wbar += double(r[v]) * double(w[v]);
  }
  return {L, S_G, S_Gw, S_H, Wbar};
}

// The gradient row: scale * (w (G - r S_G) + H - q K).
template <Divergence D, Order O, typename scalar_t, typename acc_t>
AMID_CPU_CLONES void pass_grad(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s, int64_t V, acc_t A,
                               acc_t B, acc_t Z, const acc_t* p, const acc_t* q, const acc_t* r, const acc_t* lt,
                               const acc_t* w, acc_t S_G, acc_t K, acc_t scale, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  const bool detach = P.detach;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const Terms<acc_t> o = element_terms<D, O, M>(P, p[v], q[v], r[v], acc_t(t[v]) * invT - A,
                                                  acc_t(s[v]) * invT - B, lt[v] - Z);
    grad[v] = scalar_t(scale * element_grad(detach, w[v], q[v], r[v], o, S_G, K));
  }
}

// ------------------------------------------------------------------------------------------------
// Rows

template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> p, q, lt, w, r;
  explicit RowScratch(int64_t V) : p(V), q(V), lt(V), w(V), r(V) {}
};

template <typename scalar_t>
void fill_nan_row(double* loss, double* stats, scalar_t* grad, int64_t V) {
  *loss = std::numeric_limits<double>::quiet_NaN();
  std::fill(stats, stats + kNumStats, std::numeric_limits<double>::quiet_NaN());
  if (grad) std::fill(grad, grad + V, scalar_t(std::numeric_limits<float>::quiet_NaN()));
}

// Forward of one row: loss (times weight), the 5 stats and, if grad != nullptr, the gradient row
// d(weight * L)/ds.
template <typename scalar_t, typename acc_t>
void forward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, double weight,
                 RowScratch<acc_t>& S, double* loss, double* stats, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  acc_t mt, ms;
  bool bad;
  pass_max(t, s, V, invT, mt, ms, bad);
  if (bad || mt == -kInf<acc_t> || ms == -kInf<acc_t>) {
    fill_nan_row(loss, stats, grad, V);
    return;
  }
  double st, ss;
  pass_exp(t, s, V, invT, mt, ms, S.p.data(), S.q.data(), st, ss);
  const acc_t A = acc_t(mt + std::log(st)), B = acc_t(ms + std::log(ss));
  acc_t m;
  dispatch_mode(P.mode, [&](auto mode) {
    m = pass_mixture<decltype(mode)::value>(P, t, s, V, A, B, acc_t(1.0 / st), acc_t(1.0 / ss), S.p.data(),
                                            S.q.data(), S.lt.data(), S.w.data());
  });
  if (m == -kInf<acc_t>) {  // alpha >= 1 with disjoint supports: the assistant is undefined
    fill_nan_row(loss, stats, grad, V);
    return;
  }
  const double sr = pass_exp_shift(S.lt.data(), V, m, S.r.data());
  const acc_t Z = acc_t(m + std::log(sr));
  dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
    constexpr Divergence D = decltype(dc)::value;
    constexpr Order O = decltype(oc)::value;
    const Sums sums = pass_sums<D, O>(P, t, s, V, A, B, Z, acc_t(1.0 / sr), S.p.data(), S.q.data(), S.r.data(),
                                      S.lt.data(), S.w.data());
    const double K = row_K(P.detach, sums.S_G, sums.S_Gw, sums.S_H, sums.Wbar);
    *loss = weight * sums.L;
    stats[0] = A;
    stats[1] = B;
    stats[2] = Z;
    stats[3] = sums.S_G;
    stats[4] = K;
    if (grad) {
      // Chain rule through s/T gives the 1/T factor.
      pass_grad<D, O>(P, t, s, V, A, B, Z, S.p.data(), S.q.data(), S.r.data(), S.lt.data(), S.w.data(),
                      acc_t(sums.S_G), acc_t(K), acc_t(weight) * invT, grad);
    }
  });
}

// Backward of one row from its stats (A, B, Z, S_G, K).
template <typename scalar_t, typename acc_t>
void backward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V, acc_t scale,
                  const acc_t* st, RowScratch<acc_t>& S, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  const acc_t A = st[0], B = st[1], Z = st[2], S_G = st[3], K = st[4];
  double unused_a, unused_b;
  pass_exp(t, s, V, invT, A, B, S.p.data(), S.q.data(), unused_a, unused_b);  // p, q directly
  dispatch_mode(P.mode, [&](auto mode) {
    pass_mixture<decltype(mode)::value>(P, t, s, V, A, B, acc_t(1), acc_t(1), S.p.data(), S.q.data(), S.lt.data(),
                                        S.w.data());
  });
  pass_exp_shift(S.lt.data(), V, Z, S.r.data());  // r directly
  dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
    pass_grad<decltype(dc)::value, decltype(oc)::value>(P, t, s, V, A, B, Z, S.p.data(), S.q.data(), S.r.data(),
                                                        S.lt.data(), S.w.data(), S_G, K, scale, grad);
  });
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1)); }

// ------------------------------------------------------------------------------------------------
// Host wrappers

std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& row_weight,
    double alpha, double lam, std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_fwd";
  check_logits_pair(op, student_logits, teacher_logits);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, student_logits);
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
      RowScratch<acc_t> scratch(V);
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
  check_logits_pair(op, student_logits, teacher_logits);
  check_row_vector(op, "grad_loss", grad_loss, student_logits);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, student_logits);
  check_stats(op, stats, student_logits);
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
      RowScratch<acc_t> scratch(V);
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
  AMID_CHECK(grad.dim() == 2 && grad.is_contiguous(), op,
             "expected grad to be a contiguous 2-D [N, V] tensor, but got shape ", shape_str(grad));
  AMID_CHECK(is_supported_dtype(grad.scalar_type()), op,
             "expected grad of dtype float16, bfloat16, float32 or float64, but got ", grad.scalar_type());
  check_row_vector(op, "grad_loss", grad_loss, grad);
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

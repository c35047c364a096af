// amid_loss_cpu.cpp -- CPU kernels of the AMiD loss: the readable C++ implementation of the math
// in ../amid_math.h (spec: ../shared/docs/amid-math.md).
//
// Forward, per row with weight w_n != 0 (rows with weight 0 are skipped and get zeros):
//   1. max of t/T and s/T, and the validity check (NaN or +inf anywhere, or a row that is all
//      -inf, makes the row's loss, stats and gradient NaN: documented, tested);
//   2. A = LSE(t/T), B = LSE(s/T), caching p and q;
//   3. lt = log r~ and w per element (cached), Z = LSE(lt), caching r;
//   4. the row sums (loss L, S_G, S_Gw, S_H, Wbar) and, if asked, the gradient row.
// Threads own whole rows (at::parallel_for); each thread keeps five [V] scratch arrays (p, q, lt,
// w, r) in the accumulation type, so there is no [N, V] temporary besides the gradient itself.
// Math in float for 16/32-bit inputs (double for float64), row sums in double.
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

namespace amid {
namespace {

// ------------------------------------------------------------------------------------------------
// Row kernels

template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// Scratch arrays for one thread, reused across its rows.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> p, q, lt, w, r;
  explicit RowScratch(int64_t V) : p(V), q(V), lt(V), w(V), r(V) {}
};

// Forward of one row. Writes the loss (times weight), the 5 stats and, if grad != nullptr, the
// gradient row d(weight * L)/ds.
template <typename scalar_t, typename acc_t>
void forward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V,
                 double weight, RowScratch<acc_t>& S, double* loss, double* stats,
                 scalar_t* grad) {
  const acc_t invT = P.inv_temperature;

  // 1. Maxima and validity.
  acc_t mt = -kInf<acc_t>, ms = -kInf<acc_t>;
  bool valid = true;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t tv = acc_t(t[v]) * invT, sv = acc_t(s[v]) * invT;
    valid &= (tv < kInf<acc_t>) && (sv < kInf<acc_t>);  // false for NaN and +inf
    mt = std::max(mt, tv);
    ms = std::max(ms, sv);
  }
  if (!valid || mt == -kInf<acc_t> || ms == -kInf<acc_t>) {
    *loss = kNaN<double>;
    std::fill(stats, stats + kNumStats, kNaN<double>);
    if (grad) std::fill(grad, grad + V, scalar_t(kNaN<acc_t>));
    return;
  }

  // 2. Log-sum-exps, caching e^(x - max); normalised into p and q below. Sums in double: a long
  // float running sum loses ~sqrt(V) ulps (measurable at V = 128k).
  double st = 0, ss = 0;
  for (int64_t v = 0; v < V; ++v) {
    S.p[v] = amid_exp(acc_t(t[v]) * invT - mt);
    S.q[v] = amid_exp(acc_t(s[v]) * invT - ms);
    st += S.p[v];
    ss += S.q[v];
  }
  const acc_t A = acc_t(mt + std::log(st)), B = acc_t(ms + std::log(ss));
  const acc_t inv_st = acc_t(1.0 / st), inv_ss = acc_t(1.0 / ss);

  // 3. The mixture, and Z = LSE(lt).
  acc_t m = -kInf<acc_t>;
  for (int64_t v = 0; v < V; ++v) {
    S.p[v] *= inv_st;
    S.q[v] *= inv_ss;
    mixture(P, acc_t(t[v]) * invT - A, acc_t(s[v]) * invT - B, S.lt[v], S.w[v]);
    m = std::max(m, S.lt[v]);
  }
  if (m == -kInf<acc_t>) {  // alpha >= 1 with disjoint supports: the assistant is undefined
    *loss = kNaN<double>;
    std::fill(stats, stats + kNumStats, kNaN<double>);
    if (grad) std::fill(grad, grad + V, scalar_t(kNaN<acc_t>));
    return;
  }
  double sr = 0;
  for (int64_t v = 0; v < V; ++v) {
    S.r[v] = amid_exp(S.lt[v] - m);
    sr += S.r[v];
  }
  const acc_t Z = acc_t(m + std::log(sr)), inv_sr = acc_t(1.0 / sr);

  // 4. Row sums.
  RowSums<double> sums;
  for (int64_t v = 0; v < V; ++v) {
    S.r[v] *= inv_sr;
    const acc_t lp = acc_t(t[v]) * invT - A, lq = acc_t(s[v]) * invT - B;
    const Terms<acc_t> o = element_terms(P, S.p[v], S.q[v], S.r[v], lp, lq, S.lt[v] - Z);
    sums.add(S.w[v], S.r[v], o);
  }
  const double K = sums.K(P.detach);
  *loss = weight * sums.L;
  stats[0] = A;
  stats[1] = B;
  stats[2] = Z;
  stats[3] = sums.S_G;
  stats[4] = K;
  if (!grad) return;

  // Gradient row: chain rule through s/T gives the 1/T factor.
  const acc_t scale = acc_t(weight) * invT, S_G = acc_t(sums.S_G), Ka = acc_t(K);
  for (int64_t v = 0; v < V; ++v) {
    const acc_t lp = acc_t(t[v]) * invT - A, lq = acc_t(s[v]) * invT - B;
    const Terms<acc_t> o = element_terms(P, S.p[v], S.q[v], S.r[v], lp, lq, S.lt[v] - Z);
    grad[v] = scalar_t(scale * element_grad(P, S.w[v], S.q[v], S.r[v], o, S_G, Ka));
  }
}

// Backward of one row from its stats: everything elementwise, no scratch.
template <typename scalar_t, typename acc_t>
void backward_row(const LossParams<acc_t>& P, const scalar_t* s, const scalar_t* t, int64_t V,
                  acc_t scale, const acc_t* st, scalar_t* grad) {
  const acc_t invT = P.inv_temperature;
  const acc_t A = st[0], B = st[1], Z = st[2], S_G = st[3], K = st[4];
  for (int64_t v = 0; v < V; ++v) {
    const acc_t lp = acc_t(t[v]) * invT - A, lq = acc_t(s[v]) * invT - B;
    acc_t lt, w;
    mixture(P, lp, lq, lt, w);
    const acc_t lr = lt - Z;
    const acc_t p = amid_exp(lp), q = amid_exp(lq), r = amid_exp(lr);
    const Terms<acc_t> o = element_terms(P, p, q, r, lp, lq, lr);
    grad[v] = scalar_t(scale * element_grad(P, w, q, r, o, S_G, K));
  }
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1)); }

// ------------------------------------------------------------------------------------------------
// Host wrappers

std::tuple<at::Tensor, at::Tensor, at::Tensor> amid_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& row_weight, double alpha, double lam,
    std::string_view divergence, std::string_view order, double ab_alpha, double ab_beta,
    double temperature, bool detach_assistant, bool compute_grad) {
  constexpr const char* op = "amid_loss_fwd";
  check_logits_pair(op, student_logits, teacher_logits);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, student_logits);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  const auto ldtype = loss_dtype(student_logits.scalar_type());
  // Row sums are double; the outputs are cast to the loss dtype at the end.
  at::Tensor loss = at::zeros({N}, student_logits.options().dtype(at::kDouble));
  at::Tensor stats = at::zeros({N, kNumStats}, student_logits.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student_logits.options())
                                 : at::empty({0}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->to(at::kDouble).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_fwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence),
                                          std::string(order), ab_alpha, ab_beta, temperature,
                                          detach_assistant);
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
            forward_row<scalar_t, acc_t>(P, s + n * lds, t + n * ldt, V, wn, scratch, lp + n,
                                         sp + n * kNumStats, grow);
          }
        });
      });
  return {loss.to(ldtype), stats.to(ldtype), grad};
}

at::Tensor amid_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits,
                             const std::optional<at::Tensor>& row_weight, const at::Tensor& stats,
                             double alpha, double lam, std::string_view divergence,
                             std::string_view order, double ab_alpha, double ab_beta,
                             double temperature, bool detach_assistant) {
  constexpr const char* op = "amid_loss_bwd";
  check_logits_pair(op, student_logits, teacher_logits);
  check_row_vector(op, "grad_loss", grad_loss, student_logits);
  if (row_weight) check_row_vector(op, "row_weight", *row_weight, student_logits);
  check_stats(op, stats, student_logits);
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  at::Tensor grad = at::empty({N, V}, student_logits.options());
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  at::Tensor gl = grad_loss.contiguous(), st = stats.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_loss_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence),
                                          std::string(order), ab_alpha, ab_beta, temperature,
                                          detach_assistant);
        if (N == 0) return;
        const scalar_t* s = student_logits.const_data_ptr<scalar_t>();
        const scalar_t* t = teacher_logits.const_data_ptr<scalar_t>();
        const int64_t lds = student_logits.stride(0), ldt = teacher_logits.stride(0);
        const loss_t* wp = weight.defined() ? weight.const_data_ptr<loss_t>() : nullptr;
        const loss_t* glp = gl.const_data_ptr<loss_t>();
        const loss_t* stp = st.const_data_ptr<loss_t>();
        scalar_t* gp = grad.data_ptr<scalar_t>();
        at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
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
            backward_row<scalar_t, acc_t>(P, s + n * lds, t + n * ldt, V, scale, row_stats,
                                          grow);
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
             "expected grad of dtype float16, bfloat16, float32 or float64, but got ",
             grad.scalar_type());
  check_row_vector(op, "grad_loss", grad_loss, grad);
  const int64_t N = grad.size(0), V = grad.size(1);
  if (N == 0 || V == 0) return;
  at::Tensor gl = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cpu_",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const loss_t* g = gl.const_data_ptr<loss_t>();
    scalar_t* x = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (g[n] == loss_t(1)) continue;
        const acc_t gn = acc_t(g[n]);
        for (int64_t v = 0; v < V; ++v) x[n * V + v] = scalar_t(acc_t(x[n * V + v]) * gn);
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

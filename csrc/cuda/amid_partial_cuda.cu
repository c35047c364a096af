// amid_partial_cuda.cu -- CUDA kernels of the vocab-parallel partial-row ops (amid/parallel.py):
// amid_partial_lse (R1), amid_partial_mix (R2) and amid_partial_sums (R3). The per-row results are
// the CPU ops' (cpu/amid_loss_cpu.cpp, section "Vocab-parallel partial rows"; read that first):
//   R1  [N, 5] = (t_max, sum e^(t/T - t_max), s_max, sum e^(s/T - s_max), bad)
//   R2  [N, 3] = (lt_max, sum e^(lt - lt_max), sum tau)            given merged A, B in stats [N, 8]
//   R3  [N, 8] = (L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1)  given merged A, B, Z in stats
// with the same neutral states: rows of weight 0 are not read and get (-inf, 0, -inf, 0, 0) in R1,
// zeros in R2 / R3; rows whose input stats hold a NaN (found invalid by an earlier merge) get NaN;
// an R1 row with NaN or +inf anywhere gets (-inf, 0, -inf, 0, 1); a side that is all -inf keeps
// (-inf, 0).
//
// One CTA per row (grid-stride over rows). Each thread reads its share of the row through
// visit_row (16-byte loads), runs the element math of ../amid_math.h with LibMath in the math type
// acc_t (fp32 for bf16 / fp16 / fp32 inputs, fp64 for fp64) and accumulates its own elements in
// acc_t too (a thread sees V / 256 elements: ~60 for a 16k slice, so the float sums add about as
// much rounding as the element math itself; double accumulation per element would cost a
// conversion per term, and conversions run at the MUFU rate). The per-thread partials then go to
// double for the CTA reduction (block_reduce) and the float64 outputs, as the CPU op's row sums
// are double. The maxima and their exponential sums are taken in online form per thread (one read
// of the row): a thread's sum is relative to its own running maximum and rescaled when that grows
// and in the merge, so the result equals the CPU op's sum relative to the row maximum up to
// rounding, not bit for bit (the CPU op sums e^(x - max) after a separate max pass; the summation
// order differs anyway).
//
// The scaled logits are saturated as in the CPU op (scale_logit): a finite logit times 1/T that
// overflows becomes +-float max, not +-inf.
//
// Not run on a GPU when written (no GPU in that session): compiled for sm_90a only; the CUDA test
// (tests/test_parallel.py, test_partial_ops_cuda_vs_cpu) compares every op with the CPU one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "../amid_math.h"
#include "../checks.h"
#include "utils.cuh"

namespace amid {
namespace {

using namespace cuda_detail;
using M = LibMath;

constexpr int kPartialThreads = 256;
constexpr int kPartialWarps = kPartialThreads / kWarpSize;
constexpr int kNumPartialLse = 5;   // [t_max, t_sum, s_max, s_sum, bad]
constexpr int kNumPartialMix = 3;   // [lt_max, lt_sum, tau_sum]
constexpr int kNumPartialSums = 8;  // [L, S_G, S_Gw, S_H, Wbar, bound_l, sum_l1, abs_l1]

__device__ __forceinline__ double dnan() { return std::numeric_limits<double>::quiet_NaN(); }
__device__ __forceinline__ double dinf() { return std::numeric_limits<double>::infinity(); }

// x * scale, saturated at the type's largest magnitude when a finite x overflows (the CPU kernel's
// scale_logit, cpu/amid_loss_cpu.cpp).
template <typename acc_t>
__device__ __forceinline__ acc_t scale_logit(acc_t x, acc_t scale) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t y = x * scale;
  const bool over = (y == inf) | (y == -inf);
  const bool finite_x = (x < inf) & (x > -inf);
  return over & finite_x ? (y > acc_t(0) ? std::numeric_limits<acc_t>::max() : std::numeric_limits<acc_t>::lowest()) : y;
}

// The kernels' view of the inputs. Rows are ld* elements apart; weight in the loss dtype (acc_t),
// stats [N, kNumStats] float64 contiguous (R2 / R3), out [N, K] float64 contiguous.
template <typename scalar_t, typename acc_t>
struct PartialArgs {
  const scalar_t* s;
  const scalar_t* t;
  const acc_t* weight;  // or nullptr (= 1)
  const double* stats;  // or nullptr (R1)
  double* out;
  int64_t N, V, lds, ldt;
};

// 0: compute the row; 1: weight 0 (the row is not read); 2: its input stats hold a NaN. The same
// for every thread of the CTA (uniform control flow around the CTA reductions).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int row_state(const PartialArgs<scalar_t, acc_t>& a, int64_t row) {
  if (a.weight && a.weight[row] == acc_t(0)) return 1;
  if (a.stats) {
    bool nan = false;
#pragma unroll
    for (int i = 0; i < kNumStats; ++i) nan |= isnan(a.stats[row * kNumStats + i]);
    if (nan) return 2;
  }
  return 0;
}

// Online sum of e^(x - m) over a thread's elements, m its running maximum (-inf entries are skipped;
// NaN never moves m).
template <typename acc_t>
__device__ __forceinline__ void online_add(acc_t x, acc_t& m, acc_t& s) {
  if (x > m) {
    s = s * M::exp(m - x) + acc_t(1);  // m = -inf: 0 * 0 + 1
    m = x;
  } else if (x != neg_inf<acc_t>()) {
    s += M::exp(x - m);
  }
}

// Merge of two (max, sum relative to max) pairs held in double (the maxima are math-type values).
template <typename acc_t>
__device__ __forceinline__ void merge_max_sum(double& m, double& s, double om, double os) {
  if (om == -dinf()) return;
  if (m == -dinf()) {
    m = om;
    s = os;
    return;
  }
  const double mx = m > om ? m : om;
  s = s * double(M::exp(acc_t(m - mx))) + os * double(M::exp(acc_t(om - mx)));
  m = mx;
}

// ------------------------------------------------------------------------------------------------
// R1: the two log-sum-exp states of the slice and the invalid-input flag.

struct LsePart {
  double tm, ts, sm, ss, bad;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kPartialThreads)
    partial_lse_kernel(const PartialArgs<scalar_t, at::opmath_type<scalar_t>> a, at::opmath_type<scalar_t> invT) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ LsePart scratch[kPartialWarps];
  auto merge = [](LsePart& x, const LsePart& y) {
    merge_max_sum<acc_t>(x.tm, x.ts, y.tm, y.ts);
    merge_max_sum<acc_t>(x.sm, x.ss, y.sm, y.ss);
    x.bad = x.bad > y.bad ? x.bad : y.bad;
  };
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    double* o = a.out + row * kNumPartialLse;
    if (row_state(a, row) != 0) {  // weight 0: the neutral state
      if (threadIdx.x == 0) o[0] = -dinf(), o[1] = 0.0, o[2] = -dinf(), o[3] = 0.0, o[4] = 0.0;
      continue;
    }
    const scalar_t* t = a.t + row * a.ldt;
    const scalar_t* s = a.s + row * a.lds;
    acc_t mt = neg_inf<acc_t>(), ms = neg_inf<acc_t>(), st = 0, ss = 0;
    bool bad = false;
    visit_row(t, s, a.V, same_misalignment(t, s, sizeof(scalar_t)),
              [&](int64_t, const scalar_t* tv, const scalar_t* sv, auto nc) {
#pragma unroll
                for (int j = 0; j < decltype(nc)::value; ++j) {
                  const acc_t tf = scale_logit(acc_t(tv[j]), invT), sf = scale_logit(acc_t(sv[j]), invT);
                  bad |= !((tf < std::numeric_limits<acc_t>::infinity()) & (sf < std::numeric_limits<acc_t>::infinity()));
                  online_add(tf, mt, st);
                  online_add(sf, ms, ss);
                }
              });
    LsePart part{double(mt), double(st), double(ms), double(ss), bad ? 1.0 : 0.0};
    part = block_reduce<double>(part, scratch, merge);
    if (threadIdx.x == 0) {
      o[0] = -dinf(), o[1] = 0.0, o[2] = -dinf(), o[3] = 0.0, o[4] = part.bad;
      if (part.bad == 0.0) {
        if (part.tm != -dinf()) o[0] = part.tm, o[1] = part.ts;
        if (part.sm != -dinf()) o[2] = part.sm, o[3] = part.ss;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// R2: the mixture of the slice from the merged A, B; the max of lt, the sum of e^(lt - max) and
// sum tau (amid_math.h: assistant_excess).

struct MixPart {
  double m, s, tau;
};

template <typename scalar_t, bool REF_P, bool POWER>
__global__ void __launch_bounds__(kPartialThreads)
    partial_mix_kernel(const PartialArgs<scalar_t, at::opmath_type<scalar_t>> a,
                       const LossParams<at::opmath_type<scalar_t>> P) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ MixPart scratch[kPartialWarps];
  auto merge = [](MixPart& x, const MixPart& y) {
    merge_max_sum<acc_t>(x.m, x.s, y.m, y.s);
    x.tau += y.tau;
  };
  const acc_t invT = P.inv_temperature;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    double* o = a.out + row * kNumPartialMix;
    const int state = row_state(a, row);
    if (state != 0) {
      if (threadIdx.x == 0) {
        for (int k = 0; k < kNumPartialMix; ++k) o[k] = state == 1 ? 0.0 : dnan();
      }
      continue;
    }
    const double* r = a.stats + row * kNumStats;
    const RowLse<acc_t> A{acc_t(r[kStatAMax]), acc_t(r[kStatALog])}, B{acc_t(r[kStatBMax]), acc_t(r[kStatBLog])};
    const acc_t dAB = row_lse_gap(A, B);
    const scalar_t* t = a.t + row * a.ldt;
    const scalar_t* s = a.s + row * a.lds;
    acc_t m = neg_inf<acc_t>(), sr = 0, tau = 0;
    visit_row(t, s, a.V, same_misalignment(t, s, sizeof(scalar_t)),
              [&](int64_t, const scalar_t* tv, const scalar_t* sv, auto nc) {
#pragma unroll
                for (int j = 0; j < decltype(nc)::value; ++j) {
                  acc_t lp, lq, lt, w, d;
                  mixture_from_logits_split<POWER, REF_P, M>(P, scale_logit(acc_t(tv[j]), invT),
                                                             scale_logit(acc_t(sv[j]), invT), A, B, dAB, lp, lq, lt, w, d);
                  tau += assistant_excess<M>(M::exp(REF_P ? lp : lq), d, lt);
                  online_add(lt, m, sr);
                }
              });
    MixPart part{double(m), double(sr), double(tau)};
    part = block_reduce<double>(part, scratch, merge);
    if (threadIdx.x == 0) {
      o[0] = part.m;
      o[1] = part.m != -dinf() ? part.s : 0.0;
      o[2] = part.tau;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// R3: the loss and gradient row sums of the slice from the merged A, B, Z (and kl's kl_row_loss
// inputs: sum lb, sum l1, sum |l1|; zeros for ab).

struct SumsPart {
  double v[kNumPartialSums];
};

template <typename scalar_t, Divergence D, Order O, bool POWER>
__global__ void __launch_bounds__(kPartialThreads)
    partial_sums_kernel(const PartialArgs<scalar_t, at::opmath_type<scalar_t>> a,
                        const LossParams<at::opmath_type<scalar_t>> P) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ SumsPart scratch[kPartialWarps];
  auto merge = [](SumsPart& x, const SumsPart& y) {
#pragma unroll
    for (int k = 0; k < kNumPartialSums; ++k) x.v[k] += y.v[k];
  };
  const acc_t invT = P.inv_temperature;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    double* o = a.out + row * kNumPartialSums;
    const int state = row_state(a, row);
    if (state != 0) {
      if (threadIdx.x == 0) {
        for (int k = 0; k < kNumPartialSums; ++k) o[k] = state == 1 ? 0.0 : dnan();
      }
      continue;
    }
    const double* r = a.stats + row * kNumStats;
    const RowLse<acc_t> A{acc_t(r[kStatAMax]), acc_t(r[kStatALog])}, B{acc_t(r[kStatBMax]), acc_t(r[kStatBLog])};
    const acc_t dAB = row_lse_gap(A, B);
    const acc_t Z = acc_t(r[kStatZ]);
    const scalar_t* t = a.t + row * a.ldt;
    const scalar_t* s = a.s + row * a.lds;
    acc_t v[kNumPartialSums] = {};
    visit_row(t, s, a.V, same_misalignment(t, s, sizeof(scalar_t)),
              [&](int64_t, const scalar_t* tv, const scalar_t* sv, auto nc) {
#pragma unroll
                for (int j = 0; j < decltype(nc)::value; ++j) {
                  acc_t lp, lq, lt, w, d;
                  mixture_from_logits_split<POWER, ref_is_p<O>(), M>(P, scale_logit(acc_t(tv[j]), invT),
                                                                     scale_logit(acc_t(sv[j]), invT), A, B, dAB, lp,
                                                                     lq, lt, w, d);
                  const acc_t rr = M::exp(lt - Z);  // r with the merged Z (as the CPU op and the backward)
                  const Terms<acc_t> e = element_terms<D, O, M>(P, M::exp(lp), M::exp(lq), rr, lp, lq, lt - Z, d - Z);
                  v[0] += e.l;
                  v[1] += e.G;
                  v[2] += e.G * w;
                  v[3] += e.H;
                  v[4] += rr * w;
                  if constexpr (D == Divergence::kKL) {
                    v[5] += e.lb;
                    v[6] += e.l1;
                    v[7] += e.l1 < acc_t(0) ? -e.l1 : e.l1;
                  }
                }
              });
    SumsPart part;
#pragma unroll
    for (int k = 0; k < kNumPartialSums; ++k) part.v[k] = double(v[k]);
    part = block_reduce<double>(part, scratch, merge);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < kNumPartialSums; ++k) o[k] = part.v[k];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host wrappers

// The message of the CPU op's check_partial_stats (cpu/amid_loss_cpu.cpp), so both backends fail alike.
void check_partial_stats(const char* op, const at::Tensor& stats, const at::Tensor& logits) {
  AMID_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == kNumStats, op,
             "expected stats of shape [", logits.size(0), ", ", kNumStats, "], but got ", shape_str(stats));
  AMID_CHECK(stats.scalar_type() == at::kDouble, op, "expected stats of dtype ", at::kDouble, ", but got ",
             stats.scalar_type());
  AMID_CHECK(stats.device() == logits.device(), op, "expected stats on device ", logits.device(), ", but got ",
             stats.device());
}

template <typename scalar_t, typename acc_t>
PartialArgs<scalar_t, acc_t> partial_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weight,
                                          const at::Tensor& stats, at::Tensor& out) {
  PartialArgs<scalar_t, acc_t> a{};
  a.s = s.const_data_ptr<scalar_t>();
  a.t = t.const_data_ptr<scalar_t>();
  a.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  a.stats = stats.defined() ? stats.const_data_ptr<double>() : nullptr;
  a.out = out.data_ptr<double>();
  a.N = s.size(0), a.V = s.size(1), a.lds = s.stride(0), a.ldt = t.stride(0);
  return a;
}

// One CTA per row, at most as many CTAs as fit on the device at once (grid-stride over the rows).
template <typename Kernel, typename Args, typename Extra>
void launch_rows(Kernel kernel, const Args& a, const Extra& extra, cudaStream_t stream) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPartialThreads, 0));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(a.N, int64_t(std::max(per_sm, 1)) * sms);
  kernel<<<unsigned(blocks), kPartialThreads, 0, stream>>>(a, extra);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor amid_partial_lse_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& row_weight, double temperature) {
  constexpr const char* op = "amid_partial_lse";
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  const int64_t N = student_logits.size(0);
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor out = at::empty({N, kNumPartialLse}, student_logits.options().dtype(at::kDouble));
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_partial_lse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Validates temperature exactly as the forward does (the other options are unused here).
    const auto P = make_params<acc_t>(op, 0.0, 0.0, "kl", "pr", 0.2, 0.7, temperature, false);
    if (N == 0) return;
    const auto a = partial_args<scalar_t, acc_t>(student_logits, teacher_logits, weight, at::Tensor(), out);
    launch_rows(partial_lse_kernel<scalar_t>, a, P.inv_temperature, at::cuda::getCurrentCUDAStream());
  });
  return out;
}

template <bool kWithZ>
at::Tensor amid_partial_pass_cuda(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                  const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                  double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                  double ab_beta, double temperature, bool detach_assistant) {
  check_fwd_args(op, student_logits, teacher_logits, row_weight);
  check_partial_stats(op, stats, student_logits);
  AMID_CHECK(order != "jsd", op, "expected order to be one of 'pr', 'qr', 'rp', 'rq' (the combined order 'jsd' is not ",
             "available vocab-parallel yet), but got 'jsd'");
  const int64_t N = student_logits.size(0);
  const at::cuda::OptionalCUDAGuard guard(student_logits.device());
  at::Tensor out = at::empty({N, kWithZ ? kNumPartialSums : kNumPartialMix},
                             student_logits.options().dtype(at::kDouble));
  at::Tensor weight = row_weight ? row_weight->contiguous() : at::Tensor();
  at::Tensor st = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_logits.scalar_type(), "amid_partial_pass_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(op, alpha, lam, std::string(divergence), std::string(order), ab_alpha, ab_beta,
                                      temperature, detach_assistant);
    if (N == 0) return;
    const auto a = partial_args<scalar_t, acc_t>(student_logits, teacher_logits, weight, st, out);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const bool power = P.mode == MixMode::kPower;
    if constexpr (kWithZ) {
      dispatch_loss(P.divergence, P.order, [&](auto dc, auto oc) {
        constexpr Divergence D = decltype(dc)::value;
        constexpr Order O = decltype(oc)::value;
        if constexpr (O != Order::kJSD) {  // refused above
          if (power) {
            launch_rows(partial_sums_kernel<scalar_t, D, O, true>, a, P, stream);
          } else {
            launch_rows(partial_sums_kernel<scalar_t, D, O, false>, a, P, stream);
          }
        }
      });
    } else {
      const bool ref_p = P.order == Order::kPR || P.order == Order::kRP;
      if (ref_p) {
        if (power) {
          launch_rows(partial_mix_kernel<scalar_t, true, true>, a, P, stream);
        } else {
          launch_rows(partial_mix_kernel<scalar_t, true, false>, a, P, stream);
        }
      } else {
        if (power) {
          launch_rows(partial_mix_kernel<scalar_t, false, true>, a, P, stream);
        } else {
          launch_rows(partial_mix_kernel<scalar_t, false, false>, a, P, stream);
        }
      }
    }
  });
  return out;
}

at::Tensor amid_partial_mix_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                 double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                 double ab_beta, double temperature, bool detach_assistant) {
  return amid_partial_pass_cuda<false>("amid_partial_mix", student_logits, teacher_logits, row_weight, stats, alpha,
                                       lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant);
}

at::Tensor amid_partial_sums_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                  const std::optional<at::Tensor>& row_weight, const at::Tensor& stats, double alpha,
                                  double lam, std::string_view divergence, std::string_view order, double ab_alpha,
                                  double ab_beta, double temperature, bool detach_assistant) {
  return amid_partial_pass_cuda<true>("amid_partial_sums", student_logits, teacher_logits, row_weight, stats, alpha,
                                      lam, divergence, order, ab_alpha, ab_beta, temperature, detach_assistant);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY_IMPL(amid, CUDA, m) {
  m.impl("amid_partial_lse", &amid_partial_lse_cuda);
  m.impl("amid_partial_mix", &amid_partial_mix_cuda);
  m.impl("amid_partial_sums", &amid_partial_sums_cuda);
}

}  // namespace amid

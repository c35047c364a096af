// amid_loss_kernels.cuh -- the forward / backward kernels of the AMiD loss and their launchers
// (see amid_loss_cuda.cu for the design). Instantiated once per input dtype in amid_loss_<dtype>.cu
// so that the CUDA build compiles in parallel; the host wrappers in amid_loss_cuda.cu call them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#if !defined(AMID_KERNELS_ON_HOST)  // (the launchers' headers)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <string>

#include "../amid_math.h"
#include "../amid_online.h"
#include "utils.cuh"

namespace amid {
namespace cuda_impl {

using namespace cuda_detail;
using M = LibMath;

constexpr int kThreads = 256;                       // threads per CTA (all kernels)
constexpr int64_t kResidentBudget = 96 * 1024;      // shared-memory bytes for one CTA's row slice
constexpr int kMaxCluster = 16;

template <typename T>
__device__ __forceinline__ T nan_v() {
  return std::numeric_limits<T>::quiet_NaN();
}

// The acc_t values of n logits (a vector chunk, or one element). A bf16 is the high half of a float, so two packed in
// one 32-bit word widen by a shift (the low one) and a mask (the high one): two instructions, where the per-element
// conversion took three (a PRMT extracting the high half, then the same shift; bf16 sm_90a: one instruction per element
// fewer in each pass, the same values bit for bit). Other types, and n = 1: the plain conversion.
template <int n, typename scalar_t, typename acc_t>
__device__ __forceinline__ void widen(const scalar_t* v, acc_t* out) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value && n % 2 == 0) {
    uint32_t w[n / 2];
    memcpy(w, v, sizeof(w));
#pragma unroll
    for (int j = 0; j < n / 2; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) out[j] = acc_t(v[j]);
  }
}

// R1's minimum logit of each side of a row (LseAcc::lo_t, lo_s: the bounded test, near_gaps) over 16-bit vector chunks:
// taken on the unscaled logits two to an instruction (HMNMX2 on a packed pair; NaN ignored, as fmin), where LseAcc
// took it on the scaled floats, one instruction per logit; then scaled and folded in once (fold): rounding is
// monotone, so the minimum of the scaled logits is the scaled minimum (invT > 0), the same value bit for bit.
// float / double: kOn false (LseAcc's).
template <typename scalar_t>
struct PackedMin {
  static constexpr bool kOn = false;
  template <int n>
  __device__ __forceinline__ void add(const scalar_t*, const scalar_t*) {}
  template <typename acc_t>
  __device__ __forceinline__ void fold(LseAcc<acc_t>&, acc_t) const {}
};
template <typename scalar_t, typename pair_t>
struct PackedMin16 {
  static constexpr bool kOn = true;
  pair_t mt, ms;  // the teacher's and the student's
  __device__ __forceinline__ PackedMin16() {
    const uint32_t inf2 = std::is_same<pair_t, __nv_bfloat162>::value ? 0x7f807f80u : 0x7c007c00u;  // (+inf, +inf)
    memcpy(&mt, &inf2, sizeof(mt));
    memcpy(&ms, &inf2, sizeof(ms));
  }
  template <int n>
  __device__ __forceinline__ void add(const scalar_t* tv, const scalar_t* sv) {
    static_assert(n % 2 == 0, "PackedMin: whole pairs");
    pair_t wt[n / 2], ws[n / 2];
    memcpy(wt, tv, sizeof(wt));
    memcpy(ws, sv, sizeof(ws));
#pragma unroll
    for (int j = 0; j < n / 2; ++j) mt = __hmin2(mt, wt[j]), ms = __hmin2(ms, ws[j]);
  }
  template <typename acc_t>
  __device__ __forceinline__ void fold(LseAcc<acc_t>& lse, acc_t invT) const {
    const float at = __low2float(mt), bt = __high2float(mt), as = __low2float(ms), bs = __high2float(ms);
    lse.add_min(acc_t(at < bt ? at : bt) * invT, acc_t(as < bs ? as : bs) * invT);
  }
};
template <>
struct PackedMin<c10::BFloat16> : PackedMin16<c10::BFloat16, __nv_bfloat162> {};
template <>
struct PackedMin<c10::Half> : PackedMin16<c10::Half, __half2> {};

// R1's group reduction (utils.cuh: cluster_reduce_groups; every lane of a group ends with the same state, bit for bit):
// the maxima and minima first (exact in any order), each lane's sums taken to the maxima (OnlineLSE::sum_to: one
// exponential per side), then plain sums. A butterfly of LseAcc::Packed merges recomputed both states' caches
// (OnlineLSE::scale_of, twice per side) and took an exponential per side at every step, and the CTA's warps' states
// were merged one after another: bf16 sm_90a, streaming kl/pr, R1's reduction along warp 0's path ~900 instructions per
// thread and row -> ~310, its warp step (every warp) ~400 -> ~70, 16 MUFU ops -> 2 (read off the SASS; not yet timed on
// a GPU). The C++ tests' emulation sums in the same order (tests/cpp: lse_group).
template <typename T>
__device__ __forceinline__ typename LseAcc<T>::Packed lse_group_reduce(typename LseAcc<T>::Packed a, unsigned width) {
  using std::fmax;
  using std::fmin;
  T mt = a.t.m, ms = a.s.m;
  for (unsigned o = width / 2; o > 0; o >>= 1) {
    mt = fmax(mt, __shfl_xor_sync(0xffffffffu, mt, int(o)));
    ms = fmax(ms, __shfl_xor_sync(0xffffffffu, ms, int(o)));
    a.lo_t = fmin(a.lo_t, __shfl_xor_sync(0xffffffffu, a.lo_t, int(o)));
    a.lo_s = fmin(a.lo_s, __shfl_xor_sync(0xffffffffu, a.lo_s, int(o)));
  }
  T st = OnlineLSE<T>::template sum_to<M>(a.t, mt), ss = OnlineLSE<T>::template sum_to<M>(a.s, ms);
  for (unsigned o = width / 2; o > 0; o >>= 1) {
    st += __shfl_xor_sync(0xffffffffu, st, int(o));
    ss += __shfl_xor_sync(0xffffffffu, ss, int(o));
  }
  a.t = {mt, st};
  a.s = {ms, ss};
  return a;
}

// Everything a kernel needs besides the loss parameters. Pointers are to the first element;
// rows are `ld*` elements apart.
template <typename scalar_t, typename loss_t>
struct RowArgs {
  const scalar_t* t;  // [N, V] teacher logits, row stride ldt
  const scalar_t* s;  // [N, V] student logits, row stride lds
  scalar_t* grad;     // [N, V] contiguous, or nullptr
  const loss_t* row_weight;  // [N] or nullptr (= 1)
  const loss_t* grad_loss;   // [N] (backward only)
  loss_t* loss;       // [N]
  loss_t* stats;      // [N, kNumStats]
  int64_t N, V, ldt, lds;
  int cluster;        // CTAs per cluster of the launch (1: none); the forward kernel traps on a mismatch
  // resident power-mean kernels: what R2 keeps per element for W (kStash): 0 nothing (W recomputes the mixture), 1 its
  // term d or c (power_kept), 2 also q^g beside it and q where the row's logits were (kKept3)
  int stash;
  // resident forward: the capacity of a CTA's row slice in elements (resident_slice_cap: its part of the row plus one
  // vector), the stride of its shared-memory arrays (with stash 2, the distance between the two kept ones). The kernel
  // derives its part of the row from it rather than dividing V by the cluster size and holding the quotient across
  // the passes, where ptxas spilled it (as row_step below).
  int slice_cap;
  bool bounded_ok;    // forward: rows that R1 finds bounded take the BoundedRow policy (AMID_CUDA_BOUNDED=0: none)
  bool prefetch;      // resident forward: L2 prefetch of the CTA's slice of its next row (AMID_CUDA_PREFETCH=0: none)
  // resident forward: the launch's clusters (its grid over `cluster`), the row loop's step. Read from the parameter
  // bank rather than divided out of gridDim and held in a register across the passes (bf16 sm_90a, resident ab/rq:
  // the quotient was one of the values ptxas spilled at the 128-register cap).
  unsigned row_step;

  __device__ __forceinline__ loss_t weight(int64_t row) const { return row_weight ? row_weight[row] : loss_t(1); }
};

// ------------------------------------------------------------------------------------------------
// The W pass shared by the forward (gradient in the forward) and backward kernels: the gradient of
// `len` elements from the row statistics, g = scale * (w (G - r S_G) + H - q K) (amid_math.h:
// element_terms; for kl G, H, S_G, K are the shifted ones). gap: the row's dAB, or RawGapRow (gap_arg).

// The element loop of the W passes that read only the logits: elem(tf, sf, t, s) is an element's gradient from its
// scaled logits tf = t / T, sf = s / T and its raw ones (for the gap, gap_arg), divided by scale.
// scale: the row's factor (weight / T), or NoScale where elem's values carry it already.
struct NoScale {};
template <typename scalar_t, typename acc_t, typename Scale, typename Elem>
__device__ __forceinline__ void write_grad_elems(const scalar_t* t, const scalar_t* s, scalar_t* g, int64_t len,
                                                 bool vec_ok, acc_t invT, Scale scale, Elem&& elem) {
  constexpr int kW = VecWidth<scalar_t>::value;
  visit_row(t, s, len, vec_ok, [&](int64_t i, const scalar_t* tv, const scalar_t* sv, auto nc) {
    constexpr int n = decltype(nc)::value;
    alignas(16) scalar_t out[kW];
    acc_t tw[n], sw[n];
    widen<n>(tv, tw);
    widen<n>(sv, sw);
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const acc_t e = elem(tw[j] * invT, sw[j] * invT, tw[j], sw[j]);
      if constexpr (std::is_same<Scale, NoScale>::value) {
        out[j] = scalar_t(e);
      } else {
        out[j] = scalar_t(scale * e);
      }
    }
    store_chunk_global<n>(g, i, out);
  });
}

template <Divergence D, Order O, bool POWER, class MM = M, typename scalar_t, typename acc_t, typename Gap>
__device__ __forceinline__ void write_grad_row(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s,
                                               scalar_t* g, int64_t len, bool vec_ok, RowLse<acc_t> A,
                                               RowLse<acc_t> B, Gap gap, acc_t Z, acc_t Z2, acc_t S_G, acc_t K,
                                               acc_t scale) {
  write_grad_elems(t, s, g, len, vec_ok, P.inv_temperature, scale, [&](acc_t tf, acc_t sf, acc_t tr, acc_t sr) {
    return grad_from_logits<D, O, POWER, MM>(P, tf, sf, A, B, gap_arg(gap, tr, sr), Z, Z2, S_G, K);
  });
}

// The same at k = 1 / N (amid_math.h: grad_from_logits_pow2; a kl/pr or kl/qr near row under wide weights, float).
template <Divergence D, Order O, int N, class MM, typename scalar_t, typename acc_t, typename Gap>
__device__ __forceinline__ void write_grad_row_pow2(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s,
                                                    scalar_t* g, int64_t len, bool vec_ok, RowLse<acc_t> A,
                                                    RowLse<acc_t> B, Gap gap, acc_t Z, acc_t S_G, acc_t K,
                                                    acc_t scale) {
  // kl/pr (H = 0): the gradient w (G - r S_G) - q K is linear in w and K, so the row's scale goes into w (pow2_row's
  // w_scale) and K (Ks) once per row, one product per element fewer; kl/qr's H keeps the per-element product.
  if constexpr (O == Order::kPR) {
    const Pow2Row<acc_t> R = pow2_row<ref_is_p<O>()>(P, Z, scale);
    const acc_t Ks = K * scale;
    write_grad_elems(t, s, g, len, vec_ok, P.inv_temperature, NoScale{}, [&](acc_t tf, acc_t sf, acc_t tr, acc_t sr) {
      return grad_from_logits_pow2<D, O, N, MM>(P, tf, sf, A, B, gap_arg(gap, tr, sr), R, S_G, Ks);
    });
  } else {
    const Pow2Row<acc_t> R = pow2_row<ref_is_p<O>()>(P, Z);
    write_grad_elems(t, s, g, len, vec_ok, P.inv_temperature, scale, [&](acc_t tf, acc_t sf, acc_t tr, acc_t sr) {
      return grad_from_logits_pow2<D, O, N, MM>(P, tf, sf, A, B, gap_arg(gap, tr, sr), R, S_G, K);
    });
  }
}

// The same from the terms R2 kept in shared memory (cst, at the slice's misalignment; amid_math.h: power_kept,
// d or c): the resident power-mean kernels of a single order, whose W then has no logarithm and no mixture form
// (amid_math.h: grad_from_logits_c; the same values as write_grad_row bit for bit).
template <Divergence D, Order O, class MM = M, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_grad_row_c(const LossParams<acc_t>& P, const scalar_t* t, const scalar_t* s,
                                                 const acc_t* cst, scalar_t* g, int64_t len, bool vec_ok,
                                                 RowLse<acc_t> A, RowLse<acc_t> B, acc_t Z, acc_t S_G, acc_t K,
                                                 acc_t scale) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const acc_t invT = P.inv_temperature;
  visit_row(t, s, len, vec_ok, [&](int64_t i, const scalar_t* tv, const scalar_t* sv, auto nc) {
    constexpr int n = decltype(nc)::value;
    alignas(16) acc_t cv[n];
    load_vals<n>(cst, i, cv);  // gauge:stash
    alignas(16) scalar_t out[kW];
    acc_t tw[n], sw[n];
    widen<n>(tv, tw);
    widen<n>(sv, sw);
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const acc_t tf = tw[j] * invT, sf = sw[j] * invT;
      out[j] = scalar_t(scale * grad_from_logits_c<D, O, MM>(P, tf, sf, cv[j], A, B, Z, S_G, K));
    }
    store_chunk_global<n>(g, i, out);
  });
}

// The row's two global logit pointers in the kept3 kernels (amid_fwd_kernel: global_t): static shared memory of those
// kernels alone (a function's, allocated in the kernels that call it), so that no other kernel's CTAs per SM move.
template <typename scalar_t>
__device__ __forceinline__ const scalar_t** kept3_row_ptrs() {
  __shared__ const scalar_t* ptrs[2];
  return ptrs;
}

// A float per element kept in the row slice's two 16-bit arrays once R2 no longer needs the logits (kKept3): a vector
// chunk's 8 floats fill its teacher and student vectors (the first 4, the last 4), a single element's float is split
// (its high half where its teacher logit was, its low half where its student logit was). W reads them back with the
// same chunking (visit_row on the same slice).
// One half of a vector chunk's 8 floats: half 0 (the first 4) into the teacher's vector, half 1 into the student's.
template <int n, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_kept_half(scalar_t* st, scalar_t* ss, int64_t i, int half, const acc_t* x4) {
  static_assert(n * sizeof(scalar_t) == 4 * sizeof(acc_t), "a chunk's vector holds 4 floats");
  alignas(16) scalar_t v[n];
  memcpy(v, x4, sizeof(v));
  store_chunk<n>(half == 0 ? st : ss, i, v);
}
template <int n, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_kept_in_logits(scalar_t* st, scalar_t* ss, int64_t i, const acc_t* x) {
  static_assert(sizeof(scalar_t) == 2 && sizeof(acc_t) == 4, "store_kept_in_logits: 16-bit logits, float values");
  if constexpr (n == VecWidth<scalar_t>::value) {
    store_kept_half<n>(st, ss, i, 0, x);
    store_kept_half<n>(st, ss, i, 1, x + 4);
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const uint32_t a = __float_as_uint(x[j]);
      reinterpret_cast<uint16_t*>(st)[i + j] = uint16_t(a >> 16);
      reinterpret_cast<uint16_t*>(ss)[i + j] = uint16_t(a & 0xffffu);
    }
  }
}
template <int n, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_kept_from_logits(const scalar_t* tv, const scalar_t* sv, acc_t* x) {
  if constexpr (n == VecWidth<scalar_t>::value) {
    memcpy(x, tv, 4 * sizeof(acc_t));
    memcpy(x + 4, sv, 4 * sizeof(acc_t));
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      uint16_t h, l;
      memcpy(&h, tv + j, 2);
      memcpy(&l, sv + j, 2);
      x[j] = __uint_as_float((uint32_t(h) << 16) | l);
    }
  }
}

// W from the three values R2 kept (kKept3: d and q^g in cst, cst2; q in the logits' arrays st, ss):
// amid_math.h, ab_grad_from_kept3 (four exponentials per element where write_grad_row_c takes six).
template <Order O, class MM, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_grad_row_kept3(const LossParams<acc_t>& P, const scalar_t* st, const scalar_t* ss,
                                                     const acc_t* cst, const acc_t* cst2, scalar_t* g, int64_t len,
                                                     bool vec_ok, acc_t Z, acc_t S_G, acc_t K, acc_t scale) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const Kept3Row<acc_t> R = kept3_row(P, Z, S_G, K);
  visit_row(st, ss, len, vec_ok, [&](int64_t i, const scalar_t* tv, const scalar_t* sv, auto nc) {
    constexpr int n = decltype(nc)::value;
    alignas(16) acc_t dv[n], gv[n], qv[n];
    load_vals<n>(cst, i, dv);   // gauge:stash
    load_vals<n>(cst2, i, gv);  // gauge:stash
    load_kept_from_logits<n>(tv, sv, qv);
    alignas(16) scalar_t out[kW];
#pragma unroll
    for (int j = 0; j < n; ++j) out[j] = scalar_t(scale * ab_grad_from_kept3<O, MM>(P, dv[j], qv[j], gv[j], R));
    store_chunk_global<n>(g, i, out);
  });
}

// Shared-memory bytes of a resident CTA's row slice for a cluster of C: the teacher and student slices
// (each padded by one vector for the global row's misalignment), and `kept` acc_t per element (R2's kept terms:
// RowArgs::stash 1 keeps one, 2 two; 32-byte aligned after the logits, at the same misalignment).
template <typename scalar_t>
__host__ __device__ inline int64_t resident_slice_cap(int64_t V, int64_t C) {
  constexpr int kW = VecWidth<scalar_t>::value;
  return ((V + C - 1) / C + kW - 1) / kW * kW + kW;
}
template <typename scalar_t>
__host__ __device__ inline int64_t resident_logit_bytes(int64_t cap) {
  return (2 * cap * int64_t(sizeof(scalar_t)) + 31) / 32 * 32;
}
template <typename scalar_t, typename acc_t>
inline int64_t resident_bytes(int64_t V, int64_t C, int kept) {
  const int64_t cap = resident_slice_cap<scalar_t>(V, C);
  return resident_logit_bytes<scalar_t>(cap) + kept * cap * int64_t(sizeof(acc_t));
}

// Whether the resident kernel of (scalar_t, D, O) can keep three values per element for W (RowArgs::stash 2): the
// 16-bit alpha-beta kernels of the orders whose reference is q (whose R2 no longer needs the logits after it, so that
// one value takes their place).
template <typename scalar_t, Divergence D, Order O>
constexpr bool kept3_kernel() {
  return sizeof(scalar_t) == 2 && D == Divergence::kAB && (O == Order::kQR || O == Order::kRQ);
}

// A row that is not computed: `value` into this CTA's slice of the gradient row (if any) and, from
// the lead thread, into the row's loss and stats (0 for ignored rows, NaN for invalid ones).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void fill_row(const RowArgs<scalar_t, acc_t>& a, int64_t row, scalar_t* g, int64_t len,
                                         bool lead, acc_t value) {
  if (g) fill_vec(g, len, scalar_t(value));
  if (lead) {
    a.loss[row] = value;
    for (int k = 0; k < kNumStats; ++k) a.stats[row * kNumStats + k] = value;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward kernel (optionally writing the gradient). Template: input dtype, divergence, order,
// whether the row slice is staged in shared memory, and whether the mixture is the power mean
// (kPower) or one of the cheap modes.

// Launch bounds: the fewest CTAs per SM ptxas must size its registers for. Resident: three single-order kl CTAs
// (<= 80 registers: the resident row slices of three CTAs fit in shared memory, bench/sass_gauge.py checks both), two
// of the others (kl 'jsd' has more static shared memory, so three do not fit anyway). Streaming: four single-order kl
// CTAs (<= 64 registers), three of kl 'jsd' and of the single-order ab kernels (<= 80), two of ab 'jsd' (<= 128).
// The streaming kl kernels' four: ncu on the H200 (session 46) found the bf16 kl/pr one issue-bound with its warps
// waiting on loads (long scoreboard 2.81 cycles per issued instruction) at 80 registers, 3 CTAs, 37.5% occupancy;
// at 64 the gauge reads the same hot loops (bf16: no spill; f16's power mean 10 spill instructions, 2 before, outside
// the loops, which gain 0.6 instructions per element; f32's cheap modes 2) and 50% occupancy. The streaming kl 'jsd'
// and single-order ab kernels' three (session 53; they had two, at 128 registers, 25% occupancy, where an earlier
// version of their code spilled at 80 and, without a minimum, at ptxas's cap of 64): the gauge reads their hot loops
// within +-0.9 instructions per element of two CTAs' in the power-mean kernels, +-2.1 in the cheap modes (bf16, f16,
// float32; sass_gauge-sm_90a-f716fe2.csv against 3282b31's) and, with the streaming kernel's slice and
// reductions known to be the whole row's (below) and the weight read again, no spill in their power-mean kernels (3
// spill instructions in ab/rp's cheap one, per row); at 64 registers (four CTAs) f16's ab power mean spilled 58, and ab
// 'jsd' spills 44 at 80 (bf16). None of these occupancies' speeds is measured yet (session 46's lease ended before; compare
// with bench/results/gpu-h200-21d04a3/variants.log: streaming ab/rq's forward 11.81 ms at two CTAs).
// float64 (a reference dtype on the GPU): one CTA per SM, up to 255 registers (at 80 / 128 its double math
// spilled, 10 to 600 instructions per kernel).
template <typename scalar_t, Divergence D, Order O, bool RESIDENT>
constexpr int fwd_min_ctas_per_sm() {
  constexpr bool kl_single = D == Divergence::kKL && O != Order::kJSD;
  if (std::is_same<scalar_t, double>::value) return 1;
  if (RESIDENT) return kl_single ? 3 : 2;
  return kl_single ? 4 : (D == Divergence::kAB && O == Order::kJSD ? 2 : 3);
}
// A row's constants as the kRowOnce kernels' thread 0 forms them from a reduction's merged state and hands them to its
// CTA (amid_fwd_kernel: R1's constants and close_row; utils.cuh: cluster_reduce_groups' finish). R1Row: from R1's
// state (Gap: RawGapRow for 16-bit logits, A - B otherwise; the row's flags in one word, kRow*). R2Row: R2's closing
// formulas.
enum : unsigned { kRowBad = 1, kRowFinite = 2, kRowBounded = 4, kRowNear = 8 };
template <typename T, typename Gap>
struct R1Row {
  RowLse<T> A, B;
  T dAB;
  Gap gap;
  unsigned flags;
};
template <typename T>
struct R2Row {
  T Z, Z2, L, S_G, K, Wbar;
  bool shift_ok, ok, exact;
};

// Whether amid_fwd_kernel indexes rows and slices in 32 bits (its idx_t, below): the launcher then sends it at most
// 2^31 - 1 rows per launch and V < 2^31.
template <Divergence D, Order O, bool RESIDENT, bool POWER = true>
constexpr bool fwd_index_32() {
  return RESIDENT ? ((D == Divergence::kAB || (POWER && O == Order::kQR)) && O != Order::kJSD)
                  : (D == Divergence::kKL && O == Order::kJSD);
}
template <typename scalar_t, Divergence D, Order O, bool RESIDENT, bool POWER>
__global__ void __launch_bounds__(kThreads, fwd_min_ctas_per_sm<scalar_t, D, O, RESIDENT>()) amid_fwd_kernel(const RowArgs<scalar_t, at::opmath_type<scalar_t>> a,
                                                            const LossParams<at::opmath_type<scalar_t>> P) {
  using acc_t = at::opmath_type<scalar_t>;
  using Lse = LseAcc<acc_t>;
  using Acc = typename RowAccOf<D, O, acc_t>::type;  // JsdRowAcc for the combined order
  constexpr int kW = VecWidth<scalar_t>::value;
  // R2 keeps each element's term for W (RowArgs::stash; d, or c with a masked side): the power mean of a single
  // order (kJSD has two terms per element, and the cheap modes none). Same thread, same chunk in both passes.
  constexpr bool kStash = RESIDENT && POWER && O != Order::kJSD;
  // The 16-bit alpha-beta kernels of the orders whose reference is q keep two more values per bounded row (RowArgs::stash
  // 2) where the row's extremes allow (amid_math.h: ab_kept3_row_ok): q^g beside d, and q in place of the logits, which
  // R2 is the last pass to need (the exact pass and a rerun of R2 then read the row from global memory); W then takes
  // four exponentials per element instead of six (write_grad_row_kept3).
  constexpr bool kKept3 = kStash && kept3_kernel<scalar_t, D, O>();
  // Three register-allocation choices of the bf16 kept3 kernels (R2's half chunks, the row's global pointers in shared
  // memory, the round's parity flag; each at its place below): together bf16 sm_90a ab/qr, ab/rq 10 -> 0 spill
  // instructions per row (161.9 -> 161.25 instructions per element; R3 -3.3). In the fp16 ones they moved spills the
  // other way (2 -> 10 together, 5-53 in the other combinations), so those keep the plain forms.
  constexpr bool kLeanKept3 = kKept3 && std::is_same<scalar_t, c10::BFloat16>::value;

  // Reduction scratch as raw storage (the accumulators have member initialisers, which shared
  // variables cannot run); every slot is written before it is read.
  // Sized by the real warp count (kThreads / 32; the launch bounds forbid larger CTAs): every byte
  // counts, three resident kl CTAs per SM need static + dynamic shared memory <= 76.8 KB each.
  constexpr int kWarps = kThreads / kWarpSize;
  using LseP = typename Lse::Packed;  // (R1's state without its caches: amid_online.h, OnlineLSE::Packed)
  __shared__ __align__(16) unsigned char lse_mem[sizeof(LseP) * (kWarps + 2)];
  __shared__ __align__(16) unsigned char acc_mem[sizeof(Acc) * (kWarps + 2)];
  LseP* lse_scratch = reinterpret_cast<LseP*>(lse_mem);
  LseP* lse_slot = lse_scratch + kWarps;
  Acc* acc_scratch = reinterpret_cast<Acc*>(acc_mem);
  Acc* acc_slot = acc_scratch + kWarps;
  // The exact pass's reduction (rare rows; see below) reuses acc_mem: static shared memory decides whether three
  // kl CTAs fit per SM. Its scratch and slots lie below R2's slots, which peers may still be reading when it
  // starts (the assert); R2's next writes over them come after the next row's R1 cluster barrier, which every
  // peer reaches only once its reads of this CTA's R3 slot are done (cluster_reduce).
  using Ex = typename ExactAccOf<D, O, acc_t>::type;
  static_assert(sizeof(Ex) * (kWarps + 2) <= sizeof(Acc) * kWarps,
                "amid_fwd_kernel: the exact pass's scratch must lie below the R2 slots");
  Ex* ex_scratch = reinterpret_cast<Ex*>(acc_mem);
  Ex* ex_slot = ex_scratch + kWarps;
  AMID_DYNAMIC_SHARED(smem_raw);

  // The launch's cluster shape must be the one this code sees: a kernel built without cluster support
  // (e.g. JIT-compiled from sm_80 PTX) launched with clusters would read past its row slice.
  // So must a resident launch's grid (row_step clusters, the row loop's step): another would skip rows or compute some
  // twice.
  if (cluster_size() != unsigned(a.cluster) || (RESIDENT && gridDim.x != a.row_step * unsigned(a.cluster))) __trap();
  // The streaming kernel is launched without clusters (the check above holds it to that): its slice is the whole row,
  // known at compile time (v0 = 0, len = V: nothing held in registers across the passes for them), and its reductions
  // compile without the cluster exchange (cluster_reduce's kCluster). bf16 sm_90a, the streaming alpha-beta kernels at
  // 80 registers (fwd_min_ctas_per_sm): spill instructions 8 -> 2, kl 'jsd' 6 -> 0.
  const unsigned C = RESIDENT ? cluster_size() : 1u, rank = RESIDENT ? cluster_rank() : 0u;
  // (The streaming kernels step by gridDim.x and take their part from V: given row_step and slice_cap as well, and
  // the trap's grid check, bf16 sm_90a streaming kl/rp, kl/rq went 0 -> 7 spill instructions and kl/pr's W +0.9.)
  const unsigned cluster_id = blockIdx.x / C, n_clusters = RESIDENT ? a.row_step : gridDim.x;
  // This CTA's slice [v0, v1) of every row: whole multiples of the vector width.
  // The resident alpha-beta kernels of a single order index rows and slices in 32 bits (idx_t): at the 128-register cap
  // their 64-bit row index and slice bounds, live across the passes, were what ptxas spilled (bf16 sm_90a, ab/qr and
  // ab/rq: 61 spill instructions -> 19 (18 since R1's T = 1 form), ab/pr and ab/rp 7 -> 2; none in a pass's loop). Slices
  // fit in shared memory, and the launcher sends them at most 2^31 - 1 rows. So does the streaming kl 'jsd' kernel
  // (with kLenIsV below: 0 spill instructions at 80 registers, 18 without either; launch_fwd_mode sends every streaming
  // launch at most 2^31 - 1 rows, and V < 2^31), and since session 58 the resident power-mean kl/qr kernels (bf16
  // sm_90a 12 -> 2 spill instructions per row, 0 with the round flag below; fp16's 0 and its counts unchanged; in the
  // cheap-mode one +0.5 instructions per element, so that one keeps 64 bits). The other kernels keep 64 bits:
  // there the same change moved spills both ways (streaming ab/rq 0 -> 2, resident kl/pr 0 -> 4, ab/jsd 7 -> 17).
  using idx_t = std::conditional_t<fwd_index_32<D, O, RESIDENT, POWER>(), unsigned, int64_t>;
  const idx_t part = RESIDENT ? idx_t(a.slice_cap - kW) : idx_t((a.V + kW - 1) / kW * kW);
  // (The streaming kl 'jsd' kernel spells out v0 = 0 and len = V, so that len is the launch's V rather than a value
  // the row loop holds: bf16 sm_90a, with its 32-bit idx_t, 18 spill instructions per row -> 0. In the other
  // streaming kernels the same moved spills from 0 to 7-11: kl/rp, kl/rq, ab/pr and ab/rp's cheap mode.)
  constexpr bool kLenIsV = !RESIDENT && std::is_same<idx_t, unsigned>::value;
  const idx_t v0 = kLenIsV ? idx_t(0) : rank * part < idx_t(a.V) ? rank * part : idx_t(a.V);
  const idx_t v1 = v0 + part < idx_t(a.V) ? v0 + part : idx_t(a.V);
  const idx_t len = kLenIsV ? idx_t(a.V) : v1 - v0;
  const acc_t invT = P.inv_temperature;
  const bool unit_t = invT == acc_t(1);  // (R1 below)
  // The reduction round (cluster_reduce alternates two slots by its parity). The bf16 kept3 kernels and the bf16
  // resident kl/qr kernels flip a flag, which ptxas keeps among the predicates where it spilled the counter's register
  // (bf16 sm_90a ab/rq 3 -> 0 spill instructions per row; kl/qr 2 -> 0 after its 32-bit index); the others count
  // (unsigned: wraps without overflow), where a flag moved spills the other way (bf16 ab 'jsd' 3 -> 8; fp16
  // ab/pr, ab/rp 0 -> 2) or cost instructions (fp16 kl/qr +0.6 per element).
  constexpr bool kRoundFlag = kLeanKept3 || (std::is_same<scalar_t, c10::BFloat16>::value && RESIDENT && POWER &&
                                             D == Divergence::kKL && O == Order::kQR);
  std::conditional_t<kRoundFlag, bool, unsigned> round = 0;
  const auto next_round = [&round]() {
    const unsigned r = round;
    if constexpr (kRoundFlag) {
      round = !round;
    } else {
      ++round;
    }
    return r;
  };

  auto merge_acc = [&P](Acc& x, const Acc& y) { x.template merge<M>(P, y); };
  auto merge_ex = [](Ex& x, const Ex& y) { x.merge(y); };

  // The row weight is read again where it is used (the loss and W's scale) rather than held from the row's start
  // across the passes, where ptxas spilled it: bf16 sm_90a, kl 2 spill instructions per row -> 0, ab pr / qr / rq
  // resident 27-29 -> 9; since the ab streaming kernels compile for 80 registers (session 53), theirs 2 -> 0 (at 128
  // registers they had gone 30-32 -> 53-59 that way), and the fp16 streaming kernels' too (ab and kl, power mean: 2 ->
  // 0); since power_pre's exponent is in base 2 (session 54), fp16's resident kl kernels too (kl/pr 2 -> 0, kl/qr 2 ->
  // 0, kl 'jsd' 8 -> 0). Not fp16's resident alpha-beta kernels (ab/qr, ab/rq 8 -> 13, ab/jsd 4 -> 5, ab/pr, ab/rp 2 ->
  // 0) nor float32's, where it moved the spills both ways (sm_90a, kl/pr resident 0 -> 5; kl/rq resident 7 -> 5). All
  // of them per row; which is faster, if either, is for the GPU benchmark to say.
  constexpr bool kReadWeightAgain =
      std::is_same<scalar_t, c10::BFloat16>::value ||
      (std::is_same<scalar_t, c10::Half>::value && (!RESIDENT || D == Divergence::kKL));
  // Every thread of a cluster holds the same merged state after a reduction and formed the same row constants from it:
  // R1's (two logarithms, the gaps' double math, the row tests) and R2's closing formulas. bf16 sm_90a, resident
  // kl/pr: 203 and 190 instructions along their longest paths (ab/pr 199 and 220, ab 'jsd' 201 and 434), which in a
  // 16-CTA cluster (~37 elements per thread and row) is up to ~10 instructions per element for every thread.
  // kRowOnce: thread 0 forms them alone, before the reduction's last barrier, and the CTA receives them instead of the
  // state (R1Row, R2Row; the other warps wait at that barrier either way). The streaming kernels (~600 elements per
  // thread and row) keep the every-thread form, and so do the resident kernels where this form moved ptxas's
  // allocation the wrong way: bf16 ab/qr, ab/rq (kept3) 0 -> 36 spill instructions, fp16's 2 -> 9, fp16 ab/pr, ab/rp
  // 0 -> 2, the cheap-mode kl kernels 0 -> 3. Where it applies: bf16 ab 'jsd' 3 -> 0, fp16 kl 'jsd' 2 -> 0, fp16 ab
  // 'jsd' 5 -> 2, no other spill; the bounded rows' loops -1.1 ... +1.0 per element (far gaps -4.2 ... +0.5), the
  // narrow-weight R2 +0.5 ... +3.6 and the general R2 -0.4 ... +0.6.
  constexpr bool kRowOnce = RESIDENT && POWER && !kKept3 &&
                            (std::is_same<scalar_t, c10::BFloat16>::value ||
                             (std::is_same<scalar_t, c10::Half>::value && (D == Divergence::kKL || O == Order::kJSD)));
  for (idx_t row = cluster_id; row < idx_t(a.N); row += n_clusters) {
    const acc_t weight0 = a.weight(row);
    scalar_t* g = a.grad ? a.grad + row * a.V + v0 : nullptr;
    if (weight0 == acc_t(0)) {  // ignored row: not read
      fill_row(a, row, g, len, cluster_lead_thread(), acc_t(0));
      continue;
    }
    const scalar_t* t = a.t + row * a.ldt + v0;
    const scalar_t* s = a.s + row * a.lds + v0;
    bool vec_ok = same_misalignment(t, s, sizeof(scalar_t)) && (g == nullptr || same_misalignment(t, g, sizeof(scalar_t)));

    // R1: log-sum-exps of the scaled rows, and the validity flag.
    Lse lse;
    PackedMin<scalar_t> pmin;  // (16-bit logits: R1's minimum, folded into lse below)
    // R1's work on a chunk of n logits (both paths): widened, into both log-sum-exps and the minimum. The log-sum-exps
    // are those of the scaled logits x / T. At T = 1 (the default; a uniform branch per launch) the widened logits
    // are those. At other T (`raw`) the states are kept on the raw logits with the scale L / T (amid_online.h:
    // OnlineLSE::raise, kRaw) and made those of the scaled logits once after the pass (unscale, below): where every
    // widened logit took a product by 1 / T, which the exponentials' FFMA cannot absorb (the maxima took the scaled
    // logits too; bf16 sm_90a: 2 instructions per element). R2 and W fold 1/T into an FFMA already.
    auto r1_chunk = [&](const scalar_t* tv, const scalar_t* sv, auto nc, auto raw) {
      constexpr int n = decltype(nc)::value;
      constexpr bool kRaw = decltype(raw)::value;
      acc_t x[n], y[n];
      widen<n>(tv, x);
      widen<n>(sv, y);
      if constexpr (PackedMin<scalar_t>::kOn && n > 1) {
        pmin.template add<n>(tv, sv);
        lse.template add_chunk<M, n, false, kRaw>(x, y, invT);
      } else {
        lse.template add_chunk<M, n, true, kRaw>(x, y, invT);
      }
    };
    acc_t* cst = nullptr;  // the kept terms (kStash), at the slice's misalignment
    if constexpr (RESIDENT) {
      // Stage the slice in shared memory at the same 16-byte misalignment as the global row, so
      // the visitor's vector chunks line up with the gradient row's. R1 runs on the registers the
      // copy just loaded (no second read of the slice; the loads overlap the exponentials).
      const int64_t pad = (reinterpret_cast<uintptr_t>(t) / sizeof(scalar_t)) % kW;
      const int64_t cap = a.slice_cap;  // (part + kW)
      scalar_t* st = reinterpret_cast<scalar_t*>(smem_raw) + pad;
      scalar_t* ss = reinterpret_cast<scalar_t*>(smem_raw) + cap + pad;
      if (kStash && a.stash && g) {  // (no gradient row: nothing to keep)
        // (32-bit offset: shared memory is < 256 KiB; a 64-bit one kept a register across the row loop)
        cst = reinterpret_cast<acc_t*>(smem_raw + unsigned(resident_logit_bytes<scalar_t>(cap))) + unsigned(pad);
      }
      // The slice of the cluster's next row into L2 while this one computes (one bulk prefetch per operand and CTA,
      // sm_90+): its staging then reads from L2, so the cluster's barriers wait less on its slowest CTA's loads.
      if (a.prefetch && threadIdx.x == 0 && row + n_clusters < idx_t(a.N)) {
        prefetch_l2(t + int64_t(n_clusters) * a.ldt, len);
        prefetch_l2(s + int64_t(n_clusters) * a.lds, len);
      }
      __syncthreads();  // the previous row's readers are done with the buffer
      if (kLeanKept3 && threadIdx.x == 0) {  // (read after the staging's barrier below)
        kept3_row_ptrs<scalar_t>()[0] = t;
        kept3_row_ptrs<scalar_t>()[1] = s;
      }
      const bool copy_vec = same_misalignment(t, s, sizeof(scalar_t));
      const auto stage = [&](auto raw) {
        visit_row(t, s, len, copy_vec, [&](int64_t i, const scalar_t* tv, const scalar_t* sv, auto nc) {
          constexpr int n = decltype(nc)::value;
          store_chunk<n>(st, i, tv);
          store_chunk<n>(ss, i, sv);
          r1_chunk(tv, sv, nc, raw);
        });
      };
      if (unit_t) {
        stage(std::false_type{});  // gauge:R1
      } else {
        stage(std::true_type{});  // gauge:R1t
      }
      __syncthreads();
      t = st;
      s = ss;
      vec_ok = g == nullptr || same_misalignment(st, g, sizeof(scalar_t));
    } else {
      const auto r1 = [&](auto raw) {
        visit_row(t, s, len, vec_ok, [&](int64_t, const scalar_t* tv, const scalar_t* sv, auto nc) {
          r1_chunk(tv, sv, nc, raw);
        });
      };
      if (unit_t) {
        r1(std::false_type{});  // gauge:R1
      } else {
        r1(std::true_type{});  // gauge:R1t
      }
    }
    if (!unit_t) lse.template unscale<M>(invT);  // (R1 at T != 1: see r1_chunk)
    pmin.fold(lse, invT);
    // R1's row constants (below), from the cluster's merged state. kRowOnce (above): thread 0 forms them alone, before
    // the reduction's last barrier, and the CTA receives them (R1Row) instead of the state.
    using GapRow = std::conditional_t<sizeof(scalar_t) == 2, RawGapRow<acc_t>, acc_t>;
    RowLse<acc_t> A, B;
    acc_t dAB;
    GapRow bounded_gap;
    bool finite_row, bounded, near, kept3;
    if constexpr (kRowOnce) {
      const R1Row<acc_t, GapRow> rc = cluster_reduce_groups<acc_t, kWarps, RESIDENT>(
          lse.pack(), lse_scratch, lse_slot, next_round(),
          [](const LseP& x, unsigned width) { return lse_group_reduce<acc_t>(x, width); },
          [](const LseP* sc) { return lse_group_reduce<acc_t>(sc[threadIdx.x % kWarps], kWarps); },
          unsigned(sizeof(LseP)), [&](const LseP& x) {  // (the formulas of the other branch, which says why)
            const Lse m = Lse::unpack(x);
            R1Row<acc_t, GapRow> r;
            r.A = RowLse<acc_t>{m.t.m, m.t.template log_sum<M>()};
            r.B = RowLse<acc_t>{m.s.m, m.s.template log_sum<M>()};
            r.dAB = row_lse_gap(r.A, r.B);
            if constexpr (sizeof(scalar_t) == 2) {
              r.gap = raw_gap_row(r.A, r.B, invT);
            } else {
              r.gap = r.dAB;
            }
            const bool finite = m.bounded() && (sizeof(scalar_t) != 2 || raw_gap_ok(m.t.m, m.s.m, m.lo_t, m.lo_s));
            const bool bnd = a.bounded_ok && finite;
            const bool nr = bnd && near_gaps(P, m.t.m, m.s.m, m.lo_t, m.lo_s, r.dAB);
            r.flags = (m.invalid() ? kRowBad : 0u) | (finite ? kRowFinite : 0u) | (bnd ? kRowBounded : 0u) |
                      (nr ? kRowNear : 0u);
            return r;
          });
      if (rc.flags & kRowBad) {
        fill_row(a, row, g, len, cluster_lead_thread(), nan_v<acc_t>());
        continue;
      }
      A = rc.A, B = rc.B, dAB = rc.dAB, bounded_gap = rc.gap;
      finite_row = rc.flags & kRowFinite, bounded = rc.flags & kRowBounded, near = rc.flags & kRowNear;
      kept3 = false;  // (kRowOnce leaves the kept3 kernels out)
    } else {
      lse = Lse::unpack(cluster_reduce_groups<acc_t, kWarps, RESIDENT>(
          lse.pack(), lse_scratch, lse_slot, next_round(),
          [](const LseP& x, unsigned width) { return lse_group_reduce<acc_t>(x, width); },
          [](const LseP* sc) { return lse_group_reduce<acc_t>(sc[threadIdx.x % kWarps], kWarps); }));
      const bool bad_row = lse.invalid();
      if (bad_row) {  // NaN / +inf, or an all -inf row: the row's loss, stats and gradient are NaN
        fill_row(a, row, g, len, cluster_lead_thread(), nan_v<acc_t>());
        continue;
      }
      // Each log-sum-exp as max + log(sum) (amid_math.h: RowLse), and A - B in double: log p and the
      // logit gap keep their accuracy at any logit scale, as in the CPU kernel.
      A = RowLse<acc_t>{lse.t.m, lse.t.template log_sum<M>()}, B = RowLse<acc_t>{lse.s.m, lse.s.template log_sum<M>()};
      dAB = row_lse_gap(A, B);
      // 16-bit logits: a bounded row's logit gaps from the raw logits (amid_math.h: RawGap; one FFMA after two exact
      // subtractions, where logit_gap's two forms take 7 instructions); float32 / float64 keep logit_gap.
      bounded_gap = [&]() -> GapRow {
        if constexpr (sizeof(scalar_t) == 2) {
          return raw_gap_row(A, B, invT);
        } else {
          return dAB;
        }
      }();
      // A row whose logits are all finite with |x / T| < 2^100 (nearly every row) runs R2 and W with the BoundedRow
      // policy (below). (R1's extremes are not read after R2: held across it, they cost the alpha-beta kernels spills,
      // per row.) 16-bit logits: only rows whose extremes admit the raw gap (amid_math.h: raw_gap_ok; a logit of 1e29
      // beside small ones does not) count as finite here: the others take the general policy and logit_gap, and no
      // R3 (which takes the raw gap too), as rows with masks do.
      finite_row = lse.bounded() && (sizeof(scalar_t) != 2 || raw_gap_ok(lse.t.m, lse.s.m, lse.lo_t, lse.lo_s));
      bounded = a.bounded_ok && finite_row;
      // A bounded row whose logit gaps are near (amid_math.h: NearGaps; nearly every row at |k| <= 1) runs the float
      // power mean's R2 (under wide weights) and W (from the kept terms, or recomputing the mixture under wide
      // weights) without its far-gap form: a uniform branch per row, from R1's extremes. Other bounded rows run the
      // same passes with it (gauge:R2f, gauge:Wsf, gauge:Wf).
      near = bounded && near_gaps(P, lse.t.m, lse.s.m, lse.lo_t, lse.lo_s, dAB);
      // Whether R2 keeps the three values (kKept3); once it has, the row's logits are only in global memory.
      kept3 = kKept3 && a.stash == 2 && cst != nullptr && bounded && ab_kept3_row_ok(P, lse.t.m, lse.lo_s, B, dAB);
    }
    // The row's logits in global memory, for the passes that read them again after a kept3 R2 (rare rows). The kept3
    // kernels read them back from shared memory, where thread 0 put them at the staging: formed again from the row
    // index, they were the one value ptxas kept from the staging to these passes and spilled (their high halves; bf16
    // sm_90a ab/rq 7 -> 3 spill instructions per row, after the half chunks).
    const auto global_t = [&]() { return kLeanKept3 ? kept3_row_ptrs<scalar_t>()[0] : a.t + row * a.ldt + v0; };
    const auto global_s = [&]() { return kLeanKept3 ? kept3_row_ptrs<scalar_t>()[1] : a.s + row * a.lds + v0; };
    const auto global_vec_ok = [&]() {
      return same_misalignment(global_t(), global_s(), sizeof(scalar_t)) &&
             (g == nullptr || same_misalignment(global_t(), g, sizeof(scalar_t)));
    };
    // R2: the mixture per element; Z and the loss-specific sums in online form. A bounded row (above) runs R2 and W
    // with the BoundedRow policy: the same values, bit for bit, without the guards for -inf masks and overflow (a
    // uniform branch per row); R2 sums there relative to lt = 0 (FixedShift: other values, within the budgets; see
    // below).
    Acc acc;
    auto r2 = [&](auto policy, const scalar_t* rt, const scalar_t* rs, bool rvec) {
      using MM = decltype(policy);
      const auto gap = [&]() {  // (the general policy's rows may hold -inf and huge logits: logit_gap)
        if constexpr (MM::kBounded) {
          return bounded_gap;
        } else {
          return dAB;
        }
      }();
      acc = Acc{};
      acc.template begin<MM>();
      visit_row(rt, rs, len, rvec, [&](int64_t i, const scalar_t* tv, const scalar_t* sv, auto nc) {
        constexpr int n = decltype(nc)::value;
        acc_t tw[n], sw[n];
        widen<n>(tv, tw);
        widen<n>(sv, sw);
        if constexpr (kKept3 && MM::kBounded && MM::kFixedShift) {
          // (the same element math as below, which also returns q and q^g: one loop body, uniform branches around
          // the stores; the chunk's logits are in registers, so its slots in t, s can take q)
          // A vector chunk in two halves, each stored before the next is formed (the first half's q fills the
          // teacher's vector, the second's the student's, as store_kept_in_logits lays them out), so that the three
          // values of all 8 elements are never live at once (bf16 sm_90a ab/rq: 10 -> 7 spill instructions per row,
          // its round counter among them; R2 -0.1 instructions per element).
          static_assert(!kLeanKept3 || kW == 8, "kept3: 16-bit logits, 8 per vector");
          constexpr int h = kLeanKept3 && n == kW ? kW / 2 : n;
#pragma unroll
          for (int j0 = 0; j0 < n; j0 += h) {
            alignas(16) acc_t cv[h], qv[h], gv[h];
#pragma unroll
            for (int jj = 0; jj < h; ++jj) {
              const int j = j0 + jj;
              const acc_t tf = tw[j] * invT, sf = sw[j] * invT;
              RefPowers<acc_t> k3;
              cv[jj] = add_from_logits_c3<O, MM>(acc, P, tf, sf, A, B, gap_arg(gap, tw[j], sw[j]), k3);
              qv[jj] = k3.o;
              gv[jj] = k3.og;
            }
            if (cst) store_vals<h>(cst, i + j0, cv);
            if (kept3) {
              store_vals<h>(cst + a.slice_cap, i + j0, gv);
              if constexpr (h == n) {
                store_kept_in_logits<n>(const_cast<scalar_t*>(t), const_cast<scalar_t*>(s), i, qv);
              } else {
                store_kept_half<n>(const_cast<scalar_t*>(t), const_cast<scalar_t*>(s), i, j0 / h, qv);
              }
            }
          }
          return;
        }
        if constexpr (kStash) {
          alignas(16) acc_t cv[n];
#pragma unroll
          for (int j = 0; j < n; ++j) {
            const acc_t tf = tw[j] * invT, sf = sw[j] * invT;
            cv[j] = add_from_logits_c<O, MM>(acc, P, tf, sf, A, B, gap_arg(gap, tw[j], sw[j]));
          }
          if (cst) store_vals<n>(cst, i, cv);
        } else {
#pragma unroll
          for (int j = 0; j < n; ++j) {
            const acc_t tf = tw[j] * invT, sf = sw[j] * invT;
            add_from_logits<O, POWER, MM>(acc, P, tf, sf, A, B, gap_arg(gap, tw[j], sw[j]));
          }
        }
      });
    };
    // A bounded R2 takes its sums relative to lt = 0 (amid_math.h: FixedShift; kl/pr 6 instructions per element
    // fewer, ab/rq 9.6); a row where that leaves S below 2^-20 (shift_ok, a uniform branch after the cluster's merge: every
    // thread holds the merged state) runs R2 again in the general policy, under the running maximum. Its reduction
    // takes the next round's slot (cluster_reduce alternates two), and its kept terms overwrite all of the first R2's
    // (the same values, or under wide weights M's: W then takes them with the sums they were formed with). One call
    // site per policy: a loop, not a second call
    // (each call inlines the pass).
    using MB = FixedShift<BoundedRow<M>>;
    // R2's closing formulas from the cluster's merged state, as kRowOnce's thread 0 forms them (above). R3's flag:
    // a finite row whose closing formulas would lose too much (below), with R1's flag read again from R1Row in the
    // scratch, which only the next row's R1 reduction writes (held across R2 it was a value ptxas spilled).
    const auto close_row = [&](const Acc& c) {
      acc_t Z, Z2, L, S_G, K, cond;
      const bool ok = c.template close<M>(P, Z, Z2, L, S_G, K, cond);
      const bool finite = (reinterpret_cast<const R1Row<acc_t, GapRow>*>(lse_scratch)->flags & kRowFinite) != 0u;
      return R2Row<acc_t>{Z, Z2, L, S_G, K, c.wbar(), c.shift_ok(), ok, finite && cond > acc_t(kExactCond)};
    };
    R2Row<acc_t> rr{};
    for (bool general = !bounded;; general = true) {
      if (!general) {
        // A power mean in float whose weights are wide (amid_math.h: WideWeights; lam = 0.5 in every order) runs
        // R2 without power_log's log1p series and with its own logarithm of the mixture's sums (kSplitLog; the
        // streaming W and the backward kernel too): a uniform branch per launch, P being uniform. The general
        // policy's passes (masked rows, the rerun below, R3) keep M: the two agree to the approximate log's error.
        if constexpr (POWER && std::is_same<acc_t, float>::value) {
          if (wide_weights<O>(P)) {
            if (near) {
              r2(NearGaps<WideWeights<MB>>{}, t, s, vec_ok);  // gauge:R2
            } else {
              r2(WideWeights<MB>{}, t, s, vec_ok);  // gauge:R2f
            }
          } else {
            r2(MB{}, t, s, vec_ok);  // gauge:R2n
          }
        } else {
          r2(MB{}, t, s, vec_ok);  // gauge:R2
        }
      } else {
        // (a rerun after a kept3 R2 reads the logits from global memory; it keeps d again, beside the same q and q^g)
        const scalar_t* rt = kept3 ? global_t() : t;
        const scalar_t* rs = kept3 ? global_s() : s;
        const bool rvec = kept3 ? global_vec_ok() : vec_ok;
        r2(M{}, rt, rs, rvec);  // gauge:R2m
      }
      if (!general && MB::kFixedShift) {
        // The FixedShift R2: every state's m is 0, so the cluster adds their plain sums (RowAcc::Sums: merge's bits,
        // tests/cpp test_fixed_shift_sums), without merge's factors and its branch, and m and the powers of e^m not
        // shuffled (kl 11 values per step instead of 13, alpha-beta 13 instead of 17). bf16 sm_90a, resident, along warp
        // 0's path in a 16-CTA cluster (SASS, loops counted by their trip counts): kl/pr ~785 -> ~515 instructions per
        // thread and row, ab/rq ~1200 -> ~590. Its scratch and slots lie in acc_mem's (the slots sizeof(Acc) apart), so
        // that a round's slots never overlap the next round's, whichever state that one reduces. The state is rebuilt
        // with begin's constants after the reduction: held across it, m and the powers cost the streaming kl kernels
        // (64 registers) 108-117 spill instructions.
        using Sums = typename Acc::Sums;
        const auto add_sums = [](Sums& x, const Sums& y) { x.add(y); };
        if constexpr (kRowOnce) {
          rr = cluster_reduce<acc_t, kWarps, RESIDENT>(
              acc.sums(), reinterpret_cast<Sums*>(acc_scratch), reinterpret_cast<Sums*>(acc_slot), next_round(),
              add_sums, unsigned(sizeof(Acc)), [&](const Sums& u) {
                Acc c;
                c.template begin<MB>();
                c.set_sums(u);
                return close_row(c);
              });
        } else {
          const Sums u = cluster_reduce<acc_t, kWarps, RESIDENT>(
              acc.sums(), reinterpret_cast<Sums*>(acc_scratch), reinterpret_cast<Sums*>(acc_slot), next_round(),
              add_sums, unsigned(sizeof(Acc)));
          acc.template begin<MB>();  // (m = 0 and its powers 1 as constants, not held across the reduction)
          acc.set_sums(u);
        }
      } else if constexpr (kRowOnce) {
        rr = cluster_reduce<acc_t, kWarps, RESIDENT>(acc, acc_scratch, acc_slot, next_round(), merge_acc,
                                                     unsigned(sizeof(Acc)), close_row);
      } else {
        acc = cluster_reduce<acc_t, kWarps, RESIDENT>(acc, acc_scratch, acc_slot, next_round(), merge_acc);
      }
      if (general || !MB::kFixedShift || (kRowOnce ? rr.shift_ok : acc.shift_ok())) break;
    }
    acc_t Z, Z2, L, S_G, K, cond = acc_t(0);
    const bool ok = kRowOnce ? rr.ok : acc.template close<M>(P, Z, Z2, L, S_G, K, cond);
    if constexpr (kRowOnce) Z = rr.Z, Z2 = rr.Z2, L = rr.L, S_G = rr.S_G, K = rr.K;
    if (!ok) {  // alpha >= 1 with disjoint supports: the assistant is undefined
      fill_row(a, row, g, len, cluster_lead_thread(), nan_v<acc_t>());
      continue;
    }
    // R3, the exact pass, for a row whose closing formulas would lose too much (amid_online.h: cond_of,
    // ExactAcc): with Z known, the row sums from each element's terms, as the CPU kernel takes them. Rows with
    // -inf masks or huge logits keep the online sums (tuned for masked mass; tests/cpp measures the exact pass
    // worse there). A uniform branch: every thread of the cluster holds the same merged state (cluster_reduce) or R2Row.
    // One loop, in the general math policy, recomputing the mixture: the pass is rare, and its code is what the CUDA
    // build pays (with R3 in every kernel, and a second loop from R2's kept terms, the CI's build of the CUDA
    // kernels took ~75 minutes instead of ~55 on two cores).
    // The float64 kernels too: their closing formulas lose eps_64 cond, and with a tiny alpha-beta exponent at logit
    // scale 12 that reached 9e-9 of the loss (tests/cpp, test_online_double: 8 of 600 rows over float64's 1e-9); the
    // pass costs their unit ~13% more compile time (579 -> 653 s for sm_90a). The top-k kernel's bucket rows take
    // it on their bins (amid_topk_cuda.cu).
    if (kRowOnce ? rr.exact : finite_row && cond > acc_t(kExactCond)) {
      const acc_t Wbar = kRowOnce ? rr.Wbar : acc.wbar();  // (formed before: R2's state need not stay live through R3)
      Ex ex;
      // (the kept3 kernels' R3 reads the logits from global memory: after a kept3 R2 they are there only; the pass is rare)
      const scalar_t* xt = kKept3 ? global_t() : t;
      const scalar_t* xs = kKept3 ? global_s() : s;
      const bool xvec = kKept3 ? global_vec_ok() : vec_ok;
      visit_row(xt, xs, len, xvec, [&](int64_t, const scalar_t* tv, const scalar_t* sv, auto nc) {  // gauge:R3
        constexpr int n = decltype(nc)::value;
        acc_t tw[n], sw[n];
        widen<n>(tv, tw);
        widen<n>(sv, sw);
#pragma unroll
        for (int j = 0; j < n; ++j) {
          exact_from_logits<D, O, POWER, M>(ex, P, tw[j] * invT, sw[j] * invT, A, B, gap_arg(bounded_gap, tw[j], sw[j]),
                                            Z, Z2);  // (bounded)
        }
      });
      ex = cluster_reduce<acc_t, kWarps, RESIDENT>(ex, ex_scratch, ex_slot, next_round(), merge_ex);
      ex.finalize(P, Wbar, L, S_G, K);
    }
    const acc_t weight = kReadWeightAgain ? a.weight(row) : weight0;
    if (cluster_lead_thread()) {
      a.loss[row] = weight * L;
      acc_t* st = a.stats + int64_t(row) * kNumStats;
      st[kStatAMax] = A.m, st[kStatBMax] = B.m, st[kStatZ] = Z, st[kStatSG] = S_G, st[kStatK] = K;
      st[kStatALog] = A.l, st[kStatBLog] = B.l, st[kStatZ2] = Z2;
    }

    // W: the gradient row (chain rule through s/T: the 1/T factor).
    if (g) {
      const acc_t scale = weight * invT;
      bool done = false;
      if constexpr (kKept3) {
        // (Z >= -14, which ab_kept3_row_ok assumed: always where R2's fixed shift held, and after its rerun where Z
        // still is; otherwise W from d, with the logits from global memory)
        if (kept3 && Z >= acc_t(kKept3MinZ)) {
          const acc_t* cst2 = cst + a.slice_cap;
          write_grad_row_kept3<O, BoundedRow<M>>(P, t, s, cst, cst2, g, len, vec_ok, Z, S_G, K, scale);  // gauge:Ws3
          done = true;
        } else if (kept3) {
          t = global_t();
          s = global_s();
          vec_ok = global_vec_ok();
        }
      }
      if constexpr (kStash) {
        if (cst && !done) {
          // (near rows without the far-gap form in the float kernels only, as R2: a third W costs the float64 unit's
          // build time for ~3 instructions per element)
          if constexpr (std::is_same<acc_t, float>::value) {
            if (near) {
              write_grad_row_c<D, O, NearGaps<BoundedRow<M>>>(P, t, s, cst, g, len, vec_ok, A, B, Z, S_G, K, scale);  // gauge:Ws
            } else if (bounded) {
              write_grad_row_c<D, O, BoundedRow<M>>(P, t, s, cst, g, len, vec_ok, A, B, Z, S_G, K, scale);  // gauge:Wsf
            } else {
              write_grad_row_c<D, O, M>(P, t, s, cst, g, len, vec_ok, A, B, Z, S_G, K, scale);  // gauge:Wsm
            }
          } else {
            if (bounded) {
              write_grad_row_c<D, O, BoundedRow<M>>(P, t, s, cst, g, len, vec_ok, A, B, Z, S_G, K, scale);  // gauge:Ws
            } else {
              write_grad_row_c<D, O, M>(P, t, s, cst, g, len, vec_ok, A, B, Z, S_G, K, scale);  // gauge:Wsm
            }
          }
          done = true;
        }
      }
      if (!done) {
        if (bounded) {
          if constexpr (POWER && std::is_same<acc_t, float>::value) {  // (as R2)
            if (wide_weights<O>(P)) {
              using MW = WideWeights<BoundedRow<M>>;
              // A near row without the far-gap form, as R2 (the streaming kernels' and kl / ab jsd's W: bf16 kl/pr 6
              // instructions per element fewer). The kernels that keep R2's terms run this W only where they could not
              // keep them (rare rows): one form there, which a second would cost registers (bf16 ab/pr resident: 9 ->
              // 19 spill instructions per row).
              if (!kStash && near) {
                // kl/pr, kl/qr at alpha = 0.5 (1 / k = 4, the library's default) and alpha = -1 (k = 1, the
                // arithmetic mixture: DistiLLM's skew KLs): p, q, r from one exponential and squarings (amid_math.h:
                // grad_from_logits_pow2; bf16 kl/pr 6 -> 4 MUFU per element). Other alpha: W.
                constexpr bool kPow2 = D == Divergence::kKL && (O == Order::kPR || O == Order::kQR);
                if (kPow2 && P.pow_n == kPow2N) {
                  if constexpr (kPow2) {
                    write_grad_row_pow2<D, O, kPow2N, NearGaps<MW>>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, S_G, K, scale);  // gauge:Wi
                  }
                } else if (kPow2 && P.pow_n == kPow2NArith) {
                  if constexpr (kPow2) {
                    write_grad_row_pow2<D, O, kPow2NArith, NearGaps<MW>>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, S_G, K, scale);  // gauge:Wa
                  }
                } else {
                  write_grad_row<D, O, POWER, NearGaps<MW>>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, Z2, S_G, K, scale);  // gauge:W
                }
              } else {
                write_grad_row<D, O, POWER, MW>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, Z2, S_G, K, scale);  // gauge:Wf
              }
            } else {
              write_grad_row<D, O, POWER, BoundedRow<M>>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, Z2, S_G, K, scale);  // gauge:Wn
            }
          } else {
            write_grad_row<D, O, POWER, BoundedRow<M>>(P, t, s, g, len, vec_ok, A, B, bounded_gap, Z, Z2, S_G, K, scale);  // gauge:W
          }
        } else {
          write_grad_row<D, O, POWER, M>(P, t, s, g, len, vec_ok, A, B, dAB, Z, Z2, S_G, K, scale);  // gauge:Wm
        }
      }
    }
  }
  cluster_exit_barrier();
}

// ------------------------------------------------------------------------------------------------
// Backward kernel: the W pass from the saved stats (no reductions), one CTA per row. Launch bounds:
// float64 at least one CTA per SM (without a minimum, ptxas capped its double math at 64-80 registers and
// spilled up to 34 instructions); the other dtypes none (0: no .minnctapersm; ptxas picks 40-48 registers,
// 5-6 CTAs per SM, unspilled).

template <typename scalar_t, Divergence D, Order O, bool POWER>
__global__ void __launch_bounds__(kThreads, std::is_same<scalar_t, double>::value ? 1 : 0) amid_bwd_kernel(const RowArgs<scalar_t, at::opmath_type<scalar_t>> a,
                                                            const LossParams<at::opmath_type<scalar_t>> P) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const acc_t weight = a.weight(row);
    scalar_t* g = a.grad + row * a.V;
    if (weight == acc_t(0)) {
      fill_vec(g, a.V, scalar_t(0));
      continue;
    }
    const acc_t* st = a.stats + row * kNumStats;
    const RowLse<acc_t> A{st[kStatAMax], st[kStatALog]}, B{st[kStatBMax], st[kStatBLog]};
    const acc_t dAB = row_lse_gap(A, B);
    const acc_t Z = st[kStatZ], Z2 = st[kStatZ2], S_G = st[kStatSG], K = st[kStatK];
    const acc_t scale = a.grad_loss[row] * weight * P.inv_temperature;
    const scalar_t* t = a.t + row * a.ldt;
    const scalar_t* s = a.s + row * a.lds;
    const bool vec_ok = same_misalignment(t, s, sizeof(scalar_t)) && same_misalignment(t, g, sizeof(scalar_t));
    // (a float power mean under wide weights without power_log's log1p series, as the forward's R2 and W)
    if constexpr (POWER && std::is_same<acc_t, float>::value) {
      if (wide_weights<O>(P)) {
        write_grad_row<D, O, POWER, WideWeights<M>>(P, t, s, g, a.V, vec_ok, A, B, dAB, Z, Z2, S_G, K, scale);  // gauge:W
      } else {
        write_grad_row<D, O, POWER>(P, t, s, g, a.V, vec_ok, A, B, dAB, Z, Z2, S_G, K, scale);  // gauge:Wn
      }
    } else {
      write_grad_row<D, O, POWER>(P, t, s, g, a.V, vec_ok, A, B, dAB, Z, Z2, S_G, K, scale);  // gauge:W
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers (left out of the C++ tests' host build of the kernels, tests/cpp/test_kernels_on_host.cpp)

#if !defined(AMID_KERNELS_ON_HOST)
int sm_count();

// "auto" (default: streaming), "stream" or "resident": AMID_CUDA_PATH picks a read path (tests use it to
// cover both on one GPU).
inline std::string forced_path() {
  const char* e = std::getenv("AMID_CUDA_PATH");
  return e ? std::string(e) : std::string("auto");
}

inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::string(e) == value;
}


// What the launcher needs to know about the resident kernel on one device, found once per (kernel,
// device): whether the code that runs supports clusters, its static shared memory, and the largest
// dynamic shared memory it may use (the device's opt-in limit minus the static part).
struct ResidentInfo {
  bool clusters = false;
  int max_cluster = 1;  // 8 (portable) or kMaxCluster when non-portable sizes are allowed
  int static_smem = 0;
  int max_dynamic_smem = 0;
  // The largest dynamic shared memory with which two CTAs still fit on one SM (what a kernel limited to two CTAs per SM by
  // its registers can take without losing occupancy; RowArgs::stash 2's budget)
  int two_per_sm_dynamic_smem = 0;
};

// Clusters need an sm_90+ device *and* code compiled for sm_90+: a kernel JIT-compiled on Hopper from
// sm_80 PTX (TORCH_CUDA_ARCH_LIST="8.0+PTX") has binaryVersion 90 but was written without clusters
// (utils.cuh: cluster_size() is 1 there), so only the PTX version tells. The kernel also checks the
// cluster size it is launched with (RowArgs::cluster) and traps on a mismatch.
//
// The dynamic-shared-memory limit is a per-function, process-wide attribute: it is set here once per
// (kernel, device), to the maximum, under a mutex, so that concurrent launches from several host threads
// (with different row lengths) never race on it. The same for the non-portable cluster size. The cache
// is keyed by the kernel's address: every kernel variant of one dtype has the same C++ type, so a cache
// per type (a function-local static of a template on the kernel's type) would set the attribute for
// the first variant launched only, and the others would fail to launch with more than 48 KB.
template <typename Kernel>
const ResidentInfo& resident_info(Kernel kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, ResidentInfo> cache;  // node-based: references stay valid
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  ResidentInfo r;
  r.clusters = prop->major >= 9 && attr.ptxVersion >= 90;
  r.static_smem = int(attr.sharedSizeBytes);
  r.max_dynamic_smem = std::max(0, int(prop->sharedMemPerBlockOptin) - r.static_smem);
  // (each CTA's shared memory, with the driver's reservation, is allocated in 128-byte granules)
  r.two_per_sm_dynamic_smem =
      std::min(r.max_dynamic_smem, std::max(0, int(prop->sharedMemPerMultiprocessor / 2 / 128 * 128) -
                                                   int(prop->reservedSharedMemPerBlock) - r.static_smem));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, r.max_dynamic_smem));
  if (r.clusters) {
    r.max_cluster = 8;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
      r.max_cluster = kMaxCluster;
    } else {
      (void)cudaGetLastError();  // no non-portable clusters on this device: at most 8 CTAs
    }
  }
  return cache.emplace(key, r).first->second;
}

template <typename scalar_t, Divergence D, Order O, bool POWER>
void launch_fwd_mode(const RowArgs<scalar_t, at::opmath_type<scalar_t>>& a,
                     const LossParams<at::opmath_type<scalar_t>>& P, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::string path = forced_path();
  // AMID_CUDA_BOUNDED=0: every row runs the general R2 / W (tests compare both; they agree to the approximate
  // instructions' errors: kl's fixed shift and a float power mean's wide-weights logarithm differ from M's, the guards
  // alone change nothing).
  // A tiny lam (LossParams::lam_tiny) needs the mixture's scaled forms, which BoundedRow leaves out:
  // then every row takes the general policy.
  const bool bounded_ok = !env_is("AMID_CUDA_BOUNDED", "0") && !(POWER && P.lam_tiny);

  // Which path by default: measured on an H200 (bf16, sm_90a, session 45; bench/results/gpu-h200-ed4bcc4), the
  // streaming kernel's forward with the gradient beat the resident one at every shape and loss tried: 8192 x 151936
  // kl/pr 7.7 ms vs 12.1 (clusters of 16 with the kept terms) and 10.2 (clusters of 8 recomputing), ab/rq 11.8 vs
  // 19.2, and at V = 32000, 128256 and 262144. The resident kernel reads the row once, but each CTA of a 16-CTA
  // cluster meets ~37 elements per thread of a row between cluster barriers (ncu: a third of the warps' samples
  // stalled at a barrier, issue slots 52% busy), while a streaming CTA's row is 593 elements per thread and its
  // re-reads cost less. So "auto" streams; AMID_CUDA_PATH=resident runs the resident kernel.
  // (at most 2^31 - 1 rows: the resident alpha-beta kernels index rows in 32 bits, amid_fwd_kernel's idx_t)
  const bool want_resident = path == "resident" && a.N <= int64_t(std::numeric_limits<int32_t>::max());
  auto resident = amid_fwd_kernel<scalar_t, D, O, true, POWER>;
  // The resident slice: within kResidentBudget (the layout the SASS gauge models) where one fits, else within the
  // device's opt-in limit (minus static shared memory); otherwise streaming.
  const ResidentInfo* info = want_resident ? &resident_info(resident) : nullptr;
  const int64_t budgets[2] = {info ? std::min<int64_t>(kResidentBudget, info->max_dynamic_smem) : 0,
                              info ? int64_t(info->max_dynamic_smem) : 0};
  // Candidates in order of preference: with the most kept terms (power mean, single order; RowArgs::stash) the
  // smallest cluster whose slice fits, then with fewer, then without them (the W pass recomputes the mixture) the
  // smallest cluster; a cluster shape the device cannot schedule moves on to the next candidate, the last
  // fallback is streaming. The three kept values (stash 2: the 16-bit alpha-beta qr / rq kernels; per row where
  // amid_math.h's ab_kept3_row_ok allows them) take up to the shared memory of two CTAs per SM, which their
  // registers allow anyway (V = 151936 bf16: a cluster of 16, 114048 bytes each). AMID_CUDA_STASH=0 turns the kept
  // terms off, AMID_CUDA_STASH=1 keeps d alone (tests cover every W pass).
  // (Only with a gradient row to write: the loss alone needs no W pass.)
  const bool stash_ok = POWER && O != Order::kJSD && a.grad != nullptr && !env_is("AMID_CUDA_STASH", "0");
  const bool kept3_ok = stash_ok && kept3_kernel<scalar_t, D, O>() && !env_is("AMID_CUDA_STASH", "1");
  const bool prefetch = !env_is("AMID_CUDA_PREFETCH", "0");  // (RowArgs::prefetch)
  std::pair<int, int> cand[3];
  int n_cand = 0;
  for (int bi = 0; info && bi < 2 && n_cand == 0; ++bi) {
    for (int level = kept3_ok ? 2 : (stash_ok ? 1 : 0); level >= 0; --level) {
      const int64_t lim = level == 2 ? int64_t(info->two_per_sm_dynamic_smem) : budgets[bi];
      for (int c = 1; c <= info->max_cluster; c *= 2) {
        if (resident_bytes<scalar_t, acc_t>(a.V, c, level) <= lim) {
          cand[n_cand++] = {c, level};
          break;
        }
      }
    }
  }
  for (int ci = 0; ci < n_cand; ++ci) {
    const int C = cand[ci].first;
    const int64_t smem = resident_bytes<scalar_t, acc_t>(a.V, C, cand[ci].second);
    RowArgs<scalar_t, at::opmath_type<scalar_t>> args = a;
    args.cluster = C;
    args.stash = cand[ci].second;
    args.slice_cap = int(resident_slice_cap<scalar_t>(a.V, C));
    args.bounded_ok = bounded_ok;
    args.prefetch = prefetch;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = size_t(smem);
    cfg.stream = stream;
    cfg.numAttrs = 0;
    int active = 0;
    if (C > 1) {
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = C;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      cfg.gridDim = dim3(C);
      if (cudaOccupancyMaxActiveClusters(&active, resident, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        active = 0;
      }
    } else {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, resident, kThreads, size_t(smem)));
      active = per_sm * sm_count();
    }
    if (active > 0) {
      const int64_t clusters_needed = a.N;
      const int64_t n_clusters = clusters_needed < active ? clusters_needed : active;
      cfg.gridDim = dim3(unsigned(n_clusters * C));
      args.row_step = unsigned(n_clusters);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, resident, args, P));
      return;
    }
    // The cluster shape cannot be scheduled on this device: the next candidate, then streaming.
  }
  auto streaming = amid_fwd_kernel<scalar_t, D, O, false, POWER>;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, streaming, kThreads, 0));
  const int64_t blocks = std::min<int64_t>(a.N, int64_t(std::max(per_sm, 1)) * sm_count());
  RowArgs<scalar_t, at::opmath_type<scalar_t>> args = a;
  args.cluster = 1;
  args.stash = 0;
  args.bounded_ok = bounded_ok;
  // At most 2^31 - 1 rows per launch (kernels with a 32-bit idx_t: fwd_index_32), each launch on its rows' slices.
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  if constexpr (fwd_index_32<D, O, false>()) {
    TORCH_CHECK(a.V <= kMaxRows, "amid_loss_fwd: expected a vocabulary below 2^31 for this loss on CUDA, got V = ", a.V);
  }
  for (int64_t r0 = 0; r0 < a.N; r0 += kMaxRows) {
    args.N = std::min(kMaxRows, a.N - r0);
    args.t = a.t + r0 * a.ldt;
    args.s = a.s + r0 * a.lds;
    args.grad = a.grad ? a.grad + r0 * a.V : nullptr;
    args.row_weight = a.row_weight ? a.row_weight + r0 : nullptr;
    args.grad_loss = a.grad_loss ? a.grad_loss + r0 : nullptr;
    args.loss = a.loss + r0;
    args.stats = a.stats + r0 * kNumStats;
    streaming<<<unsigned(std::min(blocks, args.N)), kThreads, 0, stream>>>(args, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, Divergence D, Order O, bool POWER>
void launch_bwd_mode(const RowArgs<scalar_t, at::opmath_type<scalar_t>>& a,
                     const LossParams<at::opmath_type<scalar_t>>& P, cudaStream_t stream) {
  auto kernel = amid_bwd_kernel<scalar_t, D, O, POWER>;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks = std::min<int64_t>(a.N, int64_t(std::max(per_sm, 1)) * sm_count());
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launchers: the power-mean kernels for kPower, the cheap-mode kernels otherwise
// (amid_math.h: mixture_from_logits_split).
template <typename scalar_t, Divergence D, Order O>
void launch_fwd(const RowArgs<scalar_t, at::opmath_type<scalar_t>>& a, const LossParams<at::opmath_type<scalar_t>>& P,
                cudaStream_t stream) {
  if (P.mode == MixMode::kPower) {
    launch_fwd_mode<scalar_t, D, O, true>(a, P, stream);
  } else {
    launch_fwd_mode<scalar_t, D, O, false>(a, P, stream);
  }
}

template <typename scalar_t, Divergence D, Order O>
void launch_bwd(const RowArgs<scalar_t, at::opmath_type<scalar_t>>& a, const LossParams<at::opmath_type<scalar_t>>& P,
                cudaStream_t stream) {
  if (P.mode == MixMode::kPower) {
    launch_bwd_mode<scalar_t, D, O, true>(a, P, stream);
  } else {
    launch_bwd_mode<scalar_t, D, O, false>(a, P, stream);
  }
}


#endif  // !AMID_KERNELS_ON_HOST

// Explicit instantiation of both launchers for one dtype, one divergence and its five orders: one translation unit
// each (csrc/cuda/amid_loss_<dtype>_<divergence>.cu), so a build on many cores compiles them side by side. nvcc
// compiles a unit's kernels one after another: with a unit per dtype, float64's was the build's critical path.
#define AMID_INSTANTIATE_LAUNCHERS(T, D)                                                     \
  AMID_INSTANTIATE_ONE(T, D, kPR) AMID_INSTANTIATE_ONE(T, D, kQR) AMID_INSTANTIATE_ONE(T, D, kRP) \
  AMID_INSTANTIATE_ONE(T, D, kRQ) AMID_INSTANTIATE_ONE(T, D, kJSD)
#define AMID_LAUNCHERS_ONE(PREFIX, T, D, O)                                                    \
  PREFIX template void launch_fwd<T, Divergence::D, Order::O>(                                 \
      const RowArgs<T, at::opmath_type<T>>&, const LossParams<at::opmath_type<T>>&, cudaStream_t); \
  PREFIX template void launch_bwd<T, Divergence::D, Order::O>(                                 \
      const RowArgs<T, at::opmath_type<T>>&, const LossParams<at::opmath_type<T>>&, cudaStream_t);
#define AMID_INSTANTIATE_ONE(T, D, O) AMID_LAUNCHERS_ONE(, T, D, O)

// ... and the matching declarations, so that a translation unit that includes this header and
// calls the launchers does not instantiate them again.
#define AMID_EXTERN_LAUNCHERS(T)                                                              \
  AMID_EXTERN_ONE(T, kKL, kPR) AMID_EXTERN_ONE(T, kKL, kQR) AMID_EXTERN_ONE(T, kKL, kRP)       \
  AMID_EXTERN_ONE(T, kKL, kRQ) AMID_EXTERN_ONE(T, kAB, kPR) AMID_EXTERN_ONE(T, kAB, kQR)       \
  AMID_EXTERN_ONE(T, kAB, kRP) AMID_EXTERN_ONE(T, kAB, kRQ) AMID_EXTERN_ONE(T, kKL, kJSD)       \
  AMID_EXTERN_ONE(T, kAB, kJSD)
#define AMID_EXTERN_ONE(T, D, O) AMID_LAUNCHERS_ONE(extern, T, D, O)

}  // namespace cuda_impl
}  // namespace amid

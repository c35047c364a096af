// utils.cuh -- small device helpers of the AMiD CUDA kernels: warp / CTA / cluster reductions of
// plain structs of floats (or doubles), and the row visitor with 16-byte vector loads.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace amid {
namespace cuda_detail {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // up to 1024 threads per CTA

// ------------------------------------------------------------------------------------------------
// Reductions of trivially copyable structs made of `T` fields, with a user merge (the online
// states of amid_online.h). The merges need not be commutative bit for bit: the lanes of a butterfly
// may end with states that differ in rounding, so only one lane's result is used (lane 0, which
// publishes it), and where several threads or CTAs need one value each runs the same merges on the
// same operands in the same order.

template <typename T, typename Acc>
__device__ __forceinline__ Acc shfl_xor_acc(const Acc& a, int offset) {
  static_assert(sizeof(Acc) % sizeof(T) == 0, "Acc must consist of T fields");
  constexpr int kN = sizeof(Acc) / sizeof(T);
  Acc out;
  const T* src = reinterpret_cast<const T*>(&a);
  T* dst = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < kN; ++i) dst[i] = __shfl_xor_sync(0xffffffffu, src[i], offset);
  return out;
}

// A butterfly over groups of `width` lanes (a power of two <= 32; the group of lane l is the `width` lanes around it
// whose indices differ from l in the low bits only): lane l merges lane l ^ offset's state, offsets width / 2 .. 1.
// Lane 0's result is that of the C++ tests' emulation (tests/cpp: gpu_order_reduce, `butterfly`).
template <typename T, typename Acc, typename Merge>
__device__ __forceinline__ Acc group_reduce(Acc a, unsigned width, Merge&& merge) {
  for (unsigned offset = width / 2; offset > 0; offset >>= 1) {
    const Acc o = shfl_xor_acc<T>(a, int(offset));
    merge(a, o);
  }
  return a;
}

// group_reduce over the whole warp, unrolled.
template <typename T, typename Acc, typename Merge>
__device__ __forceinline__ Acc warp_reduce(Acc a, Merge&& merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const Acc o = shfl_xor_acc<T>(a, offset);
    merge(a, o);
  }
  return a;
}

// CTA-wide reduction; `scratch` holds one Acc of shared memory per warp of the CTA. All threads get the result.
// The leading __syncthreads protects `scratch` from the previous call's readers.
template <typename T, typename Acc, typename Merge>
__device__ __forceinline__ Acc block_reduce(Acc a, Acc* scratch, Merge&& merge) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  a = warp_reduce<T>(a, merge);
  __syncthreads();
  if (lane == 0) scratch[warp] = a;
  __syncthreads();
  Acc r = scratch[0];
  for (int w = 1; w < nwarps; ++w) merge(r, scratch[w]);
  return r;
}

// CTA- and cluster-wide reduction for CTAs of kWarps warps (the forward kernel's), through distributed
// shared memory on sm_90+. `group(x, width)` reduces x over groups of `width` lanes (as group_reduce: lane 0's result
// counts); `ctas(scratch)`, run by warp 0, gives the CTA's state from its warps' (lane 0's result counts). Every warp
// reduces its lanes (width 32) and lane 0 publishes the warp's state in scratch[warp]; then warp 0 does the rest
// while the others wait at the barrier (cluster_reduce: it merges the warps' states in order, each lane the same;
// R1's reduction: the kWarps lanes reduce them as a group; the orders of the C++ tests' emulation, tests/cpp:
// gpu_order_reduce). In a cluster, lane 0 publishes the CTA's state in `slot[round & 1]` (two alternating slots, so a
// CTA that runs ahead to the next round cannot overwrite a slot a peer is still reading: one cluster barrier separates
// rounds k and k + 2); after the cluster barrier lane k < C reads rank k's slot (C remote reads per CTA) and the C
// lanes reduce them as a group (width C, a power of two <= 16), in the same order in every CTA of the cluster. Lane 0
// hands the result to the CTA through scratch[0]; the __syncwarp before makes every lane's reads of scratch[] happen
// before that write. Lane 0 of every CTA of the cluster reduces the same slots in the same order, so every CTA ends
// with the same state, bit for bit. The leading __syncthreads protects scratch from the previous call's readers.
// The two slots lie slot_bytes apart (sizeof(Acc) unless a smaller state reduces in a larger one's storage: its slots
// then lie in the larger one's, so that consecutive rounds' slots never overlap, whichever state each round reduces).
// kCluster false (a kernel launched without clusters, such as the forward kernel's streaming path): the cluster
// exchange compiles out, and `slot` and `round` are not used.
// `finish(state)`: what the CTA receives instead of the merged state (by default the state itself), formed by thread 0
// alone and handed over through scratch like the state (it must fit the warps' scratch, and stays there until the next
// call on that scratch writes it, after its leading barrier): a value that every thread would otherwise form alike
// from the same state (the forward kernel's row constants).
//
// Barrier semantics: cluster.sync() is barrier.cluster.arrive.release + wait.acquire; on sm_90a
// ptxas implements any release / fence at cluster scope as MEMBAR.ALL.GPU and the acquire as an L1
// invalidate (checked in the SASS; a relaxed arrive plus fence.acq_rel.cluster compiles to the
// same), so nothing weaker is available short of an mbarrier + st.async protocol.
struct KeepState {
  template <typename Acc>
  __device__ __forceinline__ const Acc& operator()(const Acc& x) const { return x; }
};
template <typename T, int kWarps, bool kCluster = true, typename Acc, typename Group, typename Ctas,
          typename Finish = KeepState>
__device__ __forceinline__ auto cluster_reduce_groups(Acc a, Acc* scratch, Acc* slot, unsigned round, Group&& group,
                                                      Ctas&& ctas, unsigned slot_bytes = sizeof(Acc),
                                                      Finish&& finish = {}) {
  static_assert(kWarps >= 1 && kWarps <= kWarpSize && (kWarps & (kWarps - 1)) == 0,
                "cluster_reduce: the warp count must be a power of two <= 32");
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  a = group(a, unsigned(kWarpSize));
  __syncthreads();
  if (lane == 0) scratch[warp] = a;
  __syncthreads();
  Acc x = a;
  if (warp == 0) x = ctas(static_cast<const Acc*>(scratch));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned nblocks = kCluster ? cluster.num_blocks() : 1u;
  if (nblocks > 1) {
    Acc* mine = reinterpret_cast<Acc*>(reinterpret_cast<unsigned char*>(slot) + (round & 1) * slot_bytes);
    if (threadIdx.x == 0) *mine = x;
    cluster.sync();  // release our slot, acquire the peers'
    if (warp == 0) {
      if (unsigned(lane) < nblocks) x = *cluster.map_shared_rank(mine, unsigned(lane));
      x = group(x, nblocks);
    }
  }
#endif
  __syncwarp();
  using Out = std::decay_t<decltype(finish(x))>;
  static_assert(sizeof(Out) <= sizeof(Acc) * kWarps && alignof(Out) <= alignof(Acc),
                "cluster_reduce: finish's result must fit the warps' scratch");
  Out* out = reinterpret_cast<Out*>(scratch);
  if (threadIdx.x == 0) *out = finish(x);
  __syncthreads();
  return *out;
}

// cluster_reduce_groups with butterflies of `merge` (group_reduce), the warps' states merged one after another.
template <typename T, int kWarps, bool kCluster = true, typename Acc, typename Merge, typename Finish = KeepState>
__device__ __forceinline__ auto cluster_reduce(Acc a, Acc* scratch, Acc* slot, unsigned round, Merge&& merge,
                                               unsigned slot_bytes = sizeof(Acc), Finish&& finish = {}) {
  return cluster_reduce_groups<T, kWarps, kCluster>(
      a, scratch, slot, round,
      [&](const Acc& x, unsigned width) {
        return width == unsigned(kWarpSize) ? warp_reduce<T>(x, merge) : group_reduce<T>(x, width, merge);
      },
      [&](const Acc* sc) {
        Acc x = sc[0];
#pragma unroll 1
        for (int w = 1; w < kWarps; ++w) merge(x, sc[w]);
        return x;
      },
      slot_bytes, finish);
}

// A kernel's dynamic shared memory, `name` its first byte (the C++ tests' host build of the kernels defines its own).
#ifndef AMID_DYNAMIC_SHARED
#define AMID_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// The number of CTAs in this CTA's cluster, and its rank (1 and 0 without clusters).
__device__ __forceinline__ unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// Whether this is its cluster's first thread (thread 0 of rank 0), from the special registers at each call: asm
// volatile, so that the result is formed where it is used (per row, outside the passes) instead of being kept in a
// register across the row (amid_fwd_kernel: at the register cap, ptxas spilled that flag in alpha-beta's kernels).
__device__ __forceinline__ bool cluster_lead_thread() {
  unsigned tid, rank = 0;
#if defined(__CUDA_ARCH__)
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
#else
  tid = threadIdx.x;  // (the C++ tests' host build of the kernels)
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
  return (tid | rank) == 0;
}

// Before a CTA of a cluster exits, peers may still read its shared memory (the last round's slot).
__device__ __forceinline__ void cluster_exit_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cooperative_groups::this_cluster().num_blocks() > 1) cooperative_groups::this_cluster().sync();
#endif
}

// ------------------------------------------------------------------------------------------------
// Row visitor: calls f(i, tv[], sv[], n) for the thread's share of elements [0, len) of a teacher
// row `t` and a student row `s` (global or shared memory), in chunks of kW = 16 / sizeof(scalar_t)
// elements read with one 16-byte load each, with scalar chunks (n = 1) for the unaligned head and
// the tail. n is a std::integral_constant, so the caller's per-chunk loops unroll fully and its
// per-element arrays stay in registers. Vector loads need t, s (and the gradient row `g`, when the caller writes it) to share
// their misalignment; otherwise every element goes through the scalar path.

// Asks the L2 cache to fetch the 16-byte-aligned interior of [p, p + n) (sm_90+: one bulk prefetch, issued by the
// calling thread; a hint, with no effect on the values read later; elsewhere nothing). Only whole 16-byte blocks inside
// the range are named, so no byte outside it is touched. For ranges below 1 MiB (sm_90a's SASS encodes the size in
// 16-byte units in 16 bits): the resident kernels' slices are shared-memory sized (< 228 KiB). (A clamp here moved the
// fp16 resident alpha-beta qr / rq kernels' per-row spill instructions 9 -> 15, session 56, for a case that cannot occur.)
template <typename scalar_t>
__device__ __forceinline__ void prefetch_l2(const scalar_t* p, int64_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const size_t g = __cvta_generic_to_global(p);  // (the instruction takes a .global address)
  const size_t b = (g + 15) & ~size_t(15), e = (g + n * sizeof(scalar_t)) & ~size_t(15);
  if (e > b) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(b), "r"(unsigned(e - b)) : "memory");
#endif
}

template <typename scalar_t>
struct VecWidth {
  static constexpr int value = 16 / sizeof(scalar_t);
};

__device__ __forceinline__ bool same_misalignment(const void* a, const void* b, size_t elem) {
  return ((reinterpret_cast<uintptr_t>(a) % 16) == (reinterpret_cast<uintptr_t>(b) % 16)) &&
         (reinterpret_cast<uintptr_t>(a) % elem == 0);
}

template <typename scalar_t>
__device__ __forceinline__ int64_t vector_head(const scalar_t* p, int64_t len) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const int64_t mis = (reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % kW;
  const int64_t head = (kW - mis) % kW;
  return head < len ? head : len;
}

template <typename scalar_t, typename F>
__device__ __forceinline__ void visit_row(const scalar_t* __restrict__ t, const scalar_t* __restrict__ s, int64_t len,
                                          bool vec_ok, F&& f) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const int tid = threadIdx.x, nt = blockDim.x;
  int64_t head = len, nvec = 0;
  if (vec_ok) {
    head = vector_head(t, len);
    nvec = (len - head) / kW;
  }
  for (int64_t i = tid; i < head; i += nt) {
    scalar_t tv[1] = {t[i]}, sv[1] = {s[i]};
    f(i, tv, sv, std::integral_constant<int, 1>{});
  }
  const uint4* t4 = reinterpret_cast<const uint4*>(t + head);
  const uint4* s4 = reinterpret_cast<const uint4*>(s + head);
  for (int64_t c = tid; c < nvec; c += nt) {
    const uint4 a = t4[c], b = s4[c];
    const scalar_t* tv = reinterpret_cast<const scalar_t*>(&a);
    const scalar_t* sv = reinterpret_cast<const scalar_t*>(&b);
    f(head + c * kW, tv, sv, std::integral_constant<int, kW>{});
  }
  for (int64_t i = head + nvec * kW + tid; i < len; i += nt) {
    scalar_t tv[1] = {t[i]}, sv[1] = {s[i]};
    f(i, tv, sv, std::integral_constant<int, 1>{});
  }
}

// Stores n (1 or kW) values at g[i] of *shared* memory, with one 16-byte store when n == kW (then g + i is aligned).
// The packed registers go through st.shared.v4 explicitly, as store_chunk_global's: a plain uint4 assignment was split
// into four 32-bit stores where the registers were also widened (R1's staging copy; bf16 sm_90a: 3 instructions per
// 8 elements).
template <int n, typename scalar_t>
__device__ __forceinline__ void store_chunk(scalar_t* g, int64_t i, const scalar_t* vals) {
  constexpr int kW = VecWidth<scalar_t>::value;
  if constexpr (n == kW) {
    uint4 v;
    static_assert(sizeof(v) == kW * sizeof(scalar_t), "a chunk is 16 bytes");
    memcpy(&v, vals, sizeof(v));
#if defined(__CUDA_ARCH__)
    const unsigned addr = unsigned(__cvta_generic_to_shared(g + i));
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#else
    memcpy(g + i, &v, sizeof(v));
#endif
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) g[i + j] = vals[j];
  }
}

// Stores n (1 or kW) values at g[i] of a *global* row, with one 16-byte store (STG.E.128) when n == kW
// (then g + i is aligned). The packed registers go through st.global.v4 explicitly: a plain uint4
// assignment from the per-element array was split into four 32-bit stores by the compiler, and
// __stwb compiles to a STG.E.128.STRONG.SM. No "memory" clobber: nothing in the kernels reads a
// gradient element after writing it (the values stored depend on the loads that precede them).
// n values of any type to / from p + i in 16-byte vectors where n values fill whole vectors (the chunk
// of n = kW elements, whose start is aligned: the caller keeps p at the row slice's misalignment), else
// one by one. vals is 16-byte aligned.
template <int n, typename T>
__device__ __forceinline__ void store_vals(T* p, int64_t i, const T* vals) {
  if constexpr ((n * sizeof(T)) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < int(n * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(p + i)[k] = reinterpret_cast<const uint4*>(vals)[k];
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) p[i + j] = vals[j];
  }
}
template <int n, typename T>
__device__ __forceinline__ void load_vals(const T* p, int64_t i, T* vals) {
  if constexpr ((n * sizeof(T)) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < int(n * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(vals)[k] = reinterpret_cast<const uint4*>(p + i)[k];
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) vals[j] = p[i + j];
  }
}

template <int n, typename scalar_t>
__device__ __forceinline__ void store_chunk_global(scalar_t* g, int64_t i, const scalar_t* vals) {
  constexpr int kW = VecWidth<scalar_t>::value;
  if constexpr (n == kW) {
    uint4 v;
    static_assert(sizeof(v) == kW * sizeof(scalar_t), "a chunk is 16 bytes");
    memcpy(&v, vals, sizeof(v));
#if defined(__CUDA_ARCH__)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(g + i), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#else
    memcpy(g + i, &v, sizeof(v));
#endif
  } else {
#pragma unroll
    for (int j = 0; j < n; ++j) g[i + j] = vals[j];
  }
}

// g[0, len) = value for this CTA's threads, in 16-byte stores between a scalar head and tail.
template <typename scalar_t>
__device__ __forceinline__ void fill_vec(scalar_t* g, int64_t len, scalar_t value) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t head = vector_head(g, len), nvec = (len - head) / kW;
  alignas(16) scalar_t chunk[kW];
#pragma unroll
  for (int j = 0; j < kW; ++j) chunk[j] = value;
  for (int64_t i = tid; i < head; i += nt) g[i] = value;
  for (int64_t c = tid; c < nvec; c += nt) store_chunk_global<kW>(g + head, c * kW, chunk);
  for (int64_t i = head + nvec * kW + tid; i < len; i += nt) g[i] = value;
}

// g[0, len) = f(g[i]) for this CTA's threads, with 16-byte loads and stores between a scalar head and tail.
template <typename scalar_t, typename F>
__device__ __forceinline__ void map_vec(scalar_t* g, int64_t len, F&& f) {
  constexpr int kW = VecWidth<scalar_t>::value;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t head = vector_head(g, len), nvec = (len - head) / kW;
  for (int64_t i = tid; i < head; i += nt) g[i] = f(g[i]);
  for (int64_t c = tid; c < nvec; c += nt) {
    scalar_t* p = g + head + c * kW;
    const uint4 in = *reinterpret_cast<const uint4*>(p);
    alignas(16) scalar_t v[kW];
    memcpy(v, &in, sizeof(in));
#pragma unroll
    for (int j = 0; j < kW; ++j) v[j] = f(v[j]);
    store_chunk_global<kW>(p, 0, v);
  }
  for (int64_t i = head + nvec * kW + tid; i < len; i += nt) g[i] = f(g[i]);
}

}  // namespace cuda_detail
}  // namespace amid

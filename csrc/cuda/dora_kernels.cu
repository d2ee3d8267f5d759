// CUDA kernels of the DoRA op (docs/design.md section 5). Plain CUDA C++: no torch header.
//
// Row passes. Token row (n, t) starts at z + n·stride_n + t·stride_t and is contiguous over the
// vocabulary, so shifted views such as logits[:, :-1] are read in place. A row is covered by 16-byte
// packs aligned in memory (4 fp32, 8 bf16/fp16 or 2 fp64 values); the first and last pack may hang over
// the row's ends and are then read value by value. Each thread loads kUnroll packs into registers before
// using any of them (kUnroll·16 bytes in flight), folds their maximum into an online (max, Σ exp) pair
// once, then adds one exponential per value. In fp32 the exponential is 2^u by the flush-to-zero ex2
// instruction, u = (x − m)·log2 e as one subtraction and one FMA (dora_math.h's Shift).
//
// When N·T rows are too few to fill the GPU, `splits` blocks share a row, each over a contiguous range
// of its packs. The forward writes one partial (max, sum) pair per block; a second kernel merges a row's
// pairs in a fixed order and sums S and L per sequence, so results do not depend on scheduling (no
// atomics). The per-batch stage is one block running the shared code of dora_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "dora_cuda.h"
#include "dora_math.h"

namespace dora {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kStageThreads = 256;
constexpr int kWarp = 32;
constexpr int kUnroll = 4;       // 16-byte packs each thread loads before using them
constexpr int kMaxSplits = 64;   // blocks sharing one row, at most
constexpr int kTargetWaves = 4;  // fewer blocks than this many waves: split rows
constexpr int kRowMinBlocks = 4; // row-pass blocks resident per multiprocessor at least (≤ 64 registers)
constexpr unsigned kFullMask = 0xffffffffu;

// The block reductions below reduce within each warp by shuffles, then let one warp reduce the warps'
// results: whole warps, and no more warps than a warp has lanes.
static_assert(kRowThreads % kWarp == 0 && kRowThreads / kWarp <= kWarp, "row blocks: whole warps, at most 32");
static_assert(kStageThreads % kWarp == 0 && kStageThreads / kWarp <= kWarp, "stage blocks: whole warps, at most 32");
static_assert(kUnroll * 16 >= 64, "at least 64 bytes of loads in flight per thread");

template <typename scalar_t>
struct Traits {
  using acc_t = float;
};
template <>
struct Traits<double> {
  using acc_t = double;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t narrow(typename Traits<scalar_t>::acc_t x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half(x); }

// The row passes' exponential and its units. fp32: base 2, 2^u by ex2.approx.ftz (results below 2^-126
// flush to 0: far below the 2^-24 a sum of terms ≥ 1 resolves). fp64: natural units, exp (dora_math.h's
// NaturalUnits).
__device__ __forceinline__ float exp2_ftz(float u) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(u));
  return y;
#else
  return exp2f(u);
#endif
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Base-2 units: the exponent of x against m + lo is fma(x − m, log2e, −lo) = (x − m)·log2 e − lo, one
// subtraction and one FMA per value (Shift in dora_math.h); lo is 0, or the backward's log s·log2 e.
struct Base2Units {
  __device__ __forceinline__ Shift<float> shift_of(float m) const { return {m, 0.0f}; }
  __device__ __forceinline__ Shift<float> shift_of(float m, float log_s) const { return {m, log_s * kLog2e}; }
  __device__ __forceinline__ float exp_from(float x, Shift<float> shift) const {
    return exp2_ftz(fmaf(x - shift.hi, kLog2e, -shift.lo));
  }
  __device__ __forceinline__ float log(float s) const { return log2f(s) * kLn2; }
};

template <typename acc_t>
struct UnitsOf {
  using type = Base2Units;
};
template <>
struct UnitsOf<double> {
  using type = NaturalUnits;
};

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(scalar_t);
  scalar_t v[kWidth];
};

// The packs covering a row: pack k holds values k·W − lead … k·W − lead + W − 1 (those outside [0, V)
// are not part of the row). `vector` is false for rows whose address is not a multiple of the element
// size (never for tensors PyTorch allocates); every pack is then read and written value by value.
struct RowPacks {
  int64_t lead, count;
  bool vector;
};

template <typename scalar_t>
__device__ __forceinline__ RowPacks row_packs(const void* row, int64_t V) {
  constexpr int64_t W = Pack<scalar_t>::kWidth;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  const bool vector = addr % sizeof(scalar_t) == 0;
  const int64_t lead = vector ? static_cast<int64_t>((addr % 16) / sizeof(scalar_t)) : 0;
  return {lead, (V + lead + W - 1) / W, vector};
}

// The packs [begin, end) of `count` that block `split` of `splits` takes.
struct PackRange {
  int64_t begin, end;
};
__device__ __forceinline__ PackRange split_range(int64_t count, int split, int splits) {
  return {count * split / splits, count * (split + 1) / splits};
}

template <typename scalar_t>
__device__ __forceinline__ bool whole_pack(const RowPacks& rp, int64_t k, int64_t V) {
  constexpr int64_t W = Pack<scalar_t>::kWidth;
  const int64_t first = k * W - rp.lead;
  return rp.vector && first >= 0 && first + W <= V;
}

// Pack k read value by value: values outside the row, and packs past `end`, are `fill`.
template <typename scalar_t>
__device__ __noinline__ Pack<scalar_t> load_values(const scalar_t* row, const RowPacks& rp, int64_t k, int64_t end,
                                                   int64_t V, scalar_t fill) {
  constexpr int W = Pack<scalar_t>::kWidth;
  Pack<scalar_t> p;
  const int64_t first = k * W - rp.lead;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const int64_t v = first + j;
    p.v[j] = k < end && v >= 0 && v < V ? row[v] : fill;
  }
  return p;
}

// kUnroll packs k, k + kRowThreads, … of [.., end) into registers: every whole pack by one 16-byte load,
// all issued before any value is used; the rare pack over a row end (or past `end`) value by value.
// `layout` gives the pack boundaries; with `vector_loads` false every pack is read value by value
// (an input row whose alignment differs from the output row's).
template <typename scalar_t>
__device__ __forceinline__ void load_packs(Pack<scalar_t> (&p)[kUnroll], const scalar_t* row, const RowPacks& layout,
                                           bool vector_loads, int64_t k, int64_t end, int64_t V, scalar_t fill) {
  constexpr int64_t W = Pack<scalar_t>::kWidth;
  bool whole[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t ku = k + static_cast<int64_t>(u) * kRowThreads;
    whole[u] = vector_loads && ku < end && whole_pack<scalar_t>(layout, ku, V);
    if (whole[u]) p[u] = *reinterpret_cast<const Pack<scalar_t>*>(row + (ku * W - layout.lead));
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t ku = k + static_cast<int64_t>(u) * kRowThreads;
    if (whole[u]) continue;
    if (ku < end) {
      p[u] = load_values(row, layout, ku, end, V, fill);
    } else {
#pragma unroll
      for (int j = 0; j < static_cast<int>(W); ++j) p[u].v[j] = fill;
    }
  }
}

// Stores pack k of the output row: one 16-byte store when whole, else only its values inside the row.
template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* row, const RowPacks& rp, int64_t k, int64_t V,
                                           const Pack<scalar_t>& p) {
  constexpr int W = Pack<scalar_t>::kWidth;
  const int64_t first = k * W - rp.lead;
  if (whole_pack<scalar_t>(rp, k, V)) {
    *reinterpret_cast<Pack<scalar_t>*>(row + first) = p;
    return;
  }
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const int64_t v = first + j;
    if (v >= 0 && v < V) row[v] = p.v[j];
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t negative_infinity_value() {
  return narrow<scalar_t>(negative_infinity<typename Traits<scalar_t>::acc_t>());
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T x, int lane_mask) {
  return __shfl_xor_sync(kFullMask, x, lane_mask);
}

// All threads of a block of kThreads get the reduction of `x` by `op`; `shared` holds one value per warp.
template <int kThreads, typename T, typename Op>
__device__ T block_all_reduce(T x, T identity, T* shared, Op op) {
  static_assert(kThreads % kWarp == 0 && kThreads / kWarp <= kWarp, "whole warps, at most one warp of warps");
  constexpr int kWarps = kThreads / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = op(x, shfl_xor(x, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < kWarps ? shared[lane] : identity;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = op(x, shfl_xor(x, offset));
  return x;
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max_nan(a, b); }
};

// Row r of a row pass and the block's share of it.
struct RowTask {
  int64_t r;
  int split;
};
__device__ __forceinline__ RowTask row_task(int splits) {
  return {static_cast<int64_t>(blockIdx.x) / splits, static_cast<int>(blockIdx.x % splits)};
}

template <typename Pointer>
__device__ __forceinline__ Pointer row_at(Pointer base, int64_t r, int64_t T, int64_t stride_n, int64_t stride_t) {
  return base + (r / T) * stride_n + (r % T) * stride_t;
}

// Forward blocks resident per multiprocessor at least. The bf16 and fp64 forward spill on sm_90 within the
// 64 registers of kRowMinBlocks (ptxas: 68+76 and 176+176 bytes of spill stores+loads); with 3 blocks
// (≤ 80 registers) they do not, and 768 threads × kUnroll·16 bytes in flight still cover memory latency.
template <typename scalar_t>
constexpr int kForwardMinBlocks = kRowMinBlocks;
template <>
constexpr int kForwardMinBlocks<__nv_bfloat16> = 3;
template <>
constexpr int kForwardMinBlocks<double> = 3;

// (1) Forward: the partial (max, Σ exp) in units of block (r, split) over its packs of row r.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads, kForwardMinBlocks<scalar_t>)
    forward_rows(const scalar_t* __restrict__ z, const int64_t* __restrict__ labels, RowShape s,
                 typename Traits<scalar_t>::acc_t* __restrict__ partial_m,
                 typename Traits<scalar_t>::acc_t* __restrict__ partial_s) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  using Units = typename UnitsOf<acc_t>::type;
  constexpr int W = Pack<scalar_t>::kWidth;
  const RowTask task = row_task(s.splits);
  const int64_t label = labels[task.r];
  if (label == s.ignore_index || !label_in_vocabulary(label, s.V)) return;  // finish_rows sets these rows
  const scalar_t* row = row_at(z, task.r, s.T, s.stride_n, s.stride_t);
  const RowPacks rp = row_packs<scalar_t>(row, s.V);
  const PackRange range = split_range(rp.count, task.split, s.splits);
  const scalar_t fill = negative_infinity_value<scalar_t>();
  OnlineLse<acc_t> state{negative_infinity<acc_t>(), acc_t(0)};
  for (int64_t k = range.begin + threadIdx.x; k < range.end; k += static_cast<int64_t>(kUnroll) * kRowThreads) {
    Pack<scalar_t> p[kUnroll];
    load_packs(p, row, rp, true, k, range.end, s.V, fill);
    acc_t vmax = negative_infinity<acc_t>();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < W; ++j) vmax = fmax_(vmax, widen(p[u].v[j]));
    }
    state.raise_to(vmax, Units{});
    const Shift<acc_t> shift = state.shift(Units{});
    acc_t sums[kUnroll];  // widened again rather than kept: the packs take fewer registers
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sums[u] = acc_t(0);
#pragma unroll
      for (int j = 0; j < W; ++j) sums[u] += Units{}.exp_from(widen(p[u].v[j]), shift);
    }
#pragma unroll
    for (int width = kUnroll / 2; width > 0; width /= 2) {
#pragma unroll
      for (int u = 0; u < width; ++u) sums[u] += sums[u + width];
    }
    state.s += sums[0];
  }

  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    state.merge(shfl_xor(state.m, offset), shfl_xor(state.s, offset), Units{});
  }
  __shared__ acc_t shared_m[kRowThreads / kWarp], shared_s[kRowThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    shared_m[warp] = state.m;
    shared_s[warp] = state.s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    OnlineLse<acc_t> total{negative_infinity<acc_t>(), acc_t(0)};
    for (int w = 0; w < kRowThreads / kWarp; ++w) total.merge(shared_m[w], shared_s[w], Units{});
    partial_m[blockIdx.x] = total.m;
    partial_s[blockIdx.x] = total.s;
  }
}

// (1) Forward, second kernel, one block per sequence n: each token's log-sum-exp (m, log s) from its rows'
// partial pairs (merged in split order), then S[n] = Σ_t lp[n, t] and
// L[n] = #{t: labels[n, t] ≠ ignore_index}.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    finish_rows(const scalar_t* __restrict__ z, const int64_t* __restrict__ labels, RowShape s,
                const typename Traits<scalar_t>::acc_t* __restrict__ partial_m,
                const typename Traits<scalar_t>::acc_t* __restrict__ partial_s,
                typename Traits<scalar_t>::acc_t* __restrict__ lse, typename Traits<scalar_t>::acc_t* __restrict__ S,
                typename Traits<scalar_t>::acc_t* __restrict__ L) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  using Units = typename UnitsOf<acc_t>::type;
  __shared__ acc_t shared[kRowThreads / kWarp];
  const int64_t n = blockIdx.x;
  acc_t total = acc_t(0), count = acc_t(0);
  for (int64_t t = threadIdx.x; t < s.T; t += kRowThreads) {
    const int64_t r = n * s.T + t;
    const int64_t label = labels[r];
    if (label == s.ignore_index) {
      RowNormaliser<acc_t>{acc_t(0), acc_t(0)}.store(lse, r);
      continue;
    }
    count += acc_t(1);
    if (!label_in_vocabulary(label, s.V)) {
      RowNormaliser<acc_t>{acc_t(NAN), acc_t(NAN)}.store(lse, r);
      total += acc_t(NAN);
      continue;
    }
    OnlineLse<acc_t> state{negative_infinity<acc_t>(), acc_t(0)};
    for (int i = 0; i < s.splits; ++i) {
      state.merge(partial_m[r * s.splits + i], partial_s[r * s.splits + i], Units{});
    }
    RowNormaliser<acc_t>::of(state, Units{}).store(lse, r);
    total += state.log_prob(widen(row_at(z, r, s.T, s.stride_n, s.stride_t)[label]), Units{});
  }
  total = block_all_reduce<kRowThreads>(total, acc_t(0), shared, SumOp{});
  count = block_all_reduce<kRowThreads>(count, acc_t(0), shared, SumOp{});
  if (threadIdx.x == 0) {
    S[n] = total;
    L[n] = count;
  }
}

// Narrows W accumulated values into a pack (pairs at once for bf16/fp16).
template <typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ void narrow_pack(Pack<scalar_t>& out, const acc_t (&v)[W]) {
#pragma unroll
  for (int j = 0; j < W; ++j) out.v[j] = narrow<scalar_t>(v[j]);
}
template <>
__device__ __forceinline__ void narrow_pack<__nv_bfloat16, float, 8>(Pack<__nv_bfloat16>& out, const float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 8; j += 2) reinterpret_cast<__nv_bfloat162*>(out.v)[j / 2] = __floats2bfloat162_rn(v[j], v[j + 1]);
}
template <>
__device__ __forceinline__ void narrow_pack<__half, float, 8>(Pack<__half>& out, const float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 8; j += 2) reinterpret_cast<__half2*>(out.v)[j / 2] = __floats2half2_rn(v[j], v[j + 1]);
}

// (3) Backward: block (r, split) writes its packs of grad row r, dz = g·(onehot(y) − p) with
// p = E((x − m) − log s) from the saved RowNormaliser; the label's value is its label_gradient
// (−g·expm1((z_y − m) − log s)), formed by the thread that loaded z_y before any store, so the pass may
// write over its own input (grad == z). Packs follow the output row's alignment; the input is read by
// packs too when its row has the same alignment.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
    backward_rows(const scalar_t* z, scalar_t* grad, int64_t grad_stride_n, int64_t grad_stride_t,
                  const int64_t* __restrict__ labels, const typename Traits<scalar_t>::acc_t* __restrict__ lse,
                  const typename Traits<scalar_t>::acc_t* __restrict__ gS, RowShape s) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  using Units = typename UnitsOf<acc_t>::type;
  constexpr int W = Pack<scalar_t>::kWidth;
  constexpr int64_t kStep = static_cast<int64_t>(kUnroll) * kRowThreads;
  const RowTask task = row_task(s.splits);
  const int64_t label = labels[task.r];
  scalar_t* out = row_at(grad, task.r, s.T, grad_stride_n, grad_stride_t);
  const RowPacks op = row_packs<scalar_t>(out, s.V);
  const PackRange range = split_range(op.count, task.split, s.splits);
  if (label == s.ignore_index) {  // a zero row, without reading the logits
    Pack<scalar_t> zeros;
#pragma unroll
    for (int j = 0; j < W; ++j) zeros.v[j] = narrow<scalar_t>(acc_t(0));
    for (int64_t k = range.begin + threadIdx.x; k < range.end; k += kRowThreads) store_pack(out, op, k, s.V, zeros);
    return;
  }
  const scalar_t* row = row_at(z, task.r, s.T, s.stride_n, s.stride_t);
  const RowPacks ip = row_packs<scalar_t>(row, s.V);
  const bool vector_loads = ip.vector && op.vector && ip.lead == op.lead;
  const bool in_vocabulary = label_in_vocabulary(label, s.V);
  const acc_t g = gS[task.r / s.T];
  const RowNormaliser<acc_t> norm =  // NaN: a NaN row, see dora_math.h
      in_vocabulary ? RowNormaliser<acc_t>::load(lse, task.r) : RowNormaliser<acc_t>{acc_t(NAN), acc_t(NAN)};
  const Shift<acc_t> shift = norm.shift(Units{});
  const acc_t minus_g = -g;
  const scalar_t fill = narrow<scalar_t>(acc_t(0));
  for (int64_t k = range.begin + threadIdx.x; k < range.end; k += kStep) {
    Pack<scalar_t> p[kUnroll];
    load_packs(p, row, op, vector_loads, k, range.end, s.V, fill);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ku = k + static_cast<int64_t>(u) * kRowThreads;
      acc_t dz[W];
#pragma unroll
      for (int j = 0; j < W; ++j) dz[j] = minus_g * Units{}.exp_from(widen(p[u].v[j]), shift);
      const int64_t first = ku * W - op.lead;
      if (in_vocabulary && label >= first && label < first + W) {  // the label's pack: one per row
#pragma unroll
        for (int j = 0; j < W; ++j) {
          if (first + j == label) dz[j] = norm.label_gradient(g, widen(p[u].v[j]));
        }
      }
      Pack<scalar_t> result;
      narrow_pack(result, dz);
      if (ku < range.end) store_pack(out, op, ku, s.V, result);
    }
  }
}

// x *= *factor, unless *factor == 1 (then nothing is read or written).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) rescale_kernel(T* __restrict__ x, int64_t count, const T* factor) {
  const T f = *factor;
  if (f == T(1)) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x; i < count; i += step) x[i] *= f;
}

// The Block policy of dora_math.h for one CUDA thread block of kStageThreads.
template <typename T>
struct ThreadBlock {
  T* shared;
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return kStageThreads; }
  __device__ void sync() const { __syncthreads(); }
  __device__ T sum(T x) const { return block_all_reduce<kStageThreads>(x, T(0), shared, SumOp{}); }
  __device__ T max(T x) const { return block_all_reduce<kStageThreads>(x, negative_infinity<T>(), shared, MaxOp{}); }
};

template <typename T>
struct StageParams {
  T value[kMaxLossParams];
  __device__ explicit StageParams(const LossParams& p) {
    for (int i = 0; i < kMaxLossParams; ++i) value[i] = static_cast<T>(p.value[i]);
  }
};

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    prompt_loss_kernel(StageArgs a, const T* S, const T* L, const T* S_ref, const T* scores, T* ell, T* dell_dS) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  const StageParams<T> prm(a.params);
  ::dora::prompt_losses<T>(a.loss_code, prm.value, a.B, a.K, S, L, S_ref, scores, block, ell, dell_dS);
}

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    robust_reduce_kernel(StageArgs a, const T* ell, const T* h, T* loss, T* weights, T* dloss_dell) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  ::dora::robust_reduce<T>(a.strategy_code, static_cast<T>(a.lam), a.B, ell, h, block, loss, weights, dloss_dell);
}

template <typename T>
__global__ void __launch_bounds__(kStageThreads)
    batch_stage_kernel(StageArgs a, const T* S, const T* L, const T* S_ref, const T* scores, const T* h, T* ell,
                       T* loss, T* weights, T* gS) {
  __shared__ T shared[kStageThreads / kWarp];
  ThreadBlock<T> block{shared};
  const StageParams<T> prm(a.params);
  // gS doubles as the ∂ℓ_b/∂S scratch: batch_stage overwrites each entry with its final value in place.
  ::dora::batch_stage<T>(a.loss_code, prm.value, a.strategy_code, static_cast<T>(a.lam), a.B, a.K, S, L, S_ref, scores, h,
                         block, ell, gS, loss, weights, gS);
}

// Resident blocks of the row kernels on the whole current device (its multiprocessors × the forward
// kernel's occupancy), looked up once per device and dtype.
constexpr int kMaxDevices = 64;
std::atomic<int> resident_cache[kMaxDevices][4];

template <typename scalar_t>
int resident_row_blocks(int dtype_index) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int cached = resident_cache[device][dtype_index].load(std::memory_order_relaxed);
  if (cached > 0) return cached;
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, forward_rows<scalar_t>, kRowThreads, 0) != cudaSuccess) {
    cudaGetLastError();  // clear it: splitting is an optimisation, one block per row is always correct
    return 0;
  }
  cached = sms * (per_sm > 0 ? per_sm : 1);
  resident_cache[device][dtype_index].store(cached, std::memory_order_relaxed);
  return cached;
}

template <typename scalar_t>
int row_splits_for(const RowShape& s, int dtype_index) {
  const int64_t rows = s.N * s.T;
  if (rows <= 0) return 1;
  const int64_t target = static_cast<int64_t>(kTargetWaves) * resident_row_blocks<scalar_t>(dtype_index);
  if (rows >= target) return 1;
  // Each block keeps at least one full round of kUnroll packs per thread.
  const int64_t packs = s.V / Pack<scalar_t>::kWidth + 1;
  const int64_t most = packs / (static_cast<int64_t>(kUnroll) * kRowThreads);
  int64_t splits = (target + rows - 1) / rows;
  splits = splits < most ? splits : most;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  // grid.x = rows · splits stays below 2^31
  while (splits > 1 && rows * splits > 0x7fffffff) --splits;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

template <typename scalar_t>
cudaError_t launch_forward(const void* logits, const int64_t* labels, RowShape s, void* lse, void* partial, void* S,
                           void* L, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t rows = s.N * s.T;
  acc_t* partial_m = static_cast<acc_t*>(partial);
  acc_t* partial_s = partial_m + rows * s.splits;
  if (rows > 0) {
    forward_rows<scalar_t><<<static_cast<unsigned>(rows * s.splits), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), labels, s, partial_m, partial_s);
  }
  if (s.N > 0) {
    finish_rows<scalar_t><<<static_cast<unsigned>(s.N), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), labels, s, partial_m, partial_s, static_cast<acc_t*>(lse),
        static_cast<acc_t*>(S), static_cast<acc_t*>(L));
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* logits, void* grad, int64_t grad_stride_n, int64_t grad_stride_t,
                            const int64_t* labels, const void* lse, const void* gS, RowShape s, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  if (s.N * s.T > 0) {
    backward_rows<scalar_t><<<static_cast<unsigned>(s.N * s.T * s.splits), kRowThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<scalar_t*>(grad), grad_stride_n, grad_stride_t, labels,
        static_cast<const acc_t*>(lse), static_cast<const acc_t*>(gS), s);
  }
  return cudaGetLastError();
}

}  // namespace

int row_splits(DType dtype, const RowShape& shape) {
  switch (dtype) {
    case DType::kFloat32: return row_splits_for<float>(shape, 0);
    case DType::kBFloat16: return row_splits_for<__nv_bfloat16>(shape, 1);
    case DType::kFloat16: return row_splits_for<__half>(shape, 2);
    default: return row_splits_for<double>(shape, 3);
  }
}

cudaError_t seq_logprobs_fwd(DType dtype, const void* logits, const int64_t* labels, RowShape shape, void* lse,
                             void* partial, void* S, void* L, cudaStream_t stream) {
  if (shape.splits < 1) shape.splits = 1;
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(logits, labels, shape, lse, partial, S, L, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(logits, labels, shape, lse, partial, S, L, stream);
    case DType::kFloat16: return launch_forward<__half>(logits, labels, shape, lse, partial, S, L, stream);
    default: return launch_forward<double>(logits, labels, shape, lse, partial, S, L, stream);
  }
}

cudaError_t seq_logprobs_bwd(DType dtype, const void* logits, void* grad, int64_t grad_stride_n,
                             int64_t grad_stride_t, const int64_t* labels, const void* lse, const void* gS,
                             RowShape shape, cudaStream_t stream) {
  if (shape.splits < 1) shape.splits = 1;
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(logits, grad, grad_stride_n, grad_stride_t, labels, lse, gS, shape, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(logits, grad, grad_stride_n, grad_stride_t, labels, lse, gS, shape, stream);
    case DType::kFloat16:
      return launch_backward<__half>(logits, grad, grad_stride_n, grad_stride_t, labels, lse, gS, shape, stream);
    default:
      return launch_backward<double>(logits, grad, grad_stride_n, grad_stride_t, labels, lse, gS, shape, stream);
  }
}

cudaError_t rescale(bool fp64, void* x, int64_t count, const void* factor, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  int64_t blocks = (count + kRowThreads - 1) / kRowThreads;
  blocks = blocks < 4096 ? blocks : 4096;
  if (fp64) {
    rescale_kernel<double><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        static_cast<double*>(x), count, static_cast<const double*>(factor));
  } else {
    rescale_kernel<float><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        static_cast<float*>(x), count, static_cast<const float*>(factor));
  }
  return cudaGetLastError();
}

cudaError_t prompt_loss(bool fp64, const StageArgs& a, const void* S, const void* L, const void* S_ref,
                        const void* scores, void* ell, void* dell_dS, cudaStream_t stream) {
  if (fp64) {
    prompt_loss_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(S), static_cast<const double*>(L), static_cast<const double*>(S_ref),
        static_cast<const double*>(scores), static_cast<double*>(ell), static_cast<double*>(dell_dS));
  } else {
    prompt_loss_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(S), static_cast<const float*>(L), static_cast<const float*>(S_ref),
        static_cast<const float*>(scores), static_cast<float*>(ell), static_cast<float*>(dell_dS));
  }
  return cudaGetLastError();
}

cudaError_t robust_reduce(bool fp64, const StageArgs& a, const void* ell, const void* h, void* loss, void* weights,
                          void* dloss_dell, cudaStream_t stream) {
  if (fp64) {
    robust_reduce_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(ell), static_cast<const double*>(h), static_cast<double*>(loss),
        static_cast<double*>(weights), static_cast<double*>(dloss_dell));
  } else {
    robust_reduce_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(ell), static_cast<const float*>(h), static_cast<float*>(loss),
        static_cast<float*>(weights), static_cast<float*>(dloss_dell));
  }
  return cudaGetLastError();
}

cudaError_t batch_stage(bool fp64, const StageArgs& a, const void* S, const void* L, const void* S_ref,
                        const void* scores, const void* h, void* ell, void* loss, void* weights, void* gS,
                        cudaStream_t stream) {
  if (fp64) {
    batch_stage_kernel<double><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const double*>(S), static_cast<const double*>(L), static_cast<const double*>(S_ref),
        static_cast<const double*>(scores), static_cast<const double*>(h), static_cast<double*>(ell),
        static_cast<double*>(loss), static_cast<double*>(weights), static_cast<double*>(gS));
  } else {
    batch_stage_kernel<float><<<1, kStageThreads, 0, stream>>>(
        a, static_cast<const float*>(S), static_cast<const float*>(L), static_cast<const float*>(S_ref),
        static_cast<const float*>(scores), static_cast<const float*>(h), static_cast<float*>(ell),
        static_cast<float*>(loss), static_cast<float*>(weights), static_cast<float*>(gS));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dora
